"""Value types of ``mooncake.store``: replication settings, replica descriptors,
data-type tags, the host memory allocator and the local-buffer pool."""

from __future__ import annotations

import ctypes
import mmap
import threading
from enum import IntEnum
from typing import Any

from pymooncake.store import ReplicaDesc, ReplicaStatus, SoftPinAction
from pymooncake.store import ReplicateConfig as _NativeConfig
from pymooncake.store._shm import shm_registry
from pymooncake.store._tasks import TaskInfo, TaskStatus, TaskType

__all__ = [
    "ACTIVATION",
    "COMPLETE",
    "FAILED",
    "GENERAL",
    "GRADIENT",
    "INITIALIZED",
    "KVCACHE",
    "METADATA",
    "OPTIMIZER_STATE",
    "PENDING",
    "PROCESSING",
    "REMOVED",
    "REPLICA_COPY",
    "REPLICA_MOVE",
    "SAMPLE",
    "SUCCESS",
    "TENSOR",
    "UNDEFINED",
    "UNKNOWN",
    "WEIGHT",
    "Descriptor",
    "DiskDescriptor",
    "MemoryDescriptor",
    "MooncakeHostMemAllocator",
    "ObjectDataType",
    "QueryTaskResponse",
    "ReplicaDescriptor",
    "ReplicateConfig",
    "TaskStatus",
    "TaskType",
]

_U64 = 1 << 64

UNDEFINED = ReplicaStatus.UNDEFINED
INITIALIZED = ReplicaStatus.INITIALIZED
PROCESSING = ReplicaStatus.PROCESSING
COMPLETE = ReplicaStatus.COMPLETE
REMOVED = ReplicaStatus.REMOVED
FAILED = ReplicaStatus.FAILED


# the reference exports these enum values into the module too (PROCESSING and
# FAILED stay ReplicaStatus values, as ReplicaStatus is exported first there)
REPLICA_COPY = TaskType.REPLICA_COPY
REPLICA_MOVE = TaskType.REPLICA_MOVE
PENDING = TaskStatus.PENDING
SUCCESS = TaskStatus.SUCCESS


class QueryTaskResponse:
    """``query_task``'s answer (read-only, as the reference's pybind class)."""

    __slots__ = ("_info",)

    def __init__(self, info: TaskInfo | None = None) -> None:
        self._info = info or TaskInfo(
            (0, 0), TaskType.REPLICA_COPY, TaskStatus.PENDING, 0, 0, (0, 0), ""
        )

    @property
    def id(self) -> tuple[int, int]:
        return self._info.id

    @property
    def type(self) -> TaskType:
        return self._info.type

    @property
    def status(self) -> TaskStatus:
        return self._info.status

    @property
    def created_at_ms_epoch(self) -> int:
        return self._info.created_at_ms_epoch

    @property
    def last_updated_at_ms_epoch(self) -> int:
        return self._info.last_updated_at_ms_epoch

    @property
    def assigned_client(self) -> tuple[int, int]:
        return self._info.assigned_client

    @property
    def message(self) -> str:
        return self._info.message

    def __repr__(self) -> str:
        i = self._info
        return (
            f"QueryTaskResponse(id={i.id}, type={int(i.type)}, status={int(i.status)}, "
            f"created_at={i.created_at_ms_epoch}, last_updated_at={i.last_updated_at_ms_epoch}, "
            f'assigned_client={i.assigned_client}, message="{i.message}")'
        )


class ObjectDataType(IntEnum):
    UNKNOWN = 0
    KVCACHE = 1
    TENSOR = 2
    WEIGHT = 3
    SAMPLE = 4
    ACTIVATION = 5
    GRADIENT = 6
    OPTIMIZER_STATE = 7
    METADATA = 8
    GENERAL = 9


UNKNOWN, KVCACHE, TENSOR, WEIGHT, SAMPLE = (ObjectDataType(i) for i in range(5))
ACTIVATION, GRADIENT, OPTIMIZER_STATE, METADATA, GENERAL = (ObjectDataType(i) for i in range(5, 10))


# --------------------------------------------------------------------------------
# ReplicateConfig (mutable, type-checked attributes like the pybind class)
# --------------------------------------------------------------------------------


def _check_int(name: str, value: Any, lo: int = 0, hi: int = _U64) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value < hi:
        raise TypeError(
            f"ReplicateConfig.{name}: expected an integer in [{lo}, {hi}), got {value!r}"
        )
    return value


class ReplicateConfig:
    """Replication settings (reference ``ReplicateConfig``)."""

    def __init__(self) -> None:
        self.replica_num = 1
        self.nof_replica_num = 0
        self.dfs_replica_num = 0
        self.soft_pin_action = SoftPinAction.PRESERVE
        self._soft_pin_ttl_ms: int | None = None
        self.with_hard_pin = False
        self.preferred_segment = ""
        self.preferred_segments: list[str] = []
        self.preferred_nof_segments: list[str] = []
        self.prefer_alloc_in_same_node = False
        self.data_type = ObjectDataType.UNKNOWN
        self.group_ids: list[str] | None = None

    @property
    def soft_pin_ttl_ms(self) -> int | None:
        return self._soft_pin_ttl_ms

    @soft_pin_ttl_ms.setter
    def soft_pin_ttl_ms(self, value: int | None) -> None:
        self._soft_pin_ttl_ms = None if value is None else _check_int("soft_pin_ttl_ms", value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("replica_num", "nof_replica_num", "dfs_replica_num"):
            value = _check_int(name, value)
        elif name == "soft_pin_action":
            value = SoftPinAction(value)
        elif name in ("with_hard_pin", "prefer_alloc_in_same_node"):
            if not isinstance(value, (bool, int)):  # pybind's bool caster takes ints too
                raise TypeError(f"ReplicateConfig.{name}: expected a bool, got {value!r}")
            value = bool(value)
        elif name in ("preferred_segments", "preferred_nof_segments"):
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"ReplicateConfig.{name}: expected a list of str")
            value = list(value)
        elif name == "preferred_segment" and not isinstance(value, str):
            raise TypeError("ReplicateConfig.preferred_segment: expected a str")
        object.__setattr__(self, name, value)

    def to_native(self) -> _NativeConfig:
        preferred = ([self.preferred_segment] if self.preferred_segment else []) + list(
            self.preferred_segments
        )
        return _NativeConfig(
            replica_num=self.replica_num,
            soft_pin_ttl_ms=self.soft_pin_ttl_ms,
            with_hard_pin=self.with_hard_pin,
            preferred_segments=tuple(preferred),
            soft_pin_action=self.soft_pin_action,
        )

    def __str__(self) -> str:
        ttl = "default" if self.soft_pin_ttl_ms is None else str(self.soft_pin_ttl_ms)
        return (
            f"ReplicateConfig: {{ replica_num: {self.replica_num}, nof_replica_num: {self.nof_replica_num}, "
            f"dfs_replica_num: {self.dfs_replica_num}, soft_pin_action: {self.soft_pin_action.name}, "
            f"soft_pin_ttl_ms: {ttl}, with_hard_pin: {int(self.with_hard_pin)}, "
            f"preferred_segments: {self.preferred_segments}, "
            f"preferred_nof_segments: {self.preferred_nof_segments}, "
            f"prefer_alloc_in_same_node: {int(self.prefer_alloc_in_same_node)}, "
            f"data_type: {self.data_type.name} }}"
        )

    __repr__ = __str__


# --------------------------------------------------------------------------------
# replica descriptors
# --------------------------------------------------------------------------------


class Descriptor:
    """A memory buffer of a replica: ``size``, ``buffer_address``, ``transport_endpoint``."""

    def __init__(
        self, size: int = 0, buffer_address: int = 0, transport_endpoint: str = ""
    ) -> None:
        self.size = size
        self.buffer_address = buffer_address
        self.transport_endpoint = transport_endpoint
        self.protocol = "tcp"

    def __repr__(self) -> str:
        return (
            f"<Descriptor size={self.size} buffer_address={self.buffer_address} "
            f"transport_endpoint={self.transport_endpoint}>"
        )


class DiskDescriptor:
    """A replica in a file (``file_path``, ``object_size``); pymooncake keeps
    every replica in memory, so descriptors of this type are never returned."""

    def __init__(self, file_path: str = "", object_size: int = 0) -> None:
        self.file_path = file_path
        self.object_size = object_size


class MemoryDescriptor:
    def __init__(self, buffer_descriptor: Descriptor) -> None:
        self.buffer_descriptor = buffer_descriptor


class ReplicaDescriptor:
    """One replica (reference ``ReplicaDescriptor``); all pymooncake replicas are in memory."""

    def __init__(self, desc: ReplicaDesc) -> None:
        self.status = desc.status
        self._mem = MemoryDescriptor(Descriptor(desc.size, desc.address, desc.endpoint))

    def is_memory_replica(self) -> bool:
        return True

    def is_disk_replica(self) -> bool:
        return False

    def is_local_disk_replica(self) -> bool:
        return False

    def get_memory_descriptor(self) -> MemoryDescriptor:
        return self._mem

    def get_disk_descriptor(self) -> DiskDescriptor:
        """Raises RuntimeError, as the reference does for a memory replica."""
        raise RuntimeError("std::get: wrong index for variant (not a disk replica)")

    def __repr__(self) -> str:
        d = self._mem.buffer_descriptor
        return f"ReplicaDescriptor(memory, {d.transport_endpoint}, {d.buffer_address:#x}, {d.size}, {self.status.name})"


# --------------------------------------------------------------------------------
# host memory allocator (memfd shared memory)
# --------------------------------------------------------------------------------


class MooncakeHostMemAllocator:
    """``alloc(size) -> address`` of shared (memfd) memory, ``free(ptr) -> 0``.

    The memory comes from the process-wide table of shareable regions (the
    reference's ``ShmHelper``), so a dummy client can ``register_buffer`` it:
    the real client then maps the same pages (SGLang's standalone mode)."""

    def __init__(self) -> None:
        self._maps: dict[int, mmap.mmap] = {}  # fallback without memfd
        self._lock = threading.Lock()

    def alloc(self, size: int) -> int:
        if size <= 0:
            return 0
        try:
            return shm_registry().allocate(size).addr
        except (AttributeError, OSError):
            pass
        mm = mmap.mmap(-1, size)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        with self._lock:
            self._maps[addr] = mm
        return addr

    def free(self, ptr: int) -> int:
        if shm_registry().free(ptr):
            return 0
        with self._lock:
            mm = self._maps.pop(ptr, None)
        if mm is None:
            return -1
        try:
            mm.close()
        except BufferError:
            pass
        return 0
