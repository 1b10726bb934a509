"""The tensor API of ``MooncakeDistributedStore`` (reference ``store_py.cpp``).

Return conventions are the reference's: writes return 0 or a negative
``ErrorCode`` (per key for batches), reads return a torch tensor or ``None``;
the ``*_into`` reads return tensors that share the caller's buffer.  torch
tensors (any device) and numpy arrays are accepted wherever a tensor is;
results are torch tensors.  Without torch every method raises
:class:`pymooncake.store._tensor_array.TorchRequired` naming the fix
(``pip install 'pymooncake[torch]'``).

The work happens in :mod:`pymooncake.store._tensor_store` (objects, cuts,
joins) and ``_tensor_parallel`` (the ``*_with_parallelism`` layouts); this
mixin maps arguments and results.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from pymooncake.errors import InvalidParams, MooncakeError, StoreError
from pymooncake.store import ErrorCode
from pymooncake.store import ReplicateConfig as _NativeConfig
from pymooncake.store._api import StoreApi
from pymooncake.store._dummy_client import DummyClient
from pymooncake.store._tensor import (
    HEADER_SIZE,
    AxisSpec,
    TensorHeader,
    check_uniform,
    parse_header,
    tp_key,
)
from pymooncake.store._tensor_array import ArrayData, describe, to_tensor, torch_module
from pymooncake.store._tensor_store import TensorObject, TensorStore, shard_of

from ._store_codes import store_code, store_codes
from ._store_types import ReplicateConfig

__all__ = [
    "TensorOps",
    "deserialize_tensor",
    "serialize_tensor",
    "tensor_metadata_size",
]

log = logging.getLogger("mooncake.store")
_INVALID = int(ErrorCode.INVALID_PARAMS)
_QUIET = (int(ErrorCode.OBJECT_NOT_FOUND),)


def need_torch(what: str) -> None:
    torch_module(what)


def _log(what: str, exc: BaseException) -> None:
    if isinstance(exc, StoreError) and exc.code in _QUIET:
        log.debug("%s: %s", what, exc)
    else:
        log.error("%s failed: %s", what, exc)


def _first_error(codes: Sequence[int]) -> int:
    return next((c for c in codes if c != 0), 0)


def check_replicate_config(config: ReplicateConfig | None) -> int:
    """``validate_replicate_config``: preferred segments, when given, one per replica."""
    if (
        config is not None
        and config.preferred_segments
        and len(config.preferred_segments) != config.replica_num
    ):
        log.error(
            "preferred_segments has %d entries but replica_num is %d: give one segment per replica",
            len(config.preferred_segments),
            config.replica_num,
        )
        return _INVALID
    return 0


def check_group_ids(config: ReplicateConfig | None, count: int, what: str) -> bool:
    """``ValidateGroupIdsForBatchConfig``: group_ids, when set, one per key."""
    if config is not None and config.group_ids is not None and len(config.group_ids) != count:
        log.error("%s: group_ids has %d entries for %d keys", what, len(config.group_ids), count)
        return False
    return True


class TensorOps:
    """Mixin: tensor methods.  Needs ``_c()`` (the live client) and ``_cfg()``."""

    def _c(self) -> StoreApi:
        raise NotImplementedError

    @staticmethod
    def _cfg(config: ReplicateConfig | None) -> _NativeConfig:
        raise NotImplementedError

    # --- helpers ------------------------------------------------------------------

    def _tensor_store(self) -> TensorStore:
        return TensorStore(self._c())

    def _write_objects(
        self,
        what: str,
        count: int,
        build: Sequence[tuple[int, Any]],
        config: ReplicateConfig | None,
        upsert: bool,
    ) -> list[int]:
        """Write objects built per key: ``build`` is (key index, callable
        returning that key's objects); a key's result is the first failure
        among its objects."""
        out = [_INVALID] * count
        try:
            ts = self._tensor_store()
        except MooncakeError as exc:
            log.error("%s failed: %s", what, exc)
            return [store_code(exc)] * count
        objects: list[TensorObject] = []
        owners: list[int] = []
        for i, make in build:
            try:
                made = make()
            except MooncakeError as exc:
                if isinstance(exc, InvalidParams) or not isinstance(exc, StoreError):
                    log.error("%s: %s", what, exc)
                out[i] = store_code(exc)
                continue
            objects.extend(made)
            owners.extend([i] * len(made))
            out[i] = 0
        if objects:
            try:
                results: Sequence[Any] = ts.write(objects, self._cfg(config), upsert=upsert)
            except MooncakeError as exc:
                log.error("%s failed: %s", what, exc)
                results = [exc] * len(objects)
            for i, code in zip(owners, store_codes(results, what), strict=True):
                if code != 0 and out[i] == 0:
                    out[i] = code
        return out

    def _put_tensors(
        self,
        what: str,
        keys: Sequence[str],
        tensors: Sequence[Any],
        config: ReplicateConfig | None,
        upsert: bool,
    ) -> list[int]:
        def whole(key: str, tensor: Any) -> Any:
            return lambda: [TensorObject.whole(key, describe(tensor, f"{what}({key!r})"))]

        build = [(i, whole(k, t)) for i, (k, t) in enumerate(zip(keys, tensors, strict=True))]
        return self._write_objects(what, len(keys), build, config, upsert)

    def _put_tp(
        self,
        what: str,
        keys: Sequence[str],
        tensors: Sequence[Any],
        config: ReplicateConfig | None,
        tp_size: int,
        split_dim: int,
        upsert: bool,
    ) -> list[int]:
        def shards(key: str, tensor: Any) -> Any:
            def make() -> list[TensorObject]:
                if tensor is None:
                    raise InvalidParams(f"{what}: tensor for {key!r} is None")
                array = describe(tensor, f"{what}({key!r})")
                return _tp_shards(key, array, tp_size, split_dim, what)

            return make

        build = [(i, shards(k, t)) for i, (k, t) in enumerate(zip(keys, tensors, strict=True))]
        return self._write_objects(what, len(keys), build, config, upsert)

    def _batch_args_ok(self, what: str, keys: Sequence[str], values: Sequence[Any]) -> bool:
        if len(keys) != len(values) or not keys:
            if keys:
                log.error("%s: %d keys but %d tensors", what, len(keys), len(values))
            return False
        return True

    def _get_tensors(self, what: str, keys: Sequence[str]) -> list[Any]:
        try:
            results = self._tensor_store().read(keys)
        except MooncakeError as exc:
            log.error("%s failed: %s", what, exc)
            return [None] * len(keys)
        out: list[Any] = []
        for key, res in zip(keys, results, strict=True):
            if isinstance(res, StoreError):
                _log(f"{what}({key!r})", res)
                out.append(None)
            else:
                out.append(to_tensor(*res))
        return out

    def _get_into(
        self, what: str, keys: Sequence[str], ptrs: Sequence[int], sizes: Sequence[int]
    ) -> list[Any]:
        try:
            ts = self._tensor_store()
            results: Sequence[Any] = ts.read_into(keys, ptrs, sizes)
        except MooncakeError as exc:
            log.error("%s failed: %s", what, exc)
            return [None] * len(keys)
        out: list[Any] = []
        for key, ptr, res in zip(keys, ptrs, results, strict=True):
            if isinstance(res, StoreError):
                _log(f"{what}({key!r})", res)
                out.append(None)
                continue
            try:
                out.append(ts.tensor_at(ptr, res))
            except MooncakeError as exc:
                log.error("%s(%r): %s", what, key, exc)
                out.append(None)
        return out

    def _check_object_buffer(self, what: str, ptr: int, size: int) -> bool:
        try:
            self._tensor_store().raw_object(ptr, size, what)
            return True
        except MooncakeError as exc:
            log.error("%s", exc)
            return False

    def _put_from(
        self,
        what: str,
        keys: Sequence[str],
        ptrs: Sequence[int],
        sizes: Sequence[int],
        config: ReplicateConfig | None,
        upsert: bool,
    ) -> list[int]:
        if not keys:
            return []
        if not len(keys) == len(ptrs) == len(sizes):
            log.error("%s: keys, buffer_ptrs and sizes differ in length", what)
            return [_INVALID] * len(keys)
        if not all(self._check_object_buffer(what, p, n) for p, n in zip(ptrs, sizes, strict=True)):
            return [_INVALID] * len(keys)
        try:
            client = self._c()
            writer = client.upsert_many if upsert else client.put_many
            results: Sequence[Any] = writer(
                keys, [[(p, n)] for p, n in zip(ptrs, sizes, strict=True)], self._cfg(config)
            )
        except MooncakeError as exc:
            log.error("%s failed: %s", what, exc)
            return [store_code(exc)] * len(keys)
        return store_codes(results, what)

    # --- whole tensors ----------------------------------------------------------------

    def put_tensor(self, key: str, tensor: Any) -> int:
        need_torch("put_tensor")
        return self._put_tensors("put_tensor", [key], [tensor], None, False)[0]

    def upsert_tensor(self, key: str, tensor: Any) -> int:
        need_torch("upsert_tensor")
        return self._put_tensors("upsert_tensor", [key], [tensor], None, True)[0]

    def pub_tensor(self, key: str, tensor: Any, config: ReplicateConfig | None = None) -> int:
        need_torch("pub_tensor")
        rc = check_replicate_config(config)
        return rc or self._put_tensors("pub_tensor", [key], [tensor], config, False)[0]

    def upsert_pub_tensor(
        self, key: str, tensor: Any, config: ReplicateConfig | None = None
    ) -> int:
        need_torch("upsert_pub_tensor")
        rc = check_replicate_config(config)
        return rc or self._put_tensors("upsert_pub_tensor", [key], [tensor], config, True)[0]

    def batch_put_tensor(self, keys: list[str], tensors_list: list[Any]) -> list[int]:
        need_torch("batch_put_tensor")
        if not self._batch_args_ok("batch_put_tensor", keys, tensors_list):
            return [_INVALID] * len(keys)
        return self._put_tensors("batch_put_tensor", keys, tensors_list, None, False)

    def batch_upsert_tensor(self, keys: list[str], tensors_list: list[Any]) -> list[int]:
        need_torch("batch_upsert_tensor")
        if not self._batch_args_ok("batch_upsert_tensor", keys, tensors_list):
            return [_INVALID] * len(keys)
        return self._put_tensors("batch_upsert_tensor", keys, tensors_list, None, True)

    def batch_pub_tensor(
        self, keys: list[str], tensors_list: list[Any], config: ReplicateConfig | None = None
    ) -> list[int]:
        need_torch("batch_pub_tensor")
        if not self._batch_args_ok("batch_pub_tensor", keys, tensors_list):
            return [_INVALID] * len(keys)
        if check_replicate_config(config) or not check_group_ids(
            config, len(keys), "batch_pub_tensor"
        ):
            return [_INVALID] * len(keys)
        return self._put_tensors("batch_pub_tensor", keys, tensors_list, config, False)

    def batch_upsert_pub_tensor(
        self, keys: list[str], tensors_list: list[Any], config: ReplicateConfig | None = None
    ) -> list[int]:
        need_torch("batch_upsert_pub_tensor")
        if not self._batch_args_ok("batch_upsert_pub_tensor", keys, tensors_list):
            return [_INVALID] * len(keys)
        if check_replicate_config(config) or not check_group_ids(
            config, len(keys), "batch_upsert_pub_tensor"
        ):
            return [_INVALID] * len(keys)
        return self._put_tensors("batch_upsert_pub_tensor", keys, tensors_list, config, True)

    def get_tensor(self, key: str) -> Any:
        need_torch("get_tensor")
        return self._get_tensors("get_tensor", [key])[0]

    def batch_get_tensor(self, keys: list[str]) -> list[Any]:
        need_torch("batch_get_tensor")
        return self._get_tensors("batch_get_tensor", keys)

    # --- zero-copy forms ------------------------------------------------------------

    def get_tensor_into(self, key: str, buffer_ptr: int, size: int) -> Any:
        need_torch("get_tensor_into")
        if not buffer_ptr:
            log.error("get_tensor_into(%r): buffer pointer cannot be null", key)
            return None
        return self._get_into("get_tensor_into", [key], [buffer_ptr], [size])[0]

    def batch_get_tensor_into(
        self, keys: list[str], buffer_ptrs: list[int], sizes: list[int]
    ) -> list[Any]:
        need_torch("batch_get_tensor_into")
        if not len(keys) == len(buffer_ptrs) == len(sizes) or not all(buffer_ptrs):
            log.error(
                "batch_get_tensor_into: keys, buffer_ptrs and sizes must match and pointers be non-null"
            )
            return [_INVALID] * len(keys)
        return self._get_into("batch_get_tensor_into", keys, buffer_ptrs, sizes)

    def put_tensor_from(self, key: str, buffer_ptr: int, size: int) -> int:
        need_torch("put_tensor_from")
        return self._put_from("put_tensor_from", [key], [buffer_ptr], [size], None, False)[0]

    def upsert_tensor_from(self, key: str, buffer_ptr: int, size: int) -> int:
        need_torch("upsert_tensor_from")
        return self._put_from("upsert_tensor_from", [key], [buffer_ptr], [size], None, True)[0]

    def batch_put_tensor_from(
        self, keys: list[str], buffer_ptrs: list[int], sizes: list[int]
    ) -> list[int]:
        need_torch("batch_put_tensor_from")
        return self._put_from("batch_put_tensor_from", keys, buffer_ptrs, sizes, None, False)

    def batch_upsert_tensor_from(
        self, keys: list[str], buffer_ptrs: list[int], sizes: list[int]
    ) -> list[int]:
        need_torch("batch_upsert_tensor_from")
        return self._put_from("batch_upsert_tensor_from", keys, buffer_ptrs, sizes, None, True)

    def get_tensor_into_cuda(self, key: str, tensor: Any) -> int:
        return self.batch_get_tensor_into_cuda([key], [tensor])[0]

    def batch_get_tensor_into_cuda(self, keys: list[str], tensors_list: list[Any]) -> list[int]:
        """Read tensors into existing (CUDA) tensors of the same dtype and shape; data
        bytes per key, or a negative code.  Dummy clients only, as the reference
        (whose real client writes the GPU memory through CUDA IPC): here the object
        comes through the shared pool and torch copies it into the tensor."""
        what = "batch_get_tensor_into_cuda"
        need_torch(what)
        results = [_INVALID] * len(keys)
        if len(keys) != len(tensors_list):
            log.error("%s: %d keys but %d tensors", what, len(keys), len(tensors_list))
            return results
        try:
            client = self._c()
        except MooncakeError as exc:
            log.error("%s failed: %s", what, exc)
            return results
        if not isinstance(client, DummyClient):
            log.error(
                "%s: tensor reads into CUDA memory need a dummy client (setup_dummy), as in the "
                "reference; use get_tensor_into with a registered buffer, or get_tensor",
                what,
            )
            return results
        try:
            objects = self._tensor_store().read(keys)
        except MooncakeError as exc:
            log.error("%s failed: %s", what, exc)
            return [store_code(exc)] * len(keys)
        for i, (key, dst, res) in enumerate(zip(keys, tensors_list, objects, strict=True)):
            if isinstance(res, StoreError):
                _log(f"{what}({key!r})", res)
                results[i] = res.code
                continue
            src = to_tensor(*res)
            if (
                getattr(dst, "dtype", None) != src.dtype
                or tuple(getattr(dst, "shape", ())) != tuple(src.shape)
                or not dst.is_contiguous()
            ):
                log.error(
                    "%s: destination tensor mismatch for key %r (stored %s %s; give a "
                    "contiguous tensor of that dtype and shape)",
                    what,
                    key,
                    src.dtype,
                    tuple(src.shape),
                )
                continue
            dst.copy_(src)
            results[i] = res[1].data_bytes
        return results

    # --- tensor parallelism (shards under <key>_tp_<rank>) -------------------------------

    def put_tensor_with_tp(
        self, key: str, tensor: Any, tp_rank: int = 0, tp_size: int = 1, split_dim: int = 0
    ) -> int:
        need_torch("put_tensor_with_tp")
        if tp_size <= 1:
            return self.put_tensor(key, tensor)
        return self._put_tp("put_tensor_with_tp", [key], [tensor], None, tp_size, split_dim, False)[
            0
        ]

    def pub_tensor_with_tp(
        self,
        key: str,
        tensor: Any,
        config: ReplicateConfig | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        split_dim: int = 0,
    ) -> int:
        need_torch("pub_tensor_with_tp")
        rc = check_replicate_config(config)
        if rc:
            return rc
        if tp_size <= 1:
            return self.pub_tensor(key, tensor, config)
        return self._put_tp(
            "pub_tensor_with_tp", [key], [tensor], config, tp_size, split_dim, False
        )[0]

    def batch_put_tensor_with_tp(
        self,
        base_keys: list[str],
        tensors_list: list[Any],
        tp_rank: int = 0,
        tp_size: int = 1,
        split_dim: int = 0,
    ) -> list[int]:
        need_torch("batch_put_tensor_with_tp")
        if tp_size <= 1:
            return self.batch_put_tensor(base_keys, tensors_list)
        if not self._batch_args_ok("batch_put_tensor_with_tp", base_keys, tensors_list):
            return [_INVALID] * len(base_keys)
        return self._put_tp(
            "batch_put_tensor_with_tp", base_keys, tensors_list, None, tp_size, split_dim, False
        )

    def batch_pub_tensor_with_tp(
        self,
        base_keys: list[str],
        tensors_list: list[Any],
        config: ReplicateConfig | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        split_dim: int = 0,
    ) -> list[int]:
        need_torch("batch_pub_tensor_with_tp")
        if tp_size <= 1:
            return self.batch_pub_tensor(base_keys, tensors_list, config)
        if not self._batch_args_ok("batch_pub_tensor_with_tp", base_keys, tensors_list):
            return [_INVALID] * len(base_keys)
        if check_replicate_config(config) or not check_group_ids(
            config, len(base_keys), "batch_pub_tensor_with_tp"
        ):
            return [_INVALID] * len(base_keys)
        return self._put_tp(
            "batch_pub_tensor_with_tp", base_keys, tensors_list, config, tp_size, split_dim, False
        )

    def get_tensor_with_tp(
        self, key: str, tp_rank: int = 0, tp_size: int = 1, split_dim: int = 0
    ) -> Any:
        need_torch("get_tensor_with_tp")
        return self.get_tensor(key if tp_size <= 1 else tp_key(key, tp_rank))

    def batch_get_tensor_with_tp(
        self, base_keys: list[str], tp_rank: int = 0, tp_size: int = 1
    ) -> list[Any]:
        need_torch("batch_get_tensor_with_tp")
        if tp_size <= 1:
            return self.batch_get_tensor(base_keys)
        return self.batch_get_tensor([tp_key(k, tp_rank) for k in base_keys])

    def get_tensor_with_tp_into(
        self,
        key: str,
        buffer_ptr: int,
        size: int,
        tp_rank: int = 0,
        tp_size: int = 1,
        split_dim: int = 0,
    ) -> Any:
        need_torch("get_tensor_with_tp_into")
        return self.get_tensor_into(key if tp_size <= 1 else tp_key(key, tp_rank), buffer_ptr, size)

    def batch_get_tensor_with_tp_into(
        self,
        base_keys: list[str],
        buffer_ptrs: list[int],
        sizes: list[int],
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> list[Any]:
        need_torch("batch_get_tensor_with_tp_into")
        keys = base_keys if tp_size <= 1 else [tp_key(k, tp_rank) for k in base_keys]
        return self.batch_get_tensor_into(keys, buffer_ptrs, sizes)

    def put_tensor_with_tp_from(
        self,
        key: str,
        buffer_ptr: int,
        size: int,
        tp_rank: int = 0,
        tp_size: int = 1,
        split_dim: int = 0,
    ) -> int:
        need_torch("put_tensor_with_tp_from")
        return self.batch_put_tensor_with_tp_from(
            [key], [buffer_ptr], [size], tp_rank, tp_size, split_dim
        )[0]

    def batch_put_tensor_with_tp_from(
        self,
        base_keys: list[str],
        buffer_ptrs: list[int],
        sizes: list[int],
        tp_rank: int = 0,
        tp_size: int = 1,
        split_dim: int = 0,
    ) -> list[int]:
        what = "batch_put_tensor_with_tp_from"
        need_torch(what)
        if tp_size <= 1:
            return self.batch_put_tensor_from(base_keys, buffer_ptrs, sizes)
        if not base_keys or not len(base_keys) == len(buffer_ptrs) == len(sizes):
            if base_keys:
                log.error("%s: base_keys, buffer_ptrs and sizes differ in length", what)
            return [_INVALID] * len(base_keys)
        try:
            ts = self._tensor_store()
        except MooncakeError as exc:
            log.error("%s failed: %s", what, exc)
            return [store_code(exc)] * len(base_keys)

        def shards(key: str, ptr: int, size: int) -> Any:
            def make() -> list[TensorObject]:
                header, view = ts.raw_object(ptr, size, what)
                # the reference decodes the buffer into a tensor of its local shape first
                whole = replace(
                    TensorHeader.full(header.dtype, header.local_shape),
                    data_offset=header.data_offset,
                )
                return _tp_shards(key, (whole, view), tp_size, split_dim, what)

            return make

        build = [
            (i, shards(k, p, n))
            for i, (k, p, n) in enumerate(zip(base_keys, buffer_ptrs, sizes, strict=True))
        ]
        return self._write_objects(what, len(base_keys), build, None, False)

    # --- safetensors files ---------------------------------------------------------------

    def save_tensor_to_safetensor(self, key: str, file_name: str | None = None) -> int:
        """Write the tensor under ``key`` to a safetensors file (default name: the key)."""
        need_torch("save_tensor_to_safetensor")
        tensor = self.get_tensor(key)
        if tensor is None:
            log.error("save_tensor_to_safetensor: no tensor under %r", key)
            return int(ErrorCode.FILE_NOT_FOUND)
        try:
            from safetensors.torch import save_file

            save_file({key: tensor}, key if file_name is None else str(file_name))
        except ImportError:
            log.error(
                "save_tensor_to_safetensor needs the safetensors package: pip install safetensors"
            )
            return _INVALID
        except Exception as exc:  # safetensors raises OSError, ValueError, SafetensorError
            log.error("save_tensor_to_safetensor(%r) failed: %s", key, exc)
            return _INVALID
        return 0

    def load_tensor_from_safetensor(
        self, key: str | None = None, file_name: str | None = None
    ) -> Any:
        """Store the tensor named ``key`` (else the file's first) from a safetensors
        file under ``key`` (default: the file name); returns it, or None."""
        need_torch("load_tensor_from_safetensor")
        if file_name is None:
            raise TypeError("load_tensor_from_safetensor() missing required argument 'file_name'")
        try:
            from safetensors.torch import load_file

            loaded = load_file(str(file_name))
        except ImportError:
            log.error(
                "load_tensor_from_safetensor needs the safetensors package: pip install safetensors"
            )
            return None
        except Exception as exc:  # missing file, not a safetensors file
            log.error("load_tensor_from_safetensor(%r) failed: %s", file_name, exc)
            return None
        if not loaded:
            log.error("load_tensor_from_safetensor: no tensors in %r", file_name)
            return None
        target = str(file_name) if key is None else key
        if key is not None and key in loaded:
            tensor = loaded[key]
        else:
            if key is not None:
                log.warning(
                    "load_tensor_from_safetensor: %r is not in %r; using its first tensor",
                    key,
                    file_name,
                )
            tensor = next(iter(loaded.values()))
        rc = self.put_tensor(target, tensor)
        if rc != 0:
            log.error("load_tensor_from_safetensor: storing %r failed with %d", target, rc)
            return None
        return tensor


def _tp_shards(
    key: str,
    source: ArrayData | tuple[TensorHeader, memoryview],
    tp_size: int,
    split_dim: int,
    what: str,
) -> list[TensorObject]:
    """Every rank's shard of a whole tensor, under ``<key>_tp_<rank>``."""
    shape = source.shape if isinstance(source, ArrayData) else source[0].global_shape
    check_uniform(shape, split_dim, tp_size, what)
    return [
        shard_of(
            tp_key(key, rank),
            source,
            split_dim,
            rank,
            tp_size,
            (AxisSpec("tp", rank, tp_size, split_dim),),
            what,
        )
        for rank in range(tp_size)
    ]


# --------------------------------------------------------------------------------
# module-level helpers of mooncake.store (used by structured_object_store)
# --------------------------------------------------------------------------------


def serialize_tensor(tensor: Any) -> tuple[bytes, int, int, Any]:
    """``_serialize_tensor``: (304-byte metadata, data address, data size, owner).

    Raises:
        ValueError: not a supported tensor.
    """
    try:
        array = describe(tensor)
    except InvalidParams as exc:
        raise ValueError(f"unsupported tensor for Mooncake tensor serialization: {exc}") from None
    owner = array.owner
    if array.nbytes == 0:
        ptr = 0
    elif hasattr(owner, "data_ptr"):
        ptr = int(owner.data_ptr())
    else:
        ptr = int(owner.ctypes.data)
    return array.header().encode(), ptr, array.nbytes, owner


def tensor_metadata_size() -> int:
    """``_tensor_metadata_size``: 304."""
    return HEADER_SIZE


def deserialize_tensor(payload: bytes) -> Any:
    """``_deserialize_tensor``: a tensor from metadata + element bytes (copied).

    Raises:
        ValueError: not a valid tensor object.
    """
    torch_module("_deserialize_tensor")
    owned = bytearray(payload)
    try:
        header = parse_header(owned)
    except InvalidParams:
        raise ValueError("invalid serialized Mooncake tensor payload") from None
    return to_tensor(owned, header)
