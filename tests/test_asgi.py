"""fastws as uvicorn's WebSocket protocol: real FastAPI and Starlette apps on a real uvicorn.

Every server here is ``python -m uvicorn ... --ws fastws.asgi:FastWSProtocol``
in a subprocess (tests/test_asgi_apps.py has the apps); the clients are the
websockets and aiohttp libraries and, where a test needs bytes nobody would
send, the raw-socket client of tests/wsraw.py.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import signal
import ssl
import struct
import sys
import zlib
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from test_asgi_apps import PROTOCOL, MiB, ServerProcess, free_port, uvicorn
from wsraw import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RawWS, build_frame, http_exchange, upgrade_request

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """The FastAPI app with uvicorn's defaults (permessage-deflate on, 16 MiB messages, queue of 32)."""
    proc = uvicorn()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def starlette_server() -> Iterator[ServerProcess]:
    proc = uvicorn("test_asgi_apps:starlette_app")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def plain_server() -> Iterator[ServerProcess]:
    """No permessage-deflate, 1 MiB messages."""
    proc = uvicorn("test_asgi_apps:fastapi_app", "--ws-per-message-deflate", "false", "--ws-max-size", str(MiB))
    yield proc
    proc.stop()


async def events(server: ServerProcess, key: str, count: int = 1) -> list[dict[str, Any]]:
    """What the app recorded under ``key`` (waits server-side until ``count`` are there)."""
    async with aiohttp.ClientSession() as http, http.get(server.url(f"/events/{key}?count={count}", "http"),
                                                         timeout=aiohttp.ClientTimeout(total=30)) as reply:
        result: list[dict[str, Any]] = await reply.json()
        assert len(result) >= count, f"the app recorded {result} under {key!r}, expected {count}"
        return result


def key(request: pytest.FixtureRequest) -> str:
    """A key the app records under: unique per test (and per process, for reruns)."""
    return f"{os.getpid()}-{request.node.name}".replace("[", "-").replace("]", "")


# -- echo: sizes, types, fragments, compression ----------------------------------------------------------

SIZES = [0, 1, 125, 126, 65535, 65536, MiB]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("compression", ["deflate", None])
async def test_fastapi_echo_binary_and_text(server: ServerProcess, size: int, compression: str | None) -> None:
    data = os.urandom(size // 2) + bytes(size - size // 2)  # half noise, half compressible
    text = ("héllo ✓ " * (size // 10 + 1))[:size]
    async with connect(server.url("/echo"), compression=compression, max_size=None) as ws:
        assert ("permessage-deflate" in ws.response.headers.get("Sec-WebSocket-Extensions", "")) == bool(compression)
        await ws.send(data)
        got = await ws.recv()
        assert isinstance(got, bytes) and got == data
        await ws.send(text)
        got = await ws.recv()
        assert isinstance(got, str) and got == text


async def test_sixteen_mebibytes_is_the_default_limit(server: ServerProcess) -> None:
    """uvicorn's ws_max_size (16 MiB) exactly is echoed; one byte more is refused with 1009."""
    data = bytes(range(256)) * (16 * MiB // 256)
    async with connect(server.url("/echo"), compression=None, max_size=None) as ws:
        await ws.send(data)
        assert await ws.recv() == data
    async with connect(server.url("/echo"), compression=None, max_size=None) as ws:
        await ws.send(data + b"!")
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1009


async def test_fragmented_messages_are_reassembled(server: ServerProcess) -> None:
    async with connect(server.url("/echo"), compression=None) as ws:
        await ws.send(["frag", "mented ", "text ✓"])
        assert await ws.recv() == "fragmented text ✓"
        await ws.send([b"\x00\x01", b"", b"\x02" * 70000])
        assert await ws.recv() == b"\x00\x01" + b"\x02" * 70000


async def test_fragments_with_a_ping_between_them(server: ServerProcess) -> None:
    """RFC 6455 5.4: control frames may come between the fragments of a message."""
    async with await RawWS.connect(server.port, "/echo") as ws:
        await ws.send_raw(build_frame(OP_TEXT, b"one ", fin=False) + build_frame(OP_PING, b"mid")
                          + build_frame(0, b"two ", fin=False) + build_frame(0, b"three"))
        pong = await ws.recv_frame()
        assert (pong.opcode, pong.payload) == (OP_PONG, b"mid")
        assert await ws.recv_message() == (OP_TEXT, b"one two three")
        await ws.send_close(1000)
        assert (await ws.expect_close())[0] == 1000


async def test_ping_is_answered(server: ServerProcess) -> None:
    async with connect(server.url("/echo")) as ws:
        latency = await asyncio.wait_for(await ws.ping(b"are you there"), 5)
        assert latency >= 0


async def test_compressed_frames_on_the_wire(server: ServerProcess) -> None:
    """A compressible message comes back with RSV1 set, smaller, inflating to the message."""
    async with await RawWS.connect(server.port, "/echo",
                                   extra=[("Sec-WebSocket-Extensions", "permessage-deflate")]) as ws:
        assert "permessage-deflate" in ws.response.header("sec-websocket-extensions")
        message = b"compress me " * 1000
        await ws.send_frame(OP_BINARY, message)
        frame = await ws.recv_frame()
        assert frame.rsv == 4 and len(frame.payload) < len(message) // 10
        assert zlib.decompressobj(-15).decompress(frame.payload + b"\x00\x00\xff\xff") == message


async def test_compression_off(plain_server: ServerProcess) -> None:
    """--ws-per-message-deflate false: an offer is declined, messages still flow."""
    async with connect(plain_server.url("/echo"), compression="deflate") as ws:
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        await ws.send("x" * 1000)
        assert await ws.recv() == "x" * 1000


async def test_ws_max_size_is_honoured(plain_server: ServerProcess) -> None:
    """--ws-max-size 1 MiB: 1 MiB passes, 1 MiB + 1 is refused with 1009 as soon as its header is read."""
    async with connect(plain_server.url("/echo"), max_size=None) as ws:
        await ws.send(bytes(MiB))
        assert len(await ws.recv()) == MiB
    async with await RawWS.connect(plain_server.port, "/echo") as ws:
        await ws.send_raw(build_frame(OP_BINARY, b"", length=MiB + 1))  # the payload never comes
        code, _ = await ws.expect_close()
        assert code == 1009


# -- the handshake: subprotocols, headers, scope, denial -----------------------------------------------


async def test_subprotocol_chosen_by_the_app(server: ServerProcess) -> None:
    async with connect(server.url("/subprotocol"), subprotocols=["chat.v1", "chat.v2"]) as ws:
        assert ws.subprotocol == "chat.v2"
        assert json.loads(await ws.recv()) == {"offered": ["chat.v1", "chat.v2"], "chosen": "chat.v2"}
    async with connect(server.url("/subprotocol")) as ws:
        assert ws.subprotocol is None


async def test_a_subprotocol_the_client_did_not_offer_is_not_sent(server: ServerProcess) -> None:
    async with connect(server.url("/subprotocol?force=bogus"), subprotocols=["chat.v1"]) as ws:
        assert ws.subprotocol is None
        assert json.loads(await ws.recv())["chosen"] == "bogus"


async def test_accept_headers_and_default_headers(server: ServerProcess) -> None:
    async with connect(server.url("/scope")) as ws:
        headers = ws.response.headers
        assert headers["x-fastws"] == "yes"
        assert headers.get_all("set-cookie") == ["a=1", "b=2"]
        assert headers["server"] == "uvicorn"  # uvicorn's default headers: server, date
        assert "date" in headers


async def test_scope(server: ServerProcess) -> None:
    async with connect(server.url("/scope?a=1&b=%20"), subprotocols=["x", "y"],
                       additional_headers={"X-Custom": "Value"}) as ws:
        scope = json.loads(await ws.recv())
    assert scope["type"] == "websocket"
    assert scope["spec_version"] == "2.5"
    assert scope["http_version"] == "1.1"
    assert scope["scheme"] == "ws"
    assert scope["path"] == "/scope" and scope["raw_path"] == "/scope" and scope["root_path"] == ""
    assert scope["query_string"] == "a=1&b=%20"
    assert ["x-custom", "Value"] in scope["headers"]
    assert scope["subprotocols"] == ["x", "y"]
    assert scope["server"] == ["127.0.0.1", server.port] and scope["client"][0] == "127.0.0.1"
    assert scope["extensions"] == ["fastws.hub", "websocket.http.response"]


async def test_denial_response(server: ServerProcess) -> None:
    """Starlette's send_denial_response (the websocket.http.response extension)."""
    with pytest.raises(InvalidStatus) as refused:
        async with connect(server.url("/deny")):
            pass
    response = refused.value.response
    assert response.status_code == 401
    assert response.body == b"go away"
    assert response.headers["x-reason"] == "token expired"
    request, _ = upgrade_request("/deny")
    raw = await http_exchange(server.port, request)
    assert raw.status == 401 and raw.body == b"go away" and raw.closed
    assert raw.raw.lower().count(b"content-length:") == 1
    assert raw.header("connection") == "close" and raw.header("server") == "uvicorn"


async def test_close_before_accept_is_403(server: ServerProcess) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(server.url("/forbid")):
            pass
    assert refused.value.response.status_code == 403


async def test_app_error_before_accept_is_500(server: ServerProcess) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(server.url("/error-before-accept")):
            pass
    assert refused.value.response.status_code == 500


async def test_bad_upgrade_request_is_refused_without_the_app(server: ServerProcess) -> None:
    request, _ = upgrade_request("/echo", key="not base64!")
    response = await http_exchange(server.port, request)
    assert response.status == 400 and response.closed
    request = request.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8")
    response = await http_exchange(server.port, request)
    assert response.status == 426 and response.header("sec-websocket-version") == "13"


# -- closing: codes and reasons, both ways ------------------------------------------------------------------


async def test_app_error_after_accept_is_1011(server: ServerProcess) -> None:
    async with connect(server.url("/error-after-accept")) as ws:
        await ws.send("boom")
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 1011


async def test_app_returning_without_closing_is_1000(server: ServerProcess) -> None:
    async with connect(server.url("/return")) as ws:
        assert await ws.recv() == "bye"
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 1000


@pytest.mark.parametrize(("code", "reason"), [(1000, ""), (1001, "going away"), (4321, "custom ✓ reason"),
                                              (3000, "r" * 123)])
async def test_app_closes_with_code_and_reason(server: ServerProcess, code: int, reason: str) -> None:
    async with connect(server.url("/close")) as ws:
        await ws.send(f"{code} {reason}")
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert (ws.close_code, ws.close_reason) == (code, reason)


async def test_client_close_code_and_reason_reach_the_app(server: ServerProcess, request: pytest.FixtureRequest
                                                          ) -> None:
    k = key(request)
    async with connect(server.url(f"/echo?id={k}")) as ws:
        await ws.close(4002, "client says bye")
    assert await events(server, k) == [{"code": 4002, "reason": "client says bye"}]


async def test_close_without_a_code_is_1005(server: ServerProcess, request: pytest.FixtureRequest) -> None:
    k = key(request)
    async with await RawWS.connect(server.port, f"/echo?id={k}") as ws:
        await ws.send_close(None)
        code, _ = await ws.expect_close()
        assert code is None  # the echo of an empty close frame is empty
        await ws.wait_eof()
    assert await events(server, k) == [{"code": 1005, "reason": ""}]


async def test_dropped_tcp_is_1006(server: ServerProcess, request: pytest.FixtureRequest) -> None:
    k = key(request)
    ws = await RawWS.connect(server.port, f"/echo?id={k}")
    ws.abort()
    assert await events(server, k) == [{"code": 1006, "reason": ""}]


async def test_send_after_close_raises_an_oserror(server: ServerProcess, request: pytest.FixtureRequest) -> None:
    k = key(request)
    async with connect(server.url(f"/raw/?id={k}")) as ws:
        await ws.send("hi")
        assert await ws.recv() == "hi"
    assert await events(server, k, 2) == [{"exception": "ClientDisconnected", "oserror": True},
                                          {"again": "websocket.disconnect"}]


# -- bad input gets its RFC close code ------------------------------------------------------------------------

BAD_INPUT = [
    pytest.param(build_frame(OP_TEXT, b"\xc3\x28"), 1007, id="invalid-utf8"),
    pytest.param(build_frame(OP_TEXT, b"ok ", fin=False) + build_frame(0, b"\xed\xa0\x80"), 1007,
                 id="invalid-utf8-in-a-fragment"),
    pytest.param(build_frame(OP_TEXT, b"hi", mask=False), 1002, id="unmasked"),
    pytest.param(build_frame(0x3, b"x"), 1002, id="reserved-opcode"),
    pytest.param(build_frame(OP_TEXT, b"x", rsv=2), 1002, id="reserved-bit"),
    pytest.param(build_frame(OP_PING, b"x" * 126), 1002, id="long-control-frame"),
    pytest.param(build_frame(0, b"x"), 1002, id="continuation-without-start"),
    pytest.param(build_frame(OP_CLOSE, struct.pack("!H", 999)), 1002, id="invalid-close-code"),
    pytest.param(build_frame(OP_BINARY, b"", length=16 * MiB + 1), 1009, id="too-big"),
]


@pytest.mark.parametrize(("data", "expected"), BAD_INPUT)
async def test_bad_input_gets_its_close_code(server: ServerProcess, request: pytest.FixtureRequest,
                                             data: bytes, expected: int) -> None:
    k = key(request)
    async with await RawWS.connect(server.port, f"/echo?id={k}") as ws:
        await ws.send_raw(data)
        code, _ = await ws.expect_close()
        assert code == expected
        await ws.wait_eof()
    assert (await events(server, k))[0]["code"] == expected  # the app was told the same


# -- the Starlette WebSocketEndpoint and the aiohttp client -----------------------------------------------


async def test_starlette_endpoint_echo(starlette_server: ServerProcess, request: pytest.FixtureRequest) -> None:
    k = key(request)
    async with connect(starlette_server.url(f"/echo?id={k}"), max_size=None) as ws:
        for message in ("text ✓", b"\x00binary", "", b"", os.urandom(200_000)):
            await ws.send(message)
            assert await ws.recv() == message
        await ws.close(4100)
    assert await events(starlette_server, k) == [{"code": 4100}]


async def test_starlette_json_endpoint(starlette_server: ServerProcess) -> None:
    async with connect(starlette_server.url("/json")) as ws:
        await ws.send(json.dumps({"a": [1, 2]}))
        assert json.loads(await ws.recv()) == {"echo": {"a": [1, 2]}}
        await ws.send("not json")
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1003


@pytest.mark.parametrize("compress", [0, 15])
async def test_aiohttp_client(server: ServerProcess, compress: int) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(server.url("/echo"), compress=compress,
                                                                max_msg_size=0) as ws:
        assert ("permessage-deflate" in ws._response.headers.get("Sec-WebSocket-Extensions", "")) == bool(compress)
        await ws.send_str("hello from aiohttp ✓")
        assert (await ws.receive()).data == "hello from aiohttp ✓"
        payload = os.urandom(1000) * 100
        await ws.send_bytes(payload)
        assert (await ws.receive()).data == payload
        await ws.close(code=4003, message=b"done")
        assert ws.close_code == 4003
    async with aiohttp.ClientSession() as http, http.ws_connect(server.url("/close"), compress=compress) as ws:
        await ws.send_str("4444 closed by the app")
        message = await ws.receive()
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert (message.data, message.extra) == (4444, "closed by the app")


# -- backpressure, both ways ------------------------------------------------------------------------------------


async def test_slow_app_pushes_back_on_the_client(server: ServerProcess, request: pytest.FixtureRequest) -> None:
    """While the app reads nothing, the server stops reading (ws_max_queue, and a byte bound): the
    client's sends stall with a bounded amount accepted; once the app reads, everything arrives."""
    k = key(request)
    message = bytes(MiB)
    total = 96  # more than the kernel's buffers on both sides and the server's queue can hold
    async with connect(server.url(f"/slow-app?id={k}"), compression=None, max_size=None,
                       write_limit=64 * 1024) as ws:

        async def send_all() -> int:
            for _ in range(total):
                await ws.send(message)
            return total

        sender = asyncio.ensure_future(send_all())
        done, _ = await asyncio.wait({sender}, timeout=3.0)
        assert not done, f"{total} MiB went out while the app read nothing: no backpressure"
        async with aiohttp.ClientSession() as http:
            await http.post(server.url(f"/release/{k}", "http"))
        assert await asyncio.wait_for(sender, 60) == total
        await ws.send("end")
        assert json.loads(await asyncio.wait_for(ws.recv(), 60)) == {"messages": total, "bytes": total * MiB}


async def test_slow_client_makes_the_app_wait(server: ServerProcess, request: pytest.FixtureRequest) -> None:
    """A client that reads nothing makes the app's send wait once the buffers are full: the app
    got few messages out (not all it tried), and every one arrives intact when the client reads."""
    k = key(request)
    async with connect(server.url(f"/flood?id={k}"), compression=None, max_size=None, max_queue=1) as ws:
        [blocked] = await events(server, k)
        sent_before_block = blocked["sent_before_block"]
        assert sent_before_block < 48, blocked  # kernel buffers + one transport buffer, nowhere near unbounded
        for _ in range(sent_before_block + 1):
            message = await asyncio.wait_for(ws.recv(), 30)
            assert message == bytes(MiB)
        assert await asyncio.wait_for(ws.recv(), 30) == f"done {sent_before_block + 1}"


# -- keepalive --------------------------------------------------------------------------------------------------


async def test_keepalive_pings_and_times_out() -> None:
    """--ws-ping-interval / --ws-ping-timeout: a silent client is pinged, then closed with 1011."""
    proc = uvicorn("test_asgi_apps:fastapi_app", "--ws-ping-interval", "0.5", "--ws-ping-timeout", "2")
    try:
        async with await RawWS.connect(proc.port, "/echo") as ws:  # answers nothing
            frame = await ws.recv_frame(10)
            assert frame.opcode == OP_PING
            code, reason = await ws.expect_close(10)
            assert (code, reason) == (1011, b"keepalive ping timeout")
        async with connect(proc.url("/echo")) as ws:  # websockets answers pings: it stays
            pinged = 0
            async with await RawWS.connect(proc.port, "/echo") as raw:  # this one answers by hand
                while pinged < 3:
                    frame = await raw.recv_frame(10)
                    assert frame.opcode == OP_PING
                    await raw.send_frame(OP_PONG, frame.payload)
                    pinged += 1
                await raw.send_frame(OP_TEXT, "still here")
                assert await raw.recv_message() == (OP_TEXT, b"still here")
            await ws.send("alive")
            assert await ws.recv() == "alive"
    finally:
        proc.stop()


async def test_without_a_ping_timeout_a_silent_client_is_pinged_every_interval_and_kept() -> None:
    """uvicorn's ``ws_ping_timeout=None`` (only its Python API can say None): a client that never
    answers is pinged again every interval, and never closed for it."""
    port = free_port()
    run = ("import uvicorn; uvicorn.run('test_asgi_apps:fastapi_app', host='127.0.0.1', "
           f"port={port}, ws={PROTOCOL!r}, ws_ping_interval=0.3, ws_ping_timeout=None, log_level='info')")
    proc = ServerProcess([sys.executable, "-c", run], port).wait_ready()
    try:
        async with await RawWS.connect(proc.port, "/echo") as ws:  # answers nothing
            for _ in range(4):
                frame = await ws.recv_frame(10)
                assert frame.opcode == OP_PING
            await ws.send_frame(OP_TEXT, "still open")
            assert await ws.recv_message(10) == (OP_TEXT, b"still open")  # (pings in between are skipped)
    finally:
        proc.stop()


# -- graceful shutdown ------------------------------------------------------------------------------------------


async def test_graceful_shutdown_closes_with_1012() -> None:
    """uvicorn's shutdown (SIGINT / SIGTERM) calls shutdown() on every connection: clients see 1012,
    the app its disconnect, and uvicorn exits without waiting out a timeout."""
    proc = uvicorn()
    clients = [await connect(proc.url("/echo")) for _ in range(5)]
    http = aiohttp.ClientSession()
    try:
        aio = [await http.ws_connect(proc.url("/echo")) for _ in range(3)]
        for ws in clients:
            await ws.send("before")
            assert await ws.recv() == "before"
        loop = asyncio.get_running_loop()
        exit_code = loop.run_in_executor(None, proc.stop, signal.SIGTERM, 30.0)
        for ws in clients:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1012
        for aws in aio:
            message = await asyncio.wait_for(aws.receive(), 10)
            assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 1012
        assert await exit_code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        assert proc.count("Exception") == 0, proc.output()
    finally:
        await http.close()
        for ws in clients:
            ws.transport.abort()
        if proc.proc.poll() is None:
            proc.kill()


async def test_shutdown_before_accept_is_500(request: pytest.FixtureRequest) -> None:
    """A connection the app has not answered yet gets a 500 at shutdown (the app, still waiting,
    is cancelled after --timeout-graceful-shutdown)."""
    proc = uvicorn("test_asgi_apps:fastapi_app", "--timeout-graceful-shutdown", "2")
    k = key(request)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
        writer.write(upgrade_request(f"/wait-before-accept?id={k}")[0])
        await events(proc, k)  # the app has the connection and waits
        loop = asyncio.get_running_loop()
        exit_code = loop.run_in_executor(None, proc.stop, signal.SIGTERM, 30.0)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 500 "), head
        assert await asyncio.wait_for(reader.read(), 10) == b"Internal Server Error"
        writer.close()
        assert await exit_code in (0, -signal.SIGTERM)
    finally:
        if proc.proc.poll() is None:
            proc.kill()


def test_server_logged_no_unexpected_errors(server: ServerProcess, starlette_server: ServerProcess) -> None:
    """Runs last: every traceback the module's servers logged is one the tests above provoke on purpose."""
    expected = {"RuntimeError: the app fails before accepting", "RuntimeError: the app fails while connected",
                "RuntimeError: Malformed JSON data received.",  # chained to:
                "json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)"}
    for proc in (server, starlette_server):
        output = proc.output()
        raised = {line for line in output.splitlines() if re.match(r"^[\w.]+(Error|Exception|Disconnected)\b", line)}
        assert raised <= expected, output


# -- uvicorn's other HTTP protocol and the plain asyncio loop ------------------------------------------------


@pytest.mark.parametrize("options", [["--http", "h11"], ["--loop", "asyncio"], ["--loop", "asyncio", "--http", "h11"]],
                         ids=["h11", "asyncio-loop", "asyncio-loop-h11"])
async def test_other_http_protocols_and_loops(options: list[str], request: pytest.FixtureRequest) -> None:
    """The upgrade hand-off is the same from h11 as from httptools, and asyncio's own transports
    read into the wire core's buffer as uvloop's do."""
    proc = uvicorn("test_asgi_apps:fastapi_app", *options)
    k = key(request)
    try:
        async with connect(proc.url(f"/echo?id={k}"), max_size=None) as ws:
            for message in ("text ✓", b"", os.urandom(300_000), "y" * 70_000):
                await ws.send(message)
                assert await ws.recv() == message
            await ws.send(["frag", "ments"])
            assert await ws.recv() == "fragments"
            await ws.close(4020, "bye")
        assert await events(proc, k) == [{"code": 4020, "reason": "bye"}]
        async with connect(proc.url("/close")) as ws:
            await ws.send("4021 app closes")
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        assert (ws.close_code, ws.close_reason) == (4021, "app closes")
    finally:
        proc.stop()


# -- the gunicorn worker ------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("gunicorn") is None and importlib.util.find_spec("gunicorn") is None,
                    reason="gunicorn is not installed")
async def test_gunicorn_worker() -> None:
    """``gunicorn -k fastws.asgi.worker.UvicornWorker``: the app on fastws, 1012 when gunicorn stops."""
    port = free_port()
    proc = ServerProcess([sys.executable, "-m", "gunicorn", "test_asgi_apps:fastapi_app", "-k",
                          "fastws.asgi.worker.UvicornWorker", "-w", "2", "-b", f"127.0.0.1:{port}",
                          "--graceful-timeout", "10"], port, workers=2).wait_ready()
    try:
        clients = [await connect(proc.url("/echo")) for _ in range(4)]
        for ws in clients:
            await ws.send("via gunicorn")
            assert await ws.recv() == "via gunicorn"
        assert "permessage-deflate; server_no_context_takeover" in clients[0].response.headers[
            "Sec-WebSocket-Extensions"]  # fastws's negotiation, not websockets'
        exit_code = asyncio.get_running_loop().run_in_executor(None, proc.stop, signal.SIGTERM, 30.0)
        for ws in clients:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 15)
            assert ws.close_code == 1012
        assert await exit_code == 0
    finally:
        if proc.proc.poll() is None:
            proc.kill()


# -- TLS --------------------------------------------------------------------------------------------------------


async def test_wss_with_certificates_made_now(tmp_path: Any) -> None:
    """uvicorn --ssl-*: the scope says wss; messages of every size and close codes go through the TLS
    transport (it cannot half-close: the fail path closes it instead)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    key_file, cert_file = tmp_path / "key.pem", tmp_path / "cert.pem"
    cert.private_key_pem.write_to_path(key_file)
    cert.cert_chain_pems[0].write_to_path(cert_file)
    proc = uvicorn("test_asgi_apps:fastapi_app", "--ssl-keyfile", str(key_file), "--ssl-certfile", str(cert_file))
    try:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        async with connect(proc.url("/scope", "wss"), ssl=context) as ws:
            assert json.loads(await ws.recv())["scheme"] == "wss"
        async with connect(proc.url("/echo", "wss"), ssl=context, max_size=None) as ws:
            for message in ("over TLS ✓", os.urandom(3 * MiB), b"", "x" * 70000):
                await ws.send(message)
                assert await ws.recv() == message
            await ws.close(4010, "tls bye")
        async with connect(proc.url("/close", "wss"), ssl=context) as ws:
            await ws.send("4011 closed over TLS")
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        assert (ws.close_code, ws.close_reason) == (4011, "closed over TLS")
    finally:
        proc.stop()
