"""The metadata-store interface, and the rules every backend follows.

Keys are strings (``mooncake/[cluster/]ram/<segment>``,
``mooncake/[cluster/]rpc_meta/<name>``); values are the exact bytes written
(JSON text), never parsed here.  Every backend -- ``memory://``, the HTTP
server through :class:`HttpMetadataStore`, etcd, Redis -- answers to the
same contract, checked by :mod:`pymooncake.testing.metadata_conformance`:

``get``
    the bytes last written, or None.
``set``
    writes.  Except that an ``rpc_meta`` entry (a key containing
    ``rpc_meta``, the reference HTTP servers' rule) is *claimed*, not
    overwritten: writing the bytes it already holds succeeds and changes
    nothing; writing different bytes raises :class:`MetadataConflict`
    ("Duplicate rpc_meta key not allowed" -- two engines with one name).
``create``
    writes only if the key is absent, atomically: of any number of concurrent
    creates of one key exactly one returns True.
``compare_and_remove``
    deletes only if the key holds exactly the given bytes, atomically.
``remove``
    deletes unconditionally; False if there was nothing.
``keys``
    the keys under a prefix, where the backend can list (None where it cannot:
    the HTTP protocol has no listing).
"""

from __future__ import annotations

import abc
from typing import Final

from ...errors import MetadataError

__all__ = [
    "RPC_META_MARKER",
    "MetadataConflict",
    "MetadataStore",
    "is_rpc_meta_key",
]

#: a key containing this is an rpc_meta entry (rule of the reference HTTP servers)
RPC_META_MARKER: Final = "rpc_meta"
#: rounds of create/read when an rpc_meta entry vanishes between the two
_CLAIM_ROUNDS: Final = 5


def is_rpc_meta_key(key: str) -> bool:
    return RPC_META_MARKER in key


class MetadataConflict(MetadataError):
    """A write refused because the key holds something else (an ``rpc_meta``
    entry of another engine with the same name)."""


def duplicate_message(key: str, url: str) -> str:
    return (
        f"Duplicate rpc_meta key not allowed: {key} on {url} already holds another engine's "
        "address. Every engine needs a unique local_hostname (the segment name); if the "
        "other engine is gone, its entry is stale -- pymooncake engines replace stale entries "
        "themselves after probing the old address"
    )


class MetadataStore(abc.ABC):
    """A key-value store holding segment descriptors and rpc_meta entries.

    Implementations are thread-safe.  Errors: :class:`MetadataUnreachable`
    when the backend cannot be contacted, :class:`MetadataError` for any other
    failure (the message carries the backend's reason).
    """

    #: connection string this store was opened with (for messages)
    url: str = ""

    @abc.abstractmethod
    def get(self, key: str) -> bytes | None:
        """The value under ``key``, or None if absent."""

    def set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` (``rpc_meta`` entries: see the module docstring).

        Raises:
            MetadataConflict: an ``rpc_meta`` key holds different bytes.
        """
        if not is_rpc_meta_key(key):
            self._write(key, value)
            return
        for _ in range(_CLAIM_ROUNDS):
            if self.create(key, value):
                return
            current = self.get(key)
            if current == value:
                return
            if current is not None:
                raise MetadataConflict(duplicate_message(key, self.url))
            # removed between create and get: try again
        raise MetadataError(f"{key} on {self.url} keeps appearing and vanishing; giving up")

    @abc.abstractmethod
    def _write(self, key: str, value: bytes) -> None:
        """Store ``value`` unconditionally."""

    @abc.abstractmethod
    def create(self, key: str, value: bytes) -> bool:
        """Store ``value`` only if ``key`` is absent; True if this call created it."""

    @abc.abstractmethod
    def remove(self, key: str) -> bool:
        """Delete ``key``; False if it did not exist."""

    @abc.abstractmethod
    def compare_and_remove(self, key: str, expected: bytes) -> bool:
        """Delete ``key`` only if it holds exactly ``expected``; True if deleted."""

    def keys(self, prefix: str) -> list[str] | None:
        """The keys starting with ``prefix``, sorted; None if the backend cannot list."""
        return None

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections; idempotent."""
