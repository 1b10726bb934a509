"""The reference's tensor object format, and the plans that split and join it.

Theory of operation
-------------------
A tensor object in the store is ``[metadata][raw element bytes]``: a
304-byte ``TensorMetadata`` (the reference's ``integration_utils.h``: a
40-byte ``TensorObjectHeader`` "MOON" v1, then ``TensorLayoutMetadata`` with
the global and local shapes and up to four layout axes) followed by the
C-contiguous element bytes.  The reference writes the C struct in native byte
order; every platform it builds for is little-endian, so the formats below
spell little-endian out.  Objects written here read back on the reference and
the other way round (``tests/compat/test_tensor_interop.py`` checks this
byte for byte against the reference wheel).

Sharded objects (tensor parallelism) carry ``layout_kind=SHARD`` and one
:class:`LayoutAxis` per parallel axis.  A 96-byte ``WriterShardManifest``
("WMAN") under ``<key>__parallelism_manifest`` or ``<key>__writer_manifest``
records the full tensor's shape and how it was cut, so a reader can join the
shards again.

This module is sans-IO: it encodes and validates bytes, names keys and plans
byte ranges (which slices of which stored objects land where in a
destination).  Nothing here imports numpy or torch, opens a socket or talks to
the master; ``_tensor_array.py`` bridges to arrays and ``mooncake.store``
runs the plans.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Final

from ..errors import InvalidParams

__all__ = [
    "HEADER_SIZE",
    "MANIFEST_SIZE",
    "MAX_AXES",
    "MAX_DIMS",
    "AxisKind",
    "AxisSpec",
    "Fragment",
    "LayoutAxis",
    "LayoutKind",
    "ShardManifest",
    "TensorDtype",
    "TensorFormatError",
    "TensorHeader",
    "canonical_axes",
    "element_size",
    "join_plan",
    "parallelism_key",
    "parallelism_manifest_key",
    "parse_header",
    "parse_manifest",
    "shard_range",
    "split_plan",
    "tp_key",
    "validate_axes",
    "writer_manifest_key",
    "writer_shard_key",
]

#: ``kTensorObjectMagic``: "MOON" read as a little-endian u32
MAGIC: Final = 0x4D4F4F4E
VERSION: Final = 1
MAX_DIMS: Final = 8
MAX_AXES: Final = 4
#: ``kWriterShardManifestMagic``: "WMAN"
MANIFEST_MAGIC: Final = 0x574D414E
MANIFEST_VERSION: Final = 1

# TensorObjectHeader: u32 magic, u16 version, u16 header_size, i32 dtype,
# i32 ndim, u32 layout_kind, u32 reserved_flags, u64 data_offset, u64 data_bytes
_OBJECT_HEADER: Final = struct.Struct("<IHHiiIIQQ")
# TensorLayoutMetadata: i64 global[8], i64 local[8], u32 axis_count, u32 reserved0
_LAYOUT_HEAD: Final = struct.Struct(f"<{MAX_DIMS}q{MAX_DIMS}qII")
# LayoutAxis: i32 kind, axis_index, shard_rank, shard_count, split_dim, reserved0; i64 reserved1
_AXIS: Final = struct.Struct("<iiiiiiq")
#: sizeof(TensorMetadata) = 40 + 136 + 4 * 32
HEADER_SIZE: Final = _OBJECT_HEADER.size + _LAYOUT_HEAD.size + MAX_AXES * _AXIS.size
# WriterShardManifestHeader (28 bytes, padded to 32 for the i64 shape that
# follows): u32 magic, u16 version, u16 header_size, i32 dtype, i32 ndim,
# i32 split_dim, i32 shard_count, i32 reserved0; then i64 global_shape[8]
_MANIFEST: Final = struct.Struct(f"<IHHiiiii4x{MAX_DIMS}q")
MANIFEST_SIZE: Final = _MANIFEST.size

assert HEADER_SIZE == 304 and MANIFEST_SIZE == 96  # the reference's sizeof()s


class TensorFormatError(InvalidParams):
    """Bytes that are not a valid tensor object or shard manifest."""


class TensorDtype(IntEnum):
    """The reference's ``TensorDtype`` (values are on the wire)."""

    FLOAT32 = 0
    FLOAT64 = 1
    INT8 = 2
    UINT8 = 3
    INT16 = 4
    UINT16 = 5
    INT32 = 6
    UINT32 = 7
    INT64 = 8
    UINT64 = 9
    BOOL = 10
    FLOAT16 = 11
    BFLOAT16 = 12
    FLOAT8_E4M3 = 13
    FLOAT8_E5M2 = 14


_ELEMENT_SIZE: Final = {
    TensorDtype.FLOAT32: 4,
    TensorDtype.FLOAT64: 8,
    TensorDtype.INT8: 1,
    TensorDtype.UINT8: 1,
    TensorDtype.INT16: 2,
    TensorDtype.UINT16: 2,
    TensorDtype.INT32: 4,
    TensorDtype.UINT32: 4,
    TensorDtype.INT64: 8,
    TensorDtype.UINT64: 8,
    TensorDtype.BOOL: 1,
    TensorDtype.FLOAT16: 2,
    TensorDtype.BFLOAT16: 2,
    TensorDtype.FLOAT8_E4M3: 1,
    TensorDtype.FLOAT8_E5M2: 1,
}


def element_size(dtype: int) -> int:
    """Bytes per element of a dtype code.

    Raises:
        TensorFormatError: not a dtype of the reference's enum.
    """
    try:
        return _ELEMENT_SIZE[TensorDtype(dtype)]
    except ValueError:
        raise TensorFormatError(f"unknown tensor dtype code {dtype}") from None


class LayoutKind(IntEnum):
    FULL = 0
    SHARD = 1


class AxisKind(IntEnum):
    """``LayoutAxisKind``; also the order axes take in shard key names."""

    DP = 0
    TP = 1
    EP = 2
    PP = 3
    RESERVED = 4


_KIND_BY_NAME: Final = {"TP": AxisKind.TP, "DP": AxisKind.DP, "EP": AxisKind.EP, "PP": AxisKind.PP}


def _kind_or_none(name: str) -> AxisKind | None:
    return _KIND_BY_NAME.get(name.upper())


def axis_kind(name: str) -> AxisKind:
    """``"tp"``/``"dp"``/``"ep"``/``"pp"`` in any case.

    Raises:
        InvalidParams: another name.
    """
    kind = _kind_or_none(name)
    if kind is None:
        raise InvalidParams(f"unsupported parallel axis kind {name!r}: use tp, dp, ep or pp")
    return kind


# --------------------------------------------------------------------------------
# the object header
# --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LayoutAxis:
    """One stored parallel axis (``LayoutAxis``).

    ``reserved0`` holds the expert id (EP) or stage id (PP); ``reserved1`` the
    local extent along ``split_dim`` (0 without a split).
    """

    kind: int
    axis_index: int
    shard_rank: int
    shard_count: int
    split_dim: int = -1
    reserved0: int = 0
    reserved1: int = 0


@dataclass(frozen=True, slots=True)
class TensorHeader:
    """A parsed or to-be-written ``TensorMetadata``."""

    dtype: int
    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    data_bytes: int
    layout_kind: int = LayoutKind.FULL
    axes: tuple[LayoutAxis, ...] = ()
    data_offset: int = HEADER_SIZE

    @classmethod
    def full(cls, dtype: int, shape: Sequence[int]) -> TensorHeader:
        """The header of a whole tensor (``build_full_tensor_metadata``)."""
        shape = tuple(int(d) for d in shape)
        return cls(dtype, shape, shape, _numel(shape) * element_size(dtype))

    @property
    def ndim(self) -> int:
        return len(self.global_shape)

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole stored object (header + data)."""
        return self.data_offset + self.data_bytes

    @property
    def is_shard(self) -> bool:
        return self.layout_kind == LayoutKind.SHARD

    def axis(self, kind: AxisKind) -> LayoutAxis | None:
        """The first stored axis of ``kind`` (``find_layout_axis``)."""
        for a in self.axes:
            if a.kind == kind:
                return a
        return None

    def encode(self) -> bytes:
        """The 304 bytes the reference writes (``memcpy`` of the struct).

        Raises:
            TensorFormatError: more than 8 dims or 4 axes.
        """
        if self.ndim > MAX_DIMS or len(self.local_shape) > MAX_DIMS:
            raise TensorFormatError(f"tensors have at most {MAX_DIMS} dimensions, got {self.ndim}")
        if len(self.axes) > MAX_AXES:
            raise TensorFormatError(f"at most {MAX_AXES} layout axes, got {len(self.axes)}")
        out = bytearray(HEADER_SIZE)
        _OBJECT_HEADER.pack_into(
            out,
            0,
            MAGIC,
            VERSION,
            HEADER_SIZE,
            self.dtype,
            self.ndim,
            self.layout_kind,
            0,
            self.data_offset,
            self.data_bytes,
        )
        _LAYOUT_HEAD.pack_into(
            out,
            _OBJECT_HEADER.size,
            *_dims(self.global_shape),
            *_dims(self.local_shape),
            len(self.axes),
            0,
        )
        pos = _OBJECT_HEADER.size + _LAYOUT_HEAD.size
        for a in self.axes:
            _AXIS.pack_into(
                out,
                pos,
                a.kind,
                a.axis_index,
                a.shard_rank,
                a.shard_count,
                a.split_dim,
                a.reserved0,
                a.reserved1,
            )
            pos += _AXIS.size
        return bytes(out)


def _dims(shape: Sequence[int]) -> list[int]:
    """A shape padded with -1 to 8 entries (``MakeTensorShape``)."""
    return [*shape, *([-1] * (MAX_DIMS - len(shape)))]


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def parse_header(
    buf: bytes | bytearray | memoryview, total_length: int | None = None
) -> TensorHeader:
    """Parse and validate the metadata at the start of ``buf``.

    ``total_length`` is the stored object's size (default ``len(buf)``); the
    checks are the reference's ``ValidateTensorMetadata``: magic, version,
    header size, dtype, ndim, axis count, layout kind, data offset, that the
    data bytes fill the object exactly and match the local shape, unused dims
    set to -1, axis fields in range.

    Raises:
        TensorFormatError: any check fails (the message names which).
    """
    view = memoryview(buf).cast("B") if not isinstance(buf, bytes) else memoryview(buf)
    total = len(view) if total_length is None else total_length
    if len(view) < HEADER_SIZE or total < HEADER_SIZE:
        raise TensorFormatError(
            f"{min(len(view), total)} bytes cannot hold a {HEADER_SIZE}-byte tensor header"
        )
    (magic, version, header_size, dtype, ndim, layout_kind, _flags, data_offset, data_bytes) = (
        _OBJECT_HEADER.unpack_from(view, 0)
    )
    if magic != MAGIC or version != VERSION or header_size != HEADER_SIZE:
        raise TensorFormatError(
            f"not a Mooncake tensor object (magic {magic:#x}, version {version}, "
            f"header size {header_size}; expected {MAGIC:#x} 'MOON', {VERSION}, {HEADER_SIZE})"
        )
    if not 0 <= dtype < len(TensorDtype):
        raise TensorFormatError(f"tensor header has an unknown dtype code {dtype}")
    if not 0 <= ndim <= MAX_DIMS:
        raise TensorFormatError(f"tensor header has ndim {ndim} (at most {MAX_DIMS})")
    layout = _LAYOUT_HEAD.unpack_from(view, _OBJECT_HEADER.size)
    global_dims, local_dims = layout[:MAX_DIMS], layout[MAX_DIMS : 2 * MAX_DIMS]
    axis_count = layout[2 * MAX_DIMS]
    if axis_count > MAX_AXES:
        raise TensorFormatError(f"tensor header has {axis_count} layout axes (at most {MAX_AXES})")
    if layout_kind > LayoutKind.SHARD:
        raise TensorFormatError(f"tensor header has layout kind {layout_kind}")
    if not HEADER_SIZE <= data_offset <= total:
        raise TensorFormatError(
            f"tensor data offset {data_offset} is outside the {total}-byte object"
        )
    if data_bytes != total - data_offset:
        raise TensorFormatError(
            f"tensor header says {data_bytes} data bytes but the object holds {total - data_offset}"
        )
    global_shape = tuple(global_dims[:ndim])
    local_shape = tuple(local_dims[:ndim])
    if any(d < 0 for d in global_shape) or any(d < 0 for d in local_shape):
        raise TensorFormatError(f"tensor header has a negative dimension: {local_shape}")
    expected = _numel(local_shape) * _ELEMENT_SIZE[TensorDtype(dtype)]
    if data_bytes != expected:
        raise TensorFormatError(
            f"tensor of shape {local_shape} and dtype {TensorDtype(dtype).name} needs "
            f"{expected} bytes, the header says {data_bytes}"
        )
    if any(d != -1 for d in global_dims[ndim:]) or any(d != -1 for d in local_dims[ndim:]):
        raise TensorFormatError("tensor header: dimensions beyond ndim must be -1")
    axes = []
    pos = _OBJECT_HEADER.size + _LAYOUT_HEAD.size
    for i in range(axis_count):
        a = LayoutAxis(*_AXIS.unpack_from(view, pos + i * _AXIS.size))
        if not AxisKind.DP <= a.kind <= AxisKind.RESERVED:
            raise TensorFormatError(f"tensor header axis {i} has kind {a.kind}")
        if a.shard_count <= 0 or not 0 <= a.shard_rank < a.shard_count:
            raise TensorFormatError(
                f"tensor header axis {i} has rank {a.shard_rank} of {a.shard_count}"
            )
        if not -1 <= a.split_dim < ndim:
            raise TensorFormatError(f"tensor header axis {i} splits dim {a.split_dim} of {ndim}")
        axes.append(a)
    return TensorHeader(
        dtype, global_shape, local_shape, data_bytes, layout_kind, tuple(axes), data_offset
    )


def parse_header_prefix(buf: bytes | bytearray | memoryview) -> TensorHeader:
    """Parse a header read on its own (the first 304 bytes of an object): the
    object's length is taken from the header itself."""
    view = memoryview(buf)
    if len(view) < HEADER_SIZE:
        raise TensorFormatError(f"{len(view)} bytes cannot hold a tensor header")
    _m, _v, _h, _d, _n, _k, _f, data_offset, data_bytes = _OBJECT_HEADER.unpack_from(view, 0)
    return parse_header(view[:HEADER_SIZE], data_offset + data_bytes)


# --------------------------------------------------------------------------------
# parallel axes: validation, canonical order, key names
# --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AxisSpec:
    """A requested parallel axis (the reference's ``ParallelAxisSpec``).

    ``kind`` is kept as given (lower-cased); ``split_dim``, ``expert_id`` and
    ``stage_id`` are None when unset.
    """

    kind: str
    rank: int = 0
    size: int = 1
    split_dim: int | None = None
    expert_id: int | None = None
    stage_id: int | None = None

    @property
    def kind_code(self) -> AxisKind:
        return axis_kind(self.kind)

    def with_rank(self, rank: int, size: int | None = None) -> AxisSpec:
        return replace(self, rank=rank, size=self.size if size is None else size)

    def same_as(self, other: AxisSpec) -> bool:
        """``axis_specs_equal``: same (valid) kind, rank, size, split and ids."""
        mine = _kind_or_none(self.kind)
        return (
            mine is not None
            and mine == _kind_or_none(other.kind)
            and self.rank == other.rank
            and self.size == other.size
            and self.split_dim == other.split_dim
            and self.expert_id == other.expert_id
            and self.stage_id == other.stage_id
        )

    def key_suffix(self) -> str:
        """``encode_axis_key_suffix``: ``tp_1of4_sd0``, ``ep_0of2_eid11`` ..."""
        out = f"{self.kind_code.name.lower()}_{self.rank}of{self.size}"
        if self.split_dim is not None:
            out += f"_sd{self.split_dim}"
        if self.expert_id is not None:
            out += f"_eid{self.expert_id}"
        if self.stage_id is not None:
            out += f"_sid{self.stage_id}"
        return out


def validate_axes(axes: Sequence[AxisSpec], what: str) -> tuple[AxisSpec, ...]:
    """``validate_parallelism_spec``: 1..4 axes, distinct kinds, rank < size,
    TP needs a split_dim, DP/EP/PP must not have one, EP needs expert_id, PP
    needs stage_id.

    Raises:
        InvalidParams: the first rule broken, named.
    """
    if not axes:
        raise InvalidParams(f"{what}: parallelism axes cannot be empty")
    if len(axes) > MAX_AXES:
        raise InvalidParams(f"{what}: at most {MAX_AXES} parallel axes, got {len(axes)}")
    seen: set[AxisKind] = set()
    for a in axes:
        kind = a.kind_code
        if a.size <= 0 or not 0 <= a.rank < a.size:
            raise InvalidParams(f"{what}: axis {a.kind} has rank {a.rank} of size {a.size}")
        if kind in seen:
            raise InvalidParams(f"{what}: axis kind {a.kind} appears twice")
        seen.add(kind)
        if kind == AxisKind.TP and a.split_dim is None:
            raise InvalidParams(f"{what}: a tp axis needs split_dim")
        if kind != AxisKind.TP and a.split_dim is not None:
            raise InvalidParams(f"{what}: a {a.kind} axis must not have split_dim")
        if kind == AxisKind.EP and a.expert_id is None:
            raise InvalidParams(f"{what}: an ep axis needs expert_id")
        if kind == AxisKind.PP and a.stage_id is None:
            raise InvalidParams(f"{what}: a pp axis needs stage_id")
    return tuple(axes)


def canonical_axes(axes: Sequence[AxisSpec]) -> tuple[AxisSpec, ...]:
    """Axes in key order: dp, tp, ep, pp (``canonicalize_parallelism_spec``)."""
    return tuple(sorted(axes, key=_axis_order))


def _axis_order(a: AxisSpec) -> tuple[int, str]:
    kind = _kind_or_none(a.kind)
    return (int(AxisKind.RESERVED) if kind is None else int(kind), a.kind)


def tp_index(axes: Sequence[AxisSpec]) -> int | None:
    """Index of the tp axis, if any (``find_tp_axis_index``)."""
    for i, a in enumerate(axes):
        if _kind_or_none(a.kind) == AxisKind.TP:
            return i
    return None


def is_single_tp(axes: Sequence[AxisSpec]) -> bool:
    """One tp axis: shards use the legacy ``<key>_tp_<rank>`` names."""
    return len(axes) == 1 and _kind_or_none(axes[0].kind) == AxisKind.TP


def tp_key(base: str, rank: int) -> str:
    return f"{base}_tp_{rank}"


def parallelism_key(base: str, axes: Sequence[AxisSpec]) -> str:
    """The shard key of ``axes`` (``get_parallelism_key_name``)."""
    if is_single_tp(axes):
        return tp_key(base, axes[0].rank)
    return base + "".join("__" + a.key_suffix() for a in canonical_axes(axes))


def parallelism_manifest_key(base: str) -> str:
    return base + "__parallelism_manifest"


def writer_manifest_key(base: str) -> str:
    return base + "__writer_manifest"


def writer_shard_key(base: str, rank: int, size: int, split_dim: int) -> str:
    return f"{base}__writer_{rank}of{size}_sd{split_dim}"


def layout_axes(axes: Sequence[AxisSpec], local_shape: Sequence[int]) -> tuple[LayoutAxis, ...]:
    """Stored form of requested axes (``build_layout_axis_from_spec``), in the
    order given.

    Raises:
        InvalidParams: a split_dim outside the tensor, an unknown kind.
    """
    out = []
    for i, a in enumerate(axes):
        kind = a.kind_code
        extent = 0
        if a.split_dim is not None:
            if not 0 <= a.split_dim < len(local_shape):
                raise InvalidParams(
                    f"split_dim {a.split_dim} is outside a {len(local_shape)}-d tensor"
                )
            extent = local_shape[a.split_dim]
        reserved0 = 0
        if kind == AxisKind.EP and a.expert_id is not None:
            reserved0 = a.expert_id
        if kind == AxisKind.PP and a.stage_id is not None:
            reserved0 = a.stage_id
        out.append(
            LayoutAxis(
                int(kind),
                i,
                a.rank,
                a.size,
                -1 if a.split_dim is None else a.split_dim,
                reserved0,
                extent,
            )
        )
    return tuple(out)


def shard_header(
    dtype: int,
    global_shape: Sequence[int],
    local_shape: Sequence[int],
    axes: Sequence[AxisSpec],
) -> TensorHeader:
    """Header of a shard (``build_shard_metadata_from_shapes``).

    Raises:
        InvalidParams: no axes, too many, shapes of different rank.
    """
    if not axes or len(axes) > MAX_AXES or len(global_shape) != len(local_shape):
        raise InvalidParams("a shard needs 1-4 axes and shapes of the same rank")
    local = tuple(int(d) for d in local_shape)
    return TensorHeader(
        dtype,
        tuple(int(d) for d in global_shape),
        local,
        _numel(local) * element_size(dtype),
        LayoutKind.SHARD,
        layout_axes(axes, local),
    )


def stored_axes(header: TensorHeader) -> tuple[AxisSpec, ...] | None:
    """The parallelism a shard was written with, canonical order
    (``parallelism_from_metadata``); None for a whole tensor."""
    if not header.is_shard:
        return None
    out = []
    for a in header.axes:
        kind = AxisKind(a.kind)
        out.append(
            AxisSpec(
                kind.name.lower(),
                a.shard_rank,
                a.shard_count,
                a.split_dim if a.split_dim >= 0 else None,
                a.reserved0 if kind == AxisKind.EP else None,
                a.reserved0 if kind == AxisKind.PP else None,
            )
        )
    return canonical_axes(out)


def matches_stored(axes: Sequence[AxisSpec], header: TensorHeader) -> bool:
    """Whether a shard was written with exactly ``axes`` (any order)."""
    stored = stored_axes(header)
    want = canonical_axes(axes)
    return (
        stored is not None
        and len(stored) == len(want)
        and all(a.same_as(b) for a, b in zip(want, stored, strict=True))
    )


# --------------------------------------------------------------------------------
# shard manifests
# --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShardManifest:
    """How a tensor was cut into ``shard_count`` shards along ``split_dim``
    (``WriterShardManifest``)."""

    dtype: int
    global_shape: tuple[int, ...]
    split_dim: int
    shard_count: int

    def encode(self) -> bytes:
        if len(self.global_shape) > MAX_DIMS:
            raise TensorFormatError(f"tensors have at most {MAX_DIMS} dimensions")
        return _MANIFEST.pack(
            MANIFEST_MAGIC,
            MANIFEST_VERSION,
            MANIFEST_SIZE,
            self.dtype,
            len(self.global_shape),
            self.split_dim,
            self.shard_count,
            0,
            *_dims(self.global_shape),
        )


def parse_manifest(buf: bytes | bytearray | memoryview) -> ShardManifest:
    """Parse a manifest (``parse_writer_shard_manifest``).

    Raises:
        TensorFormatError: too short, wrong magic/version/size, bad ndim,
            shard count or split dim, a negative dimension.
    """
    view = memoryview(buf)
    if len(view) < MANIFEST_SIZE:
        raise TensorFormatError(f"{len(view)} bytes cannot hold a {MANIFEST_SIZE}-byte manifest")
    magic, version, size, dtype, ndim, split_dim, count, _r, *dims = _MANIFEST.unpack_from(view, 0)
    if (
        magic != MANIFEST_MAGIC
        or version != MANIFEST_VERSION
        or size != MANIFEST_SIZE
        or not 0 <= ndim <= MAX_DIMS
        or count <= 0
        or not 0 <= split_dim < ndim
    ):
        raise TensorFormatError("not a valid Mooncake shard manifest")
    shape = tuple(dims[:ndim])
    if any(d < 0 for d in shape):
        raise TensorFormatError("shard manifest has a negative dimension")
    return ShardManifest(dtype, shape, split_dim, count)


# --------------------------------------------------------------------------------
# splitting and joining
# --------------------------------------------------------------------------------


def shard_range(dim: int, rank: int, count: int) -> tuple[int, int]:
    """(start, extent) of shard ``rank`` of ``count`` along a dim of ``dim``
    (``calculate_shard_range``: ``dim * rank // count`` to the next rank's)."""
    if dim < 0 or count <= 0 or not 0 <= rank < count:
        return 0, 0
    start = dim * rank // count
    return start, dim * (rank + 1) // count - start


def check_uniform(shape: Sequence[int], split_dim: int, count: int, what: str) -> None:
    """``validate_uniform_shard_request``.

    Raises:
        InvalidParams: split_dim outside the shape, count < 1, or the dim not
            divisible by count (only uniform sharding is supported).
    """
    if not 0 <= split_dim < len(shape) or count <= 0:
        raise InvalidParams(
            f"{what}: cannot cut a {len(shape)}-d tensor along dim {split_dim} into {count}"
        )
    if shape[split_dim] % count:
        raise InvalidParams(
            f"{what}: dim {split_dim} of size {shape[split_dim]} does not divide into {count} "
            "equal shards (only uniform sharding is supported)"
        )


def _row_layout(shape: Sequence[int], split_dim: int) -> tuple[int, int]:
    """(rows before split_dim, elements after it)."""
    before = _numel(shape[:split_dim])
    after = _numel(shape[split_dim + 1 :])
    return before, after


def split_plan(
    header: TensorHeader, split_dim: int, rank: int, count: int, what: str
) -> tuple[tuple[int, ...], list[tuple[int, int]]]:
    """Which bytes of a stored object (``header`` at offset 0) form shard
    ``rank`` of ``count`` (``build_raw_tensor_shard_write_plan``).

    Returns:
        the shard's local shape, and (source offset, length) ranges of the
        source object, in order.

    Raises:
        InvalidParams: not uniformly divisible, or the source is itself a
            shard cut along another dim.
    """
    shape = header.global_shape
    local = header.local_shape
    if not 0 <= rank < count:
        raise InvalidParams(f"{what}: rank {rank} of {count}")
    check_uniform(shape, split_dim, count, what)
    for d, (g, lo) in enumerate(zip(shape, local, strict=True)):
        if d != split_dim and g != lo:
            raise InvalidParams(f"{what}: the source is cut along dim {d}, not {split_dim}")
    numel = _numel(local)
    esize = header.data_bytes // numel if numel else 0
    start, extent = shard_range(shape[split_dim], rank, count)
    out_shape = tuple(extent if d == split_dim else n for d, n in enumerate(shape))
    if extent == 0 or esize == 0:
        return out_shape, []
    before, after = _row_layout(shape, split_dim)
    row = extent * after * esize
    ranges = [
        (header.data_offset + (i * shape[split_dim] + start) * after * esize, row)
        for i in range(before)
    ]
    return out_shape, ranges


@dataclass(frozen=True, slots=True)
class Fragment:
    """Copy ``size`` bytes from ``src_offset`` of object ``key`` to
    ``dst_offset`` of the destination."""

    key: str
    dst_offset: int
    src_offset: int
    size: int


@dataclass(frozen=True)
class JoinSource:
    """A stored shard that may feed a join: its key and parsed header."""

    key: str
    header: TensorHeader


@dataclass(frozen=True)
class JoinPlan:
    """Fragments that assemble ``header``'s tensor in a destination whose data
    starts right after the 304-byte header (written by the caller)."""

    header: TensorHeader
    fragments: list[Fragment] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return HEADER_SIZE + self.header.data_bytes


def source_range(
    src: JoinSource, global_shape: Sequence[int], split_dim: int, what: str
) -> tuple[int, int]:
    """(start, extent) of a tp shard along ``split_dim``, checked against its
    header (``get_source_shard_range``).

    Raises:
        InvalidParams: shapes disagree, no tp axis, not uniform.
    """
    h = src.header
    if len(h.local_shape) != len(global_shape):
        raise InvalidParams(f"{what}: shard {src.key!r} has shape {h.local_shape}")
    for d, (g, lo) in enumerate(zip(global_shape, h.local_shape, strict=True)):
        if d != split_dim and g != lo:
            raise InvalidParams(f"{what}: shard {src.key!r} has shape {h.local_shape}")
    tp = h.axis(AxisKind.TP)
    if not h.is_shard or tp is None:
        raise InvalidParams(f"{what}: {src.key!r} is not a tensor-parallel shard")
    if tp.split_dim != split_dim:
        raise InvalidParams(
            f"{what}: shard {src.key!r} is cut along dim {tp.split_dim}, not {split_dim}"
        )
    if global_shape[split_dim] % tp.shard_count:
        raise InvalidParams(f"{what}: only uniform sharding is supported")
    start, extent = shard_range(global_shape[split_dim], tp.shard_rank, tp.shard_count)
    if h.local_shape[split_dim] != extent:
        raise InvalidParams(f"{what}: shard {src.key!r} has the wrong extent along dim {split_dim}")
    return start, extent


def join_plan(
    sources: Sequence[JoinSource],
    global_shape: Sequence[int],
    split_dim: int,
    target: TensorHeader,
    target_start: int,
    target_extent: int,
    what: str,
) -> JoinPlan:
    """Plan the rows ``[target_start, +target_extent)`` along ``split_dim`` of
    the tensor that ``sources`` (tp shards) cut
    (``build_reconstructed_tensor_into_plan_from_sources``).

    Raises:
        InvalidParams: a shard does not fit, or the shards leave a gap.
    """
    if not sources:
        raise InvalidParams(f"{what}: no shards to join")
    if not 0 <= split_dim < len(global_shape):
        raise InvalidParams(f"{what}: split_dim {split_dim} is outside the tensor")
    if (
        target_start < 0
        or target_extent < 0
        or target_start + target_extent > global_shape[split_dim]
    ):
        raise InvalidParams(f"{what}: target rows are outside the tensor")
    esize = element_size(sources[0].header.dtype)
    before, after = _row_layout(global_shape, split_dim)
    covered = [False] * target_extent
    fragments: list[Fragment] = []
    for src in sources:
        start, extent = source_range(src, global_shape, split_dim, what)
        lo, hi = max(start, target_start), min(start + extent, target_start + target_extent)
        if hi <= lo:
            continue
        for i in range(lo - target_start, hi - target_start):
            covered[i] = True
        row = (hi - lo) * after * esize
        if row == 0:
            continue
        for s in range(before):
            fragments.append(
                Fragment(
                    src.key,
                    HEADER_SIZE + (s * target_extent + lo - target_start) * after * esize,
                    src.header.data_offset + (s * extent + lo - start) * after * esize,
                    row,
                )
            )
    if not all(covered):
        raise InvalidParams(f"{what}: the shards do not cover the whole tensor")
    data = (
        _numel([target_extent if d == split_dim else n for d, n in enumerate(global_shape)]) * esize
    )
    return JoinPlan(replace(target, data_bytes=data), fragments)
