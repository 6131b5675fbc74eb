"""permessage-deflate (RFC 7692): header parsing, negotiation, and per-connection zlib state.

Window bits and zlib: zlib refuses an 8-bit window for raw deflate
(``compressobj(wbits=-8)`` raises, https://github.com/madler/zlib/issues/171),
so an agreed 8 is compressed with 9, as zlib itself maps 8 to 9. That is safe:
zlib's deflate never emits a distance beyond ``w_size - MIN_LOOKAHEAD``
(512 - 262 = 250 bytes for 9 bits), inside the 256 bytes an 8-bit inflater
keeps (tests/test_deflate.py checks it against ``zlib.decompressobj(-8)``).
Our own policy never *asks* a peer for 8 (a configured 8 is advertised as 9):
wsproto refuses 8 outright and websockets cannot compress with it. We inflate
with at least 9 bits; a larger window is always safe for inflating.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

from ._codec import Compressor, Decompressor
from .errors import CloseCode, PayloadTooBig, ProtocolError

try:
    from . import _zlib
except ImportError:  # pragma: no cover - built without zlib headers (FASTWS_NO_ZLIB=1, Windows)
    _zlib = None  # type: ignore[assignment]
try:
    from . import _zlibng
except ImportError:  # pragma: no cover - built without cmake (or FASTWS_NO_ZLIB_NG=1)
    _zlibng = None  # type: ignore[assignment]
# The streams that connections without context takeover share, one per setting per process:
# zlib-ng's where it was built (see fastws._zlibng; setup.py builds it only beside _zlib), else the
# system zlib's.
_shared = _zlibng if _zlibng is not None else _zlib
SHARED_ZLIB_VERSION = _shared.ZLIB_VERSION if _shared is not None else zlib.ZLIB_RUNTIME_VERSION

__all__ = [
    "EXTENSION_NAME",
    "DeflateOptions",
    "PerMessageDeflate",
    "ExtensionParams",
    "parse_extensions",
    "format_extension",
]

EXTENSION_NAME = "permessage-deflate"
# Our compressor's default level: without context takeover every message starts from nothing, and
# zlib-ng's level 1 (fixed Huffman codes) costs a third of level 6 on small messages at a lower ratio
# (bench/deflate_cost.py); with context takeover the window carries the ratio, zlib's default fits.
LEVEL_NO_CONTEXT_TAKEOVER = 1
LEVEL_CONTEXT_TAKEOVER = 6


def compress_level(level: int | None, no_context_takeover: bool) -> int:
    """The level our compressor uses: the configured one, else the default for its kind of stream."""
    if level is not None:
        return level
    return LEVEL_NO_CONTEXT_TAKEOVER if no_context_takeover else LEVEL_CONTEXT_TAKEOVER
_TAIL = b"\x00\x00\xff\xff"  # the empty stored block a sync flush ends with (RFC 7692 7.2.1)
# RFC 7692 7.1.2: "8".."15" exactly, no leading zeros or signs.
_WINDOW_BITS = {str(bits): bits for bits in range(8, 16)}

ExtensionParams = list[tuple[str, "str | None"]]

# RFC 7230 3.2.6 tchar.
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_OWS = " \t"


@dataclass(slots=True)
class DeflateOptions:
    """Server-side permessage-deflate policy."""

    enabled: bool = False
    server_max_window_bits: int = 15  # our compressor's window (8 is treated as 9, see module doc)
    client_max_window_bits: int = (
        15  # the window we let clients use; < 15 declines clients that can't be told
    )
    server_no_context_takeover: bool = False  # if True always send it (saves memory, costs ratio)
    client_no_context_takeover: bool = False  # if True always ask the client for it
    compress_threshold: int = 128  # messages shorter than this are sent uncompressed
    mem_level: int = 8  # zlib memLevel (1..9): compressor memory is about 2**(mem_level+9) + 2**(bits+2)
    level: int | None = None  # our compressor's zlib level (1..9); None: 1 without context takeover, 6 with

    def __post_init__(self) -> None:
        for name in ("server_max_window_bits", "client_max_window_bits"):
            if not 8 <= getattr(self, name) <= 15:
                raise ValueError(f"{name} must be between 8 and 15")
        if not 1 <= self.mem_level <= 9:
            raise ValueError("mem_level must be between 1 and 9")
        if self.level is not None and not (isinstance(self.level, int) and 1 <= self.level <= 9):
            raise ValueError(f"compression level must be between 1 and 9 (or None for the default), "
                             f"not {self.level!r}")
        if self.compress_threshold < 0:
            raise ValueError("compress_threshold must be >= 0")


def describe(options: DeflateOptions) -> str:
    """One line for the server's start-up log: what compression costs and which zlib does it."""
    shared = (f"one shared stream per process (zlib {SHARED_ZLIB_VERSION}, "
              f"level {compress_level(options.level, True)})")
    if options.server_no_context_takeover:
        return f"permessage-deflate without context takeover: {shared}, no zlib memory per connection"
    own = _zlib.ZLIB_VERSION if _zlib is not None else zlib.ZLIB_RUNTIME_VERSION
    return (f"permessage-deflate with context takeover: each connection's own streams (zlib {own}, level "
            f"{compress_level(options.level, False)}, {options.server_max_window_bits}-bit windows, memLevel "
            f"{options.mem_level}), made on first use; clients that ask for no context takeover get {shared}")


# ---------------------------------------------------------------------------
# Sec-WebSocket-Extensions grammar (RFC 6455 section 9.1)


def parse_extensions(value: str) -> list[tuple[str, ExtensionParams]]:
    """Parse a Sec-WebSocket-Extensions value into ``[(name, [(param, value | None)])]``.

    Join several header lines with ", " before calling. Quoted parameter values
    are unquoted (and must then be tokens, as RFC 6455 9.1 requires). Empty list
    elements are skipped (RFC 7230 section 7). Raises ValueError on bad syntax.
    """
    result: list[tuple[str, ExtensionParams]] = []
    n = len(value)
    i = 0
    while True:
        # Skip OWS and empty list elements.
        while i < n and (value[i] in _OWS or value[i] == ","):
            i += 1
        if i >= n:
            return result
        name, i = _token(value, i, "extension name")
        params: ExtensionParams = []
        while True:
            i = _skip_ows(value, i)
            if i >= n or value[i] == ",":
                break
            if value[i] != ";":
                raise ValueError(f"unexpected {value[i]!r} at position {i}")
            i = _skip_ows(value, i + 1)
            pname, i = _token(value, i, "parameter name")
            i = _skip_ows(value, i)
            pvalue: str | None = None
            if i < n and value[i] == "=":
                i = _skip_ows(value, i + 1)
                if i < n and value[i] == '"':
                    pvalue, i = _quoted(value, i)
                    if not pvalue or not all(c in _TCHAR for c in pvalue):
                        raise ValueError(f"quoted value of {pname} is not a token")
                else:
                    pvalue, i = _token(value, i, f"value of {pname}")
            params.append((pname, pvalue))
        result.append((name, params))


def _skip_ows(s: str, i: int) -> int:
    while i < len(s) and s[i] in _OWS:
        i += 1
    return i


def _token(s: str, i: int, what: str) -> tuple[str, int]:
    start = i
    while i < len(s) and s[i] in _TCHAR:
        i += 1
    if i == start:
        raise ValueError(f"expected {what} at position {start}")
    return s[start:i], i


def _quoted(s: str, i: int) -> tuple[str, int]:
    out: list[str] = []
    i += 1  # opening quote
    while i < len(s):
        c = s[i]
        if c == '"':
            return "".join(out), i + 1
        if c == "\\":
            i += 1
            if i >= len(s):
                break
            c = s[i]
        out.append(c)
        i += 1
    raise ValueError("unterminated quoted string")


def format_extension(name: str, params: ExtensionParams) -> str:
    """Inverse of one parse_extensions item: ``name; a; b=1``."""
    parts = [name]
    for pname, pvalue in params:
        parts.append(pname if pvalue is None else f"{pname}={pvalue}")
    return "; ".join(parts)


@dataclass(slots=True)
class _Params:
    server_no_context_takeover: bool = False
    client_no_context_takeover: bool = False
    server_max_window_bits: int | None = None
    # None: absent; 0: present without a value (only allowed in an offer); else 8..15.
    client_max_window_bits: int | None = None


def _read_params(params: ExtensionParams, *, is_offer: bool) -> _Params | None:
    """Validate permessage-deflate parameters (RFC 7692 section 7.1).

    Returns None when the set is invalid: unknown or duplicate name, a value
    where none is allowed, or window bits outside "8".."15".
    ``client_max_window_bits`` may lack a value only in an offer.
    """
    out = _Params()
    seen: set[str] = set()
    for name, value in params:
        if name in seen:
            return None
        seen.add(name)
        if name == "server_no_context_takeover" and value is None:
            out.server_no_context_takeover = True
        elif name == "client_no_context_takeover" and value is None:
            out.client_no_context_takeover = True
        elif name == "server_max_window_bits" and value in _WINDOW_BITS:
            out.server_max_window_bits = _WINDOW_BITS[value]
        elif name == "client_max_window_bits" and value in _WINDOW_BITS:
            out.client_max_window_bits = _WINDOW_BITS[value]
        elif name == "client_max_window_bits" and value is None and is_offer:
            out.client_max_window_bits = 0
        else:
            return None
    return out


# ---------------------------------------------------------------------------
# Compression state


class PerMessageDeflate:
    """RFC 7692 compression state for one connection (either role).

    ``local_*`` describes our compressor, ``remote_*`` the peer's (our inflater).
    ``compress`` and ``decompress`` are the callables the wire core uses.  With
    the C zlib streams, a direction without context takeover uses the process's
    shared stream for its settings (zlib-ng's, fastws._zlibng, where it was
    built), reset before each message: the connection holds no zlib memory at
    all.  With context takeover the connection owns its stream (the system
    zlib's, fastws._zlib), made on first use (about 64 KiB with the default
    12-bit windows and memLevel 5; see the README).  Without fastws._zlib
    (a build without zlib headers) Python's zlib objects do the same, made per
    message when there is no context takeover.
    """

    __slots__ = (
        "is_server",
        "local_max_window_bits",
        "remote_max_window_bits",
        "local_no_context_takeover",
        "remote_no_context_takeover",
        "mem_level",
        "level",
        "compress_threshold",
        "max_message_size",
        "compress",
        "decompress",
        "_params",
    )

    def __init__(
        self,
        *,
        is_server: bool,
        local_max_window_bits: int,
        remote_max_window_bits: int,
        local_no_context_takeover: bool,
        remote_no_context_takeover: bool,
        mem_level: int = 8,
        level: int | None = None,
        compress_threshold: int = 128,
        max_message_size: int = 1 << 20,
    ) -> None:
        if not (8 <= local_max_window_bits <= 15 and 8 <= remote_max_window_bits <= 15):
            raise ValueError("window bits must be between 8 and 15")
        self.is_server = is_server
        self.local_max_window_bits = local_max_window_bits
        self.remote_max_window_bits = remote_max_window_bits
        self.local_no_context_takeover = local_no_context_takeover
        self.remote_no_context_takeover = remote_no_context_takeover
        self.mem_level = mem_level
        self.level = level = compress_level(level, local_no_context_takeover)
        self.compress_threshold = compress_threshold
        self.max_message_size = max_message_size  # 0 = unlimited
        self._params: str | None = None  # negotiated response, when built by accept_offer()
        # 9 for 8: see the module docstring; a larger window is always safe for inflating
        local_bits, remote_bits = max(9, local_max_window_bits), max(9, remote_max_window_bits)
        self.compress: Any
        self.decompress: Any
        if _zlib is None:
            self.compress = _PyDeflater(level, local_bits, mem_level, not local_no_context_takeover)
            self.decompress = _PyInflater(remote_bits, max_message_size, not remote_no_context_takeover)
        else:
            self.compress = (_shared.shared_deflater(level, local_bits, mem_level)
                             if local_no_context_takeover
                             else _zlib.Deflater(level, local_bits, mem_level, True))
            self.decompress = (_shared.shared_inflater(remote_bits, max_message_size)
                               if remote_no_context_takeover
                               else _zlib.Inflater(remote_bits, max_message_size, True))

    def __repr__(self) -> str:
        role = "server" if self.is_server else "client"
        return (
            f"<PerMessageDeflate {role} level={self.level} local_bits={self.local_max_window_bits} "
            f"remote_bits={self.remote_max_window_bits} "
            f"local_no_ctx={self.local_no_context_takeover} remote_no_ctx={self.remote_no_context_takeover}>"
        )

    @property
    def holds_zlib_memory(self) -> bool:
        """True once this connection owns a zlib stream (context takeover, after use)."""
        return any(getattr(part, "allocated", False) and getattr(part, "context_takeover", False)
                   for part in (self.compress, self.decompress))

    # -- negotiation ---------------------------------------------------------

    def response_params(self) -> str:
        """The Sec-WebSocket-Extensions value the server sends for this state."""
        if self._params is not None:
            return self._params
        server_bits, client_bits = (
            (self.local_max_window_bits, self.remote_max_window_bits)
            if self.is_server
            else (self.remote_max_window_bits, self.local_max_window_bits)
        )
        server_nct, client_nct = (
            (self.local_no_context_takeover, self.remote_no_context_takeover)
            if self.is_server
            else (self.remote_no_context_takeover, self.local_no_context_takeover)
        )
        return _format_response(
            server_nct,
            client_nct,
            server_bits if server_bits < 15 else None,
            client_bits if client_bits < 15 else None,
        )

    @staticmethod
    def offer_params() -> str:
        """The client's offer: default parameters, and "you may limit my window"."""
        return f"{EXTENSION_NAME}; client_max_window_bits"

    @classmethod
    def accept_offer(
        cls, params: ExtensionParams, options: DeflateOptions, *, max_message_size: int = 1 << 20
    ) -> PerMessageDeflate | None:
        """Server side: accept one permessage-deflate offer under ``options``, or decline (None).

        Per RFC 7692 section 5 an offer we can't accept is declined, never fatal.
        """
        offer = _read_params(params, is_offer=True)
        if offer is None:
            return None
        # Our compressor: the smaller of our policy and the client's limit
        # (8 only when the client asks for it; compressed with 9, see module doc).
        policy = max(9, options.server_max_window_bits)
        offered_server_bits = offer.server_max_window_bits
        server_bits = policy if offered_server_bits is None else min(policy, offered_server_bits)
        server_nct = offer.server_no_context_takeover or options.server_no_context_takeover
        # The client offering client_no_context_takeover is a hint; echoing it lets us drop our inflater.
        client_nct = offer.client_no_context_takeover or options.client_no_context_takeover
        # The client's compressor: we can only limit it if it offered the parameter.  Its window only
        # costs us memory between messages, i.e. when it keeps context.
        policy = max(9, options.client_max_window_bits)
        offered_client_bits = offer.client_max_window_bits
        if offered_client_bits is None:
            if policy < 15 and not client_nct:
                return None  # can't bound the client's window: decline rather than break our memory policy
            client_bits = 15
        else:
            client_bits = min(policy, offered_client_bits or 15)

        pmd = cls(
            is_server=True,
            local_max_window_bits=server_bits,
            remote_max_window_bits=client_bits,
            local_no_context_takeover=server_nct,
            remote_no_context_takeover=client_nct,
            mem_level=options.mem_level,
            level=options.level,
            compress_threshold=options.compress_threshold,
            max_message_size=max_message_size,
        )
        # server_max_window_bits must be echoed if offered (RFC 7692 7.1.2.1);
        # client_max_window_bits may only be sent if offered (7.1.2.2).
        pmd._params = _format_response(
            server_nct,
            client_nct,
            server_bits if offered_server_bits is not None or server_bits < 15 else None,
            client_bits if offered_client_bits is not None and client_bits < 15 else None,
        )
        return pmd

    @classmethod
    def from_response(
        cls,
        params: ExtensionParams,
        *,
        offered_client_max_window_bits: bool = True,
        max_message_size: int = 1 << 20,
        compress_threshold: int = 128,
    ) -> PerMessageDeflate:
        """Client side: build the state from the server's accepted parameters (ValueError if invalid)."""
        resp = _read_params(params, is_offer=False)
        if resp is None:
            raise ValueError(
                f"invalid permessage-deflate parameters: {format_extension(EXTENSION_NAME, params)!r}"
            )
        if resp.client_max_window_bits is not None and not offered_client_max_window_bits:
            raise ValueError("server sent client_max_window_bits that the client did not offer")
        return cls(
            is_server=False,
            local_max_window_bits=resp.client_max_window_bits or 15,
            remote_max_window_bits=resp.server_max_window_bits or 15,
            local_no_context_takeover=resp.client_no_context_takeover,
            remote_no_context_takeover=resp.server_no_context_takeover,
            compress_threshold=compress_threshold,
            max_message_size=max_message_size,
        )


def _format_response(
    server_nct: bool, client_nct: bool, server_bits: int | None, client_bits: int | None
) -> str:
    params: ExtensionParams = []
    if server_nct:
        params.append(("server_no_context_takeover", None))
    if client_nct:
        params.append(("client_no_context_takeover", None))
    if server_bits is not None:
        params.append(("server_max_window_bits", str(server_bits)))
    if client_bits is not None:
        params.append(("client_max_window_bits", str(client_bits)))
    return format_extension(EXTENSION_NAME, params)


# ---------------------------------------------------------------------------
# Without fastws._zlib: the same streams on Python's zlib objects (the wire core calls __call__)


class _PyDeflater(Compressor):
    __slots__ = ("level", "bits", "mem_level", "takeover", "_stream")

    def __init__(self, level: int, bits: int, mem_level: int, takeover: bool) -> None:
        self.level, self.bits, self.mem_level, self.takeover = level, bits, mem_level, takeover
        self._stream: Any = None

    def __call__(self, payload: str | bytes | bytearray | memoryview) -> bytes:
        """Deflate one whole message; the trailing 00 00 ff ff is removed (RFC 7692 7.2.1)."""
        if isinstance(payload, str):
            payload = payload.encode()
        stream = self._stream or zlib.compressobj(self.level, zlib.DEFLATED, -self.bits, self.mem_level)
        data = stream.compress(payload) + stream.flush(zlib.Z_SYNC_FLUSH)
        self._stream = stream if self.takeover else None
        return data[:-4] or b"\x00"


class _PyInflater(Decompressor):
    __slots__ = ("bits", "max_size", "takeover", "_stream")

    def __init__(self, bits: int, max_size: int, takeover: bool) -> None:
        self.bits, self.max_size, self.takeover = bits, max_size, takeover
        self._stream: Any = None

    def __call__(self, payload: bytes | bytearray | memoryview) -> bytes:
        if not payload:
            return b""
        stream = self._stream or zlib.decompressobj(-self.bits)
        limit = self.max_size
        try:
            # one byte more than allowed proves "too big" without inflating further (0 = unlimited)
            data = stream.decompress(b"".join((payload, _TAIL)), limit + 1 if limit else 0)
        except zlib.error as exc:
            self._stream = None
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "invalid compressed data") from exc
        if limit and len(data) > limit:
            self._stream = None
            raise PayloadTooBig(f"decompressed message exceeds {limit} bytes")
        # a BFINAL block ends the deflate stream (RFC 7692 7.2.3.3): start afresh
        self._stream = stream if self.takeover and not stream.eof else None
        return data
