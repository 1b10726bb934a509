"""The store client's SSD tier: offload to local files, serve reads, promote.

Theory of operation
-------------------
A client set up with ``enable_ssd_offload`` owns a :class:`FileStorage` under
``ssd_offload_path`` and a read port (:class:`OffloadServer`), mounts both at the
master (``MountLocalDiskSegment``) and runs one worker thread that polls the
master every ``heartbeat_interval_s`` (``OffloadObjectHeartbeat``) and does
what it is told, as the reference's FileStorage heartbeat does:

* **offload**: copy each listed object from this client's own segment (a local
  view, no transfer) into a file, then report the batch
  (``NotifyOffloadSuccess``); refused keys' files are deleted again.  Room is
  made two-phase: victims leave the index, the master is told
  (``BatchEvictDiskReplica``), then the files go.
* **promote**: read the file, allocate memory (``PromotionAllocStart``), write
  it through the engine like a put, ``PutEnd``.
* **drop**: delete files whose replicas the master dropped.

When the master does not know the tier (it restarted without a journal, or it
expired this client) the heartbeat says ``remount``: the tier is mounted again
and every file re-registered (``register``), as after a restart of the client
itself (:meth:`SsdTier.start` scans the directory first).

Reads of LOCAL_DISK-only objects by any client go to the owner's read port
(:class:`OffloadReader`): it reads each file with one ``O_DIRECT`` read into an
aligned buffer and sends it; the reader receives straight into the caller's
memory (``recv_into``).  A reader thread prefetches the next file while the
current one is being sent.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import queue
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._authio import ClusterSecurity, secure_client, server_handshake
from .._net import bind_listener, connect_tcp, split_host_port
from ..errors import (
    InvalidParams,
    MooncakeError,
    StoreError,
    store_error,
)
from ..transfer.device import DeviceSpan
from ..wire import _master_msgs as msg
from ..wire import _offload_msgs as omsg
from ..wire._offload_rpc import (
    AUTH_CONTEXT,
    ITEM,
    REQUEST_HEAD,
    decode_head,
    decode_request,
    encode_request,
)
from ._file_storage import CorruptObject, FileStorage, StorageFull, header_bytes, read_object_into
from ._types import ErrorCode, ReplicaDesc

if TYPE_CHECKING:
    from ._client import StoreClient

__all__ = ["OffloadReader", "OffloadServer", "SsdSettings", "SsdTier", "read_shared"]

log = logging.getLogger("pymooncake.store.ssd")

_NOT_FOUND = int(ErrorCode.OBJECT_NOT_FOUND)
_BAD = int(ErrorCode.INVALID_REPLICA)


def _env_int(env: dict[str, str] | os._Environ[str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(float(raw))
    except ValueError:
        raise InvalidParams(f"{name}={raw!r} is not a number") from None


@dataclass(frozen=True)
class SsdSettings:
    """Settings of a client's SSD tier (the reference's ``MOONCAKE_OFFLOAD_*``)."""

    path: str
    #: MOONCAKE_OFFLOAD_TOTAL_SIZE_LIMIT_BYTES (0: 90 % of the free space)
    capacity_bytes: int = 0
    #: MOONCAKE_OFFLOAD_TOTAL_KEYS_LIMIT
    max_keys: int = 10_000_000
    #: MOONCAKE_OFFLOAD_HEARTBEAT_INTERVAL_SECONDS (the reference's default 10 s)
    heartbeat_interval_s: float = 10.0
    #: MOONCAKE_OFFLOAD_EVICTION_POLICY: fifo | lru
    policy: str = "fifo"
    #: MOONCAKE_OFFLOAD_VERIFY_CHECKSUM: check every value read against its CRC
    verify_checksum: bool = False
    #: MOONCAKE_OFFLOAD_FSYNC=0 skips fsync (benchmarks of tmpfs only)
    fsync: bool = True
    #: MOONCAKE_OFFLOAD_RPC_HOST: address of the read port (default: the client's host)
    rpc_host: str = ""

    @classmethod
    def from_env(cls, path: str, env: dict[str, str] | None = None) -> SsdSettings:
        e = os.environ if env is None else env
        path = path or e.get("MOONCAKE_OFFLOAD_FILE_STORAGE_PATH", "") or "/data/file_storage"
        interval = e.get("MOONCAKE_OFFLOAD_HEARTBEAT_INTERVAL_SECONDS", "").strip()
        return cls(
            path=path,
            capacity_bytes=_env_int(e, "MOONCAKE_OFFLOAD_TOTAL_SIZE_LIMIT_BYTES", 0),
            max_keys=_env_int(e, "MOONCAKE_OFFLOAD_TOTAL_KEYS_LIMIT", 10_000_000),
            heartbeat_interval_s=float(interval) if interval else 10.0,
            policy=e.get("MOONCAKE_OFFLOAD_EVICTION_POLICY", "fifo").strip().lower() or "fifo",
            verify_checksum=e.get("MOONCAKE_OFFLOAD_VERIFY_CHECKSUM", "0").strip() in ("1", "true"),
            fsync=e.get("MOONCAKE_OFFLOAD_FSYNC", "1").strip() not in ("0", "false"),
            rpc_host=e.get("MOONCAKE_OFFLOAD_RPC_HOST", "").strip(),
        )


# --------------------------------------------------------------------------------
# the read port
# --------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    n = len(view)
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("the peer closed the connection")
        got += k


def unix_name(endpoint: str) -> str:
    """The abstract UNIX socket a read port also listens on (same-host readers)."""
    return f"\0pymooncake-ssd-{endpoint}"


#: same-host staging: slots of a memfd shared with the reader (objects up to a
#: slot minus its header go through it; larger ones are streamed)
SHM_SLOTS = 8
#: files read at once per request (queue depth 2: the next reads overlap the copy)
READ_THREADS = 3
SHM_SLOT_BYTES = 4 << 20
_SHM_HEAD = struct.Struct("<II")  # slots, slot bytes
_NOTICE = struct.Struct("<qq")  # value bytes (or -code), offset in the shared memory (-1: inline)


class _Scratch:
    """A page-aligned buffer that grows to the largest file read."""

    def __init__(self) -> None:
        self.buf = mmap.mmap(-1, 1 << 21)

    def fit(self, n: int) -> mmap.mmap:
        if len(self.buf) < n:
            self.buf.close()
            self.buf = mmap.mmap(-1, (n + (1 << 21) - 1) & ~((1 << 21) - 1))
        return self.buf

    def close(self) -> None:
        try:
            self.buf.close()
        except BufferError:
            pass


class _Slot:
    """Where one value is staged: a slot of the shared memory (``offset`` >= 0)
    or a private scratch buffer (streamed)."""

    __slots__ = ("offset", "scratch", "view")

    def __init__(self, view: memoryview | None, offset: int, scratch: _Scratch | None) -> None:
        self.view = view
        self.offset = offset
        self.scratch = scratch

    def fit(self, n: int) -> memoryview | mmap.mmap | None:
        if self.view is not None:
            return self.view if n <= len(self.view) else None
        assert self.scratch is not None
        return self.scratch.fit(n)


class OffloadServer:
    """Serves this client's SSD objects to readers (one thread per connection):
    on TCP at :attr:`endpoint`, and to readers on this host through an abstract
    UNIX socket (:func:`unix_name`) whose connections get a shared memfd
    staging area: each file is read (``O_DIRECT``) straight into a slot of it,
    the reader copies the value out and acknowledges the slot."""

    def __init__(
        self,
        storage: FileStorage,
        host: str,
        security: ClusterSecurity | None = None,
        on_batch: Callable[[int, int, int], None] | None = None,
    ) -> None:
        #: called per request answered with (value bytes, values, microseconds)
        self.on_batch = on_batch
        self.storage = storage
        self.security = security or ClusterSecurity()
        self._key = self.security.key
        self._ssl = self.security.server_ssl_context() if self.security.tls else None
        self._sock = bind_listener(host, what="SSD read port")
        port = self._sock.getsockname()[1]
        self.endpoint = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self._unix: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._unix.bind(unix_name(self.endpoint))
            self._unix.listen(64)
        except OSError as exc:
            log.info("SSD read port: no same-host socket (%s); readers use TCP", exc)
            self._unix.close()
            self._unix = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self.served = 0
        self._threads = [
            threading.Thread(
                target=self._accept,
                args=(lsock, lsock is self._unix),
                daemon=True,
                name="mc-ssd-accept",
            )
            for lsock in (self._sock, self._unix)
            if lsock is not None
        ]
        for t in self._threads:
            t.start()

    def _accept(self, lsock: socket.socket, local: bool) -> None:
        while not self._stop.is_set():
            try:
                sock, addr = lsock.accept()
            except OSError:
                return
            peer = "same host" if local else f"{addr[0]}:{addr[1]}"
            with self._lock:
                if self._stop.is_set():
                    sock.close()
                    return
                t = threading.Thread(
                    target=self._serve, args=(sock, peer, local), daemon=True, name="mc-ssd-conn"
                )
                self._conns[sock] = t
                t.start()

    def _serve(self, sock: socket.socket, peer: str, local: bool) -> None:
        conn = sock
        scratch = [_Scratch() for _ in range(READ_THREADS + 1)]
        shm: mmap.mmap | None = None
        try:
            if not local:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._ssl is not None:
                    conn = self._ssl.wrap_socket(conn, server_side=True)
            if self._key is not None:
                server_handshake(
                    conn, self._key, AUTH_CONTEXT, timeout_s=10.0, port="SSD read port", peer=peer
                )
            slots = [_Slot(None, -1, s) for s in scratch]
            if local:
                fd = os.memfd_create("pymooncake-ssd-staging", os.MFD_CLOEXEC)
                try:
                    os.ftruncate(fd, SHM_SLOTS * SHM_SLOT_BYTES)
                    shm = mmap.mmap(fd, SHM_SLOTS * SHM_SLOT_BYTES)
                    socket.send_fds(conn, [_SHM_HEAD.pack(SHM_SLOTS, SHM_SLOT_BYTES)], [fd])
                finally:
                    os.close(fd)
                whole = memoryview(shm)
                slots = [
                    _Slot(
                        whole[i * SHM_SLOT_BYTES : (i + 1) * SHM_SLOT_BYTES],
                        i * SHM_SLOT_BYTES,
                        None,
                    )
                    for i in range(SHM_SLOTS)
                ]
            head = bytearray(REQUEST_HEAD.size)
            while not self._stop.is_set():
                try:
                    _recv_exact(conn, memoryview(head))
                except ConnectionError:
                    return
                body = bytearray(decode_head(bytes(head)))
                _recv_exact(conn, memoryview(body))
                keys, sizes = decode_request(bytes(body))
                self._answer(conn, keys, sizes, slots, local)
        except (OSError, MooncakeError) as exc:
            if not self._stop.is_set():
                log.debug("SSD read port: connection from %s ended: %s", peer, exc)
        finally:
            for s in scratch:
                s.close()
            if shm is not None:
                try:
                    shm.close()
                except BufferError:
                    pass
            with self._lock:
                self._conns.pop(sock, None)
            try:
                conn.close()
            except OSError:
                pass

    def _answer(
        self,
        conn: socket.socket,
        keys: list[str],
        sizes: list[int],
        slots: list[_Slot],
        local: bool,
    ) -> None:
        """Answer one request.  A helper thread reads the next files into free
        slots while the current one is sent (TCP) or copied out by the reader
        (same host: the reader acknowledges each value, which frees its slot)."""
        storage = self.storage
        n = len(keys)
        free: queue.Queue[_Slot] = queue.Queue()
        for slot in slots:
            free.put(slot)
        abort = threading.Event()

        def load(i: int, slot: _Slot) -> tuple[memoryview | int, _Slot, int]:
            key = keys[i]
            try:
                need = storage.direct_bytes(key)
                target = slot.fit(need)
                if target is None:  # larger than a shared slot: stream it from its own buffer
                    free.put(slot)
                    one_off = _Scratch()
                    slot = _Slot(None, -1, one_off)
                    target = one_off.fit(need)
                entry, view = storage.read_direct_entry(key, target)
            except KeyError:
                return _NOT_FOUND, slot, 0
            except CorruptObject:
                return _BAD, slot, 0
            if len(view) != sizes[i]:
                view.release()
                return _BAD, slot, 0
            return view, slot, entry.header

        results: dict[int, tuple[memoryview | int, _Slot, int]] = {}
        ready = threading.Condition()
        next_index = [0]

        def reader() -> None:
            while True:
                slot = free.get()  # a slot first, then the index: no deadlock on slots
                with ready:
                    i = next_index[0]
                    if abort.is_set() or i >= n:
                        free.put(slot)
                        return
                    next_index[0] = i + 1
                got = load(i, slot)
                with ready:
                    results[i] = got
                    ready.notify_all()

        def loaded(i: int) -> tuple[memoryview | int, _Slot, int]:
            with ready:
                while i not in results:
                    ready.wait()
                return results.pop(i)

        in_use: queue.Queue[_Slot] = queue.Queue()

        def done(slot: _Slot) -> None:
            if slot.view is None and slot.scratch not in scratch_owned:
                assert slot.scratch is not None
                slot.scratch.close()  # a one-off buffer of a large value
            else:
                free.put(slot)

        scratch_owned = [s.scratch for s in slots if s.scratch is not None]

        def acks() -> None:
            ack = bytearray(ITEM.size)
            for _ in range(n):
                try:
                    _recv_exact(conn, memoryview(ack))
                except (OSError, ConnectionError):
                    abort.set()
                    free.put(slots[0])
                    return
                done(in_use.get())

        started = time.perf_counter_ns()
        sent = sent_bytes = 0
        helpers = [
            threading.Thread(target=reader, name="mc-ssd-read", daemon=True)
            for _ in range(min(READ_THREADS, n))
        ]
        for h in helpers:
            h.start()
        acker = threading.Thread(target=acks, name="mc-ssd-ack", daemon=True) if local else None
        if acker is not None:
            acker.start()
        try:
            for i in range(n):
                item, slot, header = loaded(i)
                if isinstance(item, int):
                    conn.sendall(_NOTICE.pack(item, -1) if local else ITEM.pack(item))
                    if local:
                        in_use.put(slot)
                    else:
                        done(slot)
                    continue
                try:
                    if local and slot.view is not None:
                        offset = slot.offset + header
                        conn.sendall(_NOTICE.pack(len(item), offset))
                    elif local:
                        conn.sendall(_NOTICE.pack(len(item), -1))
                        conn.sendall(item)
                    else:
                        conn.sendall(ITEM.pack(len(item)))
                        conn.sendall(item)
                finally:
                    item.release()
                self.served += 1
                sent_bytes += sizes[i]
                sent += 1
                if local:
                    in_use.put(slot)
                else:
                    done(slot)
        finally:
            abort.set()
            for slot in slots:
                free.put(slot)  # unblocks the helper wherever it waits
            for h in helpers:
                h.join()
            if acker is not None:
                acker.join()
            for item, _, _ in results.values():
                if isinstance(item, memoryview):
                    item.release()
            if self.on_batch is not None and sent:
                self.on_batch(sent_bytes, sent, (time.perf_counter_ns() - started) // 1000)

    def close(self) -> None:
        self._stop.set()
        for lsock in (self._sock, self._unix):
            if lsock is None:
                continue
            try:
                lsock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            lsock.close()
        for t in self._threads:
            t.join(5)
        with self._lock:
            conns = list(self._conns.items())
        for sock, _ in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, t in conns:
            t.join(5)


class _Conn:
    __slots__ = ("shm", "sock")

    def __init__(self, sock: socket.socket, shm: mmap.mmap | None) -> None:
        self.sock = sock
        self.shm = shm

    def close(self) -> None:
        self.sock.close()
        if self.shm is not None:
            try:
                self.shm.close()
            except BufferError:
                pass


class OffloadReader:
    """Reads LOCAL_DISK replicas from their owners' read ports (pooled
    connections; the same-host socket with shared staging memory when the owner
    runs on this host, TCP otherwise)."""

    def __init__(self, security: ClusterSecurity | None = None, timeout_s: float = 30.0) -> None:
        self.security = security or ClusterSecurity()
        self._key = self.security.key
        self._ssl = self.security.client_ssl_context() if self.security.tls else None
        self._timeout = timeout_s
        self._lock = threading.Lock()
        self._idle: dict[str, list[_Conn]] = {}
        self.reads = 0
        #: PYMOONCAKE_SAME_HOST=0: TCP only
        self.same_host = os.environ.get("PYMOONCAKE_SAME_HOST", "1") != "0"

    def _connect(self, endpoint: str) -> _Conn:
        if self.same_host:
            conn = self._connect_local(endpoint)
            if conn is not None:
                return conn
        host, port = split_host_port(endpoint)
        if port is None:
            raise InvalidParams(f"SSD read endpoint {endpoint!r} has no port")
        sock = connect_tcp(host, port, timeout_s=self._timeout, what="SSD read port")
        return _Conn(self._secure(sock, endpoint, self._ssl, host), None)

    def _secure(
        self,
        sock: socket.socket,
        endpoint: str,
        tls: ssl.SSLContext | None = None,
        host: str | None = None,
    ) -> socket.socket:
        """TLS (TCP only) and the cluster token, then the read timeout."""
        sock = secure_client(
            sock,
            ssl_context=tls,
            key=self._key,
            context=AUTH_CONTEXT,
            timeout_s=self._timeout,
            port="SSD read port",
            peer=endpoint,
            server_hostname=host,
        )
        sock.settimeout(self._timeout)
        return sock

    def _connect_local(self, endpoint: str) -> _Conn | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(unix_name(endpoint))
        except OSError:
            sock.close()
            return None  # not on this host (or an older port): TCP
        sock = self._secure(sock, endpoint)
        try:
            msg_, fds, _flags, _addr = socket.recv_fds(sock, _SHM_HEAD.size, 1)
            if len(msg_) != _SHM_HEAD.size or len(fds) != 1:
                raise ConnectionError("the SSD read port sent no staging memory")
            try:
                slots, slot_bytes = _SHM_HEAD.unpack(msg_)
                shm = mmap.mmap(fds[0], slots * slot_bytes)
            finally:
                os.close(fds[0])
        except BaseException:
            sock.close()
            raise
        return _Conn(sock, shm)

    def read(
        self,
        endpoint: str,
        keys: Sequence[str],
        sizes: Sequence[int],
        dests: Sequence[Sequence[Any]],
    ) -> list[StoreError | None]:
        """Read ``keys`` from ``endpoint`` into ``dests`` (each a list of parts:
        memoryviews or device spans, ``sizes[i]`` bytes in all)."""
        with self._lock:
            pool = self._idle.get(endpoint)
            conn = pool.pop() if pool else None
        if conn is None:
            conn = self._connect(endpoint)
        ok = False
        out: list[StoreError | None] = []
        sock = conn.sock
        try:
            sock.sendall(encode_request(list(keys), list(sizes)))
            head = bytearray(_NOTICE.size if conn.shm is not None else ITEM.size)
            hv = memoryview(head)
            ack = ITEM.pack(0)
            for parts, key in zip(dests, keys, strict=True):
                _recv_exact(sock, hv)
                if conn.shm is not None:
                    n, offset = _NOTICE.unpack(head)
                else:
                    (n,) = ITEM.unpack(head)
                    offset = -1
                if n < 0:
                    out.append(
                        store_error(
                            n, f"{key!r}: the SSD tier at {endpoint} has no readable copy any more"
                        )
                    )
                elif offset >= 0:
                    assert conn.shm is not None
                    src = memoryview(conn.shm)[offset : offset + n]
                    try:
                        _copy_out(src, parts)
                    finally:
                        src.release()
                else:
                    for part in parts:
                        if isinstance(part, DeviceSpan):
                            tmp = bytearray(len(part))
                            _recv_exact(sock, memoryview(tmp))
                            _copy_out(memoryview(tmp), [part])
                        else:
                            _recv_exact(sock, part)
                if conn.shm is not None:
                    sock.sendall(ack)
                if n >= 0:
                    out.append(None)
                    self.reads += 1
            ok = True
        finally:
            if ok:
                with self._lock:
                    self._idle.setdefault(endpoint, []).append(conn)
            else:
                conn.close()
        return out

    def close(self) -> None:
        with self._lock:
            conns = [c for pool in self._idle.values() for c in pool]
            self._idle.clear()
        for c in conns:
            c.close()


def _copy_out(src: memoryview, parts: Sequence[Any]) -> None:
    """Copy ``src`` into ``parts`` in order (host views, or device spans)."""
    at = 0
    for part in parts:
        n = len(part)
        if isinstance(part, DeviceSpan):
            chunk = bytearray(src[at : at + n])
            addr = ctypes.addressof((ctypes.c_char * n).from_buffer(chunk)) if n else 0
            if n:
                part.backend.copy(part.addr, addr, n)
        else:
            part[:] = src[at : at + n]
        at += n


# --------------------------------------------------------------------------------
# the tier
# --------------------------------------------------------------------------------


@dataclass
class SsdStats:
    offloaded: int = 0
    offload_bytes: int = 0
    refused: int = 0
    evicted: int = 0
    promoted: int = 0
    registered: int = 0
    heartbeats: int = 0
    errors: int = 0
    last_error: str = ""
    extra: dict[str, int] = field(default_factory=dict)


class SsdTier:
    """A store client's SSD tier (see the module docstring)."""

    def __init__(
        self, client: StoreClient, settings: SsdSettings, security: ClusterSecurity
    ) -> None:
        self.client = client
        self.settings = settings
        self.storage = FileStorage(
            settings.path,
            capacity_bytes=settings.capacity_bytes,
            max_keys=settings.max_keys,
            policy=settings.policy,
            verify_checksum=settings.verify_checksum,
            fsync=settings.fsync,
        )
        self.stats = SsdStats()
        self._hb_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        host = settings.rpc_host or split_host_port(client.config.local_hostname)[0]
        metrics = client.metrics

        def served(nbytes: int, n: int, latency_us: int) -> None:
            if metrics is not None:
                metrics.ssd(False, nbytes, n, latency_us)

        self.server = OffloadServer(self.storage, host, security, served)
        #: hook for tests: called with the keys just written, before the master is told
        self.after_write: Callable[[list[str]], None] | None = None

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def start(self) -> None:
        """Scan the directory, mount the tier, re-register what is on disk, and
        start the heartbeat."""
        found = self.storage.open()
        if found:
            log.info("SSD tier %s: %d object(s) found on disk", self.settings.path, len(found))
        self._mount_and_register()
        self._thread = threading.Thread(target=self._loop, name="mc-ssd-heartbeat", daemon=True)
        self._thread.start()

    def _mount_and_register(self) -> None:
        c = self.client
        c.master.call(
            omsg.MountLocalDisk(c.client_id, self.endpoint, self.storage.capacity_bytes, True)
        )
        entries = self.storage.entries()
        for i in range(0, len(entries), 4096):
            chunk = entries[i : i + 4096]
            codes = c.master.call(
                omsg.NotifyOffloadSuccess(
                    c.client_id, tuple(e.key for e in chunk), tuple(e.size for e in chunk), True
                )
            ).codes
            self._refused([e.key for e, code in zip(chunk, codes, strict=True) if code != 0])
            self.stats.registered += sum(1 for code in codes if code == 0)

    def _refused(self, keys: list[str]) -> None:
        if keys:
            self.stats.refused += len(keys)
            self.storage.unlink(self.storage.drop(keys))

    def kick(self) -> None:
        """Run a heartbeat now (tests, and a put that found memory full)."""
        self._wake.set()

    def _loop(self) -> None:
        interval = self.settings.heartbeat_interval_s
        while not self._stop.is_set():
            try:
                busy = self.heartbeat()
            except MooncakeError as exc:
                busy = False
                self.stats.errors += 1
                self.stats.last_error = str(exc)
                log.warning("SSD tier heartbeat failed: %s", exc)
            except OSError as exc:
                busy = False
                self.stats.errors += 1
                self.stats.last_error = str(exc)
                log.error("SSD tier: disk error: %s", exc)
            if not busy:
                self._wake.wait(interval)
                self._wake.clear()

    def heartbeat(self) -> bool:
        """One round of SSD work; returns whether there may be more right away."""
        with self._hb_lock:
            return self._heartbeat()

    def _heartbeat(self) -> bool:
        c = self.client
        st = self.storage
        res = c.master.call(
            omsg.OffloadHeartbeat(c.client_id, st.used_bytes, st.capacity_bytes), patient=False
        )
        self.stats.heartbeats += 1
        if res.remount:
            try:
                self._mount_and_register()
            except StoreError as exc:
                if exc.code != ErrorCode.CLIENT_NOT_FOUND:
                    raise
                return False  # the ping remounts the client first, then kicks us
            log.warning("the master did not know this client's SSD tier; mounted it again")
            return True
        drops = list(res.drop)
        if drops:
            st.unlink(st.drop(drops))
        offload = res.offload
        if offload:
            self._offload(offload)
        for key, size in res.promote:
            self._promote(key, int(size))
        return len(offload) >= 32

    def _offload(self, items: Sequence[tuple[str, int, str, int]]) -> None:
        c = self.client
        started = time.perf_counter_ns()
        done: list[tuple[str, int]] = []
        for key, size, _seg_id, addr in items:
            size = int(size)
            need = header_bytes(len(key.encode("utf-8", "surrogatepass"))) + size
            try:
                victims = self.storage.make_room(need, keep=key)
            except StorageFull as exc:
                log.warning("SSD tier: %s", exc)
                continue
            if victims:
                keys = tuple(v.key for v in victims)
                try:
                    c.master.call(omsg.BatchEvictDiskReplica(c.client_id, keys))
                finally:
                    self.storage.unlink(victims)
                self.stats.evicted += len(victims)
            view = c.local_view(int(addr), size, writable=False)
            try:
                self.storage.put(key, [view])
            finally:
                view.release()
            done.append((key, size))
        if not done:
            return
        metrics = c.metrics
        if metrics is not None:
            total = sum(s for _, s in done)
            metrics.ssd(True, total, len(done), (time.perf_counter_ns() - started) // 1000)
        written = [k for k, _ in done]
        if self.after_write is not None:
            self.after_write(written)
        codes = c.master.call(
            omsg.NotifyOffloadSuccess(c.client_id, tuple(written), tuple(s for _, s in done))
        ).codes
        self._refused([k for k, code in zip(written, codes, strict=True) if code != 0])
        ok = sum(1 for code in codes if code == 0)
        self.stats.offloaded += ok
        self.stats.offload_bytes += sum(
            s for (_, s), code in zip(done, codes, strict=True) if code == 0
        )

    def _promote(self, key: str, size: int) -> None:
        c = self.client
        buf = bytearray(size)
        try:
            self.storage.read_into(key, memoryview(buf))
        except (KeyError, CorruptObject):
            return
        try:
            reps = c.master.call(omsg.PromotionAllocStart(c.client_id, key, size)).replicas
        except StoreError as exc:
            log.debug("SSD tier: promotion of %r not started: %s", key, exc)
            return
        per_endpoint: dict[str, list[Any]] = {}
        errors: list[BaseException | None] = [None]
        for r in reps:
            rep = ReplicaDesc.from_wire(r)
            c._route_parts(
                0, rep.endpoint, rep.address, [memoryview(buf)], True, per_endpoint, errors
            )
        c._run_transfers(per_endpoint, errors)
        if errors[0] is not None:
            c.master.call(msg.PutRevoke(c.client_id, key))
            return
        c.master.call(msg.PutEnd(c.client_id, key))
        self.stats.promoted += 1

    def unmount(self) -> None:
        """Withdraw the tier at the master (its LOCAL_DISK replicas go; files stay)."""
        c = self.client
        c.master.call(omsg.UnmountLocalDisk(c.client_id))

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
        self.server.close()

    def wait_idle(self, timeout_s: float) -> None:
        """Heartbeat until nothing is handed out (tests)."""
        deadline = time.monotonic() + timeout_s
        while self.heartbeat() and time.monotonic() < deadline:
            pass


def read_shared(path: str, key: str, size: int, parts: Sequence[Any]) -> None:
    """Read ``key``'s DISK replica (a file on the shared filesystem) into ``parts``."""
    if all(isinstance(p, memoryview) for p in parts):
        read_object_into(path, key, size, parts)
        return
    tmp = bytearray(size)
    read_object_into(path, key, size, [memoryview(tmp)])
    _copy_out(memoryview(tmp), parts)
