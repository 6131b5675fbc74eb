"""The opening handshake over real sockets (RFC 6455 section 4, RFC 7230): every refusal is an
HTTP error with a useful reason, and the server closes the connection without leaking it."""

from __future__ import annotations

import asyncio
import base64
import json
from http import HTTPStatus

import pytest

from fastws import App, Endpoint
from fastws._frame import accept_key
from wsraw import OP_TEXT, RawWS, http_exchange, wait_for, wait_no_connections

pytestmark = pytest.mark.timeout(30)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
KEY_15 = base64.b64encode(b"x" * 15).decode()
KEY_17 = base64.b64encode(b"x" * 17).decode()
BASE = [
    ("Host", "127.0.0.1"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", KEY),
    ("Sec-WebSocket-Version", "13"),
]


def head(*, method: str = "GET", target: str = "/echo", version: str = "HTTP/1.1",
         drop: tuple[str, ...] = (), add: tuple[tuple[str, str], ...] = (), body: bytes = b"") -> bytes:
    dropped = {d.lower() for d in drop}
    fields = [(n, v) for n, v in BASE if n.lower() not in dropped] + list(add)
    lines = [f"{method} {target} {version}"] + [f"{n}: {v}" for n, v in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def info_app() -> App:
    """/echo echoes; /info sends the session's remote address and subprotocol first."""
    app = App()

    class Echo(Endpoint):
        def on_message(self, message: str | bytes) -> None:
            self.session.send(message)

    class Info(Endpoint):
        def on_open(self) -> None:
            self.session.send(json.dumps({"remote": self.session.remote,
                                          "subprotocol": self.session.subprotocol}))

    app.route("/echo")(Echo)
    app.route("/info")(Info)
    return app


async def refused(server, port: int, request: bytes | list[bytes], status: int, *words: str,  # type: ignore[no-untyped-def]
                  delay: float = 0.0, sessions: int = 0):
    """Send ``request``; expect ``status`` with a reason mentioning ``words``,
    then a closed and forgotten connection."""
    resp = await http_exchange(port, request, delay=delay)
    assert resp.status == status, resp.raw[:400]
    assert resp.reason_phrase == HTTPStatus(status).phrase, resp.raw[:200]
    text = resp.body.decode("utf-8")
    assert text.strip(), "a refusal must say why"
    for word in words:
        assert word.lower() in text.lower(), f"{word!r} not in reason {text!r}"
    assert resp.closed, "the server must close the connection after refusing the upgrade"
    assert (resp.header("connection") or "").lower() == "close"
    await wait_for(lambda: server.pending_handshakes == 0 and len(server.hub.sessions) == sessions)
    return resp


# -- section 4.2.1: what the client's request must contain ------------------------------------------

REFUSALS = [
    pytest.param(head(drop=("Sec-WebSocket-Key",)), 400, ["Sec-WebSocket-Key"], id="missing-key"),
    pytest.param(head(drop=("Sec-WebSocket-Key",), add=(("Sec-WebSocket-Key", "not base64 at all!!"),)),
                 400, ["base64"], id="key-not-base64"),
    pytest.param(head(drop=("Sec-WebSocket-Key",), add=(("Sec-WebSocket-Key", KEY_15),)),
                 400, ["16 bytes"], id="key-15-bytes"),
    pytest.param(head(drop=("Sec-WebSocket-Key",), add=(("Sec-WebSocket-Key", KEY_17),)),
                 400, ["16 bytes"], id="key-17-bytes"),
    pytest.param(head(add=(("Sec-WebSocket-Key", "AQIDBAUGBwgJCgsMDQ4PEA=="),)), 400, ["Sec-WebSocket-Key"],
                 id="two-keys"),
    pytest.param(head(drop=("Sec-WebSocket-Version",), add=(("Sec-WebSocket-Version", "8"),)), 426, ["13"],
                 id="version-8"),
    pytest.param(head(drop=("Sec-WebSocket-Version",), add=(("Sec-WebSocket-Version", "14"),)), 426, ["13"],
                 id="version-14"),
    pytest.param(head(drop=("Sec-WebSocket-Version",)), 426, ["Sec-WebSocket-Version"], id="missing-version"),
    pytest.param(head(method="POST"), 405, ["GET"], id="post"),
    pytest.param(head(method="PUT"), 405, ["GET"], id="put"),
    pytest.param(head(version="HTTP/1.0"), 400, ["HTTP/1.1"], id="http-1.0"),
    pytest.param(head(drop=("Host",)), 400, ["Host"], id="missing-host"),
    pytest.param(head(add=(("Host", "other.example"),)), 400, ["Host"], id="two-hosts"),
    pytest.param(head(drop=("Connection",)), 400, ["Connection"], id="missing-connection"),
    pytest.param(head(drop=("Connection",), add=(("Connection", "keep-alive"),)), 400, ["Connection"],
                 id="connection-keep-alive"),
    pytest.param(head(drop=("Upgrade",), add=(("Upgrade", "h2c"),)), 426, ["websocket"], id="upgrade-h2c"),
    pytest.param(head(add=(("Content-Length", "5"),), body=b"hello"), 400, ["body"], id="body-smuggling"),
    pytest.param(head(add=(("Transfer-Encoding", "chunked"),)), 400, [], id="chunked-upgrade"),
]


@pytest.mark.parametrize(("request_bytes", "status", "words"), REFUSALS)
async def test_refused_upgrade(start_server, request_bytes: bytes, status: int, words: list[str]) -> None:
    server, port = await start_server(info_app())
    resp = await refused(server, port, request_bytes, status, *words)
    assert server.stats["handshake_failures"] == 1
    if status == 426:
        # 4.4: tell the client what to speak instead
        assert resp.header("sec-websocket-version") == "13" or resp.header("upgrade") == "websocket"
    if status == 405:
        assert resp.header("allow") == "GET"
    assert resp.header("sec-websocket-accept") is None


@pytest.mark.parametrize("version", ["8", "7, 8", "13, 8"])
async def test_wrong_version_lists_supported_version(start_server, version: str) -> None:
    """4.4: a version the server does not speak -> 426 and Sec-WebSocket-Version: 13."""
    server, port = await start_server(info_app())
    req = head(drop=("Sec-WebSocket-Version",), add=(("Sec-WebSocket-Version", version),))
    resp = await refused(server, port, req, 426, "version")
    assert resp.header("sec-websocket-version") == "13"


async def test_missing_version_lists_supported_version(start_server) -> None:
    server, port = await start_server(info_app())
    resp = await refused(server, port, head(drop=("Sec-WebSocket-Version",)), 426, "version")
    assert resp.header("sec-websocket-version") == "13"


async def test_hixie_76_is_refused_with_426(start_server) -> None:
    server, port = await start_server(info_app())
    req = (b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n"
           b"Origin: http://127.0.0.1\r\nSec-WebSocket-Key1: 4 @1  46546xW%0l 1 5\r\n"
           b"Sec-WebSocket-Key2: 12998 5 Y3 1  .P00\r\n\r\n^n:ds[4U")
    resp = await refused(server, port, req, 426, "hixie")
    assert resp.header("sec-websocket-version") == "13"


async def test_plain_get_to_websocket_route_is_426(start_server) -> None:
    server, port = await start_server(info_app())
    req = b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/html\r\n\r\n"
    resp = await refused(server, port, req, 426, "websocket")
    assert resp.header("upgrade") == "websocket"


async def test_unknown_path_is_404(start_server) -> None:
    server, port = await start_server(info_app())
    await refused(server, port, head(target="/nowhere"), 404, "/nowhere")
    await refused(server, port, b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404, "/nowhere")


async def test_healthz_is_json(start_server) -> None:
    server, port = await start_server(info_app())
    async with await RawWS.connect(port, "/echo"):
        await wait_for(lambda: len(server.hub.sessions) == 1)
        resp = await http_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert resp.status == 200
        assert resp.header("content-type", ).startswith("application/json")
        doc = json.loads(resp.body)
        assert doc["status"] == "ok" and doc["connections"] == 1
        assert resp.closed
    await wait_no_connections(server)


async def test_healthz_over_http_1_0(start_server) -> None:
    server, port = await start_server(info_app())
    resp = await http_exchange(port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert resp.status == 200 and json.loads(resp.body)["status"] == "ok"
    assert resp.closed
    await wait_no_connections(server)


# -- limits and malformed input ----------------------------------------------------------------------


async def test_oversized_head_is_431(start_server) -> None:
    server, port = await start_server(info_app(), max_head_size=4096)
    await refused(server, port, head(add=(("X-Big", "a" * 5000),)), 431, "4096")


async def test_oversized_head_without_end_is_431(start_server) -> None:
    """A head that never ends but keeps growing is cut off at the limit, not buffered forever."""
    server, port = await start_server(info_app(), max_head_size=4096)
    fields = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 200) for i in range(40))
    req = b"GET /echo HTTP/1.1\r\nHost: x\r\n" + fields
    await refused(server, port, req, 431, "larger")


async def test_too_many_headers_is_431(start_server) -> None:
    server, port = await start_server(info_app(), max_headers=20)
    await refused(server, port, head(add=tuple((f"X-H{i}", "v") for i in range(30))), 431, "header")


@pytest.mark.parametrize("garbage", [
    b"\x00\x01\x02\x03garbage\r\n\r\n",
    b"HELLO\r\n\r\n",
    b"GET /echo HTTP/1.1\nHost: x\n\n",  # bare LF
    b"GET /echo HTTP/1.1\r\nHost x\r\n\r\n",  # no colon
    b"GET /echo HTTP/1.1\r\nHo st: x\r\n\r\n",  # space in a name
    b"GET /echo HTTP/1.1\r\n Folded: x\r\n\r\n",
])
async def test_garbage_is_400(start_server, garbage: bytes) -> None:
    server, port = await start_server(info_app())
    await refused(server, port, garbage, 400, "malformed")


async def test_http_0_9_request_line(start_server) -> None:
    server, port = await start_server(info_app())
    resp = await http_exchange(port, b"GET /echo\r\n\r\n")
    assert resp.status in (400, 505) and resp.body.strip() and resp.closed
    await wait_no_connections(server)


async def test_tls_client_hello_on_plain_port(start_server) -> None:
    server, port = await start_server(info_app())
    hello = bytes.fromhex("16030100a5010000a10303") + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00" + bytes(60)
    await refused(server, port, hello, 400, "TLS")


async def test_http2_preface(start_server) -> None:
    server, port = await start_server(info_app())
    resp = await http_exchange(port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert resp.status in (400, 505) and resp.body.strip() and resp.closed
    await wait_no_connections(server)


async def test_slowloris_gets_408(start_server) -> None:
    """A head trickling in one line at a time: the deadline is for the whole head, not per byte."""
    server, port = await start_server(info_app(), handshake_timeout=0.5)
    pieces = [b"GET /echo HTTP/1.1\r\n"] + [b"X-Slow-%d: zzz\r\n" % i for i in range(20)]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await refused(server, port, pieces, 408, "0.5", delay=0.1)
    assert loop.time() - t0 < 2.5


async def test_silent_connection_gets_408(start_server) -> None:
    server, port = await start_server(info_app(), handshake_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await wait_for(lambda: server.pending_handshakes == 1)
        data = await asyncio.wait_for(reader.read(), 3)  # until EOF
        assert data.startswith(b"HTTP/1.1 408 "), data
    finally:
        writer.transport.abort()
    await wait_no_connections(server)


async def test_client_gone_during_handshake_leaves_nothing(start_server) -> None:
    server, port = await start_server(info_app())
    writers = []
    for _ in range(20):
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        writers.append(w)
    await wait_for(lambda: server.pending_handshakes == 20)
    for w in writers:
        w.transport.abort()
    await wait_no_connections(server)


async def test_head_in_one_byte_pieces_is_accepted(start_server) -> None:
    server, port = await start_server(info_app())
    req = head()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i in range(len(req)):
            writer.write(req[i:i + 1])
            await writer.drain()
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert response.startswith(b"HTTP/1.1 101 ")
        assert f"Sec-WebSocket-Accept: {accept_key(KEY)}".encode() in response
    finally:
        writer.transport.abort()
    await wait_no_connections(server)


async def test_successful_handshake_response(start_server) -> None:
    server, port = await start_server(info_app())
    resp = await http_exchange(port, head(add=(("Connection", "keep-alive, Upgrade"),)))
    # 4.2.2: 101, Upgrade: websocket, Connection: Upgrade, the right accept key
    assert resp.status == 101 and not resp.closed
    assert resp.header("upgrade").lower() == "websocket"
    assert resp.header("connection").lower() == "upgrade"
    assert resp.header("sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert resp.header("sec-websocket-protocol") is None
    assert resp.header("sec-websocket-extensions") is None
    await wait_no_connections(server)


@pytest.mark.parametrize("fields", [
    (("Upgrade", "WebSocket"),),
    (("Connection", "keep-alive, upgrade"),),
])
async def test_header_values_are_case_insensitive(start_server, fields: tuple[tuple[str, str], ...]) -> None:
    server, port = await start_server(info_app())
    req = head(drop=tuple(n for n, _ in fields), add=fields)
    resp = await http_exchange(port, req)
    assert resp.status == 101, resp.raw
    await wait_no_connections(server)


# -- policy: origins, subprotocols, connection limit, proxies -------------------------------------------


@pytest.mark.parametrize(("origin", "status"), [
    ("https://good.example", 101),
    ("HTTPS://GOOD.EXAMPLE", 101),
    ("https://evil.example", 403),
    ("https://good.example.evil.example", 403),
    ("null", 403),
    (None, 403),
])
async def test_origin_allow_list(start_server, origin: str | None, status: int) -> None:
    server, port = await start_server(info_app(), allowed_origins=["https://good.example"])
    req = head(add=(("Origin", origin),) if origin else ())
    if status == 101:
        resp = await http_exchange(port, req)
        assert resp.status == 101
    else:
        await refused(server, port, req, 403, "origin")
    await wait_no_connections(server)


async def test_any_origin_by_default(start_server) -> None:
    server, port = await start_server(info_app())
    resp = await http_exchange(port, head(add=(("Origin", "https://anything.example"),)))
    assert resp.status == 101
    await wait_no_connections(server)


@pytest.mark.parametrize(("offered", "expected"), [
    ("chat.v1, chat.v2", "chat.v2"),  # the server's preference wins
    ("chat.v1", "chat.v1"),
    ("other, chat.v1", "chat.v1"),
    ("other", None),
    (None, None),
])
async def test_subprotocol_negotiation(start_server, offered: str | None, expected: str | None) -> None:
    server, port = await start_server(info_app(), subprotocols=["chat.v2", "chat.v1"])
    extra = [("Sec-WebSocket-Protocol", offered)] if offered else []
    async with await RawWS.connect(port, "/info", extra=extra) as ws:
        assert ws.response.header("sec-websocket-protocol") == expected
        op, data = await ws.recv_message()
        assert json.loads(data)["subprotocol"] == expected


async def test_subprotocol_offer_over_several_header_lines(start_server) -> None:
    server, port = await start_server(info_app(), subprotocols=["b"])
    extra = [("Sec-WebSocket-Protocol", "a"), ("Sec-WebSocket-Protocol", "b")]
    async with await RawWS.connect(port, "/info", extra=extra) as ws:
        assert ws.response.header("sec-websocket-protocol") == "b"


async def test_max_connections_503(start_server) -> None:
    server, port = await start_server(info_app(), max_connections=2)
    a = await RawWS.connect(port, "/echo")
    b = await RawWS.connect(port, "/echo")
    await wait_for(lambda: len(server.hub.sessions) == 2)
    resp = await refused(server, port, head(), 503, "limit", sessions=2)
    assert resp.header("retry-after")
    assert len(server.hub.sessions) == 2
    # plain HTTP routes still answer when the server is full
    health = await http_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert health.status == 200
    # room again once one leaves
    await a.send_close(1000)
    a.abort()
    await wait_for(lambda: len(server.hub.sessions) == 1)
    async with await RawWS.connect(port, "/echo") as c:
        await c.send_frame(OP_TEXT, b"in")
        assert await c.recv_message() == (OP_TEXT, b"in")
    b.abort()
    await wait_no_connections(server)


async def remote_seen(port: int, xff: list[str] | None = None, real_ip: str | None = None) -> str:
    extra = [("X-Forwarded-For", v) for v in (xff or [])]
    if real_ip:
        extra.append(("X-Real-IP", real_ip))
    async with await RawWS.connect(port, "/info", extra=extra) as ws:
        _, data = await ws.recv_message()
        return json.loads(data)["remote"]


async def test_x_forwarded_for_ignored_from_untrusted_peer(start_server) -> None:
    _, port = await start_server(info_app())
    assert await remote_seen(port) == "127.0.0.1"
    assert await remote_seen(port, ["203.0.113.7"]) == "127.0.0.1"
    assert await remote_seen(port, real_ip="203.0.113.7") == "127.0.0.1"


async def test_x_forwarded_for_ignored_when_other_proxy_trusted(start_server) -> None:
    _, port = await start_server(info_app(), trusted_proxies=["10.0.0.0/8"])
    assert await remote_seen(port, ["203.0.113.7"]) == "127.0.0.1"


async def test_x_forwarded_for_from_trusted_proxy(start_server) -> None:
    _, port = await start_server(info_app(), trusted_proxies=["127.0.0.1/32", "10.0.0.0/8"])
    assert await remote_seen(port, ["203.0.113.7"]) == "203.0.113.7"
    # the rightmost address not ours is the client; spoofed entries to its left are ignored
    assert await remote_seen(port, ["1.1.1.1, 203.0.113.7, 10.1.2.3"]) == "203.0.113.7"
    assert await remote_seen(port, ["1.1.1.1", "203.0.113.7, 10.1.2.3"]) == "203.0.113.7"
    assert await remote_seen(port) == "127.0.0.1"
