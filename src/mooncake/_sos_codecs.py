"""Column codecs of ``mooncake.structured_object_store``: non-tensor DataProto fields.

A non-tensor field is a column of Python values, one per row (an object
ndarray in a DataProto's ``non_tensor_batch``).  It is stored as a few typed
payloads plus JSON metadata, in the reference's formats (same payload names,
metadata keys and codec names), so objects written by either implementation
decode on the other:

==================  ==============================================  =========================
codec               rows                                            payloads
==================  ==============================================  =========================
``ndarray``         numeric scalars                                 data, nulls
``typed_ragged``    numeric lists / ndarrays of any shape           data, offsets, shapes, ndims, nulls
``ragged_tensor``   torch tensors of one dtype                      (as typed_ragged)
``ragged_tensor_dict``  dicts of tensors (schema only)              null_mask, ``<key>.<payload>``
``bytes_ragged``    bytes-like                                      data, offsets, nulls
``media_bytes``     PIL images (raw pixels)                         (as bytes_ragged)
``utf8_ragged``     str                                             (as bytes_ragged)
``msgpack_ragged``  dicts / lists msgpack can pack                  (as bytes_ragged)
``json_ragged``     anything JSON can dump                          (as bytes_ragged)
``media_list_ragged``  lists of images / bytes                      data, row_offsets, byte_offsets, nulls
``structured_recursive``  nested dicts/lists with tensors, bytes ... ``node.<i>.*``, ``leaf.<i>.*``
==================  ==============================================  =========================

:func:`infer_structure` expands nested rows into leaf columns (paths like
``root.a[0].b``; ``MISSING`` marks an absent dict key, distinct from None) and
:func:`_choose_leaf_codec` picks each leaf's codec.  numpy and msgpack are
needed (``pip install 'pymooncake[structured]'``); torch only for tensor rows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

_msgpack: Any
try:
    import msgpack as _msgpack  # type: ignore[import-untyped,no-redef,unused-ignore]
except ImportError:  # pragma: no cover - the structured extra brings it
    _msgpack = None

_torch: Any
try:
    import torch as _torch
except ImportError:  # pragma: no cover - optional
    _torch = None

__all__ = [
    "MISSING",
    "CodecDecision",
    "EncodedLeaf",
    "InferredLeaf",
    "InferredNode",
    "PartsPayload",
    "choose_leaf_codec",
    "decode_column",
    "encode_column",
    "encode_with_schema",
    "escape_key",
    "infer_structure",
]

#: bounds of structure inference (the reference's values)
_MAX_STRUCT_KEYS = 64
_MAX_LIST_LEN = 8
_MAX_SAMPLE_ROWS = 128
_MAX_SAMPLED_BYTES = 1 << 20
_MAX_DEPTH = 32
_TYPED_RAGGED_DEFAULT_DTYPE = "int64"
_RAGGED_TENSOR_DEFAULT_DTYPE = "torch.float32"
_RAGGED_TENSOR_PAYLOADS = frozenset({"data", "offsets", "shapes", "ndims", "nulls"})
#: errors that make an encoder give up and the next candidate codec be tried
FALLBACK_ERRORS = (TypeError, ValueError, OverflowError, RuntimeError, RecursionError)


def _msgpack_module() -> Any:
    if _msgpack is None:
        raise RuntimeError("structured objects need msgpack: pip install 'pymooncake[structured]'")
    return _msgpack


class _Missing:
    """A dict key absent from a row (distinct from a None value)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<MISSING>"


MISSING = _Missing()


@dataclass
class CodecDecision:
    """Whether ``codec`` fits a column, and why."""

    accepted: bool
    codec: str
    reason: str
    normalized_type: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferredLeaf:
    path: str
    values: list[Any]
    decision: CodecDecision


@dataclass
class InferredNode:
    """A dict or list level of nested rows; ``row_mask`` marks rows that had one."""

    path: str
    node_type: str
    children: list[Any]
    lengths: list[int] | None = None
    row_mask: list[bool] | None = None


@dataclass
class EncodedLeaf:
    """A column as payloads (name -> ndarray / bytes / PartsPayload) and metadata."""

    codec: str
    rows: int
    payload: dict[str, Any]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class PartsPayload:
    """Bytes stored as one member but handed over in parts (no join)."""

    buffers: tuple[memoryview, ...]
    owners: tuple[Any, ...] = ()
    dtype: str | None = None
    shape: tuple[int, ...] | None = None

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.buffers)

    def tobytes(self) -> bytes:
        return b"".join(bytes(b) for b in self.buffers)


# --------------------------------------------------------------------------------
# inference
# --------------------------------------------------------------------------------


def _present(values: Sequence[Any]) -> list[Any]:
    return [v for v in values if v is not None and not isinstance(v, _Missing)]


def _is_pil_image(value: Any) -> bool:
    module = getattr(type(value), "__module__", "") or ""
    return module.startswith("PIL.") and hasattr(value, "save")


def _is_bytes_like(value: Any) -> bool:
    return isinstance(value, (bytes, bytearray, memoryview))


def _is_media_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(
        _is_pil_image(i) or _is_bytes_like(i) for i in value
    )


def _is_tensor(value: Any) -> bool:
    return _torch is not None and isinstance(value, _torch.Tensor)


def choose_leaf_codec(values: list[Any]) -> CodecDecision:
    """The codec of a column of leaf values (None and MISSING rows are skipped)."""
    rows = _present(values)
    if not rows:
        return CodecDecision(False, "msgpack_ragged", "all rows are null", "msgpack")
    if _torch is not None and all(_is_tensor(v) for v in rows):
        dtypes = {v.dtype for v in rows}
        if len(dtypes) != 1:
            return CodecDecision(
                False,
                "ragged_tensor",
                f"mixed tensor dtype: {sorted(str(d) for d in dtypes)}",
                "torch.Tensor",
            )
        return CodecDecision(
            True,
            "ragged_tensor",
            "all non-null rows are Tensor",
            "torch.Tensor",
            {"dtype": str(rows[0].dtype)},
        )
    if all(_is_media_list(v) for v in rows):
        return CodecDecision(True, "media_list_ragged", "all rows are media lists", "media list")
    if all(isinstance(v, np.ndarray) for v in rows):
        if all(np.issubdtype(v.dtype, np.number) for v in rows):
            return CodecDecision(
                True,
                "typed_ragged",
                "all rows are numeric ndarray",
                "numeric sequence",
                {"recursive_source": "ndarray"},
            )
        return CodecDecision(False, "msgpack_ragged", "object ndarray rows", "python object")
    if all(isinstance(v, (list, tuple)) for v in rows):
        try:
            dtype = np.result_type(*[np.asarray(v).dtype for v in rows])
        except (TypeError, ValueError, OverflowError):
            dtype = None
        if dtype is not None and np.issubdtype(dtype, np.number):
            return CodecDecision(
                True,
                "typed_ragged",
                "all rows are numeric sequences",
                "numeric sequence",
                {"dtype": str(dtype)},
            )
    if all(isinstance(v, (bool, int, float, np.number)) for v in rows):
        return CodecDecision(
            True,
            "ndarray",
            "all rows are numeric scalar",
            "numeric scalar",
            {"dtype": str(np.result_type(*rows))},
        )
    if all(_is_bytes_like(v) for v in rows):
        return CodecDecision(True, "bytes_ragged", "all rows are bytes-like", "bytes-like")
    if all(_is_pil_image(v) for v in rows):
        return CodecDecision(True, "media_bytes", "all rows are media", "media")
    if all(isinstance(v, str) for v in rows):
        return CodecDecision(True, "utf8_ragged", "all rows are str", "str")
    if all(isinstance(v, (dict, list, tuple)) for v in rows):
        return CodecDecision(True, "msgpack_ragged", "all rows are msgpack-like", "msgpack")
    return CodecDecision(False, "msgpack_ragged", "no codec matched", "python object")


def escape_key(key: str) -> str:
    """A dict key as a path segment: ``\\``, ``.`` and ``[`` are escaped."""
    return key.replace("\\", "\\\\").replace(".", "\\.").replace("[", "\\[")


def _dict_keys(values: list[Any]) -> list[str] | None:
    rows = _present(values)
    if not rows or not all(isinstance(v, dict) for v in rows):
        return None
    keys = {k for v in rows for k in v}
    if not all(isinstance(k, str) for k in keys) or len(keys) > _MAX_STRUCT_KEYS:
        return None
    return sorted(keys)


def _list_shape(values: list[Any]) -> tuple[int, list[int]] | None:
    rows = _present(values)
    if not rows or not all(isinstance(v, (list, tuple)) for v in rows):
        return None
    longest = max(len(v) for v in rows)
    if longest > _MAX_LIST_LEN:
        return None
    if not all(i is None or isinstance(i, (dict, list, tuple)) for v in rows for i in v):
        return None
    return longest, [len(v) if isinstance(v, (list, tuple)) else 0 for v in values]


def infer_structure(
    path: str,
    values: list[Any],
    leaves: list[InferredLeaf],
    nodes: list[InferredNode],
    *,
    _depth: int = 0,
) -> None:
    """Expand nested rows into ``nodes`` (dict/list levels) and ``leaves``
    (columns with a codec decision), depth first.

    Raises:
        ValueError: nested deeper than 32 levels.
    """
    if _depth > _MAX_DEPTH:
        raise ValueError(f"infer_structure exceeded max depth {_MAX_DEPTH} at {path!r}")
    keys = _dict_keys(values)
    if keys is not None:
        nodes.append(
            InferredNode(path, "dict", keys, row_mask=[isinstance(v, dict) for v in values])
        )
        for key in keys:
            child = [v.get(key, MISSING) if isinstance(v, dict) else None for v in values]
            infer_structure(f"{path}.{escape_key(key)}", child, leaves, nodes, _depth=_depth + 1)
        return
    shape = _list_shape(values)
    if shape is not None:
        longest, lengths = shape
        is_list = [isinstance(v, (list, tuple)) for v in values]
        nodes.append(InferredNode(path, "list", list(range(longest)), lengths, row_mask=is_list))
        for i in range(longest):
            child = [
                (v[i] if i < len(v) else MISSING) if ok else None
                for v, ok in zip(values, is_list, strict=True)
            ]
            infer_structure(f"{path}[{i}]", child, leaves, nodes, _depth=_depth + 1)
        return
    leaves.append(InferredLeaf(path, values, choose_leaf_codec(values)))


# --------------------------------------------------------------------------------
# leaf codecs
# --------------------------------------------------------------------------------


def _contiguous(value: Any, dtype: np.dtype[Any]) -> np.ndarray:
    if isinstance(value, np.ndarray) and value.dtype == dtype and value.flags.c_contiguous:
        return value
    array: np.ndarray = np.ascontiguousarray(np.asarray(value, dtype=dtype))
    return cast(np.ndarray, array.reshape(np.shape(value)))


def _parts(arrays: Sequence[np.ndarray], dtype: np.dtype[Any], total: int) -> PartsPayload:
    flats = [a.reshape(-1) for a in arrays if a.size]
    if not flats:
        flats = [np.empty(0, dtype=dtype)]
    return PartsPayload(
        tuple(memoryview(cast(Any, f)).cast("B") for f in flats),
        tuple(flats),
        np.dtype(dtype).str,
        (total,),
    )


def encode_regular_ndarray_rows(
    values: list[Any], dtype: Any
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """typed_ragged of two or more C-contiguous ndarray rows of one shape and
    exactly ``dtype`` (no conversion, no nulls); None for any other column."""
    dt = np.dtype(dtype)
    if len(values) < 2 or not all(
        isinstance(v, np.ndarray) and v.dtype == dt and v.flags.c_contiguous for v in values
    ):
        return None
    shape = values[0].shape
    if any(v.shape != shape for v in values):
        return None
    rows, width, ndim = len(values), int(values[0].size), len(shape)
    data: Any = _parts(values, dt, rows * width) if width else np.zeros(0, dtype=dt)
    shapes = np.zeros((rows, max(ndim, 1)), dtype=np.int64)
    shapes[:, :ndim] = shape
    return {
        "data": data,
        "offsets": np.arange(rows + 1, dtype=np.int64) * width,
        "shapes": shapes,
        "ndims": np.full(rows, ndim, dtype=np.int16),
        "nulls": np.zeros(rows, dtype=np.bool_),
    }, {
        "dtype": str(dt),
        "max_ndim": ndim,
        "shape_policy": "ragged",
        "row_format": "ndarray",
        "ndarray_rows": None,
        "physical_layout": "contiguous_flat",
    }


def encode_typed_ragged(
    values: list[Any], dtype_hint: Any = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rows of numbers of any shape: the flat elements, per-row offsets,
    shapes and ndims, and a null mask."""
    if dtype_hint is None:
        arrays = [np.asarray(v) for v in values if v is not None]
        dtype = np.result_type(*arrays) if arrays else np.dtype(_TYPED_RAGGED_DEFAULT_DTYPE)
    else:
        dtype = np.dtype(dtype_hint)
    if dtype.hasobject:
        raise ValueError("typed_ragged codec requires non-object dtype")
    fast = encode_regular_ndarray_rows(values, dtype)
    if fast is not None:
        return fast
    rows = len(values)
    nulls = np.asarray([v is None for v in values], dtype=np.bool_)
    arrays = [np.empty(0, dtype=dtype) if v is None else _contiguous(v, dtype) for v in values]
    lengths = np.asarray(
        [0 if v is None else a.size for v, a in zip(values, arrays, strict=True)], dtype=np.int64
    )
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    present = [a for v, a in zip(values, arrays, strict=True) if v is not None]
    all_ndarray = all(isinstance(v, np.ndarray) for v in values if v is not None)
    # ndarray rows sharing their trailing shape: max_ndim is their ndim
    tails = {a.shape[1:] for a in present}
    dims = {a.ndim for a in present}
    regular = all_ndarray and bool(present) and len(tails) == 1 and len(dims) == 1
    max_ndim = max((a.ndim for a in present), default=0)
    ndims = np.zeros(rows, dtype=np.int16)
    shapes = np.zeros((rows, max(max_ndim, 1)), dtype=np.int64)
    for row, (v, a) in enumerate(zip(values, arrays, strict=True)):
        if v is not None:
            ndims[row] = a.ndim
            shapes[row, : a.ndim] = a.shape
    metadata: dict[str, Any] = {
        "dtype": str(dtype),
        "max_ndim": int(max_ndim),
        "shape_policy": "ragged",
    }
    if all_ndarray and rows:
        metadata.update(
            {"row_format": "ndarray", "ndarray_rows": None, "physical_layout": "contiguous_flat"}
        )
        if regular:
            metadata["max_ndim"] = next(iter(dims))
    else:
        flags = [v is not None and isinstance(v, np.ndarray) for v in values]
        mixed = any(flags)
        metadata.update(
            {"row_format": "mixed" if mixed else "list", "ndarray_rows": flags if mixed else None}
        )
    data = _parts(present, dtype, int(offsets[-1]))
    return {
        "data": data,
        "offsets": offsets,
        "shapes": shapes,
        "ndims": ndims,
        "nulls": nulls,
    }, metadata


def _as_array(raw: Any, dtype: np.dtype[Any]) -> np.ndarray:
    if _is_tensor(raw):
        return raw.numpy()  # type: ignore[no-any-return]
    if isinstance(raw, PartsPayload):
        raw = raw.tobytes()
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return np.frombuffer(raw, dtype=dtype)
    if isinstance(raw, np.ndarray):
        return raw if raw.dtype == dtype else np.frombuffer(raw.tobytes(), dtype=dtype)
    return np.asarray(raw, dtype=dtype)


def decode_typed_ragged(
    payload: Mapping[str, Any], rows: int, metadata: Mapping[str, Any] | None
) -> list[Any]:
    meta = metadata or {}
    dtype = np.dtype(meta.get("dtype", _TYPED_RAGGED_DEFAULT_DTYPE))
    data = _as_array(payload["data"], dtype)
    offsets, shapes, ndims, nulls = (
        payload["offsets"],
        payload["shapes"],
        payload["ndims"],
        payload["nulls"],
    )
    row_format = meta.get("row_format")
    flags = meta.get("ndarray_rows") or []
    out: list[Any] = []
    for row in range(rows):
        if bool(nulls[row]):
            out.append(None)
            continue
        ndim = int(ndims[row])
        shape = tuple(int(d) for d in np.asarray(shapes[row])[:ndim])
        array = data[int(offsets[row]) : int(offsets[row + 1])].reshape(shape)
        if row_format == "ndarray" or (row_format == "mixed" and bool(flags[row])):
            out.append(array)
        else:
            out.append(array.tolist())
    return out


def _torch_dtype(name: str) -> Any:
    if _torch is None:
        raise RuntimeError("torch is required for tensor columns: pip install 'pymooncake[torch]'")
    dtype = getattr(_torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, _torch.dtype):
        raise ValueError(f"unknown torch dtype: {name}")
    return dtype


def _torch_to_numpy_dtype(name: str) -> np.dtype[Any]:
    dtype = _torch_dtype(name)
    if dtype == _torch.bfloat16:
        raise ValueError("torch.bfloat16 has no value-preserving numpy dtype")
    numpy_dtype: np.dtype[Any] = np.dtype(_torch.empty(0, dtype=dtype).numpy().dtype)
    return numpy_dtype


def encode_ragged_tensor(values: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rows of tensors (or numeric ndarrays) of one dtype, as typed_ragged rows."""
    if _torch is None:
        raise RuntimeError("torch is required to encode ragged tensor fields")
    dtype = None
    arrays: list[Any] = []
    for value in values:
        if value is None:
            arrays.append(None)
            continue
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise ValueError("ragged tensor codec requires numeric ndarray values")
            t = _torch.as_tensor(value if value.flags.writeable else value.copy())
        else:
            t = value.detach()
        if t.device.type != "cpu" or not t.is_contiguous():
            t = t.cpu().contiguous()
        if t.dtype == _torch.bfloat16:
            raise ValueError("ragged tensor codec does not support torch.bfloat16")
        dtype = t.dtype if dtype is None else dtype
        if t.dtype != dtype:
            raise ValueError(f"mixed tensor dtype: {dtype} vs {t.dtype}")
        arrays.append(t.numpy())
    torch_dtype = dtype if dtype is not None else _torch_dtype(_RAGGED_TENSOR_DEFAULT_DTYPE)
    payload, meta = encode_typed_ragged(arrays, _torch_to_numpy_dtype(str(torch_dtype)))
    meta["dtype"] = str(torch_dtype)
    return payload, meta


def decode_ragged_tensor(
    payload: Mapping[str, Any], rows: int, metadata: Mapping[str, Any] | None
) -> list[Any]:
    meta = dict(metadata or {})
    name = meta.get("dtype", _RAGGED_TENSOR_DEFAULT_DTYPE)
    meta["dtype"] = str(_torch_to_numpy_dtype(name))
    meta["row_format"] = "ndarray"
    dtype = _torch_dtype(name)
    out: list[Any] = []
    for v in decode_typed_ragged(payload, rows, meta):
        if v is None:
            out.append(None)
        else:
            array = np.ascontiguousarray(v)
            if not array.flags.writeable:
                array = array.copy()
            out.append(_torch.from_numpy(array).to(dtype))
    return out


def _dict_keys_checked(keys: Any) -> list[str]:
    out: list[str] = []
    for key in keys.keys() if isinstance(keys, Mapping) else keys:
        if not isinstance(key, str):
            raise TypeError("ragged_tensor_dict keys must be strings")
        if not key:
            raise ValueError("ragged_tensor_dict keys must not be empty")
        if any(c in key for c in "./\\"):
            raise ValueError("ragged_tensor_dict keys must not contain '.', '/', or '\\'")
        if key in out:
            raise ValueError(f"ragged_tensor_dict keys contain duplicate key {key!r}")
        out.append(key)
    return out


def encode_ragged_tensor_dict(values: list[Any], declared: Any = None) -> EncodedLeaf:
    """Rows of ``dict[str, Tensor]`` (or None): one ragged_tensor column per key."""
    keys = None if declared is None else _dict_keys_checked(declared)
    seen: set[str] = set()
    for row, item in enumerate(values):
        if item is None:
            continue
        if not isinstance(item, Mapping):
            raise TypeError(
                f"ragged_tensor_dict rows must be mappings or None; row {row} is {type(item).__name__}"
            )
        nones = sorted(k for k, v in item.items() if v is None)
        if nones:
            raise TypeError(
                f"ragged_tensor_dict rows cannot contain explicit None tensor values; row {row} has explicit None for {nones}"
            )
        row_keys = _dict_keys_checked(item.keys())
        if keys is None:
            seen.update(row_keys)
        elif set(row_keys) - set(keys):
            raise ValueError(
                "ragged_tensor_dict rows contain keys not declared in FieldSchema metadata['keys']; "
                f"row {row} has keys not declared: {sorted(set(row_keys) - set(keys))}"
            )
    if keys is None:
        keys = _dict_keys_checked(sorted(seen))
    payload: dict[str, Any] = {"null_mask": np.asarray([v is None for v in values], dtype=np.bool_)}
    key_codecs: dict[str, Any] = {}
    for key in keys:
        try:
            sub, meta = encode_ragged_tensor([None if v is None else v.get(key) for v in values])
        except FALLBACK_ERRORS as exc:
            raise ValueError(f"failed to encode ragged_tensor_dict key {key!r}") from exc
        for name, value in sub.items():
            payload[f"{key}.{name}"] = value
        key_codecs[key] = meta
    return EncodedLeaf(
        "ragged_tensor_dict", len(values), payload, {"keys": keys, "key_codecs": key_codecs}
    )


def decode_ragged_tensor_dict(
    payload: Mapping[str, Any], rows: int, metadata: Mapping[str, Any]
) -> list[Any]:
    null_mask = payload["null_mask"]
    if isinstance(null_mask, (bytes, bytearray)):
        null_mask = np.frombuffer(null_mask, dtype=np.bool_)
    columns = {}
    for key in metadata.get("keys", []):
        sub = {n[len(key) + 1 :]: v for n, v in payload.items() if n.startswith(f"{key}.")}
        missing = sorted(_RAGGED_TENSOR_PAYLOADS - set(sub))
        if missing:
            raise ValueError(
                f"ragged_tensor_dict payload for key {key!r} is missing payloads: {missing}"
            )
        columns[key] = decode_ragged_tensor(sub, rows, (metadata.get("key_codecs") or {}).get(key))
    out: list[Any] = []
    for row in range(rows):
        if bool(null_mask[row]):
            out.append(None)
        else:
            out.append({k: col[row] for k, col in columns.items() if col[row] is not None})
    return out


def encode_scalars(values: list[Any], dtype: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    dt = np.dtype(dtype)
    fill = False if dt == np.dtype(np.bool_) else 0
    data = np.asarray([fill if v is None else v for v in values], dtype=dt)
    nulls = np.asarray([v is None for v in values], dtype=np.bool_)
    return {"data": data, "nulls": nulls}, {"dtype": str(data.dtype), "shape": list(data.shape)}


def decode_scalars(payload: Mapping[str, Any]) -> list[Any]:
    data, nulls = np.asarray(payload["data"]), np.asarray(payload["nulls"], dtype=np.bool_)
    if not nulls.any():
        return list(data.tolist())
    values = data.astype(object)
    values[nulls] = None
    return list(values.tolist())


def _media_bytes(value: Any) -> tuple[bytes | memoryview, str | None, dict[str, Any]]:
    if value is None:
        return b"", None, {"kind": "null"}
    if _is_bytes_like(value):
        return (
            memoryview(value).cast("B") if not isinstance(value, bytes) else value,
            None,
            {"kind": "bytes"},
        )
    if _is_pil_image(value):
        image = value.convert(value.mode) if getattr(value, "readonly", False) else value
        return (
            image.tobytes(),
            "image/raw",
            {
                "kind": "pil_raw",
                "mode": image.mode,
                "size": list(image.size),
                "format": getattr(value, "format", None),
            },
        )
    return bytes(value), None, {"kind": "bytes"}


def encode_bytes_rows(values: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Bytes-like rows (or PIL images as raw pixels): data, offsets, nulls."""
    parts, types, encodings = [], [], []
    offsets = [0]
    for value in values:
        data, media_type, encoding = _media_bytes(value)
        parts.append(data)
        types.append(media_type)
        encodings.append(encoding)
        offsets.append(offsets[-1] + len(data))
    metadata: dict[str, Any] = {}
    if any(e.get("kind") == "pil_raw" for e in encodings):
        metadata["media_encodings"] = encodings
    media = sorted({t for t in types if t})
    if media:
        metadata["media_types"] = media
        metadata["encode_source"] = "raw_pixels_from_object"
    views = tuple(memoryview(p).cast("B") for p in parts if len(p))
    return (
        {
            "data": PartsPayload(views, tuple(parts)),
            "offsets": np.asarray(offsets, dtype=np.int64),
            "nulls": np.asarray([v is None for v in values], dtype=np.bool_),
        },
        metadata,
    )


def _decode_media(data: memoryview, encoding: Mapping[str, Any] | None) -> Any:
    if not encoding or encoding.get("kind") != "pil_raw":
        return bytes(data)
    try:
        from PIL import Image  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return bytes(data)
    image = Image.frombuffer(
        encoding["mode"], tuple(encoding["size"]), bytes(data), "raw", encoding["mode"], 0, 1
    )
    image.format = encoding.get("format")
    return image


def _raw_bytes(data: Any) -> memoryview:
    if isinstance(data, PartsPayload):
        return memoryview(data.tobytes())
    if isinstance(data, np.ndarray):
        return memoryview(cast(Any, np.ascontiguousarray(data).view(np.uint8).reshape(-1)))
    return memoryview(data).cast("B")


def decode_bytes_rows(
    payload: Mapping[str, Any], rows: int, metadata: Mapping[str, Any] | None = None
) -> list[Any]:
    data = _raw_bytes(payload["data"])
    offsets, nulls = payload["offsets"], payload["nulls"]
    encodings = (metadata or {}).get("media_encodings", [])
    out: list[Any] = []
    for row in range(rows):
        if bool(nulls[row]):
            out.append(None)
        else:
            item = data[int(offsets[row]) : int(offsets[row + 1])]
            out.append(_decode_media(item, encodings[row] if row < len(encodings) else None))
    return out


def encode_msgpack_rows(path: str, values: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    packer = _msgpack_module().Packer(use_bin_type=True, strict_types=True)
    buf = bytearray()
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    nulls = np.zeros(len(values), dtype=np.bool_)
    try:
        for i, value in enumerate(values):
            if value is None:
                nulls[i] = True
            else:
                buf.extend(packer.pack(value))
            offsets[i + 1] = len(buf)
    except TypeError as exc:
        raise ValueError(
            f"unsupported structured non-tensor field {path}: msgpack codec cannot encode value"
        ) from exc
    return {"data": buf, "offsets": offsets, "nulls": nulls}, {}


def decode_msgpack_rows(payload: Mapping[str, Any], rows: int) -> list[Any]:
    offsets, nulls = payload["offsets"], payload["nulls"]
    if len(offsets) != rows + 1:
        raise ValueError(f"msgpack_ragged offsets length {len(offsets)} does not match rows {rows}")
    if len(nulls) != rows:
        raise ValueError(f"msgpack_ragged nulls length {len(nulls)} does not match rows {rows}")
    unpacker = _msgpack_module().Unpacker(raw=False)
    unpacker.feed(bytes(_raw_bytes(payload["data"])))
    present = iter(unpacker)
    out = [None if bool(nulls[i]) else next(present) for i in range(rows)]
    if next(present, MISSING) is not MISSING:
        raise ValueError(f"msgpack_ragged payload has more than {rows} rows")
    return out


def encode_media_lists(values: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    row_offsets, byte_offsets = [0], [0]
    parts, types, encodings = [], [], []
    for value in values:
        items = [] if value is None else list(value)
        for item in items:
            data, media_type, encoding = _media_bytes(item)
            parts.append(bytes(data))
            types.append(media_type)
            encodings.append(encoding)
            byte_offsets.append(byte_offsets[-1] + len(data))
        row_offsets.append(row_offsets[-1] + len(items))
    metadata: dict[str, Any] = {
        "encode_source": "raw_pixels_from_object",
        "media_encodings": encodings,
    }
    media = sorted({t for t in types if t})
    if media:
        metadata["media_types"] = media
    return (
        {
            "data": b"".join(parts),
            "row_offsets": np.asarray(row_offsets, dtype=np.int64),
            "byte_offsets": np.asarray(byte_offsets, dtype=np.int64),
            "nulls": np.asarray([v is None for v in values], dtype=np.bool_),
        },
        metadata,
    )


def decode_media_lists(
    payload: Mapping[str, Any], rows: int, metadata: Mapping[str, Any] | None
) -> list[Any]:
    data = _raw_bytes(payload["data"])
    row_offsets, byte_offsets, nulls = (
        payload["row_offsets"],
        payload["byte_offsets"],
        payload["nulls"],
    )
    encodings = (metadata or {}).get("media_encodings", [])
    out: list[Any] = []
    for row in range(rows):
        if bool(nulls[row]):
            out.append(None)
            continue
        items = []
        for i in range(int(row_offsets[row]), int(row_offsets[row + 1])):
            items.append(
                _decode_media(
                    data[int(byte_offsets[i]) : int(byte_offsets[i + 1])],
                    encodings[i] if i < len(encodings) else None,
                )
            )
        out.append(items)
    return out


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def encode_leaf(values: list[Any], decision: CodecDecision) -> EncodedLeaf:
    """A column with an accepted decision (inferred: the decision is recorded).

    Raises:
        ValueError: the decision was not accepted, or the rows do not fit it.
    """
    if not decision.accepted:
        raise ValueError(f"unsupported structured non-tensor field: {decision.reason}")
    payload, metadata = _encode_rows(decision.codec, values, decision.metadata, "leaf")
    metadata.update(
        {
            "schema_source": "inferred_from_runtime_values",
            "decision_reason": decision.reason,
            "normalized_type": decision.normalized_type,
            **decision.metadata,
        }
    )
    return EncodedLeaf(decision.codec, len(values), payload, metadata)


def _encode_rows(
    codec: str, values: list[Any], hints: Mapping[str, Any], path: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    if codec == "ragged_tensor":
        return encode_ragged_tensor(values)
    if codec == "typed_ragged":
        return encode_typed_ragged(values)
    if codec == "media_list_ragged":
        return encode_media_lists(values)
    if codec == "ndarray":
        return encode_scalars(values, hints["dtype"])
    if codec in ("bytes_ragged", "media_bytes"):
        return encode_bytes_rows(values)
    if codec == "utf8_ragged":
        return encode_bytes_rows([None if v is None else v.encode("utf-8") for v in values])
    if codec == "msgpack_ragged":
        return encode_msgpack_rows(path, values)
    if codec == "json_ragged":
        return encode_bytes_rows([None if v is None else _json_bytes(v) for v in values])
    raise ValueError(f"unsupported structured non-tensor codec: {codec}")


def decode_leaf(
    codec: str, payload: Mapping[str, Any], rows: int, metadata: Mapping[str, Any] | None = None
) -> list[Any]:
    if codec == "ragged_tensor":
        return decode_ragged_tensor(payload, rows, metadata)
    if codec == "typed_ragged":
        return decode_typed_ragged(payload, rows, metadata)
    if codec == "media_list_ragged":
        return decode_media_lists(payload, rows, metadata)
    if codec == "ndarray":
        return decode_scalars(payload)
    if codec == "media_bytes":
        return decode_bytes_rows(payload, rows, metadata)
    if codec == "bytes_ragged":
        return decode_bytes_rows(payload, rows)
    if codec == "utf8_ragged":
        return [None if v is None else v.decode("utf-8") for v in decode_bytes_rows(payload, rows)]
    if codec == "msgpack_ragged":
        return decode_msgpack_rows(payload, rows)
    if codec == "json_ragged":
        return [None if v is None else json.loads(v) for v in decode_bytes_rows(payload, rows)]
    raise ValueError(f"unknown structured non-tensor codec: {codec}")


# --------------------------------------------------------------------------------
# nested rows: structured_recursive
# --------------------------------------------------------------------------------


def _path_tokens(path: str) -> list[Any]:
    tokens: list[Any] = []
    current: list[str] = []
    i = 0
    while i < len(path):
        c = path[i]
        if c == "\\" and i + 1 < len(path):
            current.append(path[i + 1])
            i += 2
        elif c == ".":
            if current:
                tokens.append("".join(current))
                current = []
            i += 1
        elif c == "[":
            if current:
                tokens.append("".join(current))
                current = []
            end = path.index("]", i)
            tokens.append(int(path[i + 1 : end]))
            i = end + 1
        else:
            current.append(c)
            i += 1
    if current:
        tokens.append("".join(current))
    return tokens


def _lookup(value: Any, root: str, target: str) -> Any:
    suffix = target[len(root) :].removeprefix(".")
    current = value
    for token in _path_tokens(suffix) if suffix else []:
        if isinstance(token, str):
            if not isinstance(current, dict) or token not in current:
                return MISSING
        elif not isinstance(current, (list, tuple)) or token >= len(current):
            return MISSING
        current = current[token]
    return current


def _leaf_is_nested_data(leaf: InferredLeaf) -> bool:
    codec = leaf.decision.codec
    if codec in {"ragged_tensor", "bytes_ragged", "media_bytes", "media_list_ragged"}:
        return True
    return codec == "typed_ragged" and any(isinstance(v, np.ndarray) for v in _present(leaf.values))


def encode_recursive(
    path: str,
    values: list[Any],
    leaves: Sequence[InferredLeaf],
    nodes: Sequence[InferredNode],
    *,
    with_schema: bool,
) -> EncodedLeaf:
    """Nested rows as one column per leaf plus per-level masks and lengths."""
    payload: dict[str, Any] = {}
    node_specs: list[dict[str, Any]] = []
    for i, node in enumerate(nodes):
        spec: dict[str, Any] = {
            "id": i,
            "path": node.path,
            "node_type": node.node_type,
            "children": list(node.children),
        }
        payload[f"node.{i}.missing"] = np.asarray(
            [_lookup(v, path, node.path) is MISSING for v in values], dtype=np.bool_
        )
        spec["missing_payload"] = f"node.{i}.missing"
        if node.row_mask is not None:
            payload[f"node.{i}.row_mask"] = np.asarray(node.row_mask, dtype=np.bool_)
            spec["row_mask_payload"] = f"node.{i}.row_mask"
        if node.lengths is not None:
            payload[f"node.{i}.lengths"] = np.asarray(node.lengths, dtype=np.int64)
            spec["lengths_payload"] = f"node.{i}.lengths"
        node_specs.append(spec)
    leaf_specs: list[dict[str, Any]] = []
    for i, leaf in enumerate(leaves):
        missing = np.asarray([isinstance(v, _Missing) for v in leaf.values], dtype=np.bool_)
        column = [None if m else v for m, v in zip(missing, leaf.values, strict=True)]
        decision = leaf.decision
        if not decision.accepted and all(v is None or isinstance(v, _Missing) for v in leaf.values):
            decision = CodecDecision(True, "json_ragged", "all rows are null or missing", "json")
        if with_schema:
            encoded = encode_with_schema(leaf.path, column, decision.codec, decision.metadata)
        else:
            encoded = encode_leaf(column, decision)
        members: dict[str, str] = {}
        for name, value in encoded.payload.items():
            payload[f"leaf.{i}.{name}"] = value
            members[name] = f"leaf.{i}.{name}"
        payload[f"leaf.{i}.missing"] = missing
        members["missing"] = f"leaf.{i}.missing"
        leaf_specs.append(
            {
                "id": i,
                "path": leaf.path,
                "codec": encoded.codec,
                "rows": encoded.rows,
                "metadata": encoded.metadata,
                "payload_members": members,
            }
        )
    return EncodedLeaf(
        "structured_recursive",
        len(values),
        payload,
        {
            "schema_source": "inferred_from_runtime_values",
            "structure_version": 1,
            "root_path": path,
            "nodes": node_specs,
            "leaves": leaf_specs,
        },
    )


def _child_path(node: Mapping[str, Any], child: Any) -> str:
    if node["node_type"] == "dict":
        return f"{node['path']}.{escape_key(str(child))}"
    return f"{node['path']}[{int(child)}]"


def _node_depth(node: Mapping[str, Any]) -> int:
    path = str(node["path"])
    return path.count(".") + path.count("[")


def decode_recursive(
    metadata: Mapping[str, Any], payload: Mapping[str, Any], rows: int
) -> list[Any]:
    columns: dict[str, list[Any]] = {}
    for leaf in metadata.get("leaves", []):
        members = leaf["payload_members"]
        sub = {n: payload[g] for n, g in members.items() if n != "missing"}
        values = decode_leaf(leaf["codec"], sub, rows, leaf.get("metadata"))
        missing = payload[members["missing"]]
        columns[leaf["path"]] = [MISSING if bool(missing[r]) else values[r] for r in range(rows)]
    for node in sorted(metadata.get("nodes", []), key=_node_depth, reverse=True):
        missing = payload[node["missing_payload"]] if node.get("missing_payload") else None
        mask = payload[node["row_mask_payload"]] if node.get("row_mask_payload") else None
        lengths = payload[node["lengths_payload"]] if node.get("lengths_payload") else None
        out: list[Any] = []
        for r in range(rows):
            if missing is not None and bool(missing[r]):
                out.append(MISSING)
            elif mask is not None and not bool(mask[r]):
                out.append(None)
            elif node["node_type"] == "dict":
                item = {}
                for child in node["children"]:
                    v = columns[_child_path(node, child)][r]
                    if not isinstance(v, _Missing):
                        item[child] = v
                out.append(item)
            else:
                length = int(lengths[r]) if lengths is not None else len(node["children"])
                lst: list[Any] = [None] * length
                for child in node["children"]:
                    if int(child) < length:
                        v = columns[_child_path(node, child)][r]
                        if not isinstance(v, _Missing):
                            lst[int(child)] = v
                out.append(lst)
        columns[node["path"]] = out
    return columns[metadata["root_path"]]


# --------------------------------------------------------------------------------
# whole columns
# --------------------------------------------------------------------------------


def _normalize_scalar(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return _normalize_scalar(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _normalize_scalar(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_normalize_scalar(v) for v in value]
    return value


def encode_with_schema(
    path: str, values: list[Any], codec: str, hints: Mapping[str, Any]
) -> EncodedLeaf:
    """A column with an explicit codec (a FieldSchema), no inference.

    Raises:
        ValueError: unknown codec, or values that do not fit it.
    """
    if codec == "auto":
        return encode_fallback(path, values)
    if codec == "ragged_tensor_dict":
        return encode_ragged_tensor_dict(values, hints.get("keys"))
    if codec == "ndarray":
        dtype = schema_dtype(hints)
        if dtype is None:
            return encode_fallback(path, values)
        payload, metadata = encode_scalars(values, dtype)
        return EncodedLeaf(codec, len(values), payload, metadata)
    if codec == "typed_ragged":
        payload, metadata = encode_typed_ragged(values, schema_dtype(hints))
        return EncodedLeaf(codec, len(values), payload, metadata)
    if codec not in {
        "ragged_tensor",
        "bytes_ragged",
        "media_bytes",
        "media_list_ragged",
        "utf8_ragged",
        "msgpack_ragged",
        "json_ragged",
    }:
        raise ValueError(f"unsupported schema codec: {codec!r}")
    payload, metadata = _encode_rows(codec, values, {}, path)
    return EncodedLeaf(codec, len(values), payload, metadata)


def schema_dtype(hints: Mapping[str, Any]) -> np.dtype[Any] | None:
    """A schema's ``dtype`` hint, which must be numeric or bool.

    Raises:
        ValueError: not a numpy dtype, or not numeric.
    """
    name = hints.get("dtype")
    if name is None:
        return None
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid FieldSchema metadata['dtype']: {name!r}") from exc
    if dtype.kind not in "biufc":
        raise ValueError(f"FieldSchema metadata['dtype'] must be numeric or bool, got {dtype}")
    return cast("np.dtype[Any]", dtype)


def encode_fallback(path: str, values: list[Any]) -> EncodedLeaf:
    """Nested expansion when it helps, else the inferred codec, then msgpack,
    then JSON.

    Raises:
        ValueError: nothing could encode the column (the attempts are listed).
    """
    errors: list[str] = []
    try:
        leaves: list[InferredLeaf] = []
        nodes: list[InferredNode] = []
        infer_structure(path, values, leaves, nodes)
        if nodes and any(_leaf_is_nested_data(leaf) for leaf in leaves):
            return encode_recursive(path, values, leaves, nodes, with_schema=True)
    except FALLBACK_ERRORS as exc:
        errors.append(f"structured_recursive: {exc}")
    decision = choose_leaf_codec(values)
    for codec in dict.fromkeys([decision.codec, "msgpack_ragged", "json_ragged"]):
        column = (
            [_normalize_scalar(v) for v in values]
            if codec in {"msgpack_ragged", "json_ragged"}
            else values
        )
        try:
            return encode_with_schema(
                path, column, codec, decision.metadata if codec == decision.codec else {}
            )
        except FALLBACK_ERRORS as exc:
            errors.append(f"{codec}: {exc}")
    raise ValueError(
        f"unable to infer a safe codec for structured non-tensor field {path!r}; tried {errors}"
    )


def encode_column(path: str, values: list[Any]) -> EncodedLeaf:
    """An inferred column (no schema): nested rows with tensors/bytes are
    expanded, anything else takes its inferred codec.

    Raises:
        ValueError: no codec fits.
    """
    leaves: list[InferredLeaf] = []
    nodes: list[InferredNode] = []
    infer_structure(path, values, leaves, nodes)
    if nodes and any(_leaf_is_nested_data(leaf) for leaf in leaves):
        return encode_recursive(path, values, leaves, nodes, with_schema=False)
    return encode_leaf(values, choose_leaf_codec(values))


def decode_column(encoded: Mapping[str, Any], payload: Mapping[str, Any], rows: int) -> list[Any]:
    """The rows of an encoded column (``{codec, metadata, ...}``) from its payloads."""
    codec = encoded.get("codec")
    metadata = encoded.get("metadata") or {}
    if codec == "ragged_tensor_dict":
        return decode_ragged_tensor_dict(payload, rows, metadata)
    if codec == "structured_recursive":
        return decode_recursive(metadata, payload, rows)
    return decode_leaf(str(codec), payload, rows, metadata)
