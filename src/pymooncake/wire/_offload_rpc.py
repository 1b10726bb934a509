"""Frames of the SSD tier's read port (a client serving its offloaded objects).

Request: ``"MCOR" | u32 length | JSON {"keys": [...], "sizes": [...]}``.
Reply: per key, in order, ``i64 n`` then, when ``n >= 0``, exactly ``n`` value
bytes; a negative ``n`` is the error code of that key (OBJECT_NOT_FOUND: not in
this tier any more, INVALID_REPLICA: damaged or another size).  A connection
carries any number of requests, one at a time.  Sans-IO: no sockets here.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Final

from ..errors import MalformedMessage

__all__ = [
    "AUTH_CONTEXT",
    "ITEM",
    "MAX_REQUEST_BYTES",
    "REQUEST_HEAD",
    "decode_request",
    "encode_request",
]

#: handshake context of the port (cluster-token authentication)
AUTH_CONTEXT: Final = b"offload-rpc"
REQUEST_HEAD: Final = struct.Struct("<4sI")
ITEM: Final = struct.Struct("<q")
_MAGIC: Final = b"MCOR"
MAX_REQUEST_BYTES: Final = 16 << 20


def encode_request(keys: list[str], sizes: list[int]) -> bytes:
    body = json.dumps({"keys": keys, "sizes": sizes}, ensure_ascii=False).encode()
    if len(body) > MAX_REQUEST_BYTES:
        raise MalformedMessage(f"an SSD read request of {len(body)} bytes is too large")
    return REQUEST_HEAD.pack(_MAGIC, len(body)) + body


def decode_head(head: bytes) -> int:
    """Body length of a request whose 8 head bytes are ``head``.

    Raises:
        MalformedMessage: not a request of this port, or too large.
    """
    magic, n = REQUEST_HEAD.unpack(head)
    if magic != _MAGIC:
        raise MalformedMessage(f"not an SSD read request (magic {magic!r})")
    if n > MAX_REQUEST_BYTES:
        raise MalformedMessage(f"SSD read request of {n} bytes exceeds {MAX_REQUEST_BYTES}")
    return int(n)


def decode_request(body: bytes) -> tuple[list[str], list[int]]:
    """Keys and sizes of a request body.

    Raises:
        MalformedMessage: not the expected JSON.
    """
    try:
        obj: Any = json.loads(body)
        keys, sizes = obj["keys"], obj["sizes"]
    except (ValueError, KeyError, TypeError):
        raise MalformedMessage("an SSD read request is not {keys, sizes} JSON") from None
    if (
        type(keys) is not list
        or type(sizes) is not list
        or len(keys) != len(sizes)
        or not all(type(k) is str for k in keys)
        or not all(type(s) is int and s >= 0 for s in sizes)
    ):
        raise MalformedMessage("an SSD read request needs equal lists of keys and sizes")
    return keys, sizes
