"""The device-memory interface: what the engine needs from a GPU, and nothing more.

Theory of operation
-------------------
Device (GPU) memory is never touched by the CPU: the engine only ever names it
by address and asks a :class:`DeviceBackend` to move bytes.  The interface is
deliberately small:

* *where is this pointer* -- :meth:`DeviceBackend.pointer_device` (a device
  ordinal, or None for host memory) and :meth:`DeviceBackend.allocation_range`;
* *copies* -- :meth:`DeviceBackend.copy` (synchronous, any direction: the
  address space is unified) and, on a :class:`DeviceStream`, asynchronous
  copies between device memory and *pinned* host memory, ordered by
  :class:`DeviceEvent` records;
* *sharing* -- IPC handles (:meth:`DeviceBackend.ipc_export` /
  :meth:`~DeviceBackend.ipc_open` / :meth:`~DeviceBackend.ipc_close`) for
  same-host peers;
* *pinning* -- :meth:`DeviceBackend.host_register` page-locks host memory
  (the staging buffers, memfd mappings) so that asynchronous copies overlap
  with socket I/O;
* *allocation* -- :meth:`DeviceBackend.alloc` / :meth:`~DeviceBackend.free`,
  for tests and benchmarks (applications bring their own device memory).

Two implementations: ``cuda`` (the CUDA driver API through ``cuda-python``,
``cuda.py``) and ``fake`` (``fake.py``), which keeps "device" memory where
neither ``/proc/self/mem`` nor a memoryview can reach it, so that CPU-only
tests run every path a GPU run takes and fail loudly where one forgets to go
through this interface.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar, Final

from ...errors import InvalidArgument

__all__ = [
    "IPC_HANDLE_BYTES",
    "DeviceBackend",
    "DeviceEvent",
    "DeviceSpan",
    "DeviceStream",
    "IpcHandle",
    "parse_location",
]

#: sizeof(CUipcMemHandle): the opaque bytes a same-host peer needs to map an allocation
IPC_HANDLE_BYTES: Final = 64
#: location prefixes of device memory the reference knows (``GPU_PREFIX`` per vendor)
_DEVICE_PREFIXES: Final = ("cuda", "musa", "hip", "npu", "maca")


def parse_location(location: str) -> tuple[str, int] | None:
    """``"cuda:3"`` -> ``("cuda", 3)``; None for host locations (``cpu:N``, ``*``).

    Raises:
        InvalidArgument: a device prefix with a malformed ordinal (``cuda:x``).
    """
    kind, sep, ordinal = location.partition(":")
    if kind not in _DEVICE_PREFIXES:
        return None
    if not sep:
        return kind, 0
    try:
        n = int(ordinal)
    except ValueError:
        raise InvalidArgument(
            f"location {location!r} has no device ordinal; write it as '{kind}:N'"
        ) from None
    if n < 0:
        raise InvalidArgument(f"location {location!r}: the device ordinal must be >= 0")
    return kind, n


@dataclass(frozen=True, slots=True)
class DeviceSpan:
    """``nbytes`` of device memory at ``addr`` on device ``device`` of ``backend``.

    Stands where a memoryview stands for host memory (it has ``len`` and
    slicing), but exports no buffer: ``memoryview(span)`` raises, so host code
    cannot read device memory by accident.
    """

    backend: DeviceBackend = field(repr=False, compare=False)
    device: int
    addr: int
    nbytes: int

    def __len__(self) -> int:
        return self.nbytes

    def __getitem__(self, key: slice) -> DeviceSpan:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("device spans support contiguous slices only")
        start, stop, _ = key.indices(self.nbytes)
        stop = max(start, stop)
        return DeviceSpan(self.backend, self.device, self.addr + start, stop - start)

    def data_ptr(self) -> int:
        return self.addr

    @property
    def location(self) -> str:
        return f"cuda:{self.device}"


@dataclass(frozen=True, slots=True)
class IpcHandle:
    """What a same-host peer needs to map an exported allocation.

    ``handle`` is opaque (64 bytes); ``base``/``size`` are the allocation's range
    in the exporter's address space (a registered buffer may start inside it).
    """

    handle: bytes
    base: int
    size: int
    device: int


class DeviceEvent(abc.ABC):
    """A point in a stream's work; :meth:`wait` returns once everything before it ran."""

    @abc.abstractmethod
    def wait(self) -> None:
        """Block (without the GIL) until the work recorded before this event completed.

        Raises:
            DeviceError: a copy before the event failed.
        """

    @abc.abstractmethod
    def query(self) -> bool:
        """True when the recorded work completed (never blocks)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the event; idempotent."""


class DeviceStream(abc.ABC):
    """An ordered queue of asynchronous copies on one device."""

    device: int

    @abc.abstractmethod
    def copy_async(self, dst: int, src: int, n: int) -> None:
        """Queue a copy of ``n`` bytes between device memory and *pinned* host memory.

        Returns at once; the bytes are there only after an event recorded later
        was waited for.  The host side must stay untouched until then.

        Raises:
            DeviceError: the copy cannot be queued (bad address, unpinned host memory).
        """

    @abc.abstractmethod
    def record(self, event: DeviceEvent) -> None:
        """Mark the current end of the queue in ``event`` (re-recording moves it)."""

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Wait for everything queued so far."""

    @abc.abstractmethod
    def close(self) -> None:
        """Wait for queued work, then release the stream; idempotent."""


class DeviceBackend(abc.ABC):
    """One way of reaching device memory; one instance serves the whole process."""

    #: registry name ("cuda", "fake")
    name: ClassVar[str]
    #: True when it drives real hardware (benchmarks report only real numbers)
    real: ClassVar[bool]

    @abc.abstractmethod
    def describe(self) -> str:
        """One line naming the devices and library versions (for logs and reports)."""

    @abc.abstractmethod
    def device_count(self) -> int: ...

    @abc.abstractmethod
    def pointer_device(self, addr: int) -> int | None:
        """The device ordinal holding ``addr``, or None when it is not device memory."""

    @abc.abstractmethod
    def allocation_range(self, addr: int) -> tuple[int, int]:
        """``(base, size)`` of the device allocation containing ``addr``.

        Raises:
            DeviceError: ``addr`` is not device memory.
        """

    @abc.abstractmethod
    def copy(self, dst: int, src: int, n: int) -> None:
        """Copy ``n`` bytes, each side host or device memory; returns when done.

        Raises:
            DeviceError: an address is not valid memory, or the copy failed.
        """

    @abc.abstractmethod
    def stream(self, device: int) -> DeviceStream:
        """A new stream on ``device`` (close it when done)."""

    @abc.abstractmethod
    def event(self, device: int) -> DeviceEvent:
        """A new event for streams of ``device`` (close it when done)."""

    @abc.abstractmethod
    def host_register(self, addr: int, n: int) -> None:
        """Page-lock host memory for asynchronous copies (any device).

        Raises:
            DeviceError: the driver refused (already registered, limits).
        """

    @abc.abstractmethod
    def host_unregister(self, addr: int) -> None:
        """Undo :meth:`host_register` of the range starting at ``addr``."""

    @abc.abstractmethod
    def ipc_export(self, addr: int) -> IpcHandle:
        """An IPC handle of the allocation containing ``addr``.

        Raises:
            DeviceError: the memory cannot be shared this way (e.g. VMM or pool
                allocations); peers then use the staging path.
        """

    @abc.abstractmethod
    def ipc_open(self, handle: bytes, device: int) -> int:
        """Map a peer's exported allocation here; returns its base address.

        Opening a handle that is already open returns the same address and
        counts one more user.

        Raises:
            DeviceError: the handle cannot be opened (exporter gone, same process,
                no peer access between the devices).
        """

    @abc.abstractmethod
    def ipc_close(self, base: int) -> None:
        """Drop one user of an address from :meth:`ipc_open`; unmaps after the last."""

    @abc.abstractmethod
    def alloc(self, n: int, device: int = 0) -> int:
        """Allocate ``n`` bytes of device memory (for tests and benchmarks)."""

    @abc.abstractmethod
    def free(self, addr: int) -> None:
        """Free memory from :meth:`alloc`."""
