"""Two fastws nodes fanned out through a real redis-server."""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import subprocess
import time

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
    from wsraw import wait_for

    (port_a, port_b), (bp_a, bp_b) = await two_nodes(start_server, redis_port)
    async with websockets.connect(f"ws://127.0.0.1:{port_a}/chat") as a, \
            websockets.connect(f"ws://127.0.0.1:{port_b}/chat") as b:
        await b.send("hello from node B")
        assert "hello from node B" in await recv_until(a, "hello from node B")
        await a.send("hello from node A")
        assert "hello from node A" in await recv_until(b, "hello from node A")
        await a.send("once")
        assert "once" in await recv_until(a, "once")  # its own node delivers it, once
        assert "once" in await recv_until(b, "once")
        # every message a node gets from Redis is one the other node sent it: none comes back to its sender
        await wait_for(lambda: bp_a.stats["received"] == bp_b.stats["sends"]
                       and bp_b.stats["received"] == bp_a.stats["sends"], 10)
        # (B's own join notice may go out before B has heard of A's member: only its chat line is sure)
        assert bp_a.stats["sends"] >= 2 and bp_b.stats["sends"] >= 1
        # each arrival's lag from its publication on the other node (same host: same clock)
        for bp in (bp_a, bp_b):
            assert sum(bp.receive_lag.counts) == bp.stats["received"]
            assert 0 < bp.receive_lag.sum < bp.stats["received"] * 5


async def test_publications_go_only_where_there_are_members(start_server, redis_port):
    """A node with nobody in a room gets nothing of it; the other's sends are pipelined."""
    from wsraw import wait_for

    (port_a, port_b), (bp_a, bp_b) = await two_nodes(start_server, redis_port)
    async with websockets.connect(f"ws://127.0.0.1:{port_a}/feed") as feed_a, \
            websockets.connect(f"ws://127.0.0.1:{port_a}/feed") as feed_a2:
        for i in range(200):
            await feed_a.send(f"quote {i}")
        for i in range(200):
            assert await feed_a2.recv() == f"quote {i}"
        await wait_for(lambda: bp_a.stats["published"] == 200)
        assert bp_a.stats["sends"] == 0 and bp_b.stats["received"] == 0  # node B has no /feed member
        async with websockets.connect(f"ws://127.0.0.1:{port_b}/feed") as feed_b:
            for _ in range(50):  # B's membership reaches A's view of the room
                await feed_a.send("ping")
                try:
                    if await asyncio.wait_for(feed_b.recv(), 0.2) == "ping":
                        break
                except asyncio.TimeoutError:
                    continue
            for i in range(500):
                await feed_a.send(f"burst {i}")
            got = [await asyncio.wait_for(feed_b.recv(), 5) for _ in range(500)]
            assert [m for m in got if m.startswith("burst")] == [f"burst {i}" for i in range(500)]
        assert bp_a.stats["pipelines"] < bp_a.stats["sends"]  # several sends per round trip to Redis


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

    from fastws.backplane.redis import ROOM, envelope

    (port_a, _), (bp_a, _) = await two_nodes(start_server, redis_port)
    async with websockets.connect(f"ws://127.0.0.1:{port_a}/chat") as a:
        channel = f"fastws:node:{bp_a.node_id}"
        r = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_port}/0")
        try:
            def stamp(name_length: int) -> bytes:  # the publication time and the name's length
                return struct.pack(">dH", time.time(), name_length)

            for junk in (b"", b"r", b"r" + stamp(5)[:6], b"x" + stamp(5) + b"lobbytno such kind",
                         b"r" + stamp(5) + b"lobbyq?", b"r" + stamp(2) + b"\xff\xfetbad name",
                         envelope(ROOM, "lobby", "x")[:-1] + b"\xff"):
                await r.publish(channel, junk)
            await r.publish("fastws:membership", b"\xff not an event")
            await r.publish(channel, envelope(ROOM, "lobby", "hello from a well-formed publication"))
        finally:
            await r.aclose()
        assert "hello from a well-formed publication" in await recv_until(a, "well-formed")
    assert bp_a.stats["malformed"] == 8
