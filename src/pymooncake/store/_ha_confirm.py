"""HA: a client confirms the puts it ends to the leader's standbys itself.

With master HA the leader answers a put's PutEnd only once a standby has the
commit, so that a failover loses no acknowledged put.  Done by the leader, that
is a second round trip after the client's (leader -> standby -> leader).  This
module takes it off the critical path: the heartbeat tells the client which
standbys are in sync (``PingReply.standbys``); ending puts, the client sends
``HaConfirm(keys)`` to each of them and ``PutEnd(confirmed=standbys)`` to the
leader at the same moment, and counts the puts as done once all answered.  A
standby remembers confirmed writes until its stream from the leader ends them;
one that becomes the leader commits the rest (``_replication.py``).  A put
written into a buffer reserved ahead is committed the same way: ``CommitSlot``
(or ``BatchCommitSlots``) with ``confirmed`` to the leader, and ``HaConfirm``
naming the buffer of each key to the standbys.

When a standby cannot vouch for a key (its stream is behind, it is gone, or it
is no longer a standby) the client sends a plain PutEnd for it: ending a put
again is harmless, and the leader answers a plain end only once a standby has
everything shipped before it -- the protocol without confirmations.

**Lazy confirmations** (commits of buffers reserved ahead; on unless
``PYMOONCAKE_HA_LAZY_CONFIRM=0``).  Waiting for the standby's answer costs a
wake-up of a third process per put, which on a host whose cores the client,
leader and standby share is most of an HA put (measured: the standby used
80-170 us of CPU per 4 KiB put).  A reserved buffer is known to every standby
in sync before its client gets it (the leader answers the reservation only
once a standby acknowledged it), so its confirmation needs no answer to be
useful: the client *posts* ``HaConfirm(lazy=True)`` on a connection of its own
to each standby (one send), sends the commit to the leader and waits for the
leader only.  The standby does not read that connection when bytes arrive; it
reads it after each frame of the leader's stream (it wakes for those anyway),
on its tick, and -- what makes the put durable -- before it takes over as the
leader, so a confirmation in its socket buffer is never lost to a failover.
The answers are read later, without waiting: when a standby could not vouch
for a key, the client sends the leader a barrier (the commit of a buffer that
never exists, refused only once a standby has everything shipped before it).
The window this leaves: a put acknowledged by a leader that then dies is
lost if its confirmation never reached the standby either -- the writer's host
died, or was cut off from the standby, within the moment after the put.  With
``PYMOONCAKE_HA_LAZY_CONFIRM=0`` the client waits for the standby's answer (such
a put then fails instead).  A buffer whose commit the leader refused is revoked,
never reused, while confirmations of it may be remembered by a standby.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._authio import ClusterSecurity
from .._logging import RepeatLimiter
from ..config import parse_bool_env
from ..errors import MalformedMessage, MooncakeError, RpcFailed, StoreError
from ..wire import _master_msgs as msg
from ._master_client import MasterClient, MasterLink
from ._types import ErrorCode

__all__ = ["LAZY_ENV", "StandbyConfirms", "lazy_from_env"]

LAZY_ENV = "PYMOONCAKE_HA_LAZY_CONFIRM"


def lazy_from_env(env: Mapping[str, str] | None = None) -> bool:
    """``PYMOONCAKE_HA_LAZY_CONFIRM``: post the confirmations of commits of buffers
    reserved ahead without waiting for the standbys' answers (unset: on).

    Raises:
        ValueError: not a boolean word; the message names the variable.
    """
    raw = (os.environ if env is None else env).get(LAZY_ENV, "")
    return True if not raw.strip() else parse_bool_env(LAZY_ENV, raw)


log = logging.getLogger("pymooncake.store")

#: a standby that does not answer a confirmation within this long is skipped
#: (the leader drops a silent standby from its barrier after --ha_sync_timeout_ms)
_CONFIRM_TIMEOUT_S = 2.0
_CONNECT_TIMEOUT_S = 0.5

#: a master that is not (or no longer) the leader answers this
_NOT_LEADER = int(ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS)
#: a reserved buffer the leader does not hold (any more)
_NOT_FOUND = int(ErrorCode.OBJECT_NOT_FOUND)

#: a put reads the answers to lazy confirmations once this many are outstanding
#: (one system call saved per put; the heartbeat reads them too)
_ANSWERS_EVERY = 32

#: the requests that end puts
_End = msg.PutEnd | msg.BatchPutEnd | msg.CommitSlot | msg.BatchCommitSlots

#: (code, message) per key: 0 and None when the put ended
Result = tuple[int, str | None]


class StandbyConfirms:
    """The standbys this client confirms its puts to (empty without HA)."""

    def __init__(
        self,
        client_id: str,
        *,
        security: ClusterSecurity | None = None,
        same_host_rpc: bool = True,
        gil_hold_s: float = 0.0,
        spin_s: float = 0.0,
        lazy: bool | None = None,
    ) -> None:
        self.client_id = client_id
        #: commits of reserved buffers confirmed without waiting (module docstring)
        self.lazy = lazy_from_env() if lazy is None else lazy
        #: per standby: the connection lazy confirmations are posted on
        self._links: dict[str, MasterLink] = {}
        self._link_lock = threading.Lock()
        self._security = security
        self._same_host = same_host_rpc
        self._hold = gil_hold_s
        self._spin = spin_s
        self._lock = threading.Lock()
        self._clients: dict[str, MasterClient] = {}
        #: the standbys in sync, as the leader's latest heartbeat reply named them
        self.standbys: tuple[str, ...] = ()
        self._log = RepeatLimiter(log, every=60)
        #: keys ended with every standby confirming them / ended again plainly
        #: because a standby could not (counters, for tests and benchmarks)
        self.confirmed_keys = 0
        self.fallback_keys = 0

    def update(self, standbys: tuple[str, ...]) -> None:
        """The leader's heartbeat reply named ``standbys`` as in sync."""
        if standbys == self.standbys:
            return
        with self._lock:
            self.standbys = standbys
            gone = [self._clients.pop(a) for a in list(self._clients) if a not in standbys]
        with self._link_lock:
            links = [self._links.pop(a) for a in list(self._links) if a not in standbys]
        for link in links:
            link.close()
        for c in gone:
            c.close()

    def _client(self, address: str) -> MasterClient:
        with self._lock:
            client = self._clients.get(address)
            if client is None:
                client = self._clients[address] = MasterClient(
                    address,
                    timeout_s=_CONFIRM_TIMEOUT_S,
                    connect_timeout_s=_CONNECT_TIMEOUT_S,
                    same_host_rpc=self._same_host,
                    security=self._security,
                    reconnect_s=0.0,
                    gil_hold_s=self._hold,
                    spin_s=self._spin,
                )
            return client

    def _skip(self, address: str, exc: MooncakeError) -> None:
        """``address`` failed: leave it out until the next heartbeat names it again."""
        self._log(
            f"confirm:{address}",
            logging.WARNING,
            "HA: standby %s did not confirm puts (%s); the leader waits for its standby "
            "instead until the next heartbeat",
            address,
            exc,
        )
        with self._lock:
            self.standbys = tuple(a for a in self.standbys if a != address)

    def end(
        self,
        master: MasterClient,
        keys: Sequence[str],
        *,
        batch: bool,
        slots: Sequence[str] = (),
    ) -> list[Result]:
        """End the puts of ``keys`` at the leader (``master``) with every standby
        confirming them; (code, message) per key.  ``slots``: the puts were
        written into these buffers reserved ahead (one per key), which the
        leader commits under ``keys`` (``CommitSlot``) instead of ending puts.

        Raises:
            RpcFailed / RpcTimeout: the leader could not be reached (as ``call``).
        """
        keys = tuple(keys)
        slots = tuple(slots)
        if slots and self.lazy:
            return self._end_lazily(master, keys, batch, slots)
        standbys = self.standbys
        request = self._request(keys, batch, standbys, slots)
        leader = self._send(master, request)  # the leader first: its part is the longer one
        finishes: list[tuple[str, Callable[[], Any]]] = []
        unsure: set[str] = set()
        for address in standbys:
            try:
                confirm = msg.HaConfirm(self.client_id, keys, slots)
                finishes.append((address, self._client(address).send(confirm)))
            except MooncakeError as exc:
                self._skip(address, exc)
                unsure.update(keys)
        try:
            results = self._results(master, request, leader)
            if slots:
                self._committed_before(master, keys, results)
        finally:
            for address, finish in finishes:
                try:
                    unsure.update(finish().missing)
                except MooncakeError as exc:
                    self._skip(address, exc)
                    unsure.update(keys)
        redo = [i for i, k in enumerate(keys) if results[i][0] == 0 and k in unsure]
        self.confirmed_keys += len(keys) - len(redo)
        self.fallback_keys += len(redo)
        if redo:
            # a standby could not vouch for them: end them again, plainly (harmless),
            # which the leader answers once a standby has everything before it
            again = self._results(master, self._request(tuple(keys[i] for i in redo), batch, ()))
            for i, result in zip(redo, again, strict=True):
                results[i] = result
        return results

    @staticmethod
    def _send(master: MasterClient, request: _End) -> Callable[[], Any] | None:
        """One attempt at ``request`` to the leader, its answer read later; None
        when the leader is not connected now (:meth:`_results` then calls, which
        reconnects and finds the leader)."""
        try:
            return master.send(request)
        except MooncakeError:
            return None

    def _end_lazily(
        self, master: MasterClient, keys: tuple[str, ...], batch: bool, slots: tuple[str, ...]
    ) -> list[Result]:
        """:meth:`end` of commits of reserved buffers, their confirmations posted
        to the standbys without waiting for the answers (module docstring)."""
        standbys = self.standbys
        request = self._request(keys, batch, standbys, slots)
        leader = self._send(master, request)  # the leader first: its part is the longer one
        confirm = msg.HaConfirm(self.client_id, keys, slots, lazy=True)
        unsure = False
        late: list[tuple[str, str]] = []
        for address in standbys:
            try:
                self._post(address, confirm, late)
            except MooncakeError as exc:
                self._skip(address, exc)
                unsure = True
        results = self._results(master, request, leader)
        self._committed_before(master, keys, results)
        if unsure:
            # a standby may not have the confirmation: wait for the leader's standby
            # to have the commits instead (a barrier)
            late += [
                (k, s) for (code, _), k, s in zip(results, keys, slots, strict=True) if not code
            ]
        else:
            self.confirmed_keys += len(keys)
        self._repair(master, late)
        return results

    def _post(self, address: str, confirm: msg.HaConfirm, late: list[tuple[str, str]]) -> None:
        """Post ``confirm`` to the standby at ``address``; adds to ``late`` the
        (key, buffer) pairs of earlier confirmations it answered it could not
        vouch for, or whose link broke before it answered.

        Raises:
            RpcFailed: the standby cannot be reached.
        """
        with self._link_lock:
            link = self._links.get(address)
            if link is not None:
                if link.outstanding >= _ANSWERS_EVERY:  # (else the heartbeat reads them)
                    late += self._unvouched(link)
                if link.open:
                    try:
                        link.post(confirm)
                        return
                    except RpcFailed:
                        # the link broke (the standby closed it while idle, or
                        # restarted): what it carried is unsure; a new one is tried
                        late += self._unvouched(link)
            link = self._links[address] = self._client(address).link()
            try:
                link.post(confirm)
            except RpcFailed:
                late += self._unvouched(link)
                raise

    @staticmethod
    def _unvouched(link: MasterLink) -> list[tuple[str, str]]:
        """The (key, buffer) pairs of the answers ``link`` has received that say
        the standby could not vouch for them."""
        out: list[tuple[str, str]] = []
        for request, answer in link.answers():
            assert isinstance(request, msg.HaConfirm)
            if isinstance(answer, BaseException):
                out += zip(request.keys, request.slots, strict=True)
            elif answer.missing:
                missing = set(answer.missing)
                out += [
                    (k, s) for k, s in zip(request.keys, request.slots, strict=True) if k in missing
                ]
        return out

    def settle(self, master: MasterClient) -> None:
        """Read the standbys' answers to lazy confirmations that arrived (the
        heartbeat calls this); for what they could not vouch for, a barrier."""
        if not self._links:
            return
        late: list[tuple[str, str]] = []
        with self._link_lock:
            for link in self._links.values():
                late += self._unvouched(link)
        self._repair(master, late)

    def _repair(self, master: MasterClient, late: list[tuple[str, str]]) -> None:
        """Standbys could not vouch for the (key, buffer) pairs: make sure a standby
        has what the leader acknowledged.  One barrier does: the commit of a buffer
        no reservation is ever named after (reservations count from 1), which the
        leader refuses -- without changing anything -- only once a standby has
        everything it shipped before, those commits included.  (Committing the
        buffers again would do the same, but could store a key whose commit the
        leader had refused and that was removed since.)"""
        if not late:
            return
        self.fallback_keys += len(late)
        self._log(
            "confirm:late",
            logging.INFO,
            "HA: a standby could not vouch for %d put(s) confirmed without waiting "
            "(e.g. %r); waited for the leader's standby to have them",
            len(late),
            late[0][0],
        )
        barrier = msg.CommitSlot(self.client_id, msg.slot_name(self.client_id, "0", 0), late[0][0])
        try:
            master.call(barrier)
        except MooncakeError as exc:  # "not found" is the barrier's expected answer
            if not (isinstance(exc, StoreError) and exc.code == _NOT_FOUND):
                log.warning("HA: the barrier for %d put(s) failed: %s", len(late), exc)

    def _request(
        self,
        keys: tuple[str, ...],
        batch: bool,
        confirmed: tuple[str, ...],
        slots: tuple[str, ...] = (),
    ) -> _End:
        client = self.client_id
        if not batch and len(keys) == 1:
            if slots:
                return msg.CommitSlot(client, slots[0], keys[0], confirmed=confirmed)
            return msg.PutEnd(client, keys[0], confirmed=confirmed)
        if slots:
            return msg.BatchCommitSlots(client, slots, keys, confirmed=confirmed)
        return msg.BatchPutEnd(client, keys, confirmed=confirmed)

    def _committed_before(
        self, master: MasterClient, keys: tuple[str, ...], results: list[Result]
    ) -> None:
        """Keys whose buffer the leader did not find (OBJECT_NOT_FOUND) may have
        been committed by an earlier attempt of the same request whose answer was
        lost (the one sent beside the confirmations carries no request id, so the
        leader's reply cache cannot answer its repeat): a plain end of the key,
        harmless to repeat, tells.  A key really lost stays OBJECT_NOT_FOUND (the
        caller puts it the ordinary way)."""
        lost = [i for i, (code, _) in enumerate(results) if code == _NOT_FOUND]
        if not lost:
            return
        again = self._results(
            master, self._request(tuple(keys[i] for i in lost), len(lost) > 1, ())
        )
        for i, result in zip(lost, again, strict=True):
            if result[0] == 0:
                results[i] = result

    def _results(
        self,
        master: MasterClient,
        request: _End,
        sent: Callable[[], Any] | None = None,
    ) -> list[Result]:
        """The leader's answer to ``request`` -- ``sent`` already (one attempt), else
        (or when that attempt broke or met a master no longer leading) by ``call``,
        which retries and follows the leader: ending a put again is harmless."""
        single = isinstance(request, (msg.PutEnd, msg.CommitSlot))
        value: Any = None
        if sent is not None:
            try:
                value = sent()
            except RpcFailed:
                # that one attempt broke or timed out (RpcTimeout too): the leader
                # may be frozen, gone or busy re-syncing a standby; call() retries
                # and follows the leader until the timeout
                sent = None
            except StoreError as exc:
                if exc.code != _NOT_LEADER:
                    if not single:
                        raise
                    return [(exc.code, exc.message)]
                sent = None
            except MooncakeError:
                sent = None
        if sent is None:
            try:
                value = master.call(request)
            except StoreError as exc:
                if not single:
                    raise
                return [(exc.code, exc.message)]
        if isinstance(request, (msg.PutEnd, msg.CommitSlot)):
            return [(0, None)]
        n = len(request.keys)
        if len(value.codes) != n:
            raise MalformedMessage(f"the master answered {len(value.codes)} of {n} keys")
        return list(zip(value.codes, value.messages, strict=True))

    def close(self) -> None:
        with self._link_lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
            self.standbys = ()
        for c in clients:
            c.close()
