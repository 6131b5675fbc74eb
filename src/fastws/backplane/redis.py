"""Redis pub/sub backplane: hub publications reach the sessions of every node.

Each node publishes to ``<prefix><channel>`` and pattern-subscribes to
``<prefix>*``; a message carries the publishing node's id so that node skips
its own copy (it already delivered locally).  A node that loses Redis keeps
serving its local sessions and reconnects with backoff; publications made
while Redis is unreachable are dropped and counted (pub/sub has no memory).
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import TYPE_CHECKING

try:
    import redis.asyncio as aioredis
except ImportError as exc:  # pragma: no cover - the [redis] extra is missing
    raise ImportError("the Redis backplane needs the redis package: pip install 'fastws[redis]'") from exc

from fastws.logs import Throttle

if TYPE_CHECKING:
    from fastws.hub import Hub

log = logging.getLogger("fastws.backplane")

TEXT, BINARY = b"t", b"b"
MAX_PENDING = 10_000  # publications queued for Redis before new ones are dropped


class RedisBackplane:
    """Attach with ``RedisBackplane(app.hub, "redis://host:6379/0")``; the server starts and stops it."""

    def __init__(self, hub: Hub, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "fastws:") -> None:
        self.hub = hub
        self.url = url
        self.prefix = prefix
        self.node_id = b""  # set in start(): workers forked from one master must differ
        self.stats = {"published": 0, "received": 0, "dropped": 0, "reconnects": 0, "malformed": 0}
        self._throttle = Throttle(log)
        self._pending: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(MAX_PENDING)
        self._tasks: list[asyncio.Task[None]] = []
        self._redis: aioredis.Redis | None = None
        self.connected = asyncio.Event()
        hub.backplane = self

    async def start(self) -> None:
        self.node_id = f"{uuid.uuid4().hex[:12]}-{os.getpid()}".encode()
        self._redis = aioredis.Redis.from_url(self.url)
        self._tasks = [asyncio.create_task(self._receive_forever()), asyncio.create_task(self._send_forever())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._redis is not None:
            await self._redis.aclose()

    # -- outgoing ------------------------------------------------------------------

    def publish(self, channel: str, message: str | bytes) -> None:
        """Queue a publication (never blocks the event loop on Redis)."""
        if isinstance(message, str):
            envelope = self.node_id + b" " + TEXT + message.encode()
        else:
            envelope = self.node_id + b" " + BINARY + message
        try:
            self._pending.put_nowait((self.prefix + channel, envelope))
        except asyncio.QueueFull:
            self.stats["dropped"] += 1

    async def _send_forever(self) -> None:
        assert self._redis is not None
        while True:
            channel, envelope = await self._pending.get()
            try:
                await self._redis.publish(channel, envelope)
                self.stats["published"] += 1
            except (OSError, aioredis.RedisError) as exc:
                self.stats["dropped"] += 1
                log.warning("backplane: publish to %s failed: %s", self.url, exc)

    # -- incoming ------------------------------------------------------------------

    async def _receive_forever(self) -> None:
        assert self._redis is not None
        delay = 0.1
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.psubscribe(self.prefix + "*")
                self.connected.set()
                delay = 0.1
                async for item in pubsub.listen():
                    if item["type"] == "pmessage":
                        self._receive(item["channel"], item["data"])
            except (OSError, aioredis.RedisError) as exc:
                self.connected.clear()
                self.stats["reconnects"] += 1
                log.warning("backplane: lost %s (%s); retrying in %.1f s", self.url, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                await pubsub.aclose()

    def _receive(self, channel: bytes, envelope: bytes) -> None:
        """One publication from Redis; a malformed one is counted and logged, never fatal."""
        try:
            room, message = self._open_envelope(channel, envelope)
        except ValueError as exc:
            self.stats["malformed"] += 1
            self._throttle.log(logging.WARNING, "malformed", "backplane: dropped a malformed publication on %r: %s",
                               channel[:100], exc)
            return
        if room is None:
            return  # our own publication: already delivered locally
        self.stats["received"] += 1
        try:
            self.hub.deliver_remote(room, message)
        except Exception:  # a bug in delivery must not end cross-node delivery for everyone
            log.exception("backplane: delivering a publication on %r failed", room)

    def _open_envelope(self, channel: bytes, envelope: bytes) -> tuple[str | None, str | bytes]:
        """(room, message) of an envelope ``<node id> <t|b><payload>``; room None for our own."""
        if not isinstance(envelope, bytes) or not isinstance(channel, bytes):
            raise ValueError("not a bytes message")
        node, sep, rest = envelope.partition(b" ")
        if not sep or rest[:1] not in (TEXT, BINARY):
            raise ValueError("no '<node> <t|b>' header")
        if node == self.node_id:
            return None, b""
        name = channel.decode("utf-8")  # UnicodeDecodeError is a ValueError
        if not name.startswith(self.prefix):
            raise ValueError("channel outside our prefix")
        payload = rest[1:]
        return name[len(self.prefix):], payload.decode("utf-8") if rest[:1] == TEXT else payload
