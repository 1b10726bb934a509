"""run_threads: an assertion in a thread fails the test that ran it."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from pymooncake.testing import run_threads


def test_every_target_runs_on_a_thread_of_its_own() -> None:
    seen: list[int] = []
    barrier = threading.Barrier(3, timeout=10)

    def target(n: int) -> None:
        barrier.wait()  # all three at once: three threads
        seen.append(n)

    run_threads([lambda n=n: target(n) for n in range(3)])
    assert sorted(seen) == [0, 1, 2]


def test_the_first_failure_is_raised_with_the_others_as_notes() -> None:
    def fails(text: str) -> None:
        raise AssertionError(text)

    with pytest.raises(AssertionError) as info:
        run_threads([lambda: fails("one"), lambda: time.sleep(0.05), lambda: fails("two")])
    first = str(info.value)
    other = "two" if first == "one" else "one"
    assert first in ("one", "two")
    if sys.version_info >= (3, 11):
        assert info.value.__notes__ == [f"another thread also failed: AssertionError({other!r})"]


def test_a_thread_still_running_after_the_timeout_is_reported() -> None:
    release = threading.Event()
    try:
        with pytest.raises(TimeoutError, match=r"1 of 2 threads still running after 0\.2 s"):
            run_threads([lambda: None, lambda: release.wait(10)], timeout_s=0.2)
    finally:
        release.set()
