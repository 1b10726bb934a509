"""Shared machinery of the store client: grouped transfers and local copies.

Base of the :class:`StoreClient` mixins (``_writes.py``, ``_reads.py``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import (
    DnsError,
    InvalidParams,
    MooncakeError,
    PeerRejected,
    PeerSocketError,
    SegmentNotFound,
    StoreTransferFailed,
    TransferFailed,
)
from ..transfer import TransferEngine, TransferRequest
from ..transfer._memory import MEMMOVE_FROM
from ..transfer.device import DeviceSpan
from ._buffers import LocalBuffer
from ._master_client import MasterClient
from ._metrics import ClientMetrics
from ._types import ReplicaDesc

if TYPE_CHECKING:
    from ..transfer._memory import Region
    from ._client import StoreClientConfig
    from ._ha_confirm import StandbyConfirms
    from ._slots import SlotPools
    from ._ssd import OffloadReader

__all__ = ["BATCH_OPS", "ClientIO", "ObjectLocation", "Part", "Parts", "transfer_failed"]

log = logging.getLogger("pymooncake.store")
#: one piece of an object's bytes in caller memory: host bytes, or device (GPU)
#: memory, which only the engine touches (it stages or IPC-copies it)
Part = memoryview | DeviceSpan
Parts = Sequence[Part]
#: copy_own(idx, part, address, write, errors): a copy to/from this client's own segment
CopyOwn = Callable[[int, Part, int, bool, list[BaseException | None]], None]
#: ``MemoryRegistry.copier()``: ``copy(addr, part, write)``, False when not registered
Copier = Callable[[int, Part, bool], bool]
#: op_name values of batch APIs: their transfers count as batch_put / batch_get latency
BATCH_OPS = frozenset(
    {"put_batch", "batch_put_from", "upsert_batch", "batch_upsert_from", "get_batch",
     "batch_get_into", "get_into_ranges"}
)  # fmt: skip


@dataclass(frozen=True)
class ObjectLocation:
    """Where an object's readable replicas are, and until when its read lease holds."""

    key: str
    size: int
    replicas: tuple[ReplicaDesc, ...]
    lease_deadline: float  # time.monotonic() seconds


def transfer_failed(message: str, cause: BaseException | None) -> StoreTransferFailed:
    """A StoreTransferFailed chained to the transfer error behind it, so that
    failure cascades are grouped by that cause (pymooncake._cascade)."""
    if isinstance(cause, (PeerSocketError, DnsError)):
        message += (
            " (the segment's owner is down or unreachable; the master forgets a dead "
            "client's segments after its --client_ttl, 10 s by default)"
        )
    err = StoreTransferFailed(message)
    err.__cause__ = cause
    return err


def outside_own(addr: int, n: int) -> PeerRejected:
    """The master placed a replica in this client's own segment at a range that is
    not registered here (the segment was unmounted or re-registered meanwhile)."""
    return PeerRejected(f"address {addr:#x}+{n} is not inside this client's own segment")


def _as_view(obj: Any) -> memoryview:
    view = memoryview(obj)
    if not view.c_contiguous:
        raise InvalidParams("buffers must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class ClientIO:
    """State every store-client mixin relies on (set up by StoreClient.__init__)."""

    config: StoreClientConfig
    engine: TransferEngine
    master: MasterClient
    #: HA: the standbys that confirm this client's puts (``_ha_confirm.py``)
    confirms: StandbyConfirms
    client_id: str
    local: LocalBuffer
    _writing: dict[str, int]
    _writing_lock: threading.Lock
    _revoke_backlog: set[tuple[str, bool]]
    _revoking: set[str]
    _revoke_done: threading.Condition
    metrics: ClientMetrics | None
    _closed: bool
    _pool: concurrent.futures.ThreadPoolExecutor | None
    ssd_reader: OffloadReader
    #: the shared filesystem of DISK replicas (the master's --root_fs_dir), or ""
    fsdir: str
    #: buffers reserved for single puts (``_slots.py``)
    slots: SlotPools
    _master_instance: str

    # ------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidParams("the store client is closed")

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

    def _route_parts(
        self,
        idx: int,
        endpoint: str,
        addr: int,
        parts: Parts,
        write: bool,
        per_endpoint: dict[str, list[tuple[int, TransferRequest]]],
        errors: list[BaseException | None],
        copy_own: CopyOwn | None = None,
    ) -> None:
        """Plan item ``idx``'s parts, laid out back to back from ``addr`` in segment
        ``endpoint``: parts in our own segment are copied right here (by
        ``copy_own``, a batch's :meth:`_copy_own_many`, else :meth:`_copy_own`),
        the others are grouped per peer for :meth:`_run_transfers`."""
        own = endpoint == self.engine.segment_name
        copy = copy_own or self._copy_own
        make = TransferRequest.write if write else TransferRequest.read
        for part in parts:
            n = len(part)
            if n:
                if own:
                    copy(idx, part, addr, write, errors)
                else:
                    per_endpoint.setdefault(endpoint, []).append(
                        (idx, make(part, addr, segment=endpoint))
                    )
            addr += n

    def _parts_of(
        self, values: Sequence[Sequence[Any]], part: Callable[[Any], Part]
    ) -> list[list[Part]]:
        """Each value's parts, as ``part(p)`` makes them from what the caller gave
        (buffers, ``(address, size)`` pairs).  A value that is one pair inside a
        registered host region is sliced from that region's view through one
        ``MemoryRegistry.window``: a batch of pointers into one buffer costs one
        region search, not one per key."""
        found = self._pointer_region(values)
        if found is not None:  # (the common batch: one region, one slice per value)
            region, pairs = found
            whole, base = region.view, region.addr
            return [[whole[at - base : at - base + n]] for at, n in pairs]
        out: list[list[Part]] = []
        window = self.engine.registry.window(remote=False)
        for ps in values:
            if len(ps) == 1 and type(ps[0]) is tuple and len(ps[0]) == 2:
                addr, size = ps[0]
                if type(addr) is int and type(size) is int:
                    view = window(addr, size)
                    if view is not None:
                        out.append([view])
                        continue
            out.append([part(p) for p in ps])
        return out

    def _pointer_region(
        self, values: Sequence[Sequence[Any]]
    ) -> tuple[Region, list[tuple[int, int]]] | None:
        """When every value is one ``(address, size)`` pair (size > 0) and all of
        them lie in one registered host region: that region and the pairs; else
        None (also for fewer than two values)."""
        if len(values) < 2:
            return None
        pairs: list[tuple[int, int]] = []
        for ps in values:
            if len(ps) != 1:
                return None
            p = ps[0]
            if type(p) is not tuple or len(p) != 2:
                return None
            at, n = p
            if type(at) is not int or type(n) is not int or n <= 0 or at < 0:
                return None
            pairs.append(p)
        lo = min(at for at, _ in pairs)
        hi = max(at + n for at, n in pairs)
        region = self.engine.registry.find(lo, hi - lo)
        if region is None or region.backend is not None:
            return None
        return region, pairs

    def _own_small_span(self, addrs: Sequence[int], sizes: Sequence[int]) -> Region | None:
        """The host region of our segment that holds every ``[addr, addr + size)``,
        when each value is small enough to be copied with a slice assignment under
        the GIL (below ``MEMMOVE_FROM``; larger ones are copied without it); else
        None.  The direct copies of same-process batches start here."""
        if not sizes or max(sizes) >= MEMMOVE_FROM:
            return None
        lo = min(addrs)
        region = self.engine.registry.find_remote(lo, max(map(int.__add__, addrs, sizes)) - lo)
        if region is None or region.backend is not None:
            return None
        return region

    def _source_part(self, buffer: Any, size: int | None) -> Part:
        """Caller memory to store from (an address or a buffer; host or device).

        The hook for ``put_from``/``put_many`` parts: device memory stays where it
        is and the engine moves it (``engine.local_view`` would copy it to host
        memory first)."""
        return self.engine.local_span(buffer, size, writable=False)

    def _copy_own(
        self,
        idx: int,
        view: Part,
        addr: int,
        write: bool,
        errors: list[BaseException | None],
    ) -> None:
        """Copy between ``view`` and ``addr`` in this client's own segment (write:
        into the segment); a range outside it lands in ``errors[idx]``."""
        n = len(view)
        region = self.engine.registry.find_remote(addr, n)
        if region is None:
            if errors[idx] is None:
                errors[idx] = outside_own(addr, n)
            return
        region.copy(addr, view, write)

    def _copy_own_many(self, copy: Copier | None = None) -> CopyOwn:
        """:meth:`_copy_own` for the parts of one batch (one region search for the
        parts a region holds, see ``MemoryRegistry.copier``; ``copy``: the batch's
        copier when it has one already)."""
        if copy is None:
            copy = self.engine.registry.copier()

        def copy_own(
            idx: int, view: Part, addr: int, write: bool, errors: list[BaseException | None]
        ) -> None:
            if not copy(addr, view, write) and errors[idx] is None:
                errors[idx] = outside_own(addr, len(view))

        return copy_own
