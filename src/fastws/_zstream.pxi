# The zlib streams of fastws._zlib and fastws._zlibng: the same code, compiled once against
# the system's zlib and once against the zlib-ng that setup.py builds from vendor/zlib-ng in
# its zlib-compatible mode (its symbols prefixed, so the two never meet).  Which one a module
# gets is only a matter of which "zlib.h" is on its include path.

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.ref cimport PyObject, Py_XDECREF
from libc.string cimport memcmp, memset

from fastws._codec cimport Compressor, Decompressor
from fastws.errors import PayloadTooBig, ProtocolError

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t *size) except NULL
    # the output bytes object is grown in place and cut to size: raw pointers, so it can be resized
    PyObject *new_bytes "PyBytes_FromStringAndSize" (const char *data, Py_ssize_t size) except NULL
    int _PyBytes_Resize(PyObject **string, Py_ssize_t newsize) except -1
    char *bytes_data "PyBytes_AS_STRING" (PyObject *string)


cdef inline object _finish(PyObject *out):
    """The new reference ``out`` as an object (the reference passes to it)."""
    result = <object>out
    Py_XDECREF(out)
    return result

cdef extern from "zlib.h":
    ctypedef unsigned char Bytef
    ctypedef unsigned int uInt
    ctypedef unsigned long uLong
    ctypedef struct z_stream:
        const Bytef *next_in
        uInt avail_in
        uLong total_in
        Bytef *next_out
        uInt avail_out
        uLong total_out
        const char *msg
        void *zalloc
        void *zfree
        void *opaque
    int Z_OK, Z_STREAM_END, Z_NEED_DICT, Z_BUF_ERROR, Z_DATA_ERROR, Z_MEM_ERROR
    int Z_NO_FLUSH, Z_SYNC_FLUSH, Z_DEFLATED, Z_DEFAULT_STRATEGY
    int deflateInit2(z_stream *strm, int level, int method, int windowBits, int memLevel, int strategy) nogil
    int deflate(z_stream *strm, int flush) nogil
    int deflateReset(z_stream *strm) nogil
    int deflateEnd(z_stream *strm) nogil
    uLong deflateBound(z_stream *strm, uLong sourceLen) nogil
    int inflateInit2(z_stream *strm, int windowBits) nogil
    int inflate(z_stream *strm, int flush) nogil
    int inflateReset(z_stream *strm) nogil
    int inflateEnd(z_stream *strm) nogil
    const char *zlibVersion()

ZLIB_VERSION = zlibVersion().decode()

cdef const char *TAIL = b"\x00\x00\xff\xff"  # the empty stored block a sync flush ends with (7.2.1)
cdef Py_ssize_t CHUNK = 16384


cdef inline int _raw_bits(int window_bits) noexcept:
    # zlib refuses an 8-bit raw deflate window; 9 is safe for an 8-bit peer (see fastws.deflate)
    return -(9 if window_bits < 9 else window_bits)


cdef class Deflater(Compressor):
    """Compresses whole messages; ``context_takeover=False`` resets the stream before each one.
    The wire core calls ``compress`` in C; calling the object does the same from Python."""

    cdef z_stream _z
    cdef bint _ready
    cdef readonly bint context_takeover
    cdef readonly int level
    cdef readonly int window_bits
    cdef readonly int mem_level
    cdef readonly int strategy

    def __cinit__(self):
        memset(&self._z, 0, sizeof(z_stream))

    def __init__(self, int level=6, int window_bits=15, int mem_level=8, bint context_takeover=False,
                 int strategy=0):
        if not (8 <= window_bits <= 15 and 1 <= mem_level <= 9 and -1 <= level <= 9):
            raise ValueError("window_bits 8..15, mem_level 1..9, level -1..9")
        self.level = level
        self.window_bits = window_bits
        self.mem_level = mem_level
        self.context_takeover = context_takeover
        self.strategy = strategy  # zlib's: 0 default, 1 filtered, 2 Huffman only, 3 RLE, 4 fixed codes

    def __dealloc__(self):
        if self._ready:
            deflateEnd(&self._z)

    @property
    def allocated(self):
        """True once the zlib stream exists (it is made on first use)."""
        return self._ready

    cdef int _start(self) except -1:
        if deflateInit2(&self._z, self.level, Z_DEFLATED, _raw_bits(self.window_bits), self.mem_level,
                        self.strategy) != Z_OK:
            raise MemoryError("zlib could not make a compressor")
        self._ready = True
        return 0

    def __call__(self, data):
        """Raw deflate data for one whole message (str is compressed as its UTF-8)."""
        cdef Py_buffer view
        cdef const char *src
        cdef Py_ssize_t n
        if isinstance(data, str):
            src = PyUnicode_AsUTF8AndSize(data, &n)
            return self.compress(src, n)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            return self.compress(<const char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef bytes compress(self, const char *src, Py_ssize_t n):
        cdef PyObject *out = NULL
        cdef Py_ssize_t size, produced = 0
        cdef int ret
        if not self._ready:
            self._start()
        elif not self.context_takeover:
            deflateReset(&self._z)
        # sync flush output: the data's bound, plus the flush's few bytes; grows if ever short
        size = <Py_ssize_t>deflateBound(&self._z, <uLong>n) + 16
        out = new_bytes(NULL, size)
        try:
            self._z.next_in = <const Bytef *>src
            self._z.avail_in = <uInt>n
            while True:
                self._z.next_out = <Bytef *>bytes_data(out) + produced
                self._z.avail_out = <uInt>(size - produced)
                ret = deflate(&self._z, Z_SYNC_FLUSH)  # (the GIL stays held: the shared streams need it)
                produced = size - self._z.avail_out
                if ret != Z_OK and ret != Z_BUF_ERROR:
                    raise RuntimeError(f"zlib deflate failed ({ret})")
                if self._z.avail_out != 0 and self._z.avail_in == 0:
                    break
                size *= 2
                _PyBytes_Resize(&out, size)
            # RFC 7692 7.2.1: drop the 00 00 ff ff a sync flush ends with; a lone 00 stays for an empty message
            if produced >= 4 and memcmp(bytes_data(out) + produced - 4, TAIL, 4) == 0:
                produced -= 4
            if produced == 0:
                return b"\x00"
            _PyBytes_Resize(&out, produced)
            return _finish(out)
        except BaseException:
            Py_XDECREF(out)
            raise


cdef class Inflater(Decompressor):
    """Inflates whole messages, at most ``max_size`` bytes each (0: no limit); without context
    takeover the stream is reset before each one.  The wire core calls ``decompress`` in C."""

    cdef z_stream _z
    cdef bint _ready
    cdef readonly bint context_takeover
    cdef readonly int window_bits
    cdef readonly Py_ssize_t max_size

    def __cinit__(self):
        memset(&self._z, 0, sizeof(z_stream))

    def __init__(self, int window_bits=15, Py_ssize_t max_size=1 << 20, bint context_takeover=False):
        if not 8 <= window_bits <= 15:
            raise ValueError("window_bits must be between 8 and 15")
        self.window_bits = window_bits
        self.max_size = max_size
        self.context_takeover = context_takeover

    def __dealloc__(self):
        if self._ready:
            inflateEnd(&self._z)

    @property
    def allocated(self):
        return self._ready

    cdef int _start(self) except -1:
        # inflating with at least the peer's window is always safe
        if inflateInit2(&self._z, _raw_bits(self.window_bits)) != Z_OK:
            raise MemoryError("zlib could not make a decompressor")
        self._ready = True
        return 0

    cdef int _restart(self) except -1:
        inflateReset(&self._z)
        return 0

    def __call__(self, data):
        """The payload of one message (RSV1 set); PayloadTooBig past max_size, ProtocolError(1002)
        on data that is not deflate."""
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            return self.decompress(<const char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef bytes decompress(self, const char *src, Py_ssize_t n):
        cdef PyObject *out = NULL
        cdef Py_ssize_t size, produced = 0, limit = self.max_size
        cdef int ret = Z_OK
        cdef int part
        cdef bint ended = False
        if n == 0:
            # not valid RFC 7692 (an empty message is sent as 0x00), and the tail alone would leave
            # the inflater inside a block: take it as empty, untouched
            return b""
        if not self._ready:
            self._start()
        elif not self.context_takeover:
            self._restart()
        size = min(max(4 * n, 256), limit + 1) if limit else max(4 * n, 256)
        out = new_bytes(NULL, size)
        try:
            for part in range(2):  # the message, then the tail the sender dropped
                self._z.next_in = <const Bytef *>src if part == 0 else <const Bytef *>TAIL
                self._z.avail_in = <uInt>n if part == 0 else 4
                while not ended:
                    self._z.next_out = <Bytef *>bytes_data(out) + produced
                    self._z.avail_out = <uInt>(size - produced)
                    ret = inflate(&self._z, Z_SYNC_FLUSH)
                    produced = size - self._z.avail_out
                    if ret == Z_STREAM_END:
                        ended = True  # a BFINAL block ends the stream (7.2.3.3): the next message starts anew
                        break
                    if ret != Z_OK and ret != Z_BUF_ERROR:
                        self._restart()
                        raise ProtocolError(1002, "invalid compressed data")
                    if limit and produced > limit:
                        self._restart()
                        raise PayloadTooBig(f"decompressed message exceeds {limit} bytes")
                    if self._z.avail_out == 0:
                        # full, more may be pending: grow, never past one byte more than the limit
                        size = min(size * 2, limit + 1) if limit else size * 2
                        if size <= produced:
                            self._restart()
                            raise PayloadTooBig(f"decompressed message exceeds {limit} bytes")
                        _PyBytes_Resize(&out, size)
                        continue
                    if self._z.avail_in == 0 or ret == Z_BUF_ERROR:
                        break  # this part is used up
            if ended:
                self._restart()
            _PyBytes_Resize(&out, produced)
            return _finish(out)
        except BaseException:
            Py_XDECREF(out)
            raise


# One compressor and one inflater per setting for the whole process: connections without context
# takeover all use them (the event loop's thread is the only caller; nothing here releases the GIL
# in between).
cdef dict _shared = {}


def shared_deflater(int level, int window_bits, int mem_level):
    key = ("d", level, window_bits, mem_level)
    deflater = _shared.get(key)
    if deflater is None:
        deflater = _shared[key] = Deflater(level, window_bits, mem_level, False)
    return deflater


def shared_inflater(int window_bits, Py_ssize_t max_size):
    key = ("i", window_bits, max_size)
    inflater = _shared.get(key)
    if inflater is None:
        inflater = _shared[key] = Inflater(window_bits, max_size, False)
    return inflater
