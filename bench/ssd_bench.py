"""SSD-tier read throughput vs the disk's own sequential read, in the same run.

Starts ``mooncake_master --enable_offload --offload_on_evict`` and one storage
node (``mooncake_client --enable_offload``, a small memory segment, its SSD tier
in a directory on the disk under test), then from this process (a client with
no segment of its own):

1. puts ``--objects`` values of ``--size`` bytes: memory overflows, so most of
   them are offloaded to the node's SSD tier (LOCAL_DISK-only replicas);
2. per run, evicts the tier's files from the page cache
   (``posix_fadvise(DONTNEED)``: cold reads, no root needed) and reads every
   disk-only object with ``get_many_into`` (batches of ``--batch``) into one
   preallocated buffer: the node reads each file with ``O_DIRECT`` and streams it
   over its read port;
3. per run, measures the disk with ``dd if=<file of the same total size>
   of=/dev/null bs=1M iflag=direct`` (and buffered after DONTNEED).

Prints a markdown table (median over runs) and writes
``bench/results/ssd_bench-<timestamp>.json`` + ``ssd_bench-latest.json``.
The goal is >= 70 % of ``dd iflag=direct`` for 1 MiB objects.

Usage::

    python bench/ssd_bench.py                 # 384 x 1 MiB, 3 runs (~1 min)
    python bench/ssd_bench.py --quick         # 128 x 1 MiB, 1 run
    python bench/ssd_bench.py --dir /mnt/nvme/bench
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import _common as C

from pymooncake.errors import NoAvailableHandle
from pymooncake.store import StoreClient, StoreClientConfig
from pymooncake.testing._cluster import ProcessCluster


def drop_cache(root: Path) -> int:
    """Evict ``root``'s files from the page cache; returns how many."""
    n = 0
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            n += 1
    return n


def dd_read(path: Path, direct: bool) -> float:
    """Bytes per second of ``dd`` reading ``path`` sequentially (1 MiB blocks)."""
    if not direct:
        drop_cache(path.parent)
    args = ["dd", f"if={path}", "of=/dev/null", "bs=1M"] + (["iflag=direct"] if direct else [])
    proc = subprocess.run(args, capture_output=True, text=True, check=True)
    m = re.search(r"^(\d+) bytes .* copied, ([\d.]+) s", proc.stderr, re.M)
    if m is None:
        raise RuntimeError(f"cannot parse dd output: {proc.stderr!r}")
    return int(m.group(1)) / float(m.group(2))


def make_file(path: Path, nbytes: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            left -= f.write(chunk[: min(left, len(chunk))])
        f.flush()
        os.fsync(f.fileno())


def value(i: int, size: int) -> bytes:
    seed = i.to_bytes(8, "little")
    block = (seed * 8192)[:65536]
    return (block * (size // len(block) + 1))[:size]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objects", type=int, default=384)
    ap.add_argument("--size", type=int, default=C.MiB)
    ap.add_argument("--segment", default="64 MB", help="memory of the storage node")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="", help="directory on the disk under test")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.objects, args.runs = 128, 1
    base = (
        Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ssd-bench-", dir="/var/tmp"))
    )
    tier = base / "tier"
    tier.mkdir(parents=True, exist_ok=True)
    env = {
        "MOONCAKE_OFFLOAD_HEARTBEAT_INTERVAL_SECONDS": "0.05",
        "MOONCAKE_OFFLOAD_FILE_STORAGE_PATH": str(tier),
    }
    flags = ["--enable_offload=true", "--offload_on_evict=true"]
    results: dict[str, Any] = {"machine": C.machine_info(), "args": vars(args), "runs": []}
    try:
        with ProcessCluster(flags, env=env) as pc:
            pc.node(args.segment, flags=["--enable_offload=true"])
            client = StoreClient(
                StoreClientConfig(
                    local_hostname=C.HOST,
                    metadata_server=pc.metadata_url,
                    master_server_addr=pc.master_address,
                    global_segment_size=0,
                    local_buffer_size=64 * C.MiB,
                    rpc_timeout_s=60.0,
                )
            )
            try:
                t0 = time.perf_counter()
                keys = [f"ssd-bench-{i}" for i in range(args.objects)]
                for i, key in enumerate(keys):
                    deadline = time.monotonic() + 60
                    while True:
                        try:
                            client.put(key, value(i, args.size))
                            break
                        except NoAvailableHandle:
                            if time.monotonic() > deadline:
                                raise
                            time.sleep(0.02)
                fill_s = time.perf_counter() - t0
                reps = client.replicas_many(keys)
                disk = [
                    k
                    for k, r in zip(keys, reps, strict=True)
                    if isinstance(r, list) and all(x.on_disk for x in r)
                ]
                print(
                    f"filled {len(keys)} x {args.size} B in {fill_s:.1f} s; "
                    f"{len(disk)} are on the SSD tier only",
                    flush=True,
                )
                nbytes = len(disk) * args.size
                dd_file = base / "dd.bin"
                make_file(dd_file, nbytes)
                buf = bytearray(args.batch * args.size)
                view = memoryview(buf)
                expected = {k: zlib.crc32(value(keys.index(k), args.size)) for k in disk[:32]}
                for run in range(args.runs):
                    direct = dd_read(dd_file, True)
                    buffered = dd_read(dd_file, False)
                    drop_cache(tier)
                    start = time.perf_counter()
                    for j in range(0, len(disk), args.batch):
                        batch = disk[j : j + args.batch]
                        dests = [
                            [view[n * args.size : (n + 1) * args.size]] for n in range(len(batch))
                        ]
                        out = client.get_many_into(batch, dests)
                        bad = [r for r in out if not isinstance(r, int)]
                        if bad:
                            raise RuntimeError(f"read failed: {bad[0]}")
                        if run == 0:
                            for n, k in enumerate(batch):
                                if k in expected and zlib.crc32(dests[n][0]) != expected[k]:
                                    raise RuntimeError(f"{k}: wrong bytes from the SSD tier")
                    tier_s = time.perf_counter() - start
                    row = {
                        "dd_direct_Bps": direct,
                        "dd_buffered_cold_Bps": buffered,
                        "tier_Bps": nbytes / tier_s,
                        "objects": len(disk),
                        "bytes": nbytes,
                    }
                    row["ratio_vs_direct"] = row["tier_Bps"] / direct
                    results["runs"].append(row)
                    print(
                        f"run {run + 1}: dd direct {direct / 1e6:.0f} MB/s, dd buffered cold "
                        f"{buffered / 1e6:.0f} MB/s, SSD tier {row['tier_Bps'] / 1e6:.0f} MB/s "
                        f"({row['ratio_vs_direct']:.0%})",
                        flush=True,
                    )
            finally:
                client.close()
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    runs = results["runs"]
    med = {
        k: statistics.median(r[k] for r in runs)
        for k in ("dd_direct_Bps", "dd_buffered_cold_Bps", "tier_Bps")
    }
    ratio = med["tier_Bps"] / med["dd_direct_Bps"]
    results["median"] = {**med, "ratio_vs_direct": ratio}
    print()
    print(
        C.markdown_table(
            [
                "object size",
                "objects",
                "dd iflag=direct",
                "dd buffered (cold)",
                "SSD tier get",
                "tier / dd direct",
            ],
            [
                [
                    f"{args.size // 1024} KiB",
                    str(runs[0]["objects"]),
                    f"{med['dd_direct_Bps'] / 1e6:.0f} MB/s",
                    f"{med['dd_buffered_cold_Bps'] / 1e6:.0f} MB/s",
                    f"{med['tier_Bps'] / 1e6:.0f} MB/s",
                    f"{ratio:.0%}",
                ]
            ],
        )
    )
    paths = C.write_results("ssd_bench", results)
    print(f"\nwrote {paths[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
