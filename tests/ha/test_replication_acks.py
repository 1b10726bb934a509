"""The leader's acknowledgement bookkeeping (``ReplicationHub``), without sockets.

A put ships two frames: its reservation (``WriteStarted``) at PutStart, which no
reply waits for, and its commit at PutEnd, which the reply waits for.  The
reservation's frame asks for no acknowledgement (top bit of the frame id), so a
standby acknowledges once per put, not twice; acknowledgements are cumulative,
so the commit's covers it.  Frame ids carry 31 bits of the sequence number; the
leader unwraps what a standby echoes.
"""

from __future__ import annotations

from typing import Any, cast

from pymooncake.store.master._effects import ObjectCommitted, ObjectDeleted, WriteStarted
from pymooncake.store.master._replication import _NO_ACK, _SEQ_MASK, ReplicationHub, _Link
from pymooncake.store.master._service import _RpcProtocol
from pymooncake.wire import MasterFrameDecoder, MasterReply


class _Transport:
    def __init__(self) -> None:
        self.sent = bytearray()

    def write(self, data: bytes) -> None:
        self.sent += data

    def get_write_buffer_size(self) -> int:
        return 0


class _Standby:
    """What the hub uses of a standby's connection."""

    def __init__(self) -> None:
        self.transport = _Transport()
        self.peer = ("10.0.0.12", 50051)
        self.released: list[int] = []
        self.held_since = 0.0

    def release_held(self, acked: int) -> bool:
        self.released.append(acked)
        return True

    def frames(self) -> list[tuple[int, dict[str, Any]]]:
        """(frame id, body) of everything sent so far (and forget it)."""
        decoder = MasterFrameDecoder(1 << 30)
        decoder.feed(bytes(self.transport.sent))
        self.transport.sent.clear()
        out = []
        while isinstance(frame := decoder.next_frame(), MasterReply):
            out.append((frame.id, frame.value))
        return out


def _start(key: str) -> WriteStarted:
    return WriteStarted(key, 4096, (("seg", 0x1000),), "writer", False, False)


def _commit(key: str) -> ObjectCommitted:
    return ObjectCommitted(key, 4096, (("seg", 0x1000, 4096),), False, "writer")


def _ready_hub() -> tuple[ReplicationHub, _Standby, _RpcProtocol]:
    hub = ReplicationHub()
    standby = _Standby()
    proto = cast(_RpcProtocol, standby)
    link = _Link(proto, 1, "standby")
    link.synced_seq = 0
    hub.links[proto] = link
    hub.on_ack(proto, 0)
    assert hub.in_sync
    return hub, standby, proto


def test_a_reservation_asks_for_no_acknowledgement_and_the_commit_covers_it() -> None:
    hub, standby, proto = _ready_hub()
    assert hub.ship([_start("k")]) == 0  # PutStart's reply does not wait
    ((frame_id, body),) = standby.frames()
    assert frame_id & _NO_ACK and frame_id & _SEQ_MASK == body["seq"] == 1
    assert hub.barrier() == 0  # nothing anyone waits for is unacknowledged

    seq = hub.ship([_commit("k")])  # PutEnd's reply waits for this one
    ((frame_id, body),) = standby.frames()
    assert seq == 2 and frame_id == 2 and not frame_id & _NO_ACK
    assert hub.barrier(seq) == 2
    hub.wait(proto)  # the PutEnd reply is held
    hub.on_ack(proto, frame_id)  # the standby acknowledges the commit only
    assert hub.acked == 2 and hub.barrier(seq) == 0
    assert standby.released == [2]  # and released


def test_frees_and_state_frames_ask_for_acknowledgement() -> None:
    hub, standby, _ = _ready_hub()
    assert hub.ship([ObjectDeleted("k")]) == 1
    assert hub.free_seq == 1
    ((frame_id, _),) = standby.frames()
    assert not frame_id & _NO_ACK
    # a batch of a reservation and a commit (two clients in one loop turn) waits
    assert hub.ship([_start("a"), _commit("b")]) == 2
    ((frame_id, _),) = standby.frames()
    assert frame_id == 2


def test_a_standby_that_has_all_but_reservations_is_in_sync() -> None:
    hub, _, _ = _ready_hub()
    hub.ship([_commit("k")])
    newcomer = _Standby()
    nproto = cast(_RpcProtocol, newcomer)
    link = _Link(nproto, 1, "newcomer")
    link.synced_seq = hub.seq  # its initial state ended at 1
    hub.links[nproto] = link
    hub.ship([_start("x")])  # 2: a reservation, no acknowledgement asked
    hub.on_ack(nproto, 1)
    assert link.ready


def test_acknowledgements_unwrap_past_31_bits() -> None:
    hub, standby, proto = _ready_hub()
    hub.seq = _SEQ_MASK + 5  # 2**31 + 4 batches shipped so far
    hub.ack_seq = hub.seq
    seq = hub.ship([_commit("k")])
    ((frame_id, _),) = standby.frames()
    assert seq == _SEQ_MASK + 6 and frame_id == 5
    hub.on_ack(proto, frame_id)
    assert hub.links[proto].acked == seq and hub.barrier(seq) == 0
