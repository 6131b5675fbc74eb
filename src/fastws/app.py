"""What an application declares: its configuration, its routes, and the Endpoint base class."""

from __future__ import annotations

import inspect
import ipaddress
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastws.handshake import DeflateOptions, Headers, Request
from fastws.hub import Hub

if TYPE_CHECKING:
    from fastws.connection import Session
    from fastws.server import Server

TRANSPORTS = ("uvloop", "aiofastnet")
KiB, MiB = 1024, 1024 * 1024


@dataclass
class Config:
    """Server options; the defaults are meant for production (the README's configuration table)."""

    max_message_size: int = 1 * MiB  # bytes; larger messages close with 1009
    ping_interval: float | None = 20.0  # seconds of silence before we ping (below nginx's 60 s)
    ping_timeout: float | None = 20.0  # seconds to wait for any bytes after a ping (then 1011); None: no limit
    close_timeout: float = 5.0  # every way out of OPEN ends TCP within this many seconds
    handshake_timeout: float = 10.0  # seconds for the whole request head (slowloris)
    idle_timeout: float | None = None  # close (1001) after this long without a data message
    max_head_size: int = 8192
    max_headers: int = 64
    max_connections: int = 0  # WebSocket sessions per process; 0 = no limit; when full, upgrades get 503
    max_pending_handshakes: int = 1024  # connections still in the HTTP phase; past it, new ones get 503
    max_frames_per_read: int = 1024  # frames handled per read before other connections get a turn
    write_high_water: int = 64 * KiB  # transport buffer size where send() starts to wait
    max_send_buffer: int = 4 * MiB  # non-awaited sends past this cut the peer off (1008)
    send_budget: int = 256 * MiB  # unsent bytes all slow peers of a process may hold; past it the biggest go (1013)
    max_queue: int = 64  # messages queued for async code before reading pauses
    max_queue_bytes: int = 4 * MiB  # bytes queued for async code before reading pauses
    allowed_origins: Sequence[str] | None = None  # None = any Origin
    subprotocols: Sequence[str] = ()  # in order of preference
    select_subprotocol: Callable[[Request, list[str]], str | None] | None = None
    compression: bool = False  # permessage-deflate (RFC 7692)
    compress_threshold: int = 128
    compression_no_context_takeover: bool = True  # no zlib memory per connection: one shared stream
    compression_window_bits: int = 12  # with context takeover: each connection's window (both ways)
    compression_mem_level: int = 5  # with context takeover: zlib memLevel of each connection's compressor
    compression_level: int | None = None  # 1..9; None: 1 without context takeover (fast), 6 with (README)
    trusted_proxies: Sequence[str] = ()  # addresses/networks whose forwarding headers we believe
    proxy_protocol: bool = False  # trusted proxies must start each connection with a PROXY v1/v2 header
    max_connections_per_ip: int = 0  # WebSocket sessions per client address (after proxies); 0 = no limit
    keepalive_timeout: float = 5.0  # seconds an HTTP/1.1 connection may idle between plain requests
    access_log: bool = False  # one "fastws.access" line per WebSocket connection and per refused upgrade
    metrics: bool = False  # serve /metrics (Prometheus text format)
    metrics_dir: str | None = None  # with workers: where they find each other for a scrape (set by run())
    drain_timeout: float = 10.0  # graceful shutdown: seconds for clients to answer the 1001
    transport: str = "uvloop"  # "uvloop": the loop's own transports; "aiofastnet": aiofastnet's (Cython)
    malloc_trim_threshold: int = 16 * MiB  # fastws serve / run(): free heap glibc keeps for big messages; 0: its own
    deflate: DeflateOptions = field(init=False)

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {self.transport!r}")
        for name in ("max_message_size", "max_connections", "max_pending_handshakes", "max_frames_per_read",
                     "max_send_buffer", "send_budget", "max_queue_bytes", "max_connections_per_ip",
                     "malloc_trim_threshold", "compress_threshold", "max_head_size", "max_headers",
                     "write_high_water", "max_queue"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, not {value!r}")
        for name in ("allowed_origins", "subprotocols", "trusted_proxies"):
            if isinstance(getattr(self, name), (str, bytes)):  # it would be taken as its characters
                raise ValueError(f"{name} must be a list of strings, not the string {getattr(self, name)!r}")
        for name in ("max_head_size", "max_headers", "max_frames_per_read", "max_queue"):
            if getattr(self, name) < 1:  # 0 would refuse every request, read no frame, queue nothing
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)!r}")
        for name, low, high in (("compression_window_bits", 8, 15), ("compression_mem_level", 1, 9)):
            value = getattr(self, name)
            if not (isinstance(value, int) and low <= value <= high):
                raise ValueError(f"{name} must be between {low} and {high}, not {value!r}")
        for name in ("close_timeout", "handshake_timeout", "ping_timeout", "drain_timeout", "keepalive_timeout"):
            if name == "ping_timeout" and self.ping_timeout is None:
                continue  # pings go on every interval; a silent client is never closed for them
            if not isinstance(getattr(self, name), (int, float)) or not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, not {getattr(self, name)!r}")
        for name in ("ping_interval", "idle_timeout"):  # None or 0: off
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not 0 <= value < float("inf")):
                raise ValueError(f"{name} must be a number of seconds (0 or None: off), not {value!r}")
        nct = self.compression_no_context_takeover
        if nct:  # one shared stream per process: the full window costs nothing per connection
            bits, mem_level = 15, 8
        else:  # each connection keeps its windows: bounded (~64 KiB with the defaults; README)
            bits, mem_level = self.compression_window_bits, self.compression_mem_level
        self.deflate = DeflateOptions(
            enabled=self.compression, compress_threshold=self.compress_threshold,
            server_no_context_takeover=nct, client_no_context_takeover=nct,
            server_max_window_bits=bits, client_max_window_bits=bits, mem_level=mem_level,
            level=self.compression_level)
        try:
            self._proxies = [ipaddress.ip_network(p, strict=False) for p in self.trusted_proxies]
        except ValueError as exc:
            raise ValueError(f"trusted_proxies: {exc}") from None
        if self.proxy_protocol and not self._proxies:
            raise ValueError("proxy_protocol needs trusted_proxies: the addresses allowed to send PROXY headers")

    @property
    def trusts_proxies(self) -> bool:
        """Some peers are trusted proxies: a client's address may then differ from its TCP peer's."""
        return bool(self._proxies)

    def is_trusted_proxy(self, host: str) -> bool:
        if not self._proxies:
            return False
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in net for net in self._proxies)


class Endpoint:
    """Subclass and route it: one instance per connection.

    ``self.session`` sends and closes, ``self.hub`` finds other sessions and
    rooms, ``self.params`` holds the path parameters.  Every hook may be a
    plain method or ``async def``; messages are handled in order either way,
    and ``on_close`` is the last call an endpoint gets.
    """

    session: Session

    @property
    def hub(self) -> Hub:
        return self.session.hub

    @property
    def params(self) -> dict[str, str]:
        return self.session.params

    def on_open(self) -> Any:
        pass

    def on_message(self, message: str | bytes) -> Any:
        pass

    def on_close(self, code: int, reason: str) -> Any:
        pass

    def on_error(self, exc: BaseException) -> Any:
        """Called with an exception raised by another hook (the session then closes with 1011)."""


Handler = Callable[["Session"], Awaitable[Any]]
HttpHandler = Callable[[Request], Any]
Target = type[Endpoint] | Handler


@dataclass
class Response:
    """A plain HTTP answer for an HTTP route (a str body is sent as text/plain unless told otherwise)."""

    body: str | bytes = b""
    status: int = 200
    content_type: str = "text/plain; charset=utf-8"
    headers: Sequence[tuple[str, str]] = ()


class Reject(Exception):
    """Refuse a WebSocket upgrade from a connect hook (raise it or return it): the client gets this
    HTTP status, these headers (e.g. ``Location`` for a redirect, ``WWW-Authenticate`` for a 401)
    and this short body."""

    def __init__(self, status: int = 403, body: str | bytes = "", headers: Sequence[tuple[str, str]] = ()) -> None:
        if not (isinstance(status, int) and 300 <= status <= 599):
            raise ValueError(f"a rejection needs a 3xx, 4xx or 5xx status, not {status!r}")
        super().__init__(status, body)
        self.status = status
        self.body = body
        self.headers = headers


@dataclass
class Accept:
    """Accept a WebSocket upgrade from a connect hook, optionally choosing the subprotocol (one the
    client offered), adding response headers (``Set-Cookie``...) and attaching ``user``/``state``
    (seen as ``session.user``/``session.state``; a user is also registered with the hub)."""

    subprotocol: str | None = None  # None: the configured negotiation decides
    headers: Sequence[tuple[str, str]] = ()
    user: Any = None
    state: Any = None


@dataclass(eq=False)
class ConnectRequest:
    """What a connect hook knows about the connection asking to upgrade (before any 101 is sent)."""

    request: Request
    params: dict[str, str]  # path parameters of the route
    remote: str  # the client's address, after trusted proxies / PROXY protocol
    subprotocols: list[str]  # offered by the client, in its order

    @property
    def path(self) -> str:
        return self.request.path

    @property
    def headers(self) -> Headers:
        return self.request.headers

    @property
    def query(self) -> dict[str, str]:
        """Query parameters, the first value of each (``request.query_params()`` has them all)."""
        return {k: v[0] for k, v in self.request.query_params().items()}

    @property
    def origin(self) -> str | None:
        return self.request.headers.get("origin")

    @property
    def cookies(self) -> dict[str, str]:
        """The ``Cookie`` header as a dict (RFC 6265 5.4 pairs; the first of a repeated name wins)."""
        jar: dict[str, str] = {}
        for line in self.request.headers.get_all("cookie"):
            for pair in line.split(";"):
                name, eq, value = pair.strip().partition("=")
                if eq and name and name not in jar:
                    jar[name] = value.strip('"')
        return jar


ConnectResult = Accept | Reject | bool | None
ConnectHook = Callable[[ConnectRequest], "ConnectResult | Awaitable[ConnectResult]"]


# Route kinds
ENDPOINT, HANDLER, HTTP = "endpoint", "handler", "http"


@dataclass(frozen=True)
class Route:
    """A registered path and what serves it; the ``async`` questions are answered once, here."""

    pattern: re.Pattern[str]
    kind: str
    target: Any
    async_open: bool = False  # Endpoint.on_open is a coroutine function
    async_message: bool = False  # Endpoint.on_message is a coroutine function
    on_connect: ConnectHook | None = None  # the route's own connect hook, else the App's


class App:
    """Routes paths (``/chat/{room}``) to Endpoint classes, handler coroutines and HTTP handlers."""

    def __init__(self, *, on_connect: ConnectHook | None = None) -> None:
        """``on_connect(request)``: the connect hook of every WebSocket route without its own (see
        ``route``)."""
        self._routes: list[Route] = []
        self.on_connect = on_connect
        self.hub = Hub()
        self.http("/healthz")(self._healthz)
        self.server: Server | None = None

    def route(self, path: str, *, on_connect: ConnectHook | None = None) -> Callable[[Target], Target]:
        """Route WebSocket upgrades on ``path`` to an Endpoint subclass or ``async def handler(ws)``.

        ``on_connect(request: ConnectRequest)``, plain or ``async``, decides before the 101 (within
        ``handshake_timeout``): return None/True or an ``Accept`` to accept, raise or return a
        ``Reject`` (or return False: 403) to refuse.  It replaces the App's hook on this route.
        """
        if on_connect is not None and not callable(on_connect):
            raise TypeError(f"on_connect {on_connect!r} is not callable")

        def register(target: Target) -> Target:
            if isinstance(target, type) and issubclass(target, Endpoint):
                self._add(path, ENDPOINT, target, on_connect=on_connect,
                          async_open=inspect.iscoroutinefunction(target.on_open),
                          async_message=inspect.iscoroutinefunction(target.on_message))
            elif inspect.iscoroutinefunction(target):
                self._add(path, HANDLER, target, on_connect=on_connect)
            else:
                raise TypeError(f"{target!r} is neither an Endpoint subclass nor an async function: a handler "
                                "is `async def handler(ws)`, and sync code goes in an Endpoint's on_message")
            return target

        return register

    def http(self, path: str) -> Callable[[HttpHandler], HttpHandler]:
        """Route plain HTTP GET (and HEAD) on ``path`` to ``handler(request)``, plain or ``async``,
        returning str, bytes, dict (JSON) or Response."""

        def register(handler: HttpHandler) -> HttpHandler:
            if not callable(handler):
                raise TypeError(f"{handler!r} is not callable")
            self._add(path, HTTP, handler)
            return handler

        return register

    def _add(self, path: str, kind: str, target: Any, **flags: Any) -> None:
        if not path.startswith("/"):
            raise ValueError(f"route {path!r} must start with '/'")
        names = re.findall(r"\{([A-Za-z_]\w*)\}", path)
        rest = re.sub(r"\{[A-Za-z_]\w*\}", "", path)
        if "{" in rest or "}" in rest:  # a stray brace would be a literal no request path can hold
            raise ValueError(f"route {path!r}: a parameter is {{name}}, a Python identifier between braces")
        if len(set(names)) != len(names):
            raise ValueError(f"route {path!r} names a parameter twice")
        pattern = re.compile("^" + re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(path)) + "$")
        # a later registration of the same path replaces the earlier one (e.g. /healthz)
        self._routes = [r for r in self._routes if r.pattern.pattern != pattern.pattern]
        self._routes.append(Route(pattern, kind, target, **flags))

    def connect_hook(self, route: Route) -> ConnectHook | None:
        return route.on_connect or self.on_connect

    def match(self, path: str) -> tuple[Route, dict[str, str]] | None:
        for route in self._routes:
            m = route.pattern.match(path)
            if m:
                return route, m.groupdict()
        return None

    def _healthz(self, request: Request) -> dict[str, Any]:
        server = self.server
        return {"status": "ok", **(server.health() if server else {})}
