"""Small file-system helpers shared by the journal, the file tier and the
metadata snapshot."""

from __future__ import annotations

import os

__all__ = ["fsync_dir", "fsync_parent"]


def fsync_dir(path: str) -> None:
    """Flush directory ``path`` (a rename or a new file in it) to the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_parent(path: str) -> None:
    """Flush the directory holding ``path`` (make a rename onto it durable)."""
    fsync_dir(os.path.dirname(os.path.abspath(path)) or ".")
