"""The doctor against real misconfigurations made by each test on this host: a
proxy variable set, a port taken, a wrong segment name, a dead or live metadata
server (HTTP, etcd, Redis), a master, a fake sysfs tree with a DOWN port and an
all-zero GID, and the ``pymooncake doctor`` command itself."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ops_fakes import rdma_tree, write_tree

from pymooncake.cli.main import main
from pymooncake.config import EngineConfig
from pymooncake.ops import DoctorInputs, Status, SystemProbes, run_doctor
from pymooncake.store.master import ThreadedMaster
from pymooncake.testing import free_port
from pymooncake.testing._etcd_server import EtcdCluster
from pymooncake.testing._ha import HaMasters
from pymooncake.transfer import TransferEngine
from pymooncake.transfer.metadata.server import MetadataServer
from pymooncake.wire import PROTOCOL_VERSION

LOCAL = "127.0.0.1"


@pytest.fixture
def metadata() -> Iterator[str]:
    server = MetadataServer()
    with server.serve(LOCAL, 0) as http:
        yield server.url(http)


def doctor(**kw: Any) -> Any:
    kw.setdefault("local_hostname", LOCAL)
    kw.setdefault("engine", EngineConfig(rpc_port_min=30000, rpc_port_max=30050))
    kw.setdefault("timeout_s", 2.0)
    return run_doctor(DoctorInputs(**kw), SystemProbes())


# --- proxies -------------------------------------------------------------------------------


def test_a_proxy_variable_is_reported_and_no_proxy_clears_it(metadata: str) -> None:
    dead_proxy = f"http://{LOCAL}:{free_port()}"
    report = doctor(metadata_server=metadata, env={"http_proxy": dead_proxy})
    assert report.by_check("proxy").status is Status.WARN
    assert f"http_proxy={dead_proxy}" in report.by_check("proxy").reason
    # pymooncake itself still reaches the server: the probe does not use the proxy
    assert report.by_check("metadata_server").status is Status.PASS
    report = doctor(metadata_server=metadata, env={"http_proxy": dead_proxy, "no_proxy": LOCAL})
    assert report.by_check("proxy").status is Status.PASS


# --- ports ---------------------------------------------------------------------------------


def test_a_taken_port_fails_and_a_free_one_passes() -> None:
    with socket.socket() as a, socket.socket() as b:
        a.bind((LOCAL, 0))
        a.listen()
        port = a.getsockname()[1]
        b.bind((LOCAL, port + 1)) if _free(port + 1) else pytest.skip("neighbour port busy")
        b.listen()
        env = {"MC_MIN_RPC_PORT": str(port), "MC_MAX_RPC_PORT": str(port + 1)}
        inp = DoctorInputs.from_sources({"local_hostname": LOCAL}, env)
        r = run_doctor(inp, SystemProbes()).by_check("rpc_ports")
        assert r.status is Status.FAIL
        assert f"only 0 of 2 ports in [{port}, {port + 1}] are free on 127.0.0.1" in r.reason
        legacy = {"MC_LEGACY_RPC_PORT_BINDING": "1"}
        inp = DoctorInputs.from_sources({"local_hostname": f"{LOCAL}:{port}"}, legacy)
        r = run_doctor(inp, SystemProbes()).by_check("rpc_ports")
        assert r.status is Status.FAIL
        assert r.reason.startswith(f"bind address already in use: port {port} on 127.0.0.1")
    inp = DoctorInputs.from_sources({"local_hostname": f"{LOCAL}:{port}"}, legacy)
    assert run_doctor(inp, SystemProbes()).by_check("rpc_ports").status is Status.PASS


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOCAL, port))
            return True
        except OSError:
            return False


# --- peers and segment names ------------------------------------------------------------------


def test_wrong_segment_name_fails_and_the_exact_one_passes(metadata: str) -> None:
    config = EngineConfig(tcp_bind_address=LOCAL)
    with TransferEngine(LOCAL, metadata, config=config, append_rpc_port=True) as peer:
        peer.allocate(1 << 16)
        name = peer.segment_name
        report = doctor(metadata_server=metadata, peers=(name, LOCAL, f"{LOCAL}:1"))
        good = report.by_check(f"peer:{name}")
        assert good.status is Status.PASS, good
        assert f"RPC {name}" in good.reason and "reachable" in good.reason
        wrong = report.by_check(f"peer:{LOCAL}")
        assert wrong.status is Status.FAIL
        assert wrong.reason.startswith(f"Failed to get description of {LOCAL}")
        assert "the name has no port" in wrong.reason
        assert report.by_check(f"peer:{LOCAL}:1").status is Status.FAIL
        assert report.exit_code == 1


def test_p2p_peer(metadata: str) -> None:
    with TransferEngine(LOCAL, "P2PHANDSHAKE", config=EngineConfig()) as peer:
        report = doctor(metadata_server="P2PHANDSHAKE", peers=(peer.segment_name,))
        assert report.by_check(f"peer:{peer.segment_name}").status is Status.PASS


# --- metadata servers and the master ------------------------------------------------------------


def test_dead_and_live_http_metadata_server(metadata: str) -> None:
    assert doctor(metadata_server=metadata).by_check("metadata_server").status is Status.PASS
    dead = f"http://{LOCAL}:{free_port()}/metadata"
    r = doctor(metadata_server=dead).by_check("metadata_server")
    assert r.status is Status.FAIL and "connection refused" in r.reason


def test_master_version_and_a_dead_master() -> None:
    with ThreadedMaster(metadata_port=None, metrics_port=None, host="0.0.0.0") as master:
        port = master.rpc_address.rpartition(":")[2]
        r = doctor(master_server_address=f"{LOCAL}:{port}").by_check("master")
        assert r.status is Status.PASS and PROTOCOL_VERSION in r.reason
    with ThreadedMaster(metadata_port=None, metrics_port=None, host=LOCAL) as master:
        r = doctor(master_server_address=master.rpc_address).by_check("master")
        if SystemProbes().lan_addresses():  # a LAN address to look through, as a peer would
            assert r.status is Status.WARN and "on loopback only" in r.reason
        else:
            assert r.status is Status.PASS
    r = doctor(master_server_address=f"{LOCAL}:{free_port()}").by_check("master")
    assert r.status is Status.FAIL and "connection refused" in r.reason


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.communicate()}")
        with socket.socket() as s:
            if s.connect_ex((LOCAL, port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail("server did not start")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[int, str]]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    port, password = free_port(), "doctor-secret"
    argv = [exe, "--port", str(port), "--bind", LOCAL, "--save", "", "--appendonly", "no"]
    argv += ["--requirepass", password, "--dir", str(tmp_path)]
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        try:
            _wait_port(port, proc)
            yield port, password
        finally:
            proc.terminate()
            proc.communicate(timeout=20)


def test_redis_needs_its_password(redis_server: tuple[int, str]) -> None:
    port, password = redis_server
    url = f"redis://{LOCAL}:{port}"
    r = doctor(metadata_server=url).by_check("metadata_server")
    assert r.status is Status.FAIL and "NOAUTH" in r.reason and "MC_REDIS_PASSWORD" in r.fix
    r = doctor(metadata_server=url, env={"MC_REDIS_PASSWORD": password}).by_check("metadata_server")
    assert r.status is Status.PASS, r


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[int]:
    exe = shutil.which("etcd")
    if exe is None:
        pytest.skip("etcd is not installed (Debian package etcd-server)")
    client, peer = free_port(), free_port()
    argv = [
        exe,
        "--data-dir",
        str(tmp_path / "etcd"),
        "--listen-client-urls",
        f"http://{LOCAL}:{client}",
        "--advertise-client-urls",
        f"http://{LOCAL}:{client}",
        "--listen-peer-urls",
        f"http://{LOCAL}:{peer}",
        "--initial-advertise-peer-urls",
        f"http://{LOCAL}:{peer}",
        "--initial-cluster",
        f"default=http://{LOCAL}:{peer}",
    ]
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        try:
            _wait_port(client, proc)
            yield client
        finally:
            proc.terminate()
            proc.communicate(timeout=20)


def test_etcd_health_and_a_missing_descriptor(etcd_server: int) -> None:
    url = f"etcd://{LOCAL}:{etcd_server}"
    deadline = time.monotonic() + 20
    while True:  # etcd serves /health once it has elected itself
        report = doctor(metadata_server=url, peers=("nobody:1",))
        if report.by_check("metadata_server").status is Status.PASS or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    r = report.by_check("metadata_server")
    assert r.status is Status.PASS and "etcd is healthy" in r.reason
    peer = report.by_check("peer:nobody:1")
    assert peer.status is Status.FAIL and "Failed to get description of nobody:1" in peer.reason


# --- a fake sysfs tree ---------------------------------------------------------------------------


ZERO = "0000:0000:0000:0000:0000:0000:0000:0000"


def test_fake_sysfs_with_a_down_port_and_a_zero_gid(tmp_path: Path, capsys: Any) -> None:
    sysfs, devfs = tmp_path / "sys", tmp_path / "dev"
    write_tree(str(sysfs), rdma_tree("mlx5_0", state="1: DOWN", phys="3: Disabled"))
    write_tree(str(sysfs), rdma_tree("mlx5_1", gids={0: ZERO}, uverbs="uverbs1"))
    write_tree(str(sysfs), rdma_tree("mlx5_2", uverbs="uverbs2"))
    for n in range(3):
        write_tree(str(devfs), {f"infiniband/uverbs{n}": ""})
    argv = ["doctor", "--local-hostname", LOCAL, "--protocol", "rdma", "--json"]
    argv += ["--device-name", "mlx5_0,mlx5_1,mlx5_2,mlx5_7"]
    argv += ["--sysfs-root", str(sysfs), "--devfs-root", str(devfs)]
    assert main(argv) == 1
    checks = {c["check"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert checks["rdma_device:mlx5_0"]["status"] == "FAIL"
    assert "Device mlx5_0 port 1 not active" in checks["rdma_device:mlx5_0"]["reason"]
    assert checks["rdma_device:mlx5_1"]["status"] == "FAIL"
    assert "GID is NULL" in checks["rdma_device:mlx5_1"]["reason"]
    assert checks["rdma_device:mlx5_2"]["status"] == "PASS"
    assert "No matched device found: 'mlx5_7'" in checks["rdma_device:mlx5_7"]["reason"]


def test_fake_procfs_with_a_low_memlock_limit(tmp_path: Path, capsys: Any) -> None:
    proc = tmp_path / "proc"
    write_tree(
        str(proc),
        {
            "self/limits": "Limit  Soft Limit  Hard Limit  Units\n"
            "Max locked memory         65536                65536                bytes",
            "self/status": "CapEff:\t0000000000000000",
            "sys/vm/max_map_count": "65530",
            "self/maps": "a\nb",
        },
    )
    argv = ["doctor", "--local-hostname", LOCAL, "--protocol", "rdma", "--device-name", "x"]
    argv += [
        "--global-segment-size",
        "1 GiB",
        "--procfs-root",
        str(proc),
        "--sysfs-root",
        str(tmp_path),
    ]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "FAIL  memlock" in out and "64.0 KiB, below the 1.0 GiB to register" in out


# --- the command ------------------------------------------------------------------------------------


def test_cli_prints_one_line_per_check_and_exits_zero_without_failures(capsys: Any) -> None:
    assert main(["doctor", "--local-hostname", LOCAL]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PASS  inputs")
    assert any(line.startswith("WARN  local_hostname") for line in lines)
    assert all(line.split()[0] in ("PASS", "WARN", "FAIL", "SKIP") for line in lines[:-1])
    assert lines[-1].endswith("skipped")


def test_cli_reads_a_mooncake_config_file(tmp_path: Path, capsys: Any, metadata: str) -> None:
    path = tmp_path / "mooncake.json"
    path.write_text(
        json.dumps(
            {
                "local_hostname": LOCAL,
                "metadata_server": metadata,
                "master_server_address": f"{LOCAL}:{free_port()}",
                "global_segment_size": "64MB",
            }
        )
    )
    assert main(["doctor", "--config", str(path), "--json"]) == 1  # the master is not running
    data = json.loads(capsys.readouterr().out)
    checks = {c["check"]: c for c in data["checks"]}
    assert checks["metadata_server"]["status"] == "PASS"
    assert checks["master"]["status"] == "FAIL"
    assert f"from file {path}" in checks["inputs"]["reason"]
    path.write_text("{not json")
    assert main(["doctor", "--config", str(path)]) == 1
    assert "FAIL  inputs" in capsys.readouterr().out


def test_cli_as_a_subprocess_with_environment_settings(metadata: str) -> None:
    env = dict(os.environ, MOONCAKE_LOCAL_HOSTNAME=LOCAL, MOONCAKE_TE_META_DATA_SERVER=metadata)
    env["http_proxy"] = "http://proxy.invalid:3128"
    proc = subprocess.run(
        [sys.executable, "-m", "pymooncake.cli.main", "doctor"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARN  proxy" in proc.stdout and "PASS  metadata_server" in proc.stdout


def test_a_master_behind_etcd_is_checked_through_its_leader(etcd_cluster: EtcdCluster) -> None:
    """``master_server_address=etcd://...`` (master HA, as the guide deploys it):
    the doctor reads the leader from the election key and checks that master."""
    with HaMasters(etcd_cluster.endpoints, 1, lease_ttl_s=2) as group:
        env = {"MC_STORE_CLUSTER_ID": group.cluster_id}
        leader = group.leader()
        r = doctor(master_server_address=group.client_address, env=env).by_check("master")
        # (a WARN: this test's masters listen on loopback only)
        assert r.status is not Status.FAIL, r.line()
        assert f"names {leader.rpc} the leader of '{group.cluster_id}'" in r.reason
        assert f"answers (protocol {PROTOCOL_VERSION})" in r.reason
        # the clients name another cluster (MC_STORE_CLUSTER_ID unset: the default)
        r = doctor(master_server_address=group.client_address).by_check("master")
        assert r.status is Status.FAIL, r.line()
        assert "no master leads cluster 'mooncake_cluster'" in r.reason
        assert "--cluster_id=mooncake_cluster" in r.fix
