"""Driving the project's commands as subprocesses: which executable, and their
start-up lines read from a pipe without ever blocking past a deadline."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["console_command", "read_stdout_until", "wait_until"]


def wait_until(cond: Callable[[], object], timeout_s: float = 10.0, step_s: float = 0.01) -> bool:
    """Poll ``cond`` every ``step_s`` until it is true or ``timeout_s`` passed (a
    bounded wait for something another thread or process does).  Returns whether
    it became true; it is asked once more at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step_s)
    return bool(cond())


def console_command(name: str, module: str) -> list[str]:
    """The console script ``name`` installed next to this interpreter, or
    ``python -m module`` when the package is not installed."""
    script = Path(sys.executable).with_name(name)
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", module]


def read_stdout_until(
    proc: subprocess.Popen[bytes],
    ready: re.Pattern[str] | None = None,
    timeout_s: float = 15.0,
) -> list[str]:
    """``proc``'s stdout lines (without newlines) up to and including the first
    that ``ready`` matches (``re.match``), or just the first line when ``ready``
    is None.

    Reads one byte at a time, so nothing after that line is taken from the pipe.

    Raises:
        TimeoutError: no such line within ``timeout_s``.
        EOFError: stdout closed first (the process's stderr, if piped, is quoted).
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    lines: list[str] = []
    line = bytearray()
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"no {'ready ' if ready else ''}line within {timeout_s:g} s; "
                f"read so far: {lines!r} + {bytes(line)!r}"
            )
        if not select.select([fd], [], [], remaining)[0]:
            continue
        byte = os.read(fd, 1)
        if not byte:
            err = ""
            if proc.stderr is not None and proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace")
            raise EOFError(
                f"stdout closed (exit {proc.poll()}) after {lines!r} + {bytes(line)!r}: {err}"
            )
        if byte != b"\n":
            line += byte
            continue
        lines.append(line.decode())
        line.clear()
        if ready is None or ready.match(lines[-1]):
            return lines
