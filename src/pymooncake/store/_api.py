"""What a store client offers to the layers above it (``mooncake.store``, tensors).

Both :class:`~pymooncake.store.StoreClient` (a full client) and
:class:`~pymooncake.store._dummy_client.DummyClient` (one that forwards to a
``mooncake_client`` on this host) provide it, so the compatibility layer and
the tensor API run unchanged on either.  Calls that need a full client's
internals (put sessions, mounting segments) check for ``StoreClient``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..errors import StoreError
from ._buffers import BufferHandle, LocalBuffer
from ._client_io import ObjectLocation
from ._tasks import TaskInfo
from ._types import ReplicaDesc, ReplicateConfig

__all__ = ["StoreApi"]


class StoreApi(Protocol):
    """The store calls of a client (semantics: :class:`StoreClient`)."""

    @property
    def hostname(self) -> str: ...

    @property
    def closed(self) -> bool: ...

    @property
    def local(self) -> LocalBuffer: ...

    def close(self) -> None: ...

    def health(self) -> bool: ...

    # --- caller memory ---------------------------------------------------------------

    def register_memory(self, addr: int, size: int) -> None: ...

    def unregister_memory(self, addr: int) -> None: ...

    def local_view(self, addr: int, length: int, *, writable: bool) -> memoryview: ...

    def registered_end(self, addr: int) -> int: ...

    # --- queries and removal ------------------------------------------------------------

    def exists(self, key: str) -> bool: ...

    def exists_many(self, keys: Sequence[str]) -> list[bool]: ...

    def size_of(self, key: str) -> int: ...

    def replicas(self, key: str) -> list[ReplicaDesc]: ...

    def replicas_many(self, keys: Sequence[str]) -> list[list[ReplicaDesc] | StoreError]: ...

    def remove(self, key: str, force: bool = False) -> None: ...

    def remove_many(self, keys: Sequence[str], force: bool = False) -> list[StoreError | None]: ...

    def replica_clear_many(self, keys: Sequence[str], segment_name: str = "") -> list[str]: ...

    def remove_by_regex(self, pattern: str, force: bool = False) -> int: ...

    def remove_all(self, force: bool = False) -> int: ...

    # --- copy/move tasks --------------------------------------------------------------

    def create_copy_task(self, key: str, targets: Sequence[str]) -> tuple[int, int]: ...

    def create_move_task(self, key: str, source: str, target: str) -> tuple[int, int]: ...

    def query_task(self, task_id: tuple[int, int]) -> TaskInfo: ...

    # --- writes -----------------------------------------------------------------------

    def put(self, key: str, value: Any, config: ReplicateConfig | None = None) -> bool: ...

    def put_parts(
        self, key: str, parts: Sequence[Any], config: ReplicateConfig | None = None
    ) -> bool: ...

    def put_from(
        self, key: str, buffer: Any, size: int | None = None, config: ReplicateConfig | None = None
    ) -> bool: ...

    def put_many(
        self,
        keys: Sequence[str],
        values: Sequence[Sequence[Any]],
        config: ReplicateConfig | None = None,
        *,
        bytes_api: bool = False,
    ) -> list[bool | StoreError]: ...

    def upsert(self, key: str, value: Any, config: ReplicateConfig | None = None) -> None: ...

    def upsert_many(
        self,
        keys: Sequence[str],
        values: Sequence[Sequence[Any]],
        config: ReplicateConfig | None = None,
    ) -> list[bool | StoreError]: ...

    # --- reads ------------------------------------------------------------------------

    def get(self, key: str) -> bytes: ...

    def get_many(self, keys: Sequence[str]) -> list[bytes | StoreError]: ...

    def get_into(self, key: str, buffer: Any, size: int | None = None) -> int: ...

    def get_many_into(
        self, keys: Sequence[str], dests: Sequence[Sequence[Any]]
    ) -> list[int | StoreError]: ...

    def get_many_alloc(
        self, keys: Sequence[str], alloc: Callable[[int, int], Any]
    ) -> list[Any | StoreError]: ...

    def get_buffer(self, key: str) -> BufferHandle: ...

    def locate(self, keys: Sequence[str]) -> list[ObjectLocation | StoreError]: ...

    def read_ranges(
        self,
        locations: Sequence[ObjectLocation],
        ranges: Sequence[Sequence[tuple[memoryview, int]]],
    ) -> list[list[int | StoreError]]: ...
