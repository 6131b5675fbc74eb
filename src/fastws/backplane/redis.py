"""Redis backplane: hub publications reach the sessions of every node (and every worker).

Redis knows which nodes have members where, so that a publication travels only
to nodes that have someone to deliver it to, and never back to its sender:

* each node has its own channel, ``<prefix>node:<id>``, and is listed in the
  set ``<prefix>nodes`` while it runs (with a liveness key it refreshes);
* a node with members in room R is in the set ``<prefix>room:R``; with
  sessions of user U, in ``<prefix>user:U``; changes are announced on
  ``<prefix>membership`` so that every node keeps its view of the sets current;
* ``publish(R, m)`` sends ``m`` to the channels of the *other* nodes in R's set
  (``broadcast``: every other node; ``send_to_user``: the user's nodes), and the
  sends of one loop turn go to Redis in one pipeline, not one round trip each.

A node that loses Redis keeps serving its local sessions and reconnects with
backoff; then it registers its rooms and users again (Redis may have restarted
empty) and forgets what it knew of the others.  Publications made while Redis
is unreachable are dropped and counted: pub/sub has no memory.  A node that
dies without saying so is dropped from everyone's view once its liveness key
expires (at most ``LIVENESS`` seconds).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
import uuid
from typing import TYPE_CHECKING, Any

try:
    import redis.asyncio as aioredis
except ImportError as exc:  # pragma: no cover - the [redis] extra is missing
    raise ImportError("the Redis backplane needs the redis package: pip install 'fastws[redis]'") from exc

from fastws.logs import Throttle
from fastws.metrics import BACKPLANE_LAG_BUCKETS, Histogram

if TYPE_CHECKING:
    from fastws.hub import Hub

log = logging.getLogger("fastws.backplane")

TEXT, BINARY = b"t", b"b"
ROOM, USER, ALL = b"r", b"u", b"a"  # what a publication is addressed to
MAX_PENDING = 10_000  # publications queued for Redis before new ones are dropped
MAX_BATCH = 1000  # sends per pipeline
LIVENESS = 15.0  # seconds a node stays listed without refreshing its liveness key


_STAMP = struct.Struct(">dH")  # when it was published (time.time()), the name's length


def envelope(kind: bytes, name: str, message: str | bytes, published: float | None = None) -> bytes:
    """What goes over a node channel: kind, the publication's wall-clock time, the name's length
    and the name, then t|b and the payload."""
    raw = name.encode()
    stamp = _STAMP.pack(time.time() if published is None else published, len(raw))
    if isinstance(message, str):
        return b"".join((kind, stamp, raw, TEXT, message.encode()))
    return b"".join((kind, stamp, raw, BINARY, message))


def open_envelope(data: bytes) -> tuple[bytes, float, str, str | bytes]:
    """(kind, published, name, message) of an envelope; ValueError if it is not one."""
    if not isinstance(data, bytes) or len(data) < 1 + _STAMP.size + 1 or data[:1] not in (ROOM, USER, ALL):
        raise ValueError("not a fastws envelope")
    published, size = _STAMP.unpack_from(data, 1)
    start = 1 + _STAMP.size
    name = data[start:start + size].decode("utf-8")  # UnicodeDecodeError is a ValueError
    kind_of_payload, payload = data[start + size:start + size + 1], data[start + size + 1:]
    if kind_of_payload == TEXT:
        return data[:1], published, name, payload.decode("utf-8")
    if kind_of_payload == BINARY:
        return data[:1], published, name, payload
    raise ValueError("no payload type")


class RedisBackplane:
    """Attach with ``RedisBackplane(app.hub, "redis://host:6379/0")``; the server starts and stops it."""

    def __init__(self, hub: Hub, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "fastws:") -> None:
        self.hub = hub
        self.url = url
        self.prefix = prefix
        self.node_id = ""  # set in start(): workers forked from one master must differ
        self.stats = {"published": 0, "sends": 0, "received": 0, "dropped": 0, "reconnects": 0, "malformed": 0,
                      "pipelines": 0}
        self.lag_ms = 0.0  # how long the last batch waited in the queue before Redis took it
        self.receive_lag = Histogram(BACKPLANE_LAG_BUCKETS)  # publication on another node -> here
        self._pending: asyncio.Queue[tuple[str, Any, Any, Any, float]] = asyncio.Queue(MAX_PENDING)
        self._tasks: list[asyncio.Task[None]] = []
        self._redis: aioredis.Redis | None = None
        self._nodes: set[str] = set()  # the other live nodes
        self._where: dict[tuple[bytes, str], set[str]] = {}  # (kind, name) -> other nodes with members
        # membership events that arrive while the set they change is being read: applied after the read
        self._fetching: dict[tuple[bytes, str], list[tuple[str, str]]] = {}
        self._throttle = Throttle(log)
        self.connected = asyncio.Event()
        hub.backplane = self

    # -- life --------------------------------------------------------------------------

    async def start(self) -> None:
        self.node_id = f"{uuid.uuid4().hex[:12]}-{os.getpid()}"
        self._redis = aioredis.Redis.from_url(self.url)
        self._tasks = [asyncio.ensure_future(self._receive_forever()), asyncio.ensure_future(self._send_forever()),
                       asyncio.ensure_future(self._stay_alive())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._redis is not None:
            try:  # say goodbye, so the others stop sending here at once
                await asyncio.wait_for(self._unregister(), 1.0)
            except (OSError, aioredis.RedisError, asyncio.TimeoutError):
                pass
            await self._redis.aclose()

    # -- what the hub tells us -------------------------------------------------------------

    def publish(self, room: str, message: str | bytes) -> None:
        self._queue("send", ROOM, room, message)

    def broadcast(self, message: str | bytes) -> None:
        self._queue("send", ALL, "", message)

    def send_to_user(self, user: str, message: str | bytes) -> None:
        self._queue("send", USER, user, message)

    def local_room(self, room: str, present: bool) -> None:
        self._queue("member", ROOM, room, present)

    def local_user(self, user: str, present: bool) -> None:
        self._queue("member", USER, user, present)

    async def synced(self) -> None:
        """Wait until everything queued so far (memberships, publications) has been handed to Redis.

        A join is registered asynchronously: a publication from another node a moment later may
        not see it yet (pub/sub has the same race with SUBSCRIBE).  Await this after joining when
        that moment matters."""
        if not self.connected.is_set():
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            self._pending.put_nowait(("sync", None, None, done, time.monotonic()))
        except asyncio.QueueFull:
            return
        await done

    def _queue(self, what: str, kind: Any, name: Any, arg: Any) -> None:
        """Never blocks the event loop on Redis: the sender task takes it from here."""
        if what == "send" and not self.connected.is_set():
            self.stats["dropped"] += 1  # Redis is away: pub/sub has no memory, and neither do we
            return
        try:
            self._pending.put_nowait((what, kind, name, arg, time.monotonic()))
        except asyncio.QueueFull:
            self.stats["dropped"] += 1

    # -- outgoing ------------------------------------------------------------------------

    def _key(self, kind: bytes, name: str) -> str:
        return f"{self.prefix}{'room' if kind == ROOM else 'user'}:{name}"

    def _channel(self, node: str) -> str:
        return f"{self.prefix}node:{node}"

    async def _send_forever(self) -> None:
        while True:
            first = await self._pending.get()
            batch = [first]
            while len(batch) < MAX_BATCH and not self._pending.empty():
                batch.append(self._pending.get_nowait())
            try:
                if not self.connected.is_set():  # what we have is registered again on reconnect; sends go
                    self.stats["dropped"] += sum(1 for item in batch if item[0] == "send")
                    continue
                try:
                    await self._send_batch(batch)
                except (OSError, aioredis.RedisError) as exc:
                    self.stats["dropped"] += sum(1 for item in batch if item[0] == "send")
                    self._throttle.log(logging.WARNING, "publish", "backplane: sending to %s failed: %s",
                                       self.url, exc)
            finally:
                for what, _, _, arg, _ in batch:
                    if what == "sync" and not arg.done():
                        arg.set_result(None)

    async def _send_batch(self, batch: list[Any]) -> None:
        assert self._redis is not None
        # where unknown rooms/users have members: one pipeline of SMEMBERS first
        batch = [item for item in batch if item[0] != "sync"]
        unknown = list({(kind, name) for what, kind, name, _, _ in batch
                        if what == "send" and kind != ALL and (kind, name) not in self._where})
        if unknown:
            for key in unknown:
                self._fetching[key] = []
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for kind, name in unknown:
                        pipe.smembers(self._key(kind, name))
                    found = await pipe.execute()
                for key, nodes in zip(unknown, found, strict=True):
                    where = self._where[key] = {n.decode() for n in nodes} - {self.node_id}
                    for sign, node in self._fetching[key]:  # changes the read may not have seen yet
                        if sign == "+":
                            where.add(node)
                        else:
                            where.discard(node)
            finally:
                for key in unknown:
                    self._fetching.pop(key, None)
        if not batch:
            return
        self.lag_ms = (time.monotonic() - batch[0][4]) * 1000
        async with self._redis.pipeline(transaction=False) as pipe:
            sends = 0
            wall_minus_monotonic = time.time() - time.monotonic()
            for what, kind, name, arg, queued in batch:
                if what == "member":
                    key = self._key(kind, name)
                    if arg:
                        pipe.sadd(key, self.node_id)
                    else:
                        pipe.srem(key, self.node_id)
                    pipe.publish(f"{self.prefix}membership",
                                 f"{'+' if arg else '-'} {kind.decode()} {self.node_id} {name}")
                    continue
                self.stats["published"] += 1
                targets = self._nodes if kind == ALL else self._where[(kind, name)] & self._nodes
                if targets:
                    data = envelope(kind, name, arg, queued + wall_minus_monotonic)
                    for node in targets:
                        pipe.publish(self._channel(node), data)
                        sends += 1
            if len(pipe):
                await pipe.execute()
                self.stats["pipelines"] += 1
                self.stats["sends"] += sends

    async def _register(self) -> None:
        """(Re)join: list this node and everything it has members in; forget what we knew."""
        assert self._redis is not None
        self._where.clear()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.sadd(f"{self.prefix}nodes", self.node_id)
            pipe.set(f"{self.prefix}alive:{self.node_id}", b"1", ex=int(LIVENESS))
            for room in self.hub.local_rooms():
                pipe.sadd(self._key(ROOM, room), self.node_id)
            for user in self.hub.local_users():
                pipe.sadd(self._key(USER, user), self.node_id)
            pipe.publish(f"{self.prefix}membership", f"* n {self.node_id} ")
            pipe.smembers(f"{self.prefix}nodes")
            results = await pipe.execute()
        self._nodes = {n.decode() for n in results[-1]} - {self.node_id}

    async def _unregister(self) -> None:
        assert self._redis is not None
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.srem(f"{self.prefix}nodes", self.node_id)
            pipe.delete(f"{self.prefix}alive:{self.node_id}")
            for room in self.hub.local_rooms():
                pipe.srem(self._key(ROOM, room), self.node_id)
            for user in self.hub.local_users():
                pipe.srem(self._key(USER, user), self.node_id)
            pipe.publish(f"{self.prefix}membership", f"x n {self.node_id} ")
            await pipe.execute()

    async def _stay_alive(self) -> None:
        """Refresh our liveness key; drop nodes whose key has expired (they died without a word)."""
        while True:
            await asyncio.sleep(LIVENESS / 3)
            if not self.connected.is_set() or self._redis is None:
                continue
            try:
                await self._redis.set(f"{self.prefix}alive:{self.node_id}", b"1", ex=int(LIVENESS))
                nodes = [n.decode() for n in await self._redis.smembers(f"{self.prefix}nodes")]
                others = [n for n in nodes if n != self.node_id]
                alive = await self._redis.mget([f"{self.prefix}alive:{n}" for n in others]) if others else []
                dead = [n for n, flag in zip(others, alive, strict=True) if flag is None]
                if dead:
                    await self._redis.srem(f"{self.prefix}nodes", *dead)
                    log.warning("backplane: dropped %d nodes that stopped answering", len(dead))
                self._nodes = set(others) - set(dead)
            except (OSError, aioredis.RedisError) as exc:
                self._throttle.log(logging.WARNING, "alive", "backplane: liveness refresh failed: %s", exc)

    # -- incoming ------------------------------------------------------------------------

    async def _receive_forever(self) -> None:
        assert self._redis is not None
        delay = 0.1
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._channel(self.node_id), f"{self.prefix}membership")
                await self._register()
                self.connected.set()
                delay = 0.1
                async for item in pubsub.listen():
                    if item["type"] == "message":
                        self._receive(item["channel"], item["data"])
            except (OSError, aioredis.RedisError) as exc:
                self.connected.clear()
                self.stats["reconnects"] += 1
                self._throttle.log(logging.WARNING, "lost", "backplane: lost %s (%s); retrying in %.1f s",
                                   self.url, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                await pubsub.aclose()

    def _receive(self, channel: bytes, data: bytes) -> None:
        """One message from Redis; a malformed one is counted and logged, never fatal."""
        try:
            if channel == f"{self.prefix}membership".encode():
                self._membership(data.decode("utf-8"))
                return
            kind, published, name, message = open_envelope(data)
        except (ValueError, AttributeError) as exc:
            self.stats["malformed"] += 1
            self._throttle.log(logging.WARNING, "malformed", "backplane: dropped a malformed message on %r: %s",
                               channel[:100], exc)
            return
        self.stats["received"] += 1
        self.receive_lag.observe(max(0.0, time.time() - published))
        try:
            if kind == ROOM:
                self.hub.deliver_room(name, message)
            elif kind == USER:
                self.hub.deliver_user(name, message)
            else:
                self.hub.deliver_all(message)
        except Exception:  # a bug in delivery must not end cross-node delivery for everyone
            log.exception("backplane: delivering a message for %r failed", name)

    def _membership(self, event: str) -> None:
        """"+ r NODE ROOM" / "- u NODE USER" / "* n NODE" (joined) / "x n NODE" (left)."""
        sign, kind, node, name = event.split(" ", 3)
        if node == self.node_id:
            return
        if kind == "n":
            if sign == "*":
                self._nodes.add(node)
                self._where.clear()  # it registered what it has: look again when needed
            else:
                self._nodes.discard(node)
                for nodes in self._where.values():
                    nodes.discard(node)
            return
        if kind not in ("r", "u") or sign not in "+-":
            raise ValueError(f"unknown membership event {event[:60]!r}")
        key = (kind.encode(), name)
        pending = self._fetching.get(key)
        if pending is not None:
            pending.append((sign, node))
        nodes = self._where.get(key)
        if nodes is not None:  # only what we send to is kept current
            if sign == "+":
                nodes.add(node)
            else:
                nodes.discard(node)
