"""Store configuration: the master's settings and size parsing shared with clients."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = ["SIZE_UNITS", "MasterConfig", "parse_duration_ms", "parse_size"]

#: size suffixes (lower case) -> bytes; binary multiples, as in the reference
SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 1 << 40,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any, *, what: str = "size") -> int:
    """Bytes from an int or a human string: ``4096``, ``"16MB"``, ``"16 MB"``,
    ``"4gb"``, ``"1.5 GiB"`` (units are binary, as in the reference).

    Raises:
        ConfigError: negative, unparsable or unsupported (e.g. ``"50%"``).
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what}: {value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what}: {value} is negative")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if not isinstance(value, str):
        raise ConfigError(f"{what}: {value!r} is not a size")
    m = _SIZE_RE.match(value)
    if not m or m.group(2).lower() not in SIZE_UNITS:
        raise ConfigError(
            f"{what}: {value!r} is not a size; use bytes or a number with B/KB/MB/GB/TB "
            "(percentages are not supported)"
        )
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])


def parse_duration_ms(value: Any, *, what: str = "duration") -> int:
    """Milliseconds from an int (ms) or ``"5000ms"``, ``"5s"``, ``"30m"``, ``"1h"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"{what}: {value} is negative")
        return value
    text = str(value).strip().lower()
    m = re.match(r"^(\d+)\s*(ms|s|m|h)?$", text)
    if not m:
        raise ConfigError(f"{what}: {value!r} is not a duration (e.g. 5000, 5000ms, 5s, 30m, 1h)")
    mult = {"ms": 1, None: 1, "s": 1000, "m": 60_000, "h": 3_600_000}[m.group(2)]
    return int(m.group(1)) * mult


@dataclass(frozen=True)
class MasterConfig:
    """Master behaviour (reference flag names in comments; defaults are the reference's)."""

    #: --default_kv_lease_ttl: read lease granted by get/exist (ms)
    default_kv_lease_ttl_ms: int = 10_000
    #: --default_kv_soft_pin_ttl (ms)
    default_kv_soft_pin_ttl_ms: int = 1_800_000
    #: --max_kv_soft_pin_ttl (ms)
    max_kv_soft_pin_ttl_ms: int = 86_400_000
    #: --allow_evict_soft_pinned_objects
    allow_evict_soft_pinned_objects: bool = True
    #: --eviction_ratio: share of capacity freed per eviction round
    eviction_ratio: float = 0.05
    #: --eviction_high_watermark_ratio: usage that triggers eviction
    eviction_high_watermark_ratio: float = 0.90
    #: --client_ttl (s): a client silent this long is expired with its segments
    client_ttl_s: float = 10.0
    #: --put_start_discard_timeout_sec: a newer put may preempt an older unfinished one
    put_start_discard_timeout_s: float = 30.0
    #: --put_start_release_timeout_sec: unfinished puts are reclaimed after this
    put_start_release_timeout_s: float = 600.0
    #: --allocation_strategy: random | free_ratio_first
    allocation_strategy: str = "random"
    #: --cluster_id
    cluster_id: str = "mooncake_cluster"
    #: copy/move task queue (--max_total_finished_tasks, --max_total_pending_tasks,
    #: --max_total_processing_tasks, --pending_task_timeout_sec,
    #: --processing_task_timeout_sec (0: none), --max_retry_attempts)
    max_total_finished_tasks: int = 10_000
    max_total_pending_tasks: int = 10_000
    max_total_processing_tasks: int = 10_000
    pending_task_timeout_s: float = 300.0
    processing_task_timeout_s: float = 300.0
    max_retry_attempts: int = 10

    def __post_init__(self) -> None:
        if not 0 <= self.eviction_ratio <= 1:
            raise ConfigError(f"eviction_ratio {self.eviction_ratio} must be within [0, 1]")
        if not 0 < self.eviction_high_watermark_ratio <= 1:
            raise ConfigError(
                f"eviction_high_watermark_ratio {self.eviction_high_watermark_ratio} must be "
                "within (0, 1]"
            )
        if self.allocation_strategy not in ("random", "free_ratio_first", "local_first"):
            raise ConfigError(
                f"allocation_strategy {self.allocation_strategy!r} is not supported "
                "(random, free_ratio_first, local_first)"
            )
        if self.client_ttl_s <= 0:
            raise ConfigError("client_ttl must be positive")
        if self.default_kv_soft_pin_ttl_ms > self.max_kv_soft_pin_ttl_ms:
            raise ConfigError("default_kv_soft_pin_ttl exceeds max_kv_soft_pin_ttl")

    def replace(self, **changes: Any) -> MasterConfig:
        return dataclasses.replace(self, **changes)

    @property
    def lease_ttl_s(self) -> float:
        return self.default_kv_lease_ttl_ms / 1000.0
