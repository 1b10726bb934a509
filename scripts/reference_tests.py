#!/usr/bin/env python3
"""Run the reference project's own Python tests against pymooncake, the way its CI runs them.

The reference's tests live in its repository (``mooncake-wheel/tests`` and
``scripts/test_*.py``), not in its wheel, and this repository does not carry
copies of them: point ``--reference`` at a checkout of kvcache-ai/Mooncake.

    python scripts/reference_tests.py --reference ~/src/Mooncake [--only dummy,tensor]

Each step starts the servers the reference's ``scripts/run_tests.sh`` and
``.github/workflows/ci.yml`` start (``mooncake_http_metadata_server --port 8080``,
``mooncake_master`` with the same flags, ``mooncake_client``), runs the test with the
same environment, stops the servers, and records PASS/FAIL and the time.  The
reference hard-codes its ports (8080, 50051, 50052), so as root the whole run
happens in a private network namespace (``unshare --net``, loopback only): nothing
else on the machine is touched and nothing else can collide with those ports.
The table is printed and written as JSON (``--json``); logs go to ``--logs``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

META = "http://127.0.0.1:8080/metadata"
LEASE = {"MC_METADATA_SERVER": META, "DEFAULT_KV_LEASE_TTL": "500"}
CI_ENV = {
    "MOONCAKE_MASTER": "127.0.0.1:50051",
    "MOONCAKE_TE_META_DATA_SERVER": META,
    "MOONCAKE_PROTOCOL": "tcp",
    "LOCAL_HOSTNAME": "127.0.0.1",
}
BASE_MASTER = ["mooncake_master", "--default_kv_lease_ttl=500"]
CI_MASTER = [
    "mooncake_master",
    "--default_kv_lease_ttl=500",
    "--eviction_high_watermark_ratio=0.95",
    "--cluster_id=ci_test_cluster",
    "--port",
    "50051",
    "--enable_http_metadata_server=true",
]


@dataclass(frozen=True)
class Step:
    """One test as the reference's CI runs it: servers, then a command in a directory."""

    name: str
    cwd: str  # relative to the reference checkout
    command: list[str]
    env: dict[str, str]
    servers: list[list[str]] = field(default_factory=list)
    metadata_server: bool = True  # the standalone one on :8080
    timeout_s: float = 600.0
    #: commands run concurrently with ``command`` that must pass too
    siblings: list[list[str]] = field(default_factory=list)


def steps(ssd_dir: str) -> list[Step]:
    tests = "mooncake-wheel/tests"
    py = "python"
    fs_master = [*BASE_MASTER, f"--root_fs_dir={ssd_dir}"]
    promo_master = [
        *fs_master,
        "--enable_offload=true",
        "--offload_on_evict=true",
        "--promotion_on_hit=true",
        "--promotion_admission_threshold=1",
    ]
    promo_env = {
        **LEASE,
        "MOONCAKE_OFFLOAD_FILE_STORAGE_PATH": ssd_dir,
        "MOONCAKE_OFFLOAD_BUCKET_KEYS_LIMIT": "10",
        "MOONCAKE_OFFLOAD_BUCKET_SIZE_LIMIT_BYTES": "10485760",
    }
    te_env = {"MC_METADATA_SERVER": META, "MC_FORCE_TCP": "true"}
    return [
        Step(
            "transfer_engine",
            tests,
            [py, "transfer_engine_initiator_test.py"],
            te_env,
            servers=[[py, "transfer_engine_target.py"]],
        ),
        Step(
            "distributed_object_store",
            tests,
            [py, "test_distributed_object_store.py"],
            LEASE,
            servers=[BASE_MASTER],
        ),
        Step(
            "replicated_distributed_object_store",
            tests,
            [py, "test_replicated_distributed_object_store.py"],
            LEASE,
            servers=[BASE_MASTER],
        ),
        Step("put_get_tensor", tests, [py, "test_put_get_tensor.py"], LEASE, [BASE_MASTER]),
        Step(
            "safetensor_functions",
            tests,
            [py, "test_safetensor_functions.py"],
            LEASE,
            [BASE_MASTER],
        ),
        Step(
            "dummy_client",
            tests,
            [py, "test_dummy_client.py"],
            LEASE,
            servers=[BASE_MASTER, ["mooncake_client"]],
        ),
        Step(
            "multi_dummy_clients",
            tests,
            [py, "test_multi_dummy_clients.py", "--client-id", "client1"],
            LEASE,
            servers=[BASE_MASTER, ["mooncake_client"]],
            siblings=[[py, "test_multi_dummy_clients.py", "--client-id", "client2"]],
        ),
        Step(
            "ssd_offload_in_evict",
            tests,
            [py, "test_ssd_offload_in_evict.py"],
            LEASE,
            servers=[fs_master],
        ),
        Step(
            "promotion_on_hit",
            tests,
            [py, "test_promotion_on_hit.py"],
            promo_env,
            servers=[promo_master],
        ),
        Step("cli", tests, [py, "test_cli.py"], {}, metadata_server=False),
        Step(
            "distributed_object_store (embedded metadata server)",
            tests,
            [py, "test_distributed_object_store.py"],
            LEASE,
            servers=[[*BASE_MASTER, "--enable_http_metadata_server=true"]],
            metadata_server=False,
        ),
        Step(
            "tensor_api",
            ".",
            [py, "scripts/test_tensor_api.py", "-n", "1"],
            CI_ENV,
            servers=[CI_MASTER],
            metadata_server=False,
        ),
        Step(
            "async_store",
            ".",
            [py, "scripts/test_async_store.py"],
            CI_ENV,
            servers=[CI_MASTER],
            metadata_server=False,
        ),
        Step(
            "copy_move_api",
            ".",
            [py, "scripts/test_copy_move_api.py"],
            CI_ENV,
            servers=[CI_MASTER],
            metadata_server=False,
        ),
        Step(
            "drain_http_api",
            ".",
            [py, "scripts/test_drain_http_api.py", "--timeout-sec", "90"],
            CI_ENV,
            servers=[CI_MASTER],
            metadata_server=False,
        ),
        Step(
            "upsert_api",
            ".",
            [py, "scripts/test_upsert_api.py"],
            CI_ENV,
            servers=[CI_MASTER],
            metadata_server=False,
        ),
    ]


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.args!r} is not listening on 127.0.0.1:{port} after {timeout_s} s")


def _port_of(argv: list[str]) -> int | None:
    name = Path(argv[0]).name
    if name == "mooncake_http_metadata_server":
        return 8080
    if name == "mooncake_master":
        return 50051
    if name == "mooncake_client":
        return 50052
    return None


@contextmanager
def _servers(argvs: list[list[str]], env: dict[str, str], cwd: Path, log: Path) -> Iterator[None]:
    procs: list[subprocess.Popen[bytes]] = []
    with open(log, "ab") as out:
        try:
            for argv in argvs:
                out.write(f"$ {' '.join(argv)}\n".encode())
                out.flush()
                proc = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                procs.append(proc)
                port = _port_of(argv)
                if port is not None:
                    _wait_port(port, proc)
                else:
                    time.sleep(1.0)  # as the reference's script does
            yield
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in reversed(procs):
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def run_step(step: Step, ref: Path, logs: Path, base_env: dict[str, str]) -> dict[str, object]:
    env = {**base_env, **step.env}
    log = logs / (step.name.split()[0] + ".log")
    log.write_bytes(b"")
    cwd = ref / step.cwd
    started = time.monotonic()
    verdict, detail = "FAIL", ""
    servers = [["mooncake_http_metadata_server", "--port", "8080"]] if step.metadata_server else []
    try:
        with _servers(servers + step.servers, env, cwd, log), open(log, "ab") as out:
            out.write(f"$ {' '.join(step.command)}\n".encode())
            out.flush()
            others = [
                subprocess.Popen(s, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
                for s in step.siblings
            ]
            try:
                rc = subprocess.run(
                    step.command,
                    cwd=cwd,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=step.timeout_s,
                ).returncode
                rcs = [rc] + [p.wait(step.timeout_s) for p in others]
            finally:
                for p in others:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
        if all(r == 0 for r in rcs):
            verdict = "PASS"
        else:
            detail = f"exit codes {rcs}"
    except subprocess.TimeoutExpired:
        detail = f"timed out after {step.timeout_s:.0f} s"
    except RuntimeError as exc:
        detail = str(exc)
    seconds = time.monotonic() - started
    if verdict == "FAIL" and not detail.startswith("timed"):
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        detail = (detail + " | " + " / ".join(t.strip() for t in tail))[:300]
    return {"step": step.name, "result": verdict, "seconds": round(seconds, 1), "detail": detail}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", required=True, type=Path, help="checkout of kvcache-ai/Mooncake")
    p.add_argument("--only", default="", help="comma-separated step names (prefix match)")
    p.add_argument("--json", type=Path, default=Path("bench/results/reference_tests.json"))
    p.add_argument("--logs", type=Path, default=None, help="directory for per-step logs")
    p.add_argument("--no-netns", action="store_true", help="run on this host's loopback")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    ref = args.reference.resolve()
    if not (ref / "mooncake-wheel" / "tests").is_dir():
        p.error(f"{ref} has no mooncake-wheel/tests: give the root of a Mooncake checkout")
    if not args.inside and not args.no_netns and os.geteuid() == 0 and shutil.which("unshare"):
        # a private network namespace: the reference's fixed ports collide with nothing
        cmd = [
            "unshare",
            "--net",
            "--",
            "sh",
            "-c",
            # as the reference's CI: the fixed server ports are never handed out as
            # ephemeral source ports (a client socket on :50052 blocks mooncake_client)
            "ip link set lo up && sysctl -qw net.ipv4.ip_local_reserved_ports=8080,9003,50051,50052"
            ' && exec "$@"',
            "sh",
            sys.executable,
            __file__,
            *(sys.argv[1:] if argv is None else argv),
            "--inside",
        ]
        return subprocess.call(cmd)
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(proxy, None)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="reference-tests-"))
    logs.mkdir(parents=True, exist_ok=True)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mooncake-ssd-") as ssd_dir:
        for step in steps(ssd_dir):
            if wanted and not any(step.name.startswith(w) for w in wanted):
                continue
            row = run_step(step, ref, logs, env)
            rows.append(row)
            print(
                f"{row['result']:4}  {row['seconds']:7.1f} s  {row['step']}  {row['detail']}",
                flush=True,
            )
    passed = sum(r["result"] == "PASS" for r in rows)
    print(f"\n{passed}/{len(rows)} passed; logs in {logs}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"reference": str(ref), "steps": rows}, indent=2))
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
