"""Keepalive for every session of a process, at a cost of O(sessions due), not O(sessions).

Sessions wait in buckets keyed by the tick at which they next need a look (a
hashed timer wheel with ``resolution``-second slots).  Each tick advances the
wire core's clock (which stamps every read), takes the buckets that are due,
applies fastws.protocol.keepalive_step to each session in them, and files it
again under its next time.  An idle connection is looked at about once per
ping interval; a busy one costs nothing per message (its reads only move a C
timestamp).  Pings are spread: each is scheduled a random 0-10 % early, so a
crowd that connected together does not ping together.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from typing import TYPE_CHECKING, Any

from fastws._frame import OP_PING, encode_frame, set_clock
from fastws.errors import CloseCode
from fastws.protocol import PING, TIMEOUT, keepalive_step

if TYPE_CHECKING:
    from fastws.app import Config
    from fastws.connection import Session

log = logging.getLogger("fastws")

JITTER = 0.1  # pings go out up to this fraction of the interval early
PING_FRAME = encode_frame(OP_PING, b"")  # built once for every ping of the process


class _Bucket:
    """The sessions due at one tick, as a doubly linked list threaded through the sessions
    themselves (their ka_prev / ka_next fields): filing and removing cost no allocation.
    ``ping_sent`` is when they were pinged (0: they were not)."""

    __slots__ = ("tick", "ping_sent", "first", "size")

    def __init__(self, tick: int, ping_sent: float) -> None:
        self.tick = tick
        self.ping_sent = ping_sent
        self.first: Session | None = None
        self.size = 0

    def add(self, session: Session) -> None:
        session.ka_bucket = self
        session.ka_prev = None
        session.ka_next = self.first
        if self.first is not None:
            self.first.ka_prev = session
        self.first = session
        self.size += 1

    def discard(self, session: Session) -> None:
        if session.ka_bucket is not self:
            return
        prev, nxt = session.ka_prev, session.ka_next
        if prev is None:
            self.first = nxt
        else:
            prev.ka_next = nxt
        if nxt is not None:
            nxt.ka_prev = prev
        session.ka_bucket = session.ka_prev = session.ka_next = None
        self.size -= 1

    def pop(self) -> Session | None:
        session = self.first
        if session is not None:
            self.discard(session)
        return session

    def __len__(self) -> int:
        return self.size


class Keepalive:
    """The keepalive scheduler of one server process (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, config: Config, stats: dict[str, int]) -> None:
        self.loop = loop
        self.ping_interval = config.ping_interval or None
        self.ping_timeout = config.ping_timeout
        self.idle_timeout = config.idle_timeout or None
        periods = [p for p in (self.ping_interval, self.ping_timeout, self.idle_timeout) if p]
        self.resolution = min(1.0, max(0.05, min(periods) / 20)) if periods else 1.0
        self.enabled = bool(self.ping_interval or self.idle_timeout)
        self._min_silence = self.ping_interval * (1.0 - JITTER) if self.ping_interval else None
        self.stats = stats
        self._buckets: dict[tuple[int, float], _Bucket] = {}
        self._due: dict[int, list[_Bucket]] = {}  # tick -> buckets due then
        self._tick = math.floor(loop.time() / self.resolution)
        self._timer: asyncio.TimerHandle | None = None
        set_clock(loop.time())

    # -- membership ---------------------------------------------------------------------

    def add(self, session: Session) -> None:
        if not self.enabled:
            return
        if self._timer is None:
            self._timer = self.loop.call_later(self.resolution, self._run)
        now = self.loop.time()
        when = self._next_ping(now, now)
        if self.idle_timeout:
            when = min(when, now + self.idle_timeout)
        self._file(session, when, 0.0)

    def remove(self, session: Session) -> None:
        bucket = session.ka_bucket
        if bucket is not None:
            bucket.discard(session)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    # -- the wheel ------------------------------------------------------------------------

    def _file(self, session: Session, when: float, ping_sent: float) -> None:
        tick = max(self._tick + 1, math.ceil(when / self.resolution))
        key = (tick, ping_sent)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(tick, ping_sent)
            self._due.setdefault(tick, []).append(bucket)
        bucket.add(session)

    def _next_ping(self, now: float, last_read: float) -> float:
        if not self.ping_interval:
            return math.inf
        return last_read + self.ping_interval * (1.0 - JITTER * random.random())

    def _run(self) -> None:
        now = self.loop.time()
        set_clock(now)
        self._timer = self.loop.call_later(self.resolution, self._run)
        target = math.floor(now / self.resolution)
        while self._tick < target:
            self._tick += 1
            for bucket in self._due.pop(self._tick, ()):
                del self._buckets[(bucket.tick, bucket.ping_sent)]
                while (session := bucket.pop()) is not None:
                    try:
                        self._check(session, now, bucket.ping_sent)
                    except Exception:  # one bad session must not stop keepalive for the others
                        log.exception("keepalive check failed for %r", session)

    def _check(self, session: Session, now: float, ping_sent: float) -> None:
        if session.closed:
            return  # its close deadline ends it
        if self.idle_timeout and now - session.last_message >= self.idle_timeout:
            session.close(CloseCode.GOING_AWAY, "idle timeout")
            return
        last_read = session.last_read
        # filed up to JITTER early: at its time, that much silence is enough for a ping
        action, when = keepalive_step(now, last_read, ping_sent, self._min_silence, self.ping_timeout)
        if action == TIMEOUT:
            self.stats["keepalive_timeouts"] += 1
            session.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout", peer_alive=False)
        elif action == PING:
            self.stats["keepalive_pings"] += 1
            session.send_frame(PING_FRAME)
            if not session.closed:  # look again when the next ping could be due, or the pong late
                assert self.ping_interval is not None
                self._file(session, now + min(self.ping_interval, self.ping_timeout or math.inf), now)
        elif ping_sent and last_read < ping_sent and self.ping_timeout is not None:  # the pong may still come
            self._file(session, ping_sent + self.ping_timeout, ping_sent)
        else:
            when = self._next_ping(now, last_read)
            if self.idle_timeout:
                when = min(when, session.last_message + self.idle_timeout)
            if when != math.inf:
                self._file(session, when, 0.0)

    def pending(self) -> Any:
        """(sessions filed, buckets) -- for tests and /healthz."""
        return len(self), len(self._buckets)
