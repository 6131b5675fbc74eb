"""RFC 6455 sections 5-7 and RFC 7692 over real sockets, driven byte by byte with tests/wsraw.py.

Every test talks to a live fastws server on loopback with hand-built frames and
checks what comes back on the wire: the echoed data, the close frame's status
code, and that the server then closes the TCP connection (RFC 6455 7.1.1: the
server closes TCP first).
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
import zlib
from types import SimpleNamespace

import pytest

from fastws import App, Endpoint
from wsraw import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawWS,
    build_frame,
    close_payload,
    wait_for,
    wait_no_connections,
)

pytestmark = pytest.mark.timeout(30)

MiB = 1 << 20


# -- apps ------------------------------------------------------------------------


def recording_app() -> tuple[App, SimpleNamespace]:
    """/echo that records lifecycle events; "server-close" and "boom" are commands."""
    app = App()
    log = SimpleNamespace(opened=0, closes=[], messages=[], errors=[])

    class Echo(Endpoint):
        def on_open(self) -> None:
            log.opened += 1

        def on_message(self, message: str | bytes) -> None:
            log.messages.append(message)
            if message == "server-close":
                self.session.close(4000, "bye")
            elif message == "boom":
                raise RuntimeError("boom")
            else:
                self.session.send(message)

        def on_close(self, code: int, reason: str) -> None:
            log.closes.append((code, reason))

        def on_error(self, exc: BaseException) -> None:
            log.errors.append(exc)

    app.route("/echo")(Echo)

    @app.route("/handler")
    async def handler(ws):  # type: ignore[no-untyped-def]
        async for message in ws:
            if message == "boom":
                raise RuntimeError("boom in handler")
            await ws.send(message)

    return app, log


async def connect(start_server, app: App | None = None, path: str = "/echo", **config):  # type: ignore[no-untyped-def]
    if app is None:
        from fastws.demo import create_app

        app = create_app()
    server, port = await start_server(app, **config)
    ws = await RawWS.connect(port, path)
    return server, port, ws


async def expect_fail(ws: RawWS, code: int, server=None) -> bytes:  # type: ignore[no-untyped-def]
    """The server answers with a close frame carrying ``code``, then drops TCP."""
    got, reason = await ws.expect_close()
    assert got == code, f"expected close {code}, got {got} {reason!r}"
    reason.decode("utf-8")  # a close reason is UTF-8 (RFC 6455 5.5.1)
    rest = await ws.wait_eof()
    assert rest == b"", f"data after the close frame: {rest[:100]!r}"
    if server is not None:
        await wait_no_connections(server)
    return reason


# -- 5.2 / 5.6: data frames of every length encoding --------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 65537])
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
async def test_echo_length_encodings(start_server, demo_app, opcode: int, size: int) -> None:
    _, _, ws = await connect(start_server, demo_app)
    async with ws:
        payload = (b"abcdefghijklmnopqrstuvwxyz" * (size // 26 + 1))[:size]
        await ws.send_frame(opcode, payload)
        frame = await ws.recv_frame()
        assert (frame.fin, frame.rsv, frame.opcode) == (True, 0, opcode)
        assert frame.payload == payload
        # the server used the minimal length encoding (RFC 6455 5.2)
        assert frame.header_size == (2 if size < 126 else 4 if size < 65536 else 10)


@pytest.mark.parametrize("size", [1 * MiB, 4 * MiB, 16 * MiB])
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
async def test_echo_large_messages(start_server, demo_app, opcode: int, size: int) -> None:
    server, _, ws = await connect(start_server, demo_app, max_message_size=16 * MiB)
    async with ws:
        unit = "héllo wörld €𝄞 " if opcode == OP_TEXT else "\x00\x01\xfe\xff"
        data = (unit * (size // len(unit.encode()) + 1)).encode()[:size]
        if opcode == OP_TEXT:
            data = data.decode("utf-8", "ignore").encode()  # cut at a code point
        await ws.send_frame(opcode, data)
        op, echoed = await ws.recv_message(timeout=20)
        assert op == opcode
        assert len(echoed) == len(data) and echoed == data
        # we read as fast as loopback allows: the connection must survive its own echo
        await ws.send_frame(OP_PING, b"still there?")
        frame = await ws.recv_frame()
        assert (frame.opcode, frame.payload) == (OP_PONG, b"still there?"), (
            f"after echoing {size} bytes to a client that reads promptly the server sent {frame} "
            f"(slow_consumers={server.stats['slow_consumers']})")
        assert server.stats["slow_consumers"] == 0


async def test_message_exactly_at_limit_is_accepted(start_server, demo_app) -> None:
    _, _, ws = await connect(start_server, demo_app, max_message_size=1000)
    async with ws:
        await ws.send_frame(OP_BINARY, b"x" * 1000)
        assert (await ws.recv_frame()).payload == b"x" * 1000
        # fragmented, adding up to exactly the limit
        await ws.send_frame(OP_TEXT, "a" * 600, fin=False)
        await ws.send_frame(OP_CONT, "b" * 400, fin=True)
        assert await ws.recv_message() == (OP_TEXT, b"a" * 600 + b"b" * 400)


async def test_big_frame_trickled_in_small_writes(start_server, demo_app) -> None:
    _, _, ws = await connect(start_server, demo_app)
    async with ws:
        data = bytes(range(256)) * 1024  # 256 KiB
        frame = build_frame(OP_BINARY, data)
        for i in range(0, len(frame), 4093):
            ws.writer.write(frame[i:i + 4093])
            if i % (64 * 4093) == 0:
                await ws.writer.drain()
                await asyncio.sleep(0)
        await ws.writer.drain()
        assert await ws.recv_message() == (OP_BINARY, data)


async def test_header_split_byte_by_byte(start_server, demo_app) -> None:
    _, _, ws = await connect(start_server, demo_app)
    async with ws:
        frame = build_frame(OP_TEXT, "x€y".encode() * 50)  # 16-bit length + mask key
        for i in range(len(frame)):
            await ws.send_raw(frame[i:i + 1])
            if i < 12:
                await asyncio.sleep(0.002)
        assert await ws.recv_message() == (OP_TEXT, "x€y".encode() * 50)


async def test_frames_pipelined_behind_the_upgrade_request(start_server, demo_app) -> None:
    _, port = await start_server(demo_app)
    first = build_frame(OP_TEXT, b"early") + build_frame(OP_BINARY, b"\x00bird")
    async with await RawWS.connect(port, "/echo", first=first) as ws:
        assert await ws.recv_message() == (OP_TEXT, b"early")
        assert await ws.recv_message() == (OP_BINARY, b"\x00bird")


async def test_many_messages_in_one_write_keep_order(start_server, demo_app) -> None:
    _, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_raw(b"".join(build_frame(OP_TEXT, str(i).encode()) for i in range(500)))
        for i in range(500):
            assert await ws.recv_message() == (OP_TEXT, str(i).encode())


# -- 5.4: fragmentation -----------------------------------------------------------------


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
async def test_fragmented_message(start_server, demo_app, opcode: int) -> None:
    _, _, ws = await connect(start_server, demo_app)
    async with ws:
        parts = [b"Hello", b", ", b"fragmented ", b"world" * 40, b"!"]
        await ws.send_frame(opcode, parts[0], fin=False)
        for p in parts[1:-1]:
            await ws.send_frame(OP_CONT, p, fin=False)
        await ws.send_frame(OP_CONT, parts[-1], fin=True)
        assert await ws.recv_message() == (opcode, b"".join(parts))


async def test_one_byte_fragments_split_inside_characters(start_server, demo_app) -> None:
    _, _, ws = await connect(start_server, demo_app)
    async with ws:
        text = "κόσμε €𝄞 ok".encode()
        frames = [build_frame(OP_TEXT if i == 0 else OP_CONT, text[i:i + 1], fin=i == len(text) - 1)
                  for i in range(len(text))]
        await ws.send_raw(b"".join(frames))
        assert await ws.recv_message() == (OP_TEXT, text)
        # the same, one frame per write
        for f in frames:
            await ws.send_raw(f)
        assert await ws.recv_message() == (OP_TEXT, text)


async def test_empty_fragments(start_server, demo_app) -> None:
    _, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_frame(OP_TEXT, b"", fin=False)
        await ws.send_frame(OP_CONT, b"a", fin=False)
        await ws.send_frame(OP_CONT, b"", fin=False)
        await ws.send_frame(OP_CONT, b"b", fin=False)
        await ws.send_frame(OP_CONT, b"", fin=True)
        assert await ws.recv_message() == (OP_TEXT, b"ab")
        # a message made only of empty fragments is an empty message
        await ws.send_frame(OP_BINARY, b"", fin=False)
        await ws.send_frame(OP_CONT, b"", fin=True)
        assert await ws.recv_message() == (OP_BINARY, b"")


async def test_control_frames_interleaved_with_fragments(start_server, demo_app) -> None:
    _, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_frame(OP_TEXT, b"frag1 ", fin=False)
        await ws.send_frame(OP_PING, b"ping-1")
        pong = await ws.recv_frame()
        # 5.4: a control frame may be injected in the middle; the pong must not wait for the message
        assert (pong.opcode, pong.payload) == (OP_PONG, b"ping-1")
        await ws.send_frame(OP_CONT, b"frag2 ", fin=False)
        await ws.send_frame(OP_PONG, b"unsolicited")
        await ws.send_frame(OP_PING, b"ping-2")
        await ws.send_frame(OP_CONT, b"frag3", fin=True)
        frames = [await ws.recv_frame(), await ws.recv_frame()]
        assert [(f.opcode, f.payload) for f in frames] == [
            (OP_PONG, b"ping-2"), (OP_TEXT, b"frag1 frag2 frag3")]


# -- 5.5: control frames ----------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(125)), "ünïcode".encode()])
async def test_ping_gets_pong_with_identical_payload(start_server, demo_app, payload: bytes) -> None:
    _, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_frame(OP_PING, payload)
        frame = await ws.recv_frame()
        assert (frame.fin, frame.rsv, frame.opcode, frame.payload) == (True, 0, OP_PONG, payload)


async def test_many_pings_each_get_a_pong(start_server, demo_app) -> None:
    _, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_raw(b"".join(build_frame(OP_PING, b"%d" % i) for i in range(50)))
        for i in range(50):
            frame = await ws.recv_frame()
            assert (frame.opcode, frame.payload) == (OP_PONG, b"%d" % i)


async def test_unsolicited_pong_is_ignored(start_server, demo_app) -> None:
    _, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_frame(OP_PONG, b"nobody asked")
        await ws.send_frame(OP_PONG, b"")
        await ws.send_frame(OP_TEXT, b"after")
        frame = await ws.recv_frame()
        assert (frame.opcode, frame.payload) == (OP_TEXT, b"after")
        await ws.assert_open(0.1)


@pytest.mark.parametrize("size", [126, 1000, 70000])
@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
async def test_control_frame_too_long(start_server, demo_app, opcode: int, size: int) -> None:
    server, _, ws = await connect(start_server, demo_app)
    async with ws:
        payload = close_payload(1000, b"r" * (size - 2)) if opcode == OP_CLOSE else b"p" * size
        await ws.send_bad(opcode, payload)
        await expect_fail(ws, 1002, server)


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
async def test_fragmented_control_frame(start_server, demo_app, opcode: int) -> None:
    server, _, ws = await connect(start_server, demo_app)
    async with ws:
        payload = close_payload(1000) if opcode == OP_CLOSE else b"ctl"
        await ws.send_bad(opcode, payload, fin=False)
        await expect_fail(ws, 1002, server)


# -- 5.2: reserved bits and opcodes, masking ----------------------------------------------


@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY, OP_PING])
async def test_reserved_bits_without_extension(start_server, demo_app, opcode: int, rsv: int) -> None:
    server, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_frame(OP_TEXT, b"before")
        assert await ws.recv_message() == (OP_TEXT, b"before")
        await ws.send_bad(opcode, b"hello", rsv=rsv)
        await expect_fail(ws, 1002, server)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
async def test_reserved_opcode(start_server, demo_app, opcode: int) -> None:
    server, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_bad(opcode, b"xyz")
        await expect_fail(ws, 1002, server)


async def test_reserved_opcode_inside_fragmented_message(start_server, demo_app) -> None:
    server, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_frame(OP_TEXT, b"start", fin=False)
        await ws.send_bad(0xB, b"")
        await expect_fail(ws, 1002, server)


async def test_continuation_without_start(start_server, demo_app) -> None:
    server, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_frame(OP_CONT, b"orphan", fin=True)
        await expect_fail(ws, 1002, server)


async def test_continuation_after_finished_message(start_server, demo_app) -> None:
    server, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_frame(OP_TEXT, b"a", fin=False)
        await ws.send_frame(OP_CONT, b"b", fin=True)
        assert await ws.recv_message() == (OP_TEXT, b"ab")
        await ws.send_frame(OP_CONT, b"c", fin=True)
        await expect_fail(ws, 1002, server)


@pytest.mark.parametrize("second", [OP_TEXT, OP_BINARY])
async def test_new_data_frame_mid_fragmentation(start_server, demo_app, second: int) -> None:
    server, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_frame(OP_BINARY, b"first", fin=False)
        await ws.send_frame(second, b"second", fin=True)
        await expect_fail(ws, 1002, server)


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY, OP_PING, OP_CLOSE])
async def test_unmasked_client_frame(start_server, demo_app, opcode: int) -> None:
    server, _, ws = await connect(start_server, demo_app)
    async with ws:
        payload = close_payload(1000) if opcode == OP_CLOSE else b"naked"
        await ws.send_bad(opcode, payload, mask=False)
        await expect_fail(ws, 1002, server)


async def test_64bit_length_with_msb_set(start_server, demo_app) -> None:
    server, _, ws = await connect(start_server, demo_app, max_message_size=0)
    async with ws:
        await ws.send_raw(bytes((0x82, 0xFF)) + struct.pack("!Q", 1 << 63) + b"\x00\x00\x00\x00")
        got, _ = await ws.expect_close()
        assert got in (1002, 1009)
        assert await ws.wait_eof() == b""
    await wait_no_connections(server)


# -- 5.6 / 8.1: UTF-8 ---------------------------------------------------------------------

INVALID_UTF8 = [
    b"\xff",
    b"\xc0\xaf",  # overlong '/'
    b"\xe0\x80\xaf",  # overlong
    b"\xed\xa0\x80",  # UTF-16 surrogate
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\x80",  # lone continuation byte
    b"abc\xe2\x82",  # ends inside a character
    "κόσμε".encode() + b"\xed\xa0\x80edited",
]


@pytest.mark.parametrize("bad", INVALID_UTF8)
async def test_invalid_utf8_text_message(start_server, demo_app, bad: bytes) -> None:
    server, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_frame(OP_TEXT, bad)
        await expect_fail(ws, 1007, server)


@pytest.mark.parametrize("bad", INVALID_UTF8)
async def test_invalid_utf8_in_fragments(start_server, demo_app, bad: bytes) -> None:
    server, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_frame(OP_TEXT, b"valid start ", fin=False)
        await ws.send_frame(OP_CONT, bad, fin=False)
        await ws.send_frame(OP_CONT, b" valid end", fin=True)
        await expect_fail(ws, 1007, server)


async def test_invalid_utf8_split_across_fragments(start_server, demo_app) -> None:
    server, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_frame(OP_TEXT, b"ok \xed", fin=False)  # could still become valid...
        await ws.send_frame(OP_CONT, b"\xa0\x80", fin=True)  # ...but it is a surrogate
        await expect_fail(ws, 1007, server)


async def test_message_ending_inside_a_character(start_server, demo_app) -> None:
    server, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_frame(OP_TEXT, b"ok \xf0\x9d", fin=False)
        await ws.send_frame(OP_CONT, b"\x84", fin=True)  # 3 of the 4 bytes of U+1D11E
        await expect_fail(ws, 1007, server)


async def test_invalid_utf8_fails_fast_inside_a_long_frame(start_server, demo_app) -> None:
    """8.1 / 5.6: the server need not (and should not) wait for the rest of a frame it knows is invalid."""
    server, _, ws = await connect(start_server, demo_app)
    async with ws:
        payload = b"valid prefix " + b"\xff" + b"x" * 500_000
        frame = build_frame(OP_TEXT, payload)
        await ws.send_raw(frame[:14 + 4096])  # header + mask + the first 4 KiB only
        await expect_fail(ws, 1007, server)


async def test_invalid_utf8_fails_fast_inside_a_long_continuation(start_server, demo_app) -> None:
    server, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_frame(OP_TEXT, b"first fragment, all valid", fin=False)
        frame = build_frame(OP_CONT, b"still fine " + b"\xc0\xaf" + b"y" * 500_000, fin=True)
        await ws.send_raw(frame[:14 + 2048])
        await expect_fail(ws, 1007, server)


async def test_invalid_utf8_after_a_valid_partial_read(start_server, demo_app) -> None:
    """The first part of a frame is valid and arrives alone; the bad byte comes in a later read."""
    server, _, ws = await connect(start_server, demo_app)
    async with ws:
        frame = build_frame(OP_TEXT, "é".encode() * 1000 + b"\xff" + b"z" * 100_000)
        await ws.send_raw(frame[:1000])
        await asyncio.sleep(0.05)
        await ws.assert_open(0.05)
        await ws.send_raw(frame[1000:3000])
        await expect_fail(ws, 1007, server)


@pytest.mark.parametrize("char", ["é", "€", "𝄞"])
async def test_valid_utf8_split_inside_a_character_is_accepted(start_server, demo_app, char: str) -> None:
    _, _, ws = await connect(start_server, demo_app)
    async with ws:
        data = f"<{char}>".encode()
        for cut in range(2, len(data) - 1):  # every cut inside the character
            await ws.send_frame(OP_TEXT, data[:cut], fin=False)
            await ws.send_frame(OP_CONT, data[cut:], fin=True)
            assert await ws.recv_message() == (OP_TEXT, data), cut
        # and within one frame that arrives in pieces cut inside the character
        frame = build_frame(OP_TEXT, data * 100)
        for cut in range(7, 7 + 2 * len(data)):
            await ws.send_raw(frame[:cut])
            await asyncio.sleep(0.005)
            await ws.send_raw(frame[cut:])
            assert await ws.recv_message() == (OP_TEXT, data * 100), cut


async def test_binary_messages_are_not_utf8_checked(start_server, demo_app) -> None:
    _, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_frame(OP_BINARY, b"\xff\xfe\xed\xa0\x80", fin=False)
        await ws.send_frame(OP_CONT, b"\xc0", fin=True)
        assert await ws.recv_message() == (OP_BINARY, b"\xff\xfe\xed\xa0\x80\xc0")


# -- 10.4: message size limit ---------------------------------------------------------------


@pytest.mark.parametrize("length", [1001, 65536, 1 << 30, (1 << 62)])
async def test_message_too_big_closes_from_the_header(start_server, demo_app, length: int) -> None:
    """Only the header of an oversized frame is sent: the 1009 must not wait for the payload."""
    server, _, ws = await connect(start_server, demo_app, max_message_size=1000)
    async with ws:
        await ws.send_raw(build_frame(OP_BINARY, b"", length=length))
        await expect_fail(ws, 1009, server)


async def test_fragmented_message_too_big(start_server, demo_app) -> None:
    server, _, ws = await connect(start_server, demo_app, max_message_size=1000)
    async with ws:
        await ws.send_frame(OP_TEXT, "a" * 600, fin=False)
        await ws.send_raw(build_frame(OP_CONT, b"", fin=True, length=401))  # header only
        await expect_fail(ws, 1009, server)


async def test_many_small_fragments_too_big(start_server, demo_app) -> None:
    server, _, ws = await connect(start_server, demo_app, max_message_size=1000)
    async with ws:
        await ws.send_frame(OP_BINARY, b"", fin=False)
        await ws.send_raw(b"".join(build_frame(OP_CONT, b"z" * 100, fin=False) for _ in range(11)))
        await expect_fail(ws, 1009, server)


# -- 5.5.1 / 7: the closing handshake -----------------------------------------------------------


async def test_client_close_is_echoed_and_server_drops_tcp(start_server) -> None:
    app, log = recording_app()
    server, _, ws = await connect(start_server, app)
    async with ws:
        await ws.send_close(1000, "done")
        code, _ = await ws.expect_close()
        assert code == 1000
        assert await ws.wait_eof() == b""  # 7.1.1: the server closes TCP first, without waiting for us
    await wait_no_connections(server)
    await wait_for(lambda: log.closes == [(1000, "done")])


async def test_close_without_payload(start_server) -> None:
    app, log = recording_app()
    server, _, ws = await connect(start_server, app)
    async with ws:
        await ws.send_close(None)
        code, reason = await ws.expect_close()
        assert code in (None, 1000) and reason == b""
        assert await ws.wait_eof() == b""
    await wait_no_connections(server)
    await wait_for(lambda: log.closes == [(1005, "")])  # 7.1.5: no status code -> 1005


async def test_close_with_one_byte_payload(start_server, demo_app) -> None:
    server, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_bad(OP_CLOSE, b"\x03")
        await expect_fail(ws, 1002, server)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
async def test_invalid_close_code(start_server, demo_app, code: int) -> None:
    server, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_close(code, "x")
        await expect_fail(ws, 1002, server)


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
                                  3000, 3999, 4000, 4999])
async def test_valid_close_code_is_echoed(start_server, code: int) -> None:
    app, log = recording_app()
    server, _, ws = await connect(start_server, app)
    async with ws:
        await ws.send_close(code, "reason ✓")
        got, reason = await ws.expect_close()
        assert got == code
        reason.decode("utf-8")
        assert await ws.wait_eof() == b""
    await wait_no_connections(server)
    await wait_for(lambda: log.closes == [(code, "reason ✓")])


async def test_close_reason_of_123_bytes(start_server, demo_app) -> None:
    _, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_close(1000, "r" * 123)  # 125-byte payload: the maximum
        assert (await ws.expect_close())[0] == 1000
        assert await ws.wait_eof() == b""


@pytest.mark.parametrize("reason", [b"\xff", b"ok\xed\xa0\x80", b"abc\xe2\x82"])
async def test_invalid_utf8_close_reason(start_server, demo_app, reason: bytes) -> None:
    server, _, ws = await connect(start_server, demo_app)
    async with ws:
        await ws.send_close(1000, reason)
        await expect_fail(ws, 1007, server)


async def test_data_after_close_is_ignored(start_server) -> None:
    app, log = recording_app()
    server, _, ws = await connect(start_server, app)
    async with ws:
        await ws.send_raw(build_frame(OP_CLOSE, close_payload(1000)) + build_frame(OP_TEXT, b"too late")
                          + build_frame(OP_PING, b"late ping") + build_frame(0xB, b"garbage"))
        code, _ = await ws.expect_close()
        assert code == 1000  # not 1002: nothing after the close frame is even parsed
        assert await ws.wait_eof() == b""  # no echo, no pong
    await wait_no_connections(server)
    assert "too late" not in log.messages
    assert log.closes == [(1000, "")]


async def test_close_in_the_middle_of_a_fragmented_message(start_server) -> None:
    app, log = recording_app()
    server, _, ws = await connect(start_server, app)
    async with ws:
        await ws.send_frame(OP_TEXT, b"never ", fin=False)
        await ws.send_close(1001)
        assert (await ws.expect_close())[0] == 1001
        assert await ws.wait_eof() == b""
    await wait_no_connections(server)
    assert log.messages == []


async def test_server_initiated_close(start_server) -> None:
    app, log = recording_app()
    server, _, ws = await connect(start_server, app)
    async with ws:
        await ws.send_frame(OP_TEXT, b"server-close")
        code, reason = await ws.expect_close()
        assert (code, reason) == (4000, b"bye")
        # 5.5.1: after its close frame the server sends no more data frames
        await ws.send_frame(OP_TEXT, b"are you there?")
        await ws.send_frame(OP_PING, b"hello?")
        await ws.assert_open(0.1)
        await ws.send_close(4000, "bye")
        assert await ws.wait_eof() == b""
    await wait_no_connections(server)
    await wait_for(lambda: len(log.closes) == 1)
    assert log.closes[0][0] == 4000
    assert log.messages == ["server-close"]


async def test_server_close_times_out_when_client_never_answers(start_server) -> None:
    app, log = recording_app()
    server, _, ws = await connect(start_server, app, close_timeout=0.3)
    async with ws:
        await ws.send_frame(OP_TEXT, b"server-close")
        assert (await ws.expect_close())[0] == 4000
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await ws.wait_eof(3.0) == b""
        assert loop.time() - t0 < 2.0
    await wait_no_connections(server)
    await wait_for(lambda: len(log.closes) == 1)


async def test_abrupt_tcp_drop_reports_1006(start_server) -> None:
    app, log = recording_app()
    server, _, ws = await connect(start_server, app)
    await ws.send_frame(OP_TEXT, b"hi")
    assert await ws.recv_message() == (OP_TEXT, b"hi")
    ws.abort()  # RST, no close frame
    await wait_no_connections(server)
    await wait_for(lambda: len(log.closes) == 1)
    assert log.closes[0][0] == 1006


async def test_tcp_fin_without_close_frame_reports_1006(start_server) -> None:
    app, log = recording_app()
    server, _, ws = await connect(start_server, app)
    ws.writer.write_eof()  # half-close: FIN, no close frame
    await ws.wait_eof()
    await wait_no_connections(server)
    await wait_for(lambda: len(log.closes) == 1)
    assert log.closes[0][0] == 1006
    ws.abort()


async def test_exception_in_on_message_closes_1011_and_server_keeps_serving(start_server) -> None:
    app, log = recording_app()
    server, port, bystander = await connect(start_server, app)
    async with bystander, await RawWS.connect(port, "/echo") as victim:
        await victim.send_frame(OP_TEXT, b"boom")
        code, _ = await victim.expect_close()
        assert code == 1011
        await victim.send_close(1011)
        assert await victim.wait_eof() == b""
        assert len(log.errors) == 1 and isinstance(log.errors[0], RuntimeError)
        # the other connection and new ones are unaffected
        await bystander.send_frame(OP_TEXT, b"still here")
        assert await bystander.recv_message() == (OP_TEXT, b"still here")
        async with await RawWS.connect(port, "/echo") as newcomer:
            await newcomer.send_frame(OP_BINARY, b"new")
            assert await newcomer.recv_message() == (OP_BINARY, b"new")
    assert server.stats["handler_errors"] == 1


async def test_exception_in_handler_coroutine_closes_1011(start_server) -> None:
    app, _ = recording_app()
    server, port, ws = await connect(start_server, app, path="/handler")
    async with ws:
        await ws.send_frame(OP_TEXT, b"fine")
        assert await ws.recv_message() == (OP_TEXT, b"fine")
        await ws.send_frame(OP_TEXT, b"boom")
        assert (await ws.expect_close())[0] == 1011
        await ws.send_close(1011)
        assert await ws.wait_eof() == b""
    async with await RawWS.connect(port, "/handler") as other:
        await other.send_frame(OP_TEXT, b"next")
        assert await other.recv_message() == (OP_TEXT, b"next")


async def test_handler_coroutine_returning_closes_1000(start_server) -> None:
    app = App()

    @app.route("/once")
    async def once(ws):  # type: ignore[no-untyped-def]
        await ws.send(await ws.recv())

    server, _, ws = await connect(start_server, app, path="/once")
    async with ws:
        await ws.send_frame(OP_TEXT, b"one")
        assert await ws.recv_message() == (OP_TEXT, b"one")
        assert (await ws.expect_close())[0] == 1000
        await ws.send_close(1000)
        assert await ws.wait_eof() == b""
    await wait_no_connections(server)


# -- RFC 7692: permessage-deflate on the wire -------------------------------------------------


def deflate(data: bytes, compressor=None) -> bytes:  # type: ignore[no-untyped-def]
    c = compressor or zlib.compressobj(6, zlib.DEFLATED, -15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def inflate(data: bytes, decompressor=None) -> bytes:  # type: ignore[no-untyped-def]
    d = decompressor or zlib.decompressobj(-15)
    return d.decompress(data + b"\x00\x00\xff\xff")


async def connect_deflate(start_server, offer: str = "permessage-deflate; client_max_window_bits",
                          app: App | None = None, **config):  # type: ignore[no-untyped-def]
    from fastws.demo import create_app

    config.setdefault("compression", True)
    server, port = await start_server(app or create_app(), **config)
    ws = await RawWS.connect(port, "/echo", extra=[("Sec-WebSocket-Extensions", offer)])
    return server, ws


async def test_deflate_echo_compressed_both_ways(start_server) -> None:
    server, ws = await connect_deflate(start_server)
    async with ws:
        ext = ws.response.header("sec-websocket-extensions")
        assert ext is not None and ext.startswith("permessage-deflate")
        text = ("compress me please " * 100).encode()
        await ws.send_frame(OP_TEXT, deflate(text), rsv1=True)
        frame = await ws.recv_frame()
        assert frame.opcode == OP_TEXT and frame.fin
        assert frame.rsv == 4, "a large compressible message should come back compressed"
        assert inflate(frame.payload) == text
        # an uncompressed message (RSV1 clear) is fine too (7.2.3.* / 6)
        await ws.send_frame(OP_BINARY, b"plain")
        frame = await ws.recv_frame()
        assert frame.opcode == OP_BINARY
        assert (inflate(frame.payload) if frame.rsv == 4 else frame.payload) == b"plain"


async def test_deflate_fragmented_compressed_message(start_server) -> None:
    """RFC 7692 6.1: RSV1 on the first frame only; the compressed payload spans the fragments."""
    _, ws = await connect_deflate(start_server)
    async with ws:
        text = ("fragmented and compressed " * 200).encode()
        comp = deflate(text)
        a, b = len(comp) // 3, 2 * len(comp) // 3
        await ws.send_frame(OP_TEXT, comp[:a], fin=False, rsv1=True)
        await ws.send_frame(OP_PING, b"in between")
        await ws.send_frame(OP_CONT, comp[a:b], fin=False)
        await ws.send_frame(OP_CONT, comp[b:], fin=True)
        pong = await ws.recv_frame()
        assert (pong.opcode, pong.rsv, pong.payload) == (OP_PONG, 0, b"in between")
        frame = await ws.recv_frame()
        assert frame.opcode == OP_TEXT
        assert (inflate(frame.payload) if frame.rsv == 4 else frame.payload) == text


async def test_deflate_with_client_context_takeover(start_server) -> None:
    """The client keeps its compression context across messages when the server allows it."""
    _, ws = await connect_deflate(start_server, compression_no_context_takeover=False)
    async with ws:
        ext = ws.response.header("sec-websocket-extensions") or ""
        assert "client_no_context_takeover" not in ext
        comp = zlib.compressobj(6, zlib.DEFLATED, -15)
        decomp = zlib.decompressobj(-15)
        msg = ("shared context " * 30).encode()
        for i in range(5):
            await ws.send_frame(OP_TEXT, deflate(msg + b"%d" % i, comp), rsv1=True)
            frame = await ws.recv_frame()
            got = inflate(frame.payload, decomp) if frame.rsv == 4 else frame.payload
            assert got == msg + b"%d" % i


async def test_deflate_no_context_takeover_is_honoured_by_server(start_server) -> None:
    """With server_no_context_takeover each server message inflates on its own."""
    _, ws = await connect_deflate(
        start_server, "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        compression_no_context_takeover=False)
    async with ws:
        ext = ws.response.header("sec-websocket-extensions") or ""
        assert "server_no_context_takeover" in ext
        msg = ("independent " * 40).encode()
        for _ in range(3):
            await ws.send_frame(OP_TEXT, deflate(msg), rsv1=True)
            frame = await ws.recv_frame()
            assert frame.rsv == 4
            assert inflate(frame.payload) == msg  # a fresh inflater each time


async def test_compression_level_reaches_the_wire(start_server) -> None:
    """The default (no context takeover: level 1, zlib-ng's fixed codes) against compression_level=9:
    the same message comes back smaller at 9, and both inflate on their own (a fresh inflater)."""
    rng = random.Random(1)
    text = json.dumps([{"symbol": rng.choice(["AAPL", "MSFT", "NVDA"]), "bid": round(rng.uniform(50, 900), 2),
                        "size": rng.randrange(5000), "flags": ["realtime", "level1"]} for _ in range(40)]).encode()
    sizes = []
    for config in ({}, {"compression_level": 9}):
        _, ws = await connect_deflate(start_server, **config)
        async with ws:
            await ws.send_frame(OP_TEXT, deflate(text), rsv1=True)
            frame = await ws.recv_frame()
            assert frame.rsv == 4 and inflate(frame.payload) == text
            sizes.append(len(frame.payload))
    assert sizes[1] < sizes[0] < len(text) // 2, sizes


async def test_deflate_server_max_window_bits_is_echoed(start_server) -> None:
    _, ws = await connect_deflate(start_server, "permessage-deflate; server_max_window_bits=10")
    async with ws:
        ext = ws.response.header("sec-websocket-extensions") or ""
        assert "server_max_window_bits=10" in ext  # RFC 7692 7.1.2.1
        msg = bytes(range(256)) * 40
        await ws.send_frame(OP_BINARY, deflate(msg), rsv1=True)
        frame = await ws.recv_frame()
        assert (zlib.decompressobj(-10).decompress(frame.payload + b"\x00\x00\xff\xff")
                if frame.rsv == 4 else frame.payload) == msg


@pytest.mark.parametrize("offer", [
    "permessage-deflate; server_max_window_bits=7",
    "permessage-deflate; server_max_window_bits=16",
    "permessage-deflate; unknown_param",
    "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
    "x-webkit-deflate-frame",
])
async def test_deflate_unacceptable_offer_is_declined_not_fatal(start_server, offer: str) -> None:
    """RFC 7692 5: an offer the server cannot accept is declined; the handshake still succeeds."""
    _, ws = await connect_deflate(start_server, offer)
    async with ws:
        assert ws.response.header("sec-websocket-extensions") is None
        # without the extension, RSV1 is a protocol error again
        await ws.send_frame(OP_TEXT, deflate(b"hello"), rsv1=True)
        await expect_fail(ws, 1002)


async def test_deflate_not_negotiated_when_disabled(start_server) -> None:
    _, ws = await connect_deflate(start_server, compression=False)
    async with ws:
        assert ws.response.header("sec-websocket-extensions") is None


async def test_deflate_rsv1_on_continuation_frame(start_server) -> None:
    server, ws = await connect_deflate(start_server)
    async with ws:
        await ws.send_frame(OP_TEXT, b"plain ", fin=False)
        await ws.send_frame(OP_CONT, deflate(b"text"), fin=True, rsv1=True)
        await expect_fail(ws, 1002, server)


async def test_deflate_rsv1_on_control_frame(start_server) -> None:
    server, ws = await connect_deflate(start_server)
    async with ws:
        await ws.send_bad(OP_PING, b"", rsv=4)
        await expect_fail(ws, 1002, server)


@pytest.mark.parametrize("rsv", [1, 2])
async def test_deflate_rsv2_rsv3_still_reserved(start_server, rsv: int) -> None:
    server, ws = await connect_deflate(start_server)
    async with ws:
        await ws.send_bad(OP_TEXT, b"abc", rsv=rsv)
        await expect_fail(ws, 1002, server)


async def test_deflate_invalid_compressed_data(start_server) -> None:
    server, ws = await connect_deflate(start_server)
    async with ws:
        await ws.send_frame(OP_BINARY, b"\xff\xff\xff\xff garbage", rsv1=True)
        got, _ = await ws.expect_close()
        assert got in (1002, 1007)
        assert await ws.wait_eof() == b""
    await wait_no_connections(server)


async def test_deflate_invalid_utf8_inside_compressed_text(start_server) -> None:
    server, ws = await connect_deflate(start_server)
    async with ws:
        await ws.send_frame(OP_TEXT, deflate(b"abc\xff" * 100), rsv1=True)
        await expect_fail(ws, 1007, server)


async def test_deflate_bomb_is_1009(start_server) -> None:
    """A small compressed frame that inflates past max_message_size is refused (1009)."""
    server, ws = await connect_deflate(start_server, max_message_size=64 * 1024)
    async with ws:
        bomb = deflate(b"\x00" * (8 * MiB))
        assert len(bomb) < 16 * 1024
        await ws.send_frame(OP_BINARY, bomb, rsv1=True)
        await expect_fail(ws, 1009, server)


async def test_deflate_empty_message(start_server) -> None:
    _, ws = await connect_deflate(start_server)
    async with ws:
        await ws.send_frame(OP_TEXT, b"\x00", rsv1=True)  # 7.2.3.6: an empty compressed message
        assert await ws.recv_message() == (OP_TEXT, b"")
        await ws.send_frame(OP_BINARY, deflate(b""), rsv1=True)
        frame = await ws.recv_frame()
        assert frame.opcode == OP_BINARY
        assert (inflate(frame.payload) if frame.rsv == 4 else frame.payload) == b""
