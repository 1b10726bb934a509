"""Framing of the store master's RPC protocol (pymooncake's own; the reference's
coro_rpc/struct_pack format is not reproducible from Python, see store.md 14).

Theory of operation
-------------------
Frames are JSON frames (``_frames.py``): ``u32 length | u8 kind | u32 id |``
UTF-8 JSON, a request's body ``[method, params]``, a reply's ``[code, value]``.
``code`` is the reference ``ErrorCode`` (0 = OK); on failure ``value`` is the
error message.  A connection may carry any number of requests back to back
(pipelining); replies come back in request order.  Object bytes never travel
here -- the master only hands out addresses.

A frame that is not strict JSON, or too long, is refused as
:class:`MalformedMessage` (the connection is then closed).  What the parameters
*mean* is checked by :func:`~._master_msgs.decode_request`, which answers a bad
request with INVALID_PARAMS instead of closing the connection.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring as _json_str
from typing import Any, Final

from ..errors import MalformedMessage
from ._frames import PREFIX, REPLY, REQUEST, JsonFrameDecoder, encode_json, json_frame
from ._master_msgs import (
    _U64,
    MAX_KEY_CHARS,
    MAX_NAME_CHARS,
    CommitSlot,
    ExistKey,
    GetReplicaList,
    MasterMethod,
    Remove,
    Request,
)
from ._master_reply_msgs import GetReplicaListReply
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
    "encode_short_reply",
    "master_unix_name",
]

#: batches of tens of thousands of keys fit comfortably
DEFAULT_MAX_MASTER_FRAME: Final = 64 << 20
#: bumped on incompatible changes (4: ReserveSlots / CommitSlot; 5: BatchCommitSlots;
#: 6: reserved buffers with HA: CommitSlot.confirmed, HaConfirm.slots; 7: a uniform
#: column of a columnar reply and a batch's equal sizes as one integer, a batch that
#: wholly succeeded answered with its key count; 8: an address column as runs,
#: ``addr_runs``); ServiceReady returns it
PROTOCOL_VERSION: Final = "pymooncake-master/8"
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


_METHODS: Final = {m.value: m for m in MasterMethod}

#: the requests whose whole body is ``[method, {"key": key}]`` (every ``get`` and
#: ``is_exist``), read by :meth:`MasterFrameDecoder.whole_key_read` without the JSON
#: decoder: the request type of each such method (what the master builds of one)
KEY_READ_TYPES: Final[dict[MasterMethod, type[ExistKey] | type[GetReplicaList]]] = {
    MasterMethod.EXIST_KEY: ExistKey,
    MasterMethod.GET_REPLICA_LIST: GetReplicaList,
}
#: a JSON string as this package's clients write one that needs no escape: no
#: '"', no backslash, no control character (the bodies below are read without
#: the JSON decoder when every string in them is one)
_PLAIN_STR: Final = rb'"([^"\\\x00-\x1f]*)"'
#: the body of every ``get`` and ``is_exist`` (``_key_read_text``), read by
#: :meth:`MasterFrameDecoder.whole_key_read`: ``[method, {"key": key}]``
_KEY_READ_BODY: Final = re.compile(
    rb'\["('
    + b"|".join(m.value.encode() for m in KEY_READ_TYPES)
    + rb')",\{"key":'
    + _PLAIN_STR
    + rb"\}\]"
)
_KEY_READ_METHODS: Final = {m.value.encode(): m for m in KEY_READ_TYPES}
#: their names' first letters, the body's third byte (other requests skip the match)
_KEY_READ_FIRST: Final = frozenset(m.value.encode()[0] for m in KEY_READ_TYPES)
#: the longest such frame: a key of MAX_KEY_CHARS characters of 4 UTF-8 bytes each
_KEY_READ_MAX: Final = (
    PREFIX.size
    + max(len(f'["{m.value}",{{"key":"') for m in KEY_READ_TYPES)
    + 4 * MAX_KEY_CHARS
    + 3
)

#: a buffer's name: ``SLOT_PREFIX`` starts it with U+0001, written as an escape
_SLOT_STR: Final = rb'"(\\u0001)?([^"\\\x00-\x1f]*)"'
#: a mutation's reply-cache ids: plain JSON integers (no sign, no leading zero)
_ID: Final = rb"(0|[1-9][0-9]{0,19})"
_SESSION_END: Final = rb'(?:,"rid":' + _ID + rb',"ack":' + _ID + rb")?\}\]"
#: the bodies of a ``Remove`` and of a single put's ``CommitSlot`` as this
#: package's clients write them (``_remove_text``, ``_commit_slot_text``), read
#: by :meth:`MasterFrameDecoder.whole_mutation`
_REMOVE_BODY: Final = re.compile(
    rb'\["Remove",\{"client_id":'
    + _PLAIN_STR
    + rb',"key":'
    + _PLAIN_STR
    + rb',"force":(true|false)'
    + _SESSION_END
)
_COMMIT_SLOT_BODY: Final = re.compile(
    rb'\["CommitSlot",\{"client_id":'
    + _PLAIN_STR
    + rb',"slot":'
    + _SLOT_STR
    + rb',"key":'
    + _PLAIN_STR
    + _SESSION_END
)


def _remove_of(groups: tuple[Any, ...]) -> Remove | None:
    """The ``Remove`` that ``Remove.decode`` makes of a body ``_REMOVE_BODY``
    matched (its groups); None where that decode would refuse it or the bytes
    are not UTF-8 (the general path then says why)."""
    client_b, key_b, force, rid_b, ack_b = groups
    try:
        client, key = client_b.decode(), key_b.decode()
    except UnicodeDecodeError:
        return None
    rid = 0 if rid_b is None else int(rid_b)
    ack = 0 if ack_b is None else int(ack_b)
    if not 0 < len(key) <= MAX_KEY_CHARS or len(client) > MAX_NAME_CHARS:
        return None
    if rid >= _U64 or ack >= _U64:
        return None
    return Remove(key, force == b"true", client, rid, ack)


def _commit_slot_of(groups: tuple[Any, ...]) -> CommitSlot | None:
    """As :func:`_remove_of`, for ``CommitSlot`` (``_COMMIT_SLOT_BODY``)."""
    client_b, escaped, slot_b, key_b, rid_b, ack_b = groups
    try:
        client, slot, key = client_b.decode(), slot_b.decode(), key_b.decode()
    except UnicodeDecodeError:
        return None
    if escaped is not None:
        slot = "\x01" + slot
    rid = 0 if rid_b is None else int(rid_b)
    ack = 0 if ack_b is None else int(ack_b)
    if (
        not 0 < len(key) <= MAX_KEY_CHARS
        or not 0 < len(slot) <= MAX_NAME_CHARS
        or not 0 < len(client) <= MAX_NAME_CHARS
        or rid >= _U64
        or ack >= _U64
    ):
        return None
    return CommitSlot(client, slot, key, rid, ack)


#: a JSON integer of at most 20 digits (``int()`` reads it as JSON does; longer
#: ones take the general path, which also refuses those past Python's digit limit)
_INT: Final = rb"(-?(?:0|[1-9][0-9]{0,19}))"
#: a get's reply naming one replica, as the master writes it
#: (``GetReplicaListReply.to_json``), read by :meth:`MasterFrameDecoder.whole_reply`
#: without the JSON decoder
_GET_REPLY_HEAD: Final = b'[0,{"replicas":[['
_GET_REPLY_BODY: Final = re.compile(
    re.escape(_GET_REPLY_HEAD)
    + b",".join([_INT, _PLAIN_STR, _INT, _INT, _INT, _PLAIN_STR])
    + rb'\]\],"lease_ttl_ms":'
    + _INT
    + rb',"size":'
    + _INT
    + rb"\}\]"
)


def _get_reply_of(groups: tuple[Any, ...]) -> GetReplicaListReply | None:
    """The reply ``GetReplicaListReply.decode`` makes of a body
    ``_GET_REPLY_BODY`` matched (its groups); None where a string is not UTF-8."""
    a, segment_b, b, c, d, transport_b, ttl, size = groups
    try:
        segment, transport = segment_b.decode(), transport_b.decode()
    except UnicodeDecodeError:
        return None
    replica = (int(a), segment, int(b), int(c), int(d), transport)
    return GetReplicaListReply((replica,), int(ttl), int(size))


#: keyed by the body's third byte (the method name's first letter)
_WHOLE_MUTATIONS: Final[dict[int, tuple[re.Pattern[bytes], Callable[[tuple[Any, ...]], Any]]]] = {
    ord("R"): (_REMOVE_BODY, _remove_of),
    ord("C"): (_COMMIT_SLOT_BODY, _commit_slot_of),
}


@dataclass(slots=True)
class MasterRequest:
    """A request frame: method and raw parameters (validated later, so that a bad
    parameter is answered INVALID_PARAMS on the same connection).  Not frozen: a
    frozen dataclass pays ``object.__setattr__`` per field, on every request."""

    id: int
    method: MasterMethod
    params: Any
    #: the body held ``\\ud8xx``-``\\udfxx`` escapes: strings may hold lone surrogates
    escapes: bool = True


@dataclass(slots=True)
class MasterReply:
    id: int
    code: int
    value: Any


def _key_read_text(req: ExistKey | GetReplicaList, rid: int, ack: int) -> str | None:
    if rid or type(req.key) is not str:
        return None
    return f'["{req.NAME}",{{"key":{_json_str(req.key)}}}]'


def _session_tail(rid: int, ack: int) -> str | None:
    """``,"rid":R,"ack":A`` as the general encoder ends a mutation's members
    (nothing without ``rid``); None for ids that are not plain ints."""
    if not rid:
        return ""
    if type(rid) is not int or type(ack) is not int:
        return None
    return f',"rid":{rid},"ack":{ack}'


def _remove_text(req: Remove, rid: int, ack: int) -> str | None:
    tail = _session_tail(rid, ack)
    if req.rid or tail is None or type(req.force) is not bool:  # (the general path then)
        return None
    if type(req.client_id) is not str or type(req.key) is not str:
        return None
    return (
        f'["Remove",{{"client_id":{_json_str(req.client_id)},"key":{_json_str(req.key)},'
        f'"force":{"true" if req.force else "false"}{tail}}}]'
    )


def _commit_slot_text(req: CommitSlot, rid: int, ack: int) -> str | None:
    tail = _session_tail(rid, ack)
    if req.rid or req.confirmed or tail is None:  # (the general path then)
        return None
    if type(req.client_id) is not str or type(req.slot) is not str or type(req.key) is not str:
        return None
    return (
        f'["CommitSlot",{{"client_id":{_json_str(req.client_id)},"slot":{_json_str(req.slot)},'
        f'"key":{_json_str(req.key)}{tail}}}]'
    )


#: the commonest requests (every get, is_exist, remove and single put's commit),
#: their body text made directly: the general encoder's bytes (a property test
#: says so) in a third of its time; None from one of these means "not the usual
#: shape" and the general encoder makes it
_DIRECT_TEXT: Final[dict[type[Request], Callable[[Any, int, int], str | None]]] = {
    ExistKey: _key_read_text,
    GetReplicaList: _key_read_text,
    Remove: _remove_text,
    CommitSlot: _commit_slot_text,
}


def encode_request(req_id: int, request: Request, *, rid: int = 0, ack: int = 0) -> bytes:
    """One request frame; ``rid``/``ack`` (mutations) enable the master's reply cache.

    Raises:
        UnicodeEncodeError: a string of ``request`` is not valid UTF-8 (lone
            surrogates).
    """
    direct = _DIRECT_TEXT.get(type(request))
    if direct is not None:
        text = direct(request, rid, ack)
        if text is not None:
            body = text.encode()
            return PREFIX.pack(len(body) + 5, REQUEST, req_id) + body
    return encode_request_generally(req_id, request, rid=rid, ack=ack)


def encode_request_generally(req_id: int, request: Request, *, rid: int = 0, ack: int = 0) -> bytes:
    """:func:`encode_request` through the request's ``params()`` and the JSON
    encoder, for every request (what the direct texts must equal)."""
    params = request.params()
    if rid:
        params["rid"] = rid
        params["ack"] = ack
    return json_frame(REQUEST, req_id, request.NAME, params)


def encode_reply(req_id: int, code: int, value: Any) -> bytes:
    """One reply frame.

    Raises:
        UnicodeEncodeError: ``value`` holds a string that is not valid UTF-8 (the
            request boundary refuses those, so this is a bug of the caller).
    """
    return json_frame(REPLY, req_id, code, value)


def encode_reply_json(req_id: int, code: int, value_json: str) -> bytes:
    """A reply frame whose value is already JSON text (a large reply the master
    encodes a slice at a time, so that no single step holds its event loop)."""
    body = f"[{code},{value_json}]".encode()
    return PREFIX.pack(len(body) + 5, REPLY, req_id) + body


def _has_surrogate_escape(text: str) -> bool:
    # (a str's ``in``: a bytes ``in`` first tries the operand as an integer and
    # formats a TypeError each time)
    return "\\u" in text and ("\\ud" in text or "\\uD" in text)


class MasterFrameDecoder(JsonFrameDecoder):
    """Incremental decoder for both directions.

    Raises (from :meth:`next_frame`):
        MalformedMessage: bad length, unknown kind, invalid JSON or shape,
            unknown method.  The connection should be closed.
    """

    __slots__ = ()

    def __init__(self, max_length: int = DEFAULT_MAX_MASTER_FRAME) -> None:
        super().__init__(
            max_length,
            "master RPC",
            "the peer is not a pymooncake master/client of this version",
        )

    def next_request(self) -> tuple[int, MasterMethod, Any, bool] | None:
        """The next complete request frame as ``(id, method, params, escapes)``
        (see :class:`MasterRequest`; the master serves these without building a
        frame object per request); None until one is complete.

        Raises:
            MalformedMessage: as :meth:`next_frame`, and for a reply frame (a
                client sent one to the master).
        """
        return self._request(self.next_parts())

    def whole_request(
        self, data: bytearray | memoryview, nbytes: int
    ) -> tuple[int, MasterMethod, Any, bool] | None:
        """:meth:`next_request` of a read that is exactly one whole request frame
        (``JsonFrameDecoder.whole_parts``); None for anything else (feed it).

        Raises:
            MalformedMessage: the body is not a strict-JSON ``[head, value]`` pair,
                or names no method.
        """
        return self._request(self.whole_parts(data, nbytes, REQUEST))

    def whole_key_read(
        self, data: bytearray | memoryview, nbytes: int
    ) -> tuple[int, MasterMethod, str] | None:
        """``(id, method, key)`` of a read that is exactly one whole ``ExistKey`` or
        ``GetReplicaList`` request whose body is ``[method, {"key": key}]`` as this
        package's clients encode it, the key a plain JSON string (no escape, every
        character printable, 1 to ``MAX_KEY_CHARS`` of them): the request
        ``decode_request`` would make of that frame, found without the JSON
        decoder (a master's most frequent requests; ~4 us of its ~20 us each).
        None for anything else, which then takes :meth:`whole_request` or
        :meth:`feed` (which also explain a bad frame); never raises.
        """
        if self._buf or not PREFIX.size + 8 <= nbytes <= _KEY_READ_MAX:
            return None
        if data[PREFIX.size + 2] not in _KEY_READ_FIRST:  # (other requests)
            return None
        length, kind, req_id = PREFIX.unpack_from(data, 0)
        if length + 4 != nbytes or kind != REQUEST or length > self._max:
            return None
        match = _KEY_READ_BODY.fullmatch(data, PREFIX.size, nbytes)
        if match is None:
            return None
        name, raw = match.groups()
        try:
            key = raw.decode()
        except UnicodeDecodeError:
            return None
        # printable: the pattern refuses C0 controls raw, as JSON does; this also
        # leaves NUL-free but unprintable keys (DEL, C1, U+2028) to the general path
        if not key.isprintable() or not 0 < len(key) <= MAX_KEY_CHARS:
            return None
        return req_id, _KEY_READ_METHODS[name], key

    def whole_mutation(
        self, data: bytearray | memoryview, nbytes: int
    ) -> tuple[int, Remove | CommitSlot] | None:
        """``(id, request)`` of a read that is exactly one whole ``Remove`` or
        single put's ``CommitSlot`` request in the shape this package's clients
        write (``_REMOVE_BODY``, ``_COMMIT_SLOT_BODY``): the request
        ``decode_request`` would make of that frame, found without the JSON
        decoder (every ``remove`` and single ``put``: ~2.3 us warm through it,
        ~1 here).  None for anything else, which then takes
        :meth:`whole_request` or :meth:`feed`; never raises.
        """
        if self._buf or nbytes < PREFIX.size + 8:
            return None
        shape = _WHOLE_MUTATIONS.get(data[PREFIX.size + 2])  # (other requests: no match)
        if shape is None:
            return None
        length, kind, req_id = PREFIX.unpack_from(data, 0)
        if length + 4 != nbytes or kind != REQUEST or length > self._max:
            return None
        pattern, make = shape
        match = pattern.fullmatch(data, PREFIX.size, nbytes)
        if match is None:
            return None
        request = make(match.groups())
        return None if request is None else (req_id, request)

    def _request(
        self, parts: tuple[int, int, Any, Any, str] | None
    ) -> tuple[int, MasterMethod, Any, bool] | None:
        if parts is None:
            return None
        kind, req_id, head, value, text = parts
        if kind != REQUEST:
            if kind == REPLY:
                raise MalformedMessage("a client sent a reply frame")
            raise self.unknown_kind(kind)
        method = _METHODS.get(head) if type(head) is str else None
        if method is None:
            raise MalformedMessage(f"unknown master RPC method {str(head)[:100]!r}")
        return req_id, method, value, "\\u" in text and _has_surrogate_escape(text)

    def whole_reply(self, data: bytes) -> MasterReply | None:
        """The reply of a client's read that is exactly one whole reply frame
        (``JsonFrameDecoder.whole_parts``); None for anything else (feed it).

        A get's reply naming one replica, as the master writes it, is read
        without the JSON decoder and its value is then the typed
        ``GetReplicaListReply`` (which ``GetReplicaListReply.decode`` passes on):
        ~1.4 us against ~2.7 through the decoder and the typed decode.

        Raises:
            MalformedMessage: the body is not a strict-JSON ``[code, value]`` pair.
        """
        n = len(data)
        if not self._buf:
            if 17 <= n <= 18:  # (is_exist's and remove's answers, found whole)
                value = _SHORT_REPLIES.get(data[PREFIX.size :], _NOT_SHORT)
                if value is not _NOT_SHORT:
                    length, kind, req_id = PREFIX.unpack_from(data, 0)
                    if length + 4 == n and kind == REPLY and length <= self._max:
                        return MasterReply(req_id, 0, value)
            elif data.startswith(_GET_REPLY_HEAD, PREFIX.size):  # (a get's answer)
                length, kind, req_id = PREFIX.unpack_from(data, 0)
                if length + 4 == n and kind == REPLY and length <= self._max:
                    match = _GET_REPLY_BODY.fullmatch(data, PREFIX.size)
                    got = None if match is None else _get_reply_of(match.groups())
                    if got is not None:
                        return MasterReply(req_id, 0, got)
        parts = self.whole_parts(data, n, REPLY)
        return None if parts is None else _reply(parts[1], parts[2], parts[3])

    def next_frame(self) -> MasterRequest | MasterReply | NeedData:
        parts = self.next_parts()
        if parts is None:
            return NEED_DATA
        kind, req_id, head, value, text = parts
        if kind == REQUEST:
            method = _METHODS.get(head) if type(head) is str else None
            if method is None:
                raise MalformedMessage(f"unknown master RPC method {str(head)[:100]!r}")
            return MasterRequest(req_id, method, value, _has_surrogate_escape(text))
        if kind == REPLY:
            return _reply(req_id, head, value)
        raise self.unknown_kind(kind)


#: the bodies of the commonest replies, by the value they carry: ``ExistKey``'s
#: answers and the ``null`` of every request that succeeds without a value (every
#: remove and single put); :func:`encode_short_reply` sends them, ``whole_reply``
#: reads them by their bytes.  (Keyed by value: look up only ``None`` and bools,
#: since ``1 == True``.)
_SHORT_BODIES: Final[dict[bool | None, bytes]] = {
    value: encode_json([0, value]).encode() for value in (None, True, False)
}
_SHORT_REPLIES: Final[dict[bytes, Any]] = {body: value for value, body in _SHORT_BODIES.items()}
_NOT_SHORT: Final = object()


def encode_short_reply(req_id: int, value: bool | None) -> bytes:
    """The reply frame of a request that succeeded with ``value`` (None, True or
    False): :func:`encode_reply` of ``(req_id, 0, value)``, its body made once."""
    body = _SHORT_BODIES[value]
    return PREFIX.pack(len(body) + 5, REPLY, req_id) + body


def _reply(req_id: int, head: Any, value: Any) -> MasterReply:
    if type(head) is not int:
        raise MalformedMessage(f"reply {req_id} carries a non-integer code {head!r}")
    return MasterReply(req_id, head, value)
