"""Robustness over real sockets: abrupt disconnects, churn, slow consumers, keepalive,
idle timeout, graceful shutdown and garbage input. Nothing may leak: no sessions,
no file descriptors, no sockets left in CLOSE_WAIT, no unbounded buffers."""

from __future__ import annotations

import asyncio
import gc
import os
import struct

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

from fastws import App, Config, Endpoint, Session
from wsraw import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawWS,
    build_frame,
    wait_for,
    wait_no_connections,
)

pytestmark = pytest.mark.timeout(60)

KiB = 1024
MiB = 1 << 20


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tcp_states(port: int) -> list[str]:
    """States (hex, as in /proc/net/tcp) of this process's sockets whose local port is ``port``."""
    states = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            local_port = int(parts[1].rsplit(":", 1)[1], 16)
            if local_port == port:
                states.append(parts[3])
    return states


CLOSE_WAIT, ESTABLISHED, LISTEN = "08", "01", "0A"


def live_sessions() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, Session))


async def settle(baseline_fds: int, server, port: int | None = None, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    """Wait until no connection is left on ``server`` and the fd count is back to ``baseline_fds``."""
    await wait_no_connections(server, timeout)
    await wait_for(lambda: fd_count() <= baseline_fds, timeout)
    if port is not None:
        await wait_for(lambda: all(s in (LISTEN, "06") for s in tcp_states(port)), timeout)  # 06: TIME_WAIT


def echo_app() -> tuple[App, dict]:
    app = App()
    log: dict = {"closes": []}

    class Echo(Endpoint):
        def on_message(self, message: str | bytes) -> None:
            self.session.send(message)

        def on_close(self, code: int, reason: str) -> None:
            log["closes"].append((code, reason))

    app.route("/echo")(Echo)

    @app.route("/handler")
    async def handler(ws):  # type: ignore[no-untyped-def]
        async for message in ws:
            await ws.send(message)

    return app, log


# -- abrupt disconnects and churn ---------------------------------------------------------------


async def test_abrupt_disconnects_leave_nothing(start_server) -> None:
    app, log = echo_app()
    server, port = await start_server(app, max_message_size=MiB)
    baseline = fd_count()
    conns = []
    for i in range(40):
        ws = await RawWS.connect(port, "/echo" if i % 2 else "/handler")
        await ws.send_frame(OP_TEXT, f"hello {i}")
        conns.append(ws)
    for ws in conns:
        assert (await ws.recv_message())[0] == OP_TEXT
    await wait_for(lambda: len(server.hub.sessions) == 40)
    for i, ws in enumerate(conns):
        mode = i % 4
        if mode == 0:
            ws.abort()  # RST
        elif mode == 1:
            await ws.send_raw(build_frame(OP_BINARY, b"x" * 100_000)[:50_000])  # mid-frame
            ws.abort()
        elif mode == 2:
            ws.writer.write(build_frame(OP_TEXT, b"y" * 100, fin=False))  # mid-message, then FIN
            ws.writer.close()
        else:
            ws.writer.close()  # FIN without a close frame
    await settle(baseline, server, port)
    assert sorted({code for code, _ in log["closes"]}) == [1006]
    assert len(log["closes"]) == 20  # the /echo half; handler sessions have no on_close
    await wait_for(lambda: live_sessions() == 0, 3, 0.05)  # handler tasks end a few loop turns later


async def test_abrupt_disconnect_while_server_is_sending(start_server) -> None:
    app = App()

    class Flood(Endpoint):
        def on_open(self) -> None:
            asyncio.ensure_future(self.flood())

        async def flood(self) -> None:
            chunk = b"z" * (64 * KiB)
            while not self.session.closed:
                await self.session.send(chunk)

    app.route("/flood")(Flood)
    server, port = await start_server(app)
    baseline = fd_count()
    conns = [await RawWS.connect(port, "/flood") for _ in range(10)]
    for ws in conns:
        await ws.recv_frame()
    for ws in conns:
        ws.abort()
    await settle(baseline, server, port)


async def test_connection_churn_returns_to_baseline(start_server) -> None:
    app, _ = echo_app()
    server, port = await start_server(app)

    async def cycle(i: int) -> None:
        ws = await RawWS.connect(port, "/echo" if i % 2 else "/handler")
        try:
            await ws.send_frame(OP_BINARY, b"%d" % i)
            assert await ws.recv_message() == (OP_BINARY, b"%d" % i)
            if i % 3 == 0:
                ws.abort()
            else:
                await ws.send_close(1000)
                await ws.wait_eof()
        finally:
            ws.abort()

    async def batch(start: int, n: int, parallel: int = 10) -> None:
        for base in range(start, start + n, parallel):
            await asyncio.gather(*(cycle(i) for i in range(base, base + parallel)))

    await batch(0, 100)  # warm-up: allocator pools, caches
    await wait_no_connections(server)
    gc.collect()
    fds, mem = fd_count(), rss()
    await batch(100, 500)
    await settle(fds, server, port)
    gc.collect()
    grown = rss() - mem
    assert grown < 8 * MiB, f"RSS grew by {grown / MiB:.1f} MiB over 500 connections"
    await wait_for(lambda: live_sessions() == 0, 3, 0.05)  # handler tasks end a few loop turns later
    assert server.stats["connections_total"] == 600


# -- slow consumers -----------------------------------------------------------------------------


def pusher_app(awaited: bool, total: int | None = None) -> tuple[App, dict]:
    app = App()
    state: dict = {"max_buffer": 0, "sent": 0, "closed": None, "done": False}
    chunk = b"p" * (64 * KiB)

    class Pusher(Endpoint):
        def on_open(self) -> None:
            asyncio.ensure_future(self.push())

        async def push(self) -> None:
            session = self.session
            try:
                while not session.closed and (total is None or state["sent"] < total):
                    result = session.send(chunk)
                    state["sent"] += 1
                    state["max_buffer"] = max(state["max_buffer"], session.write_buffer_size)
                    if awaited:
                        await result
                    else:
                        await asyncio.sleep(0)
            except Exception:
                pass
            state["done"] = True

        def on_close(self, code: int, reason: str) -> None:
            state["closed"] = (code, reason)

    app.route("/push")(Pusher)
    return app, state


async def test_slow_consumer_is_cut_off_with_1008(start_server) -> None:
    limit = 1 * MiB
    app, state = pusher_app(awaited=False)
    server, port = await start_server(app, max_send_buffer=limit, write_high_water=64 * KiB, close_timeout=5)
    baseline = fd_count()
    ws = await RawWS.connect(port, "/push")  # and never read
    await wait_for(lambda: server.stats["slow_consumers"] == 1, 10)
    # the server's buffer for this peer never grew much past the limit
    assert state["max_buffer"] <= limit + 2 * 64 * KiB, state["max_buffer"]
    await wait_for(lambda: state["done"])
    # once we do read: all the data that was queued, then the close frame 1008 (RFC 6455 7.4.1)
    code, reason = await ws.expect_close(timeout=10, skip_data=True)
    assert code == 1008, (code, reason)
    await ws.send_close(1008)
    assert await ws.wait_eof(5) == b""
    ws.abort()
    await settle(baseline, server, port)
    assert state["closed"][0] == 1008


async def test_slow_consumer_that_never_reads_is_dropped_after_close_timeout(start_server) -> None:
    app, state = pusher_app(awaited=False)
    server, port = await start_server(app, max_send_buffer=512 * KiB, close_timeout=0.3)
    baseline = fd_count()
    ws = await RawWS.connect(port, "/push")
    await wait_for(lambda: server.stats["slow_consumers"] == 1, 10)
    await wait_no_connections(server, 3)  # dropped: the close frame could never be delivered
    ws.abort()
    await settle(baseline, server, port)
    assert state["closed"][0] == 1008


async def test_awaited_sends_wait_instead_of_cutting_off(start_server) -> None:
    """A producer that awaits send() is paced by a slow reader and never disconnected."""
    total = 160  # 10 MiB in 64 KiB messages, far beyond max_send_buffer
    app, state = pusher_app(awaited=True, total=total)
    server, port = await start_server(app, max_send_buffer=512 * KiB, write_high_water=64 * KiB)
    ws = await RawWS.connect(port, "/push")
    received = 0
    async with ws:
        while received < total:
            op, data = await ws.recv_message(timeout=10)
            assert op == OP_BINARY and len(data) == 64 * KiB
            received += 1
            if received % 16 == 0:
                await asyncio.sleep(0.01)  # a slow reader
        assert server.stats["slow_consumers"] == 0
        assert state["max_buffer"] <= 512 * KiB, state["max_buffer"]


async def test_broadcast_to_slow_consumer_does_not_hurt_others(start_server) -> None:
    app = App()

    class Member(Endpoint):
        def on_open(self) -> None:
            self.hub.join(self.session, "r")

    app.route("/r")(Member)
    server, port = await start_server(app, max_send_buffer=256 * KiB, write_high_water=32 * KiB,
                                      close_timeout=0.3)
    slow = await RawWS.connect(port, "/r")  # never reads
    fast = await RawWS.connect(port, "/r")
    await wait_for(lambda: len(server.hub.members("r")) == 2)
    chunk = b"b" * (32 * KiB)
    got = 0
    for i in range(300):  # ~9.4 MiB
        app.hub.publish("r", chunk)
        if i % 4 == 3:
            while got < i + 1:
                assert await fast.recv_message() == (OP_BINARY, chunk)
                got += 1
    while got < 300:
        assert await fast.recv_message() == (OP_BINARY, chunk)
        got += 1
    assert server.stats["slow_consumers"] == 1
    await wait_for(lambda: len(server.hub.members("r")) == 1)
    slow.abort()
    fast.abort()
    await wait_no_connections(server)


# -- keepalive and idle timeout -------------------------------------------------------------------


async def test_keepalive_client_that_answers_pings_stays(start_server) -> None:
    app, _ = echo_app()
    server, port = await start_server(app, ping_interval=0.2, ping_timeout=0.2)
    async with ws_connect(f"ws://127.0.0.1:{port}/echo", ping_interval=None, compression=None) as ws:
        await wait_for(lambda: server.stats["keepalive_pings"] >= 4)  # answered by the client library
        await ws.send("still here")
        assert await ws.recv() == "still here"
    assert server.stats["keepalive_timeouts"] == 0


async def test_without_a_ping_timeout_a_silent_client_is_pinged_every_interval_and_kept(start_server) -> None:
    """ping_timeout=None (python-websockets' and uvicorn's way to say it; `--ping-timeout 0`): a
    client that never answers is pinged again every interval and never closed for it."""
    app, _ = echo_app()
    server, port = await start_server(app, ping_interval=0.2, ping_timeout=None)
    async with await RawWS.connect(port, "/echo") as ws:  # answers nothing
        for _ in range(4):
            assert (await ws.recv_frame(10)).opcode == OP_PING
        await ws.send_frame(OP_TEXT, b"still open")
        assert await ws.recv_message() == (OP_TEXT, b"still open")
    assert server.stats["keepalive_timeouts"] == 0


def test_keepalive_settings_that_cannot_work_are_refused() -> None:
    for bad, name in (({"ping_interval": -1}, "ping_interval"), ({"idle_timeout": "5"}, "idle_timeout"),
                      ({"ping_timeout": 0}, "ping_timeout"), ({"ping_timeout": "20"}, "ping_timeout")):
        with pytest.raises(ValueError, match=name):
            Config(**bad)
    assert Config(ping_interval=0, ping_timeout=None, idle_timeout=0).ping_timeout is None


@pytest.mark.parametrize(("bad", "says"), [
    ({"max_message_size": "1M"}, "max_message_size must be a whole number >= 0, not '1M'"),
    ({"compression_window_bits": 20}, "compression_window_bits must be between 8 and 15, not 20"),
    ({"compression_mem_level": 0}, "compression_mem_level must be between 1 and 9, not 0"),
    ({"compression_window_bits": None}, "compression_window_bits must be between 8 and 15, not None"),
    ({"max_headers": 0}, "max_headers must be at least 1, not 0"),  # would refuse every request
    ({"ping_interval": float("nan")}, "ping_interval must be a number of seconds"),
    ({"close_timeout": float("inf")}, "close_timeout must be a positive number of seconds"),
    # a string where a list belongs is taken as its characters (every real Origin got 403; subprotocol "c")
    ({"allowed_origins": "https://app.example"}, "allowed_origins must be a list of strings"),
    ({"subprotocols": "chat"}, "subprotocols must be a list of strings"),
    ({"trusted_proxies": "10.0.0.0/8"}, "trusted_proxies must be a list of strings"),
])
def test_config_values_that_cannot_work_are_refused_by_name(bad: dict, says: str) -> None:
    with pytest.raises(ValueError) as refused:
        Config(**bad)
    assert says in str(refused.value)


async def test_keepalive_raw_client_answering_pings_stays(start_server) -> None:
    app, _ = echo_app()
    server, port = await start_server(app, ping_interval=0.2, ping_timeout=0.2)
    async with await RawWS.connect(port, "/echo") as ws:
        pings = 0
        loop = asyncio.get_running_loop()
        end = loop.time() + 0.9
        while loop.time() < end:
            try:
                frame = await ws.recv_frame(0.1)
            except asyncio.TimeoutError:
                continue
            assert frame.opcode == OP_PING, frame
            pings += 1
            await ws.send_frame(OP_PONG, frame.payload)
        assert pings >= 2
        await ws.send_frame(OP_TEXT, b"ok")
        assert await ws.recv_message() == (OP_TEXT, b"ok")
    assert server.stats["keepalive_timeouts"] == 0


async def test_keepalive_silent_raw_client_is_closed(start_server) -> None:
    app, log = echo_app()
    server, port = await start_server(app, ping_interval=0.2, ping_timeout=0.2)
    async with await RawWS.connect(port, "/echo") as ws:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        frame = await ws.recv_frame(2)
        assert frame.opcode == OP_PING  # 5.5.2: the server pings the silent peer
        code, _ = await ws.expect_close(timeout=2)  # we never answer
        assert code == 1011, code
        assert await ws.wait_eof(2) == b""
        assert loop.time() - t0 < 2.0
    await wait_no_connections(server)
    assert server.stats["keepalive_timeouts"] == 1
    assert log["closes"][0][0] == code


async def test_keepalive_client_that_stops_reading_is_closed(start_server) -> None:
    app, _ = echo_app()
    server, port = await start_server(app, ping_interval=0.2, ping_timeout=0.2)
    async with ws_connect(f"ws://127.0.0.1:{port}/echo", ping_interval=None, compression=None) as ws:
        await ws.send("hi")
        assert await ws.recv() == "hi"
        ws.transport.pause_reading()  # the client's process hangs: no pongs any more
        await wait_no_connections(server, 3)
        assert server.stats["keepalive_timeouts"] == 1
        ws.transport.resume_reading()
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 3)


async def test_aiohttp_heartbeat_client_stays(start_server) -> None:
    app, _ = echo_app()
    server, port = await start_server(app, ping_interval=0.2, ping_timeout=0.2)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"ws://127.0.0.1:{port}/echo") as ws:
            # aiohttp answers pings from inside receive(): keep a receive() pending, as apps do
            first = asyncio.ensure_future(ws.receive(3))
            await wait_for(lambda: server.stats["keepalive_pings"] >= 4)
            assert not first.done(), first.result()
            await ws.send_str("alive")
            assert (await first).data == "alive"
    assert server.stats["keepalive_timeouts"] == 0


async def test_idle_timeout_counts_data_messages_only(start_server) -> None:
    app, log = echo_app()
    server, port = await start_server(app, idle_timeout=0.4, ping_interval=None)
    chatty = await RawWS.connect(port, "/echo")
    pinger = await RawWS.connect(port, "/echo")
    async with chatty, pinger:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        closed_at = None
        while loop.time() - t0 < 1.2:
            await chatty.send_frame(OP_TEXT, b"tick")
            assert await chatty.recv_message() == (OP_TEXT, b"tick")
            if closed_at is None:
                await pinger.send_frame(OP_PING, b"p")  # control frames don't count as activity
                frame = await pinger.recv_frame(1)
                if frame.opcode == OP_CLOSE:
                    closed_at = loop.time() - t0
                    assert frame.close[0] == 1001
                else:
                    assert frame.opcode == OP_PONG
            await asyncio.sleep(0.1)
        assert closed_at is not None and 0.3 <= closed_at <= 1.0, closed_at
        await pinger.send_close(1001)
        assert await pinger.wait_eof(2) == b""
        await chatty.send_frame(OP_TEXT, b"still open")
        assert await chatty.recv_message() == (OP_TEXT, b"still open")
    await wait_no_connections(server)


# -- graceful shutdown -----------------------------------------------------------------------------


async def test_shutdown_sends_1001_to_everyone(start_server) -> None:
    app, log = echo_app()
    server, port = await start_server(app, drain_timeout=5)
    raw = await RawWS.connect(port, "/echo")
    ws = await ws_connect(f"ws://127.0.0.1:{port}/echo", compression=None, close_timeout=2)
    session = aiohttp.ClientSession()
    aio = await session.ws_connect(f"ws://127.0.0.1:{port}/echo")
    try:
        await wait_for(lambda: len(server.hub.sessions) == 3)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        shutdown = asyncio.ensure_future(server.shutdown(timeout=5))

        code, reason = await raw.expect_close()
        assert code == 1001 and reason
        await raw.send_close(1001)
        assert await raw.wait_eof() == b""

        with pytest.raises(websockets.ConnectionClosedOK):
            await ws.recv()
        assert ws.close_code == 1001

        msg = await aio.receive(3)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001

        await asyncio.wait_for(shutdown, 5)
        assert loop.time() - t0 < 2.0, "every client answered: shutdown should not wait for the timeout"
        assert not server.hub.sessions
        assert sorted(code for code, _ in log["closes"]) == [1001, 1001, 1001]
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)  # no longer accepting
    finally:
        raw.abort()
        await aio.close()
        await session.close()


async def test_shutdown_with_handler_coroutine_sessions_is_prompt(start_server) -> None:
    app, _ = echo_app()
    server, port = await start_server(app)
    conns = [await RawWS.connect(port, "/handler") for _ in range(3)]
    await wait_for(lambda: len(server.hub.sessions) == 3)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    shutdown = asyncio.ensure_future(server.shutdown(timeout=3))
    for ws in conns:
        assert (await ws.expect_close())[0] == 1001
        await ws.send_close(1001)
        assert await ws.wait_eof() == b""
    await asyncio.wait_for(shutdown, 4)
    elapsed = loop.time() - t0
    assert elapsed < 2.0, f"shutdown took {elapsed:.1f} s although every client closed at once"


async def test_shutdown_drops_clients_that_never_answer(start_server) -> None:
    app, log = echo_app()
    server, port = await start_server(app)
    baseline = fd_count()
    conns = [await RawWS.connect(port, "/echo") for _ in range(3)]
    await wait_for(lambda: len(server.hub.sessions) == 3)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.wait_for(server.shutdown(timeout=0.5), 5)
    assert loop.time() - t0 < 2.0
    for ws in conns:
        assert (await ws.expect_close())[0] == 1001
        await ws.wait_eof()
        ws.abort()
    assert not server.hub.sessions
    await wait_for(lambda: fd_count() <= baseline - 1)  # the listening socket is gone too
    assert len(log["closes"]) == 3


async def test_huge_announced_frame_does_not_allocate(start_server) -> None:
    """A header announcing 1 GiB (within an unlimited max_message_size) must not reserve 1 GiB up front."""
    app, _ = echo_app()
    server, port = await start_server(app, max_message_size=0)
    mem = rss()
    async with await RawWS.connect(port, "/echo") as ws:
        header = bytes((0x82, 0xFF)) + struct.pack("!Q", 1 << 30) + b"\x01\x02\x03\x04"
        await ws.send_raw(header + b"a" * 1000)
        await wait_for(lambda: sum(s.buffered for s in server.hub.sessions.values()) >= 1000)
        assert rss() - mem < 64 * MiB
    await wait_no_connections(server)


async def test_pipelined_echo_of_big_messages_pushes_back_instead_of_cutting_off(start_server, demo_app) -> None:
    """A client that keeps 12 MiB of requests in flight but reads all the time is served,
    not dropped as a slow consumer: while its replies wait, the server stops reading it."""
    server, port = await start_server(demo_app, max_message_size=1 << 20, max_send_buffer=2 << 20)
    payload = os.urandom(1 << 20)
    async with ws_connect(f"ws://127.0.0.1:{port}/echo", max_size=None) as ws:
        for _ in range(3):
            for _ in range(12):
                await ws.send(payload)
            for _ in range(12):
                assert await asyncio.wait_for(ws.recv(), 10) == payload
    assert server.stats["slow_consumers"] == 0


async def test_the_http_phase_is_freed_after_the_upgrade(start_server, demo_app) -> None:
    from fastws.handshake import HeadParser
    from fastws.http import HttpProtocol

    _, port = await start_server(demo_app)
    clients = [await ws_connect(f"ws://127.0.0.1:{port}/echo") for _ in range(20)]
    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, (HttpProtocol, HeadParser))]
    assert len(alive) < 5, f"{len(alive)} HTTP-phase objects kept by 20 open sessions"
    for ws in clients:
        await ws.close()
