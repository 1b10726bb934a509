"""The master's admin HTTP endpoints on the metrics port.

``/metrics`` (Prometheus text), ``/metrics/summary``, ``/health``, ``/role``,
``/query_key?key=``, ``/batch_query_keys?keys=a,b``, ``/get_all_keys``,
``/get_all_segments``, ``/get_segments_detail``, ``/query_segment?segment=``
-- shapes as the reference's ``master_admin_service.cpp``.  Handlers run on
the master's event loop and read the state directly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..._httpd import HttpRequest, HttpResponse
from ...errors import StoreError
from ._records import READABLE, Obj

if TYPE_CHECKING:
    from ._service import MasterService

__all__ = ["AdminHttp"]

_PROM = "text/plain; version=0.0.4"
_JSON = "application/json; charset=utf-8"


def _json(status: int, obj: Any) -> HttpResponse:
    return HttpResponse(status, json.dumps(obj, separators=(",", ":")).encode(), _JSON)


class AdminHttp:
    def __init__(self, service: MasterService) -> None:
        self._svc = service
        self._routes: dict[str, Callable[[HttpRequest], HttpResponse]] = {
            "/metrics": self.metrics,
            "/metrics/summary": self.summary,
            "/health": self.health,
            "/role": lambda r: HttpResponse(200, b"leader", "text/plain; charset=utf-8"),
            "/query_key": self.query_key,
            "/batch_query_keys": self.batch_query_keys,
            "/get_all_keys": self.all_keys,
            "/get_all_segments": self.all_segments,
            "/get_segments_detail": self.segments_detail,
            "/query_segment": self.query_segment,
        }

    async def handle(self, request: HttpRequest) -> HttpResponse:
        route = self._routes.get(request.path.rstrip("/") or "/")
        if route is None:
            return HttpResponse(404, f"no such endpoint {request.path}".encode())
        if request.method not in ("GET", "HEAD"):
            return HttpResponse(405, b"use GET")
        if route == self.all_keys:
            return await self.all_keys_async(request)
        return route(request)

    # --- endpoints ------------------------------------------------------------------

    def health(self, request: HttpRequest) -> HttpResponse:
        return _json(
            200, {"status": "ok", "role": "leader", "ha_state": "serving", "service_ready": True}
        )

    @staticmethod
    def _descriptors(obj: Obj) -> list[dict[str, Any]]:
        return [
            {
                "size_": obj.size,
                "buffer_address_": addr,
                "protocol_": "tcp",
                "transport_endpoint_": seg.name,
            }
            for seg, addr in obj.replicas()
        ]

    def query_key(self, request: HttpRequest) -> HttpResponse:
        key = request.query.get("key", "")
        st = self._svc.state
        try:
            obj = st.read(key, st.lease_deadline(self._svc.now()))
        except StoreError as exc:
            return _json(404, {"success": False, "error_code": exc.code, "error_message": exc.name})
        return _json(200, {"success": True, "data": self._descriptors(obj)})

    def batch_query_keys(self, request: HttpRequest) -> HttpResponse:
        keys = [k for k in request.query.get("keys", "").split(",") if k]
        st = self._svc.state
        out: dict[str, Any] = {}
        for key in keys:  # no lease: this is an observer's view
            obj = st.objects.get(key)
            if obj is None or not obj.flags & READABLE:
                out[key] = {"success": False, "error_code": -704}
            else:
                out[key] = {"success": True, "data": self._descriptors(obj)}
        return _json(200, {"success": True, "data": out})

    def all_keys(self, request: HttpRequest) -> HttpResponse:  # routed to all_keys_async
        raise AssertionError("unreachable")

    async def all_keys_async(self, request: HttpRequest) -> HttpResponse:
        """Every key, one per line, gathered a shard at a time (the loop keeps serving)."""
        parts: list[str] = []
        async for keys in self._svc.key_slices():
            parts.append("".join(f"{k}\n" for k in keys))
        return HttpResponse(200, "".join(parts).encode(), _PROM)

    def all_segments(self, request: HttpRequest) -> HttpResponse:
        names = sorted({s.name for s in self._svc.state.segments.values()})
        return HttpResponse(200, "".join(f"{n}\n" for n in names).encode(), _PROM)

    def segments_detail(self, request: HttpRequest) -> HttpResponse:
        items = []
        for seg in self._svc.state.segments.values():
            cap = seg.allocator.capacity
            used = seg.allocator.allocated
            items.append(
                {
                    "segment_name": seg.name,
                    "segment_id": seg.id,
                    "client_id": seg.client_id,
                    "base_address": hex(seg.info.base),
                    "size_bytes": seg.info.size,
                    "size_human": f"{seg.info.size / (1 << 30):g} GiB",
                    "te_endpoint": seg.name,
                    "protocol": "tcp",
                    "status": "DRAINING" if seg.draining else "OK",
                    "allocator_used_bytes": used,
                    "allocator_capacity_bytes": cap,
                    "allocator_usage_percent": used / cap * 100.0 if cap else 0.0,
                }
            )
        return _json(200, {"total_segments": len(items), "segments": items})

    def query_segment(self, request: HttpRequest) -> HttpResponse:
        name = request.query.get("segment", "")
        segs = [s for s in self._svc.state.segments.values() if s.name == name]
        if not segs:
            return HttpResponse(404, f"segment {name!r} not found\n".encode(), _PROM)
        used = sum(s.allocator.allocated for s in segs)
        cap = sum(s.allocator.capacity for s in segs)
        return HttpResponse(
            200, f"{name}\nUsed(bytes): {used}\nCapacity(bytes) : {cap}\n".encode(), _PROM
        )

    def summary(self, request: HttpRequest) -> HttpResponse:
        s = self._svc.state.summary()
        m = self._svc.state.metrics
        cap = s["capacity_bytes"] or 1
        lines = [
            f"Mem Storage: {s['allocated_bytes'] / (1 << 30):.2f} GiB / {s['capacity_bytes'] / (1 << 30):.2f} GiB "
            f"({s['allocated_bytes'] / cap * 100:.1f}%)",
            f"Keys: {s['key_count']} (soft-pinned: {s['soft_pinned_keys']})",
            f"Segments: {s['segment_count']}, Clients: {s['client_count']}",
            f"Requests: {sum(m.requests.values())}, failures: {sum(m.failures.values())}",
            f"Gets: hits {m.get_hits}, misses {m.get_misses}",
            f"Evictions: {m.evicted_keys} keys, {m.evicted_bytes} bytes in {m.eviction_rounds} rounds",
            f"Expired clients: {m.expired_clients}, reclaimed puts: {m.reclaimed_puts}",
            f"Uptime: {time.time() - self._svc.started_at:.0f} s",
        ]
        return HttpResponse(200, ("\n".join(lines) + "\n").encode(), _PROM)

    def metrics(self, request: HttpRequest) -> HttpResponse:
        st = self._svc.state
        s = st.summary()
        m = st.metrics
        cluster = st.config.cluster_id
        out: list[str] = []

        def gauge(name: str, help_text: str, value: float, kind: str = "gauge") -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.append(f'{name}{{cluster_id="{cluster}"}} {value}')

        gauge(
            "master_total_capacity_bytes", "Total capacity of mounted segments", s["capacity_bytes"]
        )
        gauge("master_allocated_bytes", "Bytes allocated to replicas", s["allocated_bytes"])
        gauge("master_key_count", "Objects in the store", s["key_count"])
        gauge("master_soft_pin_key_count", "Soft-pinned objects", s["soft_pinned_keys"])
        gauge("master_active_clients", "Live clients", s["client_count"])
        gauge("master_segment_count", "Mounted segments", s["segment_count"])
        gauge("master_evicted_key_count", "Objects evicted", m.evicted_keys, "counter")
        gauge("master_evicted_size_bytes", "Bytes evicted", m.evicted_bytes, "counter")
        gauge("master_attempted_evictions_total", "Eviction rounds", m.eviction_rounds, "counter")
        gauge(
            "master_put_start_alloc_failures_total",
            "Allocation failures",
            m.alloc_failures,
            "counter",
        )
        gauge("master_put_start_discard_cnt", "Preempted puts", m.discarded_puts, "counter")
        gauge(
            "master_put_start_release_cnt", "Reclaimed abandoned puts", m.reclaimed_puts, "counter"
        )
        gauge(
            "master_expired_clients_total",
            "Clients expired by client_ttl",
            m.expired_clients,
            "counter",
        )
        gauge(
            "master_stall_grace_total",
            "Master stalls that suspended client expiry",
            st.stall_grace_count,
            "counter",
        )
        svc = self._svc
        gauge(
            "master_ticks_total", "Periodic housekeeping rounds (tick)", svc.tick_count, "counter"
        )
        gauge(
            "master_tick_seconds_total",
            "Time spent in periodic housekeeping (event loop blocked)",
            svc.tick_seconds,
            "counter",
        )
        gauge(
            "master_tick_seconds_recent_max",
            "Longest of the last 50 housekeeping rounds",
            max(svc.recent_ticks, default=0.0),
        )
        gauge("mem_cache_hit_nums", "Gets that found the object", m.get_hits, "counter")
        gauge("total_get_nums", "Gets", m.get_hits + m.get_misses, "counter")
        for kind, table in (("requests", m.requests), ("failures", m.failures)):
            for rpc, n in sorted(table.items()):
                name = f"master_{_snake(rpc)}_{kind}_total"
                out.append(f"# TYPE {name} counter")
                out.append(f'{name}{{cluster_id="{cluster}"}} {n}')
        for seg in st.segments.values():
            labels = (
                f'cluster_id="{cluster}",segment="{_label(seg.name)}",segment_id="{_label(seg.id)}"'
            )
            out.append(f"segment_allocated_bytes{{{labels}}} {seg.allocator.allocated}")
            out.append(f"segment_total_capacity_bytes{{{labels}}} {seg.allocator.capacity}")
        return HttpResponse(200, ("\n".join(out) + "\n").encode(), _PROM)


def _label(value: str) -> str:
    """A Prometheus label value, escaped (text format 0.0.4)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _snake(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and not name[i - 1].isupper():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)
