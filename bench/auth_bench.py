"""What the cluster token costs: the same Transfer Engine and Store workloads with and without it.

Four roles in one file:

* **driver** (default): runs the worker ``--runs`` times per variant, the variants
  interleaved (open, token, token, open, ...), each worker in a fresh process pair with
  ``PYMOONCAKE_SAME_HOST=0`` (TCP loopback) and, for the ``token`` variant,
  ``PYMOONCAKE_CLUSTER_TOKEN`` set on both sides; prints the medians, their
  ratio, and writes ``bench/results/auth_bench-<timestamp>.json``.
* **worker** (``--worker``): starts a target child, then runs each case for
  ``--duration`` seconds: ``batch write`` / ``batch read`` (``engine.transfer`` of
  128 x 64 KiB per call on persistent data connections, GB/s), and ``probe``
  (one RPC round trip on a new connection per call -- the handshake is paid on
  every call here, p50 us).
* **target** (``--target``): a pymooncake engine with a 16 MiB managed buffer; prints
  ``READY <rpc port> <address>`` and serves until its stdin closes.
* **store worker** (``--store-worker``): a ``ProcessCluster`` (``mooncake_master`` with
  the token in a ``--cluster_token_file``, one ``mooncake_client`` storage node) and a
  pure store client here; 4 KiB ``put`` of a fresh key then ``get`` of it, back to
  back for ``--duration`` seconds (p50/p99 us each).  Two paths: ``samehost`` (the
  master over its UNIX socket, the bytes through shared memory) and ``tcp``
  (``PYMOONCAKE_SAME_HOST=0``: the master RPC and the bytes over TCP loopback).

Usage::

    python bench/auth_bench.py                 # 5 runs x 2 s per case and variant (~3 min)
    python bench/auth_bench.py --runs 3 --duration 1
    python bench/auth_bench.py --cases store   # only the store (te: only the engine)

The data port authenticates once per connection (pooled, so its cost vanishes in a
throughput figure); the RPC port authenticates every request (one connection per
request, as the reference's protocol has it), which the probe latency shows.  The
store client keeps its master connections pooled (authenticated once each), so a
put or get pays the token only in its first call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C

VARIANTS = ("open", "token")
BLOCK = 64 * C.KiB
BATCH = 128
TOKEN = "auth-bench-cluster-token-0123456789abcdef"
TARGET_BYTES = 16 * C.MiB


# ---------------------------------------------------------------- target role


def target_main() -> int:
    from pymooncake import EngineConfig, TransferEngine

    te = TransferEngine(C.HOST, "P2PHANDSHAKE", config=EngineConfig.from_env())
    region = te.allocate(TARGET_BYTES, populate=True)
    print(f"READY {te.rpc_port} {region.addr}", flush=True)
    sys.stdin.read()
    te.close()
    return 0


# ---------------------------------------------------------------- worker role


def worker_main(out: Path, duration: float) -> int:
    from pymooncake import EngineConfig, TransferEngine, TransferOpcode, TransferRequest

    target = C.spawn_target([sys.executable, __file__, "--target"])
    te = None
    try:
        rpc_port, remote = C.read_ready(target, 30)
        te = TransferEngine(C.HOST, "P2PHANDSHAKE", config=EngineConfig.from_env())
        seg = f"{C.HOST}:{rpc_port}"
        local = te.allocate(BLOCK * BATCH, populate=True)
        results: dict[str, Any] = {"token": bool(os.environ.get("PYMOONCAKE_CLUSTER_TOKEN"))}
        for op in ("write", "read"):
            code = TransferOpcode.WRITE if op == "write" else TransferOpcode.READ
            reqs = [
                TransferRequest(code, local.addr + i * BLOCK, remote + i * BLOCK, BLOCK)
                for i in range(BATCH)
            ]
            te.transfer(seg, reqs)  # warm-up: descriptor, connections
            calls = 0
            start = time.perf_counter()
            while time.perf_counter() - start < duration:
                te.transfer(seg, reqs)
                calls += 1
            wall = time.perf_counter() - start
            results[f"batch_{op}_gbps"] = calls * BATCH * BLOCK / wall / 1e9
        lat = []
        start = time.perf_counter()
        while time.perf_counter() - start < min(duration, 2.0):
            t = time.perf_counter()
            te.probe(seg)
            lat.append(time.perf_counter() - t)
        lat.sort()
        results["probe_p50_us"] = C.percentile(lat, 50) * 1e6
        results["probe_p99_us"] = C.percentile(lat, 99) * 1e6
        out.write_text(json.dumps(results))
        return 0
    finally:
        if te is not None:
            te.close()
        C.stop_target(target, 10)


# ---------------------------------------------------------------- store worker role

STORE_BLOCK = 4 * C.KiB
PATHS = ("samehost", "tcp")


def store_worker_main(out: Path, duration: float) -> int:
    from pymooncake.store import StoreClient, StoreClientConfig
    from pymooncake.testing import ProcessCluster

    token = os.environ.get("PYMOONCAKE_CLUSTER_TOKEN", "")
    with ProcessCluster(["--default_kv_lease_ttl=5000", "--minloglevel=2"], token=token) as cl:
        cl.node("256 MB")
        client = StoreClient(
            StoreClientConfig(C.HOST, cl.metadata_url, cl.master_address, 0, 16 * C.MiB)
        )
        try:
            value = os.urandom(STORE_BLOCK)
            for i in range(200):  # warm-up: connections, descriptors
                client.put(f"warm-{i}", value)
                client.get(f"warm-{i}")
            puts: list[float] = []
            gets: list[float] = []
            start = time.perf_counter()
            i = 0
            while time.perf_counter() - start < duration and i < 50_000:
                key = f"k-{i}"
                t = time.perf_counter()
                client.put(key, value)
                t1 = time.perf_counter()
                got = client.get(key)
                t2 = time.perf_counter()
                if got != value:
                    raise RuntimeError(f"{key} read back wrong bytes")
                puts.append(t1 - t)
                gets.append(t2 - t1)
                i += 1
            puts.sort()
            gets.sort()
            results = {
                "token": bool(token),
                "transport": client.master.last_transport,
                "ops": i,
                "put_p50_us": C.percentile(puts, 50) * 1e6,
                "put_p99_us": C.percentile(puts, 99) * 1e6,
                "get_p50_us": C.percentile(gets, 50) * 1e6,
                "get_p99_us": C.percentile(gets, 99) * 1e6,
            }
        finally:
            client.close()
    out.write_text(json.dumps(results))
    return 0


# ---------------------------------------------------------------- driver role

METRICS = (
    ("batch_write_gbps", "batch write 128 x 64 KiB", "GB/s"),
    ("batch_read_gbps", "batch read 128 x 64 KiB", "GB/s"),
    ("probe_p50_us", "RPC probe, new connection each (p50)", "us"),
)


def run_worker(variant: str, duration: float, tmp: Path, index: int) -> dict[str, Any]:
    env = C.env_for("py")
    env["PYMOONCAKE_SAME_HOST"] = "0"
    env.pop("PYMOONCAKE_CLUSTER_TOKEN", None)
    if variant == "token":
        env["PYMOONCAKE_CLUSTER_TOKEN"] = TOKEN
    out = tmp / f"{variant}-{index}.json"
    proc = subprocess.run(
        [C.py_python(), __file__, "--worker", "--out", str(out), "--duration", str(duration)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120 + 4 * duration,
    )
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{variant} worker failed (rc={proc.returncode}): {proc.stderr[-2000:]}")
    data: dict[str, Any] = json.loads(out.read_text())
    if data["token"] != (variant == "token"):
        raise RuntimeError("the worker did not see the intended token setting")
    return data


STORE_METRICS = (
    ("put_p50_us", "put 4 KiB (p50)", "us"),
    ("get_p50_us", "get 4 KiB (p50)", "us"),
    ("put_p99_us", "put 4 KiB (p99)", "us"),
    ("get_p99_us", "get 4 KiB (p99)", "us"),
)


def run_store_worker(
    variant: str, path: str, duration: float, tmp: Path, index: int
) -> dict[str, Any]:
    env = C.env_for("py")
    env["PYMOONCAKE_SAME_HOST"] = "1" if path == "samehost" else "0"
    env["MC_TCP_BIND_ADDRESS"] = C.HOST
    env.pop("PYMOONCAKE_CLUSTER_TOKEN", None)
    if variant == "token":
        env["PYMOONCAKE_CLUSTER_TOKEN"] = TOKEN
    out = tmp / f"store-{variant}-{path}-{index}.json"
    proc = subprocess.run(
        [
            C.py_python(),
            __file__,
            "--store-worker",
            "--out",
            str(out),
            "--duration",
            str(duration),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180 + 4 * duration,
    )
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(
            f"store {variant}/{path} worker failed (rc={proc.returncode}): {proc.stderr[-2000:]}"
        )
    data: dict[str, Any] = json.loads(out.read_text())
    if data["token"] != (variant == "token"):
        raise RuntimeError("the store worker did not see the intended token setting")
    expected = "unix" if path == "samehost" else "tcp"
    if data["transport"] != expected:
        raise RuntimeError(f"the store worker reached the master over {data['transport']}")
    return data


def render_store(data: dict[str, Any]) -> str:
    rows = []
    for path in PATHS:
        for key, label, unit in STORE_METRICS:
            s_open = data["store_summary"][path]["open"][key]
            s_tok = data["store_summary"][path]["token"][key]
            r = C.ratio(s_tok, s_open)
            rows.append(
                [
                    path,
                    label,
                    unit,
                    C.cell(s_open, "{:.0f}"),
                    C.cell(s_tok, "{:.0f}"),
                    "-" if r is None else f"{r:.3f}",
                ]
            )
    head = (
        "### Cluster token overhead on the store (auth_bench), one storage node process, "
        "a pure client process; samehost = master over its UNIX socket + shared memory, "
        f"tcp = PYMOONCAKE_SAME_HOST=0 - median (min-max) over {data['runs']} run(s) of "
        f"{data['duration_s']:g} s per variant"
    )
    table = C.markdown_table(["path", "case", "unit", "no token", "token", "token/no token"], rows)
    return f"{head}\n\n{table}"


def render(data: dict[str, Any]) -> str:
    parts = []
    if data["samples"]["open"] or data["samples"]["token"]:
        parts.append(render_te(data))
    if any(data["store_samples"][p][v] for p in PATHS for v in VARIANTS):
        parts.append(render_store(data))
    return "\n\n".join(parts) + f"\n\n{C.machine_line(data)}"


def render_te(data: dict[str, Any]) -> str:
    rows = []
    for key, label, unit in METRICS:
        s_open, s_tok = data["summary"]["open"][key], data["summary"]["token"][key]
        r = C.ratio(s_tok, s_open)
        fmt = "{:.3f}" if unit == "GB/s" else "{:.0f}"
        rows.append(
            [label, unit, C.cell(s_open, fmt), C.cell(s_tok, fmt), "-" if r is None else f"{r:.3f}"]
        )
    head = (
        f"### Cluster token overhead (auth_bench), TCP loopback, PYMOONCAKE_SAME_HOST=0 - "
        f"median (min-max) over {data['runs']} run(s) of {data['duration_s']:g} s per variant"
    )
    table = C.markdown_table(["case", "unit", "no token", "token", "token/no token"], rows)
    return f"{head}\n\n{table}"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help="run the cases once, here")
    p.add_argument("--target", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--cases", default="te,store", help="te (transfer engine), store, or both (default)"
    )
    p.add_argument("--out", type=Path, help="worker: JSON output path")
    p.add_argument("--runs", type=int, default=5, help="runs per variant (default 5)")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per case (default 2)")
    args = p.parse_args(argv)
    if args.target:
        return target_main()
    if args.worker or args.store_worker:
        if args.out is None:
            p.error("--worker needs --out")
        if args.store_worker:
            return store_worker_main(args.out, args.duration)
        return worker_main(args.out, args.duration)
    cases = C.parse_list(args.cases, ("te", "store"))
    started = time.time()
    data: dict[str, Any] = {
        "bench": "auth_bench",
        "runs": args.runs,
        "duration_s": args.duration,
        "block_bytes": BLOCK,
        "batch": BATCH,
        "machine": C.machine_info(),
        "samples": {v: [] for v in VARIANTS},
        "store_block_bytes": STORE_BLOCK,
        "store_samples": {p: {v: [] for v in VARIANTS} for p in PATHS},
    }
    with tempfile.TemporaryDirectory(prefix="auth_bench-") as tmp, C.sigterm_as_interrupt():
        try:
            for i in range(args.runs):
                order = VARIANTS if i % 2 == 0 else tuple(reversed(VARIANTS))
                for variant in order:
                    if "te" in cases:
                        res = run_worker(variant, args.duration, Path(tmp), i)
                        data["samples"][variant].append(res)
                        C.log(
                            f"run {i + 1}/{args.runs} {variant:5}: write "
                            f"{res['batch_write_gbps']:.3f} GB/s, read "
                            f"{res['batch_read_gbps']:.3f} GB/s, probe p50 "
                            f"{res['probe_p50_us']:.0f} us"
                        )
                    if "store" in cases:
                        for path in PATHS:
                            res = run_store_worker(variant, path, args.duration, Path(tmp), i)
                            data["store_samples"][path][variant].append(res)
                            C.log(
                                f"run {i + 1}/{args.runs} {variant:5} store {path:8}: put p50 "
                                f"{res['put_p50_us']:.0f} us, get p50 {res['get_p50_us']:.0f} us"
                                f" ({res['ops']} ops)"
                            )
        except KeyboardInterrupt:
            data["interrupted"] = True
    data["summary"] = {
        v: {key: C.summary([s[key] for s in data["samples"][v]]) for key, _, _ in METRICS}
        for v in VARIANTS
    }
    data["store_summary"] = {
        p: {
            v: {
                key: C.summary([s[key] for s in data["store_samples"][p][v]])
                for key, _, _ in STORE_METRICS
            }
            for v in VARIANTS
        }
        for p in PATHS
    }
    data["store_ratio_token_over_open"] = {
        p: {
            key: C.ratio(
                data["store_summary"][p]["token"][key], data["store_summary"][p]["open"][key]
            )
            for key, _, _ in STORE_METRICS
        }
        for p in PATHS
    }
    data["ratio_token_over_open"] = {
        key: C.ratio(data["summary"]["token"][key], data["summary"]["open"][key])
        for key, _, _ in METRICS
    }
    data["machine"]["loadavg_end"] = os.getloadavg()
    data["wall_s"] = time.time() - started
    if not any(data["samples"].values()) and not any(
        data["store_samples"][p][v] for p in PATHS for v in VARIANTS
    ):
        print("no complete run", file=sys.stderr)
        return 1
    C.publish("auth_bench", data, render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
