"""handshake: connect + upgrade + closing handshake, over and over, C at a time.

The loops run in the Cython engine (native.py): as soon as a connection is
open it sends its close frame, and when the server has closed the TCP
connection the next connect starts, with no Python call per cycle.  Reports
completed cycles per second, the time to open (TCP connect until the 101
response is checked) as percentiles, failures by cause, and closes that
ended without the server's close frame.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from fastws.bench import legacy
from fastws.bench.common import (
    BenchError,
    CPUWindow,
    Ctl,
    Histogram,
    ServerCPU,
    Workers,
    client_report,
    parse_target,
    source_addresses,
    split,
    wait_until,
    worker_cpu,
)
from fastws.bench.native import NativeClient, histogram, open_engine, use_native
from fastws.bench.throughput import cpu_rows
from fastws.bench.ui import UI, num


async def worker(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
    target = parse_target(p["url"])
    engine = open_engine(target, sources=p["sources"], source_offset=p["index"] * 7919,
                         open_timeout=p["open_timeout"])
    client = NativeClient(engine)
    ctl.send("ready")
    cmd = await ctl.recv()
    if cmd["type"] != "start":
        client.detach()
        return {}
    await asyncio.sleep(max(0.0, cmd["t_start"] - time.monotonic()))
    cpu = CPUWindow()
    cpu.start()
    t0 = time.perf_counter()
    limit = p["count"]
    engine.cycle(p["concurrency"], cmd["t_end"], limit, p["max_failures"])
    client.run_window(cmd["t_end"], lambda: ctl.progress(engine.cycles), **({"max_cycles": limit} if limit else {}))
    engine.stop_ramp()  # no new cycle; the ones under way finish
    await client.wait(lambda: engine.live == 0 and engine.in_progress == 0, p["open_timeout"])
    seconds = time.perf_counter() - t0
    cpu.stop()
    ctl.send("done")
    ctl.progress(engine.cycles)
    client.detach()
    return {
        "done": engine.cycles,
        "seconds": seconds,
        "cpu_percent": cpu.percent,
        "busy_percent": cpu.busy,
        "histogram": histogram(engine, "open").to_json(),
        "failures": engine.failures(),
        "unclean_close": engine.closed_unclean,
    }


def run(args: Any, ui: UI) -> dict[str, Any]:
    target = parse_target(args.url)
    native = use_native(args, target, ui)
    procs = max(1, min(args.processes or 1, args.connections))
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
            cpu=worker_cpu(args, i),
        )
        for i, c in enumerate(conc)
    ]
    with Workers(worker if native else legacy.handshake_worker, params) as workers:
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
        workers.gather("done", timeout=args.duration + 60, tick=tick)
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
    out = {
        "handshakes": done,
        "seconds": round(seconds, 4),
        "handshakes_per_s": round(done / seconds, 1) if seconds else 0.0,
        "open_latency_us": hist.summary_us(),
        "histogram": hist.to_json(),
        "failures": failures,
        "unclean_close": sum(r["unclean_close"] for r in results),
    }
    out.update(client_report(args, results, server_cpu, native, unsaturated="bound by --connections loops"))
    return out


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
