"""The connect hook before the upgrade, over real sockets with real clients: rejections (status,
headers, body) as websockets, aiohttp and Chromium see them, Set-Cookie on the 101, user and state
on the session and in the hub, async hooks within handshake_timeout, hooks that raise, Origin checks
(CSWSH), and the per-address connection cap."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest
import websockets

from fastws import Accept, App, ConnectRequest, Endpoint, Reject, Response
from wsraw import RawWS, build_frame, http_exchange, upgrade_request, wait_for, wait_no_connections

pytestmark = pytest.mark.timeout(60)

TOKENS = {"secret-alice": "alice", "secret-bob": "bob"}


class WhoAmI(Endpoint):
    """Answers every message with who the connect hook said the client is."""

    def on_message(self, message: str | bytes) -> None:
        self.session.send(f"{self.session.user}:{(self.session.state or {}).get('role')}:{message}")


def token_app(**hook_options: Any) -> App:
    def authenticate(conn: ConnectRequest) -> Accept:
        token = conn.query.get("token") or conn.cookies.get("session")
        user = TOKENS.get(token or "")
        if user is None:
            raise Reject(401, "missing or unknown token\n", headers=[("WWW-Authenticate", 'Bearer realm="ws"')])
        return Accept(user=user, state={"role": "admin" if user == "alice" else "user"},
                      headers=[("Set-Cookie", f"seen={user}; HttpOnly; Secure; SameSite=Strict")])

    app = App(on_connect=authenticate)
    app.route("/me")(WhoAmI)

    async def slow_hook(conn: ConnectRequest) -> None:
        await asyncio.Event().wait()

    async def async_hook(conn: ConnectRequest) -> Accept | Reject:
        await asyncio.sleep(0)
        if conn.headers.get("authorization") != "Bearer letmein":
            return Reject(403, "forbidden\n")
        return Accept(user="async-user", subprotocol="v2" if "v2" in conn.subprotocols else None)

    def raising_hook(conn: ConnectRequest) -> None:
        raise RuntimeError("bug in the hook: secret details")

    def redirect_hook(conn: ConnectRequest) -> Reject:
        return Reject(302, "", headers=[("Location", "/login")])

    def bad_subprotocol(conn: ConnectRequest) -> Accept:
        return Accept(subprotocol="never-offered")

    def same_origin_only(conn: ConnectRequest) -> bool:
        return conn.origin == "https://app.example"  # False: 403

    app.route("/slow", on_connect=slow_hook)(WhoAmI)
    app.route("/async", on_connect=async_hook)(WhoAmI)
    app.route("/raises", on_connect=raising_hook)(WhoAmI)
    app.route("/redirect", on_connect=redirect_hook)(WhoAmI)
    app.route("/bad-subprotocol", on_connect=bad_subprotocol)(WhoAmI)
    app.route("/origin", on_connect=same_origin_only)(WhoAmI)

    @app.http("/login")
    def login(request: Any) -> Response:
        return Response("logged in\n", headers=[("Set-Cookie", "session=secret-bob; Path=/; SameSite=Strict")])

    return app


async def test_websockets_client_sees_status_headers_and_body_of_a_rejection(start_server) -> None:
    server, port = await start_server(token_app())
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(f"ws://127.0.0.1:{port}/me")
    response = info.value.response
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="ws"'
    assert response.body == b"missing or unknown token\n"
    assert server.stats["handshake_failures"] == 1
    await wait_no_connections(server)


async def test_aiohttp_client_sees_the_rejection_status_and_headers(start_server) -> None:
    _, port = await start_server(token_app())
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(f"ws://127.0.0.1:{port}/me?token=wrong")
        assert info.value.status == 401
        assert info.value.headers["WWW-Authenticate"] == 'Bearer realm="ws"'
        # the same request as plain HTTP shows the body aiohttp's exception leaves out
        async with http.get(f"http://127.0.0.1:{port}/me?token=wrong", headers={
                "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as resp:
            assert resp.status == 401 and await resp.text() == "missing or unknown token\n"


async def test_accepted_with_set_cookie_user_and_state(start_server) -> None:
    server, port = await start_server(token_app())
    async with websockets.connect(f"ws://127.0.0.1:{port}/me?token=secret-alice") as ws:
        assert ws.response.headers["Set-Cookie"] == "seen=alice; HttpOnly; Secure; SameSite=Strict"
        await ws.send("hi")
        assert await ws.recv() == "alice:admin:hi"
        # the hub knows the user too: send_to_user reaches this connection
        await wait_for(lambda: server.hub.send_to_user("alice", "pushed") == 1)
        assert await ws.recv() == "pushed"
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"ws://127.0.0.1:{port}/me", headers={"Cookie": "a=1; session=secret-bob"}) as ws:
            await ws.send_str("yo")
            assert (await ws.receive_str()) == "bob:user:yo"
    await wait_no_connections(server)
    assert server.hub.user_sessions("alice") == []


async def test_async_hook_chooses_the_subprotocol(start_server) -> None:
    _, port = await start_server(token_app())
    async with websockets.connect(f"ws://127.0.0.1:{port}/async", subprotocols=["v1", "v2"],
                                  additional_headers={"Authorization": "Bearer letmein"}) as ws:
        assert ws.subprotocol == "v2"
        await ws.send("x")
        assert await ws.recv() == "async-user:None:x"
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(f"ws://127.0.0.1:{port}/async")
    assert info.value.response.status_code == 403 and info.value.response.body == b"forbidden\n"


async def test_route_hook_replaces_the_app_hook(start_server) -> None:
    _, port = await start_server(token_app())
    # /origin has its own hook: no token needed there, but the Origin must match
    async with websockets.connect(f"ws://127.0.0.1:{port}/origin", origin="https://app.example") as ws:
        await ws.send("o")
        assert await ws.recv() == "None:None:o"


async def test_cross_site_origin_is_refused(start_server) -> None:
    _, port = await start_server(token_app())
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(f"ws://127.0.0.1:{port}/origin", origin="https://evil.example")
    assert info.value.response.status_code == 403


async def test_hook_that_raises_is_a_500_and_a_log_line(start_server, caplog) -> None:
    server, port = await start_server(token_app())
    with caplog.at_level(logging.ERROR, logger="fastws"):
        resp = await http_exchange(port, upgrade_request("/raises")[0])
    assert resp.status == 500 and resp.body == b"internal server error\n"
    assert b"secret details" not in resp.raw and b"Traceback" not in resp.raw
    assert any("connect hook for /raises" in r.getMessage() and r.exc_info for r in caplog.records)
    await wait_no_connections(server)


async def test_hook_that_never_answers_gets_503_within_handshake_timeout(start_server) -> None:
    server, port = await start_server(token_app(), handshake_timeout=0.5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    resp = await http_exchange(port, upgrade_request("/slow")[0])
    assert resp.status == 503 and b"in time" in resp.body
    assert loop.time() - started < 3
    await wait_for(lambda: server.pending_handshakes == 0)


async def test_redirect_and_unusable_answers(start_server) -> None:
    _, port = await start_server(token_app())
    resp = await http_exchange(port, upgrade_request("/redirect")[0])
    assert resp.status == 302 and resp.header("location") == "/login"
    resp = await http_exchange(port, upgrade_request("/bad-subprotocol")[0])
    assert resp.status == 500


async def test_frames_sent_right_behind_the_upgrade_wait_for_an_async_hook(start_server) -> None:
    _, port = await start_server(token_app())
    first = build_frame(1, b"first") + build_frame(1, b"second")
    async with await RawWS.connect(port, "/async", extra=[("Authorization", "Bearer letmein")], first=first) as ws:
        assert (await ws.recv_message())[1] == b"async-user:None:first"
        assert (await ws.recv_message())[1] == b"async-user:None:second"


async def test_max_connections_per_ip(start_server) -> None:
    server, port = await start_server(token_app(), max_connections_per_ip=2)
    url = f"ws://127.0.0.1:{port}/me?token=secret-bob"
    first, second = await websockets.connect(url), await websockets.connect(url)
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(url)
    assert info.value.response.status_code == 429 and b"127.0.0.1" in info.value.response.body
    await first.close()
    await wait_for(lambda: server.session_count == 1)
    third = await websockets.connect(url)  # a slot is free again
    # refused upgrades hold no slot
    for _ in range(3):
        with pytest.raises(websockets.InvalidStatus):
            await websockets.connect(f"ws://127.0.0.1:{port}/me")
    await second.close()
    await third.close()
    await wait_no_connections(server)
    fourth = await websockets.connect(url)
    await fourth.close()
