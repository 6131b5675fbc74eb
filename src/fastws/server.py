"""The server of one process: listening sockets, sessions, keepalive, the send budget, shutdown."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine
from types import CoroutineType
from typing import TYPE_CHECKING, Any

from fastws.app import App, Config
from fastws.deflate import describe as describe_deflate
from fastws.errors import CloseCode, ProtocolError
from fastws.http import HttpProtocol
from fastws.keepalive import Keepalive
from fastws.logs import Throttle, access, log_session

if TYPE_CHECKING:
    from fastws.connection import Session

log = logging.getLogger("fastws")
KEEPALIVE_TIMEOUT = (CloseCode.INTERNAL_ERROR, "keepalive ping timeout")


class Server:
    """Serves one App in this process: listening sockets, sessions, keepalive, shutdown."""

    def __init__(self, app: App, config: Config | None = None) -> None:
        self.app = app
        self.config = config or Config()
        self.hub = app.hub
        app.server = self
        self.loop = asyncio.get_running_loop()
        self.stats = {"connections_total": 0, "handshake_failures": 0, "protocol_errors": 0,
                      "handler_errors": 0, "slow_consumers": 0, "send_budget_cutoffs": 0,
                      "keepalive_pings": 0, "keepalive_timeouts": 0, "pending_handshakes_refused": 0}
        self.keepalive = Keepalive(self.loop, self.config, self.stats)
        self._servers: list[asyncio.AbstractServer] = []
        self._http: set[HttpProtocol] = set()  # connections still in the HTTP phase
        # application code we started, referenced until done -> what to call when it is
        self._tasks: dict[asyncio.Task[Any], Callable[[asyncio.Task[Any]], Any] | None] = {}
        self._task_done_callback = self._task_done  # one bound method for every task
        # ... run in one context of their own: add_done_callback would copy one per task (64 B)
        self._task_done_context = contextvars.Context()
        self._next_id = 0
        self._started = False
        self._stopping = False
        self._all_gone = asyncio.Event()
        self._all_gone.set()
        # the send budget: bytes held for peers whose transports are paused (slow readers)
        self._unsent: dict[Session, int] = {}
        self.unsent_bytes = 0
        self._throttle = Throttle(log)
        self._http_sweep: asyncio.TimerHandle | None = None
        cfg = self.config
        self._sweep_every = min(1.0, max(0.05, min(cfg.handshake_timeout, cfg.keepalive_timeout) / 4))
        self._per_address: dict[str, int] = {}  # sessions (and upgrades in progress) per client address
        self.access_log = cfg.access_log  # the access lines are written (the logger may still drop them)
        self.metrics = None
        self._worker_metrics = None
        if cfg.metrics:
            from fastws.metrics import ProcessMetrics

            self.metrics = ProcessMetrics()
            self.hub.on_fanout = self.metrics.fanout_done
            app.http("/metrics")(self._metrics_route)

    def next_session_id(self) -> int:
        self._next_id += 1
        return self._next_id

    @property
    def session_count(self) -> int:
        return len(self.hub.sessions)

    @property
    def pending_handshakes(self) -> int:
        return len(self._http)

    # -- listening -------------------------------------------------------------------------

    async def listen(self, host: str = "127.0.0.1", port: int = 8000, *, sock: socket.socket | None = None,
                     reuse_port: bool = False, backlog: int = 4096,
                     ssl: ssl.SSLContext | None = None) -> list[tuple[str, int]]:
        """Start accepting (TLS with ``ssl``: every route is then https:// and wss://); returns the
        bound addresses.  A port outside 0..65535 is a ValueError (the kernel would take it modulo
        65536)."""
        if sock is None:
            port = port_number(port)
        if self.config.transport == "aiofastnet":
            import aiofastnet

            create_server = functools.partial(aiofastnet.create_server, self.loop)
        else:
            create_server = self.loop.create_server
        factory = functools.partial(HttpProtocol, self)
        tls: dict[str, Any] = {}
        if ssl is not None:  # the TLS handshake is part of the handshake's time limit
            tls = {"ssl": ssl, "ssl_handshake_timeout": self.config.handshake_timeout}
        if sock is not None:
            srv = await create_server(factory, sock=sock, backlog=backlog, **tls)
        else:
            srv = await create_server(factory, host, port, reuse_port=reuse_port or None, backlog=backlog, **tls)
        self._servers.append(srv)
        if not self._started:
            self._started = True
            backplane = self.hub.backplane
            if backplane is not None and hasattr(backplane, "start"):
                await backplane.start()
            if self.metrics is not None and self.config.metrics_dir:
                from fastws.metrics import WorkerMetrics

                self._worker_metrics = WorkerMetrics(self, self.config.metrics_dir)
                await self._worker_metrics.start()
        return [s.getsockname()[:2] for s in srv.sockets]

    # -- the HTTP phase ------------------------------------------------------------------------

    def http_started(self, proto: HttpProtocol) -> bool:
        """A connection entered the HTTP phase; False when it must be refused (too many, or stopping)."""
        if self._stopping:
            return False
        if len(self._http) >= self.config.max_pending_handshakes:
            self.stats["pending_handshakes_refused"] += 1
            return False
        self._http.add(proto)
        if self._http_sweep is None:
            self._http_sweep = self.loop.call_later(self._sweep_every, self._sweep_http)
        return True

    def http_ended(self, proto: HttpProtocol) -> None:
        self._http.discard(proto)

    def _sweep_http(self) -> None:
        """One timer for the whole HTTP phase (not one per connection): time out what is late."""
        now = self.loop.time()
        for proto in [p for p in self._http if p.deadline <= now]:
            try:
                proto.timed_out()
            except Exception:  # one broken connection must not stop the sweep
                log.exception("timing out %r", proto)
        self._http_sweep = self.loop.call_later(self._sweep_every, self._sweep_http) if self._http else None

    def handshake_failed(self, status: int) -> None:
        self.stats["handshake_failures"] += 1
        if self.metrics is not None:
            self.metrics.rejected[status] += 1

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- connections per client address ------------------------------------------------------

    def claim_address(self, remote: str) -> bool:
        """An upgrade from ``remote`` may go on (max_connections_per_ip); it counts until
        release_address (a refusal) or its session is gone."""
        held = self._per_address.get(remote, 0)
        if held >= self.config.max_connections_per_ip:
            return False
        self._per_address[remote] = held + 1
        return True

    def release_address(self, remote: str) -> None:
        held = self._per_address.get(remote, 0) - 1
        if held > 0:
            self._per_address[remote] = held
        else:
            self._per_address.pop(remote, None)

    # -- sessions ------------------------------------------------------------------------------

    def session_opened(self, session: Session) -> None:
        """A session's endpoint or handler exists: it joins the hub and keepalive."""
        self.stats["connections_total"] += 1
        self.hub.add(session)
        self.keepalive.add(session)
        self._all_gone.clear()

    def session_gone(self, session: Session) -> None:
        """Its TCP connection is gone (called once per session, registered or not)."""
        self.hub.remove(session)
        self.keepalive.remove(session)
        self.writing_resumed(session)
        if self.config.max_connections_per_ip:
            self.release_address(session.remote)
        if session.sent_close == KEEPALIVE_TIMEOUT:  # what fastws.keepalive closes a silent peer with
            self._throttle.log(logging.INFO, "keepalive", "session %d from %s: no answer to a ping within %g s "
                               "(1011)", session.id, session.remote, self.config.ping_timeout)
        if self.metrics is not None:
            self.metrics.session_ended(session)
        if self.access_log and access.isEnabledFor(logging.INFO):
            log_session(session, self.loop.time())
        if not self.hub.sessions:
            self._all_gone.set()

    def spawn(self, coro: Coroutine[Any, Any, Any] | Any,
              done: Callable[[asyncio.Task[Any]], Any] | None = None) -> asyncio.Task[Any]:
        """Run application code as a task the server keeps a reference to (and cancels at shutdown);
        ``done(task)`` is called when it ends, in a context shared by the server's done callbacks
        (not a copy of the caller's)."""
        # a coroutine (every caller but on_error's awaitable) goes straight to the loop: ensure_future's
        # checks cost a few thousand instructions per handler connection
        task = self.loop.create_task(coro) if type(coro) is CoroutineType else asyncio.ensure_future(coro)
        self._tasks[task] = done
        task.add_done_callback(self._task_done_callback, context=self._task_done_context)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        done = self._tasks.pop(task, None)
        if done is not None:
            done(task)

    def handler_error(self, session: Session, exc: BaseException, where: str) -> None:
        """User code raised: count it and log it once, with the traceback."""
        self.stats["handler_errors"] += 1
        log.error("error in %s for %s (session %d)", where, session.request.path, session.id, exc_info=exc)

    def protocol_error(self, session: Session, exc: ProtocolError) -> None:
        self.stats["protocol_errors"] += 1
        self._throttle.log(logging.INFO, "protocol", "session %d from %s: protocol error %d: %s", session.id,
                           session.remote, exc.code, exc.reason)

    def slow_consumer(self, session: Session) -> None:
        self.stats["slow_consumers"] += 1
        self._throttle.log(logging.INFO, "slow", "session %d from %s: slow consumer cut off (%d bytes unsent)",
                           session.id, session.remote, session.write_buffer_size)

    # -- the send budget ------------------------------------------------------------------------

    def writing_paused(self, session: Session) -> None:
        self.unsent_changed(session, session.write_buffer_size)

    def writing_resumed(self, session: Session) -> None:
        """The peer caught up (or is gone): its bytes no longer count against the budget."""
        held = self._unsent.pop(session, None)
        if held is not None:
            self.unsent_bytes -= held

    def unsent_changed(self, session: Session, size: int) -> bool:
        """A paused session now holds ``size`` unsent bytes.  Past the process budget, the open
        sessions holding the most are cut off (1013) until what is left is within 90 % of it;
        True if ``session`` was one of them.  A session that was cut keeps counting until its
        connection is gone (at most close_timeout): its bytes are still in memory till then."""
        self.unsent_bytes += size - self._unsent.get(session, 0)
        self._unsent[session] = size
        budget = self.config.send_budget
        if not budget or self.unsent_bytes <= budget:
            return False
        cut_self = False
        excess = self.unsent_bytes - budget * 0.9
        for victim in sorted(self._unsent, key=self._unsent.__getitem__, reverse=True):
            if excess <= 0:
                break
            if victim.closed:
                continue
            held = self._unsent[victim]
            self.stats["send_budget_cutoffs"] += 1
            self._throttle.log(logging.WARNING, "budget", "process send budget of %d bytes exceeded: closing "
                               "session %d from %s, which holds %d unsent bytes", budget, victim.id,
                               victim.remote, held)
            victim.close(CloseCode.TRY_AGAIN_LATER, "server send budget exceeded")
            excess -= held
            cut_self = cut_self or victim is session
        return cut_self

    # -- /healthz --------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "connections": self.session_count,
                "pending_handshakes": self.pending_handshakes, "unsent_bytes": self.unsent_bytes, **self.stats}

    # -- /metrics --------------------------------------------------------------------------------

    def metrics_snapshot(self) -> dict[str, Any]:
        """This process's counters (fastws.metrics); metrics must be on."""
        assert self.metrics is not None
        return self.metrics.snapshot(self)

    async def _metrics_route(self, request: Any) -> Any:
        from fastws.app import Response
        from fastws.metrics import render

        if self._worker_metrics is not None:
            snapshot = await self._worker_metrics.gather()
        else:
            snapshot = self.metrics_snapshot()
        return Response(render(snapshot), content_type="text/plain; version=0.0.4; charset=utf-8")

    # -- shutdown ----------------------------------------------------------------------------------

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, refuse what is in the HTTP phase, close every session with 1001, wait for
        them (at most ``timeout``, default drain_timeout), drop the rest, then stop our tasks."""
        self._stopping = True
        for srv in self._servers:
            srv.close()
        if self._worker_metrics is not None:
            await self._worker_metrics.stop()
        for proto in list(self._http):
            proto.shutdown()
        for session in list(self.hub.sessions.values()):
            try:
                session.close(CloseCode.GOING_AWAY, "server shutting down")
            except Exception:  # one broken session must not stop the others' shutdown
                log.exception("closing %r at shutdown", session)
        timeout = self.config.drain_timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(self._all_gone.wait(), timeout)
        except asyncio.TimeoutError:
            for session in list(self.hub.sessions.values()):
                session.abort()
            try:  # aborting is immediate, but the transports report it a loop turn later
                await asyncio.wait_for(self._all_gone.wait(), 1.0)
            except asyncio.TimeoutError:
                log.warning("%d sessions still open after shutdown", self.session_count)
        self.keepalive.stop()
        if self._http_sweep is not None:
            self._http_sweep.cancel()
            self._http_sweep = None
        await self._stop_tasks()
        backplane = self.hub.backplane
        if backplane is not None and hasattr(backplane, "close"):
            await backplane.close()
        for srv in self._servers:
            await srv.wait_closed()

    async def _stop_tasks(self, grace: float = 1.0) -> None:
        """Give application tasks a moment to end by themselves, then cancel and await them."""
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace)


# -- running ------------------------------------------------------------------------------------


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def tls_context(certfile: str, keyfile: str | None = None, *, password: str | None = None) -> ssl.SSLContext:
    """A server TLS context for ``certfile`` (a PEM chain) and ``keyfile``: TLS 1.2+, HTTP/1.1 by ALPN."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile, password)
    context.set_alpn_protocols(["http/1.1"])
    context.options |= ssl.OP_NO_COMPRESSION
    return context


def port_number(port: int | str) -> int:
    """A TCP port, also as a string (an environment variable's); ValueError outside 0..65535 (the
    kernel would take it modulo 65536)."""
    number = int(port) if isinstance(port, str) and port.strip().isdigit() else port
    if not (isinstance(number, int) and 0 <= number <= 65535):
        raise ValueError(f"port must be a number from 0 to 65535, not {port!r}")
    return number


async def serve(app: App, host: str = "127.0.0.1", port: int = 8000, *, config: Config | None = None,
                reuse_port: bool = False, ready: Callable[[list[tuple[str, int]]], None] | None = None,
                ssl: ssl.SSLContext | None = None) -> None:
    """Serve ``app`` until SIGINT/SIGTERM, then shut down gracefully."""
    server = Server(app, config)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        server.loop.add_signal_handler(sig, stop.set)
    addresses = await server.listen(host, port, reuse_port=reuse_port, ssl=ssl)
    scheme = "https" if ssl is not None else "http"
    log.info("fastws %d listening on %s", os.getpid(), ", ".join(f"{scheme}://{h}:{p}" for h, p in addresses))
    if server.config.deflate.enabled:
        log.info("fastws %d: %s", os.getpid(), describe_deflate(server.config.deflate))
    if ready:
        ready(addresses)
    await stop.wait()
    log.info("fastws %d shutting down: closing %d connections", os.getpid(), server.session_count)
    await server.shutdown()


def run(app: App, host: str = "127.0.0.1", port: int = 8000, *, workers: int = 1,
        config: Config | None = None, ssl: ssl.SSLContext | None = None) -> int:
    """Run ``app`` until SIGINT/SIGTERM; returns the process exit status.

    With workers > 1, that many processes share the port (SO_REUSEPORT) under
    a supervisor (fastws.workers).  Raises OSError if the port cannot be
    opened (workers == 1), ValueError for a port outside 0..65535 or fewer than one worker.
    ``ssl``: serve TLS (see ``tls_context``).
    """
    if not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"workers must be at least 1, not {workers!r}")
    port = port_number(port)
    if workers == 1:
        run_one(app, host, port, config, False, ssl)
        return 0
    import dataclasses
    import shutil
    import tempfile

    from fastws.workers import Supervisor

    cfg = config or Config()
    made_dir = None
    if cfg.metrics and not cfg.metrics_dir:  # where the workers find each other for a scrape
        made_dir = tempfile.mkdtemp(prefix="fastws-metrics-")
        cfg = dataclasses.replace(cfg, metrics_dir=made_dir)
    try:
        return Supervisor(functools.partial(run_one, app, host, port, cfg, True, ssl), workers, host=host,
                          port=port, stop_timeout=cfg.drain_timeout + cfg.close_timeout).run()
    finally:
        if made_dir is not None:
            shutil.rmtree(made_dir, ignore_errors=True)


def run_one(app: App, host: str, port: int, config: Config | None, reuse_port: bool,
            ssl: ssl.SSLContext | None = None) -> None:
    """One server process: serve until signalled, then end every task before closing the loop."""
    keep_heap((config or Config()).malloc_trim_threshold)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve(app, host, port, config=config, reuse_port=reuse_port, ssl=ssl))
    finally:
        try:
            _cancel_remaining(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
            if sys.stdout:
                sys.stdout.flush()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit


def keep_heap(trim_threshold: int) -> bool:
    """Let glibc keep up to ``trim_threshold`` bytes of free heap instead of returning it at once.

    Its dynamic default trims the heap top past twice the biggest recent large allocation: a
    connection that echoes 1 MiB messages and still holds the last one (``async for message in
    ws``) then gets fresh, page-faulting memory for every message (measured: 0.80x the throughput
    of a sync on_message, 0.93x with this).  Allocations up to a quarter of it come from the heap.
    For the server process only (fastws serve, run()); 0, or a libc without mallopt: no change.
    """
    if trim_threshold <= 0 or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    big = min(trim_threshold // 4, MMAP_THRESHOLD_MAX)
    return bool(mallopt(M_MMAP_THRESHOLD, big)) and bool(mallopt(M_TRIM_THRESHOLD, min(trim_threshold, 2**31 - 1)))


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.wait(tasks, timeout=2.0))
