"""The master's ``/metrics`` (Prometheus text) and ``/metrics/summary`` text.

Theory of operation
-------------------
A scrape reads the state's plain-int counters once into a flat dict of values
(:func:`metric_values`) and writes every name of the reference's catalog
(``_catalog.py``) in the reference's order and format: ``# HELP``/``# TYPE``
then ``name value`` (no labels but ``segment`` on the per-segment gauges,
histogram bounds written as the reference's ``le="4096.000000"``).  Then come
the reference's HA gauges and the names only pymooncake has (connections,
per-method RPC counts, ``process_*``).  Nothing walks the objects: gauges come
from per-segment allocators and counters kept as the state changes.

:func:`summary_text` is the reference's one-line summary (``role=leader,
state=serving, service_ready=true, master={Mem Storage: ... | Keys: ... |
Requests (Success/Total per sec): ...}, ha={...}``); its request figures are
rates since the previous "Master Admin Metrics" log line (``update=True`` marks
a new window, as the reference's ``get_summary_string_and_update_snapshot``).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from ..._metrics import format_bytes
from ._catalog import CATALOG, HA_CATALOG, LIVE, ZERO
from ._metrics import reference_counts
from ._records import READABLE
from ._state import VALUE_SIZE_BOUNDS

if TYPE_CHECKING:
    from ._service import MasterService

__all__ = [
    "EXTRA_NAMES",
    "exported_names",
    "ha_values",
    "metric_values",
    "render_metrics",
    "role_state",
    "summary_text",
]

#: families only pymooncake exports: (name, type, help)
_EXTRAS: Final[tuple[tuple[str, str, str], ...]] = (
    ("master_segment_count", "gauge", "Mounted memory segments"),
    ("master_inflight_puts", "gauge", "Objects being written (put or upsert started, not ended)"),
    ("master_expired_clients_total", "counter", "Clients expired after client_ttl without a ping"),
    (
        "master_replaced_clients_total",
        "counter",
        "Clients dropped because a new client mounted their segment name",
    ),
    (
        "master_stall_grace_total",
        "counter",
        "Times the master itself stalled and gave every client a fresh client_ttl",
    ),
    ("master_ticks_total", "counter", "Periodic housekeeping rounds (tick slices) run"),
    (
        "master_tick_seconds_total",
        "counter",
        "Time spent in periodic housekeeping (the event loop is blocked meanwhile)",
    ),
    ("master_tick_seconds_recent_max", "gauge", "Longest of the last 50 housekeeping slices"),
    ("master_rpc_connections", "gauge", "Open RPC connections (TCP and same-host UNIX)"),
    (
        "master_refused_connections_total",
        "counter",
        "RPC connections refused at the connection limit",
    ),
    (
        "master_regex_loop_slices_total",
        "counter",
        "Key slices of *ByRegex scans matched in the event loop (patterns that cannot backtrack)",
    ),
    (
        "master_regex_worker_slices_total",
        "counter",
        "Key slices of *ByRegex scans matched in the regex worker process",
    ),
    (
        "master_regex_worker_kills_total",
        "counter",
        "Regex workers killed for running past --regex_timeout_ms on a slice (backtracking)",
    ),
    ("master_rpc_calls_total", "counter", "RPC requests received, by method"),
    ("master_rpc_call_failures_total", "counter", "RPC requests answered with an error, by method"),
    ("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds"),
    ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes"),
    ("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes"),
    (
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds",
    ),
    ("process_open_fds", "gauge", "Number of open file descriptors"),
    ("process_max_fds", "gauge", "Maximum number of open file descriptors"),
)

#: names only pymooncake exports
EXTRA_NAMES: Final = tuple(name for name, _, _ in _EXTRAS)
_EXTRA_META: Final = {name: (kind, help_text) for name, kind, help_text in _EXTRAS}

_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def exported_names() -> list[str]:
    """Every family name a scrape may hold, in output order (the per-segment ones
    only while segments are mounted)."""
    names = [name for name, _kind, status, _help in CATALOG if status in (LIVE, ZERO)]
    return names + [name for name, _ in HA_CATALOG] + list(EXTRA_NAMES)


def role_state(svc: MasterService) -> tuple[str, str, bool]:
    """(role, runtime state, service ready), as ``/health`` answers them: a serving
    leader is ``leader``/``serving``; otherwise the state is the role (``standby``,
    ``warmup``, ``starting``, or a leader whose etcd lease lapsed)."""
    serving = svc.serving()
    return svc.role, "serving" if serving else svc.role, serving


#: the reference's ha_standby_state values pymooncake takes
_STANDBY_STOPPED, _STANDBY_CONNECTING, _STANDBY_SYNCING, _STANDBY_WATCHING = 0, 1, 2, 3


def ha_values(svc: MasterService) -> dict[str, int]:
    """The reference's HA gauges from pymooncake's replication: on a leader the
    effect sequence it shipped and the one its standbys acknowledged; on a standby
    the sequence it applied (and its follower's state)."""
    hub = svc.hub
    follower = svc.follower  # set while this master follows a leader
    if svc.role == "standby" and follower is not None:
        last = applied = follower.seq
        state = _STANDBY_WATCHING if follower.synced else _STANDBY_SYNCING
    elif svc.role in ("leader", "warmup") or svc.ha is None:
        last, applied = hub.seq, hub.acked
        state = _STANDBY_STOPPED
    else:
        last = applied = 0
        state = _STANDBY_CONNECTING
    return {
        "ha_oplog_last_sequence_id": last,
        "ha_oplog_applied_sequence_id": applied,
        "ha_oplog_standby_lag": max(0, last - applied),
        "ha_oplog_pending_entries": 0,
        "ha_pending_mutation_queue_size": hub.held,
        "ha_standby_state": state,
    }


def _readable_objects(svc: MasterService) -> int:
    st = svc.state
    writing_new = sum(1 for obj in st.inflight.values() if not obj.flags & READABLE)
    return len(st.objects) - writing_new


def metric_values(svc: MasterService) -> dict[str, int]:
    """The current value of every exported single-valued reference name."""
    st = svc.state
    m = st.metrics
    cap = used = 0
    for seg in st.segments.values():
        cap += seg.allocator.capacity
        used += seg.allocator.allocated
    out: dict[str, int] = {
        "master_allocated_bytes": used,
        "master_total_capacity_bytes": cap,
        "master_key_count": st.key_count(),
        "master_soft_pin_key_count": st.soft_pinned,
        "master_active_clients": len(st.clients),
        "master_put_start_alloc_failures_total": m.put_alloc_failures,
        "mem_cache_hit_nums_": m.get_hits,
        "mem_cache_hit_bytes_total": m.get_hit_bytes,
        "mem_cache_nums_": _readable_objects(svc),
        "valid_get_nums_": m.get_hits,
        "total_get_nums_": m.get_hits + m.get_misses,
        "master_put_start_discard_cnt": m.discarded_buffers + m.reclaimed_puts,
        "master_put_start_release_cnt": m.released_buffers + m.reclaimed_puts,
        "master_put_start_discarded_staging_size": m.discard_staging_bytes,
    }
    for suffix in ("_total", "_mem"):
        out[f"master_successful_evictions{suffix}"] = m.successful_evictions
        out[f"master_attempted_evictions{suffix}"] = m.eviction_rounds
    for suffix in ("", "_mem"):
        out[f"master_evicted_key_count{suffix}"] = m.evicted_keys
        out[f"master_evicted_size_bytes{suffix}"] = m.evicted_bytes
    for name, value in reference_counts(st, svc.stats).items():
        out[f"master_{name}_total"] = value
    return out


def _label(value: str) -> str:
    """A label value escaped as the text format requires."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _head(out: list[str], name: str, kind: str, help_text: str) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")


def _per_segment(svc: MasterService) -> tuple[dict[str, int], dict[str, int]]:
    """(allocated, capacity) per segment name: the reference's ``segment`` label
    is the name, so segments sharing one are summed."""
    used: dict[str, int] = {}
    cap: dict[str, int] = {}
    for seg in svc.state.segments.values():
        used[seg.name] = used.get(seg.name, 0) + seg.allocator.allocated
        cap[seg.name] = cap.get(seg.name, 0) + seg.allocator.capacity
    return used, cap


def _value_sizes(out: list[str], name: str, svc: MasterService) -> None:
    m = svc.state.metrics
    running = 0
    for bound, n in zip((*VALUE_SIZE_BOUNDS, None), m.value_size_counts, strict=True):
        running += n
        le = "+Inf" if bound is None else f"{bound:.6f}"
        out.append(f'{name}_bucket{{le="{le}"}} {running}')
    out.append(f"{name}_sum {m.value_size_sum}")
    out.append(f"{name}_count {running}")


def _process(out: list[str]) -> None:
    """``process_*`` from /proc (Linux) or getrusage."""
    values: dict[str, float] = {}
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        # fields[0] is field 3 (state): utime=14, stime=15, starttime=22, vsize=23, rss=24
        values["process_cpu_seconds_total"] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
        values["process_virtual_memory_bytes"] = int(fields[20])
        values["process_resident_memory_bytes"] = int(fields[21]) * _PAGE_SIZE
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    btime = int(line.split()[1])
                    values["process_start_time_seconds"] = btime + int(fields[19]) / _CLOCK_TICKS
                    break
        values["process_open_fds"] = len(os.listdir("/proc/self/fd"))
    except (OSError, ValueError, IndexError):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        values["process_cpu_seconds_total"] = usage.ru_utime + usage.ru_stime
        values["process_resident_memory_bytes"] = usage.ru_maxrss * 1024
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        values["process_max_fds"] = soft
    for name, kind, help_text in _EXTRAS:
        if name in values:
            _head(out, name, kind, help_text)
            v = values[name]
            out.append(f"{name} {int(v) if float(v).is_integer() else round(v, 3)}")


def _by_method(out: list[str], name: str, table: dict[str, int]) -> None:
    _head(out, name, *_EXTRA_META[name])
    for method, n in sorted(table.items()):
        out.append(f'{name}{{method="{_label(method)}"}} {n}')


def render_metrics(svc: MasterService) -> str:
    """``/metrics``: text format 0.0.4."""
    st = svc.state
    values = metric_values(svc)
    used, cap = _per_segment(svc)
    out: list[str] = []
    for name, kind, status, help_text in CATALOG:
        if status == LIVE:
            if name in ("segment_allocated_bytes", "segment_total_capacity_bytes"):
                table = used if name == "segment_allocated_bytes" else cap
                if table:  # the reference leaves out a labelled family with no series
                    _head(out, name, kind, help_text)
                    for seg_name, n in sorted(table.items()):
                        out.append(f'{name}{{segment="{_label(seg_name)}"}} {n}')
                continue
            _head(out, name, kind, help_text)
            if kind == "histogram":
                _value_sizes(out, name, svc)
            else:
                out.append(f"{name} {values[name]}")
        elif status == ZERO:
            _head(out, name, kind, help_text)
            out.append(f"{name} 0")
    ha = ha_values(svc)
    for name, help_text in HA_CATALOG:
        _head(out, name, "gauge", help_text)
        out.append(f"{name} {ha[name]}")
    m = st.metrics
    extras = {
        "master_segment_count": len(st.segments),
        "master_inflight_puts": len(st.inflight),
        "master_expired_clients_total": m.expired_clients,
        "master_replaced_clients_total": m.replaced_clients,
        "master_stall_grace_total": st.stall_grace_count,
        "master_ticks_total": svc.tick_count,
        "master_tick_seconds_total": round(svc.tick_seconds, 6),
        "master_tick_seconds_recent_max": round(max(svc.recent_ticks, default=0.0), 6),
        "master_rpc_connections": svc.connection_count,
        "master_refused_connections_total": svc.refused_connections,
        "master_regex_loop_slices_total": svc.scanner.in_loop,
        "master_regex_worker_slices_total": svc.scanner.in_worker,
        "master_regex_worker_kills_total": svc.scanner.killed,
    }
    for name, kind, help_text in _EXTRAS:
        if name in extras:
            _head(out, name, kind, help_text)
            out.append(f"{name} {extras[name]}")
    _by_method(out, "master_rpc_calls_total", m.requests)
    _by_method(out, "master_rpc_call_failures_total", m.failures)
    _process(out)
    return "\n".join(out) + "\n"


# --- the summary ------------------------------------------------------------------------

#: (label, counter base) of the "Requests (Success/Total per sec)" section
_SUMMARY_RPCS: Final = (
    ("PutStart", "put_start"),
    ("PutEnd", "put_end"),
    ("PutRevoke", "put_revoke"),
    ("Get", "get_replica_list"),
    ("Exist", "exist_key"),
    ("Del", "remove"),
    ("DelAll", "remove_all"),
    ("Ping", "ping"),
    ("CopyStart", "copy_start"),
    ("CopyEnd", "copy_end"),
    ("CopyRevoke", "copy_revoke"),
    ("MoveStart", "move_start"),
    ("MoveEnd", "move_end"),
    ("MoveRevoke", "move_revoke"),
)
#: requests pymooncake does not have, shown as zero rates as the reference shows them
_SUMMARY_ABSENT_RPCS: Final = ("EvictDiskReplica",)
_SUMMARY_BATCHES: Final = (
    ("PutStart", "batch_put_start"),
    ("PutEnd", "batch_put_end"),
    ("PutRevoke", "batch_put_revoke"),
    ("Get", "batch_get_replica_list"),
    ("ExistKey", "batch_exist_key"),
    ("QueryIp", "batch_query_ip"),
    ("Clear", "batch_replica_clear"),
)
_SUMMARY_TASKS: Final = (
    ("CreateMoveTask", "create_move_task"),
    ("CreateCopyTask", "create_copy_task"),
    ("QueryTask", "query_task"),
    ("FetchTasks", "fetch_tasks"),
    ("MarkTaskToComplete", "update_task"),
)


def _ha_summary(svc: MasterService) -> str:
    ha = ha_values(svc)
    fields = (
        ("last_seq", ha["ha_oplog_last_sequence_id"]),
        ("applied_seq", ha["ha_oplog_applied_sequence_id"]),
        ("lag", ha["ha_oplog_standby_lag"]),
        ("pending", ha["ha_oplog_pending_entries"]),
        ("mutation_queue", ha["ha_pending_mutation_queue_size"]),
        ("batch_commits", 0),
        ("sync_commits", 0),
        ("skipped", 0),
        ("checksum_fail", 0),
        ("etcd_fail", 0),
        ("watch_disconn", 0),
        ("state", ha["ha_standby_state"]),
    )
    return "HA Metrics Summary: " + ", ".join(f"{f}={v}" for f, v in fields)


def summary_text(svc: MasterService, *, update: bool = False) -> str:
    """The reference's summary line (without a trailing newline).

    Args:
        update: start a new rate window now (the periodic log line does; the
            ``/metrics/summary`` endpoint does not).
    """
    values = metric_values(svc)
    counts = {
        k[len("master_") : -len("_total")]: v
        for k, v in values.items()
        if k.startswith("master_") and k.endswith("_total")
    }
    now = time.monotonic()
    window = svc.stats.window
    if update:
        svc.stats.window = (now, counts)
    if window is None:
        elapsed, before = 0.0, counts
    else:
        elapsed, before = now - window[0], window[1]

    def delta(name: str) -> int:
        if window is None:
            return 0
        return max(0, counts.get(name, 0) - before.get(name, 0))

    def rate(n: int) -> str:
        return f"{n / elapsed:.2f}" if elapsed > 0 else "0.00"

    def pair(base: str) -> str:
        total = delta(f"{base}_requests")
        return f"{rate(total - delta(f'{base}_failures'))}/{rate(total)}"

    def triple(base: str) -> str:
        total = delta(f"{base}_requests")
        partial = delta(f"{base}_partial_successes")
        ok = total - delta(f"{base}_failures") - partial
        items = delta(f"{base}_items")
        items_ok = items - delta(f"{base}_failed_items")
        return (
            f"(Req={rate(ok)}/{rate(partial)}/{rate(total)}, Item={rate(items_ok)}/{rate(items)})"
        )

    used = values["master_allocated_bytes"]
    cap = values["master_total_capacity_bytes"]
    mem = f"Mem Storage: {format_bytes(used)} / {format_bytes(cap)}"
    if cap > 0:
        mem += f" ({used / cap * 100.0:.1f}%)"
    zero = "0.00/0.00"
    rpcs = [f"{label}={pair(base)}" for label, base in _SUMMARY_RPCS]
    rpcs += [f"{label}={zero}" for label in _SUMMARY_ABSENT_RPCS]
    batches = [f"{label}:{triple(base)}" for label, base in _SUMMARY_BATCHES]
    batches += [f"{label}:(Req={pair(base)})" for label, base in _SUMMARY_TASKS]
    evictions = values["master_successful_evictions_total"]
    attempts = values["master_attempted_evictions_total"]
    keys_evicted = values["master_evicted_key_count"]
    bytes_evicted = format_bytes(values["master_evicted_size_bytes"])
    parts: Iterable[str] = (
        mem,
        f"NVMe-oF SSD: {format_bytes(0)} / {format_bytes(0)}",
        f"SSD Storage: {format_bytes(0)} / {format_bytes(0)}",
        f"Keys: {values['master_key_count']} (soft-pinned: {values['master_soft_pin_key_count']})",
        f"Clients: {values['master_active_clients']}",
        "Requests (Success/Total per sec): " + ", ".join(rpcs),
        "Batch Requests (per sec, Req=Success/PartialSuccess/Total, Item=Success/Total): "
        + ", ".join(batches),
        f"Eviction: Success/Attempts={evictions}/{attempts}, "
        f"AllocFail={delta('put_start_alloc_failures')}, PartialAlloc=0, "
        f"keys={keys_evicted}, size={bytes_evicted}",
        f"Mem Eviction: Success/Attempts={evictions}/{attempts}, keys={keys_evicted}, "
        f"size={bytes_evicted}",
        f"NoF Eviction: Success/Attempts=0/0, keys=0, size={format_bytes(0)}",
        f"Discard: Released/Total={values['master_put_start_release_cnt']}/"
        f"{values['master_put_start_discard_cnt']}, StagingSize="
        f"{format_bytes(values['master_put_start_discarded_staging_size'])}",
        "Promotion: in_flight=0, admitted=0, completed=0, failed=0, cancelled=0, expired=0, "
        f"bytes={format_bytes(0)}, rejected(freq/wm/cap)=0/0/0",
        "Snapshots: Success=0, Fail=0",
    )
    role, state, ready = role_state(svc)
    text = (
        f"role={role}, state={state}, service_ready={'true' if ready else 'false'}, "
        f"master={{{' | '.join(parts)}}}, ha={{{_ha_summary(svc)}}}"
    )
    if svc.ha is not None and svc.leader_address:
        text += f", leader={svc.leader_address}, view_version={svc.state.view_version}"
    return text
