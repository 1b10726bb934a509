"""The master's journal: acknowledged puts survive a master crash and restart.

Theory of operation
-------------------
The reference master keeps object metadata only in memory: a restart (or a
new HA leader without an oplog) forgets every object although the bytes are
still in the clients' segments.  With a journal, each durable change of the
state -- segment mounted/unmounted, object committed (PutEnd/UpsertEnd),
object deleted (remove, eviction) -- is appended as one JSON line *before*
the reply that acknowledges it is sent, so a killed master loses nothing it
acknowledged (``fsync`` additionally covers a crash of the host).

On start the journal is replayed, then rewritten compactly (current segments
and objects only).  Clients that remount within ``client_ttl`` keep their
segments, and with them their objects; leases, soft pins and unfinished puts
are not restored (a writer caught mid-put simply retries).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from typing import Any

__all__ = ["Journal"]

log = logging.getLogger("pymooncake.master.journal")


#: built once (json.dumps with options builds an encoder per call); ASCII output
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def _lines(events: Iterable[list[Any]]) -> bytes:
    return b"".join(_ENCODE(ev).encode() + b"\n" for ev in events)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Journal:
    """Append-only JSON-lines file.

    Args:
        path: journal file (created if missing).
        fsync: ``fsync`` after each append (survives host crashes; slower).
    """

    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.path = path
        self._fsync = fsync
        self._fd = -1
        self.appended_bytes = 0
        self.snapshot_bytes = 0

    def load(self) -> list[list[Any]]:
        """Events in the file; a torn last line (crash mid-write) is ignored."""
        if not os.path.exists(self.path):
            return []
        events: list[list[Any]] = []
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                if i >= len(lines) - 2:  # the last written line: a write cut short
                    log.warning("journal %s: ignoring a torn last record", self.path)
                    break
                raise ValueError(f"journal {self.path} is corrupt at line {i + 1}") from None
            events.append(ev)
        return events

    def rewrite(self, events: Iterable[list[Any]]) -> None:
        """Replace the file atomically with ``events`` and append from there."""
        tmp = f"{self.path}.tmp"
        data = _lines(events)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.snapshot_bytes = len(data)
        self.appended_bytes = 0

    def append(self, events: list[list[Any]]) -> None:
        """Write ``events``; returns once the kernel has them (and the disk, with fsync)."""
        if not events or self._fd < 0:
            return
        data = _lines(events)
        _write_all(self._fd, data)
        if self._fsync:
            os.fsync(self._fd)
        self.appended_bytes += len(data)

    def needs_compaction(self) -> bool:
        return self.appended_bytes > max(64 << 20, 4 * self.snapshot_bytes)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
