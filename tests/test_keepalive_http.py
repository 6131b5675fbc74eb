"""HTTP/1.1 persistent connections for plain routes, over real sockets: pipelined requests answered
in order (sync and async handlers mixed), Connection: close, HTTP/1.0, the idle timeout, HEAD and
405 on a kept connection, requests with a body, and an upgrade after keep-alive requests."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from fastws import App, Endpoint
from wsraw import build_frame, parse_response_head, wait_for

pytestmark = pytest.mark.timeout(30)


class Echo(Endpoint):
    def on_message(self, message: str | bytes) -> None:
        self.session.send(message)


def app() -> App:
    app = App()

    @app.http("/n/{i}")
    def number(request: Any) -> str:
        return request.path.rsplit("/", 1)[1]

    @app.http("/later/{i}")
    async def later(request: Any) -> str:
        await asyncio.sleep(0.01)
        return "later-" + request.path.rsplit("/", 1)[1]

    app.route("/echo")(Echo)
    return app


def get(path: str, *extra: str, method: str = "GET", version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: x", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_response(reader: asyncio.StreamReader, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status, _, headers = parse_response_head(head[:-4])
    body = b"" if head_only else await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def test_pipelined_requests_are_answered_in_order(start_server) -> None:
    server, port = await start_server(app())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    paths = ["/n/1", "/later/2", "/n/3", "/nowhere", "/later/5", "/n/6"]
    writer.write(b"".join(get(p) for p in paths))  # all in one write
    answers = [await read_response(reader) for _ in paths]
    assert [body for _, _, body in answers] == [b"1", b"later-2", b"3", b"no route for /nowhere\n", b"later-5", b"6"]
    assert all(h["connection"] == "keep-alive" for _, h, _ in answers)
    assert [s for s, _, _ in answers] == [200, 200, 200, 404, 200, 200]
    writer.write(get("/n/7", "Connection: close"))
    status, headers, body = await read_response(reader)
    assert (status, headers["connection"], body) == (200, "close", b"7")
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after the answer
    writer.close()
    await wait_for(lambda: server.pending_handshakes == 0)


async def test_head_and_405_keep_the_connection(start_server) -> None:
    _, port = await start_server(app())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(get("/n/42", method="HEAD") + get("/n/1", method="POST") + get("/n/2"))
    status, headers, _ = await read_response(reader, head_only=True)
    assert status == 200 and headers["content-length"] == "2"
    status, headers, body = await read_response(reader)
    assert status == 405 and headers["allow"] == "GET, HEAD" and b"POST" in body
    assert (await read_response(reader))[2] == b"2"
    writer.close()


async def test_http_1_0_closes_unless_keep_alive_is_asked(start_server) -> None:
    _, port = await start_server(app())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(get("/n/1", "Connection: keep-alive", version="1.0") + get("/n/2", version="1.0"))
    status, headers, body = await read_response(reader)
    assert headers["connection"] == "keep-alive" and body == b"1"
    status, headers, body = await read_response(reader)
    assert headers["connection"] == "close" and body == b"2"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_a_request_with_a_body_closes_after_its_answer(start_server) -> None:
    _, port = await start_server(app())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(get("/n/1", "Content-Length: 5") + b"hello")
    status, headers, body = await read_response(reader)
    assert headers["connection"] == "close" and body == b"1"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_idle_keep_alive_connection_is_closed_quietly(start_server) -> None:
    server, port = await start_server(app(), keepalive_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(get("/n/1"))
    await read_response(reader)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # no 408 for a connection that asked nothing
    writer.close()
    await wait_for(lambda: server.pending_handshakes == 0)


async def test_upgrade_after_keep_alive_requests(start_server) -> None:
    server, port = await start_server(app())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    upgrade = get("/echo", "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")
    writer.write(get("/n/1") + get("/later/2") + upgrade + build_frame(1, b"over the same connection"))
    assert (await read_response(reader))[2] == b"1"
    assert (await read_response(reader))[2] == b"later-2"
    status, headers, _ = await read_response(reader, head_only=True)
    assert status == 101 and headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    frame = await asyncio.wait_for(reader.readexactly(2 + len(b"over the same connection")), 5)
    assert frame[2:] == b"over the same connection"
    assert server.session_count == 1
    writer.close()


async def test_aiohttp_reuses_the_connection(start_server) -> None:
    server, port = await start_server(app())
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as http:
        bodies = []
        for i in range(5):
            async with http.get(f"http://127.0.0.1:{port}/n/{i}") as resp:
                bodies.append(await resp.text())
        assert bodies == ["0", "1", "2", "3", "4"]
        assert server.stats["connections_total"] == 0 and server.pending_handshakes == 1  # one connection
