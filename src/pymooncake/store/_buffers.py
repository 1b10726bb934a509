"""Client-side memory helpers: receiving straight into ``bytes``, and the local buffer.

``new_bytes(n)`` returns a fresh, not yet shared ``bytes`` object together with
a writable view of its storage, so ``get()`` can ``recv_into`` the object it
returns (one copy less than receiving into a bytearray and converting).  This
is what C extensions do with ``PyBytes_FromStringAndSize(NULL, n)``; where
``ctypes.pythonapi`` is unavailable it falls back to a bytearray.

The *local buffer* (``local_buffer_size``) is registered memory owned by the
client; :class:`BufferHandle` objects returned by ``get_buffer`` live in it
and give their range back when released or garbage-collected.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from typing import Any

from ..transfer._memory import view_at
from .master._allocator import OffsetAllocator

__all__ = ["BufferHandle", "LocalBuffer", "make_handle", "new_bytes"]

try:
    _from_size = ctypes.pythonapi.PyBytes_FromStringAndSize
    _from_size.restype = ctypes.py_object
    _from_size.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
    _as_string = ctypes.pythonapi.PyBytes_AsString
    _as_string.restype = ctypes.c_void_p
    _as_string.argtypes = (ctypes.py_object,)
    _HAVE_CAPI = True
except AttributeError:  # pragma: no cover - not CPython
    _HAVE_CAPI = False


def new_bytes(n: int) -> tuple[bytes | bytearray, memoryview]:
    """An unshared ``bytes`` of length ``n`` and a writable view of its contents.

    The caller must fill the view completely before handing the object out.
    """
    if n <= 0:
        return b"", memoryview(bytearray(0))
    if _HAVE_CAPI:
        obj = _from_size(None, n)
        addr = _as_string(obj)
        if addr:
            return obj, view_at(int(addr), n)
    buf = bytearray(n)
    return buf, memoryview(buf)


class LocalBuffer:
    """A registered region split by an offset allocator (thread-safe)."""

    def __init__(self, view: memoryview, addr: int) -> None:
        self.view = view
        self.addr = addr
        self.size = len(view)
        self._alloc = OffsetAllocator(addr, self.size) if self.size else None
        self._lock = threading.Lock()

    def take(self, n: int) -> tuple[int, memoryview] | None:
        if self._alloc is None or n <= 0:
            return None
        with self._lock:
            got = self._alloc.allocate(n)
        if got is None:
            return None
        start = got[0] - self.addr
        return got[0], self.view[start : start + n]

    def give_back(self, addr: int) -> None:
        if self._alloc is not None:
            with self._lock:
                self._alloc.free(addr)

    @property
    def free_bytes(self) -> int:
        if self._alloc is None:
            return 0
        with self._lock:
            return self._alloc.free_bytes


class BufferHandle:
    """An object's bytes inside the client's local buffer (reference ``BufferHandle``).

    Instances are ctypes byte arrays over the range, so they export the buffer
    protocol on every Python version (``memoryview(h)``, ``bytes(h)``,
    ``numpy.frombuffer(h)``); ``ptr()``, ``size()`` and ``len()`` as the
    reference.  The range returns to the local buffer on :meth:`release` or
    when the handle is garbage-collected.
    """

    _finalizer: weakref.finalize[Any, Any]

    def ptr(self) -> int:
        return ctypes.addressof(self)  # type: ignore[arg-type]

    def size(self) -> int:
        return ctypes.sizeof(self)  # type: ignore[arg-type]

    def tobytes(self) -> bytes:
        return bytes(memoryview(self))  # type: ignore[arg-type]

    def release(self) -> None:
        """Give the range back now; the handle must not be used afterwards."""
        self._finalizer()

    def __repr__(self) -> str:
        return f"<BufferHandle ptr={self.ptr():#x} size={self.size()}>"


_handle_types: dict[int, type] = {}
_handle_types_lock = threading.Lock()


def make_handle(owner: LocalBuffer, addr: int, size: int) -> BufferHandle:
    """A :class:`BufferHandle` over ``[addr, addr+size)`` of ``owner``."""
    with _handle_types_lock:
        cls = _handle_types.get(size)
        if cls is None:
            if len(_handle_types) > 4096:
                _handle_types.clear()
            cls = _handle_types[size] = type(
                "BufferHandle", (BufferHandle, ctypes.c_ubyte * size), {}
            )
    handle: BufferHandle = cls.from_address(addr)  # type: ignore[attr-defined]
    handle._finalizer = weakref.finalize(handle, owner.give_back, addr)
    return handle
