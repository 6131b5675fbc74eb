# cython: language_level=3, freethreading_compatible=False
"""fastws wire core: RFC 6455 framing in Cython, sans-I/O.

Bytes come in through FrameReader (which owns the read buffer and unmasks in
place); whole messages and control frames go out as calls on a handler, one
Python call per message.  FrameWriter encodes frames and, while corked,
coalesces everything produced during one read into a single write.
Nothing here imports asyncio or touches a socket.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_CheckBuffer, PyObject_GetBuffer
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memmove

import os
from asyncio import CancelledError, current_task
from asyncio import tasks as _asyncio_tasks

from fastws._codec cimport Compressor, Decompressor
from fastws.errors import ConnectionClosed, PayloadTooBig, ProtocolError

cdef extern from "Python.h":
    object PyMemoryView_FromMemory(char *mem, Py_ssize_t size, int flags)
    object PyObject_CallMethodOneArg(object obj, object name, object arg)
    object PyObject_CallMethodNoArgs(object obj, object name)
    const char *PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t *size) except NULL
    int PyBUF_WRITE
    ctypedef struct PyObject

cdef extern from "_sock.h" nogil:
    long fastws_send(int fd, const void *buf, size_t n)  # non-blocking, no SIGPIPE; -1 on Windows
    int fastws_would_block()
    double fastws_monotonic()

cdef extern from "_ready.h":
    int fastws_ready_init() except -1
    object fastws_ready_value(object value)  # an awaitable that is done, with this value
    ctypedef object (*fastws_poll_fn)(object owner, int iterating)
    int fastws_waiting_init(object cancelled_error) except -1
    object fastws_waiting_new(object owner, object loop, fastws_poll_fn poll, object not_ready)
    void fastws_waiting_set_mode(object waiting, int iterating)
    int fastws_waiting_wake(object waiting)
    int fastws_waiting_busy(object waiting)
    int fastws_waiting_schedule(object waiting) except -1
    int fastws_waiting_run(object waiting) except -1

fastws_ready_init()
fastws_waiting_init(CancelledError)

cdef extern from "pythread.h":
    unsigned long PyThread_get_thread_ident()

cdef extern from "_mask.h":
    void fastws_mask(uint8_t *p, size_t n, const uint8_t *key, unsigned phase) nogil
    void fastws_mask_copy(uint8_t *dst, const uint8_t *src, size_t n, const uint8_t *key) nogil

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

DEF_CLOSE_NO_STATUS = 1005

cdef enum:
    OPC_CONT = 0
    OPC_TEXT = 1
    OPC_BINARY = 2
    OPC_CLOSE = 8
    OPC_PING = 9
    OPC_PONG = 10
    MIN_READ = 65536            # smallest free space handed to the transport
    SCRATCH_SIZE = 262144       # shared read buffer: idle connections hold none
    OUT_FLUSH_AT = 262144       # a corked writer flushes early past this
    LARGE_PAYLOAD = 65536       # above this a payload is written without copying
    DIRECT_FRAME = 262144       # a partial frame bigger than one scratch read goes straight into its
                                # message object (smaller ones: cheaper to copy than to cut reads short)


# --------------------------------------------------------------------------
# UTF-8 validation (Unicode 15 table 3-7), incremental so it can fail fast on
# bytes of a frame that has not fully arrived.  State: need | lo << 8 | hi << 16.

cdef inline int utf8_feed(const uint8_t *s, Py_ssize_t n, uint32_t *state) noexcept nogil:
    """Advance the validator over s[0:n]; 0 if still valid, -1 at the first bad byte."""
    cdef uint32_t need = state[0] & 0xFF
    cdef uint32_t lo = (state[0] >> 8) & 0xFF
    cdef uint32_t hi = (state[0] >> 16) & 0xFF
    cdef Py_ssize_t i = 0
    cdef uint64_t word
    cdef uint8_t c
    while i < n:
        if need == 0:
            while i + 8 <= n:  # ASCII fast path, a word at a time
                memcpy(&word, s + i, 8)
                if word & 0x8080808080808080ULL:
                    break
                i += 8
            if i >= n:
                break
            c = s[i]
            i += 1
            if c < 0x80:
                continue
            lo = 0x80
            hi = 0xBF
            if 0xC2 <= c <= 0xDF:
                need = 1
            elif c == 0xE0:
                need = 2
                lo = 0xA0
            elif c == 0xED:
                need = 2
                hi = 0x9F  # no UTF-16 surrogates
            elif 0xE1 <= c <= 0xEF:
                need = 2
            elif c == 0xF0:
                need = 3
                lo = 0x90
            elif 0xF1 <= c <= 0xF3:
                need = 3
            elif c == 0xF4:
                need = 3
                hi = 0x8F  # nothing above U+10FFFF
            else:
                return -1
        else:
            c = s[i]
            i += 1
            if c < lo or c > hi:
                return -1
            need -= 1
            lo = 0x80
            hi = 0xBF
    state[0] = need | (lo << 8) | (hi << 16)
    return 0


def validate_utf8(data):
    """True if ``data`` (any bytes-like object) is complete, well-formed UTF-8."""
    cdef Py_buffer view
    cdef uint32_t state = 0
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return utf8_feed(<const uint8_t *>view.buf, view.len, &state) == 0 and (state & 0xFF) == 0
    finally:
        PyBuffer_Release(&view)


# --------------------------------------------------------------------------
# Masking

def apply_mask(data, mask):
    """Return ``data`` XORed with the 4-byte ``mask`` (RFC 6455 section 5.3)."""
    cdef Py_buffer view, key
    cdef bytes result
    if type(data) is bytes and type(mask) is bytes and PyBytes_GET_SIZE(mask) == 4:
        return _masked_copy(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), PyBytes_AS_STRING(mask))
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(mask, &key, PyBUF_SIMPLE)
        try:
            if key.len != 4:
                raise ValueError(f"mask must be 4 bytes, got {key.len}")
            return _masked_copy(<const char *>view.buf, view.len, <const char *>key.buf)
        finally:
            PyBuffer_Release(&key)
    finally:
        PyBuffer_Release(&view)


def apply_mask_inplace(buffer, mask):
    """XOR a writable buffer (bytearray, writable memoryview) with ``mask`` in place."""
    cdef Py_buffer view, key
    if type(buffer) is bytearray and type(mask) is bytes and PyBytes_GET_SIZE(mask) == 4:
        fastws_mask(<uint8_t *>PyByteArray_AS_STRING(buffer), PyByteArray_GET_SIZE(buffer),
                    <const uint8_t *>PyBytes_AS_STRING(mask), 0)
        return
    PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE)
    try:
        PyObject_GetBuffer(mask, &key, PyBUF_SIMPLE)
        try:
            if key.len != 4:
                raise ValueError(f"mask must be 4 bytes, got {key.len}")
            fastws_mask(<uint8_t *>view.buf, view.len, <const uint8_t *>key.buf, 0)
        finally:
            PyBuffer_Release(&key)
    finally:
        PyBuffer_Release(&view)


cdef inline bytes _masked_copy(const char *data, Py_ssize_t n, const char *key):
    # A fresh object (NULL source): CPython shares 1-byte bytes objects.
    cdef bytes result = PyBytes_FromStringAndSize(NULL, n)
    fastws_mask_copy(<uint8_t *>PyBytes_AS_STRING(result), <const uint8_t *>data, n, <const uint8_t *>key)
    return result


# --------------------------------------------------------------------------
# Sec-WebSocket-Accept: base64(SHA-1(key + GUID)), RFC 6455 section 4.2.2

cdef bytes WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
cdef const char *B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

cdef inline uint32_t rol32(uint32_t x, int n) noexcept nogil:
    return (x << n) | (x >> (32 - n))

cdef void sha1_block(uint32_t *h, const uint8_t *block) noexcept nogil:
    cdef uint32_t w[80]
    cdef uint32_t a, b, c, d, e, f, k, t
    cdef int i
    for i in range(16):
        w[i] = ((<uint32_t>block[4 * i] << 24) | (<uint32_t>block[4 * i + 1] << 16)
                | (<uint32_t>block[4 * i + 2] << 8) | <uint32_t>block[4 * i + 3])
    for i in range(16, 80):
        w[i] = rol32(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1)
    a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]
    for i in range(80):
        if i < 20:
            f = (b & c) | (~b & d); k = 0x5A827999
        elif i < 40:
            f = b ^ c ^ d; k = 0x6ED9EBA1
        elif i < 60:
            f = (b & c) | (b & d) | (c & d); k = 0x8F1BBCDC
        else:
            f = b ^ c ^ d; k = 0xCA62C1D6
        t = rol32(a, 5) + f + e + k + w[i]
        e = d; d = c; c = rol32(b, 30); b = a; a = t
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e

cdef void sha1(const uint8_t *msg, size_t n, uint8_t *digest) noexcept nogil:
    cdef uint32_t h[5]
    cdef uint8_t block[64]
    cdef size_t done = 0, rest
    cdef uint64_t bits = (<uint64_t>n) * 8
    cdef int i
    h[0] = 0x67452301; h[1] = 0xEFCDAB89; h[2] = 0x98BADCFE; h[3] = 0x10325476; h[4] = 0xC3D2E1F0
    while n - done >= 64:
        sha1_block(h, msg + done)
        done += 64
    rest = n - done
    memcpy(block, msg + done, rest)
    block[rest] = 0x80
    rest += 1
    if rest > 56:
        for i in range(<int>rest, 64):
            block[i] = 0
        sha1_block(h, block)
        rest = 0
    for i in range(<int>rest, 56):
        block[i] = 0
    for i in range(8):
        block[63 - i] = <uint8_t>(bits >> (8 * i))
    sha1_block(h, block)
    for i in range(5):
        digest[4 * i] = <uint8_t>(h[i] >> 24)
        digest[4 * i + 1] = <uint8_t>(h[i] >> 16)
        digest[4 * i + 2] = <uint8_t>(h[i] >> 8)
        digest[4 * i + 3] = <uint8_t>h[i]

def accept_key(key):
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (str or bytes)."""
    cdef bytes raw = key.encode("ascii") if isinstance(key, str) else bytes(key)
    cdef bytes msg = raw + WS_GUID
    cdef uint8_t digest[21]
    cdef char out[28]
    cdef int i, j = 0
    cdef uint32_t v
    sha1(<const uint8_t *>PyBytes_AS_STRING(msg), PyBytes_GET_SIZE(msg), digest)
    digest[20] = 0
    for i in range(0, 21, 3):  # 20 bytes -> 27 symbols + one '=' pad
        v = (<uint32_t>digest[i] << 16) | (<uint32_t>digest[i + 1] << 8) | digest[i + 2]
        out[j] = B64[(v >> 18) & 63]
        out[j + 1] = B64[(v >> 12) & 63]
        out[j + 2] = B64[(v >> 6) & 63]
        out[j + 3] = B64[v & 63]
        j += 4
    out[27] = b'='
    return PyUnicode_DecodeASCII(out, 28, NULL)


# --------------------------------------------------------------------------
# Close frames

cpdef bint is_valid_close_code(int code):
    """May ``code`` appear in a close frame on the wire? (RFC 6455 7.4, IANA registry)"""
    return (1000 <= code <= 1003) or (1007 <= code <= 1014) or (3000 <= code <= 4999)

def encode_close_payload(int code=1000, str reason=""):
    """Close frame body: 2-byte code + UTF-8 reason (at most 123 bytes)."""
    if not is_valid_close_code(code):
        raise ValueError(f"close code {code} may not be sent on the wire")
    cdef bytes body = reason.encode("utf-8")
    if len(body) > 123:
        raise ValueError(f"close reason is {len(body)} bytes encoded; the limit is 123")
    return bytes(((code >> 8) & 0xFF, code & 0xFF)) + body

def parse_close_payload(payload):
    """(code, reason) of a close frame body; 1005 when empty. Raises ProtocolError."""
    return _parse_close(bytes(payload))

cdef tuple _parse_close(bytes payload):
    cdef Py_ssize_t n = len(payload)
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(payload)
    cdef int code
    if n == 0:
        return (DEF_CLOSE_NO_STATUS, "")
    if n == 1:
        raise ProtocolError(1002, "close frame payload of 1 byte (a status code needs 2)")
    code = (p[0] << 8) | p[1]
    if not is_valid_close_code(code):
        raise ProtocolError(1002, f"invalid close code {code}")
    try:
        reason = PyUnicode_DecodeUTF8(<const char *>p + 2, n - 2, NULL)
    except UnicodeDecodeError:
        raise ProtocolError(1007, "close reason is not valid UTF-8") from None
    return (code, reason)


# --------------------------------------------------------------------------
# Frame encoding

cdef bytes _mask_pool = b""
cdef Py_ssize_t _mask_pos = 0

cdef inline const uint8_t *fresh_mask_key() except NULL:
    """4 unpredictable bytes (RFC 6455 10.3), drawn from a pooled os.urandom."""
    global _mask_pool, _mask_pos
    if _mask_pos + 4 > len(_mask_pool):
        _mask_pool = os.urandom(4096)
        _mask_pos = 0
    _mask_pos += 4
    return <const uint8_t *>PyBytes_AS_STRING(_mask_pool) + _mask_pos - 4

cdef inline Py_ssize_t header_size(Py_ssize_t n, bint masked) noexcept nogil:
    cdef Py_ssize_t h = 2 if n < 126 else (4 if n < 65536 else 10)
    return h + 4 if masked else h

cdef inline Py_ssize_t write_header(uint8_t *out, int opcode, Py_ssize_t n, bint fin, bint rsv1,
                                    const uint8_t *mask_key) noexcept nogil:
    cdef Py_ssize_t h
    cdef int i
    out[0] = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    cdef uint8_t mbit = 0x80 if mask_key != NULL else 0
    if n < 126:
        out[1] = mbit | <uint8_t>n
        h = 2
    elif n < 65536:
        out[1] = mbit | 126
        out[2] = <uint8_t>(n >> 8)
        out[3] = <uint8_t>n
        h = 4
    else:
        out[1] = mbit | 127
        for i in range(8):
            out[9 - i] = <uint8_t>((<uint64_t>n) >> (8 * i))
        h = 10
    if mask_key != NULL:
        memcpy(out + h, mask_key, 4)
        h += 4
    return h

cdef inline bytes build_frame(int opcode, const char *data, Py_ssize_t n, bint fin, bint rsv1, bint masked):
    cdef const uint8_t *key = fresh_mask_key() if masked else NULL
    cdef Py_ssize_t h = header_size(n, masked)
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, h + n)
    cdef uint8_t *out = <uint8_t *>PyBytes_AS_STRING(frame)
    write_header(out, opcode, n, fin, rsv1, key)
    if masked:
        fastws_mask_copy(out + h, <const uint8_t *>data, n, key)
    else:
        memcpy(out + h, data, n)
    return frame

cdef inline int check_control(int opcode, Py_ssize_t n, bint fin) except -1:
    if opcode not in (OPC_CONT, OPC_TEXT, OPC_BINARY, OPC_CLOSE, OPC_PING, OPC_PONG):
        raise ValueError(f"unknown opcode {opcode:#x}")
    if opcode & 8 and (n > 125 or not fin):
        raise ValueError("control frames must be final and carry at most 125 bytes")
    return 0

def encode_frame(int opcode, payload, *, bint fin=True, bint rsv1=False, bint mask=False):
    """One complete frame; str payloads are UTF-8 encoded, mask=True for the client role."""
    cdef Py_buffer view
    cdef Py_ssize_t n
    cdef const char *data
    if isinstance(payload, str):
        data = PyUnicode_AsUTF8AndSize(payload, &n)
        check_control(opcode, n, fin)
        return build_frame(opcode, data, n, fin, rsv1, mask)
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        check_control(opcode, view.len, fin)
        return build_frame(opcode, <const char *>view.buf, view.len, fin, rsv1, mask)
    finally:
        PyBuffer_Release(&view)


# --------------------------------------------------------------------------
# Frame reading

# One read buffer shared by all readers of the thread that made it: a read
# lands here, complete frames are handled in place, and only a partial frame
# is copied into the connection's own buffer.  Idle connections own nothing.
cdef char *_scratch = NULL
cdef unsigned long _scratch_thread = 0
cdef bint _scratch_busy = False  # a reader is parsing it (a handler may feed another reader)

cdef object _scratch_view = None  # one memoryview over it, handed out again and again

cdef char *scratch_buffer() except? NULL:
    global _scratch, _scratch_thread, _scratch_view
    if _scratch == NULL:
        _scratch = <char *>PyMem_Malloc(SCRATCH_SIZE)
        if _scratch == NULL:
            raise MemoryError()
        _scratch_thread = PyThread_get_thread_ident()
        _scratch_view = PyMemoryView_FromMemory(_scratch, SCRATCH_SIZE, PyBUF_WRITE)
    elif _scratch_thread != PyThread_get_thread_ident() or _scratch_busy:
        return NULL  # another thread's, or in use further up the stack: use a private buffer
    return _scratch


# A coarse clock the event loop's keepalive scheduler advances (set_clock): each read
# stamps its reader with it, so liveness needs no Python call and no float per read.
cdef double _clock = 0.0

def set_clock(double now):
    """Advance the clock that stamps readers' last_read / last_message."""
    global _clock
    _clock = now


# Process-wide traffic totals for /metrics (fastws.metrics reads them at scrape time): data
# messages and payload bytes (as on the wire: compressed when compressed), [text, binary].
cdef unsigned long long _messages_in[2]
cdef unsigned long long _bytes_in[2]
cdef unsigned long long _messages_out[2]
cdef unsigned long long _bytes_out[2]
_messages_in[:] = [0, 0]
_bytes_in[:] = [0, 0]
_messages_out[:] = [0, 0]
_bytes_out[:] = [0, 0]


def traffic_counts():
    """This process's totals so far: (text messages, text bytes, binary messages, binary bytes)
    received, then the same four sent."""
    return (_messages_in[0], _bytes_in[0], _messages_in[1], _bytes_in[1],
            _messages_out[0], _bytes_out[0], _messages_out[1], _bytes_out[1])


# Keepalive ping round trips, for /metrics: counts per bucket (the last is +Inf) and their sum.
PING_RTT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)
DEF N_RTT_BUCKETS = 16
cdef double _rtt_bounds[N_RTT_BUCKETS]
cdef unsigned long long _rtt_counts[N_RTT_BUCKETS + 1]
cdef double _rtt_sum = 0.0
for _i, _b in enumerate(PING_RTT_BUCKETS):
    _rtt_bounds[_i] = _b
_rtt_counts[:] = [0] * (N_RTT_BUCKETS + 1)


cdef void _observe_rtt(double seconds) noexcept:
    global _rtt_sum
    cdef int i = 0
    while i < N_RTT_BUCKETS and seconds > _rtt_bounds[i]:
        i += 1
    _rtt_counts[i] += 1
    _rtt_sum += seconds


def ping_rtt_counts():
    """(counts per PING_RTT_BUCKETS bucket, the last for +Inf; sum of seconds) of the keepalive
    pings answered in this process."""
    return [_rtt_counts[i] for i in range(N_RTT_BUCKETS + 1)], _rtt_sum


cdef Py_ssize_t frame_payload_length(const uint8_t *p, Py_ssize_t size) noexcept:
    """The payload length in an encoded unmasked frame's header (0 if the header is cut short)."""
    cdef Py_ssize_t length = p[1] & 0x7F
    cdef int i
    if length == 126:
        return (p[2] << 8 | p[3]) if size >= 4 else 0
    if length == 127:
        if size < 10:
            return 0
        length = 0
        for i in range(2, 10):
            length = (length << 8) | p[i]
    return length


# --------------------------------------------------------------------------
# One connection's wire state: _Wire holds the reader's and the writer's fields
# and does all the work in cdef methods.  FrameReader and FrameWriter expose one
# half each (tests, the client); SessionCore (the server session) is both in one
# object, which is what keeps an idle connection small.

cdef object S_WRITE = "write"
cdef object S_WRITELINES = "writelines"
cdef object S_WRITE_NOCHECK = "write_nocheck"  # aiofastnet: writes we promise are bytes
cdef object S_WRITELINES_NOCHECK = "writelines_nocheck"
cdef object S_BUFFER_SIZE = "get_write_buffer_size"
cdef tuple EMPTY_TUPLE = ()

cdef enum:  # C constants, so that a comparison with them costs no Python int
    C_PAUSED_WRITING = 1  # SessionCore._paused bits; the Python session adds its own
    C_OPEN_STATE = 1  # fastws.protocol.OPEN
PAUSED_WRITING = C_PAUSED_WRITING
OPEN_STATE = C_OPEN_STATE


# One output buffer shared by the process's writers: a writer corked for a read encodes its frames
# there and the flush copies them out into the bytes handed to the transport, so the buffer is free
# again when the read ends.  A writer that finds it taken (another one stays corked across a loop
# turn) uses a buffer of its own, as before.  This saves a malloc and a free per read.
cdef char *_shared_out = NULL
cdef Py_ssize_t _shared_out_cap = 0
cdef void *_shared_out_owner = NULL  # the writer using it (not a reference: it gives it back first)
cdef Py_ssize_t SHARED_OUT_KEEP = 65536  # grown past this for one read, it goes back to the allocator


cdef object DONE = iter(EMPTY_TUPLE)  # an exhausted iterator stays exhausted: one serves every await


cdef class _Ready:
    """What a send returns when no waiting is needed: awaiting it is free."""

    def __await__(self):
        return DONE


READY = _Ready()


cdef object NOT_READY = object()  # Inbox._poll: nothing queued yet
# loop -> its running task: asyncio's own table (3.10-3.13), read without a call; else current_task()
cdef object _running_tasks = getattr(_asyncio_tasks, "_current_tasks", None)


cdef inline bint _task_running(object loop) except -1:
    if type(_running_tasks) is dict:
        return loop in <dict>_running_tasks
    return current_task(loop) is not None


cdef object _inbox_poll(object inbox, int iterating):
    return (<Inbox>inbox)._poll(iterating)


cdef class Inbox:
    """Messages received but not yet taken by ``recv()`` (handler coroutines, async endpoints, the client).

    Bounded in messages and in bytes: past either limit ``flow(owner, False)``
    asks the shell to stop reading (TCP then pushes back on the peer); once the
    consumer has taken half of it, ``flow(owner, True)`` to read again (a plain
    function and its owner: no bound method kept per connection).  An empty
    inbox holds no list.  ``end(exc)``
    marks the end of the stream: ``get()`` returns what was queued, then raises
    it.  ``get()`` returns an awaitable that is already done when a message is
    queued, else the inbox's one reusable waiting awaitable (no future, no
    coroutine per wait); one consumer at a time.
    """

    cdef list _items                # None while empty
    cdef Py_ssize_t _head           # _items[_head:] are queued
    cdef Py_ssize_t _bytes
    cdef Py_ssize_t _max_messages
    cdef Py_ssize_t _max_bytes
    cdef object _waiting            # fastws_Waiting, made at the first wait
    cdef object _loop
    cdef object _owner
    cdef object _flow
    cdef object _end
    cdef unsigned char _paused
    cdef bint _due                  # a consumer was woken by _put(defer=True): the owner resumes it

    def __init__(self, loop, owner, flow, *, Py_ssize_t max_messages, Py_ssize_t max_bytes):
        self._loop = loop
        self._owner = owner
        self._flow = flow
        self._max_messages = max(1, max_messages)
        self._max_bytes = max_bytes

    def __len__(self):
        return self._count()

    cdef inline Py_ssize_t _count(self):
        return 0 if self._items is None else len(self._items) - self._head

    @property
    def queued_bytes(self):
        return self._bytes

    @property
    def full(self):
        return self._is_full()

    @property
    def waiting(self):
        """A consumer is blocked in get() (or woken and not yet resumed)."""
        return self._waiting is not None and fastws_waiting_busy(self._waiting)

    cdef inline bint _is_full(self):
        return (self._count() >= self._max_messages
                or (self._max_bytes > 0 and self._bytes >= self._max_bytes))

    cdef int _put(self, object message, bint defer) except -1:
        """Queue ``message`` and wake a waiting consumer.  With ``defer`` the caller resumes it
        (``_resume_consumer``) once it has queued the rest of its read; otherwise the loop does,
        a turn later."""
        if self._items is None:
            self._items = [message]
        else:
            self._items.append(message)
        self._bytes += len(message)
        if not self._paused and self._is_full():
            self._paused = True
            self._flow(self._owner, False)
        if self._waiting is None or not fastws_waiting_wake(self._waiting):
            return 0
        if defer:
            self._due = True
        else:
            fastws_waiting_schedule(self._waiting)
        return 0

    cdef bint _resume_consumer(self) except -1:
        """Step the consumer that _put(defer=True) woke, here and now (its replies join the
        caller's write); through the loop if a task is running (one task cannot step another).
        True when it was left to the loop."""
        if not self._due:
            return False
        self._due = False
        if _task_running(self._loop):
            fastws_waiting_schedule(self._waiting)
            return True
        fastws_waiting_run(self._waiting)
        return False

    cdef object _pop(self):
        """The next message (the caller checked that one is queued)."""
        cdef object message = self._items[self._head]
        self._items[self._head] = None
        self._head += 1
        if self._head == len(self._items):
            self._items = None  # empty: hold no list
            self._head = 0
        self._bytes -= len(message)
        if self._paused and self._count() <= self._max_messages // 2 and (
                self._max_bytes <= 0 or self._bytes <= self._max_bytes // 2):
            self._paused = False
            self._flow(self._owner, True)
        return message

    cdef object _poll(self, int iterating):
        """What resuming a wait gives: the next message, the end of the stream (raised), or NOT_READY."""
        if self._items is not None:
            return self._pop()
        if self._end is not None:
            if iterating and isinstance(self._end, ConnectionClosed) and self._end.code in (1000, 1001, 1005):
                raise StopAsyncIteration
            raise self._end
        return NOT_READY

    def put(self, message):
        self._put(message, False)

    def get_nowait(self):
        """The next message; IndexError when none is queued."""
        if self._items is None:
            raise IndexError("no message queued")
        return self._pop()

    def get(self):
        """The next message, waiting for one; raises the end-of-stream exception when drained.
        (An awaitable; a queued message comes back in one that is already done.)"""
        return self._next(False)

    def __aiter__(self):
        return self

    def __anext__(self):
        # get() for ``async for``: a normal close (1000, 1001, 1005) ends the iteration quietly
        return self._next(True)

    cdef object _next(self, bint iterating):
        if self._items is not None:
            return fastws_ready_value(self._pop())
        if self._waiting is None:
            self._waiting = fastws_waiting_new(self, self._loop, _inbox_poll, NOT_READY)
        elif fastws_waiting_busy(self._waiting):
            raise RuntimeError("another coroutine is already waiting for the next message on this connection")
        fastws_waiting_set_mode(self._waiting, iterating)
        return self._waiting

    def end(self, exc):
        """No more messages will come; waiters wake to drain the queue, then get ``exc``."""
        if self._end is None:
            self._end = exc
        if self._waiting is not None and (fastws_waiting_wake(self._waiting) or self._due):
            self._due = False
            fastws_waiting_schedule(self._waiting)

    def clear(self):
        """Drop what is queued (the connection died: nobody will answer these)."""
        self._items = None
        self._head = 0
        self._bytes = 0


def bad_message_reason(data):
    """Why ``data`` cannot be sent as a message (the text of the TypeError send() and the hub raise)."""
    hint = ""
    if isinstance(data, (list, tuple)):
        hint = ": a message is sent whole (join the parts), or encode it (json.dumps, for one)"
    elif isinstance(data, (dict, int, float)):
        hint = ": encode it first (json.dumps, for one)"
    return f"a message is a str (text) or a bytes-like object (binary), not {type(data).__name__}{hint}"


cdef class _Wire:
    # (Fields are grouped by size, 8-byte ones first, so that the struct has no padding: a server
    # session's C object then fits pymalloc's 512-byte class instead of a malloc'd block.)
    # -- the writer half ---------------------------------------------------------
    cdef object _transport          # writes go to its write()/writelines() (FrameWriter: or callables)
    cdef list _chunks               # while corked: encoded output with big payloads kept uncopied
    cdef Compressor _deflate        # permessage-deflate (None: off), called in C per message
    cdef char *_out
    cdef Py_ssize_t _out_len
    cdef Py_ssize_t _out_cap
    # -- the reader half ---------------------------------------------------------
    # (control frames, errors and the writer to cork go through the cdef methods _target,
    # _report_error, _pong and _read_writer: FrameReader keeps its own fields for them)
    cdef object _on_message         # called with each message
    cdef object _pending_close      # (code, reason) of a close frame, handed over after the flush
    cdef Decompressor _inflate
    cdef Py_ssize_t _max_message_size
    # bytes kept between reads: the start of a partial frame
    cdef char *_buf
    cdef Py_ssize_t _buf_len
    cdef Py_ssize_t _buf_cap
    # the partial frame at the start of _buf: payload bytes already unmasked/validated
    cdef Py_ssize_t _done
    cdef Py_ssize_t _frame_total    # header + payload of that frame, once its header is complete
    # the fragmented message being reassembled (its opcode and flag are below)
    cdef char *_msg
    cdef Py_ssize_t _msg_len
    cdef Py_ssize_t _msg_cap
    cdef Py_ssize_t _consumed       # bytes of the current input fully handled (for handler exceptions)
    # a big single-frame message read straight into the bytes object that will be delivered
    cdef bytes _direct
    cdef Py_ssize_t _direct_have
    cdef Py_ssize_t _messages       # data messages delivered
    # this connection's share of the traffic totals (the access log's figures)
    cdef Py_ssize_t _bytes_in       # payload bytes of the messages delivered
    cdef Py_ssize_t _messages_sent
    cdef Py_ssize_t _bytes_sent
    cdef double _last_read          # the clock (set_clock) at the last read
    cdef double _last_message       # the clock at the last data message delivered
    # -- 4 bytes -------------------------------------------------------------------
    cdef int _cork_depth
    cdef int _compress_threshold    # messages from this size on are compressed
    cdef int _fragment_size         # 0: one frame per message
    cdef int _max_frames            # frames parsed per read, 0: no cap
    cdef int _msg_opcode            # of the fragmented message, 0: none
    cdef uint32_t _utf8_state
    cdef int _direct_opcode
    cdef unsigned int _reads        # reads (FrameReader.reads; keepalive uses _last_read)
    cdef uint8_t _direct_key[4]
    # -- 1 byte --------------------------------------------------------------------
    cdef unsigned char _masked
    cdef unsigned char _nocheck     # the transport has write_nocheck/writelines_nocheck
    cdef unsigned char _is_server
    cdef unsigned char _closed
    cdef unsigned char _in_scratch  # the last get_buffer handed out the shared buffer
    cdef unsigned char _backlog     # the frame cap stopped a parse: the handler was told (on_backlog)
    cdef unsigned char _msg_compressed
    cdef unsigned char _direct_masked
    cdef unsigned char _in_direct   # the last get_buffer handed out the rest of _direct

    def __cinit__(self):
        self._out = NULL
        self._buf = NULL
        self._msg = NULL

    def __dealloc__(self):
        self._release_out()
        PyMem_Free(self._buf)
        PyMem_Free(self._msg)

    # == writing ==================================================================

    cdef int _out_write(self, object data) except -1:
        PyObject_CallMethodOneArg(self._transport, S_WRITE_NOCHECK if self._nocheck else S_WRITE, data)
        return 0

    cdef inline void _count_sent(self, int opcode, Py_ssize_t n) noexcept:
        if opcode == OPC_TEXT or opcode == OPC_BINARY:
            self._messages_sent += 1
            self._bytes_sent += n
            if self._is_server:  # clients in the same process are not the server's traffic
                _messages_out[opcode - OPC_TEXT] += 1
                _bytes_out[opcode - OPC_TEXT] += n

    cdef inline void _count_frame_sent(self, bytes frame) noexcept:
        """Count an encoded frame by its header (broadcast frames are encoded elsewhere)."""
        cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(frame)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(frame)
        if size >= 2:
            self._count_sent(p[0] & 0x0F, frame_payload_length(p, size))

    cdef int _out_writelines(self, object chunks) except -1:
        PyObject_CallMethodOneArg(self._transport, S_WRITELINES_NOCHECK if self._nocheck else S_WRITELINES, chunks)
        return 0

    cdef bint _has_writelines(self):
        return True

    cdef inline void _cork(self) noexcept:
        self._cork_depth += 1

    cdef int _uncork(self) except -1:
        if self._cork_depth > 0:
            self._cork_depth -= 1
        if self._cork_depth == 0:
            self._flush()
        return 0

    cdef Py_ssize_t _queued(self):
        return self._out_len + (sum(len(c) for c in self._chunks) if self._chunks else 0)

    cdef int _take_out(self) except -1:
        """Move the output buffer's bytes to the chunk list."""
        if self._out_len:
            if self._chunks is None:
                self._chunks = []
            self._chunks.append(PyBytes_FromStringAndSize(self._out, self._out_len))
            self._out_len = 0
        if self._out != NULL and self._cork_depth == 0:
            # between reads the writer holds nothing: a connection that has exchanged
            # messages costs what an idle one does
            self._release_out()
        return 0

    cdef void _release_out(self) noexcept:
        global _shared_out, _shared_out_cap, _shared_out_owner
        if _shared_out_owner == <void *>self:
            _shared_out_owner = NULL
            if _shared_out_cap > SHARED_OUT_KEEP:
                PyMem_Free(_shared_out)
                _shared_out = NULL
                _shared_out_cap = 0
        else:
            PyMem_Free(self._out)
        self._out = NULL
        self._out_cap = 0

    cdef int _flush(self) except -1:
        """Everything queued goes out in one write (one writev when big payloads are among it)."""
        cdef list chunks
        self._take_out()
        chunks = self._chunks
        if chunks is None:
            return 0
        self._chunks = None
        if len(chunks) == 1:
            self._out_write(chunks[0])
        else:
            self._out_writelines(chunks)
        return 0

    cdef char *_out_reserve(self, Py_ssize_t n) except NULL:
        global _shared_out, _shared_out_cap, _shared_out_owner
        cdef Py_ssize_t cap
        cdef char *mem
        if self._out == NULL and _shared_out_owner == NULL:
            _shared_out_owner = <void *>self
            self._out = _shared_out  # NULL the first time: allocated below
            self._out_cap = _shared_out_cap
        if self._out_len + n > self._out_cap:
            cap = max(self._out_cap * 2, self._out_len + n, 4096)
            mem = <char *>PyMem_Realloc(self._out, cap)
            if mem == NULL:
                raise MemoryError()
            self._out = mem
            self._out_cap = cap
            if _shared_out_owner == <void *>self:
                _shared_out = mem
                _shared_out_cap = cap
        return self._out + self._out_len

    cdef int _emit(self, int opcode, const char *data, Py_ssize_t n, bint fin, bint rsv1, object owner) except -1:
        """Queue or write one frame; ``owner`` is an immutable bytes holding data, if any."""
        cdef const uint8_t *key
        cdef Py_ssize_t h
        cdef uint8_t *out
        cdef uint8_t header[14]
        if not self._masked and n >= LARGE_PAYLOAD and owner is not None and self._has_writelines():
            # Big unmasked payload: the caller's bytes go out as they are (writev), never copied.
            h = write_header(header, opcode, n, fin, rsv1, NULL)
            if self._cork_depth == 0:
                self._out_writelines((PyBytes_FromStringAndSize(<char *>header, h), owner))
                return 0
            memcpy(self._out_reserve(h), header, h)
            self._out_len += h
            self._take_out()
            self._chunks.append(owner)
            return 0
        if self._cork_depth == 0:
            self._out_write(build_frame(opcode, data, n, fin, rsv1, self._masked))
            return 0
        key = fresh_mask_key() if self._masked else NULL
        h = header_size(n, self._masked)
        out = <uint8_t *>self._out_reserve(h + n)
        write_header(out, opcode, n, fin, rsv1, key)
        if key != NULL:
            fastws_mask_copy(out + h, <const uint8_t *>data, n, key)
        else:
            memcpy(out + h, data, n)
        self._out_len += h + n
        if self._out_len >= OUT_FLUSH_AT:
            self._flush()
        return 0

    cdef int _send_message(self, int opcode, const char *data, Py_ssize_t n, object owner) except -1:
        """``owner``: an immutable bytes holding data (sent uncopied when big)."""
        cdef bint rsv1 = False
        cdef Py_ssize_t step, off
        cdef int op
        if self._deflate is not None and n >= self._compress_threshold:
            owner = self._deflate.compress(data, n)
            data = PyBytes_AS_STRING(owner)
            n = PyBytes_GET_SIZE(owner)
            rsv1 = True
        self._count_sent(opcode, n)
        step = self._fragment_size
        if step <= 0 or n <= step:
            return self._emit(opcode, data, n, True, rsv1, owner)
        off = 0
        op = opcode
        while off < n:  # RFC 6455 5.4: first frame carries opcode and RSV1, the rest continue
            self._emit(op, data + off, min(step, n - off), off + step >= n, rsv1 and off == 0, None)
            op = OPC_CONT
            off += step
        return 0

    cdef int _send(self, object data) except -1:
        """Send one message: str as text, any bytes-like object as binary."""
        cdef Py_buffer view
        cdef Py_ssize_t n
        cdef const char *p
        if isinstance(data, str):
            p = PyUnicode_AsUTF8AndSize(data, &n)
            return self._send_message(OPC_TEXT, p, n, None)
        if type(data) is bytes:
            return self._send_message(OPC_BINARY, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), data)
        if not PyObject_CheckBuffer(data):
            raise TypeError(bad_message_reason(data))
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            # A mutable buffer may change after we return: never pass it on uncopied.
            self._send_message(OPC_BINARY, <const char *>view.buf, view.len, None)
        finally:
            PyBuffer_Release(&view)
        return 0

    cdef int _send_frame(self, int opcode, object payload, bint fin, bint rsv1) except -1:
        """Send a single frame as given (control frames, hand-made fragments)."""
        cdef bytes data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        check_control(opcode, len(data), fin)
        return self._emit(opcode, PyBytes_AS_STRING(data), len(data), fin, rsv1, data)

    cdef int _send_raw(self, bytes frame) except -1:
        """Write an already-encoded frame (broadcast: encoded once for many)."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(frame)
        self._count_frame_sent(frame)
        if self._cork_depth == 0:
            self._out_write(frame)
            return 0
        memcpy(self._out_reserve(n), PyBytes_AS_STRING(frame), n)
        self._out_len += n
        if self._out_len >= OUT_FLUSH_AT:
            self._flush()
        return 0

    # == reading ==================================================================

    cdef object _target(self):
        """Who gets on_ping / on_close / on_backlog (FrameReader: its handler)."""
        return self

    cdef _Wire _read_writer(self):
        """The writer corked while a read is parsed (replies leave in one write after it)."""
        return self

    cdef int _read_done(self) except -1:
        """A read's messages are all delivered; its replies have not been written yet."""
        return 0

    cdef int _pong(self, const char *data, Py_ssize_t n) except -1:
        return 0  # the read itself was the sign of life

    cdef inline void _count_received(self, int opcode, Py_ssize_t n) noexcept:
        self._bytes_in += n
        if self._is_server:
            _messages_in[opcode - OPC_TEXT] += 1
            _bytes_in[opcode - OPC_TEXT] += n

    cdef int _deliver_message(self, object message) except -1:
        self._messages += 1
        self._last_message = _clock
        self._on_message(message)
        return 0

    cdef int _report_error(self, object exc) except -1:
        """A read failed (a protocol error, or a handler raised); FrameReader raises or calls on_error."""
        self.on_read_error(exc)
        return 0

    cdef void _stop(self) noexcept:
        """Ignore all further input (after failing a connection: RFC 6455 7.1.7)."""
        self._closed = True
        self._backlog = False
        self._pending_close = None
        self._discard()

    cdef int _resume(self) except -1:
        """Parse what a frame cap left buffered."""
        if not self._backlog:
            return 0
        self._backlog = False
        try:
            self._process(self._buf, self._buf_len, False)
        except Exception as exc:
            self._report_error(exc)
        return 0

    cdef Py_ssize_t _buffered(self) noexcept:
        return self._buf_len + self._msg_len + (self._direct_have if self._direct is not None else 0)

    # -- buffer management -------------------------------------------------

    cdef int _reserve(self, Py_ssize_t free) except -1:
        """Make room for ``free`` more bytes after the pending ones."""
        cdef Py_ssize_t want = self._buf_len + free
        cdef char *mem
        if want > self._buf_cap:
            want = max(want, self._buf_cap + self._buf_cap // 2)
            mem = <char *>PyMem_Realloc(self._buf, want)
            if mem == NULL:
                raise MemoryError()
            self._buf = mem
            self._buf_cap = want
        return 0

    cdef object _get_buffer(self, Py_ssize_t sizehint):
        cdef Py_ssize_t free
        if self._direct is not None:
            # exactly the rest of the frame, so no read runs into the next one
            self._in_direct = True
            return PyMemoryView_FromMemory(PyBytes_AS_STRING(self._direct) + self._direct_have,
                                           PyBytes_GET_SIZE(self._direct) - self._direct_have, PyBUF_WRITE)
        if self._buf_len == 0 and scratch_buffer() != NULL:
            self._in_scratch = True
            return _scratch_view
        self._in_scratch = False
        free = MIN_READ
        if self._frame_total > self._buf_len:
            # a big frame in progress: room for more of it, at most doubling what has arrived
            # (a header alone must not make us allocate its announced size)
            free = max(free, min(self._frame_total - self._buf_len, self._buf_len))
        if self._buf_cap - self._buf_len < MIN_READ // 4 or self._buf_cap - self._buf_len < free:
            self._reserve(free)
        return PyMemoryView_FromMemory(self._buf + self._buf_len, self._buf_cap - self._buf_len, PyBUF_WRITE)

    cdef int _buffer_updated(self, Py_ssize_t nbytes) except -1:
        global _scratch_busy
        self._reads += 1
        self._last_read = _clock
        try:
            if self._in_direct:
                self._in_direct = False
                self._direct_progress(nbytes)
            elif self._in_scratch:
                self._in_scratch = False
                _scratch_busy = True
                try:
                    self._process(_scratch, nbytes, True)
                finally:
                    _scratch_busy = False
            else:
                self._buf_len += nbytes
                self._process(self._buf, self._buf_len, False)
        except Exception as exc:
            self._report_error(exc)
        return 0

    cdef int _feed(self, object data) except -1:
        """Parse bytes given by the caller (copied)."""
        cdef Py_buffer view
        cdef Py_ssize_t k, off = 0
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if self._direct is not None and not self._closed:
                k = min(view.len, PyBytes_GET_SIZE(self._direct) - self._direct_have)
                memcpy(PyBytes_AS_STRING(self._direct) + self._direct_have, view.buf, k)
                off = k
                self._direct_progress(k)
            if view.len - off == 0:
                return 0
            self._reserve(view.len - off)
            memcpy(self._buf + self._buf_len, <char *>view.buf + off, view.len - off)
            self._buf_len += view.len - off
        finally:
            PyBuffer_Release(&view)
        self._process(self._buf, self._buf_len, False)
        return 0

    cdef int _direct_progress(self, Py_ssize_t n) except -1:
        """``n`` more bytes of the direct frame have landed in place: unmask, check, maybe deliver."""
        cdef uint8_t *p
        cdef bytes message
        cdef _Wire writer
        if self._closed or self._direct is None:
            return 0
        p = <uint8_t *>PyBytes_AS_STRING(self._direct) + self._direct_have
        try:
            if self._direct_masked:
                fastws_mask(p, n, self._direct_key, self._direct_have & 3)
            if self._direct_opcode == OPC_TEXT and utf8_feed(p, n, &self._utf8_state) < 0:
                raise ProtocolError(1007, "invalid UTF-8 in text message")
        except ProtocolError:
            self._closed = True
            self._discard()
            raise
        self._direct_have += n
        if self._direct_have < PyBytes_GET_SIZE(self._direct):
            return 0
        message = self._direct
        self._direct = None
        writer = self._read_writer()
        if writer is not None:
            writer._cork()
        try:
            if self._direct_opcode == OPC_TEXT:
                self._deliver(OPC_TEXT, PyBytes_AS_STRING(message), PyBytes_GET_SIZE(message), False)
            else:
                self._count_received(OPC_BINARY, PyBytes_GET_SIZE(message))
                self._deliver_message(message)  # the very object the payload was read into: no copy
        finally:
            self._read_done()
            if writer is not None:
                writer._uncork()
        return 0

    cdef int _start_direct(self, int opcode, bint masked, const uint8_t *key, const uint8_t *payload,
                           Py_ssize_t have, Py_ssize_t length) except -1:
        """Give a big frame its own bytes object and copy (unmasking) what has arrived."""
        self._direct = PyBytes_FromStringAndSize(NULL, length)
        self._direct_have = 0
        self._direct_opcode = opcode
        self._direct_masked = masked
        if masked:
            memcpy(self._direct_key, key, 4)
        memcpy(PyBytes_AS_STRING(self._direct), payload, have)
        self._direct_progress(have)
        return 0

    cdef int _process(self, char *data, Py_ssize_t n, bint from_scratch) except -1:
        """Parse data[0:n]; keep the unconsumed tail in the private buffer."""
        cdef Py_ssize_t used = 0
        cdef _Wire writer
        if self._closed:
            self._buf_len = 0
            return 0
        writer = self._read_writer()
        if writer is not None:
            writer._cork()
        try:
            self._consumed = 0
            used = self._parse(data, n)
        except ProtocolError:
            self._closed = True
            self._discard()
            raise
        except BaseException:
            # A handler raised: the stream itself is intact, keep what follows.
            self._keep_tail(data, n, self._consumed, from_scratch)
            raise
        finally:
            self._read_done()
            if writer is not None:
                writer._uncork()
        if self._closed:
            self._discard()
            if self._pending_close is not None:
                # after the flush: everything answered in this read goes out before the close
                code, reason = self._pending_close
                self._pending_close = None
                self._target().on_close(code, reason)
            return 0
        self._keep_tail(data, n, used, from_scratch)
        if self._backlog:
            self._target().on_backlog()  # stop reading; call resume() from the loop later
        return 0

    cdef int _keep_tail(self, char *data, Py_ssize_t n, Py_ssize_t used, bint from_scratch) except -1:
        if from_scratch:
            if used < n:
                self._reserve(n - used)
                memcpy(self._buf, data + used, n - used)
                self._buf_len = n - used
        elif used:
            if used < n:
                memmove(self._buf, self._buf + used, n - used)
            self._buf_len = n - used
        if self._buf_len == 0 and self._buf != NULL:
            PyMem_Free(self._buf)  # idle again: hold no read buffer
            self._buf = NULL
            self._buf_cap = 0
        return 0

    cdef void _discard(self) noexcept:
        self._direct = None
        PyMem_Free(self._buf)
        PyMem_Free(self._msg)
        self._buf = self._msg = NULL
        self._buf_len = self._buf_cap = self._msg_len = self._msg_cap = 0

    # -- parsing -----------------------------------------------------------

    cdef Py_ssize_t _parse(self, char *data, Py_ssize_t n) except -1:
        """Handle every complete frame in data[0:n]; return the bytes consumed.

        A trailing partial frame is unmasked (and UTF-8 checked) as far as it
        has arrived; self._done remembers how far, for the next call.
        """
        cdef Py_ssize_t pos = 0, avail, hdr, have
        cdef uint8_t *p
        cdef uint8_t b0, b1
        cdef int opcode
        cdef bint fin, rsv1, masked, textual, whole
        cdef uint64_t length
        cdef Py_ssize_t limit
        cdef uint8_t *key
        cdef uint8_t *payload
        cdef int i
        cdef Py_ssize_t frames = 0
        self._backlog = False
        while not self._closed:
            if self._max_frames and frames >= self._max_frames:
                self._backlog = True  # fairness: the rest of this input waits for the next turn
                break
            limit = self._max_message_size
            avail = n - pos
            if avail < 2:
                break
            p = <uint8_t *>data + pos
            b0 = p[0]
            b1 = p[1]
            fin = b0 & 0x80
            rsv1 = b0 & 0x40
            opcode = b0 & 0x0F
            masked = b1 & 0x80
            if self._done == 0 and self._frame_total == 0:
                self._check_header(b0, b1)
            length = b1 & 0x7F
            hdr = 2
            if length == 126:
                if avail < 4:
                    break
                length = (<uint64_t>p[2] << 8) | p[3]
                hdr = 4
            elif length == 127:
                if avail < 10:
                    break
                length = 0
                for i in range(2, 10):
                    length = (length << 8) | p[i]
                if length >> 63:
                    raise ProtocolError(1002, "frame length has the most significant bit set")
                hdr = 10
            if masked:
                hdr += 4
            if self._frame_total == 0:
                # header length known: enforce the size limit before any payload is buffered
                if limit > 0 and (rsv1 or (opcode == OPC_CONT and self._msg_compressed)):
                    # compressed: inflate enforces the real limit; on the wire allow
                    # deflate's worst-case growth of incompressible data
                    limit += (limit >> 10) + 1024
                if limit > 0 and not (opcode & 8) and length + <uint64_t>self._msg_len > <uint64_t>limit:
                    raise PayloadTooBig(
                        f"message of at least {length + <uint64_t>self._msg_len} bytes exceeds the limit of {limit}")
                if length > <uint64_t>(0x7FFFFFFFFFFFFFFF - 16):
                    raise PayloadTooBig("frame length does not fit in memory")
                self._frame_total = hdr + <Py_ssize_t>length
            if avail < hdr:
                break
            key = p + hdr - 4
            payload = p + hdr
            have = min(avail - hdr, <Py_ssize_t>length)
            whole = have == <Py_ssize_t>length
            # (only when a good part has arrived: a bare header must not make us allocate much)
            if (not whole and self._done == 0 and <Py_ssize_t>length >= DIRECT_FRAME and fin and not rsv1
                    and (opcode == OPC_TEXT or opcode == OPC_BINARY)
                    and <Py_ssize_t>length <= 4 * have + MIN_READ):
                # the rest of this message goes straight into the object we will deliver
                self._frame_total = 0
                pos = n
                self._consumed = pos
                self._start_direct(opcode, masked, key, payload, have, <Py_ssize_t>length)
                break
            textual = (opcode == OPC_TEXT or (opcode == OPC_CONT and self._msg_opcode == OPC_TEXT))
            if have > self._done:
                if masked:
                    fastws_mask(payload + self._done, have - self._done, key, self._done & 3)
                # Fail fast on bad UTF-8, even inside a frame that has not fully arrived.
                # A whole single-frame text message is checked by the decoder instead.
                if textual and not (self._msg_compressed or (rsv1 and opcode == OPC_TEXT)) and not (
                        whole and fin and opcode == OPC_TEXT and self._done == 0):
                    if utf8_feed(payload + self._done, have - self._done, &self._utf8_state) < 0:
                        raise ProtocolError(1007, "invalid UTF-8 in text message")
                self._done = have
            if not whole:
                break
            # a complete frame
            frames += 1
            pos += hdr + <Py_ssize_t>length
            self._consumed = pos
            self._done = 0
            self._frame_total = 0
            if opcode & 8:
                self._control(opcode, <char *>payload, <Py_ssize_t>length)
            elif fin and opcode != OPC_CONT:
                self._deliver(opcode, <char *>payload, <Py_ssize_t>length, rsv1)
            else:
                if opcode != OPC_CONT:
                    self._msg_opcode = opcode
                    self._msg_compressed = rsv1
                self._append(<char *>payload, <Py_ssize_t>length)
                if fin:
                    opcode = self._msg_opcode
                    self._msg_opcode = 0
                    try:
                        self._deliver(opcode, self._msg, self._msg_len, self._msg_compressed)
                    finally:
                        self._drop_msg()
        return pos

    cdef int _check_header(self, uint8_t b0, uint8_t b1) except -1:
        """RFC 6455 5.2-5.5 rules decidable from the first two bytes."""
        cdef int opcode = b0 & 0x0F
        cdef bint fin = b0 & 0x80
        if b0 & 0x30 or (b0 & 0x40 and (self._inflate is None or opcode != OPC_TEXT and opcode != OPC_BINARY)):
            if b0 & 0x40 and self._inflate is not None:
                raise ProtocolError(1002, f"RSV1 set on a {'continuation' if opcode == 0 else 'control'} frame")
            raise ProtocolError(1002, "reserved bits set without a negotiated extension")
        if opcode > 2 and opcode < 8 or opcode > 10:
            raise ProtocolError(1002, f"reserved opcode {opcode:#x}")
        if opcode & 8:
            if not fin:
                raise ProtocolError(1002, "fragmented control frame")
            if (b1 & 0x7F) > 125:
                raise ProtocolError(1002, "control frame payload longer than 125 bytes")
        elif opcode == OPC_CONT:
            if self._msg_opcode == 0:
                raise ProtocolError(1002, "continuation frame without a message to continue")
        elif self._msg_opcode != 0:
            raise ProtocolError(1002, "new data frame inside a fragmented message")
        if ((b1 & 0x80) != 0) != (self._is_server != 0):
            raise ProtocolError(1002, "client frame is not masked" if self._is_server
                                else "server frame is masked")
        return 0

    cdef int _append(self, const char *data, Py_ssize_t n) except -1:
        cdef Py_ssize_t want = self._msg_len + n
        cdef char *mem
        if want > self._msg_cap:
            want = max(want, self._msg_cap * 2)
            mem = <char *>PyMem_Realloc(self._msg, want)
            if mem == NULL:
                raise MemoryError()
            self._msg = mem
            self._msg_cap = want
        memcpy(self._msg + self._msg_len, data, n)
        self._msg_len += n
        return 0

    cdef void _drop_msg(self) noexcept:
        self._msg_len = 0
        self._msg_compressed = False
        PyMem_Free(self._msg)
        self._msg = NULL
        self._msg_cap = 0

    cdef int _deliver(self, int opcode, char *data, Py_ssize_t n, bint compressed) except -1:
        cdef bytes raw
        cdef uint32_t state = self._utf8_state
        self._utf8_state = 0
        self._count_received(opcode, n)
        if compressed:
            raw = self._inflate.decompress(data, n)
            if opcode == OPC_TEXT:
                try:
                    message = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ProtocolError(1007, "invalid UTF-8 in text message") from None
            else:
                message = raw
        elif opcode == OPC_TEXT:
            if state & 0xFF:
                raise ProtocolError(1007, "text message ends inside a UTF-8 sequence")
            try:
                message = PyUnicode_DecodeUTF8(data, n, NULL)
            except UnicodeDecodeError:
                raise ProtocolError(1007, "invalid UTF-8 in text message") from None
        else:
            message = PyBytes_FromStringAndSize(data, n)
        self._deliver_message(message)
        return 0

    cdef int _control(self, int opcode, char *data, Py_ssize_t n) except -1:
        if opcode == OPC_PONG:
            self._pong(data, n)
        elif opcode == OPC_PING:
            self._target().on_ping(PyBytes_FromStringAndSize(data, n))
        else:
            self._pending_close = _parse_close(PyBytes_FromStringAndSize(data, n))
            self._closed = True
        return 0


cdef class FrameWriter(_Wire):
    """Encodes frames for one connection and hands them to ``write`` (or a transport's write).

    While corked (a reader corks its writer during each read), frames are
    appended to one output buffer and written with a single call on uncork:
    one send() per read batch instead of one per message.
    """

    cdef object _write
    cdef object _writelines

    cdef int _out_write(self, object data) except -1:
        if self._transport is not None:
            return _Wire._out_write(self, data)
        self._write(data)
        return 0

    cdef int _out_writelines(self, object chunks) except -1:
        if self._transport is not None:
            return _Wire._out_writelines(self, chunks)
        self._writelines(chunks)
        return 0

    cdef bint _has_writelines(self):
        return self._transport is not None or self._writelines is not None

    def __init__(self, write=None, *, bint is_server=True, writelines=None, deflate=None,
                 int compress_threshold=128, int fragment_size=0, transport=None):
        if transport is not None:
            self._transport = transport
            self._nocheck = hasattr(transport, "write_nocheck") and hasattr(transport, "writelines_nocheck")
        elif write is None:
            raise TypeError("FrameWriter needs write= or transport=")
        self._write = write
        self._writelines = writelines
        self._deflate = deflate
        self._masked = not is_server
        self._is_server = is_server
        self._compress_threshold = compress_threshold
        self._fragment_size = fragment_size

    @property
    def compress_threshold(self):
        return self._compress_threshold

    @compress_threshold.setter
    def compress_threshold(self, int value):
        self._compress_threshold = value

    @property
    def fragment_size(self):
        return self._fragment_size

    @fragment_size.setter
    def fragment_size(self, int value):
        self._fragment_size = value

    @property
    def corked(self):
        return self._cork_depth > 0

    @property
    def buffered(self):
        """Bytes queued while corked, not yet handed to ``write``."""
        return self._queued()

    def set_deflate(self, deflate, int compress_threshold=128):
        self._deflate = deflate
        self._compress_threshold = compress_threshold

    def cork(self):
        self._cork()

    def uncork(self):
        self._uncork()

    def send(self, data):
        """Send one message: str as text, any bytes-like object as binary."""
        self._send(data)

    def send_frame(self, int opcode, payload, bint fin=True, bint rsv1=False):
        """Send a single frame as given (for callers that fragment by hand)."""
        self._send_frame(opcode, payload, fin, rsv1)

    def send_raw(self, bytes frame):
        """Write an already-encoded frame (broadcast: encoded once for many)."""
        self._send_raw(frame)

    def send_ping(self, payload=b""):
        self._send_frame(OPC_PING, payload, True, False)

    def send_pong(self, payload=b""):
        self._send_frame(OPC_PONG, payload, True, False)

    def send_close(self, int code=1000, str reason=""):
        self._send_frame(OPC_CLOSE, encode_close_payload(code, reason), True, False)


cdef class FrameReader(_Wire):
    """Incremental RFC 6455 frame parser; see _frame.pyi for the contract."""

    cdef object _handler            # control frames go to its methods
    cdef object _on_error           # given: read errors go here instead of being raised
    cdef object _on_pong            # None: a pong is only a read
    cdef FrameWriter _writer        # corked while a read is parsed

    cdef object _target(self):
        return self._handler

    cdef _Wire _read_writer(self):
        return self._writer

    cdef int _pong(self, const char *data, Py_ssize_t n) except -1:
        if self._on_pong is not None:
            self._on_pong(PyBytes_FromStringAndSize(data, n))
        return 0

    cdef int _report_error(self, object exc) except -1:
        if self._on_error is None:
            raise exc
        self._on_error(exc)
        return 0

    def __init__(self, handler, *, bint is_server=True, Py_ssize_t max_message_size=1048576,
                 inflate=None, FrameWriter writer=None, on_error=None):
        self._on_message = handler.on_message
        self._on_pong = getattr(handler, "on_pong", None)
        self._handler = handler
        self._on_error = on_error
        self._is_server = is_server
        self._max_message_size = max_message_size
        self._inflate = inflate
        self._writer = writer

    @property
    def on_message(self):
        return self._on_message

    @on_message.setter
    def on_message(self, value):
        self._on_message = value

    @property
    def on_pong(self):
        return self._on_pong

    @on_pong.setter
    def on_pong(self, value):
        self._on_pong = value

    @property
    def max_message_size(self):
        return self._max_message_size

    @max_message_size.setter
    def max_message_size(self, Py_ssize_t value):
        self._max_message_size = value

    @property
    def max_frames_per_read(self):
        return self._max_frames

    @max_frames_per_read.setter
    def max_frames_per_read(self, int value):
        self._max_frames = value

    @property
    def messages(self):
        return self._messages

    @property
    def reads(self):
        return self._reads

    @property
    def last_read(self):
        return self._last_read

    @last_read.setter
    def last_read(self, double value):
        self._last_read = value

    @property
    def last_message(self):
        return self._last_message

    @last_message.setter
    def last_message(self, double value):
        self._last_message = value

    def set_inflate(self, inflate):
        """Allow RSV1 (permessage-deflate) from now on, decompressing with ``inflate``."""
        self._inflate = inflate

    @property
    def closed(self):
        return self._closed

    @property
    def buffered(self):
        return self._buffered()

    def stop(self):
        """Ignore all further input (after failing a connection: RFC 6455 7.1.7)."""
        self._stop()

    def resume(self):
        """Parse what a frame cap (max_frames_per_read) left buffered."""
        self._resume()

    def get_buffer(self, Py_ssize_t sizehint=-1):
        return self._get_buffer(sizehint)

    def buffer_updated(self, Py_ssize_t nbytes):
        self._buffer_updated(nbytes)

    def feed(self, data):
        """Parse bytes given by the caller (copied; for tests and non-buffered transports)."""
        self._feed(data)


cdef class _Slot:
    """The members due at one tick, linked through their ka_prev / ka_next; ``ping_sent`` is when
    they were pinged (0: they were not), on the loop's clock, and ``ping_clock`` on the fine one."""

    cdef readonly long long tick
    cdef readonly double ping_sent
    cdef double ping_clock
    cdef object first
    cdef readonly Py_ssize_t size

    def __len__(self):
        return self.size


DEF FD_LATER = -2  # SessionCore._fd: a plain TCP socket, not asked for yet

cdef dict _nocheck_by_type = {}


cdef bint _has_nocheck(object transport):
    """The transport has write_nocheck/writelines_nocheck (uvloop's), by its type, looked up once."""
    kind = type(transport)
    found = _nocheck_by_type.get(kind)
    if found is None:
        found = _nocheck_by_type[kind] = hasattr(transport, "write_nocheck") and hasattr(
            transport, "writelines_nocheck")
    return found


cdef class SessionCore(_Wire):
    """The C half of a server session (fastws.connection.Session is the Python half).

    One object is the connection's reader, its writer and the fields the hot
    paths look at; an idle connection costs this object, its transport and
    little more.  The transport reads straight into it (get_buffer /
    buffer_updated), messages go to the endpoint's plain function with the
    endpoint as first argument (no bound method kept), and ``send`` checks the
    session's state in C.  Control frames, errors and state changes call the
    Python half's methods (on_ping, on_close, on_backlog, on_read_error,
    _over_send_buffer, _drain_waiter).
    """

    # the session (fastws.connection.Session uses these)
    cdef readonly long long id
    cdef public object _server
    cdef public object _head         # the request head, parsed again on demand (Session.request)
    cdef public object _remote       # None: the transport's peer address
    cdef public object subprotocol
    cdef public object user
    cdef public object state
    cdef public object rooms
    cdef public object endpoint
    cdef public object params
    cdef public object deflate       # the negotiated permessage-deflate state (None: no compression)
    cdef public object _drain
    cdef public object _waiters      # what user code awaits (wait_closed, ping): made at the first wait
    cdef public Inbox _inbox
    cdef public object _task
    cdef public object ka_bucket     # keepalive's wheel (fastws.keepalive): a list with its links here
    cdef public object ka_prev
    cdef public object ka_next
    cdef public double opened_at     # the loop's clock at the 101 (the access log's duration)
    cdef int _fd                     # the socket, for fan-out writes past the transport (-1: never; FD_LATER)
    # (the small fields below are small types: they keep the object within pymalloc's 512-byte class,
    # which it now fills exactly -- 496 bytes and the GC header: one more field is a malloc per session)
    cdef public unsigned short _close_code
    cdef public unsigned char _paused          # bits: PAUSED_WRITING, and the Python half's own
    cdef public unsigned char _state
    cdef public unsigned char _async_messages  # messages queue for an async on_message
    cdef public unsigned char _close_sent
    cdef public unsigned char _close_received
    cdef unsigned char _queued       # messages go to the inbox (async code takes them)
    cdef unsigned char _to_endpoint  # messages go to _on_message(endpoint, message)
    cdef public object _close_reason
    cdef public object _closed_by
    cdef public object _sent_close
    cdef public object _deadline
    cdef object __weakref__

    def _init_core(self, long long session_id, server, head, remote):
        self.id = session_id
        self._server = server
        self._head = head
        self._remote = remote
        self._is_server = True

    def _attach_wire(self, transport, *, Py_ssize_t max_message_size, int max_frames_per_read,
                     deflate=None, inflate=None, int compress_threshold=128, double now=0.0,
                     bint direct=False):
        """Start reading and writing ``transport``: frames go to its write(), corked per read.
        ``direct``: it is a plain TCP transport, whose socket fan-out may write to while the
        transport holds nothing unsent (the socket is asked for at the first fan-out: asking
        costs a system call and an object, which a connection that never gets one is spared)."""
        self._transport = transport
        self._fd = FD_LATER if direct else -1
        self._nocheck = _has_nocheck(transport)
        self._deflate = deflate
        self._inflate = inflate
        self._compress_threshold = compress_threshold
        self._max_message_size = max_message_size
        self._max_frames = max_frames_per_read
        self._last_read = self._last_message = now

    def _deliver_to(self, func, bint with_endpoint=False):
        """Messages go to ``func(message)``, or to ``func(self.endpoint, message)`` (the endpoint
        class's plain function: no bound method is kept per connection)."""
        self._on_message = func
        self._to_endpoint = with_endpoint
        self._queued = False

    def _deliver_to_inbox(self):
        """Messages go to the inbox, for async code (self._make_inbox() creates it on first use)."""
        self._to_endpoint = 0
        self._queued = True

    cdef int _deliver_message(self, object message) except -1:
        if self._to_endpoint:
            self._messages += 1
            self._last_message = _clock
            self._on_message(self.endpoint, message)
            return 0
        if not self._queued:
            return _Wire._deliver_message(self, message)
        self._messages += 1
        self._last_message = _clock
        self._the_inbox()._put(message, True)  # a consumer waiting for it runs at the end of the read
        if self._async_messages and self._task is None:
            self._start_queue()  # a task to hand the queue to the async on_message
            self._uncork_next_turn()
        return 0

    cdef int _read_done(self) except -1:
        """The consumer woken by this read's messages takes them now, inside the read's cork: its
        replies leave in one write with the read's own."""
        if self._inbox is not None and self._inbox._resume_consumer():
            self._uncork_next_turn()  # it runs next turn instead
        return 0

    cdef int _uncork_next_turn(self) except -1:
        if self._cork_depth < 2:
            # a task runs next to answer: its replies of that loop turn leave in one write with ours
            self._cork()
            self._server.loop.call_soon(self._uncork_later)
        return 0

    def _uncork_later(self):
        self._uncork()

    cdef int _pong(self, const char *data, Py_ssize_t n) except -1:
        """A pong while a keepalive ping is out: its round trip goes to the histogram.  While user
        code awaits a ping of its own, the Python half matches the payload (on_pong)."""
        cdef _Slot slot
        if n == 0 and self.ka_bucket is not None:
            slot = <_Slot>self.ka_bucket
            if slot.ping_clock:
                _observe_rtt(fastws_monotonic() - slot.ping_clock)
        if self._waiters is not None:
            self.on_pong(PyBytes_FromStringAndSize(data, n))
        return 0

    def recv(self):
        """The next message (handler-coroutine style): ``await ws.recv()``; raises ConnectionClosed at
        the end.  A queued message comes back without a future or a suspension."""
        return self._the_inbox()._next(False)

    cdef inline Inbox _the_inbox(self):
        if self._inbox is None:
            self._make_inbox()  # the Python half: it knows the limits and the flow control
        return self._inbox

    def __aiter__(self):
        # ``async for`` iterates the inbox itself: its __anext__ is a C slot, while on Session (a
        # Python subclass, which Cython's methods of the same name shadow) it would be looked up
        # and called by name for every message
        return self._the_inbox()

    def __anext__(self):
        """``async for message in ws``: ends quietly on a normal close (1000, 1001, 1005)."""
        return self._the_inbox()._next(True)

    @property
    def transport(self):
        return self._transport

    @property
    def messages_received(self):
        return self._messages

    @property
    def traffic(self):
        """This connection's (messages received, payload bytes received, messages sent, payload
        bytes sent): data messages, bytes as on the wire."""
        return self._messages, self._bytes_in, self._messages_sent, self._bytes_sent

    @property
    def last_read(self):
        """The keepalive clock (fastws._frame.set_clock) at the last byte received."""
        return self._last_read

    @property
    def last_message(self):
        return self._last_message

    @property
    def buffered(self):
        """Bytes of partial frames and fragmented messages the reader holds."""
        return self._buffered()

    @property
    def closed(self):
        """True once the connection has left OPEN (closing or closed)."""
        return self._state != C_OPEN_STATE

    def get_buffer(self, Py_ssize_t sizehint=-1):
        return self._get_buffer(sizehint)

    def buffer_updated(self, Py_ssize_t nbytes):
        self._buffer_updated(nbytes)

    def _feed_bytes(self, data):
        """Frames that arrived with the upgrade request; errors go to on_read_error."""
        try:
            self._feed(data)
        except Exception as exc:
            self._report_error(exc)

    def _stop_input(self):
        self._stop()

    def _parse_backlog(self):
        self._resume()

    def _write_frame(self, int opcode, payload):
        """A control frame, written whatever the state (the close handshake's own frames)."""
        self._send_frame(opcode, payload, True, False)
        if opcode == OPC_CLOSE and self._cork_depth:
            self._flush()  # nothing follows a close frame, and TCP may be closed right after it

    def send(self, message):
        """Send one message (str: text, bytes-like: binary).

        Returns an awaitable: ``await session.send(x)`` waits while the peer
        is slow to read; a plain ``session.send(x)`` never blocks, and a peer
        that has let more than ``max_send_buffer`` bytes pile up when the next
        message comes is cut off (1008).  Raises ConnectionClosed once closing.
        """
        if self._state != C_OPEN_STATE:
            raise self.connection_closed_error()
        if self._paused & C_PAUSED_WRITING:
            if self._over_send_buffer():
                return READY
            self._send(message)
            return self._drain_waiter()
        self._send(message)
        return READY

    cdef int _fanout_write(self, bytes frame) except -1:
        """Fan-out's write of a plain frame: past the transport while it holds nothing, else through it."""
        global _fanout_direct, _fanout_queued
        cdef Py_ssize_t n = PyBytes_GET_SIZE(frame), sent
        if self._fd == FD_LATER:
            sock = self._transport.get_extra_info("socket")
            self._fd = sock.fileno() if sock is not None else -1
        if self._fd < 0 or self._cork_depth or self._out_len or self._chunks is not None \
                or PyObject_CallMethodNoArgs(self._transport, S_BUFFER_SIZE) != 0:
            _fanout_queued += 1
            return self._send_raw(frame)  # something is queued: the transport keeps the order
        self._count_frame_sent(frame)
        sent = fastws_send(self._fd, PyBytes_AS_STRING(frame), n)
        if sent == n:
            _fanout_direct += 1
            return 0
        _fanout_queued += 1
        if sent < 0:
            if not fastws_would_block():
                return 0  # the connection is failing: its transport will tell the session
            sent = 0
        self._out_write(memoryview(frame)[sent:] if sent else frame)  # the kernel pushed back
        return 0

    def send_frame(self, bytes frame):
        """Write an already-encoded frame (the hub's broadcast); a closing session skips it."""
        if self._state != C_OPEN_STATE:
            return READY
        if self._paused & C_PAUSED_WRITING:
            if self._over_send_buffer():
                return READY
            self._send_raw(frame)
            return self._drain_waiter()
        self._send_raw(frame)
        return READY


cdef unsigned long long _fanout_direct = 0  # fan-out writes that went straight into a socket
cdef unsigned long long _fanout_queued = 0  # ... and those that went through the transport


def fanout_counts():
    """(direct writes, writes through the transport) made by fanout() so far in this process."""
    return _fanout_direct, _fanout_queued


def fanout(list targets, bytes frame, exclude=None):
    """Deliver an encoded plain ``frame`` to every open member of ``targets`` (the hub's broadcast).

    A server session takes it in C, with no Python call: straight into its
    socket when its transport holds nothing unsent, through the transport
    otherwise (the order and backpressure stay the transport's); a paused one
    through the slow-consumer check.  Members that compress, and members that
    are not server sessions (the ASGI protocol), are returned for the caller:
    (delivered, [those members]).
    """
    cdef Py_ssize_t delivered = 0
    cdef list others = None
    cdef SessionCore core
    for member in targets:
        if member is exclude:
            continue
        if type(member) is not SessionCore and not isinstance(member, SessionCore):
            if others is None:
                others = []
            others.append(member)
            continue
        core = <SessionCore>member
        if core._state != C_OPEN_STATE:
            continue
        if core.deflate is not None:
            if others is None:
                others = []
            others.append(member)
            continue
        if core._paused & C_PAUSED_WRITING:
            core.send_frame(frame)  # the slow-consumer policy decides
        else:
            core._fanout_write(frame)
        delivered += 1
    return delivered, others if others is not None else []


# --------------------------------------------------------------------------
# Keepalive: a hashed timer wheel of sessions, run in C (fastws.keepalive drives it)

cdef inline object _get_next(object m):
    return (<SessionCore>m).ka_next if isinstance(m, SessionCore) else m.ka_next


cdef inline void _set_links(object m, object slot, object prev, object nxt):
    if isinstance(m, SessionCore):
        (<SessionCore>m).ka_bucket = slot
        (<SessionCore>m).ka_prev = prev
        (<SessionCore>m).ka_next = nxt
    else:
        m.ka_bucket = slot
        m.ka_prev = prev
        m.ka_next = nxt


cdef class KeepaliveWheel:
    """Sessions filed by the tick at which they next need a look; ``run(now)`` looks at the due ones.

    Any byte from a peer counts as a sign of life (the wire core stamps each read
    with set_clock's time).  A peer silent for ``interval`` (less a random 0-10 %,
    so that a crowd that connected together does not ping together) gets the
    pre-built ``ping`` frame, written in C; one still silent ``timeout`` after the
    ping, or without a data message for ``idle``, is handed back to the caller
    to close.  Members are server sessions (SessionCore, handled without a
    Python call) or any object with closed, last_read, last_message, send_frame
    and ka_bucket / ka_prev / ka_next attributes (the ASGI protocol).
    """

    cdef readonly double resolution
    cdef double _interval             # 0: no pings
    cdef double _timeout              # 0: an unanswered ping never fails
    cdef double _idle                 # 0: no idle timeout
    cdef long long _tick
    cdef dict _slots                  # (tick, ping_sent) -> _Slot
    cdef dict _due                    # tick -> [_Slot]
    cdef bytes _ping
    cdef unsigned long long _rng
    cdef readonly unsigned long long pings
    cdef readonly Py_ssize_t size

    def __init__(self, double resolution, double now, *, interval=None, timeout=None, idle=None,
                 bytes ping=b"\x89\x00"):
        self.resolution = resolution
        self._interval = interval or 0.0
        self._timeout = timeout or 0.0
        self._idle = idle or 0.0
        self._tick = <long long>(now / resolution)
        self._slots = {}
        self._due = {}
        self._ping = ping
        self._rng = 0x9E3779B97F4A7C15 ^ <unsigned long long>(now * 1000)

    cdef inline double _jitter(self) noexcept:
        """A number in [0, 1): xorshift64*, plenty for spreading pings."""
        self._rng ^= self._rng >> 12
        self._rng ^= self._rng << 25
        self._rng ^= self._rng >> 27
        return <double>((self._rng * 0x2545F4914F6CDD1DULL) >> 11) / 9007199254740992.0

    cdef inline double _next_ping(self, double last_read):
        if self._interval == 0:
            return 0
        return last_read + self._interval * (1.0 - 0.1 * self._jitter())

    cdef int _file(self, object member, double when, double ping_sent, double ping_clock=0.0) except -1:
        cdef long long tick = <long long>(when / self.resolution) + 1
        cdef _Slot slot
        cdef tuple key
        if tick <= self._tick:
            tick = self._tick + 1
        key = (tick, ping_sent)
        slot = self._slots.get(key)
        if slot is None:
            slot = _Slot.__new__(_Slot)
            slot.tick = tick
            slot.ping_sent = ping_sent
            slot.ping_clock = ping_clock
            self._slots[key] = slot
            bucket = self._due.get(tick)
            if bucket is None:
                self._due[tick] = [slot]
            else:
                bucket.append(slot)
        _set_links(member, slot, None, slot.first)
        if slot.first is not None:
            if isinstance(slot.first, SessionCore):
                (<SessionCore>slot.first).ka_prev = member
            else:
                slot.first.ka_prev = member
        slot.first = member
        slot.size += 1
        self.size += 1
        return 0

    def add(self, member, double now):
        """File a new member: its first look is an interval (or the idle timeout) from now."""
        cdef double when = self._next_ping(now)
        if self._idle and (when == 0 or now + self._idle < when):
            when = now + self._idle
        if when:
            self._file(member, when, 0.0)

    def remove(self, member):
        """Take a member out (its connection ended)."""
        cdef _Slot slot = member.ka_bucket
        if slot is None:
            return
        prev = member.ka_prev
        nxt = member.ka_next
        if prev is None:
            slot.first = nxt
        elif isinstance(prev, SessionCore):
            (<SessionCore>prev).ka_next = nxt
        else:
            prev.ka_next = nxt
        if nxt is not None:
            if isinstance(nxt, SessionCore):
                (<SessionCore>nxt).ka_prev = prev
            else:
                nxt.ka_prev = prev
        _set_links(member, None, None, None)
        slot.size -= 1
        self.size -= 1

    def run(self, double now):
        """Look at every member due by ``now``: ping the silent ones (in C), file each again.

        Returns (timed_out, idle): the members to close, whose keepalive ends here.
        """
        cdef list timed_out = None, idle = None
        cdef long long target = <long long>(now / self.resolution)
        cdef _Slot slot
        cdef object member, nxt
        cdef double last_read, last_message, ping_sent, when, ping_clock = 0.0
        cdef SessionCore core
        cdef bint closed
        while self._tick < target:
            self._tick += 1
            for slot in self._due.pop(self._tick, ()):
                del self._slots[(slot.tick, slot.ping_sent)]
                ping_sent = slot.ping_sent
                member = slot.first
                slot.first = None
                while member is not None:
                    nxt = _get_next(member)
                    _set_links(member, None, None, None)
                    self.size -= 1
                    if isinstance(member, SessionCore):
                        core = <SessionCore>member
                        closed = core._state != C_OPEN_STATE
                        last_read = core._last_read
                        last_message = core._last_message
                    else:
                        closed = member.closed
                        if not closed:
                            last_read = member.last_read
                            last_message = member.last_message
                    if not closed:  # (a closing member's close deadline ends it)
                        if self._idle and now - last_message >= self._idle:
                            if idle is None:
                                idle = []
                            idle.append(member)
                        elif ping_sent and last_read < ping_sent and self._timeout:
                            # a ping is out and nothing came since
                            if now >= ping_sent + self._timeout:
                                if timed_out is None:
                                    timed_out = []
                                timed_out.append(member)
                            else:
                                self._file(member, ping_sent + self._timeout, ping_sent, slot.ping_clock)
                        elif self._interval and now >= max(last_read, ping_sent) + 0.9 * self._interval:
                            # silent long enough (pings are filed up to 10 % early: jitter)
                            if not ping_clock:
                                ping_clock = fastws_monotonic()  # one reading for the pings of this run
                            self._ping_member(member)
                            self.pings += 1
                            when = now + (self._timeout if 0 < self._timeout < self._interval else self._interval)
                            self._file(member, when, now, ping_clock)
                        else:
                            # the next ping is due an interval after the last sign of life (or after
                            # the last ping, when an unanswered one never fails)
                            when = self._next_ping(max(last_read, ping_sent))
                            if self._idle and (when == 0 or last_message + self._idle < when):
                                when = last_message + self._idle
                            if when:
                                self._file(member, when, 0.0)
                    member = nxt
        return timed_out or [], idle or []

    cdef int _ping_member(self, object member) except -1:
        cdef SessionCore core
        if isinstance(member, SessionCore):
            core = <SessionCore>member
            if core._paused & C_PAUSED_WRITING:
                core.send_frame(self._ping)  # the slow-consumer policy decides
            elif core._fd == FD_LATER:
                core._send_raw(self._ping)  # through the transport: no need to ask for the socket
            else:
                core._fanout_write(self._ping)
        else:
            member.send_frame(self._ping)
        return 0
