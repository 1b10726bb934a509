"""Copy/move tasks on the client side: creating and querying them, and running
the ones the master assigns to this client.

Theory of operation
-------------------
Any client may ask the master for a task (``create_copy_task``,
``create_move_task``) and follow it (``query_task``).  The master queues it for
the client that owns the source replica's segment (``master/_tasks.py``): the
bytes are in that client's own registered memory.  Its heartbeat learns that
tasks wait (the ping reply counts them); :class:`TaskRunner` then takes them with
``FetchTasks`` and runs each on a small pool: ``CopyStart``/``MoveStart``
reserves the target buffers, the engine writes the source range into each
target (one transfer per target, straight from the segment, no copy here),
``CopyEnd``/``MoveEnd`` publishes the new replicas (a move also drops the
source), and ``MarkTaskToComplete`` reports.  A failed transfer revokes the
reservation.  NO_AVAILABLE_HANDLE is retried with a growing pause up to the
task's ``max_retry_attempts`` (the reference's rule); every other error fails the
task with its code and message.  After each task the runner asks for more at
once, so a drain job's next move does not wait for the next heartbeat.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from ..errors import MooncakeError, StoreError, store_error
from ..wire import _master_msgs as msg
from ..wire._master_reply_msgs import TaskAssignment
from ._client_io import transfer_failed
from ._types import ErrorCode, ReplicaDesc

if TYPE_CHECKING:
    from ._client import StoreClient

__all__ = ["TaskInfo", "TaskRunner", "TaskStatus", "TaskType"]

log = logging.getLogger("pymooncake.store")

#: tasks taken per FetchTasks (the reference's kTaskBatchSize)
FETCH_BATCH = 16
#: threads that run tasks (the reference's task thread pool is small too)
WORKERS = 2


class TaskType(IntEnum):
    REPLICA_COPY = 0
    REPLICA_MOVE = 1


class TaskStatus(IntEnum):
    PENDING = 0
    PROCESSING = 1
    FAILED = 2
    SUCCESS = 3


@dataclass(frozen=True)
class TaskInfo:
    """A task as ``query_task`` reports it (the reference's QueryTaskResponse)."""

    id: tuple[int, int]
    type: TaskType
    status: TaskStatus
    created_at_ms_epoch: int
    last_updated_at_ms_epoch: int
    #: a digest naming the client that runs the task (not its id)
    assigned_client: tuple[int, int]
    message: str

    @classmethod
    def from_wire(cls, value: dict[str, Any]) -> TaskInfo:
        hi, lo = value["id"]
        ahi, alo = value["assigned_client"]
        return cls(
            (int(hi), int(lo)),
            TaskType(value["type"]),
            TaskStatus(value["status"]),
            int(value["created_at_ms_epoch"]),
            int(value["last_updated_at_ms_epoch"]),
            (int(ahi), int(alo)),
            str(value["message"]),
        )

    @property
    def finished(self) -> bool:
        return self.status in (TaskStatus.SUCCESS, TaskStatus.FAILED)


class TaskRunner:
    """Runs the tasks the master assigns to one :class:`StoreClient`."""

    def __init__(self, client: StoreClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._running = 0
        self._closed = False
        self.completed = 0
        self.failed = 0

    def poll(self, waiting: int) -> None:
        """Fetch and start tasks when the master says ``waiting`` > 0 (the ping
        reply) and a worker is free."""
        if waiting <= 0:
            return
        with self._lock:
            if self._closed or self._running >= WORKERS:
                return
            free = WORKERS - self._running
        client = self._client
        try:
            tasks = client.master.call(
                msg.FetchTasks(client.client_id, min(FETCH_BATCH, max(free, 1))), patient=False
            )
        except MooncakeError as exc:
            log.warning("fetching copy/move tasks from the master failed: %s", exc)
            return
        for assignment in tasks.tasks:
            self._submit(assignment)

    def _submit(self, assignment: TaskAssignment) -> None:
        with self._lock:
            if self._closed:
                return
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    WORKERS, thread_name_prefix="mc-store-task"
                )
            self._running += 1
            self._pool.submit(self._run, assignment)

    def _run(self, assignment: TaskAssignment) -> None:
        try:
            self._execute(assignment)
        except Exception:  # a bug must not kill the worker silently
            log.exception("copy/move task %s failed unexpectedly", assignment.id)
        finally:
            with self._lock:
                self._running -= 1
        if not self._closed:
            self.poll(1)  # more work is likely (a drain job queues the next move)

    def _execute(self, a: TaskAssignment) -> None:
        client = self._client
        task_id = a.id
        move = a.type == TaskType.REPLICA_MOVE
        key, source, targets = a.key, a.source, a.targets
        retries, limit = 0, a.max_retry_attempts
        while True:
            try:
                self.replicate(key, source, targets, move=move)
                status, message = TaskStatus.SUCCESS, "Task completed successfully"
            except StoreError as exc:
                if exc.code == ErrorCode.NO_AVAILABLE_HANDLE and retries < limit:
                    retries += 1
                    time.sleep(0.05 * retries)
                    continue
                status, message = TaskStatus.FAILED, f"{exc.code}: {exc.message}"
            except MooncakeError as exc:
                status, message = TaskStatus.FAILED, f"{type(exc).__name__}: {exc}"
            break
        if status == TaskStatus.SUCCESS:
            self.completed += 1
        else:
            self.failed += 1
            log.warning(
                "%s task of %r from %s failed: %s", "move" if move else "copy", key, source, message
            )
        try:
            client.master.call(
                msg.MarkTaskToComplete(client.client_id, task_id, int(status), message)
            )
        except MooncakeError as exc:
            log.warning("reporting copy/move task of %r to the master failed: %s", key, exc)

    def replicate(self, key: str, source: str, targets: tuple[str, ...], *, move: bool) -> None:
        """Copy (or move) ``key``'s replica in ``source`` (a segment of this client)
        to ``targets``: reserve, write, publish; revoke when the write fails.

        Raises:
            StoreError: the master's refusal (its code), or StoreTransferFailed.
        """
        client = self._client
        cid = client.client_id
        if move:
            start = client.master.call(msg.MoveStart(cid, key, source, targets[0]))
        else:
            start = client.master.call(msg.CopyStart(cid, key, source, targets))
        src = ReplicaDesc.from_wire(start.source)
        dests = [ReplicaDesc.from_wire(t) for t in start.targets]
        if dests:
            try:
                self._write(src, dests)
            except MooncakeError:
                revoke = msg.MoveRevoke(cid, key) if move else msg.CopyRevoke(cid, key)
                try:
                    client.master.call(revoke)
                except MooncakeError as exc:
                    log.warning("revoking the copy of %r failed: %s", key, exc)
                raise
        client.master.call(msg.MoveEnd(cid, key) if move else msg.CopyEnd(cid, key))

    def _write(self, src: ReplicaDesc, dests: list[ReplicaDesc]) -> None:
        client = self._client
        engine = client.engine
        if src.endpoint != engine.segment_name:
            raise store_error(
                int(ErrorCode.REPLICA_NOT_IN_LOCAL_MEMORY),
                f"the source replica is in segment {src.endpoint!r}, not in this client's "
                f"{engine.segment_name!r}",
            )
        part = engine.local_span(src.address, src.size, writable=False)
        errors: list[BaseException | None] = [None] * len(dests)
        per_endpoint: dict[str, list[Any]] = {}
        for i, dest in enumerate(dests):
            client._route_parts(i, dest.endpoint, dest.address, [part], True, per_endpoint, errors)
        client._run_transfers(per_endpoint, errors)
        for dest, err in zip(dests, errors, strict=True):
            if err is not None:
                raise transfer_failed(
                    f"copying {src.size} bytes to segment {dest.endpoint!r} failed: {err}", err
                )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
