"""The master frame decoder's prefix peek used by HA standbys to acknowledge early."""

from __future__ import annotations

from pymooncake.wire import MasterFrameDecoder, MasterReply, encode_reply


def test_complete_ids_reads_prefixes_only_and_stops_at_a_partial_frame() -> None:
    frames = [encode_reply(7, 0, {"seq": 7}), encode_reply(9, 0, {"seq": 9, "effects": []})]
    dec = MasterFrameDecoder()
    data = b"".join(frames) + encode_reply(11, 0, "x")[:6]
    dec.feed(data)
    assert dec.complete_ids() == [7, 9]
    assert dec.complete_ids() == [7, 9]  # peeking consumes nothing
    got = [dec.next_frame(), dec.next_frame()]
    assert [f.id for f in got if isinstance(f, MasterReply)] == [7, 9]
    assert dec.complete_ids() == []


def test_complete_ids_one_byte_at_a_time() -> None:
    frame = encode_reply(3, 0, {"seq": 3})
    dec = MasterFrameDecoder()
    for i, b in enumerate(frame):
        assert dec.complete_ids() == []
        dec.feed(bytes([b]))
        if i < len(frame) - 1:
            assert dec.complete_ids() == []
    assert dec.complete_ids() == [3]
