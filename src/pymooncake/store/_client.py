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
import logging
import os
import threading
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._heldio import DEFAULT_HOLD_S, DEFAULT_SPIN_S
from .._logging import RepeatLimiter
from .._net import split_host_port
from ..config import EngineConfig
from ..errors import (
    InvalidParams,
    MooncakeError,
    StoreError,
    store_error,
)
from ..transfer import TransferEngine
from ..transfer.metadata import parse_metadata_target
from ..wire import _master_msgs as msg
from ..wire import _offload_msgs as omsg
from ._buffers import LocalBuffer
from ._client_io import ObjectLocation
from ._ha_confirm import StandbyConfirms
from ._master_client import MasterClient
from ._metrics import ClientMetrics, ClientMetricsSettings
from ._reads import ReadOps
from ._slots import SlotPools, slot_bytes_from_env
from ._ssd import OffloadReader, SsdSettings, SsdTier
from ._tasks import TaskInfo, TaskRunner
from ._types import ClientStatus, ReplicaDesc, ReplicaStatus, SegmentInfo
from ._writes import WriteOps

__all__ = ["ObjectLocation", "StoreClient", "StoreClientConfig"]

log = logging.getLogger("pymooncake.store")


#: the heartbeat period of a client whose master's client_ttl is 4 s or more
#: (the reference's)
DEFAULT_PING_INTERVAL_S = 1.0


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
    #: how long a master call waits for its reply with the GIL held before it
    #: waits the ordinary way (a call beside a busy Python thread then costs its
    #: round trip, not a 5 ms switch interval); 0 never holds the GIL.
    #: PYMOONCAKE_GIL_HOLD_US in the mooncake.store API.
    gil_hold_s: float = DEFAULT_HOLD_S
    #: how much of that wait polls for the reply without sleeping (a sleeping
    #: caller pays 20-30 us to be woken on a VM); PYMOONCAKE_RPC_SPIN_US.
    rpc_spin_s: float = DEFAULT_SPIN_S
    #: heartbeat period; None: the reference's 1 s, or a quarter of the
    #: master's client_ttl (told in each ping reply) when that is shorter.  A
    #: value set here is used as it is.
    ping_interval_s: float | None = None
    #: bytes a client may hold reserved per value size for single puts (one
    #: master round trip per put instead of two: ``_slots.py``); values above
    #: half of it take the ordinary path; 0 turns it off.
    #: PYMOONCAKE_PUT_SLOT_BYTES.
    put_slot_bytes: int = field(default_factory=slot_bytes_from_env)
    #: MC_STORE_CLUSTER_ID: with an ``etcd://`` master address, which cluster's
    #: elected leader to use (``mooncake-store/<cluster_id>/master_view``)
    cluster_id: str = "mooncake_cluster"
    engine: EngineConfig | None = None
    #: fault in segments when they are mounted (the reference maps them with
    #: MAP_POPULATE), so the first write into each page does not pay a page fault
    #: (~3.5 us per 4 KiB page, most of the cost of storing a small object); the
    #: local buffer stays lazy (puts and gets do not stage through it).
    #: PYMOONCAKE_PREFAULT=0 turns it off for a faster start.
    prefault: bool = field(
        default_factory=lambda: os.environ.get("PYMOONCAKE_PREFAULT", "1") != "0"
    )
    #: client metrics (MC_STORE_CLIENT_METRIC*: ClientMetricsSettings.from_env)
    metrics: ClientMetricsSettings = field(default_factory=ClientMetricsSettings)
    #: an SSD tier under ``ssd_offload_path`` (``_ssd.py``; MOONCAKE_OFFLOAD_* tune it)
    enable_ssd_offload: bool = False
    ssd_offload_path: str = ""

    def __post_init__(self) -> None:
        if self.global_segment_size < 0 or self.local_buffer_size < 0:
            raise InvalidParams("segment and buffer sizes must not be negative")


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


class StoreClient(WriteOps, ReadOps):
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
        self._ping_thread: threading.Thread | None = None
        self._ping_log = RepeatLimiter(log, every=60)
        self._ping_ok = True
        #: the heartbeat period in use: ping_interval_s, or else 1 s or a quarter
        #: of the master's client_ttl when that is shorter (a 1 s ttl with 1 s
        #: pings would expire a client whenever one ping came a little late)
        self._ping_every = config.ping_interval_s or DEFAULT_PING_INTERVAL_S
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        host, port = split_host_port(config.local_hostname)
        self.host_id = host
        #: the reference's client metrics (None when MC_STORE_CLIENT_METRIC=0)
        self.metrics = ClientMetrics(config.metrics) if config.metrics.enabled else None
        engine_config = config.engine or EngineConfig.from_env()
        self.master = MasterClient(
            config.master_server_addr,
            timeout_s=config.rpc_timeout_s,
            connect_timeout_s=config.rpc_connect_timeout_s,
            metrics=self.metrics,
            security=engine_config.security,
            cluster_id=config.cluster_id,
            # PYMOONCAKE_SAME_HOST=0: TCP only, also to a master on this host
            same_host_rpc=engine_config.same_host_transport,
            gil_hold_s=config.gil_hold_s,
            spin_s=config.rpc_spin_s,
        )
        #: HA: the standbys this client confirms its puts to (_ha_confirm.py)
        self.confirms = StandbyConfirms(
            self.client_id,
            security=engine_config.security,
            same_host_rpc=engine_config.same_host_transport,
            gil_hold_s=config.gil_hold_s,
            spin_s=config.rpc_spin_s,
        )
        #: keys this process is writing (put/upsert started, not ended), to tell a
        #: concurrent put of another thread from an orphan of an earlier attempt
        self._writing: dict[str, int] = {}
        self._writing_lock = threading.Lock()
        #: puts whose revoke could not be sent (master unreachable), or whose
        #: PutStart may have been executed although its reply never came: revoked
        #: by the heartbeat, so their buffers do not wait for put_start_release_timeout
        self._revoke_backlog: set[tuple[str, bool]] = set()
        #: keys the heartbeat is revoking right now; a put of one waits for it
        self._revoking: set[str] = set()
        self._revoke_done = threading.Condition(self._writing_lock)
        #: buffers reserved for puts (_slots.py); with HA the leader answers a
        #: reservation once a standby has it (a new leader never hands them out)
        self.slots = SlotPools(config.put_slot_bytes)
        #: runs the copy/move tasks the master assigns to this client (_tasks.py)
        self._tasks = TaskRunner(self)
        #: the SSD tier (enable_ssd_offload), and the reader of others' tiers
        self.ssd: SsdTier | None = None
        self.fsdir = ""
        self.ssd_reader = OffloadReader(engine_config.security, config.rpc_timeout_s)
        try:
            self.master.check_version()
            self.fsdir = self._storage_config(config)
            if engine is None:
                p2p = parse_metadata_target(config.metadata_server).is_p2p
                engine = TransferEngine(
                    config.local_hostname,
                    config.metadata_server,
                    config=engine_config,
                    append_rpc_port=not p2p and port is None,
                )
            self.engine = engine
            if self.metrics is not None:
                engine.enable_metrics()  # exported next to the client's (tent_* names)
            self.master.call(msg.ReMountSegment(self.client_id, ()))
            pong = self.master.call(msg.Ping(self.client_id))
            self._master_instance = pong.instance
            self._heed_ttl(pong.client_ttl_ms)
            self.confirms.update(pong.standbys)
            if config.global_segment_size > 0:
                self.mount(config.global_segment_size)
            if config.local_buffer_size > 0:
                region = engine.allocate(config.local_buffer_size)
                self.local = LocalBuffer(region.view, region.addr)
            else:
                self.local = LocalBuffer(memoryview(bytearray(0)), 0)
            if config.enable_ssd_offload:
                self.ssd = SsdTier(
                    self, SsdSettings.from_env(config.ssd_offload_path), engine_config.security
                )
                self.ssd.start()
        except BaseException:
            self._teardown(unmount=True)
            raise
        self._ping_thread = threading.Thread(
            target=self._ping_loop, name=f"mc-store-ping:{self.hostname}", daemon=True
        )
        self._ping_thread.start()
        if self.metrics is not None:
            self.metrics.start_reporting(config.metrics.interval_s)
        _live_clients.add(self)

    def _storage_config(self, config: StoreClientConfig) -> str:
        """The master's shared filesystem for DISK replicas (--root_fs_dir), unless
        this client has an SSD tier, which takes that role (as the reference)."""
        try:
            fsdir: str = self.master.call(omsg.GetStorageConfig()).fsdir
        except StoreError:
            return ""  # an older master
        if not fsdir or config.enable_ssd_offload:
            return ""
        try:
            os.makedirs(fsdir, exist_ok=True)
        except OSError as exc:
            log.warning(
                "the master keeps DISK replicas in %s (--root_fs_dir) but this host cannot "
                "create it (%s): puts are not written there; mount the shared filesystem",
                fsdir,
                exc,
            )
            return ""
        return fsdir

    # ------------------------------------------------------------------------------
    # identity, segments, liveness
    # ------------------------------------------------------------------------------

    @property
    def hostname(self) -> str:
        """This client's transfer-engine segment name (usable as a preferred segment)."""
        return self.engine.segment_name

    def mount(self, size: int) -> SegmentInfo:
        """Contribute ``size`` more bytes of registered memory to the pool."""
        region = self.engine.allocate(size, populate=self.config.prefault)
        info = SegmentInfo(
            uuid.uuid4().hex, self.engine.segment_name, region.addr, size, self.host_id
        )
        try:
            self.master.call(msg.MountSegment(self.client_id, info.to_params()))
        except BaseException:
            self.engine.free(region.addr)
            raise
        self._segments.append(info)
        return info

    def mount_registered(self, addr: int, size: int) -> SegmentInfo:
        """Offer ``size`` bytes of memory the engine already has registered at
        ``addr`` (a mapped file, memory the caller owns) as a segment.  The
        caller keeps it mapped until :meth:`unmount`."""
        self._check_open()
        info = SegmentInfo(uuid.uuid4().hex, self.engine.segment_name, addr, size, self.host_id)
        self.master.call(msg.MountSegment(self.client_id, info.to_params()))
        self._segments.append(info)
        return info

    def unmount(self, segment_id: str) -> SegmentInfo:
        """Withdraw one of this client's segments: the master drops the replicas
        it holds.  The memory stays mapped and registered: release memory from
        :meth:`mount` with ``engine.free(info.base)``, and memory given to
        :meth:`mount_registered` as its owner sees fit.

        Raises:
            InvalidParams: not a segment of this client.
        """
        self._check_open()
        info = next((s for s in self._segments if s.id == segment_id), None)
        if info is None:
            raise InvalidParams(f"segment {segment_id!r} is not mounted by this client")
        self.master.call(msg.UnmountSegment(self.client_id, info.id))
        self._segments.remove(info)
        return info

    @property
    def segments(self) -> tuple[SegmentInfo, ...]:
        return tuple(self._segments)

    # --- caller memory (the same names as a DummyClient's; see _api.StoreApi) -----

    def register_memory(self, addr: int, size: int) -> None:
        """Register ``size`` bytes at ``addr`` with the engine (zero-copy buffers)."""
        self.engine.register(addr, size)

    def unregister_memory(self, addr: int) -> None:
        self.engine.unregister(addr)

    def local_view(self, addr: int, length: int, *, writable: bool) -> memoryview:
        """A byte view of local memory at ``addr`` (see ``TransferEngine.local_view``)."""
        return self.engine.local_view(addr, length, writable=writable)

    def registered_end(self, addr: int) -> int:
        """End of the registered memory holding ``addr`` (0 if none)."""
        region = self.engine.registry.find(addr, 1) if addr else None
        return region.end if region is not None else 0

    def _heed_ttl(self, client_ttl_ms: int) -> None:
        """Ping at a quarter of the master's client_ttl when that is shorter
        than the default period (0: the master did not say), unless the
        config sets ``ping_interval_s``."""
        if client_ttl_ms and self.config.ping_interval_s is None:
            self._ping_every = min(DEFAULT_PING_INTERVAL_S, client_ttl_ms / 4000)

    def _ping_loop(self) -> None:
        while not self._stop.wait(self._ping_every):
            try:
                res = self.master.call(msg.Ping(self.client_id), patient=False, idle_wait_s=0.1)
                self._heed_ttl(res.client_ttl_ms)
                instance = res.instance
                if self._master_instance and instance != self._master_instance:
                    # the master restarted (or, with HA, another master leads): an
                    # embedded metadata server lost our descriptor, so publish it
                    # again before anyone needs it
                    log.warning(
                        "master at %s is a new instance (restarted, or another HA master "
                        "now leads); re-publishing segment %r",
                        self.master.address,
                        self.hostname,
                    )
                    self.engine.republish()
                self._master_instance = instance
                self.confirms.update(res.standbys)
                self.confirms.settle(self.master)
                self._ping_ok = True
                self._sweep_slots()
                if res.status == ClientStatus.NEED_REMOUNT:
                    log.warning(
                        "master at %s does not know this client (it restarted or expired us); "
                        "re-mounting %d segment(s)",
                        self.master.address,
                        len(self._segments),
                    )
                    self.master.call(
                        msg.ReMountSegment(
                            self.client_id, tuple(s.to_params() for s in self._segments)
                        )
                    )
                    if self.ssd is not None:
                        self.ssd.kick()  # mount the SSD tier again and re-register its files
                self._retry_revokes()
                self._tasks.poll(res.tasks)
            except MooncakeError as exc:
                self._ping_ok = False
                self._ping_log("ping", logging.WARNING, "heartbeat to the master failed: %s", exc)

    # ------------------------------------------------------------------------------
    # queries and removal
    # ------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        """Whether ``key`` is readable (grants a read lease, like the reference)."""
        self._check_open()
        return bool(self.master.call(msg.ExistKey(key)).exists)

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        self._check_open()
        if not keys:
            return []
        return list(self.master.call(msg.BatchExistKey(tuple(keys))).exists)

    def size_of(self, key: str) -> int:
        self._check_open()
        return int(self.master.call(msg.GetReplicaList(key)).size)

    def replicas(self, key: str) -> list[ReplicaDesc]:
        self._check_open()
        res = self.master.call(msg.GetReplicaList(key))
        return [ReplicaDesc.from_wire(r) for r in res.replicas]

    def replicas_many(self, keys: Sequence[str]) -> list[list[ReplicaDesc] | StoreError]:
        self._check_open()
        if not keys:
            return []
        found, _ = self._query(keys)
        out: list[list[ReplicaDesc] | StoreError] = []
        for key, (code, value) in zip(keys, found, strict=True):
            if code:
                out.append(store_error(code, f"{key!r}: {value}"))
                continue
            size, _ttl, reps = value
            out.append(
                [
                    ReplicaDesc(rid, ep, addr, size, ReplicaStatus.COMPLETE, sid)
                    for ep, addr, sid, rid in reps
                ]
            )
        return out

    def remove(self, key: str, force: bool = False) -> None:
        self._check_open()
        self.master.call(msg.Remove(key, force, self.client_id))

    def remove_many(self, keys: Sequence[str], force: bool = False) -> list[StoreError | None]:
        self._check_open()
        if not keys:
            return []
        res = self.master.call(msg.BatchRemove(tuple(keys), force, self.client_id))
        return [
            None if c == 0 else store_error(c, f"{k!r}: {v}")
            for k, c, v in zip(keys, res.codes, res.messages, strict=True)
        ]

    def replica_clear_many(self, keys: Sequence[str], segment_name: str = "") -> list[str]:
        """Drop this client's objects ``keys`` whose read lease has expired: all
        their replicas (``segment_name`` empty; only objects whose replicas are
        all complete) or only the complete replicas in segment ``segment_name``
        (the object goes when none is left).  Keys that are missing, written by
        another client, leased, or have nothing on that segment are skipped.

        Returns:
            the keys that were cleared, in request order.

        Raises:
            StoreError(NOT_SUPPORTED): the master protocol has no
                ``BatchReplicaClear`` yet.
        """
        self._check_open()
        if not keys:
            return []
        res = self.master.call(msg.BatchReplicaClear(self.client_id, tuple(keys), segment_name))
        return list(res.keys)

    def remove_by_regex(self, pattern: str, force: bool = False) -> int:
        self._check_open()
        return int(self.master.call(msg.RemoveByRegex(pattern, force, self.client_id)).count)

    def remove_all(self, force: bool = False) -> int:
        self._check_open()
        count = int(self.master.call(msg.RemoveAll(force, self.client_id)).count)
        # the store is being emptied: this client's buffers reserved ahead go too
        # (they would split the room the next puts get)
        self.give_back_reserved()
        return count

    # --- copy/move tasks (_tasks.py) -------------------------------------------------

    def create_copy_task(self, key: str, targets: Sequence[str]) -> tuple[int, int]:
        """Ask the master to copy ``key`` to the segments named ``targets``; the
        owner of one of its replicas does it.  Returns the task id.

        Raises:
            ObjectNotFound; InvalidParams (no targets, or one is not mounted);
            StoreError(UNAVAILABLE_IN_CURRENT_STATUS) (a target is draining),
            StoreError(TASK_PENDING_LIMIT_EXCEEDED).
        """
        self._check_open()
        hi, lo = self.master.call(msg.CreateCopyTask(key, tuple(targets), self.client_id)).task_id
        return int(hi), int(lo)

    def create_move_task(self, key: str, source: str, target: str) -> tuple[int, int]:
        """Ask the master to move ``key``'s replica in segment ``source`` to
        ``target`` (done by ``source``'s owner).  Returns the task id.

        Raises:
            ObjectNotFound; InvalidParams (source == target, a segment unknown, no
            replica in source); the errors of :meth:`create_copy_task`.
        """
        self._check_open()
        hi, lo = self.master.call(msg.CreateMoveTask(key, source, target, self.client_id)).task_id
        return int(hi), int(lo)

    def query_task(self, task_id: tuple[int, int]) -> TaskInfo:
        """Raises: StoreError(TASK_NOT_FOUND)."""
        self._check_open()
        reply = self.master.call(msg.QueryTask((task_id[0], task_id[1])))
        return TaskInfo.from_wire(reply.to_wire())

    @property
    def ping_healthy(self) -> bool:
        """The last heartbeat to the master succeeded (no RPC; for health endpoints)."""
        return self._ping_ok and not self._closed

    def health(self) -> bool:
        """True if the master answers."""
        try:
            self.master.call(msg.Ping(self.client_id), patient=False)
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
        self._tasks.close()
        ssd = getattr(self, "ssd", None)
        if ssd is not None:
            ssd.close()
        reader = getattr(self, "ssd_reader", None)
        if reader is not None:
            reader.close()
        if self.metrics is not None:
            self.metrics.close()
        slots = getattr(self, "slots", None)
        held = slots.disable() if slots is not None else []
        if held and getattr(self, "master", None) is not None:
            self._revoke(held, False, quiet=True)  # their buffers return at once
        if unmount:
            for info in self._segments:
                try:
                    self.master.call(msg.UnmountSegment(self.client_id, info.id))
                except MooncakeError as exc:
                    log.warning("unmounting segment %s at the master failed: %s", info.id, exc)
        self.master.close()
        self.confirms.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        engine = getattr(self, "engine", None)
        if engine is not None:
            if self._owns_engine:
                engine.close()
            else:  # give the borrowed engine its memory back
                local = getattr(self, "local", None)  # absent if setup failed early
                for addr in [
                    *(info.base for info in self._segments),
                    *([local.addr] if local is not None and local.addr else []),
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
