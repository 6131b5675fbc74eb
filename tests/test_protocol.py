"""fastws.protocol without sockets: the close state machine against a recording shell, the
keepalive decision, and the inbox.  (test_lifecycle.py checks the same behaviour over real sockets.)"""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from fastws.errors import ConnectionClosed
from fastws.protocol import (
    CLOSED,
    CLOSING,
    OPEN,
    Inbox,
    WebSocketProtocol,
    truncate_reason,
)


class Recorder(WebSocketProtocol):
    """Records what the state machine asks for."""

    __slots__ = ("did", "timers", "close_waits", *WebSocketProtocol.FIELDS)

    def __init__(self) -> None:
        self._init_protocol()
        self.did: list[tuple] = []
        self.timers: list[Timer] = []
        self.close_waits = True  # what _close_transport answers: data still queued (or TLS)

    def _write_close(self, payload: bytes) -> None:
        self.did.append(("close frame", payload))

    def _drop_messages(self) -> None:
        self.did.append(("drop messages",))

    def _discard_input(self) -> None:
        self.did.append(("discard input",))

    def _keep_reading(self) -> None:
        self.did.append(("keep reading",))

    def _shutdown_write(self) -> None:
        self.did.append(("FIN",))

    def _close_transport(self) -> bool:
        self.did.append(("close TCP",))
        return self.close_waits

    def _abort_transport(self) -> None:
        self.did.append(("abort TCP",))

    def _call_later(self, delay: float, callback):  # type: ignore[no-untyped-def]
        timer = Timer(delay, callback)
        self.timers.append(timer)
        return timer


class ServerShell(Recorder):
    __slots__ = ()
    is_server = True


class ClientShell(Recorder):
    __slots__ = ()
    is_server = False


def Shell(is_server: bool) -> Recorder:  # noqa: N802 - a factory named like the class it stands for
    return ServerShell() if is_server else ClientShell()


class Timer:
    def __init__(self, delay: float, callback) -> None:  # type: ignore[no-untyped-def]
        self.delay, self.callback, self.cancelled = delay, callback, False

    def cancel(self) -> None:
        self.cancelled = True


@pytest.mark.parametrize("is_server", [True, False])
def test_peer_close_is_echoed_and_bounded(is_server: bool) -> None:
    p = Shell(is_server)
    p.receive_close(4000, "bye")
    assert p._state == CLOSING and p.close_code == 4000 and p.closed_by == "remote"
    assert p.did[0] == ("close frame", b"\x0f\xa0")  # the code echoed, the reason not
    # the server closes TCP first; a client waits for the server's FIN
    assert (("close TCP",) in p.did) == is_server
    assert [t.delay for t in p.timers] == [5.0]
    if not is_server:
        p.receive_eof()
        assert p.did[-1] == ("close TCP",)
    assert p.connection_ended() and p._state == CLOSED and p.timers[0].cancelled
    assert p.closed_cleanly and p.close_code == 4000
    assert not p.connection_ended()  # once


def test_a_server_close_that_ends_at_once_arms_no_deadline() -> None:
    """Nothing queued on plain TCP: closing ends the connection now, so no timer is made (one per
    closing connection saved); queued data (or TLS) keeps the deadline that bounds the wait."""
    p = Shell(True)
    p.close_waits = False
    p.receive_close(1000, "")
    assert ("close TCP",) in p.did and p.timers == []
    assert p.connection_ended() and p.closed_cleanly


def test_an_empty_close_frame_is_echoed_empty() -> None:
    p = Shell(True)
    p.receive_close(1005, "")
    assert p.did[0] == ("close frame", b"") and p.close_code == 1005


@pytest.mark.parametrize("is_server", [True, False])
def test_our_close_keeps_reading_until_the_answer(is_server: bool) -> None:
    p = Shell(is_server)
    p.close(1001, "going")
    assert p.did == [("close frame", b"\x03\xe9going"), ("keep reading",), ("drop messages",)]
    assert p.closed and p.close_code == 1001 and p.closed_by == "local"
    p.close(1000)  # a second close does nothing
    assert len(p.did) == 3 and len(p.timers) == 1
    p.receive_close(1000, "")  # the peer answers with another code: ours stays the reason
    assert p.close_code == 1001 and p.closed_cleanly
    assert (p.did[-1] == ("close TCP",)) == is_server


def test_the_deadline_aborts() -> None:
    p = Shell(True)
    p.close()
    p.timers[0].callback()
    assert p.did[-1] == ("abort TCP",)


@pytest.mark.parametrize("is_server", [True, False])
def test_fail_sends_once_discards_and_half_closes(is_server: bool) -> None:
    p = Shell(is_server)
    p.fail(1009, "x" * 200)
    (kind, payload), *rest = p.did
    assert kind == "close frame" and payload[:2] == b"\x03\xf1" and len(payload) == 2 + 123
    assert ("discard input",) in rest
    assert (("FIN",) in rest) == is_server  # then wait for the peer's EOF
    p.fail(1002, "again")  # a second failure sends nothing more
    assert [d for d in p.did if d[0] == "close frame"] == [("close frame", payload)]
    p.receive_eof()
    assert p.did[-1] == ("close TCP",) and len(p.timers) == 1


def test_fail_of_a_dead_peer_closes_at_once() -> None:
    p = Shell(True)
    p.fail(1011, "keepalive ping timeout", peer_alive=False)
    assert p.did[-1] == ("close TCP",) and ("FIN",) not in p.did


def test_invalid_codes() -> None:
    p = Shell(True)
    with pytest.raises(ValueError):
        p.close(1006)  # reserved: never on the wire
    with pytest.raises(ValueError):
        p.close(1000, "é" * 62)  # 124 bytes
    assert p._state == OPEN and p.did == []
    p.fail(1005, "internal mistake")  # fail() never raises: an unusable code becomes 1011
    assert p.did[0] == ("close frame", b"\x03\xf3")


def test_eof_without_close_is_1006() -> None:
    p = Shell(True)
    p.receive_eof()
    assert p.did == [("close TCP",)] and p.close_code == 1006 and p.closed_by == ""
    assert p.connection_ended() and not p.closed_cleanly


def test_truncate_reason_keeps_characters_whole() -> None:
    assert truncate_reason("ü" * 70) == "ü" * 61  # 122 bytes: the 62nd would need 124
    assert truncate_reason("short") == "short"


def test_connection_closed_error_carries_both_frames() -> None:
    p = Shell(True)
    p.fail(1009, "too big")
    exc = p.connection_closed_error()
    assert isinstance(exc, ConnectionClosed) and exc.code == 1009 and exc.sent == (1009, "too big")


# -- the inbox ---------------------------------------------------------------------------------------


async def test_inbox_flow_control_and_end() -> None:
    flow: list[bool] = []
    inbox = Inbox(asyncio.get_running_loop(), flow, list.append, max_messages=4, max_bytes=10)
    for m in ("aa", "bb", "cc"):
        inbox.put(m)
    assert flow == [] and inbox.queued_bytes == 6
    inbox.put("dddd")  # 10 bytes: full
    assert flow == [False] and inbox.full
    assert await inbox.get() == "aa"
    assert await inbox.get() == "bb"
    assert flow == [False]  # 6 bytes left: more than half of 10
    assert await inbox.get() == "cc"
    assert flow == [False, True]  # half drained: read again
    getter = asyncio.ensure_future(asyncio.gather(inbox.get(), inbox.get()))
    await asyncio.sleep(0)
    inbox.end(ConnectionClosed(1000))
    with pytest.raises(ConnectionClosed):
        await getter  # the queued one comes first, then the end
    assert len(inbox) == 0


async def test_inbox_get_without_messages_waits() -> None:
    inbox = Inbox(asyncio.get_running_loop(), None, lambda owner, more: None, max_messages=4, max_bytes=0)
    waiter = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    assert inbox.waiting and not waiter.done()
    inbox.put(b"x")
    assert await waiter == b"x"


async def test_a_wait_for_a_message_is_cancellable_and_loses_nothing() -> None:
    """An empty inbox hands out its one reusable waiting awaitable: timeouts and cancellation end the
    wait (the task sees CancelledError / TimeoutError), and a message that comes afterwards is
    still the next one; ensure_future() runs the wait in a task (it is not a Future itself)."""
    loop = asyncio.get_running_loop()
    inbox = Inbox(loop, None, lambda owner, more: None, max_messages=16, max_bytes=0)
    for _ in range(3):
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(inbox.get(), 0.01)
        assert not inbox.waiting
    waiter = asyncio.ensure_future(anext(inbox))
    assert isinstance(waiter, asyncio.Task)
    await asyncio.sleep(0)
    assert inbox.waiting
    waiter.cancel("bye")
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not inbox.waiting
    inbox.put("after")
    assert await inbox.get() == "after"
    # woken, then cancelled before it ran: the message stays queued for the next wait
    waiter = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.put("kept")
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert len(inbox) == 1 and await inbox.get() == "kept"


async def test_only_one_coroutine_waits_for_the_next_message() -> None:
    inbox = Inbox(asyncio.get_running_loop(), None, lambda owner, more: None, max_messages=16, max_bytes=0)
    first = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="another coroutine is already waiting for the next message"):
        await inbox.get()
    inbox.put(b"m")
    assert await first == b"m"
    inbox.put(b"n")
    assert await inbox.get() == b"n"  # that one has finished waiting: the next wait is fine


async def test_a_wait_driven_by_hand_parks_then_returns_the_message() -> None:
    """The iterator protocol without a task: the first step parks (yields the awaitable, as a Future
    does), a later one returns the message that came meanwhile."""
    inbox = Inbox(asyncio.get_running_loop(), None, lambda owner, more: None, max_messages=16, max_bytes=0)
    step = inbox.get().__await__()
    parked = step.send(None)
    assert parked._asyncio_future_blocking and not parked.done()
    assert not asyncio.isfuture(parked)  # a class that looked like a Future would fool ensure_future()
    # the Future protocol a Task uses, as a Task calls it (get_loop/add_done_callback are the object
    # itself, called: no bound method per wait); the message still comes from resuming the await
    assert parked.get_loop() is asyncio.get_running_loop()
    woken: list = []
    parked.add_done_callback(woken.append, context=contextvars.copy_context())
    with pytest.raises(TypeError, match="add_done_callback"):
        parked.add_done_callback(woken.append, loop=None)
    with pytest.raises(TypeError, match="add_done_callback"):
        parked.add_done_callback(woken.append, woken.append)
    with pytest.raises(RuntimeError, match="already waiting"):
        parked.add_done_callback(woken.append)
    inbox.put("late")
    await asyncio.sleep(0)
    assert len(woken) == 1 and woken[0].result() is None  # handed a finished Future, as a Task's wake-up is
    assert parked.remove_done_callback(woken.append) == 0
    with pytest.raises(StopIteration) as stopped:
        step.send(None)
    assert stopped.value.value == "late"
    step = inbox.get().__await__()
    step.send(None)
    with pytest.raises(KeyError):
        step.throw(KeyError("thrown in"))
    assert not inbox.waiting


@pytest.mark.parametrize("task_class", ["c", "python"])
async def test_a_wait_wakes_and_cancels_under_either_task_implementation(task_class: str) -> None:
    """A woken task is handed a finished Future (the C Task's fast path), a cancelled one the
    wait itself: both of asyncio's Task classes must get the message, or the CancelledError."""
    loop = asyncio.get_running_loop()
    task_type = asyncio.tasks._CTask if task_class == "c" else asyncio.tasks._PyTask
    inbox = Inbox(loop, None, lambda owner, more: None, max_messages=16, max_bytes=0)

    async def consume(count: int) -> list:
        return [await inbox.get() for _ in range(count)]

    consumer = task_type(consume(3), loop=loop)
    for message in ("a", b"b", "c"):
        await asyncio.sleep(0)  # the consumer parks before each message comes
        assert inbox.waiting
        inbox.put(message)
    assert await consumer == ["a", b"b", "c"]
    parked = task_type(consume(1), loop=loop)
    await asyncio.sleep(0)
    parked.cancel("going away")
    with pytest.raises(asyncio.CancelledError):
        await parked
    assert not inbox.waiting
    inbox.put("after")  # nothing lost: the next wait gets it
    assert await task_type(consume(1), loop=loop) == ["after"]


async def test_a_queued_message_comes_back_in_an_awaitable_that_is_already_done() -> None:
    """recv() / async for on a non-empty inbox return a finished awaitable (no coroutine, no
    future): every way of awaiting it gets the message, once."""
    inbox = Inbox(asyncio.get_running_loop(), None, lambda owner, more: None, max_messages=16, max_bytes=0)
    for m in (b"a", "b", b"c", "d", b"e", "f"):
        inbox.put(m)
    assert await inbox.get() == b"a"
    assert await anext(inbox) == "b"
    assert await asyncio.wait_for(inbox.get(), 1) == b"c"
    assert await asyncio.gather(inbox.get(), anext(inbox)) == ["d", b"e"]
    step = inbox.get().__await__()  # the iterator protocol, as a hand-written event loop drives it
    with pytest.raises(StopIteration) as stopped:
        step.send(None)
    assert stopped.value.value == "f"
    with pytest.raises(StopIteration) as again:
        next(step)
    assert again.value.value is None  # handed out once
    inbox.end(ConnectionClosed(1000))
    with pytest.raises(StopAsyncIteration):
        await anext(inbox)
    with pytest.raises(ConnectionClosed):
        await inbox.get()
