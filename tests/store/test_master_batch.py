"""Batch starts and ends of the master (``put_start_many``/``put_end_many``, the
BatchPutStart/BatchPutEnd handlers) against the same keys put one by one, and the
allocator runs they reserve."""

from __future__ import annotations

import random

import pytest

from pymooncake.errors import StoreError
from pymooncake.store._config import MasterConfig
from pymooncake.store._types import ErrorCode, ReplicateConfig, SegmentInfo
from pymooncake.store.master._allocator import OffsetAllocator
from pymooncake.store.master._handlers import build_handlers
from pymooncake.store.master._records import BUSY, READABLE
from pymooncake.store.master._state import MasterState
from pymooncake.wire import _master_msgs as msg

KiB = 1024
ONE = ReplicateConfig()


def _state(segments: int, seg_bytes: int = 1 << 20) -> MasterState:
    st = MasterState(MasterConfig(client_ttl_s=10), rng=random.Random(3))
    st.effects = []
    for i in range(segments):
        info = SegmentInfo(f"s{i}", f"host{i}:1", 0x1000_0000 * (i + 1), seg_bytes, f"host{i}")
        st.mount_segment(f"c{i}", info, 0)
    return st


def _code(result: object) -> int:
    return result.code if isinstance(result, StoreError) else 0


def _one_by_one(st: MasterState, client: str, keys: list[str], sizes: list[int]) -> list[int]:
    codes = []
    for key, size in zip(keys, sizes, strict=True):
        try:
            st.put_start_replicas(client, key, size, ONE, 1.0)
            codes.append(0)
        except StoreError as exc:
            codes.append(exc.code)
    return codes


def _placed(st: MasterState) -> dict[str, tuple[str, int, int, int]]:
    out = {}
    for key, obj in st.objects.items():
        assert obj.seg is not None
        out[key] = (obj.seg.id, obj.addr, obj.size, obj.flags)
    return out


@pytest.mark.parametrize("segments", [1, 3])
def test_a_batch_start_places_every_key_as_one_by_one_starts_would(segments: int) -> None:
    keys = [f"k{i}" for i in range(200)]
    sizes = [64 + (i % 5) * 1000 for i in range(200)]
    batch, single = _state(segments), _state(segments)
    out = batch.put_start_many("w", keys, sizes, ONE, 1.0)
    assert [_code(o) for o in out] == _one_by_one(single, "w", keys, sizes) == [0] * 200
    # the same draws, and in a roomy segment the same addresses (a run carved in
    # order is what best fit hands out one key at a time)
    assert _placed(batch) == _placed(single)
    assert [e.record() for e in batch.drain_effects()] == [
        e.record() for e in single.drain_effects()
    ]
    assert batch.metrics.value_size_counts == single.metrics.value_size_counts
    assert batch.metrics.value_size_sum == single.metrics.value_size_sum
    assert list(batch.inflight) == list(single.inflight) == keys
    assert batch.clients["w"].inflight == set(keys)
    batch.validate()
    single.validate()


def test_keys_a_batch_cannot_place_fast_get_the_answer_of_a_put_alone() -> None:
    batch, single = _state(2), _state(2)
    for st in (batch, single):
        st.put_start("w", "done", 100, ONE, 0.5)
        st.put_end("w", "done", 0.5)
        st.put_start("other", "writing", 100, ONE, 0.5)
    keys = ["a", "done", "writing", "b", "a", "", "zero", "c"]
    sizes = [10, 10, 10, 10, 10, 10, 0, 10]
    out = batch.put_start_many("w", keys, sizes, ONE, 1.0)
    codes = [_code(o) for o in out]
    assert codes == _one_by_one(single, "w", keys, sizes)
    assert codes == [
        0,
        ErrorCode.OBJECT_ALREADY_EXISTS,
        ErrorCode.REPLICA_IS_NOT_READY,
        0,
        ErrorCode.REPLICA_IS_NOT_READY,  # repeated: the first "a" is being written
        ErrorCode.INVALID_PARAMS,
        ErrorCode.INVALID_PARAMS,
        0,
    ]
    assert _placed(batch) == _placed(single)
    batch.validate()


def test_a_batch_upsert_places_and_replaces_as_one_by_one_upserts_would() -> None:
    """BatchUpsertStart: new keys take the put fast path (an upsert of an absent
    key is a put), existing ones are replaced one by one; the end of either is
    put_end_many's (``upsert_end`` is ``put_end``)."""
    batch, single = _state(2), _state(2)
    for st in (batch, single):
        for key in ("old1", "old2"):
            st.put_start("w", key, 100, ONE, 0.5)
            st.put_end("w", key, 0.5)
        st.put_start("other", "writing", 100, ONE, 0.5)
        st.drain_effects()
    keys = ["n1", "old1", "n2", "writing", "n1", "old2", "n3", ""]
    sizes = [10, 200, 10, 10, 10, 300, 10, 10]
    out = batch.upsert_start_many("w", keys, sizes, ONE, 1.0)
    expected = []
    for key, size in zip(keys, sizes, strict=True):
        try:
            single.upsert_start_replicas("w", key, size, ONE, 1.0)
            expected.append(0)
        except StoreError as exc:
            expected.append(exc.code)
    assert (
        [_code(o) for o in out]
        == expected
        == [
            0,
            0,
            0,
            ErrorCode.OBJECT_REPLICA_BUSY,  # another client's write in flight
            ErrorCode.OBJECT_REPLICA_BUSY,  # repeated: this batch writes it already
            0,
            0,
            ErrorCode.INVALID_PARAMS,
        ]
    )

    # (where each key lands may differ: the batch draws the new keys' segments
    # before the replacements draw theirs, one by one they interleave)
    def shape(st: MasterState) -> dict[str, tuple[int, int]]:
        return {k: (o.size, o.flags) for k, o in st.objects.items()}

    def kinds(st: MasterState) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in (e.record() for e in st.drain_effects())]

    assert shape(batch) == shape(single)
    assert kinds(batch) == kinds(single)
    started = ["n1", "old1", "n2", "old2", "n3"]
    for st in (batch, single):
        assert st.put_end_many("w", started, 2.0) == [None] * 5
        assert st.objects["old1"].size == 200 and st.objects["old2"].size == 300
        assert all(st.objects[k].flags & (READABLE | BUSY) == READABLE for k in started)
        st.validate()
    assert shape(batch) == shape(single)
    assert kinds(batch) == kinds(single)


def test_a_batch_upsert_handler_answers_per_key() -> None:
    st = _state(1)
    handlers = build_handlers(st)
    start = handlers[msg.BatchUpsertStart]
    end = handlers[msg.BatchUpsertEnd]
    keys = ("u1", "u2", "u1")
    reply = start(msg.BatchUpsertStart("w", keys, (64, 64, 64), msg.ReplicateParams()), 1.0)
    assert list(reply.columns.code) == [0, 0, ErrorCode.OBJECT_REPLICA_BUSY]
    done = end(msg.BatchUpsertEnd("w", ("u1", "u2", "nope")), 1.0)
    assert list(done.codes) == [0, 0, ErrorCode.OBJECT_NOT_FOUND]
    replaced = start(msg.BatchUpsertStart("w", ("u1",), (128,), msg.ReplicateParams()), 2.0)
    assert list(replaced.columns.code) == [0]
    assert list(end(msg.BatchUpsertEnd("w", ("u1",)), 2.0).codes) == [0]
    assert st.objects["u1"].size == 128
    st.validate()


def test_a_bad_config_refuses_every_key_with_its_own_error() -> None:
    st = _state(1)
    bad = ReplicateConfig(replica_num=0)
    out = st.put_start_many("w", ["a", "b"], [10, 10], bad, 1.0)
    assert [_code(o) for o in out] == [ErrorCode.INVALID_PARAMS] * 2
    assert "replica_num" in str(out[0])
    assert len(st.objects) == 0
    st.validate()


def test_a_run_that_does_not_fit_falls_back_to_best_fit_and_eviction() -> None:
    st = _state(1, seg_bytes=64 * KiB)
    # fragment the segment: 16 objects of 4 KiB, every other one removed
    for i in range(16):
        st.put_start("w", f"old{i}", 4 * KiB, ONE, 0.5)
        st.put_end("w", f"old{i}", 0.5)
    for i in range(0, 16, 2):
        st.remove(f"old{i}", True, 0.5)
    seg = next(iter(st.segments.values()))
    assert seg.allocator.largest_free == 4 * KiB
    # eight 4-KiB holes: a run of eight cannot be reserved, each key still fits one
    out = st.put_start_many("w", [f"new{i}" for i in range(8)], [4 * KiB] * 8, ONE, 1.0)
    assert [_code(o) for o in out] == [0] * 8
    assert seg.allocator.free_bytes == 0
    st.validate()
    # the pool is full: the next batch evicts (old objects, never the writes in flight)
    st.put_end_many("w", [f"new{i}" for i in range(8)], 1.0)
    out = st.put_start_many("w", ["x", "y"], [4 * KiB, 4 * KiB], ONE, 2.0)
    assert [_code(o) for o in out] == [0, 0]
    assert st.metrics.evicted_keys >= 2
    st.validate()


def test_a_batch_end_answers_each_key_as_put_end_would() -> None:
    st = _state(2)
    st.put_start_many("w", ["a", "b", "pinned"], [10, 10, 10], ONE, 1.0)
    st.put_start("w", "pinned2", 10, ReplicateConfig(soft_pin_action=1, soft_pin_ttl_ms=1000), 1.0)
    st.put_start("w", "two", 10, ReplicateConfig(replica_num=2), 1.0)
    st.put_start("other", "theirs", 10, ONE, 1.0)
    st.drain_effects()
    keys = ["a", "pinned2", "two", "theirs", "missing", "a", "b"]
    out = st.put_end_many("w", keys, 2.0)
    assert [0 if e is None else e.code for e in out] == [
        0,
        0,
        0,
        ErrorCode.ILLEGAL_CLIENT,
        ErrorCode.OBJECT_NOT_FOUND,
        0,  # a repeated end is harmless
        0,
    ]
    for key in ("a", "b", "pinned2", "two"):
        assert st.objects[key].flags & (READABLE | BUSY) == READABLE
    assert st.objects["theirs"].flags & BUSY
    assert set(st.inflight) == {"pinned", "theirs"}
    assert st.clients["w"].inflight == {"pinned"}
    committed = [e.record()[1] for e in st.drain_effects()]
    assert committed == ["a", "pinned2", "two", "b"]
    st.validate()


def test_the_handlers_answer_batches_in_columns_with_per_key_errors() -> None:
    st = _state(1)
    handlers = build_handlers(st)
    params = ONE.to_params()
    st.put_start("w", "dup", 10, ONE, 0.5)
    st.put_end("w", "dup", 0.5)
    start = handlers[msg.BatchPutStart](
        msg.BatchPutStart("w", ("a", "dup", "b"), (10, 10, 10), params), 1.0
    )
    cols = start.columns  # type: ignore[attr-defined]
    assert cols.code == [0, ErrorCode.OBJECT_ALREADY_EXISTS, 0]
    assert "already exists" in cols.message(1)
    assert [len(p) for p in cols.placements()] == [1, 0, 1]
    end = handlers[msg.BatchPutEnd](msg.BatchPutEnd("w", ("a", "dup", "b", "nope")), 2.0)
    assert end.codes == (0, 0, 0, ErrorCode.OBJECT_NOT_FOUND)  # type: ignore[attr-defined]
    assert end.messages[:3] == (None, None, None)  # type: ignore[attr-defined]
    st.validate()


def test_an_allocator_run_is_freed_piece_by_piece() -> None:
    a = OffsetAllocator(0x1000, 64 * 10)
    first = a.allocate_run(64 * 4, 4)
    assert first == 0x1000
    assert a.live_count == 4 and a.allocated == 256
    pieces = [(first + 64 * i, 64) for i in range(4)]
    a.validate(pieces)
    a.free(*pieces[1])
    a.free(*pieces[3])
    a.validate([pieces[0], pieces[2]])
    # free: 64 B (piece 1) and 448 B (piece 3 merged with the untouched tail)
    assert a.allocate_run(64 * 8, 8) is None
    assert a.allocate_run(64 * 7, 7) == pieces[3][0]
    a.validate([pieces[0], pieces[2], *[(pieces[3][0] + 64 * i, 64) for i in range(7)]])
    for i in range(7):
        a.free(pieces[3][0] + 64 * i, 64)
    a.free(*pieces[0])
    a.free(*pieces[2])
    a.validate([])
    assert a.allocate_run(640, 10) == 0x1000
    with pytest.raises(ValueError):
        a.allocate_run(100, 2)  # not a sum of aligned allocations
