"""The bundled client (fastws.client) against the fastws demo app and small test apps."""

from __future__ import annotations

import asyncio
import socket

import pytest

from fastws import App, ConnectionClosed, Endpoint, HandshakeError
from fastws.client import READY, ClientConnection, connect, parse_url
from wsraw import wait_for


async def test_echo_text_and_binary(start_server, demo_app):
    _, port = await start_server(demo_app)
    async with connect(f"ws://127.0.0.1:{port}/echo") as ws:
        assert isinstance(ws, ClientConnection)
        assert not ws.closed and ws.close_code is None
        await ws.send("héllo ✓")
        assert await ws.recv() == "héllo ✓"
        big = bytes(range(256)) * 800  # 200 KiB: several reads, 64-bit length header
        await ws.send(big)
        assert await ws.recv() == big
        await ws.send(bytearray(b"ba"))
        await ws.send(memoryview(b"mv"))
        assert [await ws.recv(), await ws.recv()] == [b"ba", b"mv"]
        await ws.send(b"")
        assert await ws.recv() == b""
    assert ws.closed


async def test_send_is_awaitable_and_ready_when_not_blocked(start_server, demo_app):
    _, port = await start_server(demo_app)
    async with connect(f"ws://127.0.0.1:{port}/echo") as ws:
        assert ws.send("x") is READY
        await ws.send("y")
        assert [await ws.recv(), await ws.recv()] == ["x", "y"]


async def test_many_messages_in_flight_keep_order(start_server, demo_app):
    _, port = await start_server(demo_app)
    async with connect(f"ws://127.0.0.1:{port}/echo") as ws:
        for i in range(500):
            ws.send(f"m{i}")
        assert [await ws.recv() for _ in range(500)] == [f"m{i}" for i in range(500)]


async def test_async_for_ends_when_the_server_closes_normally(start_server):
    app = App()

    @app.route("/three")
    async def three(ws):  # type: ignore[no-untyped-def]
        for i in range(3):
            await ws.send(f"n{i}")

    _, port = await start_server(app)
    async with connect(f"ws://127.0.0.1:{port}/three") as ws:
        got = [m async for m in ws]
        assert got == ["n0", "n1", "n2"]
    assert ws.close_code == 1000
    with pytest.raises(ConnectionClosed):
        await ws.recv()
    with pytest.raises(ConnectionClosed):
        ws.send("late")


async def test_server_close_code_and_reason_reach_the_client(start_server, demo_app):
    _, port = await start_server(demo_app)
    async with connect(f"ws://127.0.0.1:{port}/chat") as ws:
        assert "joined" in await ws.recv()
        await ws.send(b"binary is refused by the chat")
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await ws.recv()
        assert info.value.code == 1003
    assert ws.close_code == 1003
    assert ws.close_reason == "the chat takes text messages only"


async def test_async_for_raises_on_an_error_close(start_server):
    app = App()

    class Refuse(Endpoint):
        def on_message(self, message):  # type: ignore[no-untyped-def]
            self.session.close(4001, "go away")

    app.route("/refuse")(Refuse)
    _, port = await start_server(app)
    async with connect(f"ws://127.0.0.1:{port}/refuse") as ws:
        await ws.send("hi")
        with pytest.raises(ConnectionClosed) as info:
            async for _ in ws:
                pass
    assert info.value.code == 4001 and info.value.reason == "go away"


async def test_client_close_handshake_ends_the_connection(start_server, demo_app):
    server, port = await start_server(demo_app)
    ws = await connect(f"ws://127.0.0.1:{port}/echo", close_timeout=2.0)
    await ws.send("x")
    assert await ws.recv() == "x"
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await ws.close(1000, "done")
    assert loop.time() - t0 < 1.5  # the server ended TCP; the close timeout did not have to
    assert ws.closed
    assert ws.close_code == 1000  # the server echoed our close frame
    await wait_for(lambda: not server.hub.sessions)


async def test_close_timeout_drops_a_silent_server():
    """A server that never answers the close frame: the client gives up after close_timeout."""
    from fastws.handshake import HeadParser, accept

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = HeadParser()
        request = None
        while request is None:
            request = parser.feed(await reader.read(4096))
        writer.write(accept(request).response)
        await reader.read()  # read everything, answer nothing
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        ws = await connect(f"ws://127.0.0.1:{port}/", close_timeout=0.2)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await ws.close()
        assert 0.1 < loop.time() - t0 < 2.0
        # no close frame came back: the code is the one we sent, and the close was not clean
        assert ws.close_code == 1000 and ws.sent_close == (1000, "")
        assert not ws.closed_cleanly and ws.closed_by == "local"
    finally:
        srv.close()


async def test_ping_resolves_with_the_round_trip_time(start_server, demo_app):
    _, port = await start_server(demo_app)
    async with connect(f"ws://127.0.0.1:{port}/echo") as ws:
        pong_waiter = await ws.ping()  # python-websockets' shape: the ping is sent, here is its pong's future
        rtt = await pong_waiter
        assert 0 < rtt < 1
        first, second = await ws.ping(b"a"), await ws.ping(b"b")
        await asyncio.wait_for(asyncio.gather(first, second), 2)
        with pytest.raises(ValueError):
            ws.ping(b"c"), ws.ping(b"c")
        await (await ws.ping(b""))  # an empty ping after the pending one answers both


async def test_client_answers_server_pings(start_server, demo_app):
    server, port = await start_server(demo_app, ping_interval=0.1, ping_timeout=0.3)
    async with connect(f"ws://127.0.0.1:{port}/echo") as ws:
        await wait_for(lambda: ws.pings_received >= 4)  # idle: the server pings, the client pongs
        await ws.send("still here")
        assert await ws.recv() == "still here"
    assert server.stats["keepalive_timeouts"] == 0


async def test_compression_negotiated_and_used(start_server, demo_app):
    _, port = await start_server(demo_app, compression=True)
    async with connect(f"ws://127.0.0.1:{port}/echo", compression=True) as ws:
        assert ws.deflate is not None
        text = "compress me please " * 500
        await ws.send(text)
        assert await ws.recv() == text
        data = bytes(50_000)
        await ws.send(data)
        assert await ws.recv() == data
        await ws.send("short")  # under the threshold: sent uncompressed
        assert await ws.recv() == "short"


async def test_compression_not_offered_or_not_accepted(start_server, demo_app):
    _, port = await start_server(demo_app, compression=False)
    async with connect(f"ws://127.0.0.1:{port}/echo", compression=True) as ws:
        assert ws.deflate is None  # server declined: plain frames
        await ws.send("x" * 1000)
        assert await ws.recv() == "x" * 1000
    _, port2 = await start_server(_echo_app(), compression=True)
    async with connect(f"ws://127.0.0.1:{port2}/echo") as ws:
        assert ws.deflate is None


def _echo_app() -> App:
    from fastws.demo import create_app

    return create_app()


async def test_subprotocol_negotiation(start_server):
    _, port = await start_server(_echo_app(), subprotocols=["chat.v1", "chat.v0"])
    async with connect(f"ws://127.0.0.1:{port}/echo", subprotocols=["chat.v2", "chat.v1"]) as ws:
        assert ws.subprotocol == "chat.v1"
    async with connect(f"ws://127.0.0.1:{port}/echo", subprotocols=["other"]) as ws:
        assert ws.subprotocol is None


async def test_refused_upgrade_raises_handshake_error_with_status(start_server, demo_app):
    _, port = await start_server(demo_app, max_connections=1)
    with pytest.raises(HandshakeError) as info:
        await connect(f"ws://127.0.0.1:{port}/no-such-path")
    assert info.value.status == 404
    async with connect(f"ws://127.0.0.1:{port}/echo"):
        with pytest.raises(HandshakeError) as info:
            await connect(f"ws://127.0.0.1:{port}/echo")
        assert info.value.status == 503


async def test_connection_refused_and_open_timeout():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(ConnectionRefusedError):
            await connect(f"ws://127.0.0.1:{port}/")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await connect(f"ws://127.0.0.1:{port}/", open_timeout=0.2)
        assert loop.time() - t0 < 2
    finally:
        srv.close()


async def test_message_over_the_clients_limit_fails_with_1009(start_server, demo_app):
    _, port = await start_server(demo_app)
    async with connect(f"ws://127.0.0.1:{port}/echo", max_message_size=1000) as ws:
        await ws.send(b"x" * 2000)
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
        assert info.value.code == 1009


async def test_callback_mode_and_local_address(start_server, demo_app):
    server, port = await start_server(demo_app)
    got: list[object] = []
    done = asyncio.get_running_loop().create_future()

    def on_message(message: object) -> None:
        got.append(message)
        if len(got) == 100 and not done.done():
            done.set_result(None)

    ws = await connect(f"ws://127.0.0.1:{port}/echo", on_message=on_message, local_addr=("127.0.0.7", 0))
    try:
        assert ws.local_address[0] == "127.0.0.7"
        session = next(iter(server.hub.sessions.values()))
        assert session.remote == "127.0.0.7"
        for i in range(100):
            ws.send(i.to_bytes(2, "big"))
        await asyncio.wait_for(done, 5)
        assert got == [i.to_bytes(2, "big") for i in range(100)]
        assert ws.messages_received == 100
        # The wire core can echo by itself: the reader hands each message to the writer's C send.
        ws.set_on_message(ws.writer.send)
        ws.send(b"ping-pong")
        await wait_for(lambda: ws.messages_received > 110)
        ws.set_on_message(None)  # back to the queue
    finally:
        await ws.close()


async def test_frames_right_behind_the_101_are_not_lost():
    """A server may send frames in the same segment as its 101 response."""
    from fastws._frame import encode_frame
    from fastws.handshake import HeadParser, accept

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = HeadParser()
        request = None
        while request is None:
            request = parser.feed(await reader.read(4096))
        writer.write(accept(request).response + encode_frame(1, "early") + encode_frame(2, b"bird"))
        await reader.read()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        ws = await connect(f"ws://127.0.0.1:{port}/", close_timeout=0.2)
        assert [await ws.recv(), await ws.recv()] == ["early", b"bird"]
        ws.abort()
    finally:
        srv.close()


def test_works_on_the_plain_asyncio_loop():
    from fastws import Config, Server
    from fastws.demo import create_app

    async def main() -> list[object]:
        server = Server(create_app(), Config())
        (_, port), *_ = await server.listen("127.0.0.1", 0)
        try:
            async with connect(f"ws://127.0.0.1:{port}/echo") as ws:
                await ws.send("plain")
                await ws.send(b"asyncio")
                return [await ws.recv(), await ws.recv()]
        finally:
            await server.shutdown(timeout=1.0)

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(main()) == ["plain", b"asyncio"]
    finally:
        loop.close()


def test_parse_url():
    u = parse_url("ws://example.com/chat?room=1")
    assert (u.secure, u.host, u.port, u.resource, u.host_header) == (
        False,
        "example.com",
        80,
        "/chat?room=1",
        "example.com",
    )
    u = parse_url("wss://example.com:8443")
    assert (u.secure, u.port, u.resource, u.host_header) == (True, 8443, "/", "example.com:8443")
    u = parse_url("ws://[::1]:9000/x")
    assert (u.host, u.host_header) == ("::1", "[::1]:9000")
    for bad in ("http://example.com/", "ws:///nohost", "ws://user:pw@host/", "ws://host:99999/"):
        with pytest.raises(ValueError):
            parse_url(bad)


async def test_close_handshake_against_websockets_server():
    """Against an independent server the closing handshake completes with the echoed code."""
    from websockets.asyncio.server import serve

    async def echo(ws):  # type: ignore[no-untyped-def]
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/", compression=True) as ws:
            assert ws.deflate is not None  # websockets accepts permessage-deflate by default
            await ws.send("interop " * 100)
            assert await ws.recv() == "interop " * 100
        assert ws.close_code == 1000


async def test_wss_with_a_custom_ssl_context(tmp_path):
    import shutil
    import ssl
    import subprocess

    from websockets.asyncio.server import serve

    if not shutil.which("openssl"):
        pytest.skip("openssl command not available")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)

    async def echo(ws):  # type: ignore[no-untyped-def]
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0, ssl=server_ctx) as server:
        port = server.sockets[0].getsockname()[1]
        client_ctx = ssl.create_default_context(cafile=str(cert))
        async with connect(f"wss://localhost:{port}/", ssl=client_ctx) as ws:
            await ws.send(b"s" * 100_000)
            assert await ws.recv() == b"s" * 100_000
        assert ws.close_code == 1000
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(f"wss://localhost:{port}/")  # the default context does not trust it
    with pytest.raises(ValueError):
        await connect("ws://localhost:1/", ssl=client_ctx)
