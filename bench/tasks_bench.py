"""Copy/move task bench: how long a copy task takes to finish, and how fast a batch of
copy tasks moves bytes, pymooncake vs the reference (``create_copy_task`` /
``query_task`` of both wheels).

Two roles in one file:

* **driver** (default): per implementation and run, starts that implementation's
  ``mooncake_master`` (embedded HTTP metadata server) and three workers: ``src``
  and ``dst`` contribute a segment each (they run the tasks: the source's owner
  copies), ``coord`` has none and drives. Measured, per value size:

  - *latency*: one copy task of one key at a time (``create_copy_task`` until
    ``query_task`` says SUCCESS), median of ``--latency-tasks`` tasks;
  - *throughput*: ``--keys`` keys put on ``src``, one copy task each to ``dst``, all
    created at once, time until every task succeeded -> MB/s copied.

  Prints a markdown table and writes ``bench/results/tasks_bench-<timestamp>.json``
  (+ ``-latest``).
* **worker** (``--worker``): imports only ``mooncake.store``; runs under either
  interpreter (the reference's venv ``.cache/refvenv`` with ``MC_FORCE_TCP=1``).

Usage::

    python bench/tasks_bench.py                  # py and ref, 1 run
    python bench/tasks_bench.py --impl py --sizes 64K,4M --keys 32

The reference's clients poll their master for tasks once a second; pymooncake's
learn of them from the heartbeat (also once a second) and fetch again as soon as a
task ends, so latency is heartbeat-bound in both and throughput is not in ours.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _common as C

IMPLS = ("py", "ref")
SEGMENT = 256 * C.MiB


# ------------------------------------------------------------------------- worker


def worker() -> int:
    from mooncake.store import MooncakeDistributedStore, ReplicateConfig, TaskStatus

    store = MooncakeDistributedStore()
    state: dict[str, Any] = {}

    def setup(hostname: str, segment: int, metadata: str, master: str) -> dict[str, Any]:
        rc = store.setup(hostname, metadata, segment, 64 * C.MiB, "tcp", "", master)
        if rc != 0:
            raise RuntimeError(f"setup returned {rc}")
        state["ready"] = True
        return {"ok": True}

    def put(keys: list[str], size: int, prefer: str) -> dict[str, Any]:
        value = os.urandom(size)
        cfg = ReplicateConfig()
        cfg.replica_num = 1
        cfg.preferred_segment = prefer
        for k in keys:
            rc = store.put(k, value, cfg)
            if rc != 0:
                raise RuntimeError(f"put {k}: {rc}")
        return {"ok": True}

    def wait_all(ids: list[Any], deadline: float) -> list[int]:
        left = dict(enumerate(ids))
        statuses = [0] * len(ids)
        while left:
            for i, tid in list(left.items()):
                resp, err = store.query_task(tid)
                if err != 0:
                    raise RuntimeError(f"query_task: {err}")
                if resp.status in (TaskStatus.SUCCESS, TaskStatus.FAILED):
                    statuses[i] = int(resp.status == TaskStatus.SUCCESS)
                    del left[i]
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(left)} task(s) unfinished")
            time.sleep(0.002)
        return statuses

    def copy(keys: list[str], target: str, together: bool) -> dict[str, Any]:
        times: list[float] = []
        ok = 0
        if together:
            t0 = time.perf_counter()
            ids = []
            for k in keys:
                tid, err = store.create_copy_task(k, [target])
                if err != 0:
                    raise RuntimeError(f"create_copy_task {k}: {err}")
                ids.append(tid)
            ok = sum(wait_all(ids, time.monotonic() + 600))
            times.append(time.perf_counter() - t0)
        else:
            for k in keys:
                t0 = time.perf_counter()
                tid, err = store.create_copy_task(k, [target])
                if err != 0:
                    raise RuntimeError(f"create_copy_task {k}: {err}")
                ok += sum(wait_all([tid], time.monotonic() + 120))
                times.append(time.perf_counter() - t0)
        return {"times": times, "ok": ok}

    def close() -> None:
        if state.get("ready"):
            store.close()

    return C.serve_commands(C.reply_channel(), {"setup": setup, "put": put, "copy": copy}, close)


# ------------------------------------------------------------------------- driver


def run_impl(
    impl: str, sizes: list[int], keys: int, latency_tasks: int, logs: Path
) -> dict[str, Any]:
    python = C.python_for(impl)
    env = C.env_for(impl)
    master, rpc, meta = C.start_master(impl, python, env, 5000, logs / f"{impl}-master")
    workers: dict[str, C.JsonWorker] = {}
    out: dict[str, Any] = {}
    try:
        names = {}
        for role in ("src", "dst", "coord"):
            workers[role] = C.JsonWorker(
                f"{impl} {role}",
                [python, __file__, "--worker"],
                {**env, **C.STORE_WORKER_ENV},
                logs / f"{impl}-{role}.err",
            )
        for role, port in zip(("src", "dst", "coord"), C.free_ports(3), strict=True):
            names[role] = f"{C.HOST}:{port}"
            workers[role].call(
                "setup",
                120,
                hostname=names[role],
                segment=0 if role == "coord" else SEGMENT,
                metadata=f"http://{C.HOST}:{meta}/metadata",
                master=f"{C.HOST}:{rpc}",
            )
        coord = workers["coord"]
        for size in sizes:
            label = C.size_label(size)
            C.progress(f"{impl} {label}")
            lat_keys = [f"lat-{label}-{i}" for i in range(latency_tasks)]
            coord.call("put", 300, keys=lat_keys, size=size, prefer=names["src"])
            lat = coord.call("copy", 600, keys=lat_keys, target=names["dst"], together=False)
            n = max(1, min(keys, (SEGMENT // 2) // size))
            bulk_keys = [f"bulk-{label}-{i}" for i in range(n)]
            coord.call("put", 600, keys=bulk_keys, size=size, prefer=names["src"])
            bulk = coord.call("copy", 900, keys=bulk_keys, target=names["dst"], together=True)
            secs = bulk["times"][0]
            out[label] = {
                "size": size,
                "latency_s": statistics.median(lat["times"]),
                "latency_all_s": lat["times"],
                "latency_ok": lat["ok"],
                "bulk_keys": n,
                "bulk_s": secs,
                "bulk_ok": bulk["ok"],
                "bulk_MBps": n * size / secs / 1e6,
            }
    finally:
        for w in workers.values():
            w.stop()
        master.stop()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true")
    p.add_argument("--impl", default="py,ref")
    p.add_argument("--sizes", default="64K,4M")
    p.add_argument("--keys", type=int, default=32, help="copy tasks of the throughput case")
    p.add_argument("--latency-tasks", type=int, default=5)
    args = p.parse_args()
    if args.worker:
        return worker()
    impls = C.parse_list(args.impl, IMPLS)
    sizes = [C.parse_size(s) for s in C.parse_list(args.sizes)]
    started = time.monotonic()
    data: dict[str, Any] = {"machine": C.machine_info(), "sizes": sizes, "results": {}}
    logs = C.RESULTS_DIR / "tasks_bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    for impl in impls:
        data["results"][impl] = run_impl(impl, sizes, args.keys, args.latency_tasks, logs)
    data["machine"]["loadavg_end"] = os.getloadavg()
    data["wall_s"] = time.monotonic() - started
    rows = []
    for size in sizes:
        label = C.size_label(size)
        for impl in impls:
            r = data["results"][impl][label]
            rows.append(
                [
                    label,
                    impl,
                    f"{r['latency_s'] * 1000:.0f} ms ({r['latency_ok']}/{len(r['latency_all_s'])} ok)",
                    f"{r['bulk_keys']}",
                    f"{r['bulk_s']:.2f} s ({r['bulk_ok']} ok)",
                    f"{r['bulk_MBps']:.1f}",
                ]
            )
    text = (
        "Copy tasks: one at a time (create -> SUCCESS, median) and a batch created at once\n\n"
        + C.markdown_table(
            ["value", "impl", "one task", "batch keys", "batch time", "batch MB/s"], rows
        )
        + "\n\n"
        + C.machine_line(data)
    )
    C.publish("tasks_bench", data, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
