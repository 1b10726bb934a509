"""Unified parallel tensor I/O (the reference's ``*_tensor_with_parallelism``).

Writers describe where their tensor sits in a parallel layout (axes tp, dp,
ep, pp), or cut a whole tensor themselves (a *writer partition*); readers ask
for the tensor as stored, for one shard of a layout, or for the whole tensor,
and the shards are joined again from byte ranges.

Where objects go (``docs/store-api.md`` has the table):

- no layout: the key itself;
- one tp axis: the caller passes its local shard; it goes to ``<key>_tp_<rank>``
  (the ``*_with_tp`` wrappers' names) and the whole tensor's shape to the
  manifest ``<key>__parallelism_manifest``;
- several axes with tp: the caller passes the whole tensor; the shard of its
  tp rank goes to ``<key>__dp_0of2__tp_1of4_sd0...`` (axes in dp, tp, ep, pp
  order) plus the manifest;
- axes without tp: the tensor is stored as is under the axes' key;
- writer partition ``(rank, size, split_dim)``: the caller passes the whole
  tensor; shard ``rank`` goes to ``<key>__writer_<rank>of<size>_sd<dim>`` and
  the shape to ``<key>__writer_manifest``;
- ``*_from`` with a tp axis writes every tp rank's shard of the whole tensor
  found in the buffer (no manifest), as the reference does.

Reads follow the reference's routes in order and fall back the same way (see
:meth:`ParallelTensors.read`); a missing or mismatched layout is
``ObjectNotFound``/``InvalidParams``, which the edge reports as ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..errors import InvalidParams, MooncakeError, ObjectNotFound, StoreError
from ..transfer._memory import view_at
from ._tensor import (
    AxisKind,
    AxisSpec,
    JoinPlan,
    JoinSource,
    ShardManifest,
    TensorHeader,
    canonical_axes,
    check_uniform,
    is_single_tp,
    join_plan,
    matches_stored,
    parallelism_key,
    parallelism_manifest_key,
    shard_header,
    shard_range,
    stored_axes,
    tp_index,
    tp_key,
    validate_axes,
    writer_manifest_key,
    writer_shard_key,
)
from ._tensor_array import ArrayData, empty_bytes, to_tensor
from ._tensor_store import TensorObject, TensorStore, shard_of
from ._types import ReplicateConfig

__all__ = ["ParallelTensors", "ReadMode", "ReadRequest", "WriterPartition"]


@dataclass(frozen=True)
class WriterPartition:
    """The writer cuts the whole tensor into ``size`` shards along
    ``split_dim`` and stores shard ``rank``."""

    rank: int
    size: int
    split_dim: int

    def check(self, what: str) -> None:
        if self.size <= 0 or not 0 <= self.rank < self.size or self.split_dim < 0:
            raise InvalidParams(
                f"{what}: invalid writer partition rank {self.rank} of {self.size}, "
                f"split_dim {self.split_dim}"
            )

    def axes(self) -> tuple[AxisSpec, ...]:
        return (AxisSpec("tp", self.rank, self.size, self.split_dim),)


class ReadMode(Enum):
    AS_STORED = "as_stored"
    SHARD = "shard"
    FULL = "full"


@dataclass(frozen=True)
class ReadRequest:
    mode: ReadMode = ReadMode.AS_STORED
    axes: tuple[AxisSpec, ...] | None = None


@dataclass(frozen=True)
class _Sources:
    """Shards that together cut one tensor along ``split_dim``."""

    sources: list[JoinSource]
    locations: dict[str, Any]
    global_shape: tuple[int, ...]
    split_dim: int
    dtype: int


def _with_tp_rank(
    axes: Sequence[AxisSpec], rank: int, size: int | None = None
) -> tuple[AxisSpec, ...]:
    i = tp_index(axes)
    assert i is not None
    out = list(axes)
    out[i] = out[i].with_rank(rank, size)
    return tuple(out)


def _tp_axis(axes: Sequence[AxisSpec]) -> AxisSpec | None:
    i = tp_index(axes)
    return None if i is None else axes[i]


def _compatible(
    request: Sequence[AxisSpec], header: TensorHeader, what: str
) -> tuple[AxisSpec, ...]:
    """``resolve_tp_compatible_parallelism_from_metadata``: the stored axes
    equal ``request`` (canonical) except for the tp axis's rank and size.

    Raises:
        InvalidParams: they differ.
    """
    stored = stored_axes(header)
    if stored is None:
        raise InvalidParams(f"{what}: shard has no parallelism metadata")
    if len(stored) != len(request):
        raise InvalidParams(f"{what}: axis count mismatch")
    ri, si = tp_index(request), tp_index(stored)
    if ri is None or si is None or ri != si:
        raise InvalidParams(f"{what}: joining shards needs the tp axis in the same place")
    for i, (a, b) in enumerate(zip(request, stored, strict=True)):
        if i == ri:
            if (a.kind_code, a.split_dim, a.expert_id, a.stage_id) != (
                b.kind_code,
                b.split_dim,
                b.expert_id,
                b.stage_id,
            ):
                raise InvalidParams(f"{what}: tp axis metadata mismatch")
        elif not a.same_as(b):
            raise InvalidParams(f"{what}: {a.kind} axis metadata mismatch")
    return stored


def _equal_by_kind(lhs: Sequence[AxisSpec], rhs: Sequence[AxisSpec]) -> bool:
    """``parallelism_specs_equal_by_kind`` with the tp rank left free."""
    if len(lhs) != len(rhs):
        return False
    by_kind = {b.kind_code: b for b in rhs}
    for a in lhs:
        b = by_kind.get(a.kind_code)
        if b is None:
            return False
        if a.kind_code == AxisKind.TP:
            if (a.size, a.split_dim, a.expert_id, a.stage_id) != (
                b.size,
                b.split_dim,
                b.expert_id,
                b.stage_id,
            ):
                return False
        elif not a.same_as(b):
            return False
    return True


class ParallelTensors:
    """The ``*_with_parallelism`` operations over a :class:`TensorStore`."""

    def __init__(self, tensors: TensorStore) -> None:
        self.tensors = tensors

    # ------------------------------------------------------------------------------
    # writes
    # ------------------------------------------------------------------------------

    def _write_one(self, obj: TensorObject, config: ReplicateConfig, upsert: bool) -> None:
        (res,) = self.tensors.write([obj], config, upsert=upsert)
        if isinstance(res, StoreError):
            raise res

    def _write_manifest(
        self, key: str, manifest: ShardManifest, config: ReplicateConfig, upsert: bool
    ) -> None:
        self.tensors.write_bytes(key, [manifest.encode()], config, upsert=upsert)

    def write(
        self,
        key: str,
        array: ArrayData,
        axes: Sequence[AxisSpec] | None,
        writer: WriterPartition | None,
        config: ReplicateConfig,
        *,
        upsert: bool = False,
    ) -> None:
        """Store ``array`` under the layout described (see the module doc).

        Raises:
            InvalidParams: both a layout and a writer partition, invalid axes,
                a split that is not uniform.
            StoreError: the write failed.
        """
        what = "upsert_tensor_with_parallelism" if upsert else "put_tensor_with_parallelism"
        if writer is not None and axes is not None:
            raise InvalidParams(f"{what}: writer_partition cannot be combined with parallelism")
        if writer is not None:
            writer.check(what)
            check_uniform(array.shape, writer.split_dim, writer.size, what)
            shard = shard_of(
                writer_shard_key(key, writer.rank, writer.size, writer.split_dim),
                array,
                writer.split_dim,
                writer.rank,
                writer.size,
                writer.axes(),
                what,
            )
            self._write_one(shard, config, upsert)
            manifest = ShardManifest(array.dtype, array.shape, writer.split_dim, writer.size)
            self._write_manifest(writer_manifest_key(key), manifest, config, upsert)
            return
        if axes is None:
            self._write_one(TensorObject.whole(key, array), config, upsert)
            return
        axes = validate_axes(axes, what)
        tp = _tp_axis(axes)
        if tp is None:  # stored as is, described by its axes
            header = shard_header(array.dtype, array.shape, array.shape, axes)
            parts = (array.data,) if array.nbytes else ()
            self._write_one(TensorObject(parallelism_key(key, axes), header, parts), config, upsert)
            return
        assert tp.split_dim is not None
        if len(axes) == 1:  # the caller's local shard of a tp layout
            local = array.shape
            if not 0 <= tp.split_dim < len(local):
                raise InvalidParams(f"{what}: split_dim {tp.split_dim} is outside the tensor")
            full = tuple(d * tp.size if i == tp.split_dim else d for i, d in enumerate(local))
            check_uniform(full, tp.split_dim, tp.size, what)
            header = shard_header(array.dtype, full, local, axes)
            parts = (array.data,) if array.nbytes else ()
            self._write_one(TensorObject(tp_key(key, tp.rank), header, parts), config, upsert)
        else:  # the whole tensor; store this writer's tp shard
            full = array.shape
            check_uniform(full, tp.split_dim, tp.size, what)
            obj = shard_of(
                parallelism_key(key, axes), array, tp.split_dim, tp.rank, tp.size, axes, what
            )
            self._write_one(obj, config, upsert)
        manifest = ShardManifest(array.dtype, full, tp.split_dim, tp.size)
        self._write_manifest(parallelism_manifest_key(key), manifest, config, upsert)

    def write_from(
        self,
        key: str,
        buffer_ptr: int,
        size: int,
        axes: Sequence[AxisSpec] | None,
        writer: WriterPartition | None,
        config: ReplicateConfig,
        *,
        upsert: bool = False,
    ) -> None:
        """Like :meth:`write` for a tensor object laid out at ``buffer_ptr``.

        Raises:
            InvalidParams: as :meth:`write`, or the buffer is not a tensor object.
            StoreError: the write failed.
        """
        what = (
            "upsert_tensor_with_parallelism_from" if upsert else "put_tensor_with_parallelism_from"
        )
        if writer is not None and axes is not None:
            raise InvalidParams(f"{what}: writer_partition cannot be combined with parallelism")
        if axes is not None:
            axes = validate_axes(axes, what)
        if writer is not None:
            writer.check(what)
        header, view = self.tensors.raw_object(buffer_ptr, size, what)
        if writer is not None:
            shard = shard_of(
                writer_shard_key(key, writer.rank, writer.size, writer.split_dim),
                (header, view),
                writer.split_dim,
                writer.rank,
                writer.size,
                writer.axes(),
                what,
            )
            self._write_one(shard, config, upsert)
            manifest = ShardManifest(
                header.dtype, header.global_shape, writer.split_dim, writer.size
            )
            self._write_manifest(writer_manifest_key(key), manifest, config, upsert)
            return
        if axes is None:
            self.tensors.write_bytes(key, [view], config, upsert=upsert)
            return
        tp = _tp_axis(axes)
        if tp is None:
            shard = TensorObject(
                parallelism_key(key, axes),
                shard_header(header.dtype, header.global_shape, header.local_shape, axes),
                (view[header.data_offset :],) if header.data_bytes else (),
            )
            self._write_one(shard, config, upsert)
            return
        assert tp.split_dim is not None
        objects = []
        for rank in range(tp.size):
            shard_axes = _with_tp_rank(axes, rank)
            objects.append(
                shard_of(
                    parallelism_key(key, shard_axes),
                    (header, view),
                    tp.split_dim,
                    rank,
                    tp.size,
                    shard_axes,
                    what,
                )
            )
        for res in self.tensors.write(objects, config, upsert=upsert):
            if isinstance(res, StoreError):
                raise res

    # ------------------------------------------------------------------------------
    # reads
    # ------------------------------------------------------------------------------

    def read(self, key: str, request: ReadRequest) -> Any:
        """The tensor (or shard) ``request`` asks for.

        Raises:
            StoreError/InvalidParams: nothing matching is stored.
        """
        what = "get_tensor_with_parallelism"
        if request.axes is None:
            if request.mode == ReadMode.FULL:
                sources = self._writer_sources(key, what)
                if sources is not None:
                    return self._materialize(self._full_plan(sources, what), sources)
            return self.tensors.get(key)
        axes = validate_axes(request.axes, what)
        tp = _tp_axis(axes)
        if request.mode == ReadMode.SHARD:
            stored = self._stored_shard(key, axes)
            if stored is not None:
                buf, header, _key = stored
                return to_tensor(buf, header)
            if tp is not None:
                try:
                    sources = self._layout_sources(key, axes, what)
                    return self._materialize(self._shard_plan(sources, axes, what), sources)
                except MooncakeError:
                    if not is_single_tp(axes):
                        raise
                return self.tensors.get(tp_key(key, tp.rank) if tp.size > 1 else key)
            raise InvalidParams(f"{what}: no shard of {key!r} matches the requested layout")
        if tp is None:
            raise InvalidParams(f"{what}: reading the whole tensor needs a tp axis")
        sources = self._layout_sources(key, axes, what)
        return self._materialize(self._full_plan(sources, what), sources)

    def read_into(self, key: str, buffer_ptr: int, size: int, request: ReadRequest) -> Any:
        """Like :meth:`read`, into ``size`` bytes of local memory at ``buffer_ptr``
        (the returned tensor shares it).

        Raises:
            InvalidParams: the buffer is too small; as :meth:`read`.
        """
        what = "get_tensor_with_parallelism_into"
        if not buffer_ptr:
            raise InvalidParams(f"{what}: buffer pointer cannot be null")
        if request.axes is None:
            if request.mode == ReadMode.FULL:
                sources = self._writer_sources(key, what)
                if sources is not None:
                    return self._run_into(
                        self._full_plan(sources, what), sources, buffer_ptr, size, what
                    )
            return self._whole_into(key, buffer_ptr, size, what)
        axes = validate_axes(request.axes, what)
        tp = _tp_axis(axes)
        if request.mode == ReadMode.SHARD:
            stored = self._stored_shard_key(key, axes)
            if stored is not None:
                return self._whole_into(stored, buffer_ptr, size, what)
            if tp is None:
                raise InvalidParams(f"{what}: no shard of {key!r} matches the requested layout")
            sources = self._layout_sources(key, axes, what)
            return self._run_into(
                self._shard_plan(sources, axes, what), sources, buffer_ptr, size, what
            )
        if tp is None:
            raise InvalidParams(f"{what}: reading the whole tensor needs a tp axis")
        sources = self._layout_sources(key, axes, what)
        return self._run_into(self._full_plan(sources, what), sources, buffer_ptr, size, what)

    # --- plans and their execution ---------------------------------------------------

    def _materialize(self, plan: JoinPlan, sources: _Sources) -> Any:
        buf = empty_bytes(plan.total_bytes)
        self.tensors.run(plan, sources.locations, memoryview(buf))
        return to_tensor(buf, plan.header)

    def _run_into(self, plan: JoinPlan, sources: _Sources, ptr: int, size: int, what: str) -> Any:
        if plan.total_bytes > size:
            raise InvalidParams(
                f"{what}: {size} bytes cannot hold the {plan.total_bytes}-byte tensor"
            )
        view = view_at(ptr, plan.total_bytes)
        self.tensors.run(plan, sources.locations, view)
        return to_tensor(view, plan.header)

    def _whole_into(self, key: str, ptr: int, size: int, what: str) -> Any:
        (n,) = self.tensors.read_into([key], [ptr], [size])
        if isinstance(n, StoreError):
            raise n
        return self.tensors.tensor_at(ptr, n)

    @staticmethod
    def _full_plan(sources: _Sources, what: str) -> JoinPlan:
        target = TensorHeader.full(sources.dtype, sources.global_shape)
        return join_plan(
            sources.sources,
            sources.global_shape,
            sources.split_dim,
            target,
            0,
            sources.global_shape[sources.split_dim],
            what,
        )

    @staticmethod
    def _shard_plan(sources: _Sources, axes: Sequence[AxisSpec], what: str) -> JoinPlan:
        tp = _tp_axis(axes)
        assert tp is not None
        start, extent = shard_range(sources.global_shape[sources.split_dim], tp.rank, tp.size)
        local = tuple(
            extent if i == sources.split_dim else d for i, d in enumerate(sources.global_shape)
        )
        target = shard_header(sources.dtype, sources.global_shape, local, axes)
        return join_plan(
            sources.sources, sources.global_shape, sources.split_dim, target, start, extent, what
        )

    # --- finding what is stored ----------------------------------------------------

    def _stored_shard_key(self, key: str, axes: Sequence[AxisSpec]) -> str | None:
        """The key of a stored shard written exactly with ``axes``, if any."""
        found = self._stored_shard(key, axes)
        return None if found is None else found[2]

    def _stored_shard(self, key: str, axes: Sequence[AxisSpec]) -> Any:
        """(buffer, header, key) of a stored shard written exactly with
        ``axes`` (``resolve_parallelism_shard_read``), or None."""
        candidates = [parallelism_key(key, axes)]
        if is_single_tp(axes):
            a = axes[0]
            candidates.append(writer_shard_key(key, a.rank, a.size, a.split_dim or 0))
        for i, candidate in enumerate(candidates):
            found = self.tensors.header(candidate)
            if found is None:
                continue
            buf, header = found
            if i == 1:
                stored = stored_axes(header)
                if stored is None or not is_single_tp(stored):
                    continue
            if matches_stored(axes, header):
                return buf, header, candidate
        return None

    def _writer_sources(self, key: str, what: str) -> _Sources | None:
        """Shards of a writer-partitioned tensor, or None without its manifest
        (``load_writer_shard_reconstruction``)."""
        manifest = self.tensors.manifest(writer_manifest_key(key))
        if manifest is None:
            return None
        keys = [
            writer_shard_key(key, r, manifest.shard_count, manifest.split_dim)
            for r in range(manifest.shard_count)
        ]
        sources, locations = self.tensors.sources(keys, what)
        for rank, src in enumerate(sources):
            stored = stored_axes(src.header)
            if (
                stored is None
                or not is_single_tp(stored)
                or (stored[0].rank, stored[0].size, stored[0].split_dim)
                != (rank, manifest.shard_count, manifest.split_dim)
            ):
                raise InvalidParams(f"{what}: writer shard {src.key!r} does not match its manifest")
        return _Sources(
            sources, locations, manifest.global_shape, manifest.split_dim, manifest.dtype
        )

    def _layout_sources(self, key: str, axes: Sequence[AxisSpec], what: str) -> _Sources:
        """Every tp shard of the layout ``axes`` belongs to
        (``load_parallelism_full_reconstruction_sources``): by the manifest when
        there is one, else by the shards' own metadata.

        Raises:
            StoreError/InvalidParams: shards missing or inconsistent.
        """
        try:
            return self._manifest_sources(key, axes, what)
        except MooncakeError:
            pass
        tp = _tp_axis(axes)
        if tp is None:
            raise InvalidParams(f"{what}: joining shards needs a tp axis")
        canonical = canonical_axes(axes)
        if is_single_tp(canonical):
            first = self.tensors.header(tp_key(key, 0) if tp.size > 1 else key)
            if first is None:
                raise ObjectNotFound(f"{what}: no shard of {key!r} for tp rank 0")
            head = first[1]
            stored_tp = head.axis(AxisKind.TP)
            if not head.is_shard or stored_tp is None:
                raise InvalidParams(f"{what}: {key!r} has no tp layout metadata")
            split = stored_tp.split_dim
            if tp.split_dim is not None and tp.split_dim != split:
                raise InvalidParams(
                    f"{what}: split_dim mismatch ({tp.split_dim} vs stored {split})"
                )
            shape = head.global_shape
            check_uniform(shape, split, tp.size, what)
            check_uniform(shape, split, stored_tp.shard_count, what)
            count = stored_tp.shard_count
            keys = [tp_key(key, r) if count > 1 else key for r in range(count)]
            sources, locations = self.tensors.sources(keys, what)
            for rank, src in enumerate(sources):
                a = src.header.axis(AxisKind.TP)
                if (
                    not src.header.is_shard
                    or a is None
                    or (a.shard_rank, a.shard_count, a.split_dim)
                    != (
                        rank,
                        count,
                        split,
                    )
                ):
                    raise InvalidParams(f"{what}: shard {src.key!r} does not match tp rank {rank}")
            return _Sources(sources, locations, shape, split, head.dtype)
        keys = [parallelism_key(key, _with_tp_rank(canonical, r)) for r in range(tp.size)]
        sources, locations = self.tensors.sources(keys, what)
        for rank, src in enumerate(sources):
            stored = _compatible(_with_tp_rank(canonical, rank), src.header, what)
            if not _equal_by_kind(canonical, stored):
                raise InvalidParams(f"{what}: shard {src.key!r} does not match tp rank {rank}")
        head = sources[0].header
        stored_tp = head.axis(AxisKind.TP)
        assert stored_tp is not None
        split = stored_tp.split_dim
        if tp.split_dim is not None and tp.split_dim != split:
            raise InvalidParams(f"{what}: split_dim mismatch ({tp.split_dim} vs stored {split})")
        check_uniform(head.global_shape, split, tp.size, what)
        return _Sources(sources, locations, head.global_shape, split, head.dtype)

    def _manifest_sources(self, key: str, axes: Sequence[AxisSpec], what: str) -> _Sources:
        """``load_parallelism_manifest_reconstruction``."""
        tp = _tp_axis(axes)
        if tp is None:
            raise InvalidParams(f"{what}: joining shards needs a tp axis")
        manifest = self.tensors.manifest(parallelism_manifest_key(key))
        if manifest is None:
            raise ObjectNotFound(f"{what}: no parallelism manifest for {key!r}")
        shape, split, count = manifest.global_shape, manifest.split_dim, manifest.shard_count
        if tp.split_dim is not None and tp.split_dim != split:
            raise InvalidParams(f"{what}: split_dim mismatch ({tp.split_dim} vs stored {split})")
        check_uniform(shape, split, tp.size, what)
        check_uniform(shape, split, count, what)
        canonical = canonical_axes(axes)
        keys = [parallelism_key(key, _with_tp_rank(canonical, r, count)) for r in range(count)]
        sources, locations = self.tensors.sources(keys, what)
        for rank, src in enumerate(sources):
            want = _with_tp_rank(canonical, rank, count)
            stored = _compatible(want, src.header, what)
            if not _equal_by_kind(want, stored):
                raise InvalidParams(f"{what}: shard {src.key!r} does not match tp rank {rank}")
        return _Sources(sources, locations, shape, split, manifest.dtype)


def batch_requests(values: Any, count: int, what: str, name: str) -> list[Any]:
    """A per-key request list (``validate_batch_request_list``).

    Raises:
        InvalidParams: not a list, or not one entry per key.
    """
    if not isinstance(values, list):
        raise InvalidParams(f"{what}: {name} must be a list or None")
    if len(values) != count:
        raise InvalidParams(f"{what}: keys and {name} must have the same length")
    return values
