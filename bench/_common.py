"""Shared helpers of the ``bench/`` scripts (standard library only).

Locating the two interpreters, starting and always stopping child process
groups, statistics and table cells, machine facts and writing result JSON.
Nothing here imports pymooncake or mooncake, so the scripts that use it run
unchanged under the reference's venv as well as ours.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
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


def log(msg: str, stream: TextIO | None = None) -> None:
    """Progress line on stderr (the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=stream or sys.stderr, flush=True)
