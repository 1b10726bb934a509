"""Replays of how vLLM, SGLang and LMCache drive ``mooncake.engine`` / ``mooncake.store``.

Each test repeats, call for call and with the argument shapes those clients
use, one client's integration (``shared/reference/clients-and-issues.md``
sections 1-4; the clients' files and commits are named there):

* vLLM ``MooncakeConnector`` (P2P prefill/decode): engines in P2P handshake
  mode, ``batch_register_memory`` of the KV caches, the prefill side pushing
  coalesced blocks with ``batch_transfer_sync_write`` from a thread pool.
* vLLM ``MooncakeStoreConnector``: seven-positional ``setup`` from a JSON
  config, ``batch_is_exist`` dedup, ``batch_put_from_multi_buffers`` /
  ``batch_get_into_multi_buffers`` over per-layer K/V blocks, ``-200`` when
  the pool is full, ``remove_all(force=True)``, ``close``.
* SGLang: the transfer-engine wrapper, and the HiCache L3 backend (engine
  reuse via ``get_engine()``, keyword fallback on ``TypeError``, warm-up,
  ``batch_put_from``/``batch_get_into`` with ``> 0`` meaning success), plus
  the direct linker's session/range reads.
* LMCache ``mooncakestore://``: ``put_from``/``put_parts`` through
  ``asyncio.to_thread`` + ``wait_for``, ``batch_get_into`` with short reads,
  legacy ``batch_get_buffer`` handles, ``b""`` for a missing key.

Numpy arrays stand in for GPU and pinned host memory; "rdma" is requested
where the clients request it (pymooncake serves it over TCP).
"""

from __future__ import annotations

import asyncio
import gc
import json
import struct
import threading
import uuid
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from store_support import LEASE_MS, LOCAL, MiB, Stores, addr, new_cluster

from mooncake.engine import TransferEngine
from mooncake.mooncake_config import MooncakeConfig
from mooncake.store import MooncakeDistributedStore, ReplicateConfig
from pymooncake.testing import LocalCluster, free_port, wait_until

P2P = "P2PHANDSHAKE"
MOONCAKE_NO_AVAILABLE_HANDLE = -200  # vLLM's constant


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
def engines(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[TransferEngine]]:
    """Compat engines made by a test; all closed at teardown."""
    monkeypatch.setenv("MC_TCP_BIND_ADDRESS", LOCAL)
    made: list[TransferEngine] = []
    try:
        yield made
    finally:
        for engine in made:
            engine.close()


def start_engine(
    engines: list[TransferEngine], protocol: str = "rdma"
) -> tuple[TransferEngine, str]:
    """``TransferEngine(); initialize(host, "P2PHANDSHAKE", protocol, "")`` and the
    session id ``f"{host}:{get_rpc_port()}"`` the clients build from it."""
    engine = TransferEngine()
    engines.append(engine)
    rc = engine.initialize(LOCAL, P2P, protocol, "")
    if rc != 0:  # vLLM/SGLang raise RuntimeError here
        raise RuntimeError(f"Mooncake TransferEngine initialization failed: {rc}")
    return engine, f"{LOCAL}:{engine.get_rpc_port()}"


def kv_caches(layers: int, shape: tuple[int, ...], seed: int | None) -> list[np.ndarray]:
    """Per layer a K and a V cache of fp16 blocks (random data, or zeros when seed is None)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(layers * 2):
        if seed is None:
            out.append(np.zeros(shape, np.float16))
        else:
            out.append(rng.standard_normal(shape).astype(np.float16))
    return out


# ========================================================================================
# vLLM MooncakeConnector (P2P prefill -> decode)
# ========================================================================================


def coalesce(local_ids: list[int], remote_ids: list[int]) -> list[tuple[int, int, int]]:
    """(local start, remote start, count) runs where both sides are contiguous, as
    vLLM's ``_can_coalesce_block_transfers`` merges them."""
    runs: list[tuple[int, int, int]] = []
    for lo, re_ in zip(local_ids, remote_ids, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == lo and runs[-1][1] + runs[-1][2] == re_:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((lo, re_, 1))
    return runs


def test_vllm_mooncake_connector_p2p_push(engines: list[TransferEngine]) -> None:
    layers, num_blocks, block_size, kv_heads, head_dim = 4, 64, 16, 4, 32
    shape = (num_blocks, block_size, kv_heads, head_dim)
    block_bytes = block_size * kv_heads * head_dim * 2  # fp16
    prefill_kv = kv_caches(layers, shape, seed=1)
    decode_kv = kv_caches(layers, shape, seed=None)

    prefill, _ = start_engine(engines)
    decode, _ = start_engine(engines)
    # one (data_ptr, nbytes) per distinct KV storage; non-zero raises in vLLM
    for engine, caches in ((prefill, prefill_kv), (decode, decode_kv)):
        assert (
            engine.batch_register_memory([addr(c) for c in caches], [c.nbytes for c in caches]) == 0
        )

    # the decode side's MooncakeXferMetadata (sent over ZMQ in vLLM)
    remote_hostname, remote_port = LOCAL, decode.get_rpc_port()
    remote_bases = [addr(c) for c in decode_kv]
    # requests: prefill block ids -> decode block ids (some runs contiguous, some not)
    requests = [
        (list(range(0, 8)), list(range(10, 18))),
        ([20, 21, 22, 40, 41], [30, 31, 32, 5, 6]),
        ([50, 52, 54], [50, 52, 54]),
        (list(range(56, 64)), [0, 1, 2, 3, 60, 61, 62, 63]),
        ([9], [40]),
        ([30, 31], [20, 21]),
    ]

    def send(request: tuple[list[int], list[int]]) -> tuple[int, int]:
        local_ids, remote_ids = request
        src, dst, lengths = [], [], []
        for local_base, remote_base in zip(
            (addr(c) for c in prefill_kv), remote_bases, strict=True
        ):
            for lo, re_, n in coalesce(local_ids, remote_ids):
                src.append(local_base + lo * block_bytes)
                dst.append(remote_base + re_ * block_bytes)
                lengths.append(n * block_bytes)
        session = f"{remote_hostname}:{remote_port}"
        return prefill.batch_transfer_sync_write(session, src, dst, lengths), len(src)

    with ThreadPoolExecutor(4, thread_name_prefix="vllm-mooncake-sender") as pool:
        results = list(pool.map(send, requests))
    assert [rc for rc, _ in results] == [0] * len(requests)
    blocks = sum(len(ids) for ids, _ in requests)
    assert sum(n for _, n in results) < blocks * layers * 2  # coalescing merged descriptors

    written = np.zeros(num_blocks, bool)
    for local_ids, remote_ids in requests:
        for lo, re_ in zip(local_ids, remote_ids, strict=True):
            written[re_] = True
            for p, d in zip(prefill_kv, decode_kv, strict=True):
                assert np.array_equal(d[re_], p[lo])
    for d in decode_kv:  # blocks nobody wrote are untouched
        assert not d[~written].any()

    # a destination outside the decode side's registered memory fails with a code
    bogus = addr(decode_kv[0]) + decode_kv[0].nbytes + 64 * MiB
    assert (
        prefill.batch_transfer_sync_write(
            f"{remote_hostname}:{remote_port}", [addr(prefill_kv[0])], [bogus], [block_bytes]
        )
        != 0
    )


# ========================================================================================
# vLLM MooncakeStoreConnector
# ========================================================================================


class VllmStoreWorker:
    """The store calls of vLLM's MooncakeStoreConnector worker, one KV block per key."""

    def __init__(
        self, store: MooncakeDistributedStore, caches: list[np.ndarray], config: ReplicateConfig
    ) -> None:
        self.store = store
        self.caches = caches
        self.block_bytes = caches[0][0].nbytes
        self.replicate_config = config
        self.store_pressure = False
        for cache in caches:  # once per distinct KV storage; the result is only logged
            assert store.register_buffer(addr(cache), cache.nbytes) == 0

    def addrs(self, block_ids: list[int]) -> tuple[list[list[int]], list[list[int]]]:
        ptrs = [[addr(c) + b * self.block_bytes for c in self.caches] for b in block_ids]
        sizes = [[self.block_bytes] * len(self.caches) for _ in block_ids]
        return ptrs, sizes

    def save(self, keys: list[str], block_ids: list[int]) -> list[int]:
        """Returns the put results of the keys that were missing (dedup via batch_is_exist)."""
        if self.store_pressure:
            return []
        exists = self.store.batch_is_exist(keys)
        missing = [i for i, e in enumerate(exists) if e != 1]
        if not missing:
            return []
        ptrs, sizes = self.addrs([block_ids[i] for i in missing])
        results = self.store.batch_put_from_multi_buffers(
            [keys[i] for i in missing], ptrs, sizes, self.replicate_config
        )
        if any(r == MOONCAKE_NO_AVAILABLE_HANDLE for r in results):
            self.store_pressure = True  # skip saving until the pool has room again
        return results

    def load(self, keys: list[str], block_ids: list[int]) -> list[int]:
        ptrs, sizes = self.addrs(block_ids)
        return self.store.batch_get_into_multi_buffers(keys, ptrs, sizes)

    def lookup(self, keys: list[str]) -> int:
        """Scheduler-side prefix hit count."""
        hits = 0
        for e in self.store.batch_is_exist(keys):
            if e != 1:
                break
            hits += 1
        return hits


def test_vllm_mooncake_store_connector(
    cluster: LocalCluster, stores: Stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_path = tmp_path / "mooncake.json"
    config_path.write_text(
        json.dumps(
            {
                "local_hostname": LOCAL,
                "metadata_server": cluster.metadata_url,
                "master_server_address": cluster.master_address,
                "protocol": "rdma",
                "device_name": "",
                "global_segment_size": "1MB",  # a tiny pool, so it can be filled
                "local_buffer_size": "4 MB",
            }
        )
    )
    monkeypatch.setenv("MOONCAKE_CONFIG_PATH", str(config_path))
    monkeypatch.setenv("MOONCAKE_REQUESTER_LOCAL_HOSTNAME", LOCAL)
    config = MooncakeConfig.load_from_env()
    assert config.global_segment_size == MiB

    def setup(global_segment_size: int) -> MooncakeDistributedStore:
        store = stores.track(MooncakeDistributedStore())
        rc = store.setup(
            LOCAL,  # get_ip(), or MOONCAKE_REQUESTER_LOCAL_HOSTNAME
            config.metadata_server,
            global_segment_size,
            config.local_buffer_size,
            config.protocol,
            config.device_name,
            config.master_server_address,
        )
        if rc != 0:
            raise RuntimeError(f"Failed to setup mooncake store: {rc}")
        return store

    layers, num_blocks, block_size, kv_heads, head_dim = 2, 32, 16, 2, 32
    shape = (num_blocks, block_size, kv_heads, head_dim)
    prefill_store = setup(config.global_segment_size)
    replicate = ReplicateConfig()
    replicate.preferred_segment = prefill_store.get_hostname()  # MOONCAKE_PREFERRED_SEGMENT
    prefill = VllmStoreWorker(prefill_store, kv_caches(layers, shape, seed=2), replicate)
    # a second worker that only reads (no segment of its own)
    decode = VllmStoreWorker(setup(0), kv_caches(layers, shape, seed=None), ReplicateConfig())
    key_bytes = prefill.block_bytes * layers * 2

    # request A: 8 blocks; request B shares A's first 4 (prefix cache) and adds 4
    keys_a = [f"llama@tp0@{i:016x}" for i in range(8)]
    keys_b = keys_a[:4] + [f"llama@tp0@{i:016x}" for i in range(100, 104)]
    blocks_a, blocks_b = list(range(0, 8)), [0, 1, 2, 3, 12, 13, 14, 15]
    assert prefill.save(keys_a, blocks_a) == [0] * 8
    assert prefill.save(keys_b, blocks_b) == [0] * 4  # only the missing keys are put
    assert prefill.save(keys_a, blocks_a) == []  # everything exists

    assert prefill.lookup([*keys_b[:6], "llama@tp0@unknown", keys_b[7]]) == 6
    for key, descs in prefill_store.batch_get_replica_desc(keys_b).items():  # tier logging
        assert key in keys_b
        assert [d.is_memory_replica() for d in descs] == [True]
        assert not descs[0].is_disk_replica()
        endpoint = descs[0].get_memory_descriptor().buffer_descriptor.transport_endpoint
        assert endpoint == prefill_store.get_hostname()

    # load B into other blocks on the other worker; a missing key marks its block invalid
    targets = [31, 30, 29, 28, 20, 21, 22, 23]
    got = decode.load(keys_b, targets)
    assert got == [key_bytes] * 8
    for src_block, dst_block in zip(blocks_b, targets, strict=True):
        for p, d in zip(prefill.caches, decode.caches, strict=True):
            assert np.array_equal(d[dst_block], p[src_block])
    partial = decode.load([keys_b[0], "llama@tp0@missing"], [5, 6])
    assert partial[0] == key_bytes
    assert partial[1] < 0

    # reset, then another tenant pins the whole pool: saves fail with -200
    assert prefill_store.remove_all(force=True) == 12
    pinned = ReplicateConfig()
    pinned.with_hard_pin = True
    filler = bytes(128 * 1024)
    for i in range(8):  # 8 x 128 KiB fill the 1 MiB segment exactly
        assert prefill_store.put(f"tenant-b/pinned/{i}", filler, pinned) == 0
    keys_c = [f"llama@tp0@{i:016x}" for i in range(200, 204)]
    results = prefill.save(keys_c, [4, 5, 6, 7])
    assert results == [MOONCAKE_NO_AVAILABLE_HANDLE] * 4
    assert prefill.store_pressure
    assert prefill.save(keys_c, [4, 5, 6, 7]) == []  # skipped while under pressure

    # remove_all(force=True) frees even hard-pinned objects; saving works again
    assert prefill_store.remove_all(force=True) == 8
    prefill.store_pressure = False
    assert prefill.save(keys_c, [4, 5, 6, 7]) == [0] * 4
    assert decode.load(keys_c, [8, 9, 10, 11]) == [key_bytes] * 4

    for worker in (prefill, decode):
        for cache in worker.caches:
            assert worker.store.unregister_buffer(addr(cache)) == 0
        assert worker.store.close() == 0


# ========================================================================================
# SGLang
# ========================================================================================


class SglangTransferEngine:
    """SGLang's MooncakeTransferEngine wrapper: the exact engine calls it makes."""

    def __init__(self, engines: list[TransferEngine], ib_device: str = "") -> None:
        self.engine, self.session_id = start_engine(engines, "rdma")
        self.ib_device = ib_device

    def register(self, ptr: int, length: int) -> int:
        return self.engine.register_memory(ptr, length)  # failure is only logged

    def deregister(self, ptr: int) -> int:
        return self.engine.unregister_memory(ptr)

    def batch_register(self, ptrs: list[int], lengths: list[int]) -> int:
        return self.engine.batch_register_memory(ptrs, lengths)

    def batch_deregister(self, ptrs: list[int]) -> int:
        return self.engine.batch_unregister_memory(ptrs)

    def transfer_sync(self, session_id: str, buffer: int, peer_addr: int, length: int) -> int:
        try:
            return self.engine.transfer_sync_write(session_id, buffer, peer_addr, length)
        except Exception:
            return -1

    def batch_transfer_sync(
        self, session_id: str, buffers: list[int], peer_addrs: list[int], lengths: list[int]
    ) -> int:
        try:
            return self.engine.batch_transfer_sync_write(session_id, buffers, peer_addrs, lengths)
        except Exception:
            return -1

    def send_probe(self, peer_session_id: str) -> int:
        return self.engine.send_probe(peer_session_id)

    def get_engine(self) -> object:
        return self.engine.get_engine()

    def get_session_id(self) -> str:
        return self.session_id

    def get_ib_device(self) -> str:
        return self.ib_device


def test_sglang_transfer_engine_wrapper(engines: list[TransferEngine]) -> None:
    prefill = SglangTransferEngine(engines)
    decode = SglangTransferEngine(engines)
    # PD transfer: KV, aux and state regions, deduplicated, registered in one batch
    kv_src = np.frombuffer(np.random.default_rng(3).bytes(2 * MiB), np.uint8).copy()
    aux_src = np.arange(4096, dtype=np.uint8)
    kv_dst = np.zeros(2 * MiB, np.uint8)
    aux_dst = np.zeros(4096, np.uint8)
    assert (
        prefill.batch_register([addr(kv_src), addr(aux_src)], [kv_src.nbytes, aux_src.nbytes]) == 0
    )
    assert (
        decode.batch_register([addr(kv_dst), addr(aux_dst)], [kv_dst.nbytes, aux_dst.nbytes]) == 0
    )

    page = 16 * 1024
    pages = [(0, 5), (1, 9), (2, 10), (7, 0)]  # (prefill page, decode page)
    rc = prefill.batch_transfer_sync(
        decode.session_id,
        [addr(kv_src) + s * page for s, _ in pages],
        [addr(kv_dst) + d * page for _, d in pages],
        [page] * len(pages),
    )
    assert rc == 0
    for s, d in pages:
        assert (
            kv_dst[d * page : (d + 1) * page].tobytes()
            == kv_src[s * page : (s + 1) * page].tobytes()
        )
    assert prefill.transfer_sync(decode.session_id, addr(aux_src), addr(aux_dst), 4096) == 0
    assert aux_dst.tobytes() == aux_src.tobytes()

    # multimodal/encoder disaggregation: register, transfer, deregister per embedding
    embedding = np.frombuffer(np.random.default_rng(4).bytes(8192), np.uint8).copy()
    assert prefill.register(addr(embedding), embedding.nbytes) == 0
    assert prefill.transfer_sync(decode.session_id, addr(embedding), addr(kv_dst) + MiB, 8192) == 0
    assert kv_dst[MiB : MiB + 8192].tobytes() == embedding.tobytes()
    assert prefill.deregister(addr(embedding)) == 0

    # remote-instance weight loader: the client pulls from the seed
    weights = np.zeros(3 * page, np.uint8)
    assert decode.register(addr(weights), weights.nbytes) == 0
    assert (
        decode.engine.batch_transfer_sync_read(
            prefill.session_id,
            [addr(weights), addr(weights) + page],
            [addr(kv_src), addr(kv_src) + 5 * page],
            [page, 2 * page],
        )
        == 0
    )
    assert weights[:page].tobytes() == kv_src[:page].tobytes()
    assert weights[page:].tobytes() == kv_src[5 * page : 7 * page].tobytes()

    # failed-session recovery: probe a live peer, a dead one, and transfer to the dead one
    assert prefill.send_probe(decode.session_id) == 0
    dead = f"{LOCAL}:{free_port()}"
    assert prefill.send_probe(dead) != 0
    assert prefill.transfer_sync(dead, addr(aux_src), addr(aux_dst), 16) != 0

    # teardown / role switch
    assert decode.deregister(addr(weights)) == 0
    assert prefill.batch_deregister([addr(kv_src), addr(aux_src)]) == 0
    assert decode.batch_deregister([addr(kv_dst), addr(aux_dst)]) == 0
    assert prefill.transfer_sync(decode.session_id, addr(aux_src), addr(aux_dst), 16) != 0


class SglangHiCache:
    """The store calls of SGLang's MooncakeStore (HiCache L3 backend), MHA page-first layout:
    one object per page for K and one for V, keys ``f"{prefix}_{hash}_{tp}_k"``/``_v``."""

    def __init__(
        self, store: MooncakeDistributedStore, host_pool: np.ndarray, group_semantics: bool
    ) -> None:
        self.store = store
        self.pool = host_pool  # [pages, 2 (k/v), page bytes]
        self.page_bytes = host_pool.shape[2]
        supports = hasattr(ReplicateConfig, "group_ids") or hasattr(ReplicateConfig(), "group_ids")
        self.group_semantics = group_semantics and supports
        rc = store.register_buffer(addr(host_pool), host_pool.nbytes)
        if rc != 0:
            raise RuntimeError(f"Failed to register buffer to Mooncake Store, error code: {rc}")

    def meta(self, keys: list[str], pages: list[int]) -> tuple[list[str], list[int], list[int]]:
        key_strs, ptrs, sizes = [], [], []
        for key, page in zip(keys, pages, strict=True):
            for kv, suffix in ((0, "0_k"), (1, "0_v")):
                key_strs.append(f"{key}_{suffix}")
                ptrs.append(addr(self.pool) + (page * 2 + kv) * self.page_bytes)
                sizes.append(self.page_bytes)
        return key_strs, ptrs, sizes

    def batch_set(self, keys: list[str], pages: list[int]) -> list[bool]:
        key_strs, ptrs, sizes = self.meta(keys, pages)
        exists = self.store.batch_is_exist(key_strs)
        results = [0 if e == 1 else -1 for e in exists]
        todo = [i for i, e in enumerate(exists) if e != 1]
        if todo:
            args = ([key_strs[i] for i in todo], [ptrs[i] for i in todo], [sizes[i] for i in todo])
            if self.group_semantics:
                config = ReplicateConfig()
                config.group_ids = [f"sglang-hicache:{key_strs[i].rsplit('_', 2)[0]}" for i in todo]
                put = self.store.batch_put_from(*args, config)
            else:
                put = self.store.batch_put_from(*args)
            for i, r in zip(todo, put, strict=True):
                results[i] = r
        return [all(r == 0 for r in results[i : i + 2]) for i in range(0, len(results), 2)]

    def batch_get(self, keys: list[str], pages: list[int]) -> list[bool]:
        key_strs, ptrs, sizes = self.meta(keys, pages)
        got = self.store.batch_get_into(key_strs, ptrs, sizes)
        return [all(r > 0 for r in got[i : i + 2]) for i in range(0, len(got), 2)]

    def batch_exists(self, keys: list[str]) -> int:
        key_strs, _, _ = self.meta(keys, list(range(len(keys))))
        exists = self.store.batch_is_exist(key_strs)
        for i, e in enumerate(exists):
            if e != 1:
                return i // 2
        return len(keys)


def sglang_setup(
    store: MooncakeDistributedStore,
    cluster: LocalCluster,
    shared: SglangTransferEngine | None,
    setup_kwargs: dict[str, object],
    segment: int,
) -> list[str]:
    """SGLang's setup loop: reuse the shared engine, drop keywords this Mooncake lacks.
    Returns the keywords that were dropped."""
    if shared is not None:
        hostname, engine = shared.get_session_id(), shared.get_engine()
    else:
        hostname, engine = LOCAL, None
    dropped: list[str] = []
    while True:
        try:
            rc = store.setup(
                hostname,
                P2P,
                segment,
                16 * MiB,
                "rdma",
                "",
                cluster.master_address,
                engine,
                **setup_kwargs,
            )
            break
        except TypeError as e:
            unsupported = [key for key in list(setup_kwargs) if key in str(e)]
            if not unsupported:
                raise
            if "tenant_id" in unsupported:
                raise RuntimeError("tenant_id is not supported by this Mooncake") from e
            for key in unsupported:
                setup_kwargs.pop(key, None)
            dropped += unsupported
    if rc:
        raise RuntimeError(f"Failed to setup Mooncake store, error code: {rc}")
    # warm-up: put, retried like SGLang does, then is_exist == 1 and get == value
    key = "sglang_mooncake_store_warmup_key" + uuid.uuid4().hex
    value = bytes(4 * 1024)
    assert wait_until(lambda: store.put(key, value) == 0, timeout_s=10, step_s=0.2)
    assert store.is_exist(key) == 1
    assert store.get(key) == value
    return dropped


def test_sglang_hicache_backend(
    cluster: LocalCluster, engines: list[TransferEngine], stores: Stores
) -> None:
    shared = SglangTransferEngine(engines)
    # not tracked by ``stores``: SGLang never calls close() (closed here only on failure)
    holder = [MooncakeDistributedStore()]
    try:
        sglang_hicache_flow(cluster, shared, holder, stores)
    finally:
        for leftover in holder:
            leftover.close()


def sglang_hicache_flow(
    cluster: LocalCluster,
    shared: SglangTransferEngine,
    holder: list[MooncakeDistributedStore],
    stores: Stores,
) -> None:
    store = holder[0]
    setup_kwargs: dict[str, object] = {
        "enable_client_http_server": True,
        "client_http_port": free_port(),
        "tenant_id": "hicache",  # passed because it is not "default"
        "enable_future_feature": True,  # a keyword newer than this Mooncake
    }
    dropped = sglang_setup(store, cluster, shared, setup_kwargs, segment=8 * MiB)
    assert dropped == ["enable_future_feature"]
    assert store.get_hostname() == shared.get_session_id()

    # a second tensor-parallel rank with its own store and engine
    rank1 = stores.track(MooncakeDistributedStore())
    sglang_setup(rank1, cluster, None, {"tenant_id": "hicache"}, segment=8 * MiB)

    pages, page_bytes = 16, 8 * 1024
    pool0 = np.frombuffer(np.random.default_rng(6).bytes(pages * 2 * page_bytes), np.uint8)
    pool0 = pool0.copy().reshape(pages, 2, page_bytes)
    pool1 = np.zeros_like(pool0)
    cache0 = SglangHiCache(store, pool0, group_semantics=False)
    cache1 = SglangHiCache(rank1, pool1, group_semantics=True)
    assert cache1.group_semantics

    prefix = "Qwen-Qwen3-8B"
    keys = [f"{prefix}_{h:032x}" for h in range(8)]
    assert cache0.batch_set(keys[:6], [0, 1, 2, 3, 4, 5]) == [True] * 6
    assert cache0.batch_set(keys, [0, 1, 2, 3, 4, 5, 6, 7]) == [True] * 8  # 2 new pages put
    assert cache0.batch_exists(keys) == 8
    assert cache0.batch_exists([*keys[:3], f"{prefix}_unknown", keys[4]]) == 3

    # the other rank reads the pages into different host slots (> 0 bytes = success)
    slots = [15, 14, 13, 12, 11, 10, 9, 8]
    assert cache1.batch_get(keys, slots) == [True] * 8
    for page, slot in zip(range(8), slots, strict=True):
        assert np.array_equal(pool1[slot], pool0[page])
    assert cache1.batch_get([keys[0], f"{prefix}_missing"], [0, 1]) == [True, False]

    # writes with group semantics (ReplicateConfig.group_ids) from rank 1
    pool1[0:4] = np.frombuffer(
        np.random.default_rng(7).bytes(4 * 2 * page_bytes), np.uint8
    ).reshape(4, 2, page_bytes)
    group_keys = [f"{prefix}_{h:032x}" for h in range(50, 54)]
    assert cache1.batch_set(group_keys, [0, 1, 2, 3]) == [True] * 4
    assert cache0.batch_get(group_keys, [8, 9, 10, 11]) == [True] * 4
    assert np.array_equal(pool0[8:12], pool1[0:4])

    # clear() = remove_all() without force: leased objects (just read) survive a while
    sglang_clear(store, total=2 * (8 + 4) + 2)  # K and V per page, and two warm-up keys
    assert store.batch_is_exist(keys[:2]) == [0, 0]
    assert store.unregister_buffer(addr(pool0)) == 0
    assert rank1.unregister_buffer(addr(pool1)) == 0

    # SGLang's close() is a no-op: "MooncakeDistributedStore will automatically call the
    # destructor" -- dropping the last reference must stop the client
    host = store.get_hostname()
    ref = weakref.ref(store)
    del store, cache0  # the MooncakeStore object (cache0) held the last reference
    holder.clear()
    gc.collect()
    assert ref() is None
    assert wait_until(
        lambda: not [t for t in threading.enumerate() if t.name == f"mc-store-ping:{host}"]
    )


def sglang_clear(store: MooncakeDistributedStore, total: int) -> None:
    """SGLang's ``clear()`` (``remove_all()`` without force), repeated until the read
    leases of the objects it skipped have run out."""
    removed = [store.remove_all()]
    assert 0 <= removed[0] <= total

    def drained() -> bool:
        removed.append(store.remove_all())
        return sum(removed) == total

    assert wait_until(drained, timeout_s=LEASE_MS / 1000 * 10)


def sglang_direct_linker_load(
    store: MooncakeDistributedStore,
    caches: list[np.ndarray],
    keys: list[str],
    pages: list[int],
    page_bytes: int,
) -> None:
    """MooncakeDirectLinker.load_layer_wise: session start, one range read per layer, end."""
    result = list(store.batch_get_session_start(keys))
    if result != [0] * len(keys):
        raise RuntimeError(f"Mooncake get session start failed: keys={len(keys)}, results={result}")
    try:
        for layer, cache in enumerate(caches):
            ptrs = [[addr(cache) + p * page_bytes] for p in pages]
            sizes = [[page_bytes] for _ in pages]
            offsets = [[layer * page_bytes] for _ in pages]
            got = store.batch_get_into_multi_buffer_ranges(keys, ptrs, sizes, offsets)
            expected = [sum(s) for s in sizes]
            if got is None or isinstance(got, int) or list(got) != expected:
                raise RuntimeError(f"Mooncake range get failed for layer={layer}: {got}")
    finally:
        store.batch_get_session_end(keys)


def test_sglang_direct_linker_layerwise_ranges(stores: Stores) -> None:
    store = stores.new(segment=8 * MiB, protocol="rdma")
    layers, pages, page_bytes = 3, 8, 4096
    # objects hold all layers of one page; the GPU cache is one tensor per layer
    objects = [
        np.frombuffer(np.random.default_rng(20 + i).bytes(layers * page_bytes), np.uint8)
        for i in range(4)
    ]
    keys = [f"direct_{i}_tp0_cp0_pp0" for i in range(4)]
    assert store.put_batch(keys, [o.tobytes() for o in objects]) == 0
    caches = [np.zeros(pages * page_bytes, np.uint8) for _ in range(layers)]
    for cache in caches:
        assert store.register_buffer(addr(cache), cache.nbytes) in (0, None)
    targets = [7, 2, 5, 0]
    sglang_direct_linker_load(store, caches, keys, targets, page_bytes)
    for layer, cache in enumerate(caches):
        for obj, page in zip(objects, targets, strict=True):
            got = cache[page * page_bytes : (page + 1) * page_bytes]
            assert got.tobytes() == obj[layer * page_bytes : (layer + 1) * page_bytes].tobytes()


# ========================================================================================
# LMCache mooncakestore:// connector
# ========================================================================================

METADATA_BYTES_LEN = 28  # LMCache RemoteMetadata: length, shape[4], dtype, fmt as int32


class LmcacheConnector:
    """The store calls of LMCache's MooncakestoreConnector."""

    def __init__(self, stores: Stores, config_path: Path, pinned: np.ndarray) -> None:
        with open(config_path) as fin:
            cfg = json.load(fin)
        self.transfer_timeout = cfg.get("transfer_timeout", 1)
        self.store = stores.track(MooncakeDistributedStore())
        # the return value is not checked by LMCache
        self.setup_rc = self.store.setup(
            cfg.get("local_hostname"),
            cfg.get("metadata_server"),
            cfg.get("global_segment_size", 3355443200),
            cfg.get("local_buffer_size", 1073741824),
            cfg.get("protocol", "tcp"),
            cfg.get("device_name", ""),
            cfg.get("master_server_address"),
        )
        self.replica_config = ReplicateConfig()
        self.replica_config.replica_num = 1
        if cfg.get("prefer_local_alloc", False):
            self.replica_config.preferred_segment = self.store.get_hostname()
        self.pinned = pinned
        result = self.store.register_buffer(addr(pinned), pinned.size)
        self.registered_buffer_ptr = addr(pinned) if result == 0 else None

    async def put_from(self, key: str, ptr: int, size: int) -> None:
        await asyncio.wait_for(
            asyncio.to_thread(self.store.put_from, key, ptr, size, self.replica_config),
            timeout=self.transfer_timeout,
        )

    async def put_with_metadata(self, key: str, metadata: bytes, kv: bytes) -> None:
        await asyncio.wait_for(
            asyncio.to_thread(self.store.put_parts, key, metadata, kv),
            timeout=self.transfer_timeout,
        )

    async def batch_get_into(
        self, keys: list[str], ptrs: list[int], sizes: list[int]
    ) -> list[int | None]:
        n_read = await asyncio.to_thread(self.store.batch_get_into, keys, ptrs, sizes)
        return [n if n > 0 else None for n in n_read]

    async def batch_get_buffer(self, keys: list[str]) -> list[object]:
        return await asyncio.to_thread(self.store.batch_get_buffer, keys)

    def exists(self, key: str) -> bool:
        return bool(self.store.is_exist(key))

    async def close(self) -> int:
        if self.registered_buffer_ptr is not None:
            assert self.store.unregister_buffer(self.registered_buffer_ptr) == 0
            self.registered_buffer_ptr = None
        return self.store.close()


def test_lmcache_mooncakestore_connector(
    cluster: LocalCluster, stores: Stores, tmp_path: Path
) -> None:
    config_path = tmp_path / "lmcache-mooncake.json"
    config_path.write_text(
        json.dumps(
            {
                "local_hostname": LOCAL,
                "metadata_server": cluster.metadata_url,
                "global_segment_size": 8 * MiB,
                "local_buffer_size": 4 * MiB,
                "protocol": "tcp",
                "device_name": "",
                "master_server_address": cluster.master_address,
                "transfer_timeout": 10,
                "prefer_local_alloc": True,
            }
        )
    )
    # chunk = [kv=2, layers=2, tokens=16, hidden=128] fp16
    tokens, per_token = 16, 2 * 2 * 128 * 2
    chunk_bytes = tokens * per_token
    pinned0 = np.zeros(2 * MiB, np.uint8)
    pinned1 = np.zeros(2 * MiB, np.uint8)
    worker0 = LmcacheConnector(stores, config_path, pinned0)
    worker1 = LmcacheConnector(stores, config_path, pinned1)  # another vLLM instance
    assert worker0.setup_rc == worker1.setup_rc == 0
    assert worker0.registered_buffer_ptr is not None
    assert worker0.replica_config.preferred_segment == worker0.store.get_hostname()

    rng = np.random.default_rng(8)
    chunks = [rng.integers(0, 256, chunk_bytes, dtype=np.uint8) for _ in range(3)]
    chunks.append(rng.integers(0, 256, chunk_bytes // 2, dtype=np.uint8))  # last chunk: 8 tokens
    keys = [f"vllm@Qwen3-8B@1@0@{i:064x}" for i in range(4)]

    async def run() -> None:
        # save (optimized mode): memory objects live in the pinned buffer
        for i, chunk in enumerate(chunks):
            off = i * chunk_bytes
            pinned0[off : off + chunk.nbytes] = chunk
            await worker0.put_from(keys[i], addr(pinned0) + off, chunk.nbytes)
        assert all(worker1.exists(k) for k in keys)
        assert not worker1.exists("vllm@Qwen3-8B@1@0@missing")
        for k in keys:  # prefer_local_alloc: the writer's own segment
            (desc,) = worker0.store.get_replica_desc(k)
            endpoint = desc.get_memory_descriptor().buffer_descriptor.transport_endpoint
            assert endpoint == worker0.store.get_hostname()

        # retrieve on the other instance into full-chunk buffers; the last read is short
        wanted = [*keys, "vllm@Qwen3-8B@1@0@missing"]
        ptrs = [addr(pinned1) + i * chunk_bytes for i in range(len(wanted))]
        n_read = await worker1.batch_get_into(wanted, ptrs, [chunk_bytes] * len(wanted))
        assert n_read == [chunk_bytes] * 3 + [chunk_bytes // 2, None]
        for i, chunk in enumerate(chunks):
            n = n_read[i]
            assert n is not None
            assert pinned1[i * chunk_bytes : i * chunk_bytes + n].tobytes() == chunk.tobytes()
            assert n // per_token == (tokens if i < 3 else tokens // 2)  # reshape_partial_chunk

        # legacy mode (save_chunk_meta): metadata + KV bytes as one object, read as handles
        kv = chunks[0].tobytes()
        metadata = struct.pack("<7i", len(kv), 2, 2, tokens, 128, 5, 1)
        assert len(metadata) == METADATA_BYTES_LEN
        await worker0.put_with_metadata("legacy@chunk0", metadata, kv)
        handles = await worker1.batch_get_buffer(["legacy@chunk0", "legacy@missing"])
        assert handles[1] is None
        view = memoryview(handles[0])  # type: ignore[arg-type]
        assert len(view) == METADATA_BYTES_LEN + len(kv)
        assert struct.unpack("<7i", view[:METADATA_BYTES_LEN])[0] == len(kv)
        assert np.frombuffer(handles[0], np.uint8, offset=METADATA_BYTES_LEN).tobytes() == kv  # type: ignore[call-overload]
        view.release()
        del handles

        # a missing key is b"" (LMCache PR #497), not None
        assert worker1.store.get("vllm@Qwen3-8B@1@0@missing") == b""
        assert await worker1.close() == 0
        assert await worker0.close() == 0

    asyncio.run(run())
