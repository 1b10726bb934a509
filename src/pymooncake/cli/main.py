"""``pymooncake``: the project's own command (cluster, demo, doctor, version).

``pymooncake cluster`` (the default) runs a local Mooncake Store cluster: a
master with its embedded HTTP metadata server and a storage node contributing
memory, on 127.0.0.1, and prints how to connect to it.  Authentication is on:
a random cluster token (or ``PYMOONCAKE_CLUSTER_TOKEN`` when set) protects every
port, is written to a file only its user can read, and the command prints how
clients pass it (``export PYMOONCAKE_CLUSTER_TOKEN=$(cat FILE)``); ``--insecure``
runs an open cluster instead.  On a terminal a status line on stderr shows the
start-up steps (pre-faulting a large segment takes a while).

``pymooncake demo`` starts a target engine in a child process and an
initiator here, both on 127.0.0.1 in P2P handshake mode, moves data both ways
at several block sizes, checks the bytes, and prints throughput.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from .. import __version__
from .._authio import TOKEN_ENV, ClusterSecurity
from ..config import EngineConfig
from ..errors import ConfigError, MooncakeError
from ..transfer import TransferEngine, TransferRequest
from ._logsetup import setup_logging
from ._progress import Progress
from .doctor import add_parser as _add_doctor_parser

__all__ = ["main"]

_MiB = 1 << 20


def _target_main(conn: Connection, buffer_bytes: int) -> None:
    setup_logging(2)
    with TransferEngine("127.0.0.1", "P2PHANDSHAKE", config=EngineConfig.from_env()) as engine:
        region = engine.allocate(buffer_bytes, populate=True)
        conn.send((engine.segment_name, region.addr))
        conn.recv()  # wait for "stop"


def _human(n: int) -> str:
    for unit, size in (("MiB", _MiB), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def _demo(args: argparse.Namespace) -> int:
    blocks = [int(b) for b in args.blocks.split(",")]
    batch = args.batch
    need = max(blocks) * batch
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_target_main, args=(child, need), daemon=True)
    proc.start()
    try:
        if not parent.poll(30):
            print("target engine did not start within 30 s", file=sys.stderr)
            return 1
        segment, remote = parent.recv()
        print(f"target engine: segment {segment} (pid {proc.pid}), {_human(need)} registered")
        with TransferEngine("127.0.0.1", "P2PHANDSHAKE", config=EngineConfig.from_env()) as engine:
            local = engine.allocate(need, populate=True)
            print(f"initiator engine: segment {engine.segment_name}")
            print()
            print(f"| {'op':5} | {'block':>8} | {'batch':>5} | {'GB/s':>6} | {'check':5} |")
            print(f"|{'-' * 7}|{'-' * 10}|{'-' * 7}|{'-' * 8}|{'-' * 7}|")
            for block in blocks:
                pattern = os.urandom(block * batch)
                local.view[: len(pattern)] = pattern
                for op in ("write", "read"):
                    if op == "read":
                        local.view[: len(pattern)] = bytes(len(pattern))
                    maker = TransferRequest.write if op == "write" else TransferRequest.read
                    reqs = [
                        maker(local.addr + i * block, remote + i * block, block)
                        for i in range(batch)
                    ]
                    n = 0
                    start = time.perf_counter()
                    while True:
                        engine.transfer(segment, reqs)
                        n += 1
                        elapsed = time.perf_counter() - start
                        if elapsed >= args.seconds:
                            break
                    ok = bytes(local.view[: len(pattern)]) == pattern
                    gbps = n * batch * block / elapsed / 1e9
                    check = "ok" if ok else "BAD"
                    print(f"| {op:5} | {_human(block):>8} | {batch:>5} | {gbps:6.2f} | {check:5} |")
                    if not ok:
                        return 1
        return 0
    except MooncakeError as exc:
        print(f"pymooncake demo: {exc}", file=sys.stderr)
        return 1
    finally:
        try:
            parent.send("stop")
        except OSError:
            pass
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _pick_port(wanted: int) -> int:
    """``wanted`` if it is free on 127.0.0.1, else 0 (any free port)."""
    import socket

    if wanted == 0:
        return 0
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", wanted))
        except OSError:
            return 0
    return wanted


def _default_token_dir() -> Path:
    """A directory only this user can enter: $XDG_RUNTIME_DIR/pymooncake (a per-user
    tmpfs) or ~/.cache/pymooncake."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    base = Path(runtime) if runtime and os.path.isdir(runtime) else Path.home() / ".cache"
    return base / "pymooncake"


def _write_token(path: Path, token: str) -> None:
    """Write ``token`` to ``path``, readable by this user only (0600; never follows a
    link; a stale file of an earlier run is replaced)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")


@dataclass
class _Auth:
    """How ``pymooncake cluster`` authenticates: the token and where it came from."""

    token: str
    #: the file clients read it from ("" = it came from the environment / none)
    file: Path | None = None
    #: remove ``file`` on exit (this run generated it at the default place)
    owned: bool = False
    source: str = ""


def _cluster_auth(args: argparse.Namespace) -> _Auth:
    """The cluster's token: none with --insecure; the --token-file's when that file
    exists; PYMOONCAKE_CLUSTER_TOKEN's when set; else a new random one.

    Raises:
        ConfigError: an unreadable or empty --token-file.
    """
    from .master import read_token_file

    if args.insecure:
        return _Auth("", source="--insecure")
    if args.token_file and os.path.exists(args.token_file):
        token = read_token_file(args.token_file, what="--token-file")
        return _Auth(token, Path(args.token_file), source=f"--token-file={args.token_file}")
    env_token = os.environ.get(TOKEN_ENV, "")
    if env_token and not args.token_file:
        return _Auth(env_token, source=TOKEN_ENV)
    token = env_token or secrets.token_urlsafe(32)
    if args.token_file:
        return _Auth(token, Path(args.token_file), source="generated")
    return _Auth(token, None, owned=True, source="generated")


def _print_auth(auth: _Auth, meta_url: str, metrics_url: str) -> None:
    if not auth.token:
        print(
            "  authentication:  OFF (--insecure): anyone who can reach these ports can list, "
            "read, overwrite and remove every object"
        )
        return
    print(f"  authentication:  ON, cluster token ({auth.source})")
    if auth.file is not None:
        print(f"  token file:      {auth.file}    (mode 0600; keep it secret)")
        print("Clients pass the token through the environment:")
        print(f"  export {TOKEN_ENV}=$(cat {auth.file})")
    else:
        print(f"Clients pass the token through the environment (as this shell has it): {TOKEN_ENV}")
    print(
        "  (mooncake.store, mooncake.engine, mooncake_client and mooncake_master read it; "
        "mooncake_master also takes --cluster_token_file=FILE)"
    )
    print(
        "Admin HTTP needs signed requests (except /metrics, /health): "
        'python -c "from pymooncake._authio import ClusterSecurity, http_request; '
        f"print(http_request('GET', '{metrics_url}/get_all_keys', "
        "security=ClusterSecurity.from_env(), context=b'master-admin'))\""
    )


def _cluster(args: argparse.Namespace) -> int:
    import signal
    import threading

    from ..store import MasterConfig, StoreClient, StoreClientConfig, parse_size
    from ..store.master import ThreadedMaster, tune_gc_for_master

    segment = parse_size(args.segment, what="--segment")
    try:
        auth = _cluster_auth(args)
        security = ClusterSecurity.from_env()
        security = ClusterSecurity(
            auth.token, security.tls_cert_file, security.tls_key_file, security.tls_ca_file
        )
    except ConfigError as exc:
        print(f"pymooncake cluster: {exc}", file=sys.stderr)
        return 1
    ports = {
        name: _pick_port(p)
        for name, p in (
            ("rpc", args.port),
            ("metadata", args.metadata_port),
            ("metrics", args.metrics_port),
        )
    }
    tune_gc_for_master()
    progress = Progress()  # a status line while starting, on a terminal only
    progress.step(f"starting the master on {args.host}")
    master = ThreadedMaster(
        MasterConfig(default_kv_lease_ttl_ms=args.lease_ttl_ms),
        host=args.host,
        port=ports["rpc"],
        metadata_host=args.host,
        metadata_port=ports["metadata"],
        metrics_host=args.host,
        metrics_port=ports["metrics"],
        security=security,
    )
    node: StoreClient | None = None
    try:
        if auth.owned:
            auth.file = _default_token_dir() / f"cluster-{master.addresses.rpc[1]}.token"
        if auth.file is not None and not auth.file.exists():
            _write_token(auth.file, auth.token)
        meta_url = master.metadata_url or ""
        engine = EngineConfig.from_env().replace(
            tcp_bind_address=args.host, cluster_token=auth.token
        )
        progress.step(
            f"starting the storage node: mapping and pre-faulting {_human(segment)} "
            "(PYMOONCAKE_PREFAULT=0 skips the pre-fault)"
        )
        node = StoreClient(
            StoreClientConfig(
                args.host, meta_url, master.rpc_address, segment, 16 << 20, engine=engine
            )
        )
        # self-check: one object through the whole path
        progress.step("self-check: put, get and remove one object")
        probe = os.urandom(4096)
        node.put("pymooncake-cluster-self-check", probe)
        ok = node.get("pymooncake-cluster-self-check") == probe
        node.remove("pymooncake-cluster-self-check", force=True)
        progress.clear()
        moved = [
            f"{n} (wanted {w})"
            for n, w in (
                ("rpc", args.port),
                ("metadata", args.metadata_port),
                ("metrics", args.metrics_port),
            )
            if ports[n] != w
        ]
        print("pymooncake local cluster is up" + ("" if ok else " (SELF-CHECK FAILED)"))
        print(f"  master:          {master.rpc_address}    (master_server_addr / MOONCAKE_MASTER)")
        print(f"  metadata server: {meta_url}    (metadata_server / MOONCAKE_TE_META_DATA_SERVER)")
        print(
            f"  metrics:         {master.metrics_url}/metrics    (/health, /get_all_keys, /get_all_segments)"
        )
        print(f"  cluster page:    {master.metrics_url}/    (live segments, clients and rates)")
        print(f"  storage node:    segment {node.hostname} contributing {_human(segment)}")
        if moved:
            print(f"  note: ports in use, picked free ones for: {', '.join(moved)}")
        _print_auth(auth, meta_url, master.metrics_url or "")
        print(
            "Connect from Python (another process"
            + (", token exported" if auth.token else "")
            + "):"
        )
        print("  from mooncake.store import MooncakeDistributedStore")
        print("  store = MooncakeDistributedStore()")
        print(
            f'  store.setup("127.0.0.1", "{meta_url}", 0, 64 << 20, "tcp", "", "{master.rpc_address}")'
        )
        print('  store.put("key", b"value"); store.get("key")')
        print("Press Ctrl-C to stop.", flush=True)
        if not ok:
            return 1
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(args.run_seconds if args.run_seconds else 3600):
            if args.run_seconds:
                break
        print("stopping", flush=True)
        return 0
    except (MooncakeError, OSError) as exc:
        progress.clear()
        print(f"pymooncake cluster: {exc}", file=sys.stderr)
        return 1
    finally:
        progress.clear()
        if node is not None:
            node.close()
        master.close()
        if auth.owned and auth.file is not None:
            auth.file.unlink(missing_ok=True)


def _version(args: argparse.Namespace) -> int:
    print(f"pymooncake {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pymooncake", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pymooncake {__version__}")
    sub = parser.add_subparsers(dest="command")
    cluster = sub.add_parser(
        "cluster", help="local store cluster: master + metadata server + storage node"
    )
    cluster.add_argument("--host", default="127.0.0.1", help="address to listen on")
    cluster.add_argument(
        "--port", type=int, default=50051, help="master RPC port (busy: any free one)"
    )
    cluster.add_argument(
        "--metadata-port", type=int, default=8080, help="HTTP metadata server port"
    )
    cluster.add_argument("--metrics-port", type=int, default=9003, help="metrics/admin HTTP port")
    cluster.add_argument("--segment", default="1 GiB", help="memory the storage node contributes")
    cluster.add_argument(
        "--lease-ttl-ms", type=int, default=10_000, help="read lease (--default_kv_lease_ttl)"
    )
    cluster.add_argument(
        "--run-seconds", type=float, default=0, help="stop after this long (0 = until Ctrl-C)"
    )
    cluster.add_argument(
        "--insecure",
        action="store_true",
        help="no cluster token: every port open to anyone who can reach it",
    )
    cluster.add_argument(
        "--token-file",
        default="",
        help="cluster token file: used when it exists, else a new token is written there "
        "(default: a new token in $XDG_RUNTIME_DIR/pymooncake or ~/.cache/pymooncake, "
        f"cluster-PORT.token, removed on exit; {TOKEN_ENV} when set)",
    )
    cluster.set_defaults(func=_cluster)
    demo = sub.add_parser("demo", help="local transfer demo: target + initiator on 127.0.0.1")
    demo.add_argument(
        "--blocks", default="4096,65536,1048576,16777216", help="block sizes, comma-separated"
    )
    demo.add_argument("--batch", type=int, default=16, help="requests per transfer call")
    demo.add_argument("--seconds", type=float, default=1.0, help="time per case")
    demo.set_defaults(func=_demo)
    _add_doctor_parser(sub)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        args = parser.parse_args(["cluster", *(argv or [])])
    setup_logging(2)  # the demo runs on loopback on purpose: no loopback warnings
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
