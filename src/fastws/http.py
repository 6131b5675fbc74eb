"""The HTTP phase of a connection: read request heads, answer plain routes, hand upgrades over.

Cold path, plain Python: one HttpProtocol per accepted connection until it is
closed or becomes a WebSocket Session.  HTTP/1.1 connections persist between
plain requests (pipelined requests are answered in order); every malformed or
refused request gets a 4xx/5xx with a one-line reason; nothing raised here
reaches the event loop.  What is optional (the PROXY protocol, the connect
hook, per-address caps, metrics, the access log) costs nothing unless configured.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from fastws import proxy_protocol
from fastws.app import ENDPOINT, HANDLER, HTTP, Accept, Config, ConnectRequest, Reject, Response, Route
from fastws.connection import Session
from fastws.errors import HandshakeError
from fastws.handshake import (
    Headers,
    HeadParser,
    Request,
    Upgrade,
    error_response,
    http_response,
    is_websocket_upgrade,
    negotiate,
)
from fastws.logs import log_refused

if TYPE_CHECKING:
    from fastws.server import Server

log = logging.getLogger("fastws")

HTTP_METHODS = "GET, HEAD"
MAX_HELD = 65536  # bytes read ahead while an answer is pending, before reading pauses


class HttpProtocol(asyncio.Protocol):
    """Reads request heads, answers plain routes, and upgrades the connection to a Session."""

    __slots__ = ("_server", "_transport", "_parser", "_peer", "deadline", "_started", "_task", "_done",
                 "_proxy_due", "_proxy_bytes", "_answered")

    def __init__(self, server: Server) -> None:
        self._server = server
        self._parser: HeadParser | None = None
        self._transport: asyncio.Transport | None = None
        self._peer: str | None = None  # the TCP peer's address, looked up when first needed (peer)
        self.deadline = math.inf  # the server's sweep times the connection out then (timed_out)
        self._started = 0.0  # when this request's wait began (the handshake histogram)
        self._task: asyncio.Task[Any] | None = None  # an async handler or connect hook being awaited
        self._done = False  # closed, or upgraded: nothing more to do here
        self._proxy_due = False  # a trusted proxy's PROXY header is still to come
        self._proxy_bytes = b""  # the part of it that has arrived
        self._answered = 0  # requests answered on this connection (keep-alive)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        server = self._server
        cfg = server.config
        if not server.http_started(self):
            self._done = True
            self._reply(http_response(503, "too many connections still in the HTTP phase\n",
                                      headers=[("Retry-After", "1")]))
            return
        self._started = time.monotonic()  # the loop's clock has a resolution of 1 ms (uvloop)
        self.deadline = server.loop.time() + cfg.handshake_timeout
        self._parser = HeadParser(max_head_size=cfg.max_head_size, max_headers=cfg.max_headers)
        self._proxy_due = cfg.proxy_protocol and cfg.is_trusted_proxy(self.peer)

    @property
    def peer(self) -> str:
        """The TCP peer's address (or the PROXY header's source), made into a string only on demand."""
        if self._peer is None:
            peer = self._transport.get_extra_info("peername") if self._transport is not None else None
            self._peer = peer[0] if peer else "unknown"  # AF_UNIX peers have no address
        return self._peer

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        self._finish()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _finish(self) -> None:
        """Leave the HTTP phase (closed or upgraded): stop counting this connection."""
        self.deadline = math.inf
        self._server.http_ended(self)

    def timed_out(self) -> None:
        """The server's sweep: the deadline passed."""
        parser = self._parser
        if self._answered and parser is not None and parser.idle:  # idle between keep-alive requests
            self._close()
            return
        self._reply(http_response(408, f"request head not received within "
                                       f"{self._server.config.handshake_timeout:g} s\n"))

    def shutdown(self) -> None:
        """The server is stopping: refuse what is still in the HTTP phase."""
        if not self._done:
            if self._answered and self._parser is not None and self._parser.idle and self._task is None:
                self._close()
            else:
                self._reply(http_response(503, "server shutting down\n"))

    def data_received(self, data: bytes) -> None:
        if self._done or self._parser is None:
            return
        if self._proxy_due:
            data = self._proxy_header(data)
            if not data:
                return
        elif self._server.config.proxy_protocol and self._parser.idle and proxy_protocol.looks_like_proxy_header(
                data) and not self._server.config.is_trusted_proxy(self.peer):
            self._refuse_early(400, f"PROXY protocol header from {self.peer}, which is not a trusted proxy")
            return
        if self._task is not None:  # an answer is pending: keep what comes, in order
            self._hold(data)
            return
        self._read(data)

    def _hold(self, data: bytes) -> None:
        parser = self._parser
        assert parser is not None
        parser.feed(data)  # its request is complete: the bytes go to parser.rest
        if len(parser.rest) > MAX_HELD and self._transport is not None:
            self._transport.pause_reading()

    def _read(self, data: bytes) -> None:
        """Parse and answer requests until the bytes run out or the connection changes hands."""
        while True:
            parser = self._parser
            if parser is None or self._done or not data:
                return
            if parser.idle:
                self.deadline = self._server.loop.time() + self._server.config.handshake_timeout
            try:
                request = parser.feed(data)
            except HandshakeError as exc:
                err = exc
                if not self._answered and proxy_protocol.looks_like_proxy_header(data):
                    err = HandshakeError(400, "PROXY protocol header, but this server was not told to expect "
                                              "one (proxy_protocol)")
                self._refuse_early(err.status, err.reason, err)
                return
            if request is None:
                return
            if not self._dispatch(request):
                return  # answered and closing, upgraded, or an answer is pending
            data = self._next_request()

    def _next_request(self) -> bytes:
        """A keep-alive answer went out: a fresh parser for the next request; returns bytes of it
        that were already read."""
        parser = self._parser
        assert parser is not None
        rest = parser.rest
        cfg = self._server.config
        self._answered += 1
        self._parser = HeadParser(max_head_size=cfg.max_head_size, max_headers=cfg.max_headers)
        self._started = time.monotonic()
        self.deadline = self._server.loop.time() + cfg.keepalive_timeout
        if self._transport is not None and not self._transport.is_reading():
            self._transport.resume_reading()
        return rest

    def _proxy_header(self, data: bytes) -> bytes:
        """A trusted proxy's PROXY header; returns the bytes after it (b"" while incomplete)."""
        pending = self._proxy_bytes + data
        try:
            parsed = proxy_protocol.parse(pending)
        except proxy_protocol.ProxyHeaderError as exc:
            self._proxy_due = False
            self._refuse_early(400, str(exc))
            return b""
        if parsed is None:
            self._proxy_bytes = pending
            return b""
        used, source = parsed
        self._proxy_due = False
        self._proxy_bytes = b""
        if source is not None:
            self._peer = source
        return pending[used:]

    def _refuse_early(self, status: int, reason: str, err: HandshakeError | None = None) -> None:
        """A request that could not be read (or a bad PROXY header): answer and close."""
        self._server.handshake_failed(status)
        self._reply(error_response(err or HandshakeError(status, reason)))

    def _reply(self, response: bytes) -> None:
        """Answer and close the connection."""
        self._done = True
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(response)
            transport.close()
        self._finish()

    def _close(self) -> None:
        self._done = True
        if self._transport is not None:
            self._transport.close()
        self._finish()

    def _dispatch(self, request: Request) -> bool:
        """Answer ``request``; True if the connection goes on to the next request at once."""
        server = self._server
        found = server.app.match(request.path)
        upgrade = is_websocket_upgrade(request)
        if found is None:
            if upgrade:
                self._refuse(request, HandshakeError(404, f"no route for {request.path}"))
                return False
            return self._answer(request, http_response(404, f"no route for {request.path}\n",
                                                       keep_alive=self._keep_alive(request)))
        route, params = found
        if route.kind == HTTP:
            return self._answer_http(route.target, request)
        assert route.kind in (ENDPOINT, HANDLER)
        self._upgrade(request, route, params)
        return False

    # -- plain HTTP routes ---------------------------------------------------------------

    def _keep_alive(self, request: Request) -> bool:
        """Whether the connection persists after answering ``request`` (RFC 9112 9.3)."""
        if self._server.stopping:
            return False
        headers = request.headers
        if headers.get_all("transfer-encoding") or any(v != "0" for v in headers.get_all("content-length")):
            return False  # a body we do not read: the connection cannot be reused
        tokens = {t.strip().lower() for v in headers.get_all("connection") for t in v.split(",")}
        if request.http_version == "1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    def _answer(self, request: Request, response: bytes) -> bool:
        """Write a plain answer; True if the connection stays open for another request."""
        if not self._keep_alive(request):
            self._reply(response)
            return False
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        transport.write(response)
        return True

    def _answer_http(self, handler: Any, request: Request) -> bool:
        keep = self._keep_alive(request)
        if request.method not in ("GET", "HEAD"):
            return self._answer(request, http_response(
                405, f"method {request.method} not allowed on {request.path}\n",
                headers=[("Allow", HTTP_METHODS)], keep_alive=keep))
        try:
            result = handler(request)
        except Exception:
            log.exception("error in HTTP handler for %s", request.path)
            return self._answer(request, http_response(500, "internal server error\n", keep_alive=keep))
        if inspect.isawaitable(result):
            self.deadline = math.inf  # the handler has its own time limit
            self._task = self._server.spawn(self._answer_later(result, request))
            return False
        return self._answer(request, render(result, request, keep))

    async def _answer_later(self, pending: Any, request: Request) -> None:
        timeout = self._server.config.handshake_timeout
        keep = self._keep_alive(request)
        try:
            result = await asyncio.wait_for(pending, timeout)
        except asyncio.TimeoutError:
            log.error("HTTP handler for %s did not answer within %g s", request.path, timeout)
            response = http_response(503, f"no answer within {timeout:g} s\n")
            keep = False
        except Exception:
            log.exception("error in HTTP handler for %s", request.path)
            response = http_response(500, "internal server error\n", keep_alive=keep)
        else:
            response = render(result, request, keep)
        self._task = None
        if self._done:
            return
        if not keep:
            self._reply(response)
        elif self._answer(request, response):
            self._read(self._next_request())

    # -- the upgrade ---------------------------------------------------------------------

    def _refuse(self, request: Request, err: HandshakeError, response: bytes | None = None) -> None:
        """Refuse an upgrade: count it, log it (access log), answer and close."""
        server = self._server
        server.handshake_failed(err.status)
        if server.access_log:
            log_refused(self._remote(request), request, err.status, err.reason, time.monotonic() - self._started)
        self._reply(response or error_response(err))

    def _remote(self, request: Request) -> str:
        return client_address(self.peer, request.headers, self._server.config)

    def _upgrade(self, request: Request, route: Route, params: dict[str, str]) -> None:
        server = self._server
        cfg = server.config
        try:
            if cfg.max_connections and server.session_count >= cfg.max_connections:
                raise HandshakeError(503, f"server is at its limit of {cfg.max_connections} connections",
                                     [("Retry-After", "5")])
            upgrade = negotiate(request, subprotocols=cfg.subprotocols, select_subprotocol=cfg.select_subprotocol,
                                allowed_origins=cfg.allowed_origins, deflate=cfg.deflate,
                                max_message_size=cfg.max_message_size)
        except HandshakeError as err:
            self._refuse(request, err)
            return
        except Exception:  # e.g. a select_subprotocol hook that raised
            log.exception("error while accepting a WebSocket upgrade on %s", request.path)
            self._refuse(request, HandshakeError(500, "internal server error"))
            return
        hook = server.app.connect_hook(route)
        # None: the session reads its TCP peer's address only if asked (most connections never are)
        remote = (self._remote(request) if cfg.max_connections_per_ip or cfg.trusts_proxies or hook is not None
                  or server.access_log else None)
        if cfg.max_connections_per_ip and not server.claim_address(remote):
            self._refuse(request, HandshakeError(
                429, f"too many connections from {remote} (at most {cfg.max_connections_per_ip})",
                [("Retry-After", "5")]))
            return
        if hook is None:
            self._switch(request, route, params, remote, upgrade, None)
            return
        connect = ConnectRequest(request, params, remote, upgrade.offered)
        try:
            result = hook(connect)
        except Exception as exc:
            self._connect_failed(request, remote, exc)
            return
        if inspect.isawaitable(result):
            remaining = max(0.0, self.deadline - server.loop.time())
            self.deadline = math.inf  # the hook gets what is left of handshake_timeout, no more
            self._task = server.spawn(self._connect_later(result, remaining, request, route, params, remote,
                                                          upgrade))
            return
        self._switch(request, route, params, remote, upgrade, result)

    async def _connect_later(self, pending: Any, timeout: float, request: Request, route: Route,
                             params: dict[str, str], remote: str, upgrade: Upgrade) -> None:
        try:
            result = await asyncio.wait_for(pending, timeout)
        except asyncio.TimeoutError:
            self._task = None
            if not self._done:
                log.error("connect hook for %s did not answer within handshake_timeout", request.path)
                self._release(remote)
                self._refuse(request, HandshakeError(503, "authentication did not answer in time",
                                                     [("Retry-After", "5")]))
            return
        except Exception as exc:
            self._task = None
            self._connect_failed(request, remote, exc)
            return
        self._task = None
        if self._done:  # the client left meanwhile
            self._release(remote)
            return
        self._switch(request, route, params, remote, upgrade, result)

    def _connect_failed(self, request: Request, remote: str, exc: Exception) -> None:
        self._release(remote)
        if isinstance(exc, Reject):
            self._reject(request, remote, exc)
            return
        if isinstance(exc, HandshakeError):
            self._refuse(request, exc)
            return
        if not self._done:
            log.error("connect hook for %s raised", request.path, exc_info=exc)
            self._refuse(request, HandshakeError(500, "internal server error"))

    def _reject(self, request: Request, remote: str, rejection: Reject) -> None:
        body = rejection.body
        reason = (body.decode("utf-8", "replace") if isinstance(body, bytes) else body).strip() or "rejected"
        try:
            response = http_response(rejection.status, body, headers=rejection.headers)
        except ValueError as exc:  # a header with CR/LF, a body on a bodiless status
            log.error("connect hook for %s: unusable rejection: %s", request.path, exc)
            self._refuse(request, HandshakeError(500, "internal server error"))
            return
        self._refuse(request, HandshakeError(rejection.status, reason.splitlines()[0][:200]), response)

    def _release(self, remote: str | None) -> None:
        if self._server.config.max_connections_per_ip:
            self._server.release_address(remote)

    def _switch(self, request: Request, route: Route, params: dict[str, str], remote: str | None, upgrade: Upgrade,
                result: Any) -> None:
        """Send the 101 (with what the connect hook asked for) and hand the connection to a Session."""
        server = self._server
        if self._done:  # the client left while the hook ran
            self._release(remote)
            return
        accept = result if isinstance(result, Accept) else None
        if isinstance(result, Reject):
            self._release(remote)
            self._reject(request, remote, result)
            return
        if result is False:
            self._release(remote)
            self._reject(request, remote, Reject(403, "forbidden\n"))
            return
        if not (result is None or result is True or accept is not None):
            self._connect_failed(request, remote, TypeError(
                f"returned {type(result).__name__}; return None, True, False, fastws.Accept or fastws.Reject"))
            return
        try:
            accepted = upgrade.response(accept.subprotocol, accept.headers) if accept else upgrade.response()
        except ValueError as exc:
            self._connect_failed(request, remote, exc)
            return
        transport = self._transport
        parser = self._parser
        assert transport is not None and parser is not None
        self._done = True
        self._finish()
        transport.write(accepted.response)
        if server.metrics is not None:
            server.metrics.handshake.observe(time.monotonic() - self._started)
        session = Session(server, request, remote, accepted.subprotocol, accepted.deflate)
        if accept is not None:
            session.state = accept.state
            if accept.user is not None:
                server.hub.set_user(session, accept.user)  # session.user, and hub.send_to_user finds it
        initial = parser.rest
        self._parser = self._transport = None  # the session owns the connection now
        if not transport.is_reading():
            transport.resume_reading()
        session.start(transport, route, params, initial)


def render(result: Any, request: Request, keep_alive: bool = False) -> bytes:
    """An HTTP handler's return value as a response; anything unusable is a 500 (and a log line)."""
    body = request.method != "HEAD"
    try:
        if isinstance(result, Response):
            response = http_response(result.status, result.body, headers=result.headers,
                                     content_type=result.content_type, include_body=body, keep_alive=keep_alive)
        elif isinstance(result, dict):
            response = http_response(200, json.dumps(result), content_type="application/json",
                                     include_body=body, keep_alive=keep_alive)
        elif isinstance(result, str):
            response = http_response(200, result, include_body=body, keep_alive=keep_alive)
        elif isinstance(result, (bytes, bytearray, memoryview)):
            response = http_response(200, bytes(result), content_type="application/octet-stream",
                                     include_body=body, keep_alive=keep_alive)
        else:
            raise TypeError(f"returned {type(result).__name__}; return str, bytes, dict or fastws.Response")
    except (TypeError, ValueError) as exc:  # a bad status, a header with CR/LF, an unusable value
        log.error("HTTP handler for %s: %s", request.path, exc)
        return http_response(500, "internal server error\n", keep_alive=keep_alive)
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
