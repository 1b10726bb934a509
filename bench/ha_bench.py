"""Put/get latency with master HA on (leader + one standby in sync) vs off.

Both masters run as ``mooncake_master`` processes on 127.0.0.1 (the HA pair
elects through a real etcd, Debian's ``etcd``); one store client per variant
lives in this process, contributes its own segment and puts/gets 4 KiB, 64 KiB
and 1 MiB values.  Rounds alternate between the variants so that drift hits
both.  The HA put pays the commit barrier: one leader->standby round trip
before PutStart's and PutEnd's replies.  Goal (issue 9): HA put p50 within
1.25x of HA off.

    .venv/bin/python bench/ha_bench.py            # 3 rounds x 400 ops per size
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
            global_segment_size=512 * MiB,
            local_buffer_size=32 * MiB,
            cluster_id=cluster_id,
        )
    )


def _round(client: StoreClient, tag: str, size: int, n: int) -> dict[str, list[float]]:
    value = os.urandom(size)
    put: list[float] = []
    get: list[float] = []
    keys = [f"{tag}-{size}-{time.monotonic_ns()}-{i}" for i in range(n)]
    for k in keys:
        t = time.perf_counter()
        client.put(k, value)
        put.append((time.perf_counter() - t) * 1e6)
    for k in keys:
        t = time.perf_counter()
        client.get(k)
        get.append((time.perf_counter() - t) * 1e6)
    client.remove_many(keys, force=True)
    return {"put": put, "get": get}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ops", type=int, default=400)
    ap.add_argument("--sizes", default="4K,64K,1M")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.ops = 1, 100
    sizes = [c.parse_size(s) for s in args.sizes.split(",")]
    etcd_bin = shutil.which("etcd")
    if etcd_bin is None:
        print("ha_bench needs Debian's etcd-server (apt-get install etcd-server)", file=sys.stderr)
        return 2
    results: dict[str, dict[int, dict[str, list[float]]]] = {"off": {}, "ha": {}}
    machine = c.machine_info()
    started = time.monotonic()
    with EtcdCluster(binary=etcd_bin) as etcd, HaMasters(etcd.endpoints, 2, lease_ttl_s=5) as ha:
        single, rpc = _single_master()
        try:
            leader = ha.leader()
            clients = {"off": _client(rpc), "ha": _client(ha.client_address, ha.cluster_id)}
            ha.wait_in_sync(leader)
            try:
                for client in clients.values():  # warm up
                    _round(client, "warm", 4096, 50)
                for r in range(args.rounds):
                    for size in sizes:
                        for name in ("off", "ha") if r % 2 == 0 else ("ha", "off"):
                            c.progress(f"round {r + 1} size {c.size_label(size)} {name}")
                            got = _round(clients[name], name, size, args.ops)
                            slot = results[name].setdefault(size, {"put": [], "get": []})
                            slot["put"].append(statistics.median(got["put"]))
                            slot["get"].append(statistics.median(got["get"]))
                status = leader.status()
                confirms = clients["ha"].confirms
                status["client_confirmed_keys"] = confirms.confirmed_keys
                status["client_fallback_keys"] = confirms.fallback_keys
            finally:
                for client in clients.values():
                    client.close()
        finally:
            single.stop()
    rows = []
    machine["loadavg_end"] = os.getloadavg()
    data: dict[str, Any] = {
        "machine": machine,
        "cases": [],
        "ha_status": status,
        "wall_s": time.monotonic() - started,
    }
    for size in sizes:
        off, on = results["off"][size], results["ha"][size]
        row = {
            "size": size,
            "put_p50_off_us": statistics.median(off["put"]),
            "put_p50_ha_us": statistics.median(on["put"]),
            "get_p50_off_us": statistics.median(off["get"]),
            "get_p50_ha_us": statistics.median(on["get"]),
        }
        row["put_ratio"] = row["put_p50_ha_us"] / row["put_p50_off_us"]
        row["get_ratio"] = row["get_p50_ha_us"] / row["get_p50_off_us"]
        data["cases"].append(row)
        rows.append(
            [
                c.size_label(size),
                f"{row['put_p50_off_us']:.0f}",
                f"{row['put_p50_ha_us']:.0f}",
                f"{row['put_ratio']:.2f}",
                c.check(row["put_ratio"] <= 1.25),
                f"{row['get_p50_off_us']:.0f}",
                f"{row['get_p50_ha_us']:.0f}",
                f"{row['get_ratio']:.2f}",
            ]
        )
    text = "### Store latency with master HA (leader + 1 standby in sync) vs without (us, median of round medians)\n\n"
    text += c.markdown_table(
        ["size", "put off", "put HA", "HA/off", "<=1.25x", "get off", "get HA", "HA/off"], rows
    )
    text += f"\n{args.rounds} round(s) x {args.ops} ops per size and variant\n" + c.machine_line(
        data
    )
    c.publish("ha_bench", data, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
