"""What the tests need that differs between Python versions (the package supports 3.10+)."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from asyncio import timeout as deadline
else:  # pragma: no cover - Python 3.10: asyncio.timeout is new in 3.11
    from async_timeout import timeout as deadline

__all__ = ["deadline"]
# Catch asyncio.TimeoutError, not the built-in TimeoutError: they are one class only from 3.11 on.
