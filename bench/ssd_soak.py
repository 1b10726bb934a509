"""A bounded soak of the SSD tier: every read checked while objects move between memory and disk.

One in-process cluster (``LocalCluster``) per run: a master with ``--offload_on_evict`` and
``--promotion_on_hit``, an owner client whose small segment keeps eviction busy and whose
SSD tier takes what eviction picks, and reader clients.  For ``--seconds`` a writer
upserts, removes and puts (checksummed values, ``soak.py``'s header) while
the readers and the owner read random keys and check each value: its own key's header,
length and CRC (``soak.check_value``).  Values are all ``--value-kib`` (KV-cache blocks are
one size), large against the segment, so eviction runs all the time.  Objects are offloaded, evicted, read from disk,
promoted back into memory, replaced and removed under the readers all along.

What it reports (table on stdout, JSON under ``bench/results/ssd_soak-*.json``): reads,
those answered, how many the SSD tier served, offloads and promotions, errors by kind,
and **corrupt reads** (another key's value, a wrong length or CRC): must be 0; the exit
status is 1 otherwise.  Before the fix of the SSD tier's pins (a reader's lease taken
during a pin was lost when the pin ended; ``_offload.py``, "pins") this soak read another
key's value in 2 of 6 runs of 20 s on this project's 2-vCPU VMs; after it, 0 in 6.

Usage::

    python bench/ssd_soak.py                  # 3 runs of 20 s
    python bench/ssd_soak.py --runs 5 --seconds 30
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

import _common as C
from soak import HEADER, check_value, pack_value

KiB = 1 << 10
MiB = 1 << 20


def make_value(key: str, rng: random.Random, nbytes: int) -> bytes:
    """A checksummed value (``soak.py``'s header) of ``nbytes``: one size for all, as
    KV-cache blocks are (a freed range is then exactly what the next write takes)."""
    return pack_value(key, rng.randbytes(nbytes - HEADER.size))


def run_once(run: int, a: argparse.Namespace) -> dict[str, Any]:
    """One cluster, one soak; the counts of what happened."""
    from pymooncake.errors import NoAvailableHandle, ObjectNotFound, StoreError
    from pymooncake.store._config import MasterConfig
    from pymooncake.testing import LocalCluster

    tmp = tempfile.mkdtemp(prefix="ssd_soak-")
    cfg = MasterConfig(
        default_kv_lease_ttl_ms=200,
        client_ttl_s=5.0,
        enable_offload=True,
        offload_on_evict=True,
        promotion_on_hit=True,
        promotion_admission_threshold=2,
    )
    counts: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    corrupt: list[dict[str, Any]] = []
    lock = threading.Lock()
    keys = [f"ssd-soak-{run}-{i}" for i in range(a.keys)]
    try:
        with LocalCluster(cfg) as c:
            owner = c.client(a.segment_mib * MiB, enable_ssd_offload=True, ssd_offload_path=tmp)
            readers = [c.client(0) for _ in range(a.readers)] + [owner]
            rng = random.Random(run)
            for k in keys:
                for _ in range(400):  # memory full of objects still being offloaded: wait
                    try:
                        owner.put(k, make_value(k, rng, a.value_kib * KiB))
                        break
                    except NoAvailableHandle:
                        time.sleep(0.02)
            stop = time.monotonic() + a.seconds

            def read_loop(client: Any, seed: int) -> None:
                pick = random.Random(seed)
                while time.monotonic() < stop:
                    key = pick.choice(keys)
                    try:
                        got = client.get(key)
                    except ObjectNotFound:
                        with lock:
                            counts["reads"] += 1
                            counts["not found"] += 1
                        continue
                    except StoreError as exc:
                        with lock:
                            counts["reads"] += 1
                            errors[f"get: {type(exc).__name__}"] += 1
                        continue
                    wrong = check_value(key, got)
                    with lock:
                        counts["reads"] += 1
                        counts["values"] += 1
                        if wrong:
                            corrupt.append({"key": key, "what": wrong, "bytes": len(got)})

            def write_loop(seed: int) -> None:
                pick = random.Random(seed)
                while time.monotonic() < stop:
                    key = pick.choice(keys)
                    op = pick.random()
                    try:
                        if op < 0.2:
                            owner.remove(key)  # (no force: a force removal ignores readers)
                            name = "remove"
                        elif op < 0.5:
                            owner.upsert(key, make_value(key, pick, a.value_kib * KiB))
                            name = "upsert"
                        elif owner.put(key, make_value(key, pick, a.value_kib * KiB)):
                            name = "put"
                        else:
                            name = "put of a stored key"
                        with lock:
                            counts[name] += 1
                    except StoreError as exc:
                        with lock:
                            errors[f"write: {type(exc).__name__}"] += 1
                    time.sleep(0.005)

            threads = [
                threading.Thread(target=read_loop, args=(r, run * 100 + i), daemon=True)
                for i, r in enumerate(readers)
            ]
            threads.append(threading.Thread(target=write_loop, args=(run * 100 + 99,), daemon=True))
            for t in threads:
                t.start()
            for t in threads:
                t.join(a.seconds + 60)
            state = c.master.service.state
            off = state.offload.metrics
            counts["offloaded"] = off.offloaded
            counts["promoted"] = off.promotion_started
            counts["disk reads"] = off.disk_reads
            counts["evicted"] = state.metrics.evicted_keys
            state.validate()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "run": run,
        "counts": dict(counts),
        "errors": dict(errors),
        "corrupt": corrupt,
    }


def render(data: dict[str, Any]) -> str:
    cfg = data["config"]
    lines = [
        f"### SSD-tier soak: {cfg['runs']} run(s) of {cfg['seconds']:g} s, {cfg['keys']} keys "
        f"of {cfg['value_kib']} KiB, a {cfg['segment_mib']} MiB segment, "
        f"{cfg['readers']} reader client(s) + the owner, {cfg['competitors']} CPU-bound "
        "competitor(s)",
        "",
        "| run | reads | values checked | not found | disk reads | offloaded | promoted "
        "| evicted | puts / upserts / removes | corrupt reads | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["runs"]:
        n = r["counts"]
        errs = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items(), key=lambda x: -x[1]))
        lines.append(
            f"| {r['run']} | {n.get('reads', 0)} | {n.get('values', 0)} | "
            f"{n.get('not found', 0)} | {n.get('disk reads', 0)} | {n.get('offloaded', 0)} | "
            f"{n.get('promoted', 0)} | {n.get('evicted', 0)} | {n.get('put', 0)} / "
            f"{n.get('upsert', 0)} / {n.get('remove', 0)} | **{len(r['corrupt'])}** | "
            f"{errs or '-'} |"
        )
    total = sum(len(r["corrupt"]) for r in data["runs"])
    lines += ["", f"Corrupt reads in all: **{total}** (must be 0)."]
    for r in data["runs"]:
        for bad in r["corrupt"][:5]:
            lines.append(f"- run {r['run']}: {bad['key']!r}: {bad['what']} ({bad['bytes']} bytes)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--keys", type=int, default=24)
    p.add_argument("--value-kib", type=int, default=256)
    p.add_argument("--segment-mib", type=int, default=4)
    p.add_argument("--readers", type=int, default=2)
    p.add_argument(
        "--competitors",
        type=int,
        default=2,
        help="CPU-bound processes beside the soak (a busy host widens the races it looks for)",
    )
    a = p.parse_args(argv)
    # the owner's SSD heartbeat: often enough that offloads and promotions keep coming
    os.environ.setdefault("MOONCAKE_OFFLOAD_HEARTBEAT_INTERVAL_SECONDS", "0.05")
    import pymooncake

    data: dict[str, Any] = {
        "bench": "ssd_soak",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": C.machine_info(),
        "impl": C.impl_version("py", sys.executable),
        # (the tree measured: PYTHONPATH may point at another checkout than the git above)
        "source": os.path.dirname(pymooncake.__file__),
        "config": {k: v for k, v in vars(a).items()},
        "runs": [],
    }
    t0 = time.monotonic()
    try:
        with C.sigterm_as_interrupt(), C.competitors(a.competitors):
            for run in range(a.runs):
                C.progress(f"run {run + 1}/{a.runs}")
                data["runs"].append(run_once(run, a))
    except KeyboardInterrupt:
        C.log("interrupted; writing what was measured")
        data["interrupted"] = True
    data["wall_s"] = time.monotonic() - t0
    C.publish("ssd_soak", data, render(data))
    bad = any(r["corrupt"] for r in data["runs"])
    return 130 if data.get("interrupted") else (1 if bad else 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
