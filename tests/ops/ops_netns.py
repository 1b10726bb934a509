"""A network namespace joined to this one by a veth pair (root only).

Minimal private helper for the doctor's tests: "another host" is a process in
the namespace, reaching this one through ``host_ip`` while this one reaches
it through ``ns_ip``.  (pymooncake.testing is getting a shared helper; the
lead folds this one into it.)
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

_counter = 0


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30, check=check)


class NetNs:
    """``ip netns`` namespace ``name`` with veth ``host_if`` (here, ``host_ip``)
    and its peer inside (``ns_ip``), both in a random 10.x.y.0/24."""

    def __init__(self) -> None:
        global _counter
        _counter += 1
        tag = f"{os.getpid() % 100000}{_counter}"
        self.name = f"mcops{tag}"
        self.host_if = f"mco{tag}h"[:15]
        self.ns_if = f"mco{tag}n"[:15]
        a, b = random.randint(100, 250), random.randint(1, 250)
        self.host_ip = f"10.{a}.{b}.1"
        self.ns_ip = f"10.{a}.{b}.2"
        self._created = False

    def create(self) -> None:
        _ip("netns", "add", self.name)
        self._created = True
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        self.exec_ip("addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if)
        self.exec_ip("link", "set", self.ns_if, "up")
        self.exec_ip("link", "set", "lo", "up")

    def exec_ip(self, *argv: str) -> None:
        _ip("netns", "exec", self.name, "ip", *argv)

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def python(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run this interpreter inside the namespace, capturing text output."""
        return subprocess.run(
            self.argv([sys.executable, *args]), capture_output=True, text=True, timeout=120, **kw
        )

    def close(self) -> None:
        if self._created:
            _ip("link", "del", self.host_if, check=False)
            _ip("netns", "del", self.name, check=False)
            self._created = False


@contextmanager
def netns() -> Iterator[NetNs]:
    """A namespace for one test; skips cleanly when namespaces cannot be made."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (ip)")
    ns = NetNs()
    try:
        ns.create()
    except (subprocess.CalledProcessError, OSError) as exc:
        ns.close()
        err = getattr(exc, "stderr", "") or exc
        pytest.skip(f"cannot create a network namespace here: {err}")
    try:
        yield ns
    finally:
        ns.close()
