"""Socket-level fuzzing: seeded random and mutated frame streams and handshakes against a running
server, within a fixed time budget (FASTWS_FUZZ_SECONDS, 10 s by default).

Every case is checked, not just survived: the reference reader in oracles.py says what the server
must answer to each frame stream (echoes, pongs, the echoed close, or the close code of the first
violation), and every handshake must get a well-formed answer.  Afterwards the server still serves
a normal client, holds no extra file descriptors and has not grown.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import re
import struct
import time

import pytest

import oracles
from compat import deadline
from fastws import App, Endpoint
from wsraw import parse_response_head, wait_for, wait_no_connections

BUDGET = float(os.environ.get("FASTWS_FUZZ_SECONDS", "10"))
MAX_MESSAGE = 4096
pytestmark = pytest.mark.timeout(BUDGET * 3 + 60)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
UPGRADE = (f"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
TEXTS = ["", "hello", "héllo ✓", "🎉" * 3, "x" * 200]
BAD_UTF8 = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\xe2\x82", b"\xe2\x28\xa1"]


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def echo_app() -> App:
    app = App()

    class Echo(Endpoint):
        def on_message(self, message: str | bytes) -> None:
            self.session.send(message)

    app.route("/echo")(Echo)
    return app


# -- generating cases ------------------------------------------------------------------------------


def random_payload(rng: random.Random, text: bool) -> bytes:
    roll = rng.random()
    if text:
        if roll < 0.75:
            return rng.choice(TEXTS).encode()
        return rng.choice(TEXTS).encode()[: rng.randrange(1, 10)] + rng.choice(BAD_UTF8)
    if roll < 0.05:
        return os.urandom(rng.choice([125, 126, 127, MAX_MESSAGE, MAX_MESSAGE + 1]))
    return rng.randbytes(rng.randrange(0, 300))


def random_frame(rng: random.Random) -> bytes:
    roll = rng.random()
    key = rng.randbytes(4) if rng.random() > 0.03 else None  # an unmasked client frame now and then
    if roll < 0.55:  # a data frame
        op = rng.choice([oracles.OP_TEXT, oracles.OP_BINARY, oracles.OP_CONT])
        payload = random_payload(rng, op == oracles.OP_TEXT)
        return oracles.frame(op, payload, fin=rng.random() < 0.7, mask_key=key,
                             rsv=rng.choice([0] * 30 + [1, 2, 4]))
    if roll < 0.75:
        return oracles.frame(rng.choice([oracles.OP_PING, oracles.OP_PONG]), rng.randbytes(rng.randrange(0, 130)),
                             mask_key=key, fin=rng.random() < 0.97)
    if roll < 0.85:  # a close frame, valid or not
        code = rng.choice([1000, 1001, 1003, 1004, 1005, 1006, 1011, 1016, 2999, 3000, 4999, 5000, 0, 65535])
        reason = rng.choice([b"", b"bye", "ü".encode(), b"\xff\xfe"])
        payload = rng.choice([struct.pack("!H", code) + reason, b"", b"\x03"])
        return oracles.frame(oracles.OP_CLOSE, payload, mask_key=key)
    if roll < 0.9:  # a reserved opcode
        return oracles.frame(rng.choice(oracles.RESERVED_OPCODES), rng.randbytes(5), mask_key=key)
    # a length announced in a non-minimal or huge form
    length = rng.choice([0, 5, 200, MAX_MESSAGE + 10, 1 << 40])
    form = 64 if length > 0xFFFF else rng.choice([16, 64])
    head = oracles.header(rng.choice([oracles.OP_TEXT, oracles.OP_BINARY]), length, mask_key=key or b"abcd",
                          len_form=form)
    return head + rng.randbytes(min(length, 50))


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        what = rng.random()
        if not data:
            break
        if what < 0.4:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif what < 0.6:
            del data[rng.randrange(len(data)):]
        elif what < 0.8:
            i = rng.randrange(len(data) + 1)
            data[i:i] = rng.randbytes(rng.randrange(1, 8))
        else:
            i = rng.randrange(len(data))
            data[i:i] = data[i: i + rng.randrange(1, 20)]
    return bytes(data)


def frame_case(rng: random.Random) -> bytes:
    stream = b"".join(random_frame(rng) for _ in range(rng.randrange(1, 12)))
    return mutate(rng, stream) if rng.random() < 0.35 else stream


def expected(stream: bytes) -> tuple[list[tuple], frozenset[int] | None, bool]:
    """(replies the server owes, acceptable error codes or None, whether the stream is cut mid-frame)."""
    outcome = oracles.ref_read(stream, max_message_size=MAX_MESSAGE)
    replies: list[tuple] = []
    for call in outcome.calls:
        if call[0] == "message":
            replies.append(("message", call[1]))
        elif call[0] == "ping":
            replies.append(("pong", call[1]))
        elif call[0] == "close":
            replies.append(("close", call[1]))
    _, rest = oracles.parse_frames(stream)
    return replies, outcome.errors, bool(rest) and not outcome.closed


# -- checking the server's answer ------------------------------------------------------------------


async def run_frame_case(port: int, stream: bytes, rng: random.Random) -> None:
    replies, errors, cut = expected(stream)
    if not cut and errors is None and not any(r[0] == "close" for r in replies):
        stream += oracles.frame(oracles.OP_CLOSE, struct.pack("!H", 1000), mask_key=b"\x01\x02\x03\x04")
        replies, errors, cut = expected(stream)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(UPGRADE)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    pos = 0
    while pos < len(stream):  # in random pieces
        step = rng.randrange(1, 2 * len(stream) + 2)
        writer.write(stream[pos: pos + step])
        pos += step
        try:
            await writer.drain()
        except ConnectionError:
            break
    if cut:
        writer.write_eof()  # nothing more will come; the server must end the connection
    got = b""
    async with deadline(10):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionError as exc:
                raise AssertionError(f"the server reset the connection; stream {stream[:80]!r}") from exc
            if not chunk:
                break
            got += chunk
    writer.close()
    frames, rest = oracles.parse_frames(got)
    assert rest == b"", f"trailing garbage from the server: {rest[:40]!r}"
    answers: list[tuple] = []
    for frame in frames:
        assert not frame.masked and frame.rsv == 0 and frame.fin, frame
        if frame.opcode == oracles.OP_TEXT:
            answers.append(("message", frame.payload.decode("utf-8")))
        elif frame.opcode == oracles.OP_BINARY:
            answers.append(("message", frame.payload))
        elif frame.opcode == oracles.OP_PONG:
            answers.append(("pong", frame.payload))
        elif frame.opcode == oracles.OP_CLOSE:
            answers.append(("close", struct.unpack("!H", frame.payload[:2])[0] if frame.payload else 1005))
        else:
            raise AssertionError(f"unexpected frame from the server: {frame}")
    if errors is not None:
        assert answers[:-1] == replies, (stream[:200], answers, replies)
        assert answers and answers[-1][0] == "close" and answers[-1][1] in errors, (stream[:200], answers, errors)
    elif cut and answers[len(replies):]:  # the first bytes of the cut frame may already break a rule
        assert answers[:len(replies)] == replies, (stream[:200], answers, replies)
        extra = answers[len(replies):]
        assert len(extra) == 1 and extra[0][0] == "close" and extra[0][1] in (1002, 1007, 1009), extra
    else:
        assert answers == replies, (stream[:200], answers, replies)


def handshake_case(rng: random.Random) -> bytes:
    request = UPGRADE
    if rng.random() < 0.5:
        lines = request.split(b"\r\n")
        rng.shuffle(lines[1:-2])
        if rng.random() < 0.5:
            lines.insert(rng.randrange(1, len(lines) - 1), rng.choice([
                b"Sec-WebSocket-Key: " + base64.b64encode(rng.randbytes(rng.randrange(10, 20))),
                b"Sec-WebSocket-Version: " + str(rng.randrange(20)).encode(),
                b"Upgrade: " + rng.choice([b"h2c", b"websocket, foo", b""]),
                b"X-Junk: " + rng.randbytes(rng.randrange(1, 40)).replace(b"\r", b"").replace(b"\n", b""),
                b"Content-Length: " + str(rng.randrange(5)).encode(),
                b"Transfer-Encoding: chunked",
                rng.randbytes(rng.randrange(1, 30)),
            ]))
        request = b"\r\n".join(lines)
    return mutate(rng, request) if rng.random() < 0.7 else request


async def run_handshake_case(port: int, request: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    try:
        await writer.drain()
    except ConnectionError:
        pass
    data = b""
    async with deadline(5):  # handshake_timeout (0.5 s) bounds even a head that never ends
        while b"\r\n\r\n" not in data:
            try:
                chunk = await reader.read(65536)
            except ConnectionError:
                chunk = b""
            if not chunk:
                break
            data += chunk
    writer.close()
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no HTTP answer to {request[:200]!r}: {data[:200]!r}"
    status, phrase, headers = parse_response_head(head)
    assert status in (101, 400, 403, 404, 405, 408, 426, 431, 501, 505), (status, request[:200])
    if status == 101:  # the answer must be for the key that was actually sent (mutations may change it)
        keys = re.findall(rb"(?im)^sec-websocket-key:[ \t]*([^\r\n]*?)[ \t]*\r?$", request.partition(b"\r\n\r\n")[0])
        assert len(keys) == 1 and headers["sec-websocket-accept"] == oracles.accept_key(keys[0]), (request, headers)
    else:
        assert body.strip(), f"a {status} must say why"


async def test_socket_fuzz(start_server) -> None:
    server, port = await start_server(echo_app(), max_message_size=MAX_MESSAGE, close_timeout=2,
                                      handshake_timeout=0.5)
    seed = int(os.environ.get("FASTWS_FUZZ_SEED", "6455"))
    rng = random.Random(seed)
    for _ in range(30):  # warm up allocator pools before taking the baselines
        await run_frame_case(port, frame_case(rng), rng)
    await wait_no_connections(server, 10)
    fds, mem = fd_count(), rss()
    stop = time.monotonic() + BUDGET
    cases = 0
    while time.monotonic() < stop:
        case_seed = rng.randrange(1 << 30)
        case_rng = random.Random(case_seed)
        try:
            if case_rng.random() < 0.8:
                await run_frame_case(port, frame_case(case_rng), case_rng)
            else:
                await run_handshake_case(port, handshake_case(case_rng))
        except BaseException as exc:
            raise AssertionError(f"fuzz case {case_seed} (FASTWS_FUZZ_SEED={seed}) failed: {exc!r}") from exc
        cases += 1
    await wait_no_connections(server, 10)
    await wait_for(lambda: fd_count() <= fds, 5)
    grown = rss() - mem
    assert grown < 8 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MiB over {cases} cases"
    assert cases > 50, f"only {cases} cases in {BUDGET} s"
    # still serving
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(UPGRADE + oracles.frame(oracles.OP_TEXT, "alive", mask_key=b"abcd"))
    await reader.readuntil(b"\r\n\r\n")
    assert await asyncio.wait_for(reader.readexactly(7), 5) == b"\x81\x05alive"
    writer.close()
