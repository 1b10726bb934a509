"""Several "hosts" on one machine: network namespaces on a private bridge.

:class:`NetnsNetwork` builds, for a multi-host test::

    root namespace (this process)          namespace mcn-<pid>-<tag>-0 ...
    bridge mcb<tag>  10.X.Y.1/24  <-veth->  eth0 10.X.Y.2/24, lo up
                                   <-veth->  eth0 10.X.Y.3/24, lo up ...

The root namespace is a host on the network too (the bridge address,
:attr:`NetnsNetwork.gateway`), so a server started by the test itself is
reachable from every namespace at that address -- if it listens on it: a
server bound to 127.0.0.1 in the root namespace is *not* reachable from the
namespaces, which is exactly the situation of a single-host etcd seen from
another machine.

The /24 is chosen at run time among 10.200.0.0-10.254.255.0, avoiding every
subnet already on this machine's interfaces and routes (other test runs'
networks included; a lock file serializes the choice).  Names carry a random
tag, and a state file under ``/run/pymooncake-netns`` records each network
with its creator's pid, so :func:`cleanup_stale` removes what a killed test
run left behind (it runs before each new network is made).

Processes started with :meth:`Host.popen` run in their own session; closing
the network kills them and anything else still inside its namespaces, then
deletes the namespaces (which deletes their veth ends) and the bridge.
Closing never raises: everything is attempted and failures are logged.

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and ``ip`` (iproute2);
:func:`netns_unavailable_reason` says why it cannot work here.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import random
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ._tools import find_tool

__all__ = ["Host", "NetnsError", "NetnsNetwork", "cleanup_stale", "netns_unavailable_reason"]

log = logging.getLogger("pymooncake.testing.netns")

STATE_DIR: Final = Path("/run/pymooncake-netns")
_IP_TIMEOUT_S: Final = 15.0


class NetnsError(RuntimeError):
    """An ``ip`` command failed while building the network."""


def _ip_path() -> str:
    path = find_tool("ip")
    if path is None:
        raise NetnsError("`ip` (Debian package iproute2) is not installed")
    return path


def _ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    argv = [_ip_path()]
    if netns is not None:
        argv += ["-n", netns]
    argv += list(args)
    proc = subprocess.run(argv, capture_output=True, timeout=_IP_TIMEOUT_S, check=False)
    if check and proc.returncode != 0:
        raise NetnsError(
            f"`{' '.join(argv)}` failed ({proc.returncode}): "
            f"{proc.stderr.decode(errors='replace').strip()}"
        )
    return proc.stdout.decode(errors="replace")


#: fixed ports the deployments bind inside a host that lie in the kernel's
#: ephemeral range (master RPC 50051, mooncake_client's dummy-client port 50052):
#: an outgoing connection made first (to etcd, the master) could take one of them
_SERVICE_PORTS: Final = "50051-50060"


def _reserve_service_ports(netns: str) -> None:
    """Keep the kernel from giving :data:`_SERVICE_PORTS` to outgoing connections
    in ``netns`` (``net.ipv4.ip_local_reserved_ports`` is per namespace; seen once:
    a storage node's own etcd connection took 50052 before its listener bound it).
    Best effort: a namespace where it cannot be set keeps the kernel's default."""
    subprocess.run(
        [
            _ip_path(),
            "netns",
            "exec",
            netns,
            "sh",
            "-c",
            f"echo {_SERVICE_PORTS} > /proc/sys/net/ipv4/ip_local_reserved_ports",
        ],
        capture_output=True,
        timeout=_IP_TIMEOUT_S,
        check=False,
    )


def netns_unavailable_reason() -> str | None:
    """None when namespaces can be built here, else why not (not root, no ``ip``,
    namespaces refused by the kernel or the container)."""
    if find_tool("ip") is None:
        return "`ip` (Debian package iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    probe = f"mcn-probe-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace here: {exc}"
    try:
        _ip("link", "add", "mcprobe0", "type", "veth", "peer", "name", "mcprobe1", netns=probe)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create network interfaces here: {exc}"
    finally:
        with contextlib.suppress(NetnsError, OSError, subprocess.TimeoutExpired):
            _ip("netns", "del", probe)
    return None


# ---------------------------------------------------------------------------------
# hosts
# ---------------------------------------------------------------------------------


@dataclass
class Host:
    """One namespace: a "host" with one interface (``eth0``) on the bridge."""

    index: int
    netns: str
    address: str
    veth: str  # the root-side end of its link
    _network: NetnsNetwork = field(repr=False)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside this namespace."""
        return [_ip_path(), "netns", "exec", self.netns, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside this namespace, in a session of its own; the
        network kills it on close if it still runs.  Keyword arguments go to
        :class:`subprocess.Popen`."""
        kwargs.setdefault("start_new_session", True)
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.command(argv), **kwargs)
        self._network._procs.append(proc)
        return proc

    def run(
        self, argv: Sequence[str], *, timeout_s: float = 60.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` inside this namespace to completion (killed after ``timeout_s``)."""
        kwargs.setdefault("capture_output", True)
        return subprocess.run(self.command(argv), timeout=timeout_s, check=False, **kwargs)

    def pids(self) -> list[int]:
        """Processes running inside this namespace now."""
        out = _ip("netns", "pids", self.netns, check=False)
        return [int(p) for p in out.split() if p.isdigit()]

    def disconnect(self) -> None:
        """Cut this host's link (its packets are dropped until :meth:`reconnect`)."""
        _ip("link", "set", self.veth, "down")

    def reconnect(self) -> None:
        _ip("link", "set", self.veth, "up")


# ---------------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------------


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    text = _ip("-4", "-o", "addr", "show", check=False) + _ip("-4", "route", "show", check=False)
    for word in text.split():
        if "/" in word or word[:1].isdigit():
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.ip_network(word, strict=False))
    return [n for n in nets if isinstance(n, ipaddress.IPv4Network)]


def _choose_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    used = _used_networks()
    for _ in range(500):
        candidate = ipaddress.IPv4Network(f"10.{rng.randint(200, 254)}.{rng.randint(0, 255)}.0/24")
        if not any(candidate.overlaps(u) for u in used if u.prefixlen > 0):
            return candidate
    raise NetnsError("no free 10.200-254.x.0/24 subnet found for the test network")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / "lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_netns_processes(netns: str) -> None:
    for pid in (int(p) for p in _ip("netns", "pids", netns, check=False).split() if p.isdigit()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _remove(state: dict[str, Any]) -> list[str]:
    """Delete what a state record names; returns what could not be deleted."""
    problems = []
    for netns in state.get("namespaces", []):
        _kill_netns_processes(netns)
        out = subprocess.run(
            [_ip_path(), "netns", "del", netns],
            capture_output=True,
            timeout=_IP_TIMEOUT_S,
            check=False,
        )
        err = out.stderr.decode(errors="replace")
        if out.returncode != 0 and "No such file" not in err:
            problems.append(f"netns {netns}: {err.strip()}")
    for link in [*state.get("veths", []), state.get("bridge", "")]:
        if not link:
            continue
        out = subprocess.run(
            [_ip_path(), "link", "del", link],
            capture_output=True,
            timeout=_IP_TIMEOUT_S,
            check=False,
        )
        err = out.stderr.decode(errors="replace")
        if out.returncode != 0 and "Cannot find device" not in err and "does not exist" not in err:
            problems.append(f"link {link}: {err.strip()}")
    return problems


def cleanup_stale() -> list[str]:
    """Remove networks whose creating process is gone; returns their tags."""
    removed: list[str] = []
    if not STATE_DIR.is_dir():
        return removed
    for path in STATE_DIR.glob("*.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _pid_alive(int(state.get("pid", 0))):
            continue
        problems = _remove(state)
        if problems:
            # a namespace's interfaces go away asynchronously after `ip netns del`
            # (the kernel's cleanup work queue): a veth or the bridge may be busy
            # for a moment; once more before the record is kept for the next run
            time.sleep(0.2)
            problems = _remove(state)
        if problems:
            log.warning(
                "netns: could not remove the leftovers of run %s (process %s): %s; "
                "kept %s for the next cleanup",
                state.get("tag", path.stem),
                state.get("pid"),
                "; ".join(problems),
                path,
            )
            continue
        path.unlink(missing_ok=True)
        removed.append(str(state.get("tag", path.stem)))
    return removed


class NetnsNetwork:
    """``hosts`` network namespaces on a bridge in the root namespace.

    Use as a context manager (or call :meth:`close`): ``with NetnsNetwork(3) as
    net: net.hosts[0].popen([...])``.

    Raises:
        NetnsError: the network could not be built (everything built so far is
            removed again).
    """

    def __init__(self, hosts: int, *, seed: int | None = None) -> None:
        if hosts < 1:
            raise ValueError("a network needs at least one host")
        self.tag = secrets.token_hex(3)
        self.bridge = f"mcb{self.tag}"
        self.hosts: list[Host] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._closed = False
        self._state_path = STATE_DIR / f"{self.tag}.json"
        self._state: dict[str, Any] = {
            "pid": os.getpid(),
            "tag": self.tag,
            "bridge": "",
            "veths": [],
            "namespaces": [],
        }
        rng = random.Random(seed)
        cleanup_stale()
        try:
            with _locked():
                self.subnet = _choose_subnet(rng)
                addrs = list(self.subnet.hosts())
                self.gateway = str(addrs[0])
                self._save()
                _ip("link", "add", self.bridge, "type", "bridge")
                self._state["bridge"] = self.bridge
                self._save()
                _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
                _ip("link", "set", self.bridge, "up")
            for i in range(hosts):
                self.hosts.append(self._add_host(i, str(addrs[i + 1])))
        except BaseException:
            self.close()
            raise

    def _save(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state))
        tmp.replace(self._state_path)

    def _add_host(self, i: int, address: str) -> Host:
        netns = f"mcn-{os.getpid()}-{self.tag}-{i}"
        veth, peer = f"mcv{self.tag}{i:02d}", f"mcp{self.tag}{i:02d}"
        _ip("netns", "add", netns)
        self._state["namespaces"].append(netns)
        self._save()
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        self._state["veths"].append(veth)
        self._save()
        _ip("link", "set", peer, "netns", netns)
        _ip("link", "set", peer, "name", "eth0", netns=netns)
        _ip("addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0", netns=netns)
        _ip("link", "set", "eth0", "up", netns=netns)
        _ip("link", "set", "lo", "up", netns=netns)
        _reserve_service_ports(netns)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        return Host(i, netns, address, veth, self)

    def wait_reachable(self, timeout_s: float = 10.0) -> None:
        """Wait until every host's link is up (the bridge forwards once its ports
        leave the learning state; with STP off that is immediate, but interfaces
        need a moment to come up)."""
        deadline = time.monotonic() + timeout_s
        for host in self.hosts:
            while True:
                out = _ip("-o", "link", "show", "eth0", netns=host.netns, check=False)
                if "state UP" in out or "LOWER_UP" in out:
                    break
                if time.monotonic() > deadline:
                    raise NetnsError(f"{host.netns}: eth0 did not come up: {out.strip()}")
                time.sleep(0.05)

    def __enter__(self) -> NetnsNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        subnet = getattr(self, "subnet", "?")
        return f"<NetnsNetwork {self.tag} {subnet} hosts={len(self.hosts)}>"

    def close(self) -> None:
        """Kill the processes started in the namespaces, delete the namespaces
        and the bridge; idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        try:
            problems = _remove(self._state)
        except (OSError, NetnsError, subprocess.TimeoutExpired) as exc:
            problems = [str(exc)]
        if problems:
            log.warning("test network %s: could not remove %s", self.tag, "; ".join(problems))
        else:
            self._state_path.unlink(missing_ok=True)
