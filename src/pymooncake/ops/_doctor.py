"""``run_doctor``: every check of the troubleshooting guide over one node's settings.

Order: the inputs themselves, then the peers (whether they run on other hosts
decides whether a loopback address is fatal), then this node's name and
ports, proxies, the metadata server and the master, and the host (protocol,
RDMA settings and devices, memory limits).  Results come back in reading
order: inputs, local_hostname, rpc_ports, metadata_server, metadata_exposure,
proxy, master, peer:*, protocol, rdma_env, rdma devices, memlock,
max_map_count.
"""

from __future__ import annotations

from ._host_checks import (
    check_max_map_count,
    check_memlock,
    check_protocol,
    check_rdma_devices,
    check_rdma_env,
)
from ._inputs import DoctorInputs
from ._net_checks import advertised_address, check_local_hostname, check_proxy, check_rpc_ports
from ._peer_checks import check_peer
from ._probes import Probes, SystemProbes
from ._report import CheckResult, DoctorReport, Status
from ._service_checks import check_master, check_metadata, check_metadata_exposure

__all__ = ["run_doctor"]


def run_doctor(inputs: DoctorInputs, probes: Probes | None = None) -> DoctorReport:
    """Run every check.

    Args:
        inputs: the node's settings (:meth:`DoctorInputs.from_sources`).
        probes: how to ask the machine (default: this host, :class:`SystemProbes`).

    Returns:
        The report; ``report.exit_code`` is 1 when a check failed.
    """
    probes = probes or SystemProbes()
    if inputs.problems:
        first = CheckResult(
            "inputs",
            Status.FAIL,
            "; ".join(inputs.problems),
            "fix the values named (the node would refuse to start, or fall back to defaults)",
        )
    else:
        shown = ", ".join(f"{k} from {v}" for k, v in inputs.sources.items() if v != "default")
        first = CheckResult(
            "inputs",
            Status.PASS,
            f"settings usable ({shown or 'defaults only'})",
            details=dict(inputs.sources),
        )
    peers = [check_peer(inputs, probes, name) for name in inputs.peers]
    remote = [p.name for p in peers if p.remote]
    if inputs.remote_peers and not remote:
        remote = ["--remote-peers"]
    adv = advertised_address(inputs, probes)
    metadata = check_metadata(inputs, probes)
    results = [
        first,
        check_local_hostname(inputs, probes, adv, remote),
        check_rpc_ports(inputs, probes, adv),
        metadata,
        check_metadata_exposure(inputs, probes, metadata.status is not Status.FAIL, remote),
        check_proxy(inputs),
        check_master(inputs, probes, remote),
        *(p.result for p in peers),
        check_protocol(inputs),
        check_rdma_env(inputs),
        *check_rdma_devices(inputs, probes),
        check_memlock(inputs, probes),
        check_max_map_count(inputs, probes),
    ]
    return DoctorReport.of(results)
