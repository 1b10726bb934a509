"""Progress of long-running commands, the way terminal users expect it.

On a terminal (the stream is a TTY) :class:`Progress` keeps one status line
that it rewrites in place (``\\r`` + text + erase-to-end-of-line), at most
every ``interval_s``; on a terminal that cannot do that (``TERM=dumb``) it
prints periodic lines instead.  When the stream is not a terminal -- a pipe,
a file, CI logs -- it prints nothing, so machine-read output stays exactly
as before.  ``PYMOONCAKE_PROGRESS=1`` forces periodic lines (``tee``,
``script``), ``=0`` silences it.  Results never go through it: they are printed to stdout by the
command as always; progress goes to stderr.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TextIO

__all__ = ["Progress"]

_ERASE_EOL = "\x1b[K"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


class Progress:
    """A status line on ``stream`` (stderr by default).

    Args:
        stream: where to write.
        interval_s: the least time between two updates (a final
            :meth:`update` with ``force=True`` always shows).
        env: the environment: ``TERM`` (in-place or periodic lines),
            ``PYMOONCAKE_PROGRESS`` (1 forces, 0 silences).
        clock: monotonic seconds.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        interval_s: float = 0.25,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        env = os.environ if env is None else env
        terminal = _is_terminal(self._stream)
        forced = env.get("PYMOONCAKE_PROGRESS", "").strip()
        self.enabled = forced == "1" if forced in ("0", "1") else terminal
        self.in_place = self.enabled and terminal and env.get("TERM", "") != "dumb"
        self._interval = interval_s if self.in_place else max(interval_s, 2.0)
        self._clock = clock
        self._last = -math.inf
        self._showing = False

    def update(self, text: str, *, force: bool = False) -> None:
        """Show ``text`` as the current status (throttled unless ``force``)."""
        if not self.enabled:
            return
        now = self._clock()
        if not force and now - self._last < self._interval:
            return
        self._last = now
        if self.in_place:
            self._stream.write("\r" + text + _ERASE_EOL)
            self._showing = True
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def clear(self) -> None:
        """Erase the status line (before normal output continues)."""
        if self._showing:
            self._stream.write("\r" + _ERASE_EOL)
            self._stream.flush()
            self._showing = False

    def step(self, text: str) -> None:
        """A start-up step: shown at once, replaced by the next one."""
        self.update(text + " ...", force=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.clear()
