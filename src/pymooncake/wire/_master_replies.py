"""Columnar replies of the master's batch RPCs (``BatchPutStart``,
``BatchUpsertStart``, ``BatchGetReplicaList``).

Theory of operation
-------------------
A batch of a thousand small objects used to be answered with one
``[code, [[replica id, endpoint, address, size, status, segment id], ...]]`` per
key: ~100 bytes of JSON per key, six Python objects to build on the master and a
descriptor to build on the client.  Replicas of one batch sit in a handful of
segments, so the reply names each segment once and lists the rest as flat columns
of integers (what ``json`` encodes and decodes fastest)::

    {"k":    keys in the batch,
     "code": [code per key],                  # 0 or the reference ErrorCode
     "msg":  [[key index, message], ...],     # for the keys whose code is not 0
     "segs": [[endpoint, segment id, segment number, base], ...],
     "n":    [replicas per key],              # 0 for a failed key
     "seg":  [segment index per replica],     # replicas of key 0, then key 1 ...
     "addr": [address per replica],           # or, instead of "addr":
     "addr_runs": [[first address, stride, count], ...],
     "size": [object size per key],           # BatchGetReplicaList only
     "lease_ttl_ms": 5000}                    # BatchGetReplicaList only

A column whose values are all one integer (``code``, ``n``, ``seg``, ``size``) is
sent as that integer: in a batch of new keys of one size every code is 0, every
key has one replica and most batches land in one segment, and a thousand
integers cost the master ~40 us to encode and the client as much to decode, each
column.  Addresses are rarely all one, but the buffers of a batch of new keys, and
those of a reservation (``ReserveSlots``), are usually adjacent: an address column
that is one arithmetic run, or that the master built as runs, travels as
``addr_runs`` (a reservation of 256 buffers: ~3 KB of JSON, ~50 us to encode on the
master and ~100 us to decode and check on the client, became ~30 bytes).

A replica's id is derived (``segment number << 40 | (address - base) >> 6``, as
the master numbers them), so a full :class:`ReplicaDesc`-like record can be
rebuilt from the columns when a caller wants one.

:class:`ReplicaColumnsBuilder` gathers the columns (the master),
``ColumnsReply`` (``_master_reply_msgs.py``) encodes them and checks their shape
once, and :class:`ReplicaColumns` reads them (the client).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Replica", "ReplicaColumns", "ReplicaColumnsBuilder"]

#: one replica as a client uses it: (endpoint, address, segment id, replica id)
Replica = tuple[str, int, str, int]


class ReplicaColumnsBuilder:
    """Accumulates a columnar reply, key by key (the master's side).

    ``segment`` values are whatever the caller uses for segments (compared by
    identity); ``describe(segment)`` gives ``[endpoint, segment id, number, base]``
    the first time one appears.
    """

    __slots__ = ("addr", "code", "counts", "describe", "index", "msgs", "seg", "segs", "sizes")

    def __init__(self, describe: Any, sizes: bool = False) -> None:
        self.describe = describe
        self.code: list[int] = []
        self.msgs: list[list[Any]] = []
        self.segs: list[list[Any]] = []
        self.index: dict[Any, int] = {}
        self.counts: list[int] = []
        self.seg: list[int] = []
        self.addr: list[int] = []
        self.sizes: list[int] | None = [] if sizes else None

    def fail(self, code: int, message: str) -> None:
        self.msgs.append([len(self.code), message])
        self.code.append(code)
        self.counts.append(0)
        if self.sizes is not None:
            self.sizes.append(0)

    def segment_index(self, segment: Any) -> int:
        i = self.index.get(segment)
        if i is None:
            i = self.index[segment] = len(self.segs)
            self.segs.append(self.describe(segment))
        return i

    def columns(
        self, lease_ttl_ms: int = 0, addr_runs: list[list[int]] | None = None
    ) -> ReplicaColumns:
        """The columns as a :class:`ReplicaColumns` (no copy; the master wraps it
        in its typed reply); ``addr_runs``: the address column as runs, when the
        caller built it from them."""
        messages = {i: m for i, m in self.msgs}
        return ReplicaColumns(
            self.code,
            messages,
            self.segs,
            self.counts,
            self.seg,
            self.addr,
            self.sizes,
            lease_ttl_ms,
            addr_runs,
        )


@dataclass(frozen=True, slots=True)
class ReplicaColumns:
    """A decoded columnar reply (see the module docstring)."""

    code: list[int]
    messages: dict[int, str]
    segs: list[list[Any]]
    counts: list[int]
    seg: list[int]
    addr: list[int]
    sizes: list[int] | None
    lease_ttl_ms: int
    #: ``addr`` as runs ``[first address, stride, count]`` when the master built
    #: it so (a reservation: ``run_columns`` of the master's handlers) or the wire
    #: carried it so; only how it travels (``addr`` always holds every address)
    addr_runs: list[list[int]] | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.code)

    def replicas(self) -> Iterator[list[Replica]]:
        """Per key, its replicas as (endpoint, address, segment id, replica id)
        (empty for a failed key)."""
        tables = [(str(s[0]), str(s[1]), int(s[2]) << 40, int(s[3])) for s in self.segs]
        seg, addr = self.seg, self.addr
        j = 0
        for n in self.counts:
            reps: list[Replica] = []
            for k in range(j, j + n):
                endpoint, sid, high, base = tables[seg[k]]
                a = addr[k]
                reps.append((endpoint, a, sid, high | ((a - base) >> 6)))
            j += n
            yield reps

    def placements(self) -> list[list[tuple[str, int]]]:
        """Per key, its replicas as (endpoint, address) (empty for a failed key):
        what a writer needs of :meth:`replicas`, built faster."""
        endpoints = [str(s[0]) for s in self.segs]
        seg, addr = self.seg, self.addr
        out: list[list[tuple[str, int]]] = []
        j = 0
        for n in self.counts:
            if n == 1:
                out.append([(endpoints[seg[j]], addr[j])])
            else:
                out.append([(endpoints[seg[k]], addr[k]) for k in range(j, j + n)])
            j += n
        return out

    def message(self, i: int) -> str:
        return self.messages.get(i, "")
