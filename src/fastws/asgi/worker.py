"""A gunicorn worker: uvicorn with fastws's WebSocket protocol.

    gunicorn main:app -k fastws.asgi.worker.UvicornWorker -w 4

Needs gunicorn and the ``uvicorn-worker`` package (or uvicorn's older, deprecated ``uvicorn.workers``).
"""

from __future__ import annotations

from typing import Any

try:
    from uvicorn_worker import UvicornWorker as _Base
except ImportError:  # pragma: no cover - only uvicorn's own (deprecated) module is there
    from uvicorn.workers import UvicornWorker as _Base

__all__ = ["UvicornWorker"]


class UvicornWorker(_Base):  # type: ignore[misc,valid-type]
    CONFIG_KWARGS: dict[str, Any] = {**_Base.CONFIG_KWARGS, "ws": "fastws.asgi:FastWSProtocol"}
