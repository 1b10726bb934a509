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

The length is checked against the decoder's limit before a byte of the body is
buffered.  The body must be strict JSON: ``NaN``/``Infinity``, invalid UTF-8 and
nesting deep enough to exhaust the parser are refused as
:class:`MalformedMessage` (the connection is then closed).  What the parameters
*mean* is checked by :func:`~._master_msgs.decode_request`, which answers a bad
request with INVALID_PARAMS instead of closing the connection.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Final

from ..errors import MalformedMessage
from ._master_msgs import MasterMethod, Request
from ._rpc import NEED_DATA, NeedData

__all__ = [
    "DEFAULT_MAX_MASTER_FRAME",
    "NO_TOKEN_MESSAGE",
    "PROTOCOL_VERSION",
    "MasterFrameDecoder",
    "MasterReply",
    "MasterRequest",
    "encode_json",
    "encode_reply",
    "encode_reply_json",
    "encode_request",
    "master_unix_name",
]

PREFIX: Final = struct.Struct("<IBI")
#: batches of tens of thousands of keys fit comfortably
DEFAULT_MAX_MASTER_FRAME: Final = 64 << 20
#: bumped on incompatible changes; ServiceReady returns it
PROTOCOL_VERSION: Final = "pymooncake-master/3"
#: a master with a cluster token answers a request sent without authenticating
#: with this message (code ILLEGAL_CLIENT) and closes the connection
NO_TOKEN_MESSAGE: Final = (
    "this master requires the cluster token and the client sent a request without "
    "authenticating: set the master's PYMOONCAKE_CLUSTER_TOKEN in the client's environment "
    "(or EngineConfig(cluster_token=...))"
)


def master_unix_name(host: str, port: int) -> str:
    """Abstract UNIX socket name of the master listening on ``host:port`` (it
    serves the same frames there, for clients on its host)."""
    return f"\0pymooncake-master:{host}:{port}"


_REQUEST: Final = 0
_REPLY: Final = 1
_METHODS: Final = {m.value: m for m in MasterMethod}


@dataclass(frozen=True, slots=True)
class MasterRequest:
    """A request frame: method and raw parameters (validated later, so that a bad
    parameter is answered INVALID_PARAMS on the same connection)."""

    id: int
    method: MasterMethod
    params: Any
    #: the body held ``\\ud8xx``-``\\udfxx`` escapes: strings may hold lone surrogates
    escapes: bool = True


@dataclass(frozen=True, slots=True)
class MasterReply:
    id: int
    code: int
    value: Any


# Built once: json.dumps/loads with options construct a new encoder per call,
# which costs microseconds on every RPC.
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_DECODE = json.JSONDecoder(parse_constant=_refuse_constant).decode


def _dumps(obj: Any) -> bytes:
    return _ENCODE(obj).encode()


def encode_request(req_id: int, request: Request, *, rid: int = 0, ack: int = 0) -> bytes:
    """One request frame; ``rid``/``ack`` (mutations) enable the master's reply cache."""
    params = request.params()
    if rid:
        params["rid"] = rid
        params["ack"] = ack
    body = _dumps([request.METHOD.value, params])
    return PREFIX.pack(len(body) + 5, _REQUEST, req_id) + body


def encode_reply(req_id: int, code: int, value: Any) -> bytes:
    """One reply frame.

    Raises:
        UnicodeEncodeError: ``value`` holds a string that is not valid UTF-8 (the
            request boundary refuses those, so this is a bug of the caller).
    """
    body = _dumps([code, value])
    return PREFIX.pack(len(body) + 5, _REPLY, req_id) + body


def encode_json(value: Any) -> str:
    """``value`` as compact JSON text (what :func:`encode_reply` puts in a frame)."""
    return _ENCODE(value)


def encode_reply_json(req_id: int, code: int, value_json: str) -> bytes:
    """A reply frame whose value is already JSON text (a large reply the master
    encodes a slice at a time, so that no single step holds its event loop)."""
    body = f"[{code},{value_json}]".encode()
    return PREFIX.pack(len(body) + 5, _REPLY, req_id) + body


def _has_surrogate_escape(body: bytes | bytearray) -> bool:
    return b"\\ud" in body or b"\\uD" in body


class MasterFrameDecoder:
    """Incremental decoder for both directions.

    Raises (from :meth:`next_frame`):
        MalformedMessage: bad length, unknown kind, invalid JSON or shape,
            unknown method.  The connection should be closed.
    """

    def __init__(self, max_length: int = DEFAULT_MAX_MASTER_FRAME) -> None:
        self._max = max_length
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes (copied: ``data`` may be reused by the caller)."""
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return len(self._buf)

    @property
    def pending_length(self) -> int:
        """Length of the frame being received (0 when no prefix is buffered)."""
        if len(self._buf) < PREFIX.size:
            return 0
        return int(PREFIX.unpack_from(self._buf, 0)[0]) + 4

    def complete_ids(self) -> list[int]:
        """Ids of the complete frames buffered, read from their prefixes only (no
        body is decoded; a frame that will fail to decode is included)."""
        ids: list[int] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= PREFIX.size:
            length, _, req_id = PREFIX.unpack_from(buf, pos)
            if length < 5 or length > self._max or len(buf) - pos < 4 + length:
                break
            ids.append(req_id)
            pos += 4 + length
        return ids

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
                "the peer is not a pymooncake master/client of this version"
            )
        end = 4 + length
        if len(buf) < end:
            return NEED_DATA
        body = buf[PREFIX.size : end]
        del buf[:end]
        try:
            decoded = _DECODE(body.decode())
        except RecursionError:
            raise MalformedMessage(f"master RPC frame {req_id} nests JSON too deeply") from None
        except (ValueError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
            raise MalformedMessage(
                f"master RPC frame {req_id} has an invalid body: {str(exc)[:200]}"
            ) from None
        if type(decoded) is not list or len(decoded) != 2:
            raise MalformedMessage(f"master RPC frame {req_id} is not a [head, body] pair")
        head, value = decoded
        if kind == _REQUEST:
            method = _METHODS.get(head) if type(head) is str else None
            if method is None:
                raise MalformedMessage(f"unknown master RPC method {str(head)[:100]!r}")
            return MasterRequest(req_id, method, value, _has_surrogate_escape(body))
        if kind == _REPLY:
            if type(head) is not int:
                raise MalformedMessage(f"reply {req_id} carries a non-integer code {head!r}")
            return MasterReply(req_id, head, value)
        raise MalformedMessage(f"master RPC frame of unknown kind {kind}")
