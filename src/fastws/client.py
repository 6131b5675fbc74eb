"""An asyncio WebSocket client on the fastws wire core (used by the tests and `fastws bench`).

Two ways to use it:

* high level, like ``websockets``::

      async with fastws.client.connect("ws://127.0.0.1:8000/echo") as ws:
          await ws.send("hello")
          print(await ws.recv())
          async for message in ws: ...

* callback mode (no queue, no task, one call per message) for load tools::

      ws = await connect(url, on_message=callback)

  ``callback`` is called by the wire core with each whole message (str for
  text, bytes for binary) straight from the read.  Frames sent from inside the
  callback are coalesced into one write per read.  It may be any callable, even
  a C one: ``on_message=ws.writer.send`` would echo every message back.

The connection object is its transport's ``asyncio.BufferedProtocol``; the
read buffer belongs to ``fastws._frame.FrameReader(is_server=False)``, and
frames go out through ``FrameWriter(is_server=False)``, masked with a fresh key
per frame (RFC 6455 5.3).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl as _ssl
import sys
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from typing import Any
from urllib.parse import urlsplit

from fastws._frame import OP_CLOSE, FrameReader, FrameWriter
from fastws.errors import CloseCode, ConnectionClosed, HandshakeError, ProtocolError
from fastws.handshake import check_client_response, client_request, new_key
from fastws.protocol import (
    CLOSED,
    CLOSING,
    CONNECTING,
    NORMAL_ENDS,
    OPEN,
    READY,
    STATE_NAMES,
    Inbox,
    Pings,
    PingSent,
    WebSocketProtocol,
    drop_message,
)

__all__ = ["connect", "ClientConnection", "parse_url", "WSURL", "READY", "CONNECTING", "OPEN", "CLOSING", "CLOSED"]

log = logging.getLogger("fastws.client")

MAX_RESPONSE_HEAD = 65536
DEFAULT_MAX_MESSAGE_SIZE = 1 << 20


class WSURL:
    """A parsed ``ws://`` / ``wss://`` URL."""

    __slots__ = ("secure", "host", "port", "resource", "host_header")

    def __init__(self, secure: bool, host: str, port: int, resource: str, host_header: str) -> None:
        self.secure = secure
        self.host = host
        self.port = port
        self.resource = resource
        self.host_header = host_header

    def __repr__(self) -> str:
        return f"{'wss' if self.secure else 'ws'}://{self.host_header}{self.resource}"


def parse_url(url: str) -> WSURL:
    """Split a ws:// or wss:// URL; raise ValueError for anything else."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket URL (want ws:// or wss://): {url!r}")
    if parts.username or parts.password:
        raise ValueError("user info in WebSocket URLs is not supported")
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in {url!r}")
    secure = scheme == "wss"
    default_port = 443 if secure else 80
    try:
        port = parts.port or default_port
    except ValueError:
        raise ValueError(f"invalid port in {url!r}") from None
    resource = parts.path or "/"
    if parts.query:
        resource += "?" + parts.query
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == default_port else f"{shown}:{port}"
    return WSURL(secure, host, port, resource, host_header)


class ClientConnection(WebSocketProtocol, asyncio.BufferedProtocol):
    """A client WebSocket connection: send / recv / ping / close.

    Created by :func:`connect`.  ``send`` returns an awaitable that is free when
    no waiting is needed (like the server's Session): ``await ws.send(x)`` waits
    while the server is slow to read, ``ws.send(x)`` alone never blocks.  The
    closing handshake is fastws.protocol's (the client side of it).
    """

    __slots__ = (
        "get_buffer",
        "_loop",
        "_transport",
        "_request",
        "_key",
        "_subprotocols",
        "_compression",
        "_max_message_size",
        "_on_message",
        "_head",
        "_hbuf",
        "_opened",
        "_reader",
        "_writer",
        "subprotocol",
        "deflate",
        "_closed_fut",
        "_timeout",
        "_inbox",
        "_paused",
        "_drain",
        "_pings",
        "pings_received",
        "_on_close",
        "response_head",
        "local_address",
        "_coalesce",
        "__weakref__",
        *WebSocketProtocol.FIELDS,
    )

    is_server = False

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        request: bytes,
        key: str,
        *,
        subprotocols: Sequence[str] = (),
        compression: bool = False,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        on_message: Callable[[Any], Any] | None = None,
        on_close: Callable[[int, str], Any] | None = None,
        close_timeout: float = 5.0,
        max_queue: int = 64,
        coalesce: bool = True,
    ) -> None:
        self._init_protocol(CONNECTING)
        self._loop = loop
        self._coalesce = coalesce
        self._transport: asyncio.Transport | None = None
        self._request = request
        self._key = key
        self._subprotocols = tuple(subprotocols)
        self._compression = compression
        self._max_message_size = max_message_size
        self._on_message = on_message
        self._on_close = on_close
        self._head = b""
        self._hbuf: bytearray | None = bytearray(4096)
        self.get_buffer = self._handshake_buffer  # type: ignore[method-assign]
        self._opened: asyncio.Future[None] = loop.create_future()
        self._reader: Any = None  # FrameReader (its public on_message / messages are not in the stub)
        self._writer: FrameWriter | None = None
        self.subprotocol: str | None = None
        self.deflate: Any = None
        self.response_head = b""
        self.local_address: Any = None
        self._closed_fut: asyncio.Future[None] = loop.create_future()
        self._timeout = close_timeout
        self._inbox = Inbox(loop, self, ClientConnection._inbox_flow, max_messages=max_queue, max_bytes=0)
        self._paused = False
        self._drain: asyncio.Future[None] | None = None
        self._pings = Pings()
        self.pings_received = 0

    @property
    def close_timeout(self) -> float:  # type: ignore[override]
        return self._timeout

    # -- opening handshake --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self.local_address = transport.get_extra_info("sockname")
        transport.write(self._request)  # type: ignore[attr-defined]

    def _handshake_buffer(self, sizehint: int = -1) -> memoryview:
        assert self._hbuf is not None
        return memoryview(self._hbuf)

    def buffer_updated(self, nbytes: int) -> None:
        reader = self._reader
        if reader is not None:
            try:
                reader.buffer_updated(nbytes)
            except Exception as exc:
                self._read_error(exc)
            return
        if self._state != CONNECTING or self._hbuf is None:
            return
        self._handshake_data(bytes(self._hbuf[:nbytes]))

    def _read_error(self, exc: Exception) -> None:
        if isinstance(exc, ProtocolError):
            self.fail(exc.code, exc.reason)
        else:  # an on_message callback raised
            log.error("error in the on_message callback of %r", self, exc_info=exc)
            self.fail(CloseCode.INTERNAL_ERROR, "client error")

    def _handshake_data(self, data: bytes) -> None:
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > MAX_RESPONSE_HEAD:
                self._open_failed(HandshakeError(0, f"response head larger than {MAX_RESPONSE_HEAD} bytes"))
            else:
                self._head = head
            return
        self._head = b""
        self.response_head, rest = head[: end + 4], head[end + 4 :]
        try:
            self.subprotocol, pmd = check_client_response(
                self.response_head,
                self._key,
                subprotocols=self._subprotocols,
                deflate=self._compression,
                max_message_size=self._max_message_size,
            )
        except HandshakeError as exc:
            self._open_failed(exc)
            return
        transport = self._transport
        assert transport is not None
        self.deflate = pmd
        self._hbuf = None
        self._writer = writer = FrameWriter(
            transport.write,
            is_server=False,
            writelines=transport.writelines,
            deflate=pmd.compress if pmd else None,
            compress_threshold=pmd.compress_threshold if pmd else 0,
        )
        reader: Any = FrameReader(
            self,
            is_server=False,
            max_message_size=self._max_message_size,
            writer=writer if self._coalesce else None,
            inflate=pmd.decompress if pmd else None,
        )
        reader.on_message = self._on_message if self._on_message is not None else self._inbox.put
        self._reader = reader
        transport.set_write_buffer_limits(high=64 * 1024, low=16 * 1024)
        self.get_buffer = reader.get_buffer  # type: ignore[method-assign]
        self._state = OPEN
        transport.set_protocol(self)  # uvloop caches get_buffer: hand it the reader's
        if not self._opened.done():
            self._opened.set_result(None)
        if rest:
            try:
                reader.feed(rest)
            except Exception as exc:
                self._read_error(exc)

    def _open_failed(self, exc: BaseException) -> None:
        self._state = CLOSED
        self._fail_open(exc)
        if self._transport is not None:
            self._transport.abort()

    def _fail_open(self, exc: BaseException) -> None:
        if not self._opened.done():
            self._opened.set_exception(exc)
            self._opened.exception()  # whoever awaits it still gets it; nobody may (after a timeout)

    # -- asyncio protocol ---------------------------------------------------------

    def eof_received(self) -> bool:
        if self._state == CONNECTING:
            return False
        self.receive_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        was_open = self._reader is not None
        self.connection_ended()
        if not was_open:
            self._fail_open(exc or ConnectionResetError("connection closed during the opening handshake"))
        if not self._closed_fut.done():
            self._closed_fut.set_result(None)
        error = self.connection_closed_error()
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_exception(error)
            drain.exception()
        self._pings.fail(error)
        self._inbox.end(error)
        if self._on_close is not None and was_open:
            self._on_close(*self.close_info())

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _inbox_flow(self, more: bool) -> None:
        transport = self._transport
        if transport is None or self._state != OPEN:
            return
        if more and not transport.is_reading():
            transport.resume_reading()
        elif not more and transport.is_reading():
            transport.pause_reading()  # recv() is behind: TCP pushes back on the server

    # -- wire-core callbacks ------------------------------------------------------

    def on_message(self, data: Any) -> None:  # replaced on the reader after the handshake
        pass

    def on_ping(self, payload: bytes) -> None:
        self.pings_received += 1
        if not self._close_sent:
            assert self._writer is not None
            self._writer.send_pong(payload)

    def on_pong(self, payload: bytes) -> None:
        self._pings.answer(payload)

    def on_close(self, code: int, reason: str) -> None:
        self.receive_close(code, reason)
        self._inbox.end(self.connection_closed_error())  # recv() drains what came before, then raises

    # -- state machine hooks (fastws.protocol) -------------------------------------------

    def _write_close(self, payload: bytes) -> None:
        if self._writer is not None:
            self._writer.send_frame(OP_CLOSE, payload)

    def _drop_messages(self) -> None:
        if self._reader is not None:
            self._reader.on_message = drop_message

    def _discard_input(self) -> None:
        if self._reader is not None:
            self._reader.stop()
        self._inbox.end(self.connection_closed_error())

    def _keep_reading(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_reading() and not transport.is_closing():
            transport.resume_reading()

    def _shutdown_write(self) -> None:  # pragma: no cover - a client waits for the server's FIN instead
        pass

    def _close_transport(self) -> bool:
        if self._transport is not None:
            self._transport.close()
        return True

    def _abort_transport(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _call_later(self, delay: float, callback: Callable[[], Any]) -> Any:
        return self._loop.call_later(delay, callback)

    # -- public API ---------------------------------------------------------------

    @property
    def writer(self) -> FrameWriter:
        """The frame writer (low level: ``writer.send(x)`` skips the state check)."""
        assert self._writer is not None
        return self._writer

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    @property
    def messages_received(self) -> int:
        """Data messages delivered so far (counted by the wire core)."""
        return self._reader.messages if self._reader is not None else 0

    def set_on_message(self, callback: Callable[[Any], Any] | None) -> None:
        """Route messages to ``callback`` (None: back to the recv() queue)."""
        self._on_message = callback
        if self._reader is not None and self._state == OPEN:
            self._reader.on_message = callback if callback is not None else self._inbox.put

    def send(self, message: str | bytes | bytearray | memoryview) -> Any:
        """Send one message (str: text, bytes-like: binary); await the result to respect backpressure."""
        if self._state != OPEN:
            raise self.connection_closed_error()
        assert self._writer is not None
        self._writer.send(message)
        if self._paused:
            return self._drain_future()
        return READY

    async def drain(self) -> None:
        """Wait until the write buffer is below its low-water mark."""
        if self._paused:
            await self._drain_future()

    def _drain_future(self) -> asyncio.Future[None]:
        if self._drain is None:
            self._drain = self._loop.create_future()
        return self._drain

    def ping(self, payload: str | bytes | bytearray | memoryview | None = None) -> PingSent:
        """Send a ping now; as in python-websockets, ``pong_waiter = await ws.ping()`` gives a future
        that resolves to the round trip (s) when the pong arrives (fastws.protocol.Pings)."""
        if self._state != OPEN:
            raise self.connection_closed_error()
        data = self._pings.payload(payload)
        assert self._writer is not None
        self._writer.send_ping(data)
        return self._pings.sent(data, self._loop.create_future())

    async def close(self, code: int = 1000, reason: str = "") -> None:  # type: ignore[override]
        """Closing handshake: send a close frame, wait for the server's and for TCP to end
        (at most ``close_timeout`` seconds, then drop the connection)."""
        self.start_close(code, reason)
        if self._state != CLOSED:
            await asyncio.shield(self._closed_fut)

    def start_close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame without waiting (the connection ends by itself)."""
        if self._state == CONNECTING:
            self.abort()
            return
        WebSocketProtocol.close(self, code, reason)

    def abort(self) -> None:
        """Drop the TCP connection now."""
        self._abort_transport()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed_fut)

    @property
    def state(self) -> int:
        return self._state

    # -- receiving ------------------------------------------------------------------

    async def recv(self) -> str | bytes:
        """The next message; raises ConnectionClosed once the connection is over."""
        try:
            return await self._inbox.get()
        except ConnectionClosed:
            if self._state != CLOSED:
                await asyncio.shield(self._closed_fut)  # the code is final once TCP has ended
            raise self.connection_closed_error() from None

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str | bytes]:
        try:
            while True:
                yield await self.recv()
        except ConnectionClosed as exc:
            if exc.code not in NORMAL_ENDS:
                raise

    async def __aenter__(self) -> ClientConnection:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<ClientConnection {STATE_NAMES[self._state]} local={self.local_address}>"


_parse_url_cached = functools.lru_cache(maxsize=256)(parse_url)
_KEY_MARK = "@FASTWS-KEY@"


@functools.lru_cache(maxsize=256)
def _request_template(
    host_header: str,
    resource: str,
    subprotocols: tuple[str, ...],
    compression: bool,
    extra_headers: tuple[tuple[str, str], ...],
) -> tuple[bytes, bytes]:
    """The upgrade request split around its key: a new connection only adds a fresh key."""
    head = client_request(
        host_header,
        resource,
        key=_KEY_MARK,
        subprotocols=subprotocols,
        deflate=compression,
        extra_headers=extra_headers,
    )
    before, mark, after = head.partition(_KEY_MARK.encode("ascii"))
    if not mark or _KEY_MARK.encode("ascii") in after:
        raise ValueError("cannot build the upgrade request")  # pragma: no cover - a header held the marker
    return before, after


@functools.lru_cache(maxsize=1)
def _default_ssl_context() -> _ssl.SSLContext:
    """One verifying context for every wss:// connection (building one loads the CA store)."""
    return _ssl.create_default_context()


async def _open(
    url: str,
    *,
    subprotocols: Sequence[str],
    compression: bool,
    max_message_size: int,
    local_addr: tuple[str, int] | None,
    open_timeout: float | None,
    close_timeout: float,
    on_message: Callable[[Any], Any] | None,
    on_close: Callable[[int, str], Any] | None,
    extra_headers: Sequence[tuple[str, str]],
    ssl: _ssl.SSLContext | bool | None,
    max_queue: int,
    sock: Any,
    create_connection: Callable[..., Any] | None,
    coalesce: bool,
) -> ClientConnection:
    u = _parse_url_cached(url)
    if u.secure and ssl is None:
        ssl = True
    if ssl is True:
        ssl = _default_ssl_context()
    elif ssl is False:
        ssl = None
    if ssl is not None and not u.secure:
        raise ValueError("ssl= was given for a ws:// URL: use wss://")
    loop = asyncio.get_running_loop()
    key = new_key()
    before, after = _request_template(
        u.host_header, u.resource, tuple(subprotocols), compression, tuple(map(tuple, extra_headers))
    )
    request = b"".join((before, key.encode("ascii"), after))
    conn = ClientConnection(
        loop,
        request,
        key,
        subprotocols=subprotocols,
        compression=compression,
        max_message_size=max_message_size,
        on_message=on_message,
        on_close=on_close,
        close_timeout=close_timeout,
        max_queue=max_queue,
        coalesce=coalesce,
    )
    create = create_connection or loop.create_connection

    async def go() -> None:
        if sock is not None:
            await create(lambda: conn, sock=sock, ssl=ssl, server_hostname=u.host if ssl else None)
        else:
            await create(
                lambda: conn,
                u.host,
                u.port,
                local_addr=local_addr,
                ssl=ssl,
                server_hostname=u.host if ssl else None,
            )
        await conn._opened

    try:
        if open_timeout is None:
            await go()
        elif sys.version_info >= (3, 11):
            async with asyncio.timeout(open_timeout):
                await go()
        else:  # pragma: no cover - Python 3.10
            await asyncio.wait_for(go(), open_timeout)
    except BaseException:
        conn.abort()
        if conn._opened.done() and not conn._opened.cancelled():
            conn._opened.exception()  # retrieved: the caller gets the error raised here
        raise
    return conn


class connect:  # noqa: N801 - used like a function, as in websockets
    """Open a client connection: ``async with connect(url) as ws`` or ``ws = await connect(url)``.

    ``on_message``: callback mode (see the module doc); ``recv()`` is then unused.
    ``local_addr``: the source (host, port) to bind, e.g. ``("127.0.0.5", 0)``.
    ``open_timeout`` covers TCP connect and the upgrade; on expiry TimeoutError.
    A refused upgrade raises HandshakeError with the server's HTTP status.
    ``wss://`` uses ``ssl`` (True/None: a default verifying context).
    ``coalesce``: frames sent while a read is handled leave in one write (the
    default; best for small messages).  False writes each frame at once, which
    saves a copy of big payloads.
    ``sock``/``create_connection``: an already-made socket, or another transport
    layer's ``create_connection(protocol_factory, host, port, ...)``.
    """

    def __init__(
        self,
        url: str,
        *,
        subprotocols: Sequence[str] = (),
        compression: bool = False,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        local_addr: tuple[str, int] | None = None,
        open_timeout: float | None = 10.0,
        close_timeout: float = 5.0,
        on_message: Callable[[Any], Any] | None = None,
        on_close: Callable[[int, str], Any] | None = None,
        extra_headers: Sequence[tuple[str, str]] = (),
        ssl: _ssl.SSLContext | bool | None = None,
        max_queue: int = 64,
        sock: Any = None,
        create_connection: Callable[..., Any] | None = None,
        coalesce: bool = True,
    ) -> None:
        self._args: dict[str, Any] = dict(
            subprotocols=subprotocols,
            compression=compression,
            max_message_size=max_message_size,
            local_addr=local_addr,
            open_timeout=open_timeout,
            close_timeout=close_timeout,
            on_message=on_message,
            on_close=on_close,
            extra_headers=extra_headers,
            ssl=ssl,
            max_queue=max_queue,
            sock=sock,
            create_connection=create_connection,
            coalesce=coalesce,
        )
        self._url = url
        self._conn: ClientConnection | None = None

    def __await__(self) -> Generator[Any, None, ClientConnection]:
        return _open(self._url, **self._args).__await__()

    async def __aenter__(self) -> ClientConnection:
        self._conn = await _open(self._url, **self._args)
        return self._conn

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._conn is not None:
            await self._conn.close()
