"""fastws under uvicorn: the WebSocket protocol class for ``--ws``, and rooms for ASGI apps.

    uvicorn main:app --ws fastws.asgi:FastWSProtocol

runs an unchanged FastAPI or Starlette app with fastws's Cython wire core on
its WebSocket routes.  ``rooms(websocket)`` gives such an app fastws's rooms,
send-to-user and frame-once broadcast (the ``fastws.hub`` scope extension),
across workers and nodes with a Redis backplane.  docs/asgi.md has the rest.
"""

from fastws.asgi.extension import EXTENSION, Rooms, hub, rooms, start_backplane, stop_backplane
from fastws.asgi.protocol import ClientDisconnected, FastWSProtocol

__all__ = [
    "EXTENSION",
    "ClientDisconnected",
    "FastWSProtocol",
    "Rooms",
    "hub",
    "rooms",
    "start_backplane",
    "stop_backplane",
]
