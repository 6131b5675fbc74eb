#!/usr/bin/env python
"""What compressing one ~400-byte JSON message on its own costs, by zlib setting (no sockets).

    python bench/deflate_cost.py [--messages 2000] [--rounds 5] [--others] [--quotes-per-message 1]

Runs fastws's streams over the messages bench/compression.py sends and prints microseconds per
message and the ratio for each setting: the system zlib's (fastws._zlib: reset between messages,
or kept, as with context takeover) and zlib-ng's (fastws._zlibng, the shared no-context-takeover
streams; its level 1, the default there, writes fixed Huffman codes).  With the system zlib every
message without context takeover gets a fresh dynamic Huffman tree, whatever the level or memLevel:
that is where the time goes.  It also prints what inflating such a message costs with each library
(the client's messages, compressed at level 6), and with --others what other deflate libraries take
when they are installed: libdeflate (Debian's libdeflate0, through ctypes, one persistent
compressor) and the zlib-ng Python package (a fresh stream per message: its API has no reset).
Those go through Python bindings, so each call costs ~1 µs more than from the wire core.
--quotes-per-message N makes each message a JSON array of N quotes (64: about 24 KiB), to see what
the levels do to bigger messages.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import random
import time
from collections.abc import Callable

from compression import quote  # bench/compression.py
from fastws import _zlib

try:
    from fastws import _zlibng
except ImportError:  # built without cmake
    _zlibng = None

SETTINGS = [  # (module, level, window bits, memLevel, context takeover, what it is)
    (_zlibng, 1, 15, 8, False, "fastws default: the shared stream, reset per message"),
    (_zlibng, 6, 15, 8, False, "the same at level 6 (compression_level=6)"),
    (_zlib, 1, 15, 8, False, "the system zlib's shared stream instead (a build without zlib-ng)"),
    (_zlib, 6, 15, 8, False, "the same at level 6 (the default before zlib-ng)"),
    (_zlib, 6, 12, 5, False, "12-bit window, memLevel 5, reset per message"),
    (_zlib, 6, 12, 5, True, "context takeover (fastws and python-websockets' settings)"),
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
    parser.add_argument("--quotes-per-message", type=int, default=1, metavar="N",
                        help="each message a JSON array of N quotes (default: one quote, ~400 bytes)")
    args = parser.parse_args()
    rng = random.Random(7692)
    n = args.quotes_per_message
    if n == 1:
        messages = [quote(rng, i).encode() for i in range(args.messages)]
    else:
        messages = [f"[{','.join(quote(rng, i * n + j) for j in range(n))}]".encode() for i in range(args.messages)]
    payload = sum(map(len, messages))
    libraries = [m for m in (_zlibng, _zlib) if m is not None]
    print(f"{', '.join(f'{m.__name__}: zlib {m.ZLIB_VERSION}' for m in libraries)}; "
          f"{args.messages} messages of {payload / len(messages):.0f} bytes on average")
    for module, level, bits, mem_level, takeover, what in SETTINGS:
        if module is None:
            continue
        deflate = module.Deflater(level, bits, mem_level, takeover)
        seconds, compressed = per_message(lambda m, deflate=deflate: len(deflate(m)), messages, args.rounds)
        print(f"{seconds * 1e6:6.2f} µs/message, ratio {payload / compressed:4.2f}  {module.ZLIB_VERSION} "
              f"level {level}, {bits}-bit window, memLevel {mem_level}: {what}")
    sent = [_zlib.Deflater(6, 15, 8, False)(m) for m in messages]  # as a client compresses them
    for module in libraries:
        inflate = module.Inflater(15, 1 << 20, False)
        seconds, _ = per_message(lambda d, inflate=inflate: len(inflate(d)), sent, args.rounds)
        print(f"{seconds * 1e6:6.2f} µs/message to inflate them with {module.ZLIB_VERSION} "
              f"(a shared stream, reset per message)")
    if args.others:
        for what, compress in others():
            seconds, compressed = per_message(compress, messages, args.rounds)
            print(f"{seconds * 1e6:6.2f} µs/message, ratio {payload / compressed:4.2f}  {what}")


if __name__ == "__main__":
    main()
