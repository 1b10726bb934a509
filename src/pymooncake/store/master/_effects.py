"""Typed effects of master commands: what a journal, a standby or an offload
engine needs to know about a change of durable state.

Theory of operation
-------------------
A state command that changes what must survive a restart (a segment mounted or
unmounted, an object committed or deleted) emits one frozen effect value.  The
service takes them with :meth:`MasterState.drain_effects`, journals them (and
ships them to standbys) *before* it sends the reply that acknowledges them;
:meth:`MasterState.apply` replays them, dispatching on their type.

Leases are deliberately not effects: a reader re-asks.  Writes in flight
(:class:`WriteStarted`, :class:`WriteEnded`) are effects for standbys, which
must know every reserved buffer, but the journal skips them (:data:`DURABLE`):
after a restart a writer caught mid-put retries.  Records are JSON lists whose
first element names the type; the layout is the journal's on-disk format
(readable by earlier versions' journals too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from ..._frozen import fast_frozen_inits
from ...errors import MalformedMessage
from .._types import SegmentInfo

__all__ = [
    "DURABLE",
    "DiskReplicaAdded",
    "DiskReplicaRemoved",
    "DrainCreated",
    "DrainEnded",
    "Effect",
    "LocalDiskMounted",
    "LocalDiskUnmounted",
    "ObjectCommitted",
    "ObjectDeleted",
    "ReplicationEnded",
    "ReplicationStarted",
    "ReplyKept",
    "SegmentMounted",
    "SegmentUnmounted",
    "TaskFinished",
    "TaskStarted",
    "TaskSubmitted",
    "WriteEnded",
    "WriteRenamed",
    "WriteStarted",
    "effect_from_record",
]


@dataclass(frozen=True, slots=True)
class SegmentMounted:
    info: SegmentInfo
    client_id: str

    def record(self) -> list[Any]:
        return ["mount", self.info.to_wire(), self.client_id]


@dataclass(frozen=True, slots=True)
class SegmentUnmounted:
    segment_id: str

    def record(self) -> list[Any]:
        return ["unmount", self.segment_id]


@dataclass(frozen=True, slots=True)
class ObjectCommitted:
    """A readable value of ``key`` (replacing any earlier one)."""

    key: str
    size: int
    #: (segment id, address, reserved bytes) per replica
    replicas: tuple[tuple[str, int, int], ...]
    hard_pinned: bool
    writer: str

    def record(self) -> list[Any]:
        return [
            "commit",
            self.key,
            self.size,
            [[0, sid, addr, self.size, reserved] for sid, addr, reserved in self.replicas],
            self.hard_pinned,
            self.writer,
        ]


@dataclass(frozen=True, slots=True)
class WriteStarted:
    """A put (or, with ``upsert``, a replacing write) of ``key`` began: its buffers
    are reserved and being written.  Only standbys need it (so that a new leader
    neither loses the put nor hands the same buffers out again); the journal
    skips it."""

    key: str
    size: int
    #: (segment id, address) per replica being written
    replicas: tuple[tuple[str, int], ...]
    writer: str
    hard_pinned: bool
    upsert: bool
    #: soft pin applied when the write completes (None: no pin)
    soft_pin_ttl_s: float | None = None

    def record(self) -> list[Any]:
        return [
            "start",
            self.key,
            self.size,
            [list(r) for r in self.replicas],
            self.writer,
            self.hard_pinned,
            self.upsert,
            self.soft_pin_ttl_s,
        ]


@dataclass(frozen=True, slots=True)
class WriteEnded:
    """The write in progress of ``key`` was revoked or abandoned (its buffers go)."""

    key: str

    def record(self) -> list[Any]:
        return ["abandon", self.key]


@dataclass(frozen=True, slots=True)
class WriteRenamed:
    """The write in progress under the reserved name ``slot`` now writes ``key``
    (a reserved buffer committed: ``CommitSlot``; an :class:`ObjectCommitted` of
    ``key`` follows).  Like the other writes in flight, only standbys need it."""

    slot: str
    key: str

    def record(self) -> list[Any]:
        return ["rename", self.slot, self.key]


@dataclass(frozen=True, slots=True)
class ObjectDeleted:
    key: str

    def record(self) -> list[Any]:
        return ["delete", self.key]


@dataclass(frozen=True, slots=True)
class ReplyKept:
    """The answer to a client's mutation whose retry would be answered
    differently once it acted (a Remove retried after the object went is
    OBJECT_NOT_FOUND): kept with the state, so a retry with the same request id
    gets it from a restarted master or a new leader as from the reply cache
    (``_replies.py``).  ``value`` is the reply's JSON value."""

    client_id: str
    rid: int
    code: int
    value: Any

    def record(self) -> list[Any]:
        return ["reply", self.client_id, self.rid, self.code, self.value]


@dataclass(frozen=True, slots=True)
class TaskSubmitted:
    """A copy/move task was queued (``_tasks.py``)."""

    task_id: tuple[int, int]
    kind: int
    key: str
    source: str
    targets: tuple[str, ...]
    client: str
    created_ms: int

    def record(self) -> list[Any]:
        return [
            "task",
            list(self.task_id),
            self.kind,
            self.key,
            self.source,
            list(self.targets),
            self.client,
            self.created_ms,
        ]


@dataclass(frozen=True, slots=True)
class TaskStarted:
    """A task was handed to its client (PROCESSING)."""

    task_id: tuple[int, int]
    updated_ms: int

    def record(self) -> list[Any]:
        return ["task_start", list(self.task_id), self.updated_ms]


@dataclass(frozen=True, slots=True)
class TaskFinished:
    task_id: tuple[int, int]
    status: int
    message: str
    updated_ms: int

    def record(self) -> list[Any]:
        return ["task_end", list(self.task_id), self.status, self.message, self.updated_ms]


@dataclass(frozen=True, slots=True)
class ReplicationStarted:
    """A copy (``move`` False) or move of ``key`` reserved target buffers
    (``_replicate.py``).  Like :class:`WriteStarted` only standbys need it: after a
    journal restart the copy in flight is gone and its task failed."""

    key: str
    move: bool
    client: str
    #: (segment id, address) of the source replica
    source: tuple[str, int]
    #: (segment id, address) per new replica
    targets: tuple[tuple[str, int], ...]

    def record(self) -> list[Any]:
        return [
            "repl",
            self.key,
            self.move,
            self.client,
            list(self.source),
            [list(t) for t in self.targets],
        ]


@dataclass(frozen=True, slots=True)
class ReplicationEnded:
    """The copy/move of ``key`` ended; its targets that did not become replicas
    (an :class:`ObjectCommitted` follows a successful end) are released."""

    key: str

    def record(self) -> list[Any]:
        return ["repl_end", self.key]


@dataclass(frozen=True, slots=True)
class DrainCreated:
    """A drain job (``_drain.py``) was created: its segments accept no new replicas."""

    job_id: tuple[int, int]
    segments: tuple[str, ...]
    targets: tuple[str, ...]
    max_concurrency: int
    created_ms: int

    def record(self) -> list[Any]:
        return [
            "drain",
            list(self.job_id),
            list(self.segments),
            list(self.targets),
            self.max_concurrency,
            self.created_ms,
        ]


@dataclass(frozen=True, slots=True)
class DrainEnded:
    job_id: tuple[int, int]
    status: int
    message: str

    def record(self) -> list[Any]:
        return ["drain_end", list(self.job_id), self.status, self.message]


@dataclass(frozen=True, slots=True)
class LocalDiskMounted:
    """A client offers its SSD tier, served at ``endpoint`` (``_offload.py``)."""

    client_id: str
    endpoint: str
    capacity_bytes: int

    def record(self) -> list[Any]:
        return ["ldisk_mount", self.client_id, self.endpoint, self.capacity_bytes]


@dataclass(frozen=True, slots=True)
class LocalDiskUnmounted:
    """A client's SSD tier went away (unmounted or the client expired): so did
    every LOCAL_DISK replica it held."""

    client_id: str

    def record(self) -> list[Any]:
        return ["ldisk_unmount", self.client_id]


@dataclass(frozen=True, slots=True)
class DiskReplicaAdded:
    """``key`` (``size`` bytes) has a LOCAL_DISK replica in ``client_id``'s SSD tier."""

    key: str
    client_id: str
    size: int

    def record(self) -> list[Any]:
        return ["disk_add", self.key, self.client_id, self.size]


@dataclass(frozen=True, slots=True)
class DiskReplicaRemoved:
    key: str

    def record(self) -> list[Any]:
        return ["disk_remove", self.key]


Effect = (
    SegmentMounted
    | SegmentUnmounted
    | ObjectCommitted
    | ObjectDeleted
    | WriteStarted
    | WriteEnded
    | WriteRenamed
    | TaskSubmitted
    | TaskStarted
    | TaskFinished
    | ReplicationStarted
    | ReplicationEnded
    | DrainCreated
    | DrainEnded
    | LocalDiskMounted
    | LocalDiskUnmounted
    | DiskReplicaAdded
    | DiskReplicaRemoved
    | ReplyKept
)
#: the effect types a journal keeps (writes and copies in flight are not restored
#: after a restart)
DURABLE: Final = (
    SegmentMounted,
    SegmentUnmounted,
    ObjectCommitted,
    ObjectDeleted,
    TaskSubmitted,
    TaskStarted,
    TaskFinished,
    DrainCreated,
    DrainEnded,
    LocalDiskMounted,
    LocalDiskUnmounted,
    DiskReplicaAdded,
    DiskReplicaRemoved,
    ReplyKept,
)


def _mount(rec: list[Any]) -> Effect:
    return SegmentMounted(SegmentInfo.from_wire(rec[1]), str(rec[2]))


def _unmount(rec: list[Any]) -> Effect:
    return SegmentUnmounted(str(rec[1]))


def _commit(rec: list[Any]) -> Effect:
    key, size, reps = rec[1], rec[2], rec[3]
    hard = bool(rec[4]) if len(rec) > 4 else False
    writer = str(rec[5]) if len(rec) > 5 else ""
    return ObjectCommitted(
        str(key),
        int(size),
        tuple((str(sid), int(addr), int(reserved)) for _rid, sid, addr, _size, reserved in reps),
        hard,
        writer,
    )


def _delete(rec: list[Any]) -> Effect:
    return ObjectDeleted(str(rec[1]))


def _start(rec: list[Any]) -> Effect:
    _, key, size, reps, writer, hard, upsert, ttl = rec
    return WriteStarted(
        str(key),
        int(size),
        tuple((str(sid), int(addr)) for sid, addr in reps),
        str(writer),
        bool(hard),
        bool(upsert),
        None if ttl is None else float(ttl),
    )


def _abandon(rec: list[Any]) -> Effect:
    return WriteEnded(str(rec[1]))


def _rename(rec: list[Any]) -> Effect:
    return WriteRenamed(str(rec[1]), str(rec[2]))


def _uuid(value: Any) -> tuple[int, int]:
    hi, lo = value
    return int(hi), int(lo)


def _task(rec: list[Any]) -> Effect:
    _, tid, kind, key, source, targets, client, created = rec
    return TaskSubmitted(
        _uuid(tid),
        int(kind),
        str(key),
        str(source),
        tuple(str(t) for t in targets),
        str(client),
        int(created),
    )


def _task_start(rec: list[Any]) -> Effect:
    return TaskStarted(_uuid(rec[1]), int(rec[2]))


def _task_end(rec: list[Any]) -> Effect:
    return TaskFinished(_uuid(rec[1]), int(rec[2]), str(rec[3]), int(rec[4]))


def _repl(rec: list[Any]) -> Effect:
    _, key, move, client, source, targets = rec
    sid, saddr = source
    return ReplicationStarted(
        str(key),
        bool(move),
        str(client),
        (str(sid), int(saddr)),
        tuple((str(t), int(a)) for t, a in targets),
    )


def _repl_end(rec: list[Any]) -> Effect:
    return ReplicationEnded(str(rec[1]))


def _drain(rec: list[Any]) -> Effect:
    _, jid, segments, targets, concurrency, created = rec
    return DrainCreated(
        _uuid(jid),
        tuple(str(s) for s in segments),
        tuple(str(t) for t in targets),
        int(concurrency),
        int(created),
    )


def _drain_end(rec: list[Any]) -> Effect:
    return DrainEnded(_uuid(rec[1]), int(rec[2]), str(rec[3]))


def _ldisk_mount(rec: list[Any]) -> Effect:
    return LocalDiskMounted(str(rec[1]), str(rec[2]), int(rec[3]))


def _ldisk_unmount(rec: list[Any]) -> Effect:
    return LocalDiskUnmounted(str(rec[1]))


def _disk_add(rec: list[Any]) -> Effect:
    return DiskReplicaAdded(str(rec[1]), str(rec[2]), int(rec[3]))


def _disk_remove(rec: list[Any]) -> Effect:
    return DiskReplicaRemoved(str(rec[1]))


def _reply(rec: list[Any]) -> Effect:
    _, client, rid, code, value = rec
    return ReplyKept(str(client), int(rid), int(code), value)


_DECODERS: Final[dict[str, Callable[[list[Any]], Effect]]] = {
    "task": _task,
    "task_start": _task_start,
    "task_end": _task_end,
    "repl": _repl,
    "repl_end": _repl_end,
    "drain": _drain,
    "drain_end": _drain_end,
    "ldisk_mount": _ldisk_mount,
    "ldisk_unmount": _ldisk_unmount,
    "disk_add": _disk_add,
    "disk_remove": _disk_remove,
    "reply": _reply,
    "mount": _mount,
    "unmount": _unmount,
    "commit": _commit,
    "delete": _delete,
    "start": _start,
    "abandon": _abandon,
    "rename": _rename,
}


def effect_from_record(rec: Any) -> Effect:
    """The effect a journal record describes.

    Raises:
        MalformedMessage: not a record of a known type, or a malformed one.
    """
    if type(rec) is not list or not rec or rec[0] not in _DECODERS:
        raise MalformedMessage(f"not a master journal record: {str(rec)[:100]}")
    try:
        return _DECODERS[rec[0]](rec)
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise MalformedMessage(f"malformed {rec[0]} record ({exc}): {str(rec)[:100]}") from None


# cheaper construction of the values above: one or two per call (_frozen.py)
fast_frozen_inits(globals())
