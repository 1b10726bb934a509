"""The processes of the interop tests: the reference engine driven over
stdin/stdout (``ref_peer.py``, run by the reference's own interpreter) and the
HTTP metadata servers (ours and the reference's).

Nothing here imports the reference package: it runs in its own virtual
environment.  Every read from a subprocess has a deadline, and every process is
killed when it does not stop by itself.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final
from urllib.parse import quote

from pymooncake.testing import free_port

HERE: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = HERE.parents[1]
REF_PEER_SCRIPT: Final = HERE / "ref_peer.py"
REF_PACKAGE: Final = "mooncake-transfer-engine-non-cuda"
REF_PACKAGE_VERSION: Final = "0.3.13.post1"
MARKER: Final = b"@@REFPEER@@ "
CANARY: Final = 0xA5
#: default wait for one reply of the reference peer (a 30 s reference transfer
#: timeout plus start-up slack would be the worst case; tests stay far below)
CALL_TIMEOUT_S: Final = 40.0
STDERR_TAIL_BYTES: Final = 6000

KiB: Final = 1 << 10
MiB: Final = 1 << 20


class RefPeerError(AssertionError):
    """The reference peer failed, died, or did not answer in time."""


def unique_name() -> str:
    """A segment name nobody else uses: ``127.0.0.1:<a free port>``."""
    return f"127.0.0.1:{free_port()}"


def tail(path: Path, nbytes: int = STDERR_TAIL_BYTES) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    if len(data) > nbytes:
        data = b"...\n" + data[-nbytes:]
    return data.decode("utf-8", "replace")


def wait_or_kill(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Wait for ``proc`` to exit, killing it after ``timeout_s``."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------------
# the reference peer
# ---------------------------------------------------------------------------------


class RefPeer:
    """One reference engine in a subprocess (``ref_peer.py``).

    ``call`` sends one command and returns its result, raising
    :class:`RefPeerError` (with the tail of the peer's stderr) when the
    command failed, the process died, or no reply came within the timeout.
    """

    live: Final[list[RefPeer]] = []

    def __init__(
        self, python: str, label: str, log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.label = label
        self.log_path = log_path
        self.segment_name = ""
        self.rpc_port = 0
        self._next_id = 1
        self._buf = bytearray()
        full_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("MC_", "MOONCAKE_", "PYTHON"))
        }
        full_env.update({"MC_FORCE_TCP": "1", "PYTHONUNBUFFERED": "1"})
        full_env.update(env or {})
        self.env = {k: v for k, v in full_env.items() if k.startswith("MC_")}
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115  (closed in close())
        try:
            self.proc = subprocess.Popen(
                [python, str(REF_PEER_SCRIPT)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log,
                env=full_env,
                cwd=str(HERE),
            )
        except BaseException:
            self._log.close()
            raise
        assert self.proc.stdin is not None
        os.set_blocking(self.proc.stdin.fileno(), False)  # writes are bounded by select()
        RefPeer.live.append(self)

    def __repr__(self) -> str:
        return f"<RefPeer {self.label} {self.segment_name or '?'} env={self.env}>"

    def stderr_tail(self) -> str:
        return tail(self.log_path)

    def _fail(self, what: str) -> RefPeerError:
        rc = self.proc.poll()
        state = "running" if rc is None else f"exited with status {rc}"
        return RefPeerError(
            f"reference peer {self.label} ({state}): {what}\n"
            f"--- reference stderr ({self.log_path}) ---\n{self.stderr_tail()}"
        )

    def _hung(self, what: str) -> RefPeerError:
        """Report a peer that stopped answering, then kill it so that later calls
        fail at once instead of each waiting for its own timeout."""
        error = self._fail(what)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        return error

    def _send(self, data: bytes, deadline: float) -> None:
        assert self.proc.stdin is not None
        fd = self.proc.stdin.fileno()
        view = memoryview(data)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            _, ready, _ = select.select([], [fd], [], remaining)
            if ready:
                view = view[os.write(fd, view) :]

    def _read_line(self, deadline: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[: nl + 1])
                del self._buf[: nl + 1]
                return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise EOFError
                self._buf += chunk

    def call(self, cmd: str, *, timeout_s: float = CALL_TIMEOUT_S, **args: Any) -> Any:
        """Run one command; returns its ``result``."""
        ident = self._next_id
        self._next_id += 1
        deadline = time.monotonic() + timeout_s
        line = json.dumps({"id": ident, "cmd": cmd, **args}).encode() + b"\n"
        try:
            self._send(line, deadline)
        except TimeoutError:
            raise self._hung(f"could not send {cmd!r} within {timeout_s} s") from None
        except OSError as exc:
            raise self._fail(f"cannot send {cmd!r}: {exc}") from exc
        while True:
            try:
                line = self._read_line(deadline)
            except TimeoutError:
                raise self._hung(f"no reply to {cmd!r} within {timeout_s} s") from None
            except EOFError:
                raise self._fail(f"stdout closed while waiting for {cmd!r}") from None
            if not line.startswith(MARKER):
                continue  # stray output; the protocol stream only carries marked lines
            reply = json.loads(line[len(MARKER) :])
            if reply.get("id") != ident:
                raise self._fail(f"reply {reply!r} does not answer command {ident} ({cmd!r})")
            if not reply["ok"]:
                raise self._fail(f"{cmd!r} raised:\n{reply['error']}")
            return reply["result"]

    # --- conveniences ------------------------------------------------------------

    def init(self, name: str, metadata: str) -> None:
        res = self.call("init", name=name, metadata=metadata)
        if res["rc"] != 0:
            raise self._fail(f"initialize({name!r}, {metadata!r}) returned {res['rc']}")
        self.rpc_port = int(res["rpc_port"])
        self.segment_name = (
            f"{name.rsplit(':', 1)[0]}:{self.rpc_port}" if metadata == "P2PHANDSHAKE" else name
        )

    def alloc(self, size: int, *, pad: int = 0, register: bool = True) -> int:
        res = self.call("alloc", size=size, pad=pad, register=register)
        if res["rc"] != 0:
            raise self._fail(f"register_memory of {size} bytes returned {res['rc']}")
        return int(res["addr"])

    def write_bytes(self, addr: int, data: bytes) -> None:
        rc = self.call("write_bytes", addr=addr, data=base64.b64encode(data).decode())
        assert rc == 0, rc

    def read_bytes(self, addr: int, length: int) -> bytes:
        return base64.b64decode(self.call("read_bytes", addr=addr, length=length))

    def canaries_intact(self, addr: int, size: int, pad: int) -> bool:
        return bool(self.call("canaries_intact", addr=addr, size=size, pad=pad))

    def notifies(self, expected: int, timeout_s: float = 5.0) -> list[tuple[str, str]]:
        """Drain notifications until ``expected`` arrived (or the time is up)."""
        got: list[tuple[str, str]] = []
        deadline = time.monotonic() + timeout_s
        for _ in range(1000):
            got += [(n, m) for n, m in self.call("get_notifies")]
            if len(got) >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        return got

    def close(self) -> None:
        """Ask the peer to quit, then kill it if it does not; idempotent."""
        if self in RefPeer.live:
            RefPeer.live.remove(self)
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, TimeoutError):
                self._send(b'{"id": 0, "cmd": "quit"}\n', time.monotonic() + 2.0)
            wait_or_kill(self.proc, 5.0)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._log.close()


# ---------------------------------------------------------------------------------
# metadata servers
# ---------------------------------------------------------------------------------

_OURS_LISTENING = re.compile(rb"HTTP metadata server listening on (http://[0-9.]+:[0-9]+/metadata)")


@dataclass
class MetadataServerProc:
    kind: str  # "ours" or "reference"
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] = field(repr=False)

    def request(self, method: str, key: str, body: bytes | None = None) -> tuple[int, bytes]:
        """One request on the metadata endpoint, the way the reference's client sends it."""
        host, port = self.url.split("/")[2].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            path = "/" + self.url.split("/", 3)[3]
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, f"{path}?key={quote(key, safe='')}", body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def get(self, key: str) -> tuple[int, bytes]:
        return self.request("GET", key)

    def put(self, key: str, body: bytes) -> tuple[int, bytes]:
        return self.request("PUT", key, body)

    def stderr_tail(self) -> str:
        return tail(self.log_path)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            wait_or_kill(self.proc, 5.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def our_metadata_server_command() -> list[str]:
    script = Path(sys.executable).with_name("mooncake_http_metadata_server")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "pymooncake.cli.http_metadata_server"]


def start_metadata_server(kind: str, ref_python: str, log_path: Path) -> MetadataServerProc:
    """Start our (``kind="ours"``) or the reference's HTTP metadata server on
    127.0.0.1 and wait until it answers."""
    log = open(log_path, "wb")  # noqa: SIM115  (owned by the returned object)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONUNBUFFERED"] = "1"
    if kind == "ours":
        argv = [*our_metadata_server_command(), "--host", "127.0.0.1", "--port", "0"]
        port = 0
    else:
        port = free_port()
        script = Path(ref_python).with_name("mooncake_http_metadata_server")
        argv = (
            [str(script)]
            if script.exists()
            else [ref_python, "-m", "mooncake.http_metadata_server"]
        )
        argv += ["--host", "127.0.0.1", "--port", str(port)]
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, env=env)
    except BaseException:
        log.close()
        raise
    server = MetadataServerProc(kind, f"http://127.0.0.1:{port}/metadata", proc, log_path, log)
    try:
        if kind == "ours":
            server.url = _wait_listening_line(proc, 15.0)
        _wait_http(server, 15.0)
    except BaseException:
        server.close()
        raise
    return server


def _wait_listening_line(proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = bytearray()
    deadline = time.monotonic() + timeout_s
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"our metadata server printed no line in {timeout_s} s: {buf!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"our metadata server exited ({proc.poll()}): {buf!r}")
            buf += chunk
    match = _OURS_LISTENING.search(buf)
    assert match is not None, f"unexpected first line of our metadata server: {buf!r}"
    return match.group(1).decode()


def _wait_http(server: MetadataServerProc, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    for _ in range(1000):
        if server.proc.poll() is not None:
            break
        try:
            status, _ = server.get("mooncake/interop-readiness-probe")
            if status == 404:
                return
        except OSError as exc:
            last = exc
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(
        f"{server.kind} metadata server at {server.url} did not answer (last error: {last}; "
        f"exit status {server.proc.poll()})\n{server.stderr_tail()}"
    )
