"""Doctor checks of the services a node depends on: the metadata server, the
store master, and the peers it must reach.

A service can answer this node and still be invisible to the others: the
guide's classic is etcd listening on 127.0.0.1.  When a service runs on this
host, the exposure checks connect to it through this host's LAN addresses --
the way a peer on another host would -- and report a server bound to
loopback only.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Sequence
from typing import Any

from .._net import is_loopback, join_host_port, split_host_port
from ..errors import MooncakeError, StoreError
from ..store._types import ErrorCode
from ..transfer.metadata import parse_metadata_target
from ._inputs import DoctorInputs
from ._net_checks import redis_location
from ._probes import Probes, Reach, RedisReplyError, etcd_endpoints
from ._report import CheckResult, Status

__all__ = [
    "check_master",
    "check_metadata",
    "check_metadata_exposure",
    "exposure",
    "reach_text",
]

_PROBE_KEY = "mooncake/pymooncake-doctor-probe"


def reach_text(what: str, addr: str, reach: Reach) -> str:
    if reach.kind == "refused":
        return f"connection refused by {addr} ({what}): nothing listens there"
    if reach.kind == "timeout":
        return (
            f"connecting to {addr} ({what}) timed out ({reach.detail}): the host is "
            "unreachable or a firewall drops packets"
        )
    if reach.kind == "dns":
        return f"cannot resolve the host of {addr} ({what}): {reach.detail}"
    if reach.kind == "unreachable":
        return f"{addr} ({what}) is unreachable: {reach.detail}"
    return f"cannot connect to {addr} ({what}): {reach.detail}"


def _metadata_fix(scheme: str) -> str:
    if scheme == "etcd":
        return (
            "start etcd listening on an address peers reach, e.g. `etcd --listen-client-urls "
            "http://0.0.0.0:2379 --advertise-client-urls http://<this-ip>:2379`, open the port "
            "in the firewall, and verify with `curl http://<host>:2379/health` from each node"
        )
    if scheme == "redis":
        return (
            "start redis-server with `--bind 0.0.0.0` (and a password: MC_REDIS_PASSWORD), open "
            "the port, and verify with `redis-cli -h <host> -p <port> ping`"
        )
    return (
        "start the server on an address peers reach (`mooncake_http_metadata_server --host "
        "0.0.0.0 --port 8080`, or `mooncake_master --enable_http_metadata_server`), open the "
        "port, and verify with `curl '<url>?key=x'` from each node"
    )


# --- metadata server ---------------------------------------------------------------


def check_metadata(inputs: DoctorInputs, probes: Probes) -> CheckResult:
    """The metadata server answers (HTTP server, etcd ``/health``, Redis ``PING``)."""
    text = inputs.metadata_server
    if not text:
        return CheckResult("metadata_server", Status.SKIP, "no metadata_server given")
    try:
        target = parse_metadata_target(text)
    except MooncakeError as exc:
        return CheckResult(
            "metadata_server",
            Status.FAIL,
            str(exc),
            "use P2PHANDSHAKE, http://host:port/metadata, etcd://host:2379 or redis://host:6379",
        )
    timeout = inputs.timeout_s
    if target.is_p2p:
        return CheckResult(
            "metadata_server",
            Status.PASS,
            "P2PHANDSHAKE: no metadata server; peers fetch this node's descriptor from its RPC "
            "port, so segment names are '<host>:<rpc_port>'",
            details={"scheme": "p2p"},
        )
    if target.scheme == "memory":
        return CheckResult(
            "metadata_server",
            Status.WARN,
            f"{text!r} is an in-process store: engines in other processes cannot see it",
            "use an HTTP, etcd or Redis metadata server for more than one process",
            {"scheme": "memory"},
        )
    if target.scheme == "http":
        parsed = urllib.parse.urlsplit(target.location)
        host = parsed.hostname or ""
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        addr = join_host_port(host, port)
        reach = probes.connect(host, port, timeout)
        details: dict[str, Any] = {"scheme": "http", "endpoint": addr, "reach": reach.kind}
        if not reach.ok:
            return CheckResult(
                "metadata_server",
                Status.FAIL,
                f"metadata server {text} is unreachable: "
                + reach_text("HTTP metadata server", addr, reach)
                + (
                    " (a server bound to 127.0.0.1 on another host refuses connections)"
                    if reach.kind == "refused" and not is_loopback(host)
                    else ""
                ),
                _metadata_fix("http"),
                details,
            )
        sep = "&" if parsed.query else "?"
        url = f"{target.location}{sep}key={urllib.parse.quote(_PROBE_KEY, safe='')}"
        try:
            status, body = probes.http_get(url, timeout)
        except (OSError, http.client.HTTPException) as exc:
            return CheckResult(
                "metadata_server",
                Status.FAIL,
                f"metadata server {text} accepted a connection but did not answer GET: {exc}",
                "check that an HTTP metadata server (not another service) listens there",
                details,
            )
        details["http_status"] = status
        if status in (200, 404):
            return CheckResult(
                "metadata_server",
                Status.PASS,
                f"HTTP metadata server {text} answers (GET of an absent key: HTTP {status})",
                details=details,
            )
        return CheckResult(
            "metadata_server",
            Status.FAIL,
            f"{text} answered GET ?key=... with HTTP {status} "
            f"({body[:120].decode(errors='replace').strip()}): not a Mooncake metadata endpoint",
            "check the path: mooncake_http_metadata_server serves /metadata, the master's "
            "embedded server too (http://host:8080/metadata)",
            details,
        )
    if target.scheme == "etcd":
        return _check_etcd(text, target.location, probes, timeout)
    if target.scheme == "redis":
        return _check_redis(text, redis_location(target.location, inputs.env), probes, timeout)
    return CheckResult(
        "metadata_server", Status.FAIL, f"unsupported metadata server {text!r}", ""
    )  # pragma: no cover - parse_metadata_target knows no other scheme


def _check_etcd(text: str, location: str, probes: Probes, timeout: float) -> CheckResult:
    endpoints = etcd_endpoints(location)
    good: list[str] = []
    problems: list[str] = []
    versions: dict[str, str] = {}
    for endpoint in endpoints:
        host, port = split_host_port(endpoint)
        reach = probes.connect(host, port or 2379, timeout)
        if not reach.ok:
            problems.append(reach_text("etcd", endpoint, reach))
            continue
        try:
            status, body = probes.http_get(f"http://{endpoint}/health", timeout)
            health = json.loads(body) if status == 200 else {}
        except (OSError, http.client.HTTPException, ValueError) as exc:
            problems.append(f"etcd at {endpoint} did not answer GET /health: {exc}")
            continue
        if str(health.get("health")).lower() != "true":
            problems.append(f"etcd at {endpoint} reports itself unhealthy: HTTP {status} {health}")
            continue
        try:
            vstatus, vbody = probes.http_get(f"http://{endpoint}/version", timeout)
            if vstatus == 200:
                versions[endpoint] = str(json.loads(vbody).get("etcdserver", "?"))
        except (OSError, http.client.HTTPException, ValueError):
            pass
        good.append(endpoint)
    details = {"scheme": "etcd", "endpoints": endpoints, "healthy": good, "versions": versions}
    if not good:
        return CheckResult(
            "metadata_server",
            Status.FAIL,
            f"etcd {text!r} is unreachable (Error from etcd client): " + "; ".join(problems),
            _metadata_fix("etcd"),
            details,
        )
    if problems:
        return CheckResult(
            "metadata_server",
            Status.WARN,
            f"etcd answers at {', '.join(good)} but not at every endpoint: " + "; ".join(problems),
            _metadata_fix("etcd"),
            details,
        )
    shown = ", ".join(f"{e} (etcd {versions[e]})" if e in versions else e for e in good)
    return CheckResult(
        "metadata_server", Status.PASS, f"etcd is healthy at {shown}", details=details
    )


def _check_redis(text: str, location: str, probes: Probes, timeout: float) -> CheckResult:
    host, port = split_host_port(location.rpartition("@")[2].partition("/")[0])
    addr = join_host_port(host, port or 6379)
    details = {"scheme": "redis", "endpoint": addr}
    reach = probes.connect(host, port or 6379, timeout)
    if not reach.ok:
        return CheckResult(
            "metadata_server",
            Status.FAIL,
            f"Redis {text!r} is unreachable: " + reach_text("Redis", addr, reach),
            _metadata_fix("redis"),
            details,
        )
    try:
        reply = probes.redis(location, ["PING"], timeout)
    except RedisReplyError as exc:
        auth = "NOAUTH" in str(exc) or "WRONGPASS" in str(exc)
        return CheckResult(
            "metadata_server",
            Status.FAIL,
            f"Redis at {addr} refused PING: {exc}",
            "set MC_REDIS_PASSWORD (and MC_REDIS_USERNAME) to the server's credentials"
            if auth
            else _metadata_fix("redis"),
            details,
        )
    except OSError as exc:
        return CheckResult(
            "metadata_server",
            Status.FAIL,
            f"Redis at {addr} did not answer PING: {exc}",
            "check that redis-server (not another service) listens there",
            details,
        )
    if reply != "PONG":
        return CheckResult(
            "metadata_server",
            Status.FAIL,
            f"{addr} answered PING with {reply!r}: not a Redis server",
            _metadata_fix("redis"),
            details,
        )
    return CheckResult(
        "metadata_server", Status.PASS, f"Redis at {addr} answers PING", details=details
    )


def _endpoints(metadata_server: str) -> list[tuple[str, str, int]]:
    """(scheme, host, port) of each network endpoint of the metadata server."""
    try:
        target = parse_metadata_target(metadata_server)
    except MooncakeError:
        return []
    if target.scheme == "http":
        parsed = urllib.parse.urlsplit(target.location)
        return [("http", parsed.hostname or "", parsed.port or 80)]
    if target.scheme == "etcd":
        out = []
        for e in etcd_endpoints(target.location):
            host, port = split_host_port(e)
            out.append(("etcd", host, port or 2379))
        return out
    if target.scheme == "redis":
        hostport = target.location.rpartition("@")[2].partition("/")[0]
        host, port = split_host_port(hostport)
        return [("redis", host, port or 6379)]
    return []


def exposure(
    probes: Probes, host: str, port: int, timeout: float
) -> tuple[str, list[str], list[str]]:
    """How a service at ``host:port`` looks from other hosts.

    Returns:
        (where, reachable, unreachable): ``where`` is ``loopback``, ``local``
        (an address of this host), ``remote`` or ``unknown`` (does not
        resolve); for ``loopback`` the LAN addresses of this host through which
        the port answers, and those through which it does not.
    """
    try:
        ips = probes.resolve(host)
    except OSError:
        return "unknown", [], []
    if not ips:
        return "unknown", [], []
    ip = ips[0]
    if is_loopback(ip):
        ok: list[str] = []
        bad: list[str] = []
        for lan in probes.lan_addresses():
            (ok if probes.connect(lan, port, timeout).ok else bad).append(lan)
        return "loopback", ok, bad
    if probes.is_local_address(ip):
        return "local", [ip], []
    return "remote", [ip], []


def check_metadata_exposure(
    inputs: DoctorInputs, probes: Probes, reachable: bool, remote_peers: Sequence[str]
) -> CheckResult:
    """The metadata server is not bound to loopback only, as seen from a peer."""
    endpoints = _endpoints(inputs.metadata_server)
    if not endpoints:
        return CheckResult(
            "metadata_exposure",
            Status.SKIP,
            "no networked metadata server (P2P handshake or in-process)",
        )
    if not reachable:
        return CheckResult(
            "metadata_exposure",
            Status.SKIP,
            "the metadata server does not answer this node (see metadata_server)",
        )
    findings: list[str] = []
    worst = Status.PASS
    fix = ""
    details: dict[str, Any] = {}
    for scheme, host, port in endpoints:
        addr = join_host_port(host, port)
        where, ok, bad = exposure(probes, host, port, inputs.timeout_s)
        details[addr] = {"where": where, "reachable_via": ok, "unreachable_via": bad}
        if where == "loopback":
            if ok:
                findings.append(
                    f"{addr} is this host's loopback address; the server also answers on "
                    f"{', '.join(ok)}, so peers on other hosts can use "
                    f"{join_host_port(ok[0], port)}"
                )
            elif bad:
                status = Status.FAIL if remote_peers else Status.WARN
                worst = max(worst, status, key=_rank)
                who = (
                    f"peers on other hosts ({', '.join(remote_peers)})"
                    if remote_peers
                    else "peers on other hosts"
                )
                findings.append(
                    f"the {scheme} metadata server at {addr} answers on loopback only: "
                    f"{', '.join(join_host_port(b, port) for b in bad)} refuse connections, so "
                    f"{who} cannot reach it"
                )
                fix = _metadata_fix(scheme)
            else:
                worst = max(worst, Status.WARN, key=_rank)
                findings.append(
                    f"{addr} is a loopback address and this host has no LAN address to test "
                    "from; peers on other hosts cannot use this address"
                )
                fix = "give the server's LAN address to nodes on other hosts"
        elif where == "local":
            findings.append(f"{addr} is an address of this host that peers can use")
        elif where == "remote":
            findings.append(f"{addr} is on another host and answers this node")
        else:
            worst = max(worst, Status.WARN, key=_rank)
            findings.append(f"{addr}: the host does not resolve")
    return CheckResult("metadata_exposure", worst, "; ".join(findings), fix, details)


def _rank(status: Status) -> int:
    return {Status.SKIP: 0, Status.PASS: 1, Status.WARN: 2, Status.FAIL: 3}[status]


# --- master --------------------------------------------------------------------------


def check_master(inputs: DoctorInputs, probes: Probes, remote_peers: Sequence[str]) -> CheckResult:
    """The master answers ServiceReady with this client's protocol version; with
    ``etcd://`` (HA), the leader named in etcd does."""
    address = inputs.master_server_address
    if not address:
        return CheckResult("master", Status.SKIP, "no master_server_address given")
    via = ""
    if "://" in address:
        scheme, _, rest = address.partition("://")
        if scheme != "etcd":
            return CheckResult(
                "master",
                Status.FAIL,
                f"master_server_address {address!r} names HA backend {scheme!r}: masters "
                "elect their leader through etcd only",
                "use etcd://h1:2379;h2:2379 (the masters' --etcd_endpoints) or the master's "
                "host:port",
            )
        found = _ha_leader(inputs, probes, rest)
        if isinstance(found, CheckResult):
            return found
        address, via = found
    try:
        host, port = split_host_port(address)
    except MooncakeError as exc:
        return CheckResult("master", Status.FAIL, f"master_server_address {address!r}: {exc}", "")
    port = port or 50051
    result = _check_master_at(inputs, probes, remote_peers, address, host, port)
    if via:
        result = CheckResult(
            result.check,
            result.status,
            f"{via}; {result.reason}",
            result.fix,
            {**result.details, "ha": True},
        )
    return result


def _ha_leader(
    inputs: DoctorInputs, probes: Probes, endpoints: str
) -> tuple[str, str] | CheckResult:
    """The leading master's address from etcd, and a phrase saying where it was
    read; or the FAIL saying why there is none."""
    from ..store.master._ha import master_view_key

    cluster_id = inputs.env.get("MC_STORE_CLUSTER_ID", "").strip() or "mooncake_cluster"
    key = master_view_key(cluster_id)
    problems: list[str] = []
    for endpoint in etcd_endpoints(endpoints.replace(";", ",")):
        try:
            value = probes.etcd_get(endpoint, key, inputs.timeout_s)
        except (OSError, MooncakeError, http.client.HTTPException, ValueError) as exc:
            problems.append(f"{endpoint}: {exc}")
            continue
        details = {"etcd": endpoint, "key": key, "cluster_id": cluster_id}
        if value is None:
            return CheckResult(
                "master",
                Status.FAIL,
                f"no master leads cluster {cluster_id!r}: etcd at {endpoint} has no {key}",
                "start mooncake_master --enable_ha=true --etcd_endpoints=<these endpoints> "
                f"--cluster_id={cluster_id}; the clients' MC_STORE_CLUSTER_ID must equal the "
                "masters' --cluster_id",
                details,
            )
        leader = value.decode(errors="replace")
        return leader, f"etcd at {endpoint} names {leader} the leader of {cluster_id!r}"
    return CheckResult(
        "master",
        Status.FAIL,
        f"cannot read the master leader from etcd {endpoints!r} (Error from etcd client): "
        + "; ".join(problems),
        "start etcd on those endpoints (listening on an address this host reaches, not "
        "127.0.0.1 only) and give clients the masters' --etcd_endpoints",
        {"endpoints": endpoints},
    )


def _check_master_at(
    inputs: DoctorInputs,
    probes: Probes,
    remote_peers: Sequence[str],
    address: str,
    host: str,
    port: int,
) -> CheckResult:
    addr = join_host_port(host, port)
    reach = probes.connect(host, port, inputs.timeout_s)
    if not reach.ok:
        return CheckResult(
            "master",
            Status.FAIL,
            reach_text("store master", addr, reach),
            "start mooncake_master (its --rpc_port / --port) and make master_server_addr / "
            "MOONCAKE_MASTER point at it",
            {"address": addr, "reach": reach.kind},
        )
    try:
        version = probes.master_version(address, inputs.timeout_s)
    except StoreError as exc:
        if exc.code == ErrorCode.INVALID_VERSION:
            return CheckResult(
                "master",
                Status.FAIL,
                exc.message,
                "run the same pymooncake version on the master and the clients",
                {"address": addr},
            )
        return CheckResult(
            "master",
            Status.FAIL,
            f"the master at {addr} did not answer ServiceReady: {exc.message}. A reference "
            "mooncake_master (coro_rpc) cannot serve pymooncake clients",
            "run pymooncake's mooncake_master there",
            {"address": addr},
        )
    except MooncakeError as exc:
        return CheckResult("master", Status.FAIL, str(exc), "", {"address": addr})
    details: dict[str, Any] = {"address": addr, "version": version}
    where, ok, bad = exposure(probes, host, port, inputs.timeout_s)
    if where == "loopback" and bad and not ok:
        return CheckResult(
            "master",
            Status.FAIL if remote_peers else Status.WARN,
            f"the master at {addr} answers (protocol {version}) but on loopback only: "
            f"{', '.join(join_host_port(b, port) for b in bad)} refuse connections, so clients "
            "on other hosts cannot reach it",
            "start mooncake_master with --rpc_address=0.0.0.0 (its default) or this host's "
            "LAN address",
            details,
        )
    return CheckResult(
        "master",
        Status.PASS,
        f"the master at {addr} answers ServiceReady: protocol {version}",
        details=details,
    )
