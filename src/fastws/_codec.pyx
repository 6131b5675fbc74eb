# cython: language_level=3
"""What the wire core (fastws._frame) compresses and inflates messages with (RFC 7692).

The wire core calls ``compress`` and ``decompress`` in C: the zlib streams of fastws._zlib and
fastws._zlibng override them, so a compressed message costs no Python call, no argument tuple
and no copy of its input.  A Python subclass (fastws.deflate's fallback on Python's zlib, where
no zlib headers were there to build against) implements ``__call__(payload) -> bytes`` instead,
and the methods here call it.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize


cdef class Compressor:
    """Compresses one whole message: raw deflate data without the 00 00 ff ff tail (7.2.1)."""

    cdef bytes compress(self, const char *data, Py_ssize_t n):
        return self(PyBytes_FromStringAndSize(data, n))


cdef class Decompressor:
    """Inflates the payload of one whole message (RSV1 set), bounded by its own size limit."""

    cdef bytes decompress(self, const char *data, Py_ssize_t n):
        return self(PyBytes_FromStringAndSize(data, n))
