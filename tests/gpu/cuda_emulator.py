"""A stand-in for ``cuda.bindings.driver`` over the fake device, for CPU-only runs
of the CUDA backend (``pymooncake.transfer.device.cuda``).

It follows cuda-python's calling conventions as documented (checked against
cuda-bindings 13.4 docstrings): every function returns a tuple whose first item
is a ``CUresult`` member, then the outputs; device pointers are ints; streams,
events, contexts and IPC handles are opaque objects (``CUipcMemHandle`` exposes
``getPtr()``).  It also enforces the driver's context rule -- calls that need a
current context fail with ``CUDA_ERROR_INVALID_CONTEXT`` without one -- and
tracks the per-thread context stack, so a backend that forgets to push a
context, or leaves one pushed, is caught.
"""

from __future__ import annotations

import ctypes
import enum
import threading
from typing import Any

from pymooncake.errors import DeviceError
from pymooncake.transfer.device import DeviceEvent, DeviceStream
from pymooncake.transfer.device.fake import FakeDevice


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_NOT_INITIALIZED = 3
    CUDA_ERROR_INVALID_CONTEXT = 201
    CUDA_ERROR_INVALID_HANDLE = 400
    CUDA_ERROR_NOT_READY = 600


class CUpointer_attribute(enum.IntEnum):
    CU_POINTER_ATTRIBUTE_MEMORY_TYPE = 2
    CU_POINTER_ATTRIBUTE_IS_MANAGED = 8
    CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9


class CUmemorytype(enum.IntEnum):
    CU_MEMORYTYPE_HOST = 1
    CU_MEMORYTYPE_DEVICE = 2


class CUstream_flags(enum.IntEnum):
    CU_STREAM_NON_BLOCKING = 1


class CUevent_flags(enum.IntEnum):
    CU_EVENT_DISABLE_TIMING = 2


class CUipcMem_flags(enum.IntEnum):
    CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1


CU_MEMHOSTREGISTER_PORTABLE = 1


class CUipcMemHandle:
    def __init__(self) -> None:
        self._raw = ctypes.create_string_buffer(64)

    def getPtr(self) -> int:
        return ctypes.addressof(self._raw)


class _Opaque:
    def __init__(self, inner: Any, device: int) -> None:
        self.inner = inner
        self.device = device


OK = (CUresult.CUDA_SUCCESS,)


class EmulatedDriver:
    """The subset of the driver API that the CUDA backend calls."""

    CUresult = CUresult
    CUpointer_attribute = CUpointer_attribute
    CUmemorytype = CUmemorytype
    CUstream_flags = CUstream_flags
    CUevent_flags = CUevent_flags
    CUipcMem_flags = CUipcMem_flags
    CUipcMemHandle = CUipcMemHandle
    CU_MEMHOSTREGISTER_PORTABLE = CU_MEMHOSTREGISTER_PORTABLE

    def __init__(self, fake: FakeDevice | None = None) -> None:
        self.fake = fake or FakeDevice()
        self._init = False
        self._tls = threading.local()
        self.calls: dict[str, int] = {}

    # --- helpers -----------------------------------------------------------------

    def _stack(self) -> list[_Opaque]:
        st = getattr(self._tls, "stack", None)
        if st is None:
            st = self._tls.stack = []
        return st

    def context_depth(self) -> int:
        return len(self._stack())

    def _need(self, name: str) -> CUresult | None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if not self._init:
            return CUresult.CUDA_ERROR_NOT_INITIALIZED
        if not self._stack():
            return CUresult.CUDA_ERROR_INVALID_CONTEXT
        return None

    def _run(self, name: str, fn: Any, *args: Any) -> tuple[Any, ...]:
        err = self._need(name)
        if err is not None:
            return (err,)
        try:
            out = fn(*args)
        except DeviceError:
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        return OK if out is None else (CUresult.CUDA_SUCCESS, *out)

    # --- initialisation, devices, contexts ------------------------------------------------

    def cuInit(self, flags: int) -> tuple[Any, ...]:
        self._init = True
        return OK

    def cuGetErrorName(self, err: Any) -> tuple[Any, ...]:
        return (CUresult.CUDA_SUCCESS, CUresult(int(err)).name.encode())

    def cuDriverGetVersion(self) -> tuple[Any, ...]:
        return (CUresult.CUDA_SUCCESS, 12040)

    def cuDeviceGetCount(self) -> tuple[Any, ...]:
        return (CUresult.CUDA_SUCCESS, self.fake.device_count())

    def cuDeviceGet(self, ordinal: int) -> tuple[Any, ...]:
        if not 0 <= ordinal < self.fake.device_count():
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        return (CUresult.CUDA_SUCCESS, ("dev", ordinal))

    def cuDeviceGetName(self, length: int, dev: Any) -> tuple[Any, ...]:
        return (CUresult.CUDA_SUCCESS, b"Emulated GPU".ljust(length, b"\0"))

    def cuDevicePrimaryCtxRetain(self, dev: Any) -> tuple[Any, ...]:
        return (CUresult.CUDA_SUCCESS, _Opaque("ctx", dev[1]))

    def cuCtxPushCurrent(self, ctx: Any) -> tuple[Any, ...]:
        if not isinstance(ctx, _Opaque):
            return (CUresult.CUDA_ERROR_INVALID_CONTEXT,)
        self._stack().append(ctx)
        return OK

    def cuCtxPopCurrent(self) -> tuple[Any, ...]:
        st = self._stack()
        if not st:
            return (CUresult.CUDA_ERROR_INVALID_CONTEXT,)
        return (CUresult.CUDA_SUCCESS, st.pop())

    # --- pointers and copies ---------------------------------------------------------

    def cuPointerGetAttribute(self, attr: Any, ptr: int) -> tuple[Any, ...]:
        err = self._need("cuPointerGetAttribute")
        if err is not None:
            return (err,)
        dev = self.fake.pointer_device(int(ptr))
        if dev is None:
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        if attr == CUpointer_attribute.CU_POINTER_ATTRIBUTE_MEMORY_TYPE:
            return (CUresult.CUDA_SUCCESS, CUmemorytype.CU_MEMORYTYPE_DEVICE)
        if attr == CUpointer_attribute.CU_POINTER_ATTRIBUTE_IS_MANAGED:
            return (CUresult.CUDA_SUCCESS, False)
        return (CUresult.CUDA_SUCCESS, dev)

    def cuMemGetAddressRange(self, ptr: int) -> tuple[Any, ...]:
        return self._run("cuMemGetAddressRange", self.fake.allocation_range, int(ptr))

    def cuMemcpy(self, dst: int, src: int, n: int) -> tuple[Any, ...]:
        return self._run("cuMemcpy", self.fake.copy, int(dst), int(src), int(n))

    def cuMemAlloc(self, n: int) -> tuple[Any, ...]:
        err = self._need("cuMemAlloc")
        if err is not None:
            return (err,)
        return (CUresult.CUDA_SUCCESS, self.fake.alloc(n, self._stack()[-1].device))

    def cuMemFree(self, ptr: int) -> tuple[Any, ...]:
        return self._run("cuMemFree", self.fake.free, int(ptr))

    def cuMemHostRegister(self, p: int, n: int, flags: int) -> tuple[Any, ...]:
        return self._run("cuMemHostRegister", self.fake.host_register, int(p), int(n))

    def cuMemHostUnregister(self, p: int) -> tuple[Any, ...]:
        return self._run("cuMemHostUnregister", self.fake.host_unregister, int(p))

    # --- streams and events --------------------------------------------------------

    def cuStreamCreate(self, flags: int) -> tuple[Any, ...]:
        err = self._need("cuStreamCreate")
        if err is not None:
            return (err,)
        dev = self._stack()[-1].device
        return (CUresult.CUDA_SUCCESS, _Opaque(self.fake.stream(dev), dev))

    def cuStreamDestroy(self, stream: _Opaque) -> tuple[Any, ...]:
        inner: DeviceStream = stream.inner
        inner.close()
        return OK

    def cuStreamSynchronize(self, stream: _Opaque) -> tuple[Any, ...]:
        inner: DeviceStream = stream.inner
        inner.synchronize()
        return OK

    def cuMemcpyAsync(self, dst: int, src: int, n: int, stream: _Opaque) -> tuple[Any, ...]:
        err = self._need("cuMemcpyAsync")
        if err is not None:
            return (err,)
        if self._stack()[-1].device != stream.device:
            return (CUresult.CUDA_ERROR_INVALID_HANDLE,)  # stream of another context
        inner: DeviceStream = stream.inner
        try:
            inner.copy_async(int(dst), int(src), int(n))
        except DeviceError:
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        return OK

    def cuEventCreate(self, flags: int) -> tuple[Any, ...]:
        err = self._need("cuEventCreate")
        if err is not None:
            return (err,)
        dev = self._stack()[-1].device
        return (CUresult.CUDA_SUCCESS, _Opaque(self.fake.event(dev), dev))

    def cuEventRecord(self, event: _Opaque, stream: _Opaque) -> tuple[Any, ...]:
        err = self._need("cuEventRecord")
        if err is not None:
            return (err,)
        inner: DeviceStream = stream.inner
        inner.record(event.inner)
        return OK

    def cuEventSynchronize(self, event: _Opaque) -> tuple[Any, ...]:
        inner: DeviceEvent = event.inner
        inner.wait()
        return OK

    def cuEventQuery(self, event: _Opaque) -> tuple[Any, ...]:
        inner: DeviceEvent = event.inner
        return OK if inner.query() else (CUresult.CUDA_ERROR_NOT_READY,)

    def cuEventDestroy(self, event: _Opaque) -> tuple[Any, ...]:
        inner: DeviceEvent = event.inner
        inner.close()
        return OK

    # --- IPC -------------------------------------------------------------------------

    def cuIpcGetMemHandle(self, ptr: int) -> tuple[Any, ...]:
        err = self._need("cuIpcGetMemHandle")
        if err is not None:
            return (err,)
        try:
            h = self.fake.ipc_export(int(ptr))
        except DeviceError:
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        out = CUipcMemHandle()
        ctypes.memmove(out.getPtr(), h.handle, 64)
        return (CUresult.CUDA_SUCCESS, out)

    def cuIpcOpenMemHandle(self, handle: CUipcMemHandle, flags: int) -> tuple[Any, ...]:
        raw = ctypes.string_at(handle.getPtr(), 64)
        return self._run(
            "cuIpcOpenMemHandle", lambda: (self.fake.ipc_open(raw, self._stack()[-1].device),)
        )

    def cuIpcCloseMemHandle(self, ptr: int) -> tuple[Any, ...]:
        return self._run("cuIpcCloseMemHandle", self.fake.ipc_close, int(ptr))
