#!/usr/bin/env python
"""`fastws bench throughput` against the independent reference client, on the same server, back to back.

    cd bench/peers && python setup.py build_ext --inplace && cd ../..    # the reference client (once)
    python bench/peers/compare_clients.py                                # both placements, every workload
    python bench/peers/compare_clients.py --placement pinned --workloads c1_64B,c100_64B --repeat 5

One server (`fastws serve`, the demo app: /echo echoes) per placement:
``pinned`` puts it on CPU 0 and both clients on CPU 1 (taskset); ``unpinned``
lets the scheduler place everything, as a new user would.  Each workload runs
the two clients alternately, ``--repeat`` times each with the order swapped
every round, while holding the shared CPU lock /tmp/fastws-cpu.lock (about a
minute per workload: both clients are measured under the same conditions),
and reports the median msgs/s of each, their ratio (fastws bench / reference:
the issue wants >= 0.9) and the CPU of both clients and of the server.  The
reference is bench/peers/picows_bench.py: picows on aiofastnet with a Cython
listener.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PY = sys.executable
LOCK = "/tmp/fastws-cpu.lock"

# key: (connections, in flight, size) - the throughput shapes of bench/compare.py, and the 10 x 4.
WORKLOADS = {
    "c1_64B": (1, 32, 64),
    "c100_64B": (100, 1, 64),
    "c1_64KiB": (1, 4, 65536),
    "c100_64KiB": (100, 1, 65536),
    "c10x4_64B": (10, 4, 64),
}
PLACEMENTS = {"pinned": ("0", "1"), "unpinned": (None, None)}  # (server CPU, client CPU)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, cpu: str | None) -> subprocess.Popen:
    cmd = [PY, "-m", "fastws", "serve", "--port", str(port), "--log-level", "warning",
           "--max-message-size", "16777216"]
    if cpu is not None:
        cmd = ["taskset", "-c", cpu, *cmd]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def client_commands(url: str, shape: tuple[int, int, int], args: argparse.Namespace, cpu: str | None,
                    pid: int, out: Path) -> dict[str, list[str]]:
    c, i, s = shape
    window = ["-d", str(args.duration), "-w", str(args.warmup)]
    shape_args = ["-c", str(c), "-i", str(i), "-s", str(s)]
    fastws = [PY, "-m", "fastws", "bench", "throughput", url, *shape_args, *window, "--quiet",
              "--server-pid", str(pid), "--json", str(out / "fastws.json")]
    if cpu is not None:
        fastws += ["--pin", cpu]
    ref = [PY, str(HERE / "picows_bench.py"), url, *shape_args, *window, "--server-pid", str(pid),
           "--json", str(out / "ref.json")]
    if cpu is not None:
        ref = ["taskset", "-c", cpu, *ref]
    return {"fastws": fastws, "reference": ref}


class CpuLock:
    """The shared CPU lock, held while one workload is measured (both clients, every repeat, back to back)."""

    def __enter__(self) -> CpuLock:
        self.file = open(LOCK, "a")
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def run(cmd: list[str], timeout: float) -> None:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed: {(proc.stderr or proc.stdout)[-800:]}")


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for placement in args.placement.split(","):
        server_cpu, client_cpu = PLACEMENTS[placement]
        port = free_port()
        server = start_server(port, server_cpu)
        url = f"ws://127.0.0.1:{port}/echo"
        try:
            for key in args.workloads.split(","):
                shape = WORKLOADS[key]
                runs: dict[str, list[dict[str, Any]]] = {"fastws": [], "reference": []}
                with tempfile.TemporaryDirectory() as tmp, CpuLock():
                    cmds = client_commands(url, shape, args, client_cpu, server.pid, Path(tmp))
                    for rep in range(args.repeat):
                        order = ["fastws", "reference"] if rep % 2 == 0 else ["reference", "fastws"]
                        for who in order:
                            run(cmds[who], timeout=args.duration * 3 + 60)
                            data = json.loads((Path(tmp) / ("fastws.json" if who == "fastws" else "ref.json"))
                                              .read_text())
                            res = data.get("results", data)
                            runs[who].append({
                                "msgs_per_s": res["msgs_per_s"],
                                "client_cpu": sum(res["client_cpu_percent"])
                                if isinstance(res["client_cpu_percent"], list) else res["client_cpu_percent"],
                                "server_cpu": res["server_cpu_percent"],
                                "limit": res.get("limit", ""),  # fastws bench's own verdict
                            })
                row = {"placement": placement, "workload": key, "shape": shape,
                       "commands": {k: shlex.join(v[:-2]) for k, v in cmds.items()}}
                for who, rs in runs.items():
                    best = sorted(rs, key=lambda r: r["msgs_per_s"])[len(rs) // 2]
                    row[who] = dict(best, all=[r["msgs_per_s"] for r in rs])
                row["ratio"] = round(row["fastws"]["msgs_per_s"] / row["reference"]["msgs_per_s"], 3)
                rows.append(row)
                print(line(row), flush=True)
        finally:
            server.terminate()
            server.wait(10)
    return rows


def line(row: dict[str, Any]) -> str:
    f, r = row["fastws"], row["reference"]
    return (f"| {row['placement']} | {row['workload']} | {f['msgs_per_s']:,.0f} | {r['msgs_per_s']:,.0f} "
            f"| {row['ratio']:.2f}x | {f['client_cpu']:.0f} / {f['server_cpu']:.0f} % "
            f"| {r['client_cpu']:.0f} / {r['server_cpu']:.0f} % | {f['limit'].split(':')[0]} |")


HEADER = ("| placement | workload (conns x in flight, size) | fastws bench msgs/s | picows reference msgs/s "
          "| ratio | fastws bench: client / server CPU | reference: client / server CPU | fastws bench says |\n"
          "|---|---|---|---|---|---|---|---|")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--placement", default="pinned,unpinned", help="pinned, unpinned or both (default)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="subset of: " + ", ".join(WORKLOADS))
    p.add_argument("--repeat", type=int, default=3, help="runs of each client per workload (median shown)")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--json", help="save every figure here")
    args = p.parse_args()
    if not (HERE / "build").exists() and not any(HERE.glob("picows_echo_client*.so")):
        print("build the reference client first: cd bench/peers && python setup.py build_ext --inplace",
              file=sys.stderr)
        return 2
    print(HEADER, flush=True)
    rows = measure(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": shlex.join(sys.argv), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out
    raise SystemExit(main())
