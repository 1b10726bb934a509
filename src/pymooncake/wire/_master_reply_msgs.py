"""Typed replies of the store master's RPC, one frozen type per method.

Theory of operation
-------------------
Requests are typed in ``_master_msgs.py``; this module gives every request type
the type of its answer (``Request.REPLY``, linked at the bottom of this module).
Each reply type has

* ``to_wire()``: the JSON value the master sends (the bytes are pinned by
  ``tests/wire/test_master_replies.py``; a change bumps ``PROTOCOL_VERSION``), and
* ``decode(value)``: the inverse, which checks every type and shape once and
  raises :class:`InvalidReply` (a :class:`~pymooncake.errors.MalformedMessage`)
  naming the method and the field on anything else: a client never indexes
  into an unchecked value.

Replicas travel as ``[replica id, endpoint, address, size, status, segment id]``
(:data:`ReplicaWire`, the reference's ``Replica::Descriptor`` fields that a
client uses).  Batch starts and batch lookups answer in columns
(``_master_replies.py``); their reply types hold the decoded
:class:`ReplicaColumns` as they came (flat lists, no per-key objects).

This module neither opens sockets nor touches master state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from json.encoder import encode_basestring as _json_str
from typing import Any, ClassVar, Final, NoReturn, TypeVar

from .._frozen import fast_frozen_inits
from ..errors import MalformedMessage
from . import _master_msgs as msg
from . import _offload_msgs as omsg
from ._frames import encode_json
from ._master_msgs import MasterMethod
from ._master_replies import ReplicaColumns

__all__ = [
    "REPLY_TYPES",
    "BatchCommitSlotsReply",
    "BatchEvictDiskReplicaReply",
    "BatchExistKeyReply",
    "BatchGetReplicaListReply",
    "BatchKeyResultsReply",
    "BatchPutEndReply",
    "BatchPutRevokeReply",
    "BatchPutStartReply",
    "BatchRemoveReply",
    "BatchReplicaClearReply",
    "BatchUpsertEndReply",
    "BatchUpsertRevokeReply",
    "BatchUpsertStartReply",
    "ColumnsReply",
    "CommitSlotReply",
    "CopyEndReply",
    "CopyRevokeReply",
    "CopyStartReply",
    "CountReply",
    "CreateCopyTaskReply",
    "CreateMoveTaskReply",
    "DoneReply",
    "ExistKeyReply",
    "FetchTasksReply",
    "FollowFrame",
    "GetReplicaListByRegexReply",
    "GetReplicaListReply",
    "GetStorageConfigReply",
    "GetSummaryReply",
    "InvalidReply",
    "MarkTaskToCompleteReply",
    "MountLocalDiskReply",
    "MountSegmentReply",
    "MoveEndReply",
    "MoveRevokeReply",
    "MoveStartReply",
    "NotifyOffloadSuccessReply",
    "OffloadHeartbeatReply",
    "PingReply",
    "PromotionAllocStartReply",
    "PutEndReply",
    "PutRevokeReply",
    "PutStartReply",
    "QueryTaskReply",
    "ReMountSegmentReply",
    "RemoveAllReply",
    "RemoveByRegexReply",
    "RemoveReply",
    "ReplicaWire",
    "Reply",
    "ReserveSlotsReply",
    "ServiceReadyReply",
    "TaskAssignment",
    "UnmountLocalDiskReply",
    "UnmountSegmentReply",
    "UpsertEndReply",
    "UpsertRevokeReply",
    "UpsertStartReply",
    "replica_of",
    "replicas_of",
    "reply_type",
]

#: one replica: (replica id, endpoint, address, size, status, segment id)
ReplicaWire = tuple[int, str, int, int, int, str]
_R = TypeVar("_R", bound="Reply")
_INT: Final = frozenset({int})
_STR: Final = frozenset({str})
_BOOL: Final = frozenset({bool})
#: the element types of a replica in wire form (ReplicaWire)
_REPLICA_TYPES: Final = (int, str, int, int, int, str)


class InvalidReply(MalformedMessage):
    """A master reply that does not have the shape its method promises (a master
    of another version, or a corrupted frame)."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Reply:
    """Base of every reply type."""

    __slots__ = ()
    METHOD: ClassVar[MasterMethod]

    #: :meth:`to_json` is faster than encoding :meth:`to_wire` (the master sends it)
    JSON_TEXT: ClassVar[bool] = False

    def to_wire(self) -> Any:
        raise NotImplementedError

    def to_json(self) -> str:
        """:meth:`to_wire` as compact JSON text (what a reply frame carries)."""
        return encode_json(self.to_wire())

    @classmethod
    def decode(cls: type[_R], value: Any) -> _R:
        raise NotImplementedError

    @classmethod
    def _bad(cls, what: str, rule: str, value: Any = ...) -> NoReturn:
        shown = "" if value is ... else f" (got {_show(value)})"
        raise InvalidReply(f"{cls.METHOD.value} reply: {what} {rule}{shown}")

    # field checks (raise InvalidReply naming the method and the field) ----------

    @classmethod
    def _int(cls, value: Any, what: str) -> int:
        if type(value) is not int:
            cls._bad(what, "is not an integer", value)
        return value

    @classmethod
    def _str(cls, value: Any, what: str) -> str:
        if type(value) is not str:
            cls._bad(what, "is not a string", value)
        return value

    @classmethod
    def _bool(cls, value: Any, what: str) -> bool:
        if type(value) is not bool:
            cls._bad(what, "is not a boolean", value)
        return value

    @classmethod
    def _list(cls, value: Any, what: str, n: int | None = None) -> list[Any]:
        if type(value) is not list:
            cls._bad(what, "is not a list", value)
        if n is not None and len(value) != n:
            cls._bad(what, f"does not have {n} elements", value)
        return value

    @classmethod
    def _dict(cls, value: Any, what: str, fields: tuple[str, ...] = ()) -> dict[str, Any]:
        if type(value) is not dict:
            cls._bad(what, "is not an object", value)
        for f in fields:
            if f not in value:
                cls._bad(f"{what}.{f}", "is missing")
        return value

    @classmethod
    def _ints(cls, value: Any, what: str, n: int | None = None) -> list[int]:
        items = cls._list(value, what, n)
        if items and not set(map(type, items)) <= _INT:  # map/set: no per-item bytecode
            cls._bad(what, "holds a value that is not an integer")
        return items

    @classmethod
    def _column(cls, value: Any, what: str, n: int | None) -> list[int]:
        """A column of a columnar reply: a list, or one integer standing for
        ``n`` copies of itself (see :func:`_uniform`)."""
        if type(value) is int:
            if n is None:
                cls._bad(what, "is one integer but the reply does not say how many keys (k)")
            if n > _MAX_COLUMN:
                cls._bad(what, f"stands for {n} values (at most {_MAX_COLUMN})")
            return [value] * n
        return cls._ints(value, what, n)

    @classmethod
    def _strs(cls, value: Any, what: str) -> tuple[str, ...]:
        items = cls._list(value, what)
        if items and not set(map(type, items)) <= _STR:
            cls._bad(what, "holds a value that is not a string")
        return tuple(items)

    @classmethod
    def _replica(cls, value: Any, what: str, index: int | None = None) -> ReplicaWire:
        """One replica in wire form; ``what`` (``what[index]`` with an index) names
        it in the error, formatted only then."""
        if type(value) is list and len(value) == 6 and tuple(map(type, value)) == _REPLICA_TYPES:
            return (value[0], value[1], value[2], value[3], value[4], value[5])
        name = what if index is None else f"{what}[{index}]"
        cls._list(value, name, 6)
        cls._bad(name, "is not [id, endpoint, address, size, status, segment id]", value)

    @classmethod
    def _replicas(cls, value: Any, what: str) -> tuple[ReplicaWire, ...]:
        return tuple([cls._replica(r, what, i) for i, r in enumerate(cls._list(value, what))])

    @classmethod
    def _uuid(cls, value: Any, what: str) -> tuple[int, int]:
        a, b = cls._ints(value, what, 2)
        return (a, b)


def replica_of(r: Any) -> ReplicaWire:
    """A replica in wire form (a list the master built) as a :data:`ReplicaWire`
    (trusted input: no checks)."""
    return (r[0], r[1], r[2], r[3], r[4], r[5])


def replicas_of(reps: Any) -> tuple[ReplicaWire, ...]:
    """Replicas in wire form (lists the master built) as a tuple (no checks)."""
    return tuple([(r[0], r[1], r[2], r[3], r[4], r[5]) for r in reps])


def _replicas_wire(reps: tuple[ReplicaWire, ...]) -> list[list[Any]]:
    return [list(r) for r in reps]


# ---------------------------------------------------------------------------------
# shared shapes (one subclass per method below)
# ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DoneReply(Reply):
    """Success without a value (JSON ``null``)."""

    def to_wire(self) -> None:
        return None

    @classmethod
    def decode(cls: type[_R], value: Any) -> _R:
        if value is not None:
            cls._bad("value", "is not null", value)
        return cls()


@dataclass(frozen=True, slots=True)
class CountReply(Reply):
    """A number of things (unmounted objects, removed keys, evicted files)."""

    count: int

    def to_wire(self) -> int:
        return self.count

    @classmethod
    def decode(cls: type[_R], value: Any) -> _R:
        return cls(cls._int(value, "count"))  # type: ignore[call-arg]


@dataclass(frozen=True, slots=True)
class _ReplicasReply(Reply):
    """The replicas a writer is to fill (``[[id, endpoint, address, size, status,
    segment id], ...]``)."""

    replicas: tuple[ReplicaWire, ...]

    def to_wire(self) -> list[list[Any]]:
        return _replicas_wire(self.replicas)

    @classmethod
    def decode(cls: type[_R], value: Any) -> _R:
        return cls(cls._replicas(value, "replicas"))  # type: ignore[call-arg]


#: one key's result in a BatchKeyResultsReply when it succeeded
_SUCCESS: Final = [0, None]
#: the longest column a reply may stand for with one integer: every key of the
#: largest batch with the most replicas each
_MAX_COLUMN: Final = msg.MAX_BATCH_KEYS * msg.MAX_REPLICAS


@dataclass(frozen=True, slots=True)
class BatchKeyResultsReply(Reply):
    """``[[code, message or null], ...]``, one per key of the request: code 0 is
    success (message null), else the reference ErrorCode and its message.  A
    batch in which every key succeeded is answered with the number of keys
    alone (encoding and decoding a thousand ``[0, null]`` pairs cost more than
    the rest of a BatchPutEnd's reply)."""

    codes: tuple[int, ...]
    messages: tuple[str | None, ...]

    def to_wire(self) -> int | list[list[Any]]:
        codes = self.codes
        if codes.count(0) == len(codes):
            return len(codes)
        return [[c, m] for c, m in zip(codes, self.messages, strict=True)]

    @classmethod
    def decode(cls: type[_R], value: Any) -> _R:
        if type(value) is int:
            if not 0 <= value <= msg.MAX_BATCH_KEYS:
                cls._bad("results", f"is not a count of keys (0..{msg.MAX_BATCH_KEYS})", value)
            return cls((0,) * value, (None,) * value)  # type: ignore[call-arg]
        items = cls._list(value, "results")
        n = len(items)
        if items.count(_SUCCESS) == n:  # every key succeeded: one C-level pass
            return cls((0,) * n, (None,) * n)  # type: ignore[call-arg]
        codes: list[int] = []
        messages: list[str | None] = []
        for i, item in enumerate(items):
            if type(item) is not list or len(item) != 2:
                cls._bad(f"results[{i}]", "is not [code, message]", item)
            code, text = item
            if type(code) is not int or not (text is None or type(text) is str):
                cls._bad(f"results[{i}]", "is not [integer, string or null]", item)
            codes.append(code)
            messages.append(text)
        return cls(tuple(codes), tuple(messages))  # type: ignore[call-arg]


def _uniform(column: list[int], n: int) -> int | list[int]:
    """A column whose ``n`` values are all one integer travels as that integer
    (most columns of a batch of new keys are: codes 0, one replica each, one
    segment, one size), which spares both sides the per-value JSON work."""
    if n and column.count(column[0]) == n:
        return column[0]
    return column


#: an address column at least this long is looked at for being one run
_MIN_RUN: Final = 4


def _address_runs(c: ReplicaColumns) -> list[list[int]] | None:
    """The address column as runs ``[first, stride, count]``: the ones the master
    built, or the whole column when it is one arithmetic run (a batch of new
    keys of one size is usually placed in adjacent buffers); else None.  The
    last address is compared first, so a column of scattered addresses (a
    batch read) costs one comparison."""
    if c.addr_runs is not None:
        return c.addr_runs
    addr = c.addr
    n = len(addr)
    if n < _MIN_RUN:
        return None
    first = addr[0]
    stride = addr[1] - first
    if stride <= 0 or addr[-1] != first + (n - 1) * stride:
        return None
    if addr != list(range(first, addr[-1] + 1, stride)):
        return None
    return [[first, stride, n]]


@dataclass(frozen=True, slots=True)
class ColumnsReply(Reply):
    """A columnar batch reply (``_master_replies.py``), kept as its flat lists."""

    columns: ReplicaColumns
    #: BatchGetReplicaList also carries object sizes and the lease
    WITH_SIZES: ClassVar[bool] = False

    def __len__(self) -> int:
        return len(self.columns.code)

    def to_wire(self) -> dict[str, Any]:
        c = self.columns
        k = len(c.code)
        out: dict[str, Any] = {
            "k": k,
            "code": _uniform(c.code, k),
            "msg": [[i, m] for i, m in c.messages.items()],
            "segs": c.segs,
            "n": _uniform(c.counts, k),
            "seg": _uniform(c.seg, len(c.seg)),
        }
        runs = _address_runs(c)
        if runs is None:
            out["addr"] = c.addr
        else:
            out["addr_runs"] = runs
        if self.WITH_SIZES:
            assert c.sizes is not None
            out["size"] = _uniform(c.sizes, k)
            out["lease_ttl_ms"] = c.lease_ttl_ms
        return out

    @classmethod
    def decode(cls: type[_R], value: Any) -> _R:
        assert issubclass(cls, ColumnsReply)
        fields: tuple[str, ...] = ("code", "msg", "segs", "n", "seg")
        if cls.WITH_SIZES:
            fields += ("size", "lease_ttl_ms")
        v = cls._dict(value, "reply", fields)
        k = v.get("k")
        if k is not None and (type(k) is not int or not 0 <= k <= msg.MAX_BATCH_KEYS):
            cls._bad("k", f"is not a count of keys (0..{msg.MAX_BATCH_KEYS})", k)
        code = cls._column(v["code"], "code", k)
        n = len(code)
        raw = v["n"]
        counts = cls._column(raw, "n", n)
        # (a column sent as one integer is checked as that integer)
        if (raw if type(raw) is int else min(counts, default=0)) < 0:
            cls._bad("n", "holds a negative count")
        total = raw * n if type(raw) is int else sum(counts)
        raw = v["seg"]
        seg = cls._column(raw, "seg", total)
        runs = v.get("addr_runs")
        if runs is not None:
            addr = cls._runs(runs, "addr_runs", total)
        elif "addr" in v:
            addr = cls._ints(v["addr"], "addr", total)
        else:
            cls._bad("reply.addr", "is missing (and so is addr_runs)")
        segs = cls._list(v["segs"], "segs")
        for j, s in enumerate(segs):
            if not (
                type(s) is list
                and len(s) == 4
                and type(s[0]) is str
                and type(s[1]) is str
                and type(s[2]) is int
                and type(s[3]) is int
            ):
                cls._bad(f"segs[{j}]", "is not [endpoint, segment id, number, base]", s)
        if seg and (
            not 0 <= raw < len(segs)
            if type(raw) is int
            else (min(seg) < 0 or max(seg) >= len(segs))
        ):
            cls._bad("seg", "holds a segment index out of range")
        messages: dict[int, str] = {}
        for item in cls._list(v["msg"], "msg"):
            if (
                type(item) is not list
                or len(item) != 2
                or type(item[0]) is not int
                or type(item[1]) is not str
                or not 0 <= item[0] < n
                or item[0] in messages
            ):
                cls._bad("msg", "is not a list of [key index, message]", item)
            messages[item[0]] = item[1]
        sizes = cls._column(v["size"], "size", n) if cls.WITH_SIZES else None
        ttl = cls._int(v["lease_ttl_ms"], "lease_ttl_ms") if cls.WITH_SIZES else 0
        return cls(ReplicaColumns(code, messages, segs, counts, seg, addr, sizes, ttl, runs))

    @classmethod
    def _runs(cls, value: Any, what: str, total: int) -> list[int]:
        """The addresses of ``addr_runs`` (``[first, stride, count]`` each: stride
        and count > 0, ``total`` addresses in all), checked before any is made."""
        runs = cls._list(value, what)
        for run in runs:
            if not (
                type(run) is list
                and len(run) == 3
                and set(map(type, run)) == _INT
                and run[0] >= 0
                and run[1] > 0
                and run[2] > 0
            ):
                cls._bad(
                    what, "holds a run that is not [first address >= 0, stride > 0, count > 0]", run
                )
        if sum(run[2] for run in runs) != total:
            cls._bad(what, f"does not hold {total} addresses", value)
        addr: list[int] = []
        for first, stride, count in runs:
            addr += range(first, first + count * stride, stride)
        return addr


# ---------------------------------------------------------------------------------
# one type per method
# ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceReadyReply(Reply):
    """The master's protocol version (``PROTOCOL_VERSION``, e.g. ``"pymooncake-master/8"``)."""

    METHOD: ClassVar = MasterMethod.SERVICE_READY
    version: str

    def to_wire(self) -> str:
        return self.version

    @classmethod
    def decode(cls, value: Any) -> ServiceReadyReply:
        return cls(cls._str(value, "version"))


_SUMMARY_INTS: Final = (
    "capacity_bytes",
    "allocated_bytes",
    "key_count",
    "segment_count",
    "client_count",
    "soft_pinned_keys",
)


@dataclass(frozen=True, slots=True)
class GetSummaryReply(Reply):
    """Counters of the whole store; ``ssd`` (the SSD tier's counters) only when
    the master runs one."""

    METHOD: ClassVar = MasterMethod.GET_SUMMARY
    capacity_bytes: int
    allocated_bytes: int
    key_count: int
    segment_count: int
    client_count: int
    soft_pinned_keys: int
    ssd: dict[str, int | float] | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {f: getattr(self, f) for f in _SUMMARY_INTS}
        if self.ssd is not None:
            out["ssd"] = self.ssd
        return out

    @classmethod
    def decode(cls, value: Any) -> GetSummaryReply:
        v = cls._dict(value, "summary", _SUMMARY_INTS)
        a, b, c, d, e, f = (cls._int(v[k], k) for k in _SUMMARY_INTS)
        ssd = v.get("ssd")
        if ssd is not None:
            cls._dict(ssd, "ssd")
            for k, x in ssd.items():
                if type(x) not in (int, float):
                    cls._bad(f"ssd.{k}", "is not a number", x)
        return cls(a, b, c, d, e, f, ssd)


@dataclass(frozen=True, slots=True)
class PingReply(Reply):
    """The client's view of the master: ``view_version``, ``status``
    (ClientStatus), ``instance`` (changes when the master restarts) and how many
    copy/move ``tasks`` wait for this client (sent only when some do); with HA, the
    RPC addresses of the ``standbys`` in sync (sent only when there are some: the
    client confirms its puts to them, ``HaConfirm``); ``client_ttl_ms``, the
    master's ``client_ttl`` (sent when known: a client pings well within it)."""

    METHOD: ClassVar = MasterMethod.PING
    view_version: int
    status: int
    instance: str
    tasks: int = 0
    standbys: tuple[str, ...] = ()
    client_ttl_ms: int = 0

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "view_version": self.view_version,
            "status": self.status,
            "instance": self.instance,
        }
        if self.tasks:
            out["tasks"] = self.tasks
        if self.standbys:
            out["standbys"] = list(self.standbys)
        if self.client_ttl_ms:
            out["client_ttl_ms"] = self.client_ttl_ms
        return out

    @classmethod
    def decode(cls, value: Any) -> PingReply:
        v = cls._dict(value, "ping", ("view_version", "status", "instance"))
        tasks = cls._int(v["tasks"], "tasks") if "tasks" in v else 0
        standbys = cls._strs(v["standbys"], "standbys") if "standbys" in v else ()
        ttl_ms = cls._int(v["client_ttl_ms"], "client_ttl_ms") if "client_ttl_ms" in v else 0
        return cls(
            cls._int(v["view_version"], "view_version"),
            cls._int(v["status"], "status"),
            cls._str(v["instance"], "instance"),
            tasks,
            standbys,
            ttl_ms,
        )


@dataclass(frozen=True, slots=True)
class HaConfirmReply(Reply):
    """The keys of an ``HaConfirm`` this master could not confirm (not a standby
    in sync, or not that client's write in progress here yet): the client has the
    leader wait for its standby instead."""

    METHOD: ClassVar = MasterMethod.HA_CONFIRM
    missing: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"missing": list(self.missing)}

    @classmethod
    def decode(cls, value: Any) -> HaConfirmReply:
        v = cls._dict(value, "confirm", ("missing",))
        return cls(cls._strs(v["missing"], "missing"))


@dataclass(frozen=True, slots=True)
class MountSegmentReply(DoneReply):
    METHOD: ClassVar = MasterMethod.MOUNT_SEGMENT


@dataclass(frozen=True, slots=True)
class ReMountSegmentReply(DoneReply):
    METHOD: ClassVar = MasterMethod.REMOUNT_SEGMENTS


@dataclass(frozen=True, slots=True)
class UnmountSegmentReply(CountReply):
    """How many objects lost a replica with the segment."""

    METHOD: ClassVar = MasterMethod.UNMOUNT_SEGMENT


@dataclass(frozen=True, slots=True)
class PutStartReply(_ReplicasReply):
    METHOD: ClassVar = MasterMethod.PUT_START


@dataclass(frozen=True, slots=True)
class UpsertStartReply(_ReplicasReply):
    METHOD: ClassVar = MasterMethod.UPSERT_START


@dataclass(frozen=True, slots=True)
class PromotionAllocStartReply(_ReplicasReply):
    METHOD: ClassVar = MasterMethod.PROMOTION_ALLOC_START


@dataclass(frozen=True, slots=True)
class PutEndReply(DoneReply):
    METHOD: ClassVar = MasterMethod.PUT_END


@dataclass(frozen=True, slots=True)
class ReserveSlotsReply(Reply):
    """``{"cols": columns, "ttl_s": seconds}``: the buffers reserved, in columns
    as :class:`BatchPutStartReply` answers (every code 0), possibly fewer than
    asked for (what fitted); buffer ``i`` is named ``slot_name(client, batch,
    i)``.  ``ttl_s``: how long after the request the client may still write
    into one and commit it."""

    METHOD: ClassVar = MasterMethod.RESERVE_SLOTS
    columns: ReplicaColumns
    ttl_s: float

    def __len__(self) -> int:
        return len(self.columns.code)

    def to_wire(self) -> dict[str, Any]:
        return {"cols": BatchPutStartReply(self.columns).to_wire(), "ttl_s": self.ttl_s}

    @classmethod
    def decode(cls, value: Any) -> ReserveSlotsReply:
        v = cls._dict(value, "value", ("cols", "ttl_s"))
        ttl = v["ttl_s"]
        if type(ttl) not in (int, float) or not 0 <= ttl < math.inf:
            cls._bad("ttl_s", "is not a finite non-negative number", ttl)
        try:
            columns = BatchPutStartReply.decode(v["cols"]).columns
        except InvalidReply as exc:  # name this method and the field
            text = str(exc).removeprefix(f"{BatchPutStartReply.METHOD.value} reply: ")
            cls._bad("cols", f"is not a columnar start reply: {text}")
        if any(columns.code):
            cls._bad("cols.code", "holds a failed buffer (only reserved ones are listed)")
        return cls(columns, float(ttl))


@dataclass(frozen=True, slots=True)
class CommitSlotReply(DoneReply):
    METHOD: ClassVar = MasterMethod.COMMIT_SLOT


@dataclass(frozen=True, slots=True)
class BatchCommitSlotsReply(BatchKeyResultsReply):
    METHOD: ClassVar = MasterMethod.BATCH_COMMIT_SLOTS


@dataclass(frozen=True, slots=True)
class PutRevokeReply(DoneReply):
    METHOD: ClassVar = MasterMethod.PUT_REVOKE


@dataclass(frozen=True, slots=True)
class UpsertEndReply(DoneReply):
    METHOD: ClassVar = MasterMethod.UPSERT_END


@dataclass(frozen=True, slots=True)
class UpsertRevokeReply(DoneReply):
    METHOD: ClassVar = MasterMethod.UPSERT_REVOKE


@dataclass(frozen=True, slots=True)
class BatchPutStartReply(ColumnsReply):
    METHOD: ClassVar = MasterMethod.BATCH_PUT_START


@dataclass(frozen=True, slots=True)
class BatchUpsertStartReply(ColumnsReply):
    METHOD: ClassVar = MasterMethod.BATCH_UPSERT_START


@dataclass(frozen=True, slots=True)
class BatchGetReplicaListReply(ColumnsReply):
    METHOD: ClassVar = MasterMethod.BATCH_GET_REPLICA_LIST
    WITH_SIZES: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class BatchPutEndReply(BatchKeyResultsReply):
    METHOD: ClassVar = MasterMethod.BATCH_PUT_END


@dataclass(frozen=True, slots=True)
class BatchPutRevokeReply(BatchKeyResultsReply):
    METHOD: ClassVar = MasterMethod.BATCH_PUT_REVOKE


@dataclass(frozen=True, slots=True)
class BatchUpsertEndReply(BatchKeyResultsReply):
    METHOD: ClassVar = MasterMethod.BATCH_UPSERT_END


@dataclass(frozen=True, slots=True)
class BatchUpsertRevokeReply(BatchKeyResultsReply):
    METHOD: ClassVar = MasterMethod.BATCH_UPSERT_REVOKE


@dataclass(frozen=True, slots=True)
class BatchRemoveReply(BatchKeyResultsReply):
    METHOD: ClassVar = MasterMethod.BATCH_REMOVE


@dataclass(frozen=True, slots=True)
class GetReplicaListReply(Reply):
    """A readable object's replicas, its size and the lease the read took."""

    METHOD: ClassVar = MasterMethod.GET_REPLICA_LIST
    replicas: tuple[ReplicaWire, ...]
    lease_ttl_ms: int
    size: int

    JSON_TEXT: ClassVar[bool] = True

    def to_wire(self) -> dict[str, Any]:
        return {
            "replicas": _replicas_wire(self.replicas),
            "lease_ttl_ms": self.lease_ttl_ms,
            "size": self.size,
        }

    def to_json(self) -> str:
        # every get's reply: the text made directly, a third of the JSON encoder's
        # time for this shape (the replica's fields are (int, str, int, int, int, str))
        text = _json_str
        reps = ",".join(
            [f"[{r[0]},{text(r[1])},{r[2]},{r[3]},{r[4]},{text(r[5])}]" for r in self.replicas]
        )
        return f'{{"replicas":[{reps}],"lease_ttl_ms":{self.lease_ttl_ms},"size":{self.size}}}'

    @classmethod
    def decode(cls, value: Any) -> GetReplicaListReply:
        if type(value) is cls:  # (read typed from its frame: MasterFrameDecoder.whole_reply)
            return value
        if type(value) is dict:  # every get's reply: the common shape checked inline
            reps, ttl, size = value.get("replicas"), value.get("lease_ttl_ms"), value.get("size")
            if type(reps) is list and type(ttl) is int and type(size) is int:
                out: list[ReplicaWire] = []
                for r in reps:
                    if type(r) is not list or len(r) != 6 or tuple(map(type, r)) != _REPLICA_TYPES:
                        break  # the checks below say what is wrong
                    out.append((r[0], r[1], r[2], r[3], r[4], r[5]))
                else:
                    return cls(tuple(out), ttl, size)
        v = cls._dict(value, "reply", ("replicas", "lease_ttl_ms", "size"))
        return cls(
            cls._replicas(v["replicas"], "replicas"),
            cls._int(v["lease_ttl_ms"], "lease_ttl_ms"),
            cls._int(v["size"], "size"),
        )


@dataclass(frozen=True, slots=True)
class GetReplicaListByRegexReply(Reply):
    """``{key: replicas}`` for every readable key the pattern matches."""

    METHOD: ClassVar = MasterMethod.GET_REPLICA_LIST_BY_REGEX
    replicas: dict[str, tuple[ReplicaWire, ...]]

    def to_wire(self) -> dict[str, Any]:
        return {k: _replicas_wire(r) for k, r in self.replicas.items()}

    @classmethod
    def decode(cls, value: Any) -> GetReplicaListByRegexReply:
        v = cls._dict(value, "reply")
        return cls({k: cls._replicas(r, f"replicas of {k!r}") for k, r in v.items()})


@dataclass(frozen=True, slots=True)
class ExistKeyReply(Reply):
    METHOD: ClassVar = MasterMethod.EXIST_KEY
    exists: bool

    def to_wire(self) -> bool:
        return self.exists

    @classmethod
    def decode(cls, value: Any) -> ExistKeyReply:
        return cls(cls._bool(value, "exists"))


@dataclass(frozen=True, slots=True)
class BatchExistKeyReply(Reply):
    METHOD: ClassVar = MasterMethod.BATCH_EXIST_KEY
    exists: tuple[bool, ...]

    def to_wire(self) -> list[bool]:
        return list(self.exists)

    @classmethod
    def decode(cls, value: Any) -> BatchExistKeyReply:
        items = cls._list(value, "exists")
        if items and not set(map(type, items)) <= _BOOL:
            cls._bad("exists", "holds a value that is not a boolean")
        return cls(tuple(items))


@dataclass(frozen=True, slots=True)
class RemoveReply(DoneReply):
    METHOD: ClassVar = MasterMethod.REMOVE


@dataclass(frozen=True, slots=True)
class RemoveByRegexReply(CountReply):
    METHOD: ClassVar = MasterMethod.REMOVE_BY_REGEX


@dataclass(frozen=True, slots=True)
class RemoveAllReply(CountReply):
    METHOD: ClassVar = MasterMethod.REMOVE_ALL


@dataclass(frozen=True, slots=True)
class BatchReplicaClearReply(Reply):
    """The keys that lost replicas."""

    METHOD: ClassVar = MasterMethod.BATCH_REPLICA_CLEAR
    keys: tuple[str, ...]

    def to_wire(self) -> list[str]:
        return list(self.keys)

    @classmethod
    def decode(cls, value: Any) -> BatchReplicaClearReply:
        return cls(cls._strs(value, "keys"))


@dataclass(frozen=True, slots=True)
class FollowFrame(Reply):
    """One frame of the stream a leader answers ``Follow`` with: effect records
    up to sequence number ``seq``; ``synced`` on the frame that ends the
    initial state."""

    METHOD: ClassVar = MasterMethod.FOLLOW
    seq: int
    effects: tuple[list[Any], ...]
    synced: bool = False

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seq": self.seq, "effects": list(self.effects)}
        if self.synced:
            out["synced"] = True
        return out

    @classmethod
    def decode(cls, value: Any) -> FollowFrame:
        v = cls._dict(value, "frame", ("seq", "effects"))
        effects = cls._list(v["effects"], "effects")
        for i, e in enumerate(effects):
            if type(e) is not list or not e or type(e[0]) is not str:
                cls._bad(f"effects[{i}]", "is not an effect record [kind, ...]", e)
        synced = cls._bool(v["synced"], "synced") if "synced" in v else False
        return cls(cls._int(v["seq"], "seq"), tuple(effects), synced)


@dataclass(frozen=True, slots=True)
class CreateCopyTaskReply(Reply):
    """The new task's id (a UUID as two 64-bit halves)."""

    METHOD: ClassVar = MasterMethod.CREATE_COPY_TASK
    task_id: tuple[int, int]

    def to_wire(self) -> list[int]:
        return list(self.task_id)

    @classmethod
    def decode(cls: type[_R], value: Any) -> _R:
        return cls(cls._uuid(value, "task_id"))  # type: ignore[call-arg]


@dataclass(frozen=True, slots=True)
class CreateMoveTaskReply(CreateCopyTaskReply):
    METHOD: ClassVar = MasterMethod.CREATE_MOVE_TASK


_QUERY_FIELDS: Final = (
    "id",
    "type",
    "status",
    "created_at_ms_epoch",
    "last_updated_at_ms_epoch",
    "assigned_client",
    "message",
)


@dataclass(frozen=True, slots=True)
class QueryTaskReply(Reply):
    """The reference's QueryTaskResponse."""

    METHOD: ClassVar = MasterMethod.QUERY_TASK
    id: tuple[int, int]
    type: int
    status: int
    created_at_ms_epoch: int
    last_updated_at_ms_epoch: int
    assigned_client: tuple[int, int]
    message: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": list(self.id),
            "type": self.type,
            "status": self.status,
            "created_at_ms_epoch": self.created_at_ms_epoch,
            "last_updated_at_ms_epoch": self.last_updated_at_ms_epoch,
            "assigned_client": list(self.assigned_client),
            "message": self.message,
        }

    @classmethod
    def decode(cls, value: Any) -> QueryTaskReply:
        v = cls._dict(value, "task", _QUERY_FIELDS)
        return cls(
            cls._uuid(v["id"], "id"),
            cls._int(v["type"], "type"),
            cls._int(v["status"], "status"),
            cls._int(v["created_at_ms_epoch"], "created_at_ms_epoch"),
            cls._int(v["last_updated_at_ms_epoch"], "last_updated_at_ms_epoch"),
            cls._uuid(v["assigned_client"], "assigned_client"),
            cls._str(v["message"], "message"),
        )


_ASSIGNMENT_FIELDS: Final = (
    "id",
    "type",
    "key",
    "source",
    "targets",
    "created_at_ms_epoch",
    "max_retry_attempts",
)


@dataclass(frozen=True, slots=True)
class TaskAssignment:
    """One task ``FetchTasks`` hands out (the reference's TaskAssignment)."""

    id: tuple[int, int]
    type: int
    key: str
    source: str
    targets: tuple[str, ...]
    created_at_ms_epoch: int
    max_retry_attempts: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": list(self.id),
            "type": self.type,
            "key": self.key,
            "source": self.source,
            "targets": list(self.targets),
            "created_at_ms_epoch": self.created_at_ms_epoch,
            "max_retry_attempts": self.max_retry_attempts,
        }


@dataclass(frozen=True, slots=True)
class FetchTasksReply(Reply):
    METHOD: ClassVar = MasterMethod.FETCH_TASKS
    tasks: tuple[TaskAssignment, ...]

    def to_wire(self) -> list[dict[str, Any]]:
        return [t.to_wire() for t in self.tasks]

    @classmethod
    def decode(cls, value: Any) -> FetchTasksReply:
        out: list[TaskAssignment] = []
        for i, item in enumerate(cls._list(value, "tasks")):
            w = f"tasks[{i}]"
            v = cls._dict(item, w, _ASSIGNMENT_FIELDS)
            out.append(
                TaskAssignment(
                    cls._uuid(v["id"], f"{w}.id"),
                    cls._int(v["type"], f"{w}.type"),
                    cls._str(v["key"], f"{w}.key"),
                    cls._str(v["source"], f"{w}.source"),
                    cls._strs(v["targets"], f"{w}.targets"),
                    cls._int(v["created_at_ms_epoch"], f"{w}.created_at_ms_epoch"),
                    cls._int(v["max_retry_attempts"], f"{w}.max_retry_attempts"),
                )
            )
        return cls(tuple(out))


@dataclass(frozen=True, slots=True)
class MarkTaskToCompleteReply(DoneReply):
    METHOD: ClassVar = MasterMethod.MARK_TASK_TO_COMPLETE


@dataclass(frozen=True, slots=True)
class CopyStartReply(Reply):
    """Where to read (``source``) and the buffers reserved to write (``targets``)."""

    METHOD: ClassVar = MasterMethod.COPY_START
    source: ReplicaWire
    targets: tuple[ReplicaWire, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"source": list(self.source), "targets": _replicas_wire(self.targets)}

    @classmethod
    def decode(cls: type[_R], value: Any) -> _R:
        v = cls._dict(value, "reply", ("source", "targets"))
        return cls(  # type: ignore[call-arg]
            cls._replica(v["source"], "source"), cls._replicas(v["targets"], "targets")
        )


@dataclass(frozen=True, slots=True)
class MoveStartReply(CopyStartReply):
    METHOD: ClassVar = MasterMethod.MOVE_START


@dataclass(frozen=True, slots=True)
class CopyEndReply(DoneReply):
    METHOD: ClassVar = MasterMethod.COPY_END


@dataclass(frozen=True, slots=True)
class CopyRevokeReply(DoneReply):
    METHOD: ClassVar = MasterMethod.COPY_REVOKE


@dataclass(frozen=True, slots=True)
class MoveEndReply(DoneReply):
    METHOD: ClassVar = MasterMethod.MOVE_END


@dataclass(frozen=True, slots=True)
class MoveRevokeReply(DoneReply):
    METHOD: ClassVar = MasterMethod.MOVE_REVOKE


# the SSD tier ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MountLocalDiskReply(DoneReply):
    METHOD: ClassVar = MasterMethod.MOUNT_LOCAL_DISK


@dataclass(frozen=True, slots=True)
class UnmountLocalDiskReply(CountReply):
    METHOD: ClassVar = MasterMethod.UNMOUNT_LOCAL_DISK


@dataclass(frozen=True, slots=True)
class OffloadHeartbeatReply(Reply):
    """A client's SSD work: ``offload`` ``(key, size, segment id, address)``,
    ``promote`` ``(key, size)``, files to ``drop``; ``remount`` when the master
    does not know the client's disk (it restarted)."""

    METHOD: ClassVar = MasterMethod.OFFLOAD_HEARTBEAT
    offload: tuple[tuple[str, int, str, int], ...]
    promote: tuple[tuple[str, int], ...]
    drop: tuple[str, ...]
    remount: bool = False

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"remount": True} if self.remount else {}
        out["offload"] = [list(t) for t in self.offload]
        out["promote"] = [list(t) for t in self.promote]
        out["drop"] = list(self.drop)
        return out

    @classmethod
    def decode(cls, value: Any) -> OffloadHeartbeatReply:
        v = cls._dict(value, "reply", ("offload", "promote", "drop"))
        offload: list[tuple[str, int, str, int]] = []
        for i, t in enumerate(cls._list(v["offload"], "offload")):
            t = cls._list(t, f"offload[{i}]", 4)
            if not (
                type(t[0]) is str and type(t[1]) is int and type(t[2]) is str and type(t[3]) is int
            ):
                cls._bad(f"offload[{i}]", "is not [key, size, segment id, address]", t)
            offload.append((t[0], t[1], t[2], t[3]))
        promote: list[tuple[str, int]] = []
        for i, t in enumerate(cls._list(v["promote"], "promote")):
            t = cls._list(t, f"promote[{i}]", 2)
            if type(t[0]) is not str or type(t[1]) is not int:
                cls._bad(f"promote[{i}]", "is not [key, size]", t)
            promote.append((t[0], t[1]))
        remount = cls._bool(v["remount"], "remount") if "remount" in v else False
        return cls(tuple(offload), tuple(promote), cls._strs(v["drop"], "drop"), remount)


@dataclass(frozen=True, slots=True)
class NotifyOffloadSuccessReply(Reply):
    """A code per key (0 = registered)."""

    METHOD: ClassVar = MasterMethod.NOTIFY_OFFLOAD_SUCCESS
    codes: tuple[int, ...]

    def to_wire(self) -> list[int]:
        return list(self.codes)

    @classmethod
    def decode(cls, value: Any) -> NotifyOffloadSuccessReply:
        return cls(tuple(cls._ints(value, "codes")))


@dataclass(frozen=True, slots=True)
class BatchEvictDiskReplicaReply(CountReply):
    METHOD: ClassVar = MasterMethod.BATCH_EVICT_DISK_REPLICA


@dataclass(frozen=True, slots=True)
class GetStorageConfigReply(Reply):
    METHOD: ClassVar = MasterMethod.GET_STORAGE_CONFIG
    fsdir: str
    enable_disk_eviction: bool
    quota_bytes: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "fsdir": self.fsdir,
            "enable_disk_eviction": self.enable_disk_eviction,
            "quota_bytes": self.quota_bytes,
        }

    @classmethod
    def decode(cls, value: Any) -> GetStorageConfigReply:
        v = cls._dict(value, "reply", ("fsdir", "enable_disk_eviction", "quota_bytes"))
        return cls(
            cls._str(v["fsdir"], "fsdir"),
            cls._bool(v["enable_disk_eviction"], "enable_disk_eviction"),
            cls._int(v["quota_bytes"], "quota_bytes"),
        )


# ---------------------------------------------------------------------------------
# request type -> reply type
# ---------------------------------------------------------------------------------

_REPLIES: Final[dict[type[msg.Request], type[Reply] | None]] = {
    msg.ServiceReady: ServiceReadyReply,
    msg.GetSummary: GetSummaryReply,
    msg.Ping: PingReply,
    msg.MountSegment: MountSegmentReply,
    msg.ReMountSegment: ReMountSegmentReply,
    msg.UnmountSegment: UnmountSegmentReply,
    msg.PutStart: PutStartReply,
    msg.PutEnd: PutEndReply,
    msg.PutRevoke: PutRevokeReply,
    msg.BatchPutStart: BatchPutStartReply,
    msg.BatchPutEnd: BatchPutEndReply,
    msg.BatchPutRevoke: BatchPutRevokeReply,
    msg.UpsertStart: UpsertStartReply,
    msg.UpsertEnd: UpsertEndReply,
    msg.UpsertRevoke: UpsertRevokeReply,
    msg.BatchUpsertStart: BatchUpsertStartReply,
    msg.BatchUpsertEnd: BatchUpsertEndReply,
    msg.BatchUpsertRevoke: BatchUpsertRevokeReply,
    msg.ReserveSlots: ReserveSlotsReply,
    msg.CommitSlot: CommitSlotReply,
    msg.BatchCommitSlots: BatchCommitSlotsReply,
    msg.GetReplicaList: GetReplicaListReply,
    msg.BatchGetReplicaList: BatchGetReplicaListReply,
    msg.GetReplicaListByRegex: GetReplicaListByRegexReply,
    msg.ExistKey: ExistKeyReply,
    msg.BatchExistKey: BatchExistKeyReply,
    msg.Remove: RemoveReply,
    msg.BatchRemove: BatchRemoveReply,
    msg.RemoveByRegex: RemoveByRegexReply,
    msg.RemoveAll: RemoveAllReply,
    msg.BatchReplicaClear: BatchReplicaClearReply,
    msg.Follow: FollowFrame,
    msg.Ack: None,  # one-way: a standby's acknowledgement is never answered
    msg.HaConfirm: HaConfirmReply,
    msg.CreateCopyTask: CreateCopyTaskReply,
    msg.CreateMoveTask: CreateMoveTaskReply,
    msg.QueryTask: QueryTaskReply,
    msg.FetchTasks: FetchTasksReply,
    msg.MarkTaskToComplete: MarkTaskToCompleteReply,
    msg.CopyStart: CopyStartReply,
    msg.CopyEnd: CopyEndReply,
    msg.CopyRevoke: CopyRevokeReply,
    msg.MoveStart: MoveStartReply,
    msg.MoveEnd: MoveEndReply,
    msg.MoveRevoke: MoveRevokeReply,
    omsg.MountLocalDisk: MountLocalDiskReply,
    omsg.UnmountLocalDisk: UnmountLocalDiskReply,
    omsg.OffloadHeartbeat: OffloadHeartbeatReply,
    omsg.NotifyOffloadSuccess: NotifyOffloadSuccessReply,
    omsg.BatchEvictDiskReplica: BatchEvictDiskReplicaReply,
    omsg.PromotionAllocStart: PromotionAllocStartReply,
    omsg.GetStorageConfig: GetStorageConfigReply,
}

for _req, _rep in _REPLIES.items():
    assert _rep is None or _rep.METHOD is _req.METHOD, f"{_req.__name__} -> {_rep}"
    _req.REPLY = _rep
del _req, _rep

#: method -> reply type (``None`` for the one-way ``Ack``)
REPLY_TYPES: Final[dict[MasterMethod, type[Reply] | None]] = {
    req.METHOD: rep for req, rep in _REPLIES.items()
}


def reply_type(request: msg.Request | type[msg.Request]) -> type[Reply] | None:
    """The reply type of a request (or request type)."""
    rep: type[Reply] | None = request.REPLY
    return rep


# cheaper construction of the values above: one or two per call (_frozen.py)
fast_frozen_inits(globals())
