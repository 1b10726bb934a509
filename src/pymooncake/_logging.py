"""Logging helpers: log the first failure of a cascade once, then count repeats."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

__all__ = ["RepeatLimiter"]


class RepeatLimiter:
    """Logs a message the first time its key is seen, then every ``every``-th repeat
    with the running count, so a failure storm stays readable.

    At most ``max_keys`` keys are remembered (the least recently seen is
    forgotten), so keys built from peer addresses cannot grow memory without
    bound; key by what an operator acts on (peer host and reason), never by
    something that changes per connection such as an ephemeral port.
    """

    def __init__(self, logger: logging.Logger, every: int = 1000, max_keys: int = 1024) -> None:
        self._log = logger
        self._every = every
        self._max_keys = max_keys
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._counts)

    def __call__(self, key: str, level: int, msg: str, *args: object) -> None:
        with self._lock:
            n = self._counts.get(key, 0) + 1
            self._counts[key] = n
            self._counts.move_to_end(key)
            if len(self._counts) > self._max_keys:
                self._counts.popitem(last=False)
        if n == 1:
            self._log.log(level, msg, *args)
        elif n % self._every == 0:
            self._log.log(level, msg + " (repeated %d times)", *args, n)

    def count(self, key: str) -> int:
        with self._lock:
            return self._counts.get(key, 0)
