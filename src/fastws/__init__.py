"""fastws: a Cython-accelerated, high-throughput WebSocket server for Python."""

try:
    from fastws import _frame  # noqa: F401  (the compiled wire core; there is no pure-Python fallback)
except ImportError as exc:  # pragma: no cover - a broken install
    raise ImportError(
        "fastws's compiled wire core (fastws._frame) is missing or broken: "
        "reinstall with 'pip install --force-reinstall fastws' (building from source needs a C compiler)"
    ) from exc

from fastws.app import Accept, App, Config, ConnectRequest, Endpoint, Reject, Response
from fastws.connection import Session
from fastws.errors import (
    CloseCode,
    ConnectionClosed,
    HandshakeError,
    PayloadTooBig,
    ProtocolError,
    WebSocketError,
)
from fastws.hub import Hub
from fastws.server import Server, run, serve, tls_context

__version__ = "0.1.0"

__all__ = [
    "Accept",
    "App",
    "CloseCode",
    "Config",
    "ConnectRequest",
    "ConnectionClosed",
    "Endpoint",
    "HandshakeError",
    "Hub",
    "PayloadTooBig",
    "ProtocolError",
    "Reject",
    "Response",
    "Server",
    "Session",
    "WebSocketError",
    "run",
    "serve",
    "tls_context",
    "__version__",
]
