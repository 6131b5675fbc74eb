# cython: language_level=3
"""permessage-deflate's compression through zlib's C API (RFC 7692).

Python's zlib objects cannot be reset, so compressing each message on its own
(no context takeover) used to mean a fresh zlib stream per message: a quarter
of a megabyte allocated, cleared and freed every time.  Here a stream is made
once and reset between messages (``deflateReset`` / ``inflateReset``), and the
connections that compress without context takeover share one stream per
setting per process (uWebSockets' "shared compressor"): an idle connection
holds no zlib memory, and a message costs only the compression itself.
Connections with context takeover own their streams, made on first use.

Both kinds are plain callables for the wire core: ``Deflater(payload) ->
raw deflate data without the 00 00 ff ff tail``, ``Inflater(data) ->
payload``, the inflater bounded by ``max_size`` (a zip bomb stops there).

This module is built against the system's zlib: connections with context
takeover use it (its memLevel bounds a stream's memory).  fastws._zlibng is
the same code built against zlib-ng, for the shared streams (fastws.deflate).
"""

include "_zstream.pxi"
