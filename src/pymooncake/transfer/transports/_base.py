"""The interface every transport implements, and the values it exchanges.

A transport moves *slices*: one contiguous local view to or from one remote
virtual address of a peer segment.  The engine groups a batch's requests by
peer and calls :meth:`Transport.execute` once per group, from whichever thread
should do the work (the caller's for sync transfers, a worker's for async
batches).  ``execute`` reports every slice exactly once through ``on_done``
-- with ``None`` on success or the exception that failed it -- and never
raises for per-slice failures.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ...config import EngineConfig
from ...wire import SegmentDesc
from .._memory import MemoryRegistry, Region
from ..device._interface import DeviceSpan

if TYPE_CHECKING:
    from ..device._context import DeviceContext

__all__ = ["Peer", "Slice", "SliceCallback", "Transport", "TransportContext"]


@dataclass(slots=True)
class Slice:
    """One request as a transport sees it.  ``local`` has exactly the length.

    Not frozen: one is built per request, and a frozen dataclass pays an
    ``object.__setattr__`` per field; nothing changes a slice after it is built.
    """

    index: int
    is_write: bool
    local: memoryview
    remote_addr: int
    #: device (GPU) memory on our side: then ``local`` is ``DEVICE_VIEW`` (unusable)
    #: and only transports with ``handles_device`` (or the engine's staging) move it
    device: DeviceSpan | None = None

    @property
    def length(self) -> int:
        return len(self.local) if self.device is None else self.device.nbytes


SliceCallback = Callable[[Slice, "BaseException | None"], None]


@dataclass(frozen=True)
class Peer:
    """A resolved remote segment: its descriptor and where to reach it."""

    name: str
    desc: SegmentDesc
    rpc_host: str
    rpc_port: int
    #: host for data connections (``tcp_data_host``, else the RPC host)
    data_host: str
    #: True when the segment is this engine's own
    local: bool = False

    @property
    def data_port(self) -> int:
        return self.desc.tcp_data_port


@dataclass(frozen=True)
class TransportContext:
    """What a transport needs from its engine."""

    config: EngineConfig
    registry: MemoryRegistry
    #: address the engine advertises to peers (and binds its listeners to)
    advertised_host: str
    bind_host: str
    #: the engine's device memory (staging for device regions); None: host only
    devices: DeviceContext | None = None


class Transport(abc.ABC):
    """One way of moving bytes, chosen per peer by :meth:`can_reach`."""

    #: registry name, also the descriptor ``protocol`` it serves
    name: ClassVar[str]
    #: True when :meth:`execute` moves slices with ``device`` set itself; the
    #: engine stages them through pinned host memory for the others
    handles_device: ClassVar[bool] = False

    @abc.abstractmethod
    def start(self) -> None:
        """Open listeners/resources.  Called once before use."""

    def descriptor_fields(self) -> dict[str, Any]:
        """Fields this transport contributes to the local segment descriptor."""
        return {}

    @abc.abstractmethod
    def can_reach(self, peer: Peer) -> bool:
        """True if this transport can serve transfers to ``peer``."""

    @abc.abstractmethod
    def execute(
        self,
        peer: Peer,
        slices: Sequence[Slice],
        deadline: float,
        on_done: SliceCallback,
    ) -> None:
        """Move ``slices`` to/from ``peer`` before ``deadline`` (time.monotonic()).

        Blocks the calling thread; never raises for a slice's failure (reports it
        through ``on_done``).  May raise only for programming errors.
        """

    def registry_changed(self) -> None:  # noqa: B027 - optional hook
        """The engine's registered memory changed (see ``TransportContext.registry``)."""

    def quiesce(self, region: Region, *, drain_s: float) -> None:  # noqa: B027 - optional hook
        """``region`` was unregistered: return once this transport can no longer
        touch it on a peer's behalf (beyond the registry's own use slots)."""

    def forget_peer(self, peer: Peer) -> None:  # noqa: B027 - optional hook
        """Drop cached connections/mappings of ``peer`` (it restarted or left)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release everything; idempotent."""
