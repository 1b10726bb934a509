"""Both sides of ``test_sos_interop.py``: the same data, store and reads.

Run as a script (``python sos_ref_script.py <site-packages> <workdir> <side>``)
in the reference wheel's venv it borrows numpy/msgpack/torch from
``<site-packages>`` (appended to ``sys.path``, so ``mooncake`` stays the
reference's) and, in ``<workdir>``:

* ``write``: stores :func:`build_dataproto` and :func:`build_object` in a
  dict-backed store through the reference's ``MooncakeBundleTransfer``, then
  dumps the store (``<side>_store.pkl``) and the refs (``<side>_refs.json``);
* ``read <other>``: loads ``<other>_store.pkl``/``<other>_refs.json`` and writes
  :func:`read_all` of them, made comparable by :func:`canon`, to
  ``<side>_reads_<other>.pkl``.

The test imports this file for the same functions on pymooncake's side.
"""

from __future__ import annotations

import ctypes
import json
import pickle
import sys
from pathlib import Path
from typing import Any


class DictStore:
    """A store of bytes in a dict (``put``/``get``/``remove``/``batch_remove``)."""

    def __init__(self, objects: dict[str, bytes] | None = None) -> None:
        self.objects: dict[str, bytes] = {} if objects is None else objects

    def put(self, key: str, value: Any, config: Any = None) -> int:
        self.objects[key] = bytes(value)
        return 0

    def get(self, key: str) -> bytes:
        return self.objects[key]

    def remove(self, key: str, force: bool = False) -> int:
        return 0 if self.objects.pop(key, None) is not None else -704

    def batch_remove(self, keys: list[str], force: bool = False) -> list[int]:
        return [self.remove(k, force) for k in keys]

    # the zero-copy read paths of a real store (memory "registration" is a no-op)

    def register_buffer(self, ptr: int, size: int) -> int:
        return 0

    def unregister_buffer(self, ptr: int) -> int:
        return 0

    def get_into(self, key: str, ptr: int, size: int) -> int:
        data = self.objects[key]
        if len(data) > size:
            return -1
        ctypes.memmove(ptr, data, len(data))
        return len(data)

    def batch_get_into(self, keys: list[str], ptrs: list[int], sizes: list[int]) -> list[int]:
        return [self.get_into(k, p, n) for k, p, n in zip(keys, ptrs, sizes, strict=True)]

    def get_into_ranges(
        self,
        ptrs: list[int],
        keys: list[list[str]],
        dst: list[list[list[int]]],
        src: list[list[list[int]]],
        sizes: list[list[list[int]]],
    ) -> list[list[list[int]]]:
        out = []
        for base, ks, ds, ss, ns in zip(ptrs, keys, dst, src, sizes, strict=True):
            per_key = []
            for key, d_list, s_list, n_list in zip(ks, ds, ss, ns, strict=True):
                data = self.objects[key]
                got = []
                for d, s, n in zip(d_list, s_list, n_list, strict=True):
                    if s + n > len(data):
                        got.append(-1)
                        continue
                    ctypes.memmove(base + d, data[s : s + n], n)
                    got.append(n)
                per_key.append(got)
            out.append(per_key)
        return out


def column(values: list[Any]) -> Any:
    import numpy as np

    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def build_dataproto() -> dict[str, Any]:
    """Every field kind: tensors (incl. bfloat16 and a jagged nested tensor),
    plain ndarrays, and object columns for each codec family."""
    import numpy as np
    import torch

    batch = {
        "input_ids": torch.arange(12, dtype=torch.int64).reshape(4, 3),
        "mask": torch.tensor([[True, False, True]] * 4),
        "scores": torch.arange(4, dtype=torch.bfloat16) / 4,
        "jagged": torch.nested.nested_tensor(
            [torch.arange(2.0), torch.arange(3.0), torch.arange(1.0), torch.arange(4.0)],
            layout=torch.jagged,
        ),
    }
    non_tensor = {
        "uid": column(["a", "bé", "c", ""]),
        "tokens": column(
            [
                np.arange(3, dtype=np.int32),
                None,
                np.arange(5, dtype=np.int32),
                np.zeros((2, 2), np.int32),
            ]
        ),
        "meta": column([{"k": 1, "s": "x"}, {"k": 2}, None, {"k": 4, "l": [1, 2]}]),
        "blob": column([b"\x00\x01", b"", None, b"xyz"]),
        "ragged": column([torch.arange(2.0), torch.arange(3.0), None, torch.arange(1.0)]),
        "nested": column(
            [
                {"a": torch.ones(2), "b": b"q"},
                {"a": torch.zeros(3)},
                None,
                {"a": torch.arange(1.0), "b": b""},
            ]
        ),
        "scalars": column([1.5, 2.5, None, 4.0]),
        "lists": column([[1, 2], [], None, [3]]),
        "plain": np.asarray([1, 2, 3, 4], dtype=np.int16),
        "words": np.asarray(["x", "yy", "z", "w"]),
    }
    return {"batch": batch, "non_tensor_batch": non_tensor, "meta_info": {"step": 3, "tags": ["a"]}}


def build_object() -> dict[str, Any]:
    import numpy as np
    import torch

    return {
        "arr": np.arange(6, dtype=np.float16).reshape(2, 3),
        "t": torch.arange(4, dtype=torch.bfloat16),
        "s": torch.tensor(2.0),
        "raw": b"hello",
    }


def canon(value: Any) -> Any:
    """A comparable form of a read value (types, dtypes, shapes and bytes)."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        if value.is_nested:
            return ("nested", [canon(row) for row in value.unbind()])
        t = value.detach().contiguous()
        flat = t.reshape(-1)
        if not flat.numel():
            raw = b""
        elif t.dtype == torch.bool:
            raw = flat.numpy().tobytes()
        else:
            raw = flat.view(torch.uint8).numpy().tobytes()
        return ("tensor", str(t.dtype), list(t.shape), raw)
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return ("objarray", [canon(v) for v in value.tolist()])
        return ("ndarray", value.dtype.str, list(value.shape), value.tobytes())
    if isinstance(value, np.generic):
        return canon(value.item())
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ("bytes", bytes(value))
    if isinstance(value, dict):
        return {str(k): canon(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canon(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return ("other", type(value).__name__, repr(value))


def write(sos: Any, work: Path, side: str) -> None:
    store = DictStore()
    transfer = sos.MooncakeBundleTransfer(store, key_prefix="interop", default_chunk_bytes=64)
    ref = transfer.put_dataproto(build_dataproto(), stage="rollout")
    ref = transfer.append_dataproto_fields(
        ref,
        {"batch": {"rewards": __import__("torch").arange(4, dtype=__import__("torch").float32)}},
        stage="reward",
    )
    obj = transfer.put_object(build_object())
    (work / f"{side}_store.pkl").write_bytes(pickle.dumps(store.objects))
    (work / f"{side}_refs.json").write_text(
        json.dumps({"dataproto": sos.export_dataproto_ref(ref), "object": obj.manifest_key})
    )


def read_all(sos: Any, objects: dict[str, bytes], refs: dict[str, Any]) -> dict[str, Any]:
    transfer = sos.MooncakeBundleTransfer(
        DictStore(objects), key_prefix="interop", default_chunk_bytes=64
    )
    handle = refs["dataproto"]
    out = {
        "full": transfer.get_dataproto(handle),
        "rows": transfer.get_dataproto(handle, rows=[3, 0, 2]),
        "slice": transfer.get_dataproto(
            handle,
            rows=slice(1, 3),
            fields=["input_ids", "uid", "tokens", "meta", "blob", "ragged"],
        ),
        "dict": transfer.get(handle, type="dict", fields=["input_ids", "uid", "meta", "lists"]),
        "object": transfer.get_object({"manifest_key": refs["object"]}),
        "view": transfer.dataproto_manifest_view(handle)["non_tensor_fields"],
    }
    for view in out["view"].values():
        view.pop("stage", None)
    return canon(out)  # type: ignore[no-any-return]


def main() -> None:
    sys.path.append(sys.argv[1])
    import mooncake.structured_object_store as sos

    work, side = Path(sys.argv[2]), sys.argv[3]
    if side == "write":
        write(sos, work, "ref")
    else:
        other = sys.argv[4]
        objects = pickle.loads((work / f"{other}_store.pkl").read_bytes())
        refs = json.loads((work / f"{other}_refs.json").read_text())
        (work / f"ref_reads_{other}.pkl").write_bytes(pickle.dumps(read_all(sos, objects, refs)))
    print("done")


if __name__ == "__main__":
    main()
