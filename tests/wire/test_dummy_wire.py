"""Dummy-client wire formats: RPC frames and memory registrations (exact bytes,
one byte at a time, trailing data, bad input)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pymooncake.errors import MalformedMessage
from pymooncake.wire import NEED_DATA
from pymooncake.wire._dummy import (
    DUMMY_PROTOCOL_VERSION,
    SHM_REGISTER_SIZE,
    DummyFrameDecoder,
    DummyMethod,
    DummyReply,
    DummyRequest,
    ShmRegister,
    ShmResult,
    ShmResultDecoder,
    decode_shm_register,
    dummy_ipc_name,
    encode_dummy_reply,
    encode_dummy_request,
    encode_shm_register,
    encode_shm_result,
)

CID = "0123456789abcdef0123456789abcdef"

# (frame, exact bytes): u32 length after the field | u8 kind | u32 id | JSON
FRAMES = [
    (
        DummyRequest(7, DummyMethod.PING, {"client_id": "ab"}),
        b"\x20\x00\x00\x00\x00\x07\x00\x00\x00" + b'["ping",{"client_id":"ab"}]',
    ),
    (
        DummyRequest(1, DummyMethod.PUT, {"keys": ["k"], "parts": [[[4096, 3]]]}),
        b"\x30\x00\x00\x00\x00\x01\x00\x00\x00" + b'["put",{"keys":["k"],"parts":[[[4096,3]]]}]',
    ),
    (DummyReply(7, 0, {"known": True}), b'\x17\x00\x00\x00\x01\x07\x00\x00\x00[0,{"known":true}]'),
    (
        DummyReply(2, -704, "gone"),
        b"\x12\x00\x00\x00\x01\x02\x00\x00\x00" + b'[-704,"gone"]',
    ),
]


def _encode(frame: DummyRequest | DummyReply) -> bytes:
    if isinstance(frame, DummyRequest):
        return encode_dummy_request(frame.id, frame.method, frame.params)
    return encode_dummy_reply(frame.id, frame.code, frame.value)


@pytest.mark.parametrize(("frame", "wire"), FRAMES)
def test_frames_encode_to_exact_bytes(frame: DummyRequest | DummyReply, wire: bytes) -> None:
    assert _encode(frame) == wire
    assert struct.unpack_from("<I", wire)[0] == len(wire) - 4


@pytest.mark.parametrize(("frame", "wire"), FRAMES)
def test_frames_decode_one_byte_at_a_time_with_trailing_data(
    frame: DummyRequest | DummyReply, wire: bytes
) -> None:
    dec = DummyFrameDecoder()
    trailing = encode_dummy_request(99, DummyMethod.HEALTH, {})
    data = wire + trailing
    got = []
    for i in range(len(data)):
        dec.feed(data[i : i + 1])
        f = dec.next_frame()
        if f is not NEED_DATA:
            got.append(f)
    assert got == [frame, DummyRequest(99, DummyMethod.HEALTH, {})]
    assert dec.buffered == 0


def test_back_to_back_frames_in_one_chunk() -> None:
    dec = DummyFrameDecoder()
    dec.feed(b"".join(w for _, w in FRAMES))
    out = []
    while (f := dec.next_frame()) is not NEED_DATA:
        out.append(f)
    assert out == [f for f, _ in FRAMES]


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"\x04\x00\x00\x00\x00\x01\x00\x00\x00", "outside"),  # length below the header
        (struct.pack("<IBI", 1 << 30, 0, 1), "outside"),  # over the limit, nothing buffered
        (struct.pack("<IBI", 8, 0, 1) + b"[1]", "pair"),
        (struct.pack("<IBI", 16, 0, 1) + b'["nope",{}]', "unknown dummy RPC method"),
        (struct.pack("<IBI", 12, 1, 1) + b'["x",1]', "non-integer code"),
        (struct.pack("<IBI", 15, 2, 1) + b'["ping",1]', "unknown kind"),
        (struct.pack("<IBI", 13, 0, 1) + b"[NaN, 1]", "invalid body"),
        (struct.pack("<IBI", 9, 0, 1) + b"\xff\xfe\xfd\xfc", "invalid body"),
    ],
)
def test_malformed_frames_are_refused(wire: bytes, message: str) -> None:
    dec = DummyFrameDecoder(max_length=1 << 20)
    dec.feed(wire)
    with pytest.raises(MalformedMessage, match=message):
        dec.next_frame()


def test_deep_nesting_is_refused() -> None:
    body = b'["ping",' + b"[" * 100_000 + b"]" * 100_000 + b"]"
    dec = DummyFrameDecoder()
    dec.feed(struct.pack("<IBI", len(body) + 5, 0, 3) + body)
    with pytest.raises(MalformedMessage, match="too deeply"):
        dec.next_frame()


@given(
    st.sampled_from(list(DummyMethod)),
    st.integers(0, 2**32 - 1),
    st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=4),
)
def test_requests_round_trip(method: DummyMethod, req_id: int, params: dict[str, object]) -> None:
    dec = DummyFrameDecoder()
    dec.feed(encode_dummy_request(req_id, method, params))
    assert dec.next_frame() == DummyRequest(req_id, method, params)


def test_protocol_names() -> None:
    assert DUMMY_PROTOCOL_VERSION == "pymooncake-dummy/1"
    # the reference's socket name (@ spelled as the abstract namespace's NUL byte)
    assert dummy_ipc_name(50052) == "\0mooncake_client_50052.sock"


# --- memory registration ------------------------------------------------------------

REGISTER = ShmRegister(CID, 0x7F00_0000_1000, 1 << 20, local_buffer=True)
REGISTER_WIRE = (
    b"MCDS\x01\x00\x01\x00"
    + bytes.fromhex(CID)
    + (0x7F00_0000_1000).to_bytes(8, "little")
    + (1 << 20).to_bytes(8, "little")
)


def test_register_exact_bytes_and_back() -> None:
    assert SHM_REGISTER_SIZE == 40
    assert encode_shm_register(REGISTER) == REGISTER_WIRE
    assert decode_shm_register(REGISTER_WIRE) == REGISTER
    plain = ShmRegister(CID, 4096, 8192)
    assert decode_shm_register(encode_shm_register(plain)) == plain


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (REGISTER_WIRE[:-1], "expected 40"),
        (REGISTER_WIRE + b"\0", "expected 40"),
        (b"XXXX" + REGISTER_WIRE[4:], "bad magic"),
        (REGISTER_WIRE[:4] + b"\x02" + REGISTER_WIRE[5:], "version 2"),
        (REGISTER_WIRE[:5] + b"\x01" + REGISTER_WIRE[6:], "bad magic or kind"),
        (REGISTER_WIRE[:24] + bytes(8) + REGISTER_WIRE[32:], "empty region"),
        (REGISTER_WIRE[:32] + bytes(8), "empty region"),
    ],
)
def test_bad_registrations_are_refused(wire: bytes, message: str) -> None:
    with pytest.raises(MalformedMessage, match=message):
        decode_shm_register(wire)


def test_register_refuses_a_bad_client_id() -> None:
    with pytest.raises(ValueError):
        encode_shm_register(ShmRegister("not-hex", 1, 1))


@pytest.mark.parametrize(
    ("result", "wire"),
    [
        (ShmResult(0, ""), b"MCDS\x01\x01\x00\x00\x00\x00\x00\x00"),
        (
            ShmResult(-600, "too small"),
            b"MCDS\x01\x01" + (-600).to_bytes(4, "little", signed=True) + b"\x09\x00too small",
        ),
    ],
)
def test_result_exact_bytes_one_byte_at_a_time(result: ShmResult, wire: bytes) -> None:
    assert encode_shm_result(result.status, result.message) == wire
    dec = ShmResultDecoder()
    data = wire + b"trailing"
    i = 0
    while dec.result is None:
        assert dec.want > 0
        dec.feed(data[i : i + 1])
        i += 1
    assert dec.result == result
    assert dec.want == 0
    dec.feed(data[i:])
    assert dec.trailing == b"trailing"


def test_result_message_is_cut_and_bad_results_refused() -> None:
    long = encode_shm_result(-1, "x" * 10_000)
    assert len(long) == 12 + 4096
    with pytest.raises(MalformedMessage, match="something else"):
        ShmResultDecoder().feed(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(MalformedMessage, match="message of"):
        ShmResultDecoder().feed(b"MCDS\x01\x01\x00\x00\x00\x00\xff\xff")
