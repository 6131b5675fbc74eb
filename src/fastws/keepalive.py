"""Keepalive for every session of a process, at a cost of O(sessions due), not O(sessions).

The work is fastws._frame.KeepaliveWheel's, in C: sessions wait in buckets
keyed by the tick at which they next need a look, a look at a session is a
comparison of two timestamps the wire core keeps, and a ping is a pre-built
frame written straight into the socket.  This class drives it from the event
loop: one timer per process, ticking every ``resolution`` seconds, which also
advances the clock that stamps every read; it closes what the wheel hands back
(timed-out and idle sessions) and counts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from fastws._frame import OP_PING, KeepaliveWheel, encode_frame, set_clock
from fastws.errors import CloseCode

if TYPE_CHECKING:
    from fastws.app import Config

log = logging.getLogger("fastws")

PING_FRAME = encode_frame(OP_PING, b"")  # built once for every ping of the process


class Keepalive:
    """The keepalive scheduler of one server process (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, config: Config, stats: dict[str, int]) -> None:
        self.loop = loop
        interval = config.ping_interval or None
        timeout = config.ping_timeout or None
        idle = config.idle_timeout or None
        periods = [p for p in (interval, timeout, idle) if p]
        self.resolution = min(1.0, max(0.05, min(periods) / 20)) if periods else 1.0
        self.enabled = bool(interval or idle)
        self.stats = stats
        self.wheel = KeepaliveWheel(self.resolution, loop.time(), interval=interval, timeout=timeout, idle=idle,
                                    ping=PING_FRAME)
        self._timer: asyncio.TimerHandle | None = None
        self._counted = 0
        set_clock(loop.time())

    def add(self, session: Any) -> None:
        if not self.enabled:
            return
        if self._timer is None:
            self._timer = self.loop.call_later(self.resolution, self._run)
        self.wheel.add(session, self.loop.time())

    def remove(self, session: Any) -> None:
        self.wheel.remove(session)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __len__(self) -> int:
        return self.wheel.size

    def _run(self) -> None:
        now = self.loop.time()
        set_clock(now)
        self._timer = self.loop.call_later(self.resolution, self._run)
        try:
            timed_out, idle = self.wheel.run(now)
        except Exception:  # a bug here must not stop keepalive for good
            log.exception("keepalive tick failed")
            return
        pings = self.wheel.pings
        self.stats["keepalive_pings"] += pings - self._counted
        self._counted = pings
        for session in timed_out:
            self.stats["keepalive_timeouts"] += 1
            try:
                session.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout", peer_alive=False)
            except Exception:  # one bad session must not stop keepalive for the others
                log.exception("closing %r after a keepalive timeout", session)
        for session in idle:
            try:
                session.close(CloseCode.GOING_AWAY, "idle timeout")
            except Exception:
                log.exception("closing idle %r", session)
