"""Run a few callables on threads of their own and fail like a plain call would."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

__all__ = ["run_threads"]


def run_threads(targets: Iterable[Callable[[], object]], timeout_s: float = 60.0) -> None:
    """Start one thread per callable in ``targets``, wait for all of them, and
    raise what the first one to fail raised (the others' failures attached as
    notes on Python 3.11+): an assertion inside a thread fails the test that ran it.

    Raises:
        TimeoutError: a thread was still running after ``timeout_s`` (in all).
        BaseException: the first exception a target raised.
    """
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(target: Callable[[], object]) -> None:
        try:
            target()
        except BaseException as exc:  # (re-raised in the caller's thread)
            with lock:
                errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(t,), name=f"run_threads-{i}", daemon=True)
        for i, t in enumerate(targets)
    ]
    for thread in threads:
        thread.start()
    end = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    if errors:
        first = errors[0]
        add_note = getattr(first, "add_note", None)  # (Python 3.11+)
        if add_note is not None:
            for other in errors[1:]:
                add_note(f"another thread also failed: {other!r}")
        raise first
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        raise TimeoutError(
            f"{len(stuck)} of {len(threads)} threads still running after {timeout_s:g} s "
            f"({', '.join(stuck)}): a call in them is blocked"
        )
