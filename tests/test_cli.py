"""`python -m fastws serve` as a real process: startup, /healthz, SIGTERM drain, workers, bad input."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from fastws.app import Config

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="signals and fork: POSIX only")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A `python -m fastws ...` child with its output in a file."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.log_path = cwd / f"fastws-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen([sys.executable, "-m", "fastws", *args], cwd=cwd, env=env,
                                      stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)  # its own process group: master + workers
        self.pid = self.popen.pid

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait(self, timeout: float) -> int | None:
        """The exit code, or None if still running after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.popen.poll()

    def stop(self) -> None:
        """Kill whatever is left of this test's process group (a master and its workers)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()
        self._log.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    procs: list[Proc] = []

    def start(*args: str) -> Proc:
        proc = Proc(list(args), tmp_path)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def healthz(port: int) -> dict[str, Any]:
    status, body = await http_get(port, "/healthz")
    assert status == 200, body
    return json.loads(body)


async def wait_ready(proc: Proc, port: int, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await healthz(port)
        except OSError:
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"fastws serve did not come up (exit {proc.popen.poll()}):\n{proc.output}")
            await asyncio.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


async def assert_going_away(clients: list[Any]) -> None:
    for ws in clients:
        await asyncio.wait_for(ws.wait_closed(), 10)
        assert ws.close_code == 1001, (ws.close_code, ws.close_reason)


async def test_serve_demo_then_sigterm(spawn) -> None:
    port = free_port()
    proc = spawn("serve", "--port", str(port))
    health = await wait_ready(proc, port)
    assert health["status"] == "ok"
    assert health["pid"] == proc.pid
    status, page = await http_get(port, "/")
    assert status == 200 and b"fastws demo" in page

    echo = await websockets.connect(f"ws://127.0.0.1:{port}/echo")
    await echo.send("ping?")
    assert await asyncio.wait_for(echo.recv(), 5) == "ping?"
    chat = await websockets.connect(f"ws://127.0.0.1:{port}/chat")
    assert (await asyncio.wait_for(chat.recv(), 5)).endswith("joined")
    assert (await healthz(port))["connections"] == 2

    started = time.monotonic()
    proc.popen.send_signal(signal.SIGTERM)
    await assert_going_away([echo, chat])
    code = await proc.wait(10)
    elapsed = time.monotonic() - started
    assert code == 0, proc.output
    assert elapsed < 5, f"shutdown took {elapsed:.1f} s"
    assert "Traceback" not in proc.output, proc.output
    with pytest.raises(OSError):
        await http_get(port, "/healthz")


async def test_sigterm_with_a_handler_coroutine_session_is_prompt(spawn) -> None:
    port = free_port()
    proc = spawn("serve", "--port", str(port))
    await wait_ready(proc, port)
    push = await websockets.connect(f"ws://127.0.0.1:{port}/push")  # the demo's /push is `async def push(ws)`
    await asyncio.wait_for(push.recv(), 5)
    started = time.monotonic()
    proc.popen.send_signal(signal.SIGTERM)
    await assert_going_away([push])
    assert await proc.wait(5) == 0, f"still running {time.monotonic() - started:.1f} s after SIGTERM"


async def test_sigint_also_stops_gracefully(spawn) -> None:
    port = free_port()
    proc = spawn("serve", "--port", str(port))
    await wait_ready(proc, port)
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/echo")
    proc.popen.send_signal(signal.SIGINT)
    await assert_going_away([ws])
    assert await proc.wait(10) == 0, proc.output


async def test_two_workers_share_the_port(spawn) -> None:
    port = free_port()
    proc = spawn("serve", "--port", str(port), "--workers", "2")
    await wait_ready(proc, port)
    pids: set[int] = set()
    for _ in range(200):  # SO_REUSEPORT spreads connections by hash of the source port
        pids.add((await healthz(port))["pid"])
        if len(pids) == 2:
            break
    assert len(pids) == 2, f"only saw pids {pids} in 200 connections"
    assert proc.pid not in pids
    for pid in pids:
        assert parent_pid(pid) == proc.pid

    clients = [await websockets.connect(f"ws://127.0.0.1:{port}/echo") for _ in range(6)]
    for i, ws in enumerate(clients):
        await ws.send(f"hello {i}")
        assert await asyncio.wait_for(ws.recv(), 5) == f"hello {i}"

    started = time.monotonic()
    proc.popen.send_signal(signal.SIGTERM)
    await assert_going_away(clients)
    assert await proc.wait(10) == 0, proc.output
    assert time.monotonic() - started < 5
    for pid in pids:
        assert not alive(pid), f"worker {pid} survived its master"
    assert "Traceback" not in proc.output, proc.output


@pytest.mark.parametrize("spec", [
    "no_such_module_for_fastws:app",
    "fastws.demo:no_such_attribute",
    "fastws.demo:create_app",  # a function, not an App
    "not_an_app:app",  # a module in the working directory with app = 42
    ":app",
    ".relative:app",
])
async def test_bad_app_spec_is_one_clear_line(spawn, tmp_path: Path, spec: str) -> None:
    (tmp_path / "not_an_app.py").write_text("app = 42\n")
    proc = spawn("serve", spec, "--port", str(free_port()))
    code = await proc.wait(20)
    output = proc.output.strip()
    assert code not in (0, None), output
    assert "Traceback" not in output, output
    assert len(output.splitlines()) == 1, output
    assert output.startswith("fastws: ") and spec.split(":")[0] in output, output


async def test_compression_level_option(spawn) -> None:
    """--compression-level reaches the server (a compressing client gets its echo back), and a level
    out of range is refused before anything starts."""
    port = free_port()
    proc = spawn("serve", "--port", str(port), "--compression", "--compression-level", "9")
    await wait_ready(proc, port)
    message = '{"type": "quote", "symbol": "NVDA", "bid": 412.17, "ask": 412.19} ' * 20
    async with websockets.connect(f"ws://127.0.0.1:{port}/echo", compression="deflate") as ws:
        assert ws.response.headers["Sec-WebSocket-Extensions"].startswith("permessage-deflate")
        await ws.send(message)
        assert await asyncio.wait_for(ws.recv(), 5) == message
    proc.popen.send_signal(signal.SIGTERM)
    assert await proc.wait(10) == 0, proc.output
    # the start-up log says what compression costs and which zlib does it
    from fastws.deflate import SHARED_ZLIB_VERSION

    assert (f"permessage-deflate without context takeover: one shared stream per process "
            f"(zlib {SHARED_ZLIB_VERSION}, level 9)") in proc.output, proc.output

    bad = spawn("serve", "--port", str(free_port()), "--compression-level", "0")
    code = await bad.wait(20)
    assert code == 2 and "--compression-level" in bad.output and "Traceback" not in bad.output, bad.output


async def test_port_in_use_is_one_clear_line(spawn) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = spawn("serve", "--port", str(port))
        code = await proc.wait(20)
    output = proc.output.strip()
    assert code not in (0, None), output
    assert "Traceback" not in output, output
    assert str(port) in output and len(output.splitlines()) == 1, output


@pytest.mark.parametrize(("args", "says"), [
    (("--port", "99999"), "port must be a number from 0 to 65535, not '99999'"),  # the kernel would take 34463
    (("--port", "-1"), "port must be a number from 0 to 65535, not '-1'"),
    (("--port", "http"), "port must be a number from 0 to 65535, not 'http'"),
    (("--workers", "0"), "at least one worker, not 0"),
])
async def test_a_port_or_worker_count_that_cannot_work_is_refused(spawn, args: tuple[str, ...], says: str) -> None:
    proc = spawn("serve", *args)
    code = await proc.wait(20)
    assert code == 2 and says in proc.output and "Traceback" not in proc.output, proc.output


def test_run_and_listen_refuse_ports_and_worker_counts_that_cannot_work() -> None:
    from fastws import App, run
    from fastws.server import Server, port_number

    with pytest.raises(ValueError, match="workers must be at least 1, not 0"):
        run(App(), port=0, workers=0)
    with pytest.raises(ValueError, match="port must be a number from 0 to 65535, not 70000"):
        run(App(), port=70000)
    assert port_number("8080") == 8080  # an environment variable's string is a port too

    async def listen() -> None:
        server = Server(App(), Config())
        await server.listen("127.0.0.1", 65536)

    with pytest.raises(ValueError, match="port must be a number from 0 to 65535, not 65536"):
        asyncio.run(listen())


async def test_workers_that_cannot_start_make_the_master_fail(spawn) -> None:
    with socket.socket() as busy:  # bound without SO_REUSEPORT: the workers can't share it
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = spawn("serve", "--port", str(port), "--workers", "2")
        code = await proc.wait(4)
    assert code not in (0, None), proc.output[-2000:]


def test_systemd_unit_runs_a_valid_serve_command() -> None:
    """deploy/fastws.service's ExecStart parses with the real CLI and matches deploy/nginx.conf's upstream."""
    import argparse
    import re
    import shlex

    from fastws.cli import add_serve_parser

    root = Path(__file__).resolve().parent.parent
    unit = (root / "deploy" / "fastws.service").read_text()
    exec_start = re.search(r"^ExecStart=(.+)$", unit, re.MULTILINE)
    assert exec_start, "no ExecStart in deploy/fastws.service"
    argv = shlex.split(exec_start.group(1))
    assert argv[0].endswith("/fastws") and argv[1] == "serve", argv
    parser = argparse.ArgumentParser(prog="fastws")
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv[1:])
    assert args.workers > 1
    assert "127.0.0.1" in args.trusted_proxies
    nginx_conf = (root / "deploy" / "nginx.conf").read_text()
    assert re.search(rf"server {re.escape(args.host)}:{args.port};", nginx_conf)
    assert re.search(r"^KillMode=mixed$", unit, re.MULTILINE)  # SIGTERM to the master, which forwards it


# -- the supervisor: races, back-off, escalation ---------------------------------------------------

FAULTY_APP = '''
import os, time
from fastws.demo import create_app

app = create_app()

@app.http("/crash")
def crash(request):
    os._exit(7)  # the worker dies as if it had crashed

@app.http("/hang")
def hang(request):
    time.sleep(60)  # the worker's loop is stuck: it cannot even see SIGTERM
    return "never"
'''


def started_workers(proc: Proc) -> int:
    return proc.output.count(" listening on ")


async def until(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


async def test_sigterm_during_the_restart_back_off_starts_no_new_worker(spawn, tmp_path: Path) -> None:
    (tmp_path / "faulty.py").write_text(FAULTY_APP)
    port = free_port()
    proc = spawn("serve", "faulty:app", "--port", str(port), "--workers", "2", "--log-level", "info")
    await wait_ready(proc, port)
    await until(lambda: started_workers(proc) == 2)
    for crashes in range(1, 4):  # back-off grows with the crashes: 0.2 s, 0.4 s, 0.6 s
        with pytest.raises((OSError, asyncio.IncompleteReadError, IndexError, ValueError)):
            await http_get(port, "/crash")
        await until(lambda n=crashes: proc.output.count("restarting") >= n)
        if crashes < 3:
            await until(lambda n=crashes: started_workers(proc) == 2 + n)  # the restarted worker is up
    # now a restart is scheduled 0.6 s out: stop the master inside that window
    spawned_before = started_workers(proc)
    started = time.monotonic()
    proc.popen.send_signal(signal.SIGTERM)
    assert await proc.wait(10) == 0, proc.output
    assert time.monotonic() - started < 5
    await asyncio.sleep(0.8)  # past the cancelled restart's time
    assert started_workers(proc) == spawned_before, proc.output
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # nothing of the group is left


async def test_a_worker_stuck_in_shutdown_gets_sigkill(spawn, tmp_path: Path) -> None:
    (tmp_path / "faulty.py").write_text(FAULTY_APP)
    port = free_port()
    proc = spawn("serve", "faulty:app", "--port", str(port), "--workers", "2", "--drain-timeout", "1",
                 "--close-timeout", "0.5")
    await wait_ready(proc, port)
    hung = asyncio.ensure_future(http_get(port, "/hang"))  # one of the workers now sleeps for a minute
    await asyncio.sleep(0.3)
    started = time.monotonic()
    proc.popen.send_signal(signal.SIGTERM)
    code = await proc.wait(10)
    elapsed = time.monotonic() - started
    assert code == 1, proc.output  # the master says a worker had to be killed
    assert 1.0 <= elapsed < 5, elapsed  # stop timeout = drain 1 s + close 0.5 s, then SIGKILL
    assert "did not stop within" in proc.output
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)
    hung.cancel()


async def test_signals_right_after_start_are_never_lost(spawn) -> None:
    """SIGTERM at any moment of start-up -- even between a fork and the child's registration -- stops
    the master and every worker."""
    for delay in (0.0, 0.05, 0.15, 0.3):
        proc = spawn("serve", "--port", str(free_port()), "--workers", "3")
        await asyncio.sleep(delay)
        proc.popen.send_signal(signal.SIGTERM)
        assert await proc.wait(10) is not None, f"master still running after SIGTERM at +{delay} s"
        await asyncio.sleep(0.2)
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)


def test_stopping_fits_inside_the_units_timeout_stop_sec() -> None:
    """deploy/fastws.service gives the stop TimeoutStopSec; the master's own escalation (drain + close
    timeouts, then SIGKILL) must end well inside it, or systemd kills everything first."""
    import re
    import shlex

    from fastws.cli import add_serve_parser, make_config

    root = Path(__file__).resolve().parent.parent
    unit = (root / "deploy" / "fastws.service").read_text()
    stop_sec = float(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE).group(1))  # type: ignore[union-attr]
    argv = shlex.split(re.search(r"^ExecStart=(.+)$", unit, re.MULTILINE).group(1))  # type: ignore[union-attr]
    import argparse

    parser = argparse.ArgumentParser(prog="fastws")
    add_serve_parser(parser.add_subparsers(dest="command"))
    config = make_config(parser.parse_args(argv[1:]))
    worst = config.drain_timeout + config.close_timeout + 1.0  # + the SIGKILL and the exit
    assert worst + 3 <= stop_sec, (worst, stop_sec)


KEEP_HEAP_PROBE = """
import ctypes, sys
from fastws.server import keep_heap
libc = ctypes.CDLL(None)
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    assert keep_heap(16 << 20), "mallopt refused"
start = libc.sbrk(0)
blocks = [libc.malloc(2 << 20) for _ in range(3)]
for block in blocks:
    libc.free(block)
print(libc.sbrk(0) - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_server_process_keeps_freed_big_blocks_in_its_heap() -> None:
    """What fastws serve sets up (malloc_trim_threshold, 16 MiB by default): freed blocks of a few
    MiB (big messages) stay in the heap for the next message instead of going back to the kernel,
    which hands out fresh, page-faulting memory every time.  (Measured effect, an `async for`
    handler echoing 1 MiB over one connection: 0.80x -> 0.93x the sync on_message style.)"""
    def heap_kept(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", KEEP_HEAP_PROBE, mode], capture_output=True, text=True,
                             timeout=60, check=True)
        return int(out.stdout)

    assert heap_kept("keep") >= 4 << 20  # 6 MiB served from the heap, and still there after free()
    assert heap_kept("default") < 1 << 20  # glibc's own thresholds: mmapped or trimmed away
    with pytest.raises(ValueError, match="malloc_trim_threshold"):
        Config(malloc_trim_threshold=-1)
