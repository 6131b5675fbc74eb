"""Wire core helpers: apply_mask, accept_key, validate_utf8 against pure-Python oracles."""

from __future__ import annotations

import base64
import codecs
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import oracles as O
from fastws._frame import accept_key, apply_mask, apply_mask_inplace, validate_utf8

MASK_KEYS = [
    bytes.fromhex("37fa213d"),
    b"\x00\x00\x00\x00",
    b"\xff\xff\xff\xff",
    b"\x01\x02\x03\x04",
    b"\x80\x7f\xa5\x5a",
    os.urandom(4),
]

# --------------------------------------------------------------------------- apply_mask

# 1-byte inputs are checked in a subprocess only (test_apply_mask_one_byte_in_a_subprocess): CPython
# caches 1-byte bytes objects, and an apply_mask that masks such a cached object in place corrupts
# every b"x" in the interpreter, which would fail unrelated tests after it.


def test_apply_mask_one_byte_in_a_subprocess():
    import subprocess
    import sys

    code = (
        "from fastws._frame import apply_mask\n"
        "keys = [bytes.fromhex('37fa213d'), b'\\xff\\xff\\xff\\xff', b'\\x01\\x02\\x03\\x04']\n"
        "for k in keys:\n"
        "    for i in range(256):\n"
        "        x = bytes([i])\n"
        "        assert apply_mask(x, k) == bytes([i ^ k[0]]), (k, i)\n"
        "        assert apply_mask(memoryview(b'..' + x)[2:], k) == bytes([i ^ k[0]]), (k, i)\n"
        "        assert x == bytes([i]) and x[0] == i, f'input modified: {i} -> {x[0]}'\n"
        "assert [bytes([i])[0] for i in range(256)] == list(range(256)), '1-byte bytes cache corrupt'\n"
        "assert b'A' == 'A'.encode() and b'xA'[1:][0] == 65, 'the 1-byte bytes cache was corrupted'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]


def test_oracle_mask_matches_the_literal_definition():
    rng = random.Random(1)
    for n in list(range(0, 40)) + [255, 256, 1000]:
        data = rng.randbytes(n)
        for key in MASK_KEYS:
            assert O.mask(data, key) == O.mask_naive(data, key)


def test_apply_mask_rfc_example():
    assert apply_mask(b"Hello", bytes.fromhex("37fa213d")) == bytes.fromhex("7f9f4d5158")
    assert apply_mask(bytes.fromhex("7f9f4d5158"), bytes.fromhex("37fa213d")) == b"Hello"


@pytest.mark.parametrize("key", MASK_KEYS, ids=[k.hex() for k in MASK_KEYS])
def test_apply_mask_every_length_and_offset(key):
    """Lengths 0..1024 at start offsets 0..15 of a bigger buffer (memoryview slices): every SIMD
    path, head and tail, aligned and not."""
    base = random.Random(key).randbytes(1024 + 16 + 16)
    view = memoryview(base)
    stream = key * 300
    whole = int.from_bytes(base, "little")
    for off in range(16):
        for n in range(1025):
            if n == 1:
                continue  # see test_apply_mask_one_byte_in_a_subprocess
            got = apply_mask(view[off : off + n], key)
            if n:
                want = (
                    int.from_bytes(base[off : off + n], "little") ^ int.from_bytes(stream[:n], "little")
                ).to_bytes(n, "little")
            else:
                want = b""
            assert got == want, (off, n)
    assert base == bytes(view) and int.from_bytes(base, "little") == whole  # input untouched


@pytest.mark.parametrize(
    "n", [0, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33, 127, 128, 129, 255, 256, 257, 4096, 65536 + 7, (1 << 20) + 3]
)
def test_apply_mask_input_types(n):
    data = random.Random(n).randbytes(n)
    key = MASK_KEYS[4]
    want = O.mask(data, key)
    for arg in (data, bytearray(data), memoryview(data), memoryview(bytearray(b"..." + data))[3:]):
        got = apply_mask(arg, key)
        assert type(got) is bytes and got == want
    ba = bytearray(data)
    apply_mask(ba, key)
    assert ba == data, "apply_mask returns a new object and must not modify its input"
    assert apply_mask(want, key) == data  # an involution


def test_apply_mask_key_types_and_errors():
    key = MASK_KEYS[0]
    for k in (key, bytearray(key), memoryview(key)):
        assert apply_mask(b"Hello", k) == bytes.fromhex("7f9f4d5158")
    for k in (b"", b"abc", b"abcde"):
        with pytest.raises(ValueError):
            apply_mask(b"Hello", k)


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=3000).filter(lambda b: len(b) != 1),
    st.binary(min_size=4, max_size=4),
    st.integers(0, 7),
)
def test_apply_mask_hypothesis(data, key, off):
    buf = memoryview(b"\x00" * off + data)[off:]
    assert apply_mask(buf, key) == O.mask_naive(data, key)


# --------------------------------------------------------------------------- accept_key


def test_accept_key_rfc_example():
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert type(accept_key("dGhlIHNhbXBsZSBub25jZQ==")) is str


def test_accept_key_random_keys():
    rng = random.Random(7)
    for _ in range(500):
        key = base64.b64encode(rng.randbytes(16)).decode()
        assert accept_key(key) == O.accept_key(key)
        assert accept_key(key.encode()) == O.accept_key(key)


def test_accept_key_every_length():
    """SHA-1 padding has edge cases at 55/56/64-byte message lengths: sweep key lengths 0..300."""
    rng = random.Random(8)
    for n in range(301):
        key = bytes(rng.randrange(33, 127) for _ in range(n))
        assert accept_key(key) == O.accept_key(key), n
        assert accept_key(key.decode()) == O.accept_key(key), n


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_accept_key_hypothesis_bytes(key):
    assert accept_key(key) == O.accept_key(key)


# --------------------------------------------------------------------------- validate_utf8

CLASSIC_INVALID = [
    b"\xc0\x80",
    b"\xc1\xbf",
    b"\xe0\x80\x80",
    b"\xe0\x9f\xbf",
    b"\xf0\x80\x80\x80",
    b"\xf0\x8f\xbf\xbf",  # overlong
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",
    b"\xed\xa0\x80\xed\xb0\x80",  # surrogates (and a CESU pair)
    b"\xf4\x90\x80\x80",
    b"\xf7\xbf\xbf\xbf",  # above U+10FFFF
    b"\xf5",
    b"\xf8\x88\x80\x80\x80",
    b"\xfc\x84\x80\x80\x80\x80",
    b"\xfe",
    b"\xff",  # never in UTF-8
    b"\x80",
    b"\xbf",
    b"\x80\x80",  # lone continuation bytes
    b"\xc3",
    b"\xe2\x82",
    b"\xf0\x9f\x98",
    b"\xf4\x8f\xbf",  # truncated at the end
    b"\xc3\x28",
    b"\xe2\x28\xa1",
    b"\xe2\x82\x28",
    b"\xf0\x28\x8c\xbc",
    b"\xf0\x90\x28\xbc",  # bad continuation
]
CLASSIC_VALID = [
    b"",
    b"\x00",
    b"\x7f",
    b"\xc2\x80",
    b"\xdf\xbf",
    b"\xe0\xa0\x80",
    b"\xed\x9f\xbf",
    b"\xee\x80\x80",
    b"\xef\xbf\xbf",
    b"\xf0\x90\x80\x80",
    b"\xf4\x8f\xbf\xbf",
    "κόσμε".encode(),
    "😀€é".encode(),
]


def py_valid(data: bytes) -> bool:
    try:
        bytes(data).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("seq", CLASSIC_INVALID, ids=lambda b: b.hex())
def test_validate_utf8_classic_invalid(seq):
    assert validate_utf8(seq) is False
    for pad in (b"", b"a", b"abcdefgh" * 3):  # also after/before an ASCII run (word-at-a-time fast path)
        assert validate_utf8(pad + seq) is False
        assert validate_utf8(pad + seq + pad) is False
        assert validate_utf8(memoryview(pad + seq + pad)) is False
        assert validate_utf8(bytearray(pad + seq)) is False


@pytest.mark.parametrize("seq", CLASSIC_VALID, ids=lambda b: b.hex() or "empty")
def test_validate_utf8_classic_valid(seq):
    assert validate_utf8(seq) is True
    assert validate_utf8(b"abcdefgh" * 3 + seq + b"xyz" * 5) is True


def test_validate_utf8_single_bad_byte_at_every_position():
    """An ASCII run with one bad byte (or one valid multi-byte char) anywhere: catches word-at-a-time bugs."""
    for n in range(0, 70):
        for pos in range(n):
            base = bytearray(b"a" * n)
            for bad in (b"\x80", b"\xff", b"\xc3"):
                data = bytes(base[:pos]) + bad + bytes(base[pos + 1 :])
                assert validate_utf8(data) is False, (n, pos, bad)
            data = bytes(base[:pos]) + "€".encode() + bytes(base[pos + 1 :])
            assert validate_utf8(data) is True, (n, pos)


def test_validate_utf8_every_two_byte_sequence():
    for a in range(256):
        for b in range(256):
            data = bytes([a, b])
            assert validate_utf8(data) == py_valid(data), data.hex()


def test_validate_utf8_every_three_byte_sequence_with_lead_e0_to_f4():
    cont = [0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xFF]
    for a in range(0xE0, 0xF5):
        for b in range(256):
            for c in cont:
                data = bytes([a, b, c])
                assert validate_utf8(data) == py_valid(data), data.hex()
                data4 = data + b"\x80"
                assert validate_utf8(data4) == py_valid(data4), data4.hex()


# Bytes at every boundary of the UTF-8 table (Unicode table 3-7), for random sequences.
TRICKY_BYTES = [
    0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF,
    0xE0, 0xE1, 0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF,
]


def test_oracle_scan_agrees_with_python_on_complete_input():
    rng = random.Random(9)
    alphabet = TRICKY_BYTES
    for _ in range(20000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        assert O.utf8_valid(data) == py_valid(data), data.hex()
        bad, tail = O.utf8_scan(data)
        if bad is not None:  # the prefix up to the bad byte is still completable; with it, it is not
            assert O.utf8_scan(data[:bad])[0] is None
            for ext in (b"", b"\x80", b"\x80\x80", b"\x80\x80\x80", b"\xa0\x80", b"\x90\x80\x80"):
                assert not py_valid(data[: bad + 1] + ext)


tricky_bytes = st.lists(
    st.sampled_from(TRICKY_BYTES),
    max_size=40,
).map(bytes)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), tricky_bytes, st.text(max_size=100).map(lambda s: s.encode())))
def test_validate_utf8_hypothesis(data):
    assert validate_utf8(data) == py_valid(data)
    assert validate_utf8(bytearray(data)) == py_valid(data)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.integers(0, 300))
def test_validate_utf8_text_and_truncations(text, cut):
    data = text.encode()
    assert validate_utf8(data) is True
    cut = min(cut, len(data))
    prefix = data[:cut]
    assert validate_utf8(prefix) == py_valid(prefix)
    dec = codecs.getincrementaldecoder("utf-8")()
    dec.decode(prefix, final=False)  # a prefix of valid text is never "invalid so far"


@pytest.mark.parametrize("key", [bytes.fromhex("37fa213d"), b"\xff\x00\xff\x00"])
def test_apply_mask_inplace_matches_the_oracle_for_every_length_and_offset(key):
    rng = random.Random(7)
    for n in list(range(0, 300)) + [1023, 4096, 65537]:
        for off in (0, 1, 3, 7):
            backing = bytearray(rng.randbytes(n + off + 5))
            before = bytes(backing)
            view = memoryview(backing)[off : off + n]
            apply_mask_inplace(view, key)
            assert bytes(backing[off : off + n]) == O.mask(before[off : off + n], key)
            assert backing[:off] == before[:off] and backing[off + n :] == before[off + n :]
        whole = bytearray(rng.randbytes(n))
        expected = O.mask(bytes(whole), key)
        apply_mask_inplace(whole, key)
        assert whole == expected


def test_apply_mask_inplace_refuses_readonly_buffers_and_bad_keys():
    with pytest.raises(BufferError):
        apply_mask_inplace(b"immutable", b"abcd")
    with pytest.raises(ValueError, match="4 bytes"):
        apply_mask_inplace(bytearray(8), b"abc")
