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

from .._net import join_host_port, split_host_port
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
from .metadata import MetadataConflict, MetadataStore
from .transports import Peer

__all__ = ["SegmentDirectory", "check_name", "not_found_message"]

log = logging.getLogger("pymooncake.segments")

#: create/read rounds when claiming an rpc_meta entry races with others
_CLAIM_ROUNDS = 5


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
        #: the exact bytes of our rpc_meta entry while we hold it
        self._own_rpc_meta: bytes | None = None

    @property
    def p2p(self) -> bool:
        return self._store is None

    # --- our own entries ------------------------------------------------------

    def publish_segment(self, name: str, desc: dict[str, Any]) -> None:
        if self._store is not None:
            self._store.set(segment_key(name, self._cfg.metadata_cluster_id), dumps_json(desc))

    def _rpc_meta_key(self, name: str) -> str:
        return rpc_meta_key(name, self._cfg.metadata_cluster_id)

    def claim_rpc_meta(
        self, name: str, meta: RpcMeta, *, owner_alive: Callable[[RpcMeta], bool]
    ) -> None:
        """Publish our rpc_meta entry, or fail because a live engine holds the name.

        The rule (safe with any number of engines racing for one name):

        1. create the entry if absent (atomic in every backend) -- done;
        2. else read it: our own address -> done (a re-publish);
        3. another address: ask ``owner_alive`` (a Probe RPC to it); alive ->
           :class:`MetadataConflict`, names must be unique;
        4. dead -> the entry is stale (its engine exited without unregistering):
           delete it *only if it still holds the bytes read in 2*
           (compare-and-remove) and go back to 1.  Of two restarting engines,
           exactly one create wins; the other finds the winner alive in 3.

        The stale engine's segment descriptor is left alone: ours overwrites it
        when we publish, and deleting it here could delete a racing winner's.

        Raises:
            MetadataConflict: a live engine holds ``name``.
            MetadataError / MetadataUnreachable: the store failed.
        """
        if self._store is None:
            return
        key = self._rpc_meta_key(name)
        value = dumps_json(encode_rpc_meta(meta))
        for _ in range(_CLAIM_ROUNDS):
            if self._store.create(key, value):
                self._own_rpc_meta = value
                return
            raw = self._store.get(key)
            if raw is None:
                continue  # removed meanwhile
            try:
                existing: RpcMeta | None = decode_rpc_meta(raw, name)
            except MalformedMessage:
                existing = None  # unreadable: nobody can use it, so it is stale
            if existing == meta:
                self._own_rpc_meta = raw
                return
            if existing is not None and owner_alive(existing):
                raise MetadataConflict(
                    f"segment name {name!r} is already registered by a live engine at "
                    f"{join_host_port(existing.ip_or_host_name, existing.rpc_port)} ({key} on "
                    f"{self._store.url}); every engine needs a unique local_hostname (add a "
                    "port, e.g. 'host:12345')"
                )
            log.warning(
                "replacing stale rpc_meta of %r (%s did not answer a probe; its process exited "
                "without unregistering)",
                name,
                raw[:200].decode(errors="replace").strip(),
            )
            self._store.compare_and_remove(key, raw)
        raise MetadataError(
            f"could not claim {key} on {self._store.url}: it kept changing under us "
            f"({_CLAIM_ROUNDS} rounds); is another engine restarting with the same name?"
        )

    def read_rpc_meta(self, name: str) -> RpcMeta | None:
        if self._store is None:
            return None
        raw = self._store.get(self._rpc_meta_key(name))
        return None if raw is None else decode_rpc_meta(raw, name)

    def unpublish(self, name: str) -> None:
        """Remove our entries -- only if the rpc_meta entry is still ours (a
        newer engine with the same name may have replaced us meanwhile)."""
        if self._store is None or self._own_rpc_meta is None:
            return
        cid = self._cfg.metadata_cluster_id
        own, self._own_rpc_meta = self._own_rpc_meta, None
        if self._store.compare_and_remove(rpc_meta_key(name, cid), own):
            self._store.remove(segment_key(name, cid))

    def published_names(self) -> list[str] | None:
        """Segment names published in the store (None: it cannot list, or P2P)."""
        if self._store is None:
            return None
        prefix = segment_key("", self._cfg.metadata_cluster_id)
        keys = self._store.keys(prefix)
        return None if keys is None else [k[len(prefix) :] for k in keys]

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

    def _published_hint(self, limit: int = 10) -> str:
        try:
            names = self.published_names()
        except MooncakeError:
            return ""
        if names is None:
            return ""
        if not names:
            return " (no segment is published there at all)"
        shown = ", ".join(repr(n) for n in names[:limit])
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        return f" (published segment names: {shown}{more})"

    def _fetch_store(self, name: str) -> Peer:
        assert self._store is not None
        cid = self._cfg.metadata_cluster_id
        raw = self._store.get(segment_key(name, cid))
        if raw is None:
            raise SegmentNotFound(
                not_found_message(
                    name,
                    f"no descriptor under {segment_key(name, cid)!r} on {self._store.url}"
                    + self._published_hint(),
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
