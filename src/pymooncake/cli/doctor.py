"""``pymooncake doctor``: check a node's settings against the troubleshooting guide.

Give it what the node starts with -- the same flags as ``setup()`` /
``transfer_engine_bench`` (both spellings: ``--local-hostname`` and
``--local_hostname``), a Mooncake JSON config file (``--config`` or
``MOONCAKE_CONFIG_PATH``), ``MOONCAKE_*`` and ``MC_*`` variables -- and
the peers it must reach (``--peer segment_name``, repeatable).  It prints
one line per check (PASS / WARN / FAIL / SKIP, the reason, the fix) and
exits with status 1 when a check failed; ``--json`` prints the same as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from ..ops import DoctorInputs, SystemProbes, run_doctor

__all__ = ["add_parser", "doctor_main"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``doctor`` on the ``pymooncake`` subcommand parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "doctor",
        help="check a node's settings: hostname, metadata server, ports, peers, master, RDMA",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument(
        "--local-hostname", "--local_hostname", "--local_server_name", dest="local_hostname"
    )
    p.add_argument("--metadata-server", "--metadata_server", dest="metadata_server")
    p.add_argument("--protocol")
    p.add_argument(
        "--device-name", "--device_name", "--rdma_devices", "--device_names", dest="device_name"
    )
    p.add_argument(
        "--nic-priority-matrix",
        "--nic_priority_matrix",
        dest="nic_priority_matrix",
        help="NIC priority matrix: a JSON file or inline JSON (also MC_CUSTOM_TOPO_JSON)",
    )
    p.add_argument(
        "--master-server-address",
        "--master_server_address",
        "--master_server_addr",
        dest="master_server_address",
    )
    p.add_argument("--global-segment-size", "--global_segment_size", dest="global_segment_size")
    p.add_argument("--local-buffer-size", "--local_buffer_size", dest="local_buffer_size")
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        dest="peers",
        metavar="SEGMENT",
        help="a peer's segment name this node must reach (repeatable)",
    )
    p.add_argument(
        "--remote-peers",
        action="store_true",
        help="peers run on other hosts (a loopback address is then an error)",
    )
    p.add_argument("--config", help="Mooncake JSON config file (default: $MOONCAKE_CONFIG_PATH)")
    p.add_argument(
        "--timeout", type=float, default=2.0, dest="timeout_s", help="seconds per network probe"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--sysfs-root", default="/sys", help=argparse.SUPPRESS)
    p.add_argument("--procfs-root", default="/proc", help=argparse.SUPPRESS)
    p.add_argument("--devfs-root", default="/dev", help=argparse.SUPPRESS)
    p.set_defaults(func=doctor_main)
    return p


def _config_file(path: str) -> tuple[dict[str, Any], str]:
    """Fields of a Mooncake JSON config as ``mooncake.mooncake_config`` reads
    it, or an error message."""
    from mooncake.mooncake_config import MooncakeConfig

    from ..errors import ConfigError

    try:
        cfg = MooncakeConfig.from_file(path)
    except (OSError, ConfigError) as exc:
        return {}, f"config file {path!r}: {exc}"
    return {
        "local_hostname": cfg.local_hostname,
        "metadata_server": cfg.metadata_server,
        "master_server_address": cfg.master_server_address,
        "protocol": cfg.protocol,
        "device_name": cfg.device_name or "",
        "global_segment_size": cfg.global_segment_size,
        "local_buffer_size": cfg.local_buffer_size,
    }, ""


def doctor_main(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    path = args.config or env.get("MOONCAKE_CONFIG_PATH", "").strip()
    file_values: dict[str, Any] = {}
    file_error = ""
    if path:
        file_values, file_error = _config_file(path)
    inputs = DoctorInputs.from_sources(vars(args), env, file_values, file_name=path)
    if file_error:
        inputs = dataclasses.replace(inputs, problems=(file_error, *inputs.problems))
    probes = SystemProbes(
        sysfs_root=args.sysfs_root, procfs_root=args.procfs_root, devfs_root=args.devfs_root
    )
    report = run_doctor(inputs, probes)
    if args.json:
        print(report.dumps())
    else:
        sys.stdout.write(report.format_text())
    sys.stdout.flush()
    return report.exit_code
