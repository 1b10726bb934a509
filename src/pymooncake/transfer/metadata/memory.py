"""In-process metadata backend (``memory://<name>``), for tests and single-process use.

Stores with the same name share one dict, so several engines in one process
can find each other.
"""

from __future__ import annotations

import threading

from ._base import MetadataStore

__all__ = ["MemoryMetadataStore"]

_SHARED: dict[str, dict[str, bytes]] = {}
_SHARED_LOCK = threading.Lock()


class MemoryMetadataStore(MetadataStore):
    def __init__(self, name: str = "default") -> None:
        self.url = f"memory://{name}"
        with _SHARED_LOCK:
            self._data = _SHARED.setdefault(name, {})
        self._lock = _SHARED_LOCK

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._data.get(key)

    def set(self, key: str, value: bytes) -> None:
        with self._lock:
            self._data[key] = bytes(value)

    def remove(self, key: str) -> bool:
        with self._lock:
            return self._data.pop(key, None) is not None

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._data)
