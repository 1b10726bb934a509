"""Automatic garbage collection held off during large batch calls
(``pymooncake/_gcpause.py``): the collector's state is restored exactly, pauses
from several threads nest, and a client putting large batches no longer makes
the process run full collections."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from pymooncake import _gcpause
from pymooncake._gcpause import GC_PAUSE_MIN_ITEMS, gc_paused
from pymooncake.store import StoreClient
from pymooncake.testing import ProcessCluster

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _collector_back_on() -> Iterator[None]:
    was = gc.isenabled()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()


def test_small_batches_leave_the_collector_alone() -> None:
    gc.enable()
    with gc_paused(GC_PAUSE_MIN_ITEMS - 1):
        assert gc.isenabled()
    assert gc.isenabled()


def test_a_large_batch_pauses_it_and_restores_it() -> None:
    gc.enable()
    with gc_paused(1000):
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_the_process_had_off_stays_off() -> None:
    gc.disable()
    with gc_paused(1000):
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_an_exception_restores_it() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), gc_paused(1000):
        raise RuntimeError("the batch failed")
    assert gc.isenabled()


def test_overlapping_pauses_of_two_threads_end_with_the_last() -> None:
    gc.enable()
    inside = threading.Event()
    release = threading.Event()
    seen: list[bool] = []

    def other() -> None:
        with gc_paused(1000):
            inside.set()
            release.wait(10)
        seen.append(gc.isenabled())

    t = threading.Thread(target=other)
    with gc_paused(1000):
        t.start()
        assert inside.wait(10)
    # this thread's pause ended, the other's has not: still off
    assert not gc.isenabled()
    release.set()
    t.join(10)
    assert seen == [True] and gc.isenabled()


def _full_collections(client: StoreClient, prefix: str, batches: int) -> int:
    """Full collections this process ran while ``client`` put and got ``batches``
    batches of 1,000 64-byte values."""
    full: list[int] = []

    def count(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(1)

    value = [b"v" * 64]
    keys = [[f"{prefix}{b}-{i}" for i in range(1000)] for b in range(batches)]
    gc.collect()
    gc.callbacks.append(count)
    try:
        for batch in keys:
            assert client.put_many(batch, [value] * len(batch)) == [True] * len(batch)
            assert client.get_many(batch) == [value[0]] * len(batch)
    finally:
        gc.callbacks.remove(count)
    return len(full)


def test_large_batch_puts_and_gets_run_few_full_collections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The case that motivated the pause: a client putting and getting batches of
    1,000 small values (master and storage node in their own processes).  Its
    objects promoted mid-batch made this process run a full collection every
    dozen batches (11 in 120 batches when measured); with the pause, none or one
    (the heartbeat's and the test's own allocations between batches)."""
    gc.enable()
    with ProcessCluster() as cluster:
        cluster.node("64 MB")
        client = StoreClient(cluster.client_config(local_buffer_size=4 * MiB))
        try:
            with monkeypatch.context() as m:
                m.setattr(_gcpause, "GC_PAUSE_MIN_ITEMS", 10**9)  # never pause
                unpaused = _full_collections(client, "u", 60)
            paused = _full_collections(client, "p", 60)
        finally:
            client.close()
    assert unpaused >= 4, unpaused  # (the baseline the pause is measured against)
    assert paused <= 2 and paused * 4 <= unpaused, (paused, unpaused)
