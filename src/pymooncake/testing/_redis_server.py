"""A real Redis for tests: Debian's ``redis-server`` on 127.0.0.1 (or a test
host's address) with a port chosen at run time, no persistence, optionally a
password or an ACL user."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ._cluster import free_port
from ._tools import find_tool

if TYPE_CHECKING:
    from ._netns import Host

__all__ = ["RedisServer", "RedisStartError"]

LOCAL: Final = "127.0.0.1"
START_TIMEOUT_S: Final = 15.0


class RedisStartError(RuntimeError):
    """redis-server did not come up; the message quotes its log."""


class RedisServer:
    """One ``redis-server`` process.

    Args:
        host: the address it binds (127.0.0.1 by default).
        password: ``requirepass`` (clients then need ``AUTH``).
        acl_user: ``(name, password)`` of an extra ACL user allowed everything.
        namespace: a test host to run it in (``host`` defaults to its address).
        binary: the executable (default: found on PATH / sbin).

    Raises:
        FileNotFoundError: no redis-server.
        RedisStartError: it did not answer PING in time.
    """

    def __init__(
        self,
        *,
        host: str | None = None,
        password: str = "",
        acl_user: tuple[str, str] | None = None,
        namespace: Host | None = None,
        binary: str | None = None,
    ) -> None:
        found = binary or find_tool("redis-server")
        if found is None:
            raise FileNotFoundError("redis-server is not installed (Debian package redis-server)")
        self.host = host or (namespace.address if namespace is not None else LOCAL)
        self.password = password
        self.namespace = namespace
        self._tmp = tempfile.TemporaryDirectory(prefix="pymooncake-redis-")
        self.dir = Path(self._tmp.name)
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        try:
            for _attempt in range(3):  # free_port() can race with another process
                self.port = 6379 if namespace is not None else free_port()
                self._spawn(found, acl_user)
                try:
                    self._wait_ready()
                    return
                except RedisStartError:
                    self._kill()
                    if "Address already in use" not in self.log():
                        raise
            raise RedisStartError(f"redis-server found no free port:\n{self.log()}")
        except BaseException:
            self.close()
            raise

    def _spawn(self, binary: str, acl_user: tuple[str, str] | None) -> None:
        conf = [
            f"bind {self.host}",
            f"port {self.port}",
            "save ''",
            "appendonly no",
            f"dir {self.dir}",
            f"logfile {self.log_path}",
            "protected-mode no",
        ]
        if self.password:
            conf.append(f"requirepass {self.password}")
        if acl_user is not None:
            name, secret = acl_user
            conf.append(f"user {name} on >{secret} ~* &* +@all")
        conf_path = self.dir / "redis.conf"
        conf_path.write_text("\n".join(conf) + "\n")
        argv = [binary, str(conf_path)]
        if self.namespace is not None:
            argv = self.namespace.command(argv)
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError as exc:
            return f"<no log: {exc}>"

    def ping(self, timeout_s: float = 1.0) -> bool:
        """The server answers ``PING`` (``-NOAUTH`` counts: it is up)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout_s) as s:
                s.sendall(b"PING\r\n")
                reply = s.recv(64)
        except OSError:
            return False
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ping():
            if self.proc is not None and self.proc.poll() is not None:
                raise RedisStartError(
                    f"redis-server exited with {self.proc.returncode}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise RedisStartError(
                    f"redis-server not answering after {START_TIMEOUT_S} s:\n{self.log()}"
                )
            time.sleep(0.05)

    @property
    def address(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """``redis://host:port`` (what ``metadata_server`` takes)."""
        return f"redis://{self.address}"

    def __repr__(self) -> str:
        return f"<RedisServer {self.address}>"

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def close(self) -> None:
        """Kill the server and remove its directory; idempotent."""
        self._kill()
        self._tmp.cleanup()
