"""Doctor checks of this node's own network settings: its name, ports and proxies.

Each check is a pure function of :class:`DoctorInputs`, a :class:`Probes`
object and what earlier checks found; it returns one :class:`CheckResult`
whose reason names the concrete value and whose fix says what to change
(the troubleshooting guide's checklist: a non-loopback ``connectable_name``,
free RPC ports, proxies unset).
"""

from __future__ import annotations

import errno
import ipaddress
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from .._net import is_ip, is_loopback, join_host_port, split_host_port
from ..errors import MooncakeError
from ..transfer.metadata import parse_metadata_target
from ._inputs import DoctorInputs
from ._probes import Probes, etcd_endpoints, redis_address
from ._report import CheckResult, Status

__all__ = [
    "Advertised",
    "advertised_address",
    "check_local_hostname",
    "check_proxy",
    "check_rpc_ports",
    "metadata_http_targets",
]

#: the engine takes two listeners from the range: RPC/handshake and TCP data
_LISTENERS_PER_ENGINE = 2


@dataclass(frozen=True)
class Advertised:
    """What the engine would advertise and bind, as ``TransferEngine._start`` decides.

    Attributes:
        host: the advertised host (name or IP) -- what peers connect to.
        ip: its first address (IPv4 preferred), or None if it does not resolve.
        how: why this host (for messages).
        error: why it could not be determined (empty when fine).
    """

    host: str
    ip: str | None
    how: str
    error: str = ""


def _is_p2p(inputs: DoctorInputs) -> bool:
    text = inputs.metadata_server.strip().upper()
    return text in ("", "P2PHANDSHAKE") or text.startswith("P2P://")


def advertised_address(inputs: DoctorInputs, probes: Probes) -> Advertised:
    """The host and IP peers would use to reach this node."""
    try:
        host, _port = split_host_port(inputs.local_hostname)
    except MooncakeError as exc:
        return Advertised(inputs.local_hostname, None, "", str(exc))
    cfg = inputs.engine
    if cfg.legacy_rpc_port_binding or _is_p2p(inputs):
        adv, how = host, "the host part of local_hostname"
    elif cfg.tcp_bind_address:
        adv, how = cfg.tcp_bind_address, "MC_TCP_BIND_ADDRESS"
    elif is_ip(host):
        adv, how = host, "local_hostname"
    else:
        lan = probes.lan_addresses()
        if lan:
            adv, how = (
                lan[0],
                (
                    f"this host's first non-loopback IPv4 address (local_hostname {host!r} is a "
                    "name; with a metadata server the engine advertises an address, "
                    "MC_TCP_BIND_ADDRESS overrides)"
                ),
            )
        else:
            adv, how = host, "local_hostname (no non-loopback interface is up)"
    try:
        ips = probes.resolve(adv)
    except OSError as exc:
        return Advertised(adv, None, how, f"cannot resolve {adv!r}: {exc.strerror or exc}")
    if not ips:
        return Advertised(adv, None, how, f"{adv!r} resolves to no address")
    return Advertised(adv, ips[0], how)


def _lan_hint(probes: Probes) -> str:
    lan = probes.lan_addresses()
    return f" (this host's addresses: {', '.join(lan)})" if lan else ""


def check_local_hostname(
    inputs: DoctorInputs, probes: Probes, adv: Advertised, remote_peers: Sequence[str]
) -> CheckResult:
    """local_hostname resolves to an address of this host, not loopback when
    peers are remote (the guide's ``connectable_name`` item)."""
    name = inputs.local_hostname
    if not name:
        return CheckResult(
            "local_hostname",
            Status.FAIL,
            "no local_hostname given",
            "pass --local-hostname (setup()'s local_hostname, MOONCAKE_LOCAL_HOSTNAME or the "
            "config file's local_hostname): this node's LAN IP address or a hostname that "
            f"resolves to it{_lan_hint(probes)}",
        )
    details = {"local_hostname": name, "advertised": adv.host, "ip": adv.ip, "how": adv.how}
    if adv.ip is None:
        return CheckResult(
            "local_hostname",
            Status.FAIL,
            f"local_hostname {name!r}: {adv.error}",
            "use an IP address of this node, or a hostname with a DNS or /etc/hosts record"
            + _lan_hint(probes),
            details,
        )
    ip = adv.ip
    if is_loopback(ip):
        if remote_peers:
            return CheckResult(
                "local_hostname",
                Status.FAIL,
                f"local_hostname {name!r} resolves to the loopback address {ip}, but peers run "
                f"on other hosts ({', '.join(remote_peers)}): they would connect to themselves "
                "(connection refused)",
                "set local_hostname to a non-loopback IP address of this node, or a hostname "
                "with a DNS or /etc/hosts record that resolves to it" + _lan_hint(probes),
                details,
            )
        return CheckResult(
            "local_hostname",
            Status.WARN,
            f"local_hostname {name!r} resolves to the loopback address {ip}: fine on one host, "
            "but peers on other machines cannot reach this node",
            "use this node's LAN address before adding nodes on other hosts" + _lan_hint(probes),
            details,
        )
    if not probes.is_local_address(ip):
        return CheckResult(
            "local_hostname",
            Status.FAIL,
            f"{ip} (advertised host {adv.host!r}, from {adv.how}) is not an address of this "
            "host: the engine cannot listen on it (Cannot assign requested address) and peers "
            "would reach another machine",
            "use an address of this node, or fix the DNS / /etc/hosts record" + _lan_hint(probes),
            details,
        )
    return CheckResult(
        "local_hostname",
        Status.PASS,
        f"{name!r} -> peers reach this node at {ip} ({adv.how})",
        details=details,
    )


def check_rpc_ports(inputs: DoctorInputs, probes: Probes, adv: Advertised) -> CheckResult:
    """The RPC/handshake and TCP data listeners can be bound (the guide's
    ``bind address already in use`` item)."""
    if adv.ip is None or not probes.is_local_address(adv.ip):
        return CheckResult(
            "rpc_ports",
            Status.SKIP,
            "cannot test ports: the address to listen on is unusable (see local_hostname)",
        )
    ip, cfg = adv.ip, inputs.engine
    try:
        _, name_port = split_host_port(inputs.local_hostname)
    except MooncakeError:
        name_port = None
    fixed = 0
    if cfg.legacy_rpc_port_binding:
        fixed = name_port or cfg.handshake_port
        source = "MC_LEGACY_RPC_PORT_BINDING: the local_hostname port or MC_HANDSHAKE_PORT"
    elif cfg.rpc_port:
        fixed, source = cfg.rpc_port, "the configured rpc_port"
    if fixed:
        err = probes.bind_error(ip, fixed)
        addr = join_host_port(ip, fixed)
        if err == errno.EADDRINUSE:
            return CheckResult(
                "rpc_ports",
                Status.FAIL,
                f"bind address already in use: port {fixed} on {ip} ({source}) is taken by "
                "another process",
                f"choose another port or stop the process holding it (ss -ltnp 'sport = :{fixed}')",
                {"port": fixed, "ip": ip},
            )
        if err is not None:
            return CheckResult(
                "rpc_ports",
                Status.FAIL,
                f"cannot listen on {addr}: {errno.errorcode.get(err, err)}",
                "run with permission to bind the port, or choose a port above 1024",
                {"port": fixed, "ip": ip},
            )
        return CheckResult(
            "rpc_ports", Status.PASS, f"{addr} ({source}) is free", details={"port": fixed}
        )
    if inputs.store_port_range is not None and name_port is None:
        lo, hi = inputs.store_port_range
        knobs = "MC_STORE_CLIENT_MIN_PORT/MC_STORE_CLIENT_MAX_PORT"
    else:
        lo, hi = cfg.rpc_port_min, cfg.rpc_port_max
        knobs = "MC_MIN_RPC_PORT/MC_MAX_RPC_PORT"
    free = sum(1 for p in range(lo, hi + 1) if probes.bind_error(ip, p) is None)
    total = hi - lo + 1
    details: dict[str, object] = {"range": [lo, hi], "free": free, "ip": ip}
    if free < _LISTENERS_PER_ENGINE:
        return CheckResult(
            "rpc_ports",
            Status.FAIL,
            f"bind address already in use: only {free} of {total} ports in [{lo}, {hi}] are "
            f"free on {ip}; the engine needs {_LISTENERS_PER_ENGINE}",
            f"widen {knobs}, or stop the processes holding the ports (ss -ltnp)",
            details,
        )
    eph = _ephemeral_range(probes)
    if eph is not None and eph[0] <= hi and lo <= eph[1]:
        details["ephemeral"] = list(eph)
        return CheckResult(
            "rpc_ports",
            Status.WARN,
            f"{free} of {total} ports in [{lo}, {hi}] are free on {ip}, but the range overlaps "
            f"the kernel's ephemeral ports [{eph[0]}, {eph[1]}]: outgoing connections can take "
            "them and the engine then fails with 'bind address already in use'",
            f"move {knobs} outside net.ipv4.ip_local_port_range, or reserve them with "
            f"sysctl net.ipv4.ip_local_reserved_ports={lo}-{hi}",
            details,
        )
    return CheckResult(
        "rpc_ports",
        Status.PASS,
        f"{free} of {total} ports in [{lo}, {hi}] ({knobs}) are free on {ip}",
        details=details,
    )


def _ephemeral_range(probes: Probes) -> tuple[int, int] | None:
    text = probes.read_proc("sys/net/ipv4/ip_local_port_range")
    if not text:
        return None
    try:
        lo, hi = (int(x) for x in text.split()[:2])
    except ValueError:
        return None
    return lo, hi


# --- proxies -------------------------------------------------------------------------


def metadata_http_targets(metadata_server: str) -> list[tuple[str, str, int]]:
    """(kind, host, port) of the HTTP-speaking metadata endpoints (HTTP server,
    etcd); empty for P2P, Redis and memory://."""
    try:
        target = parse_metadata_target(metadata_server)
    except MooncakeError:
        return []
    if target.scheme == "http":
        parsed = urllib.parse.urlsplit(target.location)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        return [(parsed.scheme, parsed.hostname or "", port)]
    if target.scheme == "etcd":
        out = []
        for endpoint in etcd_endpoints(target.location):
            host, eport = split_host_port(endpoint)
            out.append(("etcd", host, eport or 2379))
        return out
    return []


#: proxy variables some client honours for each kind of target, in precedence order:
#: libcurl (the reference engine's HTTP metadata plugin, curl) reads lower-case
#: http_proxy only; Python and Go tools also read HTTP_PROXY; gRPC (etcd clients)
#: reads grpc_proxy, then https_proxy, then http_proxy
_HTTP_VARS: Final = ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")
_HTTPS_VARS: Final = ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
_GRPC_VARS: Final = ("grpc_proxy", "https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")
_NO_PROXY: Final = ("no_proxy", "NO_PROXY")
_NO_GRPC_PROXY: Final = ("no_grpc_proxy", "NO_GRPC_PROXY", "no_proxy", "NO_PROXY")
_ALL_VARS: Final = frozenset(v.lower() for v in (*_HTTP_VARS, *_HTTPS_VARS, *_GRPC_VARS))


def _bypassed(host: str, env: Mapping[str, str], names: Sequence[str]) -> bool:
    """``host`` is exempted by the first no_proxy-style variable that is set
    (curl's rules: ``*``, exact names, domain suffixes, IPs, CIDR blocks)."""
    for name in names:
        no_proxy = env.get(name)
        if no_proxy is None:
            continue
        host = host.lower().strip("[]")
        for entry in no_proxy.split(","):
            entry = entry.strip().lower()
            if not entry:
                continue
            if entry == "*":
                return True
            if "/" in entry:
                if _in_cidr(host, entry):
                    return True
                continue
            if not entry.startswith("[") and entry.count(":") == 1:
                entry = entry.partition(":")[0]  # host:port entries match the host
            entry = entry.strip("[]").lstrip(".")
            if host == entry or host.endswith("." + entry):
                return True
        return False
    return False


def _in_cidr(host: str, block: str) -> bool:
    """curl >= 7.86 accepts CIDR blocks in no_proxy."""
    try:
        return ipaddress.ip_address(host) in ipaddress.ip_network(block, strict=False)
    except ValueError:
        return False


def check_proxy(inputs: DoctorInputs) -> CheckResult:
    """Proxy variables that would intercept metadata traffic (the guide: "HTTP
    proxies need to be disabled before starting the program")."""
    env = inputs.env
    targets = metadata_http_targets(inputs.metadata_server)
    set_vars = {k: v for k, v in env.items() if k.lower() in _ALL_VARS and v.strip()}
    if not targets:
        return CheckResult(
            "proxy",
            Status.SKIP,
            "no HTTP-based metadata server to intercept (P2P handshake, Redis and the master "
            "use plain TCP)",
            details={"set": sorted(set_vars)},
        )
    intercepted: list[str] = []
    for kind, host, port in targets:
        names, bypass = {
            "etcd": (_GRPC_VARS, _NO_GRPC_PROXY),
            "https": (_HTTPS_VARS, _NO_PROXY),
        }.get(kind, (_HTTP_VARS, _NO_PROXY))
        if _bypassed(host, env, bypass):
            continue
        hits = [n for n in names if env.get(n, "").strip()]
        if hits:
            shown = ", ".join(f"{n}={env[n].strip()}" for n in hits)
            intercepted.append(
                f"{shown} would route {'etcd (gRPC)' if kind == 'etcd' else kind.upper()} "
                f"requests for {join_host_port(host, port)} through a proxy"
            )
    if intercepted:
        return CheckResult(
            "proxy",
            Status.WARN,
            "; ".join(intercepted)
            + " (pymooncake ignores proxy variables for metadata; the reference engine's "
            "libcurl, curl, Python and Go tools and etcd clients honour them)",
            "unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY grpc_proxy before "
            "starting nodes, or add the metadata host to no_proxy",
            {"set": sorted(set_vars)},
        )
    note = (
        f"proxy variables set ({', '.join(sorted(set_vars))}), but none applies to the "
        "metadata server (no_proxy exempts it, or they are for another scheme)"
        if set_vars
        else "no proxy variables set"
    )
    return CheckResult("proxy", Status.PASS, note, details={"set": sorted(set_vars)})


def redis_location(location: str, env: Mapping[str, str]) -> str:
    """A Redis location with MC_REDIS_USERNAME/PASSWORD/DB_INDEX folded in (the
    reference's Redis plugin reads them), unless the URL names its own."""
    host, port, user, password, db = redis_address(location)
    user = user or env.get("MC_REDIS_USERNAME", "")
    password = password or env.get("MC_REDIS_PASSWORD", "")
    db_text = env.get("MC_REDIS_DB_INDEX", "").strip()
    if not db and db_text.isdigit():
        db = int(db_text)
    auth = ""
    if password:
        auth = (
            f"{urllib.parse.quote(user, safe='')}:" if user else ":"
        ) + f"{urllib.parse.quote(password, safe='')}@"
    return f"{auth}{join_host_port(host, port)}/{db}"
