"""A target engine in a child process, driven over stdin/stdout (one JSON per line).

Used by the transport conformance suite: the same checks run against a peer
reached over TCP and over the same-host transport.  Start it with
:func:`spawn_target`; it registers two buffers -- a managed (memfd) one and a
plain one (a bytearray, reached with process_vm_* on the same host) -- and
answers commands::

    {"cmd": "info"}                       -> segment name, buffer addresses
    {"cmd": "fill", "which": ..., "byte": n}
    {"cmd": "digest", "which": ..., "offset": o, "length": n} -> sha256 hex
    {"cmd": "unregister", "which": ...}
    {"cmd": "quit"}
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any

__all__ = ["TargetProcess", "spawn_target"]

BUFFER_BYTES = 8 << 20


def _serve() -> int:
    from ..config import EngineConfig
    from ..transfer import TransferEngine

    engine = TransferEngine("127.0.0.1", "P2PHANDSHAKE", config=EngineConfig.from_env())
    managed = engine.allocate(BUFFER_BYTES)
    plain_mem = bytearray(BUFFER_BYTES)
    plain = engine.register(plain_mem)
    regions = {"managed": managed, "plain": plain}
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        reply: dict[str, Any] = {"ok": True}
        if cmd == "info":
            reply.update(
                segment=engine.segment_name,
                pid=os.getpid(),
                size=BUFFER_BYTES,
                managed=managed.addr,
                plain=plain.addr,
            )
        elif cmd == "fill":
            regions[req["which"]].view[:] = bytes([req["byte"]]) * BUFFER_BYTES
        elif cmd == "digest":
            r = regions[req["which"]]
            o, n = req["offset"], req["length"]
            reply["sha256"] = hashlib.sha256(r.view[o : o + n]).hexdigest()
        elif cmd == "unregister":
            engine.unregister(regions[req["which"]].addr)
        elif cmd == "quit":
            break
        out.write(json.dumps(reply) + "\n")
        out.flush()
    engine.close()
    return 0


@dataclass
class TargetProcess:
    proc: subprocess.Popen[str]
    segment: str
    pid: int
    size: int
    managed: int
    plain: int
    _lock: threading.Lock

    def call(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._lock:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"target process exited ({self.proc.poll()})")
        return dict(json.loads(line))

    def digest(self, which: str, offset: int, length: int) -> str:
        return str(self.call(cmd="digest", which=which, offset=offset, length=length)["sha256"])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call(cmd="quit")
            except (RuntimeError, BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def spawn_target(env: dict[str, str] | None = None) -> TargetProcess:
    """Start a target engine process on 127.0.0.1 (P2P handshake)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pymooncake.testing._target"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    t = TargetProcess(proc, "", 0, 0, 0, 0, threading.Lock())
    try:
        info = t.call(cmd="info")
    except BaseException:
        t.kill()
        t.close()
        raise
    t.segment, t.pid, t.size = info["segment"], info["pid"], info["size"]
    t.managed, t.plain = info["managed"], info["plain"]
    return t


if __name__ == "__main__":
    sys.exit(_serve())
