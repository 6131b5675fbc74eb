"""broadcast: N subscribers on a fan-out endpoint, one publisher sending M timestamped messages.

Works with any endpoint that relays every message to every subscriber and
keeps the text: the demo's /feed (a quiet channel: every message to every
subscriber, nothing else) or /chat (prefixes "#id: " and announces joins,
which is fine).  Each published message carries ``fastws-bench <run> <seq>
<CLOCK_MONOTONIC ns>``; CLOCK_MONOTONIC is system-wide, so subscribers in
other processes time deliveries against the publisher's clock.  Subscribers
and publisher are Cython engines (native.py): a delivery is parsed and
timed in C, into a histogram and per-message counters (deliveries, latest
delivery), without a Python call.

Reported: delivery latency (publish -> each subscriber) p50/p90/p99/max,
fan-out time (publish -> the LAST subscriber has it) per message,
deliveries per second, and messages lost.
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
    worker_cpu,
)
from fastws.bench.connections import PER_PROCESS, auto_sources
from fastws.bench.native import HOLD, SUBSCRIBE, NativeClient, histogram, open_engine, use_native
from fastws.bench.throughput import cpu_rows
from fastws.bench.ui import UI, num

BACKLOG = 1 << 20  # the publisher waits while this many bytes are not yet taken by the kernel


async def subscriber_worker(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
    target = parse_target(p["url"])
    engine = open_engine(target, sources=p["sources"], source_offset=p["index"] * 7919,
                         open_timeout=p["open_timeout"])
    engine.set_broadcast(p["run_id"], seq_cap=p["count"])
    engine.set_mode(SUBSCRIBE)
    client = NativeClient(engine, on_tick=lambda: ctl.progress(engine.opened))
    engine.ramp(p["n"], p["concurrency"], timeout=p["ramp_timeout"], max_failures=max(10, p["n"]))
    await client.wait(lambda: engine.ramp_done)
    client.on_tick = lambda: ctl.progress(engine.deliveries)
    dropped0 = engine.dropped
    ctl.send("ready", opened=engine.live, failures=engine.failures())
    await ctl.recv()  # "stop"
    dropped = engine.dropped - dropped0
    await client.close(5.0)
    return {
        "histogram": histogram(engine, "delivery").to_json(),
        "per_seq": engine.per_message(),
        "deliveries": engine.deliveries,
        "first": engine.first_delivery,
        "last": engine.last_delivery,
        "opened": engine.opened,
        "dropped": dropped,
    }


async def publisher_worker(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
    target = parse_target(p["url"])
    engine = open_engine(target, open_timeout=p["open_timeout"])
    engine.set_broadcast(p["run_id"], size=p["size"])
    engine.set_mode(HOLD)  # its own messages come back too (on /feed): counted, not timed
    client = NativeClient(engine)
    engine.ramp(1)
    await client.wait(lambda: engine.ramp_done)
    if not engine.live:
        raise BenchError(f"the publisher could not connect: {engine.failures()}")
    ctl.send("ready", opened=1, failures={})
    cmd = await ctl.recv()
    if cmd["type"] != "start":
        await client.close(2.0)
        return {}
    rate, count, t_end = p["rate"], p["count"], cmd["t_end"]
    start = time.monotonic()
    first_ns = time.monotonic_ns()
    while engine.published < count and time.monotonic() < t_end and engine.live:
        due = min(count, int((time.monotonic() - start) * rate) + 1) if rate else count
        if engine.pending_bytes > BACKLOG:  # the server reads slower than we publish: wait for it
            await client.wait(lambda: engine.pending_bytes < BACKLOG // 2 or not engine.live, 1.0)
            continue
        if due > engine.published:
            engine.publish(min(due - engine.published, 256))
        ctl.progress(engine.published)
        await asyncio.sleep(0.001 if rate and due <= engine.published else 0)
    last_ns = time.monotonic_ns()
    ctl.progress(engine.published)
    ctl.send("sent", sent=engine.published)
    await ctl.recv()  # "stop"
    await client.close(2.0)
    return {"sent": engine.published, "first_send": first_ns, "last_send": last_ns}


async def worker(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
    if p["role"] == "publisher":
        return await publisher_worker(p, ctl)
    return await subscriber_worker(p, ctl)


def run(args: Any, ui: UI) -> dict[str, Any]:
    target = parse_target(args.url)
    if target.raw:
        raise BenchError("broadcast has no --raw mode")
    native = use_native(args, target, ui)
    n = args.connections
    procs = args.processes or max(math.ceil(n / PER_PROCESS), 1 if n <= 1000 else 2)
    procs = max(1, min(procs, n))
    if args.count:
        count = args.count
    elif args.rate:
        count = max(1, int(args.rate * args.duration))
    else:
        count = 1000
    run_id = f"{time.monotonic_ns() % 10**9:x}"
    sources = source_addresses(args.source_addresses or auto_sources(n)) if target.loopback else []
    common = dict(url=args.url, open_timeout=args.open_timeout, run_id=run_id, size=args.size, count=count)
    params = [
        dict(
            common,
            role="subscriber",
            n=c,
            concurrency=max(2, math.ceil(args.concurrency / procs)),
            ramp_timeout=args.open_timeout * 3 + n / 2000,
            sources=sources,
            index=i,
            cpu=worker_cpu(args, i),
        )
        for i, c in enumerate(split(n, procs))
    ]
    params.append(dict(common, role="publisher", rate=args.rate, index=procs, cpu=worker_cpu(args, procs)))
    subs = list(range(procs))
    with Workers(worker if native else legacy.broadcast_worker, params) as workers:
        workers.start()
        ui.start("subscribing", n)
        ready = workers.gather(
            "ready", timeout=args.open_timeout * 3 + 60 + n / 2000, tick=lambda: ui.update(workers.progress())
        )
        ui.stop()
        opened = sum(r["opened"] for r in ready[:procs])
        if opened == 0:
            workers.send_all("stop")
            raise BenchError(f"no subscriber could connect to {args.url}")
        time.sleep(args.settle)  # let join notices and the like pass
        for i in subs:
            workers.counters[i] = 0.0
        server_cpu = ServerCPU(args.server_pid)
        server_cpu.start()
        client_cpu = [CPUWindow([pid], children=False) for pid in workers.pids]
        for w in client_cpu:
            w.start()
        start = time.monotonic()
        workers.send(procs, "start", t_end=start + args.duration)
        expected_total = opened * count
        ui.start("broadcast", expected_total, expected_seconds=args.duration)

        def tick() -> None:
            got = sum(workers.counters[i] for i in subs)
            ui.update(got, f"sent {num(workers.counters[procs])}  delivered {num(got)}")

        sent = workers.gather("sent", timeout=args.duration + 60, tick=tick, which=[procs])[0]["sent"]
        # Wait until every subscriber has every message, or the grace period ends.
        expected = opened * sent
        deadline = time.monotonic() + args.grace
        while time.monotonic() < deadline and sum(workers.counters[i] for i in subs) < expected:
            time.sleep(0.02)
            tick()
        ui.stop()
        server_cpu.stop()
        for w in client_cpu:
            w.stop()
        workers.send_all("stop")
        results = [r["result"] for r in workers.gather("result", timeout=60 + n / 20000)]
    sub_results, pub_result = results[:procs], results[procs]
    hist = Histogram()
    per_seq: dict[int, list[int]] = {}
    for r in sub_results:
        hist.merge(Histogram.from_json(r["histogram"]))
        for seq, c, m in r["per_seq"]:
            e = per_seq.setdefault(seq, [0, 0])
            e[0] += c
            e[1] = max(e[1], m)
    fanout = Histogram()
    complete = 0
    for c, m in per_seq.values():
        if c >= opened:
            complete += 1
            fanout.record(m)
    deliveries = sum(r["deliveries"] for r in sub_results)
    last = max((r["last"] for r in sub_results if r["last"]), default=0)
    span = (last - pub_result["first_send"]) / 1e9 if last else 0.0
    out = {
        "subscribers": opened,
        "messages_sent": sent,
        "deliveries": deliveries,
        "expected_deliveries": expected,
        "lost": max(0, expected - deliveries),
        "complete_messages": complete,
        "seconds": round(span, 4),
        "deliveries_per_s": round(deliveries / span, 1) if span > 0 else 0.0,
        "publish_rate": args.rate,
        "latency_us": hist.summary_us(),
        "fanout_us": fanout.summary_us(),
        "histogram": hist.to_json(),
        "dropped": sum(r["dropped"] for r in sub_results),
        "failures": {k: v for r in ready[:procs] for k, v in r["failures"].items()},
        "processes": procs,
    }
    per_process = [{"cpu_percent": w.percent, "busy_percent": w.busy} for w in client_cpu]
    pace = f"paced by --rate {args.rate:g}" if args.rate else "the publisher waits for the server to read"
    out.update(client_report(args, per_process, server_cpu, native, unsaturated=pace))
    return out


def summary(res: dict[str, Any], params: dict[str, Any]) -> list[tuple[str, Any]]:
    lat, fan = res["latency_us"], res["fanout_us"]
    return [
        ("subscribers", num(res["subscribers"])),
        ("messages published", num(res["messages_sent"])),
        ("deliveries/s", f"{num(res['deliveries_per_s'])} /s"),
        ("delivery p50", f"{lat['p50']:,.0f} µs"),
        ("delivery p99", f"{lat['p99']:,.0f} µs"),
        ("delivery max", f"{lat['max']:,.0f} µs"),
        ("publish to last delivery p50", f"{fan['p50']:,.0f} µs"),
        ("publish to last delivery p99", f"{fan['p99']:,.0f} µs"),
        ("publish to last delivery max", f"{fan['max']:,.0f} µs"),
        ("lost", f"{num(res['lost'])} of {num(res['expected_deliveries'])}"),
    ] + cpu_rows(res)
