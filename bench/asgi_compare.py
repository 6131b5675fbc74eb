#!/usr/bin/env python
"""The same FastAPI echo app on uvicorn with each WebSocket implementation, and on granian.

    python bench/asgi_compare.py            # 3 rounds, 3 s windows: about 6 minutes
    python bench/asgi_compare.py --quick    # 1 round, 1.5 s windows: about 1.5 minutes

Variants: uvicorn ``--ws fastws.asgi:FastWSProtocol``, ``--ws websockets-sansio``
(uvicorn's default), ``--ws wsproto``, and granian's own WebSockets (if it
imports).  Every one serves bench/servers/asgi_fastapi_echo.py unchanged,
alone on CPU 0 (``taskset -c 0``), uvloop + httptools for uvicorn; the client,
``fastws bench throughput`` (the fastws wire core), runs on CPU 1.  Workloads:
64 B / 1 KiB / 64 KiB at 1 connection (32 / 16 / 4 messages in flight) and at
100 connections (1 in flight each), msgs/s.  The rounds interleave the
variants (A B C D, A B C D, ...) and the median is shown, so a disturbance
hits one round of every variant rather than all of one.

The script holds /tmp/fastws-cpu.lock (flock) while it measures (``--no-lock``
if you already hold it), and writes its table as the section "ASGI: FastAPI on
uvicorn, by WebSocket implementation" of bench/RESULTS.md (replacing that
section on a re-run, leaving the rest of the file alone).  Raw results:
``--results-dir`` (default /tmp/fastws-asgi-bench).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from benchutil import cpu_model, write_section  # bench/benchutil.py

HERE = Path(__file__).resolve().parent
SERVERS = HERE / "servers"
RESULTS_MD = HERE / "RESULTS.md"
SECTION = "## ASGI: FastAPI on uvicorn, by WebSocket implementation"
LOCK = "/tmp/fastws-cpu.lock"
PY = sys.executable
APPS = {"fastapi": "asgi_fastapi_echo:app", "bare": "asgi_raw_echo:app"}  # --app bare: what FastAPI costs
BASELINE = "websockets-sansio"
PACKAGES = ("fastws", "uvicorn", "fastapi", "starlette", "websockets", "wsproto", "granian", "uvloop", "httptools")
KIB = 1024


@dataclass
class Variant:
    name: str
    command: list[str]  # after `taskset -c CPU`; {port} is replaced
    module: str  # must import for the variant to run
    note: str = ""


def uvicorn_variant(name: str, ws: str, note: str = "") -> Variant:
    return Variant(name, [PY, "-m", "uvicorn", "{app}", "--app-dir", str(SERVERS), "--host", "127.0.0.1", "--port",
                          "{port}", "--ws", ws, "--loop", "uvloop", "--http", "httptools", "--log-level", "warning",
                          "--no-access-log"], "uvicorn", note)


VARIANTS = [
    uvicorn_variant("fastws", "fastws.asgi:FastWSProtocol", "uvicorn --ws fastws.asgi:FastWSProtocol"),
    uvicorn_variant(BASELINE, "websockets-sansio", "uvicorn's default --ws"),
    uvicorn_variant("wsproto", "wsproto", "uvicorn --ws wsproto"),
    Variant("granian", [PY, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", "{port}",
                        "--workers", "1", "--log-level", "warning", "{app}"], "granian",
            "granian's own WebSockets (Rust), 1 worker"),
]


@dataclass
class Workload:
    key: str
    size: int
    connections: int
    inflight: int
    title: str = field(init=False)

    def __post_init__(self) -> None:
        size = f"{self.size // KIB} KiB" if self.size >= KIB else f"{self.size} B"
        self.title = f"{size}, {self.connections} conn x {self.inflight} in flight"


WORKLOADS = [
    Workload("64B_c1", 64, 1, 32),
    Workload("64B_c100", 64, 100, 1),
    Workload("1KiB_c1", KIB, 1, 16),
    Workload("1KiB_c100", KIB, 100, 1),
    Workload("64KiB_c1", 64 * KIB, 1, 4),
    Workload("64KiB_c100", 64 * KIB, 100, 1),
]
SMALL = ("64B_c1", "64B_c100")  # the target: >= 2x the baseline on small messages


@contextlib.contextmanager
def cpu_lock(enabled: bool) -> Iterator[None]:
    """Hold the machine's benchmark lock (other engineers' heavy jobs take it too)."""
    if not enabled:
        yield
        return
    with open(LOCK, "a") as fd:
        print(f"waiting for {LOCK} ...", flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def importable(module: str) -> bool:
    return subprocess.run([PY, "-c", f"import {module}"], capture_output=True, timeout=60).returncode == 0


class Server:
    def __init__(self, variant: Variant, cpu: str, log: Path, app: str) -> None:
        self.port = free_port()
        self.command = ["taskset", "-c", cpu] + [a.replace("{port}", str(self.port)).replace("{app}", app)
                                                 for a in variant.command]
        self._log = open(log, "a")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent / "src"),
                                                                         os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(self.command, cwd=SERVERS, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with code {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    time.sleep(0.5)  # uvicorn listens after startup; granian's workers may lag its socket
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"not listening on {self.port} after {timeout:g} s")

    def stop(self) -> None:
        for sig, wait in ((signal.SIGINT, 10.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait)
        self._log.close()

    def pids(self) -> list[int]:
        """The server's processes (taskset execs; granian forks a worker)."""
        out = subprocess.run(["pgrep", "-g", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()] or [self.proc.pid]


def run_workload(server: Server, w: Workload, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = ["taskset", "-c", args.client_cpu, PY, "-m", "fastws", "bench", "throughput",
           f"ws://127.0.0.1:{server.port}/echo", "--size", str(w.size), "--connections", str(w.connections),
           "--inflight", str(w.inflight), "--duration", str(args.duration), "--warmup", str(args.warmup),
           "--quiet", "--json", str(out), "--label", out.stem]
    for pid in server.pids():
        cmd += ["--server-pid", str(pid)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120 + 3 * args.duration)
    if proc.returncode != 0 or not out.exists():
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit code {proc.returncode}")
    return json.loads(out.read_text())["results"]  # type: ignore[no-any-return]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    variants = [v for v in VARIANTS if not args.only or v.name in args.only.split(",")]
    skipped = {v.name: f"{v.module} does not import" for v in variants if not importable(v.module)}
    variants = [v for v in variants if v.name not in skipped]
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {v.name: {w.key: [] for w in WORKLOADS} for v in variants}
    errors: dict[str, str] = {}
    commands: dict[str, str] = {}
    started = time.monotonic()
    for rnd in range(args.rounds):
        for v in variants:
            server = Server(v, args.server_cpu, results_dir / f"{v.name}.log", APPS[args.app])
            commands[v.name] = shlex.join(server.command)
            try:
                server.wait_ready()
                for w in WORKLOADS:
                    try:
                        r = run_workload(server, w, args, results_dir / f"{v.name}__{w.key}__r{rnd + 1}.json")
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        errors[f"{v.name}/{w.key}"] = str(exc)
                        print(f"  {v.name:18} {w.key:11} FAILED: {exc}", flush=True)
                        continue
                    runs[v.name][w.key].append(r)
                    print(f"  round {rnd + 1} {v.name:18} {w.key:11} {r['msgs_per_s']:>10,.0f} msgs/s  "
                          f"server {r.get('server_cpu_percent')} %  client {r.get('client_cpu_percent')} %",
                          flush=True)
                    if server.proc.poll() is not None:
                        raise RuntimeError(f"{v.name} died during {w.key}")
            except RuntimeError as exc:
                errors[v.name] = str(exc)
                print(f"  {v.name}: {exc}", flush=True)
            finally:
                server.stop()
    medians = {
        name: {key: {"msgs_per_s": statistics.median(r["msgs_per_s"] for r in rs),
                     "spread": [min(r["msgs_per_s"] for r in rs), max(r["msgs_per_s"] for r in rs)],
                     "server_cpu": _median_cpu(rs, "server_cpu_percent"),
                     "client_cpu": _median_cpu(rs, "client_cpu_percent")}
               for key, rs in per.items() if rs}
        for name, per in runs.items()
    }
    return {"medians": medians, "skipped": skipped, "errors": errors, "commands": commands,
            "notes": {v.name: v.note for v in variants}, "elapsed_s": round(time.monotonic() - started)}


def _median_cpu(rs: list[dict[str, Any]], key: str) -> float | None:
    values = [v[0] if isinstance(v, list) and v else v for v in (r.get(key) for r in rs)]
    numbers = [float(v) for v in values if isinstance(v, (int, float))]
    return round(statistics.median(numbers)) if numbers else None


def versions() -> str:
    found = []
    for pkg in PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{pkg} {version(pkg)}")
    return ", ".join(found)


def section_title(app: str) -> str:
    return SECTION if app == "fastapi" else "## ASGI: a bare ASGI echo on uvicorn, by WebSocket implementation"


def markdown(summary: dict[str, Any], command: str) -> str:
    med = summary["medians"]
    names = list(med)
    base = med.get(BASELINE, {})
    app = ("The same FastAPI app (`bench/servers/asgi_fastapi_echo.py`, `receive()` then "
           "`send_text`/`send_bytes` back)" if summary["app"] == "fastapi" else
           "The same bare ASGI echo (`bench/servers/asgi_raw_echo.py`, no framework)")
    lines = [
        section_title(summary["app"]),
        "",
        f"Generated by `{command}` on {summary['date']} ({summary['rounds']} round(s), median shown; "
        f"{summary['elapsed_s']} s in all). {app} on every variant; only `--ws` changes.",
        "",
        f"- Machine: {cpu_model()}, {os.cpu_count()} CPUs; kernel {platform.release()}, "
        f"Python {platform.python_version()}",
        f"- Versions: {versions()}",
        f"- Server alone on CPU {summary['server_cpu']} (`taskset`), client (`fastws bench throughput`) on "
        f"CPU {summary['client_cpu']}; loopback; {summary['warmup']} s warm-up + {summary['duration']} s "
        "measured per figure; no compression (the client offers none).",
        *([f"- Note: {summary['note']}"] if summary.get("note") else []),
        f"- `x {BASELINE}`: ratio to uvicorn's default WebSocket implementation in the same run. CPU: share "
        "of one core used by the server / the client; a server below 100 % is waiting on the client or on "
        "round trips, not on its own work.",
        "",
        "| workload | " + " | ".join(names) + " | " + " | ".join(f"{n} x {BASELINE}" for n in names
                                                             if n != BASELINE) + " | server / client CPU |",
        "|---|" + "---|" * (2 * len(names) - (1 if BASELINE in names else 0)) + "---|",
    ]
    for w in WORKLOADS:
        row = [w.title]
        for n in names:
            r = med[n].get(w.key)
            row.append(f"{r['msgs_per_s']:,.0f}" if r else "—")
        for n in names:
            if n == BASELINE:
                continue
            r, b = med[n].get(w.key), base.get(w.key)
            row.append(f"{r['msgs_per_s'] / b['msgs_per_s']:.2f}x" if r and b else "—")
        cpu = "; ".join(f"{n} {med[n][w.key]['server_cpu']}/{med[n][w.key]['client_cpu']} %"
                        for n in names if w.key in med[n])
        row.append(cpu)
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Targets (fastws vs " + BASELINE + "):", ""]
    fw = med.get("fastws", {})
    for key in SMALL:
        r, b = fw.get(key), base.get(key)
        if r and b:
            ratio = r["msgs_per_s"] / b["msgs_per_s"]
            lines.append(f"- {key}: {ratio:.2f}x ({'met' if ratio >= 2 else 'NOT met'}: >= 2x on small messages)")
    slower = [w.key for w in WORKLOADS if fw.get(w.key) and base.get(w.key)
              and fw[w.key]["msgs_per_s"] < base[w.key]["msgs_per_s"]]
    lines.append(f"- no row slower than {BASELINE}: {'met' if not slower else 'NOT met: ' + ', '.join(slower)}")
    if summary["skipped"] or summary["errors"]:
        lines += ["", "Not measured:", ""]
        lines += [f"- {name}: {why}" for name, why in {**summary["skipped"], **summary["errors"]}.items()]
    lines += ["", "Server commands:", ""]
    lines += [f"- {n} ({summary['notes'][n]}): `{c}`" for n, c in summary["commands"].items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 round, 1.5 s windows")
    p.add_argument("--rounds", type=int, default=None, help="rounds of every variant (default 3; quick: 1)")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per figure (default 3)")
    p.add_argument("--warmup", type=float, default=None, help="unmeasured seconds first (default 0.5)")
    p.add_argument("--only", default="", help="comma-separated variants (default: all)")
    p.add_argument("--app", choices=sorted(APPS), default="fastapi",
                   help="the echo app every variant serves (default fastapi; bare: no framework)")
    p.add_argument("--server-cpu", default="0")
    p.add_argument("--client-cpu", default="1")
    p.add_argument("--results-dir", default="/tmp/fastws-asgi-bench")
    p.add_argument("--no-lock", action="store_true", help=f"do not take {LOCK} (you hold it already)")
    p.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    p.add_argument("--render", metavar="SUMMARY_JSON", help="no measuring: the table of a saved summary.json")
    p.add_argument("--note", default="", help="a line for the section (e.g. how quiet the machine was)")
    args = p.parse_args()
    if args.render:  # a table again from a saved run (its own command line is in it)
        summary = json.loads(Path(args.render).read_text())
    else:
        args.rounds = args.rounds or (1 if args.quick else 3)
        args.duration = args.duration or (1.5 if args.quick else 3.0)
        args.warmup = args.warmup if args.warmup is not None else 0.5
        with cpu_lock(not args.no_lock):
            summary = measure(args)
        command = "python bench/asgi_compare.py" + "".join(
            f" {a}" for a in sys.argv[1:] if a not in ("--no-lock", "--no-write"))
        summary.update(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), rounds=args.rounds,
                       app=args.app, duration=args.duration, warmup=args.warmup, server_cpu=args.server_cpu,
                       client_cpu=args.client_cpu, command=command)
        (Path(args.results_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.note:
        summary["note"] = args.note
    text = markdown(summary, summary["command"])
    print()
    print(text)
    if not args.no_write:
        write_section(text, RESULTS_MD)
        print(f"wrote the section to {RESULTS_MD}")
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
