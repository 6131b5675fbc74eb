"""Opening handshake (RFC 6455 section 4): read the request head, validate, answer 101 or 4xx.

Cold path, plain Python. Every refusal is a HandshakeError carrying the HTTP
status, a one-line reason and any headers the status requires; the connection
layer turns it into bytes with error_response().
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httptools

from ._frame import accept_key
from .deflate import EXTENSION_NAME, DeflateOptions, PerMessageDeflate, parse_extensions
from .errors import HandshakeError

__all__ = [
    "Headers",
    "Request",
    "HeadParser",
    "DeflateOptions",
    "Accepted",
    "Upgrade",
    "is_websocket_upgrade",
    "negotiate",
    "accept",
    "http_response",
    "error_response",
    "new_key",
    "client_request",
    "check_client_response",
]

_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class Headers:
    """Case-insensitive multi-map of header fields; keeps order and original names.

    Iteration and len() are over header *lines* (a repeated name appears twice).
    Lookups go through an index by lower-case name, built on the first one (a
    handshake looks up a dozen names).  (A session keeps its whole request as one
    bytes object instead: Request.pack.)
    """

    __slots__ = ("_items", "_index")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = list(items)
        self._index: dict[str, list[str]] | None = None

    def add(self, name: str, value: str) -> None:
        self._pairs().append((name, value))
        self._index = None

    def _pairs(self) -> list[tuple[str, str]]:
        return self._items

    def index(self) -> dict[str, list[str]]:
        """Lower-case name -> values, in order (read-only: the same dict serves every lookup)."""
        return self._lookup()

    def _lookup(self) -> dict[str, list[str]]:
        index = self._index
        if index is None:
            index = {}
            for k, v in self._pairs():
                key = k.lower()
                values = index.get(key)
                if values is None:
                    index[key] = [v]
                else:
                    values.append(v)
            self._index = index
        return index

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name``."""
        values = self._lookup().get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        return list(self._lookup().get(name.lower(), ()))

    def __getitem__(self, name: str) -> str:
        """``headers["Host"]``: the value of ``name`` (any case); several lines of it are one value
        joined by ", " (RFC 9110 5.3); KeyError when there is none."""
        values = self._lookup().get(name.lower())
        if not values:
            raise KeyError(name)
        return values[0] if len(values) == 1 else ", ".join(values)

    def items(self) -> list[tuple[str, str]]:
        return list(self._pairs())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._lookup()

    def __len__(self) -> int:
        return len(self._pairs())

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._pairs())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._pairs() == other._pairs()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Headers({self._pairs()!r})"


HANDSHAKE_FIELDS = frozenset({"upgrade", "connection", "sec-websocket-key", "sec-websocket-version",
                              "sec-websocket-extensions"})


@dataclass(slots=True)
class Request:
    method: str
    target: str  # raw request target, as sent
    path: str  # percent-decoded
    query: str  # raw, without the "?"
    headers: Headers
    http_version: str = "1.1"  # "1.0" or "1.1"

    def query_params(self) -> dict[str, list[str]]:
        return parse_qs(self.query)

    def pack(self) -> bytes:
        """The request in one compact bytes object (a session keeps this, not the objects).

        The target and the header fields are as received (latin-1, never a NUL: the parser
        refuses those); the path and query are derived from the target again on unpack().
        The handshake's own fields (Upgrade, Connection, Sec-WebSocket-Key/-Version/-Extensions)
        are left out: they have done their job once the 101 is sent."""
        fields = [self.method, self.target, self.http_version]
        for name, value in self.headers.items():
            if name.lower() not in HANDSHAKE_FIELDS:
                fields += (name, value)
        return "\0".join(fields).encode("latin-1")

    @staticmethod
    def unpack(data: bytes) -> Request:
        method, target, version, *pairs = data.decode("latin-1").split("\0")
        return _make_request(method, target, list(zip(pairs[0::2], pairs[1::2], strict=True)),
                             version)


# ---------------------------------------------------------------------------
# Request head parser


class _Sink:
    """The one httptools callback we need: llhttp validates the head, we split it afterwards
    (a Python call per header field from llhttp would cost more than the split)."""

    __slots__ = ("complete",)

    def __init__(self) -> None:
        self.complete = False

    def on_headers_complete(self) -> None:
        self.complete = True


class HeadParser:
    """Incremental HTTP/1.1 request-head reader with hard limits. Uses httptools (llhttp).

    llhttp is strict: bare LF, obs-fold, NUL and other control characters,
    invalid tokens, and conflicting Content-Length/Transfer-Encoding are all
    rejected (400). The head ends at the first CRLF CRLF; only the head is given
    to llhttp, so whatever follows (frames pipelined behind the upgrade, or a
    body) is left in ``rest`` untouched.  Once llhttp has accepted the whole
    head, it is split into fields here: every line is then known to be
    ``name: value`` with a valid token for a name.
    """

    __slots__ = ("max_head_size", "max_headers", "_parser", "_sink", "_head", "_lines", "_error", "_request",
                 "rest")

    def __init__(self, *, max_head_size: int = 8192, max_headers: int = 64) -> None:
        self.max_head_size = max_head_size
        self.max_headers = max_headers
        self._sink = _Sink()
        self._parser = httptools.HttpRequestParser(self._sink)
        self._head = bytearray()  # the head so far (at most max_head_size bytes)
        self._lines = 0  # CRLFs in it
        self._error: HandshakeError | None = None
        self._request: Request | None = None
        self.rest = b""

    @property
    def idle(self) -> bool:
        """No byte of a request has arrived yet."""
        return not self._head and self._request is None

    def feed(self, data: bytes | bytearray | memoryview) -> Request | None:
        """Consume bytes; return the Request once the head is complete, else None.

        After that, further bytes are appended to ``rest`` and the same Request is returned.
        """
        if self._error is not None:
            raise self._error
        data = bytes(data)  # a copy if it's a view into a reused read buffer
        if self._request is not None:
            self.rest += data
            return self._request
        try:
            return self._feed(data)
        except HandshakeError as exc:
            self._error = exc
            raise

    def _feed(self, data: bytes) -> Request | None:
        seen = self._head
        if not seen:  # the usual case: the whole head comes in the first read
            end = data.find(b"\r\n\r\n")
            if 0 <= end <= self.max_head_size - 4:
                self._lines = data.count(b"\r\n", 0, end + 4)
                return self._complete(data[:end + 4], data[end + 4:])
        window = bytes(seen[-3:]) + data
        end = window.find(b"\r\n\r\n")
        if end >= 0:
            cut = end + 4 - min(3, len(seen))  # end of the head inside ``data``
            head, rest = data[:cut], data[cut:]
        else:
            head, rest = data, b""
        # Let llhttp see what fits under the limit first: garbage gets a 400, not a 431.
        allowed = self.max_head_size - len(seen)
        too_big = len(head) > allowed
        if too_big:
            head = head[:allowed]
        self._lines += (bytes(seen[-1:]) + head).count(b"\r\n")
        seen += head
        if end >= 0 and not too_big:
            return self._complete(bytes(seen), rest, head)
        self._parse(head, len(seen))
        if self._lines - 1 > self.max_headers:  # not the request line
            raise HandshakeError(431, f"more than {self.max_headers} header fields")
        if too_big:
            raise HandshakeError(431, f"request head larger than {self.max_head_size} bytes")
        return None

    def _parse(self, chunk: bytes, size: int) -> None:
        """Give llhttp the next part of the head (``size``: the head's length so far)."""
        try:
            self._parser.feed_data(chunk)
        except httptools.HttpParserUpgrade:
            pass  # llhttp pauses after an upgrade request's head: that is the end we wanted
        except httptools.HttpParserError as exc:
            raise HandshakeError(400, _parse_error_reason(exc, size, chunk)) from None

    def _complete(self, head: bytes, rest: bytes, last: bytes | None = None) -> Request:
        """The whole head has arrived (``last``: its final part, if earlier parts went to llhttp)."""
        self._parse(head if last is None else last, len(head))
        if self._lines - 2 > self.max_headers:  # not the request line, nor the final empty one
            raise HandshakeError(431, f"more than {self.max_headers} header fields")
        version = self._parser.get_http_version()
        if version not in ("1.0", "1.1"):  # e.g. 0.9, or the HTTP/2 preface "PRI * HTTP/2.0"
            raise HandshakeError(505, f"HTTP version {version} not supported")
        if not self._sink.complete:  # llhttp saw the head end but no complete head: never trust silence
            raise HandshakeError(400, "malformed HTTP request head")
        lines = head.decode("latin-1").split("\r\n")  # header bytes are opaque octets: latin-1 maps 1:1
        target = lines[0].partition(" ")[2].rpartition(" ")[0]
        header_list = []
        for line in lines[1:-2]:
            name, _, value = line.partition(":")
            header_list.append((name, value.strip(" \t")))
        self._request = _make_request(self._parser.get_method().decode("ascii"), target, header_list, version)
        self.rest = rest
        self._sink = self._parser = self._head = None  # type: ignore[assignment]  # done: free llhttp state
        return self._request


def _parse_error_reason(exc: Exception, size: int, chunk: bytes) -> str:
    if size == len(chunk) and chunk[:1] == b"\x16":
        return "TLS handshake received on a plain-HTTP port"
    detail = str(exc).strip().rstrip(".") or type(exc).__name__
    return f"malformed HTTP request: {detail[:1].lower()}{detail[1:]}"


def _make_request(method: str, target: str, header_list: list[tuple[str, str]], version: str) -> Request:
    if target.startswith("/"):
        raw_path, _, query = target.partition("?")
    elif "://" in target:  # absolute-form (proxies)
        parts = urlsplit(target)
        raw_path, query = parts.path or "/", parts.query
    else:  # "*" or authority-form: no path to speak of
        raw_path, query = target, ""
    raw_path = raw_path.partition("#")[0]
    query = query.partition("#")[0]
    return Request(method, target, unquote(raw_path), query, Headers(header_list), version)


# ---------------------------------------------------------------------------
# Server side


@dataclass(slots=True)
class Accepted:
    response: bytes  # the full "HTTP/1.1 101 Switching Protocols" response head
    subprotocol: str | None
    deflate: PerMessageDeflate | None


def _tokens(values: list[str]) -> list[str]:
    """Comma-separated list elements over several header lines, stripped, empties dropped."""
    tokens = []
    for value in values:
        for part in value.split(","):
            part = part.strip(" \t")
            if part:
                tokens.append(part)
    return tokens


def _has_token(values: list[str], token: str) -> bool:
    """``token`` (lower case) is one of the comma-separated elements, case-insensitively."""
    if len(values) == 1 and values[0].lower() == token:  # the usual case: one header, one element
        return True
    return any(t.lower() == token for t in _tokens(values))


def _show(value: str) -> str:
    """Client-supplied text for a reason line: short and escaped."""
    return repr(value if len(value) <= 40 else value[:40] + "...")


def is_websocket_upgrade(request: Request) -> bool:
    """True if the request asks to upgrade to websocket (routes WS vs plain HTTP)."""
    return _has_token(request.headers.get_all("upgrade"), "websocket")


@dataclass(slots=True)
class Upgrade:
    """A valid upgrade request, negotiated but not yet answered (a connect hook may still refuse it)."""

    key: str
    offered: list[str]  # subprotocols the client offered, in its order
    subprotocol: str | None  # what the configuration chose among them
    deflate: PerMessageDeflate | None

    def response(self, subprotocol: str | None = None, headers: Sequence[tuple[str, str]] = ()) -> Accepted:
        """The 101 for this upgrade: ``subprotocol`` (one that was offered) overrides the negotiated
        one; ``headers`` are added (ValueError for CR/LF or a subprotocol that was not offered)."""
        chosen = self.subprotocol
        if subprotocol is not None:
            if subprotocol not in self.offered:
                raise ValueError(f"subprotocol {subprotocol!r} was not offered by the client ({self.offered})")
            chosen = subprotocol
        lines = [SWITCHING, accept_key(self.key).encode("ascii"), b"\r\n"]
        if chosen is not None:
            lines += (b"Sec-WebSocket-Protocol: ", chosen.encode("ascii"), b"\r\n")
        if self.deflate is not None:
            lines += (b"Sec-WebSocket-Extensions: ", self.deflate.response_params().encode("ascii"), b"\r\n")
        for name, value in headers:
            _check_field(name, value)
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        lines.append(b"\r\n")
        return Accepted(b"".join(lines), chosen, self.deflate)


SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "


def negotiate(
    request: Request,
    *,
    subprotocols: Sequence[str] = (),
    select_subprotocol: Callable[[Request, list[str]], str | None] | None = None,
    allowed_origins: Sequence[str] | None = None,
    deflate: DeflateOptions | None = None,
    max_message_size: int = 1 << 20,
) -> Upgrade:
    """Validate an upgrade request and negotiate subprotocol and extensions; raise HandshakeError
    to refuse.  ``select_subprotocol(request, offered)`` overrides the ``subprotocols`` preference
    order; an answer the client did not offer counts as None.  It may raise HandshakeError itself
    (e.g. 403) to refuse the connection."""
    key = _check_request(request, allowed_origins)
    offered = _offered_subprotocols(request)
    subprotocol = _choose_subprotocol(request, offered, subprotocols, select_subprotocol)
    pmd = _negotiate_deflate(request, deflate, max_message_size)
    return Upgrade(key, offered, subprotocol, pmd)


def accept(request: Request, **options: Any) -> Accepted:
    """Validate an upgrade request and build the 101 response: ``negotiate(request, **options)``
    (same keyword options), then its ``response()``."""
    return negotiate(request, **options).response()


_NONE: list[str] = []
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def _is_key(key: str) -> bool:
    """``key`` is the base64 form of 16 bytes (22 characters, the last one holding 4 bits, and "==")."""
    return len(key) == 24 and key[22:] == "==" and key[21] in "AQgw" and _KEY_CHARS.issuperset(key[:21])


def _check_request(request: Request, allowed_origins: Sequence[str] | None) -> str:
    """RFC 6455 section 4.2.1 checks, in an order that gives the most useful answer. Returns the key."""
    fields = request.headers.index()
    field = fields.get
    if request.method != "GET":
        raise HandshakeError(
            405, f"method {request.method} not allowed: a WebSocket handshake uses GET", [("Allow", "GET")]
        )
    if request.http_version != "1.1":
        raise HandshakeError(400, f"WebSocket upgrade requires HTTP/1.1, not HTTP/{request.http_version}")

    hosts = field("host", _NONE)
    if not hosts:
        raise HandshakeError(400, "missing Host header")
    if len(hosts) > 1:
        raise HandshakeError(400, "multiple Host headers")  # RFC 7230 5.4
    if not hosts[0]:
        raise HandshakeError(400, "empty Host header")

    upgrades = field("upgrade")
    if upgrades is None:
        raise HandshakeError(
            426, "this is a WebSocket endpoint: missing Upgrade: websocket header", [("Upgrade", "websocket")]
        )
    if not _has_token(upgrades, "websocket"):
        raise HandshakeError(
            426,
            f"Upgrade header {_show(', '.join(upgrades))} does not offer websocket",
            [("Upgrade", "websocket")],
        )
    if not _has_token(field("connection", _NONE), "upgrade"):
        raise HandshakeError(400, "Connection header must include Upgrade")

    keys = field("sec-websocket-key", _NONE)
    # Old drafts first: their clients get a pointer to the right protocol, not a key error.
    if not keys and "sec-websocket-key1" in fields:
        raise HandshakeError(
            426,
            "hixie-76 (draft 76) WebSocket handshakes are not supported; use RFC 6455",
            [("Sec-WebSocket-Version", "13")],
        )
    versions = field("sec-websocket-version", _NONE)
    if versions != ["13"]:
        versions = _tokens(versions)
        if not versions:
            raise HandshakeError(
                426,
                "missing Sec-WebSocket-Version header (this server speaks version 13)",
                [("Sec-WebSocket-Version", "13")],
            )
        if versions != ["13"]:
            raise HandshakeError(
                426,
                f"unsupported Sec-WebSocket-Version {_show(', '.join(versions))}; this server speaks version 13",
                [("Sec-WebSocket-Version", "13")],
            )

    if not keys:
        raise HandshakeError(400, "missing Sec-WebSocket-Key header")
    if len(keys) > 1:
        raise HandshakeError(400, "multiple Sec-WebSocket-Key headers")
    key = keys[0]
    if not _is_key(key):  # the slow way, for the error message
        try:
            raw = base64.b64decode(key.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise HandshakeError(400, f"Sec-WebSocket-Key {_show(key)} is not valid base64") from None
        if len(raw) != 16:
            raise HandshakeError(400, f"Sec-WebSocket-Key must be 16 bytes base64-encoded, got {len(raw)} bytes")

    # A body behind an upgrade would be read as WebSocket frames: refuse (smuggling).
    if "transfer-encoding" in fields or any(v != "0" for v in field("content-length", _NONE)):
        raise HandshakeError(400, "a WebSocket upgrade request must not have a body")

    if allowed_origins is not None:
        origins = field("origin", _NONE)
        if not origins:
            raise HandshakeError(403, "missing Origin header")
        if len(origins) > 1:
            raise HandshakeError(403, "multiple Origin headers")
        # Origins are ASCII-serialized with a lower-case scheme and host; compare case-insensitively.
        if origins[0].lower() not in {o.lower() for o in allowed_origins}:
            raise HandshakeError(403, f"origin {_show(origins[0])} not allowed")
    return key


def _offered_subprotocols(request: Request) -> list[str]:
    offered = _tokens(request.headers.get_all("Sec-WebSocket-Protocol"))
    for proto in offered:
        if not all(c in _TCHAR for c in proto):
            raise HandshakeError(400, f"malformed Sec-WebSocket-Protocol value {_show(proto)}")
    return offered


def _choose_subprotocol(
    request: Request,
    offered: list[str],
    subprotocols: Sequence[str],
    select_subprotocol: Callable[[Request, list[str]], str | None] | None,
) -> str | None:
    if select_subprotocol is not None:
        chosen = select_subprotocol(request, offered)
        return chosen if chosen in offered else None  # never echo something the client can't accept
    for proto in subprotocols:  # server preference order
        if proto in offered:
            return proto
    return None


def _negotiate_deflate(
    request: Request, options: DeflateOptions | None, max_message_size: int
) -> PerMessageDeflate | None:
    values = request.headers.get_all("Sec-WebSocket-Extensions")
    if not values:
        return None
    try:
        offers = parse_extensions(", ".join(values))
    except ValueError as exc:
        raise HandshakeError(400, f"malformed Sec-WebSocket-Extensions header: {exc}") from None
    if options is None or not options.enabled:
        return None
    for name, params in offers:  # the client lists offers in its order of preference
        if name.lower() == EXTENSION_NAME:
            pmd = PerMessageDeflate.accept_offer(params, options, max_message_size=max_message_size)
            if pmd is not None:
                return pmd
    return None


# ---------------------------------------------------------------------------
# Plain HTTP responses


def _check_field(name: str, value: str) -> None:
    # Response splitting: a CR or LF (or NUL) in a field would start a new header or body.
    if not name or not all(c in _TCHAR for c in name):
        raise ValueError(f"invalid header name {name!r}")
    if any(c in value for c in "\r\n\x00"):
        raise ValueError(f"invalid value for header {name!r}")


def http_response(
    status: int,
    body: bytes | str = b"",
    *,
    headers: Sequence[tuple[str, str]] = (),
    content_type: str = "text/plain; charset=utf-8",
    keep_alive: bool = False,
    include_body: bool = True,
) -> bytes:
    """A complete HTTP/1.1 response. ``headers`` may override Content-Type and Connection.

    ``include_body=False`` answers a HEAD request: the same head, no body.
    Raises ValueError for a header that would split the response (CR, LF, NUL).
    """
    if isinstance(body, str):
        body = body.encode("utf-8")
    if not (isinstance(status, int) and 100 <= status <= 599):
        raise ValueError(f"invalid HTTP status {status!r}")
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    given = {name.lower() for name, _ in headers}
    fields: list[tuple[str, str]] = []
    if status < 200 or status in (204, 304):
        if body:
            raise ValueError(f"a {status} response cannot have a body")
    else:
        if body and "content-type" not in given:
            fields.append(("Content-Type", content_type))
        fields.append(("Content-Length", str(len(body))))
    if "connection" not in given:
        fields.append(("Connection", "keep-alive" if keep_alive else "close"))
    fields.extend(headers)
    lines = [f"HTTP/1.1 {status} {phrase}"]
    for name, value in fields:
        _check_field(name, value)
        lines.append(f"{name}: {value}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1") + (body if include_body else b"")


def error_response(err: HandshakeError) -> bytes:
    """The response that refuses a handshake; the connection is closed after it."""
    reason = " ".join(err.reason.split())  # one line, whatever the reason contained
    return http_response(err.status, reason + "\n", headers=err.headers)


# ---------------------------------------------------------------------------
# Client side (the bundled client)


def new_key() -> str:
    """A fresh random Sec-WebSocket-Key."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def client_request(
    host: str,
    path: str,
    *,
    key: str,
    subprotocols: Sequence[str] = (),
    deflate: bool = False,
    extra_headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """The client's upgrade request head."""
    fields = [
        ("Host", host),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", "13"),
    ]
    if subprotocols:
        fields.append(("Sec-WebSocket-Protocol", ", ".join(subprotocols)))
    if deflate:
        fields.append(("Sec-WebSocket-Extensions", PerMessageDeflate.offer_params()))
    fields.extend(extra_headers)
    path = path or "/"
    if any(c in path for c in " \r\n\x00"):
        raise ValueError(f"invalid request path {path!r}")
    lines = [f"GET {path} HTTP/1.1"]
    for name, value in fields:
        _check_field(name, value)
        lines.append(f"{name}: {value}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


def check_client_response(
    head: bytes,
    key: str,
    *,
    subprotocols: Sequence[str] | None = None,
    deflate: bool | None = None,
    max_message_size: int = 1 << 20,
) -> tuple[str | None, PerMessageDeflate | None]:
    """Validate the server's answer to client_request(); return (subprotocol, deflate state).

    ``subprotocols`` / ``deflate``: what the client offered, to refuse answers
    it didn't ask for; None skips that check. HandshakeError.status is the
    status the server sent (0 if the status line is unreadable).
    """
    status, headers = _parse_response_head(head)
    if status != 101:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        raise HandshakeError(status, f"server refused the upgrade: {status} {phrase}".rstrip())

    def fail(reason: str) -> HandshakeError:
        return HandshakeError(101, f"invalid 101 response: {reason}")

    if not any(t.lower() == "websocket" for t in _tokens(headers.get_all("Upgrade"))):
        raise fail("missing Upgrade: websocket")
    if not _has_token(headers.get_all("connection"), "upgrade"):
        raise fail("missing Connection: Upgrade")
    accepts = headers.get_all("Sec-WebSocket-Accept")
    if len(accepts) != 1 or accepts[0] != accept_key(key):
        raise fail("wrong or missing Sec-WebSocket-Accept")

    protocols = _tokens(headers.get_all("Sec-WebSocket-Protocol"))
    if len(protocols) > 1:
        raise fail("more than one Sec-WebSocket-Protocol")
    subprotocol = protocols[0] if protocols else None
    if subprotocol is not None and subprotocols is not None and subprotocol not in subprotocols:
        raise fail(f"subprotocol {_show(subprotocol)} was not offered")

    pmd = None
    values = headers.get_all("Sec-WebSocket-Extensions")
    if values:
        try:
            extensions = parse_extensions(", ".join(values))
        except ValueError as exc:
            raise fail(f"malformed Sec-WebSocket-Extensions: {exc}") from None
        for name, params in extensions:
            if name.lower() != EXTENSION_NAME or deflate is False:
                raise fail(f"extension {_show(name)} was not offered")
            if pmd is not None:
                raise fail("permessage-deflate accepted twice")
            try:
                pmd = PerMessageDeflate.from_response(params, max_message_size=max_message_size)
            except ValueError as exc:
                raise fail(str(exc)) from None
    return subprotocol, pmd


def _parse_response_head(head: bytes) -> tuple[int, Headers]:
    """A small strict parser for the server's response head (status line + fields)."""
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    while lines and lines[-1] == "":
        lines.pop()
    status_line = lines[0] if lines else ""
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if version not in ("HTTP/1.1", "HTTP/1.0") or not code.isdigit() or rest[3:4] not in ("", " "):
        raise HandshakeError(0, f"malformed HTTP status line {_show(status_line)}")
    headers = Headers()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or not all(c in _TCHAR for c in name) or "\n" in line or "\r" in line:
            raise HandshakeError(int(code), f"malformed response header line {_show(line)}")
        headers.add(name, value.strip(" \t"))
    return int(code), headers
