"""Ranged and session reads of ``MooncakeDistributedStore`` (``get_into_ranges``
and SGLang's ``batch_get_session_*`` / ``batch_get_into_multi_buffer_ranges``)."""

from __future__ import annotations

import logging

from pymooncake.errors import MooncakeError
from pymooncake.store import ErrorCode, StoreClient
from pymooncake.store._client import ObjectLocation

from ._store_codes import store_code, store_codes

__all__ = ["RangeReads"]

log = logging.getLogger("mooncake.store")


class RangeReads:
    """Mixin: needs ``_c()`` (the live client) and ``_sessions``."""

    _sessions: dict[str, ObjectLocation]

    def _c(self) -> StoreClient:
        raise NotImplementedError

    def get_into_ranges(
        self,
        buffer_ptrs: list[int],
        all_keys: list[list[str]],
        all_dst_offsets: list[list[list[int]]],
        all_src_offsets: list[list[list[int]]],
        all_sizes: list[list[list[int]]],
    ) -> list[list[list[int]]]:
        """Read byte ranges of several objects into several registered buffers."""
        n = len(buffer_ptrs)
        if not n == len(all_keys) == len(all_dst_offsets) == len(all_src_offsets) == len(all_sizes):
            log.error("get_into_ranges: the per-buffer lists differ in length")
            return [[[int(ErrorCode.INVALID_PARAMS)] for _ in keys] for keys in all_keys]
        try:
            client = self._c()
        except MooncakeError as exc:
            return [[[store_code(exc)] for _ in keys] for keys in all_keys]
        out: list[list[list[int]]] = []
        flat_keys: list[str] = []
        flat_ranges: list[list[tuple[memoryview, int]]] = []
        slots: list[tuple[int, int]] = []
        for b, ptr in enumerate(buffer_ptrs):
            row: list[list[int]] = []
            region = client.engine.registry.find(ptr, 1)
            limit = region.end - ptr if region is not None else None
            for k, key in enumerate(all_keys[b]):
                dst, src, sizes = all_dst_offsets[b][k], all_src_offsets[b][k], all_sizes[b][k]
                if not len(dst) == len(src) == len(sizes):
                    row.append([int(ErrorCode.INVALID_PARAMS)])
                    continue
                if not sizes:
                    row.append([])
                    continue
                if limit is None:
                    row.append([int(ErrorCode.INVALID_PARAMS)] * len(sizes))
                    continue
                ranges = []
                bad = False
                for d, s_, z in zip(dst, src, sizes, strict=True):
                    if d < 0 or z < 0 or d + z > limit:
                        bad = True
                        break
                    ranges.append((client.engine.local_view(ptr + d, z, writable=True), s_))
                if bad:
                    row.append([int(ErrorCode.INVALID_PARAMS)] * len(sizes))
                    continue
                row.append([0] * len(sizes))
                slots.append((b, k))
                flat_keys.append(key)
                flat_ranges.append(ranges)
            out.append(row)
        if flat_keys:
            try:
                locs = client.locate(flat_keys)
            except MooncakeError as exc:
                for b, k in slots:
                    out[b][k] = [store_code(exc)] * len(out[b][k])
                return out
            ok = [i for i, loc in enumerate(locs) if isinstance(loc, ObjectLocation)]
            for i, loc in enumerate(locs):
                if not isinstance(loc, ObjectLocation):
                    b, k = slots[i]
                    out[b][k] = [store_code(loc)] * len(out[b][k])
            results = client.read_ranges([locs[i] for i in ok], [flat_ranges[i] for i in ok])  # type: ignore[misc]
            for i, res in zip(ok, results, strict=True):
                b, k = slots[i]
                out[b][k] = store_codes(res, "get_into_ranges")
        return out

    # --- sessions (SGLang direct linker) -------------------------------------------------

    def batch_get_session_start(self, keys: list[str]) -> list[int]:
        try:
            locs = self._c().locate(keys)
        except MooncakeError as exc:
            return [store_code(exc)] * len(keys)
        out = []
        for key, loc in zip(keys, locs, strict=True):
            if isinstance(loc, ObjectLocation):
                self._sessions[key] = loc
                out.append(0)  # reference: 0 per started key
            else:
                out.append(store_code(loc))
        return out

    def batch_get_into_multi_buffer_ranges(
        self,
        keys: list[str],
        all_buffer_ptrs: list[list[int]],
        all_sizes: list[list[int]],
        all_src_offsets: list[list[int]],
    ) -> list[int]:
        try:
            client = self._c()
        except MooncakeError as exc:
            return [store_code(exc)] * len(keys)
        out = [0] * len(keys)
        locs: list[ObjectLocation] = []
        ranges: list[list[tuple[memoryview, int]]] = []
        idx = []
        for i, key in enumerate(keys):
            loc = self._sessions.get(key)
            if loc is None:
                out[i] = int(ErrorCode.INVALID_PARAMS)
                log.error(
                    "batch_get_into_multi_buffer_ranges: no session for %r (call batch_get_session_start)",
                    key,
                )
                continue
            try:
                frags = [
                    (client.engine.local_view(p, n, writable=True), s)
                    for p, n, s in zip(
                        all_buffer_ptrs[i], all_sizes[i], all_src_offsets[i], strict=True
                    )
                ]
            except (MooncakeError, ValueError) as exc:
                out[i] = store_code(exc)
                continue
            locs.append(loc)
            ranges.append(frags)
            idx.append(i)
        for i, res in zip(idx, client.read_ranges(locs, ranges), strict=True):
            bad = [r for r in res if isinstance(r, BaseException)]
            out[i] = store_code(bad[0]) if bad else sum(r for r in res if isinstance(r, int))
        return out

    def batch_get_session_end(self, keys: list[str]) -> int:
        for key in keys:
            self._sessions.pop(key, None)
        return 0
