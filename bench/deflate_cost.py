#!/usr/bin/env python
"""What compressing one ~400-byte JSON message on its own costs, by zlib setting (no sockets).

    python bench/deflate_cost.py [--messages 2000] [--rounds 5]

Runs fastws's zlib streams (fastws._zlib: a stream reset between messages, as the shared
no-context-takeover compressor does, or kept, as with context takeover) over the messages
bench/compression.py sends, and prints microseconds per message and the ratio for each setting.
Without context takeover every message gets fresh Huffman tables, whatever the level or memLevel:
that is where the time goes.
"""

from __future__ import annotations

import argparse
import random
import time

from compression import quote  # bench/compression.py
from fastws._zlib import ZLIB_VERSION, Deflater

SETTINGS = [  # (level, window bits, memLevel, context takeover, what it is)
    (6, 15, 8, False, "fastws default: shared stream, reset per message"),
    (1, 15, 8, False, "the same at level 1"),
    (6, 12, 5, False, "12-bit window, memLevel 5, reset per message"),
    (6, 12, 5, True, "context takeover (python-websockets' settings)"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(7692)
    messages = [quote(rng, i).encode() for i in range(args.messages)]
    payload = sum(map(len, messages))
    print(f"zlib {ZLIB_VERSION}, {args.messages} messages of {payload / len(messages):.0f} bytes on average")
    for level, bits, mem_level, takeover, what in SETTINGS:
        deflate = Deflater(level, bits, mem_level, takeover)
        compressed = sum(len(deflate(m)) for m in messages)  # also the warm-up
        start = time.perf_counter()
        for _ in range(args.rounds):
            for m in messages:
                deflate(m)
        per_message = (time.perf_counter() - start) / (args.rounds * len(messages))
        print(f"{per_message * 1e6:6.2f} µs/message, ratio {payload / compressed:4.2f}  "
              f"level {level}, {bits}-bit window, memLevel {mem_level}: {what}")


if __name__ == "__main__":
    main()
