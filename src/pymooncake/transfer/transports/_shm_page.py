"""The same-host transport's registry page: what a process shares, read by its peers.

A memfd that the owner rewrites under a sequence counter (seqlock) after every
registration change and that same-host peers map read-only (see
``shm.py``).  Layout (little-endian)::

    header   magic "PMCSHM02", seq, count, overflow, token
    entries  count x (addr, length, fd, flags)        -- sorted by the reader
    devices  up to 4096 x (IPC handle, allocation base, allocation size, device)

Unregistering waits on open-file-description locks of the page, one byte per
buffer at the buffer's address (:func:`_ofd_lock`, :meth:`RegistryPage.quiesce`).

Host entries carry the memfd backing the buffer (-1: reachable by
``process_vm_*`` only).  Device entries (flag 2) carry the index of their row
in the device table, or -1 when the buffer has no IPC handle (peers then use
TCP for it).
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import fcntl
import mmap
import os
import secrets
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from ..._heldio import held_function
from ...errors import PeerSocketError
from ...wire import U64_MAX
from .._memory import Region
from ..device._interface import IpcHandle

__all__ = ["RegistryPage", "host_identity"]

_MAGIC: Final = 0x32304D4853434D50  # "PMCSHM02" (02: the device table)
_HEADER: Final = struct.Struct("<QQII16s")  # magic, seq, count, overflow, token
_ENTRY: Final = struct.Struct("<QQiI")  # addr, length, fd (device: table index), flags
#: device entry: IPC handle, its allocation's base and size (owner's addresses), device
_DEV_ENTRY: Final = struct.Struct("<64sQQi4x")
_FLAG_VALID: Final = 1
_FLAG_DEVICE: Final = 2
#: entries the page can list; beyond that peers fall back to TCP
_CAPACITY: Final = 16384
_DEV_CAPACITY: Final = 4096
_DEV_TABLE: Final = _HEADER.size + _CAPACITY * _ENTRY.size
_PAGE_BYTES: Final = _DEV_TABLE + _DEV_CAPACITY * _DEV_ENTRY.size
#: struct flock (x86-64 / aarch64): type, whence, start, len, pid (+ padding)
_FLOCK: Final = struct.Struct("hhqqi4x")
_OFD_SETLK: Final = getattr(fcntl, "F_OFD_SETLK", None)
_OFD_SETLKW: Final = getattr(fcntl, "F_OFD_SETLKW", None)


#: fcntl called with the GIL held (``_heldio``), for lock attempts that do not wait;
#: untyped (ctypes' own conversions: two ints and the bytes of a struct flock), which
#: halves the cost of a call (a lock and its unlock: 2.8 against 4.6 us, slow CPU)
_held_fcntl: Final = held_function("fcntl", None, ctypes.c_int)


def _ofd_lock(fd: int, kind: int, start: int, *, wait: bool) -> bool:
    """Lock (``F_RDLCK``/``F_WRLCK``) or unlock (``F_UNLCK``) byte ``start`` of ``fd``
    (the copy locks of ``shm.py``: one byte per buffer, at the buffer's address).

    Returns False when ``wait`` is off and another lock conflicts.
    """
    if _OFD_SETLK is None or _OFD_SETLKW is None:  # pragma: no cover - not Linux
        return True
    data = _FLOCK.pack(kind, os.SEEK_SET, start, 1, 0)
    if _held_fcntl is not None:
        # first without waiting and with the GIL held (fcntl.fcntl gives it up, which
        # beside a busy Python thread costs up to a 5 ms switch interval to get back);
        # a conflicting lock (the owner unregistering that buffer) waits the usual way
        if _held_fcntl(fd, _OFD_SETLK, data) == 0:
            return True
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EACCES):
            raise OSError(err, os.strerror(err))
        if not wait:
            return False
    try:
        fcntl.fcntl(fd, _OFD_SETLKW if wait else _OFD_SETLK, data)
    except OSError as exc:
        if not wait and exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def host_identity() -> str:
    """This boot of this machine (equal for processes that can share memory)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------------
# the registry page
# --------------------------------------------------------------------------------


class RegistryPage:
    """Owner side: publishes the registered ranges to same-host peers."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("pymooncake-registry", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, _PAGE_BYTES)
        self._mm = mmap.mmap(self.fd, _PAGE_BYTES)
        self._token = secrets.token_bytes(16)
        self.token = self._token.hex()
        self._seq = 0
        self._lock = threading.Lock()
        _HEADER.pack_into(self._mm, 0, _MAGIC, 0, 0, 0, self._token)

    def publish(
        self, regions: Sequence[Region], handles: Mapping[int, IpcHandle | None] | None = None
    ) -> None:
        """List ``regions``; device regions with their IPC handle from ``handles``
        (by region address; None or missing: peers use TCP for that buffer)."""
        shared = [r for r in regions if r.remote_accessible]
        handles = handles or {}
        with self._lock:
            mm = self._mm
            self._seq += 1  # odd: writing
            struct.pack_into("<Q", mm, 8, self._seq)
            overflow = len(shared) > _CAPACITY
            devices = 0
            for i, r in enumerate(shared[:_CAPACITY]):
                fd, flags = r.fd, _FLAG_VALID
                if r.device >= 0:
                    flags |= _FLAG_DEVICE
                    h = handles.get(r.addr)
                    fd = -1
                    if h is not None and devices < _DEV_CAPACITY:
                        fd = devices
                        at = _DEV_TABLE + devices * _DEV_ENTRY.size
                        _DEV_ENTRY.pack_into(mm, at, h.handle, h.base, h.size, h.device)
                        devices += 1
                _ENTRY.pack_into(mm, _HEADER.size + i * _ENTRY.size, r.addr, r.length, fd, flags)
            self._seq += 1  # even: stable
            _HEADER.pack_into(
                mm, 0, _MAGIC, self._seq, min(len(shared), _CAPACITY), int(overflow), self._token
            )

    def quiesce(self, addr: int, deadline: float) -> bool:
        """Wait until no peer copies to/from the buffer at ``addr`` (already gone
        from the page); False if a peer still holds it at ``deadline``."""
        delay = 0.0002
        while not _ofd_lock(self.fd, fcntl.F_WRLCK, addr, wait=False):
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        _ofd_lock(self.fd, fcntl.F_UNLCK, addr, wait=False)
        return True

    def close(self) -> None:
        self._mm.close()
        os.close(self.fd)


@dataclass(frozen=True)
class _Entry:
    addr: int
    length: int
    fd: int
    #: device memory: the owner's device ordinal (-1: host memory)
    device: int = -1
    #: device memory: IPC handle of its allocation (b"": none, use TCP) and the
    #: allocation's base in the owner's address space
    handle: bytes = b""
    base: int = 0

    @property
    def end(self) -> int:
        return self.addr + self.length


class _PeerPage:
    """Reader side: a mapped registry page of one peer, parsed on change."""

    def __init__(self, pid: int, fd: int) -> None:
        path = f"/proc/{pid}/fd/{fd}"
        rfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._mm = mmap.mmap(rfd, _PAGE_BYTES, prot=mmap.PROT_READ)
        finally:
            os.close(rfd)
        self._seq = -1
        self.entries: list[_Entry] = []
        self._starts: list[int] = []
        self.overflow = False
        magic, _, _, _, token = _HEADER.unpack_from(self._mm, 0)
        if magic != _MAGIC:
            self._mm.close()
            raise OSError(f"{path} is not a pymooncake registry page")
        self.token = token.hex()

    def refresh(self) -> list[_Entry]:
        for _ in range(1000):
            magic, seq, count, overflow, _ = _HEADER.unpack_from(self._mm, 0)
            if magic != _MAGIC:
                raise PeerSocketError("peer registry page is corrupt")
            if seq == self._seq:
                return self.entries
            if seq & 1:
                continue
            raw = self._mm[_HEADER.size : _HEADER.size + count * _ENTRY.size]
            entries = []
            for a, n, f, flags in _ENTRY.iter_unpack(raw):
                if not flags & _FLAG_DEVICE:
                    entries.append(_Entry(a, n, f))
                elif f < 0:
                    entries.append(_Entry(a, n, -1, device=0))
                else:
                    handle, base, _, dev = _DEV_ENTRY.unpack_from(
                        self._mm, _DEV_TABLE + f * _DEV_ENTRY.size
                    )
                    entries.append(_Entry(a, n, -1, dev, handle, base))
            if struct.unpack_from("<Q", self._mm, 8)[0] != seq:
                continue
            # sorted by address (regions never overlap): find() bisects
            self.entries = sorted(entries, key=lambda e: e.addr)
            self._starts = [e.addr for e in self.entries]
            self.overflow = bool(overflow)
            self._seq = seq
            return self.entries
        raise PeerSocketError("peer registry page kept changing; retry")

    def find(self, addr: int, length: int) -> _Entry | None:
        """The shared region holding ``[addr, addr + length)``, with the bounds
        rules of :meth:`MemoryRegistry.find_remote`."""
        if length <= 0 or addr < 0 or addr + length > U64_MAX:
            return None
        entries = self.refresh()
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr + length <= entries[i].end:
            return entries[i]
        return None

    def close(self) -> None:
        self._mm.close()
