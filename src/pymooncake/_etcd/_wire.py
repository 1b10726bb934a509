"""etcd v3 over its HTTP/JSON gateway: requests and replies as values.

Theory of operation
-------------------
etcd (3.4 and later) serves its gRPC API as JSON on the client port under
``/v3/*`` (the "gRPC gateway"): ``POST /v3/kv/range`` with a JSON body is the
``Range`` RPC, and so on.  The gateway encodes ``bytes`` fields (keys, values,
range ends) as base64 and 64-bit integers (revisions, lease ids) as decimal
*strings*, and leaves out every field that holds its default (``false``,
``0``, empty): a failed transaction has no ``succeeded`` field, a missing key
gives a reply without ``kvs``.  The decoders here restore the defaults.

Errors come back as a non-200 status with ``{"error", "message", "code"}``,
``code`` being the gRPC status code (:class:`GrpcCode`).

The watch stream is in :mod:`._stream`, endpoint lists in :mod:`._endpoints`.
Nothing here touches a socket.
"""

from __future__ import annotations

import base64
import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ..errors import InvalidArgument, MalformedMessage

__all__ = [
    "Compare",
    "DeleteResult",
    "GatewayError",
    "GrpcCode",
    "KeyValue",
    "LeaseGrant",
    "LeaseStatus",
    "Op",
    "OpDelete",
    "OpGet",
    "OpPut",
    "PutResult",
    "RangeResult",
    "TxnResult",
    "decode_error",
    "prefix_range_end",
    "txn_request",
]


class GrpcCode(enum.IntEnum):
    """The gRPC status codes etcd's gateway puts in ``code``."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# ---------------------------------------------------------------------------------
# encoding helpers
# ---------------------------------------------------------------------------------


#: keys and values may be given as text (UTF-8) or bytes
Bytes = bytes | str


def _b64(data: Bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _unb64(obj: Mapping[str, Any], name: str) -> bytes:
    text = obj.get(name)
    if text is None:
        return b""
    if not isinstance(text, str):
        raise MalformedMessage(f"etcd reply field {name!r} is not a base64 string: {text!r}")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise MalformedMessage(f"etcd reply field {name!r} is not base64: {exc}") from None


def _int(obj: Mapping[str, Any], name: str) -> int:
    """An int64 field: the gateway sends decimal strings (numbers are accepted too)."""
    value = obj.get(name, 0)
    if isinstance(value, bool):
        raise MalformedMessage(f"etcd reply field {name!r} is not an integer: {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise MalformedMessage(f"etcd reply field {name!r} is not an integer: {value!r}") from None


def _obj(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MalformedMessage(f"etcd {what} is not a JSON object: {value!r:.200}")
    return value


def prefix_range_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes a request cover every key starting with
    ``prefix`` (etcd's rule: the prefix with its last byte below 0xff
    incremented; ``b"\\0"`` -- every key -- when there is none).  For the empty
    prefix, also send ``b"\\0"`` as the key: etcd refuses an empty one."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _header_revision(reply: Mapping[str, Any]) -> int:
    return _int(_obj(reply.get("header", {}), "reply header"), "revision")


# ---------------------------------------------------------------------------------
# replies
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd stores it.

    ``version`` counts the puts since the key was (re)created; ``create_revision``
    and ``mod_revision`` are the cluster revisions of its creation and last
    change; ``lease`` is the id of the lease it is attached to (0: none).
    """

    key: bytes
    value: bytes
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    lease: int = 0

    @classmethod
    def decode(cls, obj: Any) -> KeyValue:
        kv = _obj(obj, "key-value")
        return cls(
            key=_unb64(kv, "key"),
            value=_unb64(kv, "value"),
            create_revision=_int(kv, "create_revision"),
            mod_revision=_int(kv, "mod_revision"),
            version=_int(kv, "version"),
            lease=_int(kv, "lease"),
        )


@dataclass(frozen=True)
class RangeResult:
    """Reply of a range (get): the keys found and the revision it was read at."""

    kvs: tuple[KeyValue, ...]
    count: int
    more: bool
    revision: int

    @classmethod
    def decode(cls, obj: Any) -> RangeResult:
        reply = _obj(obj, "range reply")
        kvs = tuple(KeyValue.decode(kv) for kv in reply.get("kvs", ()))
        return cls(
            kvs, _int(reply, "count"), bool(reply.get("more", False)), _header_revision(reply)
        )


@dataclass(frozen=True)
class PutResult:
    revision: int
    prev_kv: KeyValue | None = None

    @classmethod
    def decode(cls, obj: Any) -> PutResult:
        reply = _obj(obj, "put reply")
        prev = reply.get("prev_kv")
        return cls(_header_revision(reply), None if prev is None else KeyValue.decode(prev))


@dataclass(frozen=True)
class DeleteResult:
    deleted: int
    revision: int
    prev_kvs: tuple[KeyValue, ...] = ()

    @classmethod
    def decode(cls, obj: Any) -> DeleteResult:
        reply = _obj(obj, "delete reply")
        prev = tuple(KeyValue.decode(kv) for kv in reply.get("prev_kvs", ()))
        return cls(_int(reply, "deleted"), _header_revision(reply), prev)


OpResult = RangeResult | PutResult | DeleteResult


@dataclass(frozen=True)
class TxnResult:
    """Reply of a transaction: which branch ran, its results, and the revision
    after it (for a transaction that wrote, the revision of that write)."""

    succeeded: bool
    revision: int
    responses: tuple[OpResult, ...] = ()

    @classmethod
    def decode(cls, obj: Any) -> TxnResult:
        reply = _obj(obj, "txn reply")
        results: list[OpResult] = []
        for item in reply.get("responses", ()):
            item = _obj(item, "txn response")
            # a sub-reply's header carries only the revision; the txn header has it too
            header = reply.get("header", {})
            if "response_range" in item:
                results.append(RangeResult.decode({"header": header, **item["response_range"]}))
            elif "response_put" in item:
                results.append(PutResult.decode({"header": header, **item["response_put"]}))
            elif "response_delete_range" in item:
                results.append(
                    DeleteResult.decode({"header": header, **item["response_delete_range"]})
                )
            else:
                raise MalformedMessage(f"etcd txn response of unknown kind: {item!r:.200}")
        return cls(bool(reply.get("succeeded", False)), _header_revision(reply), tuple(results))


@dataclass(frozen=True)
class LeaseGrant:
    """A granted lease: its id and the TTL etcd chose (at least the one asked)."""

    id: int
    ttl_s: int

    @classmethod
    def decode(cls, obj: Any) -> LeaseGrant:
        reply = _obj(obj, "lease grant reply")
        if reply.get("error"):
            raise MalformedMessage(f"etcd refused the lease: {reply['error']}")
        return cls(_int(reply, "ID"), _int(reply, "TTL"))


@dataclass(frozen=True)
class LeaseStatus:
    """A lease's remaining TTL (``ttl_s <= 0``: expired or revoked) and, when asked, its keys."""

    id: int
    ttl_s: int
    granted_ttl_s: int = 0
    keys: tuple[bytes, ...] = ()

    @classmethod
    def decode(cls, obj: Any) -> LeaseStatus:
        reply = _obj(obj, "lease reply")
        if "result" in reply:  # /v3/lease/keepalive is a stream of one result
            reply = _obj(reply["result"], "lease keepalive result")
        keys = tuple(base64.b64decode(k) for k in reply.get("keys", ()))
        return cls(_int(reply, "ID"), _int(reply, "TTL"), _int(reply, "grantedTTL"), keys)


# ---------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------

_CMP_RESULTS: Final = {"==": "EQUAL", "!=": "NOT_EQUAL", ">": "GREATER", "<": "LESS"}
_CMP_FIELDS: Final = {
    "VERSION": "version",
    "CREATE": "create_revision",
    "MOD": "mod_revision",
    "VALUE": "value",
    "LEASE": "lease",
}
CompareOp = Literal["==", "!=", ">", "<"]


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction, built with the class methods:
    ``Compare.version(key, "==", 0)`` is "the key does not exist",
    ``Compare.value(key, "==", b"x")`` "it holds exactly x"."""

    key: Bytes
    target: Literal["VERSION", "CREATE", "MOD", "VALUE", "LEASE"]
    op: CompareOp
    operand: int | Bytes

    def __post_init__(self) -> None:
        if self.op not in _CMP_RESULTS:
            raise InvalidArgument(f"etcd compare operator {self.op!r} is not one of ==, !=, >, <")

    @classmethod
    def version(cls, key: Bytes, op: CompareOp, version: int) -> Compare:
        return cls(key, "VERSION", op, version)

    @classmethod
    def create_revision(cls, key: Bytes, op: CompareOp, revision: int) -> Compare:
        return cls(key, "CREATE", op, revision)

    @classmethod
    def mod_revision(cls, key: Bytes, op: CompareOp, revision: int) -> Compare:
        return cls(key, "MOD", op, revision)

    @classmethod
    def value(cls, key: Bytes, op: CompareOp, value: Bytes) -> Compare:
        return cls(key, "VALUE", op, value)

    @classmethod
    def lease(cls, key: Bytes, op: CompareOp, lease_id: int) -> Compare:
        return cls(key, "LEASE", op, lease_id)

    def to_json(self) -> dict[str, Any]:
        name = _CMP_FIELDS[self.target]
        operand = _b64(self.operand) if isinstance(self.operand, bytes) else str(int(self.operand))
        return {
            "key": _b64(self.key),
            "target": self.target,
            "result": _CMP_RESULTS[self.op],
            name: operand,
        }


@dataclass(frozen=True)
class OpGet:
    """A range read: one key, or ``[key, range_end)``, at ``revision`` (0: latest)."""

    key: Bytes
    range_end: Bytes | None = None
    revision: int = 0
    limit: int = 0
    keys_only: bool = False
    count_only: bool = False

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"key": _b64(self.key)}
        if self.range_end is not None:
            body["range_end"] = _b64(self.range_end)
        if self.revision:
            body["revision"] = str(self.revision)
        if self.limit:
            body["limit"] = str(self.limit)
        if self.keys_only:
            body["keys_only"] = True
        if self.count_only:
            body["count_only"] = True
        return body

    def to_txn(self) -> dict[str, Any]:
        return {"request_range": self.to_json()}


@dataclass(frozen=True)
class OpPut:
    """A write, attached to ``lease`` when it is not 0."""

    key: Bytes
    value: Bytes
    lease: int = 0
    prev_kv: bool = False

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"key": _b64(self.key), "value": _b64(self.value)}
        if self.lease:
            body["lease"] = str(self.lease)
        if self.prev_kv:
            body["prev_kv"] = True
        return body

    def to_txn(self) -> dict[str, Any]:
        return {"request_put": self.to_json()}


@dataclass(frozen=True)
class OpDelete:
    """A delete of one key, or of ``[key, range_end)``."""

    key: Bytes
    range_end: Bytes | None = None
    prev_kv: bool = False

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"key": _b64(self.key)}
        if self.range_end is not None:
            body["range_end"] = _b64(self.range_end)
        if self.prev_kv:
            body["prev_kv"] = True
        return body

    def to_txn(self) -> dict[str, Any]:
        return {"request_delete_range": self.to_json()}


Op = OpGet | OpPut | OpDelete


def txn_request(
    compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]
) -> dict[str, Any]:
    return {
        "compare": [c.to_json() for c in compare],
        "success": [op.to_txn() for op in success],
        "failure": [op.to_txn() for op in failure],
    }


# ---------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayError:
    """A failure reported by the gateway: the gRPC code and etcd's message."""

    code: int
    message: str
    http_status: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def grpc(self) -> GrpcCode | None:
        try:
            return GrpcCode(self.code)
        except ValueError:
            return None


def decode_error(http_status: int, body: bytes) -> GatewayError:
    """The error of a non-200 reply (never raises: odd bodies are quoted)."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        text = body[:200].decode("utf-8", "replace").strip()
        return GatewayError(GrpcCode.UNKNOWN, text or f"HTTP {http_status}", http_status)
    if not isinstance(obj, Mapping):
        return GatewayError(GrpcCode.UNKNOWN, repr(obj)[:200], http_status)
    message = str(obj.get("message") or obj.get("error") or f"HTTP {http_status}")
    try:
        code = int(obj.get("code", GrpcCode.UNKNOWN))
    except (TypeError, ValueError):
        code = GrpcCode.UNKNOWN
    return GatewayError(code, message, http_status, obj)
