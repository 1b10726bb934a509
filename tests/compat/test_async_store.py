"""``mooncake.async_store.MooncakeDistributedStoreAsync``: every method as a coroutine."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Iterator

import pytest
from store_support import LOCAL, MiB, new_cluster

from mooncake.async_store import ASYNC_METHODS, MooncakeDistributedStoreAsync
from mooncake.store import MooncakeDistributedStore
from pymooncake.testing import LocalCluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with new_cluster() as c:
        yield c


@pytest.fixture
def store(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> Iterator[MooncakeDistributedStoreAsync]:
    monkeypatch.setenv("MC_TCP_BIND_ADDRESS", LOCAL)
    s = MooncakeDistributedStoreAsync(max_workers=4)
    rc = s.setup(LOCAL, cluster.metadata_url, 16 * MiB, 16 * MiB, "tcp", "", cluster.master_address)
    assert rc == 0
    yield s
    assert s.close() == 0


def test_every_public_method_has_a_coroutine() -> None:
    public = [
        n
        for n in dir(MooncakeDistributedStore)
        if not n.startswith("_") and callable(getattr(MooncakeDistributedStore, n))
    ]
    assert sorted(public) == sorted(ASYNC_METHODS)
    for name in [
        "put",
        "get",
        "put_tensor",
        "get_tensor_with_parallelism",
        "batch_put_session_start",
        "remove_all",
        "setup",
        "close",
    ]:
        method = getattr(MooncakeDistributedStoreAsync, f"async_{name}")
        assert inspect.iscoroutinefunction(method), name
        assert method.__name__ == f"async_{name}"
    with pytest.raises(AttributeError):
        _ = MooncakeDistributedStoreAsync().async_no_such_method  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        MooncakeDistributedStoreAsync(max_workers=0)


def test_async_calls_return_what_the_sync_calls_return(
    store: MooncakeDistributedStoreAsync,
) -> None:
    async def run() -> None:
        assert await store.async_put("a", b"hello") == 0
        assert await store.async_get("a") == b"hello"
        assert await store.async_is_exist("a") == 1
        assert await store.async_batch_is_exist(["a", "missing"]) == [1, 0]
        assert await store.async_put_batch(["b", "c"], [b"1", b"22"]) == 0
        assert await store.async_get_batch(["b", "c"]) == [b"1", b"22"]
        assert await store.async_get_size("c") == 2
        assert await store.async_get("missing") == b""
        assert await store.async_remove("missing") == -704
        assert await store.async_remove_by_regex("^[bc]$", True) == 2
        assert await store.async_remove_all(True) >= 1

    asyncio.run(run())


def test_calls_run_concurrently_on_a_bounded_pool(store: MooncakeDistributedStoreAsync) -> None:
    seen: set[str] = set()
    lock = threading.Lock()
    original = store.is_exist

    def slow_is_exist(key: str) -> int:
        with lock:
            seen.add(threading.current_thread().name)
        time.sleep(0.05)
        return original(key)

    store.is_exist = slow_is_exist  # type: ignore[method-assign]

    async def run() -> float:
        start = time.perf_counter()
        results = await asyncio.gather(*(store.async_is_exist(f"k{i}") for i in range(8)))
        assert results == [0] * 8
        return time.perf_counter() - start

    elapsed = asyncio.run(run())
    assert elapsed < 8 * 0.05  # ran side by side
    assert len(seen) <= 4 and all(
        n.startswith("mc-store-async") for n in seen
    )  # never more than max_workers


def test_event_loop_stays_responsive(store: MooncakeDistributedStoreAsync) -> None:
    """A call that blocks its thread for 0.2 s does not block the loop."""
    original = store.get

    def slow_get(key: str) -> bytes:
        time.sleep(0.2)
        return original(key)

    store.get = slow_get  # type: ignore[method-assign]

    async def run() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        task = asyncio.create_task(ticker())
        assert await store.async_put("r", b"x") == 0
        assert await store.async_get("r") == b"x"
        task.cancel()
        return ticks

    assert asyncio.run(run()) >= 10


def test_async_close_from_the_pool_does_not_deadlock(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MC_TCP_BIND_ADDRESS", LOCAL)
    s = MooncakeDistributedStoreAsync(max_workers=2)
    assert (
        s.setup(LOCAL, cluster.metadata_url, 16 * MiB, 16 * MiB, "tcp", "", cluster.master_address)
        == 0
    )

    async def run() -> int:
        assert await s.async_put("z", b"1") == 0
        return await s.async_close()

    assert asyncio.run(run()) == 0
    assert s.close() == 0  # idempotent; the pool is gone
