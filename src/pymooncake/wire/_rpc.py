"""RPC/handshake frames exchanged on an engine's ``rpc_port``.

Theory of operation
-------------------
The reference (``SocketHandShakePlugin``) frames every message as::

    u64  length   little-endian, = 1 + len(body)
    u8   type     0 Connection, 1 Metadata, 2 Notify, 3 Probe
    u8[] body     compact JSON (jsoncpp FastWriter) followed by "\\n"

One request and one reply of the same type travel per TCP connection.  A
payload whose first byte is greater than 3 is an old-protocol body without a
type byte and is treated as a Connection message.  ``length`` 0 or above the
configured maximum (``MC_HANDSHAKE_MAX_LENGTH``, default 1 MiB) is rejected
before any payload byte is buffered.

This module only turns bytes into frames and back; it never touches a socket.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

from ..errors import MalformedMessage

__all__ = [
    "DEFAULT_MAX_FRAME_LENGTH",
    "LENGTH",
    "NEED_DATA",
    "Frame",
    "FrameDecoder",
    "MessageType",
    "NeedData",
    "dumps_json",
    "encode_frame",
    "encode_frame_json",
    "loads_json",
]

LENGTH: Final = struct.Struct("<Q")

#: reference default of MC_HANDSHAKE_MAX_LENGTH (1 MiB)
DEFAULT_MAX_FRAME_LENGTH: Final = 1 << 20
#: the reference accepts MC_HANDSHAKE_MAX_LENGTH up to 128 MiB
MAX_FRAME_LENGTH_LIMIT: Final = 128 << 20
#: deepest JSON nesting accepted from a peer; descriptors nest 4 levels (object,
#: buffers list, buffer object, rkey list), priority matrices 5
MAX_JSON_DEPTH: Final = 32


class MessageType(IntEnum):
    CONNECTION = 0
    METADATA = 1
    NOTIFY = 2
    PROBE = 3


class NeedData:
    """Sentinel type: the decoder needs more bytes."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} does not fit a double")
    return value


def loads_json(data: bytes | bytearray | memoryview | str, what: str, hint: str = "") -> Any:
    """Parse JSON from a peer, strictly.

    Refused (with :class:`MalformedMessage` naming ``what``): invalid UTF-8 or
    JSON, ``NaN``/``Infinity``, numbers beyond a double or longer than Python's
    integer digit limit, nesting deeper than :data:`MAX_JSON_DEPTH`, and
    strings or keys with lone surrogates (``"\\ud800"``: they cannot be
    encoded again, so one such name would break every reply that lists it).
    ``hint`` is appended to the message of a syntax error.
    """
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise MalformedMessage(f"{what} nests JSON deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise MalformedMessage(f"{what} carries invalid JSON ({str(exc)[:200]}){hint}") from None
    _check_json(value, what)
    return value


def _check_json(value: Any, what: str) -> None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item, what)
        elif isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise MalformedMessage(f"{what} nests JSON deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(item, dict):
                for k, v in item.items():
                    _check_text(k, what)
                    stack.append((v, depth + 1))
            else:
                stack.extend((v, depth + 1) for v in item)


def _check_text(text: str, what: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise MalformedMessage(
                f"{what} contains a string with a lone surrogate ({text[:60]!r}); names and keys "
                "must be valid Unicode"
            ) from None


def take_bytes(buf: bytearray, start: int, end: int) -> bytes:
    """``bytes(buf[start:end])`` in one copy (slicing a bytearray copies too).

    The decoders call it before ``del buf[:n]``, which needs every view of
    ``buf`` released: the views here are, when this returns."""
    with memoryview(buf) as mv, mv[start:end] as part:
        return bytes(part)


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame.  ``body`` is the JSON text including its newline."""

    type: MessageType
    body: bytes

    def json(self) -> Any:
        """Parse the body.

        Raises:
            MalformedMessage: the body is not valid JSON.
        """
        return loads_json(
            self.body,
            f"RPC frame of type {self.type.name}",
            "; the peer is not a Mooncake transfer engine or speaks another version",
        )


def dumps_json(obj: Any) -> bytes:
    """Serialise like jsoncpp's FastWriter: compact, keys sorted, no newline."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def encode_frame(msg_type: MessageType, body: bytes) -> bytes:
    """Frame an already-serialised body (which should end with ``\\n``)."""
    return LENGTH.pack(len(body) + 1) + bytes((int(msg_type),)) + body


def encode_frame_json(msg_type: MessageType, obj: Any) -> bytes:
    """Frame a JSON value the way the reference does (compact JSON + newline)."""
    return encode_frame(msg_type, dumps_json(obj) + b"\n")


class FrameDecoder:
    """Incremental decoder for RPC frames.

    Feed bytes with :meth:`feed`, then call :meth:`next_frame` until it returns
    :data:`NEED_DATA`.  Bytes after a complete frame stay buffered for the next
    call (``trailing`` exposes them).

    Args:
        max_length: largest accepted ``length`` field (1 + body).

    Raises (from ``next_frame``):
        MalformedMessage: zero length, or a length above ``max_length``; the
            check happens as soon as the 8 length bytes are in, before the
            payload is buffered.
    """

    def __init__(self, max_length: int = DEFAULT_MAX_FRAME_LENGTH) -> None:
        if max_length < 1:
            raise ValueError("max_length must be positive")
        self._max_length = max_length
        self._buf = bytearray()

    @property
    def trailing(self) -> bytes:
        return bytes(self._buf)

    @property
    def buffered(self) -> int:
        """Bytes held (for aggregate buffer accounting)."""
        return len(self._buf)

    def pending_length(self) -> int | None:
        """The ``length`` of the frame being received once its 8 length bytes
        are in (None before), checked like :meth:`next_frame` checks it.

        Raises:
            MalformedMessage: zero or above the limit.
        """
        if len(self._buf) < LENGTH.size:
            return None
        (length,) = LENGTH.unpack_from(self._buf, 0)
        self._check_length(length)
        return int(length)

    def _check_length(self, length: int) -> None:
        if length == 0:
            raise MalformedMessage("RPC frame with length 0 (the reference rejects it too)")
        if length > self._max_length:
            raise MalformedMessage(
                f"RPC frame of {length} bytes exceeds the limit of {self._max_length} bytes "
                "(MC_HANDSHAKE_MAX_LENGTH); raise it on this side if descriptors are that large"
            )

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> Frame | NeedData:
        buf = self._buf
        if len(buf) < LENGTH.size:
            return NEED_DATA
        (length,) = LENGTH.unpack_from(buf, 0)
        self._check_length(length)
        end = LENGTH.size + length
        if len(buf) < end:
            return NEED_DATA
        first = buf[LENGTH.size]
        if first > MessageType.PROBE:
            # Old protocol: no type byte, the whole payload is a Connection body.
            frame = Frame(MessageType.CONNECTION, take_bytes(buf, LENGTH.size, end))
        else:
            frame = Frame(MessageType(first), take_bytes(buf, LENGTH.size + 1, end))
        del buf[:end]
        return frame
