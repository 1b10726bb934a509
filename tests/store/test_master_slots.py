"""Reserved buffers (ReserveSlots / CommitSlot): a put in one round trip.

MasterState with an injected clock; every scenario ends with ``validate()``."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import pytest

from pymooncake.errors import InvalidParams, ObjectExists, ObjectNotFound, ReplicaNotReady
from pymooncake.store._config import MasterConfig
from pymooncake.store._types import ErrorCode, ReplicateConfig, SegmentInfo, SoftPinAction
from pymooncake.store.master._effects import DURABLE, WriteRenamed, effect_from_record
from pymooncake.store.master._handlers import build_handlers
from pymooncake.store.master._state import SLOT_PREFIX, SLOT_TTL_S, MasterState
from pymooncake.wire import _master_msgs as msg
from pymooncake.wire import _master_reply_msgs as rp

MiB = 1 << 20
ONE = ReplicateConfig()


def seg(name: str, sid: str, base: int = 0x10000000, size: int = 16 * MiB) -> SegmentInfo:
    return SegmentInfo(id=sid, name=name, base=base, size=size, host_id=name.split(":")[0])


@pytest.fixture
def st() -> Iterator[MasterState]:
    s = MasterState(MasterConfig(client_ttl_s=10), rng=random.Random(7))
    s.mount_segment("node", seg("a:1", "sa"), 0)
    yield s
    s.validate()


def test_reserved_buffers_are_writes_no_key_can_touch(st: MasterState) -> None:
    slots = st.reserve_slots("c1", 4096, 3, ONE, 1)
    assert len(slots) == 3
    names = [n for n, _ in slots]
    assert len(set(names)) == 3 and all(n.startswith(SLOT_PREFIX) for n in names)
    assert len({obj.addr for _, obj in slots}) == 3
    assert st.segments["sa"].allocator.live_count == 3
    # reserved buffers are writes in progress: nothing is readable
    for name in names:
        assert not st.exist_key(name, 1)
    st.validate()


def test_a_committed_buffer_is_the_keys_value(st: MasterState) -> None:
    (name, obj), *_ = st.reserve_slots("c1", 4096, 2, ONE, 1)
    addr = obj.addr
    st.commit_slot("c1", name, "k", 2)
    got = st.get_replica_list("k", 3)
    assert got.size == 4096 and [r.address for r in got.replicas] == [addr]
    assert name not in st.objects and "k" not in st.inflight
    assert st.clients["c1"].inflight == {n for n in st.inflight}  # the other slot only
    # committing the same buffer again finds nothing: it is the key's now
    with pytest.raises(ObjectNotFound, match="ordinary way"):
        st.commit_slot("c1", name, "k2", 3)
    st.validate()


def test_an_existing_key_leaves_the_buffer_reserved(st: MasterState) -> None:
    st.put_start("c2", "k", 10, ONE, 1)
    st.put_end("c2", "k", 1)
    ((name, _),) = st.reserve_slots("c1", 4096, 1, ONE, 1)
    with pytest.raises(ObjectExists):
        st.commit_slot("c1", name, "k", 2)
    st.put_start("c2", "busy", 10, ONE, 2)
    with pytest.raises(ReplicaNotReady, match="being written"):
        st.commit_slot("c1", name, "busy", 2)
    assert name in st.inflight  # still ours: usable for another key
    st.commit_slot("c1", name, "other", 3)
    assert st.get_replica_list("other", 3).size == 4096


def test_a_batch_commit_answers_each_buffer_as_a_single_commit_would(st: MasterState) -> None:
    h = build_handlers(st)
    st.put_start("c2", "done", 10, ONE, 1)
    st.put_end("c2", "done", 1)
    st.put_start("c2", "busy", 10, ONE, 1)
    names = [n for n, _ in st.reserve_slots("c1", 4096, 4, ONE, 1, "b")]
    keys = ("a", "done", "busy", "b")
    req = msg.BatchCommitSlots("c1", (*names[:3], names[0]), keys)  # names[0] twice
    reply = h[msg.BatchCommitSlots](req, 2)
    assert isinstance(reply, rp.BatchCommitSlotsReply)
    assert reply.codes == (
        0,
        int(ErrorCode.OBJECT_ALREADY_EXISTS),
        int(ErrorCode.REPLICA_IS_NOT_READY),
        int(ErrorCode.OBJECT_NOT_FOUND),  # the first commit made it the value of "a"
    )
    assert reply.messages[0] is None and "being written" in (reply.messages[2] or "")
    assert st.get_replica_list("a", 3).size == 4096
    assert {names[1], names[2], names[3]} <= set(st.inflight)  # still reserved
    # the wire form round-trips, and the request checks its columns
    wire = msg.BatchCommitSlots("c1", ("s",), ("k",)).params()
    assert msg.decode_request(msg.MasterMethod.BATCH_COMMIT_SLOTS, wire) == msg.BatchCommitSlots(
        "c1", ("s",), ("k",)
    )
    with pytest.raises(InvalidParams, match="names 2 buffers for 1 keys"):
        msg.decode_request(msg.MasterMethod.BATCH_COMMIT_SLOTS, {**wire, "slots": ["s", "t"]})
    with pytest.raises(InvalidParams, match="slots must be a list"):
        msg.decode_request(msg.MasterMethod.BATCH_COMMIT_SLOTS, {**wire, "slots": [""]})


def test_a_batch_commit_may_name_its_buffers_by_runs(st: MasterState) -> None:
    """A client names the buffers it commits by runs of its reservations
    (``slot_runs`` on the wire); the master, holding them as per-buffer records
    here, commits the buffers those runs name."""
    h = build_handlers(st)
    names = [n for n, _ in st.reserve_slots("c1", 4096, 4, ONE, 1, "b")]
    runs = msg.SlotRuns.of("c1", [("b", 2), ("b", 3), ("b", 0)])
    assert list(runs) == [names[2], names[3], names[0]] and runs == (names[2], names[3], names[0])
    req = msg.BatchCommitSlots("c1", runs, ("x", "y", "z"))
    wire = req.params()
    assert wire["slot_runs"] == [["b", 2, 2], ["b", 0, 1]] and "slots" not in wire
    back = msg.decode_request(msg.MasterMethod.BATCH_COMMIT_SLOTS, json.loads(json.dumps(wire)))
    assert back == req and isinstance(back, msg.BatchCommitSlots)
    assert isinstance(back.slots, msg.SlotRuns) and back.slots.runs == runs.runs
    reply = h[msg.BatchCommitSlots](back, 2)
    assert isinstance(reply, rp.BatchCommitSlotsReply) and reply.codes == (0, 0, 0)
    assert [st.get_replica_list(k, 3).size for k in "xyz"] == [4096] * 3
    assert names[1] in st.inflight and not {names[0], names[2], names[3]} & set(st.inflight)
    # runs of another client's reservations travel as names
    other = msg.BatchCommitSlots("c2", runs, ("x", "y", "z")).params()
    assert other["slots"] == [names[2], names[3], names[0]] and "slot_runs" not in other


@pytest.mark.parametrize(
    ("runs", "rule"),
    [
        ([["b", 0, 2]], "names 2 buffers for 1 keys"),
        ([["b", 0, 1], ["b", 1, 1]], "at most 1 runs"),
        ([["b", 0, 0]], "runs within"),
        ([["b", -1, 1]], "runs within"),
        ([["b", 256, 1]], "runs within"),
        ([["b", 255, 2]], "runs within"),
        ([["", 0, 1]], "runs within"),
        ([[7, 0, 1]], "runs within"),
        ([["b", 0.0, 1]], "runs within"),
        ([["b", 0]], "runs within"),
        ("b:0", "list of at most"),
    ],
)
def test_runs_of_a_batch_commit_are_checked(runs: Any, rule: str) -> None:
    wire = {"client_id": "c1", "keys": ["k"], "slot_runs": runs}
    with pytest.raises(InvalidParams, match=rule):
        msg.decode_request(msg.MasterMethod.BATCH_COMMIT_SLOTS, wire)


def test_only_the_client_that_reserved_may_commit(st: MasterState) -> None:
    ((name, _),) = st.reserve_slots("c1", 64, 1, ONE, 1)
    with pytest.raises(ObjectNotFound):
        st.commit_slot("c2", name, "k", 2)
    # and no ordinary key can name a buffer of the reserved kind
    st.put_start("c1", "plain", 64, ONE, 2)
    with pytest.raises(ObjectNotFound):
        st.commit_slot("c1", "plain", "k", 2)


def test_buffers_go_with_their_client_and_segment(st: MasterState) -> None:
    st.mount_segment("node2", seg("b:1", "sb", base=0x20000000), 0)
    st.reserve_slots("c1", 4096, 8, ONE, 1)
    assert len(st.inflight) == 8
    st.expire_client("c1", 2)  # a dead writer's buffers go to the discard list
    assert not st.inflight and not any(k.startswith(SLOT_PREFIX) for k in st.objects)
    slots = st.reserve_slots("c3", 4096, 8, ONE, 3)
    st.unmount_segment("node", "sa", 4)
    st.unmount_segment("node2", "sb", 4)
    for name, _ in slots:
        with pytest.raises(ObjectNotFound):
            st.commit_slot("c3", name, "k", 5)


def test_reclaimed_after_put_start_release_timeout() -> None:
    s = MasterState(MasterConfig(put_start_release_timeout_s=8.0))
    s.mount_segment("node", seg("a:1", "sa"), 0)
    assert s.slot_ttl() == 4.0  # half of the release timeout
    assert MasterState().slot_ttl() == SLOT_TTL_S
    ((name, _),) = s.reserve_slots("c1", 64, 1, ONE, 0)
    s.ping("c1", 5)
    s.tick(9.0)
    with pytest.raises(ObjectNotFound):
        s.commit_slot("c1", name, "k", 9.5)
    s.validate()


def test_fewer_buffers_when_the_pool_is_nearly_full() -> None:
    s = MasterState(MasterConfig(client_ttl_s=10))
    s.mount_segment("node", seg("a:1", "sa", size=1 * MiB), 0)
    assert s.config.eviction_high_watermark_ratio == 0.9
    slots = s.reserve_slots("c1", 300 * 1024, 8, ONE, 0)
    # a fourth would not fit (and the ones ahead never evict)
    assert len(slots) == 3
    s.validate()


def test_buffers_ahead_fill_up_to_the_high_watermark_of_a_full_pool() -> None:
    """A cache's steady state: the pool is full, a put evicts what it needs and the
    background frees an eviction round; buffers reserved ahead may then use that
    room up to the high watermark (they never evict), so the next puts take one
    round trip."""
    config = MasterConfig(client_ttl_s=10, eviction_high_watermark_ratio=1.0, eviction_ratio=0.25)
    s = MasterState(config)
    s.mount_segment("node", seg("a:1", "sa", size=1 * MiB), 0)
    for i in range(16):  # full of readable objects
        s.put_start("c2", f"o{i}", 64 * 1024, ONE, 0)
        s.put_end("c2", f"o{i}", 0)
    assert len(s.reserve_slots("c1", 64 * 1024, 8, ONE, 1)) == 1  # evicts for the first only
    assert s.debt_raised  # an eviction round is owed to the background
    while s.housekeeping(1.0):
        pass
    # the round is a quarter of the segment: the put's own eviction freed one
    # object of it, the background the other three
    freed = 16 - 1 - s.key_count()
    assert freed == 3
    assert len(s.reserve_slots("c1", 64 * 1024, 8, ONE, 1, "r2")) == freed
    assert s.key_count() == 15 - freed  # nothing more was evicted for them
    s.validate()


def test_buffers_ahead_use_the_room_above_the_high_watermark() -> None:
    """A pool kept between its high watermark (0.9, the default) and full: the put
    that found it full owes a round down to high watermark - eviction ratio (what
    the tick would ask), and buffers ahead then take the room up to the
    segment's capacity without evicting -- not one buffer per reservation, which
    cost every put a reservation and a commit (and with HA a standby's answer)."""
    s = MasterState(MasterConfig(client_ttl_s=10))
    assert s.config.eviction_high_watermark_ratio == 0.9
    s.mount_segment("node", seg("a:1", "sa", size=1 * MiB), 0)
    for i in range(16):  # full of readable objects
        s.put_start("c2", f"o{i}", 64 * 1024, ONE, 0)
        s.put_end("c2", f"o{i}", 0)
    assert len(s.reserve_slots("c1", 64 * 1024, 8, ONE, 1)) == 1  # evicts for the first only
    while s.housekeeping(1.0):
        pass
    alloc = s.segments["sa"].allocator
    assert alloc.allocated <= 0.9 * alloc.capacity  # the round went below the watermark
    evicted = s.metrics.evicted_keys
    room = (alloc.capacity - alloc.allocated) // (64 * 1024)
    assert room >= 2
    ahead = s.reserve_slots("c1", 64 * 1024, 8, ONE, 1, "r2")
    assert len(ahead) == min(room, 8)  # up to full, past the watermark
    assert s.metrics.evicted_keys == evicted  # nothing was evicted for them
    s.validate()


def test_buffers_ahead_never_evict_only_the_one_for_the_put_at_hand_does() -> None:
    s = MasterState(MasterConfig(client_ttl_s=10))
    s.mount_segment("node", seg("a:1", "sa", size=1 * MiB), 0)
    for i in range(16):  # full of readable objects
        s.put_start("c2", f"o{i}", 64 * 1024, ONE, 0)
        s.put_end("c2", f"o{i}", 0)
    assert s.reserve_slots("c1", 64 * 1024, 8, ONE, 1)  # evicts for the first only
    assert s.key_count() == 15 and s.slots_held() == 1
    s.validate()


def test_pins_and_replicas_of_the_config_apply_at_commit(st: MasterState) -> None:
    st.mount_segment("node2", seg("b:1", "sb", base=0x20000000), 0)
    pinned = ReplicateConfig(replica_num=2, soft_pin_action=SoftPinAction.ENABLE)
    ((name, _),) = st.reserve_slots("c1", 4096, 1, pinned, 1)
    st.commit_slot("c1", name, "k", 2)
    got = st.get_replica_list("k", 2)
    assert {r.segment_id for r in got.replicas} == {"sa", "sb"}
    assert st.soft_pinned == 1


def test_value_size_histogram_counts_commits_not_reservations(st: MasterState) -> None:
    slots = st.reserve_slots("c1", 4096, 4, ONE, 1)
    assert sum(st.metrics.value_size_counts) == 0
    st.commit_slot("c1", slots[0][0], "k", 2)
    assert sum(st.metrics.value_size_counts) == 1
    assert st.metrics.value_size_sum == 4096


def test_effects_journal_the_commit_and_standbys_follow_the_rename() -> None:
    leader = MasterState(MasterConfig(client_ttl_s=10), rng=random.Random(4))
    leader.effects = []
    standby = MasterState(MasterConfig(client_ttl_s=10))
    journal: list[object] = []

    def sync(now: float) -> None:
        for e in leader.drain_effects():
            e = effect_from_record(e.record())  # as the stream and the journal carry it
            standby.apply(e, now)
            if isinstance(e, DURABLE):
                journal.append(e)

    leader.mount_segment("node", seg("a:1", "sa"), 0)
    slots = leader.reserve_slots("c1", 4096, 3, ONE, 1)
    leader.commit_slot("c1", slots[0][0], "k1", 2)
    renames = [e for e in leader.effects or [] if isinstance(e, WriteRenamed)]
    assert renames == [WriteRenamed(slots[0][0], "k1")]
    sync(2)
    assert standby.get_replica_list("k1", 2).replicas[0].address == slots[0][1].addr
    assert slots[1][0] in standby.inflight and slots[2][0] in standby.inflight
    # a promoted standby lets the writer commit the buffers it still holds
    standby.promote(3)
    standby.commit_slot("c1", slots[1][0], "k2", 3)
    standby.validate()
    assert standby.segments["sa"].allocator.allocated == leader.segments["sa"].allocator.allocated
    # the journal keeps the committed object only; a restart replays it
    assert {type(e).__name__ for e in journal} == {"SegmentMounted", "ObjectCommitted"}
    restored = MasterState(MasterConfig(client_ttl_s=10))
    restored.replay(journal, 10)  # type: ignore[arg-type]
    restored.validate()
    assert set(restored.objects) == {"k1"}


def test_a_segment_replacing_a_dead_one_keeps_what_others_were_writing(
    st: MasterState,
) -> None:
    """A storage node restarts under the same name while a writer holds buffers
    in its old segment: the writer may still write them (it has not noticed),
    and a new process's memory can sit at the same addresses."""
    slots = st.reserve_slots("c1", 4096, 3, ONE, 1)
    held = {obj.addr for _, obj in slots}
    st.put_start("node", "own", 4096, ONE, 1)  # the dead node's own write: not kept
    st.mount_segment("node-2", seg("a:1", "sa2"), 2)  # replaces (expires) "node"
    assert "sa" not in st.segments and "node" not in st.clients
    for i in range(40):
        st.put_start("c2", f"n{i}", 4096, ONE, 3)
        st.put_end("c2", f"n{i}", 3)
    taken = {st.objects[f"n{i}"].addr for i in range(40)}
    assert not held & taken
    st.validate()
    st.ping("c1", 2 + SLOT_TTL_S)
    st.ping("c2", 2 + SLOT_TTL_S)
    st.ping("node-2", 2 + SLOT_TTL_S)
    st.tick(2 + SLOT_TTL_S + 0.1)  # then they return to the allocator
    assert st.segments["sa2"].allocator.live_count == 40
    for name, _ in slots:  # the buffers themselves are gone with the old segment
        with pytest.raises(ObjectNotFound):
            st.commit_slot("c1", name, "k", 13)


def test_what_a_replaced_segment_keeps_is_held_no_longer_than_a_write_can_come() -> None:
    """A writer of a PutStart buffer loses it at put_start_release_timeout anyway
    (the master reclaims it): with a short timeout, a replacing segment does not
    hold the dead one's ranges for the whole SLOT_TTL_S."""
    st = MasterState(MasterConfig(client_ttl_s=10, put_start_release_timeout_s=1.0))
    st.mount_segment("node", seg("a:1", "sa"), 0)
    assert st.lost_write_hold() == 1.0
    st.put_start("c1", "w", 4096, ONE, 0.5)  # another client's write in flight
    st.mount_segment("node-2", seg("a:1", "sa2"), 1)  # replaces (expires) "node"
    held = st.segments["sa2"].allocator.allocated
    assert held > 0
    st.ping("c1", 2.1)
    st.ping("node-2", 2.1)
    st.tick(2.1)
    assert st.segments["sa2"].allocator.allocated == 0
    st.validate()
    assert MasterState().lost_write_hold() == SLOT_TTL_S
