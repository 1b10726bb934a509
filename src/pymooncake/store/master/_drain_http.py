"""Drain jobs on the master's admin HTTP port, with the reference's paths and JSON.

* ``POST /api/v1/drain_jobs`` body ``{"segments": [...], "target_segments": [...],
  "max_concurrency": 4}`` -> ``{"success": true, "job_id": "<u64>-<u64>",
  "status": "CREATED", ...}``
* ``GET /api/v1/drain_jobs/query?job_id=`` -> status, status_name, units, bytes
* ``POST /api/v1/drain_jobs/cancel?job_id=`` -> ``{"success": true, "status": "CANCELED"}``
* ``GET /api/v1/segments/status?segment=`` -> ``status``/``status_name``
  (OK, DRAINING, DRAINED)

Errors answer ``{"success": false, "error_code": <ErrorCode>, "error_message":
...}`` with the reference's HTTP status (400 INVALID_PARAMS, 404 *_NOT_FOUND, 409
UNAVAILABLE_IN_CURRENT_STATUS, 503 on a master that is not the serving leader).
Like every admin path but /metrics and /health these need the cluster token
when one is set (``_service.py``).  A change is journaled and shipped to standbys
before the answer.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..._httpd import HttpRequest, HttpResponse
from ...errors import StoreError
from .._types import ErrorCode
from ._drain import MAX_JOB_SEGMENTS
from ._tasks import format_id, parse_id

if TYPE_CHECKING:
    from ._service import MasterService

__all__ = ["DrainHttp"]

_JSON = "application/json; charset=utf-8"
#: largest request body accepted (a job naming MAX_JOB_SEGMENTS long names)
_MAX_BODY = 4 << 20


def _json(status: int, obj: Any) -> HttpResponse:
    return HttpResponse(status, json.dumps(obj, separators=(",", ":")).encode(), _JSON)


def _http_status(code: int) -> int:
    if code == ErrorCode.INVALID_PARAMS:
        return 400
    if code in (ErrorCode.JOB_NOT_FOUND, ErrorCode.SEGMENT_NOT_FOUND, ErrorCode.OBJECT_NOT_FOUND):
        return 404
    if code in (ErrorCode.UNAVAILABLE_IN_CURRENT_MODE, ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS):
        return 409
    return 500


def _error(status: int, code: ErrorCode | int, message: str) -> HttpResponse:
    return _json(status, {"success": False, "error_code": int(code), "error_message": message})


def _failed(exc: StoreError) -> HttpResponse:
    return _error(_http_status(exc.code), exc.code, exc.message)


class DrainHttp:
    """The drain endpoints of one :class:`MasterService`."""

    def __init__(self, service: MasterService) -> None:
        self._svc = service

    def routes(self) -> dict[str, Any]:
        return {
            "/api/v1/drain_jobs": self.create,
            "/api/v1/drain_jobs/query": self.query,
            "/api/v1/drain_jobs/cancel": self.cancel,
            "/api/v1/segments/status": self.segment_status,
        }

    #: the paths that take POST
    POSTS = frozenset({"/api/v1/drain_jobs", "/api/v1/drain_jobs/cancel"})

    def _inactive(self) -> HttpResponse | None:
        if self._svc.serving():
            return None
        return _error(
            503,
            ErrorCode.UNAVAILABLE_IN_CURRENT_MODE,
            f"this master is not the serving leader (role {self._svc.role}); ask the leader",
        )

    def create(self, request: HttpRequest) -> HttpResponse:
        if request.method != "POST":
            return HttpResponse(405, b"use POST")
        try:
            if len(request.body) > _MAX_BODY:
                raise ValueError(f"the body exceeds {_MAX_BODY} bytes")
            body = json.loads(request.body or b"{}")
            if type(body) is not dict:
                raise ValueError("the body must be a JSON object")
            segments = _names(body.get("segments", []), "segments")
            targets = _names(body.get("target_segments", []), "target_segments")
            concurrency = body.get("max_concurrency", 4)
            if type(concurrency) is not int or not 0 <= concurrency < 1 << 32:
                raise ValueError("max_concurrency must be an unsigned integer")
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(400, ErrorCode.INVALID_PARAMS, f"Invalid JSON body: {exc}")
        inactive = self._inactive()
        if inactive is not None:
            return inactive
        svc = self._svc
        try:
            job = svc.state.drains.create(segments, targets, concurrency, svc.now())
        except StoreError as exc:
            return _failed(exc)
        svc.persist()
        return _json(
            200,
            {
                "success": True,
                "job_id": format_id(job.id),
                "status": "CREATED",
                "error_code": 0,
                "error_message": "",
            },
        )

    def _job_id(self, request: HttpRequest) -> tuple[int, int] | HttpResponse:
        job_id = parse_id(request.query.get("job_id", ""))
        if job_id is None:
            return _error(400, ErrorCode.INVALID_PARAMS, "Missing or invalid job_id")
        return job_id

    def query(self, request: HttpRequest) -> HttpResponse:
        job_id = self._job_id(request)
        if isinstance(job_id, HttpResponse):
            return job_id
        inactive = self._inactive()
        if inactive is not None:
            return inactive
        try:
            return _json(200, self._svc.state.drains.get(job_id).query())
        except StoreError as exc:
            return _failed(exc)

    def cancel(self, request: HttpRequest) -> HttpResponse:
        if request.method != "POST":
            return HttpResponse(405, b"use POST")
        job_id = self._job_id(request)
        if isinstance(job_id, HttpResponse):
            return job_id
        inactive = self._inactive()
        if inactive is not None:
            return inactive
        svc = self._svc
        try:
            svc.state.drains.cancel(job_id, svc.now())
        except StoreError as exc:
            return _failed(exc)
        svc.persist()
        return _json(
            200,
            {
                "success": True,
                "job_id": format_id(job_id),
                "status": "CANCELED",
                "error_code": 0,
                "error_message": "",
            },
        )

    def segment_status(self, request: HttpRequest) -> HttpResponse:
        name = request.query.get("segment", "")
        if not name:
            return _error(400, ErrorCode.INVALID_PARAMS, "Missing segment query parameter")
        inactive = self._inactive()
        if inactive is not None:
            return inactive
        try:
            status = self._svc.state.drains.segment_status(name)
        except StoreError as exc:
            return _failed(exc)
        return _json(
            200,
            {
                "success": True,
                "segment": name,
                "status": int(status),
                "status_name": status.name,
                "error_code": 0,
                "error_message": "",
            },
        )


def _names(value: Any, what: str) -> tuple[str, ...]:
    if type(value) is not list or len(value) > MAX_JOB_SEGMENTS:
        raise ValueError(f"{what} must be a list of at most {MAX_JOB_SEGMENTS} segment names")
    if not all(type(v) is str for v in value):
        raise ValueError(f"{what} must hold only strings")
    return tuple(value)
