"""Small pure-Python oracles for the wire-core tests (RFC 6455 section 5).

Slow, obvious and independent of fastws: the Cython code in ``fastws._frame`` is
checked against these (and against wsproto). The oracles never touch fastws; the
test harness at the end (Recorder, push, drive) only catches fastws.errors.ProtocolError.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass, field

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
DATA_OPCODES = frozenset({OP_CONT, OP_TEXT, OP_BINARY})
CONTROL_OPCODES = frozenset({OP_CLOSE, OP_PING, OP_PONG})
KNOWN_OPCODES = DATA_OPCODES | CONTROL_OPCODES
RESERVED_OPCODES = tuple(op for op in range(16) if op not in KNOWN_OPCODES)

RSV1, RSV2, RSV3 = 0x4, 0x2, 0x1  # the ``rsv`` argument below is these bits OR-ed (3 bits)


# --------------------------------------------------------------------------- masking


def mask_naive(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """RFC 6455 5.3, literally: transformed-octet-i = original-octet-i XOR masking-key-octet-(i MOD 4)."""
    return bytes(b ^ key[i % 4] for i, b in enumerate(bytes(data)))


def mask(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """Same as mask_naive, fast enough for long sweeps (one big-int XOR)."""
    data = bytes(data)
    n = len(data)
    if not n:
        return b""
    stream = (bytes(key) * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


# --------------------------------------------------------------------------- handshake


def accept_key(key: str | bytes) -> str:
    """RFC 6455 4.2.2: base64(SHA-1(key + GUID))."""
    if isinstance(key, str):
        key = key.encode("ascii")
    return base64.b64encode(hashlib.sha1(key + GUID).digest()).decode("ascii")


# --------------------------------------------------------------------------- close codes


def is_valid_close_code(code: int) -> bool:
    """Codes a peer may put on the wire (RFC 6455 7.4.1/7.4.2 + IANA registry)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


# --------------------------------------------------------------------------- UTF-8 (Unicode table 3-7)

# lead byte -> (range of the 2nd byte, number of continuation bytes)
_UTF8_LEAD: dict[int, tuple[int, int, int]] = {}
for _b in range(0xC2, 0xE0):
    _UTF8_LEAD[_b] = (0x80, 0xBF, 1)
_UTF8_LEAD[0xE0] = (0xA0, 0xBF, 2)
for _b in range(0xE1, 0xED):
    _UTF8_LEAD[_b] = (0x80, 0xBF, 2)
_UTF8_LEAD[0xED] = (0x80, 0x9F, 2)  # no surrogates
_UTF8_LEAD[0xEE] = _UTF8_LEAD[0xEF] = (0x80, 0xBF, 2)
_UTF8_LEAD[0xF0] = (0x90, 0xBF, 3)  # no overlongs
for _b in range(0xF1, 0xF4):
    _UTF8_LEAD[_b] = (0x80, 0xBF, 3)
_UTF8_LEAD[0xF4] = (0x80, 0x8F, 3)  # nothing above U+10FFFF


def utf8_scan(data: bytes) -> tuple[int | None, int]:
    """(index of the first byte that makes ``data`` invalid UTF-8 whatever follows, or None;
    length of the incomplete sequence at the end, 0 if none).

    This is the earliest point at which a fail-fast validator can know the text is bad.
    """
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b < 0x80:
            i += 1
            continue
        lead = _UTF8_LEAD.get(b)
        if lead is None:
            return i, 0
        lo, hi, need = lead
        j = i + 1
        for k in range(need):
            if j >= n:
                return None, n - i
            c = data[j]
            if not (lo <= c <= hi if k == 0 else 0x80 <= c <= 0xBF):
                return j, 0
            j += 1
        i = j
    return None, 0


def utf8_valid(data: bytes) -> bool:
    bad, tail = utf8_scan(data)
    return bad is None and tail == 0


# --------------------------------------------------------------------------- frames


def header(
    opcode: int,
    length: int,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask_key: bytes | None = None,
    len_form: int | None = None,
) -> bytes:
    """Frame header; len_form forces 7, 16 or 64-bit length encoding (default: minimal)."""
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mbit = 0x80 if mask_key is not None else 0
    if len_form is None:
        len_form = 7 if length <= 125 else 16 if length <= 0xFFFF else 64
    if len_form == 7:
        h = bytes([b0, mbit | length])
    elif len_form == 16:
        h = bytes([b0, mbit | 126]) + struct.pack("!H", length)
    else:
        h = bytes([b0, mbit | 127]) + struct.pack("!Q", length)
    return h + (mask_key if mask_key is not None else b"")


def frame(
    opcode: int,
    payload: bytes | str = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask_key: bytes | None = None,
    len_form: int | None = None,
) -> bytes:
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    h = header(opcode, len(payload), fin=fin, rsv=rsv, mask_key=mask_key, len_form=len_form)
    return h + (mask(payload, mask_key) if mask_key is not None else payload)


@dataclass
class Frame:
    fin: bool
    rsv: int
    opcode: int
    masked: bool
    mask_key: bytes | None
    payload: bytes  # unmasked
    raw_len: int = 0  # bytes on the wire


def parse_frames(data: bytes) -> tuple[list[Frame], bytes]:
    """Split a byte stream into frames (no validation at all); returns (frames, incomplete rest)."""
    frames: list[Frame] = []
    pos = 0
    data = bytes(data)
    while True:
        start = pos
        if len(data) - pos < 2:
            break
        b0, b1 = data[pos], data[pos + 1]
        pos += 2
        n = b1 & 0x7F
        if n == 126:
            if len(data) - pos < 2:
                pos = start
                break
            (n,) = struct.unpack_from("!H", data, pos)
            pos += 2
        elif n == 127:
            if len(data) - pos < 8:
                pos = start
                break
            (n,) = struct.unpack_from("!Q", data, pos)
            pos += 8
        key = None
        if b1 & 0x80:
            if len(data) - pos < 4:
                pos = start
                break
            key = data[pos : pos + 4]
            pos += 4
        if len(data) - pos < n:
            pos = start
            break
        payload = data[pos : pos + n]
        pos += n
        if key is not None:
            payload = mask(payload, key)
        frames.append(
            Frame(bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0xF, key is not None, key, payload, pos - start)
        )
    return frames, data[pos:]


def header_len(length: int, masked: bool) -> int:
    return 2 + (0 if length <= 125 else 2 if length <= 0xFFFF else 8) + (4 if masked else 0)


# --------------------------------------------------------------------------- reference reader


@dataclass
class Outcome:
    """What a FrameReader must do with a whole byte stream.

    calls: handler calls in order: ("message", str|bytes), ("ping", b), ("pong", b),
    ("close", code, reason).
    errors: None if no ProtocolError is due, else the set of acceptable close codes (a header that
    breaks two rules may be reported under either).
    """

    calls: list[tuple] = field(default_factory=list)
    errors: frozenset[int] | None = None
    closed: bool = False


def parse_close(payload: bytes) -> tuple[tuple[int, str] | None, frozenset[int] | None]:
    if not payload:
        return (1005, ""), None
    if len(payload) == 1:
        return None, frozenset({1002})
    (code,) = struct.unpack("!H", payload[:2])
    if not is_valid_close_code(code):
        return None, frozenset({1002})
    if not utf8_valid(payload[2:]):
        return None, frozenset({1007})
    return (code, payload[2:].decode("utf-8")), None


def ref_read(stream: bytes, *, is_server: bool = True, max_message_size: int = 1 << 20) -> Outcome:
    """Reference FrameReader (no extensions): what fastws must deliver for ``stream`` fed in any pieces.

    Fail-fast UTF-8: a text message is checked after every frame, and a trailing incomplete text frame's
    available payload is checked too (an implementation must have raised by then).
    """
    out = Outcome()
    stream = bytes(stream)
    pos = 0
    msg_op: int | None = None  # opcode of the message being reassembled
    parts: list[bytes] = []
    size = 0
    while True:
        if len(stream) - pos < 2:
            return out
        b0, b1 = stream[pos], stream[pos + 1]
        fin, rsv, op = bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0xF
        masked, n = bool(b1 & 0x80), b1 & 0x7F
        p = pos + 2
        errors: set[int] = set()
        if rsv:
            errors.add(1002)
        if op not in KNOWN_OPCODES:
            errors.add(1002)
        if op in CONTROL_OPCODES and (not fin or n > 125):
            errors.add(1002)
        if masked != is_server:
            errors.add(1002)
        if op == OP_CONT and msg_op is None:
            errors.add(1002)
        if op in (OP_TEXT, OP_BINARY) and msg_op is not None:
            errors.add(1002)
        if n == 126:
            if len(stream) - p < 2:
                return _partial_header(out, errors)
            (n,) = struct.unpack_from("!H", stream, p)
            p += 2
        elif n == 127:
            if len(stream) - p < 8:
                return _partial_header(out, errors)
            (n,) = struct.unpack_from("!Q", stream, p)
            p += 8
            if n >> 63:
                out.errors, out.closed = frozenset({1002}), True  # not 1009, whatever the limit
                return out
        if op in DATA_OPCODES and op in KNOWN_OPCODES and max_message_size:
            if (size if op == OP_CONT else 0) + n > max_message_size:
                errors.add(1009)
        if errors:
            out.errors, out.closed = frozenset(errors), True
            return out
        key = None
        if masked:
            if len(stream) - p < 4:
                return out
            key = stream[p : p + 4]
            p += 4
        avail = stream[p : p + n]
        if key is not None:
            avail = mask(avail, key)
        complete = len(avail) == n
        if op in DATA_OPCODES:
            text = (msg_op if op == OP_CONT else op) == OP_TEXT
            if text:
                bad, _ = utf8_scan(b"".join(parts) + avail)
                if bad is not None:  # fail fast, even inside an incomplete frame
                    out.errors, out.closed = frozenset({1007}), True
                    return out
            if not complete:
                return out
            parts.append(avail)
            size += n
            if op != OP_CONT:
                msg_op = op
            if fin:
                data = b"".join(parts)
                if text:
                    if not utf8_valid(data):
                        out.errors, out.closed = frozenset({1007}), True
                        return out
                    out.calls.append(("message", data.decode("utf-8")))
                else:
                    out.calls.append(("message", data))
                msg_op, parts, size = None, [], 0
        else:
            if not complete:
                return out
            if op == OP_PING:
                out.calls.append(("ping", avail))
            elif op == OP_PONG:
                out.calls.append(("pong", avail))
            else:
                cp, errs = parse_close(avail)
                out.closed = True
                if errs:
                    out.errors = errs
                else:
                    out.calls.append(("close", *cp))
                return out
        pos = p + n


def _partial_header(out: Outcome, errors: set[int]) -> Outcome:
    # The stream ends inside the extended length: a reader may or may not have raised already
    # for a rule broken by the first two bytes; callers only use complete frames at the end.
    return out


# --------------------------------------------------------------------------- harness (drives a FrameReader)

# How one "read" reaches the reader:
#   feed*    FrameReader.feed with bytes / bytearray / a memoryview slice at a non-zero offset
#   uvloop   get_buffer(65536), copy, drop the view, buffer_updated(n)  (uvloop releases the buffer first)
#   asyncio  get_buffer(-1), copy, buffer_updated(n) while the view is still alive (asyncio's selector
#            transport keeps ``buf`` referenced during buffer_updated)
MODES = ("feed", "feed-bytearray", "feed-memoryview", "uvloop", "asyncio")


class Recorder:
    """A FrameHandler that records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_message(self, data):
        self.calls.append(("message", data))

    def on_ping(self, payload):
        self.calls.append(("ping", payload))

    def on_pong(self, payload):
        self.calls.append(("pong", payload))

    def on_close(self, code, reason):
        self.calls.append(("close", code, reason))


def push(reader, data: bytes, mode: str) -> None:
    """Hand ``data`` to ``reader`` as one read (several get_buffer rounds if the buffer is smaller)."""
    if mode == "feed":
        reader.feed(bytes(data))
    elif mode == "feed-bytearray":
        reader.feed(bytearray(data))
    elif mode == "feed-memoryview":
        reader.feed(memoryview(bytearray(b"\xaa\xbb\xcc" + bytes(data) + b"\xdd"))[3:-1])
    elif mode in ("uvloop", "asyncio"):
        view = memoryview(bytes(data))
        pos = 0
        while pos < len(view):
            buf = reader.get_buffer(65536 if mode == "uvloop" else -1)
            assert len(buf) > 0, "get_buffer() returned an empty buffer"
            n = min(len(buf), len(view) - pos)
            buf[:n] = view[pos : pos + n]
            if mode == "uvloop":
                del buf
            reader.buffer_updated(n)
            pos += n
    else:  # pragma: no cover
        raise ValueError(mode)


def drive(reader, chunks, mode: str):
    """Push every chunk; return the ProtocolError raised (at most one: input after it must be ignored)."""
    from fastws.errors import ProtocolError

    err = None
    for chunk in chunks:
        try:
            push(reader, chunk, mode)
        except ProtocolError as e:
            assert err is None, f"a second ProtocolError after {err!r}: input after an error must be ignored"
            err = e
    return err


def splits(data: bytes, points) -> list[bytes]:
    points = sorted(set(points))
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


def split_plans(data: bytes, *, max_every: int = 4096, rng=None) -> list[list[bytes]]:
    """Whole; every 2-way split point (sampled above max_every bytes); byte by byte; a few random cuts."""
    import random

    rng = rng or random.Random(len(data))
    n = len(data)
    plans = [[data]]
    if n <= max_every:
        points = range(1, n)
    else:
        points = sorted(set(list(range(1, 40)) + list(range(n - 40, n)) + rng.sample(range(1, n), 200)))
    plans += [[data[:i], data[i:]] for i in points]
    if n <= 4 * max_every:
        plans.append([data[i : i + 1] for i in range(n)])
    for _ in range(5):
        plans.append(splits(data, rng.sample(range(n + 1), min(n + 1, 7))))
    return plans
