"""Server instructions per echoed message, under callgrind (repeatable on a busy machine).

    python bench/echo_cost.py [--n 2000 --m 10000] [--batch 16] [--compressed] [-- extra `fastws serve` options]

Runs `fastws serve` (the demo app's /echo) under `valgrind --tool=callgrind` twice, each time one
connection sending N, then M 64-byte text messages in batches of --batch (one write per batch, as a
pipelining client does) and reading the echoes.  Prints (Ir(M) - Ir(N)) / (M - N).  PYTHONPATH picks
the tree, so a tree from before a change gives the "before" figure.

--compressed: the server runs with --compression, the upgrade offers permessage-deflate, and every
message is one ~400-byte JSON quote (bench/compression.py's) deflated once at zlib's default level
and sent with RSV1: the server inflates it and deflates its echo (the default: no context
takeover, the shared zlib-ng stream).  Under callgrind the clearing of zlib-ng's 128 KiB hash table
per message counts for about half of the figure (valgrind's memset is not the AVX-512 one).
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import socket

from benchutil import callgrind_instructions  # bench/benchutil.py
from fastws.bench.native import deflate_message
from handshake_cost import REQUEST  # bench/handshake_cost.py

FRAME = b"\x81\xc0\x00\x00\x00\x00" + b"m" * 64  # masked (key 0) 64-byte text frame
ECHO = 2 + 64
OFFER = "Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"


def compressed_frame() -> bytes:
    """A masked (key 0) text frame with RSV1: one quote, raw deflate without the 00 00 ff ff tail."""
    from compression import quote  # bench/compression.py

    data = deflate_message(quote(random.Random(1), 1).encode())  # as `fastws bench --compression` sends it
    assert 126 <= len(data) < 65536
    return bytes([0xC1, 0x80 | 126]) + len(data).to_bytes(2, "big") + bytes(4) + data


def frame_size(buf: bytes) -> int:
    """The whole size of the unmasked server frame at the start of ``buf`` (0: header incomplete)."""
    if len(buf) < 2 or (buf[1] & 0x7F == 126 and len(buf) < 4):
        return 0
    n = buf[1] & 0x7F
    return 4 + int.from_bytes(buf[2:4], "big") if n == 126 else 2 + n


def talk(port: int, messages: int, batch: int, frame: bytes = FRAME) -> None:
    compressed = frame is not FRAME
    request = REQUEST.format(key=base64.b64encode(os.urandom(16)).decode())
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall((request[:-2] + OFFER if compressed else request).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        if compressed and b"permessage-deflate" not in head.partition(b"\r\n\r\n")[0]:
            raise SystemExit(f"the server did not agree to permessage-deflate: {head[:300]!r}")
        pending = len(head.partition(b"\r\n\r\n")[2])
        echo = ECHO
        if compressed:  # the server's echo is the same bytes every time: learn its length from the first
            s.sendall(frame)
            first = head.partition(b"\r\n\r\n")[2]
            while not frame_size(first) or len(first) < frame_size(first):
                first += s.recv(4096)
            echo = frame_size(first)
            pending = len(first) - echo
        sent = 0
        while sent < messages:
            k = min(batch, messages - sent)
            s.sendall(frame * k)
            sent += k
            want = k * echo - pending
            while want > 0:
                want -= len(s.recv(65536))
            pending = -want
        s.sendall(b"\x88\x82\x00\x00\x00\x00\x03\xe8")
        while s.recv(4096):
            pass


def run_server(messages: int, batch: int, extra: list[str], frame: bytes) -> int:
    return callgrind_instructions(["--ping-interval", "0", *extra], lambda port: talk(port, messages, batch, frame))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--m", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--compressed", action="store_true",
                        help="permessage-deflate: ~400-byte JSON quotes, compressed both ways")
    parser.add_argument("serve_args", nargs="*")
    args = parser.parse_args()
    frame = compressed_frame() if args.compressed else FRAME
    if args.compressed and "--compression" not in args.serve_args:
        args.serve_args.append("--compression")
    low = run_server(args.n, args.batch, args.serve_args, frame)
    high = run_server(args.m, args.batch, args.serve_args, frame)
    what = "compressed ~400-byte JSON" if args.compressed else "64-byte text"
    print(f"{(high - low) / (args.m - args.n):,.0f} server instructions per echoed {what} message "
          f"(batches of {args.batch}; serve {' '.join(args.serve_args) or '(defaults)'}; "
          f"PYTHONPATH={os.environ.get('PYTHONPATH', '')})")


if __name__ == "__main__":
    main()
