"""The master's RPC surface: wire parameters -> typed :class:`MasterState` calls -> wire results.

An explicit ``{MasterMethod: handler}`` table; every handler takes the request
parameters and the current time and returns a JSON-able value or raises a
:class:`StoreError`.  Batch methods return ``[[code, value], ...]`` per key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...errors import StoreError
from ...wire import PROTOCOL_VERSION, MasterMethod
from .._types import ReplicateConfig, SegmentInfo
from ._objects import Replica
from ._state import MasterState

__all__ = ["Handler", "build_handlers"]

Handler = Callable[[dict[str, Any], float], Any]
M = MasterMethod


def _each(keys: list[str], fn: Callable[[int, str], Any]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for i, key in enumerate(keys):
        try:
            out.append([0, fn(i, key)])
        except StoreError as exc:
            out.append([exc.code, exc.message])
    return out


def _keys(p: dict[str, Any]) -> list[str]:
    keys = p["keys"]
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise TypeError("'keys' must be a list of strings")
    return keys


def build_handlers(st: MasterState) -> dict[MasterMethod, Handler]:
    def single_start(start: Callable[..., list[Replica]]) -> Handler:
        def handler(p: dict[str, Any], now: float) -> Any:
            cfg = ReplicateConfig.from_wire(p.get("config"))
            return [r.wire() for r in start(p["client_id"], p["key"], int(p["size"]), cfg, now)]

        return handler

    def batch_start(start: Callable[..., list[Replica]]) -> Handler:
        def handler(p: dict[str, Any], now: float) -> Any:
            keys, sizes = _keys(p), p["sizes"]
            if len(keys) != len(sizes):
                raise ValueError(f"{len(keys)} keys but {len(sizes)} sizes")
            cfg = ReplicateConfig.from_wire(p.get("config"))
            client = p["client_id"]
            return _each(
                keys, lambda i, k: [r.wire() for r in start(client, k, int(sizes[i]), cfg, now)]
            )

        return handler

    def batch_keyed(fn: Callable[[str, str, float], None]) -> Handler:
        def handler(p: dict[str, Any], now: float) -> Any:
            client = p["client_id"]
            return _each(_keys(p), lambda i, k: fn(client, k, now))

        return handler

    def read_reply(key: str, now: float) -> dict[str, Any]:
        obj, complete = st.replicas_for_read(key, now)
        return {
            "replicas": [r.wire() for r in complete],
            "lease_ttl_ms": st.config.default_kv_lease_ttl_ms,
            "size": obj.size,
        }

    def batch_get_replica_list(p: dict[str, Any], now: float) -> Any:
        return _each(_keys(p), lambda i, k: read_reply(k, now))

    def ping(p: dict[str, Any], now: float) -> Any:
        res = st.ping(p["client_id"], now)
        return {
            "view_version": res.view_version,
            "status": int(res.status),
            "instance": res.instance,
        }

    return {
        M.SERVICE_READY: lambda p, now: PROTOCOL_VERSION,
        M.PING: ping,
        M.MOUNT_SEGMENT: lambda p, now: st.mount_segment(
            p["client_id"], SegmentInfo.from_wire(p["segment"]), now
        ),
        M.REMOUNT_SEGMENTS: lambda p, now: st.remount_segments(
            p["client_id"], [SegmentInfo.from_wire(s) for s in p["segments"]], now
        ),
        M.UNMOUNT_SEGMENT: lambda p, now: st.unmount_segment(p["client_id"], p["segment_id"], now),
        M.PUT_START: single_start(st.put_start_replicas),
        M.PUT_END: lambda p, now: st.put_end(p["client_id"], p["key"], now),
        M.PUT_REVOKE: lambda p, now: st.put_revoke(p["client_id"], p["key"], now),
        M.BATCH_PUT_START: batch_start(st.put_start_replicas),
        M.BATCH_PUT_END: batch_keyed(st.put_end),
        M.BATCH_PUT_REVOKE: batch_keyed(st.put_revoke),
        M.UPSERT_START: single_start(st.upsert_start_replicas),
        M.UPSERT_END: lambda p, now: st.upsert_end(p["client_id"], p["key"], now),
        M.UPSERT_REVOKE: lambda p, now: st.upsert_revoke(p["client_id"], p["key"], now),
        M.BATCH_UPSERT_START: batch_start(st.upsert_start_replicas),
        M.BATCH_UPSERT_END: batch_keyed(st.upsert_end),
        M.BATCH_UPSERT_REVOKE: batch_keyed(st.upsert_revoke),
        M.GET_REPLICA_LIST: lambda p, now: read_reply(p["key"], now),
        M.BATCH_GET_REPLICA_LIST: batch_get_replica_list,
        M.GET_REPLICA_LIST_BY_REGEX: lambda p, now: {
            k: [r.to_wire() for r in v]
            for k, v in st.get_replica_list_by_regex(p["pattern"], now).items()
        },
        M.EXIST_KEY: lambda p, now: st.exist_key(p["key"], now),
        M.BATCH_EXIST_KEY: lambda p, now: [st.exist_key(k, now) for k in _keys(p)],
        M.REMOVE: lambda p, now: st.remove(p["key"], bool(p.get("force", False)), now),
        M.BATCH_REMOVE: lambda p, now: _each(
            _keys(p), lambda i, k: st.remove(k, bool(p.get("force", False)), now)
        ),
        M.REMOVE_BY_REGEX: lambda p, now: st.remove_by_regex(
            p["pattern"], bool(p.get("force", False)), now
        ),
        M.REMOVE_ALL: lambda p, now: st.remove_all(bool(p.get("force", False)), now),
        M.GET_SUMMARY: lambda p, now: st.summary(),
    }
