"""Store vocabulary: error codes, replica states, replication settings, descriptors.

Values follow the reference (``mooncake-store/include/types.h``, ``replica.h``)
so that the compatibility edge can return them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final, NamedTuple

from ..wire._master_msgs import ReplicateParams, SegmentParams

__all__ = [
    "DEFAULT_REPLICATE_CONFIG",
    "DISK_SEGMENT",
    "LOCAL_DISK_SEGMENT",
    "REPLICA_DISK",
    "REPLICA_LOCAL_DISK",
    "REPLICA_MEMORY",
    "ClientStatus",
    "ErrorCode",
    "ReplicaDesc",
    "ReplicaStatus",
    "ReplicateConfig",
    "SegmentInfo",
    "SoftPinAction",
]


class ErrorCode(IntEnum):
    OK = 0
    INTERNAL_ERROR = -1
    BUFFER_OVERFLOW = -10
    SHARD_INDEX_OUT_OF_RANGE = -100
    SEGMENT_NOT_FOUND = -101
    SEGMENT_ALREADY_EXISTS = -102
    CLIENT_NOT_FOUND = -103
    NO_AVAILABLE_HANDLE = -200
    INVALID_VERSION = -300
    INVALID_KEY = -400
    WRITE_FAIL = -500
    INVALID_PARAMS = -600
    ILLEGAL_CLIENT = -601
    INVALID_WRITE = -700
    INVALID_READ = -701
    INVALID_REPLICA = -702
    REPLICA_IS_NOT_READY = -703
    OBJECT_NOT_FOUND = -704
    OBJECT_ALREADY_EXISTS = -705
    OBJECT_HAS_LEASE = -706
    LEASE_EXPIRED = -707
    OBJECT_HAS_REPLICATION_TASK = -708
    OBJECT_NO_REPLICATION_TASK = -709
    REPLICA_NOT_FOUND = -710
    REPLICA_ALREADY_EXISTS = -711
    REPLICA_IS_GONE = -712
    REPLICA_NOT_IN_LOCAL_MEMORY = -713
    OBJECT_REPLICA_BUSY = -714
    TRANSFER_FAIL = -800
    CHECKSUM_MISMATCH = -801
    RPC_FAIL = -900
    RPC_TIMEOUT = -901
    ETCD_OPERATION_ERROR = -1000
    ETCD_KEY_NOT_EXIST = -1001
    ETCD_TRANSACTION_FAIL = -1002
    ETCD_CTX_CANCELLED = -1003
    OPLOG_ENTRY_NOT_FOUND = -1004
    UNAVAILABLE_IN_CURRENT_STATUS = -1010
    UNAVAILABLE_IN_CURRENT_MODE = -1011
    NOT_SUPPORTED = -1012
    FILE_NOT_FOUND = -1100
    TASK_NOT_FOUND = -1400
    TASK_PENDING_LIMIT_EXCEEDED = -1401
    JOB_NOT_FOUND = -1402


class ReplicaStatus(IntEnum):
    UNDEFINED = 0
    INITIALIZED = 1
    PROCESSING = 2
    COMPLETE = 3
    REMOVED = 4
    FAILED = 5


_STATUS = tuple(ReplicaStatus)  # index -> member, faster than ReplicaStatus(n)


class SoftPinAction(IntEnum):
    PRESERVE = 0
    ENABLE = 1
    DISABLE = 2


class ClientStatus(IntEnum):
    UNDEFINED = 0
    OK = 1
    NEED_REMOUNT = 2


@dataclass(frozen=True)
class ReplicateConfig:
    """How an object is replicated and pinned.

    Attributes:
        replica_num: memory replicas, each in a distinct segment (>= 1).
        soft_pin_action: ENABLE pins the object (evicted last) for
            ``soft_pin_ttl_ms`` (master default if None); on upsert PRESERVE
            keeps the current pin and DISABLE drops it.  A TTL is only valid
            with ENABLE (reference rule).
        with_soft_pin: shorthand for ``soft_pin_action=ENABLE``.
        with_hard_pin: never evicted.
        preferred_segments: segment names tried first, in order.
    """

    replica_num: int = 1
    with_soft_pin: bool = False
    soft_pin_ttl_ms: int | None = None
    with_hard_pin: bool = False
    preferred_segments: tuple[str, ...] = ()
    soft_pin_action: SoftPinAction = SoftPinAction.PRESERVE
    #: segment names never to use (e.g. peers found unreachable)
    excluded_segments: tuple[str, ...] = ()

    @property
    def pin_action(self) -> SoftPinAction:
        return SoftPinAction.ENABLE if self.with_soft_pin else self.soft_pin_action

    def to_wire(self) -> dict[str, Any]:
        return {
            "replica_num": self.replica_num,
            "soft_pin_action": int(self.pin_action),
            "soft_pin_ttl_ms": self.soft_pin_ttl_ms,
            "with_hard_pin": self.with_hard_pin,
            "preferred_segments": list(self.preferred_segments),
            "excluded_segments": list(self.excluded_segments),
        }

    def to_params(self) -> ReplicateParams:
        """The config as the master RPC carries it."""
        # (most calls pass the one default object: no field-by-field comparison)
        if self is DEFAULT_REPLICATE_CONFIG or self == DEFAULT_REPLICATE_CONFIG:
            return _DEFAULT_PARAMS
        return ReplicateParams(
            replica_num=self.replica_num,
            soft_pin_action=int(self.pin_action),
            soft_pin_ttl_ms=self.soft_pin_ttl_ms,
            with_hard_pin=self.with_hard_pin,
            preferred_segments=tuple(self.preferred_segments),
            excluded_segments=tuple(self.excluded_segments),
        )

    @classmethod
    def from_wire(cls, obj: Any) -> ReplicateConfig:
        if obj is None:
            return cls()
        if not isinstance(obj, dict):
            raise ValueError("replicate config must be an object")
        ttl = obj.get("soft_pin_ttl_ms")
        return cls(
            replica_num=int(obj.get("replica_num", 1)),
            soft_pin_action=SoftPinAction(int(obj.get("soft_pin_action", 0))),
            soft_pin_ttl_ms=None if ttl is None else int(ttl),
            with_hard_pin=bool(obj.get("with_hard_pin", False)),
            preferred_segments=tuple(str(s) for s in obj.get("preferred_segments", ()) or ()),
            excluded_segments=tuple(str(s) for s in obj.get("excluded_segments", ()) or ()),
        )


#: the configuration of a call that passes none (one object: ``to_params`` knows it)
DEFAULT_REPLICATE_CONFIG: Final = ReplicateConfig()
_DEFAULT_PARAMS = ReplicateParams()


@dataclass(frozen=True)
class SegmentInfo:
    """A contiguous range of a client's registered memory offered to the store.

    ``name`` is the transfer-engine segment holding it (peers address it with
    ``transfer(name, ...)``); ``base`` is a virtual address in that process.
    """

    id: str
    name: str
    base: int
    size: int
    host_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_params(self) -> SegmentParams:
        return SegmentParams(self.id, self.name, self.base, self.size, self.host_id)

    @classmethod
    def from_params(cls, p: SegmentParams) -> SegmentInfo:
        return cls(p.id, p.name, p.base, p.size, p.host_id)

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "base": self.base,
            "size": self.size,
            "host_id": self.host_id,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_wire(cls, obj: Any) -> SegmentInfo:
        return cls(
            id=str(obj["id"]),
            name=str(obj["name"]),
            base=int(obj["base"]),
            size=int(obj["size"]),
            host_id=str(obj.get("host_id", "")),
            extra=dict(obj.get("extra", {}) or {}),
        )


class ReplicaDesc(NamedTuple):
    """Where one replica lives: ``size`` bytes at ``address`` in segment ``endpoint``.

    Immutable; a named tuple rather than a frozen dataclass because clients build
    one per replica of every object they read (half the cost).
    """

    id: int
    endpoint: str
    address: int
    size: int
    status: ReplicaStatus
    segment_id: str = ""

    @property
    def kind(self) -> int:
        """ReplicaType: MEMORY (0), DISK (1: a file on the shared filesystem,
        ``endpoint`` is its path) or LOCAL_DISK (2: in the SSD tier of the client
        whose read port is ``endpoint``); disk replicas carry a marker segment id."""
        return _KINDS.get(self.segment_id, 0)

    @property
    def on_disk(self) -> bool:
        """A LOCAL_DISK replica (a client's SSD tier)."""
        return self.segment_id == LOCAL_DISK_SEGMENT

    def to_wire(self) -> list[Any]:
        return [self.id, self.endpoint, self.address, self.size, int(self.status), self.segment_id]

    @classmethod
    def from_wire(cls, obj: Any) -> ReplicaDesc:
        rid, endpoint, address, size, status, segment_id = obj
        return cls(rid, endpoint, address, size, _STATUS[status], segment_id)


#: ReplicaType values (the reference's allocator.h)
REPLICA_MEMORY = 0
REPLICA_DISK = 1
REPLICA_LOCAL_DISK = 2
#: segment ids that mark disk replicas (real ones never start with NUL)
LOCAL_DISK_SEGMENT = "\x00local_disk"
DISK_SEGMENT = "\x00disk"
_KINDS = {LOCAL_DISK_SEGMENT: REPLICA_LOCAL_DISK, DISK_SEGMENT: REPLICA_DISK}
