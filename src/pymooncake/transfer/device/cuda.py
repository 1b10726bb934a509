"""CUDA device backend: the CUDA driver API through ``cuda-python`` (no compiler).

Imported only when selected (``pymooncake[cuda]``).  Works with the current
layout, ``cuda.bindings.driver`` (cuda-bindings 12.6 and later, including the
13.x series), and with the older ``cuda.cuda`` module.  Every driver function
returns a tuple whose first item is a ``CUresult``; :func:`_call` turns a
failure into a :class:`DeviceError` naming the function and the error.  From
cuda-bindings 12.9.1 on the bindings release the GIL around driver calls, so
copies and waits overlap with the engine's socket threads.

Contexts: the engine uses each device's *primary* context (the one PyTorch and
the CUDA runtime use), retained once and made current per thread before a
call that needs it.  Pointers are in the unified address space, so one
``cuMemcpy``/``cuMemcpyAsync`` serves every direction.
"""

from __future__ import annotations

import ctypes
import importlib
import threading
from typing import Any, ClassVar

from ...errors import DeviceError, DeviceUnavailable
from ._interface import IPC_HANDLE_BYTES, DeviceBackend, DeviceEvent, DeviceStream, IpcHandle

__all__ = ["CudaDevice", "load_driver"]


def load_driver() -> Any:
    """The driver-API module of cuda-python.

    Raises:
        DeviceUnavailable: cuda-python is not installed.
    """
    for name in ("cuda.bindings.driver", "cuda.cuda"):  # cuda-bindings >= 12.6; older cuda-python
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise DeviceUnavailable(
        "GPU memory needs cuda-python, which is not installed: pip install "
        "'pymooncake[cuda]' (on a CUDA 12 driver add 'cuda-python<13')"
    )


def bindings_version() -> str:
    try:
        return str(getattr(importlib.import_module("cuda.bindings"), "__version__", "?"))
    except ImportError:
        return "?"


class _Current:
    __slots__ = ("_ctx", "_owner")

    def __init__(self, owner: CudaDevice, ctx: Any) -> None:
        self._owner = owner
        self._ctx = ctx

    def __enter__(self) -> None:
        self._owner._call("cuCtxPushCurrent", self._owner._d.cuCtxPushCurrent(self._ctx))

    def __exit__(self, *exc: object) -> None:
        self._owner._d.cuCtxPopCurrent()


class _CudaEvent(DeviceEvent):
    def __init__(self, owner: CudaDevice, device: int) -> None:
        self._owner = owner
        self.device = device
        d = owner._d
        with owner._on(device):
            self._event: Any = owner._call(
                "cuEventCreate", d.cuEventCreate(int(d.CUevent_flags.CU_EVENT_DISABLE_TIMING))
            )

    def wait(self) -> None:
        # an event needs no current context: waiting leaves the caller's alone
        self._owner._call("cuEventSynchronize", self._owner._d.cuEventSynchronize(self._event))

    def query(self) -> bool:
        d = self._owner._d
        err = d.cuEventQuery(self._event)[0]
        if err == d.CUresult.CUDA_SUCCESS:
            return True
        if err == d.CUresult.CUDA_ERROR_NOT_READY:
            return False
        self._owner._call("cuEventQuery", (err,))
        return False  # pragma: no cover - _call raised

    def close(self) -> None:
        if self._event is not None:
            self._owner._d.cuEventDestroy(self._event)
            self._event = None


class _CudaStream(DeviceStream):
    def __init__(self, owner: CudaDevice, device: int) -> None:
        self._owner = owner
        self.device = device
        d = owner._d
        with owner._on(device):
            self._stream: Any = owner._call(
                "cuStreamCreate", d.cuStreamCreate(int(d.CUstream_flags.CU_STREAM_NON_BLOCKING))
            )

    def copy_async(self, dst: int, src: int, n: int) -> None:
        owner = self._owner
        with owner._on(self.device):
            owner._call("cuMemcpyAsync", owner._d.cuMemcpyAsync(dst, src, n, self._stream))

    def record(self, event: DeviceEvent) -> None:
        if not isinstance(event, _CudaEvent):
            raise DeviceError("event of another backend recorded on a CUDA stream")
        with self._owner._on(self.device):
            self._owner._call(
                "cuEventRecord", self._owner._d.cuEventRecord(event._event, self._stream)
            )

    def synchronize(self) -> None:
        self._owner._call("cuStreamSynchronize", self._owner._d.cuStreamSynchronize(self._stream))

    def close(self) -> None:
        if self._stream is not None:
            try:
                self.synchronize()
            finally:
                self._owner._d.cuStreamDestroy(self._stream)
                self._stream = None


class CudaDevice(DeviceBackend):
    """All CUDA devices of this process, through the driver API.

    Raises (on construction):
        DeviceUnavailable: cuda-python missing, no driver, or no device.
    """

    name: ClassVar[str] = "cuda"
    real: ClassVar[bool] = True

    def __init__(self, driver: Any | None = None) -> None:
        self._d = d = driver if driver is not None else load_driver()
        try:
            err = d.cuInit(0)[0]
        except Exception as exc:  # cuda-bindings raises when libcuda.so is missing
            raise DeviceUnavailable(
                f"the CUDA driver cannot be loaded ({exc}); install the NVIDIA driver or run "
                "on a GPU machine"
            ) from exc
        if err != d.CUresult.CUDA_SUCCESS:
            raise DeviceUnavailable(
                f"cuInit failed: {self._error_name(err)} (no usable GPU, or a driver older than "
                "the cuda-python major version: on a CUDA 12 driver install 'cuda-python<13')"
            )
        self._count = int(self._call("cuDeviceGetCount", d.cuDeviceGetCount()))
        if self._count <= 0:
            raise DeviceUnavailable("the CUDA driver reports no device")
        self._lock = threading.Lock()
        self._contexts: dict[int, Any] = {}
        self._ipc_lock = threading.Lock()
        self._opened: dict[bytes, list[int]] = {}  # handle -> [base, users]
        self._opened_by_base: dict[int, bytes] = {}
        self._memtype_device = int(d.CUmemorytype.CU_MEMORYTYPE_DEVICE)

    # --- plumbing -----------------------------------------------------------------

    def _error_name(self, err: Any) -> str:
        try:
            res = self._d.cuGetErrorName(err)
            name = res[1]
            return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:
            return str(err)

    def _call(self, what: str, res: Any) -> Any:
        """Check a driver call's result tuple; returns its value (or values)."""
        err = res[0]
        if err != self._d.CUresult.CUDA_SUCCESS:
            raise DeviceError(f"{what} failed: {self._error_name(err)}")
        if len(res) == 1:
            return None
        return res[1] if len(res) == 2 else res[1:]

    def _context(self, device: int) -> Any:
        """``device``'s primary context, retained once."""
        ctx = self._contexts.get(device)
        if ctx is not None:
            return ctx
        if not 0 <= device < self._count:
            raise DeviceError(f"cuda:{device} does not exist ({self._count} device(s))")
        with self._lock:
            ctx = self._contexts.get(device)
            if ctx is None:
                dev = self._call("cuDeviceGet", self._d.cuDeviceGet(device))
                ctx = self._call("cuDevicePrimaryCtxRetain", self._d.cuDevicePrimaryCtxRetain(dev))
                self._contexts[device] = ctx
        return ctx

    def _on(self, device: int) -> _Current:
        """``with self._on(n):`` runs with ``cuda:n``'s primary context current and
        restores the caller's (an application thread keeps its own device)."""
        return _Current(self, self._context(device))

    # --- queries -------------------------------------------------------------------

    def describe(self) -> str:
        d = self._d
        names = []
        for i in range(self._count):
            try:
                dev = self._call("cuDeviceGet", d.cuDeviceGet(i))
                raw = self._call("cuDeviceGetName", d.cuDeviceGetName(256, dev))
                names.append(bytes(raw).split(b"\0", 1)[0].decode(errors="replace"))
            except DeviceError:
                names.append("?")
        try:
            v = int(self._call("cuDriverGetVersion", d.cuDriverGetVersion()))
            driver = f"{v // 1000}.{v % 1000 // 10}"
        except DeviceError:
            driver = "?"
        return f"{', '.join(names)} (CUDA driver {driver}, cuda-bindings {bindings_version()})"

    def device_count(self) -> int:
        return self._count

    def pointer_device(self, addr: int) -> int | None:
        if addr <= 0:
            return None
        d = self._d
        attr = d.CUpointer_attribute
        with self._on(0):
            res = d.cuPointerGetAttribute(attr.CU_POINTER_ATTRIBUTE_MEMORY_TYPE, addr)
            if res[0] != d.CUresult.CUDA_SUCCESS or int(res[1]) != self._memtype_device:
                return None  # unknown to CUDA (plain host memory) or pinned host memory
            managed = d.cuPointerGetAttribute(attr.CU_POINTER_ATTRIBUTE_IS_MANAGED, addr)
            if managed[0] == d.CUresult.CUDA_SUCCESS and bool(managed[1]):
                return None  # managed memory is reachable from the CPU: a host buffer to us
            ordinal = self._call(
                "cuPointerGetAttribute(DEVICE_ORDINAL)",
                d.cuPointerGetAttribute(attr.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, addr),
            )
        return int(ordinal)

    def allocation_range(self, addr: int) -> tuple[int, int]:
        with self._on(0):
            base, size = self._call("cuMemGetAddressRange", self._d.cuMemGetAddressRange(addr))
        return int(base), int(size)

    # --- copies --------------------------------------------------------------------

    def copy(self, dst: int, src: int, n: int) -> None:
        if n <= 0:
            return
        with self._on(0):  # unified addressing: any context reaches every device
            self._call("cuMemcpy", self._d.cuMemcpy(dst, src, n))

    def stream(self, device: int) -> DeviceStream:
        return _CudaStream(self, device)

    def event(self, device: int) -> DeviceEvent:
        return _CudaEvent(self, device)

    # --- pinning -------------------------------------------------------------------

    def host_register(self, addr: int, n: int) -> None:
        flags = int(self._d.CU_MEMHOSTREGISTER_PORTABLE)  # pinned for every context
        with self._on(0):
            self._call("cuMemHostRegister", self._d.cuMemHostRegister(addr, n, flags))

    def host_unregister(self, addr: int) -> None:
        with self._on(0):
            self._call("cuMemHostUnregister", self._d.cuMemHostUnregister(addr))

    # --- IPC -----------------------------------------------------------------------

    def ipc_export(self, addr: int) -> IpcHandle:
        device = self.pointer_device(addr)
        if device is None:
            raise DeviceError(f"{addr:#x} is not CUDA device memory; it has no IPC handle")
        base, size = self.allocation_range(addr)
        with self._on(device):
            handle = self._call("cuIpcGetMemHandle", self._d.cuIpcGetMemHandle(base))
        raw = ctypes.string_at(handle.getPtr(), IPC_HANDLE_BYTES)
        return IpcHandle(raw, base, size, device)

    def ipc_open(self, handle: bytes, device: int) -> int:
        if len(handle) != IPC_HANDLE_BYTES:
            raise DeviceError(f"an IPC handle has {IPC_HANDLE_BYTES} bytes, got {len(handle)}")
        d = self._d
        # one mapping per handle and process: the driver refuses a second open
        with self._ipc_lock:
            entry = self._opened.get(handle)
            if entry is not None:
                entry[1] += 1
                return entry[0]
            h = d.CUipcMemHandle()
            ctypes.memmove(h.getPtr(), handle, IPC_HANDLE_BYTES)
            flags = int(d.CUipcMem_flags.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
            with self._on(device if 0 <= device < self._count else 0):
                base = int(self._call("cuIpcOpenMemHandle", d.cuIpcOpenMemHandle(h, flags)))
            self._opened[handle] = [base, 1]
            self._opened_by_base[base] = handle
        return base

    def ipc_close(self, base: int) -> None:
        with self._ipc_lock:
            handle = self._opened_by_base.get(base)
            if handle is None:
                raise DeviceError(f"{base:#x} is not an address returned by ipc_open")
            entry = self._opened[handle]
            entry[1] -= 1
            if entry[1]:
                return
            del self._opened[handle]
            del self._opened_by_base[base]
            with self._on(0):
                self._call("cuIpcCloseMemHandle", self._d.cuIpcCloseMemHandle(base))

    # --- allocation ----------------------------------------------------------------

    def alloc(self, n: int, device: int = 0) -> int:
        with self._on(device):
            return int(self._call("cuMemAlloc", self._d.cuMemAlloc(n)))

    def free(self, addr: int) -> None:
        device = self.pointer_device(addr)
        with self._on(device if device is not None else 0):
            self._call("cuMemFree", self._d.cuMemFree(addr))
