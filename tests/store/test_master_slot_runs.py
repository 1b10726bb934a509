"""Reservations held as one record (``_slot_runs.py``): what the master keeps,
what a commit makes of a run, and that everything else meets per-buffer records.

MasterState and the request handlers with an injected clock; every scenario ends
with ``validate()`` (which checks each run and counts its ranges as allocated)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from pymooncake.errors import ObjectExists, ObjectNotFound, ReplicaNotReady
from pymooncake.store._config import MasterConfig
from pymooncake.store._types import ErrorCode, ReplicateConfig, SegmentInfo, SoftPinAction
from pymooncake.store.master import _slot_runs
from pymooncake.store.master._allocator import OffsetAllocator
from pymooncake.store.master._handlers import build_handlers
from pymooncake.store.master._records import BUSY, HARD_PIN, READABLE
from pymooncake.store.master._service import RUN_SAFE, MasterService
from pymooncake.store.master._state import SLOT_PREFIX, MasterState
from pymooncake.wire import _master_msgs as msg
from pymooncake.wire import _master_reply_msgs as rp

MiB = 1 << 20
ONE = ReplicateConfig()


def seg(name: str, sid: str, base: int, size: int = 16 * MiB) -> SegmentInfo:
    return SegmentInfo(id=sid, name=name, base=base, size=size, host_id=name.split(":")[0])


@pytest.fixture
def st() -> Iterator[MasterState]:
    s = MasterState(MasterConfig(client_ttl_s=10), rng=random.Random(7))
    s.mount_segment("node", seg("a:1", "sa", 0x10000000), 0)
    yield s
    s.validate()


def _reserve(st: MasterState, client: str, count: int, batch: str, size: int = 4096) -> list:
    """ReserveSlots through its handler: the (name, (endpoint, address)) of each buffer."""
    handlers = build_handlers(st)
    req = msg.ReserveSlots(client, size, count, batch, msg.ReplicateParams())
    reply = handlers[msg.ReserveSlots](req, 1.0)
    assert isinstance(reply, rp.ReserveSlotsReply)
    names = msg.slot_names(client, batch, len(reply))
    return [(n, p[0]) for n, p in zip(names, reply.columns.placements(), strict=True)]


def test_a_reservation_is_one_record_until_committed(st: MasterState) -> None:
    got = _reserve(st, "c1", 8, "1")
    assert len(got) == 8 and len(st.slot_runs) == 1
    # no per-buffer record, index entry or client entry; the allocator holds eight
    assert not st.inflight and not st.clients["c1"].inflight and len(st.objects) == 0
    alloc = st.segments["sa"].allocator
    assert alloc.live_count == 8 and alloc.allocated == 8 * 4096
    addrs = [where[1] for _, where in got]
    assert addrs == [addrs[0] + i * 4096 for i in range(8)]
    assert {where[0] for _, where in got} == {"a:1"}
    assert st.slots_held() == 8 and st.key_count() == 0
    st.validate()


def test_commits_make_readable_keys_at_the_reserved_addresses(st: MasterState) -> None:
    got = _reserve(st, "c1", 4, "1")
    st.commit_slot("c1", got[2][0], "single", 2)
    out = st.commit_slots_many("c1", [got[0][0], got[3][0]], ["a", "b"], 2)
    assert out == [None, None]
    for key, (_, (_, addr)) in (("single", got[2]), ("a", got[0]), ("b", got[3])):
        found = st.get_replica_list(key, 3)
        assert found.size == 4096 and [r.address for r in found.replicas] == [addr]
        assert st.objects[key].flags & (READABLE | BUSY | HARD_PIN) == READABLE
    assert st.key_count() == 3 and st.slots_held() == 1
    assert st.metrics.value_size_counts[0] == 3  # (each commit counts the value)
    st.validate()
    st.commit_slot("c1", got[1][0], "last", 4)
    assert not st.slot_runs  # the run is gone with its last buffer
    # the committed objects are ordinary: removable, evictable, their memory freed
    st.remove("a", True, 5)
    assert st.segments["sa"].allocator.live_count == 3
    st.validate()


def test_refused_commits_leave_the_buffer_reserved(st: MasterState) -> None:
    got = _reserve(st, "c1", 3, "1")
    st.put_start("w", "busy", 10, ONE, 1)
    (n0, _), (n1, _), (n2, _) = got
    st.commit_slot("c1", n0, "k", 2)
    with pytest.raises(ObjectExists):
        st.commit_slot("c1", n1, "k", 2)
    with pytest.raises(ReplicaNotReady):
        st.commit_slot("c1", n1, "busy", 2)
    out = st.commit_slots_many("c1", [n1, n2], ["k", "busy"], 2)
    assert [type(e) for e in out] == [ObjectExists, ReplicaNotReady]
    assert st.slots_held() == 2
    # names a run never gave out, another client, a buffer already committed
    for client, name in (
        ("c1", n0),
        ("c2", n1),
        ("c1", f"{n1[:-1]}3"),
        ("c1", f"{n1[:-1]}01"),
        ("c1", f"{n1[:-1]}x"),
        ("c1", f"{n1[:-1]}-1"),
        ("c1", msg.slot_name("c1", "9", 0)),
    ):
        with pytest.raises(ObjectNotFound, match="ordinary way"):
            st.commit_slot(client, name, "other", 2)
        assert st.commit_slots_many(client, [name, name], ["o1", "o2"], 2)[0] is not None
    st.commit_slots_many("c1", [n1, n2], ["x", "y"], 3)
    assert not st.slot_runs and st.key_count() == 4  # k, busy (in progress), x, y
    st.validate()


def _runs(client: str, names: list[str]) -> msg.SlotRuns:
    """``names`` (buffers of ``client``'s reservations) as a client's batch commit names them."""
    head = f"{SLOT_PREFIX}{client}:"
    pairs = [n[len(head) :].rpartition(":") for n in names]
    return msg.SlotRuns.of(client, [(b, int(i)) for b, _, i in pairs])


def test_a_commit_named_by_runs_answers_as_one_named_by_buffers() -> None:
    """The same commits, named by runs of the client's reservations and by
    buffer names, on two copies of one state: the same answers and keys, also
    for a buffer committed twice, a key that exists, a run past the reservation's
    end, runs of reservations that were spilled into per-buffer records, one of
    a reservation the master never made, and runs that name another client."""

    def scenario(by_runs: bool) -> tuple[list[int], dict[str, int]]:
        st = MasterState(MasterConfig(client_ttl_s=10), rng=random.Random(7))
        st.mount_segment("node", seg("a:1", "sa", 0x10000000), 0)
        first = [n for n, _ in _reserve(st, "c1", 4, "1")]
        second = [n for n, _ in _reserve(st, "c1", 3, "2")]
        _slot_runs.spill(st)  # reservations 1 and 2 become per-buffer records ...
        third = [n for n, _ in _reserve(st, "c1", 4, "3")]  # ... and 3 stays a run
        st.put_start("w", "busy", 10, ONE, 1)
        codes: list[int] = []

        def commit(client: str, names: list[str], keys: list[str]) -> None:
            named = _runs(client, names) if by_runs else names
            out = st.commit_slots_many(client, named, keys, 2)
            codes.extend(0 if e is None else e.code for e in out)

        commit("c1", [*first[:3], third[1], *second[:2]], ["a", "b", "c", "d", "e", "f"])
        commit("c1", [first[0], first[3], third[2]], ["g", "a", "busy"])  # taken, exists, busy
        commit("c1", [msg.slot_name("c1", "1", 5), msg.slot_name("c1", "9", 0)], ["h", "i"])
        commit("c2", [msg.slot_name("c2", "3", 0)], ["j"])  # c2 reserved nothing
        commit("c1", [third[3], second[2], third[0]], ["k", "l", "m"])
        st.validate()
        keys = {k: st.objects[k].addr for k in "abcdefghijklm" if k in st.objects}
        return codes, keys

    assert scenario(by_runs=True) == scenario(by_runs=False)
    codes, keys = scenario(by_runs=True)
    assert codes[:6] == [0] * 6 and codes[-3:] == [0] * 3 and len(keys) == 9
    assert codes[6:9] == [
        int(ErrorCode.OBJECT_NOT_FOUND),
        int(ErrorCode.OBJECT_ALREADY_EXISTS),
        int(ErrorCode.REPLICA_IS_NOT_READY),
    ]


def test_spilled_runs_are_the_per_buffer_writes_a_reservation_made_before(
    st: MasterState,
) -> None:
    got = _reserve(st, "c1", 5, "1")
    st.commit_slot("c1", got[1][0], "k1", 2)
    st.spill_slot_runs()
    assert not st.slot_runs
    left = [n for i, (n, _) in enumerate(got) if i != 1]
    assert list(st.inflight) == left and st.clients["c1"].inflight == set(left)
    for name, (_, addr) in (got[0], got[2], got[3], got[4]):
        obj = st.objects[name]
        assert obj.addr == addr and obj.flags == BUSY and obj.writer == "c1"
        assert obj.ext is not None and obj.ext.started_at == 1.0  # the reservation's time
    st.validate()
    # they commit, revoke and expire as per-buffer reservations do
    st.commit_slots_many("c1", [got[0][0]], ["k0"], 3)
    st.put_revoke("c1", got[2][0], 3)
    assert st.objects["k0"].addr == got[0][1][1] and got[2][0] not in st.objects
    later = 1.0 + st.config.put_start_release_timeout_s + 1
    for client in list(st.clients):
        st.ping(client, later)
    st.tick(later)
    assert st.slots_held() == 0 and st.key_count() == 2
    st.validate()


def _state() -> MasterState:
    s = MasterState(MasterConfig(client_ttl_s=10), rng=random.Random(7))
    s.mount_segment("node", seg("a:1", "sa", 0x10000000), 0)
    return s


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.put_revoke("c1", msg.slot_name("c1", "1", 0), 2),
        lambda s: s.tick(2),
        lambda s: s.expire_client("c1", 2),
        lambda s: s.unmount_segment("node", "sa", 2),
        lambda s: s.snapshot_effects(),
        lambda s: s.shard_effects(0, writes=True),
        lambda s: s.remove_all(True, 2),
    ],
    ids=["revoke", "tick", "expire", "unmount", "snapshot", "shard", "remove_all"],
)
def test_whatever_looks_at_writes_in_progress_spills_first(call: object) -> None:
    s = _state()
    _reserve(s, "c1", 3, "1")
    assert s.slot_runs
    call(s)  # type: ignore[operator]
    assert not s.slot_runs
    s.validate()


def test_the_service_spills_before_every_request_but_the_safe_ones() -> None:
    svc = MasterService(MasterConfig(client_ttl_s=10), metrics_port=None)
    svc.state.mount_segment("node", seg("a:1", "sa", 0x10000000), 0)
    params = msg.ReplicateParams()
    code, _ = svc.dispatch(msg.ReserveSlots("c1", 4096, 4, "1", params))
    assert code == 0 and len(svc.state.slot_runs) == 1
    for req in (
        msg.ExistKey("k"),
        msg.GetReplicaList("k"),
        msg.PutStart("c2", "k", 10, params),
        msg.PutEnd("c2", "k"),
        msg.Remove("k", True),
        msg.BatchCommitSlots("c1", (msg.slot_name("c1", "1", 0),), ("k0",)),
        msg.Ping("c1"),
    ):
        assert type(req) in RUN_SAFE
        svc.dispatch(req)
        assert svc.state.slot_runs, req
    assert svc.state.slots_held() == 3
    code, _ = svc.dispatch(msg.PutRevoke("c1", msg.slot_name("c1", "1", 1)))
    assert code == 0 and not svc.state.slot_runs and svc.state.slots_held() == 2
    svc.state.validate()


def test_several_segments_each_hold_a_part_drawn_as_puts_draw(st: MasterState) -> None:
    st.mount_segment("node", seg("b:1", "sb", 0x40000000), 0)
    st.mount_segment("node", seg("c:1", "sc", 0x70000000), 0)
    got = _reserve(st, "c1", 240, "1", size=1000)
    (run,) = st.slot_runs.values()
    assert len(run.parts) == 3 and run.stride == 1024
    by_seg: dict[str, list[int]] = {}
    for _, (endpoint, addr) in got:
        by_seg.setdefault(endpoint, []).append(addr)
    assert sorted(by_seg) == ["a:1", "b:1", "c:1"]
    for addrs in by_seg.values():  # each segment's part: adjacent buffers, in order
        assert addrs == [addrs[0] + i * 1024 for i in range(len(addrs))]
        assert len(addrs) > 40  # (a fair draw: ~80 each)
    st.validate()
    names = [n for n, _ in got]
    st.commit_slots_many("c1", names[::7], [f"k{i}" for i in range(len(names[::7]))], 2)
    for i, (_, (endpoint, addr)) in enumerate(got[::7]):
        (replica,) = st.get_replica_list(f"k{i}", 3).replicas
        assert replica.address == addr and st.objects[f"k{i}"].seg.name == endpoint  # type: ignore[union-attr]
    st.validate()
    st.spill_slot_runs()
    st.validate()


def test_reservations_that_cannot_be_a_run_are_per_buffer_records(st: MasterState) -> None:
    pinned = msg.ReplicateParams(soft_pin_action=int(SoftPinAction.ENABLE))
    handlers = build_handlers(st)
    for client, req in (
        ("c1", msg.ReserveSlots("c1", 4096, 1, "1", msg.ReplicateParams())),  # one buffer
        ("c2", msg.ReserveSlots("c2", 4096, 3, "1", pinned)),  # a soft pin, applied at commit
        ("c3", msg.ReserveSlots("c3", 4096, 3, "1", msg.ReplicateParams(replica_num=2))),
    ):
        reply = handlers[msg.ReserveSlots](req, 1.0)
        assert len(reply) >= 1 and not st.slot_runs, req  # type: ignore[arg-type]
        assert msg.slot_name(client, "1", 0) in st.inflight
    st.effects = []  # a journal or HA records effects: their records are the reservation
    _reserve(st, "c4", 3, "1")
    assert not st.slot_runs and msg.slot_name("c4", "1", 2) in st.inflight
    st.effects = None
    # a hard pin is kept by the run and given to the committed object
    hard = msg.ReplicateParams(with_hard_pin=True)
    reply = handlers[msg.ReserveSlots](msg.ReserveSlots("c5", 4096, 2, "1", hard), 1.0)
    assert len(reply) == 2 and len(st.slot_runs) == 1  # type: ignore[arg-type]
    st.commit_slot("c5", msg.slot_name("c5", "1", 0), "pinned", 2)
    assert st.objects["pinned"].flags & (READABLE | BUSY | HARD_PIN) == READABLE | HARD_PIN


def _fragment(allocator: OffsetAllocator) -> None:
    """Every other 4 KiB buffer of a 64-buffer segment taken: half of it free, no
    two adjacent buffers free."""
    taken = [allocator.allocate(4096) for _ in range(64)]
    for i, got in enumerate(taken):
        assert got is not None
        if i % 2:
            allocator.free(*got)


def test_a_segment_without_adjacent_room_gives_back_what_was_taken() -> None:
    st = MasterState(MasterConfig(client_ttl_s=10), rng=random.Random(3))
    st.mount_segment("node", seg("a:1", "sa", 0x10000000, 64 * 4096), 0)
    st.mount_segment("node", seg("b:1", "sb", 0x40000000, 64 * 4096), 0)
    b = st.segments["sb"].allocator
    _fragment(b)
    live_before = (st.segments["sa"].allocator.live_count, b.live_count)
    run = st.reserve_slot_run("c1", 4096, 8, ONE, 1.0, "1")
    assert run is None and not st.slot_runs
    assert (st.segments["sa"].allocator.live_count, b.live_count) == live_before
    st.segments["sa"].allocator.validate()
    b.validate()


def test_a_lone_segment_without_adjacent_room_leaves_it_to_the_per_buffer_path() -> None:
    """The segment drawn first (here the only one) has the bytes but no adjacent
    room: nothing was taken yet, and the reservation is made buffer by buffer
    (this once raised out of the give-back loop: an internal error answered to
    the client's ReserveSlots)."""
    st = MasterState(MasterConfig(client_ttl_s=10), rng=random.Random(3))
    st.mount_segment("node", seg("a:1", "sa", 0x10000000, 64 * 4096), 0)
    a = st.segments["sa"].allocator
    _fragment(a)
    live_before = a.live_count
    assert st.reserve_slot_run("c1", 4096, 8, ONE, 1.0, "1") is None
    assert not st.slot_runs and a.live_count == live_before
    slots = st.reserve_slots("c1", 4096, 8, ONE, 1.0, "1")
    assert len(slots) == 8 and a.live_count == live_before + 8
    a.validate()  # (the test's own allocations have no records: no st.validate())


def test_the_runs_validate_checks_what_it_counts(st: MasterState) -> None:
    _reserve(st, "c1", 4, "1")
    (run,) = st.slot_runs.values()
    run.free[1] = 0  # a buffer neither committed nor reserved: its range is leaked
    with pytest.raises(AssertionError):
        st.validate()
    run.free[1] = 1
    st.validate()
    assert run.head.startswith(SLOT_PREFIX) and _slot_runs.held_count(st) == 4
