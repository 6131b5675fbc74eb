#!/usr/bin/env python
"""The independent reference client: picows (ws_connect on aiofastnet) with a Cython listener.

    cd bench/peers && python setup.py build_ext --inplace       # builds picows_echo_client (once)
    python bench/peers/picows_bench.py ws://127.0.0.1:9001/echo -c 100 -i 1 -s 64 -d 3

The same workload shapes as `fastws bench throughput` (C connections x I
messages of S bytes in flight, warm-up, measured window): every echo is
answered by the listener in Cython (picows_echo_client.pyx) with pre-built,
pre-masked frames, one write per read.  One process, the uvloop loop, picows'
default transports (aiofastnet when installed).  Prints msgs/s, MB/s and the
CPU of the client (and of the server with --server-pid); --json saves them.
It shares no code with fastws.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path

import uvloop
from picows import ws_connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    from picows_echo_client import EchoListener
except ImportError:
    sys.exit("build the listener first: cd bench/peers && python setup.py build_ext --inplace")


def masked_frame(payload: bytes, text: bool, key: bytes) -> bytes:
    """One client frame (FIN, masked with ``key``)."""
    n = len(payload)
    head = bytes([0x81 if text else 0x82])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    stream = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big") if n else b""
    return head + key + masked


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (/proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue
    return total / tick


def own_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def main(args: argparse.Namespace) -> dict:
    payload = (("fastws" * (args.size // 6 + 1))[: args.size]).encode() if args.text else (
        bytes(range(256)) * (args.size // 256 + 1))[: args.size]
    frame = masked_frame(payload, args.text, os.urandom(4))
    batches = [b""] + [frame * k for k in range(1, args.inflight + 1)]
    listeners: list[EchoListener] = []
    for _ in range(args.connections):
        _, listener = await ws_connect(
            lambda: EchoListener(batches), args.url, enable_auto_pong=False, max_frame_size=max(1 << 20, 2 * args.size)
        )
        listeners.append(listener)

    def received() -> int:
        return sum(x.received for x in listeners)

    for x in listeners:
        x.refill = True
        x.send_batch(args.inflight)
    await asyncio.sleep(args.warmup)
    c0, t0, cpu0 = received(), time.perf_counter(), own_cpu()
    s0 = cpu_seconds(args.server_pid) if args.server_pid else 0.0
    await asyncio.sleep(args.duration)
    c1, t1, cpu1 = received(), time.perf_counter(), own_cpu()
    s1 = cpu_seconds(args.server_pid) if args.server_pid else 0.0
    for x in listeners:
        x.refill = False
    rate = (c1 - c0) / (t1 - t0)
    return {
        "client": "picows + aiofastnet, Cython listener (bench/peers)",
        "url": args.url,
        "connections": args.connections,
        "inflight": args.inflight,
        "size": args.size,
        "messages": c1 - c0,
        "seconds": round(t1 - t0, 4),
        "msgs_per_s": round(rate, 1),
        "mb_per_s": round(rate * args.size / 1e6, 3),
        "client_cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
        "server_cpu_percent": round(100 * (s1 - s0) / (t1 - t0), 1) if args.server_pid else None,
    }


def parse_size(text: str) -> int:
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": 1 << 20}.get(text[-1:], 1)
    return int(float(text.rstrip("km")) * mult)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("-c", "--connections", type=int, default=1)
    p.add_argument("-i", "--inflight", type=int, default=16)
    p.add_argument("-s", "--size", type=parse_size, default=64)
    p.add_argument("-d", "--duration", type=float, default=3.0)
    p.add_argument("-w", "--warmup", type=float, default=1.0)
    p.add_argument("--text", action="store_true")
    p.add_argument("--server-pid", type=int)
    p.add_argument("--json")
    args = p.parse_args()
    result = uvloop.run(main(args))
    print(
        f"picows reference: {result['msgs_per_s']:,.0f} msg/s, {result['mb_per_s']:,.2f} MB/s, "
        f"client CPU {result['client_cpu_percent']:.0f} %"
        + (f", server CPU {result['server_cpu_percent']:.0f} %" if result["server_cpu_percent"] is not None else "")
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
