"""The master's copy/move task queue (the reference's ``ClientTaskManager``).

Theory of operation
-------------------
``CreateCopyTask`` / ``CreateMoveTask`` (or a drain job, ``_drain.py``) submit a
:class:`Task` for the client that owns the source replica's segment: that client
has the bytes in its own registered memory and pushes them to the targets with
its transfer engine (as the reference's ``Client::ExecuteTask``).  The client
learns of work through its heartbeat (the ping reply counts its pending tasks),
takes up to a batch with ``FetchTasks`` (PENDING -> PROCESSING), runs each
through ``CopyStart``/``MoveStart`` .. ``*End`` (``_replicate.py``) and reports
with ``MarkTaskToComplete`` (SUCCESS or FAILED).

Limits and timeouts are the reference's: at most ``max_total_pending_tasks``
pending (TASK_PENDING_LIMIT_EXCEEDED beyond), at most
``max_total_processing_tasks`` handed out at once, a pending task older than
``pending_task_timeout`` or a processing one silent for
``processing_task_timeout`` fails, and the last ``max_total_finished_tasks``
finished tasks stay queryable.

Pure: times come in as ``now`` (monotonic seconds); the epoch milliseconds that
``QueryTask`` reports are ``wall_offset + now``.  Changes are emitted as effects
(:class:`TaskSubmitted`, :class:`TaskStarted`, :class:`TaskFinished`) so that a
journal restores the queue and standbys mirror it.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from enum import IntEnum
from typing import Any

from ...errors import StoreError, store_error
from .._config import MasterConfig
from .._types import ErrorCode
from ._effects import Effect, TaskFinished, TaskStarted, TaskSubmitted

__all__ = ["Task", "TaskId", "TaskQueue", "TaskStatus", "TaskType", "client_uuid"]

#: the reference's UUID: a pair of unsigned 64-bit integers
TaskId = tuple[int, int]


class TaskType(IntEnum):
    """``TaskType`` of the reference (``task_manager.h``)."""

    REPLICA_COPY = 0
    REPLICA_MOVE = 1


class TaskStatus(IntEnum):
    """``TaskStatus`` of the reference, in its order."""

    PENDING = 0
    PROCESSING = 1
    FAILED = 2
    SUCCESS = 3


_FINISHED = (TaskStatus.FAILED, TaskStatus.SUCCESS)


def client_uuid(client_id: str) -> TaskId:
    """How a task names the client that runs it: a digest of the client id, never
    the id itself (the id is the credential of that client's segments)."""
    d = hashlib.blake2s(client_id.encode(errors="replace"), digest_size=16).digest()
    return int.from_bytes(d[:8], "big"), int.from_bytes(d[8:], "big")


def _err(code: ErrorCode, message: str) -> StoreError:
    return store_error(int(code), message)


class Task:
    """One copy or move of one key."""

    __slots__ = (
        "client",
        "created_ms",
        "id",
        "key",
        "message",
        "source",
        "started",
        "status",
        "targets",
        "type",
        "updated",
        "updated_ms",
    )

    def __init__(
        self,
        task_id: TaskId,
        kind: TaskType,
        key: str,
        source: str,
        targets: tuple[str, ...],
        client: str,
        created_ms: int,
        now: float,
    ) -> None:
        self.id = task_id
        self.type = kind
        self.key = key
        self.source = source
        self.targets = targets
        #: the client that runs it (owner of the source segment)
        self.client = client
        self.status = TaskStatus.PENDING
        self.message = ""
        self.created_ms = created_ms
        self.updated_ms = created_ms
        #: monotonic times of creation and of the last change (timeouts)
        self.started = now
        self.updated = now

    @property
    def finished(self) -> bool:
        return self.status in _FINISHED

    def assignment(self, max_retry_attempts: int) -> dict[str, Any]:
        """What ``FetchTasks`` hands the client (the reference's TaskAssignment)."""
        return {
            "id": list(self.id),
            "type": int(self.type),
            "key": self.key,
            "source": self.source,
            "targets": list(self.targets),
            "created_at_ms_epoch": self.created_ms,
            "max_retry_attempts": max_retry_attempts,
        }

    def query(self) -> dict[str, Any]:
        """The reference's QueryTaskResponse."""
        return {
            "id": list(self.id),
            "type": int(self.type),
            "status": int(self.status),
            "created_at_ms_epoch": self.created_ms,
            "last_updated_at_ms_epoch": self.updated_ms,
            "assigned_client": list(client_uuid(self.client)),
            "message": self.message,
        }


class TaskQueue:
    """Tasks by id, pending queues per client, processing sets, finished history."""

    def __init__(self, config: MasterConfig, emit: Callable[[Effect], None]) -> None:
        self.config = config
        self._emit = emit
        self.tasks: dict[TaskId, Task] = {}
        self.pending: dict[str, deque[TaskId]] = {}
        self.processing: dict[str, set[TaskId]] = {}
        self.finished: deque[TaskId] = deque()
        self.n_pending = 0
        self.n_processing = 0
        #: epoch seconds minus monotonic seconds (set by the service; 0 in tests)
        self.wall_offset = 0.0
        #: finished-task callbacks (drain jobs follow their moves)
        self.listeners: list[Callable[[Task], None]] = []
        self._next_expire = 0.0

    def _ms(self, now: float) -> int:
        return int((self.wall_offset + now) * 1000)

    # --- submission and hand-out ---------------------------------------------------------

    def submit(
        self,
        kind: TaskType,
        key: str,
        source: str,
        targets: tuple[str, ...],
        client: str,
        now: float,
    ) -> Task:
        """Queue a task for ``client``.

        Raises:
            StoreError(TASK_PENDING_LIMIT_EXCEEDED): ``max_total_pending_tasks`` reached.
        """
        limit = self.config.max_total_pending_tasks
        if self.n_pending >= limit:
            raise _err(
                ErrorCode.TASK_PENDING_LIMIT_EXCEEDED,
                f"{self.n_pending} copy/move tasks are pending (--max_total_pending_tasks="
                f"{limit}); wait for them to run or raise the limit",
            )
        task_id = self._new_id()
        task = Task(task_id, kind, key, source, targets, client, self._ms(now), now)
        self._emit(TaskSubmitted(task_id, int(kind), key, source, targets, client, task.created_ms))
        self._add(task)
        return task

    def _new_id(self) -> TaskId:
        while True:
            n = uuid.uuid4().int
            task_id = (n >> 64, n & ((1 << 64) - 1))
            if task_id not in self.tasks:
                return task_id

    def _add(self, task: Task) -> None:
        self.tasks[task.id] = task
        if task.status == TaskStatus.PENDING:
            self.pending.setdefault(task.client, deque()).append(task.id)
            self.n_pending += 1
        elif task.status == TaskStatus.PROCESSING:
            self.processing.setdefault(task.client, set()).add(task.id)
            self.n_processing += 1
        else:
            self.finished.append(task.id)

    def pending_for(self, client: str) -> int:
        queue = self.pending.get(client)
        return len(queue) if queue else 0

    def pop(self, client: str, batch: int, now: float) -> list[Task]:
        """Hand up to ``batch`` of ``client``'s pending tasks out (PROCESSING)."""
        queue = self.pending.get(client)
        out: list[Task] = []
        if not queue:
            return out
        limit = self.config.max_total_processing_tasks
        while queue and len(out) < batch and self.n_processing < limit:
            task = self.tasks.get(queue.popleft())
            self.n_pending -= 1
            if task is None or task.status != TaskStatus.PENDING:
                continue
            self._start(task, now)
            out.append(task)
        if not queue:
            del self.pending[client]
        return out

    def _start(self, task: Task, now: float) -> None:
        task.status = TaskStatus.PROCESSING
        task.updated = now
        task.updated_ms = self._ms(now)
        self.processing.setdefault(task.client, set()).add(task.id)
        self.n_processing += 1
        self._emit(TaskStarted(task.id, task.updated_ms))

    # --- completion ----------------------------------------------------------------------

    def complete(
        self, client: str, task_id: TaskId, status: TaskStatus, message: str, now: float
    ) -> None:
        """The client reports the outcome of a task it was handed.

        Raises:
            InvalidParams: ``status`` is not SUCCESS or FAILED.
            StoreError(TASK_NOT_FOUND): unknown (or long forgotten) task.
            StoreError(ILLEGAL_CLIENT): another client's task.
        """
        if status not in _FINISHED:
            raise _err(
                ErrorCode.INVALID_PARAMS,
                f"a task completes as SUCCESS or FAILED, not {TaskStatus(status).name}",
            )
        task = self.tasks.get(task_id)
        if task is None:
            raise _err(ErrorCode.TASK_NOT_FOUND, f"task {format_id(task_id)} is not known")
        if task.client != client:
            raise _err(
                ErrorCode.ILLEGAL_CLIENT,
                f"task {format_id(task_id)} was assigned to another client",
            )
        if task.finished:
            return  # a repeated report, or the task timed out meanwhile
        self._finish(task, status, message, now)

    def _finish(self, task: Task, status: TaskStatus, message: str, now: float) -> None:
        if task.status == TaskStatus.PROCESSING:
            procs = self.processing.get(task.client)
            if procs is not None and task.id in procs:
                procs.discard(task.id)
                self.n_processing -= 1
                if not procs:
                    del self.processing[task.client]
        elif task.status == TaskStatus.PENDING:
            queue = self.pending.get(task.client)
            if queue is not None and task.id in queue:
                queue.remove(task.id)
                self.n_pending -= 1
                if not queue:
                    del self.pending[task.client]
        task.status = status
        task.message = message
        task.updated = now
        task.updated_ms = self._ms(now)
        self.finished.append(task.id)
        self._emit(TaskFinished(task.id, int(status), message, task.updated_ms))
        for listener in self.listeners:
            listener(task)

    def fail_client(self, client: str, message: str, now: float) -> None:
        """Fail every unfinished task of ``client`` (it expired or went away)."""
        ids = list(self.pending.get(client, ())) + list(self.processing.get(client, ()))
        for task_id in ids:
            task = self.tasks.get(task_id)
            if task is not None and not task.finished:
                self._finish(task, TaskStatus.FAILED, message, now)

    def expire(self, now: float) -> None:
        """Fail timed-out tasks and forget the oldest finished ones (at most once
        a second: timeouts are whole seconds)."""
        if now < self._next_expire:
            return
        self._next_expire = now + 1.0
        pending_s = self.config.pending_task_timeout_s
        if pending_s > 0 and self.n_pending:
            for client in list(self.pending):
                # a client's queue is in creation order: stop at the first young task
                for task_id in list(self.pending.get(client, ())):
                    task = self.tasks.get(task_id)
                    if task is None:
                        continue
                    if now - task.started <= pending_s:
                        break
                    self._finish(task, TaskStatus.FAILED, "pending timeout", now)
        processing_s = self.config.processing_task_timeout_s
        if processing_s > 0 and self.n_processing:
            for client in list(self.processing):
                for task_id in list(self.processing.get(client, ())):
                    task = self.tasks.get(task_id)
                    if task is not None and now - task.updated > processing_s:
                        self._finish(task, TaskStatus.FAILED, "processing timeout", now)
        keep = self.config.max_total_finished_tasks
        while len(self.finished) > keep:
            self.tasks.pop(self.finished.popleft(), None)

    def after_restart(self, now: float) -> None:
        """Journal replay: the copies in flight were not journaled, so a task that
        was processing cannot end well; fail it (its client's report is then a
        no-op).  Pending tasks are handed out again; their timeouts start now."""
        for client in list(self.processing):
            for task_id in list(self.processing.get(client, ())):
                task = self.tasks.get(task_id)
                if task is not None:
                    self._finish(
                        task,
                        TaskStatus.FAILED,
                        "the master restarted while the task was processing; create it again",
                        now,
                    )
        for task in self.tasks.values():
            if task.status == TaskStatus.PENDING:
                task.started = task.updated = now

    def query(self, task_id: TaskId) -> Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise _err(
                ErrorCode.TASK_NOT_FOUND,
                f"task {format_id(task_id)} is not known (never created, or one of more than "
                f"--max_total_finished_tasks={self.config.max_total_finished_tasks} finished "
                "tasks and forgotten)",
            )
        return task

    # --- effects -------------------------------------------------------------------------

    def apply_submitted(self, ev: TaskSubmitted, now: float) -> None:
        if ev.task_id in self.tasks:
            return
        task = Task(
            ev.task_id,
            TaskType(ev.kind),
            ev.key,
            ev.source,
            ev.targets,
            ev.client,
            ev.created_ms,
            now,
        )
        self._add(task)

    def apply_started(self, ev: TaskStarted, now: float) -> None:
        task = self.tasks.get(ev.task_id)
        if task is None or task.status != TaskStatus.PENDING:
            return
        queue = self.pending.get(task.client)
        if queue is not None and task.id in queue:
            queue.remove(task.id)
            self.n_pending -= 1
            if not queue:
                del self.pending[task.client]
        task.status = TaskStatus.PROCESSING
        task.updated = now
        task.updated_ms = ev.updated_ms
        self.processing.setdefault(task.client, set()).add(task.id)
        self.n_processing += 1

    def apply_finished(self, ev: TaskFinished, now: float) -> None:
        task = self.tasks.get(ev.task_id)
        if task is None or task.finished:
            return
        listeners, self.listeners = self.listeners, []
        emit, self._emit = self._emit, _drop
        try:
            self._finish(task, TaskStatus(ev.status), ev.message, now)
        finally:
            self.listeners, self._emit = listeners, emit
        task.updated_ms = ev.updated_ms
        keep = self.config.max_total_finished_tasks
        while len(self.finished) > keep:
            self.tasks.pop(self.finished.popleft(), None)

    def snapshot(self) -> Iterable[Effect]:
        """The queue as effects (journal compaction, a standby's initial state)."""
        for task in self.tasks.values():
            yield TaskSubmitted(
                task.id,
                int(task.type),
                task.key,
                task.source,
                task.targets,
                task.client,
                task.created_ms,
            )
            if task.status != TaskStatus.PENDING:
                yield TaskStarted(task.id, task.updated_ms)
            if task.finished:
                yield TaskFinished(task.id, int(task.status), task.message, task.updated_ms)

    def validate(self) -> None:
        pending = sum(len(q) for q in self.pending.values())
        assert pending == self.n_pending, "pending-task count disagrees"
        processing = sum(len(s) for s in self.processing.values())
        assert processing == self.n_processing, "processing-task count disagrees"
        for client, queue in self.pending.items():
            for task_id in queue:
                task = self.tasks[task_id]
                assert task.status == TaskStatus.PENDING and task.client == client
        for client, ids in self.processing.items():
            for task_id in ids:
                task = self.tasks[task_id]
                assert task.status == TaskStatus.PROCESSING and task.client == client


def _drop(effect: Effect) -> None:
    pass


def format_id(task_id: TaskId) -> str:
    """The reference's text form of a UUID: ``"<first>-<second>"`` in decimal."""
    return f"{task_id[0]}-{task_id[1]}"


def parse_id(text: str) -> TaskId | None:
    """Inverse of :func:`format_id` (None: not of that form)."""
    first, sep, second = text.partition("-")
    if not sep or not first.isdigit() or not second.isdigit():
        return None
    hi, lo = int(first), int(second)
    if hi >= 1 << 64 or lo >= 1 << 64:
        return None
    return hi, lo
