"""The reference engine and ours find each other through one etcd and move data
both ways: on one host, and across two "hosts" (network namespaces) with etcd
listening on the first host's address as the troubleshooting guide says.

The reference wheel is built with etcd (``-DUSE_ETCD=ON``); it stores
``mooncake/rpc_meta/<name>`` and ``mooncake/ram/<name>`` with plain puts, we
claim ``rpc_meta`` with a create-if-absent transaction -- same keys, same JSON.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from interop_support import (
    GuardedMemory,
    KiB,
    MiB,
    RefPeer,
    assert_same,
)

from pymooncake import TransferEngine
from pymooncake._etcd import EtcdClient
from pymooncake.config import EngineConfig
from pymooncake.testing import EtcdCluster, NetnsNetwork, find_tool
from pymooncake.testing.fixtures import etcd_cluster, netns  # noqa: F401  (fixtures)

pytestmark = pytest.mark.interop

SIZES = [1, 4 * KiB + 7, 3 * MiB + 5]
BUFFER = 4 * MiB


@dataclass
class EtcdPair:
    ref: RefPeer
    ours: TransferEngine
    ref_name: str
    our_name: str
    ref_buf: int
    our_buf: GuardedMemory
    etcd_endpoints: str


def _name(side: str) -> str:
    return f"{side}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def open_pair(
    ref_peers: Callable[..., RefPeer],
) -> Iterator[Callable[..., EtcdPair]]:
    """``open_pair(ref_metadata, our_metadata, ref_host, our_host, endpoints)``: a
    reference peer and our engine on this host; closed after the test."""
    made: list[tuple[TransferEngine, GuardedMemory]] = []

    def make(
        ref_metadata: str,
        our_metadata: str,
        ref_host: str,
        our_host: str,
        endpoints: str,
    ) -> EtcdPair:
        ref = ref_peers("etcd", {"MC_TCP_BIND_ADDRESS": ref_host})
        ref_name, our_name = _name("ref"), _name("ours")
        ref.init(ref_name, ref_metadata)
        ref_buf = ref.alloc(BUFFER)
        ours = TransferEngine(
            our_name,
            our_metadata,
            config=EngineConfig(tcp_bind_address=our_host, transfer_timeout_s=10.0),
        )
        mem = GuardedMemory(BUFFER)
        made.append((ours, mem))
        ours.register(mem.addr, mem.size)
        return EtcdPair(ref, ours, ref_name, our_name, ref_buf, mem, endpoints)

    try:
        yield make
    finally:
        for ours, mem in made:
            ours.close()
            mem.close()


def _exchange_both_ways(pair: EtcdPair, rng: random.Random) -> None:
    for size in SIZES:
        # ours -> reference: WRITE then READ back
        data = rng.randbytes(size)
        pair.our_buf.view[:size] = data
        pair.ours.write(pair.ref_name, pair.our_buf.addr, pair.ref_buf, size)
        assert_same(pair.ref.read_bytes(pair.ref_buf, size), data, "reference buffer")
        pair.ref.write_bytes(pair.ref_buf, data[::-1])
        pair.ours.read(pair.ref_name, pair.our_buf.addr, pair.ref_buf, size)
        assert_same(pair.our_buf.view[:size], data[::-1], "our buffer")
        # reference -> ours: WRITE then READ back
        data = rng.randbytes(size)
        pair.ref.write_bytes(pair.ref_buf, data)
        rc = pair.ref.call(
            "transfer_sync_write",
            segment=pair.our_name,
            local=pair.ref_buf,
            remote=pair.our_buf.addr,
            length=size,
        )
        assert rc == 0
        assert_same(pair.our_buf.view[:size], data, "our buffer (written by the reference)")
        pair.our_buf.view[:size] = data[::-1]
        rc = pair.ref.call(
            "transfer_sync_read",
            segment=pair.our_name,
            local=pair.ref_buf,
            remote=pair.our_buf.addr,
            length=size,
        )
        assert rc == 0
        assert_same(pair.ref.read_bytes(pair.ref_buf, size), data[::-1], "reference buffer")
    assert pair.our_buf.canaries_intact()


def _published(endpoints: str, name: str) -> dict[str, object]:
    with EtcdClient(endpoints) as etcd:
        meta = etcd.get(f"mooncake/rpc_meta/{name}")
        seg = etcd.get(f"mooncake/ram/{name}")
    assert meta is not None and seg is not None, name
    return {"rpc_meta": json.loads(meta.value), "segment": json.loads(seg.value)}


def test_reference_and_pymooncake_through_one_etcd(
    etcd_cluster: EtcdCluster,  # noqa: F811
    open_pair: Callable[..., EtcdPair],
) -> None:
    # the reference given "etcd://...", ours the bare "host:port" (both mean etcd)
    pair = open_pair(
        etcd_cluster.url, etcd_cluster.endpoints, "127.0.0.1", "127.0.0.1", etcd_cluster.endpoints
    )
    _exchange_both_ways(pair, random.Random(7))
    ref_entry = _published(etcd_cluster.endpoints, pair.ref_name)
    our_entry = _published(etcd_cluster.endpoints, pair.our_name)
    ref_meta, our_meta = ref_entry["rpc_meta"], our_entry["rpc_meta"]
    assert isinstance(ref_meta, dict) and isinstance(our_meta, dict)
    assert set(ref_meta) == set(our_meta) == {"ip_or_host_name", "rpc_port"}
    ref_seg, our_seg = ref_entry["segment"], our_entry["segment"]
    assert isinstance(ref_seg, dict) and isinstance(our_seg, dict)
    assert ref_seg["protocol"] == our_seg["protocol"] == "tcp"
    assert ref_seg["name"] == pair.ref_name and our_seg["name"] == pair.our_name
    pair.ours.close()  # ours removes its entries when it stops
    with EtcdClient(etcd_cluster.endpoints) as etcd:
        assert etcd.get(f"mooncake/rpc_meta/{pair.our_name}") is None
        assert etcd.get(f"mooncake/ram/{pair.our_name}") is None


def _python_in(host_netns: str, python: str, tmp_path: Path) -> str:
    """An executable that runs ``python`` inside a network namespace."""
    wrapper = tmp_path / "python-in-netns"
    wrapper.write_text(f'#!/bin/sh\nexec {find_tool("ip")} netns exec {host_netns} {python} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def test_reference_on_another_host_through_etcd_on_this_one(
    ref_python: str,
    netns: Callable[[int], NetnsNetwork],  # noqa: F811
    tmp_path: Path,
) -> None:
    """Two hosts: this one runs etcd (listening on 0.0.0.0, advertising its
    address) and our engine; the other runs the reference engine."""
    net = netns(1)
    other = net.hosts[0]
    with EtcdCluster(hosts=[net.gateway], listen_any=True) as cluster:
        env = {"MC_TCP_BIND_ADDRESS": other.address}
        wrapped = _python_in(other.netns, ref_python, tmp_path)
        ref = RefPeer(wrapped, "etcd-netns", tmp_path / "ref.stderr", env)
        ours: TransferEngine | None = None
        mem = GuardedMemory(BUFFER)
        try:
            ref_name, our_name = _name("ref"), _name("ours")
            ref.init(ref_name, f"{net.gateway}:{cluster.members[0].client_port}")
            ref_buf = ref.alloc(BUFFER)
            ours = TransferEngine(
                our_name,
                cluster.url,
                config=EngineConfig(tcp_bind_address=net.gateway, transfer_timeout_s=10.0),
            )
            ours.register(mem.addr, mem.size)
            pair = EtcdPair(ref, ours, ref_name, our_name, ref_buf, mem, cluster.endpoints)
            _exchange_both_ways(pair, random.Random(11))
            assert _published(cluster.endpoints, ref_name)["rpc_meta"] == {
                "ip_or_host_name": other.address,
                "rpc_port": ref.rpc_port,
            }
            assert _published(cluster.endpoints, our_name)["rpc_meta"] == {
                "ip_or_host_name": net.gateway,
                "rpc_port": ours.rpc_port,
            }
        finally:
            ref.close()
            if ours is not None:
                ours.close()
            mem.close()
