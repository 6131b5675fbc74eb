"""connections: ramp to N concurrent connections across client processes, hold them, measure the server.

Each client process opens its share (``--concurrency`` handshakes at a time,
optionally paced by ``--rate``), spreading source addresses over 127.0.0.x
when the server is on loopback (each address has its own ephemeral ports).
The connections then sit idle for ``--duration`` seconds, answering the
server's keepalive pings.  Given ``--server-pid`` (repeatable; children are
counted too) the server's resident memory is read before the ramp and after
the hold: the difference over the connections opened is the memory cost of
an idle connection.  The server's CPU use during the hold is its keepalive
cost.  Failures are counted by cause (ECONNREFUSED, EADDRNOTAVAIL, EMFILE,
timeout, HTTP 503...), and the first one says which limit was reached first.
"""

from __future__ import annotations

import math
import time
from typing import Any

from fastws.bench.clients import Opener, close_all, connector
from fastws.bench.common import (
    BenchError,
    Ctl,
    Histogram,
    Workers,
    cpu_seconds,
    parse_target,
    rss_bytes,
    source_addresses,
    split,
)
from fastws.bench.ui import UI, num

PER_PROCESS = 15000  # the open-file limit here is 20000 per process: keep headroom
LIMIT_HINTS = {
    "EMFILE": "open files per process (ulimit -n)",
    "ENFILE": "open files system-wide (fs.file-max)",
    "EADDRNOTAVAIL": "source ports (add source addresses / widen net.ipv4.ip_local_port_range)",
    "EADDRINUSE": "source ports",
    "ECONNREFUSED": "listen backlog or server not accepting",
    "ECONNRESET": "server reset connections (backlog, limits)",
    "timeout": "server too slow to accept or answer (CPU, backlog)",
    "HTTP 503": "server connection limit (max_connections)",
    "ENOMEM": "memory",
    "ENOBUFS": "kernel socket buffers",
}


def auto_processes(n: int) -> int:
    procs = math.ceil(n / PER_PROCESS)
    return max(procs, 2 if n >= 2000 else 1)


async def worker(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
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


def _merge_timelines(timelines: list[list[list[float]]]) -> list[list[float]]:
    """Sum step functions (t, open count) of several processes."""
    times = sorted({t for tl in timelines for t, _ in tl})
    out = []
    pos = [0] * len(timelines)
    for t in times:
        total = 0.0
        for i, tl in enumerate(timelines):
            while pos[i] + 1 < len(tl) and tl[pos[i] + 1][0] <= t:
                pos[i] += 1
            total += tl[pos[i]][1] if tl and tl[pos[i]][0] <= t else 0
        out.append([round(t, 3), total])
    return out


def run(args: Any, ui: UI) -> dict[str, Any]:
    target = parse_target(args.url, args.raw)
    n = args.connections
    procs = args.processes or auto_processes(n)
    procs = max(1, min(procs, n))
    if math.ceil(n / procs) > PER_PROCESS:
        ui.warn(
            f"{math.ceil(n / procs)} connections per process is close to the open-file limit; "
            f"use --processes {math.ceil(n / PER_PROCESS)}"
        )
    k = args.source_addresses or max(4, math.ceil(n / 20000))
    sources = source_addresses(k) if target.loopback else []
    pids = args.server_pid or []
    params = [
        dict(
            url=args.url,
            raw=args.raw,
            connections=c,
            concurrency=max(1, args.concurrency // procs),
            rate=args.rate / procs if args.rate else 0.0,
            ramp_timeout=args.ramp_timeout,
            max_failures=args.max_failures,
            sources=sources,
            open_timeout=args.open_timeout,
            index=i,
        )
        for i, c in enumerate(split(n, procs))
    ]
    server: dict[str, Any] = {"pids": pids}
    with Workers(worker, params) as workers:
        workers.start()
        workers.gather("ready", timeout=30)
        if pids:
            time.sleep(0.2)
            server["rss_before"] = rss_bytes(pids)
        ramp_start = time.monotonic()
        workers.send_all("ramp")
        ui.start("ramping", n)

        def tick() -> None:
            done = workers.progress()
            elapsed = time.monotonic() - ramp_start
            ui.update(done, f"{num(done)}/{num(n)}  {num(done / elapsed if elapsed else 0)}/s")

        ramped = workers.gather("ramped", timeout=args.ramp_timeout + args.open_timeout + 60, tick=tick)
        ui.stop()
        opened = sum(r["opened"] for r in ramped)
        ramp_seconds = max(r["seconds"] for r in ramped)
        hold_start = time.monotonic()
        if pids:
            time.sleep(min(1.0, args.duration / 2))  # let the server settle after the ramp
            server["rss_after_ramp"] = rss_bytes(pids)
            cpu0, t0 = cpu_seconds(pids), time.monotonic()
        ui.start("holding", args.duration, expected_seconds=args.duration)
        while time.monotonic() - hold_start < args.duration:
            time.sleep(min(0.2, max(0.0, args.duration - (time.monotonic() - hold_start))))
            ui.update(time.monotonic() - hold_start, f"{num(opened)} open")
        ui.stop()
        if pids:
            server["rss_after_hold"] = rss_bytes(pids)
            server["cpu_percent_during_hold"] = round(
                100 * (cpu_seconds(pids) - cpu0) / (time.monotonic() - t0), 2
            )
        workers.send_all("close")
        results = [r["result"] for r in workers.gather("result", timeout=60)]
    failures: dict[str, int] = {}
    hist = Histogram()
    for r in ramped:
        hist.merge(Histogram.from_json(r["histogram"]))
        for cause, count in r["failures"].items():
            failures[cause] = failures.get(cause, 0) + count
    firsts = [r["first_failure"] for r in ramped if r["first_failure"]]
    first = min(firsts, key=lambda f: f["t"]) if firsts else None
    if pids and opened:
        server["rss_delta"] = server["rss_after_hold"] - server["rss_before"]
        server["bytes_per_connection"] = round(server["rss_delta"] / opened, 1)
    if opened == 0:
        raise BenchError(f"no connection to {args.url} could be opened: {failures or 'unknown error'}")
    return {
        "target": n,
        "opened": opened,
        "failed": sum(failures.values()),
        "failures": failures,
        "first_failure": first,
        "limit": (f"{first['cause']}: {LIMIT_HINTS.get(first['cause'], 'see the error')}" if first else None),
        "ramp_seconds": round(ramp_seconds, 4),
        "handshakes_per_s": round(opened / ramp_seconds, 1) if ramp_seconds else 0.0,
        "open_latency_us": hist.summary_us(),
        "ramp": _merge_timelines([r["timeline"] for r in ramped]),
        "hold_seconds": args.duration,
        "dropped_during_hold": sum(r["dropped"] for r in results),
        "pings_received": sum(r["pings_received"] for r in results),
        "unclosed": sum(r["unclosed"] for r in results),
        "processes": procs,
        "source_addresses": len(sources),
        "stopped_by": sorted({r["stopped_by"] for r in ramped}),
        "server": server,
    }


def summary(res: dict[str, Any], params: dict[str, Any]) -> list[tuple[str, Any]]:
    rows = [
        ("open connections", f"{num(res['opened'])} of {num(res['target'])}"),
        ("handshakes/s (ramp)", f"{num(res['handshakes_per_s'])} /s"),
        ("ramp time", f"{res['ramp_seconds']:.2f} s"),
        ("open p50 / p99", f"{res['open_latency_us']['p50']:,.0f} / {res['open_latency_us']['p99']:,.0f} µs"),
        ("held for", f"{res['hold_seconds']:g} s"),
        ("dropped while held", num(res["dropped_during_hold"])),
        ("server pings answered", num(res["pings_received"])),
    ]
    if res["failures"]:
        rows.append(("failures", ", ".join(f"{k}: {v}" for k, v in sorted(res["failures"].items()))))
        rows.append(("first limit reached", res["limit"]))
    srv = res["server"]
    if "bytes_per_connection" in srv:
        rows += [
            ("server RSS before", f"{srv['rss_before'] / 2**20:,.1f} MiB"),
            ("server RSS after hold", f"{srv['rss_after_hold'] / 2**20:,.1f} MiB"),
            ("bytes per connection", f"{num(srv['bytes_per_connection'])} B"),
            ("server CPU while held", f"{srv['cpu_percent_during_hold']:.1f} %"),
        ]
    return rows
