"""Property tests of every decoder: any input, any split -- a result or the documented
exception, never another exception, a hang or an allocation beyond the limits.

The default run keeps ``max_examples`` modest (tests/conftest.py);
``HYPOTHESIS_PROFILE=long`` runs thousands per property.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from pymooncake.errors import MalformedMessage
from pymooncake.wire import (
    HEADER,
    STATUS,
    Frame,
    FrameDecoder,
    HeaderDecoder,
    MessageType,
    NeedData,
    StatusDecoder,
    decode_header,
    decode_rpc_meta,
    decode_segment,
    decode_status,
    encode_frame_json,
    encode_header,
)
from pymooncake.wire._http import HttpParseError, HttpRequest, RequestParser
from pymooncake.wire._rpc import loads_json

splits = st.lists(st.integers(min_value=1, max_value=97), min_size=1, max_size=30)


def _chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        out.append(data[pos : pos + n])
        pos += n
        i += 1
    return out


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


# --- RPC frames ----------------------------------------------------------------------


@given(st.binary(max_size=600), splits, st.integers(min_value=1, max_value=300))
def test_rpc_frames_any_bytes(data: bytes, sizes: list[int], max_len: int) -> None:
    dec = FrameDecoder(max_len)
    try:
        for chunk in _chunks(data, sizes):
            dec.feed(chunk)
            while True:
                frame = dec.next_frame()
                if isinstance(frame, NeedData):
                    break
                assert isinstance(frame, Frame) and len(frame.body) <= max_len
                try:
                    frame.json()
                except MalformedMessage:
                    pass
            # nothing is buffered beyond one frame of the allowed size
            length = dec.pending_length()
            assert length is None or length <= max_len
    except MalformedMessage:
        pass


@given(st.sampled_from(list(MessageType)), json_values, splits)
def test_rpc_frames_round_trip(msg_type: MessageType, value: Any, sizes: list[int]) -> None:
    wire = encode_frame_json(msg_type, value)
    dec = FrameDecoder(len(wire))
    got: list[Frame] = []
    for chunk in _chunks(wire + wire, sizes):  # two frames, any split
        dec.feed(chunk)
        while isinstance(frame := dec.next_frame(), Frame):
            got.append(frame)
    assert [f.type for f in got] == [msg_type, msg_type]
    assert got[0].json() == json.loads(json.dumps(value))


@given(st.integers(min_value=2**20 + 1, max_value=2**64 - 1), st.binary(max_size=50))
def test_rpc_oversized_length_refused_before_the_payload(length: int, tail: bytes) -> None:
    dec = FrameDecoder()
    dec.feed(struct.pack("<Q", length) + tail)
    try:
        dec.next_frame()
    except MalformedMessage as exc:
        assert "exceeds the limit" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("an oversized frame was accepted")


@given(st.binary(max_size=400))
def test_loads_json_any_bytes(data: bytes) -> None:
    try:
        loads_json(data, "fuzz")
    except MalformedMessage:
        pass


@given(json_values)
def test_loads_json_accepts_what_dumps_writes(value: Any) -> None:
    text = json.dumps(value)
    assert loads_json(text.encode(), "x") == json.loads(text)


# --- TCP data header and status ---------------------------------------------------------


@given(st.binary(min_size=24, max_size=24))
def test_tcp_header_any_24_bytes(raw: bytes) -> None:
    h = decode_header(raw)
    again = encode_header(h.size, h.addr, h.is_write, h.v2)
    assert decode_header(again) == h
    assert HEADER.unpack(again)[:2] == HEADER.unpack(raw)[:2]


@given(st.binary(max_size=200), splits)
def test_tcp_incremental_decoders(data: bytes, sizes: list[int]) -> None:
    hd, sd = HeaderDecoder(), StatusDecoder()
    headers = statuses = 0
    for chunk in _chunks(data, sizes):
        hd.feed(chunk)
        sd.feed(chunk)
        while not isinstance(hd.next_header(), NeedData):
            headers += 1
        try:
            while not isinstance(sd.next_status(), NeedData):
                statuses += 1
        except MalformedMessage:
            sd = StatusDecoder()  # a real reader closes the connection here
    assert headers == len(data) // 24
    assert len(hd.trailing) == len(data) % 24


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_tcp_status_any_value(value: int) -> None:
    try:
        decode_status(value)
    except MalformedMessage:
        assert (value >> 32) != 0x4D435456
    assert len(STATUS.pack(value)) == 8


# --- HTTP requests ------------------------------------------------------------------------


@given(st.binary(max_size=800), splits)
def test_http_parser_any_bytes(data: bytes, sizes: list[int]) -> None:
    parser = RequestParser(max_header_bytes=256, max_body_bytes=300)
    try:
        for chunk in _chunks(data, sizes):
            parser.feed(chunk)
            while isinstance(req := parser.next_request(), HttpRequest):
                assert len(req.body) <= 300
            # a request in progress never holds more than its limits allow
            assert parser.expected_body <= 300
    except HttpParseError as exc:
        assert exc.status in (400, 411, 413, 431, 505)


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789-_", min_size=1, max_size=12)


@given(
    st.sampled_from(["GET", "PUT", "DELETE", "POST", "HEAD"]),
    st.lists(_token, max_size=4),
    st.dictionaries(_token, st.text(max_size=12), max_size=4),
    st.dictionaries(
        _token, st.text(alphabet=" !#$%&'()*+,-./0123456789:;<=>?@AZaz", max_size=20), max_size=4
    ),
    st.binary(max_size=100),
    splits,
)
def test_http_requests_round_trip(
    method: str,
    path: list[str],
    query: dict[str, str],
    headers: dict[str, str],
    body: bytes,
    sizes: list[int],
) -> None:
    import urllib.parse

    target = "/" + "/".join(urllib.parse.quote(p) for p in path)
    if query:
        target += "?" + urllib.parse.urlencode(query)
    lines = [f"{method} {target} HTTP/1.1"]
    headers = {
        k: v.strip()
        for k, v in headers.items()
        if k.lower() not in ("content-length", "transfer-encoding", "expect")
    }
    lines += [f"X-{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    parser = RequestParser()
    got: list[HttpRequest] = []
    for chunk in _chunks(raw, sizes):
        parser.feed(chunk)
        while isinstance(req := parser.next_request(), HttpRequest):
            got.append(req)
    assert len(got) == 1
    req = got[0]
    assert (req.method, req.body, req.target) == (method, body, target)
    assert req.query == query
    for k, v in headers.items():
        assert req.headers[f"x-{k.lower()}"] == v


# --- segment descriptors -------------------------------------------------------------------


@given(json_values)
def test_descriptor_decoders_any_json(value: Any) -> None:
    for decode in (decode_segment, decode_rpc_meta):
        for form in (value, json.dumps(value).encode()):
            try:
                decode(form, "fuzz")
            except MalformedMessage:
                pass


@given(st.binary(max_size=300))
def test_descriptor_decoders_any_bytes(raw: bytes) -> None:
    for decode in (decode_segment, decode_rpc_meta):
        try:
            decode(raw, "fuzz")
        except MalformedMessage:
            pass


_buffer = st.fixed_dictionaries(
    {
        "name": st.text(min_size=1, max_size=10),
        "addr": st.integers(min_value=1, max_value=2**48),
        "length": st.integers(min_value=1, max_value=2**40),
    },
    optional={
        "rkey": st.lists(st.integers(min_value=-5, max_value=2**33), max_size=2),
        "lkey": st.one_of(st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2)),
        "extra": json_values,
    },
)


@given(
    st.fixed_dictionaries(
        {"name": st.text(max_size=10), "protocol": st.sampled_from(["tcp", "rdma"])},
        optional={
            "buffers": st.lists(_buffer, max_size=3),
            "tcp_data_port": st.integers(min_value=-1, max_value=70000),
            "tcp_proto_version": st.one_of(st.integers(-1, 300), st.text(max_size=2)),
            "tcp_data_host": st.one_of(st.none(), st.text(max_size=10), st.integers()),
            "devices": st.one_of(st.integers(), st.lists(json_values, max_size=2)),
            "priority_matrix": json_values,
        },
    )
)
def test_descriptor_near_valid_shapes(obj: dict[str, Any]) -> None:
    try:
        desc = decode_segment(json.dumps(obj).encode(), "fuzz")
    except MalformedMessage:
        return
    assert 0 <= desc.tcp_data_port <= 65535
    for b in desc.buffers:
        assert b.addr > 0 and b.length > 0 and b.end <= 2**64 - 1
