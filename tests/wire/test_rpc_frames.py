"""RPC/handshake frames: exact bytes, incremental decoding, bad input."""

from __future__ import annotations

import json

import pytest

from pymooncake.errors import MalformedMessage
from pymooncake.wire import (
    EMPTY_CONNECTION_REPLY,
    NEED_DATA,
    Frame,
    FrameDecoder,
    MessageType,
    dumps_json,
    encode_frame,
    encode_frame_json,
)

# (message type, JSON value, exact bytes on the wire) -- the bodies are what the
# reference wheel sends/answers (observed on the wire, transfer-engine.md 5)
CASES = [
    (MessageType.PROBE, {}, b"\x04\x00\x00\x00\x00\x00\x00\x00\x03{}\n"),
    (
        MessageType.PROBE,
        {"status": "success"},
        b"\x16\x00\x00\x00\x00\x00\x00\x00\x03" + b'{"status":"success"}\n',
    ),
    (
        MessageType.NOTIFY,
        {"name": "n1", "notify_msg": "m1"},
        b"\x21\x00\x00\x00\x00\x00\x00\x00\x02" + b'{"name":"n1","notify_msg":"m1"}\n',
    ),
    (
        MessageType.NOTIFY,
        {"notify_msg": "success", "name": ""},  # keys come out sorted, like jsoncpp
        b"\x24\x00\x00\x00\x00\x00\x00\x00\x02" + b'{"name":"","notify_msg":"success"}\n',
    ),
    (MessageType.METADATA, None, b"\x06\x00\x00\x00\x00\x00\x00\x00\x01null\n"),
]


@pytest.mark.parametrize(("msg_type", "value", "wire"), CASES)
def test_encode_exact_bytes(msg_type: MessageType, value: object, wire: bytes) -> None:
    assert encode_frame_json(msg_type, value) == wire


@pytest.mark.parametrize(("msg_type", "value", "wire"), CASES)
def test_decode_whole(msg_type: MessageType, value: object, wire: bytes) -> None:
    dec = FrameDecoder()
    dec.feed(wire)
    frame = dec.next_frame()
    assert isinstance(frame, Frame)
    assert frame.type is msg_type
    assert frame.json() == value
    assert dec.next_frame() is NEED_DATA


@pytest.mark.parametrize(("msg_type", "value", "wire"), CASES)
def test_decode_one_byte_at_a_time(msg_type: MessageType, value: object, wire: bytes) -> None:
    dec = FrameDecoder()
    for i, byte in enumerate(wire):
        assert dec.next_frame() is NEED_DATA, f"frame complete after only {i} bytes"
        dec.feed(bytes([byte]))
    frame = dec.next_frame()
    assert isinstance(frame, Frame)
    assert (frame.type, frame.json()) == (msg_type, value)


def test_trailing_data_stays_buffered() -> None:
    first = encode_frame_json(MessageType.PROBE, {})
    second = encode_frame_json(MessageType.NOTIFY, {"name": "a", "notify_msg": "b"})
    dec = FrameDecoder()
    dec.feed(first + second[:5])
    frame = dec.next_frame()
    assert isinstance(frame, Frame) and frame.type is MessageType.PROBE
    assert dec.trailing == second[:5]
    assert dec.next_frame() is NEED_DATA
    dec.feed(second[5:])
    frame = dec.next_frame()
    assert isinstance(frame, Frame) and frame.json() == {"name": "a", "notify_msg": "b"}


def test_connection_reply_of_tcp_only_engine() -> None:
    # exactly what a TCP-only reference engine answers to a Connection request
    body = dumps_json(EMPTY_CONNECTION_REPLY)
    assert body == (
        b'{"local_gid":"","local_lid":0,"local_nic_path":"","payload":"",'
        b'"peer_nic_path":"","qp_num":[],"reply_msg":""}'
    )


def test_zero_length_is_rejected() -> None:
    dec = FrameDecoder()
    dec.feed(b"\x00" * 8)
    with pytest.raises(MalformedMessage, match="length 0"):
        dec.next_frame()


def test_oversized_is_rejected_before_the_payload_arrives() -> None:
    dec = FrameDecoder(max_length=1024)
    dec.feed((1025).to_bytes(8, "little"))  # only the length field
    with pytest.raises(MalformedMessage, match="exceeds the limit of 1024"):
        dec.next_frame()


def test_huge_length_field() -> None:
    dec = FrameDecoder()
    dec.feed(b"\xff" * 8)
    with pytest.raises(MalformedMessage, match="MC_HANDSHAKE_MAX_LENGTH"):
        dec.next_frame()


def test_invalid_json_raises_on_parse() -> None:
    dec = FrameDecoder()
    dec.feed(encode_frame(MessageType.NOTIFY, b"{not json\n"))
    frame = dec.next_frame()
    assert isinstance(frame, Frame)
    with pytest.raises(MalformedMessage, match="invalid JSON"):
        frame.json()


def test_invalid_utf8_raises_on_parse() -> None:
    dec = FrameDecoder()
    dec.feed(encode_frame(MessageType.NOTIFY, b"\xff\xfe\n"))
    frame = dec.next_frame()
    assert isinstance(frame, Frame)
    with pytest.raises(MalformedMessage):
        frame.json()


def test_old_protocol_body_without_type_byte_is_a_connection() -> None:
    body = b'{"local_nic_path":"a@mlx5_0"}\n'
    dec = FrameDecoder()
    dec.feed(len(body).to_bytes(8, "little") + body)
    frame = dec.next_frame()
    assert isinstance(frame, Frame)
    assert frame.type is MessageType.CONNECTION
    assert json.loads(frame.body) == {"local_nic_path": "a@mlx5_0"}


def test_max_length_must_be_positive() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(0)
