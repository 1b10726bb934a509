"""Shared fixtures: leak checks and engine pairs on 127.0.0.1.

Every test is checked for leaked threads and file descriptors (sockets,
memfds, pipes): what a test starts, it must stop.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, settings

from pymooncake import EngineConfig, TransferEngine

# Property tests: modest in the default run; HYPOTHESIS_PROFILE=long for a deep one.
settings.register_profile(
    "default", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

LOCAL = "127.0.0.1"


def _fds() -> set[int]:
    try:
        return {int(n) for n in os.listdir("/proc/self/fd")}
    except OSError:  # pragma: no cover - non-Linux
        return set()


def _describe(fd: int) -> str:
    try:
        return f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}"
    except OSError:
        return str(fd)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("interop") or "allow_leaks" in request.keywords:
        yield
        return
    threads_before = set(threading.enumerate())
    fds_before = _fds()
    yield
    deadline = time.monotonic() + 5.0
    gc.collect()  # objects in reference cycles (e.g. exception tracebacks) hold mappings
    while True:
        extra_threads = [
            t for t in threading.enumerate() if t not in threads_before and t.is_alive()
        ]
        extra_fds = _fds() - fds_before
        # fds that vanished and reappeared with other numbers are not leaks
        extra_fds = {fd for fd in extra_fds if os.path.exists(f"/proc/self/fd/{fd}")}
        if not extra_threads and not extra_fds:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    msgs = []
    if extra_threads:
        msgs.append("leaked threads: " + ", ".join(t.name for t in extra_threads))
    if extra_fds:
        msgs.append("leaked fds: " + ", ".join(_describe(fd) for fd in sorted(extra_fds)))
    pytest.fail("; ".join(msgs))


@pytest.fixture
def load_bench() -> Callable[[str], ModuleType]:
    """Imports ``bench/<name>.py`` (with ``bench/`` on the path while it loads, for its
    ``import _common``): the benches are scripts, not a package."""
    bench = Path(__file__).resolve().parents[1] / "bench"

    def load(name: str) -> ModuleType:
        sys.path.insert(0, str(bench))
        try:
            spec = importlib.util.spec_from_file_location(name, bench / f"{name}.py")
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        finally:
            sys.path.remove(str(bench))

    return load


@pytest.fixture
def config() -> EngineConfig:
    """Engine settings for tests: loopback, short timeouts."""
    return EngineConfig(
        tcp_bind_address=LOCAL,
        transfer_timeout_s=10.0,
        tcp_status_timeout_s=10.0,
        connect_timeout_s=2.0,
        rpc_io_timeout_s=5.0,
        async_workers=4,
    )


@pytest.fixture
def engine_pair(config: EngineConfig) -> Iterator[tuple[TransferEngine, TransferEngine]]:
    """Initiator and target engines in P2P handshake mode."""
    a = TransferEngine(LOCAL, "P2PHANDSHAKE", config=config)
    try:
        b = TransferEngine(LOCAL, "P2PHANDSHAKE", config=config)
    except BaseException:
        a.close()
        raise
    try:
        yield a, b
    finally:
        a.close()
        b.close()
