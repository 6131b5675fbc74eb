"""throughput: C connections, each keeping D messages of S bytes in flight against an echo endpoint.

The client echoes whatever comes back: the wire core's reader hands every
message straight to the writer's C ``send`` (``reader.on_message =
writer.send``), so no Python code runs per message on the client, and the
frames produced while one read is parsed leave in one write.  The wire core
counts the messages.  Messages of 64 KiB and more instead resend one
pre-masked frame per echo received (the same masking key each time: servers
cannot tell, and the client's per-byte work drops to the one copy the reader
makes).  With ``--raw`` the same byte streams go over plain TCP (no upgrade,
no framing): every S bytes back count as one message.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastws._frame import OP_BINARY, OP_TEXT, encode_frame
from fastws.bench.clients import DISCARD, Opener, close_all, connector
from fastws.bench.common import (
    BenchError,
    Ctl,
    ServerCPU,
    Workers,
    client_params,
    parse_target,
    process_cpu,
    wait_until,
)
from fastws.bench.ui import UI, num

BIG = 65536  # from this size on, a message is worth a Python call (and not worth a copy)


class _Resend:
    """on_message for big messages: write the same pre-encoded frame again."""

    __slots__ = ("write", "frame")

    def __init__(self, write: Any, frame: bytes) -> None:
        self.write, self.frame = write, frame

    def __call__(self, message: Any) -> None:
        self.write(self.frame)


def payload_for(size: int, text: bool) -> str | bytes:
    if text:
        return ("fastws" * (size // 6 + 1))[:size]
    pattern = bytes(range(256))
    return (pattern * (size // 256 + 1))[:size]


async def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def worker(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
    target = parse_target(p["url"], p["raw"])
    size, inflight, raw = p["size"], p["inflight"], p["raw"]
    payload = payload_for(size, p["text"])
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


def run(args: Any, ui: UI) -> dict[str, Any]:
    target = parse_target(args.url, args.raw)
    params = client_params(args, target, inflight=args.inflight)
    with Workers(worker, params) as workers:
        workers.start()
        ui.start("connecting", args.connections, expected_seconds=args.warmup + args.duration)
        ready = workers.gather(
            "ready", timeout=args.open_timeout * 3 + 30, tick=lambda: ui.update(workers.progress())
        )
        opened = sum(r["opened"] for r in ready)
        failures: dict[str, int] = {}
        for r in ready:
            for k, v in r["failures"].items():
                failures[k] = failures.get(k, 0) + v
        bad = sum(r["bad_echo"] for r in ready)
        if opened == 0:
            workers.send_all("stop")
            raise BenchError(f"no connection to {args.url} could be opened: {failures or 'unknown error'}")
        if bad:
            workers.send_all("stop")
            raise BenchError(
                f"{bad} connection(s) did not get their message echoed back unchanged: "
                f"is {args.url} an echo endpoint?"
            )
        start = time.monotonic() + 0.05
        t_measure = start + args.warmup
        t_end = t_measure + args.duration
        workers.send_all("start", t_measure=t_measure, t_end=t_end)
        total = args.warmup + args.duration
        ui.start("throughput", total, expected_seconds=total)
        last = [time.monotonic(), 0.0]

        def tick() -> None:
            now = time.monotonic()
            done = workers.progress()
            if now - last[0] >= 0.5:
                rate = (done - last[1]) / (now - last[0])
                last[:] = [now, done]
                ui.update(min(total, now - start), f"{num(rate)} msg/s")

        server_cpu = ServerCPU(args.server_pid)
        wait_until(t_measure, tick)
        server_cpu.start()
        wait_until(t_end, tick)
        server_cpu.stop()
        results = [r["result"] for r in workers.gather("result", timeout=total + 60, tick=tick)]
    ui.stop()
    messages = sum(r["messages"] for r in results)
    rate = sum(r["messages"] / r["seconds"] for r in results if r["seconds"] > 0)
    seconds = max((r["seconds"] for r in results), default=0.0)
    return {
        "messages": messages,
        "seconds": round(seconds, 4),
        "msgs_per_s": round(rate, 1),
        "bytes_per_s": round(rate * args.size, 1),
        "mb_per_s": round(rate * args.size / 1e6, 3),
        "connections_opened": opened,
        "failures": failures,
        "dropped": sum(r["dropped"] for r in results),
        "client_cpu_percent": [r["cpu_percent"] for r in results],
        "server_cpu_percent": server_cpu.percent,
        "per_process": [{"messages": r["messages"], "seconds": round(r["seconds"], 4)} for r in results],
    }


def summary(res: dict[str, Any], params: dict[str, Any]) -> list[tuple[str, Any]]:
    rows = [
        ("messages/s", f"{num(res['msgs_per_s'])} msg/s"),
        ("payload throughput", f"{res['mb_per_s']:,.2f} MB/s"),
        ("echoed messages", num(res["messages"])),
        ("measured for", f"{res['seconds']:.2f} s"),
        ("connections", num(res["connections_opened"])),
    ]
    if res["failures"]:
        rows.append(("connect failures", ", ".join(f"{k}: {v}" for k, v in res["failures"].items())))
    if res["dropped"]:
        rows.append(("dropped by server", num(res["dropped"])))
    rows += cpu_rows(res)
    return rows


def cpu_rows(res: dict[str, Any]) -> list[tuple[str, Any]]:
    """Client and server CPU over the window, and a warning when the client, not the server, was the limit."""
    rows: list[tuple[str, Any]] = []
    client = res.get("client_cpu_percent") or []
    if client:
        rows.append(("client CPU", " + ".join(f"{c:.0f}" for c in client) + " %"))
    server = res.get("server_cpu_percent")
    if server is not None:
        rows.append(("server CPU", f"{server:.0f} %"))
        if client and max(client) > 90 and server < 85:
            rows.append(("note", "client-bound: the client was busier than the server (add --processes)"))
    return rows
