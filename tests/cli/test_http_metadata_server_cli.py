"""The mooncake_http_metadata_server command, run as a real subprocess."""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from pymooncake.cli.http_metadata_server import build_parser
from pymooncake.testing import console_command, read_stdout_until

LISTENING = re.compile(r"HTTP metadata server listening on http://([0-9.]+):([0-9]+)/metadata")


def script_command() -> list[str]:
    return console_command("mooncake_http_metadata_server", "pymooncake.cli.http_metadata_server")


class Running:
    def __init__(self, proc: subprocess.Popen[bytes], host: str, port: int) -> None:
        self.proc = proc
        self.host = host
        self.port = port

    def call(self, method: str, target: str, body: bytes | None = None) -> tuple[int, bytes]:
        c = http.client.HTTPConnection(self.host, self.port, timeout=5)
        try:
            c.request(method, target, body=body)
            resp = c.getresponse()
            return resp.status, resp.read()
        finally:
            c.close()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> tuple[int, bytes, bytes]:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=10)
        return self.proc.returncode, out, err


def start(argv: Sequence[str], **extra_env: str) -> Iterator[Running]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra_env)
    with subprocess.Popen(
        [*argv, "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as proc:
        try:
            (line,) = read_stdout_until(proc, timeout_s=10.0)
            match = LISTENING.fullmatch(line)
            assert match is not None
            yield Running(proc, match.group(1), int(match.group(2)))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)


@pytest.fixture
def server() -> Iterator[Running]:
    yield from start(script_command())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serves_and_stops_cleanly_on_a_signal(server: Running, sig: signal.Signals) -> None:
    assert server.host == "127.0.0.1"
    assert server.port != 0
    key = "/metadata?key=mooncake%2Fram%2Fcli"
    assert server.call("PUT", key, b'{"x":1}') == (200, b"metadata updated")
    assert server.call("GET", key) == (200, b'{"x":1}')
    assert server.call("DELETE", key) == (200, b"metadata deleted")
    assert server.call("GET", key) == (404, b"metadata not found")
    assert server.call("GET", "/health") == (200, b"OK")
    code, out, err = server.stop(sig)
    assert code == 0, err.decode()
    assert out == b""
    assert b"Traceback" not in err


def test_a_second_instance_on_the_same_port_exits_1(server: Running) -> None:
    proc = subprocess.run(
        [*script_command(), "--host", "127.0.0.1", "--port", str(server.port)],
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert proc.stdout == b""
    message = proc.stderr.decode()
    assert "Traceback" not in message
    assert message.count("\n") == 1, message
    assert f"port {server.port}" in message
    assert "--port" in message
    assert message.startswith("mooncake_http_metadata_server: bind address already in use")
    assert server.call("GET", "/health") == (200, b"OK")


def test_python_m_compat_module() -> None:
    for running in start([sys.executable, "-m", "mooncake.http_metadata_server"]):
        assert running.call("PUT", "/metadata?key=k", b"v") == (200, b"metadata updated")
        code, _, err = running.stop()
        assert code == 0, err.decode()


def test_a_snapshot_keeps_the_entries_across_a_kill(tmp_path: Path) -> None:
    """``--snapshot-path``: a server killed and started again serves what it had."""
    path = tmp_path / "metadata.snapshot"
    key = "/metadata?key=mooncake%2Fram%2Fcli"
    meta = "/metadata?key=mooncake%2Frpc_meta%2Fcli"
    argv = [*script_command(), "--snapshot-path", str(path), "--snapshot-fsync"]
    for server in start(argv):
        assert server.call("PUT", key, b'{"x":1}') == (200, b"metadata updated")
        assert server.call("PUT", meta, b'{"p":1}') == (200, b"metadata updated")
        assert server.call("PUT", "/metadata?key=gone", b"g") == (200, b"metadata updated")
        assert server.call("DELETE", "/metadata?key=gone") == (200, b"metadata deleted")
        server.stop(signal.SIGKILL)
    for server in start(argv):
        assert server.call("GET", key) == (200, b'{"x":1}')
        assert server.call("GET", meta) == (200, b'{"p":1}')
        assert server.call("PUT", meta, b'{"p":2}') == (400, b"Duplicate rpc_meta key not allowed")
        assert server.call("GET", "/metadata?key=gone") == (404, b"metadata not found")
        code, _, err = server.stop()
        assert code == 0, err.decode()
    for server in start(script_command()):  # without the flag: memory only
        assert server.call("GET", key) == (404, b"metadata not found")
        server.stop()


def test_reference_flags_and_defaults() -> None:
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.log_level) == ("0.0.0.0", 8080, "INFO")
    assert (args.snapshot_path, args.snapshot_fsync) == ("", False)
    args = build_parser().parse_args(["--port", "0", "--log-level", "debug"])
    assert (args.port, args.log_level) == (0, "DEBUG")


@pytest.mark.parametrize("bad", [["--port", "70000"], ["--port", "x"], ["--log-level", "LOUD"]])
def test_bad_arguments_exit_2(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(bad)
    assert info.value.code == 2
    assert "mooncake_http_metadata_server" in capsys.readouterr().err


def test_cluster_token_from_the_environment() -> None:
    from pymooncake._authio import ClusterSecurity, http_request

    token = "cli-cluster-token-0123456789abcdef"
    for server in start(script_command(), PYMOONCAKE_CLUSTER_TOKEN=token):
        key = "/metadata?key=mooncake%2Fram%2Fcli"
        assert server.call("PUT", key, b'{"x":1}')[0] == 401
        assert server.call("GET", "/health") == (200, b"OK")
        url = f"http://{server.host}:{server.port}{key}"
        sec = ClusterSecurity(token=token)
        assert http_request("PUT", url, security=sec, body=b'{"x":1}') == (200, b"metadata updated")
        assert http_request("GET", url, security=sec) == (200, b'{"x":1}')
        code, _, err = server.stop()
        assert code == 0 and b"Traceback" not in err
        assert b"no cluster token is set" not in err
