"""The data paths of a dummy client: puts and gets through the real client.

Every call names shared memory (``_dummy_local.py``): caller buffers the real
client can reach are passed by address, the others are staged through the
local buffer.  Writes send one ``put`` per batch; reads of known destinations
in shared memory send one ``get_into``; every other read first asks where the
objects are (``locate``, which also tells their sizes and grants the read
lease), then reads them with ``read_ranges`` straight from their replicas
into shared memory.  When the local buffer cannot stage a whole batch at
once, the batch goes in pieces that fit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..errors import MooncakeError, StoreError, store_error
from ..wire._dummy import DummyMethod
from ._buffers import BufferHandle, make_handle, new_bytes
from ._client_io import ObjectLocation
from ._dummy_handlers import location_from_wire, location_to_wire
from ._dummy_local import DummyMemory, Span, copy_into, span_of
from ._types import ErrorCode, ReplicateConfig

__all__ = ["Call", "DummyIO"]

#: ``call(method, params, what)`` -> reply value (raises StoreError / RpcFailed)
Call = Callable[[DummyMethod, dict[str, Any], str], Any]
#: a single read of unknown size first stages this much and asks for the object in
#: one round trip (``get_staged``); a larger object costs a second one
SPECULATIVE_BYTES = 64 << 10


def _row_result(row: Any, what: str) -> Any:
    code, value = row
    if code != 0:
        return store_error(int(code), f"{what}: {value}")
    return value


class _Staging:
    """The staging space one call holds, given back at the end of each piece."""

    def __init__(self, mem: DummyMemory) -> None:
        self.mem = mem
        self.addrs: list[int] = []
        self.bytes = 0

    def take(self, n: int, what: str) -> tuple[int, memoryview] | None:
        got = self.mem.stage(n, self.bytes, what)
        if got is not None:
            self.addrs.append(got[0])
            self.bytes += self.mem.local.size_of(got[0])
        return got

    def release(self) -> None:
        self.mem.unstage(self.addrs)
        self.addrs = []
        self.bytes = 0


class DummyIO:
    """Puts and gets of one dummy client."""

    def __init__(self, mem: DummyMemory, call: Call, client_id: str) -> None:
        self.mem = mem
        self.call = call
        self.client_id = client_id

    # ------------------------------------------------------------------------------
    # writes
    # ------------------------------------------------------------------------------

    def write(
        self,
        keys: Sequence[str],
        values: Sequence[Sequence[Any]],
        config: ReplicateConfig,
        upsert: bool,
        op: str,
    ) -> list[bool | StoreError]:
        """Write many objects (each value a sequence of parts); True stored, False
        the key existed (puts never overwrite), or the error."""
        n = len(keys)
        results: list[bool | StoreError | None] = [None] * n
        spans: list[list[Span]] = [[] for _ in range(n)]
        for i, parts in enumerate(values):
            try:
                spans[i] = [s for s in (span_of(p, writable=False) for p in parts) if s.n]
            except StoreError as exc:
                results[i] = exc
        todo = [i for i in range(n) if results[i] is None]
        staging = _Staging(self.mem)
        chunk: list[int] = []
        rows: list[list[list[int]]] = []
        pos = 0
        while pos < len(todo):
            i = todo[pos]
            what = f"{op}({keys[i]!r})"
            need = sum(s.n for s in spans[i] if not self.mem.shared(s))
            got = None
            if need:
                try:
                    got = staging.take(need, what)
                except StoreError as exc:
                    results[i] = exc
                    pos += 1
                    continue
                if got is None:
                    if chunk:  # send what is staged, then try this key again
                        self._send_writes(keys, chunk, rows, config, upsert, op, results)
                        staging.release()
                        chunk, rows = [], []
                        continue
                    results[i] = self.mem.no_room(need, what, write=True)
                    pos += 1
                    continue
            row: list[list[int]] = []
            off = 0
            for s in spans[i]:
                if self.mem.shared(s):
                    row.append([s.addr, s.n])
                    continue
                assert got is not None
                copy_into(got[1][off : off + s.n], s.bytes_view(False))
                row.append([got[0] + off, s.n])
                off += s.n
            chunk.append(i)
            rows.append(row)
            pos += 1
        if chunk:
            self._send_writes(keys, chunk, rows, config, upsert, op, results)
        staging.release()
        return [r if r is not None else True for r in results]

    def _send_writes(
        self,
        keys: Sequence[str],
        chunk: list[int],
        rows: list[list[list[int]]],
        config: ReplicateConfig,
        upsert: bool,
        op: str,
        results: list[bool | StoreError | None],
    ) -> None:
        params = {
            "client_id": self.client_id,
            "upsert": upsert,
            "keys": [keys[i] for i in chunk],
            "parts": rows,
            "config": config.to_wire(),
        }
        what = f"{op}({keys[chunk[0]]!r})" if len(chunk) == 1 else f"{op} of {len(chunk)} keys"
        try:
            reply = self.call(DummyMethod.PUT, params, what)
        except StoreError as exc:
            for i in chunk:
                results[i] = exc
            return
        for i, r in zip(chunk, reply, strict=True):
            v = _row_result(r, f"{op}({keys[i]!r})")
            results[i] = v if isinstance(v, StoreError) else bool(v)

    # ------------------------------------------------------------------------------
    # reads
    # ------------------------------------------------------------------------------

    def locate(self, keys: Sequence[str]) -> list[ObjectLocation | StoreError]:
        """Where each object is (size, replicas, read lease); one round trip."""
        if not keys:
            return []
        reply = self.call(
            DummyMethod.LOCATE,
            {"keys": list(keys)},
            f"locate({keys[0]!r})" if len(keys) == 1 else f"locate of {len(keys)} keys",
        )
        out: list[ObjectLocation | StoreError] = []
        for key, row in zip(keys, reply, strict=True):
            v = _row_result(row, repr(key))
            out.append(v if isinstance(v, StoreError) else location_from_wire(v))
        return out

    def read_into(
        self, keys: Sequence[str], dests: Sequence[Sequence[Any]], op: str
    ) -> list[int | StoreError]:
        """Read each key into its destination parts (filled in order); the object
        size or the error per key."""
        n = len(keys)
        results: list[int | StoreError | None] = [None] * n
        spans: list[list[Span]] = [[] for _ in range(n)]
        for i, parts in enumerate(dests):
            try:
                spans[i] = [span_of(p, writable=True) for p in parts]
            except StoreError as exc:
                results[i] = exc
        todo = [i for i in range(n) if results[i] is None]
        if not todo:
            return [r for r in results if r is not None]
        if all(self.mem.shared(s) for i in todo for s in spans[i]):
            reply = self.call(
                DummyMethod.GET_INTO,
                {
                    "client_id": self.client_id,
                    "keys": [keys[i] for i in todo],
                    "parts": [[[s.addr, s.n] for s in spans[i]] for i in todo],
                },
                f"{op}({keys[todo[0]]!r})" if len(todo) == 1 else f"{op} of {len(todo)} keys",
            )
            for i, row in zip(todo, reply, strict=True):
                v = _row_result(row, f"{op}({keys[i]!r})")
                results[i] = v if isinstance(v, StoreError) else int(v)
            return [r if r is not None else 0 for r in results]
        if len(todo) == 1:
            (i,) = todo
            room = sum(s.n for s in spans[i])
            got = self._staged_one(keys[i], min(room, self.mem.local.size), op)
            if isinstance(got, StoreError):
                results[i] = got
                return [r if r is not None else 0 for r in results]
            if isinstance(got, ObjectLocation):
                results[i] = self._read_located(keys[i], spans[i], got, op)
                return [r if r is not None else 0 for r in results]
            if got is not None:
                size, staged, release = got
                try:
                    left, off = size, 0
                    for s in spans[i]:
                        take = min(s.n, left)
                        if take:
                            copy_into(s.bytes_view(True)[:take], staged[off : off + take])
                        off += take
                        left -= take
                except StoreError as exc:
                    results[i] = exc
                else:
                    results[i] = size
                finally:
                    release()
                return [r if r is not None else 0 for r in results]
        locs = self.locate([keys[i] for i in todo])
        found: list[int] = []
        plans: list[list[tuple[Span, int]]] = []
        found_locs: list[ObjectLocation] = []
        for i, loc in zip(todo, locs, strict=True):
            if isinstance(loc, StoreError):
                results[i] = loc
                continue
            room = sum(s.n for s in spans[i])
            if room < loc.size:
                results[i] = store_error(
                    int(ErrorCode.INVALID_PARAMS),
                    f"{keys[i]!r} is {loc.size} bytes but the destination holds only {room}",
                )
                continue
            plan: list[tuple[Span, int]] = []
            left, src = loc.size, 0
            for s in spans[i]:
                take = min(s.n, left)
                if take:
                    plan.append(
                        (Span(s.addr, take, s.view[:take] if s.view is not None else None), src)
                    )
                src += take
                left -= take
            found.append(i)
            plans.append(plan)
            found_locs.append(loc)
        for i, loc, frags in zip(
            found, found_locs, self.read_plans(found_locs, plans, op), strict=True
        ):
            err = next((f for f in frags if isinstance(f, StoreError)), None)
            results[i] = err if err is not None else loc.size
        return [r if r is not None else 0 for r in results]

    def _staged_one(
        self, key: str, cap: int, op: str
    ) -> tuple[int, memoryview, Callable[[], None]] | ObjectLocation | StoreError | None:
        """Read ``key`` (of unknown size) into ``cap`` staged bytes in one round trip:
        (size, the staged bytes, release) when it fit; its location (lease granted)
        when it did not, to read with :meth:`read_plans`; the error; or None when
        there is no room to stage now."""
        staging = _Staging(self.mem)
        what = f"{op}({key!r})"
        got = staging.take(cap, what) if cap > 0 else None
        if got is None:
            return None
        try:
            (row,) = self.call(
                DummyMethod.GET_STAGED,
                {"client_id": self.client_id, "keys": [key], "parts": [[[got[0], cap]]]},
                what,
            )
        except StoreError as exc:
            staging.release()
            return exc
        v = _row_result(row, what)
        if isinstance(v, StoreError) or "location" in v:
            staging.release()
            return v if isinstance(v, StoreError) else location_from_wire(v["location"])
        size = int(v["size"])
        return size, got[1][:size], staging.release

    def _read_located(
        self, key: str, spans: Sequence[Span], loc: ObjectLocation, op: str
    ) -> int | StoreError:
        """Read a located object into ``spans`` (filled in order); its size or the error."""
        room = sum(s.n for s in spans)
        if room < loc.size:
            return store_error(
                int(ErrorCode.INVALID_PARAMS),
                f"{key!r} is {loc.size} bytes but the destination holds only {room}",
            )
        plan: list[tuple[Span, int]] = []
        left, src = loc.size, 0
        for s in spans:
            take = min(s.n, left)
            if take:
                view = s.view[:take] if s.view is not None else None
                plan.append((Span(s.addr, take, view), src))
            src += take
            left -= take
        ((*frags,),) = self.read_plans([loc], [plan], op)
        err = next((f for f in frags if isinstance(f, StoreError)), None)
        return err if err is not None else loc.size

    def get_bytes(self, keys: Sequence[str], op: str) -> list[bytes | StoreError]:
        """Values of many keys as ``bytes`` (each staged, then copied out once)."""
        if len(keys) == 1 and self.mem.local.size:
            got = self._staged_one(keys[0], min(SPECULATIVE_BYTES, self.mem.local.size), op)
            if isinstance(got, StoreError):
                return [got]
            if isinstance(got, ObjectLocation):
                obj, view = new_bytes(got.size)
                res = self._read_located(keys[0], [span_of(view, writable=True)], got, op)
                if isinstance(res, StoreError):
                    return [res]
                return [obj if isinstance(obj, bytes) else bytes(obj)]
            if got is not None:
                size, staged, release = got
                try:
                    obj, view = new_bytes(size)
                    if size:
                        copy_into(view, staged)
                    return [obj if isinstance(obj, bytes) else bytes(obj)]
                finally:
                    release()
        locs = self.locate(keys)
        out: list[bytes | StoreError] = []
        holders: list[bytes | bytearray] = []
        plans: list[list[tuple[Span, int]]] = []
        found: list[ObjectLocation] = []
        for loc in locs:
            if isinstance(loc, StoreError):
                continue
            obj, view = new_bytes(loc.size)
            holders.append(obj)
            found.append(loc)
            plans.append([(span_of(view, writable=True), 0)] if loc.size else [])
        frag_results = iter(self.read_plans(found, plans, op))
        held = iter(holders)
        for loc in locs:
            if isinstance(loc, StoreError):
                out.append(loc)
                continue
            obj = next(held)
            err = next((f for f in next(frag_results) if isinstance(f, StoreError)), None)
            if err is not None:
                out.append(err)
            else:
                out.append(obj if isinstance(obj, bytes) else bytes(obj))
        return out

    def get_alloc(
        self, keys: Sequence[str], alloc: Callable[[int, int], Any], op: str
    ) -> list[Any | StoreError]:
        """Read each object into ``alloc(i, size)`` (a writable buffer of that size)."""
        locs = self.locate(keys)
        out: list[Any | StoreError] = list(locs)
        found: list[int] = []
        found_locs: list[ObjectLocation] = []
        plans: list[list[tuple[Span, int]]] = []
        for i, loc in enumerate(locs):
            if isinstance(loc, StoreError):
                continue
            buf = alloc(i, loc.size)
            try:
                span = span_of(buf, writable=True)
            except StoreError as exc:
                out[i] = exc
                continue
            if span.n != loc.size:
                out[i] = store_error(
                    int(ErrorCode.INVALID_PARAMS),
                    f"{keys[i]!r}: alloc({loc.size}) returned a {span.n}-byte buffer",
                )
                continue
            out[i] = buf
            found.append(i)
            found_locs.append(loc)
            plans.append([(span, 0)] if span.n else [])
        for i, frags in zip(found, self.read_plans(found_locs, plans, op), strict=True):
            err = next((f for f in frags if isinstance(f, StoreError)), None)
            if err is not None:
                out[i] = err
        return out

    def get_buffer(self, key: str) -> BufferHandle:
        """The object in the local buffer, as a :class:`BufferHandle` (read in place).

        Raises:
            NoAvailableHandle: the local buffer has no room for it.
        """
        (loc,) = self.locate([key])
        if isinstance(loc, StoreError):
            raise loc
        taken = self.mem.local.take(loc.size) if loc.size else None
        if taken is None:
            raise self.mem.no_room(loc.size, f"get_buffer({key!r})", write=False)
        addr, view = taken
        try:
            ((res,),) = self.read_plans([loc], [[(Span(addr, loc.size, view), 0)]], "get_buffer")
        except BaseException:
            view.release()
            self.mem.local.give_back(addr)
            raise
        if isinstance(res, StoreError):
            view.release()
            self.mem.local.give_back(addr)
            raise res
        return make_handle(self.mem.local, addr, loc.size)

    def read_ranges(
        self,
        locations: Sequence[ObjectLocation],
        ranges: Sequence[Sequence[tuple[memoryview, int]]],
    ) -> list[list[int | StoreError]]:
        """Byte ranges of located objects: ``(destination view, source offset)``
        pairs; bytes read or the error per fragment."""
        plans = [[(span_of(v, writable=True), src) for v, src in row] for row in ranges]
        return self.read_plans(list(locations), plans, "get_into_ranges")

    def read_plans(
        self,
        locs: Sequence[ObjectLocation],
        plans: Sequence[Sequence[tuple[Span, int]]],
        op: str,
    ) -> list[list[int | StoreError]]:
        """Read the fragments ``(destination span, source offset)`` of each
        located object; bytes read or the error per fragment."""
        results: list[list[int | StoreError]] = [[0] * len(p) for p in plans]
        staging = _Staging(self.mem)
        chunk: list[int] = []
        rows: list[list[list[int]]] = []
        copies: list[tuple[int, int, memoryview, Span]] = []  # loc, frag, staged view, dest
        pos = 0
        while pos < len(locs):
            what = f"{op}({locs[pos].key!r})"
            plan = plans[pos]
            need = sum(s.n for s, _ in plan if not self.mem.shared(s))
            got = None
            if need:
                try:
                    got = staging.take(need, what)
                except StoreError as exc:
                    results[pos] = [exc] * len(plan)
                    pos += 1
                    continue
                if got is None:
                    if chunk:
                        self._send_reads(locs, chunk, rows, copies, results, op)
                        staging.release()
                        chunk, rows, copies = [], [], []
                        continue
                    results[pos] = [self.mem.no_room(need, what, write=False)] * len(plan)
                    pos += 1
                    continue
            row: list[list[int]] = []
            off = 0
            for f, (s, src) in enumerate(plan):
                if self.mem.shared(s):
                    row.append([s.addr, s.n, src])
                    continue
                assert got is not None
                copies.append((pos, f, got[1][off : off + s.n], s))
                row.append([got[0] + off, s.n, src])
                off += s.n
            chunk.append(pos)
            rows.append(row)
            pos += 1
        if chunk:
            self._send_reads(locs, chunk, rows, copies, results, op)
        staging.release()
        return results

    def _send_reads(
        self,
        locs: Sequence[ObjectLocation],
        chunk: list[int],
        rows: list[list[list[int]]],
        copies: list[tuple[int, int, memoryview, Span]],
        results: list[list[int | StoreError]],
        op: str,
    ) -> None:
        params = {
            "client_id": self.client_id,
            "locations": [location_to_wire(locs[i]) for i in chunk],
            "ranges": rows,
        }
        what = f"{op}({locs[chunk[0]].key!r})" if len(chunk) == 1 else f"{op} of {len(chunk)} keys"
        try:
            reply = self.call(DummyMethod.READ_RANGES, params, what)
        except StoreError as exc:
            for i in chunk:
                results[i] = [exc] * len(results[i])
            return
        for i, row in zip(chunk, reply, strict=True):
            results[i] = [
                v if isinstance(v, StoreError) else int(v)
                for v in (_row_result(r, f"{op}({locs[i].key!r})") for r in row)
            ]
        for i, f, staged, dest in copies:
            if not isinstance(results[i][f], StoreError):
                try:
                    copy_into(dest.bytes_view(True), staged)
                except MooncakeError as exc:
                    results[i][f] = store_error(int(ErrorCode.INVALID_PARAMS), str(exc))
