"""The mooncake_master command, run as a real subprocess on 127.0.0.1."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from pymooncake.store import StoreClient, StoreClientConfig
from pymooncake.testing import console_command, free_port, read_stdout_until

LOCAL = "127.0.0.1"
READY = re.compile(r"Master service started on ([0-9.]+):([0-9]+)")
METRICS = re.compile(r"Metrics and admin HTTP server listening on http://([0-9.]+):([0-9]+) ")
METADATA = re.compile(r"HTTP metadata server listening on (http://([0-9.]+):([0-9]+)/metadata)")


def master_command() -> list[str]:
    return console_command("mooncake_master", "pymooncake.cli.master")


def bench_flags(rpc_port: int) -> list[str]:
    """The flags bench/store_bench.py starts the reference master with (ports chosen here)."""
    return [
        f"--rpc_address={LOCAL}",
        f"--rpc_port={rpc_port}",
        f"--metrics_host={LOCAL}",
        "--metrics_port=0",
        "--default_kv_lease_ttl=5000",
        "--logtostderr",
        "--enable_http_metadata_server=true",
        f"--http_metadata_server_host={LOCAL}",
        "--http_metadata_server_port=0",
    ]


class Master:
    """A running mooncake_master and the addresses it printed."""

    def __init__(self, proc: subprocess.Popen[bytes], lines: list[str]) -> None:
        self.proc = proc
        self.lines = lines
        ready = READY.match(lines[-1])
        assert ready is not None
        self.rpc = f"{ready.group(1)}:{ready.group(2)}"
        self.metrics: tuple[str, int] | None = None
        self.metadata_url: str | None = None
        self.metadata: tuple[str, int] | None = None
        for line in lines:
            if m := METRICS.match(line):
                self.metrics = (m.group(1), int(m.group(2)))
            if m := METADATA.match(line):
                self.metadata_url = m.group(1)
                self.metadata = (m.group(2), int(m.group(3)))

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> tuple[int, str, str]:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=15)
        return self.proc.returncode, out.decode(), err.decode()


def call(
    addr: tuple[str, int], method: str, target: str, body: bytes | None = None
) -> tuple[int, bytes]:
    c = http.client.HTTPConnection(*addr, timeout=5)
    try:
        c.request(method, target, body=body)
        resp = c.getresponse()
        return resp.status, resp.read()
    finally:
        c.close()


def start_master(argv: Sequence[str], cmd: Sequence[str] | None = None) -> Iterator[Master]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with subprocess.Popen(
        [*(cmd or master_command()), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as proc:
        try:
            yield Master(proc, read_stdout_until(proc, READY))
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=15)


def run(argv: Sequence[str], cmd: Sequence[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command to completion (for the paths that exit at once)."""
    return subprocess.run(
        [*(cmd or master_command()), *argv], capture_output=True, text=True, timeout=30
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("mooncake_master:")]


@pytest.fixture
def master() -> Iterator[Master]:
    yield from start_master(bench_flags(free_port()))


# ----------------------------------------------------------------------------------
# serving
# ----------------------------------------------------------------------------------


def test_bench_flags_serve_rpc_metrics_and_metadata_then_sigterm_exits_0(master: Master) -> None:
    assert master.rpc.startswith(f"{LOCAL}:")
    assert master.metrics is not None and master.metrics[1] != 0
    assert master.metadata is not None and master.metadata[1] != 0
    assert master.metadata_url == f"http://{LOCAL}:{master.metadata[1]}/metadata"

    status, body = call(master.metrics, "GET", "/health")
    assert status == 200
    assert json.loads(body)["status"] == "ok"
    status, body = call(master.metrics, "GET", "/metrics")
    assert status == 200
    assert b"master_" in body

    key = "/metadata?key=mooncake%2Fram%2Fcli-test"
    assert call(master.metadata, "PUT", key, b'{"x":1}')[0] == 200
    assert call(master.metadata, "GET", key) == (200, b'{"x":1}')

    config = StoreClientConfig(
        local_hostname=LOCAL,
        metadata_server=master.metadata_url,
        master_server_addr=master.rpc,
        global_segment_size=16 << 20,
        local_buffer_size=4 << 20,
    )
    with StoreClient(config) as client:
        value = os.urandom(256 << 10)
        client.put("cli-key", value)
        assert client.get("cli-key") == value
        assert client.replicas("cli-key")[0].endpoint == client.hostname
        status, body = call(master.metrics, "GET", "/get_all_segments")
        assert body.decode().split() == [client.hostname]

    code, out, err = master.stop(signal.SIGTERM)
    assert code == 0, err
    assert out == ""
    assert "Traceback" not in err


def test_sigint_exits_0_and_port_zero_shows_the_real_port() -> None:
    argv = [
        f"--rpc_address={LOCAL}",
        "--port=0",
        f"--metrics_host={LOCAL}",
        "--metrics_port=0",
    ]
    for master in start_master(argv):
        assert int(master.rpc.rsplit(":", 1)[1]) != 0
        assert master.metadata is None  # the metadata server is off by default
        assert master.metrics is not None
        assert call(master.metrics, "GET", "/health")[0] == 200
        host, port = master.rpc.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5):
            pass
        code, _, err = master.stop(signal.SIGINT)
        assert code == 0, err
        assert "Traceback" not in err


def test_runs_as_a_module() -> None:
    proc = run(["--version"], cmd=[sys.executable, "-m", "pymooncake.cli.master"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("mooncake_master version ")


# ----------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------


def test_unknown_flag_exits_1_with_the_gflags_message() -> None:
    proc = run(["--rpc_address=127.0.0.1", "--no_such_flag=1"])
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip() == "ERROR: unknown command line flag 'no_such_flag'"


def test_version_and_help() -> None:
    proc = run(["--version"])
    assert proc.returncode == 0
    assert re.fullmatch(r"mooncake_master version \S+.*\n", proc.stdout)
    proc = run(["--help"])
    assert proc.returncode == 0
    for flag in ("--rpc_port", "--default_kv_lease_ttl", "--enable_http_metadata_server"):
        assert flag in proc.stdout


def test_bad_values_exit_1() -> None:
    proc = run(["--default_kv_lease_ttl=soon"])
    assert proc.returncode == 1
    assert len(error_lines(proc.stderr)) == 1, proc.stderr
    assert "default_kv_lease_ttl" in proc.stderr
    proc = run(["--eviction_ratio=2"])
    assert proc.returncode == 1
    assert "eviction_ratio" in proc.stderr
    proc = run(["--metrics_port=70000"])
    assert proc.returncode == 1
    assert "--metrics_port=70000" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_bad_poll_window_exits_1_naming_the_variable() -> None:
    proc = subprocess.run(
        [*master_command(), "--rpc_address=127.0.0.1", "--port=0", "--metrics_port=0"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYMOONCAKE_MASTER_POLL_US": "soon"},
    )
    assert proc.returncode == 1
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "PYMOONCAKE_MASTER_POLL_US='soon'" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("flag", "feature"),
    [
        ("--enable_oplog=true", "HA oplog"),
        ("--enable_cxl=true", "CXL"),
        ("--enable_snapshot", "snapshots"),
        ("--enable_kv_events=true", "KV event"),
        ("--allocation_strategy=cxl", "allocation_strategy=cxl"),
    ],
)
def test_unavailable_features_exit_1_with_a_message(flag: str, feature: str) -> None:
    proc = run([flag, "--rpc_address=127.0.0.1", "--port=0", "--metrics_port=0"])
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "not available in pymooncake" in lines[0]
    assert feature in lines[0]
    assert flag.split("=")[0] in lines[0]


def test_accepted_flags_of_unused_features_keep_their_defaults() -> None:
    argv = [
        f"--rpc_address={LOCAL}",
        "--port=0",
        "--metrics_port=0",
        f"--metrics_host={LOCAL}",
        "--enable_ha=false",
        "--ha_backend_type=etcd",
        "--cluster_id=test_cluster",
        "--rpc_thread_num=4",
        "--max_kv_soft_pin_ttl=2h",
        "--nof_eviction_ratio=0.1",
        "--kv_events_queue_capacity=10",
        "--enable_metric_reporting=false",
        "--eviction_high_watermark_ratio=0.95",
        "--allocation_strategy=free_ratio_first",
    ]
    for master in start_master(argv):
        code, _, err = master.stop()
        assert code == 0, err
        assert "cluster_id=test_cluster" in err
        assert "max_kv_soft_pin_ttl=7200000 ms" in err


def test_rpc_limits_come_from_flags() -> None:
    """The RPC listener's bounds (MasterLimits) are flags; the reference's
    --rpc_conn_timeout_seconds closes idle connections."""
    argv = [
        f"--rpc_address={LOCAL}",
        "--port=0",
        "--metrics_port=0",
        f"--metrics_host={LOCAL}",
        "--enable_metric_reporting=false",
        "--rpc_conn_timeout_seconds=1",
        "--rpc_max_connections=100",
        "--rpc_max_buffered_mb=8",
        "--rpc_frame_timeout_sec=7.5",
        "--rpc_auth_timeout_sec=2",
        "--rpc_reply_cache_ttl_sec=60",
        "--regex_timeout_ms=500",
        "--regex_max_results=1000",
    ]
    for master in start_master(argv):
        host, _, port = master.rpc.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=10) as idle:
            assert idle.recv(1) == b""  # closed by the master after ~1 s idle
        code, _, err = master.stop()
        assert code == 0, err
        assert (
            "rpc limits: 100 connections, 8 MiB buffered, frame 7.5 s, idle 1 s, auth 2 s, "
            "reply cache 60 s, regex 0.5 s/slice and 1000 results"
        ) in err
        assert "rpc_conn_timeout_seconds is accepted but has no effect" not in err
    proc = run(["--rpc_max_connections=0"])
    assert proc.returncode == 1
    (line,) = error_lines(proc.stderr)
    assert "--rpc_max_connections=0 must be positive (default 8192" in line


# ----------------------------------------------------------------------------------
# config file
# ----------------------------------------------------------------------------------


def test_json_config_file_with_a_flag_overriding_it(tmp_path: Path) -> None:
    conf = tmp_path / "master.json"
    conf.write_text(
        json.dumps(
            {
                "rpc_address": LOCAL,
                "rpc_port": free_port(),
                "metrics_host": LOCAL,
                "metrics_port": 0,
                "client_live_ttl_sec": 42,
                "default_kv_lease_ttl": 1234,
                "eviction_ratio": 0.1,
                "eviction_high_watermark_ratio": 1.0,
                "enable_http_metadata_server": True,
                "http_metadata_server_host": LOCAL,
                "http_metadata_server_port": 0,
                "kv_events_bind_endpoint": "tcp://0.0.0.0:5557",
                "etcd_endpoints": "http://localhost:2379",
                "enable_ha": False,
            }
        )
    )
    argv = [f"--config_path={conf}", "--default_kv_lease_ttl=7s", "--enable_http_metadata_server=0"]
    for master in start_master(argv):
        assert master.metadata is None  # the command line switched it off
        assert master.metrics is not None
        code, _, err = master.stop()
        assert code == 0, err
        assert "client_ttl=42 s" in err
        assert "default_kv_lease_ttl=7000 ms" in err
        assert "eviction_ratio=0.1," in err
        assert "eviction_high_watermark_ratio=1.0," in err


def test_config_file_enabling_an_unavailable_feature_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "master.json"
    conf.write_text(json.dumps({"enable_cxl": True}))
    proc = run([f"--config_path={conf}"])
    assert proc.returncode == 1
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "enable_cxl" in lines[0] and "not available" in lines[0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--enable_ha=true"], "needs the etcd endpoints"),
        (["--enable_ha=true", "--etcd_endpoints=h:2379", "--ha_backend_type=redis"], "etcd only"),
        (["--enable_ha=true", "--etcd_endpoints=h:2379", "--ha_lease_ttl_sec=0"], "at least 1"),
    ],
)
def test_bad_ha_settings_exit_1(flags: list[str], message: str) -> None:
    proc = run([*flags, "--rpc_address=127.0.0.1", "--port=0", "--metrics_port=0"])
    assert proc.returncode == 1
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_bad_config_files_exit_1(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    proc = run([f"--config_path={broken}"])
    assert proc.returncode == 1
    assert "not valid JSON" in proc.stderr
    wrong_type = tmp_path / "wrong.json"
    wrong_type.write_text(json.dumps({"client_live_ttl_sec": "soon"}))
    proc = run([f"--config_path={wrong_type}"])
    assert proc.returncode == 1
    assert "client_live_ttl_sec=" in proc.stderr
    proc = run([f"--config_path={tmp_path / 'missing.json'}"])
    assert proc.returncode == 1
    assert "missing.json" in proc.stderr
    proc = run([f"--config_path={tmp_path / 'master.toml'}"])
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("yaml") is not None, reason="PyYAML is installed")
def test_yaml_config_without_pyyaml_says_so(tmp_path: Path) -> None:
    conf = tmp_path / "master.yaml"
    conf.write_text("client_live_ttl_sec: 60\n")
    proc = run([f"--config_path={conf}"])
    assert proc.returncode == 1
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "PyYAML" in lines[0], proc.stderr


# ----------------------------------------------------------------------------------
# ports
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["--rpc_port", "--metrics_port", "--http_metadata_server_port"])
def test_port_in_use_exits_1_naming_the_port(which: str) -> None:
    with socket.socket() as taken:
        taken.bind((LOCAL, 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--rpc_port": 0, "--metrics_port": 0, "--http_metadata_server_port": 0}
        ports[which] = port
        argv = [
            f"--rpc_address={LOCAL}",
            "--port=0",
            f"--metrics_host={LOCAL}",
            f"--http_metadata_server_host={LOCAL}",
            "--enable_http_metadata_server=true",
            *(f"{k}={v}" for k, v in ports.items()),
        ]
        proc = run(argv)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert f"port {port}" in lines[0]
    assert which in lines[0]
    assert "Traceback" not in proc.stderr


def test_task_manager_flags_reach_the_master_config() -> None:
    from pymooncake.cli.master import _command_line, _settings, _validate

    config = _validate(
        _settings(
            _command_line(
                [
                    "--max_total_finished_tasks=7",
                    "--max_total_pending_tasks=8",
                    "--max_total_processing_tasks=9",
                    "--pending_task_timeout_sec=0",
                    "--processing_task_timeout_sec=11",
                    "--max_retry_attempts=2",
                ]
            )
        )
    )
    assert (config.max_total_finished_tasks, config.max_total_pending_tasks) == (7, 8)
    assert config.max_total_processing_tasks == 9 and config.max_retry_attempts == 2
    assert (config.pending_task_timeout_s, config.processing_task_timeout_s) == (0.0, 11.0)
    assert run(["--max_retry_attempts=-1"]).returncode == 1
