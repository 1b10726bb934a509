"""Typed requests of the store master's RPC, validated once at the boundary.

Theory of operation
-------------------
Each method has one frozen message type.  :func:`decode_request` turns the
decoded JSON parameters of a frame into that type or raises
:class:`~pymooncake.errors.InvalidParams` naming the field and the rule it
broke; nothing past this module sees an unchecked value.  The rules:

* strings are ``str``, encodable as UTF-8 (no lone surrogates: a name that cannot
  be encoded again would break every reply that lists it), and bounded in
  length; keys are non-empty, at most :data:`MAX_KEY_CHARS` characters and free
  of NUL (the regex scanner separates keys with it);
* integers are ``int`` (never ``bool`` or ``float``) within ``[0, 2**64)``;
* lists are bounded (:data:`MAX_BATCH_KEYS`, :data:`MAX_SEGMENTS`) and parallel
  lists have equal lengths;
* regular expressions are at most :data:`MAX_REGEX_CHARS` long (their cost is
  bounded by the master's scanner, not here).

**Exactly once.**  Every mutating request carries the sender's ``client_id`` and a
request id ``rid`` (positive, increasing per client; 0 = none) plus ``ack``: the
lowest ``rid`` the client may still retry.  A retry after a lost reply re-sends
the same ``rid`` and gets the first attempt's answer from the master's reply
cache instead of being executed twice; ``ack`` lets the master forget answers
nobody can ask for again.

This module neither opens sockets nor touches master state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from itertools import chain, repeat
from typing import Any, ClassVar, Final, overload

from .._frozen import fast_frozen_inits
from ..errors import InvalidParams

__all__ = [
    "MAX_BATCH_KEYS",
    "MAX_KEY_CHARS",
    "MAX_REGEX_CHARS",
    "MAX_SEGMENTS",
    "REQUEST_TYPES",
    "SLOT_INDEXES",
    "SLOT_MARK",
    "SLOT_PREFIX",
    "Ack",
    "BatchCommitSlots",
    "BatchExistKey",
    "BatchGetReplicaList",
    "BatchPutEnd",
    "BatchPutRevoke",
    "BatchPutStart",
    "BatchRemove",
    "BatchReplicaClear",
    "BatchUpsertEnd",
    "BatchUpsertRevoke",
    "BatchUpsertStart",
    "CommitSlot",
    "CopyEnd",
    "CopyRevoke",
    "CopyStart",
    "CreateCopyTask",
    "CreateMoveTask",
    "ExistKey",
    "FetchTasks",
    "Follow",
    "GetReplicaList",
    "GetReplicaListByRegex",
    "GetSummary",
    "MarkTaskToComplete",
    "MasterMethod",
    "MountSegment",
    "MoveEnd",
    "MoveRevoke",
    "MoveStart",
    "Mutation",
    "Ping",
    "PutEnd",
    "PutRevoke",
    "PutStart",
    "QueryTask",
    "ReMountSegment",
    "Remove",
    "RemoveAll",
    "RemoveByRegex",
    "ReplicateParams",
    "Request",
    "ReserveSlots",
    "SegmentParams",
    "ServiceReady",
    "SlotRuns",
    "UnmountSegment",
    "UpsertEnd",
    "UpsertRevoke",
    "UpsertStart",
    "check_surrogates",
    "decode_request",
    "slot_head",
    "slot_name",
    "slot_names",
]

#: longest key (characters); KV-cache keys of vLLM/SGLang/LMCache are < 300
MAX_KEY_CHARS: Final = 4096
#: most keys in one batch request (a 64 MiB frame holds ~600k short keys)
MAX_BATCH_KEYS: Final = 200_000
#: longest regular expression accepted by the *ByRegex calls
MAX_REGEX_CHARS: Final = 1024
#: most segments in one ReMountSegment
MAX_SEGMENTS: Final = 4096
#: longest segment id / name / host id (transfer-engine names are host:port)
MAX_NAME_CHARS: Final = 1024
#: reserved buffers (ReserveSlots) are writes in progress under names with this
#: prefix; keys cannot hold the control character, so no put can touch one
SLOT_PREFIX: Final = "\x01slot:"
#: the first character of every reserved name (a cheap test)
SLOT_MARK: Final = SLOT_PREFIX[0]


def slot_head(client_id: str, batch: str) -> str:
    """The names of a client's reservation ``batch`` up to the buffer's index
    (how the master keys a reservation held as a run)."""
    return f"{SLOT_PREFIX}{client_id}:{batch}"


def slot_name(client_id: str, batch: str, i: int) -> str:
    """The master's name of buffer ``i`` of a client's reservation ``batch``."""
    return f"{slot_head(client_id, batch)}:{i}"


def slot_names(client_id: str, batch: str, count: int, first: int = 0) -> list[str]:
    """:func:`slot_name` of buffers ``first .. first+count-1`` of a reservation."""
    head = slot_head(client_id, batch) + ":"
    end = first + count
    if end <= len(SLOT_INDEXES):  # (joining two strings is ~2.5x faster than formatting)
        return [head + i for i in SLOT_INDEXES[first:end]]
    return [f"{head}{i}" for i in range(first, end)]


#: most buffers one ReserveSlots may ask for
MAX_SLOTS: Final = 256
#: the index part of the names of a reservation's buffers, by index
SLOT_INDEXES: Final = tuple(str(i) for i in range(MAX_SLOTS))


class SlotRuns(Sequence[str]):
    """The names of reserved buffers given as runs of one reservation each:
    ``(batch, first, count)`` stands for buffers ``first .. first + count - 1``
    of ``client_id``'s reservation ``batch`` (:func:`slot_names`).

    How a batch commit names its buffers (``BatchCommitSlots``): 32 buffers
    taken in order from one reservation are one run on the wire instead of 32
    names of ~50 characters, and the master's commit finds each buffer from its
    run and index without parsing a name (``MasterState.commit_slots_many``).
    As a sequence it holds the names themselves (made when first asked for)."""

    __slots__ = ("_names", "client_id", "runs", "total")

    def __init__(self, client_id: str, runs: Sequence[tuple[str, int, int]]) -> None:
        self.client_id = client_id
        self.runs: tuple[tuple[str, int, int], ...] = tuple(
            (batch, first, count) for batch, first, count in runs
        )
        #: buffers named (``count`` is Sequence's method)
        self.total = sum(count for _, _, count in self.runs)
        self._names: list[str] | None = None

    @classmethod
    def of(cls, client_id: str, pairs: Sequence[tuple[str, int]]) -> SlotRuns:
        """The runs of buffers named by ``(batch, index)``, in order."""
        runs: list[list[Any]] = []
        last: list[Any] = ["", -2, 0]
        for batch, i in pairs:
            if i == last[1] + last[2] and batch == last[0]:
                last[2] += 1
            else:
                last = [batch, i, 1]
                runs.append(last)
        return cls(client_id, runs)  # type: ignore[arg-type]

    def heads(self) -> Iterator[str]:
        """Per buffer, its name up to the index (:func:`slot_head`)."""
        client = self.client_id
        return chain.from_iterable(
            repeat(slot_head(client, batch), count) for batch, _, count in self.runs
        )

    def indexes(self) -> Iterator[int]:
        """Per buffer, its index in its reservation."""
        return chain.from_iterable(range(first, first + count) for _, first, count in self.runs)

    def names(self) -> list[str]:
        names = self._names
        if names is None:
            names = []
            for batch, first, count in self.runs:
                names += slot_names(self.client_id, batch, count, first)
            self._names = names
        return names

    def __len__(self) -> int:
        return self.total

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        return self.names()[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SlotRuns):
            return self.client_id == other.client_id and self.runs == other.runs
        if isinstance(other, (tuple, list)):
            return self.names() == list(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self.names()))

    def __repr__(self) -> str:
        return f"SlotRuns({self.client_id!r}, {list(self.runs)!r})"


#: most replicas one object may ask for
MAX_REPLICAS: Final = 64
_U64: Final = 1 << 64


class MasterMethod(str, Enum):
    SERVICE_READY = "ServiceReady"
    PING = "Ping"
    MOUNT_SEGMENT = "MountSegment"
    REMOUNT_SEGMENTS = "ReMountSegment"
    UNMOUNT_SEGMENT = "UnmountSegment"
    PUT_START = "PutStart"
    PUT_END = "PutEnd"
    PUT_REVOKE = "PutRevoke"
    BATCH_PUT_START = "BatchPutStart"
    BATCH_PUT_END = "BatchPutEnd"
    BATCH_PUT_REVOKE = "BatchPutRevoke"
    UPSERT_START = "UpsertStart"
    UPSERT_END = "UpsertEnd"
    UPSERT_REVOKE = "UpsertRevoke"
    BATCH_UPSERT_START = "BatchUpsertStart"
    BATCH_UPSERT_END = "BatchUpsertEnd"
    BATCH_UPSERT_REVOKE = "BatchUpsertRevoke"
    #: pymooncake: reserve buffers for single puts to come, and make one of them
    #: the value of a key (a small put in one round trip)
    RESERVE_SLOTS = "ReserveSlots"
    COMMIT_SLOT = "CommitSlot"
    #: pymooncake: many reserved buffers made values of keys (a batch put in one
    #: round trip)
    BATCH_COMMIT_SLOTS = "BatchCommitSlots"
    GET_REPLICA_LIST = "GetReplicaList"
    BATCH_GET_REPLICA_LIST = "BatchGetReplicaList"
    GET_REPLICA_LIST_BY_REGEX = "GetReplicaListByRegex"
    EXIST_KEY = "ExistKey"
    BATCH_EXIST_KEY = "BatchExistKey"
    REMOVE = "Remove"
    BATCH_REMOVE = "BatchRemove"
    REMOVE_BY_REGEX = "RemoveByRegex"
    REMOVE_ALL = "RemoveAll"
    BATCH_REPLICA_CLEAR = "BatchReplicaClear"
    GET_SUMMARY = "GetSummary"
    #: a standby subscribes to the leader's effect stream (HA)
    FOLLOW = "Follow"
    #: a standby acknowledges the stream up to a sequence number
    ACK = "Ack"
    #: HA: a client confirms the puts it is ending to a standby, in parallel with
    #: their PutEnd at the leader
    HA_CONFIRM = "HaConfirm"
    CREATE_COPY_TASK = "CreateCopyTask"
    CREATE_MOVE_TASK = "CreateMoveTask"
    QUERY_TASK = "QueryTask"
    FETCH_TASKS = "FetchTasks"
    MARK_TASK_TO_COMPLETE = "MarkTaskToComplete"
    COPY_START = "CopyStart"
    COPY_END = "CopyEnd"
    COPY_REVOKE = "CopyRevoke"
    MOVE_START = "MoveStart"
    MOVE_END = "MoveEnd"
    MOVE_REVOKE = "MoveRevoke"
    # the SSD tier (``_offload_msgs.py``)
    MOUNT_LOCAL_DISK = "MountLocalDiskSegment"
    UNMOUNT_LOCAL_DISK = "UnmountLocalDiskSegment"
    OFFLOAD_HEARTBEAT = "OffloadObjectHeartbeat"
    NOTIFY_OFFLOAD_SUCCESS = "NotifyOffloadSuccess"
    BATCH_EVICT_DISK_REPLICA = "BatchEvictDiskReplica"
    PROMOTION_ALLOC_START = "PromotionAllocStart"
    GET_STORAGE_CONFIG = "GetStorageConfig"


# ---------------------------------------------------------------------------------
# field rules
# ---------------------------------------------------------------------------------


def _bad(what: str, rule: str, value: Any = None) -> InvalidParams:
    shown = "" if value is None else f" (got {_show(value)})"
    return InvalidParams(f"{what} {rule}{shown}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_surrogates(value: Any, what: str) -> None:
    """Refuse strings that cannot be encoded as UTF-8 anywhere in ``value``."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                raise _bad(what, "holds a string with a lone surrogate", item) from None
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())


def _field(p: dict[str, Any], name: str, default: Any = ...) -> Any:
    if name in p:
        return p[name]
    if default is ...:
        raise InvalidParams(f"parameter {name!r} is missing")
    return default


def _text(value: Any, what: str, max_chars: int = MAX_NAME_CHARS, *, empty: bool = True) -> str:
    if type(value) is not str:
        raise _bad(what, "must be a string", value)
    if len(value) > max_chars:
        raise _bad(what, f"is longer than {max_chars} characters", value)
    if not empty and not value:
        raise _bad(what, "must not be empty")
    return value


def _key(value: Any, what: str = "key") -> str:
    if type(value) is not str:
        raise _bad(what, "must be a string", value)
    if not value:
        raise InvalidParams(f"{what} must not be empty")
    if len(value) > MAX_KEY_CHARS:
        raise _bad(what, f"is longer than {MAX_KEY_CHARS} characters", value)
    if "\0" in value:
        raise _bad(what, "must not contain NUL characters", value)
    return value


#: the types a column of keys / of integers may hold (checked with one C-level set)
_STR: Final = frozenset({str})
_INT: Final = frozenset({int})


def _keys(value: Any, what: str = "keys") -> tuple[str, ...]:
    if type(value) is not list:
        raise _bad(what, "must be a list of strings", value)
    n = len(value)
    if n > MAX_BATCH_KEYS:
        raise _bad(what, f"holds {n} keys; at most {MAX_BATCH_KEYS} per request")
    if not n:
        return ()
    # column-wise checks run in C; the per-key loop only runs to name the culprit
    if not set(map(type, value)) <= _STR:
        bad = next(k for k in value if type(k) is not str)
        raise _bad(what, "must hold only strings", bad)
    if "" in value:
        raise InvalidParams(f"{what} holds an empty key")
    if max(map(len, value)) > MAX_KEY_CHARS:
        bad = next(k for k in value if len(k) > MAX_KEY_CHARS)
        raise _bad(what, f"holds a key longer than {MAX_KEY_CHARS} characters", bad)
    if "\0" in "".join(value):
        bad = next(k for k in value if "\0" in k)
        raise _bad(what, "holds a key with a NUL character", bad)
    return tuple(value)


def _u64(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value < _U64:
        raise _bad(what, "must be an integer in [0, 2**64)", value)
    return value


def _sizes(value: Any, n: int) -> tuple[int, ...]:
    """A batch's sizes: a list of ``n`` integers, or one integer when every key
    has that size (see :func:`sizes_wire`)."""
    if type(value) is int:
        if not 0 <= value < _U64:
            raise _bad("sizes", "must hold integers in [0, 2**64)", value)
        return (value,) * n
    if type(value) is not list or len(value) != n:
        raise _bad("sizes", f"must be a list of {n} integers (one per key)", value)
    if n and (not set(map(type, value)) <= _INT or min(value) < 0 or max(value) >= _U64):
        bad = next(s for s in value if type(s) is not int or not 0 <= s < _U64)
        raise _bad("sizes", "must hold integers in [0, 2**64)", bad)
    return tuple(value)


def sizes_wire(sizes: tuple[int, ...]) -> int | list[int]:
    """The sizes of a batch as :func:`_sizes` reads them: one integer when they
    are all the same (a batch of equal blocks, the common case), else the list."""
    if sizes and sizes.count(sizes[0]) == len(sizes):
        return sizes[0]
    return list(sizes)


def _bool(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise _bad(what, "must be true or false", value)
    return value


def _names(value: Any, what: str, limit: int = MAX_SEGMENTS) -> tuple[str, ...]:
    if value is None:
        return ()
    if type(value) is not list or len(value) > limit:
        raise _bad(what, f"must be a list of at most {limit} strings", value)
    return tuple(_text(v, what) for v in value)


# ---------------------------------------------------------------------------------
# composite parameters
# ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplicateParams:
    """How a put places and pins its replicas (``ReplicateConfig`` on the wire)."""

    replica_num: int = 1
    soft_pin_action: int = 0  # SoftPinAction: 0 PRESERVE, 1 ENABLE, 2 DISABLE
    soft_pin_ttl_ms: int | None = None
    with_hard_pin: bool = False
    preferred_segments: tuple[str, ...] = ()
    excluded_segments: tuple[str, ...] = ()

    @property
    def pin_action(self) -> int:
        return self.soft_pin_action

    def to_wire(self) -> dict[str, Any]:
        return {
            "replica_num": self.replica_num,
            "soft_pin_action": self.soft_pin_action,
            "soft_pin_ttl_ms": self.soft_pin_ttl_ms,
            "with_hard_pin": self.with_hard_pin,
            "preferred_segments": list(self.preferred_segments),
            "excluded_segments": list(self.excluded_segments),
        }

    @classmethod
    def decode(cls, value: Any) -> ReplicateParams:
        if value is None:
            return _DEFAULT_REPLICATE
        if type(value) is not dict:
            raise _bad("config", "must be an object", value)
        n = value.get("replica_num", 1)
        if type(n) is not int or not 1 <= n <= MAX_REPLICAS:
            raise _bad("config.replica_num", f"must be an integer in [1, {MAX_REPLICAS}]", n)
        action = value.get("soft_pin_action", 0)
        if type(action) is not int or action not in (0, 1, 2):
            raise _bad("config.soft_pin_action", "must be 0, 1 or 2", action)
        ttl = value.get("soft_pin_ttl_ms")
        return cls(
            replica_num=n,
            soft_pin_action=action,
            soft_pin_ttl_ms=None if ttl is None else _u64(ttl, "config.soft_pin_ttl_ms"),
            with_hard_pin=_bool(value.get("with_hard_pin", False), "config.with_hard_pin"),
            preferred_segments=_names(value.get("preferred_segments"), "config.preferred_segments"),
            excluded_segments=_names(value.get("excluded_segments"), "config.excluded_segments"),
        )


_DEFAULT_REPLICATE: Final = ReplicateParams()


@dataclass(frozen=True, slots=True)
class SegmentParams:
    """A segment offered to the store: ``size`` bytes at ``base`` in engine segment ``name``."""

    id: str
    name: str
    base: int
    size: int
    host_id: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "base": self.base,
            "size": self.size,
            "host_id": self.host_id,
        }

    @classmethod
    def decode(cls, value: Any) -> SegmentParams:
        if type(value) is not dict:
            raise _bad("segment", "must be an object", value)
        base = _u64(_field(value, "base"), "segment.base")
        size = _u64(_field(value, "size"), "segment.size")
        if base == 0 or size == 0:
            raise _bad("segment", "needs a non-zero base and size", value)
        return cls(
            id=_text(_field(value, "id"), "segment.id", empty=False),
            name=_text(_field(value, "name"), "segment.name", empty=False),
            base=base,
            size=size,
            host_id=_text(value.get("host_id", ""), "segment.host_id"),
        )


# ---------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------


class Request:
    """Base of every master request type."""

    __slots__ = ()
    METHOD: ClassVar[MasterMethod]
    #: ``METHOD.value``, a plain class attribute (the enum's ``value`` is a
    #: descriptor call, paid on every request by the master and the client)
    NAME: ClassVar[str] = ""
    #: the type of the answer (``_master_reply_msgs.py``); None for a one-way message
    REPLY: ClassVar[Any] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        method = cls.__dict__.get("METHOD")
        if method is not None:
            cls.NAME = method.value

    def params(self) -> dict[str, Any]:
        raise NotImplementedError


class Mutation(Request):
    """A request that changes master state: carries ``client_id``, ``rid``, ``ack``."""

    __slots__ = ()
    client_id: str
    rid: int
    ack: int


def _session(p: dict[str, Any], *, client_required: bool = True) -> tuple[str, int, int]:
    client = p.get("client_id", None if client_required else "")
    if client is None:
        raise InvalidParams("parameter 'client_id' is missing")
    return (
        _text(client, "client_id", empty=not client_required),
        _u64(p.get("rid", 0), "rid"),
        _u64(p.get("ack", 0), "ack"),
    )


def _session_params(req: Mutation) -> dict[str, Any]:
    out: dict[str, Any] = {"client_id": req.client_id}
    if req.rid:
        out["rid"] = req.rid
        out["ack"] = req.ack
    return out


@dataclass(frozen=True, slots=True)
class ServiceReady(Request):
    METHOD: ClassVar = MasterMethod.SERVICE_READY

    def params(self) -> dict[str, Any]:
        return {}

    @classmethod
    def decode(cls, p: dict[str, Any]) -> ServiceReady:
        return cls()


@dataclass(frozen=True, slots=True)
class GetSummary(Request):
    METHOD: ClassVar = MasterMethod.GET_SUMMARY

    def params(self) -> dict[str, Any]:
        return {}

    @classmethod
    def decode(cls, p: dict[str, Any]) -> GetSummary:
        return cls()


@dataclass(frozen=True, slots=True)
class Ping(Request):
    METHOD: ClassVar = MasterMethod.PING
    client_id: str

    def params(self) -> dict[str, Any]:
        return {"client_id": self.client_id}

    @classmethod
    def decode(cls, p: dict[str, Any]) -> Ping:
        return cls(_text(_field(p, "client_id"), "client_id", empty=False))


@dataclass(frozen=True, slots=True)
class MountSegment(Mutation):
    METHOD: ClassVar = MasterMethod.MOUNT_SEGMENT
    client_id: str
    segment: SegmentParams
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        return {**_session_params(self), "segment": self.segment.to_wire()}

    @classmethod
    def decode(cls, p: dict[str, Any]) -> MountSegment:
        client, rid, ack = _session(p)
        return cls(client, SegmentParams.decode(_field(p, "segment")), rid, ack)


@dataclass(frozen=True, slots=True)
class ReMountSegment(Mutation):
    METHOD: ClassVar = MasterMethod.REMOUNT_SEGMENTS
    client_id: str
    segments: tuple[SegmentParams, ...]
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        return {**_session_params(self), "segments": [s.to_wire() for s in self.segments]}

    @classmethod
    def decode(cls, p: dict[str, Any]) -> ReMountSegment:
        client, rid, ack = _session(p)
        segs = _field(p, "segments")
        if type(segs) is not list or len(segs) > MAX_SEGMENTS:
            raise _bad("segments", f"must be a list of at most {MAX_SEGMENTS} segments", segs)
        return cls(client, tuple(SegmentParams.decode(s) for s in segs), rid, ack)


@dataclass(frozen=True, slots=True)
class UnmountSegment(Mutation):
    METHOD: ClassVar = MasterMethod.UNMOUNT_SEGMENT
    client_id: str
    segment_id: str
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        return {**_session_params(self), "segment_id": self.segment_id}

    @classmethod
    def decode(cls, p: dict[str, Any]) -> UnmountSegment:
        client, rid, ack = _session(p)
        return cls(client, _text(_field(p, "segment_id"), "segment_id", empty=False), rid, ack)


@dataclass(frozen=True, slots=True)
class _Start(Mutation):
    client_id: str
    key: str
    size: int
    config: ReplicateParams = _DEFAULT_REPLICATE
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        out = _session_params(self)
        out["key"] = self.key
        out["size"] = self.size
        if self.config is not _DEFAULT_REPLICATE:
            out["config"] = self.config.to_wire()
        return out

    @classmethod
    def decode(cls, p: dict[str, Any]) -> Any:
        client, rid, ack = _session(p)
        return cls(
            client,
            _key(_field(p, "key")),
            _u64(_field(p, "size"), "size"),
            ReplicateParams.decode(p.get("config")),
            rid,
            ack,
        )


@dataclass(frozen=True, slots=True)
class PutStart(_Start):
    METHOD: ClassVar = MasterMethod.PUT_START


@dataclass(frozen=True, slots=True)
class UpsertStart(_Start):
    METHOD: ClassVar = MasterMethod.UPSERT_START


@dataclass(frozen=True, slots=True)
class _BatchStart(Mutation):
    client_id: str
    keys: tuple[str, ...]
    sizes: tuple[int, ...]
    config: ReplicateParams = _DEFAULT_REPLICATE
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        out = _session_params(self)
        out["keys"] = list(self.keys)
        out["sizes"] = sizes_wire(self.sizes)
        if self.config is not _DEFAULT_REPLICATE:
            out["config"] = self.config.to_wire()
        return out

    @classmethod
    def decode(cls, p: dict[str, Any]) -> Any:
        client, rid, ack = _session(p)
        keys = _keys(_field(p, "keys"))
        return cls(
            client,
            keys,
            _sizes(_field(p, "sizes"), len(keys)),
            ReplicateParams.decode(p.get("config")),
            rid,
            ack,
        )


@dataclass(frozen=True, slots=True)
class BatchPutStart(_BatchStart):
    METHOD: ClassVar = MasterMethod.BATCH_PUT_START


@dataclass(frozen=True, slots=True)
class BatchUpsertStart(_BatchStart):
    METHOD: ClassVar = MasterMethod.BATCH_UPSERT_START


@dataclass(frozen=True, slots=True)
class _KeyOp(Mutation):
    client_id: str
    key: str
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        out = _session_params(self)
        out["key"] = self.key
        return out

    @classmethod
    def decode(cls, p: dict[str, Any]) -> Any:
        client, rid, ack = _session(p)
        return cls(client, _key(_field(p, "key")), rid, ack)


#: most standbys a PutEnd may name (a cluster has one leader and a few standbys)
MAX_STANDBYS: Final = 8


def _standbys(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if type(value) is not list or len(value) > MAX_STANDBYS:
        raise _bad("confirmed", f"must be a list of at most {MAX_STANDBYS} addresses", value)
    return tuple(_text(v, "confirmed[]", empty=False) for v in value)


@dataclass(frozen=True, slots=True)
class PutEnd(_KeyOp):
    """``confirmed`` (HA): the standbys the client confirms this put to itself
    (:class:`HaConfirm`, sent in parallel); when they are every standby in sync,
    the leader answers without waiting for a standby's acknowledgement."""

    METHOD: ClassVar = MasterMethod.PUT_END
    confirmed: tuple[str, ...] = ()

    def params(self) -> dict[str, Any]:
        out = _KeyOp.params(self)
        if self.confirmed:
            out["confirmed"] = list(self.confirmed)
        return out

    @classmethod
    def decode(cls, p: dict[str, Any]) -> PutEnd:
        client, rid, ack = _session(p)
        return cls(client, _key(_field(p, "key")), rid, ack, _standbys(p.get("confirmed")))


@dataclass(frozen=True, slots=True)
class PutRevoke(_KeyOp):
    METHOD: ClassVar = MasterMethod.PUT_REVOKE


@dataclass(frozen=True, slots=True)
class UpsertEnd(_KeyOp):
    METHOD: ClassVar = MasterMethod.UPSERT_END


@dataclass(frozen=True, slots=True)
class UpsertRevoke(_KeyOp):
    METHOD: ClassVar = MasterMethod.UPSERT_REVOKE


@dataclass(frozen=True, slots=True)
class _KeysOp(Mutation):
    client_id: str
    keys: tuple[str, ...]
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        out = _session_params(self)
        out["keys"] = list(self.keys)
        return out

    @classmethod
    def decode(cls, p: dict[str, Any]) -> Any:
        client, rid, ack = _session(p)
        return cls(client, _keys(_field(p, "keys")), rid, ack)


@dataclass(frozen=True, slots=True)
class BatchPutEnd(_KeysOp):
    """``confirmed``: as :class:`PutEnd`'s."""

    METHOD: ClassVar = MasterMethod.BATCH_PUT_END
    confirmed: tuple[str, ...] = ()

    def params(self) -> dict[str, Any]:
        out = _KeysOp.params(self)
        if self.confirmed:
            out["confirmed"] = list(self.confirmed)
        return out

    @classmethod
    def decode(cls, p: dict[str, Any]) -> BatchPutEnd:
        client, rid, ack = _session(p)
        return cls(client, _keys(_field(p, "keys")), rid, ack, _standbys(p.get("confirmed")))


@dataclass(frozen=True, slots=True)
class BatchPutRevoke(_KeysOp):
    METHOD: ClassVar = MasterMethod.BATCH_PUT_REVOKE


@dataclass(frozen=True, slots=True)
class BatchUpsertEnd(_KeysOp):
    METHOD: ClassVar = MasterMethod.BATCH_UPSERT_END


@dataclass(frozen=True, slots=True)
class BatchUpsertRevoke(_KeysOp):
    METHOD: ClassVar = MasterMethod.BATCH_UPSERT_REVOKE


@dataclass(frozen=True, slots=True)
class ReserveSlots(Mutation):
    """pymooncake: reserve ``count`` buffers of ``size`` bytes, each placed as a
    put of that size with ``config`` would be, for single puts to come.  Each is
    a put in progress under a name the master makes up (no key can take it);
    :class:`CommitSlot` makes one the value of a key, so that a put costs one
    round trip (write, then commit) instead of two (start, write, end)."""

    METHOD: ClassVar = MasterMethod.RESERVE_SLOTS
    client_id: str
    size: int
    count: int
    #: the client's name for this reservation: the buffers are named after it
    #: (``<client_id>:<batch>:<i>``), so a client whose request got no answer
    #: knows what to revoke
    batch: str
    config: ReplicateParams = _DEFAULT_REPLICATE
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        out = _session_params(self)
        out["size"] = self.size
        out["count"] = self.count
        out["batch"] = self.batch
        if self.config is not _DEFAULT_REPLICATE:
            out["config"] = self.config.to_wire()
        return out

    @classmethod
    def decode(cls, p: dict[str, Any]) -> ReserveSlots:
        client, rid, ack = _session(p)
        size = _u64(_field(p, "size"), "size")
        if size == 0:
            raise _bad("size", "must be positive", size)
        count = _u64(_field(p, "count"), "count")
        if not 1 <= count <= MAX_SLOTS:
            raise _bad("count", f"must be 1..{MAX_SLOTS}", count)
        batch = _text(_field(p, "batch"), "batch", 64, empty=False)
        return cls(client, size, count, batch, ReplicateParams.decode(p.get("config")), rid, ack)


@dataclass(frozen=True, slots=True)
class CommitSlot(Mutation):
    """pymooncake: the buffer reserved as ``slot`` (by :class:`ReserveSlots`, and
    written by this client) becomes the value of ``key``.  ``confirmed``: as
    :class:`PutEnd`'s (the client confirms the pair to those standbys itself)."""

    METHOD: ClassVar = MasterMethod.COMMIT_SLOT
    client_id: str
    slot: str
    key: str
    rid: int = 0
    ack: int = 0
    confirmed: tuple[str, ...] = ()

    def params(self) -> dict[str, Any]:
        out = _session_params(self)
        out["slot"] = self.slot
        out["key"] = self.key
        if self.confirmed:
            out["confirmed"] = list(self.confirmed)
        return out

    @classmethod
    def decode(cls, p: dict[str, Any]) -> CommitSlot:
        client, slot, key = p.get("client_id"), p.get("slot"), p.get("key")
        rid, ack = p.get("rid", 0), p.get("ack", 0)
        if (  # the valid case inline (every single put); the checks below explain
            type(key) is str
            and 0 < len(key) <= MAX_KEY_CHARS
            and "\0" not in key
            and type(slot) is str
            and 0 < len(slot) <= MAX_NAME_CHARS
            and type(client) is str
            and 0 < len(client) <= MAX_NAME_CHARS
            and type(rid) is int
            and 0 <= rid < _U64
            and type(ack) is int
            and 0 <= ack < _U64
            and "confirmed" not in p
        ):
            return cls(client, slot, key, rid, ack)
        client, rid, ack = _session(p)
        return cls(
            client,
            _text(_field(p, "slot"), "slot", empty=False),
            _key(_field(p, "key")),
            rid,
            ack,
            _standbys(p.get("confirmed")),
        )


@dataclass(frozen=True, slots=True)
class BatchCommitSlots(Mutation):
    """pymooncake: :class:`CommitSlot` for many buffers at once: ``slots[i]``
    becomes the value of ``keys[i]``; answered with a code and message per key,
    each as :class:`CommitSlot` would answer it.  ``confirmed``: as :class:`PutEnd`'s."""

    METHOD: ClassVar = MasterMethod.BATCH_COMMIT_SLOTS
    client_id: str
    #: the buffers' names, or their runs (``slot_runs`` on the wire)
    slots: tuple[str, ...] | SlotRuns
    keys: tuple[str, ...]
    rid: int = 0
    ack: int = 0
    confirmed: tuple[str, ...] = ()

    def params(self) -> dict[str, Any]:
        out = _session_params(self)
        slots = self.slots
        if type(slots) is SlotRuns and slots.client_id == self.client_id:
            out["slot_runs"] = [list(run) for run in slots.runs]
        else:
            out["slots"] = list(slots)
        out["keys"] = list(self.keys)
        if self.confirmed:
            out["confirmed"] = list(self.confirmed)
        return out

    @classmethod
    def decode(cls, p: dict[str, Any]) -> BatchCommitSlots:
        client, rid, ack = _session(p)
        keys = _keys(_field(p, "keys"))
        runs = p.get("slot_runs")
        slots: tuple[str, ...] | SlotRuns
        if runs is not None:
            slots = _slot_runs(client, runs, len(keys))
        else:
            slots = _slot_names(_field(p, "slots"), len(keys))
        return cls(client, slots, keys, rid, ack, _standbys(p.get("confirmed")))


def _slot_runs(client_id: str, raw: Any, n: int) -> SlotRuns:
    """The buffers of ``n`` keys as runs ``[batch, first, count]`` of the
    client's reservations (each index below :data:`MAX_SLOTS`)."""
    if type(raw) is not list or len(raw) > n:
        raise _bad("slot_runs", f"must be a list of at most {n} runs", raw)
    for run in raw:
        if not (
            type(run) is list
            and len(run) == 3
            and type(run[0]) is str
            and 0 < len(run[0]) <= MAX_NAME_CHARS
            and type(run[1]) is int
            and type(run[2]) is int
            and run[1] >= 0
            and run[2] > 0
            and run[1] + run[2] <= MAX_SLOTS
        ):
            raise _bad(
                "slot_runs",
                f"must hold [reservation, first index, count] runs within 0..{MAX_SLOTS - 1}",
                run,
            )
    runs = SlotRuns(client_id, raw)
    if runs.total != n:
        raise _bad("slot_runs", f"names {runs.total} buffers for {n} keys", raw)
    return runs


def _slot_names(raw: Any, n: int) -> tuple[str, ...]:
    """The reserved buffers named for ``n`` keys, one each."""
    # (column-wise checks, in C)
    if type(raw) is not list or not set(map(type, raw)) <= _STR or "" in raw:
        raise _bad("slots", "must be a list of non-empty strings", raw)
    if len(raw) != n:
        raise _bad("slots", f"names {len(raw)} buffers for {n} keys", len(raw))
    return tuple(raw)


@dataclass(frozen=True, slots=True)
class _KeyRead(Request):
    key: str

    def params(self) -> dict[str, Any]:
        return {"key": self.key}

    @classmethod
    def decode(cls, p: dict[str, Any]) -> Any:
        key = p.get("key")  # the valid case inline (every get/is_exist); _key explains
        if type(key) is str and 0 < len(key) <= MAX_KEY_CHARS and "\0" not in key:
            return cls(key)
        return cls(_key(_field(p, "key")))


@dataclass(frozen=True, slots=True)
class GetReplicaList(_KeyRead):
    METHOD: ClassVar = MasterMethod.GET_REPLICA_LIST


@dataclass(frozen=True, slots=True)
class ExistKey(_KeyRead):
    METHOD: ClassVar = MasterMethod.EXIST_KEY


@dataclass(frozen=True, slots=True)
class _KeysRead(Request):
    keys: tuple[str, ...]

    def params(self) -> dict[str, Any]:
        return {"keys": list(self.keys)}

    @classmethod
    def decode(cls, p: dict[str, Any]) -> Any:
        return cls(_keys(_field(p, "keys")))


@dataclass(frozen=True, slots=True)
class BatchGetReplicaList(_KeysRead):
    METHOD: ClassVar = MasterMethod.BATCH_GET_REPLICA_LIST


@dataclass(frozen=True, slots=True)
class BatchExistKey(_KeysRead):
    METHOD: ClassVar = MasterMethod.BATCH_EXIST_KEY


@dataclass(frozen=True, slots=True)
class GetReplicaListByRegex(Request):
    METHOD: ClassVar = MasterMethod.GET_REPLICA_LIST_BY_REGEX
    pattern: str

    def params(self) -> dict[str, Any]:
        return {"pattern": self.pattern}

    @classmethod
    def decode(cls, p: dict[str, Any]) -> GetReplicaListByRegex:
        return cls(_text(_field(p, "pattern"), "pattern", MAX_REGEX_CHARS))


@dataclass(frozen=True, slots=True)
class Remove(Mutation):
    METHOD: ClassVar = MasterMethod.REMOVE
    key: str
    force: bool = False
    client_id: str = ""
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        out = {"client_id": self.client_id, "key": self.key, "force": self.force}
        if self.rid:  # (_session_params, inline: every remove)
            out["rid"] = self.rid
            out["ack"] = self.ack
        return out

    @classmethod
    def decode(cls, p: dict[str, Any]) -> Remove:
        key, force = p.get("key"), p.get("force", False)
        client, rid, ack = p.get("client_id", ""), p.get("rid", 0), p.get("ack", 0)
        if (  # the valid case inline (every remove); the checks below explain
            type(key) is str
            and 0 < len(key) <= MAX_KEY_CHARS
            and "\0" not in key
            and type(force) is bool
            and type(client) is str
            and len(client) <= MAX_NAME_CHARS
            and type(rid) is int
            and 0 <= rid < _U64
            and type(ack) is int
            and 0 <= ack < _U64
        ):
            return cls(key, force, client, rid, ack)
        client, rid, ack = _session(p, client_required=False)
        return cls(_key(_field(p, "key")), _bool(p.get("force", False), "force"), client, rid, ack)


@dataclass(frozen=True, slots=True)
class BatchRemove(Mutation):
    METHOD: ClassVar = MasterMethod.BATCH_REMOVE
    keys: tuple[str, ...]
    force: bool = False
    client_id: str = ""
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        return {**_session_params(self), "keys": list(self.keys), "force": self.force}

    @classmethod
    def decode(cls, p: dict[str, Any]) -> BatchRemove:
        client, rid, ack = _session(p, client_required=False)
        return cls(
            _keys(_field(p, "keys")), _bool(p.get("force", False), "force"), client, rid, ack
        )


@dataclass(frozen=True, slots=True)
class RemoveByRegex(Mutation):
    METHOD: ClassVar = MasterMethod.REMOVE_BY_REGEX
    pattern: str
    force: bool = False
    client_id: str = ""
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        return {**_session_params(self), "pattern": self.pattern, "force": self.force}

    @classmethod
    def decode(cls, p: dict[str, Any]) -> RemoveByRegex:
        client, rid, ack = _session(p, client_required=False)
        return cls(
            _text(_field(p, "pattern"), "pattern", MAX_REGEX_CHARS),
            _bool(p.get("force", False), "force"),
            client,
            rid,
            ack,
        )


@dataclass(frozen=True, slots=True)
class RemoveAll(Mutation):
    METHOD: ClassVar = MasterMethod.REMOVE_ALL
    force: bool = False
    client_id: str = ""
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        return {**_session_params(self), "force": self.force}

    @classmethod
    def decode(cls, p: dict[str, Any]) -> RemoveAll:
        client, rid, ack = _session(p, client_required=False)
        return cls(_bool(p.get("force", False), "force"), client, rid, ack)


@dataclass(frozen=True, slots=True)
class BatchReplicaClear(Mutation):
    """Drop this client's expired objects (or only their replicas in ``segment_name``)."""

    METHOD: ClassVar = MasterMethod.BATCH_REPLICA_CLEAR
    client_id: str
    keys: tuple[str, ...]
    segment_name: str = ""
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        return {
            **_session_params(self),
            "keys": list(self.keys),
            "segment_name": self.segment_name,
        }

    @classmethod
    def decode(cls, p: dict[str, Any]) -> BatchReplicaClear:
        client, rid, ack = _session(p)
        return cls(
            client,
            _keys(_field(p, "keys")),
            _text(p.get("segment_name", ""), "segment_name"),
            rid,
            ack,
        )


@dataclass(frozen=True, slots=True)
class Follow(Request):
    """A standby asks for the leader's state and then its stream of effects.

    The leader answers with reply frames carrying this request's id, each
    ``{"seq": n, "effects": [records], "synced": bool}``; ``synced`` marks the
    end of the initial state.  The standby sends :class:`Ack` requests (never
    answered) as it applies them."""

    METHOD: ClassVar = MasterMethod.FOLLOW
    standby: str
    view_version: int = 0

    def params(self) -> dict[str, Any]:
        return {"standby": self.standby, "view_version": self.view_version}

    @classmethod
    def decode(cls, p: dict[str, Any]) -> Follow:
        return cls(
            _text(_field(p, "standby"), "standby"),
            _u64(p.get("view_version", 0), "view_version"),
        )


@dataclass(frozen=True, slots=True)
class Ack(Request):
    METHOD: ClassVar = MasterMethod.ACK
    seq: int

    def params(self) -> dict[str, Any]:
        return {"seq": self.seq}

    @classmethod
    def decode(cls, p: dict[str, Any]) -> Ack:
        return cls(_u64(_field(p, "seq"), "seq"))


@dataclass(frozen=True, slots=True)
class HaConfirm(Request):
    """HA: ``client_id`` wrote ``keys`` completely and is ending them at the
    leader now.  A standby remembers the ones it knows as that client's writes
    in progress, and a standby that becomes the leader commits them, so the
    leader need not wait for its acknowledgement (``PutEnd.confirmed``).  Sent
    to standbys; answered by any master (a leader knows nothing to confirm).
    ``slots`` (empty, or one per key): the puts were written into these buffers
    reserved ahead and are committed under ``keys`` (``CommitSlot.confirmed``).
    ``lazy``: the client does not wait for the answer (commits of buffers reserved
    ahead, ``store/_ha_confirm.py``); the standby then reads that connection only
    when its stream brings a frame, and before it takes over as the leader."""

    METHOD: ClassVar = MasterMethod.HA_CONFIRM
    client_id: str
    keys: tuple[str, ...]
    slots: tuple[str, ...] = ()
    lazy: bool = False

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"client_id": self.client_id, "keys": list(self.keys)}
        if self.slots:
            out["slots"] = list(self.slots)
        if self.lazy:
            out["lazy"] = True
        return out

    @classmethod
    def decode(cls, p: dict[str, Any]) -> HaConfirm:
        keys = _keys(_field(p, "keys"))
        raw = p.get("slots")
        slots = () if raw is None else _slot_names(raw, len(keys))
        lazy = _bool(p.get("lazy", False), "lazy")
        if lazy and not slots:
            raise _bad("lazy", "is only for commits of buffers reserved ahead (slots)", lazy)
        return cls(_text(_field(p, "client_id"), "client_id", empty=False), keys, slots, lazy)


def _uuid(value: Any, what: str) -> tuple[int, int]:
    """The reference's UUID: a pair of unsigned 64-bit integers."""
    if type(value) is not list or len(value) != 2:
        raise _bad(what, "must be a pair of integers [first, second]", value)
    return _u64(value[0], what), _u64(value[1], what)


#: most tasks one FetchTasks hands out
MAX_TASK_BATCH: Final = 1024
#: longest message of a task report
MAX_TASK_MESSAGE_CHARS: Final = 4096


@dataclass(frozen=True, slots=True)
class CreateCopyTask(Mutation):
    """Queue a copy of ``key`` to ``targets`` (segment names); answers the task id."""

    METHOD: ClassVar = MasterMethod.CREATE_COPY_TASK
    key: str
    targets: tuple[str, ...]
    client_id: str = ""
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        return {**_session_params(self), "key": self.key, "targets": list(self.targets)}

    @classmethod
    def decode(cls, p: dict[str, Any]) -> CreateCopyTask:
        client, rid, ack = _session(p, client_required=False)
        targets = _field(p, "targets")
        if type(targets) is not list:
            raise _bad("targets", "must be a list of segment names", targets)
        return cls(_key(_field(p, "key")), _names(targets, "targets"), client, rid, ack)


@dataclass(frozen=True, slots=True)
class CreateMoveTask(Mutation):
    METHOD: ClassVar = MasterMethod.CREATE_MOVE_TASK
    key: str
    source: str
    target: str
    client_id: str = ""
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        return {
            **_session_params(self),
            "key": self.key,
            "source": self.source,
            "target": self.target,
        }

    @classmethod
    def decode(cls, p: dict[str, Any]) -> CreateMoveTask:
        client, rid, ack = _session(p, client_required=False)
        return cls(
            _key(_field(p, "key")),
            _text(_field(p, "source"), "source"),
            _text(_field(p, "target"), "target"),
            client,
            rid,
            ack,
        )


@dataclass(frozen=True, slots=True)
class QueryTask(Request):
    METHOD: ClassVar = MasterMethod.QUERY_TASK
    task_id: tuple[int, int]

    def params(self) -> dict[str, Any]:
        return {"task_id": list(self.task_id)}

    @classmethod
    def decode(cls, p: dict[str, Any]) -> QueryTask:
        return cls(_uuid(_field(p, "task_id"), "task_id"))


@dataclass(frozen=True, slots=True)
class FetchTasks(Mutation):
    """Hand up to ``batch_size`` of this client's pending tasks to it."""

    METHOD: ClassVar = MasterMethod.FETCH_TASKS
    client_id: str
    batch_size: int = 16
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        return {**_session_params(self), "batch_size": self.batch_size}

    @classmethod
    def decode(cls, p: dict[str, Any]) -> FetchTasks:
        client, rid, ack = _session(p)
        n = _u64(p.get("batch_size", 16), "batch_size")
        if not 1 <= n <= MAX_TASK_BATCH:
            raise _bad("batch_size", f"must be within [1, {MAX_TASK_BATCH}]", n)
        return cls(client, n, rid, ack)


@dataclass(frozen=True, slots=True)
class MarkTaskToComplete(Mutation):
    """The outcome of a task: ``status`` 3 SUCCESS or 2 FAILED (TaskStatus)."""

    METHOD: ClassVar = MasterMethod.MARK_TASK_TO_COMPLETE
    client_id: str
    task_id: tuple[int, int]
    status: int
    message: str = ""
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        return {
            **_session_params(self),
            "task_id": list(self.task_id),
            "status": self.status,
            "message": self.message,
        }

    @classmethod
    def decode(cls, p: dict[str, Any]) -> MarkTaskToComplete:
        client, rid, ack = _session(p)
        status = _field(p, "status")
        if type(status) is not int or status not in (0, 1, 2, 3):
            raise _bad("status", "must be a TaskStatus (0..3)", status)
        return cls(
            client,
            _uuid(_field(p, "task_id"), "task_id"),
            status,
            _text(p.get("message", ""), "message", MAX_TASK_MESSAGE_CHARS),
            rid,
            ack,
        )


@dataclass(frozen=True, slots=True)
class CopyStart(Mutation):
    """Reserve buffers for new replicas of ``key`` in ``targets``; answers
    ``{"source": replica, "targets": [replica, ...]}``."""

    METHOD: ClassVar = MasterMethod.COPY_START
    client_id: str
    key: str
    source: str
    targets: tuple[str, ...]
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        return {
            **_session_params(self),
            "key": self.key,
            "source": self.source,
            "targets": list(self.targets),
        }

    @classmethod
    def decode(cls, p: dict[str, Any]) -> CopyStart:
        client, rid, ack = _session(p)
        targets = _field(p, "targets")
        if type(targets) is not list:
            raise _bad("targets", "must be a list of segment names", targets)
        return cls(
            client,
            _key(_field(p, "key")),
            _text(_field(p, "source"), "source"),
            _names(targets, "targets"),
            rid,
            ack,
        )


@dataclass(frozen=True, slots=True)
class MoveStart(Mutation):
    """Reserve a buffer for ``key`` in ``target``; answers ``{"source": replica,
    "targets": [replica] or []}`` (empty: the target holds a replica already)."""

    METHOD: ClassVar = MasterMethod.MOVE_START
    client_id: str
    key: str
    source: str
    target: str
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        return {
            **_session_params(self),
            "key": self.key,
            "source": self.source,
            "target": self.target,
        }

    @classmethod
    def decode(cls, p: dict[str, Any]) -> MoveStart:
        client, rid, ack = _session(p)
        return cls(
            client,
            _key(_field(p, "key")),
            _text(_field(p, "source"), "source"),
            _text(_field(p, "target"), "target"),
            rid,
            ack,
        )


@dataclass(frozen=True, slots=True)
class CopyEnd(_KeyOp):
    METHOD: ClassVar = MasterMethod.COPY_END


@dataclass(frozen=True, slots=True)
class CopyRevoke(_KeyOp):
    METHOD: ClassVar = MasterMethod.COPY_REVOKE


@dataclass(frozen=True, slots=True)
class MoveEnd(_KeyOp):
    METHOD: ClassVar = MasterMethod.MOVE_END


@dataclass(frozen=True, slots=True)
class MoveRevoke(_KeyOp):
    METHOD: ClassVar = MasterMethod.MOVE_REVOKE


_ALL: tuple[Any, ...] = (
    ServiceReady,
    GetSummary,
    Ping,
    MountSegment,
    ReMountSegment,
    UnmountSegment,
    PutStart,
    UpsertStart,
    BatchPutStart,
    BatchUpsertStart,
    PutEnd,
    PutRevoke,
    UpsertEnd,
    UpsertRevoke,
    BatchPutEnd,
    BatchPutRevoke,
    BatchUpsertEnd,
    BatchUpsertRevoke,
    ReserveSlots,
    CommitSlot,
    BatchCommitSlots,
    GetReplicaList,
    ExistKey,
    BatchGetReplicaList,
    BatchExistKey,
    GetReplicaListByRegex,
    Remove,
    BatchRemove,
    RemoveByRegex,
    RemoveAll,
    BatchReplicaClear,
    Follow,
    Ack,
    HaConfirm,
    CreateCopyTask,
    CreateMoveTask,
    QueryTask,
    FetchTasks,
    MarkTaskToComplete,
    CopyStart,
    CopyEnd,
    CopyRevoke,
    MoveStart,
    MoveEnd,
    MoveRevoke,
)

from ._offload_msgs import OFFLOAD_REQUESTS  # noqa: E402  (they build on the rules above)

_ALL += OFFLOAD_REQUESTS

#: the request types that carry a ``keys`` tuple (batches)
KEYED_REQUESTS: Final[frozenset[type[Request]]] = frozenset(
    cls for cls in _ALL if "keys" in getattr(cls, "__dataclass_fields__", {})
)

#: method -> its request type's decoder (an explicit table, one entry per method)
REQUEST_TYPES: Final[dict[MasterMethod, Callable[[dict[str, Any]], Request]]] = {
    cls.METHOD: cls.decode for cls in _ALL
}
assert len(REQUEST_TYPES) == len(MasterMethod), "every method needs a request type"


def decode_request(method: MasterMethod, params: Any, *, escapes: bool = True) -> Request:
    """Validate ``params`` of ``method`` into its request type.

    Args:
        escapes: the frame's JSON held ``\\u`` escapes of surrogates (only then can a
            decoded string hold a lone surrogate; the check is skipped otherwise).

    Raises:
        InvalidParams: a field is missing, of the wrong type, or out of bounds.
    """
    if type(params) is not dict:
        raise InvalidParams(f"parameters of {method.value} must be an object")
    if escapes:
        check_surrogates(params, f"parameters of {method.value}")
    return REQUEST_TYPES[method](params)


# every request type's REPLY is set there (it imports this module)
from . import _master_reply_msgs as _master_reply_msgs  # noqa: E402

# cheaper construction of the values above: one or two per call (_frozen.py)
fast_frozen_inits(globals())
