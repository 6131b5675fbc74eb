"""The keepalive wheel (fastws._frame.KeepaliveWheel) with a clock the test moves, against plain
members; test_robustness.py and test_lifecycle.py check keepalive over real sockets."""

from __future__ import annotations

from fastws._frame import KeepaliveWheel


class Member:
    """What the wheel needs of a member that is not a server session."""

    __slots__ = ("closed", "last_read", "last_message", "pings", "answered", "ka_bucket", "ka_prev", "ka_next")

    def __init__(self, now: float = 0.0) -> None:
        self.closed = False
        self.last_read = self.last_message = now
        self.pings: list[bytes] = []
        self.answered = 0
        self.ka_bucket = self.ka_prev = self.ka_next = None

    def send_frame(self, frame: bytes) -> None:
        self.pings.append(frame)


def run_until(wheel: KeepaliveWheel, start: float, end: float, step: float = 0.25, members=(),
              answer: bool = True) -> tuple[list, list]:
    """Tick the wheel from start to end; members answer each ping at once (a read) if ``answer``."""
    timed_out: list = []
    idle: list = []
    t = start
    while t < end:
        t += step
        out, quiet = wheel.run(t)
        timed_out += out
        idle += quiet
        if answer:
            for m in members:
                if len(m.pings) > m.answered:
                    m.answered = len(m.pings)
                    m.last_read = t  # the pong arrived
    return timed_out, idle


def test_a_silent_member_is_pinged_once_per_interval_and_never_times_out_while_answering() -> None:
    wheel = KeepaliveWheel(0.25, 0.0, interval=20.0, timeout=20.0)
    members = [Member() for _ in range(100)]
    for m in members:
        wheel.add(m, 0.0)
    assert wheel.size == 100
    timed_out, idle = run_until(wheel, 0.0, 100.0, members=members)
    assert timed_out == [] and idle == []
    for m in members:
        assert 4 <= len(m.pings) <= 6, len(m.pings)  # ~ every 18-20 s over 100 s
    assert wheel.pings == sum(len(m.pings) for m in members)


def test_pings_are_spread_not_a_burst() -> None:
    wheel = KeepaliveWheel(0.1, 0.0, interval=20.0, timeout=20.0)
    members = [Member() for _ in range(1000)]  # all connected at once
    for m in members:
        wheel.add(m, 0.0)
    first_ping: dict[int, float] = {}
    t = 0.0
    while t < 21:
        t += 0.1
        wheel.run(t)
        for i, m in enumerate(members):
            if m.pings and i not in first_ping:
                first_ping[i] = t
    times = sorted(first_ping.values())
    assert len(times) == 1000
    assert times[-1] - times[0] >= 1.5  # spread over ~2 s (10 % of the interval), not one tick


def test_a_member_that_does_not_answer_times_out() -> None:
    wheel = KeepaliveWheel(0.25, 0.0, interval=5.0, timeout=3.0)
    dead, alive = Member(), Member()
    wheel.add(dead, 0.0)
    wheel.add(alive, 0.0)
    timed_out, _ = run_until(wheel, 0.0, 10.0, members=[alive], answer=True)
    assert timed_out == [dead] and len(dead.pings) == 1
    assert dead.ka_bucket is None  # out of the wheel
    assert wheel.size == 1


def test_without_a_timeout_an_unanswered_ping_is_repeated_every_interval() -> None:
    wheel = KeepaliveWheel(0.25, 0.0, interval=5.0, timeout=None)
    quiet = Member()
    wheel.add(quiet, 0.0)
    timed_out, _ = run_until(wheel, 0.0, 26.0, answer=False)
    assert timed_out == [] and 5 <= len(quiet.pings) <= 6


def test_traffic_means_no_ping() -> None:
    wheel = KeepaliveWheel(0.25, 0.0, interval=5.0, timeout=5.0)
    busy = Member()
    wheel.add(busy, 0.0)
    t = 0.0
    while t < 30:
        t += 0.25
        busy.last_read = t  # bytes all the time
        wheel.run(t)
    assert busy.pings == []


def test_idle_timeout_counts_data_messages_only() -> None:
    wheel = KeepaliveWheel(0.25, 0.0, interval=2.0, timeout=2.0, idle=7.0)
    m = Member()
    wheel.add(m, 0.0)
    _, idle = run_until(wheel, 0.0, 10.0, members=[m])  # it answers pings, but sends no message
    assert idle == [m] and len(m.pings) >= 2


def test_removed_and_closed_members_are_left_alone() -> None:
    wheel = KeepaliveWheel(0.25, 0.0, interval=2.0, timeout=2.0)
    a, b, c = Member(), Member(), Member()
    for m in (a, b, c):
        wheel.add(m, 0.0)
    wheel.remove(b)
    c.closed = True  # its close deadline ends it
    timed_out, _ = run_until(wheel, 0.0, 10.0, members=[a])
    assert b.pings == [] and c.pings == [] and timed_out == []
    assert a.pings and wheel.size == 1
