"""The SSD tier end to end: offload beyond memory, LOCAL_DISK replicas, reads
served from disk by the owner, promotion, removal, and crash/restart safety
(a master restarted without a journal, a node SIGKILLed mid-offload)."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mooncake._store_types import ReplicaDescriptor
from pymooncake.errors import NoAvailableHandle, ObjectNotFound, StoreError
from pymooncake.store import MasterConfig, StoreClient
from pymooncake.store._file_storage import FileStorage
from pymooncake.testing import LocalCluster
from pymooncake.testing._cluster import ProcessCluster, free_port

MiB = 1 << 20


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def wait_until(cond: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def fast_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOONCAKE_OFFLOAD_HEARTBEAT_INTERVAL_SECONDS", "0.1")


def _cluster(**kw: Any) -> LocalCluster:
    base: dict[str, Any] = {
        "default_kv_lease_ttl_ms": 300,
        "client_ttl_s": 2.0,
        "enable_offload": True,
    }
    base.update(kw)
    return LocalCluster(MasterConfig(**base))


def _put(client: StoreClient, key: str, value: bytes, *, upsert: bool = False) -> None:
    """Put, waiting while memory is full of objects still being offloaded."""
    deadline = time.monotonic() + 30
    while True:
        try:
            if upsert:
                client.upsert(key, value)
            else:
                client.put(key, value)
            return
        except NoAvailableHandle:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _kinds(client: StoreClient, key: str) -> list[str]:
    return sorted("disk" if r.on_disk else "mem" for r in client.replicas(key))


@pytest.fixture
def evict_cluster() -> Iterator[LocalCluster]:
    with _cluster(offload_on_evict=True) as c:
        yield c


def test_offload_on_evict_keeps_everything_beyond_memory(
    evict_cluster: LocalCluster, tmp_path: Path
) -> None:
    owner = evict_cluster.client(8 * MiB, enable_ssd_offload=True, ssd_offload_path=str(tmp_path))
    reader = evict_cluster.client(0)
    values = {f"k{i}": payload(MiB - 7 * i, i) for i in range(24)}  # 3x the memory
    for k, v in values.items():
        _put(owner, k, v)
    disk_only = [k for k in values if _kinds(reader, k) == ["disk"]]
    assert len(disk_only) >= 12, "most objects must have left memory for the disk"
    for k, v in values.items():
        assert reader.get(k) == v
        assert owner.get(k) == v
    assert reader.ssd_reader.reads >= len(disk_only)
    d = reader.replicas(disk_only[0])[0]
    assert d.endpoint == owner.ssd.endpoint and d.size == len(values[disk_only[0]])  # type: ignore[union-attr]
    assert reader.exists(disk_only[0]) and reader.exists_many(disk_only) == [True] * len(disk_only)
    assert reader.size_of(disk_only[0]) == len(values[disk_only[0]])
    # a batch mixing memory and disk objects, into caller memory
    keys = list(values)
    out = reader.get_many(keys)
    assert out == [values[k] for k in keys]
    # the reference's client metrics of the tier: files written, reads served
    assert owner.metrics is not None
    text = owner.metrics.render()
    for name in ("mooncake_ssd_write_ops_total", "mooncake_ssd_read_ops_total"):
        (line,) = [ln for ln in text.splitlines() if ln.startswith(name)]
        assert float(line.split()[-1]) >= len(disk_only), line
    evict_cluster.master.service.state.validate()


def test_eager_offload_adds_disk_replicas_to_memory_objects(tmp_path: Path) -> None:
    with _cluster() as c:
        owner = c.client(32 * MiB, enable_ssd_offload=True, ssd_offload_path=str(tmp_path))
        for i in range(8):
            owner.put(f"e{i}", payload(100_000, i))
        wait_until(lambda: all(_kinds(owner, f"e{i}") == ["disk", "mem"] for i in range(8)))
        assert len(owner.ssd.storage) == 8  # type: ignore[union-attr]
        # the memory copy is read first
        before = owner.ssd_reader.reads
        assert owner.get("e3") == payload(100_000, 3) and owner.ssd_reader.reads == before
        c.master.service.state.validate()


def test_removal_replacement_and_immutability_cover_the_disk_copy(
    evict_cluster: LocalCluster, tmp_path: Path
) -> None:
    owner = evict_cluster.client(4 * MiB, enable_ssd_offload=True, ssd_offload_path=str(tmp_path))
    values = {f"r{i}": payload(MiB, i) for i in range(10)}
    for k, v in values.items():
        _put(owner, k, v)
    disk_only = [k for k in values if _kinds(owner, k) == ["disk"]]
    assert len(disk_only) >= 3
    storage = owner.ssd.storage  # type: ignore[union-attr]
    gone, replaced, kept = disk_only[:3]
    # a put of a key that is on disk is "already exists" (keys are immutable)
    assert owner.put(kept, payload(10, 1)) is False
    assert owner.put_many([kept], [[payload(10, 1)]]) == [False]
    assert owner.get(kept) == values[kept]
    owner.remove(gone)
    with pytest.raises(ObjectNotFound):
        owner.get(gone)
    _put(owner, replaced, b"new value", upsert=True)
    assert owner.get(replaced) == b"new value"
    wait_until(lambda: gone not in storage and replaced not in storage, what="files dropped")
    assert not os.path.exists(storage.path_of(gone))
    # force: objects still pinned by an offload in flight go too (their report is refused)
    assert owner.remove_by_regex("^r[0-9]$", force=True) >= 1
    wait_until(lambda: len(storage) == 0, what="every file dropped after remove_by_regex")
    evict_cluster.master.service.state.validate()


def test_promotion_on_hit(tmp_path: Path) -> None:
    with _cluster(
        offload_on_evict=True, promotion_on_hit=True, promotion_admission_threshold=2
    ) as c:
        owner = c.client(4 * MiB, enable_ssd_offload=True, ssd_offload_path=str(tmp_path))
        reader = c.client(0)
        values = {f"p{i}": payload(MiB, 100 + i) for i in range(8)}
        for k, v in values.items():
            _put(owner, k, v)
        hot = next(k for k in values if _kinds(reader, k) == ["disk"])
        # make room for the promotion (it allocates like a put)
        for k in values:
            if k != hot:
                reader.remove(k, force=True)
        assert reader.get(hot) == values[hot]
        assert reader.get(hot) == values[hot]  # the second hit admits it
        wait_until(lambda: _kinds(reader, hot) == ["disk", "mem"], what="promotion")
        before = reader.ssd_reader.reads
        assert reader.get(hot) == values[hot]
        assert reader.ssd_reader.reads == before, "a promoted object is read from memory"
        assert owner.ssd.stats.promoted == 1  # type: ignore[union-attr]
        c.master.service.state.validate()


def test_bounded_disk_tells_the_master_before_deleting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOONCAKE_OFFLOAD_TOTAL_SIZE_LIMIT_BYTES", str(6 * MiB))
    with _cluster(offload_on_evict=True) as c:
        owner = c.client(4 * MiB, enable_ssd_offload=True, ssd_offload_path=str(tmp_path))
        for i in range(16):
            _put(owner, f"b{i}", payload(MiB, i))
        storage = owner.ssd.storage  # type: ignore[union-attr]
        assert storage.used_bytes <= 6 * MiB and owner.ssd.stats.evicted > 0  # type: ignore[union-attr]
        found = 0
        for i in range(16):
            try:
                assert owner.get(f"b{i}") == payload(MiB, i)
                found += 1
            except ObjectNotFound:
                pass  # evicted from memory and from the bounded disk
        assert found >= 5
        c.master.service.state.validate()


def test_a_master_without_offload_refuses_the_tier(tmp_path: Path) -> None:
    with (
        LocalCluster(MasterConfig(client_ttl_s=2.0)) as c,
        pytest.raises(StoreError, match="enable_offload"),
    ):
        c.client(4 * MiB, enable_ssd_offload=True, ssd_offload_path=str(tmp_path))


# --------------------------------------------------------------------------------
# processes: restarts and crashes
# --------------------------------------------------------------------------------


def _pure_client(pc: ProcessCluster) -> StoreClient:
    return StoreClient(
        pc.client_config(
            local_buffer_size=16 * MiB,
            rpc_timeout_s=20.0,
        )
    )


@pytest.mark.parametrize("journal", [False, True])
def test_ssd_round_trip_across_a_master_restart(tmp_path: Path, journal: bool) -> None:
    """Without a journal the new master knows nothing: the node re-registers its
    files; with one, the disk replicas are replayed (typed disk effects)."""
    port, meta = free_port(), free_port()
    flags = [
        f"--port={port}",
        f"--http_metadata_server_port={meta}",
        "--enable_offload=true",
        "--offload_on_evict=true",
        "--client_ttl=3",
    ]
    if journal:
        flags.append(f"--journal_path={tmp_path / 'master.journal'}")
    env = {
        "MOONCAKE_OFFLOAD_HEARTBEAT_INTERVAL_SECONDS": "0.1",
        "MOONCAKE_OFFLOAD_FILE_STORAGE_PATH": str(tmp_path / "tier"),
    }
    with ProcessCluster(flags, env=env) as pc:
        pc.node("4 MB", flags=["--enable_offload=true"])
        client = _pure_client(pc)
        try:
            values = {f"m{i}": payload(MiB, i) for i in range(12)}
            for k, v in values.items():
                _put(client, k, v)
            disk = [k for k in values if "disk" in _kinds(client, k)]
            assert len(disk) >= 6
            pc.restart_master()  # SIGKILL: no journal, the new master knows nothing
            # the node remounts its segment and re-registers its files
            wait_until(lambda: all(client.exists(k) for k in disk), 30, "re-registration")
            for k in disk:
                assert client.get(k) == values[k]
                assert _kinds(client, k) == ["disk"]
        finally:
            client.close()


def test_node_sigkilled_mid_offload_restarts_with_intact_objects(tmp_path: Path) -> None:
    flags = ["--enable_offload=true", "--offload_on_evict=true", "--client_ttl=2"]
    env = {
        "MOONCAKE_OFFLOAD_HEARTBEAT_INTERVAL_SECONDS": "0.05",
        "MOONCAKE_OFFLOAD_FILE_STORAGE_PATH": str(tmp_path),
    }
    with ProcessCluster(flags, env=env) as pc:
        name = f"127.0.0.1:{free_port()}"
        node, _ = pc.node("8 MB", name=name, flags=["--enable_offload=true"])
        client = _pure_client(pc)
        try:
            values = {f"c{i}": payload(MiB // 2, i) for i in range(40)}
            stored: list[str] = []
            seen_disk = -1
            for k, v in values.items():
                _put(client, k, v)
                stored.append(k)
                if seen_disk < 0 and any("disk" in _kinds(client, s) for s in stored):
                    seen_disk = len(stored)
                if seen_disk >= 0 and len(stored) >= seen_disk + 6:
                    break  # offloads are under way: kill the node in the middle of them
            assert seen_disk >= 0
            node.kill(signal.SIGKILL)
            pc.nodes.remove(node)
            # what the killed node left: complete files only (temporaries are dropped)
            fs = FileStorage(str(tmp_path), verify_checksum=True)
            for entry in fs.open():
                fs.verify(entry.key)
                assert entry.key in values
            assert not [p for p in tmp_path.rglob("*") if ".tmp." in p.name]
            on_disk = set(fs.keys())
            assert on_disk, "nothing was offloaded before the kill"
            pc.node("8 MB", name=name, flags=["--enable_offload=true"])
            wait_until(lambda: all(client.exists(k) for k in on_disk), 30, "re-registration")
            for k in stored:
                try:
                    got = client.get(k)
                except ObjectNotFound:
                    assert k not in on_disk  # its memory copy died with the node
                    continue
                assert got == values[k], f"{k}: wrong bytes after the crash"
        finally:
            client.close()


@pytest.mark.parametrize("same_host", ["1", "0"])
def test_large_and_odd_values_over_both_read_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same_host: str
) -> None:
    """Same host: staged in shared memory (values beyond a slot are streamed);
    PYMOONCAKE_SAME_HOST=0: the TCP read port."""
    with _cluster(offload_on_evict=True) as c:
        owner = c.client(12 * MiB, enable_ssd_offload=True, ssd_offload_path=str(tmp_path))
        monkeypatch.setenv("PYMOONCAKE_SAME_HOST", same_host)
        reader = c.client(0)
        assert reader.ssd_reader.same_host is (same_host == "1")
        sizes = [5 * MiB + 3, 1, 4097, 6 * MiB, MiB, 7 * MiB]
        values = {f"v{i}": payload(n, 50 + i) for i, n in enumerate(sizes)}
        for k, v in values.items():
            _put(owner, k, v)
        disk = [k for k in values if _kinds(reader, k) == ["disk"]]
        assert {"v0", "v3"} <= set(disk)
        got = reader.get_many(list(values))
        assert got == list(values.values())
        bufs = [bytearray(n + 10) for n in sizes]
        res = reader.get_many_into(list(values), [[memoryview(b)] for b in bufs])
        assert res == sizes
        assert all(
            bytes(b[:n]) == values[f"v{i}"]
            for i, (b, n) in enumerate(zip(bufs, sizes, strict=True))
        )


def test_root_fs_dir_disk_replicas_survive_eviction(tmp_path: Path) -> None:
    """--root_fs_dir: every put is also a DISK replica on the shared filesystem;
    evicted objects are read from their files by any client."""
    cfg = MasterConfig(default_kv_lease_ttl_ms=300, client_ttl_s=2.0, root_fs_dir=str(tmp_path))
    with LocalCluster(cfg) as c:
        writer = c.client(8 * MiB)
        reader = c.client(0)
        assert writer.fsdir == os.path.join(str(tmp_path), "mooncake_cluster")
        values = {f"f{i}": payload(MiB - i, i) for i in range(24)}
        for k, v in values.items():
            assert writer.put(k, v) is True
        kinds = {k: sorted(r.kind for r in reader.replicas(k)) for k in values}
        assert all(1 in ks for ks in kinds.values())
        assert sum(1 for ks in kinds.values() if ks == [1]) >= 12  # evicted from memory
        assert reader.get_many(list(values)) == list(values.values())
        evicted = next(k for k, ks in kinds.items() if ks == [1])
        (desc,) = [ReplicaDescriptor(r) for r in reader.replicas(evicted)]
        assert desc.is_disk_replica() and not desc.is_memory_replica()
        path = desc.get_disk_descriptor().file_path
        assert os.path.exists(path) and desc.get_disk_descriptor().object_size == len(
            values[evicted]
        )
        reader.remove(evicted)
        wait_until(lambda: not os.path.exists(path), what="the master deletes the file")
        with pytest.raises(ObjectNotFound):
            reader.get(evicted)
        c.master.service.state.validate()


def test_root_fs_dir_quota_drops_the_oldest_files(tmp_path: Path) -> None:
    cfg = MasterConfig(
        default_kv_lease_ttl_ms=300,
        client_ttl_s=2.0,
        root_fs_dir=str(tmp_path),
        quota_bytes=4 * MiB,
    )
    with LocalCluster(cfg) as c:
        writer = c.client(32 * MiB)
        for i in range(8):
            writer.put(f"q{i}", payload(MiB, i))
        off = c.master.service.state.offload
        assert off.fs_used <= 4 * MiB and list(off.fs_order) == [f"q{i}" for i in range(4, 8)]
        assert writer.get("q0") == payload(MiB, 0)  # still in memory
        wait_until(lambda: sum(1 for p in tmp_path.rglob("*.obj")) == 4, what="old files deleted")
