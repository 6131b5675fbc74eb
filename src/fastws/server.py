"""The server: routing, endpoints, the HTTP phase, keepalive, shutdown, workers."""

from __future__ import annotations

import asyncio
import functools
import inspect
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastws.connection import Session
from fastws.errors import CloseCode, HandshakeError
from fastws.handshake import (
    DeflateOptions,
    HeadParser,
    Request,
    accept,
    error_response,
    http_response,
    is_websocket_upgrade,
)
from fastws.hub import Hub

log = logging.getLogger("fastws")


TRANSPORTS = ("uvloop", "aiofastnet")


@dataclass
class Config:
    """Server options; the defaults are meant for production."""

    max_message_size: int = 1 << 20  # bytes; larger messages close with 1009
    ping_interval: float | None = 20.0  # seconds of silence before we ping (below nginx's 60 s)
    ping_timeout: float = 20.0  # seconds to wait for any bytes after a ping
    close_timeout: float = 5.0  # seconds to wait for the peer's close frame / our flush
    handshake_timeout: float = 10.0  # seconds for the whole request head (slowloris)
    idle_timeout: float | None = None  # close (1001) after this long without a data message
    max_head_size: int = 8192
    max_headers: int = 64
    max_connections: int = 0  # 0 = no limit; when full, new upgrades get 503
    write_high_water: int = 64 * 1024  # transport buffer size where send() starts to wait
    max_send_buffer: int = 4 * 1024 * 1024  # non-awaited sends past this cut the peer off (1008)
    max_queue: int = 64  # messages queued for an async handler before reading pauses
    allowed_origins: Sequence[str] | None = None  # None = any Origin
    subprotocols: Sequence[str] = ()  # in order of preference
    select_subprotocol: Callable[[Request, list[str]], str | None] | None = None
    compression: bool = False  # permessage-deflate (RFC 7692)
    compress_threshold: int = 128
    compression_no_context_takeover: bool = True  # bounded memory: no per-connection window kept
    trusted_proxies: Sequence[str] = ()  # addresses/networks whose X-Forwarded-For we believe
    drain_timeout: float = 10.0  # graceful shutdown: seconds for clients to close
    transport: str = "uvloop"  # "uvloop": the loop's own transports; "aiofastnet": aiofastnet's (Cython)
    deflate: DeflateOptions = field(init=False)

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {self.transport!r}")
        nct = self.compression_no_context_takeover
        self.deflate = DeflateOptions(
            enabled=self.compression, compress_threshold=self.compress_threshold,
            server_no_context_takeover=nct, client_no_context_takeover=nct)
        self._proxies = [ipaddress.ip_network(p, strict=False) for p in self.trusted_proxies]

    def is_trusted_proxy(self, host: str) -> bool:
        if not self._proxies:
            return False
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in net for net in self._proxies)


class Endpoint:
    """Subclass and route it: one instance per connection.

    ``self.session`` sends and closes, ``self.hub`` finds other sessions and
    rooms, ``self.params`` holds the path parameters.  Every hook may be a
    plain method or ``async def``; messages are handled in order either way.
    """

    session: Session
    hub: Hub
    params: dict[str, str]

    def on_open(self) -> Any:
        pass

    def on_message(self, message: str | bytes) -> Any:
        pass

    def on_close(self, code: int, reason: str) -> Any:
        pass

    def on_error(self, exc: BaseException) -> Any:
        """Called with an exception raised by another hook (the session closes with 1011)."""


Handler = Callable[[Session], Awaitable[Any]]
HttpHandler = Callable[[Request], Any]
Target = type[Endpoint] | Handler


@dataclass
class Response:
    """A plain HTTP answer for an HTTP route."""

    body: str | bytes = b""
    status: int = 200
    content_type: str = "text/plain; charset=utf-8"
    headers: Sequence[tuple[str, str]] = ()


class App:
    """Routes paths (``/chat/{room}``) to Endpoint classes, handler coroutines and HTTP handlers."""

    def __init__(self) -> None:
        self._routes: list[tuple[re.Pattern[str], str, Any]] = []
        self.hub = Hub()
        self.http("/healthz")(self._healthz)
        self.server: Server | None = None

    def route(self, path: str) -> Callable[[Target], Target]:
        """Route WebSocket upgrades on ``path`` to an Endpoint subclass or ``async def handler(ws)``."""

        def register(target: Target) -> Target:
            if isinstance(target, type) and issubclass(target, Endpoint):
                kind = "endpoint"
            elif inspect.iscoroutinefunction(target):
                kind = "handler"
            else:
                raise TypeError(f"{target!r} is neither an Endpoint subclass nor an async function")
            self._add(path, kind, target)
            return target

        return register

    def http(self, path: str) -> Callable[[HttpHandler], HttpHandler]:
        """Route plain HTTP GETs on ``path`` to ``handler(request)`` returning str, bytes, dict or Response."""

        def register(handler: HttpHandler) -> HttpHandler:
            self._add(path, "http", handler)
            return handler

        return register

    def _add(self, path: str, kind: str, target: Any) -> None:
        if not path.startswith("/"):
            raise ValueError(f"route {path!r} must start with '/'")
        pattern = re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(path))
        # a later registration of the same path replaces the earlier one (e.g. /healthz)
        self._routes = [r for r in self._routes if r[0].pattern != f"^{pattern}$"]
        self._routes.append((re.compile(f"^{pattern}$"), kind, target))

    def match(self, path: str) -> tuple[str, Any, dict[str, str]] | None:
        for regex, kind, target in self._routes:
            m = regex.match(path)
            if m:
                return kind, target, m.groupdict()
        return None

    def _healthz(self, request: Request) -> dict[str, Any]:
        server = self.server
        return {"status": "ok", "pid": os.getpid(),
                "connections": len(self.hub.sessions), **(server.stats if server else {})}


class HttpProtocol(asyncio.Protocol):
    """Reads one HTTP request head, then answers it or upgrades to a Session."""

    __slots__ = ("_server", "_transport", "_parser", "_timer", "_upgraded")

    def __init__(self, server: Server) -> None:
        self._server = server
        cfg = server.config
        self._parser = HeadParser(max_head_size=cfg.max_head_size, max_headers=cfg.max_headers)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._server.handshaking += 1
        self._timer = self._server.loop.call_later(self._server.config.handshake_timeout, self._timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self._upgraded:
            self._server.handshaking -= 1

    def _timed_out(self) -> None:
        self._timer = None
        self._reply(http_response(408, f"request head not received within "
                                       f"{self._server.config.handshake_timeout:g} s\n"))

    def data_received(self, data: bytes) -> None:
        if self._upgraded or self._transport is None or self._transport.is_closing():
            return
        try:
            request = self._parser.feed(data)
        except HandshakeError as err:
            self._server.stats["handshake_failures"] += 1
            self._reply(error_response(err))
            return
        if request is not None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._dispatch(request)

    def _reply(self, response: bytes) -> None:
        assert self._transport is not None
        self._transport.write(response)
        self._transport.close()

    def _dispatch(self, request: Request) -> None:
        server = self._server
        route = server.app.match(request.path)
        if route is None:
            self._reply(http_response(404, f"no route for {request.path}\n"))
            return
        kind, target, params = route
        if kind == "http":
            self._reply(server.http_answer(target, request))
            return
        try:
            if not is_websocket_upgrade(request):
                raise HandshakeError(426, f"{request.path} is a WebSocket endpoint: send an Upgrade: websocket "
                                          "request", [("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")])
            cfg = server.config
            if cfg.max_connections and len(server.hub.sessions) >= cfg.max_connections:
                raise HandshakeError(503, f"server is at its limit of {cfg.max_connections} connections",
                                     [("Retry-After", "5")])
            accepted = accept(request, subprotocols=cfg.subprotocols, select_subprotocol=cfg.select_subprotocol,
                              allowed_origins=cfg.allowed_origins, deflate=cfg.deflate,
                              max_message_size=cfg.max_message_size)
        except HandshakeError as err:
            server.stats["handshake_failures"] += 1
            self._reply(error_response(err))
            return
        except Exception:  # e.g. a select_subprotocol hook that raised
            log.exception("error while accepting a WebSocket upgrade on %s", request.path)
            self._reply(http_response(500, "internal server error\n"))
            return
        transport = self._transport
        assert transport is not None
        self._upgraded = True
        server.handshaking -= 1
        transport.write(accepted.response)
        request.headers = request.headers.packed()  # kept for the session's life: keep it small
        session = Session(server, request, server.client_address(transport, request),
                          accepted.subprotocol, accepted.deflate)
        initial = self._parser.rest
        self._parser = self._transport = None  # type: ignore[assignment]  # the session owns the connection now
        server.open_session(session, transport, kind, target, params, initial)


class Server:
    """Serves one App in this process: listening sockets, sessions, keepalive, shutdown."""

    def __init__(self, app: App, config: Config | None = None) -> None:
        self.app = app
        self.config = config or Config()
        self.hub = app.hub
        app.server = self
        self.loop = asyncio.get_running_loop()
        self.handshaking = 0
        self.stats = {"connections_total": 0, "handshake_failures": 0, "protocol_errors": 0,
                      "handler_errors": 0, "slow_consumers": 0, "keepalive_timeouts": 0}
        self._servers: list[asyncio.AbstractServer] = []
        self._next_id = 0
        self._keepalive: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()

    def next_session_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # -- listening ---------------------------------------------------------------

    async def listen(self, host: str = "127.0.0.1", port: int = 8000, *, sock: socket.socket | None = None,
                     reuse_port: bool = False, backlog: int = 4096) -> list[tuple[str, int]]:
        """Start accepting; returns the bound addresses."""
        if self.config.transport == "aiofastnet":
            import aiofastnet

            create_server = functools.partial(aiofastnet.create_server, self.loop)
        else:
            create_server = self.loop.create_server
        if sock is not None:
            srv = await create_server(lambda: HttpProtocol(self), sock=sock, backlog=backlog)
        else:
            srv = await create_server(lambda: HttpProtocol(self), host, port,
                                      reuse_port=reuse_port or None, backlog=backlog)
        self._servers.append(srv)
        if self._keepalive is None:
            self._keepalive = self.loop.create_task(self._keepalive_loop())
            backplane = self.hub.backplane
            if backplane is not None and hasattr(backplane, "start"):
                await backplane.start()
        return [s.getsockname()[:2] for s in srv.sockets]

    # -- sessions ----------------------------------------------------------------

    def client_address(self, transport: asyncio.BaseTransport, request: Request) -> str:
        peer = transport.get_extra_info("peername")
        host = peer[0] if peer else "unknown"
        if not self.config.is_trusted_proxy(host):
            return host
        # Walk X-Forwarded-For from the right: the first hop we do not trust is the client.
        hops = [h.strip() for value in request.headers.get_all("x-forwarded-for") for h in value.split(",")]
        for hop in reversed([h for h in hops if h]):
            if not self.config.is_trusted_proxy(hop):
                return hop
        return request.headers.get("x-real-ip") or host

    def open_session(self, session: Session, transport: asyncio.Transport, kind: str, target: Any,
                     params: dict[str, str], initial: bytes) -> None:
        self.stats["connections_total"] += 1
        self.hub.add(session)
        if kind == "handler":
            session.attach(transport, None, None, queued=True)
            session._queue_task = self.loop.create_task(self._run_handler(session, target))
            session.data_received(initial)
            return
        endpoint = target()
        endpoint.session = session
        endpoint.hub = self.hub
        endpoint.params = params
        on_message = endpoint.on_message
        open_result = None
        async_open = inspect.iscoroutinefunction(endpoint.on_open)
        session.attach(transport, endpoint, on_message,
                       queued=async_open or inspect.iscoroutinefunction(on_message))
        if async_open:
            session._queue_task = self.loop.create_task(self._open_async(session, endpoint))
        else:
            try:
                open_result = endpoint.on_open()
            except Exception as exc:
                self.handler_error(session, exc)
                return
        del open_result
        session.data_received(initial)

    async def _open_async(self, session: Session, endpoint: Endpoint) -> None:
        try:
            await endpoint.on_open()
        except Exception as exc:
            self.handler_error(session, exc)
            return
        finally:
            session._queue_task = None
        if session._queue and session._queue_handler is not None:
            session._queue_task = self.loop.create_task(session._run_queue(session._queue_handler))

    async def _run_handler(self, session: Session, handler: Handler) -> None:
        try:
            await handler(session)
        except Exception as exc:
            self.handler_error(session, exc)
        else:
            session.close(CloseCode.NORMAL)

    def handler_error(self, session: Session, exc: BaseException) -> None:
        """User code raised: log it, tell on_error, close with 1011 (never re-raise into the loop)."""
        from fastws.errors import ConnectionClosed

        if isinstance(exc, ConnectionClosed):
            return  # sending on a closed session inside a handler: not an application error
        self.stats["handler_errors"] += 1
        log.error("error in handler for %s", session.request.path, exc_info=exc)
        endpoint = session.endpoint
        if endpoint is not None:
            try:
                result = endpoint.on_error(exc)
                if inspect.iscoroutine(result):
                    self.loop.create_task(result)
            except Exception:
                log.exception("error in on_error")
        session.close(CloseCode.INTERNAL_ERROR, "internal server error")

    def session_closed(self, session: Session, code: int, reason: str) -> None:
        """Called once per session when its TCP connection is gone."""
        self.hub.remove(session)
        if code == CloseCode.PROTOCOL_ERROR or code == CloseCode.INVALID_DATA:
            self.stats["protocol_errors"] += 1
        if not self.hub.sessions:
            self._closed.set()
        endpoint = session.endpoint
        if endpoint is None:
            return
        try:
            result = endpoint.on_close(code, reason)
            if inspect.iscoroutine(result):
                self.loop.create_task(result)
        except Exception:
            log.exception("error in on_close for %s", session.request.path)

    def http_answer(self, handler: HttpHandler, request: Request) -> bytes:
        try:
            result = handler(request)
        except Exception:
            log.exception("error in HTTP handler for %s", request.path)
            return http_response(500, "internal server error\n")
        if isinstance(result, Response):
            return http_response(result.status, result.body, headers=result.headers,
                                 content_type=result.content_type)
        if isinstance(result, dict):
            return http_response(200, json.dumps(result), content_type="application/json")
        if isinstance(result, str) and result.lstrip().startswith("<"):
            return http_response(200, result, content_type="text/html; charset=utf-8")
        return http_response(200, result)

    # -- keepalive ---------------------------------------------------------------

    async def _keepalive_loop(self) -> None:
        """One sweep over all sessions instead of a timer per connection.

        Any bytes received mark a session active; a session silent for
        ping_interval gets a ping, and one still silent ping_timeout later is
        closed.  An idle_timeout counts data messages only.
        """
        cfg = self.config
        periods = [p for p in (cfg.ping_interval, cfg.ping_timeout, cfg.idle_timeout) if p]
        tick = max(0.05, min(periods) / 4) if periods else 1.0
        while True:
            await asyncio.sleep(tick)
            now = self.loop.time()
            for session in list(self.hub.sessions.values()):
                self._check_liveness(session, now)

    def _check_liveness(self, session: Session, now: float) -> None:
        cfg = self.config
        if session.closed:
            return
        reads = session._reader.reads if session._reader is not None else 0
        if reads != session._seen_reads:  # any bytes from the peer since the last sweep
            session._seen_reads = reads
            session._last_active = now
            session._ping_sent = 0.0
        elif session._ping_sent:
            if now - session._ping_sent >= cfg.ping_timeout:
                self.stats["keepalive_timeouts"] += 1
                session._fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                return
        elif cfg.ping_interval and now - session._last_active >= cfg.ping_interval:
            session.ping()
            session._ping_sent = now
        if cfg.idle_timeout:
            reader = session._reader
            if reader is not None and reader.messages != session._seen_messages:
                session._seen_messages = reader.messages
                session._last_message = now
            elif now - session._last_message >= cfg.idle_timeout:
                session.close(CloseCode.GOING_AWAY, "idle timeout")

    # -- shutdown ----------------------------------------------------------------

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, close every session with 1001, wait for them (bounded), drop the rest."""
        for srv in self._servers:
            srv.close()
        for session in list(self.hub.sessions.values()):
            session.close(CloseCode.GOING_AWAY, "server shutting down")
        timeout = self.config.drain_timeout if timeout is None else timeout
        if self.hub.sessions:
            self._closed.clear()
            try:
                await asyncio.wait_for(self._closed.wait(), timeout)
            except asyncio.TimeoutError:
                for session in list(self.hub.sessions.values()):
                    session.abort()
        if self._keepalive is not None:
            self._keepalive.cancel()
        backplane = self.hub.backplane
        if backplane is not None and hasattr(backplane, "close"):
            await backplane.close()
        for srv in self._servers:
            await srv.wait_closed()


# -- running ---------------------------------------------------------------------


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def serve(app: App, host: str = "127.0.0.1", port: int = 8000, *, config: Config | None = None,
                reuse_port: bool = False, ready: Callable[[list[tuple[str, int]]], None] | None = None) -> None:
    """Serve ``app`` until SIGINT/SIGTERM, then shut down gracefully."""
    server = Server(app, config)
    addresses = await server.listen(host, port, reuse_port=reuse_port)
    log.info("fastws %d listening on %s", os.getpid(), ", ".join(f"http://{h}:{p}" for h, p in addresses))
    if ready:
        ready(addresses)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        server.loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("fastws %d shutting down: closing %d connections", os.getpid(), len(server.hub.sessions))
    await server.shutdown()


EXIT_CANNOT_LISTEN = 3  # a worker's exit status when its socket could not be opened


def run(app: App, host: str = "127.0.0.1", port: int = 8000, *, workers: int = 1,
        config: Config | None = None) -> int:
    """Run ``app`` until SIGINT/SIGTERM; returns the process exit status.

    With workers > 1, that many processes share the port (SO_REUSEPORT); this
    process supervises them: it forwards SIGINT/SIGTERM, restarts a worker
    that crashes (giving up if they crash in a loop), and stops everything
    if a worker cannot listen.  Raises OSError if the port cannot be opened
    (workers == 1).
    """
    if workers <= 1:
        _run_one(app, host, port, config, reuse_port=False)
        return 0
    master = os.getpid()
    children: dict[int, int] = {}
    crashes: list[float] = []
    stopping = False
    status = 0

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            _become_worker(master)
            code = 0
            try:
                _run_one(app, host, port, config, reuse_port=True)
            except OSError as exc:
                print(f"fastws: worker {index} cannot listen on {host}:{port}: {exc.strerror or exc}",
                      file=sys.stderr)
                code = EXIT_CANNOT_LISTEN
            except BaseException:
                log.exception("worker %d failed", index)
                code = 1
            finally:
                os._exit(code)
        children[pid] = index

    def stop_all(signum: int = signal.SIGTERM, frame: Any = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGTERM, stop_all)
    for i in range(workers):
        spawn(i)
    log.info("fastws master %d started %d workers", master, workers)
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        if index is None or stopping:
            continue
        code = os.waitstatus_to_exitcode(wait_status)
        if code == EXIT_CANNOT_LISTEN:
            status = 1
            stop_all()
            continue
        now = time.monotonic()
        crashes = [t for t in crashes if now - t < 10.0] + [now]
        if len(crashes) > 2 * workers:
            log.error("workers keep crashing (%d in 10 s): giving up", len(crashes))
            status = 1
            stop_all()
            continue
        log.warning("worker %d (pid %d) exited with status %d; restarting", index, pid, code)
        time.sleep(0.2 * len(crashes))  # back off while it keeps failing
        spawn(index)
    return status


def _become_worker(master: int) -> None:
    """In a freshly forked worker: default signals, and die with the master."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM us if the master dies
        except (OSError, AttributeError):  # pragma: no cover - exotic libc
            pass
    if os.getppid() != master:  # the master died before prctl took effect
        os._exit(0)


def _run_one(app: App, host: str, port: int, config: Config | None, reuse_port: bool) -> None:
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve(app, host, port, config=config, reuse_port=reuse_port))
    finally:
        loop.close()
        if sys.stdout:
            sys.stdout.flush()
