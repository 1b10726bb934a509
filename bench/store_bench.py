"""Store bench: pymooncake vs the reference Mooncake Store, side by side in one run.

Two roles in one file:

* **driver** (default): per implementation and run, starts that implementation's
  ``mooncake_master`` (embedded HTTP metadata server, 5 s read lease), a putter worker A
  (``global_segment_size`` 4 GiB) and a getter worker B (``global_segment_size=0``),
  both under that implementation's interpreter (the reference with ``MC_FORCE_TCP=1``,
  both with ``MC_TCP_BIND_ADDRESS=127.0.0.1``). It sends the workers one command at a
  time, so data lives in A's segment and, in "2proc", B reads it over the TCP transport.
  Implementations alternate run by run (ref, py, py, ref, ref, py ...). Prints markdown
  tables and writes ``bench/results/store_bench-<timestamp>.json`` + ``store_bench-latest.json``.
* **worker** (``--worker``): imports only ``mooncake.store`` (and the standard library),
  registers a 1 GiB ctypes buffer (anonymous mmap) with ``register_buffer``, then executes
  JSON commands read from stdin (setup, warm-up, put/get phases, per-call latency loops,
  lease-aware cleanup), answering one JSON line each. Every phase is timed inside the
  worker, around the API calls only.

This reproduces the "Store" rows of ``/work/shared/reference/anchor-bench.md``: values of
4 KiB .. 32 MiB, n = min(2000, max(32, 512 MiB / size)) keys, put/get (bytes),
put_from/get_into (zero-copy), batch_put_from/batch_get_into (32 keys per call), scenarios
2proc and 1proc, small-op latency (put / is_exist / get / remove of 4 KiB values) and
peak RSS (VmHWM) of master, A and B.

Usage::

    python bench/store_bench.py                 # 3 runs x both impls (~5 min)
    python bench/store_bench.py --quick         # 1 run, 3 sizes, fewer keys (~35 s)
    python bench/store_bench.py --impl ref,py,pytcp   # + ours with PYMOONCAKE_SAME_HOST=0
    python bench/store_bench.py --impl py --runs 1 --sizes 1M,32M

GB/s = 10^9 payload bytes / wall time of the whole phase.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C

IMPLS = ("ref", "py", "pytcp")
#: extra environment of each implementation's processes (on top of _common.env_for)
IMPL_ENV = {"ref": {}, "py": {}, "pytcp": {"PYMOONCAKE_SAME_HOST": "0"}}
SCENARIOS = ("2proc", "1proc")
APIS = ("bytes", "zcopy", "batch")
LAT_OPS = ("put", "get", "is_exist", "remove")
#: per small call: CPU of the caller's process and of the master, and their waits for a CPU
CPU_FIELDS = ("cpu_client_us", "cpu_master_us", "wait_client_us", "wait_master_us")
DEFAULT_SIZES = "4K,64K,1M,8M,32M"
QUICK_SIZES = "4K,1M,32M"
#: warm-up: put_from 32 MiB objects over this share of A's segment, then remove them. The
#: anchor used 96 x 32 MiB = 75 % of 4 GiB; measured here: with 75 % both implementations
#: still hit untouched segment pages in the 2proc phase (put_from 32 MiB ~0.5 GB/s, first
#: touch), so we warm 85 % (108 objects), just under the master's 90 % eviction watermark
WARM_OBJ = 32 * C.MiB
WARM_FRACTION = 0.85
#: pending (leased, not yet removable) bytes + the next phase may use this share of A's
#: segment, so that live data stays inside the warmed part
SEGMENT_BUDGET = 0.6


def keys_for(size: int, max_keys: int, case_bytes: int, min_keys: int) -> int:
    """Anchor: n = min(2000, max(32, 512 MiB / size))."""
    return min(max_keys, max(min_keys, case_bytes // size))


# ================================================================= worker role


def _lat_stats(lat_ns: list[int], wall_s: float, n_ok: int) -> dict[str, Any]:
    lat = sorted(lat_ns)
    return {
        "p50_us": C.percentile(lat, 50) / 1e3,
        "p99_us": C.percentile(lat, 99) / 1e3,
        "mean_us": sum(lat) / len(lat) / 1e3 if lat else float("nan"),
        "ops_s": n_ok / wall_s if wall_s > 0 else 0.0,
        "wall_s": wall_s,
    }


class StoreWorker:
    """One store client (A or B) and its registered buffer; one method per command."""

    def __init__(self, buffer_bytes: int, lease_ms: int, batch: int) -> None:
        from mooncake.store import MooncakeDistributedStore

        self.store = MooncakeDistributedStore()
        self.size = buffer_bytes
        self.lease_s = lease_ms / 1000.0
        self.batch = batch
        self.mm = mmap.mmap(-1, buffer_bytes)
        self._cbuf: Any = ctypes.c_char.from_buffer(self.mm)
        self.base = ctypes.addressof(self._cbuf)
        self.registered = False
        self.is_setup = False
        self.pending: list[dict[str, Any]] = []

    # --- set-up

    def setup(
        self, role: str, segment: int, local_buffer: int, metadata: str, master: str
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        if role == "A":  # source of every put: the repeating pattern, faulted in now
            pat = C.pattern()
            for off in range(0, self.size, C.PAT_LEN):
                ctypes.memmove(self.base + off, pat, min(C.PAT_LEN, self.size - off))
        else:
            ctypes.memset(self.base, 0, self.size)
        t_fill = time.perf_counter() - t0
        t1 = time.perf_counter()
        rc = self.store.setup(C.HOST, metadata, segment, local_buffer, "tcp", "", master)
        t_setup = time.perf_counter() - t1
        if rc != 0:
            return {"error": f"setup(...) returned {rc} (master {master}, metadata {metadata})"}
        self.is_setup = True
        rc = self.store.register_buffer(self.base, self.size)
        if rc != 0:
            return {"error": f"register_buffer({self.size} bytes) returned {rc}"}
        self.registered = True
        import mooncake.store as ms

        return {"fill_s": t_fill, "setup_s": t_setup, "module": getattr(ms, "__file__", "?")}

    def warmup(self, count: int, size: int, prefix: str) -> dict[str, Any]:
        """put_from ``count`` objects (faults in A's segment), then remove them."""
        slots = max(1, self.size // size)
        fails = 0
        t0 = time.perf_counter()
        for i in range(count):
            fails += self.store.put_from(f"{prefix}{i}", self.base + (i % slots) * size, size) != 0
        wall = time.perf_counter() - t0
        rm_fail = sum(
            self.store.remove(f"{prefix}{i}") not in (0, C.OBJECT_NOT_FOUND) for i in range(count)
        )
        return {
            "wall_s": wall,
            "gbps": count * size / wall / 1e9,
            "fails": fails,
            "remove_fails": rm_fail,
        }

    # --- throughput phases

    def _plan(self, prefix: str, n: int, size: int) -> tuple[list[str], list[int]]:
        if n * size > self.size:
            raise ValueError(f"{n} x {size} bytes exceed the {self.size}-byte buffer")
        return [f"{prefix}{i}" for i in range(n)], [self.base + i * size for i in range(n)]

    def _chunks(
        self, keys: list[str], ptrs: list[int], size: int
    ) -> list[tuple[list[str], list[int], list[int]]]:
        b = self.batch
        return [
            (keys[j : j + b], ptrs[j : j + b], [size] * len(keys[j : j + b]))
            for j in range(0, len(keys), b)
        ]

    def put(self, api: str, size: int, n: int, prefix: str) -> dict[str, Any]:
        keys, ptrs = self._plan(prefix, n, size)
        exp = C.expected_value(size, prefix)
        ctypes.memmove(self.base, exp, size)  # slot 0 = the first key's value
        s = self.store
        fails = first_rc = 0
        if api == "bytes":
            t0 = time.perf_counter()
            for k in keys:
                rc = s.put(k, exp)
                if rc != 0:
                    fails += 1
                    first_rc = first_rc or rc
        elif api == "zcopy":
            pairs = list(zip(keys, ptrs, strict=True))
            t0 = time.perf_counter()
            for k, p in pairs:
                rc = s.put_from(k, p, size)
                if rc != 0:
                    fails += 1
                    first_rc = first_rc or rc
        else:
            chunks = self._chunks(keys, ptrs, size)
            t0 = time.perf_counter()
            for ks, ps, ss in chunks:
                for rc in s.batch_put_from(ks, ps, ss):
                    if rc != 0:
                        fails += 1
                        first_rc = first_rc or rc
        wall = time.perf_counter() - t0
        return {
            "wall_s": wall,
            "gbps": (n - fails) * size / wall / 1e9,
            "fails": fails,
            "first_rc": first_rc,
        }

    def get(self, api: str, size: int, n: int, prefix: str) -> dict[str, Any]:
        keys, ptrs = self._plan(prefix, n, size)
        exp = C.expected_value(size, prefix)
        ctypes.memset(self.base, 0, size)  # a get that writes nothing cannot pass the check
        s = self.store
        fails = first_rc = 0
        first: bytes = b""
        if api == "bytes":
            t0 = time.perf_counter()
            for k in keys:
                v = s.get(k)
                if len(v) != size:
                    fails += 1
                    first_rc = first_rc or -len(v) or -1
                if not first:
                    first = v
        elif api == "zcopy":
            pairs = list(zip(keys, ptrs, strict=True))
            t0 = time.perf_counter()
            for k, p in pairs:
                rc = s.get_into(k, p, size)
                if rc != size:
                    fails += 1
                    first_rc = first_rc or rc
        else:
            chunks = self._chunks(keys, ptrs, size)
            t0 = time.perf_counter()
            for ks, ps, ss in chunks:
                for rc in s.batch_get_into(ks, ps, ss):
                    if rc != size:
                        fails += 1
                        first_rc = first_rc or rc
        wall = time.perf_counter() - t0
        if api != "bytes":
            first = ctypes.string_at(self.base, size)
        return {
            "wall_s": wall,
            "gbps": (n - fails) * size / wall / 1e9,
            "fails": fails,
            "first_rc": first_rc,
            "verified": first == exp,
        }

    # --- small-op latency

    def fill(self, size: int, n: int, prefix: str) -> dict[str, Any]:
        """Untimed: batch_put_from ``n`` keys (the keys that ``lat remove`` removes)."""
        keys, ptrs = self._plan(prefix, n, size)
        fails = sum(
            rc != 0
            for ks, ps, ss in self._chunks(keys, ptrs, size)
            for rc in self.store.batch_put_from(ks, ps, ss)
        )
        return {"fails": fails}

    def lat(self, op: str, size: int, n: int, prefix: str) -> dict[str, Any]:
        """One call at a time, each timed; p50/p99 per call and ops/s over the loop."""
        s = self.store
        keys = [f"{prefix}{i}" for i in range(n)]
        exp = C.expected_value(size, prefix)
        lat: list[int] = []
        add = lat.append
        clock = time.perf_counter_ns
        fails = 0
        verified: bool | None = None
        t0 = time.perf_counter()
        if op == "put":
            for k in keys:
                a = clock()
                rc = s.put(k, exp)
                add(clock() - a)
                fails += rc != 0
        elif op == "is_exist":
            for k in keys:
                a = clock()
                rc = s.is_exist(k)
                add(clock() - a)
                fails += rc != 1
        elif op == "get":
            for k in keys:
                a = clock()
                v = s.get(k)
                add(clock() - a)
                fails += len(v) != size
                if verified is None:
                    verified = v == exp
        elif op == "remove":
            for k in keys:
                a = clock()
                rc = s.remove(k)
                add(clock() - a)
                fails += rc != 0
        else:
            raise ValueError(f"unknown latency op {op!r}")
        wall = time.perf_counter() - t0
        res = {"fails": fails, **_lat_stats(lat, wall, n - fails)}
        if verified is not None:
            res["verified"] = verified
        return res

    # --- removal (leases: a key read less than lease ms ago cannot be removed)

    def add_pending(self, prefix: str, n: int, size: int, leased: bool) -> dict[str, Any]:
        now = time.monotonic()
        self.pending.append(
            {
                "prefix": prefix,
                "idx": list(range(n)),
                "size": size,
                # never remove before the lease can have expired: a refused remove is an
                # extra RPC, and an is_exist() between retries would renew the lease
                "ready_at": now + (self.lease_s + 0.3 if leased else 0.0),
                "give_up_at": now + self.lease_s + 30.0,
            }
        )
        return {"pending_groups": len(self.pending)}

    def cleanup(self, need: int, budget: int, timeout: float) -> dict[str, Any]:
        """Remove every pending key whose lease has expired; wait (bounded) for more
        only while pending bytes + ``need`` exceed ``budget``."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        removed = refused = leftover = 0
        last_rc = 0
        waited = 0.0
        while True:
            now = time.monotonic()
            for g in list(self.pending):
                if g["ready_at"] > now:
                    continue
                still = []
                for i in g["idx"]:
                    rc = self.store.remove(f"{g['prefix']}{i}")
                    if rc in (0, C.OBJECT_NOT_FOUND):
                        removed += 1
                    else:
                        still.append(i)
                        refused += 1
                        last_rc = rc
                if not still:
                    self.pending.remove(g)
                elif time.monotonic() > g["give_up_at"]:
                    leftover += len(still)
                    self.pending.remove(g)
                else:
                    g["idx"] = still
                    g["ready_at"] = time.monotonic() + 0.5
            pending = sum(len(g["idx"]) * g["size"] for g in self.pending)
            now = time.monotonic()
            if not self.pending or pending + need <= budget or now >= deadline:
                break
            nxt = min(g["ready_at"] for g in self.pending)
            pause = max(0.01, min(nxt - now, deadline - now))
            time.sleep(pause)
            waited += pause
        return {
            "removed": removed,
            "refused": refused,
            "last_rc": last_rc,
            "leftover": leftover,
            "pending_bytes": pending,
            "waited_s": waited,
            "wall_s": time.monotonic() - t0,
        }

    def close(self) -> None:
        if self.registered:
            self.store.unregister_buffer(self.base)
        if self.is_setup and hasattr(self.store, "close"):
            self.store.close()
        del self._cbuf
        self.mm.close()


def worker_main(a: argparse.Namespace) -> int:
    reply = C.reply_channel()  # before the store's import: it may print
    w = StoreWorker(a.buffer_bytes, a.lease_ms, a.batch)
    handlers = {
        "setup": w.setup,
        "warmup": w.warmup,
        "put": w.put,
        "get": w.get,
        "fill": w.fill,
        "lat": w.lat,
        "add_pending": w.add_pending,
        "cleanup": w.cleanup,
    }
    return C.serve_commands(reply, handlers, w.close)


# ================================================================= driver role


MEM_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def read_mem_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak resident set) and today's resident split of ``pid``, in KiB; {} if gone."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in MEM_FIELDS:
                out[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def run_impl(impl: str, run: int, python: str, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One complete pass of one implementation: master + A + B, every case once."""
    res: dict[str, Any] = {"impl": impl, "run": run, "cases": [], "latency": [], "cleanup": []}
    procs = C.StorePass(impl, run, python, IMPL_ENV[impl], a.lease_ms, tmp / f"{impl}-{run}")
    tag = procs.tag
    try:
        A, B = procs.start_workers(
            [str(Path(__file__).resolve()), "--worker"],
            label="worker",
            buffer_bytes=a.buffer_bytes,
            batch=a.batch,
            segment_bytes=a.segment_bytes,
            local_buffer_bytes=a.local_buffer_bytes,
            into=res,
        )
        count = int(a.segment_bytes * WARM_FRACTION) // WARM_OBJ
        res["warmup"] = A.call(
            "warmup",
            C.phase_timeout(count * WARM_OBJ),
            count=count,
            size=WARM_OBJ,
            prefix=f"{tag}-w",
        )
        C.progress(
            f"  {impl}: setup A {res['setup_A']['setup_s']:.2f} s, B {res['setup_B']['setup_s']:.2f} s; "
            f"warm-up {count} x 32 MiB put_from {res['warmup']['gbps']:.2f} GB/s"
        )
        # open the TCP connections (B -> A's segment) before anything is timed
        wkb = 4 * C.KiB
        A.call("put", 60, api="batch", size=wkb, n=32, prefix=f"{tag}-t")
        for g in (B, A):
            for api in APIS:
                g.call("get", 60, api=api, size=wkb, n=32, prefix=f"{tag}-t")
        A.call("add_pending", 10, prefix=f"{tag}-t", n=32, size=wkb, leased=True)
        budget = int(a.segment_bytes * SEGMENT_BUDGET)

        def cleanup(need: int) -> None:
            r = A.call(
                "cleanup",
                a.lease_ms / 1000 + 60,
                need=need,
                budget=budget,
                timeout=a.lease_ms / 1000 + 35,
            )
            res["cleanup"].append(r)
            if r["leftover"] or r["pending_bytes"] + need > budget:
                C.log(f"  {impl}: cleanup could not make room: {r}")

        for scen in a.scenarios:
            getter = B if scen == "2proc" else A
            for api in a.apis:
                for size in a.sizes:
                    n = keys_for(size, a.max_keys, a.case_bytes, a.min_keys)
                    prefix = f"{tag}-{scen}-{api}-{size}-"
                    cleanup(n * size)
                    put = A.call(
                        "put", C.phase_timeout(n * size), api=api, size=size, n=n, prefix=prefix
                    )
                    get = getter.call(
                        "get", C.phase_timeout(n * size), api=api, size=size, n=n, prefix=prefix
                    )
                    A.call("add_pending", 10, prefix=prefix, n=n, size=size, leased=True)
                    res["cases"].append(
                        {
                            "scenario": scen,
                            "api": api,
                            "size": size,
                            "keys": n,
                            "put": put,
                            "get": get,
                        }
                    )
                    bad = (" FAILED CALLS" if put["fails"] or get["fails"] else "") + (
                        "" if get["verified"] else " VERIFY MISMATCH"
                    )
                    C.progress(
                        f"  {impl} {scen} {api:5} {C.size_label(size):>7} x{n}: put "
                        f"{put['gbps']:.3f} get {get['gbps']:.3f} GB/s{bad}"
                    )
            # small-op latency, 4 KiB values
            size, n = a.lat_size, a.lat_keys
            pk, rk = f"{tag}-{scen}-lat-", f"{tag}-{scen}-rm-"
            cleanup(2 * n * size)
            A.call("fill", 120, size=size, n=n, prefix=rk)
            plan = [
                ("put", A, pk),
                ("is_exist", getter, pk),
                ("get", getter, pk),
                ("remove", getter, rk),
            ]
            lat_timeout = 60 + n * 0.02
            for op, w, p in plan:
                before = C.sched_ns(w.pid), C.sched_ns(procs.master.pid, group=True)
                r = w.call("lat", lat_timeout, op=op, size=size, n=n, prefix=p)
                r.update(_cpu_per_call(before, (w.pid, procs.master.pid), n))
                res["latency"].append({"scenario": scen, "op": op, "keys": n, **r})
                C.progress(
                    f"  {impl} {scen} {op:8}: p50 {r['p50_us']:.0f} us p99 {r['p99_us']:.0f} us "
                    f"{r['ops_s']:.0f} ops/s" + (f" [{r['fails']} failed]" if r["fails"] else "")
                )
            A.call("add_pending", 10, prefix=pk, n=n, size=size, leased=True)
        cleanup(0)
        res["mem_kib"] = {
            "master": read_mem_kib(procs.master.pid),
            "A": read_mem_kib(A.pid),
            "B": read_mem_kib(B.pid),
        }
    except RuntimeError as exc:
        res["error"] = str(exc)
        C.log(f"{impl} run {run + 1} failed: {exc}")
    finally:
        procs.stop()
    return res


def _cpu_per_call(
    before: tuple[tuple[int, int], tuple[int, int]], pids: tuple[int, int], n: int
) -> dict[str, float]:
    """What the caller's process and the master's process group spent per call since
    ``before`` (their :func:`C.sched_ns`): CPU time (every thread) and time spent
    runnable but waiting for a CPU, in us.  On a busy host a small call's latency
    tracks the CPU of both sides: they run one after the other, and every
    microsecond of it is taken from, and waited for behind, the competitors."""
    client = C.sched_ns(pids[0])
    master = C.sched_ns(pids[1], group=True)
    out = {}
    for side, old, now in (("client", before[0], client), ("master", before[1], master)):
        out[f"cpu_{side}_us"] = (now[0] - old[0]) / n / 1e3
        out[f"wait_{side}_us"] = (now[1] - old[1]) / n / 1e3
    return out


def _others(impls: list[str]) -> list[str]:
    """The pymooncake variants of this run (compared against ``ref``)."""
    return [i for i in impls if i != "ref"] if "ref" in impls else []


def _goal(ratios: list[float | None], ok: Any) -> bool | None:
    return None if not ratios or None in ratios else all(ok(x) for x in ratios)


def _summaries(data: dict[str, Any], a: argparse.Namespace) -> None:
    runs = data["runs"]
    others = _others(a.impls)

    def of(impl: str, part: str) -> list[dict[str, Any]]:
        return [x for r in runs if r["impl"] == impl for x in r[part]]

    cases = []
    for scen in a.scenarios:
        for api in a.apis:
            for size in a.sizes:
                s: dict[str, Any] = {"scenario": scen, "api": api, "size": size}
                for impl in a.impls:
                    got = [
                        c
                        for c in of(impl, "cases")
                        if (c["scenario"], c["api"], c["size"]) == (scen, api, size)
                    ]
                    for ph in ("put", "get"):
                        s[f"{ph}_{impl}"] = C.summary([c[ph]["gbps"] for c in got])
                        s[f"{ph}_{impl}_fails"] = sum(c[ph]["fails"] for c in got)
                    s[f"verified_{impl}"] = [sum(c["get"]["verified"] for c in got), len(got)]
                    if got:
                        s["keys"] = got[0]["keys"]
                for o in others:
                    rs = []
                    for ph in ("put", "get"):
                        s[f"{ph}_ratio_{o}"] = C.ratio(s.get(f"{ph}_{o}"), s.get(f"{ph}_ref"))
                        rs.append(s[f"{ph}_ratio_{o}"])
                    s[f"goal_{o}"] = _goal(rs, lambda x: x >= 1.0)
                cases.append(s)
    lat = []
    for scen in a.scenarios:
        for op in LAT_OPS:
            s = {"scenario": scen, "op": op}
            for impl in a.impls:
                got = [x for x in of(impl, "latency") if (x["scenario"], x["op"]) == (scen, op)]
                for k in ("p50_us", "p99_us", "ops_s", *CPU_FIELDS):
                    s[f"{k}_{impl}"] = C.summary([x[k] for x in got if k in x])
                s[f"fails_{impl}"] = sum(x["fails"] for x in got)
            for o in others:
                s[f"p50_ratio_{o}"] = C.ratio(s.get(f"p50_us_{o}"), s.get("p50_us_ref"))
                s[f"goal_{o}"] = _goal([s[f"p50_ratio_{o}"]], lambda x: x <= 1.0)
            lat.append(s)
    rss = []
    for proc in ("master", "A", "B"):
        s = {"process": proc}
        for impl in a.impls:
            mems = [r["mem_kib"][proc] for r in runs if r["impl"] == impl and r.get("mem_kib")]
            for f in MEM_FIELDS:
                s[f"{impl}_{f}"] = C.summary([m[f] / 1024 for m in mems if f in m])
        rss.append(s)
    data["summary"] = {"throughput": cases, "latency": lat, "rss_mib": rss}
    goals: dict[str, Any] = {}
    for o in others:
        tg = [c[f"goal_{o}"] for c in cases if c[f"goal_{o}"] is not None]
        lg = [x[f"goal_{o}"] for x in lat if x[f"goal_{o}"] is not None]
        goals[o] = {
            "throughput_ge_ref_every_case": all(tg) if tg else None,
            "throughput_cases": f"{sum(tg)}/{len(tg)}",
            "small_op_p50_le_ref_every_op": all(lg) if lg else None,
            "small_op_cases": f"{sum(lg)}/{len(lg)}",
        }
    data["goals"] = goals


def _r(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _us(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _render_cpu(latency: list[dict[str, Any]], impls: list[str]) -> list[str]:
    """The CPU each side spent per small call (see :func:`_cpu_per_call`)."""
    header = ["scenario", "op"]
    for i in impls:
        header += [f"client {i}", f"master {i}", f"both {i}", f"waited {i}"]
    rows = []
    for x in latency:
        row = [x["scenario"], x["op"]]
        for i in impls:
            c, m, wc, wm = (
                (x.get(f"{k}_{i}") or {}).get("median")
                for k in ("cpu_client_us", "cpu_master_us", "wait_client_us", "wait_master_us")
            )
            row += [
                _us(c),
                _us(m),
                _us(c + m if c is not None and m is not None else None),
                _us(wc + wm if wc is not None and wm is not None else None),
            ]
        rows.append(row)
    return [
        "### CPU per small call (us, median over runs): the caller's process (every thread), "
        "the master's, both, and how long both waited runnable for a CPU",
        "",
        C.markdown_table(header, rows),
        "",
        "Means over the loop (compare with 1e6 / ops/s, not with the p50). On a busy host "
        "a small call's time follows `both`: client and master run one after the other, "
        "each behind the competitors.",
    ]


def render(data: dict[str, Any]) -> str:
    cfg = data["config"]
    impls = cfg["impls"]
    others = _others(impls)
    sm = data["summary"]
    lines = [
        f"### Store throughput, tcp, HTTP metadata (GB/s, median (min-max) over "
        f"{cfg['runs']} run(s); A's segment {cfg['segment_gib']:g} GiB)",
        "",
    ]
    header = ["scenario", "api", "value", "keys"]
    for ph in ("put", "get"):
        header += [f"{ph} {i}" for i in impls] + [f"{ph} {o}/ref" for o in others]
    header += [f"{o}>=ref" for o in others]
    rows = []
    for c in sm["throughput"]:
        row = [c["scenario"], c["api"], C.size_label(c["size"]), str(c.get("keys", "-"))]
        for ph in ("put", "get"):
            for i in impls:
                txt = C.cell(c.get(f"{ph}_{i}"), "{:.3f}")
                if c.get(f"{ph}_{i}_fails"):
                    txt += f" [{c[f'{ph}_{i}_fails']} failed calls]"
                row.append(txt)
            row += [_r(c[f"{ph}_ratio_{o}"]) for o in others]
        row += [C.check(c[f"goal_{o}"]) for o in others]
        rows.append(row)
    lines += [
        C.markdown_table(header, rows),
        "",
        "api: bytes = put/get, zcopy = put_from/get_into, batch = batch_put_from/batch_get_into "
        f"({cfg['batch']} keys per call); X>=ref: X's median >= ref's for both put and get.",
    ]
    for o in others:
        g = data["goals"][o]
        lines.append(
            f"Goal {o} >= ref in every case: {C.check(g['throughput_ge_ref_every_case'])} "
            f"({g['throughput_cases']})"
        )
    lines += [
        "",
        f"### Store small-op latency, {C.size_label(cfg['lat_size'])} values, "
        f"{cfg['lat_keys']} calls each (us per call, ops/s; median (min-max) over runs)",
        "",
    ]
    header = ["scenario", "op"]
    for k in ("p50", "p99", "ops/s"):
        header += [f"{k} {i}" for i in impls]
    header += [f"p50 {o}/ref" for o in others] + [f"{o} p50<=ref" for o in others]
    rows = []
    for x in sm["latency"]:
        row = [x["scenario"], x["op"]]
        for k, fmt in (("p50_us", "{:.0f}"), ("p99_us", "{:.0f}"), ("ops_s", "{:.0f}")):
            for i in impls:
                txt = C.cell(x.get(f"{k}_{i}"), fmt)
                if k == "ops_s" and x.get(f"fails_{i}"):
                    txt += f" [{x[f'fails_{i}']} failed]"
                row.append(txt)
        row += [_r(x[f"p50_ratio_{o}"]) for o in others]
        row += [C.check(x[f"goal_{o}"]) for o in others]
        rows.append(row)
    lines += [C.markdown_table(header, rows), ""]
    for o in others:
        g = data["goals"][o]
        lines.append(
            f"Goal {o} p50 <= ref for every op: {C.check(g['small_op_p50_le_ref_every_op'])} "
            f"({g['small_op_cases']})"
        )
    lines += ["", *_render_cpu(sm["latency"], impls)]
    lines += [
        "",
        "### Memory (MiB, median (min-max) over runs): peak RSS (VmHWM), and of the RSS at "
        "the end the part that is shared memory (RssShmem)",
        "",
        C.markdown_table(
            ["process"] + [f"VmHWM {i}" for i in impls] + [f"RssShmem {i}" for i in impls],
            [
                [r["process"]]
                + [C.cell(r.get(f"{i}_VmHWM"), "{:.0f}") for i in impls]
                + [C.cell(r.get(f"{i}_RssShmem"), "{:.0f}") for i in impls]
                for r in sm["rss_mib"]
            ],
        ),
        "",
    ]
    checks = []
    for i in impls:
        ok = sum(c[f"verified_{i}"][0] for c in sm["throughput"])
        tot = sum(c[f"verified_{i}"][1] for c in sm["throughput"])
        fails = sum(c[f"{ph}_{i}_fails"] for c in sm["throughput"] for ph in ("put", "get")) + sum(
            x[f"fails_{i}"] for x in sm["latency"]
        )
        checks.append(f"{i}: first key byte-identical {ok}/{tot}, failed calls {fails}")
    lines.append("Checks: " + "; ".join(checks))
    if "pytcp" in impls:
        lines.append(
            "pytcp = pymooncake with PYMOONCAKE_SAME_HOST=0 (same-host shared-memory transport "
            "off: 2proc gets go over TCP like the reference's)"
        )
    errs = [f"{r['impl']} run {r['run'] + 1}" for r in data["runs"] if "error" in r]
    if errs:
        lines.append(f"FAILED runs (see JSON `runs[].error`): {', '.join(errs)}")
    busy = data["config"].get("competitors", 0)
    if busy:
        lines.append(f"Busy host: {busy} CPU-bound competitor process(es) ran throughout")
    pin = data["config"].get("pin_cpu")
    if pin is not None:
        lines.append(f"Every process ran on CPU {pin} (--pin-cpu)")
    lines.append(C.machine_line(data))
    return "\n".join(lines)


def check_impl(impl: str, python: str) -> None:
    """Fail early, with the fix, when an interpreter cannot run the bench."""
    C.script_next_to(python, "mooncake_master")
    try:
        out = subprocess.run(
            [python, "-c", "import mooncake.store as s; s.MooncakeDistributedStore"],
            capture_output=True,
            text=True,
            timeout=120,
            env=C.variant_env(impl, IMPL_ENV[impl]),
        )
    except (subprocess.SubprocessError, OSError) as exc:
        raise RuntimeError(f"{impl}: cannot run {python}: {exc}") from exc
    if out.returncode != 0:
        hint = (
            f"the reference venv needs {C.REF_PACKAGE} (and libibverbs1 librdmacm1 libnuma1); "
            "set PYMOONCAKE_REF_PYTHON to a venv that has it"
            if impl == "ref"
            else "install pymooncake into .venv (pip install -e .) or set PYMOONCAKE_PY_PYTHON"
        )
        raise RuntimeError(
            f"{impl}: `{python} -c 'import mooncake.store'` failed: "
            f"{out.stderr.strip().splitlines()[-1:] or out.returncode}; {hint}"
        )


def driver_main(a: argparse.Namespace) -> int:
    pythons: dict[str, str] = {}
    for impl in a.impls:
        try:
            pythons[impl] = C.python_for(C.base_impl(impl))
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n(run with --impl py to measure pymooncake alone)") from exc
        check_impl(impl, pythons[impl])
    n_keys = sum(keys_for(s, a.max_keys, a.case_bytes, a.min_keys) for s in a.sizes)
    C.progress(
        f"store_bench: {len(a.scenarios)} scenario(s) x {len(a.apis)} api(s) x "
        f"{len(a.sizes)} size(s) ({n_keys} keys per api) + latency ({a.lat_keys} x 4 ops), "
        f"{a.runs} run(s) x {', '.join(a.impls)}; segment {a.segment_gib:g} GiB"
    )
    data: dict[str, Any] = {
        "bench": "store_bench",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": C.machine_info(),
        "config": {
            "runs": a.runs,
            "impls": a.impls,
            "scenarios": a.scenarios,
            "apis": a.apis,
            "sizes": a.sizes,
            "keys": {str(s): keys_for(s, a.max_keys, a.case_bytes, a.min_keys) for s in a.sizes},
            "batch": a.batch,
            "segment_gib": a.segment_gib,
            "segment_bytes": a.segment_bytes,
            "local_buffer_bytes": a.local_buffer_bytes,
            "buffer_bytes": a.buffer_bytes,
            "lease_ms": a.lease_ms,
            "lat_size": a.lat_size,
            "lat_keys": a.lat_keys,
            "metadata": "http (master-embedded)",
            "ref_env": C.REF_ENV,
            "worker_env": C.STORE_WORKER_ENV,
            "quick": a.quick,
            "competitors": a.competitors,
            "pin_cpu": a.pin_cpu,
            "argv": a.argv,
        },
        "impls": {impl: C.impl_version(C.base_impl(impl), py) for impl, py in pythons.items()},
        "runs": [],
    }
    if a.pin_cpu is not None:  # inherited by every process started from here on
        os.sched_setaffinity(0, {a.pin_cpu})
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="store_bench-"))
    try:
        with C.sigterm_as_interrupt(), C.competitors(a.competitors):
            for r in range(a.runs):
                # ABBA: ref, py | py, ref | ... so neither always runs first
                order = a.impls if r % 2 == 0 else list(reversed(a.impls))
                for impl in order:
                    C.progress(f"run {r + 1}/{a.runs}: {impl} ({pythons[impl]})")
                    t0 = time.monotonic()
                    res = run_impl(impl, r, pythons[impl], a, tmp)
                    res["wall_s"] = time.monotonic() - t0
                    data["runs"].append(res)
                    C.progress(f"run {r + 1}/{a.runs}: {impl} done in {res['wall_s']:.0f} s")
    except KeyboardInterrupt:
        C.log("interrupted; writing what was measured")
        data["interrupted"] = True
    finally:
        if a.keep_logs:
            C.log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    data["wall_s"] = time.monotonic() - t_start
    data["machine"]["loadavg_end"] = os.getloadavg()
    _summaries(data, a)
    C.publish("store_bench", data, render(data))
    failed = any("error" in r for r in data["runs"])
    return 130 if data.get("interrupted") else (1 if failed else 0)


# ================================================================= main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=3, help="repetitions per impl (default 3)")
    p.add_argument("--impl", default="ref,py", help="ref,py (default both)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"1 run, sizes {QUICK_SIZES}, at most 500 keys / 256 MiB per case",
    )
    p.add_argument("--sizes", default=None, help=f"value sizes (default {DEFAULT_SIZES})")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="2proc,1proc (default both)")
    p.add_argument("--apis", default=",".join(APIS), help="bytes,zcopy,batch (default all)")
    p.add_argument(
        "--segment-gib",
        type=float,
        default=4.0,
        help="putter A's global_segment_size in GiB (default 4, as the anchor)",
    )
    p.add_argument("--max-keys", type=int, default=2000, help="keys per case at most (2000)")
    p.add_argument(
        "--case-mib",
        type=int,
        default=512,
        help="bytes per case = this / value size, within the key bounds (512)",
    )
    p.add_argument("--lat-keys", type=int, default=2000, help="calls per small op (2000)")
    p.add_argument("--batch", type=int, default=32, help="keys per batch call (32)")
    p.add_argument("--lease-ms", type=int, default=5000, help="master --default_kv_lease_ttl")
    p.add_argument("--keep-logs", action="store_true", help="keep every child's log")
    p.add_argument(
        "--competitors",
        type=int,
        default=0,
        help="CPU-bound processes running throughout (a busy host; e.g. one per core)",
    )
    p.add_argument(
        "--pin-cpu",
        type=int,
        default=None,
        help="run every process (master, A, B, competitors) on this one CPU: the mode "
        "in which a busy host's scheduler often keeps a client and its master, made "
        "deterministic (each call then costs the CPU time of both sides)",
    )
    p.add_argument("--buffer-bytes", type=int, default=C.GiB, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.argv = argv
    if a.worker:
        return a
    a.min_keys = 32
    if a.quick:
        a.runs = 1
        a.sizes = a.sizes or QUICK_SIZES
        a.max_keys, a.case_mib, a.min_keys = min(a.max_keys, 500), min(a.case_mib, 256), 16
        a.lat_keys = min(a.lat_keys, 500)
    a.sizes = [C.parse_size(s) for s in C.parse_list(a.sizes or DEFAULT_SIZES)]
    a.impls = C.parse_list(a.impl, IMPLS)
    a.scenarios = C.parse_list(a.scenarios, SCENARIOS)
    a.apis = C.parse_list(a.apis, APIS)
    a.case_bytes = a.case_mib * C.MiB
    a.segment_bytes = int(a.segment_gib * C.GiB)
    a.local_buffer_bytes = 512 * C.MiB  # anchor: setup(..., 4 GiB, 512 MiB, ...)
    a.lat_size = 4 * C.KiB
    if not a.impls or not a.sizes or a.runs < 1:
        p.error("need at least one impl, one size and one run")
    for s in a.sizes:
        need = keys_for(s, a.max_keys, a.case_bytes, a.min_keys) * s
        if need > a.buffer_bytes:
            p.error(f"value {C.size_label(s)}: {need} bytes per case exceed the 1 GiB buffer")
        if need > a.segment_bytes * SEGMENT_BUDGET:
            p.error(
                f"value {C.size_label(s)}: {need} bytes per case do not fit "
                f"{SEGMENT_BUDGET:.0%} of a {a.segment_gib:g} GiB segment; raise --segment-gib"
            )
    return a


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if a.worker:
        return worker_main(a)
    return driver_main(a)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (RuntimeError, ValueError) as exc:
        print(f"store_bench: {exc}", file=sys.stderr)
        sys.exit(1)
