"""Batch bookkeeping: capacity, busy, statuses, waits."""

from __future__ import annotations

import threading
import time

import pytest

from pymooncake.errors import BatchBusy, InvalidArgument, TooManyRequests
from pymooncake.transfer import TaskState
from pymooncake.transfer._batch import BatchTable


def test_capacity_and_statuses() -> None:
    table = BatchTable()
    batch = table.allocate(3)
    assert batch.id >= 1
    idx = batch.add([10, 20])
    assert list(idx) == [0, 1]
    assert batch.task_status(0).state is TaskState.PENDING
    assert batch.status().state is TaskState.WAITING
    with pytest.raises(TooManyRequests, match="capacity"):
        batch.add([1, 2])
    batch.complete(0, None)
    assert batch.task_status(0).state is TaskState.COMPLETED
    assert batch.task_status(0).transferred_bytes == 10
    with pytest.raises(BatchBusy):
        table.free(batch.id)
    batch.complete(1, RuntimeError("boom"))
    assert batch.task_status(1).state is TaskState.FAILED
    assert batch.status().state is TaskState.FAILED
    assert batch.status().transferred_bytes == 10
    table.free(batch.id)
    with pytest.raises(InvalidArgument):
        table.get(batch.id)


def test_completed_batch_and_double_completion() -> None:
    batch = BatchTable().allocate(2)
    batch.add([1, 1])
    batch.complete(0, None)
    batch.complete(1, None)
    batch.complete(1, RuntimeError("late"))  # ignored: already terminal
    assert batch.status().state is TaskState.COMPLETED
    assert batch.finished and batch.wait(0)


def test_wait_blocks_until_done() -> None:
    batch = BatchTable().allocate(1)
    batch.add([5])
    assert not batch.wait(0.01)
    t = threading.Timer(0.05, batch.complete, args=(0, None))
    t.start()
    assert batch.wait(5)
    t.join()


def test_slice_timeout() -> None:
    batch = BatchTable().allocate(1, slice_timeout_s=0.01)
    batch.add([5])
    time.sleep(0.03)
    assert batch.task_status(0).state is TaskState.TIMEOUT
    assert batch.status().state is TaskState.FAILED


def test_bad_arguments() -> None:
    table = BatchTable()
    with pytest.raises(InvalidArgument):
        table.allocate(0)
    batch = table.allocate(1)
    with pytest.raises(InvalidArgument):
        batch.task_status(3)
    on = []
    batch.on_complete = on.append
    batch.add([1])
    batch.complete(0, None)
    assert on == [batch]
