"""The reference TCP transport's data-connection framing.

Theory of operation
-------------------
Each request on a data connection starts with a 24-byte ``SessionHeader``::

    u64 size     little-endian, payload bytes
    u64 addr     little-endian, the *target's* virtual address
    u8  opcode   low 7 bits: 1 = WRITE (initiator -> target), else READ;
                 bit 7 (0x80) = protocol v2
    u8[7]        padding (zeros sent, ignored on receive)

Protocol v2 adds 8-byte status frames from the target: ``MCTV`` in the high
32 bits and a code in the low 32 bits (0 OK, 1 address rejected; pymooncake
adds 2: authentication required).  For a WRITE
the status follows the payload; for a READ it precedes the payload.  A v1
target simply closes the connection on a bad address.

Several requests may follow each other on one connection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ..errors import MalformedMessage
from ._rpc import NEED_DATA, NeedData, take_bytes

__all__ = [
    "HEADER",
    "OPCODE_READ",
    "OPCODE_WRITE",
    "STATUS",
    "STATUS_ADDR_REJECTED",
    "STATUS_AUTH_REQUIRED",
    "STATUS_MAGIC",
    "STATUS_OK",
    "U64_MAX",
    "V2_FLAG",
    "HeaderDecoder",
    "SessionHeader",
    "StatusDecoder",
    "decode_header",
    "decode_status",
    "encode_header",
    "encode_status",
]

HEADER: Final = struct.Struct("<QQB7x")
STATUS: Final = struct.Struct("<Q")

OPCODE_READ: Final = 0
OPCODE_WRITE: Final = 1
V2_FLAG: Final = 0x80

STATUS_MAGIC: Final = 0x4D435456 << 32  # "MCTV"
STATUS_OK: Final = STATUS_MAGIC | 0
STATUS_ADDR_REJECTED: Final = STATUS_MAGIC | 1
#: pymooncake extension: the target requires cluster authentication and the
#: initiator sent a request without it (a reference peer reads it as a rejection)
STATUS_AUTH_REQUIRED: Final = STATUS_MAGIC | 2

#: largest value of the header's u64 fields (and of an address range's end)
U64_MAX: Final = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class SessionHeader:
    size: int
    addr: int
    is_write: bool
    v2: bool

    @property
    def opcode(self) -> int:
        return (OPCODE_WRITE if self.is_write else OPCODE_READ) | (V2_FLAG if self.v2 else 0)


def encode_header(size: int, addr: int, is_write: bool, v2: bool) -> bytes:
    """Return the 24 header bytes for one request."""
    if not 0 <= size <= U64_MAX or not 0 <= addr <= U64_MAX:
        raise ValueError(f"size {size} / addr {addr:#x} do not fit in 64 bits")
    opcode = (OPCODE_WRITE if is_write else OPCODE_READ) | (V2_FLAG if v2 else 0)
    return HEADER.pack(size, addr, opcode)


def decode_header(data: bytes | bytearray | memoryview, offset: int = 0) -> SessionHeader:
    """Decode 24 bytes at ``offset`` (the caller guarantees they are present)."""
    size, addr, opcode = HEADER.unpack_from(data, offset)
    return SessionHeader(size, addr, (opcode & 0x7F) == OPCODE_WRITE, bool(opcode & V2_FLAG))


def encode_status(ok: bool) -> bytes:
    return STATUS.pack(STATUS_OK if ok else STATUS_ADDR_REJECTED)


def decode_status(value: int) -> bool:
    """True for OK, False for a rejection.

    Raises:
        MalformedMessage: the value does not carry the ``MCTV`` magic.
    """
    if (value >> 32) != (STATUS_MAGIC >> 32):
        raise MalformedMessage(
            f"TCP status frame {value:#018x} lacks the MCTV magic; the peer does not "
            "speak TCP protocol v2 (set MC_TCP_PROTO=1 to force v1)"
        )
    return (value & 0xFFFFFFFF) == 0


class _FixedDecoder:
    _size = 0

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def trailing(self) -> bytes:
        return bytes(self._buf)

    def _take(self) -> bytes | None:
        if len(self._buf) < self._size:
            return None
        out = take_bytes(self._buf, 0, self._size)
        del self._buf[: self._size]
        return out


class HeaderDecoder(_FixedDecoder):
    """Incremental decoder of session headers (payload bytes are not its job)."""

    _size = HEADER.size

    def next_header(self) -> SessionHeader | NeedData:
        raw = self._take()
        return NEED_DATA if raw is None else decode_header(raw)


class StatusDecoder(_FixedDecoder):
    """Incremental decoder of v2 status frames; returns True (OK) / False."""

    _size = STATUS.size

    def next_status(self) -> bool | NeedData:
        raw = self._take()
        return NEED_DATA if raw is None else decode_status(STATUS.unpack(raw)[0])
