"""MasterState against a simple model: a hypothesis state machine of puts, ends,
revokes, reads (leases), removals, evictions, segment loss and client expiry.

The model is a dict of keys -> (writing or readable, writer, start time, lease,
hard pin, segments) and the clients' last-seen times.  It predicts every answer
that does not depend on placement, and which objects may disappear in a step:

* errors: exists / being written / not found / another client's put / leased;
* a segment that goes away takes the objects with no replica elsewhere; an expired
  client takes its segments and its writes in progress; a write older than
  ``put_start_release_timeout`` is reclaimed by the tick;
* eviction takes only readable, unleased, unpinned objects, and exactly as many as
  the master counts as evicted; an object read less than a lease ago is never
  evicted nor removed without ``force``;
* a client expires once ``client_ttl`` passed since its last call, never earlier,
  and a stalled master expires nobody.

Placement (which segments, whether an allocation fits) is the master's choice: the
model takes it from the state when a put starts.  After every step the state's
objects must be exactly the model's (kind, writer, segments) and ``validate()``
cross-checks the state's own indexes.  The example count is bounded so that the test
takes a few seconds; ``HYPOTHESIS_PROFILE=long`` does not change it (see the
settings at the end), ``MASTER_MODEL_EXAMPLES`` does.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from pymooncake.errors import StoreError
from pymooncake.store._config import MasterConfig
from pymooncake.store._types import ErrorCode, ReplicateConfig, SegmentInfo
from pymooncake.store.master._records import BUSY, HARD_PIN, READABLE
from pymooncake.store.master._state import MasterState

CLIENTS = ("c0", "c1", "c2")
KEYS = tuple(f"k{i}" for i in range(8))
SEG_BYTES = 4096
TTL_S = 10.0
LEASE_S = 0.5
#: leases end on multiples of 1/64 s at or after now + ttl (MasterState.lease_deadline)
LEASE_SLACK = 1 / 64 + 1e-9
DISCARD_S = 3.0
RELEASE_S = 6.0

OK = 0
EXISTS = int(ErrorCode.OBJECT_ALREADY_EXISTS)
NOT_READY = int(ErrorCode.REPLICA_IS_NOT_READY)
NOT_FOUND = int(ErrorCode.OBJECT_NOT_FOUND)
HAS_LEASE = int(ErrorCode.OBJECT_HAS_LEASE)
ILLEGAL = int(ErrorCode.ILLEGAL_CLIENT)
NO_ROOM = int(ErrorCode.NO_AVAILABLE_HANDLE)

clients = st.sampled_from(CLIENTS)
keys = st.sampled_from(KEYS)


@dataclass
class M:
    """A modelled object."""

    readable: bool
    writer: str
    started: float
    hard: bool
    segs: frozenset[str]
    #: the read lease: surely held before lease_min, surely over at lease_max
    lease_min: float = 0.0
    lease_max: float = 0.0


@dataclass
class C:
    """A modelled client: the latest call that surely refreshed its liveness, and
    the latest call that may have."""

    seen_min: float
    seen_max: float


class MasterModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 100.0
        self.st = MasterState(
            MasterConfig(
                default_kv_lease_ttl_ms=int(LEASE_S * 1000),
                client_ttl_s=TTL_S,
                put_start_discard_timeout_s=DISCARD_S,
                put_start_release_timeout_s=RELEASE_S,
                eviction_high_watermark_ratio=0.9,
                eviction_ratio=0.2,
            ),
            rng=random.Random(0),
        )
        self.objs: dict[str, M] = {}
        self.clients: dict[str, C] = {}
        self.seg_owner: dict[str, str] = {}
        self.last_tick: float | None = None
        self.serial = 0

    # --- helpers ------------------------------------------------------------------

    def _call(self, fn: Any, *args: Any) -> tuple[int, Any]:
        try:
            return OK, fn(*args)
        except StoreError as exc:
            return exc.code, None

    def _seen(self, client: str, surely: bool) -> None:
        """After a call naming ``client``: ``surely`` if it must have refreshed the
        client's liveness (otherwise it may have)."""
        c = self.clients.get(client)
        if client not in self.st.clients:
            assert not surely, client
            assert c is None, f"{client} went away outside expiry"
            return
        if c is None:  # a call that names an unknown client registers it
            self.clients[client] = C(self.now, self.now)
            return
        c.seen_max = self.now
        if surely:
            c.seen_min = self.now

    def _evictable(self) -> set[str]:
        return {
            k for k, m in self.objs.items() if m.readable and not m.hard and self.now >= m.lease_min
        }

    def _leased(self, m: M) -> bool | None:
        """Whether a remove without force must be refused (None: either)."""
        if self.now < m.lease_min:
            return True
        if self.now >= m.lease_max:
            return False
        return None

    def _lose_segments(self, gone: set[str]) -> None:
        for key, m in list(self.objs.items()):
            if m.segs & gone:
                m.segs = m.segs - gone
                if not m.segs:
                    del self.objs[key]
        for sid in gone:
            self.seg_owner.pop(sid, None)

    def _expire(self, client: str) -> None:
        self.clients.pop(client, None)
        self._lose_segments({s for s, c in self.seg_owner.items() if c == client})
        for key, m in list(self.objs.items()):
            if not m.readable and m.writer == client:
                del self.objs[key]

    def _settle(self, may_evict: set[str] | None = None) -> None:
        """Compare the state with the model; objects the model has and the state
        lost must have been evicted (only ``may_evict`` may be, and exactly as many
        as the master counted)."""
        evicted_before = self._evicted
        self._evicted = self.st.metrics.evicted_keys
        real = {k: o for k, o in self.st.objects.items()}
        vanished = set(self.objs) - set(real)
        assert vanished <= (may_evict or set()), (vanished, may_evict)
        assert len(vanished) == self._evicted - evicted_before, (vanished, self._evicted)
        for key in vanished:
            del self.objs[key]
        if vanished:
            event("evicted")
        assert set(real) == set(self.objs), (set(real), set(self.objs))
        for key, obj in real.items():
            m = self.objs[key]
            assert bool(obj.flags & READABLE) == m.readable, key
            assert not obj.flags & BUSY or not m.readable, key
            assert {s.id for s, _ in obj.replicas()} == m.segs, (key, obj.replicas(), m.segs)
            assert bool(obj.flags & HARD_PIN) == m.hard, key
            if not m.readable:
                assert obj.writer == m.writer, key
            # the lease the master holds is the one the model granted
            assert obj.lease_until <= max(m.lease_max, 0.0), key
            if m.lease_min:
                assert obj.lease_until >= m.lease_min, key
        assert set(self.seg_owner) == set(self.st.segments)
        self.st.validate()

    _evicted = 0

    # --- segments and clients -----------------------------------------------------

    @initialize()
    def mount_all(self) -> None:
        for client in CLIENTS:
            self.mount(client)

    @rule(client=clients)
    def mount(self, client: str) -> None:
        self.serial += 1
        sid = f"{client}-s{self.serial}"
        name = f"host-{client}:{self.serial}"
        info = SegmentInfo(id=sid, name=name, base=0x10_0000 * self.serial, size=SEG_BYTES)
        code, _ = self._call(self.st.mount_segment, client, info, self.now)
        assert code == OK
        self._seen(client, True)
        self.seg_owner[sid] = client
        self._settle()

    @rule(client=clients, data=st.data())
    def unmount(self, client: str, data: st.DataObject) -> None:
        segs = sorted(s for s, c in self.seg_owner.items() if c == client)
        if not segs:
            return
        sid = data.draw(st.sampled_from(segs))
        code, _ = self._call(self.st.unmount_segment, client, sid, self.now)
        assert code == OK
        self._seen(client, True)
        self._lose_segments({sid})
        self._settle()

    @rule(client=clients)
    def expire(self, client: str) -> None:
        """The service's decision to drop a client (or a test's)."""
        self.st.expire_client(client, self.now)
        self._expire(client)
        self._settle()

    # --- writes -------------------------------------------------------------------

    @rule(
        client=clients,
        key=keys,
        size=st.sampled_from([64, 700, 1500, 2500]),
        replicas=st.sampled_from([1, 1, 2]),
        hard=st.sampled_from([False, False, False, True]),
    )
    def put_start(self, client: str, key: str, size: int, replicas: int, hard: bool) -> None:
        m = self.objs.get(key)
        config = ReplicateConfig(replica_num=replicas, with_hard_pin=hard)
        may_evict = self._evictable()
        code, _ = self._call(self.st.put_start, client, key, size, config, self.now)
        event(f"put_start {code}")
        self._seen(client, False)
        if m is not None and m.readable:
            assert code == EXISTS
        elif m is not None and self.now - m.started < DISCARD_S:
            assert code == NOT_READY
        else:
            if m is not None:  # the earlier writer is presumed dead: its put goes
                del self.objs[key]
            assert code in (OK, NO_ROOM), code
            if not self.seg_owner:
                assert code == NO_ROOM
            if code == OK:
                self._seen(client, True)
                obj = self.st.objects[key]
                segs = frozenset(s.id for s, _ in obj.replicas())
                assert 1 <= len(segs) <= replicas
                self.objs[key] = M(False, client, self.now, hard, segs)
        self._settle(may_evict)

    @rule(
        client=clients,
        key=keys,
        size=st.sampled_from([64, 700, 1500]),
        replicas=st.sampled_from([1, 1, 2]),
    )
    def put(self, client: str, key: str, size: int, replicas: int) -> None:
        """A whole put: start, then end by the same client (fills the pool)."""
        self.put_start(client, key, size, replicas, False)
        m = self.objs.get(key)
        if m is not None and not m.readable and m.writer == client:
            self.put_end(client, key)

    @rule(client=clients, key=keys)
    def put_end(self, client: str, key: str) -> None:
        m = self.objs.get(key)
        code, _ = self._call(self.st.put_end, client, key, self.now)
        self._seen(client, False)
        if m is None:
            assert code == NOT_FOUND
        elif m.writer != client:
            assert code == ILLEGAL
        else:
            assert code == OK  # also a repeated end
            if not m.readable:
                self._seen(client, True)
                m.readable = True
        self._settle()

    @rule(client=clients, key=keys)
    def put_revoke(self, client: str, key: str) -> None:
        m = self.objs.get(key)
        code, _ = self._call(self.st.put_revoke, client, key, self.now)
        self._seen(client, False)
        if m is None or m.readable:
            assert code == NOT_FOUND
        elif m.writer != client:
            assert code == ILLEGAL
        else:
            assert code == OK
            self._seen(client, True)
            del self.objs[key]
        self._settle()

    @rule(data=st.data())
    def finish_a_write(self, data: st.DataObject) -> None:
        """End a write in progress by its own writer: makes readable objects (and
        a full pool) far likelier than random ends do."""
        writing = sorted(k for k, m in self.objs.items() if not m.readable)
        if writing:
            key = data.draw(st.sampled_from(writing))
            self.put_end(self.objs[key].writer, key)

    # --- reads and removals -------------------------------------------------------

    def _grant(self, m: M) -> None:
        m.lease_min = max(m.lease_min, self.now + LEASE_S)
        m.lease_max = max(m.lease_max, self.now + LEASE_S + LEASE_SLACK)

    @rule(key=keys, exist=st.booleans())
    def read(self, key: str, exist: bool) -> None:
        """get (a replica list) or is_exist: both lease a readable object."""
        m = self.objs.get(key)
        if exist:
            found = self.st.exist_key(key, self.now)
            assert found == (m is not None and m.readable)
            code = OK if found else NOT_FOUND
        else:
            code, res = self._call(self.st.get_replica_list, key, self.now)
            if m is None:
                assert code == NOT_FOUND
            elif not m.readable:
                assert code == NOT_READY
            else:
                assert code == OK
                assert {r.segment_id for r in res.replicas} == m.segs
        if code == OK:
            assert m is not None
            self._grant(m)
        self._settle()

    @rule(key=keys, force=st.booleans())
    def remove(self, key: str, force: bool) -> None:
        m = self.objs.get(key)
        code, _ = self._call(self.st.remove, key, force, self.now)
        event(f"remove {code}")
        if m is None:
            assert code == NOT_FOUND
        elif not m.readable:
            assert code == NOT_READY
        else:
            leased = None if force else self._leased(m)
            if force or leased is False:
                assert code == OK
            elif leased:
                assert code == HAS_LEASE
            else:
                assert code in (OK, HAS_LEASE)
            if code == OK:
                del self.objs[key]
        self._settle()

    @rule(data=st.data(), force=st.booleans())
    def read_then_remove(self, data: st.DataObject, force: bool) -> None:
        """Remove what was just read: refused while the lease lasts, unless forced."""
        readable = sorted(k for k, m in self.objs.items() if m.readable)
        if readable:
            key = data.draw(st.sampled_from(readable))
            self.read(key, data.draw(st.booleans()))
            self.remove(key, force)

    @rule(slice_=st.sampled_from([None, 1, 4]))
    def evict(self, slice_: int | None) -> None:
        """Background eviction above the high watermark."""
        may_evict = self._evictable()
        self.st.evict_above_watermark(self.now, slice_)
        for _ in range(200):
            if not self.st.housekeeping(self.now, slice_):
                break
        self._settle(may_evict)

    # --- time ---------------------------------------------------------------------

    @rule(
        dt=st.sampled_from([0.01, 0.3, 0.3, 1.0, 2.0, 3.0, 4.0, 4.0, 7.0]),
        pings=st.lists(
            st.sampled_from([False, False, True]), min_size=len(CLIENTS), max_size=len(CLIENTS)
        ),
        slice_=st.sampled_from([None, 1, 4]),
    )
    def tick(self, dt: float, pings: list[bool], slice_: int | None) -> None:
        """Advance the clock, let some clients ping, run the periodic work."""
        self.now += dt
        for client, pinged in zip(CLIENTS, pings, strict=True):
            if pinged:
                known = client in self.st.clients
                self.st.ping(client, self.now)  # an unknown client is told to remount
                if known:
                    self._seen(client, True)
        before = set(self.st.clients)
        assert before == set(self.clients), (before, set(self.clients))
        stalled = self.last_tick is not None and self.now - self.last_tick > TTL_S / 2
        self.last_tick = self.now
        if stalled:  # a master that stalled gives everyone a fresh ttl
            for c in self.clients.values():
                c.seen_min = c.seen_max = self.now
        must = {k for k, c in self.clients.items() if self.now - c.seen_max > TTL_S}
        may = {k for k, c in self.clients.items() if self.now - c.seen_min > TTL_S}
        may_evict = self._evictable()
        more = self.st.tick(self.now, slice_)
        for _ in range(200):
            if not more:
                break
            more = self.st.housekeeping(self.now, slice_)
        expired = before - set(self.st.clients)
        assert must <= expired <= may, (must, expired, may)
        if expired:
            event("client expired" + (" (ambiguous)" if expired - must else ""))
        if stalled:
            event("stall grace")
        for client in sorted(expired):
            self._expire(client)
        for key, m in list(self.objs.items()):  # abandoned writes are reclaimed
            if not m.readable and self.now - m.started > RELEASE_S:
                del self.objs[key]
                event("write reclaimed")
        # what eviction may take: objects that were evictable before and still exist
        self._settle(may_evict & set(self.objs))

    @rule(client=clients)
    def client_goes_silent(self, client: str) -> None:
        """The others keep pinging, ``client`` stops: it expires after client_ttl
        (ticks 4 s apart: no stall grace), its segments and writes with it."""
        for _ in range(3):
            self.tick(4.0, [c != client for c in CLIENTS], None)
        assert client not in self.st.clients
        self.mount(client)  # it restarts (a new segment)


MasterModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("MASTER_MODEL_EXAMPLES", "40")),
    stateful_step_count=100,
    deadline=None,
)
TestMasterModel = MasterModel.TestCase
