"""``mooncake.store.MooncakeDistributedStore``: every method and its return convention.

The reference's Python store API (``store_py.cpp``; research notes in
``shared/reference/store.md`` sections 7-8) returns ints instead of raising:
0 / negative ``ErrorCode`` for writes, byte counts for reads, ``b""`` for a
missing key, 1/0 from ``is_exist``, ``None`` for a missing buffer handle,
per-key lists from batch calls.  These tests pin those conventions against a
real master (an in-process :class:`pymooncake.testing.LocalCluster`); the
scenarios follow the reference's own ``mooncake-wheel/tests/
test_distributed_object_store.py`` and ``test_replicated_distributed_object_store.py``
(written anew here, with short leases instead of the reference's sleeps).
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from store_support import LEASE_MS, LOCAL, MiB, Stores, addr, new_cluster, pattern

import mooncake
import mooncake.buffer_pool
import mooncake.store as mstore
from mooncake.engine import TransferEngine
from mooncake.store import (
    BufferPool,
    MooncakeDistributedStore,
    MooncakeHostMemAllocator,
    ObjectDataType,
    RegisteredBufferPool,
    ReplicaStatus,
    ReplicateConfig,
    SoftPinAction,
)
from pymooncake.testing import LocalCluster, wait_until

# ErrorCode values (mooncake-store/include/types.h) and transfer-engine ERR_* codes
NO_AVAILABLE_HANDLE = -200
INVALID_PARAMS = -600
OBJECT_NOT_FOUND = -704
OBJECT_HAS_LEASE = -706
ERR_ADDRESS_NOT_REGISTERED = -3
ERR_ADDRESS_OVERLAPPED = -7
#: the reference's --max_kv_soft_pin_ttl default (24 h)
MAX_SOFT_PIN_TTL_MS = 86_400_000


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with new_cluster() as c:
        yield c


@pytest.fixture
def stores(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stores]:
    monkeypatch.setenv("MC_TCP_BIND_ADDRESS", LOCAL)  # engines advertise loopback
    made = Stores(cluster)
    try:
        yield made
    finally:
        made.close_all()


@pytest.fixture
def store(stores: Stores) -> MooncakeDistributedStore:
    return stores.new()


def setup_args(cluster: LocalCluster, segment: int = 16 * MiB, local: int = 16 * MiB) -> tuple:
    return (LOCAL, cluster.metadata_url, segment, local, "tcp", "", cluster.master_address)


def config_dict(cluster: LocalCluster, segment: object, local: object) -> dict[str, object]:
    return {
        "local_hostname": LOCAL,
        "metadata_server": cluster.metadata_url,
        "global_segment_size": segment,
        "local_buffer_size": local,
        "protocol": "tcp",
        "rdma_devices": "",
        "master_server_addr": cluster.master_address,
    }


# ----------------------------------------------------------------------------------------
# module surface, ReplicateConfig
# ----------------------------------------------------------------------------------------


def test_module_constants_and_reexports() -> None:
    assert [(m.name, int(m)) for m in ReplicaStatus] == [
        ("UNDEFINED", 0),
        ("INITIALIZED", 1),
        ("PROCESSING", 2),
        ("COMPLETE", 3),
        ("REMOVED", 4),
        ("FAILED", 5),
    ]
    assert [(m.name, int(m)) for m in SoftPinAction] == [
        ("PRESERVE", 0),
        ("ENABLE", 1),
        ("DISABLE", 2),
    ]
    names = [
        "UNKNOWN",
        "KVCACHE",
        "TENSOR",
        "WEIGHT",
        "SAMPLE",
        "ACTIVATION",
        "GRADIENT",
        "OPTIMIZER_STATE",
        "METADATA",
        "GENERAL",
    ]
    assert [(m.name, int(m)) for m in ObjectDataType] == [(n, i) for i, n in enumerate(names)]
    # pybind's export_values(): enum members are module attributes too
    for n in names:
        assert getattr(mstore, n) is ObjectDataType[n]
    for status in ReplicaStatus:
        assert getattr(mstore, status.name) is status
    # BufferPool is reachable the three ways the reference exposes it
    from mooncake import BufferPool as TopBufferPool
    from mooncake import RegisteredBufferPool as TopRegisteredBufferPool

    assert TopBufferPool is BufferPool is mooncake.buffer_pool.BufferPool
    assert TopRegisteredBufferPool is RegisteredBufferPool
    with pytest.raises(AttributeError):
        _ = mooncake.NoSuchThing  # type: ignore[attr-defined]


def test_replicate_config_defaults_types_and_str() -> None:
    config = ReplicateConfig()
    assert config.replica_num == 1
    assert config.soft_pin_action == SoftPinAction.PRESERVE
    assert config.soft_pin_ttl_ms is None
    assert config.with_hard_pin is False
    assert config.preferred_segment == ""
    assert config.preferred_segments == []
    assert config.group_ids is None
    assert config.data_type == ObjectDataType.UNKNOWN

    config.replica_num = 3
    config.soft_pin_action = SoftPinAction.ENABLE
    config.preferred_segment = "node1:12345"
    config.preferred_segments = ["node2:1", "node3:2"]
    config.with_hard_pin = True
    config.group_ids = ["g", ""]
    assert (config.replica_num, config.soft_pin_action) == (3, SoftPinAction.ENABLE)
    assert config.preferred_segment == "node1:12345"
    assert config.group_ids == ["g", ""]

    # soft_pin_ttl_ms is std::optional<uint64_t>: None or an unsigned 64-bit int
    config.soft_pin_ttl_ms = 1000
    assert config.soft_pin_ttl_ms == 1000
    config.soft_pin_ttl_ms = None
    assert config.soft_pin_ttl_ms is None
    for bad in (-1, 1 << 64, "1000", 1.5):
        with pytest.raises(TypeError):
            config.soft_pin_ttl_ms = bad  # type: ignore[assignment]
    assert config.soft_pin_ttl_ms is None
    with pytest.raises(TypeError):
        config.replica_num = "2"  # type: ignore[assignment]
    with pytest.raises(TypeError):
        config.replica_num = -1
    with pytest.raises(TypeError):
        config.preferred_segment = 5  # type: ignore[assignment]
    with pytest.raises(TypeError):
        config.preferred_segments = ["ok", 7]  # type: ignore[list-item]

    config.soft_pin_ttl_ms = 1234
    text = str(config)
    assert isinstance(text, str)
    assert "replica_num: 3" in text
    assert "ENABLE" in text
    assert "1234" in text


# ----------------------------------------------------------------------------------------
# setup / close / health
# ----------------------------------------------------------------------------------------


def test_setup_positional_auto_port_health_and_close(cluster: LocalCluster, stores: Stores) -> None:
    store = stores.track(MooncakeDistributedStore())
    assert store.health_check() == 1  # not set up yet
    assert store.setup(*setup_args(cluster)) == 0
    # no port given: one is picked in [MC_STORE_CLIENT_MIN_PORT, MC_STORE_CLIENT_MAX_PORT]
    host, port = store.get_hostname().rsplit(":", 1)
    assert host == LOCAL
    assert 12300 <= int(port) <= 14300
    assert store.health_check() == 0
    assert store.put("setup_key", b"value") == 0
    assert store.get("setup_key") == b"value"

    assert store.close() == 0
    assert store.health_check() == 1
    assert store.close() == 0  # idempotent
    # calls on a closed store fail with codes, not exceptions
    assert store.put("setup_key2", b"x") < 0
    assert store.get("setup_key") == b""
    assert store.is_exist("setup_key") < 0
    closed = store.batch_is_exist(["a", "b"])
    assert len(closed) == 2
    assert all(r < 0 for r in closed)

    # re-setup on the same object works; the old segment (and its object) is gone
    assert store.setup(*setup_args(cluster)) == 0
    assert store.health_check() == 0
    assert store.get("setup_key") == b""
    assert store.put("setup_key", b"again") == 0
    assert store.get("setup_key") == b"again"


def test_setup_keywords(cluster: LocalCluster, stores: Stores) -> None:
    store = stores.track(MooncakeDistributedStore())
    rc = store.setup(
        *setup_args(cluster),
        tenant_id="tenant-a",
        enable_client_http_server=False,
        client_http_port=9300,
        ssd_offload_path="",
        enable_ssd_offload=False,
    )
    assert rc == 0
    assert store.put("kw_key", b"kw") == 0
    assert store.close() == 0

    # SGLang relies on this: an unknown keyword raises TypeError naming it
    with pytest.raises(TypeError, match="bogus_option"):
        store.setup(*setup_args(cluster), bogus_option=True)
    assert store.health_check() == 1
    with pytest.raises(TypeError):
        store.setup(LOCAL, cluster.metadata_url)  # the first seven are required
    # SSD offload needs a master started with --enable_offload: a non-zero code
    ssd = tempfile.mkdtemp(prefix="ssd-")
    try:
        assert store.setup(*setup_args(cluster), enable_ssd_offload=True, ssd_offload_path=ssd) != 0
    finally:
        shutil.rmtree(ssd, ignore_errors=True)
    assert store.health_check() == 1


def test_setup_reuses_a_transfer_engine(cluster: LocalCluster, stores: Stores) -> None:
    engine = TransferEngine()
    assert engine.initialize(LOCAL, "P2PHANDSHAKE", "tcp", "") == 0
    try:
        session = f"{LOCAL}:{engine.get_rpc_port()}"
        store = stores.track(MooncakeDistributedStore())
        args = setup_args(cluster)
        # positional (SGLang) ...
        assert store.setup(session, *args[1:], engine.get_engine()) == 0
        assert store.get_hostname() == session
        assert store.put("reuse_key", b"through the shared engine") == 0
        assert store.get("reuse_key") == b"through the shared engine"
        assert store.close() == 0
        # ... and keyword form; the engine outlives the store
        assert store.setup(session, *args[1:], engine=engine.get_engine()) == 0
        assert store.get_hostname() == session
        assert store.put("reuse_key2", b"again") == 0
        assert store.get("reuse_key2") == b"again"
        assert store.close() == 0
        assert engine.get_rpc_port() == int(session.rsplit(":", 1)[1])
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("segment", "local"), [("16MB", "16 MB"), ("1gb", "16MB"), (16 * MiB, "4 mb")]
)
def test_setup_dict_human_sizes(
    cluster: LocalCluster, stores: Stores, segment: object, local: object
) -> None:
    store = stores.track(MooncakeDistributedStore())
    assert store.setup(config_dict(cluster, segment, local)) == 0
    key = f"dict_key_{segment}_{local}"
    assert store.put(key, b"config dict value") == 0
    assert store.get(key) == b"config dict value"


@pytest.mark.parametrize(("segment", "local"), [("50%", "16MB"), ("16MB", "50%"), ("lots", 0)])
def test_setup_dict_unsupported_size_returns_nonzero(
    cluster: LocalCluster, stores: Stores, segment: object, local: object
) -> None:
    store = stores.track(MooncakeDistributedStore())
    assert store.setup(config_dict(cluster, segment, local)) != 0
    assert store.health_check() == 1


@pytest.mark.parametrize("var", ["PYMOONCAKE_RPC_SPIN_US", "PYMOONCAKE_GIL_HOLD_US"])
def test_setup_with_a_bad_wait_setting_returns_nonzero(
    cluster: LocalCluster,
    stores: Stores,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    var: str,
) -> None:
    monkeypatch.setenv(var, "fast")
    store = stores.track(MooncakeDistributedStore())
    with caplog.at_level(logging.ERROR):
        assert store.setup(*setup_args(cluster)) != 0
    assert f"{var}='fast'" in caplog.text
    assert store.health_check() == 1


def test_setup_dict_missing_hostname_returns_nonzero(cluster: LocalCluster, stores: Stores) -> None:
    store = stores.track(MooncakeDistributedStore())
    cfg = config_dict(cluster, "16MB", "16MB")
    del cfg["local_hostname"]
    assert store.setup(cfg) != 0


def test_health_check_reports_unreachable_master(stores: Stores) -> None:
    with new_cluster() as lonely:
        store = stores.track(MooncakeDistributedStore())
        assert store.setup(*setup_args(lonely, segment=MiB, local=MiB)) == 0
        assert store.health_check() == 0
    assert store.health_check() == 2  # master gone
    assert store.close() == 0  # still closes cleanly (and logs why unmount failed)


def test_full_client_has_no_mem_pool_and_dummies_need_a_real_client(
    store: MooncakeDistributedStore,
) -> None:
    # a real client has no shared memory pool (reference RealClient returns 0 too)
    assert store.alloc_from_mem_pool(4096) == 0
    other = MooncakeDistributedStore()
    assert other.setup_dummy(16 * MiB, 16 * MiB, f"{LOCAL}:1") != 0
    assert other.close() == 0


# ----------------------------------------------------------------------------------------
# bytes API
# ----------------------------------------------------------------------------------------


def test_put_get_size_exist_and_no_overwrite(store: MooncakeDistributedStore) -> None:
    data = b"Hello, World!"
    assert store.put("basic_key", data) == 0
    assert store.get_size("basic_key") == len(data)
    assert store.get("basic_key") == data
    assert isinstance(store.get("basic_key"), bytes)
    assert store.is_exist("basic_key") == 1
    # keys are immutable: a second put succeeds and changes nothing
    assert store.put("basic_key", b"something else entirely") == 0
    assert store.get("basic_key") == data
    assert store.get_size("basic_key") == len(data)

    # misses: b"" (not None), 0, and the ErrorCode
    assert store.get("basic_missing") == b""
    assert store.is_exist("basic_missing") == 0
    assert store.get_size("basic_missing") == OBJECT_NOT_FOUND

    # any buffer is a value
    array = np.arange(1000, dtype=np.int32)
    assert store.put("basic_numpy", array) == 0
    assert store.get("basic_numpy") == array.tobytes()
    assert store.put("basic_view", memoryview(bytearray(b"view bytes"))[5:]) == 0
    assert store.get("basic_view") == b"bytes"
    # keyword names as in the reference signature
    assert store.put(key="basic_kw", value=b"kw", config=ReplicateConfig()) == 0
    with pytest.raises(TypeError):
        store.put(key_arg_name_error="basic_kw", value=b"kw")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        store.put(key="basic_kw", value=b"kw", config_arg_name_error=None)  # type: ignore[call-arg]


def test_remove_codes_and_read_lease(store: MooncakeDistributedStore) -> None:
    assert store.put("lease_key", b"leased") == 0
    assert store.remove("lease_missing") == OBJECT_NOT_FOUND
    # is_exist/get grant a read lease: remove fails until it runs out (or with force)
    assert store.is_exist("lease_key") == 1
    assert store.remove("lease_key") == OBJECT_HAS_LEASE
    assert store.is_exist("lease_key") == 1
    assert wait_until(lambda: store.remove("lease_key") == 0, timeout_s=LEASE_MS / 1000 * 6)
    assert store.is_exist("lease_key") == 0
    assert store.get("lease_key") == b""

    assert store.put("lease_key2", b"leased") == 0
    assert store.get("lease_key2") == b"leased"
    assert store.remove("lease_key2") == OBJECT_HAS_LEASE
    assert store.remove("lease_key2", force=True) == 0
    assert store.remove("lease_key2", force=True) == OBJECT_NOT_FOUND


def test_remove_by_regex_batch_remove_remove_all(store: MooncakeDistributedStore) -> None:
    for name in ("rx_a1", "rx_a2", "rx_a3", "rx_b1", "rx_b2", "rx_c1"):
        assert store.put(name, name.encode()) == 0
    assert store.remove_by_regex("^rx_a", force=True) == 3
    assert store.batch_is_exist(["rx_a1", "rx_a2", "rx_a3", "rx_b1"]) == [0, 0, 0, 1]
    assert store.remove_by_regex("^no_such_prefix") == 0
    assert store.remove_by_regex("(unclosed") < 0

    assert store.batch_remove(["rx_b1", "rx_missing", "rx_b2"], force=True) == [
        0,
        OBJECT_NOT_FOUND,
        0,
    ]
    assert store.batch_remove([]) == []

    # without force, remove_all skips leased objects and counts what it removed
    assert store.put("rx_d1", b"d") == 0
    assert store.is_exist("rx_c1") == 1  # leased now
    # (objects of earlier tests went away with their stores' segments)
    assert store.remove_all() == 1  # rx_d1
    assert store.is_exist("rx_d1") == 0
    assert store.is_exist("rx_c1") == 1
    assert store.remove_all(force=True) == 1  # rx_c1
    assert store.is_exist("rx_c1") == 0


def test_put_parts_put_batch_get_batch(store: MooncakeDistributedStore) -> None:
    parts = (b"head|", bytearray(b"body|"), memoryview(b"tail"), np.frombuffer(b"|np", np.uint8))
    assert store.put_parts("parts_key", *parts) == 0
    assert store.get("parts_key") == b"head|body|tail|np"
    cfg = ReplicateConfig()
    assert store.put_parts("parts_key2", b"a", b"b", config=cfg) == 0
    assert store.get("parts_key2") == b"ab"

    keys = ["batch_k1", "batch_k2", "batch_k3"]
    values = [b"Batch Data 1", b"Batch Data 22", b"Batch Data 333"]
    assert store.put_batch(keys, values) == 0
    assert store.put_batch(keys=["batch_k4"], values=[b"four"], config=cfg) == 0
    assert store.get_batch([*keys, "batch_missing", "batch_k4"]) == [
        *values,
        b"",
        b"four",
    ]


def test_invalid_keys_and_values(store: MooncakeDistributedStore) -> None:
    # the reference rejects empty keys and 0-byte objects (SGLang skips 0-size buffers for this)
    assert store.put("", b"value") == INVALID_PARAMS
    assert store.put("empty_value_key", b"") == INVALID_PARAMS
    assert store.is_exist("empty_value_key") == 0
    buf = np.zeros(64, np.uint8)
    assert store.register_buffer(addr(buf), buf.nbytes) == 0
    assert store.batch_put_from(["zero_size_key", "ok_size_key"], [addr(buf)] * 2, [0, 8]) == [
        INVALID_PARAMS,
        0,
    ]
    assert store.unregister_buffer(addr(buf)) == 0
    # empty batches give empty results
    assert store.get_batch([]) == []
    assert store.batch_is_exist([]) == []
    assert store.batch_upsert_from([], [], []) == []
    assert store.batch_put_from_multi_buffers([], [], []) == []
    assert store.batch_get_into_multi_buffers([], [], []) == []


def test_pool_without_segments_is_full(cluster: LocalCluster, stores: Stores) -> None:
    pure = stores.track(MooncakeDistributedStore())
    assert pure.setup(*setup_args(cluster, segment=0)) == 0  # contributes no memory
    assert pure.put("pure_key", b"nowhere to go") == NO_AVAILABLE_HANDLE
    assert pure.is_exist("pure_key") == 0
    stores.new(segment=MiB)  # someone mounts a segment: the pure client can write
    assert pure.put("pure_key", b"somewhere") == 0
    assert pure.get("pure_key") == b"somewhere"


def test_zero_local_buffer_fails_bytes_put(cluster: LocalCluster, stores: Stores) -> None:
    store = stores.track(MooncakeDistributedStore())
    assert store.setup(*setup_args(cluster, local=0)) == 0
    assert store.put("zero_buffer_key", b"test_zero_buffer_value") != 0
    assert store.is_exist("zero_buffer_key") == 0
    # zero-copy calls do not need the local buffer
    buf = np.frombuffer(bytearray(b"zero copy still works"), np.uint8)
    assert store.register_buffer(addr(buf), buf.nbytes) == 0
    assert store.put_from("zero_buffer_key", addr(buf), buf.nbytes) == 0
    out = np.zeros(64, np.uint8)
    assert store.register_buffer(addr(out), out.nbytes) == 0
    assert store.get_into("zero_buffer_key", addr(out), out.nbytes) == buf.nbytes
    assert out[: buf.nbytes].tobytes() == buf.tobytes()
    assert store.unregister_buffer(addr(out)) == 0
    assert store.unregister_buffer(addr(buf)) == 0


def test_concurrent_calls_from_threads(store: MooncakeDistributedStore) -> None:
    """Clients call the store from thread pools and asyncio.to_thread."""

    def worker(t: int) -> list[bool]:
        ok = []
        for i in range(15):
            key = f"thread_{t}_{i}"
            value = pattern(1000 + 37 * i, seed=t * 100 + i)
            ok.append(store.put(key, value) == 0)
            ok.append(store.get(key) == value)
            ok.append(store.batch_is_exist([key, f"thread_{t}_missing"]) == [1, 0])
        return ok

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(worker, range(6)))
    assert all(all(r) for r in results)


# ----------------------------------------------------------------------------------------
# registered memory: register_buffer, put_from/get_into and their batches
# ----------------------------------------------------------------------------------------


def test_register_unregister_codes(store: MooncakeDistributedStore) -> None:
    buf = np.zeros(MiB, np.uint8)
    p = addr(buf)
    assert store.register_buffer(p, buf.nbytes) == 0
    assert store.register_buffer(p + 4096, 100) == ERR_ADDRESS_OVERLAPPED
    assert store.unregister_buffer(p + 4096) == ERR_ADDRESS_NOT_REGISTERED
    assert store.unregister_buffer(p) == 0
    assert store.unregister_buffer(p) == ERR_ADDRESS_NOT_REGISTERED
    assert store.register_buffer(p, buf.nbytes) == 0  # again after unregistering
    assert store.unregister_buffer(p) == 0


def test_put_from_get_into(store: MooncakeDistributedStore) -> None:
    data = b"Hello, Zero-Copy World! " * 1000  # ~24 KB
    buffer_size = len(data) + 1024
    buffer = (ctypes.c_ubyte * buffer_size)()
    ptr = ctypes.addressof(buffer)
    assert store.register_buffer(ptr, buffer_size) == 0
    ctypes.memmove(buffer, data, len(data))

    assert store.put_from("zero_copy_key", ptr, len(data)) == 0
    assert store.get("zero_copy_key") == data
    assert store.put_from("zero_copy_key", ptr, 10, ReplicateConfig()) == 0  # exists: no-op

    ctypes.memset(buffer, 0, buffer_size)
    assert store.get_into("zero_copy_key", ptr, buffer_size) == len(data)
    assert bytes(buffer[: len(data)]) == data
    assert bytes(buffer[len(data) :]) == bytes(buffer_size - len(data))  # nothing past the object

    small_size = len(data) // 2
    small = (ctypes.c_ubyte * small_size)()
    assert store.register_buffer(ctypes.addressof(small), small_size) == 0
    assert store.get_into("zero_copy_key", ctypes.addressof(small), small_size) < 0
    assert store.get_into("zero_copy_missing", ptr, buffer_size) == OBJECT_NOT_FOUND

    assert store.unregister_buffer(ptr) == 0
    assert store.unregister_buffer(ctypes.addressof(small)) == 0
    assert store.remove("zero_copy_key", force=True) == 0


def test_batch_get_into_own_memory_copies_each_value_directly(
    store: MooncakeDistributedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values in our own segment read into one registered buffer take the direct
    path (one slice assignment per value, no per-destination views); a
    destination too small fails alone; destinations in two buffers take the
    general path with the same results."""
    from pymooncake.store._reads import ReadOps

    general = []
    real = ReadOps._copy_own_batch
    monkeypatch.setattr(
        ReadOps, "_copy_own_batch", lambda self, *a: general.append(1) or real(self, *a)
    )
    values = [pattern(1000 + 500 * i, seed=i) for i in range(4)]
    keys = [f"direct_key_{i}" for i in range(4)]
    for k, v in zip(keys, values, strict=True):
        assert store.put(k, v) == 0
    dst = np.full(16 * 1024, 0xEE, np.uint8)
    other = np.full(4096, 0xEE, np.uint8)
    assert store.register_buffer(addr(dst), dst.nbytes) == 0
    assert store.register_buffer(addr(other), other.nbytes) == 0
    try:
        ptrs = [addr(dst) + i * 4096 for i in range(4)]
        got = store.batch_get_into(keys, ptrs, [4096, 4096, 100, 4096])
        assert got[:2] == [len(values[0]), len(values[1])] and got[3] == len(values[3])
        assert got[2] == INVALID_PARAMS  # 2000 bytes into 100: this key alone fails
        for i in (0, 1, 3):
            assert dst[i * 4096 : i * 4096 + len(values[i])].tobytes() == values[i]
        assert (dst[2 * 4096 : 3 * 4096] == 0xEE).all()  # nothing written for it
        assert general == []

        # one destination in another registered buffer: the general path, same answers
        mixed = store.batch_get_into(keys[:2], [ptrs[0], addr(other)], [4096, 4096])
        assert mixed == [len(values[0]), len(values[1])]
        assert other[: len(values[1])].tobytes() == values[1]
        assert general == [1]
    finally:
        assert store.unregister_buffer(addr(dst)) == 0
        assert store.unregister_buffer(addr(other)) == 0


def test_put_from_with_metadata(store: MooncakeDistributedStore) -> None:
    data = np.frombuffer(pattern(3000, seed=1), np.uint8).copy()
    meta = np.frombuffer(b"META" * 7, np.uint8).copy()
    assert store.register_buffer(addr(data), data.nbytes) == 0
    assert store.register_buffer(addr(meta), meta.nbytes) == 0
    assert store.put_from_with_metadata("meta_key", addr(data), addr(meta), 3000, 28) == 0
    assert store.get("meta_key") == data.tobytes() + meta.tobytes()  # data, then metadata
    assert store.unregister_buffer(addr(data)) == 0
    assert store.unregister_buffer(addr(meta)) == 0


def test_batch_put_from_and_batch_get_into(store: MooncakeDistributedStore) -> None:
    values = [b"Batch Put Data 1! " * 100, b"Batch Put Data 2! " * 200, b"Batch Put Data 3! " * 150]
    keys = [f"batch_from_key_{i}" for i in range(3)]
    spacing = MiB
    src = np.zeros(spacing * 3, np.uint8)
    dst = np.zeros(spacing * 3, np.uint8)
    assert store.register_buffer(addr(src), src.nbytes) == 0
    assert store.register_buffer(addr(dst), dst.nbytes) == 0
    ptrs, sizes = [], []
    for i, v in enumerate(values):
        src[i * spacing : i * spacing + len(v)] = np.frombuffer(v, np.uint8)
        ptrs.append(addr(src) + i * spacing)
        sizes.append(len(v))

    assert store.batch_put_from(keys, ptrs, sizes) == [0, 0, 0]
    assert [store.get(k) for k in keys] == values
    assert store.batch_put_from(keys[:1], ptrs[:1], sizes[:1], ReplicateConfig()) == [0]  # exists

    dst_ptrs = [addr(dst) + i * spacing for i in range(3)]
    got = store.batch_get_into(keys, dst_ptrs, [spacing] * 3)
    assert got == [len(v) for v in values]
    for i, v in enumerate(values):
        assert dst[i * spacing : i * spacing + len(v)].tobytes() == v

    # per-key results: a miss and a too-small destination fail alone
    mixed = store.batch_get_into(
        [keys[0], "batch_from_missing", keys[2]], dst_ptrs, [spacing, spacing, 16]
    )
    assert mixed[0] == len(values[0])
    assert mixed[1] == OBJECT_NOT_FOUND
    assert mixed[2] < 0

    # mismatched argument lists: one negative code per key; empty input: empty output
    for result in (
        store.batch_get_into(keys[:2], dst_ptrs, [spacing] * 3),
        store.batch_put_from(keys[:2], ptrs, sizes),
    ):
        assert len(result) == 2
        assert all(r < 0 for r in result)
    assert store.batch_get_into([], [], []) == []
    assert store.batch_put_from([], [], []) == []

    assert store.unregister_buffer(addr(src)) == 0
    assert store.unregister_buffer(addr(dst)) == 0


def test_multi_buffer_batches(store: MooncakeDistributedStore) -> None:
    """Objects gathered from / scattered to several registered buffers (vLLM, SGLang)."""
    src = np.frombuffer(pattern(64 * 1024, seed=7), np.uint8).copy()
    dst = np.zeros(64 * 1024, np.uint8)
    assert store.register_buffer(addr(src), src.nbytes) == 0
    assert store.register_buffer(addr(dst), dst.nbytes) == 0
    base = addr(src)
    keys = ["multi_k0", "multi_k1"]
    src_ptrs = [[base, base + 8192, base + 30000], [base + 40000, base + 50000]]
    src_sizes = [[1000, 2000, 3000], [4096, 4096]]
    assert store.batch_put_from_multi_buffers(keys, src_ptrs, src_sizes, ReplicateConfig()) == [
        0,
        0,
    ]
    expected = [
        b"".join(src[p - base : p - base + n].tobytes() for p, n in zip(ps, ns, strict=True))
        for ps, ns in zip(src_ptrs, src_sizes, strict=True)
    ]
    assert [store.get(k) for k in keys] == expected

    # scatter with a different split than the gather
    d = addr(dst)
    dst_ptrs = [[d, d + 10000], [d + 20000, d + 30000, d + 40000]]
    dst_sizes = [[2500, 3500], [1000, 1000, 6192]]
    got = store.batch_get_into_multi_buffers(keys, dst_ptrs, dst_sizes)
    assert got == [6000, 8192]
    assert dst[d - d : 2500].tobytes() + dst[10000:13500].tobytes() == expected[0]
    assert (
        dst[20000:21000].tobytes() + dst[30000:31000].tobytes() + dst[40000:46192].tobytes()
        == expected[1]
    )

    res = store.batch_get_into_multi_buffers(
        ["multi_k0", "multi_missing"], [[d], [d + 50000]], [[6000], [100]]
    )
    assert res == [6000, OBJECT_NOT_FOUND]
    assert store.batch_get_into_multi_buffers(["multi_k1"], [[d]], [[100]])[0] < 0  # too small
    mismatched = store.batch_put_from_multi_buffers(keys, src_ptrs[:1], src_sizes[:1])
    assert len(mismatched) == 2
    assert all(r < 0 for r in mismatched)
    # one key's pointer and size lists differ in length: codes, not an exception
    assert store.batch_put_from_multi_buffers(["multi_x"], [[base, base + 10]], [[10]]) == [
        INVALID_PARAMS
    ]
    assert store.batch_get_into_multi_buffers(["multi_k0"], [[d, d + 10]], [[10]]) == [
        INVALID_PARAMS
    ]

    assert store.unregister_buffer(addr(src)) == 0
    assert store.unregister_buffer(addr(dst)) == 0


def test_get_into_ranges_reference_scenario(store: MooncakeDistributedStore) -> None:
    data1 = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    data2 = b"abcdefghijklmnopqrstuvwxyz0123456789"
    assert store.put("ranges_key_1", data1) == 0
    assert store.put("ranges_key_2", data2) == 0
    size = 32
    buffer0 = (ctypes.c_ubyte * size)()
    buffer1 = (ctypes.c_ubyte * size)()
    p0, p1 = ctypes.addressof(buffer0), ctypes.addressof(buffer1)
    assert store.register_buffer(p0, size) == 0
    assert store.register_buffer(p1, size) == 0
    ctypes.memset(buffer0, ord("_"), size)
    ctypes.memset(buffer1, ord("_"), size)
    k1, k2 = "ranges_key_1", "ranges_key_2"

    results = store.get_into_ranges(
        [p0, p1],
        [[k1, k2], [k2, k1]],
        [[[0, 20], [8]], [[4], [16]]],
        [[[1, 30], [2]], [[0], [10]]],
        [[[4, 3], [5]], [[6], [4]]],
    )
    assert results == [[[4, 3], [5]], [[6], [4]]]
    assert bytes(buffer0[0:4]) == data1[1:5]
    assert bytes(buffer0[8:13]) == data2[2:7]
    assert bytes(buffer0[20:23]) == data1[30:33]
    assert bytes(buffer1[4:10]) == data2[0:6]
    assert bytes(buffer1[16:20]) == data1[10:14]
    assert bytes(buffer0[4:8]) == b"____"  # untouched between ranges

    # offsets/sizes of different lengths fail; an empty range list yields an empty result
    mismatch = store.get_into_ranges([p0], [[k1, k2]], [[[0], []]], [[[0, 1], []]], [[[], []]])
    assert len(mismatch) == 1
    assert len(mismatch[0]) == 2
    assert mismatch[0][0][0] < 0
    assert mismatch[0][1] == []

    source_overflow = store.get_into_ranges([p0], [[k1]], [[[0]]], [[[len(data1) - 1]]], [[[4]]])
    assert len(source_overflow) == 1
    assert source_overflow[0][0][0] < 0
    destination_overflow = store.get_into_ranges([p0], [[k1]], [[[size - 1]]], [[[0]]], [[[4]]])
    assert len(destination_overflow) == 1
    assert destination_overflow[0][0][0] < 0

    missing = store.get_into_ranges(
        [p0], [["missing-key", k1]], [[[0], [8]]], [[[0], [0]]], [[[4], [4]]]
    )
    assert missing[0][0][0] < 0
    assert missing[0][1][0] == 4
    assert bytes(buffer0[8:12]) == data1[0:4]

    assert store.unregister_buffer(p0) == 0
    assert store.unregister_buffer(p1) == 0


def session_fixture(store: MooncakeDistributedStore) -> tuple[np.ndarray, list[bytes]]:
    values = [pattern(4096, seed=11), pattern(6000, seed=12)]
    assert store.put_batch(["session_k0", "session_k1"], values) == 0
    dst = np.zeros(32 * 1024, np.uint8)
    assert store.register_buffer(addr(dst), dst.nbytes) == 0
    return dst, values


def test_batch_get_session_ranges(store: MooncakeDistributedStore) -> None:
    """SGLang's direct linker: one master query per key, then range reads without RPCs."""
    dst, values = session_fixture(store)
    d = addr(dst)
    keys = ["session_k0", "session_k1"]
    started = store.batch_get_session_start([*keys, "session_missing"])
    assert len(started) == 3
    assert started[0] >= 0
    assert started[1] >= 0
    assert started[2] < 0

    # two layers' worth of ranges per key, like a layer-wise KV load
    ptrs = [[d, d + 1000], [d + 8192, d + 12000]]
    sizes = [[1000, 2000], [3000, 3000]]
    offsets = [[0, 2000], [0, 3000]]
    got = store.batch_get_into_multi_buffer_ranges(keys, ptrs, sizes, offsets)
    assert got == [sum(s) for s in sizes]
    assert dst[0:1000].tobytes() == values[0][0:1000]
    assert dst[1000:3000].tobytes() == values[0][2000:4000]
    assert dst[8192:11192].tobytes() == values[1][0:3000]
    assert dst[12000:15000].tobytes() == values[1][3000:6000]

    # past the end of the object, and keys without a session, fail per key
    bad = store.batch_get_into_multi_buffer_ranges(
        [*keys, "session_missing"], [[d], [d], [d]], [[100], [100], [10]], [[4000], [0], [0]]
    )
    assert bad[0] < 0
    assert bad[1] == 100
    assert bad[2] < 0

    assert store.batch_get_session_end(keys) == 0
    after = store.batch_get_into_multi_buffer_ranges(keys[:1], [[d]], [[10]], [[0]])
    assert after[0] < 0  # the session is over
    assert store.batch_get_session_start([]) == []
    assert store.unregister_buffer(d) == 0


def test_batch_get_session_start_returns_zero_per_key(store: MooncakeDistributedStore) -> None:
    dst, _ = session_fixture(store)
    try:
        assert store.batch_get_session_start(["session_k0", "session_k1"]) == [0, 0]
    finally:
        assert store.batch_get_session_end(["session_k0", "session_k1"]) == 0
        assert store.unregister_buffer(addr(dst)) == 0


# ----------------------------------------------------------------------------------------
# buffer handles, upserts, soft pins, replica descriptors
# ----------------------------------------------------------------------------------------


def test_get_buffer_and_batch_get_buffer(store: MooncakeDistributedStore) -> None:
    values = [b"Batch Buffer Data 1! " * 100, b"Batch Buffer Data 2! " * 200]
    keys = ["buffer_key1", "buffer_key2"]
    for k, v in zip(keys, values, strict=True):
        assert store.put(k, v) == 0

    handle = store.get_buffer(keys[0])
    assert handle is not None
    assert handle.size() == len(handle) == len(values[0])
    assert isinstance(handle.ptr(), int)
    assert handle.ptr() != 0
    assert bytes(handle) == values[0]
    assert memoryview(handle).tobytes() == values[0]
    assert np.frombuffer(handle, np.uint8).tobytes() == values[0]
    assert ctypes.string_at(handle.ptr(), handle.size()) == values[0]
    assert store.get_buffer("buffer_missing") is None

    handles = store.batch_get_buffer([keys[0], "buffer_missing", keys[1]])
    assert len(handles) == 3
    assert handles[1] is None
    assert handles[0] is not None
    assert handles[2] is not None
    assert bytes(handles[0]) == values[0]
    assert bytes(handles[2]) == values[1]
    assert handles[2].size() == len(values[1])
    assert store.batch_get_buffer([]) == []
    del handle, handles  # handles live in the local buffer: drop them before close


def test_buffer_handles_hold_local_buffer_space(stores: Stores) -> None:
    store = stores.new(segment=4 * MiB, local_buffer=MiB)
    big = pattern(400 * 1024, seed=4)
    assert store.put("handle_big", big) == 0
    first = store.get_buffer("handle_big")
    second = store.get_buffer("handle_big")
    assert first is not None
    assert second is not None
    assert first.ptr() != second.ptr()
    assert store.get_buffer("handle_big") is None  # the 1 MiB local buffer is used up
    del first
    third = store.get_buffer("handle_big")  # freed space is reused
    assert third is not None
    assert bytes(third) == big
    del second, third


def test_upsert_family(store: MooncakeDistributedStore) -> None:
    assert store.upsert("upsert_key", b"first") == 0  # inserts
    assert store.get("upsert_key") == b"first"
    assert store.upsert("upsert_key", b"second, and longer") == 0  # replaces
    assert store.get("upsert_key") == b"second, and longer"
    assert store.get_size("upsert_key") == len(b"second, and longer")
    assert store.put("upsert_key", b"put never overwrites") == 0
    assert store.get("upsert_key") == b"second, and longer"

    assert store.upsert_parts("upsert_key", b"par", bytearray(b"ts")) == 0
    assert store.get("upsert_key") == b"parts"
    assert store.upsert_batch(["upsert_key", "upsert_b"], [b"batch-a", b"batch-b"]) == 0
    assert store.get_batch(["upsert_key", "upsert_b"]) == [b"batch-a", b"batch-b"]

    src = np.frombuffer(pattern(5000, seed=3), np.uint8).copy()
    assert store.register_buffer(addr(src), src.nbytes) == 0
    assert store.upsert_from("upsert_key", addr(src), 5000) == 0
    assert store.get("upsert_key") == src.tobytes()
    assert store.batch_upsert_from(
        ["upsert_key", "upsert_c"], [addr(src), addr(src) + 100], [10, 20]
    ) == [0, 0]
    assert store.get("upsert_key") == src[:10].tobytes()
    assert store.get("upsert_c") == src[100:120].tobytes()
    assert store.unregister_buffer(addr(src)) == 0


def test_soft_pin_rules(store: MooncakeDistributedStore) -> None:
    key, data = "soft_pin_key", b"soft-pin forwarding"
    enable = ReplicateConfig()
    enable.soft_pin_action = SoftPinAction.ENABLE
    enable.soft_pin_ttl_ms = 1000
    assert store.put(key, data, enable) == 0

    preserve_with_ttl = ReplicateConfig()
    preserve_with_ttl.soft_pin_ttl_ms = 1000
    assert store.upsert(key, data, preserve_with_ttl) == INVALID_PARAMS
    disable_with_ttl = ReplicateConfig()
    disable_with_ttl.soft_pin_action = SoftPinAction.DISABLE
    disable_with_ttl.soft_pin_ttl_ms = 1000
    assert store.upsert(key, data, disable_with_ttl) == INVALID_PARAMS
    assert store.upsert(key, data) == 0
    disable = ReplicateConfig()
    disable.soft_pin_action = SoftPinAction.DISABLE
    assert store.upsert(key, data, disable) == 0

    # the same rule on a fresh put: nothing is created
    assert store.put("soft_pin_new", data, preserve_with_ttl) == INVALID_PARAMS
    assert store.is_exist("soft_pin_new") == 0
    # ENABLE without a TTL uses the master's default; a TTL above the maximum is refused
    enable_default = ReplicateConfig()
    enable_default.soft_pin_action = SoftPinAction.ENABLE
    assert store.put("soft_pin_default", data, enable_default) == 0
    too_long = ReplicateConfig()
    too_long.soft_pin_action = SoftPinAction.ENABLE
    too_long.soft_pin_ttl_ms = MAX_SOFT_PIN_TTL_MS + 1
    assert store.put("soft_pin_too_long", data, too_long) == INVALID_PARAMS
    hard = ReplicateConfig()
    hard.with_hard_pin = True
    assert store.put("hard_pin_key", data, hard) == 0
    assert store.get("hard_pin_key") == data


def test_replica_descriptors(store: MooncakeDistributedStore) -> None:
    data = pattern(3000, seed=5)
    assert store.put("desc_key", data) == 0
    descs = store.get_replica_desc("desc_key")
    assert len(descs) == 1
    (desc,) = descs
    assert desc.is_memory_replica() is True
    assert desc.is_disk_replica() is False
    assert desc.status == ReplicaStatus.COMPLETE
    buf = desc.get_memory_descriptor().buffer_descriptor
    assert buf.transport_endpoint == store.get_hostname()
    assert buf.size == len(data)
    assert isinstance(buf.buffer_address, int)
    # the segment is this process's memory: the descriptor points at the bytes
    assert ctypes.string_at(buf.buffer_address, buf.size) == data

    assert store.get_replica_desc("desc_missing") == []
    batch = store.batch_get_replica_desc(["desc_key", "desc_missing"])
    assert list(batch) == ["desc_key"]  # missing keys are left out
    (only,) = batch["desc_key"]
    assert only.get_memory_descriptor().buffer_descriptor.buffer_address == buf.buffer_address


def test_replica_num_2_with_two_stores(stores: Stores) -> None:
    a = stores.new()
    b = stores.new()
    assert a.get_hostname() != b.get_hostname()
    data = b"Hello, Config World!" * 50
    config = ReplicateConfig()
    config.replica_num = 2
    assert a.put(key="replicated_key", value=data, config=config) == 0
    endpoints = {
        d.get_memory_descriptor().buffer_descriptor.transport_endpoint
        for d in a.get_replica_desc("replicated_key")
    }
    assert endpoints == {a.get_hostname(), b.get_hostname()}
    assert b.get("replicated_key") == data

    # batch writes take the config too
    keys = ["replicated_b1", "replicated_b2"]
    assert a.put_batch(keys=keys, values=[b"one", b"two"], config=config) == 0
    assert all(len(v) == 2 for v in a.batch_get_replica_desc(keys).values())

    # more replicas than segments: best effort, one per segment
    config3 = ReplicateConfig()
    config3.replica_num = 3
    assert a.put("replicated_3", data, config3) == 0
    assert len(a.get_replica_desc("replicated_3")) == 2

    # the writer goes away: the object survives on the other replica
    assert a.close() == 0
    assert b.get("replicated_key") == data
    (left,) = b.get_replica_desc("replicated_key")
    assert left.get_memory_descriptor().buffer_descriptor.transport_endpoint == b.get_hostname()


def test_several_stores_in_one_process(stores: Stores) -> None:
    many = [stores.new(segment=4 * MiB, local_buffer=2 * MiB) for _ in range(3)]
    hosts = [s.get_hostname() for s in many]
    assert len(set(hosts)) == 3
    for i, writer in enumerate(many):
        target = many[(i + 1) % 3]
        config = ReplicateConfig()
        config.preferred_segment = target.get_hostname()
        assert writer.put(f"several_{i}", pattern(2048, seed=i), config) == 0
        (desc,) = writer.get_replica_desc(f"several_{i}")
        assert (
            desc.get_memory_descriptor().buffer_descriptor.transport_endpoint == hosts[(i + 1) % 3]
        )
    for reader in many:
        for i in range(3):
            assert reader.get(f"several_{i}") == pattern(2048, seed=i)


# ----------------------------------------------------------------------------------------
# host memory allocator, buffer pool
# ----------------------------------------------------------------------------------------


def test_host_mem_allocator(store: MooncakeDistributedStore) -> None:
    allocator = MooncakeHostMemAllocator()
    size = 2 * MiB
    ptr = allocator.alloc(size)
    assert ptr != 0
    payload = pattern(4096, seed=9)
    ctypes.memmove(ptr, payload, len(payload))
    # SGLang's standalone mode registers this memory and moves KV pages from it
    assert store.register_buffer(ptr, size) == 0
    assert store.put_from("host_mem_key", ptr, len(payload)) == 0
    assert store.get_into("host_mem_key", ptr + MiB, MiB) == len(payload)
    assert ctypes.string_at(ptr + MiB, len(payload)) == payload
    assert store.unregister_buffer(ptr) == 0
    assert allocator.free(ptr) == 0


def test_buffer_pool_leases(store: MooncakeDistributedStore) -> None:
    pool = BufferPool(store)
    lease = pool.acquire(4096)
    assert isinstance(lease.ptr, int)
    assert lease.size >= 4096
    assert len(lease.buffer) == lease.size
    lease.buffer[:5] = b"lease"
    assert store.put_from("pool_key", lease.ptr, 5) == 0
    assert store.get("pool_key") == b"lease"

    with pool.buffer(1024) as other:
        assert other.ptr != lease.ptr
        assert store.get_into("pool_key", other.ptr, other.size) == 5
        assert bytes(other.buffer[:5]) == b"lease"
    lease.release()
    lease.release()  # idempotent
    again = RegisteredBufferPool(store).acquire(2048)
    assert again.size >= 2048
    again.release()
    pool.close()
