"""``*_tensor_with_parallelism*`` of ``MooncakeDistributedStore``.

Arguments are the reference's: ``parallelism`` a :class:`TensorParallelism`
(or any object with ``axes``), ``writer_partition`` any object with
``rank``, ``size`` and ``split_dim``, ``target`` a :class:`ReadTarget`.
Writes return 0 or a negative code (per key for batches), reads a tensor or
``None``.  Layout rules and key names: ``pymooncake.store._tensor_parallel``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from pymooncake.errors import InvalidParams, MooncakeError, StoreError
from pymooncake.store import ErrorCode
from pymooncake.store._tensor_array import describe
from pymooncake.store._tensor_parallel import ParallelTensors, batch_requests

from ._parallel_types import parse_axes, parse_target, parse_writer
from ._store_codes import store_code
from ._store_tensor import TensorOps, check_group_ids, check_replicate_config, need_torch
from ._store_types import ReplicateConfig

__all__ = ["ParallelOps"]

log = logging.getLogger("mooncake.store")
_INVALID = int(ErrorCode.INVALID_PARAMS)


def _report(what: str, exc: MooncakeError) -> None:
    if isinstance(exc, StoreError) and exc.code == ErrorCode.OBJECT_NOT_FOUND:
        log.debug("%s: %s", what, exc)
    else:
        log.error("%s: %s", what, exc)


def _single_key(config: ReplicateConfig | None, index: int) -> ReplicateConfig | None:
    """``ReplicateConfig::ForSingleKey``: the config with only key ``index``'s group."""
    if config is None or config.group_ids is None:
        return config
    one = ReplicateConfig()
    for name, value in vars(config).items():
        object.__setattr__(one, name, list(value) if isinstance(value, list) else value)
    one.group_ids = [config.group_ids[index]]
    return one


class ParallelOps(TensorOps):
    """Mixin: the unified parallel tensor API."""

    def _parallel(self) -> ParallelTensors:
        return ParallelTensors(self._tensor_store())

    # --- writes ----------------------------------------------------------------------

    def _write_parallel(
        self,
        what: str,
        key: str,
        parallelism: Any,
        config: ReplicateConfig | None,
        writer_partition: Any,
        upsert: bool,
        source: Callable[[ParallelTensors, Any, Any], None],
    ) -> int:
        need_torch(what)
        try:
            if parallelism is not None and writer_partition is not None:
                raise InvalidParams(f"{what}: writer_partition cannot be combined with parallelism")
            axes = None if parallelism is None else parse_axes(parallelism)
            writer = None if writer_partition is None else parse_writer(writer_partition)
            if axes is None and writer is None:
                rc = check_replicate_config(config)
                if rc:
                    return rc
            source(self._parallel(), axes, writer)
            return 0
        except MooncakeError as exc:
            _report(f"{what}({key!r})", exc)
            return store_code(exc)

    def _put_with_parallelism(
        self,
        what: str,
        key: str,
        tensor: Any,
        parallelism: Any,
        config: ReplicateConfig | None,
        writer_partition: Any,
        upsert: bool,
    ) -> int:
        def run(pt: ParallelTensors, axes: Any, writer: Any) -> None:
            pt.write(
                key,
                describe(tensor, f"{what}({key!r})"),
                axes,
                writer,
                self._cfg(config),
                upsert=upsert,
            )

        return self._write_parallel(what, key, parallelism, config, writer_partition, upsert, run)

    def _put_from_with_parallelism(
        self,
        what: str,
        key: str,
        buffer_ptr: int,
        size: int,
        parallelism: Any,
        config: ReplicateConfig | None,
        writer_partition: Any,
        upsert: bool,
    ) -> int:
        def run(pt: ParallelTensors, axes: Any, writer: Any) -> None:
            pt.write_from(key, buffer_ptr, size, axes, writer, self._cfg(config), upsert=upsert)

        return self._write_parallel(what, key, parallelism, config, writer_partition, upsert, run)

    def _batch_parallel(
        self,
        what: str,
        keys: Sequence[str],
        count: int,
        parallelisms: Any,
        config: ReplicateConfig | None,
        writer_partitions: Any,
        direct: Callable[[], list[int]],
        one: Callable[[int, Any, Any, ReplicateConfig | None], int],
    ) -> list[int]:
        need_torch(what)
        if not check_group_ids(config, len(keys), what):
            return [_INVALID] * len(keys)
        if parallelisms is not None and writer_partitions is not None:
            log.error("%s: writer_partitions cannot be combined with parallelisms", what)
            return [_INVALID] * len(keys)
        if count != len(keys):
            log.error("%s: %d keys but %d values", what, len(keys), count)
            return [_INVALID] * len(keys)
        if parallelisms is None and writer_partitions is None:
            return direct()
        try:
            requests = batch_requests(
                parallelisms if parallelisms is not None else writer_partitions,
                len(keys),
                what,
                "parallelisms" if parallelisms is not None else "writer_partitions",
            )
        except InvalidParams as exc:
            log.error("%s", exc)
            return [_INVALID] * len(keys)
        out = []
        for i, req in enumerate(requests):
            cfg = _single_key(config, i)
            if parallelisms is not None:
                out.append(one(i, req, None, cfg))
            else:
                out.append(one(i, None, req, cfg))
        return out

    def put_tensor_with_parallelism(
        self,
        key: str,
        tensor: Any,
        parallelism: Any = None,
        config: ReplicateConfig | None = None,
        writer_partition: Any = None,
    ) -> int:
        return self._put_with_parallelism(
            "put_tensor_with_parallelism", key, tensor, parallelism, config, writer_partition, False
        )

    def upsert_tensor_with_parallelism(
        self,
        key: str,
        tensor: Any,
        parallelism: Any = None,
        config: ReplicateConfig | None = None,
        writer_partition: Any = None,
    ) -> int:
        return self._put_with_parallelism(
            "upsert_tensor_with_parallelism",
            key,
            tensor,
            parallelism,
            config,
            writer_partition,
            True,
        )

    def put_tensor_with_parallelism_from(
        self,
        key: str,
        buffer_ptr: int,
        size: int,
        parallelism: Any = None,
        config: ReplicateConfig | None = None,
        writer_partition: Any = None,
    ) -> int:
        return self._put_from_with_parallelism(
            "put_tensor_with_parallelism_from",
            key,
            buffer_ptr,
            size,
            parallelism,
            config,
            writer_partition,
            False,
        )

    def upsert_tensor_with_parallelism_from(
        self,
        key: str,
        buffer_ptr: int,
        size: int,
        parallelism: Any = None,
        config: ReplicateConfig | None = None,
        writer_partition: Any = None,
    ) -> int:
        return self._put_from_with_parallelism(
            "upsert_tensor_with_parallelism_from",
            key,
            buffer_ptr,
            size,
            parallelism,
            config,
            writer_partition,
            True,
        )

    def _batch_tensors(
        self,
        what: str,
        keys: list[str],
        tensors_list: list[Any],
        parallelisms: Any,
        config: ReplicateConfig | None,
        writer_partitions: Any,
        upsert: bool,
    ) -> list[int]:
        def direct() -> list[int]:
            rc = check_replicate_config(config)
            if rc:
                return [rc] * len(keys)
            return self._put_tensors(what, keys, tensors_list, config, upsert)

        def one(i: int, p: Any, w: Any, cfg: ReplicateConfig | None) -> int:
            return self._put_with_parallelism(what, keys[i], tensors_list[i], p, cfg, w, upsert)

        return self._batch_parallel(
            what, keys, len(tensors_list), parallelisms, config, writer_partitions, direct, one
        )

    def batch_put_tensor_with_parallelism(
        self,
        keys: list[str],
        tensors_list: list[Any],
        parallelisms: Any = None,
        config: ReplicateConfig | None = None,
        writer_partitions: Any = None,
    ) -> list[int]:
        return self._batch_tensors(
            "batch_put_tensor_with_parallelism",
            keys,
            tensors_list,
            parallelisms,
            config,
            writer_partitions,
            False,
        )

    def batch_upsert_tensor_with_parallelism(
        self,
        keys: list[str],
        tensors_list: list[Any],
        parallelisms: Any = None,
        config: ReplicateConfig | None = None,
        writer_partitions: Any = None,
    ) -> list[int]:
        return self._batch_tensors(
            "batch_upsert_tensor_with_parallelism",
            keys,
            tensors_list,
            parallelisms,
            config,
            writer_partitions,
            True,
        )

    def _batch_from(
        self,
        what: str,
        keys: list[str],
        buffer_ptrs: list[int],
        sizes: list[int],
        parallelisms: Any,
        config: ReplicateConfig | None,
        writer_partitions: Any,
        upsert: bool,
    ) -> list[int]:
        def direct() -> list[int]:
            rc = check_replicate_config(config)
            if rc:
                return [rc] * len(keys)
            return self._put_from(what, keys, buffer_ptrs, sizes, config, upsert)

        def one(i: int, p: Any, w: Any, cfg: ReplicateConfig | None) -> int:
            if i >= len(sizes):
                return _INVALID
            return self._put_from_with_parallelism(
                what, keys[i], buffer_ptrs[i], sizes[i], p, cfg, w, upsert
            )

        return self._batch_parallel(
            what, keys, len(buffer_ptrs), parallelisms, config, writer_partitions, direct, one
        )

    def batch_put_tensor_with_parallelism_from(
        self,
        keys: list[str],
        buffer_ptrs: list[int],
        sizes: list[int],
        parallelisms: Any = None,
        config: ReplicateConfig | None = None,
        writer_partitions: Any = None,
    ) -> list[int]:
        return self._batch_from(
            "batch_put_tensor_with_parallelism_from",
            keys,
            buffer_ptrs,
            sizes,
            parallelisms,
            config,
            writer_partitions,
            False,
        )

    def batch_upsert_tensor_with_parallelism_from(
        self,
        keys: list[str],
        buffer_ptrs: list[int],
        sizes: list[int],
        parallelisms: Any = None,
        config: ReplicateConfig | None = None,
        writer_partitions: Any = None,
    ) -> list[int]:
        return self._batch_from(
            "batch_upsert_tensor_with_parallelism_from",
            keys,
            buffer_ptrs,
            sizes,
            parallelisms,
            config,
            writer_partitions,
            True,
        )

    # --- reads -----------------------------------------------------------------------

    def get_tensor_with_parallelism(self, key: str, target: Any = None) -> Any:
        what = "get_tensor_with_parallelism"
        need_torch(what)
        try:
            return self._parallel().read(key, parse_target(target))
        except MooncakeError as exc:
            _report(f"{what}({key!r})", exc)
            return None

    def batch_get_tensor_with_parallelism(self, keys: list[str], targets: Any = None) -> list[Any]:
        need_torch("batch_get_tensor_with_parallelism")
        if targets is None:
            return self.batch_get_tensor(keys)
        try:
            requests = batch_requests(
                targets, len(keys), "batch_get_tensor_with_parallelism", "targets"
            )
        except InvalidParams as exc:
            log.error("%s", exc)
            return [None] * len(keys)
        return [self.get_tensor_with_parallelism(k, t) for k, t in zip(keys, requests, strict=True)]

    def get_tensor_with_parallelism_into(
        self, key: str, buffer_ptr: int, size: int, target: Any = None
    ) -> Any:
        what = "get_tensor_with_parallelism_into"
        need_torch(what)
        try:
            return self._parallel().read_into(key, buffer_ptr, size, parse_target(target))
        except MooncakeError as exc:
            _report(f"{what}({key!r})", exc)
            return None

    def batch_get_tensor_with_parallelism_into(
        self,
        keys: list[str],
        buffer_ptrs: list[int],
        sizes: list[int],
        targets: Any = None,
    ) -> list[Any]:
        what = "batch_get_tensor_with_parallelism_into"
        need_torch(what)
        if not len(keys) == len(buffer_ptrs) == len(sizes):
            log.error("%s: keys, buffer_ptrs, and sizes must have the same length", what)
            return [None] * len(keys)
        if targets is None:
            requests: list[Any] = [None] * len(keys)
        else:
            try:
                requests = batch_requests(targets, len(keys), what, "targets")
            except InvalidParams as exc:
                log.error("%s", exc)
                return [None] * len(keys)
        return [
            self.get_tensor_with_parallelism_into(k, p, n, t)
            for k, p, n, t in zip(keys, buffer_ptrs, sizes, requests, strict=True)
        ]
