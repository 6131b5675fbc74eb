"""Shared argument parsing for the echo servers (not a server itself)."""

from __future__ import annotations

import argparse
import os

MAX_MESSAGE = 16 * 1024 * 1024  # every server accepts 16 MiB messages: the 1 MiB workload fits everywhere


def parse_args(description: str, transports: tuple[str, ...] = ()) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9001)
    if transports:
        p.add_argument("--transport", choices=transports, default=transports[0])
    p.add_argument("--compression", action="store_true", help="offer permessage-deflate (the library's defaults)")
    args = p.parse_args()
    return args


def ready(name: str, port: int) -> None:
    print(f"{name} echo server pid {os.getpid()} listening on port {port}", flush=True)
