"""MasterStats without sockets: how batch replies are counted (the reference's
rules), how methods map onto the reference's counters, the rate ring."""

from __future__ import annotations

from pymooncake.store.master._metrics import MasterStats, reference_counts
from pymooncake.store.master._state import MasterState
from pymooncake.wire import _master_msgs as msg

OK = [0, "value"]
MISSING = [-704, "object not found"]


def cols(*codes: int) -> dict[str, list[object]]:
    """A columnar batch reply (BatchPutStart, BatchGetReplicaList) with these codes."""
    failed: list[object] = [[i, "object not found"] for i, c in enumerate(codes) if c]
    return {
        "code": list(codes),
        "msg": failed,
        "segs": [],
        "n": [0] * len(codes),
        "seg": [],
        "addr": [],
    }


def test_batch_replies_count_items_partial_and_whole_failures() -> None:
    stats = MasterStats()
    get = msg.BatchGetReplicaList(("a", "b", "c"))
    stats.record(get, 0, cols(0, -704, 0))  # partial
    stats.record(get, 0, cols(-704, -704, -704))  # every item failed
    stats.record(get, 0, cols(0, 0, 0))
    stats.record(get, -600, "invalid params")  # the whole RPC failed
    assert stats.batches["BatchGetReplicaList"] == [12, 7, 1, 1]

    # an empty batch counts as wholly failed, as the reference's
    # "failure_count == total_keys" does
    stats.record(msg.BatchPutEnd("client", ()), 0, [])
    assert stats.batches["BatchPutEnd"] == [0, 0, 0, 1]

    # BatchPutEnd, BatchRemove, ... answer [code, value] per key
    stats.record(msg.BatchPutEnd("client", ("a", "b")), 0, [OK, MISSING])
    assert stats.batches["BatchPutEnd"] == [2, 1, 1, 1]

    # exists answers a bool per key: False is an answer, not a failure
    stats.record(msg.BatchExistKey(("a", "b")), 0, [True, False])
    assert stats.batches["BatchExistKey"] == [2, 0, 0, 0]

    # BatchReplicaClear answers the keys it cleared
    stats.record(msg.BatchReplicaClear("client", ("a", "b", "c")), 0, ["b"])
    assert stats.batches["BatchReplicaClear"] == [3, 2, 1, 0]

    # single requests cost a lookup and record nothing
    stats.record(msg.GetReplicaList("a"), 0, {})
    assert set(stats.batches) == {
        "BatchGetReplicaList",
        "BatchPutEnd",
        "BatchExistKey",
        "BatchReplicaClear",
    }


def test_methods_map_onto_the_reference_counters() -> None:
    state = MasterState()
    stats = MasterStats()
    m = state.metrics
    m.requests.update(
        {
            "PutStart": 5,
            "UpsertStart": 2,
            "BatchPutStart": 3,
            "BatchUpsertStart": 1,
            "Remove": 4,
            "BatchRemove": 2,
            "ReMountSegment": 1,
        }
    )
    m.failures.update({"PutStart": 1, "UpsertStart": 1, "BatchUpsertStart": 1, "Remove": 1})
    stats.batches["BatchPutStart"] = [30, 4, 2, 0]
    stats.batches["BatchUpsertStart"] = [10, 10, 0, 0]
    stats.batches["BatchRemove"] = [7, 3, 1, 1]
    counts = reference_counts(state, stats)
    assert (counts["put_start_requests"], counts["put_start_failures"]) == (7, 2)
    assert counts["batch_put_start_requests"] == 4
    assert counts["batch_put_start_failures"] == 1  # the failed BatchUpsertStart RPC
    assert counts["batch_put_start_items"] == 40
    assert counts["batch_put_start_failed_items"] == 14
    assert counts["batch_put_start_partial_successes"] == 2
    # each key of a BatchRemove is a Remove request in the reference
    assert (counts["remove_requests"], counts["remove_failures"]) == (4 + 7, 1 + 3)
    assert counts["remount_segment_requests"] == 1
    assert counts["batch_query_ip_requests"] == 0  # no such RPC in pymooncake


def test_the_rate_ring_samples_at_its_interval_and_keeps_its_history() -> None:
    now = [100.0]
    stats = MasterStats(sample_interval_s=5.0, history_s=20.0, clock=lambda: now[0])
    state = MasterState()
    assert stats.sample(state) is not None
    now[0] += 1.0
    assert stats.sample(state) is None  # too soon
    for _ in range(10):
        now[0] += 5.0
        state.metrics.get_hits += 3
        assert stats.sample(state) is not None
    assert len(stats.samples) == 5  # history_s / interval + 1
    a, b = stats.samples[-2], stats.samples[-1]
    assert b.mono - a.mono == 5.0 and b.gets - a.gets == 3 and b.hits == 30
    stats.sample_interval_s = 1.0  # takes effect at once
    now[0] += 1.0
    assert stats.sample(state) is not None
