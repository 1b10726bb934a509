"""How ``bench/master_scale.py`` scores a cell against the reference: full-pool put
latencies of a side that refused those puts are times of refusals, not of puts."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from types import ModuleType
from typing import Any


def _run(impl: str, p50: float, fails: int, put_p50: float) -> dict[str, Any]:
    return {
        "impl": impl,
        "level": 10_000,
        "run": 0,
        "lat": {"put": {"p50_us": put_p50, "p99_us": put_p50 * 2}},
        "evict": {"n": 1000, "p50_us": p50, "p99_us": p50 * 3, "max_us": p50 * 9, "fails": fails},
    }


def _score(ms: ModuleType, runs: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    a = argparse.Namespace(
        levels=[10_000],
        impls=["ref", "py"],
        evict_puts=1000,
        runs=1,
        evict_ratio=0.05,
        lease_ms=5000,
    )
    machine = {"nproc": 2, "loadavg_start": [0.0], "loadavg_end": [0.0]}
    data: dict[str, Any] = {"runs": runs, "machine": machine, "wall_s": 1.0}
    ms.summarize(data, a)
    return data["goals"], ms.render(data, a)


def test_refused_full_pool_puts_lose_their_latency_cells(
    load_bench: Callable[[str], ModuleType],
) -> None:
    # the reference answers faster because it refuses every put; ours stores them
    goals, text = _score(
        load_bench("master_scale"), [_run("ref", 40.0, 1000, 50.0), _run("py", 100.0, 0, 60.0)]
    )
    # put p50/p99 are behind (60 > 50); the three full-pool latencies count for py,
    # and "puts failed" (0 against 1000) too
    assert goals["cells_at_least_ref"] == "4/6"
    assert goals["full_pool_refused_by_one_side"] == ["10k"]
    assert "time refusals" in text


def test_when_both_sides_store_the_times_are_compared(
    load_bench: Callable[[str], ModuleType],
) -> None:
    goals, text = _score(
        load_bench("master_scale"), [_run("ref", 40.0, 3, 50.0), _run("py", 100.0, 0, 40.0)]
    )
    # put p50/p99 ahead, full-pool p50/p99/max behind, puts failed ahead
    assert goals["cells_at_least_ref"] == "3/6"
    assert goals["full_pool_refused_by_one_side"] == []
    assert "time refusals" not in text
