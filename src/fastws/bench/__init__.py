"""`fastws bench`: load tools for any ws:// server.

Modes: throughput, latency, connections, broadcast, handshake (one module
each) and ``plot``.  Every mode runs its clients in forked worker processes
(uvloop + the fastws wire core, callback mode: no queue, no task per
message); the parent process only coordinates, shows progress and writes the
summary and ``--json`` file.
"""

from fastws.bench.common import BenchError, Histogram, parse_size

__all__ = ["BenchError", "Histogram", "parse_size", "MODES"]

MODES = ("throughput", "latency", "connections", "broadcast", "handshake")
