"""Writes of the store client: two-phase puts and upserts, grouped per peer."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from operator import itemgetter
from typing import Any

from .._gcpause import gc_paused
from .._logging import RepeatLimiter
from ..errors import (
    InvalidParams,
    MalformedMessage,
    MooncakeError,
    RpcFailed,
    RpcTimeout,
    StoreError,
    StoreTransferFailed,
    store_error,
)
from ..transfer import TransferRequest
from ..wire import _master_msgs as msg
from ..wire import _offload_msgs as omsg
from ._client_io import BATCH_OPS, ClientIO, Part, Parts, _as_view, log, transfer_failed
from ._file_storage import write_object
from ._slots import Slot, deadline, make_slots, single_places, slot_runs
from ._types import DEFAULT_REPLICATE_CONFIG, ErrorCode, ReplicateConfig

__all__ = ["WriteOps"]

#: one line per set of unreachable segments, then every 100th repeat with the count
_unreachable_log = RepeatLimiter(log, every=100)
#: a reservation refused for want of room: the ordinary put reports it
_ROOM_CODES = (ErrorCode.NO_AVAILABLE_HANDLE, ErrorCode.INVALID_PARAMS)


def _no_room(result: bool | StoreError) -> bool:
    return isinstance(result, StoreError) and result.code == ErrorCode.NO_AVAILABLE_HANDLE


class WriteOps(ClientIO):
    """put / put_parts / put_from / put_many / upsert / upsert_many."""

    # ------------------------------------------------------------------------------
    # writes
    # ------------------------------------------------------------------------------

    def _write_batch(
        self,
        keys: Sequence[str],
        parts: Sequence[Parts],
        config: ReplicateConfig,
        upsert: bool,
        op: str = "put_batch",
    ) -> list[bool | StoreError]:
        """Two-phase write of many objects; True stored, False already existed.

        Objects whose replica landed on a peer that turned out to be unreachable
        (crashed, not yet expired by the master) are written once more, elsewhere.
        ``op`` names the API for the operation metrics (the reference's op_name).
        """
        self._check_open()
        if len(keys) > 1 and len(set(keys)) != len(keys):
            return self._write_distinct(keys, parts, config, upsert, op)
        with gc_paused(len(keys)):  # (_gcpause.py: no full collections mid-batch)
            return self._write_batch_now(keys, parts, config, upsert, op)

    def _write_batch_now(
        self,
        keys: Sequence[str],
        parts: Sequence[Parts],
        config: ReplicateConfig,
        upsert: bool,
        op: str,
    ) -> list[bool | StoreError]:
        started = time.perf_counter_ns()
        results: list[bool | StoreError] | None = None
        unreachable: set[str] = set()
        if not upsert and self.slots.enabled:
            if len(keys) == 1:
                one = self._put_in_slot(keys[0], parts[0], config, op)
                if one is not None:
                    results = [one]
            else:
                some = self._put_many_in_slots(keys, parts, config, op)
                if some is not None:
                    results = self._write_rest(some, keys, parts, config, unreachable, op)
        if results is None:
            results = self._write_once(keys, parts, config, upsert, unreachable, op)
        failed = results.count(True) != len(results)
        retry = (
            [i for i, r in enumerate(results) if isinstance(r, StoreTransferFailed)]
            if failed
            else []
        )
        if retry and unreachable:
            _unreachable_log(
                ",".join(sorted(unreachable)),
                logging.WARNING,
                "segment(s) %s unreachable (a peer died and the master has not expired it "
                "yet); writing %d object(s) elsewhere",
                sorted(unreachable),
                len(retry),
            )
            again = dataclasses.replace(
                config, excluded_segments=(*config.excluded_segments, *sorted(unreachable))
            )
            sub = self._write_once(
                [keys[i] for i in retry], [parts[i] for i in retry], again, upsert, set(), op
            )
            for i, r in zip(retry, sub, strict=True):
                results[i] = r
        if failed and any(map(_no_room, results)) and self.slots.held():
            # buffers this client reserved ahead for other puts hold room this
            # one needs (they never evict): give them back, then try once more
            self.give_back_reserved()
            short = [i for i, r in enumerate(results) if _no_room(r)]
            sub = self._write_once(
                [keys[i] for i in short], [parts[i] for i in short], config, upsert, set(), op
            )
            for i, r in zip(short, sub, strict=True):
                results[i] = r
        if self.metrics is not None:
            if results.count(True) == len(results):
                stored = sum(map(len, itertools.chain.from_iterable(parts)))
            else:
                stored = sum(sum(map(len, parts[i])) for i, r in enumerate(results) if r is True)
            self.metrics.operation(True, op, stored, (time.perf_counter_ns() - started) // 1000)
        return results

    def _write_distinct(
        self,
        keys: Sequence[str],
        parts: Sequence[Parts],
        config: ReplicateConfig,
        upsert: bool,
        op: str,
    ) -> list[bool | StoreError]:
        """A batch that names a key more than once writes it once, as if its
        entries came one after another: a put stores the first value (the later
        entries find it: False, "already existed", or the first one's error), an
        upsert the last (every entry answers as that one did).  Written as given,
        the second start would find the first in progress and wait for it until
        the RPC timeout, while the first cannot end before the batch does."""
        chosen: dict[str, int] = {}
        for i, key in enumerate(keys):
            if upsert or key not in chosen:
                chosen[key] = i
        idx = list(chosen.values())
        sub = self._write_batch([keys[i] for i in idx], [parts[i] for i in idx], config, upsert, op)
        result = dict(zip([keys[i] for i in idx], sub, strict=True))
        return [
            result[k] if upsert or chosen[k] == i or result[k] is not True else False
            for i, k in enumerate(keys)
        ]

    def _write_once(
        self,
        keys: Sequence[str],
        parts: Sequence[Parts],
        config: ReplicateConfig,
        upsert: bool,
        unreachable: set[str],
        op: str,
    ) -> list[bool | StoreError]:
        n = len(keys)
        results: list[bool | StoreError] = [True] * n
        sizes = [len(ps[0]) if len(ps) == 1 else sum(map(len, ps)) for ps in parts]
        self._claim(keys, upsert)
        try:
            try:
                started = self._start(keys, sizes, config, upsert)
            except RpcFailed:
                self._maybe_started(keys, upsert)
                raise
            per_endpoint: dict[str, list[tuple[int, TransferRequest]]] = {}
            errors: list[BaseException | None] = [None] * n
            writing: list[int] = []
            copies = [0] * n  # replicas written per object
            transfer_start = time.perf_counter_ns()
            # the common key of a batch -- one part, one replica, in our own segment
            # -- is copied right here, without planning it (_route_parts)
            own, copy = self.engine.segment_name, self.engine.registry.copier()
            copy_own = self._copy_own_many(copy)
            for i, (code, value) in enumerate(started):
                if code:
                    if code == ErrorCode.OBJECT_ALREADY_EXISTS and not upsert:
                        results[i] = False  # readable: the key is immutable (reference semantics)
                    else:
                        results[i] = store_error(code, f"{keys[i]!r}: {value}")
                    continue
                writing.append(i)
                copies[i] = len(value)
                if len(value) == 1 and len(parts[i]) == 1:
                    endpoint, address = value[0]
                    if endpoint == own and copy(address, parts[i][0], True):
                        continue  # (a range not registered: the general path reports it)
                for endpoint, address in value:
                    self._route_parts(
                        i, endpoint, address, parts[i], True, per_endpoint, errors, copy_own
                    )
            self._run_transfers(per_endpoint, errors, unreachable)
            if errors.count(None) == n:  # no write failed
                good, bad = writing, []
            else:
                good = [i for i in writing if errors[i] is None]
                bad = [i for i in writing if errors[i] is not None]
            if self.metrics is not None and writing:
                if len(good) == n and copies.count(1) == n:  # every key, one replica each
                    stored = sum(sizes)
                else:
                    stored = sum(sizes[i] * copies[i] for i in good)
                self.metrics.transfer(
                    True,
                    stored,
                    (time.perf_counter_ns() - transfer_start) // 1000,
                    op in BATCH_OPS,
                )
            self._finish(keys, good, bad, upsert, results)
            if self.fsdir:
                self._write_shared(keys, parts, sizes, [i for i in good if results[i] is True])
            for i in bad:
                results[i] = transfer_failed(f"writing {keys[i]!r} failed: {errors[i]}", errors[i])
        finally:
            self._unclaim(keys)
        return results

    # --- one round trip: a reserved buffer (_slots.py) -------------------------------

    def _put_in_slot(
        self, key: str, parts: Parts, config: ReplicateConfig, op: str
    ) -> bool | StoreError | None:
        """Put one value through a buffer reserved ahead: write it, then commit it
        under ``key``.  True stored, False the key existed, or the error; None
        when the put must take the ordinary path (not eligible, no buffer could
        be reserved, the buffer is gone, the write failed, another put writes
        the key)."""
        size = len(parts[0]) if len(parts) == 1 else sum(map(len, parts))
        pools = self.slots
        if not pools.eligible(size) or not key:
            return None
        master = self.master
        master.idle_intact()  # a master that exited or restarted closed them
        epoch = (master.epoch, self._master_instance)
        params = config.to_params()
        slot, stale = pools.take(size, params, epoch, time.monotonic())
        if stale:
            self._revoke_later(stale)
        if slot is None:
            got = self._reserve(size, params, epoch)
            if not got:
                return None
            slot = got[0]
        errors: list[BaseException | None] = [None]
        transfer_start = time.perf_counter_ns()
        name, places = slot[0], slot[1]
        if len(places) == 1 and len(parts) == 1 and places[0][0] == self.engine.segment_name:
            # (the commonest put of a client with a segment: one part, one replica,
            # in its own segment -- copied right here, without planning it)
            self._copy_own(0, parts[0], places[0][1], True, errors)
        else:
            per_endpoint: dict[str, list[tuple[int, TransferRequest]]] = {}
            copy_own = self._copy_own_many()
            for endpoint, address in places:
                self._route_parts(0, endpoint, address, parts, True, per_endpoint, errors, copy_own)
            if per_endpoint:
                self._run_transfers(per_endpoint, errors, set())
        if errors[0] is not None:
            # the holder may be gone: its other buffers too (revoked now, as the
            # ordinary path revokes a failed write); the ordinary path writes
            # elsewhere (or reports why it cannot)
            self._revoke([name, *pools.drop(size, params)], False)
            return None
        if self.metrics is not None:
            self.metrics.transfer(
                True,
                size * len(places),
                (time.perf_counter_ns() - transfer_start) // 1000,
                op in BATCH_OPS,
            )
        try:
            if self.confirms.standbys:  # HA: the standbys confirm it in parallel
                ((code, text),) = self.confirms.end(master, [key], batch=False, slots=[name])
                if code:
                    raise store_error(code, text or "")
            else:
                master.call(msg.CommitSlot(self.client_id, name, key))
        except StoreError as exc:
            code = exc.code
            if code == ErrorCode.OBJECT_ALREADY_EXISTS:
                self._reuse_refused(size, params, slot, epoch)
                return False  # readable: the key is immutable (reference semantics)
            if code == ErrorCode.REPLICA_IS_NOT_READY:
                self._reuse_refused(size, params, slot, epoch)
                return None  # the ordinary path waits for that put
            if code == ErrorCode.OBJECT_NOT_FOUND:
                self._revoke_later(pools.clear())  # the master lost what it held
                return None
            if isinstance(exc, RpcFailed):  # committed or not: revoking is harmless
                self._revoke_later([name])
            else:
                self._reuse_refused(size, params, slot, epoch)
            return exc
        if self.fsdir:
            self._write_shared([key], [parts], [size], [0])
        return True

    def _put_many_in_slots(
        self, keys: Sequence[str], parts: Sequence[Parts], config: ReplicateConfig, op: str
    ) -> list[bool | StoreError | None] | None:
        """A batch put through buffers reserved ahead: write every value, then
        commit them all in one ``BatchCommitSlots``.  None when the batch takes
        the ordinary path (a value too large for the pools of its size; a key
        named twice never gets here, see :meth:`_write_distinct`); else a result per key as :meth:`_put_in_slot` gives it (None:
        that key takes the ordinary path)."""
        pools = self.slots
        n = len(keys)
        sizes = [len(ps[0]) if len(ps) == 1 else sum(map(len, ps)) for ps in parts]
        by_size: dict[int, list[int]] = {}
        if n and sizes.count(sizes[0]) == n:  # (a batch is mostly of one size)
            by_size[sizes[0]] = list(range(n))
        else:
            for i, size in enumerate(sizes):
                by_size.setdefault(size, []).append(i)
        if not all(
            pools.eligible(size) and len(idx) <= pools.capacity(size)
            for size, idx in by_size.items()
        ) or not all(keys):
            return None
        master = self.master
        master.idle_intact()  # a master that exited or restarted closed them
        epoch = (master.epoch, self._master_instance)
        params = config.to_params()
        now = time.monotonic()
        taken: dict[int, list[Slot]] = {}
        for size, idx in by_size.items():
            got, stale = pools.take_many(size, params, len(idx), epoch, now)
            if stale:
                self._revoke_later(stale)
            taken[size] = got
        short = [size for size, idx in by_size.items() if len(taken[size]) < len(idx)]
        if len(short) > 1:
            # one reservation per size would cost more round trips than the
            # ordinary path's two: it puts the batch (the buffers stay pooled)
            for size, got in taken.items():
                for slot in reversed(got):
                    self._revoke_later(pools.give_back(size, params, slot, epoch))
            return None
        for size in short:
            taken[size] += self._reserve(size, params, epoch, len(by_size[size]) - len(taken[size]))
        slots: dict[int, Slot] = {}  # key index -> its buffer
        for size, idx in by_size.items():
            slots.update(zip(idx, taken[size], strict=False))
        results: list[bool | StoreError | None] = [None] * n
        todo = sorted(slots)
        if not todo:
            return results
        per_endpoint: dict[str, list[tuple[int, TransferRequest]]] = {}
        errors: list[BaseException | None] = [None] * n
        transfer_start = time.perf_counter_ns()
        if not self._write_own_direct([slots[i] for i in todo], [parts[i] for i in todo]):
            copy_own = self._copy_own_many()
            for i in todo:
                for endpoint, address in slots[i][1]:
                    self._route_parts(
                        i, endpoint, address, parts[i], True, per_endpoint, errors, copy_own
                    )
            self._run_transfers(per_endpoint, errors, set())
        failed = [i for i in todo if errors[i] is not None]
        if failed:
            # their holders may be gone: revoke them and the pools of their
            # sizes now; those keys take the ordinary path (which writes elsewhere)
            gone = [slots[i][0] for i in failed]
            for size in {sizes[i] for i in failed}:
                gone += pools.drop(size, params)
            self._revoke(gone, False)
            todo = [i for i in todo if errors[i] is None]
            if not todo:
                return results
        if self.metrics is not None:
            self.metrics.transfer(
                True,
                sum(sizes[i] * len(slots[i][1]) for i in todo),
                (time.perf_counter_ns() - transfer_start) // 1000,
                op in BATCH_OPS,
            )
        todo_keys = tuple([keys[i] for i in todo])
        names: Sequence[str]
        try:
            if self.confirms.standbys:  # HA: the standbys confirm them in parallel
                names = tuple([slots[i][0] for i in todo])
                ended = self.confirms.end(master, todo_keys, batch=True, slots=names)
                codes = [code for code, _ in ended]
                messages = [text for _, text in ended]
            else:
                names = slot_runs(self.client_id, [slots[i] for i in todo])
                reply = master.call(msg.BatchCommitSlots(self.client_id, names, todo_keys))
                codes, messages = reply.codes, reply.messages
        except StoreError as exc:
            self._revoke_later(names)  # committed or not: revoking is harmless
            if isinstance(exc, RpcFailed):
                for i in todo:
                    results[i] = exc
            # else refused as a whole: the ordinary path says why
            return results
        if len(codes) != len(todo):
            raise MalformedMessage(f"the master answered {len(codes)} of {len(todo)} keys")
        lost = False
        for i, code, text in zip(todo, codes, messages, strict=True):
            if code == 0:
                results[i] = True
                continue
            if code == ErrorCode.OBJECT_NOT_FOUND:
                lost = True  # the master lost what it held: the ordinary path
                continue
            self._reuse_refused(sizes[i], params, slots[i], epoch)
            if code == ErrorCode.OBJECT_ALREADY_EXISTS:
                results[i] = False  # readable: the key is immutable (reference semantics)
            elif code != ErrorCode.REPLICA_IS_NOT_READY:  # not-ready: the ordinary path waits
                results[i] = store_error(code, f"{keys[i]!r}: {text or ''}")
        if lost:
            self._revoke_later(pools.clear())
        if self.fsdir:
            self._write_shared(keys, parts, sizes, [i for i in todo if results[i] is True])
        return results

    def _write_rest(
        self,
        results: list[bool | StoreError | None],
        keys: Sequence[str],
        parts: Sequence[Parts],
        config: ReplicateConfig,
        unreachable: set[str],
        op: str,
    ) -> list[bool | StoreError]:
        """The keys a batch through reserved buffers left (None) put the ordinary way."""
        rest = [i for i, r in enumerate(results) if r is None]
        if rest:
            sub = self._write_once(
                [keys[i] for i in rest], [parts[i] for i in rest], config, False, unreachable, op
            )
            for i, r in zip(rest, sub, strict=True):
                results[i] = r
        return results  # type: ignore[return-value]

    def _write_own_direct(self, slots: Sequence[Slot], parts: Sequence[Parts]) -> bool:
        """Write a batch whose every value is one view going to one buffer in our
        own segment, all in one host region of ours: one slice assignment each
        (the common batch put through buffers reserved ahead).  False (nothing
        written) for any other batch, or one with a value large enough to be
        copied without the GIL (``MEMMOVE_FROM``); the general path then does."""
        own = self.engine.segment_name
        addrs: list[int] = []
        views: list[memoryview] = []
        for slot, ps in zip(slots, parts, strict=True):
            places = slot[1]
            if len(places) != 1 or len(ps) != 1 or places[0][0] != own:
                return False
            view = ps[0]
            if type(view) is not memoryview:
                return False
            addrs.append(places[0][1])
            views.append(view)
        if not views:
            return False
        sizes = list(map(len, views))
        region = None if min(sizes) <= 0 else self._own_small_span(addrs, sizes)
        if region is None:
            return False
        segment, base = region.view, region.addr  # (held: the segment stays mapped)
        for address, view, size in zip(addrs, views, sizes, strict=True):
            at = address - base
            segment[at : at + size] = view
        return True

    def _reuse_refused(
        self, size: int, params: msg.ReplicateParams, slot: Slot, epoch: object
    ) -> None:
        """The leader refused to commit ``slot`` (the key exists, or is being
        written): pool it for the next put -- but with HA revoke it instead: a
        standby may remember this client's confirmation of it under the refused
        key, and would commit the buffer's next contents under that key if it
        took over before the confirmation expired."""
        if self.confirms.standbys:
            self._revoke_later([slot[0]])
        else:
            self._revoke_later(self.slots.give_back(size, params, slot, epoch))

    def _reserve(
        self, size: int, params: msg.ReplicateParams, epoch: object, need: int = 1
    ) -> list[Slot]:
        """Reserve buffers of ``size``: up to ``need`` are returned, the rest
        pooled.  Empty when none could be reserved (the ordinary path then
        reports why)."""
        pools = self.slots
        count = pools.next_count(size, params, need)
        batch = pools.next_batch()
        asked = time.monotonic()
        try:
            reply = self.master.call(msg.ReserveSlots(self.client_id, size, count, batch, params))
        except StoreError as exc:
            if isinstance(exc, RpcFailed):
                # no answer: the master may have reserved them; they are named
                # after the batch, so the heartbeat can revoke them all the same
                self._revoke_later(msg.slot_names(self.client_id, batch, count))
            elif exc.code not in _ROOM_CODES:
                # a master without reservations (an older pymooncake): stop asking
                log.info("put reservations are off: the master answered %s", exc)
                self._revoke_later(pools.disable())
            return []
        if len(reply) < count:
            pools.granted(size, params, len(reply))
        until = deadline(asked, reply.ttl_s)
        cols = reply.columns
        names = msg.slot_names(self.client_id, batch, len(cols))
        if cols.counts.count(1) == len(names):  # one replica each (the common config)
            endpoints = [str(seg[0]) for seg in cols.segs]
            places: Iterable[Sequence[tuple[str, int]]] = single_places(
                endpoints, cols.seg, cols.addr
            )
        else:
            places = cols.placements()
        slots = make_slots(names, places, until, batch)
        self._revoke_later(pools.add(size, params, slots[need:], epoch))
        return slots[:need]

    def give_back_reserved(self) -> None:
        """Revoke every buffer this client holds reserved ahead (they hold room
        the next puts may need, and never evict)."""
        held = self.slots.clear()
        if held:
            self._revoke(held, False)

    def _revoke_later(self, names: Sequence[str]) -> None:
        """Reserved buffers nobody will write: the heartbeat revokes them."""
        if names:
            with self._writing_lock:
                self._revoke_backlog.update((n, False) for n in names)

    def _sweep_slots(self) -> None:
        """Heartbeat: buffers past their deadline are revoked."""
        self._revoke_later(self.slots.expired(time.monotonic()))

    # --- the two phases -----------------------------------------------------------

    def _claim(self, keys: Sequence[str], upsert: bool) -> None:
        """Mark ``keys`` as being written by this process (before PutStart is sent,
        so a concurrent thread never mistakes our put for an orphan).

        A key the heartbeat is revoking at this moment is waited for (its revoke
        must not hit this put); a pending revoke of the same kind is dropped: this
        put's start revokes an orphan of ours itself (see :meth:`_start`)."""
        with self._writing_lock:
            deadline = time.monotonic() + self.config.rpc_timeout_s
            while self._revoking and any(k in self._revoking for k in keys):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RpcTimeout(
                        f"revoking an earlier put of {keys[0]!r} did not finish within "
                        f"{self.config.rpc_timeout_s:g} s (MC_RPC_TIMEOUT_MS)"
                    )
                self._revoke_done.wait(left)
            writing = self._writing
            backlog = self._revoke_backlog
            if backlog:
                for key in keys:
                    backlog.discard((key, upsert))
            if len(keys) > 1 and writing.keys().isdisjoint(keys) and len(set(keys)) == len(keys):
                writing.update(dict.fromkeys(keys, 1))  # the common batch: C-level
                return
            for key in keys:
                writing[key] = writing.get(key, 0) + 1

    def _unclaim(self, keys: Sequence[str]) -> None:
        with self._writing_lock:
            writing = self._writing
            if len(keys) > 1 and list(map(writing.get, keys)).count(1) == len(keys):
                # one claim each (no other put of this process writes them), and
                # no key twice (a repeated one would count 2): drop them, C-level
                deque(map(writing.pop, keys), maxlen=0)
                return
            for key in keys:
                left = writing.get(key, 1) - 1
                if left:
                    writing[key] = left
                else:
                    writing.pop(key, None)

    def _start(
        self, keys: Sequence[str], sizes: list[int], config: ReplicateConfig, upsert: bool
    ) -> list[tuple[int, Any]]:
        """PutStart/UpsertStart of every key: ``(code, [(endpoint, address), ...] or
        message)`` each.

        A key that another put is still writing (REPLICA_IS_NOT_READY for puts,
        OBJECT_REPLICA_BUSY for upserts) is asked again until that put ends (the
        key then exists) or is revoked, within the RPC timeout: a put never
        reports "already exists" while nothing is readable.  When no other thread
        of this process writes the key, the put in progress can be an orphan of an
        earlier attempt of ours whose revoke was lost: it is revoked first.
        """
        params = config.to_params()
        busy_code = ErrorCode.OBJECT_REPLICA_BUSY if upsert else ErrorCode.REPLICA_IS_NOT_READY
        out: list[tuple[int, Any]] = [(0, None)] * len(keys)
        todo = list(range(len(keys)))
        deadline = time.monotonic() + self.config.rpc_timeout_s
        pause = 0.002
        revoked: set[str] = set()
        while todo:
            first = len(todo) == len(keys)
            replies = self._start_rpc(
                list(keys) if first else [keys[i] for i in todo],
                sizes if first else [sizes[i] for i in todo],
                params,
                upsert,
            )
            if first and busy_code not in map(itemgetter(0), replies):
                return replies  # the first round, and no key was being written
            again: list[int] = []
            orphans: list[str] = []
            for i, reply in zip(todo, replies, strict=True):
                out[i] = reply
                if reply[0] != busy_code:
                    continue
                again.append(i)
                key = keys[i]
                with self._writing_lock:
                    ours_elsewhere = self._writing.get(key, 0) > 1
                if not ours_elsewhere and key not in revoked:
                    orphans.append(key)
                    revoked.add(key)
            if orphans:
                self._revoke(orphans, upsert, quiet=True)
            if not again or time.monotonic() + pause > deadline:
                break
            if not orphans:
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
            todo = again
        return out

    def _start_rpc(
        self, keys: list[str], sizes: list[int], params: msg.ReplicateParams, upsert: bool
    ) -> list[tuple[int, Any]]:
        if len(keys) == 1:  # the single-key RPCs are cheaper to encode
            cls = msg.UpsertStart if upsert else msg.PutStart
            try:
                reps = self.master.call(cls(self.client_id, keys[0], sizes[0], params))
            except StoreError as exc:
                if isinstance(exc, RpcFailed):
                    self._maybe_started(keys, upsert)
                return [(exc.code, exc.message)]
            return [(0, [(r[1], r[2]) for r in reps.replicas])]
        batch = msg.BatchUpsertStart if upsert else msg.BatchPutStart
        cols = self.master.call(batch(self.client_id, tuple(keys), tuple(sizes), params)).columns
        if len(cols) != len(keys):
            raise MalformedMessage(f"the master answered {len(cols)} of {len(keys)} keys")
        places = cols.placements()
        if cols.code.count(0) == len(keys):  # every key started: pairs made in C
            return list(zip(cols.code, places, strict=True))
        return [
            (code, places[i] if code == 0 else cols.message(i)) for i, code in enumerate(cols.code)
        ]

    def _maybe_started(self, keys: Sequence[str], upsert: bool) -> None:
        """The start of ``keys`` failed without an answer: the master may have
        executed it and lost the reply.  Revoke them (the heartbeat does, once the
        master answers and no put of ours writes them) rather than leave their
        buffers reserved for put_start_release_timeout; a revoke of a put that
        never started is answered with an error and changes nothing."""
        with self._writing_lock:
            self._revoke_backlog.update((k, upsert) for k in keys)

    def _finish(
        self,
        keys: Sequence[str],
        good: list[int],
        bad: list[int],
        upsert: bool,
        results: list[bool | StoreError],
    ) -> None:
        """End the puts in ``good``, revoke those in ``bad``."""
        confirms = self.confirms
        if not upsert and confirms.standbys and good:  # HA: standbys confirm in parallel
            if bad:
                self._revoke([keys[i] for i in bad], upsert)
            single = len(keys) == 1
            ended = confirms.end(self.master, [keys[i] for i in good], batch=not single)
            for i, (code, message) in zip(good, ended, strict=True):
                if code != 0:
                    text = message or ""
                    results[i] = store_error(code, text if single else f"{keys[i]!r}: {text}")
            return
        if len(keys) == 1 and good and not bad:  # the common single put: the plain RPC
            end = msg.UpsertEnd if upsert else msg.PutEnd
            try:
                self.master.call(end(self.client_id, keys[0]))
            except StoreError as exc:
                results[0] = exc
            return
        if bad:
            self._revoke([keys[i] for i in bad], upsert)
        if not good:
            return
        batch_end = msg.BatchUpsertEnd if upsert else msg.BatchPutEnd
        good_keys = tuple(keys) if len(good) == len(keys) else tuple(keys[i] for i in good)
        value = self.master.call(batch_end(self.client_id, good_keys))
        if len(value.codes) != len(good):
            raise MalformedMessage(f"the master answered {len(value.codes)} of {len(good)} keys")
        if not any(value.codes):
            return
        for i, c, v in zip(good, value.codes, value.messages, strict=True):
            if c != 0:
                results[i] = store_error(c, f"{keys[i]!r}: {v}")

    def _write_shared(
        self, keys: Sequence[str], parts: Sequence[Parts], sizes: list[int], done: list[int]
    ) -> None:
        """--root_fs_dir: write the values just stored to the shared filesystem as
        well, then report them (the master adds DISK replicas).  A failure is
        logged, not raised: the memory replicas were stored."""
        written: list[int] = []
        for i in done:
            host = [p for p in parts[i] if isinstance(p, memoryview)]
            if len(host) != len(parts[i]):
                continue  # device memory: no host copy to write from
            try:
                write_object(self.fsdir, keys[i], host, time.monotonic_ns(), fsync=False)
            except OSError as exc:
                log.warning(
                    "writing %r to the shared filesystem %s failed: %s", keys[i], self.fsdir, exc
                )
                continue
            written.append(i)
        if not written:
            return
        try:
            self.master.call(
                omsg.NotifyOffloadSuccess(
                    self.client_id,
                    tuple(keys[i] for i in written),
                    tuple(sizes[i] for i in written),
                    shared=True,
                )
            )
        except MooncakeError as exc:
            log.warning("reporting DISK replicas to the master failed: %s", exc)

    def _revoke(self, keys: Sequence[str], upsert: bool, *, quiet: bool = False) -> None:
        """Revoke puts (their buffers are freed at once).  When the master cannot be
        reached, the keys are revoked later by the heartbeat, so that their
        buffers do not stay reserved for put_start_release_timeout."""
        try:
            if len(keys) == 1:
                revoke = msg.UpsertRevoke if upsert else msg.PutRevoke
                self.master.call_many([revoke(self.client_id, keys[0])])
            else:
                batch = msg.BatchUpsertRevoke if upsert else msg.BatchPutRevoke
                self.master.call_many([batch(self.client_id, tuple(keys))])
        except MooncakeError as exc:
            if not quiet:
                log.warning(
                    "revoking %d put(s) failed (%s); retrying with the heartbeat", len(keys), exc
                )
                with self._writing_lock:
                    self._revoke_backlog.update((k, upsert) for k in keys)

    def _retry_revokes(self) -> None:
        """Heartbeat: revoke what could not be revoked before."""
        with self._writing_lock:
            backlog = [kv for kv in self._revoke_backlog if kv[0] not in self._writing]
            if not backlog:
                return
            self._revoke_backlog.difference_update(backlog)
            self._revoking.update(k for k, _ in backlog)
        try:
            for upsert in (False, True):
                keys = [k for k, u in backlog if u is upsert]
                if keys:
                    self._revoke(keys, upsert)
        finally:
            with self._writing_lock:
                self._revoking.difference_update(k for k, _ in backlog)
                self._revoke_done.notify_all()

    @staticmethod
    def _raise_or(result: bool | StoreError) -> bool:
        if isinstance(result, StoreError):
            raise result
        return result

    def put(self, key: str, value: Any, config: ReplicateConfig | None = None) -> bool:
        """Store ``value`` (any buffer) under ``key``.

        Returns:
            True if stored, False if the key already existed (it is never overwritten).

        Raises:
            InvalidParams: empty key/value, or larger than local_buffer_size.
            NoAvailableHandle: no room in the pool, even after eviction.
            StoreTransferFailed: a replica's owner could not be written.
            RpcFailed: the master is unreachable.
        """
        return self._put_views(key, [_as_view(value)], config, "put")

    def put_parts(
        self, key: str, parts: Sequence[Any], config: ReplicateConfig | None = None
    ) -> bool:
        """Store the concatenation of ``parts`` (each a buffer) without joining them."""
        return self._put_views(key, [_as_view(p) for p in parts], config, "put_parts")

    def _put_views(self, key: str, views: Parts, config: ReplicateConfig | None, op: str) -> bool:
        self._bytes_api_limit(sum(len(v) for v in views), f"put {key!r}")
        return self._raise_or(
            self._write_batch([key], [views], config or DEFAULT_REPLICATE_CONFIG, False, op)[0]
        )

    def put_from(
        self, key: str, buffer: Any, size: int | None = None, config: ReplicateConfig | None = None
    ) -> bool:
        """Store ``size`` bytes from registered memory (an address or a buffer) without staging."""
        view = self._source_part(buffer, size)
        return self._raise_or(
            self._write_batch(
                [key], [[view]], config or DEFAULT_REPLICATE_CONFIG, False, "put_from"
            )[0]
        )

    def put_many(
        self,
        keys: Sequence[str],
        values: Sequence[Sequence[Any]],
        config: ReplicateConfig | None = None,
        *,
        bytes_api: bool = False,
    ) -> list[bool | StoreError]:
        """Store many objects; each value is a sequence of parts (buffers or
        ``(address, size)`` pairs).  Results per key: True, False (existed) or the error."""
        if len(keys) != len(values):
            raise InvalidParams(f"{len(keys)} keys but {len(values)} values")
        parts = self._parts_of(values, self._part)
        if bytes_api:
            for k, ps in zip(keys, parts, strict=True):
                self._bytes_api_limit(sum(len(p) for p in ps), f"put {k!r}")
        op = "put_batch" if bytes_api else "batch_put_from"
        return self._write_batch(keys, parts, config or DEFAULT_REPLICATE_CONFIG, False, op)

    def _part(self, p: Any) -> Part:
        if isinstance(p, tuple):
            addr, size = p
            return self._source_part(int(addr), int(size))
        return _as_view(p)

    def upsert(self, key: str, value: Any, config: ReplicateConfig | None = None) -> None:
        """Insert or replace; readers see the old value until the new one is complete."""
        views = [_as_view(value)]
        self._bytes_api_limit(len(views[0]), f"upsert {key!r}")
        self._raise_or(
            self._write_batch([key], [views], config or DEFAULT_REPLICATE_CONFIG, True, "upsert")[0]
        )

    def upsert_many(
        self,
        keys: Sequence[str],
        values: Sequence[Sequence[Any]],
        config: ReplicateConfig | None = None,
    ) -> list[bool | StoreError]:
        if len(keys) != len(values):
            raise InvalidParams(f"{len(keys)} keys but {len(values)} values")
        pointers = bool(values) and bool(values[0]) and isinstance(values[0][0], tuple)
        parts = [[self._part(p) for p in ps] for ps in values]
        op = "batch_upsert_from" if pointers else "upsert_batch"
        return self._write_batch(keys, parts, config or DEFAULT_REPLICATE_CONFIG, True, op)
