"""Wire formats between dummy clients and their real client (``mooncake_client``).

pymooncake's own protocol: the reference's dummy <-> real link is coro_rpc with
struct_pack bodies, whose function ids and type hashes are derived from C++
type names and cannot be reproduced from Python (``store.md`` 14).  The
*behaviour* is the reference's: an RPC port (``--port``, default 50052) that
carries the store calls, and an abstract UNIX socket
``@mooncake_client_<port>.sock`` over which a dummy hands the real client the
memfd of each shared-memory region (``SCM_RIGHTS``).

Theory of operation
-------------------
**RPC frames** (TCP ``--port``; both directions) are the master's JSON frames
(``_frames.py``): ``u32 length | u8 kind | u32 id |`` UTF-8 JSON, a request's
body ``[method, params]``, a reply's ``[code, value]``.  ``code`` is the
reference ``ErrorCode`` (0 = OK); on failure ``value`` is the message.  Object
bytes never travel here: calls carry *addresses in the dummy's shared memory*,
which the real client translates into its own mapping of the same pages.

**Memory registration** (abstract UNIX socket, one request per connection)::

    dummy -> real   REGISTER  "<4sBBH16sQQ" magic "MCDS", version, kind 0, flags,
                              client id (16 bytes), dummy base address, size
                              + the memfd in SCM_RIGHTS ancillary data      40 B
    real -> dummy   RESULT    "<4sBBiH" magic, version, kind 1, status (0 or a
                              negative ErrorCode), message length
                              | message (UTF-8, at most 4096 bytes)          12 B + n

``flags`` bit 0 marks the dummy's local buffer (the staging area of the bytes
API) as in the reference's ``ShmRegisterRequest.is_local_buffer``.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from ..errors import MalformedMessage
from ._frames import REPLY, REQUEST, JsonFrameDecoder, json_frame
from ._rpc import NEED_DATA, NeedData

__all__ = [
    "DEFAULT_MAX_DUMMY_FRAME",
    "DUMMY_AUTH_CONTEXT",
    "DUMMY_PROTOCOL_VERSION",
    "SHM_FLAG_LOCAL_BUFFER",
    "SHM_REGISTER_SIZE",
    "DummyFrameDecoder",
    "DummyMethod",
    "DummyReply",
    "DummyRequest",
    "ShmRegister",
    "ShmResult",
    "ShmResultDecoder",
    "decode_shm_register",
    "dummy_ipc_name",
    "encode_dummy_reply",
    "encode_dummy_request",
    "encode_shm_register",
    "encode_shm_result",
]

#: bumped on incompatible changes; ``hello`` carries it both ways
DUMMY_PROTOCOL_VERSION: Final = "pymooncake-dummy/1"
#: HMAC context of the RPC port's cluster-token handshake (``wire/_auth.py``)
DUMMY_AUTH_CONTEXT: Final = b"dummy-rpc"
#: a batch of tens of thousands of keys with their addresses fits comfortably
DEFAULT_MAX_DUMMY_FRAME: Final = 64 << 20


def dummy_ipc_name(port: int) -> str:
    """The abstract UNIX socket of the real client serving dummies on ``port``
    (the reference's ``@mooncake_client_<port>.sock``; Python spells the
    leading ``@`` as a NUL byte)."""
    return f"\0mooncake_client_{port}.sock"


class DummyMethod(str, Enum):
    """The calls a dummy makes (what each does: ``store/_dummy_service.py``)."""

    HELLO = "hello"
    PING = "ping"
    UNREGISTER = "unregister"
    HEALTH = "health"
    PUT = "put"
    GET_INTO = "get_into"
    GET_STAGED = "get_staged"
    LOCATE = "locate"
    READ_RANGES = "read_ranges"
    EXISTS = "exists"
    REPLICAS = "replicas"
    REMOVE = "remove"
    REMOVE_BY_REGEX = "remove_by_regex"
    REMOVE_ALL = "remove_all"
    REPLICA_CLEAR = "replica_clear"
    #: copy/move tasks: {"op": "copy" | "move" | "query", ...}
    TASK = "task"


_METHODS: Final = {m.value: m for m in DummyMethod}


@dataclass(frozen=True, slots=True)
class DummyRequest:
    id: int
    method: DummyMethod
    params: Any


@dataclass(frozen=True, slots=True)
class DummyReply:
    id: int
    code: int
    value: Any


def encode_dummy_request(req_id: int, method: DummyMethod, params: Any) -> bytes:
    """One request frame."""
    return json_frame(REQUEST, req_id, method.value, params)


def encode_dummy_reply(req_id: int, code: int, value: Any) -> bytes:
    """One reply frame (``code`` 0 with the result, or an ErrorCode with a message)."""
    return json_frame(REPLY, req_id, code, value)


class DummyFrameDecoder(JsonFrameDecoder):
    """Incremental decoder for both directions.

    Raises (from :meth:`next_frame`):
        MalformedMessage: bad length, unknown kind, invalid JSON or shape,
            unknown method.  The connection should be closed.
    """

    __slots__ = ()

    def __init__(self, max_length: int = DEFAULT_MAX_DUMMY_FRAME) -> None:
        super().__init__(
            max_length,
            "dummy-client RPC",
            "the peer is not a pymooncake dummy client / mooncake_client of this version",
        )

    def next_frame(self) -> DummyRequest | DummyReply | NeedData:
        parts = self.next_parts()
        if parts is None:
            return NEED_DATA
        kind, req_id, head, value, _text = parts
        if kind == REQUEST:
            method = _METHODS.get(head) if type(head) is str else None
            if method is None:
                raise MalformedMessage(f"unknown dummy RPC method {str(head)[:100]!r}")
            return DummyRequest(req_id, method, value)
        if kind == REPLY:
            if type(head) is not int:
                raise MalformedMessage(f"dummy RPC reply {req_id} carries a non-integer code")
            return DummyReply(req_id, head, value)
        raise self.unknown_kind(kind)


# --------------------------------------------------------------------------------
# memory registration over the UNIX socket
# --------------------------------------------------------------------------------

_SHM_MAGIC: Final = b"MCDS"
_SHM_VERSION: Final = 1
_KIND_REGISTER: Final = 0
_KIND_RESULT: Final = 1
_REGISTER: Final = struct.Struct("<4sBBH16sQQ")
_RESULT: Final = struct.Struct("<4sBBiH")
SHM_REGISTER_SIZE: Final = _REGISTER.size
#: results carry at most this much message text
_MAX_MESSAGE: Final = 4096
#: ShmRegister.flags: the region is the dummy's local buffer
SHM_FLAG_LOCAL_BUFFER: Final = 1


@dataclass(frozen=True, slots=True)
class ShmRegister:
    """A dummy asks the real client to map a region (its memfd travels alongside)."""

    client_id: str  # 32 hex digits
    base: int  # the region's address in the dummy
    size: int
    local_buffer: bool = False


@dataclass(frozen=True, slots=True)
class ShmResult:
    status: int  # 0 or a negative ErrorCode
    message: str = ""


def encode_shm_register(req: ShmRegister) -> bytes:
    """The fixed-size REGISTER message.

    Raises:
        ValueError: the client id is not 32 hex digits or a field is out of range.
    """
    cid = uuid.UUID(hex=req.client_id).bytes
    flags = SHM_FLAG_LOCAL_BUFFER if req.local_buffer else 0
    return _REGISTER.pack(_SHM_MAGIC, _SHM_VERSION, _KIND_REGISTER, flags, cid, req.base, req.size)


def decode_shm_register(data: bytes | bytearray | memoryview) -> ShmRegister:
    """Parse a REGISTER message (exactly :data:`SHM_REGISTER_SIZE` bytes).

    Raises:
        MalformedMessage: wrong size, magic, version or kind, zero address or size.
    """
    if len(data) != _REGISTER.size:
        raise MalformedMessage(
            f"memory registration of {len(data)} bytes; expected {_REGISTER.size}"
        )
    magic, version, kind, flags, cid, base, size = _REGISTER.unpack(data)
    if magic != _SHM_MAGIC or kind != _KIND_REGISTER:
        raise MalformedMessage("not a dummy-client memory registration (bad magic or kind)")
    if version != _SHM_VERSION:
        raise MalformedMessage(
            f"memory registration version {version}, this real client speaks {_SHM_VERSION}: "
            "run the same pymooncake version in the dummy and in mooncake_client"
        )
    if base == 0 or size == 0:
        raise MalformedMessage("memory registration of an empty region")
    return ShmRegister(uuid.UUID(bytes=cid).hex, base, size, bool(flags & SHM_FLAG_LOCAL_BUFFER))


def encode_shm_result(status: int, message: str = "") -> bytes:
    """The RESULT message (the message is cut to 4096 bytes)."""
    text = message.encode("utf-8", "replace")[:_MAX_MESSAGE]
    return _RESULT.pack(_SHM_MAGIC, _SHM_VERSION, _KIND_RESULT, status, len(text)) + text


class ShmResultDecoder:
    """Incremental decoder of one RESULT message.

    Raises (from :meth:`feed`):
        MalformedMessage: bad magic, kind or message length.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._want = _RESULT.size
        self._head: tuple[int, int] | None = None  # status, message length
        self.result: ShmResult | None = None

    @property
    def want(self) -> int:
        """Bytes still needed (0 once :attr:`result` is set)."""
        return 0 if self.result is not None else self._want - len(self._buf)

    @property
    def trailing(self) -> bytes:
        """Bytes received after the message."""
        return bytes(self._buf) if self.result is not None else b""

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data
        if self._head is None and len(self._buf) >= _RESULT.size:
            magic, version, kind, status, n = _RESULT.unpack_from(self._buf, 0)
            if magic != _SHM_MAGIC or kind != _KIND_RESULT or version != _SHM_VERSION:
                raise MalformedMessage(
                    "the real client answered the memory registration with something else; "
                    "is a pymooncake mooncake_client of the same version serving this port?"
                )
            if n > _MAX_MESSAGE:
                raise MalformedMessage(f"registration result message of {n} bytes")
            self._head = (status, n)
            self._want = _RESULT.size + n
        if self._head is not None and self.result is None and len(self._buf) >= self._want:
            status, _n = self._head
            text = bytes(self._buf[_RESULT.size : self._want]).decode("utf-8", "replace")
            del self._buf[: self._want]
            self.result = ShmResult(status, text)
