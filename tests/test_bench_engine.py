"""`fastws bench` on its Cython engine, over real sockets, checked against what the server saw.

The server runs in the test's own event loop (a counting echo endpoint) while
`fastws bench` runs as a subprocess, so every figure the tool reports can be
compared with the server's own counts.  The engine's frame parser is driven
by a scripted server that splits its bytes wherever it likes.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import json
import os
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from fastws import App, Endpoint
from fastws.bench import native
from fastws.bench.common import parse_target

REPO = Path(__file__).resolve().parent.parent
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

pytestmark = pytest.mark.skipif(not native.available(), reason="the bench engine is not built (Linux only)")


def counting_app(
    opened: tuple[int, asyncio.Event] | None = None, closed: asyncio.Event | None = None
) -> tuple[App, collections.Counter[str]]:
    """/echo echoes and counts; /feed relays every message to every /feed subscriber.
    ``opened=(n, event)`` sets the event when n /echo connections have opened, ``closed`` when one closes."""
    stats: collections.Counter[str] = collections.Counter()

    class Echo(Endpoint):
        def on_open(self) -> None:
            stats["opened"] += 1
            if opened is not None and stats["opened"] == opened[0]:
                opened[1].set()

        def on_close(self, code: int, reason: str) -> None:
            if closed is not None:
                closed.set()

        def on_message(self, message: str | bytes) -> None:
            stats["received"] += 1
            stats["bytes"] += len(message)
            self.session.send(message)

    class Feed(Endpoint):
        def on_open(self) -> None:
            self.hub.join(self.session, "feed")

        def on_message(self, message: str | bytes) -> None:
            stats["published"] += 1
            self.hub.publish("feed", message)

    app = App()
    app.route("/echo")(Echo)
    app.route("/feed")(Feed)
    return app, stats


async def bench(*args: str, timeout: float = 90, prefix: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """Run `fastws bench ARGS` without blocking this loop (the server lives in it)."""
    proc = await asyncio.create_subprocess_exec(
        *prefix, sys.executable, "-m", "fastws", "bench", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(), err.decode()


async def bench_json(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "run.json"
    code, stdout, stderr = await bench(*args, "--quiet", "--json", str(out))
    assert code == 0, stderr + stdout
    return json.loads(out.read_text())["results"]


@pytest.mark.parametrize(("size", "text"), [(300, False), (70_000, True)])
async def test_throughput_echo_counts_match_the_server(start_server, tmp_path, size, text):
    app, stats = counting_app()
    _, port = await start_server(app, max_message_size=1 << 24)
    args = ["throughput", f"ws://127.0.0.1:{port}/echo", "-c", "4", "-i", "8", "-s", str(size),
            "-d", "0.5", "-w", "0.2", "--procs", "2"]
    res = await bench_json(tmp_path, *args, *(["--text"] if text else []))
    assert res["client_path"] == "native"
    assert res["connections_opened"] == stats["opened"] == 4 and res["failures"] == {}
    # Every message the client sent reached the server, and every echo came back before the close.
    assert res["sent_total"] == stats["received"] == res["received_total"]
    assert stats["bytes"] == stats["received"] * size
    assert 0 < res["messages"] <= res["received_total"] and res["drained"] and res["dropped"] == 0
    assert res["msgs_per_s"] == pytest.approx(
        sum(p["messages"] / p["seconds"] for p in res["per_process"]), rel=1e-3
    )
    # --procs 2: two client processes, both carrying traffic.
    assert len(res["per_process"]) == 2 and all(p["messages"] > 0 for p in res["per_process"])
    assert len(res["client_cpu_percent"]) == 2 and res["server_cpu_percent"] is not None


QUOTE = ('{"type": "quote", "seq": 12345, "symbol": "NVDA", "exchange": "NASDAQ", "currency": "USD", '
         '"bid": 411.27, "ask": 411.29, "last": 411.28, "bid_size": 1234, "volume": 8812345, '
         '"change_percent": -1.234, "flags": ["realtime", "level1"], "note": "\u00e9t\u00e9 \u2713"}')


@pytest.mark.parametrize("context_takeover", [False, True])
async def test_compressed_throughput_is_checked_and_counted(start_server, tmp_path, context_takeover):
    # --compression on the engine: the message goes compressed (RSV1), the server inflates it to exactly
    # the file's text, and the checked echo is inflated by the client before it is compared.
    app, stats = counting_app()
    _, port = await start_server(app, compression=True, compression_no_context_takeover=not context_takeover)
    message = tmp_path / "quote.json"
    message.write_text(QUOTE, encoding="utf-8")
    res = await bench_json(tmp_path, "throughput", f"ws://127.0.0.1:{port}/echo", "--compression", "--text",
                           "--message-file", str(message), "-c", "3", "-i", "4", "-d", "0.4", "-w", "0.1")
    assert res["client_path"] == "native" and res["failures"] == {} and res["connections_opened"] == 3
    assert res["sent_total"] == stats["received"] == res["received_total"] and res["dropped"] == 0
    assert stats["bytes"] == stats["received"] * len(QUOTE)  # len(str): every message arrived as this text
    assert res["messages"] > 0 and res["drained"]


async def test_a_compressed_echo_that_differs_is_caught(start_server, tmp_path):
    class Almost(Endpoint):
        def on_message(self, message: str | bytes) -> None:
            self.session.send(message[:-1] + "?")  # same length, compressed: only inflating tells

    app = App()
    app.route("/echo")(Almost)
    _, port = await start_server(app, compression=True)
    message = tmp_path / "quote.json"
    message.write_text(QUOTE, encoding="utf-8")
    code, _, stderr = await bench("throughput", f"ws://127.0.0.1:{port}/echo", "--compression", "--text",
                                  "--message-file", str(message), "-c", "2", "-d", "0.2", "-w", "0", "--quiet")
    assert code == 1 and "2 connection(s) did not get their message echoed back unchanged" in stderr


async def test_compression_against_a_server_without_it_is_a_clear_error(start_server):
    app, stats = counting_app()
    _, port = await start_server(app)
    code, _, stderr = await bench("throughput", f"ws://127.0.0.1:{port}/echo", "--compression", "-c", "2",
                                  "-d", "0.2", "-w", "0", "--quiet")
    assert code == 1 and "server declined permessage-deflate" in stderr
    assert stats["received"] == 0  # no compressed frame reached a server that did not agree to them


async def test_raw_throughput_counts_match_the_bytes_echoed(tmp_path):
    echoed = collections.Counter()

    class RawEcho(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            echoed["bytes"] += len(data)
            self.transport.write(data)  # type: ignore[attr-defined]

    server = await asyncio.get_running_loop().create_server(RawEcho, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        res = await bench_json(tmp_path, "throughput", f"tcp://127.0.0.1:{port}", "--raw", "-c", "2", "-i", "4",
                               "-s", "1000", "-d", "0.4", "-w", "0.1")
    finally:
        server.close()
    assert res["messages"] > 0 and res["drained"]
    assert res["sent_total"] * 1000 == echoed["bytes"] == res["received_total"] * 1000


async def test_latency_stops_at_the_count_and_records_every_round_trip(start_server, tmp_path):
    app, stats = counting_app()
    _, port = await start_server(app)
    res = await bench_json(tmp_path, "latency", f"ws://127.0.0.1:{port}/echo", "-c", "3", "--count", "300",
                           "-d", "60", "-w", "0")
    assert res["round_trips"] == 300 and res["seconds"] < 60
    assert sum(c for _, _, c in res["histogram"]["buckets"]) == 300
    lat = res["latency_us"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p99"] <= lat["max"]
    assert stats["received"] >= 300


async def test_connections_hold_answer_pings_and_still_echo(start_server, tmp_path):
    # The server pings after 0.2 s of silence and drops a connection that stays silent 1.5 s after a ping:
    # held 3 s, a client that does not answer pings loses every connection.
    app, stats = counting_app()
    _, port = await start_server(app, ping_interval=0.2, ping_timeout=1.5)
    res = await bench_json(tmp_path, "connections", f"ws://127.0.0.1:{port}/echo", "-c", "60", "-d", "3",
                           "--procs", "2", "--concurrency", "8")
    assert res["opened"] == res["target"] == 60 == stats["opened"] and res["failed"] == 0
    assert res["processes"] == 2 and res["ramp"][-1][1] == 60
    assert res["dropped_during_hold"] == 0
    assert res["pings_received"] >= 60  # every connection was pinged at least once, and kept
    assert res["verify"] == {"checked": True, "sent": 60, "answered": 60, "silent": 0}
    assert stats["received"] == 61  # the probe, then one message per connection
    srv = res["server"]
    assert srv["detected"] and srv["pids"] == [os.getpid()] and srv["bytes_per_connection"] > 0


async def test_connections_cost_the_client_little_memory(start_server, tmp_path):
    app, _ = counting_app()
    _, port = await start_server(app)
    res = await bench_json(tmp_path, "connections", f"ws://127.0.0.1:{port}/echo", "-c", "3000", "-d", "0",
                           "--procs", "1", "--no-verify")
    assert res["opened"] == 3000 and res["verify"] == {"checked": False}
    assert 0 < res["client"]["bytes_per_connection"] < 1024  # a C struct each, no Python object


async def test_connections_report_the_first_limit(tmp_path):
    # Nothing listens: every attempt is refused, the ramp stops after --max-failures per process.
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, stderr = await bench("connections", f"ws://127.0.0.1:{port}/echo", "-c", "50", "-d", "0",
                                  "--max-failures", "20", "--quiet")
    assert code == 1 and "ECONNREFUSED" in stderr


async def test_broadcast_on_a_feed_reaches_every_subscriber(start_server, tmp_path):
    app, stats = counting_app()
    _, port = await start_server(app)
    res = await bench_json(tmp_path, "broadcast", f"ws://127.0.0.1:{port}/feed", "-c", "40", "--count", "50",
                           "--rate", "0", "--procs", "2", "--grace", "20", "-d", "30")
    assert res["subscribers"] == 40 and res["messages_sent"] == 50 == stats["published"]
    assert res["deliveries"] == res["expected_deliveries"] == 40 * 50 and res["lost"] == 0
    assert res["complete_messages"] == 50
    lat, fan = res["latency_us"], res["fanout_us"]
    assert 0 < lat["p50"] <= lat["max"] and fan["max"] == pytest.approx(lat["max"], rel=0.01)
    assert fan["p50"] >= lat["p50"] * 0.99  # the last delivery of a message comes after the typical one


async def test_handshake_cycles_match_the_server(start_server, tmp_path):
    app, stats = counting_app()
    _, port = await start_server(app)
    res = await bench_json(tmp_path, "handshake", f"ws://127.0.0.1:{port}/echo", "-c", "4", "--count", "120",
                           "-d", "60")
    assert res["handshakes"] == 120 == stats["opened"]
    assert res["failures"] == {} and res["unclean_close"] == 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
async def test_client_bound_warning_when_the_client_is_starved(start_server, tmp_path):
    # Once connected, the client (at nice 19) shares its CPU with a busy loop while the server (this
    # process) has another CPU to itself: the client waits for its CPU nearly all the time, and says so.
    all_open, first_close = asyncio.Event(), asyncio.Event()
    app, _ = counting_app(opened=(50, all_open), closed=first_close)
    _, port = await start_server(app)
    cpus = sorted(os.sched_getaffinity(0))
    client_cpu, server_cpu = str(cpus[-1]), cpus[0]
    os.sched_setaffinity(0, {server_cpu})
    out = tmp_path / "t.json"
    run = asyncio.ensure_future(bench("throughput", f"ws://127.0.0.1:{port}/echo", "-c", "50", "-i", "32",
                                      "-d", "1", "-w", "0.3", "--pin", client_cpu, "--json", str(out),
                                      prefix=("nice", "-n", "19")))
    hog = None
    try:
        await asyncio.wait_for(all_open.wait(), 60)
        hog = await asyncio.create_subprocess_exec("taskset", "-c", client_cpu, sys.executable, "-c",
                                                   "while True: pass")
        await asyncio.wait_for(first_close.wait(), 60)  # the window is over: let the client finish
        hog.kill()
        code, stdout, stderr = await run
    finally:
        os.sched_setaffinity(0, set(cpus))
        if hog is not None:
            if hog.returncode is None:
                hog.kill()
            await hog.wait()
    assert code == 0, stderr
    res = json.loads(out.read_text())["results"]
    assert res["client_bound"] and res["limit"].startswith(("client-bound", "both saturated")), res["client_load"]
    assert "warning" in stdout and "client's limit" in " ".join(stdout.split())


# -- the engine's frame parser, against a scripted server ----------------------------------------------------


def server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack("!H", n)
    else:
        head += bytes([127]) + struct.pack("!Q", n)
    return head + payload


def client_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, unmasked payload) of the whole masked frames in data."""
    out = []
    while len(data) >= 6:
        n, pos = data[1] & 0x7F, 2
        if n == 126:
            n, pos = struct.unpack("!H", data[2:4])[0], 4
        elif n == 127:
            n, pos = struct.unpack("!Q", data[2:10])[0], 10
        assert data[1] & 0x80, "client frames are masked"
        mask, body = data[pos : pos + 4], data[pos + 4 : pos + 4 + n]
        if len(body) < n:
            break
        out.append((data[0] & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(body))))
        data = data[pos + 4 + n :]
    return out


class Scripted(asyncio.Protocol):
    """Answers the upgrade (or not, per ``reply``), then lets the test write bytes; keeps what the client sent."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.buffer = b""
        self.upgraded = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.upgraded.done() or b"\r\n\r\n" not in self.buffer:
            return
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        if self.reply == "silent":
            return
        if self.reply == "503":
            self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
        elif self.reply == "eof":
            self.transport.close()
        else:
            if self.reply == "bad accept":
                accept = base64.b64encode(b"x" * 20)
            extension = {"deflate": b"Sec-WebSocket-Extensions: permessage-deflate\r\n",
                         "deflate, 9-bit client window":
                             b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=9\r\n",
                         "deflate, 12-bit client window":
                             b'Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits="12"\r\n',
                         }.get(self.reply, b"")
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\n" + extension +
                                 b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        self.upgraded.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def scripted_server(reply: str = "101") -> tuple[Any, list[Scripted]]:
    protocols: list[Scripted] = []

    def factory() -> Scripted:
        protocols.append(Scripted(reply))
        return protocols[-1]

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return server, protocols


async def test_engine_parses_frames_split_anywhere_and_answers_pings_and_close():
    server, protocols = await scripted_server()
    port = server.sockets[0].getsockname()[1]
    engine = native.open_engine(parse_target(f"ws://127.0.0.1:{port}/x"), payload=b"")
    client = native.NativeClient(engine)
    try:
        engine.ramp(1)
        assert await client.wait(lambda: engine.ramp_done, 10) and engine.live == 1
        (peer,) = protocols
        stream = b"".join([
            server_frame(0x1, "é".encode() * 100),  # 16-bit length
            server_frame(0x9, b"ping-1"),
            server_frame(0x2, b"part-1", fin=False),  # a fragmented message, a ping in the middle
            server_frame(0x9, b"ping-2"),
            server_frame(0x0, b"part-2", fin=False),
            server_frame(0x0, b"part-3"),
            server_frame(0x2, bytes(70_000)),  # 64-bit length
            server_frame(0x2, b""),  # empty message
        ])
        sent = engine.bytes_received
        # One byte per read for the first 400 bytes (every header and small payload split everywhere),
        # then bigger pieces: each waits until the engine has read the previous one.
        pieces = [stream[i : i + 1] for i in range(400)] + [stream[i : i + 997] for i in range(400, len(stream), 997)]
        for piece in pieces:
            peer.transport.write(piece)
            sent += len(piece)
            assert await client.wait(lambda s=sent: engine.bytes_received >= s, 10)
        assert engine.received == 4 and engine.pings == 2 and engine.protocol_errors == 0
        pongs = [p for op, p in client_frames(peer.buffer) if op == 0xA]
        assert pongs == [b"ping-1", b"ping-2"]
        # The server closes: the engine answers with the same code and counts a dropped connection.
        peer.transport.write(server_frame(0x8, struct.pack("!H", 1001) + b"bye"))
        assert await client.wait(lambda: any(op == 0x8 for op, _ in client_frames(peer.buffer)), 10)
        assert client_frames(peer.buffer)[-1] == (0x8, struct.pack("!H", 1001))
        peer.transport.close()
        assert await client.wait(lambda: engine.live == 0, 10)
        assert engine.dropped == 1 and engine.closed_clean == 1
    finally:
        client.detach()
        server.close()


async def test_engine_inflates_a_checked_echo_split_over_reads_and_refuses_misplaced_rsv1():
    server, protocols = await scripted_server("deflate, 12-bit client window")  # (quoted: as RFC 7692 allows)
    port = server.sockets[0].getsockname()[1]
    text = QUOTE * 3
    engine = native.open_engine(parse_target(f"ws://127.0.0.1:{port}/x"), payload=text, compression=True)
    client = native.NativeClient(engine)
    try:
        engine.ramp(1)
        assert await client.wait(lambda: engine.ramp_done, 10) and engine.live == 1
        (peer,) = protocols
        engine.start_check()
        assert await client.wait(lambda: len(peer.buffer) > 0, 10)
        # What the engine sent: one text frame with RSV1, inflating to the message.
        assert peer.buffer[0] == 0xC1
        (_, sent), = client_frames(peer.buffer)
        assert zlib.decompressobj(-15).decompress(sent + b"\x00\x00\xff\xff") == text.encode()
        deflated = native.deflate_message(text.encode())
        reply = bytes([0xC1]) + server_frame(0x1, deflated)[1:]  # the echo, compressed (RSV1)
        received = engine.bytes_received
        for i in range(len(reply)):  # one byte per read: the compressed message is gathered, then inflated
            peer.transport.write(reply[i : i + 1])
            assert await client.wait(lambda r=received + i + 1: engine.bytes_received >= r, 10)
        assert engine.checks_good == 1 and engine.checks_bad == 0
        # RSV1 on a continuation frame is a protocol error even with the extension.
        peer.transport.write(bytes([0x41]) + server_frame(0x1, b"x", fin=False)[1:]
                             + bytes([0xC0]) + server_frame(0x0, b"y")[1:])
        assert await client.wait(lambda: engine.live == 0, 10)
        assert engine.protocol_errors == 1
    finally:
        client.detach()
        server.close()


@pytest.mark.parametrize("frame", [b"\x82\x81abcd\x00",  # masked: servers must not mask
                                   b"\xc1\x01x"],  # RSV1 without permessage-deflate agreed
                         ids=["masked", "rsv1 without the extension"])
async def test_engine_refuses_frames_a_server_must_not_send(frame):
    server, protocols = await scripted_server()
    port = server.sockets[0].getsockname()[1]
    engine = native.open_engine(parse_target(f"ws://127.0.0.1:{port}/x"))
    client = native.NativeClient(engine)
    try:
        engine.ramp(1)
        assert await client.wait(lambda: engine.ramp_done, 10) and engine.live == 1
        protocols[0].transport.write(frame)
        assert await client.wait(lambda: engine.live == 0, 10)
        assert engine.protocol_errors == 1 and engine.received == 0
    finally:
        client.detach()
        server.close()


NO_DEFLATE = "server declined permessage-deflate or limited the client's window below 12 bits"


@pytest.mark.parametrize(
    ("reply", "cause", "compression"),
    [("503", "HTTP 503", False), ("bad accept", "invalid handshake response", False),
     ("eof", "closed during handshake", False), ("silent", "timeout", False),
     ("101", NO_DEFLATE, True), ("deflate, 9-bit client window", NO_DEFLATE, True)],
)
async def test_engine_classifies_failed_handshakes(reply, cause, compression):
    server, _ = await scripted_server(reply)
    port = server.sockets[0].getsockname()[1]
    engine = native.open_engine(parse_target(f"ws://127.0.0.1:{port}/x"), open_timeout=0.3, payload=QUOTE,
                                compression=compression)
    client = native.NativeClient(engine)
    try:
        engine.ramp(3, concurrency=3, max_failures=3)
        assert await client.wait(lambda: engine.ramp_done, 10)
        # Attempts under way when the third failure stops the ramp still finish (and fail) too.
        assert engine.live == 0 and list(engine.failures()) == [cause] and engine.failed >= 3
        assert engine.stopped_by == "failures"
        assert engine.first_failure()["cause"] == cause
    finally:
        client.detach()
        server.close()


def test_engine_sha1_and_frames_agree_with_the_wire_core():
    from fastws._frame import FrameReader, accept_key
    from fastws.bench import _loadgen

    for _ in range(50):
        key = base64.b64encode(os.urandom(16)).decode()
        assert _loadgen.accept_for(key) == accept_key(key)
    got: list[Any] = []

    class Handler:
        def on_message(self, data: Any) -> None:
            got.append(data)

        def on_ping(self, payload: bytes) -> None: ...
        def on_pong(self, payload: bytes) -> None: ...
        def on_close(self, code: int, reason: str) -> None: ...

    reader = FrameReader(Handler(), is_server=True, max_message_size=0)
    sizes = (0, 1, 125, 126, 65535, 65536, 100_003)
    for n in sizes:
        reader.feed(_loadgen.build_frame(0x2, os.urandom(4)[:1] * n, os.urandom(4)))
    assert [len(m) for m in got] == list(sizes)


def test_compare_marks_client_bound_rows():
    import runpy

    limit_cell = runpy.run_path(str(REPO / "bench" / "compare.py"))["limit_cell"]
    assert limit_cell({"client_bound": True, "limit": "client-bound: client busy 97 %"}) == "**client-bound**"
    assert limit_cell({"client_bound": False, "limit": "server-bound: server 99 %"}) == "server"
    assert limit_cell({"client_bound": True, "limit": "both saturated: client busy 95 %"}) == "both"
    assert limit_cell({}) == "—"
