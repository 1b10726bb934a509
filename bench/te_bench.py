"""Side-by-side ``transfer_engine_bench``: pymooncake vs the reference, TCP over loopback.

One command measures, in one run on this machine:

* each implementation's own ``transfer_engine_bench`` console script with the same flags
  (P2PHANDSHAKE metadata, tcp, 1 GiB buffers, everything on 127.0.0.1): one target per
  implementation for the whole run, then per case and repetition one initiator, the
  implementations interleaved (ref, py, ref, py ...) so that drift hits both;
* the "plain Python socket pair" baseline: two processes, ``sendall`` / ``recv_into`` of
  4 MiB chunks from/to one buffer over 127.0.0.1, its repetitions spread over the run.

Prints a markdown table (median (min-max) over runs, ratios of the medians of this run,
goal checks) and writes ``bench/results/te_bench-<timestamp>.json`` and
``bench/results/te_bench-latest.json``.

Usage::

    python bench/te_bench.py                 # full: 3 runs x 5 s, 16 cases (~10 min)
    python bench/te_bench.py --quick         # 1 run x 1 s, threads 1 only (~1 min)
    python bench/te_bench.py --impl py --blocks 1M,16M --ops read --threads 1 --runs 5

The reference interpreter is ``$PYMOONCAKE_REF_PYTHON`` or ``.cache/refvenv/bin/python``
(created on demand); it always runs with ``MC_FORCE_TCP=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C

IMPLS = ("ref", "py")
OPS = ("read", "write")
DEFAULT_BLOCKS = "4K,64K,1M,16M"
BUFFER_SIZE = C.GiB  # the anchor's --buffer_size
SOCK_CHUNK = 4 * C.MiB  # anchor-bench.md: 4 MiB sendall/recv_into
SOCKET_GOAL = 0.8  # py >= 0.8 x socket pair for blocks >= 1 MiB
SOCKET_GOAL_MIN_BLOCK = C.MiB

# ours prints the first on stdout once its buffer is registered; the reference logs the
# second via glog on stderr (ours logs that too, but before it registers its buffer)
READY_RE = {
    "py": re.compile(r"Transfer Engine target ready: segment (?P<host>[\w.\-]+):(?P<port>\d+)"),
    "ref": re.compile(r"listening on (?P<host>[\w.\-]+):(?P<port>\d+)"),
}
RESULT_RE = re.compile(
    r"Test completed: duration (?P<duration>[\d.]+), batch count (?P<batches>\d+), "
    r"throughput (?P<rate>[\d.]+) (?P<unit>\w+)/s"
)


def common_flags() -> list[str]:
    return [
        "--local_server_name=127.0.0.1",
        "--metadata_server=P2PHANDSHAKE",
        "--protocol=tcp",
        f"--buffer_size={BUFFER_SIZE}",
    ]


# ---------------------------------------------------------------- socket pair


def _sock_recv(total: int, chunk: int) -> int:
    """Child: accept one connection on 127.0.0.1:0, recv_into one buffer, print JSON."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(60)
    print(f"PORT {srv.getsockname()[1]}", flush=True)
    conn, _ = srv.accept()
    conn.settimeout(120)
    view = memoryview(bytearray(chunk))
    got = 0
    start = time.perf_counter()
    while got < total:
        n = conn.recv_into(view, min(chunk, total - got))
        if n == 0:
            break
        got += n
    seconds = time.perf_counter() - start
    conn.close()
    srv.close()
    print(json.dumps({"bytes": got, "seconds": seconds}), flush=True)
    return 0 if got == total else 1


def _sock_send(port: int, total: int, chunk: int) -> int:
    """Child: connect to 127.0.0.1:port and sendall ``total`` bytes from one buffer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.settimeout(120)
    view = memoryview(bytearray(b"\x5a" * chunk))
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        sock.sendall(view[:n])
        sent += n
    sock.close()
    return 0


def socket_pair_run(tmp: Path, index: int, total: int) -> dict[str, Any]:
    """One socket-pair measurement with two fresh processes; bounded, always cleaned up."""
    me = str(Path(__file__).resolve())
    py = sys.executable
    env = C.env_for("py")
    recv = C.Child(
        [py, me, "_sockrecv", str(total), str(SOCK_CHUNK)],
        env=env,
        log_stem=tmp / f"sock-recv-{index}",
    )
    send: C.Child | None = None
    try:
        m = recv.wait_for(re.compile(r"PORT (\d+)"), 30)
        if not m:
            return {"error": f"receiver did not start: {recv.tail()}"}
        send = C.Child(
            [py, me, "_socksend", m.group(1), str(total), str(SOCK_CHUNK)],
            env=env,
            log_stem=tmp / f"sock-send-{index}",
        )
        limit = 60 + total / 0.2e9  # generous: 0.2 GB/s would be broken anyway
        rc = recv.wait(limit)
        send.wait(10)
        if rc != 0:
            return {"error": f"receiver rc={rc}: {recv.tail()}"}
        res = json.loads(recv.output()[0].strip().splitlines()[-1])
        return {
            "bytes": res["bytes"],
            "seconds": res["seconds"],
            "gbps": res["bytes"] / res["seconds"] / 1e9,
        }
    finally:
        if send is not None:
            send.stop()
        recv.stop()


# ---------------------------------------------------------------- engine bench


class Target:
    """One implementation's ``transfer_engine_bench --mode=target``."""

    def __init__(self, impl: str, bench: str, tmp: Path) -> None:
        self.impl, self.bench, self.tmp = impl, bench, tmp
        self.child: C.Child | None = None
        self.segment = ""
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        argv = [self.bench, "--mode=target", *common_flags()]
        self.child = C.Child(
            argv, env=C.tcp_env(self.impl), log_stem=self.tmp / f"target-{self.impl}-{self.starts}"
        )
        m = self.child.wait_for(READY_RE[self.impl], 60)
        if not m:
            tail = self.child.tail()
            self.stop()
            raise RuntimeError(f"{self.impl} target did not become ready in 60 s:\n{tail}")
        self.segment = f"{m.group('host')}:{m.group('port')}"
        # the reference logs "listening on" just before it registers its buffer; the
        # warm-up (retried) catches the rest
        time.sleep(0.5)

    def alive(self) -> bool:
        return self.child is not None and self.child.poll() is None

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


def run_initiator(
    target: Target, op: str, block: int, threads: int, duration: int, tag: str
) -> dict[str, Any]:
    """One initiator run; returns its figures or ``{"error": ...}``. Always bounded."""
    batch = C.batch_for(block)
    argv = [
        target.bench,
        "--mode=initiator",
        *common_flags(),
        f"--segment_id={target.segment}",
        f"--operation={op}",
        f"--block_size={block}",
        f"--batch_size={batch}",
        f"--threads={threads}",
        f"--duration={duration}",
    ]
    child = C.Child(argv, env=C.tcp_env(target.impl), log_stem=target.tmp / tag)
    t0 = time.monotonic()
    try:
        # a run ends after its workers finish their last batch: allow for slow batches
        rc = child.wait(duration + 90)
        wall = time.monotonic() - t0
        if rc is None:
            return {"error": f"timeout after {wall:.0f} s: {child.tail(5)}", "wall_s": wall}
        out, err = child.output()
        m = RESULT_RE.search(out) or RESULT_RE.search(err)
        if rc != 0 or not m:
            return {"error": f"rc={rc}, no result line: {child.tail(8)}", "wall_s": wall}
    finally:
        child.stop()
    secs, batches = float(m.group("duration")), int(m.group("batches"))
    nbytes = batches * batch * block
    return {
        "duration_s": secs,
        "batches": batches,
        "bytes": nbytes,
        "gbps": nbytes / secs / 1e9 if secs > 0 else 0.0,
        "printed": f"{m.group('rate')} {m.group('unit')}/s",
        "ms_per_batch": secs * threads / batches * 1e3 if batches else None,
        "wall_s": wall,
    }


def ensure_target(target: Target, warmup_s: int) -> None:
    """(Re)start a dead target and warm it up; the warm-up result is discarded.

    The warm-up writes 16 MiB x 32 x 2 threads, i.e. the whole 1 GiB target buffer, so
    that no timed case pays first-touch page faults in the target (the reference
    target does not pre-fault its buffer; anchor-bench.md pain point 12).
    """
    if target.alive():
        return
    if target.child is not None:
        C.log(f"{target.impl} target died; restarting: {target.child.tail(5)}")
        target.stop()
    target.start()
    for attempt in range(3):
        res = run_initiator(
            target, "write", 16 * C.MiB, 2, warmup_s, f"warmup-{target.impl}-{target.starts}"
        )
        if "error" not in res:
            C.progress(f"{target.impl} target {target.segment} warmed up ({res['gbps']:.2f} GB/s)")
            return
        C.log(f"{target.impl} warm-up attempt {attempt + 1} failed: {res['error']}")
        time.sleep(1)
    raise RuntimeError(f"{target.impl} target {target.segment}: warm-up failed three times")


def idle_cpu(targets: dict[str, Target], seconds: float = 2.0) -> dict[str, float]:
    """CPU % each idle target uses (both stay up all run; a busy idle one skews the other)."""
    groups = {i: t.child.pid for i, t in targets.items() if t.child is not None}
    before = {i: C.group_cpu_seconds(pg) for i, pg in groups.items()}
    time.sleep(seconds)
    return {
        i: round(100 * (C.group_cpu_seconds(pg) - before[i]) / seconds, 1)
        for i, pg in groups.items()
    }


# ---------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="repetitions per case (default 3)")
    p.add_argument("--duration", type=int, default=5, help="seconds per initiator (default 5)")
    p.add_argument("--blocks", default=None, help=f"block sizes (default {DEFAULT_BLOCKS})")
    p.add_argument("--threads", default=None, help="initiator threads list (default 1,2)")
    p.add_argument("--ops", default="read,write", help="read,write (default both)")
    p.add_argument("--impl", default="ref,py", help="ref,py (default both; one is allowed)")
    p.add_argument("--quick", action="store_true", help="1 run, 1 s, threads 1 (smoke test)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up write seconds per target")
    p.add_argument(
        "--socket-gib", type=float, default=None, help="GiB per socket-pair run (default 4)"
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the child logs")
    a = p.parse_args(argv)
    if a.quick:
        a.runs, a.duration = 1, 1
        a.threads = a.threads or "1"
        a.socket_gib = a.socket_gib or 2
    a.threads = [int(t) for t in C.parse_list(a.threads or "1,2")]
    a.blocks = [C.parse_size(b) for b in C.parse_list(a.blocks or DEFAULT_BLOCKS)]
    a.ops = C.parse_list(a.ops, OPS)
    a.impls = C.parse_list(a.impl, IMPLS)
    a.socket_gib = a.socket_gib or 4
    if not a.impls or a.runs < 1 or a.duration < 1:
        p.error("need at least one impl, --runs >= 1 and --duration >= 1")
    for b in a.blocks:
        for t in a.threads:
            if b * C.batch_for(b) * t > BUFFER_SIZE:
                p.error(
                    f"block {b} x batch {C.batch_for(b)} x threads {t} exceeds the 1 GiB buffer"
                )
    return a


def summarize(cases: list[dict[str, Any]], sock: dict[str, Any] | None) -> dict[str, Any]:
    all_ref: list[bool] = []
    all_sock: list[bool] = []
    for c in cases:
        s: dict[str, Any] = {}
        for impl, runs in c["runs"].items():
            s[impl] = C.summary([r["gbps"] for r in runs if "error" not in r])
            s[impl + "_ms_per_batch"] = C.summary(
                [r["ms_per_batch"] for r in runs if r.get("ms_per_batch")]
            )
            s[impl + "_errors"] = sum(1 for r in runs if "error" in r)
        s["ratio_py_ref"] = C.ratio(s.get("py"), s.get("ref"))
        s["ratio_py_socket"] = C.ratio(s.get("py"), sock)
        s["goal_py_ge_ref"] = None if s["ratio_py_ref"] is None else s["ratio_py_ref"] >= 1.0
        s["goal_py_ge_socket"] = (
            None
            if c["block"] < SOCKET_GOAL_MIN_BLOCK or s["ratio_py_socket"] is None
            else s["ratio_py_socket"] >= SOCKET_GOAL
        )
        # per-run paired ratios (run i of py over run i of ref), for the spread
        pairs = zip(c["runs"].get("py", []), c["runs"].get("ref", []), strict=False)
        s["paired_ratios"] = [
            p["gbps"] / r["gbps"] for p, r in pairs if "error" not in p and "error" not in r
        ]
        c["summary"] = s
        if s["goal_py_ge_ref"] is not None:
            all_ref.append(s["goal_py_ge_ref"])
        if s["goal_py_ge_socket"] is not None:
            all_sock.append(s["goal_py_ge_socket"])
    return {
        "py_ge_ref_every_case": all(all_ref) if all_ref else None,
        "py_ge_ref_cases": f"{sum(all_ref)}/{len(all_ref)}",
        f"py_ge_{SOCKET_GOAL}x_socket_blocks_ge_1MiB": all(all_sock) if all_sock else None,
        "py_ge_socket_cases": f"{sum(all_sock)}/{len(all_sock)}",
    }


def render(data: dict[str, Any]) -> str:
    impls = data["config"]["impls"]
    header = ["op", "block", "threads", "batch"]
    header += [f"GB/s {i if i == 'ref' else 'pymooncake'}" for i in impls]
    header += ["py/ref", "py/socket", "py>=ref", "py>=0.8 sock"]
    rows = []
    for c in data["cases"]:
        s = c["summary"]
        row = [c["op"], C.size_label(c["block"]), str(c["threads"]), str(c["batch"])]
        for i in impls:
            txt = C.cell(s.get(i))
            if s.get(f"{i}_errors"):
                txt += f" [{s[f'{i}_errors']} failed]"
            row.append(txt)
        rr, rs = s["ratio_py_ref"], s["ratio_py_socket"]
        row += [
            "-" if rr is None else f"{rr:.2f}",
            "-" if rs is None else f"{rs:.2f}",
            C.check(s["goal_py_ge_ref"]),
            C.check(s["goal_py_ge_socket"]),
        ]
        rows.append(row)
    sock = data["socket_pair"]["summary"]
    cfg = data["config"]
    lines = [
        f"### transfer_engine_bench, tcp, P2PHANDSHAKE, 127.0.0.1 - GB/s median (min-max) over "
        f"{cfg['runs']} run(s) of {cfg['duration_s']} s",
        "",
        C.markdown_table(header, rows),
        "",
        f"Plain Python socket pair (4 MiB sendall/recv_into, {cfg['socket_gib']:g} GiB per run): "
        f"{C.cell(sock)} GB/s",
    ]
    g = data["goals"]
    lines.append(
        f"Goals: py >= ref in every case: {C.check(g['py_ge_ref_every_case'])} "
        f"({g['py_ge_ref_cases']}); py >= {SOCKET_GOAL} x socket pair for blocks >= 1 MiB: "
        f"{C.check(g[f'py_ge_{SOCKET_GOAL}x_socket_blocks_ge_1MiB'])} ({g['py_ge_socket_cases']})"
    )
    idle = data.get("targets_idle_cpu_pct")
    if idle:
        lines.append(f"Idle target CPU %: {idle}")
    lines.append(C.machine_line(data))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["_sockrecv"]:
        return _sock_recv(int(argv[1]), int(argv[2]))
    if argv[:1] == ["_socksend"]:
        return _sock_send(int(argv[1]), int(argv[2]), int(argv[3]))
    a = parse_args(argv)
    cases = [
        {"op": op, "block": b, "threads": t, "batch": C.batch_for(b), "runs": {}}
        for op in a.ops
        for b in a.blocks
        for t in a.threads
    ]
    per_run = a.duration + 1.5
    est = len(cases) * a.runs * len(a.impls) * per_run + a.runs * 3 + 15 * len(a.impls)
    C.progress(
        f"{len(cases)} cases x {a.runs} run(s) x {len(a.impls)} impl(s) x {a.duration} s; "
        f"estimated {est / 60:.1f} min"
    )
    impl_info: dict[str, Any] = {}
    benches: dict[str, str] = {}
    for impl in a.impls:
        py = C.python_for(impl)
        benches[impl] = C.script_next_to(py, "transfer_engine_bench")
        impl_info[impl] = C.impl_version(impl, py) | {"bench": benches[impl]}
    data: dict[str, Any] = {
        "bench": "te_bench",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": C.machine_info(),
        "config": {
            "runs": a.runs,
            "duration_s": a.duration,
            "impls": a.impls,
            "ops": a.ops,
            "blocks": a.blocks,
            "threads": a.threads,
            "buffer_size": BUFFER_SIZE,
            "warmup_s": a.warmup,
            "socket_gib": a.socket_gib,
            "socket_chunk": SOCK_CHUNK,
            "socket_python": sys.executable,
            "ref_env": C.REF_ENV,
            "quick": a.quick,
            "argv": argv,
        },
        "impls": impl_info,
    }
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="te_bench-"))
    targets = {impl: Target(impl, benches[impl], tmp) for impl in a.impls}
    sock_runs: list[dict[str, Any]] = []
    # socket-pair runs spread evenly over the case list so that drift hits them too
    sock_at = [i * len(cases) // a.runs for i in range(a.runs)]
    sock_total = int(a.socket_gib * C.GiB) // SOCK_CHUNK * SOCK_CHUNK
    try:
        with C.sigterm_as_interrupt():
            for impl in a.impls:
                ensure_target(targets[impl], a.warmup)
            data["targets"] = {i: t.segment for i, t in targets.items()}
            data["targets_idle_cpu_pct"] = idle_cpu(targets)
            for ci, case in enumerate(cases):
                for _ in range(sock_at.count(ci)):
                    res = socket_pair_run(tmp, len(sock_runs), sock_total)
                    sock_runs.append(res)
                    C.progress(f"socket pair: {res.get('gbps', 0):.2f} GB/s {res.get('error', '')}")
                for r in range(a.runs):
                    for impl in a.impls:
                        ensure_target(targets[impl], a.warmup)
                        tag = f"{impl}-{case['op']}-{case['block']}-{case['threads']}-{r}"
                        res = run_initiator(
                            targets[impl],
                            case["op"],
                            case["block"],
                            case["threads"],
                            a.duration,
                            tag,
                        )
                        case["runs"].setdefault(impl, []).append(res)
                        (C.log if "error" in res else C.progress)(
                            f"{impl:3} {case['op']:5} {C.size_label(case['block']):>7} "
                            f"x{case['batch']:<3} t{case['threads']} run {r + 1}/{a.runs}: "
                            + (res["error"] if "error" in res else f"{res['gbps']:.3f} GB/s")
                        )
    except KeyboardInterrupt:
        C.log("interrupted; stopping children and writing what was measured")
        data["interrupted"] = True
    finally:
        for t in targets.values():
            t.stop()
        if a.keep_logs:
            C.log(f"child logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    data["wall_s"] = time.monotonic() - t_start
    data["machine"]["loadavg_end"] = os.getloadavg()
    sock_summary = C.summary([r["gbps"] for r in sock_runs if "error" not in r])
    data["socket_pair"] = {"runs": sock_runs, "summary": sock_summary}
    data["cases"] = cases
    data["goals"] = summarize(cases, sock_summary)
    C.publish("te_bench", data, render(data))
    return 130 if data.get("interrupted") else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (RuntimeError, subprocess.SubprocessError, ValueError) as exc:
        print(f"te_bench: {exc}", file=sys.stderr)
        sys.exit(1)
