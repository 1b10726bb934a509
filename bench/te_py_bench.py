"""Python-API Transfer Engine bench: the same script under pymooncake and the reference.

Three roles in one file:

* **driver** (default): runs the worker under each implementation's interpreter
  (ours: ``.venv/bin/python``; the reference: ``$PYMOONCAKE_REF_PYTHON`` or
  ``.cache/refvenv/bin/python``, with ``MC_FORCE_TCP=1``), the implementations
  interleaved per repetition (ref, py, ref, py ...), then prints a side-by-side table
  and writes ``bench/results/te_py_bench-<timestamp>.json`` and ``te_py_bench-latest.json``.
* **worker** (``--worker``): imports only ``mooncake.engine`` (plus the standard
  library); starts a target child, registers a 1 GiB initiator buffer (ctypes over
  anonymous memory + ``register_memory``, or ``allocate_managed_buffer``), warms both
  buffers up, checks one round trip byte for byte, then runs every case once:
  ``transfer_sync_write/read`` (one block per call, p50/p99 latency per call) and
  ``batch_transfer_sync_write/read`` (128 blocks per call, 32 for 16 MiB), each case
  bounded by ``--duration`` seconds and ``--max-calls`` calls.
* **target** (``--target``): ``initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")``,
  ``allocate_managed_buffer(1 GiB)``, prints ``READY <rpc port> <address>`` and serves
  until its stdin closes.

Usage::

    python bench/te_py_bench.py                      # 3 runs x 2 s, 16 cases (~4 min)
    python bench/te_py_bench.py --quick              # 1 run x 1 s (~1 min)
    python bench/te_py_bench.py --threads 1,2 --impl py --runs 5
    /path/to/any/python bench/te_py_bench.py --worker --out r.json   # one impl, one pass

GB/s = 10^9 payload bytes / wall time of the case (all threads together).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common as C

IMPLS = ("ref", "py")
OPS = ("write", "read")
MODES = ("sync", "batch")
DEFAULT_BLOCKS = "4K,64K,1M,16M"
BUFFER_SIZE = C.GiB


# ---------------------------------------------------------------- target role


def target_main(size: int) -> int:
    from mooncake.engine import TransferEngine

    te = TransferEngine()
    rc = te.initialize(C.HOST, "P2PHANDSHAKE", "tcp", "")
    if rc != 0:
        print(f"target: initialize returned {rc}", file=sys.stderr, flush=True)
        return 1
    addr = te.allocate_managed_buffer(size)
    if not addr:
        print("target: allocate_managed_buffer failed", file=sys.stderr, flush=True)
        return 1
    print(f"READY {te.get_rpc_port()} {addr}", flush=True)
    sys.stdin.read()  # serve until the worker closes our stdin (or dies)
    te.free_managed_buffer(addr, size)
    if hasattr(te, "close"):  # pymooncake; the reference has no close()
        te.close()
    return 0


# ---------------------------------------------------------------- worker role


def _run_case(
    te: Any,
    seg: str,
    local: int,
    remote: int,
    op: str,
    mode: str,
    block: int,
    threads: int,
    duration: float,
    max_calls: int,
) -> dict[str, Any]:
    slots = C.batch_for(block)  # blocks per call in batch mode; sync cycles over as many
    batch = slots if mode == "batch" else 1
    if mode == "sync":
        fn = te.transfer_sync_write if op == "write" else te.transfer_sync_read
    else:
        fn = te.batch_transfer_sync_write if op == "write" else te.batch_transfer_sync_read
    go = threading.Event()
    start_at = [0.0]
    per_thread: list[dict[str, Any]] = [{} for _ in range(threads)]
    calls_left = [max_calls]
    lock = threading.Lock()

    def worker(tid: int) -> None:
        base = tid * slots * block
        lat: list[int] = []
        calls = errors = 0
        first_rc = 0
        locs = [local + base + i * block for i in range(slots)]
        rems = [remote + base + i * block for i in range(slots)]
        lens = [block] * slots
        go.wait()
        deadline = start_at[0] + duration
        clock = time.perf_counter_ns
        while True:
            with lock:
                if calls_left[0] <= 0:
                    break
                calls_left[0] -= 1
            if mode == "sync":
                i = calls % slots
                t0 = clock()
                rc = fn(seg, locs[i], rems[i], block)
            else:
                t0 = clock()
                rc = fn(seg, locs, rems, lens)
            t1 = clock()
            lat.append(t1 - t0)
            calls += 1
            if rc != 0:
                errors += 1
                first_rc = first_rc or rc
                break
            if t1 / 1e9 >= deadline:
                break
        per_thread[tid] = {
            "calls": calls,
            "errors": errors,
            "rc": first_rc,
            "lat": lat,
            "end": time.perf_counter(),
        }

    ths = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for t in ths:
        t.start()
    start_at[0] = time.perf_counter()
    go.set()
    for t in ths:
        # bounded: the last call may overrun the deadline; a hung engine must not hang us
        t.join(duration + 120)
    if any(t.is_alive() for t in ths):
        raise RuntimeError(f"{op} {mode} {block} x{threads}: a thread did not finish")
    wall = max(p["end"] for p in per_thread) - start_at[0]
    calls = sum(p["calls"] for p in per_thread)
    errors = sum(p["errors"] for p in per_thread)
    lat = sorted(x for p in per_thread for x in p["lat"])
    ok_calls = calls - errors
    res: dict[str, Any] = {
        "op": op,
        "mode": mode,
        "block": block,
        "threads": threads,
        "batch": batch,
        "calls": calls,
        "errors": errors,
        "wall_s": wall,
        "bytes": ok_calls * batch * block,
        "gbps": ok_calls * batch * block / wall / 1e9 if wall > 0 else 0.0,
        "p50_us": C.percentile(lat, 50) / 1e3,
        "p99_us": C.percentile(lat, 99) / 1e3,
        "mean_us": sum(lat) / len(lat) / 1e3 if lat else float("nan"),
    }
    if errors:
        res["error"] = f"{errors} call(s) failed, first rc={next(p['rc'] for p in per_thread)}"
    return res


def worker_main(a: argparse.Namespace) -> int:
    import mooncake.engine as me

    t_setup = time.perf_counter()
    result: dict[str, Any] = {
        "module": getattr(me, "__file__", "?"),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "alloc": a.alloc,
        "cases": [],
    }
    target = C.spawn_target(
        [sys.executable, str(Path(__file__).resolve()), "--target", "--size", str(a.size)]
    )
    te: Any = None
    local = 0
    mm: mmap.mmap | None = None
    try:
        port, target_addr = C.read_ready(target, 60)
        seg = f"{C.HOST}:{port}"
        te = me.TransferEngine()
        if te.initialize(C.HOST, "P2PHANDSHAKE", "tcp", "") != 0:
            raise RuntimeError("initiator initialize failed")
        if a.alloc == "managed":
            local = te.allocate_managed_buffer(a.size)
            if not local:
                raise RuntimeError("allocate_managed_buffer failed")
        else:
            mm = mmap.mmap(-1, a.size)
            local = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            if te.register_memory(local, a.size) != 0:
                raise RuntimeError("register_memory failed")
        remote = te.get_first_buffer_address(seg)
        result.update(segment=seg, remote=remote, target_addr=target_addr)
        result["first_buffer_is_target_buffer"] = remote == target_addr
        # warm-up (untimed): fault in both 1 GiB buffers, open the connections
        ctypes.memset(local, 0x5A, a.size)
        chunk, n = 16 * C.MiB, 64
        for off in range(0, a.size, chunk * n):
            k = min(n, (a.size - off) // chunk)
            addrs = [off + i * chunk for i in range(k)]
            rc = te.batch_transfer_sync_write(
                seg, [local + x for x in addrs], [remote + x for x in addrs], [chunk] * k
            )
            if rc != 0:
                raise RuntimeError(f"warm-up write returned {rc}")
        # one byte-for-byte round trip: write a pattern, read it back elsewhere
        pattern = bytes(range(256)) * 16
        ctypes.memmove(local, pattern, len(pattern))
        ok = te.transfer_sync_write(seg, local, remote, len(pattern)) == 0
        ok = ok and te.transfer_sync_read(seg, local + 4096, remote, len(pattern)) == 0
        result["verified"] = ok and ctypes.string_at(local + 4096, len(pattern)) == pattern
        result["setup_s"] = time.perf_counter() - t_setup
        for op in a.ops:
            for mode in a.modes:
                for block in a.blocks:
                    for threads in a.threads:
                        res = _run_case(
                            te,
                            seg,
                            local,
                            remote,
                            op,
                            mode,
                            block,
                            threads,
                            a.duration,
                            a.max_calls,
                        )
                        result["cases"].append(res)
                        print(
                            f"  {op:5} {mode:5} {C.size_label(block):>7} t{threads}: "
                            f"{res['gbps']:.3f} GB/s p50 {res['p50_us']:.0f} us "
                            f"p99 {res['p99_us']:.0f} us {res.get('error', '')}",
                            file=sys.stderr,
                            flush=True,
                        )
    except RuntimeError as exc:
        result["error"] = str(exc)
    finally:
        C.stop_target(target, 15)
        if te is not None and local:
            if a.alloc == "managed":
                te.free_managed_buffer(local, a.size)
            else:
                te.unregister_memory(local)
        if te is not None and hasattr(te, "close"):  # pymooncake; the reference has none
            te.close()
    Path(a.out).write_text(json.dumps(result))
    return 1 if "error" in result else 0


# ---------------------------------------------------------------- driver role


def case_key(c: dict[str, Any]) -> tuple[str, str, int, int]:
    return (c["op"], c["mode"], c["block"], c["threads"])


def driver_main(a: argparse.Namespace) -> int:
    n_cases = len(a.ops) * len(a.modes) * len(a.blocks) * len(a.threads)
    est = a.runs * len(a.impls) * (n_cases * (a.duration + 0.3) + 8)
    C.progress(
        f"{n_cases} cases x {a.runs} run(s) x {len(a.impls)} impl(s) x {a.duration:g} s; "
        f"estimated {est / 60:.1f} min"
    )
    pythons = {impl: C.python_for(impl) for impl in a.impls}
    data: dict[str, Any] = {
        "bench": "te_py_bench",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": C.machine_info(),
        "config": {
            "runs": a.runs,
            "duration_s": a.duration,
            "max_calls": a.max_calls,
            "impls": a.impls,
            "ops": a.ops,
            "modes": a.modes,
            "blocks": a.blocks,
            "threads": a.threads,
            "alloc": a.alloc,
            "size": a.size,
            "ref_env": C.REF_ENV,
            "quick": a.quick,
            "argv": a.argv,
        },
        "impls": {impl: C.impl_version(impl, py) for impl, py in pythons.items()},
        "workers": [],
    }
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="te_py_bench-"))
    per_case: dict[tuple[str, str, int, int], dict[str, list[dict[str, Any]]]] = {}
    worker_args = [
        f"--ops={','.join(a.ops)}",
        f"--modes={','.join(a.modes)}",
        f"--blocks={','.join(str(b) for b in a.blocks)}",
        f"--threads={','.join(str(t) for t in a.threads)}",
        f"--duration={a.duration}",
        f"--max-calls={a.max_calls}",
        f"--alloc={a.alloc}",
        f"--size={a.size}",
    ]
    limit = 120 + n_cases * (a.duration + 20)
    try:
        with C.sigterm_as_interrupt():
            for r in range(a.runs):
                for impl in a.impls:
                    out = tmp / f"{impl}-{r}.json"
                    C.progress(f"run {r + 1}/{a.runs}: {impl} ({pythons[impl]})")
                    child = C.Child(
                        [
                            pythons[impl],
                            str(Path(__file__).resolve()),
                            "--worker",
                            f"--out={out}",
                            *worker_args,
                        ],
                        env=C.tcp_env(impl),
                        log_stem=tmp / f"{impl}-{r}",
                    )
                    try:
                        rc = child.wait(limit)
                        err_tail = child.tail(20)
                    finally:
                        child.stop()
                    if rc is None or not out.exists():
                        why = "timeout" if rc is None else f"rc={rc}"
                        C.log(f"{impl} worker failed ({why}):\n{err_tail}")
                        data["workers"].append({"impl": impl, "run": r, "error": why})
                        continue
                    res = json.loads(out.read_text())
                    for line in child.output()[1].splitlines():
                        if line.startswith("  "):
                            C.progress(f"{impl}{line}")
                    if "error" in res:
                        C.log(f"{impl} worker error: {res['error']}\n{err_tail}")
                    info = {k: v for k, v in res.items() if k != "cases"}
                    data["workers"].append({"impl": impl, "run": r, **info})
                    for c in res["cases"]:
                        per_case.setdefault(case_key(c), {}).setdefault(impl, []).append(c)
    except KeyboardInterrupt:
        C.log("interrupted; writing what was measured")
        data["interrupted"] = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data["wall_s"] = time.monotonic() - t_start
    data["machine"]["loadavg_end"] = os.getloadavg()
    cases = []
    for op in a.ops:
        for mode in a.modes:
            for block in a.blocks:
                for threads in a.threads:
                    runs = per_case.get((op, mode, block, threads), {})
                    s: dict[str, Any] = {}
                    for impl, rs in runs.items():
                        good = [x for x in rs if "error" not in x]
                        s[impl] = C.summary([x["gbps"] for x in good])
                        s[impl + "_p50_us"] = C.summary([x["p50_us"] for x in good])
                        s[impl + "_p99_us"] = C.summary([x["p99_us"] for x in good])
                        s[impl + "_errors"] = len(rs) - len(good)
                    s["ratio_py_ref"] = C.ratio(s.get("py"), s.get("ref"))
                    s["goal_py_ge_ref"] = (
                        None if s["ratio_py_ref"] is None else s["ratio_py_ref"] >= 1.0
                    )
                    cases.append(
                        {
                            "op": op,
                            "mode": mode,
                            "block": block,
                            "threads": threads,
                            "batch": C.batch_for(block) if mode == "batch" else 1,
                            "runs": runs,
                            "summary": s,
                        }
                    )
    data["cases"] = cases
    goals = [c["summary"]["goal_py_ge_ref"] for c in cases]
    goals = [g for g in goals if g is not None]
    data["goals"] = {
        "py_ge_ref_every_case": all(goals) if goals else None,
        "py_ge_ref_cases": f"{sum(goals)}/{len(goals)}",
    }
    C.publish("te_py_bench", data, render(data))
    failed = any("error" in w for w in data["workers"])
    return 130 if data.get("interrupted") else (1 if failed else 0)


def render(data: dict[str, Any]) -> str:
    impls = data["config"]["impls"]
    name = {"ref": "ref", "py": "pymooncake"}
    header = ["op", "mode", "block", "threads", "batch"]
    header += [f"GB/s {name[i]}" for i in impls]
    header += ["py/ref"] + [f"p50/p99 us {name[i]}" for i in impls] + ["py>=ref"]
    rows = []
    for c in data["cases"]:
        s = c["summary"]
        row = [c["op"], c["mode"], C.size_label(c["block"]), str(c["threads"]), str(c["batch"])]
        for i in impls:
            txt = C.cell(s.get(i), "{:.3f}")
            if s.get(f"{i}_errors"):
                txt += f" [{s[f'{i}_errors']} failed]"
            row.append(txt)
        row.append("-" if s["ratio_py_ref"] is None else f"{s['ratio_py_ref']:.2f}")
        for i in impls:
            p50, p99 = s.get(f"{i}_p50_us"), s.get(f"{i}_p99_us")
            row.append(f"{p50['median']:.0f} / {p99['median']:.0f}" if p50 and p99 else "-")
        row.append(C.check(s["goal_py_ge_ref"]))
        rows.append(row)
    cfg = data["config"]
    lines = [
        f"### Python TransferEngine API (te_py_bench), tcp, P2PHANDSHAKE, initiator buffer "
        f"{cfg['alloc']} - GB/s median (min-max) over {cfg['runs']} run(s) of "
        f"{cfg['duration_s']:g} s; p50/p99 per call (median over runs)",
        "",
        C.markdown_table(header, rows),
        "",
        f"Goal py >= ref in every case: {C.check(data['goals']['py_ge_ref_every_case'])} "
        f"({data['goals']['py_ge_ref_cases']})",
    ]
    checks: dict[str, list[str]] = {}
    for w in data["workers"]:
        checks.setdefault(w["impl"], []).append(
            "failed" if "error" in w else ("ok" if w.get("verified") else "MISMATCH")
        )
    lines.append(f"Round-trip byte check per worker: {checks}")
    lines.append(C.machine_line(data))
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help="run the cases once, here")
    p.add_argument("--target", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="te_py_bench-worker.json", help="worker: JSON output path")
    p.add_argument("--runs", type=int, default=3, help="driver: repetitions (default 3)")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per case (default 2)")
    p.add_argument("--max-calls", type=int, default=200_000, help="calls per case at most")
    p.add_argument("--blocks", default=DEFAULT_BLOCKS, help=f"default {DEFAULT_BLOCKS}")
    p.add_argument("--threads", default="1", help="threads list, e.g. 1,2 (default 1)")
    p.add_argument("--ops", default="write,read", help="write,read (default both)")
    p.add_argument("--modes", default="sync,batch", help="sync,batch (default both)")
    p.add_argument("--impl", default="ref,py", help="driver: ref,py (default both)")
    p.add_argument("--alloc", choices=("ctypes", "managed"), default="ctypes")
    p.add_argument("--size", type=int, default=BUFFER_SIZE, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="1 run of 1 s per case")
    a = p.parse_args(argv)
    a.argv = argv
    if a.quick:
        a.runs, a.duration = 1, 1.0
    a.blocks = [C.parse_size(b) for b in C.parse_list(a.blocks)]
    a.threads = [int(t) for t in C.parse_list(a.threads)]
    a.ops = C.parse_list(a.ops, OPS)
    a.modes = C.parse_list(a.modes, MODES)
    a.impls = C.parse_list(a.impl, IMPLS)
    for b in a.blocks:
        for t in a.threads:
            if b * C.batch_for(b) * t > a.size:
                p.error(f"block {b} x {C.batch_for(b)} slots x threads {t} exceeds the buffer")
    return a


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if a.target:
        return target_main(a.size)
    if a.worker:
        return worker_main(a)
    return driver_main(a)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (RuntimeError, ValueError) as exc:
        print(f"te_py_bench: {exc}", file=sys.stderr)
        sys.exit(1)
