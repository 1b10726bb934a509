"""Host/port parsing, local addresses, listeners and connects with operator-grade errors.

Every failure here names the address involved and the likely fix, using the
wording of the troubleshooting guide where it has one (``bind address already
in use``, ``connection refused``, loopback ``connectable_name``).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import random
import socket
import struct
from collections.abc import Callable
from typing import Final

from .errors import DnsError, InvalidArgument, PeerSocketError, PortInUse

__all__ = [
    "bind_listener",
    "connect_tcp",
    "first_non_loopback_ipv4",
    "is_loopback",
    "join_host_port",
    "resolve_host",
    "set_io_timeout",
    "split_host_port",
]

log = logging.getLogger("pymooncake.net")

_SIOCGIFADDR: Final = 0x8915
_SIOCGIFFLAGS: Final = 0x8913
_IFF_UP: Final = 0x1
_IFF_LOOPBACK: Final = 0x8
_IFF_RUNNING: Final = 0x40


def split_host_port(value: str) -> tuple[str, int | None]:
    """Split ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``.

    A bare IPv6 address without brackets is returned whole, without a port.

    Raises:
        InvalidArgument: empty host or a port that is not 1..65535.
    """
    value = value.strip()
    if not value:
        raise InvalidArgument("empty host name")
    if value.startswith("["):
        close = value.find("]")
        if close < 0:
            raise InvalidArgument(f"{value!r}: unbalanced '[' in IPv6 address")
        host, rest = value[1:close], value[close + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise InvalidArgument(f"{value!r}: expected ':port' after ']'")
        return host, _port(rest[1:], value)
    if value.count(":") > 1:  # bare IPv6
        return value, None
    host, sep, port = value.partition(":")
    if not host:
        raise InvalidArgument(f"{value!r}: empty host part")
    return host, (_port(port, value) if sep else None)


def _port(text: str, whole: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise InvalidArgument(f"{whole!r}: port {text!r} is not a number") from None
    if not 0 < port < 65536:
        raise InvalidArgument(f"{whole!r}: port {port} is outside 1..65535")
    return port


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def first_non_loopback_ipv4() -> str | None:
    """Address of the first UP+RUNNING non-loopback IPv4 interface (reference rule)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            packed = struct.pack("256s", name.encode()[:15])
            try:
                flags = struct.unpack_from("H", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, packed), 16)[
                    0
                ]
                if flags & _IFF_LOOPBACK or (flags & (_IFF_UP | _IFF_RUNNING)) != (
                    _IFF_UP | _IFF_RUNNING
                ):
                    continue
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, packed)
            except OSError:
                continue
            return socket.inet_ntoa(raw[20:24])
    return None


def is_local_address(host: str) -> bool:
    """Whether ``host`` is an address of this machine (binding to it works)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:
        return False
    for family, _, _, _, addr in infos:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                s.bind((addr[0], 0))
                return True
            except OSError:
                continue
    return False


def is_ip(host: str) -> bool:
    """``host`` is an IPv4/IPv6 address literal (not a name)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def resolve_host(host: str, *, what: str) -> str:
    """Resolve to one IP address string.

    Raises:
        DnsError: the name does not resolve; ``what`` says whose name it is.
    """
    if is_ip(host):
        return host
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DnsError(
            f"cannot resolve {what} {host!r}: {exc.strerror}; use an IP address or a hostname "
            "with a DNS or /etc/hosts record"
        ) from exc
    # prefer IPv4 like the reference's default
    infos.sort(key=lambda i: 0 if i[0] == socket.AF_INET else 1)
    return str(infos[0][4][0])


def set_io_timeout(sock: socket.socket, seconds: float) -> None:
    """Kernel-side send/receive timeouts (SO_RCVTIMEO/SO_SNDTIMEO).

    Unlike ``settimeout`` this keeps the socket in blocking mode, so each
    ``recv_into``/``sendmsg`` stays a single system call; a timeout surfaces as
    ``BlockingIOError``/``TimeoutError`` (EAGAIN).
    """
    secs = max(0.0, seconds)
    tv = struct.pack("ll", int(secs), int((secs - int(secs)) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def bind_listener(
    host: str,
    *,
    port: int = 0,
    port_range: tuple[int, int] | None = None,
    backlog: int = 128,
    what: str = "listener",
    attempts: int = 500,
    rand: Callable[[int, int], int] = random.randint,
) -> socket.socket:
    """Bind and listen on ``host``.

    With ``port_range`` and ``port == 0`` a random free port from the range is
    used (up to ``attempts`` tries, as the reference).  Otherwise ``port`` is
    bound exactly (0 = kernel's choice).

    Raises:
        PortInUse: the port (or every tried port) is taken.
        PeerSocketError: ``host`` is not an address of this machine.
        DnsError: ``host`` does not resolve.
    """
    ip = resolve_host(host, what=f"{what} address")
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    candidates: list[int]
    if port == 0 and port_range is not None:
        lo, hi = port_range
        candidates = [rand(lo, hi) for _ in range(attempts)]
    else:
        candidates = [port]
    last: OSError | None = None
    for cand in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ip, cand))
            sock.listen(backlog)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
            if exc.errno == errno.EADDRINUSE:
                continue
            if exc.errno == errno.EADDRNOTAVAIL:
                raise PeerSocketError(
                    f"cannot listen on {join_host_port(ip, cand)} for the {what}: {ip} is not an "
                    f"address of this machine (resolved from {host!r}); local_hostname / "
                    "MC_TCP_BIND_ADDRESS must be this node's own LAN address or a hostname "
                    "resolving to it"
                ) from exc
            raise PeerSocketError(
                f"cannot listen on {join_host_port(ip, cand)} for the {what}: {exc.strerror}"
            ) from exc
    if len(candidates) == 1:
        raise PortInUse(
            f"bind address already in use: port {candidates[0]} on {ip} ({what}) is taken by "
            "another process; choose another port or stop the process holding it "
            f"(ss -ltnp 'sport = :{candidates[0]}')"
        ) from last
    lo, hi = port_range or (0, 0)
    raise PortInUse(
        f"bind address already in use: no free port for the {what} on {ip} after {attempts} "
        f"tries in [{lo}, {hi}]; widen MC_MIN_RPC_PORT/MC_MAX_RPC_PORT or free ports"
    ) from last


def connect_tcp(host: str, port: int, *, timeout_s: float, what: str) -> socket.socket:
    """Open a TCP connection with TCP_NODELAY, returned in blocking mode.

    Raises:
        DnsError: the host does not resolve.
        PeerSocketError: refused, unreachable or timed out; the message says
            which address and what to check.
    """
    addr = join_host_port(host, port)
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except socket.gaierror as exc:
        raise DnsError(
            f"cannot resolve {what} host {host!r}: {exc.strerror}; the segment name / "
            "local_hostname of the peer must be an IP or a resolvable hostname"
        ) from exc
    except ConnectionRefusedError as exc:
        raise PeerSocketError(
            f"connection refused by {addr} ({what}): nothing listens there. Check that the peer "
            "is running, that its local_hostname / segment name and rpc port are the ones you "
            "use, and that no firewall blocks the port"
        ) from exc
    except TimeoutError as exc:
        raise PeerSocketError(
            f"connecting to {addr} ({what}) timed out after {timeout_s:g} s: the host is "
            "unreachable or a firewall drops packets; check routing and whitelists"
        ) from exc
    except OSError as exc:
        raise PeerSocketError(
            f"cannot connect to {addr} ({what}): {exc.strerror or exc}; check the address and "
            "that the peer is reachable from this machine"
        ) from exc
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
