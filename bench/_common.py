"""Shared helpers of the ``bench/`` scripts (standard library only).

Locating the two interpreters and their variants' environments, starting and
always stopping child process groups, the Transfer Engine target handshake, the
Store benches' master, JSON-line workers and value pattern, statistics and table
cells, machine facts and writing result JSON. Nothing here imports pymooncake or
mooncake (but :func:`free_ports`, where it can), so the scripts that use it (their
worker roles included) run unchanged under the reference's venv as well as ours.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

#: the reference wheel the anchor figures were taken with
REF_PACKAGE = "mooncake-transfer-engine-non-cuda"
#: env that every reference process gets (no RDMA device here; anchor-bench.md)
REF_ENV = {"MC_FORCE_TCP": "1"}

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

#: every bench process binds and connects here
HOST = "127.0.0.1"


# ---------------------------------------------------------------- interpreters


def ref_python(create: bool = True) -> str:
    """The reference venv's interpreter.

    ``$PYMOONCAKE_REF_PYTHON`` if set, else ``<repo>/.cache/refvenv/bin/python``,
    created with ``python3 -m venv`` + ``pip install mooncake-transfer-engine-non-cuda``
    when missing and ``create`` is true.

    Raises:
        RuntimeError: the interpreter is missing and could not be created.
    """
    env = os.environ.get("PYMOONCAKE_REF_PYTHON")
    if env:
        if not os.access(env, os.X_OK):
            raise RuntimeError(f"PYMOONCAKE_REF_PYTHON={env} is not an executable interpreter")
        return env
    venv = REPO / ".cache" / "refvenv"
    py = venv / "bin" / "python"
    if py.exists():
        return str(py)
    if not create:
        raise RuntimeError(f"reference venv {venv} missing; set PYMOONCAKE_REF_PYTHON")
    base = shutil.which("python3") or sys.executable
    log(f"creating the reference venv {venv} ({base} -m venv + pip install {REF_PACKAGE}) ...")
    try:
        subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", REF_PACKAGE], check=True, timeout=1200
        )
    except (subprocess.SubprocessError, OSError) as exc:
        raise RuntimeError(
            f"could not create the reference venv {venv}: {exc}. The wheel needs network access "
            f"to PyPI and the Debian packages libibverbs1 librdmacm1 libnuma1; or point "
            f"PYMOONCAKE_REF_PYTHON at an interpreter that has {REF_PACKAGE} installed"
        ) from exc
    return str(py)


def py_python() -> str:
    """pymooncake's interpreter: ``$PYMOONCAKE_PY_PYTHON``, else ``<repo>/.venv/bin/python``."""
    env = os.environ.get("PYMOONCAKE_PY_PYTHON")
    if env:
        return env
    py = REPO / ".venv" / "bin" / "python"
    return str(py) if py.exists() else sys.executable


def python_for(impl: str) -> str:
    return ref_python() if impl == "ref" else py_python()


def env_for(impl: str) -> dict[str, str]:
    env = dict(os.environ)
    if impl == "ref":
        env.update(REF_ENV)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def base_impl(variant: str) -> str:
    """``ref`` or ``py``: whose interpreter and console scripts a variant uses."""
    return "ref" if variant == "ref" else "py"


def variant_env(variant: str, extra: Mapping[str, str]) -> dict[str, str]:
    """:func:`env_for` of the variant's base implementation plus the variant's ``extra``."""
    env = env_for(base_impl(variant))
    env.update(extra)
    return env


def tcp_env(impl: str) -> dict[str, str]:
    """:func:`env_for`, measuring TCP loopback: pymooncake's same-host transport (which
    would otherwise be chosen between two local processes) is switched off here;
    bench/samehost_bench.py measures that path."""
    env = env_for(impl)
    if impl != "ref":
        env["PYMOONCAKE_SAME_HOST"] = "0"
    return env


def script_next_to(python: str, name: str) -> str:
    """A console script in the same ``bin/`` directory as ``python`` (symlinks not resolved)."""
    path = os.path.join(os.path.dirname(python), name)
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"{name} not found next to {python} (looked for {path})")
    return path


def impl_version(impl: str, python: str) -> dict[str, Any]:
    """Package version (and for ours the git commit) of one implementation; never raises."""
    pkg = REF_PACKAGE if impl == "ref" else "pymooncake"
    info: dict[str, Any] = {"python": python, "package": pkg}
    code = f"import importlib.metadata as m, sys; print(m.version({pkg!r})); print(sys.version)"
    try:
        out = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, timeout=60, check=True
        ).stdout.splitlines()
        info["version"] = out[0]
        info["python_version"] = out[1].split()[0]
    except (subprocess.SubprocessError, OSError, IndexError) as exc:
        info["version_error"] = str(exc)
    if impl == "py":
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            rev = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            info["git"] = rev + ("+dirty(src)" if dirty else "")
    return info


# ---------------------------------------------------------------- processes


class Child:
    """A child process in its own process group, its output in two log files.

    ``stop()`` signals the whole group (the reference's console scripts are
    Python wrappers around an ELF child, see anchor-bench.md pain point 14),
    waits a bounded time, then SIGKILLs the group.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        log_stem: Path,
        stdin_pipe: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.out_path = log_stem.with_suffix(".out")
        self.err_path = log_stem.with_suffix(".err")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=dict(env),
                start_new_session=True,
            )
        self.pid = self.popen.pid
        #: a master's admin/metrics HTTP port (set by start_master)
        self.metrics_port = 0

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if it is still running after ``timeout`` seconds."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def output(self) -> tuple[str, str]:
        return (
            self.out_path.read_text(errors="replace"),
            self.err_path.read_text(errors="replace"),
        )

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str] | None:
        """Poll both logs until ``pattern`` matches, the child exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            out, err = self.output()
            m = pattern.search(out) or pattern.search(err)
            if m or self.poll() is not None or time.monotonic() > deadline:
                return m
            time.sleep(0.05)

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, grace: float = 5.0) -> int | None:
        """Close stdin, SIGTERM the group, wait ``grace`` s, SIGKILL the group; bounded."""
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        if self.popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        # also reaps grandchildren left behind by a wrapper that already exited
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        return self.popen.returncode

    def tail(self, n: int = 15) -> str:
        out, err = self.output()
        lines = (out + err).strip().splitlines()
        return "\n".join(lines[-n:])


def group_cpu_seconds(pgid: int) -> float:
    """utime+stime of every live process in process group ``pgid`` (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the ")": state ppid pgrp session ... utime(12) stime(13)
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def sched_ns(pid: int, group: bool = False) -> tuple[int, int]:
    """(ran, waited): nanoseconds every thread of process ``pid`` has run on a CPU
    and has waited runnable for one (the first two fields of each
    /proc/<pid>/task/<tid>/schedstat), summed; with ``group``, of every process in
    process group ``pid`` (a reference console script is a Python wrapper around
    the ELF child that does the work).  Threads that exited are not counted, so
    take both snapshots of a phase while its processes live.  (0, 0) where /proc
    has no schedstat."""
    if group:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[2]) == pid:
                            pids.append(entry)
                except (OSError, ValueError, IndexError):
                    continue
    else:
        pids = [str(pid)]
    ran = waited = 0
    for p in pids:
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/schedstat") as f:
                    fields = f.read().split()
                ran += int(fields[0])
                waited += int(fields[1])
            except (OSError, ValueError, IndexError):
                continue
    return ran, waited


@contextlib.contextmanager
def competitors(n: int, max_s: float = 3600.0) -> Iterator[list[int]]:
    """``n`` CPU-bound processes (a pure-Python busy loop each) for the duration of the
    block: the "busy host" of the issues' goals.  Each also exits by itself after
    ``max_s`` (a bench killed hard leaves nothing spinning).  Yields their pids."""
    code = f"import time\nend = time.monotonic() + {max_s}\nwhile time.monotonic() < end: pass\n"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(n)
    ]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so ``finally`` blocks stop the children."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def reply_channel() -> TextIO:
    """In a worker role: the original stdout, for its replies only; fd 1 (C++ logs,
    prints of any library) goes to stderr from now on."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return reply


# ---------------------------------------------------------------- Transfer Engine


def batch_for(block: int) -> int:
    """Blocks per batch call: 128, 32 for 16 MiB (the anchor; 128 x 16 MiB would exceed
    a 1 GiB buffer)."""
    return 32 if block >= 16 * MiB else 128


def spawn_target(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    """A TE target child, pipes on its stdin and stdout, in this worker's process group
    (the driver's killpg reaches it too); see :func:`read_ready` and :func:`stop_target`."""
    return subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def stop_target(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Close the target's stdin (it serves until then), wait ``grace`` s, else kill it."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def read_ready(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, int]:
    """Wait (bounded) for a TE target child's ``READY <port> <addr>`` line on its stdout."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            m = re.search(rb"READY (\d+) (\d+)\n", buf)
            if m:
                return int(m.group(1)), int(m.group(2))
        elif proc.poll() is not None:
            break
    raise RuntimeError(f"te target did not print READY within {timeout} s (rc={proc.poll()})")


# ---------------------------------------------------------------- Store: values


OBJECT_NOT_FOUND = -704  # reference ErrorCode
PAT_LEN = MiB + 4099  # not a divisor of any value size: a wrong offset shows
PAT_SEED = 20261126
MARKER_LEN = 64


def pattern() -> bytes:
    """The putter's buffer content, repeated: ``PAT_LEN`` seeded random bytes."""
    return random.Random(PAT_SEED).randbytes(PAT_LEN)


def expected_value(size: int, marker: str) -> bytes:
    """The bytes of a phase's first key: the buffer pattern, with ``marker`` in front."""
    pat = pattern()
    data = (pat * (size // PAT_LEN + 1))[:size]
    m = marker.encode()[:MARKER_LEN].ljust(MARKER_LEN, b"#")[:size]
    return m + data[len(m) :]


# ---------------------------------------------------------------- Store: processes


#: extra environment of the store workers (not of the master)
STORE_WORKER_ENV = {"MC_TCP_BIND_ADDRESS": HOST}
MASTER_READY_RE = re.compile(r"Master service started on \S+:\d+")


def free_ports(k: int) -> list[int]:
    """``k`` distinct ports on HOST for servers a bench is about to start.  A driver
    (run by our interpreter) takes them from ``pymooncake.testing.free_port``:
    below the kernel's ephemeral range, so that no outgoing connection of the
    host takes one between this call and the server's bind.  Under an interpreter
    without pymooncake (the reference's venv), the kernel's choice of port 0."""
    try:
        from pymooncake.testing import free_port
    except ImportError:
        pass
    else:
        return [free_port(HOST) for _ in range(k)]
    socks = []
    try:
        for _ in range(k):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def phase_timeout(nbytes: int) -> float:
    return 60.0 + nbytes / 5e7  # a floor of 50 MB/s, far below anything measured


def serve_commands(
    reply: TextIO, handlers: Mapping[str, Callable[..., Any]], close: Callable[[], None]
) -> int:
    """A worker's command loop: one JSON command a line on stdin, one JSON line on
    ``reply`` each, until ``{"cmd": "exit"}`` or EOF; then ``close()`` and a last
    ``{"closed": true}`` line."""
    try:
        for line in sys.stdin:
            msg = json.loads(line)
            cmd = msg.pop("cmd")
            if cmd == "exit":
                break
            try:
                res = handlers[cmd](**msg)
            except Exception as exc:  # a bench worker reports, the driver decides
                res = {"error": f"{cmd}: {type(exc).__name__}: {exc}"}
            reply.write(json.dumps(res) + "\n")
    finally:
        close()
        reply.write(json.dumps({"closed": True}) + "\n")
    return 0


class JsonWorker:
    """A worker child (:func:`serve_commands`) in its own process group; :meth:`call` is
    one bounded round trip of a JSON line."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "wb") as err:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        self.pid = self.popen.pid
        self._buf = b""

    def tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join("    " + x for x in lines[-n:])

    def _readline(self, deadline: float, what: str) -> dict[str, Any]:
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.name}: {what} did not answer in time\n{self.tail()}")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    rc = self.popen.poll()
                    raise RuntimeError(
                        f"{self.name} exited (rc={rc}) during {what}; its log "
                        f"{self.log_path}:\n{self.tail()}"
                    )
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return dict(json.loads(line))

    def call(self, cmd: str, limit_s: float, **kw: Any) -> dict[str, Any]:
        assert self.popen.stdin is not None
        try:
            self.popen.stdin.write((json.dumps({"cmd": cmd, **kw}) + "\n").encode())
            self.popen.stdin.flush()
        except OSError as exc:
            raise RuntimeError(f"{self.name} is gone ({exc}); log:\n{self.tail()}") from exc
        res = self._readline(time.monotonic() + limit_s, cmd)
        if "error" in res:
            raise RuntimeError(f"{self.name}: {res['error']}\n{self.tail()}")
        return res

    def stop(self) -> None:
        """Ask it to close its store (engine before master), then TERM/KILL its group."""
        if self.popen.poll() is None and self.popen.stdin is not None:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                self.popen.stdin.write(b'{"cmd": "exit"}\n')
                self.popen.stdin.flush()
                self._readline(time.monotonic() + 20, "exit")
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def start_master(
    variant: str,
    python: str,
    env: Mapping[str, str],
    lease_ms: int,
    log_stem: Path,
    extra_args: Sequence[str] = (),
) -> tuple[Child, int, int]:
    """Start ``mooncake_master`` (HTTP metadata server embedded) on free ports; returns
    (child, rpc port, metadata port).  ``extra_args`` are appended to its flags; the
    admin/metrics port is ``child.metrics_port``.

    Raises:
        RuntimeError: it did not come up in three attempts.
    """
    exe = script_next_to(python, "mooncake_master")
    last = ""
    for _attempt in range(3):
        rpc, metrics, meta = free_ports(3)
        argv = [
            exe,
            f"--rpc_address={HOST}",
            f"--port={rpc}",
            f"--rpc_port={rpc}",
            f"--metrics_host={HOST}",
            f"--metrics_port={metrics}",
            f"--default_kv_lease_ttl={lease_ms}",
            "--logtostderr",
            "--enable_http_metadata_server=true",
            f"--http_metadata_server_host={HOST}",
            f"--http_metadata_server_port={meta}",
            *extra_args,
        ]
        child = Child(argv, env=env, log_stem=log_stem)
        child.metrics_port = metrics
        ok = False
        try:
            deadline = time.monotonic() + 60
            if variant != "ref":  # ours prints this line once every listener is up
                ok = child.wait_for(MASTER_READY_RE, 60) is not None
            while not ok and child.poll() is None and time.monotonic() < deadline:
                ok = port_open(rpc) and port_open(meta)
                if not ok:
                    time.sleep(0.1)
            ok = ok and child.poll() is None
        finally:
            if not ok:
                last = child.tail()
                child.stop()
        if ok:
            return child, rpc, meta
        log(f"{variant} master did not come up (ports {rpc}/{meta}); retrying:\n{last}")
    raise RuntimeError(f"{variant} mooncake_master ({exe}) did not start; last log:\n{last}")


class StorePass:
    """One pass of one variant: its ``mooncake_master`` and store workers A (the putter,
    with a segment) and B (the getter, none), both with :data:`STORE_WORKER_ENV`.

    The constructor starts the master (RuntimeError if it does not come up);
    :meth:`start_workers` starts and sets up A and B; :meth:`stop` stops B, A, then
    the master. Logs: ``<log_prefix>-master.{out,err}``, ``<log_prefix>-{A,B}.err``.
    """

    def __init__(
        self,
        variant: str,
        run: int,
        python: str,
        extra_env: Mapping[str, str],
        lease_ms: int,
        log_prefix: Path,
    ) -> None:
        self.variant, self.run, self.python, self.lease_ms = variant, run, python, lease_ms
        self.log_prefix = log_prefix
        #: prefix of every key of this pass
        self.tag = f"{variant}{run}p{os.getpid()}"
        env = variant_env(variant, extra_env)
        self.master, self.rpc, self.meta = start_master(
            variant, python, env, lease_ms, Path(f"{log_prefix}-master")
        )
        self.worker_env = {**env, **STORE_WORKER_ENV}
        self.workers: dict[str, JsonWorker] = {}

    def start_workers(
        self,
        script_args: Sequence[str],
        *,
        label: str,
        buffer_bytes: int,
        batch: int,
        segment_bytes: int,
        local_buffer_bytes: int,
        into: dict[str, Any],
    ) -> tuple[JsonWorker, JsonWorker]:
        """Start A and B (``python *script_args --buffer-bytes --lease-ms --batch``), send
        each its ``setup``; the replies go into ``into["setup_A"]`` / ``["setup_B"]``."""
        argv = [
            self.python,
            *script_args,
            f"--buffer-bytes={buffer_bytes}",
            f"--lease-ms={self.lease_ms}",
            f"--batch={batch}",
        ]
        for role in ("A", "B"):
            self.workers[role] = JsonWorker(
                f"{self.variant} {label} {role} (run {self.run + 1})",
                argv,
                self.worker_env,
                Path(f"{self.log_prefix}-{role}.err"),
            )
        metadata = f"http://{HOST}:{self.meta}/metadata"
        for role, seg in (("A", segment_bytes), ("B", 0)):
            into[f"setup_{role}"] = self.workers[role].call(
                "setup",
                180,
                role=role,
                segment=seg,
                local_buffer=local_buffer_bytes,
                metadata=metadata,
                master=f"{HOST}:{self.rpc}",
            )
        return self.workers["A"], self.workers["B"]

    def stop(self) -> None:
        for role in ("B", "A"):
            if role in self.workers:
                self.workers[role].stop()
        self.master.stop()
        if self.master.poll() is None:
            log(f"{self.variant} master pid {self.master.pid} did not stop")


# ---------------------------------------------------------------- numbers


def parse_size(text: str) -> int:
    """``4K``, ``64KiB``, ``1M``, ``16MiB``, ``1G`` or a plain byte count."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {text!r} (use e.g. 4K, 64K, 1M, 16M or bytes)")
    mult = {"": 1, "K": KiB, "M": MiB, "G": GiB}[m.group(2).upper()]
    return int(m.group(1)) * mult


def parse_list(text: str, allowed: Sequence[str] | None = None) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise ValueError(f"unknown value(s) {bad}; allowed: {', '.join(allowed)}")
    return items


def size_label(n: int) -> str:
    for unit, mult in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= mult and n % mult == 0:
            return f"{n // mult} {unit}"
    return f"{n} B"


def summary(values: Sequence[float]) -> dict[str, Any] | None:
    """median / min / max / n of ``values``, or None when empty."""
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def cell(s: Mapping[str, Any] | None, fmt: str = "{:.2f}") -> str:
    """``median (min-max)`` of a :func:`summary`, ``median`` if one value, ``-`` if none."""
    if not s:
        return "-"
    if s["n"] == 1:
        return fmt.format(s["median"])
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


def ratio(num: Mapping[str, Any] | None, den: Mapping[str, Any] | None) -> float | None:
    if not num or not den or not den["median"]:
        return None
    return float(num["median"]) / float(den["median"])


def check(ok: bool | None) -> str:
    return "-" if ok is None else ("✓" if ok else "✗")


def machine_line(data: Mapping[str, Any]) -> str:
    """The last line of every bench's tables: CPU, load before/after, wall time."""
    m = data["machine"]
    return (
        f"Machine: {m.get('cpu', '?')}, nproc {m['nproc']}, load {m['loadavg_start'][0]:.2f} -> "
        f"{m['loadavg_end'][0]:.2f}; wall {data['wall_s']:.0f} s"
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- machine, output


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "loadavg_start": os.getloadavg(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_kib"] = int(line.split()[1])
                break
    return info


def write_results(name: str, data: Mapping[str, Any], latest: bool = True) -> tuple[Path, Path]:
    """Write ``bench/results/<name>-<timestamp>.json`` and (if ``latest``) ``<name>-latest.json``.

    Returns both paths (the second is not written when ``latest`` is false).
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = json.dumps(data, indent=1, sort_keys=False) + "\n"
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    latest_path = RESULTS_DIR / f"{name}-latest.json"
    path.write_text(text)
    if latest:
        latest_path.write_text(text)
    return path, latest_path


def publish(name: str, data: dict[str, Any], text: str) -> None:
    """Put the tables ``text`` into ``data["table_md"]``, write the JSON (``-latest`` only
    for a run that was not interrupted), print the tables and where the JSON went."""
    data["table_md"] = text
    done = not data.get("interrupted")
    path, latest = write_results(name, data, latest=done)
    print(text)
    print(f"\nJSON: {path}" + (f" (and {latest.name})" if done else " (interrupted: latest kept)"))


def log(msg: str, stream: TextIO | None = None) -> None:
    """A timestamped line on stderr, always (problems, interruptions; the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=stream or sys.stderr, flush=True)


def progress_wanted(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """Progress lines go to terminals only, as pymooncake's commands do
    (pymooncake.cli._progress; re-stated here because the bench scripts must run
    without pymooncake): PYMOONCAKE_PROGRESS=1 forces them, =0 silences them."""
    forced = (os.environ if env is None else env).get("PYMOONCAKE_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress(msg: str, stream: TextIO | None = None) -> None:
    """A progress line (a case measured, a run started): on a terminal a timestamped
    line on stderr; nothing when stderr is a pipe or a file (CI logs keep the tables
    and the problems only)."""
    stream = stream or sys.stderr
    if progress_wanted(stream):
        log(msg, stream)
