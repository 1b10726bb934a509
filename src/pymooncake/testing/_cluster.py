"""Local store clusters on 127.0.0.1 for tests, demos and the ``pymooncake cluster`` command.

* :class:`LocalCluster` -- a master (with its embedded HTTP metadata server)
  on a private event-loop thread plus any number of :class:`StoreClient`s,
  all in this process.
* :class:`ProcessCluster` -- the same as separate processes: ``mooncake_master``
  and ``mooncake_client`` nodes started with ``sys.executable -m ...``, so
  tests can kill them (SIGKILL) and restart them.

Everything listens on 127.0.0.1 on ports chosen at run time; ``close()``
stops what was started, in reverse order.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from .._authio import TOKEN_ENV, ClusterSecurity
from ..config import EngineConfig
from ..store import MasterConfig, StoreClient, StoreClientConfig
from ..store.master import ThreadedMaster
from ._ports import free_port

__all__ = ["LocalCluster", "NodeProcess", "ProcessCluster", "free_port", "journaled_master_flags"]

LOCAL = "127.0.0.1"


def journaled_master_flags(journal: str | os.PathLike[str], *more: str) -> list[str]:
    """``mooncake_master`` flags for a :class:`ProcessCluster` whose master is
    restarted (:meth:`ProcessCluster.restart_master`): its ports pinned (the
    clients and nodes find it again) and its journal at ``journal``; then ``more``."""
    return [
        f"--port={free_port()}",
        f"--http_metadata_server_port={free_port()}",
        f"--metrics_port={free_port()}",
        f"--journal_path={journal}",
        *more,
    ]


class LocalCluster:
    """Master + clients in this process.

    Args:
        master: master settings (defaults: reference defaults).
        engine: engine settings for the clients (default: loopback, short timeouts).
        token: cluster token of the master (RPC, admin HTTP, metadata server) and of
            every client started by :meth:`client`; empty = an open cluster.
        master_kwargs: more :class:`~pymooncake.store.master.MasterService`
            arguments (``limits=``, ``journal_path=`` ...).
    """

    def __init__(
        self,
        master: MasterConfig | None = None,
        *,
        engine: EngineConfig | None = None,
        token: str = "",
        **master_kwargs: Any,
    ) -> None:
        self.token = token
        self.security = ClusterSecurity(token=token)
        self.master = ThreadedMaster(
            master, metadata_port=0, metrics_port=0, security=self.security, **master_kwargs
        )
        engine_config = engine or EngineConfig(
            tcp_bind_address=LOCAL,
            transfer_timeout_s=10.0,
            connect_timeout_s=2.0,
            rpc_io_timeout_s=5.0,
        )
        self.engine_config = engine_config.replace(cluster_token=token) if token else engine_config
        self.clients: list[StoreClient] = []

    @property
    def master_address(self) -> str:
        return self.master.rpc_address

    @property
    def metadata_url(self) -> str:
        url = self.master.metadata_url
        assert url is not None
        return url

    @property
    def metrics_url(self) -> str:
        url = self.master.metrics_url
        assert url is not None
        return url

    def client(
        self,
        segment_bytes: int = 64 << 20,
        local_buffer_bytes: int = 16 << 20,
        *,
        p2p: bool = False,
        **kw: Any,
    ) -> StoreClient:
        """Start a client contributing ``segment_bytes`` (0 = pure client)."""
        cfg = StoreClientConfig(
            local_hostname=LOCAL,
            metadata_server="P2PHANDSHAKE" if p2p else self.metadata_url,
            master_server_addr=self.master_address,
            global_segment_size=segment_bytes,
            local_buffer_size=local_buffer_bytes,
            engine=self.engine_config,
            **kw,
        )
        client = StoreClient(cfg)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for c in reversed(self.clients):
            c.close()
        self.clients.clear()
        self.master.close()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class NodeProcess:
    """A started subprocess and the lines it printed."""

    proc: subprocess.Popen[str]
    name: str
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def wait_for(self, pattern: str, timeout_s: float = 30.0) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            while seen < len(self.lines):
                m = rx.search(self.lines[seen])
                seen += 1
                if m:
                    return m
            if self.proc.poll() is not None and seen >= len(self.lines):
                break
            time.sleep(0.02)
        tail = "".join(self.lines[-20:])
        raise RuntimeError(
            f"{self.name} did not print /{pattern}/ within {timeout_s:g} s; output:\n{tail}"
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(15)
        if self._reader is not None:
            self._reader.join(5)

    def stop(self) -> int:
        """SIGTERM, wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        return int(self.proc.returncode)


def _spawn(
    name: str,
    args: Sequence[str],
    env: dict[str, str] | None = None,
    wrap: Callable[[list[str]], list[str]] | None = None,
) -> NodeProcess:
    """Start ``python args...`` (``wrap`` turns that command line into the one to
    run, e.g. :meth:`Host.command <pymooncake.testing.Host.command>` to run it in
    a network namespace: ``ip netns exec`` execs it, so the pid is Python's)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    argv = [sys.executable, *args]
    proc = subprocess.Popen(
        argv if wrap is None else wrap(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=full_env,
        start_new_session=True,
    )
    node = NodeProcess(proc, name)

    def pump(stream: IO[str]) -> None:
        for line in stream:
            node.lines.append(line)
        stream.close()

    assert proc.stdout is not None
    node._reader = threading.Thread(
        target=pump, args=(proc.stdout,), name=f"pump:{name}", daemon=True
    )
    node._reader.start()
    return node


class ProcessCluster:
    """``mooncake_master`` and ``mooncake_client`` nodes as subprocesses on 127.0.0.1.

    Args:
        master_flags: more ``mooncake_master`` flags.
        env: more environment of every process.
        token: cluster token: the master reads it from a 0600 file
            (``--cluster_token_file``), the nodes from ``PYMOONCAKE_CLUSTER_TOKEN``;
            empty = an open cluster (a token inherited from this process's
            environment is removed).
    """

    def __init__(
        self,
        master_flags: Sequence[str] = (),
        *,
        env: dict[str, str] | None = None,
        token: str = "",
    ) -> None:
        self.token = token
        self._env = {"MC_TCP_BIND_ADDRESS": LOCAL, TOKEN_ENV: "", **(env or {})}
        self._token_dir: tempfile.TemporaryDirectory[str] | None = None
        self.master_flags = list(master_flags)
        if token:
            self._token_dir = tempfile.TemporaryDirectory(prefix="pymooncake-token-")
            self.token_file = os.path.join(self._token_dir.name, "cluster.token")
            fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            self.master_flags.append(f"--cluster_token_file={self.token_file}")
        self.nodes: list[NodeProcess] = []
        try:
            self.master = self._start_master(self.master_flags)
        except BaseException:
            self._remove_token_file()
            raise

    @property
    def node_env(self) -> dict[str, str]:
        """The environment (beyond this process's) of processes that join the cluster."""
        env = dict(self._env)
        if self.token:
            env[TOKEN_ENV] = self.token
        return env

    def client_config(self, **overrides: Any) -> StoreClientConfig:
        """The settings of a client of this cluster in the calling process (no
        segment unless ``global_segment_size`` is among ``overrides``)."""
        fields: dict[str, Any] = {
            "local_hostname": LOCAL,
            "metadata_server": self.metadata_url,
            "master_server_addr": self.master_address,
            "global_segment_size": 0,
            **overrides,
        }
        return StoreClientConfig(**fields)

    def _remove_token_file(self) -> None:
        if self._token_dir is not None:
            self._token_dir.cleanup()
            self._token_dir = None

    def restart_master(self, sig: int = signal.SIGKILL) -> None:
        """Kill the master (SIGKILL by default) and start it again with the same
        flags (pin its ports with --port/--http_metadata_server_port to keep them)."""
        self.master.kill(sig)
        self.master = self._start_master(self.master_flags)

    def _start_master(self, flags: Sequence[str]) -> NodeProcess:
        master = _spawn(
            "mooncake_master",
            [
                "-m",
                "pymooncake.cli.master",
                f"--rpc_address={LOCAL}",
                "--port=0",
                f"--metrics_host={LOCAL}",
                "--metrics_port=0",
                "--enable_http_metadata_server=true",
                f"--http_metadata_server_host={LOCAL}",
                "--http_metadata_server_port=0",
                *flags,
            ],
            self._env,
        )
        try:
            metrics = master.wait_for(r"admin HTTP server listening on (http://\S+)")
            meta = master.wait_for(r"HTTP metadata server listening on (\S+)")
            rpc = master.wait_for(r"Master service started on (\S+)")
        except BaseException:
            master.stop()
            raise
        self.metrics_url = metrics.group(1)
        self.metadata_url = meta.group(1)
        self.master_address = rpc.group(1)
        return master

    def node(
        self, segment: str = "64 MB", *, name: str = "", flags: Sequence[str] = ()
    ) -> tuple[NodeProcess, str]:
        """Start a storage node (mooncake_client); returns it and its segment name.

        It serves dummy clients on a free port unless ``flags`` has ``--port``:
        ``node.wait_for(r"serving dummy clients on (\\S+)")`` tells the address.
        """
        host = f"{LOCAL}:{free_port()}" if name == "" else name
        port = [] if any(f.startswith("--port") for f in flags) else ["--port=0"]
        node = _spawn(
            "mooncake_client",
            [
                "-m",
                "pymooncake.cli.store_client",
                f"--host={host}",
                f"--master_server_address={self.master_address}",
                f"--metadata_server={self.metadata_url}",
                f"--global_segment_size={segment}",
                *port,
                *flags,
            ],
            self.node_env,
        )
        try:
            m = node.wait_for(r"ready: segment (\S+)")
        except BaseException:
            node.stop()
            raise
        self.nodes.append(node)
        return node, m.group(1)

    def close(self) -> None:
        try:
            for n in reversed(self.nodes):
                n.stop()
            self.nodes.clear()
            self.master.stop()
        finally:
            self._remove_token_file()

    def __enter__(self) -> ProcessCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
