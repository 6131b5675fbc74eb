# The wire core's interface to permessage-deflate's streams (fastws._codec): called in C, per message.

cdef class Compressor:
    cdef bytes compress(self, const char *data, Py_ssize_t n)


cdef class Decompressor:
    cdef bytes decompress(self, const char *data, Py_ssize_t n)
