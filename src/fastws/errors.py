"""Exceptions and close codes shared by every layer of fastws."""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """RFC 6455 section 7.4 status codes (and the IANA registry additions)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005  # never on the wire: "the close frame had no code"
    ABNORMAL = 1006  # never on the wire: "TCP dropped without a close frame"
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015  # never on the wire


class WebSocketError(Exception):
    """Base class of every error fastws raises."""


class ProtocolError(WebSocketError):
    """The peer broke RFC 6455 (or a configured limit); close with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = int(code)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason} (close code {self.code})"


class PayloadTooBig(ProtocolError):
    """A frame or message exceeds the configured size limit (1009)."""

    def __init__(self, reason: str) -> None:
        super().__init__(CloseCode.MESSAGE_TOO_BIG, reason)


class HandshakeError(WebSocketError):
    """The opening handshake was refused; answer with ``status`` and ``reason``."""

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.headers = headers or []

    def __str__(self) -> str:
        return f"{self.status}: {self.reason}"


class ConnectionClosed(WebSocketError):
    """The connection is closed (or closing).

    ``code`` and ``reason`` say why: those of the first close frame, whichever
    side sent it (1005 if the peer's had no code, 1006 if TCP ended without
    one).  ``sent`` is (code, reason) of the close frame this side sent, or None.
    """

    def __init__(self, code: int, reason: str = "", sent: tuple[int, str] | None = None) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.sent = sent

    def __str__(self) -> str:
        return f"connection closed with code {self.code}" + (f": {self.reason}" if self.reason else "")
