"""Type stub for fastws._codec: what the wire core compresses and inflates messages with."""

class Compressor:
    """Subclassed in Python: implement __call__(payload: bytes) -> bytes (raw deflate, no tail)."""

class Decompressor:
    """Subclassed in Python: implement __call__(payload: bytes) -> bytes (the inflated message)."""
