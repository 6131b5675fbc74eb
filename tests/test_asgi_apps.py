"""The ASGI applications the test_asgi* suites serve with a real uvicorn, and the helper that runs it.

No tests here: ``python -m uvicorn test_asgi_apps:fastapi_app --app-dir tests --ws
fastws.asgi:FastWSProtocol`` serves these apps in a subprocess, and the suites
drive them with real clients.  The apps are written as their users write them
(FastAPI routes, a Starlette WebSocketEndpoint, one bare ASGI callable); what
a test must see from the server side (close codes the app received, the
exception a late send raised) is recorded under a key the client picks and
read back over HTTP: ``GET /events/{key}?count=N`` waits until N are there.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.applications import Starlette
from starlette.endpoints import WebSocketEndpoint
from starlette.routing import Route, WebSocketRoute

from fastws.asgi import rooms, start_backplane, stop_backplane

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
PROTOCOL = os.environ.get("FASTWS_TEST_WS", "fastws.asgi:FastWSProtocol")  # another --ws, to compare
MiB = 1024 * 1024

# -- what the apps saw, read back over HTTP -------------------------------------------------------

_events: dict[str, list[Any]] = {}
_arrived: dict[str, asyncio.Event] = {}
_released: dict[str, asyncio.Event] = {}


def record(key: str | None, item: Any) -> None:
    if not key:
        return
    _events.setdefault(key, []).append(item)
    _arrived.setdefault(key, asyncio.Event()).set()


async def wait_events(key: str, count: int, timeout: float = 20.0) -> list[Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(_events.get(key, ())) < count and loop.time() < deadline:
        event = _arrived.setdefault(key, asyncio.Event())
        event.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), deadline - loop.time())
    return _events.get(key, [])


def released(key: str) -> asyncio.Event:
    return _released.setdefault(key, asyncio.Event())


# -- the FastAPI app -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await start_backplane()  # $FASTWS_REDIS_URL, if the test set it (the cluster test); else nothing
    yield
    await stop_backplane()


fastapi_app = FastAPI(lifespan=lifespan)

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>fastws under uvicorn</title></head>
<body><h1>fastws under uvicorn</h1></body></html>"""


@fastapi_app.get("/")
async def page() -> HTMLResponse:
    return HTMLResponse(PAGE)


@fastapi_app.get("/pid")
async def pid() -> dict[str, int]:
    return {"pid": os.getpid()}


@fastapi_app.get("/events/{key}")
async def events(key: str, count: int = 1) -> JSONResponse:
    return JSONResponse(await wait_events(key, count))


@fastapi_app.post("/release/{key}")
async def release(key: str) -> dict[str, bool]:
    released(key).set()
    return {"released": True}


@fastapi_app.websocket("/echo")
async def echo(websocket: WebSocket, id: str | None = None) -> None:
    """Every message back as it came (text as text, bytes as bytes); the disconnect is recorded."""
    await websocket.accept()
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            record(id, {"code": message["code"], "reason": message.get("reason", "")})
            return
        if message.get("text") is not None:
            await websocket.send_text(message["text"])
        else:
            await websocket.send_bytes(message["bytes"])


@fastapi_app.websocket("/subprotocol")
async def subprotocol(websocket: WebSocket, force: str | None = None) -> None:
    offered = websocket.scope["subprotocols"]
    chosen = force or next((p for p in ("chat.v2", "chat.v1") if p in offered), None)
    await websocket.accept(subprotocol=chosen)
    await websocket.send_json({"offered": offered, "chosen": chosen})
    await websocket.receive()


@fastapi_app.websocket("/scope")
async def scope(websocket: WebSocket) -> None:
    """Accepts with extra headers, then sends what the scope held."""
    await websocket.accept(headers=[(b"x-fastws", b"yes"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")])
    s = websocket.scope
    await websocket.send_json({
        "type": s["type"], "spec_version": s["asgi"]["spec_version"], "http_version": s["http_version"],
        "scheme": s["scheme"], "path": s["path"], "raw_path": s["raw_path"].decode("latin-1"),
        "query_string": s["query_string"].decode("latin-1"), "root_path": s["root_path"],
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in s["headers"]],
        "client": list(s["client"]), "server": list(s["server"]), "extensions": sorted(s["extensions"]),
        "subprotocols": s["subprotocols"],
    })
    await websocket.receive()


@fastapi_app.websocket("/deny")
async def deny(websocket: WebSocket) -> None:
    await websocket.send_denial_response(
        PlainTextResponse("go away", status_code=401, headers={"x-reason": "token expired"}))


@fastapi_app.websocket("/forbid")
async def forbid(websocket: WebSocket) -> None:
    await websocket.close()  # before accept: HTTP 403


@fastapi_app.websocket("/wait-before-accept")
async def wait_before_accept(websocket: WebSocket, id: str) -> None:
    record(id, "waiting")
    await released(id).wait()
    await websocket.accept()


@fastapi_app.websocket("/error-before-accept")
async def error_before_accept(websocket: WebSocket) -> None:
    raise RuntimeError("the app fails before accepting")


@fastapi_app.websocket("/error-after-accept")
async def error_after_accept(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.receive_text()
    raise RuntimeError("the app fails while connected")


@fastapi_app.websocket("/return")
async def returns(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("bye")
    # returning without closing: the server closes with 1000


@fastapi_app.websocket("/close")
async def close(websocket: WebSocket) -> None:
    """The first message says how to close: "<code> <reason>"."""
    await websocket.accept()
    code, _, reason = (await websocket.receive_text()).partition(" ")
    await websocket.close(int(code), reason)


@fastapi_app.websocket("/slow-app")
async def slow_app(websocket: WebSocket, id: str) -> None:
    """Reads nothing until POST /release/{id}; then counts the bytes of every message up to "end"."""
    await websocket.accept()
    await released(id).wait()
    total = count = 0
    while (message := await websocket.receive())["type"] == "websocket.receive":
        if message.get("text") == "end":
            break
        total += len(message["bytes"])
        count += 1
    await websocket.send_json({"messages": count, "bytes": total})
    await websocket.receive()


@fastapi_app.websocket("/flood")
async def flood(websocket: WebSocket, id: str, size: int = MiB) -> None:
    """Sends ``size``-byte messages until a send waits for more than a second (the client reads
    nothing): records how many went before; then finishes that send, and says "done"."""
    await websocket.accept()
    payload = bytes(size)
    sent = 0
    while True:
        pending = asyncio.ensure_future(websocket.send_bytes(payload))
        done, _ = await asyncio.wait({pending}, timeout=1.0)
        if not done:
            record(id, {"sent_before_block": sent})
            await pending
            sent += 1
            break
        pending.result()
        sent += 1
    await websocket.send_text(f"done {sent}")
    await websocket.receive()


@fastapi_app.websocket("/rooms")
async def rooms_commands(websocket: WebSocket) -> None:
    """The fastws.hub extension driven by JSON commands: {"op": "join", "room": "r"} -> {"ok": result}."""
    await websocket.accept()
    hub = rooms(websocket)
    ops = {
        "join": lambda c: hub.join(c["room"]),
        "leave": lambda c: hub.leave(c["room"]),
        "publish": lambda c: hub.publish(c["room"], c["message"], exclude_self=c.get("exclude_self", False)),
        "publish_bytes": lambda c: hub.publish(c["room"], c["message"].encode()),
        "broadcast": lambda c: hub.broadcast(c["message"], exclude_self=c.get("exclude_self", False)),
        "set_user": lambda c: hub.set_user(c["user"]),
        "send_to_user": lambda c: hub.send_to_user(c["user"], c["message"]),
        "members": lambda c: hub.members(c["room"]),
        "whoami": lambda c: {"pid": os.getpid(), "id": hub.id, "user": hub.user, "rooms": sorted(hub.joined)},
        "synced": lambda c: hub.synced(),
    }
    try:
        async for text in websocket.iter_text():
            command = json.loads(text)
            result = ops[command["op"]](command)
            if inspect.isawaitable(result):
                result = await result
            await websocket.send_json({"ok": result})
    except WebSocketDisconnect:
        pass


async def raw_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A bare ASGI app: after the client's close, a send must raise an OSError subclass."""
    key = scope["query_string"].decode().partition("id=")[2] or None
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    while (message := await receive())["type"] != "websocket.disconnect":
        await send({"type": "websocket.send", "text": message.get("text") or "?"})
    try:
        await send({"type": "websocket.send", "text": "too late"})
    except Exception as exc:
        record(key, {"exception": type(exc).__name__, "oserror": isinstance(exc, OSError)})
    else:
        record(key, {"exception": None, "oserror": False})
    again = await receive()  # still the disconnect
    await send({"type": "websocket.close"})  # closing again changes nothing, raises nothing
    record(key, {"again": again["type"]})


fastapi_app.mount("/raw", raw_app)


# -- the Starlette app: a WebSocketEndpoint --------------------------------------------------------------


class Echo(WebSocketEndpoint):
    encoding = None  # text stays text, bytes stay bytes

    async def on_receive(self, websocket: Any, data: Any) -> None:
        if isinstance(data, str):
            await websocket.send_text(data)
        else:
            await websocket.send_bytes(data)

    async def on_disconnect(self, websocket: Any, close_code: int) -> None:
        record(websocket.query_params.get("id"), {"code": close_code})


class JsonEcho(WebSocketEndpoint):
    encoding = "json"

    async def on_receive(self, websocket: Any, data: Any) -> None:
        await websocket.send_json({"echo": data})


async def starlette_events(request: Any) -> JSONResponse:
    key = request.path_params["key"]
    return JSONResponse(await wait_events(key, int(request.query_params.get("count", "1"))))


starlette_app = Starlette(routes=[
    WebSocketRoute("/echo", Echo),
    WebSocketRoute("/json", JsonEcho),
    Route("/events/{key}", starlette_events),
])


# -- running uvicorn (and gunicorn) in a subprocess ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A uvicorn (or gunicorn) command in its own process group; its output is collected by a thread,
    which also tells when the server is ready (listening, every worker past its lifespan startup)."""

    def __init__(self, command: list[str], port: int, *, workers: int = 1, env: dict[str, str] | None = None
                 ) -> None:
        self.port = port
        self.workers = workers
        self.command = command
        environ = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), str(TESTS),
                                                                               os.environ.get("PYTHONPATH")])))
        environ.update(env or {})
        self.proc = subprocess.Popen(command, cwd=TESTS, env=environ, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[str] = []
        self._started = 0
        self._listening = False
        self._ready = threading.Event()
        self._ended = threading.Event()
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            # ready: listening (uvicorn: "Uvicorn running on", gunicorn: "Listening at"), and every
            # worker through its lifespan startup (a worker starts serving right after it)
            if "Application startup complete" in line:
                self._started += 1
            if "running on" in line or "Listening at" in line:
                self._listening = True
            if self._listening and self._started >= self.workers:
                self._ready.set()
        self._ended.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 60.0) -> ServerProcess:
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            self.kill()
            raise RuntimeError(f"{self.command[:4]} did not start:\n" + self.output())
        return self

    def output(self) -> str:
        return "\n".join(self.lines[-200:])

    def url(self, path: str = "/", scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        """Signal the process group, wait for it to exit; returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._ended.wait(5)
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def count(self, pattern: str) -> int:
        return sum(1 for line in self.lines if re.search(pattern, line))


def uvicorn(app: str = "test_asgi_apps:fastapi_app", *args: str, ws: str = PROTOCOL, workers: int = 1,
            env: dict[str, str] | None = None) -> ServerProcess:
    """``python -m uvicorn <app> --ws <ws>`` on a free port, started and ready."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", app, "--app-dir", str(TESTS), "--host", "127.0.0.1",
               "--port", str(port), "--ws", ws, "--log-level", "info", "--no-access-log", *args]
    if workers > 1:
        command += ["--workers", str(workers)]
    return ServerProcess(command, port, workers=workers, env=env).wait_ready()
