"""``mooncake_client``: a storage node that contributes memory to a Mooncake Store.

Takes the reference's flags and defaults (``mooncake-store/src/real_client_main.cpp``),
starts a :class:`~pymooncake.store.StoreClient` that mounts
``--global_segment_size`` bytes at the master, and prints one line to stdout
once the segment is mounted::

    mooncake_client ready: segment 10.0.0.5:15123 contributes 4294967296 bytes to the master at 127.0.0.1:50051

It also serves *dummy clients* (``MooncakeDistributedStore.setup_dummy`` in
serving ranks on this host) on ``--port`` and on the abstract UNIX socket
``@mooncake_client_<port>.sock``, and prints::

    mooncake_client serving dummy clients on 0.0.0.0:50052 (memory socket @mooncake_client_50052.sock)

SIGINT/SIGTERM stop the dummy-client service, unmount the segment (objects
stored in it disappear), close the client and exit with status 0.  A failing
setup (master unreachable, bad size, port in use ...) is reported on one
stderr line with exit status 1.

The dummy-client protocol is pymooncake's own (the reference's coro_rpc /
struct_pack encoding cannot be reproduced from Python): pymooncake dummies
talk to this ``mooncake_client``, reference dummies to the reference's.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, Final

from .. import __version__
from .._authio import ClusterSecurity
from .._net import first_non_loopback_ipv4, join_host_port, split_host_port
from ..errors import MooncakeError, PortInUse
from ..store import StoreClient, StoreClientConfig
from ..store._config import parse_size
from ..store._dummy_service import DummyService, DummyServiceConfig
from ..store._http import ClientHttpServer, start_client_http_server
from ..store._metrics import ClientMetricsSettings
from ._gflags import Flag, FlagError, parse_flags, usage
from ._logsetup import setup_logging

__all__ = ["FLAGS", "main"]

log = logging.getLogger("pymooncake.cli.store_client")

PROG: Final = "mooncake_client"

# Defaults are the reference's (real_client_main.cpp DEFINE_*, client HTTP port 9300).
FLAGS: Final[tuple[Flag, ...]] = (
    Flag(
        "host",
        str,
        "0.0.0.0",
        "this node's address as other nodes reach it; ip:port also fixes the transfer "
        "engine's port; 0.0.0.0 = this host's first non-loopback IPv4 address",
    ),
    Flag(
        "port",
        int,
        50052,
        "port serving dummy clients (setup_dummy) on --host; 0 = any free port",
    ),
    Flag("metadata_server", str, "http://127.0.0.1:8080/metadata", "metadata server"),
    Flag(
        "master_server_address",
        str,
        "127.0.0.1:50051",
        "the master's host:port, or etcd://h1:2379;h2:2379 to follow the leader of masters "
        "started with --enable_ha=true (cluster id: MC_STORE_CLUSTER_ID)",
    ),
    Flag("protocol", str, "tcp", "transfer protocol"),
    Flag("device_names", str, "", "RDMA device names (unused with tcp)"),
    Flag("global_segment_size", str, "4 GB", "memory contributed to the pool (e.g. 64 MB, 4 GB)"),
    Flag("local_buffer_size", str, "0", "local buffer size (e.g. 16MB, 1GB)"),
    Flag(
        "threads",
        int,
        1,
        "dummy-client RPC threads: accepted; pymooncake serves each connection on its own thread",
    ),
    Flag(
        "dummy_client_ttl_sec",
        int,
        10,
        "unmap the shared memory of a dummy client silent this long (pymooncake; the reference "
        "hard-codes 10 s)",
    ),
    Flag("tenant_id", str, "default", "tenant identifier (multi-tenancy is not available)"),
    Flag(
        "enable_offload",
        bool,
        False,
        "offload objects to an SSD tier under MOONCAKE_OFFLOAD_FILE_STORAGE_PATH "
        "(default /data/file_storage; the master needs --enable_offload too)",
    ),
    Flag(
        "start_offload_rpc_server",
        bool,
        True,
        "serve reads of this node's SSD tier (pymooncake always serves them with --enable_offload)",
    ),
    Flag(
        "enable_http_server",
        bool,
        False,
        "serve /health, /metrics and /metrics/summary on --http_port",
    ),
    Flag("http_port", int, 9300, "port of the client HTTP server (0 = any free port)"),
    Flag("version", bool, False, "print the version and exit"),
)


class _Refused(Exception):
    """A setting that stops the node from starting (one line for stderr)."""


def _local_hostname(host_flag: str) -> str:
    """``--host`` as the engine's local hostname (0.0.0.0 -> this host's LAN address)."""
    try:
        host, port = split_host_port(host_flag)
    except MooncakeError as exc:
        raise _Refused(f"--host={host_flag}: {exc}") from exc
    if host in ("0.0.0.0", "::"):
        host = first_non_loopback_ipv4() or "127.0.0.1"
        log.info("--host=%s: advertising this host as %s", host_flag, host)
    return join_host_port(host, port) if port else host


def _config(values: dict[str, Any]) -> StoreClientConfig:
    if values["enable_http_server"] and not 0 <= values["http_port"] <= 65535:
        raise _Refused(
            f"Invalid client HTTP server port: {values['http_port']} (0..65535, 0 = any free port)"
        )
    try:
        segment = parse_size(values["global_segment_size"], what="--global_segment_size")
        buffer = parse_size(values["local_buffer_size"], what="--local_buffer_size")
    except MooncakeError as exc:
        raise _Refused(str(exc)) from exc
    if values["tenant_id"] != "default":
        log.warning(
            "--tenant_id=%s has no effect: multi-tenancy is not available", values["tenant_id"]
        )
    if values["device_names"]:
        log.info(
            "--device_names=%s is unused with protocol %s",
            values["device_names"],
            values["protocol"],
        )
    return StoreClientConfig(
        local_hostname=_local_hostname(values["host"]),
        metadata_server=values["metadata_server"],
        master_server_addr=values["master_server_address"],
        # reference: the etcd leader coordinator reads MC_STORE_CLUSTER_ID (no flag)
        cluster_id=os.environ.get("MC_STORE_CLUSTER_ID", "").strip() or "mooncake_cluster",
        global_segment_size=segment,
        local_buffer_size=buffer,
        protocol=values["protocol"],
        metrics=ClientMetricsSettings.from_env(os.environ),
        enable_ssd_offload=values["enable_offload"],
        ssd_offload_path=os.environ.get("MOONCAKE_OFFLOAD_FILE_STORAGE_PATH", ""),
    )


def _run(values: dict[str, Any]) -> int:
    """Set up, wait for SIGINT/SIGTERM, tear down.  Signals are blocked meanwhile
    (also in the client's threads, which inherit the mask) and taken with sigwait."""
    try:
        config = _config(values)
    except _Refused as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    try:
        client = StoreClient(config)
    except PortInUse as exc:
        print(f"{PROG}: {exc}; or choose another port in --host=ip:port", file=sys.stderr)
        return 1
    except MooncakeError as exc:
        text = " ".join(str(exc).split())
        print(f"{PROG}: failed to set up the client: {text}", file=sys.stderr)
        return 1
    http: ClientHttpServer | None = None
    dummies: DummyService | None = None
    try:
        try:
            dummies = DummyService(client, _dummy_config(values))
        except MooncakeError as exc:
            print(f"{PROG}: cannot serve dummy clients: {exc}", file=sys.stderr)
            return 1
        print(
            f"{PROG} serving dummy clients on {dummies.address} (memory socket "
            f"@{dummies.ipc_name[1:]})",
            flush=True,
        )
        if values["enable_http_server"]:
            http = start_client_http_server(client, values["http_port"])
            if http is not None:
                print(
                    f"client HTTP server listening on {http.url} (/health, /metrics, "
                    "/metrics/summary)",
                    flush=True,
                )
        size = sum(s.size for s in client.segments)
        if client.ssd is not None:
            print(
                f"{PROG} SSD tier at {client.ssd.settings.path} "
                f"({client.ssd.storage.capacity_bytes} bytes) served on {client.ssd.endpoint}",
                flush=True,
            )
        print(
            f"{PROG} ready: segment {client.hostname} contributes {size} bytes to the master at "
            f"{config.master_server_addr}",
            flush=True,
        )
        sig = signal.sigwait({signal.SIGINT, signal.SIGTERM})
        log.info("%s received: unmounting the segment and exiting", signal.Signals(sig).name)
    finally:
        if dummies is not None:
            dummies.close()
        if http is not None:
            http.close()
        client.close()
    return 0


def _dummy_config(values: dict[str, Any]) -> DummyServiceConfig:
    """The dummy-client service on --port, bound to --host's address."""
    host, _ = split_host_port(values["host"])
    if not 0 <= values["port"] <= 65535:
        raise MooncakeError(f"--port={values['port']} is not a port (0..65535, 0 = any free port)")
    if values["dummy_client_ttl_sec"] <= 0:
        raise MooncakeError("--dummy_client_ttl_sec must be positive")
    return DummyServiceConfig(
        host=host,
        port=values["port"],
        ttl_s=float(values["dummy_client_ttl_sec"]),
        security=ClusterSecurity.from_env(),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the storage node until SIGINT/SIGTERM.

    Returns:
        0 after a signal (or ``--help``/``--version``), 1 when setup fails
        (one line on stderr says why).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("--help", "-help", "-h", "--helpfull", "--helpshort") for a in args):
        print(usage(PROG, "Mooncake Store storage node (pymooncake)", FLAGS))
        return 0
    try:
        values = parse_flags(FLAGS, args)
    except FlagError as exc:
        print(exc, file=sys.stderr)
        return 1
    if values["version"]:
        print(f"{PROG} version {__version__} (pymooncake)")
        return 0
    setup_logging(values["minloglevel"], values["v"])
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        return _run(values)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


if __name__ == "__main__":
    sys.exit(main())
