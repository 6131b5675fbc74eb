"""Type stub for the Cython wire core (fastws._frame). Sans-I/O: bytes in, calls out."""

from collections.abc import Callable
from typing import Protocol

OP_CONTINUATION: int  # 0x0
OP_TEXT: int  # 0x1
OP_BINARY: int  # 0x2
OP_CLOSE: int  # 0x8
OP_PING: int  # 0x9
OP_PONG: int  # 0xA

class FrameHandler(Protocol):
    def on_message(self, data: str | bytes) -> object: ...  # whole message: str = text, bytes = binary
    def on_ping(self, payload: bytes) -> object: ...
    def on_pong(self, payload: bytes) -> object: ...
    def on_close(self, code: int, reason: str) -> object: ...  # 1005 when the close frame had no payload
    def on_backlog(self) -> object: ...  # only with max_frames_per_read: stop reading, call resume() later

class FrameReader:
    """Incremental frame parser that owns its read buffer (asyncio.BufferedProtocol style).

    Calls the handler once per complete message and once per control frame.
    Between get_buffer() and buffer_updated() the returned view may be a
    buffer shared by all readers of the thread: call the pair back to back
    for one reader at a time (as asyncio and uvloop do).
    A protocol violation raises fastws.errors.ProtocolError(code, reason) from
    buffer_updated()/feed(); messages completed before it were delivered first.
    After a close frame or an error, further input is ignored.  on_close is
    called after the writer has been uncorked (replies queued during the same
    read are written first).  With ``on_error``, buffer_updated() passes the
    exception (ProtocolError, or one raised by a handler) to it instead of
    raising, so a transport can call buffer_updated directly.
    """

    max_message_size: int
    def __init__(
        self,
        handler: FrameHandler,
        *,
        is_server: bool = True,  # server: frames must be masked; client: must not be
        max_message_size: int = 1048576,  # 0 = unlimited; checked from headers (1009)
        inflate: Callable[[bytes], bytes] | None = None,  # set when permessage-deflate was negotiated (RSV1 allowed)
        writer: FrameWriter | None = None,  # corked while a read is parsed, flushed once after it
        on_error: Callable[[Exception], object] | None = None,  # buffer_updated reports errors here
    ) -> None: ...
    on_message: Callable[[str | bytes], object]  # swappable
    on_pong: Callable[[bytes], object] | None  # the handler's on_pong; None: pongs only count as reads
    messages: int  # data messages delivered so far
    reads: int  # buffer_updated calls so far
    last_read: float  # set_clock()'s value at the last read
    last_message: float  # set_clock()'s value when the last data message was delivered
    max_frames_per_read: int  # 0: no cap; else parsing stops there, on_backlog() is called, resume() goes on
    # read-only traffic counters (payload bytes as on the wire, i.e. compressed when compressed)
    text_in: int
    text_bytes_in: int
    binary_in: int
    binary_bytes_in: int
    def stop(self) -> None: ...  # ignore all further input (free the buffers)
    def resume(self) -> None: ...  # parse what the frame cap left buffered
    def set_inflate(self, inflate: Callable[[bytes], bytes] | None) -> None: ...
    def get_buffer(self, sizehint: int = -1) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview) -> None: ...
    @property
    def closed(self) -> bool: ...  # a close frame was received or an error raised
    @property
    def buffered(self) -> int: ...  # bytes this reader holds between reads (partial frames + fragments)

class FrameWriter:
    """Encodes frames and writes them; while corked, frames are coalesced into one write."""

    compress_threshold: int
    fragment_size: int  # 0: one frame per message; else split messages into frames of this size
    # read-only traffic counters (send and send_raw; payload bytes as on the wire)
    text_out: int
    text_bytes_out: int
    binary_out: int
    binary_bytes_out: int
    def __init__(
        self,
        write: Callable[[bytes], object],
        *,
        is_server: bool = True,  # server frames are unmasked; client frames masked with a fresh key
        writelines: Callable[[tuple[bytes, ...]], object] | None = None,  # big payloads go out uncopied
        deflate: Callable[[bytes], bytes] | None = None,  # compress a whole message payload (RSV1)
        compress_threshold: int = 128,  # messages shorter than this are sent uncompressed
        fragment_size: int = 0,
    ) -> None: ...
    def set_deflate(self, deflate: Callable[[bytes], bytes] | None, compress_threshold: int = 128) -> None: ...
    @property
    def buffered(self) -> int: ...  # bytes queued while corked
    def send(self, data: str | bytes | bytearray | memoryview) -> None: ...  # str -> text, else binary
    def send_frame(self, opcode: int, payload: bytes | str, fin: bool = True, rsv1: bool = False) -> None: ...
    def send_raw(self, frame: bytes) -> None: ...  # an already-encoded frame (broadcast: encode once)
    def send_ping(self, payload: bytes = b"") -> None: ...
    def send_pong(self, payload: bytes = b"") -> None: ...
    def send_close(self, code: int = 1000, reason: str = "") -> None: ...
    def cork(self) -> None: ...
    def uncork(self) -> None: ...  # flush everything queued while corked as one write
    @property
    def corked(self) -> bool: ...

def set_clock(now: float) -> None: ...  # the coarse clock that stamps FrameReader.last_read/last_message
def encode_frame(
    opcode: int, payload: bytes | str, *, fin: bool = True, rsv1: bool = False, mask: bool = False
) -> bytes: ...
def encode_close_payload(code: int = 1000, reason: str = "") -> bytes: ...
def parse_close_payload(payload: bytes) -> tuple[int, str]: ...  # raises ProtocolError (1002/1007)
def is_valid_close_code(code: int) -> bool: ...
def apply_mask(data: bytes | bytearray | memoryview, mask: bytes) -> bytes: ...
def apply_mask_inplace(buffer: bytearray | memoryview, mask: bytes) -> None: ...
def accept_key(key: str | bytes) -> str: ...
def validate_utf8(data: bytes | bytearray | memoryview) -> bool: ...
