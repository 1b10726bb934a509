"""``mooncake.store``: the reference's Python store API on pymooncake.

``MooncakeDistributedStore`` keeps the reference's method names, positional
signatures and return conventions: 0 / negative ``ErrorCode`` for writes,
byte counts for reads, ``b""`` for a missing key, 1/0/negative for
``is_exist``, ``None`` for a missing handle.  Each failure is logged with its
cause before the integer goes back.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Any, TypeVar

from pymooncake._net import split_host_port
from pymooncake.config import EngineConfig
from pymooncake.errors import ConfigError, InvalidParams, MooncakeError, StoreError
from pymooncake.store import (
    BufferHandle,
    ErrorCode,
    ReplicaDesc,
    ReplicaStatus,
    SoftPinAction,
    StoreClient,
    StoreClientConfig,
    parse_size,
)
from pymooncake.store import ReplicateConfig as _NativeConfig
from pymooncake.store._buffers import Lease, LeasePool
from pymooncake.store._client import ObjectLocation
from pymooncake.transfer import TransferEngine as _NativeEngine

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
    "PROCESSING",
    "REMOVED",
    "SAMPLE",
    "TENSOR",
    "UNDEFINED",
    "UNKNOWN",
    "WEIGHT",
    "BufferHandle",
    "BufferLease",
    "BufferPool",
    "Descriptor",
    "MemoryDescriptor",
    "MooncakeDistributedStore",
    "MooncakeHostMemAllocator",
    "ObjectDataType",
    "RegisteredBufferLease",
    "RegisteredBufferPool",
    "ReplicaDescriptor",
    "ReplicaStatus",
    "ReplicateConfig",
    "SoftPinAction",
]

log = logging.getLogger("mooncake.store")
T = TypeVar("T")
_U64 = 1 << 64

UNDEFINED = ReplicaStatus.UNDEFINED
INITIALIZED = ReplicaStatus.INITIALIZED
PROCESSING = ReplicaStatus.PROCESSING
COMPLETE = ReplicaStatus.COMPLETE
REMOVED = ReplicaStatus.REMOVED
FAILED = ReplicaStatus.FAILED


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

    def __init__(self, size: int, buffer_address: int, transport_endpoint: str) -> None:
        self.size = size
        self.buffer_address = buffer_address
        self.transport_endpoint = transport_endpoint
        self.protocol = "tcp"

    def __repr__(self) -> str:
        return f"Descriptor(size={self.size}, buffer_address={self.buffer_address:#x}, transport_endpoint={self.transport_endpoint!r})"


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

    def get_disk_descriptor(self) -> None:
        raise RuntimeError("not a disk replica")

    def __repr__(self) -> str:
        d = self._mem.buffer_descriptor
        return f"ReplicaDescriptor(memory, {d.transport_endpoint}, {d.buffer_address:#x}, {d.size}, {self.status.name})"


# --------------------------------------------------------------------------------
# host memory allocator (memfd shared memory)
# --------------------------------------------------------------------------------


class MooncakeHostMemAllocator:
    """``alloc(size) -> address`` of shared (memfd) memory, ``free(ptr) -> 0``."""

    def __init__(self) -> None:
        self._maps: dict[int, mmap.mmap] = {}
        self._lock = threading.Lock()

    def alloc(self, size: int) -> int:
        if size <= 0:
            return 0
        try:
            fd = os.memfd_create("mooncake_host_mem", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                mm = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        except (AttributeError, OSError):
            mm = mmap.mmap(-1, size)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        with self._lock:
            self._maps[addr] = mm
        return addr

    def free(self, ptr: int) -> int:
        with self._lock:
            mm = self._maps.pop(ptr, None)
        if mm is None:
            return -1
        try:
            mm.close()
        except BufferError:
            pass
        return 0


# --------------------------------------------------------------------------------
# buffer pool (leases from a store's local buffer)
# --------------------------------------------------------------------------------

BufferLease = Lease


class BufferPool:
    """Registered scratch buffers leased from a store's local buffer (reference
    ``mooncake.store.BufferPool``).  ``acquire``/``buffer`` return a lease with
    ``ptr``, ``size``, ``buffer`` (writable memoryview) and ``release()``."""

    def __init__(
        self,
        store: MooncakeDistributedStore,
        max_bytes: int = 0,
        min_size_class: int = 65536,
        max_size_class: int | None = None,
        alignment: int = 8 << 20,
        block_on_exhaustion: bool = True,
        default_timeout: float | None = None,
        max_regions: int | None = None,
        prewarm_size: int | None = None,
        prewarm_count: int = 0,
    ) -> None:
        client = store._client
        if client is None:
            raise RuntimeError("BufferPool needs a store that is set up (call setup() first)")
        self._pool = LeasePool(
            client.local, max_bytes=max_bytes, block=block_on_exhaustion, timeout_s=default_timeout
        )

    def acquire(self, size: int, block: bool | None = None, timeout: float | None = None) -> Lease:
        return self._pool.acquire(size, block, timeout)

    buffer = acquire

    def prewarm(self, size: int, count: int) -> None:
        """Nothing to do: the local buffer is registered up front."""

    def close(self) -> None:
        self._pool.close()


RegisteredBufferPool = BufferPool
RegisteredBufferLease = Lease


# --------------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------------

_SETUP_KEYWORDS = (
    "engine",
    "enable_ssd_offload",
    "ssd_offload_path",
    "tenant_id",
    "enable_client_http_server",
    "client_http_port",
)
_POSITIONAL = (
    "local_hostname",
    "metadata_server",
    "global_segment_size",
    "local_buffer_size",
    "protocol",
    "rdma_devices",
    "master_server_addr",
)
_DICT_KEYS = set(_POSITIONAL) | {"ipc_socket_path", *_SETUP_KEYWORDS}


def _code(exc: BaseException) -> int:
    if isinstance(exc, MooncakeError):
        return exc.code if exc.code < 0 else int(ErrorCode.INTERNAL_ERROR)
    return int(ErrorCode.INVALID_PARAMS)


class MooncakeDistributedStore:
    """Reference-compatible store client.  Construct, then :meth:`setup`."""

    def __init__(self) -> None:
        self._client: StoreClient | None = None
        self._lock = threading.Lock()
        self._registered: dict[int, _NativeEngine] = {}
        self._sessions: dict[str, ObjectLocation] = {}

    # --- set-up -------------------------------------------------------------------

    def setup(self, *args: Any, **kwargs: Any) -> int:
        """``setup(local_hostname, metadata_server, global_segment_size,
        local_buffer_size, protocol, rdma_devices, master_server_addr, engine=None,
        enable_ssd_offload=False, ssd_offload_path="", tenant_id="default",
        enable_client_http_server=False, client_http_port=9300)`` or
        ``setup(config: dict)``.  Returns 0, or a negative code after logging why.

        Raises:
            TypeError: unknown keyword or wrong number of arguments (as pybind does).
        """
        if len(args) == 1 and not kwargs and isinstance(args[0], dict):
            return self._setup_dict(args[0])
        for k in kwargs:
            if k not in _SETUP_KEYWORDS and k not in _POSITIONAL:
                raise TypeError(f"setup() got an unexpected keyword argument '{k}'")
        values = dict(zip(_POSITIONAL, args, strict=False))
        if len(args) > len(_POSITIONAL) + len(_SETUP_KEYWORDS):
            raise TypeError(
                f"setup() takes at most {len(_POSITIONAL) + len(_SETUP_KEYWORDS)} arguments"
            )
        for extra, name in zip(args[len(_POSITIONAL) :], _SETUP_KEYWORDS, strict=False):
            values[name] = extra
        for k, v in kwargs.items():
            if k in values:
                raise TypeError(f"setup() got multiple values for argument '{k}'")
            values[k] = v
        missing = [p for p in _POSITIONAL if p not in values]
        if missing:
            raise TypeError(f"setup() missing required argument(s): {', '.join(missing)}")
        return self._setup(values)

    def _setup_dict(self, cfg: dict[str, Any]) -> int:
        unknown = set(cfg) - _DICT_KEYS
        if unknown:
            log.warning("setup(config): ignoring unknown keys %s", sorted(unknown))
        for req in ("local_hostname", "metadata_server"):
            if not cfg.get(req):
                log.error("setup(config): %r is required", req)
                return int(ErrorCode.INVALID_PARAMS)
        values = {
            "local_hostname": str(cfg["local_hostname"]),
            "metadata_server": str(cfg["metadata_server"]),
            "global_segment_size": cfg.get("global_segment_size", 16 << 20),
            "local_buffer_size": cfg.get("local_buffer_size", 16 << 20),
            "protocol": str(cfg.get("protocol", "tcp")),
            "rdma_devices": str(cfg.get("rdma_devices", "")),
            "master_server_addr": str(cfg.get("master_server_addr", "127.0.0.1:50051")),
        }
        for k in _SETUP_KEYWORDS:
            if k in cfg:
                values[k] = cfg[k]
        return self._setup(values)

    def _setup(self, v: dict[str, Any]) -> int:
        try:
            segment = parse_size(v["global_segment_size"], what="global_segment_size")
            local = parse_size(v["local_buffer_size"], what="local_buffer_size")
        except ConfigError as exc:
            log.error("setup failed: %s", str(exc))
            return int(ErrorCode.INVALID_PARAMS)
        if v.get("enable_ssd_offload"):
            log.error(
                "setup failed: SSD offload is not available in pymooncake (enable_ssd_offload=True)"
            )
            return int(ErrorCode.NOT_SUPPORTED)
        if v.get("enable_client_http_server"):
            log.warning(
                "enable_client_http_server: the client HTTP endpoint is not available; continuing without it"
            )
        protocol = str(v.get("protocol") or "tcp")
        if protocol != "tcp":
            log.info("protocol %r requested: pymooncake stores move data over TCP", protocol)
        engine = _native_engine(v.get("engine"))
        try:
            _, port = split_host_port(str(v["local_hostname"]))
            engine_cfg = EngineConfig.from_env()
            if port is None and engine is None:
                # reference: a client name without a port gets one from [12300, 14300]
                lo = int(os.environ.get("MC_STORE_CLIENT_MIN_PORT", "12300"))
                hi = int(os.environ.get("MC_STORE_CLIENT_MAX_PORT", "14300"))
                engine_cfg = engine_cfg.replace(rpc_port_min=lo, rpc_port_max=hi)
            config = StoreClientConfig(
                local_hostname=str(v["local_hostname"]),
                metadata_server=str(v["metadata_server"]),
                master_server_addr=str(v["master_server_addr"]),
                global_segment_size=segment,
                local_buffer_size=local,
                protocol=protocol,
                rpc_timeout_s=float(os.environ.get("MC_RPC_TIMEOUT_MS", "30000")) / 1000.0,
                engine=engine_cfg,
            )
        except (MooncakeError, ValueError) as exc:
            log.error("setup failed: %s", str(exc))
            return _code(exc)
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
            try:
                self._client = StoreClient(config, engine=engine)
            except MooncakeError as exc:
                log.error(
                    "setup(%r, master %s) failed: %s",
                    config.local_hostname,
                    config.master_server_addr,
                    exc,
                )
                return _code(exc)
        return 0

    def setup_dummy(self, mem_pool_size: int, local_buffer_size: int, server_address: str) -> int:
        log.error(
            "setup_dummy(%s): dummy clients that forward to a mooncake_client process are not "
            "available in pymooncake; call setup() (a full client costs the same here)",
            server_address,
        )
        return -1

    def init_all(self, protocol: str, device_name: str, mount_segment_size: int = 1 << 30) -> int:
        return self.setup(
            "localhost:12345",
            "127.0.0.1:2379",
            mount_segment_size,
            1 << 30,
            protocol,
            device_name,
            "127.0.0.1:50051",
        )

    def close(self) -> int:
        with self._lock:
            client, self._client = self._client, None
        self._sessions.clear()
        if client is not None:
            client.close()
        self._registered.clear()
        return 0

    def health_check(self) -> int:
        client = self._client
        if client is None or client.closed:
            return 1
        return 0 if client.health() else 2

    def get_hostname(self) -> str:
        client = self._client
        return client.hostname if client is not None else ""

    # --- helpers ---------------------------------------------------------------------

    def _c(self) -> StoreClient:
        client = self._client
        if client is None:
            raise InvalidParams("the store is not set up; call setup() first")
        return client

    def _int(self, what: str, fn: Callable[[StoreClient], Any]) -> int:
        try:
            fn(self._c())
            return 0
        except (MooncakeError, ValueError, TypeError) as exc:
            log.error("%s failed: %s", what, str(exc))
            return _code(exc)

    def _value(
        self, what: str, fn: Callable[[StoreClient], T], failure: T, quiet: tuple[int, ...] = ()
    ) -> T:
        try:
            return fn(self._c())
        except (MooncakeError, ValueError, TypeError) as exc:
            if not (isinstance(exc, StoreError) and exc.code in quiet):
                log.error("%s failed: %s", what, str(exc))
            return failure

    @staticmethod
    def _cfg(config: ReplicateConfig | None) -> _NativeConfig:
        return config.to_native() if config is not None else _NativeConfig()

    @staticmethod
    def _codes(results: Sequence[Any], what: str) -> list[int]:
        out = []
        for r in results:
            if isinstance(r, BaseException):
                log.debug("%s: %s", what, str(r))
                out.append(_code(r))
            elif isinstance(r, bool):
                out.append(0)
            else:
                out.append(int(r))
        return out

    # --- memory registration ----------------------------------------------------------

    def register_buffer(self, buffer_ptr: int, size: int) -> int:
        def reg(c: StoreClient) -> None:
            c.engine.register(buffer_ptr, size)

        return self._int(f"register_buffer({buffer_ptr:#x}, {size})", reg)

    def unregister_buffer(self, buffer_ptr: int) -> int:
        return self._int(
            f"unregister_buffer({buffer_ptr:#x})", lambda c: c.engine.unregister(buffer_ptr)
        )

    def alloc_from_mem_pool(self, size: int) -> int:
        return 0  # only dummy clients have a shared pool (reference RealClient also returns 0)

    # --- writes --------------------------------------------------------------------------

    def put(self, key: str, value: Any, config: ReplicateConfig | None = None) -> int:
        return self._int(f"put({key!r})", lambda c: c.put(key, value, self._cfg(config)))

    def put_parts(self, key: str, *parts: Any, config: ReplicateConfig | None = None) -> int:
        return self._int(
            f"put_parts({key!r})", lambda c: c.put_parts(key, list(parts), self._cfg(config))
        )

    def put_batch(
        self, keys: list[str], values: list[Any], config: ReplicateConfig | None = None
    ) -> int:
        def run(c: StoreClient) -> None:
            for r in c.put_many(keys, [[v] for v in values], self._cfg(config), bytes_api=True):
                if isinstance(r, BaseException):
                    raise r

        return self._int("put_batch", run)

    def put_from(
        self, key: str, buffer_ptr: int, size: int, config: ReplicateConfig | None = None
    ) -> int:
        return self._int(
            f"put_from({key!r})", lambda c: c.put_from(key, buffer_ptr, size, self._cfg(config))
        )

    def put_from_with_metadata(
        self,
        key: str,
        buffer_ptr: int,
        metadata_buffer_ptr: int,
        size: int,
        metadata_size: int,
        config: ReplicateConfig | None = None,
    ) -> int:
        def run(c: StoreClient) -> None:
            (r,) = c.put_many(
                [key],
                [[(buffer_ptr, size), (metadata_buffer_ptr, metadata_size)]],
                self._cfg(config),
            )
            if isinstance(r, BaseException):
                raise r

        return self._int(f"put_from_with_metadata({key!r})", run)

    def batch_put_from(
        self,
        keys: list[str],
        buffer_ptrs: list[int],
        sizes: list[int],
        config: ReplicateConfig | None = None,
    ) -> list[int]:
        if not len(keys) == len(buffer_ptrs) == len(sizes):
            log.error("batch_put_from: keys, buffer_ptrs and sizes differ in length")
            return [int(ErrorCode.INVALID_PARAMS)] * len(keys)
        return self._batch(
            "batch_put_from",
            keys,
            lambda c: c.put_many(
                keys, [[(p, n)] for p, n in zip(buffer_ptrs, sizes, strict=True)], self._cfg(config)
            ),
        )

    def batch_put_from_multi_buffers(
        self,
        keys: list[str],
        all_buffer_ptrs: list[list[int]],
        all_sizes: list[list[int]],
        config: ReplicateConfig | None = None,
    ) -> list[int]:
        if not len(keys) == len(all_buffer_ptrs) == len(all_sizes):
            log.error("batch_put_from_multi_buffers: argument lists differ in length")
            return [int(ErrorCode.INVALID_PARAMS)] * len(keys)
        parts = [
            list(zip(ps, ns, strict=True))
            for ps, ns in zip(all_buffer_ptrs, all_sizes, strict=True)
        ]
        return self._batch(
            "batch_put_from_multi_buffers",
            keys,
            lambda c: c.put_many(keys, parts, self._cfg(config)),
        )

    def _batch(
        self, what: str, keys: Sequence[str], fn: Callable[[StoreClient], Sequence[Any]]
    ) -> list[int]:
        try:
            return self._codes(fn(self._c()), what)
        except (MooncakeError, ValueError, TypeError) as exc:
            log.error("%s failed: %s", what, str(exc))
            return [_code(exc)] * len(keys)

    def upsert(self, key: str, value: Any, config: ReplicateConfig | None = None) -> int:
        return self._int(f"upsert({key!r})", lambda c: c.upsert(key, value, self._cfg(config)))

    def upsert_parts(self, key: str, *parts: Any, config: ReplicateConfig | None = None) -> int:
        def run(c: StoreClient) -> None:
            (r,) = c.upsert_many([key], [list(parts)], self._cfg(config))
            if isinstance(r, BaseException):
                raise r

        return self._int(f"upsert_parts({key!r})", run)

    def upsert_batch(
        self, keys: list[str], values: list[Any], config: ReplicateConfig | None = None
    ) -> int:
        def run(c: StoreClient) -> None:
            for r in c.upsert_many(keys, [[v] for v in values], self._cfg(config)):
                if isinstance(r, BaseException):
                    raise r

        return self._int("upsert_batch", run)

    def upsert_from(
        self, key: str, buffer_ptr: int, size: int, config: ReplicateConfig | None = None
    ) -> int:
        def run(c: StoreClient) -> None:
            (r,) = c.upsert_many([key], [[(buffer_ptr, size)]], self._cfg(config))
            if isinstance(r, BaseException):
                raise r

        return self._int(f"upsert_from({key!r})", run)

    def batch_upsert_from(
        self,
        keys: list[str],
        buffer_ptrs: list[int],
        sizes: list[int],
        config: ReplicateConfig | None = None,
    ) -> list[int]:
        return self._batch(
            "batch_upsert_from",
            keys,
            lambda c: c.upsert_many(
                keys, [[(p, n)] for p, n in zip(buffer_ptrs, sizes, strict=True)], self._cfg(config)
            ),
        )

    # --- reads ---------------------------------------------------------------------------

    _MISS = (int(ErrorCode.OBJECT_NOT_FOUND),)

    def get(self, key: str) -> bytes:
        return self._value(f"get({key!r})", lambda c: c.get(key), b"", self._MISS)

    def get_batch(self, keys: list[str]) -> list[bytes]:
        def run(c: StoreClient) -> list[bytes]:
            return [r if isinstance(r, bytes) else b"" for r in c.get_many(keys)]

        return self._value("get_batch", run, [b""])

    def get_buffer(self, key: str) -> BufferHandle | None:
        return self._value(f"get_buffer({key!r})", lambda c: c.get_buffer(key), None, self._MISS)

    def batch_get_buffer(self, keys: list[str]) -> list[BufferHandle | None]:
        return [self.get_buffer(k) for k in keys]

    def get_into(self, key: str, buffer_ptr: int, size: int) -> int:
        try:
            return self._c().get_into(key, buffer_ptr, size)
        except (MooncakeError, ValueError, TypeError) as exc:
            if not (isinstance(exc, StoreError) and exc.code in self._MISS):
                log.error("get_into(%r) failed: %s", key, str(exc))
            return _code(exc)

    def batch_get_into(
        self, keys: list[str], buffer_ptrs: list[int], sizes: list[int]
    ) -> list[int]:
        if not len(keys) == len(buffer_ptrs) == len(sizes):
            log.error("batch_get_into: keys, buffer_ptrs and sizes differ in length")
            return [int(ErrorCode.INVALID_PARAMS)] * len(keys)
        return self._batch(
            "batch_get_into",
            keys,
            lambda c: c.get_many_into(
                keys, [[(p, n)] for p, n in zip(buffer_ptrs, sizes, strict=True)]
            ),
        )

    def batch_get_into_multi_buffers(
        self,
        keys: list[str],
        all_buffer_ptrs: list[list[int]],
        all_sizes: list[list[int]],
        prefer_alloc_in_same_node: bool = False,
    ) -> list[int]:
        if not len(keys) == len(all_buffer_ptrs) == len(all_sizes):
            log.error("batch_get_into_multi_buffers: argument lists differ in length")
            return [int(ErrorCode.INVALID_PARAMS)] * len(keys)
        dests = [
            list(zip(ps, ns, strict=True))
            for ps, ns in zip(all_buffer_ptrs, all_sizes, strict=True)
        ]
        return self._batch(
            "batch_get_into_multi_buffers", keys, lambda c: c.get_many_into(keys, dests)
        )

    def get_into_ranges(
        self,
        buffer_ptrs: list[int],
        all_keys: list[list[str]],
        all_dst_offsets: list[list[list[int]]],
        all_src_offsets: list[list[list[int]]],
        all_sizes: list[list[list[int]]],
    ) -> list[list[list[int]]]:
        """Read byte ranges of several objects into several registered buffers."""
        n = len(buffer_ptrs)
        if not n == len(all_keys) == len(all_dst_offsets) == len(all_src_offsets) == len(all_sizes):
            log.error("get_into_ranges: the per-buffer lists differ in length")
            return [[[int(ErrorCode.INVALID_PARAMS)] for _ in keys] for keys in all_keys]
        try:
            client = self._c()
        except MooncakeError as exc:
            return [[[_code(exc)] for _ in keys] for keys in all_keys]
        out: list[list[list[int]]] = []
        flat_keys: list[str] = []
        flat_ranges: list[list[tuple[memoryview, int]]] = []
        slots: list[tuple[int, int]] = []
        for b, ptr in enumerate(buffer_ptrs):
            row: list[list[int]] = []
            region = client.engine.registry.find(ptr, 1)
            limit = region.end - ptr if region is not None else None
            for k, key in enumerate(all_keys[b]):
                dst, src, sizes = all_dst_offsets[b][k], all_src_offsets[b][k], all_sizes[b][k]
                if not len(dst) == len(src) == len(sizes):
                    row.append([int(ErrorCode.INVALID_PARAMS)])
                    continue
                if not sizes:
                    row.append([])
                    continue
                if limit is None:
                    row.append([int(ErrorCode.INVALID_PARAMS)] * len(sizes))
                    continue
                ranges = []
                bad = False
                for d, s_, z in zip(dst, src, sizes, strict=True):
                    if d < 0 or z < 0 or d + z > limit:
                        bad = True
                        break
                    ranges.append((client.engine.local_view(ptr + d, z, writable=True), s_))
                if bad:
                    row.append([int(ErrorCode.INVALID_PARAMS)] * len(sizes))
                    continue
                row.append([0] * len(sizes))
                slots.append((b, k))
                flat_keys.append(key)
                flat_ranges.append(ranges)
            out.append(row)
        if flat_keys:
            try:
                locs = client.locate(flat_keys)
            except MooncakeError as exc:
                for b, k in slots:
                    out[b][k] = [_code(exc)] * len(out[b][k])
                return out
            ok = [i for i, loc in enumerate(locs) if isinstance(loc, ObjectLocation)]
            for i, loc in enumerate(locs):
                if not isinstance(loc, ObjectLocation):
                    b, k = slots[i]
                    out[b][k] = [_code(loc)] * len(out[b][k])
            results = client.read_ranges([locs[i] for i in ok], [flat_ranges[i] for i in ok])  # type: ignore[misc]
            for i, res in zip(ok, results, strict=True):
                b, k = slots[i]
                out[b][k] = self._codes(res, "get_into_ranges")
        return out

    # --- sessions (SGLang direct linker) -------------------------------------------------

    def batch_get_session_start(self, keys: list[str]) -> list[int]:
        try:
            locs = self._c().locate(keys)
        except MooncakeError as exc:
            return [_code(exc)] * len(keys)
        out = []
        for key, loc in zip(keys, locs, strict=True):
            if isinstance(loc, ObjectLocation):
                self._sessions[key] = loc
                out.append(0)  # reference: 0 per started key
            else:
                out.append(_code(loc))
        return out

    def batch_get_into_multi_buffer_ranges(
        self,
        keys: list[str],
        all_buffer_ptrs: list[list[int]],
        all_sizes: list[list[int]],
        all_src_offsets: list[list[int]],
    ) -> list[int]:
        try:
            client = self._c()
        except MooncakeError as exc:
            return [_code(exc)] * len(keys)
        out = [0] * len(keys)
        locs: list[ObjectLocation] = []
        ranges: list[list[tuple[memoryview, int]]] = []
        idx = []
        for i, key in enumerate(keys):
            loc = self._sessions.get(key)
            if loc is None:
                out[i] = int(ErrorCode.INVALID_PARAMS)
                log.error(
                    "batch_get_into_multi_buffer_ranges: no session for %r (call batch_get_session_start)",
                    key,
                )
                continue
            try:
                frags = [
                    (client.engine.local_view(p, n, writable=True), s)
                    for p, n, s in zip(
                        all_buffer_ptrs[i], all_sizes[i], all_src_offsets[i], strict=True
                    )
                ]
            except (MooncakeError, ValueError) as exc:
                out[i] = _code(exc)
                continue
            locs.append(loc)
            ranges.append(frags)
            idx.append(i)
        for i, res in zip(idx, client.read_ranges(locs, ranges), strict=True):
            bad = [r for r in res if isinstance(r, BaseException)]
            out[i] = _code(bad[0]) if bad else sum(r for r in res if isinstance(r, int))
        return out

    def batch_get_session_end(self, keys: list[str]) -> int:
        for key in keys:
            self._sessions.pop(key, None)
        return 0

    # --- queries and removal ----------------------------------------------------------------

    def is_exist(self, key: str) -> int:
        try:
            return 1 if self._c().exists(key) else 0
        except (MooncakeError, ValueError) as exc:
            log.error("is_exist(%r) failed: %s", key, str(exc))
            return _code(exc)

    def batch_is_exist(self, keys: list[str]) -> list[int]:
        if not keys:
            return []
        try:
            return [1 if x else 0 for x in self._c().exists_many(keys)]
        except (MooncakeError, ValueError) as exc:
            log.error("batch_is_exist failed: %s", str(exc))
            return [_code(exc)] * len(keys)

    def get_size(self, key: str) -> int:
        try:
            return self._c().size_of(key)
        except (MooncakeError, ValueError) as exc:
            if not (isinstance(exc, StoreError) and exc.code in self._MISS):
                log.error("get_size(%r) failed: %s", key, str(exc))
            return _code(exc)

    def remove(self, key: str, force: bool = False) -> int:
        try:
            self._c().remove(key, force)
            return 0
        except (MooncakeError, ValueError) as exc:
            log.debug("remove(%r): %s", key, str(exc))
            return _code(exc)

    def batch_remove(self, keys: list[str], force: bool = False) -> list[int]:
        return self._batch(
            "batch_remove",
            keys,
            lambda c: [r if r is not None else 0 for r in c.remove_many(keys, force)],
        )

    def remove_by_regex(self, regex_pattern: str, force: bool = False) -> int:
        try:
            return self._c().remove_by_regex(regex_pattern, force)
        except (MooncakeError, ValueError) as exc:
            log.error("remove_by_regex(%r) failed: %s", regex_pattern, str(exc))
            return _code(exc)

    def remove_all(self, force: bool = False) -> int:
        try:
            return self._c().remove_all(force)
        except (MooncakeError, ValueError) as exc:
            log.error("remove_all failed: %s", str(exc))
            return _code(exc)

    def get_replica_desc(self, key: str) -> list[ReplicaDescriptor]:
        return self._value(
            f"get_replica_desc({key!r})",
            lambda c: [ReplicaDescriptor(r) for r in c.replicas(key)],
            [],
            self._MISS,
        )

    def batch_get_replica_desc(self, keys: list[str]) -> dict[str, list[ReplicaDescriptor]]:
        def run(c: StoreClient) -> dict[str, list[ReplicaDescriptor]]:
            out = {}
            for key, res in zip(keys, c.replicas_many(keys), strict=True):
                if not isinstance(res, BaseException):
                    out[key] = [ReplicaDescriptor(r) for r in res]
            return out

        return self._value("batch_get_replica_desc", run, {})

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _native_engine(engine: Any) -> _NativeEngine | None:
    """Accept ``engine.get_engine()`` handles, compat engines or native engines."""
    if engine is None:
        return None
    if isinstance(engine, _NativeEngine):
        return engine
    native = getattr(engine, "native", None)
    if isinstance(native, _NativeEngine):
        return native
    raise TypeError(
        f"setup(engine=...) expects mooncake.engine.TransferEngine.get_engine(), got {type(engine).__name__}"
    )
