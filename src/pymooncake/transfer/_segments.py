"""Finding peers: segment names -> descriptors and addresses, with a cache.

* P2P handshake: the name *is* the RPC address (``host:rpc_port``); the
  descriptor comes from the peer's Metadata RPC.
* Metadata store: the descriptor is ``mooncake/[cluster/]ram/<name>`` and the
  RPC address ``mooncake/[cluster/]rpc_meta/<name>``.

Descriptors are cached per name until :meth:`SegmentDirectory.invalidate`
(or always re-fetched with ``MC_DISABLE_METACACHE``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from .._net import split_host_port
from ..config import EngineConfig
from ..errors import (
    InvalidArgument,
    MalformedMessage,
    MetadataError,
    MooncakeError,
    SegmentNotFound,
)
from ..wire import (
    MessageType,
    RpcMeta,
    decode_rpc_meta,
    decode_segment,
    dumps_json,
    encode_rpc_meta,
    rpc_meta_key,
    segment_key,
)
from ._rpc import rpc_call
from .metadata import MetadataStore
from .transports import Peer

__all__ = ["SegmentDirectory", "check_name", "not_found_message"]

log = logging.getLogger("pymooncake.segments")


def check_name(name: str, what: str) -> None:
    """Names end up in JSON and URLs: refuse what cannot be encoded there.

    Raises:
        InvalidArgument: the name holds a lone surrogate.
    """
    if not name.isascii():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument(
                f"{what} {name[:80]!r} contains a lone surrogate; names must be valid Unicode"
            ) from None


def not_found_message(name: str, detail: str, p2p: bool) -> str:
    hint = (
        "in P2PHANDSHAKE mode a segment name is the peer's '<host>:<rpc_port>' "
        "(its local_hostname host and get_rpc_port())"
        if p2p
        else "the Segment name needs to strictly match the local_hostname the other node "
        "passed at initialization, and both nodes must use the same metadata server and "
        "MC_METADATA_CLUSTER_ID"
    )
    return (
        f"Failed to get description of {name} (Failed to retrieve segment descriptor, "
        f"name {name}): {detail}; {hint}"
    )


class SegmentDirectory:
    """Resolves and caches peers; publishes our own entries in store mode."""

    def __init__(
        self,
        store: MetadataStore | None,
        config: EngineConfig,
        *,
        own_descriptor: Callable[[], dict[str, Any]],
    ) -> None:
        self._store = store
        self._cfg = config
        self._security = config.security
        self._own = own_descriptor
        self._lock = threading.Lock()
        self._cache: dict[str, Peer] = {}

    @property
    def p2p(self) -> bool:
        return self._store is None

    # --- our own entries ------------------------------------------------------

    def publish_segment(self, name: str, desc: dict[str, Any]) -> None:
        if self._store is not None:
            self._store.set(segment_key(name, self._cfg.metadata_cluster_id), dumps_json(desc))

    def publish_rpc_meta(self, name: str, meta: RpcMeta) -> None:
        if self._store is not None:
            self._store.set(
                rpc_meta_key(name, self._cfg.metadata_cluster_id), dumps_json(encode_rpc_meta(meta))
            )

    def read_rpc_meta(self, name: str) -> RpcMeta | None:
        if self._store is None:
            return None
        raw = self._store.get(rpc_meta_key(name, self._cfg.metadata_cluster_id))
        return None if raw is None else decode_rpc_meta(raw, name)

    def unpublish(self, name: str) -> None:
        if self._store is not None:
            cid = self._cfg.metadata_cluster_id
            self._store.remove(rpc_meta_key(name, cid))
            self._store.remove(segment_key(name, cid))

    # --- peers ------------------------------------------------------------------

    def invalidate(self, name: str | None = None) -> None:
        with self._lock:
            if name is None:
                self._cache.clear()
            else:
                self._cache.pop(name, None)

    def lookup(self, name: str, *, refresh: bool = False) -> Peer:
        """Resolve ``name`` to a :class:`Peer`.

        Raises:
            SegmentNotFound: no such segment (message says how names work).
            MetadataUnreachable / PeerSocketError / DnsError: the source of the
                descriptor cannot be reached.
            MalformedMessage: the descriptor is corrupt.
        """
        name = name.lstrip("/")
        if not name:
            raise InvalidArgument("empty segment name")
        if not refresh and not self._cfg.disable_metacache:
            with self._lock:
                peer = self._cache.get(name)
            if peer is not None:
                return peer
        check_name(name, "segment name")  # (a cached name was checked when it was fetched)
        peer = self._fetch_p2p(name) if self._store is None else self._fetch_store(name)
        with self._lock:
            self._cache[name] = peer
        return peer

    def _fetch_p2p(self, name: str) -> Peer:
        try:
            host, port = split_host_port(name)
        except InvalidArgument as exc:
            raise SegmentNotFound(not_found_message(name, str(exc), True)) from exc
        if port is None:
            raise SegmentNotFound(not_found_message(name, "the name has no ':port' part", True))
        try:
            reply = rpc_call(
                host,
                port,
                MessageType.METADATA,
                self._own(),
                connect_timeout_s=self._cfg.connect_timeout_s,
                timeout_s=self._cfg.rpc_io_timeout_s,
                max_frame=self._cfg.handshake_max_length,
                what=f"RPC port of segment {name!r}",
                key=self._security.key,
                ssl_context=self._security.client_ssl_context(),
            )
        except MooncakeError as exc:
            exc.args = (not_found_message(name, str(exc), True),)
            raise
        if reply is None:
            raise SegmentNotFound(
                not_found_message(
                    name,
                    "the peer answered the Metadata request with null: it does not run in "
                    "P2PHANDSHAKE mode; use the metadata server it uses",
                    True,
                )
            )
        desc = decode_segment(reply, name)
        return Peer(
            name=name,
            desc=desc,
            rpc_host=host,
            rpc_port=port,
            data_host=desc.tcp_data_host or host,
        )

    def _fetch_store(self, name: str) -> Peer:
        assert self._store is not None
        cid = self._cfg.metadata_cluster_id
        raw = self._store.get(segment_key(name, cid))
        if raw is None:
            raise SegmentNotFound(
                not_found_message(
                    name,
                    f"no descriptor under {segment_key(name, cid)!r} on {self._store.url}",
                    False,
                )
            )
        desc = decode_segment(raw, name)
        meta_raw = self._store.get(rpc_meta_key(name, cid))
        meta: RpcMeta | None = None
        if meta_raw is not None:
            try:
                meta = decode_rpc_meta(meta_raw, name)
            except MalformedMessage as exc:
                raise MetadataError(
                    f"rpc_meta entry of segment {name!r} is corrupt: {exc}"
                ) from exc
        data_host = desc.tcp_data_host or (meta.ip_or_host_name if meta else None)
        if data_host is None:
            raise SegmentNotFound(
                not_found_message(
                    name,
                    f"its descriptor has no tcp_data_host and there is no "
                    f"{rpc_meta_key(name, cid)!r} entry to take the host from",
                    False,
                )
            )
        return Peer(
            name=name,
            desc=desc,
            rpc_host=meta.ip_or_host_name if meta else data_host,
            rpc_port=meta.rpc_port if meta else 0,
            data_host=data_host,
        )
