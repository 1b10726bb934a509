"""Buffers reserved ahead for single puts: a small put in one master round trip.

Theory of operation
-------------------
An ordinary put asks the master twice: PutStart (where to write) and PutEnd
(make it readable).  A client that puts values of one size again and again
instead reserves several buffers of that size at once (``ReserveSlots``: each
is placed as a put of that size would be, and held by the master as a write in
progress under a name no key can take), then for each put writes into one and
commits it under the key (``CommitSlot``): one round trip per put, plus one
per reservation, whose size doubles each time a pool runs dry (up to
``PYMOONCAKE_PUT_SLOT_BYTES``, 16 MiB, per value size and config: with HA a
reservation waits for a standby, ~0.5 ms, and 4 MiB pools made one put of
1 MiB in four wait for one -- an HA put p90 of ~970 us against ~600 with 16).
A batch put whose values fit the pools of their sizes does the same with
``BatchCommitSlots``: one round trip per batch instead of BatchPutStart +
BatchPutEnd.

A reserved buffer is only written while it is certainly still reserved:

* it is used at most 3 s after it was asked for, and never within a margin of
  the master's ``ttl_s`` (at most 10 s, and half its
  ``put_start_release_timeout``); the heartbeat revokes the ones left over;
* every pool is dropped when the master connection broke or was found closed,
  or the master is a new instance (restarted): the new one does not know them;
* a segment that replaces a dead one keeps the ranges its predecessor held for
  other clients' writes reserved for that long (``MasterState``).

A commit that finds the key already stored leaves the buffer reserved for the
next put; a buffer the master no longer knows, a key another put is writing, a
failed write or a master without this RPC send the put the ordinary way.  With
HA the leader answers a reservation only once a standby has it (a new leader
never hands its buffers to another put), and the client confirms each commit
to the standbys itself (``_ha_confirm.py``).

Buffers left over (expired, dropped) are revoked by the heartbeat; the
client's close revokes the rest.  Buffers ahead hold room and never evict: a
put refused for want of room revokes the ones its client holds and tries once
more, and ``remove_all`` gives them back with the objects.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Final

from ..errors import InvalidParams
from ..wire._master_msgs import MAX_SLOTS, ReplicateParams, SlotRuns

__all__ = [
    "ENV",
    "Slot",
    "SlotPools",
    "deadline",
    "make_slots",
    "single_places",
    "slot_bytes_from_env",
    "slot_runs",
]

ENV: Final = "PYMOONCAKE_PUT_SLOT_BYTES"
#: bytes one pool (one value size and config) may hold in reserve
DEFAULT_BYTES: Final = 16 << 20
#: a buffer is not used within this long of the master's deadline for it
_MARGIN_S: Final = 1.0
#: nor kept longer than this: a reservation nobody uses soon goes back (the
#: heartbeat revokes it), so idle reservations hold little memory for long
HOLD_S: Final = 3.0

_Key = tuple[int, ReplicateParams]


def slot_bytes_from_env(env: dict[str, str] | None = None) -> int:
    """``PYMOONCAKE_PUT_SLOT_BYTES`` (unset: 16 MiB; 0 turns reservations off).

    Raises:
        InvalidParams: not a whole number of bytes >= 0.
    """
    raw = (os.environ if env is None else env).get(ENV, "")
    if not raw.strip():
        return DEFAULT_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise InvalidParams(
            f"{ENV}={raw!r}: expected the bytes a client may hold reserved per value size for "
            "single puts (a whole number >= 0; 0 turns reservations off)"
        )
    return value


def deadline(asked_at: float, ttl_s: float) -> float:
    """When a buffer asked for at ``asked_at`` (before the request was sent) must
    no longer be written: the master's ``ttl_s`` less a margin."""
    return asked_at + min(HOLD_S, ttl_s - min(_MARGIN_S, ttl_s / 4))


#: One reserved buffer: ``(name, places, expires, batch, index)``: its name at
#: the master, where to write each replica (``(endpoint, address)`` pairs), when
#: it must no longer be written (monotonic seconds), and the reservation and
#: index it is named after (a batch commit names its buffers by runs of those:
#: ``SlotRuns``).  A plain tuple: a reservation makes hundreds at once, and
#: :func:`make_slots` builds them in C loops (``zip``) -- ~0.2 us each where a
#: dataclass instance cost ~0.7 us (190 us per 256).
Slot = tuple[str, Sequence[tuple[str, int]], float, str, int]


def make_slots(
    names: Sequence[str],
    places: Iterable[Sequence[tuple[str, int]]],
    expires: float,
    batch: str,
) -> list[Slot]:
    """The slots of reservation ``batch``: buffer ``i`` is named ``names[i]``
    and written at ``places[i]``."""
    # (repeat never ends: the slots are as many as the names)
    return list(
        zip(
            names,
            places,
            itertools.repeat(expires),
            itertools.repeat(batch),
            range(len(names)),
            strict=False,
        )
    )


def single_places(
    endpoints: Sequence[str], seg: Sequence[int], addr: Sequence[int]
) -> Iterator[tuple[tuple[str, int]]]:
    """The places of buffers with one replica each: buffer ``i`` lies at
    ``addr[i]`` of the segment whose endpoint is ``endpoints[seg[i]]``."""
    if len(endpoints) == 1:
        where: Iterable[str] = itertools.repeat(endpoints[0])
    else:
        where = map(endpoints.__getitem__, seg)
    return zip(zip(where, addr, strict=False))


def slot_runs(client_id: str, slots: Sequence[Slot]) -> SlotRuns:
    """How a batch commit names ``slots``: as runs of their reservations."""
    return SlotRuns.of(client_id, [(s[3], s[4]) for s in slots])


class SlotPools:
    """Reserved buffers by (value size, config), valid for one master epoch.

    Args:
        max_bytes: bytes one pool may hold (values above half of it are never
            put through a reservation); 0 disables.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.enabled = max_bytes > 0
        self._pools: dict[_Key, deque[Slot]] = {}
        #: how many buffers the next reservation of a pool asks for
        self._grant: dict[_Key, int] = {}
        self._epoch: object = None
        self._lock = threading.Lock()
        #: (from 1: no reservation is named after batch "0", which HA clients use
        #: as a commit the leader always refuses, see ``_ha_confirm._repair``)
        self._batches = itertools.count(1)

    def next_batch(self) -> str:
        """A name for the next reservation, unique for this client."""
        return str(next(self._batches))

    def eligible(self, size: int) -> bool:
        return self.enabled and 0 < size <= self.max_bytes // 2

    def capacity(self, size: int) -> int:
        """The most buffers a pool of values of ``size`` may hold."""
        return min(self.max_bytes // size, MAX_SLOTS) if self.enabled and size > 0 else 0

    def take(
        self, size: int, params: ReplicateParams, epoch: object, now: float
    ) -> tuple[Slot | None, list[str]]:
        """A buffer of this pool still valid at ``now``, or None; and the names
        of the buffers found expired or of an earlier epoch (to revoke)."""
        key = (size, params)
        with self._lock:
            stale = self._new_epoch(epoch)
            pool = self._pools.get(key)
            while pool:
                slot = pool.popleft()
                if slot[2] > now:  # (not expired)
                    return slot, stale
                stale.append(slot[0])
            return None, stale

    def take_many(
        self, size: int, params: ReplicateParams, count: int, epoch: object, now: float
    ) -> tuple[list[Slot], list[str]]:
        """Up to ``count`` buffers of this pool still valid at ``now``, and the
        names of those found expired or of an earlier epoch (to revoke)."""
        key = (size, params)
        out: list[Slot] = []
        with self._lock:
            stale = self._new_epoch(epoch)
            pool = self._pools.get(key)
            while pool and len(out) < count:
                slot = pool.popleft()
                if slot[2] > now:  # (not expired)
                    out.append(slot)
                else:
                    stale.append(slot[0])
            return out, stale

    def next_count(self, size: int, params: ReplicateParams, need: int = 1) -> int:
        """How many to reserve now that the pool ran dry: the ``need`` buffers
        for the put(s) at hand and the rest ahead -- none the first time (a
        value size seen once costs what an ordinary put costs and leaves nothing
        reserved), then doubling each time, within ``max_bytes``."""
        key = (size, params)
        with self._lock:
            last = self._grant.get(key)
            ahead = need if last is None else max(need, 2 * last)
            count = max(1, min(ahead, self.max_bytes // size, MAX_SLOTS))
            self._grant[key] = count
            return count

    def granted(self, size: int, params: ReplicateParams, count: int) -> None:
        """The master reserved only ``count`` of the buffers asked for (its
        segments are near their high watermark): the next reservation doubles
        from there, not from what was asked (asking for hundreds that do not fit
        costs the master an allocation each)."""
        key = (size, params)
        with self._lock:
            if key in self._grant:
                self._grant[key] = max(1, count)

    def add(
        self, size: int, params: ReplicateParams, slots: Sequence[Slot], epoch: object
    ) -> list[str]:
        """Pool ``slots`` (reserved in ``epoch``); returns names to revoke
        instead (the epoch changed meanwhile)."""
        with self._lock:
            if epoch != self._epoch:
                return [s[0] for s in slots]
            self._pools.setdefault((size, params), deque()).extend(slots)
            return []

    def give_back(self, size: int, params: ReplicateParams, slot: Slot, epoch: object) -> list[str]:
        """A buffer taken but not committed (the key existed) goes back first."""
        with self._lock:
            if epoch != self._epoch:
                return [slot[0]]
            self._pools.setdefault((size, params), deque()).appendleft(slot)
            return []

    def drop(self, size: int, params: ReplicateParams) -> list[str]:
        """Forget one pool (its buffers failed); returns their names."""
        with self._lock:
            pool = self._pools.pop((size, params), None)
            self._grant.pop((size, params), None)
            return [s[0] for s in pool or ()]

    def expired(self, now: float) -> list[str]:
        """Take the buffers past their deadline out of every pool."""
        out: list[str] = []
        with self._lock:
            for pool in self._pools.values():
                keep = [s for s in pool if s[2] > now]
                if len(keep) != len(pool):
                    out += [s[0] for s in pool if s[2] <= now]
                    pool.clear()
                    pool.extend(keep)
        return out

    def clear(self) -> list[str]:
        """Forget every pool; returns the names they held."""
        with self._lock:
            return self._new_epoch(object())

    def disable(self) -> list[str]:
        self.enabled = False
        return self.clear()

    def _new_epoch(self, epoch: object) -> list[str]:
        if epoch == self._epoch:
            return []
        names = [s[0] for pool in self._pools.values() for s in pool]
        self._pools.clear()
        self._grant.clear()
        self._epoch = epoch
        return names

    def held(self) -> int:
        """Buffers held in all pools (tests, metrics)."""
        with self._lock:
            return sum(len(p) for p in self._pools.values())
