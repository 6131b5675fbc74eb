"""The HTTP phase of a connection: read the request head, answer plain routes, hand upgrades over.

Cold path, plain Python: one HttpProtocol per accepted connection until it
either gets an answer (and is closed) or becomes a WebSocket Session.  Every
malformed or refused request gets a 4xx/5xx with a one-line reason; nothing
raised here reaches the event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import json
import logging
from typing import TYPE_CHECKING, Any

from fastws.app import ENDPOINT, HANDLER, HTTP, Config, Response
from fastws.connection import Session
from fastws.errors import HandshakeError
from fastws.handshake import (
    Headers,
    HeadParser,
    Request,
    accept,
    error_response,
    http_response,
    is_websocket_upgrade,
)

if TYPE_CHECKING:
    from fastws.server import Server

log = logging.getLogger("fastws")

HTTP_METHODS = "GET, HEAD"


class HttpProtocol(asyncio.Protocol):
    """Reads one HTTP request head, then answers it or upgrades the connection to a Session."""

    __slots__ = ("_server", "_transport", "_parser", "_timer", "_task", "_done")

    def __init__(self, server: Server) -> None:
        self._server = server
        cfg = server.config
        self._parser: HeadParser | None = HeadParser(max_head_size=cfg.max_head_size, max_headers=cfg.max_headers)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self._done = False  # answered or upgraded: nothing more to do here

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        server = self._server
        if not server.http_started(self):
            self._done = True
            self._reply(http_response(503, "too many connections still in the HTTP phase\n",
                                      headers=[("Retry-After", "1")]))
            return
        self._timer = server.loop.call_later(server.config.handshake_timeout, self._timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _finish(self) -> None:
        """Leave the HTTP phase (answered, upgraded or gone): stop counting this connection."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server.http_ended(self)

    def _timed_out(self) -> None:
        self._timer = None
        self._reply(http_response(408, f"request head not received within "
                                       f"{self._server.config.handshake_timeout:g} s\n"))

    def shutdown(self) -> None:
        """The server is stopping: refuse what is still in the HTTP phase."""
        if not self._done:
            self._reply(http_response(503, "server shutting down\n"))

    def data_received(self, data: bytes) -> None:
        if self._done or self._parser is None or self._transport is None or self._transport.is_closing():
            return
        try:
            request = self._parser.feed(data)
        except HandshakeError as err:
            self._server.handshake_failed(err.status)
            self._reply(error_response(err))
            return
        if request is not None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._dispatch(request)

    def _reply(self, response: bytes) -> None:
        self._done = True
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(response)
            transport.close()
        self._finish()

    def _dispatch(self, request: Request) -> None:
        server = self._server
        found = server.app.match(request.path)
        if found is None:
            self._reply(http_response(404, f"no route for {request.path}\n"))
            return
        route, params = found
        if route.kind == HTTP:
            self._answer_http(route.target, request)
            return
        assert route.kind in (ENDPOINT, HANDLER)
        self._upgrade(request, route, params)

    # -- plain HTTP routes ---------------------------------------------------------------

    def _answer_http(self, handler: Any, request: Request) -> None:
        if request.method not in ("GET", "HEAD"):
            self._reply(http_response(405, f"method {request.method} not allowed on {request.path}\n",
                                      headers=[("Allow", HTTP_METHODS)]))
            return
        try:
            result = handler(request)
        except Exception:
            log.exception("error in HTTP handler for %s", request.path)
            self._reply(http_response(500, "internal server error\n"))
            return
        if inspect.isawaitable(result):
            self._task = self._server.spawn(self._answer_later(result, request))
            return
        self._reply(render(result, request))

    async def _answer_later(self, pending: Any, request: Request) -> None:
        timeout = self._server.config.handshake_timeout
        try:
            result = await asyncio.wait_for(pending, timeout)
        except asyncio.TimeoutError:
            log.error("HTTP handler for %s did not answer within %g s", request.path, timeout)
            self._reply(http_response(503, f"no answer within {timeout:g} s\n"))
            return
        except Exception:
            log.exception("error in HTTP handler for %s", request.path)
            self._reply(http_response(500, "internal server error\n"))
            return
        self._reply(render(result, request))

    # -- the upgrade ---------------------------------------------------------------------

    def _upgrade(self, request: Request, route: Any, params: dict[str, str]) -> None:
        server = self._server
        cfg = server.config
        try:
            if not is_websocket_upgrade(request):
                raise HandshakeError(426, f"{request.path} is a WebSocket endpoint: send an Upgrade: websocket "
                                          "request", [("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")])
            if cfg.max_connections and server.session_count >= cfg.max_connections:
                raise HandshakeError(503, f"server is at its limit of {cfg.max_connections} connections",
                                     [("Retry-After", "5")])
            accepted = accept(request, subprotocols=cfg.subprotocols, select_subprotocol=cfg.select_subprotocol,
                              allowed_origins=cfg.allowed_origins, deflate=cfg.deflate,
                              max_message_size=cfg.max_message_size)
        except HandshakeError as err:
            server.handshake_failed(err.status)
            self._reply(error_response(err))
            return
        except Exception:  # e.g. a select_subprotocol hook that raised
            log.exception("error while accepting a WebSocket upgrade on %s", request.path)
            server.handshake_failed(500)
            self._reply(http_response(500, "internal server error\n"))
            return
        transport = self._transport
        parser = self._parser
        assert transport is not None and parser is not None
        self._done = True
        self._finish()
        transport.write(accepted.response)
        request.headers = request.headers.packed()  # kept for the session's life: keep it small
        peer = transport.get_extra_info("peername")
        remote = client_address(peer[0] if peer else "unknown", request.headers, cfg)
        session = Session(server, request, remote, accepted.subprotocol, accepted.deflate)
        initial = parser.rest
        self._parser = self._transport = None  # the session owns the connection now
        session.start(transport, route, params, initial)


def render(result: Any, request: Request) -> bytes:
    """An HTTP handler's return value as a response; anything unusable is a 500 (and a log line)."""
    try:
        if isinstance(result, Response):
            response = http_response(result.status, result.body, headers=result.headers,
                                     content_type=result.content_type, include_body=request.method != "HEAD")
        elif isinstance(result, dict):
            response = http_response(200, json.dumps(result), content_type="application/json",
                                     include_body=request.method != "HEAD")
        elif isinstance(result, str):
            response = http_response(200, result, include_body=request.method != "HEAD")
        elif isinstance(result, (bytes, bytearray, memoryview)):
            response = http_response(200, bytes(result), content_type="application/octet-stream",
                                     include_body=request.method != "HEAD")
        else:
            raise TypeError(f"returned {type(result).__name__}; return str, bytes, dict or fastws.Response")
    except (TypeError, ValueError) as exc:  # a bad status, a header with CR/LF, an unusable value
        log.error("HTTP handler for %s: %s", request.path, exc)
        return http_response(500, "internal server error\n")
    return response


# -- who is the client: trusted proxies and their forwarding headers ----------------------


def parse_address(text: str) -> str | None:
    """An IP address out of a forwarding header's element ("1.2.3.4:80", "[::1]:443", '"::1"'), else None."""
    text = text.strip().strip('"').strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # IPv4 with a port (a bare IPv6 has several colons)
        text = text.partition(":")[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None  # "unknown", obfuscated identifiers (RFC 7239 6.3), junk


def forwarded_hops(headers: Headers) -> list[str]:
    """Client addresses the proxies recorded, first hop first: RFC 7239 Forwarded (for=) if present,
    else X-Forwarded-For.  Elements that are not addresses are dropped."""
    forwarded = headers.get_all("forwarded")
    hops: list[str] = []
    if forwarded:
        for value in forwarded:
            for element in value.split(","):
                for pair in element.split(";"):
                    name, _, val = pair.partition("=")
                    if name.strip().lower() == "for":
                        address = parse_address(val)
                        if address is not None:
                            hops.append(address)
        return hops
    for value in headers.get_all("x-forwarded-for"):
        for element in value.split(","):
            address = parse_address(element)
            if address is not None:
                hops.append(address)
    return hops


def client_address(peer: str, headers: Headers, config: Config) -> str:
    """The client's address: the peer's, or -- when the peer is a trusted proxy -- the rightmost
    forwarded hop that is not itself a trusted proxy (clients cannot forge what a proxy appended)."""
    if not config.is_trusted_proxy(peer):
        return peer
    hops = forwarded_hops(headers)
    for hop in reversed(hops):
        if not config.is_trusted_proxy(hop):
            return hop
    real = parse_address(headers.get("x-real-ip") or "")
    if real is not None:
        return real
    return hops[0] if hops else peer
