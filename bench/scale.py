#!/usr/bin/env python
"""How many connections does one fastws node hold? The "50k question", measured.

    python bench/scale.py                      # 50,000 connections, writes bench/SCALE.md
    python bench/scale.py --connections 20000  # smaller

One node = `fastws serve` with enough worker processes that no process passes
the per-process open-file limit (SO_REUSEPORT spreads connections over them).
Three phases, each with `fastws bench` clients spread over 127.0.0.x source
addresses and several client processes:

1. idle: ramp to N connections and hold them while the server pings each one
   every --ping-interval seconds: handshakes/s during the ramp, failures by
   cause, the node's total RSS (master + workers) and bytes per connection,
   and the CPU that keepalive costs;
2. active: with the N connections still held, --active more connections echo
   64-byte messages (1 in flight each): messages/s the node still serves;
3. push: one worker, --subscribers clients on the demo's /feed channel and one
   publisher: a message framed once and written to every subscriber, with
   delivery latency and deliveries/s.

compare.py runs this too (its full preset) and puts the tables in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PY = sys.executable
PER_WORKER = 15_000  # below the 20,000 open files a process may have here


def fd_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def node_cpu_seconds(master: int) -> float:
    """User + system CPU seconds of the master and its worker processes so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [master]
    try:
        pids += [int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
    except OSError:
        pass
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fastws serve exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                time.sleep(0.5)  # every worker listening
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"fastws serve did not listen on {port}")


class Node:
    """`fastws serve` with W workers, stopped (SIGTERM to the master) on exit."""

    def __init__(self, port: int, workers: int, ping_interval: float, log: Path) -> None:
        self.command = [PY, "-m", "fastws", "serve", "--port", str(port), "--workers", str(workers),
                        "--ping-interval", str(ping_interval), "--ping-timeout", str(max(ping_interval, 10)),
                        "--log-level", "warning"]
        self._log = open(log, "w")
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_listening(port, self.proc)

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        self._log.close()


def bench(mode: str, url: str, out: Path, *args: str, timeout: float) -> dict[str, Any]:
    cmd = [PY, "-m", "fastws", "bench", mode, url, "--quiet", "--json", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{shlex.join(cmd)} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
    return json.loads(out.read_text())["results"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.connections
    workers = args.workers or max(2, math.ceil(n / PER_WORKER))
    tmp = Path(tempfile.mkdtemp(prefix="fastws-scale-"))
    result: dict[str, Any] = {"connections": n, "workers": workers, "ping_interval": args.ping_interval,
                              "active_connections": args.active,
                              "fd_limit_per_process": fd_limit(), "cpus": os.cpu_count()}
    port = args.port
    with Node(port, workers, args.ping_interval, tmp / "node.log") as node:
        result["server_command"] = shlex.join(node.command)
        url = f"ws://127.0.0.1:{port}/echo"
        hold = args.hold + args.duration + 10  # the idle set stays up through the active phase
        idle: dict[str, Any] = {}

        def hold_idle() -> None:
            try:
                idle.update(bench("connections", url, tmp / "idle.json", "--connections", str(n),
                                  "--duration", str(hold), "--server-pid", str(node.proc.pid),
                                  "--concurrency", "200", timeout=hold + 600))
            except Exception as exc:  # reported below
                idle["error"] = str(exc)

        holder = threading.Thread(target=hold_idle)
        holder.start()
        # wait until the ramp is done: the node's connection count reaches N (or the ramp gives up)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and holder.is_alive() and node_sessions(port, workers) < n * 0.99:
            time.sleep(1.0)
        cpu0, t0 = node_cpu_seconds(node.proc.pid), time.monotonic()
        time.sleep(args.hold)
        result["idle_cpu_percent"] = round(100 * (node_cpu_seconds(node.proc.pid) - cpu0)
                                           / (time.monotonic() - t0), 1)
        result["sessions_before_active"] = node_sessions(port, workers)
        active = bench("throughput", url, tmp / "active.json", "--connections", str(args.active),
                       "--inflight", "1", "--size", "64", "--duration", str(args.duration),
                       "--processes", "2", "--server-pid", str(node.proc.pid), timeout=600)
        holder.join()
        result["idle"] = idle
        result["active"] = {k: active.get(k) for k in ("msgs_per_s", "mb_per_s", "latency_us", "errors",
                                                        "server_cpu_percent", "client_cpu_percent")}
    with Node(port + 1, 1, args.ping_interval, tmp / "push.log") as node:
        push = bench("broadcast", f"ws://127.0.0.1:{port + 1}/feed", tmp / "push.json",
                     "--connections", str(args.subscribers), "--count", str(args.messages),
                     "--rate", str(args.rate), "--duration", str(args.duration), "--grace", "30",
                     "--server-pid", str(node.proc.pid), timeout=600)
        result["push"] = push
    return result


def node_sessions(port: int, workers: int) -> int:
    """Open sessions over all workers, from /healthz (each probe lands on some worker)."""
    seen: dict[int, int] = {}
    for _ in range(workers * 8):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            health = json.loads(data.partition(b"\r\n\r\n")[2])
            seen[health["pid"]] = health["connections"]
        except (OSError, ValueError):
            continue
        if len(seen) == workers:
            break
    return sum(seen.values())


def markdown(r: dict[str, Any], command: str) -> str:
    idle, active, push = r.get("idle", {}), r.get("active", {}), r.get("push", {})
    server = idle.get("server", {})
    bpc = server.get("bytes_per_connection")
    rate = f"at {push['publish_rate']:g}/s" if push.get("publish_rate") else "as fast as possible"
    rate = f"at {push['publish_rate']:g}/s" if push.get("publish_rate") else "as fast as possible"
    lines = [
        "## One node, many connections (the 50k question)",
        "",
        f"`{command}`: `{r['server_command']}` on this {r['cpus']}-CPU machine; clients and server share "
        "both CPUs (no pinning), connections come from several client processes over 127.0.0.x source "
        f"addresses. The open-file limit is {r['fd_limit_per_process']:,} per process, so the node runs "
        f"{r['workers']} workers (SO_REUSEPORT).",
        "",
        "| what | figure |",
        "|---|---|",
        f"| connections opened / failed | {idle.get('opened', 0):,} / {idle.get('failed', 0):,} |",
        f"| handshakes/s during the ramp | {idle.get('handshakes_per_s', 0):,.0f} |",
        f"| node RSS before → with all connections | {server.get('rss_before', 0) / 2**20:,.0f} MiB → "
        f"{server.get('rss_after_ramp', 0) / 2**20:,.0f} MiB |",
        f"| bytes per idle connection (whole node) | {bpc:,.0f} |" if bpc else "| bytes per idle connection | — |",
        f"| node CPU while only holding them, each pinged every {r['ping_interval']:g} s | "
        f"{r.get('idle_cpu_percent', 0):.1f} % of one core |",
        f"| dropped while held | {idle.get('dropped_during_hold', 0):,} |",
        f"| sessions when the active clients started | {r.get('sessions_before_active', 0):,} |",
        f"| meanwhile {r['active_connections']:,} more connections echo 64 B, 1 in flight | "
        f"{active.get('msgs_per_s') or 0:,.0f} msgs/s (server CPU {active.get('server_cpu_percent') or 0:.0f} %) |",
        f"| push: {push.get('messages_sent', 0):,} messages "
        f"{rate} to "
        f"{push.get('subscribers', 0):,} /feed subscribers (1 worker) | "
        f"{push.get('deliveries_per_s', 0):,.0f} deliveries/s, {push.get('lost', 0):,} not delivered, latency p50 "
        f"{(push.get('latency_us') or {}).get('p50', 0) / 1000:,.1f} ms, p99 "
        f"{(push.get('latency_us') or {}).get('p99', 0) / 1000:,.1f} ms |",
        "",
    ]
    if idle.get("failures"):
        lines += ["Failures by cause: " + ", ".join(f"{k} {v}" for k, v in idle["failures"].items())
                  + (f"; first limit reached: {idle['limit']}" if idle.get("limit") else "") + ".", ""]
    if idle.get("error"):
        lines += [f"Idle phase error: {idle['error']}", ""]
    lines += [
        "What limits a node: memory is not it — at the figure above, 24 GiB would hold millions of idle "
        "connections. Per process the open-file limit caps a worker at under 20,000 connections (hence "
        "workers); per source address the ephemeral port range caps a client (hence 127.0.0.x). With "
        "traffic, the limit is CPU: each message costs a read and a write system call per connection, "
        "so a busy node needs cores, one worker per core.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=50_000)
    p.add_argument("--workers", type=int, default=0, help="default: one per 15,000 connections, at least 2")
    p.add_argument("--active", type=int, default=1000, help="extra connections echoing during the hold")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of the active phase")
    p.add_argument("--hold", type=float, default=10.0, help="seconds held idle before the active phase")
    p.add_argument("--ping-interval", type=float, default=5.0)
    p.add_argument("--subscribers", type=int, default=10_000)
    p.add_argument("--messages", type=int, default=50, help="messages published in the push phase")
    p.add_argument("--rate", type=float, default=0,
                   help="messages published per second in the push phase (0: as fast as possible)")
    p.add_argument("--port", type=int, default=9300)
    p.add_argument("--json", default=str(HERE / "results" / "scale.json"))
    p.add_argument("--output", default=str(HERE / "results" / "SCALE.md"))
    args = p.parse_args()
    result = run(args)
    command = "python bench/scale.py " + shlex.join(sys.argv[1:])
    result["command"] = command
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    Path(args.output).write_text("# fastws scale\n\n" + markdown(result, command))
    print(markdown(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
