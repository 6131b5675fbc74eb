"""Logging helpers: a flood of bad clients must not become a flood of log lines."""

from __future__ import annotations

import json
import logging
import time
from typing import Any


class Throttle:
    """Logs at most one line per ``interval`` seconds for each key; the next line says how many
    were left out in between."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` unless ``key`` was logged less than ``interval`` ago; True if logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return False
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            msg += " (and %d more like it in the last %.0f s)"
            args = (*args, dropped, now - last if last is not None else self.interval)
        self.logger.log(level, msg, *args)
        if len(self._last) > 1024:  # keys are few by design; never let them grow without bound
            self._last.clear()
            self._dropped.clear()
        return True


# -- formats -----------------------------------------------------------------------------------

# Attributes every LogRecord has: whatever else a record carries came in ``extra=`` (structured fields).
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, message, the fields given in ``extra=``
    (the access log's remote, path, close_code ...) and the traceback, if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


JsonFormatter.converter = time.gmtime  # type: ignore[assignment]
LOG_FORMATS = ("text", "json")


def configure(level: str = "info", fmt: str = "text", *, access_log: bool = False) -> None:
    """``fastws serve``'s logging: the ``fastws`` hierarchy to stderr, as text or JSON lines;
    ``fastws.access`` (the access log) silenced unless ``access_log``."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("fastws.access").disabled = not access_log


# -- the access log ------------------------------------------------------------------------------

access = logging.getLogger("fastws.access")


def log_session(session: Any, now: float) -> None:
    """The access line of a WebSocket connection that has ended."""
    messages_in, bytes_in, messages_out, bytes_out = session.traffic
    request = session.request
    fields = {
        "remote": session.remote, "method": request.method, "path": request.path, "status": 101,
        "subprotocol": session.subprotocol, "duration": round(now - session.opened_at, 6),
        "close_code": session.close_code, "closed_by": session.closed_by,
        "messages_in": messages_in, "bytes_in": bytes_in, "messages_out": messages_out, "bytes_out": bytes_out,
        "session": session.id,
    }
    access.info('%s "%s %s" 101 %s %.3fs close=%s/%s in=%d/%dB out=%d/%dB', fields["remote"], request.method,
                request.target, session.subprotocol or "-", fields["duration"], fields["close_code"],
                fields["closed_by"], fields["messages_in"], fields["bytes_in"], fields["messages_out"],
                fields["bytes_out"], extra=fields)


def log_refused(remote: str, request: Any, status: int, reason: str, duration: float) -> None:
    """The access line of a WebSocket upgrade that was refused (the reason is what the client read)."""
    fields = {"remote": remote, "method": request.method, "path": request.path, "status": status,
              "reason": reason, "duration": round(duration, 6)}
    access.info('%s "%s %s" %d %.3fs refused: %s', remote, request.method, request.target, status, duration,
                reason, extra=fields)
