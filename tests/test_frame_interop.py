"""Wire core vs wsproto, an independent RFC 6455 implementation (hypothesis property tests).

fastws-encoded frames must parse in wsproto into the same messages, and wsproto-encoded
frames must parse in a fastws FrameReader into the same messages, whatever the
fragmentation and wherever the byte stream is cut into reads.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import CloseReason, FrameProtocol, Opcode

import oracles as O
from fastws._frame import OP_BINARY, OP_CONTINUATION, OP_TEXT, FrameReader, FrameWriter, encode_frame
from oracles import MODES, Recorder, drive

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A "message" here: ("message", str|bytes, cut points) or ("ping"/"pong", bytes) or ("close", code, reason).
payload_text = st.text(max_size=300)
payload_bytes = st.binary(max_size=600)


@st.composite
def data_message(draw):
    data = draw(st.one_of(payload_text, payload_bytes))
    raw = data.encode() if isinstance(data, str) else data
    cuts = sorted(set(draw(st.lists(st.integers(0, len(raw)), max_size=4))))
    return ("message", data, cuts)


control = st.one_of(
    st.tuples(st.just("ping"), st.binary(max_size=125)),
    st.tuples(st.just("pong"), st.binary(max_size=125)),
)


@st.composite
def conversations(draw, with_close=True):
    """Messages and control frames; control frames may also sit between the fragments of a message."""
    items = draw(st.lists(st.one_of(data_message(), data_message(), control), max_size=8))
    inner = {}  # message index -> {fragment index: control}
    for i, it in enumerate(items):
        if it[0] == "message" and it[2]:
            inner[i] = draw(st.dictionaries(st.integers(1, len(it[2])), control, max_size=2))
    close = None
    if with_close and draw(st.booleans()):
        close = (
            draw(st.sampled_from([1000, 1001, 1003, 1008, 1011, 3000, 4999])),
            draw(st.text(max_size=30)),
        )
    return items, inner, close


def expected_calls(items, inner, close):
    calls = []
    for i, it in enumerate(items):
        if it[0] == "message":
            for _, ctl in sorted(inner.get(i, {}).items()):
                calls.append(ctl)
            calls.append(("message", it[1]))
        else:
            calls.append(it)
    if close is not None:
        calls.append(("close", *close))
    return calls


def fragments(raw: bytes, cuts):
    bounds = [0, *cuts, len(raw)]
    return [raw[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def fastws_encode(items, inner, close, *, mask):
    """Encode with fastws.encode_frame (byte-level fragmentation: may cut inside a UTF-8 character)."""
    out = []
    for i, it in enumerate(items):
        if it[0] == "message":
            data = it[1]
            raw = data.encode() if isinstance(data, str) else data
            frags = fragments(raw, it[2])
            for j, frag in enumerate(frags):
                if j in inner.get(i, {}):
                    ctl = inner[i][j]
                    out.append(encode_frame(9 if ctl[0] == "ping" else 10, ctl[1], mask=mask))
                op = (OP_TEXT if isinstance(data, str) else OP_BINARY) if j == 0 else OP_CONTINUATION
                out.append(encode_frame(op, frag, fin=j == len(frags) - 1, mask=mask))
        else:
            out.append(encode_frame(9 if it[0] == "ping" else 10, it[1], mask=mask))
    if close is not None:
        out.append(encode_frame(8, close[0].to_bytes(2, "big") + close[1].encode(), mask=mask))
    return b"".join(out)


def wsproto_encode(items, inner, close, *, client):
    """Encode with wsproto (text is fragmented on character boundaries, as wsproto takes str)."""
    proto = FrameProtocol(client=client, extensions=[])
    out = []
    for i, it in enumerate(items):
        if it[0] == "message":
            data = it[1]
            if isinstance(data, str):
                # map byte cuts to character cuts
                pieces, start = [], 0
                for c in it[2]:
                    k = len(data.encode()[:c].decode("utf-8", "ignore"))
                    pieces.append(data[start:k])
                    start = k
                pieces.append(data[start:])
            else:
                pieces = fragments(data, it[2])
            for j, piece in enumerate(pieces):
                if j in inner.get(i, {}):
                    ctl = inner[i][j]
                    out.append(proto.ping(ctl[1]) if ctl[0] == "ping" else proto.pong(ctl[1]))
                out.append(proto.send_data(piece, fin=j == len(pieces) - 1))
        else:
            out.append(proto.ping(it[1]) if it[0] == "ping" else proto.pong(it[1]))
    if close is not None:
        out.append(
            proto.close(
                CloseReason(close[0]) if close[0] in CloseReason._value2member_map_ else close[0], close[1]
            )
        )
    return b"".join(bytes(x) for x in out)


def wsproto_parse(stream: bytes, cuts, *, client: bool):
    """Messages wsproto reads from ``stream`` (cut into reads at ``cuts``)."""
    proto = FrameProtocol(client=client, extensions=[])
    calls, parts = [], []
    for chunk in O.splits(stream, cuts):
        proto.receive_bytes(chunk)
        for f in proto.received_frames():
            if f.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONTINUATION):
                parts.append(f.payload)
                if f.message_finished:
                    first = parts[0]
                    calls.append(("message", ("" if isinstance(first, str) else b"").join(parts)))
                    parts = []
            elif f.opcode == Opcode.PING:
                calls.append(("ping", bytes(f.payload)))
            elif f.opcode == Opcode.PONG:
                calls.append(("pong", bytes(f.payload)))
            else:
                code, reason = f.payload
                calls.append(("close", int(code), reason))
    return calls


def fastws_parse(stream: bytes, cuts, *, is_server: bool, mode: str):
    rec = Recorder()
    reader = FrameReader(rec, is_server=is_server, max_message_size=0)
    err = drive(reader, O.splits(stream, cuts), mode)
    assert err is None, err
    return rec.calls


cuts_of = st.lists(st.integers(0, 1 << 16), max_size=8)


@SETTINGS
@given(conversations(), cuts_of)
def test_fastws_client_frames_parse_in_wsproto_server(conv, cuts):
    stream = fastws_encode(*conv, mask=True)
    cuts = [c % (len(stream) + 1) for c in cuts]
    assert wsproto_parse(stream, cuts, client=False) == expected_calls(*conv)


@SETTINGS
@given(conversations(), cuts_of)
def test_fastws_server_frames_parse_in_wsproto_client(conv, cuts):
    stream = fastws_encode(*conv, mask=False)
    cuts = [c % (len(stream) + 1) for c in cuts]
    assert wsproto_parse(stream, cuts, client=True) == expected_calls(*conv)


@SETTINGS
@given(conversations(), cuts_of, st.sampled_from(MODES))
def test_wsproto_client_frames_parse_in_fastws_server(conv, cuts, mode):
    stream = wsproto_encode(*conv, client=True)
    cuts = [c % (len(stream) + 1) for c in cuts]
    assert fastws_parse(stream, cuts, is_server=True, mode=mode) == expected_calls(*conv)


@SETTINGS
@given(conversations(), cuts_of, st.sampled_from(MODES))
def test_wsproto_server_frames_parse_in_fastws_client(conv, cuts, mode):
    stream = wsproto_encode(*conv, client=False)
    cuts = [c % (len(stream) + 1) for c in cuts]
    assert fastws_parse(stream, cuts, is_server=False, mode=mode) == expected_calls(*conv)


@SETTINGS
@given(conversations(with_close=False), cuts_of, st.booleans(), st.integers(0, 5))
def test_frame_writer_output_parses_in_wsproto(conv, cuts, is_server, fragment_size):
    """FrameWriter.send / send_ping / send_pong (optionally corked, optionally fragmenting) -> wsproto."""
    items, _, _ = conv
    writes: list = []
    w = FrameWriter(writes.append, is_server=is_server, fragment_size=fragment_size)
    corked = bool(cuts) and cuts[0] % 2 == 0
    if corked:
        w.cork()
    for it in items:
        if it[0] == "message":
            w.send(it[1])
        elif it[0] == "ping":
            w.send_ping(it[1])
        else:
            w.send_pong(it[1])
    if corked:
        w.uncork()
        assert len(writes) <= 1
    stream = b"".join(writes)
    cuts = [c % (len(stream) + 1) for c in cuts]
    assert wsproto_parse(stream, cuts, client=is_server) == expected_calls(items, {}, None)


@SETTINGS
@given(conversations(), cuts_of, st.sampled_from(MODES))
def test_fastws_encode_round_trips_through_fastws_reader(conv, cuts, mode):
    stream = fastws_encode(*conv, mask=True)
    cuts = [c % (len(stream) + 1) for c in cuts]
    assert fastws_parse(stream, cuts, is_server=True, mode=mode) == expected_calls(*conv)
    assert O.ref_read(stream, is_server=True, max_message_size=0).calls == expected_calls(*conv)
