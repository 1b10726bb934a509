"""Tensor bench: tensor put/get throughput, pymooncake vs the reference, in one run.

Two roles in one file, like ``store_bench.py``:

* **driver** (default): per implementation and run, starts that implementation's
  ``mooncake_master`` (embedded HTTP metadata server), a putter worker A (a 2 GiB
  segment) and a getter worker B (no segment), under that implementation's
  interpreter (the reference with ``MC_FORCE_TCP=1``; both with
  ``MC_TCP_BIND_ADDRESS=127.0.0.1``).  Tensors live in A's segment; B reads them over
  TCP ("2proc"), A reads its own ("1proc").  Implementations alternate run by run
  (ref, py, py, ref ...).  Prints markdown tables and writes
  ``bench/results/tensor_bench-<timestamp>.json`` (+ ``tensor_bench-latest.json``).
* **worker** (``--worker``): imports torch and ``mooncake.store``.  The reference venv
  has no torch of its own: the driver hands it this venv's site-packages with
  ``--torch-path`` (appended to ``sys.path``, so ``mooncake`` stays the reference's).

APIs (int32 tensors of 1 MiB .. 256 MiB, shape (rows, 1024); n = clamp(case bytes /
size, 4, 64) keys per case):

* ``tensor``: ``put_tensor`` / ``get_tensor`` (the reference stages reads through its
  local buffer, 512 MiB here, and copies out);
* ``into``: ``put_tensor_from`` a registered buffer holding the object /
  ``get_tensor_into`` a registered buffer (zero-copy on both sides);
* ``tp4``: ``put_tensor_with_tp`` (4 shards along dim 0) / ``get_tensor_with_tp`` of
  every rank.

GB/s = 10^9 tensor payload bytes / wall time of the whole phase, timed inside the
worker around the API calls only.  Every case checks the first tensor it read.

Usage::

    python bench/tensor_bench.py                   # 3 runs x both impls
    python bench/tensor_bench.py --quick           # 1 run, 1/16/256 MiB, fewer keys
    python bench/tensor_bench.py --impl py --sizes 4M,64M --apis tensor
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

IMPLS = ("ref", "py")
IMPL_ENV: dict[str, dict[str, str]] = {"ref": {}, "py": {}}
SCENARIOS = ("2proc", "1proc")
APIS = ("tensor", "into", "tp4")
DEFAULT_SIZES = "1M,4M,16M,64M,256M"
QUICK_SIZES = "1M,16M,256M"
HEADER = 304  # the tensor object's metadata
COLS = 1024  # int32 columns: a tensor is (size / 4096, 1024)


def keys_for(size: int, case_bytes: int, max_keys: int) -> int:
    return min(max_keys, max(4, case_bytes // size))


# ================================================================= worker role


class TensorWorker:
    """One store client (A or B), a registered buffer, one method per command."""

    def __init__(self, buffer_bytes: int, torch_path: str) -> None:
        if torch_path:
            sys.path.append(torch_path)
        import torch

        from mooncake.store import MooncakeDistributedStore

        self.torch = torch
        self.store = MooncakeDistributedStore()
        self.size = buffer_bytes
        self.mm = mmap.mmap(-1, buffer_bytes)
        self._cbuf: Any = ctypes.c_char.from_buffer(self.mm)
        self.base = ctypes.addressof(self._cbuf)
        self.registered = False
        self.is_setup = False
        self.source: dict[int, Any] = {}

    def setup(
        self, role: str, segment: int, local_buffer: int, metadata: str, master: str
    ) -> dict[str, Any]:
        ctypes.memset(self.base, 0, self.size)  # fault the buffer in before anything is timed
        t0 = time.perf_counter()
        rc = self.store.setup(C.HOST, metadata, segment, local_buffer, "tcp", "", master)
        if rc != 0:
            return {"error": f"setup returned {rc} (master {master}, metadata {metadata})"}
        self.is_setup = True
        if self.store.register_buffer(self.base, self.size) != 0:
            return {"error": f"register_buffer({self.size}) failed"}
        self.registered = True
        import mooncake.store as ms

        return {
            "setup_s": time.perf_counter() - t0,
            "module": getattr(ms, "__file__", "?"),
            "torch": self.torch.__version__,
        }

    def _tensor(self, size: int) -> Any:
        t = self.source.get(size)
        if t is None:
            t = self.torch.arange(size // 4, dtype=self.torch.int32).reshape(-1, COLS)
            self.source = {size: t}  # one size at a time
        return t

    def put(self, api: str, size: int, n: int, prefix: str) -> dict[str, Any]:
        st = self.store
        t = self._tensor(size)
        fails = 0
        if api == "into":  # lay the object out once in the registered buffer
            import mooncake.store as ms

            meta, ptr, nbytes, _owner = ms._serialize_tensor(t)
            ctypes.memmove(self.base, meta, HEADER)
            ctypes.memmove(self.base + HEADER, ptr, nbytes)
        t0 = time.perf_counter()
        for i in range(n):
            key = f"{prefix}{i}"
            if api == "tensor":
                rc = st.put_tensor(key, t)
            elif api == "into":
                rc = st.put_tensor_from(key, self.base, HEADER + size)
            else:
                rc = st.put_tensor_with_tp(key, t, tp_size=4, split_dim=0)
            fails += rc != 0
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "gbps": n * size / wall / 1e9, "fails": fails}

    def get(self, api: str, size: int, n: int, prefix: str) -> dict[str, Any]:
        st, torch = self.store, self.torch
        fails = 0
        first = None
        slot = HEADER + size
        slots = max(1, self.size // slot)
        t0 = time.perf_counter()
        for i in range(n):
            key = f"{prefix}{i}"
            if api == "tensor":
                got = st.get_tensor(key)
            elif api == "into":
                got = st.get_tensor_into(key, self.base + (i % slots) * slot, slot)
            else:
                parts = [st.get_tensor_with_tp(key, r, 4, 0) for r in range(4)]
                got = None if any(p is None for p in parts) else parts
            if got is None:
                fails += 1
            elif first is None:
                first = got
        wall = time.perf_counter() - t0
        ok = False
        if first is not None:
            want = torch.arange(size // 4, dtype=torch.int32).reshape(-1, COLS)
            ok = bool(torch.equal(torch.cat(first, 0) if isinstance(first, list) else first, want))
        return {"wall_s": wall, "gbps": n * size / wall / 1e9, "fails": fails, "verified": ok}

    def remove(self, prefix: str, n: int, tp: bool) -> dict[str, Any]:
        bad = 0
        for i in range(n):
            for key in [f"{prefix}{i}_tp_{r}" for r in range(4)] if tp else [f"{prefix}{i}"]:
                bad += self.store.remove(key, True) != 0
        return {"failed": bad}

    def close(self) -> None:
        if self.registered:
            self.store.unregister_buffer(self.base)
        if self.is_setup:
            self.store.close()
        del self._cbuf
        self.mm.close()


def worker_main(a: argparse.Namespace) -> int:
    reply = C.reply_channel()
    w = TensorWorker(a.buffer_bytes, a.torch_path)
    return C.serve_commands(
        reply, {"setup": w.setup, "put": w.put, "get": w.get, "remove": w.remove}, w.close
    )


# ================================================================= driver role


def torch_path(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import sysconfig, torch; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode != 0:
        raise RuntimeError(
            f"{python} has no torch: pip install torch (it is lent to the reference's workers)"
        )
    return out.stdout.strip()


def run_impl(impl: str, run: int, python: str, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"impl": impl, "run": run, "cases": []}
    procs = C.StorePass(impl, run, python, IMPL_ENV[impl], a.lease_ms, tmp / f"{impl}-{run}")
    try:
        A, B = procs.start_workers(
            [str(Path(__file__).resolve()), "--worker", f"--torch-path={a.torch_path}"],
            label="tensor worker",
            buffer_bytes=a.buffer_bytes,
            batch=1,
            segment_bytes=a.segment_bytes,
            local_buffer_bytes=a.local_buffer_bytes,
            into=res,
        )
        # connect B to A's segment before anything is timed
        A.call("put", 120, api="tensor", size=C.MiB, n=1, prefix=f"{procs.tag}-warm")
        B.call("get", 120, api="tensor", size=C.MiB, n=1, prefix=f"{procs.tag}-warm")
        A.call("remove", 60, prefix=f"{procs.tag}-warm", n=1, tp=False)
        for scen in a.scenarios:
            getter = B if scen == "2proc" else A
            for api in a.apis:
                for size in a.sizes:
                    n = keys_for(size, a.case_bytes, a.max_keys)
                    prefix = f"{procs.tag}-{scen}-{api}-{size}-"
                    put = A.call(
                        "put", C.phase_timeout(n * size), api=api, size=size, n=n, prefix=prefix
                    )
                    get = getter.call(
                        "get", C.phase_timeout(n * size), api=api, size=size, n=n, prefix=prefix
                    )
                    A.call("remove", 120, prefix=prefix, n=n, tp=api == "tp4")
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
                    flag = (" FAILED CALLS" if put["fails"] or get["fails"] else "") + (
                        "" if get["verified"] else " VERIFY MISMATCH"
                    )
                    C.log(
                        f"  {impl} {scen} {api:6} {C.size_label(size):>8} x{n}: put {put['gbps']:.3f} "
                        f"get {get['gbps']:.3f} GB/s{flag}"
                    )
    except RuntimeError as exc:
        res["error"] = str(exc)
        C.log(f"{impl} run {run + 1} failed: {exc}")
    finally:
        procs.stop()
    return res


def summarize(data: dict[str, Any]) -> None:
    out: dict[str, Any] = {}
    for r in data["runs"]:
        for c in r.get("cases", []):
            k = f"{c['scenario']}/{c['api']}/{c['size']}"
            slot = out.setdefault(k, {}).setdefault(r["impl"], {"put": [], "get": []})
            if not c["put"]["fails"]:
                slot["put"].append(c["put"]["gbps"])
            if not c["get"]["fails"] and c["get"]["verified"]:
                slot["get"].append(c["get"]["gbps"])
    data["summary"] = {
        k: {impl: {op: C.summary(v) for op, v in ops.items()} for impl, ops in by_impl.items()}
        for k, by_impl in out.items()
    }


def render(data: dict[str, Any]) -> str:
    cfg = data["config"]
    lines = [
        f"Tensor put/get throughput, GB/s (median (min-max) of {cfg['runs']} run(s); int32 tensors; "
        "py/ref > 1 means pymooncake is faster)",
        "",
    ]
    impls = cfg["impls"]
    for scen in cfg["scenarios"]:
        header = ["api", "size", "keys"]
        for op in ("put", "get"):
            header += [f"{op} {impl}" for impl in impls] + (
                [f"{op} py/ref"] if "ref" in impls and "py" in impls else []
            )
        rows = []
        for api in cfg["apis"]:
            for size in cfg["sizes"]:
                s = data["summary"].get(f"{scen}/{api}/{size}", {})
                row = [api, C.size_label(size), str(cfg["keys"][str(size)])]
                for op in ("put", "get"):
                    row += [C.cell(s.get(impl, {}).get(op)) for impl in impls]
                    if "ref" in impls and "py" in impls:
                        r = C.ratio(s.get("py", {}).get(op), s.get("ref", {}).get(op))
                        row.append("-" if r is None else f"{r:.2f}")
                rows.append(row)
        lines += [
            f"### {scen} ({'getter B reads A over TCP' if scen == '2proc' else 'A reads its own segment'})",
            "",
            C.markdown_table(header, rows),
            "",
        ]
    errs = [f"{r['impl']} run {r['run'] + 1}" for r in data["runs"] if "error" in r]
    if errs:
        lines.append(f"FAILED runs (see JSON runs[].error): {', '.join(errs)}")
    lines.append(C.machine_line(data))
    return "\n".join(lines)


def driver_main(a: argparse.Namespace) -> int:
    pythons = {impl: C.python_for(impl) for impl in a.impls}
    a.torch_path = torch_path(C.py_python())
    for py in pythons.values():
        C.script_next_to(py, "mooncake_master")
    data: dict[str, Any] = {
        "bench": "tensor_bench",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": C.machine_info(),
        "config": {
            "runs": a.runs,
            "impls": a.impls,
            "scenarios": a.scenarios,
            "apis": a.apis,
            "sizes": a.sizes,
            "keys": {str(s): keys_for(s, a.case_bytes, a.max_keys) for s in a.sizes},
            "segment_bytes": a.segment_bytes,
            "local_buffer_bytes": a.local_buffer_bytes,
            "buffer_bytes": a.buffer_bytes,
            "lease_ms": a.lease_ms,
            "ref_env": C.REF_ENV,
            "worker_env": C.STORE_WORKER_ENV,
            "argv": a.argv,
        },
        "impls": {impl: C.impl_version(impl, py) for impl, py in pythons.items()},
        "runs": [],
    }
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="tensor_bench-"))
    try:
        with C.sigterm_as_interrupt():
            for r in range(a.runs):
                order = a.impls if r % 2 == 0 else list(reversed(a.impls))
                for impl in order:
                    C.log(f"run {r + 1}/{a.runs}: {impl} ({pythons[impl]})")
                    t0 = time.monotonic()
                    res = run_impl(impl, r, pythons[impl], a, tmp)
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
    summarize(data)
    C.publish("tensor_bench", data, render(data))
    failed = any("error" in r for r in data["runs"])
    return 130 if data.get("interrupted") else (1 if failed else 0)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--torch-path", default="", help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=3, help="repetitions per impl (default 3)")
    p.add_argument("--impl", default="ref,py", help="ref,py (default both)")
    p.add_argument(
        "--quick", action="store_true", help=f"1 run, sizes {QUICK_SIZES}, at most 8 keys per case"
    )
    p.add_argument("--sizes", default=None, help=f"tensor sizes (default {DEFAULT_SIZES})")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="2proc,1proc (default both)")
    p.add_argument("--apis", default=",".join(APIS), help="tensor,into,tp4 (default all)")
    p.add_argument(
        "--case-mib",
        type=int,
        default=1024,
        help="bytes per case = this / size, 4..max-keys keys (1024)",
    )
    p.add_argument("--max-keys", type=int, default=64, help="keys per case at most (64)")
    p.add_argument(
        "--lease-ms",
        type=int,
        default=5000,
        help="master --default_kv_lease_ttl (5000: a 256 MiB read over TCP must finish inside it)",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep every child's log")
    p.add_argument("--buffer-bytes", type=int, default=C.GiB, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)  # StorePass passes it
    a, _unknown = p.parse_known_args(argv)
    a.argv = argv
    if a.worker:
        return a
    if a.quick:
        a.runs = 1
        a.sizes = a.sizes or QUICK_SIZES
        a.max_keys = min(a.max_keys, 8)
    a.sizes = [C.parse_size(s) for s in C.parse_list(a.sizes or DEFAULT_SIZES)]
    a.impls = C.parse_list(a.impl, IMPLS)
    a.scenarios = C.parse_list(a.scenarios, SCENARIOS)
    a.apis = C.parse_list(a.apis, APIS)
    a.case_bytes = a.case_mib * C.MiB
    a.segment_bytes = 2 * C.GiB
    a.local_buffer_bytes = 512 * C.MiB
    for s in a.sizes:
        if s % (4 * COLS * 4) or s < 16 * C.KiB:
            p.error(
                f"size {s}: use a multiple of 16 KiB (int32 tensors of 1024 columns, tp4 along dim 0)"
            )
        if keys_for(s, a.case_bytes, a.max_keys) * s > a.segment_bytes * 0.8:
            p.error(
                f"size {C.size_label(s)}: a case would not fit the 2 GiB segment; lower --case-mib"
            )
        if HEADER + s > a.buffer_bytes:
            p.error(f"size {C.size_label(s)}: larger than the 1 GiB registered buffer")
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
        print(f"tensor_bench: {exc}", file=sys.stderr)
        sys.exit(1)
