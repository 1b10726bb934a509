"""The store master's frames and messages (``wire/_master.py``, ``wire/_master_msgs.py``).

Exact bytes of request and reply frames, the decoder fed one byte at a time and
with trailing data, one test per rule of :func:`decode_request` (the message
names the field), and hypothesis properties: any input gives a frame, "need
more data", :class:`MalformedMessage` or :class:`InvalidParams` -- nothing
else; the length is checked before a frame is buffered; and every valid typed
request survives encode -> decode unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pymooncake.errors import InvalidParams, MalformedMessage
from pymooncake.wire import (
    NEED_DATA,
    MasterFrameDecoder,
    MasterReply,
    MasterRequest,
    encode_reply,
    encode_reply_json,
    encode_request,
)
from pymooncake.wire import _master_msgs as msg
from pymooncake.wire._frames import REQUEST, json_frame
from pymooncake.wire._master import encode_request_generally, encode_short_reply
from pymooncake.wire._master_msgs import (
    MAX_BATCH_KEYS,
    MAX_KEY_CHARS,
    MAX_NAME_CHARS,
    MAX_REGEX_CHARS,
    MAX_REPLICAS,
    MAX_SEGMENTS,
    MAX_SLOTS,
    MasterMethod,
    decode_request,
    slot_name,
)
from pymooncake.wire._master_reply_msgs import GetReplicaListReply

PREFIX = struct.Struct("<IBI")


def _prefix(length: int, kind: int, req_id: int) -> bytes:
    return PREFIX.pack(length, kind, req_id)


# ---------------------------------------------------------------------------------
# exact bytes
# ---------------------------------------------------------------------------------

EXIST_KEY_FRAME = bytes.fromhex("1d0000000007000000") + b'["ExistKey",{"key":"k"}]'
REMOVE_FRAME = (
    bytes.fromhex("490000000002010000")
    + b'["Remove",{"client_id":"c","key":"a","force":false,"rid":5,"ack":3}]'
)
PUT_START_FRAME = (
    bytes.fromhex("3c0000000001000000") + b'["PutStart",{"client_id":"c1","key":"key","size":4096}]'
)
OK_REPLY_FRAME = bytes.fromhex("0d0000000107000000") + b"[0,true]"
ERROR_REPLY_FRAME = bytes.fromhex("220000000109000000") + b"[-704,\"object 'k' not found\"]"


def test_request_frames_exact_bytes() -> None:
    assert encode_request(7, msg.ExistKey("k")) == EXIST_KEY_FRAME
    assert encode_request(1, msg.PutStart("c1", "key", 4096)) == PUT_START_FRAME
    # a mutation with a request id: rid/ack ride in the parameters
    assert encode_request(258, msg.Remove("a", client_id="c"), rid=5, ack=3) == REMOVE_FRAME


def test_reply_frames_exact_bytes() -> None:
    assert encode_reply(7, 0, True) == OK_REPLY_FRAME
    assert encode_reply(9, -704, "object 'k' not found") == ERROR_REPLY_FRAME
    # non-ASCII travels as UTF-8, not \\u escapes
    assert encode_reply(3, 0, {"n": "\u00e9"}).endswith(b'[0,{"n":"\xc3\xa9"}]')
    # a value already encoded as JSON gives the same frame
    assert encode_reply_json(7, 0, "true") == OK_REPLY_FRAME


def test_decoding_the_exact_frames() -> None:
    d = MasterFrameDecoder()
    d.feed(EXIST_KEY_FRAME + REMOVE_FRAME + OK_REPLY_FRAME + ERROR_REPLY_FRAME)
    assert d.next_frame() == MasterRequest(7, MasterMethod.EXIST_KEY, {"key": "k"}, False)
    req = d.next_frame()
    assert isinstance(req, MasterRequest) and req.id == 258
    assert decode_request(req.method, req.params) == msg.Remove("a", False, "c", 5, 3)
    assert d.next_frame() == MasterReply(7, 0, True)
    assert d.next_frame() == MasterReply(9, -704, "object 'k' not found")
    assert d.next_frame() is NEED_DATA
    assert d.buffered == 0


@pytest.mark.parametrize("frame", [EXIST_KEY_FRAME, REMOVE_FRAME, OK_REPLY_FRAME])
def test_one_byte_at_a_time(frame: bytes) -> None:
    d = MasterFrameDecoder()
    for i, byte in enumerate(frame):
        assert d.next_frame() is NEED_DATA
        assert d.buffered == i
        d.feed(bytes([byte]))
        if i < 9:
            assert d.pending_length == (0 if i < 8 else len(frame))
    out = d.next_frame()
    assert isinstance(out, (MasterRequest, MasterReply))
    assert out.id in (7, 258)
    assert d.next_frame() is NEED_DATA


def test_trailing_data_stays_buffered() -> None:
    d = MasterFrameDecoder()
    d.feed(EXIST_KEY_FRAME + PUT_START_FRAME[:20])
    assert isinstance(d.next_frame(), MasterRequest)
    assert d.next_frame() is NEED_DATA
    assert d.buffered == 20 and d.trailing == PUT_START_FRAME[:20]
    d.feed(PUT_START_FRAME[20:] + b"\x05")
    frame = d.next_frame()
    assert isinstance(frame, MasterRequest) and frame.method is MasterMethod.PUT_START
    assert d.trailing == b"\x05"


def test_feeding_a_memoryview_copies_it() -> None:
    buf = bytearray(EXIST_KEY_FRAME)
    d = MasterFrameDecoder()
    d.feed(memoryview(buf)[:10])
    buf[:10] = b"\xff" * 10  # the caller reuses its buffer
    d.feed(memoryview(EXIST_KEY_FRAME)[10:])
    assert d.next_frame() == MasterRequest(7, MasterMethod.EXIST_KEY, {"key": "k"}, False)


def test_surrogate_escapes_are_flagged() -> None:
    d = MasterFrameDecoder()
    raw = json.dumps(["ExistKey", {"key": "a\ud800"}]).encode()
    d.feed(_prefix(len(raw) + 5, 0, 1) + raw)
    frame = d.next_frame()
    assert isinstance(frame, MasterRequest) and frame.escapes
    with pytest.raises(InvalidParams, match="lone surrogate"):
        decode_request(frame.method, frame.params, escapes=frame.escapes)


def test_next_request_gives_what_the_master_serves() -> None:
    """The master's own read of a request: the same parts as ``next_frame``, no
    frame object; a reply frame from a client is refused."""
    d = MasterFrameDecoder()
    raw = json.dumps(["ExistKey", {"key": "a\ud800"}]).encode()
    d.feed(EXIST_KEY_FRAME + _prefix(len(raw) + 5, 0, 2) + raw + REMOVE_FRAME[:30])
    assert d.next_request() == (7, MasterMethod.EXIST_KEY, {"key": "k"}, False)
    assert d.next_request() == (2, MasterMethod.EXIST_KEY, {"key": "a\ud800"}, True)
    assert d.next_request() is None and d.buffered == 30
    d.feed(REMOVE_FRAME[30:] + OK_REPLY_FRAME)
    parts = d.next_request()
    assert parts is not None and parts[0] == 258 and parts[1] is MasterMethod.REMOVE
    assert not parts[3]
    assert decode_request(parts[1], parts[2]) == msg.Remove("a", False, "c", 5, 3)
    with pytest.raises(MalformedMessage, match="a client sent a reply frame"):
        d.next_request()
    with pytest.raises(MalformedMessage, match="unknown kind 2"):
        _next_request(_frame(b"[1,2]", kind=2))
    with pytest.raises(MalformedMessage, match="unknown master RPC method"):
        _next_request(_frame(b'["NoSuchMethod",{}]'))


def test_whole_request_reads_one_frame_where_it_lies() -> None:
    """The master's read of a client waiting for each answer: one whole request
    frame in the read buffer, decoded there; anything else is left to the
    buffered path (None), which also explains a bad frame."""
    d = MasterFrameDecoder()
    window = bytearray(64) + b"\xee" * 16  # a read buffer larger than the read
    window[: len(EXIST_KEY_FRAME)] = EXIST_KEY_FRAME
    view = memoryview(window)
    assert d.whole_request(view, len(EXIST_KEY_FRAME)) == (
        7,
        MasterMethod.EXIST_KEY,
        {"key": "k"},
        False,
    )
    assert d.buffered == 0
    raw = json.dumps(["ExistKey", {"key": "a\ud800"}]).encode()
    escaped = _frame(raw, req_id=2)
    assert d.whole_request(escaped, len(escaped)) == (
        2,
        MasterMethod.EXIST_KEY,
        {"key": "a\ud800"},
        True,
    )
    two = EXIST_KEY_FRAME + REMOVE_FRAME
    for data, nbytes in [
        (two, len(two)),  # two frames: pipelined
        (EXIST_KEY_FRAME, len(EXIST_KEY_FRAME) - 1),  # part of one
        (EXIST_KEY_FRAME[:8], 8),  # part of a prefix
        (OK_REPLY_FRAME, len(OK_REPLY_FRAME)),  # a reply from a client
        (_frame(b"[1,2]", kind=2), 10),  # an unknown kind
    ]:
        assert d.whole_request(data, nbytes) is None, data
    assert MasterFrameDecoder(16).whole_request(REMOVE_FRAME, len(REMOVE_FRAME)) is None
    d.feed(EXIST_KEY_FRAME[:3])  # something buffered: the next bytes continue it
    assert d.whole_request(REMOVE_FRAME, len(REMOVE_FRAME)) is None
    for body, match in [
        (b"[0,true", "invalid body"),
        (b"\xff\xfe", "invalid body"),
        (b'{"a":1}', r"not a \[head, body\] pair"),
        (b'["NoSuchMethod",{}]', "unknown master RPC method"),
    ]:
        with pytest.raises(MalformedMessage, match=match):
            MasterFrameDecoder().whole_request(_frame(body), len(body) + 9)


def _key_read_frame(method: str, key: str, req_id: int = 3) -> bytes:
    return encode_request(
        req_id, msg.ExistKey(key) if method == "ExistKey" else msg.GetReplicaList(key)
    )


def _general(data: bytes) -> tuple[int, MasterMethod, str] | None:
    """What the general path makes of one whole request frame: ``(id, method,
    key)`` of a valid ExistKey / GetReplicaList, None for anything else."""
    try:
        frame = MasterFrameDecoder().whole_request(data, len(data))
    except MalformedMessage:
        return None
    if frame is None or frame[1] not in (MasterMethod.EXIST_KEY, MasterMethod.GET_REPLICA_LIST):
        return None
    try:
        req = msg.decode_request(frame[1], frame[2], escapes=frame[3])
    except InvalidParams:
        return None
    assert isinstance(req, (msg.ExistKey, msg.GetReplicaList))
    return frame[0], frame[1], req.key


@pytest.mark.parametrize("method", ["ExistKey", "GetReplicaList"])
@pytest.mark.parametrize(
    "key",
    [
        "k",
        "kv-cache/layer.3/blk-00017",
        "ключ-€-鍵-🔑",
        "a" * MAX_KEY_CHARS,
        "🔑" * MAX_KEY_CHARS,
        " spaced key ",
    ],
    ids=["one-char", "path", "unicode", "longest", "longest-in-bytes", "spaces"],
)
def test_whole_key_read_finds_what_clients_send_for_get_and_is_exist(method: str, key: str) -> None:
    """``get`` and ``is_exist`` frames as this package's clients encode them are
    read without the JSON decoder, into exactly what the general path makes of
    them, from a read buffer larger than the read."""
    data = _key_read_frame(method, key)
    window = bytearray(len(data) + 32)
    window[: len(data)] = data
    got = MasterFrameDecoder().whole_key_read(memoryview(window), len(data))
    assert got == (3, MasterMethod(method), key)
    assert got == _general(data)


def test_whole_key_read_leaves_every_other_frame_to_the_general_path() -> None:
    """Anything but one whole ``[method, {"key": plain key}]`` request is None:
    other methods and members, escapes, characters JSON or the key rules refuse,
    bytes that are not UTF-8, part of a frame or more than one, a reply, a frame
    over the limit, and a read that continues buffered bytes."""
    d = MasterFrameDecoder()
    bodies = [
        b'["ExistKey",{"key":"a","x":"b"}]',  # another member after the key
        b'["ExistKey",{"x":"b","key":"a"}]',  # ... or before it
        b'["ExistKey", {"key": "a"}]',  # whitespace
        b'["ExistKey",{"key":"a\\u0041"}]',  # an escape
        b'["ExistKey",{"key":"a\\"b"}]',  # an escaped quote
        b'["ExistKey",{"key":"a\tb"}]',  # a raw control character: invalid JSON
        b'["ExistKey",{"key":"a\x00b"}]',  # NUL
        b'["ExistKey",{"key":"a\x7fb"}]',  # DEL: valid, but left to the general path
        b'["ExistKey",{"key":"a\xe2\x80\xa8b"}]',  # U+2028 (not printable)
        b'["ExistKey",{"key":"\xff\xfe"}]',  # not UTF-8
        b'["ExistKey",{"key":"\xed\xa0\x80"}]',  # an encoded surrogate: not UTF-8
        b'["ExistKey",{"key":""}]',  # empty
        b'["ExistKey",{"key":"' + b"a" * (MAX_KEY_CHARS + 1) + b'"}]',  # too long
        b'["ExistKey",{"key":3}]',  # not a string
        b'["ExistKey",{"key":"}]',  # truncated JSON
        b'["ExistKeys",{"key":"a"}]',  # another name
        b'["GetReplicaListByRegex",{"key":"a"}]',
        b'["GetReplicaList",{"keys":"a"}]',
        b'["Remove",{"key":"a"}]',
        b'["ExistKey",{"key":"a"}]]',  # trailing bytes
        b"[]",
    ]
    for body in bodies:
        data = _frame(body)
        assert d.whole_key_read(data, len(data)) is None, body
    good = _key_read_frame("ExistKey", "k")
    for data, nbytes in [
        (good + good, 2 * len(good)),  # two frames: pipelined
        (good, len(good) - 1),  # part of one
        (good[:8], 8),  # part of a prefix
        (_frame(b'["ExistKey",{"key":"k"}]', kind=1), 29),  # a reply frame
        (_frame(b'["ExistKey",{"key":"k"}]', kind=2), 29),  # an unknown kind
    ]:
        assert d.whole_key_read(data, nbytes) is None, data
    assert MasterFrameDecoder(16).whole_key_read(good, len(good)) is None  # over the limit
    d.feed(good[:3])  # something buffered: the next bytes continue it
    assert d.whole_key_read(good, len(good)) is None


_NASTY = st.text(
    st.sampled_from(
        ['"', "\\", "\x00", "\x1f", "\x7f", "\u2028", "\ud800", "a", "é", "🔑", " ", "}", "]"]
    ),
    max_size=12,
)


@given(method=st.sampled_from(["ExistKey", "GetReplicaList"]), key=_NASTY, raw=st.booleans())
def test_whole_key_read_never_disagrees_with_the_general_path(
    method: str, key: str, raw: bool
) -> None:
    """For any key, encoded as a client does or spliced raw into the frame (bytes
    no client sends), the key read either declines or gives exactly what the
    general path makes of the same frame -- never a request it would refuse."""
    if raw:
        head = f'["{method}",{{"key":"'.encode()
        data = _frame(head + key.encode("utf-8", "surrogatepass") + b'"}]')
    else:
        try:
            data = _key_read_frame(method, key)
        except UnicodeEncodeError:  # a lone surrogate: the client refuses it first
            return
    got = MasterFrameDecoder().whole_key_read(data, len(data))
    if got is not None:
        assert got == _general(data)


@given(method=st.sampled_from(["ExistKey", "GetReplicaList"]), key=_NASTY)
def test_key_reads_are_encoded_as_every_request(method: str, key: str) -> None:
    """``encode_request`` makes a get's / is_exist's text directly: the same bytes
    as the general encoder, for any key (a lone surrogate is refused alike)."""
    request = msg.ExistKey(key) if method == "ExistKey" else msg.GetReplicaList(key)
    try:
        general = json_frame(REQUEST, 9, method, {"key": key})
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            encode_request(9, request)
        return
    assert encode_request(9, request) == general


_IDS = st.one_of(st.just(0), st.integers(min_value=1, max_value=2**63 - 1))


def _same_as_general(request: msg.Request, rid: int, ack: int) -> None:
    try:
        general = encode_request_generally(11, request, rid=rid, ack=ack)
    except UnicodeEncodeError:  # a lone surrogate: refused alike
        with pytest.raises(UnicodeEncodeError):
            encode_request(11, request, rid=rid, ack=ack)
        return
    assert encode_request(11, request, rid=rid, ack=ack) == general
    # and the master reads back the request that was meant
    frame = MasterFrameDecoder()
    frame.feed(general)
    got = frame.next_request()
    assert got is not None and got[0] == 11


@given(
    key=_NASTY,
    client=_NASTY,
    force=st.booleans(),
    rid=_IDS,
    ack=_IDS,
    own_rid=_IDS,
)
def test_removes_are_encoded_as_every_request(
    key: str, client: str, force: bool, rid: int, ack: int, own_rid: int
) -> None:
    """``encode_request`` makes a remove's text directly (ids passed to it or
    none; a request carrying its own id takes the general path): the general
    encoder's bytes for any key and client id."""
    _same_as_general(msg.Remove(key, force, client, rid=own_rid, ack=own_rid), rid, ack)


@given(
    key=_NASTY,
    slot=_NASTY,
    client=_NASTY,
    rid=_IDS,
    ack=_IDS,
    own_rid=_IDS,
    confirmed=st.lists(_NASTY, max_size=2),
)
def test_slot_commits_are_encoded_as_every_request(
    key: str, slot: str, client: str, rid: int, ack: int, own_rid: int, confirmed: list[str]
) -> None:
    """The same for a single put's ``CommitSlot`` (standbys' confirmations and a
    request's own id: the general path)."""
    request = msg.CommitSlot(
        client, slot, key, rid=own_rid, ack=own_rid, confirmed=tuple(confirmed)
    )
    _same_as_general(request, rid, ack)


# ---------------------------------------------------------------------------------
# a remove and a single put's commit, read without the JSON decoder
# ---------------------------------------------------------------------------------


def _general_request(data: bytes) -> tuple[int, msg.Request] | None:
    """What the general path makes of one whole request frame: ``(id, request)``,
    None where it refuses the frame or its parameters."""
    try:
        frame = MasterFrameDecoder().whole_request(data, len(data))
    except MalformedMessage:
        return None
    if frame is None:
        return None
    try:
        return frame[0], decode_request(frame[1], frame[2], escapes=frame[3])
    except InvalidParams:
        return None


_CLIENT = "3f2b0a4e-6c1d-4a8e-9b7f-0d2c5e8a1b34"
_SLOT = slot_name(_CLIENT, "b17x0", 42)


@pytest.mark.parametrize(
    "request_",
    [
        msg.Remove("k", False, _CLIENT),
        msg.Remove("kv-cache/layer.3/blk-00017", True, _CLIENT),
        msg.Remove("ключ-€-鍵-🔑 key", False, ""),  # (no client id: a removal may omit it)
        msg.Remove("🔑" * MAX_KEY_CHARS, True, "c" * MAX_NAME_CHARS),
        msg.CommitSlot(_CLIENT, _SLOT, "k"),
        msg.CommitSlot(_CLIENT, "plain-slot-name", "ключ-€-鍵-🔑"),
        msg.CommitSlot("c" * MAX_NAME_CHARS, _SLOT, "a" * MAX_KEY_CHARS),
    ],
    ids=[
        "remove",
        "remove-forced",
        "remove-unicode",
        "remove-longest",
        "commit",
        "commit-plain-slot",
        "commit-longest",
    ],
)
@pytest.mark.parametrize("ids", [(0, 0), (5, 3), (2**64 - 1, 2**64 - 1)])
def test_whole_mutation_reads_removes_and_commits_as_clients_send_them(
    request_: msg.Remove | msg.CommitSlot, ids: tuple[int, int]
) -> None:
    """A remove and a single put's commit as this package's clients encode them
    (reply-cache ids or none) are read without the JSON decoder, into exactly
    the request the general path makes of the frame, from a larger read buffer."""
    data = encode_request(3, request_, rid=ids[0], ack=ids[1])
    window = bytearray(len(data) + 32)
    window[: len(data)] = data
    got = MasterFrameDecoder().whole_mutation(memoryview(window), len(data))
    assert got is not None
    assert got == _general_request(data)
    assert got[1] == dataclasses.replace(request_, rid=ids[0], ack=ids[1])


def test_whole_mutation_leaves_every_other_frame_to_the_general_path() -> None:
    """Anything but one whole remove or commit in the clients' own spelling is
    None: other members, order or spacing, escapes (but a buffer name's leading
    U+0001 as the encoder writes it), values the request's checks refuse, ids
    that are not plain unsigned 64-bit integers, bytes that are not UTF-8, part
    of a frame or more than one, a reply, a frame over the limit, and a read
    that continues buffered bytes."""
    d = MasterFrameDecoder()
    rm = b'["Remove",{"client_id":"c","key":'
    cs = b'["CommitSlot",{"client_id":"c","slot":'
    bodies = [
        rm + b'"k","force":false,"rid":1}]',  # an id without its ack
        rm + b'"k","force":false,"ack":1,"rid":1}]',  # the ids in another order
        rm + b'"k","force":false,"rid":01,"ack":1}]',  # a leading zero: invalid JSON
        rm + b'"k","force":false,"rid":-1,"ack":1}]',  # a sign
        rm + b'"k","force":false,"rid":1.0,"ack":1}]',  # not an integer
        rm + b'"k","force":false,"rid":1e3,"ack":1}]',
        rm + b'"k","force":false,"rid":18446744073709551616,"ack":1}]',  # 2**64
        rm + b'"k","force":0}]',  # not a boolean
        rm + b'"k","force":null}]',
        rm + b'"k"}]',  # force left to its default
        rm + b'"k","force":false,"x":1}]',  # another member
        b'["Remove",{"key":"k","client_id":"c","force":false}]',  # another order
        b'["Remove", {"client_id":"c","key":"k","force":false}]',  # whitespace
        rm + b'"a\\u0041","force":false}]',  # an escape in the key
        rm + b'"a\\"b","force":false}]',
        rm + b'"a\tb","force":false}]',  # a raw control character: invalid JSON
        rm + b'"a\x00b","force":false}]',
        rm + b'"\xff\xfe","force":false}]',  # not UTF-8
        rm + b'"\xed\xa0\x80","force":false}]',  # an encoded surrogate
        rm + b'"","force":false}]',  # empty key
        rm + b'"' + b"a" * (MAX_KEY_CHARS + 1) + b'","force":false}]',  # too long
        b'["Remove",{"client_id":"' + b"c" * (MAX_NAME_CHARS + 1) + b'","key":"k","force":true}]',
        rm + b'"k","force":false}]]',  # trailing bytes
        b'["RemoveAll",{"client_id":"c","key":"k","force":false}]',  # another method
        b'["RemoveByRegex",{"client_id":"c","key":"k","force":false}]',
        cs + b'"s","key":"k","confirmed":["x"]}]',  # a standby's confirmation
        cs + b'"\\u0001\\u0001s","key":"k"}]',  # a second escape
        cs + b'"\\u0002s","key":"k"}]',  # another escape
        cs + b'"\\u0001","key":""}]',  # an empty key
        cs + b'"","key":"k"}]',  # an empty buffer name
        b'["CommitSlot",{"client_id":"","slot":"s","key":"k"}]',  # a commit needs its client
        cs + b'"s","key":"k","rid":1,"ack":1,"rid":2,"ack":2}]',
        b'["CommitSlots",{"client_id":"c","slot":"s","key":"k"}]',
        b"[]",
    ]
    for body in bodies:
        data = _frame(body)
        assert d.whole_mutation(data, len(data)) is None, body
    good = encode_request(4, msg.Remove("k", False, "c"), rid=2, ack=1)
    for data, nbytes in [
        (good + good, 2 * len(good)),  # two frames: pipelined
        (good, len(good) - 1),  # part of one
        (good[:8], 8),  # part of a prefix
        (good[:4] + b"\x01" + good[5:], len(good)),  # a reply frame
        (good[:4] + b"\x02" + good[5:], len(good)),  # an unknown kind
    ]:
        assert d.whole_mutation(data, nbytes) is None, data
    assert MasterFrameDecoder(16).whole_mutation(good, len(good)) is None  # over the limit
    d.feed(good[:3])  # something buffered: the next bytes continue it
    assert d.whole_mutation(good, len(good)) is None
    # a buffer name that is U+0001 alone is a name like any other
    data = _frame(cs + b'"\\u0001","key":"k"}]')
    assert d.whole_mutation(data, len(data)) is None  # (still buffered above)
    assert MasterFrameDecoder().whole_mutation(data, len(data)) == _general_request(data)


_BIG_IDS = st.one_of(_IDS, st.integers(min_value=2**64 - 2, max_value=2**64 + 2))


@given(
    which=st.sampled_from(["Remove", "CommitSlot"]),
    key=_NASTY,
    client=_NASTY,
    slot=st.one_of(_NASTY, _NASTY.map(lambda s: "\x01" + s)),
    force=st.booleans(),
    rid=_BIG_IDS,
    ack=_BIG_IDS,
    raw=st.booleans(),
)
def test_whole_mutation_never_disagrees_with_the_general_path(
    which: str, key: str, client: str, slot: str, force: bool, rid: int, ack: int, raw: bool
) -> None:
    """For any strings and ids, encoded as a client does or spliced raw into the
    frame (bytes no client sends), the read either declines or gives exactly the
    request the general path makes of the same frame -- never one it refuses."""
    if raw:

        def q(text: str) -> bytes:
            return b'"' + text.encode("utf-8", "surrogatepass") + b'"'

        tail = b',"rid":%d,"ack":%d' % (rid, ack) if rid else b""
        if which == "Remove":
            flag = b"true" if force else b"false"
            body = b'["Remove",{"client_id":%s,"key":%s,"force":%s%s}]' % (
                q(client),
                q(key),
                flag,
                tail,
            )
        else:
            body = b'["CommitSlot",{"client_id":%s,"slot":%s,"key":%s%s}]' % (
                q(client),
                q(slot),
                q(key),
                tail,
            )
        data = _frame(body)
    else:
        request: msg.Request = (
            msg.Remove(key, force, client)
            if which == "Remove"
            else msg.CommitSlot(client, slot, key)
        )
        try:
            data = encode_request(1, request, rid=rid, ack=ack)
        except UnicodeEncodeError:  # a lone surrogate: the client refuses it first
            return
    got = MasterFrameDecoder().whole_mutation(data, len(data))
    if got is not None:
        assert got == _general_request(data)
        assert got[0] == 1


def test_a_direct_text_declines_what_it_does_not_spell() -> None:
    """Values of another type than the fields' (no caller sends them) are left
    to the general encoder, which spells them as JSON does."""
    odd = [
        msg.Remove("k", 1, "c"),  # type: ignore[arg-type]
        msg.Remove(b"k", True, "c"),  # type: ignore[arg-type]
        msg.CommitSlot("c", None, "k"),  # type: ignore[arg-type]
        msg.ExistKey(7),  # type: ignore[arg-type]
    ]
    for request in odd:
        try:
            general = encode_request_generally(3, request, rid=2, ack=1)
        except TypeError:  # bytes: JSON has no spelling for them either
            with pytest.raises(TypeError):
                encode_request(3, request, rid=2, ack=1)
            continue
        assert encode_request(3, request, rid=2, ack=1) == general
    assert encode_request(3, msg.Remove("k", True, "c"), rid=True, ack=1) == (
        encode_request_generally(3, msg.Remove("k", True, "c"), rid=True, ack=1)
    )


@pytest.mark.parametrize("body", [b"[0,true]", b"[0,false]", b"[0,null]"])
def test_short_replies_are_read_as_the_decoder_reads_them(body: bytes) -> None:
    """is_exist's and remove's answers, found by their bytes: the same reply the
    general path makes; the same bytes in a frame that is not exactly one whole
    reply are left to it."""
    data = _frame(body, kind=1, req_id=4)
    general = MasterFrameDecoder()
    general.feed(data)
    assert MasterFrameDecoder().whole_reply(data) == general.next_frame()
    assert MasterFrameDecoder().whole_reply(data) == MasterReply(4, 0, json.loads(body)[1])
    assert MasterFrameDecoder().whole_reply(_frame(body, kind=0)) is None  # a request
    wrong_length = _prefix(len(body) + 6, 1, 4) + body
    assert MasterFrameDecoder().whole_reply(wrong_length) is None
    buffered = MasterFrameDecoder()
    buffered.feed(data[:3])
    assert buffered.whole_reply(data) is None


@pytest.mark.parametrize("value", [None, True, False])
def test_short_replies_are_sent_as_every_reply(value: bool | None) -> None:
    """``encode_short_reply`` (a remove's, a put's commit, an is_exist's answer):
    the bytes of the general encoder, which the client reads back by its table."""
    data = encode_short_reply(2**32 - 1, value)
    assert data == encode_reply(2**32 - 1, 0, value)
    assert MasterFrameDecoder().whole_reply(data) == MasterReply(2**32 - 1, 0, value)


def test_whole_reply_reads_the_answer_a_client_waits_for() -> None:
    """A client's read that holds exactly one whole reply frame is decoded without
    the buffer; anything else is left to the buffered path (None)."""
    d = MasterFrameDecoder()
    assert d.whole_reply(OK_REPLY_FRAME) == MasterReply(7, 0, True)
    assert d.buffered == 0
    for data in [
        OK_REPLY_FRAME + OK_REPLY_FRAME,  # two answers (a pipelined batch)
        OK_REPLY_FRAME[:-1],  # part of one
        OK_REPLY_FRAME[:5],  # part of a prefix
        EXIST_KEY_FRAME,  # a request
        _frame(b"[1,2]", kind=2),  # an unknown kind
    ]:
        assert d.whole_reply(data) is None, data
    assert MasterFrameDecoder(6).whole_reply(OK_REPLY_FRAME) is None  # too long
    d.feed(OK_REPLY_FRAME[:3])  # something buffered: the next bytes continue it
    assert d.whole_reply(OK_REPLY_FRAME) is None
    for body, match in [
        (b"[0,true", "invalid body"),
        (b"[0,NaN]", "invalid body"),
        (b'["x",1]', "non-integer code"),
        (b"[0]", r"not a \[head, body\] pair"),
    ]:
        with pytest.raises(MalformedMessage, match=match):
            MasterFrameDecoder().whole_reply(_frame(body, kind=1))


def _as_get_reply(read: Callable[[], object]) -> object:
    """What a client's typed decode makes of the reply ``read()`` gives: the
    reply with its value a ``GetReplicaListReply``, a refusal as it came, None
    (not read), or the name of the error raised."""
    try:
        frame = read()
        if frame is None:
            return None
        assert isinstance(frame, MasterReply)
        if frame.code != 0:
            return frame
        return MasterReply(frame.id, 0, GetReplicaListReply.decode(frame.value))
    except MalformedMessage as exc:  # (InvalidReply is one)
        return type(exc).__name__


def _typed_get(data: bytes) -> object:
    """:func:`_as_get_reply` of the general path: the buffered decoder."""
    d = MasterFrameDecoder()
    d.feed(data)
    return _as_get_reply(d.next_frame)


def test_a_get_reply_is_read_typed() -> None:
    """A get's reply naming one replica, as the master writes it, is read
    without the JSON decoder into the typed reply, which the typed decode passes
    on; other replies and shapes take the general path."""
    reply = GetReplicaListReply(((1 << 40, "127.0.0.1:15432", 7, 4096, 0, "tcp"),), 5000, 4096)
    data = encode_reply_json(9, 0, reply.to_json())
    got = MasterFrameDecoder().whole_reply(data)
    assert got == MasterReply(9, 0, reply) and type(got.value) is GetReplicaListReply
    assert GetReplicaListReply.decode(got.value) is got.value
    assert got == _typed_get(data)
    two = GetReplicaListReply(reply.replicas * 2, 5000, 4096)
    for other in [
        encode_reply_json(9, 0, two.to_json()),  # two replicas: the general path
        encode_reply_json(9, 0, reply.to_json().replace(":4096}", ":" + "9" * 21 + "}")),
        encode_reply_json(9, 0, reply.to_json().replace("tcp", "t\\u0063p")),  # an escape
        encode_reply_json(9, 0, reply.to_json() + " "),
        encode_reply_json(9, -704, '"object not found"'),
    ]:
        got = MasterFrameDecoder().whole_reply(other)
        assert got is None or type(got.value) is not GetReplicaListReply, other
    # past Python's digit limit: refused as the general path refuses it
    huge = encode_reply_json(9, 0, reply.to_json().replace(":4096}", ":" + "9" * 5000 + "}"))
    assert _as_get_reply(lambda: MasterFrameDecoder().whole_reply(huge)) == "MalformedMessage"
    assert _typed_get(huge) == "MalformedMessage"


_JSON_INTS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, -1, 2**64 - 1])
)


@given(
    ints=st.lists(_JSON_INTS, min_size=5, max_size=5),
    segment=_NASTY,
    transport=_NASTY,
    raw=st.booleans(),
)
def test_a_get_reply_read_typed_never_disagrees_with_the_general_path(
    ints: list[int], segment: str, transport: str, raw: bool
) -> None:
    """For any integers and strings, written as the master does or spliced raw
    (bytes no master sends), the typed read gives the general path's reply or
    declines to it (None: fed to the buffer)."""
    a, b, c, ttl, size = ints
    if raw:

        def q(text: str) -> str:
            return '"' + text + '"'

        text = (
            f'{{"replicas":[[{a},{q(segment)},{b},{c},0,{q(transport)}]],'
            f'"lease_ttl_ms":{ttl},"size":{size}}}'
        )
        body = ("[0," + text + "]").encode("utf-8", "surrogatepass")
        data = _frame(body, kind=1, req_id=4)
    else:
        reply = GetReplicaListReply(((a, segment, b, c, 0, transport),), ttl, size)
        try:
            data = encode_reply_json(4, 0, reply.to_json())
        except UnicodeEncodeError:  # a lone surrogate: never in a master's names
            return
    got = _as_get_reply(lambda: MasterFrameDecoder().whole_reply(data))
    if got is not None:
        assert got == _typed_get(data)


def _outcome(read: Callable[[], object]) -> object:
    try:
        return read()
    except MalformedMessage as exc:
        return ("malformed", str(exc))


@given(st.binary(max_size=120), st.integers(0, 3), st.sampled_from([0, 1]))
def test_a_whole_frame_read_agrees_with_the_buffered_path(body: bytes, pad: int, kind: int) -> None:
    """Whatever one read holds, reading it where it lies gives what feeding it
    gives (the same request or reply, the same refusal), or None (then fed): the
    master's ``whole_request`` (kind 0) and the client's ``whole_reply`` (kind 1)."""
    data = _frame(body, kind=kind, req_id=9) + b"\0" * pad
    fast = MasterFrameDecoder(64)
    buffered = MasterFrameDecoder(64)
    buffered.feed(data)
    if kind == 0:
        got = _outcome(lambda: fast.whole_request(memoryview(data), len(data)))
        want = _outcome(buffered.next_request)
    else:
        got = _outcome(lambda: fast.whole_reply(data))
        want = _outcome(buffered.next_frame)
    if got is None:
        assert pad or len(body) + 5 > 64  # more than one frame, or one too long
    else:
        assert got == want


def _next_request(data: bytes) -> object:
    d = MasterFrameDecoder()
    d.feed(data)
    return d.next_request()


# ---------------------------------------------------------------------------------
# frames the decoder refuses (the connection is closed)
# ---------------------------------------------------------------------------------


def _decode(data: bytes, max_length: int = 1 << 20) -> object:
    d = MasterFrameDecoder(max_length)
    d.feed(data)
    return d.next_frame()


def _frame(body: bytes, kind: int = 0, req_id: int = 1) -> bytes:
    return _prefix(len(body) + 5, kind, req_id) + body


@pytest.mark.parametrize(
    "data, match",
    [
        (_prefix(4, 0, 1), r"length 4 is outside \[5, "),
        (_prefix((1 << 20) + 1, 0, 1), r"length 1048577 is outside"),
        (_prefix(0xFFFFFFFF, 0, 1), r"length 4294967295 is outside"),
        (_frame(b"[1,2]", kind=2), "unknown kind 2"),
        (_frame(b"[0,true"), "invalid body"),
        (_frame(b'["Ping",{"client_id":NaN}]'), "invalid body"),
        (_frame(b'["Ping",{"client_id":Infinity}]'), "invalid body"),
        (_frame(b'["Ping",{"client_id":-Infinity}]'), "invalid body"),
        (_frame(b"\xff\xfe"), "invalid body"),
        (_frame(b"[" * 100_000 + b"]" * 100_000), "too deeply|invalid body"),
        (_frame(b'{"a":1}'), r"not a \[head, body\] pair"),
        (_frame(b'["Ping",{},3]'), r"not a \[head, body\] pair"),
        (_frame(b'["NoSuchMethod",{}]'), "unknown master RPC method"),
        (_frame(b"[7,{}]"), "unknown master RPC method"),
        (_frame(b'["x",1]', kind=1), "non-integer code"),
        (_frame(b"[true,1]", kind=1), "non-integer code"),
    ],
    ids=[
        "length-below-header",
        "length-above-max",
        "length-4GiB",
        "unknown-kind",
        "truncated-json",
        "nan",
        "infinity",
        "minus-infinity",
        "invalid-utf8",
        "deep-nesting",
        "not-a-list",
        "three-items",
        "unknown-method",
        "integer-method",
        "string-code",
        "bool-code",
    ],
)
def test_malformed_frames(data: bytes, match: str) -> None:
    with pytest.raises(MalformedMessage, match=match):
        _decode(data)


def test_the_length_is_checked_before_the_body_is_buffered() -> None:
    d = MasterFrameDecoder(1024)
    d.feed(_prefix(1 << 30, 0, 1))  # only the 9-byte prefix: refused already
    with pytest.raises(MalformedMessage):
        d.next_frame()


# ---------------------------------------------------------------------------------
# decode_request: one test per rule; the message names the field
# ---------------------------------------------------------------------------------

M = MasterMethod
SEG = {"id": "s1", "name": "n:1", "base": 4096, "size": 1 << 20}


def _refused(method: MasterMethod, params: Any, *words: str) -> None:
    with pytest.raises(InvalidParams) as info:
        decode_request(method, params)
    for word in words:
        assert word in info.value.message, info.value.message


def test_rule_params_must_be_an_object() -> None:
    _refused(M.EXIST_KEY, ["k"], "parameters of ExistKey must be an object")


def test_rule_missing_field() -> None:
    _refused(M.EXIST_KEY, {}, "'key' is missing")
    _refused(M.PUT_START, {"client_id": "c", "key": "k"}, "'size' is missing")
    _refused(M.PUT_START, {"key": "k", "size": 1}, "'client_id' is missing")


def test_rule_key_must_be_a_string() -> None:
    _refused(M.EXIST_KEY, {"key": 5}, "key must be a string", "5")
    _refused(M.EXIST_KEY, {"key": None}, "key must be a string")


def test_rule_key_must_not_be_empty() -> None:
    _refused(M.EXIST_KEY, {"key": ""}, "key must not be empty")


def test_rule_key_length() -> None:
    decode_request(M.EXIST_KEY, {"key": "k" * MAX_KEY_CHARS})
    _refused(M.EXIST_KEY, {"key": "k" * (MAX_KEY_CHARS + 1)}, "key", f"{MAX_KEY_CHARS} characters")


def test_rule_key_without_nul() -> None:
    _refused(M.EXIST_KEY, {"key": "a\0b"}, "key must not contain NUL")


def test_rule_strings_encodable_as_utf8() -> None:
    _refused(M.EXIST_KEY, {"key": "a\udc80"}, "parameters of ExistKey", "lone surrogate")
    _refused(M.PING, {"client_id": "\ud800"}, "lone surrogate")
    _refused(M.MOUNT_SEGMENT, {"client_id": "c", "segment": {**SEG, "name": "\udfff"}}, "surrogate")
    _refused(M.PUT_START, {"client_id": "c", "key": "k", "size": 1, "\ud800": 1}, "surrogate")


def test_rule_integers_within_u64() -> None:
    base = {"client_id": "c", "key": "k"}
    for bad in (-1, 1 << 64, 1.0, True, "1", None):
        _refused(M.PUT_START, {**base, "size": bad}, "size must be an integer in [0, 2**64)")
    decode_request(M.PUT_START, {**base, "size": (1 << 64) - 1})


def test_rule_keys_is_a_list_of_strings() -> None:
    _refused(M.BATCH_EXIST_KEY, {"keys": "abc"}, "keys must be a list of strings")
    _refused(M.BATCH_EXIST_KEY, {"keys": ["a", 2]}, "keys must hold only strings", "2")


def test_rule_keys_bounded_in_count() -> None:
    _refused(
        M.BATCH_EXIST_KEY,
        {"keys": ["k"] * (MAX_BATCH_KEYS + 1)},
        "keys",
        f"at most {MAX_BATCH_KEYS} per request",
    )


def test_rule_keys_each_valid() -> None:
    _refused(M.BATCH_EXIST_KEY, {"keys": ["a", ""]}, "keys holds an empty key")
    _refused(M.BATCH_EXIST_KEY, {"keys": ["x" * (MAX_KEY_CHARS + 1)]}, "keys holds a key longer")
    _refused(M.BATCH_EXIST_KEY, {"keys": ["a", "b\0"]}, "keys holds a key with a NUL")


def test_rule_sizes_parallel_to_keys() -> None:
    base = {"client_id": "c", "keys": ["a", "b"]}
    _refused(M.BATCH_PUT_START, {**base, "sizes": [1]}, "sizes must be a list of 2 integers")
    _refused(M.BATCH_PUT_START, {**base, "sizes": [1, -1]}, "sizes must hold integers", "-1")
    _refused(M.BATCH_PUT_START, {**base, "sizes": [1, 2.5]}, "sizes must hold integers")
    _refused(M.BATCH_PUT_START, {**base, "sizes": -1}, "sizes must hold integers", "-1")
    _refused(M.BATCH_PUT_START, {**base, "sizes": 2**64}, "sizes must hold integers")


def test_one_size_for_every_key_travels_as_one_integer() -> None:
    """A batch of equal sizes sends one integer; the master reads it as that size
    for every key, and still reads the list an older client sends."""
    one = msg.BatchPutStart("c", ("a", "b", "c"), (64, 64, 64))
    assert one.params()["sizes"] == 64
    assert decode_request(M.BATCH_PUT_START, one.params()) == one
    mixed = msg.BatchPutStart("c", ("a", "b"), (64, 65))
    assert mixed.params()["sizes"] == [64, 65]
    assert decode_request(M.BATCH_PUT_START, mixed.params()) == mixed
    listed = {**one.params(), "sizes": [64, 64, 64]}
    assert decode_request(M.BATCH_PUT_START, listed) == one
    empty = msg.BatchPutStart("c", (), ())
    assert decode_request(M.BATCH_PUT_START, empty.params()) == empty


def test_rule_booleans() -> None:
    _refused(M.REMOVE, {"key": "k", "force": "yes"}, "force must be true or false")
    _refused(M.REMOVE, {"key": "k", "force": 1}, "force must be true or false")


def test_rule_names_are_bounded_strings() -> None:
    _refused(M.PING, {"client_id": 7}, "client_id must be a string")
    _refused(M.PING, {"client_id": "c" * (MAX_NAME_CHARS + 1)}, "client_id is longer than")
    _refused(M.PING, {"client_id": ""}, "client_id must not be empty")
    _refused(
        M.UNMOUNT_SEGMENT, {"client_id": "c", "segment_id": ""}, "segment_id must not be empty"
    )


def test_rule_client_id_optional_only_for_removals() -> None:
    assert decode_request(M.REMOVE, {"key": "k"}) == msg.Remove("k")
    _refused(M.PUT_END, {"key": "k"}, "'client_id' is missing")


def test_rule_request_ids() -> None:
    _refused(M.REMOVE, {"key": "k", "rid": -1}, "rid must be an integer")
    _refused(M.REMOVE, {"key": "k", "rid": 1, "ack": 1 << 64}, "ack must be an integer")
    assert decode_request(M.REMOVE, {"key": "k", "rid": 9, "ack": 4}).rid == 9


def test_rule_replicate_config() -> None:
    base = {"client_id": "c", "key": "k", "size": 1}
    _refused(M.PUT_START, {**base, "config": [1]}, "config must be an object")
    for n in (0, MAX_REPLICAS + 1, "2", True):
        _refused(M.PUT_START, {**base, "config": {"replica_num": n}}, "config.replica_num")
    _refused(M.PUT_START, {**base, "config": {"soft_pin_action": 3}}, "config.soft_pin_action")
    _refused(M.PUT_START, {**base, "config": {"soft_pin_ttl_ms": -5}}, "config.soft_pin_ttl_ms")
    _refused(M.PUT_START, {**base, "config": {"with_hard_pin": 1}}, "config.with_hard_pin")
    _refused(
        M.PUT_START,
        {**base, "config": {"preferred_segments": "a"}},
        "config.preferred_segments must be a list",
    )
    _refused(
        M.PUT_START,
        {**base, "config": {"excluded_segments": ["a"] * (MAX_SEGMENTS + 1)}},
        "config.excluded_segments",
    )
    _refused(M.PUT_START, {**base, "config": {"preferred_segments": [3]}}, "must be a string")


def test_rule_segment() -> None:
    def mount(segment: Any) -> dict[str, Any]:
        return {"client_id": "c", "segment": segment}

    _refused(M.MOUNT_SEGMENT, mount("s1"), "segment must be an object")
    _refused(M.MOUNT_SEGMENT, mount({**SEG, "base": 0}), "segment needs a non-zero base and size")
    _refused(M.MOUNT_SEGMENT, mount({**SEG, "size": 0}), "segment needs a non-zero base and size")
    _refused(M.MOUNT_SEGMENT, mount({**SEG, "base": -1}), "segment.base")
    _refused(M.MOUNT_SEGMENT, mount({k: v for k, v in SEG.items() if k != "id"}), "'id' is missing")
    _refused(M.MOUNT_SEGMENT, mount({**SEG, "name": ""}), "segment.name must not be empty")
    _refused(M.MOUNT_SEGMENT, mount({**SEG, "host_id": 5}), "segment.host_id must be a string")


def test_rule_segments_list() -> None:
    _refused(M.REMOUNT_SEGMENTS, {"client_id": "c", "segments": {}}, "segments must be a list")
    _refused(
        M.REMOUNT_SEGMENTS,
        {"client_id": "c", "segments": [SEG] * (MAX_SEGMENTS + 1)},
        f"at most {MAX_SEGMENTS} segments",
    )


def test_rule_regex_bounded() -> None:
    _refused(M.GET_REPLICA_LIST_BY_REGEX, {"pattern": 5}, "pattern must be a string")
    _refused(
        M.GET_REPLICA_LIST_BY_REGEX,
        {"pattern": "a" * (MAX_REGEX_CHARS + 1)},
        f"pattern is longer than {MAX_REGEX_CHARS}",
    )
    # what a pattern means is checked where it is matched (the master's scanner)
    assert decode_request(M.REMOVE_BY_REGEX, {"pattern": "("}) == msg.RemoveByRegex("(")


def test_unknown_parameters_are_ignored() -> None:
    assert decode_request(M.EXIST_KEY, {"key": "k", "extra": [1, {"x": None}]}) == msg.ExistKey("k")


# ---------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------

splits = st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=20)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_FIELD_NAMES = sorted(
    {f.name for cls in msg._ALL for f in dataclasses.fields(cls)}
    | {"rid", "ack", "segment", "config", "segments"}
    | {"replica_num", "soft_pin_action", "base", "size", "id", "name", "host_id"}
)


def _chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos, i = [], 0, 0
    while pos < len(data):
        out.append(data[pos : pos + sizes[i % len(sizes)]])
        pos += sizes[i % len(sizes)]
        i += 1
    return out


def _drain(d: MasterFrameDecoder) -> list[MasterRequest | MasterReply]:
    out: list[MasterRequest | MasterReply] = []
    while True:
        frame = d.next_frame()
        if frame is NEED_DATA:
            return out
        assert isinstance(frame, (MasterRequest, MasterReply))
        out.append(frame)


@given(st.binary(max_size=400), splits)
def test_any_bytes_give_frames_or_malformed(data: bytes, sizes: list[int]) -> None:
    d = MasterFrameDecoder(256)
    try:
        for chunk in _chunks(data, sizes):
            d.feed(chunk)
            for frame in _drain(d):
                if isinstance(frame, MasterRequest):
                    try:
                        decode_request(frame.method, frame.params, escapes=frame.escapes)
                    except InvalidParams:
                        pass
            # never more buffered than one announced (accepted) frame plus this chunk
            assert d.buffered <= max(d.pending_length, 9) + len(chunk)
    except MalformedMessage:
        pass


params_dicts = st.dictionaries(
    st.sampled_from(_FIELD_NAMES) | st.text(max_size=6), json_values, max_size=8
)


@given(st.sampled_from(list(MasterMethod)), params_dicts | json_values)
def test_any_params_give_a_request_or_invalid_params(method: MasterMethod, params: Any) -> None:
    try:
        req = decode_request(method, params)
    except InvalidParams as exc:
        assert exc.message
        return
    assert req.METHOD is method


@given(st.sampled_from(list(MasterMethod)), params_dicts, st.integers(0, 2**32 - 1), splits)
def test_any_params_through_a_frame(
    method: MasterMethod, params: dict[str, Any], req_id: int, sizes: list[int]
) -> None:
    body = json.dumps([method.value, params], ensure_ascii=True).encode()
    d = MasterFrameDecoder()
    for chunk in _chunks(_frame(body, req_id=req_id), sizes):
        d.feed(chunk)
    (frame,) = _drain(d)
    assert isinstance(frame, MasterRequest) and frame.id == req_id
    try:
        decode_request(frame.method, frame.params, escapes=frame.escapes)
    except InvalidParams:
        pass


@given(st.integers(5, (1 << 32) - 1), st.integers(0, 1), st.binary(max_size=64))
def test_a_long_frame_is_refused_from_its_prefix(length: int, kind: int, tail: bytes) -> None:
    limit = 4096
    d = MasterFrameDecoder(limit)
    d.feed(_prefix(length, kind, 1) + tail)
    if length > limit:
        with pytest.raises(MalformedMessage):
            d.next_frame()
    else:
        try:
            _drain(d)
        except MalformedMessage:
            pass
        assert d.buffered <= 9 + len(tail)


# --- valid requests round-trip ------------------------------------------------------

text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
    max_size=16,
)
names = text.filter(bool)
keys = names
u64 = st.integers(0, 2**64 - 1)
replicate = st.builds(
    msg.ReplicateParams,
    replica_num=st.integers(1, MAX_REPLICAS),
    soft_pin_action=st.integers(0, 2),
    soft_pin_ttl_ms=st.none() | u64,
    with_hard_pin=st.booleans(),
    preferred_segments=st.lists(text, max_size=3).map(tuple),
    excluded_segments=st.lists(text, max_size=3).map(tuple),
)
segments = st.builds(
    msg.SegmentParams,
    id=names,
    name=names,
    base=st.integers(1, 2**64 - 1),
    size=st.integers(1, 2**64 - 1),
    host_id=text,
)
_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "client_id": names,
    "key": keys,
    "keys": st.lists(keys, max_size=6).map(tuple),
    "size": u64,
    "config": replicate,
    "segment": segments,
    "segments": st.lists(segments, max_size=3).map(tuple),
    "segment_id": names,
    "segment_name": text,
    "pattern": text,
    "force": st.booleans(),
    "targets": st.lists(text, max_size=3).map(tuple),
    "source": text,
    "target": text,
    "task_id": st.tuples(u64, u64),
    "batch_size": st.integers(1, 1024),
    "status": st.integers(0, 3),
    "message": text,
    "standby": text,
    "confirmed": st.lists(names, max_size=3).map(tuple),
    "view_version": u64,
    "seq": u64,
    "endpoint": names,
    "capacity_bytes": u64,
    "used_bytes": u64,
    "enable_offloading": st.booleans(),
    "register": st.booleans(),
    "shared": st.booleans(),
    "slot": names,
    "batch": names,
    "count": st.integers(1, MAX_SLOTS),
    "lazy": st.booleans(),
}
#: fields drawn once the keys are: one per key
_PER_KEY = {"sizes": u64, "slots": names}


def test_every_request_field_is_drawn() -> None:
    """The property test below samples some of the request types per run: a
    field it cannot draw must fail here, in every run."""
    for cls in msg._ALL:
        for f in dataclasses.fields(cls):
            assert f.name in _FIELDS or f.name in _PER_KEY or f.name in ("rid", "ack"), (
                f"{cls.__name__}.{f.name}: add a strategy to _FIELDS"
            )


@st.composite
def requests(draw: st.DrawFn) -> msg.Request:
    cls = draw(st.sampled_from(msg._ALL))
    values: dict[str, Any] = {}
    per_key = _PER_KEY
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in ("rid", "ack")]
    for name in fields:
        if name in per_key:
            continue
        if cls is msg.ReserveSlots and name == "size":  # a buffer of 0 bytes is refused
            values["size"] = draw(st.integers(1, 2**64 - 1))
            continue
        values[name] = draw(_FIELDS[name])
    for name in fields:
        if name in per_key:
            n = len(values["keys"])
            values[name] = tuple(draw(st.lists(per_key[name], min_size=n, max_size=n)))
    if values.get("lazy") and not values.get("slots"):
        values["lazy"] = False  # (only commits of reserved buffers are lazy)
    return cls(**values)


@given(requests(), st.integers(0, 2**32 - 1), u64, u64, splits)
def test_valid_requests_round_trip(
    req: msg.Request, req_id: int, rid: int, ack: int, sizes: list[int]
) -> None:
    mutation = isinstance(req, msg.Mutation)
    data = encode_request(req_id, req, rid=rid if mutation else 0, ack=ack)
    d = MasterFrameDecoder()
    for chunk in _chunks(data, sizes):
        d.feed(chunk)
    (frame,) = _drain(d)
    assert isinstance(frame, MasterRequest)
    assert frame.id == req_id and frame.method is req.METHOD
    decoded = decode_request(frame.method, frame.params, escapes=frame.escapes)
    expected = req
    if mutation and rid:
        expected = dataclasses.replace(req, rid=rid, ack=ack)
    assert decoded == expected


@given(st.integers(0, 2**32 - 1), st.integers(-(2**31), 2**31 - 1), json_values, splits)
def test_replies_round_trip(req_id: int, code: int, value: Any, sizes: list[int]) -> None:
    try:
        data = encode_reply(req_id, code, value)
    except UnicodeEncodeError:  # a lone surrogate: the master never sends one
        return
    d = MasterFrameDecoder()
    for chunk in _chunks(data, sizes):
        d.feed(chunk)
    (frame,) = _drain(d)
    assert frame == MasterReply(req_id, code, json.loads(json.dumps(value)))


def test_put_end_names_the_standbys_its_client_confirms_to() -> None:
    plain = msg.PutEnd("c", "k", 3, 2)
    assert plain.params() == {"client_id": "c", "rid": 3, "ack": 2, "key": "k"}  # as before
    named = msg.PutEnd("c", "k", 3, 2, confirmed=("10.0.0.2:50051",))
    assert named.params()["confirmed"] == ["10.0.0.2:50051"]
    assert decode_request(M.PUT_END, named.params()) == named
    batch = msg.BatchPutEnd("c", ("a", "b"), 0, 0, confirmed=("h:1", "h:2"))
    assert decode_request(M.BATCH_PUT_END, batch.params()) == batch
    base = {"client_id": "c", "key": "k"}
    _refused(M.PUT_END, {**base, "confirmed": "h:1"}, "confirmed", "list")
    _refused(M.PUT_END, {**base, "confirmed": [""]}, "confirmed[] must not be empty")
    _refused(M.PUT_END, {**base, "confirmed": [5]}, "confirmed[] must be a string")
    _refused(M.PUT_END, {**base, "confirmed": ["h:1"] * 9}, "at most 8")


def test_ha_confirm_request() -> None:
    req = msg.HaConfirm("c", ("a", "b"))
    assert req.params() == {"client_id": "c", "keys": ["a", "b"]}
    assert decode_request(M.HA_CONFIRM, req.params()) == req
    _refused(M.HA_CONFIRM, {"client_id": "", "keys": ["a"]}, "client_id must not be empty")
    _refused(M.HA_CONFIRM, {"client_id": "c", "keys": "a"}, "keys")
    _refused(M.HA_CONFIRM, {"client_id": "c", "keys": [""]}, "empty key")
    lazy = msg.HaConfirm("c", ("a",), ("slot-1",), lazy=True)
    assert lazy.params() == {"client_id": "c", "keys": ["a"], "slots": ["slot-1"], "lazy": True}
    assert decode_request(M.HA_CONFIRM, lazy.params()) == lazy
    base = {"client_id": "c", "keys": ["a"]}
    _refused(M.HA_CONFIRM, {**base, "slots": ["slot-1"], "lazy": 1}, "lazy must be true or false")
    _refused(M.HA_CONFIRM, {**base, "lazy": True}, "lazy is only for commits of buffers")


def test_slot_names_are_the_names_of_each_buffer() -> None:
    from pymooncake.wire._master_msgs import SLOT_PREFIX, slot_name, slot_names

    names = slot_names("client-1", "7", 300)
    assert names == [slot_name("client-1", "7", i) for i in range(300)]
    assert len(set(names)) == 300 and all(n.startswith(SLOT_PREFIX) for n in names)
    assert slot_names("c", "1", 0) == []


#: each field of a CommitSlot's parameters: mostly valid, else one of the edges
#: the checks draw (absent, empty, NUL, one past a bound, a wrong type)
_ABSENT: Any = object()
_commit_fields = {
    "client_id": st.sampled_from(["c", "n" * MAX_NAME_CHARS, "", "n" * (MAX_NAME_CHARS + 1), 7]),
    "slot": st.sampled_from(["s", "n" * MAX_NAME_CHARS, "", "n" * (MAX_NAME_CHARS + 1), None]),
    "key": st.sampled_from(["k", "k" * MAX_KEY_CHARS, "", "a\0b", "k" * (MAX_KEY_CHARS + 1), 1]),
    "rid": st.sampled_from([0, 5, 2**64 - 1, -1, 2**64, True, "1"]),
    "ack": st.sampled_from([0, 3, 2**64 - 1, -1, 2**64, 2.0]),
}


@given(
    st.fixed_dictionaries(
        {name: st.one_of(values, st.just(_ABSENT)) for name, values in _commit_fields.items()}
    ),
    st.dictionaries(st.sampled_from(sorted(_commit_fields)), json_values, max_size=2),
)
def test_commit_slot_inline_case_agrees_with_the_checked_path(
    fields: dict[str, Any], other: dict[str, Any]
) -> None:
    """``CommitSlot.decode`` reads every single put's request inline; with a
    ``confirmed`` member (null: no standby) it takes the field-by-field checks,
    which must give the same request, or refuse whatever the inline case does."""
    params = {k: v for k, v in fields.items() if v is not _ABSENT}
    for p in (params, {**params, **other}):

        def outcome(q: dict[str, Any]) -> Any:
            try:
                return msg.CommitSlot.decode(q)
            except InvalidParams:
                return InvalidParams

        assert outcome(p) == outcome({**p, "confirmed": None})
