"""A fake device for CPU-only tests: device memory that only the interface can reach.

Theory of operation
-------------------
"Device" pointers live at ``0x0F00_0000_0000_0000`` and above -- beyond the
user address space of any x86-64 or arm64 process -- so nothing is mapped
there: ``/proc/self/mem`` and ``process_vm_readv`` fail on them and a ctypes
view would crash.  The bytes behind each allocation are a memfd mapped
somewhere else, known only to this module, so a code path that forgets to
stage through :class:`~pymooncake.transfer.device.DeviceBackend` fails loudly
instead of passing by luck.

It mimics the CUDA driver's contracts where they matter to the engine:

* asynchronous copies need *pinned* (``host_register``-ed) host memory, and
  they run *lazily*: a stream executes its queued copies only when an event
  recorded after them is waited for (or the stream synchronized).  A path
  that reads a staging buffer without waiting reads stale bytes, and the
  tests see it;
* IPC handles are opaque 64-byte values that another *process* can open (the
  memfd is reached through ``/proc/<pid>/fd``); opening one's own handle fails
  as it does with CUDA; an opened allocation gets a different address in the
  opener;
* two devices (``cuda:0``, ``cuda:1``) with disjoint address ranges.

``stats`` counts operations, so tests can tell which path moved the bytes.
"""

from __future__ import annotations

import bisect
import collections
import ctypes
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from typing import ClassVar, Final

from ...errors import DeviceError
from ._interface import IPC_HANDLE_BYTES, DeviceBackend, DeviceEvent, DeviceStream, IpcHandle

__all__ = ["FAKE_BASE", "FakeDevice"]

#: first fake device address (above 2**56, the largest user address space)
FAKE_BASE: Final = 0x0F00_0000_0000_0000
#: address range per device
_STRIDE: Final = 1 << 44
#: allocations are aligned like CUDA's (2 MiB) and never adjacent, so an
#: overrun past one allocation hits unmapped fake space, not its neighbour
_ALIGN: Final = 2 << 20
_HANDLE: Final = struct.Struct("<8siiQQQ")  # magic, pid, fd, inode, size, device
_MAGIC: Final = b"PMCFAKE1"


@dataclass
class _Alloc:
    base: int
    size: int
    device: int
    mm: mmap.mmap
    backing: int
    fd: int  # -1 for mappings opened from a peer's handle
    handle: bytes = b""
    users: int = 1

    @property
    def end(self) -> int:
        return self.base + self.size


def _map_memfd(fd: int, size: int) -> tuple[mmap.mmap, int]:
    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    return mm, addr


class _FakeEvent(DeviceEvent):
    def __init__(self, device: int) -> None:
        self.device = device
        self._stream: _FakeStream | None = None
        self._position = 0

    def _mark(self, stream: _FakeStream, position: int) -> None:
        self._stream, self._position = stream, position

    def wait(self) -> None:
        if self._stream is not None:
            self._stream._run_until(self._position)

    def query(self) -> bool:
        self.wait()  # lazy streams run on demand; asking is demanding
        return True

    def close(self) -> None:
        self._stream = None


class _FakeStream(DeviceStream):
    def __init__(self, owner: FakeDevice, device: int) -> None:
        self.device = device
        self._owner = owner
        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[int, int, int]] = collections.deque()
        self._queued = 0  # copies ever queued
        self._ran = 0  # copies ever run
        self._closed = False

    def copy_async(self, dst: int, src: int, n: int) -> None:
        if self._closed:
            raise DeviceError("copy_async on a closed stream")
        owner = self._owner
        dst_dev, src_dev = owner._is_fake(dst), owner._is_fake(src)
        if not (dst_dev or src_dev):
            raise DeviceError(
                f"copy_async between two host addresses ({dst:#x} <- {src:#x}): a stream copy "
                "needs device memory on one side"
            )
        for addr, is_dev in ((dst, dst_dev), (src, src_dev)):
            if not is_dev:
                owner._check_pinned(addr, n)
        dst_b, src_b = owner._backing(dst, n), owner._backing(src, n)
        with self._lock:
            self._queue.append((dst_b, src_b, n))
            self._queued += 1
        owner.stats["copy_async"] += 1
        owner.stats["bytes_async"] += n

    def record(self, event: DeviceEvent) -> None:
        if not isinstance(event, _FakeEvent):
            raise DeviceError("event of another backend recorded on a fake stream")
        with self._lock:
            event._mark(self, self._queued)

    def _run_until(self, position: int) -> None:
        with self._lock:
            while self._ran < position and self._queue:
                dst, src, n = self._queue.popleft()
                ctypes.memmove(dst, src, n)
                self._ran += 1

    def synchronize(self) -> None:
        self._run_until(self._queued)

    def close(self) -> None:
        if not self._closed:
            self.synchronize()
            self._closed = True


class FakeDevice(DeviceBackend):
    """Two fake GPUs backed by memfds; see the module docstring."""

    name: ClassVar[str] = "fake"
    real: ClassVar[bool] = False

    def __init__(self, devices: int = 2) -> None:
        self._devices = devices
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._allocs: list[_Alloc] = []
        self._next = [FAKE_BASE + d * _STRIDE for d in range(devices)]
        self._pinned_starts: list[int] = []
        self._pinned: list[tuple[int, int]] = []
        self._opened: dict[bytes, _Alloc] = {}
        self.stats: collections.Counter[str] = collections.Counter()

    # --- queries -------------------------------------------------------------------

    def describe(self) -> str:
        return (
            f"fake device ({self._devices} devices; host memory reachable only through the "
            "device interface; no GPU is measured)"
        )

    def device_count(self) -> int:
        return self._devices

    def _is_fake(self, addr: int) -> bool:
        return FAKE_BASE <= addr < FAKE_BASE + self._devices * _STRIDE

    def _find(self, addr: int) -> _Alloc | None:
        with self._lock:
            i = bisect.bisect_right(self._starts, addr) - 1
            if i >= 0 and addr < self._allocs[i].end:
                return self._allocs[i]
        return None

    def pointer_device(self, addr: int) -> int | None:
        alloc = self._find(addr) if self._is_fake(addr) else None
        return None if alloc is None else alloc.device

    def allocation_range(self, addr: int) -> tuple[int, int]:
        alloc = self._find(addr)
        if alloc is None:
            raise DeviceError(f"{addr:#x} is not fake device memory (CUDA_ERROR_NOT_FOUND)")
        return alloc.base, alloc.size

    def _backing(self, addr: int, n: int) -> int:
        """Where the bytes of ``[addr, addr + n)`` really are (host addresses pass through)."""
        if not self._is_fake(addr):
            return addr
        alloc = self._find(addr)
        if alloc is None or addr + n > alloc.end:
            raise DeviceError(
                f"fake device range [{addr:#x}, +{n}) is not inside one allocation "
                "(CUDA_ERROR_INVALID_VALUE: an out-of-bounds device address)"
            )
        return alloc.backing + (addr - alloc.base)

    def _check_pinned(self, addr: int, n: int) -> None:
        with self._lock:
            i = bisect.bisect_right(self._pinned_starts, addr) - 1
            ok = i >= 0 and addr + n <= self._pinned[i][0] + self._pinned[i][1]
        if not ok:
            raise DeviceError(
                f"asynchronous copy with pageable host memory [{addr:#x}, +{n}): stage it through "
                "host_register-ed (pinned) buffers, or the copy is neither asynchronous nor fast"
            )

    # --- copies --------------------------------------------------------------------

    def copy(self, dst: int, src: int, n: int) -> None:
        if n <= 0:
            return
        dst_b, src_b = self._backing(dst, n), self._backing(src, n)
        ctypes.memmove(dst_b, src_b, n)
        kind = ("d" if self._is_fake(src) else "h") + "2" + ("d" if self._is_fake(dst) else "h")
        self.stats[kind] += 1  # h2d, d2h, d2d (h2h: a caller used the device path for host memory)
        self.stats["bytes_sync"] += n

    def stream(self, device: int) -> DeviceStream:
        self._check_device(device)
        self.stats["streams"] += 1
        return _FakeStream(self, device)

    def event(self, device: int) -> DeviceEvent:
        self._check_device(device)
        return _FakeEvent(device)

    def _check_device(self, device: int) -> None:
        if not 0 <= device < self._devices:
            raise DeviceError(
                f"fake device {device} does not exist ({self._devices} devices: "
                f"cuda:0..cuda:{self._devices - 1})"
            )

    # --- pinning -------------------------------------------------------------------

    def host_register(self, addr: int, n: int) -> None:
        if self._is_fake(addr):
            raise DeviceError(f"host_register of device address {addr:#x}")
        with self._lock:
            i = bisect.bisect_right(self._pinned_starts, addr)
            for j in (i - 1, i):
                if 0 <= j < len(self._pinned):
                    a, m = self._pinned[j]
                    if addr < a + m and a < addr + n:
                        raise DeviceError(
                            f"host range [{addr:#x}, +{n}) is already registered "
                            "(CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED)"
                        )
            self._pinned_starts.insert(i, addr)
            self._pinned.insert(i, (addr, n))
        self.stats["host_register"] += 1

    def host_unregister(self, addr: int) -> None:
        with self._lock:
            i = bisect.bisect_left(self._pinned_starts, addr)
            if i >= len(self._pinned_starts) or self._pinned_starts[i] != addr:
                raise DeviceError(
                    f"{addr:#x} was not host_register-ed (CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED)"
                )
            del self._pinned_starts[i]
            del self._pinned[i]

    # --- allocation and IPC ----------------------------------------------------------

    def _insert(self, alloc: _Alloc) -> None:
        i = bisect.bisect_right(self._starts, alloc.base)
        self._starts.insert(i, alloc.base)
        self._allocs.insert(i, alloc)

    def _reserve(self, device: int, n: int) -> int:
        base = self._next[device]
        span = (n + _ALIGN - 1) // _ALIGN * _ALIGN + _ALIGN  # + a gap
        if base + span > FAKE_BASE + (device + 1) * _STRIDE:
            raise DeviceError(f"fake device {device} is out of address space")
        self._next[device] = base + span
        return base

    def alloc(self, n: int, device: int = 0) -> int:
        self._check_device(device)
        if n <= 0:
            raise DeviceError(f"cannot allocate {n} bytes of device memory")
        fd = os.memfd_create(f"pymooncake-fake-cuda{device}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, n)
            mm, backing = _map_memfd(fd, n)
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            base = self._reserve(device, n)
            self._insert(_Alloc(base, n, device, mm, backing, fd))
        self.stats["alloc"] += 1
        return base

    def _remove(self, alloc: _Alloc) -> None:
        with self._lock:
            i = self._allocs.index(alloc)
            del self._allocs[i]
            del self._starts[i]
        try:
            alloc.mm.close()
        except BufferError:  # pragma: no cover - a view escaped; the GC unmaps later
            pass
        if alloc.fd >= 0:
            os.close(alloc.fd)

    def free(self, addr: int) -> None:
        alloc = self._find(addr)
        if alloc is None or alloc.base != addr or alloc.fd < 0:
            raise DeviceError(f"{addr:#x} is not the start of a fake device allocation")
        self._remove(alloc)

    def ipc_export(self, addr: int) -> IpcHandle:
        alloc = self._find(addr)
        if alloc is None or alloc.fd < 0:
            raise DeviceError(f"{addr:#x} is not exportable fake device memory")
        ino = os.fstat(alloc.fd).st_ino
        raw = _HANDLE.pack(_MAGIC, os.getpid(), alloc.fd, ino, alloc.size, alloc.device)
        self.stats["ipc_export"] += 1
        return IpcHandle(raw.ljust(IPC_HANDLE_BYTES, b"\0"), alloc.base, alloc.size, alloc.device)

    def ipc_open(self, handle: bytes, device: int) -> int:
        if len(handle) != IPC_HANDLE_BYTES:
            raise DeviceError(f"an IPC handle has {IPC_HANDLE_BYTES} bytes, got {len(handle)}")
        magic, pid, fd, ino, size, dev = _HANDLE.unpack_from(handle)
        if magic != _MAGIC:
            raise DeviceError("not a fake-device IPC handle (CUDA_ERROR_INVALID_HANDLE)")
        if pid == os.getpid():
            raise DeviceError(
                "cannot open an IPC handle in the process that exported it (CUDA forbids it too)"
            )
        with self._lock:
            opened = self._opened.get(handle)
            if opened is not None:
                opened.users += 1
                return opened.base
        try:
            rfd = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise DeviceError(
                f"cannot open the IPC handle of pid {pid}: {exc} (the exporter exited or freed it)"
            ) from exc
        try:
            if os.fstat(rfd).st_ino != ino:
                raise DeviceError("stale IPC handle: the exporter freed the allocation")
            mm, backing = _map_memfd(rfd, size)
        finally:
            os.close(rfd)
        with self._lock:
            base = self._reserve(dev % self._devices, size)
            alloc = _Alloc(base, size, dev % self._devices, mm, backing, -1, handle)
            self._insert(alloc)
            self._opened[handle] = alloc
        self.stats["ipc_open"] += 1
        return base

    def ipc_close(self, base: int) -> None:
        alloc = self._find(base)
        if alloc is None or alloc.fd >= 0 or alloc.base != base:
            raise DeviceError(f"{base:#x} is not an address returned by ipc_open")
        with self._lock:
            alloc.users -= 1
            last = alloc.users == 0
            if last:
                del self._opened[alloc.handle]
        if last:
            self._remove(alloc)
