"""What the long-running commands share: stopping on SIGINT/SIGTERM inside an
event loop, and telling operators the address other hosts should use."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterator

from .._net import first_non_loopback_ipv4

__all__ = ["lan_hint", "stop_on_signals"]


@contextlib.contextmanager
def stop_on_signals() -> Iterator[asyncio.Event]:
    """An event set by SIGINT or SIGTERM while the block runs (call from the
    running loop).  Outside the main thread no handler can be installed: the
    event then never fires and the caller runs until cancelled."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (ValueError, RuntimeError, NotImplementedError):
            break
        installed.append(sig)
    try:
        yield stop
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def lan_hint(
    log: logging.Logger, host: str, port: int, what: str, fmt: Callable[[str, int], str]
) -> None:
    """Log how other hosts reach a server bound to every address (``host`` is
    ``0.0.0.0``, ``::`` or empty), using this node's first LAN address."""
    if host in ("0.0.0.0", "::", ""):
        lan = first_non_loopback_ipv4()
        if lan is not None:
            log.info("other hosts reach the %s at %s", what, fmt(lan, port))
