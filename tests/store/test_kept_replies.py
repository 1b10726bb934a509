"""Mutations whose retry would be answered differently once they acted keep
their answer with the state (``ReplyKept``), so a retry that reaches a
restarted master gets the first answer.

Each test loses the master's reply to one request (``MasterProxy``), SIGKILLs
the master before the client's retry (same request id) reaches it, and restarts
it from its journal: the reply cache died with the process.  Without the kept
answer, a retried unmount is SEGMENT_NOT_FOUND (and the client would keep the
segment it withdrew), a retried replica clear reports no key cleared, and a
retried task creation queues a second task that fails once the first ran.
The removal family is covered by ``test_master_journal.py``; across a failover,
by ``tests/ha/test_failover.py`` (the stream carries the same effect).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pymooncake import EngineConfig
from pymooncake.errors import MooncakeError
from pymooncake.store import ReplicateConfig, StoreClient, StoreClientConfig
from pymooncake.store._tasks import TaskStatus
from pymooncake.testing import MasterProxy, ProcessCluster, journaled_master_flags

pytestmark = pytest.mark.slow

MiB = 1 << 20


@dataclass
class Setup:
    cluster: ProcessCluster
    proxy: MasterProxy
    client: StoreClient  # through the proxy
    nodes: tuple[str, str]  # the storage nodes' segment names


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    flags = journaled_master_flags(
        tmp_path / "journal", "--client_ttl=5", "--default_kv_lease_ttl=200"
    )
    with ProcessCluster(flags) as cluster, MasterProxy(cluster.master_address) as proxy:
        # engines find each other without the master's metadata server: a
        # restarted master's is empty until every engine re-published, and a
        # task handed out meanwhile would fail on that, not on what is tested
        p2p = ["--metadata_server=P2PHANDSHAKE"]
        _, a = cluster.node("16 MB", flags=p2p)
        _, b = cluster.node("16 MB", flags=p2p)
        client = StoreClient(
            StoreClientConfig(
                "127.0.0.1",
                "P2PHANDSHAKE",
                proxy.address,
                16 * MiB,
                16 * MiB,
                rpc_timeout_s=30,
                prefault=False,
                engine=EngineConfig(
                    tcp_bind_address="127.0.0.1", connect_timeout_s=2, transfer_timeout_s=10
                ),
            )
        )
        try:
            yield Setup(cluster, proxy, client, (a, b))
        finally:
            client.close()


def _wait(cond: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def _retried_across_a_restart(s: Setup, method: str, call: Callable[[], Any]) -> Any:
    """Run ``call`` with the reply to ``method`` lost and the master restarted
    before the retry; returns what ``call`` returned (raises what it raised)."""
    s.proxy.refuse()  # the retry finds no master until the restart is over
    s.proxy.drop_replies(method)
    outcome: list[Any] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except MooncakeError as exc:
            failed.append(exc)

    caller = threading.Thread(target=run)
    caller.start()
    assert _wait(lambda: s.proxy.dropped.get(method) == 1, 20), f"the {method} never ran"
    s.cluster.restart_master()
    s.proxy.refuse(False)
    caller.join(45)
    assert not caller.is_alive(), f"the retried {method} never returned"
    if failed:
        raise failed[0]
    return outcome[0]


def _put_on(s: Setup, key: str, segment: str) -> None:
    assert s.client.put(key, b"v" * 1000, ReplicateConfig(preferred_segments=(segment,)))
    assert [r.endpoint for r in s.client.replicas(key)] == [segment]


def _finished(s: Setup, task_id: tuple[int, int]) -> TaskStatus:
    def done() -> bool:
        try:
            return s.client.query_task(task_id).status in (TaskStatus.SUCCESS, TaskStatus.FAILED)
        except MooncakeError:
            return False  # the master is still coming back

    assert _wait(done, 30), f"task {task_id} never finished"
    return TaskStatus(s.client.query_task(task_id).status)


def test_a_retried_unmount_succeeds(setup: Setup) -> None:
    s = setup
    (info,) = s.client.segments
    _retried_across_a_restart(s, "UnmountSegment", lambda: s.client.unmount(info.id))
    assert s.client.segments == ()  # withdrawn here too: no remount brings it back


def test_a_retried_replica_clear_reports_the_keys_it_cleared(setup: Setup) -> None:
    s = setup
    assert s.client.put("cleared", b"c" * 1000)
    assert s.client.put("stays", b"s" * 1000)
    time.sleep(0.3)  # past the put's read lease
    keys = _retried_across_a_restart(
        s, "BatchReplicaClear", lambda: s.client.replica_clear_many(["cleared"])
    )
    assert keys == ["cleared"]
    assert not s.client.exists("cleared")
    assert s.client.get("stays") == b"s" * 1000


@pytest.mark.parametrize("kind", ["copy", "move"])
def test_a_retried_task_creation_queues_one_task(setup: Setup, kind: str) -> None:
    s = setup
    source, target = s.nodes
    _put_on(s, "t", source)
    if kind == "copy":
        create = lambda: s.client.create_copy_task("t", [target])  # noqa: E731
        method, want = "CreateCopyTask", [source, target]
    else:
        create = lambda: s.client.create_move_task("t", source, target)  # noqa: E731
        method, want = "CreateMoveTask", [target]
    task_id = _retried_across_a_restart(s, method, create)
    assert _finished(s, task_id) == TaskStatus.SUCCESS, s.client.query_task(task_id)
    assert sorted(r.endpoint for r in s.client.replicas("t")) == sorted(want)
    assert s.client.get("t") == b"v" * 1000
