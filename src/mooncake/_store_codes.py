"""Store results as the reference's int codes (``mooncake.store`` only: the engine
edge uses ``_adapt``, and must not import the store)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pymooncake.errors import MooncakeError
from pymooncake.store import ErrorCode

__all__ = ["store_code", "store_codes"]

_store_log = logging.getLogger("mooncake.store")
_BOOL = frozenset({bool})
_INT = frozenset({int})


def store_code(exc: BaseException) -> int:
    """The store's int code for an exception (the reference's ErrorCode values)."""
    if isinstance(exc, MooncakeError):
        return exc.code if exc.code < 0 else int(ErrorCode.INTERNAL_ERROR)
    return int(ErrorCode.INVALID_PARAMS)


def store_codes(results: Sequence[Any], what: str) -> list[int]:
    """Per-key results of a native batch call as the store's ints: errors become
    codes (logged at debug), True/False become 0, byte counts stay."""
    kinds = set(map(type, results))
    if kinds <= _BOOL:  # every key put (or found): no per-key work
        return [0] * len(results)
    if kinds <= _INT:  # every key read: its byte count
        return list(results)
    out = []
    for r in results:
        if isinstance(r, BaseException):
            _store_log.debug("%s: %s", what, str(r))
            out.append(store_code(r))
        elif isinstance(r, bool):
            out.append(0)
        else:
            out.append(int(r))
    return out
