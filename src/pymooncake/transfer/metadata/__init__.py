"""Metadata backends behind one get/set/remove interface, chosen by connection string.

==========================  =============================================
``P2PHANDSHAKE``            no store: peers fetch descriptors over RPC
``http://host:port/path``   :class:`HttpMetadataStore`
``memory://name``           :class:`MemoryMetadataStore` (in-process)
``etcd://h1:2379,h2``       not available yet (clear error)
``host:port``               etcd, as in the reference (clear error)
``redis://host:port``       not available yet (clear error)
==========================  =============================================
"""

from __future__ import annotations

from dataclasses import dataclass

from ...config import EngineConfig
from ...errors import ConfigError, NotSupported
from ._base import MetadataStore
from .http import HttpMetadataStore
from .memory import MemoryMetadataStore

__all__ = [
    "P2P_HANDSHAKE",
    "HttpMetadataStore",
    "MemoryMetadataStore",
    "MetadataStore",
    "MetadataTarget",
    "connect_metadata",
    "parse_metadata_target",
]

P2P_HANDSHAKE = "P2PHANDSHAKE"


@dataclass(frozen=True)
class MetadataTarget:
    """A parsed ``metadata_server`` string."""

    scheme: str  # "p2p", "http", "memory", "etcd", "redis"
    location: str  # the part after "scheme://" (or the whole URL for http)

    @property
    def is_p2p(self) -> bool:
        return self.scheme == "p2p"


def parse_metadata_target(conn: str) -> MetadataTarget:
    """Classify a metadata connection string the way the reference does.

    Raises:
        ConfigError: empty string or an unknown ``scheme://``.
    """
    text = conn.strip()
    if not text:
        raise ConfigError(
            "metadata_server is empty; use 'P2PHANDSHAKE', 'http://host:port/metadata' "
            "or 'etcd://host:2379'"
        )
    if text.upper() == P2P_HANDSHAKE:
        return MetadataTarget("p2p", "")
    scheme, sep, rest = text.partition("://")
    if not sep:
        # reference: a bare "host:port[,host:port]" means etcd
        return MetadataTarget("etcd", text)
    scheme = scheme.lower()
    if scheme in ("http", "https"):
        return MetadataTarget("http", text)
    if scheme in ("etcd", "redis", "memory", "p2p"):
        if scheme == "p2p":
            return MetadataTarget("p2p", "")
        return MetadataTarget(scheme, rest)
    raise ConfigError(
        f"metadata_server {conn!r} has unknown scheme {scheme!r}; use P2PHANDSHAKE, http://, "
        "etcd:// or redis://"
    )


def connect_metadata(target: MetadataTarget, config: EngineConfig) -> MetadataStore | None:
    """Open the backend for ``target``; None for P2P handshake mode.

    Raises:
        NotSupported: etcd/redis, which this build does not provide yet.
    """
    if target.is_p2p:
        return None
    if target.scheme == "http":
        return HttpMetadataStore(
            target.location,
            timeout_s=config.metadata_timeout_s,
            connect_timeout_s=config.metadata_connect_timeout_s,
            security=config.security,
        )
    if target.scheme == "memory":
        return MemoryMetadataStore(target.location or "default")
    if target.scheme == "etcd":
        raise NotSupported(
            f"metadata server {target.location!r} is an etcd address (plain 'host:port' and "
            "'etcd://' mean etcd, as in the reference), and the etcd backend is not available in "
            "this pymooncake release. Use metadata_server='P2PHANDSHAKE' (no server needed) or "
            "run `mooncake_http_metadata_server --port 8080` and use "
            "'http://<host>:8080/metadata'"
        )
    raise NotSupported(
        f"metadata backend {target.scheme!r} ({target.location!r}) is not available in this "
        "pymooncake release; use 'P2PHANDSHAKE' or an http:// metadata server"
    )
