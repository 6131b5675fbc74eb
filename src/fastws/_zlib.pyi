"""Type stub for fastws._zlib: permessage-deflate streams on zlib's C API, reset between messages."""

from fastws._codec import Compressor, Decompressor

ZLIB_VERSION: str

class Deflater(Compressor):
    context_takeover: bool
    level: int
    window_bits: int
    mem_level: int
    strategy: int  # zlib's: 0 default, 1 filtered, 2 Huffman only, 3 RLE, 4 fixed codes
    allocated: bool  # the zlib stream exists (made on first use)
    def __init__(self, level: int = 6, window_bits: int = 15, mem_level: int = 8,
                 context_takeover: bool = False, strategy: int = 0) -> None: ...
    def __call__(self, data: str | bytes | bytearray | memoryview) -> bytes: ...  # without the 00 00 ff ff tail

class Inflater(Decompressor):
    context_takeover: bool
    window_bits: int
    max_size: int  # 0: no limit; past it PayloadTooBig (1009)
    allocated: bool
    def __init__(self, window_bits: int = 15, max_size: int = 1048576, context_takeover: bool = False) -> None: ...
    def __call__(self, data: bytes | bytearray | memoryview) -> bytes: ...  # ProtocolError(1002) on bad data

def shared_deflater(level: int, window_bits: int, mem_level: int) -> Deflater: ...
def shared_inflater(window_bits: int, max_size: int) -> Inflater: ...
