"""The metadata-store interface: three methods over string keys and byte values."""

from __future__ import annotations

import abc

__all__ = ["MetadataStore"]


class MetadataStore(abc.ABC):
    """A key-value store holding segment descriptors and rpc_meta entries.

    Values are the exact bytes written (JSON text); the store never parses them.
    Implementations are thread-safe.
    """

    #: connection string this store was opened with (for messages)
    url: str = ""

    @abc.abstractmethod
    def get(self, key: str) -> bytes | None:
        """The value under ``key``, or None if absent.

        Raises:
            MetadataUnreachable: the backend cannot be contacted.
            MetadataError: any other backend failure.
        """

    @abc.abstractmethod
    def set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``.

        Raises:
            MetadataUnreachable / MetadataError: as for :meth:`get`; a refusal by
                the backend (e.g. the duplicate ``rpc_meta`` rule) is a
                MetadataError whose message carries the backend's reason.
        """

    @abc.abstractmethod
    def remove(self, key: str) -> bool:
        """Delete ``key``; returns False if it did not exist.

        Raises:
            MetadataUnreachable / MetadataError: as for :meth:`get`.
        """

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections; idempotent."""
