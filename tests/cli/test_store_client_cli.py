"""The mooncake_client command (a storage node), run as a real subprocess next to
a real mooncake_master subprocess on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator, Sequence

import pytest

from pymooncake.store import StoreClient, StoreClientConfig
from pymooncake.testing import console_command, free_port, read_stdout_until

LOCAL = "127.0.0.1"
MASTER_READY = re.compile(r"Master service started on ([0-9.]+:[0-9]+)")
MASTER_METRICS = re.compile(
    r"Metrics and admin HTTP server listening on http://([0-9.]+):([0-9]+) "
)
MASTER_METADATA = re.compile(r"HTTP metadata server listening on (http://\S+/metadata)")
NODE_READY = re.compile(
    r"mooncake_client ready: segment (\S+) contributes ([0-9]+) bytes to the master at (\S+)"
)
NODE_HTTP = re.compile(r"client HTTP server listening on http://[0-9.]+:([0-9]+) ")


def spawn(
    argv: Sequence[str], ready: re.Pattern[str]
) -> Iterator[tuple[subprocess.Popen[bytes], list[str]]]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        try:
            yield proc, read_stdout_until(proc, ready)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=15)


def stop(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    return proc.returncode, err.decode()


def get(addr: tuple[str, int], target: str) -> tuple[int, bytes]:
    c = http.client.HTTPConnection(*addr, timeout=5)
    try:
        c.request("GET", target)
        resp = c.getresponse()
        return resp.status, resp.read()
    finally:
        c.close()


class Master:
    def __init__(self, lines: list[str]) -> None:
        text = "\n".join(lines)
        rpc = MASTER_READY.search(text)
        metrics = MASTER_METRICS.search(text)
        metadata = MASTER_METADATA.search(text)
        assert rpc and metrics and metadata, text
        self.rpc = rpc.group(1)
        self.metrics = (metrics.group(1), int(metrics.group(2)))
        self.metadata_url = metadata.group(1)

    def segments(self) -> list[str]:
        status, body = get(self.metrics, "/get_all_segments")
        assert status == 200
        return body.decode().split()


@pytest.fixture
def master() -> Iterator[Master]:
    argv = [
        *console_command("mooncake_master", "pymooncake.cli.master"),
        f"--rpc_address={LOCAL}",
        f"--rpc_port={free_port()}",
        f"--metrics_host={LOCAL}",
        "--metrics_port=0",
        "--default_kv_lease_ttl=5000",
        "--logtostderr",
        "--enable_http_metadata_server=true",
        f"--http_metadata_server_host={LOCAL}",
        "--http_metadata_server_port=0",
    ]
    for proc, lines in spawn(argv, MASTER_READY):
        yield Master(lines)
        code, err = stop(proc)
        assert code == 0, err


def node_command(*argv: str) -> list[str]:
    """The node's command line; the dummy-client port is any free one unless given
    (its default 50052 may be taken on a shared machine)."""
    port = [] if any(a.startswith("--port") for a in argv) else ["--port=0"]
    return [*console_command("mooncake_client", "pymooncake.cli.store_client"), *port, *argv]


def test_node_contributes_its_segment_and_unmounts_on_sigterm(master: Master) -> None:
    argv = node_command(
        "--host=127.0.0.1",
        f"--master_server_address={master.rpc}",
        f"--metadata_server={master.metadata_url}",
        "--global_segment_size=64 MB",
        "--enable_http_server",
        "--http_port=0",
    )
    for node, lines in spawn(argv, NODE_READY):
        ready = NODE_READY.match(lines[-1])
        assert ready is not None
        segment = ready.group(1)
        assert segment.startswith(f"{LOCAL}:")
        assert int(ready.group(2)) == 64 << 20
        assert ready.group(3) == master.rpc
        assert master.segments() == [segment]

        http_line = next(m for line in lines if (m := NODE_HTTP.match(line)))
        status, body = get((LOCAL, int(http_line.group(1))), "/health")
        assert (status, json.loads(body)) == (200, {"status": "healthy", "code": 0})

        config = StoreClientConfig(
            local_hostname=LOCAL,
            metadata_server=master.metadata_url,
            master_server_addr=master.rpc,
            global_segment_size=0,
            local_buffer_size=4 << 20,
        )
        with StoreClient(config) as client:
            value = os.urandom(1 << 20)
            client.put("node-key", value)
            assert client.replicas("node-key")[0].endpoint == segment
            assert client.get("node-key") == value

        code, err = stop(node, signal.SIGTERM)
        assert code == 0, err
        assert "Traceback" not in err
        assert master.segments() == []  # unmounted: its objects are gone with it
        status, _ = get(master.metrics, "/query_key?key=node-key")
        assert status == 404


def test_host_with_a_port_fixes_the_segment_name_and_sigint_stops(master: Master) -> None:
    port = free_port()
    argv = node_command(
        f"--host=127.0.0.1:{port}",
        f"--master_server_address={master.rpc}",
        f"--metadata_server={master.metadata_url}",
        "--global_segment_size=1 MB",
        "--local_buffer_size=1MB",
    )
    for node, lines in spawn(argv, NODE_READY):
        ready = NODE_READY.match(lines[-1])
        assert ready is not None and ready.group(1) == f"127.0.0.1:{port}"
        assert master.segments() == [f"127.0.0.1:{port}"]
        code, err = stop(node, signal.SIGINT)
        assert code == 0, err
        assert master.segments() == []


def test_unreachable_master_exits_1_with_one_line() -> None:
    port = free_port()
    proc = subprocess.run(
        node_command(
            "--host=127.0.0.1",
            f"--master_server_address=127.0.0.1:{port}",
            "--global_segment_size=1 MB",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mooncake_client:")]
    assert len(lines) == 1, proc.stderr
    assert f"127.0.0.1:{port}" in lines[0]
    assert "master" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--no_such_flag"], "ERROR: unknown command line flag 'no_such_flag'"),
        (["--global_segment_size=lots"], "--global_segment_size"),
    ],
)
def test_refused_settings_exit_1(argv: list[str], message: str) -> None:
    proc = subprocess.run(node_command(*argv), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_version_and_help() -> None:
    proc = subprocess.run(node_command("--version"), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    assert proc.stdout.startswith("mooncake_client version ")
    proc = subprocess.run(node_command("--help"), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    assert "--global_segment_size" in proc.stdout
    assert "setup_dummy" in proc.stdout
