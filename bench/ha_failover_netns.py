"""Failover times of master HA across hosts (network namespaces), several runs per fault.

Builds the deployment of ``tests/ha/test_multihost.py``
(:class:`pymooncake.testing._ha_netns.HaDeployment`: etcd x3, two
``mooncake_master --enable_ha=true``, two ``mooncake_client`` storage nodes,
each on its own namespace host; the client load in this process) once, then
injects each fault ``--runs`` times under a checksummed put/get load:

* ``leader`` -- fault -> another master serves (polled on its admin port);
* ``client gap`` -- the longest time without an acknowledged put, from the
  last one before the fault;
* ``fenced`` -- (etcd_cut) fault -> the old leader stops serving.

Every run also checks that no acknowledged object was lost or read corrupt and
that no storage node was expired; a run that fails these counts in the table.

    sudo .venv/bin/python bench/ha_failover_netns.py              # 5 runs per fault, TTL 2 s
    sudo .venv/bin/python bench/ha_failover_netns.py --runs 10 --scenarios sigkill,sigstop

Needs root, iproute2 and Debian's etcd-server.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

from pymooncake.testing import NetnsNetwork, find_tool, netns_unavailable_reason
from pymooncake.testing._ha_netns import (
    HOSTS,
    SCENARIOS,
    ChecksumLoad,
    HaDeployment,
    run_scenario,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="runs per scenario (default 5)")
    ap.add_argument("--ttl", type=int, default=2, help="--ha_lease_ttl_sec of the masters")
    ap.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from {', '.join(SCENARIOS)}",
    )
    args = ap.parse_args()
    scenarios = c.parse_list(args.scenarios, list(SCENARIOS))
    reason = netns_unavailable_reason()
    if reason is not None:
        print(f"ha_failover_netns needs network namespaces: {reason}", file=sys.stderr)
        return 2
    if find_tool("etcd") is None:
        print("ha_failover_netns needs etcd (apt-get install etcd-server)", file=sys.stderr)
        return 2
    data: dict[str, Any] = {
        "bench": "ha_failover_netns",
        "lease_ttl_s": args.ttl,
        "runs": [],
        "machine": c.machine_info(),
    }
    started = time.monotonic()
    try:
        with NetnsNetwork(HOSTS) as net:
            net.wait_reachable()
            with HaDeployment(net, lease_ttl_s=args.ttl) as dep:
                client = dep.client()
                for scenario in scenarios:
                    for i in range(args.runs):
                        c.progress(f"{scenario} run {i + 1}/{args.runs}")
                        load = ChecksumLoad(client, prefix=f"{scenario}-{i}")
                        row = run_scenario(dep, scenario, load).row()
                        c.progress(f"{scenario} run {i + 1}: {row}")
                        data["runs"].append(row)
                        # checked: free the space, so that later runs never fill the
                        # pool (an eviction would count as a loss)
                        client.remove_by_regex(f"^{re.escape(load.prefix)}", force=True)
    except KeyboardInterrupt:
        data["interrupted"] = True
    data["machine"]["loadavg_end"] = os.getloadavg()
    data["wall_s"] = time.monotonic() - started
    rows = []
    for scenario in scenarios:
        runs = [r for r in data["runs"] if r["scenario"] == scenario]
        if not runs:
            continue
        leader = c.summary([r["leader_s"] for r in runs if r["leader_s"] is not None])
        gap = c.summary([r["client_gap_s"] for r in runs])
        fenced = c.summary([r["fenced_s"] for r in runs if r["fenced_s"] is not None])
        over = sum(1 for r in runs if r["leader_s"] is not None and r["leader_s"] > 2 * args.ttl)
        rows.append(
            [
                scenario,
                str(len(runs)),
                c.cell(leader),
                f"{over}/{len(runs)}" if leader else "-",
                c.cell(gap),
                c.cell(fenced),
                str(sum(r["lost"] for r in runs)),
                str(sum(r["corrupt"] for r in runs)),
                str(sum(r["expired"] for r in runs)),
                str(sum(r["acked"] for r in runs)),
            ]
        )
        data.setdefault("summary", {})[scenario] = {"leader_s": leader, "client_gap_s": gap}
    text = (
        f"### Master HA failover across namespace hosts (lease TTL {args.ttl} s; seconds, "
        "median (min-max))\n\n"
    )
    text += c.markdown_table(
        [
            "fault",
            "runs",
            "new leader serving",
            f"> {2 * args.ttl} s",
            "client gap",
            "old leader fenced",
            "lost",
            "corrupt",
            "expired",
            "acked puts",
        ],
        rows,
    )
    text += "\n" + c.machine_line(data)
    c.publish("ha_failover_netns", data, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
