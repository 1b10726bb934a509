"""A bounded soak of the store under faults: nothing acknowledged is lost or corrupted.

A :class:`~pymooncake.testing.ProcessCluster` (``mooncake_master`` with
``--journal_path`` and a cluster token, ``--nodes`` storage nodes) serves
``--workers`` client processes that run checksummed mixed put / get / remove /
put_batch / get_batch on their own keys for ``--minutes``, while a fault injector
(one every ``--fault-interval`` seconds on average) SIGKILLs and replaces a storage
node, SIGKILLs and restarts the master (same ports, same journal), or resets every
client connection through a :class:`~pymooncake.testing.MasterProxy` that sits
between the workers and the master.  Then faults stop, dead nodes expire, and each
worker reads back every object it was told was stored.

What it reports (table on stdout, JSON under ``bench/results/soak-*.json``):

* ops per kind, failed ops by error, and p50/p99/max latency per 10 s window with
  the faults injected in it;
* **corrupt reads** (wrong bytes, wrong object): must be 0;
* **"existed" answers for fresh keys** (the issue-7 silent-loss signature: a put
  reported done while nothing was stored): must be 0;
* **acknowledged-but-lost objects**: acknowledged puts whose holder node was never
  killed that are not readable at the end, across master restarts: must be 0 (the
  journal's promise); objects whose holder was killed are counted separately
  (legitimately gone: one replica, in the killed process's memory).

Each value carries a header (CRC32 of the payload, its length and a digest of its
key), so a read of the wrong object or of torn bytes is detected.

Usage::

    python bench/soak.py                     # 3 minutes
    python bench/soak.py --minutes 10 --workers 4 --nodes 3
    python bench/soak.py --insecure          # no cluster token

Every loop is bounded in count and in time; the exit status is 1 when a corrupt
read, a spurious "existed" or an acknowledged-but-lost object was seen.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import _common as C

HEADER = struct.Struct("<II16s")  # crc32(payload), len(payload), md5(key)
OPS = ("put", "get", "remove", "put_batch", "get_batch")
WINDOW_S = 10.0
TOKEN_BYTES = 32


def make_value(key: str, rng: random.Random, max_bytes: int) -> bytes:
    size = int(2 ** rng.uniform(10, max(10.0, max_bytes.bit_length() - 1)))
    return pack_value(key, rng.randbytes(size))


def pack_value(key: str, payload: bytes) -> bytes:
    """``payload`` behind the header :func:`check_value` reads."""
    digest = hashlib.md5(key.encode()).digest()
    return HEADER.pack(zlib.crc32(payload), len(payload), digest) + payload


def check_value(key: str, value: bytes) -> str:
    """ "" if ``value`` is ``key``'s intact value, else what is wrong."""
    if len(value) < HEADER.size:
        return f"{len(value)} bytes, shorter than the header"
    crc, size, digest = HEADER.unpack_from(value, 0)
    if digest != hashlib.md5(key.encode()).digest():
        return "the value of another key"
    if size != len(value) - HEADER.size:
        return f"length {len(value) - HEADER.size}, header says {size}"
    if zlib.crc32(memoryview(value)[HEADER.size :]) != crc:
        return "payload CRC mismatch"
    return ""


# ---------------------------------------------------------------- worker role


class Worker:
    """One client process: mixed operations on keys ``w<id>-<n>``."""

    def __init__(self, args: argparse.Namespace) -> None:
        from pymooncake.store import StoreClient, StoreClientConfig

        self.args = args
        self.rng = random.Random(args.seed * 1000 + args.id)
        self.client = StoreClient(
            StoreClientConfig(
                local_hostname=C.HOST,
                metadata_server=args.metadata,
                master_server_addr=args.master,
                global_segment_size=0,
                local_buffer_size=16 * C.MiB,
                rpc_timeout_s=30.0,
                prefault=False,
            )
        )
        self.next_key = 0
        #: acknowledged objects: key -> [crc, holders, ack time]
        self.live: dict[str, list[Any]] = {}
        self.ops = dict.fromkeys(OPS, 0)
        self.errors: dict[str, int] = {}
        self.corrupt: list[dict[str, Any]] = []
        self.existed_fresh: list[str] = []
        #: [wall time, op index, seconds, ok, holders index (-1: none known)]
        self.samples: list[list[Any]] = []
        #: failed operations: "op: Error" -> holders index -> count
        self.failures: dict[str, dict[int, int]] = {}
        #: distinct holder lists of the keys of failed operations (indexed above)
        self.holder_sets: dict[tuple[str, ...], int] = {}
        self.remove_not_found = 0
        self.remove_leased = 0
        #: acknowledged objects found missing during the run (classified at the end)
        self.gone: list[dict[str, Any]] = []

    def fresh_key(self) -> str:
        self.next_key += 1
        return f"w{self.args.id}-{self.next_key}"

    def error(self, op: str, exc: BaseException, key: str = "") -> int:
        """Count a failure; returns the index of the key's holder list (-1: none
        known), so that the driver can tell failures on a killed node's objects."""
        name = f"{op}: {type(exc).__name__}"
        self.errors[name] = self.errors.get(name, 0) + 1
        entry = self.live.get(key) if key else None
        h = -1
        if entry is not None:
            h = self.holder_sets.setdefault(tuple(entry[1]), len(self.holder_sets))
        per = self.failures.setdefault(name, {})
        per[h] = per.get(h, 0) + 1
        return h

    def ack(self, keys: list[str], values: list[bytes]) -> None:
        from pymooncake.errors import StoreError

        now = time.time()
        try:
            located = self.client.replicas_many(keys)
        except Exception:
            located = [StoreError("unknown")] * len(keys)
        for key, value, reps in zip(keys, values, located, strict=True):
            holders = [] if isinstance(reps, BaseException) else [r.endpoint for r in reps]
            crc = HEADER.unpack_from(value, 0)[0]
            self.live[key] = [crc, holders, now]

    def missing(self, key: str) -> None:
        """An acknowledged object answered OBJECT_NOT_FOUND: stop using it, keep it for
        the verdict (gone with a killed node, or lost)."""
        entry = self.live.pop(key, None)
        if entry is not None:
            self.gone.append(
                {"key": key, "status": "missing", "holders": entry[1], "t_ack": entry[2]}
            )
            self.gone[-1]["t_missing"] = time.time()

    def verify(self, key: str, value: bytes, during: str) -> None:
        problem = check_value(key, value)
        if problem:
            self.corrupt.append({"key": key, "problem": problem, "during": during})

    def step(self) -> None:
        op = self.rng.choices(OPS, weights=(30, 30, 10, 15, 15))[0]
        if op in ("get", "remove", "get_batch") and not self.live:
            op = "put"
        if op in ("put", "put_batch") and len(self.live) >= self.args.max_keys:
            self.run_op("remove")  # make room first, keeping the mix as weighted
            if len(self.live) >= self.args.max_keys:
                return  # not removed (read a moment ago): stay within the pool
        self.run_op(op)

    def run_op(self, op: str) -> None:
        from pymooncake.errors import ObjectNotFound

        args, rng, client = self.args, self.rng, self.client
        started = time.perf_counter()
        ok = True
        key = ""
        holders = -1
        try:
            if op == "put":
                key = self.fresh_key()
                value = make_value(key, rng, args.value_max)
                stored = client.put(key, value)
                if stored:
                    self.ack([key], [value])
                else:  # a fresh key never exists: "existed" would be a silent loss
                    self.existed_fresh.append(key)
            elif op == "put_batch":
                keys = [self.fresh_key() for _ in range(8)]
                values = [make_value(k, rng, args.value_max) for k in keys]
                results = client.put_many(keys, [[v] for v in values], bytes_api=True)
                done = [(k, v) for k, v, r in zip(keys, values, results, strict=True) if r is True]
                for k, r in zip(keys, results, strict=True):
                    if r is False:
                        self.existed_fresh.append(k)
                    elif isinstance(r, BaseException):
                        ok = False
                        self.error(op, r)  # a fresh key: no holder yet
                if done:
                    self.ack([k for k, _ in done], [v for _, v in done])
            elif op == "get":
                key = rng.choice(list(self.live))
                try:
                    self.verify(key, client.get(key), "run")
                except ObjectNotFound as exc:
                    ok = False
                    holders = self.error(op, exc, key)  # before missing() forgets it
                    self.missing(key)
            elif op == "get_batch":
                keys = rng.sample(list(self.live), min(8, len(self.live)))
                for k, got in zip(keys, client.get_many(keys), strict=True):
                    if isinstance(got, BaseException):
                        ok = False
                        h = self.error(op, got, k)
                        holders = h if holders == -1 else holders
                        if isinstance(got, ObjectNotFound):
                            self.missing(k)
                    else:
                        self.verify(k, got, "run")
            else:
                # at the key limit: make room (force: a key read a moment ago holds a lease)
                key = rng.choice(list(self.live))
                self.remove(key, force=len(self.live) >= args.max_keys)
        except Exception as exc:
            ok = False
            holders = self.error(op, exc, key)
        self.ops[op] += 1
        self.samples.append(
            [time.time(), OPS.index(op), time.perf_counter() - started, ok, holders]
        )

    def remove(self, key: str, force: bool = False) -> None:
        from pymooncake.errors import ObjectHasLease, ObjectNotFound

        try:
            self.client.remove(key, force=force)
        except ObjectHasLease:
            self.remove_leased += 1
            return  # read a moment ago; stays
        except ObjectNotFound:
            # its node was killed, or the master restarted between the remove and its
            # reply (the reply cache is not journaled: docs/security.md)
            self.remove_not_found += 1
        del self.live[key]

    def final_check(self) -> list[dict[str, Any]]:
        """Read every acknowledged object back (retrying transient failures for a
        bounded time); returns one record per key."""
        from pymooncake.errors import ObjectNotFound

        out = []
        deadline = time.monotonic() + self.args.verify_s
        for key, (_crc, holders, t_ack) in self.live.items():
            status, detail = "error", ""
            for attempt in range(20):
                try:
                    value = self.client.get(key)
                except ObjectNotFound:
                    status = "missing"
                    break
                except Exception as exc:  # a dead node not yet expired, a restart
                    detail = f"{type(exc).__name__}: {str(exc)[:160]}"
                    if time.monotonic() > deadline or attempt == 19:
                        break
                    time.sleep(0.5)
                    continue
                problem = check_value(key, value)
                status = "corrupt" if problem else "ok"
                detail = problem
                break
            out.append(
                {"key": key, "status": status, "holders": holders, "t_ack": t_ack, "detail": detail}
            )
        return out

    def run(self) -> dict[str, Any]:
        stop = Path(self.args.stop_file)
        hard_deadline = time.monotonic() + self.args.max_s
        steps = 0
        while not stop.exists() and time.monotonic() < hard_deadline and steps < 10_000_000:
            self.step()
            steps += 1
        checked = self.final_check()
        return {
            "id": self.args.id,
            "ops": self.ops,
            "errors": self.errors,
            "corrupt": self.corrupt,
            "existed_fresh": self.existed_fresh,
            "remove_not_found": self.remove_not_found,
            "remove_leased": self.remove_leased,
            "samples": self.samples,
            "failures": {name: list(per.items()) for name, per in self.failures.items()},
            "holder_sets": [list(h) for h in self.holder_sets],
            "checked": checked + self.gone,
            "master_retries": self.client.master.retries,
        }


def worker_main(args: argparse.Namespace) -> int:
    worker = Worker(args)
    try:
        print("READY", flush=True)
        result = worker.run()
    finally:
        worker.client.close()
    Path(args.out).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------- driver role


class Driver:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        from pymooncake.testing import MasterProxy, ProcessCluster, free_port

        self.args = args
        self.tmp = tmp
        self.rng = random.Random(args.seed)
        import secrets

        token = "" if args.insecure else secrets.token_urlsafe(TOKEN_BYTES)
        flags = [
            f"--journal_path={tmp / 'master.journal'}",
            f"--port={free_port()}",
            f"--metrics_port={free_port()}",
            f"--http_metadata_server_port={free_port()}",
            f"--client_ttl={args.client_ttl}",
            "--default_kv_lease_ttl=200",
            "--enable_metric_reporting=false",
            "--minloglevel=1",
        ]
        self.cluster = ProcessCluster(flags, token=token)
        self.nodes: list[tuple[Any, str]] = []
        self.killed: dict[str, float] = {}  # segment name -> when it was killed
        self.faults: list[dict[str, Any]] = []
        self.proxy = MasterProxy(self.cluster.master_address, parse=False)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.stop_file = tmp / "stop"
        #: evictions counted by masters that were since killed
        self.evictions_banked = 0
        self.evictions_unknown = False

    def start(self) -> None:
        for _ in range(self.args.nodes):
            self.nodes.append(self.cluster.node(self.args.segment))
        env = {**os.environ, **self.cluster.node_env, "PYMOONCAKE_PREFAULT": "0"}
        for i in range(self.args.workers):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                f"--id={i}",
                f"--master={self.proxy.address}",
                f"--metadata={self.cluster.metadata_url}",
                f"--out={self.tmp / f'worker-{i}.json'}",
                f"--stop-file={self.stop_file}",
                f"--seed={self.args.seed}",
                f"--value-max={self.args.value_max}",
                f"--max-keys={self.args.max_keys}",
                f"--max-s={self.args.minutes * 60 + 300}",
                f"--verify-s={self.args.verify_s}",
            ]
            self.workers.append(
                subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, start_new_session=True)
            )
        for i, proc in enumerate(self.workers):
            _ready(proc, i)

    def fault(self, t0: float) -> None:
        kind = self.rng.choices(("node", "master", "reset"), weights=(35, 30, 35))[0]
        now = time.time()
        started = time.monotonic()
        if kind == "node" and len(self.nodes) > 1:
            i = self.rng.randrange(len(self.nodes))
            proc, segment = self.nodes.pop(i)
            proc.kill(signal.SIGKILL)
            self.killed[segment] = now
            detail = f"killed storage node {segment}"
            time.sleep(1.0)
            self.nodes.append(self.cluster.node(self.args.segment))
            detail += f", started {self.nodes[-1][1]}"
        elif kind == "master":
            # the eviction counter starts afresh in the new master: bank it first
            evicted = self.evicted()
            if evicted is None:
                self.evictions_unknown = True
            else:
                self.evictions_banked += evicted
            self.cluster.restart_master(signal.SIGKILL)
            detail = "SIGKILLed and restarted the master (journal)"
        else:
            self.proxy.reset_all()
            kind = "reset"
            detail = "reset every client connection to the master"
        took = time.monotonic() - started
        self.faults.append({"t": now - t0, "kind": kind, "detail": detail, "took_s": took})
        C.log(f"t={now - t0:6.1f} s fault: {detail} ({took:.1f} s)")

    def run(self) -> float:
        t0 = time.time()
        end = time.monotonic() + self.args.minutes * 60
        next_fault = time.monotonic() + self.rng.uniform(0.5, 1.5) * self.args.fault_interval
        while time.monotonic() < end:
            for i, proc in enumerate(self.workers):
                if proc.poll() is not None:
                    raise RuntimeError(f"worker {i} exited early ({proc.returncode})")
            if time.monotonic() >= next_fault:
                self.fault(t0)
                next_fault = (
                    time.monotonic() + self.rng.uniform(0.5, 1.5) * self.args.fault_interval
                )
            time.sleep(0.1)
        return t0

    def finish(self) -> list[dict[str, Any]]:
        # quiet period: killed nodes expire (client_ttl), then the workers read back
        time.sleep(self.args.client_ttl + 2.0)
        self.stop_file.touch()
        results = []
        deadline = time.monotonic() + self.args.verify_s + 120
        for i, proc in enumerate(self.workers):
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"worker {i} did not finish its read-back in time") from None
            out = self.tmp / f"worker-{i}.json"
            if proc.returncode != 0 or not out.exists():
                raise RuntimeError(f"worker {i} failed (exit {proc.returncode})")
            results.append(json.loads(out.read_text()))
        return results

    def evicted(self) -> int | None:
        from pymooncake._authio import ClusterSecurity, http_request

        try:
            _, body = http_request(
                "GET",
                self.cluster.metrics_url + "/metrics",
                security=ClusterSecurity(self.cluster.token),
                context=b"master-admin",
            )
        except Exception:
            return None
        m = re.search(r"^master_evicted_key_count(?:\{[^}]*\})? (\S+)$", body.decode(), re.M)
        return None if m is None else int(float(m.group(1)))

    def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.proxy.close()
        for proc, _ in self.nodes:
            proc.stop()
        self.cluster.close()


def _ready(proc: subprocess.Popen[bytes], i: int) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(b"READY"):
        raise RuntimeError(f"worker {i} did not start (exit {proc.poll()})")


def analyse(
    args: argparse.Namespace, t0: float, driver: Driver, results: list[dict[str, Any]]
) -> dict[str, Any]:
    ops = dict.fromkeys(OPS, 0)
    errors: dict[str, int] = {}
    #: failed operations on objects a killed node held (expected) / all others
    errors_killed: dict[str, int] = {}
    errors_other: dict[str, int] = {}
    corrupt: list[dict[str, Any]] = []
    existed: list[str] = []
    samples: list[list[Any]] = []
    status: dict[str, int] = {}
    acked_lost: list[dict[str, Any]] = []
    lost_with_node = 0
    remove_not_found = 0
    remove_leased = 0
    for r in results:
        for k, v in r["ops"].items():
            ops[k] += v
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
        corrupt += r["corrupt"]
        existed += r["existed_fresh"]
        # holder lists (by index, as the worker numbered them) that include a killed node
        dead = {i for i, hs in enumerate(r["holder_sets"]) if any(h in driver.killed for h in hs)}
        for name, per in r["failures"].items():
            for h, n in per:
                into = errors_killed if h in dead else errors_other
                into[name] = into.get(name, 0) + n
        samples += [[*s[:4], s[4] in dead] for s in r["samples"]]
        remove_not_found += r["remove_not_found"]
        remove_leased += r["remove_leased"]
        for c in r["checked"]:
            if c["status"] == "corrupt":
                corrupt.append({"key": c["key"], "problem": c["detail"], "during": "read-back"})
            if c["status"] in ("missing", "error"):
                if any(h in driver.killed for h in c["holders"]):
                    lost_with_node += 1
                    status["lost with a killed node"] = status.get("lost with a killed node", 0) + 1
                    continue
                acked_lost.append(c)
            status[c["status"]] = status.get(c["status"], 0) + 1
    windows = []
    n_windows = int(args.minutes * 60 / WINDOW_S + 0.999)
    for w in range(n_windows):
        lo, hi = t0 + w * WINDOW_S, t0 + (w + 1) * WINDOW_S
        lat = sorted(s[2] for s in samples if lo <= s[0] < hi)
        failed = sum(1 for s in samples if lo <= s[0] < hi and not s[3] and not s[4])
        failed_killed = sum(1 for s in samples if lo <= s[0] < hi and not s[3] and s[4])
        faults = [f["kind"] for f in driver.faults if w * WINDOW_S <= f["t"] < (w + 1) * WINDOW_S]
        windows.append(
            {
                "t_s": w * WINDOW_S,
                "ops": len(lat),
                "failed": failed,
                "failed_killed_holder": failed_killed,
                "p50_ms": C.percentile(lat, 50) * 1e3 if lat else None,
                "p99_ms": C.percentile(lat, 99) * 1e3 if lat else None,
                "max_ms": lat[-1] * 1e3 if lat else None,
                "faults": faults,
            }
        )
    return {
        "ops": ops,
        "ops_total": sum(ops.values()),
        "failed_ops": errors,
        "failed_ops_killed_holder": errors_killed,
        "failed_ops_other": errors_other,
        "corrupt_reads": len(corrupt),
        "corrupt": corrupt[:50],
        "existed_for_fresh_keys": len(existed),
        "acknowledged_objects": sum(len(r["checked"]) for r in results),
        "read_back": status,
        "acknowledged_but_lost": len(acked_lost),
        "acknowledged_but_lost_examples": acked_lost[:20],
        "lost_with_killed_node": lost_with_node,
        "remove_not_found": remove_not_found,
        "remove_leased": remove_leased,
        "master_retries": sum(r["master_retries"] for r in results),
        "windows": windows,
        "faults": driver.faults,
    }


def render(data: dict[str, Any]) -> str:
    r = data["result"]
    faults: dict[str, int] = {}
    for f in r["faults"]:
        faults[f["kind"]] = faults.get(f["kind"], 0) + 1
    head = (
        f"### Store soak: {data['minutes']:g} min, {data['workers']} client processes, "
        f"{data['nodes']} storage nodes, token {'on' if data['token'] else 'off'}, "
        f"master journal; faults: " + ", ".join(f"{n} x {k}" for k, n in sorted(faults.items()))
    )
    totals = C.markdown_table(
        ["what", "count", "must be"],
        [
            ["operations", str(r["ops_total"]), ""],
            *[[f"  {k}", str(v), ""] for k, v in r["ops"].items()],
            ["failed operations (by error below)", str(sum(r["failed_ops"].values())), ""],
            [
                "  on objects a killed node held",
                str(sum(r["failed_ops_killed_holder"].values())),
                "",
            ],
            [
                "  others (fault windows, retries exhausted)",
                str(sum(r["failed_ops_other"].values())),
                "",
            ],
            ["corrupt reads", str(r["corrupt_reads"]), "0"],
            ['"existed" for a fresh key', str(r["existed_for_fresh_keys"]), "0"],
            ["acknowledged objects read back", str(r["acknowledged_objects"]), ""],
            ["  intact", str(r["read_back"].get("ok", 0)), ""],
            ["  acknowledged-but-lost (holder never killed)", str(r["acknowledged_but_lost"]), "0"],
            ["  gone with a killed storage node", str(r["lost_with_killed_node"]), ""],
            ["removes answered OBJECT_NOT_FOUND", str(r["remove_not_found"]), ""],
            ["removes refused: read lease (key kept)", str(r["remove_leased"]), ""],
            ["master evictions", str(data.get("evicted")), "0"],
            ["master RPC retries by clients", str(r["master_retries"]), ""],
        ],
    )
    win = C.markdown_table(
        [
            "t (s)",
            "ops",
            "failed (other)",
            "failed (killed holder)",
            "p50 ms",
            "p99 ms",
            "max ms",
            "faults",
        ],
        [
            [
                f"{w['t_s']:.0f}",
                str(w["ops"]),
                str(w["failed"]),
                str(w["failed_killed_holder"]),
                "-" if w["p50_ms"] is None else f"{w['p50_ms']:.1f}",
                "-" if w["p99_ms"] is None else f"{w['p99_ms']:.1f}",
                "-" if w["max_ms"] is None else f"{w['max_ms']:.0f}",
                ", ".join(w["faults"]),
            ]
            for w in r["windows"]
        ],
    )
    errs = C.markdown_table(
        ["failed operation", "count", "on a killed node's object", "other"],
        [
            [
                k,
                str(v),
                str(r["failed_ops_killed_holder"].get(k, 0)),
                str(r["failed_ops_other"].get(k, 0)),
            ]
            for k, v in sorted(r["failed_ops"].items(), key=lambda kv: -kv[1])
        ]
        or [["(none)", "0", "0", "0"]],
    )
    return f"{head}\n\n{totals}\n\n{errs}\n\n{win}\n\n{C.machine_line(data)}"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=3.0, help="length of the fault phase")
    p.add_argument("--workers", type=int, default=3, help="client processes")
    p.add_argument("--nodes", type=int, default=3, help="storage nodes (mooncake_client)")
    p.add_argument("--segment", default="48 MB", help="memory of each storage node")
    p.add_argument("--fault-interval", type=float, default=8.0, help="mean seconds between faults")
    p.add_argument("--client-ttl", type=int, default=3, help="master --client_ttl (s)")
    p.add_argument("--value-max", type=int, default=128 * 1024, help="largest value (bytes)")
    p.add_argument("--max-keys", type=int, default=600, help="live keys per worker")
    p.add_argument("--verify-s", type=float, default=60.0, help="read-back time limit")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--insecure", action="store_true", help="no cluster token")
    # worker role
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--master", help=argparse.SUPPRESS)
    p.add_argument("--metadata", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--stop-file", help=argparse.SUPPRESS)
    p.add_argument("--max-s", type=float, default=600.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)
    started = time.time()
    data: dict[str, Any] = {
        "bench": "soak",
        "minutes": args.minutes,
        "workers": args.workers,
        "nodes": args.nodes,
        "segment": args.segment,
        "fault_interval_s": args.fault_interval,
        "token": not args.insecure,
        "seed": args.seed,
        "machine": C.machine_info(),
    }
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp, C.sigterm_as_interrupt():
        driver = Driver(args, Path(tmp))
        try:
            driver.start()
            C.log(
                f"cluster up: master {driver.cluster.master_address} (via proxy "
                f"{driver.proxy.address}), nodes {[s for _, s in driver.nodes]}, "
                f"{args.workers} workers; faults for {args.minutes:g} min"
            )
            t0 = driver.run()
            C.log("faults stopped; waiting for dead nodes to expire, then reading back")
            results = driver.finish()
            last = driver.evicted()
            unknown = last is None or driver.evictions_unknown
            data["evicted"] = None if unknown else driver.evictions_banked + (last or 0)
            data["result"] = analyse(args, t0, driver, results)
        finally:
            driver.close()
    data["machine"]["loadavg_end"] = os.getloadavg()
    data["wall_s"] = time.time() - started
    C.publish("soak", data, render(data))
    r = data["result"]
    bad = r["corrupt_reads"] or r["existed_for_fresh_keys"] or r["acknowledged_but_lost"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
