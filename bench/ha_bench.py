"""Put/get latency with master HA on (leader + one standby in sync) vs off.

Both masters run as ``mooncake_master`` processes on 127.0.0.1 (the HA pair
elects through a real etcd, Debian's ``etcd``); one store client per variant
lives in this process, contributes its own segment and puts/gets 4 KiB, 64 KiB
and 1 MiB values.  Rounds alternate between the variants so that drift hits
both.  These puts go through buffers reserved ahead: with HA the reservation
waits for a standby, each commit is confirmed to the standby without waiting
(docs/design.md, "Lazy confirmations").  The "full pool" rows (``--full``)
first fill each client's segment 1.25 times over and then only put, so that
eviction makes the room of every put, as in a cache's steady state.  Goal
(issue 9): HA put p50 within
1.25x of HA off.  On a shared 2-vCPU host both variants swing between two
modes from one set-up of the processes to the next: ``--runs`` repeats the
whole set-up and reports the median ratio.

    .venv/bin/python bench/ha_bench.py            # 3 rounds x 400 ops per size
    .venv/bin/python bench/ha_bench.py --runs 5   # five set-ups: median ratios
    .venv/bin/python bench/ha_bench.py --quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

from pymooncake.store import StoreClient, StoreClientConfig
from pymooncake.testing._cluster import _spawn
from pymooncake.testing._etcd_server import EtcdCluster
from pymooncake.testing._ha import HaMasters

MiB = 1 << 20
#: each client's segment (the "full pool" rows first fill it 1.25 times over)
SEGMENT = 512 * MiB


def _single_master() -> tuple[Any, str]:
    node = _spawn(
        "mooncake_master",
        [
            "-m",
            "pymooncake.cli.master",
            "--rpc_address=127.0.0.1",
            "--port=0",
            "--metrics_host=127.0.0.1",
            "--metrics_port=0",
            "--enable_metric_reporting=false",
        ],
        {"MC_TCP_BIND_ADDRESS": "127.0.0.1"},
    )
    rpc = node.wait_for(r"Master service started on (\S+)").group(1)
    return node, rpc


def _client(address: str, cluster_id: str = "mooncake_cluster") -> StoreClient:
    return StoreClient(
        StoreClientConfig(
            local_hostname="127.0.0.1",
            metadata_server="P2PHANDSHAKE",
            master_server_addr=address,
            global_segment_size=SEGMENT,
            local_buffer_size=32 * MiB,
            cluster_id=cluster_id,
        )
    )


def _keys(tag: str, size: int, n: int) -> list[str]:
    return [f"{tag}-{size}-{time.monotonic_ns()}-{i}" for i in range(n)]


def _timed_puts(client: StoreClient, keys: list[str], value: bytes) -> list[float]:
    """Put ``value`` under each key; the time of each put (us)."""
    out: list[float] = []
    for k in keys:
        t = time.perf_counter()
        client.put(k, value)
        out.append((time.perf_counter() - t) * 1e6)
    return out


def _p90(values: list[float]) -> float:
    return c.percentile(sorted(values), 90)


def _round(client: StoreClient, tag: str, size: int, n: int) -> dict[str, list[float]]:
    keys = _keys(tag, size, n)
    put = _timed_puts(client, keys, os.urandom(size))
    get: list[float] = []
    for k in keys:
        t = time.perf_counter()
        client.get(k)
        get.append((time.perf_counter() - t) * 1e6)
    client.remove_many(keys, force=True)
    return {"put": put, "get": get}


def _fill(client: StoreClient, tag: str) -> None:
    """Fill ``client``'s segment 1.25 times over with 1 MiB values: from here on
    every put finds the pool full (a cache's steady state) and eviction makes room."""
    value = os.urandom(MiB)
    for i in range(SEGMENT * 5 // 4 // MiB):
        client.put(f"{tag}-fill-{i}", value)


def _put_round(client: StoreClient, tag: str, size: int, n: int) -> list[float]:
    """``n`` timed puts into a full pool (kept: eviction frees the oldest)."""
    return _timed_puts(client, _keys(tag, size, n), os.urandom(size))


def _one_run(
    etcd_bin: str, sizes: list[int], full: list[int], rounds: int, ops: int, run: int
) -> tuple[dict[str, dict[int, dict[str, list[float]]]], dict[str, Any]]:
    """One set-up of every process (etcd, the HA pair, the single master, the two
    clients), ``rounds`` alternated rounds per size: the per-round medians of each
    variant, and the leader's HA status.  Then, for the ``full`` sizes, the same
    into full pools (puts only; under the key ``-size``)."""
    results: dict[str, dict[int, dict[str, list[float]]]] = {"off": {}, "ha": {}}
    with EtcdCluster(binary=etcd_bin) as etcd, HaMasters(etcd.endpoints, 2, lease_ttl_s=5) as ha:
        single, rpc = _single_master()
        try:
            leader = ha.leader()
            clients = {"off": _client(rpc), "ha": _client(ha.client_address, ha.cluster_id)}
            ha.wait_in_sync(leader)
            try:
                for client in clients.values():  # warm up
                    _round(client, "warm", 4096, 50)
                for r in range(rounds):
                    for size in sizes:
                        for name in ("off", "ha") if r % 2 == 0 else ("ha", "off"):
                            c.progress(
                                f"run {run + 1} round {r + 1} size {c.size_label(size)} {name}"
                            )
                            got = _round(clients[name], name, size, ops)
                            slot = results[name].setdefault(
                                size, {"put": [], "put90": [], "get": []}
                            )
                            slot["put"].append(statistics.median(got["put"]))
                            slot["put90"].append(_p90(got["put"]))
                            slot["get"].append(statistics.median(got["get"]))
                if full:
                    for name, client in clients.items():
                        c.progress(f"run {run + 1}: filling the {name} pool")
                        _fill(client, name)
                for r in range(rounds if full else 0):
                    for size in full:
                        for name in ("off", "ha") if r % 2 == 0 else ("ha", "off"):
                            c.progress(
                                f"run {run + 1} round {r + 1} full pool {c.size_label(size)} {name}"
                            )
                            put = _put_round(clients[name], name, size, ops)
                            slot = results[name].setdefault(-size, {"put": [], "put90": []})
                            slot["put"].append(statistics.median(put))
                            slot["put90"].append(_p90(put))
                status = leader.status()
                confirms = clients["ha"].confirms
                status["client_confirmed_keys"] = confirms.confirmed_keys
                status["client_fallback_keys"] = confirms.fallback_keys
            finally:
                for client in clients.values():
                    client.close()
        finally:
            single.stop()
    return results, status


def _range(values: list[float], fmt: str = "{:.2f}") -> str:
    """``median (min-max)``, or the value alone for one run."""
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ops", type=int, default=400)
    ap.add_argument("--sizes", default="4K,64K,1M")
    ap.add_argument(
        "--full",
        default="4K,1M",
        help="value sizes also put into full pools (eviction making room; '' for none)",
    )
    ap.add_argument(
        "--runs",
        type=int,
        default=1,
        help="set everything up this many times (on a shared 2-vCPU host both variants "
        "swing between two modes from one set-up to the next: quote the median ratio)",
    )
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.ops = 1, 100
    sizes = [c.parse_size(s) for s in args.sizes.split(",")]
    full = [c.parse_size(s) for s in args.full.split(",") if s.strip()]
    etcd_bin = shutil.which("etcd")
    if etcd_bin is None:
        print("ha_bench needs Debian's etcd-server (apt-get install etcd-server)", file=sys.stderr)
        return 2
    machine = c.machine_info()
    started = time.monotonic()
    runs = []
    for run in range(args.runs):
        results, status = _one_run(etcd_bin, sizes, full, args.rounds, args.ops, run)
        cases = []
        for size in sizes:
            off, on = results["off"][size], results["ha"][size]
            row: dict[str, Any] = {
                "size": size,
                "put_p50_off_us": statistics.median(off["put"]),
                "put_p50_ha_us": statistics.median(on["put"]),
                "put_p90_off_us": statistics.median(off["put90"]),
                "put_p90_ha_us": statistics.median(on["put90"]),
                "get_p50_off_us": statistics.median(off["get"]),
                "get_p50_ha_us": statistics.median(on["get"]),
            }
            row["put_ratio"] = row["put_p50_ha_us"] / row["put_p50_off_us"]
            row["get_ratio"] = row["get_p50_ha_us"] / row["get_p50_off_us"]
            cases.append(row)
        full_cases = []
        for size in full:
            off, on = results["off"][-size], results["ha"][-size]
            row = {
                "size": size,
                "put_p50_off_us": statistics.median(off["put"]),
                "put_p50_ha_us": statistics.median(on["put"]),
                "put_p90_off_us": statistics.median(off["put90"]),
                "put_p90_ha_us": statistics.median(on["put90"]),
            }
            row["put_ratio"] = row["put_p50_ha_us"] / row["put_p50_off_us"]
            full_cases.append(row)
        runs.append({"cases": cases, "full_cases": full_cases, "ha_status": status})
    machine["loadavg_end"] = os.getloadavg()
    data: dict[str, Any] = {
        "machine": machine,
        "runs": runs,
        # the last run's, as before --runs existed
        "cases": runs[-1]["cases"],
        "ha_status": runs[-1]["ha_status"],
        "wall_s": time.monotonic() - started,
    }
    rows = []
    for i, size in enumerate(sizes):
        per_run = [r["cases"][i] for r in runs]

        def col(key: str, fmt: str, rows_: list[dict[str, Any]] = per_run) -> str:
            return _range([x[key] for x in rows_], fmt)

        put_ratio = statistics.median(x["put_ratio"] for x in per_run)
        rows.append(
            [
                c.size_label(size),
                col("put_p50_off_us", "{:.0f}"),
                col("put_p50_ha_us", "{:.0f}"),
                col("put_ratio", "{:.2f}"),
                c.check(put_ratio <= 1.25),
                col("put_p90_off_us", "{:.0f}"),
                col("put_p90_ha_us", "{:.0f}"),
                col("get_p50_off_us", "{:.0f}"),
                col("get_p50_ha_us", "{:.0f}"),
                col("get_ratio", "{:.2f}"),
            ]
        )
    for i, size in enumerate(full):
        per_full = [r["full_cases"][i] for r in runs]
        put_ratio = statistics.median(x["put_ratio"] for x in per_full)
        rows.append(
            [
                f"{c.size_label(size)}, full pool",
                _range([x["put_p50_off_us"] for x in per_full], "{:.0f}"),
                _range([x["put_p50_ha_us"] for x in per_full], "{:.0f}"),
                _range([x["put_ratio"] for x in per_full]),
                c.check(put_ratio <= 1.25),
                _range([x["put_p90_off_us"] for x in per_full], "{:.0f}"),
                _range([x["put_p90_ha_us"] for x in per_full], "{:.0f}"),
                "-",
                "-",
                "-",
            ]
        )
    text = (
        "### Store latency with master HA (leader + 1 standby in sync) vs without "
        "(us, p50 unless said, median of the rounds' values; with --runs: median (min-max) "
        "over runs)\n\n"
    )
    text += c.markdown_table(
        [
            "size",
            "put off",
            "put HA",
            "HA/off",
            "<=1.25x",
            "put p90 off",
            "put p90 HA",
            "get off",
            "get HA",
            "HA/off",
        ],
        rows,
    )
    fallbacks = sum(r["ha_status"]["client_fallback_keys"] for r in runs)
    text += (
        f"\n{args.runs} run(s) x {args.rounds} round(s) x {args.ops} ops per size and variant; "
        f"puts a standby could not vouch for: {fallbacks}; full pool: each client's "
        f"{SEGMENT // MiB} MiB segment first filled 1.25 times over with 1 MiB values, "
        "then puts only (eviction makes room)\n" + c.machine_line(data)
    )
    c.publish("ha_bench", data, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
