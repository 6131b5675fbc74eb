"""Wire core (fastws._frame): RFC 6455 section 5 over byte vectors.

Every vector is fed whole, split at every byte position, byte by byte and in random
pieces, through FrameReader.feed (bytes, bytearray, memoryview) and through
get_buffer/buffer_updated (uvloop- and asyncio-style), and must give the same handler
calls and the same ProtocolError. Expected results are written out by hand and also
cross-checked against the reference reader in oracles.py.
"""

from __future__ import annotations

import random
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracles as O
from fastws import _frame
from fastws._codec import Compressor, Decompressor
from fastws._frame import (
    FrameReader,
    FrameWriter,
    encode_close_payload,
    encode_frame,
    is_valid_close_code,
    parse_close_payload,
)
from fastws.errors import PayloadTooBig, ProtocolError
from oracles import MODES, Recorder, drive, push, split_plans

KEY = bytes.fromhex("37fa213d")  # the RFC 6455 5.7 masking key
KEYS = [KEY, b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x01\x02\x03\x04", b"\x80\x7f\xa5\x5a"]


def mframe(opcode, payload=b"", **kw):
    """A client->server (masked) frame."""
    return O.frame(opcode, payload, mask_key=kw.pop("mask_key", KEY), **kw)


def uframe(opcode, payload=b"", **kw):
    """A server->client (unmasked) frame."""
    return O.frame(opcode, payload, **kw)


def check_types(calls):
    for c in calls:
        if c[0] == "message":
            assert type(c[1]) in (str, bytes), f"message data must be str or bytes, got {type(c[1])}"
        elif c[0] in ("ping", "pong"):
            assert type(c[1]) is bytes, f"{c[0]} payload must be bytes, got {type(c[1])}"
        else:
            assert type(c[1]) is int and type(c[2]) is str


def run(stream_chunks, mode, *, is_server=True, **kw):
    rec = Recorder()
    reader = FrameReader(rec, is_server=is_server, **kw)
    err = drive(reader, stream_chunks, mode)
    check_types(rec.calls)
    return rec.calls, err, reader


def assert_outcome(stream, mode, is_server, calls, code, **kw):
    """Same outcome for every way of cutting ``stream`` into reads."""
    for plan in split_plans(stream):
        got, err, reader = run(plan, mode, is_server=is_server, **kw)
        cuts = [len(c) for c in plan][:12]
        assert got == calls, f"split {cuts}"
        if code is None:
            assert err is None, f"split {cuts}: unexpected {err!r}"
        else:
            assert err is not None, f"split {cuts}: no ProtocolError, expected code {code}"
            assert isinstance(err, ProtocolError)
            assert err.code == code, f"split {cuts}: code {err.code} != {code} ({err})"
            assert reader.closed
        # after the whole stream: more input is ignored once closed (close frame or error)
        if reader.closed:
            rec_len = len(got)
            push(reader, mframe(O.OP_TEXT, "late") if is_server else uframe(O.OP_TEXT, "late"), mode)
            assert len(got) == rec_len


# --------------------------------------------------------------------------- constants


def test_opcode_constants():
    assert (_frame.OP_CONTINUATION, _frame.OP_TEXT, _frame.OP_BINARY) == (0, 1, 2)
    assert (_frame.OP_CLOSE, _frame.OP_PING, _frame.OP_PONG) == (8, 9, 10)


# --------------------------------------------------------------------------- valid vectors

HELLO = b"Hello"
BIN256 = bytes(range(256))
BIN64K = random.Random(64).randbytes(65536)

# (id, is_server, stream, expected calls)
VALID = [
    # RFC 6455 5.7, verbatim
    ("rfc-unmasked-text", False, bytes.fromhex("810548656c6c6f"), [("message", "Hello")]),
    ("rfc-masked-text", True, bytes.fromhex("818537fa213d7f9f4d5158"), [("message", "Hello")]),
    ("rfc-fragmented", False, bytes.fromhex("010348656c80026c6f"), [("message", "Hello")]),
    ("rfc-unmasked-ping", False, bytes.fromhex("890548656c6c6f"), [("ping", HELLO)]),
    ("rfc-masked-pong", True, bytes.fromhex("8a8537fa213d7f9f4d5158"), [("pong", HELLO)]),
    ("rfc-256-binary", False, bytes.fromhex("827e0100") + BIN256, [("message", BIN256)]),
    ("rfc-64k-binary", False, bytes.fromhex("827f0000000000010000") + BIN64K, [("message", BIN64K)]),
    # the same in the server role (masked)
    ("masked-fragmented", True, mframe(1, "Hel", fin=False) + mframe(0, "lo"), [("message", "Hello")]),
    ("masked-ping", True, mframe(9, HELLO), [("ping", HELLO)]),
    ("masked-256-binary", True, mframe(2, BIN256), [("message", BIN256)]),
    ("masked-64k-binary", True, mframe(2, BIN64K), [("message", BIN64K)]),
    ("unmasked-pong", False, uframe(10, HELLO), [("pong", HELLO)]),
    # length encodings at their edges
    ("len-125", True, mframe(2, b"a" * 125), [("message", b"a" * 125)]),
    ("len-126", True, mframe(2, b"b" * 126), [("message", b"b" * 126)]),
    ("len-127", False, uframe(2, b"c" * 127), [("message", b"c" * 127)]),
    ("len-65535", True, mframe(2, BIN64K[:65535]), [("message", BIN64K[:65535])]),
    ("len-65536-text", True, mframe(1, "é" * 32768), [("message", "é" * 32768)]),
    # masked payloads long enough for the SIMD paths, split everywhere (unmask phase across reads)
    (
        "masked-300",
        True,
        mframe(2, BIN256 + BIN256[:44], mask_key=KEYS[4]),
        [("message", BIN256 + BIN256[:44])],
    ),
    ("masked-1000-text", True, mframe(1, "ab€" * 200), [("message", "ab€" * 200)]),
    # empties
    ("empty-text", True, mframe(1, b""), [("message", "")]),
    ("empty-binary", True, mframe(2, b""), [("message", b"")]),
    ("empty-ping-pong", True, mframe(9) + mframe(10), [("ping", b""), ("pong", b"")]),
    (
        "empty-fragments",
        True,
        mframe(2, b"", fin=False)
        + mframe(0, b"", fin=False)
        + mframe(0, b"x")
        + mframe(1, b"", fin=False)
        + mframe(0),
        [("message", b"x"), ("message", "")],
    ),
    # control frames between fragments: delivered at once, message still reassembles
    (
        "interleaved-control",
        True,
        mframe(1, "Hel", fin=False)
        + mframe(9, b"p")
        + mframe(0, "l", fin=False)
        + mframe(10, b"q")
        + mframe(0, "lo"),
        [("ping", b"p"), ("pong", b"q"), ("message", "Helllo")],
    ),
    (
        "interleaved-control-binary",
        False,
        uframe(2, b"\x00" * 200, fin=False) + uframe(9, b"x" * 125) + uframe(0, b"\x01" * 300),
        [("ping", b"x" * 125), ("message", b"\x00" * 200 + b"\x01" * 300)],
    ),
    # multi-byte characters cut at fragment boundaries
    (
        "euro-3-fragments",
        True,
        mframe(1, b"a\xe2", fin=False) + mframe(0, b"\x82", fin=False) + mframe(0, b"\xacb"),
        [("message", "a€b")],
    ),
    (
        "emoji-4-fragments",
        True,
        mframe(1, b"\xf0", fin=False)
        + mframe(0, b"\x9f", fin=False)
        + mframe(0, b"\x98", fin=False)
        + mframe(0, b"\x80"),
        [("message", "😀")],
    ),
    (
        "max-codepoint",
        True,
        mframe(1, "\U0010ffff\ud7ff\ue000\x00\x7f"),
        [("message", "\U0010ffff\ud7ff\ue000\x00\x7f")],
    ),
    # several messages in one read
    (
        "many-messages",
        True,
        b"".join(mframe(1 + (i % 2), str(i) if i % 2 == 0 else bytes([i]) * i) for i in range(40)),
        [("message", str(i) if i % 2 == 0 else bytes([i]) * i) for i in range(40)],
    ),
    # close frames
    ("close-empty", True, mframe(8), [("close", 1005, "")]),
    ("close-1000", True, mframe(8, b"\x03\xe8"), [("close", 1000, "")]),
    (
        "close-reason",
        False,
        uframe(8, struct.pack("!H", 4999) + "bye ü€😀".encode()),
        [("close", 4999, "bye ü€😀")],
    ),
    ("close-3000", True, mframe(8, struct.pack("!H", 3000) + b"x" * 123), [("close", 3000, "x" * 123)]),
    (
        "close-then-ignored",
        True,
        mframe(1, "a") + mframe(8, b"\x03\xe9") + mframe(1, "b") + b"\xff\xff\xff garbage",
        [("message", "a"), ("close", 1001, "")],
    ),
    (
        "close-mid-fragmented",
        True,
        mframe(1, "a", fin=False) + mframe(8, b"\x03\xe8bye") + mframe(0, "b"),
        [("close", 1000, "bye")],
    ),
]


def test_valid_vectors_agree_with_reference_reader():
    for name, is_server, stream, calls in VALID:
        out = O.ref_read(stream, is_server=is_server)
        assert out.calls == calls, name
        assert out.errors is None, name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,is_server,stream,calls", VALID, ids=[v[0] for v in VALID])
def test_valid_vector(name, is_server, stream, calls, mode):
    assert_outcome(stream, mode, is_server, calls, None)


# --------------------------------------------------------------------------- protocol violations

OK = mframe(1, "ok")  # a message delivered before the violation
TAIL = mframe(1, "after") + mframe(9, b"p")  # input after the violation: ignored
OKC = uframe(1, "ok")
TAILC = uframe(1, "after")


def bad(name, stream, code, *, is_server=True, pre=True, extra=(), **kw):
    """A violation after a good message (delivered first) and before more input (ignored)."""
    if is_server:
        stream = (OK if pre else b"") + stream + TAIL
    else:
        stream = (OKC if pre else b"") + stream + TAILC
    return (name, is_server, stream, ([("message", "ok")] if pre else []) + list(extra), code, kw)


INVALID_CLOSE_CODES = [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]
TRICKY_UTF8 = {
    "overlong-2": b"\xc0\x80",
    "overlong-2b": b"\xc1\xbf",
    "overlong-3": b"\xe0\x80\x80",
    "overlong-3b": b"\xe0\x9f\xbf",
    "overlong-4": b"\xf0\x80\x80\x80",
    "overlong-4b": b"\xf0\x8f\xbf\xbf",
    "surrogate-lo": b"\xed\xa0\x80",
    "surrogate-hi": b"\xed\xbf\xbf",
    "above-10ffff": b"\xf4\x90\x80\x80",
    "f5": b"\xf5\x80\x80\x80",
    "ff": b"\xff",
    "fe": b"\xfe",
    "lone-continuation": b"\x80",
    "bad-continuation": b"\xc3\x28",
    "truncated-then-ascii": b"\xe2\x82a",
    "truncated-4-then-ascii": b"\xf0\x9f\x98a",
}

INVALID = [
    bad("rsv1", mframe(1, "x", rsv=O.RSV1), 1002),
    bad("rsv2", mframe(1, "x", rsv=O.RSV2), 1002),
    bad("rsv3", mframe(2, b"x", rsv=O.RSV3), 1002),
    bad("rsv-all", mframe(2, b"x", rsv=7), 1002),
    bad("rsv1-ping", mframe(9, b"x", rsv=O.RSV1), 1002),
    bad("rsv1-continuation", mframe(1, "a", fin=False) + mframe(0, "b", rsv=O.RSV1), 1002),
    bad("rsv1-client", uframe(1, "x", rsv=O.RSV1), 1002, is_server=False),
    *[bad(f"opcode-{op:#x}", mframe(op, b"x"), 1002) for op in O.RESERVED_OPCODES],
    bad("opcode-3-empty", mframe(3), 1002),
    bad("fragmented-ping", mframe(9, b"x", fin=False) + mframe(0, b"y"), 1002),
    bad("fragmented-pong", mframe(10, b"", fin=False), 1002),
    bad("fragmented-close", mframe(8, b"\x03\xe8", fin=False), 1002),
    bad("ping-126", mframe(9, b"x" * 126), 1002),
    bad("close-126", mframe(8, b"\x03\xe8" + b"x" * 124), 1002),
    bad("pong-126-client", uframe(10, b"x" * 126), 1002, is_server=False),
    bad("ping-len16-form-small", mframe(9, b"x" * 10, len_form=16), 1002),  # 126 in the 7-bit field
    bad("ping-len64-form-small", mframe(9, b"x" * 10, len_form=64), 1002),  # 127 in the 7-bit field
    bad("continuation-without-start", mframe(0, "x"), 1002),
    bad("continuation-without-start-nofin", mframe(0, "x", fin=False), 1002),
    bad("continuation-after-complete", mframe(1, "a") + mframe(0, "b"), 1002, extra=[("message", "a")]),
    bad("text-inside-fragmented", mframe(1, "a", fin=False) + mframe(1, "b"), 1002),
    bad("binary-inside-fragmented", mframe(1, "a", fin=False) + mframe(2, b"b"), 1002),
    bad(
        "text-inside-fragmented-binary",
        mframe(2, b"a", fin=False) + mframe(9) + mframe(1, "b", fin=False),
        1002,
        extra=[("ping", b"")],
    ),
    bad("len64-top-bit", bytes([0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 5]) + KEY + b"x" * 5, 1002),
    bad("len64-all-ones", bytes([0x82, 0xFF]) + b"\xff" * 8 + KEY, 1002),
    bad(
        "len64-top-bit-unlimited",
        bytes([0x81, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0]) + KEY,
        1002,
        max_message_size=0,
    ),
    bad("unmasked-to-server", uframe(1, "x"), 1002),
    bad("unmasked-ping-to-server", uframe(9, b"x"), 1002),
    bad("unmasked-close-to-server", uframe(8, b"\x03\xe8"), 1002),
    bad("unmasked-continuation-to-server", mframe(1, "a", fin=False) + uframe(0, "b"), 1002),
    bad("masked-to-client", mframe(1, "x"), 1002, is_server=False),
    bad("masked-ping-to-client", mframe(9), 1002, is_server=False),
    bad("close-payload-1", mframe(8, b"\x03"), 1002),
    *[bad(f"close-code-{c}", mframe(8, struct.pack("!H", c)), 1002) for c in INVALID_CLOSE_CODES],
    bad("close-code-1005-with-reason", mframe(8, struct.pack("!H", 1005) + b"x"), 1002),
    bad("close-reason-bad-utf8", mframe(8, b"\x03\xe8\xff"), 1007),
    bad("close-reason-surrogate", mframe(8, b"\x03\xe8ok\xed\xa0\x80"), 1007),
    bad("close-reason-truncated", mframe(8, b"\x03\xe8\xe2\x82"), 1007),
    *[bad(f"text-{k}", mframe(1, b"abc" + v + b"def"), 1007) for k, v in TRICKY_UTF8.items()],
    bad("text-ends-truncated", mframe(1, b"abc\xe2\x82"), 1007),
    bad("text-ends-truncated-4", mframe(1, b"\xf0\x9f\x98"), 1007),
    bad("fragmented-text-ends-truncated", mframe(1, b"a\xe2", fin=False) + mframe(0, b"\x82"), 1007),
    bad("fragmented-text-bad-2nd", mframe(1, "κόσμε", fin=False) + mframe(0, b"ok\xf4\x90\x80\x80ok"), 1007),
    bad(
        "fragmented-text-bad-across",
        mframe(1, "κόσμε".encode() + b"\xf4", fin=False) + mframe(0, b"\x90\x80\x80"),
        1007,
    ),
    bad("fragmented-text-bad-then-ping", mframe(1, b"a\xff", fin=False) + mframe(9, b"not delivered"), 1007),
    bad("text-bad-client", uframe(1, b"\xc0\xaf"), 1007, is_server=False),
    # size limits: from the header alone, and accumulated over fragments
    bad("too-big-frame", mframe(2, b"x" * 1001), 1009, max_message_size=1000),
    bad("too-big-text", mframe(1, "x" * 1001), 1009, max_message_size=1000),
    bad(
        "too-big-fragments",
        mframe(2, b"x" * 600, fin=False) + mframe(0, b"y" * 401),
        1009,
        max_message_size=1000,
    ),
    bad(
        "too-big-many-fragments",
        b"".join(mframe(2 if i == 0 else 0, b"z" * 100, fin=False) for i in range(10)) + mframe(0, b"!"),
        1009,
        max_message_size=1000,
    ),
    bad("too-big-default", mframe(2, b"\x00" * ((1 << 20) + 1)), 1009),
]


def test_invalid_vectors_agree_with_reference_reader():
    for name, is_server, stream, calls, code, kw in INVALID:
        out = O.ref_read(stream, is_server=is_server, **kw)
        assert out.calls == calls, name
        assert out.errors is not None and code in out.errors, (name, out.errors)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,is_server,stream,calls,code,kw", INVALID, ids=[v[0] for v in INVALID])
def test_invalid_vector(name, is_server, stream, calls, code, kw, mode):
    if len(stream) > 100_000 and mode not in ("feed", "asyncio"):
        pytest.skip("1 MiB vector: two modes are enough")
    assert_outcome(stream, mode, is_server, calls, code, **kw)


def test_error_is_protocol_error_with_reason():
    reader = FrameReader(Recorder(), is_server=True)
    with pytest.raises(ProtocolError) as ei:
        reader.feed(mframe(3))
    assert ei.value.code == 1002
    assert isinstance(ei.value.reason, str) and ei.value.reason


@pytest.mark.parametrize(
    "code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999]
)
def test_valid_close_codes_accepted(code):
    for is_server, f in ((True, mframe), (False, uframe)):
        got, err, reader = run([f(8, struct.pack("!H", code) + b"r")], "feed", is_server=is_server)
        assert err is None
        assert got == [("close", code, "r")]
        assert reader.closed


# --------------------------------------------------------------------------- fail fast (UTF-8)


def raise_index(stream, mode="feed", *, is_server=True, **kw):
    """Feed one byte per read; return (index of the byte whose arrival raised, code, calls)."""
    rec = Recorder()
    reader = FrameReader(rec, is_server=is_server, **kw)
    for i in range(len(stream)):
        try:
            push(reader, stream[i : i + 1], mode)
        except ProtocolError as e:
            return i, e.code, rec.calls
    return None, None, rec.calls


def long_text_prefix(prefix: bytes, declared: int = 10_000, *, mask_key=KEY, fin=True, opcode=1):
    """Header of a long text frame plus only the first bytes of its payload (the frame never completes)."""
    h = O.header(opcode, declared, fin=fin, mask_key=mask_key)
    body = O.mask(prefix, mask_key) if mask_key else prefix
    return h, h + body


@pytest.mark.parametrize("mode", ["feed", "asyncio"])
@pytest.mark.parametrize("seq", list(TRICKY_UTF8.values()), ids=list(TRICKY_UTF8))
def test_fail_fast_inside_incomplete_frame(seq, mode):
    """The frame is far from complete when the invalid sequence has arrived: raise 1007 by then."""
    prefix = "hello κόσμε ".encode() + seq
    h, stream = long_text_prefix(prefix)
    idx, code, calls = raise_index(stream, mode)
    assert code == 1007, f"no 1007 before the end of the bad sequence (frame incomplete): {idx}, {code}"
    assert idx <= len(stream) - 1


@pytest.mark.parametrize("mode", ["feed", "asyncio"])
@pytest.mark.parametrize("seq", list(TRICKY_UTF8.values()), ids=list(TRICKY_UTF8))
def test_fail_fast_at_the_first_impossible_byte(seq, mode):
    """Strict fail-fast (Autobahn 6.4.x): raise on the very byte after which no completion is valid UTF-8."""
    prefix = "hello κόσμε ".encode() + seq
    first_bad, _ = O.utf8_scan(prefix)
    assert first_bad is not None
    h, stream = long_text_prefix(prefix)
    idx, code, _ = raise_index(stream, mode)
    assert (idx, code) == (len(h) + first_bad, 1007)


@pytest.mark.parametrize("mode", ["feed", "asyncio"])
def test_fail_fast_in_second_fragment(mode):
    frag1 = mframe(1, "κόσμε", fin=False)
    prefix = b"valid " + b"\xf4\x90\x80\x80" + b"more"
    h, rest = long_text_prefix(prefix, 5000, opcode=0, mask_key=KEYS[4])
    stream = OK + frag1 + mframe(9, b"p") + rest
    idx, code, calls = raise_index(stream, mode)
    assert code == 1007
    assert calls == [("message", "ok"), ("ping", b"p")]
    assert idx == len(OK) + len(frag1) + len(mframe(9, b"p")) + len(h) + 6 + 1  # at 0x90


@pytest.mark.parametrize("mode", ["feed", "asyncio"])
def test_fail_fast_across_fragment_boundary(mode):
    """Autobahn 6.4.2: 1st fragment ends with F4, 2nd fragment is the single byte 90."""
    frag1 = mframe(1, "κόσμε".encode() + b"\xf4", fin=False)
    frag2 = mframe(0, b"\x90", fin=False)
    frag3 = mframe(0, b"\x80\x80edited")
    idx, code, _ = raise_index(frag1 + frag2 + frag3, mode)
    assert (idx, code) == (len(frag1) + len(frag2) - 1, 1007)


def test_fail_fast_whole_incomplete_read():
    """One read holding the header and the first bad bytes of a long frame raises (not only byte-wise)."""
    for seq in TRICKY_UTF8.values():
        for mode in MODES:
            _, stream = long_text_prefix(b"abc" + seq + b"def", 1 << 16)
            got, err, reader = run([stream], mode)
            assert err is not None and err.code == 1007, (seq, mode)


def test_valid_text_split_at_every_point_is_not_rejected():
    text = "aé€😀\U0010ffff" * 3
    data = text.encode()
    for cut in range(len(data) + 1):
        stream = mframe(1, data[:cut], fin=False) + mframe(0, data[cut:])
        got, err, _ = run([stream], "feed")
        assert err is None and got == [("message", text)], cut
        _, partial = long_text_prefix(data[:cut], 4 * len(data))
        got, err, _ = run([partial], "feed")
        assert err is None and got == [], cut


# --------------------------------------------------------------------------- size limits


def test_max_message_size_attribute():
    assert FrameReader(Recorder()).max_message_size == 1048576
    reader = FrameReader(Recorder(), max_message_size=77)
    assert reader.max_message_size == 77
    reader.max_message_size = 10
    assert reader.max_message_size == 10
    with pytest.raises(ProtocolError) as ei:
        reader.feed(mframe(2, b"x" * 11))
    assert ei.value.code == 1009


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "length,limit",
    [
        (1001, 1000),
        (126, 125),
        (65536, 65535),
        ((1 << 20) + 1, 1 << 20),
        (1 << 40, 1 << 20),
        ((1 << 63) - 1, 1 << 30),
    ],
)
def test_too_big_from_the_header_alone(length, limit, mode):
    rec = Recorder()
    reader = FrameReader(rec, is_server=True, max_message_size=limit)
    with pytest.raises(ProtocolError) as ei:
        push(reader, O.header(2, length, mask_key=KEY), mode)
    assert ei.value.code == 1009
    assert isinstance(ei.value, PayloadTooBig)
    assert reader.closed and rec.calls == []


@pytest.mark.parametrize("mode", MODES)
def test_too_big_fragments_from_the_header_alone(mode):
    rec = Recorder()
    reader = FrameReader(rec, is_server=True, max_message_size=1000)
    push(reader, mframe(1, "a" * 600, fin=False) + mframe(9, b"p" * 125), mode)
    assert rec.calls == [("ping", b"p" * 125)]
    with pytest.raises(ProtocolError) as ei:
        push(reader, O.header(0, 401, mask_key=KEY), mode)
    assert ei.value.code == 1009


@pytest.mark.parametrize("mode", MODES)
def test_exactly_max_message_size_is_accepted(mode):
    for is_server, f in ((True, mframe), (False, uframe)):
        stream = f(2, b"x" * 1000) + f(2, b"y" * 600, fin=False) + f(9, b"c" * 125) + f(0, b"z" * 400)
        got, err, _ = run([stream], mode, is_server=is_server, max_message_size=1000)
        assert err is None
        assert got == [("message", b"x" * 1000), ("ping", b"c" * 125), ("message", b"y" * 600 + b"z" * 400)]


@pytest.mark.parametrize("mode", ["feed", "uvloop", "asyncio"])
def test_unlimited_message_size(mode):
    big = random.Random(3).randbytes(3 << 19)  # 1.5 MiB
    stream = mframe(2, big[: 1 << 20], fin=False, mask_key=KEYS[4]) + mframe(
        0, big[1 << 20 :], mask_key=KEYS[3]
    )
    got, err, _ = run(
        [stream[i : i + 100_003] for i in range(0, len(stream), 100_003)], mode, max_message_size=0
    )
    assert err is None and got == [("message", big)]
    # a header announcing 1 TiB is no error when unlimited (the payload just has not arrived)
    reader = FrameReader(Recorder(), is_server=True, max_message_size=0)
    push(reader, O.header(2, 1 << 40, mask_key=KEY) + b"abc", mode)
    assert not reader.closed


def test_64k_binary_byte_by_byte():
    for mode in ("feed", "asyncio"):
        stream = mframe(2, BIN64K, mask_key=KEYS[4])
        got, err, _ = run([stream[i : i + 1] for i in range(len(stream))], mode)
        assert err is None and got == [("message", BIN64K)]


# --------------------------------------------------------------------------- reader state


def test_closed_property_and_input_after_close_is_ignored():
    rec = Recorder()
    reader = FrameReader(rec, is_server=True)
    assert not reader.closed
    reader.feed(mframe(1, "a"))
    assert not reader.closed
    reader.feed(mframe(8, b"\x03\xe8") + mframe(1, "b"))
    assert reader.closed
    assert rec.calls == [("message", "a"), ("close", 1000, "")]
    reader.feed(mframe(1, "c") + b"\x00garbage")  # no call, no error
    buf = reader.get_buffer(-1)
    assert len(buf) > 0
    buf[:3] = b"\x83\x80\x00"
    del buf
    reader.buffer_updated(3)
    assert rec.calls == [("message", "a"), ("close", 1000, "")]


def test_input_after_error_is_ignored():
    rec = Recorder()
    reader = FrameReader(rec, is_server=True)
    with pytest.raises(ProtocolError):
        reader.feed(mframe(1, "a") + uframe(1, "unmasked"))
    assert reader.closed
    reader.feed(mframe(1, "b"))
    reader.feed(uframe(1, "again unmasked"))
    buf = reader.get_buffer(-1)
    buf[:2] = b"\x81\x00"
    reader.buffer_updated(2)
    del buf
    assert rec.calls == [("message", "a")]


def test_feed_empty_is_a_no_op():
    rec = Recorder()
    reader = FrameReader(rec, is_server=True)
    reader.feed(b"")
    reader.feed(bytearray())
    reader.feed(memoryview(b""))
    assert rec.calls == [] and reader.buffered == 0 and not reader.closed


def test_buffered():
    rec = Recorder()
    reader = FrameReader(rec, is_server=True)
    assert reader.buffered == 0
    reader.feed(mframe(2, b"abc")[:1])
    assert reader.buffered > 0  # half a header
    reader.feed(mframe(2, b"abc")[1:])
    assert reader.buffered == 0 and rec.calls == [("message", b"abc")]
    reader.feed(mframe(2, b"x" * 100, fin=False))
    assert reader.buffered >= 100  # a fragment waiting for the rest of its message
    reader.feed(mframe(9, b"ping"))
    assert reader.buffered >= 100
    reader.feed(mframe(0, b"y" * 50)[:30])
    assert reader.buffered >= 100
    reader.feed(mframe(0, b"y" * 50)[30:])
    assert reader.buffered == 0
    assert rec.calls[-1] == ("message", b"x" * 100 + b"y" * 50)


def test_get_buffer_is_writable_and_nonempty():
    reader = FrameReader(Recorder(), is_server=True)
    for hint in (-1, 0, 1, 100, 65536, 1 << 20):
        buf = reader.get_buffer(hint)
        assert isinstance(buf, memoryview)
        assert not buf.readonly and len(buf) > 0 and buf.nbytes == len(buf)
        del buf


def test_message_data_does_not_alias_the_read_buffer():
    """Delivered bytes must stay intact after the reader reuses its buffer."""
    rec = Recorder()
    reader = FrameReader(rec, is_server=True)
    for i in range(50):
        push(reader, mframe(2, bytes([i]) * 64) + mframe(9, bytes([i]) * 8), "asyncio")
    assert rec.calls == [
        c for i in range(50) for c in (("message", bytes([i]) * 64), ("ping", bytes([i]) * 8))
    ]


def test_reader_in_another_thread():
    import threading

    result = {}

    def work():
        got, err, _ = run([mframe(2, BIN256) * 3, mframe(1, "x" * 70000)], "asyncio")
        result["v"] = (got, err)

    t = threading.Thread(target=work)
    t.start()
    got, err, _ = run([mframe(1, "main") * 2], "asyncio")
    t.join()
    assert err is None and got == [("message", "main")] * 2
    assert result["v"] == ([("message", BIN256)] * 3 + [("message", "x" * 70000)], None)


def test_two_readers_interleaved_get_buffer():
    """Two connections on one loop: each get_buffer/buffer_updated pair is used back to back."""
    recs = [Recorder(), Recorder()]
    readers = [FrameReader(r, is_server=True) for r in recs]
    streams = [b"".join(mframe(1, f"{k}-{i}" * (i + 1)) for i in range(60)) for k in range(2)]
    rng = random.Random(5)
    pos = [0, 0]
    while pos[0] < len(streams[0]) or pos[1] < len(streams[1]):
        k = rng.randrange(2)
        if pos[k] >= len(streams[k]):
            k = 1 - k
        n = rng.randint(1, 40)
        push(readers[k], streams[k][pos[k] : pos[k] + n], "asyncio")
        pos[k] += n
    for k in range(2):
        assert recs[k].calls == [("message", f"{k}-{i}" * (i + 1)) for i in range(60)]


def test_synchronous_loopback_does_not_corrupt_a_partial_frame():
    """A writer whose write() synchronously feeds another reader (an in-memory transport pair, as
    test harnesses use) must not clobber the bytes of a partial frame the first reader still holds."""
    client_rec = Recorder()
    client = FrameReader(client_rec, is_server=False)

    def deliver(data):
        buf = client.get_buffer(-1)
        buf[: len(data)] = data
        client.buffer_updated(len(data))

    writer = FrameWriter(deliver, is_server=True)

    class BigEcho(Recorder):
        def on_message(self, data):
            super().on_message(data)
            writer.send(data * 20)

    rec = BigEcho()
    server = FrameReader(rec, is_server=True, writer=writer)
    second = mframe(1, "second message")
    push(server, mframe(1, "first") + second[:8], "asyncio")
    push(server, second[8:], "asyncio")
    assert rec.calls == [("message", "first"), ("message", "second message")]
    assert client_rec.calls == [("message", "first" * 20), ("message", "second message" * 20)]


# ------------------------------------------------------------- differential fuzz vs the reference reader


@st.composite
def frame_streams(draw):
    """Mostly well-formed conversations (fragmented messages, interleaved control frames, a close),
    with a mutation in about a third of them: wrong bits, opcodes, masking, lengths, UTF-8, close codes."""
    is_server = draw(st.booleans())
    max_size = draw(st.sampled_from([0, 300, 1 << 20]))
    specs = []  # [opcode, payload, fin, rsv, masked]
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["text", "binary", "ping", "pong"]))
        if kind in ("ping", "pong"):
            specs.append([9 if kind == "ping" else 10, draw(st.binary(max_size=125)), True, 0, is_server])
            continue
        if kind == "text":
            raw = draw(st.text(max_size=120)).encode()
        else:
            raw = draw(st.binary(max_size=400))
        cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=3)))
        bounds = [0, *cuts, len(raw)]
        frags = [raw[x:y] for x, y in zip(bounds, bounds[1:], strict=False)]
        for j, frag in enumerate(frags):
            if j and draw(st.integers(0, 3)) == 0:
                specs.append([9, draw(st.binary(max_size=20)), True, 0, is_server])
            specs.append(
                [(1 if kind == "text" else 2) if j == 0 else 0, frag, j == len(frags) - 1, 0, is_server]
            )
    if draw(st.booleans()):
        specs.append([8, draw(st.sampled_from([b"", b"\x03\xe8", b"\x0f\xa0bye"])), True, 0, is_server])
    if draw(st.integers(0, 2)) == 0:  # one mutation
        f = specs[draw(st.integers(0, len(specs) - 1))]
        what = draw(st.sampled_from(["rsv", "opcode", "fin", "mask", "utf8", "close", "big", "control-len"]))
        if what == "rsv":
            f[3] = draw(st.integers(1, 7))
        elif what == "opcode":
            f[0] = draw(st.integers(0, 15))
        elif what == "fin":
            f[2] = not f[2]
        elif what == "mask":
            f[4] = not f[4]
        elif what == "utf8":
            pos = draw(st.integers(0, len(f[1])))
            f[1] = f[1][:pos] + draw(st.sampled_from(list(TRICKY_UTF8.values()))) + f[1][pos:]
            if draw(st.booleans()):
                f[0] = 1
        elif what == "close":
            f[0], f[2] = 8, True
            f[1] = draw(
                st.sampled_from(
                    [
                        b"\x03",
                        struct.pack("!H", 1005),
                        struct.pack("!H", 2999),
                        struct.pack("!H", 5000),
                        b"\x03\xe8\xff",
                        b"\x03\xe8\xe2\x82",
                        struct.pack("!H", 1014) + b"ok",
                    ]
                )
            )
        elif what == "big":
            f[1] = f[1] + b"x" * draw(st.integers(100, 400))
        else:
            f[1] = f[1] + b"y" * (126 - len(f[1])) if len(f[1]) < 126 else f[1]
    out = [
        O.frame(op, pl, fin=fin, rsv=rsv, mask_key=draw(st.binary(min_size=4, max_size=4)) if m else None)
        for op, pl, fin, rsv, m in specs
    ]
    stream = b"".join(out)
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=6))
    mode = draw(st.sampled_from(MODES))
    return is_server, max_size, stream, cuts, mode


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame_streams())
def test_differential_against_reference_reader(case):
    is_server, max_size, stream, cuts, mode = case
    expected = O.ref_read(stream, is_server=is_server, max_message_size=max_size)
    got, err, reader = run(O.splits(stream, cuts), mode, is_server=is_server, max_message_size=max_size)
    assert got == expected.calls
    if expected.errors is None:
        assert err is None, err
    else:
        assert err is not None and err.code in expected.errors, (err, expected.errors)
    assert reader.closed == expected.closed


# ----------------------------------------------------------------- permessage-deflate hook (inflate)


class Reverser(Compressor):
    """The compressing side of the stand-in below: reverses the payload."""

    def __call__(self, data):
        return bytes(data)[::-1]


class Inflater(Decompressor):
    """A stand-in for permessage-deflate: the 'compressed' form is the reversed payload (a Python
    Decompressor: the wire core calls it through the C interface, as it calls fastws._zlib's)."""

    def __init__(self, grow: int = 0):
        self.calls: list[bytes] = []
        self.grow = grow

    def __call__(self, data):
        data = bytes(data)
        self.calls.append(data)
        return data[::-1] + b"!" * self.grow


@pytest.mark.parametrize("mode", MODES)
def test_inflate_whole_message(mode):
    inf = Inflater()
    text = "héllo wörld".encode()
    stream = (
        mframe(2, b"abc"[::-1], rsv=O.RSV1)
        + mframe(1, text[::-1], rsv=O.RSV1)  # wire bytes are not UTF-8: checked after inflating only
        + mframe(1, text[::-1][:5], fin=False, rsv=O.RSV1)
        + mframe(9, b"p")
        + mframe(0, text[::-1][5:], fin=False)
        + mframe(0, b"")
        + mframe(2, b"plain")  # RSV1 clear: not inflated
    )
    got, err, _ = run([stream], mode, inflate=inf)
    assert err is None
    assert got == [
        ("message", b"abc"),
        ("message", "héllo wörld"),
        ("ping", b"p"),
        ("message", "héllo wörld"),
        ("message", b"plain"),
    ]
    assert inf.calls == [b"cba", text[::-1], text[::-1]]


@pytest.mark.parametrize(
    "name,stream,code",
    [
        ("rsv1-continuation", mframe(1, b"a", fin=False, rsv=O.RSV1) + mframe(0, b"b", rsv=O.RSV1), 1002),
        ("rsv1-ping", mframe(9, b"a", rsv=O.RSV1), 1002),
        ("rsv1-close", mframe(8, b"\x03\xe8", rsv=O.RSV1), 1002),
        ("rsv2", mframe(2, b"a", rsv=O.RSV2), 1002),
        ("rsv3", mframe(2, b"a", rsv=O.RSV1 | O.RSV3), 1002),
        ("inflated-bad-utf8", mframe(1, b"\xffabc", rsv=O.RSV1), 1007),  # inflates to b"cba\xff"
        ("inflated-truncated-utf8", mframe(1, b"\xe2abc", rsv=O.RSV1), 1007),
    ],
)
def test_inflate_violations(name, stream, code):
    got, err, _ = run([OK + stream + TAIL], "feed", inflate=Inflater())
    assert got == [("message", "ok")]
    assert err is not None and err.code == code


def test_inflate_errors_propagate():
    """The inflater enforces the size limit (PayloadTooBig) and rejects bad data (1002)."""
    from fastws.errors import PayloadTooBig as TooBig

    class TooBigInflater(Decompressor):
        def __call__(self, data):
            raise TooBig("decompressed message too big")

    class CorruptInflater(Decompressor):
        def __call__(self, data):
            raise ProtocolError(1002, "invalid compressed data")

    for inflate, code in ((TooBigInflater(), 1009), (CorruptInflater(), 1002)):
        writes: list = []
        writer = FrameWriter(writes.append, is_server=True)
        rec = Echo(writer)
        reader = FrameReader(rec, is_server=True, inflate=inflate, writer=writer)
        with pytest.raises(ProtocolError) as ei:
            reader.feed(OK + mframe(2, b"zz", rsv=O.RSV1) + TAIL)
        assert ei.value.code == code
        assert rec.calls == [("message", "ok")] and reader.closed and not writer.corked
        assert writes == [uframe(1, "ok")]
        reader.feed(mframe(1, "ignored"))
        assert rec.calls == [("message", "ok")]


def test_set_inflate():
    rec = Recorder()
    reader = FrameReader(rec, is_server=True)
    reader.set_inflate(Inflater())
    reader.feed(mframe(2, b"cba", rsv=O.RSV1))
    reader.set_inflate(None)
    with pytest.raises(ProtocolError) as ei:
        reader.feed(mframe(2, b"cba", rsv=O.RSV1))
    assert ei.value.code == 1002
    assert rec.calls == [("message", b"abc")]


@pytest.mark.parametrize("mode", ["feed", "asyncio"])
def test_fail_fast_after_a_compressed_fragmented_message(mode):
    """Fail-fast UTF-8 must not depend on whether the previous message was compressed."""
    for first in (
        mframe(1, b"cb", fin=False, rsv=O.RSV1) + mframe(0, b"a"),  # compressed, fragmented
        mframe(1, b"cba", rsv=O.RSV1),  # compressed, one frame
        mframe(1, b"a", fin=False) + mframe(0, b"bc"),  # plain, fragmented
    ):
        h, partial = long_text_prefix(b"abc\xff", 1000)
        rec = Recorder()
        reader = FrameReader(rec, is_server=True, inflate=Inflater())
        push(reader, first, mode)
        assert rec.calls == [("message", "abc")]
        with pytest.raises(ProtocolError) as ei:
            push(reader, partial, mode)  # the frame is incomplete: only fail-fast can catch it
        assert ei.value.code == 1007, first


def test_inflate_with_zlib_roundtrip():
    """A realistic inflate callable (raw deflate + RFC 7692 tail) plugged into the reader."""
    msgs = ["hello " * 50, b"\x00\x01" * 300, "κόσμε" * 40]
    comp = zlib.compressobj(wbits=-15)
    stream = b""
    for m in msgs:
        data = m.encode() if isinstance(m, str) else m
        c = comp.compress(data) + comp.flush(zlib.Z_SYNC_FLUSH)
        assert c.endswith(b"\x00\x00\xff\xff")
        stream += mframe(1 if isinstance(m, str) else 2, c[:-4], rsv=O.RSV1)
    dec = zlib.decompressobj(wbits=-15)

    class ZlibInflater(Decompressor):  # context takeover: one stream for the whole connection
        def __call__(self, data):
            return dec.decompress(bytes(data) + b"\x00\x00\xff\xff")

    got, err, _ = run([stream], "asyncio", inflate=ZlibInflater())
    assert err is None and got == [("message", m) for m in msgs]


# --------------------------------------------------------------------------- the reader corks its writer


class Echo(Recorder):
    def __init__(self, writer):
        super().__init__()
        self.writer = writer

    def on_message(self, data):
        super().on_message(data)
        self.writer.send(data)

    def on_ping(self, payload):
        super().on_ping(payload)
        self.writer.send_pong(payload)


@pytest.mark.parametrize("mode", MODES)
def test_reader_coalesces_replies_into_one_write(mode):
    writes: list = []
    writer = FrameWriter(writes.append, is_server=True)
    h = Echo(writer)
    reader = FrameReader(h, is_server=True, writer=writer)
    stream = mframe(1, "a") + mframe(2, b"b") + mframe(9, b"p") + mframe(1, "c", fin=False) + mframe(0, "d")
    push(reader, stream, mode)
    assert len(writes) == 1, f"{len(writes)} writes for one read"
    assert type(writes[0]) is bytes
    assert writes[0] == uframe(1, "a") + uframe(2, b"b") + uframe(10, b"p") + uframe(1, "cd")
    assert not writer.corked
    push(reader, mframe(1, "e"), mode)
    assert writes[1:] == [uframe(1, "e")]
    push(reader, mframe(1, "f")[:3], mode)  # nothing complete: nothing written
    assert len(writes) == 2
    assert writes[0] == uframe(1, "a") + uframe(2, b"b") + uframe(10, b"p") + uframe(1, "cd")  # not mutated


def test_reader_flushes_and_uncorks_its_writer_on_error():
    writes: list = []
    writer = FrameWriter(writes.append, is_server=True)
    reader = FrameReader(Echo(writer), is_server=True, writer=writer)
    with pytest.raises(ProtocolError):
        reader.feed(mframe(1, "a") + mframe(9, b"p") + mframe(3))
    assert not writer.corked
    assert b"".join(writes) == uframe(1, "a") + uframe(10, b"p")
    writer.send_close(1002)
    assert b"".join(writes).endswith(uframe(8, b"\x03\xea"))


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_encode_frame_length_encodings(n):
    payload = bytes(i & 0xFF for i in range(n))
    data = encode_frame(_frame.OP_BINARY, payload)
    assert type(data) is bytes
    assert data == O.frame(2, payload)
    assert len(data) == O.header_len(n, False) + n


def test_encode_frame_header_bits():
    assert encode_frame(1, "Hello") == bytes.fromhex("810548656c6c6f")
    assert encode_frame(1, "Hel", fin=False) == bytes.fromhex("010348656c")
    assert encode_frame(0, b"lo") == bytes.fromhex("80026c6f")
    assert encode_frame(2, b"z", rsv1=True) == b"\xc2\x01z"
    assert encode_frame(1, b"z", fin=False, rsv1=True) == b"\x41\x01z"
    assert encode_frame(9, b"") == b"\x89\x00"
    assert encode_frame(10, b"Hello") == bytes.fromhex("8a0548656c6c6f")
    assert encode_frame(8, b"\x03\xe8") == b"\x88\x02\x03\xe8"
    assert encode_frame(1, "é€😀") == b"\x81\x09" + "é€😀".encode()


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 125, 126, 127, 300, 65535, 65536, 70001])
def test_encode_frame_masked_parses_back(n):
    payload = random.Random(n).randbytes(n)
    data = encode_frame(_frame.OP_BINARY, payload, mask=True)
    frames, rest = O.parse_frames(data)
    assert rest == b"" and len(frames) == 1
    f = frames[0]
    assert (f.fin, f.rsv, f.opcode, f.masked, f.payload) == (True, 0, 2, True, payload)
    assert data == O.frame(2, payload, mask_key=f.mask_key)
    got, err, _ = run([data], "feed", max_message_size=0)
    assert err is None and got == [("message", payload)]


def test_encode_frame_masked_uses_fresh_keys():
    keys = {O.parse_frames(encode_frame(1, "x", mask=True))[0][0].mask_key for _ in range(32)}
    assert len(keys) > 1


def test_encode_frame_masked_text_fin_rsv():
    data = encode_frame(1, "héllo", fin=False, rsv1=True, mask=True)
    (f,), _ = O.parse_frames(data)
    assert (f.fin, f.rsv, f.opcode, f.masked, f.payload) == (False, 4, 1, True, "héllo".encode())


# --------------------------------------------------------------------------- FrameWriter


def frames_of(writes):
    frames, rest = O.parse_frames(b"".join(writes))
    assert rest == b""
    return frames


def test_writer_server_role():
    writes: list = []
    w = FrameWriter(writes.append, is_server=True)
    assert not w.corked
    w.send("héllo")
    w.send(b"\x00\x01")
    w.send(bytearray(b"ba"))
    w.send(memoryview(b"xmvx")[1:3])
    w.send(b"x" * 126)
    w.send(b"y" * 65536)
    w.send_ping(b"pi")
    w.send_pong(b"po")
    w.send_ping()
    w.send_pong()
    w.send_frame(_frame.OP_TEXT, "fr", fin=False)
    w.send_frame(_frame.OP_CONTINUATION, b"ag", fin=True)
    w.send_frame(_frame.OP_BINARY, b"r", rsv1=True)
    w.send_raw(b"\x82\x03raw")
    w.send_close(4000, "bye ü")
    w.send_close()
    assert all(type(x) is bytes for x in writes)
    assert writes == [
        O.frame(1, "héllo"),
        O.frame(2, b"\x00\x01"),
        O.frame(2, b"ba"),
        O.frame(2, b"mv"),
        O.frame(2, b"x" * 126),
        O.frame(2, b"y" * 65536),
        O.frame(9, b"pi"),
        O.frame(10, b"po"),
        O.frame(9),
        O.frame(10),
        O.frame(1, "fr", fin=False),
        O.frame(0, b"ag"),
        O.frame(2, b"r", rsv=O.RSV1),
        b"\x82\x03raw",
        O.frame(8, struct.pack("!H", 4000) + "bye ü".encode()),
        O.frame(8, b"\x03\xe8"),
    ]


def test_writer_client_role_masks_every_frame():
    writes: list = []
    w = FrameWriter(writes.append, is_server=False)
    w.send("héllo")
    w.send(b"\x00" * 300)
    w.send_ping(b"pi")
    w.send_pong(b"po")
    w.send_frame(_frame.OP_BINARY, b"ab", fin=False)
    w.send_frame(_frame.OP_CONTINUATION, b"cd")
    w.send_close(1001, "away")
    frames = frames_of(writes)
    assert all(f.masked for f in frames)
    assert [(f.fin, f.opcode, f.payload) for f in frames] == [
        (True, 1, "héllo".encode()),
        (True, 2, b"\x00" * 300),
        (True, 9, b"pi"),
        (True, 10, b"po"),
        (False, 2, b"ab"),
        (True, 0, b"cd"),
        (True, 8, b"\x03\xe9away"),
    ]
    assert len({f.mask_key for f in frames}) > 1, "client frames need a fresh masking key each"
    got, err, _ = run(writes, "feed", is_server=True)
    assert err is None
    assert got == [
        ("message", "héllo"),
        ("message", b"\x00" * 300),
        ("ping", b"pi"),
        ("pong", b"po"),
        ("message", b"abcd"),
        ("close", 1001, "away"),
    ]


@pytest.mark.parametrize("is_server", [True, False])
def test_writer_cork_coalesces_into_one_write(is_server):
    writes: list = []
    w = FrameWriter(writes.append, is_server=is_server)
    w.cork()
    assert w.corked
    w.send("a")
    w.send(b"b" * 200)
    w.send_ping(b"p")
    w.send_raw(b"\x81\x01r")
    w.send_close(1000, "x")
    assert writes == []
    w.uncork()
    assert not w.corked
    assert len(writes) == 1 and type(writes[0]) is bytes
    first = writes[0]
    frames = frames_of(writes)
    assert [(f.opcode, f.payload, f.masked) for f in frames] == [
        (1, b"a", not is_server),
        (2, b"b" * 200, not is_server),
        (9, b"p", not is_server),
        (1, b"r", False),
        (8, b"\x03\xe8x", not is_server),
    ]
    if is_server:
        assert first == O.frame(1, "a") + O.frame(2, b"b" * 200) + O.frame(9, b"p") + b"\x81\x01r" + O.frame(
            8, b"\x03\xe8x"
        )
    w.uncork()  # nothing queued: no (empty) write
    assert len(writes) == 1
    w.send("after")
    assert len(writes) == 2
    w.cork()
    w.send(b"again")
    w.uncork()
    assert writes[0] == first, "an earlier write was mutated (buffer reused after write)"
    assert frames_of(writes[2:])[0].payload == b"again"


def test_writer_deflate_threshold():
    writes: list = []
    calls = []

    class Deflate(Compressor):
        def __call__(self, b):  # a text message comes as its UTF-8
            calls.append(b)
            return b"D" + b[:3]

    w = FrameWriter(writes.append, is_server=True, deflate=Deflate(), compress_threshold=10)
    w.send(b"x" * 9)
    w.send(b"y" * 10)
    w.send("t" * 10)
    w.send_ping(b"z" * 100)
    w.send_close(1000, "r" * 50)
    assert writes == [
        O.frame(2, b"x" * 9),
        O.frame(2, b"Dyyy", rsv=O.RSV1),
        O.frame(1, b"Dttt", rsv=O.RSV1),
        O.frame(9, b"z" * 100),
        O.frame(8, b"\x03\xe8" + b"r" * 50),
    ]
    assert calls == [b"y" * 10, b"t" * 10]


def test_writer_without_deflate_never_sets_rsv1():
    writes: list = []
    w = FrameWriter(writes.append, is_server=True)
    w.send(b"x" * 1000)
    assert writes == [O.frame(2, b"x" * 1000)]


def test_writer_writelines_for_big_unmasked_payloads():
    log: list = []
    big = bytes(range(256)) * 300  # 76,800 bytes
    w = FrameWriter(
        lambda b: log.append(("write", b)),
        is_server=True,
        writelines=lambda seq: log.append(("writelines", tuple(seq))),
    )
    w.cork()
    w.send("a")
    w.send(big)
    w.send("b")
    w.uncork()
    stream = b"".join(x[1] if x[0] == "write" else b"".join(x[1]) for x in log)
    assert [(f.opcode, f.payload) for f in frames_of([stream])] == [(1, b"a"), (2, big), (1, b"b")]
    wl = [x for x in log if x[0] == "writelines"]
    if wl:  # the payload goes out uncopied: the very object given
        assert any(part is big for part in wl[0][1])
    # a mutable buffer is never passed on uncopied
    log.clear()
    ba = bytearray(big)
    w.send(ba)
    ba[:10] = b"\x00" * 10
    stream = b"".join(x[1] if x[0] == "write" else b"".join(x[1]) for x in log)
    assert frames_of([stream])[0].payload == big
    # clients mask, so they always copy
    log.clear()
    c = FrameWriter(
        lambda b: log.append(("write", b)),
        is_server=False,
        writelines=lambda seq: log.append(("writelines", tuple(seq))),
    )
    c.send(big)
    assert [x[0] for x in log] == ["write"]
    assert frames_of([log[0][1]])[0].payload == big


@pytest.mark.parametrize("is_server", [True, False])
def test_writer_fragment_size(is_server):
    writes: list = []
    w = FrameWriter(writes.append, is_server=is_server, fragment_size=4)
    assert w.fragment_size == 4
    w.send(b"0123456789")
    w.send("héllo!")  # 7 bytes: split inside the é is fine, the receiver reassembles
    w.send(b"abcd")
    w.send_ping(b"0123456789")  # control frames are never fragmented
    frames = frames_of(writes)
    assert [(f.fin, f.opcode, f.payload) for f in frames] == [
        (False, 2, b"0123"),
        (False, 0, b"4567"),
        (True, 0, b"89"),
        (False, 1, b"h\xc3\xa9l"),
        (True, 0, b"lo!"),
        (True, 2, b"abcd"),
        (True, 9, b"0123456789"),
    ]
    got, err, _ = run(writes, "feed", is_server=not is_server)
    assert err is None
    assert got == [
        ("message", b"0123456789"),
        ("message", "héllo!"),
        ("message", b"abcd"),
        ("ping", b"0123456789"),
    ]


def test_writer_fragment_size_with_deflate_sets_rsv1_on_first_frame_only():
    writes: list = []
    w = FrameWriter(writes.append, is_server=True, deflate=Reverser(), compress_threshold=0, fragment_size=3)
    w.send(b"abcdefg")
    frames = frames_of(writes)
    assert [(f.fin, f.rsv, f.opcode, f.payload) for f in frames] == [
        (False, 4, 2, b"gfe"),
        (False, 0, 0, b"dcb"),
        (True, 0, 0, b"a"),
    ]
    got, err, _ = run(writes, "feed", is_server=False, inflate=Inflater())
    assert err is None and got == [("message", b"abcdefg")]


def test_writer_set_deflate_and_threshold_attribute():
    writes: list = []
    w = FrameWriter(writes.append, is_server=True)
    assert w.compress_threshold == 128
    class Z(Compressor):
        def __call__(self, b):
            return b"Z"

    w.set_deflate(Z(), 2)
    assert w.compress_threshold == 2
    w.send(b"a")
    w.send(b"ab")
    w.compress_threshold = 5
    w.send(b"abcd")
    w.set_deflate(None)
    w.send(b"x" * 500)
    assert writes == [
        O.frame(2, b"a"),
        O.frame(2, b"Z", rsv=O.RSV1),
        O.frame(2, b"abcd"),
        O.frame(2, b"x" * 500),
    ]


def test_writer_buffered_and_big_corked_batches():
    writes: list = []
    w = FrameWriter(writes.append, is_server=False)
    assert w.buffered == 0
    w.cork()
    w.send(b"abc")
    assert w.buffered == len(O.frame(2, b"abc", mask_key=KEY))
    payloads = [bytes([i]) * 30000 for i in range(20)]  # 600 KB while corked: may flush early, in order
    for p in payloads:
        w.send(p)
    w.uncork()
    assert w.buffered == 0
    assert [f.payload for f in frames_of(writes)] == [b"abc"] + payloads
    assert all(type(x) is bytes for x in writes)


def test_writers_corked_at_once_keep_their_own_output():
    # The writers of a process share one output buffer while corked; whoever finds it taken uses its
    # own.  Interleaved sends, a writer that grows past what the shared buffer keeps, and one that is
    # dropped while corked must leave every writer with exactly its own frames, in order.
    outputs = [[] for _ in range(4)]
    writers = [FrameWriter(out.append, is_server=True) for out in outputs]
    sent = [[] for _ in writers]
    for round_ in range(3):
        for w in writers:
            w.cork()
        for i in range(40):
            for k, w in enumerate(writers):
                size = 100_000 if (k == 1 and i == 7) else 10 + 37 * k + i  # writer 1: past the kept size once
                payload = bytes([65 + k]) * size
                w.send(payload)
                sent[k].append(payload)
        order = [2, 0, 3, 1] if round_ % 2 else [1, 3, 0, 2]
        for k in order:
            writers[k].uncork()
            assert [f.payload for f in frames_of(outputs[k])] == sent[k]
    dropped = FrameWriter([].append, is_server=True)
    dropped.cork()
    dropped.send(b"x" * 50)
    del dropped  # freed while holding the buffer: the next writer still gets a working one
    out: list = []
    w = FrameWriter(out.append, is_server=True)
    w.cork()
    w.send(b"after")
    w.uncork()
    assert [f.payload for f in frames_of(out)] == [b"after"]


def test_writer_refuses_invalid_frames():
    w = FrameWriter([].append, is_server=True)
    for call in (
        lambda: w.send_ping(b"x" * 126),
        lambda: w.send_pong(b"x" * 126),
        lambda: w.send_frame(_frame.OP_PING, b"", fin=False),
        lambda: w.send_frame(3, b""),
        lambda: w.send_close(1005),
        lambda: w.send_close(1000, "x" * 124),
        lambda: encode_frame(_frame.OP_CLOSE, b"x" * 126),
        lambda: encode_frame(0xB, b""),
        lambda: encode_close_payload(1006),
        lambda: encode_close_payload(1000, "é" * 62),
    ):
        with pytest.raises(ValueError):
            call()
    w.send_ping(b"x" * 125)
    w.send_close(1000, "x" * 123)


# --------------------------------------------------------------------------- close payloads


def test_encode_close_payload():
    assert encode_close_payload() == b"\x03\xe8"
    assert encode_close_payload(1001) == b"\x03\xe9"
    assert encode_close_payload(4000, "bye") == b"\x0f\xa0bye"
    assert encode_close_payload(1000, "ü€") == b"\x03\xe8" + "ü€".encode()


def test_parse_close_payload():
    assert parse_close_payload(b"") == (1005, "")
    assert parse_close_payload(b"\x03\xe8") == (1000, "")
    assert parse_close_payload(b"\x0f\xa0" + "bye ü".encode()) == (4000, "bye ü")
    with pytest.raises(ProtocolError) as ei:
        parse_close_payload(b"\x03")
    assert ei.value.code == 1002
    for code in INVALID_CLOSE_CODES:
        with pytest.raises(ProtocolError) as ei:
            parse_close_payload(struct.pack("!H", code) + b"r")
        assert ei.value.code == 1002, code
    for seq in TRICKY_UTF8.values():
        with pytest.raises(ProtocolError) as ei:
            parse_close_payload(b"\x03\xe8" + seq)
        assert ei.value.code == 1007, seq
    with pytest.raises(ProtocolError) as ei:
        parse_close_payload(b"\x03\xe8\xe2\x82")
    assert ei.value.code == 1007


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([c for c in range(5000) if O.is_valid_close_code(c)]), st.text(max_size=40))
def test_close_payload_round_trip(code, reason):
    payload = encode_close_payload(code, reason)
    assert payload == struct.pack("!H", code) + reason.encode()
    assert parse_close_payload(payload) == (code, reason)
    assert parse_close_payload(bytearray(payload)) == (code, reason)


def test_is_valid_close_code_sweep():
    for code in range(0, 65536):
        assert bool(is_valid_close_code(code)) == O.is_valid_close_code(code), code
    assert is_valid_close_code(1000) is True and is_valid_close_code(1005) is False


# --------------------------------------------------------------------------- transport-facing options


def test_on_error_receives_protocol_errors_instead_of_raising():
    errors = []
    rec = Recorder()
    reader = FrameReader(rec, is_server=True, on_error=errors.append)
    stream = mframe(1, "ok") + bytes([0x83, 0x80]) + KEY  # then a reserved opcode
    buf = reader.get_buffer(-1)
    buf[: len(stream)] = stream
    reader.buffer_updated(len(stream))  # must not raise
    assert rec.calls == [("message", "ok")]
    assert len(errors) == 1 and isinstance(errors[0], ProtocolError) and errors[0].code == 1002
    assert reader.closed and reader.reads == 1


def test_on_error_receives_handler_exceptions_and_the_stream_stays_in_sync():
    errors = []

    class Boom(Recorder):
        def on_message(self, data):
            super().on_message(data)
            if data == "boom":
                raise RuntimeError("handler failed")

    rec = Boom()
    reader = FrameReader(rec, is_server=True, on_error=errors.append)
    first = mframe(1, "boom") + mframe(1, "after")[:3]
    for chunk in (first, mframe(1, "after")[3:] + mframe(8, encode_close_payload(1000))):
        buf = reader.get_buffer(-1)
        buf[: len(chunk)] = chunk
        reader.buffer_updated(len(chunk))
    assert [type(e) for e in errors] == [RuntimeError]
    # the frame after the failing message was kept, and the close frame still parses
    assert rec.calls == [("message", "boom"), ("message", "after"), ("close", 1000, "")]
    assert reader.reads == 2


def test_on_close_comes_after_the_writer_flushed_this_reads_replies():
    written = []
    events = []
    writer = FrameWriter(lambda data: (written.append(data), events.append("write")), is_server=True)

    class Replier(Recorder):
        def on_ping(self, payload):
            writer.send_pong(payload)

        def on_close(self, code, reason):
            events.append(("close", code))

    reader = FrameReader(Replier(), is_server=True, writer=writer)
    reader.feed(mframe(9, b"p1") + mframe(9, b"p2") + mframe(8, encode_close_payload(1001)))
    assert events == ["write", ("close", 1001)]
    assert written == [uframe(10, b"p1") + uframe(10, b"p2")]


# --------------------------------------------------------------------------- big frames read in place


def _read_in(reader, data: bytes) -> None:
    """Like the event loop: fill what get_buffer offers, as often as needed."""
    while data:
        buf = reader.get_buffer(-1)
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        reader.buffer_updated(n)
        data = data[n:]


@pytest.mark.parametrize("opcode, payload", [
    (2, random.Random(5).randbytes(1 << 20)),
    (1, ("κόσμε " * 100_000)[: 300_000]),
], ids=["binary-1MiB", "text-300k"])
@pytest.mark.parametrize("first", [300_000, 262_144, 500_001])
def test_big_frame_is_read_in_place_then_the_stream_goes_on(opcode, payload, first):
    rec = Recorder()
    reader = FrameReader(rec, is_server=True, max_message_size=2 << 20)
    frame = mframe(opcode, payload)
    after = mframe(1, "after") + mframe(9, b"ping")
    _read_in(reader, frame[:first])
    if first < len(frame):
        # the rest of the frame is offered exactly: no read can run into the next frame
        assert len(reader.get_buffer(-1)) == len(frame) - first
    _read_in(reader, frame[first:] + after)
    assert rec.calls == [("message", payload), ("message", "after"), ("ping", b"ping")]
    assert reader.buffered == 0


def test_big_text_frame_read_in_place_fails_fast_on_bad_utf8():
    rec = Recorder()
    reader = FrameReader(rec, is_server=True)
    frame = mframe(1, b"a" * 200_000 + b"\xc0\xaf" + b"b" * 100_000)
    _read_in(reader, frame[:150_000])
    assert not reader.closed
    with pytest.raises(ProtocolError) as err:
        _read_in(reader, frame[150_000:200_100])  # the bad bytes, far from the frame's end
    assert err.value.code == 1007 and reader.closed


def test_a_bare_big_header_does_not_allocate_its_announced_size():
    reader = FrameReader(Recorder(), is_server=True, max_message_size=0)
    _read_in(reader, O.header(2, 1 << 30, mask_key=KEY) + b"x" * 1000)
    assert len(reader.get_buffer(-1)) < 1 << 20  # room for more, not for the whole GiB


def test_corked_big_payloads_go_out_uncopied_in_one_writelines():
    writes, batches = [], []
    writer = FrameWriter(writes.append, is_server=True, writelines=lambda chunks: batches.append(list(chunks)))
    big1, big2 = b"\x01" * 70_000, b"\x02" * 100_000
    writer.cork()
    writer.send("small")
    writer.send(big1)
    writer.send(big2)
    writer.send_pong(b"p")
    assert writes == [] and batches == []
    writer.uncork()
    assert writes == [] and len(batches) == 1
    chunks = batches[0]
    assert any(c is big1 for c in chunks) and any(c is big2 for c in chunks)  # the caller's objects, no copy
    expected = uframe(1, b"small") + uframe(2, big1) + uframe(2, big2) + uframe(10, b"p")
    assert b"".join(chunks) == expected
    # uncorked, a big payload still goes out uncopied, header and payload in one call
    writer.send(big1)
    assert batches[-1][1] is big1 and b"".join(batches[-1]) == uframe(2, big1)


# --------------------------------------------------------------------------- lifecycle support


@pytest.mark.parametrize("mode", MODES)
def test_frame_cap_stops_parsing_and_resume_goes_on(mode):
    class Backlogged(Recorder):
        backlogs = 0

        def on_backlog(self):
            self.backlogs += 1

    rec = Backlogged()
    reader = FrameReader(rec, is_server=True)
    reader.max_frames_per_read = 10
    stream = b"".join(mframe(1, f"m{i}") for i in range(35)) + mframe(9, b"p")
    push(reader, stream, mode)
    assert [c[1] for c in rec.calls] == [f"m{i}" for i in range(10)] and rec.backlogs >= 1
    turns = 0
    while rec.backlogs > turns:
        turns += 1
        reader.resume()
    assert [c for c in rec.calls if c[0] == "message"] == [("message", f"m{i}") for i in range(35)]
    assert rec.calls[-1] == ("ping", b"p")
    assert rec.backlogs == 3 and reader.buffered == 0
    reader.resume()  # nothing left: a no-op
    assert len(rec.calls) == 36


def test_stop_ignores_everything_after():
    rec = Recorder()
    reader = FrameReader(rec, is_server=True)
    reader.feed(mframe(1, "before") + mframe(1, "partial")[:5])
    assert reader.buffered > 0
    reader.stop()
    assert reader.closed and reader.buffered == 0
    push(reader, mframe(1, "after") + b"\xff\xff garbage that would be a protocol error", "uvloop")
    assert rec.calls == [("message", "before")]


def test_reads_and_messages_are_stamped_with_the_clock():
    rec = Recorder()
    reader = FrameReader(rec, is_server=True)
    _frame.set_clock(123.5)
    push(reader, mframe(10, b"pong"), "uvloop")  # a pong: only a read
    assert reader.last_read == 123.5 and reader.last_message == 0.0
    _frame.set_clock(130.25)
    push(reader, mframe(1, "hi"), "uvloop")
    assert reader.last_read == 130.25 and reader.last_message == 130.25


def test_pongs_can_skip_python():
    rec = Recorder()
    reader = FrameReader(rec, is_server=True)
    reader.on_pong = None
    reader.feed(mframe(10, b"a") + mframe(1, "x"))
    assert rec.calls == [("message", "x")] and reader.reads == 0  # feed() is not a transport read
