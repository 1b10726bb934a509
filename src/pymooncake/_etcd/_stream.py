"""The watch stream as values: the request that opens it, the messages in it,
and the decoder that cuts the byte stream into messages.

``POST /v3/watch`` answers with newline-terminated JSON objects, each wrapped
in ``{"result": ...}`` (or ``{"error": ...}`` when the stream ends in error).
Nothing here touches a socket.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import MalformedMessage
from ._wire import (
    GatewayError,
    KeyValue,
    _b64,
    _header_revision,
    _int,
    _obj,
    decode_error,
)

__all__ = [
    "StreamDecoder",
    "WatchEvent",
    "WatchResponse",
    "decode_watch_message",
    "watch_request",
]


def watch_request(
    key: bytes,
    range_end: bytes | None = None,
    *,
    start_revision: int = 0,
    prev_kv: bool = False,
    progress_notify: bool = False,
) -> dict[str, Any]:
    create: dict[str, Any] = {"key": _b64(key)}
    if range_end is not None:
        create["range_end"] = _b64(range_end)
    if start_revision:
        create["start_revision"] = str(start_revision)
    if prev_kv:
        create["prev_kv"] = True
    if progress_notify:
        create["progress_notify"] = True
    return {"create_request": create}


@dataclass(frozen=True)
class WatchEvent:
    """A change to one key: ``type`` is ``"PUT"`` or ``"DELETE"``; ``kv.mod_revision``
    is the revision of the change (a DELETE's ``kv`` has the key and that revision
    only).  ``prev_kv`` is set when the watch asked for it."""

    type: Literal["PUT", "DELETE"]
    kv: KeyValue
    prev_kv: KeyValue | None = None

    @classmethod
    def decode(cls, obj: Any) -> WatchEvent:
        event = _obj(obj, "watch event")
        kind = event.get("type", "PUT")
        if kind not in ("PUT", "DELETE"):
            raise MalformedMessage(f"etcd watch event of unknown type {kind!r}")
        prev = event.get("prev_kv")
        return cls(
            kind,
            KeyValue.decode(event.get("kv", {})),
            None if prev is None else KeyValue.decode(prev),
        )


@dataclass(frozen=True)
class WatchResponse:
    """One message of a watch stream.

    ``revision``: the store revision the message was sent at -- every change up
    to it has been reported.  ``created``: the first message of a (re)started
    stream.  ``canceled`` with ``compact_revision``: the requested start revision
    was compacted away; changes before ``compact_revision`` are lost.
    """

    revision: int
    events: tuple[WatchEvent, ...] = ()
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""
    watch_id: int = 0

    @classmethod
    def decode(cls, obj: Any) -> WatchResponse:
        msg = _obj(obj, "watch message")
        result = _obj(msg.get("result", msg), "watch result")
        return cls(
            revision=_header_revision(result),
            events=tuple(WatchEvent.decode(e) for e in result.get("events", ())),
            created=bool(result.get("created", False)),
            canceled=bool(result.get("canceled", False)),
            compact_revision=_int(result, "compact_revision"),
            cancel_reason=str(result.get("cancel_reason", "")),
            watch_id=_int(result, "watch_id"),
        )


class StreamDecoder:
    """Cuts the gateway's stream of newline-terminated JSON objects into decoded
    objects.  Feed bytes as they come; :meth:`next` returns one object, or None
    when more bytes are needed.  (JSON text never holds a raw newline, so the
    newline is an exact frame boundary.)

    Raises:
        MalformedMessage: a line that is not JSON, or one growing past
            ``max_bytes`` without its newline (checked as bytes arrive).
    """

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self._buf = bytearray()
        self._max = max_bytes

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > self._max and b"\n" not in self._buf:
            raise MalformedMessage(f"etcd stream message exceeds {self._max} bytes")

    def next(self) -> Any | None:
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                return None
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if not line.strip():
                continue
            try:
                return json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise MalformedMessage(
                    f"etcd stream carries something that is not JSON: {line[:200]!r} ({exc})"
                ) from None

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished message."""
        return len(self._buf)


def decode_watch_message(obj: Any) -> WatchResponse | GatewayError:
    """One object of a watch stream: a response, or the error that ended the stream."""
    msg = _obj(obj, "watch message")
    if "error" in msg:
        return decode_error(0, json.dumps(msg["error"]).encode())
    return WatchResponse.decode(msg)
