"""The supervisor of ``--workers N``: fork the workers, forward signals, restart crashes, escalate.

The master blocks the signals it cares about and takes them one at a time
with ``sigtimedwait``, so none can be lost or race with a fork: a SIGTERM that
arrives between ``fork()`` and registering the child, or during a restart's
back-off, is simply the next thing the loop reads.  Restarts are scheduled, not
slept: stopping cancels them.  Workers that do not end within ``stop_timeout``
of the SIGTERM get SIGKILL; a second SIGINT/SIGTERM escalates at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable

log = logging.getLogger("fastws")

EXIT_CANNOT_LISTEN = 3  # a worker's exit status when its socket could not be opened
CRASH_WINDOW = 10.0  # seconds: crashes counted over this window
HANDLED = {signal.SIGCHLD, signal.SIGINT, signal.SIGTERM}


class Supervisor:
    """Runs ``worker()`` in ``count`` forked processes until told to stop (see the module docstring)."""

    def __init__(self, worker: Callable[[], None], count: int, *, host: str = "", port: int = 0,
                 stop_timeout: float = 15.0) -> None:
        self.worker = worker
        self.count = count
        self.where = f"{host}:{port}"
        self.stop_timeout = stop_timeout
        self.master = os.getpid()
        self.children: dict[int, int] = {}  # pid -> worker index
        self.restarts: dict[int, float] = {}  # worker index -> when to start it again
        self.crashes: list[float] = []
        self.stopping = False
        self.kill_at = 0.0
        self.status = 0

    def run(self) -> int:
        """Supervise until every worker has ended; the exit status for the master."""
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            for index in range(self.count):
                self._spawn(index, previous)
            log.info("fastws master %d started %d workers", self.master, self.count)
            while self.children or (self.restarts and not self.stopping):
                info = signal.sigtimedwait(HANDLED, self._wait_time())
                if info is None:
                    pass
                elif info.si_signo == signal.SIGCHLD:
                    self._reap()
                else:
                    self._stop(escalate=self.stopping)
                self._due_restarts(previous)
                if self.stopping and self.children and time.monotonic() >= self.kill_at:
                    self._kill(signal.SIGKILL, f"workers did not stop within {self.stop_timeout:g} s")
                    self.status = 1
                    self.kill_at = time.monotonic() + 1.0
            return self.status
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    # -- internals -------------------------------------------------------------------------

    def _wait_time(self) -> float:
        now = time.monotonic()
        times = [1.0]
        if self.restarts and not self.stopping:
            times.append(min(self.restarts.values()) - now)
        if self.stopping:
            times.append(self.kill_at - now)
        return max(0.01, min(times))

    def _spawn(self, index: int, mask: set[signal.Signals]) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                _become_worker(self.master, mask)
                self.worker()
            except OSError as exc:
                print(f"fastws: worker {index} cannot listen on {self.where}: {exc.strerror or exc}",
                      file=sys.stderr)
                code = EXIT_CANNOT_LISTEN
            except BaseException:
                log.exception("worker %d failed", index)
                code = 1
            finally:
                os._exit(code)
        self.children[pid] = index

    def _reap(self) -> None:
        while self.children:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            index = self.children.pop(pid, None)
            if index is None or self.stopping:
                continue
            code = os.waitstatus_to_exitcode(wait_status)
            if code == EXIT_CANNOT_LISTEN:
                self.status = 1
                self._stop()
                continue
            now = time.monotonic()
            self.crashes = [t for t in self.crashes if now - t < CRASH_WINDOW] + [now]
            if len(self.crashes) > 2 * self.count:
                log.error("workers keep crashing (%d in %g s): giving up", len(self.crashes), CRASH_WINDOW)
                self.status = 1
                self._stop()
                continue
            delay = 0.2 * len(self.crashes)  # back off while they keep failing
            log.warning("worker %d (pid %d) exited with status %d; restarting in %.1f s", index, pid, code, delay)
            self.restarts[index] = now + delay

    def _due_restarts(self, mask: set[signal.Signals]) -> None:
        if self.stopping:
            self.restarts.clear()
            return
        now = time.monotonic()
        for index, when in list(self.restarts.items()):
            if when <= now:
                del self.restarts[index]
                self._spawn(index, mask)

    def _stop(self, escalate: bool = False) -> None:
        if escalate:
            self._kill(signal.SIGKILL, "second stop signal")
            self.status = 1
            return
        self.stopping = True
        self.restarts.clear()
        self.kill_at = time.monotonic() + self.stop_timeout
        self._kill(signal.SIGTERM, "")

    def _kill(self, sig: signal.Signals, why: str) -> None:
        if why and self.children:
            log.warning("fastws master: %s: sending %s to %d workers", why, sig.name, len(self.children))
        for pid in list(self.children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _become_worker(master: int, mask: set[signal.Signals]) -> None:
    """In a freshly forked worker: the signal mask and handlers of a normal process; die with the master."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM us if the master dies
        except (OSError, AttributeError):  # pragma: no cover - exotic libc
            pass
    if os.getppid() != master:  # the master died before prctl took effect
        os._exit(0)
