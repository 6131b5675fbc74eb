"""Rooms and frame-once broadcast for ASGI applications: the ``fastws.hub`` scope extension.

Every WebSocket that fastws's uvicorn protocol accepts joins the process's
:class:`fastws.hub.Hub` (one per process, made on first use), and its scope
carries ``scope["extensions"]["fastws.hub"]``: a :class:`Rooms` handle bound
to that connection.  From FastAPI or Starlette::

    from fastws.asgi import rooms

    @app.websocket("/chat/{room}")
    async def chat(websocket: WebSocket, room: str):
        await websocket.accept()
        hub = rooms(websocket)
        hub.join(room)
        async for text in websocket.iter_text():
            hub.publish(room, text)        # framed once for every member, on every node

With a Redis backplane, publications reach the members on every worker and
node: set ``FASTWS_REDIS_URL`` (e.g. ``redis://127.0.0.1:6379/0``; started
with the process's first WebSocket), or call ``await start_backplane(url)``
from the application's lifespan (started before the first connection, and
waited for until subscribed).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

from fastws.hub import Hub

if TYPE_CHECKING:
    from fastws.backplane.redis import RedisBackplane

__all__ = ["EXTENSION", "Rooms", "rooms", "hub", "start_backplane", "stop_backplane", "REDIS_URL_ENV"]

log = logging.getLogger("fastws.asgi")

EXTENSION = "fastws.hub"  # the scope["extensions"] key
REDIS_URL_ENV = "FASTWS_REDIS_URL"
REDIS_PREFIX_ENV = "FASTWS_REDIS_PREFIX"  # channel prefix (default "fastws:")

_hub: Hub | None = None
_backplane: RedisBackplane | None = None
_env_checked = False  # FASTWS_REDIS_URL looked at (once, with the first connection)


def hub() -> Hub:
    """The process's hub (made on first use): publish or broadcast from anywhere, e.g. an HTTP route."""
    global _hub
    if _hub is None:
        _hub = Hub()
    return _hub


def hub_for_connections() -> Hub:
    """The hub a newly accepted connection joins (called by fastws.asgi.FastWSProtocol)."""
    return _hub if _hub is not None else hub()


async def start_backplane(url: str | None = None, *, prefix: str | None = None,
                          timeout: float | None = 10.0) -> RedisBackplane | None:
    """Attach a Redis backplane to the process's hub and start it; wait until it is subscribed
    (at most ``timeout`` seconds; None: do not wait).  ``url`` defaults to $FASTWS_REDIS_URL;
    with neither, nothing is started (None).  Calling it again returns the running backplane.
    Call it from the application's lifespan startup, in every worker.
    """
    global _backplane, _env_checked
    _env_checked = True
    if _backplane is None:
        url = url or os.environ.get(REDIS_URL_ENV)
        if not url:
            return None
        from fastws.backplane.redis import RedisBackplane

        backplane = RedisBackplane(hub(), url, prefix=prefix or os.environ.get(REDIS_PREFIX_ENV, "fastws:"))
        await backplane.start()  # no publication may be queued before this: its node id is set here
        _backplane = backplane
        log.info("fastws hub: Redis backplane %s (node %s)", url, backplane.node_id)
    if timeout is not None:
        try:
            await asyncio.wait_for(_backplane.connected.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("fastws hub: Redis at %s not reachable within %g s; retrying in the background",
                        _backplane.url, timeout)
    return _backplane


async def backplane_started() -> None:
    """With the first accepted connection: start the backplane $FASTWS_REDIS_URL names, if any
    (without waiting for Redis: the handshake is not delayed, publications queue meanwhile)."""
    if not _env_checked:
        try:
            await start_backplane(timeout=None)
        except Exception:  # e.g. redis not installed: serve on, without the other nodes
            log.exception("fastws hub: cannot start the backplane $%s names", REDIS_URL_ENV)


async def stop_backplane() -> None:
    """Stop the backplane (lifespan shutdown); the hub goes on serving this process."""
    global _backplane
    backplane, _backplane = _backplane, None
    if backplane is not None:
        await backplane.close()
        backplane.hub.backplane = None


class Rooms:
    """The ``fastws.hub`` extension of one connection: its rooms, its user, publishing.

    Every publication is framed once and written to each member (compressed
    once per set of compression settings); with a backplane it also reaches
    the members on the other workers and nodes.  The counts returned are of
    local deliveries.  Join, publish and the rest work from ``accept`` on; a
    closed connection is in no room.
    """

    __slots__ = ("_connection",)

    def __init__(self, connection: Any) -> None:
        self._connection = connection  # a hub member: id, user, rooms, closed, deflate, send, send_frame

    @property
    def id(self) -> int:
        """This connection's id in the process's hub."""
        return int(self._connection.id)

    @property
    def user(self) -> Any:
        return self._connection.user

    @property
    def joined(self) -> frozenset[str]:
        """The rooms this connection is in."""
        return frozenset(self._connection.rooms or ())

    def join(self, room: str) -> bool:
        """Join ``room``; False if the connection is not open (not yet accepted, or closed)."""
        return hub().join(self._connection, room)

    def leave(self, room: str) -> None:
        hub().leave(self._connection, room)

    def publish(self, room: str, message: str | bytes, *, exclude_self: bool = False) -> int:
        """Send ``message`` (str: text, bytes: binary) to every member of ``room``."""
        return hub().publish(room, message, exclude=self._connection if exclude_self else None)

    def broadcast(self, message: str | bytes, *, exclude_self: bool = False) -> int:
        """Send ``message`` to every WebSocket connection (of this process and, with a backplane, all)."""
        return hub().broadcast(message, exclude=self._connection if exclude_self else None)

    def set_user(self, user: Any) -> bool:
        """Tag this connection as ``user``'s (a user may have many); False if it is not open."""
        return hub().set_user(self._connection, user)

    def send_to_user(self, user: Any, message: str | bytes) -> int:
        """Send ``message`` to every connection of ``user`` (on every node, given a backplane)."""
        return hub().send_to_user(user, message)

    async def synced(self) -> None:
        """Wait until joins and publications so far have reached the backplane's broker: a member
        who joined on one worker can then be sure to get what another worker publishes next."""
        await hub().synced()

    def members(self, room: str) -> int:
        """How many connections of this process are in ``room``."""
        return len(hub().members(room))


def rooms(websocket: Any) -> Rooms:
    """The ``fastws.hub`` extension of a Starlette/FastAPI ``WebSocket`` (or of an ASGI scope)."""
    scope = websocket if isinstance(websocket, dict) else websocket.scope
    try:
        return scope["extensions"][EXTENSION]  # type: ignore[no-any-return]
    except KeyError:
        raise LookupError("this WebSocket has no fastws.hub extension: run uvicorn with "
                          "--ws fastws.asgi:FastWSProtocol") from None
