#!/usr/bin/env bash
# Every section of bench/RESULTS.md, measured afresh on this machine, in one command: the echo
# tables (bench/compare.py, which keeps the other tools' sections), then the sections the other
# tools write into it (ASGI on uvicorn, compression).  About 45 minutes on 2 cores; run it on a
# quiet machine (nothing else loading the CPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
"$PYTHON" bench/compare.py --repeat 3 --duration 3 --warmup 1 --idle 10000 --hold 3 --scale 0
"$PYTHON" bench/asgi_compare.py --rounds 2
"$PYTHON" bench/asgi_compare.py --app bare --only fastws,websockets-sansio
"$PYTHON" bench/compression.py --messages 100000
