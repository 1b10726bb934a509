"""Batch and task bookkeeping (no I/O).

A batch has a fixed capacity chosen at allocation; submitting more requests
than it can hold raises ``TooManyRequests``; freeing it while a task is still
running raises ``BatchBusy`` -- both as the reference.  Completion is counted
per task; waiting uses a condition variable, so waiters sleep without holding
the GIL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import BatchBusy, InvalidArgument, TooManyRequests
from ..wire import NotifyMessage
from ._request import TaskState, TransferStatus

__all__ = ["Batch", "BatchTable"]


@dataclass(slots=True)
class _Task:
    length: int
    state: TaskState = TaskState.WAITING
    transferred: int = 0
    error: BaseException | None = None
    submitted_at: float = 0.0


@dataclass
class Batch:
    """One batch.  All methods are thread-safe."""

    id: int
    capacity: int
    tasks: list[_Task] = field(default_factory=list)
    #: (segment name, message) sent when the batch completes without failure
    notify: tuple[str, NotifyMessage] | None = None
    slice_timeout_s: float = -1.0
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _unfinished: int = 0
    on_complete: Callable[[Batch], None] | None = field(default=None, repr=False)

    def add(self, lengths: list[int]) -> range:
        """Reserve tasks for ``lengths``; returns their indices.

        Raises:
            TooManyRequests: capacity exceeded.
        """
        with self._cond:
            if len(self.tasks) + len(lengths) > self.capacity:
                raise TooManyRequests(
                    f"Exceed the limitation of batch capacity: batch {self.id} holds "
                    f"{self.capacity} requests, {len(self.tasks)} already submitted, "
                    f"{len(lengths)} more requested; allocate a larger batch"
                )
            start = len(self.tasks)
            now = time.monotonic()
            for n in lengths:
                self.tasks.append(_Task(n, TaskState.PENDING, submitted_at=now))
            self._unfinished += len(lengths)
            return range(start, start + len(lengths))

    def complete(self, index: int, error: BaseException | None) -> None:
        callback = None
        with self._cond:
            task = self.tasks[index]
            if task.state.terminal:
                return
            if error is None:
                task.state = TaskState.COMPLETED
                task.transferred = task.length
            else:
                task.state = TaskState.FAILED
                task.error = error
            self._unfinished -= 1
            if self._unfinished == 0:
                self._cond.notify_all()
                callback = self.on_complete
        if callback is not None:
            callback(self)

    def _effective(self, task: _Task) -> TaskState:
        if (
            task.state is TaskState.PENDING
            and self.slice_timeout_s > 0
            and time.monotonic() - task.submitted_at > self.slice_timeout_s
        ):
            return TaskState.TIMEOUT
        return task.state

    def task_status(self, index: int) -> TransferStatus:
        with self._cond:
            if not 0 <= index < len(self.tasks):
                raise InvalidArgument(
                    f"task {index} does not exist in batch {self.id} ({len(self.tasks)} submitted)"
                )
            task = self.tasks[index]
            return TransferStatus(self._effective(task), task.transferred)

    def status(self) -> TransferStatus:
        """COMPLETED when all tasks completed, FAILED as soon as one failed or
        timed out, else WAITING (reference ``getBatchTransferStatus``)."""
        with self._cond:
            total = sum(t.transferred for t in self.tasks)
            states = [self._effective(t) for t in self.tasks]
        if any(s in (TaskState.FAILED, TaskState.TIMEOUT) for s in states):
            return TransferStatus(TaskState.FAILED, total)
        if all(s is TaskState.COMPLETED for s in states):
            return TransferStatus(TaskState.COMPLETED, total)
        return TransferStatus(TaskState.WAITING, total)

    @property
    def finished(self) -> bool:
        with self._cond:
            return self._unfinished == 0

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every task is terminal; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._unfinished == 0, timeout)

    def errors(self) -> list[BaseException | None]:
        with self._cond:
            return [t.error for t in self.tasks]


class BatchTable:
    """Live batches by id.  Ids start at 1 (0 is the compat edge's failure value)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 1
        self._batches: dict[int, Batch] = {}

    def allocate(self, capacity: int, slice_timeout_s: float = -1.0) -> Batch:
        if capacity <= 0:
            raise InvalidArgument(f"batch capacity must be positive, got {capacity}")
        with self._lock:
            batch = Batch(self._next, capacity, slice_timeout_s=slice_timeout_s)
            self._batches[batch.id] = batch
            self._next += 1
        return batch

    def get(self, batch_id: int) -> Batch:
        with self._lock:
            batch = self._batches.get(batch_id)
        if batch is None:
            raise InvalidArgument(f"batch {batch_id} does not exist (never allocated or freed)")
        return batch

    def free(self, batch_id: int) -> None:
        batch = self.get(batch_id)
        if not batch.finished:
            raise BatchBusy(
                f"batch {batch_id} still has running tasks; wait for them before freeing it"
            )
        with self._lock:
            self._batches.pop(batch_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._batches)
