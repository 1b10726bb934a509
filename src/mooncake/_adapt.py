"""Helpers of the compatibility edge: exceptions -> int codes, one log line each."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from pymooncake.errors import MooncakeError

__all__ = ["call_code", "call_value", "log"]

log = logging.getLogger("mooncake")

T = TypeVar("T")


def call_code(what: str, fn: Callable[[], object], *, failure: int | None = None) -> int:
    """Run ``fn``; 0 on success, else the error's code (or ``failure``), logging why."""
    try:
        fn()
    except MooncakeError as exc:
        log.error("%s failed: %s", what, str(exc))
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
        log.error("%s failed: %s", what, str(exc))
    except (ValueError, TypeError, OverflowError) as exc:
        log.error("%s failed: invalid argument: %s", what, str(exc))
    return failure
