"""Real etcd servers for tests: Debian's ``etcd`` (package ``etcd-server``) on
ports chosen at run time, with a data directory of their own.

:class:`EtcdCluster` starts one or more members (``size=3`` is a real Raft
cluster), each of which a test can stop, kill, pause (SIGSTOP) and start again
with its data -- what high-availability tests need.  Members listen on
127.0.0.1 by default; give ``hosts`` (and ``namespaces`` from
:class:`~pymooncake.testing.NetnsNetwork`) to spread them over test hosts, and
``listen_any`` to bind 0.0.0.0 as the troubleshooting guide recommends.

Output goes to ``<data dir>/etcd.log`` (quoted when a start fails).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ._cluster import free_port
from ._tools import find_tool

if TYPE_CHECKING:
    from ._netns import Host

__all__ = ["EtcdCluster", "EtcdMember", "EtcdStartError"]

LOCAL: Final = "127.0.0.1"
#: seconds for a member (or a new cluster) to report healthy
START_TIMEOUT_S: Final = 30.0
_LOG_TAIL: Final = 3000


class EtcdStartError(RuntimeError):
    """etcd did not come up; the message quotes its log."""


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"<no log: {exc}>"
    return data[-_LOG_TAIL:].decode(errors="replace")


class EtcdMember:
    """One etcd process of an :class:`EtcdCluster`."""

    def __init__(
        self,
        cluster: EtcdCluster,
        name: str,
        host: str,
        data_dir: Path,
        namespace: Host | None,
    ) -> None:
        self.cluster = cluster
        self.name = name
        self.host = host
        self.data_dir = data_dir
        self.namespace = namespace
        self.client_port = 0
        self.peer_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{name}.log"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EtcdMember {self.name} {self.endpoint} {state}>"

    @property
    def endpoint(self) -> str:
        """``host:client_port``."""
        return f"{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _choose_ports(self) -> None:
        if self.namespace is not None:
            # a fresh namespace has every port free; keep them distinct anyway
            self.client_port, self.peer_port = 2379, 2380
        else:
            self.client_port, self.peer_port = free_port(), free_port()
            while self.peer_port == self.client_port:
                self.peer_port = free_port()

    def _argv(self, binary: str, initial_cluster: str, state: str) -> list[str]:
        listen = "0.0.0.0" if self.cluster.listen_any else self.host
        argv = [
            binary,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            f"http://{listen}:{self.client_port}",
            "--advertise-client-urls",
            f"http://{self.host}:{self.client_port}",
            "--listen-peer-urls",
            f"http://{listen}:{self.peer_port}",
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            initial_cluster,
            "--initial-cluster-state",
            state,
            "--initial-cluster-token",
            self.cluster.token,
            "--logger",
            "zap",
            "--log-level",
            "warn",
            *self.cluster.extra_args,
        ]
        if self.namespace is not None:
            return self.namespace.command(argv)
        return argv

    def _spawn(self, argv: list[str]) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start(self) -> None:
        """Start this member again (after :meth:`stop` or :meth:`kill`), with its
        data and ports; waits until it is healthy."""
        if self.running:
            return
        self._spawn(self._argv(self.cluster.binary, self.cluster.initial_cluster(), "existing"))
        self.wait_healthy()

    def health(self, timeout_s: float = 1.0) -> bool:
        """``GET /health`` answers ``{"health": "true"}`` (the member has a leader)."""
        conn = http.client.HTTPConnection(self.host, self.client_port, timeout=timeout_s)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()
        if resp.status != 200:
            return False
        with contextlib.suppress(ValueError):
            return str(json.loads(body).get("health")) == "true"
        return False

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.health():
            if self.proc is not None and self.proc.poll() is not None:
                raise EtcdStartError(
                    f"etcd member {self.name} exited with {self.proc.returncode}:\n"
                    f"{_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise EtcdStartError(
                    f"etcd member {self.name} at {self.endpoint} not healthy after "
                    f"{timeout_s:g} s:\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        if self.proc is None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc.wait()

    def kill(self) -> None:
        """SIGKILL (a crash: no clean shutdown)."""
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)
        self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the process stays, but answers nothing (a hung member)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)


def _scratch() -> str | None:
    """A tmpfs for the members' data (None: the default temporary directory).
    etcd syncs its log to disk before it answers a write -- a lease grant or
    revocation, the leader key's creation -- so on a busy disk an election can
    stall for seconds; a test measures failover, not the disk."""
    shm = "/dev/shm"
    try:
        free = os.statvfs(shm)
    except OSError:
        return None
    if os.access(shm, os.W_OK) and free.f_bavail * free.f_frsize > 1 << 30:
        return shm
    return None


class EtcdCluster:
    """``size`` etcd members forming one cluster.

    Args:
        size: number of members (1: a single node).
        hosts: the address each member listens on and advertises (default
            127.0.0.1 for all).
        namespaces: a network-namespace host per member to run it in (with
            ``hosts`` their addresses).
        listen_any: listen on 0.0.0.0 (still advertising ``hosts``).
        base_dir: where data directories go (default: a new temporary directory,
            removed on close).
        binary: the etcd executable (default: found on PATH / sbin).
        extra_args: more etcd flags, e.g. ``["--max-request-bytes", "33554432"]``.

    Raises:
        FileNotFoundError: no etcd executable.
        EtcdStartError: the cluster did not become healthy (the log is quoted).
    """

    def __init__(
        self,
        size: int = 1,
        *,
        hosts: Sequence[str] | None = None,
        namespaces: Sequence[Host] | None = None,
        listen_any: bool = False,
        base_dir: str | Path | None = None,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if size < 1:
            raise ValueError("an etcd cluster needs at least one member")
        found = binary or find_tool("etcd")
        if found is None:
            raise FileNotFoundError("etcd is not installed (Debian package etcd-server)")
        self.binary = found
        self.listen_any = listen_any
        self.extra_args = tuple(extra_args)
        self.token = f"pymooncake-{os.getpid()}-{time.monotonic_ns()}"
        if namespaces is not None and hosts is None:
            hosts = [ns.address for ns in namespaces]
        hosts = list(hosts) if hosts is not None else [LOCAL] * size
        if len(hosts) != size or (namespaces is not None and len(namespaces) != size):
            raise ValueError("hosts and namespaces need one entry per member")
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if base_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="pymooncake-etcd-", dir=_scratch())
            base_dir = self._tmp.name
        self.base_dir = Path(base_dir)
        self.members = [
            EtcdMember(
                self,
                f"m{i}",
                hosts[i],
                self.base_dir / f"m{i}.data",
                None if namespaces is None else namespaces[i],
            )
            for i in range(size)
        ]
        try:
            self._start_new()
        except BaseException:
            self.close()
            raise

    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def _start_new(self) -> None:
        last: EtcdStartError | None = None
        for _attempt in range(3):  # free_port() can race with another process
            for m in self.members:
                m._choose_ports()
            initial = self.initial_cluster()
            for m in self.members:
                m._spawn(m._argv(self.binary, initial, "new"))
            try:
                for m in self.members:
                    m.wait_healthy()
                return
            except EtcdStartError as exc:
                last = exc
                in_use = any("address already in use" in _tail(m.log_path) for m in self.members)
                for m in self.members:
                    m.kill()
                if not in_use:
                    raise
                for m in self.members:  # start over with fresh data and ports
                    subprocess.run(["rm", "-rf", str(m.data_dir)], check=False)
        assert last is not None
        raise last

    @property
    def endpoints(self) -> str:
        """``h1:p1;h2:p2``: what Mooncake's ``metadata_server`` and ``--etcd_endpoints`` take."""
        return ";".join(m.endpoint for m in self.members)

    @property
    def url(self) -> str:
        """``etcd://h1:p1;h2:p2``."""
        return f"etcd://{self.endpoints}"

    def __repr__(self) -> str:
        return f"<EtcdCluster {self.endpoints}>"

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every member and remove temporary data; idempotent."""
        for m in self.members:
            m.kill()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
