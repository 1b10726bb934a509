"""The embedded metadata server's entries on disk (``mooncake_master --journal_path``).

A master started with a journal keeps its objects across a restart.  Its
embedded HTTP metadata server used to start empty: until every engine noticed
the restart and published its descriptor again (up to a heartbeat later), a
transfer to a storage node -- a get, a put, a copy task the restarted master
handed out -- failed with "Failed to get description of ...".  With a snapshot
file the entries are back before the first request.

The file is rewritten whole (to ``<path>.tmp``, then renamed over ``<path>``)
after every change, before the change is acknowledged.  Changes are rare (an
engine starting, re-publishing or stopping) and the entries small (a few KiB per
engine).  ``fsync``: also flush the file and the rename to the disk (a host
crash, not only a process crash, keeps them), as ``--journal_fsync`` does for
the journal.

Entries of engines that went away while the master was down stay until an
engine of the same name claims the name (the rpc_meta entry's owner is probed,
see ``_segments.py``), as they would without a restart.  A file that cannot be
read is set aside (``<path>.bad``) with a warning and the server starts empty:
the engines publish everything again anyway.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Mapping
from typing import Any, Final

from ..._files import fsync_parent

__all__ = ["MetadataSnapshot"]

log = logging.getLogger("pymooncake.metadata.server")

#: the file's ``format`` field
_FORMAT: Final = "pymooncake-metadata/1"


class MetadataSnapshot:
    """Loads and saves the key -> bytes entries of a :class:`MetadataServer`."""

    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.path = path
        self.fsync = fsync

    def load(self) -> dict[str, bytes]:
        """The entries saved last; empty if there is no file (or it is unreadable)."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        try:
            doc: Any = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
                raise ValueError(f"not a {_FORMAT} file")
            entries = doc["entries"]
            out = {str(k): base64.b64decode(v, validate=True) for k, v in entries}
        except (ValueError, KeyError, TypeError) as exc:
            bad = f"{self.path}.bad"
            try:
                os.replace(self.path, bad)
            except OSError as move:
                bad = f"nowhere ({move}); the next change overwrites it"
            log.warning(
                "metadata snapshot %s is unreadable (%s); moved it to %s and starting with no "
                "entries: engines publish theirs again when they see the master restarted",
                self.path,
                exc,
                bad,
            )
            return {}
        log.info("metadata snapshot %s: %d entries restored", self.path, len(out))
        return out

    def save(self, entries: Mapping[str, bytes]) -> None:
        """Replace the file with ``entries`` (atomically: a crash leaves the old
        file or the new one).

        Raises:
            OSError: the file could not be written.
        """
        doc = {
            "format": _FORMAT,
            "entries": [[k, base64.b64encode(v).decode("ascii")] for k, v in entries.items()],
        }
        data = json.dumps(doc, separators=(",", ":")).encode()
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        if self.fsync:
            fsync_parent(self.path)
