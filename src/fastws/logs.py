"""Logging helpers: a flood of bad clients must not become a flood of log lines."""

from __future__ import annotations

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
