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

    def _write(self, key: str, value: bytes) -> None:
        with self._lock:
            self._data[key] = bytes(value)

    def create(self, key: str, value: bytes) -> bool:
        with self._lock:
            if key in self._data:
                return False
            self._data[key] = bytes(value)
            return True

    def remove(self, key: str) -> bool:
        with self._lock:
            return self._data.pop(key, None) is not None

    def compare_and_remove(self, key: str, expected: bytes) -> bool:
        with self._lock:
            if self._data.get(key) != expected:
                return False
            del self._data[key]
            return True

    def keys(self, prefix: str = "") -> list[str]:
        with self._lock:
            return sorted(k for k in self._data if k.startswith(prefix))
