"""The tensor object format (``pymooncake.store._tensor``), without a store.

Byte offsets below are the C layout of the reference's ``TensorMetadata``
(``mooncake-integration/integration_utils.h``) spelled out field by field, so a
change of the struct formats in ``_tensor.py`` cannot go unnoticed; the
interop test (``test_tensor_interop.py``) compares with the reference wheel
itself.  Parsers are fed truncated input and trailing bytes, and every
validation rule is broken once.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymooncake.errors import InvalidParams
from pymooncake.store._tensor import (
    HEADER_SIZE,
    MANIFEST_SIZE,
    AxisKind,
    AxisSpec,
    JoinSource,
    LayoutKind,
    ShardManifest,
    TensorDtype,
    TensorFormatError,
    TensorHeader,
    canonical_axes,
    check_uniform,
    element_size,
    join_plan,
    matches_stored,
    parallelism_key,
    parallelism_manifest_key,
    parse_header,
    parse_header_prefix,
    parse_manifest,
    shard_header,
    shard_range,
    split_plan,
    stored_axes,
    tp_key,
    validate_axes,
    writer_manifest_key,
    writer_shard_key,
)


def u32(b: bytes, off: int) -> int:
    return struct.unpack_from("<I", b, off)[0]


def i64s(b: bytes, off: int, n: int) -> list[int]:
    return list(struct.unpack_from(f"<{n}q", b, off))


def test_sizes_and_dtype_enum() -> None:
    assert HEADER_SIZE == 304 and MANIFEST_SIZE == 96
    assert [(d.name, int(d)) for d in TensorDtype] == [
        ("FLOAT32", 0),
        ("FLOAT64", 1),
        ("INT8", 2),
        ("UINT8", 3),
        ("INT16", 4),
        ("UINT16", 5),
        ("INT32", 6),
        ("UINT32", 7),
        ("INT64", 8),
        ("UINT64", 9),
        ("BOOL", 10),
        ("FLOAT16", 11),
        ("BFLOAT16", 12),
        ("FLOAT8_E4M3", 13),
        ("FLOAT8_E5M2", 14),
    ]
    assert [element_size(d) for d in TensorDtype] == [4, 8, 1, 1, 2, 2, 4, 4, 8, 8, 1, 2, 2, 1, 1]
    with pytest.raises(TensorFormatError):
        element_size(15)


def test_full_header_bytes_field_by_field() -> None:
    h = TensorHeader.full(TensorDtype.FLOAT32, (2, 3))
    b = h.encode()
    assert len(b) == 304
    assert b[:4] == b"NOOM"  # 0x4D4F4F4E little-endian
    assert struct.unpack_from("<HH", b, 4) == (1, 304)  # version, header_size
    assert struct.unpack_from("<iiII", b, 8) == (
        0,
        2,
        LayoutKind.FULL,
        0,
    )  # dtype, ndim, kind, flags
    assert struct.unpack_from("<QQ", b, 24) == (304, 24)  # data_offset, data_bytes
    assert i64s(b, 40, 8) == [2, 3, -1, -1, -1, -1, -1, -1]  # global_shape
    assert i64s(b, 104, 8) == [2, 3, -1, -1, -1, -1, -1, -1]  # local_shape
    assert struct.unpack_from("<II", b, 168) == (0, 0)  # axis_count, reserved
    assert b[176:] == bytes(128)  # four zeroed LayoutAxis
    assert parse_header(b + bytes(24)) == h


def test_shard_header_axes_bytes() -> None:
    axes = (
        AxisSpec("dp", 1, 2),
        AxisSpec("tp", 3, 4, split_dim=1),
        AxisSpec("ep", 0, 2, expert_id=11),
        AxisSpec("PP", 1, 2, stage_id=7),
    )
    h = shard_header(TensorDtype.BFLOAT16, (6, 8), (6, 2), axes)
    b = h.encode()
    assert struct.unpack_from("<iiII", b, 8) == (12, 2, LayoutKind.SHARD, 0)
    assert struct.unpack_from("<QQ", b, 24) == (304, 6 * 2 * 2)
    assert i64s(b, 40, 2) == [6, 8] and i64s(b, 104, 2) == [6, 2]
    assert u32(b, 168) == 4
    rows = [struct.unpack_from("<iiiiiiq", b, 176 + 32 * i) for i in range(4)]
    # kind, axis_index, rank, count, split_dim, reserved0 (expert/stage id), reserved1 (local extent)
    assert rows == [
        (AxisKind.DP, 0, 1, 2, -1, 0, 0),
        (AxisKind.TP, 1, 3, 4, 1, 0, 2),
        (AxisKind.EP, 2, 0, 2, -1, 11, 0),
        (AxisKind.PP, 3, 1, 2, -1, 7, 0),
    ]
    parsed = parse_header(b + bytes(h.data_bytes))
    assert parsed == h
    assert stored_axes(parsed) == canonical_axes(
        (
            AxisSpec("dp", 1, 2),
            AxisSpec("tp", 3, 4, 1),
            AxisSpec("ep", 0, 2, expert_id=11),
            AxisSpec("pp", 1, 2, stage_id=7),
        )
    )
    assert matches_stored(list(reversed(axes)), parsed)
    assert not matches_stored([AxisSpec("tp", 3, 4, 1)], parsed)


def test_zero_dim_and_zero_size_and_eight_dims() -> None:
    scalar = TensorHeader.full(TensorDtype.INT64, ())
    assert scalar.data_bytes == 8 and scalar.ndim == 0
    assert parse_header(scalar.encode() + bytes(8)) == scalar
    empty = TensorHeader.full(TensorDtype.FLOAT16, (2, 0, 3))
    assert empty.data_bytes == 0
    assert parse_header(empty.encode()) == empty
    eight = TensorHeader.full(TensorDtype.UINT8, (1,) * 8)
    assert parse_header(eight.encode() + b"x") == eight
    with pytest.raises(TensorFormatError):
        TensorHeader.full(TensorDtype.UINT8, (1,) * 9).encode()


def _mutate(b: bytes, off: int, fmt: str, value: int) -> bytes:
    out = bytearray(b)
    struct.pack_into(fmt, out, off, value)
    return bytes(out)


@pytest.mark.parametrize(
    ("off", "fmt", "value", "why"),
    [
        (0, "<I", 0x4D4F4F4F, "magic"),
        (4, "<H", 2, "version"),
        (6, "<H", 300, "header size"),
        (8, "<i", 15, "dtype"),
        (8, "<i", -1, "dtype"),
        (12, "<i", 9, "ndim"),
        (12, "<i", -1, "ndim"),
        (16, "<I", 2, "layout kind"),
        (24, "<Q", 303, "data offset"),
        (32, "<Q", 23, "data bytes"),
        (40, "<q", -2, "negative dim"),
        (56, "<q", 5, "unused dim not -1"),
        (168, "<I", 5, "axis count"),
    ],
)
def test_parse_rejects_each_broken_rule(off: int, fmt: str, value: int, why: str) -> None:
    b = TensorHeader.full(TensorDtype.FLOAT32, (2, 3)).encode() + bytes(24)
    with pytest.raises(TensorFormatError):
        parse_header(_mutate(b, off, fmt, value))


def test_parse_rejects_bad_axes_and_lengths() -> None:
    h = shard_header(TensorDtype.FLOAT32, (4, 4), (4, 2), [AxisSpec("tp", 1, 2, 1)])
    b = h.encode() + bytes(h.data_bytes)
    for off, fmt, value in [
        (176, "<i", 5),
        (184, "<i", 2),
        (188, "<i", 0),
        (192, "<i", 2),
        (192, "<i", -2),
    ]:
        with pytest.raises(TensorFormatError):
            parse_header(_mutate(b, off, fmt, value))
    with pytest.raises(TensorFormatError):  # data bytes must fill the object exactly
        parse_header(b + b"\0")
    with pytest.raises(TensorFormatError):
        parse_header(b[:-1])
    assert parse_header(b + b"trailing", len(b)) == h  # a longer buffer holding the object


def test_parse_truncated_one_byte_at_a_time() -> None:
    b = TensorHeader.full(TensorDtype.INT8, (3,)).encode() + b"abc"
    for n in range(len(b)):
        with pytest.raises(TensorFormatError):
            parse_header(b[:n])
    assert parse_header(b).local_shape == (3,)
    assert parse_header_prefix(b[:HEADER_SIZE]).data_bytes == 3  # the size read from the header


def test_manifest_bytes_and_validation() -> None:
    m = ShardManifest(TensorDtype.FLOAT32, (6, 8), 1, 4)
    b = m.encode()
    assert len(b) == 96
    assert b[:4] == b"NAMW"  # 0x574D414E little-endian
    assert struct.unpack_from("<HHiiiii", b, 4) == (1, 96, 0, 2, 1, 4, 0)
    assert b[28:32] == bytes(4)  # padding before the i64 shape
    assert i64s(b, 32, 8) == [6, 8, -1, -1, -1, -1, -1, -1]
    assert parse_manifest(b + b"extra") == m
    for off, fmt, value in [
        (0, "<I", 1),
        (4, "<H", 2),
        (6, "<H", 95),
        (12, "<i", 9),
        (20, "<i", 0),
        (16, "<i", 2),
        (32, "<q", -1),
    ]:
        with pytest.raises(TensorFormatError):
            parse_manifest(_mutate(b, off, fmt, value))
    for n in range(96):
        with pytest.raises(TensorFormatError):
            parse_manifest(b[:n])


def test_key_names() -> None:
    assert tp_key("w", 3) == "w_tp_3"
    assert writer_shard_key("w", 1, 4, 0) == "w__writer_1of4_sd0"
    assert writer_manifest_key("w") == "w__writer_manifest"
    assert parallelism_manifest_key("w") == "w__parallelism_manifest"
    assert parallelism_key("w", [AxisSpec("tp", 2, 4, 0)]) == "w_tp_2"  # one tp axis: legacy name
    axes = [AxisSpec("pp", 0, 2, stage_id=7), AxisSpec("tp", 1, 2, 0), AxisSpec("DP", 1, 3)]
    assert parallelism_key("w", axes) == "w__dp_1of3__tp_1of2_sd0__pp_0of2_sid7"
    assert parallelism_key("w", [AxisSpec("ep", 0, 2, expert_id=11)]) == "w__ep_0of2_eid11"


def test_validate_axes_rules() -> None:
    ok = validate_axes([AxisSpec("tp", 0, 2, 0), AxisSpec("dp", 1, 2)], "t")
    assert len(ok) == 2
    bad = [
        [],
        [AxisSpec("tp", 0, 2, 0)] * 2,
        [AxisSpec("tp", 2, 2, 0)],
        [AxisSpec("tp", 0, 0, 0)],
        [AxisSpec("tp", 0, 2)],
        [AxisSpec("dp", 0, 2, split_dim=0)],
        [AxisSpec("ep", 0, 2)],
        [AxisSpec("pp", 0, 2)],
        [AxisSpec("xp", 0, 2)],
        [
            AxisSpec("tp", 0, 2, 0),
            AxisSpec("dp", 0, 2),
            AxisSpec("ep", 0, 2, expert_id=1),
            AxisSpec("pp", 0, 2, stage_id=1),
            AxisSpec("tp", 1, 2, 0),
        ],
    ]
    for axes in bad:
        with pytest.raises(InvalidParams):
            validate_axes(axes, "t")


def test_shard_range_and_uniform_check() -> None:
    assert [shard_range(10, r, 4) for r in range(4)] == [(0, 2), (2, 3), (5, 2), (7, 3)]
    assert shard_range(8, 4, 4) == (0, 0)
    check_uniform((8, 12), 1, 4, "t")
    with pytest.raises(InvalidParams, match="uniform"):
        check_uniform((8, 10), 1, 4, "t")
    with pytest.raises(InvalidParams):
        check_uniform((8,), 1, 2, "t")


def _split_and_join(
    arr: np.ndarray, split_dim: int, count: int, read_count: int, read_rank: int
) -> np.ndarray:
    """Cut ``arr`` into ``count`` stored shards with split_plan, join rows of
    rank ``read_rank`` of ``read_count`` back with join_plan."""
    code = {np.dtype("float32"): TensorDtype.FLOAT32, np.dtype("int16"): TensorDtype.INT16}[
        arr.dtype
    ]
    full = TensorHeader.full(code, arr.shape)
    obj = full.encode() + arr.tobytes()
    stored = {}
    for r in range(count):
        local, ranges = split_plan(full, split_dim, r, count, "t")
        h = shard_header(code, arr.shape, local, [AxisSpec("tp", r, count, split_dim)])
        stored[f"k{r}"] = h.encode() + b"".join(obj[o : o + n] for o, n in ranges)
    sources = [JoinSource(k, parse_header(v)) for k, v in stored.items()]
    start, extent = shard_range(arr.shape[split_dim], read_rank, read_count)
    local = tuple(extent if d == split_dim else n for d, n in enumerate(arr.shape))
    plan = join_plan(
        sources, arr.shape, split_dim, TensorHeader.full(code, local), start, extent, "t"
    )
    out = bytearray(plan.total_bytes)
    out[:HEADER_SIZE] = plan.header.encode()
    for f in plan.fragments:
        out[f.dst_offset : f.dst_offset + f.size] = stored[f.key][
            f.src_offset : f.src_offset + f.size
        ]
    h = parse_header(out)
    return np.frombuffer(bytes(out[HEADER_SIZE:]), dtype=arr.dtype).reshape(h.local_shape)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    data=st.data(),
)
def test_split_then_join_is_identity_and_reshards(shape: list[int], data: st.DataObject) -> None:
    split_dim = data.draw(st.integers(0, len(shape) - 1))
    count = data.draw(st.sampled_from([1, 2, 3, 4]))
    shape[split_dim] = shape[split_dim] * count  # uniform
    read_count = data.draw(
        st.sampled_from([d for d in (1, 2, 3, 4, 6, 8) if shape[split_dim] % d == 0])
    )
    read_rank = data.draw(st.integers(0, read_count - 1))
    arr = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    got = _split_and_join(arr, split_dim, count, read_count, read_rank)
    start, extent = shard_range(shape[split_dim], read_rank, read_count)
    np.testing.assert_array_equal(got, np.take(arr, range(start, start + extent), axis=split_dim))


def test_join_rejects_gaps_and_foreign_shards() -> None:
    arr = np.arange(24, dtype=np.int16).reshape(4, 6)
    full = TensorHeader.full(TensorDtype.INT16, arr.shape)
    shards = [
        JoinSource(
            f"k{r}",
            shard_header(
                TensorDtype.INT16,
                arr.shape,
                split_plan(full, 1, r, 3, "t")[0],
                [AxisSpec("tp", r, 3, 1)],
            ),
        )
        for r in range(3)
    ]
    with pytest.raises(InvalidParams, match="cover"):
        join_plan(shards[:2], arr.shape, 1, full, 0, 6, "t")
    with pytest.raises(InvalidParams):  # cut along dim 1, joined along dim 0
        join_plan(shards, arr.shape, 0, full, 0, 4, "t")
    whole = JoinSource("w", full)
    with pytest.raises(InvalidParams, match="not a tensor-parallel shard"):
        join_plan([whole], arr.shape, 1, full, 0, 6, "t")
    assert np.array_equal(_split_and_join(arr, 1, 3, 2, 1), arr[:, 3:])
