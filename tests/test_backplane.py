"""Two fastws nodes fanned out through a real redis-server."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess

import pytest
import websockets

from fastws.backplane.redis import RedisBackplane
from fastws.demo import create_app

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_redis(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return proc
        except OSError:
            await asyncio.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


@pytest.fixture
async def redis_port():
    port = free_port()
    proc = await start_redis(port)
    yield port
    proc.kill()
    proc.wait()


async def two_nodes(start_server, redis_port):
    ports = []
    backplanes = []
    for _ in range(2):
        app = create_app()
        backplanes.append(RedisBackplane(app.hub, f"redis://127.0.0.1:{redis_port}/0"))
        _, port = await start_server(app)
        ports.append(port)
    for bp in backplanes:
        await asyncio.wait_for(bp.connected.wait(), 5)
    return ports, backplanes


async def recv_until(ws, text: str, timeout: float = 5.0) -> str:
    async def scan() -> str:
        while True:
            message = await ws.recv()
            if text in message:
                return message

    return await asyncio.wait_for(scan(), timeout)


async def test_chat_reaches_clients_on_the_other_node(start_server, redis_port):
    (port_a, port_b), _ = await two_nodes(start_server, redis_port)
    async with websockets.connect(f"ws://127.0.0.1:{port_a}/chat") as a, \
            websockets.connect(f"ws://127.0.0.1:{port_b}/chat") as b:
        await b.send("hello from node B")
        assert "hello from node B" in await recv_until(a, "hello from node B")
        await a.send("hello from node A")
        assert "hello from node A" in await recv_until(b, "hello from node A")
        # the sender's own node delivers once, not again when Redis echoes it back
        await a.send("once")
        await recv_until(a, "once")
        await asyncio.sleep(0.3)
        extra = []
        while True:
            try:
                extra.append(await asyncio.wait_for(a.recv(), 0.1))
            except asyncio.TimeoutError:
                break
        assert not any("once" in m for m in extra)


async def test_node_keeps_serving_without_redis_and_reconnects(start_server):
    redis_port = free_port()
    redis = await start_redis(redis_port)
    (port_a, port_b), (bp_a, bp_b) = await two_nodes(start_server, redis_port)
    redis.kill()
    redis.wait()
    async with websockets.connect(f"ws://127.0.0.1:{port_a}/chat") as a1, \
            websockets.connect(f"ws://127.0.0.1:{port_a}/chat") as a2:
        await a1.send("local while redis is down")
        assert "local while redis is down" in await recv_until(a2, "local while redis is down")
    redis = await start_redis(redis_port)
    try:
        await asyncio.sleep(0.2)
        await asyncio.wait_for(asyncio.gather(bp_a.connected.wait(), bp_b.connected.wait()), 10)
        async with websockets.connect(f"ws://127.0.0.1:{port_a}/chat") as a, \
                websockets.connect(f"ws://127.0.0.1:{port_b}/chat") as b:
            await b.send("after reconnect")
            assert "after reconnect" in await recv_until(a, "after reconnect")
        assert bp_a.stats["reconnects"] >= 1
    finally:
        redis.kill()
        redis.wait()


async def test_a_malformed_publication_is_counted_and_delivery_goes_on(start_server, redis_port):
    """Anything may be published on a Redis channel: garbage must not end cross-node delivery."""
    import redis.asyncio as aioredis

    (port_a, _), (bp_a, _) = await two_nodes(start_server, redis_port)
    async with websockets.connect(f"ws://127.0.0.1:{port_a}/chat") as a:
        r = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_port}/0")
        try:
            for junk in (b"no-separator", b"node x-not-a-kind", b"node t\xff\xfe not utf-8", b""):
                await r.publish("fastws:lobby", junk)
            await r.publish(b"fastws:\xff", b"other-node tbad channel name")
            await r.publish("fastws:lobby", b"other-node thello from a well-formed publication")
        finally:
            await r.aclose()
        assert "hello from a well-formed publication" in await recv_until(a, "well-formed")
    assert bp_a.stats["malformed"] == 5
