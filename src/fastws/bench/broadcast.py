"""broadcast: N subscribers on a fan-out endpoint, one publisher sending M timestamped messages.

Works with any endpoint that relays every message to every subscriber and
keeps the text (the demo's /chat prefixes "#id: ", which is fine): each
published message carries ``fastws-bench <seq> <monotonic ns>``, found again
in whatever the subscribers receive.  CLOCK_MONOTONIC is system-wide, so the
subscriber processes can time deliveries against the publisher's clock.

Reported: delivery latency (publish -> each subscriber) p50/p90/p99/max,
fan-out time (publish -> the last subscriber has it) per message, deliveries
per second, and messages lost.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from fastws.bench.clients import DISCARD, Opener, close_all, open_ws
from fastws.bench.common import BenchError, Ctl, Histogram, Workers, parse_target, source_addresses, split
from fastws.bench.ui import UI, num

MARK = "fastws-bench "


class _Subscriber:
    __slots__ = ("hist", "per_seq", "deliveries", "first", "last", "run_id")

    def __init__(self, run_id: str) -> None:
        self.hist = Histogram()
        self.per_seq: dict[int, list[int]] = {}  # seq -> [deliveries, max latency ns]
        self.deliveries = 0
        self.first = 0
        self.last = 0
        self.run_id = run_id

    def on_message(self, message: Any) -> None:
        now = time.monotonic_ns()
        if type(message) is bytes:
            message = message.decode("utf-8", "replace")
        i = message.find(MARK)
        if i < 0:
            return
        parts = message[i + len(MARK) :].split(" ", 3)
        if len(parts) < 3 or parts[0] != self.run_id:
            return
        seq, sent = int(parts[1]), int(parts[2])
        lat = now - sent
        self.hist.record(lat)
        entry = self.per_seq.get(seq)
        if entry is None:
            self.per_seq[seq] = [1, lat]
        else:
            entry[0] += 1
            if lat > entry[1]:
                entry[1] = lat
        self.deliveries += 1
        if not self.first:
            self.first = now
        self.last = now


async def subscriber_worker(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
    target = parse_target(p["url"])
    sub = _Subscriber(p["run_id"])
    state = {"dropped": 0, "holding": False}

    def on_close(code: int, reason: str) -> None:
        if state["holding"]:
            state["dropped"] += 1

    async def open_one(local: Any) -> Any:
        return await open_ws(
            target,
            local_addr=local,
            on_message=sub.on_message,
            on_close=on_close,
            max_message_size=0,
            open_timeout=p["open_timeout"],
        )

    opener = Opener(
        open_one,
        sources=p["sources"],
        concurrency=p["concurrency"],
        max_failures=max(10, p["n"]),
        source_offset=p["index"] * 7919,
        progress=ctl.progress,
    )
    conns = await opener.run(p["n"])
    state["holding"] = True
    ctl.send("ready", opened=len(conns), failures=dict(opener.failures))

    async def report() -> None:
        while True:
            ctl.progress(sub.deliveries)
            await asyncio.sleep(0.1)

    reporter = asyncio.ensure_future(report())
    await ctl.recv()  # "stop"
    state["holding"] = False
    reporter.cancel()
    for c in conns:
        c.set_on_message(DISCARD)
    await close_all(conns, 5.0)
    return {
        "histogram": sub.hist.to_json(),
        "per_seq": [[s, c, m] for s, (c, m) in sub.per_seq.items()],
        "deliveries": sub.deliveries,
        "first": sub.first,
        "last": sub.last,
        "opened": len(conns),
        "dropped": state["dropped"],
    }


async def publisher_worker(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
    target = parse_target(p["url"])
    pub = await open_ws(target, on_message=DISCARD, max_message_size=0, open_timeout=p["open_timeout"])
    ctl.send("ready", opened=1, failures={})
    cmd = await ctl.recv()
    if cmd["type"] != "start":
        await close_all([pub], 2.0)
        return {}
    size, rate, count = p["size"], p["rate"], p["count"]
    t_end = cmd["t_end"]
    prefix = f"{MARK}{p['run_id']} "
    sent = 0
    start = time.monotonic()
    first_ns = time.monotonic_ns()
    writer = pub.writer
    while sent < count and time.monotonic() < t_end and not pub.closed:
        due = int((time.monotonic() - start) * rate) + 1 if rate else count
        while sent < min(due, count):
            head = f"{prefix}{sent} {time.monotonic_ns()} "
            writer.send(head + "x" * max(0, size - len(head)))
            sent += 1
        ctl.progress(sent)
        await asyncio.sleep(0.001 if rate else 0)
        if pub.transport is not None and pub.transport.get_write_buffer_size() > 1 << 20:
            await pub.drain()
    last_ns = time.monotonic_ns()
    ctl.send("sent", sent=sent)
    await ctl.recv()  # "stop"
    await close_all([pub], 2.0)
    return {"sent": sent, "first_send": first_ns, "last_send": last_ns}


async def worker(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
    if p["role"] == "publisher":
        return await publisher_worker(p, ctl)
    return await subscriber_worker(p, ctl)


def run(args: Any, ui: UI) -> dict[str, Any]:
    target = parse_target(args.url)
    if target.raw:
        raise BenchError("broadcast has no --raw mode")
    n = args.connections
    procs = args.processes or (1 if n <= 1000 else 2)
    procs = max(1, min(procs, n))
    if args.count:
        count = args.count
    elif args.rate:
        count = max(1, int(args.rate * args.duration))
    else:
        count = 1000
    run_id = f"{time.monotonic_ns() % 10**9:x}"
    sources = (
        source_addresses(args.source_addresses or max(1, math.ceil(n / 20000))) if target.loopback else []
    )
    common = dict(url=args.url, open_timeout=args.open_timeout, run_id=run_id, size=args.size)
    params = [
        dict(
            common,
            role="subscriber",
            n=c,
            concurrency=max(1, args.concurrency // procs),
            sources=sources,
            index=i,
        )
        for i, c in enumerate(split(n, procs))
    ]
    params.append(dict(common, role="publisher", rate=args.rate, count=count, index=procs))
    subs = list(range(procs))
    with Workers(worker, params) as workers:
        workers.start()
        ui.start("subscribing", n)
        ready = workers.gather(
            "ready", timeout=args.open_timeout * 3 + 60, tick=lambda: ui.update(workers.progress())
        )
        ui.stop()
        opened = sum(r["opened"] for r in ready[:procs])
        if opened == 0:
            workers.send_all("stop")
            raise BenchError(f"no subscriber could connect to {args.url}")
        time.sleep(args.settle)  # let join notices and the like pass
        for i in subs:
            workers.counters[i] = 0.0
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
        workers.send_all("stop")
        results = [r["result"] for r in workers.gather("result", timeout=60)]
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
    return {
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
    }


def summary(res: dict[str, Any], params: dict[str, Any]) -> list[tuple[str, Any]]:
    lat, fan = res["latency_us"], res["fanout_us"]
    return [
        ("subscribers", num(res["subscribers"])),
        ("messages published", num(res["messages_sent"])),
        ("deliveries/s", f"{num(res['deliveries_per_s'])} /s"),
        ("delivery p50", f"{lat['p50']:,.0f} µs"),
        ("delivery p99", f"{lat['p99']:,.0f} µs"),
        ("delivery max", f"{lat['max']:,.0f} µs"),
        ("all subscribers p50", f"{fan['p50']:,.0f} µs"),
        ("all subscribers p99", f"{fan['p99']:,.0f} µs"),
        ("all subscribers max", f"{fan['max']:,.0f} µs"),
        ("lost", f"{num(res['lost'])} of {num(res['expected_deliveries'])}"),
    ]
