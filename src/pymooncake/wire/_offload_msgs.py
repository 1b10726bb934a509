"""Master RPC requests of the SSD tier (LOCAL_DISK replicas), validated once.

The reference's names: a client that offers local disk mounts it
(``MountLocalDiskSegment``), polls for work on its heartbeat
(``OffloadObjectHeartbeat``: objects to write to disk, objects to promote back
to memory, files to delete), reports what it wrote (``NotifyOffloadSuccess``,
also used to re-register its files after a restart of either side), tells the
master before it deletes files to make room (``BatchEvictDiskReplica``) and
allocates memory for a promotion (``PromotionAllocStart``; the write ends with
an ordinary ``PutEnd``/``PutRevoke``).  See ``docs/ssd-tier.md``.

Registered in ``_master_msgs.REQUEST_TYPES``; this module touches no socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ._master_msgs import (
    MAX_NAME_CHARS,
    MasterMethod,
    Mutation,
    Request,
    _bool,
    _field,
    _key,
    _keys,
    _session,
    _session_params,
    _sizes,
    _text,
    _u64,
    sizes_wire,
)

__all__ = [
    "OFFLOAD_REQUESTS",
    "BatchEvictDiskReplica",
    "GetStorageConfig",
    "MountLocalDisk",
    "NotifyOffloadSuccess",
    "OffloadHeartbeat",
    "PromotionAllocStart",
    "UnmountLocalDisk",
]


@dataclass(frozen=True, slots=True)
class MountLocalDisk(Mutation):
    """Offer this client's SSD tier: ``endpoint`` serves reads of its files."""

    METHOD: ClassVar = MasterMethod.MOUNT_LOCAL_DISK
    client_id: str
    endpoint: str
    capacity_bytes: int
    enable_offloading: bool = True
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        return {
            **_session_params(self),
            "endpoint": self.endpoint,
            "capacity_bytes": self.capacity_bytes,
            "enable_offloading": self.enable_offloading,
        }

    @classmethod
    def decode(cls, p: dict[str, Any]) -> MountLocalDisk:
        client, rid, ack = _session(p)
        return cls(
            client,
            _text(_field(p, "endpoint"), "endpoint", MAX_NAME_CHARS, empty=False),
            _u64(_field(p, "capacity_bytes"), "capacity_bytes"),
            _bool(p.get("enable_offloading", True), "enable_offloading"),
            rid,
            ack,
        )


@dataclass(frozen=True, slots=True)
class UnmountLocalDisk(Mutation):
    """Withdraw this client's SSD tier: every LOCAL_DISK replica it owns goes."""

    METHOD: ClassVar = MasterMethod.UNMOUNT_LOCAL_DISK
    client_id: str
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        return _session_params(self)

    @classmethod
    def decode(cls, p: dict[str, Any]) -> UnmountLocalDisk:
        client, rid, ack = _session(p)
        return cls(client, rid, ack)


@dataclass(frozen=True, slots=True)
class OffloadHeartbeat(Mutation):
    """Poll for SSD work; reports the tier's use.  The reply:
    ``{"offload": [[key, size, segment_id, address], ...], "promote": [[key, size],
    ...], "drop": [key, ...]}``."""

    METHOD: ClassVar = MasterMethod.OFFLOAD_HEARTBEAT
    client_id: str
    used_bytes: int = 0
    capacity_bytes: int = 0
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        return {
            **_session_params(self),
            "used_bytes": self.used_bytes,
            "capacity_bytes": self.capacity_bytes,
        }

    @classmethod
    def decode(cls, p: dict[str, Any]) -> OffloadHeartbeat:
        client, rid, ack = _session(p)
        return cls(
            client,
            _u64(p.get("used_bytes", 0), "used_bytes"),
            _u64(p.get("capacity_bytes", 0), "capacity_bytes"),
            rid,
            ack,
        )


@dataclass(frozen=True, slots=True)
class NotifyOffloadSuccess(Mutation):
    """``keys`` (of ``sizes`` bytes) are in this client's SSD tier.  With
    ``register`` they were found on disk after a restart (not asked for): a key
    that has a value in memory is then refused (it may be newer).  The reply is
    one error code per key (0: a LOCAL_DISK replica now; else delete the file)."""

    METHOD: ClassVar = MasterMethod.NOTIFY_OFFLOAD_SUCCESS
    client_id: str
    keys: tuple[str, ...]
    sizes: tuple[int, ...]
    register: bool = False
    #: written to the shared filesystem (--root_fs_dir): DISK replicas
    shared: bool = False
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        out = {
            **_session_params(self),
            "keys": list(self.keys),
            "sizes": sizes_wire(self.sizes),
            "register": self.register,
        }
        if self.shared:
            out["shared"] = True
        return out

    @classmethod
    def decode(cls, p: dict[str, Any]) -> NotifyOffloadSuccess:
        client, rid, ack = _session(p)
        keys = _keys(_field(p, "keys"))
        return cls(
            client,
            keys,
            _sizes(_field(p, "sizes"), len(keys)),
            _bool(p.get("register", False), "register"),
            _bool(p.get("shared", False), "shared"),
            rid,
            ack,
        )


@dataclass(frozen=True, slots=True)
class BatchEvictDiskReplica(Mutation):
    """This client is about to delete the files of ``keys`` (to make room)."""

    METHOD: ClassVar = MasterMethod.BATCH_EVICT_DISK_REPLICA
    client_id: str
    keys: tuple[str, ...]
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        return {**_session_params(self), "keys": list(self.keys)}

    @classmethod
    def decode(cls, p: dict[str, Any]) -> BatchEvictDiskReplica:
        client, rid, ack = _session(p)
        return cls(client, _keys(_field(p, "keys")), rid, ack)


@dataclass(frozen=True, slots=True)
class PromotionAllocStart(Mutation):
    """Allocate a memory replica for the disk-only ``key`` (a promotion task);
    the reply is the replicas to write, as PutStart's.  End it with PutEnd /
    PutRevoke."""

    METHOD: ClassVar = MasterMethod.PROMOTION_ALLOC_START
    client_id: str
    key: str
    size: int
    rid: int = 0
    ack: int = 0

    def params(self) -> dict[str, Any]:
        return {**_session_params(self), "key": self.key, "size": self.size}

    @classmethod
    def decode(cls, p: dict[str, Any]) -> PromotionAllocStart:
        client, rid, ack = _session(p)
        return cls(client, _key(_field(p, "key")), _u64(_field(p, "size"), "size"), rid, ack)


@dataclass(frozen=True, slots=True)
class GetStorageConfig(Request):
    """The shared filesystem of DISK replicas: ``{"fsdir": "<root_fs_dir>/<cluster_id>"
    or "", "enable_disk_eviction": bool, "quota_bytes": int}``."""

    METHOD: ClassVar = MasterMethod.GET_STORAGE_CONFIG

    def params(self) -> dict[str, Any]:
        return {}

    @classmethod
    def decode(cls, p: dict[str, Any]) -> GetStorageConfig:
        return cls()


OFFLOAD_REQUESTS: tuple[Any, ...] = (
    GetStorageConfig,
    MountLocalDisk,
    UnmountLocalDisk,
    OffloadHeartbeat,
    NotifyOffloadSuccess,
    BatchEvictDiskReplica,
    PromotionAllocStart,
)
