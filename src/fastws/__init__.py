"""fastws: a Cython-accelerated, high-throughput WebSocket server for Python."""

__version__ = "0.1.0"
