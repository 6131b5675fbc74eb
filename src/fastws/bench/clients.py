"""Opening many client connections (WebSocket or raw TCP) with bounded concurrency."""

from __future__ import annotations

import asyncio
import collections
import functools
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastws.bench.common import Histogram, RawEcho, Target, classify_error
from fastws.client import ClientConnection, connect

DISCARD: Callable[[Any], None] = collections.deque(maxlen=0).append  # a C callable that drops its argument


TRANSPORTS = ("uvloop", "aiofastnet")
_transport = "uvloop"


def set_transport(name: str) -> None:
    """Which transports the client sockets use (set in the parent before the workers fork)."""
    if name not in TRANSPORTS:
        raise ValueError(f"unknown client transport {name!r}")
    if name == "aiofastnet":
        import aiofastnet  # noqa: F401 - fail here, with a clear message, if it is missing
    global _transport
    _transport = name


def _create_connection() -> Callable[..., Any]:
    loop = asyncio.get_running_loop()
    if _transport == "aiofastnet":
        import aiofastnet

        return functools.partial(aiofastnet.create_connection, loop)
    return loop.create_connection


async def open_ws(
    target: Target,
    *,
    local_addr: tuple[str, int] | None = None,
    on_message: Callable[[Any], Any] | None = None,
    on_close: Callable[[int, str], Any] | None = None,
    max_message_size: int = 0,
    compression: bool = False,
    open_timeout: float = 10.0,
    coalesce: bool = True,
) -> ClientConnection:
    return await connect(
        target.url,
        local_addr=local_addr,
        on_message=on_message,
        on_close=on_close,
        max_message_size=max_message_size,
        compression=compression,
        open_timeout=open_timeout,
        close_timeout=2.0,
        coalesce=coalesce,
        create_connection=None if _transport == "uvloop" else _create_connection(),
    )


async def open_raw(
    target: Target, *, local_addr: tuple[str, int] | None = None, open_timeout: float = 10.0
) -> RawEcho:
    create = _create_connection()
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(open_timeout):
            _, proto = await create(RawEcho, target.host, target.port, local_addr=local_addr)
    else:  # pragma: no cover - Python 3.10
        _, proto = await asyncio.wait_for(
            create(RawEcho, target.host, target.port, local_addr=local_addr), open_timeout
        )
    return proto


def connector(target: Target, raw: bool, open_timeout: float, **ws_options: Any) -> Callable[[Any], Awaitable[Any]]:
    """``open_one(local_addr)`` for an Opener: a raw TCP stream, or a WebSocket with ``ws_options``."""
    if raw:
        return functools.partial(_open_raw_from, target, open_timeout)
    return functools.partial(_open_ws_from, target, open_timeout, ws_options)


async def _open_raw_from(target: Target, open_timeout: float, local: Any) -> Any:
    return await open_raw(target, local_addr=local, open_timeout=open_timeout)


async def _open_ws_from(target: Target, open_timeout: float, ws_options: dict[str, Any], local: Any) -> Any:
    return await open_ws(target, local_addr=local, open_timeout=open_timeout, **ws_options)


class Opener:
    """Opens ``n`` connections, ``concurrency`` handshakes at a time, spreading source addresses.

    Records per-connection open time (TCP connect + upgrade) in ``latency``,
    failures by cause in ``failures``, and (time, open count) points in ``timeline``.
    """

    def __init__(
        self,
        open_one: Callable[[tuple[str, int] | None], Awaitable[Any]],
        *,
        sources: Sequence[str] = (),
        concurrency: int = 100,
        max_failures: int = 1000,
        deadline: float | None = None,
        rate: float = 0.0,
        progress: Callable[[int], None] | None = None,
        source_offset: int = 0,
    ) -> None:
        self.open_one = open_one
        self.sources = list(sources)
        self.concurrency = max(1, concurrency)
        self.max_failures = max_failures
        self.deadline = deadline  # time.monotonic() after which no new attempt starts
        self.rate = rate  # connections per second across this opener; 0 = as fast as possible
        self.progress = progress
        self.source_offset = source_offset
        self.opened: list[Any] = []
        self.failures: collections.Counter[str] = collections.Counter()
        self.latency = Histogram()
        self.timeline: list[tuple[float, int]] = []
        self.started = 0.0
        self.finished = 0.0
        self.stopped_by = ""
        self.first_failure: dict[str, Any] | None = None
        self._next = 0

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    async def run(self, n: int) -> list[Any]:
        self.started = time.monotonic()
        self.timeline.append((0.0, 0))
        workers = [asyncio.ensure_future(self._worker(n)) for _ in range(min(self.concurrency, max(n, 1)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
        self.finished = time.monotonic()
        self.timeline.append((self.finished - self.started, len(self.opened)))
        if not self.stopped_by:
            self.stopped_by = "target reached" if len(self.opened) >= n else "attempts exhausted"
        return self.opened

    async def _worker(self, n: int) -> None:
        perf = time.perf_counter_ns
        while True:
            if self._next >= n or self.stopped_by:
                return
            i = self._next
            self._next += 1
            now = time.monotonic()
            if self.deadline is not None and now >= self.deadline:
                self.stopped_by = "ramp timeout"
                return
            if self.rate > 0:
                due = self.started + i / self.rate
                if due > now:
                    await asyncio.sleep(due - now)
            local = None
            if self.sources:
                local = (self.sources[(i + self.source_offset) % len(self.sources)], 0)
            t0 = perf()
            try:
                conn = await self.open_one(local)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                cause = classify_error(exc)
                self.failures[cause] += 1
                if self.first_failure is None:
                    self.first_failure = {
                        "cause": cause,
                        "error": str(exc)[:200],
                        "open": len(self.opened),
                        "t": round(time.monotonic() - self.started, 3),
                    }
                if self.failed >= self.max_failures:
                    self.stopped_by = f"{self.failed} failures"
                continue
            self.latency.record(perf() - t0)
            self.opened.append(conn)
            count = len(self.opened)
            if count % 256 == 0:
                self.timeline.append((time.monotonic() - self.started, count))
            if self.progress is not None:
                self.progress(count)


async def close_all(conns: Sequence[Any], timeout: float = 5.0) -> int:
    """Closing handshake on every WebSocket connection (abort raw ones); return how many did not finish."""
    waits: list[Awaitable[Any]] = []
    for c in conns:
        if isinstance(c, ClientConnection):
            if c.state != 3:
                try:
                    c.start_close(1000)
                except Exception:
                    c.abort()
                waits.append(c.wait_closed())
        elif isinstance(c, RawEcho):
            if c.transport is not None:
                c.transport.close()
            waits.append(asyncio.shield(c.closed))
    if not waits:
        return 0
    done, pending = await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=timeout)
    for c in conns:
        if isinstance(c, ClientConnection) and c.state != 3:
            c.abort()
        elif isinstance(c, RawEcho) and c.transport is not None and not c.closed.done():
            c.transport.abort()
    for p in pending:
        p.cancel()
    return len(pending)
