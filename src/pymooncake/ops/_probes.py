"""What the doctor asks of the machine, behind one injectable interface.

The checks (``_net_checks.py``, ``_host_checks.py``) are pure functions of the
inputs and the answers of a :class:`Probes` object; :class:`SystemProbes`
answers from this host (sockets, HTTP, Redis, the master's RPC, ``/sys``,
``/proc``, ``/dev``).  Tests pass fake roots for the file trees, or a probes
object of their own.

The etcd and Redis probes speak just enough of their protocols to ask "are
you there" and "what is under this key": etcd's HTTP API (``/health``,
``/v3/kv/range``) and Redis's RESP (``PING``, ``AUTH``, ``SELECT``, ``GET``)
over a plain socket, so the doctor needs no client library.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import http.client
import json
import os
import socket
import struct
import urllib.parse
from dataclasses import dataclass
from typing import Any, Final, Protocol

from .._net import is_ip, join_host_port, split_host_port
from ..config import EngineConfig
from ..errors import MetadataError, MetadataUnreachable, MooncakeError, NotSupported
from ..transfer._rpc import rpc_call
from ..transfer.metadata import connect_metadata, parse_metadata_target
from ..wire import MessageType

__all__ = ["Probes", "Reach", "SystemProbes", "etcd_endpoints", "redis_address"]

_SIOCGIFADDR: Final = 0x8915
_SIOCGIFFLAGS: Final = 0x8913
_IFF_UP: Final = 0x1
_IFF_LOOPBACK: Final = 0x8


@dataclass(frozen=True)
class Reach:
    """Outcome of a TCP connect.

    Attributes:
        kind: ``ok``, ``refused``, ``timeout``, ``unreachable``, ``dns`` or ``error``.
        detail: the system's words (``Connection refused`` ...).
    """

    kind: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


class Probes(Protocol):
    """Questions the checks ask; every network call is bounded by ``timeout_s``."""

    def resolve(self, host: str) -> list[str]:
        """IP addresses of ``host``, IPv4 first.  Raises OSError (gaierror) if it
        does not resolve."""

    def is_local_address(self, ip: str) -> bool:
        """``ip`` is an address of this host (it can be bound)."""

    def lan_addresses(self) -> list[str]:
        """This host's non-loopback IPv4 addresses on interfaces that are up."""

    def connect(self, host: str, port: int, timeout_s: float) -> Reach:
        """Try a TCP connection (closed at once)."""

    def bind_error(self, ip: str, port: int) -> int | None:
        """None if ``ip:port`` can be bound for listening, else the errno."""

    def http_get(self, url: str, timeout_s: float) -> tuple[int, bytes]:
        """GET ``url`` without any proxy.  Raises OSError/HTTPException."""

    def etcd_get(self, endpoint: str, key: str, timeout_s: float) -> bytes | None:
        """Value of ``key`` at an etcd endpoint (``host:port``), None if absent."""

    def redis(self, address: str, args: list[str], timeout_s: float) -> Any:
        """Run a command at a Redis ``[user:pass@]host:port[/db]`` (AUTH and
        SELECT first when the address names them); the decoded reply (bytes, str for simple strings, int, None, list).
        Raises OSError, or RedisReplyError for an error reply."""

    def rpc(self, host: str, port: int, msg_type: MessageType, body: Any, timeout_s: float) -> Any:
        """One Transfer Engine RPC exchange.  Raises MooncakeError."""

    def master_version(self, address: str, timeout_s: float) -> str:
        """The master's protocol version (ServiceReady).  Raises MooncakeError."""

    def metadata_get(self, metadata_server: str, key: str, timeout_s: float) -> bytes | None:
        """Value of ``key`` in the metadata server (None if absent).  Raises
        MooncakeError or OSError."""

    def read_sys(self, rel: str) -> str | None:
        """Text of ``/sys/<rel>`` (stripped), None if absent or unreadable."""

    def list_sys(self, rel: str) -> list[str] | None:
        """Sorted entries of the directory ``/sys/<rel>``, None if absent."""

    def read_proc(self, rel: str) -> str | None:
        """Text of ``/proc/<rel>``, None if absent or unreadable."""

    def dev_exists(self, rel: str) -> bool:
        """``/dev/<rel>`` exists."""


class RedisReplyError(OSError):
    """Redis answered with an error reply (``-ERR ...``, ``-NOAUTH ...``)."""


def etcd_endpoints(location: str) -> list[str]:
    """``host:port`` endpoints of an etcd connection string (``etcd://`` removed);
    ``http://`` prefixes are dropped, a missing port is 2379."""
    out = []
    for part in location.split(","):
        part = part.strip().removeprefix("http://").removeprefix("https://").rstrip("/")
        if not part:
            continue
        host, port = split_host_port(part)
        out.append(join_host_port(host, port or 2379))
    return out


def redis_address(location: str) -> tuple[str, int, str, str, int]:
    """(host, port, username, password, db) of ``[user:pass@]host[:port][/db]``."""
    parsed = urllib.parse.urlsplit("redis://" + location)
    db = parsed.path.strip("/")
    return (
        parsed.hostname or "127.0.0.1",
        parsed.port or 6379,
        urllib.parse.unquote(parsed.username or ""),
        urllib.parse.unquote(parsed.password or ""),
        int(db) if db.isdigit() else 0,
    )


def _resp_encode(args: list[str]) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        raw = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class _RespReader:
    """Reads one RESP2 reply from a blocking socket (doctor-sized: small replies)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionResetError("Redis closed the connection")
            self._buf += data
        i = self._buf.index(b"\r\n")
        line = bytes(self._buf[:i])
        del self._buf[: i + 2]
        return line

    def _exact(self, n: int) -> bytes:
        while len(self._buf) < n + 2:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionResetError("Redis closed the connection")
            self._buf += data
        out = bytes(self._buf[:n])
        del self._buf[: n + 2]
        return out

    def reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode(errors="replace")
        if kind == b"-":
            raise RedisReplyError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise RedisReplyError(f"not a Redis reply: {line[:60]!r}")


class SystemProbes:
    """Answers from this host.

    Args:
        sysfs_root: where ``/sys`` is (a fake tree in tests).
        procfs_root: where ``/proc`` is.
        devfs_root: where ``/dev`` is.
    """

    def __init__(
        self, *, sysfs_root: str = "/sys", procfs_root: str = "/proc", devfs_root: str = "/dev"
    ) -> None:
        self.sysfs_root = sysfs_root
        self.procfs_root = procfs_root
        self.devfs_root = devfs_root

    # --- names and addresses --------------------------------------------------------

    def resolve(self, host: str) -> list[str]:
        if is_ip(host):
            return [host]
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        infos.sort(key=lambda i: 0 if i[0] == socket.AF_INET else 1)
        seen: list[str] = []
        for info in infos:
            ip = str(info[4][0])
            if ip not in seen:
                seen.append(ip)
        return seen

    def is_local_address(self, ip: str) -> bool:
        return self.bind_error(ip, 0) != errno.EADDRNOTAVAIL

    def lan_addresses(self) -> list[str]:
        try:
            names = [name for _, name in socket.if_nameindex()]
        except OSError:
            return []
        out: list[str] = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for name in names:
                packed = struct.pack("256s", name.encode()[:15])
                try:
                    raw_flags = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, packed)
                    flags = struct.unpack_from("H", raw_flags, 16)[0]
                    if flags & _IFF_LOOPBACK or not flags & _IFF_UP:
                        continue
                    raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, packed)
                except OSError:
                    continue
                ip = socket.inet_ntoa(raw[20:24])
                if ip not in out:
                    out.append(ip)
        return out

    # --- sockets ---------------------------------------------------------------------

    def connect(self, host: str, port: int, timeout_s: float) -> Reach:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return Reach("ok")
        except socket.gaierror as exc:
            return Reach("dns", str(exc.strerror))
        except ConnectionRefusedError as exc:
            return Reach("refused", exc.strerror or "Connection refused")
        except TimeoutError:
            return Reach("timeout", f"no answer within {timeout_s:g} s")
        except OSError as exc:
            if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                return Reach("unreachable", exc.strerror or str(exc))
            return Reach("error", exc.strerror or str(exc))

    def bind_error(self, ip: str, port: int) -> int | None:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            # as the engine binds (SO_REUSEADDR): TIME_WAIT leftovers do not count
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((ip, port))
                s.listen(1)
            except OSError as exc:
                return exc.errno or -1
        return None

    def http_get(self, url: str, timeout_s: float) -> tuple[int, bytes]:
        parsed = urllib.parse.urlsplit(url)
        cls = (
            http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
        )
        conn = cls(parsed.hostname or "", parsed.port, timeout=timeout_s)
        try:
            target = parsed.path or "/"
            if parsed.query:
                target += "?" + parsed.query
            conn.request("GET", target)
            resp = conn.getresponse()
            return resp.status, resp.read(1 << 20)
        finally:
            conn.close()

    def _etcd_post(self, endpoint: str, path: str, body: dict[str, Any], timeout_s: float) -> Any:
        host, port = split_host_port(endpoint)
        conn = http.client.HTTPConnection(host, port or 2379, timeout=timeout_s)
        try:
            conn.request(
                "POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"}
            )
            resp = conn.getresponse()
            data = resp.read(1 << 20)
        finally:
            conn.close()
        if resp.status != 200:
            raise MetadataError(
                f"etcd at {endpoint} answered POST {path} with HTTP {resp.status}: "
                f"{data[:200].decode(errors='replace')}"
            )
        return json.loads(data)

    def etcd_get(self, endpoint: str, key: str, timeout_s: float) -> bytes | None:
        reply = self._etcd_post(
            endpoint,
            "/v3/kv/range",
            {"key": base64.b64encode(key.encode()).decode()},
            timeout_s,
        )
        kvs = reply.get("kvs") or []
        if not kvs:
            return None
        return base64.b64decode(kvs[0].get("value", ""))

    def redis(self, address: str, args: list[str], timeout_s: float) -> Any:
        host, port, user, password, db = redis_address(address)
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            reader = _RespReader(sock)
            if password:
                sock.sendall(_resp_encode(["AUTH", *([user] if user else []), password]))
                reader.reply()
            if db:
                sock.sendall(_resp_encode(["SELECT", str(db)]))
                reader.reply()
            sock.sendall(_resp_encode(args))
            return reader.reply()

    def rpc(self, host: str, port: int, msg_type: MessageType, body: Any, timeout_s: float) -> Any:
        return rpc_call(
            host,
            port,
            msg_type,
            body,
            connect_timeout_s=timeout_s,
            timeout_s=timeout_s,
            max_frame=EngineConfig().handshake_max_length,
            what="peer RPC port",
        )

    def master_version(self, address: str, timeout_s: float) -> str:
        from ..store._master_client import MasterClient

        client = MasterClient(
            address, timeout_s=timeout_s, connect_timeout_s=timeout_s, same_host_rpc=False
        )
        try:
            return client.check_version()
        finally:
            client.close()

    def metadata_get(self, metadata_server: str, key: str, timeout_s: float) -> bytes | None:
        target = parse_metadata_target(metadata_server)
        if target.scheme == "etcd":
            last: BaseException | None = None
            for endpoint in etcd_endpoints(target.location):
                try:
                    return self.etcd_get(endpoint, key, timeout_s)
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    last = exc
            raise MetadataUnreachable(f"no etcd endpoint of {metadata_server!r} answered: {last}")
        if target.scheme == "redis":
            value = self.redis(target.location, ["GET", key], timeout_s)
            return value if isinstance(value, bytes) or value is None else str(value).encode()
        store = connect_metadata(
            target,
            EngineConfig(metadata_timeout_s=timeout_s, metadata_connect_timeout_s=timeout_s),
        )
        if store is None:
            raise NotSupported("P2PHANDSHAKE has no metadata server to read")
        try:
            return store.get(key)
        except MooncakeError:
            raise
        finally:
            store.close()

    # --- files -----------------------------------------------------------------------

    @staticmethod
    def _read(path: str) -> str | None:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read().strip()
        except OSError:
            return None

    def read_sys(self, rel: str) -> str | None:
        return self._read(os.path.join(self.sysfs_root, rel))

    def list_sys(self, rel: str) -> list[str] | None:
        try:
            return sorted(os.listdir(os.path.join(self.sysfs_root, rel)))
        except OSError:
            return None

    def read_proc(self, rel: str) -> str | None:
        return self._read(os.path.join(self.procfs_root, rel))

    def dev_exists(self, rel: str) -> bool:
        return os.path.exists(os.path.join(self.devfs_root, rel))
