"""A standby's bookkeeping of puts their clients confirm to it (HaConfirm):
what it vouches for, what its stream settles, and what a promotion commits.
No sockets: a leader's MasterState feeds a Follower's state record by record."""

from __future__ import annotations

import random

from pymooncake._authio import ClusterSecurity
from pymooncake.store._config import MasterConfig
from pymooncake.store._types import ReplicateConfig, SegmentInfo
from pymooncake.store.master._effects import effect_from_record
from pymooncake.store.master._replication import _SETTLES, Follower
from pymooncake.store.master._state import MasterState

MiB = 1 << 20
ONE = ReplicateConfig()


def _pair() -> tuple[MasterState, Follower]:
    leader = MasterState(MasterConfig(client_ttl_s=10), rng=random.Random(7))
    leader.effects = []
    follower = Follower(MasterConfig(client_ttl_s=10), "standby:1", ClusterSecurity())
    follower.state = MasterState(MasterConfig(client_ttl_s=10))
    follower.synced = True
    leader.mount_segment("c1", SegmentInfo("sa", "a:1", 0x10000000, 16 * MiB, "a"), 0)
    return leader, follower


def _ship(leader: MasterState, follower: Follower, now: float) -> list[list[object]]:
    """The records of the leader's new effects, applied as the stream applies them."""
    assert follower.state is not None
    records = [e.record() for e in leader.drain_effects()]
    for rec in records:
        follower.state.apply(effect_from_record(rec), now)
        if rec[0] in _SETTLES:
            follower.confirmed.pop(str(rec[1]), None)
    return records


def test_a_standby_vouches_only_for_writes_it_knows_of_that_client() -> None:
    leader, follower = _pair()
    leader.put_start("c1", "mine", 4096, ONE, 1)
    leader.put_start("c1", "done", 64, ONE, 1)
    leader.put_end("c1", "done", 1)
    _ship(leader, follower, 1)
    leader.put_start("c1", "late", 64, ONE, 1)  # its reservation is not shipped yet
    missing = follower.confirm("c1", ("mine", "done", "late", "nobody's"), 2)
    # "done" is committed already (nothing to remember), the others are unknown here
    assert missing == ("late", "nobody's")
    assert set(follower.confirmed) == {"mine"}
    # another client cannot confirm c1's write
    assert follower.confirm("c2", ("mine",), 2) == ("mine",)
    assert follower.confirmed["mine"][0] == "c1"


def test_the_stream_settles_a_confirmation_and_promotion_commits_the_rest() -> None:
    leader, follower = _pair()
    for k in ("a", "b", "c"):
        leader.put_start("c1", k, 4096, ONE, 1)
    _ship(leader, follower, 1)
    assert follower.confirm("c1", ("a", "b", "c"), 2) == ()
    leader.put_end("c1", "a", 2)  # its commit reaches the standby: settled
    leader.put_revoke("c1", "c", 2)  # the leader revoked it: settled too
    _ship(leader, follower, 2)
    assert set(follower.confirmed) == {"b"}
    leader.put_end("c1", "b", 3)  # acknowledged, but the leader dies before shipping it
    state = follower.state
    assert state is not None
    state.promote(4)
    for key, writer in follower.take_confirmed():
        state.put_end(writer, key, 4)
    assert state.get_replica_list("a", 5).size == 4096
    assert state.get_replica_list("b", 5).size == 4096
    assert "c" not in state.objects
    assert follower.confirmed == {}
    state.validate()


def test_stale_confirmations_expire() -> None:
    leader, follower = _pair()
    leader.put_start("c1", "old", 64, ONE, 1)
    leader.put_start("c1", "new", 64, ONE, 1)
    _ship(leader, follower, 1)
    assert follower.confirm("c1", ("old",), 10) == ()
    # a minute later nothing of the stream settled it: the leader never ended that
    # put (it answered the client with an error), so it is forgotten
    assert follower.confirm("c1", ("new",), 10 + 61) == ()
    assert set(follower.confirmed) == {"new"}


def test_a_standby_not_in_sync_vouches_for_nothing() -> None:
    leader, follower = _pair()
    leader.put_start("c1", "k", 64, ONE, 1)
    _ship(leader, follower, 1)
    follower.synced = False
    assert follower.confirm("c1", ("k",), 2) == ("k",)
    assert follower.confirmed == {}
