"""One WebSocket connection after the upgrade: the server's asyncio shell around the wire core.

A Session is the asyncio BufferedProtocol of its transport *and* the object
user code talks to (send / ping / close), so an idle connection costs one
Python object plus the Cython reader and writer (both allocate nothing until
traffic flows).  For sync endpoints the reader calls ``on_message`` directly:
one Python call per message.  What happens when the connection ends is decided
by the state machine it inherits (fastws.protocol); this class only moves bytes
and runs the application's code.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastws._frame import OP_CLOSE, FrameReader, FrameWriter
from fastws.errors import CloseCode, ConnectionClosed, ProtocolError
from fastws.protocol import CLOSED, NORMAL_ENDS, OPEN, READY, STATE_NAMES, Inbox, WebSocketProtocol, drop_message

if TYPE_CHECKING:
    from fastws.app import Route
    from fastws.handshake import Request
    from fastws.server import Server

log = logging.getLogger("fastws")

# Why reading is paused (bit flags): it resumes when none is left.
PAUSED_WRITING, INBOX_FULL, BACKLOG = 1, 2, 4


class Session(WebSocketProtocol, asyncio.BufferedProtocol):
    """A live WebSocket connection: send, ping, close; request data; hub membership."""

    __slots__ = (
        "id", "request", "remote", "subprotocol", "user", "state", "rooms", "endpoint",
        "get_buffer", "buffer_updated", "_server", "_transport", "_reader", "_writer", "_paused", "_drain",
        "_inbox", "_on_message", "_task", "_deflate", "keepalive_slot", "__weakref__",
        "opened_at",
    )

    is_server = True

    def __init__(self, server: Server, request: Request, remote: str, subprotocol: str | None,
                 deflate: Any = None) -> None:
        self._init_protocol()
        self.id = server.next_session_id()
        self.request = request
        self.remote = remote
        self.subprotocol = subprotocol
        self.user: Any = None
        self.state: Any = None  # for the application: whatever it wants to attach to the connection
        self.rooms: set[str] | None = None
        self.endpoint: Any = None
        self.keepalive_slot: Any = None  # the keepalive scheduler's bookkeeping
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._paused = 0  # PAUSED_WRITING | INBOX_FULL | BACKLOG
        self._drain: asyncio.Future[None] | None = None
        self._inbox: Inbox | None = None
        self._on_message: Callable[[Any], Any] | None = None  # an async endpoint's on_message
        self._task: asyncio.Task[Any] | None = None  # the application's code running for this session
        self._deflate = deflate
        self._reader: FrameReader | None = None
        self._writer: FrameWriter | None = None
        self.opened_at = server.loop.time()  # for the access log's duration

    @property
    def close_timeout(self) -> float:  # type: ignore[override]
        return self._server.config.close_timeout

    # -- start (called by the server right after the 101 response) -----------------------

    def start(self, transport: asyncio.Transport, route: Route, params: dict[str, str], initial: bytes) -> None:
        """Take over ``transport`` and run the route's endpoint or handler; ``initial``: bytes
        that came right behind the upgrade request."""
        server = self._server
        if route.kind == "handler":
            self._attach(transport, self._enqueue)
            server.session_opened(self)
            self._task = server.spawn(self._run_handler(route.target))
            self.data_received(initial)
            return
        try:
            endpoint = route.target()
            endpoint.session = self
            endpoint.hub = server.hub
            endpoint.params = params
        except Exception as exc:  # a constructor that raises: 1011, logged once, nothing left behind
            self._attach(transport, drop_message)
            server.handler_error(self, exc, "creating the endpoint")
            self.close(CloseCode.INTERNAL_ERROR, "internal server error")
            self.data_received(initial)  # a close frame may be among it
            return
        self.endpoint = endpoint
        queued = route.async_open or route.async_message
        if route.async_message:
            self._on_message = endpoint.on_message
        self._attach(transport, self._enqueue if queued else endpoint.on_message)
        server.session_opened(self)
        if route.async_open:
            self._task = server.spawn(self._open_async(route.async_message))
        else:
            try:
                endpoint.on_open()
            except Exception as exc:
                self._user_error(exc, "on_open")
        self.data_received(initial)

    def _attach(self, transport: asyncio.Transport, on_message: Callable[[Any], Any]) -> None:
        cfg = self._server.config
        self._transport = transport
        deflate = self._deflate
        # aiofastnet transports offer unchecked writes: we only ever hand them bytes
        write = getattr(transport, "write_nocheck", transport.write)
        writelines = getattr(transport, "writelines_nocheck", transport.writelines)
        self._writer = FrameWriter(write, is_server=True, writelines=writelines,
                                   deflate=deflate.compress if deflate else None,
                                   compress_threshold=deflate.compress_threshold if deflate else 0)
        reader = self._reader = FrameReader(self, is_server=True, max_message_size=cfg.max_message_size,
                                            writer=self._writer, inflate=deflate.decompress if deflate else None,
                                            on_error=self._read_error)
        reader.on_message = on_message
        reader.on_pong = None  # a pong is a read: keepalive sees it without a Python call
        reader.max_frames_per_read = cfg.max_frames_per_read
        reader.last_read = reader.last_message = self._server.loop.time()
        # The transport looks up protocol.get_buffer/buffer_updated when the protocol
        # is set: binding the reader's methods makes every read a pure Cython call.
        self.get_buffer = reader.get_buffer
        self.buffer_updated = reader.buffer_updated
        transport.set_write_buffer_limits(high=cfg.write_high_water, low=cfg.write_high_water // 4)
        transport.set_protocol(self)

    # -- asyncio protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover - set_protocol path
        pass

    def data_received(self, data: bytes) -> None:
        """Bytes handed over rather than read into our buffer: the frames a client
        sent right behind its upgrade request, or a transport without buffered reads.

        (Defining it also replaces the HTTP phase's data_received that uvloop
        caches, which would otherwise keep that phase's objects alive.)
        """
        if data and self._reader is not None:
            try:
                self._reader.feed(data)
            except Exception as exc:
                self._read_error(exc)

    def eof_received(self) -> bool:
        self.receive_eof()
        # the state machine closes the transport itself (a TLS transport closes on EOF anyway,
        # and logs a warning when told to stay open)
        transport = self._transport
        return transport is None or transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connection_ended():
            return
        self._server.session_gone(self)
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_exception(self.connection_closed_error())
            drain.exception()  # marked retrieved: nobody may be waiting
        clean = self._close_received
        inbox = self._inbox
        in_recv = inbox is not None and inbox.waiting
        if inbox is not None:
            if not clean:
                inbox.clear()  # the connection died: nobody will read the answers
            inbox.end(self.connection_closed_error())
        task = self._task
        if task is not None and not task.done():
            # A clean close lets the application finish; a dead connection cancels
            # what it is still waiting for (unless that is this session's own recv()).
            if not clean and not in_recv:
                task.cancel()
            task.add_done_callback(self._notify_closed)
        else:
            self._notify_closed()

    def pause_writing(self) -> None:
        # The peer reads slower than we answer: stop reading its requests too, so
        # replies sent from a sync on_message cannot pile up (TCP pushes back on it).
        self._pause_reading(PAUSED_WRITING)
        self._server.writing_paused(self)

    def resume_writing(self) -> None:
        self._server.writing_resumed(self)
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)
        self._resume_reading(PAUSED_WRITING)

    def _pause_reading(self, reason: int) -> None:
        was = self._paused
        self._paused = was | reason
        if not was and self._state == OPEN and self._transport is not None and self._transport.is_reading():
            self._transport.pause_reading()

    def _resume_reading(self, reason: int) -> None:
        self._paused &= ~reason
        if not self._paused and self._state != CLOSED:
            transport = self._transport
            if transport is not None and not transport.is_reading() and not transport.is_closing():
                transport.resume_reading()

    # -- wire-core callbacks ----------------------------------------------------------------

    def on_message(self, data: Any) -> None:  # replaced in _attach(); kept for the reader's handler lookup
        pass

    def on_ping(self, payload: bytes) -> None:
        if not self._close_sent and self._writer is not None:
            self._writer.send_pong(payload)

    def on_close(self, code: int, reason: str) -> None:
        """The peer's close frame (the reader calls this after flushing its writer)."""
        self.receive_close(code, reason)

    def on_backlog(self) -> None:
        """One read held more frames than max_frames_per_read: let other connections run first."""
        self._pause_reading(BACKLOG)
        self._server.loop.call_soon(self._resume_backlog)

    def _resume_backlog(self) -> None:
        self._paused &= ~BACKLOG
        if self._reader is not None:
            self._reader.resume()  # calls on_backlog() again if the cap stops it once more
        self._resume_reading(0)

    def _read_error(self, exc: Exception) -> None:
        """The reader hit a protocol violation, or a sync on_message raised."""
        if isinstance(exc, ProtocolError):
            self._server.protocol_error(self, exc)
            self.fail(exc.code, exc.reason)
        else:
            self._user_error(exc, "on_message")

    # -- state machine hooks (fastws.protocol) -------------------------------------------------

    def _write_close(self, payload: bytes) -> None:
        if self._writer is not None:
            self._writer.send_frame(OP_CLOSE, payload)

    def _drop_messages(self) -> None:
        if self._reader is not None:
            self._reader.on_message = drop_message

    def _discard_input(self) -> None:
        if self._reader is not None:
            self._reader.stop()
        if self._inbox is not None:
            self._inbox.end(self.connection_closed_error())

    def _keep_reading(self) -> None:
        self._paused = 0
        transport = self._transport
        if transport is not None and not transport.is_reading() and not transport.is_closing():
            transport.resume_reading()

    def _shutdown_write(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()
        elif transport is not None:
            transport.close()  # TLS cannot half-close: its shutdown reads on until the peer answers

    def _close_transport(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _abort_transport(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _call_later(self, delay: float, callback: Callable[[], Any]) -> Any:
        return self._server.loop.call_later(delay, callback)

    # -- sending --------------------------------------------------------------------------------

    def send(self, message: str | bytes | bytearray | memoryview) -> Any:
        """Send one message (str: text, bytes-like: binary).

        Returns an awaitable: ``await session.send(x)`` waits while the peer
        is slow to read; a plain ``session.send(x)`` never blocks, and a peer
        that has let more than ``max_send_buffer`` bytes pile up when the next
        message comes is cut off (1008).  Raises ConnectionClosed once closing.
        """
        if self._state != OPEN:
            raise self.connection_closed_error()
        if self._paused & PAUSED_WRITING and self._over_send_buffer():
            return READY
        self._writer.send(message)  # type: ignore[union-attr]
        return self._drain_waiter() if self._paused & PAUSED_WRITING else READY

    def send_frame(self, frame: bytes) -> Any:
        """Write an already-encoded frame (the hub's broadcast); a closing session skips it."""
        if self._state != OPEN or (self._paused & PAUSED_WRITING and self._over_send_buffer()):
            return READY
        self._writer.send_raw(frame)  # type: ignore[union-attr]
        return self._drain_waiter() if self._paused & PAUSED_WRITING else READY

    def _over_send_buffer(self) -> bool:
        """Apply the slow-consumer policy before a send: True if the session was cut off."""
        size = self.write_buffer_size
        if size > self._server.config.max_send_buffer:
            self._server.slow_consumer(self)
            self.close(CloseCode.POLICY_VIOLATION, "slow consumer: send buffer limit exceeded")
            return True
        return self._server.unsent_changed(self, size)

    def _drain_waiter(self) -> asyncio.Future[None]:
        if self._drain is None:
            self._drain = self._server.loop.create_future()
        return self._drain

    async def drain(self) -> None:
        """Wait until the transport's buffer is below the low-water mark."""
        if self._state == CLOSED:
            raise self.connection_closed_error()
        if self._paused & PAUSED_WRITING:
            await self._drain_waiter()

    def ping(self, payload: bytes = b"") -> None:
        if self._state == OPEN and self._writer is not None:
            self._writer.send_ping(payload)

    def abort(self) -> None:
        """Drop the TCP connection now (no closing handshake)."""
        self._abort_transport()

    @property
    def deflate(self) -> Any:
        """The permessage-deflate state negotiated for this session (None: no compression)."""
        return self._deflate

    @property
    def write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport else 0

    @property
    def queued(self) -> tuple[int, int]:
        """(messages, bytes) received and waiting for async code (the bounded inbox)."""
        inbox = self._inbox
        return (len(inbox), inbox.queued_bytes) if inbox is not None else (0, 0)

    @property
    def reading(self) -> bool:
        """False while reading from the peer is paused (backpressure, a full inbox, a frame backlog)."""
        transport = self._transport
        return transport is not None and transport.is_reading()

    @property
    def buffered(self) -> int:
        """Bytes of partial frames and fragmented messages the reader holds."""
        return self._reader.buffered if self._reader is not None else 0

    @property
    def messages_received(self) -> int:
        return self._reader.messages if self._reader is not None else 0

    @property
    def traffic(self) -> tuple[int, int, int, int, int, int, int, int]:
        """The wire core's counters: text messages, text bytes, binary messages, binary bytes
        received, then the same four sent (payload bytes; read by the access log and /metrics)."""
        r, w = self._reader, self._writer
        if r is None or w is None:
            return (0, 0, 0, 0, 0, 0, 0, 0)
        return (r.text_in, r.text_bytes_in, r.binary_in, r.binary_bytes_in,
                w.text_out, w.text_bytes_out, w.binary_out, w.binary_bytes_out)

    @property
    def last_read(self) -> float:
        """The keepalive clock at the last byte received (fastws._frame.set_clock)."""
        return self._reader.last_read if self._reader is not None else 0.0

    @property
    def last_message(self) -> float:
        return self._reader.last_message if self._reader is not None else 0.0

    # -- queued delivery (async endpoints, handler coroutines) ------------------------------------

    def _get_inbox(self) -> Inbox:
        inbox = self._inbox
        if inbox is None:
            cfg = self._server.config
            inbox = self._inbox = Inbox(self._server.loop, self._inbox_flow, max_messages=cfg.max_queue,
                                        max_bytes=cfg.max_queue_bytes)
            if self._state == CLOSED:
                inbox.end(self.connection_closed_error())
        return inbox

    def _enqueue(self, message: Any) -> None:
        self._get_inbox().put(message)
        if self._on_message is not None and self._task is None:
            self._task = self._server.spawn(self._run_queue())

    def _inbox_flow(self, more: bool) -> None:
        if more:
            self._resume_reading(INBOX_FULL)
        else:
            self._pause_reading(INBOX_FULL)  # the application is behind: TCP pushes back on the peer

    async def _run_queue(self) -> None:
        """Hand queued messages to an async on_message, in order, one at a time."""
        inbox = self._inbox
        handler = self._on_message
        assert inbox is not None and handler is not None
        try:
            while len(inbox):
                message = inbox.get_nowait()
                try:
                    result = handler(message)
                    if inspect.isawaitable(result):
                        await result
                except ConnectionClosed:
                    pass  # sending after the close: not an application error
                except Exception as exc:
                    self._user_error(exc, "on_message")
                    return
        finally:
            self._task = None

    async def _open_async(self, async_message: bool) -> None:
        endpoint = self.endpoint
        try:
            await endpoint.on_open()
        except ConnectionClosed:
            pass
        except Exception as exc:
            self._user_error(exc, "on_open")
            return
        inbox = self._inbox
        if not async_message:
            # on_open is done: a sync on_message takes the messages that queued meanwhile,
            # then the reader calls it directly again
            while inbox is not None and len(inbox):
                try:
                    endpoint.on_message(inbox.get_nowait())
                except ConnectionClosed:
                    pass
                except Exception as exc:
                    self._user_error(exc, "on_message")
                    return
            if self._state == OPEN and self._reader is not None:
                self._reader.on_message = endpoint.on_message
            return
        if inbox is not None and len(inbox):
            await self._run_queue()

    async def _run_handler(self, handler: Callable[[Session], Any]) -> None:
        try:
            await handler(self)
        except ConnectionClosed:
            pass
        except Exception as exc:
            self._user_error(exc, "the handler")
        else:
            if self._state == OPEN:
                self.close(CloseCode.NORMAL)

    def _user_error(self, exc: BaseException, where: str) -> None:
        """Application code raised: log it, tell on_error, close with 1011 (never re-raise into the loop)."""
        if isinstance(exc, ConnectionClosed):
            return  # sending on a closed session: not an application error
        self._server.handler_error(self, exc, where)
        endpoint = self.endpoint
        if endpoint is not None:
            try:
                result = endpoint.on_error(exc)
                if inspect.isawaitable(result):
                    self._server.spawn(result)
            except Exception:
                log.exception("error in on_error for %s", self.request.path)
        if self._state == OPEN:
            self.close(CloseCode.INTERNAL_ERROR, "internal server error")

    async def recv(self) -> str | bytes:
        """The next message (handler-coroutine style); raises ConnectionClosed at the end."""
        return await self._get_inbox().get()

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str | bytes]:
        try:
            while True:
                yield await self.recv()
        except ConnectionClosed as exc:
            if exc.code not in NORMAL_ENDS:
                raise

    # -- end of life ------------------------------------------------------------------------------

    def _notify_closed(self, task: Any = None) -> None:
        """on_close: the endpoint's last callback, once its other code has finished."""
        endpoint = self.endpoint
        if endpoint is None:
            return
        try:
            result = endpoint.on_close(*self.close_info())
            if inspect.isawaitable(result):
                self._server.spawn(result)
        except Exception:
            log.exception("error in on_close for %s", self.request.path)

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.request.path} from {self.remote} {STATE_NAMES[self._state]}>"
