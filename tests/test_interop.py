"""Interop with WebSocket clients nobody here wrote: websockets, aiohttp and wsproto.

Each test runs against a live fastws server on loopback; the two asyncio
clients share one small adapter so every scenario runs with both.
"""

from __future__ import annotations

import asyncio
import os
import random
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import websockets
import wsproto
import wsproto.events as wse
from websockets.asyncio.client import connect as ws_connect
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from compat import deadline
from fastws import App, Endpoint
from wsraw import wait_for, wait_no_connections

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
CLIENTS = ["websockets", "aiohttp"]


# -- client adapter --------------------------------------------------------------------------


class Closed(Exception):
    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class Client:
    """send / recv / ping / close over either library."""

    kind: str
    subprotocol: str | None
    extensions: str | None

    @staticmethod
    async def open(kind: str, port: int, path: str = "/echo", *, subprotocols: list[str] | None = None,
                   deflate: Any = None, max_size: int | None = None) -> Client:
        """``deflate``: None (no offer), True (the library's default offer) or a websockets factory."""
        url = f"ws://127.0.0.1:{port}{path}"
        if kind == "websockets":
            extensions = None
            compression = None
            if deflate is True:
                compression = "deflate"
            elif deflate is not None:
                extensions = [deflate]
            ws = await ws_connect(url, subprotocols=subprotocols, compression=compression,
                                  extensions=extensions,
                                  max_size=max_size, ping_interval=None, close_timeout=2, open_timeout=5)
            return WebsocketsClient(ws)
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(
                url, protocols=subprotocols or (), compress=(15 if deflate is True else deflate or 0),
                max_msg_size=max_size or 0, autoping=False, autoclose=True,
                timeout=aiohttp.ClientWSTimeout(ws_receive=10, ws_close=2))
        except BaseException:
            await session.close()
            raise
        return AiohttpClient(session, ws)


class WebsocketsClient(Client):
    kind = "websockets"

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.subprotocol = ws.subprotocol
        self.extensions = ws.response.headers.get("Sec-WebSocket-Extensions")

    async def send(self, message: str | bytes) -> None:
        await self.ws.send(message)

    async def recv(self, timeout: float = 10) -> str | bytes:
        try:
            return await asyncio.wait_for(self.ws.recv(), timeout)
        except websockets.ConnectionClosed as exc:
            raise Closed(exc.rcvd.code if exc.rcvd else None, exc.rcvd.reason if exc.rcvd else "") from None

    async def ping(self, payload: bytes) -> None:
        waiter = await self.ws.ping(payload)
        await asyncio.wait_for(waiter, 5)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code, reason)

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    @property
    def close_reason(self) -> str | None:
        return self.ws.close_reason

    async def dispose(self) -> None:
        self.ws.transport.abort()


class AiohttpClient(Client):
    kind = "aiohttp"

    def __init__(self, session: aiohttp.ClientSession, ws: Any) -> None:
        self.session = session
        self.ws = ws
        self.subprotocol = ws.protocol
        self.extensions = ws._response.headers.get("Sec-WebSocket-Extensions")
        self._pongs: asyncio.Queue[bytes] = asyncio.Queue()
        self._close_reason: str | None = None

    async def send(self, message: str | bytes) -> None:
        if isinstance(message, str):
            await self.ws.send_str(message)
        else:
            await self.ws.send_bytes(message)

    async def recv(self, timeout: float = 10) -> str | bytes:
        while True:
            msg = await self.ws.receive(timeout)
            if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                return msg.data
            if msg.type == aiohttp.WSMsgType.PONG:
                self._pongs.put_nowait(msg.data)
                continue
            if msg.type == aiohttp.WSMsgType.PING:
                await self.ws.pong(msg.data)
                continue
            if msg.type == aiohttp.WSMsgType.CLOSE:
                self._close_reason = msg.extra
                raise Closed(msg.data, msg.extra or "")
            raise Closed(self.ws.close_code, f"{msg.type!r} {msg.data!r}")

    async def ping(self, payload: bytes) -> None:
        await self.ws.ping(payload)
        msg = await self.ws.receive(5)
        assert msg.type == aiohttp.WSMsgType.PONG, msg
        assert msg.data == payload

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code=code, message=reason.encode())

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    @property
    def close_reason(self) -> str | None:
        return self._close_reason

    async def dispose(self) -> None:
        await self.ws.close()
        await self.session.close()


@pytest.fixture
async def clients():  # type: ignore[no-untyped-def]
    """``await clients(kind, port, ...)`` opens a client that is disposed of after the test."""
    opened: list[Client] = []

    async def open_client(kind: str, port: int, path: str = "/echo", **kw: Any) -> Client:
        client = await Client.open(kind, port, path, **kw)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        try:
            await asyncio.wait_for(client.dispose(), 3)
        except Exception:
            pass


# -- apps ------------------------------------------------------------------------------------


def interop_app() -> tuple[App, SimpleNamespace]:
    app = App()
    log = SimpleNamespace(closes=[], order=[])

    class Echo(Endpoint):
        def on_message(self, message: str | bytes) -> None:
            if isinstance(message, str) and message.startswith("close:"):
                _, code, reason = message.split(":", 2)
                self.session.close(int(code), reason)
                return
            self.session.send(message)

        def on_close(self, code: int, reason: str) -> None:
            log.closes.append((code, reason))

    class AsyncEcho(Endpoint):
        async def on_message(self, message: str | bytes) -> None:
            await asyncio.sleep(random.random() * 0.002)
            log.order.append(message)
            await self.session.send(message)

    class Room(Endpoint):
        def on_open(self) -> None:
            self.hub.join(self.session, "room")

        def on_message(self, message: str | bytes) -> None:
            self.hub.publish("room", message)

    app.route("/echo")(Echo)
    app.route("/async")(AsyncEcho)
    app.route("/room")(Room)

    @app.route("/handler")
    async def handler(ws):  # type: ignore[no-untyped-def]
        async for message in ws:
            await ws.send(message)

    return app, log


# -- data ------------------------------------------------------------------------------------


def payload(opcode: str, size: int) -> str | bytes:
    if opcode == "text":
        unit = "fastws ünïcödé €𝄞 "
        text = unit * (size // len(unit.encode()) + 1)
        data = text.encode()[:size].decode("utf-8", "ignore")
        return data
    return (bytes(range(256)) * (size // 256 + 1))[:size]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, MiB])
@pytest.mark.parametrize("opcode", ["text", "binary"])
@pytest.mark.parametrize("kind", CLIENTS)
async def test_echo_sizes(start_server, clients, kind: str, opcode: str, size: int) -> None:
    app, _ = interop_app()
    _, port = await start_server(app, max_message_size=2 * MiB)
    client = await clients(kind, port)
    message = payload(opcode, size)
    await client.send(message)
    echoed = await client.recv()
    assert type(echoed) is type(message) and echoed == message


@pytest.mark.parametrize("kind", CLIENTS)
async def test_echo_16_mib(start_server, clients, kind: str) -> None:
    app, _ = interop_app()
    _, port = await start_server(app, max_message_size=16 * MiB)
    client = await clients(kind, port)
    binary = os.urandom(16 * MiB)
    await client.send(binary)
    assert await client.recv(20) == binary
    text = payload("text", 16 * MiB)
    await client.send(text)
    assert await client.recv(20) == text


@pytest.mark.parametrize("kind", CLIENTS)
async def test_message_over_limit_is_1009(start_server, clients, kind: str) -> None:
    app, log = interop_app()
    server, port = await start_server(app, max_message_size=1000)
    client = await clients(kind, port)
    await client.send(b"x" * 1001)
    with pytest.raises(Closed) as info:
        await client.recv()
    assert info.value.code == 1009
    await wait_no_connections(server)
    assert log.closes[0][0] == 1009


@pytest.mark.parametrize("path", ["/echo", "/handler", "/async"])
@pytest.mark.parametrize("kind", CLIENTS)
async def test_many_messages_in_order(start_server, clients, kind: str, path: str) -> None:
    app, log = interop_app()
    _, port = await start_server(app)
    client = await clients(kind, port, path)
    n = 300
    messages = [f"msg {i}" if i % 3 else f"{i}".encode() * (i % 50) for i in range(n)]

    async def sender() -> None:
        for m in messages:
            await client.send(m)

    task = asyncio.ensure_future(sender())
    got = [await client.recv() for _ in range(n)]
    await task
    assert got == messages
    if path == "/async":
        assert log.order == messages  # async on_message calls ran one at a time, in order


@pytest.mark.parametrize("kind", CLIENTS)
async def test_ping_pong(start_server, clients, kind: str) -> None:
    app, _ = interop_app()
    _, port = await start_server(app)
    client = await clients(kind, port)
    for data in (b"", b"ping!", bytes(range(125))):
        await client.ping(data)
    await client.send("still works")
    assert await client.recv() == "still works"


@pytest.mark.parametrize("code", [1000, 3000, 4999])
@pytest.mark.parametrize("kind", CLIENTS)
async def test_client_initiated_close(start_server, clients, kind: str, code: int) -> None:
    app, log = interop_app()
    server, port = await start_server(app)
    client = await clients(kind, port)
    await client.send("hi")
    assert await client.recv() == "hi"
    await client.close(code, "client says bye")
    await wait_no_connections(server)
    assert log.closes == [(code, "client says bye")]
    assert client.close_code == code  # the server echoed our close frame (RFC 6455 5.5.1)


@pytest.mark.parametrize("code", [1000, 1001, 1008, 4000, 4999])
@pytest.mark.parametrize("kind", CLIENTS)
async def test_server_initiated_close(start_server, clients, kind: str, code: int) -> None:
    app, log = interop_app()
    server, port = await start_server(app)
    client = await clients(kind, port)
    await client.send(f"close:{code}:server says bye")
    with pytest.raises(Closed) as info:
        await client.recv()
    assert (info.value.code, info.value.reason) == (code, "server says bye")
    await wait_no_connections(server)
    await wait_for(lambda: len(log.closes) == 1)
    assert log.closes[0][0] == code
    assert client.close_code == code


@pytest.mark.parametrize(("offered", "expected"), [(["b", "a"], "a"), (["b"], "b"), (["zzz"], None)])
@pytest.mark.parametrize("kind", CLIENTS)
async def test_subprotocols(start_server, clients, kind: str, offered: list[str],
                            expected: str | None) -> None:
    app, _ = interop_app()
    _, port = await start_server(app, subprotocols=["a", "b"])
    client = await clients(kind, port, subprotocols=offered)
    assert client.subprotocol == expected
    await client.send("x")
    assert await client.recv() == "x"


# -- permessage-deflate --------------------------------------------------------------------------

DEFLATE_MESSAGES = [
    ("compressible text", "the quick brown fox jumps over the lazy dog. " * 2000),
    ("compressible binary", b"\x00\x01\x02\x03" * 50_000),
    ("incompressible", os.urandom(200_000)),
    ("small", "tiny"),
    ("empty", b""),
    ("1 MiB compressible", "abcdefgh" * (MiB // 8)),
]


async def deflate_round_trip(client: Client, server: Any) -> None:
    ext = client.extensions
    assert ext is not None and ext.startswith("permessage-deflate"), ext
    session = next(iter(server.hub.sessions.values()))
    assert session.deflate is not None
    for _name, message in DEFLATE_MESSAGES:
        for _ in range(2):  # twice: the second one exercises any context kept across messages
            await client.send(message)
            echoed = await client.recv()
            assert echoed == message, _name


@pytest.mark.parametrize("server_nct", [True, False], ids=["server-nct", "server-takeover"])
@pytest.mark.parametrize("offer", ["default", "no-context-takeover", "window-bits-10"])
async def test_deflate_websockets(start_server, clients, server_nct: bool, offer: str) -> None:
    app, _ = interop_app()
    server, port = await start_server(app, compression=True, compression_no_context_takeover=server_nct,
                                      max_message_size=2 * MiB)
    factory = {
        "default": ClientPerMessageDeflateFactory(),
        "no-context-takeover": ClientPerMessageDeflateFactory(server_no_context_takeover=True,
                                                              client_no_context_takeover=True),
        "window-bits-10": ClientPerMessageDeflateFactory(server_max_window_bits=10,
                                                         client_max_window_bits=10),
    }[offer]
    client = await clients("websockets", port, deflate=factory, max_size=2 * MiB)
    ext = client.extensions or ""
    if server_nct or offer == "no-context-takeover":
        assert "server_no_context_takeover" in ext and "client_no_context_takeover" in ext
    if offer == "window-bits-10":
        assert "server_max_window_bits=10" in ext
    await wait_for(lambda: len(server.hub.sessions) == 1)
    await deflate_round_trip(client, server)


@pytest.mark.parametrize("server_nct", [True, False], ids=["server-nct", "server-takeover"])
@pytest.mark.parametrize("wbits", [15, 10])
async def test_deflate_aiohttp(start_server, clients, server_nct: bool, wbits: int) -> None:
    app, _ = interop_app()
    server, port = await start_server(app, compression=True, compression_no_context_takeover=server_nct,
                                      max_message_size=2 * MiB)
    client = await clients("aiohttp", port, deflate=wbits, max_size=2 * MiB)
    await wait_for(lambda: len(server.hub.sessions) == 1)
    await deflate_round_trip(client, server)


@pytest.mark.parametrize("kind", CLIENTS)
async def test_deflate_declined_when_server_has_it_off(start_server, clients, kind: str) -> None:
    app, _ = interop_app()
    server, port = await start_server(app)
    client = await clients(kind, port, deflate=True)
    assert client.extensions is None
    await client.send("x" * 1000)
    assert await client.recv() == "x" * 1000


@pytest.mark.parametrize("kind", CLIENTS)
async def test_deflate_broadcast_to_mixed_sessions(start_server, clients, kind: str) -> None:
    """Room publish to plain, no-context-takeover and context-takeover sessions at once."""
    app, _ = interop_app()
    server, port = await start_server(app, compression=True, compression_no_context_takeover=False)
    members = [
        await clients(kind, port, "/room"),
        await clients(kind, port, "/room", deflate=True),
        await clients("websockets", port, "/room", deflate=ClientPerMessageDeflateFactory(
            server_no_context_takeover=True, client_no_context_takeover=True)),
    ]
    await wait_for(lambda: len(server.hub.members("room")) == 3)
    messages = ["hello room " * 50, b"\x00" * 5000, "short", os.urandom(3000), "hello room " * 50]
    for m in messages:
        await members[0].send(m)
    for member in members:
        assert [await member.recv() for _ in messages] == messages


# -- hub ----------------------------------------------------------------------------------------


async def test_room_publish_reaches_everyone_once_in_order(start_server, clients) -> None:
    app, _ = interop_app()
    server, port = await start_server(app)
    members = [await clients(CLIENTS[i % 2], port, "/room") for i in range(6)]
    await wait_for(lambda: len(server.hub.members("room")) == 6)
    per_sender = 25

    async def send_all(i: int, c: Client) -> None:
        for j in range(per_sender):
            await c.send(f"{i}:{j}")

    total = per_sender * len(members)
    received: list[list[str | bytes]] = [[] for _ in members]

    async def receive_all(i: int, c: Client) -> None:
        for _ in range(total):
            received[i].append(await c.recv())

    await asyncio.gather(*(send_all(i, c) for i, c in enumerate(members)),
                         *(receive_all(i, c) for i, c in enumerate(members)))
    expected = {f"{i}:{j}" for i in range(len(members)) for j in range(per_sender)}
    for got in received:
        assert len(got) == total and set(got) == expected  # every message exactly once
        for i in range(len(members)):  # each sender's messages in the order sent
            assert [m for m in got if m.startswith(f"{i}:")] == [f"{i}:{j}" for j in range(per_sender)]
        assert got == received[0]  # and every member saw the same global order
    # nothing extra arrives
    for c in members:
        with pytest.raises(asyncio.TimeoutError):
            await c.recv(0.05)


async def test_hub_broadcast_from_server(start_server, clients) -> None:
    app, _ = interop_app()
    server, port = await start_server(app)
    members = [await clients(CLIENTS[i % 2], port, "/echo") for i in range(4)]
    await wait_for(lambda: len(server.hub.sessions) == 4)
    for i in range(10):
        assert app.hub.broadcast(f"news {i}") == 4
    app.hub.broadcast(b"\x01\x02")
    for c in members:
        assert [await c.recv() for _ in range(11)] == [f"news {i}" for i in range(10)] + [b"\x01\x02"]


async def test_room_members_leave_on_disconnect(start_server, clients) -> None:
    app, _ = interop_app()
    server, port = await start_server(app)
    a = await clients("websockets", port, "/room")
    b = await clients("aiohttp", port, "/room")
    await wait_for(lambda: len(server.hub.members("room")) == 2)
    await b.close()
    await wait_for(lambda: len(server.hub.members("room")) == 1)
    await a.send("alone")
    assert await a.recv() == "alone"


# -- wsproto over a plain socket --------------------------------------------------------------------


async def test_wsproto_client(start_server) -> None:
    app, log = interop_app()
    server, port = await start_server(app)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    events: list[Any] = []

    async def pump(until: type, timeout: float = 5) -> Any:
        async with deadline(timeout):
            while True:
                for ev in conn.events():
                    events.append(ev)
                    if isinstance(ev, until):
                        return ev
                data = await reader.read(65536)
                conn.receive_data(data or None)
                if not data:
                    for ev in conn.events():
                        events.append(ev)
                        if isinstance(ev, until):
                            return ev
                    raise AssertionError(f"EOF while waiting for {until.__name__}; events: {events[-3:]}")

    try:
        writer.write(conn.send(wse.Request(host="127.0.0.1", target="/echo")))
        await pump(wse.AcceptConnection)
        writer.write(conn.send(wse.TextMessage(data="héllo wsproto")))
        assert (await pump(wse.TextMessage)).data == "héllo wsproto"
        writer.write(conn.send(wse.BytesMessage(data=b"\x00\xff" * 40000)))
        chunks = []
        while True:
            ev = await pump(wse.BytesMessage)
            chunks.append(ev.data)
            if ev.message_finished:
                break
        assert b"".join(chunks) == b"\x00\xff" * 40000
        writer.write(conn.send(wse.Ping(payload=b"wsproto-ping")))
        assert (await pump(wse.Pong)).payload == b"wsproto-ping"
        writer.write(conn.send(wse.CloseConnection(code=1000, reason="wsproto done")))
        ev = await pump(wse.CloseConnection)
        assert ev.code == 1000
        assert await asyncio.wait_for(reader.read(), 3) == b""  # server closed TCP
    finally:
        writer.transport.abort()
    await wait_no_connections(server)
    assert log.closes == [(1000, "wsproto done")]


async def test_websockets_sync_client_in_thread(start_server) -> None:
    """The blocking websockets client (a different code path) in a worker thread."""
    from websockets.sync.client import connect as sync_connect

    app, _ = interop_app()
    _, port = await start_server(app)

    def run() -> list[str | bytes]:
        with sync_connect(f"ws://127.0.0.1:{port}/handler", close_timeout=2) as ws:
            out = []
            for m in ("one", b"two", "three" * 1000):
                ws.send(m)
                out.append(ws.recv(timeout=5))
            return out

    assert await asyncio.to_thread(run) == ["one", b"two", "three" * 1000]

