"""Server instructions per WebSocket handshake, under callgrind (repeatable on a busy machine).

    python bench/handshake_cost.py [--n 300 --m 900] [-- extra `fastws serve` options]
    python bench/handshake_cost.py --peer bench/servers/picows_echo.py [-- --transport uvloop]

Runs `fastws serve` (the demo app; with --peer, that bench/servers script instead: a peer library's
figure beside ours) under `valgrind --tool=callgrind` twice, once for N and once
for M sequential cycles of: TCP connect, upgrade, 101, one echoed message, closing handshake.
Prints (Ir(M) - Ir(N)) / (M - N): the server's instructions per cycle, start-up cancelled out.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket

from benchutil import callgrind_instructions  # bench/benchutil.py

REQUEST = ("GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
# masked text "hi" (mask 0) and a masked close 1000
HELLO = b"\x81\x82\x00\x00\x00\x00hi"
CLOSE = b"\x88\x82\x00\x00\x00\x00\x03\xe8"


def cycle(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall(REQUEST.format(key=key).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError(f"server closed during the handshake: {head!r}")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"not upgraded: {head[:200]!r}")
        rest = head.partition(b"\r\n\r\n")[2]
        s.sendall(HELLO)
        while len(rest) < 4:
            rest += s.recv(4096)
        s.sendall(CLOSE)
        while s.recv(4096):
            pass


def run_server(cycles: int, extra: list[str], peer: str = "") -> int:
    def drive(port: int) -> None:
        cycle(port)  # warm-up (the probe connection above also went through the HTTP phase)
        for _ in range(cycles):
            cycle(port)

    return callgrind_instructions(extra, drive, peer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--m", type=int, default=900)
    parser.add_argument("--peer", default="", metavar="SCRIPT",
                        help="a bench/servers echo script to measure instead of `fastws serve`")
    parser.add_argument("serve_args", nargs="*", help="extra options of the server (after --)")
    args = parser.parse_args()
    low = run_server(args.n, args.serve_args, args.peer)
    high = run_server(args.m, args.serve_args, args.peer)
    per = (high - low) / (args.m - args.n)
    print(f"{per:,.0f} server instructions per handshake cycle ({args.n} vs {args.m} cycles; "
          f"{args.peer or 'serve'} {' '.join(args.serve_args) or '(defaults)'})")


if __name__ == "__main__":
    main()
