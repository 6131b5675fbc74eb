"""A tiny raw-socket WebSocket client for conformance tests.

Nothing here tries to be a correct WebSocket client: it sends exactly the bytes
a test asks for (valid or not) and reads back exactly what the server sent, so
tests can check the server's reaction to malformed input and the TCP teardown.

    ws = await RawWS.connect(port, "/echo")
    await ws.send_frame(OP_TEXT, b"hi")
    frame = await ws.recv_frame()
    code, reason = await ws.expect_close()       # next frame must be a close
    assert await ws.wait_eof()                   # the server dropped TCP
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from dataclasses import dataclass

from compat import deadline
from fastws._frame import accept_key, encode_frame

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

DEFAULT_TIMEOUT = 5.0


def build_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
                mask: bool = True, length: int | None = None, mask_key: bytes | None = None) -> bytes:
    """Any frame, including ones RFC 6455 forbids (encode_frame refuses those).

    ``rsv`` is the 3 RSV bits as an int 0..7 (RSV1 = 4); ``length`` overrides the
    length field (to announce a payload that is never sent).
    """
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0x0F)
    mbit = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 65536:
        head = bytes((b0, mbit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, mbit | 127)) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4) if mask_key is None else mask_key
    return head + key + mask_bytes(payload, key)


def mask_bytes(data: bytes, key: bytes, offset: int = 0) -> bytes:
    if not data:
        return b""
    n = len(data)
    k = (key * (n // 4 + 2))[offset % 4:offset % 4 + n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def close_payload(code: int | None = None, reason: bytes | str = b"") -> bytes:
    if code is None:
        return b""
    if isinstance(reason, str):
        reason = reason.encode("utf-8")
    return struct.pack("!H", code) + reason


@dataclass
class Frame:
    fin: bool
    rsv: int
    opcode: int
    payload: bytes
    header_size: int = 0  # bytes before the payload, as sent

    @property
    def close(self) -> tuple[int | None, bytes]:
        """(code, raw reason) of a close frame; code None when the payload is empty."""
        assert self.opcode == OP_CLOSE, self
        if not self.payload:
            return None, b""
        return struct.unpack("!H", self.payload[:2])[0], self.payload[2:]

    def __repr__(self) -> str:
        p = self.payload if len(self.payload) <= 40 else self.payload[:40] + b"..."
        return (f"Frame(fin={self.fin}, rsv={self.rsv}, opcode={self.opcode:#x}, "
                f"len={len(self.payload)}, {p!r})")


class Closed(Exception):
    """The server closed TCP while a frame was expected."""


def upgrade_request(path: str = "/echo", *, host: str = "127.0.0.1", key: str | None = None,
                    extra: list[tuple[str, str]] | None = None) -> tuple[bytes, str]:
    key = key or base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}" for k, v in (extra or [])]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), key


@dataclass
class HttpResponse:
    status: int
    reason_phrase: str
    headers: dict[str, str]  # lower-cased names; repeated names joined with ", "
    body: bytes
    closed: bool  # the server closed the connection after the response
    raw: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def parse_response_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    assert version in ("HTTP/1.1", "HTTP/1.0"), lines[0]
    status, _, phrase = rest.partition(" ")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        name = name.strip().lower()
        headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
    return int(status), phrase, headers


async def http_exchange(port: int, data: bytes | list[bytes], *, timeout: float = DEFAULT_TIMEOUT,
                        delay: float = 0.0, head_request: bool = False) -> HttpResponse:
    """Send raw bytes (a list is sent piece by piece, ``delay`` apart), read the whole response.

    Reads until the server closes the connection (or ``timeout``): every refusal
    must close. ``closed`` is False if the server kept the connection open.
    Reading runs from the start, so an early answer (408, 431) is seen even if
    later pieces then hit a reset; sending stops once the server has answered.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got: list[bytes] = []
    state = {"closed": False}

    async def collect() -> None:
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionError:
                state["closed"] = True
                return
            if not chunk:
                state["closed"] = True
                return
            got.append(chunk)
            raw = b"".join(got)
            # a 101 keeps the connection open by design: stop at the end of its head
            if raw.startswith(b"HTTP/1.1 101") and b"\r\n\r\n" in raw:
                return

    task = asyncio.ensure_future(collect())
    try:
        pieces = data if isinstance(data, list) else [data]
        for i, piece in enumerate(pieces):
            if i and delay:
                await asyncio.sleep(delay)
            if got or task.done():
                break
            try:
                writer.write(piece)
                await writer.drain()
            except ConnectionError:
                break
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except asyncio.TimeoutError:
            pass
        raw = b"".join(got)
        head, sep, body = raw.partition(b"\r\n\r\n")
        assert sep, f"no complete response head in {raw[:300]!r}"
        status, phrase, headers = parse_response_head(head)
        length = headers.get("content-length")
        if length is not None and not head_request:  # a HEAD answer announces the body it leaves out
            assert len(body) == int(length), (len(body), length, raw[:300])
        return HttpResponse(status, phrase, headers, body, state["closed"], raw)
    finally:
        task.cancel()
        writer.transport.abort()


class RawWS:
    """An upgraded connection driven by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 response: HttpResponse) -> None:
        self.reader = reader
        self.writer = writer
        self.response = response

    @classmethod
    async def connect(cls, port: int, path: str = "/echo", *, extra: list[tuple[str, str]] | None = None,
                      first: bytes = b"", timeout: float = DEFAULT_TIMEOUT, sock: socket.socket | None = None
                      ) -> RawWS:
        """Open TCP (or use ``sock``, already connected), upgrade (``first`` is sent in the same write,
        right behind the head)."""
        if sock is not None:
            reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
        request, key = upgrade_request(path, extra=extra)
        writer.write(request + first)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status, phrase, headers = parse_response_head(head[:-4])
        response = HttpResponse(status, phrase, headers, b"", False, head)
        if status != 101:
            writer.transport.abort()
            raise AssertionError(f"upgrade refused: {head!r}")
        assert headers.get("upgrade", "").lower() == "websocket", head
        assert "upgrade" in headers.get("connection", "").lower(), head
        assert headers.get("sec-websocket-accept") == accept_key(key), head
        return cls(reader, writer, response)

    # -- sending ----------------------------------------------------------------

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_frame(self, opcode: int, payload: bytes | str = b"", *, fin: bool = True,
                         rsv1: bool = False) -> None:
        """A well-formed masked frame, encoded by fastws._frame.encode_frame(mask=True)."""
        await self.send_raw(encode_frame(opcode, payload, fin=fin, rsv1=rsv1, mask=True))

    async def send_bad(self, opcode: int, payload: bytes = b"", **kw: object) -> None:
        """A frame built by hand (build_frame), for frames encode_frame refuses to make."""
        await self.send_raw(build_frame(opcode, payload, **kw))  # type: ignore[arg-type]

    async def send_close(self, code: int | None = 1000, reason: bytes | str = b"") -> None:
        await self.send_raw(build_frame(OP_CLOSE, close_payload(code, reason)))

    # -- receiving --------------------------------------------------------------

    async def _read(self, n: int) -> bytes:
        try:
            return await self.reader.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            raise Closed(f"TCP closed after {len(exc.partial)} of {n} bytes") from None
        except ConnectionError as exc:
            raise Closed(f"TCP reset: {exc}") from None

    async def recv_frame(self, timeout: float | None = DEFAULT_TIMEOUT) -> Frame:
        """The next frame; ``timeout=None``: no timer of its own (the caller bounds the wait)."""
        if timeout is None:
            return await self._recv_frame()
        return await asyncio.wait_for(self._recv_frame(), timeout)

    async def _recv_frame(self) -> Frame:
        b0, b1 = await self._read(2)
        assert not b1 & 0x80, "RFC 6455 5.1: a server MUST NOT mask frames it sends"
        n = b1 & 0x7F
        hlen = 2
        if n == 126:
            n = struct.unpack("!H", await self._read(2))[0]
            hlen = 4
        elif n == 127:
            n = struct.unpack("!Q", await self._read(8))[0]
            hlen = 10
            assert not n >> 63, "RFC 6455 5.2: the most significant bit of a 64-bit length MUST be 0"
        payload = await self._read(n) if n else b""
        return Frame(bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0x0F, payload, hlen)

    async def recv_message(self, timeout: float | None = DEFAULT_TIMEOUT) -> tuple[int, bytes]:
        """Reassemble the next data message (control frames are returned to ``self.controls``)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        opcode, parts = 0, []
        while True:
            frame = await self.recv_frame(None if deadline is None else max(0.01, deadline - loop.time()))
            if frame.opcode & 8:
                if frame.opcode == OP_CLOSE:
                    raise AssertionError(f"close frame instead of a message: {frame.close}")
                continue
            if frame.opcode != OP_CONT:
                assert opcode == 0, f"new data frame inside a fragmented message: {frame}"
                opcode = frame.opcode
            parts.append(frame.payload)
            if frame.fin:
                return opcode, b"".join(parts)

    async def expect_close(self, timeout: float = DEFAULT_TIMEOUT, *, skip_data: bool = False
                           ) -> tuple[int | None, bytes]:
        """The next frame must be a close frame (pings/pongs skipped); returns (code, raw reason)."""
        while True:
            try:
                frame = await self.recv_frame(timeout)
            except Closed as exc:
                raise AssertionError(f"TCP closed without a close frame ({exc})") from None
            if frame.opcode in (OP_PING, OP_PONG):
                continue
            if skip_data and frame.opcode in (OP_TEXT, OP_BINARY, OP_CONT):
                continue
            assert frame.opcode == OP_CLOSE, f"expected a close frame, got {frame}"
            return frame.close

    async def wait_eof(self, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """Wait until the server closes TCP (or half-closes it: its FIN), then close our side as
        every client does; returns any bytes that came before. Fails on timeout."""
        data = b""
        try:
            async with deadline(timeout):
                while True:
                    try:
                        chunk = await self.reader.read(65536)
                    except ConnectionError:
                        return data
                    if not chunk:
                        self.writer.close()
                        return data
                    data += chunk
        except asyncio.TimeoutError:
            raise AssertionError(f"server did not close TCP within {timeout} s "
                                 f"(received {len(data)} more bytes)") from None

    async def assert_open(self, wait: float = 0.2) -> None:
        """Nothing arrives and TCP stays open for ``wait`` seconds."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), wait)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"expected silence, got {data!r} (b'' = TCP closed)")

    def abort(self) -> None:
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    async def __aenter__(self) -> RawWS:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort()


async def wait_for(predicate, timeout: float = 3.0, interval: float = 0.01) -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate()`` until true; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        await asyncio.sleep(interval)


async def wait_no_connections(server, timeout: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    """No half-open handshakes and no sessions left on ``server``."""
    await wait_for(lambda: server.pending_handshakes == 0 and not server.hub.sessions, timeout)
