"""A hypothesis state machine over MasterState: random mounts, puts (one by one and
in batches), upserts, reads, removals, evictions, expiries and ticks, with every index cross-checked after each
step and the journal (drained effects) replayed into a fresh state.

Runs ``max_examples`` of the active hypothesis profile (tests/conftest.py: 60 in the
default run, ``HYPOTHESIS_PROFILE=long`` for thousands).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pymooncake.errors import StoreError
from pymooncake.store._config import MasterConfig
from pymooncake.store._types import ErrorCode, ReplicateConfig, SegmentInfo, SoftPinAction
from pymooncake.store.master._effects import Effect
from pymooncake.store.master._records import BUSY, READABLE
from pymooncake.store.master._state import SLOT_PREFIX, MasterState
from pymooncake.wire import _master_msgs as msg

# HYPOTHESIS_PROFILE=long runs thousands of examples: minutes, not the default 300 s
pytestmark = pytest.mark.timeout(3600)

CLIENTS = ("c0", "c1", "c2")
KEYS = tuple(f"k{i}" for i in range(12))
#: engine segment names: clients usually own a name, sometimes share one (a
#: restarted engine whose predecessor has not expired yet)
NAMES = ("hostA:1", "hostB:1", "hostC:1")
SEG_BYTES = 4096
TTL_S = 10.0
LEASE_MS = 500

clients = st.sampled_from(CLIENTS)
keys = st.sampled_from(KEYS)
sizes = st.sampled_from([1, 64, 700, 1500, 2500, 3000])


def configs() -> st.SearchStrategy[ReplicateConfig]:
    pins = st.sampled_from(
        [
            (SoftPinAction.PRESERVE, None),
            (SoftPinAction.PRESERVE, None),
            (SoftPinAction.DISABLE, None),
            (SoftPinAction.ENABLE, None),
            (SoftPinAction.ENABLE, 0),
            (SoftPinAction.ENABLE, 2000),
        ]
    )
    return st.builds(
        lambda n, hard, pin: ReplicateConfig(
            replica_num=n, with_hard_pin=hard, soft_pin_action=pin[0], soft_pin_ttl_ms=pin[1]
        ),
        st.sampled_from([1, 1, 2]),
        st.sampled_from([False, False, False, False, True]),
        pins,
    )


def readable(state: MasterState) -> dict[str, tuple[int, list[tuple[str, int]]]]:
    """Readable objects: key -> (size, sorted (segment id, address))."""
    return {
        key: (obj.size, sorted((seg.id, addr) for seg, addr in obj.replicas()))
        for key, obj in state.objects.items()
        if obj.flags & READABLE
    }


class MasterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 100.0
        self.st = MasterState(
            MasterConfig(
                default_kv_lease_ttl_ms=LEASE_MS,
                client_ttl_s=TTL_S,
                put_start_discard_timeout_s=3.0,
                put_start_release_timeout_s=6.0,
                eviction_high_watermark_ratio=0.9,
                eviction_ratio=0.2,
            ),
            rng=random.Random(0),
        )
        self.st.effects = []
        self.journal: list[Effect] = []
        self.seg_serial = 0
        self.outcomes: dict[str, int] = {}
        #: reserved put buffers (ReserveSlots) by client, and a batch counter
        self.slots: dict[str, list[str]] = {}
        self.batches = 0

    # --- helpers ------------------------------------------------------------------

    def _try(self, name: str, fn: Any, *args: Any) -> Any:
        try:
            out = fn(*args)
        except StoreError as exc:
            self.outcomes[f"{name}:{exc.code}"] = self.outcomes.get(f"{name}:{exc.code}", 0) + 1
            return None
        self.outcomes[name] = self.outcomes.get(name, 0) + 1
        return out

    def _segments_of(self, client: str) -> list[str]:
        return sorted(s.id for s in self.st.segments.values() if s.client_id == client)

    # --- segments and clients -----------------------------------------------------

    @initialize()
    def mount_all(self) -> None:
        for client in CLIENTS:
            self.mount(client, NAMES[0], shared=False)

    @rule(client=clients, name=st.sampled_from(NAMES), shared=st.booleans())
    def mount(self, client: str, name: str, shared: bool) -> None:
        if not shared:
            name = NAMES[CLIENTS.index(client)]
        self.seg_serial += 1
        sid = f"{client}-s{self.seg_serial}"
        base = 0x10_0000 * self.seg_serial  # never overlapping
        info = SegmentInfo(id=sid, name=name, base=base, size=SEG_BYTES, host_id=name)
        self._try("mount", self.st.mount_segment, client, info, self.now)

    @rule(client=clients, data=st.data())
    def unmount(self, client: str, data: st.DataObject) -> None:
        segs = self._segments_of(client)
        if segs:
            sid = data.draw(st.sampled_from(segs))
            self._try("unmount", self.st.unmount_segment, client, sid, self.now)

    @rule(client=clients)
    def ping(self, client: str) -> None:
        self.st.ping(client, self.now)

    # --- writes -------------------------------------------------------------------

    @rule(client=clients, key=keys, size=sizes, config=configs())
    def put_start(self, client: str, key: str, size: int, config: ReplicateConfig) -> None:
        self._try("put_start", self.st.put_start, client, key, size, config, self.now)

    @rule(client=clients, key=keys, size=sizes, config=configs(), upsert=st.booleans())
    def put(self, client: str, key: str, size: int, config: ReplicateConfig, upsert: bool) -> None:
        """A whole put (or upsert): start, then end by the same client."""
        start, end = (
            (self.st.upsert_start, self.st.upsert_end)
            if upsert
            else (self.st.put_start, self.st.put_end)
        )
        if self._try("start", start, client, key, size, config, self.now) is not None:
            self._try("end", end, client, key, self.now)

    @rule(
        client=clients,
        batch=st.lists(st.tuples(keys, sizes), min_size=2, max_size=6),
        config=configs(),
        end=st.booleans(),
        upsert=st.booleans(),
    )
    def batch_put(
        self,
        client: str,
        batch: list[tuple[str, int]],
        config: ReplicateConfig,
        end: bool,
        upsert: bool,
    ) -> None:
        """BatchPutStart (put_start_many) or BatchUpsertStart (upsert_start_many),
        then perhaps the batch end (put_end_many) of what started.  A batch never
        answers differently from its keys put one by one where that answer is
        certain: a readable key exists (a put; unless a key before it evicted it),
        a key repeated after its own start is being written."""
        readable_before = {k for k, o in self.st.objects.items() if o.flags & READABLE}
        evicted_before = self.st.metrics.evicted_keys
        keys_ = [k for k, _ in batch]
        many = self.st.upsert_start_many if upsert else self.st.put_start_many
        out = many(client, keys_, [z for _, z in batch], config, self.now)
        assert len(out) == len(batch)
        started: list[str] = []
        busy = ErrorCode.OBJECT_REPLICA_BUSY if upsert else ErrorCode.REPLICA_IS_NOT_READY
        for i, (key, got) in enumerate(zip(keys_, out, strict=True)):
            code = got.code if isinstance(got, StoreError) else 0
            name = f"batch_{'upsert' if upsert else 'start'}:{code}"
            self.outcomes[name] = self.outcomes.get(name, 0) + 1
            if key in keys_[:i] and key in started:
                assert code == busy
            elif (
                not upsert
                and key in readable_before
                and self.st.metrics.evicted_keys == evicted_before
            ):
                assert code == ErrorCode.OBJECT_ALREADY_EXISTS
            if code == 0:
                obj = self.st.objects[key]
                assert got is obj and obj.flags & BUSY and obj.writer == client
                started.append(key)
        if end and started:
            for key, err in zip(
                started, self.st.put_end_many(client, started, self.now), strict=True
            ):
                name = "batch_end" if err is None else f"batch_end:{err.code}"
                self.outcomes[name] = self.outcomes.get(name, 0) + 1
                if err is None:
                    assert self.st.objects[key].flags & READABLE

    @rule(client=clients, batch=st.lists(keys, min_size=2, max_size=6))
    def batch_put_end(self, client: str, batch: list[str]) -> None:
        """put_end_many answers each key as put_end would, on a copy of the state."""
        twin = copy.deepcopy(self.st)
        out = self.st.put_end_many(client, batch, self.now)
        for key, err in zip(batch, out, strict=True):
            try:
                twin.put_end(client, key, self.now)
                expected = 0
            except StoreError as exc:
                expected = exc.code
            assert (0 if err is None else err.code) == expected, key
        assert readable(twin) == readable(self.st)
        assert [e.record() for e in twin.effects or []] == [
            e.record() for e in self.st.effects or []
        ]

    @rule(client=clients, size=sizes, config=configs(), count=st.integers(1, 4))
    def reserve(self, client: str, size: int, config: ReplicateConfig, count: int) -> None:
        """Buffers reserved ahead for single puts (ReserveSlots)."""
        self.batches += 1
        got = self._try(
            "reserve",
            self.st.reserve_slots,
            client,
            size,
            count,
            config,
            self.now,
            str(self.batches),
        )
        if got:
            self.slots.setdefault(client, []).extend(name for name, _ in got)

    @rule(client=clients, key=keys, data=st.data())
    def commit(self, client: str, key: str, data: st.DataObject) -> None:
        """A reserved buffer committed under a key (CommitSlot), or one whose
        reservation is gone (expired, revoked, its segment went away)."""
        mine = self.slots.get(client)
        if not mine:
            return
        name = data.draw(st.sampled_from(mine))
        self._try("commit", self.st.commit_slot, client, name, key, self.now)
        if not self._reserved(name):
            mine.remove(name)

    def _reserved(self, name: str) -> bool:
        """Whether the buffer ``name`` is still reserved (a record, or a run's)."""
        head, _, tail = name.rpartition(":")
        run = self.st.slot_runs.get(head)
        return name in self.st.objects or (run is not None and bool(run.free[int(tail)]))

    @rule(client=clients, batch=st.lists(keys, min_size=2, max_size=5), data=st.data())
    def commit_many(self, client: str, batch: list[str], data: st.DataObject) -> None:
        """Reserved buffers committed in one batch (BatchCommitSlots): each pair is
        answered as commit_slot would answer it, on a copy of the state; a name
        may repeat, or be another client's."""
        names = sorted({n for mine in self.slots.values() for n in mine})
        if not names:
            return
        slots = [data.draw(st.sampled_from(names)) for _ in batch]
        twin = copy.deepcopy(self.st)
        # named as a client names its own buffers (runs of its reservations), or by name
        own = f"{SLOT_PREFIX}{client}:"
        named: Sequence[str] = slots
        if all(s.startswith(own) for s in slots) and data.draw(st.booleans()):
            pairs = [s[len(own) :].rpartition(":") for s in slots]
            named = msg.SlotRuns.of(client, [(b, int(i)) for b, _, i in pairs])
            assert list(named) == slots
        out = self.st.commit_slots_many(client, named, batch, self.now)
        for slot, key, err in zip(slots, batch, out, strict=True):
            try:
                twin.commit_slot(client, slot, key, self.now)
                expected = 0
            except StoreError as exc:
                expected = exc.code
            assert (0 if err is None else err.code) == expected, (slot, key)
            name = "commit_many" if err is None else f"commit_many:{err.code}"
            self.outcomes[name] = self.outcomes.get(name, 0) + 1
        assert readable(twin) == readable(self.st)
        assert [e.record() for e in twin.effects or []] == [
            e.record() for e in self.st.effects or []
        ]
        for mine in self.slots.values():
            mine[:] = [n for n in mine if self._reserved(n)]

    @rule(client=clients, key=keys)
    def put_end(self, client: str, key: str) -> None:
        self._try("put_end", self.st.put_end, client, key, self.now)

    @rule(client=clients, key=keys)
    def put_revoke(self, client: str, key: str) -> None:
        self._try("put_revoke", self.st.put_revoke, client, key, self.now)

    @rule(client=clients, key=keys, size=sizes, config=configs())
    def upsert_start(self, client: str, key: str, size: int, config: ReplicateConfig) -> None:
        self._try("upsert_start", self.st.upsert_start, client, key, size, config, self.now)

    @rule(client=clients, key=keys)
    def upsert_end(self, client: str, key: str) -> None:
        self._try("upsert_end", self.st.upsert_end, client, key, self.now)

    @rule(client=clients, key=keys)
    def upsert_revoke(self, client: str, key: str) -> None:
        self._try("upsert_revoke", self.st.upsert_revoke, client, key, self.now)

    @precondition(lambda self: any(o.flags & BUSY for o in self.st.objects.values()))
    @rule(data=st.data())
    def finish_a_write(self, data: st.DataObject) -> None:
        """End (or revoke) a write in progress by its own writer: makes complete
        objects (and eviction pressure) far likelier than random ends do."""
        busy = sorted(k for k, o in self.st.objects.items() if o.flags & BUSY)
        key = data.draw(st.sampled_from(busy))
        writer = self.st.objects[key].writer
        if data.draw(st.integers(0, 4)):
            self._try("end", self.st.put_end, writer, key, self.now)
        else:
            self._try("revoke", self.st.put_revoke, writer, key, self.now)

    # --- reads and removals -------------------------------------------------------

    @rule(key=keys)
    def get(self, key: str) -> None:
        res = self._try("get", self.st.get_replica_list, key, self.now)
        if res is not None:
            obj = self.st.objects[key]
            assert obj.flags & READABLE
            assert obj.lease_until >= self.now + LEASE_MS / 1000
            assert {r.segment_id for r in res.replicas} <= set(self.st.segments)

    @rule(key=keys)
    def exist(self, key: str) -> None:
        found = self.st.exist_key(key, self.now)
        obj = self.st.objects.get(key)
        assert found == (obj is not None and bool(obj.flags & READABLE))

    @rule(key=keys, force=st.booleans())
    def remove(self, key: str, force: bool) -> None:
        self._try("remove", self.st.remove, key, force, self.now)

    @rule(force=st.booleans(), go=st.integers(0, 4))
    def remove_all(self, force: bool, go: int) -> None:
        if not go:  # rarely: it wipes what the other rules built
            self.st.remove_all(force, self.now)

    @rule(pattern=st.sampled_from(["^k[0-3]$", "k7", "x"]), force=st.booleans())
    def remove_by_regex(self, pattern: str, force: bool) -> None:
        self.st.remove_by_regex(pattern, force, self.now)

    @rule(client=clients, key=keys, name=st.sampled_from(("", *NAMES)))
    def replica_clear(self, client: str, key: str, name: str) -> None:
        self.st.replica_clear(client, key, name, self.now)

    # --- time -----------------------------------------------------------------------

    @rule(
        dt=st.sampled_from([0.01, 0.3, 0.3, 1.0, 1.0, 4.0, 7.0, 11.0]),
        slice_=st.sampled_from([None, 1, 3]),
        pings=st.lists(st.booleans(), min_size=len(CLIENTS), max_size=len(CLIENTS)),
    )
    def tick(self, dt: float, slice_: int | None, pings: list[bool]) -> None:
        """Advance the clock (leases, discard and release timeouts, client ttl) and
        run the periodic work, sometimes a few records at a time."""
        self.now += dt
        for client, pinged in zip(CLIENTS, pings, strict=True):  # live clients ping, mostly
            if pinged and client in self.st.clients:
                self.st.ping(client, self.now)
        more = self.st.tick(self.now, slice_)
        for _ in range(100):
            if not more:
                break
            more = self.st.housekeeping(self.now, slice_)

    @rule(client=clients, go=st.integers(0, 3))
    def expire(self, client: str, go: int) -> None:
        if not go:
            self.st.expire_client(client, self.now)

    # --- invariants ---------------------------------------------------------------

    @invariant()
    def indexes_agree(self) -> None:
        # validate(): readable replicas live in mounted segments, no two replicas of
        # an object share a segment name, every allocator's bytes are exactly the
        # live ranges (replicas, pending, discarded), the in-flight, per-client and
        # per-segment indexes agree with the objects
        self.st.validate()

    @invariant()
    def replay_reproduces_readable_objects(self) -> None:
        self.journal += self.st.drain_effects()
        fresh = MasterState(self.st.config, rng=random.Random(0))
        fresh.replay(self.journal, self.now)
        fresh.validate()
        assert readable(fresh) == readable(self.st)
        assert set(fresh.segments) == set(self.st.segments)


MasterMachine.TestCase.settings = settings(stateful_step_count=40)
TestMasterMachine = MasterMachine.TestCase


class RunMachine(MasterMachine):
    """The same without a journal (``effects`` None), where reservations are held
    as runs (``_slot_runs.py``) as the service makes them: every rule that looks
    at writes in progress meets runs, and spills them, as the master would."""

    def __init__(self) -> None:
        super().__init__()
        self.st.effects = None

    @rule(client=clients, size=sizes, config=configs(), count=st.integers(1, 6))
    def reserve(self, client: str, size: int, config: ReplicateConfig, count: int) -> None:
        """ReserveSlots as its handler serves it: a run when it can be one."""
        self.batches += 1
        batch = str(self.batches)
        run = self.st.reserve_slot_run(client, size, count, config, self.now, batch)
        if run is not None:
            self.outcomes["reserve_run"] = self.outcomes.get("reserve_run", 0) + 1
            names = [f"{run.head}:{i}" for i in range(run.count)]
            self.slots.setdefault(client, []).extend(names)
            return
        got = self._try(
            "reserve", self.st.reserve_slots, client, size, count, config, self.now, batch
        )
        if got:
            self.slots.setdefault(client, []).extend(name for name, _ in got)

    @rule(go=st.integers(0, 2))
    def spill(self, go: int) -> None:
        """What every request outside RUN_SAFE does first."""
        if not go:
            self.st.spill_slot_runs()

    @invariant()
    def replay_reproduces_readable_objects(self) -> None:
        assert self.st.effects is None  # (nothing is journaled without effects)


RunMachine.TestCase.settings = settings(stateful_step_count=40)
TestRunMachine = RunMachine.TestCase


def test_the_run_machine_reaches_runs_and_their_commits() -> None:
    """The variant's rules make runs and commit from them (not a vacuous machine)."""
    machine = RunMachine()
    machine.mount_all()
    for _ in range(3):
        machine.reserve("c0", 64, ReplicateConfig(), 4)
    assert machine.outcomes.get("reserve_run") == 3 and len(machine.st.slot_runs) == 3
    names = list(machine.slots["c0"])
    out = machine.st.commit_slots_many("c0", names[:3], ["k0", "k1", "k0"], machine.now)
    assert [e is None for e in out] == [True, True, False]
    machine.st.validate()
    machine.st.spill_slot_runs()
    assert not machine.st.slot_runs
    machine.st.validate()
