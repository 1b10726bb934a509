"""Progress output: a status line on a terminal (a pty here), nothing on a pipe.

``transfer_engine_bench``, ``pymooncake cluster`` and the bench/ scripts run
as subprocesses whose stderr is once a pseudo-terminal and once a pipe."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from pymooncake.cli._progress import Progress
from pymooncake.testing import console_command, read_stdout_until

ROOT = Path(__file__).resolve().parents[2]
LOCAL = "127.0.0.1"
TARGET_READY = re.compile(r"Transfer Engine target ready: segment (\S+),")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_rewrites_one_line_on_a_terminal() -> None:
    now = [0.0]
    out = Tty()
    p = Progress(out, interval_s=1.0, env={"TERM": "xterm"}, clock=lambda: now[0])
    p.update("one")
    p.update("skipped: too soon")
    now[0] = 1.5
    p.update("two")
    p.clear()
    assert out.getvalue() == "\rone\x1b[K\rtwo\x1b[K\r\x1b[K"


def test_progress_is_silent_on_a_pipe_and_lines_on_a_dumb_terminal() -> None:
    pipe = io.StringIO()
    with Progress(pipe, env={}) as p:
        p.step("starting")
        p.update("x", force=True)
    assert pipe.getvalue() == ""
    dumb = Tty()
    with Progress(dumb, env={"TERM": "dumb"}) as p:
        p.step("starting")
    assert dumb.getvalue() == "starting ...\n"


def test_progress_environment_override() -> None:
    forced = io.StringIO()
    Progress(forced, env={"PYMOONCAKE_PROGRESS": "1"}).step("go")
    assert forced.getvalue() == "go ...\n"
    silenced = Tty()
    Progress(silenced, env={"PYMOONCAKE_PROGRESS": "0", "TERM": "xterm"}).step("go")
    assert silenced.getvalue() == ""


def run_with_stderr(argv: Sequence[str], *, tty: bool, timeout: float = 60) -> tuple[int, str, str]:
    """Run ``argv``; its stderr is a pty (``tty``) or a pipe.  (rc, stdout, stderr)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TERM="xterm")
    env.pop("PYMOONCAKE_PROGRESS", None)
    if not tty:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        return proc.returncode, proc.stdout, proc.stderr
    master, slave = pty.openpty()
    try:
        with subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, env=env
        ) as proc:
            os.close(slave)
            slave = -1
            chunks: list[bytes] = []
            while True:
                ready, _, _ = select.select([master], [], [], timeout)
                if not ready:
                    proc.kill()
                    pytest.fail(f"no output within {timeout} s: {b''.join(chunks)!r}")
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            assert proc.stdout is not None
            out = proc.stdout.read().decode()
            rc = proc.wait(timeout)
        return rc, out, b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


@pytest.fixture
def target() -> Iterator[str]:
    argv = console_command("transfer_engine_bench", "pymooncake.cli.transfer_engine_bench")
    argv += ["--mode=target", f"--local_server_name={LOCAL}", "--buffer_size=1048576"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        match = TARGET_READY.match(read_stdout_until(proc, TARGET_READY, 30)[-1])
        assert match is not None
        yield match.group(1)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.parametrize("tty", [True, False], ids=["pty", "pipe"])
def test_transfer_engine_bench_progress(target: str, tty: bool) -> None:
    argv = console_command("transfer_engine_bench", "pymooncake.cli.transfer_engine_bench")
    argv += [
        f"--local_server_name={LOCAL}",
        f"--segment_id={target}",
        "--duration=2",
        "--threads=2",
        "--batch_size=4",
        "--block_size=4096",
        "--minloglevel=2",
    ]
    rc, out, err = run_with_stderr(argv, tty=tty)
    assert rc == 0, err
    assert out.startswith("Test completed: duration ")  # results: stdout, unchanged
    if tty:
        assert re.search(
            r"\r +[0-9.]+/2 s  [0-9]+ batches  [0-9.]+ GB/s  \(read, 2 threads\)\x1b\[K", err
        ), err
        assert err.endswith("\r\x1b[K")  # the status line is erased before the result
    else:
        assert "batches" not in err and "\r" not in err


@pytest.mark.parametrize("tty", [True, False], ids=["pty", "pipe"])
def test_cluster_start_up_progress(tty: bool) -> None:
    argv = console_command("pymooncake", "pymooncake.cli.main")
    argv += ["cluster", "--port=0", "--metadata-port=0", "--metrics-port=0", "--segment=32MB"]
    argv += ["--run-seconds=0.1"]
    rc, out, err = run_with_stderr(argv, tty=tty)
    assert rc == 0, err
    assert "pymooncake local cluster is up" in out
    steps = (
        "starting the master",
        "starting the storage node: mapping and pre-faulting 32 MiB",
        "self-check",
    )
    if tty:
        for step in steps:
            assert step in err, err
    else:
        assert not any(step in err for step in steps), err


@pytest.mark.parametrize("tty", [True, False], ids=["pty", "pipe"])
def test_bench_scripts_progress(tty: bool) -> None:
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import _common as C; "
        "C.progress('run 1/3: py'); C.log('py run 1 failed: boom')"
    )
    env_argv = [sys.executable, "-c", code]
    rc, _, err = run_with_stderr(env_argv, tty=tty)
    assert rc == 0
    assert "py run 1 failed: boom" in err  # problems always show
    assert ("run 1/3: py" in err) is tty
