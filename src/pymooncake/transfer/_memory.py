"""Registered memory: address ranges <-> memoryviews, and bounds checks.

Theory of operation
-------------------
The reference addresses remote memory by *virtual address* in the target
process.  A registration is therefore a range ``[addr, addr+length)`` of this
process plus a writable ``memoryview`` over exactly those bytes, from which the
transports read and into which they ``recv_into``.

Lookups run on every incoming request, from many threads, so the registry is
copy-on-write: writers build a new immutable snapshot under a lock, readers
use whatever snapshot is current without locking.

Unregistering waits for the transfers that use a region (:meth:`MemoryRegistry.quiesce`):
every thread that touches registered memory on a peer's behalf holds a
:class:`UseSlot` and *pins* the region before it copies (``slot.region =
region``, then checks the region is still registered); unregistering removes
the region first, then waits until no slot holds it, cutting the connections of
slots that do not let go in time.  Pinning costs two attribute stores and a
snapshot comparison -- no lock on the request path.  (CPython's GIL makes the
store/load pairs of both sides sequentially consistent: either the pinning
thread sees the removal, or the unregistering thread sees the pin.)

A view over a raw address is made with ctypes; nothing keeps memory that the
caller frees alive (the same contract as the reference).  Memory we allocate
ourselves (managed buffers) is owned by the region and unmapped when the last
view of it goes away.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ..errors import AddressNotRegistered, AddressOverlapped, InvalidArgument
from ..wire import U64_MAX
from .device._interface import DeviceSpan

if TYPE_CHECKING:
    from .device._interface import DeviceBackend

__all__ = [
    "DEVICE_VIEW",
    "PVM_ARGS",
    "IoVec",
    "MemoryRegistry",
    "Region",
    "UseSlot",
    "address_of",
    "allocate_anonymous",
    "allocate_shared",
    "buffer_address",
    "is_host_memory",
    "pvm_read",
    "pvm_write",
    "view_at",
]


class IoVec(ctypes.Structure):
    """``struct iovec``: one (address, length) of a ``process_vm_readv``/``writev``."""

    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


#: the argument types of ``process_vm_readv``/``writev`` (pid, local iovecs and
#: count, remote iovecs and count, flags)
PVM_ARGS: Final = (
    ctypes.c_int,
    ctypes.POINTER(IoVec),
    ctypes.c_ulong,
    ctypes.POINTER(IoVec),
    ctypes.c_ulong,
    ctypes.c_ulong,
)


def _libc_function(name: str) -> Any:
    """libc's ``name`` typed as a ``process_vm_*`` call (GIL released while it
    runs), or None where libc lacks it."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), name, None)
    if fn is not None:
        fn.argtypes = PVM_ARGS
        fn.restype = ctypes.c_ssize_t
    return fn


#: ``process_vm_readv``/``writev``, or None where libc lacks them
pvm_read: Final[Any] = _libc_function("process_vm_readv")
pvm_write: Final[Any] = _libc_function("process_vm_writev")


def _readable_pvm(addrs: tuple[int, ...]) -> bool | None:
    """Each address readable, asked through process_vm_readv on ourselves; None
    when the call is unavailable (seccomp, old kernel)."""
    if pvm_read is None:
        return None
    probe = ctypes.create_string_buffer(1)
    local = IoVec(ctypes.addressof(probe), 1)
    pid = os.getpid()
    for addr in addrs:
        remote = IoVec(addr, 1)
        if pvm_read(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) != 1:
            err = ctypes.get_errno()
            if err in (errno.ENOSYS, errno.EPERM):
                return None
            return False
    return True


def is_host_memory(addr: int, length: int) -> bool:
    """Whether the first and last byte of ``[addr, addr+length)`` are readable
    memory of this process, asked of the kernel (a bad pointer gives False
    instead of a crash).

    ``process_vm_readv`` honours page protections, so GPU (device) pointers --
    which CUDA reserves as inaccessible (PROT_NONE) host address space -- are
    not host memory.  ``/proc/self/mem`` (the fallback) can read PROT_NONE
    pages, so there it cannot tell.  True when neither is available.
    """
    if length <= 0:
        return True
    if addr <= 0 or addr + length > U64_MAX:
        return False
    got = _readable_pvm((addr, addr + length - 1))
    if got is not None:
        return got
    try:
        fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        return len(os.pread(fd, 1, addr)) == 1 and len(os.pread(fd, 1, addr + length - 1)) == 1
    except (OSError, OverflowError, ValueError):
        return False
    finally:
        os.close(fd)


def view_at(addr: int, length: int) -> memoryview:
    """A writable byte view of ``length`` bytes at raw address ``addr``.

    The caller guarantees the memory is mapped for as long as the view is used.
    """
    if addr <= 0 or length < 0 or addr + length > U64_MAX:
        raise InvalidArgument(f"cannot view {length} bytes at address {addr:#x}")
    if length == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_char * length).from_address(addr)).cast("B")


class _PyBuffer(ctypes.Structure):
    _fields_ = (
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.py_object),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    )


_get_buffer: Any
try:
    _get_buffer = ctypes.pythonapi.PyObject_GetBuffer
    _get_buffer.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
    _get_buffer.restype = ctypes.c_int
    _release_buffer = ctypes.pythonapi.PyBuffer_Release
    _release_buffer.argtypes = (ctypes.POINTER(_PyBuffer),)
    _release_buffer.restype = None
except AttributeError:  # pragma: no cover - not CPython
    _get_buffer = None


def buffer_address(view: memoryview) -> int:
    """Address of the first byte of a contiguous (possibly read-only) buffer.

    Valid while ``view`` (which holds its own export) is alive.
    """
    if not len(view):
        return 0
    if not view.readonly:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    if _get_buffer is None:  # pragma: no cover
        raise InvalidArgument("cannot take the address of a read-only buffer on this Python")
    pb = _PyBuffer()
    if _get_buffer(view, ctypes.byref(pb), 0) != 0:  # PyBUF_SIMPLE
        raise InvalidArgument("buffer does not export a contiguous memory block")
    try:
        return int(pb.buf or 0)
    finally:
        _release_buffer(ctypes.byref(pb))


def address_of(obj: Any) -> tuple[int, int]:
    """Address and byte length of a writable, C-contiguous buffer object.

    Accepts anything exporting the buffer protocol (bytearray, mmap, numpy
    arrays, memoryviews), plus objects with ``data_ptr()`` and ``nbytes``
    (CPU torch tensors).

    Raises:
        InvalidArgument: read-only, non-contiguous, or not a buffer.
    """
    if hasattr(obj, "data_ptr") and hasattr(obj, "nbytes") and not isinstance(obj, memoryview):
        return int(obj.data_ptr()), int(obj.nbytes)
    try:
        mv = memoryview(obj)
    except TypeError:
        raise InvalidArgument(
            f"{type(obj).__name__} is neither a buffer nor an (address, length) pair"
        ) from None
    if mv.readonly:
        raise InvalidArgument(
            f"{type(obj).__name__} is read-only; registered memory must be writable"
        )
    if not mv.c_contiguous:
        raise InvalidArgument(f"{type(obj).__name__} is not C-contiguous")
    if mv.nbytes == 0:
        return 0, 0
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mv))
    return addr, mv.nbytes


def allocate_anonymous(length: int, populate: bool = False) -> tuple[mmap.mmap, memoryview, int]:
    """Page-aligned private anonymous memory: (mapping, byte view, address).

    ``populate`` pre-faults every page (MAP_POPULATE) so that the first
    transfers into it do not pay for page faults (about 1 GB/s on small VMs).
    """
    if length <= 0:
        raise InvalidArgument(f"cannot allocate {length} bytes")
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if populate:
        flags |= getattr(mmap, "MAP_POPULATE", 0)
    mm = mmap.mmap(-1, length, flags=flags)
    view = memoryview(mm)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
    return mm, view, addr


def allocate_shared(
    length: int, populate: bool = False, name: str = "pymooncake"
) -> tuple[mmap.mmap, memoryview, int, int]:
    """Shareable memory: a memfd mapped MAP_SHARED, (mapping, view, address, fd).

    Peers on the same host map the same pages through ``/proc/<pid>/fd/<fd>``,
    so a transfer between processes is one copy.  The fd stays open (it is
    what peers open); close it with ``os.close`` when the region is released.

    Raises:
        OSError: memfd_create is unavailable (the caller falls back to anonymous memory).
    """
    if length <= 0:
        raise InvalidArgument(f"cannot allocate {length} bytes")
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, length)
        flags = mmap.MAP_SHARED
        if populate:
            flags |= getattr(mmap, "MAP_POPULATE", 0)
        mm = mmap.mmap(fd, length, flags=flags)
    except BaseException:
        os.close(fd)
        raise
    view = memoryview(mm)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
    return mm, view, addr, fd


#: in-process copies from this size on use ctypes.memmove, which releases the GIL
#: (below it, slice assignment is cheaper than the ctypes call)
MEMMOVE_FROM: Final = 256 * 1024


def _released_view() -> memoryview:
    view = memoryview(b"")
    view.release()
    return view


#: stands for the bytes of device memory: every use of it raises ValueError
#: ("operation forbidden on released memoryview object"), so a path that reads
#: device memory as if it were host memory fails loudly instead of crashing
DEVICE_VIEW: Final = _released_view()


@dataclass(frozen=True, eq=False)
class Region:
    """One registered range.  ``view`` covers exactly ``[addr, addr+length)``;
    for device memory (``device >= 0``) it is :data:`DEVICE_VIEW` and the bytes
    are reached only through ``backend``.
    """

    addr: int
    length: int
    location: str
    remote_accessible: bool
    view: memoryview = field(repr=False)
    #: keeps owned memory (an mmap, a bytearray ...) alive while registered
    owner: object | None = field(default=None, repr=False)
    managed: bool = False
    #: memfd backing the region (shareable with same-host peers), -1 if none
    fd: int = -1
    #: device ordinal of device (GPU) memory, -1 for host memory
    device: int = -1
    #: the backend that reaches device memory (None for host memory)
    backend: DeviceBackend | None = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.addr + self.length

    def slice(self, addr: int, length: int) -> memoryview:
        off = addr - self.addr
        return self.view[off : off + length]

    def copy(self, addr: int, view: memoryview | DeviceSpan, write: bool) -> None:
        """Copy between ``view`` and ``[addr, addr + len(view))`` of this region
        (``write``: into the region); the caller has checked the range.  Large
        copies use memmove, which runs without the GIL; device memory on either
        side is copied by its backend."""
        if self.backend is not None or isinstance(view, DeviceSpan):
            self._device_copy(addr, view, write)
            return
        n = len(view)
        if n >= MEMMOVE_FROM:
            local = buffer_address(view)
            if write:
                ctypes.memmove(addr, local, n)
            else:
                ctypes.memmove(local, addr, n)
        elif write:
            self.slice(addr, n)[:] = view
        else:
            view[:] = self.slice(addr, n)

    def _device_copy(self, addr: int, local: memoryview | DeviceSpan, write: bool) -> None:
        n = len(local)
        if not n:
            return
        if isinstance(local, DeviceSpan):
            backend, laddr = local.backend, local.addr
        else:
            assert self.backend is not None
            backend, laddr = self.backend, buffer_address(local)
        if write:
            backend.copy(addr, laddr, n)
        else:
            backend.copy(laddr, addr, n)


log = logging.getLogger("pymooncake.memory")


class UseSlot:
    """One thread's (or connection's) claim on the region it is copying to/from.

    ``region`` is set by :meth:`MemoryRegistry.pin` and cleared by the holder
    once no byte of that region is in use any more (payload received, reply
    sent).  ``abort`` (optional) cuts what the holder is blocked on -- e.g.
    shuts its connection down -- when an unregister cannot wait longer.
    """

    __slots__ = ("abort", "region")

    def __init__(self, abort: Callable[[], None] | None = None) -> None:
        self.region: Region | None = None
        self.abort = abort


@dataclass(frozen=True)
class _Snapshot:
    starts: tuple[int, ...] = ()
    regions: tuple[Region, ...] = ()  # sorted by addr
    ordered: tuple[Region, ...] = ()  # registration order (descriptor order)


class MemoryRegistry:
    """Thread-safe set of non-overlapping registered regions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snap = _Snapshot()
        #: the last region find() returned, as (start, end, region, snapshot): most
        #: lookups of a batch fall in the region of the one before (valid while
        #: that snapshot is current)
        self._last: tuple[int, int, Region, _Snapshot] | None = None
        self._slots: set[UseSlot] = set()

    # --- queries (lock-free) -----------------------------------------------

    def regions(self) -> tuple[Region, ...]:
        """Registered regions in registration order."""
        return self._snap.ordered

    def find(self, addr: int, length: int) -> Region | None:
        """The region wholly containing ``[addr, addr+length)``, or None."""
        snap = self._snap
        last = self._last
        if last is not None and last[0] <= addr and addr + length <= last[1] and last[3] is snap:
            return last[2]
        i = bisect.bisect_right(snap.starts, addr) - 1
        if i < 0:
            return None
        region = snap.regions[i]
        end = region.addr + region.length
        if addr + length > end:
            return None
        self._last = (region.addr, end, region, snap)
        return region

    def find_remote(self, addr: int, length: int) -> Region | None:
        """Like :meth:`find`, for requests from peers: also requires
        ``length > 0``, no 64-bit overflow and a remote-accessible region."""
        if length <= 0 or addr < 0 or addr + length > U64_MAX:
            return None
        region = self.find(addr, length)
        return region if region is not None and region.remote_accessible else None

    def window(self, *, remote: bool) -> Callable[[int, int], memoryview | None]:
        """``view(addr, n)`` for a batch of lookups: a view of ``[addr, +n)`` in a
        registered host region (``remote``: remote-accessible ones only, as
        :meth:`find_remote`), or None -- not registered, device memory, ``n <= 0``.
        The region found for one lookup serves the next ones it covers while no
        registration changes: one search per region, not per lookup."""
        lo = hi = 0
        view: memoryview | None = None
        snap = self._snap
        find = self.find_remote if remote else self.find

        def lookup(addr: int, n: int) -> memoryview | None:
            nonlocal lo, hi, view, snap
            if view is None or self._snap is not snap or not (lo <= addr and addr + n <= hi):
                snap = self._snap
                region = find(addr, n)
                if region is None or region.backend is not None:
                    return None
                lo, hi, view = region.addr, region.addr + region.length, region.view
            return view[addr - lo : addr - lo + n] if n > 0 else None

        return lookup

    def copier(self) -> Callable[[int, memoryview | DeviceSpan, bool], bool]:
        """``copy(addr, part, write)`` for a batch of copies between local parts and
        remote-accessible registered memory (``write``: into ``[addr, +len(part))``),
        as :meth:`find_remote` then :meth:`Region.copy`; False (nothing copied)
        when the range is not registered.  Small host copies go through one
        :meth:`window` (one region search per region, not per copy)."""
        window = self.window(remote=True)
        find = self.find_remote

        def copy(addr: int, part: memoryview | DeviceSpan, write: bool) -> bool:
            n = len(part)
            if type(part) is memoryview and n < MEMMOVE_FROM:
                target = window(addr, n)
                if target is not None:
                    if write:
                        target[:] = part
                    else:
                        part[:] = target
                    return True
            region = find(addr, n)  # device memory, large copies, or not registered
            if region is None:
                return False
            region.copy(addr, part, write)
            return True

        return copy

    # --- pins (see the module docstring) ------------------------------------------

    def new_slot(self, abort: Callable[[], None] | None = None) -> UseSlot:
        """A slot that :meth:`quiesce` watches; :meth:`drop_slot` it when done."""
        slot = UseSlot(abort)
        with self._lock:
            self._slots.add(slot)
        return slot

    def drop_slot(self, slot: UseSlot) -> None:
        slot.region = None
        with self._lock:
            self._slots.discard(slot)

    def pin(self, slot: UseSlot, addr: int, length: int) -> Region | None:
        """:meth:`find_remote`, and claim the region in ``slot`` until the caller
        clears ``slot.region``; None (nothing claimed) if it is not registered."""
        if length <= 0 or addr < 0 or addr + length > U64_MAX:
            return None
        snap = self._snap
        i = bisect.bisect_right(snap.starts, addr) - 1
        if i < 0:
            return None
        region = snap.regions[i]
        if addr + length > region.end or not region.remote_accessible:
            return None
        slot.region = region
        if self._snap is not snap and self.find(addr, length) is not region:
            slot.region = None  # unregistered between the lookup and the claim
            return None
        return region

    def quiesce(self, region: Region, *, drain_s: float, what: str = "") -> int:
        """Wait until no slot holds ``region`` (call after :meth:`remove`).

        In-flight requests get ``drain_s`` to finish; the slots still holding
        the region then have their ``abort`` called (their connections are cut)
        and are waited for again.

        Returns:
            How many slots had to be aborted.
        """
        deadline = time.monotonic() + drain_s
        aborted: set[UseSlot] = set()
        delay = 0.0005
        while True:
            with self._lock:
                holders = [s for s in self._slots if s.region is region]
            if not holders:
                return len(aborted)
            now = time.monotonic()
            if now >= deadline:
                for slot in holders:
                    if slot not in aborted and slot.abort is not None:
                        aborted.add(slot)
                        slot.abort()
                if now >= deadline + 10.0:
                    log.error(
                        "unregister %s: %d transfer(s) still use [%#x, +%d) after their "
                        "connections were cut; continuing (a thread is stuck in a copy)",
                        what,
                        len(holders),
                        region.addr,
                        region.length,
                    )
                    return len(aborted)
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def resolve(self, addr: int, length: int) -> memoryview:
        """View of registered bytes.

        Raises:
            AddressNotRegistered: the range is not inside one registered region.
        """
        region = self.find(addr, length)
        if region is None:
            raise AddressNotRegistered(
                f"address range [{addr:#x}, +{length}) is not inside one registered buffer; "
                "register it first (register_memory) or check the address arithmetic"
            )
        return region.slice(addr, length)

    # --- updates ---------------------------------------------------------------

    def add(self, region: Region) -> Region:
        """Insert a region.

        Raises:
            InvalidArgument: zero length or address.
            AddressOverlapped: it overlaps a registered region.
        """
        if region.length <= 0 or region.addr <= 0:
            raise InvalidArgument(
                f"cannot register {region.length} bytes at {region.addr:#x}: "
                "address and length must be positive"
            )
        with self._lock:
            snap = self._snap
            i = bisect.bisect_right(snap.starts, region.addr)
            neighbours = []
            if i > 0:
                neighbours.append(snap.regions[i - 1])
            if i < len(snap.regions):
                neighbours.append(snap.regions[i])
            for other in neighbours:
                if region.addr < other.end and other.addr < region.end:
                    raise AddressOverlapped(
                        f"buffer [{region.addr:#x}, +{region.length}) overlaps the registered "
                        f"buffer [{other.addr:#x}, +{other.length}); Transfer Engine does not "
                        "support overlapped memory regions: unregister the old one first or "
                        "register the union once"
                    )
            regions = (*snap.regions[:i], region, *snap.regions[i:])
            self._snap = _Snapshot(tuple(r.addr for r in regions), regions, (*snap.ordered, region))
        return region

    def remove(self, addr: int) -> Region:
        """Remove the region starting exactly at ``addr``.

        Raises:
            AddressNotRegistered: no region starts there.
        """
        with self._lock:
            snap = self._snap
            i = bisect.bisect_left(snap.starts, addr)
            if i >= len(snap.starts) or snap.starts[i] != addr:
                raise AddressNotRegistered(
                    f"no registered buffer starts at {addr:#x}; unregister with the same "
                    "address that was registered"
                )
            region = snap.regions[i]
            regions = snap.regions[:i] + snap.regions[i + 1 :]
            self._snap = _Snapshot(
                tuple(r.addr for r in regions),
                regions,
                tuple(r for r in snap.ordered if r is not region),
            )
        return region

    def clear(self) -> tuple[Region, ...]:
        with self._lock:
            old = self._snap.ordered
            self._snap = _Snapshot()
        return old
