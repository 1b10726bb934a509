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
    MemoryRegistry,
    Region,
    address_of,
    allocate_anonymous,
    allocate_shared,
    is_host_memory,
    view_at,
)

__all__ = ["MemoryOps"]


class MemoryOps:
    """Registration and managed buffers (mixin; see TransferEngine)."""

    config: EngineConfig
    _registry: MemoryRegistry
    _managed: dict[int, Region]

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
                (bytearray, mmap, numpy array, memoryview; a CPU torch tensor).
            location: ``cpu:N``, ``cuda:N`` or ``*`` (resolved to ``cpu:0``).
            remote_accessible: False keeps it out of the published descriptor
                and out of reach of peers.
            publish: re-publish the descriptor (metadata-server mode).

        Raises:
            InvalidArgument: zero length/address.
            AddressOverlapped: overlaps a registered buffer.
            NotSupported: a ``cuda:`` location (GPU memory is not supported yet).
            MetadataError: re-publishing failed (the registration is rolled back).
        """
        self._check_open()
        _check_location(location)
        if isinstance(memory, int):
            if length is None:
                raise InvalidArgument("registering a raw address needs a length")
            _check_raw_range(memory, length)
            addr, view, owner = memory, view_at(memory, length), None
        else:
            addr, nbytes = address_of(memory)
            if length is not None:
                if not 0 < length <= nbytes:
                    raise InvalidArgument(
                        f"length {length} exceeds the {nbytes}-byte buffer (or is not positive)"
                    )
                nbytes = length
            if nbytes == 0:
                raise InvalidArgument("cannot register an empty buffer")
            view = (
                memoryview(memory).cast("B")[:nbytes]  # type: ignore[arg-type]
                if not hasattr(memory, "data_ptr")
                else view_at(addr, nbytes)
            )
            owner = memory
        region = Region(
            addr=addr,
            length=view.nbytes,
            location="cpu:0" if location == "*" else location,
            remote_accessible=remote_accessible,
            view=view,
            owner=owner,
        )
        return self._add_regions([region], publish)[0]

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
        regions = []
        _check_location(location)
        for addr, length in items:
            _check_raw_range(addr, length)
            regions.append(
                Region(
                    addr,
                    length,
                    "cpu:0" if location == "*" else location,
                    True,
                    view_at(addr, length),
                )
            )
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

    def local_view(self, local: object, length: int | None, *, writable: bool) -> memoryview:
        """A byte view of local memory for a transfer.

        Ints are addresses: inside a registered region the region's view is used,
        otherwise (like the reference's TCP transport) the raw address is viewed
        directly -- the caller vouches that it is mapped.
        """
        if isinstance(local, int):
            if length is None:
                raise InvalidArgument("a raw local address needs a length")
            if length < 0:
                raise InvalidArgument(f"negative length {length}")
            if length == 0:
                return memoryview(bytearray(0))
            region = self._registry.find(local, length)
            if region is not None:
                return region.slice(local, length)
            if local <= 0:
                raise InvalidArgument(f"local address {local:#x} is not valid")
            _require_host_memory(local, length)  # a bad pointer: an error, not a crash
            return view_at(local, length)
        try:
            view = memoryview(local)  # type: ignore[arg-type]
        except TypeError:
            if hasattr(local, "data_ptr") and hasattr(local, "nbytes"):
                n = int(local.nbytes)
                return self.local_view(
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


def _check_location(location: str) -> None:
    if location.startswith(("cuda", "musa", "hip", "npu", "maca")):
        raise NotSupported(
            f"registering {location} memory needs GPU support, which this pymooncake "
            "build does not have; register host memory"
        )


def _check_raw_range(addr: int, length: int) -> None:
    """A raw ``(address, length)`` to register: positive, and this process's host memory."""
    if length <= 0 or addr <= 0:
        raise InvalidArgument(
            f"cannot register {length} bytes at {addr:#x}: address and length must be positive"
        )
    _require_host_memory(addr, length)


def _require_host_memory(addr: int, length: int) -> None:
    if not is_host_memory(addr, length):
        raise InvalidArgument(
            f"address range [{addr:#x}, +{length}) is not readable host memory of this process: "
            "a stale or wrong pointer, or GPU (device) memory. GPU buffers need CUDA support, "
            "which this pymooncake build does not have; register host memory instead"
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
