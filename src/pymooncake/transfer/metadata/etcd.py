"""etcd metadata backend: ``etcd://h1:2379;h2:2379``, ``etcd://h:2379`` or bare ``h:2379``.

The reference engine (built with etcd, as the PyPI wheels are) stores the same
keys with plain put/get/delete and no lease: ``mooncake/[cluster/]ram/<name>``
for segment descriptors and ``mooncake/[cluster/]rpc_meta/<name>`` for RPC
addresses, JSON values.  A pymooncake engine and a reference engine that use
one etcd therefore find each other.

What pymooncake adds: ``rpc_meta`` is written with a create-if-absent
transaction (``version == 0``), and a stale entry is removed only with a
compare-and-delete on the exact bytes read (see
:meth:`pymooncake.transfer._segments.SegmentDirectory.claim_rpc_meta`).

Errors: :class:`MetadataUnreachable` whose message starts with the reference's
``Error from etcd client`` and names every endpoint with the reason it failed
and the fix (etcd not running, listening on 127.0.0.1 only, firewall, DNS);
:class:`MetadataError` for refusals (request too large, authentication).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..._etcd import EtcdClient, EtcdError, EtcdUnreachable
from ...errors import ConfigError, InvalidArgument, MetadataError, MetadataUnreachable
from ._base import MetadataStore

__all__ = ["EtcdMetadataStore"]

T = TypeVar("T")


class EtcdMetadataStore(MetadataStore):
    """Metadata in etcd.

    Args:
        endpoints: ``h1:2379;h2:2379`` (the part after ``etcd://``; ``,`` works too).
        timeout_s: per request and endpoint.
        connect_timeout_s: per connection attempt.

    Raises:
        ConfigError: ``endpoints`` holds no usable address.
    """

    def __init__(
        self, endpoints: str, *, timeout_s: float = 5.0, connect_timeout_s: float = 2.0
    ) -> None:
        try:
            self._client = EtcdClient(
                endpoints, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s
            )
        except InvalidArgument as exc:
            raise ConfigError(f"metadata_server 'etcd://{endpoints}': {exc}") from None
        self.url = f"etcd://{self._client.display}"

    @property
    def client(self) -> EtcdClient:
        """The underlying etcd client (shared with whoever else needs this cluster)."""
        return self._client

    def _do(self, what: str, op: Callable[[], T]) -> T:
        try:
            return op()
        except EtcdUnreachable as exc:
            raise MetadataUnreachable(f"{exc} [metadata {what}]") from exc
        except EtcdError as exc:
            text = str(exc)
            if "too large" in text:
                text += (
                    "; the value exceeds etcd's --max-request-bytes (1.5 MiB by default): "
                    "raise it on every etcd member"
                )
            raise MetadataError(f"Error from etcd client ({self.url}): {text}") from exc

    def get(self, key: str) -> bytes | None:
        kv = self._do(f"get {key}", lambda: self._client.get(key))
        return None if kv is None else kv.value

    def _write(self, key: str, value: bytes) -> None:
        self._do(f"put {key}", lambda: self._client.put(key, value))

    def create(self, key: str, value: bytes) -> bool:
        result = self._do(f"create {key}", lambda: self._client.create(key, value))
        return result.created

    def remove(self, key: str) -> bool:
        result = self._do(f"delete {key}", lambda: self._client.delete(key))
        return result.deleted > 0

    def compare_and_remove(self, key: str, expected: bytes) -> bool:
        return self._do(
            f"compare-and-delete {key}",
            lambda: self._client.compare_and_delete(key, value=expected),
        )

    def keys(self, prefix: str) -> list[str]:
        result = self._do(
            f"list {prefix}*", lambda: self._client.get_prefix(prefix, keys_only=True)
        )
        return [kv.key.decode(errors="replace") for kv in result.kvs]

    def close(self) -> None:
        self._client.close()
