"""``mooncake.store``: the reference's Python store API on pymooncake.

``MooncakeDistributedStore`` keeps the reference's method names, positional
signatures and return conventions: 0 / negative ``ErrorCode`` for writes,
byte counts for reads, ``b""`` for a missing key, 1/0/negative for
``is_exist``, ``None`` for a missing handle.  Each failure is logged with its
cause before the integer goes back.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pymooncake._authio import ClusterSecurity
from pymooncake._cascade import CascadeLog
from pymooncake._gcpause import gc_paused
from pymooncake._heldio import DEFAULT_HOLD_S, spin_from_env
from pymooncake._net import split_host_port
from pymooncake.config import EngineConfig, parse_bool_env
from pymooncake.errors import ConfigError, InvalidParams, MooncakeError, StoreError
from pymooncake.store import (
    BufferHandle,
    ErrorCode,
    ReplicaStatus,
    SoftPinAction,
    StoreClient,
    StoreClientConfig,
    parse_size,
)
from pymooncake.store import ReplicateConfig as _NativeConfig
from pymooncake.store._api import StoreApi
from pymooncake.store._client import ObjectLocation
from pymooncake.store._dummy_client import DummyClient, DummyClientConfig
from pymooncake.store._http import ClientHttpServer, client_http_settings, start_client_http_server
from pymooncake.store._metrics import ClientMetricsSettings
from pymooncake.store._sessions import PutSessions
from pymooncake.store._types import DEFAULT_REPLICATE_CONFIG
from pymooncake.transfer import TransferEngine as _NativeEngine

from ._buffer_pool import (
    BufferLease,
    BufferLeaseView,
    BufferPool,
    RegisteredBufferLease,
    RegisteredBufferLeaseView,
    RegisteredBufferPool,
)
from ._parallel_types import ParallelAxis, ReadTarget, TensorParallelism
from ._store_codes import store_code, store_codes
from ._store_parallel import ParallelOps
from ._store_ranges import RangeReads
from ._store_sessions import SegmentOps, SessionOps, close_mappings
from ._store_tensor import deserialize_tensor as _deserialize_tensor
from ._store_tensor import serialize_tensor as _serialize_tensor
from ._store_tensor import tensor_metadata_size as _tensor_metadata_size
from ._store_types import (
    ACTIVATION,
    COMPLETE,
    FAILED,
    GENERAL,
    GRADIENT,
    INITIALIZED,
    KVCACHE,
    METADATA,
    OPTIMIZER_STATE,
    PENDING,
    PROCESSING,
    REMOVED,
    REPLICA_COPY,
    REPLICA_MOVE,
    SAMPLE,
    SUCCESS,
    TENSOR,
    UNDEFINED,
    UNKNOWN,
    WEIGHT,
    Descriptor,
    DiskDescriptor,
    MemoryDescriptor,
    MooncakeHostMemAllocator,
    ObjectDataType,
    QueryTaskResponse,
    ReplicaDescriptor,
    ReplicateConfig,
    TaskStatus,
    TaskType,
)

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
    "BufferHandle",
    "BufferLease",
    "BufferLeaseView",
    "BufferPool",
    "Descriptor",
    "DiskDescriptor",
    "MemoryDescriptor",
    "MooncakeDistributedStore",
    "MooncakeHostMemAllocator",
    "ObjectDataType",
    "ParallelAxis",
    "QueryTaskResponse",
    "ReadTarget",
    "RegisteredBufferLease",
    "RegisteredBufferLeaseView",
    "RegisteredBufferPool",
    "ReplicaDescriptor",
    "ReplicaStatus",
    "ReplicateConfig",
    "SoftPinAction",
    "TaskStatus",
    "TaskType",
    "TensorParallelism",
    "_deserialize_tensor",
    "_serialize_tensor",
    "_tensor_metadata_size",
]

log = logging.getLogger("mooncake.store")
T = TypeVar("T")


def _raise_first(results: Sequence[object]) -> None:
    """Raise the first error among a native call's per-key results."""
    for r in results:
        if isinstance(r, BaseException):
            raise r


def _one_part_each(ptrs: Sequence[int], sizes: Sequence[int]) -> list[list[tuple[int, int]]]:
    """One (pointer, size) part per key.

    Raises:
        ValueError: the lists differ in length.
    """
    return [[(p, n)] for p, n in zip(ptrs, sizes, strict=True)]


def _pointer_parts(
    all_ptrs: Sequence[Sequence[int]], all_sizes: Sequence[Sequence[int]]
) -> list[list[tuple[int, int]]]:
    """Each key's (pointer, size) parts.

    Raises:
        ValueError: a key's pointer and size lists differ in length (the batch
            call turns it into INVALID_PARAMS for every key).
    """
    return [list(zip(ps, ns, strict=True)) for ps, ns in zip(all_ptrs, all_sizes, strict=True)]


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


def _gil_hold_s() -> float:
    """PYMOONCAKE_GIL_HOLD_US: microseconds a master call may wait with the GIL held
    (default 4000; 0 turns it off, see pymooncake/_heldio.py)."""
    text = os.environ.get("PYMOONCAKE_GIL_HOLD_US", "").strip()
    if not text:
        return DEFAULT_HOLD_S
    try:
        return max(0, int(text)) / 1e6
    except ValueError:
        raise ValueError(
            f"PYMOONCAKE_GIL_HOLD_US={text!r} is not a whole number of microseconds"
        ) from None


class MooncakeDistributedStore(RangeReads, SessionOps, SegmentOps, ParallelOps):
    """Reference-compatible store client.  Construct, then :meth:`setup`."""

    def __init__(self) -> None:
        self._client: StoreApi | None = None
        self._http: ClientHttpServer | None = None
        self._lock = threading.Lock()
        #: failures of calls, logged once per root cause (a dead peer, a stopped master)
        self._failures = CascadeLog(log)
        self._sessions: dict[str, ObjectLocation] = {}
        self._put_sessions: PutSessions | None = None

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
        for k in ("enable_ssd_offload", "enable_client_http_server"):
            if isinstance(values.get(k), str):  # the reference reads dict values as strings
                try:
                    values[k] = parse_bool_env(k, values[k])
                except ConfigError as exc:
                    log.error("setup(config): %s", exc)
                    return int(ErrorCode.INVALID_PARAMS)
        return self._setup(values)

    def _setup(self, v: dict[str, Any]) -> int:
        try:
            segment = parse_size(v["global_segment_size"], what="global_segment_size")
            local = parse_size(v["local_buffer_size"], what="local_buffer_size")
        except ConfigError as exc:
            log.error("setup failed: %s", str(exc))
            return int(ErrorCode.INVALID_PARAMS)
        # the reference: the argument, else MOONCAKE_OFFLOAD_ENABLED / _FILE_STORAGE_PATH
        ssd_on = bool(v.get("enable_ssd_offload")) or os.environ.get(
            "MOONCAKE_OFFLOAD_ENABLED", ""
        ).strip().lower() in ("1", "true", "yes", "on")
        ssd_path = str(v.get("ssd_offload_path") or "")
        try:
            http_on, http_port = client_http_settings(
                v.get("enable_client_http_server"), v.get("client_http_port"), os.environ
            )
        except ConfigError as exc:
            log.error("setup failed: %s", str(exc))
            return int(ErrorCode.INVALID_PARAMS)
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
                gil_hold_s=_gil_hold_s(),
                rpc_spin_s=spin_from_env(),
                engine=engine_cfg,
                metrics=ClientMetricsSettings.from_env(os.environ),
                cluster_id=os.environ.get("MC_STORE_CLUSTER_ID", "").strip() or "mooncake_cluster",
                enable_ssd_offload=ssd_on,
                ssd_offload_path=ssd_path,
            )
        except (MooncakeError, ValueError) as exc:
            log.error("setup failed: %s", str(exc))
            return store_code(exc)
        with self._lock:
            self._close_client()
            try:
                self._client = StoreClient(config, engine=engine)
            except MooncakeError as exc:
                log.error(
                    "setup(%r, master %s) failed: %s",
                    config.local_hostname,
                    config.master_server_addr,
                    exc,
                )
                return store_code(exc)
            if http_on:
                self._http = start_client_http_server(self._client, http_port)
        return 0

    def setup_dummy(self, mem_pool_size: int, local_buffer_size: int, server_address: str) -> int:
        """Become a *dummy* client of the ``mooncake_client`` on this host that serves
        dummy clients at ``server_address`` (its ``host:port``, reference default
        port 50052): no engine or segment here, every call is carried out by that
        real client on memory shared with it (a ``local_buffer_size`` staging
        buffer, and up to ``mem_pool_size`` bytes from ``alloc_from_mem_pool``).

        Returns 0, or -1 after logging why (as the reference).
        """
        try:
            config = DummyClientConfig(
                server_address=str(server_address),
                mem_pool_size=int(mem_pool_size),
                local_buffer_size=int(local_buffer_size),
                rpc_timeout_s=float(os.environ.get("MC_RPC_TIMEOUT_MS", "30000")) / 1000.0,
                rpc_connect_timeout_s=float(os.environ.get("MC_RPC_CONNECT_TIMEOUT_MS", "5000"))
                / 1000.0,
                prefault=os.environ.get("PYMOONCAKE_PREFAULT", "1") != "0",
                security=ClusterSecurity.from_env(),
            )
        except (MooncakeError, ValueError, TypeError) as exc:
            log.error("setup_dummy(%s) failed: %s", server_address, exc)
            return -1
        with self._lock:
            self._close_client()
            try:
                self._client = DummyClient(config)
            except (MooncakeError, OSError) as exc:
                log.error("setup_dummy(%s) failed: %s", server_address, exc)
                return -1
        return 0

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
            self._close_client()
        self._failures.flush()  # the counts of failure cascades not yet reported
        return 0

    def _close_client(self) -> None:
        """Revoke open put sessions, finish graceful unmounts, stop the client HTTP
        server, close the client (its segments go), then unmap mounted files (lock held)."""
        sessions, self._put_sessions = self._put_sessions, None
        if sessions is not None:
            sessions.close()
        if self._http is not None:
            self._http.close()
            self._http = None
        mappings = self._release_segments()
        client, self._client = self._client, None
        self._sessions.clear()
        if client is not None:
            client.close()
        close_mappings(mappings)

    def health_check(self) -> int:
        client = self._client
        if client is None or client.closed:
            return 1
        return 0 if client.health() else 2

    def get_hostname(self) -> str:
        client = self._client
        return client.hostname if client is not None else ""

    def _get_pyclient_capsule(self) -> object | None:
        """The reference's handle of the native client: here the client, or
        None before ``setup`` (``structured_object_store`` makes a BufferPool
        only for a set-up store)."""
        return self._client

    # --- helpers ---------------------------------------------------------------------

    def _c(self) -> StoreApi:
        client = self._client
        if client is None:
            raise InvalidParams("the store is not set up; call setup() first")
        return client

    def _int(self, what: str, fn: Callable[[StoreApi], Any]) -> int:
        try:
            fn(self._c())
            return 0
        except (MooncakeError, ValueError, TypeError) as exc:
            self._failures.failed(what, exc)
            return store_code(exc)

    def _value(
        self, what: str, fn: Callable[[StoreApi], T], failure: T, quiet: tuple[int, ...] = ()
    ) -> T:
        try:
            return fn(self._c())
        except (MooncakeError, ValueError, TypeError) as exc:
            if not (isinstance(exc, StoreError) and exc.code in quiet):
                self._failures.failed(what, exc)
            return failure

    @staticmethod
    def _cfg(config: ReplicateConfig | None) -> _NativeConfig:
        return config.to_native() if config is not None else DEFAULT_REPLICATE_CONFIG

    # --- memory registration ----------------------------------------------------------

    def register_buffer(self, buffer_ptr: int, size: int) -> int:
        """Register memory for zero-copy calls.  A dummy client shares the buffer
        with its real client instead: it must come from ``alloc_from_mem_pool``
        or ``MooncakeHostMemAllocator`` (else -1, as the reference)."""
        return self._memory_call(
            f"register_buffer({buffer_ptr:#x}, {size})",
            lambda c: c.register_memory(buffer_ptr, size),
        )

    def unregister_buffer(self, buffer_ptr: int) -> int:
        return self._memory_call(
            f"unregister_buffer({buffer_ptr:#x})", lambda c: c.unregister_memory(buffer_ptr)
        )

    def _memory_call(self, what: str, fn: Callable[[StoreApi], None]) -> int:
        client = self._client
        if isinstance(client, DummyClient):
            try:
                fn(client)
                return 0
            except InvalidParams as exc:  # the reference's dummy answers -1 here
                log.error("%s failed: %s", what, exc)
                return -1
            except MooncakeError as exc:
                log.error("%s failed: %s", what, exc)
                return store_code(exc)
        return self._int(what, fn)

    def alloc_from_mem_pool(self, size: int) -> int:
        """A shared buffer of ``size`` bytes for a dummy client (0 on failure, and
        always 0 for a full client, as the reference's RealClient)."""
        client = self._client
        if not isinstance(client, DummyClient):
            return 0
        try:
            return client.alloc_from_mem_pool(int(size))
        except (MooncakeError, OSError, ValueError, TypeError) as exc:
            log.error("alloc_from_mem_pool(%s) failed: %s", size, exc)
            return 0

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
        with gc_paused(len(keys)):  # (pymooncake/_gcpause.py)
            return self._int(
                "put_batch",
                lambda c: _raise_first(
                    c.put_many(keys, [[v] for v in values], self._cfg(config), bytes_api=True)
                ),
            )

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
        parts = [(buffer_ptr, size), (metadata_buffer_ptr, metadata_size)]
        return self._int(
            f"put_from_with_metadata({key!r})",
            lambda c: _raise_first(c.put_many([key], [parts], self._cfg(config))),
        )

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
            lambda c: c.put_many(keys, _one_part_each(buffer_ptrs, sizes), self._cfg(config)),
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
        return self._batch(
            "batch_put_from_multi_buffers",
            keys,
            lambda c: c.put_many(
                keys, _pointer_parts(all_buffer_ptrs, all_sizes), self._cfg(config)
            ),
        )

    def _batch(
        self, what: str, keys: Sequence[str], fn: Callable[[StoreApi], Sequence[Any]]
    ) -> list[int]:
        try:
            with gc_paused(len(keys)):  # (pymooncake/_gcpause.py)
                return store_codes(fn(self._c()), what)
        except (MooncakeError, ValueError, TypeError) as exc:
            self._failures.failed(what, exc)
            return [store_code(exc)] * len(keys)

    def upsert(self, key: str, value: Any, config: ReplicateConfig | None = None) -> int:
        return self._int(f"upsert({key!r})", lambda c: c.upsert(key, value, self._cfg(config)))

    def upsert_parts(self, key: str, *parts: Any, config: ReplicateConfig | None = None) -> int:
        return self._int(
            f"upsert_parts({key!r})",
            lambda c: _raise_first(c.upsert_many([key], [list(parts)], self._cfg(config))),
        )

    def upsert_batch(
        self, keys: list[str], values: list[Any], config: ReplicateConfig | None = None
    ) -> int:
        return self._int(
            "upsert_batch",
            lambda c: _raise_first(c.upsert_many(keys, [[v] for v in values], self._cfg(config))),
        )

    def upsert_from(
        self, key: str, buffer_ptr: int, size: int, config: ReplicateConfig | None = None
    ) -> int:
        return self._int(
            f"upsert_from({key!r})",
            lambda c: _raise_first(c.upsert_many([key], [[(buffer_ptr, size)]], self._cfg(config))),
        )

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
            lambda c: c.upsert_many(keys, _one_part_each(buffer_ptrs, sizes), self._cfg(config)),
        )

    # --- reads ---------------------------------------------------------------------------

    _MISS = (int(ErrorCode.OBJECT_NOT_FOUND),)

    def get(self, key: str) -> bytes:
        return self._value(f"get({key!r})", lambda c: c.get(key), b"", self._MISS)

    def get_batch(self, keys: list[str]) -> list[bytes]:
        def run(c: StoreApi) -> list[bytes]:
            return [r if isinstance(r, bytes) else b"" for r in c.get_many(keys)]

        with gc_paused(len(keys)):  # (pymooncake/_gcpause.py)
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
            return store_code(exc)

    def batch_get_into(
        self, keys: list[str], buffer_ptrs: list[int], sizes: list[int]
    ) -> list[int]:
        if not len(keys) == len(buffer_ptrs) == len(sizes):
            log.error("batch_get_into: keys, buffer_ptrs and sizes differ in length")
            return [int(ErrorCode.INVALID_PARAMS)] * len(keys)
        return self._batch(
            "batch_get_into",
            keys,
            lambda c: c.get_many_into(keys, _one_part_each(buffer_ptrs, sizes)),
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
        return self._batch(
            "batch_get_into_multi_buffers",
            keys,
            lambda c: c.get_many_into(keys, _pointer_parts(all_buffer_ptrs, all_sizes)),
        )

    # --- queries and removal ----------------------------------------------------------------

    def is_exist(self, key: str) -> int:
        try:
            return 1 if self._c().exists(key) else 0
        except (MooncakeError, ValueError) as exc:
            log.error("is_exist(%r) failed: %s", key, str(exc))
            return store_code(exc)

    def batch_is_exist(self, keys: list[str]) -> list[int]:
        if not keys:
            return []
        try:
            return [1 if x else 0 for x in self._c().exists_many(keys)]
        except (MooncakeError, ValueError) as exc:
            log.error("batch_is_exist failed: %s", str(exc))
            return [store_code(exc)] * len(keys)

    def get_size(self, key: str) -> int:
        try:
            return self._c().size_of(key)
        except (MooncakeError, ValueError) as exc:
            if not (isinstance(exc, StoreError) and exc.code in self._MISS):
                log.error("get_size(%r) failed: %s", key, str(exc))
            return store_code(exc)

    def remove(self, key: str, force: bool = False) -> int:
        try:
            self._c().remove(key, force)
            return 0
        except (MooncakeError, ValueError) as exc:
            log.debug("remove(%r): %s", key, str(exc))
            return store_code(exc)

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
            return store_code(exc)

    def remove_all(self, force: bool = False) -> int:
        try:
            return self._c().remove_all(force)
        except (MooncakeError, ValueError) as exc:
            log.error("remove_all failed: %s", str(exc))
            return store_code(exc)

    def get_replica_desc(self, key: str) -> list[ReplicaDescriptor]:
        return self._value(
            f"get_replica_desc({key!r})",
            lambda c: [ReplicaDescriptor(r) for r in c.replicas(key)],
            [],
            self._MISS,
        )

    def batch_get_replica_desc(self, keys: list[str]) -> dict[str, list[ReplicaDescriptor]]:
        def run(c: StoreApi) -> dict[str, list[ReplicaDescriptor]]:
            out = {}
            for key, res in zip(keys, c.replicas_many(keys), strict=True):
                if not isinstance(res, BaseException):
                    out[key] = [ReplicaDescriptor(r) for r in res]
            return out

        return self._value("batch_get_replica_desc", run, {})

    def batch_replica_clear(self, keys: list[str], segment_name: str = "") -> list[str]:
        """Clear the replicas of this client's ``keys`` whose read lease has
        expired (all of them, or those on segment ``segment_name``); returns the
        cleared keys (the master's ``BatchReplicaClear``); on failure it logs why
        and returns ``[]``."""
        client = self._client
        if client is None:
            log.error("batch_replica_clear: the store is not set up; call setup() first")
            return []
        try:
            return client.replica_clear_many(keys, segment_name)
        except MooncakeError as exc:
            log.error("batch_replica_clear failed: %s", exc)
            return []

    # --- copy/move tasks -------------------------------------------------------------

    def create_copy_task(self, key: str, targets: list[str]) -> tuple[tuple[int, int], int]:
        """Copy ``key`` to the segments ``targets``: ``(task_id, 0)`` or
        ``((0, 0), code)`` (-704 no such key, -600 unknown segment, ...)."""
        try:
            return self._c().create_copy_task(key, list(targets)), 0
        except (MooncakeError, ValueError, TypeError) as exc:
            log.error("Copy failed for key: %s, error: %s", key, exc)
            return (0, 0), store_code(exc)

    def create_move_task(self, key: str, source: str, target: str) -> tuple[tuple[int, int], int]:
        """Move ``key``'s replica in segment ``source`` to ``target``: ``(task_id, 0)``
        or ``((0, 0), code)`` (-704 no such key, -600 unknown segment or source ==
        target, ...)."""
        try:
            return self._c().create_move_task(key, source, target), 0
        except (MooncakeError, ValueError, TypeError) as exc:
            log.error("Move failed for key: %s, error: %s", key, exc)
            return (0, 0), store_code(exc)

    def query_task(self, task_id: Sequence[int]) -> tuple[QueryTaskResponse | None, int]:
        """``(QueryTaskResponse, 0)`` or ``(None, code)`` (-1400: unknown task)."""
        try:
            hi, lo = task_id
            info = self._c().query_task((int(hi), int(lo)))
        except (MooncakeError, ValueError, TypeError) as exc:
            log.error("QueryTask failed for task_id: %s, error: %s", task_id, exc)
            return None, store_code(exc)
        return QueryTaskResponse(info), 0

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
