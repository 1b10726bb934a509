"""``create_copy_task`` / ``create_move_task`` / ``query_task`` of ``mooncake.store``,
as the reference's ``scripts/test_copy_move_api.py`` uses them: three storage
clients (16/16/32 MiB segments named ``127.0.0.1:<port>``) and a coordinator
without a segment, against an in-process master."""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import time
from collections.abc import Iterator

import pytest
from store_support import MiB, Stores, new_cluster

from mooncake.store import (
    MooncakeDistributedStore,
    QueryTaskResponse,
    ReplicateConfig,
    TaskStatus,
    TaskType,
)
from pymooncake.testing import LocalCluster, free_port


@pytest.fixture
def env() -> Iterator[tuple[MooncakeDistributedStore, list[str], Stores]]:
    cluster: LocalCluster = new_cluster()
    stores = Stores(cluster)
    try:
        names = [f"127.0.0.1:{free_port()}" for _ in range(3)]
        for name, size in zip(names, (16 * MiB, 16 * MiB, 32 * MiB), strict=True):
            stores.new(size, 2 * size, hostname=name)
        coordinator = stores.new(0, 32 * MiB, hostname=f"127.0.0.1:{free_port()}")
        yield coordinator, names, stores
    finally:
        stores.close_all()
        cluster.close()


def until_done(store: MooncakeDistributedStore, task_id: tuple[int, int]) -> QueryTaskResponse:
    deadline = time.monotonic() + 30
    while True:
        resp, err = store.query_task(task_id)
        assert err == 0
        assert resp is not None
        if resp.status in (TaskStatus.SUCCESS, TaskStatus.FAILED):
            return resp
        assert time.monotonic() < deadline, resp
        time.sleep(0.05)


def endpoints(store: MooncakeDistributedStore, key: str) -> list[str]:
    return sorted(
        d.get_memory_descriptor().buffer_descriptor.transport_endpoint
        for d in store.get_replica_desc(key)
        if d.is_memory_replica()
    )


def put(store: MooncakeDistributedStore, key: str, value: bytes, *on: str) -> None:
    cfg = ReplicateConfig()
    cfg.replica_num = len(on)
    if len(on) == 1:
        cfg.preferred_segment = on[0]
    else:
        cfg.preferred_segments = list(on)
    assert store.put(key, value, cfg) == 0


def key(prefix: str) -> str:
    return f"{prefix}{random.randrange(1 << 30)}"


def test_basic_copy(env: tuple[MooncakeDistributedStore, list[str], Stores]) -> None:
    store, names, _ = env
    k, value = key("copy"), os.urandom(2 * MiB)
    put(store, k, value, names[0])
    task_id, err = store.create_copy_task(k, names[1:])
    assert err == 0 and isinstance(task_id, tuple) and len(task_id) == 2
    resp = until_done(store, task_id)
    assert resp.status == TaskStatus.SUCCESS, resp
    assert resp.type == TaskType.REPLICA_COPY and resp.id == task_id
    assert resp.created_at_ms_epoch <= resp.last_updated_at_ms_epoch
    assert abs(resp.created_at_ms_epoch / 1000 - time.time()) < 60
    assert "QueryTaskResponse(id=" in repr(resp)
    assert endpoints(store, k) == sorted(names)
    assert store.get(k) == value


def test_basic_move(env: tuple[MooncakeDistributedStore, list[str], Stores]) -> None:
    store, names, _ = env
    k, value = key("move"), os.urandom(2 * MiB)
    put(store, k, value, names[0])
    task_id, err = store.create_move_task(k, names[0], names[1])
    assert err == 0
    resp = until_done(store, task_id)
    assert resp.status == TaskStatus.SUCCESS and resp.type == TaskType.REPLICA_MOVE
    assert endpoints(store, k) == [names[1]]
    assert store.get(k) == value


def test_error_codes(env: tuple[MooncakeDistributedStore, list[str], Stores]) -> None:
    store, names, _ = env
    assert store.create_copy_task("nonexistent_key_x", names[1:]) == ((0, 0), -704)
    assert store.create_move_task("nonexistent_key_x", names[0], names[1])[1] == -704
    k = key("err")
    put(store, k, os.urandom(2048), names[0])
    assert store.create_copy_task(k, ["unknown_segment_1", "unknown_segment_2"])[1] == -600
    assert store.create_move_task(k, "unknown_source_segment", names[1])[1] == -600
    assert store.create_move_task(k, names[0], "unknown_destination_segment")[1] == -600
    assert store.create_move_task(k, names[0], names[0])[1] == -600
    assert store.query_task((1, 2)) == (None, -1400)


def test_copy_to_a_segment_that_holds_it(
    env: tuple[MooncakeDistributedStore, list[str], Stores],
) -> None:
    store, names, _ = env
    k = key("exist")
    put(store, k, os.urandom(2048), *names[:2])
    task_id, err = store.create_copy_task(k, [names[1]])
    assert err == 0
    assert until_done(store, task_id).status == TaskStatus.SUCCESS
    assert endpoints(store, k) == sorted(names[:2])


def test_concurrent_copies_and_moves(
    env: tuple[MooncakeDistributedStore, list[str], Stores],
) -> None:
    store, names, _ = env
    placed = {}
    for i in range(30):
        on = random.choice(names)
        put(store, f"conc{i}", os.urandom(2048), on)
        placed[f"conc{i}"] = on
    with cf.ThreadPoolExecutor(8) as pool:
        copies = {
            k: pool.submit(store.create_copy_task, k, sorted(set(names) - {on}))
            for k, on in list(placed.items())[:15]
        }
        dests = {k: random.choice(sorted(set(names) - {on})) for k, on in list(placed.items())[15:]}
        moves = {k: pool.submit(store.create_move_task, k, placed[k], d) for k, d in dests.items()}
        ids = {k: f.result() for k, f in {**copies, **moves}.items()}
        assert all(err == 0 for _, err in ids.values()), ids
        done = list(pool.map(lambda t: until_done(store, t[0]), ids.values()))
    assert all(r.status == TaskStatus.SUCCESS for r in done), done
    for k in copies:
        assert endpoints(store, k) == sorted(names)
    for k, d in dests.items():
        assert endpoints(store, k) == [d]
