"""Small helpers shared by the scripts in bench/ (not installed)."""

from __future__ import annotations

import contextlib
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    """The CPU's model name, for the machine line beside a figure."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "?"


def rss(pid: int) -> int:
    """Resident bytes of a process (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def wait_listening(port: int, server: subprocess.Popen, seconds: float) -> None:
    """Return once something accepts on 127.0.0.1:port; RuntimeError if ``server`` exits or time runs out."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"the server on port {port} did not start") from None
            time.sleep(0.05)


def callgrind_instructions(serve_args: list[str], drive: Callable[[int], None], peer: str = "") -> int:
    """Run `fastws serve` (or ``peer``, a bench/servers script taking --port, for a peer library's
    figure) under callgrind, call ``drive(port)`` once it listens, stop it; returns the instructions
    the server executed in all (its start-up included: callers subtract two runs)."""
    port = free_port()
    out = tempfile.mktemp(prefix="callgrind.fastws.")
    command = [peer] if peer else ["-m", "fastws", "serve"]
    server = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                               *command, "--port", str(port), *serve_args],
                              stderr=subprocess.DEVNULL)  # the access log goes there too
    try:
        wait_listening(port, server, 120)
        drive(port)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    text = Path(out).read_text()
    Path(out).unlink()
    found = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    if found is None:
        raise RuntimeError("no instruction count in callgrind's output")
    return int(found.group(1))


def write_section(text: str, path: Path) -> None:
    """Put a "## ..." section into a markdown report (bench/RESULTS.md): replace the section with the
    same title if there, else append; nothing else changes."""
    title = text.partition("\n")[0]
    old = path.read_text() if path.exists() else ""
    start = old.find(title + "\n")
    if start < 0:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text
    else:
        end = old.find("\n## ", start + len(title))
        new = old[:start] + text + (old[end + 1:] if end >= 0 else "")
    path.write_text(new)
