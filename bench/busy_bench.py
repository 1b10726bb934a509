"""Calls from a busy interpreter: store and Transfer Engine calls made while another
thread of the caller's process runs Python code, pymooncake vs the reference.

A CPython thread that waits in a blocking system call gives up the GIL; when its
answer arrives it must wait for the thread that took the GIL meanwhile to give it back,
which a CPU-bound thread does only every switch interval (5 ms).  An inference server's
worker thread is such a thread.  This bench measures each call idle and with one
CPU-bound Python thread beside it (pure Python arithmetic, never releasing the GIL).

Two roles in one file:

* **driver** (default): per implementation and run (alternating), starts that
  implementation's ``mooncake_master`` (embedded HTTP metadata) and one worker under
  that implementation's interpreter; prints a table and writes
  ``bench/results/busy_bench-<timestamp>.json``.
* **worker** (``--worker``): imports only ``mooncake.store`` / ``mooncake.engine``; the
  store client has its own 64 MiB segment (the calls measure the master round trips and
  the copies into its own segment); the Transfer Engine talks to a target child process
  (``--target``) on this host.  Per call kind: N calls idle, then N calls with the busy
  thread running (p50/p99 per call).

Implementations: ``ref`` (``MC_FORCE_TCP=1``), ``py`` (defaults: a same-host engine
target is reached through shared memory), ``pytcp`` (``PYMOONCAKE_SAME_HOST=0``: the
engine over TCP, like the reference).

Usage::

    python bench/busy_bench.py                  # ref,py,pytcp x 3 runs (~2 min)
    python bench/busy_bench.py --impl py --runs 1 --calls 300
"""

from __future__ import annotations

import argparse
import ctypes
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

IMPLS = ("ref", "py", "pytcp")
IMPL_ENV: dict[str, dict[str, str]] = {
    "ref": {},
    "py": {},
    "pytcp": {"PYMOONCAKE_SAME_HOST": "0"},
}
STORE_OPS = ("put", "get", "is_exist")
TE_OPS = ("te_write", "te_read")
OPS = STORE_OPS + TE_OPS
VALUE = 4 * C.KiB
TE_BUFFER = 16 * C.MiB
#: goal: a call beside a busy thread takes at most this many times its idle time
GOAL = 2.0


# ================================================================= target role


def target_main() -> int:
    from mooncake.engine import TransferEngine

    te = TransferEngine()
    if te.initialize(C.HOST, "P2PHANDSHAKE", "tcp", "") != 0:
        print("target: initialize failed", file=sys.stderr, flush=True)
        return 1
    addr = te.allocate_managed_buffer(TE_BUFFER)
    if not addr:
        print("target: allocate_managed_buffer failed", file=sys.stderr, flush=True)
        return 1
    print(f"READY {te.get_rpc_port()} {addr}", flush=True)
    sys.stdin.read()
    te.free_managed_buffer(addr, TE_BUFFER)
    if hasattr(te, "close"):
        te.close()
    return 0


# ================================================================= worker role


class Busy:
    """One CPU-bound Python thread (never releases the GIL on its own)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.rounds = 0

    def _spin(self) -> None:
        x = 0
        while not self.stop.is_set():
            for i in range(2000):
                x += i * i
            self.rounds += 1

    def __enter__(self) -> Busy:
        self.thread.start()
        time.sleep(0.05)  # let it take the GIL
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


class BusyWorker:
    def __init__(self) -> None:
        from mooncake.store import MooncakeDistributedStore

        self.store = MooncakeDistributedStore()
        self.mm = mmap.mmap(-1, TE_BUFFER)
        self._cbuf: Any = ctypes.c_char.from_buffer(self.mm)
        self.base = ctypes.addressof(self._cbuf)
        self.value = bytes(range(256)) * (VALUE // 256)
        self.te: Any = None
        self.target: Any = None
        self.seg = ""
        self.remote = 0
        self.store_ok = False

    def setup(self, metadata: str, master: str) -> dict[str, Any]:
        rc = self.store.setup(C.HOST, metadata, 64 * C.MiB, 16 * C.MiB, "tcp", "", master)
        if rc != 0:
            return {"error": f"store setup returned {rc}"}
        self.store_ok = True
        import mooncake.engine as me

        self.target = C.spawn_target([sys.executable, str(Path(__file__).resolve()), "--target"])
        port, _ = C.read_ready(self.target, 60)
        self.seg = f"{C.HOST}:{port}"
        self.te = me.TransferEngine()
        if self.te.initialize(C.HOST, "P2PHANDSHAKE", "tcp", "") != 0:
            return {"error": "initiator initialize failed"}
        ctypes.memset(self.base, 0x5A, TE_BUFFER)
        if self.te.register_memory(self.base, TE_BUFFER) != 0:
            return {"error": "register_memory failed"}
        self.remote = self.te.get_first_buffer_address(self.seg)
        for _ in range(20):  # open the connections
            self.te.transfer_sync_write(self.seg, self.base, self.remote, VALUE)
            self.te.transfer_sync_read(self.seg, self.base, self.remote, VALUE)
        return {}

    def lat(self, op: str, n: int, busy: bool, prefix: str) -> dict[str, Any]:
        s, te, value = self.store, self.te, self.value
        keys = [f"{prefix}{i}" for i in range(n)]
        lat: list[int] = []
        add = lat.append
        clock = time.perf_counter_ns
        fails = 0
        rounds = 0
        with Busy() if busy else _Idle() as b:
            for i, k in enumerate(keys):
                a = clock()
                if op == "put":
                    ok = s.put(k, value) == 0
                elif op == "get":
                    ok = len(s.get(k)) == VALUE
                elif op == "is_exist":
                    ok = s.is_exist(k) == 1
                elif op == "te_write":
                    off = (i % 64) * VALUE
                    ok = (
                        te.transfer_sync_write(self.seg, self.base + off, self.remote + off, VALUE)
                        == 0
                    )
                elif op == "te_read":
                    off = (i % 64) * VALUE
                    ok = (
                        te.transfer_sync_read(self.seg, self.base + off, self.remote + off, VALUE)
                        == 0
                    )
                else:
                    raise ValueError(op)
                add(clock() - a)
                fails += not ok
            rounds = b.rounds
        lat.sort()
        return {
            "n": n,
            "fails": fails,
            "p50_us": C.percentile(lat, 50) / 1e3,
            "p99_us": C.percentile(lat, 99) / 1e3,
            "mean_us": sum(lat) / len(lat) / 1e3,
            "busy_rounds": rounds,
        }

    def close(self) -> None:
        if self.te is not None:
            self.te.unregister_memory(self.base)
            if hasattr(self.te, "close"):
                self.te.close()
        if self.target is not None:
            C.stop_target(self.target, 10)
        if self.store_ok:
            self.store.close()
        del self._cbuf
        self.mm.close()


class _Idle:
    rounds = 0

    def __enter__(self) -> _Idle:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def worker_main(pin: int | None) -> int:
    reply = C.reply_channel()
    if pin is not None:  # the caller and its busy thread share one CPU
        os.sched_setaffinity(0, {pin})
    w = BusyWorker()
    return C.serve_commands(reply, {"setup": w.setup, "lat": w.lat}, w.close)


# ================================================================= driver role


def run_impl(impl: str, run: int, python: str, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"impl": impl, "run": run, "cases": []}
    env = C.variant_env(impl, IMPL_ENV[impl])
    base = C.base_impl(impl)
    master, rpc, meta = C.start_master(base, python, env, 5000, tmp / f"{impl}-{run}-master")
    worker = None
    try:
        worker = C.JsonWorker(
            f"{impl} worker",
            [python, str(Path(__file__).resolve()), "--worker"]
            + ([] if a.pin_cpu is None else [f"--pin-cpu={a.pin_cpu}"]),
            {**env, **C.STORE_WORKER_ENV},
            tmp / f"{impl}-{run}-worker.err",
        )
        worker.call(
            "setup", 120, metadata=f"http://{C.HOST}:{meta}/metadata", master=f"{C.HOST}:{rpc}"
        )
        for op in a.ops:
            for busy in (False, True):
                # puts write new keys; gets and is_exist read what the idle puts wrote
                prefix = f"{impl}{run}-{'b' if busy and op == 'put' else 'i'}-"
                r = worker.call(
                    "lat", 60 + a.calls * 0.05, op=op, n=a.calls, busy=busy, prefix=prefix
                )
                res["cases"].append({"op": op, "busy": busy, **r})
                C.progress(
                    f"  {impl} {op:9} {'busy' if busy else 'idle'}: p50 {r['p50_us']:.0f} us "
                    f"p99 {r['p99_us']:.0f} us" + (f" [{r['fails']} failed]" if r["fails"] else "")
                )
    except RuntimeError as exc:
        res["error"] = str(exc)
        C.log(f"{impl} run {run + 1} failed: {exc}")
    finally:
        if worker is not None:
            worker.stop()
        master.stop()
    return res


def summarize(data: dict[str, Any], a: argparse.Namespace) -> None:
    rows = []
    for op in a.ops:
        row: dict[str, Any] = {"op": op}
        for impl in a.impls:
            for busy in (False, True):
                got = [
                    c
                    for r in data["runs"]
                    if r["impl"] == impl
                    for c in r["cases"]
                    if c["op"] == op and c["busy"] == busy
                ]
                tag = "busy" if busy else "idle"
                row[f"{impl}_{tag}_p50"] = C.summary([c["p50_us"] for c in got])
                row[f"{impl}_{tag}_p99"] = C.summary([c["p99_us"] for c in got])
                row[f"{impl}_{tag}_fails"] = sum(c["fails"] for c in got)
            row[f"{impl}_ratio"] = C.ratio(row[f"{impl}_busy_p50"], row[f"{impl}_idle_p50"])
        rows.append(row)
    data["summary"] = rows
    goals = {}
    for impl in a.impls:
        if impl == "ref":
            continue
        ratios = [r[f"{impl}_ratio"] for r in rows]
        goals[impl] = {
            "busy_within_2x_idle": None if None in ratios else all(x <= GOAL for x in ratios),
            "ops_ok": f"{sum(1 for x in ratios if x is not None and x <= GOAL)}/{len(ratios)}",
        }
    data["goals"] = goals


def render(data: dict[str, Any], a: argparse.Namespace) -> str:
    lines = [
        f"### Calls beside a busy Python thread: {C.size_label(VALUE)} values / transfers, "
        f"{a.calls} calls per case (us per call, median (min-max) over {a.runs} run(s))",
        "",
    ]
    header = ["op"]
    for impl in a.impls:
        header += [f"{impl} idle p50", f"{impl} busy p50", f"{impl} busy p99", f"{impl} busy/idle"]
    rows = []
    for r in data["summary"]:
        row = [r["op"]]
        for impl in a.impls:
            ratio = r[f"{impl}_ratio"]
            row += [
                C.cell(r[f"{impl}_idle_p50"], "{:.0f}"),
                C.cell(r[f"{impl}_busy_p50"], "{:.0f}"),
                C.cell(r[f"{impl}_busy_p99"], "{:.0f}"),
                "-" if ratio is None else f"{ratio:.2f}",
            ]
        rows.append(row)
    lines.append(C.markdown_table(header, rows))
    lines.append("")
    for impl, g in data.get("goals", {}).items():
        lines.append(
            f"Goal {impl}: busy p50 within {GOAL:g}x of idle for every op: "
            f"{C.check(g['busy_within_2x_idle'])} ({g['ops_ok']})"
        )
    lines.append(
        "Store calls: 1proc (the caller's own 64 MiB segment); te_*: transfer_sync_write/read "
        "of 4 KiB to a target process on this host (py: same-host transport, pytcp and ref: TCP)."
    )
    errs = [f"{r['impl']} run {r['run'] + 1}" for r in data["runs"] if "error" in r]
    if errs:
        lines.append(f"FAILED runs: {', '.join(errs)}")
    if a.pin_cpu is not None:
        lines.append(f"Worker pinned to CPU {a.pin_cpu} (caller and busy thread share it).")
    lines.append(C.machine_line(data))
    return "\n".join(lines)


def driver_main(a: argparse.Namespace) -> int:
    pythons = {impl: C.python_for(C.base_impl(impl)) for impl in a.impls}
    data: dict[str, Any] = {
        "bench": "busy_bench",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": C.machine_info(),
        "config": {
            "impls": a.impls,
            "runs": a.runs,
            "calls": a.calls,
            "ops": a.ops,
            "pin_cpu": a.pin_cpu,
        },
        "impls": {i: C.impl_version(C.base_impl(i), p) for i, p in pythons.items()},
        "runs": [],
    }
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="busy_bench-"))
    try:
        with C.sigterm_as_interrupt():
            for r in range(a.runs):
                order = a.impls if r % 2 == 0 else list(reversed(a.impls))
                for impl in order:
                    C.progress(f"run {r + 1}/{a.runs}: {impl}")
                    data["runs"].append(run_impl(impl, r, pythons[impl], a, tmp))
    except KeyboardInterrupt:
        data["interrupted"] = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data["wall_s"] = time.monotonic() - t0
    data["machine"]["loadavg_end"] = os.getloadavg()
    summarize(data, a)
    C.publish("busy_bench", data, render(data, a))
    return 130 if data.get("interrupted") else (1 if any("error" in r for r in data["runs"]) else 0)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--target", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default=",".join(IMPLS), help="ref,py,pytcp (default all)")
    p.add_argument("--runs", type=int, default=3, help="runs per impl (3)")
    p.add_argument("--calls", type=int, default=400, help="calls per case (400)")
    p.add_argument("--ops", default=",".join(OPS), help=f"subset of {','.join(OPS)}")
    p.add_argument(
        "--pin-cpu",
        type=int,
        default=None,
        help="pin the worker (caller and busy thread) to this CPU: on a loaded host the "
        "busy thread then always competes for the GIL, as on an idle one",
    )
    a = p.parse_args(argv)
    if a.worker or a.target:
        return a
    a.impls = C.parse_list(a.impl, IMPLS)
    a.ops = C.parse_list(a.ops, OPS)
    if not a.impls or a.runs < 1 or a.calls < 10:
        p.error("need an impl, a run and at least 10 calls")
    return a


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if a.target:
        return target_main()
    if a.worker:
        return worker_main(a.pin_cpu)
    return driver_main(a)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (RuntimeError, ValueError) as exc:
        print(f"busy_bench: {exc}", file=sys.stderr)
        sys.exit(1)
