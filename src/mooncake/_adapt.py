"""Helpers of the compatibility edge: exceptions -> int codes, logged once per cascade.

A failure is logged with its cause the first time that cause is seen; repeats
with the same root cause (a dead peer failing every call) are counted and
reported in summary lines (:class:`pymooncake._cascade.CascadeLog`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from pymooncake._cascade import CascadeLog
from pymooncake.errors import MooncakeError

__all__ = ["call_code", "call_value", "failures", "log"]

log = logging.getLogger("mooncake")
#: failures of engine calls, grouped by root cause
failures = CascadeLog(log)

T = TypeVar("T")


def call_code(what: str, fn: Callable[[], object], *, failure: int | None = None) -> int:
    """Run ``fn``; 0 on success, else the error's code (or ``failure``), logging why."""
    try:
        fn()
    except MooncakeError as exc:
        failures.failed(what, exc)
        return exc.code if failure is None else failure
    except (ValueError, TypeError, OverflowError) as exc:
        log.error("%s failed: invalid argument: %s", what, str(exc))
        return -1
    return 0


def call_value(what: str, fn: Callable[[], T], failure: T) -> T:
    """Run ``fn`` and return its value, or ``failure`` after logging why."""
    try:
        return fn()
    except MooncakeError as exc:
        failures.failed(what, exc)
    except (ValueError, TypeError, OverflowError) as exc:
        log.error("%s failed: invalid argument: %s", what, str(exc))
    return failure
