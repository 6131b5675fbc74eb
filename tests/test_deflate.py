"""Unit tests for fastws.deflate: RFC 7692 compression state, checked against zlib
itself and against the permessage-deflate implementations of websockets and wsproto."""

from __future__ import annotations

import os
import random
import time
import tracemalloc
import zlib
from types import SimpleNamespace

import pytest
from websockets.extensions.permessage_deflate import PerMessageDeflate as WebsocketsDeflate
from websockets.frames import Frame, Opcode
from wsproto.extensions import PerMessageDeflate as WsprotoDeflate
from wsproto.frame_protocol import Opcode as WsprotoOpcode
from wsproto.frame_protocol import RsvBits

from fastws.deflate import DeflateOptions, PerMessageDeflate, format_extension, parse_extensions
from fastws.errors import CloseCode, PayloadTooBig, ProtocolError

TAIL = b"\x00\x00\xff\xff"
RNG = random.Random(7692)


def make(
    *,
    is_server: bool = True,
    local_bits: int = 15,
    remote_bits: int = 15,
    local_nct: bool = False,
    remote_nct: bool = False,
    max_message_size: int = 1 << 20,
) -> PerMessageDeflate:
    return PerMessageDeflate(
        is_server=is_server,
        local_max_window_bits=local_bits,
        remote_max_window_bits=remote_bits,
        local_no_context_takeover=local_nct,
        remote_no_context_takeover=remote_nct,
        max_message_size=max_message_size,
    )


def pair(
    bits: tuple[int, int] = (15, 15), nct: tuple[bool, bool] = (False, False)
) -> tuple[PerMessageDeflate, PerMessageDeflate]:
    """A server and a client that agreed on (server, client) window bits and no_context_takeover."""
    server = make(local_bits=bits[0], remote_bits=bits[1], local_nct=nct[0], remote_nct=nct[1])
    client = make(
        is_server=False, local_bits=bits[1], remote_bits=bits[0], local_nct=nct[1], remote_nct=nct[0]
    )
    return server, client


def messages() -> list[bytes]:
    words = [b"alpha", b"beta", b"gamma", b"delta", b'{"type":"chat","room":"lobby"}', b"\xe2\x9c\x93"]
    text = b" ".join(RNG.choice(words) for _ in range(3000))
    return [
        b"",
        b"a",
        b"hello world",
        text[:200],
        text,
        os.urandom(5000),  # incompressible
        bytes(300_000),
        text[100:900],  # repeats earlier content: context takeover pays off
        b"",
    ]


MESSAGES = messages()
SETTINGS = [
    ((15, 15), (False, False)),
    ((15, 15), (True, True)),
    ((9, 12), (False, True)),
    ((12, 9), (True, False)),
    ((8, 8), (False, False)),
    ((10, 8), (True, True)),
]


# ---------------------------------------------------------------------------
# Our own round trip, and zlib as the oracle


@pytest.mark.parametrize(("bits", "nct"), SETTINGS)
def test_round_trip_both_directions(bits: tuple[int, int], nct: tuple[bool, bool]) -> None:
    server, client = pair(bits, nct)
    for message in MESSAGES:
        wire = server.compress(message)
        assert not wire.endswith(TAIL) or message == b""
        assert client.decompress(wire) == message
        assert server.decompress(client.compress(message)) == message


@pytest.mark.parametrize(("bits", "nct"), SETTINGS)
def test_zlib_inflates_our_output(bits: tuple[int, int], nct: tuple[bool, bool]) -> None:
    # An independent inflater with exactly the negotiated window: proves we never
    # reach further back than we promised (including window 8, compressed with 9).
    server, _ = pair(bits, nct)
    inflater = zlib.decompressobj(-bits[0])
    for message in MESSAGES:
        if nct[0]:
            inflater = zlib.decompressobj(-bits[0])
        assert inflater.decompress(server.compress(message) + TAIL) == message


@pytest.mark.parametrize("local_nct", [False, True], ids=["context-takeover", "shared-stream"])
def test_window_8_output_fits_256_bytes(local_nct: bool) -> None:
    # zlib can't compress with 8, so an agreed 8 is compressed with 9; zlib's deflate (and
    # zlib-ng's, the shared stream) never reaches back more than 250 bytes then. Repeats at
    # distances around 256 must inflate with a strict 8-bit window.
    rng = random.Random(8)
    vocabulary = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(20)]
    ours = make(local_bits=8, local_nct=local_nct)
    inflater = zlib.decompressobj(-8)
    for _ in range(30):
        message = b"".join(rng.choice(vocabulary) for _ in range(rng.randrange(0, 40)))
        if local_nct:
            inflater = zlib.decompressobj(-8)
        assert inflater.decompress(ours.compress(message) + TAIL) == message
    text = b"back-references still work with a small window. " * 20
    assert len(ours.compress(text)) < len(text) // 4


@pytest.mark.parametrize("remote_nct", [False, True])
def test_we_inflate_zlib_output(remote_nct: bool) -> None:
    ours = make(remote_nct=remote_nct)
    deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
    for message in MESSAGES:
        if remote_nct:
            deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
        wire = deflater.compress(message) + deflater.flush(zlib.Z_SYNC_FLUSH)
        assert wire.endswith(TAIL)
        assert ours.decompress(wire[:-4]) == message


def test_context_takeover_shrinks_repeats() -> None:
    message = b"the same chat message, repeated, again and again! " * 4
    keep, reset = make(), make(local_nct=True)
    first_keep, second_keep = keep.compress(message), keep.compress(message)
    first_reset, second_reset = reset.compress(message), reset.compress(message)
    assert len(second_keep) < len(first_keep) // 2
    assert first_reset == second_reset  # each message from nothing: the same bytes every time
    assert zlib.decompressobj(-15).decompress(second_reset + TAIL) == message


def test_shared_streams_are_zlib_ng_where_it_was_built() -> None:
    """setup.py builds vendor/zlib-ng whenever cmake is there (pyproject.toml asks for it): the
    shared no-context-takeover streams are then zlib-ng's, the per-connection ones the system zlib's."""
    import fastws.deflate as deflate

    if os.environ.get("FASTWS_NO_ZLIB_NG") == "1":
        pytest.skip("built with FASTWS_NO_ZLIB_NG=1")
    from fastws import _zlib, _zlibng

    assert deflate.SHARED_ZLIB_VERSION.endswith(".zlib-ng")
    shared, own = make(local_nct=True, remote_nct=True), make()
    assert isinstance(shared.compress, _zlibng.Deflater) and isinstance(shared.decompress, _zlibng.Inflater)
    assert isinstance(own.compress, _zlib.Deflater) and isinstance(own.decompress, _zlib.Inflater)
    assert not shared.holds_zlib_memory


def test_without_zlib_ng_the_shared_streams_are_the_system_zlibs() -> None:
    """A build without cmake has no fastws._zlibng: fastws.deflate then shares the system zlib's
    streams, at the same default level (checked in a fresh interpreter where the module is missing)."""
    import subprocess
    import sys

    code = """
import sys, zlib
sys.modules["fastws._zlibng"] = None  # what a build without zlib-ng leaves: the import fails
from fastws import _zlib, deflate
assert deflate.SHARED_ZLIB_VERSION == _zlib.ZLIB_VERSION, deflate.SHARED_ZLIB_VERSION
pmd = deflate.PerMessageDeflate(is_server=True, local_max_window_bits=15, remote_max_window_bits=15,
                                local_no_context_takeover=True, remote_no_context_takeover=True)
assert type(pmd.compress) is _zlib.Deflater and pmd.level == 1, (pmd.compress, pmd.level)
message = b"the system zlib serves the shared streams " * 20
wire = pmd.compress(message)
assert zlib.decompressobj(-15).decompress(wire + b"\\x00\\x00\\xff\\xff") == message
assert pmd.decompress(wire) == message
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_without_zlib_headers_the_wire_core_compresses_through_pythons_zlib() -> None:
    """A build without zlib headers has neither fastws._zlib nor fastws._zlibng: fastws.deflate's
    streams on Python's zlib are then what the wire core calls (through fastws._codec's interface),
    both ways and both with and without context takeover (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = """
import sys, zlib
sys.modules["fastws._zlib"] = sys.modules["fastws._zlibng"] = None  # the imports fail, as in such a build
from fastws import deflate
from fastws._frame import FrameReader, FrameWriter
assert deflate._zlib is None
messages = ["a quote, a quote, a quote " * 10, b"binary " * 40, "short"]
for takeover in (False, True):
    server = deflate.PerMessageDeflate(is_server=True, local_max_window_bits=15, remote_max_window_bits=15,
                                       local_no_context_takeover=not takeover,
                                       remote_no_context_takeover=not takeover)
    client = deflate.PerMessageDeflate(is_server=False, local_max_window_bits=15, remote_max_window_bits=15,
                                       local_no_context_takeover=not takeover,
                                       remote_no_context_takeover=not takeover)
    assert type(server.compress).__name__ == "_PyDeflater", server.compress
    wire = []
    writer = FrameWriter(wire.append, is_server=True, deflate=server.compress, compress_threshold=8)
    for m in messages:
        writer.send(m)
    assert [w[0] & 0x40 for w in wire] == [0x40, 0x40, 0], wire  # RSV1 from the threshold on
    got = []

    class Sink:
        def on_message(self, message):
            got.append(message)

    FrameReader(Sink(), is_server=False, inflate=client.decompress).feed(b"".join(wire))
    assert got == messages, got
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_compression_level_defaults_and_choice() -> None:
    message = b'{"type": "quote", "symbol": "NVDA", "bid": 412.17, "ask": 412.19, "volume": 1234567} ' * 5
    fast, own = make(local_nct=True), make()
    assert (fast.level, own.level) == (1, 6)  # fast without context takeover, zlib's default with it
    small = PerMessageDeflate(is_server=True, local_max_window_bits=15, remote_max_window_bits=15,
                              local_no_context_takeover=True, remote_no_context_takeover=True, level=9)
    assert small.level == 9
    assert len(small.compress(message)) < len(fast.compress(message))  # the level trades CPU for bytes
    for ours in (fast, small):
        assert zlib.decompressobj(-15).decompress(ours.compress(message) + TAIL) == message
    offer = [("client_max_window_bits", None)]
    assert PerMessageDeflate.accept_offer(offer, DeflateOptions(enabled=True, level=4)).level == 4  # type: ignore[union-attr]


@pytest.mark.parametrize("level", [0, 10, -1, 2.5, "6"])
def test_compression_level_out_of_range_is_refused_clearly(level: object) -> None:
    with pytest.raises(ValueError, match=r"compression level must be between 1 and 9"):
        DeflateOptions(enabled=True, level=level)  # type: ignore[arg-type]


def test_empty_message_encodings() -> None:
    ours = make()
    assert ours.compress(b"") != b""  # never an empty payload
    assert ours.decompress(b"\x00") == b""  # RFC 7692 7.2.3.6
    assert ours.decompress(ours.compress(b"")) == b""
    # An empty payload (not RFC 7692, but harmless) must not derail the context.
    assert ours.decompress(b"") == b""
    assert ours.decompress(ours.compress(b"still in sync")) == b"still in sync"


def test_accepts_bytearray_and_memoryview() -> None:
    server, client = pair()
    data = bytearray(b"xyz" * 100)
    assert client.decompress(memoryview(server.compress(memoryview(data)))) == bytes(data)
    assert client.decompress(bytearray(server.compress(data))) == bytes(data)


@pytest.mark.parametrize("remote_nct", [False, True], ids=["own-stream", "shared-stream"])
def test_final_block_from_peer_starts_a_new_stream(remote_nct: bool) -> None:
    # RFC 7692 7.2.3.3: a sender may end a message with BFINAL set; the next message
    # is then a new deflate stream.
    ours = make(remote_nct=remote_nct)
    for message in (b"first message" * 10, b"second message" * 10, b"third"):
        deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
        wire = deflater.compress(message) + deflater.flush(zlib.Z_FINISH)
        assert ours.decompress(wire) == message


# ---------------------------------------------------------------------------
# Lazy allocation and context reset


def test_zlib_streams_are_lazy_and_shared_without_takeover() -> None:
    keep = make()
    assert not keep.holds_zlib_memory  # made on first use
    keep.decompress(keep.compress(b"data"))
    assert keep.holds_zlib_memory

    reset = make(local_nct=True, remote_nct=True)
    reset.decompress(reset.compress(b"data"))
    assert not reset.holds_zlib_memory  # the process's shared streams, reset per message
    other = make(local_nct=True, remote_nct=True)
    assert other.compress is reset.compress and other.decompress is reset.decompress


@pytest.mark.parametrize("takeover", [False, True])
def test_c_streams_match_python_zlib(takeover: bool) -> None:
    """fastws._zlib against Python's zlib, both ways, over many messages on one stream."""
    from fastws import _zlib

    rng = random.Random(7692)
    ours = _zlib.Deflater(6, 15, 8, takeover)
    inflater = _zlib.Inflater(15, 1 << 20, takeover)
    reference_in = zlib.decompressobj(-15)
    theirs = zlib.compressobj(6, zlib.DEFLATED, -15)
    for i in range(300):
        message = rng.choice([b"", b"x", rng.randbytes(rng.randrange(2000)),
                              b"json " * rng.randrange(1, 500), bytes(rng.randrange(50000))])
        wire = ours(message)
        if not takeover:
            reference_in = zlib.decompressobj(-15)
        assert reference_in.decompress(wire + TAIL) == message, i
        if not takeover:
            theirs = zlib.compressobj(6, zlib.DEFLATED, -15)
        assert inflater(theirs.compress(message) + theirs.flush(zlib.Z_SYNC_FLUSH)[:-4]) == message, i


def _stream_modules() -> list:
    """The C stream modules this build has: the system zlib's, and zlib-ng's (the shared streams)."""
    from fastws import _zlib

    try:
        from fastws import _zlibng
    except ImportError:  # built with FASTWS_NO_ZLIB_NG=1 (test_shared_streams_are_zlib_ng... says so)
        return [_zlib]
    return [_zlib, _zlibng]


@pytest.mark.parametrize("module", _stream_modules(), ids=lambda m: m.__name__)
def test_c_inflater_stops_a_bomb_at_the_limit(module) -> None:  # type: ignore[no-untyped-def]
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    wire = bomb.compress(bytes(100 << 20)) + bomb.flush(zlib.Z_SYNC_FLUSH)  # 100 MiB of zeros, ~100 KB
    inflater = module.Inflater(15, 1 << 20, False)
    with pytest.raises(PayloadTooBig):
        inflater(wire[:-4])
    assert inflater(module.Deflater()(b"still works")) == b"still works"  # reset after the refusal
    with pytest.raises(ProtocolError) as info:
        inflater(b"\xff\xfe\xfd not deflate")
    assert info.value.code == 1002


def test_no_dict_per_connection() -> None:
    ours = make()
    with pytest.raises(AttributeError):
        ours.__dict__  # noqa: B018  # __slots__: idle connections stay small


# ---------------------------------------------------------------------------
# Limits and errors


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """100 MiB of zeros, deflated (about 100 KB), built without holding 100 MiB."""
    deflater = zlib.compressobj(1, zlib.DEFLATED, -15)
    chunk = bytes(1 << 20)
    parts = [deflater.compress(chunk) for _ in range(100)]
    parts.append(deflater.flush(zlib.Z_SYNC_FLUSH))
    return b"".join(parts)[:-4]


@pytest.mark.parametrize("remote_nct", [False, True], ids=["own-stream", "shared-stream"])
def test_decompression_bomb_is_cheap(bomb: bytes, remote_nct: bool) -> None:
    assert len(bomb) < 1 << 20
    ours = make(max_message_size=1 << 20, remote_nct=remote_nct)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(PayloadTooBig) as info:
            ours.decompress(bomb)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG
    assert "1048576" in info.value.reason
    assert elapsed < 0.5
    assert peak < 8 << 20  # never near the 100 MiB the bomb expands to


def test_limit_is_exact() -> None:
    server, _ = pair()
    limited = make(max_message_size=1000)
    assert limited.decompress(server.compress(b"x" * 1000)) == b"x" * 1000
    limited = make(max_message_size=1000)
    with pytest.raises(PayloadTooBig):
        limited.decompress(make().compress(b"x" * 1001))


def test_zero_limit_means_unlimited() -> None:
    ours = make(max_message_size=0)
    message = bytes(3 << 20)
    assert ours.decompress(make().compress(message)) == message


def test_limit_applies_per_message_with_context() -> None:
    server, _ = pair()
    receiver = make(max_message_size=5000)
    for _ in range(20):  # the shared window never counts against the next message
        assert receiver.decompress(server.compress(b"y" * 5000)) == b"y" * 5000


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff\xff",  # reserved block type 11
        b"\x06\x00",  # the same, non-final
        b"\x00\x05\x00\x00\x00hello",  # stored block whose NLEN isn't ~LEN
        b"\x04\xff\xff\xff\xff\xff\xff",  # dynamic block with impossible code lengths
    ],
)
@pytest.mark.parametrize("remote_nct", [False, True], ids=["own-stream", "shared-stream"])
def test_corrupt_data_is_a_protocol_error(payload: bytes, remote_nct: bool) -> None:
    ours = make(remote_nct=remote_nct)
    with pytest.raises(ProtocolError) as info:
        ours.decompress(payload)
    assert info.value.code == CloseCode.PROTOCOL_ERROR
    assert "invalid compressed data" in info.value.reason
    assert not isinstance(info.value, PayloadTooBig)
    assert ours.decompress(make().compress(b"next message")) == b"next message"


@pytest.mark.parametrize("module", _stream_modules(), ids=lambda m: m.__name__)
def test_mangled_compressed_data_never_gets_past_the_inflater(module) -> None:  # type: ignore[no-untyped-def]
    """Valid messages with bytes flipped, cut or spliced: each one inflates to something within the
    limit, or is refused with 1002 or 1009 -- never a crash, never more than the limit -- and the
    shared stream serves the next message as if nothing had happened."""
    rng = random.Random(1002)
    inflater = module.Inflater(15, 4096, False)
    deflate = module.Deflater(1, 15, 8, False)
    sources = [m for m in MESSAGES if len(m) <= 4096] + [bytes(3000), b"abc" * 1000]
    outcomes = {"inflated": 0, "refused": 0}
    for i in range(3000):
        wire = bytearray(zlib.compressobj(rng.choice([1, 6, 9]), zlib.DEFLATED, -15).compress(rng.choice(sources))
                         if i % 2 else deflate(rng.choice(sources)))
        for _ in range(rng.randrange(1, 4)):
            kind = rng.randrange(3)
            if kind == 0 and wire:
                wire[rng.randrange(len(wire))] ^= 1 << rng.randrange(8)
            elif kind == 1:
                del wire[rng.randrange(len(wire) + 1):]
            else:
                wire[rng.randrange(len(wire) + 1):0] = rng.randbytes(rng.randrange(1, 8))
        try:
            out = inflater(bytes(wire))
        except ProtocolError as exc:  # PayloadTooBig is one (1009)
            assert exc.code in (CloseCode.PROTOCOL_ERROR, CloseCode.MESSAGE_TOO_BIG), exc
            outcomes["refused"] += 1
        else:
            assert len(out) <= 4096
            outcomes["inflated"] += 1
        probe = sources[i % len(sources)]
        assert inflater(deflate(probe)) == probe
    assert min(outcomes.values()) > 100, outcomes  # both kinds were exercised


# ---------------------------------------------------------------------------
# Interop with websockets' permessage-deflate


def websockets_peer(ours: PerMessageDeflate) -> WebsocketsDeflate:
    """The websockets extension on the other end of ``ours``."""
    return WebsocketsDeflate(
        remote_no_context_takeover=ours.local_no_context_takeover,
        local_no_context_takeover=ours.remote_no_context_takeover,
        remote_max_window_bits=ours.local_max_window_bits,
        local_max_window_bits=ours.remote_max_window_bits,
    )


# websockets can't compress with window 8 (same zlib limit), so remote bits start at 9.
WS_SETTINGS = [s for s in SETTINGS if s[0][1] >= 9]


@pytest.mark.parametrize(("bits", "nct"), WS_SETTINGS)
def test_websockets_inflates_ours(bits: tuple[int, int], nct: tuple[bool, bool]) -> None:
    ours, _ = pair(bits, nct)
    peer = websockets_peer(ours)
    for message in MESSAGES:
        frame = peer.decode(Frame(Opcode.BINARY, ours.compress(message), rsv1=True), max_size=1 << 20)
        assert frame.data == message and not frame.rsv1


@pytest.mark.parametrize(("bits", "nct"), WS_SETTINGS)
def test_we_inflate_websockets(bits: tuple[int, int], nct: tuple[bool, bool]) -> None:
    ours, _ = pair(bits, nct)
    peer = websockets_peer(ours)
    for message in MESSAGES:
        frame = peer.encode(Frame(Opcode.BINARY, message))
        assert frame.rsv1
        assert ours.decompress(frame.data) == message


def test_we_inflate_fragmented_websockets_message() -> None:
    # A compressed message split into frames is one deflate stream: the connection
    # layer joins the payloads and inflates once.
    ours = make()
    peer = websockets_peer(ours)
    message = b"fragmented message " * 500
    parts = [message[:3000], message[3000:6000], message[6000:]]
    frames = [
        peer.encode(Frame(Opcode.TEXT, parts[0], fin=False)),
        peer.encode(Frame(Opcode.CONT, parts[1], fin=False)),
        peer.encode(Frame(Opcode.CONT, parts[2], fin=True)),
    ]
    assert frames[0].rsv1 and not frames[1].rsv1
    assert ours.decompress(b"".join(bytes(f.data) for f in frames)) == message


def test_random_conversation_with_websockets() -> None:
    rng = random.Random(13)
    ours = make(local_bits=11, remote_bits=10)
    peer = websockets_peer(ours)
    vocabulary = [os.urandom(8) for _ in range(30)]
    for _ in range(300):
        message = b"".join(rng.choice(vocabulary) for _ in range(rng.randrange(0, 400)))
        assert peer.decode(Frame(Opcode.BINARY, ours.compress(message), rsv1=True)).data == message
        assert ours.decompress(peer.encode(Frame(Opcode.BINARY, message)).data) == message


# ---------------------------------------------------------------------------
# Interop with wsproto's permessage-deflate (as the client)


def wsproto_client(server: PerMessageDeflate) -> tuple[WsprotoDeflate, SimpleNamespace]:
    ext = WsprotoDeflate(
        client_no_context_takeover=server.remote_no_context_takeover,
        client_max_window_bits=server.remote_max_window_bits,
        server_no_context_takeover=server.local_no_context_takeover,
        server_max_window_bits=server.local_max_window_bits,
    )
    return ext, SimpleNamespace(client=True)


def wsproto_receive(ext: WsprotoDeflate, proto: SimpleNamespace, payload: bytes) -> bytes:
    ext.frame_inbound_header(proto, WsprotoOpcode.BINARY, RsvBits(True, False, False), len(payload))  # type: ignore[arg-type]
    head = ext.frame_inbound_payload_data(proto, payload)  # type: ignore[arg-type]
    tail = ext.frame_inbound_complete(proto, True)  # type: ignore[arg-type]
    assert isinstance(head, bytes) and isinstance(tail, bytes)
    return head + tail


# wsproto accepts window bits 9..15 only.
WSPROTO_SETTINGS = [s for s in SETTINGS if min(s[0]) >= 9]


@pytest.mark.parametrize(("bits", "nct"), WSPROTO_SETTINGS)
def test_wsproto_interop(bits: tuple[int, int], nct: tuple[bool, bool]) -> None:
    ours, _ = pair(bits, nct)
    ext, proto = wsproto_client(ours)
    for message in MESSAGES:
        assert wsproto_receive(ext, proto, ours.compress(message)) == message
        rsv, wire = ext.frame_outbound(
            proto, WsprotoOpcode.BINARY, RsvBits(False, False, False), message, True
        )  # type: ignore[arg-type]
        assert rsv.rsv1
        assert ours.decompress(wire) == message


# ---------------------------------------------------------------------------
# Header grammar and parameter helpers


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("", []),
        ("permessage-deflate", [("permessage-deflate", [])]),
        ("a;b;c=1, d", [("a", [("b", None), ("c", "1")]), ("d", [])]),
        (" a ; b = 2 ,\t, e ", [("a", [("b", "2")]), ("e", [])]),
        ('a; b="10"', [("a", [("b", "10")])]),
        ('a; b="x\\yz"', [("a", [("b", "xyz")])]),  # quoted-pair
        ('a; b="1,0", c', None),  # unquoted to "1,0": not a token
        ('a; b=""', None),
        ("a; b=", None),
        ("a b", None),
        ("a;", None),
        ("; b", None),
        ('a; b="1', None),
    ],
)
def test_parse_extensions(value: str, parsed: list | None) -> None:
    if parsed is None:
        with pytest.raises(ValueError):
            parse_extensions(value)
    else:
        assert parse_extensions(value) == parsed


def test_format_extension_round_trip() -> None:
    value = "permessage-deflate; server_no_context_takeover; client_max_window_bits=10"
    [(name, params)] = parse_extensions(value)
    assert format_extension(name, params) == value


def test_response_params_of_a_direct_instance() -> None:
    assert make().response_params() == "permessage-deflate"
    assert make(local_bits=10, remote_bits=12, local_nct=True).response_params() == (
        "permessage-deflate; server_no_context_takeover; server_max_window_bits=10; client_max_window_bits=12"
    )
    client = make(is_server=False, local_bits=12, remote_bits=10, remote_nct=True)
    assert client.response_params() == (
        "permessage-deflate; server_no_context_takeover; server_max_window_bits=10; client_max_window_bits=12"
    )
    assert PerMessageDeflate.offer_params() == "permessage-deflate; client_max_window_bits"


def test_accept_offer_and_from_response_agree() -> None:
    [(_, params)] = parse_extensions("permessage-deflate; client_max_window_bits; server_max_window_bits=12")
    server = PerMessageDeflate.accept_offer(
        params,
        DeflateOptions(enabled=True, client_max_window_bits=10, compress_threshold=7),
        max_message_size=99,
    )
    assert server is not None
    assert (server.compress_threshold, server.max_message_size) == (7, 99)
    [(_, answer)] = parse_extensions(server.response_params())
    client = PerMessageDeflate.from_response(answer)
    assert (client.local_max_window_bits, client.remote_max_window_bits) == (10, 12)
    assert (server.local_max_window_bits, server.remote_max_window_bits) == (12, 10)


def test_from_response_refuses_unoffered_client_bits() -> None:
    with pytest.raises(ValueError):
        PerMessageDeflate.from_response(
            [("client_max_window_bits", "10")], offered_client_max_window_bits=False
        )


def test_constructor_validates_window_bits() -> None:
    with pytest.raises(ValueError):
        make(local_bits=7)
    with pytest.raises(ValueError):
        make(remote_bits=16)
