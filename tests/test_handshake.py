"""Unit tests for fastws.handshake: request-head parsing, validation, 101/4xx responses,
subprotocol and permessage-deflate negotiation, and interop with real client/server
handshake code from websockets and wsproto."""

from __future__ import annotations

import base64
import hashlib
import random

import pytest
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    ServerPerMessageDeflateFactory,
)
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri
from wsproto import ConnectionType, WSConnection
from wsproto import events as wsevents
from wsproto.extensions import PerMessageDeflate as WsprotoDeflate

from fastws.deflate import PerMessageDeflate
from fastws.errors import HandshakeError
from fastws.handshake import (
    Accepted,
    DeflateOptions,
    Headers,
    HeadParser,
    Request,
    accept,
    check_client_response,
    client_request,
    error_response,
    http_response,
    is_websocket_upgrade,
    new_key,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
BASE = [
    ("Host", "example.com"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", KEY),
    ("Sec-WebSocket-Version", "13"),
]


def head(
    *,
    method: str = "GET",
    target: str = "/chat",
    version: str = "HTTP/1.1",
    drop: tuple[str, ...] = (),
    add: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """A request head: BASE minus ``drop`` (replaced when also in ``add``) plus ``add``."""
    dropped = {d.lower() for d in drop}
    fields = [(n, v) for n, v in BASE if n.lower() not in dropped] + list(add)
    lines = [f"{method} {target} {version}"] + [f"{n}: {v}" for n, v in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse(data: bytes, **kw: int) -> Request:
    request = HeadParser(**kw).feed(data)
    assert request is not None
    return request


def refuse(data: bytes, **accept_kw: object) -> HandshakeError:
    with pytest.raises(HandshakeError) as info:
        accept(parse(data), **accept_kw)  # type: ignore[arg-type]
    err = info.value
    assert "\n" not in err.reason and err.reason
    return err


def parse_error(data: bytes, **kw: int) -> HandshakeError:
    with pytest.raises(HandshakeError) as info:
        HeadParser(**kw).feed(data)
    assert "\n" not in info.value.reason
    return info.value


def response_headers(response: bytes) -> Headers:
    text = response.decode("latin-1")
    assert text.endswith("\r\n\r\n")
    lines = text[:-4].split("\r\n")
    return Headers(tuple(line.split(": ", 1)) for line in lines[1:])  # type: ignore[misc]


# ---------------------------------------------------------------------------
# Headers and Request


def test_headers_multimap() -> None:
    h = Headers([("Host", "a"), ("X-Thing", "1"), ("x-thing", "2")])
    assert h.get("HOST") == "a"
    assert h.get("x-THING") == "1"
    assert h.get_all("X-Thing") == ["1", "2"]
    assert h.get("missing") is None and h.get("missing", "d") == "d"
    assert h.get_all("missing") == []
    assert "host" in h and "nope" not in h and 3 not in h
    assert len(h) == 3
    assert list(h) == ["Host", "X-Thing", "x-thing"]  # original spelling, in order
    assert h.items() == [("Host", "a"), ("X-Thing", "1"), ("x-thing", "2")]


def test_request_path_query() -> None:
    r = parse(head(target="/a%20b/%E2%9C%93?x=1&x=2&y=%2F"))
    assert r.method == "GET" and r.http_version == "1.1"
    assert r.target == "/a%20b/%E2%9C%93?x=1&x=2&y=%2F"
    assert r.path == "/a b/\u2713"
    assert r.query == "x=1&x=2&y=%2F"
    assert r.query_params() == {"x": ["1", "2"], "y": ["/"]}


def test_request_absolute_form_target() -> None:
    r = parse(head(target="http://example.com/ws?room=1"))
    assert (r.path, r.query) == ("/ws", "room=1")


def test_header_values_are_trimmed() -> None:
    r = parse(head(add=(("X-Pad", "  value \t "),)))
    assert r.headers.get("X-Pad") == "value"


# ---------------------------------------------------------------------------
# HeadParser: splitting, rest, limits, malformed input


def test_rfc_example_key() -> None:
    accepted = accept(parse(head()))
    assert f"Sec-WebSocket-Accept: {ACCEPT}\r\n".encode() in accepted.response
    # The same value the RFC algorithm gives.
    digest = hashlib.sha1((KEY + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
    assert base64.b64encode(digest).decode() == ACCEPT


def test_every_split_point() -> None:
    data = head(add=(("Sec-WebSocket-Protocol", "chat"),)) + b"\x81\x85frame"
    whole = parse(data[: data.index(b"\r\n\r\n") + 4])
    for i in range(len(data) + 1):
        parser = HeadParser()
        first = parser.feed(data[:i])
        second = parser.feed(data[i:])  # after the head: returns the same Request, extends rest
        assert (first is None or first is second) and second == whole, i
        assert parser.rest == b"\x81\x85frame", i


def test_byte_by_byte_and_empty_feeds() -> None:
    data = head()
    parser = HeadParser()
    assert parser.feed(b"") is None
    results = [parser.feed(data[i : i + 1]) for i in range(len(data))]
    assert results[:-1] == [None] * (len(data) - 1)
    assert results[-1] is not None and results[-1].headers.get("Sec-WebSocket-Key") == KEY
    assert parser.rest == b""


def test_rest_keeps_growing_after_head() -> None:
    parser = HeadParser()
    request = parser.feed(head() + b"ab")
    assert request is not None
    assert parser.feed(b"cd") is request  # late bytes are not parsed as HTTP
    assert parser.rest == b"abcd"


def test_feed_accepts_buffer_views() -> None:
    buffer = bytearray(head() + b"xy")
    parser = HeadParser()
    assert parser.feed(memoryview(buffer)[:20]) is None
    assert parser.feed(memoryview(buffer)[20:]) is not None
    buffer[-2:] = b"zz"  # the read buffer is reused: rest must not change with it
    assert parser.rest == b"xy"


def test_head_size_limit_exact() -> None:
    base = head()
    pad = 200 - len(base) - len("X-Pad: \r\n")
    data = head(add=(("X-Pad", "p" * pad),))
    assert len(data) == 200
    assert parse(data, max_head_size=200).headers.get("X-Pad") == "p" * pad
    err = parse_error(head(add=(("X-Pad", "p" * (pad + 1)),)), max_head_size=200)
    assert err.status == 431 and "200 bytes" in err.reason


def test_head_size_limit_without_terminator() -> None:
    # A slowloris growing one endless header: refused as soon as the limit is crossed.
    parser = HeadParser(max_head_size=1000)
    assert parser.feed(b"GET / HTTP/1.1\r\nX-Long: ") is None
    for _ in range(9):
        assert parser.feed(b"a" * 100) is None
    with pytest.raises(HandshakeError) as info:
        parser.feed(b"a" * 100)
    assert info.value.status == 431
    with pytest.raises(HandshakeError):  # stays failed
        parser.feed(b"\r\n\r\n")


def test_header_count_limit() -> None:
    extra = tuple((f"X-{i}", "v") for i in range(10 - len(BASE)))
    assert len(parse(head(add=extra), max_headers=10).headers) == 10
    err = parse_error(head(add=extra + (("X-Last", "v"),)), max_headers=10)
    assert err.status == 431 and "10 header fields" in err.reason


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"\x00\x01\x02\x03garbage\r\n\r\n", 400, "malformed HTTP request"),
        (b"HELLO\r\n\r\n", 400, "malformed HTTP request"),
        (b"get / HTTP/1.1\r\n\r\n", 400, "method"),
        (b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", 400, "malformed"),
        (b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400, "malformed"),
        (b"GET / HTTP/1.1\r\nHost x\r\n\r\n", 400, "header token"),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400, "header token"),
        (b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n", 400, "header value char"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n", 400, "whitespace"),
        (b"GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", 400, "CR"),
        (b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", 400, "LF"),
        (b"GET /\x7f HTTP/1.1\r\nHost: x\r\n\r\n", 400, "url"),
        (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, "Content-Length"),
        (
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "Transfer-Encoding",
        ),
        (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "TLS handshake"),
        (b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", 400, "version"),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505, "HTTP version 2.0"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, "HTTP version 2.0"),
        (b"GET /\r\n\r\n", 505, "HTTP version 0.9"),
    ],
)
def test_malformed_heads(data: bytes, status: int, reason: str) -> None:
    err = parse_error(data)
    assert err.status == status
    assert reason.lower() in err.reason.lower()


def test_malformed_head_detected_before_terminator() -> None:
    # Garbage is refused on the first bytes, not after waiting for a blank line.
    with pytest.raises(HandshakeError) as info:
        HeadParser().feed(b"\x16\x03\x01\x02\x00")
    assert info.value.status == 400 and "TLS" in info.value.reason


def test_oversized_garbage_is_400_not_431() -> None:
    assert parse_error(b"\x00" * 10000, max_head_size=100).status == 400


def test_mutated_requests_never_raise_anything_else() -> None:
    # Cheap fuzzing: flip/insert/delete bytes of a valid request; only HandshakeError may escape.
    rng = random.Random(1234)
    good = head(
        add=(
            ("Sec-WebSocket-Protocol", "a, b"),
            ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
            ("Origin", "http://example.com"),
        )
    )
    statuses = set()
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(data))
            op = rng.random()
            if op < 0.5:
                data[pos] = rng.randrange(256)
            elif op < 0.75:
                data.insert(pos, rng.choice(b' \t\r\n:;,="\x00\xffaZ'))
            else:
                del data[pos]
        parser = HeadParser()
        try:
            request = parser.feed(bytes(data))
            if request is not None:
                accept(
                    request,
                    subprotocols=["b"],
                    allowed_origins=["http://example.com"],
                    deflate=DeflateOptions(enabled=True),
                )
                statuses.add(101)
        except HandshakeError as exc:
            assert "\n" not in exc.reason
            statuses.add(exc.status)
    assert {101, 400}.issubset(statuses)


# ---------------------------------------------------------------------------
# accept(): the good path


def test_accept_minimal_response_bytes() -> None:
    accepted = accept(parse(head()))
    assert isinstance(accepted, Accepted)
    assert accepted.response == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"\r\n"
    )
    assert accepted.subprotocol is None and accepted.deflate is None


@pytest.mark.parametrize(
    "fields",
    [
        {"Upgrade": "WebSocket", "Connection": "upgrade"},
        {"Upgrade": "WEBSOCKET", "Connection": "keep-alive, Upgrade"},
        {"Upgrade": "h2c, websocket", "Connection": "Upgrade,HTTP2-Settings"},
        {"Sec-WebSocket-Version": " 13 "},
        {"Host": "example.com:8080", "Origin": "http://anything"},
        {"Content-Length": "0"},
    ],
)
def test_accept_variants(fields: dict[str, str]) -> None:
    accepted = accept(parse(head(drop=tuple(fields), add=tuple(fields.items()))))
    assert accepted.response.startswith(b"HTTP/1.1 101 ")


def test_is_websocket_upgrade() -> None:
    assert is_websocket_upgrade(parse(head()))
    assert is_websocket_upgrade(parse(head(drop=("Upgrade",), add=(("Upgrade", "foo, WebSocket"),))))
    assert not is_websocket_upgrade(parse(head(drop=("Upgrade",))))
    assert not is_websocket_upgrade(parse(head(drop=("Upgrade",), add=(("Upgrade", "h2c"),))))
    assert not is_websocket_upgrade(parse(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))


# ---------------------------------------------------------------------------
# accept(): the refusal matrix


@pytest.mark.parametrize(
    ("request_kw", "accept_kw", "status", "reason", "headers"),
    [
        ({"method": "POST"}, {}, 405, "method POST not allowed", [("Allow", "GET")]),
        ({"method": "HEAD"}, {}, 405, "uses GET", [("Allow", "GET")]),
        ({"version": "HTTP/1.0"}, {}, 400, "requires HTTP/1.1", []),
        ({"drop": ("Host",)}, {}, 400, "missing Host", []),
        ({"add": (("Host", "other"),)}, {}, 400, "multiple Host", []),
        ({"drop": ("Host",), "add": (("Host", ""),)}, {}, 400, "empty Host", []),
        ({"drop": ("Upgrade",)}, {}, 426, "this is a WebSocket endpoint", [("Upgrade", "websocket")]),
        (
            {"drop": ("Upgrade",), "add": (("Upgrade", "h2c"),)},
            {},
            426,
            "does not offer websocket",
            [("Upgrade", "websocket")],
        ),
        ({"drop": ("Connection",)}, {}, 400, "Connection header must include Upgrade", []),
        ({"drop": ("Connection",), "add": (("Connection", "keep-alive"),)}, {}, 400, "include Upgrade", []),
        ({"drop": ("Sec-WebSocket-Key",)}, {}, 400, "missing Sec-WebSocket-Key", []),
        ({"add": (("Sec-WebSocket-Key", KEY),)}, {}, 400, "multiple Sec-WebSocket-Key", []),
        (
            {"drop": ("Sec-WebSocket-Key",), "add": (("Sec-WebSocket-Key", "not base64!!"),)},
            {},
            400,
            "not valid base64",
            [],
        ),
        (
            {"drop": ("Sec-WebSocket-Key",), "add": (("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ"),)},
            {},
            400,
            "not valid base64",
            [],
        ),  # missing padding
        (
            {"drop": ("Sec-WebSocket-Key",), "add": (("Sec-WebSocket-Key", "c2hvcnQ="),)},
            {},
            400,
            "16 bytes base64-encoded, got 5 bytes",
            [],
        ),
        (
            {"drop": ("Sec-WebSocket-Key",), "add": (("Sec-WebSocket-Key", KEY + ", " + KEY),)},
            {},
            400,
            "not valid base64",
            [],
        ),
        (
            {"drop": ("Sec-WebSocket-Version",)},
            {},
            426,
            "missing Sec-WebSocket-Version",
            [("Sec-WebSocket-Version", "13")],
        ),
        (
            {"drop": ("Sec-WebSocket-Version",), "add": (("Sec-WebSocket-Version", "8"),)},
            {},
            426,
            "unsupported Sec-WebSocket-Version '8'",
            [("Sec-WebSocket-Version", "13")],
        ),
        (
            {"drop": ("Sec-WebSocket-Version",), "add": (("Sec-WebSocket-Version", "13, 8"),)},
            {},
            426,
            "unsupported Sec-WebSocket-Version",
            [("Sec-WebSocket-Version", "13")],
        ),
        (
            {"add": (("Sec-WebSocket-Version", "13"),)},
            {},
            426,
            "unsupported",
            [("Sec-WebSocket-Version", "13")],
        ),
        (
            {
                "drop": ("Sec-WebSocket-Key", "Sec-WebSocket-Version"),
                "add": (
                    ("Sec-WebSocket-Key1", "4 @1  46546xW%0l 1 5"),
                    ("Sec-WebSocket-Key2", "12998 5 Y3 1  .P00"),
                ),
            },
            {},
            426,
            "hixie-76",
            [("Sec-WebSocket-Version", "13")],
        ),
        ({"add": (("Content-Length", "5"),)}, {}, 400, "must not have a body", []),
        ({"add": (("Transfer-Encoding", "chunked"),)}, {}, 400, "must not have a body", []),
        ({}, {"allowed_origins": ["https://good.example"]}, 403, "missing Origin", []),
        (
            {"add": (("Origin", "https://evil.example"),)},
            {"allowed_origins": ["https://good.example"]},
            403,
            "origin 'https://evil.example' not allowed",
            [],
        ),
        (
            {"add": (("Origin", "https://good.example"), ("Origin", "https://evil.example"))},
            {"allowed_origins": ["https://good.example"]},
            403,
            "multiple Origin",
            [],
        ),
        ({"add": (("Sec-WebSocket-Protocol", "chat v2"),)}, {}, 400, "malformed Sec-WebSocket-Protocol", []),
        (
            {"add": (("Sec-WebSocket-Extensions", "permessage-deflate; =1"),)},
            {},
            400,
            "malformed Sec-WebSocket-Extensions",
            [],
        ),
    ],
)
def test_refusals(
    request_kw: dict, accept_kw: dict, status: int, reason: str, headers: list[tuple[str, str]]
) -> None:
    err = refuse(head(**request_kw), **accept_kw)
    assert err.status == status
    assert reason in err.reason
    assert err.headers == headers


def test_refusal_reason_does_not_echo_long_client_data() -> None:
    err = refuse(head(drop=("Sec-WebSocket-Key",), add=(("Sec-WebSocket-Key", "x" * 500),)))
    assert len(err.reason) < 120


def test_origin_allowed_case_insensitive() -> None:
    request = parse(head(add=(("Origin", "HTTPS://Good.Example"),)))
    assert accept(request, allowed_origins=["https://good.example"]).response.startswith(b"HTTP/1.1 101")


# ---------------------------------------------------------------------------
# Subprotocols


@pytest.mark.parametrize(
    ("offered", "server", "expected"),
    [
        (["chat.v1, chat.v2"], ["chat.v2", "chat.v1"], "chat.v2"),  # server preference wins
        (["chat.v1", "chat.v2"], ["chat.v2"], "chat.v2"),  # several header lines
        (["a,, b ,"], ["b"], "b"),  # empty list elements are fine
        (["chat.v1"], ["mqtt"], None),  # nothing in common: proceed without
        ([], ["chat"], None),
        (["chat"], [], None),
        (["Chat"], ["chat"], None),  # subprotocol tokens are case-sensitive
    ],
)
def test_subprotocol_selection(offered: list[str], server: list[str], expected: str | None) -> None:
    request = parse(head(add=tuple(("Sec-WebSocket-Protocol", v) for v in offered)))
    accepted = accept(request, subprotocols=server)
    assert accepted.subprotocol == expected
    got = response_headers(accepted.response).get_all("Sec-WebSocket-Protocol")
    assert got == ([expected] if expected else [])


def test_subprotocol_hook() -> None:
    request = parse(head(add=(("Sec-WebSocket-Protocol", "a, b, c"),)))
    seen = []

    def pick(req: Request, offered: list[str]) -> str | None:
        seen.append((req, offered))
        return offered[-1]

    assert accept(request, subprotocols=["a"], select_subprotocol=pick).subprotocol == "c"
    assert seen == [(request, ["a", "b", "c"])]
    # An answer the client didn't offer must not be echoed.
    assert accept(request, select_subprotocol=lambda r, o: "zzz").subprotocol is None
    assert accept(request, select_subprotocol=lambda r, o: None).subprotocol is None


def test_subprotocol_hook_can_refuse() -> None:
    def deny(req: Request, offered: list[str]) -> str | None:
        raise HandshakeError(403, "token required")

    err = refuse(head(), select_subprotocol=deny)
    assert (err.status, err.reason) == (403, "token required")


# ---------------------------------------------------------------------------
# permessage-deflate negotiation


ON = DeflateOptions(enabled=True)


@pytest.mark.parametrize(
    ("offers", "options", "expected"),
    [
        (["permessage-deflate"], ON, "permessage-deflate"),
        (["permessage-deflate; client_max_window_bits"], ON, "permessage-deflate"),
        (
            ["permessage-deflate;client_max_window_bits=10"],
            ON,
            "permessage-deflate; client_max_window_bits=10",
        ),
        (
            ['permessage-deflate; client_max_window_bits="10"'],
            ON,
            "permessage-deflate; client_max_window_bits=10",
        ),
        (
            ["permessage-deflate; server_max_window_bits=10"],
            ON,
            "permessage-deflate; server_max_window_bits=10",
        ),
        (
            ["permessage-deflate; server_max_window_bits=15"],
            ON,
            "permessage-deflate; server_max_window_bits=15",
        ),
        (
            ["permessage-deflate; server_max_window_bits=8"],
            ON,
            "permessage-deflate; server_max_window_bits=8",
        ),
        (
            ["permessage-deflate; server_no_context_takeover"],
            ON,
            "permessage-deflate; server_no_context_takeover",
        ),
        (
            ["permessage-deflate; client_no_context_takeover"],
            ON,
            "permessage-deflate; client_no_context_takeover",
        ),
        (
            [
                "permessage-deflate; client_no_context_takeover; server_no_context_takeover; "
                "server_max_window_bits=9; client_max_window_bits=12"
            ],
            ON,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
            "server_max_window_bits=9; client_max_window_bits=12",
        ),
        # Invalid offers are declined, not fatal (RFC 7692 section 5).
        (["permessage-deflate; server_max_window_bits"], ON, None),
        (["permessage-deflate; server_max_window_bits=16"], ON, None),
        (["permessage-deflate; server_max_window_bits=7"], ON, None),
        (["permessage-deflate; server_max_window_bits=08"], ON, None),
        (["permessage-deflate; client_max_window_bits=abc"], ON, None),
        (["permessage-deflate; server_no_context_takeover=1"], ON, None),
        (["permessage-deflate; server_no_context_takeover; server_no_context_takeover"], ON, None),
        (["permessage-deflate; unknown_param"], ON, None),
        (["x-webkit-deflate-frame"], ON, None),
        # ... and the next acceptable offer is taken.
        (
            ["permessage-deflate; unknown, permessage-deflate; server_no_context_takeover"],
            ON,
            "permessage-deflate; server_no_context_takeover",
        ),
        (["x-webkit-deflate-frame", "permessage-deflate; client_max_window_bits"], ON, "permessage-deflate"),
        ([", permessage-deflate ,, "], ON, "permessage-deflate"),
        (["permessage-deflate, permessage-deflate; server_max_window_bits=10"], ON, "permessage-deflate"),
        # Server policy.
        (["permessage-deflate"], DeflateOptions(enabled=False), None),
        (["permessage-deflate"], None, None),
        (
            ["permessage-deflate"],
            DeflateOptions(enabled=True, server_max_window_bits=10),
            "permessage-deflate; server_max_window_bits=10",
        ),
        (
            ["permessage-deflate"],
            DeflateOptions(enabled=True, server_max_window_bits=8),
            "permessage-deflate; server_max_window_bits=9",
        ),  # zlib can't do 8: see deflate.py
        (
            ["permessage-deflate; server_max_window_bits=14"],
            DeflateOptions(enabled=True, server_max_window_bits=12),
            "permessage-deflate; server_max_window_bits=12",
        ),
        (
            ["permessage-deflate; server_max_window_bits=10"],
            DeflateOptions(enabled=True, server_max_window_bits=12),
            "permessage-deflate; server_max_window_bits=10",
        ),
        (
            ["permessage-deflate; client_max_window_bits"],
            DeflateOptions(enabled=True, client_max_window_bits=10),
            "permessage-deflate; client_max_window_bits=10",
        ),
        (
            ["permessage-deflate; client_max_window_bits"],
            DeflateOptions(enabled=True, client_max_window_bits=8),
            "permessage-deflate; client_max_window_bits=9",
        ),
        (
            ["permessage-deflate; client_max_window_bits=9"],
            DeflateOptions(enabled=True, client_max_window_bits=10),
            "permessage-deflate; client_max_window_bits=9",
        ),
        # The client can't be told to shrink its window: declined rather than over our memory policy.
        (["permessage-deflate"], DeflateOptions(enabled=True, client_max_window_bits=10), None),
        (
            ["permessage-deflate"],
            DeflateOptions(enabled=True, server_no_context_takeover=True),
            "permessage-deflate; server_no_context_takeover",
        ),
        (
            ["permessage-deflate"],
            DeflateOptions(enabled=True, client_no_context_takeover=True),
            "permessage-deflate; client_no_context_takeover",
        ),
    ],
)
def test_deflate_negotiation(offers: list[str], options: DeflateOptions | None, expected: str | None) -> None:
    request = parse(head(add=tuple(("Sec-WebSocket-Extensions", v) for v in offers)))
    accepted = accept(request, deflate=options, max_message_size=12345)
    got = response_headers(accepted.response).get_all("Sec-WebSocket-Extensions")
    assert got == ([expected] if expected else [])
    if expected is None:
        assert accepted.deflate is None
    else:
        assert accepted.deflate is not None
        assert accepted.deflate.response_params() == expected
        assert accepted.deflate.max_message_size == 12345
        assert accepted.deflate.is_server


def test_deflate_negotiated_state() -> None:
    request = parse(
        head(
            add=(
                (
                    "Sec-WebSocket-Extensions",
                    "permessage-deflate; client_max_window_bits=11; server_no_context_takeover",
                ),
            )
        )
    )
    options = DeflateOptions(enabled=True, server_max_window_bits=13, compress_threshold=64, mem_level=5)
    pmd = accept(request, deflate=options).deflate
    assert pmd is not None
    assert (pmd.local_max_window_bits, pmd.remote_max_window_bits) == (13, 11)
    assert (pmd.local_no_context_takeover, pmd.remote_no_context_takeover) == (True, False)
    assert (pmd.compress_threshold, pmd.mem_level) == (64, 5)


@pytest.mark.parametrize(
    "value",
    [
        "permessage-deflate; =1",
        "permessage-deflate;; server_no_context_takeover",
        'permessage-deflate; client_max_window_bits="10',
        'permessage-deflate; client_max_window_bits="1 0"',
        "permessage-deflate client_max_window_bits",
        "permessage-deflate; a=b=c",
        "(deflate)",
    ],
)
def test_malformed_extension_header_is_400(value: str) -> None:
    err = refuse(head(add=(("Sec-WebSocket-Extensions", value),)), deflate=ON)
    assert err.status == 400 and "Sec-WebSocket-Extensions" in err.reason


def test_deflate_options_validation() -> None:
    with pytest.raises(ValueError):
        DeflateOptions(server_max_window_bits=16)
    with pytest.raises(ValueError):
        DeflateOptions(client_max_window_bits=7)
    with pytest.raises(ValueError):
        DeflateOptions(mem_level=10)


# ---------------------------------------------------------------------------
# Plain HTTP responses


def test_http_response_bytes() -> None:
    assert http_response(200, "ok\n") == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\n"
        b"Connection: close\r\n\r\nok\n"
    )
    assert http_response(204, keep_alive=True) == b"HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n"
    assert http_response(404) == b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def test_http_response_headers() -> None:
    data = http_response(
        200, b"{}", headers=[("Content-Type", "application/json"), ("X-A", "1")], content_type="ignored"
    )
    assert data.count(b"Content-Type") == 1 and b"Content-Type: application/json\r\n" in data
    assert b"X-A: 1\r\n" in data
    assert http_response(599).startswith(b"HTTP/1.1 599 Unknown\r\n")
    with pytest.raises(ValueError):
        http_response(200, headers=[("X-A", "1\r\nSet-Cookie: evil=1")])
    with pytest.raises(ValueError):
        http_response(200, headers=[("Bad Name", "1")])
    with pytest.raises(ValueError):
        http_response(204, b"body")


def test_error_response() -> None:
    err = refuse(head(method="POST"))
    data = error_response(err)
    assert data.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    headers = response_headers(data.split(b"\r\n\r\n")[0] + b"\r\n\r\n")
    assert headers.get("Allow") == "GET"
    assert headers.get("Connection") == "close"
    body = data.split(b"\r\n\r\n", 1)[1]
    assert body == (err.reason + "\n").encode()
    assert headers.get("Content-Length") == str(len(body))


def test_error_response_for_426_and_multiline_reason() -> None:
    data = error_response(HandshakeError(426, "line one\nline two", [("Sec-WebSocket-Version", "13")]))
    assert data.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"Sec-WebSocket-Version: 13\r\n" in data
    assert data.endswith(b"\r\n\r\nline one line two\n")


# ---------------------------------------------------------------------------
# Client side helpers


def test_client_request_round_trip_with_own_server() -> None:
    key = new_key()
    assert len(base64.b64decode(key)) == 16
    data = client_request(
        "example.com:8000",
        "/chat?x=1",
        key=key,
        subprotocols=["a", "b"],
        deflate=True,
        extra_headers=[("Origin", "http://example.com")],
    )
    request = parse(data)
    assert (request.path, request.query, request.headers.get("Host")) == ("/chat", "x=1", "example.com:8000")
    accepted = accept(request, subprotocols=["b"], allowed_origins=["http://example.com"], deflate=ON)
    subprotocol, pmd = check_client_response(accepted.response, key, subprotocols=["a", "b"], deflate=True)
    assert subprotocol == "b"
    assert pmd is not None and not pmd.is_server
    assert accepted.deflate is not None
    # The two ends agree on the data.
    message = b"hello hello hello hello hello" * 10
    assert accepted.deflate.decompress(pmd.compress(message)) == message
    assert pmd.decompress(accepted.deflate.compress(message)) == message


def test_client_request_rejects_injection() -> None:
    with pytest.raises(ValueError):
        client_request("example.com\r\nX: y", "/", key=KEY)
    with pytest.raises(ValueError):
        client_request("example.com", "/a b", key=KEY)


def good_101(*extra: str) -> bytes:
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {ACCEPT}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_check_client_response_ok() -> None:
    assert check_client_response(good_101(), KEY) == (None, None)
    sub, pmd = check_client_response(
        good_101(
            "Sec-WebSocket-Protocol: b",
            "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10; "
            "client_max_window_bits=9",
        ),
        KEY,
        subprotocols=["a", "b"],
        deflate=True,
    )
    assert sub == "b"
    assert pmd is not None
    assert (pmd.local_max_window_bits, pmd.remote_max_window_bits) == (9, 10)


@pytest.mark.parametrize(
    ("response", "kw", "status", "reason"),
    [
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", {}, 403, "server refused the upgrade: 403"),
        (b"HTTP/1.1 200 OK\r\n\r\n", {}, 200, "refused"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", {}, 0, "malformed HTTP status line"),
        (good_101().replace(b"Upgrade: websocket\r\n", b""), {}, 101, "Upgrade"),
        (good_101().replace(b"Connection: Upgrade", b"Connection: close"), {}, 101, "Connection"),
        (good_101().replace(ACCEPT.encode(), b"x" * 28), {}, 101, "Sec-WebSocket-Accept"),
        (good_101(f"Sec-WebSocket-Accept: {ACCEPT}"), {}, 101, "Sec-WebSocket-Accept"),
        (good_101("Sec-WebSocket-Protocol: a, b"), {}, 101, "more than one"),
        (good_101("Sec-WebSocket-Protocol: c"), {"subprotocols": ["a"]}, 101, "not offered"),
        (good_101("Sec-WebSocket-Extensions: x-foo"), {}, 101, "not offered"),
        (good_101("Sec-WebSocket-Extensions: permessage-deflate"), {"deflate": False}, 101, "not offered"),
        (good_101("Sec-WebSocket-Extensions: permessage-deflate, permessage-deflate"), {}, 101, "twice"),
        (
            good_101("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"),
            {},
            101,
            "invalid permessage-deflate parameters",
        ),
        (
            good_101("Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=20"),
            {},
            101,
            "invalid permessage-deflate parameters",
        ),
        (good_101('Sec-WebSocket-Extensions: permessage-deflate; x="1'), {}, 101, "malformed"),
        (good_101("no colon here"), {}, 101, "malformed response header"),
    ],
)
def test_check_client_response_refusals(response: bytes, kw: dict, status: int, reason: str) -> None:
    with pytest.raises(HandshakeError) as info:
        check_client_response(response, KEY, **kw)
    assert info.value.status == status
    assert reason in info.value.reason


# ---------------------------------------------------------------------------
# Interop: real clients accept our 101, real servers accept our request


def websockets_client(**kw: object) -> tuple[ClientProtocol, bytes]:
    client = ClientProtocol(parse_uri("ws://example.com/chat"), **kw)  # type: ignore[arg-type]
    client.send_request(client.connect())
    return client, b"".join(client.data_to_send())


@pytest.mark.parametrize(
    ("factory", "options"),
    [
        (ClientPerMessageDeflateFactory(), ON),
        (
            ClientPerMessageDeflateFactory(client_max_window_bits=True),
            DeflateOptions(enabled=True, server_max_window_bits=10, client_max_window_bits=11),
        ),
        (ClientPerMessageDeflateFactory(server_max_window_bits=12, client_no_context_takeover=True), ON),
        (
            ClientPerMessageDeflateFactory(server_no_context_takeover=True),
            DeflateOptions(enabled=True, client_no_context_takeover=True),
        ),
        (ClientPerMessageDeflateFactory(server_max_window_bits=8), ON),
    ],
)
def test_websockets_client_accepts_our_101(
    factory: ClientPerMessageDeflateFactory, options: DeflateOptions
) -> None:
    client, data = websockets_client(subprotocols=["chat.v1", "chat.v2"], extensions=[factory])
    request = parse(data)
    assert is_websocket_upgrade(request)
    accepted = accept(request, subprotocols=["chat.v2"], deflate=options)
    client.receive_data(accepted.response + b"\x81\x02hi")
    assert client.handshake_exc is None, client.handshake_exc
    assert client.state is State.OPEN
    assert client.subprotocol == "chat.v2"
    [ext] = client.extensions
    ours = accepted.deflate
    assert ours is not None
    # The client's view of the negotiated parameters mirrors ours.
    assert ext.local_max_window_bits == ours.remote_max_window_bits
    assert ext.remote_max_window_bits == ours.local_max_window_bits
    assert ext.local_no_context_takeover == ours.remote_no_context_takeover
    assert ext.remote_no_context_takeover == ours.local_no_context_takeover


def test_websockets_client_without_extensions() -> None:
    client, data = websockets_client()
    accepted = accept(parse(data), deflate=ON)
    client.receive_data(accepted.response)
    assert client.handshake_exc is None and client.state is State.OPEN
    assert client.extensions == [] and client.subprotocol is None


def test_websockets_client_reads_our_refusal() -> None:
    client, data = websockets_client()
    with pytest.raises(HandshakeError) as info:
        accept(parse(data), allowed_origins=["https://good.example"])
    client.receive_data(error_response(info.value))
    assert client.handshake_exc is not None
    assert "403" in str(client.handshake_exc)
    assert client.handshake_exc.response.body == b"missing Origin header\n"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "extension",
    [
        WsprotoDeflate(),
        WsprotoDeflate(client_no_context_takeover=True, server_max_window_bits=10),
        WsprotoDeflate(server_no_context_takeover=True, client_max_window_bits=9),
    ],
)
def test_wsproto_client_accepts_our_101(extension: WsprotoDeflate) -> None:
    ws = WSConnection(ConnectionType.CLIENT)
    data = ws.send(
        wsevents.Request(host="example.com", target="/chat", subprotocols=["x", "y"], extensions=[extension])
    )
    accepted = accept(parse(data), subprotocols=["y", "x"], deflate=ON)
    ws.receive_data(accepted.response)
    [event] = list(ws.events())
    assert isinstance(event, wsevents.AcceptConnection), event
    assert event.subprotocol == "y"
    [ext] = event.extensions
    assert isinstance(ext, WsprotoDeflate) and ext.enabled()
    ours = accepted.deflate
    assert ours is not None
    assert ext.server_max_window_bits == ours.local_max_window_bits
    assert ext.client_max_window_bits == ours.remote_max_window_bits
    assert ext.server_no_context_takeover == ours.local_no_context_takeover
    assert ext.client_no_context_takeover == ours.remote_no_context_takeover


@pytest.mark.parametrize("deflate", [False, True])
def test_websockets_server_accepts_our_request(deflate: bool) -> None:
    server = ServerProtocol(
        subprotocols=["b"],
        extensions=[ServerPerMessageDeflateFactory(server_max_window_bits=11, client_max_window_bits=10)],
    )
    key = new_key()
    server.receive_data(
        client_request("example.com", "/chat", key=key, subprotocols=["a", "b"], deflate=deflate)
    )
    [request] = server.events_received()
    response = server.accept(request)
    server.send_response(response)
    assert server.handshake_exc is None and response.status_code == 101
    data = b"".join(server.data_to_send())
    head_bytes = data[: data.index(b"\r\n\r\n") + 4]
    subprotocol, pmd = check_client_response(head_bytes, key, subprotocols=["a", "b"], deflate=deflate)
    assert subprotocol == "b"
    if deflate:
        assert pmd is not None
        assert (pmd.local_max_window_bits, pmd.remote_max_window_bits) == (10, 11)
    else:
        assert pmd is None


def test_wsproto_server_accepts_our_request() -> None:
    ws = WSConnection(ConnectionType.SERVER)
    key = new_key()
    ws.receive_data(client_request("example.com", "/chat", key=key, subprotocols=["a"], deflate=True))
    [event] = list(ws.events())
    assert isinstance(event, wsevents.Request)
    data = ws.send(wsevents.AcceptConnection(subprotocol="a", extensions=[WsprotoDeflate()]))
    subprotocol, pmd = check_client_response(data, key, subprotocols=["a"], deflate=True)
    assert subprotocol == "a" and isinstance(pmd, PerMessageDeflate)
