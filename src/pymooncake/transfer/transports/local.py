"""Loopback transport for the engine's own segment: a bounds-checked memcpy.

The reference routes transfers to its own segment through its network
transport; the result is the same bytes, so we copy directly, with the same
registry check a remote target would apply.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...errors import DeviceError, PeerRejected
from ._base import Peer, Slice, SliceCallback, Transport, TransportContext

__all__ = ["LocalTransport"]


class LocalTransport(Transport):
    name = "local"
    handles_device = True  # Region.copy asks the device backend for device memory

    def __init__(self, ctx: TransportContext) -> None:
        self._registry = ctx.registry

    def start(self) -> None:
        pass

    def can_reach(self, peer: Peer) -> bool:
        return peer.local

    def execute(
        self, peer: Peer, slices: Sequence[Slice], deadline: float, on_done: SliceCallback
    ) -> None:
        registry = self._registry
        slot = registry.new_slot()  # unregister waits for the copy in progress
        try:
            for s in slices:
                n = s.length
                if n == 0:
                    on_done(s, None)
                    continue
                region = registry.pin(slot, s.remote_addr, n)
                if region is None:
                    on_done(
                        s,
                        PeerRejected(
                            f"address {s.remote_addr:#x} with size {n} is not within any buffer "
                            f"registered in the local segment {peer.name!r}"
                        ),
                    )
                    continue
                try:
                    region.copy(
                        s.remote_addr, s.local if s.device is None else s.device, s.is_write
                    )
                except DeviceError as exc:
                    on_done(s, exc)
                    continue
                finally:
                    slot.region = None
                on_done(s, None)
        finally:
            registry.drop_slot(slot)

    def close(self) -> None:
        pass
