"""The HTTP phase over real sockets: plain routes (async handlers, bad return values, bad headers,
methods, HEAD), the cap on connections still in the handshake, shutdown of that phase, and who
the client is behind trusted proxies (X-Forwarded-For, RFC 7239 Forwarded, X-Real-IP)."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import pytest
import websockets

from fastws import App, Config, Endpoint, Response
from fastws.handshake import Headers
from fastws.http import client_address, forwarded_hops, parse_address
from wsraw import RawWS, http_exchange, wait_for, wait_no_connections

pytestmark = pytest.mark.timeout(30)


def routes_app() -> App:
    app = App()

    @app.http("/sync")
    def sync(request: object) -> str:
        return "<b>not html unless you say so</b>"

    @app.http("/async")
    async def async_route(request: object) -> dict:
        await asyncio.sleep(0)
        return {"async": True}

    @app.http("/slow")
    async def slow(request: object) -> str:
        await asyncio.Event().wait()
        return "never"

    @app.http("/bytes")
    def raw_bytes(request: object) -> bytes:
        return b"\x00\x01"

    @app.http("/html")
    def html(request: object) -> Response:
        return Response("<p>hi</p>", content_type="text/html; charset=utf-8")

    @app.http("/number")
    def number(request: object) -> int:
        return 42

    @app.http("/crlf")
    def crlf(request: object) -> Response:
        return Response("x", headers=[("X-Evil", "a\r\nSet-Cookie: pwned=1")])

    @app.http("/raises")
    def raises(request: object) -> str:
        raise RuntimeError("handler bug")

    @app.http("/bad-status")
    def bad_status(request: object) -> Response:
        return Response("x", status=1234)

    class Echo(Endpoint):
        def on_message(self, message: str | bytes) -> None:
            self.session.send(message)

    app.route("/echo")(Echo)
    return app


def get(path: str, method: str = "GET") -> bytes:
    """One request on its own connection (keep-alive has tests of its own: tests/test_keepalive_http.py)."""
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


async def test_sync_str_is_text_plain_whatever_it_starts_with(start_server) -> None:
    _, port = await start_server(routes_app())
    resp = await http_exchange(port, get("/sync"))
    assert resp.status == 200 and resp.header("content-type") == "text/plain; charset=utf-8"
    assert resp.body == b"<b>not html unless you say so</b>"
    html = await http_exchange(port, get("/html"))
    assert html.header("content-type") == "text/html; charset=utf-8"
    raw = await http_exchange(port, get("/bytes"))
    assert raw.header("content-type") == "application/octet-stream" and raw.body == b"\x00\x01"


async def test_async_http_handler(start_server) -> None:
    _, port = await start_server(routes_app())
    resp = await http_exchange(port, get("/async"))
    assert resp.status == 200 and json.loads(resp.body) == {"async": True}
    assert resp.header("content-type") == "application/json"


async def test_async_handler_that_never_answers_gets_503(start_server) -> None:
    server, port = await start_server(routes_app(), handshake_timeout=0.3)
    resp = await http_exchange(port, get("/slow"))
    assert resp.status == 503 and b"no answer" in resp.body
    await wait_for(lambda: server.pending_handshakes == 0)


@pytest.mark.parametrize("path", ["/number", "/crlf", "/raises", "/bad-status"])
async def test_broken_handlers_give_500_and_a_log_line(start_server, caplog, path: str) -> None:
    server, port = await start_server(routes_app())
    with caplog.at_level(logging.ERROR, logger="fastws"):
        resp = await http_exchange(port, get(path))
    assert resp.status == 500 and resp.body == b"internal server error\n"
    assert b"pwned" not in resp.raw
    assert any(path in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    await wait_for(lambda: server.pending_handshakes == 0)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_other_methods_get_405_with_allow(start_server, method: str) -> None:
    _, port = await start_server(routes_app())
    resp = await http_exchange(port, get("/sync", method))
    assert resp.status == 405 and resp.header("allow") == "GET, HEAD"
    assert method.encode() in resp.body


async def test_head_is_answered_without_a_body(start_server) -> None:
    _, port = await start_server(routes_app())
    full = await http_exchange(port, get("/async"))
    head = await http_exchange(port, get("/async", "HEAD"), head_request=True)
    assert head.status == 200 and head.body == b""
    assert head.header("content-length") == full.header("content-length") == str(len(full.body))


async def test_connections_in_the_http_phase_are_capped(start_server) -> None:
    server, port = await start_server(routes_app(), max_pending_handshakes=5, handshake_timeout=5)
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]  # slowloris: say nothing
    await wait_for(lambda: server.pending_handshakes == 5)
    resp = await http_exchange(port, get("/sync"))
    assert resp.status == 503 and resp.header("retry-after") and b"HTTP phase" in resp.body
    assert server.stats["pending_handshakes_refused"] == 1
    for _, writer in idle:
        writer.close()
    await wait_for(lambda: server.pending_handshakes == 0)
    assert (await http_exchange(port, get("/sync"))).status == 200  # room again


async def test_shutdown_answers_connections_still_in_the_http_phase(start_server) -> None:
    server, port = await start_server(routes_app())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /sync HTTP/1.1\r\nHost: x\r\n")  # an unfinished head
    await wait_for(lambda: server.pending_handshakes == 1)
    ws = await RawWS.connect(port, "/echo")
    shutdown = asyncio.ensure_future(server.shutdown(timeout=2))
    response = await asyncio.wait_for(reader.read(), 5)
    assert response.startswith(b"HTTP/1.1 503") and b"shutting down" in response
    assert (await ws.expect_close())[0] == 1001
    await ws.send_close(1001)
    await ws.wait_eof()
    await asyncio.wait_for(shutdown, 5)
    assert server.pending_handshakes == 0
    writer.close()


async def test_websocket_routes_still_upgrade(start_server) -> None:
    server, port = await start_server(routes_app())
    async with await RawWS.connect(port, "/echo") as ws:
        await ws.send_frame(0x1, b"hi")
        assert await ws.recv_message() == (0x1, b"hi")
    await wait_no_connections(server)


# -- who is the client ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("203.0.113.7", "203.0.113.7"),
    (" 203.0.113.7:5678 ", "203.0.113.7"),
    ("[2001:db8::1]:443", "2001:db8::1"),
    ("2001:db8::1", "2001:db8::1"),
    ('"[2001:db8:cafe::17]:4711"', "2001:db8:cafe::17"),
    ("unknown", None),
    ("_hidden", None),
    ("1.2.3", None),
    ("<script>", None),
    ("", None),
])
def test_parse_address(text: str, expected: str | None) -> None:
    assert parse_address(text) == expected


def test_forwarded_header_is_preferred_and_parsed() -> None:
    headers = Headers([("Forwarded", 'for=192.0.2.60;proto=http;by=203.0.113.43, For="[2001:db8:cafe::17]:4711"'),
                       ("X-Forwarded-For", "198.51.100.1")])
    assert forwarded_hops(headers) == ["192.0.2.60", "2001:db8:cafe::17"]
    assert forwarded_hops(Headers([("X-Forwarded-For", "junk, 198.51.100.1:80, unknown"),
                                   ("X-Forwarded-For", "10.0.0.2")])) == ["198.51.100.1", "10.0.0.2"]


def test_client_address_rules() -> None:
    trusted = Config(trusted_proxies=["127.0.0.1", "10.0.0.0/8"])

    def who(peer: str, *fields: tuple[str, str], config: Config = trusted) -> str:
        return client_address(peer, Headers(list(fields)), config)

    # an untrusted peer is the client, whatever it claims
    assert who("198.51.100.9", ("X-Forwarded-For", "1.2.3.4"), ("X-Real-IP", "5.6.7.8")) == "198.51.100.9"
    # the rightmost hop that is not a trusted proxy; forged hops to its left are ignored
    assert who("127.0.0.1", ("X-Forwarded-For", "6.6.6.6, 203.0.113.7, 10.1.2.3")) == "203.0.113.7"
    assert who("127.0.0.1", ("X-Forwarded-For", "203.0.113.7:61000, junk")) == "203.0.113.7"
    assert who("127.0.0.1", ("Forwarded", "for=203.0.113.9"), ("X-Forwarded-For", "6.6.6.6")) == "203.0.113.9"
    # X-Real-IP counts only from a trusted proxy, only if it is an address
    assert who("127.0.0.1", ("X-Real-IP", "203.0.113.8")) == "203.0.113.8"
    assert who("127.0.0.1", ("X-Real-IP", "not an address")) == "127.0.0.1"
    # every hop trusted: the first one is the client
    assert who("127.0.0.1", ("X-Forwarded-For", "10.0.0.1, 10.0.0.2")) == "10.0.0.1"
    assert who("127.0.0.1") == "127.0.0.1"


async def test_forwarded_header_over_a_socket(start_server) -> None:
    app = App()

    class Info(Endpoint):
        def on_open(self) -> None:
            self.session.send(self.session.remote)

    app.route("/info")(Info)
    _, port = await start_server(app, trusted_proxies=["127.0.0.1"])
    extra = [("Forwarded", 'for="[2001:db8::7]:1234";proto=https')]
    async with await RawWS.connect(port, "/info", extra=extra) as ws:
        assert await ws.recv_message() == (0x1, b"2001:db8::7")


@pytest.mark.parametrize(("path", "says"), [
    ("chat", "must start with '/'"),
    ("/room/{", "a parameter is {name}"),  # a brace no request path can hold: a route that never matches
    ("/room/{a-b}", "a parameter is {name}"),
    ("/room/{1x}", "a parameter is {name}"),  # not an identifier: no regex group can have that name
    ("/room/{id}/{id}", "names a parameter twice"),
])
def test_a_route_that_could_never_match_is_refused_by_name(path: str, says: str) -> None:
    async def handler(ws):  # type: ignore[no-untyped-def]
        pass

    with pytest.raises(ValueError, match=re.escape(says)):
        App().route(path)(handler)


def test_a_sync_function_as_a_websocket_handler_is_refused_with_what_to_write() -> None:
    def handler(ws):  # type: ignore[no-untyped-def]
        pass

    with pytest.raises(TypeError, match=r"a handler is `async def handler\(ws\)`"):
        App().route("/ws")(handler)


async def test_route_parameters_reach_the_handler(start_server) -> None:
    app = App()

    @app.route("/room/{room}/{user_id}")
    async def handler(ws):  # type: ignore[no-untyped-def]
        await ws.send(f"{ws.params['room']}:{ws.params['user_id']}")

    server, port = await start_server(app)
    async with websockets.connect(f"ws://127.0.0.1:{port}/room/lobby/42") as ws:
        assert await ws.recv() == "lobby:42"
