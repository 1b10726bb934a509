"""Drain jobs: empty segments before maintenance (the reference's ``CreateDrainJob``).

Theory of operation
-------------------
``POST /api/v1/drain_jobs {segments, target_segments, max_concurrency}`` (admin
HTTP, ``_admin.py``) marks the named segments DRAINING: placement skips them from
then on (``SegmentRecord.draining``), so new puts land elsewhere, while their
replicas stay readable.  The job then moves every object with a replica in a
draining segment to a target (the least used of ``target_segments``, or of every
open segment when none is given, that holds no replica of it yet), as ordinary
move tasks (``_tasks.py``) run by the segment's owner, at most
``max_concurrency`` at a time.  A unit (key, segment) whose move failed is
retried up to three times (the reference's ``kMaxDrainUnitRetries``); objects
being written, replaced or copied are *blocked* and retried later.  When no
replica is left in them the segments are DRAINED (still no new replicas; the
owner may unmount) and the job SUCCEEDED; if only units that failed for good are
left, the job FAILED and the segments are OK again.  Cancelling (only while no
move is in flight, as the reference) makes them OK.

Unlike the reference a leased object is not blocked: a move releases the old
buffer only after the read leases have expired (``_replicate.py``), so readers
are safe and a drain under a steady read load still finishes.

Scheduling runs every ``tick`` (at most every :data:`STEP_INTERVAL_S`) and right
when one of the job's moves finishes, so the next move is queued before the
client asks for more work.  Jobs are effects (:class:`DrainCreated`,
:class:`DrainEnded`): after a journal restart or a failover an unfinished job
resumes (its counters start again from zero).
"""

from __future__ import annotations

import uuid
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Final

from ...errors import StoreError, store_error
from .._types import ErrorCode
from ._effects import DrainCreated, DrainEnded, Effect
from ._records import BUSY, READABLE, TASK, Obj, SegmentRecord
from ._tasks import Task, TaskId, TaskStatus, format_id

if TYPE_CHECKING:
    from ._state import MasterState

__all__ = ["DrainJob", "DrainJobs", "JobStatus", "SegmentStatus"]

#: the reference's kMaxDrainUnitRetries
MAX_UNIT_RETRIES: Final = 3
#: the reference's kJobDispatchThreadSleepMs
STEP_INTERVAL_S: Final = 0.5
#: most segments / targets one job names
MAX_JOB_SEGMENTS: Final = 4096


class JobStatus(IntEnum):
    CREATED = 0
    PLANNING = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELED = 5


_ENDED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class SegmentStatus(IntEnum):
    """``SegmentStatus`` of the reference (``segment.h``)."""

    UNDEFINED = 0
    OK = 1
    DRAINING = 2
    DRAINED = 3
    GRACEFULLY_UNMOUNTING = 4
    UNMOUNTING = 5


def _err(code: ErrorCode, message: str) -> StoreError:
    return store_error(int(code), message)


Unit = tuple[str, str]  # (key, source segment name)


class DrainJob:
    __slots__ = (
        "active",
        "blocked",
        "completed",
        "created_ms",
        "failed",
        "id",
        "max_concurrency",
        "message",
        "migrated_bytes",
        "retries",
        "segments",
        "status",
        "succeeded",
        "targets",
        "terminal",
        "updated_ms",
    )

    def __init__(
        self,
        job_id: TaskId,
        segments: tuple[str, ...],
        targets: tuple[str, ...],
        max_concurrency: int,
        created_ms: int,
    ) -> None:
        self.id = job_id
        self.segments = segments
        self.targets = targets
        self.max_concurrency = max_concurrency
        self.status = JobStatus.CREATED
        self.created_ms = self.updated_ms = created_ms
        self.message = "Drain job created"
        self.succeeded = self.failed = self.blocked = self.migrated_bytes = 0
        #: move task id -> (unit, bytes)
        self.active: dict[TaskId, tuple[Unit, int]] = {}
        self.completed: set[Unit] = set()
        self.terminal: set[Unit] = set()
        self.retries: dict[Unit, int] = {}

    @property
    def ended(self) -> bool:
        return self.status in _ENDED

    def query(self) -> dict[str, Any]:
        """The reference's HTTP answer to ``/api/v1/drain_jobs/query``."""
        return {
            "success": True,
            "job_id": format_id(self.id),
            "type": 0,
            "type_name": "DRAIN",
            "status": int(self.status),
            "status_name": self.status.name,
            "created_at_ms_epoch": self.created_ms,
            "last_updated_at_ms_epoch": self.updated_ms,
            "segments": list(self.segments),
            "succeeded_units": self.succeeded,
            "failed_units": self.failed,
            "blocked_units": self.blocked,
            "active_units": len(self.active),
            "migrated_bytes": self.migrated_bytes,
            "message": self.message,
            "error_code": 0,
            "error_message": "",
        }


class DrainJobs:
    """The drain jobs of one :class:`MasterState`."""

    def __init__(self, st: MasterState) -> None:
        self.st = st
        self.jobs: dict[TaskId, DrainJob] = {}
        #: segment names a finished job emptied (DRAINED while still draining)
        self.drained: set[str] = set()
        self._by_task: dict[TaskId, DrainJob] = {}
        self._next_step = 0.0
        st.tasks.listeners.append(self._task_finished)

    def _ms(self, now: float) -> int:
        return int((self.st.tasks.wall_offset + now) * 1000)

    def _segs(self, name: str) -> list[SegmentRecord]:
        return [s for s in self.st.segments.values() if s.name == name]

    # --- segment status ----------------------------------------------------------------------

    def segment_status(self, name: str) -> SegmentStatus:
        """Raises: StoreError(SEGMENT_NOT_FOUND)."""
        segs = self._segs(name)
        if not segs:
            raise _err(ErrorCode.SEGMENT_NOT_FOUND, f"no segment {name!r} is mounted")
        if not any(s.draining for s in segs):
            return SegmentStatus.OK
        return SegmentStatus.DRAINED if name in self.drained else SegmentStatus.DRAINING

    def _set_draining(self, names: tuple[str, ...], draining: bool) -> None:
        for name in names:
            for seg in self._segs(name):
                seg.draining = draining
            if not draining:
                self.drained.discard(name)
        self.st._placement.invalidate()

    def segment_mounted(self, seg: SegmentRecord) -> None:
        """A segment mounted under the name of a segment an unfinished job drains
        joins the drain (a restarted owner must not be handed new replicas)."""
        for job in self.jobs.values():
            if not job.ended and seg.name in job.segments:
                seg.draining = True
                self.st._placement.invalidate()

    # --- the HTTP surface ----------------------------------------------------------------------

    def create(
        self,
        segments: tuple[str, ...],
        targets: tuple[str, ...],
        max_concurrency: int,
        now: float,
    ) -> DrainJob:
        """Validate (the reference's rules) and start a job.

        Raises:
            InvalidParams: no segments, duplicates, a target that is also a source,
                ``max_concurrency`` 0.
            SegmentNotFound: a segment or target is not mounted.
            UnavailableInCurrentStatus: a segment is draining already, a target is.
        """
        if not segments or max_concurrency <= 0:
            raise _err(
                ErrorCode.INVALID_PARAMS,
                "a drain job needs at least one segment and max_concurrency >= 1",
            )
        if len(set(segments)) != len(segments):
            raise _err(ErrorCode.INVALID_PARAMS, "a drain job names a segment twice")
        for name in segments:
            status = self.segment_status(name)
            if status != SegmentStatus.OK:
                raise _err(
                    ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS,
                    f"segment {name!r} is {status.name} already",
                )
        for name in targets:
            if name in segments:
                raise _err(
                    ErrorCode.INVALID_PARAMS, f"segment {name!r} is both drained and a target"
                )
            if self.segment_status(name) != SegmentStatus.OK:
                raise _err(
                    ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS,
                    f"target segment {name!r} is draining and takes no new replicas",
                )
        n = uuid.uuid4().int
        job = DrainJob(
            (n >> 64, n & ((1 << 64) - 1)),
            segments,
            targets,
            max_concurrency,
            self._ms(now),
        )
        self.st._emit(DrainCreated(job.id, segments, targets, max_concurrency, job.created_ms))
        self._add(job)
        self._schedule(job, now, full=True)
        return job

    def _add(self, job: DrainJob) -> None:
        self.jobs[job.id] = job
        self._set_draining(job.segments, True)
        for name in job.segments:
            self.drained.discard(name)

    def get(self, job_id: TaskId) -> DrainJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise _err(ErrorCode.JOB_NOT_FOUND, f"drain job {format_id(job_id)} is not known")
        return job

    def cancel(self, job_id: TaskId, now: float) -> None:
        """Raises: JobNotFound; UnavailableInCurrentStatus (ended, or moves in flight)."""
        job = self.get(job_id)
        if job.ended or job.active:
            raise _err(
                ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS,
                f"drain job {format_id(job_id)} is {job.status.name}"
                + (f" with {len(job.active)} move(s) in flight; retry" if job.active else ""),
            )
        self._end(job, JobStatus.CANCELED, "Drain job canceled", now)
        self._set_draining(job.segments, False)

    def _end(self, job: DrainJob, status: JobStatus, message: str, now: float) -> None:
        job.status = status
        job.message = message
        job.updated_ms = self._ms(now)
        self.st._emit(DrainEnded(job.id, int(status), message))

    # --- scheduling ----------------------------------------------------------------------------

    def step(self, now: float) -> None:
        """Periodic scheduling (from ``MasterState.tick``)."""
        if now < self._next_step:
            return
        self._next_step = now + STEP_INTERVAL_S
        for job in list(self.jobs.values()):
            if not job.ended:
                self._schedule(job, now, full=True)

    def _task_finished(self, task: Task) -> None:
        job = self._by_task.pop(task.id, None)
        if job is None:
            return
        entry = job.active.pop(task.id, None)
        if entry is None:
            return
        unit, size = entry
        if task.status == TaskStatus.SUCCESS:
            job.succeeded += 1
            job.migrated_bytes += size
            job.completed.add(unit)
        else:
            job.failed += 1
            job.retries[unit] = job.retries.get(unit, 0) + 1
            if job.retries[unit] >= MAX_UNIT_RETRIES:
                job.terminal.add(unit)
        if not job.ended:
            self._schedule(job, task.updated, full=False)

    def _schedule(self, job: DrainJob, now: float, *, full: bool) -> None:
        if job.status == JobStatus.CREATED:
            job.status = JobStatus.PLANNING
        if not job.active and self._maybe_complete(job, now):
            return
        slots = job.max_concurrency - len(job.active)
        busy = {unit for unit, _ in job.active.values()}
        blocked = 0
        st = self.st
        for name in job.segments:
            for seg in self._segs(name):
                # planning queues tasks only (no change to the deque): iterate it
                for obj in seg.order:
                    if slots <= 0 and not full:
                        break
                    if not obj.flags:
                        continue  # a dead entry
                    key = obj.key
                    unit = (key, name)
                    if unit in job.completed or unit in busy or unit in job.terminal:
                        continue
                    if not any(s is seg for s, _ in obj.replicas()):
                        continue  # only a pending upsert's buffer is here
                    if obj.flags & (BUSY | TASK) or not obj.flags & READABLE:
                        blocked += 1
                        continue
                    if slots <= 0:
                        continue
                    target = self._target(obj, name, job.targets)
                    if target is None:
                        blocked += 1
                        continue
                    try:
                        task = st.replication.create_move_task(key, name, target, now)
                    except StoreError as exc:
                        if exc.code in (
                            int(ErrorCode.NO_AVAILABLE_HANDLE),
                            int(ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS),
                            int(ErrorCode.OBJECT_HAS_REPLICATION_TASK),
                            int(ErrorCode.TASK_PENDING_LIMIT_EXCEEDED),
                        ):
                            blocked += 1
                        else:
                            job.failed += 1
                            job.retries[unit] = job.retries.get(unit, 0) + 1
                            if job.retries[unit] >= MAX_UNIT_RETRIES:
                                job.terminal.add(unit)
                        continue
                    job.active[task.id] = (unit, obj.size)
                    self._by_task[task.id] = job
                    busy.add(unit)
                    slots -= 1
        if full:
            job.blocked = blocked
        job.status = JobStatus.RUNNING
        job.message = "Drain job running"
        job.updated_ms = self._ms(now)

    def _target(self, obj: Obj, source: str, wanted: tuple[str, ...]) -> str | None:
        """The least used open segment of ``wanted`` (or of all) without a replica
        of ``obj`` and with room for it; else an open segment that holds a replica
        already (the move then only drops the one in ``source``)."""
        held = {s.name for s, _ in obj.replicas()}
        best: tuple[float, str] | None = None
        for seg in self.st.segments.values():
            name = seg.name
            if name == source or name in held or seg.draining:
                continue
            if wanted and name not in wanted:
                continue
            alloc = seg.allocator
            if alloc.largest_free < obj.size or not alloc.capacity:
                continue
            util = alloc.allocated / alloc.capacity
            if best is None or util < best[0]:
                best = (util, name)
        if best is not None:
            return best[1]
        for seg, _ in obj.replicas():  # keeps the replica count when it can, above
            if seg.name != source and not seg.draining:
                return seg.name
        return None

    def _maybe_complete(self, job: DrainJob, now: float) -> bool:
        remaining: set[str] = set()
        units: set[Unit] = set()
        for name in job.segments:
            for seg in self._segs(name):
                for obj in seg.order:
                    if not obj.flags:
                        continue
                    if any(s is seg for s, _ in obj.replicas()) or obj.pending():
                        remaining.add(name)
                        units.add((obj.key, name))
        for name in job.segments:
            if name not in remaining:
                self.drained.add(name)
        if not remaining:
            self._end(job, JobStatus.SUCCEEDED, "Drain job finished successfully", now)
            return True
        if units <= job.terminal:
            self._end(job, JobStatus.FAILED, "Drain job failed: unrecoverable units remain", now)
            self._set_draining(job.segments, False)
            return True
        return False

    # --- effects -------------------------------------------------------------------------------

    def apply_created(self, ev: DrainCreated, now: float) -> None:
        if ev.job_id not in self.jobs:
            self._add(
                DrainJob(ev.job_id, ev.segments, ev.targets, ev.max_concurrency, ev.created_ms)
            )

    def apply_ended(self, ev: DrainEnded, now: float) -> None:
        job = self.jobs.get(ev.job_id)
        if job is None or job.ended:
            return
        job.status = JobStatus(ev.status)
        job.message = ev.message
        if job.status == JobStatus.SUCCEEDED:
            self.drained.update(job.segments)
        else:
            self._set_draining(job.segments, False)

    def snapshot(self) -> list[Effect]:
        out: list[Effect] = []
        for job in self.jobs.values():
            out.append(
                DrainCreated(job.id, job.segments, job.targets, job.max_concurrency, job.created_ms)
            )
            if job.ended:
                out.append(DrainEnded(job.id, int(job.status), job.message))
        return out
