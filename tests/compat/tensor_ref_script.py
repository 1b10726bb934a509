"""Reference side of ``test_tensor_interop.py``; runs in the reference wheel's venv.

Usage: ``python tensor_ref_script.py <site-packages with torch> <workdir> <mode> [args]``

``serialize``: writes ``ref_<name>.bin`` (the reference's ``_serialize_tensor``
metadata + element bytes) for each case in ``cases.json``, and reads back
every ``ours_<name>.bin`` with ``_deserialize_tensor`` into ``back_<name>.bin``
(raw element bytes) and ``back_<name>.json`` (dtype, shape).

``cluster <master_port> <metadata_port>``: starts the wheel's
``mooncake_master``, writes sharded tensors through the reference store and
dumps every object it made (``obj_<key>.bin``); then stores our shard objects
(``in_<key>.bin``) with plain ``put`` and joins them with
``get_tensor_with_parallelism`` into ``joined.bin``/``joined.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.append(sys.argv[1])  # torch/numpy from the test venv; mooncake stays the reference's

import torch

import mooncake.store as ms

work = Path(sys.argv[2])
mode = sys.argv[3]


def make(dtype_name: str, shape: list[int]) -> torch.Tensor:
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


def raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""


if mode == "serialize":
    import ctypes

    for case in json.loads((work / "cases.json").read_text()):
        t = make(case["dtype"], case["shape"])
        meta, ptr, size, _owner = ms._serialize_tensor(t)
        (work / f"ref_{case['name']}.bin").write_bytes(
            meta + (ctypes.string_at(ptr, size) if size else b"")
        )
        back = ms._deserialize_tensor((work / f"ours_{case['name']}.bin").read_bytes())
        (work / f"back_{case['name']}.bin").write_bytes(raw(back))
        (work / f"back_{case['name']}.json").write_text(
            json.dumps({"dtype": str(back.dtype), "shape": list(back.shape)})
        )
    print("done")
    sys.exit(0)

master_port, meta_port = int(sys.argv[4]), int(sys.argv[5])
master_bin = Path(ms.__file__).parent / "mooncake_master"
master = subprocess.Popen(
    [
        str(master_bin),
        f"--port={master_port}",
        "--enable_http_metadata_server=true",
        f"--http_metadata_server_port={meta_port}",
        "--default_kv_lease_ttl=500",
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
store = ms.MooncakeDistributedStore()
try:
    rc = -1
    for _ in range(100):
        time.sleep(0.1)
        rc = store.setup(
            "127.0.0.1",
            f"http://127.0.0.1:{meta_port}/metadata",
            64 << 20,
            16 << 20,
            "tcp",
            "",
            f"127.0.0.1:{master_port}",
        )
        if rc == 0:
            break
    assert rc == 0, f"reference setup failed: {rc}"
    full = make("float32", [6, 8])
    keys: list[str] = []
    assert store.put_tensor_with_tp("tp", full, tp_size=4, split_dim=1) == 0
    keys += [f"tp_tp_{r}" for r in range(4)]
    axis = ms.ParallelAxis()
    axis.kind, axis.rank, axis.size, axis.split_dim = "tp", 1, 2, 0
    dp = ms.ParallelAxis()
    dp.kind, dp.rank, dp.size = "dp", 1, 2
    multi = ms.TensorParallelism()
    multi.axes = [dp, axis]
    assert store.put_tensor_with_parallelism("multi", full, multi) == 0
    keys += ["multi__dp_1of2__tp_1of2_sd0", "multi__parallelism_manifest"]
    single = ms.TensorParallelism()
    single.axes = [axis]
    assert (
        store.put_tensor_with_parallelism("single", full.chunk(2, 0)[1].contiguous(), single) == 0
    )
    keys += ["single_tp_1", "single__parallelism_manifest"]
    for name in keys:
        data = store.get(name)
        assert data, f"reference wrote nothing under {name}"
        (work / f"obj_{name}.bin").write_bytes(data)
    # our shards, stored as plain bytes, joined by the reference
    ours = json.loads((work / "ours.json").read_text())
    for name in ours["keys"]:
        assert store.put(name, (work / f"in_{name}.bin").read_bytes()) == 0
    target = ms.ReadTarget()
    target.mode = "full"
    request = ms.TensorParallelism()
    tp = ms.ParallelAxis()
    tp.kind, tp.rank, tp.size, tp.split_dim = "tp", 0, ours["tp"], ours["split_dim"]
    request.axes = [tp]
    target.parallelism = request
    joined = store.get_tensor_with_parallelism(ours["base"], target)
    assert joined is not None, "the reference could not join our shards"
    (work / "joined.bin").write_bytes(raw(joined))
    (work / "joined.json").write_text(
        json.dumps({"dtype": str(joined.dtype), "shape": list(joined.shape)})
    )
    print("done")
finally:
    store.close()
    master.terminate()
    try:
        master.wait(timeout=10)
    except subprocess.TimeoutExpired:
        master.kill()
        master.wait()
    sys.stdout.flush()
    os._exit(0)  # the reference client's threads can hold interpreter exit
