"""Microbenchmarks of the wire core (fastws._frame) against the peers' own fast paths.

Run (not collected by the normal test run: testpaths = tests, and the file is not test_*.py):

    cd /work/main
    python -m pytest bench/bench_frame.py --benchmark-only -p no:cacheprovider \\
        --benchmark-group-by=group --benchmark-sort=mean --benchmark-columns=min,median,mean,stddev,ops,rounds
    # or simply:  python bench/bench_frame.py  [extra pytest args]
    # save / compare:  --benchmark-save=NAME  then  --benchmark-compare

Groups (each compares implementations side by side on the same input):
    mask-125B / mask-4KiB / mask-64KiB / mask-1MiB
        fastws.apply_mask(bytes) -> new bytes; websockets.speedups.apply_mask(bytes) -> new bytes;
        aiohttp._websocket.mask._websocket_mask_cython(mask, bytearray), which masks IN PLACE (no
        allocation or copy, so it has an edge at small sizes). extra_info: GB/s.
    parse-10k-16B-masked
        one 220,000-byte buffer holding 10,000 masked 16-byte binary frames (client -> server), parsed
        into 10,000 messages by: fastws FrameReader.feed; fastws get_buffer/buffer_updated in 64 KiB reads
        (how the event loop drives it); aiohttp's Cython WebSocketReader.feed_data; websockets'
        Frame.parse over a StreamReader (frames only: websockets reassembles messages in a higher
        layer, so it does slightly less work here); wsproto FrameProtocol. extra_info: frames/s.
    accept_key
        fastws.accept_key vs base64(hashlib.sha1(key + GUID)). extra_info: keys/s.
    deflate-400B-json / inflate-400B-json
        permessage-deflate of 200 ~400-byte JSON quotes (bench/compression.py's messages), one
        message at a time: fastws's shared stream reset per message (the no-context-takeover default:
        zlib-ng at level 1 where built; also at level 6) and its own stream with context takeover
        (the system zlib, 12-bit window, memLevel 5), against Python's zlib
        objects used the two ways peers use them -- a fresh stream per message (no context takeover)
        and one kept stream (context takeover, python-websockets' settings) -- and python-websockets'
        own PerMessageDeflate.  extra_info: µs/message and the compression ratio.

The figures are from one run on a shared 2-core machine: expect noise of +-10-20 %; compare within a
group from the same run only. Record machine and versions next to any figure you publish.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import sys
import types

import pytest

from fastws import _frame

SIZES = {"125B": 125, "4KiB": 4096, "64KiB": 65536, "1MiB": 1 << 20}
KEY = bytes.fromhex("37fa213d")
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
N_FRAMES = 10_000
FRAME_PAYLOAD = 16


def _mean(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    inner = getattr(stats, "stats", None)
    return getattr(inner, "mean", None)


def _set_rate(benchmark, key: str, amount: float, scale: float = 1.0, digits: int = 3) -> None:
    mean = _mean(benchmark)
    if mean:
        benchmark.extra_info[key] = round(amount / mean / scale, digits)


# --------------------------------------------------------------------------- masking


def _mask_impls():
    impls = {"fastws": None, "fastws-inplace": None, "websockets": None, "aiohttp": None}
    impls["fastws"] = lambda data, mutable: _frame.apply_mask(data, KEY)
    # the like-for-like rival of aiohttp's in-place mask
    impls["fastws-inplace"] = lambda data, mutable: _frame.apply_mask_inplace(mutable, KEY)
    try:
        from websockets.speedups import apply_mask as ws_apply_mask

        impls["websockets"] = lambda data, mutable: ws_apply_mask(data, KEY)
    except ImportError:  # pragma: no cover
        pass
    try:
        from aiohttp._websocket.mask import _websocket_mask_cython as aio_mask

        # in place: masking twice per call would hide nothing, the buffer just flips between states
        impls["aiohttp"] = lambda data, mutable: aio_mask(KEY, mutable)
    except ImportError:  # pragma: no cover
        pass
    return impls


MASK_IMPLS = _mask_impls()


@pytest.mark.parametrize("impl", list(MASK_IMPLS))
@pytest.mark.parametrize("size", list(SIZES))
def test_mask(benchmark, size, impl):
    fn = MASK_IMPLS[impl]
    if fn is None:
        pytest.skip(f"{impl} not installed")
    n = SIZES[size]
    data = os.urandom(n)
    mutable = bytearray(data)
    benchmark.group = f"mask-{size}"
    benchmark.extra_info["bytes"] = n
    benchmark(fn, data, mutable)
    _set_rate(benchmark, "GB/s", n, 1e9)


# ----------------------------------------------------------------- parsing 10,000 small masked frames


def _masked_frame(payload: bytes, key: bytes) -> bytes:
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([0x82, 0x80 | len(payload)]) + key + masked


def _stream() -> bytes:
    return b"".join(_masked_frame(bytes([i & 0xFF]) * FRAME_PAYLOAD, os.urandom(4)) for i in range(N_FRAMES))


STREAM = _stream()


def parse_fastws_feed(stream: bytes) -> int:
    msgs: list = []
    h = types.SimpleNamespace(
        on_message=msgs.append, on_ping=msgs.append, on_pong=msgs.append, on_close=lambda c, r: None
    )
    _frame.FrameReader(h, is_server=True).feed(stream)
    return len(msgs)


def parse_fastws_buffered(stream: bytes, read_size: int = 65536) -> int:
    msgs: list = []
    h = types.SimpleNamespace(
        on_message=msgs.append, on_ping=msgs.append, on_pong=msgs.append, on_close=lambda c, r: None
    )
    reader = _frame.FrameReader(h, is_server=True)
    view = memoryview(stream)
    for pos in range(0, len(stream), read_size):
        chunk = view[pos : pos + read_size]
        buf = reader.get_buffer(-1)
        n = len(chunk)
        buf[:n] = chunk  # stands in for sock.recv_into(buf)
        reader.buffer_updated(n)
    return len(msgs)


_aio_loop = None


def parse_aiohttp(stream: bytes) -> int:
    from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader

    global _aio_loop
    if _aio_loop is None:
        _aio_loop = asyncio.new_event_loop()
    protocol = types.SimpleNamespace(
        _reading_paused=False, pause_reading=lambda: None, resume_reading=lambda: None
    )
    queue = WebSocketDataQueue(protocol, 2**30, loop=_aio_loop)
    reader = WebSocketReader(queue, 0, False, True)
    reader.feed_data(stream)
    return len(queue._buffer)


def parse_websockets(stream: bytes) -> int:
    from websockets.frames import Frame
    from websockets.streams import StreamReader

    sr = StreamReader()
    sr.feed_data(stream)
    n = 0
    while True:
        gen = Frame.parse(sr.read_exact, mask=True, max_size=None, extensions=None)
        try:
            next(gen)
        except StopIteration:
            n += 1
            continue
        return n  # the parser wants more bytes: the buffer is used up


def parse_wsproto(stream: bytes) -> int:
    from wsproto.frame_protocol import FrameProtocol

    proto = FrameProtocol(client=False, extensions=[])
    proto.receive_bytes(stream)
    return sum(1 for f in proto.received_frames() if f.message_finished)


PARSERS = {
    "fastws-feed": parse_fastws_feed,
    "fastws-get_buffer": parse_fastws_buffered,
    "aiohttp-c-reader": parse_aiohttp,
    "websockets-frames": parse_websockets,
    "wsproto": parse_wsproto,
}


@pytest.mark.parametrize("impl", list(PARSERS))
def test_parse_small_frames(benchmark, impl):
    fn = PARSERS[impl]
    try:
        assert fn(STREAM) == N_FRAMES
    except ImportError as e:  # pragma: no cover
        pytest.skip(str(e))
    benchmark.group = "parse-10k-16B-masked"
    benchmark.extra_info["frames"] = N_FRAMES
    benchmark.extra_info["bytes"] = len(STREAM)
    result = benchmark(fn, STREAM)
    assert result == N_FRAMES
    _set_rate(benchmark, "frames/s", N_FRAMES, 1, 0)
    _set_rate(benchmark, "MB/s", len(STREAM), 1e6, 1)


# --------------------------------------------------------------------------- Sec-WebSocket-Accept

WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def accept_hashlib(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


@pytest.mark.parametrize("impl", ["fastws", "hashlib+base64"])
def test_accept_key(benchmark, impl):
    fn = _frame.accept_key if impl == "fastws" else accept_hashlib
    assert fn(WS_KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    benchmark.group = "accept_key"
    benchmark(fn, WS_KEY)
    _set_rate(benchmark, "keys/s", 1, 1, 0)


# --------------------------------------------------------------------------- permessage-deflate

try:
    from compression import quote  # bench/compression.py: the messages its server benchmark sends
except ImportError:  # pragma: no cover - websockets missing
    quote = None

QUOTES = []
if quote is not None:
    import random

    _rng = random.Random(7692)
    QUOTES = [quote(_rng, i).encode() for i in range(200)]
TAIL = b"\x00\x00\xff\xff"


def _zlib_fresh(message: bytes) -> bytes:
    import zlib

    stream = zlib.compressobj(6, zlib.DEFLATED, -15, 8)
    return (stream.compress(message) + stream.flush(zlib.Z_SYNC_FLUSH))[:-4]


def _set_us_per_message(benchmark, messages: int) -> None:
    mean = _mean(benchmark)
    if mean:
        benchmark.extra_info["µs/message"] = round(mean / messages * 1e6, 2)


def _shared_streams(level: int | None = None):
    """What a connection without context takeover compresses and inflates with (fastws.deflate's
    choice: zlib-ng's shared streams where built, at the default level unless told)."""
    from fastws.deflate import PerMessageDeflate

    return PerMessageDeflate(is_server=True, local_max_window_bits=15, remote_max_window_bits=15,
                             local_no_context_takeover=True, remote_no_context_takeover=True, level=level)


def _deflaters():
    import zlib

    from fastws import _zlib

    kept = zlib.compressobj(6, zlib.DEFLATED, -12, 5)
    impls = {
        "fastws-shared": _shared_streams().compress,
        "fastws-shared-level6": _shared_streams(6).compress,
        "fastws-takeover": _zlib.Deflater(6, 12, 5, True),
        "zlib-fresh-per-message": _zlib_fresh,
        "zlib-kept": lambda m: (kept.compress(m) + kept.flush(zlib.Z_SYNC_FLUSH))[:-4],
    }
    try:
        from websockets.extensions.permessage_deflate import PerMessageDeflate
        from websockets.frames import Frame, Opcode

        ext = PerMessageDeflate(False, False, 12, 12, {"memLevel": 5})
        impls["websockets"] = lambda m: ext.encode(Frame(Opcode.TEXT, m)).data
    except ImportError:  # pragma: no cover
        pass
    return impls


@pytest.mark.skipif(not QUOTES, reason="needs websockets (bench/compression.py)")
@pytest.mark.parametrize("impl", ["fastws-shared", "fastws-shared-level6", "fastws-takeover",
                                  "zlib-fresh-per-message", "zlib-kept", "websockets"])
def test_deflate(benchmark, impl):
    deflate = _deflaters().get(impl)
    if deflate is None:  # pragma: no cover
        pytest.skip(f"{impl} is not installed")
    compressed = sum(len(deflate(m)) for m in QUOTES)  # also the warm-up (and the window, with takeover)
    benchmark.group = "deflate-400B-json"
    benchmark.extra_info["ratio"] = round(sum(map(len, QUOTES)) / compressed, 2)
    benchmark(lambda: [deflate(m) for m in QUOTES])
    _set_us_per_message(benchmark, len(QUOTES))


def _inflaters():
    import zlib

    from fastws import _zlib

    fresh = [_zlib_fresh(m) for m in QUOTES]  # what a client without context takeover sends
    kept = _deflaters()["zlib-kept"]
    kept_data = [kept(m) for m in QUOTES]  # one stream: each message refers back to the ones before

    def zlib_fresh(data: bytes) -> bytes:
        return zlib.decompressobj(-15).decompress(data + TAIL)

    def zlib_kept_run() -> list[bytes]:
        stream = zlib.decompressobj(-12)  # the messages only decode in order, from the first
        return [stream.decompress(d + TAIL) for d in kept_data]

    def fastws_kept_run() -> list[bytes]:
        inflate = _zlib.Inflater(12, 1 << 20, True)
        return [inflate(d) for d in kept_data]

    shared = _shared_streams().decompress
    return {
        "fastws-shared": lambda: [shared(d) for d in fresh],
        "fastws-takeover": fastws_kept_run,
        "zlib-fresh-per-message": lambda: [zlib_fresh(d) for d in fresh],
        "zlib-kept": zlib_kept_run,
    }


@pytest.mark.skipif(not QUOTES, reason="needs websockets (bench/compression.py)")
@pytest.mark.parametrize("impl", ["fastws-shared", "fastws-takeover", "zlib-fresh-per-message", "zlib-kept"])
def test_inflate(benchmark, impl):
    run = _inflaters()[impl]
    assert run() == QUOTES
    benchmark.group = "inflate-400B-json"
    benchmark(run)
    _set_us_per_message(benchmark, len(QUOTES))


if __name__ == "__main__":
    sys.exit(
        pytest.main(
            [
                __file__,
                "--benchmark-only",
                "-p",
                "no:cacheprovider",
                "--benchmark-group-by=group",
                "--benchmark-sort=mean",
                *sys.argv[1:],
            ]
        )
    )
