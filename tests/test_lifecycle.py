"""Every way a connection ends, over real sockets: the close frame reaches a client that is still
sending, every path out of OPEN ends TCP within close_timeout, paused sessions read the close
reply, application code never outlives (or leaks) its connection, one bad session cannot stop
keepalive, and memory is bounded per process."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import struct
import sys
import weakref

import pytest
import websockets

from compat import deadline
from fastws import App, ConnectionClosed, Endpoint, Session
from wsraw import OP_CLOSE, OP_PING, OP_TEXT, RawWS, build_frame, close_payload, wait_for, wait_no_connections

pytestmark = pytest.mark.timeout(60)

KiB, MiB = 1024, 1024 * 1024


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live(cls: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, cls))


async def raw_connect(port: int, path: str = "/echo", *, rcvbuf: int | None = None) -> tuple[
        asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw TCP connection that has done the upgrade; ``rcvbuf`` shrinks its receive buffer first
    (a peer that reads slowly fills it fast)."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=16 * MiB)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    return b0 & 0x0F, await reader.readexactly(n)


async def read_until_close(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Skip data frames up to the close frame; (code, reason)."""
    while True:
        opcode, payload = await read_frame(reader)
        if opcode == OP_CLOSE:
            return struct.unpack("!H", payload[:2])[0], payload[2:]


def echo_endpoint(log: list) -> type[Endpoint]:
    class Echo(Endpoint):
        def on_message(self, message: str | bytes) -> None:
            self.session.send(message)

        def on_close(self, code: int, reason: str) -> None:
            log.append((code, reason))

    return Echo


# -- the close frame reaches a peer that is still sending -----------------------------------------


async def test_a_client_still_sending_reads_the_1009_close_frame(start_server) -> None:
    """The server fails the connection (message too big) while the client keeps streaming its 4 MiB
    message without reading: the client must still find the 1009 close frame, every time, and TCP
    must end without a reset."""
    app = App()
    app.route("/echo")(echo_endpoint([]))
    server, port = await start_server(app, max_message_size=64 * KiB, close_timeout=5)
    chunk = os.urandom(64 * KiB)
    for _ in range(10):
        reader, writer = await raw_connect(port)
        size = 4 * MiB
        writer.write(bytes((0x82, 0xFF)) + struct.pack("!Q", size) + b"\x00\x00\x00\x00")
        resets = 0
        for _ in range(size // len(chunk)):  # the whole message, as a browser would send it
            try:
                writer.write(chunk)
                await writer.drain()
            except ConnectionError:
                resets += 1
                break
        code, reason = await read_until_close(reader)
        assert code == 1009 and b"exceeds" in reason, (code, reason)
        assert resets == 0, "the server reset the connection while the client was sending"
        assert await reader.read() == b""  # then the server's FIN (a reset would raise here)
        writer.write(build_frame(OP_CLOSE, close_payload(1009)))
        writer.close()
    await wait_no_connections(server)


async def test_a_peer_that_closes_without_reading_is_dropped_within_close_timeout(start_server) -> None:
    """The peer sends a close frame but never reads what the server sent: the echoed close sits behind
    megabytes of unread data.  TCP must still end within close_timeout."""
    app = App()

    class Big(Endpoint):
        def on_open(self) -> None:
            self.session.send(b"x" * (3 * MiB))  # under max_send_buffer: queued, never read

    app.route("/big")(Big)
    server, port = await start_server(app, close_timeout=0.5)
    reader, writer = await raw_connect(port, "/big", rcvbuf=4096)
    await wait_for(lambda: len(server.hub.sessions) == 1)
    session = next(iter(server.hub.sessions.values()))
    await wait_for(lambda: session.write_buffer_size > 0)  # the kernel buffers are full
    loop = asyncio.get_running_loop()
    started = loop.time()
    writer.write(build_frame(OP_CLOSE, close_payload(1000)))
    await wait_no_connections(server, 3)
    assert loop.time() - started < 2.0
    assert session.closed_by == "remote" and session.close_code == 1000
    writer.close()


async def test_a_zero_window_peer_is_dropped_within_close_timeout_after_the_server_closes(start_server) -> None:
    app = App()

    class Big(Endpoint):
        def on_open(self) -> None:
            self.session.send(b"x" * (3 * MiB))

        def on_message(self, message: str | bytes) -> None:
            self.session.close(1000, "bye")

    app.route("/big")(Big)
    server, port = await start_server(app, close_timeout=0.5)
    reader, writer = await raw_connect(port, "/big", rcvbuf=4096)
    writer.write(build_frame(OP_TEXT, b"close please"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await wait_for(lambda: len(server.hub.sessions) == 1, 3)
    await wait_no_connections(server, 3)
    assert loop.time() - started < 2.0
    writer.close()


async def test_a_session_paused_by_backpressure_reads_the_close_reply(start_server) -> None:
    """A slow consumer is cut off (1008) while its session is paused; once the client catches up and
    answers the close, the server must read that answer and end TCP cleanly at once -- not abort at
    close_timeout."""
    app = App()
    done: list = []

    class Flood(Endpoint):
        def on_open(self) -> None:
            asyncio.ensure_future(self.flood())

        async def flood(self) -> None:
            chunk = b"f" * (64 * KiB)
            while not self.session.closed:
                self.session.send(chunk)  # not awaited: the slow-consumer policy applies
                await asyncio.sleep(0)

        def on_close(self, code: int, reason: str) -> None:
            done.append((self.session.closed_cleanly, code))

    app.route("/flood")(Flood)
    server, port = await start_server(app, max_send_buffer=512 * KiB, close_timeout=4)
    reader, writer = await raw_connect(port, "/flood", rcvbuf=8192)
    await wait_for(lambda: server.stats["slow_consumers"] == 1, 10)
    code, reason = await read_until_close(reader)  # catch up, through megabytes, to the close frame
    assert code == 1008 and b"slow consumer" in reason
    loop = asyncio.get_running_loop()
    answered = loop.time()
    writer.write(build_frame(OP_CLOSE, close_payload(1008)))
    assert await reader.read() == b""  # a FIN, not a reset
    assert loop.time() - answered < 2.0, "the server did not read the close reply"
    await wait_for(lambda: done == [(True, 1008)])
    writer.close()


# -- application code ends with its connection -------------------------------------------------------


@pytest.mark.parametrize("how", ["abort", "close"])
async def test_an_async_on_open_that_joins_after_the_client_left_leaves_nothing(start_server, how: str) -> None:
    app = App()
    release = asyncio.Event()
    state: dict = {"joined": None, "finished": False}

    class Slow(Endpoint):
        async def on_open(self) -> None:
            await release.wait()  # authentication, a database...
            state["joined"] = self.hub.join(self.session, "room")
            self.hub.set_user(self.session, "alice")
            state["finished"] = True

    app.route("/slow")(Slow)
    server, port = await start_server(app)
    ws = await RawWS.connect(port, "/slow")
    await wait_for(lambda: len(server.hub.sessions) == 1)
    ref = weakref.ref(next(iter(server.hub.sessions.values())))
    if how == "abort":
        ws.abort()
    else:
        await ws.send_close(1000)
        await ws.expect_close()
        await ws.wait_eof()
    await wait_no_connections(server)
    release.set()
    for _ in range(5):
        await asyncio.sleep(0)
    # an abrupt end cancels on_open; a clean close lets it finish, but joining then registers nothing
    assert state["joined"] in ((None, False) if how == "abort" else (False,))
    assert server.hub.rooms() == {} and not server.hub.user_sessions("alice")
    await wait_for(lambda: (gc.collect(), ref())[1] is None)


async def test_a_handler_waiting_on_something_else_is_cancelled_when_the_client_goes(start_server) -> None:
    app = App()
    state: dict = {}

    @app.route("/wait")
    async def wait(ws: Session) -> None:
        try:
            await asyncio.Event().wait()  # never set
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise

    server, port = await start_server(app)
    ws = await RawWS.connect(port, "/wait")
    await wait_for(lambda: len(server.hub.sessions) == 1)
    ref = weakref.ref(next(iter(server.hub.sessions.values())))
    ws.abort()
    await wait_for(lambda: state.get("cancelled"))
    await wait_for(lambda: (gc.collect(), ref())[1] is None)


@pytest.mark.parametrize("how", ["clean", "abort"])
async def test_on_close_is_the_last_callback(start_server, how: str) -> None:
    app = App()
    calls: list = []

    class Slow(Endpoint):
        async def on_message(self, message: str | bytes) -> None:
            calls.append(("message", message))
            await asyncio.sleep(0.005)

        def on_close(self, code: int, reason: str) -> None:
            calls.append(("close", code))

    app.route("/slow")(Slow)
    server, port = await start_server(app)
    ws = await RawWS.connect(port, "/slow")
    await ws.send_raw(b"".join(build_frame(OP_TEXT, b"m%d" % i) for i in range(20)))
    if how == "clean":
        await ws.send_close(1000)
        await ws.expect_close()
        await ws.wait_eof()
    else:
        await wait_for(lambda: len(calls) >= 2)
        ws.abort()
    await wait_for(lambda: calls and calls[-1][0] == "close", 5)
    for _ in range(10):
        await asyncio.sleep(0.01)  # nothing may come after on_close
    assert [kind for kind, _ in calls].count("close") == 1 and calls[-1][0] == "close"
    messages = [m for kind, m in calls if kind == "message"]
    if how == "clean":  # every message received before the close is handled first
        assert messages == [f"m{i}" for i in range(20)] and calls[-1] == ("close", 1000)
    else:
        assert messages == [f"m{i}" for i in range(len(messages))] and calls[-1] == ("close", 1006)


# -- one bad session cannot hurt the others ---------------------------------------------------------


async def test_a_raising_constructor_gives_1011_and_keepalive_goes_on(start_server, caplog) -> None:
    app = App()
    app.route("/echo")(echo_endpoint([]))

    class Broken(Endpoint):
        def __init__(self) -> None:
            raise RuntimeError("no database")

    app.route("/broken")(Broken)
    server, port = await start_server(app, ping_interval=0.3, ping_timeout=5)
    healthy = await RawWS.connect(port, "/echo")
    with caplog.at_level(logging.ERROR, logger="fastws"):
        for _ in range(3):
            bad = await RawWS.connect(port, "/broken")
            code, reason = await bad.expect_close()
            assert code == 1011 and reason == b"internal server error"
            await bad.send_close(1011)
            await bad.wait_eof()
    assert sum("no database" in str(r.exc_info[1]) for r in caplog.records if r.exc_info) == 3  # once each
    assert len(server.hub.sessions) == 1
    frame = await healthy.recv_frame(3)  # keepalive still pings the healthy session
    assert frame.opcode == OP_PING
    await healthy.send_frame(OP_TEXT, b"still here")
    assert await healthy.recv_message() == (OP_TEXT, b"still here")
    await asyncio.wait_for(server.shutdown(timeout=1), 5)


@pytest.mark.parametrize("style", ["sync", "async"])
async def test_a_raising_on_open_gives_1011_and_on_error(start_server, caplog, style: str) -> None:
    app = App()
    seen: list = []

    class Fails(Endpoint):
        def on_error(self, exc: BaseException) -> None:
            seen.append(str(exc))

    if style == "sync":
        def on_open(self: Endpoint) -> None:
            raise ValueError("bad token")
    else:
        async def on_open(self: Endpoint) -> None:  # type: ignore[misc]
            await asyncio.sleep(0)
            raise ValueError("bad token")
    Fails.on_open = on_open  # type: ignore[method-assign]
    app.route("/fails")(Fails)
    server, port = await start_server(app)
    with caplog.at_level(logging.ERROR, logger="fastws"):
        ws = await RawWS.connect(port, "/fails")
        code, reason = await ws.expect_close()
    assert code == 1011 and reason == b"internal server error"
    assert seen == ["bad token"]
    assert len([r for r in caplog.records if r.exc_info]) == 1
    await ws.send_close(1011)
    await ws.wait_eof()
    await wait_no_connections(server)


async def test_handler_error_sends_exactly_1011(start_server) -> None:
    app = App()

    @app.route("/boom")
    async def boom(ws: Session) -> None:
        await ws.recv()
        raise RuntimeError("boom")

    _, port = await start_server(app)
    ws = await RawWS.connect(port, "/boom")
    await ws.send_frame(OP_TEXT, b"go")
    assert (await ws.expect_close())[0] == 1011


# -- memory is bounded per process -------------------------------------------------------------------


async def test_the_process_send_budget_cuts_the_biggest_slow_consumers(start_server) -> None:
    app = App()
    closes: list = []

    class Push(Endpoint):
        def on_open(self) -> None:
            asyncio.ensure_future(self.push())

        async def push(self) -> None:
            chunk = b"p" * (64 * KiB)
            while not self.session.closed:
                self.session.send(chunk)
                await asyncio.sleep(0)

        def on_close(self, code: int, reason: str) -> None:
            closes.append(self.session.sent_close)

    app.route("/push")(Push)
    budget = 4 * MiB
    server, port = await start_server(app, send_budget=budget, max_send_buffer=2 * MiB, close_timeout=0.5)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, server.unsent_bytes)
            await asyncio.sleep(0)

    watcher = asyncio.ensure_future(watch())
    clients = [await raw_connect(port, "/push", rcvbuf=4096) for _ in range(8)]  # none of them reads
    await wait_for(lambda: server.stats["send_budget_cutoffs"] >= 1, 10)
    await wait_for(lambda: len(closes) == 8, 15)  # cut by the budget (1013) or the per-peer limit (1008)
    watcher.cancel()
    codes = sorted(code for code, _ in closes)
    assert 1013 in codes and set(codes) <= {1008, 1013}, codes
    assert peak <= budget + 2 * MiB + 64 * KiB, f"unsent bytes peaked at {peak}"
    for _, writer in clients:
        writer.close()
    await wait_no_connections(server)


async def test_async_inbox_is_bounded_in_bytes(start_server) -> None:
    app = App()
    gate = asyncio.Event()
    peak: list[int] = [0]

    class Busy(Endpoint):
        async def on_message(self, message: str | bytes) -> None:
            peak[0] = max(peak[0], self.session.queued[1])
            await gate.wait()

    app.route("/busy")(Busy)
    server, port = await start_server(app, max_queue=1000, max_queue_bytes=512 * KiB,
                                      max_message_size=2 * MiB)
    ws = await RawWS.connect(port, "/busy")
    await wait_for(lambda: len(server.hub.sessions) == 1)
    session = next(iter(server.hub.sessions.values()))
    sender = asyncio.ensure_future(ws.send_raw(b"".join(build_frame(0x2, b"q" * (256 * KiB)) for _ in range(24))))
    await wait_for(lambda: not session.reading, 5)  # the server stopped reading: TCP pushes back
    messages, queued = session.queued
    assert queued <= 512 * KiB + 256 * KiB and messages <= 3, session.queued
    gate.set()
    await asyncio.wait_for(sender, 10)
    ws.abort()
    await wait_no_connections(server)


async def test_connections_that_exchanged_messages_return_to_the_idle_floor(start_server) -> None:
    """A connection that has sent and received messages holds no more memory than an idle one."""
    log: list = []
    app = App()
    app.route("/echo")(echo_endpoint(log))
    server, port = await start_server(app, ping_interval=None)
    conns = [await RawWS.connect(port, "/echo") for _ in range(1000)]
    await wait_for(lambda: len(server.hub.sessions) == 1000, 10)
    gc.collect()
    idle = rss()
    for ws in conns:
        await ws.send_raw(b"".join(build_frame(OP_TEXT, b"m" * 1000) for _ in range(5)))

    async def read_echoes() -> None:
        # no timer per frame: this process's RSS is the client's too, and from Python 3.12 on a
        # cancelled wait_for() timer stays allocated until it would have fired
        for ws in conns:
            for _ in range(5):
                assert (await ws.recv_message(timeout=None))[0] == OP_TEXT

    await asyncio.wait_for(read_echoes(), 30)
    gc.collect()
    grown = rss() - idle
    assert grown < 1000 * 1024, f"{grown / 1000:.0f} bytes per connection left behind by traffic"
    for ws in conns:
        ws.abort()
    await wait_no_connections(server, 10)


async def test_churn_of_abrupt_disconnects_keeps_fds_and_memory_flat(start_server) -> None:
    log: list = []
    app = App()
    app.route("/echo")(echo_endpoint(log))
    server, port = await start_server(app)

    async def cycle(i: int) -> None:
        ws = await RawWS.connect(port, "/echo")
        await ws.send_frame(OP_TEXT, b"hello %d" % i)
        if i % 2:
            await ws.recv_message()
        ws.abort()  # RST, mid-conversation

    async def churn(n: int) -> None:
        for base in range(0, n, 50):
            await asyncio.gather(*(cycle(i) for i in range(base, base + 50)))
        await wait_no_connections(server, 10)

    await churn(500)  # warm-up: allocator pools, caches
    gc.collect()
    fds, mem = fd_count(), rss()
    await churn(3000)
    gc.collect()
    assert fd_count() <= fds
    grown = rss() - mem
    assert grown < 4 * MiB, f"RSS grew by {grown / MiB:.1f} MiB over 3,000 abrupt disconnects"
    assert live(Session) == 0


# -- fairness ----------------------------------------------------------------------------------------


async def test_one_read_full_of_tiny_frames_does_not_starve_other_connections(start_server) -> None:
    app = App()
    counts: dict = {"flood": 0, "when_other_ran": None}

    class Count(Endpoint):
        def on_message(self, message: str | bytes) -> None:
            counts["flood"] += 1

    class Other(Endpoint):
        def on_message(self, message: str | bytes) -> None:
            counts["when_other_ran"] = counts["flood"]
            self.session.send(message)

    app.route("/count")(Count)
    app.route("/other")(Other)
    server, port = await start_server(app, max_frames_per_read=1)
    flood = await RawWS.connect(port, "/count")
    other = await RawWS.connect(port, "/other")
    frames = 5000
    await flood.send_raw(build_frame(OP_TEXT, b"x", mask_key=b"\x00\x00\x00\x00") * frames)
    await other.send_frame(OP_TEXT, b"my turn")
    assert await other.recv_message() == (OP_TEXT, b"my turn")
    await wait_for(lambda: counts["flood"] == frames, 10)  # every frame is still handled, in turns
    assert counts["when_other_ran"] < frames, "the other connection waited for the whole flood"
    flood.abort()
    other.abort()
    await wait_no_connections(server)


async def test_async_on_message_in_order_whether_or_not_it_waits(start_server) -> None:
    """Async on_message calls that finish at once and ones that wait, mixed: one order throughout,
    none lost (the later messages queue behind one that waits)."""
    app = App()
    seen: list[str] = []

    class Sometimes(Endpoint):
        async def on_message(self, message: str | bytes) -> None:
            assert isinstance(message, str)
            if message.startswith("wait"):
                await asyncio.sleep(0.002)
            seen.append(message)
            await self.session.send(message)

    app.route("/sometimes")(Sometimes)
    _, port = await start_server(app)
    expected = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/sometimes") as ws:
        for batch in range(5):
            names = [f"{'wait' if (batch + i) % 3 == 0 else 'now'}-{batch}-{i}" for i in range(7)]
            for name in names:
                await ws.send(name)
            assert [await ws.recv() for _ in names] == names  # echoed in order, none lost
            expected += names
    assert seen == expected


async def test_an_async_on_message_lets_go_of_each_message_once_it_returns(start_server) -> None:
    """Between messages the server keeps no reference to the last one: a big message is freed as
    soon as on_message is done with it, so the next one can reuse its memory while it is still in
    the CPU cache (README, Benchmarks: 1 MiB over 100 connections)."""
    app = App()
    kept: dict[str, bytes] = {}

    class Keep(Endpoint):
        async def on_message(self, message: str | bytes) -> None:
            assert isinstance(message, bytes)
            kept["last"] = message
            await self.session.send(b"ok")

    app.route("/keep")(Keep)
    _, port = await start_server(app)
    async with websockets.connect(f"ws://127.0.0.1:{port}/keep", max_size=None) as ws:
        for size in (300_000, 100):  # a big message read straight into its object, and a small one
            await ws.send(os.urandom(size))
            assert await ws.recv() == b"ok"  # on_message has returned: its reply left in that read
            assert len(kept["last"]) == size
            refs = sys.getrefcount(kept["last"])  # (outside the assert: pytest's rewriting holds its parts)
            assert refs == 2  # the dict's reference and getrefcount's own: the server holds none


async def test_async_code_runs_in_a_task(start_server) -> None:
    """An async on_message and a handler coroutine run inside a task, as asyncio code expects:
    current_task() is theirs, asyncio.timeout() works (it needs a task), and a context variable set
    in one message is still set for the next (one task per connection, one context)."""
    import contextvars

    app = App()
    count: contextvars.ContextVar[int] = contextvars.ContextVar("count", default=0)

    def timeout(seconds: float):  # asyncio.timeout (3.11+; it needs a task); 3.10: current_task() alone
        return asyncio.timeout(seconds) if hasattr(asyncio, "timeout") else contextlib.nullcontext()

    class Timed(Endpoint):
        async def on_message(self, message: str | bytes) -> None:
            count.set(count.get() + 1)
            async with timeout(5):
                await self.session.send(f"{message} task={asyncio.current_task() is not None} n={count.get()}")

    async def timed_handler(ws: Session) -> None:
        async for message in ws:
            async with timeout(5):
                await ws.send(f"{message} task={asyncio.current_task() is not None}")

    app.route("/timed")(Timed)
    app.route("/timed-handler")(timed_handler)
    _, port = await start_server(app)
    async with websockets.connect(f"ws://127.0.0.1:{port}/timed") as ws:
        for i in range(1, 4):
            await ws.send("m")
            assert await ws.recv() == f"m task=True n={i}"
    async with websockets.connect(f"ws://127.0.0.1:{port}/timed-handler") as ws:
        await ws.send("h")
        assert await ws.recv() == "h task=True"


async def test_a_spawned_task_runs_in_a_copy_of_its_callers_context_and_ends_in_the_servers(start_server) -> None:
    """Server.spawn: the task gets a copy of the caller's context (as any asyncio task); its done
    callback runs in the one context the server keeps for them all, so no context is copied per
    task for it (64 bytes per idle handler connection)."""
    import contextvars

    server, _ = await start_server(App())
    where: contextvars.ContextVar[str] = contextvars.ContextVar("where", default="unset")
    where.set("caller")
    seen: dict[str, str] = {}
    ended = asyncio.Event()

    async def work() -> None:
        seen["task"] = where.get()
        where.set("task")

    def done(task: asyncio.Task) -> None:
        seen["done"] = where.get()
        seen["result"] = repr(task.result())
        ended.set()

    server.spawn(work(), done)
    await asyncio.wait_for(ended.wait(), 5)
    assert seen == {"task": "caller", "done": "unset", "result": "None"}
    assert where.get() == "caller"  # the task's change stayed in its copy


async def test_a_parked_handler_is_woken_by_the_read_in_its_own_task(start_server) -> None:
    """A handler parked in recv() runs when its message is read, inside its own task and context:
    timeouts around recv() and context variables behave as in any asyncio task, a timed-out recv()
    loses no message, and two coroutines waiting on one connection get a clear error."""
    import contextvars

    app = App()
    who: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="unset")
    async def handler(ws: Session) -> None:
        errors: list[str] = []
        who.set("handler")
        task = asyncio.current_task()
        timeouts = 0
        while True:
            try:
                async with deadline(0.05):
                    message = await ws.recv()
            except asyncio.TimeoutError:
                timeouts += 1
                continue
            except ConnectionClosed:
                return
            if message == "twice":
                other = asyncio.ensure_future(ws.recv())
                await asyncio.sleep(0)
                try:
                    await ws.recv()
                except RuntimeError as exc:
                    errors.append(str(exc))
                other.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await other
                await ws.send(f"twice: {errors}")
                continue
            await ws.send(f"{message} who={who.get()} same-task={asyncio.current_task() is task} "
                          f"waited={timeouts > 0}")

    BUSY = "another coroutine is already waiting for the next message on this connection"
    app.route("/parked")(handler)
    _, port = await start_server(app)
    async with websockets.connect(f"ws://127.0.0.1:{port}/parked") as ws:
        await ws.send("a")
        assert await ws.recv() == "a who=handler same-task=True waited=False"
        await asyncio.sleep(0.2)  # a few timeouts go by
        await ws.send("b")
        assert await ws.recv() == "b who=handler same-task=True waited=True"
        await ws.send("twice")
        assert await ws.recv() == f"twice: {[BUSY]}"
        await ws.send("c")
        assert await ws.recv() == "c who=handler same-task=True waited=True"


def test_a_sessions_c_object_stays_in_pymalloc_s_largest_size_class() -> None:
    """The session's C half fits pymalloc's 512-byte class exactly (GC header included): one more
    field would make every connection a malloc'd block (docs/capacity.md's memory figure)."""
    from fastws._frame import SessionCore

    assert sys.getsizeof(SessionCore.__new__(SessionCore)) <= 512
