"""The master's admin HTTP endpoints on the metrics port.

``/metrics`` (Prometheus text, ``_exposition.py``), ``/metrics/summary``,
``/health``, ``/role``, ``/query_key?key=``, ``/batch_query_keys?keys=a,b``,
``/get_all_keys``, ``/get_all_segments``, ``/get_segments_detail``,
``/query_segment?segment=``, the drain jobs (``_drain_http.py``) -- shapes as the reference's
``master_admin_service.cpp`` -- and pymooncake's live cluster page (``/``,
``/api/v1/cluster``, ``_page.py``).  Handlers run on the master's event loop
and read the state directly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..._httpd import HttpRequest, HttpResponse
from ...errors import StoreError
from ._drain_http import DrainHttp
from ._exposition import render_metrics, summary_text
from ._page import ClusterPage
from ._records import READABLE, Obj
from ._state import client_tag

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
        self.page = ClusterPage(service, service.security.key, secure=service.security.tls)
        self.drain = DrainHttp(service)
        drain_routes = self.drain.routes()
        #: routes that answer POST (the page's login form, drain jobs)
        self._posts = {
            "/login": self.page.login,
            "/logout": self.page.logout,
            **{p: drain_routes[p] for p in DrainHttp.POSTS},
        }
        self._routes: dict[str, Callable[[HttpRequest], HttpResponse]] = {
            "/": self.page.page,
            "/api/v1/cluster": self.page.api,
            "/static/page.js": self.page.script,
            **self._posts,
            "/metrics": self.metrics,
            "/metrics/summary": self.summary,
            "/health": self.health,
            "/role": lambda r: HttpResponse(
                200, self._svc.role.encode(), "text/plain; charset=utf-8"
            ),
            "/leader": self.leader,
            "/ha_status": self.ha_status,
            "/query_key": self.query_key,
            "/batch_query_keys": self.batch_query_keys,
            "/get_all_keys": self.all_keys,
            "/get_all_segments": self.all_segments,
            "/get_segments_detail": self.segments_detail,
            "/query_segment": self.query_segment,
            **drain_routes,
        }

    async def handle(self, request: HttpRequest) -> HttpResponse:
        route = self._routes.get(request.path.rstrip("/") or "/")
        if route is None:
            return HttpResponse(404, f"no such endpoint {request.path}".encode())
        if request.method == "POST" and request.path in self._posts:
            return route(request)
        if request.method not in ("GET", "HEAD"):
            return HttpResponse(405, b"use GET")
        if route == self.all_keys:
            return await self.all_keys_async(request)
        return route(request)

    # --- endpoints ------------------------------------------------------------------

    def health(self, request: HttpRequest) -> HttpResponse:
        svc = self._svc
        serving = svc.serving()
        return _json(
            200,
            {
                "status": "ok",
                "role": svc.role,
                "ha_state": "serving" if serving else svc.role,
                "service_ready": serving,
            },
        )

    def leader(self, request: HttpRequest) -> HttpResponse:
        svc = self._svc
        return _json(
            200,
            {
                "leader": svc.leader_address
                or (svc.addresses.rpc_address if svc.addresses else ""),
                "role": svc.role,
                "view_version": svc.state.view_version,
            },
        )

    def ha_status(self, request: HttpRequest) -> HttpResponse:
        svc = self._svc
        return _json(
            200,
            {
                "enabled": svc.ha is not None,
                "role": svc.role,
                "serving": svc.serving(),
                "leader": svc.leader_address,
                "view_version": svc.state.view_version,
                "failovers": svc.failovers,
                "standbys": svc.hub.status(),
                "replicated_seq": svc.hub.seq,
                "acknowledged_seq": svc.hub.acked,
                "held_replies": svc.hub.held,
                "dropped_standbys": svc.hub.dropped,
                "stream": svc.stream_status(),
            },
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
                    "client_id": client_tag(seg.client_id),  # never the id itself
                    "base_address": hex(seg.info.base),
                    "size_bytes": seg.info.size,
                    "size_human": f"{seg.info.size / (1 << 30):g} GiB",
                    "te_endpoint": seg.name,
                    "protocol": "tcp",
                    "status": self._svc.state.drains.segment_status(seg.name).name,
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
        return HttpResponse(200, (summary_text(self._svc) + "\n").encode(), _PROM)

    def metrics(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, render_metrics(self._svc).encode(), _PROM)


def _label(value: str) -> str:
    """A Prometheus label value, escaped (text format 0.0.4)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
