"""How the benches account for CPU per call: ``_common.sched_ns`` reads what processes
ran and waited (/proc schedstat), and ``store_bench`` turns two snapshots into the
per-call table that shows where a busy host's latency goes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.skipif(
    not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat").exists(),
    reason="needs /proc/<pid>/task/<tid>/schedstat (Linux with schedstats)",
)


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_process_counts_the_cpu_its_threads_ran(
    load_bench: Callable[[str], ModuleType],
) -> None:
    c = load_bench("_common")
    ran0, waited0 = c.sched_ns(os.getpid())
    _burn(0.05)
    ran1, waited1 = c.sched_ns(os.getpid())
    assert ran1 - ran0 >= 45_000_000  # 50 ms of this thread's CPU, schedstat's clock
    assert waited1 >= waited0 >= 0


def test_a_process_group_counts_every_member_and_a_reaped_pid_counts_nothing(
    load_bench: Callable[[str], ModuleType],
) -> None:
    c = load_bench("_common")
    # a wrapper and its child, like a reference console script around its ELF binary:
    # only the child burns CPU, the group total must include it
    code = (
        "import subprocess, sys\n"
        "subprocess.run([sys.executable, '-c', "
        "'import time\\nend = time.thread_time() + 0.3\\n"
        "while time.thread_time() < end: pass\\ntime.sleep(30)'])\n"
    )
    wrapper = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        ran = 0
        while time.monotonic() < deadline:
            ran, _ = c.sched_ns(wrapper.pid, group=True)
            if ran >= 300_000_000:
                break
            time.sleep(0.05)
        own, _ = c.sched_ns(wrapper.pid)  # the wrapper alone: it only waits
        assert ran >= 300_000_000, ran
        assert own < ran - 250_000_000
    finally:
        os.killpg(wrapper.pid, 9)
        wrapper.wait()
    assert c.sched_ns(wrapper.pid) == (0, 0)  # reaped: nothing left to count


def test_store_bench_reports_both_sides_per_call(
    load_bench: Callable[[str], ModuleType],
) -> None:
    sb = load_bench("store_bench")
    me = os.getpid()
    before = sb.C.sched_ns(me), sb.C.sched_ns(os.getpgid(me), group=True)
    _burn(0.02)
    got = sb._cpu_per_call(before, (me, os.getpgid(me)), 10)
    assert set(got) == set(sb.CPU_FIELDS)
    assert got["cpu_client_us"] >= 1_800  # 20 ms over 10 calls
    assert got["cpu_master_us"] >= 1_800  # the group holds this process: its burn counts too

    def s(x: float) -> dict[str, float]:
        return {"median": x, "min": x, "max": x, "n": 1}

    row = {"scenario": "2proc", "op": "is_exist"}
    for impl, (cl, ma, wc, wm) in {"ref": (100, 40, 30, 20), "py": (120, 130, 10, 60)}.items():
        for k, v in zip(sb.CPU_FIELDS, (cl, ma, wc, wm), strict=True):
            row[f"{k}_{impl}"] = s(v)
    text = "\n".join(sb._render_cpu([row], ["ref", "py"]))
    assert "| 2proc | is_exist | 100 | 40 | 140 | 50 | 120 | 130 | 250 | 70 |" in text
    # a run without the fields (an older JSON) renders dashes, not an error
    assert "| 1proc | put | - | - | - | - |" in "\n".join(
        sb._render_cpu([{"scenario": "1proc", "op": "put"}], ["ref"])
    )
