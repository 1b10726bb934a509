"""Doctor check of a peer: its descriptor under the exact segment name, and its
RPC and TCP data ports reachable from this node.

In P2P handshake mode the descriptor comes from the peer's RPC port (the name
is ``host:rpc_port``); with a metadata server from
``mooncake/[cluster/]ram/<name>`` and the RPC address from
``mooncake/[cluster/]rpc_meta/<name>``.  Whether the peer runs on another
host is recorded: it decides whether a loopback address is fatal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._net import is_loopback, join_host_port, split_host_port
from ..errors import MetadataUnreachable, MooncakeError
from ..transfer._segments import not_found_message
from ..transfer.metadata import parse_metadata_target
from ..wire import MessageType, decode_rpc_meta, decode_segment, rpc_meta_key, segment_key
from ._inputs import DoctorInputs
from ._net_checks import redis_location
from ._probes import Probes
from ._report import CheckResult, Status
from ._service_checks import reach_text

__all__ = ["PeerFacts", "check_peer"]


@dataclass(frozen=True)
class PeerFacts:
    """What the peer check learned about one peer.

    Attributes:
        name: the segment name.
        host: where the peer listens (RPC host), None if unknown.
        remote: the peer is on another host (None: unknown).
        result: the check's verdict.
    """

    name: str
    host: str | None
    remote: bool | None
    result: CheckResult
    details: dict[str, Any] = field(default_factory=dict)


def _is_remote(probes: Probes, host: str) -> bool | None:
    try:
        ips = probes.resolve(host)
    except OSError:
        return None
    if not ips:
        return None
    return not (is_loopback(ips[0]) or probes.is_local_address(ips[0]))


def _guessed(probes: Probes, name: str, result: CheckResult) -> PeerFacts:
    """Facts from the name alone: its host part is the peer's local_hostname."""
    try:
        host: str | None = split_host_port(name)[0]
    except MooncakeError:
        host = None
    return PeerFacts(name, host, _is_remote(probes, host) if host else None, result)


def check_peer(inputs: DoctorInputs, probes: Probes, name: str) -> PeerFacts:
    """A peer's descriptor exists under the exact segment name, and its RPC and
    data ports answer."""
    check = f"peer:{name}"
    name = name.lstrip("/")
    timeout = inputs.timeout_s
    p2p = inputs.metadata_server.strip().upper() in ("", "P2PHANDSHAKE")
    cid = inputs.engine.metadata_cluster_id
    details: dict[str, Any] = {"segment": name}
    rpc_host: str | None
    if p2p:
        try:
            host, port = split_host_port(name)
        except MooncakeError as exc:
            return PeerFacts(
                name,
                None,
                None,
                CheckResult(check, Status.FAIL, not_found_message(name, str(exc), True), ""),
            )
        if port is None:
            result = CheckResult(
                check,
                Status.FAIL,
                not_found_message(name, "the name has no ':port' part", True),
                "name the peer '<host>:<rpc_port>' as its engine prints it",
                details,
            )
            return PeerFacts(name, host, _is_remote(probes, host), result)
        rpc_host, rpc_port = host, port
        remote = _is_remote(probes, host)
        reach = probes.connect(host, port, timeout)
        if not reach.ok:
            result = CheckResult(
                check,
                Status.FAIL,
                not_found_message(
                    name, reach_text("RPC port", join_host_port(host, port), reach), True
                ),
                "check that the peer runs, that it printed this host:port, and that no firewall "
                "blocks the port",
                {**details, "rpc": join_host_port(host, port), "reach": reach.kind},
            )
            return PeerFacts(name, host, remote, result)
        try:
            desc_json = probes.rpc(host, port, MessageType.METADATA, {}, timeout)
        except MooncakeError as exc:
            result = CheckResult(check, Status.FAIL, not_found_message(name, str(exc), True), "")
            return PeerFacts(name, host, remote, result)
        if desc_json is None:
            result = CheckResult(
                check,
                Status.FAIL,
                not_found_message(
                    name,
                    "the peer answered the Metadata request with null: it does not run in "
                    "P2PHANDSHAKE mode",
                    True,
                ),
                "use the metadata server the peer uses",
                details,
            )
            return PeerFacts(name, host, remote, result)
        source = f"the peer's RPC port {join_host_port(host, port)}"
    else:
        key = segment_key(name, cid)
        try:
            raw = probes.metadata_get(_with_credentials(inputs), key, timeout)
        except (MooncakeError, OSError) as exc:
            why = (
                "it is unreachable (see metadata_server)"
                if isinstance(exc, (MetadataUnreachable, OSError))
                else str(exc)
            )
            result = CheckResult(
                check,
                Status.FAIL,
                f"cannot read {key!r} from the metadata server: {why}",
                "fix metadata_server first (see metadata_server)",
                details,
            )
            return _guessed(probes, name, result)
        if raw is None:
            hint = (
                " (store clients register '<local_hostname>:<rpc_port>'; the name has no port)"
                if ":" not in name
                else ""
            )
            result = CheckResult(
                check,
                Status.FAIL,
                not_found_message(
                    name, f"no descriptor under {key!r} on {inputs.metadata_server}{hint}", False
                ),
                "use the peer's exact segment name (its local_hostname; the engine logs it at "
                "start-up), the same metadata server and the same MC_METADATA_CLUSTER_ID",
                {**details, "key": key},
            )
            return _guessed(probes, name, result)
        desc_json = raw
        source = f"{key!r}"
        rpc_host = None
        rpc_port = 0
        try:
            meta_raw = probes.metadata_get(
                _with_credentials(inputs), rpc_meta_key(name, cid), timeout
            )
            if meta_raw is not None:
                meta = decode_rpc_meta(meta_raw, name)
                rpc_host, rpc_port = meta.ip_or_host_name, meta.rpc_port
        except (MooncakeError, OSError):
            pass
    try:
        desc = decode_segment(desc_json, name)
    except MooncakeError as exc:
        result = CheckResult(
            check, Status.FAIL, f"the descriptor of {name!r} is corrupt: {exc}", "restart the peer"
        )
        return PeerFacts(name, rpc_host, None, result)
    data_host = desc.tcp_data_host or rpc_host
    peer_host = rpc_host or data_host
    remote = _is_remote(probes, peer_host) if peer_host else None
    details.update(
        protocol=desc.protocol,
        rpc=join_host_port(rpc_host, rpc_port) if rpc_host and rpc_port else None,
        data=join_host_port(data_host, desc.tcp_data_port) if data_host else None,
        buffers=len(desc.buffers),
        remote=remote,
    )
    problems: list[str] = []
    reached: list[str] = []
    if rpc_host and rpc_port:
        addr = join_host_port(rpc_host, rpc_port)
        reach = probes.connect(rpc_host, rpc_port, timeout)
        if reach.ok:
            try:
                probes.rpc(rpc_host, rpc_port, MessageType.PROBE, {}, timeout)
                reached.append(f"RPC {addr}")
            except MooncakeError as exc:
                problems.append(f"RPC {addr} did not answer a probe: {exc}")
        else:
            problems.append(reach_text(f"RPC port of segment {name!r}", addr, reach))
    elif not p2p:
        problems.append(f"no {rpc_meta_key(name, cid)!r} entry: the peer's RPC port is unknown")
    if desc.protocol != "tcp":
        problems.append(
            f"the descriptor says protocol {desc.protocol!r}; pymooncake moves data over tcp"
        )
    elif data_host and desc.tcp_data_port:
        addr = join_host_port(data_host, desc.tcp_data_port)
        reach = probes.connect(data_host, desc.tcp_data_port, timeout)
        if reach.ok:
            reached.append(f"data {addr}")
        else:
            problems.append(reach_text(f"TCP data port of segment {name!r}", addr, reach))
    else:
        problems.append("the descriptor has no TCP data address")
    if problems:
        result = CheckResult(
            check,
            Status.FAIL,
            f"descriptor found in {source}, but " + "; ".join(problems),
            "check that the peer runs and that its local_hostname is an address this node can "
            "reach (not loopback), and that no firewall blocks its ports",
            details,
        )
    else:
        result = CheckResult(
            check,
            Status.PASS,
            f"descriptor found in {source} ({len(desc.buffers)} buffer(s)); "
            + " and ".join(reached)
            + " reachable",
            details=details,
        )
    return PeerFacts(name, peer_host, remote, result, details)


def _with_credentials(inputs: DoctorInputs) -> str:
    try:
        target = parse_metadata_target(inputs.metadata_server)
    except MooncakeError:
        return inputs.metadata_server
    if target.scheme == "redis":
        return "redis://" + redis_location(target.location, inputs.env)
    return inputs.metadata_server
