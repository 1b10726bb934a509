"""A master past its lease deadline acknowledges nothing, not even replies it
held for a standby before the deadline.

A leader holds each reply until a standby has the request's effects.  If the
leader is frozen (SIGSTOP) or cut off from etcd, a standby takes over; when the
old leader wakes and its standby's stream closes, replies it still held must not
go out as "ok": the new leader may never have received their effects (a put
acknowledged that way is lost).  The master closes such connections instead;
clients send the same request ids to the new leader.

These tests play the standby by hand on a real master (no etcd needed) and
move the lease deadline into the past.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from pymooncake._net import split_host_port
from pymooncake.store.master import ThreadedMaster
from pymooncake.store.master._service import MasterService
from pymooncake.wire import MasterFrameDecoder, MasterReply, encode_request
from pymooncake.wire import _master_msgs as msg


@pytest.fixture
def master() -> Iterator[ThreadedMaster]:
    with ThreadedMaster(metrics_port=None) as m:
        yield m


def _connect(master: ThreadedMaster) -> socket.socket:
    host, port = split_host_port(master.rpc_address)
    sock = socket.create_connection((host, port or 0), timeout=5)
    sock.settimeout(5)
    return sock


def _replies(sock: socket.socket, decoder: MasterFrameDecoder, n: int) -> list[MasterReply]:
    out: list[MasterReply] = []
    while len(out) < n:
        frame = decoder.next_frame()
        if isinstance(frame, MasterReply):
            out.append(frame)
            continue
        data = sock.recv(1 << 16)
        if not data:
            raise ConnectionResetError("closed")
        decoder.feed(data)
    return out


def _follow(master: ThreadedMaster) -> socket.socket:
    """A standby in the commit barrier that acknowledges nothing more."""
    svc: MasterService = master.service

    def collect_effects(_state: object) -> None:
        svc.state.effects = []  # as an HA master does (effects feed the stream)

    master.call(collect_effects)
    standby = _connect(master)
    try:
        standby.sendall(encode_request(1, msg.Follow("hand-made-standby", 0)))
        decoder = MasterFrameDecoder(1 << 30)
        seq = 0
        for _ in range(10_000):
            (frame,) = _replies(standby, decoder, 1)
            seq = frame.value["seq"]
            if frame.value.get("synced"):
                break
        standby.sendall(encode_request(2, msg.Ack(seq)))
        deadline = time.monotonic() + 5
        while not master.call(lambda _state: svc.hub.in_sync):
            assert time.monotonic() < deadline, "the hand-made standby never got in sync"
            time.sleep(0.01)
    except BaseException:
        standby.close()
        raise
    return standby


def _mount(client_id: str) -> bytes:
    segment = msg.SegmentParams(f"seg-{client_id}", "10.0.0.9:15000", 1 << 20, 1 << 20)
    return encode_request(7, msg.MountSegment(client_id, segment, rid=1, ack=1))


def _past_deadline(master: ThreadedMaster) -> None:
    """As if this leader's etcd lease deadline had passed (frozen, or cut off)."""
    svc: MasterService = master.service

    def move(_state: object) -> None:
        svc._keep = SimpleNamespace(deadline=time.monotonic() - 1.0)

    master.call(move)


def test_a_held_reply_is_sent_once_the_standby_has_the_effects(master: ThreadedMaster) -> None:
    standby = _follow(master)
    client = _connect(master)
    try:
        client.sendall(_mount("c1"))
        client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.recv(1)  # held: the standby has not acknowledged the mount
        standby.close()  # the standby goes away: replies no longer wait for it
        client.settimeout(5)
        (reply,) = _replies(client, MasterFrameDecoder(), 1)
        assert reply.code == 0
    finally:
        client.close()
        standby.close()


def test_replies_held_when_the_lease_deadline_passed_are_never_sent(
    master: ThreadedMaster,
) -> None:
    standby = _follow(master)
    client = _connect(master)
    try:
        client.sendall(_mount("c2"))
        client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.recv(1)
        # the leader was frozen past its lease: another master may lead by now
        _past_deadline(master)
        standby.close()  # (the new leader stopped following this one)
        client.settimeout(5)
        with pytest.raises((ConnectionResetError, ConnectionError)):
            _replies(client, MasterFrameDecoder(), 1)
    finally:
        client.close()
        standby.close()


def test_a_master_past_its_deadline_refuses_new_requests(master: ThreadedMaster) -> None:
    _past_deadline(master)
    client = _connect(master)
    try:
        client.sendall(_mount("c3"))
        (reply,) = _replies(client, MasterFrameDecoder(), 1)
        assert reply.code == -1010  # UNAVAILABLE_IN_CURRENT_STATUS: ask the new leader
    finally:
        client.close()


def test_an_idle_leader_streams_a_heartbeat_its_standby_can_time(
    master: ThreadedMaster,
) -> None:
    """Nothing happens on the store, yet the standby hears from its leader every
    HEARTBEAT_S: silence means a frozen leader, not an idle one (see _ha.py)."""
    from pymooncake.store.master._replication import FROZEN_SILENCE_S, HEARTBEAT_S

    standby = _follow(master)
    try:
        decoder = MasterFrameDecoder(1 << 30)
        started = time.monotonic()
        arrivals: list[float] = []
        seqs: list[int] = []
        while time.monotonic() - started < 10 * HEARTBEAT_S:
            (frame,) = _replies(standby, decoder, 1)
            arrivals.append(time.monotonic())
            seqs.append(frame.value["seq"])
            assert frame.value["effects"] == []  # empty: nothing happened
            # each asks to be acknowledged (its id has no no-ack bit)
            assert frame.id == seqs[-1]
            standby.sendall(encode_request(3 + len(seqs), msg.Ack(seqs[-1])))
        assert len(arrivals) >= 5, arrivals
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        # the tick runs every 0.1 s: a heartbeat every HEARTBEAT_S, give or take a
        # tick; what matters is that an idle leader never looks frozen to a standby
        assert max(gaps) < FROZEN_SILENCE_S, gaps
        svc: MasterService = master.service
        assert master.call(lambda _state: max(ln.acked for ln in svc.hub.links.values())) > 0
    finally:
        standby.close()
