#!/usr/bin/env python
"""Where the bytes of an idle connection go: the server's Python-heap allocations per connection,
by source line (tracemalloc), for each API style.

    python bench/idle_alloc.py                       # endpoint, async, handler; 2,000 connections
    python bench/idle_alloc.py --styles handler -n 5000 --top 20

The server (bench/servers/fastws_styles.py's app for the style, pings off) runs in this process
with tracemalloc on; a client in another process opens N WebSocket connections, sends nothing and
holds them.  Prints the allocations made between the snapshot before and the one after, per
connection, grouped by the line that made them (C objects made from the event loop's callbacks,
uvloop's transports among them, show up under the loop's run line).  This counts the Python heap
only: the kernel's socket buffers and the allocator's own overhead are what bench/compare.py's
bytes per idle connection (server RSS) adds.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import subprocess
import sys
import tracemalloc
from pathlib import Path

import uvloop

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "servers"))

import fastws_styles  # noqa: E402  (bench/servers)

from fastws.app import Config  # noqa: E402
from fastws.server import Server  # noqa: E402

# The client: N upgrades, then it holds them until its stdin closes.
CLIENT = r"""
import base64, os, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
request = ("GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\r\n")
held = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(request.format(base64.b64encode(os.urandom(16)).decode()).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    held.append(s)
print("held", flush=True)
sys.stdin.read()
"""


async def settle(server: Server, count: int) -> None:
    for _ in range(500):
        if server.session_count == count:
            break
        await asyncio.sleep(0.01)
    for _ in range(10):  # handlers reach their first wait
        await asyncio.sleep(0)
    gc.collect()


async def measure(style: str, n: int, top: int) -> None:
    server = Server(fastws_styles.style_app(style), Config(ping_interval=0))
    (_, port), *_ = await server.listen("127.0.0.1", 0)

    async def hold(count: int) -> asyncio.subprocess.Process:
        expected = server.session_count + count
        client = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT, str(port), str(count),
                                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert client.stdout is not None
        if await client.stdout.readline() != b"held\n":
            raise SystemExit("idle_alloc: the client could not open its connections")
        await settle(server, expected)
        return client

    warm = await hold(50)  # the first connections also fill caches and free lists
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    client = await hold(n)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"{style}: {total / n:,.0f} bytes of Python heap per idle connection ({n} connections)")
    for stat in stats[:top]:
        if abs(stat.size_diff) / n >= 4:
            frame = stat.traceback[0]
            name = "/".join(Path(frame.filename).parts[-2:])
            print(f"  {stat.size_diff / n:8,.0f} B  {stat.count_diff / n:5.2f} blocks  {name}:{frame.lineno}")
    for proc in (client, warm):
        assert proc.stdin is not None
        proc.stdin.close()
        await proc.wait()
    await server.shutdown(timeout=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--styles", default="endpoint,async,handler")
    parser.add_argument("-n", "--connections", type=int, default=2000)
    parser.add_argument("--top", type=int, default=14)
    args = parser.parse_args()
    for style in args.styles.split(","):
        uvloop.run(measure(style, args.connections, args.top))


if __name__ == "__main__":
    main()
