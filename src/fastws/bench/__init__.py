"""`fastws bench`: load tools for any ws:// server.

Modes: throughput, latency, connections, broadcast, handshake (one module
each) and ``plot``.  Every mode runs its clients in forked worker processes,
each driving its connections with the Cython engine (``_loadgen.pyx``, run by
``native.py``: own non-blocking sockets on epoll, a C struct per connection,
no Python call per message); the parent process only coordinates, shows
progress and writes the summary and ``--json`` file.  ``legacy.py`` keeps the
previous client (fastws.client) for wss:// and
--client-transport uvloop|aiofastnet.
"""

from fastws.bench.common import BenchError, Histogram, parse_size

__all__ = ["BenchError", "Histogram", "parse_size", "MODES"]

MODES = ("throughput", "latency", "connections", "broadcast", "handshake")
