"""latency: round trips with one message in flight per connection; HDR-style histogram of the RTT.

Each connection sends a message, waits for its echo, records the round trip
(perf_counter_ns, one Python call per message), and sends the next.
Round trips that end during the warm-up are not recorded.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastws.bench.clients import DISCARD, Opener, close_all, connector
from fastws.bench.common import (
    BenchError,
    Ctl,
    Histogram,
    ServerCPU,
    Workers,
    client_params,
    parse_target,
    process_cpu,
    wait_until,
)
from fastws.bench.throughput import _sleep_until, cpu_rows, payload_for
from fastws.bench.ui import UI, num


class _PingPong:
    """Drives one connection: send, wait for the echo, record, send again."""

    __slots__ = (
        "send",
        "payload",
        "hist",
        "sent_at",
        "measure_from",
        "running",
        "need",
        "size",
        "left",
        "count",
    )

    def __init__(self, send: Any, payload: Any, hist: Histogram, size: int) -> None:
        self.send = send
        self.payload = payload
        self.hist = hist
        self.sent_at = 0
        self.measure_from = 1 << 62
        self.running = True
        self.size = size
        self.need = size  # raw: bytes still to come back for the current round trip
        self.left = 0  # count bound (0: none)
        self.count = 0

    def go(self) -> None:
        self.sent_at = time.perf_counter_ns()
        self.send(self.payload)

    def on_message(self, message: Any) -> None:
        now = time.perf_counter_ns()
        if now >= self.measure_from:
            self.hist.record(now - self.sent_at)
            self.count += 1
            if self.left and self.count >= self.left:
                self.running = False
        if self.running:
            self.sent_at = time.perf_counter_ns()
            self.send(self.payload)

    def on_raw(self, nbytes: int) -> None:
        self.need -= nbytes
        if self.need <= 0:
            self.need += self.size
            self.on_message(None)


async def worker(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
    target = parse_target(p["url"], p["raw"])
    raw = p["raw"]
    payload = payload_for(p["size"], p["text"])
    hist = Histogram()

    open_one = connector(target, raw, p["open_timeout"], max_message_size=0, compression=p["compression"])

    opener = Opener(
        open_one,
        sources=p["sources"],
        concurrency=64,
        max_failures=max(10, p["connections"]),
        source_offset=p["index"] * 7919,
    )
    conns = await opener.run(p["connections"])
    ctl.send("ready", opened=len(conns), failures=dict(opener.failures))
    cmd = await ctl.recv()
    if cmd["type"] != "start" or not conns:
        await close_all(conns, 2.0)
        return {"histogram": hist.to_json(), "seconds": 0.0}
    drivers = []
    for c in conns:
        if raw:
            d = _PingPong(c.transport.write, payload, hist, p["size"])
            c.on_data = d.on_raw
        else:
            d = _PingPong(c.writer.send, payload, hist, p["size"])
            c.set_on_message(d.on_message)
        d.measure_from = int(time.perf_counter_ns() + (cmd["t_measure"] - time.monotonic()) * 1e9)
        if p["count"]:
            d.left = max(1, p["count"] // len(conns))
        drivers.append(d)
    for d in drivers:
        d.go()

    async def report() -> None:
        while True:
            ctl.progress(hist.total)
            await asyncio.sleep(0.2)

    reporter = asyncio.ensure_future(report())
    await _sleep_until(cmd["t_measure"])
    t0, cpu0 = time.perf_counter(), process_cpu()
    while time.monotonic() < cmd["t_end"] and any(d.running for d in drivers):
        await asyncio.sleep(min(0.01, max(0.0, cmd["t_end"] - time.monotonic())))
    t1, cpu1 = time.perf_counter(), process_cpu()
    for d in drivers:
        d.running = False
    reporter.cancel()
    ctl.progress(hist.total)
    for c in conns:
        if not raw:
            c.set_on_message(DISCARD)
    await asyncio.sleep(0.02)
    await close_all(conns, 2.0)
    return {
        "histogram": hist.to_json(),
        "seconds": t1 - t0,
        "opened": len(conns),
        "cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 1) if t1 > t0 else 0.0,
    }


def run(args: Any, ui: UI) -> dict[str, Any]:
    target = parse_target(args.url, args.raw)
    params = client_params(args, target)
    with Workers(worker, params) as workers:
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
        wait_until(start + total, tick)
        server_cpu.stop()
        results = [r["result"] for r in workers.gather("result", timeout=total + 60, tick=tick)]
    ui.stop()
    hist = Histogram()
    for r in results:
        hist.merge(Histogram.from_json(r["histogram"]))
    seconds = max((r["seconds"] for r in results), default=0.0)
    if hist.total == 0:
        raise BenchError(f"no round trip completed against {args.url}")
    return {
        "round_trips": hist.total,
        "seconds": round(seconds, 4),
        "round_trips_per_s": round(hist.total / seconds, 1) if seconds else 0.0,
        "latency_us": hist.summary_us(),
        "histogram": hist.to_json(),
        "connections_opened": opened,
        "failures": failures,
        "client_cpu_percent": [r.get("cpu_percent", 0.0) for r in results],
        "server_cpu_percent": server_cpu.percent,
    }


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
