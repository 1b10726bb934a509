"""The store client: master RPCs for placement, the transfer engine for bytes.

Theory of operation
-------------------
A client owns (or borrows) a :class:`TransferEngine`.  With
``global_segment_size > 0`` it allocates that much registered memory and
mounts it at the master as a *segment*: other clients' objects are then
written into it by their owners' engines.  A heartbeat thread pings the
master every second and re-mounts after a master restart (NEED_REMOUNT).

Data never passes through the master.  ``put``: PutStart returns one buffer
address per replica, the engine writes the caller's bytes straight into each
replica's segment (a memcpy when the segment is our own), then PutEnd (or
PutRevoke on failure).  ``get``: GetReplicaList returns the replicas and a
read lease; the engine reads straight into the destination (for ``get``,
into the ``bytes`` object that is returned) and the read fails with
LEASE_EXPIRED if the lease ran out meanwhile, because the space may have
been reused.  Batches group their transfers per peer so each peer sees one
pipelined stream.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import dataclasses
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .._logging import RepeatLimiter
from .._net import split_host_port
from ..config import EngineConfig
from ..errors import (
    DnsError,
    InvalidParams,
    LeaseExpired,
    MooncakeError,
    PeerRejected,
    PeerSocketError,
    SegmentNotFound,
    StoreError,
    StoreTransferFailed,
    TransferFailed,
    store_error,
)
from ..transfer import TransferEngine, TransferOpcode, TransferRequest
from ..transfer._memory import buffer_address
from ..transfer.metadata import parse_metadata_target
from ..wire import MasterMethod
from ._buffers import BufferHandle, LocalBuffer, make_handle, new_bytes
from ._master_client import MasterClient
from ._types import ClientStatus, ErrorCode, ReplicaDesc, ReplicateConfig, SegmentInfo

__all__ = ["ObjectLocation", "StoreClient", "StoreClientConfig"]

log = logging.getLogger("pymooncake.store")
#: local copies from this size on use ctypes.memmove, which releases the GIL
_MEMMOVE_FROM = 256 * 1024
M = MasterMethod
Parts = list[memoryview]


@dataclass(frozen=True)
class StoreClientConfig:
    """Settings of a store client (names as the reference's ``setup`` arguments)."""

    local_hostname: str
    metadata_server: str = "P2PHANDSHAKE"
    master_server_addr: str = "127.0.0.1:50051"
    #: memory this client contributes to the pool (0 = pure client)
    global_segment_size: int = 0
    #: bounds values of the bytes API (put/get) and holds get_buffer handles
    local_buffer_size: int = 16 << 20
    protocol: str = "tcp"
    #: MC_RPC_TIMEOUT_MS / MC_RPC_CONNECT_TIMEOUT_MS
    rpc_timeout_s: float = 30.0
    rpc_connect_timeout_s: float = 5.0
    ping_interval_s: float = 1.0
    engine: EngineConfig | None = None

    def __post_init__(self) -> None:
        if self.global_segment_size < 0 or self.local_buffer_size < 0:
            raise InvalidParams("segment and buffer sizes must not be negative")


@dataclass(frozen=True)
class ObjectLocation:
    """Where an object's readable replicas are, and until when its read lease holds."""

    key: str
    size: int
    replicas: tuple[ReplicaDesc, ...]
    lease_deadline: float  # time.monotonic() seconds


def _as_view(obj: Any) -> memoryview:
    view = memoryview(obj)
    if not view.c_contiguous:
        raise InvalidParams("buffers must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


_live_clients: weakref.WeakSet[StoreClient] = weakref.WeakSet()


def _close_live_clients() -> None:
    """At interpreter exit, unmount what is still mounted (as the reference's
    destructors do), so the master does not place objects in dead memory."""
    for client in list(_live_clients):
        try:
            client.close()
        except Exception:
            pass


atexit.register(_close_live_clients)


class StoreClient:
    """A Mooncake Store client (native API: exceptions, buffers, thread-safe).

    Args:
        config: see :class:`StoreClientConfig`.
        engine: an engine to reuse (its segment then also holds the store
            segment); by default the client starts its own.

    Raises:
        RpcFailed: the master is unreachable.
        MooncakeError subclasses: the engine cannot start (see TransferEngine).
    """

    def __init__(self, config: StoreClientConfig, *, engine: TransferEngine | None = None) -> None:
        self.config = config
        self.client_id = uuid.uuid4().hex
        self._closed = False
        self._owns_engine = engine is None
        self._stop = threading.Event()
        self._master_instance = ""
        self._segments: list[SegmentInfo] = []
        self._segment_regions: list[int] = []
        self._ping_thread: threading.Thread | None = None
        self._ping_log = RepeatLimiter(log, every=60)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        host, port = split_host_port(config.local_hostname)
        self.host_id = host
        self.master = MasterClient(
            config.master_server_addr,
            timeout_s=config.rpc_timeout_s,
            connect_timeout_s=config.rpc_connect_timeout_s,
        )
        try:
            self.master.check_version()
            if engine is None:
                p2p = parse_metadata_target(config.metadata_server).is_p2p
                engine = TransferEngine(
                    config.local_hostname,
                    config.metadata_server,
                    config=config.engine or EngineConfig.from_env(),
                    append_rpc_port=not p2p and port is None,
                )
            self.engine = engine
            self.master.call(M.REMOUNT_SEGMENTS, {"client_id": self.client_id, "segments": []})
            self._master_instance = self.master.call(M.PING, {"client_id": self.client_id}).get(
                "instance", ""
            )
            if config.global_segment_size > 0:
                self.mount(config.global_segment_size)
            if config.local_buffer_size > 0:
                region = engine.allocate(config.local_buffer_size)
                self._local_addr: int | None = region.addr
                self.local = LocalBuffer(region.view, region.addr)
            else:
                self._local_addr = None
                self.local = LocalBuffer(memoryview(bytearray(0)), 0)
        except BaseException:
            self._teardown(unmount=True)
            raise
        self._ping_thread = threading.Thread(
            target=self._ping_loop, name=f"mc-store-ping:{self.hostname}", daemon=True
        )
        self._ping_thread.start()
        _live_clients.add(self)

    # ------------------------------------------------------------------------------
    # identity, segments, liveness
    # ------------------------------------------------------------------------------

    @property
    def hostname(self) -> str:
        """This client's transfer-engine segment name (usable as a preferred segment)."""
        return self.engine.segment_name

    def mount(self, size: int) -> SegmentInfo:
        """Contribute ``size`` more bytes of registered memory to the pool."""
        region = self.engine.allocate(size)
        info = SegmentInfo(
            uuid.uuid4().hex, self.engine.segment_name, region.addr, size, self.host_id
        )
        try:
            self.master.call(
                M.MOUNT_SEGMENT, {"client_id": self.client_id, "segment": info.to_wire()}
            )
        except BaseException:
            self.engine.free(region.addr)
            raise
        self._segments.append(info)
        self._segment_regions.append(region.addr)
        return info

    @property
    def segments(self) -> tuple[SegmentInfo, ...]:
        return tuple(self._segments)

    def _ping_loop(self) -> None:
        while not self._stop.wait(self.config.ping_interval_s):
            try:
                res = self.master.call(M.PING, {"client_id": self.client_id})
                instance = res.get("instance", "")
                if self._master_instance and instance != self._master_instance:
                    # the master restarted: an embedded metadata server lost our
                    # descriptor, so publish it again before anyone needs it
                    log.warning(
                        "master at %s restarted; re-publishing segment %r",
                        self.master.address,
                        self.hostname,
                    )
                    self.engine.republish()
                self._master_instance = instance
                if res["status"] == ClientStatus.NEED_REMOUNT:
                    log.warning(
                        "master at %s does not know this client (it restarted or expired us); "
                        "re-mounting %d segment(s)",
                        self.master.address,
                        len(self._segments),
                    )
                    self.master.call(
                        M.REMOUNT_SEGMENTS,
                        {
                            "client_id": self.client_id,
                            "segments": [s.to_wire() for s in self._segments],
                        },
                    )
            except MooncakeError as exc:
                self._ping_log("ping", logging.WARNING, "heartbeat to the master failed: %s", exc)

    # ------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise store_error(int(ErrorCode.INVALID_PARAMS), "the store client is closed")

    def _bytes_api_limit(self, size: int, what: str) -> None:
        if size > self.config.local_buffer_size:
            raise InvalidParams(
                f"{what}: {size} bytes exceed local_buffer_size ({self.config.local_buffer_size}); "
                "bytes-API values are bounded by the local buffer as in the reference: raise "
                "local_buffer_size or use put_from/get_into with registered memory"
            )

    def _parallel(self, jobs: list[Callable[[], None]]) -> None:
        """Run jobs (one per peer) concurrently: the first inline, others on a pool."""
        if len(jobs) <= 1:
            for job in jobs:
                job()
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="mc-store-io")
        futures = [self._pool.submit(job) for job in jobs[1:]]
        jobs[0]()
        for f in futures:
            f.result()

    def _run_transfers(
        self,
        per_endpoint: dict[str, list[tuple[int, TransferRequest]]],
        errors: list[BaseException | None],
        unreachable: set[str] | None = None,
    ) -> None:
        """Run grouped transfers; the first failure of each item lands in ``errors``;
        endpoints that could not be reached at all are added to ``unreachable``."""

        own = self.engine.segment_name
        local_items = per_endpoint.pop(own, None)
        if local_items:
            self._copy_local(local_items, errors)

        def job(endpoint: str, items: list[tuple[int, TransferRequest]]) -> Callable[[], None]:
            def run() -> None:
                try:
                    self.engine.transfer(endpoint, [req for _, req in items])
                except TransferFailed as exc:
                    for (idx, _), err in zip(items, exc.errors, strict=True):
                        if err is not None and errors[idx] is None:
                            errors[idx] = err
                        if unreachable is not None and isinstance(err, (PeerSocketError, DnsError)):
                            unreachable.add(endpoint)
                except MooncakeError as exc:
                    for idx, _ in items:
                        if errors[idx] is None:
                            errors[idx] = exc
                    if unreachable is not None and isinstance(
                        exc, (PeerSocketError, DnsError, SegmentNotFound)
                    ):
                        unreachable.add(endpoint)

            return run

        self._parallel([job(ep, items) for ep, items in per_endpoint.items()])

    def _copy_local(
        self, items: list[tuple[int, TransferRequest]], errors: list[BaseException | None]
    ) -> None:
        """Replicas in our own segment: a bounds-checked memcpy, no engine round trip."""
        find = self.engine.registry.find_remote
        for idx, req in items:
            view = req.local
            assert isinstance(view, memoryview)
            n = len(view)
            region = find(req.remote_addr, n)
            if region is None:
                if errors[idx] is None:
                    errors[idx] = PeerRejected(
                        f"address {req.remote_addr:#x}+{n} is not inside this client's own segment"
                    )
                continue
            if n >= _MEMMOVE_FROM:  # large: copy with the GIL released
                remote = region.addr + (req.remote_addr - region.addr)
                local = buffer_address(view)
                if req.opcode == TransferOpcode.WRITE:
                    ctypes.memmove(remote, local, n)
                else:
                    ctypes.memmove(local, remote, n)
            else:
                off = req.remote_addr - region.addr
                if req.opcode == TransferOpcode.WRITE:
                    region.view[off : off + n] = view
                else:
                    view[:] = region.view[off : off + n]

    # ------------------------------------------------------------------------------
    # writes
    # ------------------------------------------------------------------------------

    def _write_batch(
        self,
        keys: Sequence[str],
        parts: Sequence[Parts],
        config: ReplicateConfig,
        upsert: bool,
    ) -> list[bool | StoreError]:
        """Two-phase write of many objects; True stored, False already existed.

        Objects whose replica landed on a peer that turned out to be unreachable
        (crashed, not yet expired by the master) are written once more, elsewhere.
        """
        self._check_open()
        unreachable: set[str] = set()
        results = self._write_once(keys, parts, config, upsert, unreachable)
        retry = [i for i, r in enumerate(results) if isinstance(r, StoreTransferFailed)]
        if retry and unreachable:
            log.warning(
                "segment(s) %s unreachable; writing %d object(s) elsewhere",
                sorted(unreachable),
                len(retry),
            )
            again = dataclasses.replace(
                config, excluded_segments=(*config.excluded_segments, *sorted(unreachable))
            )
            sub = self._write_once(
                [keys[i] for i in retry], [parts[i] for i in retry], again, upsert, set()
            )
            for i, r in zip(retry, sub, strict=True):
                results[i] = r
        return results

    def _write_once(
        self,
        keys: Sequence[str],
        parts: Sequence[Parts],
        config: ReplicateConfig,
        upsert: bool,
        unreachable: set[str],
    ) -> list[bool | StoreError]:
        n = len(keys)
        results: list[bool | StoreError] = [True] * n
        sizes = [sum(len(p) for p in ps) for ps in parts]
        start, end, revoke = (
            (M.BATCH_UPSERT_START, M.BATCH_UPSERT_END, M.BATCH_UPSERT_REVOKE)
            if upsert
            else (M.BATCH_PUT_START, M.BATCH_PUT_END, M.BATCH_PUT_REVOKE)
        )
        if n == 1:  # the single-key RPCs are cheaper to encode
            single = M.UPSERT_START if upsert else M.PUT_START
            try:
                reps = self.master.call(
                    single,
                    {
                        "client_id": self.client_id,
                        "key": keys[0],
                        "size": sizes[0],
                        "config": config.to_wire(),
                    },
                )
                started: list[list[Any]] = [[0, reps]]
            except StoreError as exc:
                started = [[exc.code, exc.message]]
        else:
            started = self.master.call(
                start,
                {
                    "client_id": self.client_id,
                    "keys": list(keys),
                    "sizes": sizes,
                    "config": config.to_wire(),
                },
            )
        per_endpoint: dict[str, list[tuple[int, TransferRequest]]] = {}
        writing: list[int] = []
        for i, (code, value) in enumerate(started):
            if code == ErrorCode.OBJECT_ALREADY_EXISTS and not upsert:
                results[i] = False
                continue
            if code != 0:
                results[i] = store_error(code, f"{keys[i]!r}: {value}")
                continue
            writing.append(i)
            for rep in (ReplicaDesc.from_wire(r) for r in value):
                off = 0
                for part in parts[i]:
                    if len(part):
                        per_endpoint.setdefault(rep.endpoint, []).append(
                            (
                                i,
                                TransferRequest.write(
                                    part, rep.address + off, segment=rep.endpoint
                                ),
                            )
                        )
                    off += len(part)
        errors: list[BaseException | None] = [None] * n
        self._run_transfers(per_endpoint, errors, unreachable)
        good = [i for i in writing if errors[i] is None]
        bad = [i for i in writing if errors[i] is not None]
        if n == 1 and good:  # the common single put: the plain RPC is cheapest
            single_end = M.UPSERT_END if upsert else M.PUT_END
            try:
                self.master.call(single_end, {"client_id": self.client_id, "key": keys[0]})
            except StoreError as exc:
                results[0] = exc
            return results
        finish: list[tuple[MasterMethod, dict[str, Any]]] = []
        if good:
            finish.append((end, {"client_id": self.client_id, "keys": [keys[i] for i in good]}))
        if bad:
            finish.append((revoke, {"client_id": self.client_id, "keys": [keys[i] for i in bad]}))
        replies = self.master.call_many(finish)
        if good:
            code, value = replies[0]
            if code != 0:
                raise store_error(code, str(value))
            for i, (c, v) in zip(good, value, strict=True):
                if c != 0:
                    results[i] = store_error(c, f"{keys[i]!r}: {v}")
        for i in bad:
            results[i] = StoreTransferFailed(f"writing {keys[i]!r} failed: {errors[i]}")
        return results

    @staticmethod
    def _raise_or(result: bool | StoreError) -> bool:
        if isinstance(result, StoreError):
            raise result
        return result

    def put(self, key: str, value: Any, config: ReplicateConfig | None = None) -> bool:
        """Store ``value`` (any buffer) under ``key``.

        Returns:
            True if stored, False if the key already existed (it is never overwritten).

        Raises:
            InvalidParams: empty key/value, or larger than local_buffer_size.
            NoAvailableHandle: no room in the pool, even after eviction.
            StoreTransferFailed: a replica's owner could not be written.
            RpcFailed: the master is unreachable.
        """
        return self.put_parts(key, [value], config)

    def put_parts(
        self, key: str, parts: Sequence[Any], config: ReplicateConfig | None = None
    ) -> bool:
        """Store the concatenation of ``parts`` (each a buffer) without joining them."""
        views = [_as_view(p) for p in parts]
        self._bytes_api_limit(sum(len(v) for v in views), f"put {key!r}")
        return self._raise_or(
            self._write_batch([key], [views], config or ReplicateConfig(), False)[0]
        )

    def put_from(
        self, key: str, buffer: Any, size: int | None = None, config: ReplicateConfig | None = None
    ) -> bool:
        """Store ``size`` bytes from registered memory (an address or a buffer) without staging."""
        view = self.engine.local_view(buffer, size, writable=False)
        return self._raise_or(
            self._write_batch([key], [[view]], config or ReplicateConfig(), False)[0]
        )

    def put_many(
        self,
        keys: Sequence[str],
        values: Sequence[Sequence[Any]],
        config: ReplicateConfig | None = None,
        *,
        bytes_api: bool = False,
    ) -> list[bool | StoreError]:
        """Store many objects; each value is a sequence of parts (buffers or
        ``(address, size)`` pairs).  Results per key: True, False (existed) or the error."""
        if len(keys) != len(values):
            raise InvalidParams(f"{len(keys)} keys but {len(values)} values")
        parts = [[self._part(p) for p in ps] for ps in values]
        if bytes_api:
            for k, ps in zip(keys, parts, strict=True):
                self._bytes_api_limit(sum(len(p) for p in ps), f"put {k!r}")
        return self._write_batch(keys, parts, config or ReplicateConfig(), False)

    def _part(self, p: Any) -> memoryview:
        if isinstance(p, tuple):
            addr, size = p
            return self.engine.local_view(int(addr), int(size), writable=False)
        return _as_view(p)

    def upsert(self, key: str, value: Any, config: ReplicateConfig | None = None) -> None:
        """Insert or replace; readers see the old value until the new one is complete."""
        views = [_as_view(value)]
        self._bytes_api_limit(len(views[0]), f"upsert {key!r}")
        self._raise_or(self._write_batch([key], [views], config or ReplicateConfig(), True)[0])

    def upsert_many(
        self,
        keys: Sequence[str],
        values: Sequence[Sequence[Any]],
        config: ReplicateConfig | None = None,
    ) -> list[bool | StoreError]:
        if len(keys) != len(values):
            raise InvalidParams(f"{len(keys)} keys but {len(values)} values")
        parts = [[self._part(p) for p in ps] for ps in values]
        return self._write_batch(keys, parts, config or ReplicateConfig(), True)

    # ------------------------------------------------------------------------------
    # reads
    # ------------------------------------------------------------------------------

    def _query(self, keys: Sequence[str]) -> tuple[list[Any], float]:
        """Replica lists (or errors) per key, and when the leases started."""
        t0 = time.monotonic()
        if len(keys) == 1:
            try:
                return [[0, self.master.call(M.GET_REPLICA_LIST, {"key": keys[0]})]], t0
            except StoreError as exc:
                return [[exc.code, exc.message]], t0
        return self.master.call(M.BATCH_GET_REPLICA_LIST, {"keys": list(keys)}), t0

    def _pick(self, replicas: list[ReplicaDesc], attempt: int) -> ReplicaDesc:
        own = self.engine.segment_name
        ordered = sorted(replicas, key=lambda r: r.endpoint != own)  # local replica first
        return ordered[attempt % len(ordered)]

    def _read_batch(
        self, keys: Sequence[str], dests: Callable[[int, int], Parts | StoreError]
    ) -> list[int | StoreError]:
        """Read many objects.  ``dests(i, size)`` gives the views to fill for key i
        (whose total must equal ``size``) or an error to report instead."""
        self._check_open()
        n = len(keys)
        results: list[int | StoreError] = [0] * n
        found, t0 = self._query(keys)
        replicas: dict[int, list[ReplicaDesc]] = {}
        views: dict[int, Parts] = {}
        lease_ttl = 0.0
        for i, (code, value) in enumerate(found):
            if code != 0:
                results[i] = store_error(code, f"{keys[i]!r}: {value}")
                continue
            size = int(value["size"])
            lease_ttl = max(lease_ttl, value["lease_ttl_ms"] / 1000.0)
            target = dests(i, size)
            if isinstance(target, StoreError):
                results[i] = target
                continue
            replicas[i] = [ReplicaDesc.from_wire(r) for r in value["replicas"]]
            views[i] = target
            results[i] = size
        pending = list(replicas)
        attempt = 0
        while pending:
            per_endpoint: dict[str, list[tuple[int, TransferRequest]]] = {}
            for i in pending:
                rep = self._pick(replicas[i], attempt)
                off = 0
                for v in views[i]:
                    if len(v):
                        per_endpoint.setdefault(rep.endpoint, []).append(
                            (i, TransferRequest.read(v, rep.address + off, segment=rep.endpoint))
                        )
                    off += len(v)
            errors: list[BaseException | None] = [None] * n
            self._run_transfers(per_endpoint, errors)
            attempt += 1
            failed = [i for i in pending if errors[i] is not None]
            for i in failed:
                if attempt >= len(replicas[i]):
                    results[i] = StoreTransferFailed(
                        f"reading {keys[i]!r} failed on every replica: {errors[i]}"
                    )
            pending = [i for i in failed if attempt < len(replicas[i])]
        if replicas and time.monotonic() > t0 + lease_ttl:
            for i in replicas:
                if not isinstance(results[i], StoreError):
                    results[i] = LeaseExpired(
                        f"reading {keys[i]!r} took longer than its {lease_ttl:g} s read lease "
                        "(lease_expired_before_data_transfer_completed); the space may have been "
                        "reused, retry the read (or raise --default_kv_lease_ttl)"
                    )
        return results

    def get(self, key: str) -> bytes:
        """The value of ``key``.

        Raises:
            ObjectNotFound, ReplicaNotReady, LeaseExpired, StoreTransferFailed, RpcFailed,
            InvalidParams (larger than local_buffer_size).
        """
        holder: list[bytes | bytearray] = []

        def dest(i: int, size: int) -> Parts | StoreError:
            try:
                self._bytes_api_limit(size, f"get {key!r}")
            except StoreError as exc:
                return exc
            obj, view = new_bytes(size)
            holder.append(obj)
            return [view]

        (res,) = self._read_batch([key], dest)
        if isinstance(res, StoreError):
            raise res
        out = holder[0]
        return out if isinstance(out, bytes) else bytes(out)

    def get_many(self, keys: Sequence[str]) -> list[bytes | StoreError]:
        holders: dict[int, bytes | bytearray] = {}

        def dest(i: int, size: int) -> Parts | StoreError:
            try:
                self._bytes_api_limit(size, f"get {keys[i]!r}")
            except StoreError as exc:
                return exc
            obj, view = new_bytes(size)
            holders[i] = obj
            return [view]

        out: list[bytes | StoreError] = []
        for i, res in enumerate(self._read_batch(keys, dest)):
            if isinstance(res, StoreError):
                out.append(res)
            else:
                obj = holders[i]
                out.append(obj if isinstance(obj, bytes) else bytes(obj))
        return out

    def get_into(self, key: str, buffer: Any, size: int | None = None) -> int:
        """Read ``key`` into local memory (an address with ``size``, or a writable buffer).

        Returns the object size.  Raises InvalidParams if the destination is
        smaller than the object.
        """
        (res,) = self.get_many_into([key], [[self._dest_part(buffer, size)]])
        if isinstance(res, StoreError):
            raise res
        return res

    def _dest_part(self, buffer: Any, size: int | None) -> memoryview:
        if isinstance(buffer, tuple):
            buffer, size = buffer
        return self.engine.local_view(buffer, size, writable=True)

    def get_many_into(
        self, keys: Sequence[str], dests: Sequence[Sequence[Any]]
    ) -> list[int | StoreError]:
        """Read each key into its destination parts (filled in order); results are
        byte counts or errors."""
        if len(keys) != len(dests):
            raise InvalidParams(f"{len(keys)} keys but {len(dests)} destinations")
        parts = [
            [p if isinstance(p, memoryview) else self._dest_part(p, None) for p in ds]
            for ds in dests
        ]

        def dest(i: int, size: int) -> Parts | StoreError:
            room = sum(len(p) for p in parts[i])
            if room < size:
                return store_error(
                    int(ErrorCode.INVALID_PARAMS),
                    f"{keys[i]!r} is {size} bytes but the destination holds only {room}",
                )
            out: Parts = []
            left = size
            for p in parts[i]:
                take = min(len(p), left)
                out.append(p[:take])
                left -= take
                if not left:
                    break
            return out

        return self._read_batch(keys, dest)

    def locate(self, keys: Sequence[str]) -> list[ObjectLocation | StoreError]:
        """Replica locations of many keys in one RPC; each granted a read lease."""
        self._check_open()
        found, t0 = self._query(keys)
        out: list[ObjectLocation | StoreError] = []
        for key, (code, value) in zip(keys, found, strict=True):
            if code != 0:
                out.append(store_error(code, f"{key!r}: {value}"))
            else:
                out.append(
                    ObjectLocation(
                        key,
                        int(value["size"]),
                        tuple(ReplicaDesc.from_wire(r) for r in value["replicas"]),
                        t0 + value["lease_ttl_ms"] / 1000.0,
                    )
                )
        return out

    def read_ranges(
        self,
        locations: Sequence[ObjectLocation],
        ranges: Sequence[Sequence[tuple[memoryview, int]]],
    ) -> list[list[int | StoreError]]:
        """Read byte ranges of located objects without asking the master again.

        ``ranges[i]`` lists ``(destination view, source offset)`` pairs for
        ``locations[i]``; each fragment reads ``len(view)`` bytes.  Results per
        fragment: bytes read, or the error (source range outside the object,
        lease expired before the read finished, transfer failure).
        """
        self._check_open()
        results: list[list[int | StoreError]] = [[0] * len(r) for r in ranges]
        flat: list[tuple[int, int]] = []  # (location index, fragment index)
        for i, (loc, frags) in enumerate(zip(locations, ranges, strict=True)):
            for j, (view, src) in enumerate(frags):
                if src < 0 or src + len(view) > loc.size:
                    results[i][j] = InvalidParams(
                        f"range [{src}, +{len(view)}) is outside {loc.key!r} ({loc.size} bytes)"
                    )
                else:
                    results[i][j] = len(view)
                    flat.append((i, j))
        attempt = 0
        pending = flat
        while pending:
            per_endpoint: dict[str, list[tuple[int, TransferRequest]]] = {}
            for n, (i, j) in enumerate(pending):
                loc = locations[i]
                view, src = ranges[i][j]
                if not len(view):
                    continue
                rep = self._pick(list(loc.replicas), attempt)
                per_endpoint.setdefault(rep.endpoint, []).append(
                    (n, TransferRequest.read(view, rep.address + src, segment=rep.endpoint))
                )
            errors: list[BaseException | None] = [None] * len(pending)
            self._run_transfers(per_endpoint, errors)
            attempt += 1
            retry = []
            for n, (i, j) in enumerate(pending):
                if errors[n] is None:
                    continue
                if attempt < len(locations[i].replicas):
                    retry.append((i, j))
                else:
                    results[i][j] = StoreTransferFailed(
                        f"reading {locations[i].key!r} failed: {errors[n]}"
                    )
            pending = retry
        now = time.monotonic()
        for i, loc in enumerate(locations):
            if now > loc.lease_deadline:
                for j, r in enumerate(results[i]):
                    if not isinstance(r, StoreError):
                        results[i][j] = LeaseExpired(
                            f"the read lease of {loc.key!r} ran out before the read finished; retry"
                        )
        return results

    def get_buffer(self, key: str) -> BufferHandle:
        """The object's bytes in the local buffer, as a :class:`BufferHandle`.

        Raises:
            NoAvailableHandle: the local buffer has no room (release older handles).
        """
        got: dict[int, tuple[int, memoryview]] = {}

        def dest(i: int, size: int) -> Parts | StoreError:
            taken = self.local.take(size)
            if taken is None:
                return store_error(
                    int(ErrorCode.NO_AVAILABLE_HANDLE),
                    f"local buffer ({self.config.local_buffer_size} bytes, {self.local.free_bytes} "
                    f"free) cannot hold {key!r} ({size} bytes); release BufferHandles or raise "
                    "local_buffer_size",
                )
            got[i] = taken
            return [taken[1]]

        (res,) = self._read_batch([key], dest)
        if isinstance(res, StoreError):
            if 0 in got:
                taken_addr, taken_view = got.pop(0)
                taken_view.release()  # the traceback must not pin the local buffer
                self.local.give_back(taken_addr)
            raise res
        addr, view = got[0]
        return make_handle(self.local, addr, len(view))

    # ------------------------------------------------------------------------------
    # queries and removal
    # ------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        """Whether ``key`` is readable (grants a read lease, like the reference)."""
        self._check_open()
        return bool(self.master.call(M.EXIST_KEY, {"key": key}))

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        self._check_open()
        return [bool(x) for x in self.master.call(M.BATCH_EXIST_KEY, {"keys": list(keys)})]

    def size_of(self, key: str) -> int:
        self._check_open()
        return int(self.master.call(M.GET_REPLICA_LIST, {"key": key})["size"])

    def replicas(self, key: str) -> list[ReplicaDesc]:
        self._check_open()
        res = self.master.call(M.GET_REPLICA_LIST, {"key": key})
        return [ReplicaDesc.from_wire(r) for r in res["replicas"]]

    def replicas_many(self, keys: Sequence[str]) -> list[list[ReplicaDesc] | StoreError]:
        self._check_open()
        out: list[list[ReplicaDesc] | StoreError] = []
        for key, (code, value) in zip(
            keys, self.master.call(M.BATCH_GET_REPLICA_LIST, {"keys": list(keys)}), strict=True
        ):
            out.append(
                store_error(code, f"{key!r}: {value}")
                if code
                else [ReplicaDesc.from_wire(r) for r in value["replicas"]]
            )
        return out

    def remove(self, key: str, force: bool = False) -> None:
        self._check_open()
        self.master.call(M.REMOVE, {"key": key, "force": force})

    def remove_many(self, keys: Sequence[str], force: bool = False) -> list[StoreError | None]:
        self._check_open()
        res = self.master.call(M.BATCH_REMOVE, {"keys": list(keys), "force": force})
        return [
            None if c == 0 else store_error(c, f"{k!r}: {v}")
            for k, (c, v) in zip(keys, res, strict=True)
        ]

    def remove_by_regex(self, pattern: str, force: bool = False) -> int:
        self._check_open()
        return int(self.master.call(M.REMOVE_BY_REGEX, {"pattern": pattern, "force": force}))

    def remove_all(self, force: bool = False) -> int:
        self._check_open()
        return int(self.master.call(M.REMOVE_ALL, {"force": force}))

    def health(self) -> bool:
        """True if the master answers."""
        try:
            self.master.call(M.PING, {"client_id": self.client_id})
            return True
        except MooncakeError:
            return False

    # ------------------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def _teardown(self, unmount: bool) -> None:
        self._stop.set()
        if self._ping_thread is not None:
            self._ping_thread.join(10)
        if unmount:
            for info in self._segments:
                try:
                    self.master.call(
                        M.UNMOUNT_SEGMENT, {"client_id": self.client_id, "segment_id": info.id}
                    )
                except MooncakeError as exc:
                    log.warning("unmounting segment %s at the master failed: %s", info.id, exc)
        self.master.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        engine = getattr(self, "engine", None)
        if engine is not None:
            if self._owns_engine:
                engine.close()
            else:  # give the borrowed engine its memory back
                for addr in [
                    *self._segment_regions,
                    *([self._local_addr] if getattr(self, "_local_addr", None) else []),
                ]:
                    try:
                        engine.free(addr)
                    except MooncakeError:
                        pass

    def close(self) -> None:
        """Unmount this client's segments (their objects disappear), stop the
        heartbeat and release memory.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._teardown(unmount=True)

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
