"""A master with a journal loses no acknowledged object when it is killed and restarted."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from pymooncake import EngineConfig
from pymooncake.errors import MooncakeError
from pymooncake.store import StoreClient, StoreClientConfig
from pymooncake.testing import MasterProxy, ProcessCluster, free_port, journaled_master_flags

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


def test_a_remove_retried_across_a_master_restart_reports_success(tmp_path: Path) -> None:
    """The master removes the object and journals it, the reply is lost, and the
    master is SIGKILLed before the client's retry (same request id) reaches it:
    the restarted master answers that retry from the answer it journaled with
    the removal, not OBJECT_NOT_FOUND (the object is gone either way)."""
    flags = journaled_master_flags(
        tmp_path / "journal", "--client_ttl=5", "--default_kv_lease_ttl=200"
    )
    with ProcessCluster(flags) as cluster, MasterProxy(cluster.master_address) as proxy:
        cluster.node("16 MB")
        client = StoreClient(
            StoreClientConfig(
                "127.0.0.1",
                cluster.metadata_url,
                proxy.address,
                0,
                16 << 20,
                rpc_timeout_s=30,
                engine=EngineConfig(tcp_bind_address="127.0.0.1", connect_timeout_s=2),
            )
        )
        try:
            assert client.put("gone", b"v" * 100)
            assert client.put("kept", b"k" * 100)
            time.sleep(0.3)  # past the read lease of the put
            proxy.refuse()  # the retry finds no master until the restart is over
            proxy.drop_replies("Remove")
            outcome: list[BaseException | None] = []
            remover = threading.Thread(target=lambda: outcome.append(_call(client, "gone")))
            remover.start()
            assert _wait(lambda: proxy.dropped.get("Remove") == 1, 20), "the Remove never ran"
            cluster.restart_master()
            proxy.refuse(False)
            remover.join(40)
            assert not remover.is_alive()
            assert outcome == [None], f"the retried remove failed: {outcome}"
            assert not client.exists("gone")
            assert client.get("kept") == b"k" * 100
        finally:
            client.close()


def _call(client: StoreClient, key: str) -> BaseException | None:
    try:
        client.remove(key)
    except MooncakeError as exc:
        return exc
    return None


def _wait(cond, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False
