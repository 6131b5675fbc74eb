"""A handler written for python-websockets runs unchanged on fastws: ``await ws.close()``,
``await ws.wait_closed()``, ``pong_waiter = await ws.ping(); latency = await pong_waiter``,
``ws.remote_address`` and ``ws.request.headers["..."]`` behave as there, over real sockets with
python-websockets (and a raw client that never answers pings) on the other end; sync code that does
not await them stays quiet."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest
from websockets.asyncio.client import connect

from fastws import App, ConnectionClosed, Endpoint
from fastws._frame import READY
from wsraw import OP_PING, OP_PONG, OP_TEXT, RawWS

pytestmark = pytest.mark.timeout(60)


async def test_the_idioms_of_a_websockets_handler(start_server) -> None:
    app = App()
    seen: dict[str, object] = {}
    done = asyncio.Event()

    @app.route("/h")
    async def handler(ws):
        seen["remote_address"], seen["local_address"] = ws.remote_address, ws.local_address
        seen["user_agent"] = ws.request.headers["User-Agent"]
        try:
            ws.request.headers["X-Not-Sent"]
        except KeyError as exc:
            seen["missing"] = exc.args
        pong_waiter = await ws.ping()  # python-websockets answers it
        seen["latency"] = await pong_waiter
        await ws.send(await ws.recv())
        await ws.close(4000, "done here")
        seen["state_after_close"] = (ws.closed, ws.close_code, ws.close_reason)
        await ws.wait_closed()  # already over: returns at once
        done.set()

    server, port = await start_server(app)
    async with connect(f"ws://127.0.0.1:{port}/h", user_agent_header="idiom-test/1") as client:
        await client.send("x")
        assert await client.recv() == "x"
        with pytest.raises(Exception) as ended:
            await client.recv()
        local, remote = client.local_address, client.remote_address
    await asyncio.wait_for(done.wait(), 10)
    assert (ended.value.rcvd.code, ended.value.rcvd.reason) == (4000, "done here")
    assert (seen["remote_address"], seen["local_address"]) == (local, remote)
    assert seen["user_agent"] == "idiom-test/1"
    assert seen["missing"] == ("X-Not-Sent",)
    assert isinstance(seen["latency"], float) and 0 < seen["latency"] < 5
    # `await ws.close()` returned only once TCP had ended, with the code it sent
    assert seen["state_after_close"] == (True, 4000, "done here")


async def test_wait_closed_returns_when_the_client_closes(start_server) -> None:
    app = App()
    ended: asyncio.Future = asyncio.get_running_loop().create_future()

    @app.route("/w")
    async def handler(ws):
        await ws.wait_closed()
        ended.set_result(ws.close_code)

    server, port = await start_server(app)
    async with connect(f"ws://127.0.0.1:{port}/w") as client:
        await asyncio.sleep(0)  # (the handler is waiting: nothing to receive)
        await client.close(1001)
    assert await asyncio.wait_for(ended, 10) == 1001


async def test_a_pong_answers_its_ping_and_the_earlier_ones_and_unknown_pongs_are_ignored(start_server) -> None:
    app = App()
    results: asyncio.Future = asyncio.get_running_loop().create_future()

    @app.route("/p")
    async def handler(ws):
        first, second = await ws.ping(b"one"), await ws.ping("two")  # a str goes as its UTF-8
        with pytest.raises(ValueError, match="already waiting"):
            ws.ping(b"two")
        with pytest.raises(ValueError, match="at most 125 bytes"):
            ws.ping(b"x" * 126)  # refused before anything is sent or kept
        third = await ws.ping(bytearray(b"x" * 125))
        await ws.send("pinged")
        results.set_result(await asyncio.gather(first, second, third))
        await ws.recv()  # until the client goes

    server, port = await start_server(app)
    async with await RawWS.connect(port, "/p") as raw:
        pings = [await raw.recv_frame(10) for _ in range(3)]
        assert [(f.opcode, f.payload) for f in pings] == [(OP_PING, b"one"), (OP_PING, b"two"),
                                                          (OP_PING, b"x" * 125)]
        assert await raw.recv_message(10) == (OP_TEXT, b"pinged")
        await raw.send_frame(OP_PONG, b"nobody asked")  # unsolicited: allowed, ignored
        await raw.send_frame(OP_PONG, b"x" * 125)  # answers "one" and "two" too
        latencies = await asyncio.wait_for(results, 10)
        assert all(latency > 0 for latency in latencies)


async def test_unanswered_pings_fail_with_connection_closed_and_sync_code_stays_quiet(
        start_server, caplog: pytest.LogCaptureFixture) -> None:
    app = App()
    handler_saw: asyncio.Future = asyncio.get_running_loop().create_future()
    endpoint_pinged = asyncio.Event()

    @app.route("/awaits")
    async def awaits(ws):
        pong_waiter = await ws.ping()
        with contextlib.suppress(ConnectionClosed):
            await ws.recv()  # until the client drops: then the pong will never come
        try:
            await pong_waiter
        except ConnectionClosed as exc:
            handler_saw.set_result(exc.code)

    @app.route("/sync")
    class Sync(Endpoint):
        def on_open(self):
            self.session.ping()  # never awaited
            self.session.close()  # never awaited either
            endpoint_pinged.set()

    server, port = await start_server(app)
    caplog.set_level(logging.DEBUG)
    async with await RawWS.connect(port, "/awaits") as raw:  # never answers
        assert (await raw.recv_frame(10)).opcode == OP_PING
        raw.abort()
    assert await asyncio.wait_for(handler_saw, 10) == 1006
    async with await RawWS.connect(port, "/sync") as raw:
        await asyncio.wait_for(endpoint_pinged.wait(), 10)
        code, _ = await raw.expect_close(10)
        assert code == 1000
    while server.session_count:
        await asyncio.sleep(0.01)
    import gc

    gc.collect()  # an exception never retrieved would be logged when its future goes
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()], caplog.text


async def test_a_send_waiting_for_a_slow_client_that_vanishes_raises_connection_closed(start_server) -> None:
    """``await ws.send(x)`` waiting for room in the send buffer, when the client drops: the handler
    gets ConnectionClosed (1006), as with python-websockets, not a cancellation."""
    app = App()
    outcome: asyncio.Future = asyncio.get_running_loop().create_future()
    waiting = asyncio.Event()

    @app.route("/flood")
    async def flood(ws):
        try:
            while True:
                sent = ws.send(b"z" * 65536)
                if sent is not READY:
                    waiting.set()  # the buffer is full: this await waits for the client
                await sent
        except ConnectionClosed as exc:
            outcome.set_result(("closed", exc.code))
        except asyncio.CancelledError:
            outcome.set_result(("cancelled", None))
            raise

    server, port = await start_server(app)
    raw = await RawWS.connect(port, "/flood")  # reads nothing
    await asyncio.wait_for(waiting.wait(), 10)
    raw.abort()
    assert await asyncio.wait_for(outcome, 10) == ("closed", 1006)


async def test_a_send_cancelled_by_a_timeout_leaves_the_next_send_working(start_server) -> None:
    """``asyncio.timeout`` around ``await ws.send(x)`` to a client that is not reading: the next
    send waits again (it used to get the cancelled wait back and raise CancelledError), and once
    the client reads, everything arrives in order."""
    app = App()
    log: list = []
    client_reads = asyncio.Event()

    @app.route("/slow")
    async def slow(ws):
        sent = 0
        while True:  # fill the buffers until a send has to wait
            waiting = ws.send(b"%08d" % sent + b"z" * 65528)
            sent += 1
            if waiting is not READY:
                break
        try:
            async with asyncio.timeout(0.2):
                await waiting
        except TimeoutError:
            log.append("timed out")
        client_reads.set()
        await ws.send(b"%08d" % sent + b"z" * 65528)  # waits until the client has read enough
        await ws.send("end")
        log.append(("sent", sent + 1))

    server, port = await start_server(app)
    async with await RawWS.connect(port, "/slow") as raw:
        await asyncio.wait_for(client_reads.wait(), 10)
        seen = []
        while (message := await raw.recv_message(10)) != (OP_TEXT, b"end"):
            seen.append(int(message[1][:8]))
    assert log == ["timed out", ("sent", len(seen))]
    assert seen == list(range(len(seen)))


async def test_sends_nobody_awaits_while_the_client_is_slow_leave_nothing_behind(start_server) -> None:
    """Sync sends while the transport is paused, then a client that catches up: the session holds
    no waiting state afterwards (traffic leaves nothing per connection), and no exception is left
    unretrieved when such a connection dies."""
    app = App()
    sessions: list = []

    @app.route("/sync")
    class Pusher(Endpoint):
        def on_open(self):
            sessions.append(self.session)
            for _ in range(64):
                self.session.send(b"y" * 65536)  # never awaited; the transport pauses on the way
            self.session.send("end")

    server, port = await start_server(app)
    async with await RawWS.connect(port, "/sync") as raw:
        while await raw.recv_message(10) != (OP_TEXT, b"end"):
            pass
        session = sessions[0]
        while session.write_buffer_size:
            await asyncio.sleep(0.01)
        assert session._waiters is None  # noqa: SLF001 - what an idle session holds is the point
