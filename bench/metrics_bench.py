"""What client and engine metrics cost: store put/get with metrics on and off.

One process: a master and a storage node (``LocalCluster``), and two pure
clients, one with ``ClientMetricsSettings(enabled=False)`` (no client metrics,
and its engine records none) and one with the defaults (client metrics and the
engine's ``tent_*``).
Rounds alternate between the two clients; each round times ``--ops`` calls
of put, get and put_from/get_into of ``--size`` bytes (2proc-like: the values
live in the storage node's segment, reached over TCP with
``PYMOONCAKE_SAME_HOST=0``, or through shared memory by default).  Prints the
median microseconds per call of each client and the difference, and the cost
of the recording primitives alone; writes ``bench/results/metrics_bench-*.json``.

Usage::

    python bench/metrics_bench.py                 # 7 rounds x 2000 ops, 4 KiB
    python bench/metrics_bench.py --rounds 3 --ops 500 --size 64K
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import timeit
from typing import Any

import _common as C

from pymooncake.store import StoreClient
from pymooncake.store._metrics import ClientMetrics, ClientMetricsSettings
from pymooncake.testing import LocalCluster

OPS = ("put", "get", "get_into")


def _round(client: StoreClient, ops: int, value: bytes, tag: str) -> dict[str, float]:
    keys = [f"{tag}-{i}" for i in range(ops)]
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    for k in keys:
        client.put(k, value)
    out["put"] = (time.perf_counter() - t0) / ops * 1e6
    t0 = time.perf_counter()
    for k in keys:
        client.get(k)
    out["get"] = (time.perf_counter() - t0) / ops * 1e6
    buf = bytearray(len(value))
    t0 = time.perf_counter()
    for k in keys:
        client.get_into(k, buf)
    out["get_into"] = (time.perf_counter() - t0) / ops * 1e6
    client.remove_many(keys, force=True)
    return out


def _primitives() -> dict[str, float]:
    m = ClientMetrics()
    n = 200_000
    cases = {
        "counter.inc": lambda: m.read_bytes.inc(4096),
        "histogram.observe": lambda: m.put_latency.observe(123),
        "transfer()": lambda: m.transfer(True, 4096, 80, False),
        "operation()": lambda: m.operation(True, "put", 4096, 80),
        "rpc count+latency": lambda: (m.rpc("PutStart")[0].inc(), m.rpc("PutStart")[1].observe(30)),
        "empty call": lambda: None,
    }
    return {
        name: min(timeit.repeat(fn, number=n, repeat=3)) / n * 1e9 for name, fn in cases.items()
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--ops", type=int, default=2000)
    p.add_argument("--size", default="4K")
    a = p.parse_args(argv)
    logging.getLogger("pymooncake").setLevel(logging.ERROR)  # the loopback notice
    size = C.parse_size(a.size)
    value = bytes(range(256)) * (size // 256) + bytes(size % 256)
    results: dict[str, dict[str, list[float]]] = {
        "off": {op: [] for op in OPS},
        "on": {op: [] for op in OPS},
    }
    t_start = time.monotonic()
    machine = C.machine_info()
    with LocalCluster() as cluster:
        cluster.client(256 << 20)  # the storage node holding the values
        clients = {
            "off": cluster.client(0, metrics=ClientMetricsSettings(enabled=False)),
            "on": cluster.client(0),
        }
        for name, client in clients.items():  # warm-up: connections, pools
            _round(client, min(200, a.ops), value, f"warm-{name}")
        for r in range(a.rounds):
            for name in ("off", "on") if r % 2 == 0 else ("on", "off"):
                res = _round(clients[name], a.ops, value, f"r{r}-{name}")
                for op in OPS:
                    results[name][op].append(res[op])
                C.progress(
                    f"round {r + 1}/{a.rounds} metrics {name}: "
                    + ", ".join(f"{op} {res[op]:.1f} us" for op in OPS)
                )
    medians = {n: {op: statistics.median(v) for op, v in ops.items()} for n, ops in results.items()}
    best = {n: {op: min(v) for op, v in ops.items()} for n, ops in results.items()}
    rows = []
    for op in OPS:
        cells = [op]
        for stat in (medians, best):
            off, on = stat["off"][op], stat["on"][op]
            cells += [f"{off:.1f}", f"{on:.1f}", f"{(on - off) / off * 100:+.1f} %"]
        rows.append(cells)
    prims = _primitives()
    text = (
        f"### Store calls with client metrics off / on ({C.size_label(size)} values, "
        f"{a.rounds} rounds x {a.ops} calls, us per call: median and best round)\n\n"
        + C.markdown_table(
            ["op", "off (median)", "on (median)", "diff", "off (best)", "on (best)", "diff"], rows
        )
        + "\n\n### Recording primitives (ns per call, best of 3)\n\n"
        + C.markdown_table(["primitive", "ns"], [[k, f"{v:.0f}"] for k, v in prims.items()])
    )
    data: dict[str, Any] = {
        "args": vars(a),
        "rounds": results,
        "medians_us": medians,
        "best_us": best,
        "primitives_ns": prims,
        "machine": {**machine, "loadavg_end": os.getloadavg()},
        "wall_s": time.monotonic() - t_start,
    }
    C.publish("metrics_bench", data, text + "\n\n" + C.machine_line(data))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
