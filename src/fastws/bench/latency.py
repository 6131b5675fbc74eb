"""latency: round trips with one message in flight per connection; HDR-style histogram of the RTT.

Each connection sends a message, waits for its echo, records the round trip
and sends the next one: all of it in the Cython engine (CLOCK_MONOTONIC read
when the echo is parsed and again right before the next send, into a C
histogram with the same buckets as fastws.bench.common.Histogram), so the
figure contains no Python call.  Round trips that end during the warm-up are
not recorded.
"""

from __future__ import annotations

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
    client_params,
    client_report,
    parse_target,
    payload_for,
    wait_until,
)
from fastws.bench.native import HOLD, PINGPONG, NativeClient, histogram, open_engine, use_native
from fastws.bench.throughput import cpu_rows
from fastws.bench.ui import UI, num


async def worker(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
    target = parse_target(p["url"], p["raw"])
    n = p["connections"]
    engine = open_engine(
        target,
        raw=p["raw"],
        payload=payload_for(p["size"], p["text"], p["message"]),
        compression=p["compression"],
        sources=p["sources"],
        source_offset=p["index"] * 7919,
        open_timeout=p["open_timeout"],
    )
    client = NativeClient(engine)
    engine.ramp(n, concurrency=64, timeout=p["open_timeout"] * 3, max_failures=max(10, n))
    await client.wait(lambda: engine.ramp_done)
    ctl.send("ready", opened=engine.live, failures=engine.failures())
    cmd = await ctl.recv()
    if cmd["type"] != "start" or not engine.live:
        await client.close(2.0)
        return {"histogram": Histogram().to_json(), "seconds": 0.0}
    # CLOCK_MONOTONIC is what time.monotonic() reads: the parent's t_measure in the engine's clock.
    engine.set_measure_from(int(cmd["t_measure"] * 1e9), p["count"])
    engine.set_mode(PINGPONG, refill=True)
    engine.send_all(1)

    def progress() -> None:
        ctl.progress(engine.round_trips)

    client.run_window(cmd["t_measure"], progress)
    cpu = CPUWindow()
    cpu.start()
    t0 = time.perf_counter()
    limits = {"max_round_trips": p["count"]} if p["count"] else {}
    client.run_window(cmd["t_end"], progress, **limits)
    t1 = time.perf_counter()
    cpu.stop()
    ctl.send("done")
    progress()
    engine.set_mode(HOLD)  # the last echoes are not answered
    await client.wait(lambda: engine.received >= engine.sent, 2.0)
    await client.close(2.0)
    return {
        "histogram": histogram(engine, "round_trip").to_json(),
        "seconds": t1 - t0,
        "opened": engine.opened,
        "cpu_percent": cpu.percent,
        "busy_percent": cpu.busy,
    }


def run(args: Any, ui: UI) -> dict[str, Any]:
    target = parse_target(args.url, args.raw)
    native = use_native(args, target, ui)
    params = client_params(args, target)
    with Workers(worker if native else legacy.latency_worker, params) as workers:
        workers.start()
        ready = workers.gather("ready", timeout=args.open_timeout * 3 + 30)
        opened = sum(r["opened"] for r in ready)
        failures: dict[str, int] = {}
        for r in ready:
            for k, v in r["failures"].items():
                failures[k] = failures.get(k, 0) + v
        if opened == 0:
            workers.send_all("stop")
            raise BenchError(f"no connection to {args.url} could be opened: {failures or 'unknown error'}")
        start = time.monotonic() + 0.05
        total = args.warmup + args.duration
        workers.send_all("start", t_measure=start + args.warmup, t_end=start + total)
        ui.start("latency", total, expected_seconds=total)

        def tick() -> None:
            ui.update(min(total, time.monotonic() - start), f"{num(workers.progress())} round trips")

        server_cpu = ServerCPU(args.server_pid)
        wait_until(start + args.warmup, tick)
        server_cpu.start()
        workers.gather("done", timeout=total + 60, tick=tick)
        server_cpu.stop()
        results = [r["result"] for r in workers.gather("result", timeout=total + 60, tick=tick)]
    ui.stop()
    hist = Histogram()
    for r in results:
        hist.merge(Histogram.from_json(r["histogram"]))
    seconds = max((r["seconds"] for r in results), default=0.0)
    if hist.total == 0:
        raise BenchError(f"no round trip completed against {args.url}")
    out = {
        "round_trips": hist.total,
        "seconds": round(seconds, 4),
        "round_trips_per_s": round(hist.total / seconds, 1) if seconds else 0.0,
        "latency_us": hist.summary_us(),
        "histogram": hist.to_json(),
        "connections_opened": opened,
        "failures": failures,
    }
    out.update(client_report(args, results, server_cpu, native))
    return out


def summary(res: dict[str, Any], params: dict[str, Any]) -> list[tuple[str, Any]]:
    lat = res["latency_us"]
    rows = [
        (name, f"{lat[key]:,.1f} µs")
        for name, key in (
            ("p50", "p50"),
            ("p90", "p90"),
            ("p99", "p99"),
            ("p99.9", "p99_9"),
            ("max", "max"),
            ("mean", "mean"),
        )
    ]
    rows += [
        ("round trips", num(res["round_trips"])),
        ("round trips/s", f"{num(res['round_trips_per_s'])} /s"),
    ]
    return rows + cpu_rows(res)
