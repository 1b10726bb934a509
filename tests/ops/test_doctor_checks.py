"""Each doctor check as a pure function over scripted probes: a PASS case and a
FAIL/WARN case per check, asserting the reason names the concrete value."""

from __future__ import annotations

import json
from typing import Any

import pytest
from ops_fakes import FakeProbes, rdma_tree

from pymooncake.config import EngineConfig
from pymooncake.errors import RpcFailed, store_error
from pymooncake.ops import DoctorInputs, Status, run_doctor
from pymooncake.ops._host_checks import (
    check_max_map_count,
    check_memlock,
    check_protocol,
    check_rdma_devices,
    check_rdma_env,
    matrix_devices,
)
from pymooncake.ops._net_checks import (
    advertised_address,
    check_local_hostname,
    check_proxy,
    check_rpc_ports,
)
from pymooncake.ops._peer_checks import check_peer
from pymooncake.ops._probes import RedisReplyError
from pymooncake.ops._service_checks import (
    check_master,
    check_metadata,
    check_metadata_exposure,
)
from pymooncake.wire import MessageType, RpcMeta, dumps_json, encode_rpc_meta

LAN = "10.0.0.5"
PEER = "10.0.0.6"
META = "http://10.0.0.1:8080/metadata"


def inputs(**kw: Any) -> DoctorInputs:
    kw.setdefault("local_hostname", LAN)
    return DoctorInputs(**kw)


def hostname_result(inp: DoctorInputs, probes: FakeProbes, remote: list[str] | None = None) -> Any:
    return check_local_hostname(inp, probes, advertised_address(inp, probes), remote or [])


# --- local_hostname --------------------------------------------------------------------


def test_local_hostname_pass_for_an_address_of_this_host() -> None:
    r = hostname_result(inputs(), FakeProbes())
    assert r.status is Status.PASS
    assert "peers reach this node at 10.0.0.5" in r.reason


def test_local_hostname_loopback_is_a_warning_on_one_host() -> None:
    r = hostname_result(inputs(local_hostname="127.0.0.1"), FakeProbes())
    assert r.status is Status.WARN
    assert "loopback address 127.0.0.1" in r.reason
    assert "10.0.0.5" in r.fix  # the fix names this host's real address


def test_local_hostname_loopback_fails_when_peers_are_remote() -> None:
    r = hostname_result(
        inputs(local_hostname="localhost"), FakeProbes(names={"localhost": ["127.0.0.1"]}), [PEER]
    )
    assert r.status is Status.FAIL
    assert "'localhost' resolves to the loopback address 127.0.0.1" in r.reason
    assert PEER in r.reason


def test_local_hostname_of_another_machine_fails() -> None:
    r = hostname_result(inputs(local_hostname="10.9.9.9"), FakeProbes())
    assert r.status is Status.FAIL
    assert "10.9.9.9" in r.reason and "not an address of this host" in r.reason


def test_local_hostname_that_does_not_resolve_fails() -> None:
    r = hostname_result(inputs(local_hostname="no-such-host.invalid"), FakeProbes())
    assert r.status is Status.FAIL
    assert "cannot resolve 'no-such-host.invalid'" in r.reason


def test_local_hostname_missing_fails() -> None:
    r = hostname_result(inputs(local_hostname=""), FakeProbes())
    assert r.status is Status.FAIL and "no local_hostname given" in r.reason


def test_a_name_with_a_metadata_server_advertises_the_first_lan_address() -> None:
    # TransferEngine._start: outside P2P a non-IP name advertises the first LAN IPv4
    inp = inputs(local_hostname="localhost", metadata_server=META)
    adv = advertised_address(inp, FakeProbes(names={"localhost": ["127.0.0.1"]}))
    assert adv.ip == LAN and "first non-loopback" in adv.how
    inp = inputs(
        local_hostname="localhost",
        metadata_server=META,
        engine=EngineConfig(tcp_bind_address="127.0.0.1"),
    )
    assert advertised_address(inp, FakeProbes()).ip == "127.0.0.1"


# --- rpc ports --------------------------------------------------------------------------


def small_range(lo: int = 20000, hi: int = 20003) -> EngineConfig:
    return EngineConfig(rpc_port_min=lo, rpc_port_max=hi)


def test_rpc_ports_pass_when_free() -> None:
    inp = inputs(engine=small_range())
    r = check_rpc_ports(inp, FakeProbes(), advertised_address(inp, FakeProbes()))
    assert r.status is Status.PASS
    assert "4 of 4 ports in [20000, 20003]" in r.reason


def test_rpc_ports_fail_when_the_range_is_taken() -> None:
    inp = inputs(engine=small_range())
    probes = FakeProbes(busy=[(LAN, p) for p in range(20000, 20003)])
    r = check_rpc_ports(inp, probes, advertised_address(inp, probes))
    assert r.status is Status.FAIL
    assert r.reason.startswith("bind address already in use: only 1 of 4 ports")
    assert "MC_MIN_RPC_PORT/MC_MAX_RPC_PORT" in r.fix


def test_rpc_ports_fixed_port_taken_fails() -> None:
    inp = inputs(local_hostname=f"{LAN}:12001", engine=EngineConfig(legacy_rpc_port_binding=True))
    probes = FakeProbes(busy=[(LAN, 12001)])
    r = check_rpc_ports(inp, probes, advertised_address(inp, probes))
    assert r.status is Status.FAIL
    assert "bind address already in use: port 12001 on 10.0.0.5" in r.reason


def test_rpc_ports_overlapping_the_ephemeral_range_warn() -> None:
    inp = inputs(engine=small_range(32768, 32800))
    probes = FakeProbes(proc={"sys/net/ipv4/ip_local_port_range": "32768\t60999"})
    r = check_rpc_ports(inp, probes, advertised_address(inp, probes))
    assert r.status is Status.WARN
    assert "ephemeral ports [32768, 60999]" in r.reason


def test_store_clients_use_their_own_port_range() -> None:
    inp = inputs(store_port_range=(12300, 12301), master_server_address="10.0.0.1:50051")
    r = check_rpc_ports(inp, FakeProbes(), advertised_address(inp, FakeProbes()))
    assert "[12300, 12301] (MC_STORE_CLIENT_MIN_PORT/MC_STORE_CLIENT_MAX_PORT)" in r.reason


# --- metadata server ------------------------------------------------------------------------


def test_http_metadata_server_pass() -> None:
    probes = FakeProbes(listening=[("10.0.0.1", 8080)], http={META: (404, b"metadata not found")})
    r = check_metadata(inputs(metadata_server=META), probes)
    assert r.status is Status.PASS and "HTTP 404" in r.reason


def test_http_metadata_server_refused_fails() -> None:
    r = check_metadata(inputs(metadata_server=META), FakeProbes())
    assert r.status is Status.FAIL
    assert "connection refused by 10.0.0.1:8080" in r.reason
    assert "bound to 127.0.0.1" in r.reason
    assert "--host 0.0.0.0" in r.fix


def test_http_metadata_server_on_a_wrong_path_fails() -> None:
    probes = FakeProbes(listening=[("10.0.0.1", 8080)], http={META: (405, b"nope")})
    r = check_metadata(inputs(metadata_server=META), probes)
    assert r.status is Status.FAIL and "HTTP 405" in r.reason


def test_etcd_pass_fail_and_partial() -> None:
    healthy = FakeProbes(
        listening=[("10.0.0.1", 2379)],
        http={
            "http://10.0.0.1:2379/health": (200, b'{"health":"true"}'),
            "http://10.0.0.1:2379/version": (200, b'{"etcdserver":"3.4.23"}'),
        },
    )
    r = check_metadata(inputs(metadata_server="etcd://10.0.0.1:2379"), healthy)
    assert r.status is Status.PASS and "etcd 3.4.23" in r.reason
    r = check_metadata(inputs(metadata_server="10.0.0.1:2379,10.0.0.2:2379"), healthy)
    assert r.status is Status.WARN and "10.0.0.2:2379" in r.reason
    r = check_metadata(inputs(metadata_server="etcd://10.0.0.2:2379"), healthy)
    assert r.status is Status.FAIL and "Error from etcd client" in r.reason
    assert "--listen-client-urls http://0.0.0.0:2379" in r.fix


def test_redis_pass_and_auth_failure() -> None:
    up = FakeProbes(listening=[("10.0.0.1", 6379)])
    r = check_metadata(inputs(metadata_server="redis://10.0.0.1:6379"), up)
    assert r.status is Status.PASS
    locked = FakeProbes(
        listening=[("10.0.0.1", 6379)], redis=RedisReplyError("NOAUTH Authentication required.")
    )
    r = check_metadata(inputs(metadata_server="redis://10.0.0.1:6379"), locked)
    assert r.status is Status.FAIL and "MC_REDIS_PASSWORD" in r.fix


def test_redis_credentials_come_from_the_environment() -> None:
    probes = FakeProbes(listening=[("10.0.0.1", 6379)])
    inp = inputs(
        metadata_server="redis://10.0.0.1:6379",
        env={"MC_REDIS_PASSWORD": "s3cret", "MC_REDIS_DB_INDEX": "2"},
    )
    check_metadata(inp, probes)
    address, args = next(c[1] for c in probes.calls if c[0] == "redis")
    assert address == ":s3cret@10.0.0.1:6379/2" and args == ["PING"]


def test_p2p_memory_and_unknown_metadata() -> None:
    assert (
        check_metadata(inputs(metadata_server="P2PHANDSHAKE"), FakeProbes()).status is Status.PASS
    )
    assert check_metadata(inputs(metadata_server="memory://x"), FakeProbes()).status is Status.WARN
    assert check_metadata(inputs(metadata_server="zk://x"), FakeProbes()).status is Status.FAIL
    assert check_metadata(inputs(), FakeProbes()).status is Status.SKIP


# --- metadata exposure ------------------------------------------------------------------------


LOOP_META = "http://127.0.0.1:8080/metadata"


def test_metadata_bound_to_loopback_only_fails_with_remote_peers() -> None:
    probes = FakeProbes(listening=[("127.0.0.1", 8080)])
    r = check_metadata_exposure(inputs(metadata_server=LOOP_META), probes, True, [PEER])
    assert r.status is Status.FAIL
    assert "answers on loopback only: 10.0.0.5:8080 refuse connections" in r.reason
    r = check_metadata_exposure(inputs(metadata_server=LOOP_META), probes, True, [])
    assert r.status is Status.WARN


def test_metadata_listening_on_every_address_passes() -> None:
    probes = FakeProbes(listening=[("127.0.0.1", 8080), (LAN, 8080)])
    r = check_metadata_exposure(inputs(metadata_server=LOOP_META), probes, True, [PEER])
    assert r.status is Status.PASS
    assert "peers on other hosts can use 10.0.0.5:8080" in r.reason
    assert (
        check_metadata_exposure(inputs(metadata_server=META), probes, True, [PEER]).status
        is Status.PASS
    )
    assert (
        check_metadata_exposure(inputs(metadata_server=META), probes, False, [PEER]).status
        is Status.SKIP
    )


# --- proxies ----------------------------------------------------------------------------------


def test_proxy_variables_that_intercept_the_metadata_server_warn() -> None:
    r = check_proxy(inputs(metadata_server=META, env={"http_proxy": "http://proxy:3128"}))
    assert r.status is Status.WARN
    assert "http_proxy=http://proxy:3128 would route HTTP requests for 10.0.0.1:8080" in r.reason
    assert "no_proxy" in r.fix
    r = check_proxy(inputs(metadata_server=META, env={"HTTP_PROXY": "http://proxy:3128"}))
    assert r.status is Status.WARN and "HTTP_PROXY" in r.reason
    r = check_proxy(
        inputs(metadata_server="etcd://10.0.0.1:2379", env={"https_proxy": "http://p:1"})
    )
    assert r.status is Status.WARN and "etcd (gRPC)" in r.reason


@pytest.mark.parametrize("no_proxy", ["10.0.0.1", ".0.0.1", "10.0.0.0/8", "*", "10.0.0.1:8080"])
def test_no_proxy_exempts_the_metadata_server(no_proxy: str) -> None:
    env = {"http_proxy": "http://proxy:3128", "no_proxy": no_proxy}
    r = check_proxy(inputs(metadata_server=META, env=env))
    assert r.status is Status.PASS and "none applies" in r.reason


def test_no_proxy_variables_pass_and_p2p_skips() -> None:
    assert check_proxy(inputs(metadata_server=META)).status is Status.PASS
    r = check_proxy(inputs(metadata_server="P2PHANDSHAKE", env={"http_proxy": "x"}))
    assert r.status is Status.SKIP
    r = check_proxy(inputs(metadata_server=META, env={"https_proxy": "http://p:1"}))
    assert r.status is Status.PASS  # an https proxy does not apply to an http:// server


# --- master -------------------------------------------------------------------------------------


def test_master_pass_and_failures() -> None:
    addr = "10.0.0.1:50051"
    up = FakeProbes(listening=[("10.0.0.1", 50051)], master={addr: "pymooncake-master/2"})
    r = check_master(inputs(master_server_address=addr), up, [])
    assert r.status is Status.PASS and "protocol pymooncake-master/2" in r.reason
    r = check_master(inputs(master_server_address=addr), FakeProbes(), [])
    assert (
        r.status is Status.FAIL
        and "connection refused by 10.0.0.1:50051 (store master)" in r.reason
    )
    old = FakeProbes(
        listening=[("10.0.0.1", 50051)], master={addr: store_error(-904, "speaks 'x'")}
    )
    r = check_master(inputs(master_server_address=addr), old, [])
    assert r.status is Status.FAIL and "speaks 'x'" in r.reason
    ref = FakeProbes(listening=[("10.0.0.1", 50051)], master={addr: RpcFailed("closed")})
    r = check_master(inputs(master_server_address=addr), ref, [])
    assert r.status is Status.FAIL and "reference mooncake_master (coro_rpc)" in r.reason
    assert check_master(inputs(), up, []).status is Status.SKIP


def test_master_behind_etcd_is_found_as_the_guide_deploys_it() -> None:
    """``etcd://`` (master HA): the doctor reads the leader from the masters'
    election key, as clients do, and checks that master."""
    addr = "10.0.0.1:50051"
    ha = "etcd://10.0.0.9:2379;10.0.0.8:2379"
    key = "mooncake-store/mooncake_cluster/master_view"
    up = FakeProbes(
        listening=[("10.0.0.1", 50051)],
        master={addr: "pymooncake-master/3"},
        metadata={key: addr.encode()},
    )
    r = check_master(inputs(master_server_address=ha), up, [])
    assert r.status is Status.PASS, r.line()
    assert "etcd at 10.0.0.9:2379 names 10.0.0.1:50051 the leader" in r.reason
    assert "protocol pymooncake-master/3" in r.reason and r.details["ha"] is True
    # nobody leads the cluster the clients name (MC_STORE_CLUSTER_ID)
    r = check_master(inputs(master_server_address=ha, env={"MC_STORE_CLUSTER_ID": "other"}), up, [])
    assert r.status is Status.FAIL and "no master leads cluster 'other'" in r.reason
    assert "--cluster_id=other" in r.fix and "MC_STORE_CLUSTER_ID" in r.fix
    # the leader named there is down
    down = FakeProbes(master={addr: "pymooncake-master/3"}, metadata={key: addr.encode()})
    r = check_master(inputs(master_server_address=ha), down, [])
    assert r.status is Status.FAIL and "names 10.0.0.1:50051 the leader" in r.reason
    assert "connection refused by 10.0.0.1:50051 (store master)" in r.reason
    # masters elect through etcd only
    r = check_master(inputs(master_server_address="redis://10.0.0.1:6379"), up, [])
    assert r.status is Status.FAIL and "etcd only" in r.reason


def test_master_on_loopback_only_fails_with_remote_peers() -> None:
    addr = "127.0.0.1:50051"
    probes = FakeProbes(listening=[("127.0.0.1", 50051)], master={addr: "pymooncake-master/2"})
    r = check_master(inputs(master_server_address=addr), probes, [PEER])
    assert r.status is Status.FAIL and "loopback only" in r.reason
    assert "--rpc_address=0.0.0.0" in r.fix


# --- peers ---------------------------------------------------------------------------------------


def descriptor(name: str, host: str, data_port: int) -> bytes:
    return dumps_json(
        {
            "name": name,
            "protocol": "tcp",
            "tcp_data_port": data_port,
            "tcp_proto_version": 2,
            "timestamp": "1",
            "rdma_server_name": "",
            "tcp_data_host": host,
            "buffers": [{"name": name, "addr": 4096, "length": 4096, "rkey": [], "lkey": []}],
            "devices": [],
        }
    )


def store_peer(name: str = f"{PEER}:15001") -> FakeProbes:
    return FakeProbes(
        metadata={
            f"mooncake/ram/{name}": descriptor(name, PEER, 15002),
            f"mooncake/rpc_meta/{name}": dumps_json(encode_rpc_meta(RpcMeta(PEER, 15001))),
        },
        listening=[(PEER, 15001), (PEER, 15002)],
        rpc={(PEER, 15001, MessageType.PROBE): {}},
    )


def test_peer_with_a_descriptor_and_open_ports_passes() -> None:
    facts = check_peer(inputs(metadata_server=META), store_peer(), f"{PEER}:15001")
    assert facts.result.status is Status.PASS, facts.result
    assert "RPC 10.0.0.6:15001 and data 10.0.0.6:15002 reachable" in facts.result.reason
    assert facts.remote is True


def test_wrong_segment_name_fails_with_the_guides_message() -> None:
    facts = check_peer(inputs(metadata_server=META), store_peer(), PEER)
    r = facts.result
    assert r.status is Status.FAIL
    assert r.reason.startswith(f"Failed to get description of {PEER}")
    assert "no descriptor under 'mooncake/ram/10.0.0.6'" in r.reason
    assert "the name has no port" in r.reason
    assert facts.remote is True  # judged from the name's host part


def test_peer_whose_data_port_is_closed_fails() -> None:
    probes = store_peer()
    probes.listening.discard((PEER, 15002))
    r = check_peer(inputs(metadata_server=META), probes, f"{PEER}:15001").result
    assert r.status is Status.FAIL
    assert "connection refused by 10.0.0.6:15002 (TCP data port of segment" in r.reason


def test_p2p_peer_checks() -> None:
    name = f"{PEER}:15001"
    probes = FakeProbes(
        listening=[(PEER, 15001), (PEER, 15002)],
        rpc={
            (PEER, 15001, MessageType.METADATA): json.loads(descriptor(name, PEER, 15002)),
            (PEER, 15001, MessageType.PROBE): {},
        },
    )
    r = check_peer(inputs(metadata_server="P2PHANDSHAKE"), probes, name).result
    assert r.status is Status.PASS, r
    r = check_peer(inputs(metadata_server="P2PHANDSHAKE"), probes, PEER).result
    assert r.status is Status.FAIL and "has no ':port' part" in r.reason
    r = check_peer(inputs(metadata_server="P2PHANDSHAKE"), probes, f"{PEER}:1").result
    assert r.status is Status.FAIL and "connection refused by 10.0.0.6:1" in r.reason


# --- protocol and RDMA --------------------------------------------------------------------------


def test_protocol() -> None:
    assert check_protocol(inputs()).status is Status.PASS
    r = check_protocol(inputs(protocol="rdma"))
    assert r.status is Status.WARN and "moves data over tcp" in r.reason
    assert "typo" in check_protocol(inputs(protocol="rmda")).reason


@pytest.mark.parametrize(
    ("env", "text"),
    [
        ({"MC_MTU": "1500"}, "MC_MTU=1500 is not one of 512|1024|2048|4096"),
        ({"MC_GID_INDEX": "300"}, "MC_GID_INDEX=300 is outside 0..255"),
        ({"NCCL_IB_GID_INDEX": "x"}, "NCCL_IB_GID_INDEX='x' is not an integer"),
        ({"MC_IB_PORT": "0"}, "MC_IB_PORT=0 is outside 1..255"),
    ],
)
def test_rdma_env_invalid_values_fail(env: dict[str, str], text: str) -> None:
    r = check_rdma_env(inputs(env=env))
    assert r.status is Status.FAIL and text in r.reason


def test_rdma_env_valid_values_pass() -> None:
    r = check_rdma_env(inputs(env={"MC_MTU": "1024", "MC_GID_INDEX": "3", "MC_IB_PORT": "2"}))
    assert r.status is Status.PASS and "MTU 1024, GID index 3, IB port 2" in r.reason


def rdma_inputs(**kw: Any) -> DoctorInputs:
    kw.setdefault("protocol", "rdma")
    kw.setdefault("device_names", ("mlx5_0",))
    return inputs(**kw)


def test_rdma_device_active_with_a_gid_passes() -> None:
    probes = FakeProbes(sys=rdma_tree(), dev={"infiniband/uverbs0"})
    (r,) = check_rdma_devices(rdma_inputs(), probes)
    assert r.check == "rdma_device:mlx5_0" and r.status is Status.PASS, r
    assert "port 1 ACTIVE" in r.reason


def test_missing_device_fails_with_no_matched_device() -> None:
    (r,) = check_rdma_devices(rdma_inputs(device_names=("mlx5_9",)), FakeProbes(sys=rdma_tree()))
    assert r.status is Status.FAIL
    assert "No matched device found: 'mlx5_9'" in r.reason and "mlx5_0" in r.reason


def test_down_port_fails_with_port_not_active() -> None:
    probes = FakeProbes(
        sys=rdma_tree(state="1: DOWN", phys="3: Disabled"), dev={"infiniband/uverbs0"}
    )
    (r,) = check_rdma_devices(rdma_inputs(), probes)
    assert r.status is Status.FAIL
    assert "Device mlx5_0 port 1 not active (state DOWN, physical state Disabled)" in r.reason


def test_all_zero_gid_fails_with_gid_is_null() -> None:
    zero = "0000:0000:0000:0000:0000:0000:0000:0000"
    probes = FakeProbes(sys=rdma_tree(gids={0: zero, 1: zero}), dev={"infiniband/uverbs0"})
    (r,) = check_rdma_devices(rdma_inputs(), probes)
    assert r.status is Status.FAIL and "GID is NULL" in r.reason and "MC_GID_INDEX" in r.fix
    good = rdma_tree(gids={0: "fe80:0000:0000:0000:0202:c9ff:fe00:0001", 3: zero})
    (r,) = check_rdma_devices(rdma_inputs(env={"MC_GID_INDEX": "3"}), FakeProbes(sys=good))
    assert r.status is Status.FAIL and "index 3 (MC_GID_INDEX)" in r.reason


def test_auto_gid_prefers_a_routable_roce_v2_gid() -> None:
    gids = {
        0: "fe80:0000:0000:0000:0202:c9ff:fe00:0001",
        1: "fe80:0000:0000:0000:0202:c9ff:fe00:0001",
        3: "0000:0000:0000:0000:0000:ffff:0a00:0005",
    }
    types = {0: "IB/RoCE v1", 1: "RoCE v2", 3: "RoCE v2"}
    probes = FakeProbes(sys=rdma_tree(gids=gids, types=types), dev={"infiniband/uverbs0"})
    (r,) = check_rdma_devices(rdma_inputs(), probes)
    assert r.status is Status.PASS and r.details["gid_index"] == 3


def test_mtu_above_the_active_mtu_warns() -> None:
    probes = FakeProbes(sys=rdma_tree(ndev="eth0", ndev_mtu=1500), dev={"infiniband/uverbs0"})
    (r,) = check_rdma_devices(rdma_inputs(env={"MC_MTU": "4096"}), probes)
    assert r.status is Status.WARN and "active MTU 1024" in r.reason
    (r,) = check_rdma_devices(rdma_inputs(env={"MC_MTU": "1024"}), probes)
    assert r.status is Status.PASS


def test_nic_priority_matrix_devices_are_checked() -> None:
    matrix = json.dumps({"cpu:0": [["mlx5_0"], ["mlx5_1"]]})
    assert matrix_devices(matrix) == (["mlx5_0", "mlx5_1"], "")
    probes = FakeProbes(sys=rdma_tree(), dev={"infiniband/uverbs0"})
    results = check_rdma_devices(inputs(nic_priority_matrix=matrix), probes)
    assert [(r.check, r.status) for r in results] == [
        ("rdma_device:mlx5_0", Status.PASS),
        ("rdma_device:mlx5_1", Status.FAIL),
    ]
    bad = check_rdma_devices(inputs(nic_priority_matrix='{"cpu:0": [["mlx5_0"]]}'), probes)
    assert bad[0].check == "nic_priority_matrix" and bad[0].status is Status.FAIL


def test_rdma_devices_skip_for_tcp() -> None:
    (r,) = check_rdma_devices(inputs(), FakeProbes())
    assert r.status is Status.SKIP


# --- memory limits -------------------------------------------------------------------------------


def limits(soft: str, hard: str) -> str:
    return (
        "Limit                     Soft Limit           Hard Limit           Units     \n"
        f"Max locked memory         {soft:<20} {hard:<20} bytes     \n"
    )


NO_CAPS = "Name:\tpython\nCapEff:\t0000000000000000\n"
ALL_CAPS = "Name:\tpython\nCapEff:\t000001ffffffffff\n"


def test_memlock_too_low_for_rdma_fails() -> None:
    probes = FakeProbes(proc={"self/limits": limits("8388608", "8388608"), "self/status": NO_CAPS})
    r = check_memlock(rdma_inputs(global_segment_size=1 << 30), probes)
    assert r.status is Status.FAIL
    assert "RLIMIT_MEMLOCK) is 8.0 MiB, below the 1.0 GiB to register" in r.reason
    assert "ulimit -l unlimited" in r.fix


def test_memlock_enough_passes() -> None:
    unlimited = FakeProbes(
        proc={"self/limits": limits("unlimited", "unlimited"), "self/status": NO_CAPS}
    )
    assert check_memlock(rdma_inputs(global_segment_size=1 << 30), unlimited).status is Status.PASS
    capped = FakeProbes(proc={"self/limits": limits("65536", "65536"), "self/status": ALL_CAPS})
    r = check_memlock(rdma_inputs(global_segment_size=1 << 30), capped)
    assert r.status is Status.PASS and "CAP_IPC_LOCK" in r.reason
    low = FakeProbes(proc={"self/limits": limits("65536", "65536"), "self/status": NO_CAPS})
    assert check_memlock(inputs(global_segment_size=1 << 30), low).status is Status.PASS  # tcp


def test_max_map_count() -> None:
    maps = "\n".join(f"map{i}" for i in range(500))
    ok = FakeProbes(proc={"sys/vm/max_map_count": "65530", "self/maps": maps})
    r = check_max_map_count(inputs(global_segment_size=1 << 30), ok)
    assert r.status is Status.PASS and "500 mappings in use" in r.reason
    tight = FakeProbes(proc={"sys/vm/max_map_count": "1200", "self/maps": maps})
    r = check_max_map_count(inputs(), tight)
    assert r.status is Status.FAIL and "vm.max_map_count=1200 leaves no room" in r.reason
    low = FakeProbes(proc={"sys/vm/max_map_count": "30000", "self/maps": maps})
    assert check_max_map_count(inputs(), low).status is Status.WARN


# --- the whole run ---------------------------------------------------------------------------------


def test_run_doctor_orders_results_and_sets_the_exit_code() -> None:
    probes = store_peer()
    probes.listening.add(("10.0.0.1", 8080))
    probes.http[META] = (404, b"")
    report = run_doctor(
        inputs(metadata_server=META, peers=(f"{PEER}:15001",), engine=small_range()), probes
    )
    assert report.checks()[:7] == [
        "inputs",
        "local_hostname",
        "rpc_ports",
        "metadata_server",
        "metadata_exposure",
        "proxy",
        "master",
    ]
    assert report.by_check(f"peer:{PEER}:15001").status is Status.PASS
    assert report.ok and report.exit_code == 0
    bad = run_doctor(
        inputs(
            local_hostname="127.0.0.1",
            peers=(f"{PEER}:15001",),
            metadata_server=META,
            engine=small_range(),
        ),
        probes,
    )
    assert bad.by_check("local_hostname").status is Status.FAIL
    assert bad.exit_code == 1
    text = bad.format_text()
    assert len(text.splitlines()) == len(bad.results) + 1
    assert text.splitlines()[1].startswith("FAIL  local_hostname")
    data = json.loads(bad.dumps())
    assert data["ok"] is False and data["counts"]["FAIL"] >= 1


def test_inputs_problems_fail_first() -> None:
    inp = DoctorInputs.from_sources({"global_segment_size": "lots"}, {"MC_MIN_RPC_PORT": "x"})
    report = run_doctor(inp, FakeProbes())
    r = report.by_check("inputs")
    assert r.status is Status.FAIL
    assert "MC_MIN_RPC_PORT='x' is not an integer" in r.reason
    assert "global_segment_size: 'lots' is not a size" in r.reason


def test_inputs_precedence_flags_file_env() -> None:
    env = {
        "MOONCAKE_LOCAL_HOSTNAME": "envhost",
        "MOONCAKE_MASTER": "m:1",
        "MOONCAKE_PROTOCOL": "TCP",
    }
    inp = DoctorInputs.from_sources({}, env, {"local_hostname": "filehost"}, file_name="c.json")
    assert inp.local_hostname == "filehost" and inp.sources["local_hostname"] == "file c.json"
    assert (
        inp.master_server_address == "m:1"
        and inp.sources["master_server_address"] == "MOONCAKE_MASTER"
    )
    assert inp.protocol == "tcp" and inp.store_port_range == (12300, 14300)
    inp = DoctorInputs.from_sources(
        {"local_hostname": "flaghost", "device_name": "mlx5_0, mlx5_1"}, env
    )
    assert inp.local_hostname == "flaghost" and inp.device_names == ("mlx5_0", "mlx5_1")
