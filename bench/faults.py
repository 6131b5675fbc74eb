#!/usr/bin/env python
"""Memory under faults, measured on a real `fastws serve` process (issue: connection lifecycle).

    python bench/faults.py                      # both studies, about a minute
    python bench/faults.py --churn 20000 --slow 200

* churn: connections that connect, exchange a message and vanish with a reset (or a FIN without a
  close frame), in waves; the server's RSS and open file descriptors before and after.
* slow readers: clients that never read, on an endpoint that pushes 64 KiB messages without
  awaiting them (16 KiB each); without a process budget each could hold max_send_buffer (4 MiB).  The server's
  peak RSS, the cut-offs by code, and the RSS once they are gone.

Prints a table and writes bench/results/faults.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from benchutil import free_port, rss  # bench/benchutil.py

HERE = Path(__file__).resolve().parent
UPGRADE = (b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
MiB = 1024 * 1024




def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def start_server(extra: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE / "servers"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "fastws", "serve", "faults_app:app", "--port", str(port),
                             "--log-level", "error", "--ping-interval", "0", *extra], env=env)
    for _ in range(200):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return proc, port
        except OSError:
            await asyncio.sleep(0.05)
    raise SystemExit("fastws serve did not start")


async def upgraded(port: int, path: bytes, rcvbuf: int | None = None) -> tuple[asyncio.StreamReader,
                                                                                  asyncio.StreamWriter]:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(UPGRADE % path)
    await reader.readuntil(b"\r\n\r\n")
    return reader, writer


def masked_text(text: bytes) -> bytes:
    return bytes((0x81, 0x80 | len(text))) + b"\0\0\0\0" + text


async def wait_quiet(pid: int, baseline_fds: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while fds(pid) > baseline_fds and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


async def churn(n: int) -> dict:
    proc, port = await start_server([])
    try:
        async def one(i: int) -> None:
            reader, writer = await upgraded(port, b"/echo")
            writer.write(masked_text(b"hello %d" % i))
            if i % 2:
                await reader.readexactly(2 + len(b"hello %d" % i))
            if i % 3:
                writer.transport.abort()  # RST
            else:
                writer.close()  # FIN, no close frame

        async def waves(count: int) -> None:
            for base in range(0, count, 200):
                await asyncio.gather(*(one(i) for i in range(base, min(count, base + 200))))

        await waves(2000)  # warm-up: allocator pools, caches
        await asyncio.sleep(1)
        before_rss, before_fds = rss(proc.pid), fds(proc.pid)
        started = time.monotonic()
        await waves(n)
        elapsed = time.monotonic() - started
        await wait_quiet(proc.pid, before_fds)
        await asyncio.sleep(1)
        return {"connections": n, "seconds": round(elapsed, 1), "rss_before": before_rss, "rss_after": rss(proc.pid),
                "rss_growth_per_1000": (rss(proc.pid) - before_rss) * 1000 // n,
                "fds_before": before_fds, "fds_after": fds(proc.pid)}
    finally:
        proc.terminate()
        proc.wait()


async def slow_readers(n: int, budget: int) -> dict:
    proc, port = await start_server(["--send-budget", str(budget)])
    try:
        await asyncio.sleep(0.5)
        before = rss(proc.pid)
        peak = before
        clients = [await upgraded(port, b"/flood", rcvbuf=4096) for _ in range(n)]  # none of them reads
        codes: dict[str, int] = {}

        async def watch_until_closed() -> None:
            nonlocal peak
            deadline = time.monotonic() + 60
            while fds(proc.pid) > 8 and time.monotonic() < deadline:
                peak = max(peak, rss(proc.pid))
                await asyncio.sleep(0.05)

        async def drain(reader: asyncio.StreamReader) -> None:
            """Catch up with everything sent, to learn the close code at its end."""
            tail = b""
            try:
                while True:
                    chunk = await reader.read(1 << 20)
                    if not chunk:
                        break
                    tail = (tail + chunk)[-256:]
            except ConnectionError:
                pass
            at = tail.rfind(b"\x88")
            while at >= 0 and (at + 2 > len(tail) or at + 2 + (tail[at + 1] & 0x7F) != len(tail)):
                at = tail.rfind(b"\x88", 0, at)
            code = str(struct.unpack("!H", tail[at + 2: at + 4])[0]) if at >= 0 else "none (reset)"
            codes[code] = codes.get(code, 0) + 1

        watcher = asyncio.ensure_future(watch_until_closed())
        await asyncio.sleep(1.5)  # the flood fills every buffer it can; then the clients catch up
        await asyncio.gather(*(drain(r) for r, _ in clients))
        await watcher
        for _, w in clients:
            w.close()
        await asyncio.sleep(1)
        return {"clients": n, "send_budget": budget, "unbounded_would_be": n * 4 * MiB, "rss_before": before,
                "rss_peak": peak, "rss_peak_growth": peak - before, "rss_after": rss(proc.pid), "close_codes": codes}
    finally:
        proc.terminate()
        proc.wait()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--churn", type=int, default=20000, help="connections in the churn study")
    p.add_argument("--slow", type=int, default=200, help="slow readers")
    p.add_argument("--budget", type=int, default=64 * MiB, help="--send-budget for the slow-reader study")
    args = p.parse_args()
    result = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, Linux {platform.release()}",
              "python": platform.python_version(), "command": " ".join(["python", *sys.argv])}
    result["churn"] = await churn(args.churn)
    result["slow_readers"] = await slow_readers(args.slow, args.budget)
    c, s = result["churn"], result["slow_readers"]
    print(f"churn: {c['connections']:,} abrupt disconnects in {c['seconds']} s: RSS {c['rss_before'] / MiB:.1f} -> "
          f"{c['rss_after'] / MiB:.1f} MiB ({c['rss_growth_per_1000']:,} B per 1,000), fds {c['fds_before']} -> "
          f"{c['fds_after']}")
    print(f"slow readers: {s['clients']} clients that never read, send budget {s['send_budget'] / MiB:.0f} MiB: "
          f"peak RSS +{s['rss_peak_growth'] / MiB:.0f} MiB (unbounded: {s['unbounded_would_be'] / MiB:.0f} MiB), "
          f"after {s['rss_after'] / MiB:.0f} MiB, closes {s['close_codes']}")
    out = HERE / "results" / "faults.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
