"""A dummy store client: no engine, no segment, no master connection of its own.

Theory of operation
-------------------
SGLang's and vLLM's standalone mode run one ``mooncake_client`` per node (the
*real* client: memory, transfer engine, master) and a thin *dummy* client in
every serving rank (reference ``dummy_client.cpp``).  A :class:`DummyClient`:

1. says ``hello`` to the real client's RPC port (``server_address``), which
   checks the protocol version (and the cluster token, when one is set);
2. allocates its local buffer as a sealed memfd and hands the fd to the real
   client over the abstract UNIX socket ``@mooncake_client_<port>.sock``; the
   real client maps the same pages and registers them with its engine;
3. forwards every store call (``_dummy_io.py``): object bytes are never sent
   over the socket -- the real client's engine reads and writes the shared
   pages directly, so a put or get moves its bytes once through the pool;
4. pings every second.  When the real client is lost (restart, crash) the
   dummy reconnects with a backoff capped at 2 s (the reference retries every
   2 s), says hello again and registers all its shared memory again; calls
   that were out when the connection broke fail with a message saying so, and
   later calls work as soon as the real client is back (a call that reaches a
   real client which does not know this dummy re-registers first).  Without
   pings the real client unmaps a dummy's memory after 10 s.

Memory from ``alloc_from_mem_pool`` (at most ``mem_pool_size`` bytes in total)
and from ``MooncakeHostMemAllocator`` can be registered with
:meth:`register_memory`; the real client then reads and writes it in place,
which is the zero-copy path (``put_from``/``get_into`` and friends).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._authio import ClusterSecurity
from ..errors import InvalidParams, MooncakeError, RpcFailed, StoreError, store_error
from ..wire._dummy import (
    DUMMY_PROTOCOL_VERSION,
    DummyMethod,
    ShmRegister,
    ShmResultDecoder,
    dummy_ipc_name,
    encode_shm_register,
)
from ._buffers import BufferHandle, LocalBuffer
from ._client_io import ObjectLocation
from ._dummy_io import DummyIO
from ._dummy_local import DummyMemory, span_of
from ._dummy_rpc import DummyRpc
from ._shm import ShmRegion, shm_registry
from ._tasks import TaskInfo
from ._types import DEFAULT_REPLICATE_CONFIG, ErrorCode, ReplicaDesc, ReplicateConfig

__all__ = ["DummyClient", "DummyClientConfig"]

log = logging.getLogger("pymooncake.store.dummy")


@dataclass(frozen=True)
class DummyClientConfig:
    """Settings of a dummy client (``setup_dummy``'s arguments and timeouts).

    Attributes:
        server_address: the real client's ``host:port`` (``mooncake_client --port``).
        mem_pool_size: bytes ``alloc_from_mem_pool`` may hand out in total.
        local_buffer_size: shared staging memory of the bytes API and of
            ``get_buffer`` handles (0: only registered buffers can be used).
        ping_interval_s: heartbeat period (reference: 1 s).
        reconnect_max_s: the bound of the reconnect backoff (reference: 2 s).
        prefault: fault in ``alloc_from_mem_pool`` buffers when allocated
            (MAP_POPULATE, as the reference); the local buffer stays lazy.
    """

    server_address: str
    mem_pool_size: int = 0
    local_buffer_size: int = 16 << 20
    rpc_timeout_s: float = 30.0
    rpc_connect_timeout_s: float = 5.0
    ping_interval_s: float = 1.0
    reconnect_max_s: float = 2.0
    prefault: bool = True
    security: ClusterSecurity = field(default_factory=ClusterSecurity)

    def __post_init__(self) -> None:
        if self.mem_pool_size < 0 or self.local_buffer_size < 0:
            raise InvalidParams("mem_pool_size and local_buffer_size must not be negative")


_live: weakref.WeakSet[DummyClient] = weakref.WeakSet()


def _close_live() -> None:
    """At exit, tell the real clients (they unmap at once instead of after 10 s)."""
    for client in list(_live):
        try:
            client.close()
        except Exception:
            pass


atexit.register(_close_live)


class DummyClient:
    """A store client that forwards to a real client on this host (thread-safe).

    Raises:
        RpcFailed: the real client cannot be reached (the message names the fix).
        StoreError(INVALID_VERSION): it runs another pymooncake version.
        InvalidParams: a bad address or size.
        OSError: shared memory cannot be allocated.
    """

    def __init__(self, config: DummyClientConfig) -> None:
        self.config = config
        self.client_id = uuid.uuid4().hex
        self._rpc = DummyRpc(
            config.server_address,
            timeout_s=config.rpc_timeout_s,
            connect_timeout_s=config.rpc_connect_timeout_s,
            security=config.security,
        )
        self.ipc_name = dummy_ipc_name(self._rpc.port)
        self._shm = shm_registry()
        self._closed = False
        self._stop = threading.Event()
        self._connected = False
        self._healthy = False
        self._lost_at = 0.0
        self._register_lock = threading.Lock()
        self._local_bases: set[int] = set()
        local_region: ShmRegion | None = None
        try:
            self._hello()
            local = LocalBuffer(memoryview(bytearray(0)), 0)
            if config.local_buffer_size > 0:
                local_region = self._shm.allocate(config.local_buffer_size)
                local = LocalBuffer(local_region.view, local_region.addr)
            self.mem = DummyMemory(
                self._shm, local, local_region, config.mem_pool_size, wait_s=config.rpc_timeout_s
            )
            if local_region is not None:
                self._register(local_region, local=True)
        except BaseException:
            if local_region is not None:
                self._shm.free(local_region.addr)
            with contextlib.suppress(MooncakeError):  # the real client forgets us at once
                self._rpc.call(
                    DummyMethod.UNREGISTER,
                    {"client_id": self.client_id, "base": None},
                    what="close",
                )
            self._rpc.close()
            raise
        self.io = DummyIO(self.mem, self._call, self.client_id)
        self._connected = self._healthy = True
        self._ping_thread = threading.Thread(
            target=self._ping_loop, name="mc-dummy-ping", daemon=True
        )
        self._ping_thread.start()
        _live.add(self)
        log.info(
            "dummy client %s set up with the real client at %s (local buffer %d bytes, "
            "memory pool %d bytes)",
            self.client_id,
            config.server_address,
            config.local_buffer_size,
            config.mem_pool_size,
        )

    # ------------------------------------------------------------------------------
    # the link to the real client
    # ------------------------------------------------------------------------------

    def _hello(self) -> set[int]:
        reply = self._rpc.call(
            DummyMethod.HELLO,
            {"client_id": self.client_id, "version": DUMMY_PROTOCOL_VERSION, "pid": os.getpid()},
            what="hello",
        )
        return {int(b) for b in reply.get("regions", ())}

    def _register(self, region: ShmRegion, *, local: bool = False) -> None:
        """Hand ``region``'s memfd to the real client (it maps and registers it).

        Raises:
            RpcFailed: the UNIX socket cannot be reached.
            StoreError: the real client refused (its message says why).
        """
        message = encode_shm_register(ShmRegister(self.client_id, region.addr, region.size, local))
        decoder = ShmResultDecoder()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.config.rpc_timeout_s)
            try:
                sock.connect(self.ipc_name)
            except OSError as exc:
                raise RpcFailed(
                    f"cannot reach the memory socket @{self.ipc_name[1:]} of the real client at "
                    f"{self.config.server_address} ({exc.strerror or exc}): a dummy client shares "
                    "memory with a mooncake_client on the same host (and network namespace); "
                    "check that it runs here with that --port"
                ) from exc
            try:
                socket.send_fds(sock, [message], [region.fd])
                while decoder.result is None:
                    data = sock.recv(decoder.want)
                    if not data:
                        raise ConnectionResetError("closed before answering")
                    decoder.feed(data)
            except OSError as exc:
                raise RpcFailed(
                    f"registering {region.size} bytes of shared memory with the real client at "
                    f"{self.config.server_address} failed: {exc}"
                ) from exc
        result = decoder.result
        if result.status != 0:
            raise store_error(
                result.status,
                f"the real client at {self.config.server_address} refused to map "
                f"{region.size} bytes of shared memory: {result.message}",
            )
        self.mem.mark_registered(region)
        if local:
            self._local_bases.add(region.addr)

    def _reregister(self) -> int:
        """Hello again and register every shared region the real client lacks;
        returns how many were sent."""
        with self._register_lock:
            known = self._hello()
            sent = 0
            for region in self.mem.registered():
                if region.addr in known:
                    continue
                if self._shm.find(region.addr) is not region:  # freed meanwhile
                    self.mem.mark_unregistered(region.addr)
                    continue
                self._register(region, local=region.addr in self._local_bases)
                sent += 1
            return sent

    def _call(self, method: DummyMethod, params: dict[str, Any], what: str) -> Any:
        if self._closed:
            raise InvalidParams(f"{what}: the dummy client is closed")
        try:
            return self._rpc.call(method, params, what=what)
        except StoreError as exc:
            if exc.code != ErrorCode.CLIENT_NOT_FOUND:
                raise
        # the real client does not know us (it restarted): register, then once more
        log.warning(
            "the real client at %s does not know dummy client %s (it restarted); registering again",
            self.config.server_address,
            self.client_id,
        )
        self._reregister()
        return self._rpc.call(method, params, what=what)

    def _ping_loop(self) -> None:
        pause = 0.05
        while not self._stop.wait(self.config.ping_interval_s if self._connected else pause):
            try:
                if not self._connected:
                    sent = self._reregister()
                    self._connected = True
                    log.warning(
                        "the real client at %s is back after %.1f s: dummy client %s registered "
                        "%d shared region(s) again",
                        self.config.server_address,
                        time.monotonic() - self._lost_at,
                        self.client_id,
                        sent,
                    )
                    pause = 0.05
                res = self._rpc.call(DummyMethod.PING, {"client_id": self.client_id}, what="ping")
                registered = {r.addr for r in self.mem.registered()}
                if not res.get("known") or not registered <= set(res.get("regions", ())):
                    self._reregister()
                self._healthy = bool(res.get("healthy"))
            except MooncakeError as exc:
                self._healthy = False
                if self._connected:
                    self._connected = False
                    self._lost_at = time.monotonic()
                    self._rpc.drop_idle()
                    log.warning(
                        "dummy client %s lost the real client at %s (%s); reconnecting, retrying "
                        "at most every %g s",
                        self.client_id,
                        self.config.server_address,
                        exc,
                        self.config.reconnect_max_s,
                    )
                    pause = 0.05
                else:
                    pause = min(pause * 2, self.config.reconnect_max_s)

    # ------------------------------------------------------------------------------
    # state, memory
    # ------------------------------------------------------------------------------

    @property
    def hostname(self) -> str:
        """A dummy has no segment of its own (the reference returns "")."""
        return ""

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def local(self) -> LocalBuffer:
        """The shared local buffer (BufferPool leases come from it)."""
        return self.mem.local

    def health(self) -> bool:
        """The real client answers pings and reaches its master."""
        return not self._closed and self._connected and self._healthy

    def alloc_from_mem_pool(self, size: int) -> int:
        """A new shared buffer of ``size`` bytes; :meth:`register_memory` it to use it
        in place.

        Raises:
            InvalidParams: ``size`` is not positive.
            NoAvailableHandle: ``mem_pool_size`` is used up.
        """
        return self.mem.alloc_pool(size, self.config.prefault).addr

    def register_memory(self, addr: int, size: int) -> None:
        """Share the memfd region holding ``[addr, addr + size)`` with the real client.

        Raises:
            InvalidParams: not shared memory of this process.
            RpcFailed / StoreError: the real client could not map it.
        """
        region = self._shm.find(addr, size)
        if region is None:
            raise InvalidParams(
                f"[{addr:#x}, +{size}) is not shared memory: a dummy client registers only "
                "buffers from alloc_from_mem_pool() or MooncakeHostMemAllocator.alloc()"
            )
        if self.mem.registered_region(region.addr) is region:
            return
        with self._register_lock:
            self._register(region)

    def unregister_memory(self, addr: int) -> None:
        """Withdraw the region registered at ``addr`` (the real client unmaps it).

        Raises:
            InvalidParams: nothing is registered at ``addr``.
        """
        region = self.mem.registered_region(addr)
        if region is None or region.addr != addr or addr in self._local_bases:
            raise InvalidParams(f"no buffer registered with register_buffer() starts at {addr:#x}")
        self._call(
            DummyMethod.UNREGISTER,
            {"client_id": self.client_id, "base": addr},
            f"unregister_buffer({addr:#x})",
        )
        self.mem.mark_unregistered(addr)

    def local_view(self, addr: int, length: int, *, writable: bool) -> memoryview:
        return self.mem.local_view(addr, length)

    def registered_end(self, addr: int) -> int:
        """End of the registered memory holding ``addr`` (0 if none)."""
        region = self.mem.registered_region(addr)
        return region.end if region is not None else 0

    # ------------------------------------------------------------------------------
    # queries and removal
    # ------------------------------------------------------------------------------

    def _simple(self, method: DummyMethod, params: dict[str, Any], what: str) -> Any:
        return self._call(method, params, what)

    def exists(self, key: str) -> bool:
        return bool(self._simple(DummyMethod.EXISTS, {"keys": [key]}, f"is_exist({key!r})")[0])

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []
        reply = self._simple(
            DummyMethod.EXISTS, {"keys": list(keys), "batch": True}, "batch_is_exist"
        )
        return [bool(x) for x in reply]

    def size_of(self, key: str) -> int:
        (loc,) = self.io.locate([key])
        if isinstance(loc, StoreError):
            raise loc
        return loc.size

    def replicas(self, key: str) -> list[ReplicaDesc]:
        ((_code, value),) = self._simple(
            DummyMethod.REPLICAS, {"keys": [key]}, f"get_replica_desc({key!r})"
        )
        return [ReplicaDesc.from_wire(r) for r in value]

    def replicas_many(self, keys: Sequence[str]) -> list[list[ReplicaDesc] | StoreError]:
        reply = self._simple(
            DummyMethod.REPLICAS, {"keys": list(keys), "batch": True}, "batch_get_replica_desc"
        )
        return [
            [ReplicaDesc.from_wire(r) for r in v] if c == 0 else store_error(c, f"{k!r}: {v}")
            for k, (c, v) in zip(keys, reply, strict=True)
        ]

    def remove(self, key: str, force: bool = False) -> None:
        self._simple(DummyMethod.REMOVE, {"keys": [key], "force": force}, f"remove({key!r})")

    def remove_many(self, keys: Sequence[str], force: bool = False) -> list[StoreError | None]:
        if not keys:
            return []
        reply = self._simple(
            DummyMethod.REMOVE, {"keys": list(keys), "force": force, "batch": True}, "batch_remove"
        )
        return [
            None if c == 0 else store_error(c, f"{k!r}: {v}")
            for k, (c, v) in zip(keys, reply, strict=True)
        ]

    def replica_clear_many(self, keys: Sequence[str], segment_name: str = "") -> list[str]:
        if not keys:
            return []
        reply = self._simple(
            DummyMethod.REPLICA_CLEAR,
            {"keys": list(keys), "segment": segment_name},
            "batch_replica_clear",
        )
        return [str(k) for k in reply]

    def remove_by_regex(self, pattern: str, force: bool = False) -> int:
        return int(
            self._simple(
                DummyMethod.REMOVE_BY_REGEX,
                {"pattern": pattern, "force": force},
                f"remove_by_regex({pattern!r})",
            )
        )

    def remove_all(self, force: bool = False) -> int:
        return int(self._simple(DummyMethod.REMOVE_ALL, {"force": force}, "remove_all"))

    # --- copy/move tasks (run by the real client's master session) -------------------

    def create_copy_task(self, key: str, targets: Sequence[str]) -> tuple[int, int]:
        hi, lo = self._simple(
            DummyMethod.TASK,
            {"op": "copy", "key": key, "targets": list(targets)},
            f"create_copy_task({key!r})",
        )
        return int(hi), int(lo)

    def create_move_task(self, key: str, source: str, target: str) -> tuple[int, int]:
        hi, lo = self._simple(
            DummyMethod.TASK,
            {"op": "move", "key": key, "source": source, "target": target},
            f"create_move_task({key!r})",
        )
        return int(hi), int(lo)

    def query_task(self, task_id: tuple[int, int]) -> TaskInfo:
        reply = self._simple(
            DummyMethod.TASK, {"op": "query", "task_id": list(task_id)}, "query_task"
        )
        return TaskInfo.from_wire(reply)

    # ------------------------------------------------------------------------------
    # writes
    # ------------------------------------------------------------------------------

    @staticmethod
    def _one(result: bool | StoreError) -> bool:
        if isinstance(result, StoreError):
            raise result
        return result

    def put(self, key: str, value: Any, config: ReplicateConfig | None = None) -> bool:
        """Store ``value`` (staged through the local buffer unless it lies in
        registered shared memory); False if the key existed."""
        return self._one(
            self.io.write([key], [[value]], config or DEFAULT_REPLICATE_CONFIG, False, "put")[0]
        )

    def put_parts(
        self, key: str, parts: Sequence[Any], config: ReplicateConfig | None = None
    ) -> bool:
        return self._one(
            self.io.write(
                [key], [list(parts)], config or DEFAULT_REPLICATE_CONFIG, False, "put_parts"
            )[0]
        )

    def put_from(
        self, key: str, buffer: Any, size: int | None = None, config: ReplicateConfig | None = None
    ) -> bool:
        span = span_of(buffer, size, writable=False)
        return self._one(
            self.io.write([key], [[span]], config or DEFAULT_REPLICATE_CONFIG, False, "put_from")[0]
        )

    def put_many(
        self,
        keys: Sequence[str],
        values: Sequence[Sequence[Any]],
        config: ReplicateConfig | None = None,
        *,
        bytes_api: bool = False,
    ) -> list[bool | StoreError]:
        if len(keys) != len(values):
            raise InvalidParams(f"{len(keys)} keys but {len(values)} values")
        op = "put_batch" if bytes_api else "batch_put_from"
        return self.io.write(keys, values, config or DEFAULT_REPLICATE_CONFIG, False, op)

    def upsert(self, key: str, value: Any, config: ReplicateConfig | None = None) -> None:
        self._one(
            self.io.write([key], [[value]], config or DEFAULT_REPLICATE_CONFIG, True, "upsert")[0]
        )

    def upsert_many(
        self,
        keys: Sequence[str],
        values: Sequence[Sequence[Any]],
        config: ReplicateConfig | None = None,
    ) -> list[bool | StoreError]:
        if len(keys) != len(values):
            raise InvalidParams(f"{len(keys)} keys but {len(values)} values")
        return self.io.write(keys, values, config or DEFAULT_REPLICATE_CONFIG, True, "upsert_batch")

    # ------------------------------------------------------------------------------
    # reads
    # ------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        (res,) = self.io.get_bytes([key], "get")
        if isinstance(res, StoreError):
            raise res
        return res

    def get_many(self, keys: Sequence[str]) -> list[bytes | StoreError]:
        return self.io.get_bytes(keys, "get_batch")

    def get_into(self, key: str, buffer: Any, size: int | None = None) -> int:
        span = span_of(buffer, size, writable=True)
        (res,) = self.io.read_into([key], [[span]], "get_into")
        if isinstance(res, StoreError):
            raise res
        return res

    def get_many_into(
        self, keys: Sequence[str], dests: Sequence[Sequence[Any]]
    ) -> list[int | StoreError]:
        if len(keys) != len(dests):
            raise InvalidParams(f"{len(keys)} keys but {len(dests)} destinations")
        return self.io.read_into(keys, dests, "batch_get_into")

    def get_many_alloc(
        self, keys: Sequence[str], alloc: Callable[[int, int], Any]
    ) -> list[Any | StoreError]:
        return self.io.get_alloc(keys, alloc, "get_tensor")

    def get_buffer(self, key: str) -> BufferHandle:
        return self.io.get_buffer(key)

    def locate(self, keys: Sequence[str]) -> list[ObjectLocation | StoreError]:
        return self.io.locate(keys)

    def read_ranges(
        self,
        locations: Sequence[ObjectLocation],
        ranges: Sequence[Sequence[tuple[memoryview, int]]],
    ) -> list[list[int | StoreError]]:
        return self.io.read_ranges(locations, ranges)

    # ------------------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop pinging, tell the real client (it unmaps this dummy's memory) and
        free the local buffer and the buffers from ``alloc_from_mem_pool``.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._ping_thread.join(10)
        try:
            self._rpc.call(
                DummyMethod.UNREGISTER, {"client_id": self.client_id, "base": None}, what="close"
            )
        except MooncakeError as exc:
            log.debug("dummy client %s: telling the real client it closes: %s", self.client_id, exc)
        self.mem.release_all()
        self._rpc.close()

    def __enter__(self) -> DummyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
