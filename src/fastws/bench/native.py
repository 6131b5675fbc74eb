"""The bench client's own connections: the Cython engine (``_loadgen``) set up from a target, under asyncio.

``open_engine()`` builds the engine of one client process: the upgrade
request, the data message as one pre-masked frame (with ``compression``,
deflated once, as a browser would, and sent with RSV1), its payload (to check
the first echo) and a small probe message.  ``NativeClient`` runs it inside the
worker's event loop (the engine's epoll descriptor is one reader of the loop;
a 20 ms ticker handles timeouts and paced ramps) and lets coroutines wait for
a condition on the engine's counters without polling.  Measured windows call
``run_window()``, which leaves the event loop aside and waits in the engine's
own ``epoll_wait``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import zlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from fastws.bench.common import BenchError, Histogram, Target, raise_nofile

try:
    from fastws.bench import _loadgen
except ImportError:  # pragma: no cover - not built (non-Linux): the legacy client path remains
    _loadgen = None  # type: ignore[assignment]

OP_TEXT, OP_BINARY = 0x1, 0x2
PROBE = b"fastws-bench probe"
TICK = 0.02  # seconds between timeout checks / paced connection starts
# --compression: what the upgrade offers, and how the data message is deflated (zlib's default level,
# as browsers do; a 12-bit window, as offered, so that any server's inflater takes it)
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits=12"
DEFLATE_LEVEL, DEFLATE_WBITS = 6, 12


def available() -> bool:
    return _loadgen is not None


def upgrade_request(url: str, compression: bool = False) -> bytes:
    """The client's upgrade request for ``url``, with the key left as 24 'K's for the engine to fill in."""
    parts = urlsplit(url)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname or ""
    shown = f"[{host}]" if ":" in host else host
    default_port = 443 if parts.scheme == "wss" else 80
    host_header = shown if (parts.port or default_port) == default_port else f"{shown}:{parts.port}"
    return (
        f"GET {resource} HTTP/1.1\r\n"
        f"Host: {host_header}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {'K' * 24}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        + (f"Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n" if compression else "")
        + "\r\n"
    ).encode("latin-1")


def deflate_message(data: bytes) -> bytes:
    """``data`` as one permessage-deflate message (RFC 7692 7.2.1: the 00 00 ff ff tail removed)."""
    compressor = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -DEFLATE_WBITS)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return out[:-4] if out.endswith(b"\x00\x00\xff\xff") else out


def resolve(host: str, port: int) -> str:
    """The IP address to connect to (the first one the resolver gives)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BenchError(f"cannot resolve {host!r}: {exc}") from None
    return str(infos[0][4][0])


def open_engine(
    target: Target,
    *,
    raw: bool = False,
    payload: str | bytes = b"",
    inflight: int = 1,
    sources: list[str] | tuple[str, ...] = (),
    source_offset: int = 0,
    open_timeout: float = 10.0,
    close_timeout: float = 5.0,
    read_buffer: int = 0,
    compression: bool = False,
) -> Any:
    """The engine of one client process for ``target``; ``payload`` is the data message (str: text).
    ``compression``: offer permessage-deflate, require it, and send the message compressed."""
    if _loadgen is None:
        raise BenchError("the bench client's Cython engine (fastws.bench._loadgen) is not built")
    data = payload.encode() if isinstance(payload, str) else bytes(payload)
    mask = os.urandom(4)
    if raw:
        frame, probe = data, PROBE
    else:
        opcode = OP_TEXT if isinstance(payload, str) else OP_BINARY
        if not data:
            frame = b""
        elif compression:
            frame = _loadgen.build_frame(opcode, deflate_message(data), mask, rsv1=True)
        else:
            frame = _loadgen.build_frame(opcode, data, mask)
        probe = _loadgen.build_frame(OP_BINARY, PROBE, mask)
    return _loadgen.Engine(
        resolve(target.host, target.port),
        target.port,
        request=None if raw else upgrade_request(target.url, compression),
        sources=list(sources),
        source_offset=source_offset,
        mask=mask,
        frame=frame,
        payload=data,
        inflight=inflight,
        probe=probe,
        max_fds=raise_nofile(),
        deflate_bits=DEFLATE_WBITS if compression and not raw else 0,
        read_buffer=read_buffer or 1 << 18,
        open_timeout=open_timeout,
        close_timeout=close_timeout,
    )


def histogram(engine: Any, name: str) -> Histogram:
    """One of the engine's histograms (ns) as a fastws.bench Histogram."""
    data = engine.histogram(name)
    return Histogram.from_indexed(data["indexed"], data["min"], data["max"], data["sum"])


class NativeClient:
    """Runs an engine in the running event loop; ``await wait(predicate)`` wakes when it holds."""

    def __init__(self, engine: Any, on_tick: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.on_tick = on_tick
        self._loop = asyncio.get_running_loop()
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._loop.add_reader(engine.fileno(), self._events)
        self._ticker: asyncio.TimerHandle | None = self._loop.call_later(TICK, self._tick)

    def _events(self) -> None:
        self.engine.poll(0)
        if self._waiters:
            self._wake()

    def _tick(self) -> None:
        self.engine.tick()
        if self.on_tick is not None:
            self.on_tick()
        self._wake()
        self._ticker = self._loop.call_later(TICK, self._tick)

    def _wake(self) -> None:
        for predicate, fut in self._waiters:
            if not fut.done() and predicate():
                fut.set_result(None)

    async def wait(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Until predicate() is true (checked after every batch of events and every tick): False on timeout."""
        if predicate():
            return True
        fut: asyncio.Future[None] = self._loop.create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            self._waiters.remove(entry)

    def run_window(self, until: float, progress: Callable[[], None] | None = None, **limits: int) -> None:
        """Handle events in the engine's own epoll_wait until time.monotonic() reaches ``until`` or a limit
        (max_received / max_round_trips / max_cycles) is reached; ``progress`` about 5 times a second."""
        engine = self.engine
        while True:
            now = time.monotonic()
            if now >= until:
                break
            engine.run_until(min(until, now + 0.2), **limits)
            if progress is not None:
                progress()
            if (
                limits.get("max_received") and engine.received >= limits["max_received"]
                or limits.get("max_round_trips") and engine.round_trips >= limits["max_round_trips"]
                or limits.get("max_cycles") and engine.cycles >= limits["max_cycles"]
            ):
                break

    async def close(self, timeout: float = 5.0) -> None:
        """Closing handshake on every connection, then stop running the engine."""
        self.engine.close_all()
        await self.wait(lambda: self.engine.live == 0 and self.engine.in_progress == 0, timeout)
        self.engine.abort_all()
        self.detach()

    def detach(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
            self._loop.remove_reader(self.engine.fileno())


# The engine's modes (what it does with each whole message).
if _loadgen is not None:
    HOLD, ECHO, PINGPONG, SUBSCRIBE, CYCLE = (
        _loadgen.HOLD, _loadgen.ECHO, _loadgen.PINGPONG, _loadgen.SUBSCRIBE, _loadgen.CYCLE
    )
else:  # pragma: no cover
    HOLD, ECHO, PINGPONG, SUBSCRIBE, CYCLE = range(5)


def use_native(args: Any, target: Target, ui: Any = None) -> bool:
    """Whether this run goes through the engine; if not (wss://, another client transport asked for)
    the legacy client runs, and the UI says why when the engine was the default."""
    if getattr(args, "client_transport", "native") != "native":
        return False
    reason = ""
    if not available():
        reason = "the Cython engine is not built"
    elif target.url.lower().startswith("wss://"):
        reason = "wss:// (the engine has no TLS)"
    if reason and ui is not None:
        ui.note(f"using the legacy client (fastws.client on uvloop): {reason}")
    return not reason
