#!/usr/bin/env python
"""What compressing one ~400-byte JSON message on its own costs, by zlib setting (no sockets).

    python bench/deflate_cost.py [--messages 2000] [--rounds 5] [--others]

Runs fastws's zlib streams (fastws._zlib: a stream reset between messages, as the shared
no-context-takeover compressor does, or kept, as with context takeover) over the messages
bench/compression.py sends, and prints microseconds per message and the ratio for each setting.
Without context takeover every message gets fresh Huffman tables, whatever the level or memLevel:
that is where the time goes.  It also prints what inflating such a message costs (the shared stream,
reset per message), and with --others what other deflate libraries take for the same messages
when they are installed: libdeflate (Debian's libdeflate0, through ctypes, one persistent
compressor) and zlib-ng (`pip install zlib-ng`, a fresh stream per message: its Python API has no
reset).  Those go through Python bindings, so each call costs ~1 µs more than from the wire core.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import random
import time
from collections.abc import Callable

from compression import quote  # bench/compression.py
from fastws._zlib import ZLIB_VERSION, Deflater, Inflater

SETTINGS = [  # (level, window bits, memLevel, context takeover, what it is)
    (6, 15, 8, False, "fastws default: shared stream, reset per message"),
    (1, 15, 8, False, "the same at level 1"),
    (6, 12, 5, False, "12-bit window, memLevel 5, reset per message"),
    (6, 12, 5, True, "context takeover (python-websockets' settings)"),
]


def per_message(compress: Callable[[bytes], int], messages: list[bytes], rounds: int) -> tuple[float, int]:
    """(seconds per message, compressed bytes in one pass) for ``compress(m) -> its size``."""
    compressed = sum(compress(m) for m in messages)  # also the warm-up
    start = time.perf_counter()
    for _ in range(rounds):
        for m in messages:
            compress(m)
    return (time.perf_counter() - start) / (rounds * len(messages)), compressed


def others() -> list[tuple[str, Callable[[bytes], int]]]:
    """The other libraries' compressors that are installed, as ``(what, compress)``."""
    found = []
    name = ctypes.util.find_library("deflate")
    if name:
        lib = ctypes.CDLL(name)
        lib.libdeflate_alloc_compressor.restype = ctypes.c_void_p
        lib.libdeflate_deflate_compress.restype = ctypes.c_size_t
        lib.libdeflate_deflate_compress.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                                    ctypes.c_void_p, ctypes.c_size_t]
        out = ctypes.create_string_buffer(1 << 16)
        for level in (1, 6):
            c = lib.libdeflate_alloc_compressor(level)
            found.append((f"libdeflate level {level}, one persistent compressor",
                          lambda m, c=c: lib.libdeflate_deflate_compress(c, m, len(m), out, len(out))))
    try:
        from zlib_ng import zlib_ng
    except ImportError:
        pass
    else:
        for level in (1, 6):
            def fresh(m: bytes, level: int = level) -> int:
                z = zlib_ng.compressobj(level, zlib_ng.DEFLATED, -15, 8)
                return len(z.compress(m) + z.flush(zlib_ng.Z_SYNC_FLUSH))
            found.append((f"zlib-ng level {level}, a fresh stream per message", fresh))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--others", action="store_true", help="also libdeflate and zlib-ng, if installed")
    args = parser.parse_args()
    rng = random.Random(7692)
    messages = [quote(rng, i).encode() for i in range(args.messages)]
    payload = sum(map(len, messages))
    print(f"zlib {ZLIB_VERSION}, {args.messages} messages of {payload / len(messages):.0f} bytes on average")
    for level, bits, mem_level, takeover, what in SETTINGS:
        deflate = Deflater(level, bits, mem_level, takeover)
        seconds, compressed = per_message(lambda m, deflate=deflate: len(deflate(m)), messages, args.rounds)
        print(f"{seconds * 1e6:6.2f} µs/message, ratio {payload / compressed:4.2f}  "
              f"level {level}, {bits}-bit window, memLevel {mem_level}: {what}")
    deflate = Deflater(6, 15, 8, False)
    inflate = Inflater(15, 1 << 20, False)
    sent = [deflate(m) for m in messages]
    seconds, _ = per_message(lambda d: len(inflate(d)), sent, args.rounds)
    print(f"{seconds * 1e6:6.2f} µs/message to inflate them (the shared stream, reset per message)")
    if args.others:
        for what, compress in others():
            seconds, compressed = per_message(compress, messages, args.rounds)
            print(f"{seconds * 1e6:6.2f} µs/message, ratio {payload / compressed:4.2f}  {what}")


if __name__ == "__main__":
    main()
