"""Leader -> standby replication of the master's effects (HA without loss).

Theory of operation
-------------------
A standby connects to the leader's RPC port (authenticating like any client)
and sends ``Follow``.  The leader answers with a stream of frames, each a
batch of effect records (``_effects.py``) with a sequence number: first its
current state a slice at a time (segments, readable objects, writes in
progress), interleaved in time order with the live effects of requests served
meanwhile -- every record is the state at the moment it was sent, so the
stream is a valid log from the start -- then ``synced``, then live effects
only.  The standby applies each frame to its own :class:`MasterState`; it
acknowledges the sequence number as soon as the frame is in (from the frame
id, in ``data_received``, before decoding the body).  Frames nobody waits for
-- a batch of PutStart reservations only -- carry a no-acknowledgement bit in
their id: acknowledgements are cumulative, so a put costs the standby one
acknowledgement and the leader one wake-up, at its PutEnd.

**The commit barrier.**  While at least one standby is in sync, the leader
holds a reply until a standby has acknowledged (a) the request's own durable
effects -- an acknowledged put, removal or mount is on a standby before its
client hears "ok" -- and (b) the last batch that freed buffers -- buffers freed
by a removal or an eviction are handed out again only once the standby knows
they were freed (otherwise a new leader could resurrect an object whose bytes
were already overwritten).  A PutStart's own reservation (``WriteStarted``) is
shipped without waiting: a put then costs one barrier, not two.  The price: a
write still in progress more than a lease period after its leader died may
land in buffers the new leader has handed out again (the new leader's warm-up
of one lease period is the margin; writes of KV-cache blocks take
milliseconds).  Buffers reserved ahead (``ReserveSlots``) are written at any
later time, so their reservation is durable: answered once a standby has it
(:func:`unwaited_start`).  A standby that does not
acknowledge within ``sync_timeout_s`` is dropped from the barrier (logged; it
re-enters when it catches up), so a dead standby costs one timeout, not the
service.

The cost is one leader->standby round trip per batch of requests that changed
state (requests served in one turn of the event loop share it); requests that
change nothing wait only if effects of others are still unacknowledged.

**Puts confirmed by their writer.**  A put's PutEnd would pay that round trip
after the leader's own; instead the client, which learns the standbys in sync
from its heartbeat (``PingReply.standbys``), sends ``HaConfirm(keys)`` to each
of them at the same moment as ``PutEnd(confirmed=standbys)`` to the leader.  A
standby that holds those keys as the client's writes in progress remembers them
(:meth:`Follower.confirm`) until its stream ends them, and a standby that
becomes the leader commits the ones still in progress.  The leader answers a
PutEnd naming every standby in sync without waiting for an acknowledgement;
the client counts the put as done once the leader *and* every standby answered.
A standby that does not know a key yet (its stream is behind), or cannot be
reached, makes the client send a plain PutEnd again: repeating an end is
harmless, and a plain end waits for everything shipped before it.  The two
round trips run in parallel, so HA costs a put one client-side send and
receive instead of two more process wake-ups in sequence.  Puts through
reserved buffers do the same with ``CommitSlot(confirmed=standbys)`` and
``HaConfirm(keys, slots)``: a standby vouches for a (buffer, key) pair when the
buffer is that client's reservation, and commits it under the key on promotion.
Leases and the reply cache are not replicated: after a failover readers ask
again, and a Remove retried across the failover may report OBJECT_NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from ..._authio import ClusterSecurity, client_handshake_async
from ..._loop import raw_transport, release_transport
from ..._net import is_local_address, split_host_port
from ...config import parse_bool_env
from ...errors import MooncakeError
from ...wire import MasterFrameDecoder, MasterReply, encode_reply, encode_request
from ...wire import _master_msgs as msg
from ...wire._master import master_unix_name
from ...wire._master_reply_msgs import FollowFrame
from .._config import MasterConfig
from .._types import ErrorCode
from ._effects import (
    Effect,
    ObjectDeleted,
    ReplicationEnded,
    SegmentUnmounted,
    WriteEnded,
    WriteStarted,
    effect_from_record,
)
from ._index import SHARDS
from ._records import BUSY, READABLE
from ._state import SLOT_PREFIX, MasterState

if TYPE_CHECKING:
    from ._service import _RpcProtocol

__all__ = ["DEFAULT_SYNC_TIMEOUT_S", "Follower", "ReplicationHub", "unwaited_start"]

log = logging.getLogger("pymooncake.master.ha")

#: how long the leader holds replies for a standby's acknowledgement before it
#: drops that standby from the commit barrier
DEFAULT_SYNC_TIMEOUT_S: Final = 2.0
#: a standby whose unsent stream exceeds this is disconnected (it re-syncs)
_MAX_BACKLOG: Final = 256 << 20
#: the stream's frames may be far larger than a request
_MAX_STREAM_FRAME: Final = 1 << 30
#: a stream frame's id: the sequence number in the low 31 bits, and this bit
#: when the frame asks for no acknowledgement
_SEQ_MASK: Final = 0x7FFFFFFF
_NO_ACK: Final = 0x80000000
#: effects that return buffers to the allocator
_FREES: Final = (ObjectDeleted, SegmentUnmounted, WriteEnded, ReplicationEnded)
#: stream records that end (or begin anew) a write of their key: a client's
#: confirmation of that write is settled by them
_SETTLES: Final = frozenset({"commit", "start", "abandon", "delete"})
#: confirmed commits wait this long for the next frame to ride along with (one
#: standby wake-up per put instead of two); nobody waits for them.
#: PYMOONCAKE_HA_COMMIT_DEFER_MS overrides it (tests hold commits back with it)
_DEFER_S: Final = 0.001
#: refused connections in a row after the stream ended that mean the leader's
#: process is gone (see Elector.leader_gone)
_REFUSALS_GONE: Final = 2
#: the reply of a master that does not lead
_NOT_LEADER: Final = int(ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS)
#: at least every this many frames one asks to be acknowledged
_ACK_EVERY: Final = 32
#: a confirmation the stream has not settled after this long is stale (the
#: leader answered that PutEnd with an error, or the client never sent it)
_CONFIRM_TTL_S: Final = 60.0
#: reserved buffers the stream committed that a standby remembers (with their
#: keys), for confirmations read after the commit and a removal of the key
_RENAMED_KEPT: Final = 8192
#: an idle stream carries an empty frame at least this often, so that a standby
#: tells a leader with nothing to say from one that stopped running (frozen:
#: see Elector, "a frozen leader")
HEARTBEAT_S: Final = 0.2
#: a standby that heard nothing from its leader for this long asks etcd whether
#: the leader still renews its lease (Elector: "a frozen leader")
FROZEN_SILENCE_S: Final = 4 * HEARTBEAT_S


def _defer_from_env() -> float:
    text = os.environ.get("PYMOONCAKE_HA_COMMIT_DEFER_MS", "")
    if not text:
        return _DEFER_S
    try:
        ms = float(text)
    except ValueError:
        ms = -1.0
    if not 0 <= ms <= 3_600_000:
        log.warning("PYMOONCAKE_HA_COMMIT_DEFER_MS=%r is not 0..3600000; using 1", text)
        return _DEFER_S
    return ms / 1000


class _Link:
    """One standby connected to this leader."""

    __slots__ = ("acked", "name", "proto", "ready", "req_id", "synced_seq")

    def __init__(self, proto: _RpcProtocol, req_id: int, name: str) -> None:
        self.proto = proto
        self.req_id = req_id
        self.name = name
        self.acked = 0
        self.ready = False  # in the commit barrier
        self.synced_seq = -1  # the sequence the initial state ended at


class ReplicationHub:
    """The leader's side: ships effects, tracks acknowledgements, releases replies."""

    def __init__(self, sync_timeout_s: float = DEFAULT_SYNC_TIMEOUT_S) -> None:
        self.sync_timeout_s = sync_timeout_s
        self.seq = 0
        #: the latest sequence number shipped in a frame that asks to be acknowledged
        self.ack_seq = 0
        self.acked = 0
        #: the last batch that freed buffers (deletes, unmounts, revoked writes)
        self.free_seq = 0
        self.links: dict[_RpcProtocol, _Link] = {}
        self._waiting: set[_RpcProtocol] = set()
        self.dropped = 0
        #: replies held for a standby's acknowledgement (a counter)
        self.held = 0
        #: records of confirmed commits not shipped yet: they go with the next
        #: frame, or after _DEFER_S (see :meth:`ship`)
        self._deferred: list[list[Any]] = []
        self._flush: asyncio.TimerHandle | None = None
        self._defer_s = _defer_from_env()
        #: when the last frame went out (time.monotonic)
        self.sent_at = 0.0

    # --- state --------------------------------------------------------------------

    def barrier(self, own: int = 0) -> int:
        """The sequence number a reply sent now must wait for (0: none): ``own``, the
        batch that carried the request's own durable effects, and in any case the
        last batch that freed buffers (a reply may hand them out again)."""
        need = max(own, self.free_seq)
        return need if need > self.acked and self.in_sync else 0

    @property
    def in_sync(self) -> bool:
        return any(link.ready for link in self.links.values())

    def ready_names(self) -> tuple[str, ...]:
        """RPC addresses of the standbys in the commit barrier (for clients that
        confirm their puts to them)."""
        return tuple(sorted(ln.name for ln in self.links.values() if ln.ready))

    def covered(self, confirmed: tuple[str, ...]) -> bool:
        """A client confirms its put to ``confirmed``: is that every standby in
        sync (so its PutEnd need not wait for one)?"""
        if not confirmed:
            return False
        return all(ln.name in confirmed for ln in self.links.values() if ln.ready)

    def status(self) -> list[dict[str, Any]]:
        return [
            {"standby": ln.name, "acked": ln.acked, "ready": ln.ready, "seq": self.seq}
            for ln in self.links.values()
        ]

    # --- leader side ----------------------------------------------------------------

    def ship(self, effects: list[Effect], *, confirmed: bool = False) -> int:
        """Send ``effects`` to every standby; returns their sequence number if a reply
        acknowledging them must wait for it (durable effects), else 0.
        ``confirmed``: they are the commits of puts whose clients confirm them to
        every standby themselves (``HaConfirm``): nobody waits for them."""
        if not self.links:
            self._deferred.clear()
            return 0
        records = [e.record() for e in effects]
        frees = any(isinstance(e, _FREES) for e in effects)
        if confirmed and not frees:
            # the commits of confirmed puts ride with the next frame (the next put's
            # reservation, typically) instead of waking the standby once more: the
            # standby already holds their clients' confirmations
            self._deferred += records
            if self._flush is None:
                self._flush = asyncio.get_running_loop().call_later(self._defer_s, self.flush)
            return 0
        if self._deferred:
            records = self._deferred + records
            self._deferred = []
        durable = not confirmed and not all(map(unwaited_start, effects))
        # nobody waits for a batch of reservations only (a PutStart's), nor for
        # confirmed commits: their frame asks for no acknowledgement, which saves
        # the standby a write and the leader a wake-up per put (acknowledgements
        # are cumulative: a later frame that asks covers it, see sync_point)
        # ... but every _ACK_EVERY frames one asks anyway, so that what the leader
        # knows of its standbys (lag, the sync timeout) stays current under load
        self._broadcast(records, ack=frees or durable or self.seq + 1 - self.ack_seq >= _ACK_EVERY)
        if frees:
            self.free_seq = self.seq
        return self.seq if durable else 0

    def flush(self) -> None:
        """Ship the deferred commits now.  This frame asks to be acknowledged: it
        goes when no other frame followed them for a while (the stream is idle),
        and the acknowledgement brings the leader's view of its standbys up to date."""
        self._flush = None
        if self._deferred:
            records, self._deferred = self._deferred, []
            if self.links:
                self._broadcast(records, ack=True)

    def heartbeat(self, now: float) -> None:
        """An empty frame if nothing went to the standbys for :data:`HEARTBEAT_S`
        (called by the leader's periodic tick).  It asks to be acknowledged, which
        keeps what the leader knows of its standbys current while idle too."""
        if self.links and now - self.sent_at >= HEARTBEAT_S:
            if self._deferred:
                self.flush()
            else:
                self._broadcast([], ack=True)

    def sync_point(self) -> int:
        """The sequence number covering everything shipped so far, asking the
        standbys to acknowledge it (an empty frame) if no frame since did."""
        self.flush()
        if self.links and self.seq > self.ack_seq:
            self._broadcast([], ack=True)
        return self.ack_seq

    def _broadcast(self, records: list[list[Any]], *, ack: bool) -> None:
        """One frame of ``records``, with the next sequence number, to every standby."""
        self.seq += 1
        self.sent_at = time.monotonic()
        if ack:
            self.ack_seq = self.seq
        frame = FollowFrame(self.seq, tuple(records))
        for link in list(self.links.values()):
            self._send(link, frame, ack=ack)

    def _send(self, link: _Link, frame: FollowFrame, *, ack: bool = True) -> None:
        transport = link.proto.transport
        if transport is None:
            return
        # the frame id carries the sequence number (31 bits) and, in its top bit,
        # whether the frame asks for no acknowledgement: the standby acknowledges
        # from the prefix, before it decodes and applies the body
        frame_id = (frame.seq & _SEQ_MASK) | (0 if ack else _NO_ACK)
        transport.write(encode_reply(frame_id, 0, frame.to_wire()))
        if transport.get_write_buffer_size() > _MAX_BACKLOG:
            log.error(
                "HA: standby %s is %d bytes behind; disconnecting it (it will re-sync)",
                link.name,
                transport.get_write_buffer_size(),
            )
            link.proto.abort()

    async def follow(
        self, proto: _RpcProtocol, req_id: int, req: msg.Follow, state: MasterState
    ) -> None:
        """Serve a new standby: the current state a slice at a time, then live."""
        self.flush()  # the state sent next has these commits: they must not follow it
        link = _Link(proto, req_id, req.standby or str(proto.peer))
        self.links[proto] = link
        log.info("HA: standby %s connected; sending the current state", link.name)
        self._send(
            link, FollowFrame(self.seq, tuple([e.record() for e in state.segment_effects()]))
        )
        for i in range(SHARDS):
            records = [e.record() for e in state.shard_effects(i, writes=True)]
            if records:
                self._send(link, FollowFrame(self.seq, tuple(records)))
            if i % 32 == 31:
                await asyncio.sleep(0)
            if proto not in self.links:
                return
        link.synced_seq = self.seq
        self._send(link, FollowFrame(self.seq, (), synced=True))

    def on_ack(self, proto: _RpcProtocol, seq: int) -> None:
        link = self.links.get(proto)
        if link is None:
            return
        # the standby echoes the frame id's 31 bits: the sequence number it means is
        # the latest one shipped that has them (a standby is never 2**31 behind)
        seq = self.seq - ((self.seq - seq) & _SEQ_MASK)
        link.acked = max(link.acked, seq)
        if (
            not link.ready
            and link.synced_seq >= 0
            and link.acked >= max(link.synced_seq, self.ack_seq)
        ):
            link.ready = True
            log.info("HA: standby %s is in sync at %d; puts now wait for it", link.name, seq)
        self._advance()

    def lost(self, proto: _RpcProtocol) -> None:
        link = self.links.pop(proto, None)
        self._waiting.discard(proto)
        if link is not None:
            log.warning("HA: standby %s disconnected", link.name)
            self._advance()

    def _advance(self) -> None:
        ready = [ln.acked for ln in self.links.values() if ln.ready]
        self.acked = max(ready) if ready else self.seq  # no standby in sync: nothing to wait for
        for proto in list(self._waiting):
            if proto.release_held(self.acked):
                self._waiting.discard(proto)

    def wait(self, proto: _RpcProtocol) -> None:
        """``proto`` holds replies until :meth:`_advance` releases them."""
        self._waiting.add(proto)

    def check(self, now: float) -> None:
        """Drop standbys that kept replies waiting longer than ``sync_timeout_s``."""
        oldest = min((p.held_since for p in self._waiting if p.held_since), default=None)
        if oldest is None or now - oldest <= self.sync_timeout_s:
            return
        for link in self.links.values():
            if link.ready and link.acked < self.ack_seq:
                link.ready = False
                self.dropped += 1
                log.error(
                    "HA: standby %s did not acknowledge within %.1f s (at %d of %d); replies no "
                    "longer wait for it until it catches up -- a failover now may lose the "
                    "latest puts",
                    link.name,
                    self.sync_timeout_s,
                    link.acked,
                    self.seq,
                )
        self._advance()


def unwaited_start(effect: Effect) -> bool:
    """A PutStart's reservation: shipped without waiting for a standby (see
    "The commit barrier").  Buffers reserved ahead (``ReserveSlots``) are not:
    their client writes into them at any later time, possibly after this
    leader died, so a standby must have them before their client does."""
    return type(effect) is WriteStarted and not effect.key.startswith(SLOT_PREFIX)


def _upserting(obj: Any) -> bool:
    """An upsert's replacement is in progress (not confirmable: a commit would
    not end it as it is)."""
    ext = obj.ext
    return ext is not None and bool(ext.pending)


class Follower:
    """The standby's side: keeps a :class:`MasterState` equal to the leader's.

    Args:
        leader: ``host:port`` of the leader's RPC port.
        on_state: called with each fresh state (at every (re)connection).
    """

    def __init__(
        self,
        config: MasterConfig,
        name: str,
        security: ClusterSecurity,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.name = name
        self.security = security
        self._clock = clock
        self.state: MasterState | None = None
        self.synced = False
        self.seq = 0
        self.leader = ""
        #: key -> (writer, when, reserved buffer or ""): writes in progress their
        #: writer confirmed as complete (``HaConfirm``), until the stream ends
        #: them; committed if this standby becomes the leader first
        self.confirmed: dict[str, tuple[str, float, str]] = {}
        #: reserved buffer -> key: the latest commits of buffers the stream brought
        #: (:data:`_RENAMED_KEPT`); a confirmation of one of them is settled even
        #: when the key was removed or evicted by the time it is read
        self.renamed: dict[str, str] = {}
        #: key -> reserved buffer: a rename whose commit is not applied yet (the
        #: two travel in one frame; kept apart all the same)
        self._renaming: dict[str, str] = {}
        #: confirmations waiting for the next frame (:meth:`wait_applied`)
        self._waiters: list[asyncio.Future[None]] = []
        #: when the leader's stream last brought bytes (time.monotonic)
        self.heard = 0.0
        #: the current connection to the leader got in sync (see :meth:`run`)
        self._in_sync_once = False
        #: called after each read of the stream was applied (the service reads
        #: the confirmations clients posted without waiting then)
        self.on_frame: Callable[[], None] | None = None

    def silent_for(self, now: float) -> float | None:
        """Seconds since the leader's stream last brought anything (it sends at
        least every :data:`HEARTBEAT_S`); None before this standby was in sync.
        Read from the elector's thread."""
        if not self.synced:
            return None
        return now - self.heard

    def confirm(
        self, client_id: str, keys: tuple[str, ...], now: float, slots: tuple[str, ...] = ()
    ) -> tuple[str, ...]:
        """Remember ``keys`` as complete writes of ``client_id`` (written into the
        reserved buffers ``slots``, one per key, when given); returns those this
        standby cannot vouch for (unknown here yet, or not that client's)."""
        state = self.state
        if state is None or not self.synced:
            return keys
        confirmed = self.confirmed
        while confirmed:  # drop stale ones (oldest first: insertion order)
            first = next(iter(confirmed))
            if now - confirmed[first][1] <= _CONFIRM_TTL_S:
                break
            del confirmed[first]
        missing: list[str] = []
        objects = state.objects
        for i, key in enumerate(keys):
            slot = slots[i] if slots else ""
            if slot:
                buffer = objects.get(slot)
                if (
                    buffer is not None
                    and buffer.writer == client_id
                    and buffer.flags & (BUSY | READABLE) == BUSY
                    and not _upserting(buffer)
                ):
                    confirmed.pop(key, None)
                    confirmed[key] = (client_id, now, slot)
                    continue
                if self.renamed.get(slot) == key:
                    # the stream committed this buffer under this key (a lazy
                    # confirmation is read after the frames that came meanwhile,
                    # which may also have removed or evicted the key)
                    continue
                # no such reservation here: committed already (the stream was
                # first) when the key is that client's readable object
            obj = objects.get(key)
            if obj is None or obj.writer != client_id:
                missing.append(key)
            elif obj.flags & BUSY:
                if slot or _upserting(obj):  # committed by the stream only, or an upsert
                    missing.append(key)
                else:
                    confirmed.pop(key, None)
                    confirmed[key] = (client_id, now, "")
            elif not obj.flags & READABLE:
                missing.append(key)
            # else: committed already (the stream was first): nothing to remember
        return tuple(missing)

    def settle(self, rec: list[Any]) -> None:
        """The bookkeeping of confirmations after the stream's record ``rec`` was
        applied: a write it ends is no longer remembered as confirmed; a reserved
        buffer it commits (a rename, then the key's commit) is remembered with its
        key (``renamed``)."""
        kind = rec[0]
        if kind in _SETTLES:
            if self.confirmed:
                self.confirmed.pop(rec[1], None)
            if self._renaming:
                slot = self._renaming.pop(rec[1], None)
                if slot is not None and kind == "commit":
                    # remembered once the commit that follows the rename is applied
                    renamed = self.renamed
                    renamed[slot] = rec[1]
                    if len(renamed) > _RENAMED_KEPT:
                        del renamed[next(iter(renamed))]
        elif kind == "rename":
            self._renaming[rec[2]] = rec[1]

    async def wait_applied(self, timeout_s: float) -> None:
        """Until the stream's next frame is applied (or ``timeout_s``)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            pass

    def _applied(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def take_confirmed(self) -> list[tuple[str, str, str]]:
        """The confirmed writes the stream did not end: (key, writer, reserved
        buffer or "") each."""
        out = [(k, w, slot) for k, (w, _, slot) in self.confirmed.items()]
        self.confirmed.clear()
        return out

    async def run(
        self,
        leader: str,
        view_version: int,
        on_state: Callable[[MasterState], None],
        on_gone: Callable[[str], None] | None = None,
    ) -> None:
        """Follow ``leader`` until cancelled, reconnecting with backoff.  A new
        state replaces the current one (``on_state``) only once it is complete.
        ``on_gone(leader)``: the stream ended and the leader then refused
        connections twice in a row (its process is gone), called once."""
        self.leader = leader
        pause = 0.1
        refused = 0
        told = False
        while True:
            self._in_sync_once = False
            try:
                await self._follow_once(leader, view_version, on_state)
                pause = 0.1
            except ConnectionRefusedError as exc:
                refused += 1
                log.warning("HA: the leader at %s refuses connections: %s", leader, exc)
                if self.synced and refused >= _REFUSALS_GONE and not told and on_gone:
                    told = True
                    on_gone(leader)
            except _NoLongerLeader as exc:
                # it stopped serving (its lease deadline passed: cut off from etcd) and
                # says so: no need to wait for etcd's expiry of its lease either
                log.warning("HA: the master at %s no longer leads: %s", leader, exc)
                if self.synced and not told and on_gone:
                    told = True
                    on_gone(leader)
            except (OSError, MooncakeError, asyncio.IncompleteReadError) as exc:
                log.warning("HA: following the leader at %s failed: %s; retrying", leader, exc)
            else:
                refused = 0
            if self._in_sync_once:
                # a stream that was in sync ended: a fresh start, not the backoff
                # of the retries before it (those ran up to 1 s while the leader
                # warmed up, and a dead leader's lease would be revoked ~2 s late)
                pause, refused = 0.1, 0
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def _follow_once(
        self, leader: str, view_version: int, on_state: Callable[[MasterState], None]
    ) -> None:
        host, port = split_host_port(leader)
        reader, writer = await self._connect(host, port or 50051)
        try:
            key = self.security.key
            if key is not None:
                await client_handshake_async(
                    reader,
                    writer,
                    key,
                    b"master-rpc",
                    timeout_s=5.0,
                    port="master RPC port (HA stream)",
                    peer=leader,
                )
            # the state being rebuilt; the last complete one stays current meanwhile
            # (if the leader dies during a re-sync, it is the better of the two)
            state = MasterState(self.config)
            live = False

            def apply(decoder: MasterFrameDecoder) -> None:
                nonlocal live
                self.heard = time.monotonic()
                while True:
                    frame = decoder.next_frame()
                    if not isinstance(frame, MasterReply):
                        if self._waiters:
                            self._applied()
                        if self.on_frame is not None:
                            self.on_frame()
                        return
                    if frame.code == _NOT_LEADER:
                        raise _NoLongerLeader(f"the leader refused to stream: {frame.value}")
                    if frame.code != 0:
                        raise MooncakeError(f"the leader refused to stream: {frame.value}")
                    stream = FollowFrame.decode(frame.value)
                    now = self._clock()
                    settle = self.settle
                    for rec in stream.effects:
                        state.apply(effect_from_record(rec), now)
                        settle(rec)
                    self.seq = stream.seq
                    if stream.synced and not live:
                        live = self._in_sync_once = True
                        self.state = state
                        self.synced = True
                        on_state(state)
                        log.info("HA: in sync with the leader at %s (seq %d)", leader, self.seq)

            # from here on the stream is read by a protocol, not the StreamReader: it
            # acknowledges in data_received, one event-loop turn earlier (the
            # handshake read exactly its own bytes and the leader sends nothing
            # before Follow, so the StreamReader holds nothing)
            receiver = _StreamReceiver(apply, asyncio.get_running_loop())
            transport = writer.transport
            receiver.transport = transport
            transport.set_protocol(receiver)
            transport.write(encode_request(1, msg.Follow(self.name, view_version)))
            await receiver.done
        finally:
            raw = raw_transport(writer.transport)
            writer.close()
            release_transport(raw)

    async def _connect(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A leader on this host is reached on its abstract UNIX socket, as clients
        do (no TCP stack on either side: a put ships frames to its standby), unless
        PYMOONCAKE_SAME_HOST=0; else TCP, with TLS when PYMOONCAKE_TLS_* are set."""
        if parse_bool_env("PYMOONCAKE_SAME_HOST", os.environ.get("PYMOONCAKE_SAME_HOST", "1")):
            loop = asyncio.get_running_loop()
            if await loop.run_in_executor(None, is_local_address, host):
                names = [master_unix_name(h, port) for h in (host, "0.0.0.0", "::")]
                for name in names:
                    try:
                        return await asyncio.open_unix_connection(name)
                    except OSError:
                        continue
        tls = self.security.client_ssl_context()
        return await asyncio.open_connection(
            host, port, ssl=tls, server_hostname=host if tls is not None else None
        )


class _NoLongerLeader(MooncakeError):
    """The master followed answered that it does not lead (any more)."""


class _StreamReceiver(asyncio.Protocol):
    """The standby's end of the stream: each read's complete frames are
    acknowledged at once, from their prefixes, before they are decoded and
    applied (by ``apply``, in the same callback)."""

    def __init__(
        self, apply: Callable[[MasterFrameDecoder], None], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.apply = apply
        self.decoder = MasterFrameDecoder(_MAX_STREAM_FRAME)
        self.transport: asyncio.BaseTransport | None = None
        #: resolves (with the error) when the stream ends
        self.done: asyncio.Future[None] = loop.create_future()
        self._ack_id = 2

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if self.done.done() or not isinstance(transport, asyncio.WriteTransport):
            return
        decoder = self.decoder
        decoder.feed(data)
        wanted = [i for i in decoder.complete_ids() if not i & _NO_ACK]
        if wanted:  # acknowledge on receipt: the effects are in this process now
            transport.write(encode_request(self._ack_id, msg.Ack(max(wanted))))
            self._ack_id += 1
        try:
            self.apply(decoder)
        except Exception as exc:  # a refusal, a malformed frame, a bad record
            self._finish(exc)
            transport.abort()

    def eof_received(self) -> bool | None:
        self._finish(ConnectionResetError("the leader closed the stream"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc or ConnectionResetError("the leader closed the stream"))

    def _finish(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
