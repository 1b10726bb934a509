"""JSON frames: the framing of the master RPC (``_master.py``) and of the
dummy-client RPC (``_dummy.py``), which differ only in their methods.

Theory of operation
-------------------
Each frame is::

    u32  length     little-endian: bytes after this field
    u8   kind       0 request, 1 reply
    u32  id         little-endian request id, echoed by the reply
    u8[] body       UTF-8 JSON: request [method, params]; reply [code, value]

:class:`JsonFrameDecoder` splits a byte stream into frames and their decoded
``[head, value]`` bodies; each protocol's decoder turns those into its own
typed request and reply frames.  The length is checked against the decoder's
limit before a byte of the body is buffered, and the body must be strict JSON:
``NaN``/``Infinity``, invalid UTF-8 and nesting deep enough to exhaust the
parser are refused as :class:`MalformedMessage` (the connection is then closed).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any, Final

from ..errors import MalformedMessage

__all__ = ["PREFIX", "REPLY", "REQUEST", "JsonFrameDecoder", "encode_json", "json_frame"]

PREFIX: Final = struct.Struct("<IBI")
REQUEST: Final = 0
REPLY: Final = 1

# Built once: json.dumps/loads with options construct a new encoder per call,
# and even a kept JSONEncoder builds its C encoder on every encode; a frame is
# encoded by one C encoder made here (no circular-reference bookkeeping: the
# values are the master's own lists and dicts) and decoded by the C scanner
# directly (the full decode only for text with surrounding whitespace or an error).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_C_ENCODER: Any = getattr(json.encoder, "c_make_encoder", None)
_ENCODE: Callable[[Any], str]
if _C_ENCODER is not None:
    _ONE_SHOT = _C_ENCODER(
        None, _ENCODER.default, json.encoder.encode_basestring, None, ":", ",", False, False, True
    )

    def _encode(value: Any) -> str:
        return "".join(_ONE_SHOT(value, 0))

    _ENCODE = _encode
else:  # (no C accelerator)
    _ENCODE = _ENCODER.encode


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_SCAN: Callable[[str, int], tuple[Any, int]] = getattr(_DECODER, "scan_once")  # noqa: B009


def _decode(text: str) -> Any:
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:
        return _DECODER.decode(text)  # leading whitespace, or its error message
    if end != len(text):
        return _DECODER.decode(text)
    return value


#: ``value`` as compact JSON text (what a frame's body holds): the encoder
#: itself, not a function calling it (one call less on every frame)
encode_json: Final[Callable[[Any], str]] = _ENCODE


def json_frame(kind: int, req_id: int, head: Any, value: Any) -> bytes:
    """One frame whose body is ``[head, value]``.

    Raises:
        UnicodeEncodeError: a string in ``value`` is not valid UTF-8 (lone
            surrogates; the request boundaries refuse those).
    """
    body = _ENCODE([head, value]).encode()
    return PREFIX.pack(len(body) + 5, kind, req_id) + body


class JsonFrameDecoder:
    """Incremental splitter of JSON frames, for both directions.

    Args:
        max_length: the longest frame accepted (its length field).
        what: the protocol in messages ("master RPC").
        stranger: what a frame length out of bounds says about the peer.
    """

    __slots__ = ("_buf", "_max", "_stranger", "_what")

    def __init__(self, max_length: int, what: str, stranger: str) -> None:
        self._max = max_length
        self._what = what
        self._stranger = stranger
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

    @property
    def trailing(self) -> bytes:
        return bytes(self._buf)

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

    def next_parts(self) -> tuple[int, int, Any, Any, str] | None:
        """The next complete frame as ``(kind, id, head, value, body text)``; None
        until one is complete.

        Raises:
            MalformedMessage: a length out of bounds, or a body that is not a
                strict-JSON ``[head, value]`` pair.
        """
        buf = self._buf
        if len(buf) < PREFIX.size:
            return None
        length, kind, req_id = PREFIX.unpack_from(buf, 0)
        if length < 5 or length > self._max:
            raise MalformedMessage(
                f"{self._what} frame length {length} is outside [5, {self._max}]; {self._stranger}"
            )
        end = 4 + length
        if len(buf) < end:
            return None
        body = buf[PREFIX.size : end]
        del buf[:end]
        return self._parts(kind, req_id, body)

    def whole_parts(
        self, data: bytes | bytearray | memoryview, nbytes: int, kind: int
    ) -> tuple[int, int, Any, Any, str] | None:
        """:meth:`next_parts` of ``data[:nbytes]`` when those bytes are exactly one
        whole frame of ``kind`` and nothing is buffered (a peer that waits for each
        answer: nearly every read), decoded where they lie, without passing through
        the buffer; None for anything else (:meth:`feed` it then, which also
        explains a bad frame).

        Raises:
            MalformedMessage: the body is not a strict-JSON ``[head, value]`` pair.
        """
        if self._buf or nbytes < PREFIX.size:
            return None
        length, got, req_id = PREFIX.unpack_from(data, 0)
        if length + 4 != nbytes or length > self._max or got != kind:
            return None
        return self._parts(kind, req_id, memoryview(data)[PREFIX.size : nbytes])

    def _parts(
        self, kind: int, req_id: int, body: bytes | bytearray | memoryview
    ) -> tuple[int, int, Any, Any, str]:
        """:meth:`next_parts` of a frame's body (``body``: its bytes)."""
        try:
            text = str(body, "utf-8")
            decoded = _decode(text)
        except RecursionError:
            raise MalformedMessage(f"{self._what} frame {req_id} nests JSON too deeply") from None
        except (ValueError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
            raise MalformedMessage(
                f"{self._what} frame {req_id} has an invalid body: {str(exc)[:200]}"
            ) from None
        if type(decoded) is not list or len(decoded) != 2:
            raise MalformedMessage(f"{self._what} frame {req_id} is not a [head, body] pair")
        return kind, req_id, decoded[0], decoded[1], text

    def unknown_kind(self, kind: int) -> MalformedMessage:
        return MalformedMessage(f"{self._what} frame of unknown kind {kind}")
