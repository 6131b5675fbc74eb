"""The previous client path of `fastws bench`: fastws.client in callback mode, one worker per mode.

Used where the Cython engine (native.py) cannot go: wss:// URLs
(permessage-deflate), and --client-transport uvloop|aiofastnet (the fastws
client on those transports, for comparison).  Every message here costs at
least one Python-level call on the client; see bench/README.md.  The workers
report the same messages and result keys as the native ones.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

from fastws._frame import OP_BINARY, OP_TEXT, encode_frame
from fastws.bench.clients import DISCARD, Opener, close_all, connector, open_ws
from fastws.bench.common import Ctl, Histogram, classify_error, parse_target, payload_for, process_cpu

BIG = 65536  # from this size on, a message is worth a Python call (and not worth a copy)
MARK = "fastws-bench "


async def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


class _Resend:
    """on_message for big messages: write the same pre-encoded frame again."""

    __slots__ = ("write", "frame")

    def __init__(self, write: Any, frame: bytes) -> None:
        self.write, self.frame = write, frame

    def __call__(self, message: Any) -> None:
        self.write(self.frame)


async def throughput_worker(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
    target = parse_target(p["url"], p["raw"])
    size, inflight, raw = p["size"], p["inflight"], p["raw"]
    payload = payload_for(size, p["text"], p["message"])
    dropped = 0

    def on_close(code: int, reason: str) -> None:
        nonlocal dropped
        if not stopping:
            dropped += 1

    stopping = False
    # Small messages: coalesce the echoes of one read into one write.  Big ones: write each
    # frame as it is built (saves copying megabytes into the coalescing buffer and out again).
    coalesce = size < BIG
    open_one = connector(target, raw, p["open_timeout"], on_close=on_close, compression=p["compression"],
                         max_message_size=0, coalesce=coalesce)

    opener = Opener(
        open_one,
        sources=p["sources"],
        concurrency=64,
        max_failures=max(10, p["connections"]),
        source_offset=p["index"] * 7919,
    )
    conns = await opener.run(p["connections"])
    # One checked round trip per connection: the server must echo exactly what it got.
    bad = 0
    if not raw:
        for c in conns:
            c.send(payload)
        for c in conns:
            try:
                echoed = await asyncio.wait_for(c.recv(), p["open_timeout"])
            except Exception:
                echoed = None
            bad += echoed != payload
    ctl.send("ready", opened=len(conns), failures=dict(opener.failures), bad_echo=bad)
    cmd = await ctl.recv()
    if cmd["type"] != "start" or not conns:
        await close_all(conns, 2.0)
        return {"messages": 0, "seconds": 0.0, "bytes": 0}

    def count() -> int:
        if raw:
            return sum(c.received for c in conns) // size
        return sum(c.messages_received for c in conns)

    # Start the pipelines: D messages per connection, then echo what comes back.
    if raw:
        block = payload * inflight
        for c in conns:
            c.size = size
            c.echo = True
            c.transport.write(block)
    elif size >= BIG and not p["compression"]:
        # Big messages: resend one pre-masked frame (same masking key every time, which no server
        # can tell) so the client's only per-byte work is the copy the reader makes of each echo.
        frame = encode_frame(OP_TEXT if p["text"] else OP_BINARY, payload, mask=True)
        for c in conns:
            c.set_on_message(_Resend(c.transport.write, frame))
            for _ in range(inflight):
                c.transport.write(frame)
    else:
        for c in conns:
            c.set_on_message(c.writer.send)  # the echo goes straight back: C to C, no Python per message
            for _ in range(inflight):
                c.writer.send(payload)

    async def report() -> None:
        while True:
            ctl.progress(count())
            await asyncio.sleep(0.2)

    reporter = asyncio.ensure_future(report())
    base = count()
    await _sleep_until(cmd["t_measure"])
    c0, t0, cpu0 = count(), time.perf_counter(), process_cpu()
    limit = p["count"]
    if limit:
        while time.monotonic() < cmd["t_end"] and count() - c0 < limit:
            await asyncio.sleep(0.005)
    else:
        await _sleep_until(cmd["t_end"])
    c1, t1, cpu1 = count(), time.perf_counter(), process_cpu()
    ctl.send("done")  # the measured window is over (early with --count)
    stopping = True
    reporter.cancel()
    for c in conns:
        if raw:
            c.echo = False
        else:
            c.set_on_message(DISCARD)
    ctl.progress(c1)
    await asyncio.sleep(0.05)  # let the in-flight messages land before the closing handshake
    unfinished = await close_all(conns, 2.0)
    return {
        "messages": c1 - c0,
        "seconds": t1 - t0,
        "warmup_messages": c0 - base,
        "dropped": dropped,
        "cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 1) if t1 > t0 else 0.0,
        "unclosed": unfinished,
        "opened": len(conns),
    }


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


async def latency_worker(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
    target = parse_target(p["url"], p["raw"])
    raw = p["raw"]
    payload = payload_for(p["size"], p["text"], p["message"])
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
    ctl.send("done")
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


async def connections_worker(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
    target = parse_target(p["url"], p["raw"])
    state = {"holding": False, "dropped": 0}

    def on_close(code: int, reason: str) -> None:
        if state["holding"]:
            state["dropped"] += 1

    open_one = connector(target, p["raw"], p["open_timeout"], on_close=on_close)

    ctl.send("ready")
    cmd = await ctl.recv()
    if cmd["type"] != "ramp":
        return {}
    opener = Opener(
        open_one,
        sources=p["sources"],
        concurrency=p["concurrency"],
        max_failures=p["max_failures"],
        deadline=time.monotonic() + p["ramp_timeout"],
        rate=p["rate"],
        progress=ctl.progress,
        source_offset=p["index"] * 7919,
    )
    conns = await opener.run(p["connections"])
    ctl.send(
        "ramped",
        opened=len(conns),
        failures=dict(opener.failures),
        seconds=opener.finished - opener.started,
        histogram=opener.latency.to_json(),
        timeline=opener.timeline,
        stopped_by=opener.stopped_by,
        first_failure=opener.first_failure,
    )
    state["holding"] = True
    cmd = await ctl.recv()  # "close"
    state["holding"] = False
    if p["raw"]:
        dropped = sum(1 for c in conns if c.closed.done())
        pings = 0
    else:
        dropped = state["dropped"]
        pings = sum(c.pings_received for c in conns)
    unclosed = await close_all(conns, 10.0)
    return {"dropped": dropped, "pings_received": pings, "unclosed": unclosed}


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


async def _subscriber(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
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


async def _publisher(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
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


async def broadcast_worker(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
    if p["role"] == "publisher":
        return await _publisher(p, ctl)
    return await _subscriber(p, ctl)


async def handshake_worker(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
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
    ctl.send("done")
    cpu = round(100 * (process_cpu() - cpu0) / seconds, 1) if seconds > 0 else 0.0
    return {
        "done": done,
        "seconds": seconds,
        "cpu_percent": cpu,
        "histogram": hist.to_json(),
        "failures": dict(failures),
        "unclean_close": unclean,
    }
