"""The master's journal: acknowledged puts survive a master crash and restart.

Theory of operation
-------------------
The reference master keeps object metadata only in memory: a restart (or a
new HA leader without an oplog) forgets every object although the bytes are
still in the clients' segments.  With a journal, each effect of the state
(``_effects.py``: segment mounted/unmounted, object committed, object deleted)
is appended as one JSON line *before* the reply that acknowledges it is sent,
so a killed master loses nothing it acknowledged (``fsync`` additionally
covers a crash of the host).

On start the journal is replayed, then rewritten compactly.  While running,
:meth:`Journal.begin_compaction` writes a new file *fuzzily*: the service adds
the current state a shard at a time (:meth:`Journal.add_snapshot`) while every
new effect is appended to both files.  The new file is then a valid log by
itself -- each snapshot record is the state at the moment it was written, and
everything that happened later follows it -- and replaces the old one
atomically (``os.replace`` and an fsync of the directory).  A crash during
compaction leaves the old, complete file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from typing import Any

from ..._files import fsync_parent
from ...errors import MalformedMessage
from ._effects import Effect, effect_from_record

__all__ = ["Journal"]

log = logging.getLogger("pymooncake.master.journal")


#: built once (json.dumps with options builds an encoder per call); ASCII output
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def _lines(effects: Iterable[Effect]) -> bytes:
    return b"".join(_ENCODE(ev.record()).encode() + b"\n" for ev in effects)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Journal:
    """Append-only JSON-lines file of effects.

    Args:
        path: journal file (created if missing).
        fsync: ``fsync`` after each append (survives host crashes; slower).
    """

    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.path = path
        self._fsync = fsync
        self._fd = -1
        self._new_fd = -1  # the compaction in progress
        self.appended_bytes = 0
        self.snapshot_bytes = 0
        self._new_bytes = 0

    @property
    def fsyncs(self) -> bool:
        """Whether every append is flushed to the disk (``--journal_fsync``)."""
        return self._fsync

    def load(self) -> list[Effect]:
        """Effects in the file; a torn last line (crash mid-write) is ignored.

        Raises:
            ValueError: a record other than the last is corrupt.
        """
        if not os.path.exists(self.path):
            return []
        effects: list[Effect] = []
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                effects.append(effect_from_record(json.loads(line)))
            except (ValueError, MalformedMessage):
                if i >= len(lines) - 2:  # the last written line: a write cut short
                    log.warning("journal %s: ignoring a torn last record", self.path)
                    break
                raise ValueError(f"journal {self.path} is corrupt at line {i + 1}") from None
        return effects

    def rewrite(self, effects: Iterable[Effect]) -> None:
        """Replace the file atomically with ``effects`` and append from there."""
        self.begin_compaction()
        self.add_snapshot(effects)
        self.finish_compaction()

    # --- compaction --------------------------------------------------------------

    @property
    def compacting(self) -> bool:
        return self._new_fd >= 0

    def begin_compaction(self) -> None:
        tmp = f"{self.path}.tmp"
        self._new_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._new_bytes = 0

    def add_snapshot(self, effects: Iterable[Effect]) -> None:
        """Add current-state records to the compaction in progress."""
        data = _lines(effects)
        if data:
            _write_all(self._new_fd, data)
            self._new_bytes += len(data)

    def finish_compaction(self) -> None:
        fd, self._new_fd = self._new_fd, -1
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(f"{self.path}.tmp", self.path)
        fsync_parent(self.path)
        self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.snapshot_bytes = self._new_bytes
        self.appended_bytes = 0

    def abort_compaction(self) -> None:
        if self._new_fd >= 0:
            os.close(self._new_fd)
            self._new_fd = -1
            try:
                os.unlink(f"{self.path}.tmp")
            except OSError:
                pass

    # --- appending ------------------------------------------------------------------

    def append(self, effects: list[Effect]) -> None:
        """Write ``effects``; returns once the kernel has them (and the disk, with fsync)."""
        if not effects or self._fd < 0:
            return
        data = _lines(effects)
        _write_all(self._fd, data)
        if self._fsync:
            os.fsync(self._fd)
        self.appended_bytes += len(data)
        if self._new_fd >= 0:
            _write_all(self._new_fd, data)
            self._new_bytes += len(data)

    def needs_compaction(self) -> bool:
        return not self.compacting and self.appended_bytes > max(64 << 20, 4 * self.snapshot_bytes)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def stats(self) -> dict[str, Any]:
        return {"appended_bytes": self.appended_bytes, "snapshot_bytes": self.snapshot_bytes}
