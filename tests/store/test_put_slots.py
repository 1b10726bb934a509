"""Single puts through buffers reserved ahead (``store/_slots.py``): one master
round trip per put, the same answers as the ordinary path, and no write into a
buffer the master may have handed to someone else.

Real master (in this process, or ``mooncake_master`` subprocesses for restarts),
real clients and sockets on 127.0.0.1; every wait is bounded."""

from __future__ import annotations

import collections
import contextlib
import functools
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pymooncake.config import EngineConfig
from pymooncake.errors import InvalidParams, StoreError
from pymooncake.store import MasterConfig, ReplicateConfig, StoreClient, StoreClientConfig
from pymooncake.store._slots import (
    DEFAULT_BYTES,
    ENV,
    make_slots,
    single_places,
    slot_bytes_from_env,
    slot_runs,
)
from pymooncake.store.master._state import SLOT_PREFIX, MasterState
from pymooncake.testing import (
    LocalCluster,
    ProcessCluster,
    journaled_master_flags,
    run_threads,
    wait_until,
)
from pymooncake.wire._master_msgs import slot_name

KiB = 1 << 10
MiB = 1 << 20


def _value(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _count_calls(client: StoreClient) -> collections.Counter[str]:
    """Count the master requests ``client`` sends, by method."""
    counts: collections.Counter[str] = collections.Counter()
    call = client.master.call

    def counting(request: Any, **kw: Any) -> Any:
        counts[request.METHOD.value] += 1
        return call(request, **kw)

    client.master.call = counting  # type: ignore[method-assign]
    return counts


def _stores(client: StoreClient, key: str) -> bool:
    try:
        return client.put(key, b"p" * 100) is not None
    except Exception:  # not yet: the node has not re-mounted
        return False


def _reserved(cluster: LocalCluster) -> list[str]:
    def names(st: MasterState) -> list[str]:
        # per-buffer records, and the buffers the runs still hold (_slot_runs.py)
        held = [f"{run.head}:{i}" for run in st.slot_runs.values() for i, _, _ in run.held()]
        return [k for k in st.inflight if k.startswith(SLOT_PREFIX)] + held

    result: list[str] = cluster.master.call(names)
    return result


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(MasterConfig(client_ttl_s=5.0)) as c:
        yield c


def test_single_puts_take_one_round_trip(cluster: LocalCluster) -> None:
    node = cluster.client(32 * MiB, 4 * MiB)
    writer = cluster.client(0, 4 * MiB)
    calls = _count_calls(writer)
    values = {f"k{i}": _value(4 * KiB + i, i) for i in range(30)}
    for key, value in values.items():
        assert writer.put(key, value) is True
    # every size differs: a reservation of one buffer per put (what PutStart
    # cost), nothing left reserved
    assert calls["CommitSlot"] == calls["ReserveSlots"] == 30
    assert calls["PutStart"] == calls["PutEnd"] == 0
    assert writer.slots.held() == 0
    for key, value in values.items():
        assert node.get(key) == value
        assert writer.get(key) == value
    # equal sizes share one pool: 1+2+4+8+16 buffers for 30 puts -> 5 reservations
    calls.clear()
    for i in range(30):
        assert writer.put(f"same{i}", _value(8 * KiB, i)) is True
    assert calls["CommitSlot"] == 30 and calls["ReserveSlots"] == 5
    assert calls["PutStart"] == calls["PutEnd"] == 0
    assert writer.slots.held() == 1 + 2 + 4 + 8 + 16 - 30
    assert all(node.get(f"same{i}") == _value(8 * KiB, i) for i in range(30))


def test_batch_puts_take_one_round_trip(cluster: LocalCluster) -> None:
    node = cluster.client(32 * MiB, 4 * MiB)
    writer = cluster.client(0, 4 * MiB)
    calls = _count_calls(writer)
    stored: dict[str, bytes] = {}
    for b in range(30):
        keys = [f"b{b}-{i}" for i in range(8)]
        values = [_value(4 * KiB, b * 8 + i) for i in range(8)]
        assert writer.put_many(keys, [[v] for v in values]) == [True] * 8
        stored.update(zip(keys, values, strict=True))
    # the first batch reserves what it needs; then 16, 32, 64, 128 (8 for the
    # batch at hand each time, the rest ahead): 30 batches, 5 reservations
    assert calls["BatchCommitSlots"] == 30 and calls["ReserveSlots"] == 5
    assert calls["BatchPutStart"] == calls["BatchPutEnd"] == calls["PutStart"] == 0
    assert writer.slots.held() == 8 + 16 + 32 + 64 + 128 - 30 * 8
    assert node.get_many(list(stored)) == list(stored.values())
    assert writer.get_many(list(stored)) == list(stored.values())


def test_batch_puts_into_own_buffers_copy_each_value_directly(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose reserved buffers all lie in the writer's own segment writes
    each value with one slice assignment, without planning transfers; values a
    copy would move without the GIL (256 KiB and more) and buffers in a peer's
    segment take the general path; every value reads back."""
    from pymooncake.store._client_io import ClientIO

    planned: list[str] = []
    real = ClientIO._route_parts
    monkeypatch.setattr(
        ClientIO,
        "_route_parts",
        lambda self, i, endpoint, *a: planned.append(endpoint) or real(self, i, endpoint, *a),
    )
    own = cluster.client(32 * MiB, 4 * MiB)
    stored: dict[str, bytes] = {}
    for b in range(4):
        keys = [f"own{b}-{i}" for i in range(8)]
        values = [_value(4 * KiB, 100 + b * 8 + i) for i in range(8)]
        assert own.put_many(keys, [[v] for v in values]) == [True] * 8
        stored.update(zip(keys, values, strict=True))
    assert planned == []
    big = [_value(256 * KiB, 7), _value(256 * KiB, 8)]
    assert own.put_many(["big0", "big1"], [[v] for v in big]) == [True, True]
    assert len(planned) == 2  # large values: the general path (memmove, GIL released)
    stored.update(big0=big[0], big1=big[1])
    planned.clear()
    writer = cluster.client(0, 4 * MiB)  # no segment: the buffers are the node's
    keys = [f"peer{i}" for i in range(4)]
    values = [_value(4 * KiB, 200 + i) for i in range(4)]
    assert writer.put_many(keys, [[v] for v in values]) == [True] * 4
    assert planned == [own.engine.segment_name] * 4
    stored.update(zip(keys, values, strict=True))
    assert own.get_many(list(stored)) == list(stored.values())
    assert writer.get_many(list(stored)) == list(stored.values())


def test_batch_puts_answer_each_key_as_the_ordinary_path(cluster: LocalCluster) -> None:
    node = cluster.client(32 * MiB, 4 * MiB)
    writer = cluster.client(0, 4 * MiB)
    calls = _count_calls(writer)
    assert writer.put("old", _value(4 * KiB, 0)) is True
    keys = ["new-a", "old", "new-b"]
    values = [_value(4 * KiB, i) for i in (1, 2, 3)]
    assert writer.put_many(keys, [[v] for v in values]) == [True, False, True]
    assert calls["BatchCommitSlots"] == 1 and calls["BatchPutStart"] == 0
    assert writer.slots.held() == 1  # reserved 3 for the batch: "old"'s went back
    assert node.get_many(keys) == [values[0], _value(4 * KiB, 0), values[2]]
    # an existing key among buffers from the pool: False for it, the others stored
    assert writer.put_many(["old", "new-c"], [[values[1]], [values[2]]]) == [False, True]
    # two sizes whose pools are both short: one ordinary batch, not two reservations
    calls.clear()
    two = [_value(5 * KiB, 4), _value(6 * KiB, 5)]
    assert writer.put_many(["x5", "x6"], [[v] for v in two]) == [True, True]
    assert calls["BatchPutStart"] == 1 and "ReserveSlots" not in calls
    # a pooled size and one short size: one reservation, one commit
    calls.clear()
    mixed = [_value(4 * KiB, 6), _value(7 * KiB, 7)]
    assert writer.put_many(["m4", "m7"], [[v] for v in mixed]) == [True, True]
    assert calls["ReserveSlots"] == 1 and calls["BatchCommitSlots"] == 1
    assert "BatchPutStart" not in calls
    # more values of one size than a pool may hold: the ordinary path
    small = cluster.client(0, 4 * MiB, put_slot_bytes=64 * KiB)
    small_calls = _count_calls(small)
    many = [_value(4 * KiB, 10 + i) for i in range(17)]  # 17 x 4 KiB > 64 KiB
    assert small.put_many([f"big{i}" for i in range(17)], [[v] for v in many]) == [True] * 17
    assert small_calls["BatchPutStart"] == 1 and "ReserveSlots" not in small_calls
    assert node.get_many(["x5", "x6", "m4", "m7"]) == [*two, *mixed]
    assert node.get_many([f"big{i}" for i in range(17)]) == many


def test_a_batch_that_names_a_key_twice_writes_it_once(cluster: LocalCluster) -> None:
    """Puts keep the first value (the repeat finds it: False), upserts the last;
    neither waits for the repeat's start (it used to wait for the RPC timeout:
    the second start found the first in progress, which ends only with the batch)."""
    node = cluster.client(32 * MiB, 4 * MiB)
    for slot_bytes in (DEFAULT_BYTES, 0):  # reserved buffers and the ordinary path
        writer = cluster.client(0, 4 * MiB, put_slot_bytes=slot_bytes, rpc_timeout_s=20.0)
        p = f"s{slot_bytes}-"
        values = [_value(4 * KiB, i) for i in range(4)]
        started = time.monotonic()
        got = writer.put_many([p + "a", p + "b", p + "a", p + "a"], [[v] for v in values])
        assert got == [True, True, False, False]
        assert writer.put_many([p + "b", p + "b"], [[values[0]], [values[1]]]) == [False, False]
        writer.upsert_many([p + "u", p + "u"], [[values[2]], [values[3]]])
        assert time.monotonic() - started < 10.0  # no wait for a timeout
        assert node.get_many([p + "a", p + "b", p + "u"]) == [values[0], values[1], values[3]]
        # the first entry's error is the repeat's too
        empty = cluster.client(0, 4 * MiB, put_slot_bytes=slot_bytes)
        huge = [[b"x" * (40 * MiB)], [b"y" * (40 * MiB)]]
        results = empty.put_many([p + "big", p + "big"], huge)
        assert all(isinstance(r, StoreError) for r in results), results
        assert type(results[0]) is type(results[1])


def test_buffers_reserved_ahead_make_room_for_a_put_that_needs_it(cluster: LocalCluster) -> None:
    """Buffers reserved ahead never evict and cannot be evicted: a put that
    finds no room while its client holds some gives them back and tries again."""
    node = cluster.client(1 * MiB, 4 * MiB)
    writer = cluster.client(0, 4 * MiB)
    for b in range(2):  # batches of 4 reserve 4, then 8 (4 ahead)
        keys = [f"b{b}-{i}" for i in range(4)]
        assert writer.put_many(keys, [[_value(32 * KiB, i)] for i in range(4)]) == [True] * 4
    assert writer.slots.held() == 4
    assert writer.remove_many([f"b{b}-{i}" for b in range(2) for i in range(4)]) == [None] * 8
    calls = _count_calls(writer)
    filler = bytes(96 * KiB)
    pinned = ReplicateConfig(with_hard_pin=True)
    for i in range(10):  # 10 x 96 KiB: room for them only without the 4 x 32 KiB
        assert writer.put(f"fill{i}", filler, pinned) is True, i
    assert writer.slots.held() == 0 and not _reserved(cluster)
    assert calls["PutStart"] >= 1  # the put that found no room went the ordinary way
    assert node.get("fill9") == filler
    # remove_all empties the store and gives back what the client held reserved
    assert writer.remove_all(force=True) == 10
    for i in range(2):  # a reservation of 1, then of 2: one ahead
        writer.put(f"again{i}", _value(32 * KiB, i))
    assert writer.slots.held() == 1
    assert writer.remove_all(force=True) == 2
    assert writer.slots.held() == 0 and not _reserved(cluster)


def test_puts_into_a_full_pool_keep_taking_one_round_trip() -> None:
    """A cache's steady state: the pool is full (high watermark 1.0, as the
    reference's shipped configs).  The put that finds no room evicts what it
    needs and the master frees an eviction round at once -- not at its next tick
    (set an hour away here) -- and buffers reserved ahead use that room, so the
    puts after it take one round trip each and evict nothing more themselves."""
    config = MasterConfig(client_ttl_s=5.0, eviction_high_watermark_ratio=1.0, eviction_ratio=0.25)
    with LocalCluster(config, tick_interval_s=3600.0) as c:
        node = c.client(1 * MiB, 4 * MiB)
        writer = c.client(0, 4 * MiB)
        keys = [f"old{i}" for i in range(32)]
        assert node.put_many(keys, [[_value(32 * KiB, i)] for i in range(32)]) == [True] * 32
        state = c.master.service.state
        assert state.metrics.evicted_keys == 0
        calls = _count_calls(writer)
        assert writer.put("first", _value(4 * KiB, 99)) is True  # evicts for itself
        # the round (a quarter of the segment) is freed without waiting for a tick
        assert wait_until(lambda: state.metrics.evicted_keys >= 8, 5.0)
        evicted = state.metrics.evicted_keys
        calls.clear()
        for i in range(40):
            assert writer.put(f"new{i}", _value(4 * KiB, i)) is True
        assert calls["CommitSlot"] == 40 and calls["PutStart"] == 0
        assert calls["ReserveSlots"] <= 6  # 1, 2, 4 ... doubling, not one per put
        assert state.metrics.evicted_keys == evicted  # the room was there
        assert all(node.get(f"new{i}") == _value(4 * KiB, i) for i in range(40))


def test_an_existing_key_answers_false_and_keeps_the_buffer(cluster: LocalCluster) -> None:
    node = cluster.client(32 * MiB, 4 * MiB)
    writer = cluster.client(0, 4 * MiB)
    assert writer.put("k", _value(4 * KiB, 1)) is True
    calls = _count_calls(writer)
    assert writer.put("k", _value(4 * KiB, 2)) is False  # immutable, as before
    assert calls == {"ReserveSlots": 1, "CommitSlot": 1}  # reserved 2: one for now
    assert writer.slots.held() == 2  # the buffer it wrote waits for the next put
    assert node.get("k") == _value(4 * KiB, 1)
    assert writer.put("k2", _value(4 * KiB, 3)) is True
    assert writer.put("k3", _value(4 * KiB, 4)) is True
    assert calls == {"ReserveSlots": 1, "CommitSlot": 3} and writer.slots.held() == 0
    assert node.get("k2") == _value(4 * KiB, 3)
    assert node.get("k3") == _value(4 * KiB, 4)


def test_large_values_configs_and_off_take_their_paths(cluster: LocalCluster) -> None:
    node = cluster.client(64 * MiB, 16 * MiB)
    small = cluster.client(0, 16 * MiB, put_slot_bytes=64 * KiB)
    calls = _count_calls(small)
    assert small.put("big", _value(40 * KiB, 1)) is True  # above half of the pool
    assert calls["PutStart"] == 1 and calls["CommitSlot"] == 0
    assert small.put("small", _value(20 * KiB, 2)) is True
    assert calls["CommitSlot"] == 1
    # a config is part of the pool: two replicas on two segments, via a buffer
    cluster.client(64 * MiB, 4 * MiB)
    two = ReplicateConfig(replica_num=2)
    assert small.put("two", _value(20 * KiB, 3), two) is True
    assert calls["CommitSlot"] == 2
    assert len({r.segment_id for r in small.replicas("two")}) == 2
    off = cluster.client(0, 4 * MiB, put_slot_bytes=0)
    off_calls = _count_calls(off)
    assert off.put("plain", _value(4 * KiB, 4)) is True
    assert off_calls["PutStart"] == 1 and "ReserveSlots" not in off_calls
    for key, value in (("big", 40 * KiB), ("small", 20 * KiB), ("two", 20 * KiB)):
        assert len(node.get(key)) == value
    assert node.get("plain") == _value(4 * KiB, 4)


def test_close_and_the_heartbeat_give_buffers_back() -> None:
    # put_start_release_timeout 2 s: a buffer may be used for 1 s less a margin
    with LocalCluster(MasterConfig(client_ttl_s=5.0, put_start_release_timeout_s=2.0)) as c:
        c.client(32 * MiB, 4 * MiB)
        writer = c.client(0, 4 * MiB, ping_interval_s=0.1)
        for i in range(4):  # reservations of 1, 2 (one ahead), -, 4 (three ahead)
            writer.put(f"k{i}", _value(4 * KiB, i))
        assert writer.slots.held() == 3 and len(_reserved(c)) == 3
        # unused buffers past their deadline are revoked by the heartbeat
        assert wait_until(lambda: not _reserved(c), 3.0), _reserved(c)
        assert writer.slots.held() == 0
        assert writer.put("later", _value(4 * KiB, 9)) is True  # reserves anew
        assert _reserved(c)
        writer.close()
        assert _reserved(c) == []  # close revoked what it held


def test_threads_sharing_one_pool(cluster: LocalCluster) -> None:
    """Four threads put values of one size through one client (one pool of
    reserved buffers, refilled by whichever put finds it empty): every value is
    stored intact, each put took one commit, and nothing stays reserved after
    close."""
    node = cluster.client(64 * MiB, 4 * MiB)
    writer = cluster.client(0, 4 * MiB, put_slot_bytes=1 * MiB)
    calls = _count_calls(writer)
    size = 64 * KiB

    def worker(t: int) -> None:
        for i in range(40):
            assert writer.put(f"t{t}-{i}", _value(size, t * 1000 + i)) is True

    run_threads([functools.partial(worker, t) for t in range(4)])
    assert calls["CommitSlot"] == 160 and calls["PutStart"] == 0
    for t in range(4):
        keys = [f"t{t}-{i}" for i in range(40)]
        assert node.get_many(keys) == [_value(size, t * 1000 + i) for i in range(40)]
    writer.close()
    assert _reserved(cluster) == []
    cluster.master.call(lambda st: st.validate())


def test_a_buffer_whose_holder_left_sends_the_put_elsewhere(cluster: LocalCluster) -> None:
    a = cluster.client(32 * MiB, 4 * MiB)
    writer = cluster.client(0, 4 * MiB)
    assert writer.put("first", _value(4 * KiB, 1)) is True
    assert writer.put("first-b", _value(4 * KiB, 1)) is True
    assert writer.slots.held() == 1
    b = cluster.client(32 * MiB, 4 * MiB)
    a.close()  # the buffers the writer holds were in a's segment
    assert writer.put("second", _value(4 * KiB, 2)) is True
    assert b.get("second") == _value(4 * KiB, 2)
    with pytest.raises(Exception):  # noqa: B017 - gone with a's segment
        b.get("first")


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert slot_bytes_from_env({}) == DEFAULT_BYTES
    assert slot_bytes_from_env({ENV: "0"}) == 0
    assert slot_bytes_from_env({ENV: "1048576"}) == MiB
    for bad in ("-1", "4MiB", "1.5"):
        with pytest.raises(InvalidParams, match=ENV):
            slot_bytes_from_env({ENV: bad})
    monkeypatch.setenv(ENV, "0")
    assert StoreClientConfig(local_hostname="h").put_slot_bytes == 0


def test_slots_of_a_reservation_are_built_per_segment() -> None:
    """Each buffer gets its own name, the endpoint of its segment and its address
    (one segment, or several), the deadline, and its reservation and index."""
    names = ["b:0", "b:1", "b:2"]
    one = make_slots(names, single_places(["h:1"], [0, 0, 0], [64, 128, 192]), 5.0, "b")
    assert one == [
        ("b:0", (("h:1", 64),), 5.0, "b", 0),
        ("b:1", (("h:1", 128),), 5.0, "b", 1),
        ("b:2", (("h:1", 192),), 5.0, "b", 2),
    ]
    two = make_slots(names, single_places(["h:1", "h:2"], [1, 0, 1], [64, 128, 192]), 7.0, "b")
    assert [s[1] for s in two] == [(("h:2", 64),), (("h:1", 128),), (("h:2", 192),)]


def test_a_batch_commit_names_its_buffers_by_runs() -> None:
    """Buffers taken in order from reservations travel as runs; one given back
    and taken again out of order starts a run of its own."""
    slots = [
        make_slots([""] * 4, single_places(["h:1"], [0] * 4, [0] * 4), 1.0, "7"),
        make_slots([""] * 4, single_places(["h:1"], [0] * 4, [0] * 4), 1.0, "8"),
    ]
    taken = [slots[0][3], *slots[0][1:3], *slots[1][:2]]
    runs = slot_runs("c", taken)
    assert runs.runs == (("7", 3, 1), ("7", 1, 2), ("8", 0, 2)) and len(runs) == 5
    assert list(runs) == [
        slot_name("c", b, i) for b, i in [("7", 3), ("7", 1), ("7", 2), ("8", 0), ("8", 1)]
    ]


# --- a master that restarts -------------------------------------------------------


def _engine() -> EngineConfig:
    return EngineConfig(
        tcp_bind_address="127.0.0.1",
        transfer_timeout_s=10.0,
        connect_timeout_s=2.0,
        rpc_io_timeout_s=5.0,
    )


def _process_client(cluster: ProcessCluster) -> StoreClient:
    return StoreClient(
        cluster.client_config(
            local_buffer_size=4 * MiB,
            rpc_timeout_s=10.0,
            rpc_connect_timeout_s=2.0,
            ping_interval_s=5.0,  # no heartbeat in between: the put itself must notice
            engine=_engine(),
        )
    )


def test_a_restarted_master_never_sees_a_write_into_a_lost_buffer(tmp_path: Any) -> None:
    """The writer holds buffers the master forgets in a restart (writes in flight
    are not journaled).  Another client then fills the same memory with new
    objects.  The writer's next puts must not land in its old buffers: every
    object stays intact."""
    flags = journaled_master_flags(tmp_path / "journal", "--client_ttl=5")
    with ProcessCluster(flags) as cluster, contextlib.ExitStack() as stack:
        cluster.node("4 MB")
        writer = stack.enter_context(_process_client(cluster))
        other = stack.enter_context(_process_client(cluster))
        size = 64 * KiB
        for i in range(5):  # reservations of 1, 2 and 4: 2 left
            assert writer.put(f"w{i}", _value(size, i)) is True
        assert writer.slots.held() == 2
        cluster.restart_master()  # SIGKILL; the journal keeps w0..w4
        # the storage node mounts its segment again (its heartbeat: NEED_REMOUNT)
        assert wait_until(lambda: _stores(other, "probe"), 15.0)
        # the other client fills the segment: its new objects take the ranges of
        # the writer's forgotten buffers
        for i in range(40):
            try:
                other.put(f"o{i}", _value(size, 100 + i))
            except Exception:
                break
        stored_other = [i for i in range(40) if other.exists(f"o{i}")]
        assert stored_other, "the other client could not store anything"
        for i in range(5, 12):
            try:
                writer.put(f"w{i}", _value(size, i))
            except Exception:
                pass
        for i in stored_other:
            assert other.get(f"o{i}") == _value(size, 100 + i), f"o{i} was overwritten"
        for i in range(12):
            if writer.exists(f"w{i}"):
                assert writer.get(f"w{i}") == _value(size, i)
