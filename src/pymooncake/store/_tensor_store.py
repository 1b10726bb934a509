"""Tensor objects over a :class:`StoreClient`: write, read, cut, join.

The bytes of a tensor object are ``[304-byte header][elements]`` (see
``_tensor.py``).  Writes hand the client the header and views of the
caller's tensor memory as parts of one object, so a put copies nothing on
the way (a shard of a tensor is a list of row views).  Reads land straight in
a fresh numpy buffer, or in the caller's memory for the ``*_into`` forms, and
the returned torch tensor shares that memory.

Every method raises :class:`~pymooncake.errors.MooncakeError` subclasses
(``InvalidParams`` for bad arguments and malformed objects, the store's own
errors otherwise); the ``mooncake.store`` edge turns them into the
reference's ints and ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InvalidParams, LeaseExpired, MooncakeError, StoreError, store_error
from ..transfer._memory import view_at
from ._client_io import ObjectLocation
from ._tensor import (
    HEADER_SIZE,
    AxisSpec,
    Fragment,
    JoinPlan,
    JoinSource,
    ShardManifest,
    TensorHeader,
    parse_header,
    parse_header_prefix,
    parse_manifest,
    shard_header,
    split_plan,
)
from ._tensor_array import ArrayData, empty_bytes, to_tensor
from ._types import ErrorCode, ReplicateConfig

if TYPE_CHECKING:
    from ._api import StoreApi

__all__ = ["TensorObject", "TensorStore"]


@dataclass(frozen=True)
class TensorObject:
    """One object to write: its key, header and element bytes (views, in order)."""

    key: str
    header: TensorHeader
    parts: tuple[memoryview, ...]

    @classmethod
    def whole(cls, key: str, array: ArrayData) -> TensorObject:
        return cls(key, array.header(), (array.data,) if array.nbytes else ())

    @classmethod
    def manifest(cls, key: str, manifest: ShardManifest) -> tuple[str, bytes]:
        return key, manifest.encode()


def shard_of(
    key: str,
    source: ArrayData | tuple[TensorHeader, memoryview],
    split_dim: int,
    rank: int,
    count: int,
    axes: Sequence[AxisSpec],
    what: str,
) -> TensorObject:
    """Shard ``rank`` of ``count`` of a whole tensor, as views of its rows.

    ``source`` is an array, or a stored object's header and bytes (the
    ``*_from`` forms).  ``axes`` describe the shard (their tp rank is already
    ``rank``).

    Raises:
        InvalidParams: not uniformly divisible, split_dim out of range.
    """
    if isinstance(source, ArrayData):
        header, base, data_offset = source.header(), source.data, HEADER_SIZE
    else:
        header, base = source
        data_offset = 0
    local, ranges = split_plan(header, split_dim, rank, count, what)
    parts = tuple(base[off - data_offset : off - data_offset + n] for off, n in ranges)
    return TensorObject(key, shard_header(header.dtype, header.global_shape, local, axes), parts)


class TensorStore:
    """The tensor operations of one store client."""

    def __init__(self, client: StoreApi) -> None:
        self.client = client

    # ------------------------------------------------------------------------------
    # writes
    # ------------------------------------------------------------------------------

    def write(
        self,
        objects: Sequence[TensorObject],
        config: ReplicateConfig,
        *,
        upsert: bool = False,
    ) -> list[bool | StoreError]:
        """Write tensor objects in one batch.  Results per object: True written,
        False the key existed (puts never overwrite), or the error."""
        if not objects:
            return []
        keys = [o.key for o in objects]
        values: list[list[Any]] = [[o.header.encode(), *o.parts] for o in objects]
        if upsert:
            return self.client.upsert_many(keys, values, config)
        return self.client.put_many(keys, values, config)

    def write_bytes(
        self, key: str, parts: Sequence[Any], config: ReplicateConfig, *, upsert: bool = False
    ) -> None:
        """Write one object made of ``parts`` (a manifest, a ready object).

        Raises:
            StoreError: the write failed (an existing key is not an error).
        """
        writer = self.client.upsert_many if upsert else self.client.put_many
        (res,) = writer([key], [list(parts)], config)
        if isinstance(res, StoreError):
            raise res

    def raw_object(self, buffer_ptr: int, size: int, what: str) -> tuple[TensorHeader, memoryview]:
        """A tensor object already laid out in local memory (``*_from``).

        Raises:
            InvalidParams: null pointer, too small, not a valid tensor object.
        """
        if not buffer_ptr:
            raise InvalidParams(f"{what}: buffer pointer cannot be null")
        if size < HEADER_SIZE:
            raise InvalidParams(f"{what}: {size} bytes are too small for tensor metadata")
        view = self.client.local_view(buffer_ptr, size, writable=False)
        return parse_header(view, size), view

    # ------------------------------------------------------------------------------
    # reads
    # ------------------------------------------------------------------------------

    def read(self, keys: Sequence[str]) -> list[tuple[Any, TensorHeader] | StoreError]:
        """Whole objects into fresh buffers, headers parsed and validated."""
        out: list[tuple[Any, TensorHeader] | StoreError] = []
        for key, res in zip(
            keys, self.client.get_many_alloc(keys, lambda _i, n: empty_bytes(n)), strict=True
        ):
            if isinstance(res, StoreError):
                out.append(res)
                continue
            try:
                out.append((res, parse_header(res)))
            except InvalidParams as exc:
                out.append(type(exc)(f"{key!r}: {exc}"))
        return out

    def get(self, key: str) -> Any:
        """The tensor stored under ``key``.

        Raises:
            StoreError: missing, unreadable; InvalidParams: not a tensor object.
        """
        (res,) = self.read([key])
        if isinstance(res, StoreError):
            raise res
        buf, header = res
        return to_tensor(buf, header)

    def tensor_at(self, buffer_ptr: int, length: int) -> Any:
        """A tensor over the object that was read to ``buffer_ptr`` (shares it).

        Raises:
            InvalidParams: not a valid tensor object.
        """
        view = view_at(buffer_ptr, length)
        return to_tensor(view, parse_header(view, length))

    def read_into(
        self, keys: Sequence[str], ptrs: Sequence[int], sizes: Sequence[int]
    ) -> list[int | StoreError]:
        """Whole objects into caller memory; results are byte counts."""
        return self.client.get_many_into(keys, [[(p, n)] for p, n in zip(ptrs, sizes, strict=True)])

    # ------------------------------------------------------------------------------
    # joins: read shard headers, then byte ranges of the shards
    # ------------------------------------------------------------------------------

    def manifest(self, key: str) -> ShardManifest | None:
        """The shard manifest under ``key``, or None if missing or invalid."""
        try:
            return parse_manifest(self.client.get(key))
        except MooncakeError:
            return None

    def header(self, key: str) -> tuple[Any, TensorHeader] | None:
        """A whole object and its header, or None if missing or not a tensor."""
        (res,) = self.read([key])
        return None if isinstance(res, StoreError) else res

    def sources(
        self, keys: Sequence[str], what: str
    ) -> tuple[list[JoinSource], dict[str, ObjectLocation]]:
        """Headers of the shards ``keys`` (one lookup, one 304-byte read each).

        Raises:
            StoreError: a shard is missing or unreadable.
            InvalidParams: a shard is not a tensor object.
        """
        locations: dict[str, ObjectLocation] = {}
        for key, loc in zip(keys, self.client.locate(keys), strict=True):
            if isinstance(loc, StoreError):
                raise type(loc)(f"{what}: shard {key!r} is missing: {loc}", code=loc.code)
            locations[key] = loc
        scratch = empty_bytes(max(len(keys), 1) * HEADER_SIZE)
        view = memoryview(scratch)
        ranges = [[(view[i * HEADER_SIZE : (i + 1) * HEADER_SIZE], 0)] for i in range(len(keys))]
        results = self.client.read_ranges([locations[k] for k in keys], ranges)
        out = []
        for i, (key, res) in enumerate(zip(keys, results, strict=True)):
            if isinstance(res[0], StoreError):
                raise type(res[0])(f"{what}: reading shard {key!r}: {res[0]}", code=res[0].code)
            try:
                out.append(
                    JoinSource(
                        key, parse_header_prefix(view[i * HEADER_SIZE : (i + 1) * HEADER_SIZE])
                    )
                )
            except InvalidParams as exc:
                raise InvalidParams(f"{what}: shard {key!r}: {exc}") from None
        return out, locations

    def run(self, plan: JoinPlan, locations: dict[str, ObjectLocation], dest: memoryview) -> None:
        """Fill ``dest`` (at least ``plan.total_bytes``) per ``plan``: the header
        first, then every fragment.  A read whose lease ran out is located again
        and retried once.

        Raises:
            StoreError: a fragment could not be read.
        """
        dest[:HEADER_SIZE] = plan.header.encode()
        by_key: dict[str, list[Fragment]] = {}
        for f in plan.fragments:
            by_key.setdefault(f.key, []).append(f)
        if not by_key:
            return
        keys = list(by_key)
        for attempt in range(2):
            locs = []
            for key in keys:
                loc = locations.get(key)
                if loc is None:
                    (found,) = self.client.locate([key])
                    if isinstance(found, StoreError):
                        raise found
                    loc = locations[key] = found
                locs.append(loc)
            ranges = [
                [(dest[f.dst_offset : f.dst_offset + f.size], f.src_offset) for f in by_key[k]]
                for k in keys
            ]
            retry = []
            for key, res in zip(keys, self.client.read_ranges(locs, ranges), strict=True):
                bad = next((r for r in res if isinstance(r, StoreError)), None)
                if bad is None:
                    continue
                if isinstance(bad, LeaseExpired) and attempt == 0:
                    locations.pop(key, None)
                    retry.append(key)
                    continue
                raise bad
            if not retry:
                return
            keys = retry
        raise store_error(int(ErrorCode.LEASE_EXPIRED), "join: read leases kept expiring")
