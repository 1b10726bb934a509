"""What the real client does for each dummy-client call (``wire/_dummy.py`` methods).

Each handler takes the decoded parameters and returns the reply value, or
raises: a :class:`~pymooncake.errors.StoreError` travels back as its code and
message.  Store calls run on the real client's own :class:`StoreClient` with
the dummy's addresses translated into the real client's mapping of the same
shared pages, so its engine reads (puts) and writes (gets) the dummy's memory
directly: the bytes are not copied on the way.

Parameters come from another process, so every handler validates what it
uses; a malformed request is answered INVALID_PARAMS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from ..errors import InvalidParams, MooncakeError, StoreError
from ..wire._dummy import DummyMethod
from ._client import StoreClient
from ._client_io import ObjectLocation
from ._types import ErrorCode, ReplicaDesc, ReplicateConfig

__all__ = ["HANDLERS", "ServiceContext", "error_code", "result_row"]


class Translator(Protocol):
    def translate(self, addr: int, length: int) -> int: ...


class ServiceContext(Protocol):
    """What the handlers need from the service."""

    client: StoreClient

    def hello(self, client_id: str, pid: int) -> dict[str, Any]: ...

    def ping(self, client_id: str) -> dict[str, Any]: ...

    def unregister(self, client_id: str, base: int | None) -> None: ...

    def using(self, client_id: str) -> AbstractContextManager[Translator]: ...


def error_code(exc: BaseException) -> int:
    """The int code an exception travels as (as ``mooncake.store`` would return it)."""
    if isinstance(exc, MooncakeError):
        return exc.code if exc.code < 0 else int(ErrorCode.INTERNAL_ERROR)
    return int(ErrorCode.INVALID_PARAMS)


def result_row(res: Any) -> list[Any]:
    """One per-key result as ``[code, value]``."""
    if isinstance(res, BaseException):
        return [error_code(res), str(res)]
    return [0, res]


# --- parameter checks ----------------------------------------------------------------


def _str(p: dict[str, Any], name: str) -> str:
    v = p.get(name)
    if type(v) is not str:
        raise InvalidParams(f"parameter {name!r} must be a string")
    return v


def _int(p: dict[str, Any], name: str) -> int:
    v = p.get(name)
    if type(v) is not int:
        raise InvalidParams(f"parameter {name!r} must be an integer")
    return v


def _bool(p: dict[str, Any], name: str, default: bool = False) -> bool:
    v = p.get(name, default)
    if type(v) is not bool:
        raise InvalidParams(f"parameter {name!r} must be true or false")
    return v


def _keys(p: dict[str, Any]) -> list[str]:
    keys = p.get("keys")
    if type(keys) is not list or not all(type(k) is str for k in keys):
        raise InvalidParams("parameter 'keys' must be a list of strings")
    return keys


def _ranges(rows: Any, what: str) -> list[list[tuple[int, int]]]:
    """``[[[addr, n], ...], ...]`` validated."""
    if type(rows) is not list:
        raise InvalidParams(f"parameter {what!r} must be a list")
    out: list[list[tuple[int, int]]] = []
    for row in rows:
        if type(row) is not list:
            raise InvalidParams(f"each entry of {what!r} must be a list of [address, size]")
        parts: list[tuple[int, int]] = []
        for part in row:
            if (
                type(part) is not list
                or len(part) != 2
                or type(part[0]) is not int
                or type(part[1]) is not int
                or part[1] < 0
            ):
                raise InvalidParams(f"each part of {what!r} must be [address, size >= 0]")
            parts.append((part[0], part[1]))
        out.append(parts)
    return out


def _translated(
    t: Translator, rows: Sequence[Sequence[tuple[int, int]]]
) -> list[list[tuple[int, int]]]:
    return [[(t.translate(a, n) if n else 0, n) for a, n in row] for row in rows]


def _config(p: dict[str, Any]) -> ReplicateConfig:
    raw = p.get("config")
    if raw is None:
        return ReplicateConfig()
    try:
        return ReplicateConfig.from_wire(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidParams(f"bad replicate config: {exc}") from None


def location_to_wire(loc: ObjectLocation) -> dict[str, Any]:
    return {
        "key": loc.key,
        "size": loc.size,
        "replicas": [r.to_wire() for r in loc.replicas],
        "lease_deadline": loc.lease_deadline,
    }


def location_from_wire(obj: Any) -> ObjectLocation:
    """Raises InvalidParams on a malformed location."""
    try:
        return ObjectLocation(
            str(obj["key"]),
            int(obj["size"]),
            tuple(ReplicaDesc.from_wire(r) for r in obj["replicas"]),
            float(obj["lease_deadline"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidParams(f"malformed object location: {exc}") from None


# --- handlers -------------------------------------------------------------------------


def _hello(ctx: ServiceContext, p: dict[str, Any]) -> Any:
    return ctx.hello(_str(p, "client_id"), _int(p, "pid"))


def _ping(ctx: ServiceContext, p: dict[str, Any]) -> Any:
    return ctx.ping(_str(p, "client_id"))


def _unregister(ctx: ServiceContext, p: dict[str, Any]) -> Any:
    base = p.get("base")
    if base is not None and type(base) is not int:
        raise InvalidParams("parameter 'base' must be an integer or null")
    ctx.unregister(_str(p, "client_id"), base)
    return None


def _health(ctx: ServiceContext, p: dict[str, Any]) -> Any:
    return ctx.client.health()


def _put(ctx: ServiceContext, p: dict[str, Any]) -> Any:
    keys = _keys(p)
    rows = _ranges(p.get("parts"), "parts")
    if len(rows) != len(keys):
        raise InvalidParams(f"{len(keys)} keys but {len(rows)} values")
    config = _config(p)
    upsert = _bool(p, "upsert")
    with ctx.using(_str(p, "client_id")) as t:
        values = _translated(t, rows)
        writer = ctx.client.upsert_many if upsert else ctx.client.put_many
        return [result_row(r) for r in writer(keys, values, config)]


def _get_into(ctx: ServiceContext, p: dict[str, Any]) -> Any:
    keys = _keys(p)
    rows = _ranges(p.get("parts"), "parts")
    if len(rows) != len(keys):
        raise InvalidParams(f"{len(keys)} keys but {len(rows)} destinations")
    with ctx.using(_str(p, "client_id")) as t:
        dests = _translated(t, rows)
        return [result_row(r) for r in ctx.client.get_many_into(keys, dests)]


def _get_staged(ctx: ServiceContext, p: dict[str, Any]) -> Any:
    """Read objects of unknown size into one staging range each: ``{"size": n}`` when
    it fit (read), else ``{"size": n, "location": ...}`` (not read; the dummy
    stages ``n`` bytes and reads that location with ``read_ranges``)."""
    keys = _keys(p)
    rows = _ranges(p.get("parts"), "parts")
    if len(rows) != len(keys) or any(len(r) != 1 for r in rows):
        raise InvalidParams("get_staged takes one staging range per key")
    out: list[list[Any]] = [[0, None]] * len(keys)
    with ctx.using(_str(p, "client_id")) as t:
        fits: list[int] = []
        locs: list[ObjectLocation] = []
        ranges: list[list[tuple[memoryview, int]]] = []
        for i, loc in enumerate(ctx.client.locate(keys)):
            if isinstance(loc, StoreError):
                out[i] = result_row(loc)
                continue
            ((addr, cap),) = rows[i]
            if loc.size > cap:
                out[i] = [0, {"size": loc.size, "location": location_to_wire(loc)}]
                continue
            view = (
                ctx.client.local_view(t.translate(addr, loc.size), loc.size, writable=True)
                if loc.size
                else memoryview(bytearray(0))
            )
            fits.append(i)
            locs.append(loc)
            ranges.append([(view, 0)])
        for i, (res,) in zip(fits, ctx.client.read_ranges(locs, ranges), strict=True):
            out[i] = result_row(res if isinstance(res, StoreError) else {"size": res})
    return out


def _locate(ctx: ServiceContext, p: dict[str, Any]) -> Any:
    return [
        result_row(r if isinstance(r, StoreError) else location_to_wire(r))
        for r in ctx.client.locate(_keys(p))
    ]


def _read_ranges(ctx: ServiceContext, p: dict[str, Any]) -> Any:
    raw_locs = p.get("locations")
    raw_ranges = p.get("ranges")
    if type(raw_locs) is not list or type(raw_ranges) is not list:
        raise InvalidParams("parameters 'locations' and 'ranges' must be lists")
    if len(raw_locs) != len(raw_ranges):
        raise InvalidParams(f"{len(raw_locs)} locations but {len(raw_ranges)} range lists")
    locs = [location_from_wire(x) for x in raw_locs]
    frags: list[list[tuple[int, int, int]]] = []
    for row in raw_ranges:
        if type(row) is not list:
            raise InvalidParams("each range list must be a list of [address, size, offset]")
        out = []
        for f in row:
            if type(f) is not list or len(f) != 3 or not all(type(x) is int for x in f):
                raise InvalidParams("each range must be [address, size, offset]")
            if f[1] < 0:
                raise InvalidParams(f"negative range size {f[1]}")
            out.append((f[0], f[1], f[2]))
        frags.append(out)
    with ctx.using(_str(p, "client_id")) as t:
        ranges = [
            [
                (ctx.client.local_view(t.translate(a, n), n, writable=True), src)
                if n
                else (memoryview(bytearray(0)), src)
                for a, n, src in row
            ]
            for row in frags
        ]
        return [[result_row(r) for r in row] for row in ctx.client.read_ranges(locs, ranges)]


def _exists(ctx: ServiceContext, p: dict[str, Any]) -> Any:
    keys = _keys(p)
    if _bool(p, "batch"):
        return ctx.client.exists_many(keys)
    if len(keys) != 1:
        raise InvalidParams("exists takes one key unless batch is set")
    return [ctx.client.exists(keys[0])]


def _replicas(ctx: ServiceContext, p: dict[str, Any]) -> Any:
    keys = _keys(p)
    if _bool(p, "batch"):
        return [
            result_row(r if isinstance(r, StoreError) else [d.to_wire() for d in r])
            for r in ctx.client.replicas_many(keys)
        ]
    if len(keys) != 1:
        raise InvalidParams("replicas takes one key unless batch is set")
    return [[0, [d.to_wire() for d in ctx.client.replicas(keys[0])]]]


def _remove(ctx: ServiceContext, p: dict[str, Any]) -> Any:
    keys = _keys(p)
    force = _bool(p, "force")
    if _bool(p, "batch"):
        return [result_row(r) for r in ctx.client.remove_many(keys, force)]
    if len(keys) != 1:
        raise InvalidParams("remove takes one key unless batch is set")
    ctx.client.remove(keys[0], force)
    return None


def _remove_by_regex(ctx: ServiceContext, p: dict[str, Any]) -> Any:
    return ctx.client.remove_by_regex(_str(p, "pattern"), _bool(p, "force"))


def _remove_all(ctx: ServiceContext, p: dict[str, Any]) -> Any:
    return ctx.client.remove_all(_bool(p, "force"))


def _replica_clear(ctx: ServiceContext, p: dict[str, Any]) -> Any:
    return ctx.client.replica_clear_many(_keys(p), _str(p, "segment"))


def _task(ctx: ServiceContext, p: dict[str, Any]) -> Any:
    op = _str(p, "op")
    client = ctx.client
    if op == "copy":
        return list(client.create_copy_task(_str(p, "key"), _keys({"keys": p.get("targets")})))
    if op == "move":
        return list(client.create_move_task(_str(p, "key"), _str(p, "source"), _str(p, "target")))
    if op == "query":
        tid = p.get("task_id")
        if type(tid) is not list or len(tid) != 2 or not all(type(x) is int for x in tid):
            raise InvalidParams("parameter 'task_id' must be a pair of integers")
        info = client.query_task((tid[0], tid[1]))
        return {
            "id": list(info.id),
            "type": int(info.type),
            "status": int(info.status),
            "created_at_ms_epoch": info.created_at_ms_epoch,
            "last_updated_at_ms_epoch": info.last_updated_at_ms_epoch,
            "assigned_client": list(info.assigned_client),
            "message": info.message,
        }
    raise InvalidParams(f"unknown task operation {op!r} (copy, move, query)")


#: {method: handler}; each returns the reply value or raises
HANDLERS: dict[DummyMethod, Callable[[ServiceContext, dict[str, Any]], Any]] = {
    DummyMethod.HELLO: _hello,
    DummyMethod.PING: _ping,
    DummyMethod.UNREGISTER: _unregister,
    DummyMethod.HEALTH: _health,
    DummyMethod.PUT: _put,
    DummyMethod.GET_INTO: _get_into,
    DummyMethod.GET_STAGED: _get_staged,
    DummyMethod.LOCATE: _locate,
    DummyMethod.READ_RANGES: _read_ranges,
    DummyMethod.EXISTS: _exists,
    DummyMethod.REPLICAS: _replicas,
    DummyMethod.REMOVE: _remove,
    DummyMethod.REMOVE_BY_REGEX: _remove_by_regex,
    DummyMethod.REMOVE_ALL: _remove_all,
    DummyMethod.REPLICA_CLEAR: _replica_clear,
    DummyMethod.TASK: _task,
}
