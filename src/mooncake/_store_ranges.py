"""Ranged and session reads of ``MooncakeDistributedStore`` (``get_into_ranges``
and SGLang's ``batch_get_session_*`` / ``batch_get_into_multi_buffer_ranges``)."""

from __future__ import annotations

import logging
import time

from pymooncake.errors import LeaseExpired, MooncakeError
from pymooncake.store import ErrorCode
from pymooncake.store._api import StoreApi
from pymooncake.store._client import ObjectLocation

from ._store_codes import store_code, store_codes

__all__ = ["RangeReads"]

log = logging.getLogger("mooncake.store")


class RangeReads:
    """Mixin: needs ``_c()`` (the live client) and ``_sessions``."""

    _sessions: dict[str, ObjectLocation]

    def _c(self) -> StoreApi:
        raise NotImplementedError

    def get_into_ranges(
        self,
        buffer_ptrs: list[int],
        all_keys: list[list[str]],
        all_dst_offsets: list[list[list[int]]],
        all_src_offsets: list[list[list[int]]],
        all_sizes: list[list[list[int]]],
    ) -> list[list[list[int]]]:
        """Read byte ranges of several objects into several registered buffers.

        Results mirror the request: ``[buffer][key][fragment]`` = bytes read or
        a negative code.  A key whose offset/size lists differ, a fragment
        outside its buffer (``buffer_ptrs[i]`` must be inside registered
        memory) or outside its object fails with INVALID_PARAMS on its own; a
        missing key fails only its own fragments.
        """
        out = _error_rows(
            len(buffer_ptrs), all_keys, all_dst_offsets, int(ErrorCode.INVALID_PARAMS)
        )
        n = len(buffer_ptrs)
        if not n == len(all_keys) == len(all_dst_offsets) == len(all_src_offsets) == len(all_sizes):
            log.error("get_into_ranges: the per-buffer lists differ in length")
            return out
        try:
            client = self._c()
        except MooncakeError as exc:
            log.error("get_into_ranges failed: %s", exc)
            return _error_rows(n, all_keys, all_dst_offsets, store_code(exc))
        # (buffer, key, fragment) -> destination view, for the fragments that fit
        plans: dict[str, list[tuple[int, int, int, memoryview, int]]] = {}
        for b, ptr in enumerate(buffer_ptrs):
            end = client.registered_end(ptr) if ptr else 0
            room = end - ptr if end else 0
            keys = all_keys[b]
            dsts, srcs, sizes = all_dst_offsets[b], all_src_offsets[b], all_sizes[b]
            if room <= 0 or not len(keys) == len(dsts) == len(srcs) == len(sizes):
                continue
            for k, key in enumerate(keys):
                dst, src, size = dsts[k], srcs[k], sizes[k]
                if not len(dst) == len(src) == len(size):
                    continue
                for f, (d, s_, z) in enumerate(zip(dst, src, size, strict=True)):
                    if d < 0 or s_ < 0 or z < 0 or d > room or z > room - d:
                        continue  # stays INVALID_PARAMS
                    view = (
                        client.local_view(ptr + d, z, writable=True)
                        if z
                        else memoryview(bytearray(0))
                    )
                    plans.setdefault(key, []).append((b, k, f, view, s_))
        if not plans:
            return out
        keys = list(plans)
        try:
            locs = client.locate(keys)
        except MooncakeError as exc:
            for frags in plans.values():
                for b, k, f, _v, _s in frags:
                    out[b][k][f] = store_code(exc)
            return out
        found: list[ObjectLocation] = []
        ranges: list[list[tuple[memoryview, int]]] = []
        placed: list[list[tuple[int, int, int]]] = []
        for key, loc in zip(keys, locs, strict=True):
            if not isinstance(loc, ObjectLocation):
                for b, k, f, _v, _s in plans[key]:
                    out[b][k][f] = store_code(loc)
                continue
            found.append(loc)
            ranges.append([(v, s_) for _b, _k, _f, v, s_ in plans[key]])
            placed.append([(b, k, f) for b, k, f, _v, _s in plans[key]])
        for where, res in zip(placed, client.read_ranges(found, ranges), strict=True):
            for (b, k, f), code in zip(where, store_codes(res, "get_into_ranges"), strict=True):
                out[b][k][f] = code
        return out

    # --- sessions (SGLang direct linker) -------------------------------------------------

    def batch_get_session_start(self, keys: list[str]) -> list[int]:
        if not keys:
            return []
        try:
            locs = self._c().locate(keys)
        except MooncakeError as exc:
            return [store_code(exc)] * len(keys)
        out = []
        for key, loc in zip(keys, locs, strict=True):
            if isinstance(loc, ObjectLocation) and loc.replicas:
                self._sessions[key] = loc
                out.append(0)  # reference: 0 per started key
            else:
                self._sessions.pop(key, None)
                out.append(
                    store_code(loc)
                    if not isinstance(loc, ObjectLocation)
                    else int(ErrorCode.INVALID_REPLICA)
                )
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
            if time.monotonic() >= loc.lease_deadline:
                self._sessions.pop(key, None)
                out[i] = int(ErrorCode.LEASE_EXPIRED)
                continue
            try:
                frags = [
                    (client.local_view(p, n, writable=True), s)
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
            if bad and isinstance(bad[0], LeaseExpired):
                self._sessions.pop(keys[i], None)  # the session is over: start a new one
            out[i] = store_code(bad[0]) if bad else sum(r for r in res if isinstance(r, int))
        return out

    def batch_get_session_end(self, keys: list[str]) -> int:
        for key in keys:
            self._sessions.pop(key, None)
        return 0


def _error_rows(
    buffers: int, all_keys: list[list[str]], all_dst_offsets: list[list[list[int]]], code: int
) -> list[list[list[int]]]:
    """Results shaped like the request, every fragment failed with ``code``
    (``build_ranged_read_results_like``: one fragment per destination offset)."""
    out = []
    for i in range(buffers):
        keys = all_keys[i] if i < len(all_keys) else [""]
        dsts = all_dst_offsets[i] if i < len(all_dst_offsets) else []
        out.append([[code] * (len(dsts[j]) if j < len(dsts) else 1) for j in range(len(keys))])
    return out
