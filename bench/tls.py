"""TLS in-process: idle memory per connection and echo throughput, fastws over TLS against fastws in
cleartext and against python-websockets over TLS (on uvloop and on asyncio's own loop), in one run.

    python bench/tls.py [--connections 1000] [--seconds 5] [--size 64] [--streams 4] [--inflight 32]

Each server runs pinned to core 0 (this client to core 1).  Memory: server RSS before and after
opening --connections connections that each exchanged one message and then sit idle, per
connection.  Throughput: --streams connections each keeping --inflight --size-byte messages in
flight for --seconds; echoes per second, the server's CPU, and the server CPU per echo (the figure
to compare: a closed-loop client on one core is often the limit, and how its reads batch up differs
between TLS and cleartext).  Certificates come from trustme.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

from benchutil import free_port, rss  # bench/benchutil.py
from fastws.client import connect

WEBSOCKETS_TLS = """
import asyncio, ssl, sys, uvloop
from websockets.asyncio.server import serve
async def echo(ws):
    async for m in ws:
        await ws.send(m)
async def main():
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(sys.argv[2])
    async with serve(echo, "127.0.0.1", int(sys.argv[1]), ssl=ctx, compression=None, ping_interval=None,
                     max_size=None) as server:
        await server.serve_forever()
(asyncio.run if sys.argv[3:] == ["asyncio"] else uvloop.run)(main())
"""




def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pinned(cmd: list[str]) -> list[str]:
    return ["taskset", "-c", "0", *cmd] if os.path.exists("/usr/bin/taskset") else cmd


async def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("server did not start")


async def idle_memory(url: str, pid: int, n: int, context: object) -> float:
    await asyncio.sleep(0.5)
    before = rss(pid)
    conns = []
    for i in range(0, n, 50):
        batch = await asyncio.gather(*(connect(url, ssl=context) for _ in range(min(50, n - i))))
        conns.extend(batch)
    for c in conns:  # one message each way, so the buffers a first read allocates are counted too
        c.send(b"x" * 64)
    for c in conns:
        await c.recv()
    await asyncio.sleep(1.0)
    after = rss(pid)
    await asyncio.gather(*(c.close() for c in conns))
    return (after - before) / n


async def throughput(url: str, pid: int, streams: int, inflight: int, size: int, seconds: float,
                     context: object) -> tuple[float, float]:
    payload = os.urandom(size)
    done = 0
    running = True
    conns = []

    def on_message_for(index: int):  # type: ignore[no-untyped-def]
        def on_message(message: object) -> None:
            nonlocal done
            done += 1
            if running:
                conns[index].send(payload)
        return on_message

    for i in range(streams):
        conns.append(await connect(url, ssl=context, on_message=on_message_for(i), max_message_size=0))
    t0, cpu0, done0 = time.perf_counter(), cpu_seconds(pid), done
    for c in conns:
        for _ in range(inflight):
            c.send(payload)
    await asyncio.sleep(seconds)
    running = False
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    rate = (done - done0) / elapsed
    await asyncio.sleep(0.2)
    await asyncio.gather(*(c.close() for c in conns))
    return rate, 100 * cpu / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--inflight", type=int, default=32)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        os.sched_setaffinity(0, {1})
    tmp = Path(tempfile.mkdtemp(prefix="fastws-tls-bench-"))
    ca = trustme.CA()
    certfile = tmp / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(certfile))
    import ssl

    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    fastws = [sys.executable, "-m", "fastws", "serve", "--log-level", "warning", "--ping-interval", "0",
              "--max-message-size", "0"]
    servers = [
        ("fastws, TLS", "wss", fastws + ["--certfile", str(certfile)]),
        ("fastws, cleartext", "ws", fastws),
        ("websockets, TLS", "wss", [sys.executable, "-c", WEBSOCKETS_TLS]),
        ("websockets, TLS, asyncio loop", "wss", [sys.executable, "-c", WEBSOCKETS_TLS]),
    ]
    rows = []
    for name, scheme, cmd in servers:
        port = free_port()
        full = cmd + (["--port", str(port)] if cmd[1] == "-m" else [str(port), str(certfile)])
        if name.endswith("asyncio loop"):
            full.append("asyncio")
        proc = subprocess.Popen(pinned(full))
        try:
            await wait_port(port, proc)
            url = f"{scheme}://127.0.0.1:{port}/echo"
            context = client_context if scheme == "wss" else None
            memory = await idle_memory(url, proc.pid, args.connections, context)
            rate, cpu = await throughput(url, proc.pid, args.streams, args.inflight, args.size, args.seconds,
                                         context)
        finally:
            proc.terminate()
            proc.wait(30)
        per_echo = cpu / 100 / rate * 1e6 if rate else 0.0  # the robust figure: the client may be the limit
        rows.append({"server": name, "idle_bytes_per_connection": round(memory), "echoes_per_s": round(rate),
                     "server_cpu_percent": round(cpu, 1), "server_us_per_echo": round(per_echo, 2)})
        print(f"{name:30} {memory / 1024:8.1f} KiB/idle connection  {rate:10,.0f} echoes/s  "
              f"server CPU {cpu:5.1f} %  {per_echo:6.2f} µs of server CPU per echo", flush=True)
    print(json.dumps({"args": vars(args), "results": rows}))


if __name__ == "__main__":
    asyncio.run(main())
