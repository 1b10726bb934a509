"""``mooncake.structured_object_store``: bundles, structured objects, DataProtos.

Most tests run over :class:`MemStore`, a dict-backed store whose fast paths
(registration, ``get_into``/``get_into_ranges``/``batch_get_into``,
``batch_put_from``, ``put_tensor``/``get_tensor``) can be switched off to
exercise each fallback; it counts calls and records write configs.  The last
tests run over a real cluster (``MooncakeDistributedStore``, whose BufferPool
the transfer makes itself).
"""

from __future__ import annotations

import ctypes
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("msgpack")

from store_support import LOCAL, MiB, Stores, new_cluster  # noqa: E402

import mooncake.structured_object_store as sos  # noqa: E402
from mooncake.store import MooncakeDistributedStore, ReplicateConfig  # noqa: E402
from mooncake.structured_object_store import (  # noqa: E402
    BundleTransferPolicy,
    FieldSchema,
    MooncakeBundleTransfer,
    MooncakeDataProtoRef,
    StructuredMemberSlice,
    StructuredObjectPayload,
    export_dataproto_ref,
    import_dataproto_ref,
    raw_destination,
    tensor_object_buffer,
)
from pymooncake.testing import LocalCluster  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import sos_ref_script as data  # noqa: E402

canon = data.canon


class Lease:
    def __init__(self, pool: Pool, size: int) -> None:
        self.pool = pool
        self._mem = ctypes.create_string_buffer(max(size, 1))
        self.ptr = ctypes.addressof(self._mem)
        self.size = size
        self.released = False

    @property
    def buffer(self) -> memoryview:
        return memoryview(self._mem).cast("B")[: self.size]

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool.released += 1


class Pool:
    """A BufferPool stand-in (``acquire(size)`` -> lease with ptr/buffer/release)."""

    def __init__(self) -> None:
        self.acquired = 0
        self.released = 0
        self.sizes: list[int] = []

    def acquire(self, size: int) -> Lease:
        self.acquired += 1
        self.sizes.append(size)
        return Lease(self, size)


class MemStore(data.DictStore):
    """The interop DictStore plus writes from memory, tensors, call counts and
    recorded configs; ``fast=False`` leaves only put/get/remove."""

    def __init__(self, fast: bool = True, fail_put_at: int = 0) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}
        self.configs: list[Any] = []
        self.puts = 0
        self.fail_put_at = fail_put_at
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()
        if not fast:
            for name in (
                "register_buffer",
                "unregister_buffer",
                "get_into",
                "batch_get_into",
                "get_into_ranges",
                "batch_put_from",
                "put_tensor",
                "pub_tensor",
                "get_tensor",
                "get_tensor_into",
            ):
                setattr(self, name, None)

    def _count(self, name: str) -> None:
        with self.lock:
            self.calls[name] = self.calls.get(name, 0) + 1

    def put(self, key: str, value: Any, config: Any = None) -> int:
        self._count("put")
        self.configs.append(config)
        with self.lock:
            self.puts += 1
            if self.puts == self.fail_put_at:
                return -1
        return super().put(key, value)

    def get(self, key: str) -> bytes:
        self._count("get")
        return super().get(key)

    def get_into_ranges(self, *args: Any) -> Any:  # type: ignore[override]
        self._count("get_into_ranges")
        return super().get_into_ranges(*args)

    def batch_get_into(self, keys: list[str], ptrs: list[int], sizes: list[int]) -> list[int]:
        self._count("batch_get_into")
        return super().batch_get_into(keys, ptrs, sizes)

    def batch_put_from(
        self, keys: list[str], ptrs: list[int], sizes: list[int], config: Any = None
    ) -> list[int]:
        self._count("batch_put_from")
        self.configs.append(config)
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            threading.Event().wait(0.005)
            for key, ptr, size in zip(keys, ptrs, sizes, strict=True):
                self.objects[key] = ctypes.string_at(ptr, size)
            return [0] * len(keys)
        finally:
            with self.lock:
                self.active -= 1

    def put_from(self, key: str, ptr: int, size: int, config: Any = None) -> int:
        self._count("put_from")
        self.objects[key] = ctypes.string_at(ptr, size)
        return 0

    def put_tensor(self, key: str, tensor: Any) -> int:
        """A tensor object (header + data) under ``key``, as a real store keeps it."""
        self._count("put_tensor")
        self.objects[key] = sos._bundle.tensor_object_bytes(tensor)[0]
        return 0

    def pub_tensor(self, key: str, tensor: Any, config: Any = None) -> int:
        self._count("pub_tensor")
        self.configs.append(config)
        return self.put_tensor(key, tensor)

    def get_tensor(self, key: str) -> Any:
        self._count("get_tensor")
        return sos._bundle.tensor_from_object(self.objects[key])

    def get_tensor_into(self, key: str, ptr: int, size: int) -> Any:
        self._count("get_tensor_into")
        blob = self.objects[key]
        assert len(blob) <= size
        ctypes.memmove(ptr, blob, len(blob))
        return sos._bundle.tensor_from_object(blob)


def transfer_of(store: Any = None, **kw: Any) -> tuple[Any, MooncakeBundleTransfer]:
    store = MemStore() if store is None else store
    return store, MooncakeBundleTransfer(store, key_prefix="t", **kw)


def col(values: list[Any]) -> np.ndarray:
    return data.column(values)


# --------------------------------------------------------------------------------
# structured objects
# --------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
def test_object_members_of_every_kind_round_trip(fast: bool) -> None:
    store, transfer = transfer_of(MemStore(fast=fast))
    obj = {
        "f16": np.arange(6, dtype=np.float16).reshape(2, 3),
        "scalar": np.asarray(7, dtype=np.int64),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "raw": b"payload",
        "t": torch.arange(12, dtype=torch.int32).reshape(3, 4),
        "bf16": torch.arange(5, dtype=torch.bfloat16),
        "zero_d": torch.tensor(1.5),
        "jagged": torch.nested.nested_tensor(
            [torch.arange(2.0), torch.arange(3.0)], layout=torch.jagged
        ),
    }
    ref = transfer.put_object(obj)
    got = transfer.get_object(ref)
    # as in the reference, a 0-d ndarray member is stored (and read) as shape (1,)
    assert got["scalar"].shape == (1,)
    obj["scalar"] = obj["scalar"].reshape(1)
    assert canon(got) == canon(obj)
    assert got["f16"].flags["C_CONTIGUOUS"]
    specs = json.loads(store.objects[ref.manifest["meta"]["key"]])["__mooncake_structured_fields__"]
    assert specs["f16"] == {"encoding": "ndarray", "dtype": "<f2", "shape": [2, 3]}
    assert specs["raw"] == {"encoding": "bytes"}
    assert specs["t"] == {
        "encoding": "torch_tensor",
        "dtype": "torch.int32",
        "shape": [3, 4],
        "element_size": 4,
    }
    assert specs["jagged"]["nested"] is True
    assert specs["jagged"]["format"] == "tensor_parts"
    buffers = ref.manifest["buffers"]
    if fast:  # tensors go through put_tensor (a "tensor" payload)
        assert buffers["t"]["kind"] == "tensor" and buffers["t"]["metadata_bytes"] == 304
        assert store.calls["put_tensor"] == 3
    else:  # tensor objects (MOON header + data) as bytes; 0-d ones as torch.save
        assert buffers["t"]["metadata_bytes"] == 304 and buffers["t"]["bytes"] == 304 + 48
        assert (
            store.objects[buffers["t"]["key"]][:4] == b"NOOM"
        )  # the magic "MOON" as a little-endian u32
        assert buffers["zero_d"]["format"] == "torch_save"
    # single values are wrapped
    for value in (np.arange(3.0), torch.ones(2, 2), b"xyz"):
        assert canon(transfer.get_object(transfer.put_object(value))) == canon(value)


def test_bundle_layout_chunks_and_removal() -> None:
    store, transfer = transfer_of(default_chunk_bytes=17)
    payload = bytes(range(100))
    ref = transfer.put_bundle(b'{"k":1}', {"payload": payload, "empty": b""}, partition="p1")
    manifest = json.loads(store.objects[ref.manifest_key])
    assert manifest == ref.manifest
    assert manifest["version"] == 1 and manifest["layout"] == "bundle"
    object_id = manifest["object_id"]
    assert object_id.startswith("p1/") and ref.manifest_key == f"t/{object_id}/manifest"
    spec = manifest["buffers"]["payload"]
    assert spec["key"] == f"t/{object_id}/buffer/payload" and spec["bytes"] == 100
    assert [c["key"] for c in spec["chunks"]] == [f"{spec['key']}/chunk/{i}" for i in range(6)]
    assert [c["bytes"] for c in spec["chunks"]] == [17] * 5 + [15]
    assert b"".join(store.objects[c["key"]] for c in spec["chunks"]) == payload
    assert manifest["buffers"]["empty"] == {
        "key": f"t/{object_id}/buffer/empty",
        "bytes": 0,
        "chunks": [],
    }
    assert manifest["meta"]["chunks"] == [{"key": f"t/{object_id}/meta", "bytes": 7}]
    result = transfer.materialize(transfer.read_spec(ref))  # members without specs are bytes
    assert result.metadata == {"k": 1}
    assert result.objects["payload"] == payload and result.objects["empty"] == b""
    # the stored manifest alone is enough (a ref from another process)
    again = transfer.materialize(transfer.read_spec({"manifest_key": ref.manifest_key}))
    assert again.objects["payload"] == payload
    transfer.remove_bundle(ref)
    assert store.objects == {}


def test_read_spec_selects_and_slices_members() -> None:
    store, transfer = transfer_of()
    array = np.arange(40, dtype=np.int32).reshape(10, 4)
    tensor = torch.arange(30, dtype=torch.float64).reshape(10, 3)
    ref = transfer.put_structured_object(
        StructuredObjectPayload({"kind": "x"}, {"a": array, "t": tensor, "raw": b"r"}),
        chunk_bytes=24,
    )
    spec = transfer.read_spec(ref).select_members(["a", "t"])
    spec = spec.slice_member("a", 0, 2, 9, 3).slice_member("t", 0, -4, 100)
    assert spec.member_slice("a") == StructuredMemberSlice(0, 2, 9, 3)
    result = transfer.materialize(spec)
    assert list(result.objects) == ["a", "t"]
    assert np.array_equal(result.objects["a"], array[2:9:3])
    assert torch.equal(result.objects["t"], tensor[-4:])
    assert result.metadata["kind"] == "x"
    assert store.calls["get_into_ranges"] > 0
    stepped = transfer.materialize(
        transfer.read_spec(ref).select_members(["t"]).slice_member("t", 0, 1, 8, 2)
    )
    assert torch.equal(stepped.objects["t"], tensor[1:8:2])
    empty = transfer.materialize(
        transfer.read_spec(ref).select_members(["a"]).slice_member("a", 0, 5, 5)
    )
    assert empty.objects["a"].shape == (0, 4)
    with pytest.raises(ValueError, match="selected no members"):
        transfer.materialize(transfer.read_spec(ref).select_members([]))
    with pytest.raises(KeyError, match="unknown bundle buffers"):
        transfer.materialize(transfer.read_spec(ref).select_members(["nope"]))
    with pytest.raises(ValueError, match="step must be positive"):
        transfer.materialize(transfer.read_spec(ref).slice_member("a", 0, 0, 2, 0))
    with pytest.raises(ValueError, match="does not support slicing"):
        transfer.materialize(transfer.read_spec(ref).slice_member("raw", 0, 0, 1))
    with pytest.raises(ValueError, match="axis=0"):
        transfer.materialize(transfer.read_spec(ref).slice_member("a", 1, 0, 1))


def test_materialize_into_caller_memory() -> None:
    _store, transfer = transfer_of()
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensor = torch.arange(6, dtype=torch.int16)
    ref = transfer.put_object({"a": array, "t": tensor, "raw": b"z"})
    spec = transfer.read_spec(ref).select_members(["a"])
    dest = np.zeros((3, 4), dtype=np.float32)
    assert transfer.materialize_into(spec, {"a": dest}).objects["a"] is dest
    assert np.array_equal(dest, array)
    raw = np.zeros(48, dtype=np.uint8)
    got = transfer.materialize_into(spec, {"a": raw_destination(raw.ctypes.data, 48, raw)})
    assert np.array_equal(got.objects["a"], array) and np.array_equal(
        raw.view(np.float32), array.ravel()
    )
    # a tensor object into caller memory: header + data
    buf = np.zeros(304 + 12, dtype=np.uint8)
    tob = tensor_object_buffer(buf.ctypes.data, buf.nbytes, buf)
    transfer.materialize_into(transfer.read_spec(ref).select_members(["t"]), {"t": tob})
    assert bytes(buf[:4]) == b"NOOM" and np.array_equal(buf[304:].view(np.int16), tensor.numpy())
    for bad, err in [
        (np.zeros((3, 4), dtype=np.float64), "dtype mismatch"),
        (np.zeros((4, 3), dtype=np.float32), "shape mismatch"),
        (np.zeros((4, 8), dtype=np.float32)[:3, :4], "C-contiguous"),
        (raw_destination(raw.ctypes.data, 8, raw), "expected at least 48"),
    ]:
        with pytest.raises(ValueError, match=err):
            transfer.materialize_into(spec, {"a": bad})
    with pytest.raises(TypeError, match=r"numpy\.ndarray or raw_destination"):
        transfer.materialize_into(spec, {"a": [0.0] * 12})
    with pytest.raises(ValueError, match="does not support materialize_into"):
        transfer.materialize_into(
            transfer.read_spec(ref).select_members(["raw"]), {"raw": bytearray(1)}
        )
    with pytest.raises(ValueError, match="tensor_object_buffer or raw_destination"):
        transfer.materialize_into(transfer.read_spec(ref).select_members(["t"]), {"t": np.zeros(6)})


def test_write_paths_follow_the_policy() -> None:
    payload = bytes(range(256)) * 4
    # copy: plain put only
    store, transfer = transfer_of(buffer_pool=Pool())
    transfer.put_structured_object(
        StructuredObjectPayload(buffers={"p": payload}),
        chunk_bytes=100,
        policy=BundleTransferPolicy(copy_mode="copy"),
    )
    assert "batch_put_from" not in store.calls
    # auto with a pool: every chunk through a lease + batch_put_from, every lease returned
    pool = Pool()
    store, transfer = transfer_of(buffer_pool=pool)
    ref = transfer.put_structured_object(
        StructuredObjectPayload(buffers={"p": payload}), chunk_bytes=100
    )
    assert store.calls["batch_put_from"] == 11 and pool.acquired == pool.released == 11
    read = transfer.get_object(ref)["p"]  # with a pool, bytes members come back in a lease
    assert isinstance(read, np.ndarray) and read.tobytes() == payload
    MooncakeBundleTransfer.release_result(read)
    assert pool.acquired == pool.released
    # parallel groups of chunks
    store, transfer = transfer_of(buffer_pool=Pool())
    parts = sos._MultiBufferPayload(tuple(memoryview(bytes([i]) * 50) for i in range(16)))
    ref = transfer.put_structured_object(
        StructuredObjectPayload(buffers={"p": parts}),
        chunk_bytes=64,
        policy=BundleTransferPolicy(max_inflight_put=4, put_mode="parallel"),
    )
    assert store.max_active > 1
    assert bytes(transfer.get_object(ref)["p"]) == b"".join(bytes([i]) * 50 for i in range(16))
    # zero_copy needs tensor-object buffers
    with pytest.raises(RuntimeError, match="zero-copy put"):
        transfer.put_structured_object(
            StructuredObjectPayload(buffers={"p": b"x"}),
            policy=BundleTransferPolicy(copy_mode="zero_copy"),
        )
    with pytest.raises(ValueError, match="zero-copy structured tensor"):
        transfer.put_object(torch.ones(2), policy=BundleTransferPolicy(copy_mode="zero_copy"))
    for bad, err in [
        (BundleTransferPolicy(max_inflight_put=0), "max_inflight_put"),
        (BundleTransferPolicy(put_mode="x"), "put_mode"),  # type: ignore[arg-type]
        (BundleTransferPolicy(copy_mode="x"), "copy_mode"),  # type: ignore[arg-type]
    ]:
        with pytest.raises(ValueError, match=err):
            transfer.put_object(b"x", policy=bad)
    # a tensor-object buffer written as is (put_from)
    tensor = torch.arange(4, dtype=torch.float32)
    header, ptr, nbytes, _owner = sos._bundle.tensor_parts(tensor)
    buf = np.frombuffer(header + ctypes.string_at(ptr, nbytes), dtype=np.uint8).copy()
    ref = transfer.put_object(tensor_object_buffer(buf.ctypes.data, buf.nbytes, buf))
    assert torch.equal(transfer.get_object(ref), tensor)


def test_failures_remove_what_was_written_and_bad_names_are_refused() -> None:
    store = MemStore(fast=False, fail_put_at=3)
    _, transfer = transfer_of(store)
    with pytest.raises(RuntimeError, match="put failed"):
        transfer.put_bundle(b"m", {"a": b"1" * 40, "b": b"2"}, chunk_bytes=16)
    assert store.objects == {}
    _, transfer = transfer_of()
    for call, err in [
        (lambda: transfer.put_bundle(b"m", {}, partition="a/b"), "partition"),
        (lambda: transfer.put_bundle(b"m", {"": b""}), "buffer name"),
        (lambda: transfer.put_bundle(b"m", {"x": 5}), "bytes-like"),
        (lambda: transfer.put_bundle(b"m", {}, chunk_bytes=0), "chunk_bytes"),
        (lambda: MooncakeBundleTransfer(MemStore(), key_prefix="//"), "key_prefix"),
        (
            lambda: transfer.put_structured_object(StructuredObjectPayload({"layout": 3}, {})),
            "layout",
        ),
        (
            lambda: transfer.put_structured_object(
                StructuredObjectPayload({sos.STRUCTURED_FIELD_SPECS_KEY: {}}, {})
            ),
            "reserved",
        ),
    ]:
        with pytest.raises((ValueError, TypeError), match=err):
            call()
    with pytest.raises(TypeError, match="requires buffers"):
        StructuredObjectPayload({})


def test_tampered_manifests_are_refused() -> None:
    store, transfer = transfer_of()
    ref = transfer.put_bundle(b"m", {"a": b"abc"})
    manifest = json.loads(store.objects[ref.manifest_key])
    for change, err in [
        (lambda m: m["buffers"]["a"].update(key="elsewhere/x"), "outside the bundle"),
        (lambda m: m.update(cleanup_keys=["victim"]), "cleanup_keys"),
        (lambda m: m["buffers"]["a"].update(bytes=2), "expected 2"),
        (lambda m: m.update(version=2), "invalid bundle manifest"),
    ]:
        bad = json.loads(json.dumps(manifest))
        change(bad)
        store.objects[ref.manifest_key] = json.dumps(bad).encode()
        with pytest.raises(ValueError, match=err):
            transfer.remove_bundle({"manifest_key": ref.manifest_key})
    with pytest.raises(ValueError, match="does not match"):
        transfer.remove_bundle({"manifest_key": "t/x/manifest", "manifest": manifest})


# --------------------------------------------------------------------------------
# DataProto
# --------------------------------------------------------------------------------


def select_rows(value: Any, rows: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_nested:
        items = value.unbind()
        chosen = [items[i] for i in (range(len(items))[rows] if isinstance(rows, slice) else rows)]
        return ("nested", [canon(t) for t in chosen])
    if isinstance(rows, slice):
        return canon(value[rows])
    if isinstance(value, torch.Tensor):
        return canon(value[list(rows)])
    return canon(value[np.asarray(rows, dtype=np.int64)] if len(rows) else value[:0])


@pytest.mark.parametrize("fast", [True, False])
def test_dataproto_rows_read_like_the_whole(fast: bool) -> None:
    _store, transfer = transfer_of(MemStore(fast=fast), default_chunk_bytes=40)
    ref = transfer.put_dataproto(data.build_dataproto(), stage="rollout")
    whole = transfer.get_dataproto(ref)
    assert whole["meta_info"] == {"step": 3, "tags": ["a"]}
    assert ref.batch_size == 4
    assert {n: e["codec"] for n, e in ref.encoded_non_tensor.items()} == {
        "uid": "utf8_ragged",
        "tokens": "typed_ragged",
        "meta": "msgpack_ragged",
        "blob": "bytes_ragged",
        "ragged": "ragged_tensor",
        "nested": "structured_recursive",
        "scalars": "ndarray",
        "lists": "typed_ragged",
    }
    selections: list[Any] = [[3, 0, 2], [-1, 1, 1], [], slice(1, 3), slice(0, 4, 2), slice(3, 1)]
    for rows in selections:
        part = transfer.get_dataproto(ref, rows=rows)
        for section in ("batch", "non_tensor_batch"):
            for name, value in whole[section].items():
                got = part[section][name]
                assert canon(got) == select_rows(value, rows), (name, rows)
    member_slice = transfer.get_dataproto(
        ref, rows=StructuredMemberSlice(0, 1, 4, 2), fields=["uid"]
    )
    assert member_slice["non_tensor_batch"]["uid"].tolist() == ["bé", ""]
    for rows, err in [
        ([4], IndexError),
        (["a"], TypeError),
        (slice(0, 4, -1), ValueError),
        (3, TypeError),
    ]:
        with pytest.raises(err):
            transfer.get_dataproto(ref, rows=rows)
    with pytest.raises(ValueError, match="axis=0"):
        transfer.get_dataproto(ref, rows=StructuredMemberSlice(1, 0, 1))


def test_dataproto_field_selection_classes_and_dicts() -> None:
    _store, transfer = transfer_of()
    ref = transfer.put(
        {
            "input_ids": np.arange(6).reshape(3, 2),
            "uid": ["a", "b", "c"],
            "tokens": [np.asarray([1, 2]), None, np.asarray([3])],
            "tags": ["x", "y"],
            "step": 7,
        },
        type="dict",
    )
    assert set(ref.field_index) == {"input_ids", "uid", "tokens"}
    assert ref.meta_info == {"tags": ["x", "y"], "step": 7}
    flat = transfer.get(ref, type="dict")
    assert flat["uid"] == ["a", "b", "c"] and flat["tokens"][1] is None and flat["step"] == 7
    picked = transfer.get_dataproto(ref, fields=["uid"], meta_info_keys=["step", "missing"])
    assert picked["batch"] == {} and list(picked["non_tensor_batch"]) == ["uid"]
    assert picked["meta_info"] == {"step": 7}
    only_batch = transfer.get_dataproto(ref, batch_fields=["input_ids"])
    assert list(only_batch["batch"]) == ["input_ids"] and only_batch["non_tensor_batch"] == {}

    class Proto:
        def __init__(self, batch: Any, non_tensor_batch: Any, meta_info: Any) -> None:
            self.batch, self.non_tensor_batch, self.meta_info = batch, non_tensor_batch, meta_info

    made = transfer.get_dataproto(ref, data_cls=Proto)
    assert isinstance(made, Proto) and made.meta_info["step"] == 7
    with pytest.raises(TypeError, match="cannot be constructed"):
        transfer.get_dataproto(ref, data_cls=SimpleNamespace.__class__)
    with pytest.raises(KeyError, match="unknown DataProto fields"):
        transfer.get_dataproto(ref, fields=["nope"])
    with pytest.raises(ValueError, match="cannot be combined"):
        transfer.get_dataproto(ref, fields=["uid"], batch_fields=["input_ids"])
    with pytest.raises(ValueError, match="unsupported Mooncake payload type"):
        transfer.get(ref, type="list")  # type: ignore[arg-type]
    # flat-dict rules: ambiguous sizes, name collisions on the way back
    with pytest.raises(ValueError, match="ambiguous"):
        transfer.put({"a": np.arange(3), "b": np.arange(4)}, type="dict")
    collide = transfer.put_dataproto({"batch": {"x": np.arange(2)}, "meta_info": {"x": 1}})
    with pytest.raises(ValueError, match="Duplicate keys"):
        transfer.get(collide, type="dict")
    with pytest.raises(ValueError, match="overlap"):
        transfer.put_dataproto(
            {"batch": {"x": np.arange(2)}, "non_tensor_batch": {"x": np.arange(2)}}
        )
    with pytest.raises(ValueError, match="inconsistent batch sizes"):
        transfer.put_dataproto({"batch": {"x": np.arange(2), "y": np.arange(3)}})


def test_destinations_for_dataproto_fields() -> None:
    _store, transfer = transfer_of()
    ids = np.arange(20, dtype=np.int64).reshape(10, 2)
    ref = transfer.put_dataproto({"batch": {"ids": ids, "t": torch.arange(10.0)}})
    dest = np.zeros((3, 2), dtype=np.int64)
    got = transfer.get_dataproto(ref, rows=[9, 0, 5], destinations={"ids": dest}, fields=["ids"])
    assert got["batch"]["ids"] is dest and np.array_equal(dest, ids[[9, 0, 5]])
    raw = np.zeros(4 * 2 * 8, dtype=np.uint8)
    got = transfer.get_dataproto(
        ref,
        rows=slice(2, 6),
        destinations={"ids": raw_destination(raw.ctypes.data, raw.nbytes, raw)},
        fields=["ids"],
    )
    assert np.array_equal(raw.view(np.int64).reshape(4, 2), ids[2:6])
    buf = np.zeros(304 + 3 * 4, dtype=np.uint8)
    transfer.get_dataproto(
        ref,
        rows=[1, 2, 8],
        destinations={"t": tensor_object_buffer(buf.ctypes.data, buf.nbytes, buf)},
    )
    assert np.array_equal(buf[304:].view(np.float32), [1.0, 2.0, 8.0])


def test_append_overwrite_and_cleanup() -> None:
    store, transfer = transfer_of()
    ref = transfer.put_dataproto({"batch": {"ids": np.arange(4)}}, stage="rollout")
    first_key = ref.stage_refs["rollout"].manifest_key
    ref = transfer.append_dataproto_fields(ref, {"batch": {"v": np.ones(4)}}, stage="rollout")
    ref = transfer.append_dataproto_fields(
        ref, {"non_tensor_batch": {"uid": col(list("abcd"))}}, stage="rollout"
    )
    merged = json.loads(store.objects[ref.stage_refs["rollout"].manifest_key])
    assert set(merged["buffers"]) >= {"batch.ids", "batch.v", "non_tensor_batch.uid.data"}
    assert first_key in merged["cleanup_keys"]
    ref = transfer.append_dataproto_fields(ref, {"batch": {"r": torch.zeros(4)}}, stage="reward")
    assert sorted(ref.stage_refs) == ["reward", "rollout"]
    whole = transfer.get_dataproto(ref)
    assert set(whole["batch"]) == {"ids", "v", "r"} and whole["non_tensor_batch"][
        "uid"
    ].tolist() == list("abcd")
    view = transfer.dataproto_manifest_view(ref)
    assert set(view["batch_fields"]) == {"ids", "v", "r"}
    assert view["non_tensor_fields"]["uid"]["spec"]["codec"] == "utf8_ragged"
    assert view["stages"]["reward"]["dataproto"]["stage"] == "reward"
    with pytest.raises(ValueError, match="already exist"):
        transfer.append_dataproto_fields(ref, {"batch": {"ids": np.arange(4)}}, stage="x")
    with pytest.raises(ValueError, match="does not match ref batch size"):
        transfer.append_dataproto_fields(ref, {"batch": {"n": np.arange(3)}}, stage="x")
    with pytest.raises(ValueError, match="must include existing fields"):
        transfer.append_dataproto_fields(
            ref, {"batch": {"r": torch.ones(4)}}, stage="rollout", overwrite=True
        )
    old_reward = ref.stage_refs["reward"].manifest_key
    ref = transfer.append_dataproto_fields(
        ref, {"batch": {"r": torch.ones(4)}}, stage="reward", overwrite=True
    )
    assert old_reward not in store.objects
    assert torch.equal(transfer.get_dataproto(ref, fields=["r"])["batch"]["r"], torch.ones(4))
    # meta_info alone has batch size 0: it appends only to a batch of 0 (as in the reference)
    with pytest.raises(ValueError, match="batch size 0"):
        transfer.append_dataproto_fields(ref, {"meta_info": {"k": 1}}, stage="x")
    empty = transfer.put_dataproto({"meta_info": {"a": 1}})
    assert empty.stage_refs == {} and empty.batch_size == 0
    more = transfer.append_dataproto_fields(
        export_dataproto_ref(empty), {"meta_info": {"b": 2}}, stage="m"
    )
    assert more.meta_info == {"a": 1, "b": 2} and more._storage_group_id == empty._storage_group_id
    transfer.cleanup_dataproto(ref)
    assert store.objects == {}


def test_handles_round_trip_and_are_validated() -> None:
    store, transfer = transfer_of()
    ref = transfer.put_dataproto(
        {
            "batch": {"ids": np.arange(3)},
            "meta_info": {"a": np.asarray([1, 2]), "b": np.float32(0.5)},
        },
        namespace="ns",
        partition="part",
        stage="s",
    )
    ref.global_indexes = [5, 6, 7]
    handle = export_dataproto_ref(ref)
    json.dumps(handle)
    assert handle["meta_info"] == {"a": [1, 2], "b": 0.5}
    assert handle["storage_group_id"] == ref._storage_group_id
    back = import_dataproto_ref(json.loads(json.dumps(handle)))
    assert isinstance(back, MooncakeDataProtoRef) and back.global_indexes == [5, 6, 7]
    assert back.namespace == "ns" and back.stage_refs["s"].manifest == {}
    assert np.array_equal(transfer.get_dataproto(handle)["batch"]["ids"], np.arange(3))
    assert sos.export_ref is export_dataproto_ref and sos.import_ref is import_dataproto_ref
    assert sos.is_dataproto_ref_handle(handle) and not sos.is_dataproto_ref_handle({})
    for change, err in [
        ({"version": 3}, "version"),
        ({"kind": "other"}, "kind"),
        ({"storage_group_id": ""}, "storage_group_id"),
        ({"global_indexes": [1, True]}, "global_indexes"),
        ({"stage_refs": {"s": {"manifest_key": ""}}}, "non-empty"),
        (
            {"field_index": {"ids": {"stage": "zz", "member": "m", "section": "batch"}}},
            "unknown stage",
        ),
        ({"field_index": {"ids": {"stage": "s", "member": "m", "section": "meta"}}}, "section"),
        ({"stage_refs": []}, "mapping"),
        ({"type": "x"}, "not a Mooncake"),
    ]:
        with pytest.raises(ValueError, match=err):
            import_dataproto_ref({**handle, **change})
    assert import_dataproto_ref({**handle, "version": 2})._storage_group_id == ref._storage_group_id
    with pytest.raises(ValueError, match="storage_group_id"):
        import_dataproto_ref(
            {k: v for k, v in {**handle, "version": 2}.items() if k != "storage_group_id"}
        )
    ref.meta_info["bad"] = object()
    with pytest.raises(TypeError, match="JSON-safe"):
        export_dataproto_ref(ref)
    transfer.cleanup_dataproto(handle)
    assert store.objects == {}


def group_ids_seen(store: MemStore) -> set[tuple[str, ...]]:
    return {tuple(c.group_ids) for c in store.configs if c is not None and c.group_ids is not None}


def test_storage_groups_follow_the_config() -> None:
    store, transfer = transfer_of(buffer_pool=Pool())
    config = ReplicateConfig()
    config.replica_num = 2
    config.group_ids = ["g1"]
    ref = transfer.put_dataproto(
        {"batch": {"ids": np.arange(100)}, "non_tensor_batch": {"u": col(["x"] * 100)}},
        config=config,
        chunk_bytes=64,
    )
    assert ref._storage_group_id == "g1" and config.group_ids == ["g1"]
    assert group_ids_seen(store) == {("g1",)}
    assert all(c.replica_num == 2 for c in store.configs if c is not None)
    ref = transfer.append_dataproto_fields(ref, {"batch": {"t": torch.ones(100)}}, stage="b")
    assert group_ids_seen(store) == {("g1",)} and store.calls["pub_tensor"] == 1
    with pytest.raises(ValueError, match="conflicts"):
        other = ReplicateConfig()
        other.group_ids = ["g2"]
        transfer.append_dataproto_fields(
            ref, {"batch": {"z": np.ones(100)}}, stage="c", config=other
        )
    # no group: an opaque one is made; "" means ungrouped; two are refused
    store, transfer = transfer_of()
    auto = transfer.put_dataproto({"batch": {"ids": np.arange(3)}}, config=ReplicateConfig())
    assert auto._storage_group_id is not None and auto._storage_group_id.startswith("structured-")
    assert group_ids_seen(store) == {(auto._storage_group_id,)}
    ungrouped = ReplicateConfig()
    ungrouped.group_ids = [""]
    assert (
        transfer.put_dataproto({"batch": {"ids": np.arange(3)}}, config=ungrouped)._storage_group_id
        is None
    )
    two = ReplicateConfig()
    two.group_ids = ["a", "b"]
    with pytest.raises(ValueError, match="exactly one"):
        transfer.put_dataproto({"batch": {"ids": np.arange(3)}}, config=two)
    expanded = sos._config_for_grouped_keys(config, 3)
    assert expanded is not config and expanded.group_ids == ["g1"] * 3 and expanded.replica_num == 2


def test_field_schemas() -> None:
    _store, transfer = transfer_of()
    tokens = [np.asarray([1, 2], dtype=np.int64), None, np.asarray([3], dtype=np.int64)]
    dicts = [{"a": torch.ones(2), "b": torch.zeros(1)}, None, {"a": torch.arange(3.0)}]
    ref = transfer.put(
        {
            "ids": np.arange(3),
            "tokens": tokens,
            "lengths": [2, 0, 1],
            "d": dicts,
            "mb": [7],
        },
        type="dict",
        field_schemas={
            "tokens": FieldSchema(
                "typed_ragged", metadata={"section": "non_tensor_batch", "dtype": "int32"}
            ),
            "lengths": FieldSchema(
                "ndarray", metadata={"section": "non_tensor_batch", "dtype": "int16"}
            ),
            "d": FieldSchema(
                "ragged_tensor_dict", metadata={"section": "non_tensor_batch", "keys": ["a", "b"]}
            ),
            "mb": FieldSchema("auto", metadata={"section": "meta_info"}),
        },
    )
    assert ref.encoded_non_tensor["tokens"]["metadata"]["dtype"] == "int32"
    assert ref.encoded_non_tensor["d"]["codec"] == "ragged_tensor_dict"
    flat = transfer.get(ref, type="dict")
    assert [None if t is None else t.tolist() for t in flat["tokens"]] == [[1, 2], None, [3]]
    assert (
        flat["tokens"][0].dtype == np.int32 and flat["lengths"] == [2, 0, 1] and flat["mb"] == [7]
    )
    assert canon(flat["d"]) == canon(dicts)
    assert canon(transfer.get(ref, type="dict", rows=[2, 0], fields=["d"])["d"]) == canon(
        [dicts[2], dicts[0]]
    )
    with pytest.raises(ValueError, match="not nullable"):
        transfer.put_dataproto(
            {"non_tensor_batch": {"x": col([1, None])}},
            field_schemas={"x": FieldSchema("ndarray", nullable=False, metadata={"dtype": "int8"})},
        )
    with pytest.raises(ValueError, match="declares section"):
        transfer.put_dataproto(
            {"batch": {"x": np.arange(2)}},
            field_schemas={"x": FieldSchema("auto", metadata={"section": "meta_info"})},
        )
    with pytest.raises(ValueError, match="unsupported schema codec"):
        transfer.put_dataproto(
            {"non_tensor_batch": {"x": col([1, 2])}}, field_schemas={"x": FieldSchema("zip")}
        )
    with pytest.raises(ValueError, match="unable to infer"):
        sos._encode_with_schema("p", col([object(), object()]), FieldSchema("auto"))


def test_release_result_returns_pool_leases() -> None:
    pool = Pool()
    _store, transfer = transfer_of(buffer_pool=pool)
    ref = transfer.put_dataproto(
        {
            "batch": {"ids": np.arange(8)},
            "non_tensor_batch": {"tok": col([np.arange(i) for i in range(8)])},
        }
    )
    before = pool.released
    result = transfer.get_dataproto(ref)
    assert pool.acquired > pool.released  # reads landed in leases
    rows = result["non_tensor_batch"]["tok"]
    assert [r.tolist() for r in rows] == [list(range(i)) for i in range(8)]
    MooncakeBundleTransfer.release_result(result)
    assert pool.released == pool.acquired and pool.released > before
    MooncakeBundleTransfer.release_result(result)  # twice is fine


# --------------------------------------------------------------------------------
# a real cluster
# --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with new_cluster() as c:
        yield c


@pytest.fixture
def stores(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stores]:
    monkeypatch.setenv("MC_TCP_BIND_ADDRESS", LOCAL)
    s = Stores(cluster)
    yield s
    s.close_all()


def test_real_store_dataproto_object_and_cleanup(stores: Stores) -> None:
    store = stores.new(64 * MiB, 32 * MiB)
    transfer = MooncakeBundleTransfer(store, key_prefix="real", default_chunk_bytes=1 * MiB)
    big = np.random.default_rng(1).standard_normal((512, 1024)).astype(np.float32)  # 2 MiB: chunked
    built = data.build_dataproto()
    built["batch"]["big"] = torch.from_numpy(big[:4].copy())
    ref = transfer.put_dataproto(built, stage="rollout")
    whole = transfer.get_dataproto(ref)
    assert canon(whole["batch"]["big"]) == canon(built["batch"]["big"])
    assert canon(whole["non_tensor_batch"]["meta"]) == canon(built["non_tensor_batch"]["meta"])
    for rows in ([2, 0], slice(1, 4)):
        part = transfer.get_dataproto(ref, rows=rows)
        for name in ("input_ids", "jagged", "big"):
            assert canon(part["batch"][name]) == select_rows(whole["batch"][name], rows)
        for name, value in whole["non_tensor_batch"].items():
            assert canon(part["non_tensor_batch"][name]) == select_rows(value, rows), name
    pool = transfer._transport._buffer_pool
    assert type(pool).__name__ == "BufferPool"  # made for the set-up store
    MooncakeBundleTransfer.release_result(whole)
    obj = transfer.put_object({"big": big, "t": torch.arange(10)})
    assert len(obj.manifest["buffers"]["big"]["chunks"]) == 2
    got = transfer.get_object(obj)
    assert np.array_equal(got["big"], big) and torch.equal(got["t"], torch.arange(10))
    keys = [
        obj.manifest_key,
        *(c["key"] for s in obj.manifest["buffers"].values() for c in s["chunks"]),
    ]
    transfer.remove_bundle(obj)
    transfer.cleanup_dataproto(ref)
    assert store.batch_is_exist(keys) == [0] * len(keys)
    assert store.batch_is_exist([ref.stage_refs["rollout"].manifest_key]) == [0]
    del got, whole, part


def test_real_store_concurrent_dataprotos(stores: Stores) -> None:
    writer = stores.new(64 * MiB, 16 * MiB)
    reader = stores.new(16 * MiB, 16 * MiB)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            put_side = MooncakeBundleTransfer(writer, key_prefix=f"c{i}")
            get_side = MooncakeBundleTransfer(reader, key_prefix=f"c{i}")
            for round_ in range(3):
                ids = np.arange(64, dtype=np.int64) * (i + 1) + round_
                ref = put_side.put_dataproto(
                    {
                        "batch": {"ids": ids},
                        "non_tensor_batch": {"u": col([f"{i}-{j}" for j in range(64)])},
                    }
                )
                handle = export_dataproto_ref(ref)
                got = get_side.get_dataproto(handle, rows=[63, 0])
                assert got["batch"]["ids"].tolist() == [ids[63], ids[0]]
                assert got["non_tensor_batch"]["u"].tolist() == [f"{i}-63", f"{i}-0"]
                get_side.cleanup_dataproto(handle)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert isinstance(writer, MooncakeDistributedStore)
