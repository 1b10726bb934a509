"""Logging helpers: log the first failure of a cascade once, then count repeats."""

from __future__ import annotations

import logging
import threading

__all__ = ["RepeatLimiter"]


class RepeatLimiter:
    """Logs a message the first time its key is seen, then every ``every``-th repeat
    with the running count, so a failure storm stays readable."""

    def __init__(self, logger: logging.Logger, every: int = 1000) -> None:
        self._log = logger
        self._every = every
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str, level: int, msg: str, *args: object) -> None:
        with self._lock:
            n = self._counts.get(key, 0) + 1
            self._counts[key] = n
        if n == 1:
            self._log.log(level, msg, *args)
        elif n % self._every == 0:
            self._log.log(level, msg + " (repeated %d times)", *args, n)

    def count(self, key: str) -> int:
        with self._lock:
            return self._counts.get(key, 0)
