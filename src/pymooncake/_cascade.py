"""Failure cascades: log the first failure with its cause, then count the repeats.

A dead peer fails every request sent to it; a stopped master fails every
RPC.  Logging each failure buries the first one -- the only one that says
what happened (the troubleshooting guide: "locate the first occurrence of
the error").  :class:`CascadeLog` groups failures by their *root cause*
(the innermost pymooncake error: the first failed request of a batch, the
``__cause__`` chain), logs the first of each group in full, counts the
rest, and reports the count:

* every ``every``-th repeat ("... 1000 more failures with the same cause");
* when the same cause comes back after ``quiet_s`` without failures, the new
  episode is logged in full with the previous episode's count;
* on :meth:`flush` (closing the engine or the store), for each cause with
  unreported repeats.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .errors import MooncakeError, TransferFailed

__all__ = ["CascadeLog", "root_cause"]


def root_cause(exc: BaseException) -> BaseException:
    """The innermost pymooncake error behind ``exc``: the first failed request of
    a :class:`TransferFailed`, else the ``__cause__`` chain."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt: BaseException | None = None
        if isinstance(exc, TransferFailed):
            nxt = next((e for e in exc.errors if e is not None), None)
        elif isinstance(exc.__cause__, MooncakeError):
            nxt = exc.__cause__
        if nxt is None:
            return exc
        exc = nxt
    return exc


@dataclass
class _Episode:
    total: int  # failures with this cause, ever
    unreported: int  # repeats not yet reported in a log line
    last: float  # clock of the last failure


class CascadeLog:
    """Groups failures by root cause; see the module docstring.

    Args:
        logger: where the lines go.
        every: report the running count every this many repeats.
        quiet_s: a cause silent this long starts a new episode.
        max_causes: causes remembered (least recently seen forgotten).
        clock: seconds, monotonic.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        every: int = 1000,
        quiet_s: float = 60.0,
        max_causes: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._every = every
        self._quiet = quiet_s
        self._max = max_causes
        self._clock = clock
        self._lock = threading.Lock()
        self._episodes: OrderedDict[str, _Episode] = OrderedDict()

    @staticmethod
    def key(exc: BaseException) -> str:
        root = root_cause(exc)
        return f"{type(root).__name__}: {root}"

    def failed(self, what: str, exc: BaseException, level: int = logging.ERROR) -> None:
        """Record that ``what`` failed with ``exc``; log it if it starts a cascade."""
        key = self.key(exc)
        now = self._clock()
        report = 0
        previous: int | None  # None: a repeat; else a new episode (and the last one's count)
        with self._lock:
            ep = self._episodes.get(key)
            if ep is None:
                ep = self._episodes[key] = _Episode(0, 0, now)
                if len(self._episodes) > self._max:
                    self._episodes.popitem(last=False)
                previous = -1
            else:
                self._episodes.move_to_end(key)
                previous = ep.unreported if now - ep.last >= self._quiet else None
            ep.total += 1
            ep.last = now
            if previous is None:  # a repeat within the episode
                ep.unreported += 1
                report = ep.unreported if ep.unreported >= self._every else 0
                if report:
                    ep.unreported = 0
            else:
                ep.unreported = 0
        if previous is not None:
            suffix = (
                f" ({previous} more failure(s) with this cause earlier were not logged one by one)"
                if previous > 0
                else ""
            )
            self._log.log(level, "%s failed: %s%s", what, str(exc), suffix)  # no traceback kept
        elif report:
            self._log.log(
                level,
                "%s: %d more failure(s) with the same cause since the last report: %s",
                what,
                report,
                key,
            )

    def count(self, exc_or_key: BaseException | str) -> int:
        """Failures recorded for a cause (its exception, or :meth:`key`)."""
        key = exc_or_key if isinstance(exc_or_key, str) else self.key(exc_or_key)
        with self._lock:
            ep = self._episodes.get(key)
            return ep.total if ep else 0

    def flush(self, level: int = logging.WARNING) -> None:
        """Log the count of every cause with repeats not yet reported."""
        with self._lock:
            pending = [(k, ep.unreported) for k, ep in self._episodes.items() if ep.unreported]
            for k, _ in pending:
                self._episodes[k].unreported = 0
        for key, n in pending:
            self._log.log(
                level, "%d more failure(s) with the same cause were not logged: %s", n, key
            )
