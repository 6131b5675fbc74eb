"""Shared fixtures: a real fastws server on a loopback port, on uvloop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

try:
    import uvloop
except ImportError:  # Windows: no uvloop; the wheel tests still run on asyncio's loop
    uvloop = None

from fastws import App, Config, Server

# Suites that also run on the plain asyncio loop (cheap enough to run twice).
BOTH_LOOPS = {"test_smoke_server", "test_conformance", "test_interop"}


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Every async test runs on uvloop (the production loop); some on asyncio's loop too."""
    factories: dict[str, Any] = {"uvloop": uvloop.new_event_loop} if uvloop else {}
    module = getattr(item, "module", None)
    if not factories or (module is not None and module.__name__.rpartition(".")[2] in BOTH_LOOPS):
        factories["asyncio"] = asyncio.new_event_loop
    return factories


StartServer = Callable[..., Awaitable[tuple[Server, int]]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """``server, port = await start_server(app, **config)``: serve on 127.0.0.1, shut down after the test."""
    servers: list[Server] = []

    async def start(app: App, **config: Any) -> tuple[Server, int]:
        server = Server(app, Config(**config))
        (host, port), *_ = await server.listen("127.0.0.1", 0)
        servers.append(server)
        return server, port

    yield start
    for server in servers:
        await server.shutdown(timeout=1.0)


@pytest.fixture
def demo_app() -> App:
    from fastws.demo import create_app

    return create_app()
