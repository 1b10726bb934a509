"""An engine's view of device memory: which backend, where a pointer lives, staging.

One :class:`DeviceContext` per engine.  It resolves the engine's
``device_backend`` mode lazily -- on the first pointer that is not host
memory, the first ``cuda:N`` registration -- so engines that only ever see host
memory never import cuda-python.  It owns the staging pool (closed with the
engine) and offers transports the three staged operations they need.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from ...errors import DeviceUnavailable
from ..transports._base import Peer, Slice, SliceCallback
from ._interface import DeviceBackend, DeviceSpan
from ._select import resolve_mode, unavailable_reason
from ._staging import (
    DEFAULT_CHUNK_BYTES,
    Execute,
    StagingPool,
    receive_to_device,
    send_from_device,
    stage_slices,
)

__all__ = ["INSTALL_HINT", "DeviceContext"]

INSTALL_HINT = (
    "GPU memory needs CUDA support: pip install 'pymooncake[cuda]' (cuda-python; on a CUDA 12 "
    "driver add 'cuda-python<13') on a machine with an NVIDIA GPU"
)


class DeviceContext:
    """Device memory for one engine (``mode``: auto, cuda, fake or none)."""

    def __init__(self, mode: str = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.mode = mode
        self.chunk_bytes = chunk_bytes
        self._lock = threading.Lock()
        self._resolved = False
        self._backend: DeviceBackend | None = None
        self._pool: StagingPool | None = None
        self._closed = False

    # --- backend -----------------------------------------------------------------

    def active(self) -> DeviceBackend | None:
        """The backend, resolved on first use; None when the mode gives none.

        Raises:
            DeviceUnavailable: mode ``cuda`` and CUDA cannot work here.
        """
        if self._resolved:
            return self._backend
        with self._lock:
            if not self._resolved:
                self._backend = resolve_mode(self.mode)
                self._resolved = True
        return self._backend

    def require(self, what: str) -> DeviceBackend:
        """The backend, or an error that says ``what`` needed it and how to get it.

        Raises:
            DeviceUnavailable.
        """
        backend = self.active()
        if backend is not None:
            return backend
        if self.mode == "none":
            raise DeviceUnavailable(
                f"{what}: device memory is switched off for this engine (PYMOONCAKE_DEVICE=none); "
                "use PYMOONCAKE_DEVICE=auto"
            )
        reason = unavailable_reason()
        raise DeviceUnavailable(f"{what}: {INSTALL_HINT}" + (f" ({reason})" if reason else ""))

    def locate(self, addr: int) -> tuple[DeviceBackend, int] | None:
        """``(backend, device)`` when ``addr`` is device memory, else None."""
        backend = self.active()
        if backend is None:
            return None
        device = backend.pointer_device(addr)
        return None if device is None else (backend, device)

    def span(self, addr: int, length: int) -> DeviceSpan | None:
        """A :class:`DeviceSpan` when ``[addr, addr + length)`` is device memory, else None."""
        found = self.locate(addr)
        if found is None:
            return None
        return DeviceSpan(found[0], found[1], addr, length)

    # --- staging -----------------------------------------------------------------

    def pool(self, backend: DeviceBackend) -> StagingPool:
        with self._lock:
            if self._pool is None or self._pool.backend is not backend:
                if self._closed:
                    raise DeviceUnavailable("the engine is closed")
                if self._pool is not None:  # pragma: no cover - one backend per engine
                    self._pool.close()
                self._pool = StagingPool(backend, self.chunk_bytes)
            return self._pool

    def stage(
        self,
        execute: Execute,
        peer: Peer,
        slices: Sequence[Slice],
        deadline: float,
        on_done: SliceCallback,
    ) -> None:
        """Run ``slices`` through ``execute`` (a host-memory transport): host slices
        directly, device slices staged per device."""
        host: list[Slice] = []
        per_device: dict[tuple[int, int], list[Slice]] = {}
        for s in slices:
            dev = s.device
            if dev is None:
                host.append(s)
            else:
                per_device.setdefault((id(dev.backend), dev.device), []).append(s)
        if host:
            execute(peer, host, deadline, on_done)
        for group in per_device.values():
            dev = group[0].device
            assert dev is not None
            stage_slices(self.pool(dev.backend), execute, peer, group, deadline, on_done)

    def receive(
        self,
        backend: DeviceBackend,
        device: int,
        dst: int,
        size: int,
        readinto: Callable[[memoryview], None],
    ) -> None:
        """Target side of a peer's WRITE into device memory (see ``receive_to_device``)."""
        receive_to_device(self.pool(backend), device, dst, size, readinto)

    def send(
        self,
        backend: DeviceBackend,
        device: int,
        src: int,
        size: int,
        send: Callable[[memoryview], object],
    ) -> None:
        """Target side of a peer's READ of device memory (see ``send_from_device``)."""
        send_from_device(self.pool(backend), device, src, size, send)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
