"""The handshake rate on one server core, and the server's CPU per handshake.

    python bench/handshake_rate.py [--seconds 5] [--concurrency 16] [-- extra `fastws serve` options]

Starts `taskset -c 0 python -m fastws serve` (the demo app, --ping-interval 0 so no keepalive timers
run) and runs `taskset -c 1 python -m fastws bench handshake ws://127.0.0.1:PORT/echo -c 16 -d 5
--server-pid PID` against it.  PYTHONPATH picks the tree under test (a baseline tree works too).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("serve_args", nargs="*")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "fastws", "serve", "--port", str(port),
                               "--ping-interval", "0", "--log-level", "warning", *args.serve_args],
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        result_file = f"/tmp/fastws-handshake-rate-{os.getpid()}.json"
        out = subprocess.run(["taskset", "-c", "1", sys.executable, "-m", "fastws", "bench", "handshake",
                              f"ws://127.0.0.1:{port}/echo", "-c", str(args.concurrency), "-d", str(args.seconds),
                              "--server-pid", str(server.pid), "--json", result_file, "-q"],
                             capture_output=True, text=True, check=False)
    finally:
        server.terminate()
        server.wait(30)
    if out.returncode:
        sys.exit(f"bench failed: {out.stderr[-2000:]}")
    with open(result_file) as f:
        result = json.load(f)
    os.unlink(result_file)
    print(out.stdout.strip())
    res = result.get("results", result)
    rate = res["handshakes_per_s"]
    cpu = next((v for k, v in res.items() if "server" in k and "cpu" in k and isinstance(v, (int, float))), None)
    per = f"{cpu / 100 / rate * 1e6:.0f} µs of server CPU per handshake" if cpu and rate else "server CPU unknown"
    print(f"{rate:,.0f} handshakes/s, {per} (serve {' '.join(args.serve_args) or 'defaults'}; "
          f"PYTHONPATH={os.environ.get('PYTHONPATH', '')})")

if __name__ == "__main__":
    main()
