"""A master with a journal loses no acknowledged object when it is killed and restarted."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pymooncake import EngineConfig
from pymooncake.errors import MooncakeError
from pymooncake.store import StoreClient, StoreClientConfig
from pymooncake.testing import ProcessCluster, free_port

pytestmark = pytest.mark.slow


def _client(cluster: ProcessCluster) -> StoreClient:
    return StoreClient(
        StoreClientConfig(
            "127.0.0.1",
            cluster.metadata_url,
            cluster.master_address,
            0,
            16 << 20,
            rpc_timeout_s=5,
            engine=EngineConfig(
                tcp_bind_address="127.0.0.1", connect_timeout_s=2, transfer_timeout_s=10
            ),
        )
    )


def _eventually(fn, timeout_s: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            return fn()
        except MooncakeError as exc:
            last = exc
            time.sleep(0.2)
    raise AssertionError(f"still failing after {timeout_s} s: {last}")


def test_objects_survive_a_master_sigkill(tmp_path: Path) -> None:
    rpc, meta = free_port(), free_port()
    flags = [
        f"--port={rpc}",
        f"--http_metadata_server_port={meta}",
        f"--journal_path={tmp_path / 'journal'}",
        "--client_ttl=5",
        "--default_kv_lease_ttl=200",
    ]
    with ProcessCluster(flags) as cluster:
        _, segment = cluster.node("32 MB")
        client = _client(cluster)
        try:
            values = {f"k{i}": os.urandom(1000 + i) for i in range(50)}
            for k, v in values.items():
                assert client.put(k, v)
            client.remove("k0", force=True)
            cluster.restart_master()  # SIGKILL, then the same flags
            # the node and the client notice the restart within a heartbeat and
            # re-publish their descriptors; every acknowledged object is back
            for k, v in values.items():
                if k == "k0":
                    continue
                assert _eventually(lambda k=k: client.get(k)) == v
            assert not client.exists("k0")  # the removal was journaled too
            assert client.put("after-restart", b"new")
            assert client.replicas("after-restart")[0].endpoint == segment
        finally:
            client.close()


def test_without_a_journal_the_index_is_lost_like_the_reference(tmp_path: Path) -> None:
    rpc, meta = free_port(), free_port()
    flags = [f"--port={rpc}", f"--http_metadata_server_port={meta}", "--client_ttl=5"]
    with ProcessCluster(flags) as cluster:
        cluster.node("16 MB")
        client = _client(cluster)
        try:
            assert client.put("k", b"v")
            cluster.restart_master()
            _eventually(lambda: client.exists("x"))  # master reachable again
            assert not client.exists("k")
            # and the pool works again once the node has re-mounted its segment
            assert _eventually(lambda: client.put("k2", b"v2")) is True
        finally:
            client.close()
