"""What the master counts beside :class:`MasterState`, and the reference's view of it.

Theory of operation
-------------------
Counting stays cheap: the state keeps plain ints (``state.metrics``), the
service counts requests and failures per RPC method (``metrics.requests`` /
``metrics.failures``), and :class:`MasterStats` adds the per-item outcome of
batch RPCs (one dict lookup per request; only batch requests do more).
Nothing is computed per request that a scrape could compute instead.

:func:`reference_counts` maps those onto the reference's counters
(``master_metric_manager.cpp``): upserts count as puts, ``BatchUpsert*`` as
``BatchPut*``, the keys of ``BatchRemove`` as ``Remove`` requests, and a batch
whose every item failed counts as a failed batch (an empty batch too, as the
reference's ``failure_count == total_keys`` does).

:class:`MasterStats` also keeps a ring of :class:`Sample` (every
``sample_interval_s``, ``history_s`` long) from which the cluster page shows
put/get/eviction rates of the last minutes, and the previous window of the
"Master Admin Metrics" log line (its rates are per second since the last line).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from ...wire import _master_msgs as msg
from ._state import MasterState

__all__ = [
    "BATCH_OPS",
    "RPC_OPS",
    "MasterStats",
    "Sample",
    "reference_counts",
]

#: seconds between two samples of the rate ring (the page polls every 2 s)
SAMPLE_INTERVAL_S: Final = 5.0
#: how much history the ring keeps
HISTORY_S: Final = 600.0

#: the reference's single-RPC counter bases -> the methods counted under each
RPC_OPS: Final[dict[str, tuple[str, ...]]] = {
    "exist_key": ("ExistKey",),
    # a CommitSlot is a put's start and end in one request (see reference_counts)
    "put_start": ("PutStart", "UpsertStart", "CommitSlot"),
    "put_end": ("PutEnd", "UpsertEnd"),
    "put_revoke": ("PutRevoke", "UpsertRevoke"),
    "get_replica_list": ("GetReplicaList",),
    "get_replica_list_by_regex": ("GetReplicaListByRegex",),
    "remove": ("Remove",),
    "remove_by_regex": ("RemoveByRegex",),
    "remove_all": ("RemoveAll",),
    "mount_segment": ("MountSegment",),
    "unmount_segment": ("UnmountSegment",),
    "remount_segment": ("ReMountSegment",),
    "ping": ("Ping",),
    "copy_start": ("CopyStart",),
    "copy_end": ("CopyEnd",),
    "copy_revoke": ("CopyRevoke",),
    "move_start": ("MoveStart",),
    "move_end": ("MoveEnd",),
    "move_revoke": ("MoveRevoke",),
    "create_copy_task": ("CreateCopyTask",),
    "create_move_task": ("CreateMoveTask",),
    "update_task": ("MarkTaskToComplete",),
    "query_task": ("QueryTask",),
    "fetch_tasks": ("FetchTasks",),
}

#: the reference's batch counter bases -> the methods counted under each
#: (``batch_query_ip`` has none: pymooncake has no BatchQueryIp RPC)
BATCH_OPS: Final[dict[str, tuple[str, ...]]] = {
    "batch_exist_key": ("BatchExistKey",),
    "batch_query_ip": (),
    "batch_replica_clear": ("BatchReplicaClear",),
    "batch_get_replica_list": ("BatchGetReplicaList",),
    # a BatchCommitSlots is a batch put's start and end in one request
    "batch_put_start": ("BatchPutStart", "BatchUpsertStart", "BatchCommitSlots"),
    "batch_put_end": ("BatchPutEnd", "BatchUpsertEnd", "BatchCommitSlots"),
    "batch_put_revoke": ("BatchPutRevoke", "BatchUpsertRevoke"),
}


def _failed_pairs(value: Any) -> int:
    """Failed items of a ``[[code, value], ...]`` batch reply (a count of keys
    alone when none failed)."""
    if type(value) is int:
        return 0
    return sum(1 for code, _ in value if code)


def _failed_columns(value: Any) -> int:
    """Failed items of a columnar batch reply (``wire/_master_replies.py``; a
    code column of one integer stands for that code for every key)."""
    codes = value["code"]
    if isinstance(codes, int):
        return int(value["k"]) if codes else 0
    return int(len(codes) - codes.count(0))


def _failed_none(value: Any) -> int:
    """BatchExistKey answers a bool per key: never a failed item."""
    return 0


def _failed_clear(req: Any, value: Any) -> int:
    return len(req.keys) - len(value)


#: batch request type -> how to count the failed items of its (successful) reply
_BATCH_FAILED: Final[dict[type, Callable[[Any, Any], int]]] = {
    msg.BatchPutStart: lambda req, value: _failed_columns(value),
    msg.BatchUpsertStart: lambda req, value: _failed_columns(value),
    msg.BatchPutEnd: lambda req, value: _failed_pairs(value),
    msg.BatchCommitSlots: lambda req, value: _failed_pairs(value),
    msg.BatchUpsertEnd: lambda req, value: _failed_pairs(value),
    msg.BatchPutRevoke: lambda req, value: _failed_pairs(value),
    msg.BatchUpsertRevoke: lambda req, value: _failed_pairs(value),
    msg.BatchGetReplicaList: lambda req, value: _failed_columns(value),
    msg.BatchRemove: lambda req, value: _failed_pairs(value),
    msg.BatchExistKey: lambda req, value: _failed_none(value),
    msg.BatchReplicaClear: _failed_clear,
}
#: the request types :meth:`MasterStats.record` counts (the others skip the call)
BATCH_STATS: Final = frozenset(_BATCH_FAILED)


@dataclass(frozen=True, slots=True)
class Sample:
    """Cumulative counters at one moment (rates are differences of two samples)."""

    #: Unix time and monotonic time of the sample
    wall: float
    mono: float
    #: put/upsert starts that succeeded (single and batch items)
    puts: int
    #: reads (GetReplicaList, single and batch items), and those that found the object
    gets: int
    hits: int
    evicted_keys: int
    evicted_bytes: int
    #: gauges
    allocated_bytes: int
    capacity_bytes: int
    keys: int


class MasterStats:
    """Batch-item counters and the rate ring of one master.

    Args:
        sample_interval_s: seconds between two samples of the ring.
        history_s: how long the ring reaches back.
        clock / wall_clock: monotonic and Unix time (tests inject fakes).
    """

    def __init__(
        self,
        sample_interval_s: float = SAMPLE_INTERVAL_S,
        history_s: float = HISTORY_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.sample_interval_s = sample_interval_s
        self._clock = clock
        self._wall = wall_clock
        #: method -> [items, failed items, partially failed batches, wholly failed batches]
        self.batches: dict[str, list[int]] = {}
        self.samples: deque[Sample] = deque(maxlen=max(2, int(history_s / sample_interval_s) + 1))
        #: the reference's "summary snapshot": counters and monotonic time of the
        #: last "Master Admin Metrics" line
        self.window: tuple[float, dict[str, int]] | None = None

    # --- counting (on the request path) -------------------------------------------

    def record(self, req: msg.Request, code: int, value: Any) -> None:
        """Count the items of a batch request answered ``(code, value)``; other
        requests cost one dict lookup."""
        failed_of = _BATCH_FAILED.get(type(req))
        if failed_of is None:
            return
        keys = getattr(req, "keys", ())
        items = len(keys)
        failed = failed_of(req, value) if code == 0 else items
        row = self.batches.get(req.NAME)
        if row is None:
            row = self.batches[req.NAME] = [0, 0, 0, 0]
        row[0] += items
        row[1] += failed
        if code:
            return  # the whole RPC failed: counted in metrics.failures already
        if failed == items:
            row[3] += 1
        elif failed:
            row[2] += 1

    # --- sampling (from the service's periodic tick) -------------------------------

    def sample(self, state: MasterState) -> Sample | None:
        """Append a sample when ``sample_interval_s`` has passed since the last one."""
        now = self._clock()
        if self.samples and now - self.samples[-1].mono < self.sample_interval_s:
            return None
        s = self.current(state, now)
        self.samples.append(s)
        return s

    def current(self, state: MasterState, mono: float | None = None) -> Sample:
        """A sample of ``state`` now (not stored)."""
        m = state.metrics
        counts = reference_counts(state, self)
        puts = (
            counts["put_start_requests"]
            - counts["put_start_failures"]
            + counts["batch_put_start_items"]
            - counts["batch_put_start_failed_items"]
        )
        cap = used = 0
        for seg in state.segments.values():
            cap += seg.allocator.capacity
            used += seg.allocator.allocated
        return Sample(
            wall=self._wall(),
            mono=self._clock() if mono is None else mono,
            puts=puts,
            gets=m.get_hits + m.get_misses,
            hits=m.get_hits,
            evicted_keys=m.evicted_keys,
            evicted_bytes=m.evicted_bytes,
            allocated_bytes=used,
            capacity_bytes=cap,
            keys=state.key_count(),
        )


def reference_counts(state: MasterState, stats: MasterStats) -> dict[str, int]:
    """The reference's request counters, by their names without ``master_`` and
    ``_total`` (``put_start_requests``, ``batch_put_end_failed_items`` ...)."""
    requests = state.metrics.requests
    failures = state.metrics.failures
    out: dict[str, int] = {}
    for base, methods in RPC_OPS.items():
        out[f"{base}_requests"] = sum(requests.get(m, 0) for m in methods)
        out[f"{base}_failures"] = sum(failures.get(m, 0) for m in methods)
    # the reference counts each key of a BatchRemove as a Remove request (and each
    # failed key as a failure)
    # a CommitSlot that succeeded also ended its put (one that failed, like a
    # PutStart that failed, never got that far)
    out["put_end_requests"] += requests.get("CommitSlot", 0) - failures.get("CommitSlot", 0)
    removed = stats.batches.get("BatchRemove")
    if removed is not None:
        out["remove_requests"] += removed[0]
        out["remove_failures"] += removed[1]
    batches = stats.batches
    for base, methods in BATCH_OPS.items():
        req = fail = partial = items = failed_items = 0
        for m in methods:
            req += requests.get(m, 0)
            fail += failures.get(m, 0)
            row = batches.get(m)
            if row is not None:
                items += row[0]
                failed_items += row[1]
                partial += row[2]
                fail += row[3]
        out[f"{base}_requests"] = req
        out[f"{base}_failures"] = fail
        out[f"{base}_partial_successes"] = partial
        out[f"{base}_items"] = items
        out[f"{base}_failed_items"] = failed_items
    return out
