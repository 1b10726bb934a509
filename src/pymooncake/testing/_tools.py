"""External programs that tests need (etcd, redis-server, ip): find them, or
skip the test with the reason -- and fail instead when ``CI`` is set, because
CI installs them (``.ci/run``) and a silent skip would hide a broken setup."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

__all__ = ["find_tool", "require_tool", "unavailable"]

#: where Debian puts administrator tools that may not be on a user's PATH
_EXTRA_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin")


def find_tool(name: str) -> str | None:
    """The path of executable ``name`` on PATH or in the sbin directories, or None."""
    found = shutil.which(name)
    if found:
        return found
    for d in _EXTRA_DIRS:
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    return None


def unavailable(reason: str, *, fail_in_ci: bool = True) -> NoReturn:
    """Skip the running test with ``reason``; fail it when ``CI`` is set and
    ``fail_in_ci`` (CI is expected to provide everything)."""
    import pytest

    if fail_in_ci and os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is an error, not a skip)", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str, *, package: str) -> str:
    """The path of ``name``, or skip (fail under CI) naming the Debian package."""
    path = find_tool(name)
    if path is None:
        unavailable(
            f"{name} is not installed (Debian package {package}: "
            f"apt-get install {package}; .ci/run installs it)"
        )
    return path
