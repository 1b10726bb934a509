"""Memory side of the transfer engine: registration, managed buffers, local views.

A mixin of :class:`TransferEngine` (``_engine.py``); it relies on the engine's
registry, its managed-buffer table and its publish hooks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from ..config import EngineConfig
from ..errors import AddressNotRegistered, InvalidArgument, MooncakeError, NotSupported
from ._memory import (
    DEVICE_VIEW,
    MemoryRegistry,
    Region,
    address_of,
    allocate_anonymous,
    allocate_shared,
    buffer_address,
    is_host_memory,
    view_at,
)
from .device import DeviceSpan, parse_location
from .device._context import INSTALL_HINT, DeviceContext

__all__ = ["MemoryOps"]


class MemoryOps:
    """Registration and managed buffers (mixin; see TransferEngine)."""

    config: EngineConfig
    _registry: MemoryRegistry
    _managed: dict[int, Region]
    _devices: DeviceContext

    def _check_open(self) -> None:
        raise NotImplementedError

    def _publish(self) -> None:
        raise NotImplementedError

    def _registry_changed(self) -> None:
        raise NotImplementedError

    def _quiesce(self, regions: Iterable[Region]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------------------
    # memory
    # ------------------------------------------------------------------------------

    def register(
        self,
        memory: object,
        length: int | None = None,
        *,
        location: str = "*",
        remote_accessible: bool = True,
        publish: bool = True,
    ) -> Region:
        """Register memory that peers may read and write.

        Args:
            memory: a raw address (int) with ``length``, or a writable buffer
                (bytearray, mmap, numpy array, memoryview; a torch tensor, CPU
                or CUDA; a :class:`DeviceSpan`).  Device (GPU) pointers are
                recognised and registered as ``cuda:N``.
            location: ``cpu:N``, ``cuda:N`` or ``*`` (worked out from the memory).
            remote_accessible: False keeps it out of the published descriptor
                and out of reach of peers.
            publish: re-publish the descriptor (metadata-server mode).

        Raises:
            InvalidArgument: zero length/address, or not memory of this process.
            AddressOverlapped: overlaps a registered buffer.
            DeviceUnavailable: device memory, but no device backend (names the fix:
                ``pip install 'pymooncake[cuda]'``).
            NotSupported: a ``musa:``/``hip:``/``npu:``/``maca:`` location.
            MetadataError: re-publishing failed (the registration is rolled back).
        """
        self._check_open()
        self._check_location(location)
        if isinstance(memory, DeviceSpan):
            nbytes = memory.nbytes if length is None else length
            region = self._region(memory.addr, nbytes, location, remote_accessible, memory)
        elif isinstance(memory, int):
            if length is None:
                raise InvalidArgument("registering a raw address needs a length")
            region = self._region(memory, length, location, remote_accessible, None)
        elif hasattr(memory, "data_ptr") and hasattr(memory, "nbytes"):
            addr, nbytes = int(memory.data_ptr()), int(memory.nbytes)
            region = self._region(
                addr, _within(nbytes, length), location, remote_accessible, memory
            )
        else:
            addr, nbytes = address_of(memory)
            nbytes = _within(nbytes, length)
            view = memoryview(memory).cast("B")[:nbytes]  # type: ignore[arg-type]
            region = Region(
                addr=addr,
                length=view.nbytes,
                location=_host_location(location),
                remote_accessible=remote_accessible,
                view=view,
                owner=memory,
            )
        return self._add_regions([region], publish)[0]

    def _check_location(self, location: str) -> None:
        """``cuda:N`` needs a device backend; other device kinds are not supported."""
        parsed = parse_location(location)
        if parsed is None:
            return
        if parsed[0] != "cuda":
            raise NotSupported(
                f"registering {location} memory is not supported: pymooncake reaches NVIDIA GPUs "
                "through CUDA only ('cuda:N'); register host memory"
            )
        self._devices.require(f"registering {location} memory")

    def _region(
        self, addr: int, length: int, location: str, remote_accessible: bool, owner: object
    ) -> Region:
        """A region over raw memory: host memory gets a view, device memory its backend."""
        _check_raw_range(addr, length)
        span = self._device_span(addr, length, location)
        if span is None:
            return Region(
                addr,
                length,
                _host_location(location),
                remote_accessible,
                view_at(addr, length),
                owner=owner,
            )
        return Region(
            addr,
            length,
            span.location,
            remote_accessible,
            DEVICE_VIEW,
            owner=owner,
            device=span.device,
            backend=span.backend,
        )

    def _device_span(self, addr: int, length: int, location: str = "*") -> DeviceSpan | None:
        """``[addr, addr + length)`` as device memory, or None for host memory.

        Raises:
            InvalidArgument: neither host memory nor device memory of this process.
            DeviceUnavailable: not host memory, no device backend to ask.
        """
        wants_device = parse_location(location) is not None
        if not wants_device and is_host_memory(addr, length):
            return None
        backend = self._devices.require(f"registering {location} memory") if wants_device else None
        backend = backend or self._devices.active()
        if backend is None:
            _require_host_memory(addr, length)  # raises, naming the fix
            return None  # pragma: no cover - it raised
        device = backend.pointer_device(addr)
        if device is None:
            if is_host_memory(addr, length):
                return None  # e.g. pinned host memory registered as cuda:N
            raise InvalidArgument(
                f"address range [{addr:#x}, +{length}) is neither host memory of this process "
                f"nor device memory known to {backend.describe()}: a stale or wrong pointer"
            )
        base, size = backend.allocation_range(addr)
        if addr + length > base + size:
            raise InvalidArgument(
                f"device range [{addr:#x}, +{length}) runs past the end of its allocation "
                f"[{base:#x}, +{size}) on cuda:{device}; check the length"
            )
        return DeviceSpan(backend, device, addr, length)

    def _add_regions(self, regions: list[Region], publish: bool) -> list[Region]:
        added: list[Region] = []
        try:
            for r in regions:
                added.append(self._registry.add(r))
            if publish:
                self._publish()
            else:
                self._registry_changed()
        except BaseException:
            for r in added:
                self._registry.remove(r.addr)
            raise
        return added

    def register_many(
        self, items: Sequence[tuple[int, int]], *, location: str = "*"
    ) -> list[Region]:
        """Register several ``(address, length)`` ranges, publishing once; all or nothing."""
        self._check_open()
        self._check_location(location)
        regions = [self._region(addr, length, location, True, None) for addr, length in items]
        return self._add_regions(regions, True)

    def unregister(self, memory: object, *, publish: bool = True) -> Region:
        """Unregister the buffer registered at this address (int) or object.

        Returns only when no transfer can touch the buffer any more: requests
        from peers that already started on it (TCP, same-host copies, local
        copies) finish -- or, past ``unregister_drain_s``, have their
        connections cut -- and no new one can start.

        Raises:
            AddressNotRegistered: nothing is registered there.
            MetadataError: re-publishing failed (the buffer is unregistered anyway).
        """
        self._check_open()
        addr = memory if isinstance(memory, int) else address_of(memory)[0]
        region = self._registry.remove(addr)
        try:
            if publish:
                self._publish()
            else:
                self._registry_changed()
        finally:
            self._quiesce([region])
        return region

    def unregister_many(self, addrs: Iterable[int]) -> None:
        """Unregister each address, publishing once; waits like :meth:`unregister`.

        Raises:
            AddressNotRegistered: for the first address that was not registered
                (the others are still unregistered).
        """
        self._check_open()
        first: MooncakeError | None = None
        removed: list[Region] = []
        for a in addrs:
            try:
                removed.append(self._registry.remove(a))
            except AddressNotRegistered as exc:
                first = first or exc
        try:
            self._publish()
        finally:
            self._quiesce(removed)
        if first is not None:
            raise first

    def allocate(self, length: int, *, publish: bool = True, populate: bool = False) -> Region:
        """Allocate and register ``length`` bytes of page-aligned memory we own.

        ``populate`` pre-faults the pages now instead of on first use.
        """
        self._check_open()
        if length <= 0:
            raise InvalidArgument(f"cannot allocate a managed buffer of {length} bytes")
        fd = -1
        if self.config.same_host_transport:
            try:  # shareable, so same-host peers copy straight into it
                mm, view, addr, fd = allocate_shared(length, populate)
            except (OSError, AttributeError):
                mm, view, addr = allocate_anonymous(length, populate)
        else:
            mm, view, addr = allocate_anonymous(length, populate)
        region = Region(addr, length, "cpu:0", True, view, owner=mm, managed=True, fd=fd)
        self._add_regions([region], publish)
        self._managed[addr] = region
        return region

    def free(self, addr: int) -> None:
        """Unregister and release a buffer from :meth:`allocate`.

        Raises:
            AddressNotRegistered: ``addr`` is not a managed buffer of this engine.
        """
        self._check_open()
        region = self._managed.pop(addr, None)
        if region is None:
            raise AddressNotRegistered(
                f"{addr:#x} is not the start of a managed buffer of this engine "
                "(free only what allocate_managed_buffer returned)"
            )
        current = self._registry.find(addr, 1)
        if current is region:
            self._registry.remove(addr)
            try:
                self._publish()
            finally:
                self._quiesce([region])  # nothing may copy into memory about to be unmapped
        _release(region)

    @property
    def registry(self) -> MemoryRegistry:
        return self._registry

    def local_span(
        self, local: object, length: int | None, *, writable: bool
    ) -> memoryview | DeviceSpan:
        """Local memory for a transfer: a byte view of host memory, or a
        :class:`DeviceSpan` of device memory.

        Ints are addresses: inside a registered region the region decides;
        otherwise (like the reference's TCP transport) the raw address is used
        directly -- the caller vouches that it stays valid -- after asking the
        kernel whether it is host memory and the device backend whether it is
        device memory.  CUDA tensors (``data_ptr()`` and ``nbytes``) and
        :class:`DeviceSpan` objects are device memory.

        Raises:
            InvalidArgument: a bad pointer, a read-only buffer for a READ, a length
                beyond the buffer.
            DeviceUnavailable: device memory without a device backend.
        """
        if isinstance(local, DeviceSpan):
            if length is None:
                return local
            if not 0 <= length <= local.nbytes:
                raise InvalidArgument(
                    f"length {length} exceeds the {local.nbytes}-byte device span"
                )
            return local[:length]
        if isinstance(local, int):
            if length is None:
                raise InvalidArgument("a raw local address needs a length")
            if length < 0:
                raise InvalidArgument(f"negative length {length}")
            if length == 0:
                return memoryview(bytearray(0))
            region = self._registry.find(local, length)
            if region is not None:
                if region.backend is not None:
                    return DeviceSpan(region.backend, region.device, local, length)
                return region.slice(local, length)
            if local <= 0:
                raise InvalidArgument(f"local address {local:#x} is not valid")
            span = self._device_span(local, length)
            return span if span is not None else view_at(local, length)
        try:
            view = memoryview(local)  # type: ignore[arg-type]
        except TypeError:
            if hasattr(local, "data_ptr") and hasattr(local, "nbytes"):
                n = int(local.nbytes)
                return self.local_span(
                    int(local.data_ptr()), n if length is None else length, writable=writable
                )
            raise InvalidArgument(
                f"local buffer of type {type(local).__name__} is neither an address nor a buffer"
            ) from None
        if writable and view.readonly:
            raise InvalidArgument("a READ needs a writable local buffer; got a read-only one")
        if not view.c_contiguous:
            raise InvalidArgument("local buffer must be C-contiguous")
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        if length is not None:
            if length < 0 or length > len(view):
                raise InvalidArgument(f"length {length} exceeds the {len(view)}-byte local buffer")
            view = view[:length]
        return view

    def local_view(self, local: object, length: int | None, *, writable: bool) -> memoryview:
        """Like :meth:`local_span`, for callers that need host bytes.

        Device memory read from (``writable=False``) is copied to a host buffer
        first (one extra copy; :meth:`local_span` avoids it).

        Raises:
            InvalidArgument: device memory to be written (use :meth:`local_span`), and
                the errors of :meth:`local_span`.
        """
        span = self.local_span(local, length, writable=writable)
        if not isinstance(span, DeviceSpan):
            return span
        if writable:
            raise InvalidArgument(
                f"[{span.addr:#x}, +{span.nbytes}) is device memory (cuda:{span.device}); "
                "host-view callers cannot write it: use local_span()"
            )
        staged = bytearray(span.nbytes)
        view = memoryview(staged)
        span.backend.copy(buffer_address(view), span.addr, span.nbytes)
        return view

    def device_span(self, addr: int, length: int) -> DeviceSpan:
        """``[addr, addr + length)`` of device memory as a :class:`DeviceSpan`.

        Raises:
            InvalidArgument: it is host memory or no memory at all.
            DeviceUnavailable: no device backend.
        """
        _check_raw_range(addr, length)
        span = self._device_span(addr, length, "cuda")
        if span is None:
            raise InvalidArgument(f"[{addr:#x}, +{length}) is host memory, not device memory")
        return span


def _host_location(location: str) -> str:
    return location if location.startswith("cpu") else "cpu:0"


def _within(nbytes: int, length: int | None) -> int:
    if length is None:
        length = nbytes
    if not 0 < length <= nbytes:
        raise InvalidArgument(
            f"length {length} exceeds the {nbytes}-byte buffer (or is not positive)"
            if nbytes
            else "cannot register an empty buffer"
        )
    return length


def _check_raw_range(addr: int, length: int) -> None:
    """A raw ``(address, length)`` to register: positive and inside 64 bits."""
    if length <= 0 or addr <= 0:
        raise InvalidArgument(
            f"cannot register {length} bytes at {addr:#x}: address and length must be positive"
        )


def _require_host_memory(addr: int, length: int) -> None:
    if not is_host_memory(addr, length):
        raise InvalidArgument(
            f"address range [{addr:#x}, +{length}) is not readable host memory of this process: "
            f"a stale or wrong pointer, or GPU (device) memory. {INSTALL_HINT}"
        )


def _release(region: Region) -> None:
    """Unmap a managed buffer; if an in-flight transfer still holds a view, the
    mapping goes when that view is released."""
    region.view.release()
    close = getattr(region.owner, "close", None)
    if close is not None:
        try:
            close()
        except BufferError:
            pass
    if region.fd >= 0:
        os.close(region.fd)
