"""What metrics and the access log cost on the echo path, in one run: the same echo workload against
`fastws serve` with its defaults, with --metrics, with --metrics --access-log, and (optionally) a
tree from before the wire-core counters existed.

    python bench/overhead.py [--baseline-src DIR] [--rounds 3] [--seconds 4] [--size 64]

Rounds alternate the servers (A B C A B C ...) so that a machine whose load changes hurts them
alike; the table gives the best round of each (echoes/s, server CPU, server CPU per echo).  Server
pinned to core 0, client (fastws.client, --streams connections x --inflight messages) to core 1.
The client is often the limit on a 2-core machine: for small differences use bench/echo_cost.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys

from benchutil import free_port  # bench/benchutil.py
from tls import pinned, throughput, wait_port  # bench/tls.py


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-src", help="a src/ directory with fastws built in place (before the counters)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--inflight", type=int, default=32)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    serve = [sys.executable, "-m", "fastws", "serve", "--log-level", "info", "--ping-interval", "0"]
    variants: list[tuple[str, list[str], dict[str, str]]] = [
        ("defaults (metrics off, no access log)", [], {}),
        ("--metrics", ["--metrics"], {}),
        ("--metrics --access-log", ["--metrics", "--access-log"], {}),
    ]
    if args.baseline_src:
        variants.insert(0, ("baseline (no counters)", [], {"PYTHONPATH": args.baseline_src}))
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.rounds):
        for name, extra, env in variants:
            port = free_port()
            proc = subprocess.Popen(pinned([*serve, "--port", str(port), *extra]), env={**os.environ, **env},
                                    stderr=subprocess.DEVNULL)
            try:
                await wait_port(port, proc)
                rate, cpu = await throughput(f"ws://127.0.0.1:{port}/echo", proc.pid, args.streams, args.inflight,
                                             args.size, args.seconds, None)
            finally:
                proc.terminate()
                proc.wait(30)
            if rate > best.get(name, (0.0, 0.0))[0]:
                best[name] = (rate, cpu)
            print(f"{name:40} {rate:12,.0f} echoes/s  server CPU {cpu:5.1f} %", flush=True)
    print("best of each:")
    reference = best[variants[0][0]][0]
    for name, (rate, cpu) in best.items():
        print(f"{name:40} {rate:12,.0f} echoes/s  {100 * rate / reference:6.1f} %  server CPU {cpu:5.1f} %  "
              f"{cpu / 100 / rate * 1e6:5.2f} µs per echo")
    print(json.dumps({"args": vars(args), "best": {k: {"echoes_per_s": round(r), "server_cpu": c}
                                                   for k, (r, c) in best.items()}}))


if __name__ == "__main__":
    asyncio.run(main())
