"""The SSD tier's local object files: one file per object, crash-safe, bounded.

Theory of operation
-------------------
Each offloaded object is one file ``<root>/<xx>/<digest>.obj``: a header of
whole 4 KiB blocks (magic, version, key, value size, write sequence, CRC-32 of
the value), then the value.  The value starts on a 4 KiB boundary, so a reader
can fetch the whole file with one ``O_DIRECT`` read into an aligned buffer
(no page-cache copy, the way the reference's bucket backend reads).

**Crash safety.**  A file is written under a temporary name
(``<digest>.tmp.<pid>.<n>``), fsynced, renamed over its final name and the
directory fsynced.  A crash at any point leaves either the old state or the
complete new file: a temporary file is never taken for an object, and
:meth:`FileStorage.open` deletes leftovers.  A final file whose header is
damaged, or whose length disagrees with the header, is dropped when found
(at open, or on read: :class:`CorruptObject`); with ``verify_checksum`` the
value's CRC-32 is checked on every read too (about 2 GB/s on one core, so it is
off by default on the read path and on for :meth:`FileStorage.verify`).

**Bounded use.**  ``capacity_bytes`` (file bytes, headers included) and
``max_keys`` bound what is kept.  Making room takes the oldest files first
(FIFO; ``lru`` moves a file to the back on each read).  Eviction is two-phase,
as the reference's: :meth:`FileStorage.make_room` takes victims out of the
index (readers no longer find them) and returns them; the caller tells the
master, then :meth:`FileStorage.unlink` deletes the files.  A read that opened a
victim before it was unlinked still completes (POSIX unlink semantics).

Thread-safe: one lock guards the index; file I/O happens outside it.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import mmap
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from .._files import fsync_dir
from ..errors import InvalidParams, MooncakeError

__all__ = [
    "BLOCK",
    "CorruptObject",
    "FileEntry",
    "FileStorage",
    "StorageFull",
    "header_bytes",
    "object_path",
    "read_object_into",
    "write_object",
]

log = logging.getLogger("pymooncake.store.ssd")

#: header and value alignment (O_DIRECT needs the logical block size; 4 KiB covers
#: every NVMe/SATA device)
BLOCK: Final = 4096
_MAGIC: Final = b"MCSO"
_VERSION: Final = 1
#: magic, version, header blocks, key length, value size, sequence, crc32
_HEAD: Final = struct.Struct("<4sHHIQQI")
_SUFFIX: Final = ".obj"
_TMP: Final = ".tmp."
_tmp_counter = itertools.count()
_SUBDIR: Final = re.compile(r"[0-9a-f]{2}")
_NAME: Final = re.compile(r"[0-9a-f]{32}(\.obj|\.tmp\.\d+\.\d+)")


class CorruptObject(MooncakeError):
    """An object file is damaged (bad header, wrong length or checksum); it has
    been dropped from the index."""


class StorageFull(MooncakeError):
    """An object does not fit even after every older object was evicted
    (larger than the whole capacity)."""


def header_bytes(key_len: int) -> int:
    """Bytes of the header of a key of ``key_len`` UTF-8 bytes (whole blocks)."""
    return (_HEAD.size + key_len + BLOCK - 1) // BLOCK * BLOCK


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One stored object."""

    key: str
    path: str
    size: int
    header: int
    seq: int

    @property
    def file_bytes(self) -> int:
        return self.header + self.size


def _aligned(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


class FileStorage:
    """Objects in files under ``root`` (see the module docstring).

    Args:
        root: directory (created if missing).
        capacity_bytes: most file bytes kept (0: 90 % of the filesystem's free
            space at open, as the reference's default).
        max_keys: most objects kept.
        policy: ``fifo`` or ``lru`` (what :meth:`make_room` takes first).
        verify_checksum: check the CRC-32 of every value read.
        fsync: fsync files and directories (off only for tests of throughput).

    Raises:
        InvalidParams: bad policy or non-positive limits.
        OSError: ``root`` cannot be created.
    """

    def __init__(
        self,
        root: str,
        *,
        capacity_bytes: int = 0,
        max_keys: int = 10_000_000,
        policy: str = "fifo",
        verify_checksum: bool = False,
        fsync: bool = True,
    ) -> None:
        if policy not in ("fifo", "lru"):
            raise InvalidParams(f"SSD eviction policy {policy!r} is not fifo or lru")
        if capacity_bytes < 0 or max_keys <= 0:
            raise InvalidParams("SSD capacity must not be negative and max_keys must be positive")
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        if capacity_bytes == 0:
            st = os.statvfs(self.root)
            capacity_bytes = int(st.f_bavail * st.f_frsize * 0.9)
        self.capacity_bytes = capacity_bytes
        self.max_keys = max_keys
        self.policy = policy
        self.verify_checksum = verify_checksum
        self.fsync = fsync
        self._lock = threading.Lock()
        #: key -> entry, oldest first (the eviction order)
        self._index: dict[str, FileEntry] = {}
        self._used = 0
        self._seq = 0
        self.corrupt_dropped = 0
        self.reads = 0
        self.read_bytes = 0
        self.writes = 0
        self.write_bytes = 0
        self._direct = hasattr(os, "O_DIRECT")

    # ------------------------------------------------------------------------------
    # index
    # ------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._index)

    def entries(self) -> list[FileEntry]:
        with self._lock:
            return list(self._index.values())

    def get(self, key: str) -> FileEntry | None:
        return self._index.get(key)

    def path_of(self, key: str) -> str:
        return object_path(self.root, key)

    def open(self) -> list[FileEntry]:
        """Rebuild the index from the files (after a restart): delete temporary
        leftovers of interrupted writes and damaged files; returns the objects
        found, oldest first."""
        found: list[FileEntry] = []
        for path in self._walk():
            name = os.path.basename(path)
            if _TMP in name:
                self._remove(path)
                continue
            if not name.endswith(_SUFFIX):
                continue
            try:
                entry = self._read_header(path)
            except (CorruptObject, OSError) as exc:
                log.warning("SSD tier: dropping damaged object file %s: %s", path, exc)
                self.corrupt_dropped += 1
                self._remove(path)
                continue
            found.append(entry)
        found.sort(key=lambda e: e.seq)
        with self._lock:
            self._index.clear()
            self._used = 0
            for entry in found:
                self._index[entry.key] = entry
                self._used += entry.file_bytes
            self._seq = max((e.seq for e in found), default=0)
        return found

    def _walk(self) -> Iterator[str]:
        """Paths that look like ours (other files in the directory are left alone)."""
        for sub in sorted(os.listdir(self.root)):
            d = os.path.join(self.root, sub)
            if not _SUBDIR.fullmatch(sub) or not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                if _NAME.fullmatch(name) and name.startswith(sub):
                    yield os.path.join(d, name)

    # ------------------------------------------------------------------------------
    # writes
    # ------------------------------------------------------------------------------

    def make_room(self, file_bytes: int, keep: str = "") -> list[FileEntry]:
        """Take the oldest objects out of the index until one of ``file_bytes``
        fits (bytes and key count); returns them (delete with :meth:`unlink`
        after the master was told).  ``keep`` is never taken.

        Raises:
            StorageFull: ``file_bytes`` exceed the whole capacity.
        """
        if file_bytes > self.capacity_bytes:
            raise StorageFull(
                f"an object of {file_bytes} file bytes exceeds the SSD tier's capacity "
                f"({self.capacity_bytes} bytes); raise MOONCAKE_OFFLOAD_TOTAL_SIZE_LIMIT_BYTES"
            )
        victims: list[FileEntry] = []
        with self._lock:
            index = self._index
            if keep in index:
                file_bytes -= index[keep].file_bytes  # replaced, not added
            while index and (
                self._used + file_bytes > self.capacity_bytes or len(index) >= self.max_keys
            ):
                key = next(iter(index))
                if key == keep:
                    if len(index) == 1:
                        break
                    entry = index.pop(key)
                    index[key] = entry
                    key = next(iter(index))
                entry = index.pop(key)
                self._used -= entry.file_bytes
                victims.append(entry)
        return victims

    def unlink(self, entries: Sequence[FileEntry]) -> None:
        """Delete the files of entries taken out by :meth:`make_room` or :meth:`drop`."""
        for entry in entries:
            self._remove(entry.path)

    def put(self, key: str, parts: Sequence[memoryview]) -> FileEntry:
        """Store ``key`` (its value is ``parts`` concatenated), replacing any
        earlier file of it; durable when this returns.  Call :meth:`make_room`
        first: a put beyond the capacity is still written (the bound is enforced
        there, two-phase).

        Raises:
            OSError: the write failed (the temporary file is removed).
        """
        with self._lock:
            self._seq += 1
            seq = self._seq
        path, hlen, size = write_object(self.root, key, parts, seq, fsync=self.fsync)
        entry = FileEntry(key, path, size, hlen, seq)
        with self._lock:
            old = self._index.pop(key, None)
            if old is not None:
                self._used -= old.file_bytes
            self._index[key] = entry
            self._used += entry.file_bytes
            self.writes += 1
            self.write_bytes += size
        return entry

    @staticmethod
    def _rest(fd: int, bufs: Sequence[memoryview | bytearray], done: int) -> int:
        """Continue a short pwritev at byte ``done`` of the concatenated buffers."""
        skip = done
        rest: list[memoryview] = []
        for b in bufs:
            v = memoryview(b)
            if skip >= len(v):
                skip -= len(v)
                continue
            rest.append(v[skip:])
            skip = 0
        return os.pwritev(fd, rest, done)

    def drop(self, keys: Sequence[str]) -> list[FileEntry]:
        """Take ``keys`` out of the index (the master dropped their replicas);
        returns their entries for :meth:`unlink`."""
        out: list[FileEntry] = []
        with self._lock:
            for key in keys:
                entry = self._index.pop(key, None)
                if entry is not None:
                    self._used -= entry.file_bytes
                    out.append(entry)
        return out

    # ------------------------------------------------------------------------------
    # reads
    # ------------------------------------------------------------------------------

    def _entry(self, key: str) -> FileEntry:
        with self._lock:
            entry = self._index.get(key)
            if entry is not None and self.policy == "lru":
                del self._index[key]
                self._index[key] = entry
        if entry is None:
            raise KeyError(key)
        return entry

    def read_into(self, key: str, dest: memoryview) -> int:
        """Read the value of ``key`` into ``dest`` (at least its size); returns
        the size.  Buffered I/O (the page cache may serve it).

        Raises:
            KeyError: not stored.
            CorruptObject: the file is damaged (it is dropped).
        """
        entry = self._entry(key)
        if len(dest) < entry.size:
            raise InvalidParams(f"buffer of {len(dest)} bytes for {entry.size} bytes of {key!r}")
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise self._corrupt(entry, "its file is missing") from None
        try:
            head = os.pread(fd, _HEAD.size, 0)
            self._check_head(entry, head, os.fstat(fd).st_size)
            view = dest[: entry.size]
            done = 0
            while done < entry.size:
                n = os.preadv(fd, [view[done:]], entry.header + done)
                if n <= 0:
                    raise self._corrupt(entry, "the file ends early")
                done += n
        finally:
            os.close(fd)
        self._verify(entry, head, view)
        self._count(entry.size)
        return entry.size

    def read_direct(self, key: str, scratch: mmap.mmap | memoryview) -> memoryview:
        """Read the whole file of ``key`` with one ``O_DIRECT`` read (bypassing the
        page cache) into ``scratch`` (page-aligned, at least
        :meth:`direct_bytes`); returns the value's view inside it (it starts at
        the entry's ``header`` offset: :meth:`read_direct_entry`).  Falls back to
        buffered reads where ``O_DIRECT`` is refused (tmpfs).

        Raises:
            KeyError, CorruptObject: as :meth:`read_into`.
        """
        return self.read_direct_entry(key, scratch)[1]

    def read_direct_entry(
        self, key: str, scratch: mmap.mmap | memoryview
    ) -> tuple[FileEntry, memoryview]:
        """:meth:`read_direct`, also returning the entry that was read."""
        entry = self._entry(key)
        need = _aligned(entry.file_bytes)
        if len(scratch) < need:
            raise InvalidParams(f"scratch buffer of {len(scratch)} bytes for {need} bytes")
        fd = -1
        if self._direct:
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
            except FileNotFoundError:
                raise self._corrupt(entry, "its file is missing") from None
            except OSError:
                self._direct = False
        if fd < 0:
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise self._corrupt(entry, "its file is missing") from None
        buf = memoryview(scratch)
        try:
            file_size = os.fstat(fd).st_size
            done = 0
            while done < entry.file_bytes:
                try:
                    n = os.preadv(fd, [buf[done:need]], done)
                except OSError:
                    if not self._direct:
                        raise
                    self._direct = False  # e.g. EINVAL on a filesystem without O_DIRECT
                    os.close(fd)
                    fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
                    continue
                if n <= 0:
                    break
                done += n
            head = bytes(buf[: _HEAD.size])
            self._check_head(entry, head, file_size)
            if done < entry.file_bytes:
                raise self._corrupt(entry, "the file ends early")
        finally:
            os.close(fd)
        value = buf[entry.header : entry.header + entry.size]
        self._verify(entry, head, value)
        self._count(entry.size)
        return entry, value

    def direct_bytes(self, key: str) -> int:
        """Scratch bytes :meth:`read_direct` needs for ``key`` (KeyError if absent)."""
        entry = self._index.get(key)
        if entry is None:
            raise KeyError(key)
        return _aligned(entry.file_bytes)

    def verify(self, key: str) -> None:
        """Read ``key`` and check its checksum (raises CorruptObject/KeyError)."""
        entry = self._entry(key)
        buf = bytearray(entry.size)
        saved, self.verify_checksum = self.verify_checksum, True
        try:
            self.read_into(key, memoryview(buf))
        finally:
            self.verify_checksum = saved

    def _count(self, size: int) -> None:
        self.reads += 1
        self.read_bytes += size

    def _check_head(self, entry: FileEntry, head: bytes, file_size: int) -> None:
        if len(head) < _HEAD.size:
            raise self._corrupt(entry, "the header is truncated")
        magic, version, blocks, _klen, size, seq, _crc = _HEAD.unpack_from(head)
        if magic != _MAGIC or version != _VERSION or blocks * BLOCK != entry.header:
            raise self._corrupt(entry, "the header is not an object header")
        if size != entry.size or seq != entry.seq or file_size != entry.file_bytes:
            raise self._corrupt(
                entry,
                f"its length ({file_size} bytes) or header disagrees with the index "
                f"({entry.file_bytes} bytes)",
            )

    def _verify(self, entry: FileEntry, head: bytes, value: memoryview) -> None:
        if self.verify_checksum:
            crc = _HEAD.unpack_from(head)[6]
            if zlib.crc32(value) != crc:
                raise self._corrupt(entry, "its checksum does not match the value")

    def _corrupt(self, entry: FileEntry, why: str) -> CorruptObject:
        with self._lock:
            if self._index.get(entry.key) is entry:
                del self._index[entry.key]
                self._used -= entry.file_bytes
        self.corrupt_dropped += 1
        self._remove(entry.path)
        log.warning(
            "SSD tier: object %r in %s is damaged (%s); dropped", entry.key, entry.path, why
        )
        return CorruptObject(f"SSD object {entry.key!r} ({entry.path}) is damaged: {why}")

    def _read_header(self, path: str) -> FileEntry:
        with open(path, "rb") as f:
            head = f.read(BLOCK)
            file_size = os.fstat(f.fileno()).st_size
            if len(head) < _HEAD.size:
                raise CorruptObject("the header is truncated")
            magic, version, blocks, klen, size, seq, _crc = _HEAD.unpack_from(head)
            if magic != _MAGIC or version != _VERSION:
                raise CorruptObject("not an object file")
            hlen = blocks * BLOCK
            if hlen != header_bytes(klen):
                raise CorruptObject("inconsistent header length")
            if hlen > BLOCK:
                head += f.read(hlen - BLOCK)
        if file_size != hlen + size:
            raise CorruptObject(f"{file_size} bytes on disk, the header says {hlen + size}")
        try:
            key = head[_HEAD.size : _HEAD.size + klen].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise CorruptObject("the key is not UTF-8") from None
        if self.path_of(key) != path:
            raise CorruptObject("the file name does not match its key")
        return FileEntry(key, path, size, hlen, seq)

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------------
# files without an index (the shared filesystem of --root_fs_dir)
# --------------------------------------------------------------------------------


def object_path(root: str, key: str) -> str:
    """Where the file of ``key`` lives under ``root`` (hash-sharded names: any key
    is a valid name, 256 directories)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return os.path.join(root, digest[:2], digest + _SUFFIX)


def write_object(
    root: str, key: str, parts: Sequence[memoryview], seq: int, *, fsync: bool
) -> tuple[str, int, int]:
    """Write ``key``'s file under ``root`` (temporary name, optional fsync, rename);
    returns its path, header bytes and value bytes.

    Raises:
        OSError: the write failed (the temporary file is removed).
    """
    kb = key.encode("utf-8", "surrogatepass")
    size = sum(len(p) for p in parts)
    hlen = header_bytes(len(kb))
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    head = bytearray(hlen)
    _HEAD.pack_into(head, 0, _MAGIC, _VERSION, hlen // BLOCK, len(kb), size, seq, crc)
    head[_HEAD.size : _HEAD.size + len(kb)] = kb
    path = object_path(root, key)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    tmp = f"{path[: -len(_SUFFIX)]}{_TMP}{os.getpid()}.{next(_tmp_counter)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            bufs: list[memoryview | bytearray] = [head, *parts]
            total = hlen + size
            done = os.pwritev(fd, bufs, 0)
            while done < total:
                n = FileStorage._rest(fd, bufs, done)
                if n <= 0:
                    raise OSError(f"short write to {tmp}")
                done += n
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        FileStorage._remove(tmp)
        raise
    if fsync:
        fsync_dir(d)
    return path, hlen, size


def read_object_into(path: str, key: str, size: int, dest: Sequence[memoryview]) -> None:
    """Read the value of ``key`` (``size`` bytes) from its file at ``path`` into
    ``dest`` (filled in order), checking the header names that key and size.

    Raises:
        FileNotFoundError: no such file.
        CorruptObject: the file is not ``key``'s value of ``size`` bytes.
    """
    with open(path, "rb", buffering=0) as f:
        head = f.read(BLOCK)
        if len(head) < _HEAD.size:
            raise CorruptObject(f"{path}: the header is truncated")
        magic, version, blocks, klen, fsize, _seq, _crc = _HEAD.unpack_from(head)
        hlen = blocks * BLOCK
        if magic != _MAGIC or version != _VERSION or hlen != header_bytes(klen):
            raise CorruptObject(f"{path}: not an object file")
        if hlen > BLOCK:
            head += f.read(hlen - BLOCK)
        name = head[_HEAD.size : _HEAD.size + klen].decode("utf-8", "surrogatepass")
        if name != key or fsize != size:
            raise CorruptObject(f"{path}: holds {name!r} ({fsize} bytes), not {key!r} ({size})")
        if os.fstat(f.fileno()).st_size != hlen + size:
            raise CorruptObject(f"{path}: its length disagrees with its header")
        at = hlen
        fd = f.fileno()
        for part in dest:
            done = 0
            while done < len(part):
                n = os.preadv(fd, [part[done:]], at + done)
                if n <= 0:
                    raise CorruptObject(f"{path}: the file ends early")
                done += n
            at += len(part)
