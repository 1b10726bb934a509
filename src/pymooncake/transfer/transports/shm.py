"""Same-host transport: one copy between processes, never through a socket.

Theory of operation
-------------------
Each engine keeps a small shared *registry page* (a memfd) listing its
registered, remote-accessible ranges as ``(addr, length, memfd)`` entries,
guarded by a sequence counter (seqlock), and advertises it in its segment
descriptor::

    "pymooncake_shm": {"host": <boot id>, "pid": <pid>, "fd": <page fd>, "token": <hex>}

Reference peers ignore the field.  A pymooncake peer on the same host (same
boot id) opens ``/proc/<pid>/fd/<fd>``, maps the page and checks the token
(this also proves both see the same pid namespace).  Then, per request:

* the range is checked against the owner's *live* registry page, exactly the
  check a TCP target applies (inside one remote-accessible buffer);
* buffers backed by a memfd (managed buffers, store segments) are mapped once
  and copied with ``memmove`` (GIL released);
* other registered memory is reached with ``process_vm_readv``/``writev``;
  when the kernel refuses (ptrace restrictions) those requests go over TCP,
  and one log line says why.

Device (GPU) memory: the owner lists each registered device buffer with the
IPC handle of the allocation holding it (a second table of the page).  A
peer opens the handle once (``cuIpcOpenMemHandle``) and moves bytes with one
device copy: device to device (NVLink/PCIe peer copy), or between its host
memory and the owner's device memory.  Our device memory to the owner's host
memory goes straight into the owner's memfd mapping.  What cannot go this way
(no IPC handle for that memory, devices without peer access, a peer buffer
reachable only by ``process_vm_*``) goes over TCP, staged through pinned
buffers on each side.

Mappings are cached per peer and dropped when the owner unregisters the
buffer (its fd or handle leaves the page) or the process exits (a ``pidfd``
becomes readable); a peer that died during a transfer fails it instead of
reporting success for bytes nobody will ever read.

Unregistering waits for copies in flight, across processes, with open-file-
description locks (``F_OFD_SETLK``) on the owner's registry page, one byte per
buffer (offset = the buffer's address, host or device): a peer holds a *shared*
lock on that byte while it copies (taken before the copy, after which it checks
the page again), and the owner, having removed the buffer from the page, takes
an *exclusive* lock on it -- which it gets only once every copy that could
still see the buffer is done.  Threads of one process share one lock per buffer
(counted), since such locks belong to the open file, not the thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import mmap
import os
import select
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ..._heldio import PollOne, held_function
from ..._logging import RepeatLimiter
from ...errors import DeviceError, PeerRejected, PeerSocketError
from .._memory import (
    MEMMOVE_FROM,
    PVM_ARGS,
    IoVec,
    Region,
    buffer_address,
    pvm_read,
    pvm_write,
    view_at,
)
from ..device._interface import DeviceBackend, IpcHandle
from ._base import Peer, Slice, SliceCallback, Transport, TransportContext
from ._shm_page import RegistryPage, _Entry, _ofd_lock, _PeerPage, host_identity

__all__ = ["RegistryPage", "ShmTransport", "host_identity"]

log = logging.getLogger("pymooncake.transport.shm")

_FIELD: Final = "pymooncake_shm"


# --------------------------------------------------------------------------------
# process_vm_readv / writev
# --------------------------------------------------------------------------------


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_memmove = ctypes.memmove
#: process_vm_readv/writev called with the GIL held, for copies below MEMMOVE_FROM:
#: a 4 KiB copy takes a microsecond, while giving the GIL up costs a caller beside a
#: busy Python thread up to its 5 ms switch interval to get it back (small copies
#: into mapped buffers are slice assignments, which hold it too)
_held_pvm_read = held_function("process_vm_readv", PVM_ARGS, ctypes.c_ssize_t) or pvm_read
_held_pvm_write = held_function("process_vm_writev", PVM_ARGS, ctypes.c_ssize_t) or pvm_write
_libc.mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.munmap.restype = ctypes.c_int
_MAP_FAILED: Final = ctypes.c_void_p(-1).value


def _map_shared(fd: int, length: int) -> int:
    """mmap(fd) read-write shared; returns the address.  Unlike ``mmap.mmap`` this
    keeps no duplicate of ``fd`` open, so mapping many peer buffers costs no fds."""
    addr = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of a peer buffer failed: {os.strerror(err)}")
    return int(addr)


def _pvm(pid: int, local_addr: int, remote_addr: int, n: int, write: bool) -> None:
    """Copy ``n`` bytes between our ``local_addr`` and the peer's ``remote_addr``.

    Raises:
        OSError: the kernel refused or the peer is gone.
    """
    if n < MEMMOVE_FROM:
        fn = _held_pvm_write if write else _held_pvm_read
    else:
        fn = pvm_write if write else pvm_read
    if fn is None:
        raise OSError(errno.ENOSYS, "process_vm_readv/writev unavailable")
    done = 0
    while done < n:
        local = IoVec(local_addr + done, n - done)
        remote = IoVec(remote_addr + done, n - done)
        got = fn(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        if got == 0:
            raise OSError(errno.EFAULT, "no progress")
        done += got


# --------------------------------------------------------------------------------
# the transport
# --------------------------------------------------------------------------------


@dataclass
class _PeerState:
    pid: int
    page: _PeerPage
    pidfd: int
    maps: dict[tuple[int, int], int]  # (fd, length) -> mapped address
    #: our own open file of the peer's registry page, for the copy locks
    lock_fd: int = -1
    #: buffer address -> threads of this process copying to/from it (one OFD lock each)
    shared: dict[int, int] = field(default_factory=dict)
    pvm_ok: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: executes in flight; mappings are unmapped only when it drops to zero
    users: int = 0
    closing: bool = False
    stale: list[tuple[int, int]] = field(default_factory=list)  # (address, length)
    #: the owner's device allocations opened here: IPC handle -> (backend, base)
    ipc: dict[bytes, tuple[DeviceBackend, int]] = field(default_factory=dict)
    ipc_failed: set[bytes] = field(default_factory=set)
    ipc_stale: list[tuple[DeviceBackend, int]] = field(default_factory=list)
    #: mapped address -> a byte view of that whole mapping (small copies are
    #: slice assignments, made while the mapping is in use: dropped with it)
    views: dict[int, memoryview] = field(default_factory=dict)

    #: polls ``pidfd`` (readable once the peer exited); built on first use
    exited: PollOne | None = None

    def alive(self) -> bool:
        if self.pidfd < 0:
            return True
        exited = self.exited
        if exited is None or exited.fd != self.pidfd:
            exited = self.exited = PollOne(self.pidfd, select.POLLIN)
        return not exited.ready()  # keeps the GIL


class ShmTransport(Transport):
    """Same-host transport (memfd mappings + process_vm_*, CUDA IPC), TCP as fallback."""

    name = "shm"
    handles_device = True

    def __init__(self, ctx: TransportContext) -> None:
        self._ctx = ctx
        self._page: RegistryPage | None = None
        self._host = host_identity()
        self._pid = os.getpid()
        self._peers: dict[tuple[int, str], _PeerState | None] = {}
        #: the last peer looked up and its state: a transfer asks twice (the
        #: engine's ``can_reach``, then ``execute``), and a loop of gets asks for
        #: the same peer every time; cleared whenever ``_peers`` loses an entry
        self._recent: tuple[Peer | None, _PeerState | None] = (None, None)
        self._lock = threading.Lock()
        self._fallback: Transport | None = None
        self._notes = RepeatLimiter(log, every=1_000_000)
        self.enabled = ctx.config.same_host_transport
        #: counters, for tests and operators
        self.slices_mapped = 0
        self.slices_pvm = 0
        self.slices_fallback = 0
        self.slices_device = 0  # device memory on either side, one device copy each
        #: IPC handles of our registered device regions (None: not exportable)
        self._exported: dict[Region, IpcHandle | None] = {}

    def set_fallback(self, transport: Transport) -> None:
        self._fallback = transport

    def start(self) -> None:
        if not self.enabled or not self._host:
            self.enabled = False
            return
        try:
            self._page = RegistryPage()
        except OSError as exc:
            self.enabled = False
            log.info("same-host transport disabled: cannot create a memfd (%s); using TCP", exc)

    def registry_changed(self) -> None:
        if self._page is None:
            return
        regions = self._ctx.registry.regions()
        exported: dict[Region, IpcHandle | None] = {}
        for r in regions:
            if r.device < 0 or r.backend is None or not r.remote_accessible:
                continue
            if r in self._exported:
                exported[r] = self._exported[r]
                continue
            try:
                exported[r] = r.backend.ipc_export(r.addr)
            except DeviceError as exc:
                exported[r] = None
                self._notes(
                    f"export:{r.addr:#x}",
                    logging.INFO,
                    "device buffer %#x (%s) has no IPC handle (%s); same-host peers reach it "
                    "over TCP staging",
                    r.addr,
                    r.location,
                    exc,
                )
        self._exported = exported
        self._page.publish(regions, {r.addr: h for r, h in exported.items()})

    def descriptor_fields(self) -> dict[str, Any]:
        if self._page is None:
            return {}
        return {
            _FIELD: {
                "host": self._host,
                "pid": self._pid,
                "fd": self._page.fd,
                "token": self._page.token,
            }
        }

    # --- peers -------------------------------------------------------------------

    def _attach(self, info: dict[str, Any]) -> _PeerState | None:
        pid, token = int(info["pid"]), str(info["token"])
        key = (pid, token)
        with self._lock:
            if key in self._peers:
                return self._peers[key]
        state: _PeerState | None = None
        try:
            page = _PeerPage(pid, int(info["fd"]))
            # the page must carry the token of the descriptor: same process, same
            # pid namespace (a recycled pid or another container would not)
            if page.token != token:
                page.close()
                raise OSError("the registry page at that pid/fd belongs to another process")
            try:
                lock_fd = os.open(f"/proc/{pid}/fd/{int(info['fd'])}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                page.close()
                raise
            pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else -1
            state = _PeerState(pid, page, pidfd, {}, lock_fd)
        except (OSError, ValueError) as exc:
            self._notes(
                f"attach:{pid}",
                logging.INFO,
                "same-host peer pid %d: cannot map its registry (%s); using TCP (different "
                "container/pid namespace or no permission to open /proc/%d/fd)",
                pid,
                exc,
                pid,
            )
            state = None
        with self._lock:
            if key in self._peers:  # another thread attached meanwhile: keep its state
                winner = self._peers[key]
            else:
                self._peers[key] = winner = state
        if state is not None and winner is not state:
            self._release(state)
        return winner

    def _peer(self, peer: Peer) -> _PeerState | None:
        recent = self._recent
        if recent[0] is peer and (recent[1] is None or not recent[1].closing):
            return recent[1]
        state = self._lookup(peer)
        self._recent = (peer, state)
        return state

    def _lookup(self, peer: Peer) -> _PeerState | None:
        info = peer.desc.extra.get(_FIELD)
        if not isinstance(info, dict) or info.get("host") != self._host or not self._host:
            return None
        try:
            if int(info.get("pid", -1)) == self._pid:
                return None
        except (TypeError, ValueError):
            return None
        return self._attach(info)

    def can_reach(self, peer: Peer) -> bool:
        if not self.enabled or peer.local:
            return False
        state = self._peer(peer)
        return state is not None and state.alive() and not state.page.overflow

    def forget_peer(self, peer: Peer) -> None:
        info = peer.desc.extra.get(_FIELD)
        if isinstance(info, dict):
            with self._lock:
                state = self._peers.pop((int(info.get("pid", -1)), str(info.get("token"))), None)
                self._recent = (None, None)
            if state is not None:
                self._release(state)

    @staticmethod
    def _release(state: _PeerState) -> None:
        """Drop a peer: unmap everything once no transfer is using the mappings."""
        with state.lock:
            state.closing = True
            if state.users:
                return  # the last user finishes the job
        ShmTransport._unmap_all(state)

    @staticmethod
    def _unmap_stale(state: _PeerState) -> None:
        """Unmap buffers the owner unregistered (only while no transfer uses them)."""
        for addr, length in state.stale:
            state.views.pop(addr, None)
            _libc.munmap(addr, length)
        state.stale.clear()
        for backend, base in state.ipc_stale:
            ShmTransport._ipc_close(backend, base)
        state.ipc_stale.clear()

    @staticmethod
    def _ipc_close(backend: DeviceBackend, base: int) -> None:
        try:
            backend.ipc_close(base)
        except DeviceError as exc:  # pragma: no cover - driver torn down first
            log.debug("closing a peer's IPC mapping failed: %s", exc)

    @staticmethod
    def _unmap_all(state: _PeerState) -> None:
        state.views.clear()
        for (_, length), addr in state.maps.items():
            _libc.munmap(addr, length)
        state.maps.clear()
        state.ipc_stale.extend(state.ipc.values())
        state.ipc.clear()
        ShmTransport._unmap_stale(state)
        state.page.close()
        if state.pidfd >= 0:
            os.close(state.pidfd)
            state.pidfd = -1
        if state.lock_fd >= 0:
            os.close(state.lock_fd)  # drops any lock still held
            state.lock_fd = -1

    def _enter(self, state: _PeerState) -> bool:
        with state.lock:
            if state.closing:
                return False
            state.users += 1
            return True

    def _leave(self, state: _PeerState) -> None:
        with state.lock:
            state.users -= 1
            last = state.users == 0
            if last and (state.stale or state.ipc_stale):
                self._unmap_stale(state)
            finish = last and state.closing
        if finish:
            self._unmap_all(state)

    def _mapping(self, state: _PeerState, entry: _Entry) -> int:
        """Address at which the peer's buffer ``entry`` is mapped here."""
        key = (entry.fd, entry.length)
        with state.lock:
            got = state.maps.get(key)
            if got is not None:
                return got
            live = {(e.fd, e.length) for e in state.page.entries}
            for gone in [k for k in state.maps if k not in live]:  # owner unregistered them
                state.stale.append((state.maps.pop(gone), gone[1]))
            fd = os.open(f"/proc/{state.pid}/fd/{entry.fd}", os.O_RDWR | os.O_CLOEXEC)
            try:
                addr = _map_shared(fd, entry.length)
            finally:
                os.close(fd)
            state.maps[key] = addr
            return addr

    def _ipc_mapping(
        self, state: _PeerState, entry: _Entry, backend: DeviceBackend, peer: Peer
    ) -> int | None:
        """Where the owner's device allocation holding ``entry`` is mapped here (its
        base), or None when its IPC handle cannot be opened (then: TCP)."""
        with state.lock:
            got = state.ipc.get(entry.handle)
            if got is not None:
                return got[1]
            if entry.handle in state.ipc_failed:
                return None
            live = {e.handle for e in state.page.entries if e.handle}
            for gone in [h for h in state.ipc if h not in live]:  # owner unregistered them
                state.ipc_stale.append(state.ipc.pop(gone))
            try:
                base = backend.ipc_open(entry.handle, entry.device)
            except DeviceError as exc:
                state.ipc_failed.add(entry.handle)
                self._notes(
                    f"ipc:{state.pid}:{entry.base:#x}",
                    logging.WARNING,
                    "cannot open the CUDA IPC handle of segment %r's device buffer %#x (%s); "
                    "staging it over TCP instead (devices without peer access, or another "
                    "container)",
                    peer.name,
                    entry.addr,
                    exc,
                )
                return None
            state.ipc[entry.handle] = (backend, base)
            return base

    def _device_copy(self, state: _PeerState, peer: Peer, s: Slice, entry: _Entry) -> bool:
        """One slice with device memory on either side, as one device copy; False
        when this path cannot serve it (the caller sends it over TCP).

        Raises:
            DeviceError / OSError: the copy failed.
        """
        local_dev = s.device
        if entry.device >= 0:
            backend = local_dev.backend if local_dev is not None else None
            if backend is None:
                devices = self._ctx.devices
                backend = devices.active() if devices is not None else None
            if not entry.handle or backend is None:
                return False
            base = self._ipc_mapping(state, entry, backend, peer)
            if base is None:
                return False
            remote = base + (s.remote_addr - entry.base)
        else:  # our device memory, the owner's host memory
            assert local_dev is not None
            backend = local_dev.backend
            if entry.fd < 0:
                return False  # reachable only by process_vm_*: staged over TCP
            remote = self._mapping(state, entry) + (s.remote_addr - entry.addr)
        local = local_dev.addr if local_dev is not None else buffer_address(s.local)
        if s.is_write:
            backend.copy(remote, local, s.length)
        else:
            backend.copy(local, remote, s.length)
        self.slices_device += 1
        return True

    # --- transfers -------------------------------------------------------------------

    def _share(self, state: _PeerState, addr: int) -> None:
        """Hold the peer's buffer at ``addr`` against its unregistering (counted)."""
        with state.lock:
            n = state.shared.get(addr, 0)
            if n == 0:
                _ofd_lock(state.lock_fd, fcntl.F_RDLCK, addr, wait=True)
            state.shared[addr] = n + 1

    def _unshare(self, state: _PeerState, addr: int) -> None:
        with state.lock:
            n = state.shared[addr] - 1
            if n:
                state.shared[addr] = n
                return
            del state.shared[addr]
            _ofd_lock(state.lock_fd, fcntl.F_UNLCK, addr, wait=False)

    def quiesce(self, region: Region, *, drain_s: float) -> None:
        """Wait for same-host peers copying to/from ``region`` (see the module docstring)."""
        page = self._page
        if page is None or not region.remote_accessible:
            return
        if not page.quiesce(region.addr, time.monotonic() + drain_s + 10.0):
            log.error(
                "unregister [%#x, +%d): a same-host peer process still copies to/from it after "
                "%.0f s (is it stopped or hung?); continuing",
                region.addr,
                region.length,
                drain_s + 10.0,
            )

    def execute(
        self, peer: Peer, slices: Sequence[Slice], deadline: float, on_done: SliceCallback
    ) -> None:
        state = self._peer(peer)
        if state is None or not self._enter(state):
            self._to_fallback(peer, list(slices), deadline, on_done)
            return
        held: set[int] = set()
        try:
            self._execute(state, peer, slices, deadline, on_done, held)
        finally:
            for addr in held:
                self._unshare(state, addr)
            self._leave(state)

    def _execute(
        self,
        state: _PeerState,
        peer: Peer,
        slices: Sequence[Slice],
        deadline: float,
        on_done: SliceCallback,
        held: set[int],
    ) -> None:
        pid = state.pid
        fallback: list[Slice] = []
        finished: list[tuple[Slice, BaseException | None]] = []
        for s in slices:
            n = s.length
            if n == 0:
                finished.append((s, None))
                continue
            try:
                entry = state.page.find(s.remote_addr, n)
                if entry is not None and entry.addr not in held:
                    self._share(state, entry.addr)
                    held.add(entry.addr)
                    # the owner may have unregistered it before our lock: look again
                    # (the same entry object while the page did not change)
                    again = state.page.find(s.remote_addr, n)
                    if again is not entry and again != entry:
                        entry = None
            except (PeerSocketError, OSError) as exc:
                finished.append((s, PeerSocketError(f"same-host peer pid {pid}: {exc}")))
                continue
            if entry is None:
                finished.append(
                    (
                        s,
                        PeerRejected(
                            f"WRITE/READ rejected by segment {peer.name!r}: remote address "
                            f"{s.remote_addr:#x} with size {n} is not within any buffer the peer "
                            "registered (stale descriptor, wrong address arithmetic, or the peer "
                            "unregistered it)"
                        ),
                    )
                )
                continue
            if entry.device >= 0 or s.device is not None:
                try:
                    if not self._device_copy(state, peer, s, entry):
                        fallback.append(s)
                        continue
                except (DeviceError, OSError) as exc:
                    finished.append(
                        (s, PeerSocketError(f"same-host device copy with {peer.name!r}: {exc}"))
                    )
                    continue
                finished.append((s, None))
                continue
            try:
                if entry.fd >= 0:
                    base = self._mapping(state, entry)
                    at = s.remote_addr - entry.addr
                    if n < MEMMOVE_FROM:
                        # (a small copy: two slices and an assignment, with the GIL
                        # held, cheaper than taking addresses for a memmove)
                        view = state.views.get(base)
                        if view is None:
                            view = state.views[base] = view_at(base, entry.length)
                        if s.is_write:
                            view[at : at + n] = s.local
                        else:
                            s.local[:] = view[at : at + n]
                    elif s.is_write:  # (memmove without the GIL)
                        _memmove(base + at, buffer_address(s.local), n)
                    else:
                        _memmove(buffer_address(s.local), base + at, n)
                    self.slices_mapped += 1
                elif state.pvm_ok:
                    _pvm(pid, buffer_address(s.local), s.remote_addr, n, s.is_write)
                    self.slices_pvm += 1
                else:
                    fallback.append(s)
                    continue
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.EACCES, errno.ENOSYS) and entry.fd < 0:
                    state.pvm_ok = False
                    self._notes(
                        f"pvm:{pid}",
                        logging.WARNING,
                        "process_vm_readv/writev to pid %d refused (%s: ptrace restrictions such as "
                        "kernel.yama.ptrace_scope); memory that is not shareable goes over TCP",
                        pid,
                        exc.strerror,
                    )
                    fallback.append(s)
                    continue
                finished.append(
                    (s, PeerSocketError(f"same-host copy with segment {peer.name!r} failed: {exc}"))
                )
                continue
            finished.append((s, None))
        if not state.alive():
            # the owner exited: what we "wrote" went to memory nobody owns any more
            gone = PeerSocketError(
                f"segment {peer.name!r} (pid {pid}) exited during the transfer; its memory is gone"
            )
            finished = [(s, gone if e is None else e) for s, e in finished]
            self.forget_peer(peer)
        for s, e in finished:
            on_done(s, e)
        if fallback:
            self._to_fallback(peer, fallback, deadline, on_done)

    def _to_fallback(
        self, peer: Peer, slices: list[Slice], deadline: float, on_done: SliceCallback
    ) -> None:
        if self._fallback is None:
            err = PeerSocketError(f"no transport can reach segment {peer.name!r}")
            for s in slices:
                on_done(s, err)
            return
        self.slices_fallback += len(slices)
        devices = self._ctx.devices
        if (
            not self._fallback.handles_device
            and devices is not None
            and any(s.device is not None for s in slices)
        ):
            devices.stage(self._fallback.execute, peer, slices, deadline, on_done)
        else:
            self._fallback.execute(peer, slices, deadline, on_done)

    @property
    def stats(self) -> dict[str, int]:
        return {
            "slices_mapped": self.slices_mapped,
            "slices_pvm": self.slices_pvm,
            "slices_fallback": self.slices_fallback,
            "slices_device": self.slices_device,
        }

    def close(self) -> None:
        with self._lock:
            peers = [p for p in self._peers.values() if p is not None]
            self._peers.clear()
            self._recent = (None, None)
        for state in peers:
            self._release(state)
        if self._page is not None:
            self._page.close()
            self._page = None
