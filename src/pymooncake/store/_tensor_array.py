"""Torch tensors and numpy arrays <-> the element bytes of a tensor object.

:func:`describe` turns a CPU or CUDA torch tensor, or a numpy array, into its
dtype code, shape and a C-contiguous byte view (no copy when the input is
already contiguous and on the CPU; CUDA tensors are copied to the host, as
the reference's ``CopyToHost`` does).  :func:`to_tensor` builds a torch
tensor over bytes that are already in memory (no copy): the caller hands in
the buffer that owns them.

torch is optional (``pip install 'pymooncake[torch]'``): it is imported on
first use, and without it every function here raises :class:`TorchRequired`.
numpy is needed only to reach torch tensors' bytes and comes with torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..errors import InvalidParams, NotSupported
from ._tensor import MAX_DIMS, TensorDtype, TensorHeader

__all__ = ["ArrayData", "TorchRequired", "describe", "is_tensor_like", "to_tensor", "torch_module"]


class TorchRequired(NotSupported):
    """The tensor API was called without PyTorch installed."""


_torch: ModuleType | None = None
_np: ModuleType | None = None
_TORCH_TO_CODE: dict[Any, TensorDtype] = {}
_CODE_TO_TORCH: dict[TensorDtype, Any] = {}

#: torch attribute and numpy dtype names of the reference's dtypes (numpy has
#: bfloat16/float8 only through ml_dtypes)
_DTYPE_NAMES = {
    "float32": TensorDtype.FLOAT32,
    "float64": TensorDtype.FLOAT64,
    "int8": TensorDtype.INT8,
    "uint8": TensorDtype.UINT8,
    "int16": TensorDtype.INT16,
    "uint16": TensorDtype.UINT16,
    "int32": TensorDtype.INT32,
    "uint32": TensorDtype.UINT32,
    "int64": TensorDtype.INT64,
    "uint64": TensorDtype.UINT64,
    "bool": TensorDtype.BOOL,
    "float16": TensorDtype.FLOAT16,
    "bfloat16": TensorDtype.BFLOAT16,
    "float8_e4m3fn": TensorDtype.FLOAT8_E4M3,
    "float8_e5m2": TensorDtype.FLOAT8_E5M2,
}


def torch_module(what: str = "the tensor API") -> ModuleType:
    """The ``torch`` module, imported once.

    Raises:
        TorchRequired: torch is not installed.
    """
    global _torch, _np
    if _torch is None:
        try:
            torch = importlib.import_module("torch")
            np = importlib.import_module("numpy")
        except ImportError as exc:
            raise TorchRequired(
                f"{what} needs PyTorch, which is not installed ({exc}); install it with "
                "pip install 'pymooncake[torch]'"
            ) from None
        for name, code in _DTYPE_NAMES.items():
            dt = getattr(torch, name, None)
            if dt is not None:
                _TORCH_TO_CODE[dt] = code
                _CODE_TO_TORCH[code] = dt
        _np = np
        _torch = torch
    return _torch


def _numpy() -> ModuleType:
    torch_module()
    assert _np is not None
    return _np


def torch_dtype(code: int) -> Any:
    """The torch dtype of a dtype code.

    Raises:
        InvalidParams: this torch build lacks it.
    """
    torch_module()
    dt = _CODE_TO_TORCH.get(TensorDtype(code))
    if dt is None:
        raise InvalidParams(f"this PyTorch build has no dtype for {TensorDtype(code).name}")
    return dt


@dataclass(frozen=True)
class ArrayData:
    """What a tensor object stores of an array.

    ``data`` is a C-contiguous byte view of the elements (``nbytes`` long);
    ``owner`` keeps the memory behind it alive.
    """

    dtype: TensorDtype
    shape: tuple[int, ...]
    data: memoryview
    owner: Any

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def header(self) -> TensorHeader:
        """Header of this array stored whole."""
        return TensorHeader.full(self.dtype, self.shape)


def is_tensor_like(obj: Any) -> bool:
    """A torch tensor or a numpy array (without importing either)."""
    mod = type(obj).__module__
    return mod.startswith("torch") or mod == "numpy"


def describe(obj: Any, what: str = "tensor", *, require_contiguous: bool = False) -> ArrayData:
    """The dtype, shape and element bytes of a torch tensor or numpy array.

    Args:
        obj: a torch tensor (any device) or a numpy ndarray.
        what: names the argument in errors.
        require_contiguous: reject non-contiguous input instead of copying it
            (destination tensors).

    Raises:
        TorchRequired: torch is not installed.
        InvalidParams: not a tensor/array, an unsupported dtype, more than 8
            dimensions, or not contiguous when required.
    """
    torch = torch_module()
    np = _numpy()
    if isinstance(obj, torch.Tensor):
        code = _TORCH_TO_CODE.get(obj.dtype)
        if code is None:
            raise InvalidParams(
                f"{what}: unsupported tensor dtype {obj.dtype} (Mooncake stores "
                + ", ".join(t.name.lower() for t in TensorDtype)
                + ")"
            )
        if obj.dim() > MAX_DIMS:
            raise InvalidParams(f"{what}: {obj.dim()} dimensions (at most {MAX_DIMS})")
        if require_contiguous and not obj.is_contiguous():
            raise InvalidParams(f"{what}: must be contiguous")
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        shape = tuple(int(d) for d in t.shape)
        if t.numel() == 0:
            return ArrayData(code, shape, memoryview(b""), t)
        raw = t.reshape(-1).view(torch.uint8).numpy()
        return ArrayData(code, shape, memoryview(raw), t)
    if isinstance(obj, np.ndarray):
        code = _DTYPE_NAMES.get(obj.dtype.name)
        if code is None or obj.dtype.byteorder == ">":
            raise InvalidParams(f"{what}: unsupported array dtype {obj.dtype}")
        if obj.ndim > MAX_DIMS:
            raise InvalidParams(f"{what}: {obj.ndim} dimensions (at most {MAX_DIMS})")
        if require_contiguous and not obj.flags.c_contiguous:
            raise InvalidParams(f"{what}: must be C-contiguous")
        arr = obj if obj.flags.c_contiguous else np.array(obj, order="C")
        shape = tuple(int(d) for d in arr.shape)
        if arr.size == 0:
            return ArrayData(code, shape, memoryview(b""), arr)
        return ArrayData(code, shape, memoryview(arr.reshape(-1).view(np.uint8)), arr)
    raise InvalidParams(f"{what} is a {type(obj).__name__}, not a PyTorch tensor or numpy array")


def to_tensor(buffer: Any, header: TensorHeader, offset: int = 0) -> Any:
    """A torch tensor over the data of the object that starts at ``offset``
    in ``buffer`` (a writable buffer: numpy array, bytearray, memoryview);
    the tensor keeps ``buffer`` alive and shares its memory.

    Raises:
        TorchRequired: torch is not installed.
    """
    torch = torch_module()
    np = _numpy()
    dtype = torch_dtype(header.dtype)
    if header.data_bytes == 0:
        return torch.empty(header.local_shape, dtype=dtype)
    raw = np.frombuffer(
        buffer, dtype=np.uint8, count=header.data_bytes, offset=offset + header.data_offset
    )
    return torch.from_numpy(raw).view(dtype).reshape(header.local_shape)


def empty_bytes(n: int) -> Any:
    """A fresh writable byte array of ``n`` bytes (numpy, 16-byte aligned)."""
    return _numpy().empty(n, dtype=_numpy().uint8)
