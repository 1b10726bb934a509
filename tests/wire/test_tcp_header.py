"""TCP transport session headers and v2 status frames: exact bytes and decoders."""

from __future__ import annotations

import struct

import pytest

from pymooncake.errors import MalformedMessage
from pymooncake.wire import (
    HEADER,
    NEED_DATA,
    STATUS_ADDR_REJECTED,
    STATUS_OK,
    HeaderDecoder,
    SessionHeader,
    StatusDecoder,
    decode_header,
    decode_status,
    encode_header,
    encode_status,
)

ADDR = 0x00007F12_3456_7000


def test_header_layout_is_24_bytes_little_endian() -> None:
    assert HEADER.size == 24
    wire = encode_header(4096, ADDR, is_write=True, v2=True)
    assert wire == (
        (4096).to_bytes(8, "little") + ADDR.to_bytes(8, "little") + b"\x81" + b"\x00" * 7
    )


@pytest.mark.parametrize(
    ("is_write", "v2", "opcode"),
    [(False, False, 0x00), (True, False, 0x01), (False, True, 0x80), (True, True, 0x81)],
)
def test_opcode_byte(is_write: bool, v2: bool, opcode: int) -> None:
    wire = encode_header(1, 2, is_write=is_write, v2=v2)
    assert wire[16] == opcode
    assert decode_header(wire) == SessionHeader(1, 2, is_write, v2)
    assert decode_header(wire).opcode == opcode


def test_receivers_ignore_padding_and_treat_unknown_opcodes_as_read() -> None:
    wire = struct.pack("<QQB", 7, 8, 0x85) + b"\xaa" * 7
    hdr = decode_header(wire)
    assert hdr == SessionHeader(7, 8, is_write=False, v2=True)


def test_status_frames_exact_bytes() -> None:
    assert encode_status(True) == b"\x00\x00\x00\x00VTCM"
    assert encode_status(False) == b"\x01\x00\x00\x00VTCM"
    assert STATUS_OK == 0x4D43545600000000
    assert STATUS_ADDR_REJECTED == 0x4D43545600000001


def test_status_without_magic_is_a_protocol_error() -> None:
    assert decode_status(STATUS_OK) is True
    assert decode_status(STATUS_ADDR_REJECTED) is False
    with pytest.raises(MalformedMessage, match="MC_TCP_PROTO=1"):
        decode_status(12345)


def test_encode_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        encode_header(1 << 64, 0, True, True)
    with pytest.raises(ValueError):
        encode_header(1, -1, True, True)


def test_header_decoder_byte_at_a_time_with_trailing() -> None:
    a = encode_header(10, ADDR, True, True)
    b = encode_header(20, ADDR + 10, False, False)
    dec = HeaderDecoder()
    stream = a + b + b"xy"
    got = []
    for byte in stream:
        dec.feed(bytes([byte]))
        hdr = dec.next_header()
        if hdr is not NEED_DATA:
            got.append(hdr)
    assert got == [SessionHeader(10, ADDR, True, True), SessionHeader(20, ADDR + 10, False, False)]
    assert dec.trailing == b"xy"


def test_status_decoder_byte_at_a_time() -> None:
    dec = StatusDecoder()
    results = []
    for byte in encode_status(True) + encode_status(False):
        dec.feed(bytes([byte]))
        r = dec.next_status()
        if r is not NEED_DATA:
            results.append(r)
    assert results == [True, False]
