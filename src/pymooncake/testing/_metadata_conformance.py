"""Metadata backend conformance: every backend answers to one contract.

Each ``check_*`` function takes ``open_store`` -- a callable returning a new
client of the backend under test (several clients of one backend must see the
same data: that is how several engines share it) -- and ``prefix``, a key
prefix no other check uses.  It raises AssertionError on a violation and
closes what it opened.  The contract is the one in
:mod:`pymooncake.transfer.metadata._base`; :data:`METADATA_CHECKS` lists the
checks, and ``tests/transfer/metadata/test_conformance.py`` runs them over
``memory://``, the HTTP server through its client, etcd and Redis.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

from ..config import EngineConfig
from ..transfer import TransferEngine
from ..transfer.metadata import MetadataConflict, MetadataStore
from ..wire import RpcMeta, decode_rpc_meta, decode_segment, dumps_json, encode_rpc_meta

__all__ = [
    "METADATA_CHECKS",
    "check_compare_and_remove",
    "check_concurrent_create",
    "check_concurrent_rpc_meta_claims",
    "check_create",
    "check_engine_key_layout",
    "check_get_set_remove",
    "check_keys_and_odd_names",
    "check_large_values",
    "check_missing_keys",
    "check_rpc_meta_is_claimed_not_overwritten",
    "check_stale_rpc_meta_is_replaced_live_one_is_not",
    "check_values_are_exact_bytes",
]

OpenStore = Callable[[], MetadataStore]
LOCAL = "127.0.0.1"


@contextlib.contextmanager
def _store(open_store: OpenStore) -> Iterator[MetadataStore]:
    store = open_store()
    try:
        yield store
    finally:
        store.close()


def check_get_set_remove(open_store: OpenStore, prefix: str) -> None:
    """Round trip, overwrite of an ordinary key, remove, and a second client sees it all."""
    key = f"{prefix}/ram/a"
    with _store(open_store) as s, _store(open_store) as other:
        s.set(key, b'{"v":1}')
        assert s.get(key) == b'{"v":1}'
        assert other.get(key) == b'{"v":1}'
        other.set(key, b'{"v":2}')  # descriptors are re-published: plain overwrite
        assert s.get(key) == b'{"v":2}'
        assert s.remove(key) is True
        assert other.get(key) is None
        assert other.remove(key) is False


def check_missing_keys(open_store: OpenStore, prefix: str) -> None:
    """Absent keys: get is None, remove and compare_and_remove are False, listing is empty."""
    with _store(open_store) as s:
        assert s.get(f"{prefix}/ram/never") is None
        assert s.remove(f"{prefix}/ram/never") is False
        assert s.compare_and_remove(f"{prefix}/ram/never", b"x") is False
        assert s.keys(f"{prefix}/") in ([], None)


def check_create(open_store: OpenStore, prefix: str) -> None:
    """create writes only when absent and says whether it did."""
    key = f"{prefix}/ram/c"
    with _store(open_store) as s, _store(open_store) as other:
        assert s.create(key, b"first") is True
        assert other.create(key, b"second") is False
        assert s.create(key, b"first") is False  # even with the same bytes
        assert other.get(key) == b"first"
        assert s.remove(key) is True
        assert other.create(key, b"second") is True
        assert s.get(key) == b"second"
        s.remove(key)


def check_compare_and_remove(open_store: OpenStore, prefix: str) -> None:
    """compare_and_remove deletes only the exact bytes."""
    key = f"{prefix}/rpc_meta/x"
    with _store(open_store) as s:
        assert s.create(key, b'{"ip_or_host_name":"10.0.0.1","rpc_port":1}')
        assert s.compare_and_remove(key, b'{"ip_or_host_name":"10.0.0.1","rpc_port":2}') is False
        assert s.compare_and_remove(key, b'{"ip_or_host_name":"10.0.0.1","rpc_port":1}\n') is False
        assert s.get(key) is not None
        assert s.compare_and_remove(key, b'{"ip_or_host_name":"10.0.0.1","rpc_port":1}') is True
        assert s.get(key) is None
        assert s.compare_and_remove(key, b'{"ip_or_host_name":"10.0.0.1","rpc_port":1}') is False


def check_rpc_meta_is_claimed_not_overwritten(open_store: OpenStore, prefix: str) -> None:
    """set() of an rpc_meta key: same bytes succeed, different bytes raise
    MetadataConflict and change nothing; after a remove, anyone may claim it."""
    key = f"{prefix}/rpc_meta/node"
    first = dumps_json(encode_rpc_meta(RpcMeta("10.0.0.1", 15001)))
    second = dumps_json(encode_rpc_meta(RpcMeta("10.0.0.2", 15002)))
    with _store(open_store) as s, _store(open_store) as other:
        s.set(key, first)
        s.set(key, first)  # idempotent
        try:
            other.set(key, second)
        except MetadataConflict as exc:
            assert "Duplicate rpc_meta" in str(exc) and "unique local_hostname" in str(exc)
        else:
            raise AssertionError("rewriting an rpc_meta entry with other bytes was accepted")
        assert s.get(key) == first
        assert s.remove(key)
        other.set(key, second)
        assert s.get(key) == second
        other.remove(key)


def _race(n: int, work: Callable[[int], object]) -> list[object]:
    """Run ``work(i)`` for i < n on n threads released together; results or exceptions."""
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), name=f"race-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def check_concurrent_create(open_store: OpenStore, prefix: str, clients: int = 8) -> None:
    """Of concurrent creates of one key by separate clients, exactly one wins,
    and the stored value is the winner's."""
    key = f"{prefix}/rpc_meta/contended"
    stores = [open_store() for _ in range(clients)]
    try:
        results = _race(clients, lambda i: stores[i].create(key, f"client-{i}".encode()))
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, errors
        winners = [i for i, r in enumerate(results) if r is True]
        assert len(winners) == 1, f"create winners: {winners}"
        assert stores[0].get(key) == f"client-{winners[0]}".encode()
        stores[0].remove(key)
    finally:
        for s in stores:
            s.close()


def check_concurrent_rpc_meta_claims(open_store: OpenStore, prefix: str, clients: int = 8) -> None:
    """Concurrent set() of one rpc_meta key with different bytes: exactly one
    succeeds, every other gets MetadataConflict."""
    key = f"{prefix}/rpc_meta/claimed"
    stores = [open_store() for _ in range(clients)]
    try:
        results = _race(clients, lambda i: stores[i].set(key, f"engine-{i}".encode()))
        ok = [i for i, r in enumerate(results) if r is None]
        conflicts = [r for r in results if isinstance(r, MetadataConflict)]
        assert len(ok) == 1 and len(conflicts) == clients - 1, results
        assert stores[0].get(key) == f"engine-{ok[0]}".encode()
        stores[0].remove(key)
    finally:
        for s in stores:
            s.close()


def check_large_values(open_store: OpenStore, prefix: str, size: int = 1 << 20) -> None:
    """A 1 MiB value (a descriptor with thousands of buffers) survives intact.

    etcd refuses requests above its ``--max-request-bytes`` (1.5 MiB by
    default), so 1 MiB is what every backend must carry with default settings.
    """
    key = f"{prefix}/ram/big"
    value = os.urandom(size)
    with _store(open_store) as s, _store(open_store) as other:
        s.set(key, value)
        assert other.get(key) == value
        assert other.create(key, value[::-1]) is False
        assert other.compare_and_remove(key, value) is True
        assert s.get(key) is None


def check_values_are_exact_bytes(open_store: OpenStore, prefix: str) -> None:
    """Values are not parsed or normalized: the reference's trailing newline,
    whitespace, non-UTF-8 bytes and the empty value come back as written."""
    with _store(open_store) as s:
        for i, value in enumerate(
            [
                b'{"ip_or_host_name":"10.0.0.5","rpc_port":16060}\n',  # jsoncpp FastWriter
                b'  {"a" :  1 }  ',
                bytes(range(256)),
                b"",
            ]
        ):
            key = f"{prefix}/ram/v{i}"
            s.set(key, value)
            got = s.get(key)
            assert got == value, (value[:40], got[:40] if got is not None else None)
            assert s.remove(key)


def check_keys_and_odd_names(open_store: OpenStore, prefix: str) -> None:
    """Keys with ':' '/' spaces, '%', '?', '&', '*' and non-ASCII round-trip,
    and listing (where the backend can) returns exactly the keys under a prefix."""
    names = [
        "10.0.0.1:12345",
        "[fe80::1]:15001",
        "host with space",
        "percent%2Fslash",
        "q?x=1&y=2",
        "star*[glob]",
        "grüße/нода",
    ]
    keys = [f"{prefix}/ram/{n}" for n in names]
    with _store(open_store) as s:
        s.set(f"{prefix}x/ram/outside", b"0")  # shares the text prefix, not the '/' one
        for i, key in enumerate(keys):
            s.set(key, str(i).encode())
        for i, key in enumerate(keys):
            assert s.get(key) == str(i).encode(), key
        listed = s.keys(f"{prefix}/ram/")
        if listed is not None:
            assert listed == sorted(keys), listed
        for key in keys:
            assert s.remove(key), key
        assert s.remove(f"{prefix}x/ram/outside")


def check_engine_key_layout(open_store: OpenStore, prefix: str) -> None:
    """An engine publishes ``mooncake/[cluster/]rpc_meta/<name>`` and
    ``.../ram/<name>`` with the reference's JSON, and removes both on close.

    (``prefix`` becomes the cluster id, so the keys are ``mooncake/<prefix>/...``.)
    """
    cid = prefix.replace("/", "-")
    config = EngineConfig(tcp_bind_address=LOCAL, metadata_cluster_id=cid, connect_timeout_s=1.0)
    with _store(open_store) as s:
        engine = TransferEngine(f"{LOCAL}:1", s, config=config)
        try:
            name = engine.segment_name
            meta_raw = s.get(f"mooncake/{cid}/rpc_meta/{name}")
            seg_raw = s.get(f"mooncake/{cid}/ram/{name}")
            assert meta_raw is not None and seg_raw is not None
            assert decode_rpc_meta(meta_raw, name) == RpcMeta(LOCAL, engine.rpc_port)
            buf = bytearray(4096)
            region = engine.register(buf)
            desc = decode_segment(s.get(f"mooncake/{cid}/ram/{name}") or b"", name)
            assert desc.protocol == "tcp" and desc.name == name
            assert [(b.addr, b.length) for b in desc.buffers] == [(region.addr, 4096)]
        finally:
            engine.close()
        assert s.get(f"mooncake/{cid}/rpc_meta/{name}") is None
        assert s.get(f"mooncake/{cid}/ram/{name}") is None


def check_stale_rpc_meta_is_replaced_live_one_is_not(open_store: OpenStore, prefix: str) -> None:
    """The rpc_meta rewrite rule, end to end: an engine takes over a name whose
    entry points at a dead address, refuses one held by a live engine, and the
    refused engine, closing, leaves the live engine's entries alone."""
    cid = prefix.replace("/", "-")
    config = EngineConfig(tcp_bind_address=LOCAL, metadata_cluster_id=cid, connect_timeout_s=1.0)
    name = f"{LOCAL}:2"
    key = f"mooncake/{cid}/rpc_meta/{name}"
    with _store(open_store) as s:
        # a stale entry: an engine that died without unregistering (port 1 answers nothing)
        s.set(key, dumps_json(encode_rpc_meta(RpcMeta(LOCAL, 1))))
        first = TransferEngine(name, s, config=config)
        try:
            assert decode_rpc_meta(s.get(key) or b"", name).rpc_port == first.rpc_port
            try:
                TransferEngine(name, s, config=config).close()
            except MetadataConflict as exc:
                assert "live engine" in str(exc) and str(first.rpc_port) in str(exc)
            else:
                raise AssertionError("a second engine took the name of a live one")
            # the failed second engine must not have removed the live engine's entries
            assert decode_rpc_meta(s.get(key) or b"", name).rpc_port == first.rpc_port
            assert s.get(f"mooncake/{cid}/ram/{name}") is not None
        finally:
            first.close()
        assert s.get(key) is None


METADATA_CHECKS: list[Callable[[OpenStore, str], None]] = [
    check_get_set_remove,
    check_missing_keys,
    check_create,
    check_compare_and_remove,
    check_rpc_meta_is_claimed_not_overwritten,
    check_concurrent_create,
    check_concurrent_rpc_meta_claims,
    check_large_values,
    check_values_are_exact_bytes,
    check_keys_and_odd_names,
    check_engine_key_layout,
    check_stale_rpc_meta_is_replaced_live_one_is_not,
]
