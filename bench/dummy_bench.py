"""Dummy-client bench: put/get through a standalone ``mooncake_client``, side by side.

Two roles in one file:

* **driver** (default): per implementation and run, starts that implementation's
  ``mooncake_master`` (embedded HTTP metadata server) and a standalone
  ``mooncake_client`` (the *real* client: ``--global_segment_size`` 512 MiB, serving
  dummy clients on a free ``--port``), then one worker per client kind:

  - ``dummy``: ``setup_dummy(pool, local, "127.0.0.1:<port>")`` -- every call is
    carried out by the real client on memory shared with it;
  - ``normal``: ``setup(..., global_segment_size=0, ...)`` -- a full client without a
    segment of its own, so its objects land in the same real client's segment
    (pymooncake: same-host shared-memory transport; the reference: TCP).

  Each worker times, per value size, ``n`` single-key calls of ``put``/``get``
  (bytes API, staged through the local buffer) and ``put_from``/``get_into``
  (zero copy: a registered buffer -- from ``alloc_from_mem_pool`` for a dummy).
  Implementations alternate run by run (py, ref | ref, py ...). Prints a markdown
  table (median per-call latency, median over runs, min-max) with ratios and writes
  ``bench/results/dummy_bench-<timestamp>.json`` + ``dummy_bench-latest.json``.
* **worker** (``--worker``): imports only ``mooncake.store``; runs under either
  interpreter (the reference's venv ``.cache/refvenv``, with ``MC_FORCE_TCP=1``).

Usage::

    python bench/dummy_bench.py                     # 3 runs x py,ref (~3 min)
    python bench/dummy_bench.py --quick             # 1 run, fewer keys
    python bench/dummy_bench.py --impl py --runs 1

The pymooncake dummy protocol is its own; reference dummies talk to the reference's
``mooncake_client`` and ours to ours -- what is compared is the same API on the same
machine.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C

IMPLS = ("py", "ref")
KINDS = ("dummy", "normal")
APIS = ("bytes", "zcopy")
DEFAULT_SIZES = "4K,1M,16M"
#: keys per size (single-key calls, each timed)
DEFAULT_KEYS = {4 * C.KiB: 300, C.MiB: 60, 16 * C.MiB: 16}
SEGMENT = 512 * C.MiB
LOCAL_BUFFER = 64 * C.MiB
POOL = 64 * C.MiB
DUMMY_READY = re.compile(r"serving dummy clients on (\S+)")


# ================================================================= worker role


class Worker:
    """One store (dummy or normal) and its zero-copy buffers."""

    def __init__(self) -> None:
        from mooncake.store import MooncakeDistributedStore

        self.store = MooncakeDistributedStore()
        self.src = self.dst = 0
        self._keep: Any = None
        self.ready = False

    def setup(
        self, kind: str, address: str, master: str, metadata: str, max_size: int
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        if kind == "dummy":
            rc = self.store.setup_dummy(POOL, LOCAL_BUFFER, address)
        else:
            rc = self.store.setup(C.HOST, metadata, 0, LOCAL_BUFFER, "tcp", "", master)
        if rc != 0:
            raise RuntimeError(f"{kind} setup returned {rc}")
        self.ready = True
        size = 2 * max_size
        if kind == "dummy":  # shared with the real client: read and written in place
            base = self.store.alloc_from_mem_pool(size)
            if not base:
                raise RuntimeError("alloc_from_mem_pool returned 0")
        else:
            self._keep = (ctypes.c_char * size)()
            base = ctypes.addressof(self._keep)
        if self.store.register_buffer(base, size) != 0:
            raise RuntimeError("register_buffer failed")
        self.src, self.dst = base, base + max_size
        return {"setup_s": time.perf_counter() - t0}

    def case(self, api: str, size: int, n: int, prefix: str) -> dict[str, Any]:
        value = os.urandom(size)
        if api == "zcopy":
            ctypes.memmove(self.src, value, size)
        keys = [f"{prefix}{i}" for i in range(n)]
        put_ns: list[int] = []
        get_ns: list[int] = []
        fails = 0
        s = self.store
        for k in keys:
            t = time.perf_counter_ns()
            rc = s.put(k, value) if api == "bytes" else s.put_from(k, self.src, size)
            put_ns.append(time.perf_counter_ns() - t)
            fails += rc != 0
        got: Any = b""
        for k in keys:
            t = time.perf_counter_ns()
            if api == "bytes":
                got = s.get(k)
                ok = len(got) == size
            else:
                ok = s.get_into(k, self.dst, size) == size
            get_ns.append(time.perf_counter_ns() - t)
            fails += not ok
        if api == "zcopy":
            got = ctypes.string_at(self.dst, size)
        verified = got == value
        for k in keys:
            s.remove(k, True)
        return {
            "put_us": statistics.median(put_ns) / 1e3,
            "get_us": statistics.median(get_ns) / 1e3,
            "fails": fails,
            "verified": verified,
        }

    def close(self) -> None:
        if self.ready:
            self.store.close()


def worker_main() -> int:
    reply = C.reply_channel()
    w = Worker()
    return C.serve_commands(reply, {"setup": w.setup, "case": w.case}, w.close)


# ================================================================= driver role


def start_real(
    impl: str, python: str, env: dict[str, str], rpc: int, meta: int, log: Path
) -> tuple[C.Child, str]:
    """The standalone mooncake_client of ``impl``; returns it and its dummy address."""
    port = C.free_ports(1)[0]
    argv = [
        C.script_next_to(python, "mooncake_client"),
        f"--host={C.HOST}",
        f"--port={port}",
        f"--master_server_address={C.HOST}:{rpc}",
        f"--metadata_server=http://{C.HOST}:{meta}/metadata",
        f"--global_segment_size={SEGMENT}",
    ]
    child = C.Child(argv, env=env, log_stem=log)
    deadline = time.monotonic() + 90
    while child.poll() is None and time.monotonic() < deadline:
        if impl == "py":
            m = child.wait_for(DUMMY_READY, 1)
            if m is not None:
                return child, f"{C.HOST}:{port}"
        elif C.port_open(port):
            time.sleep(0.5)  # its store client finishes setting up before the RPC server
            return child, f"{C.HOST}:{port}"
        else:
            time.sleep(0.1)
    tail = child.tail()
    child.stop()
    raise RuntimeError(f"{impl} mooncake_client did not start:\n{tail}")


def run_pass(impl: str, run: int, python: str, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"impl": impl, "run": run, "cases": []}
    env = {**C.env_for(impl), **C.STORE_WORKER_ENV}
    master = real = None
    workers: dict[str, C.JsonWorker] = {}
    try:
        master, rpc, meta = C.start_master(
            impl, python, env, a.lease_ms, tmp / f"{impl}{run}-master"
        )
        real, address = start_real(impl, python, env, rpc, meta, tmp / f"{impl}{run}-real")
        for kind in a.kinds:
            workers[kind] = w = C.JsonWorker(
                f"{impl} {kind} (run {run + 1})",
                [python, str(Path(__file__).resolve()), "--worker"],
                env,
                tmp / f"{impl}{run}-{kind}.err",
            )
            res[f"setup_{kind}"] = w.call(
                "setup",
                120,
                kind=kind,
                address=address,
                master=f"{C.HOST}:{rpc}",
                metadata=f"http://{C.HOST}:{meta}/metadata",
                max_size=max(a.sizes),
            )
            w.call("case", 60, api="bytes", size=4 * C.KiB, n=20, prefix=f"{kind}-warm-")
        for api in a.apis:
            for size in a.sizes:
                n = a.keys[size]
                for kind in a.kinds:
                    r = workers[kind].call(
                        "case",
                        C.phase_timeout(2 * n * size),
                        api=api,
                        size=size,
                        n=n,
                        prefix=f"{impl}{run}-{kind}-{api}-{size}-",
                    )
                    res["cases"].append({"kind": kind, "api": api, "size": size, "keys": n, **r})
                    bad = " FAILED CALLS" if r["fails"] else ""
                    bad += "" if r["verified"] else " VERIFY MISMATCH"
                    C.progress(
                        f"  {impl} {kind:6} {api:5} {C.size_label(size):>7} x{n}: put "
                        f"{r['put_us']:.0f} us, get {r['get_us']:.0f} us{bad}"
                    )
    except RuntimeError as exc:
        res["error"] = str(exc)
        C.log(f"{impl} run {run + 1} failed: {exc}")
    finally:
        for w in workers.values():
            w.stop()
        if real is not None:
            real.stop()
        if master is not None:
            master.stop()
    return res


def _medians(data: dict[str, Any]) -> dict[str, Any]:
    """{(impl, kind, api, size, op): summary of per-run medians (us)}, as nested dicts."""
    out: dict[str, Any] = {}
    for run in data["runs"]:
        for c in run["cases"]:
            for op in ("put", "get"):
                key = f"{run['impl']}/{c['kind']}/{c['api']}/{c['size']}/{op}"
                out.setdefault(key, []).append(c[f"{op}_us"])
    return {k: C.summary(v) for k, v in out.items()}


def render(data: dict[str, Any]) -> str:
    med = data["summary"]
    a = data["config"]
    cols = [(impl, kind) for impl in a["impls"] for kind in a["kinds"]]
    header = [
        "api",
        "op",
        "size",
        *[f"{impl} {kind} (us)" for impl, kind in cols],
        "py dummy vs py normal",
        "py dummy vs ref dummy",
        "MB/s py dummy",
    ]
    rows = []
    for api in a["apis"]:
        for op in ("put", "get"):
            for size in a["sizes"]:
                cells = [med.get(f"{impl}/{kind}/{api}/{size}/{op}") for impl, kind in cols]
                py_dummy = med.get(f"py/dummy/{api}/{size}/{op}")
                rn = C.ratio(med.get(f"py/normal/{api}/{size}/{op}"), py_dummy)
                rr = C.ratio(med.get(f"ref/dummy/{api}/{size}/{op}"), py_dummy)
                mbs = size / py_dummy["median"] if py_dummy else None
                rows.append(
                    [
                        {"bytes": "put/get", "zcopy": "put_from/get_into"}[api],
                        op,
                        C.size_label(size),
                        *[C.cell(c, "{:.0f}") for c in cells],
                        f"{rn:.2f}x" if rn else "-",
                        f"{rr:.2f}x" if rr else "-",
                        f"{mbs:.0f}" if mbs else "-",
                    ]
                )
    note = (
        "Median latency of single-key calls (median over runs, min-max); a ratio is the "
        "other's latency / py dummy's (> 1: the pymooncake dummy is faster). Normal = a "
        "full client without a segment, writing into the same mooncake_client's segment."
    )
    return "\n\n".join(
        [
            "## Dummy clients: put/get through a standalone mooncake_client",
            C.markdown_table(header, rows),
            note,
            C.machine_line(data),
        ]
    )


def driver_main(a: argparse.Namespace) -> int:
    pythons = {impl: C.python_for(impl) for impl in a.impls}
    data: dict[str, Any] = {
        "bench": "dummy_bench",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": C.machine_info(),
        "config": {
            "runs": a.runs,
            "impls": a.impls,
            "kinds": a.kinds,
            "apis": a.apis,
            "sizes": a.sizes,
            "keys": {str(s): a.keys[s] for s in a.sizes},
            "segment_bytes": SEGMENT,
            "local_buffer_bytes": LOCAL_BUFFER,
            "mem_pool_bytes": POOL,
            "lease_ms": a.lease_ms,
            "ref_env": C.REF_ENV,
            "argv": a.argv,
        },
        "impls": {impl: C.impl_version(impl, py) for impl, py in pythons.items()},
        "runs": [],
    }
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="dummy_bench-"))
    try:
        with C.sigterm_as_interrupt():
            for r in range(a.runs):
                order = a.impls if r % 2 == 0 else list(reversed(a.impls))
                for impl in order:
                    C.progress(f"run {r + 1}/{a.runs}: {impl}")
                    t0 = time.monotonic()
                    res = run_pass(impl, r, pythons[impl], a, tmp)
                    res["wall_s"] = time.monotonic() - t0
                    data["runs"].append(res)
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
    data["summary"] = _medians(data)
    C.publish("dummy_bench", data, render(data))
    failed = any(
        "error" in r or any(c["fails"] or not c["verified"] for c in r["cases"])
        for r in data["runs"]
    )
    return 130 if data.get("interrupted") else (1 if failed else 0)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=3, help="repetitions per impl (default 3)")
    p.add_argument("--impl", default="py,ref", help="py,ref (default both)")
    p.add_argument("--kinds", default="dummy,normal", help="dummy,normal (default both)")
    p.add_argument("--apis", default=",".join(APIS), help="bytes,zcopy (default both)")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"value sizes (default {DEFAULT_SIZES})")
    p.add_argument("--quick", action="store_true", help="1 run, a third of the keys")
    p.add_argument("--lease-ms", type=int, default=100, help="master --default_kv_lease_ttl")
    p.add_argument("--keep-logs", action="store_true", help="keep every child's log")
    a = p.parse_args(argv)
    a.argv = argv
    if a.worker:
        return a
    a.impls = C.parse_list(a.impl, IMPLS)
    a.kinds = C.parse_list(a.kinds, KINDS)
    a.apis = C.parse_list(a.apis, APIS)
    a.sizes = [C.parse_size(s) for s in C.parse_list(a.sizes)]
    scale = 3 if a.quick else 1
    if a.quick:
        a.runs = 1
    a.keys = {s: max(8, DEFAULT_KEYS.get(s, max(8, (64 * C.MiB) // s)) // scale) for s in a.sizes}
    for s in a.sizes:
        if s > LOCAL_BUFFER // 2 or a.keys[s] * s > SEGMENT // 2:
            p.error(f"value {C.size_label(s)} is too large for this bench's buffers")
    return a


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if a.worker:
        return worker_main()
    return driver_main(a)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (RuntimeError, ValueError) as exc:
        print(f"dummy_bench: {exc}", file=sys.stderr)
        sys.exit(1)
