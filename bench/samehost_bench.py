"""Same-host bench: pymooncake's same-host transport vs TCP loopback vs the reference.

One command measures, implementations interleaved run by run:

1. **memcpy baseline** (our venv): single-thread copy of 256 MiB between two pre-faulted
   buffers, ``numpy.copyto`` and ``ctypes.memmove``, several copies per run.
2. **Transfer Engine**, two processes on this host (``--role te-worker`` starts its own
   ``--role te-target`` child): the target registers a pre-faulted 1 GiB buffer, either
   ``allocate_managed_buffer`` (ours: a memfd, so same-host transfers are one ``memmove``
   through a shared mapping) or a plain ``bytearray`` + ``register_memory`` (ours: copied
   with ``process_vm_readv/writev``); the initiator registers a pre-faulted 1 GiB buffer
   (ctypes over anonymous memory) and times ``batch_transfer_sync_write/read`` of 64 KiB,
   1 MiB, 4 MiB, 16 MiB blocks (128 per call, 32 for 16 MiB), one thread.
3. **Store same-host get**: ``mooncake_master`` (HTTP metadata server embedded), putter A
   (2 GiB segment) and getter B (no segment); A warms its segment, puts n objects of
   1 / 8 / 32 MiB, B times ``get_into``, ``batch_get_into`` (32 keys per call) and ``get``
   (bytes) of all of them and compares the first object byte for byte.

Variants: ``py`` = pymooncake with its same-host transport (``PYMOONCAKE_SAME_HOST=1``),
``pytcp`` = pymooncake with ``PYMOONCAKE_SAME_HOST=0`` (TCP loopback), ``ref`` = the
reference wheel (``MC_FORCE_TCP=1``; it moves same-host data over TCP loopback). The
workers import only ``mooncake.engine`` / ``mooncake.store``, so the same code runs under
both interpreters. Goals: ours same-host >= 70 % of single-thread memcpy (Transfer Engine,
blocks >= 1 MiB) and ours same-host store get >= 5 x the reference's.

Usage::

    python bench/samehost_bench.py                     # 3 runs, everything (~5.5 min)
    python bench/samehost_bench.py --quick             # 1 run, shorter cases (~70 s)
    python bench/samehost_bench.py --impl py,ref --parts te --runs 5

GB/s = 10^9 payload bytes / wall time of the timed loop (TE: a case; store: a phase).
Markdown tables on stdout, progress on stderr, JSON in
``bench/results/samehost_bench-<timestamp>.json`` and ``samehost_bench-latest.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C

VARIANTS = ("py", "pytcp", "ref")
#: on top of _common.env_for: the switch of our same-host transport
VARIANT_ENV: dict[str, dict[str, str]] = {
    "py": {"PYMOONCAKE_SAME_HOST": "1"},
    "pytcp": {"PYMOONCAKE_SAME_HOST": "0"},
    "ref": {},
}
LABEL = {"py": "ours same-host", "pytcp": "ours TCP", "ref": "ref TCP"}
PARTS = ("memcpy", "te", "store")
TE_MODES = ("managed", "plain")
MODE_LABEL = {"managed": "memfd target", "plain": "plain target"}
OPS = ("write", "read")
GET_APIS = ("get_into", "batch_get_into", "get")
TE_BUFFER = C.GiB
STORE_BUFFER = C.GiB
LOCAL_BUFFER = 512 * C.MiB  # anchor: setup(..., local_buffer_size=512 MiB, ...)
WARM_OBJ = 32 * C.MiB
WARM_FRACTION = 0.75  # of A's segment, written once (and read once by B) before timing
#: pending + next phase may use this share of A's segment (master evicts at 90 %)
SEGMENT_BUDGET = 0.8
GOAL_MEMCPY = 0.7
PROBE_KEYS = 256
PROBE_APIS = ("is_exist", "get_into", "get")
FRESH_SIZES = (C.MiB, 32 * C.MiB)
GOAL_STORE_X_REF = 5.0


def keys_for(size: int, a: argparse.Namespace) -> int:
    """n = min(512, max(32, 512 MiB / size)) (the anchor's rule with a 512-key cap)."""
    return min(a.max_keys, max(32, a.case_bytes // size))


def _addr_of(obj: Any, size: int) -> tuple[Any, int]:
    """(ctypes view that keeps ``obj`` exported, its address)."""
    view = (ctypes.c_char * size).from_buffer(obj)
    return view, ctypes.addressof(view)


def _shm_stats(engine: Any) -> dict[str, int] | None:
    """Counters of our same-host transport (None under the reference or if absent)."""
    native = getattr(engine, "native", None)
    if native is None:
        return None
    try:
        return dict(native.transport("shm").stats)
    except Exception:  # a diagnostic only: never fail the bench on it
        return None


def _stats_delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int]:
    if before is None or after is None:
        return {}
    return {k: after[k] - before.get(k, 0) for k in after}


def path_of(delta: dict[str, int] | None) -> str:
    """Which path moved the slices, from the shm counters' delta ('tcp' without counters)."""
    if not delta:
        return "tcp"
    used = [
        name
        for key, name in (
            ("slices_mapped", "memfd"),
            ("slices_pvm", "process_vm"),
            ("slices_fallback", "tcp-fallback"),
        )
        if delta.get(key)
    ]
    return "+".join(used) or "tcp"


# ================================================================= memcpy role


def memcpy_main(a: argparse.Namespace) -> int:
    reply = C.reply_channel()
    import numpy as np

    n = a.memcpy_bytes
    src = np.empty(n, dtype=np.uint8)
    dst = np.empty(n, dtype=np.uint8)
    src.fill(0x5A)  # pre-fault both
    dst.fill(0)
    sp, dp = src.ctypes.data, dst.ctypes.data
    np.copyto(dst, src)  # untimed
    # the same copy between plain anonymous mmaps: numpy madvises huge pages for big arrays,
    # these get 4 KiB pages (THP is madvise-only here), like the TE bench's buffers
    msrc, mdst = mmap.mmap(-1, n), mmap.mmap(-1, n)
    vsrc, msp = _addr_of(msrc, n)
    vdst, mdp = _addr_of(mdst, n)
    ctypes.memset(msp, 0x5A, n)
    ctypes.memset(mdp, 0, n)
    ctypes.memmove(mdp, msp, n)  # untimed
    res: dict[str, list[float]] = {"numpy": [], "memmove": [], "memmove_4k": [], "pvm": []}
    clock = time.perf_counter
    pvm = _PvmRead()
    for _ in range(a.copies):
        t0 = clock()
        np.copyto(dst, src)
        res["numpy"].append(n / (clock() - t0) / 1e9)
        t0 = clock()
        ctypes.memmove(dp, sp, n)
        res["memmove"].append(n / (clock() - t0) / 1e9)
        t0 = clock()
        ctypes.memmove(mdp, msp, n)
        res["memmove_4k"].append(n / (clock() - t0) / 1e9)
        if pvm.ok:  # the kernel's copy between processes, here within one process
            t0 = clock()
            pvm.read(mdp, msp, n)
            res["pvm"].append(n / (clock() - t0) / 1e9)
    # what a bytes-API get must do at least: copy into a fresh bytes object
    fresh: dict[str, float] = {}
    for sz in FRESH_SIZES:
        k = max(8, 256 * C.MiB // sz)
        ctypes.string_at(sp, sz)  # untimed
        t0 = clock()
        for i in range(k):
            ctypes.string_at(sp + (i * sz) % n, sz)
        fresh[str(sz)] = k * sz / (clock() - t0) / 1e9
    del vsrc, vdst
    out: dict[str, Any] = {
        "bytes": n,
        "copies": a.copies,
        "raw": res,
        "fresh_bytes_gbps": fresh,
        "anon_huge_kib": {"numpy": _thp_of(sp + n // 2), "mmap": _thp_of(msp + n // 2)},
    }
    for k, v in res.items():
        if v:
            out[f"{k}_avg"] = statistics.mean(v)
            out[f"{k}_best"] = max(v)
    if not pvm.ok:
        out["pvm_error"] = pvm.error
    reply.write("RESULT " + json.dumps(out) + "\n")
    return 0


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _PvmRead:
    """``process_vm_readv`` of our own pid in 16 MiB iovecs: the kernel copy that ours'
    same-host transport uses for memory that is not a memfd."""

    CHUNK = 16 * C.MiB

    def __init__(self) -> None:
        self.ok, self.error = False, ""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.process_vm_readv
        except (OSError, AttributeError) as exc:
            self.error = str(exc)
            return
        fn.restype = ctypes.c_ssize_t
        fn.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_ulong,
            ctypes.c_void_p,
            ctypes.c_ulong,
            ctypes.c_ulong,
        ]
        self.fn, self.pid, self.ok = fn, os.getpid(), True

    def read(self, dst: int, src: int, n: int) -> None:
        for off in range(0, n, self.CHUNK):
            k = min(self.CHUNK, n - off)
            loc, rem = _IoVec(dst + off, k), _IoVec(src + off, k)
            got = self.fn(self.pid, ctypes.byref(loc), 1, ctypes.byref(rem), 1, 0)
            if got != k:
                self.ok, self.error = False, os.strerror(ctypes.get_errno())
                return


def _thp_of(addr: int) -> int | None:
    """AnonHugePages (KiB) of the mapping that holds ``addr`` (/proc/self/smaps)."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return None
    inside = False
    for line in text.splitlines():
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            inside = int(m.group(1), 16) <= addr < int(m.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return None


# ================================================================= Transfer Engine roles


def te_target_main(a: argparse.Namespace) -> int:
    """``initialize`` (P2PHANDSHAKE), one pre-faulted buffer, ``READY <port> <addr>``,
    serve until stdin closes."""
    reply = C.reply_channel()
    from mooncake.engine import TransferEngine

    te = TransferEngine()
    if te.initialize(C.HOST, "P2PHANDSHAKE", "tcp", "") != 0:
        print("te-target: initialize failed", file=sys.stderr, flush=True)
        return 1
    size = a.size
    keep: Any = None
    if a.target_mode == "managed":
        addr = te.allocate_managed_buffer(size)
        if not addr:
            print("te-target: allocate_managed_buffer failed", file=sys.stderr, flush=True)
            return 1
    else:
        buf = bytearray(size)
        keep, addr = _addr_of(buf, size)
        if te.register_memory(addr, size) != 0:
            print("te-target: register_memory failed", file=sys.stderr, flush=True)
            return 1
    ctypes.memset(addr, 0xA5, size)  # pre-fault the whole buffer
    reply.write(f"READY {te.get_rpc_port()} {addr}\n")
    sys.stdin.read()  # serve until the worker closes our stdin (or dies)
    if a.target_mode == "managed":
        te.free_managed_buffer(addr, size)
    else:
        te.unregister_memory(addr)
    del keep
    if hasattr(te, "close"):  # pymooncake; the reference has no close()
        te.close()
    return 0


def _te_case(
    te: Any, seg: str, local: int, remote: int, op: str, block: int, a: argparse.Namespace
) -> dict[str, Any]:
    slots = C.batch_for(block)
    fn = te.batch_transfer_sync_write if op == "write" else te.batch_transfer_sync_read
    locs = [local + i * block for i in range(slots)]
    rems = [remote + i * block for i in range(slots)]
    lens = [block] * slots
    rc = fn(seg, locs, rems, lens)  # untimed: first-call effects
    if rc != 0:
        return {"op": op, "block": block, "error": f"untimed first call returned {rc}"}
    st0 = _shm_stats(te)
    calls = 0
    clock = time.perf_counter
    t0 = clock()
    deadline = t0 + a.duration
    while True:
        rc = fn(seg, locs, rems, lens)
        if rc != 0:
            break
        calls += 1
        if calls >= a.max_calls or clock() >= deadline:
            break
    wall = clock() - t0
    delta = _stats_delta(st0, _shm_stats(te))
    res: dict[str, Any] = {
        "op": op,
        "block": block,
        "batch": slots,
        "calls": calls,
        "wall_s": wall,
        "gbps": calls * slots * block / wall / 1e9,
        "ms_per_call": wall / max(calls, 1) * 1e3,
        "shm_delta": delta,
        "path": path_of(delta) if st0 is not None else "tcp",
    }
    if rc != 0:
        res["error"] = f"call {calls + 1} returned {rc}"
    return res


def te_worker_main(a: argparse.Namespace) -> int:
    reply = C.reply_channel()
    import mooncake.engine as me

    result: dict[str, Any] = {
        "module": getattr(me, "__file__", "?"),
        "python": sys.version.split()[0],
        "target_mode": a.target_mode,
        "cases": [],
    }
    t_setup = time.perf_counter()
    target = C.spawn_target(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--role=te-target",
            f"--target-mode={a.target_mode}",
            f"--size={a.size}",
        ]
    )
    te: Any = None
    local = 0
    mm: mmap.mmap | None = None
    keep: Any = None
    try:
        port, target_addr = C.read_ready(target, 90)
        seg = f"{C.HOST}:{port}"
        te = me.TransferEngine()
        if te.initialize(C.HOST, "P2PHANDSHAKE", "tcp", "") != 0:
            raise RuntimeError("initiator initialize failed")
        mm = mmap.mmap(-1, a.size)
        keep, local = _addr_of(mm, a.size)
        ctypes.memset(local, 0x5A, a.size)  # pre-fault
        if te.register_memory(local, a.size) != 0:
            raise RuntimeError("initiator register_memory failed")
        first = te.get_first_buffer_address(seg)
        result["first_buffer_is_target_buffer"] = first == target_addr
        remote = target_addr
        # warm-up (untimed): write the whole remote buffer (maps it, opens connections)
        chunk, n = 16 * C.MiB, 32
        for off in range(0, a.size - chunk * n + 1, chunk * n):
            offs = [off + i * chunk for i in range(n)]
            rc = te.batch_transfer_sync_write(
                seg, [local + x for x in offs], [remote + x for x in offs], [chunk] * n
            )
            if rc != 0:
                raise RuntimeError(f"warm-up write returned {rc}")
        # byte-for-byte round trip: write a pattern, read it back elsewhere
        st0 = _shm_stats(te)
        pattern = random.Random(C.PAT_SEED).randbytes(C.MiB)
        ctypes.memmove(local, pattern, len(pattern))
        ok = te.transfer_sync_write(seg, local, remote + 4096, len(pattern)) == 0
        ctypes.memset(local + 2 * C.MiB, 0, len(pattern))
        ok = ok and te.transfer_sync_read(seg, local + 2 * C.MiB, remote + 4096, len(pattern)) == 0
        result["verified"] = ok and ctypes.string_at(local + 2 * C.MiB, len(pattern)) == pattern
        delta = _stats_delta(st0, _shm_stats(te))
        result["verify_path"] = path_of(delta) if st0 is not None else "tcp"
        result["setup_s"] = time.perf_counter() - t_setup
        for op in a.ops:
            for block in a.blocks:
                res = _te_case(te, seg, local, remote, op, block, a)
                result["cases"].append(res)
                print(
                    f"  {op:5} {C.size_label(block):>7}: {res.get('gbps', 0):.3f} GB/s "
                    f"({res.get('path', '?')}) {res.get('error', '')}",
                    file=sys.stderr,
                    flush=True,
                )
        result["shm_stats_end"] = _shm_stats(te)
    except RuntimeError as exc:
        result["error"] = str(exc)
    finally:
        C.stop_target(target, 20)
        if te is not None and local:
            te.unregister_memory(local)
        if te is not None and hasattr(te, "close"):  # pymooncake; the reference has none
            te.close()
        del keep
        if mm is not None:
            with contextlib.suppress(BufferError):
                mm.close()
    reply.write("RESULT " + json.dumps(result) + "\n")
    return 1 if "error" in result else 0


# ================================================================= store worker role


class StoreWorker:
    """One store client (A or B) and its 1 GiB registered buffer; one method per command."""

    def __init__(self, buffer_bytes: int, lease_ms: int, batch: int) -> None:
        from mooncake.store import MooncakeDistributedStore

        self.store = MooncakeDistributedStore()
        self.size = buffer_bytes
        self.lease_s = lease_ms / 1000.0
        self.batch = batch
        self.mm = mmap.mmap(-1, buffer_bytes)
        self._view, self.base = _addr_of(self.mm, buffer_bytes)
        self.registered = False
        self.is_setup = False
        self.pending: list[dict[str, Any]] = []

    def setup(
        self, role: str, segment: int, local_buffer: int, metadata: str, master: str
    ) -> dict[str, Any]:
        if role == "A":  # the source of every put; faulted in now
            pat = C.pattern()
            for off in range(0, self.size, C.PAT_LEN):
                ctypes.memmove(self.base + off, pat, min(C.PAT_LEN, self.size - off))
        else:
            ctypes.memset(self.base, 0, self.size)
        t0 = time.perf_counter()
        rc = self.store.setup(C.HOST, metadata, segment, local_buffer, "tcp", "", master)
        if rc != 0:
            return {"error": f"setup(...) returned {rc} (master {master}, metadata {metadata})"}
        self.is_setup = True
        rc = self.store.register_buffer(self.base, self.size)
        if rc != 0:
            return {"error": f"register_buffer({self.size} bytes) returned {rc}"}
        self.registered = True
        import mooncake.store as ms

        return {"setup_s": time.perf_counter() - t0, "module": getattr(ms, "__file__", "?")}

    def _ptrs(self, n: int, size: int) -> list[int]:
        slots = max(1, self.size // size)
        return [self.base + (i % slots) * size for i in range(n)]

    def put(self, size: int, n: int, prefix: str) -> dict[str, Any]:
        """batch_put_from of ``n`` objects (object i from buffer slot i); object 0 marked."""
        ptrs = self._ptrs(n, size)
        ctypes.memmove(self.base, C.expected_value(C.MARKER_LEN, prefix), C.MARKER_LEN)
        keys = [f"{prefix}{i}" for i in range(n)]
        b = self.batch
        fails = first_rc = 0
        t0 = time.perf_counter()
        for j in range(0, n, b):
            for rc in self.store.batch_put_from(
                keys[j : j + b], ptrs[j : j + b], [size] * len(keys[j : j + b])
            ):
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

    def get(self, api: str, size: int, n: int, prefix: str, verify: bool = True) -> dict[str, Any]:
        ptrs = self._ptrs(n, size)
        keys = [f"{prefix}{i}" for i in range(n)]
        ctypes.memset(self.base, 0, size)  # a get that writes nothing cannot pass the check
        s = self.store
        before = self.shm_stats()
        fails = first_rc = 0
        first = b""
        lat: list[int] = []  # ns per call (per batch call for batch_get_into)
        add = lat.append
        clock = time.perf_counter_ns
        t0 = time.perf_counter()
        if api == "get_into":
            for k, p in zip(keys, ptrs, strict=True):
                c0 = clock()
                rc = s.get_into(k, p, size)
                add(clock() - c0)
                if rc != size:
                    fails += 1
                    first_rc = first_rc or rc
        elif api == "batch_get_into":
            b = self.batch
            for j in range(0, n, b):
                c0 = clock()
                rcs = s.batch_get_into(
                    keys[j : j + b], ptrs[j : j + b], [size] * len(keys[j : j + b])
                )
                add(clock() - c0)
                for rc in rcs:
                    if rc != size:
                        fails += 1
                        first_rc = first_rc or rc
        elif api == "is_exist":  # one master round trip, no data (probe only)
            for k in keys:
                c0 = clock()
                rc = s.is_exist(k)
                add(clock() - c0)
                if rc != 1:
                    fails += 1
                    first_rc = first_rc or rc
        elif api == "get":
            for k in keys:
                c0 = clock()
                v = s.get(k)
                add(clock() - c0)
                if len(v) != size:
                    fails += 1
                    first_rc = first_rc or -1
                if not first:
                    first = v
                del v
        else:
            raise ValueError(f"unknown get api {api!r}")
        wall = time.perf_counter() - t0
        delta = _stats_delta(before, self.shm_stats())
        if api in ("get_into", "batch_get_into"):
            first = ctypes.string_at(self.base, size)
        res: dict[str, Any] = {
            "wall_s": wall,
            "gbps": (n - fails) * size / wall / 1e9,
            "fails": fails,
            "first_rc": first_rc,
            "shm_delta": delta,
            "path": path_of(delta) if before is not None else "tcp",
            "p50_us": C.percentile(sorted(lat), 50) / 1e3,
            "p99_us": C.percentile(sorted(lat), 99) / 1e3,
        }
        if verify:
            res["verified"] = first == C.expected_value(size, prefix)
        return res

    def shm_stats(self) -> dict[str, int] | None:
        client = getattr(self.store, "_client", None)  # pymooncake's compat store only
        engine = getattr(client, "engine", None)
        if engine is None:
            return None
        try:
            return dict(engine.transport("shm").stats)
        except Exception:  # a diagnostic only
            return None

    def remove_now(self, prefix: str, n: int, timeout: float) -> dict[str, Any]:
        """Remove ``prefix0..n-1``, retrying refused ones (leases) until ``timeout`` s."""
        left = list(range(n))
        deadline = time.monotonic() + timeout
        last_rc = 0
        while True:
            still = []
            for i in left:
                rc = self.store.remove(f"{prefix}{i}")
                if rc not in (0, C.OBJECT_NOT_FOUND):
                    still.append(i)
                    last_rc = rc
            left = still
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        return {"leftover": len(left), "last_rc": last_rc}

    def add_pending(self, prefix: str, n: int, size: int) -> dict[str, Any]:
        now = time.monotonic()
        # a remove before the read lease has expired is refused: do not try earlier
        self.pending.append(
            {"prefix": prefix, "n": n, "size": size, "ready_at": now + self.lease_s + 0.3}
        )
        return {"pending": len(self.pending)}

    def cleanup(self, need: int, budget: int, timeout: float) -> dict[str, Any]:
        """Remove pending groups whose lease has expired; wait (bounded) for more only
        while pending bytes + ``need`` exceed ``budget``."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        leftover = 0
        while True:
            now = time.monotonic()
            for g in [g for g in self.pending if g["ready_at"] <= now]:
                r = self.remove_now(g["prefix"], g["n"], max(0.0, min(5.0, deadline - now)))
                leftover += r["leftover"]
                self.pending.remove(g)
            pending = sum(g["n"] * g["size"] for g in self.pending)
            now = time.monotonic()
            if not self.pending or pending + need <= budget or now >= deadline:
                break
            nxt = min(g["ready_at"] for g in self.pending)
            time.sleep(max(0.01, min(nxt - now, deadline - now)))
        return {"leftover": leftover, "pending_bytes": pending, "wall_s": time.monotonic() - t0}

    def close(self) -> None:
        if self.registered:
            self.store.unregister_buffer(self.base)
        if self.is_setup and hasattr(self.store, "close"):
            self.store.close()
        del self._view
        with contextlib.suppress(BufferError):
            self.mm.close()


def store_worker_main(a: argparse.Namespace) -> int:
    reply = C.reply_channel()
    w = StoreWorker(a.buffer_bytes, a.lease_ms, a.batch)
    handlers = {
        "setup": w.setup,
        "put": w.put,
        "get": w.get,
        "remove_now": w.remove_now,
        "add_pending": w.add_pending,
        "cleanup": w.cleanup,
    }
    return C.serve_commands(reply, handlers, w.close)


# ================================================================= driver: processes


def _result_line(child: C.Child) -> dict[str, Any] | None:
    out, _ = child.output()
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    return None


def run_child_role(
    variant: str, python: str, role_args: list[str], limit: float, log_stem: Path
) -> dict[str, Any]:
    """Run one ``--role`` child to completion (bounded), return its RESULT dict."""
    child = C.Child(
        [python, str(Path(__file__).resolve()), *role_args],
        env=C.variant_env(variant, VARIANT_ENV[variant]),
        log_stem=log_stem,
    )
    try:
        rc = child.wait(limit)
        res = _result_line(child)
        tail = child.tail(20)
    finally:
        child.stop()
    if res is None:
        why = "timeout" if rc is None else f"rc={rc}"
        return {"error": f"{role_args[0]} {variant}: no result ({why}):\n{tail}"}
    if "error" in res:
        res["error"] = f"{res['error']}\n{tail}"
    return res


def run_store(
    variant: str, run: int, python: str, a: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    """One pass of one variant: master + A + B, every size and get API once."""
    res: dict[str, Any] = {"variant": variant, "run": run, "cases": []}
    procs = C.StorePass(
        variant, run, python, VARIANT_ENV[variant], a.lease_ms, tmp / f"store-{variant}-{run}"
    )
    tag = procs.tag
    try:
        A, B = procs.start_workers(
            [str(Path(__file__).resolve()), "--role=store-worker"],
            label="store worker",
            buffer_bytes=STORE_BUFFER,
            batch=a.batch,
            segment_bytes=a.segment_bytes,
            local_buffer_bytes=LOCAL_BUFFER,
            into=res,
        )
        # warm-up: A fills most of its segment (first touch), B reads it all once (maps
        # A's segment / opens the connections), then A removes it once the leases expire
        count = int(a.segment_bytes * WARM_FRACTION) // WARM_OBJ
        wp = f"{tag}-warm-"
        t0 = time.monotonic()
        wput = A.call("put", C.phase_timeout(count * WARM_OBJ), size=WARM_OBJ, n=count, prefix=wp)
        wget = B.call(
            "get",
            C.phase_timeout(count * WARM_OBJ),
            api="batch_get_into",
            size=WARM_OBJ,
            n=count,
            prefix=wp,
            verify=False,
        )
        time.sleep(a.lease_ms / 1000 + 0.3)
        rm = A.call(
            "remove_now", a.lease_ms / 1000 + 40, prefix=wp, n=count, timeout=a.lease_ms / 1000 + 30
        )
        res["warmup"] = {"put": wput, "get": wget, "remove": rm, "wall_s": time.monotonic() - t0}
        C.progress(
            f"  store {variant}: warm-up {count} x 32 MiB: put {wput['gbps']:.2f} GB/s, "
            f"get {wget['gbps']:.2f} GB/s ({wget['path']}), removal leftover {rm['leftover']}"
        )
        # per-call cost without the payload: 4 KiB values, one key per call (not a goal)
        pp, psz, pn = f"{tag}-probe-", 4 * C.KiB, PROBE_KEYS
        A.call("put", 60, size=psz, n=pn, prefix=pp)
        res["probe"] = {
            api: B.call("get", 60, api=api, size=psz, n=pn, prefix=pp, verify=api != "is_exist")
            for api in PROBE_APIS
        }
        A.call("add_pending", 10, prefix=pp, n=pn, size=psz)
        budget = int(a.segment_bytes * SEGMENT_BUDGET)
        for size in a.sizes:
            n = keys_for(size, a)
            prefix = f"{tag}-{size}-"
            cl = A.call(
                "cleanup",
                a.lease_ms / 1000 + 60,
                need=n * size,
                budget=budget,
                timeout=a.lease_ms / 1000 + 30,
            )
            if cl["leftover"] or cl["pending_bytes"] + n * size > budget:
                C.log(f"  store {variant}: cleanup could not make room: {cl}")
            put = A.call("put", C.phase_timeout(n * size), size=size, n=n, prefix=prefix)
            case: dict[str, Any] = {"size": size, "keys": n, "put": put}
            for api in a.apis:
                g = B.call("get", C.phase_timeout(n * size), api=api, size=size, n=n, prefix=prefix)
                case[api] = g
                bad = (" FAILED CALLS" if g["fails"] else "") + (
                    "" if g["verified"] else " VERIFY MISMATCH"
                )
                C.progress(
                    f"  store {variant} {api:14} {C.size_label(size):>7} x{n}: "
                    f"{g['gbps']:.3f} GB/s ({g['path']}){bad}"
                )
            A.call("add_pending", 10, prefix=prefix, n=n, size=size)
            res["cases"].append(case)
    except RuntimeError as exc:
        res["error"] = str(exc)
        C.log(f"store {variant} run {run + 1} failed: {exc}")
    finally:
        procs.stop()
    return res


# ================================================================= driver: main loop


def te_combos(a: argparse.Namespace, order: list[str]) -> list[tuple[str, str]]:
    """(variant, target mode) pairs of one run; the plain target only for ours same-host
    unless --plain-all (over TCP the target's memory kind does not change the path)."""
    out = []
    for v in order:
        for mode in a.te_modes:
            if mode == "plain" and v != "py" and not a.plain_all:
                continue
            out.append((v, mode))
    return out


def driver_main(a: argparse.Namespace) -> int:
    pythons = {v: C.python_for(C.base_impl(v)) for v in a.impls}
    if "memcpy" in a.parts:
        pythons.setdefault("py", C.py_python())
    data: dict[str, Any] = {
        "bench": "samehost_bench",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": C.machine_info(),
        "config": {
            "runs": a.runs,
            "impls": a.impls,
            "parts": a.parts,
            "quick": a.quick,
            "memcpy_bytes": a.memcpy_bytes,
            "copies": a.copies,
            "te_modes": a.te_modes,
            "plain_all": a.plain_all,
            "ops": a.ops,
            "blocks": a.blocks,
            "duration_s": a.duration,
            "max_calls": a.max_calls,
            "te_buffer": TE_BUFFER,
            "sizes": a.sizes,
            "apis": a.apis,
            "keys": {str(s): keys_for(s, a) for s in a.sizes},
            "batch": a.batch,
            "segment_bytes": a.segment_bytes,
            "local_buffer_bytes": LOCAL_BUFFER,
            "store_buffer_bytes": STORE_BUFFER,
            "lease_ms": a.lease_ms,
            "variant_env": VARIANT_ENV,
            "ref_env": C.REF_ENV,
            "store_env": C.STORE_WORKER_ENV,
            "argv": a.argv,
        },
        "impls": {v: C.impl_version(C.base_impl(v), py) for v, py in pythons.items()},
        "memcpy": [],
        "te": [],
        "store": [],
    }
    n_te = len(a.ops) * len(a.blocks)
    C.progress(
        f"{a.runs} run(s); parts {','.join(a.parts)}; variants {','.join(a.impls)}; "
        f"TE {n_te} cases x {a.duration:g} s per worker; store sizes "
        f"{','.join(C.size_label(s) for s in a.sizes)}"
    )
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="samehost_bench-"))
    try:
        with C.sigterm_as_interrupt():
            for r in range(a.runs):
                order = list(a.impls) if r % 2 == 0 else list(reversed(a.impls))
                if "memcpy" in a.parts:
                    res = run_child_role(
                        "py",
                        pythons["py"],
                        [
                            "--role=memcpy",
                            f"--memcpy-bytes={a.memcpy_bytes}",
                            f"--copies={a.copies}",
                        ],
                        120,
                        tmp / f"memcpy-{r}",
                    )
                    res["run"] = r
                    data["memcpy"].append(res)
                    if "error" in res:
                        C.log(f"memcpy run {r + 1} failed: {res['error']}")
                    else:
                        C.progress(
                            f"run {r + 1}/{a.runs} memcpy 256 MiB: numpy.copyto "
                            f"{res['numpy_avg']:.2f} GB/s, ctypes.memmove {res['memmove_avg']:.2f} GB/s"
                        )
                if "te" in a.parts:
                    for v, mode in te_combos(a, order):
                        C.progress(f"run {r + 1}/{a.runs} TE {LABEL[v]}, {MODE_LABEL[mode]}")
                        res = run_child_role(
                            v,
                            pythons[v],
                            [
                                "--role=te-worker",
                                f"--target-mode={mode}",
                                f"--size={TE_BUFFER}",
                                f"--ops={','.join(a.ops)}",
                                f"--blocks={','.join(str(b) for b in a.blocks)}",
                                f"--duration={a.duration}",
                                f"--max-calls={a.max_calls}",
                            ],
                            180 + n_te * (a.duration + 30),
                            tmp / f"te-{v}-{mode}-{r}",
                        )
                        res.update(variant=v, mode=mode, run=r)
                        data["te"].append(res)
                        if "error" in res:
                            C.log(f"TE {v} {mode} run {r + 1} failed: {res['error']}")
                        for c in res.get("cases", []):
                            (C.log if c.get("error") else C.progress)(
                                f"  {v} {mode} {c['op']:5} {C.size_label(c['block']):>7}: "
                                f"{c.get('gbps', 0):.3f} GB/s ({c.get('path', '?')}) "
                                f"{c.get('error', '')}"
                            )
                if "store" in a.parts:
                    for v in order:
                        C.progress(f"run {r + 1}/{a.runs} store {LABEL[v]}")
                        try:
                            data["store"].append(run_store(v, r, pythons[v], a, tmp))
                        except RuntimeError as exc:  # the master did not start
                            C.log(f"store {v} run {r + 1}: {exc}")
                            data["store"].append(
                                {"variant": v, "run": r, "error": str(exc), "cases": []}
                            )
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
    summarize(data, a)
    C.publish("samehost_bench", data, render(data, a))
    failed = any("error" in x for part in ("memcpy", "te", "store") for x in data[part])
    return 130 if data.get("interrupted") else (1 if failed else 0)


# ================================================================= summaries and tables


def summarize(data: dict[str, Any], a: argparse.Namespace) -> None:
    mc = [m for m in data["memcpy"] if "error" not in m]
    memcpy = {
        "numpy_avg": C.summary([m["numpy_avg"] for m in mc]),
        "numpy_best": C.summary([m["numpy_best"] for m in mc]),
        "memmove_avg": C.summary([m["memmove_avg"] for m in mc]),
        "memmove_best": C.summary([m["memmove_best"] for m in mc]),
        "memmove_4k_avg": C.summary([m["memmove_4k_avg"] for m in mc]),
        "memmove_4k_best": C.summary([m["memmove_4k_best"] for m in mc]),
        "pvm_avg": C.summary([m["pvm_avg"] for m in mc if "pvm_avg" in m]),
        "pvm_best": C.summary([m["pvm_best"] for m in mc if "pvm_best" in m]),
    }
    for sz in FRESH_SIZES:
        memcpy[f"fresh_{sz}"] = C.summary(
            [m["fresh_bytes_gbps"][str(sz)] for m in mc if "fresh_bytes_gbps" in m]
        )
    # the goal's baseline: the faster of numpy.copyto / ctypes.memmove between numpy
    # buffers (median of per-run averages); the 4 KiB-page copy is shown, not used
    meds = [memcpy[k]["median"] for k in ("numpy_avg", "memmove_avg") if memcpy[k]]
    baseline = max(meds) if meds else None
    te_rows = []
    for op in a.ops:
        for block in a.blocks:
            row: dict[str, Any] = {"op": op, "block": block, "batch": C.batch_for(block)}
            for w in data["te"]:
                for c in w.get("cases", []):
                    if (c["op"], c["block"]) != (op, block):
                        continue
                    key = f"{w['variant']}/{w['mode']}"
                    row.setdefault(f"runs_{key}", []).append(c)
            for key in [k[5:] for k in list(row) if k.startswith("runs_")]:
                runs = row[f"runs_{key}"]
                good = [c for c in runs if "error" not in c]
                row[key] = C.summary([c["gbps"] for c in good])
                row[f"errors_{key}"] = len(runs) - len(good)
                row[f"paths_{key}"] = sorted({c.get("path", "?") for c in good})
            for mode in a.te_modes:
                s = row.get(f"py/{mode}")
                r = s["median"] / baseline if s and baseline else None
                row[f"memcpy_ratio_{mode}"] = r
                row[f"goal_{mode}"] = None if r is None or block < C.MiB else r >= GOAL_MEMCPY
            row["ratio_py_ref"] = C.ratio(row.get("py/managed"), row.get("ref/managed"))
            row["ratio_py_pytcp"] = C.ratio(row.get("py/managed"), row.get("pytcp/managed"))
            te_rows.append(row)
    store_rows = []
    for size in a.sizes:
        for api in a.apis:
            row = {"api": api, "size": size, "keys": keys_for(size, a)}
            for v in a.impls:
                got = [
                    c[api]
                    for p in data["store"]
                    if p["variant"] == v
                    for c in p["cases"]
                    if c["size"] == size and api in c
                ]
                good = [g for g in got if not g["fails"]]
                row[v] = C.summary([g["gbps"] for g in good])
                row[f"fails_{v}"] = len(got) - len(good)
                row[f"verified_{v}"] = [sum(bool(g.get("verified")) for g in got), len(got)]
                row[f"paths_{v}"] = sorted({g.get("path", "?") for g in got})
                puts = [
                    c["put"]
                    for p in data["store"]
                    if p["variant"] == v
                    for c in p["cases"]
                    if c["size"] == size
                ]
                row[f"put_{v}"] = C.summary([x["gbps"] for x in puts])
                row[f"p50_us_{v}"] = C.summary([g["p50_us"] for g in good])
            row["ratio_py_ref"] = C.ratio(row.get("py"), row.get("ref"))
            row["ratio_py_pytcp"] = C.ratio(row.get("py"), row.get("pytcp"))
            s = row.get("py")
            row["memcpy_ratio"] = s["median"] / baseline if s and baseline else None
            rr = row["ratio_py_ref"]
            row["goal"] = None if rr is None else rr >= GOAL_STORE_X_REF
            store_rows.append(row)
    probe = {
        f"{api}_{v}": C.summary(
            [p["probe"][api]["p50_us"] for p in data["store"] if p["variant"] == v and "probe" in p]
        )
        for api in PROBE_APIS
        for v in a.impls
    }
    te_goal = {
        mode: [r[f"goal_{mode}"] for r in te_rows if r[f"goal_{mode}"] is not None]
        for mode in a.te_modes
    }
    st_goal = {
        kind: [
            r["goal"]
            for r in store_rows
            if r["goal"] is not None and (r["api"] == "get") == (kind == "bytes")
        ]
        for kind in ("zero_copy", "bytes")
    }
    data["summary"] = {
        "memcpy": memcpy,
        "memcpy_baseline_gbps": baseline,
        "te": te_rows,
        "store": store_rows,
        "store_probe_4k_p50_us": probe,
    }

    def count(xs: list[bool]) -> dict[str, Any]:
        return {"every": all(xs) if xs else None, "met": f"{sum(xs)}/{len(xs)}"}

    data["goals"] = {
        "te_samehost_ge_0.7_memcpy": {m: count(x) for m, x in te_goal.items()},
        "store_samehost_get_ge_5x_ref": {k: count(x) for k, x in st_goal.items()},
    }


def _r(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def render(data: dict[str, Any], a: argparse.Namespace) -> str:
    sm = data["summary"]
    cfg = data["config"]
    lines: list[str] = []
    base = sm["memcpy_baseline_gbps"]
    if "memcpy" in a.parts:
        m = sm["memcpy"]
        lines += [
            f"### memcpy baseline: single thread, {C.size_label(cfg['memcpy_bytes'])} between two "
            f"pre-faulted buffers, {cfg['copies']} copies per run (GB/s, median (min-max) over runs)",
            "",
            C.markdown_table(
                ["method", "average of a run", "best copy of a run"],
                [
                    ["numpy.copyto", C.cell(m["numpy_avg"]), C.cell(m["numpy_best"])],
                    ["ctypes.memmove", C.cell(m["memmove_avg"]), C.cell(m["memmove_best"])],
                    [
                        "ctypes.memmove, plain mmap buffers (4 KiB pages)",
                        C.cell(m["memmove_4k_avg"]),
                        C.cell(m["memmove_4k_best"]),
                    ],
                    [
                        "process_vm_readv, same buffers, 16 MiB iovecs (kernel copy)",
                        C.cell(m["pvm_avg"]),
                        C.cell(m["pvm_best"]),
                    ],
                ]
                + [
                    [
                        f"copy into a fresh bytes object (ctypes.string_at), {C.size_label(sz)}",
                        C.cell(m[f"fresh_{sz}"]),
                        "",
                    ]
                    for sz in FRESH_SIZES
                ],
            ),
            "",
            f"Baseline of the goal columns: {_r(base)} GB/s (the faster median of the two numpy-buffer rows; numpy madvises huge pages for big arrays)",
            "",
        ]
    if "te" in a.parts:
        keys = [
            f"{v}/{m}"
            for v in a.impls
            for m in a.te_modes
            if m == "managed" or v == "py" or a.plain_all
        ]
        header = ["op", "block", "batch"] + [
            f"{LABEL[k.split('/')[0]]}, {MODE_LABEL[k.split('/')[1]]}" for k in keys
        ]
        if "py" in a.impls:
            header += [f"same-host/memcpy ({MODE_LABEL[m]})" for m in a.te_modes]
            if "ref" in a.impls:
                header.append("same-host/ref (memfd)")
            if "pytcp" in a.impls:
                header.append("same-host/ours TCP (memfd)")
            header += [f">= {GOAL_MEMCPY:.0%} memcpy ({MODE_LABEL[m]})" for m in a.te_modes]
        rows = []
        for row in sm["te"]:
            cells = [row["op"], C.size_label(row["block"]), str(row["batch"])]
            for k in keys:
                txt = C.cell(row.get(k), "{:.2f}")
                if row.get(f"errors_{k}"):
                    txt += f" [{row[f'errors_{k}']} failed]"
                cells.append(txt)
            if "py" in a.impls:
                cells += [_r(row[f"memcpy_ratio_{m}"]) for m in a.te_modes]
                if "ref" in a.impls:
                    cells.append(_r(row["ratio_py_ref"], "{:.1f}"))
                if "pytcp" in a.impls:
                    cells.append(_r(row["ratio_py_pytcp"], "{:.1f}"))
                cells += [C.check(row[f"goal_{m}"]) for m in a.te_modes]
            rows.append(cells)
        lines += [
            f"### Transfer Engine, two processes on this host: batch_transfer_sync_write/read, "
            f"1 thread, P2PHANDSHAKE (GB/s, median (min-max) over {cfg['runs']} run(s) of "
            f"{cfg['duration_s']:g} s)",
            "",
            C.markdown_table(header, rows),
            "",
            "memfd target: the target's buffer comes from allocate_managed_buffer (ours: memfd, "
            "copied through a shared mapping); plain target: a bytearray + register_memory "
            "(ours: process_vm_readv/writev). Initiator: 1 GiB ctypes buffer + register_memory.",
        ]
        paths: dict[str, set[str]] = {}
        for row in sm["te"]:
            for k in keys:
                paths.setdefault(k, set()).update(row.get(f"paths_{k}", []))
        lines.append(
            "Path per column (initiator's shm counters): "
            + "; ".join(
                f"{LABEL[k.split('/')[0]]}, {MODE_LABEL[k.split('/')[1]]}: {'/'.join(sorted(p)) or '-'}"
                for k, p in paths.items()
            )
        )
        checks: dict[str, list[str]] = {}
        for w in data["te"]:
            checks.setdefault(f"{w['variant']}/{w['mode']}", []).append(
                "failed"
                if "error" in w and "verified" not in w
                else ("ok" if w.get("verified") else "MISMATCH")
            )
        lines.append(f"Round-trip byte check per worker: {checks}")
        if "py" in a.impls:
            for mode, g in data["goals"]["te_samehost_ge_0.7_memcpy"].items():
                lines.append(
                    f"Goal ours same-host >= {GOAL_MEMCPY:.0%} of memcpy, blocks >= 1 MiB, "
                    f"{MODE_LABEL[mode]}: {C.check(g['every'])} ({g['met']})"
                )
        lines.append("")
    if "store" in a.parts:
        header = ["api", "value", "keys"] + [LABEL[v] for v in a.impls]
        if "py" in a.impls:
            if "ref" in a.impls:
                header.append("same-host/ref")
            if "pytcp" in a.impls:
                header.append("same-host/ours TCP")
            header.append("same-host/memcpy")
            if "ref" in a.impls:
                header.append(f">= {GOAL_STORE_X_REF:g}x ref")
        rows = []
        for row in sm["store"]:
            cells = [row["api"], C.size_label(row["size"]), str(row["keys"])]
            for v in a.impls:
                txt = C.cell(row.get(v), "{:.2f}")
                if row.get(f"fails_{v}"):
                    txt += f" [{row[f'fails_{v}']} runs with failed calls]"
                cells.append(txt)
            if "py" in a.impls:
                if "ref" in a.impls:
                    cells.append(_r(row["ratio_py_ref"], "{:.1f}"))
                if "pytcp" in a.impls:
                    cells.append(_r(row["ratio_py_pytcp"], "{:.1f}"))
                cells.append(_r(row["memcpy_ratio"]))
                if "ref" in a.impls:
                    cells.append(C.check(row["goal"]))
            rows.append(cells)
        lines += [
            f"### Store same-host get: B reads what A put into A's segment "
            f"({C.size_label(cfg['segment_bytes'])}), HTTP metadata, lease {cfg['lease_ms']} ms "
            f"(GB/s, median (min-max) over {cfg['runs']} run(s))",
            "",
            C.markdown_table(header, rows),
            "",
            f"get_into = one key per call into B's registered buffer; batch_get_into = "
            f"{cfg['batch']} keys per call; get = bytes API (a fresh bytes object per call).",
        ]
        puts = "; ".join(
            f"{LABEL[v]} "
            + ", ".join(
                f"{C.size_label(r['size'])} {_r(r[f'put_{v}']['median'] if r.get(f'put_{v}') else None)}"
                for r in sm["store"]
                if r["api"] == a.apis[0]
            )
            for v in a.impls
        )
        lines.append(f"A's batch_put_from GB/s (median, info): {puts}")
        lat_rows = [
            [api, "4 KiB", str(PROBE_KEYS)]
            + [C.cell(sm["store_probe_4k_p50_us"][f"{api}_{v}"], "{:.0f}") for v in a.impls]
            for api in PROBE_APIS
        ] + [
            [r["api"], C.size_label(r["size"]), str(r["keys"])]
            + [C.cell(r.get(f"p50_us_{v}"), "{:.0f}") for v in a.impls]
            for r in sm["store"]
        ]
        lines += [
            "",
            "Per-call time of B's gets, p50 us (per batch call for batch_get_into; median over "
            "runs); the 4 KiB rows are the fixed cost of one call (is_exist: one master round "
            "trip, no data):",
            "",
            C.markdown_table(["api", "value", "keys"] + [LABEL[v] for v in a.impls], lat_rows),
            "",
        ]
        paths2 = {v: sorted({p for r in sm["store"] for p in r[f"paths_{v}"]}) for v in a.impls}
        lines.append(
            "Path per column (B's shm counters): "
            + "; ".join(f"{LABEL[v]}: {'/'.join(p) or '-'}" for v, p in paths2.items())
        )
        ver = ", ".join(
            f"{LABEL[v]} {sum(r[f'verified_{v}'][0] for r in sm['store'])}/{sum(r[f'verified_{v}'][1] for r in sm['store'])}"
            for v in a.impls
        )
        lines.append(f"First object byte-identical (phases): {ver}")
        errs = [f"{p['variant']} run {p['run'] + 1}" for p in data["store"] if "error" in p]
        if errs:
            lines.append(f"Failed store passes: {', '.join(errs)} (see JSON)")
        if "py" in a.impls and "ref" in a.impls:
            g = data["goals"]["store_samehost_get_ge_5x_ref"]
            lines.append(
                f"Goal ours same-host store get >= {GOAL_STORE_X_REF:g}x ref: get_into/batch_get_into "
                f"{C.check(g['zero_copy']['every'])} ({g['zero_copy']['met']}), bytes get "
                f"{C.check(g['bytes']['every'])} ({g['bytes']['met']})"
            )
        lines.append("")
    lines.append(C.machine_line(data))
    return "\n".join(lines)


# ================================================================= main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--role",
        choices=("memcpy", "te-target", "te-worker", "store-worker"),
        help=argparse.SUPPRESS,
    )
    p.add_argument("--runs", type=int, default=3, help="repetitions (default 3)")
    p.add_argument(
        "--quick", action="store_true", help="1 run, shorter cases, 1 MiB and 32 MiB store values"
    )
    p.add_argument(
        "--impl", default=",".join(VARIANTS), help="variants: py,pytcp,ref (default all)"
    )
    p.add_argument("--parts", default=",".join(PARTS), help="memcpy,te,store (default all)")
    p.add_argument("--duration", type=float, default=1.5, help="seconds per TE case (default 1.5)")
    p.add_argument("--max-calls", type=int, default=100_000, help="TE calls per case at most")
    p.add_argument("--blocks", default="64K,1M,4M,16M", help="TE blocks (default 64K,1M,4M,16M)")
    p.add_argument("--ops", default="write,read", help="TE ops (default write,read)")
    p.add_argument("--te-modes", default="managed,plain", help="TE target buffers: managed,plain")
    p.add_argument("--plain-all", action="store_true", help="plain target for every variant too")
    p.add_argument("--sizes", default="1M,8M,32M", help="store value sizes (default 1M,8M,32M)")
    p.add_argument("--apis", default=",".join(GET_APIS), help="store get APIs")
    p.add_argument("--segment-gib", type=float, default=2.0, help="A's segment (default 2)")
    p.add_argument(
        "--lease-ms",
        type=int,
        default=2000,
        help="master --default_kv_lease_ttl (default 2000: a 1 GiB batch_get_into over TCP "
        "takes ~1 s, and a lease that expires first fails the read with -707)",
    )
    p.add_argument("--copies", type=int, default=8, help="memcpy copies per run (default 8)")
    p.add_argument("--keep-logs", action="store_true", help="keep every child's log")
    # roles
    p.add_argument("--target-mode", choices=TE_MODES, default="managed", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=TE_BUFFER, help=argparse.SUPPRESS)
    p.add_argument("--memcpy-bytes", type=int, default=256 * C.MiB, help=argparse.SUPPRESS)
    p.add_argument("--buffer-bytes", type=int, default=STORE_BUFFER, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.argv = argv
    a.max_keys, a.case_bytes = 512, 512 * C.MiB
    if a.quick:
        a.runs, a.duration, a.copies = 1, 0.6, 4
        if a.sizes == "1M,8M,32M":
            a.sizes = "1M,32M"
    a.blocks = [C.parse_size(b) for b in C.parse_list(a.blocks)]
    a.ops = C.parse_list(a.ops, OPS)
    a.te_modes = C.parse_list(a.te_modes, TE_MODES)
    a.sizes = [C.parse_size(s) for s in C.parse_list(a.sizes)]
    a.apis = C.parse_list(a.apis, GET_APIS)
    a.impls = C.parse_list(a.impl, VARIANTS)
    a.parts = C.parse_list(a.parts, PARTS)
    a.segment_bytes = int(a.segment_gib * C.GiB)
    if a.role is None:
        for b in a.blocks:
            if b * C.batch_for(b) > TE_BUFFER:
                p.error(f"block {b} x {C.batch_for(b)} exceeds the 1 GiB buffer")
        for s in a.sizes:
            if keys_for(s, a) * s > STORE_BUFFER:
                p.error(f"{keys_for(s, a)} x {s} bytes exceed the 1 GiB registered buffer")
            if keys_for(s, a) * s > a.segment_bytes * SEGMENT_BUDGET:
                p.error(f"{keys_for(s, a)} x {s} bytes do not fit A's segment budget")
    return a


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    roles = {
        "memcpy": memcpy_main,
        "te-target": te_target_main,
        "te-worker": te_worker_main,
        "store-worker": store_worker_main,
    }
    if a.role is not None:
        return roles[a.role](a)
    return driver_main(a)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (RuntimeError, ValueError) as exc:
        print(f"samehost_bench: {exc}", file=sys.stderr)
        sys.exit(1)
