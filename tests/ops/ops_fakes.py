"""A scripted :class:`pymooncake.ops.Probes` for testing the doctor's checks as
pure functions: every answer comes from the tables given to the constructor."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from pymooncake.errors import RpcFailed
from pymooncake.ops import Reach
from pymooncake.wire import MessageType


def _loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


class FakeProbes:
    """Answers from tables.

    Args:
        names: host name -> addresses (IP literals resolve to themselves).
        local: addresses of "this host" (loopback ones always are).
        lan: this host's non-loopback addresses.
        listening: (host, port) pairs that accept connections; others refuse.
        busy: (ip, port) pairs that cannot be bound (EADDRINUSE).
        http: url prefix -> (status, body).
        redis: reply to every command, or an exception to raise.
        rpc: (host, port, MessageType) -> reply.
        master: address -> version (or an exception to raise).
        metadata: key -> value of the metadata server.
        sys: relative sysfs path -> text (directories are implied by the paths).
        proc: relative procfs path -> text.
        dev: relative /dev paths that exist.
    """

    def __init__(
        self,
        *,
        names: Mapping[str, list[str]] | None = None,
        local: Iterable[str] = ("10.0.0.5",),
        lan: Iterable[str] = ("10.0.0.5",),
        listening: Iterable[tuple[str, int]] = (),
        busy: Iterable[tuple[str, int]] = (),
        http: Mapping[str, tuple[int, bytes]] | None = None,
        redis: Any = "PONG",
        rpc: Mapping[tuple[str, int, MessageType], Any] | None = None,
        master: Mapping[str, Any] | None = None,
        metadata: Mapping[str, bytes] | None = None,
        sys: Mapping[str, str] | None = None,
        proc: Mapping[str, str] | None = None,
        dev: Iterable[str] = (),
    ) -> None:
        self.names = dict(names or {})
        self.local = set(local)
        self.lan = list(lan)
        self.listening = set(listening)
        self.busy = set(busy)
        self.http = dict(http or {})
        self.redis_reply = redis
        self.rpc_replies = dict(rpc or {})
        self.masters = dict(master or {})
        self.metadata = dict(metadata or {})
        self.sys = dict(sys or {})
        self.proc = dict(proc or {})
        self.dev = set(dev)
        self.calls: list[tuple[str, Any]] = []

    def resolve(self, host: str) -> list[str]:
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            pass
        if host in self.names:
            return list(self.names[host])
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def is_local_address(self, ip: str) -> bool:
        return _loopback(ip) or ip in self.local

    def lan_addresses(self) -> list[str]:
        return list(self.lan)

    def connect(self, host: str, port: int, timeout_s: float) -> Reach:
        self.calls.append(("connect", (host, port)))
        try:
            ips = self.resolve(host)
        except OSError as exc:
            return Reach("dns", str(exc.strerror))
        if (host, port) in self.listening or any((ip, port) in self.listening for ip in ips):
            return Reach("ok")
        return Reach("refused", "Connection refused")

    def bind_error(self, ip: str, port: int) -> int | None:
        if not self.is_local_address(ip):
            return errno.EADDRNOTAVAIL
        return errno.EADDRINUSE if (ip, port) in self.busy else None

    def http_get(self, url: str, timeout_s: float) -> tuple[int, bytes]:
        self.calls.append(("http_get", url))
        for prefix, reply in self.http.items():
            if url.startswith(prefix):
                return reply
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    def etcd_get(self, endpoint: str, key: str, timeout_s: float) -> bytes | None:
        return self.metadata.get(key)

    def redis(self, address: str, args: list[str], timeout_s: float) -> Any:
        self.calls.append(("redis", (address, args)))
        if isinstance(self.redis_reply, BaseException):
            raise self.redis_reply
        return self.redis_reply

    def rpc(self, host: str, port: int, msg_type: MessageType, body: Any, timeout_s: float) -> Any:
        key = (host, port, msg_type)
        if key not in self.rpc_replies:
            raise RpcFailed(f"no RPC answer scripted for {key}")
        return self.rpc_replies[key]

    def master_version(self, address: str, timeout_s: float) -> str:
        reply = self.masters[address]
        if isinstance(reply, BaseException):
            raise reply
        return str(reply)

    def metadata_get(self, metadata_server: str, key: str, timeout_s: float) -> bytes | None:
        self.calls.append(("metadata_get", (metadata_server, key)))
        return self.metadata.get(key)

    def read_sys(self, rel: str) -> str | None:
        return self.sys.get(rel)

    def list_sys(self, rel: str) -> list[str] | None:
        prefix = rel.rstrip("/") + "/"
        found = {k[len(prefix) :].split("/", 1)[0] for k in self.sys if k.startswith(prefix)}
        return sorted(found) if found else None

    def read_proc(self, rel: str) -> str | None:
        return self.proc.get(rel)

    def dev_exists(self, rel: str) -> bool:
        return rel in self.dev


def rdma_tree(
    dev: str = "mlx5_0",
    *,
    port: int = 1,
    state: str = "4: ACTIVE",
    phys: str = "5: LinkUp",
    gids: Mapping[int, str] | None = None,
    types: Mapping[int, str] | None = None,
    ndev: str | None = None,
    ndev_mtu: int = 1500,
    uverbs: str | None = "uverbs0",
) -> dict[str, str]:
    """Sysfs entries (relative paths) of one RDMA device, as ibv_devinfo reads them."""
    base = f"class/infiniband/{dev}/ports/{port}"
    gids = dict(gids if gids is not None else {0: "fe80:0000:0000:0000:0202:c9ff:fe00:0001"})
    out = {f"{base}/state": state, f"{base}/phys_state": phys, f"{base}/link_layer": "Ethernet"}
    for idx, gid in gids.items():
        out[f"{base}/gids/{idx}"] = gid
        out[f"{base}/gid_attrs/types/{idx}"] = (types or {}).get(idx, "RoCE v2")
        if ndev:
            out[f"{base}/gid_attrs/ndevs/{idx}"] = ndev
    if ndev:
        out[f"class/net/{ndev}/mtu"] = str(ndev_mtu)
    if uverbs:
        out[f"class/infiniband_verbs/{uverbs}/ibdev"] = dev
    return out


def write_tree(root: str, entries: Mapping[str, str]) -> None:
    """Materialise relative path -> text entries under ``root`` (a fake /sys)."""
    for rel, text in entries.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")
