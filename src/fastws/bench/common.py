"""Shared pieces of `fastws bench`: histogram, worker processes, raw TCP client, system facts."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import re
import resource
import shlex
import socket
import sys
import time
import traceback
from collections.abc import Callable, Coroutine, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from fastws.errors import HandshakeError

__all__ = [
    "BenchError",
    "Histogram",
    "parse_size",
    "format_size",
    "Target",
    "parse_target",
    "classify_error",
    "rss_bytes",
    "cpu_seconds",
    "environment",
    "Workers",
    "Ctl",
    "RawEcho",
    "source_addresses",
    "raise_nofile",
    "new_loop",
    "write_json",
    "SCHEMA_VERSION",
    "process_cpu",
    "wait_until",
    "ServerCPU",
    "payload_for",
    "parse_cpus",
    "find_server_pids",
    "own_rss",
    "pss_bytes",
    "mem_available_fraction",
    "client_load",
    "client_report",
    "CPUWindow",
    "client_cpus",
    "worker_cpu",
    "server_capacity",
    "CLIENT_BOUND_PERCENT",
    "CLIENT_BOUND_WARNING",
]

CLIENT_BOUND_PERCENT = 90.0  # a client busier than this (share of its CPUs) may be what limits a figure

SCHEMA_VERSION = 1


class BenchError(Exception):
    """A benchmark could not run (bad arguments, unreachable server, a worker failed)."""


# ---------------------------------------------------------------------------
# Sizes


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(i?b?)\s*$", re.I)


def parse_size(text: str | int) -> int:
    """'64' -> 64, '1k'/'1KiB'/'1KB' -> 1024, '1M' -> 1048576 (binary multiples throughout)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"invalid size {text!r} (examples: 64, 1K, 64KiB, 1M)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def format_size(n: int) -> str:
    for unit, mult in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------
# HDR-style histogram


class Histogram:
    """Log-bucketed histogram of non-negative integers (nanoseconds here), HdrHistogram style.

    Values below 256 are exact; above, each power of two is split into 128
    linear sub-buckets, so any recorded value is known to better than 0.8%
    (about two significant digits) over the whole range, in a few KiB.
    """

    SUB_BITS = 8
    SUB = 1 << SUB_BITS  # 256
    HALF = SUB >> 1  # 128

    __slots__ = ("counts", "total", "min", "max", "sum")

    def __init__(self) -> None:
        self.counts: list[int] = [0] * (self.SUB + 48 * self.HALF)
        self.total = 0
        self.min = 0
        self.max = 0
        self.sum = 0

    @classmethod
    def index(cls, value: int) -> int:
        if value < cls.SUB:
            return value
        shift = value.bit_length() - cls.SUB_BITS
        return cls.SUB + (shift - 1) * cls.HALF + ((value >> shift) - cls.HALF)

    @classmethod
    def bounds(cls, idx: int) -> tuple[int, int]:
        """Lowest and highest value that land in bucket ``idx``."""
        if idx < cls.SUB:
            return idx, idx
        k = idx - cls.SUB
        shift = k // cls.HALF + 1
        m = k % cls.HALF + cls.HALF
        return m << shift, ((m + 1) << shift) - 1

    def record(self, value: int) -> None:
        if value < 0:
            value = 0
        idx = self.index(value)
        counts = self.counts
        if idx >= len(counts):
            counts.extend([0] * (idx + 1 - len(counts)))
        counts[idx] += 1
        if self.total == 0 or value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.total += 1
        self.sum += value

    def merge(self, other: Histogram) -> None:
        if other.total == 0:
            return
        if len(other.counts) > len(self.counts):
            self.counts.extend([0] * (len(other.counts) - len(self.counts)))
        for i, c in enumerate(other.counts):
            if c:
                self.counts[i] += c
        self.min = other.min if self.total == 0 else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.total += other.total
        self.sum += other.sum

    def percentile(self, q: float) -> int:
        """The value at percentile ``q`` (0..100): the highest value equivalent to it, capped at max."""
        if self.total == 0:
            return 0
        if q <= 0:
            return self.min
        rank = max(1, math.ceil(q / 100.0 * self.total))
        seen = 0
        for i, c in enumerate(self.counts):
            if c:
                seen += c
                if seen >= rank:
                    return max(self.min, min(self.bounds(i)[1], self.max))
        return self.max

    @property
    def mean(self) -> float:
        return self.sum / self.total if self.total else 0.0

    def summary_us(self) -> dict[str, float]:
        """min/mean/p50/p90/p99/p99.9/max in microseconds (values recorded in ns)."""
        out = {"min": self.min / 1e3, "mean": self.mean / 1e3}
        for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p99_9", 99.9)):
            out[name] = self.percentile(q) / 1e3
        out["max"] = self.max / 1e3
        return {k: round(v, 3) for k, v in out.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": "ns",
            "count": self.total,
            "min": self.min,
            "max": self.max,
            "sum": self.sum,
            "buckets": [[*self.bounds(i), c] for i, c in enumerate(self.counts) if c],
        }

    @classmethod
    def from_indexed(cls, pairs: Iterable[Sequence[int]], vmin: int, vmax: int, vsum: int) -> Histogram:
        """A histogram from [bucket index, count] pairs (the Cython engine records with the same buckets)."""
        h = cls()
        for idx, count in pairs:
            h.counts[idx] += count
            h.total += count
        h.min, h.max, h.sum = vmin, vmax, vsum
        return h

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Histogram:
        h = cls()
        for low, _high, count in data.get("buckets", []):
            idx = cls.index(low)
            if idx >= len(h.counts):
                h.counts.extend([0] * (idx + 1 - len(h.counts)))
            h.counts[idx] += count
        h.total = data.get("count", sum(c for _, _, c in data.get("buckets", [])))
        h.min, h.max, h.sum = data.get("min", 0), data.get("max", 0), data.get("sum", 0)
        return h


def payload_for(size: int, text: bool, message: bytes | None = None) -> str | bytes:
    """The data message of the echo modes: ``message`` (--message-file) or ``size`` bytes, text or binary."""
    if message is not None:
        return message.decode() if text else message
    if text:
        return ("fastws" * (size // 6 + 1))[:size]
    pattern = bytes(range(256))
    return (pattern * (size // 256 + 1))[:size]


# ---------------------------------------------------------------------------
# Targets


class Target:
    """Where to connect: a ws:// URL, or host:port for --raw TCP."""

    __slots__ = ("url", "host", "port", "raw", "loopback")

    def __init__(self, url: str, host: str, port: int, raw: bool) -> None:
        self.url, self.host, self.port, self.raw = url, host, port, raw
        try:
            self.loopback = ipaddress.ip_address(host).is_loopback and ":" not in host
        except ValueError:
            self.loopback = host == "localhost"


def parse_target(url: str, raw: bool = False) -> Target:
    """ws://host:port/path (wss:// only without --raw); with raw also tcp://host:port or host:port."""
    if "://" not in url:
        if not raw:
            raise BenchError(f"not a URL: {url!r} (expected ws://host:port/path)")
        url = "tcp://" + url
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if raw and scheme not in ("tcp", "ws"):
        raise BenchError(f"--raw takes tcp://host:port or ws://host:port, not {url!r}")
    if not raw and scheme not in ("ws", "wss"):
        raise BenchError(f"expected a ws:// or wss:// URL, got {url!r} (use --raw for a plain TCP echo)")
    if not parts.hostname:
        raise BenchError(f"no host in {url!r}")
    try:
        port = parts.port or (443 if scheme == "wss" else 80)
    except ValueError:
        raise BenchError(f"invalid port in {url!r}") from None
    return Target(url, parts.hostname, port, raw)


def source_addresses(count: int) -> list[str]:
    """``count`` distinct loopback source addresses: 127.0.0.2, 127.0.0.3, ... (skips .0/.255 bytes).

    Each source address has its own ~28k ephemeral ports, so spreading
    connections over several lifts the per-address port limit.
    """
    out: list[str] = []
    n = 2
    while len(out) < count:
        b, c = divmod(n, 256)
        if 1 <= c <= 254:
            out.append(f"127.0.{b}.{c}")
        n += 1
    return out


# ---------------------------------------------------------------------------
# Errors


def classify_error(exc: BaseException) -> str:
    """A short cause for a failed connection: ECONNREFUSED, EADDRNOTAVAIL, timeout, HTTP 503, ..."""
    if isinstance(exc, HandshakeError):
        return f"HTTP {exc.status}" if exc.status not in (0, 101) else "invalid handshake response"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, OSError):
        if exc.errno:
            return errno.errorcode.get(exc.errno, f"errno {exc.errno}")
        m = re.search(r"\[Errno (\d+)\]", str(exc))  # "Multiple exceptions: [Errno 111] ..."
        if m:
            return errno.errorcode.get(int(m.group(1)), f"errno {m.group(1)}")
        if isinstance(exc, ConnectionResetError):
            return "closed during handshake"
    return type(exc).__name__


# ---------------------------------------------------------------------------
# System facts


def _proc_tree(pids: Iterable[int]) -> list[int]:
    """``pids`` and all their descendants (Linux /proc)."""
    out: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def rss_bytes(pids: Sequence[int], children: bool = True) -> int:
    """Total resident memory of the processes (and their children), from /proc/PID/status."""
    total = 0
    for pid in _proc_tree(pids) if children else pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def pss_bytes(pids: Sequence[int]) -> int:
    """Proportional set size of the processes (pages shared by n of them count 1/n), /proc/PID/smaps_rollup."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            continue
    return total


def cpu_seconds(pids: Sequence[int], children: bool = True) -> float:
    """User + system CPU time of the processes (and their children), from /proc/PID/stat."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    for pid in _proc_tree(pids) if children else pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total / tick


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def environment(extra_packages: Sequence[str] = ()) -> dict[str, Any]:
    """Machine, OS, Python and package versions, date and the command line: what makes a figure comparable."""
    argv = list(sys.argv)
    prog = os.path.basename(argv[0]) if argv else ""
    if prog in ("fastws", "__main__.py"):
        command = "fastws " + shlex.join(argv[1:])
    else:
        command = shlex.join([sys.executable, *argv])
    packages = {name: _version(name) for name in ("fastws", "uvloop", *extra_packages)}
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = []
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "client_cpus": affinity,
        "os": platform.system(),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": packages,
        "command": command,
    }


def own_rss() -> int:
    """Resident memory of this process, bytes."""
    return rss_bytes([os.getpid()], children=False)


def mem_available_fraction() -> float:
    """MemAvailable / MemTotal of the machine (1.0 if unknown)."""
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    info[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return 1.0
    if not info.get("MemTotal") or "MemAvailable" not in info:
        return 1.0
    return info["MemAvailable"] / info["MemTotal"]


def parse_cpus(text: str) -> list[int]:
    """A taskset-style CPU list: '1' -> [1], '1-3' -> [1, 2, 3], '0,2-3' -> [0, 2, 3]."""
    cpus: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            cpus += range(int(lo), int(hi) + 1) if hi else [int(lo)]
    except ValueError:
        raise BenchError(f"invalid CPU list {text!r} (examples: 1, 1-3, 0,2)") from None
    if not cpus or min(cpus) < 0:
        raise BenchError(f"invalid CPU list {text!r}")
    return sorted(set(cpus))


def find_server_pids(port: int) -> list[int]:
    """Processes with a listening TCP socket on ``port`` (loopback servers: whose CPU to show), from /proc."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except (OSError, ValueError):
            continue
    if not inodes:
        return []
    wanted = {f"socket:[{i}]" for i in inodes}
    me = os.getpid()
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in wanted:
                    pids.append(int(entry))
                    break
            except OSError:
                continue
    return sorted(pids)


def client_load(per_process: Sequence[float], cpus: int, busy: Sequence[float] = ()) -> dict[str, Any]:
    """The client's CPU verdict.  Bound: a client process was running or waiting for a CPU more than
    CLIENT_BOUND_PERCENT of the time (``busy``), or the processes together ran more than that share of the
    CPUs they had: then the figure may be the client's limit rather than the server's."""
    procs = len(per_process)
    usable = max(1, min(procs, cpus)) if procs else 1
    share = round(sum(per_process) / usable, 1) if procs else 0.0
    bound = bool(procs) and (
        max(per_process) > CLIENT_BOUND_PERCENT
        or share > CLIENT_BOUND_PERCENT
        or any(b > CLIENT_BOUND_PERCENT for b in busy)
    )
    return {
        "percent_of_capacity": share,
        "cpus": cpus,
        "busy_percent": list(busy),
        "bound": bound,
    }


def server_capacity(pids: Sequence[int]) -> int:
    """How many cores the server processes (and their children) can use at most."""
    tree = _proc_tree(pids)
    cpus: set[int] = set()
    for pid in tree:
        try:
            cpus |= os.sched_getaffinity(pid)
        except (OSError, AttributeError):
            continue
    return max(1, min(len(tree), len(cpus) or len(tree)))


def client_cpus(args: Any) -> list[int]:
    """The CPUs the client may use: --pin, or this process's affinity."""
    if getattr(args, "pin_cpus", None):
        return list(args.pin_cpus)
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return list(range(os.cpu_count() or 1))


CLIENT_BOUND_WARNING = (
    "the client was running or waiting for a CPU more than 90 % of the measured time: this figure may be "
    "the client's limit, not the server's; give the client more CPUs (--pin, --procs) or move it elsewhere"
)


def client_report(
    args: Any,
    per_process: Sequence[dict[str, Any]],
    server: CPUWindow,
    native: bool,
    unsaturated: str = "bound by round trips",
) -> dict[str, Any]:
    """CPU of both sides over the measured window and which one was the limit (result keys).
    ``per_process``: each client process's ``cpu_percent`` and ``busy_percent``; ``unsaturated``: what
    bounds the figure when neither side is saturated."""
    cpus = client_cpus(args)
    cpu = [r.get("cpu_percent") or 0.0 for r in per_process]
    busy = [r["busy_percent"] for r in per_process if r.get("busy_percent") is not None]
    load = client_load(cpu, len(cpus), busy)
    pids = list(getattr(args, "server_pid", None) or [])
    server_percent = server.percent
    server_bound = False
    if server_percent is not None and pids:
        ceiling = CLIENT_BOUND_PERCENT * server_capacity(pids)
        server_bound = server_percent >= ceiling or (server.busy or 0.0) >= ceiling
    busy_text = f"busy {max(busy):.0f} %" if busy else f"{load['percent_of_capacity']:.0f} % of its CPUs"
    server_text = f"server {server_percent:.0f} %" if server_percent is not None else "server unknown"
    if load["bound"] and server_bound:
        limit = f"both saturated: client {busy_text}, {server_text}"
    elif load["bound"]:
        limit = f"client-bound: client {busy_text}, {server_text}"
    elif server_bound:
        limit = f"server-bound: {server_text}, client {busy_text}"
    elif server_percent is not None:
        limit = f"neither saturated: client {busy_text}, {server_text}" + (f" ({unsaturated})" if unsaturated else "")
    else:
        limit = ""
    transport = getattr(args, "client_transport", "native")
    return {
        "client_cpu_percent": cpu,
        "client_cpus": len(cpus),
        "client_cpu_list": getattr(args, "pin", None) or "",
        "client_load": load,
        "client_bound": load["bound"],
        "server_cpu_percent": server_percent,
        "server_busy_percent": server.busy,
        "server_pids": pids,
        "server_bound": server_bound,
        "limit": limit,
        "client_path": "native" if native else f"legacy ({'uvloop' if transport == 'native' else transport})",
    }


def process_cpu() -> float:
    """CPU seconds (user + system) used by this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def wait_until(t: float, tick: Callable[[], None] | None = None, step: float = 0.05) -> None:
    """Sleep until time.monotonic() reaches ``t``, calling ``tick`` between short sleeps."""
    while True:
        left = t - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(step, left))
        if tick is not None:
            tick()


def run_and_wait_ns(pids: Sequence[int], children: bool = True) -> tuple[int, int]:
    """Nanoseconds the processes' threads spent running and waiting for a CPU (/proc/PID/task/*/schedstat)."""
    run = wait = 0
    for pid in _proc_tree(pids) if children else pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    fields = f.read().split()
                run += int(fields[0])
                wait += int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    return run, wait


class CPUWindow:
    """CPU use of processes over a window (``start()``, ``stop()``): ``percent``, the share of one core they
    ran, and ``busy``, the share of the time they were running or waiting for a CPU.  A process that is
    busy ~100 % of the time is saturated even when it shares its CPU (and then runs less than 100 %)."""

    def __init__(self, pids: Sequence[int] | None = None, children: bool = True) -> None:
        self.pids = list(pids) if pids is not None else [os.getpid()]
        self.children = children
        self._c0 = self._t0 = 0.0
        self._r0 = self._w0 = 0
        self.percent: float | None = None
        self.busy: float | None = None

    def start(self) -> None:
        if self.pids:
            self._c0, self._t0 = cpu_seconds(self.pids, self.children), time.monotonic()
            self._r0, self._w0 = run_and_wait_ns(self.pids, self.children)

    def stop(self) -> float | None:
        if self.pids and self._t0:
            elapsed = time.monotonic() - self._t0
            if elapsed > 0:
                self.percent = round(100 * (cpu_seconds(self.pids, self.children) - self._c0) / elapsed, 1)
                run, wait = run_and_wait_ns(self.pids, self.children)
                self.busy = round(100 * ((run - self._r0) + (wait - self._w0)) / 1e9 / elapsed, 1)
        return self.percent


def ServerCPU(pids: Sequence[int] | None) -> CPUWindow:  # noqa: N802 - the name the modes use
    """CPU of the server processes given by PID (none: nothing is measured)."""
    return CPUWindow(list(pids or []))


def raise_nofile() -> int:
    """Raise the soft open-file limit to the hard one; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Worker processes
#
# Every mode's clients run in forked processes with their own uvloop; the
# parent only coordinates (never runs an event loop, so forking is safe).
# Messages are plain dicts over a pipe; live progress goes through a shared
# array of doubles, one slot per worker.

WorkerFn = Callable[[dict[str, Any], "Ctl"], Coroutine[Any, Any, dict[str, Any]]]


class Ctl:
    """A worker's side of the channel to the parent."""

    def __init__(self, conn: multiprocessing.connection.Connection, counters: Any, index: int) -> None:
        self._conn = conn
        self._counters = counters
        self.index = index

    def send(self, type: str, **data: Any) -> None:  # noqa: A002 - message field
        self._conn.send({"type": type, **data})

    def progress(self, value: float) -> None:
        self._counters[self.index] = value

    def poll(self) -> dict[str, Any] | None:
        return self._conn.recv() if self._conn.poll() else None

    async def recv(self) -> dict[str, Any]:
        """The next command from the parent."""
        if self._conn.poll():
            return self._conn.recv()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = self._conn.fileno()

        def readable() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await fut
        finally:
            loop.remove_reader(fd)
        return self._conn.recv()


def _worker_main(
    fn: WorkerFn,
    params: dict[str, Any],
    conn: multiprocessing.connection.Connection,
    counters: Any,
    index: int,
) -> None:
    try:
        raise_nofile()
        if params.get("cpu") is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {params["cpu"]})
        loop = new_loop()
        asyncio.set_event_loop(loop)
        ctl = Ctl(conn, counters, index)
        try:
            result = loop.run_until_complete(fn(params, ctl))
        finally:
            loop.close()
        conn.send({"type": "result", "result": result})
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # report everything: the parent explains it
        try:
            conn.send(
                {
                    "type": "error",
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(),
                }
            )
        except Exception:
            pass
    finally:
        conn.close()


class Workers:
    """Forked worker processes running ``fn(params, ctl)`` each; the parent talks to them by message."""

    def __init__(self, fn: WorkerFn, params: Sequence[dict[str, Any]]) -> None:
        try:
            ctx = multiprocessing.get_context("fork")
        except ValueError:  # pragma: no cover - Windows
            raise BenchError("fastws bench needs fork() (Linux, macOS)") from None
        self.n = len(params)
        self.counters = ctx.Array("d", self.n, lock=False)
        self._conns: list[multiprocessing.connection.Connection] = []
        self._procs: list[Any] = []
        for i, p in enumerate(params):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(fn, p, child, self.counters, i),
                daemon=True,
                name=f"fastws-bench-{i}",
            )
            self._conns.append(parent)
            self._procs.append((proc, child))
        self._pending: list[list[dict[str, Any]]] = [[] for _ in params]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p, _ in self._procs]

    def start(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for proc, _ in self._procs:
            proc.start()
        for _, child in self._procs:
            child.close()  # only the worker keeps its end: EOF tells us it died

    def progress(self) -> float:
        return float(sum(self.counters))

    def send_all(self, type: str, **data: Any) -> None:  # noqa: A002
        for conn in self._conns:
            try:
                conn.send({"type": type, **data})
            except (BrokenPipeError, OSError):
                pass

    def send(self, index: int, type: str, **data: Any) -> None:  # noqa: A002
        self._conns[index].send({"type": type, **data})

    def gather(
        self,
        type: str,
        timeout: float | None = None,
        tick: Callable[[], None] | None = None,
        which: Sequence[int] | None = None,
    ) -> list[dict[str, Any]]:
        """Wait for one message of ``type`` from each worker (in ``which``); call ``tick`` about 10x/s."""
        which = list(range(self.n)) if which is None else list(which)
        got: dict[int, dict[str, Any]] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(got) < len(which):
            for i in which:
                if i in got:
                    continue
                for j, msg in enumerate(self._pending[i]):
                    if msg["type"] == type:
                        got[i] = self._pending[i].pop(j)
                        break
            if len(got) == len(which):
                break
            wait = 0.1
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [i for i in which if i not in got]
                    raise BenchError(f"worker(s) {missing} did not report {type!r} within {timeout:g} s")
                wait = min(wait, left)
            ready = multiprocessing.connection.wait([self._conns[i] for i in which if i not in got], wait)
            for conn in ready:
                i = self._conns.index(conn)  # type: ignore[arg-type]
                try:
                    msg = self._conns[i].recv()
                except (EOFError, OSError):
                    code = self._procs[i][0].exitcode
                    raise BenchError(f"client worker {i} died (exit code {code})") from None
                if msg["type"] == "error":
                    raise BenchError(f"client worker {i} failed: {msg['error']}\n{msg.get('traceback', '')}")
                self._pending[i].append(msg)
            if tick is not None:
                tick()
        return [got[i] for i in which]

    def close(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for proc, _ in self._procs:
            if proc.pid is None:
                continue
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc, _ in self._procs:
            if proc.pid is not None and proc.is_alive():
                proc.terminate()
                proc.join(1.0)
        for conn in self._conns:
            conn.close()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:
            for proc, _ in self._procs:
                if proc.pid is not None and proc.is_alive():
                    proc.terminate()
        self.close(timeout=1.0 if exc[0] is not None else 10.0)


def split(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal non-negative integers."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# ---------------------------------------------------------------------------
# Raw TCP client (the physical limit: same byte streams, no WebSocket framing)


class RawEcho(asyncio.BufferedProtocol):
    """Plain TCP stream client; ``received`` counts bytes, a "message" of size S is every S bytes.

    With ``echo`` set (and ``size``), every complete S bytes that come back are
    answered with S new bytes, as the WebSocket client answers every whole
    message: the bytes in flight stay constant and the stream is not chopped
    into ever smaller pieces.  With ``echo`` False it only counts (and
    ``on_data`` may react instead).
    """

    def __init__(self) -> None:
        self.buf = bytearray(262144)
        self.view = memoryview(self.buf)
        self.received = 0
        self.size = 0
        self._pending = 0
        self._blocks: dict[int, bytes] = {}
        self.echo = False
        self.on_data: Callable[[int], None] | None = None
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_event_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        if self.echo:
            pending = self._pending + nbytes
            whole, self._pending = divmod(pending, self.size)
            if whole:
                block = self._blocks.get(whole)
                if block is None:
                    block = self._blocks[whole] = bytes(self.size * whole)
                assert self.transport is not None
                self.transport.write(block)  # immutable and reused: uvloop may keep it, nobody changes it
        elif self.on_data is not None:
            self.on_data(nbytes)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def worker_cpu(args: Any, index: int) -> int | None:
    """The CPU that client process ``index`` is pinned to (--pin: one each, round robin), or None."""
    pins = getattr(args, "pin_cpus", None)
    return pins[index % len(pins)] if pins else None


def client_params(args: Any, target: Any, **extra: Any) -> list[dict[str, Any]]:
    """One parameter dict per client process for the echo modes (throughput, latency):
    connections, message count and source addresses split over ``--processes``."""
    procs = max(1, min(args.processes or 1, args.connections))
    sources = source_addresses(args.source_addresses) if target.loopback and args.source_addresses else []
    per_count = math.ceil(args.count / procs) if args.count else 0
    return [
        dict(url=args.url, raw=args.raw, size=args.size, text=args.text, compression=args.compression,
             message=getattr(args, "message", None),
             connections=n, count=per_count, sources=sources, open_timeout=args.open_timeout, index=i,
             cpu=worker_cpu(args, i), **extra)
        for i, n in enumerate(split(args.connections, procs))
    ]
