"""handshake: connect + upgrade + closing handshake, over and over, C at a time.

Reports completed cycles per second, the time to open (TCP connect until the
101 response is checked) as percentiles, and failures by cause.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from typing import Any

from fastws.bench.clients import open_ws
from fastws.bench.common import (
    BenchError,
    Ctl,
    Histogram,
    ServerCPU,
    Workers,
    classify_error,
    parse_target,
    process_cpu,
    source_addresses,
    split,
    wait_until,
)
from fastws.bench.throughput import _sleep_until, cpu_rows
from fastws.bench.ui import UI, num


async def worker(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
    target = parse_target(p["url"])
    sources = p["sources"]
    hist = Histogram()
    failures: collections.Counter[str] = collections.Counter()
    ctl.send("ready")
    cmd = await ctl.recv()
    if cmd["type"] != "start":
        return {}
    await _sleep_until(cmd["t_start"])
    t_end = cmd["t_end"]
    limit = p["count"]
    done = 0
    unclean = 0
    seq = p["index"] * 7919
    perf = time.perf_counter_ns

    async def loop_one() -> None:
        nonlocal done, unclean, seq
        while time.monotonic() < t_end and (not limit or done < limit):
            seq += 1
            local = (sources[seq % len(sources)], 0) if sources else None
            t0 = perf()
            try:
                conn = await open_ws(target, local_addr=local, open_timeout=p["open_timeout"])
            except Exception as exc:
                failures[classify_error(exc)] += 1
                if sum(failures.values()) > p["max_failures"]:
                    return
                await asyncio.sleep(0.001)
                continue
            hist.record(perf() - t0)
            await conn.close()
            if conn.close_code != 1000:
                unclean += 1
            done += 1
            ctl.progress(done)

    t0, cpu0 = time.perf_counter(), process_cpu()
    await asyncio.gather(*(loop_one() for _ in range(p["concurrency"])))
    seconds = time.perf_counter() - t0
    cpu = round(100 * (process_cpu() - cpu0) / seconds, 1) if seconds > 0 else 0.0
    return {
        "done": done,
        "seconds": seconds,
        "cpu_percent": cpu,
        "histogram": hist.to_json(),
        "failures": dict(failures),
        "unclean_close": unclean,
    }


def run(args: Any, ui: UI) -> dict[str, Any]:
    target = parse_target(args.url)
    procs = max(1, min(args.processes, args.connections))
    conc = split(args.connections, procs)
    sources = source_addresses(args.source_addresses) if target.loopback and args.source_addresses else []
    per_count = math.ceil(args.count / procs) if args.count else 0
    params = [
        dict(
            url=args.url,
            concurrency=c,
            count=per_count,
            sources=sources,
            open_timeout=args.open_timeout,
            max_failures=args.max_failures,
            index=i,
        )
        for i, c in enumerate(conc)
    ]
    with Workers(worker, params) as workers:
        workers.start()
        workers.gather("ready", timeout=30)
        start = time.monotonic() + 0.05
        workers.send_all("start", t_start=start, t_end=start + args.duration)
        ui.start("handshakes", args.duration, expected_seconds=args.duration)

        def tick() -> None:
            ui.update(min(args.duration, time.monotonic() - start), f"{num(workers.progress())} done")

        server_cpu = ServerCPU(args.server_pid)
        wait_until(start, tick)
        server_cpu.start()
        wait_until(start + args.duration, tick)
        server_cpu.stop()
        results = [r["result"] for r in workers.gather("result", timeout=args.duration + 60, tick=tick)]
    ui.stop()
    hist = Histogram()
    failures: dict[str, int] = {}
    for r in results:
        hist.merge(Histogram.from_json(r["histogram"]))
        for k, v in r["failures"].items():
            failures[k] = failures.get(k, 0) + v
    done = sum(r["done"] for r in results)
    seconds = max((r["seconds"] for r in results), default=0.0)
    if done == 0:
        raise BenchError(f"no handshake with {args.url} succeeded: {failures or 'unknown error'}")
    return {
        "handshakes": done,
        "seconds": round(seconds, 4),
        "handshakes_per_s": round(done / seconds, 1) if seconds else 0.0,
        "open_latency_us": hist.summary_us(),
        "histogram": hist.to_json(),
        "failures": failures,
        "unclean_close": sum(r["unclean_close"] for r in results),
        "client_cpu_percent": [r["cpu_percent"] for r in results],
        "server_cpu_percent": server_cpu.percent,
    }


def summary(res: dict[str, Any], params: dict[str, Any]) -> list[tuple[str, Any]]:
    lat = res["open_latency_us"]
    rows = [
        ("handshakes/s", f"{num(res['handshakes_per_s'])} /s"),
        ("completed", num(res["handshakes"])),
        ("open p50", f"{lat['p50']:,.0f} µs"),
        ("open p99", f"{lat['p99']:,.0f} µs"),
        ("open max", f"{lat['max']:,.0f} µs"),
    ]
    if res["failures"]:
        rows.append(("failures", ", ".join(f"{k}: {v}" for k, v in res["failures"].items())))
    if res["unclean_close"]:
        rows.append(("close without close frame", num(res["unclean_close"])))
    return rows + cpu_rows(res)
