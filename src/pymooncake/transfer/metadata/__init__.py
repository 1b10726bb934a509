"""Metadata backends behind one interface, chosen by connection string.

==============================  ==============================================
``P2PHANDSHAKE``                no store: peers fetch descriptors over RPC
``http://host:port/path``       :class:`HttpMetadataStore` (``https://`` too)
``etcd://h1:2379;h2:2379``      :class:`~.etcd.EtcdMetadataStore` (``,`` too)
``host:port``                   etcd, as in the reference (no scheme = etcd)
``redis://host:port``           :class:`~.redis.RedisMetadataStore` (redis-py)
``memory://name``               :class:`MemoryMetadataStore` (in-process)
==============================  ==============================================

:data:`BACKENDS` maps a scheme to the function that opens it; the etcd and
Redis modules are imported only when chosen (Redis needs the optional
``redis`` package).  :func:`register_backend` adds one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...config import EngineConfig
from ...errors import ConfigError
from ._base import MetadataConflict, MetadataStore, is_rpc_meta_key
from .http import HttpMetadataStore
from .memory import MemoryMetadataStore

__all__ = [
    "BACKENDS",
    "P2P_HANDSHAKE",
    "HttpMetadataStore",
    "MemoryMetadataStore",
    "MetadataConflict",
    "MetadataStore",
    "MetadataTarget",
    "connect_metadata",
    "is_rpc_meta_key",
    "parse_metadata_target",
    "register_backend",
]

P2P_HANDSHAKE = "P2PHANDSHAKE"


@dataclass(frozen=True)
class MetadataTarget:
    """A parsed ``metadata_server`` string."""

    scheme: str  # "p2p", "http", "memory", "etcd", "redis", or a registered one
    location: str  # the part after "scheme://" (the whole URL for http)

    @property
    def is_p2p(self) -> bool:
        return self.scheme == "p2p"


def parse_metadata_target(conn: str) -> MetadataTarget:
    """Classify a metadata connection string the way the reference does
    (``parseConnectionString``: no ``://`` means etcd).

    Raises:
        ConfigError: empty string or an unknown ``scheme://``.
    """
    text = conn.strip()
    if not text:
        raise ConfigError(
            "metadata_server is empty; use 'P2PHANDSHAKE', 'http://host:port/metadata', "
            "'etcd://host:2379' or 'redis://host:6379'"
        )
    if text.upper() == P2P_HANDSHAKE:
        return MetadataTarget("p2p", "")
    scheme, sep, rest = text.partition("://")
    if not sep:
        return MetadataTarget("etcd", text)
    scheme = scheme.lower()
    if scheme == "p2p":
        return MetadataTarget("p2p", "")
    if scheme in ("http", "https"):
        return MetadataTarget("http", text)
    if scheme in BACKENDS:
        return MetadataTarget(scheme, rest)
    raise ConfigError(
        f"metadata_server {conn!r} has unknown scheme {scheme!r}; use P2PHANDSHAKE, "
        f"{', '.join(s + '://' for s in sorted(BACKENDS))}"
    )


Opener = Callable[[MetadataTarget, EngineConfig], MetadataStore]


def _open_http(target: MetadataTarget, config: EngineConfig) -> MetadataStore:
    return HttpMetadataStore(
        target.location,
        timeout_s=config.metadata_timeout_s,
        connect_timeout_s=config.metadata_connect_timeout_s,
        security=config.security,
    )


def _open_memory(target: MetadataTarget, config: EngineConfig) -> MetadataStore:
    return MemoryMetadataStore(target.location or "default")


def _open_etcd(target: MetadataTarget, config: EngineConfig) -> MetadataStore:
    from .etcd import EtcdMetadataStore

    return EtcdMetadataStore(
        target.location,
        timeout_s=config.metadata_timeout_s,
        connect_timeout_s=config.metadata_connect_timeout_s,
    )


def _open_redis(target: MetadataTarget, config: EngineConfig) -> MetadataStore:
    from .redis import RedisMetadataStore

    return RedisMetadataStore(
        target.location,
        username=config.redis_username,
        password=config.redis_password,
        db_index=config.redis_db_index,
        timeout_s=config.metadata_timeout_s,
        connect_timeout_s=config.metadata_connect_timeout_s,
    )


#: scheme -> opener; ``http`` also serves ``https``
BACKENDS: dict[str, Opener] = {
    "http": _open_http,
    "https": _open_http,
    "etcd": _open_etcd,
    "redis": _open_redis,
    "memory": _open_memory,
}


def register_backend(scheme: str, opener: Opener) -> None:
    """Make ``scheme://...`` open with ``opener(target, config)``."""
    BACKENDS[scheme.lower()] = opener


def connect_metadata(target: MetadataTarget, config: EngineConfig) -> MetadataStore | None:
    """Open the backend for ``target``; None for P2P handshake mode.

    Raises:
        ConfigError: the location is unusable for that backend.
        NotSupported: the backend needs a package that is not installed.
    """
    if target.is_p2p:
        return None
    opener = BACKENDS.get(target.scheme)
    if opener is None:
        raise ConfigError(f"no metadata backend for scheme {target.scheme!r}")
    return opener(target, config)
