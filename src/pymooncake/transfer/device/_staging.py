"""Staging device memory through pinned host buffers, copy and I/O overlapped.

Theory of operation
-------------------
A transport that moves host bytes (TCP) cannot read or write device memory.
Device bytes therefore pass through a *lane*: two pinned host buffers (memfd
mappings, ``host_register``-ed), one stream and one event per buffer.  Work
is cut into chunks of ``chunk_bytes`` that alternate between the two buffers
(double buffering):

* device -> wire (an initiator's WRITE, a target's READ reply): the copy of
  chunk k+1 into one buffer is queued before chunk k, already in the other
  buffer, is sent; the GPU's DMA engine copies while the thread is in
  ``sendmsg``.
* wire -> device (an initiator's READ, a target's WRITE): chunk k is received
  into one buffer while the copy of chunk k-1 from the other buffer runs;
  before a buffer is received into again, the copy out of it is waited for.

Small requests are packed: one chunk carries pieces of many requests, each
sent as its own request on the wire (the peer sees ordinary TCP requests), so
a batch of small KV blocks costs a few copies per chunk, not a copy and a
round trip each.  A request that spans chunks completes when its last piece
did; it fails with the first failure of any piece.

Lanes are pooled per device (registering pinned memory is slow); the engine
owns the pool and closes it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from ..._logging import RepeatLimiter
from ...errors import DeviceError, TransferTimeout
from .._memory import allocate_shared
from ..transports._base import Peer, Slice, SliceCallback
from ._interface import DeviceBackend, DeviceEvent, DeviceStream

__all__ = ["DEFAULT_CHUNK_BYTES", "PinnedBuffer", "StagingLane", "StagingPool", "stage_slices"]

log = logging.getLogger("pymooncake.device")

#: 4 MiB chunks: large enough that per-chunk overhead (tens of microseconds of
#: Python and driver calls) is below 1% at 55 GB/s, small enough that two per
#: lane and a few lanes per device stay cheap to pin
DEFAULT_CHUNK_BYTES: Final = 4 << 20
#: idle lanes kept per device
_MAX_IDLE: Final = 4
_notes = RepeatLimiter(log)

Execute = Callable[[Peer, Sequence[Slice], float, SliceCallback], None]


class PinnedBuffer:
    """``nbytes`` of memfd-backed host memory, page-locked for asynchronous copies.

    If the driver refuses to pin (memlock limits), the buffer still works: the
    copies then run synchronously, which one log line reports.
    """

    __slots__ = ("_backend", "_fd", "_mm", "addr", "nbytes", "pinned", "view")

    def __init__(self, backend: DeviceBackend, nbytes: int) -> None:
        mm, view, addr, fd = allocate_shared(nbytes, populate=True, name="pymooncake-staging")
        self._backend = backend
        self._mm, self._fd = mm, fd
        self.view, self.addr, self.nbytes = view, addr, nbytes
        try:
            backend.host_register(addr, nbytes)
            self.pinned = True
        except DeviceError as exc:
            self.pinned = False
            _notes(
                "pin",
                logging.WARNING,
                "cannot pin a %d-byte staging buffer (%s): device copies through it run "
                "synchronously (raise the memlock limit, ulimit -l)",
                nbytes,
                exc,
            )

    def close(self) -> None:
        if self.pinned:
            self.pinned = False
            try:
                self._backend.host_unregister(self.addr)
            except DeviceError as exc:  # pragma: no cover - driver torn down first
                log.debug("host_unregister of a staging buffer failed: %s", exc)
        self.view.release()
        self._mm.close()
        os.close(self._fd)


class StagingLane:
    """Two pinned buffers, a stream and an event per buffer, on one device."""

    def __init__(self, backend: DeviceBackend, device: int, chunk_bytes: int) -> None:
        self.device = device
        self.chunk = chunk_bytes
        self.buffers: tuple[PinnedBuffer, ...] = ()
        self.events: tuple[DeviceEvent, ...] = ()
        self.stream: DeviceStream | None = None
        try:
            self.buffers = (PinnedBuffer(backend, chunk_bytes), PinnedBuffer(backend, chunk_bytes))
            self.stream = backend.stream(device)
            self.events = (backend.event(device), backend.event(device))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.stream is not None:
            try:
                self.stream.close()  # waits for queued copies first
            finally:
                self.stream = None
        for e in self.events:
            e.close()
        for b in self.buffers:
            b.close()
        self.events = ()
        self.buffers = ()


class StagingPool:
    """Lanes per device, lent out one at a time to a transfer or a served request."""

    def __init__(self, backend: DeviceBackend, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.backend = backend
        self.chunk_bytes = chunk_bytes
        self._lock = threading.Lock()
        self._idle: dict[int, list[StagingLane]] = {}
        self._closed = False
        self.lanes_made = 0

    def acquire(self, device: int) -> StagingLane:
        with self._lock:
            idle = self._idle.get(device)
            if idle:
                return idle.pop()
            self.lanes_made += 1
        return StagingLane(self.backend, device, self.chunk_bytes)

    def release(self, lane: StagingLane) -> None:
        with self._lock:
            if not self._closed:
                idle = self._idle.setdefault(lane.device, [])
                if len(idle) < _MAX_IDLE:
                    idle.append(lane)
                    return
        lane.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            lanes = [lane for idle in self._idle.values() for lane in idle]
            self._idle.clear()
        for lane in lanes:
            lane.close()


# --------------------------------------------------------------------------------
# target side: one request of a peer, into or out of a device region
# --------------------------------------------------------------------------------


def receive_to_device(
    pool: StagingPool, device: int, dst: int, size: int, readinto: Callable[[memoryview], None]
) -> None:
    """Fill device memory ``[dst, dst + size)`` from ``readinto`` (a socket), staged.

    Returns once the bytes are in device memory.

    Raises:
        OSError / ConnectionError: from ``readinto``.
        DeviceError: a copy failed (the rest of the payload is not consumed).
    """
    lane = pool.acquire(device)
    stream = lane.stream
    assert stream is not None
    try:
        off = k = 0
        chunk = lane.chunk
        while off < size:
            n = min(chunk, size - off)
            buf = lane.buffers[k & 1]
            if k >= 2:
                lane.events[k & 1].wait()  # the copy out of this buffer (chunk k-2) is done
            readinto(buf.view[:n])
            stream.copy_async(dst + off, buf.addr, n)
            stream.record(lane.events[k & 1])
            off += n
            k += 1
    finally:
        stream.synchronize()
        pool.release(lane)


def send_from_device(
    pool: StagingPool, device: int, src: int, size: int, send: Callable[[memoryview], object]
) -> None:
    """Pass device memory ``[src, src + size)`` to ``send`` (a socket) chunk by chunk, staged.

    ``send`` must have finished with the view when it returns.

    Raises:
        OSError: from ``send``.
        DeviceError: a copy failed.
    """
    lane = pool.acquire(device)
    stream = lane.stream
    assert stream is not None
    chunk = lane.chunk
    try:
        count = (size + chunk - 1) // chunk

        def stage(k: int) -> None:
            off = k * chunk
            stream.copy_async(lane.buffers[k & 1].addr, src + off, min(chunk, size - off))
            stream.record(lane.events[k & 1])

        stage(0)
        for k in range(count):
            if k + 1 < count:
                stage(k + 1)  # its buffer's previous chunk (k-1) was already sent
            lane.events[k & 1].wait()
            send(lane.buffers[k & 1].view[: min(chunk, size - k * chunk)])
    finally:
        stream.synchronize()
        pool.release(lane)


# --------------------------------------------------------------------------------
# initiator side: device slices through a host-only transport
# --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Piece:
    slice: Slice
    offset: int  # into the slice
    n: int
    at: int  # offset in the chunk's buffer


class _Tracker:
    """Completion of slices cut into pieces: each reports once, after its last piece."""

    def __init__(self, on_done: SliceCallback) -> None:
        self._on_done = on_done
        self._left: dict[int, int] = {}
        self._error: dict[int, BaseException] = {}

    def expect(self, s: Slice, pieces: int) -> None:
        self._left[id(s)] = pieces

    def piece_done(self, s: Slice, err: BaseException | None) -> None:
        key = id(s)
        if err is not None and key not in self._error:
            self._error[key] = err
        self._left[key] -= 1
        if not self._left[key]:
            del self._left[key]
            self._on_done(s, self._error.pop(key, None))


def _pack(slices: Sequence[Slice], chunk: int, tracker: _Tracker) -> list[list[_Piece]]:
    chunks: list[list[_Piece]] = []
    current: list[_Piece] = []
    used = 0
    for s in slices:
        off, length, pieces = 0, s.length, 0
        while off < length:
            if used == chunk:
                chunks.append(current)
                current, used = [], 0
            n = min(chunk - used, length - off)
            current.append(_Piece(s, off, n, used))
            used += n
            off += n
            pieces += 1
        tracker.expect(s, pieces)
    if current:
        chunks.append(current)
    return chunks


def _host_slices(pieces: list[_Piece], view: memoryview, is_write: bool) -> list[Slice]:
    return [
        Slice(i, is_write, view[p.at : p.at + p.n], p.slice.remote_addr + p.offset)
        for i, p in enumerate(pieces)
    ]


def stage_slices(
    pool: StagingPool,
    execute: Execute,
    peer: Peer,
    slices: Sequence[Slice],
    deadline: float,
    on_done: SliceCallback,
) -> None:
    """Run device slices (``s.device`` set) of one device through ``execute``, a
    host-memory transport, staged.  Every slice is reported once via ``on_done``.
    """
    if not slices:
        return
    device = slices[0].device
    assert device is not None
    tracker = _Tracker(on_done)
    writes = [s for s in slices if s.is_write]
    reads = [s for s in slices if not s.is_write]
    try:
        lane = pool.acquire(device.device)
    except DeviceError as exc:
        for s in slices:
            on_done(s, exc)
        return
    try:
        if writes:
            _stage_writes(
                lane, execute, peer, _pack(writes, lane.chunk, tracker), deadline, tracker
            )
        if reads:
            _stage_reads(lane, execute, peer, _pack(reads, lane.chunk, tracker), deadline, tracker)
    finally:
        pool.release(lane)


def _fail_rest(chunks: list[list[_Piece]], k: int, err: BaseException, tracker: _Tracker) -> None:
    for pieces in chunks[k:]:
        for p in pieces:
            tracker.piece_done(p.slice, err)


def _timeout(peer: Peer) -> TransferTimeout:
    return TransferTimeout(
        f"staged device transfer with segment {peer.name!r} ran past its deadline "
        "(MC_TRANSFER_TIMEOUT); the peer or the network is too slow for this size"
    )


def _stage_writes(
    lane: StagingLane,
    execute: Execute,
    peer: Peer,
    chunks: list[list[_Piece]],
    deadline: float,
    tracker: _Tracker,
) -> None:
    stream = lane.stream
    assert stream is not None

    def stage(k: int) -> None:
        buf = lane.buffers[k & 1]
        for p in chunks[k]:
            dev = p.slice.device
            assert dev is not None
            stream.copy_async(buf.addr + p.at, dev.addr + p.offset, p.n)
        stream.record(lane.events[k & 1])

    k = 0
    try:
        stage(0)
        for k in range(len(chunks)):
            if k + 1 < len(chunks):
                stage(k + 1)  # overlaps with sending chunk k; its buffer's chunk k-1 is sent
            lane.events[k & 1].wait()
            if time.monotonic() > deadline:
                raise _timeout(peer)
            pieces = chunks[k]

            def done(s: Slice, err: BaseException | None, pieces: list[_Piece] = pieces) -> None:
                tracker.piece_done(pieces[s.index].slice, err)

            execute(peer, _host_slices(pieces, lane.buffers[k & 1].view, True), deadline, done)
    except (DeviceError, TransferTimeout) as exc:
        stream.synchronize()
        _fail_rest(chunks, k, exc, tracker)


def _stage_reads(
    lane: StagingLane,
    execute: Execute,
    peer: Peer,
    chunks: list[list[_Piece]],
    deadline: float,
    tracker: _Tracker,
) -> None:
    stream = lane.stream
    assert stream is not None
    # pieces whose bytes were received, waiting for their copy to the device
    landed: list[list[tuple[_Piece, BaseException | None]]] = [[], []]

    def settle(slot: int) -> None:
        lane.events[slot].wait()
        for p, err in landed[slot]:
            tracker.piece_done(p.slice, err)
        landed[slot] = []

    accounted = 0  # chunks whose pieces were received (or failed) and sit in `landed`
    try:
        for k in range(len(chunks)):
            slot = k & 1
            if k >= 2:
                settle(slot)  # chunk k-2's copy out of this buffer finished
            if time.monotonic() > deadline:
                raise _timeout(peer)
            pieces = chunks[k]
            buf = lane.buffers[slot]
            results: list[BaseException | None] = [None] * len(pieces)

            def done(
                s: Slice, err: BaseException | None, results: list[BaseException | None] = results
            ) -> None:
                results[s.index] = err

            execute(peer, _host_slices(pieces, buf.view, False), deadline, done)
            landed[slot].extend(zip(pieces, results, strict=True))
            accounted = k + 1
            for p, err in zip(pieces, results, strict=True):
                if err is None:
                    dev = p.slice.device
                    assert dev is not None
                    stream.copy_async(dev.addr + p.offset, buf.addr + p.at, p.n)
            stream.record(lane.events[slot])
        last = len(chunks) - 1
        for slot in ((last + 1) & 1, last & 1):  # chunk last-1, then the last one
            settle(slot)
    except (DeviceError, TransferTimeout) as exc:
        stream.synchronize()
        for slot in (0, 1):
            for p, _ in landed[slot]:
                tracker.piece_done(p.slice, exc)
            landed[slot] = []
        _fail_rest(chunks, accounted, exc, tracker)
