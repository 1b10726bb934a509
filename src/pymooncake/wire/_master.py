"""Framing of the store master's RPC protocol (pymooncake's own; the reference's
coro_rpc/struct_pack format is not reproducible from Python, see store.md 14).

Theory of operation
-------------------
Each frame is::

    u32  length     little-endian: bytes after this field
    u8   kind       0 request, 1 reply
    u32  id         little-endian request id, echoed by the reply
    u8[] body       UTF-8 JSON: request [method, params]; reply [code, value]

``code`` is the reference ``ErrorCode`` (0 = OK); on failure ``value`` is the
error message.  A connection may carry any number of requests back to back
(pipelining); replies come back in request order.  Object bytes never travel
here -- the master only hands out addresses.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from ..errors import MalformedMessage
from ._rpc import NEED_DATA, NeedData

__all__ = [
    "DEFAULT_MAX_MASTER_FRAME",
    "PROTOCOL_VERSION",
    "MasterFrameDecoder",
    "MasterMethod",
    "MasterReply",
    "MasterRequest",
    "encode_reply",
    "encode_request",
    "master_unix_name",
]

PREFIX: Final = struct.Struct("<IBI")
#: batches of tens of thousands of keys fit comfortably
DEFAULT_MAX_MASTER_FRAME: Final = 64 << 20
#: bumped on incompatible changes; ServiceReady returns it
PROTOCOL_VERSION: Final = "pymooncake-master/1"


def master_unix_name(host: str, port: int) -> str:
    """Abstract UNIX socket name of the master listening on ``host:port`` (it
    serves the same frames there, for clients on its host)."""
    return f"\0pymooncake-master:{host}:{port}"


_REQUEST: Final = 0
_REPLY: Final = 1


class MasterMethod(str, Enum):
    SERVICE_READY = "ServiceReady"
    PING = "Ping"
    MOUNT_SEGMENT = "MountSegment"
    REMOUNT_SEGMENTS = "ReMountSegment"
    UNMOUNT_SEGMENT = "UnmountSegment"
    PUT_START = "PutStart"
    PUT_END = "PutEnd"
    PUT_REVOKE = "PutRevoke"
    BATCH_PUT_START = "BatchPutStart"
    BATCH_PUT_END = "BatchPutEnd"
    BATCH_PUT_REVOKE = "BatchPutRevoke"
    UPSERT_START = "UpsertStart"
    UPSERT_END = "UpsertEnd"
    UPSERT_REVOKE = "UpsertRevoke"
    BATCH_UPSERT_START = "BatchUpsertStart"
    BATCH_UPSERT_END = "BatchUpsertEnd"
    BATCH_UPSERT_REVOKE = "BatchUpsertRevoke"
    GET_REPLICA_LIST = "GetReplicaList"
    BATCH_GET_REPLICA_LIST = "BatchGetReplicaList"
    GET_REPLICA_LIST_BY_REGEX = "GetReplicaListByRegex"
    EXIST_KEY = "ExistKey"
    BATCH_EXIST_KEY = "BatchExistKey"
    REMOVE = "Remove"
    BATCH_REMOVE = "BatchRemove"
    REMOVE_BY_REGEX = "RemoveByRegex"
    REMOVE_ALL = "RemoveAll"
    GET_SUMMARY = "GetSummary"


@dataclass(frozen=True, slots=True)
class MasterRequest:
    id: int
    method: MasterMethod
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class MasterReply:
    id: int
    code: int
    value: Any


# Built once: json.dumps/loads with options construct a new encoder per call,
# which costs microseconds on every RPC.
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_DECODE = json.JSONDecoder().decode


def _dumps(obj: Any) -> bytes:
    return _ENCODE(obj).encode()


def encode_request(req_id: int, method: MasterMethod, params: dict[str, Any]) -> bytes:
    body = _dumps([method.value, params])
    return PREFIX.pack(len(body) + 5, _REQUEST, req_id) + body


def encode_reply(req_id: int, code: int, value: Any) -> bytes:
    body = _dumps([code, value])
    return PREFIX.pack(len(body) + 5, _REPLY, req_id) + body


class MasterFrameDecoder:
    """Incremental decoder for both directions.

    Raises (from :meth:`next_frame`):
        MalformedMessage: bad length, unknown kind, invalid JSON or shape,
            unknown method.  The connection should be closed.
    """

    def __init__(self, max_length: int = DEFAULT_MAX_MASTER_FRAME) -> None:
        self._max = max_length
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def trailing(self) -> bytes:
        return bytes(self._buf)

    def next_frame(self) -> MasterRequest | MasterReply | NeedData:
        buf = self._buf
        if len(buf) < PREFIX.size:
            return NEED_DATA
        length, kind, req_id = PREFIX.unpack_from(buf, 0)
        if length < 5 or length > self._max:
            raise MalformedMessage(
                f"master RPC frame length {length} is outside [5, {self._max}]; "
                "the peer is not a pymooncake master/client"
            )
        end = 4 + length
        if len(buf) < end:
            return NEED_DATA
        body = buf[PREFIX.size : end]  # (one copy; decode makes the text)
        del buf[:end]
        try:
            head, value = _DECODE(body.decode())
        except (ValueError, TypeError) as exc:
            raise MalformedMessage(f"master RPC frame {req_id} has an invalid body: {exc}") from exc
        if kind == _REQUEST:
            try:
                method = MasterMethod(head)
            except ValueError:
                raise MalformedMessage(f"unknown master RPC method {head!r}") from None
            if not isinstance(value, dict):
                raise MalformedMessage(f"parameters of {head} must be an object")
            return MasterRequest(req_id, method, value)
        if kind == _REPLY:
            if not isinstance(head, int) or isinstance(head, bool):
                raise MalformedMessage(f"reply {req_id} carries a non-integer code {head!r}")
            return MasterReply(req_id, head, value)
        raise MalformedMessage(f"master RPC frame of unknown kind {kind}")
