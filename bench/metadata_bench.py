"""Metadata backends: per-operation latency, and engine start-up through etcd.

1. **Operations** (our venv, one thread): ``get`` (hit), ``set`` (a descriptor of
   ~1 KiB), ``create`` (new key), ``create`` (existing key), ``compare_and_remove``
   against ``memory://``, our HTTP metadata server (a separate process), etcd
   (Debian's ``etcd``, one member, fsync on) and ``redis-server``, each on 127.0.0.1.
2. **Engine start-up through etcd**: ``mooncake.engine.TransferEngine().initialize(name,
   "etcd://127.0.0.1:P", "tcp", "")`` then ``close()`` (ours) / process-local teardown
   (reference), repeated; the same worker script under both interpreters
   (``MC_FORCE_TCP=1``, ``MC_TCP_BIND_ADDRESS=127.0.0.1``).

Usage::

    .venv/bin/python bench/metadata_bench.py            # ~30 s
    .venv/bin/python bench/metadata_bench.py --ops 200 --inits 5 --impl py

Latencies in microseconds (median and p99 of ``--ops`` operations); start-up in
milliseconds (median and max of ``--inits``).  Tables on stdout, JSON in
``bench/results/metadata_bench-<timestamp>.json`` and ``metadata_bench-latest.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

WORKER = r"""
import json, os, sys, time, uuid
import mooncake.engine as mc
server, n = sys.argv[1], int(sys.argv[2])
times = []
engines = []
for i in range(n):
    e = mc.TransferEngine()
    t = time.perf_counter()
    rc = e.initialize(f"bench-{uuid.uuid4().hex[:8]}", server, "tcp", "")
    times.append((time.perf_counter() - t) * 1e3)
    assert rc == 0, rc
    engines.append(e)
    close = getattr(e, "close", None)
    if close is not None:
        close()
print(json.dumps(times), flush=True)
os._exit(0)  # the reference has no close(): do not wait for its destructors
"""


def _time_ops(store: Any, n: int) -> dict[str, dict[str, float]]:
    value = json.dumps(
        {"buffers": [{"addr": 1 << 40, "length": 1 << 20, "name": "x" * 16}] * 12}
    ).encode()
    run = uuid.uuid4().hex[:8]
    ops: dict[str, Callable[[int], object]] = {
        "set": lambda i: store.set(f"mooncake/ram/b{run}-{i}", value),
        "get": lambda i: store.get(f"mooncake/ram/b{run}-{i}"),
        "create (new)": lambda i: store.create(f"mooncake/rpc_meta/b{run}-{i}", value),
        "create (exists)": lambda i: store.create(f"mooncake/rpc_meta/b{run}-{i}", value),
        "compare_and_remove": lambda i: store.compare_and_remove(
            f"mooncake/rpc_meta/b{run}-{i}", value
        ),
    }
    out = {}
    for name, op in ops.items():
        samples = []
        for i in range(n):
            t = time.perf_counter()
            op(i)
            samples.append((time.perf_counter() - t) * 1e6)
        samples.sort()
        out[name] = {"median": samples[len(samples) // 2], "p99": common.percentile(samples, 99)}
    for i in range(n):
        store.remove(f"mooncake/ram/b{run}-{i}")
    return out


def bench_ops(n: int) -> dict[str, Any]:
    from pymooncake.testing import EtcdCluster, RedisServer, console_command, read_stdout_until
    from pymooncake.transfer.metadata import HttpMetadataStore, MemoryMetadataStore
    from pymooncake.transfer.metadata.etcd import EtcdMetadataStore
    from pymooncake.transfer.metadata.redis import RedisMetadataStore

    results: dict[str, Any] = {}
    store: Any = MemoryMetadataStore(f"bench-{os.getpid()}")
    results["memory"] = _time_ops(store, n)
    http = subprocess.Popen(
        [
            *console_command(
                "mooncake_http_metadata_server", "pymooncake.cli.http_metadata_server"
            ),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        line = read_stdout_until(http)[0]
        store = HttpMetadataStore(line.rsplit(" ", 1)[1])
        results["http"] = _time_ops(store, n)
        store.close()
    finally:
        http.terminate()
        http.wait()
        assert http.stdout is not None
        http.stdout.close()
    with EtcdCluster() as etcd:
        store = EtcdMetadataStore(etcd.endpoints)
        results["etcd"] = _time_ops(store, n)
        store.close()
    with RedisServer() as redis:
        store = RedisMetadataStore(redis.address)
        results["redis"] = _time_ops(store, n)
        store.close()
    return results


def bench_inits(impls: list[str], n: int) -> dict[str, Any]:
    from pymooncake.testing import EtcdCluster

    results: dict[str, Any] = {}
    with EtcdCluster() as etcd:
        for impl in impls:
            python = common.python_for(impl)
            env = {**common.env_for(impl), "MC_FORCE_TCP": "1", "MC_TCP_BIND_ADDRESS": "127.0.0.1"}
            proc = subprocess.run(
                [python, "-c", WORKER, etcd.url, str(n)],
                capture_output=True,
                text=True,
                env=env,
                timeout=300,
                cwd="/",
            )
            if proc.returncode != 0:
                raise RuntimeError(f"{impl} worker failed: {proc.stderr[-2000:]}")
            times = json.loads(proc.stdout.strip().splitlines()[-1])
            results[impl] = common.summary(times)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", type=int, default=1000, help="operations per op kind and backend")
    ap.add_argument("--inits", type=int, default=10, help="engine start-ups per implementation")
    ap.add_argument("--impl", default="py,ref", help="implementations for the start-up part")
    args = ap.parse_args()
    start = time.monotonic()
    data: dict[str, Any] = {"machine": common.machine_info(), "args": vars(args)}
    data["ops_us"] = bench_ops(args.ops)
    data["init_ms"] = bench_inits(common.parse_list(args.impl, ["py", "ref"]), args.inits)
    data["machine"]["loadavg_end"] = os.getloadavg()
    data["wall_s"] = time.monotonic() - start

    backends = list(data["ops_us"])
    ops = list(data["ops_us"][backends[0]])
    rows = [
        [
            op,
            *(
                f"{data['ops_us'][b][op]['median']:.0f} / {data['ops_us'][b][op]['p99']:.0f}"
                for b in backends
            ),
        ]
        for op in ops
    ]
    print(f"Metadata operations, µs median / p99 ({args.ops} each, one thread, 127.0.0.1)\n")
    print(common.markdown_table(["op", *backends], rows))
    print(f"\nEngine initialize() through etcd, ms median (min-max) of {args.inits}\n")
    print(
        common.markdown_table(
            ["impl", "initialize"],
            [[impl, common.cell(s, "{:.1f}")] for impl, s in data["init_ms"].items()],
        )
    )
    print("\n" + common.machine_line(data))
    path, _ = common.write_results("metadata_bench", data)
    print(f"JSON: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
