"""Put sessions and segment management of ``MooncakeDistributedStore``.

Put sessions (``batch_put_session_start`` ... ``_end``/``_revoke``) reserve
objects and fill byte ranges of them before publishing; the work is in
:mod:`pymooncake.store._sessions`.  Segment management (``mount_segment``,
``allocate_and_mount_segment``, ``unmount_segment``,
``unmount_and_free_segment``, ``unmount_local_disk_segment``) is what the
store service's ``/api/mount*`` routes call: a file (e.g. ``/dev/shm/<name>``)
or fresh memory becomes one more segment of this client.

Grace periods: the reference asks the master to stop placing objects in a
segment and unmounts it after ``grace_period_seconds`` (``GracefulUnmountSegment``).
This master has no such call yet, so a graceful unmount here returns at
once and unmounts when the period ends (objects may still be placed there
meanwhile); ``close()`` finishes pending ones at once.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from pymooncake.errors import MooncakeError, StoreError
from pymooncake.store import ErrorCode, StoreClient
from pymooncake.store import ReplicateConfig as _NativeConfig
from pymooncake.store._api import StoreApi
from pymooncake.store._sessions import PutSessions

from ._store_codes import store_code
from ._store_types import ReplicateConfig

__all__ = ["SegmentOps", "SessionOps"]

log = logging.getLogger("mooncake.store")
_INVALID = int(ErrorCode.INVALID_PARAMS)
#: the reference rounds allocated segments up to whole slabs (Slab::kSize)
_SLAB_BYTES = 16 << 20


def _codes(results: Sequence[Any], what: str) -> list[int]:
    out = []
    for r in results:
        if isinstance(r, StoreError):
            log.debug("%s: %s", what, r)
            out.append(r.code)
        elif isinstance(r, bool):
            out.append(0)
        else:
            out.append(int(r))
    return out


class SessionOps:
    """Mixin: put sessions.  Needs ``_client``, ``_cfg()`` and ``_put_sessions``."""

    _client: StoreApi | None
    _put_sessions: PutSessions | None

    @staticmethod
    def _cfg(config: ReplicateConfig | None) -> _NativeConfig:
        raise NotImplementedError

    def _dummy_refuses(self, what: str) -> bool:
        """Put sessions need a full client: a dummy answers INVALID_PARAMS per key
        (the reference's PyClient default for DummyClient)."""
        if self._client is None or isinstance(self._client, StoreClient):
            return False
        log.error("%s: put sessions need a full client (setup()), not a dummy client", what)
        return True

    def _sessions_or_none(self) -> PutSessions | None:
        client = self._client
        if client is None:
            log.error("put session: the store is not set up; call setup() first")
            return None
        if not isinstance(client, StoreClient):
            return None
        if self._put_sessions is None:
            self._put_sessions = PutSessions(client)
        return self._put_sessions

    def batch_put_session_start(
        self, keys: list[str], sizes: list[int], config: ReplicateConfig | None = None
    ) -> list[int]:
        """Reserve objects (invisible until ``batch_put_session_end``); 0 or a code per key."""
        if self._dummy_refuses("batch_put_session_start"):
            return [_INVALID] * len(keys)
        sessions = self._sessions_or_none()
        if sessions is None:
            return []
        if len(keys) != len(sizes):
            log.error("batch_put_session_start: %d keys but %d sizes", len(keys), len(sizes))
            return [_INVALID] * len(keys)
        if (
            config is not None
            and config.group_ids is not None
            and len(config.group_ids) != len(keys)
        ):
            log.error("batch_put_session_start: group_ids must have one entry per key")
            return [_INVALID] * len(keys)
        try:
            return _codes(sessions.start(keys, sizes, self._cfg(config)), "batch_put_session_start")
        except MooncakeError as exc:
            log.error("batch_put_session_start failed: %s", exc)
            return [store_code(exc)] * len(keys)

    def batch_put_from_multi_buffer_ranges(
        self,
        keys: list[str],
        all_buffer_ptrs: list[list[int]],
        all_sizes: list[list[int]],
        all_dst_offsets: list[list[int]],
    ) -> list[int]:
        """Write ranges of local memory at object offsets of open sessions;
        bytes written (or a code) per key."""
        if self._dummy_refuses("batch_put_from_multi_buffer_ranges"):
            return [_INVALID] * len(keys)
        sessions = self._sessions_or_none()
        if sessions is None or not isinstance(self._client, StoreClient):
            return []
        n = len(keys)
        if not n == len(all_buffer_ptrs) == len(all_sizes) == len(all_dst_offsets):
            log.error("batch_put_from_multi_buffer_ranges: argument lists differ in length")
            return [_INVALID] * n
        engine = self._client.engine
        ranges: list[list[tuple[memoryview, int]] | None] = []
        for i in range(n):
            ptrs, sizes, offs = all_buffer_ptrs[i], all_sizes[i], all_dst_offsets[i]
            if not len(ptrs) == len(sizes) == len(offs):
                ranges.append(None)
                continue
            try:
                ranges.append(
                    [
                        (engine.local_view(p, z, writable=False), o)
                        for p, z, o in zip(ptrs, sizes, offs, strict=True)
                    ]
                )
            except MooncakeError as exc:
                log.error("batch_put_from_multi_buffer_ranges(%r): %s", keys[i], exc)
                ranges.append(None)
        todo = [i for i in range(n) if ranges[i] is not None]
        out = [_INVALID] * n
        try:
            results = sessions.write_ranges(
                [keys[i] for i in todo], [ranges[i] or [] for i in todo]
            )
        except MooncakeError as exc:
            log.error("batch_put_from_multi_buffer_ranges failed: %s", exc)
            return [store_code(exc)] * n
        for i, code in zip(
            todo, _codes(results, "batch_put_from_multi_buffer_ranges"), strict=True
        ):
            out[i] = code
        return out

    def batch_put_session_end(self, keys: list[str]) -> list[int]:
        """Publish the objects; 0 or a code per key (a failed key keeps its session)."""
        if self._dummy_refuses("batch_put_session_end"):
            return [_INVALID] * len(keys)
        sessions = self._sessions_or_none()
        if sessions is None:
            return []
        return _codes(sessions.end(keys), "batch_put_session_end")

    def batch_put_session_revoke(self, keys: list[str]) -> list[int]:
        """Give the reserved space back; 0 or a code per key."""
        if self._dummy_refuses("batch_put_session_revoke"):
            return [_INVALID] * len(keys)
        sessions = self._sessions_or_none()
        if sessions is None:
            return []
        return _codes(sessions.revoke(keys), "batch_put_session_revoke")


class SegmentOps:
    """Mixin: segments mounted after setup.  Needs ``_client``."""

    _client: StoreApi | None

    def _full_client(self, what: str) -> StoreClient | None:
        """The set-up full client; None (after logging why) before setup or for a
        dummy client, which has no memory of its own to mount (reference: -1)."""
        client = self._client
        if client is None:
            log.error("%s: the store is not set up; call setup() first", what)
            return None
        if not isinstance(client, StoreClient):
            log.error(
                "%s requires a full client (setup()); a dummy client's memory belongs to its "
                "mooncake_client",
                what,
            )
            return None
        return client

    def _segment_state(self) -> dict[str, Any]:
        state: dict[str, Any] | None = getattr(self, "_mounted", None)
        if state is None:
            state = {"files": {}, "allocated": {}, "timers": {}, "lock": threading.Lock()}
            self._mounted = state
        return state

    def mount_segment(
        self, path: str, size: int, offset: int = 0, protocol: str = "tcp", location: str = ""
    ) -> dict[str, Any]:
        """Map ``size`` bytes of the file ``path`` at ``offset`` (page-aligned) and
        offer them as a segment.  Returns ``{"ret": 0|-1, "segment_ids": [...]}``."""
        result: dict[str, Any] = {"ret": -1, "segment_ids": []}
        client = self._full_client("mount_segment")
        if client is None:
            return result
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            log.error("mount_segment: cannot open %s: %s", path, exc)
            return result
        try:
            file_size = os.fstat(fd).st_size
            if size <= 0 or offset < 0 or offset > file_size or size > file_size - offset:
                log.error(
                    "mount_segment: range [offset=%d, size=%d] exceeds the %d-byte file %s",
                    offset,
                    size,
                    file_size,
                    path,
                )
                return result
            if offset % mmap.PAGESIZE:
                log.error(
                    "mount_segment: offset %d is not page-aligned (page size %d)",
                    offset,
                    mmap.PAGESIZE,
                )
                return result
            mapping = mmap.mmap(
                fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
            )
        except OSError as exc:
            log.error("mount_segment: mapping %s failed: %s", path, exc)
            return result
        finally:
            os.close(fd)
        region = None
        try:
            region = client.engine.register(mapping, size)
            info = client.mount_registered(region.addr, size)
        except MooncakeError as exc:
            log.error("mount_segment(%s) failed: %s", path, exc)
            if region is not None:
                try:
                    client.engine.unregister(region.addr)
                except MooncakeError:
                    pass
            _close_mapping(mapping)
            return result
        state = self._segment_state()
        with state["lock"]:
            state["files"][info.id] = (mapping, region.addr)
        return {"ret": 0, "segment_ids": [info.id]}

    def allocate_and_mount_segment(
        self, size: int, protocol: str = "tcp", location: str = ""
    ) -> dict[str, Any]:
        """Allocate ``size`` bytes (rounded up to 16 MiB) and offer them as a segment.
        Returns ``{"ret", "segment_ids", "allocated_size"}``."""
        result: dict[str, Any] = {"ret": -1, "segment_ids": [], "allocated_size": 0}
        client = self._full_client("allocate_and_mount_segment")
        if client is None:
            return result
        if size <= 0:
            log.error("allocate_and_mount_segment: size must be positive, got %d", size)
            return result
        aligned = -(-size // _SLAB_BYTES) * _SLAB_BYTES
        try:
            info = client.mount(aligned)
        except MooncakeError as exc:
            log.error("allocate_and_mount_segment(%d) failed: %s", aligned, exc)
            return result
        state = self._segment_state()
        with state["lock"]:
            state["allocated"][info.id] = info.base
        return {"ret": 0, "segment_ids": [info.id], "allocated_size": aligned}

    def _unmount(
        self, kind: str, segment_ids: Sequence[str], grace_period_seconds: int, what: str
    ) -> int:
        client = self._client
        if client is None:
            log.error("%s: the store is not set up; call setup() first", what)
            return -1
        state = self._segment_state()
        first_error = 0
        for sid in segment_ids:
            with state["lock"]:
                known = sid in state[kind] and sid not in state["timers"]
            if not known:
                origin = "mount_segment" if kind == "files" else "allocate_and_mount_segment"
                log.error("%s: segment %r was not mounted by %s", what, sid, origin)
                first_error = first_error or -1
                continue
            if grace_period_seconds > 0:
                timer = threading.Timer(grace_period_seconds, self._unmount_now, (kind, sid, what))
                timer.daemon = True
                with state["lock"]:
                    state["timers"][sid] = (timer, kind)
                timer.start()
                continue
            first_error = first_error or self._unmount_now(kind, sid, what)
        return first_error

    def _unmount_now(self, kind: str, sid: str, what: str) -> int:
        client = self._client
        state = self._segment_state()
        with state["lock"]:
            state["timers"].pop(sid, None)
            entry = state[kind].pop(sid, None)
        if entry is None or not isinstance(client, StoreClient) or client.closed:
            return -1 if entry is None else 0
        rc = 0
        try:
            client.unmount(sid)
        except MooncakeError as exc:
            log.error("%s(%r) failed: %s", what, sid, exc)
            rc = store_code(exc)
        try:
            if kind == "files":
                mapping, addr = entry
                client.engine.unregister(addr)
                _close_mapping(mapping)
            else:
                client.engine.free(entry)
        except MooncakeError as exc:
            log.warning("%s(%r): releasing its memory failed: %s", what, sid, exc)
        return rc

    def unmount_segment(self, segment_ids: list[str], grace_period_seconds: int = 0) -> int:
        """Withdraw segments from ``mount_segment``; 0 or the first error."""
        return self._unmount("files", segment_ids, grace_period_seconds, "unmount_segment")

    def unmount_and_free_segment(
        self, segment_ids: list[str], grace_period_seconds: int = 0
    ) -> int:
        """Withdraw segments from ``allocate_and_mount_segment`` and free their memory."""
        return self._unmount(
            "allocated", segment_ids, grace_period_seconds, "unmount_and_free_segment"
        )

    def unmount_local_disk_segment(self, grace_period_seconds: int = 0) -> int:
        """Deregister the SSD offload tier at the master (its LOCAL_DISK replicas
        go; the files stay and are registered again by the next setup).  Without
        SSD offload there is nothing to do, as in the reference."""
        client = self._client
        if client is None:
            log.error("unmount_local_disk_segment: the store is not set up; call setup() first")
            return -1
        ssd = getattr(client, "ssd", None)
        if ssd is None:
            log.warning("unmount_local_disk_segment: SSD offload is not enabled; nothing to drain")
            return 0
        if grace_period_seconds > 0:
            time.sleep(min(grace_period_seconds, 3600))
        try:
            ssd.unmount()
        except MooncakeError as exc:
            log.error("unmount_local_disk_segment failed: %s", exc)
            return store_code(exc)
        return 0

    def get_offload_rpc_read_count(self) -> int:
        """Objects this client read from SSD tiers (through their read ports)."""
        client = self._client
        reader = getattr(client, "ssd_reader", None)
        return 0 if reader is None else int(reader.reads)

    def _release_segments(self) -> list[mmap.mmap]:
        """Before the client closes: run pending graceful unmounts at once and
        forget the mounted segments (they go away with the client).  Returns
        the mapped files, to close once the engine has let go of them."""
        state = getattr(self, "_mounted", None)
        if state is None:
            return []
        with state["lock"]:
            timers = list(state["timers"].items())
        for sid, (timer, kind) in timers:
            timer.cancel()
            self._unmount_now(kind, sid, "close")
        with state["lock"]:
            files = [mapping for mapping, _addr in state["files"].values()]
            state["files"].clear()
            state["allocated"].clear()
        return files


def close_mappings(mappings: Sequence[mmap.mmap]) -> None:
    for mapping in mappings:
        _close_mapping(mapping)


def _close_mapping(mapping: mmap.mmap) -> None:
    try:
        mapping.close()
    except BufferError:  # a view still points into it; it is unmapped when the view goes
        pass
