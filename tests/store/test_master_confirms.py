"""A standby's bookkeeping of puts their clients confirm to it (HaConfirm):
what it vouches for, what its stream settles, and what a promotion commits.
No sockets: a leader's MasterState feeds a Follower's state record by record."""

from __future__ import annotations

import random

from pymooncake._authio import ClusterSecurity
from pymooncake.store._config import MasterConfig
from pymooncake.store._types import ReplicateConfig, SegmentInfo
from pymooncake.store.master._effects import ReplyKept, effect_from_record
from pymooncake.store.master._replication import _RENAMED_KEPT, Follower
from pymooncake.store.master._state import KEPT_REPLIES_MAX, MasterState
from pymooncake.wire._master_msgs import slot_name

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
        follower.settle(rec)
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
    for key, writer, slot in follower.take_confirmed():
        assert slot == ""
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


def test_puts_into_reserved_buffers_are_vouched_for_by_buffer_and_committed_on_promotion() -> None:
    leader, follower = _pair()
    slots = [name for name, _ in leader.reserve_slots("c1", 4096, 4, ONE, 1, batch="b")]
    _ship(leader, follower, 1)
    assert len(slots) == 4
    # (buffer, key) pairs: the buffers are c1's reservations; another client's
    # confirmation, and a buffer this standby does not know, are not vouched for
    assert follower.confirm("c1", ("k0", "k1", "k2"), 2, tuple(slots[:3])) == ()
    assert follower.confirm("c2", ("k3",), 2, (slots[3],)) == ("k3",)
    assert follower.confirm("c1", ("k9",), 2, (slot_name("c1", "zz", 0),)) == ("k9",)
    assert {k: v[2] for k, v in follower.confirmed.items()} == {
        "k0": slots[0],
        "k1": slots[1],
        "k2": slots[2],
    }
    # k0's commit reaches the standby (a rename and a commit): settled; confirming
    # it again finds the committed object (nothing to remember)
    leader.commit_slot("c1", slots[0], "k0", 2)
    _ship(leader, follower, 2)
    assert set(follower.confirmed) == {"k1", "k2"}
    assert follower.confirm("c1", ("k0",), 3, (slots[0],)) == ()
    assert set(follower.confirmed) == {"k1", "k2"}
    # k1 and k2 are acknowledged by the leader, which dies before shipping them
    assert leader.commit_slots_many("c1", slots[1:3], ["k1", "k2"], 3) == [None, None]
    state = follower.state
    assert state is not None
    state.promote(4)
    for key, writer, slot in follower.take_confirmed():
        state.commit_slot(writer, slot, key, 4)
    for key in ("k0", "k1", "k2"):
        assert state.get_replica_list(key, 5).size == 4096
    assert slots[3] in state.objects  # still reserved: nobody committed it
    state.validate()


def test_a_lazy_confirmation_read_after_its_key_was_removed_is_vouched_for() -> None:
    """A standby reads confirmations posted without waiting after the frames that
    came meanwhile: the commit of the buffer, and here the key's removal too.  The
    stream has that write; the client must not be told otherwise (it would wait
    for a barrier for nothing: ha_bench saw 1-19 such keys in a run, the last put
    of a round, removed right after)."""
    leader, follower = _pair()
    slots = [name for name, _ in leader.reserve_slots("c1", 4096, 2, ONE, 1, batch="b")]
    _ship(leader, follower, 1)
    leader.commit_slot("c1", slots[0], "k0", 2)
    leader.remove("k0", True, 2)
    _ship(leader, follower, 2)
    assert follower.state is not None and "k0" not in follower.state.objects
    assert follower.confirm("c1", ("k0",), 3, (slots[0],)) == ()
    assert follower.confirmed == {}
    # only under the key it was committed under, and only for that buffer
    assert follower.confirm("c1", ("other",), 3, (slots[0],)) == ("other",)
    # bounded: the most recent commits of buffers
    for i in range(_RENAMED_KEPT + 3):
        follower.settle(["rename", f"slot{i}", f"key{i}"])
        follower.settle(["commit", f"key{i}", 1, [], False, "c1"])
    assert len(follower.renamed) == _RENAMED_KEPT
    assert "slot0" not in follower.renamed and follower.renamed[f"slot{_RENAMED_KEPT + 2}"]


def test_a_removal_s_answer_reaches_the_standby_and_survives_compaction() -> None:
    """The answer a leader keeps with a removal (``keep_reply``) rides the stream
    and the journal: a promoted standby or a restarted master answers the
    client's retry of that Remove from it."""
    leader, follower = _pair()
    assert follower.state is not None
    leader.put_start("c1", "k", 64, ONE, 1)
    leader.put_end("c1", "k", 1)
    leader.remove("k", True, 2)
    leader.keep_reply("c1", 42, 0, None)
    records = _ship(leader, follower, 2)
    assert ["reply", "c1", 42, 0, None] in records
    assert list(follower.state.kept_replies) == [ReplyKept("c1", 42, 0, None)]
    # compaction (a journal rewrite, a new standby's full sync) keeps it
    snap = [effect_from_record(e.record()) for e in follower.state.snapshot_effects()]
    assert ReplyKept("c1", 42, 0, None) in snap
    restored = MasterState(MasterConfig(client_ttl_s=10))
    restored.replay(snap, 3)
    assert list(restored.kept_replies) == [ReplyKept("c1", 42, 0, None)]
    assert "k" not in restored.objects
    # bounded: the most recent ones
    for rid in range(KEPT_REPLIES_MAX + 5):
        leader.keep_reply("c2", rid, 0, 1)
    assert len(leader.kept_replies) == KEPT_REPLIES_MAX
    assert leader.kept_replies[-1].rid == KEPT_REPLIES_MAX + 4
