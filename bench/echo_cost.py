"""Server instructions per echoed message, under callgrind (repeatable on a busy machine).

    python bench/echo_cost.py [--n 2000 --m 10000] [--batch 16] [-- extra `fastws serve` options]

Runs `fastws serve` (the demo app's /echo) under `valgrind --tool=callgrind` twice, each time one
connection sending N, then M 64-byte text messages in batches of --batch (one write per batch, as a
pipelining client does) and reading the echoes.  Prints (Ir(M) - Ir(N)) / (M - N).  PYTHONPATH picks
the tree, so a tree from before a change gives the "before" figure.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket

from benchutil import callgrind_instructions  # bench/benchutil.py
from handshake_cost import REQUEST  # bench/handshake_cost.py

FRAME = b"\x81\xc0\x00\x00\x00\x00" + b"m" * 64  # masked (key 0) 64-byte text frame
ECHO = 2 + 64


def talk(port: int, messages: int, batch: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(REQUEST.format(key=base64.b64encode(os.urandom(16)).decode()).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        pending = len(head.partition(b"\r\n\r\n")[2])
        sent = 0
        while sent < messages:
            k = min(batch, messages - sent)
            s.sendall(FRAME * k)
            sent += k
            want = k * ECHO - pending
            while want > 0:
                want -= len(s.recv(65536))
            pending = -want
        s.sendall(b"\x88\x82\x00\x00\x00\x00\x03\xe8")
        while s.recv(4096):
            pass


def run_server(messages: int, batch: int, extra: list[str]) -> int:
    return callgrind_instructions(["--ping-interval", "0", *extra], lambda port: talk(port, messages, batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--m", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("serve_args", nargs="*")
    args = parser.parse_args()
    low = run_server(args.n, args.batch, args.serve_args)
    high = run_server(args.m, args.batch, args.serve_args)
    print(f"{(high - low) / (args.m - args.n):,.0f} server instructions per echoed message "
          f"(batches of {args.batch}; serve {' '.join(args.serve_args) or '(defaults)'}; "
          f"PYTHONPATH={os.environ.get('PYTHONPATH', '')})")


if __name__ == "__main__":
    main()
