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

    {"code": [code per key],                  # 0 or the reference ErrorCode
     "msg":  [[key index, message], ...],     # for the keys whose code is not 0
     "segs": [[endpoint, segment id, segment number, base], ...],
     "n":    [replicas per key],              # 0 for a failed key
     "seg":  [segment index per replica],     # replicas of key 0, then key 1 ...
     "addr": [address per replica],
     "size": [object size per key],           # BatchGetReplicaList only
     "lease_ttl_ms": 5000}                    # BatchGetReplicaList only

A replica's id is derived (``segment number << 40 | (address - base) >> 6``, as
the master numbers them), so a full :class:`ReplicaDesc`-like record can be
rebuilt from the columns when a caller wants one.

:class:`ReplicaColumnsBuilder` writes the columns (the master), :func:`decode`
checks their shape once and :class:`ReplicaColumns` reads them (the client).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from ..errors import MalformedMessage

__all__ = ["Replica", "ReplicaColumns", "ReplicaColumnsBuilder", "decode_columns"]

#: one replica as a client uses it: (endpoint, address, segment id, replica id)
Replica = tuple[str, int, str, int]
_FIELDS: Final = ("code", "msg", "segs", "n", "seg", "addr")


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

    def columns(self, lease_ttl_ms: int = 0) -> ReplicaColumns:
        """The columns as a :class:`ReplicaColumns` (no copy; the master wraps it
        in its typed reply)."""
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
        )

    def value(self, lease_ttl_ms: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "code": self.code,
            "msg": self.msgs,
            "segs": self.segs,
            "n": self.counts,
            "seg": self.seg,
            "addr": self.addr,
        }
        if self.sizes is not None:
            out["size"] = self.sizes
        if lease_ttl_ms is not None:
            out["lease_ttl_ms"] = lease_ttl_ms
        return out


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


def _ints(value: Any, what: str, n: int | None = None) -> list[int]:
    if type(value) is not list or (n is not None and len(value) != n):
        raise MalformedMessage(f"columnar reply: {what} is not a list of {n} integers")
    return value


def decode_columns(value: Any, *, sizes: bool = False) -> ReplicaColumns:
    """Check the shape of a columnar reply once (lengths agree, indices in range).

    Raises:
        MalformedMessage: a field is missing or the columns disagree.
    """
    if type(value) is not dict or any(f not in value for f in _FIELDS):
        raise MalformedMessage(f"not a columnar batch reply: {str(value)[:100]}")
    code = _ints(value["code"], "code")
    n = len(code)
    counts = _ints(value["n"], "n", n)
    total = sum(counts)
    seg = _ints(value["seg"], "seg", total)
    addr = _ints(value["addr"], "addr", total)
    segs = value["segs"]
    if type(segs) is not list or any(type(s) is not list or len(s) != 4 for s in segs):
        raise MalformedMessage("columnar reply: segs is not a list of 4-element lists")
    if seg and (min(seg) < 0 or max(seg) >= len(segs)):
        raise MalformedMessage("columnar reply: a segment index is out of range")
    msgs = value["msg"]
    if type(msgs) is not list:
        raise MalformedMessage("columnar reply: msg is not a list")
    try:
        messages = {int(i): str(m) for i, m in msgs}
    except (TypeError, ValueError):
        raise MalformedMessage("columnar reply: msg is not a list of [index, text]") from None
    got_sizes = _ints(value["size"], "size", n) if sizes else None
    return ReplicaColumns(
        code, messages, segs, counts, seg, addr, got_sizes, int(value.get("lease_ttl_ms", 0))
    )
