"""Bundles of ``mooncake.structured_object_store``: named payloads over any store.

A bundle is a JSON manifest plus payloads, each payload one Mooncake object
or, past ``chunk_bytes``, several (``<key>/chunk/<i>``).  Keys, the manifest
layout and the payload specs are the reference's, so bundles written by
either implementation read on the other::

    <prefix>/<partition>/<uuid>/manifest     {"version":1,"layout":"bundle","object_id":...,
                                               "meta":<spec>,"buffers":{name:<spec>}}
    <prefix>/<partition>/<uuid>/meta          metadata bytes (JSON for structured objects)
    <prefix>/<partition>/<uuid>/buffer/<name> a payload
    <spec> = {"key": k, "bytes": n, "chunks": [{"key": k_i, "bytes": n_i}, ...]}

The store is duck-typed (``put``/``get``/``remove`` at least).  The transport
uses what the store offers: a BufferPool plus ``batch_put_from`` to write
(one lease per chunk: copy in, put, release), ``batch_get_into`` /
``get_into`` / ``get_into_ranges`` into registered memory to read, and falls
back to ``put``/``get`` — the same choices as the reference, so a store that
works with one works with the other.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import io
import json
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal, Protocol, cast

import numpy as np

from ._sos_codecs import PartsPayload

_torch: Any
try:
    import torch as _torch
except ImportError:  # pragma: no cover - optional
    _torch = None

__all__ = [
    "AUTO_PARALLEL_MIN_BYTES",
    "AUTO_PARALLEL_MIN_CHUNKS",
    "DEFAULT_BUNDLE_CHUNK_BYTES",
    "MISSING_OBJECT_ERROR",
    "BundleManifestStore",
    "BundleStore",
    "BundleTransferPolicy",
    "DirectCopyPayload",
    "PayloadTransport",
    "RawDestination",
    "RemoteBundleRef",
    "TensorObjectBuffer",
    "TensorPayload",
]

DEFAULT_BUNDLE_CHUNK_BYTES = 64 * 1024**2
AUTO_PARALLEL_MIN_BYTES = DEFAULT_BUNDLE_CHUNK_BYTES
AUTO_PARALLEL_MIN_CHUNKS = 8
#: what ``remove`` returns for an object that is already gone (OBJECT_NOT_FOUND)
MISSING_OBJECT_ERROR = -704
#: what ``register_buffer`` returns for memory that is already registered
_DUPLICATE_REGISTRATION = -600

#: fields copied from a write config that cannot be ``copy.copy``-ed
_CONFIG_FIELDS = (
    "data_type",
    "group_ids",
    "nof_replica_num",
    "prefer_alloc_in_same_node",
    "preferred_nof_segments",
    "preferred_segment",
    "preferred_segments",
    "replica_num",
    "with_hard_pin",
    "with_soft_pin",
)


class BundleStore(Protocol):
    """What a bundle needs from a store, at least."""

    def put(self, key: str, value: Any, config: Any = None) -> int: ...

    def get(self, key: str) -> bytes: ...

    def remove(self, key: str, force: bool = False) -> int: ...


@dataclass(frozen=True)
class BundleTransferPolicy:
    """How payloads are written.

    ``max_inflight_put``: chunk groups written at once (``put_mode``
    ``parallel``, or ``auto`` for big payloads); ``copy_mode``: ``copy`` writes
    with ``put``, ``zero_copy`` insists on registered tensor-object buffers,
    ``auto`` uses a BufferPool when there is one.
    """

    max_inflight_put: int = 1
    put_mode: Literal["auto", "batch", "parallel"] = "auto"
    copy_mode: Literal["auto", "zero_copy", "copy"] = "auto"


@dataclass
class RemoteBundleRef:
    """A stored bundle: its manifest key and (when known) the manifest."""

    manifest_key: str
    manifest: dict[str, Any]


@dataclass(frozen=True)
class TensorPayload:
    """A torch tensor member (stored as a Mooncake tensor object)."""

    tensor: Any


@dataclass(frozen=True)
class TensorObjectBuffer:
    """Caller memory holding a whole tensor object (header + data): written
    with ``put_from``, or read into with ``get_tensor_into``."""

    ptr: int
    size: int
    owner: Any
    batch_size: int | None = None

    def __len__(self) -> int:
        if self.batch_size is None:
            raise TypeError("tensor object buffer requires batch_size for DataProto use")
        return self.batch_size


@dataclass(frozen=True)
class RawDestination:
    """Caller memory to read a member into (``pre_registered``: already
    registered with the store, so reads land there directly)."""

    ptr: int
    size: int
    owner: Any
    pre_registered: bool = False


@dataclass(frozen=True)
class DirectCopyPayload:
    """Flat arrays stored as one member, copied straight into pool leases."""

    arrays: list[np.ndarray]
    total_bytes: int
    dtype: str | None = None
    shape: tuple[int, ...] | None = None

    @property
    def nbytes(self) -> int:
        return self.total_bytes

    @staticmethod
    def from_flat_arrays(
        flat_arrays: list[np.ndarray], dtype: Any, total_elems: int
    ) -> DirectCopyPayload:
        return DirectCopyPayload(
            arrays=flat_arrays,
            total_bytes=sum(int(a.nbytes) for a in flat_arrays),
            dtype=np.dtype(dtype).str,
            shape=(int(total_elems),),
        )


# --------------------------------------------------------------------------------
# pool-backed results
# --------------------------------------------------------------------------------


class PoolLeaseOwner:
    """Releases a BufferPool lease once (explicitly or when collected)."""

    def __init__(self, lease: Any) -> None:
        self.lease = lease
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.lease.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass


class PoolBackedNdarray(np.ndarray):
    """An ndarray over a lease; views share the owner, which releases the lease
    when the last of them goes (or on ``release_result``)."""

    _mooncake_pool_owner: PoolLeaseOwner | None

    def __new__(
        cls, owner: PoolLeaseOwner, dtype: np.dtype[Any], shape: tuple[int, ...]
    ) -> PoolBackedNdarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = (ctypes.c_uint8 * nbytes).from_address(owner.lease.ptr)
        array = np.ctypeslib.as_array(raw).view(dtype).reshape(shape).view(cls)
        array._mooncake_pool_owner = owner
        return array

    def __array_finalize__(self, obj: Any) -> None:
        if obj is not None:
            self._mooncake_pool_owner = getattr(obj, "_mooncake_pool_owner", None)


# --------------------------------------------------------------------------------
# write configs (ReplicateConfig or any object with the same attributes)
# --------------------------------------------------------------------------------


def copy_write_config(config: Any) -> Any:
    """A copy of ``config`` (``copy.copy``, else a new one with the known fields).

    Raises:
        TypeError: neither copyable nor default-constructible.
    """
    try:
        return copy.copy(config)
    except TypeError:
        pass
    try:
        copied = type(config)()
    except Exception as exc:
        raise TypeError(
            "structured object store config must be copyable or default-constructible"
        ) from exc
    for name in _CONFIG_FIELDS:
        if not hasattr(config, name):
            continue
        try:
            value = getattr(config, name)
        except Exception:
            continue
        if isinstance(value, (list, tuple)):
            value = type(value)(value)
        try:
            setattr(copied, name, value)
        except Exception as exc:
            raise TypeError(
                f"structured object store config field {name!r} is not writable"
            ) from exc
    return copied


def config_for_grouped_keys(config: Any, key_count: int) -> Any:
    """``config`` with its one logical group id repeated once per physical key.

    Raises:
        ValueError: more than one group id.
    """
    if config is None or key_count <= 0:
        return config
    group_ids = getattr(config, "group_ids", None)
    if group_ids is None:
        return config
    as_string = isinstance(group_ids, str)
    ids = [group_ids] if as_string else list(group_ids)
    if not ids:
        ungrouped = copy_write_config(config)
        ungrouped.group_ids = None
        return ungrouped
    if len(ids) != 1:
        raise ValueError(
            "structured object store config.group_ids must contain exactly one logical group "
            "id; it is expanded across internal Mooncake keys"
        )
    if key_count == 1 and not as_string:
        return config
    grouped = copy_write_config(config)
    grouped.group_ids = [ids[0]] * key_count
    return grouped


def config_with_group_id(config: Any, group_id: str) -> Any:
    """A copy of ``config`` (or a new ReplicateConfig) in storage group ``group_id``.

    Raises:
        ValueError: ``config`` names another group.
    """
    configured = getattr(config_for_grouped_keys(config, 1), "group_ids", None)
    if configured and configured[0] and configured[0] != group_id:
        raise ValueError("config.group_ids conflicts with the DataProto storage group")
    if config is None:
        try:
            from .store import ReplicateConfig

            grouped: Any = ReplicateConfig()
        except ImportError:  # pragma: no cover - the store is part of the package
            grouped = SimpleNamespace()
    else:
        grouped = copy_write_config(config)
    grouped.group_ids = [group_id]
    return grouped


def call_write(fn: Callable[..., Any], *args: Any, config: Any = None) -> Any:
    """``fn(*args)``, passing ``config=`` only when there is one (plain stores
    may not take it)."""
    if config is None:
        return fn(*args)
    return fn(*args, config=config)


def check_status(status: Any, operation: str, key: str) -> None:
    """Raises:
    RuntimeError: ``status`` is neither None nor 0.
    """
    if status not in (None, 0):
        raise RuntimeError(f"{operation} failed for {key}: {status}")


def put_with_config(store: Any, key: str, value: Any, config: Any = None) -> Any:
    return call_write(store.put, key, value, config=config_for_grouped_keys(config, 1))


def put_from_with_config(store: Any, key: str, ptr: int, size: int, config: Any = None) -> Any:
    """``put_tensor_from`` (no config) or ``put_from``.

    Raises:
        RuntimeError: the store has neither.
    """
    config = config_for_grouped_keys(config, 1)
    put_tensor_from = getattr(store, "put_tensor_from", None)
    if config is None and callable(put_tensor_from):
        return put_tensor_from(key, ptr, size)
    put_from = getattr(store, "put_from", None)
    if callable(put_from):
        return call_write(put_from, key, ptr, size, config=config)
    raise RuntimeError("put_from is unavailable")


def batch_put_from_with_config(
    batch_put_from: Callable[..., Any],
    keys: Sequence[str],
    ptrs: Sequence[int],
    sizes: Sequence[int],
    config: Any = None,
) -> Any:
    return call_write(
        batch_put_from,
        list(keys),
        list(ptrs),
        list(sizes),
        config=config_for_grouped_keys(config, len(keys)),
    )


def cleanup_keys(store: Any, keys: Sequence[str], strict: bool) -> None:
    """Remove ``keys`` (forced; missing ones are fine): ``batch_remove`` first,
    then ``remove`` for whatever it left.

    Raises:
        RuntimeError: ``strict`` and some key could not be removed (or the
            store's error, when ``strict``).
    """
    pending = list(dict.fromkeys(keys))
    batch_remove = getattr(store, "batch_remove", None)
    if callable(batch_remove) and pending:
        try:
            try:
                results = batch_remove(pending, True)
            except TypeError:
                results = batch_remove(pending)
            if len(results) != len(pending):
                raise RuntimeError(
                    f"batch_remove returned {len(results)} results for {len(pending)} keys"
                )
            pending = [
                k
                for k, rc in zip(pending, results, strict=True)
                if rc not in (None, 0, MISSING_OBJECT_ERROR)
            ]
            if not pending:
                return
        except Exception:
            if strict:
                raise
    failed: list[tuple[str, Any]] = []
    for key in pending:
        try:
            rc = store.remove(key, True)
        except KeyError:
            continue
        except Exception:
            if strict:
                raise
            continue
        if rc not in (None, 0, MISSING_OBJECT_ERROR):
            failed.append((key, rc))
    if failed and strict:
        raise RuntimeError(f"failed to remove {len(failed)} Mooncake keys: {failed[:3]}")


# --------------------------------------------------------------------------------
# byte helpers
# --------------------------------------------------------------------------------


def bytes_view(value: Any, name: str) -> memoryview:
    """A flat byte view of ``value`` (copied only when not contiguous).

    Raises:
        TypeError: not bytes-like.
    """
    try:
        view = memoryview(value)
    except TypeError as exc:
        raise TypeError(f"{name} must be bytes-like, got {type(value).__name__}") from exc
    if not view.contiguous:
        view = memoryview(view.tobytes())
    return view.cast("B")


def buffer_ptr(value: bytearray | np.ndarray) -> int:
    if isinstance(value, np.ndarray):
        return int(value.ctypes.data)
    if not value:
        return 0
    return ctypes.addressof(ctypes.c_char.from_buffer(value))


def buffer_nbytes(value: bytearray | np.ndarray) -> int:
    return int(value.nbytes) if isinstance(value, np.ndarray) else len(value)


def split_view(view: memoryview, chunk_bytes: int) -> list[memoryview]:
    if len(view) == 0:
        return [view]
    return [view[i : i + chunk_bytes] for i in range(0, len(view), chunk_bytes)]


def split_parts(buffers: Sequence[memoryview], chunk_bytes: int) -> list[list[memoryview]]:
    """Parts regrouped into chunks of ``chunk_bytes`` (a part may straddle two)."""
    if len(buffers) == 1:
        return [[c] for c in split_view(buffers[0], chunk_bytes)]
    groups: list[list[memoryview]] = []
    current: list[memoryview] = []
    filled = 0
    for buf in buffers:
        pos = 0
        while pos < len(buf):
            piece = buf[pos : pos + chunk_bytes - filled]
            current.append(piece)
            filled += len(piece)
            pos += len(piece)
            if filled == chunk_bytes:
                groups.append(current)
                current, filled = [], 0
    if current:
        groups.append(current)
    return groups


def group_nbytes(buffers: Sequence[Any]) -> int:
    return sum(len(b) for b in buffers)


def _byte_view(array: np.ndarray) -> memoryview:
    """A writable flat byte view of a C-contiguous array."""
    return memoryview(cast(Any, array.reshape(-1).view(np.uint8))).cast("B")


def _copy_parts_to_lease(parts: Sequence[memoryview], lease: Any) -> None:
    copy_from = getattr(lease, "copy_from_buffers", None)
    if callable(copy_from):
        copy_from(parts)
        return
    view = lease.buffer
    try:
        dest = view.cast("B")
        pos = 0
        for part in parts:
            n = len(part)
            if n:
                dest[pos : pos + n] = part.cast("B")
                pos += n
    finally:
        view.release()


def chunk_offsets(chunks: Sequence[Mapping[str, Any]]) -> list[int]:
    offsets = [0]
    for chunk in chunks[:-1]:
        offsets.append(offsets[-1] + int(chunk["bytes"]))
    return offsets


def range_fragments(
    chunks: Sequence[Mapping[str, Any]], offset: int, length: int, dst_offset: int = 0
) -> list[tuple[str, int, int, int, int]]:
    """``(key, chunk size, destination offset, offset in chunk, size)`` of each
    chunk that bytes ``[offset, offset + length)`` of a payload touch."""
    out: list[tuple[str, int, int, int, int]] = []
    end = offset + length
    pos = 0
    for chunk in chunks:
        size = int(chunk["bytes"])
        lo, hi = max(offset, pos), min(end, pos + size)
        if lo < hi:
            out.append((chunk["key"], size, dst_offset + lo - offset, lo - pos, hi - lo))
        pos += size
    return out


def validate_chunk_bytes(chunk_bytes: int) -> int:
    """Raises:
    ValueError: not positive.
    """
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    return chunk_bytes


def normalize_key_prefix(key_prefix: str) -> str:
    """Raises:
    ValueError: empty (after stripping ``/``) or with control characters.
    """
    prefix = key_prefix.strip("/")
    if not prefix or any(ord(c) < 32 for c in prefix):
        raise ValueError("key_prefix must be a non-empty key prefix")
    return prefix


def validate_key_segment(value: Any, name: str) -> None:
    """Raises:
    ValueError: not a non-empty string without ``/`` and control characters.
    """
    if not isinstance(value, str) or not value or "/" in value or any(ord(c) < 32 for c in value):
        raise ValueError(f"invalid bundle {name}: {value!r}")


def encode_json(value: Mapping[str, Any], label: str) -> bytes:
    """Raises:
    TypeError: not JSON-serializable.
    """
    try:
        return json.dumps(value, separators=(",", ":")).encode("utf-8")
    except TypeError as exc:
        raise TypeError(f"{label} must be JSON-serializable") from exc


def decode_json(payload: bytes | bytearray | memoryview, label: str) -> dict[str, Any]:
    """Raises:
    ValueError: not a JSON object.
    """
    value = json.loads(bytes(payload).decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"{label} must decode to a dict")
    return value


# --------------------------------------------------------------------------------
# tensors as Mooncake tensor objects (the MOON header) or torch.save bytes
# --------------------------------------------------------------------------------


def tensor_helpers_available() -> bool:
    return _torch is not None


def tensor_metadata_size() -> int:
    from ._store_tensor import tensor_metadata_size as size

    return size()


def tensor_parts(tensor: Any) -> tuple[bytes, int, int, Any]:
    """(header, data address, data bytes, owner) of a tensor object."""
    from ._store_tensor import serialize_tensor

    header, ptr, nbytes, owner = serialize_tensor(tensor)
    return bytes(header), int(ptr), int(nbytes), owner


def tensor_object_bytes(tensor: Any) -> tuple[bytes, int]:
    """The whole tensor object and its header size."""
    header, ptr, nbytes, _owner = tensor_parts(tensor)
    if nbytes == 0:
        return header, len(header)
    return header + ctypes.string_at(ptr, nbytes), len(header)


def tensor_from_object(payload: bytes | bytearray | memoryview) -> Any:
    from ._store_tensor import deserialize_tensor

    return deserialize_tensor(bytes(payload))


def torch_save_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    _torch.save(value, buffer)
    return buffer.getvalue()


def torch_load_bytes(payload: bytes | bytearray | memoryview) -> Any:
    return _torch.load(io.BytesIO(bytes(payload)), weights_only=True)


def slice_tensor_header(header: bytes, shape: Sequence[int], data_bytes: int) -> bytes:
    """A tensor object header re-pointed at a row range (same dtype and ndim)."""
    from pymooncake.store._tensor import parse_header_prefix

    parsed = parse_header_prefix(header)
    dims = tuple(int(d) for d in shape)
    return dataclasses.replace(
        parsed, global_shape=dims, local_shape=dims, data_bytes=int(data_bytes)
    ).encode()


# --------------------------------------------------------------------------------
# transport
# --------------------------------------------------------------------------------


class PayloadTransport:
    """Moves payload bytes through a store, fast paths first."""

    def __init__(self, store: Any, buffer_pool: Any = None) -> None:
        self._store = store
        self._buffer_pool = buffer_pool
        self._batch_put_from = getattr(store, "batch_put_from", None)
        self._put_tensor_from = getattr(store, "put_tensor_from", None)
        self._batch_get_into = getattr(store, "batch_get_into", None)
        self._get_into = getattr(store, "get_into", None)
        self._get_into_ranges = getattr(store, "get_into_ranges", None)
        self._register_buffer = getattr(store, "register_buffer", None)
        self._unregister_buffer = getattr(store, "unregister_buffer", None)

    # ---- pool

    def _ensure_buffer_pool(self) -> Any:
        """The BufferPool given, else one made for a set-up MooncakeDistributedStore."""
        if self._buffer_pool is not None:
            return self._buffer_pool
        capsule = getattr(self._store, "_get_pyclient_capsule", None)
        if not callable(capsule):
            return None
        try:
            if capsule() is None:
                return None
            from .store import BufferPool

            self._buffer_pool = BufferPool(self._store)
        except (ImportError, AttributeError, RuntimeError, TypeError):
            return None
        return self._buffer_pool

    def _has_registration(self) -> bool:
        return callable(self._register_buffer) and callable(self._unregister_buffer)

    # ---- writes

    def put_chunks(
        self,
        keys: Sequence[str],
        groups: Sequence[Sequence[memoryview]],
        policy: BundleTransferPolicy,
        config: Any = None,
    ) -> list[str]:
        """Write chunk ``keys[i]`` = the parts of ``groups[i]`` joined.

        Raises:
            RuntimeError: a write failed (what was written is removed) or
                ``zero_copy`` was asked of plain bytes.
        """
        if policy.copy_mode == "zero_copy":
            raise RuntimeError("zero-copy put requires tensor-object buffers")
        if policy.copy_mode == "copy" or self._ensure_buffer_pool() is None:
            return self._put_chunks_direct(keys, groups, config)
        if all(len(g) == 1 for g in groups):
            self.batch_put_buffer_groups_from(keys, groups, config)
            return list(keys)
        if not callable(self._batch_put_from):
            return self._put_chunks_direct(keys, groups, config)
        if self._resolve_buffer_group_put_mode(groups, policy) == "batch":
            self.batch_put_buffer_groups_from(keys, groups, config)
            return list(keys)
        return self._put_groups_parallel(list(keys), list(groups), policy.max_inflight_put, config)

    def _put_chunks_direct(
        self, keys: Sequence[str], groups: Sequence[Sequence[memoryview]], config: Any
    ) -> list[str]:
        written: list[str] = []
        try:
            for key, group in zip(keys, groups, strict=True):
                chunk = group[0] if len(group) == 1 else memoryview(b"".join(group))
                check_status(put_with_config(self._store, key, chunk, config), "put", key)
                written.append(key)
        except Exception:
            cleanup_keys(self._store, written, strict=False)
            raise
        return list(keys)

    def batch_put_buffer_groups_from(
        self, keys: Sequence[str], groups: Sequence[Sequence[memoryview]], config: Any = None
    ) -> None:
        """One lease per chunk: copy the parts in, ``batch_put_from``, release
        (pool pressure stays one chunk).

        Raises:
            RuntimeError: no ``batch_put_from`` or a write failed (all ``keys``
                are then removed).
        """
        batch_put_from = self._batch_put_from
        if not callable(batch_put_from):
            raise RuntimeError("batch_put_from is unavailable")
        pool = self._buffer_pool
        for key, group in zip(keys, groups, strict=True):
            size = group_nbytes(group)
            lease = pool.acquire(size)
            try:
                _copy_parts_to_lease(group, lease)
                results = batch_put_from_with_config(
                    batch_put_from, [key], [lease.ptr], [size], config
                )
                self._check_batch_results(results, [key], "batch_put_from")
            except Exception:
                cleanup_keys(self._store, keys, strict=False)
                raise
            finally:
                lease.release()

    @staticmethod
    def _check_batch_results(results: Sequence[Any], keys: Sequence[str], operation: str) -> None:
        if len(results) != len(keys):
            raise RuntimeError(
                f"{operation} returned {len(results)} results for {len(keys)} chunks"
            )
        for key, rc in zip(keys, results, strict=True):
            check_status(rc, operation, key)

    def _resolve_buffer_group_put_mode(
        self, groups: Sequence[Sequence[Any]], policy: BundleTransferPolicy
    ) -> Literal["batch", "parallel"]:
        """``auto`` goes parallel only for many (>= 8) and big (>= 64 MiB) chunks."""
        if policy.put_mode in ("batch", "parallel"):
            return policy.put_mode
        if policy.max_inflight_put <= 1 or len(groups) < AUTO_PARALLEL_MIN_CHUNKS:
            return "batch"
        if sum(group_nbytes(g) for g in groups) < AUTO_PARALLEL_MIN_BYTES:
            return "batch"
        return "parallel"

    def _put_groups_parallel(
        self,
        keys: list[str],
        groups: list[Sequence[memoryview]],
        max_inflight: int,
        config: Any,
    ) -> list[str]:
        count = max(1, min(max_inflight, len(groups)))
        step = (len(groups) + count - 1) // count
        spans = [(keys[i : i + step], groups[i : i + step]) for i in range(0, len(groups), step)]
        futures: list[Future[None]] = []
        try:
            with ThreadPoolExecutor(max_workers=len(spans)) as pool:
                futures = [
                    pool.submit(self.batch_put_buffer_groups_from, k, g, config) for k, g in spans
                ]
                for future in as_completed(futures):
                    future.result()
        except Exception:
            cleanup_keys(self._store, keys, strict=False)
            raise
        return keys

    def put_tensor_object_buffer(self, key: str, value: TensorObjectBuffer, config: Any) -> int:
        """Raises:
        RuntimeError: no ``put_from`` or the write failed.
        """
        check_status(
            put_from_with_config(self._store, key, value.ptr, value.size, config), "put_from", key
        )
        return value.size

    def put_tensor_direct(
        self, key: str, value: TensorPayload, config: Any
    ) -> dict[str, Any] | None:
        """``put_tensor`` (``pub_tensor`` with a config); None when the store
        has neither."""
        put_tensor = getattr(self._store, "put_tensor" if config is None else "pub_tensor", None)
        if not callable(put_tensor):
            return None
        tensor = value.tensor
        header = tensor_metadata_size()
        total = header + int(getattr(tensor, "nbytes", 0))
        check_status(
            call_write(put_tensor, key, tensor, config=config_for_grouped_keys(config, 1)),
            "put_tensor",
            key,
        )
        return {
            "key": key,
            "kind": "tensor",
            "bytes": total,
            "dtype": str(getattr(tensor, "dtype", "")),
            "shape": list(getattr(tensor, "shape", ())),
            "chunks": [{"key": key, "bytes": total}],
            "metadata_bytes": header,
        }

    def put_tensor_from_pool(self, key: str, value: TensorPayload, config: Any) -> int:
        """Header + data copied into a lease and written with ``put_from``.

        Raises:
            RuntimeError: no BufferPool, no ``put_from``, or the write failed.
        """
        if self._buffer_pool is None:
            raise RuntimeError("structured tensor zero-copy requires a BufferPool")
        if not callable(self._put_tensor_from) and not callable(
            getattr(self._store, "put_from", None)
        ):
            raise RuntimeError("put_from is unavailable")
        header, ptr, nbytes, owner = tensor_parts(value.tensor)
        total = len(header) + nbytes
        lease = self._buffer_pool.acquire(total)
        try:
            view = lease.buffer
            try:
                view[: len(header)] = header
            finally:
                view.release()
            if nbytes:
                ctypes.memmove(lease.ptr + len(header), ptr, nbytes)
            check_status(
                put_from_with_config(self._store, key, lease.ptr, total, config), "put_from", key
            )
            del owner
            return total
        finally:
            lease.release()

    # ---- registration

    @contextmanager
    def _registered(
        self, dest: bytearray | np.ndarray, label: str, pre_registered: bool = False
    ) -> Iterator[int]:
        """The address of ``dest``, registered with the store for the block
        (memory already registered, -600, is used as is)."""
        ptr = buffer_ptr(dest)
        size = buffer_nbytes(dest)
        if pre_registered or size == 0:
            yield ptr
            return
        assert self._register_buffer is not None and self._unregister_buffer is not None
        rc = self._register_buffer(ptr, size)
        if rc == _DUPLICATE_REGISTRATION:
            yield ptr
            return
        check_status(rc, "register_buffer", label)
        ok = False
        try:
            yield ptr
            ok = True
        finally:
            try:
                check_status(self._unregister_buffer(ptr), "unregister_buffer", label)
            except Exception:
                if ok:
                    raise

    # ---- reads

    def read_payload(self, spec: Mapping[str, Any]) -> bytes:
        size = int(spec["bytes"])
        if size == 0:
            return b""
        data = bytearray(size)
        self.read_payload_into(spec, data)
        return bytes(data)

    def read_payload_into(self, spec: Mapping[str, Any], dest: bytearray | np.ndarray) -> None:
        """Every chunk into ``dest``: one ``batch_get_into`` (registered), else ``get``."""
        chunks = spec["chunks"]
        offsets = chunk_offsets(chunks)
        if callable(self._batch_get_into) and self._has_registration():
            with self._registered(dest, "bundle payload") as base:
                keys = [c["key"] for c in chunks]
                sizes = [int(c["bytes"]) for c in chunks]
                got = self._batch_get_into(keys, [base + o for o in offsets], sizes)
                if len(got) != len(keys):
                    raise RuntimeError(
                        f"batch_get_into returned {len(got)} results for {len(keys)} chunks"
                    )
                for key, want, n in zip(keys, sizes, got, strict=True):
                    if n != want:
                        raise RuntimeError(
                            f"batch_get_into failed for {key}: expected {want}, got {n}"
                        )
            return
        for offset, chunk in zip(offsets, chunks, strict=True):
            size = int(chunk["bytes"])
            if size:
                dest[offset : offset + size] = self._get_chunk(chunk["key"], size)

    def _get_chunk(self, key: str, size: int) -> bytes:
        data = self._store.get(key)
        if len(data) != size:
            raise RuntimeError(f"get failed for {key}: expected {size} bytes, got {len(data)}")
        return bytes(data)

    def read_tensor(self, spec: Mapping[str, Any]) -> Any:
        """Raises:
        RuntimeError: the store has no ``get_tensor``.
        """
        get_tensor = getattr(self._store, "get_tensor", None)
        if not callable(get_tensor):
            raise RuntimeError("structured tensor payload does not support get_tensor")
        return get_tensor(spec["key"])

    def read_tensor_into(
        self, spec: Mapping[str, Any], dest: TensorObjectBuffer | RawDestination
    ) -> Any:
        """The tensor object into ``dest``; ``get_tensor_into``'s result for a
        ``kind: tensor`` payload, else None.

        Raises:
            ValueError: ``dest`` too small.
            RuntimeError: a read failed.
        """
        if spec.get("kind") == "tensor":
            get_tensor_into = getattr(self._store, "get_tensor_into", None)
            if not callable(get_tensor_into):
                raise RuntimeError("structured tensor payload does not support get_tensor_into")
            return get_tensor_into(spec["key"], dest.ptr, dest.size)
        size = int(spec["bytes"])
        if dest.size < size:
            raise ValueError(f"tensor destination has {dest.size} bytes, expected at least {size}")
        chunks = spec["chunks"]
        if not self._read_range_raw(chunks, dest.ptr, 0, size, allow_get_into=False):
            pos = 0
            for chunk in chunks:
                n = int(chunk["bytes"])
                ctypes.memmove(dest.ptr + pos, self._get_chunk(chunk["key"], n), n)
                pos += n
        return None

    def read_payload_range(self, spec: Mapping[str, Any], offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        data = bytearray(length)
        if not self._read_range_registered(spec["chunks"], data, offset, length, False):
            self._copy_range(spec["chunks"], data, offset, length)
        return bytes(data)

    def read_payload_range_into_destination(
        self,
        spec: Mapping[str, Any],
        dest: np.ndarray,
        offset: int,
        destination_pre_registered: bool = False,
    ) -> None:
        length = buffer_nbytes(dest)
        if not self._read_range_registered(
            spec["chunks"], dest, offset, length, destination_pre_registered
        ):
            data = bytearray(length)
            self._copy_range(spec["chunks"], data, offset, length)
            dest[:length] = np.frombuffer(data, dtype=np.uint8)

    def read_payload_range_into_raw_destination(
        self, spec: Mapping[str, Any], ptr: int, dst_offset: int, offset: int, length: int
    ) -> bool:
        if length == 0:
            return True
        return self._read_range_raw(
            spec["chunks"], ptr, offset, length, allow_get_into=False, dst_offset=dst_offset
        )

    def read_payload_ranges_into(
        self,
        spec: Mapping[str, Any],
        dest: bytearray | np.ndarray,
        ranges: Sequence[tuple[int, int, int]],
    ) -> None:
        """``(source offset, destination offset, size)`` ranges into ``dest``."""
        chunks = spec["chunks"]
        if self._has_registration():
            with self._registered(dest, "structured ranged payload") as base:
                if self._read_ranges_raw(chunks, base, ranges):
                    return
        target = memoryview(dest).cast("B") if isinstance(dest, bytearray) else _byte_view(dest)
        for src, dst, size in ranges:
            for key, csize, d, s, n in range_fragments(chunks, src, size, dst):
                target[d : d + n] = self._get_chunk(key, csize)[s : s + n]

    def read_payload_ranges_into_raw_destination(
        self, spec: Mapping[str, Any], ptr: int, ranges: Sequence[tuple[int, int, int]]
    ) -> bool:
        return self._read_ranges_raw(spec["chunks"], ptr, ranges)

    def read_payload_range_into_pool_array(
        self,
        spec: Mapping[str, Any],
        dtype: np.dtype[Any],
        shape: tuple[int, ...],
        offset: int,
    ) -> np.ndarray | None:
        """The range as an ndarray in a pool lease (pool memory is registered,
        so the read lands there directly); None without a pool or ranged reads."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes == 0:
            return np.empty(shape, dtype=dtype)
        pool = self._ensure_buffer_pool()
        if pool is None:
            return None
        try:
            lease = pool.acquire(nbytes)
        except RuntimeError:
            return None
        owner = PoolLeaseOwner(lease)
        try:
            if not self._read_range_raw(spec["chunks"], lease.ptr, offset, nbytes, False):
                owner.release()
                return None
            return PoolBackedNdarray(owner, dtype, shape)
        except Exception:
            owner.release()
            raise

    def _read_range_registered(
        self,
        chunks: Sequence[Mapping[str, Any]],
        dest: bytearray | np.ndarray,
        offset: int,
        length: int,
        pre_registered: bool,
    ) -> bool:
        if not self._has_registration():
            return False
        with self._registered(dest, "structured ndarray payload", pre_registered) as base:
            return self._read_range_raw(chunks, base, offset, length)

    def _read_range_raw(
        self,
        chunks: Sequence[Mapping[str, Any]],
        base: int,
        offset: int,
        length: int,
        allow_get_into: bool = True,
        dst_offset: int = 0,
    ) -> bool:
        """Bytes ``[offset, offset + length)`` to ``base + dst_offset``: one
        ``get_into`` for a whole single-chunk payload, else ``get_into_ranges``;
        False when the store has neither."""
        if (
            allow_get_into
            and len(chunks) == 1
            and offset == 0
            and callable(self._get_into)
            and int(chunks[0]["bytes"]) == length
        ):
            key = chunks[0]["key"]
            n = self._get_into(key, base + dst_offset, length)
            if n != length:
                raise RuntimeError(f"get_into failed for {key}: expected {length}, got {n}")
            return True
        return self._read_ranges_raw(chunks, base, [(offset, dst_offset, length)])

    def _read_ranges_raw(
        self,
        chunks: Sequence[Mapping[str, Any]],
        base: int,
        ranges: Sequence[tuple[int, int, int]],
    ) -> bool:
        get_into_ranges = self._get_into_ranges
        if not callable(get_into_ranges):
            return False
        fragments = [f for src, dst, n in ranges for f in range_fragments(chunks, src, n, dst)]
        if not fragments:
            return True
        keys = [f[0] for f in fragments]
        sizes = [[f[4]] for f in fragments]
        results = get_into_ranges(
            [base], [keys], [[[f[2]] for f in fragments]], [[[f[3]] for f in fragments]], [sizes]
        )
        if len(results) != 1 or len(results[0]) != len(keys):
            raise RuntimeError(
                f"get_into_ranges returned invalid ranged result shape for {len(keys)} chunks"
            )
        for key, want, got in zip(keys, sizes, results[0], strict=True):
            if len(got) != len(want):
                raise RuntimeError(
                    f"get_into_ranges returned invalid ranged fragment count for {key}"
                )
            for w, g in zip(want, got, strict=True):
                if g != w:
                    raise RuntimeError(f"get_into_ranges failed for {key}: expected {w}, got {g}")
        return True

    def _copy_range(
        self, chunks: Sequence[Mapping[str, Any]], dest: bytearray, offset: int, length: int
    ) -> None:
        for key, csize, d, s, n in range_fragments(chunks, offset, length):
            dest[d : d + n] = self._get_chunk(key, csize)[s : s + n]


# --------------------------------------------------------------------------------
# manifests
# --------------------------------------------------------------------------------


class BundleManifestStore:
    """Writes, validates, reads and removes bundles under one key prefix."""

    def __init__(
        self,
        store: Any,
        transport: PayloadTransport,
        key_prefix: str,
        default_chunk_bytes: int,
        tensor_codec: Callable[[], bool] = tensor_helpers_available,
    ) -> None:
        self._store = store
        self._transport = transport
        self._key_prefix = key_prefix
        self._default_chunk_bytes = default_chunk_bytes
        self._tensor_codec = tensor_codec

    # ---- writes

    def _policy(
        self, policy: BundleTransferPolicy | None, max_inflight_put: int | None = None
    ) -> BundleTransferPolicy:
        """Raises:
        ValueError: a bad field.
        """
        result = policy or BundleTransferPolicy()
        if max_inflight_put is not None:
            result = dataclasses.replace(result, max_inflight_put=max_inflight_put)
        if result.max_inflight_put < 1:
            raise ValueError("max_inflight_put must be positive")
        if result.put_mode not in {"auto", "batch", "parallel"}:
            raise ValueError(f"unsupported put_mode: {result.put_mode}")
        if result.copy_mode not in {"auto", "zero_copy", "copy"}:
            raise ValueError(f"unsupported copy_mode: {result.copy_mode}")
        return result

    def _new_object(self, partition: str) -> tuple[str, str]:
        validate_key_segment(partition, "partition")
        object_id = f"{partition}/{uuid.uuid4().hex}"
        return object_id, f"{self._key_prefix}/{object_id}"

    def _chunk_bytes(self, chunk_bytes: int | None) -> int:
        return validate_chunk_bytes(
            self._default_chunk_bytes if chunk_bytes is None else chunk_bytes
        )

    def put_bundle(
        self,
        meta: bytes | bytearray | memoryview,
        buffers: Mapping[str, Any],
        partition: str,
        chunk_bytes: int | None,
        policy: BundleTransferPolicy | None,
        max_inflight_put: int | None,
        config: Any = None,
    ) -> RemoteBundleRef:
        """Metadata bytes plus named payloads, then the manifest (written last,
        so a bundle is visible only once complete; a failure removes what was
        written).

        Raises:
            ValueError: a bad partition/name/policy/chunk size.
            TypeError: a payload that is not bytes-like.
            RuntimeError: a write failed.
        """
        meta_view = bytes_view(meta, "meta")
        chunk = self._chunk_bytes(chunk_bytes)
        pol = self._policy(policy, max_inflight_put)
        object_id, base = self._new_object(partition)
        manifest_key = f"{base}/manifest"
        written: list[str] = []
        try:
            meta_spec, keys = self._put_payload(
                f"{base}/meta", meta_view, chunk, _copy(pol), config
            )
            written += keys
            specs: dict[str, Any] = {}
            for name, value in buffers.items():
                validate_key_segment(name, "buffer name")
                key = f"{base}/buffer/{name}"
                if isinstance(value, (TensorPayload, TensorObjectBuffer)):
                    spec, keys = self._put_tensor_payload(key, value, pol, config)
                elif isinstance(value, PartsPayload):
                    spec, keys = self._put_multi_buffer_payload(key, value, chunk, pol, config)
                elif isinstance(value, DirectCopyPayload):
                    spec, keys = self._put_direct_copy_payload(key, value, chunk, pol, config)
                else:
                    spec, keys = self._put_payload(key, bytes_view(value, name), chunk, pol, config)
                specs[name] = spec
                written += keys
            manifest = {
                "version": 1,
                "layout": "bundle",
                "object_id": object_id,
                "meta": meta_spec,
                "buffers": specs,
            }
            self._write_manifest(manifest_key, manifest, config)
            written.append(manifest_key)
        except Exception:
            cleanup_keys(self._store, written, strict=False)
            raise
        return RemoteBundleRef(manifest_key=manifest_key, manifest=manifest)

    def put_bundle_manifest(
        self,
        meta: bytes | bytearray | memoryview,
        buffers: Mapping[str, Any],
        *,
        partition: str,
        chunk_bytes: int | None,
        policy: BundleTransferPolicy | None,
        cleanup_keys: Sequence[str] | None = None,
        config: Any = None,
    ) -> RemoteBundleRef:
        """A new bundle over payloads already stored (by other bundles):
        new metadata, the given payload specs, and the keys to remove with it.

        Raises:
            ValueError: specs or cleanup keys outside this prefix.
        """
        meta_view = bytes_view(meta, "meta")
        chunk = self._chunk_bytes(chunk_bytes)
        pol = self._policy(policy)
        object_id, base = self._new_object(partition)
        manifest_key = f"{base}/manifest"
        written: list[str] = []
        try:
            meta_spec, keys = self._put_payload(
                f"{base}/meta", meta_view, chunk, _copy(pol), config
            )
            written += keys
            extra = list(dict.fromkeys(cleanup_keys or []))
            owners = {self._object_id_from_bundle_key(str(s["key"])) for s in buffers.values()}
            owners.update(self._object_id_from_bundle_key(k) for k in extra)
            manifest: dict[str, Any] = {
                "version": 1,
                "layout": "bundle",
                "object_id": object_id,
                "meta": meta_spec,
                "buffers": dict(buffers),
                "buffer_object_ids": sorted(o for o in owners if o),
            }
            if extra:
                manifest["cleanup_keys"] = extra
            self._validate_manifest(manifest)
            self._write_manifest(manifest_key, manifest, config)
            written.append(manifest_key)
        except Exception:
            cleanup_keys_fn(self._store, written, strict=False)
            raise
        return RemoteBundleRef(manifest_key=manifest_key, manifest=manifest)

    def _write_manifest(self, key: str, manifest: Mapping[str, Any], config: Any) -> None:
        blob = encode_json(manifest, "bundle manifest")
        check_status(put_with_config(self._store, key, blob, config), "put", key)

    def _put_payload(
        self,
        key: str,
        view: memoryview,
        chunk_bytes: int,
        policy: BundleTransferPolicy,
        config: Any = None,
    ) -> tuple[dict[str, Any], list[str]]:
        if len(view) == 0:
            return {"key": key, "bytes": 0, "chunks": []}, []
        chunks = split_view(view, chunk_bytes)
        keys = _chunk_keys(key, len(chunks))
        self._transport.put_chunks(keys, [[c] for c in chunks], policy, config)
        return _spec(key, keys, [len(c) for c in chunks]), keys

    def _put_multi_buffer_payload(
        self,
        key: str,
        value: PartsPayload,
        chunk_bytes: int,
        policy: BundleTransferPolicy,
        config: Any = None,
    ) -> tuple[dict[str, Any], list[str]]:
        if value.nbytes == 0:
            return {"key": key, "bytes": 0, "chunks": []}, []
        if len(value.buffers) == 1:
            return self._put_payload(key, value.buffers[0], chunk_bytes, policy, config)
        groups = split_parts(value.buffers, chunk_bytes)
        keys = _chunk_keys(key, len(groups))
        self._transport.put_chunks(keys, groups, policy, config)
        return _spec(key, keys, [group_nbytes(g) for g in groups]), keys

    def _put_direct_copy_payload(
        self,
        key: str,
        value: DirectCopyPayload,
        chunk_bytes: int,
        transfer_policy: BundleTransferPolicy,
        config: Any = None,
    ) -> tuple[dict[str, Any], list[str]]:
        """Arrays packed straight into pool leases, a chunk (of whole arrays)
        per lease; joined and written as bytes without a pool or
        ``batch_put_from``, or when one array is bigger than a chunk.

        Raises:
            RuntimeError: ``zero_copy``, or a write failed (all chunks removed).
        """
        if transfer_policy.copy_mode == "zero_copy":
            raise RuntimeError("zero-copy put requires tensor-object buffers")
        if value.total_bytes == 0:
            return {"key": key, "bytes": 0, "chunks": []}, []
        arrays = value.arrays
        pool = self._transport._ensure_buffer_pool()
        batch_put_from = self._transport._batch_put_from
        spans: list[tuple[int, int, int]] = []  # (first array, count, bytes)
        if len(arrays) > 1 and pool is not None and callable(batch_put_from):
            first = filled = 0
            for i, array in enumerate(arrays):
                if array.nbytes > chunk_bytes:
                    spans = []
                    break
                if filled and filled + array.nbytes > chunk_bytes:
                    spans.append((first, i - first, filled))
                    first, filled = i, 0
                filled += int(array.nbytes)
            else:
                spans.append((first, len(arrays) - first, filled))
        if not spans:
            flat = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays]
            joined = flat[0] if len(flat) == 1 else np.concatenate(flat)
            return self._put_payload(
                key, memoryview(cast(Any, joined)).cast("B"), chunk_bytes, transfer_policy, config
            )
        keys = _chunk_keys(key, len(spans))

        def put_spans(span_keys: Sequence[str], span_list: Sequence[tuple[int, int, int]]) -> None:
            assert batch_put_from is not None
            for span_key, (start, count, size) in zip(span_keys, span_list, strict=True):
                lease = pool.acquire(size)
                try:
                    copied = _concat_arrays_into(arrays, lease.ptr, size, start, count)
                    if copied != size:
                        raise RuntimeError(f"fast-copy wrote {copied} bytes, expected {size}")
                    results = batch_put_from_with_config(
                        batch_put_from, [span_key], [lease.ptr], [size], config
                    )
                    PayloadTransport._check_batch_results(results, [span_key], "batch_put_from")
                finally:
                    lease.release()

        parallel = (
            transfer_policy.put_mode != "batch"
            and transfer_policy.max_inflight_put > 1
            and len(spans) >= AUTO_PARALLEL_MIN_CHUNKS
            and value.total_bytes >= AUTO_PARALLEL_MIN_BYTES
        )
        try:
            if not parallel:
                put_spans(keys, spans)
            else:
                count = min(transfer_policy.max_inflight_put, len(spans))
                step = (len(spans) + count - 1) // count
                with ThreadPoolExecutor(max_workers=count) as executor:
                    futures = [
                        executor.submit(put_spans, keys[i : i + step], spans[i : i + step])
                        for i in range(0, len(spans), step)
                    ]
                    for future in as_completed(futures):
                        future.result()
        except Exception:
            cleanup_keys(self._store, keys, strict=False)
            raise
        return _spec(key, keys, [s[2] for s in spans]), keys

    def _put_tensor_payload(
        self,
        key: str,
        value: TensorPayload | TensorObjectBuffer,
        policy: BundleTransferPolicy,
        config: Any = None,
    ) -> tuple[dict[str, Any], list[str]]:
        """A tensor member: a caller's tensor-object buffer (``put_from``),
        else ``put_tensor``/``pub_tensor``, else a pool lease + ``put_from``,
        else the tensor object (or torch.save bytes for 0-d) written as bytes.

        Raises:
            ValueError: ``zero_copy`` with a plain tensor.
        """
        if isinstance(value, TensorObjectBuffer):
            size = self._transport.put_tensor_object_buffer(key, value, config)
            return _spec(key, [key], [size]), [key]
        if policy.copy_mode != "copy":
            if policy.copy_mode == "zero_copy":
                raise ValueError(
                    "zero-copy structured tensor fields require a BufferPool tensor-object buffer"
                )
            spec = self._transport.put_tensor_direct(key, value, config)
            if spec is not None:
                return spec, [key]
            try:
                size = self._transport.put_tensor_from_pool(key, value, config)
                return _spec(key, [key], [size]), [key]
            except RuntimeError:
                pass
        if not self._tensor_codec() or value.tensor.dim() == 0:
            blob = torch_save_bytes(value.tensor)
            spec, keys = self._put_payload(key, memoryview(blob), len(blob) or 1, policy, config)
            spec["format"] = "torch_save"
            return spec, keys
        blob, header = tensor_object_bytes(value.tensor)
        spec, keys = self._put_payload(key, memoryview(blob), len(blob) or 1, policy, config)
        spec["metadata_bytes"] = header
        return spec, keys

    # ---- manifests

    def resolve_manifest(self, ref: RemoteBundleRef | Mapping[str, Any]) -> dict[str, Any]:
        """The (validated) manifest of ``ref``, read from the store when the
        ref carries none.

        Raises:
            ValueError: no manifest key, or a manifest that fails validation.
        """
        manifest: Any
        if isinstance(ref, RemoteBundleRef):
            manifest = ref.manifest or decode_json(
                self._store.get(ref.manifest_key), "bundle manifest"
            )
        else:
            manifest = ref.get("manifest")
            if manifest is None:
                key = ref.get("manifest_key")
                if not isinstance(key, str):
                    raise ValueError("bundle ref must include manifest_key")
                manifest = decode_json(self._store.get(key), "bundle manifest")
        self._validate_manifest(manifest)
        return dict(manifest)

    def manifest_key(self, ref: RemoteBundleRef | Mapping[str, Any]) -> str:
        return self._manifest_key(ref, self.resolve_manifest(ref))

    def _manifest_key(
        self, ref: RemoteBundleRef | Mapping[str, Any], manifest: Mapping[str, Any]
    ) -> str:
        expected = f"{self._key_prefix}/{manifest['object_id']}/manifest"
        key = ref.manifest_key if isinstance(ref, RemoteBundleRef) else ref.get("manifest_key")
        if key is None:
            return expected
        if key != expected:
            raise ValueError("bundle manifest_key does not match manifest object_id")
        return str(key)

    @staticmethod
    def payload_keys(spec: Mapping[str, Any]) -> list[str]:
        return [c["key"] for c in spec["chunks"]]

    def _payload_keys(self, manifest: Mapping[str, Any]) -> list[str]:
        specs = [manifest["meta"], *manifest["buffers"].values()]
        return [c["key"] for s in specs for c in s["chunks"]]

    def remove_bundle(self, ref: RemoteBundleRef | Mapping[str, Any]) -> None:
        """Every payload, the cleanup keys and the manifest.

        Raises:
            RuntimeError: a key could not be removed.
        """
        manifest = self.resolve_manifest(ref)
        keys = self._payload_keys(manifest)
        keys += manifest.get("cleanup_keys", [])
        keys.append(self._manifest_key(ref, manifest))
        cleanup_keys(self._store, keys, strict=True)

    def remove_keys(self, keys: Sequence[str], *, strict: bool) -> None:
        cleanup_keys(self._store, keys, strict=strict)

    def _object_id_from_bundle_key(self, key: str) -> str | None:
        prefix = f"{self._key_prefix}/"
        if not key.startswith(prefix):
            return None
        rest = key[len(prefix) :]
        for suffix in ("/manifest", "/meta"):
            if rest.endswith(suffix):
                return rest[: -len(suffix)]
        for marker in ("/meta/", "/buffer/"):
            at = rest.find(marker)
            if at > 0:
                return rest[:at]
        return None

    def _validate_manifest(self, manifest: Mapping[str, Any]) -> None:
        """A manifest may only name keys of its own bundle or of the bundles
        it lists in ``buffer_object_ids`` (so a tampered manifest cannot make
        ``remove_bundle`` delete foreign keys).

        Raises:
            ValueError: anything out of place.
        """
        if not isinstance(manifest, Mapping):
            raise ValueError("invalid bundle manifest")
        if manifest.get("version") != 1 or manifest.get("layout") != "bundle":
            raise ValueError("invalid bundle manifest")
        object_id = manifest.get("object_id")
        if not isinstance(object_id, str):
            raise ValueError("bundle manifest object_id must be a string")
        owners = manifest.get("buffer_object_ids", [object_id])
        if not isinstance(owners, list) or not all(isinstance(o, str) for o in owners):
            raise ValueError("bundle manifest buffer_object_ids must be a list of strings")
        bases = [f"{self._key_prefix}/{o}" for o in owners]
        self._validate_payload_spec(manifest.get("meta"), [f"{self._key_prefix}/{object_id}"])
        extra = manifest.get("cleanup_keys", [])
        if not isinstance(extra, list) or not all(
            isinstance(k, str) and any(k == f"{b}/manifest" or k.startswith(f"{b}/") for b in bases)
            for k in extra
        ):
            raise ValueError("bundle manifest cleanup_keys are outside the bundle namespace")
        buffers = manifest.get("buffers")
        if not isinstance(buffers, dict):
            raise ValueError("bundle manifest buffers must be a dict")
        for name, spec in buffers.items():
            validate_key_segment(name, "buffer name")
            self._validate_payload_spec(spec, bases)

    @staticmethod
    def _validate_payload_spec(spec: Any, bases: Sequence[str]) -> None:
        if not isinstance(spec, dict):
            raise ValueError("bundle payload spec must be a dict")
        key = spec.get("key")
        if not isinstance(key, str) or not any(key.startswith(f"{b}/") for b in bases):
            raise ValueError("bundle payload key is outside the bundle namespace")
        total = int(spec.get("bytes", -1))
        if total < 0:
            raise ValueError("bundle payload bytes must be non-negative")
        chunks = spec.get("chunks")
        if not isinstance(chunks, list) or (total and not chunks):
            raise ValueError("bundle payload chunks are invalid")
        seen: set[str] = set()
        summed = 0
        for chunk in chunks:
            if not isinstance(chunk, dict):
                raise ValueError("bundle chunk must be a dict")
            ckey = chunk.get("key")
            size = int(chunk.get("bytes", -1))
            if not isinstance(ckey, str) or (ckey != key and not ckey.startswith(f"{key}/")):
                raise ValueError("bundle chunk key is outside the payload namespace")
            if ckey in seen:
                raise ValueError("bundle chunk keys must be unique")
            if size < 0:
                raise ValueError("bundle chunk bytes must be non-negative")
            seen.add(ckey)
            summed += size
        if summed != total:
            raise ValueError(f"bundle payload chunks total {summed} bytes, expected {total}")

    # ---- reads (delegated, with the plain-``get`` fallbacks)

    def read_payload(self, spec: Mapping[str, Any]) -> bytes:
        return self._transport.read_payload(spec)

    def read_payload_range(self, spec: Mapping[str, Any], offset: int, length: int) -> bytes:
        return self._transport.read_payload_range(spec, offset, length)

    def read_payload_range_into_pool_array(
        self, spec: Mapping[str, Any], dtype: np.dtype[Any], shape: tuple[int, ...], offset: int
    ) -> np.ndarray | None:
        return self._transport.read_payload_range_into_pool_array(spec, dtype, shape, offset)

    def read_tensor_payload(self, spec: Mapping[str, Any]) -> Any:
        return self._transport.read_tensor(spec)

    def read_tensor_payload_into(
        self, spec: Mapping[str, Any], dest: TensorObjectBuffer | RawDestination
    ) -> Any:
        return self._transport.read_tensor_into(spec, dest)

    def read_payload_range_into_destination(
        self, spec: Mapping[str, Any], dest: np.ndarray, offset: int, pre_registered: bool = False
    ) -> None:
        self._transport.read_payload_range_into_destination(spec, dest, offset, pre_registered)

    def read_payload_range_into_raw_destination(
        self, spec: Mapping[str, Any], ptr: int, dst_offset: int, offset: int, length: int
    ) -> None:
        if not self._transport.read_payload_range_into_raw_destination(
            spec, ptr, dst_offset, offset, length
        ):
            data = self.read_payload_range(spec, offset, length)
            ctypes.memmove(ptr + dst_offset, data, length)

    def read_payload_ranges_into(
        self,
        spec: Mapping[str, Any],
        dest: bytearray | np.ndarray,
        ranges: Sequence[tuple[int, int, int]],
    ) -> None:
        if ranges:
            self._transport.read_payload_ranges_into(spec, dest, ranges)

    def read_payload_ranges_into_raw_destination(
        self, spec: Mapping[str, Any], ptr: int, ranges: Sequence[tuple[int, int, int]]
    ) -> None:
        if not ranges or self._transport.read_payload_ranges_into_raw_destination(
            spec, ptr, ranges
        ):
            return
        for src, dst, n in ranges:
            ctypes.memmove(ptr + dst, self.read_payload_range(spec, src, n), n)


cleanup_keys_fn = cleanup_keys


def _copy(policy: BundleTransferPolicy) -> BundleTransferPolicy:
    """``policy`` in ``copy`` mode (small metadata is always written with ``put``)."""
    return policy if policy.copy_mode == "copy" else dataclasses.replace(policy, copy_mode="copy")


def _chunk_keys(key: str, count: int) -> list[str]:
    return [key] if count == 1 else [f"{key}/chunk/{i}" for i in range(count)]


def _spec(key: str, keys: Sequence[str], sizes: Sequence[int]) -> dict[str, Any]:
    return {
        "key": key,
        "bytes": sum(sizes),
        "chunks": [{"key": k, "bytes": n} for k, n in zip(keys, sizes, strict=True)],
    }


def _concat_arrays_into(
    arrays: Sequence[np.ndarray], dest: int, size: int, start: int, count: int
) -> int:
    """Copy ``arrays[start:start + count]`` back to back to address ``dest``
    (at most ``size`` bytes); the bytes copied."""
    pos = 0
    for array in arrays[start : start + count]:
        flat = np.ascontiguousarray(array).reshape(-1)
        n = int(flat.nbytes)
        if pos + n > size:
            break
        if n:
            ctypes.memmove(dest + pos, flat.ctypes.data, n)
        pos += n
    return pos
