"""The uvicorn WebSocket protocol: one ASGI WebSocket connection on the fastws wire core.

uvicorn's HTTP protocol sees an upgrade request, makes one of these with
``(config, server_state, app_state)``, calls ``connection_made(transport)``,
hands over the request head with ``data_received`` and makes it the
transport's protocol.  From then on the Cython FrameReader parses every read
and queues whole messages in an ``Inbox`` that the application's
``receive()`` takes from; ``send()`` writes through a FrameWriter.  The close
handshake is fastws.protocol's, the same as the native server's and the
client's; this class only moves bytes between the wire core and the ASGI
application.

The ASGI events, as done here::

    the application sends            before accept                  after accept
    -------------------------------  -----------------------------  ------------------------------------
    websocket.accept                 101 (+ subprotocol, headers)   RuntimeError
    websocket.close                  HTTP 403                       close frame (code, reason)
    websocket.http.response.start/   the denial response            RuntimeError
      .body
    websocket.send                   RuntimeError                   a text or binary message
    anything, once closed            ClientDisconnected (OSError)   ClientDisconnected (OSError)
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import Callable
from typing import Any, ClassVar
from urllib.parse import unquote

from fastws._frame import OP_CLOSE, FrameReader, FrameWriter
from fastws.asgi import extension
from fastws.deflate import DeflateOptions
from fastws.errors import CloseCode, ConnectionClosed, HandshakeError, ProtocolError
from fastws.handshake import HeadParser, Request, error_response, http_response, negotiate
from fastws.keepalive import Keepalive
from fastws.protocol import CLOSED, CLOSING, CONNECTING, OPEN, Inbox, WebSocketProtocol, drop_message, truncate_reason

try:
    from uvicorn.protocols.utils import (
        ClientDisconnected,
        get_client_addr,
        get_local_addr,
        get_path_with_query_string,
        get_remote_addr,
        is_ssl,
    )
except ImportError as exc:  # pragma: no cover - the [asgi] extra is missing
    raise ImportError("fastws.asgi is a uvicorn WebSocket protocol: pip install 'fastws[asgi]'") from exc

__all__ = ["FastWSProtocol", "ClientDisconnected"]

log = logging.getLogger("uvicorn.error")  # where uvicorn's own WebSocket protocols log

SPEC_VERSION = "2.5"  # ASGI HTTP & WebSocket spec: 2.5 added "reason" to websocket.disconnect
MAX_EARLY_DATA = 65536  # bytes a client may send before the 101 (it should send none)
# Replies made while more messages wait are corked and written every FLUSH_EVERY messages (and when the
# app waits): one send() per batch would leave the client idle until the app's whole batch is done.
FLUSH_EVERY = 4
KiB, MiB = 1024, 1024 * 1024

_ids = itertools.count(1)
_keepalives: dict[tuple[Any, float | None, float | None], Keepalive] = {}
keepalive_stats: collections.Counter[str] = collections.Counter()  # what Keepalive counts (pings, timeouts)


class _KeepaliveSettings:
    """What fastws.keepalive.Keepalive reads of a configuration."""

    __slots__ = ("ping_interval", "ping_timeout", "idle_timeout")

    def __init__(self, ping_interval: float | None, ping_timeout: float | None) -> None:
        self.ping_interval = ping_interval or None
        self.ping_timeout = ping_timeout or None  # None: ping every interval, never give up on a pong
        self.idle_timeout = None


def _keepalive(loop: asyncio.AbstractEventLoop, interval: float | None, timeout: float | None) -> Keepalive:
    """The keepalive scheduler of this loop for these settings (one timer for all connections)."""
    key = (loop, interval, timeout)
    keepalive = _keepalives.get(key)
    if keepalive is None:
        keepalive = _keepalives[key] = Keepalive(loop, _KeepaliveSettings(interval, timeout),  # type: ignore[arg-type]
                                                 keepalive_stats)
    return keepalive


class FastWSProtocol(WebSocketProtocol, asyncio.BufferedProtocol):
    """uvicorn's ``--ws`` protocol class: ``uvicorn app:app --ws fastws.asgi:FastWSProtocol``.

    Honours uvicorn's ``ws_max_size``, ``ws_max_queue``, ``ws_ping_interval``,
    ``ws_ping_timeout`` and ``ws_per_message_deflate``.  The class attributes
    below are fastws's own settings; change them in a subclass.
    """

    # permessage-deflate when ws_per_message_deflate is on: no context takeover either way keeps
    # idle connections free of zlib memory and lets a broadcast share one compressed frame
    deflate_options: ClassVar[DeflateOptions] = DeflateOptions(
        enabled=True, server_no_context_takeover=True, client_no_context_takeover=True, compress_threshold=128)
    close_timeout = 5.0  # every way out of OPEN ends TCP within this many seconds
    max_queue_bytes: ClassVar[int] = 4 * MiB  # besides ws_max_queue messages: bytes queued before reading pauses
    max_send_buffer: ClassVar[int] = 4 * MiB  # hub deliveries to a peer holding more unsent bytes close it (1008)

    __slots__ = (
        "id", "user", "rooms", "get_buffer", "buffer_updated", "ka_bucket", "ka_prev", "ka_next",
        "_config", "_app", "_loop", "_connections", "_tasks", "_default_headers", "_app_state",
        "_transport", "_server", "_client", "_scheme",
        "_parser", "_upgrade", "_scope", "_reader", "_writer", "_inbox", "_connect_pending",
        "_early", "_early_buffer", "_task", "_response", "_write_paused", "_drain",
        "_corked", "_corked_sends", "_flush_handle",
        "_keepalive", "_hub", "_deflate", "__weakref__", *WebSocketProtocol.FIELDS,
    )

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        if not config.loaded:
            config.load()
        self._init_protocol(CONNECTING)
        self.id = next(_ids)
        self.user: Any = None  # the hub's bookkeeping (fastws.hub.Hub): set_user, rooms
        self.rooms: set[str] | None = None
        self.ka_bucket = self.ka_prev = self.ka_next = None  # the keepalive wheel's links
        self._config = config
        self._app = config.loaded_app
        self._loop = _loop or asyncio.get_event_loop()
        self._connections = server_state.connections
        self._tasks = server_state.tasks
        self._default_headers = server_state.default_headers
        self._app_state = app_state
        self._transport: asyncio.Transport | None = None
        self._server: Any = None
        self._client: Any = None
        self._scheme = "ws"
        # the handshake: uvicorn already parsed the head; its limits apply, ours only guard
        self._parser: HeadParser | None = HeadParser(max_head_size=1 * MiB, max_headers=1024)
        self._upgrade: Any = None  # fastws.handshake.Upgrade: the negotiated upgrade, until the app accepts
        self._scope: dict[str, Any] | None = None
        self._reader: Any = None
        self._writer: FrameWriter | None = None
        self._inbox = Inbox(self._loop, self, FastWSProtocol._inbox_flow, max_messages=config.ws_max_queue,
                            max_bytes=self.max_queue_bytes)
        self._connect_pending = True  # websocket.connect not yet received by the app
        self._early = b""  # bytes that came before the 101 (a client should send none)
        self._early_buffer: bytearray | None = None
        self._task: asyncio.Task[None] | None = None
        self._response: tuple[int, list[tuple[bytes, bytes]], list[bytes]] | None = None  # a denial response
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._corked = False  # our own cork on the writer: replies made together go out together
        self._corked_sends = 0
        self._flush_handle: asyncio.Handle | None = None
        self._keepalive: Keepalive | None = None
        self._hub: Any = None
        self._deflate: Any = None
        # until the 101, reads go to a small buffer of our own (a client should send nothing then)
        self.get_buffer = self._early_get_buffer
        self.buffer_updated = self._early_buffer_updated

    # -- asyncio protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._connections.add(self)
        self._server = get_local_addr(transport)  # type: ignore[arg-type]
        self._client = get_remote_addr(transport)  # type: ignore[arg-type]
        self._scheme = "wss" if is_ssl(transport) else "ws"  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        """The request head uvicorn hands over; later, reads of transports without buffered reads."""
        if self._reader is not None:
            try:
                self._reader.feed(data)
            except Exception as exc:
                self._read_error(exc)
            return
        if self._parser is None:
            self._early_data(data)
            return
        try:
            request = self._parser.feed(data)
        except HandshakeError as err:
            self._refuse(err, "")
            return
        if request is not None:
            self._handshake(request)

    def _early_get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._early_buffer is None:
            self._early_buffer = bytearray(4096)
        return memoryview(self._early_buffer)

    def _early_buffer_updated(self, nbytes: int) -> None:
        assert self._early_buffer is not None
        self.data_received(bytes(self._early_buffer[:nbytes]))

    def eof_received(self) -> bool:
        self.receive_eof()
        return True  # the state machine closes the transport itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        if not self.connection_ended():
            return
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._hub is not None:
            self._hub.remove(self)
        if self._keepalive is not None:
            self._keepalive.remove(self)
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_exception(ClientDisconnected())
            drain.exception()  # marked retrieved: nobody may be waiting
        self._inbox.end(self.connection_closed_error())

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def shutdown(self) -> None:
        """uvicorn is stopping: 1012 to an open connection, 500 to one the app has not answered."""
        if self._state == OPEN:
            self.close(CloseCode.SERVICE_RESTART, "server shutting down")
        elif self._state == CONNECTING:
            if self._response is None and self._scope is not None:
                self._write_response(http_response(500, "Internal Server Error", headers=self._default_fields()))
            self._end_handshake()
        # closing already: the close handshake (or its deadline) ends it

    # -- the opening handshake -----------------------------------------------------------------

    def _handshake(self, request: Request) -> None:
        """The head is complete: validate it, then run the application with the scope."""
        parser, self._parser = self._parser, None
        config = self._config
        options = self.deflate_options if config.ws_per_message_deflate else None
        try:
            self._upgrade = negotiate(request, deflate=options, max_message_size=config.ws_max_size)
        except HandshakeError as err:
            self._refuse(err, request.target)
            return
        if parser is not None and parser.rest:
            self._early_data(parser.rest)
        self._scope = self._make_scope(request)
        task = self._task = self._loop.create_task(self._run_asgi())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _make_scope(self, request: Request) -> dict[str, Any]:
        root_path = self._config.root_path
        raw_path, _, query = request.target.partition("?")
        offered = [token.strip(" \t") for value in request.headers.get_all("Sec-WebSocket-Protocol")
                   for token in value.split(",") if token.strip(" \t")]
        return {
            "type": "websocket",
            "asgi": {"version": self._config.asgi_version, "spec_version": SPEC_VERSION},
            "http_version": "1.1",
            "scheme": self._scheme,
            "server": self._server,
            "client": self._client,
            "root_path": root_path,
            "path": root_path + unquote(raw_path),
            "raw_path": root_path.encode("ascii") + raw_path.encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "headers": [(name.lower().encode("latin-1"), value.encode("latin-1"))
                        for name, value in request.headers.items()],
            "subprotocols": offered,
            "state": self._app_state.copy(),
            "extensions": {"websocket.http.response": {}, extension.EXTENSION: extension.Rooms(self)},
        }

    def _early_data(self, data: bytes) -> None:
        if self._state != CONNECTING:
            return
        self._early += data
        if len(self._early) > MAX_EARLY_DATA:  # frames before the 101: not a WebSocket client
            self._abort_transport()

    def _refuse(self, err: HandshakeError, target: str) -> None:
        log.info('%s - "WebSocket %s" %d', self._client_text(), target, err.status)
        self._write_response(error_response(err))
        self._end_handshake()

    def _default_fields(self, skip: set[bytes] = frozenset()) -> list[tuple[str, str]]:  # type: ignore[assignment]
        return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in self._default_headers
                if name.lower() not in skip]

    def _write_response(self, response: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(response)

    def _end_handshake(self) -> None:
        """No WebSocket after all (refused, denied, or the server is stopping): end TCP."""
        if self._state == CONNECTING:
            self._state = CLOSING  # closed: sends raise ClientDisconnected; the disconnect code is 1006
            self._inbox.end(self.connection_closed_error())
            self._loop.call_later(self.close_timeout, self._abort_unless_closed)  # a client that never reads
        self._close_transport()

    def _accept(self, message: dict[str, Any]) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ClientDisconnected()
        scope = self._scope
        upgrade = self._upgrade
        assert scope is not None and upgrade is not None
        log.info('%s - "WebSocket %s" [accepted]', get_client_addr(scope), get_path_with_query_string(scope))
        headers = [(bytes(name).decode("latin-1"), bytes(value).decode("latin-1"))
                   for name, value in message.get("headers") or ()]
        subprotocol = message.get("subprotocol") or None
        if subprotocol is not None and subprotocol not in upgrade.offered:
            # the client would fail the handshake: never answer with one it did not offer
            log.warning("ASGI app accepted subprotocol %r, which the client did not offer: ignored", subprotocol)
            subprotocol = None
        given = {name.lower() for name, _ in headers}
        defaults = [(bytes(name).decode("latin-1"), bytes(value).decode("latin-1"))
                    for name, value in self._default_headers]
        headers = [(name, value) for name, value in defaults if name.lower() not in given] + headers
        accepted = upgrade.response(subprotocol, headers)  # ValueError for a header that could split it
        transport.write(accepted.response)
        self._open(transport, accepted.deflate)

    def _open(self, transport: asyncio.Transport, deflate: Any) -> None:
        """The 101 is out: the wire core takes over the reads (``deflate``: the negotiated state)."""
        config = self._config
        self._upgrade = None
        write = getattr(transport, "write_nocheck", transport.write)  # aiofastnet: writes without checks
        writelines = getattr(transport, "writelines_nocheck", transport.writelines)
        writer = self._writer = FrameWriter(write, is_server=True, writelines=writelines,
                                            deflate=deflate.compress if deflate else None,
                                            compress_threshold=deflate.compress_threshold if deflate else 0)
        reader = self._reader = FrameReader(self, is_server=True, max_message_size=config.ws_max_size,
                                            writer=writer, inflate=deflate.decompress if deflate else None,
                                            on_error=self._read_error)
        reader.on_message = self._inbox.put  # one Python call per message: straight into the queue
        reader.on_pong = None  # a pong is a read: keepalive sees it without a Python call
        reader.last_read = reader.last_message = self._loop.time()
        self._state = OPEN
        self._deflate = deflate
        # The transport looks up get_buffer/buffer_updated when its protocol is set: give it the
        # reader's, so every read is a pure Cython call.
        self.get_buffer = reader.get_buffer
        self.buffer_updated = reader.buffer_updated
        transport.set_protocol(self)
        self._hub = extension.hub_for_connections()
        self._hub.add(self)
        self._keepalive = _keepalive(self._loop, config.ws_ping_interval, config.ws_ping_timeout)
        self._keepalive.add(self)
        early, self._early, self._early_buffer = self._early, b"", None
        if early:
            self.data_received(early)

    # -- wire-core callbacks -----------------------------------------------------------------------

    def on_message(self, data: Any) -> None:  # replaced in _open(); the reader looks it up at creation
        pass

    def on_ping(self, payload: bytes) -> None:
        if not self._close_sent and self._writer is not None:
            self._writer.send_pong(payload)

    def on_close(self, code: int, reason: str) -> None:
        """The peer's close frame (the reader calls this after flushing its writer)."""
        self.receive_close(code, reason)
        self._inbox.end(self.connection_closed_error())  # the app drains what came before, then disconnect

    def _read_error(self, exc: Exception) -> None:
        """A protocol violation (or a limit) in the input: the peer gets its close code."""
        if isinstance(exc, ProtocolError):
            log.debug("WebSocket %s: %s", self._client_text(), exc)
            self.fail(exc.code, exc.reason)
        else:
            log.error("error while reading from %s", self._client_text(), exc_info=exc)
            self.fail(CloseCode.INTERNAL_ERROR, "internal server error")

    def _inbox_flow(self, more: bool) -> None:
        transport = self._transport
        if transport is None or self._state != OPEN:
            return  # closing: fastws.protocol keeps reading to see the peer's close frame
        if more and not transport.is_reading():
            transport.resume_reading()
        elif not more and transport.is_reading():
            transport.pause_reading()  # the app is behind: TCP pushes back on the client

    # -- state machine hooks (fastws.protocol) -------------------------------------------------------

    def _write_close(self, payload: bytes) -> None:
        if self._writer is not None:
            self._writer.send_frame(OP_CLOSE, payload)
            self._flush()

    def _drop_messages(self) -> None:
        if self._reader is not None:
            self._reader.on_message = drop_message
        self._inbox.end(self.connection_closed_error())  # ours was the first close: the app's disconnect

    def _discard_input(self) -> None:
        if self._reader is not None:
            self._reader.stop()
        self._inbox.end(self.connection_closed_error())

    def _keep_reading(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_reading() and not transport.is_closing():
            transport.resume_reading()

    def _shutdown_write(self) -> None:
        self._flush()
        transport = self._transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()
        elif transport is not None:
            transport.close()  # TLS cannot half-close

    def _close_transport(self) -> bool:
        self._flush()
        if self._transport is not None:
            self._transport.close()
        return True  # uvicorn's transport, which may be TLS: the deadline bounds the close

    def _abort_transport(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _abort_unless_closed(self) -> None:
        if self._state != CLOSED:
            self._abort_transport()

    def _call_later(self, delay: float, callback: Callable[[], Any]) -> Any:
        return self._loop.call_later(delay, callback)

    # -- the ASGI application --------------------------------------------------------------------

    async def _run_asgi(self) -> None:
        scope = self._scope
        try:
            result = await self._app(scope, self.asgi_receive, self.asgi_send)
        except ClientDisconnected:
            pass
        except asyncio.CancelledError:  # uvicorn's graceful-shutdown timeout: nobody is left to answer
            self._app_failed()
            raise
        except Exception:
            log.exception("Exception in ASGI application\n")
            self._app_failed()
        else:
            if self._state == CONNECTING and self._response is None:
                log.error("ASGI callable returned without completing handshake.")
                self._app_failed()
            elif result is not None:
                log.error("ASGI callable should return None, but returned '%s'.", result)
        finally:
            self._task = None
        if self._state == OPEN:
            self.close(CloseCode.NORMAL)  # the app returned without closing
        elif self._state == CONNECTING:
            self._end_handshake()  # a denial response the app did not finish

    def _app_failed(self) -> None:
        """The app raised: 500 before accept, 1011 after."""
        if self._state == CONNECTING:
            if self._response is None:
                self._write_response(http_response(500, "Internal Server Error", headers=self._default_fields()))
            self._end_handshake()
        elif self._state == OPEN:
            self.close(CloseCode.INTERNAL_ERROR, "internal server error")

    async def asgi_receive(self) -> dict[str, Any]:
        """The ASGI ``receive``: a queued message is returned without waiting (no future, no task switch)."""
        inbox = self._inbox
        if len(inbox) and not self._connect_pending:
            message = inbox.get_nowait()
        elif self._connect_pending:
            self._connect_pending = False
            return {"type": "websocket.connect"}
        else:
            if self._corked:
                self._flush()  # about to wait for the client: send what this iteration produced first
            try:
                message = await inbox.get()
            except ConnectionClosed as closed:
                return {"type": "websocket.disconnect", "code": closed.code, "reason": closed.reason}
        if type(message) is str:
            return {"type": "websocket.receive", "text": message}
        return {"type": "websocket.receive", "bytes": message}

    async def asgi_send(self, message: dict[str, Any]) -> None:
        """The ASGI ``send``: a message is written (or corked) and returns at once unless the client is
        slow to read; then it waits until the transport's buffer has drained."""
        if self._state == OPEN and message["type"] == "websocket.send":
            text = message.get("text")
            data = text if text is not None else message.get("bytes")
            if data is None:
                raise TypeError("websocket.send needs 'text' or 'bytes'")
            if not self._corked and len(self._inbox):
                self._cork()  # more messages are waiting for the app: its replies will coalesce
            self._writer.send(data)  # type: ignore[union-attr]
            if self._corked:
                self._corked_sends += 1
                if self._corked_sends >= FLUSH_EVERY:
                    self._flush_corked()
            if self._write_paused:
                await self._drain_waiter()
            return
        await self._send_other(message)

    async def _send_other(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        state = self._state
        if state == CONNECTING and self._transport is not None:
            if self._response is not None:
                self._response_body(message)
            elif kind == "websocket.accept":
                self._accept(message)
                await extension.backplane_started()
            elif kind == "websocket.close":
                log.info('%s - "WebSocket %s" 403', get_client_addr(self._scope),  # type: ignore[arg-type]
                         get_path_with_query_string(self._scope))  # type: ignore[arg-type]
                self._write_response(http_response(403, headers=self._default_fields()))
                self._end_handshake()
            elif kind == "websocket.http.response.start":
                self._response_start(message)
            else:
                raise RuntimeError("Expected ASGI message 'websocket.accept', 'websocket.close' or "
                                   f"'websocket.http.response.start' but got {kind!r}.")
        elif state == OPEN:
            if kind == "websocket.close":
                reason = truncate_reason(message.get("reason") or "")
                self.close(message.get("code") or CloseCode.NORMAL, reason)
            elif kind == "websocket.send":  # (the hot path handles well-formed sends)
                raise TypeError("websocket.send needs 'text' or 'bytes'")
            else:
                raise RuntimeError(f"Expected ASGI message 'websocket.send' or 'websocket.close', but got {kind!r}.")
        elif kind == "websocket.close":
            return  # closed already (by either side): closing again changes nothing
        else:
            raise ClientDisconnected()

    def _response_start(self, message: dict[str, Any]) -> None:
        status = message["status"]
        if not 100 <= status < 600:
            raise RuntimeError(f"Invalid HTTP status code '{status}' in response.")
        scope = self._scope
        assert scope is not None
        log.info('%s - "WebSocket %s" %d', get_client_addr(scope), get_path_with_query_string(scope), status)
        self._response = (status, [(bytes(n).lower(), bytes(v)) for n, v in message.get("headers") or ()], [])

    def _response_body(self, message: dict[str, Any]) -> None:
        """websocket.http.response.body: the denial response goes out whole, with its last part."""
        kind = message["type"]
        if kind != "websocket.http.response.body":
            raise RuntimeError(f"Expected ASGI message 'websocket.http.response.body' but got {kind!r}.")
        assert self._response is not None
        status, headers, body = self._response
        body.append(bytes(message.get("body", b"")))
        if message.get("more_body", False):
            return
        # We frame the body (Content-Length) and close after it: those fields are ours.
        ours = {b"content-length", b"transfer-encoding", b"connection"}
        fields = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers if n not in ours]
        fields += self._default_fields({n for n, _ in headers})
        self._write_response(http_response(status, b"".join(body), headers=fields))
        self._end_handshake()

    # -- sending: hub deliveries, corking, backpressure --------------------------------------------

    def send(self, message: str | bytes) -> None:
        """Send one message outside the ASGI send (the hub's per-connection compression path)."""
        if self._state == OPEN and not self._over_send_buffer():
            self._writer.send(message)  # type: ignore[union-attr]

    def send_frame(self, frame: bytes) -> None:
        """Write an already-encoded frame (a hub broadcast, a keepalive ping); a closing connection skips it."""
        if self._state == OPEN and not self._over_send_buffer():
            self._writer.send_raw(frame)  # type: ignore[union-attr]

    def _over_send_buffer(self) -> bool:
        """Fire-and-forget deliveries cannot wait: a client that lets too much pile up is cut off."""
        if not self._write_paused or self._transport is None:
            return False
        if self._transport.get_write_buffer_size() <= self.max_send_buffer:
            return False
        log.info("WebSocket %s: slow consumer cut off", self._client_text())
        self.close(CloseCode.POLICY_VIOLATION, "slow consumer: send buffer limit exceeded")
        return True

    def _cork(self) -> None:
        assert self._writer is not None
        self._writer.cork()
        self._corked = True
        self._corked_sends = 0
        self._flush_handle = self._loop.call_soon(self._flush)

    def _flush_corked(self) -> None:
        """Write what the cork holds and keep corking: the client gets to work on the first replies
        while the app makes the rest (one write per FLUSH_EVERY messages, not one per batch)."""
        self._corked_sends = 0
        writer = self._writer
        assert writer is not None
        writer.uncork()
        writer.cork()

    def _flush(self) -> None:
        """Write what our cork held (the reader's own cork, if any, flushes when its read is done)."""
        if self._corked:
            self._corked = False
            if self._flush_handle is not None:
                self._flush_handle.cancel()
                self._flush_handle = None
            if self._state != CLOSED:
                self._writer.uncork()  # type: ignore[union-attr]

    def _drain_waiter(self) -> asyncio.Future[None]:
        if self._drain is None:
            self._drain = self._loop.create_future()
        return self._drain

    # -- what the hub and keepalive read (fastws.hub.Hub, fastws.keepalive.Keepalive) ------------------

    @property
    def deflate(self) -> Any:
        """The permessage-deflate state negotiated for this connection (None: no compression)."""
        return self._deflate

    @property
    def last_read(self) -> float:
        return self._reader.last_read if self._reader is not None else 0.0

    @property
    def last_message(self) -> float:
        return self._reader.last_message if self._reader is not None else 0.0

    def _client_text(self) -> str:
        return f"{self._client[0]}:{self._client[1]}" if self._client else ""

    def __repr__(self) -> str:
        path = self._scope["path"] if self._scope else "?"
        return f"<FastWSProtocol {self.id} {path} from {self._client_text()} state {self._state}>"
