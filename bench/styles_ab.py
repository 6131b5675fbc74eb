#!/usr/bin/env python
"""Interleaved A/B of the API styles (or of two trees), medians over rounds, in one run.

    python bench/styles_ab.py                                   # 64 B, 100 connections, 1 in flight
    python bench/styles_ab.py -s 1K -c 1 -i 16 --rounds 5
    python bench/styles_ab.py --variants endpoint,handler@/tmp/old/src,handler

Each variant is `STYLE` or `STYLE@PYTHONPATH` (a built tree: `python setup.py build_ext --inplace`
there first); STYLE is a bench/servers/fastws_styles.py style (endpoint, handler, async, handler-del).  Every
round starts each variant's server afresh on CPU 0 (taskset) and runs `fastws bench throughput`
against it on CPU 1, the variants taking turns, so that a machine whose speed drifts by tens of
percent between minutes still compares them fairly.  Prints each variant's median msgs/s, its
rounds, and its ratio to the first variant.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from benchutil import cpu_model, free_port, wait_listening  # bench/benchutil.py

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def one_round(style: str, tree: str, args: argparse.Namespace) -> int:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{HERE / 'servers'}")
    server = subprocess.Popen(["taskset", "-c", "0", sys.executable, str(HERE / "servers" / "fastws_styles.py"),
                               "--port", str(port), "--style", style],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_listening(port, server, 10)
        out = subprocess.run(["taskset", "-c", "1", sys.executable, "-m", "fastws", "bench", "throughput",
                              f"ws://127.0.0.1:{port}/echo", "-s", args.size, "-c", str(args.connections),
                              "-i", str(args.inflight), "-d", str(args.duration), "-w", "0.5"],
                             capture_output=True, text=True, check=True).stdout
    finally:
        server.terminate()
        server.wait()
    found = re.search(r"messages/s\s+([\d,]+)", out)
    if found is None:
        raise SystemExit(f"styles_ab: no messages/s in the bench client's output:\n{out}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="endpoint,handler,async")
    parser.add_argument("-s", "--size", default="64")
    parser.add_argument("-c", "--connections", type=int, default=100)
    parser.add_argument("-i", "--inflight", type=int, default=1)
    parser.add_argument("-d", "--duration", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    variants = args.variants.split(",")
    rates: dict[str, list[int]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            style, _, tree = variant.partition("@")
            rates[variant].append(one_round(style, tree or str(SRC), args))
    print(f"{args.size} B, {args.connections} connections x {args.inflight} in flight, {args.rounds} rounds of "
          f"{args.duration:g} s; {cpu_model()}, Python {sys.version.split()[0]}")
    first = statistics.median(rates[variants[0]])
    for variant, values in rates.items():
        median = statistics.median(values)
        print(f"{variant:32s} {median:>10,.0f} msgs/s  {median / first:5.2f}x  {values}")


if __name__ == "__main__":
    main()
