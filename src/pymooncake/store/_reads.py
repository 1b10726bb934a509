"""Reads of the store client: replica lookup, lease-checked reads into caller memory."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from .._gcpause import gc_paused
from ..errors import (
    InvalidParams,
    LeaseExpired,
    MalformedMessage,
    MooncakeError,
    StoreError,
    TransferFailed,
    store_error,
)
from ..transfer import TransferRequest
from ..transfer._memory import Region
from ..transfer.device import DeviceSpan
from ..wire import _master_msgs as msg
from ..wire._master_replies import Replica, ReplicaColumns
from ._buffers import BufferHandle, make_handle, new_bytes
from ._client_io import BATCH_OPS, ClientIO, ObjectLocation, Part, Parts, transfer_failed
from ._ssd import read_shared
from ._types import DISK_SEGMENT, LOCAL_DISK_SEGMENT, ErrorCode, ReplicaDesc, ReplicaStatus

#: what the master says of one key: (0, (size, lease ttl s, replicas)) or (code, message)
Found = tuple[int, Any]
#: ``grab(i, view)``: copy object i out of ``view`` (its replica in our own host memory)
Grab = Callable[[int, memoryview], StoreError | None]

__all__ = ["ReadOps"]

_COMPLETE = ReplicaStatus.COMPLETE
_DISK_MARKERS = frozenset((LOCAL_DISK_SEGMENT, DISK_SEGMENT))
_INT = frozenset({int})


#: destinations that are one ``(address, size)`` pair each, all inside one
#: registered host region (``ClientIO._pointer_region``): a batch read whose every
#: value lies in our own memory copies each value with one slice assignment
#: (:meth:`ReadOps._copy_own_direct`), without a view per destination or the
#: per-key planning of the general path
Direct = tuple[Region, list[tuple[int, int]]]


def _fit(key: str, parts: Parts, size: int) -> Parts | StoreError:
    """The first ``size`` bytes of destination ``parts`` (filled in order), or the
    error when they hold less."""
    if len(parts) == 1 and len(parts[0]) >= size:  # one destination, large enough
        return parts if len(parts[0]) == size else [parts[0][:size]]
    room = sum(len(p) for p in parts)
    if room < size:
        return store_error(
            int(ErrorCode.INVALID_PARAMS),
            f"{key!r} is {size} bytes but the destination holds only {room}",
        )
    out: list[Part] = []
    left = size
    for p in parts:
        take = min(len(p), left)
        out.append(p[:take])
        left -= take
        if not left:
            break
    return out


class ReadOps(ClientIO):
    """get / get_many / get_into / get_many_into / get_buffer / locate / read_ranges."""

    # ------------------------------------------------------------------------------
    # reads
    # ------------------------------------------------------------------------------

    def _query(self, keys: Sequence[str]) -> tuple[list[Found], float]:
        """Per key ``(0, (size, lease ttl in s, replicas))`` or ``(code, message)``
        (replicas as (endpoint, address, segment id, replica id)), and when the
        leases started."""
        t0 = time.monotonic()
        if len(keys) == 1:
            try:
                res = self.master.call(msg.GetReplicaList(keys[0]))
            except StoreError as exc:
                return [(exc.code, exc.message)], t0
            reps = [(r[1], r[2], r[5], r[0]) for r in res.replicas]
            return [(0, (res.size, res.lease_ttl_ms / 1000.0, reps))], t0
        if not keys:
            return [], t0
        return self._found(self._columns(keys)), t0

    def _columns(self, keys: Sequence[str]) -> ReplicaColumns:
        """BatchGetReplicaList of ``keys`` (two or more), as the master's columns."""
        cols: ReplicaColumns = self.master.call(msg.BatchGetReplicaList(tuple(keys))).columns
        if len(cols) != len(keys):
            raise MalformedMessage(f"the master answered {len(cols)} of {len(keys)} keys")
        return cols

    @staticmethod
    def _found(cols: ReplicaColumns) -> list[Found]:
        sizes = cols.sizes
        assert sizes is not None
        ttl = cols.lease_ttl_ms / 1000.0
        return [
            (0, (sizes[i], ttl, reps)) if code == 0 else (code, cols.message(i))
            for i, (code, reps) in enumerate(zip(cols.code, cols.replicas(), strict=True))
        ]

    def _all_in_own_memory(self, cols: ReplicaColumns) -> bool:
        """Every key of the reply was found, with one replica, in this client's
        own segment (no disk replica): the batch read of :meth:`_copy_own_batch`."""
        n = len(cols)
        return (
            len(cols.segs) == 1
            and cols.segs[0][0] == self.engine.segment_name
            and cols.segs[0][1] not in _DISK_MARKERS
            and cols.code.count(0) == n
            and cols.counts.count(1) == n
        )

    def _copy_own_batch(
        self,
        cols: ReplicaColumns,
        dests: Callable[[int, int], Parts | StoreError],
        results: list[int | StoreError],
        copied: list[int],
        replicas: dict[int, list[Replica]],
        views: dict[int, Parts],
    ) -> None:
        """A batch whose every key lies in our own memory (:meth:`_all_in_own_memory`):
        each value with one destination part is copied at once (``copied``); any
        other key (a destination split in parts, a range not registered) is left to
        the general path in ``replicas``/``views``."""
        sizes, addrs = cols.sizes, cols.addr
        assert sizes is not None
        copy = self.engine.registry.copier()
        every: list[list[Replica]] | None = None
        for i, size in enumerate(sizes):
            target = dests(i, size)
            if isinstance(target, StoreError):
                results[i] = target
                continue
            results[i] = size
            if len(target) == 1 and copy(addrs[i], target[0], False):
                copied.append(i)
                continue
            if every is None:
                every = list(cols.replicas())
            replicas[i] = every[i]
            views[i] = target

    def _copy_own_direct(
        self,
        cols: ReplicaColumns,
        direct: Direct,
        keys: Sequence[str],
        results: list[int | StoreError],
        copied: list[int],
    ) -> bool:
        """:meth:`_copy_own_batch` for pointer destinations in one registered host
        region: each value is one slice assignment between that region and the
        one of our segment holding every value.  False (nothing done) when the
        values do not all lie in one host region of ours, or one is large enough
        to be copied without the GIL (``MEMMOVE_FROM``: the general path does)."""
        sizes, addrs = cols.sizes, cols.addr
        assert sizes is not None
        region = self._own_small_span(addrs, sizes)
        if region is None:
            return False
        src, src_base = region.view, region.addr  # (held: the segment stays mapped)
        dst_region, pointers = direct
        dst, dst_base = dst_region.view, dst_region.addr
        for i, size in enumerate(sizes):
            at, room = pointers[i]
            if room < size:
                results[i] = store_error(
                    int(ErrorCode.INVALID_PARAMS),
                    f"{keys[i]!r} is {size} bytes but the destination holds only {room}",
                )
                continue
            a = addrs[i] - src_base
            d = at - dst_base
            dst[d : d + size] = src[a : a + size]
            results[i] = size
            copied.append(i)
        return True

    def _pick(self, replicas: Sequence[Replica], attempt: int) -> Replica:
        if len(replicas) == 1:
            return replicas[0]
        own = self.engine.segment_name
        ordered = sorted(replicas, key=lambda r: r[0] != own)  # local replica first
        return ordered[attempt % len(ordered)]

    def _read_batch(
        self,
        keys: Sequence[str],
        dests: Callable[[int, int], Parts | StoreError],
        op: str = "get_batch",
        grab: Grab | None = None,
        direct: Direct | None = None,
    ) -> list[int | StoreError]:
        """Read many objects.  ``dests(i, size)`` gives the views to fill for key i
        (whose total must equal ``size``) or an error to report instead.  ``op``
        names the API for the operation metrics (the reference's op_name).  A single
        object in this process's own host memory may instead be handed to
        ``grab(i, view)`` (a read-only view of it, valid during the call), which
        copies it out itself or returns an error.  ``direct``: the same
        destinations as pointers into one registered region (see :class:`Direct`)."""
        self._check_open()
        with gc_paused(len(keys)):  # (_gcpause.py: no full collections mid-batch)
            return self._read_batch_now(keys, dests, op, grab, direct)

    def _read_batch_now(
        self,
        keys: Sequence[str],
        dests: Callable[[int, int], Parts | StoreError],
        op: str,
        grab: Grab | None,
        direct: Direct | None = None,
    ) -> list[int | StoreError]:
        started = time.perf_counter_ns()
        n = len(keys)
        own_batch: ReplicaColumns | None = None
        if n > 1:
            t0 = time.monotonic()
            cols = self._columns(keys)
            if self._all_in_own_memory(cols):
                own_batch, found = cols, []
            else:
                found = self._found(cols)
        else:
            found, t0 = self._query(keys)
        if n == 1 and found[0][0] == 0:
            moving = time.perf_counter_ns()
            one = self._read_own(keys[0], found[0][1], t0, dests, grab)
            if one is None:
                one = self._read_one_remote(keys[0], found[0][1], t0, dests)
            if one is not None:
                if self.metrics is not None:
                    self._read_metrics(op, [one], type(one) is int, started, moving)
                return [one]
        results: list[int | StoreError] = [0] * n
        replicas: dict[int, list[Replica]] = {}
        views: dict[int, Parts] = {}
        #: keys copied at once from the one replica in our own host memory
        copied: list[int] = []
        own = self.engine.segment_name
        copy: Callable[[int, Part, bool], bool] | None = None
        lease_ttl = 0.0
        transfer_start = time.perf_counter_ns()
        if own_batch is not None:  # every key in our own memory: copied inline
            lease_ttl = own_batch.lease_ttl_ms / 1000.0
            if direct is None or not self._copy_own_direct(
                own_batch, direct, keys, results, copied
            ):
                self._copy_own_batch(own_batch, dests, results, copied, replicas, views)
        for i, (code, value) in enumerate(found):
            if code != 0:
                results[i] = store_error(code, f"{keys[i]!r}: {value}")
                continue
            size, ttl, reps = value
            if ttl > lease_ttl:
                lease_ttl = ttl
            target = dests(i, size)
            if isinstance(target, StoreError):
                results[i] = target
                continue
            results[i] = size
            if len(reps) == 1 and len(target) == 1 and reps[0][0] == own:
                if copy is None:
                    copy = self.engine.registry.copier()
                if reps[0][2] not in _DISK_MARKERS and copy(reps[0][1], target[0], False):
                    copied.append(i)
                    continue
            replicas[i] = reps
            views[i] = target
        if any(r[2] in _DISK_MARKERS for reps in replicas.values() for r in reps):
            self._read_disk(keys, replicas, views, results)
        pending = list(replicas)
        attempt = 0
        while pending:
            errors: list[BaseException | None] = [None] * n
            per_endpoint: dict[str, list[tuple[int, TransferRequest]]] = {}
            copy_own = self._copy_own_many()
            for i in pending:
                rep = self._pick(replicas[i], attempt)
                self._route_parts(
                    i, rep[0], rep[1], views[i], False, per_endpoint, errors, copy_own
                )
            self._run_transfers(per_endpoint, errors)
            attempt += 1
            failed = [i for i in pending if errors[i] is not None]
            for i in failed:
                if attempt >= len(replicas[i]):
                    results[i] = transfer_failed(
                        f"reading {keys[i]!r} failed on every replica: {errors[i]}", errors[i]
                    )
            pending = [i for i in failed if attempt < len(replicas[i])]
        if (replicas or copied) and time.monotonic() > t0 + lease_ttl:
            for i in (*replicas, *copied):
                if not isinstance(results[i], StoreError):
                    results[i] = self._lease_expired(keys[i], lease_ttl)
        if self.metrics is not None:
            self._read_metrics(op, results, bool(replicas or copied), started, transfer_start)
        return results

    def _read_metrics(
        self, op: str, results: list[int | StoreError], moved: bool, started: int, moving: int
    ) -> None:
        """Operation metrics of one read call (and of its transfer phase, when
        ``moved``: some bytes were read, from ``moving`` (perf_counter_ns) on)."""
        assert self.metrics is not None
        now = time.perf_counter_ns()
        if set(map(type, results)) <= _INT:  # every key read: one C-level sum
            read = sum(results)  # type: ignore[arg-type]
        else:
            read = sum(r for r in results if not isinstance(r, StoreError))
        if moved:
            self.metrics.transfer(False, read, (now - moving) // 1000, op in BATCH_OPS)
        self.metrics.operation(False, op, read, (now - started) // 1000)

    def _read_own(
        self,
        key: str,
        value: tuple[int, float, list[Replica]],
        t0: float,
        dests: Callable[[int, int], Parts | StoreError],
        grab: Grab | None,
    ) -> int | StoreError | None:
        """One object whose only replica lies in this client's own segment, in
        host or device memory it registered: copied here without planning a
        transfer batch (a same-process get was half its time in that planning),
        by ``grab`` when given and the memory is the host's.  None (nothing done,
        neither callback called) for every other object."""
        size, ttl, reps = value
        if len(reps) != 1:
            return None
        endpoint, addr, segment_id, _ = reps[0]
        if endpoint != self.engine.segment_name or segment_id in _DISK_MARKERS:
            return None
        region = self.engine.registry.find_remote(addr, size)
        if region is None:
            return None  # the general path reports the range outside our segment
        if grab is not None and region.backend is None:
            failed = grab(0, region.slice(addr, size))
            if failed is not None:
                return failed
        else:
            target = dests(0, size)
            if isinstance(target, StoreError):
                return target
            for part in target:
                region.copy(addr, part, False)
                addr += len(part)
        if time.monotonic() > t0 + ttl:
            return self._lease_expired(key, ttl)
        return size

    def _read_one_remote(
        self,
        key: str,
        value: tuple[int, float, list[Replica]],
        t0: float,
        dests: Callable[[int, int], Parts | StoreError],
    ) -> int | StoreError | None:
        """One object whose only replica is another client's memory: read with one
        engine call, without planning a batch (the general path's per-endpoint
        dicts, error lists and closures cost a single get ~15 us on a slow CPU).
        Answers as the general path does (the same errors, the lease checked
        after the copy); None (nothing done, ``dests`` not called) for any other
        object."""
        size, ttl, reps = value
        if len(reps) != 1:
            return None
        endpoint, addr, segment_id, _ = reps[0]
        if endpoint == self.engine.segment_name or segment_id in _DISK_MARKERS:
            return None
        target = dests(0, size)
        if isinstance(target, StoreError):
            return target
        requests: list[TransferRequest] = []
        for part in target:
            n = len(part)
            if n:
                requests.append(TransferRequest.read(part, addr, segment=endpoint))
            addr += n
        if requests:
            cause: BaseException | None = None
            try:
                self.engine.transfer(endpoint, requests)
            except TransferFailed as exc:
                cause = next((e for e in exc.errors if e is not None), exc)
            except MooncakeError as exc:
                cause = exc
            if cause is not None:
                return transfer_failed(f"reading {key!r} failed on every replica: {cause}", cause)
        if time.monotonic() > t0 + ttl:
            return self._lease_expired(key, ttl)
        return size

    @staticmethod
    def _lease_expired(key: str, ttl: float) -> LeaseExpired:
        return LeaseExpired(
            f"reading {key!r} took longer than its {ttl:g} s read lease "
            "(lease_expired_before_data_transfer_completed); the space may have been "
            "reused, retry the read (or raise --default_kv_lease_ttl)"
        )

    def _read_disk(
        self,
        keys: Sequence[str],
        replicas: dict[int, list[Replica]],
        views: dict[int, Parts],
        results: list[int | StoreError],
    ) -> None:
        """Objects without a memory replica are read from disk (and leave
        ``replicas``): LOCAL_DISK from the owner's SSD read port, DISK from the
        shared filesystem; the others lose their disk replicas (memory is read
        first).  Disk replicas carry a marker segment id (``_types.py``)."""
        per_endpoint: dict[str, list[int]] = {}
        sizes = {i: r for i, r in enumerate(results) if isinstance(r, int)}
        for i in list(replicas):
            reps = replicas[i]
            mem = [r for r in reps if r[2] not in _DISK_MARKERS]
            if len(mem) == len(reps):
                continue
            if mem:
                replicas[i] = mem
                continue
            del replicas[i]
            endpoint, _, sid, _ = reps[0]
            if sid == LOCAL_DISK_SEGMENT:
                per_endpoint.setdefault(endpoint, []).append(i)
                continue
            try:  # a DISK replica: the file on the shared filesystem (--root_fs_dir)
                read_shared(endpoint, keys[i], sizes[i], views[i])
            except (MooncakeError, OSError) as exc:
                results[i] = transfer_failed(
                    f"reading {keys[i]!r} from the shared filesystem ({endpoint}) failed: {exc}",
                    exc,
                )
        for endpoint, items in per_endpoint.items():
            try:
                errs = self.ssd_reader.read(
                    endpoint,
                    [keys[i] for i in items],
                    [sizes[i] for i in items],
                    [views[i] for i in items],
                )
            except (MooncakeError, OSError) as exc:
                err = transfer_failed(f"reading from the SSD tier at {endpoint} failed: {exc}", exc)
                for i in items:
                    results[i] = err
                continue
            for i, e in zip(items, errs, strict=True):
                if e is not None:
                    results[i] = e

    def _pick_desc(self, replicas: Sequence[ReplicaDesc], attempt: int) -> ReplicaDesc:
        if len(replicas) == 1:
            return replicas[0]
        own = self.engine.segment_name
        ordered = sorted(replicas, key=lambda r: r.endpoint != own)  # local replica first
        return ordered[attempt % len(ordered)]

    def get(self, key: str) -> bytes:
        """The value of ``key``.

        Raises:
            ObjectNotFound, ReplicaNotReady, LeaseExpired, StoreTransferFailed, RpcFailed,
            InvalidParams (larger than local_buffer_size).
        """
        (res,) = self._get_many([key], "get")
        if isinstance(res, StoreError):
            raise res
        return res

    def get_many(self, keys: Sequence[str]) -> list[bytes | StoreError]:
        """Values of many keys (each a ``bytes``, or the error)."""
        return self._get_many(keys, "get_batch")

    def _get_many(self, keys: Sequence[str], op: str) -> list[bytes | StoreError]:
        holders: dict[int, bytes | bytearray] = {}

        def dest(i: int, size: int) -> Parts | StoreError:
            try:
                self._bytes_api_limit(size, f"get {keys[i]!r}")
            except StoreError as exc:
                return exc
            obj, view = new_bytes(size)
            holders[i] = obj
            return [view]

        def grab(i: int, view: memoryview) -> StoreError | None:
            try:
                self._bytes_api_limit(len(view), f"get {keys[i]!r}")
            except StoreError as exc:
                return exc
            holders[i] = bytes(view)  # one copy, straight into the object returned
            return None

        out: list[bytes | StoreError] = []
        for i, res in enumerate(self._read_batch(keys, dest, op, grab)):
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
        parts = [self._dest_part(buffer, size)]  # (one part: no parts list to plan)
        (res,) = self._read_batch([key], lambda i, size: _fit(key, parts, size), "get_into")
        if isinstance(res, StoreError):
            raise res
        return res

    def _dest_part(self, buffer: Any, size: int | None) -> Part:
        """Caller memory to read into: host bytes, or device memory (a device
        pointer, a CUDA tensor, a DeviceSpan) that the engine fills directly."""
        if isinstance(buffer, tuple):
            buffer, size = buffer
        return self.engine.local_span(buffer, size, writable=True)

    def get_many_into(
        self, keys: Sequence[str], dests: Sequence[Sequence[Any]]
    ) -> list[int | StoreError]:
        """Read each key into its destination parts (filled in order); results are
        byte counts or errors."""
        return self._get_many_into(keys, dests, "batch_get_into")

    def _get_many_into(
        self, keys: Sequence[str], dests: Sequence[Sequence[Any]], op: str
    ) -> list[int | StoreError]:
        if len(keys) != len(dests):
            raise InvalidParams(f"{len(keys)} keys but {len(dests)} destinations")

        def make_parts() -> list[list[Part]]:
            return self._parts_of(
                dests,
                lambda p: (
                    p if isinstance(p, (memoryview, DeviceSpan)) else self._dest_part(p, None)
                ),
            )

        direct = self._pointer_region(dests)
        if direct is None:
            parts = make_parts()
            return self._read_batch(keys, lambda i, size: _fit(keys[i], parts[i], size), op)
        lazy: list[list[list[Part]]] = []  # the views, made only if the general path runs

        def fit(i: int, size: int) -> Parts | StoreError:
            if not lazy:
                lazy.append(make_parts())
            return _fit(keys[i], lazy[0][i], size)

        return self._read_batch(keys, fit, op, direct=direct)

    def get_many_alloc(
        self, keys: Sequence[str], alloc: Callable[[int, int], Any]
    ) -> list[Any | StoreError]:
        """Read each object into a buffer obtained from ``alloc(i, size)``.

        ``alloc`` returns a writable buffer of exactly ``size`` bytes (a numpy
        array, bytearray ...); it is called once the object's size is known,
        so the bytes land in it straight from the replica (no staging, no
        local_buffer_size bound).  Results per key: that buffer, or the error.
        """
        held: dict[int, Any] = {}

        def dest(i: int, size: int) -> Parts | StoreError:
            buf = alloc(i, size)
            view = memoryview(buf).cast("B")
            if len(view) != size or view.readonly:
                return store_error(
                    int(ErrorCode.INVALID_PARAMS),
                    f"{keys[i]!r}: alloc({size}) returned a {len(view)}-byte or read-only buffer",
                )
            held[i] = buf
            return [view]

        return [
            r if isinstance(r, StoreError) else held[i]
            for i, r in enumerate(self._read_batch(keys, dest))
        ]

    def locate(self, keys: Sequence[str]) -> list[ObjectLocation | StoreError]:
        """Replica locations of many keys in one RPC; each granted a read lease."""
        self._check_open()
        found, t0 = self._query(keys)
        out: list[ObjectLocation | StoreError] = []
        for key, (code, value) in zip(keys, found, strict=True):
            if code != 0:
                out.append(store_error(code, f"{key!r}: {value}"))
            else:
                size, ttl, reps = value
                out.append(
                    ObjectLocation(
                        key,
                        size,
                        tuple(
                            ReplicaDesc(rid, ep, addr, size, _COMPLETE, sid)
                            for ep, addr, sid, rid in reps
                        ),
                        t0 + ttl,
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
        started = time.perf_counter_ns()
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
            errors: list[BaseException | None] = [None] * len(pending)
            picked: dict[int, ReplicaDesc] = {}  # per location, for this attempt
            for n, (i, j) in enumerate(pending):
                rep = picked.get(i)
                if rep is None:
                    rep = picked[i] = self._pick_desc(locations[i].replicas, attempt)
                view, src = ranges[i][j]
                self._route_parts(
                    n, rep.endpoint, rep.address + src, [view], False, per_endpoint, errors
                )
            self._run_transfers(per_endpoint, errors)
            attempt += 1
            retry = []
            for n, (i, j) in enumerate(pending):
                if errors[n] is None:
                    continue
                if attempt < len(locations[i].replicas):
                    retry.append((i, j))
                else:
                    results[i][j] = transfer_failed(
                        f"reading {locations[i].key!r} failed: {errors[n]}", errors[n]
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
        if self.metrics is not None:
            read = sum(r for rs in results for r in rs if not isinstance(r, StoreError))
            latency_us = (time.perf_counter_ns() - started) // 1000
            self.metrics.transfer(False, read, latency_us, True)
            self.metrics.operation(False, "get_into_ranges", read, latency_us)
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

        (res,) = self._read_batch([key], dest, "get_buffer")
        if isinstance(res, StoreError):
            if 0 in got:
                taken_addr, taken_view = got.pop(0)
                taken_view.release()  # the traceback must not pin the local buffer
                self.local.give_back(taken_addr)
            raise res
        addr, view = got[0]
        return make_handle(self.local, addr, len(view))
