"""The transfer engine: memory, segments, transports, batches, notifications.

Theory of operation
-------------------
An engine owns: a :class:`MemoryRegistry` (what peers may touch), an RPC
listener (descriptor exchange, Notify, Probe) on a private event loop, one
listener per transport, a :class:`SegmentDirectory` resolving peer names, and
a small thread pool for asynchronous batches.

A transfer resolves its target segment to a :class:`Peer`, picks the first
installed transport that can reach it (``local`` for our own segment, ``tcp``
for peers whose descriptor says ``protocol: tcp``), turns requests into
slices over local memoryviews, and lets the transport run them -- in the
caller's thread for synchronous calls, on the pool for batches.  Waiting is
done on locks and condition variables, which release the GIL.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .._authio import warn_open, warn_weak
from .._logging import RepeatLimiter
from .._loop import LoopThread
from .._net import (
    bind_listener,
    first_non_loopback_ipv4,
    is_ip,
    is_loopback,
    join_host_port,
    resolve_host,
    split_host_port,
)
from ..config import EngineConfig
from ..errors import (
    ClosedError,
    HandshakeRejected,
    InvalidArgument,
    MetadataError,
    MooncakeError,
    NotSupported,
    PeerSocketError,
    TransferFailed,
)
from ..wire import (
    BufferDesc,
    MessageType,
    NotifyMessage,
    RpcMeta,
    SegmentDesc,
    decode_segment,
    encode_notify,
    encode_segment,
)
from ._batch import Batch, BatchTable
from ._engine_memory import MemoryOps, _release
from ._memory import (
    DEVICE_VIEW,
    MemoryRegistry,
    Region,
)
from ._metrics import EngineMetrics
from ._request import TransferOpcode, TransferRequest, TransferStatus
from ._rpc import RpcServer, rpc_call
from ._segments import SegmentDirectory, check_name
from .device import DeviceSpan
from .device._context import DeviceContext
from .metadata import MetadataStore, connect_metadata, parse_metadata_target
from .transports import Peer, Slice, Transport, TransportContext, create_transport
from .transports import unavailable_reason as _unavailable_reason
from .transports.shm import ShmTransport

__all__ = ["LOCAL_SEGMENT_ID", "TransferEngine"]

log = logging.getLogger("pymooncake.engine")

#: reference: the engine's own segment always has id 0
LOCAL_SEGMENT_ID = 0
#: bytes charged per queued notification beyond its two strings (object overhead)
_NOTIFY_OVERHEAD = 64
_warned_loopback: set[str] = set()


class TransferEngine(MemoryOps):
    """A Mooncake transfer engine (native, exception-raising API).

    Args:
        local_hostname: this engine's name/address.  In P2P mode its host part
            is advertised and the segment name becomes ``host:rpc_port``;
            with a metadata server it is the segment name.
        metadata_server: ``"P2PHANDSHAKE"``, ``"http://host:port/metadata"``,
            ``"memory://name"``, or a :class:`MetadataStore` instance.
        config: engine settings (``EngineConfig.from_env()`` for MC_* variables).
        append_rpc_port: with a metadata server, name the segment
            ``<local_hostname>:<rpc_port>`` (unique per process, like P2P names).

    Raises:
        ConfigError / NotSupported: unusable metadata string or settings.
        PortInUse / PeerSocketError / DnsError: listeners cannot be opened on
            the advertised address.
        MetadataError / MetadataUnreachable: publishing to the metadata server failed.
    """

    def __init__(
        self,
        local_hostname: str,
        metadata_server: str | MetadataStore = "P2PHANDSHAKE",
        *,
        config: EngineConfig | None = None,
        append_rpc_port: bool = False,
    ) -> None:
        self.config = cfg = config or EngineConfig()
        self._append_rpc_port = append_rpc_port
        self._closed = False
        self._registry = MemoryRegistry()
        self._batches = BatchTable()
        self._notifies: collections.deque[tuple[NotifyMessage, int]] = collections.deque()
        self._notify_lock = threading.Lock()
        self._notify_bytes = 0
        self._notify_log = RepeatLimiter(log)
        #: notifications refused because the queue was full (count / bytes limit)
        self.notifies_refused = 0
        self._security = cfg.security
        self._rpc_auth: dict[str, Any] = {
            "key": self._security.key,
            "ssl_context": self._security.client_ssl_context(),
        }
        self._handles: dict[str, int] = {}
        self._handle_names: dict[int, str] = {}
        self._handle_lock = threading.Lock()
        self._next_handle = 1
        self._publish_lock = threading.Lock()
        self._cleanup: list[Callable[[], None]] = []
        self._loop: LoopThread | None = None
        self._rpc: RpcServer | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._transports: list[Transport] = []
        #: managed buffers stay mapped until free(), even if unregistered
        self._managed: dict[int, Region] = {}
        self._published = False
        self._local_peer: Peer | None = None
        self._devices = DeviceContext(cfg.device_backend, cfg.staging_chunk_bytes)
        #: set once a request with device memory was planned: until then no group
        #: needs to be searched for device slices
        self._device_slices = False
        self._metrics: EngineMetrics | None = None

        if isinstance(metadata_server, MetadataStore):
            store: MetadataStore | None = metadata_server
            owns_store = False
        else:
            store = connect_metadata(parse_metadata_target(metadata_server), cfg)
            owns_store = True
        try:
            self._start(local_hostname, store)
        except BaseException:
            self.close()
            if owns_store and store is not None:
                store.close()
            raise
        if owns_store and store is not None:
            self._cleanup.append(store.close)

    # ------------------------------------------------------------------------------
    # start-up
    # ------------------------------------------------------------------------------

    def _start(self, local_hostname: str, store: MetadataStore | None) -> None:
        cfg = self.config
        check_name(local_hostname, "local_hostname")
        host, name_port = split_host_port(local_hostname)
        p2p = store is None
        if cfg.legacy_rpc_port_binding:
            adv_host = host
            rpc_port = name_port or cfg.handshake_port
        elif p2p:
            adv_host, rpc_port = host, cfg.rpc_port
        else:
            adv_host = cfg.tcp_bind_address or (
                host if is_ip(host) else (first_non_loopback_ipv4() or host)
            )
            rpc_port = cfg.rpc_port
        bind_ip = resolve_host(adv_host, what="local_hostname")
        self._warn_loopback(local_hostname, bind_ip)
        rpc_sock = bind_listener(
            bind_ip,
            port=rpc_port,
            port_range=None if rpc_port else (cfg.rpc_port_min, cfg.rpc_port_max),
            backlog=cfg.listen_backlog,
            what="transfer engine RPC/handshake listener",
        )
        self.rpc_port: int = rpc_sock.getsockname()[1]
        self.advertised_host = adv_host
        if p2p or self._append_rpc_port:
            self.segment_name = join_host_port(host, self.rpc_port)
        else:
            self.segment_name = local_hostname
        self.local_hostname = local_hostname

        ctx = TransportContext(
            config=cfg,
            registry=self._registry,
            advertised_host=adv_host,
            bind_host=bind_ip,
            devices=self._devices,
        )
        for name in ("local", "shm", "tcp"):
            transport = create_transport(name, ctx)
            self._transports.append(transport)
            transport.start()
        shm = self.transport("shm")
        assert isinstance(shm, ShmTransport)
        shm.set_fallback(self.transport("tcp"))
        self._directory = SegmentDirectory(store, cfg, own_descriptor=self.local_descriptor)

        self._loop = LoopThread(f"mc-engine-loop:{self.segment_name}")
        self._rpc = RpcServer(
            rpc_sock,
            descriptor=(self.local_descriptor if p2p else lambda: None),
            on_notify=self._queue_notify,
            max_frame=cfg.handshake_max_length,
            timeout_s=cfg.rpc_server_timeout_s,
            key=self._security.key,
            ssl=self._security.server_ssl_context(),
            max_connections=cfg.rpc_max_connections,
            max_buffered_bytes=cfg.rpc_max_buffered_bytes,
            name=self.segment_name,
        )
        if self._security.key is None:
            warn_open("transfer engine RPC and TCP data ports")
        warn_weak(self._security.key, "transfer engine")
        self._loop.run(self._rpc.start())
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=cfg.async_workers, thread_name_prefix=f"mc-batch:{self.segment_name}"
        )
        if p2p:
            log.info(
                "Transfer Engine RPC using P2P handshake, listening on %s",
                join_host_port(adv_host, self.rpc_port),
            )
        else:
            self._published = True  # from here on, close() unpublishes
            self._claim_rpc_meta(RpcMeta(adv_host, self.rpc_port))
            self._publish()
            log.info(
                "Transfer Engine RPC using new RPC mapping, listening on %s (segment %r, "
                "metadata %s)",
                join_host_port(adv_host, self.rpc_port),
                self.segment_name,
                store.url if store else "",
            )

    @staticmethod
    def _warn_loopback(local_hostname: str, ip: str) -> None:
        if is_loopback(ip) and local_hostname not in _warned_loopback:
            _warned_loopback.add(local_hostname)
            log.warning(
                "local_hostname %r resolves to the loopback address %s: peers on other machines "
                "cannot reach this engine (connectable_name must be a non-loopback IP address of "
                "this node, or a hostname with a DNS or /etc/hosts record). Fine for single-host "
                "use.",
                local_hostname,
                ip,
            )

    def _claim_rpc_meta(self, meta: RpcMeta) -> None:
        """Publish our rpc_meta entry, replacing a stale one left by a dead engine
        (the rule: :meth:`SegmentDirectory.claim_rpc_meta`)."""
        self._directory.claim_rpc_meta(self.segment_name, meta, owner_alive=self._answers_probe)

    def _answers_probe(self, meta: RpcMeta) -> bool:
        """Whether an engine answers a Probe RPC at ``meta``'s address."""
        try:
            rpc_call(
                meta.ip_or_host_name,
                meta.rpc_port,
                MessageType.PROBE,
                {},
                connect_timeout_s=min(1.0, self.config.connect_timeout_s),
                timeout_s=2.0,
                max_frame=self.config.handshake_max_length,
                what="previous owner of this segment name",
                **self._rpc_auth,
            )
        except MooncakeError:
            return False
        return True

    # ------------------------------------------------------------------------------
    # descriptor
    # ------------------------------------------------------------------------------

    def local_descriptor(self) -> dict[str, Any]:
        """The JSON object peers receive for our segment."""
        fields: dict[str, Any] = {}
        for t in self._transports:
            fields.update(t.descriptor_fields())
        # device buffers carry their location ("cuda:N", the field TENT descriptors
        # have); reference TCP peers ignore it and read/write them like host buffers
        buffers = tuple(
            BufferDesc(self.segment_name, r.addr, r.length)
            if r.device < 0
            else BufferDesc(self.segment_name, r.addr, r.length, extra={"location": r.location})
            for r in self._registry.regions()
            if r.remote_accessible
        )
        tcp_keys = ("tcp_data_port", "tcp_proto_version", "tcp_data_host")
        desc = SegmentDesc(
            name=self.segment_name,
            protocol="tcp",
            buffers=buffers,
            tcp_data_port=int(fields.get("tcp_data_port", 0)),
            tcp_proto_version=int(fields.get("tcp_proto_version", 2)),
            rdma_server_name="",
            tcp_data_host=fields.get("tcp_data_host"),
            # extensions (e.g. the same-host transport's); reference peers ignore them
            extra={k: v for k, v in fields.items() if k not in tcp_keys},
        )
        return encode_segment(desc)

    def _registry_changed(self) -> None:
        self._local_peer = None  # its descriptor lists the buffers
        for t in self._transports:
            t.registry_changed()

    def _quiesce(self, regions: Iterable[Region]) -> None:
        """Wait until no transfer uses ``regions`` (already removed from the registry)."""
        drain = self.config.unregister_drain_s
        for region in regions:
            what = f"of segment {self.segment_name!r}"
            cut = self._registry.quiesce(region, drain_s=drain, what=what)
            for t in self._transports:
                t.quiesce(region, drain_s=drain)
            if cut:
                log.warning(
                    "unregister [%#x, +%d) %s: %d transfer(s) did not finish within %.1f s; "
                    "their connections were cut (the peers see the requests fail)",
                    region.addr,
                    region.length,
                    what,
                    cut,
                    drain,
                )

    def republish(self) -> None:
        """Write our rpc_meta and descriptor to the metadata server again (it
        restarted and lost them, e.g. the one embedded in a store master)."""
        self._check_open()
        if self._directory.p2p:
            return
        self._claim_rpc_meta(RpcMeta(self.advertised_host, self.rpc_port))
        self._publish()

    def _publish(self) -> None:
        self._registry_changed()
        if self._directory.p2p:
            return
        with self._publish_lock:
            self._directory.publish_segment(self.segment_name, self.local_descriptor())

    # ------------------------------------------------------------------------------
    # segments
    # ------------------------------------------------------------------------------

    def open_segment(self, name: str) -> int:
        """A handle for segment ``name`` (0 for our own segment).

        Raises:
            SegmentNotFound and the errors of :meth:`segment`.
        """
        name = name.lstrip("/")
        if name == self.segment_name:
            return LOCAL_SEGMENT_ID
        check_name(name, "segment name")
        self.segment(name)
        with self._handle_lock:
            handle = self._handles.get(name)
            if handle is None:
                handle = self._next_handle
                self._next_handle += 1
                self._handles[name] = handle
                self._handle_names[handle] = name
        return handle

    def segment_name_of(self, target: str | int) -> str:
        if isinstance(target, str):
            return target.lstrip("/")
        if target == LOCAL_SEGMENT_ID:
            return self.segment_name
        with self._handle_lock:
            name = self._handle_names.get(target)
        if name is None:
            raise InvalidArgument(f"segment handle {target} was never opened")
        return name

    def segment(self, target: str | int, *, refresh: bool = False) -> Peer:
        """Resolve a segment name or handle to a :class:`Peer`."""
        self._check_open()
        name = self.segment_name_of(target)
        if name == self.segment_name:
            peer = self._local_peer
            if peer is None or refresh:
                peer = self._local_peer = Peer(
                    name=name,
                    desc=decode_segment(self.local_descriptor(), name),
                    rpc_host=self.advertised_host,
                    rpc_port=self.rpc_port,
                    data_host=self.advertised_host,
                    local=True,
                )
            return peer
        return self._directory.lookup(name, refresh=refresh)

    def sync_segment_cache(self, name: str | None = None) -> None:
        """Forget cached peer descriptors (all, or one)."""
        self._directory.invalidate(name)

    def first_buffer_address(self, name: str) -> int:
        """Address of ``buffers[0]`` of a segment's descriptor, 0 if it has none."""
        peer = self.segment(name, refresh=True)
        return peer.desc.buffers[0].addr if peer.desc.buffers else 0

    def _transport_for(self, peer: Peer) -> Transport:
        for t in self._transports:
            if t.can_reach(peer):
                return t
        raise NotSupported(
            f"segment {peer.name!r} uses protocol {peer.desc.protocol!r}: "
            f"{_unavailable_reason(peer.desc.protocol)}"
        )

    # ------------------------------------------------------------------------------
    # transfers
    # ------------------------------------------------------------------------------

    def _slices(
        self, segment: str | int | None, requests: Sequence[TransferRequest], base: int = 0
    ) -> tuple[list[tuple[Peer, Transport, list[Slice]]], list[int]]:
        """Requests grouped per peer, and each request's length (in request order)."""
        groups: dict[str, tuple[Peer, Transport, list[Slice]]] = {}
        span: memoryview | DeviceSpan
        lengths: list[int] = []
        for i, req in enumerate(requests):
            target = req.segment if req.segment is not None else segment
            if target is None:
                raise InvalidArgument(f"request {i} names no target segment")
            if req.remote_addr < 0:
                raise InvalidArgument(f"request {i}: negative remote address")
            name = self.segment_name_of(target)
            group = groups.get(name)
            if group is None:
                peer = self.segment(name)
                group = groups[name] = (peer, self._transport_for(peer), [])
            is_write = req.opcode == TransferOpcode.WRITE
            span = self.local_span(req.local, req.length, writable=not is_write)
            lengths.append(len(span))
            if isinstance(span, DeviceSpan):
                self._device_slices = True
                group[2].append(Slice(base + i, is_write, DEVICE_VIEW, req.remote_addr, span))
            else:
                group[2].append(Slice(base + i, is_write, span, req.remote_addr))
        return list(groups.values()), lengths

    def _execute(
        self,
        transport: Transport,
        peer: Peer,
        slices: list[Slice],
        deadline: float,
        done: Callable[[Slice, BaseException | None], None],
    ) -> None:
        """``transport.execute``, with device slices staged through pinned host
        memory when the transport moves host bytes only (TCP)."""
        if (
            self._device_slices
            and not transport.handles_device
            and any(s.device is not None for s in slices)
        ):
            self._devices.stage(transport.execute, peer, slices, deadline, done)
        else:
            transport.execute(peer, slices, deadline, done)

    def _deadline(self, total_bytes: int, timeout_s: float | None) -> float:
        budget = self.config.transfer_timeout_s if timeout_s is None else timeout_s
        # reference: MC_TRANSFER_TIMEOUT seconds plus one nanosecond per byte
        return time.monotonic() + budget + total_bytes * 1e-9

    def transfer(
        self,
        segment: str | int | None,
        requests: Sequence[TransferRequest],
        *,
        timeout_s: float | None = None,
    ) -> None:
        """Run ``requests`` and return when all completed.

        Raises:
            TransferFailed: one or more requests failed; ``errors[i]`` says why.
            SegmentNotFound / NotSupported / InvalidArgument: before any I/O.
        """
        self._check_open()
        groups, lengths = self._slices(segment, requests)
        deadline = self._deadline(sum(lengths), timeout_s)
        errors: list[BaseException | None] = [None] * len(requests)

        def done(s: Slice, err: BaseException | None) -> None:
            errors[s.index] = err

        metrics = self._metrics
        for peer, transport, slices in groups:
            started = time.perf_counter_ns() if metrics is not None else 0
            self._execute(transport, peer, slices, deadline, done)
            if not peer.local and any(isinstance(errors[s.index], PeerSocketError) for s in slices):
                self._retry_after_refresh(peer, slices, errors, deadline, done)
            if metrics is not None:
                latency_us = (time.perf_counter_ns() - started) // 1000
                metrics.record(transport.name, slices, errors, latency_us)
        failed = [e for e in errors if e is not None]
        if failed:
            raise TransferFailed(
                f"{len(failed)} of {len(requests)} transfer request(s) failed; first: {failed[0]}",
                errors,
            )

    def _retry_after_refresh(
        self,
        peer: Peer,
        slices: list[Slice],
        errors: list[BaseException | None],
        deadline: float,
        done: Callable[[Slice, BaseException | None], None],
    ) -> None:
        """A peer that restarted publishes a new data address; re-resolve and retry once."""
        try:
            fresh = self._directory.lookup(peer.name, refresh=True)
        except MooncakeError:
            return
        if (fresh.data_host, fresh.data_port) == (peer.data_host, peer.data_port):
            return
        log.info(
            "segment %r moved to %s; retrying",
            peer.name,
            join_host_port(fresh.data_host, fresh.data_port),
        )
        for t in self._transports:
            t.forget_peer(peer)
        retry = [s for s in slices if isinstance(errors[s.index], PeerSocketError)]
        self._execute(self._transport_for(fresh), fresh, retry, deadline, done)

    def write(
        self, segment: str | int, local: object, remote_addr: int, length: int | None = None
    ) -> None:
        """Copy local bytes to ``remote_addr`` in ``segment`` (sync)."""
        self.transfer(segment, [TransferRequest(TransferOpcode.WRITE, local, remote_addr, length)])

    def read(
        self, segment: str | int, local: object, remote_addr: int, length: int | None = None
    ) -> None:
        """Copy bytes at ``remote_addr`` in ``segment`` into local memory (sync)."""
        self.transfer(segment, [TransferRequest(TransferOpcode.READ, local, remote_addr, length)])

    def submit_transfer(
        self,
        segment: str | int | None,
        requests: Sequence[TransferRequest],
        *,
        timeout_s: float | None = None,
    ) -> concurrent.futures.Future[None]:
        """Run :meth:`transfer` on the engine's pool; the future raises what it raises."""
        self._check_open()
        assert self._executor is not None
        return self._executor.submit(self.transfer, segment, list(requests), timeout_s=timeout_s)

    # --- batches ------------------------------------------------------------------------

    def allocate_batch(self, capacity: int) -> int:
        self._check_open()
        return self._batches.allocate(capacity, self.config.slice_timeout_s).id

    def batch(self, batch_id: int) -> Batch:
        return self._batches.get(batch_id)

    def submit(
        self,
        batch_id: int,
        requests: Sequence[TransferRequest],
        *,
        segment: str | int | None = None,
        notify: tuple[str | int, NotifyMessage] | None = None,
    ) -> range:
        """Start ``requests`` asynchronously in batch ``batch_id``.

        Returns the task indices.  With ``notify`` = (segment, message) the
        message is sent to that segment once the whole batch completed
        without failure.

        Raises:
            TooManyRequests: the batch's capacity would be exceeded.
            SegmentNotFound / NotSupported / InvalidArgument: nothing was started.
        """
        self._check_open()
        batch = self._batches.get(batch_id)
        base = len(batch.tasks)
        groups, lengths = self._slices(segment, requests, base)
        indices = batch.add(lengths)
        if notify is not None:
            target, msg = notify
            batch.notify = (self.segment_name_of(target), msg)
            batch.on_complete = self._batch_completed
        deadline = self._deadline(sum(lengths), None)
        assert self._executor is not None
        for peer, transport, slices in groups:
            self._executor.submit(self._run_group, batch, peer, transport, slices, deadline)
        return indices

    def _run_group(
        self, batch: Batch, peer: Peer, transport: Transport, slices: list[Slice], deadline: float
    ) -> None:
        metrics = self._metrics
        started = time.perf_counter_ns() if metrics is not None else 0
        outcome: dict[int, BaseException | None] = {}

        def done(s: Slice, err: BaseException | None) -> None:
            outcome[s.index] = err
            batch.complete(s.index, err)

        try:
            self._execute(
                transport,
                peer,
                slices,
                deadline,
                done if metrics is not None else lambda s, err: batch.complete(s.index, err),
            )
        except BaseException as exc:  # a bug must not leave tasks pending forever
            log.exception("transport %s failed unexpectedly", transport.name)
            for s in slices:  # (tasks already finished ignore this)
                batch.complete(s.index, exc)
                outcome[s.index] = exc
        if metrics is not None:
            for s in slices:  # a slice the transport never reported did not succeed
                outcome.setdefault(s.index, TimeoutError("not completed"))
            latency_us = (time.perf_counter_ns() - started) // 1000
            metrics.record(transport.name, slices, outcome, latency_us)

    def _batch_completed(self, batch: Batch) -> None:
        if batch.notify is None or batch.status().state.name != "COMPLETED":
            return
        name, msg = batch.notify
        try:
            self.send_notify(name, msg)
        except MooncakeError as exc:
            log.warning("notify to %r after batch %d failed: %s", name, batch.id, exc)

    def task_status(self, batch_id: int, task_id: int) -> TransferStatus:
        return self._batches.get(batch_id).task_status(task_id)

    def batch_status(self, batch_id: int) -> TransferStatus:
        return self._batches.get(batch_id).status()

    def wait_batch(self, batch_id: int, timeout_s: float | None = None) -> bool:
        return self._batches.get(batch_id).wait(timeout_s)

    def free_batch(self, batch_id: int) -> None:
        self._batches.free(batch_id)

    # ------------------------------------------------------------------------------
    # notifications and probes
    # ------------------------------------------------------------------------------

    def _rpc_target(self, target: str | int) -> tuple[str, int, str]:
        peer = self.segment(target)
        if not peer.rpc_port:
            raise MetadataError(
                f"segment {peer.name!r} has no rpc_meta entry, so its RPC port is unknown"
            )
        return peer.rpc_host, peer.rpc_port, peer.name

    def send_notify(self, target: str | int, message: NotifyMessage) -> None:
        """Deliver a notification to a peer's :meth:`get_notifies` queue.

        Raises:
            HandshakeRejected: the peer answered with an empty acknowledgement.
            SegmentNotFound / PeerSocketError / DnsError: the peer is unreachable.
        """
        host, port, name = self._rpc_target(target)
        reply = rpc_call(
            host,
            port,
            MessageType.NOTIFY,
            encode_notify(message),
            connect_timeout_s=self.config.connect_timeout_s,
            timeout_s=self.config.rpc_io_timeout_s,
            max_frame=self.config.handshake_max_length,
            what=f"RPC port of segment {name!r}",
            **self._rpc_auth,
        )
        if not isinstance(reply, dict) or not reply.get("notify_msg"):
            why = reply.get("error") if isinstance(reply, dict) else None
            raise HandshakeRejected(
                f"segment {name!r} rejected the notification {message.name!r}"
                + (f": {str(why)[:300]}" if why else "")
            )

    def _queue_notify(self, message: NotifyMessage) -> str | None:
        """RPC server callback: queue a notification, or say why it is refused."""
        size = len(message.name.encode()) + len(message.notify_msg.encode()) + _NOTIFY_OVERHEAD
        cfg = self.config
        with self._notify_lock:
            count = len(self._notifies)
            if (
                count < cfg.notify_queue_max
                and self._notify_bytes + size <= cfg.notify_queue_max_bytes
            ):
                self._notifies.append((message, size))
                self._notify_bytes += size
                return None
            self.notifies_refused += 1
            held = self._notify_bytes
        reason = (
            f"the notification queue of segment {self.segment_name!r} is full ({count} messages, "
            f"{held} bytes; limits {cfg.notify_queue_max} / {cfg.notify_queue_max_bytes}): the "
            "receiver does not call get_notifs() often enough"
        )
        self._notify_log(
            "full",
            logging.WARNING,
            "refused a notification %r: %s",
            message.name[:100],
            reason,
        )
        return reason

    def get_notifies(self) -> list[NotifyMessage]:
        """Drain and return the notifications received so far."""
        with self._notify_lock:
            out = [m for m, _ in self._notifies]
            self._notifies.clear()
            self._notify_bytes = 0
        return out

    def probe(self, target: str | int) -> None:
        """Check that a peer's RPC port answers.

        Raises:
            SegmentNotFound / PeerSocketError / DnsError / MalformedMessage.
        """
        host, port, name = self._rpc_target(target)
        rpc_call(
            host,
            port,
            MessageType.PROBE,
            {},
            connect_timeout_s=self.config.connect_timeout_s,
            timeout_s=min(10.0, self.config.rpc_io_timeout_s),
            max_frame=self.config.handshake_max_length,
            what=f"RPC port of segment {name!r}",
            **self._rpc_auth,
        )

    # ------------------------------------------------------------------------------
    # metrics
    # ------------------------------------------------------------------------------

    @property
    def metrics(self) -> EngineMetrics | None:
        """Per-transport request counts, bytes, failures, latency and sizes (TENT's
        names), or None until :meth:`enable_metrics` (store clients enable them)."""
        return self._metrics

    def enable_metrics(self) -> EngineMetrics:
        """Start recording transfer metrics (idempotent; a few hundred ns per group of
        requests, so an engine nobody scrapes does not pay for them)."""
        if self._metrics is None:
            self._metrics = EngineMetrics()
        return self._metrics

    # ------------------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def transport(self, name: str) -> Transport:
        for t in self._transports:
            if t.name == name:
                return t
        raise NotSupported(f"transport {name!r} is not installed")

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the transfer engine is closed")

    def close(self) -> None:
        """Unpublish, stop listeners and workers, release memory.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        directory = getattr(self, "_directory", None)
        if directory is not None and not directory.p2p and self._published:
            try:
                directory.unpublish(self.segment_name)
            except MooncakeError as exc:
                log.warning(
                    "Failed to unregister segment descriptor of %r: %s (stop engines before the "
                    "metadata server)",
                    self.segment_name,
                    exc,
                )
        if self._loop is not None:
            if self._rpc is not None:
                try:
                    self._loop.run(self._rpc.close(), timeout=10)
                except Exception:
                    log.debug("RPC server close failed", exc_info=True)
            self._loop.close()
        for t in self._transports:
            t.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._devices.close()
        self._registry.clear()
        for region in self._managed.values():
            _release(region)
        self._managed.clear()
        for fn in self._cleanup:
            fn()

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        name = getattr(self, "segment_name", "?")
        return f"<TransferEngine segment={name!r} closed={self._closed}>"
