"""Logging set-up shared by the command-line tools (glog-like lines on stderr)."""

from __future__ import annotations

import logging
import os

__all__ = ["setup_logging"]

_LEVELS = {
    "TRACE": logging.DEBUG,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
}


def setup_logging(minloglevel: int = 0, verbose: int = 0) -> None:
    """INFO by default; ``MC_LOG_LEVEL`` (TRACE/INFO/WARNING/ERROR) or the glog
    flags ``--minloglevel``/``--v`` adjust it."""
    level = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR}.get(minloglevel, logging.ERROR)
    env = os.environ.get("MC_LOG_LEVEL", "").strip().upper()
    if env in _LEVELS:
        level = _LEVELS[env]
    if verbose > 0:
        level = logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(levelname).1s%(asctime)s.%(msecs)03d %(process)d %(name)s] %(message)s",
        datefmt="%m%d %H:%M:%S",
    )
