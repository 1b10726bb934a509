"""The ``transfer_engine_bench`` command, target and initiator as real subprocesses."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from pymooncake.testing import console_command, read_stdout_until

LOCAL = "127.0.0.1"
BUFFER_BYTES = 64 << 20
READY = re.compile(
    r"Transfer Engine target ready: segment (127\.0\.0\.1:\d+), buffer 0x[0-9a-f]+ "
    rf"\({BUFFER_BYTES} bytes\)"
)
COMPLETED = re.compile(
    r"Test completed: duration (\d+\.\d\d), batch count (\d+), throughput ([\d.]+) GiB/s"
)
COMMON = (
    f"--local_server_name={LOCAL}",
    "--metadata_server=P2PHANDSHAKE",
    "--protocol=tcp",
    f"--buffer_size={BUFFER_BYTES}",
)


def bench_command() -> list[str]:
    return console_command("transfer_engine_bench", "pymooncake.cli.transfer_engine_bench")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MC_")}


def run_bench(args: Sequence[str], timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*bench_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=clean_env(),
        check=False,
    )


@dataclass
class Target:
    proc: subprocess.Popen[bytes]
    segment: str
    log_path: Path

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal it and wait; kill if it does not exit.  Returns the exit code."""
        proc = self.proc
        try:
            if proc.poll() is None:
                proc.send_signal(sig)
            try:
                return proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
                return -9999
        finally:
            if proc.stdout is not None:
                proc.stdout.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def start_target(log_path: Path) -> Target:
    with open(log_path, "wb") as err:
        proc = subprocess.Popen(
            [*bench_command(), "--mode=target", *COMMON],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            env=clean_env(),
        )
    target = Target(proc, "", log_path)
    try:
        (line,) = read_stdout_until(proc, timeout_s=30)
        match = READY.match(line)
        assert match, line
    except BaseException:
        target.stop(signal.SIGKILL)
        pytest.fail(f"bench target did not start; stderr:\n{target.log_text()}")
    target.segment = match.group(1)
    return target


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    t = start_target(tmp_path_factory.mktemp("bench") / "target.log")
    yield t
    rc = t.stop()
    assert rc == 0, t.log_text()


def initiator_args(segment: str, *extra: str) -> list[str]:
    return [
        f"--segment_id={segment}",
        *COMMON,
        "--block_size=65536",
        "--batch_size=16",
        "--threads=2",
        "--duration=1",
        "--report_unit=GiB",
        "--report_precision=3",
        *extra,
    ]


@pytest.mark.parametrize("operation", ["write", "read"])
def test_initiator_reports_throughput(target: Target, operation: str) -> None:
    result = run_bench(initiator_args(target.segment, f"--operation={operation}"))
    assert result.returncode == 0, (result.stdout, result.stderr[-3000:])
    last = result.stdout.strip().splitlines()[-1]
    match = COMPLETED.fullmatch(last)
    assert match, result.stdout
    duration, batches, rate = float(match.group(1)), int(match.group(2)), match.group(3)
    assert 0.9 <= duration < 10
    assert batches > 0
    assert re.fullmatch(r"\d+\.\d{3}", rate)  # --report_precision=3
    assert float(rate) > 0


def test_unknown_report_unit_falls_back_to_gb(target: Target) -> None:
    args = [a for a in initiator_args(target.segment, "--operation=write") if "report" not in a]
    args = [*(a if a != "--duration=1" else "--duration=0" for a in args), "--report_unit=XB"]
    result = run_bench(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Invalid flag: report_unit" in result.stderr
    assert re.search(r"Test completed: .* GB/s$", result.stdout.strip())


def test_batch_that_does_not_fit_the_target_buffer(target: Target) -> None:
    # 1024 * 65536 * 2 = 128 MiB > 64 MiB
    args = [a for a in initiator_args(target.segment) if not a.startswith("--batch_size")]
    result = run_bench([*args, "--batch_size=1024"])
    assert result.returncode == 1
    assert "does not fit" in result.stderr
    assert str(BUFFER_BYTES) in result.stderr
    assert "Test completed" not in result.stdout


def test_unknown_segment_exits_one() -> None:
    result = run_bench(initiator_args(f"{LOCAL}:1", "--operation=write"))
    assert result.returncode == 1
    assert f"{LOCAL}:1" in result.stderr
    assert "Test completed" not in result.stdout


def test_unknown_flag() -> None:
    result = run_bench(["--x=1"])
    assert result.returncode == 1
    assert "ERROR: unknown command line flag 'x'" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--block_size=abc"], "ERROR: illegal value 'abc' specified for int flag 'block_size'"),
        (["--operation=copy", f"--segment_id={LOCAL}:1", *COMMON], "Unsupported operation"),
        (["--mode=observer", *COMMON], "Unsupported mode"),
    ],
)
def test_bad_flag_values(args: list[str], message: str) -> None:
    result = run_bench(args)
    assert result.returncode == 1
    assert message in result.stderr


def test_help() -> None:
    result = run_bench(["--help"])
    assert result.returncode == 0
    for flag in ("--mode", "--segment_id", "--block_size", "--report_unit"):
        assert flag in result.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_target_exits_zero_on_signal(tmp_path: Path, sig: int) -> None:
    t = start_target(tmp_path / "target.log")
    rc = t.stop(sig)
    assert rc == 0, t.log_text()
