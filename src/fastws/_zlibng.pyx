# cython: language_level=3
"""fastws._zlib's streams built against zlib-ng (vendor/zlib-ng, zlib-compatible mode).

zlib-ng's level 1 writes fixed Huffman codes straight away, where zlib builds a
dynamic tree for every message even at level 1: compressing a ~400-byte JSON
message alone costs about a third of zlib's time (bench/deflate_cost.py), at a
lower ratio.  Its hash table has a fixed size (128 KiB), so it serves the shared
no-context-takeover streams, one per setting per process; connections with
context takeover keep the system zlib's smaller streams (fastws._zlib).
setup.py builds this module only where cmake can build zlib-ng.
"""

include "_zstream.pxi"
