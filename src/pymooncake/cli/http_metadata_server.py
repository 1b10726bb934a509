"""``mooncake_http_metadata_server``: run the HTTP metadata server in the foreground.

Usage: ``mooncake_http_metadata_server [--host 0.0.0.0] [--port 8080] [--log-level INFO]``
(the reference's flags and defaults).  pymooncake's ``--snapshot-path FILE`` keeps the
entries in FILE across restarts (``--snapshot-fsync`` flushes it to the disk after
every change); without it the entries live in memory only, as on the reference's
servers, and a restarted server knows no engine until each engine starts again.  Once listening it prints one line to
stdout, ``HTTP metadata server listening on http://HOST:PORT/metadata``, with
the real port when ``--port 0`` was given.  SIGINT/SIGTERM stop it with exit
status 0; a port that cannot be bound is reported on one stderr line and exit
status 1.

``PYMOONCAKE_CLUSTER_TOKEN`` (read here, at start-up) makes every request but
``/health`` require the cluster token; ``PYMOONCAKE_TLS_CERT/_KEY/_CA`` serve
HTTPS (see docs/security.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Final

from .._authio import ClusterSecurity
from ..errors import MooncakeError, PortInUse
from ..transfer.metadata._snapshot import MetadataSnapshot
from ..transfer.metadata.server import MetadataServer
from ._serve import lan_hint, stop_on_signals

__all__ = ["build_parser", "main"]

log = logging.getLogger("pymooncake.cli.http_metadata_server")

PROG: Final = "mooncake_http_metadata_server"
#: reference defaults (mooncake-wheel/mooncake/http_metadata_server.py)
DEFAULT_HOST: Final = "0.0.0.0"
DEFAULT_PORT: Final = 8080
_LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port {text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0..65535 (0 = any free port)")
    return port


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="HTTP metadata server for Mooncake (an alternative to etcd). Engines use "
        "metadata_server='http://HOST:PORT/metadata'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help="port to listen on")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind to")
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=_LOG_LEVELS,
        default="INFO",
        help="logging level",
    )
    parser.add_argument(
        "--snapshot-path",
        default="",
        help="pymooncake: keep the entries in this file (rewritten after every change and "
        "read at start-up), so that a restarted server still knows every engine; empty: "
        "in memory only, as the reference",
    )
    parser.add_argument(
        "--snapshot-fsync",
        action="store_true",
        help="pymooncake: flush the snapshot file to the disk after every change (a host "
        "crash keeps it too)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGINT/SIGTERM.

    Returns:
        0 after a signal, 1 if the server could not start (message on stderr).
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        security = ClusterSecurity.from_env()
    except MooncakeError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    try:
        snapshot = (
            MetadataSnapshot(args.snapshot_path, fsync=args.snapshot_fsync)
            if args.snapshot_path
            else None
        )
        return asyncio.run(_serve(args.host, args.port, security, snapshot))
    except KeyboardInterrupt:  # a signal that arrived before the handlers were installed
        return 0


async def _serve(
    host: str, port: int, security: ClusterSecurity, snapshot: MetadataSnapshot | None = None
) -> int:
    metadata = MetadataServer(snapshot=snapshot)
    try:
        server = metadata.http_server(host, port, security=security)
        await server.start()
    except PortInUse as exc:
        print(f"{PROG}: {exc}; or pass --port 0 for any free port", file=sys.stderr)
        return 1
    except MooncakeError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    with stop_on_signals() as stop:
        try:
            print(f"HTTP metadata server listening on {metadata.url(server)}", flush=True)
            if security.key is not None:
                log.info("cluster token set: every request but /health must be signed with it")
            lan_hint(
                log,
                host,
                server.port,
                "HTTP metadata server",
                lambda h, p: f"http://{h}:{p}{metadata.path}",
            )
            await stop.wait()
            log.info("shutting down")
        finally:
            await server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
