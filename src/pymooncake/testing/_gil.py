"""Does a block of code give up the GIL?

A thread blocked in ``os.read`` on a pipe is made runnable (one byte written)
while the caller keeps the GIL, with the interpreter's switch interval raised so
that no forced hand-over happens; the caller then spins for a moment, so the
kernel has surely woken the thread, which now only waits for the GIL.  It can
run only when the block releases the GIL -- a socket call, ``select``, ``sleep``,
a lock wait.  This is how the tests check that calls beside a busy Python thread
do not pay the switch interval (``pymooncake/_heldio.py``).

A release is seen when it lasts long enough for the waiting thread to be
scheduled: any wait, but not always a release around a system call that
returns at once (the caller may take the GIL back first).  So a test repeats
the calls it checks; a block that keeps the GIL is never reported as releasing it.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .._heldio import held_function

__all__ = ["GilProbe", "gil_probe"]

_held_write = held_function(
    "write", (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t), ctypes.c_ssize_t
)


@dataclass
class GilProbe:
    #: set when the block ends: whether the waiting thread ran during it
    released: bool = False


@contextmanager
def gil_probe(settle_s: float = 0.05) -> Iterator[GilProbe]:
    """Context manager; afterwards ``probe.released`` says whether the block gave
    up the GIL (so that another thread of the process could run).

    Raises:
        AssertionError: the probe thread never ran, even after the block (the
            check itself failed).
    """
    rfd, wfd = os.pipe()
    ran: list[bool] = []
    thread = threading.Thread(target=lambda: ran.append(bool(os.read(rfd, 1))), daemon=True)
    thread.start()
    old = sys.getswitchinterval()
    probe = GilProbe()
    try:
        time.sleep(settle_s)  # the thread blocks in read (GIL released)
        sys.setswitchinterval(max(old, 5.0))  # no forced hand-over from here on
        # written with the GIL held (os.write gives it up: the woken thread could
        # take it before the block even starts)
        if _held_write(wfd, b"x", 1) != 1:
            raise OSError(ctypes.get_errno(), "gil_probe: cannot wake the probe thread")
        until = time.monotonic() + settle_s
        while time.monotonic() < until:  # the thread is woken and waits for the GIL
            pass
        yield probe
        probe.released = bool(ran)  # read before anything here can release the GIL
    finally:
        sys.setswitchinterval(old)
        thread.join(10)
        os.close(rfd)
        os.close(wfd)
    if not ran:
        raise AssertionError("gil_probe: the probe thread never ran")
