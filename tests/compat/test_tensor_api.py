"""The tensor API of ``mooncake.store.MooncakeDistributedStore`` against a real master.

Covers every dtype of the reference's enum and every shape kind (0-d, 1-8 d,
zero-size, non-contiguous, numpy input), the batch, ``_from``/``_into``,
``pub``, ``upsert`` (size changes), ``_with_tp`` and ``_with_parallelism``
families with the reference's return conventions (0 / negative code, tensor
/ ``None``), safetensors files, concurrency, and what happens without torch.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from store_support import LOCAL, MiB, Stores, new_cluster

torch = pytest.importorskip("torch")

from mooncake.store import (  # noqa: E402
    MooncakeDistributedStore,
    ParallelAxis,
    ReadTarget,
    ReplicateConfig,
    TensorParallelism,
    _deserialize_tensor,
    _serialize_tensor,
    _tensor_metadata_size,
)
from pymooncake.testing import LocalCluster  # noqa: E402

INVALID_PARAMS = -600
OBJECT_NOT_FOUND = -704
FILE_NOT_FOUND = -1100
HEADER = 304

ALL_DTYPES = [
    torch.float32,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.uint16,
    torch.int32,
    torch.uint32,
    torch.int64,
    torch.uint64,
    torch.bool,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with new_cluster() as c:
        yield c


@pytest.fixture
def stores(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stores]:
    monkeypatch.setenv("MC_TCP_BIND_ADDRESS", LOCAL)
    made = Stores(cluster)
    try:
        yield made
    finally:
        made.close_all()


@pytest.fixture
def store(stores: Stores) -> MooncakeDistributedStore:
    return stores.new(64 * MiB, 16 * MiB)


@pytest.fixture
def registered(store: MooncakeDistributedStore) -> Iterator[tuple[int, int]]:
    size = 4 * MiB
    buf = (ctypes.c_ubyte * size)()
    ptr = ctypes.addressof(buf)
    assert store.register_buffer(ptr, size) == 0
    yield ptr, size
    assert store.unregister_buffer(ptr) == 0
    del buf


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(
        0,
        256,
        (int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size(),),
        generator=g,
        dtype=torch.uint8,
    )
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    if dtype.is_floating_point:  # random bytes can be NaN: build values instead
        return (torch.randn(shape, generator=g) * 4).to(dtype)
    return raw.view(dtype).reshape(shape) if raw.numel() else torch.empty(shape, dtype=dtype)


def raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""


def same(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Equal dtype, shape and bytes (NaN-safe)."""
    return b is not None and a.dtype == b.dtype and a.shape == b.shape and raw(a) == raw(b)


# ----------------------------------------------------------------------------------------
# whole tensors
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips(store: MooncakeDistributedStore, dtype: torch.dtype) -> None:
    t = sample(dtype, (3, 5), seed=int(ALL_DTYPES.index(dtype)))
    key = f"dtype_{dtype!s}"
    assert store.put_tensor(key, t) == 0
    assert store.get_size(key) == HEADER + t.numel() * t.element_size()
    assert same(t, store.get_tensor(key))


@pytest.mark.parametrize(
    "shape",
    [
        (),
        (1,),
        (7,),
        (2, 3),
        (2, 3, 4),
        (1, 2, 1, 2, 1, 2, 1, 2),
        (0,),
        (0, 4096),
        (2, 0, 3),
        (1, 0),
    ],
    ids=str,
)
def test_every_shape_kind_round_trips(
    store: MooncakeDistributedStore, shape: tuple[int, ...]
) -> None:
    t = sample(torch.float32, shape)
    key = f"shape_{shape}"
    assert store.put_tensor(key, t) == 0
    back = store.get_tensor(key)
    assert back is not None and tuple(back.shape) == shape and same(t, back)
    assert store.batch_get_tensor([key])[0].shape == t.shape


def test_non_contiguous_cuda_like_and_numpy_inputs(store: MooncakeDistributedStore) -> None:
    base = torch.arange(24, dtype=torch.int32).reshape(4, 6)
    view = base.t()  # not contiguous: stored contiguous
    assert store.put_tensor("noncontig", view) == 0
    assert torch.equal(store.get_tensor("noncontig"), view)
    arr = np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2]  # numpy, strided
    assert store.put_tensor("numpy", arr) == 0
    got = store.get_tensor("numpy")
    assert isinstance(got, torch.Tensor) and np.array_equal(got.numpy(), arr)
    assert store.put_tensor("numpy_bool", np.array([True, False])) == 0
    assert store.get_tensor("numpy_bool").tolist() == [True, False]
    param = torch.nn.Parameter(torch.ones(2))  # a Tensor subclass that requires grad
    assert store.put_tensor("param", param) == 0
    assert torch.equal(store.get_tensor("param"), torch.ones(2))


def test_bad_inputs_return_invalid_params(store: MooncakeDistributedStore) -> None:
    assert store.put_tensor("bad", [1, 2, 3]) == INVALID_PARAMS
    assert store.put_tensor("bad", torch.zeros(2, dtype=torch.complex64)) == INVALID_PARAMS
    assert store.put_tensor("bad", torch.zeros((1,) * 9)) == INVALID_PARAMS
    assert store.put_tensor("bad", np.zeros(2, dtype=np.complex64)) == INVALID_PARAMS
    assert store.get_tensor("missing") is None
    assert store.put("not_a_tensor", b"x" * 400) == 0
    assert store.get_tensor("not_a_tensor") is None  # not a "MOON" object


def test_batch_put_get_and_mixed_results(store: MooncakeDistributedStore) -> None:
    tensors = [
        torch.arange(16, dtype=torch.float32).reshape(4, 4),
        torch.arange(24, dtype=torch.int64).reshape(2, 3, 4),
    ]
    assert store.batch_put_tensor(["b0", "b1"], tensors) == [0, 0]
    got = store.batch_get_tensor(["b0", "missing", "b1"])
    assert torch.equal(got[0], tensors[0]) and got[1] is None and torch.equal(got[2], tensors[1])
    assert store.batch_put_tensor(["x", "y"], [tensors[0], "nope"]) == [0, INVALID_PARAMS]
    assert store.batch_put_tensor(["x"], []) == [INVALID_PARAMS]
    assert store.batch_put_tensor([], []) == []
    assert store.put_tensor("b0", torch.zeros(1)) == 0  # puts never overwrite
    assert torch.equal(store.get_tensor("b0"), tensors[0])


def test_upsert_tensor_replaces_with_other_sizes(store: MooncakeDistributedStore) -> None:
    assert store.upsert_tensor("u", torch.ones(4)) == 0
    assert store.upsert_tensor("u", torch.full((2, 8), 3, dtype=torch.int16)) == 0
    assert torch.equal(store.get_tensor("u"), torch.full((2, 8), 3, dtype=torch.int16))
    assert store.batch_upsert_tensor(["u", "u2"], [torch.zeros(100), torch.ones(1)]) == [0, 0]
    assert torch.equal(store.get_tensor("u"), torch.zeros(100))
    config = ReplicateConfig()
    config.replica_num = 1
    assert store.upsert_pub_tensor("u", torch.ones(3), config) == 0
    assert store.batch_upsert_pub_tensor(["u", "u3"], [torch.ones(5), torch.ones(6)], config) == [
        0,
        0,
    ]
    assert store.get_tensor("u").shape == (5,)


def test_pub_tensor_validates_config(store: MooncakeDistributedStore) -> None:
    config = ReplicateConfig()
    config.replica_num = 1
    assert store.pub_tensor("p", torch.ones(3), config) == 0
    config.preferred_segments = ["a", "b"]  # must be one per replica
    assert store.pub_tensor("p2", torch.ones(3), config) == INVALID_PARAMS
    assert store.batch_pub_tensor(["p3"], [torch.ones(1)], config) == [INVALID_PARAMS]
    config = ReplicateConfig()
    config.group_ids = ["g1"]  # one per key
    assert (
        store.batch_pub_tensor(["p4", "p5"], [torch.ones(1), torch.ones(1)], config)
        == [INVALID_PARAMS] * 2
    )


def test_replicated_pub_tensor_reads_from_either_replica(stores: Stores) -> None:
    a, b = stores.new(32 * MiB, 16 * MiB), stores.new(32 * MiB, 16 * MiB)
    config = ReplicateConfig()
    config.replica_num = 2
    t = torch.randn(64, 64)
    assert a.pub_tensor("rep", t, config) == 0
    assert len(a.get_replica_desc("rep")) == 2
    assert torch.equal(b.get_tensor("rep"), t)


# ----------------------------------------------------------------------------------------
# zero-copy forms
# ----------------------------------------------------------------------------------------


def test_into_and_from_share_registered_memory(
    store: MooncakeDistributedStore, registered: tuple[int, int]
) -> None:
    ptr, size = registered
    t = torch.randn(32, 16)
    assert store.put_tensor("src", t) == 0
    got = store.get_tensor_into("src", ptr, size)
    assert torch.equal(got, t)
    assert got.data_ptr() == ptr + HEADER  # a view of the caller's buffer
    total = store.get_size("src")
    assert store.put_tensor_from("dst", ptr, total) == 0
    assert torch.equal(store.get_tensor("dst"), t)
    assert store.upsert_tensor_from("dst", ptr, total) == 0
    # invalid buffers
    assert store.put_tensor_from("x", 0, total) == INVALID_PARAMS
    assert store.put_tensor_from("x", ptr, 100) == INVALID_PARAMS
    assert store.put_tensor_from("x", ptr, total - 1) == INVALID_PARAMS
    assert store.get_tensor_into("src", 0, size) is None
    assert store.get_tensor_into("src", ptr, 100) is None  # too small
    assert store.get_tensor_into("missing", ptr, size) is None


def test_batch_into_and_from(store: MooncakeDistributedStore, registered: tuple[int, int]) -> None:
    ptr, _size = registered
    tensors = [torch.arange(10, dtype=torch.int32), torch.ones(3, 3)]
    assert store.batch_put_tensor(["f0", "f1"], tensors) == [0, 0]
    ptrs = [ptr, ptr + MiB]
    got = store.batch_get_tensor_into(["f0", "f1"], ptrs, [MiB, MiB])
    assert all(torch.equal(g, t) for g, t in zip(got, tensors, strict=True))
    sizes = [store.get_size("f0"), store.get_size("f1")]
    assert store.batch_put_tensor_from(["g0", "g1"], ptrs, sizes) == [0, 0]
    assert store.batch_upsert_tensor_from(["g0", "g1"], ptrs, sizes) == [0, 0]
    assert torch.equal(store.get_tensor("g1"), tensors[1])
    assert store.batch_get_tensor_into(["f0"], [ptr, ptr], [1]) == [INVALID_PARAMS]
    assert store.batch_get_tensor_into(["f0"], [0], [MiB]) == [INVALID_PARAMS]
    assert store.batch_put_tensor_from([], [], []) == []
    assert store.batch_put_tensor_from(["a", "b"], [ptr, 0], sizes) == [INVALID_PARAMS] * 2
    assert store.get_tensor_into_cuda("f0", torch.empty(10, dtype=torch.int32)) == INVALID_PARAMS


def test_zero_size_tensor_into_and_from(
    store: MooncakeDistributedStore, registered: tuple[int, int]
) -> None:
    ptr, size = registered
    t = torch.empty((2, 0, 3))
    assert store.put_tensor("z", t) == 0
    assert store.get_size("z") == HEADER
    got = store.get_tensor_into("z", ptr, size)
    assert got.shape == (2, 0, 3)
    assert store.put_tensor_from("z2", ptr, HEADER) == 0
    assert store.get_tensor("z2").shape == (2, 0, 3)


# ----------------------------------------------------------------------------------------
# tensor parallelism: <key>_tp_<rank>
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "split_dim", "tp"),
    [((8, 12), 0, 4), ((6, 9), 1, 3), ((2, 4, 6), 2, 2), ((2, 0, 3), 0, 2)],
)
def test_tp_shards_cut_the_tensor(
    store: MooncakeDistributedStore, shape: tuple[int, ...], split_dim: int, tp: int
) -> None:
    t = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
    key = f"tp_{shape}_{split_dim}"
    assert store.put_tensor_with_tp(key, t, tp_size=tp, split_dim=split_dim) == 0
    parts = []
    for r in range(tp):
        assert store.is_exist(f"{key}_tp_{r}") == 1
        part = store.get_tensor_with_tp(key, tp_rank=r, tp_size=tp, split_dim=split_dim)
        assert torch.equal(
            part,
            t.chunk(tp, split_dim)[r]
            if t.numel()
            else t.narrow(split_dim, r, shape[split_dim] // tp),
        )
        parts.append(part)
    assert torch.equal(torch.cat(parts, split_dim), t)
    assert store.get_tensor_with_tp(key, 0, 1) is None  # tp_size 1 reads the key itself


def test_tp_rejects_non_uniform_and_batches(
    store: MooncakeDistributedStore, registered: tuple[int, int]
) -> None:
    assert (
        store.put_tensor_with_tp("nu", torch.ones(10, 3), tp_size=4, split_dim=0) == INVALID_PARAMS
    )
    assert store.put_tensor_with_tp("nu", torch.ones(4), tp_size=2, split_dim=1) == INVALID_PARAMS
    tensors = [torch.randn(4, 4), torch.randn(8, 2)]
    assert store.batch_put_tensor_with_tp(["bt0", "bt1"], tensors, tp_size=2, split_dim=0) == [0, 0]
    for r in range(2):
        got = store.batch_get_tensor_with_tp(["bt0", "bt1"], tp_rank=r, tp_size=2)
        assert all(torch.equal(g, t.chunk(2, 0)[r]) for g, t in zip(got, tensors, strict=True))
    config = ReplicateConfig()
    assert store.pub_tensor_with_tp("pt", tensors[0], config, tp_size=2, split_dim=1) == 0
    assert store.batch_pub_tensor_with_tp(["pb"], [tensors[1]], config, tp_size=2, split_dim=0) == [
        0
    ]
    assert torch.equal(store.get_tensor("pt_tp_1"), tensors[0].chunk(2, 1)[1])
    # the _from forms cut the whole tensor found in the buffer
    ptr, size = registered
    assert store.put_tensor("seed", torch.arange(12).reshape(3, 4)) == 0
    n = store.get_size("seed")
    assert store.get_tensor_into("seed", ptr, size) is not None
    assert store.put_tensor_with_tp_from("tf", ptr, n, tp_rank=1, tp_size=2, split_dim=1) == 0
    assert torch.equal(
        store.get_tensor_with_tp_into("tf", ptr + MiB, MiB, tp_rank=1, tp_size=2),
        torch.arange(12).reshape(3, 4)[:, 2:],
    )
    assert store.batch_put_tensor_with_tp_from(["tb"], [ptr], [n], tp_size=3, split_dim=0) == [0]
    got = store.batch_get_tensor_with_tp_into(["tb"], [ptr + MiB], [MiB], tp_rank=2, tp_size=3)
    assert torch.equal(got[0], torch.arange(12).reshape(3, 4)[2:])
    assert store.batch_put_tensor_with_tp_from(
        ["tc", "td"], [ptr, 0], [n, n], tp_size=3, split_dim=0
    ) == [0, INVALID_PARAMS]


# ----------------------------------------------------------------------------------------
# unified parallelism
# ----------------------------------------------------------------------------------------


def axis(kind: str, rank: int, size: int, split_dim: int | None = None, **ids: int) -> ParallelAxis:
    a = ParallelAxis()
    a.kind, a.rank, a.size, a.split_dim = kind, rank, size, split_dim
    for name, value in ids.items():
        setattr(a, name, value)
    return a


def layout(*axes: ParallelAxis) -> TensorParallelism:
    p = TensorParallelism()
    p.axes = list(axes)
    return p


def target(mode: str, parallelism: TensorParallelism | None = None) -> ReadTarget:
    t = ReadTarget()
    t.mode = mode
    t.parallelism = parallelism
    return t


@dataclass
class WriterPartition:
    rank: int
    size: int
    split_dim: int


def test_parallel_types_behave_like_pybind() -> None:
    a = axis("tp", 1, 2, 0)
    p = layout(a)
    a.rank = 0  # assignment copied the axis
    assert p.axes[0].rank == 1
    p.axes[0].rank = 1  # but read-back axes are live
    for ax in p.axes:
        ax.size = 4
    assert p.axes[0].size == 4
    t = target("FULL", p)
    assert t.mode == "full" and t.parallelism is not p
    with pytest.raises(RuntimeError, match="Unsupported ReadTarget mode"):
        t.mode = "sideways"
    with pytest.raises(TypeError):
        a.rank = "1"  # type: ignore[assignment]
    assert ReadTarget().mode == "as_stored" and ParallelAxis().split_dim is None


def test_single_tp_layout_writes_local_shards_and_joins(
    store: MooncakeDistributedStore, registered: tuple[int, int]
) -> None:
    full = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    for r in range(4):
        assert (
            store.put_tensor_with_parallelism(
                "u", full.chunk(4, 1)[r].contiguous(), layout(axis("tp", r, 4, 1))
            )
            == 0
        )
    assert store.is_exist("u__parallelism_manifest") == 1
    assert torch.equal(store.get_tensor_with_tp("u", 2, 4), full.chunk(4, 1)[2])
    for read_tp in (1, 2, 4, 8):
        for r in range(read_tp):
            shard = store.get_tensor_with_parallelism(
                "u", target("shard", layout(axis("tp", r, read_tp, 1)))
            )
            assert torch.equal(shard, full.chunk(read_tp, 1)[r]), (read_tp, r)
    whole = store.get_tensor_with_parallelism("u", target("full", layout(axis("tp", 0, 2, 1))))
    assert torch.equal(whole, full)
    ptr, size = registered
    into = store.get_tensor_with_parallelism_into(
        "u", ptr, size, target("full", layout(axis("tp", 3, 4, 1)))
    )
    assert torch.equal(into, full) and into.data_ptr() == ptr + HEADER
    assert (
        store.get_tensor_with_parallelism_into(
            "u", ptr, 100, target("full", layout(axis("tp", 0, 4, 1)))
        )
        is None
    )
    assert (
        store.get_tensor_with_parallelism("u", target("full", layout(axis("tp", 0, 4, 0)))) is None
    )  # wrong split


def test_multi_axis_layouts_and_their_keys(store: MooncakeDistributedStore) -> None:
    full = torch.arange(36, dtype=torch.int64).reshape(4, 9)
    for r in range(3):
        assert (
            store.put_tensor_with_parallelism(
                "m", full, layout(axis("dp", 1, 2), axis("tp", r, 3, 1))
            )
            == 0
        )
    assert store.is_exist("m__dp_1of2__tp_2of3_sd1") == 1
    req = layout(axis("tp", 1, 3, 1), axis("dp", 1, 2))  # axis order does not matter
    assert torch.equal(
        store.get_tensor_with_parallelism("m", target("shard", req)), full.chunk(3, 1)[1]
    )
    assert torch.equal(store.get_tensor_with_parallelism("m", target("full", req)), full)
    assert (
        store.get_tensor_with_parallelism(
            "m", target("shard", layout(axis("dp", 0, 2), axis("tp", 1, 3, 1)))
        )
        is None
    )
    pp = layout(axis("pp", 0, 2, stage_id=7), axis("tp", 0, 2, 0))
    assert store.put_tensor_with_parallelism("pp", full, pp) == 0
    assert store.is_exist("pp__tp_0of2_sd0__pp_0of2_sid7") == 1
    ep = layout(axis("ep", 0, 2, expert_id=11))
    assert store.put_tensor_with_parallelism("ep", full, ep) == 0
    assert torch.equal(store.get_tensor_with_parallelism("ep__ep_0of2_eid11"), full)
    assert torch.equal(store.get_tensor_with_parallelism("ep", target("shard", ep)), full)


def test_invalid_parallel_requests(store: MooncakeDistributedStore) -> None:
    t = torch.ones(8, 8)
    assert (
        store.put_tensor_with_parallelism("bad", t, layout(axis("dp", 0, 2, 0))) == INVALID_PARAMS
    )
    assert store.put_tensor_with_parallelism("bad", t, layout(axis("ep", 0, 2))) == INVALID_PARAMS
    assert store.put_tensor_with_parallelism("bad", t, layout(axis("xx", 0, 2))) == INVALID_PARAMS
    assert store.put_tensor_with_parallelism("bad", t, layout()) == INVALID_PARAMS
    assert (
        store.put_tensor_with_parallelism("bad", t, layout(axis("tp", 0, 3, 0), axis("dp", 0, 2)))
        == INVALID_PARAMS
    )
    both = store.put_tensor_with_parallelism(
        "bad", t, layout(axis("tp", 0, 2, 0)), writer_partition=WriterPartition(0, 2, 0)
    )
    assert both == INVALID_PARAMS
    assert (
        store.put_tensor_with_parallelism("bad", t, writer_partition=WriterPartition(2, 2, 0))
        == INVALID_PARAMS
    )
    assert store.batch_put_tensor_with_parallelism(
        ["a"], [t], [layout(axis("tp", 0, 2, 0))], writer_partitions=[WriterPartition(0, 2, 0)]
    ) == [INVALID_PARAMS]
    assert store.batch_put_tensor_with_parallelism(["a", "b"], [t], None) == [INVALID_PARAMS] * 2
    assert store.batch_put_tensor_with_parallelism(["a"], [t], "not a list") == [INVALID_PARAMS]
    assert store.get_tensor_with_parallelism("missing") is None
    assert (
        store.get_tensor_with_parallelism("missing", target("full", layout(axis("dp", 0, 2))))
        is None
    )
    assert store.batch_get_tensor_with_parallelism(["a", "b"], [target("as_stored")]) == [
        None,
        None,
    ]


def test_writer_partitions_join_and_from_forms(
    store: MooncakeDistributedStore, registered: tuple[int, int]
) -> None:
    full = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    assert store.batch_put_tensor_with_parallelism(
        ["w"] * 1, [full], writer_partitions=[WriterPartition(0, 4, 1)]
    ) == [0]
    for r in range(1, 4):
        assert (
            store.put_tensor_with_parallelism("w", full, writer_partition=WriterPartition(r, 4, 1))
            == 0
        )
    assert store.is_exist("w__writer_2of4_sd1") == 1
    assert torch.equal(store.get_tensor_with_parallelism("w", target("full")), full)
    assert torch.equal(
        store.get_tensor_with_parallelism("w", target("shard", layout(axis("tp", 1, 4, 1)))),
        full.chunk(4, 1)[1],
    )
    ptr, size = registered
    assert torch.equal(store.get_tensor_with_parallelism_into("w", ptr, size, target("full")), full)
    # _from: the buffer holds the whole tensor object
    assert store.put_tensor("seed", full) == 0
    n = store.get_size("seed")
    assert store.get_tensor_into("seed", ptr, size) is not None
    assert (
        store.put_tensor_with_parallelism_from(
            "wf", ptr, n, writer_partition=WriterPartition(1, 2, 0)
        )
        == 0
    )
    assert (
        store.put_tensor_with_parallelism_from(
            "wf", ptr, n, writer_partition=WriterPartition(0, 2, 0)
        )
        == 0
    )
    assert torch.equal(store.get_tensor_with_parallelism("wf", target("full")), full)
    assert store.put_tensor_with_parallelism_from("tf", ptr, n, layout(axis("tp", 0, 2, 0))) == 0
    assert torch.equal(store.get_tensor("tf_tp_1"), full.chunk(2, 0)[1])  # every rank's shard
    assert store.batch_put_tensor_with_parallelism_from(["d"], [ptr], [n]) == [0]
    assert torch.equal(store.get_tensor_with_parallelism("d"), full)
    assert store.upsert_tensor_with_parallelism_from("d", ptr, n, layout(axis("dp", 0, 2))) == 0
    assert torch.equal(store.get_tensor("d__dp_0of2"), full)
    assert store.batch_upsert_tensor_with_parallelism_from(
        ["d"], [ptr], [n], [layout(axis("tp", 1, 2, 1))]
    ) == [0]


def test_upsert_parallel_replaces_shards(store: MooncakeDistributedStore) -> None:
    a, b = torch.zeros(4, 4), torch.ones(4, 4)
    for r in range(2):
        assert (
            store.upsert_tensor_with_parallelism(
                "up", a, layout(axis("dp", 0, 1), axis("tp", r, 2, 0))
            )
            == 0
        )
    for r in range(2):
        assert store.batch_upsert_tensor_with_parallelism(
            ["up"], [b], [layout(axis("dp", 0, 1), axis("tp", r, 2, 0))]
        ) == [0]
    assert torch.equal(
        store.get_tensor_with_parallelism(
            "up", target("full", layout(axis("tp", 0, 2, 0), axis("dp", 0, 1)))
        ),
        b,
    )
    assert (
        store.upsert_tensor_with_parallelism("up2", b, writer_partition=WriterPartition(0, 1, 0))
        == 0
    )
    assert store.batch_upsert_tensor_with_parallelism(["up3"], [b]) == [0]


def test_batch_parallel_reads(store: MooncakeDistributedStore, registered: tuple[int, int]) -> None:
    tensors = [torch.randn(4, 6), torch.randn(8, 2)]
    for r in range(2):
        shards = [t.chunk(2, 0)[r].contiguous() for t in tensors]
        assert store.batch_put_tensor_with_parallelism(
            ["p0", "p1"], shards, [layout(axis("tp", r, 2, 0))] * 2
        ) == [0, 0]
    full = store.batch_get_tensor_with_parallelism(
        ["p0", "p1"], [target("full", layout(axis("tp", 0, 2, 0)))] * 2
    )
    assert all(torch.equal(g, t) for g, t in zip(full, tensors, strict=True))
    ptr, _ = registered
    got = store.batch_get_tensor_with_parallelism_into(
        ["p0", "p1"],
        [ptr, ptr + MiB],
        [MiB, MiB],
        [target("shard", layout(axis("tp", 1, 2, 0)))] * 2,
    )
    assert all(torch.equal(g, t.chunk(2, 0)[1]) for g, t in zip(got, tensors, strict=True))
    assert store.batch_get_tensor_with_parallelism_into(["p0"], [ptr], []) == [None]
    assert torch.equal(
        store.batch_get_tensor_with_parallelism(["p0_tp_0"])[0], tensors[0].chunk(2, 0)[0]
    )


# ----------------------------------------------------------------------------------------
# safetensors, module helpers, concurrency, no torch
# ----------------------------------------------------------------------------------------


def test_safetensors_files(store: MooncakeDistributedStore, tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    t = torch.randn(5, 3).to(torch.bfloat16)
    assert store.put_tensor("st", t) == 0
    path = tmp_path / "st.safetensors"
    assert store.save_tensor_to_safetensor("st", str(path)) == 0
    assert store.save_tensor_to_safetensor("missing", str(tmp_path / "m")) == FILE_NOT_FOUND
    loaded = store.load_tensor_from_safetensor(
        "st_copy", str(path)
    )  # not in the file: first tensor
    assert torch.equal(loaded, t) and torch.equal(store.get_tensor("st_copy"), t)
    assert store.load_tensor_from_safetensor(file_name=str(tmp_path / "nope")) is None
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert store.save_tensor_to_safetensor("st") == 0  # default file name: the key
        assert (tmp_path / "st").exists()
        assert torch.equal(
            store.load_tensor_from_safetensor(file_name="st"), t
        )  # key: the file name
    finally:
        os.chdir(cwd)


def test_module_serializers() -> None:
    t = torch.arange(6, dtype=torch.int16).reshape(2, 3)
    meta, ptr, n, owner = _serialize_tensor(t)
    assert len(meta) == _tensor_metadata_size() == HEADER and n == 12
    back = _deserialize_tensor(meta + ctypes.string_at(ptr, n))
    assert torch.equal(back, t)
    with pytest.raises(ValueError):
        _deserialize_tensor(b"junk" * 100)
    with pytest.raises(ValueError):
        _serialize_tensor("not a tensor")
    assert owner is not None


def test_concurrent_tensor_puts_and_gets(store: MooncakeDistributedStore) -> None:
    tensors = {f"c{i}": torch.full((64, 64), i, dtype=torch.float32) for i in range(32)}

    def work(item: tuple[str, torch.Tensor]) -> bool:
        key, t = item
        return store.put_tensor(key, t) == 0 and torch.equal(store.get_tensor(key), t)

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, tensors.items()))


def test_without_torch_tensor_methods_say_what_to_install(cluster: LocalCluster) -> None:
    script = """
import sys
sys.modules["torch"] = None  # import torch now fails
from mooncake.store import MooncakeDistributedStore
from pymooncake.store._tensor_array import TorchRequired
s = MooncakeDistributedStore()
for call in (lambda: s.put_tensor("k", [1]), lambda: s.get_tensor("k"),
             lambda: s.get_tensor_with_parallelism("k"), lambda: s.batch_put_tensor(["k"], [1])):
    try:
        call()
    except TorchRequired as exc:
        assert "pymooncake[torch]" in str(exc), exc
    else:
        raise SystemExit("no TorchRequired")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
