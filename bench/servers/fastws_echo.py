"""fastws: the demo app's /echo, started exactly as users start it (`fastws serve`).

Extra arguments go to `fastws serve` (e.g. `--transport aiofastnet` once the
server has that option).
"""

from __future__ import annotations

import sys

from _common import MAX_MESSAGE

from fastws.cli import main

if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9001)
    args, extra = p.parse_known_args()
    print(f"fastws echo server on port {args.port} {' '.join(extra)}", flush=True)
    sys.exit(
        main(
            [
                "serve",
                "--host",
                args.host,
                "--port",
                str(args.port),
                "--log-level",
                "warning",
                "--max-message-size",
                str(MAX_MESSAGE),
                *extra,
            ]
        )
    )
