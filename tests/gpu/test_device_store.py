"""The store with device buffers: put_from / get_into / batch_get_into, native and compat."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mooncake.store import MooncakeDistributedStore
from pymooncake import EngineConfig
from pymooncake.store import MasterConfig, StoreClient
from pymooncake.testing import LocalCluster
from pymooncake.transfer.device import DeviceBackend, DeviceSpan

from .conftest import LOCAL, DeviceMem, pattern

MiB = 1 << 20


@pytest.fixture
def cluster(gpu_config: EngineConfig) -> Iterator[LocalCluster]:
    with LocalCluster(MasterConfig(default_kv_lease_ttl_ms=5000), engine=gpu_config) as c:
        yield c


@pytest.fixture
def owner_and_client(cluster: LocalCluster) -> tuple[StoreClient, StoreClient]:
    """``owner`` holds the only segment; ``client`` is a pure client (all its
    replicas are remote: TCP, staged)."""
    return cluster.client(32 * MiB), cluster.client(0)


@pytest.mark.parametrize("size", [1, 4096, MiB + 3])
def test_put_from_and_get_into_device_memory(
    owner_and_client: tuple[StoreClient, StoreClient], mem: DeviceMem, size: int
) -> None:
    owner, client = owner_and_client
    data = pattern(size, size)
    src = mem.alloc(size, 0, data)
    assert client.put_from(f"remote-{size}", src, size)  # device -> remote segment
    dst = mem.alloc(size + 64, 0)
    assert client.get_into(f"remote-{size}", dst, size + 64) == size  # remote -> device
    assert mem.get(dst, size) == data
    # the owner reads its own segment into device memory (a device copy, no socket)
    own = mem.alloc(size, 0)
    assert owner.get_into(f"remote-{size}", own, size) == size
    assert mem.get(own, size) == data
    # and stores from device memory into its own segment
    assert owner.put_from(f"own-{size}", own, size)
    assert client.get(f"own-{size}") == data


def test_registered_device_buffers_and_batches(
    owner_and_client: tuple[StoreClient, StoreClient], backend: DeviceBackend, mem: DeviceMem
) -> None:
    """vLLM's store connector: register the device KV cache once, then batch
    reads into (and writes from) pieces of it."""
    _, client = owner_and_client
    block, count = 64 * 1024, 8
    cache = mem.alloc(block * count, 0)
    client.engine.register(cache, block * count)
    blocks = [pattern(100 + i, block) for i in range(count)]
    for i, b in enumerate(blocks):
        mem.put(cache + i * block, b)
    keys = [f"kv-{i}" for i in range(count)]
    results = client.put_many(keys, [[(cache + i * block, block)] for i in range(count)])
    assert results == [True] * count
    out = mem.alloc(block * count, 0)
    dests = [[DeviceSpan(backend, 0, out + (count - 1 - i) * block, block)] for i in range(count)]
    assert client.get_many_into(keys, dests) == [block] * count
    for i in range(count):
        assert mem.get(out + (count - 1 - i) * block, block) == blocks[i]
    # two parts per key, one on the device and one in host memory
    host = bytearray(block // 2)
    split = mem.alloc(block // 2, 0)
    assert client.get_many_into(keys[:1], [[(split, block // 2), host]]) == [block]
    assert mem.get(split, block // 2) + bytes(host) == blocks[0]


def test_compat_store_with_device_pointers(
    cluster: LocalCluster, mem: DeviceMem, selected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MC_TCP_BIND_ADDRESS", LOCAL)
    monkeypatch.setenv("PYMOONCAKE_DEVICE", selected)
    store = MooncakeDistributedStore()
    rc = store.setup(
        LOCAL, cluster.metadata_url, 16 * MiB, 16 * MiB, "tcp", "", cluster.master_address
    )
    assert rc == 0
    try:
        n = 300_000
        src = mem.alloc(n, 0, pattern(7, n))
        dst = mem.alloc(n, 0)
        assert store.register_buffer(src, n) == 0
        assert store.register_buffer(dst, n) == 0
        assert store.put_from("gpu-key", src, n) == 0
        assert store.get_into("gpu-key", dst, n) == n
        assert mem.get(dst, n) == pattern(7, n)
        half = n // 2
        assert store.batch_put_from(["a", "b"], [src, src + half], [half, half]) == [0, 0]
        assert store.batch_get_into(["b", "a"], [dst, dst + half], [half, half]) == [half, half]
        assert mem.get(dst, n) == pattern(7, n)[half:] + pattern(7, n)[:half]
        assert store.unregister_buffer(src) == 0
        assert store.unregister_buffer(dst) == 0
    finally:
        store.close()
