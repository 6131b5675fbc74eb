#!/usr/bin/env python
"""permessage-deflate: server CPU per compressed message and bytes on the wire, fastws against
aiohttp and python-websockets, in one run.

    python bench/compression.py                  # ~1 minute
    python bench/compression.py --messages 100000

Each server runs alone on CPU 0 (taskset) and echoes; one python-websockets client with
permessage-deflate (its defaults) on CPU 1 sends --messages JSON messages of about 400 bytes
(realistic quotes: field names repeat, numbers change), --window at a time, and checks every echo.
Measured on the server process: CPU seconds (user + system, /proc/PID/stat) and bytes written to
sockets (/proc/PID/io wchar) over the run, per message.  The compression ratio is the payload
bytes over the compressed bytes the server wrote (frame headers included).  Writes
bench/results/compression.json, prints a table and, when every variant ran (no --only), writes it
as the section "Compression" of bench/RESULTS.md (bench/compare.py keeps that section).

The client is the limit there (python-websockets compressing and inflating in Python's zlib), so
each server waits for it between batches: every figure includes the server's share of those
wake-ups, which the faster uncompressed echo amortizes over more messages per read.  So each
server is also measured saturated: `fastws bench throughput --compression` (the Cython engine:
one quote deflated once at zlib's default level and resent, the first echo of each connection
inflated and checked, the rest counted) with 100 connections, 1 message in flight each, on CPU 1;
server CPU per message there = its CPU share / messages per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import websockets
from websockets.asyncio.client import connect

from benchutil import cpu_model, write_section  # bench/benchutil.py
from fastws.deflate import SHARED_ZLIB_VERSION

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
SECTION = "## Compression: permessage-deflate, server CPU per message and bytes on the wire"
TARGET_US = 15.0  # issue 10: the no-context-takeover default, per compressed ~400-byte JSON message
SERVERS = HERE / "servers"

VARIANTS = [
    ("fastws", ["fastws_echo.py", "--compression"], "no context takeover, shared zlib-ng stream, level 1 (default)"),
    ("fastws-level6", ["fastws_echo.py", "--compression", "--compression-level", "6"],
     "the same at level 6: dynamic Huffman codes per message"),
    ("fastws-takeover", ["fastws_echo.py", "--compression", "--compression-context-takeover"],
     "context takeover, 12-bit windows, memLevel 5"),
    ("aiohttp", ["aiohttp_echo.py", "--compression"], "context takeover, 15-bit windows"),
    ("websockets", ["websockets_echo.py", "--compression"], "context takeover, 12-bit windows, memLevel 5"),
    ("fastws-plain", ["fastws_echo.py"], "no compression (the floor)"),
]


def aiohttp_version() -> str:
    from importlib.metadata import version

    return version("aiohttp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bytes_written(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def quote(rng: random.Random, i: int) -> str:
    """About 400 bytes of the JSON a live-quotes feed sends."""
    symbol = rng.choice(["AAPL", "MSFT", "GOOG", "AMZN", "NVDA", "META", "TSLA", "BRK.B"])
    price = rng.uniform(50, 900)
    return json.dumps({
        "type": "quote", "seq": i, "symbol": symbol, "exchange": "NASDAQ", "currency": "USD",
        "bid": round(price - 0.01, 2), "ask": round(price + 0.01, 2), "last": round(price, 2),
        "bid_size": rng.randrange(1, 5000), "ask_size": rng.randrange(1, 5000), "volume": rng.randrange(10**7),
        "open": round(price * 0.99, 2), "high": round(price * 1.02, 2), "low": round(price * 0.97, 2),
        "change_percent": round(rng.uniform(-5, 5), 3), "timestamp": f"2026-12-01T12:00:00.{i % 10**6:06d}Z",
        "market_state": "REGULAR", "source": "consolidated", "flags": ["realtime", "level1"],
    })


async def drive(port: int, messages: list[str], window: int) -> None:
    async with connect(f"ws://127.0.0.1:{port}/echo", compression="deflate", max_size=None,
                       ping_interval=None) as ws:
        for start in range(0, len(messages), window):
            batch = messages[start:start + window]
            for m in batch:
                await ws.send(m)
            for m in batch:
                if await ws.recv() != m:
                    raise SystemExit("wrong echo")


def saturated(port: int, pid: int, message: str, compressed: bool, duration: float) -> dict:
    """The server saturated by the bench engine: msgs/s and server CPU µs per message."""
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "message.json", Path(tmp) / "run.json"
        path.write_text(message, encoding="utf-8")
        subprocess.run(["taskset", "-c", "1", sys.executable, "-m", "fastws", "bench", "throughput",
                        f"ws://127.0.0.1:{port}/echo", "--text", "--message-file", str(path),
                        *(["--compression"] if compressed else []), "-c", "100", "-i", "1",
                        "-d", str(duration), "-w", "1", "--server-pid", str(pid), "--quiet", "--json", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        res = json.loads(out.read_text())["results"]
    rate, cpu = res["msgs_per_s"], res["server_cpu_percent"]
    return {"msgs_per_s": round(rate), "server_cpu_percent": cpu, "server_bound": res["server_bound"],
            "server_cpu_us_per_message": round(cpu / 100 / rate * 1e6, 2)}


def run_variant(name: str, script: list[str], messages: list[str], warmup: list[str], window: int,
                saturated_for: float) -> dict:
    port = free_port()
    server = subprocess.Popen(["taskset", "-c", "0", sys.executable, str(SERVERS / script[0]), "--port", str(port),
                               *script[1:]], cwd=SERVERS, stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        asyncio.run(drive(port, warmup, window))
        cpu0, out0, t0 = cpu_seconds(server.pid), bytes_written(server.pid), time.monotonic()
        asyncio.run(drive(port, messages, window))
        cpu, out, elapsed = cpu_seconds(server.pid) - cpu0, bytes_written(server.pid) - out0, time.monotonic() - t0
        busy = saturated(port, server.pid, messages[0], "--compression" in script, saturated_for) \
            if saturated_for else None
    finally:
        server.terminate()
        server.wait()
    payload = sum(len(m) for m in messages)
    count = len(messages)
    return {"server": name, "messages": count, "server_cpu_us_per_message": round(cpu * 1e6 / count, 2),
            "wire_bytes_per_message": round(out / count, 1), "payload_bytes_per_message": payload / count,
            "ratio": round(payload / out, 2) if out else None, "msgs_per_s": round(count / elapsed),
            "saturated": busy}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=40000)
    p.add_argument("--window", type=int, default=16, help="messages in flight")
    p.add_argument("--only", help="comma-separated variants")
    p.add_argument("--saturated", type=float, default=3.0, metavar="SECONDS",
                   help="measured time of the saturated run of each server (0: skip it)")
    args = p.parse_args()
    os.sched_setaffinity(0, {1})  # the client on CPU 1
    rng = random.Random(7692)
    messages = [quote(rng, i) for i in range(args.messages)]
    warmup = messages[:2000]
    rows = [run_variant(name, script, messages, warmup, args.window, args.saturated)
            for name, script, _ in VARIANTS if not args.only or name in args.only.split(",")]
    notes = {name: note for name, _, note in VARIANTS}
    print(f"{'server':17} {'CPU us/msg':>10} {'wire B/msg':>10} {'ratio':>6} {'msgs/s':>9} "
          f"{'saturated us/msg':>16} {'msgs/s':>9}  settings")
    for r in rows:
        busy = r["saturated"] or {"server_cpu_us_per_message": "-", "msgs_per_s": 0}
        print(f"{r['server']:17} {r['server_cpu_us_per_message']:>10} {r['wire_bytes_per_message']:>10} "
              f"{r['ratio']:>6} {r['msgs_per_s']:>9,} {busy['server_cpu_us_per_message']:>16} "
              f"{busy['msgs_per_s']:>9,}  {notes[r['server']]}")
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, kernel {platform.release()}",
              "python": platform.python_version(), "websockets": websockets.__version__,
              "aiohttp": aiohttp_version(),
              "zlib": {"shared streams": SHARED_ZLIB_VERSION, "system": zlib.ZLIB_RUNTIME_VERSION},
              "command": " ".join(["python", "bench/compression.py", *sys.argv[1:]]),
              "message_bytes": sum(map(len, messages)) / len(messages),
              "rows": rows}
    out = HERE / "results" / "compression.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.only:
        write_section(markdown(result, notes), RESULTS_MD)
        print(f"wrote the section to {RESULTS_MD}")


def markdown(result: dict, notes: dict[str, str]) -> str:
    rows = {r["server"]: r for r in result["rows"]}
    base = rows.get("aiohttp")
    zlib_versions = result["zlib"]
    lines = [
        SECTION, "",
        f"Generated by `{result['command']}` on {result['date']}.",
        "",
        f"- Machine: {result['machine']}; Python {result['python']}; client python-websockets "
        f"{result['websockets']} (permessage-deflate, its defaults), aiohttp {result['aiohttp']}; "
        f"zlib: fastws's shared streams {zlib_versions['shared streams']}, system {zlib_versions['system']}.",
        f"- Each server alone on CPU 0, echoing {result['rows'][0]['messages']:,} "
        f"JSON quotes of {result['message_bytes']:.0f} bytes on average to one client on CPU 1; server CPU "
        "(user + system) and bytes written per message; ratio: payload bytes over bytes on the wire.",
        "- The client is the limit (it compresses in Python's zlib), so every figure includes the server's "
        "wake-ups while it waits; `x aiohttp`: CPU per message over aiohttp's in the same run.",
        "- Saturated: the same server driven to its limit by `fastws bench throughput --compression "
        "--message-file QUOTE --text -c 100 -i 1` (the Cython engine on CPU 1: the first quote deflated once at "
        "zlib's default level, resent; each connection's first echo inflated and checked); CPU per message = "
        "the server's CPU share / messages per second.",
        "- The compression work alone, without sockets (what the shared streams cost per message, by library "
        "and level): `taskset -c 1 python bench/deflate_cost.py`.",
        "",
        "| server | CPU µs/msg | CPU x aiohttp | wire B/msg | ratio | msgs/s | saturated: CPU µs/msg "
        "| x aiohttp | msgs/s | server CPU | settings |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_busy = base and base.get("saturated")
    for name, r in rows.items():
        cpu = r["server_cpu_us_per_message"]
        ratio_to = f"{cpu / base['server_cpu_us_per_message']:.2f}x" if base else "—"
        busy = r.get("saturated")
        if busy:
            busy_to = (f"{busy['server_cpu_us_per_message'] / base_busy['server_cpu_us_per_message']:.2f}x"
                       if base_busy else "—")
            saturated_cells = (f"{busy['server_cpu_us_per_message']:.1f} | {busy_to} | {busy['msgs_per_s']:,} | "
                               f"{busy['server_cpu_percent']:.0f} %")
        else:
            saturated_cells = "— | — | — | —"
        lines.append(f"| {name} | {cpu:.1f} | {ratio_to} | {r['wire_bytes_per_message']:.0f} | "
                     f"{r['ratio']:.2f} | {r['msgs_per_s']:,} | {saturated_cells} | {notes[name]} |")
    default = rows.get("fastws")
    if default is not None:
        cpu = default["server_cpu_us_per_message"]
        verdict = "met" if cpu <= TARGET_US else "not met"
        lines += ["", f"Target (issue 10): <= {TARGET_US:g} µs of server CPU per message in the no-context-takeover "
                      f"default, ratio beside it: with the python-websockets client, **{verdict}** ({cpu:.1f} µs at a "
                      f"ratio of {default['ratio']:.2f})"]
        busy = default.get("saturated")
        if busy:
            busy_cpu = busy["server_cpu_us_per_message"]
            lines[-1] += (f"; saturated, **{'met' if busy_cpu <= TARGET_US else 'not met'}** ({busy_cpu:.1f} µs, "
                          f"{busy['msgs_per_s']:,} msgs/s at {busy['server_cpu_percent']:.0f} % of a core)")
        lines[-1] += "."
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
