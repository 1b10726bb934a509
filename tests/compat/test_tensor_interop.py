"""Tensor objects written by either implementation read back on the other.

The reference wheel (``.cache/refvenv``, built by ``tests/interop``) has no
torch of its own; ``tensor_ref_script.py`` borrows this venv's torch and numpy
through ``sys.path`` while ``mooncake`` stays the reference's extension.

1. Bytes: for every dtype and shape kind, the reference's ``_serialize_tensor``
   equals our encoding byte for byte, and the reference's
   ``_deserialize_tensor`` decodes what we encode.
2. A reference cluster (the wheel's ``mooncake_master``): tp shards, a
   multi-axis shard and a single-tp shard with their manifests, written by the
   reference store, equal the objects our planner makes; and shards plus a
   manifest that we encode are joined by the reference's
   ``get_tensor_with_parallelism``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from pymooncake.store._tensor import AxisSpec, ShardManifest, TensorHeader, parse_header  # noqa: E402
from pymooncake.store._tensor_array import describe  # noqa: E402
from pymooncake.store._tensor_store import shard_of  # noqa: E402
from pymooncake.testing import free_port  # noqa: E402

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("tensor_ref_script.py")

CASES = [
    {"name": f"{dtype}_{i}", "dtype": dtype, "shape": shape}
    for dtype in [
        "float32",
        "float64",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "bool",
        "float16",
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
    ]
    for i, shape in enumerate([[3, 5], [], [2, 0, 3], [1, 2, 1, 2, 1, 2, 1, 2]])
]


def ref_python() -> str:
    explicit = os.environ.get("PYMOONCAKE_REF_PYTHON")
    python = explicit or str(REPO / ".cache" / "refvenv" / "bin" / "python")
    if not Path(python).exists():
        message = f"reference wheel unavailable ({python} missing; tests/interop builds it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    probe = subprocess.run(
        [python, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.stdout.strip() != str(sys.version_info[:2]):
        pytest.skip(
            f"the reference venv runs Python {probe.stdout.strip()}, torch here is for {sys.version_info[:2]}"
        )
    return python


def make(dtype_name: str, shape: list[int]) -> torch.Tensor:
    """Same values as ``tensor_ref_script.make``."""
    dtype = getattr(torch, dtype_name)
    n = 1
    for d in shape:
        n *= d
    base = torch.arange(n, dtype=torch.int64) % 7
    if dtype == torch.bool:
        return (base % 2).bool().reshape(shape)
    return (
        base.to(torch.float32).to(dtype).reshape(shape)
        if dtype.is_floating_point
        else base.to(dtype).reshape(shape)
    )


def encode(t: torch.Tensor) -> bytes:
    a = describe(t)
    return a.header().encode() + bytes(a.data)


def run_ref(*args: str, timeout: float = 180) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    out = subprocess.run(
        [ref_python(), str(SCRIPT), sysconfig.get_paths()["purelib"], *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert out.returncode == 0 and "done" in out.stdout, out.stderr[-3000:]


def test_bytes_match_both_ways(tmp_path: Path) -> None:
    (tmp_path / "cases.json").write_text(json.dumps(CASES))
    for case in CASES:
        (tmp_path / f"ours_{case['name']}.bin").write_bytes(
            encode(make(case["dtype"], case["shape"]))
        )
    run_ref(str(tmp_path), "serialize")
    for case in CASES:
        t = make(case["dtype"], case["shape"])
        ref = (tmp_path / f"ref_{case['name']}.bin").read_bytes()
        assert ref == encode(t), case["name"]
        back = json.loads((tmp_path / f"back_{case['name']}.json").read_text())
        # the reference decodes a 0-d tensor as shape (1,) (it reshapes only when ndim > 0);
        # pymooncake keeps the stored shape ()
        want = case["shape"] if case["shape"] else [1]
        assert back == {"dtype": str(t.dtype), "shape": want}, case["name"]
        assert (tmp_path / f"back_{case['name']}.bin").read_bytes() == bytes(encode(t)[304:]), case[
            "name"
        ]


def test_sharded_objects_and_manifests_match_and_join(tmp_path: Path) -> None:
    full = make("float32", [6, 8])
    array = describe(full)
    # our shards of a (6, 12) int16 tensor cut in 3 along dim 1, for the reference to join
    ours = make("int16", [6, 12])
    ours_array = describe(ours)
    keys = []
    for r in range(3):
        obj = shard_of(f"j_tp_{r}", ours_array, 1, r, 3, (AxisSpec("tp", r, 3, 1),), "test")
        (tmp_path / f"in_{obj.key}.bin").write_bytes(
            obj.header.encode() + b"".join(bytes(p) for p in obj.parts)
        )
        keys.append(obj.key)
    (tmp_path / "in_j__parallelism_manifest.bin").write_bytes(
        ShardManifest(ours_array.dtype, (6, 12), 1, 3).encode()
    )
    keys.append("j__parallelism_manifest")
    (tmp_path / "ours.json").write_text(
        json.dumps({"keys": keys, "base": "j", "tp": 3, "split_dim": 1})
    )

    run_ref(str(tmp_path), "cluster", str(free_port()), str(free_port()))

    def obj_bytes(
        key: str, source: object, split: int, rank: int, count: int, axes: tuple[AxisSpec, ...]
    ) -> bytes:
        o = shard_of(key, source, split, rank, count, axes, "test")  # type: ignore[arg-type]
        return o.header.encode() + b"".join(bytes(p) for p in o.parts)

    for r in range(4):  # put_tensor_with_tp
        ref = (tmp_path / f"obj_tp_tp_{r}.bin").read_bytes()
        assert ref == obj_bytes("x", array, 1, r, 4, (AxisSpec("tp", r, 4, 1),)), r
    dp_tp = (AxisSpec("dp", 1, 2), AxisSpec("tp", 1, 2, 0))  # the reference's axis order
    assert (tmp_path / "obj_multi__dp_1of2__tp_1of2_sd0.bin").read_bytes() == obj_bytes(
        "x", array, 0, 1, 2, dp_tp
    )
    manifest = ShardManifest(array.dtype, (6, 8), 0, 2).encode()
    assert (tmp_path / "obj_multi__parallelism_manifest.bin").read_bytes() == manifest
    # single tp axis: the caller's shard, the whole shape inferred
    shard = describe(full.chunk(2, 0)[1].contiguous())
    from pymooncake.store._tensor import shard_header

    single = shard_header(
        shard.dtype, (6, 8), shard.shape, (AxisSpec("tp", 1, 2, 0),)
    ).encode() + bytes(shard.data)
    assert (tmp_path / "obj_single_tp_1.bin").read_bytes() == single
    assert (tmp_path / "obj_single__parallelism_manifest.bin").read_bytes() == manifest
    assert parse_header(single).global_shape == (6, 8)
    # the reference joined our shards
    assert json.loads((tmp_path / "joined.json").read_text()) == {
        "dtype": "torch.int16",
        "shape": [6, 12],
    }
    assert (tmp_path / "joined.bin").read_bytes() == bytes(ours_array.data)
    assert TensorHeader.full(ours_array.dtype, ours_array.shape).data_bytes == 6 * 12 * 2
