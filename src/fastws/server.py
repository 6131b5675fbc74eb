"""The server of one process: listening sockets, sessions, keepalive, the send budget, shutdown."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from fastws.app import App, Config
from fastws.errors import CloseCode, ProtocolError
from fastws.http import HttpProtocol
from fastws.keepalive import Keepalive
from fastws.logs import Throttle

if TYPE_CHECKING:
    from fastws.connection import Session

log = logging.getLogger("fastws")


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
        self._tasks: set[asyncio.Task[Any]] = set()  # application code we started: referenced until done
        self._next_id = 0
        self._started = False
        self._stopping = False
        self._all_gone = asyncio.Event()
        self._all_gone.set()
        # the send budget: bytes held for peers whose transports are paused (slow readers)
        self._unsent: dict[Session, int] = {}
        self.unsent_bytes = 0
        self._throttle = Throttle(log)

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
                     reuse_port: bool = False, backlog: int = 4096) -> list[tuple[str, int]]:
        """Start accepting; returns the bound addresses."""
        if self.config.transport == "aiofastnet":
            import aiofastnet

            create_server = functools.partial(aiofastnet.create_server, self.loop)
        else:
            create_server = self.loop.create_server
        factory = functools.partial(HttpProtocol, self)
        if sock is not None:
            srv = await create_server(factory, sock=sock, backlog=backlog)
        else:
            srv = await create_server(factory, host, port, reuse_port=reuse_port or None, backlog=backlog)
        self._servers.append(srv)
        if not self._started:
            self._started = True
            backplane = self.hub.backplane
            if backplane is not None and hasattr(backplane, "start"):
                await backplane.start()
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
        return True

    def http_ended(self, proto: HttpProtocol) -> None:
        self._http.discard(proto)

    def handshake_failed(self, status: int) -> None:
        self.stats["handshake_failures"] += 1

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
        if not self.hub.sessions:
            self._all_gone.set()

    def spawn(self, coro: Coroutine[Any, Any, Any] | Any) -> asyncio.Task[Any]:
        """Run application code as a task the server keeps a reference to (and cancels at shutdown)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def handler_error(self, session: Session, exc: BaseException, where: str) -> None:
        """User code raised: count it and log it once, with the traceback."""
        self.stats["handler_errors"] += 1
        log.error("error in %s for %s (session %d)", where, session.request.path, session.id, exc_info=exc)

    def protocol_error(self, session: Session, exc: ProtocolError) -> None:
        self.stats["protocol_errors"] += 1
        log.debug("session %d from %s: %s", session.id, session.remote, exc)

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

    # -- shutdown ----------------------------------------------------------------------------------

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, refuse what is in the HTTP phase, close every session with 1001, wait for
        them (at most ``timeout``, default drain_timeout), drop the rest, then stop our tasks."""
        self._stopping = True
        for srv in self._servers:
            srv.close()
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


async def serve(app: App, host: str = "127.0.0.1", port: int = 8000, *, config: Config | None = None,
                reuse_port: bool = False, ready: Callable[[list[tuple[str, int]]], None] | None = None) -> None:
    """Serve ``app`` until SIGINT/SIGTERM, then shut down gracefully."""
    server = Server(app, config)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        server.loop.add_signal_handler(sig, stop.set)
    addresses = await server.listen(host, port, reuse_port=reuse_port)
    log.info("fastws %d listening on %s", os.getpid(), ", ".join(f"http://{h}:{p}" for h, p in addresses))
    if ready:
        ready(addresses)
    await stop.wait()
    log.info("fastws %d shutting down: closing %d connections", os.getpid(), server.session_count)
    await server.shutdown()


def run(app: App, host: str = "127.0.0.1", port: int = 8000, *, workers: int = 1,
        config: Config | None = None) -> int:
    """Run ``app`` until SIGINT/SIGTERM; returns the process exit status.

    With workers > 1, that many processes share the port (SO_REUSEPORT) under
    a supervisor (fastws.workers).  Raises OSError if the port cannot be
    opened (workers == 1).
    """
    if workers <= 1:
        run_one(app, host, port, config, reuse_port=False)
        return 0
    from fastws.workers import Supervisor

    cfg = config or Config()
    return Supervisor(functools.partial(run_one, app, host, port, cfg, True), workers, host=host, port=port,
                      stop_timeout=cfg.drain_timeout + cfg.close_timeout).run()


def run_one(app: App, host: str, port: int, config: Config | None, reuse_port: bool) -> None:
    """One server process: serve until signalled, then end every task before closing the loop."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve(app, host, port, config=config, reuse_port=reuse_port))
    finally:
        try:
            _cancel_remaining(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
            if sys.stdout:
                sys.stdout.flush()


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.wait(tasks, timeout=2.0))
