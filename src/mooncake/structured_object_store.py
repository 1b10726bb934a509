"""``mooncake.structured_object_store``: structured objects and DataProtos over a store.

The reference's pure-Python layer over ``MooncakeDistributedStore`` (or any
object with ``put``/``get``/``remove``), with the same public API, errors and
stored formats, so objects written by either implementation read on the
other:

* :class:`MooncakeBundleTransfer` ``put_bundle``/``remove_bundle``: metadata
  bytes plus named buffers (the bundle layout is described in
  ``mooncake._sos_bundle``);
* ``put_structured_object``/``put_object`` + ``read_spec``/``materialize``/
  ``materialize_into``/``get_object``: JSON metadata plus typed members —
  numpy arrays (dtype/shape kept, readable by row range or into a caller's
  array), torch tensors (Mooncake tensor objects: the 304-byte "MOON" header
  then the elements; 0-d ones as ``torch.save`` bytes; jagged nested tensors as
  their parts), bytes;
* DataProto helpers (``put``/``get`` with ``type="dataproto"`` or ``"dict"``,
  ``put_dataproto``/``get_dataproto``/``append_dataproto_fields``/
  ``cleanup_dataproto``/``dataproto_manifest_view``): a batch stored as one
  structured object per *stage*; tensor fields are members, object columns
  (``non_tensor_batch``) go through the column codecs of
  ``mooncake._sos_codecs``; rows can be read by slice or index list without
  reading the rest (ranged reads);
* :func:`export_dataproto_ref`/:func:`import_dataproto_ref`: a JSON-safe handle
  to pass a stored DataProto between processes.

numpy and msgpack are needed (``pip install 'pymooncake[structured]'``), torch
for tensor members.  Differences from the reference: there is no native
fast-copy extension (``_concat_arrays_into`` is None; multi-part payloads are
copied part by part into pool leases, which is what the reference does
without the extension), and DataProto row selections by slice with a step
other than 1 work for every field kind (the reference refuses them for
tensors and encoded columns).
"""

from __future__ import annotations

import ctypes
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

try:
    import numpy as np
except ImportError as exc:  # pragma: no cover - the structured extra brings it
    raise ImportError(
        "mooncake.structured_object_store needs numpy and msgpack: "
        "pip install 'pymooncake[structured]'"
    ) from exc

from . import _sos_bundle as _bundle
from . import _sos_codecs as _codecs
from ._sos_bundle import (
    AUTO_PARALLEL_MIN_BYTES,
    AUTO_PARALLEL_MIN_CHUNKS,
    DEFAULT_BUNDLE_CHUNK_BYTES,
    MISSING_OBJECT_ERROR,
    BundleManifestStore,
    BundleStore,
    BundleTransferPolicy,
    PayloadTransport,
    RemoteBundleRef,
)
from ._sos_codecs import MISSING, PartsPayload, infer_structure

_torch: Any
try:
    import torch as _torch
except ImportError:  # pragma: no cover - optional
    _torch = None

__all__ = [
    "AUTO_PARALLEL_MIN_BYTES",
    "AUTO_PARALLEL_MIN_CHUNKS",
    "DATAPROTO_REF_HANDLE_TYPE",
    "DATAPROTO_REF_HANDLE_VERSION",
    "DEFAULT_BUNDLE_CHUNK_BYTES",
    "MISSING",
    "MISSING_OBJECT_ERROR",
    "STORAGE_GROUP_ID",
    "STRUCTURED_FIELD_SPECS_KEY",
    "BundleStore",
    "BundleTransferPolicy",
    "FieldSchema",
    "MooncakeBundleTransfer",
    "MooncakeDataProtoRef",
    "RemoteBundleRef",
    "StructuredFieldLocation",
    "StructuredMemberSlice",
    "StructuredObjectPayload",
    "StructuredObjectReadSpec",
    "StructuredObjectResult",
    "export_dataproto_ref",
    "export_ref",
    "import_dataproto_ref",
    "import_ref",
    "infer_structure",
    "is_dataproto_ref_handle",
    "raw_destination",
    "tensor_object_buffer",
]

STRUCTURED_FIELD_SPECS_KEY = "__mooncake_structured_fields__"
DATAPROTO_REF_HANDLE_TYPE = "mooncake_dataproto_ref"
DATAPROTO_REF_HANDLE_VERSION = 1
#: optional field of a v1 handle (readers that predate it ignore it)
STORAGE_GROUP_ID = "storage_group_id"
_WRAPPED_OBJECT = "__mooncake_wrapped_object__"
_SECTIONS = frozenset({"batch", "non_tensor_batch", "meta_info"})
_BYTES_CODECS = frozenset(
    {"media_bytes", "bytes_ragged", "utf8_ragged", "msgpack_ragged", "json_ragged"}
)

#: pymooncake has no native fast-copy extension (see the module docstring)
_concat_arrays_into = None

# the reference's private names, for code (and its tests) that reach for them
_MultiBufferPayload = PartsPayload
_DirectCopyPayload = _bundle.DirectCopyPayload
_TensorPayload = _bundle.TensorPayload
_TensorObjectBufferPayload = _bundle.TensorObjectBuffer
_RawDestinationBuffer = _bundle.RawDestination
_PoolBackedNdarray = _bundle.PoolBackedNdarray
_config_for_grouped_keys = _bundle.config_for_grouped_keys
_choose_leaf_codec = _codecs.choose_leaf_codec
_escape_key = _codecs.escape_key
_encode_msgpack_ragged_values = _codecs.encode_msgpack_rows
_decode_msgpack_ragged_values = _codecs.decode_msgpack_rows
_encode_typed_ragged_values = _codecs.encode_typed_ragged
_decode_typed_ragged_values = _codecs.decode_typed_ragged
_encode_typed_ragged_regular_ndarray_rows = _codecs.encode_regular_ndarray_rows


def _decode_manifest(payload: bytes | bytearray | memoryview) -> dict[str, Any]:
    return _bundle.decode_json(payload, "bundle manifest")


def _has_tensor_codec_helpers() -> bool:
    """Whether tensors can be written as Mooncake tensor objects (torch present)."""
    return _bundle.tensor_helpers_available()


# --------------------------------------------------------------------------------
# public types
# --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldSchema:
    """A codec hint for a DataProto field (no inference for it).

    ``codec``: a column codec name or ``auto``; ``metadata``: codec hints
    (``dtype``, ``keys``) and ``section`` (``batch``, ``non_tensor_batch`` or
    ``meta_info``) to pin a flat-dict field to a section.
    """

    codec: str
    nullable: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, init=False)
class StructuredObjectPayload:
    """A structured object to store: JSON metadata plus named members."""

    metadata: Mapping[str, Any]
    buffers: Mapping[str, Any]

    def __init__(
        self, metadata: Mapping[str, Any] | None = None, buffers: Mapping[str, Any] | None = None
    ) -> None:
        if buffers is None:
            raise TypeError("StructuredObjectPayload requires buffers")
        object.__setattr__(self, "metadata", {} if metadata is None else metadata)
        object.__setattr__(self, "buffers", buffers)


@dataclass
class StructuredObjectResult:
    """A materialized structured object: its metadata and the members read."""

    metadata: dict[str, Any]
    objects: dict[str, Any]


@dataclass(frozen=True)
class StructuredFieldLocation:
    """Where a DataProto field lives: a stage's structured object and member."""

    stage: str
    member: str
    section: Literal["batch", "non_tensor_batch"]


@dataclass
class MooncakeDataProtoRef:
    """A stored DataProto: its stages, fields, meta_info and codecs."""

    batch_size: int
    stage_refs: dict[str, RemoteBundleRef]
    field_index: dict[str, StructuredFieldLocation]
    meta_info: dict[str, Any]
    namespace: str = "default"
    partition: str = "default"
    global_indexes: list[int] | None = None
    encoded_non_tensor: dict[str, Any] = field(default_factory=dict)
    _storage_group_id: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class StructuredMemberSlice:
    """Rows ``start:end:step`` of a member along ``axis`` (only 0 is supported)."""

    axis: int
    start: int
    end: int
    step: int = 1


@dataclass(frozen=True)
class StructuredObjectReadSpec:
    """What to read of a structured object: members (all when None) and slices."""

    ref: RemoteBundleRef | Mapping[str, Any]
    member_names: tuple[str, ...] | None = None
    member_slices: tuple[tuple[str, StructuredMemberSlice], ...] = ()

    def select_members(self, names: Sequence[str] | None) -> StructuredObjectReadSpec:
        """A spec reading only ``names`` (all members when None)."""
        return StructuredObjectReadSpec(
            self.ref, None if names is None else tuple(names), self.member_slices
        )

    def slice_member(
        self, name: str, axis: int, start: int, end: int, step: int = 1
    ) -> StructuredObjectReadSpec:
        """A spec reading rows ``start:end:step`` of member ``name``."""
        slices = dict(self.member_slices)
        slices[name] = StructuredMemberSlice(axis=axis, start=start, end=end, step=step)
        return StructuredObjectReadSpec(self.ref, self.member_names, tuple(slices.items()))

    def member_slice(self, name: str) -> StructuredMemberSlice | None:
        return dict(self.member_slices).get(name)


def tensor_object_buffer(
    ptr: int, size: int, owner: Any = None, batch_size: int | None = None
) -> _bundle.TensorObjectBuffer:
    """Caller memory holding (or receiving) a whole tensor object: header and
    data.  As a member it is written with ``put_from``; as a destination it is
    read into.  ``owner`` is kept alive with it; ``batch_size`` makes it a
    DataProto batch field."""
    return _bundle.TensorObjectBuffer(int(ptr), int(size), owner, batch_size)


def raw_destination(
    ptr: int, size: int, owner: Any = None, *, pre_registered: bool = False
) -> _bundle.RawDestination:
    """Caller memory to read a member into (``pre_registered``: registered
    with the store already, so reads land in it directly)."""
    return _bundle.RawDestination(int(ptr), int(size), owner, pre_registered)


# --------------------------------------------------------------------------------
# DataProto handles
# --------------------------------------------------------------------------------

DataProtoRefLike = MooncakeDataProtoRef | Mapping[str, Any]


def is_dataproto_ref_handle(value: Any) -> bool:
    return isinstance(value, Mapping) and value.get("type") == DATAPROTO_REF_HANDLE_TYPE


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    raise TypeError(
        f"DataProto ref handles support only JSON-safe values, got {type(value).__name__}"
    )


def export_dataproto_ref(ref: MooncakeDataProtoRef) -> dict[str, Any]:
    """A JSON-safe handle of ``ref`` (manifest keys, fields, meta_info, codecs).

    Raises:
        TypeError: not a ref, or meta_info that JSON cannot hold.
    """
    if not isinstance(ref, MooncakeDataProtoRef):
        raise TypeError(f"expected MooncakeDataProtoRef, got {type(ref).__name__}")
    handle: dict[str, Any] = {
        "type": DATAPROTO_REF_HANDLE_TYPE,
        "version": DATAPROTO_REF_HANDLE_VERSION,
        "kind": "bundle_stages",
        "batch_size": int(ref.batch_size),
        "namespace": ref.namespace,
        "partition": ref.partition,
        "global_indexes": _json_safe(ref.global_indexes),
        "stage_refs": {s: {"manifest_key": r.manifest_key} for s, r in ref.stage_refs.items()},
        "field_index": {
            name: {"stage": loc.stage, "member": loc.member, "section": loc.section}
            for name, loc in ref.field_index.items()
        },
        "meta_info": _json_safe(ref.meta_info),
        "encoded_non_tensor": _json_safe(ref.encoded_non_tensor),
    }
    if ref._storage_group_id is not None:
        handle[STORAGE_GROUP_ID] = ref._storage_group_id
    json.dumps(handle, ensure_ascii=False)
    return handle


def _mapping(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"DataProto ref handle {name} must be a mapping")
    return value


def _nonempty(*values: Any) -> bool:
    return all(isinstance(v, str) and v for v in values)


def import_dataproto_ref(handle: Mapping[str, Any]) -> MooncakeDataProtoRef:
    """The ref of a handle from :func:`export_dataproto_ref` (version 1, or the
    transitional 2 that requires ``storage_group_id``).

    Raises:
        ValueError: not a handle, or a malformed one.
    """
    if not is_dataproto_ref_handle(handle):
        raise ValueError("not a Mooncake DataProto ref handle")
    version = int(handle.get("version", -1))
    if version not in (DATAPROTO_REF_HANDLE_VERSION, 2):
        raise ValueError(f"unsupported DataProto ref handle version: {handle.get('version')!r}")
    if handle.get("kind") != "bundle_stages":
        raise ValueError(f"unsupported DataProto ref handle kind: {handle.get('kind')!r}")
    stage_refs: dict[str, RemoteBundleRef] = {}
    for stage, raw in _mapping(handle.get("stage_refs"), "stage_refs").items():
        key = _mapping(raw, f"stage_refs[{stage!r}]").get("manifest_key")
        if not isinstance(stage, str) or not isinstance(key, str) or not _nonempty(stage, key):
            raise ValueError(
                "DataProto ref handle stage refs must contain non-empty string names and "
                "manifest_key values"
            )
        stage_refs[stage] = RemoteBundleRef(manifest_key=key, manifest={})
    field_index: dict[str, StructuredFieldLocation] = {}
    for name, raw in _mapping(handle.get("field_index"), "field_index").items():
        loc = _mapping(raw, f"field_index[{name!r}]")
        section = loc.get("section")
        if section not in ("batch", "non_tensor_batch"):
            raise ValueError(f"invalid DataProto field section: {section!r}")
        where: Any = loc.get("stage")
        member: Any = loc.get("member")
        if (
            not isinstance(where, str)
            or not isinstance(member, str)
            or not _nonempty(name, where, member)
        ):
            raise ValueError("DataProto ref handle field locations must be non-empty strings")
        if where not in stage_refs:
            raise ValueError(
                f"DataProto ref handle field {name!r} references unknown stage {where!r}"
            )
        field_index[name] = StructuredFieldLocation(where, member, section)
    group = handle.get(STORAGE_GROUP_ID)
    if (version == 2 and group is None) or (group is not None and not _nonempty(group)):
        raise ValueError("DataProto ref handle has invalid storage_group_id")
    indexes = handle.get("global_indexes")
    if indexes is not None:
        if not isinstance(indexes, list) or any(
            isinstance(i, bool) or not isinstance(i, int) for i in indexes
        ):
            raise ValueError(
                "DataProto ref handle global_indexes must be a list of integers or null"
            )
        indexes = list(indexes)
    return MooncakeDataProtoRef(
        batch_size=int(handle["batch_size"]),
        stage_refs=stage_refs,
        field_index=field_index,
        meta_info=dict(_mapping(handle.get("meta_info", {}), "meta_info")),
        namespace=str(handle.get("namespace", "default")),
        partition=str(handle.get("partition", "default")),
        global_indexes=indexes,
        encoded_non_tensor=dict(
            _mapping(handle.get("encoded_non_tensor", {}), "encoded_non_tensor")
        ),
        _storage_group_id=group,
    )


export_ref = export_dataproto_ref
import_ref = import_dataproto_ref


def _resolve_ref(ref: DataProtoRefLike) -> MooncakeDataProtoRef:
    if isinstance(ref, MooncakeDataProtoRef):
        return ref
    if is_dataproto_ref_handle(ref):
        return import_dataproto_ref(ref)
    raise TypeError(f"expected MooncakeDataProtoRef or DataProto handle, got {type(ref).__name__}")


# --------------------------------------------------------------------------------
# member encoding
# --------------------------------------------------------------------------------


def _torch_field(value: Any) -> tuple[dict[str, Any], Any]:
    if value.is_nested:
        if value.layout != _torch.jagged:
            raise ValueError("structured nested tensor fields require torch.jagged layout")
        return _nested_field(value)
    return {
        "encoding": "torch_tensor",
        "dtype": str(value.dtype),
        "shape": list(value.shape),
        "element_size": int(value.element_size()),
    }, _bundle.TensorPayload(value)


def _nested_field(value: Any) -> tuple[dict[str, Any], Any]:
    """A jagged nested tensor: its values, offsets (and lengths) as tensor
    objects back to back (``tensor_parts``), or torch.save bytes."""
    spec: dict[str, Any] = {
        "encoding": "torch_tensor",
        "dtype": str(value.dtype),
        "nested": True,
        "format": "torch_save",
    }
    lengths = value.lengths()
    tensors = [value.values(), value.offsets(), *([] if lengths is None else [lengths])]
    if _has_tensor_codec_helpers() and all(t.device.type == "cpu" for t in tensors):
        parts = [_bundle.tensor_object_bytes(t)[0] for t in tensors]
        spec.update(
            format="tensor_parts",
            part_bytes=[len(p) for p in parts],
            has_lengths=lengths is not None,
            ragged_idx=int(getattr(value, "_ragged_idx", 1)),
        )
        return spec, PartsPayload(tuple(memoryview(p) for p in parts))
    return spec, memoryview(_bundle.torch_save_bytes(value))


def _nested_from_bytes(payload: bytes, spec: Mapping[str, Any]) -> Any:
    fmt = spec.get("format", "torch_save")
    if fmt == "torch_save":
        return _bundle.torch_load_bytes(payload)
    if fmt != "tensor_parts":
        raise ValueError(f"unsupported nested tensor payload format: {fmt}")
    sizes = spec.get("part_bytes")
    expected = 3 if spec.get("has_lengths") else 2
    if not isinstance(sizes, list) or len(sizes) != expected:
        raise ValueError("nested tensor payload has invalid part metadata")
    tensors, pos = [], 0
    for size in sizes:
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError("nested tensor payload has invalid part size")
        if pos + size > len(payload):
            raise ValueError("nested tensor payload is truncated")
        tensors.append(_bundle.tensor_from_object(payload[pos : pos + size]))
        pos += size
    if pos != len(payload):
        raise ValueError("nested tensor payload has trailing bytes")
    return _torch.nested.nested_tensor_from_jagged(
        tensors[0],
        offsets=tensors[1],
        lengths=tensors[2] if expected == 3 else None,
        jagged_dim=int(spec.get("ragged_idx", 1)),
    )


def _nested_rows(value: Any, indices: Sequence[int]) -> Any:
    rows = value.unbind()
    chosen = [rows[int(i)] for i in indices]
    if chosen:
        result = _torch.nested.as_nested_tensor(chosen, layout=value.layout)
    else:
        offsets = _torch.zeros(1, dtype=value.offsets().dtype, device=value.offsets().device)
        result = _torch.nested.nested_tensor_from_jagged(value.values()[:0], offsets=offsets)
    if hasattr(value, "_ragged_idx"):
        result._ragged_idx = value._ragged_idx
    return result


def _encode_member(value: Any) -> tuple[dict[str, Any], Any]:
    """(field spec, what the bundle stores) of one member."""
    if isinstance(value, _bundle.TensorObjectBuffer):
        return {"encoding": "torch_tensor"}, value
    if isinstance(value, _bundle.TensorPayload):
        return _torch_field(value.tensor)
    if isinstance(value, (PartsPayload, _bundle.DirectCopyPayload)):
        if value.dtype is not None and value.shape is not None:
            return {"encoding": "ndarray", "dtype": value.dtype, "shape": list(value.shape)}, value
        return {"encoding": "bytes"}, value
    if _torch is not None and isinstance(value, _torch.Tensor):
        return _torch_field(value)
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        return {
            "encoding": "ndarray",
            "dtype": array.dtype.str,
            "shape": list(array.shape),
        }, array.view(np.uint8).reshape(-1)
    return {"encoding": "bytes"}, value


def _encode_members(
    metadata: Mapping[str, Any], members: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    if not isinstance(metadata, Mapping):
        raise TypeError("structured metadata must be a mapping")
    meta = dict(metadata)
    if STRUCTURED_FIELD_SPECS_KEY in meta:
        raise ValueError(f"structured metadata key {STRUCTURED_FIELD_SPECS_KEY!r} is reserved")
    if not isinstance(meta.get("layout", "structured"), str):
        raise ValueError("structured metadata layout must be a string")
    meta.setdefault("layout", "structured")
    specs: dict[str, Any] = {}
    stored: dict[str, Any] = {}
    for name, value in members.items():
        _bundle.validate_key_segment(name, "buffer name")
        specs[name], stored[name] = _encode_member(value)
    if specs:
        meta[STRUCTURED_FIELD_SPECS_KEY] = specs
    return meta, stored


def _field_specs(metadata: Mapping[str, Any]) -> dict[str, Any]:
    specs = metadata.get(STRUCTURED_FIELD_SPECS_KEY, {})
    if not isinstance(specs, dict):
        raise ValueError("structured field specs must be a dict")
    return specs


def _decode_metadata(payload: bytes) -> dict[str, Any]:
    return _bundle.decode_json(payload, "structured metadata")


# --------------------------------------------------------------------------------
# row plans
# --------------------------------------------------------------------------------


def _slice_bounds(member_slice: StructuredMemberSlice, total: int) -> tuple[int, int, int]:
    if member_slice.step <= 0:
        raise ValueError("structured ndarray slicing step must be positive")
    return slice(member_slice.start, member_slice.end, member_slice.step).indices(total)


def _slice_count(member_slice: StructuredMemberSlice, total: int) -> int:
    start, end, step = _slice_bounds(member_slice, total)
    return 0 if start >= end else 1 + (end - 1 - start) // step


def _row_ranges(
    indices: Sequence[int], width: int, src_base: int = 0, dst_base: int = 0
) -> list[tuple[int, int, int]]:
    """``(source, destination, size)`` byte ranges gathering rows ``indices``
    of ``width`` bytes, neighbours merged into one range."""
    ranges: list[tuple[int, int, int]] = []
    if width == 0:
        return ranges
    for out, row in enumerate(indices):
        src, dst = src_base + row * width, dst_base + out * width
        if ranges and ranges[-1][0] + ranges[-1][2] == src and ranges[-1][1] + ranges[-1][2] == dst:
            ranges[-1] = (ranges[-1][0], ranges[-1][1], ranges[-1][2] + width)
        else:
            ranges.append((src, dst, width))
    return ranges


def _pointer_array(
    ptr: int, nbytes: int, dtype: np.dtype[Any], shape: tuple[int, ...]
) -> np.ndarray:
    raw = (ctypes.c_uint8 * nbytes).from_address(ptr)
    return np.ctypeslib.as_array(raw).view(dtype).reshape(shape)


def _destination_array(
    name: str, dest: Any, dtype: np.dtype[Any], shape: tuple[int, ...]
) -> np.ndarray:
    """The array a member is read into: new, the caller's (checked), or over
    a raw destination.

    Raises:
        TypeError: an unsupported destination.
        ValueError: wrong dtype/shape/size, not C-contiguous or read-only.
    """
    if dest is None:
        return np.empty(shape, dtype=dtype)
    if isinstance(dest, _bundle.RawDestination):
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if dest.size < nbytes:
            raise ValueError(f"raw destination has {dest.size} bytes, expected at least {nbytes}")
        return _pointer_array(dest.ptr, nbytes, dtype, shape)
    if not isinstance(dest, np.ndarray):
        raise TypeError(
            f"structured ndarray field {name} destination must be a numpy.ndarray or raw_destination"
        )
    if dest.dtype != dtype:
        raise ValueError(
            f"structured ndarray field {name} destination dtype mismatch: expected {dtype.str}, "
            f"got {dest.dtype.str}"
        )
    if tuple(dest.shape) != shape:
        raise ValueError(
            f"structured ndarray field {name} destination shape mismatch: expected {shape}, "
            f"got {tuple(dest.shape)}"
        )
    if not dest.flags["C_CONTIGUOUS"]:
        raise ValueError(f"structured ndarray field {name} destination must be C-contiguous")
    if not dest.flags["WRITEABLE"]:
        raise ValueError(f"structured ndarray field {name} destination must be writeable")
    return dest


@dataclass(frozen=True)
class _RowSelection:
    count: int
    member_slice: StructuredMemberSlice | None = None
    indices: tuple[int, ...] | None = None


def _row_selection(rows: Any, total: int) -> _RowSelection | None:
    """Raises:
    TypeError: not a slice, StructuredMemberSlice or index sequence.
    ValueError: axis other than 0 or step not positive.
    IndexError: an index out of range.
    """
    if rows is None:
        return None
    if isinstance(rows, StructuredMemberSlice):
        if rows.axis != 0:
            raise ValueError("DataProto row slicing currently supports axis=0 only")
        return _RowSelection(_slice_count(rows, total), member_slice=rows)
    if isinstance(rows, slice):
        start, end, step = rows.indices(total)
        if step <= 0:
            raise ValueError("DataProto row slicing step must be positive")
        member_slice = StructuredMemberSlice(0, start, end, step)
        return _RowSelection(_slice_count(member_slice, total), member_slice=member_slice)
    if isinstance(rows, Sequence) and not isinstance(rows, (str, bytes, bytearray)):
        indices = []
        for index in rows:
            if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
                raise TypeError("DataProto row indices must be integers")
            row = int(index) + (total if int(index) < 0 else 0)
            if not 0 <= row < total:
                raise IndexError(f"DataProto row index {index} out of range for {total} rows")
            indices.append(row)
        return _RowSelection(len(indices), indices=tuple(indices))
    raise TypeError("DataProto rows must be a slice, StructuredMemberSlice, or row index sequence")


# --------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------


class _OwnerBackedList(list[Any]):
    def __init__(self, values: Sequence[Any], owner: Any) -> None:
        super().__init__(values)
        self._mooncake_pool_owner = owner


class _OwnerBackedObjectArray(np.ndarray):
    """An object column whose rows are views of pool memory (the owner goes with it)."""

    _mooncake_pool_owner: Any

    def __array_finalize__(self, obj: Any) -> None:
        if obj is not None:
            self._mooncake_pool_owner = getattr(obj, "_mooncake_pool_owner", None)

    def tolist(self) -> Any:
        values = super().tolist()
        owner = getattr(self, "_mooncake_pool_owner", None)
        return values if owner is None else _OwnerBackedList(values, owner)


def _object_column(values: list[Any]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    owner = getattr(values, "_mooncake_pool_owner", None) or next(
        (getattr(v, "_mooncake_pool_owner", None) for v in values if v is not None), None
    )
    if owner is None:
        return array
    column = array.view(_OwnerBackedObjectArray)
    column._mooncake_pool_owner = owner
    return column


def _release_result(result: Any) -> None:
    released: set[int] = set()
    visited: set[int] = set()

    def visit(value: Any) -> None:
        owner = getattr(value, "_mooncake_pool_owner", None)
        if owner is not None:
            if id(owner) not in released:
                released.add(id(owner))
                owner.release()
            return
        if isinstance(value, Mapping):
            items: Any = value.values()
        elif isinstance(value, (list, tuple)):
            items = value
        elif isinstance(value, np.ndarray) and value.dtype == object:
            items = value.flat
        else:
            return
        if id(value) in visited:
            return
        visited.add(id(value))
        for item in items:
            visit(item)

    visit(result)


# --------------------------------------------------------------------------------
# DataProto sections
# --------------------------------------------------------------------------------


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    items = getattr(value, "items", None)
    if callable(items):
        return dict(items())
    raise TypeError(f"expected mapping-like value, got {type(value).__name__}")


def _split_dataproto(data: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(batch, non_tensor_batch, meta_info) of a DataProto-like object, an
    envelope dict, or a plain dict (all batch fields)."""
    if isinstance(data, Mapping):
        envelope = (
            bool(data)
            and set(data) <= _SECTIONS
            and all(
                v is None or isinstance(v, Mapping) or callable(getattr(v, "items", None))
                for v in data.values()
            )
        )
        if envelope:
            return (
                _as_dict(data.get("batch")),
                _as_dict(data.get("non_tensor_batch")),
                _as_dict(data.get("meta_info")),
            )
        return dict(data), {}, {}
    return (
        _as_dict(getattr(data, "batch", None)),
        _as_dict(getattr(data, "non_tensor_batch", None)),
        _as_dict(getattr(data, "meta_info", None)),
    )


def _schema_section(name: str, schema: FieldSchema) -> str | None:
    section: str | None = schema.metadata.get("section")
    if section is not None and section not in _SECTIONS:
        raise ValueError(
            f"FieldSchema for {name!r} metadata['section'] must be one of {sorted(_SECTIONS)}"
        )
    return section


def _schema_for(
    schemas: Mapping[str, FieldSchema] | None, name: str, section: str
) -> FieldSchema | None:
    schema = (schemas or {}).get(name)
    if schema is None:
        return None
    declared = _schema_section(name, schema)
    return schema if declared in (None, section) else None


def _check_schema_sections(
    sections: Mapping[str, Mapping[str, Any]], schemas: Mapping[str, FieldSchema] | None
) -> None:
    if not schemas:
        return
    where: dict[str, set[str]] = {}
    for section, fields in sections.items():
        for name in fields:
            where.setdefault(name, set()).add(section)
    for name, schema in schemas.items():
        declared = _schema_section(name, schema)
        actual = where.get(name)
        if declared is None or not actual or declared in actual:
            continue
        found = ", ".join(repr(s) for s in sorted(actual))
        raise ValueError(
            f"FieldSchema for {name!r} declares section {declared!r}, but data contains it in {found}"
        )


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


def _is_dense(value: Any) -> bool:
    if _torch is not None and isinstance(value, _torch.Tensor):
        return bool(value.ndim > 0)
    return isinstance(value, np.ndarray) and value.dtype != object and value.ndim > 0


def _is_dense_rows(value: Any, rows: int) -> bool:
    return rows > 0 and _is_dense(value) and len(value) == rows


def _field_len(name: str, value: Any) -> int:
    try:
        return len(value)
    except TypeError as exc:
        raise ValueError(f"flat dict row-aligned field {name!r} must be sized") from exc


def _object_array(values: Sequence[Any]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = list(values)
    return array


def _flat_column(name: str, value: Any, rows: int, schema: FieldSchema | None) -> Any:
    if (isinstance(value, np.ndarray) or _is_sequence(value)) and len(value) != rows:
        raise ValueError(
            f"flat dict non_tensor_batch field {name!r} has batch size {len(value)}, expected {rows}"
        )
    if isinstance(value, np.ndarray):
        dtype = None if schema is None else _codecs.schema_dtype(schema.metadata)
        if (
            schema is not None
            and schema.codec == "ndarray"
            and dtype is not None
            and (value.dtype != object or all(v is not None for v in value))
        ):
            return np.asarray(value, dtype=dtype)
        return value
    if _is_sequence(value):
        return _object_array(value)
    raise TypeError(
        f"flat dict non_tensor_batch field {name!r} must be an ndarray or non-string sequence"
    )


def _flat_dict_rows(data: Mapping[str, Any], schemas: Mapping[str, FieldSchema]) -> int:
    pinned = {
        _field_len(n, data[n])
        for n, s in schemas.items()
        if n in data and _schema_section(n, s) in ("batch", "non_tensor_batch")
    }
    if len(pinned) > 1:
        raise ValueError(f"flat dict fields have inconsistent batch sizes: {sorted(pinned)}")
    if pinned:
        return pinned.pop()
    meta = {n for n, s in schemas.items() if n in data and _schema_section(n, s) == "meta_info"}
    dense = {len(v) for n, v in data.items() if n not in meta and _is_dense(v)}
    if len(dense) > 1:
        raise ValueError(f"flat dict dense fields have ambiguous batch sizes: {sorted(dense)}")
    if dense:
        return dense.pop()
    sized = {
        len(v)
        for n, v in data.items()
        if n not in meta and ((isinstance(v, np.ndarray) and v.ndim > 0) or _is_sequence(v))
    }
    if len(sized) > 1:
        raise ValueError(
            f"flat dict fields have ambiguous batch sizes: {sorted(sized)}; "
            "pass FieldSchema metadata['section'] for list-valued metadata fields"
        )
    return sized.pop() if sized else 0


def _flat_dict_to_envelope(
    data: Any, schemas: Mapping[str, FieldSchema] | None
) -> dict[str, dict[str, Any]]:
    """A flat dict split into sections: row-aligned dense arrays/tensors are
    batch fields, row-aligned lists non_tensor_batch columns, anything else
    meta_info (``FieldSchema.metadata['section']`` overrides)."""
    if not isinstance(data, Mapping):
        raise TypeError("flat dict payload must be a mapping")
    schemas = schemas or {}
    pinned_rows = bool(
        any(
            n in data and _schema_section(n, s) in ("batch", "non_tensor_batch")
            for n, s in schemas.items()
        )
    )
    rows = _flat_dict_rows(data, schemas)
    out: dict[str, dict[str, Any]] = {"batch": {}, "non_tensor_batch": {}, "meta_info": {}}
    for key, value in data.items():
        schema = schemas.get(key)
        section = None if schema is None else _schema_section(key, schema)
        if section is None:
            if _is_dense_rows(value, rows):
                section = "batch"
            elif not pinned_rows and _is_sequence(value) and len(value) == rows:
                section = "non_tensor_batch"
            else:
                section = "meta_info"
        if section == "non_tensor_batch":
            value = _flat_column(key, value, rows, schema)
        out[section][key] = value
    return out


def _envelope_to_flat_dict(data: Mapping[str, Any]) -> dict[str, Any]:
    """Raises:
    ValueError: a name in two sections.
    """
    meta, batch, columns = (
        _as_dict(data.get("meta_info")),
        _as_dict(data.get("batch")),
        _as_dict(data.get("non_tensor_batch")),
    )
    overlap = (set(meta) & set(batch)) | (set(meta) & set(columns)) | (set(batch) & set(columns))
    if overlap:
        raise ValueError(f"Duplicate keys found across DataProto sections: {sorted(overlap)}")
    out = {**meta, **batch}
    for name, value in columns.items():
        out[name] = (
            value.tolist() if isinstance(value, np.ndarray) and value.dtype == object else value
        )
    return out


def _build_result(
    batch: dict[str, Any], columns: dict[str, Any], meta: dict[str, Any], data_cls: Any
) -> Any:
    if data_cls is None or data_cls is dict:
        return {"batch": batch, "non_tensor_batch": columns, "meta_info": meta}
    try:
        from_dict = getattr(data_cls, "from_dict", None)
        if callable(from_dict):
            return from_dict(batch, columns, meta_info=meta)
        return data_cls(batch=batch, non_tensor_batch=columns, meta_info=meta)
    except TypeError as exc:
        raise TypeError(
            f"{getattr(data_cls, '__name__', data_cls)!r} cannot be constructed from batch, "
            "non_tensor_batch, and meta_info"
        ) from exc


def _batch_size(batch: Mapping[str, Any], columns: Mapping[str, Any]) -> int:
    sizes = {len(v) for section in (batch, columns) for v in section.values()}
    if len(sizes) > 1:
        raise ValueError(f"DataProto fields have inconsistent batch sizes: {sorted(sizes)}")
    return sizes.pop() if sizes else 0


def _encode_column(name: str, value: Any, schema: FieldSchema | None) -> _codecs.EncodedLeaf | None:
    """The encoded column of a non_tensor_batch field, or None to store it as
    a plain member (a typed ndarray without a schema).

    Raises:
        ValueError, TypeError: the rows do not fit the schema, or no codec fits.
    """
    path = f"non_tensor_batch.{name}"
    if schema is not None:
        try:
            if isinstance(value, np.ndarray):
                column = value
            elif _is_sequence(value):
                column = _object_array(value)
            else:
                raise TypeError(
                    f"non_tensor_batch field {name!r} with FieldSchema must be an ndarray or "
                    "non-string sequence"
                )
            if not schema.nullable and any(v is None for v in column):
                raise ValueError(f"FieldSchema for {path!r} is not nullable")
            if schema.codec != "auto":
                return _codecs.encode_with_schema(path, list(column), schema.codec, schema.metadata)
        except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise type(exc)(
                f"failed to encode non_tensor_batch field {name!r} with FieldSchema codec "
                f"{schema.codec!r}: {exc}"
            ) from exc
    if isinstance(value, np.ndarray) and value.dtype == object:
        return _codecs.encode_column(path, list(value))
    return None


def _merge_stage_metadata(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    if old.get("dataproto") != new.get("dataproto"):
        raise ValueError("DataProto stage metadata mismatch during manifest merge")
    merged = dict(old)
    specs = dict(_field_specs(old))
    added = _field_specs(new)
    clash = sorted(set(specs) & set(added))
    if clash:
        raise ValueError(f"structured members already exist: {clash}")
    specs.update(added)
    if specs:
        merged[STRUCTURED_FIELD_SPECS_KEY] = specs
    return merged


# --------------------------------------------------------------------------------
# a stage being read
# --------------------------------------------------------------------------------


class _Stage:
    """A structured object's manifest and metadata, read once, with the
    member readers."""

    def __init__(
        self, transfer: MooncakeBundleTransfer, ref: RemoteBundleRef | Mapping[str, Any]
    ) -> None:
        self.transfer = transfer
        self.ref = ref
        self.bundle = transfer._bundle_store
        self.manifest = self.bundle.resolve_manifest(ref)
        self.metadata = _decode_metadata(self.bundle.read_payload(self.manifest["meta"]))
        self.specs = _field_specs(self.metadata)

    def payload(self, member: str) -> Mapping[str, Any]:
        return self.manifest["buffers"][member]  # type: ignore[no-any-return]

    def spec(self, member: str) -> Mapping[str, Any]:
        return self.specs.get(member, {"encoding": "bytes"})  # type: ignore[no-any-return]

    # ---- whole members and slices

    def read(self, name: str, member_slice: StructuredMemberSlice | None, dest: Any) -> Any:
        spec = self.spec(name)
        encoding = spec.get("encoding", "bytes")
        if encoding == "bytes":
            return self._bytes(name, member_slice, dest)
        if encoding == "torch_tensor":
            return self._tensor(name, spec, member_slice, dest)
        if encoding != "ndarray":
            raise ValueError(f"unsupported structured field encoding: {encoding}")
        return self._ndarray(name, spec, member_slice, dest)

    def _bytes(self, name: str, member_slice: Any, dest: Any) -> Any:
        if member_slice is not None:
            raise ValueError(f"structured bytes member {name} does not support slicing")
        if dest is not None:
            raise ValueError(f"structured bytes member {name} does not support materialize_into")
        payload = self.payload(name)
        size = int(payload.get("bytes", 0))
        if size > 0:
            pooled = self.bundle.read_payload_range_into_pool_array(
                payload, np.dtype(np.uint8), (size,), 0
            )
            if pooled is not None:
                return pooled
        return self.bundle.read_payload(payload)

    def _dtype_shape(
        self, name: str, spec: Mapping[str, Any]
    ) -> tuple[np.dtype[Any], tuple[int, ...]]:
        dtype, shape = spec.get("dtype"), spec.get("shape")
        if not isinstance(dtype, str) or not isinstance(shape, list):
            raise ValueError(f"structured ndarray field {name} is missing dtype or shape")
        return np.dtype(dtype), tuple(int(d) for d in shape)

    def _ndarray(
        self,
        name: str,
        spec: Mapping[str, Any],
        member_slice: StructuredMemberSlice | None,
        dest: Any,
    ) -> np.ndarray:
        dtype, shape = self._dtype_shape(name, spec)
        payload = self.payload(name)
        if member_slice is None:
            offset, out_shape, step, cover = 0, shape, 1, 0
        else:
            if member_slice.axis != 0:
                raise ValueError("structured ndarray slicing currently supports axis=0 only")
            if not shape:
                raise ValueError("structured ndarray slicing requires at least one dimension")
            start, end, step = _slice_bounds(member_slice, shape[0])
            count = 0 if start >= end else 1 + (end - 1 - start) // step
            width = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
            offset = start * width
            out_shape = (count, *shape[1:])
            cover = 0 if count == 0 else (count - 1) * step + 1
        nbytes = int(np.prod(out_shape, dtype=np.int64)) * dtype.itemsize
        if dest is None and nbytes and step == 1:
            pooled = self.bundle.read_payload_range_into_pool_array(
                payload, dtype, out_shape, offset
            )
            if pooled is not None:
                return pooled
        target = _destination_array(name, dest, dtype, out_shape)
        if nbytes == 0:
            return target
        if step == 1:
            self.bundle.read_payload_range_into_destination(
                payload, target.view(np.uint8).reshape(-1), offset
            )
            return target
        temp = np.empty((cover, *shape[1:]), dtype=dtype)
        self.bundle.read_payload_range_into_destination(
            payload, temp.view(np.uint8).reshape(-1), offset
        )
        target[...] = temp[::step]
        return target

    def _tensor(
        self,
        name: str,
        spec: Mapping[str, Any],
        member_slice: StructuredMemberSlice | None,
        dest: Any,
    ) -> Any:
        payload = self.payload(name)
        if spec.get("nested"):
            if dest is not None:
                raise ValueError(
                    f"structured nested tensor member {name} does not support destinations"
                )
            value = _nested_from_bytes(self.bundle.read_payload(payload), spec)
            if member_slice is None:
                return value
            if member_slice.axis != 0:
                raise ValueError("structured nested tensor slicing currently supports axis=0 only")
            return _nested_rows(value, range(*_slice_bounds(member_slice, len(value))))
        if member_slice is not None:
            if member_slice.axis != 0:
                raise ValueError("structured tensor slicing currently supports axis=0 only")
            if payload.get("format") == "torch_save":
                if dest is not None:
                    raise ValueError(
                        f"structured torch_save tensor member {name} does not support destinations"
                    )
                value = _bundle.torch_load_bytes(self.bundle.read_payload(payload))
                start, end, step = _slice_bounds(member_slice, len(value))
                return value[start:end:step]
            _header, shape, _width = self._tensor_layout(name, spec, payload, "slicing")
            start, end, step = _slice_bounds(member_slice, shape[0])
            return self.tensor_rows(name, spec, payload, range(start, max(end, start), step), dest)
        if dest is not None:
            self._check_tensor_dest(name, dest)
            got = self.bundle.read_tensor_payload_into(payload, dest)
            return dest if got is None else got
        if payload.get("kind") == "tensor":
            return self.bundle.read_tensor_payload(payload)
        if payload.get("format") == "torch_save":
            return _bundle.torch_load_bytes(self.bundle.read_payload(payload))
        return _bundle.tensor_from_object(self.bundle.read_payload(payload))

    @staticmethod
    def _check_tensor_dest(name: str, dest: Any) -> None:
        if not isinstance(dest, (_bundle.TensorObjectBuffer, _bundle.RawDestination)):
            raise ValueError(
                f"structured tensor member {name} only supports tensor_object_buffer or "
                "raw_destination destinations"
            )

    def _tensor_layout(
        self,
        name: str,
        spec: Mapping[str, Any],
        payload: Mapping[str, Any],
        what: str = "indexed read",
    ) -> tuple[int, list[int], int]:
        header = int(payload.get("metadata_bytes", -1))
        shape = spec.get("shape")
        element = int(spec.get("element_size", 0))
        if header < 0 or not isinstance(shape, list) or element <= 0:
            raise ValueError(f"structured tensor field {name} is missing slice metadata")
        if not shape:
            raise ValueError(f"structured tensor {what} requires at least one dimension")
        return header, [int(d) for d in shape], element * int(np.prod(shape[1:], dtype=np.int64))

    def tensor_rows(
        self,
        name: str,
        spec: Mapping[str, Any],
        payload: Mapping[str, Any],
        indices: Sequence[int],
        dest: Any,
    ) -> Any:
        """Rows ``indices`` of a tensor member: a header re-pointed at them,
        then the rows gathered by ranged reads (torch.save payloads are loaded
        whole and indexed)."""
        if payload.get("format") == "torch_save":
            if dest is not None:
                raise ValueError(
                    f"structured torch_save tensor member {name} does not support destinations"
                )
            value = _bundle.torch_load_bytes(self.bundle.read_payload(payload))
            if isinstance(indices, range):
                return value[indices.start : indices.stop : indices.step]
            return value[list(indices)]
        header_bytes, shape, width = self._tensor_layout(name, spec, payload)
        rows = list(indices)
        length = len(rows) * width
        header = _bundle.slice_tensor_header(
            self.bundle.read_payload_range(payload, 0, header_bytes),
            (len(rows), *shape[1:]),
            length,
        )
        ranges = _row_ranges(rows, width, src_base=header_bytes)
        if dest is not None:
            self._check_tensor_dest(name, dest)
            need = header_bytes + length
            if dest.size < need:
                raise ValueError(
                    f"tensor destination has {dest.size} bytes, expected at least {need}"
                )
            ctypes.memmove(dest.ptr, header, header_bytes)
            if ranges:
                if isinstance(dest, _bundle.RawDestination) and dest.pre_registered:
                    self.bundle.read_payload_ranges_into_raw_destination(
                        payload, dest.ptr, [(s, d + header_bytes, n) for s, d, n in ranges]
                    )
                else:
                    data = bytearray(length)
                    self.bundle.read_payload_ranges_into(payload, data, ranges)
                    ctypes.memmove(dest.ptr + header_bytes, bytes(data), length)
            return dest
        data = bytearray(length)
        self.bundle.read_payload_ranges_into(payload, data, ranges)
        return _bundle.tensor_from_object(header + bytes(data))

    # ---- rows by index (DataProto)

    def member_rows(self, member: str, indices: Sequence[int], dest: Any) -> Any:
        """Rows ``indices`` of an ndarray or tensor member.

        Raises:
            ValueError: a bytes member (rows unknown).
        """
        spec = self.spec(member)
        encoding = spec.get("encoding", "bytes")
        payload = self.payload(member)
        if encoding == "ndarray":
            return self._ndarray_rows(member, spec, payload, indices, dest)
        if encoding == "torch_tensor":
            if spec.get("nested"):
                if dest is not None:
                    raise ValueError(
                        f"structured nested tensor member {member} does not support destinations"
                    )
                return _nested_rows(
                    _nested_from_bytes(self.bundle.read_payload(payload), spec), indices
                )
            return self.tensor_rows(member, spec, payload, indices, dest)
        raise ValueError(f"structured member {member} does not support indexed rows")

    def _ndarray_rows(
        self,
        name: str,
        spec: Mapping[str, Any],
        payload: Mapping[str, Any],
        indices: Sequence[int],
        dest: Any,
    ) -> np.ndarray:
        dtype, shape = self._dtype_shape(name, spec)
        if not shape:
            raise ValueError("structured ndarray indexed read requires at least one dimension")
        out_shape = (len(indices), *shape[1:])
        target = _destination_array(name, dest, dtype, out_shape)
        width = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        ranges = _row_ranges(indices, width)
        if not ranges:
            return target
        if isinstance(dest, _bundle.RawDestination):
            if dest.pre_registered:
                self.bundle.read_payload_ranges_into_raw_destination(payload, dest.ptr, ranges)
            else:
                data = bytearray(len(indices) * width)
                self.bundle.read_payload_ranges_into(payload, data, ranges)
                ctypes.memmove(dest.ptr, bytes(data), len(data))
            return target
        self.bundle.read_payload_ranges_into(payload, target.view(np.uint8).reshape(-1), ranges)
        return target

    def encoded_rows(
        self, encoded: Mapping[str, Any], indices: Sequence[int]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The payloads of an encoded column restricted to rows ``indices``
        (offsets rebased, data gathered by ranged reads) and its metadata
        adjusted to them."""
        codec = encoded["codec"]
        members: Mapping[str, str] = encoded["payload_members"]
        metadata = dict(encoded.get("metadata") or {})
        rows = list(indices)

        def by_row(name: str, at: Sequence[int]) -> Any:
            return self.member_rows(members[name], at, None)

        def bounds(name: str) -> tuple[np.ndarray, np.ndarray]:
            got = np.asarray(by_row(name, [i for r in rows for i in (r, r + 1)]))
            return got[0::2].astype(np.int64), got[1::2].astype(np.int64)

        def gathered(
            name: str, begins: np.ndarray, ends: np.ndarray, dtype: np.dtype[Any] | None
        ) -> Any:
            item = 1 if dtype is None else dtype.itemsize
            counts = ends - begins
            out_offsets = np.zeros(len(begins) + 1, dtype=np.int64)
            np.cumsum(counts, out=out_offsets[1:])
            ranges: list[tuple[int, int, int]] = []
            for b, o, n in zip(
                begins.tolist(), out_offsets[:-1].tolist(), counts.tolist(), strict=True
            ):
                if n:
                    src, dst, size = b * item, o * item, n * item
                    if (
                        ranges
                        and ranges[-1][0] + ranges[-1][2] == src
                        and ranges[-1][1] + ranges[-1][2] == dst
                    ):
                        ranges[-1] = (ranges[-1][0], ranges[-1][1], ranges[-1][2] + size)
                    else:
                        ranges.append((src, dst, size))
            total = int(out_offsets[-1]) * item
            payload = self.payload(members[name])
            if dtype is None:
                buf = bytearray(total)
                self.bundle.read_payload_ranges_into(payload, buf, ranges)
                return bytes(buf), out_offsets
            array = np.empty(int(out_offsets[-1]), dtype=dtype)
            self.bundle.read_payload_ranges_into(payload, array.view(np.uint8).reshape(-1), ranges)
            return array, out_offsets

        if codec == "structured_recursive":
            metadata = json.loads(json.dumps(metadata))
            out: dict[str, Any] = {}
            for node in metadata.get("nodes", []):
                for key in ("missing_payload", "row_mask_payload", "lengths_payload"):
                    if node.get(key) is not None:
                        out[node[key]] = by_row(node[key], rows)
            for leaf in metadata.get("leaves", []):
                leaf_members = leaf["payload_members"]
                sub = {
                    "codec": leaf["codec"],
                    "metadata": leaf.get("metadata") or {},
                    "payload_members": {
                        n: members[g] for n, g in leaf_members.items() if n != "missing"
                    },
                }
                payload, leaf["metadata"] = self.encoded_rows(sub, rows)
                for n, value in payload.items():
                    out[leaf_members[n]] = value
                out[leaf_members["missing"]] = by_row(leaf_members["missing"], rows)
            return out, metadata
        if codec == "ndarray":
            return {"data": by_row("data", rows), "nulls": by_row("nulls", rows)}, metadata
        if codec in ("ragged_tensor", "typed_ragged"):
            dtype_name = self.spec(members["data"]).get("dtype")
            if not isinstance(dtype_name, str):
                raise ValueError(
                    f"structured non-tensor payload {members['data']} is missing dtype"
                )
            begins, ends = bounds("offsets")
            data, offsets = gathered("data", begins, ends, np.dtype(dtype_name))
            return {
                "data": data,
                "offsets": offsets,
                "shapes": by_row("shapes", rows),
                "ndims": by_row("ndims", rows),
                "nulls": by_row("nulls", rows),
            }, metadata
        if codec == "ragged_tensor_dict":
            key_codecs = dict(metadata.get("key_codecs") or {})
            metadata["key_codecs"] = key_codecs
            out = {"null_mask": by_row("null_mask", rows)}
            for key in _codecs._dict_keys_checked(metadata.get("keys", [])):
                prefix = f"{key}."
                sub_members = {
                    n[len(prefix) :]: m for n, m in members.items() if n.startswith(prefix)
                }
                missing = sorted({"data", "offsets", "shapes", "ndims", "nulls"} - set(sub_members))
                if missing:
                    raise ValueError(
                        f"ragged_tensor_dict manifest for key {key!r} is missing payloads: {missing}"
                    )
                sub = {
                    "codec": "ragged_tensor",
                    "metadata": key_codecs.get(key) or {},
                    "payload_members": sub_members,
                }
                payload, key_codecs[key] = self.encoded_rows(sub, rows)
                for n, value in payload.items():
                    out[f"{key}.{n}"] = value
            return out, metadata
        if codec in _BYTES_CODECS:
            begins, ends = bounds("offsets")
            data, offsets = gathered("data", begins, ends, None)
            if "media_encodings" in metadata:
                metadata["media_encodings"] = [metadata["media_encodings"][r] for r in rows]
            return {"data": data, "offsets": offsets, "nulls": by_row("nulls", rows)}, metadata
        if codec == "media_list_ragged":
            item_begins, item_ends = bounds("row_offsets")
            row_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum(item_ends - item_begins, out=row_offsets[1:])
            items = [
                i
                for b, e in zip(item_begins.tolist(), item_ends.tolist(), strict=True)
                for i in range(b, e)
            ]
            byte_begins = (
                np.asarray(by_row("byte_offsets", items), dtype=np.int64)
                if items
                else np.zeros(0, np.int64)
            )
            byte_ends = (
                np.asarray(by_row("byte_offsets", [i + 1 for i in items]), dtype=np.int64)
                if items
                else np.zeros(0, np.int64)
            )
            data, byte_offsets = gathered("data", byte_begins, byte_ends, None)
            if "media_encodings" in metadata:
                metadata["media_encodings"] = [metadata["media_encodings"][i] for i in items]
            return {
                "data": data,
                "row_offsets": row_offsets,
                "byte_offsets": byte_offsets,
                "nulls": by_row("nulls", rows),
            }, metadata
        raise ValueError(f"unknown structured non-tensor codec: {codec}")


# --------------------------------------------------------------------------------
# the transfer
# --------------------------------------------------------------------------------


class MooncakeBundleTransfer:
    """Structured objects and DataProtos through a Mooncake store.

    ``store``: a ``MooncakeDistributedStore`` (or any object with ``put``,
    ``get``, ``remove``; faster paths are used when it has them);
    ``key_prefix``: the first part of every key; ``default_chunk_bytes``: the
    biggest object a payload is stored as (bigger ones are chunked);
    ``buffer_pool``: a ``BufferPool`` for zero-copy writes and pool-backed
    reads (one is made for a set-up ``MooncakeDistributedStore`` when None).
    """

    def __init__(
        self,
        store: BundleStore,
        key_prefix: str = "bundle",
        default_chunk_bytes: int = DEFAULT_BUNDLE_CHUNK_BYTES,
        buffer_pool: Any = None,
    ) -> None:
        self.store = store
        self.key_prefix = _bundle.normalize_key_prefix(key_prefix)
        self.default_chunk_bytes = _bundle.validate_chunk_bytes(default_chunk_bytes)
        self._transport = PayloadTransport(store, buffer_pool=buffer_pool)
        self._bundle_store = BundleManifestStore(
            store,
            self._transport,
            self.key_prefix,
            self.default_chunk_bytes,
            tensor_codec=lambda: _has_tensor_codec_helpers(),
        )

    # ---- bundles

    def put_bundle(
        self,
        meta: bytes | bytearray | memoryview,
        buffers: Mapping[str, Any],
        partition: str = "default",
        chunk_bytes: int | None = None,
        policy: BundleTransferPolicy | None = None,
        max_inflight_put: int | None = None,
        config: Any = None,
    ) -> RemoteBundleRef:
        """Store raw metadata bytes plus named bytes-like buffers."""
        return self._bundle_store.put_bundle(
            meta, buffers, partition, chunk_bytes, policy, max_inflight_put, config
        )

    def remove_bundle(self, ref: RemoteBundleRef | Mapping[str, Any]) -> None:
        """Remove every object of a bundle (payloads, cleanup keys, manifest)."""
        self._bundle_store.remove_bundle(ref)

    # ---- structured objects

    def put_structured_object(
        self,
        payload: StructuredObjectPayload,
        partition: str = "default",
        chunk_bytes: int | None = None,
        policy: BundleTransferPolicy | None = None,
        max_inflight_put: int | None = None,
        config: Any = None,
    ) -> RemoteBundleRef:
        """Store JSON metadata plus typed members (ndarray, tensor, bytes)."""
        metadata, members = _encode_members(payload.metadata, payload.buffers)
        pol = self._bundle_store._policy(policy, max_inflight_put)
        return self._bundle_store.put_bundle(
            _bundle.encode_json(metadata, "structured metadata"),
            members,
            partition,
            chunk_bytes,
            pol,
            None,
            config,
        )

    def put_object(
        self,
        obj: Any,
        partition: str = "default",
        chunk_bytes: int | None = None,
        policy: BundleTransferPolicy | None = None,
        max_inflight_put: int | None = None,
        config: Any = None,
    ) -> RemoteBundleRef:
        """Store a mapping of members, or one array/tensor/bytes value."""
        if isinstance(obj, Mapping):
            payload = StructuredObjectPayload(metadata={}, buffers=obj)
        else:
            payload = StructuredObjectPayload(
                metadata={_WRAPPED_OBJECT: True}, buffers={"value": obj}
            )
        return self.put_structured_object(
            payload, partition, chunk_bytes, policy, max_inflight_put, config
        )

    def get_object(self, ref: RemoteBundleRef | Mapping[str, Any]) -> Any:
        """What :meth:`put_object` stored."""
        result = self.materialize(self.read_spec(ref))
        if result.metadata.get(_WRAPPED_OBJECT):
            return result.objects["value"]
        return result.objects

    def read_spec(self, ref: RemoteBundleRef | Mapping[str, Any]) -> StructuredObjectReadSpec:
        """A read plan for every member of ``ref`` (narrow it with
        ``select_members``/``slice_member``)."""
        return StructuredObjectReadSpec(ref=ref)

    def materialize(self, spec: StructuredObjectReadSpec) -> StructuredObjectResult:
        return self.materialize_into(spec, None)

    def materialize_into(
        self, spec: StructuredObjectReadSpec, destinations: Mapping[str, Any] | None
    ) -> StructuredObjectResult:
        """Read ``spec``; members named in ``destinations`` are read into the
        caller's memory (an ndarray, ``raw_destination``, or
        ``tensor_object_buffer``).

        Raises:
            ValueError: an empty member selection or a bad slice/destination.
            KeyError: an unknown member.
        """
        if spec.member_names is not None and not spec.member_names:
            raise ValueError("structured read spec selected no members")
        stage = _Stage(self, spec.ref)
        buffers = stage.manifest["buffers"]
        names = list(buffers) if spec.member_names is None else list(spec.member_names)
        unknown = [n for n in names if n not in buffers]
        if unknown:
            raise KeyError(f"unknown bundle buffers: {unknown}")
        dests = destinations or {}
        slices = dict(spec.member_slices)
        objects = {n: stage.read(n, slices.get(n), dests.get(n)) for n in names}
        return StructuredObjectResult(metadata=dict(stage.metadata), objects=objects)

    @staticmethod
    def release_result(result: Any) -> None:
        """Return the BufferPool leases behind a result's arrays now (instead
        of when they are collected); walks dicts, lists and object arrays."""
        _release_result(result)

    # ---- DataProto

    def _new_storage_group_id(self, config: Any) -> str | None:
        """The storage group of a new DataProto: the config's one group id, a
        new opaque one when it names none, or None when it is ``""``.

        Raises:
            ValueError: several or non-string group ids.
        """
        raw = getattr(config, "group_ids", None)
        if raw is None:
            group: Any = None
        elif isinstance(raw, str):
            group = raw
        else:
            try:
                ids = list(raw)
            except TypeError as exc:
                raise ValueError(
                    "structured object store config.group_ids must contain strings"
                ) from exc
            if len(ids) > 1:
                raise ValueError(
                    "structured object store config.group_ids must contain exactly one logical "
                    "group id; it is expanded across internal Mooncake keys"
                )
            group = ids[0] if ids else None
        if group is None:
            return f"structured-{uuid.uuid4().hex}"
        if not isinstance(group, str):
            raise ValueError("structured object store config.group_ids must contain strings")
        return group or None

    def put(
        self,
        data: Any,
        *,
        type: Literal["dataproto", "dict"] = "dataproto",
        namespace: str = "default",
        partition: str = "default",
        stage: str = "default",
        chunk_bytes: int | None = None,
        policy: BundleTransferPolicy | None = None,
        config: Any = None,
        field_schemas: Mapping[str, FieldSchema] | None = None,
    ) -> MooncakeDataProtoRef:
        """Store a DataProto-like object (``batch``, ``non_tensor_batch``,
        ``meta_info``) or a flat dict as one stage.

        Raises:
            ValueError: an unknown ``type``, inconsistent batch sizes, or a
                field no codec can store.
        """
        if type == "dataproto":
            stage_data = data
        elif type == "dict":
            stage_data = _flat_dict_to_envelope(data, field_schemas)
        else:
            raise ValueError(f"unsupported Mooncake payload type: {type!r}")
        return self._put_stage(
            None,
            stage_data,
            namespace=namespace,
            partition=partition,
            stage=stage,
            chunk_bytes=chunk_bytes,
            policy=policy,
            overwrite=False,
            config=config,
            field_schemas=field_schemas,
        )

    def put_dataproto(
        self,
        data: Any,
        *,
        namespace: str = "default",
        partition: str = "default",
        stage: str = "default",
        chunk_bytes: int | None = None,
        policy: BundleTransferPolicy | None = None,
        field_schemas: Mapping[str, FieldSchema] | None = None,
        config: Any = None,
    ) -> MooncakeDataProtoRef:
        """``put(data, type="dataproto", ...)``."""
        return self.put(
            data,
            type="dataproto",
            namespace=namespace,
            partition=partition,
            stage=stage,
            chunk_bytes=chunk_bytes,
            policy=policy,
            field_schemas=field_schemas,
            config=config,
        )

    def append_dataproto_fields(
        self,
        ref: DataProtoRefLike,
        data: Any,
        *,
        stage: str,
        overwrite: bool = False,
        chunk_bytes: int | None = None,
        policy: BundleTransferPolicy | None = None,
        field_schemas: Mapping[str, FieldSchema] | None = None,
        config: Any = None,
    ) -> MooncakeDataProtoRef:
        """Add fields to a stored DataProto (a new stage, or merged into an
        existing one), or with ``overwrite`` replace a stage's fields.

        Raises:
            ValueError: fields that exist (without ``overwrite``), a partial
                overwrite, another batch size, or a conflicting storage group.
        """
        resolved = _resolve_ref(ref)
        return self._put_stage(
            resolved,
            data,
            namespace=resolved.namespace,
            partition=resolved.partition,
            stage=stage,
            chunk_bytes=chunk_bytes,
            policy=policy,
            overwrite=overwrite,
            field_schemas=field_schemas,
            config=config,
        )

    def dataproto_manifest_view(self, ref: DataProtoRefLike) -> dict[str, Any]:
        """Fields, sections, stages and member specs of a stored DataProto."""
        resolved = _resolve_ref(ref)
        stages = {name: _Stage(self, sref) for name, sref in resolved.stage_refs.items()}
        fields: dict[str, dict[str, Any]] = {}
        for name, loc in resolved.field_index.items():
            stage = stages[loc.stage]
            spec = dict(stage.spec(loc.member))
            encoded = resolved.encoded_non_tensor.get(name)
            if encoded is not None:
                spec = {
                    "encoding": "structured_non_tensor",
                    "codec": encoded["codec"],
                    "metadata": encoded.get("metadata"),
                    "payload_members": dict(encoded["payload_members"]),
                    "payload_specs": {
                        p: dict(stage.spec(m)) for p, m in encoded["payload_members"].items()
                    },
                }
            fields[name] = {
                "section": loc.section,
                "stage": loc.stage,
                "member": loc.member,
                "spec": spec,
            }
        return {
            "namespace": resolved.namespace,
            "partition": resolved.partition,
            "batch_size": resolved.batch_size,
            "batch_fields": {n: f for n, f in fields.items() if f["section"] == "batch"},
            "non_tensor_fields": {
                n: f for n, f in fields.items() if f["section"] == "non_tensor_batch"
            },
            "meta_info_keys": list(resolved.meta_info),
            "stages": {
                name: {
                    "manifest_key": sref.manifest_key,
                    "dataproto": stages[name].metadata.get("dataproto", {}),
                }
                for name, sref in resolved.stage_refs.items()
            },
        }

    def get(
        self,
        ref: DataProtoRefLike,
        *,
        type: Literal["dataproto", "dict"] = "dataproto",
        fields: Sequence[str] | None = None,
        batch_fields: Sequence[str] | None = None,
        non_tensor_fields: Sequence[str] | None = None,
        meta_info_keys: Sequence[str] | None = None,
        data_cls: Any = None,
        destinations: Mapping[str, Any] | None = None,
        rows: slice | StructuredMemberSlice | Sequence[int] | None = None,
    ) -> Any:
        """Read a stored DataProto (``type="dict"``: as a flat dict, object
        columns as lists); see :meth:`get_dataproto`."""
        if type not in ("dataproto", "dict"):
            raise ValueError(f"unsupported Mooncake payload type: {type!r}")
        flat = type == "dict"
        result = self._get(
            ref,
            fields=fields,
            batch_fields=batch_fields,
            non_tensor_fields=non_tensor_fields,
            meta_info_keys=meta_info_keys,
            data_cls=dict if flat else data_cls,
            destinations=destinations,
            rows=rows,
            flat=flat,
        )
        return _envelope_to_flat_dict(result) if flat else result

    def get_dataproto(
        self,
        ref: DataProtoRefLike,
        *,
        fields: Sequence[str] | None = None,
        batch_fields: Sequence[str] | None = None,
        non_tensor_fields: Sequence[str] | None = None,
        meta_info_keys: Sequence[str] | None = None,
        data_cls: Any = None,
        destinations: Mapping[str, Any] | None = None,
        rows: slice | StructuredMemberSlice | Sequence[int] | None = None,
    ) -> Any:
        """Read selected fields (all by default) and rows (a slice, a
        StructuredMemberSlice or an index list) of a stored DataProto, as
        ``data_cls`` (``from_dict``/constructor) or an envelope dict; fields
        named in ``destinations`` are read into the caller's memory.

        Raises:
            KeyError: an unknown field.
            ValueError, TypeError, IndexError: a bad selection or destination.
        """
        return self._get(
            ref,
            fields=fields,
            batch_fields=batch_fields,
            non_tensor_fields=non_tensor_fields,
            meta_info_keys=meta_info_keys,
            data_cls=data_cls,
            destinations=destinations,
            rows=rows,
            flat=False,
        )

    def cleanup_dataproto(self, ref: DataProtoRefLike) -> None:
        """Remove every stage of a stored DataProto."""
        seen: set[str] = set()
        for sref in _resolve_ref(ref).stage_refs.values():
            if sref.manifest_key not in seen:
                seen.add(sref.manifest_key)
                self.remove_bundle(sref)

    def _select_fields(
        self,
        ref: MooncakeDataProtoRef,
        fields: Sequence[str] | None,
        batch_fields: Sequence[str] | None,
        non_tensor_fields: Sequence[str] | None,
    ) -> list[str]:
        if fields is not None and (batch_fields is not None or non_tensor_fields is not None):
            raise ValueError("fields cannot be combined with batch_fields or non_tensor_fields")
        if fields is not None:
            names = list(fields)
        elif batch_fields is None and non_tensor_fields is None:
            names = [n for n, loc in ref.field_index.items() if loc.section == "batch"]
            names += [n for n, loc in ref.field_index.items() if loc.section == "non_tensor_batch"]
        else:
            names = [*(batch_fields or []), *(non_tensor_fields or [])]
        unknown = [n for n in names if n not in ref.field_index]
        if unknown:
            raise KeyError(f"unknown DataProto fields: {unknown}")
        if fields is not None:
            index = ref.field_index
            names = [n for n in names if index[n].section == "batch"] + [
                n for n in names if index[n].section == "non_tensor_batch"
            ]
        return names

    def _get(
        self,
        ref: DataProtoRefLike,
        *,
        fields: Sequence[str] | None,
        batch_fields: Sequence[str] | None,
        non_tensor_fields: Sequence[str] | None,
        meta_info_keys: Sequence[str] | None,
        data_cls: Any,
        destinations: Mapping[str, Any] | None,
        rows: Any,
        flat: bool,
    ) -> Any:
        resolved = _resolve_ref(ref)
        selection = _row_selection(rows, resolved.batch_size)
        names = self._select_fields(resolved, fields, batch_fields, non_tensor_fields)
        dests = destinations or {}
        indices: list[int] | None = None
        member_slice: StructuredMemberSlice | None = None
        if selection is not None:
            if selection.indices is not None:
                indices = list(selection.indices)
            elif selection.member_slice is not None and selection.member_slice.step == 1:
                member_slice = selection.member_slice
            else:
                assert selection.member_slice is not None
                indices = list(range(*_slice_bounds(selection.member_slice, resolved.batch_size)))
        batch: dict[str, Any] = {}
        columns: dict[str, Any] = {}
        stages: dict[str, _Stage] = {}

        def stage_of(name: str) -> _Stage:
            if name not in stages:
                stages[name] = _Stage(self, resolved.stage_refs[name])
            return stages[name]

        def place(name: str, value: Any) -> None:
            (batch if resolved.field_index[name].section == "batch" else columns)[name] = value

        plain = [
            n
            for n in names
            if n not in resolved.encoded_non_tensor or resolved.field_index[n].section == "batch"
        ]
        encoded = [n for n in names if n not in plain]
        by_stage: dict[str, list[str]] = {}
        for name in plain:
            by_stage.setdefault(resolved.field_index[name].stage, []).append(name)
        for stage_name, group in by_stage.items():
            stage = stage_of(stage_name)
            for name in group:
                loc = resolved.field_index[name]
                if loc.member not in stage.manifest["buffers"]:
                    raise KeyError(f"unknown bundle buffers: {[loc.member]}")
                dest = dests.get(name)
                if indices is not None:
                    place(name, stage.member_rows(loc.member, indices, dest))
                else:
                    place(name, stage.read(loc.member, member_slice, dest))
        row_list: list[int] | None = indices
        if row_list is None and member_slice is not None:
            row_list = list(range(*_slice_bounds(member_slice, resolved.batch_size)))
        for name in encoded:
            info = resolved.encoded_non_tensor[name]
            stage = stage_of(resolved.field_index[name].stage)
            if row_list is None:
                payload = {p: stage.read(m, None, None) for p, m in info["payload_members"].items()}
                values = _codecs.decode_column(info, payload, resolved.batch_size)
            else:
                payload, metadata = stage.encoded_rows(info, row_list)
                values = _codecs.decode_column(
                    {**info, "metadata": metadata}, payload, len(row_list)
                )
            columns[name] = values if flat else _object_column(values)
        meta = (
            dict(resolved.meta_info)
            if meta_info_keys is None
            else {k: resolved.meta_info[k] for k in meta_info_keys if k in resolved.meta_info}
        )
        return _build_result(batch, columns, meta, data_cls)

    def _put_stage(
        self,
        ref: MooncakeDataProtoRef | None,
        data: Any,
        *,
        namespace: str,
        partition: str,
        stage: str,
        chunk_bytes: int | None,
        policy: BundleTransferPolicy | None,
        overwrite: bool,
        field_schemas: Mapping[str, FieldSchema] | None = None,
        config: Any = None,
    ) -> MooncakeDataProtoRef:
        batch, columns, meta_info = _split_dataproto(data)
        _check_schema_sections(
            {"batch": batch, "non_tensor_batch": columns, "meta_info": meta_info}, field_schemas
        )
        batch_size = _batch_size(batch, columns)
        if ref is not None and batch_size != ref.batch_size:
            raise ValueError(
                f"DataProto append batch size {batch_size} does not match ref batch size {ref.batch_size}"
            )
        overlap = sorted(set(batch) & set(columns))
        if overlap:
            raise ValueError(f"DataProto batch and non_tensor_batch fields overlap: {overlap}")
        members: dict[str, Any] = {}
        located: dict[str, StructuredFieldLocation] = {}
        for name, value in batch.items():
            members[f"batch.{name}"] = value
            located[name] = StructuredFieldLocation(stage, f"batch.{name}", "batch")
        encoded_updates: dict[str, Any] = {}
        for name, value in columns.items():
            member = f"non_tensor_batch.{name}"
            located[name] = StructuredFieldLocation(stage, member, "non_tensor_batch")
            leaf = _encode_column(name, value, _schema_for(field_schemas, name, "non_tensor_batch"))
            if leaf is None:
                members[member] = value
                continue
            payload_members = {}
            for payload_name, payload_value in leaf.payload.items():
                members[f"{member}.{payload_name}"] = payload_value
                payload_members[payload_name] = f"{member}.{payload_name}"
            encoded_updates[name] = {
                "codec": leaf.codec,
                "rows": leaf.rows,
                "metadata": leaf.metadata,
                "payload_members": payload_members,
            }
        if not members:
            if ref is not None:
                return MooncakeDataProtoRef(
                    batch_size=ref.batch_size,
                    stage_refs=dict(ref.stage_refs),
                    field_index=dict(ref.field_index),
                    meta_info={**ref.meta_info, **meta_info},
                    namespace=ref.namespace,
                    partition=ref.partition,
                    global_indexes=ref.global_indexes,
                    encoded_non_tensor=dict(ref.encoded_non_tensor),
                    _storage_group_id=ref._storage_group_id,
                )
            return MooncakeDataProtoRef(
                batch_size=batch_size,
                stage_refs={},
                field_index={},
                meta_info=dict(meta_info),
                namespace=namespace,
                partition=partition,
                _storage_group_id=self._new_storage_group_id(config),
            )
        if ref is not None:
            existing = sorted(set(ref.field_index) & set(located))
            if existing and not overwrite:
                raise ValueError(f"DataProto fields already exist: {existing}")
            if overwrite:
                dangling = sorted(
                    n
                    for n, loc in ref.field_index.items()
                    if loc.stage == stage and n not in located
                )
                if dangling:
                    raise ValueError(
                        f"DataProto overwrite for stage {stage!r} must include existing fields: {dangling}"
                    )
        group = self._new_storage_group_id(config) if ref is None else ref._storage_group_id
        write_config = config if group is None else _bundle.config_with_group_id(config, group)
        payload = StructuredObjectPayload(
            metadata={
                "layout": "dataproto_stage",
                "dataproto": {
                    "version": 1,
                    "namespace": namespace,
                    "partition": partition,
                    "stage": stage,
                    "batch_size": batch_size,
                },
            },
            buffers=members,
        )
        old_stage = ref.stage_refs.get(stage) if ref is not None else None
        if old_stage is not None and not overwrite:
            stage_ref = self._append_to_stage(
                old_stage, payload, partition, chunk_bytes, policy, write_config
            )
        else:
            stage_ref = self.put_structured_object(
                payload,
                partition=partition,
                chunk_bytes=chunk_bytes,
                policy=policy,
                config=write_config,
            )
            if old_stage is not None and old_stage.manifest_key != stage_ref.manifest_key:
                self.remove_bundle(old_stage)
        if ref is None:
            return MooncakeDataProtoRef(
                batch_size=batch_size,
                stage_refs={stage: stage_ref},
                field_index=located,
                meta_info=dict(meta_info),
                namespace=namespace,
                partition=partition,
                encoded_non_tensor=encoded_updates,
                _storage_group_id=group,
            )
        encoded_all = {n: e for n, e in ref.encoded_non_tensor.items() if n not in located}
        encoded_all.update(encoded_updates)
        return MooncakeDataProtoRef(
            batch_size=batch_size,
            stage_refs={**ref.stage_refs, stage: stage_ref},
            field_index={**ref.field_index, **located},
            meta_info={**ref.meta_info, **meta_info},
            namespace=namespace,
            partition=partition,
            global_indexes=ref.global_indexes,
            encoded_non_tensor=encoded_all,
            _storage_group_id=group,
        )

    def _append_to_stage(
        self,
        old_ref: RemoteBundleRef,
        payload: StructuredObjectPayload,
        partition: str,
        chunk_bytes: int | None,
        policy: BundleTransferPolicy | None,
        config: Any,
    ) -> RemoteBundleRef:
        """The new members as a bundle, then one manifest over the old and new
        payloads (the old and the intermediate manifests/metadata become its
        cleanup keys, so removing it removes the lineage)."""
        bundle = self._bundle_store
        new_ref = self.put_structured_object(
            payload, partition=partition, chunk_bytes=chunk_bytes, policy=policy, config=config
        )
        try:
            old, new = _Stage(self, old_ref), _Stage(self, new_ref)
            merged_meta = _merge_stage_metadata(old.metadata, new.metadata)
            buffers = dict(old.manifest["buffers"])
            clash = sorted(set(buffers) & set(new.manifest["buffers"]))
            if clash:
                raise ValueError(f"structured members already exist: {clash}")
            buffers.update(new.manifest["buffers"])
            lineage = [
                *old.manifest.get("cleanup_keys", []),
                bundle.manifest_key(old_ref),
                *bundle.payload_keys(old.manifest["meta"]),
                bundle.manifest_key(new_ref),
                *bundle.payload_keys(new.manifest["meta"]),
            ]
            merged = bundle.put_bundle_manifest(
                _bundle.encode_json(merged_meta, "structured metadata"),
                buffers,
                partition=partition,
                chunk_bytes=chunk_bytes,
                policy=policy,
                cleanup_keys=lineage,
                config=config,
            )
        except Exception:
            self.remove_bundle(new_ref)
            raise
        bundle.remove_keys(
            [bundle.manifest_key(new_ref), *bundle.payload_keys(new.manifest["meta"])], strict=False
        )
        return merged


def _encode_with_schema(path: str, value: Any, schema: FieldSchema) -> _codecs.EncodedLeaf:
    """A column with a FieldSchema (the reference's private helper).

    Raises:
        ValueError: a non-nullable schema with None rows, or no codec fits.
    """
    values = list(value)
    if not schema.nullable and any(v is None for v in values):
        raise ValueError(f"FieldSchema for {path!r} is not nullable")
    return _codecs.encode_with_schema(path, values, schema.codec, schema.metadata)
