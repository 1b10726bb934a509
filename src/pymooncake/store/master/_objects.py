"""Master bookkeeping records: objects, replicas, segments, clients (plain data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._types import ReplicaDesc, ReplicaStatus, SegmentInfo
from ._allocator import OffsetAllocator

__all__ = ["ClientRecord", "ObjectRecord", "Replica", "SegmentRecord"]

_COMPLETE = ReplicaStatus.COMPLETE
_PROCESSING = ReplicaStatus.PROCESSING


@dataclass(slots=True)
class Replica:
    id: int
    segment_id: str
    endpoint: str
    addr: int
    size: int  # object size (bytes written/read)
    reserved: int  # bytes taken from the allocator
    status: ReplicaStatus = ReplicaStatus.PROCESSING

    def wire(self) -> list[Any]:
        """The replica as the master RPC sends it (``ReplicaDesc.to_wire`` layout)."""
        return [self.id, self.endpoint, self.addr, self.size, int(self.status), self.segment_id]

    def desc(self) -> ReplicaDesc:
        return ReplicaDesc(
            self.id, self.endpoint, self.addr, self.size, self.status, self.segment_id
        )


@dataclass(slots=True)
class ObjectRecord:
    key: str
    size: int
    writer: str  # client id of the put in progress / last completed put
    started_at: float  # when the put (or pending upsert) began
    replicas: list[Replica] = field(default_factory=list)
    #: replicas of an upsert in progress; ``replicas`` stay readable meanwhile
    pending: list[Replica] = field(default_factory=list)
    pending_size: int = 0
    lease_until: float = 0.0
    last_access: float = 0.0
    soft_pin_until: float | None = None
    soft_pin_ttl_s: float | None = None  # applied when the put completes
    #: the pending upsert (re)enables the soft pin when it completes
    repin: bool = True
    hard_pinned: bool = False

    # (plain loops: these run several times per request, and a generator inside
    # any() costs more than the whole check)
    @property
    def readable(self) -> bool:
        for r in self.replicas:  # noqa: SIM110 (see above)
            if r.status is _COMPLETE:
                return True
        return False

    @property
    def in_flight(self) -> bool:
        """A put or upsert is writing replicas of this key."""
        if self.pending:
            return True
        for r in self.replicas:  # noqa: SIM110 (see above)
            if r.status is _PROCESSING:
                return True
        return False


@dataclass(slots=True)
class SegmentRecord:
    info: SegmentInfo
    client_id: str
    allocator: OffsetAllocator
    #: replica id -> key, for sweeping when the segment goes away
    replicas: dict[int, str] = field(default_factory=dict)
    draining: bool = False

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def name(self) -> str:
        return self.info.name


@dataclass(slots=True)
class ClientRecord:
    id: str
    last_seen: float
    segments: set[str] = field(default_factory=set)
    host_id: str = ""
