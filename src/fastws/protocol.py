"""The WebSocket connection state machine, written once for the server session and the client.

Sans-I/O: nothing here touches a socket or the event loop.  The state machine
decides what a connection does on its way out -- which close frame to send,
whether to keep reading, when to end TCP, when to give up -- and asks its
shell (``fastws.connection.Session``, ``fastws.client.ClientConnection``,
``fastws.asgi``) to do it through a few methods the shell implements.  The
per-message path never comes here: the Cython wire core calls the application
directly, and this class is consulted only when the state changes.

RFC 6455 section 7, as done here::

    event                   server                                  client
    ----------------------  --------------------------------------  ------------------------------------
    the peer's close frame  echo it, close TCP                      echo it, wait for the server's FIN
    close() (ours)          send close, keep reading, drop data     the same
      then the peer's close close TCP                               wait for the server's FIN
    fail(code)              send close + FIN, discard until EOF     send close, discard until EOF
    EOF from the peer       close TCP                               close TCP
    leaving OPEN, any way   one deadline, close_timeout later: abort TCP

Reading goes on while closing -- even on a session paused by backpressure --
so the peer's answer is seen, and the kernel never resets a connection that
still has unread data (a reset makes the peer drop our close frame unread).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Generator
from typing import Any

from fastws._frame import READY, Inbox, encode_close_payload, is_valid_close_code  # noqa: F401 (re-exported)
from fastws.errors import CloseCode, ConnectionClosed

# States
CONNECTING, OPEN, CLOSING, CLOSED = 0, 1, 2, 3
STATE_NAMES = {CONNECTING: "connecting", OPEN: "open", CLOSING: "closing", CLOSED: "closed"}

# Who sent the first close frame (logs, metrics); "" when TCP ended without one.
LOCAL, REMOTE = "local", "remote"

# Closes that end `async for message in ws` quietly; any other code raises ConnectionClosed.
NORMAL_ENDS = (CloseCode.NORMAL, CloseCode.GOING_AWAY, CloseCode.NO_STATUS)


def drop_message(message: Any) -> None:
    """Where data messages go once a connection is closing (RFC 6455 7.1.1: no more data)."""


def truncate_reason(reason: str, limit: int = 123) -> str:
    """``reason`` cut to fit a close frame (``limit`` bytes of UTF-8), never inside a character."""
    data = reason.encode("utf-8")
    if len(data) <= limit:
        return reason
    return data[:limit].decode("utf-8", "ignore")


def check_close(code: int, reason: str) -> None:
    """Raise ValueError for a close code or reason that may not go on the wire."""
    encode_close_payload(code, reason)  # ValueError names what is wrong


_ping_ids = itertools.count(1)  # unique ping payloads for the process


class Pings:
    """The pings user code sent and may await, by payload: the server's sessions' and the client's.
    A pong answers its ping and every ping sent before it (RFC 6455 5.5.3 lets a peer answer only
    the latest)."""

    __slots__ = ("_waiting",)

    def __init__(self) -> None:
        self._waiting: dict[bytes, tuple[asyncio.Future[float], float]] = {}  # payload -> (future, sent at)

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def payload(self, payload: str | bytes | bytearray | memoryview | None) -> bytes:
        """What a new ping sends: ``payload`` as bytes (a str as its UTF-8), or a unique 4 bytes for
        None; ValueError past 125 bytes or for a payload already waiting.  Nothing is kept yet."""
        if payload is None:
            data = (next(_ping_ids) & 0xFFFFFFFF).to_bytes(4, "big")
            while data in self._waiting:
                data = (next(_ping_ids) & 0xFFFFFFFF).to_bytes(4, "big")
            return data
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        if len(data) > 125:
            raise ValueError(f"a ping's payload is at most 125 bytes (RFC 6455 5.5), not {len(data)}")
        if data in self._waiting:
            raise ValueError("a ping with this payload is already waiting for its pong")
        return data

    def sent(self, payload: bytes, future: asyncio.Future[float]) -> PingSent:
        """The ping with ``payload`` went out: ``future`` gets its round trip."""
        self._waiting[payload] = (future, time.perf_counter())
        return PingSent(future)

    def answer(self, payload: bytes) -> None:
        """A pong: resolve its ping and the earlier ones (an unsolicited pong changes nothing)."""
        waiting = self._waiting
        if payload not in waiting:
            return
        now = time.perf_counter()
        for key in list(waiting):
            future, sent = waiting.pop(key)
            if not future.done():
                future.set_result(now - sent)
            if key == payload:
                break

    def fail(self, error: BaseException) -> None:
        """The connection ended: every unanswered ping fails with ``error`` (marked retrieved:
        nobody may be waiting)."""
        for future, _ in self._waiting.values():
            if not future.done():
                future.set_exception(error)
                future.exception()
        self._waiting.clear()


class PingSent:
    """What ping() returns, on the server's sessions and the client alike (the ping is already on
    its way): awaiting it gives the future of its pong, as in python-websockets:
    ``pong_waiter = await ws.ping(); latency = await pong_waiter``."""

    __slots__ = ("_pong",)

    def __init__(self, pong: asyncio.Future[float]) -> None:
        self._pong = pong

    def __await__(self) -> Generator[Any, None, asyncio.Future[float]]:
        return self._pong
        yield  # (a generator that returns at once: awaiting does not suspend)


class WebSocketProtocol:
    """Mixin: the close handshake, the fail path and the close deadline of one connection.

    The shell calls ``close``, ``fail``, ``receive_close``, ``receive_eof`` and
    ``connection_ended``; it implements the ``_write_close`` ... ``_call_later``
    hooks and sets ``is_server`` and ``close_timeout``.
    """

    # The fields live in the shell (SessionCore's C fields, ClientConnection's slots): this class
    # adds behaviour only, so it can sit next to a C base class.
    __slots__ = ()
    FIELDS = ("_state", "_close_sent", "_close_received", "_close_code", "_close_reason", "_closed_by",
              "_sent_close", "_deadline")

    is_server = True
    close_timeout = 5.0

    def _init_protocol(self, state: int = OPEN) -> None:
        self._state = state
        self._close_sent = False
        self._close_received = False
        self._close_code = int(CloseCode.ABNORMAL)
        self._close_reason = ""
        self._closed_by = ""
        self._sent_close: tuple[int, str] | None = None
        self._deadline: Any = None

    # -- what the shell implements ------------------------------------------------------

    def _write_close(self, payload: bytes) -> None:
        """Queue a close frame with this payload."""
        raise NotImplementedError

    def _drop_messages(self) -> None:
        """Keep parsing input (to see a close frame) but deliver no more data messages."""
        raise NotImplementedError

    def _discard_input(self) -> None:
        """Ignore all further input without parsing it."""
        raise NotImplementedError

    def _keep_reading(self) -> None:
        """Read even if backpressure paused reading: the peer's answer must get through."""
        raise NotImplementedError

    def _shutdown_write(self) -> None:
        """Half-close (FIN after the queued data) where the transport can; else nothing."""
        raise NotImplementedError

    def _close_transport(self) -> bool:
        """End TCP after the queued data has been written; True if that may take a while (data
        still queued for a peer that may never read it, a TLS shutdown), False if it ends now."""
        raise NotImplementedError

    def _abort_transport(self) -> None:
        """End TCP now, dropping whatever is queued."""
        raise NotImplementedError

    def _call_later(self, delay: float, callback: Callable[[], Any]) -> Any:
        """Run ``callback`` after ``delay`` seconds; return something with ``cancel()``."""
        raise NotImplementedError

    # -- state ----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the connection has left OPEN (closing or closed)."""
        return self._state != OPEN

    @property
    def close_code(self) -> int | None:
        """Why the connection closed: the code of the first close frame, whoever sent it (``closed_by``);
        1005 if the peer's had none, 1006 if TCP ended without one.  None while open.
        ``closed_cleanly`` says whether both close frames went across."""
        return None if self._state in (OPEN, CONNECTING) else self.close_info()[0]

    @property
    def close_reason(self) -> str:
        """The reason that goes with ``close_code``."""
        return self.close_info()[1]

    def close_info(self) -> tuple[int, str]:
        """(close_code, close_reason), whatever the state."""
        if self._closed_by == LOCAL and self._sent_close is not None:
            return self._sent_close
        return self._close_code, self._close_reason

    @property
    def sent_close(self) -> tuple[int, str] | None:
        """(code, reason) of the close frame we sent, or None."""
        return self._sent_close

    @property
    def closed_by(self) -> str:
        """"local" or "remote": who sent the first close frame; "" if TCP ended without one."""
        return self._closed_by

    def connection_closed_error(self) -> ConnectionClosed:
        code, reason = self.close_info()
        return ConnectionClosed(code, reason, self._sent_close)

    # -- events -----------------------------------------------------------------------------

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; TCP ends when the peer answers, or after close_timeout.

        A code or reason that cannot go on the wire raises ValueError (nothing is sent).
        Closing a connection that is already closing or closed does nothing.
        """
        check_close(code, reason)
        if self._state != OPEN:
            return
        self._start_closing(code, reason, LOCAL)
        self._drop_messages()

    def fail(self, code: int, reason: str = "", *, peer_alive: bool = True) -> None:
        """Fail the connection (RFC 6455 7.1.7): a protocol error, a limit, a dead peer.

        Sends a close frame with ``code`` (unless one was sent) and stops
        processing input.  A server then half-closes and ends TCP once the peer
        has gone (EOF) -- reading on meanwhile, so the peer's unread data cannot
        make the kernel reset the connection before our close frame is read --
        or when close_timeout has passed.  ``peer_alive=False`` (a peer that
        stopped answering pings) closes TCP right after the close frame.
        """
        if self._state == CLOSED:
            return
        if not is_valid_close_code(code):
            code, reason = CloseCode.INTERNAL_ERROR, ""
        if self._state == OPEN:
            self._start_closing(code, truncate_reason(reason), LOCAL)
        self._discard_input()
        if not peer_alive:
            self._close_transport()
        elif self.is_server:
            self._shutdown_write()  # the FIN tells the client we are done; it closes its side

    def receive_close(self, code: int, reason: str) -> None:
        """The peer's close frame (the wire core validated it); called after replies were flushed."""
        if self._state == CLOSED:
            return
        self._close_received = True
        self._close_code, self._close_reason = code, reason
        if self._state == OPEN:
            self._closed_by = REMOTE
            self._state = CLOSING
            # Echo the code (RFC 6455 5.5.1); 1005 means the frame had none: echo none.
            self._close_sent = True
            self._sent_close = (code, "")
            self._write_close(b"" if code == CloseCode.NO_STATUS else int(code).to_bytes(2, "big"))
        if self.is_server:
            # RFC 6455 7.1.1: the server closes TCP first; if that has to wait for the peer to take
            # what is queued, the deadline bounds the wait (an empty plain-TCP buffer ends at once)
            if self._close_transport():
                self._arm_deadline()
        else:
            self._arm_deadline()  # a client waits for the server's FIN (receive_eof), within the deadline

    def receive_eof(self) -> None:
        """The peer half-closed its side of TCP."""
        if self._state == CLOSED:
            return
        if self._state == OPEN:
            self._state = CLOSING  # no close frame: the code stays 1006
        self._arm_deadline()
        self._close_transport()

    def connection_ended(self) -> bool:
        """TCP is gone.  True the first time (the shell then notifies its user code)."""
        if self._state == CLOSED:
            return False
        self._state = CLOSED
        deadline, self._deadline = self._deadline, None
        if deadline is not None:
            deadline.cancel()
        return True

    @property
    def closed_cleanly(self) -> bool:
        """Both close frames went across (a clean close, RFC 6455 7.1.4)."""
        return self._close_sent and self._close_received

    # -- internals --------------------------------------------------------------------------

    def _start_closing(self, code: int, reason: str, side: str) -> None:
        self._state = CLOSING
        self._closed_by = side
        self._close_sent = True
        self._sent_close = (int(code), reason)
        self._write_close(encode_close_payload(code, reason))
        self._keep_reading()
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        if self._deadline is None and self._state != CLOSED:
            self._deadline = self._call_later(self.close_timeout, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self._state != CLOSED:
            self._abort_transport()


# Keepalive (pings, timeouts, idle closes) is fastws._frame.KeepaliveWheel's, driven by
# fastws.keepalive: the same for the server's sessions and the ASGI protocol.


# -- the inbox: messages waiting for recv() ---------------------------------------------------
# Inbox is written in C (fastws._frame): get() returns a queued message without a future.
