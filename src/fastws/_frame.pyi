"""Type stub for the Cython wire core (fastws._frame). Sans-I/O: bytes in, calls out."""

import asyncio
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Protocol

from fastws._codec import Compressor, Decompressor

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
        inflate: Decompressor | None = None,  # set when permessage-deflate was negotiated (RSV1 allowed)
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
    def stop(self) -> None: ...  # ignore all further input (free the buffers)
    def resume(self) -> None: ...  # parse what the frame cap left buffered
    def set_inflate(self, inflate: Decompressor | None) -> None: ...
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
    def __init__(
        self,
        write: Callable[[bytes], object],
        *,
        is_server: bool = True,  # server frames are unmasked; client frames masked with a fresh key
        writelines: Callable[[tuple[bytes, ...]], object] | None = None,  # big payloads go out uncopied
        deflate: Compressor | None = None,  # compresses a whole message (a str: its UTF-8)
        compress_threshold: int = 128,  # messages shorter than this are sent uncompressed
        fragment_size: int = 0,
    ) -> None: ...
    def set_deflate(self, deflate: Compressor | None, compress_threshold: int = 128) -> None: ...
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
def traffic_counts() -> tuple[int, int, int, int, int, int, int, int]: ...
# ^ this process's server traffic: text messages, text bytes, binary messages, binary bytes received,
#   then the same four sent (payload bytes as on the wire)

PING_RTT_BUCKETS: tuple[float, ...]  # seconds: the upper bounds of ping_rtt_counts()'s buckets
def ping_rtt_counts() -> tuple[list[int], float]: ...  # (counts per bucket, +Inf last; sum of seconds)

PAUSED_WRITING: int  # SessionCore._paused bit: the transport asked us to stop writing
OPEN_STATE: int

class _Ready:
    def __await__(self) -> Generator[Any]: ...

READY: _Ready  # returned by send() when nothing needs awaiting (awaiting it does not suspend)

class Inbox:
    """A session's bounded queue of received messages, in front of async code."""

    def __init__(self, loop: asyncio.AbstractEventLoop, owner: Any, flow: Any, *, max_messages: int,
                 max_bytes: int) -> None: ...  # flow(owner, more): stop (False) / resume (True) reading
    def __len__(self) -> int: ...
    @property
    def queued_bytes(self) -> int: ...
    @property
    def full(self) -> bool: ...  # reading pauses (flow(owner, False)) until it drains to half
    @property
    def waiting(self) -> bool: ...  # a consumer awaits the next message
    def put(self, message: str | bytes) -> None: ...
    def get_nowait(self) -> str | bytes: ...
    # already done (no coroutine, no future) when one is queued; else the inbox's one reusable waiting
    # awaitable (RuntimeError if another coroutine is waiting already)
    def get(self) -> Awaitable[str | bytes]: ...
    def __aiter__(self) -> Inbox: ...
    def __anext__(self) -> Awaitable[str | bytes]: ...  # get() for async for: StopAsyncIteration on 1000/1001/1005
    def end(self, exc: BaseException) -> None: ...  # the connection ended: get() raises exc from now on
    def clear(self) -> None: ...

class SessionCore:
    """The C half of a server session (fastws.connection.Session): its reader, writer and fields."""

    id: int
    subprotocol: str | None
    user: Any
    state: Any
    rooms: set[str] | None
    endpoint: Any
    params: dict[str, str]
    deflate: Any
    opened_at: float
    ka_bucket: Any
    ka_prev: Any
    ka_next: Any
    # for the Python half (fastws.connection.Session) and the state machine (fastws.protocol)
    _server: Any
    _head: bytes
    _remote: str | None
    _drain: asyncio.Future[None] | None
    _inbox: Inbox | None
    _task: asyncio.Task[Any] | None
    _paused: int
    _async_messages: int
    _state: int
    _close_sent: int
    _close_received: int
    _close_code: int
    _close_reason: str
    _closed_by: str | None
    _sent_close: Any
    _deadline: Any
    def _init_core(self, session_id: int, server: Any, head: bytes, remote: str | None) -> None: ...
    def _attach_wire(self, transport: asyncio.BaseTransport, *, max_message_size: int, max_frames_per_read: int,
                     deflate: Compressor | None = None,
                     inflate: Decompressor | None = None, compress_threshold: int = 128,
                     now: float = 0.0, direct: bool = False) -> None: ...
    def _deliver_to(self, func: Callable[..., object], with_endpoint: bool = False) -> None: ...
    def _deliver_to_inbox(self) -> None: ...
    def _uncork_later(self) -> None: ...
    def _feed_bytes(self, data: bytes) -> None: ...
    def _stop_input(self) -> None: ...
    def _parse_backlog(self) -> None: ...
    def _write_frame(self, opcode: int, payload: bytes | str) -> None: ...
    def recv(self) -> Awaitable[str | bytes]: ...  # no future when a message is queued
    def __aiter__(self) -> Inbox: ...  # async for iterates the inbox (a C slot per message)
    def __anext__(self) -> Awaitable[str | bytes]: ...  # ends quietly on 1000, 1001, 1005
    def send(self, message: str | bytes | bytearray | memoryview) -> Awaitable[None]: ...  # READY or a drain
    def send_frame(self, frame: bytes) -> Awaitable[None]: ...  # an encoded frame (broadcast)
    def get_buffer(self, sizehint: int = -1) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    @property
    def transport(self) -> asyncio.Transport | None: ...
    @property
    def messages_received(self) -> int: ...
    @property
    def traffic(self) -> tuple[int, int, int, int]: ...  # messages in, bytes in, messages out, bytes out
    @property
    def last_read(self) -> float: ...
    @property
    def last_message(self) -> float: ...
    @property
    def buffered(self) -> int: ...
    @property
    def closed(self) -> bool: ...

def bad_message_reason(data: object) -> str: ...  # why data is no message (send()'s TypeError)
def fanout(targets: list[Any], frame: bytes, exclude: Any = None) -> tuple[int, list[Any]]: ...
# ^ an encoded plain frame to every open server session in targets, in C; returns (delivered, the
#   members it left to the caller: those that compress, and non-SessionCore members)
def fanout_counts() -> tuple[int, int]: ...  # (writes straight into a socket, writes through the transport)

class KeepaliveWheel:
    """Sessions filed by when they next need a look: pings written in C, O(due) per tick."""

    resolution: float
    pings: int
    size: int
    def __init__(self, resolution: float, now: float, *, interval: float | None = None,
                 timeout: float | None = None, idle: float | None = None, ping: bytes = b"\x89\x00") -> None: ...
    def add(self, member: Any, now: float) -> None: ...
    def remove(self, member: Any) -> None: ...
    def run(self, now: float) -> tuple[list[Any], list[Any]]: ...  # (timed out, idle): to close
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
