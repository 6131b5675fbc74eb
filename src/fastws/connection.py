"""One WebSocket connection after the upgrade: the I/O shell around the wire core.

A Session is the asyncio BufferedProtocol of its transport *and* the object
user code talks to (send / ping / close), so an idle connection costs one
Python object plus the Cython reader and writer (both allocate nothing until
traffic flows).  The reader calls the endpoint's ``on_message`` directly for
sync endpoints: one Python call per message.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastws._frame import FrameReader, FrameWriter
from fastws.errors import CloseCode, ConnectionClosed, ProtocolError

if TYPE_CHECKING:
    from fastws.handshake import Request
    from fastws.server import Server

log = logging.getLogger("fastws")

# States
OPEN, CLOSING, CLOSED = 1, 2, 3


class _Ready:
    """What a send returns when no waiting is needed: awaiting it is free."""

    __slots__ = ()

    def __await__(self):  # type: ignore[no-untyped-def]
        return iter(())


READY = _Ready()


def _drop_message(message: Any) -> None:
    """Where messages go once we have started closing (RFC 6455 7.1.1: no more data)."""


class Session(asyncio.BufferedProtocol):
    """A live WebSocket connection: send, ping, close; request data; hub membership."""

    __slots__ = (
        "id", "request", "remote", "subprotocol", "user", "rooms", "endpoint",
        "get_buffer", "buffer_updated", "_server", "_transport", "_reader", "_writer", "_state",
        "_close_sent", "_close_code", "_close_reason", "_closed_notified", "_close_timer",
        "_paused", "_drain", "_seen_reads", "_last_active", "_ping_sent", "_seen_messages", "_last_message",
        "_queue", "_queue_handler", "_queue_task", "_inbox_waiter", "_deflate", "__weakref__",
    )

    def __init__(self, server: Server, request: Request, remote: str, subprotocol: str | None,
                 deflate: Any = None) -> None:
        self.id = server.next_session_id()
        self.request = request
        self.remote = remote
        self.subprotocol = subprotocol
        self.user: Any = None
        self.rooms: set[str] | None = None
        self.endpoint: Any = None
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._state = OPEN
        self._close_sent = False
        self._close_code = CloseCode.ABNORMAL
        self._close_reason = ""
        self._closed_notified = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._drain: asyncio.Future[None] | None = None
        self._seen_reads = 0
        self._last_active = 0.0
        self._ping_sent = 0.0
        self._seen_messages = 0
        self._last_message = 0.0
        self._queue: collections.deque[Any] | None = None
        self._queue_handler: Callable[[Any], Any] | None = None
        self._queue_task: asyncio.Task[None] | None = None
        self._inbox_waiter: asyncio.Future[None] | None = None
        self._deflate = deflate
        self._reader: FrameReader | None = None
        self._writer: FrameWriter | None = None

    # -- wiring (called by the server right after the 101 response) -----------

    def attach(self, transport: asyncio.Transport, endpoint: Any, on_message: Callable[[Any], Any],
               *, queued: bool) -> None:
        """Take over ``transport``; messages go to ``on_message`` (through a queue if ``queued``)."""
        cfg = self._server.config
        self._transport = transport
        self.endpoint = endpoint
        deflate = self._deflate
        # aiofastnet transports offer unchecked writes: we only ever hand them bytes
        write = getattr(transport, "write_nocheck", transport.write)
        writelines = getattr(transport, "writelines_nocheck", transport.writelines)
        self._writer = FrameWriter(write, is_server=True, writelines=writelines,
                                   deflate=deflate.compress if deflate else None,
                                   compress_threshold=deflate.compress_threshold if deflate else 0)
        self._reader = FrameReader(self, is_server=True, max_message_size=cfg.max_message_size,
                                   writer=self._writer, inflate=deflate.decompress if deflate else None,
                                   on_error=self._read_error)
        if queued:
            self._queue_handler = on_message
            self._reader.on_message = self._enqueue
        else:
            self._reader.on_message = on_message
        # The transport looks up protocol.get_buffer/buffer_updated when the protocol
        # is set: binding the reader's methods makes every read a pure Cython call.
        self.get_buffer = self._reader.get_buffer
        self.buffer_updated = self._reader.buffer_updated
        transport.set_write_buffer_limits(high=cfg.write_high_water, low=cfg.write_high_water // 4)
        self._last_active = self._last_message = self._server.loop.time()
        transport.set_protocol(self)

    # -- asyncio protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover - set_protocol path
        pass

    def _read_error(self, exc: Exception) -> None:
        """The reader hit a protocol violation, or a sync on_message raised."""
        if isinstance(exc, ProtocolError):
            self._fail(exc.code, exc.reason)
        else:
            self._server.handler_error(self, exc)

    def data_received(self, data: bytes) -> None:
        """Bytes handed over rather than read into our buffer: the frames a client
        sent right behind its upgrade request, or a transport without buffered reads.

        (Defining it also replaces the HTTP phase's data_received that uvloop
        caches, which would otherwise keep that phase's objects alive.)
        """
        if data:
            try:
                self._reader.feed(data)
            except Exception as exc:
                self._read_error(exc)

    def eof_received(self) -> bool:
        return False  # let the transport close; connection_lost reports 1006 if no close came

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = CLOSED
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionClosed(self._close_code, self._close_reason))
            drain.exception()  # mark retrieved: nobody may be waiting
        self._wake_inbox()
        self._notify_closed()

    def pause_writing(self) -> None:
        # The peer reads slower than we answer: stop reading its requests too, so
        # replies sent from a sync on_message cannot pile up (TCP pushes back on it).
        self._paused = True
        if self._transport is not None and self._state == OPEN and self._transport.is_reading():
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)
        queue = self._queue
        if queue is None or len(queue) < self._server.config.max_queue:
            self._resume_reading()

    def _resume_reading(self) -> None:
        transport = self._transport
        if transport is not None and self._state == OPEN and not transport.is_reading():
            transport.resume_reading()

    # -- wire-core callbacks --------------------------------------------------

    def on_message(self, data: Any) -> None:  # replaced in attach(); kept for the reader's handler lookup
        pass

    def on_ping(self, payload: bytes) -> None:
        if not self._close_sent:
            self._writer.send_pong(payload)

    def on_pong(self, payload: bytes) -> None:
        self._ping_sent = 0.0

    def on_close(self, code: int, reason: str) -> None:
        """The peer sent a close frame: echo it (if we have not closed) and drop TCP."""
        if self._close_code == CloseCode.ABNORMAL or not self._close_sent:
            self._close_code, self._close_reason = code, reason
        if not self._close_sent:
            self._close_sent = True
            self._writer.send_frame(0x8, b"" if code == CloseCode.NO_STATUS else code.to_bytes(2, "big"))
        self._state = CLOSING
        assert self._transport is not None
        # RFC 6455 7.1.1: the server closes the TCP connection first (the reader
        # calls this after flushing its writer, so the echoed close goes out first).
        self._transport.close()

    # -- sending --------------------------------------------------------------

    def send(self, message: str | bytes | bytearray | memoryview) -> Any:
        """Send one message (str: text, bytes-like: binary).

        Returns an awaitable: ``await session.send(x)`` waits while the peer
        is slow to read; a plain ``session.send(x)`` never blocks, and a peer
        that has let more than ``max_send_buffer`` bytes pile up when the next
        message comes is cut off (1008).
        """
        if self._state != OPEN:
            raise ConnectionClosed(self._close_code, self._close_reason)
        if self._paused and self._over_send_buffer():
            return READY
        self._writer.send(message)
        return self._drain_waiter() if self._paused else READY

    def send_frame(self, frame: bytes) -> Any:
        """Write an already-encoded frame (used by the hub's broadcast)."""
        if self._state != OPEN or (self._paused and self._over_send_buffer()):
            return READY
        self._writer.send_raw(frame)
        return self._drain_waiter() if self._paused else READY

    def _over_send_buffer(self) -> bool:
        """Apply the slow-consumer policy: True if the session was cut off."""
        transport = self._transport
        assert transport is not None
        if transport.get_write_buffer_size() <= self._server.config.max_send_buffer:
            return False
        self._server.stats["slow_consumers"] += 1
        self.close(CloseCode.POLICY_VIOLATION, "slow consumer: send buffer limit exceeded")
        return True

    def _drain_waiter(self) -> asyncio.Future[None]:
        if self._drain is None:
            self._drain = self._server.loop.create_future()
        return self._drain

    async def drain(self) -> None:
        """Wait until the transport's buffer is below the low-water mark."""
        if self._paused:
            await self._drain_waiter()

    def ping(self, payload: bytes = b"") -> None:
        if self._state == OPEN:
            self._writer.send_ping(payload)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; the TCP connection drops when the peer answers
        or after ``close_timeout``."""
        if self._close_sent or self._state == CLOSED:
            return
        self._close_sent = True
        self._state = CLOSING
        self._close_code, self._close_reason = code, reason
        if self._reader is not None:
            self._reader.on_message = _drop_message
        try:
            self._writer.send_close(code, reason)
        except ValueError:  # a code or reason that cannot go on the wire: say 1011 instead of crashing
            log.error("session.close(%r, %r): invalid close code or reason too long; sent 1011", code, reason)
            self._close_code, self._close_reason = CloseCode.INTERNAL_ERROR, ""
            self._writer.send_close(CloseCode.INTERNAL_ERROR, "")
        self._close_timer = self._server.loop.call_later(self._server.config.close_timeout, self.abort)

    def abort(self) -> None:
        """Drop the TCP connection now (no closing handshake)."""
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): send a close frame and drop TCP."""
        if not self._close_sent:
            self._close_sent = True
            self._close_code, self._close_reason = code, reason
            try:
                self._writer.send_close(code, reason[:120])
            except ValueError:
                self._writer.send_close(code, "")
        self._state = CLOSING
        assert self._transport is not None
        self._transport.close()
        self._close_timer = self._server.loop.call_later(self._server.config.close_timeout, self.abort)

    @property
    def closed(self) -> bool:
        return self._state != OPEN

    @property
    def close_code(self) -> int | None:
        return None if self._state == OPEN else int(self._close_code)

    @property
    def close_reason(self) -> str:
        return self._close_reason

    @property
    def write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport else 0

    # -- queued delivery (async on_message, handler coroutines) -----------------

    def _enqueue(self, message: Any) -> None:
        queue = self._queue
        if queue is None:
            queue = self._queue = collections.deque()
        queue.append(message)
        if len(queue) >= self._server.config.max_queue and self._transport is not None:
            self._transport.pause_reading()  # the handler is behind: stop reading, TCP pushes back
        if self._queue_handler is not None:
            if self._queue_task is None:
                self._queue_task = self._server.loop.create_task(self._run_queue(self._queue_handler))
        else:
            self._wake_inbox()

    async def _run_queue(self, handler: Callable[[Any], Any]) -> None:
        """Hand queued messages to an async on_message, in order, one at a time."""
        queue = self._queue
        assert queue is not None
        try:
            while queue:
                message = queue.popleft()
                self._resume_if_drained(queue)
                result = handler(message)
                if asyncio.iscoroutine(result):
                    await result
        except Exception as exc:
            self._server.handler_error(self, exc)
        finally:
            self._queue_task = None

    def _resume_if_drained(self, queue: collections.deque[Any]) -> None:
        if len(queue) < self._server.config.max_queue // 2 and not self._paused:
            self._resume_reading()

    def _wake_inbox(self) -> None:
        waiter, self._inbox_waiter = self._inbox_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def recv(self) -> str | bytes:
        """The next message (handler-coroutine style); raises ConnectionClosed at the end."""
        while True:
            queue = self._queue
            if queue:
                message = queue.popleft()
                self._resume_if_drained(queue)
                return message
            if self._state == CLOSED:
                raise ConnectionClosed(self._close_code, self._close_reason)
            self._inbox_waiter = self._server.loop.create_future()
            await self._inbox_waiter

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str | bytes]:
        try:
            while True:
                yield await self.recv()
        except ConnectionClosed as exc:
            if exc.code not in (CloseCode.NORMAL, CloseCode.GOING_AWAY, CloseCode.NO_STATUS):
                raise

    # -- end of life ----------------------------------------------------------

    def _notify_closed(self) -> None:
        if self._closed_notified:
            return
        self._closed_notified = True
        self._server.session_closed(self, int(self._close_code), self._close_reason)

    def __repr__(self) -> str:
        state = {OPEN: "open", CLOSING: "closing", CLOSED: "closed"}[self._state]
        return f"<Session {self.id} {self.request.path} from {self.remote} {state}>"
