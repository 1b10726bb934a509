"""Helpers of the compatibility edge: exceptions -> int codes, each failure logged.

Calls that fail in cascades (transfers to a dead peer) pass their object's
:class:`pymooncake._cascade.CascadeLog`: a failure is then logged with its
cause the first time that cause is seen, and repeats are counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from pymooncake._cascade import CascadeLog
from pymooncake.errors import MooncakeError

__all__ = ["call_code", "call_value", "log"]

log = logging.getLogger("mooncake")

T = TypeVar("T")


def _failed(what: str, exc: MooncakeError, cascade: CascadeLog | None) -> None:
    if cascade is None:
        log.error("%s failed: %s", what, str(exc))
    else:
        cascade.failed(what, exc)


def call_code(
    what: str,
    fn: Callable[[], object],
    *,
    failure: int | None = None,
    cascade: CascadeLog | None = None,
) -> int:
    """Run ``fn``; 0 on success, else the error's code (or ``failure``), logging why
    (through ``cascade`` when given: once per root cause)."""
    try:
        fn()
    except MooncakeError as exc:
        _failed(what, exc, cascade)
        return exc.code if failure is None else failure
    except (ValueError, TypeError, OverflowError) as exc:
        log.error("%s failed: invalid argument: %s", what, str(exc))
        return -1
    return 0


def call_value(
    what: str, fn: Callable[[], T], failure: T, *, cascade: CascadeLog | None = None
) -> T:
    """Run ``fn`` and return its value, or ``failure`` after logging why."""
    try:
        return fn()
    except MooncakeError as exc:
        _failed(what, exc, cascade)
    except (ValueError, TypeError, OverflowError) as exc:
        log.error("%s failed: invalid argument: %s", what, str(exc))
    return failure
