#!/usr/bin/env python
"""Side-by-side comparison of fastws with peer WebSocket servers and a raw TCP echo.

    python bench/compare.py --quick     # about 2 minutes: a smoke-sized run of every workload
    python bench/compare.py             # the full run (--full): longer windows, 10,000 idle
                                        # connections, 3 repeats

Each server in bench/servers/ runs alone, pinned to CPU 0 (`taskset -c 0`);
the bench client (`python -m fastws bench ...`, pinned to CPU 1) drives its
/echo endpoint through every workload.  Every run is saved as
bench/results/<server>__<workload>__r<N>.json (plot them with `fastws bench
plot`), the medians go to bench/results/summary.json, and bench/RESULTS.md
gets one table per workload with ratios to picows and to the raw TCP limit,
the machine, kernel, Python and library versions, the date and this command.

Run it on a quiet machine: anything else on CPU 0 or 1 shows up in the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SERVERS_DIR = HERE / "servers"
RESULTS_DIR = HERE / "results"
PY = sys.executable

PEER_PACKAGES = (
    "fastws",
    "picows",
    "aiofastnet",
    "websockets",
    "aiohttp",
    "tornado",
    "socketify",
    "uvloop",
    "Cython",
    "httptools",
)
PYTHON_PEERS = (
    "picows",
    "websockets",
    "aiohttp",
    "tornado",
)  # "bytes per idle connection below every Python peer"


@dataclass
class ServerSpec:
    name: str
    script: str
    args: list[str] = field(default_factory=list)
    raw: bool = False
    note: str = ""
    # started afresh for each workload with --message-size S, and only for messages of min_size or more
    per_message_size: bool = False
    min_size: int = 0

    def measures(self, w: Workload) -> bool:
        if self.raw and not w.raw_ok:
            return False
        return not self.per_message_size or (w.mode == "throughput" and w.size >= self.min_size)


@dataclass
class Workload:
    key: str
    mode: str
    title: str
    metrics: list[tuple[str, str, bool]]  # (result path, column title, higher is better)
    size: int = 64
    connections: int = 1
    inflight: int = 1
    full_only: bool = False
    raw_ok: bool = True
    extra: list[str] = field(default_factory=list)


KIB, MIB = 1024, 1024 * 1024

WORKLOADS = [
    # The idle-connection workload runs first, on a freshly started server: nothing else has touched its heap.
    Workload(
        "idle",
        "connections",
        "Bytes per idle connection",
        [("server.bytes_per_connection", "bytes/conn", False), ("handshakes_per_s", "ramp conn/s", True)],
    ),
    Workload(
        "msgs_64B_c1",
        "throughput",
        "Messages/s, 64 B, 1 connection, 32 in flight",
        [("msgs_per_s", "msgs/s", True)],
        size=64,
        connections=1,
        inflight=32,
    ),
    Workload(
        "msgs_64B_c100",
        "throughput",
        "Messages/s, 64 B, 100 connections, 1 in flight each",
        [("msgs_per_s", "msgs/s", True)],
        size=64,
        connections=100,
        inflight=1,
    ),
    Workload(
        "mbs_1KiB_c1",
        "throughput",
        "MB/s, 1 KiB messages, 1 connection, 16 in flight",
        [("mb_per_s", "MB/s", True), ("msgs_per_s", "msgs/s", True)],
        size=KIB,
        connections=1,
        inflight=16,
    ),
    Workload(
        "mbs_64KiB_c1",
        "throughput",
        "MB/s, 64 KiB messages, 1 connection, 4 in flight",
        [("mb_per_s", "MB/s", True)],
        size=64 * KIB,
        connections=1,
        inflight=4,
    ),
    Workload(
        "mbs_1MiB_c1",
        "throughput",
        "MB/s, 1 MiB messages, 1 connection, 1 in flight",
        [("mb_per_s", "MB/s", True)],
        size=MIB,
        connections=1,
        inflight=1,
    ),
    Workload(
        "mbs_1KiB_c100",
        "throughput",
        "MB/s, 1 KiB messages, 100 connections, 1 in flight each",
        [("mb_per_s", "MB/s", True)],
        size=KIB,
        connections=100,
        inflight=1,
        full_only=True,
    ),
    Workload(
        "mbs_64KiB_c100",
        "throughput",
        "MB/s, 64 KiB messages, 100 connections, 1 in flight each",
        [("mb_per_s", "MB/s", True)],
        size=64 * KIB,
        connections=100,
        inflight=1,
        full_only=True,
    ),
    Workload(
        "mbs_1MiB_c100",
        "throughput",
        "MB/s, 1 MiB messages, 100 connections, 1 in flight each",
        [("mb_per_s", "MB/s", True)],
        size=MIB,
        connections=100,
        inflight=1,
        full_only=True,
    ),
    Workload(
        "latency_64B",
        "latency",
        "Round-trip latency, 64 B, 1 connection, 1 in flight",
        [
            ("latency_us.p50", "p50 µs", False),
            ("latency_us.p99", "p99 µs", False),
            ("latency_us.max", "max µs", False),
        ],
        size=64,
    ),
    Workload(
        "handshake",
        "handshake",
        "Handshakes/s (connect + upgrade + close, 16 at a time)",
        [("handshakes_per_s", "handshakes/s", True)],
        connections=16,
        raw_ok=False,
    ),
]

PRESETS = {
    "quick": dict(warmup=0.3, duration=1.0, repeat=1, idle=2000, hold=0.5),
    "full": dict(warmup=1.0, duration=5.0, repeat=3, idle=10000, hold=5.0),
}


# ---------------------------------------------------------------------------
# Servers


def fastws_transports() -> list[str]:
    """The choices of `fastws serve --transport`, if the server has that option (else [])."""
    try:
        out = subprocess.run(
            [PY, "-m", "fastws", "serve", "--help"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    m = re.search(r"--transport\s+\{([^}]*)\}", out)
    if m:
        return [c.strip() for c in m.group(1).split(",") if c.strip()]
    return ["default"] if "--transport" in out else []


def importable(module: str) -> str | None:
    """None if ``module`` imports in a fresh interpreter, else the reason."""
    proc = subprocess.run([PY, "-c", f"import {module}"], capture_output=True, text=True, timeout=60)
    if proc.returncode == 0:
        return None
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit code {proc.returncode}"


def server_specs(full: bool) -> tuple[list[ServerSpec], dict[str, str]]:
    specs: list[ServerSpec] = []
    skipped: dict[str, str] = {}
    transports = fastws_transports()
    if transports and transports != ["default"]:
        for t in transports:
            specs.append(ServerSpec(f"fastws-{t}", "fastws_echo.py", ["--transport", t]))
    else:
        specs.append(ServerSpec("fastws", "fastws_echo.py"))
        if not transports:
            # Hook: once `fastws serve --transport {uvloop,aiofastnet}` exists, both rows appear.
            skipped["fastws-aiofastnet"] = "`fastws serve` has no --transport option yet"
    # the coroutine styles most users write first, on the same server (their /echo)
    specs.append(ServerSpec("fastws-handler", "fastws_styles.py", ["--style", "handler"],
                            note="async def handler(ws): async for m in ws: await ws.send(m)"))
    specs.append(ServerSpec("fastws-async", "fastws_styles.py", ["--style", "async"],
                            note="Endpoint with async def on_message: await self.session.send(m)"))
    specs.append(
        ServerSpec("picows", "picows_echo.py", ["--transport", "aiofastnet"], note="as shipped: aiofastnet")
    )
    if full:
        specs.append(ServerSpec("picows-uvloop", "picows_echo.py", ["--transport", "uvloop"]))
    specs += [
        ServerSpec("websockets", "websockets_echo.py"),
        ServerSpec("aiohttp", "aiohttp_echo.py"),
        ServerSpec("tornado", "tornado_echo.py"),
        ServerSpec("socketify", "socketify_echo.py", note="uWebSockets (C++)"),
        ServerSpec("raw-tcp", "raw_tcp_echo.py", raw=True, note="no framing: the limit"),
        ServerSpec("raw-tcp-message", "raw_tcp_message_echo.py", raw=True, per_message_size=True,
                   min_size=64 * KIB, note="no framing, whole messages only: the limit of a message API; "
                   "started for each workload with its --message-size"),
    ]
    for spec in list(specs):
        module = {
            "socketify": "socketify",
            "picows": "picows",
            "picows-uvloop": "picows",
            "websockets": "websockets",
            "aiohttp": "aiohttp",
            "tornado": "tornado",
        }.get(spec.name)
        if module:
            reason = importable(module)
            if reason:
                specs.remove(spec)
                skipped[spec.name] = f"cannot import {module}: {reason}"
    return specs, skipped


class RunningServer:
    def __init__(self, spec: ServerSpec, port: int, cpu: str, log: Path, message_size: int = 0) -> None:
        self.spec, self.port = spec, port
        cmd = ["taskset", "-c", cpu, PY, str(SERVERS_DIR / spec.script), "--port", str(port), *spec.args]
        self.message_size = message_size if spec.per_message_size else 0
        if self.message_size:
            cmd += ["--message-size", str(message_size)]
        self.command = cmd
        self._log = open(log, "a")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(SERVERS_DIR), start_new_session=True
        )
        self.pid = self.proc.pid  # taskset execs the interpreter: same pid

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with code {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    time.sleep(0.3)  # let it finish starting (a first probe can beat the app's setup)
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.spec.name} did not listen on port {self.port} within {timeout:g} s")

    def stop(self) -> None:
        for sig, wait in ((signal.SIGINT, 5.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        self._log.close()


# ---------------------------------------------------------------------------
# Running the workloads


def bench_command(
    w: Workload, spec: ServerSpec, port: int, preset: dict[str, Any], out: Path, cpu: str, pid: int
) -> list[str]:
    url = f"tcp://127.0.0.1:{port}" if spec.raw else f"ws://127.0.0.1:{port}/echo"
    # --pin: every client process on one of the client CPUs (and, by default, one process per client CPU
    # where the work splits: many connections, handshakes).
    cmd = ["taskset", "-c", cpu, PY, "-m", "fastws", "bench", w.mode, url, "--pin", cpu]
    cmd += ["--quiet", "--json", str(out), "--label", spec.name, "--server-pid", str(pid)]
    cmd += ["--client-transport", preset["client_transport"]]
    if spec.raw:
        cmd.append("--raw")
    if w.mode == "connections":
        cmd += ["--connections", str(preset["idle"]), "--duration", str(preset["hold"])]
    elif w.mode == "handshake":
        cmd += ["--connections", str(w.connections), "--duration", str(preset["duration"])]
    else:
        cmd += ["--size", str(w.size), "--connections", str(w.connections)]
        cmd += ["--duration", str(preset["duration"]), "--warmup", str(preset["warmup"])]
        if w.mode == "throughput":
            cmd += ["--inflight", str(w.inflight)]
    return cmd + w.extra


def dig(d: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    preset = dict(PRESETS[args.preset], client_transport=args.client_transport)
    for key in ("duration", "warmup", "repeat", "idle", "hold"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    full = args.preset == "full"
    specs, skipped = server_specs(full)
    if args.servers:
        wanted = set(args.servers.split(","))
        specs = [s for s in specs if s.name in wanted or s.name.split("-")[0] in wanted]
    workloads = [w for w in WORKLOADS if full or not w.full_only]
    if args.workloads:
        wanted = set(args.workloads.split(","))
        workloads = [w for w in workloads if w.key in wanted]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    if not args.keep:
        for old in [*RESULTS_DIR.glob("*__*__r*.json"), *RESULTS_DIR.glob("*.log")]:
            old.unlink()
    summary: dict[str, Any] = {
        "preset": args.preset,
        "params": preset,
        "servers": {},
        "skipped": skipped,
        "errors": {},
        "commands": {},
    }
    port = args.port
    started = time.monotonic()
    for spec in specs:
        port += 1
        print(f"== {spec.name} (port {port})", flush=True)
        log = RESULTS_DIR / f"{spec.name}.log"
        first = next((w for w in workloads if spec.measures(w)), None)
        if first is None:
            continue
        server = RunningServer(spec, port, args.server_cpu, log, message_size=first.size)
        summary["commands"][spec.name] = shlex.join(server.command)
        if spec.note:
            summary.setdefault("notes", {})[spec.name] = spec.note
        per: dict[str, Any] = {}
        summary["servers"][spec.name] = per
        try:
            server.wait_ready()
            for w in workloads:
                if not spec.measures(w):
                    continue
                if spec.per_message_size and server.message_size != w.size:
                    server.stop()
                    server = RunningServer(spec, port, args.server_cpu, log, message_size=w.size)
                    server.wait_ready()
                runs = []
                for rep in range(preset["repeat"]):
                    if w.mode == "connections" and rep > 0:
                        # Memory per connection is only honest on a fresh heap: restart the server.
                        server.stop()
                        server = RunningServer(spec, port, args.server_cpu, log)
                        server.wait_ready()
                    out = RESULTS_DIR / f"{spec.name}__{w.key}__r{rep + 1}.json"
                    cmd = bench_command(w, spec, port, preset, out, args.client_cpu, server.pid)
                    limit = 120 + preset["duration"] * 3 + preset["hold"]
                    t0 = time.monotonic()
                    try:
                        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
                    except subprocess.TimeoutExpired:
                        summary["errors"][f"{spec.name}/{w.key}"] = f"timed out after {limit:g} s"
                        print(f"   {w.key}: timed out", flush=True)
                        break
                    if proc.returncode != 0 or not out.exists():
                        err = (proc.stderr or proc.stdout).strip().splitlines()
                        summary["errors"][f"{spec.name}/{w.key}"] = (
                            err[-1] if err else f"exit {proc.returncode}"
                        )
                        print(f"   {w.key}: FAILED {err[-1] if err else proc.returncode}", flush=True)
                        break
                    data = json.loads(out.read_text())
                    runs.append(data["results"])
                    shown = ", ".join(
                        f"{title} {_fmt(dig(data['results'], path))}" for path, title, _ in w.metrics
                    )
                    print(f"   {w.key} r{rep + 1}: {shown}  ({time.monotonic() - t0:.1f} s)", flush=True)
                    if server.proc.poll() is not None:
                        raise RuntimeError(f"{spec.name} died during {w.key}")
                if runs:
                    per[w.key] = aggregate(runs, w)
        except RuntimeError as exc:
            summary["errors"][spec.name] = str(exc)
            print(f"   {exc}", flush=True)
        finally:
            server.stop()
    summary["elapsed_s"] = round(time.monotonic() - started, 1)
    return summary


def aggregate(runs: list[dict[str, Any]], w: Workload) -> dict[str, Any]:
    """Median of each metric over the repeats, plus the CPU figures of the median run."""
    out: dict[str, Any] = {"repeats": len(runs)}
    for path, _title, _higher in w.metrics:
        values = [v for v in (dig(r, path) for r in runs) if isinstance(v, (int, float))]
        out[path] = statistics.median(values) if values else None
        if len(values) > 1:
            out[path + ".spread"] = [min(values), max(values)]
    first = w.metrics[0][0]
    ranked = sorted(runs, key=lambda r: dig(r, first) or 0)
    median_run = ranked[len(ranked) // 2]
    out["server_cpu_percent"] = median_run.get("server_cpu_percent")
    out["client_cpu_percent"] = median_run.get("client_cpu_percent")
    # Which side limited the median run (fastws bench: "client-bound: ...", "server-bound: ...").
    out["client_bound"] = median_run.get("client_bound")
    out["limit"] = median_run.get("limit")
    if w.mode == "connections":
        out["opened"] = median_run.get("opened")
        out["failures"] = median_run.get("failures")
    if w.mode == "handshake":
        out["unclean_close"] = median_run.get("unclean_close")
    return out


# ---------------------------------------------------------------------------
# RESULTS.md


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and v < 100:
        return f"{v:,.2f}"
    return f"{v:,.0f}"


def _ratio(v: Any, ref: Any) -> str:
    if not isinstance(v, (int, float)) or not isinstance(ref, (int, float)) or not ref:
        return "—"
    return f"{v / ref:.2f}x"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in (
                "Model name",
                "CPU(s)",
                "Thread(s) per core",
                "Core(s) per socket",
                "Socket(s)",
                "Hypervisor vendor",
            ):
                info[key.strip()] = value.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    info["kernel"] = os.uname().release
    info["python"] = sys.version.split()[0] + f" ({sys.implementation.name})"
    versions = {}
    for pkg in PEER_PACKAGES:
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception:
            versions[pkg] = None
    info["packages"] = versions
    return info


def write_markdown(summary: dict[str, Any], out: Path, command: str) -> None:
    servers = summary["servers"]
    mach = summary["machine"]
    lines = [
        "# fastws vs peers: echo benchmarks",
        "",
        f"Generated by `{command}` on {summary['date']} ({summary['preset']} preset, "
        f"{summary['params']['repeat']} run(s) per figure, median shown; "
        f"{summary['elapsed_s']:.0f} s in all). Every section of this file, each with its own command: "
        "`bash bench/regenerate_results.sh`.",
        "",
        f"- Machine: {mach.get('Model name', '?')}, {mach.get('CPU(s)', '?')} CPUs "
        f"({mach.get('Core(s) per socket', '?')} cores/socket, "
        f"{mach.get('Thread(s) per core', '?')} thread(s)/core"
        + (f", {mach['Hypervisor vendor']} guest" if mach.get("Hypervisor vendor") else "")
        + ")",
        f"- Kernel {mach['kernel']}, Python {mach['python']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in mach["packages"].items() if v),
        f"- Each server alone on CPU {summary['server_cpu']} (`taskset`), the client on CPU "
        f"{summary['client_cpu']} (`fastws bench --pin`): "
        + (
            "its Cython engine (own epoll sockets, pre-masked frames, one send() per read; bench/README.md)"
            if summary["params"]["client_transport"] == "native"
            else f"fastws.client on {summary['params']['client_transport']} transports"
        )
        + "; loopback.",
        f"- Windows: {summary['params']['warmup']} s warm-up + {summary['params']['duration']} s measured; "
        f"idle connections: {summary['params']['idle']:,} held {summary['params']['hold']} s.",
        "- Every server echoes on /echo; `raw-tcp` is a uvloop TCP echo without WebSocket framing, driven "
        "by `fastws bench --raw` with the same byte streams (every S bytes back = one message): the "
        "physical limit. It writes each read back at once, still in the CPU cache; a message server must "
        "hold a whole message before the application sees it, so `raw-tcp-message` (big messages only) is "
        "the same echo writing back whole messages only, each read straight into one reused buffer: the "
        "limit of any message API.",
        "- `x picows` and `x raw` are ratios to those rows in the same run. CPU columns: share of one core "
        "used by the server / the client during the window. `limit`: the side that was saturated (running "
        "or waiting for a CPU more than 90 % of the window); a **client-bound** row measures the client's "
        "limit, not the server's, and says so.",
        "",
    ]
    if summary["skipped"]:
        lines += ["Not measured:", ""]
        lines += [f"- {name}: {why}" for name, why in summary["skipped"].items()]
        lines.append("")
    names = list(servers)
    for w in WORKLOADS:
        if not any(w.key in servers[n] for n in names):
            continue
        lines += [f"## {w.title}", ""]
        head = ["server"]
        for _path, title, _higher in w.metrics:
            head += (
                [title, f"{title} x picows", f"{title} x raw"]
                if w.mode != "handshake"
                else [title, f"{title} x picows"]
            )
        head += ["server CPU", "client CPU", "limit"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for n in names:
            r = servers[n].get(w.key)
            if r is None:
                continue
            row = [n]
            for path, _title, _higher in w.metrics:
                v = r.get(path)
                ref_p = servers.get("picows", {}).get(w.key, {}).get(path)
                ref_r = servers.get("raw-tcp", {}).get(w.key, {}).get(path)
                row.append(_fmt(v))
                row.append(_ratio(v, ref_p))
                if w.mode != "handshake":
                    row.append(_ratio(v, ref_r))
            cpu_s = r.get("server_cpu_percent")
            cpu_c = r.get("client_cpu_percent") or []
            row.append(f"{cpu_s:.0f} %" if isinstance(cpu_s, (int, float)) else "—")
            row.append(" + ".join(f"{c:.0f}" for c in cpu_c) + " %" if cpu_c else "—")
            row.append(limit_cell(r))
            lines.append("| " + " | ".join(row) + " |")
        if w.mode == "handshake":
            unclean = {n: servers[n][w.key].get("unclean_close") for n in names if w.key in servers[n]}
            bad = {n: u for n, u in unclean.items() if u}
            if bad:
                lines += [
                    "",
                    "Closes that ended without the server's close frame: "
                    + ", ".join(f"{n} {u:,}" for n, u in bad.items())
                    + ".",
                ]
        if w.mode == "connections":
            fails = {n: servers[n][w.key].get("failures") for n in names if w.key in servers[n]}
            fails = {n: f for n, f in fails.items() if f}
            if fails:
                lines += [
                    "",
                    "Failed connection attempts: "
                    + "; ".join(
                        f"{n}: " + ", ".join(f"{k} {v}" for k, v in f.items()) for n, f in fails.items()
                    )
                    + ".",
                ]
        lines.append("")
    lines += targets(summary)
    if summary.get("scale"):
        import scale  # bench/scale.py, beside this file

        lines += [scale.markdown(summary["scale"], summary["scale"].get("command", "python bench/scale.py"))]
    else:
        lines += ["## One node, many connections", "",
                  "See [docs/capacity.md](../docs/capacity.md) (`bash bench/capacity.sh`): idle connections per "
                  "node, bytes per connection, keepalive CPU, ramp rate, broadcast latency at 1k/10k/50k "
                  "subscribers, and the kernel limits.", ""]
    if summary["errors"]:
        lines += ["## Errors", ""] + [f"- {k}: {v}" for k, v in summary["errors"].items()] + [""]
    notes = summary.get("notes", {})
    lines += ["## Server commands", ""]
    lines += [f"- {n}{f' ({notes[n]})' if n in notes else ''}: `{c}`" for n, c in summary["commands"].items()]
    lines.append("")
    lines += [
        "Raw results: `bench/results/*.json` (`fastws bench plot bench/results/*__*.json -o chart.png`).",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + kept_sections(out))


# sections other tools write into RESULTS.md (bench/asgi_compare.py, bench/compression.py)
KEPT_PREFIXES = ("## ASGI:", "## Compression:")


def kept_sections(path: Path) -> str:
    """The sections of the existing report that this script does not write, to carry over as they are."""
    if not path.exists():
        return ""
    kept, keeping = [], False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            keeping = line.startswith(KEPT_PREFIXES)
        if keeping:
            kept.append(line)
    return ("\n" + "\n".join(kept) + "\n") if kept else ""


def limit_cell(r: dict[str, Any]) -> str:
    """The limit column: which side was saturated; client-bound rows say so in bold."""
    limit = r.get("limit") or ""
    kind = limit.split(":", 1)[0]
    if r.get("client_bound") and kind != "both saturated":
        return "**client-bound**"
    return {"server-bound": "server", "both saturated": "both", "neither saturated": "neither"}.get(kind, "—")


def targets(summary: dict[str, Any]) -> list[str]:
    """The issue's targets, checked on this run's figures."""
    servers = summary["servers"]
    fastws_rows = [n for n in servers if n == "fastws" or n.startswith("fastws-")]
    if not fastws_rows or "picows" not in servers:
        return []
    lines = [
        "## Targets",
        "",
        "| target | " + " | ".join(fastws_rows) + " |",
        "|---|" + "---|" * len(fastws_rows),
    ]

    def check(name: str, fn: Any) -> None:
        cells = []
        for f in fastws_rows:
            try:
                ok, detail = fn(servers[f])
            except (KeyError, TypeError, ZeroDivisionError):
                ok, detail = None, "—"
            cells.append(("✅ " if ok else "❌ " if ok is not None else "") + detail)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    tput = [w for w in WORKLOADS if w.mode == "throughput"]
    for w in tput:
        path = w.metrics[0][0]
        if w.key in servers["picows"]:
            check(
                f">= 1.0x picows: {w.key}",
                lambda s, w=w, path=path: (
                    s[w.key][path] >= servers["picows"][w.key][path],
                    f"{s[w.key][path] / servers['picows'][w.key][path]:.2f}x",
                ),
            )
    endpoint = next((n for n in ("fastws", "fastws-uvloop", "fastws-default") if n in servers), None)
    if endpoint is not None:
        for w in tput:
            path = w.metrics[0][0]
            if w.key in servers[endpoint]:
                check(
                    f">= 0.8x the Endpoint style ({endpoint}): {w.key}",
                    lambda s, w=w, path=path: (
                        s[w.key][path] >= 0.8 * servers[endpoint][w.key][path],
                        f"{s[w.key][path] / servers[endpoint][w.key][path]:.2f}x",
                    ),
                )
    if "websockets" in servers:
        for key in ("msgs_64B_c1", "msgs_64B_c100"):
            if key in servers["websockets"]:
                check(
                    f">= 2x websockets: {key}",
                    lambda s, key=key: (
                        s[key]["msgs_per_s"] >= 2 * servers["websockets"][key]["msgs_per_s"],
                        f"{s[key]['msgs_per_s'] / servers['websockets'][key]['msgs_per_s']:.2f}x",
                    ),
                )
    if "raw-tcp" in servers:
        for w in tput:
            if w.size >= 64 * KIB and w.key in servers["raw-tcp"]:
                check(
                    f">= 70% of raw TCP: {w.key}",
                    lambda s, w=w: (
                        s[w.key]["mb_per_s"] >= 0.7 * servers["raw-tcp"][w.key]["mb_per_s"],
                        f"{100 * s[w.key]['mb_per_s'] / servers['raw-tcp'][w.key]['mb_per_s']:.0f}%",
                    ),
                )
    # issue 10's lines against the raw echoes: small messages over many connections, and 1 MiB
    for ref, need, key in (("raw-tcp", 0.65, "msgs_64B_c100"), ("raw-tcp", 0.9, "mbs_1MiB_c100"),
                           ("raw-tcp-message", 0.9, "mbs_1MiB_c100")):
        w = next(w for w in WORKLOADS if w.key == key)
        path = w.metrics[0][0]
        if key in servers.get(ref, {}):
            check(
                f">= {need}x {ref}: {key}",
                lambda s, ref=ref, need=need, key=key, path=path: (
                    s[key][path] >= need * servers[ref][key][path],
                    f"{s[key][path] / servers[ref][key][path]:.2f}x",
                ),
            )
    peers = [p for p in PYTHON_PEERS if p in servers and "idle" in servers[p]]
    if peers:
        key = "server.bytes_per_connection"

        def idle(s: dict[str, Any]) -> tuple[bool, str]:
            best = min(servers[p]["idle"][key] for p in peers)
            return s["idle"][key] < best, f"{s['idle'][key]:,.0f} B vs {best:,.0f} B"

        check("bytes per idle connection below every Python peer", idle)
    return lines + [""]


def main() -> int:
    global RESULTS_DIR
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="preset", action="store_const", const="quick", help="about 2 minutes")
    g.add_argument("--full", dest="preset", action="store_const", const="full", help="the full run (default)")
    p.set_defaults(preset="full")
    p.add_argument("--servers", help="comma-separated subset, e.g. fastws,picows,raw-tcp")
    p.add_argument("--workloads", help="comma-separated subset of: " + ", ".join(w.key for w in WORKLOADS))
    p.add_argument("--duration", type=float, help="measured seconds per run (overrides the preset)")
    p.add_argument("--warmup", type=float)
    p.add_argument("--repeat", type=int, help="runs per figure; the median is reported")
    p.add_argument("--idle", type=int, help="connections for the idle-memory workload")
    p.add_argument("--hold", type=float, help="seconds the idle connections are held")
    p.add_argument("--server-cpu", default="0", help="CPU list for the servers (taskset -c), default 0")
    p.add_argument("--client-cpu", default="1", help="CPU list for the client (taskset -c), default 1")
    p.add_argument(
        "--client-transport",
        choices=("native", "uvloop", "aiofastnet"),
        default="native",
        help="native (default): the bench client's Cython engine; uvloop / aiofastnet: the previous client "
        "(fastws.client) on those transports",
    )
    p.add_argument("--port", type=int, default=9100, help="first port - 1 (one port per server)")
    p.add_argument("--keep", action="store_true", help="keep old result files in bench/results/")
    p.add_argument("--no-plot", action="store_true", help="skip bench/results/compare.png")
    p.add_argument(
        "--output", default=str(HERE / "RESULTS.md"), help="the Markdown report (default bench/RESULTS.md)"
    )
    p.add_argument(
        "--results-dir", default=str(RESULTS_DIR), help="where the JSON files go (default bench/results)"
    )
    p.add_argument("--scale", type=int, default=None,
                   help="also run bench/scale.py with this many connections (full preset: 50000; 0: skip)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report from summary.json (and scale.json) without measuring")
    args = p.parse_args()
    RESULTS_DIR = Path(args.results_dir)
    if args.report_only:
        summary = json.loads((RESULTS_DIR / "summary.json").read_text())
        scale_file = RESULTS_DIR / "scale.json"
        if scale_file.exists():
            summary["scale"] = json.loads(scale_file.read_text())
        write_markdown(summary, Path(args.output), summary["command"])
        print(f"wrote {args.output}")
        return 0
    if subprocess.run(["taskset", "-c", args.client_cpu, "true"], capture_output=True).returncode != 0:
        print(f"taskset cannot pin to CPU {args.client_cpu}: use --server-cpu/--client-cpu", file=sys.stderr)
        return 2
    command = "python bench/compare.py " + shlex.join(sys.argv[1:])
    summary = run_all(args)
    n_scale = args.scale if args.scale is not None else (50_000 if args.preset == "full" else 0)
    if n_scale:
        print(f"== scale: {n_scale:,} connections on one node", flush=True)
        cmd = [PY, str(HERE / "scale.py"), "--connections", str(n_scale),
               "--json", str(RESULTS_DIR / "scale.json"), "--output", str(RESULTS_DIR / "SCALE.md")]
        subprocess.run(cmd, check=False, timeout=1800)
        if (RESULTS_DIR / "scale.json").exists():
            summary["scale"] = json.loads((RESULTS_DIR / "scale.json").read_text())
    summary["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    summary["machine"] = machine()
    summary["command"] = command
    summary["server_cpu"], summary["client_cpu"] = args.server_cpu, args.client_cpu
    (RESULTS_DIR / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_markdown(summary, Path(args.output), command)
    print(f"wrote {args.output} and {RESULTS_DIR / 'summary.json'} in {summary['elapsed_s']:.0f} s")
    if not args.no_plot:
        files = sorted(str(f) for f in RESULTS_DIR.glob("*__*__r1.json"))
        if files:
            proc = subprocess.run(
                [PY, "-m", "fastws", "bench", "plot", *files, "-o", str(RESULTS_DIR / "compare.png")],
                capture_output=True,
                text=True,
            )
            print((proc.stdout or proc.stderr).strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
