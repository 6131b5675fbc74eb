"""connections: ramp to N concurrent connections across client processes, hold them, measure both sides.

Each client process (auto: enough that none passes ~18,000 open files) runs
one Cython engine: its connections are C structs of ~100 bytes, with no
Python object, task or future each, so the client's own memory stays small
next to the server's.  The ramp opens ``--concurrency`` handshakes at a time
(optionally paced by ``--rate``), spreading source addresses over 127.0.0.x
when the server is on loopback (each address has its own ~28,000 ephemeral
ports); it stops at the target, at the ramp timeout, after ``--max-failures``
failed attempts per process, or when the machine runs low on memory.  The
connections are then held idle for ``--duration`` seconds, answering the
server's keepalive pings.  At the end every held connection sends one small
message and its echo is counted (``--no-verify`` skips it; a first probe on a
single connection makes sure the endpoint echoes rather than fans out).

Reported: handshakes/s and the ramp curve, failures by cause (EMFILE,
EADDRNOTAVAIL, ECONNREFUSED, timeout, HTTP 503...) with the first limit hit,
connections dropped while held, pings answered, connections still echoing,
the client's RSS per connection, and for the server (``--server-pid``,
children included; found by port when the server is on this machine) its RSS
before/after and per connection and its CPU while idle.
"""

from __future__ import annotations

import asyncio
import math
import resource
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
    cpu_seconds,
    mem_available_fraction,
    own_rss,
    parse_target,
    pss_bytes,
    rss_bytes,
    source_addresses,
    split,
    worker_cpu,
)
from fastws.bench.native import NativeClient, histogram, open_engine, use_native
from fastws.bench.ui import UI, num

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
    "memory": "memory (MemAvailable below 3 % of the machine): the ramp was stopped",
}
LOW_MEMORY = 0.03  # stop ramping when MemAvailable falls below this share of MemTotal


def per_process_limit() -> int:
    """Connections per client process: below its open-file limit, with room for the interpreter's own."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    return max(100, min(18000, hard - 2000))


PER_PROCESS = per_process_limit()


def ports_per_address() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = map(int, f.read().split())
        return hi - lo + 1
    except (OSError, ValueError):
        return 28232


def established_hash_buckets() -> int | None:
    """Buckets of the kernel's table of established TCP connections (Linux 6.1+ shows it), or None."""
    try:
        with open("/proc/sys/net/ipv4/tcp_ehash_entries") as f:
            return abs(int(f.read()))  # negative: a namespace sharing the host's table
    except (OSError, ValueError):
        return None


def established_hash_warning(n: int, loopback: bool, buckets: int | None) -> str | None:
    """Every TCP packet looks its socket up in that table: past ~2 sockets per bucket the chains it
    walks grow with the connections (on this project's VM, a million loopback connections spent 14 %
    of all CPU there and the ramp stalled)."""
    sockets = 2 * n if loopback else n  # on loopback both ends are on this host
    if buckets is None or sockets <= 2 * buckets:
        return None
    want = 1 << math.ceil(math.log2(sockets))
    return (f"{sockets:,} sockets for {buckets:,} buckets in the kernel's table of established TCP "
            f"connections: the ramp will slow as its chains grow; boot with thash_entries={want}, or run "
            f"in a network namespace made after sysctl net.ipv4.tcp_child_ehash_entries={want}")


def auto_processes(n: int) -> int:
    procs = math.ceil(n / PER_PROCESS)
    return max(procs, 2 if n >= 2000 else 1)


def auto_sources(n: int) -> int:
    """Source addresses enough for ~10,000 connections each.  connect() picks from the even half of the
    ephemeral range first (odd ports are left to bind()), and past ~14,000 connections to one server
    port from one address each connect() searches the rest of the range: the ramp slows to a crawl."""
    return max(4, math.ceil(n / (0.35 * ports_per_address())))


async def worker(p: dict[str, Any], ctl: Ctl) -> dict[str, Any]:
    target = parse_target(p["url"], p["raw"])
    engine = open_engine(
        target,
        raw=p["raw"],
        sources=p["sources"],
        source_offset=p["index"] * 7919,
        open_timeout=p["open_timeout"],
        close_timeout=p["close_timeout"],
    )
    client = NativeClient(engine)
    rss_ready = own_rss()
    ctl.send("ready", rss=rss_ready)
    cmd = await ctl.recv()
    if cmd["type"] != "ramp":
        client.detach()
        return {}
    start = time.monotonic()
    timeline: list[tuple[float, int]] = [(0.0, 0)]

    def ramp_tick() -> None:
        ctl.progress(engine.opened)
        now = time.monotonic() - start
        if now - timeline[-1][0] >= 0.25 and engine.opened != timeline[-1][1]:
            timeline.append((round(now, 3), engine.opened))
        msg = ctl.poll()  # the parent may stop the ramp (low memory)
        if msg is not None and msg["type"] == "stop_ramp":
            engine.stop_ramp()

    client.on_tick = ramp_tick
    engine.ramp(p["connections"], p["concurrency"], p["rate"], p["ramp_timeout"], p["max_failures"])
    await client.wait(lambda: engine.ramp_done)
    seconds = time.monotonic() - start
    timeline.append((round(seconds, 3), engine.opened))
    client.on_tick = lambda: ctl.progress(engine.live)
    ctl.send(
        "ramped",
        opened=engine.live,
        failures=engine.failures(),
        seconds=seconds,
        histogram=histogram(engine, "open").to_json(),
        timeline=timeline,
        stopped_by=engine.stopped_by,
        first_failure=engine.first_failure(),
        rss_before=rss_ready,
        rss_after=own_rss(),
    )
    dropped0, pings0 = engine.dropped, engine.pings
    result: dict[str, Any] = {}
    while True:
        cmd = await ctl.recv()
        if cmd["type"] == "held":
            result.update(dropped=engine.dropped - dropped0, pings_received=engine.pings - pings0,
                          still_open=engine.live)
            ctl.send("held", **result)
        elif cmd["type"] == "probe":
            # One message on one connection: an echo endpoint answers it once; a fan-out one delivers it to
            # every connection here too (then checking each connection would flood the server).
            received = engine.received
            engine.verify(1)
            answered = await client.wait(lambda: engine.verified >= 1, cmd["timeout"])
            if answered:
                await asyncio.sleep(0.2)
            ctl.send("probed", echo=answered and engine.received - received == 1)
        elif cmd["type"] == "verify":
            sent0, answered0 = engine.verify_sent, engine.verified  # not the probe
            engine.verify()
            await client.wait(lambda: engine.verified >= engine.verify_sent, cmd["timeout"])
            ctl.send("verified", sent=engine.verify_sent - sent0, answered=engine.verified - answered0)
        else:  # "close"
            break
    await client.close(p["close_timeout"] + 5)
    result["unclosed"] = engine.close_timeouts
    return result


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
    return _thin(out)


def _thin(timeline: list[list[float]], points: int = 500) -> list[list[float]]:
    """At most about ``points`` steps, evenly spaced in time, the last one kept (processes sample at
    their own moments: merged, a million-connection ramp has tens of thousands of distinct times)."""
    if len(timeline) <= points:
        return timeline
    step = timeline[-1][0] / points
    out = [timeline[0]]
    for t, count in timeline[1:-1]:
        if t - out[-1][0] >= step:
            out.append([t, count])
    out.append(timeline[-1])
    return out


def run(args: Any, ui: UI) -> dict[str, Any]:
    target = parse_target(args.url, args.raw)
    native = use_native(args, target, ui)
    n = args.connections
    procs = max(1, min(args.processes or auto_processes(n), n))
    if math.ceil(n / procs) > PER_PROCESS:
        ui.warn(
            f"{math.ceil(n / procs)} connections per process is close to the open-file limit; "
            f"use --processes {math.ceil(n / PER_PROCESS)}"
        )
    k = args.source_addresses or auto_sources(n)
    sources = source_addresses(k) if target.loopback else []
    buckets = established_hash_buckets()
    warning = established_hash_warning(n, target.loopback, buckets)
    if warning:
        ui.warn(warning)
    ramp_timeout = args.ramp_timeout or max(120.0, n / 1000)
    # A server closes (or echoes) a million connections at some tens of thousands a second: wait for it.
    close_timeout = 5.0 + n / 20000
    pids = args.server_pid or []
    params = [
        dict(
            url=args.url,
            raw=args.raw,
            connections=c,
            concurrency=max(2, math.ceil(args.concurrency / procs)),
            rate=args.rate / procs if args.rate else 0.0,
            ramp_timeout=ramp_timeout,
            max_failures=args.max_failures,
            sources=sources,
            open_timeout=args.open_timeout,
            close_timeout=close_timeout,
            index=i,
            cpu=worker_cpu(args, i),
        )
        for i, c in enumerate(split(n, procs))
    ]
    server: dict[str, Any] = {"pids": pids, "detected": bool(getattr(args, "server_pid_detected", False))}
    client: dict[str, Any] = {"path": "native" if native else "legacy"}
    verify: dict[str, Any] = {"checked": False}
    stopped_for_memory = False
    with Workers(worker if native else legacy.connections_worker, params) as workers:
        workers.start()
        ready = workers.gather("ready", timeout=30 + procs)
        if pids:
            time.sleep(0.2)
            server["rss_before"] = rss_bytes(pids)
        ramp_cpu = CPUWindow(workers.pids, children=False)
        ramp_server = ServerCPU(pids)
        ramp_cpu.start()
        ramp_server.start()
        ramp_start = time.monotonic()
        workers.send_all("ramp")
        ui.start("ramping", n)

        def tick() -> None:
            nonlocal stopped_for_memory
            done = workers.progress()
            elapsed = time.monotonic() - ramp_start
            ui.update(done, f"{num(done)}/{num(n)}  {num(done / elapsed if elapsed else 0)}/s")
            if not stopped_for_memory and mem_available_fraction() < LOW_MEMORY:
                stopped_for_memory = True
                workers.send_all("stop_ramp")

        ramped = workers.gather("ramped", timeout=ramp_timeout + args.open_timeout + 60, tick=tick)
        ramp_cpu.stop()
        ramp_server.stop()
        ui.stop()
        client["cpu_percent_during_ramp"] = ramp_cpu.percent
        server["cpu_percent_during_ramp"] = ramp_server.percent
        opened = sum(r["opened"] for r in ramped)
        ramp_seconds = max(r["seconds"] for r in ramped)
        if native:
            client["rss_before"] = sum(r.get("rss", 0) for r in ready)
            client["rss_after_ramp"] = sum(r["rss_after"] for r in ramped)
            client["pss_after_ramp"] = pss_bytes(workers.pids)  # shared pages counted once
            if opened:
                client["bytes_per_connection"] = round(
                    sum(r["rss_after"] - r["rss_before"] for r in ramped) / opened, 1
                )
        hold_start = time.monotonic()
        client_cpu0 = cpu_seconds(workers.pids, children=False)
        if pids:
            time.sleep(min(1.0, args.duration / 2))  # let the server settle after the ramp
            server["rss_after_ramp"] = rss_bytes(pids)
            cpu0, t0 = cpu_seconds(pids), time.monotonic()
        ui.start("holding", args.duration, expected_seconds=args.duration)
        while time.monotonic() - hold_start < args.duration:
            time.sleep(min(0.2, max(0.0, args.duration - (time.monotonic() - hold_start))))
            ui.update(time.monotonic() - hold_start, f"{num(workers.progress())} open")
        ui.stop()
        held_for = time.monotonic() - hold_start
        client["cpu_percent_during_hold"] = round(
            100 * (cpu_seconds(workers.pids, children=False) - client_cpu0) / held_for, 2
        )
        if pids:
            server["rss_after_hold"] = rss_bytes(pids)
            server["cpu_percent_during_hold"] = round(
                100 * (cpu_seconds(pids) - cpu0) / (time.monotonic() - t0), 2
            )
        if native:
            workers.send_all("held")  # drops and pings counted up to here, before the check
            workers.gather("held", timeout=30)
            if args.verify and opened:
                verify = _verify(workers, args, opened, ui)
                if pids and verify.get("checked"):  # every connection has exchanged a message
                    server["rss_after_echo"] = rss_bytes(pids)
        workers.send_all("close")
        results = [r["result"] for r in workers.gather("result", timeout=close_timeout + 60)]
    failures: dict[str, int] = {}
    hist = Histogram()
    for r in ramped:
        hist.merge(Histogram.from_json(r["histogram"]))
        for cause, count in r["failures"].items():
            failures[cause] = failures.get(cause, 0) + count
    firsts = [r["first_failure"] for r in ramped if r["first_failure"]]
    first = min(firsts, key=lambda f: f["t"]) if firsts else None
    ramp = _merge_timelines([r["timeline"] for r in ramped])
    if first is not None:  # a worker counts its own connections; the report wants them all
        first = dict(first, open=int(max((c for t, c in ramp if t <= first["t"]), default=0)))
    if stopped_for_memory and (first is None or opened < n):
        first = {"cause": "memory", "open": opened, "t": round(ramp_seconds, 3)}
    if pids and opened:
        server["rss_delta"] = server["rss_after_hold"] - server["rss_before"]
        server["bytes_per_connection"] = round(server["rss_delta"] / opened, 1)
        if "rss_after_echo" in server:
            server["bytes_per_connection_after_echo"] = round(
                (server["rss_after_echo"] - server["rss_before"]) / opened, 1)
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
        "ramp": ramp,
        "ramp_rates": _ramp_rates(ramp),
        "hold_seconds": args.duration,
        "dropped_during_hold": sum(r["dropped"] for r in results),
        "pings_received": sum(r["pings_received"] for r in results),
        "unclosed": sum(r["unclosed"] for r in results),
        "verify": verify,
        "processes": procs,
        "source_addresses": len(sources),
        "tcp_ehash_entries": buckets,
        "stopped_by": sorted({r["stopped_by"] for r in ramped} | ({"memory"} if stopped_for_memory else set())),
        "server": server,
        "client": client,
    }


def _verify(workers: Workers, args: Any, opened: int, ui: UI) -> dict[str, Any]:
    """Every held connection sends one small message; count the echoes (after a one-connection probe)."""
    timeout = args.open_timeout + opened / 5000
    workers.send(0, "probe", timeout=timeout)
    probe = workers.gather("probed", timeout=timeout + 30, which=[0])[0]
    if not probe["echo"]:
        ui.warn("the endpoint did not echo the probe once (not an echo endpoint?): held connections not checked")
        return {"checked": False, "reason": "the endpoint does not echo"}
    ui.start("checking", opened)
    workers.send_all("verify", timeout=timeout)
    got = workers.gather("verified", timeout=timeout + 30, tick=lambda: ui.update(workers.progress()))
    ui.stop()
    sent = sum(g["sent"] for g in got)
    answered = sum(g["answered"] for g in got)
    return {"checked": True, "sent": sent, "answered": answered, "silent": sent - answered}


def _ramp_rates(ramp: list[list[float]]) -> dict[str, float]:
    """Handshakes/s over the first and the last tenth of the connections opened (a ramp can slow down)."""
    if len(ramp) < 3 or not ramp[-1][1]:
        return {}
    total = ramp[-1][1]

    def time_at(count: float) -> float:
        return next(t for t, c in ramp if c >= count)

    t10, t90, t_end = time_at(0.1 * total), time_at(0.9 * total), time_at(total)
    return {
        "first_10_percent": round(0.1 * total / t10, 1) if t10 > 0 else 0.0,
        "last_10_percent": round(0.1 * total / (t_end - t90), 1) if t_end > t90 else 0.0,
    }


def _ramp_rate_text(rates: dict[str, float]) -> str:
    if not rates:
        return "—"
    return f"{num(rates['first_10_percent'])} / {num(rates['last_10_percent'])} /s"


def _ramp_cpu(res: dict[str, Any]) -> str:
    """Client and server CPU while ramping (percent of one core, all processes together)."""
    cli = (res.get("client") or {}).get("cpu_percent_during_ramp")
    srv = (res.get("server") or {}).get("cpu_percent_during_ramp")
    text = f"client {cli:.0f} %" if cli is not None else "client ?"
    return text + (f", server {srv:.0f} %" if srv is not None else "")


def summary(res: dict[str, Any], params: dict[str, Any]) -> list[tuple[str, Any]]:
    rows = [
        ("open connections", f"{num(res['opened'])} of {num(res['target'])}"),
        ("handshakes/s (ramp)", f"{num(res['handshakes_per_s'])} /s"),
        ("CPU during the ramp", _ramp_cpu(res)),
        ("ramp time", f"{res['ramp_seconds']:.2f} s"),
        ("handshakes/s, first / last 10 %", _ramp_rate_text(res.get("ramp_rates") or {})),
        ("open p50 / p99", f"{res['open_latency_us']['p50']:,.0f} / {res['open_latency_us']['p99']:,.0f} µs"),
        ("client processes", f"{res['processes']} over {res['source_addresses']} source addresses"),
        ("held for", f"{res['hold_seconds']:g} s"),
        ("dropped while held", num(res["dropped_during_hold"])),
        ("server pings answered", num(res["pings_received"])),
    ]
    if res.get("unclosed"):
        rows.append(("closes not finished in time", num(res["unclosed"])))
    ver = res.get("verify") or {}
    if ver.get("checked"):
        rows.append(("still echoing at the end", f"{num(ver['answered'])} of {num(ver['sent'])}"))
    elif ver.get("reason"):
        rows.append(("still echoing at the end", f"not checked: {ver['reason']}"))
    if res["failures"]:
        rows.append(("failures", ", ".join(f"{k}: {v}" for k, v in sorted(res["failures"].items()))))
    if res["limit"]:
        rows.append(("first limit reached", res["limit"]))
    srv = res["server"]
    if "bytes_per_connection" in srv:
        rows += [
            ("server RSS before", f"{srv['rss_before'] / 2**20:,.1f} MiB"),
            ("server RSS after hold", f"{srv['rss_after_hold'] / 2**20:,.1f} MiB"),
            ("server bytes per connection", f"{num(srv['bytes_per_connection'])} B"),
            *([("... after each echoed a message", f"{num(srv['bytes_per_connection_after_echo'])} B")]
              if "bytes_per_connection_after_echo" in srv else []),
            ("server CPU while held", f"{srv['cpu_percent_during_hold']:.1f} %"),
        ]
    cli = res.get("client") or {}
    if "bytes_per_connection" in cli:
        rows += [
            ("client RSS after ramp", f"{cli['rss_after_ramp'] / 2**20:,.1f} MiB"
             + (f" (PSS {cli['pss_after_ramp'] / 2**20:,.1f} MiB)" if cli.get("pss_after_ramp") else "")),
            ("client bytes per connection", f"{num(cli['bytes_per_connection'])} B"),
        ]
    if "cpu_percent_during_hold" in cli:
        rows.append(("client CPU while held", f"{cli['cpu_percent_during_hold']:.1f} %"))
    return rows
