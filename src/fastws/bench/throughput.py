"""throughput: C connections, each keeping D messages of S bytes in flight against an echo endpoint.

The client is the Cython engine (native.py, _loadgen.pyx): the data message
is one frame, built and masked once; every read is parsed in C, the whole
messages in it counted, and as many frames written back in one send(),
straight from a shared block of copies of that frame (no copy, whatever the
size).  No Python code runs per message or per read.  Before the clock
starts, one message per connection is checked: its echo must be what was
sent, so a server that does not echo is reported as such.  With ``--raw``
the same byte streams go over plain TCP (no upgrade, no framing): every S
bytes back count as one message.

wss:// and --client-transport uvloop|aiofastnet run the
previous client instead (legacy.py: fastws.client in callback mode).
"""

from __future__ import annotations

import time
from typing import Any

from fastws.bench import legacy
from fastws.bench.common import (
    BenchError,
    CPUWindow,
    Ctl,
    ServerCPU,
    Workers,
    client_params,
    client_report,
    parse_target,
    payload_for,
    wait_until,
)
from fastws.bench.native import ECHO, HOLD, NativeClient, open_engine, use_native
from fastws.bench.ui import UI, num

__all__ = ["run", "summary", "cpu_rows", "payload_for", "worker"]


async def worker(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
    target = parse_target(p["url"], p["raw"])
    raw, inflight, n = p["raw"], p["inflight"], p["connections"]
    engine = open_engine(
        target,
        raw=raw,
        payload=payload_for(p["size"], p["text"], p["message"]),
        compression=p["compression"],
        inflight=inflight,
        sources=p["sources"],
        source_offset=p["index"] * 7919,
        open_timeout=p["open_timeout"],
    )
    client = NativeClient(engine, on_tick=lambda: ctl.progress(engine.opened))
    engine.ramp(n, concurrency=64, timeout=p["open_timeout"] * 3, max_failures=max(10, n))
    await client.wait(lambda: engine.ramp_done)
    bad = 0
    if not raw and engine.live:
        # One checked round trip per connection: the server must echo exactly what it got.
        # A connection the server closes instead of answering counts as not echoed too.
        engine.start_check()
        await client.wait(
            lambda: engine.checks_good + engine.checks_bad + engine.opened - engine.live >= engine.opened,
            p["open_timeout"],
        )
        bad = engine.opened - engine.checks_good
    ctl.send("ready", opened=engine.opened, failures=engine.failures(), bad_echo=bad)
    cmd = await ctl.recv()
    if cmd["type"] != "start" or not engine.live:
        await client.close(2.0)
        return {"messages": 0, "seconds": 0.0}
    client.on_tick = None

    def progress() -> None:
        ctl.progress(engine.received)

    # Start the pipelines: D messages per connection; from now on every echo is answered in C.
    engine.set_mode(ECHO, refill=True)
    base = engine.received
    engine.send_all(inflight)
    client.run_window(cmd["t_measure"], progress)
    cpu = CPUWindow()
    cpu.start()
    c0, t0 = engine.received, time.perf_counter()
    limits = {"max_received": c0 + p["count"]} if p["count"] else {}
    client.run_window(cmd["t_end"], progress, **limits)
    c1, t1 = engine.received, time.perf_counter()
    cpu.stop()
    ctl.send("done")  # the measured window is over (early with --count)
    progress()
    # Stop refilling; what is still in flight comes back before the closing handshake.
    engine.set_mode(HOLD)
    drained = await client.wait(lambda: engine.received >= engine.sent, 5.0)
    dropped = engine.dropped
    await client.close(2.0)
    return {
        "messages": c1 - c0,
        "seconds": t1 - t0,
        "warmup_messages": c0 - base,
        "dropped": dropped,
        "cpu_percent": cpu.percent,
        "busy_percent": cpu.busy,
        "unclosed": engine.close_timeouts,
        "opened": engine.opened,
        "sent_total": engine.sent,
        "received_total": engine.received,
        "drained": drained,
    }


def run(args: Any, ui: UI) -> dict[str, Any]:
    target = parse_target(args.url, args.raw)
    native = use_native(args, target, ui)
    params = client_params(args, target, inflight=args.inflight)
    with Workers(worker if native else legacy.throughput_worker, params) as workers:
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
        workers.gather("done", timeout=total + 60, tick=tick)
        server_cpu.stop()
        results = [r["result"] for r in workers.gather("result", timeout=total + 60, tick=tick)]
    ui.stop()
    messages = sum(r["messages"] for r in results)
    rate = sum(r["messages"] / r["seconds"] for r in results if r["seconds"] > 0)
    seconds = max((r["seconds"] for r in results), default=0.0)
    out = {
        "messages": messages,
        "seconds": round(seconds, 4),
        "msgs_per_s": round(rate, 1),
        "bytes_per_s": round(rate * args.size, 1),
        "mb_per_s": round(rate * args.size / 1e6, 3),
        "connections_opened": opened,
        "failures": failures,
        "dropped": sum(r["dropped"] for r in results),
        "per_process": [{"messages": r["messages"], "seconds": round(r["seconds"], 4)} for r in results],
    }
    if native:
        out["sent_total"] = sum(r["sent_total"] for r in results)
        out["received_total"] = sum(r["received_total"] for r in results)
        out["drained"] = all(r["drained"] for r in results)
    out.update(client_report(args, results, server_cpu, native))
    return out


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
    """Client and server CPU over the window side by side, and which side was the limit."""
    rows: list[tuple[str, Any]] = []
    client = res.get("client_cpu_percent") or []
    if client:
        where = res.get("client_cpu_list")
        rows.append(
            (
                "client CPU",
                " + ".join(f"{c:.0f}" for c in client)
                + f" % ({len(client)} process{'es' if len(client) > 1 else ''}"
                + (f", CPU {where}" if where else "")
                + ")",
            )
        )
    server = res.get("server_cpu_percent")
    if server is not None:
        pids = res.get("server_pids") or []
        rows.append(("server CPU", f"{server:.0f} %" + (f" (pid {', '.join(map(str, pids))})" if pids else "")))
    elif client:
        rows.append(("server CPU", "unknown (pass --server-pid PID)"))
    if res.get("limit"):
        rows.append(("limit", res["limit"]))
    return rows
