"""``mooncake_master``: run the Mooncake Store master in the foreground.

Takes the reference's gflags-style flags with the reference's defaults
(``mooncake-store/src/master.cpp``), optionally read from ``--config_path``
(JSON, or YAML when PyYAML is installed; keys are the flag names, plus
``client_live_ttl_sec`` for ``--client_ttl``).  Flags given on the command
line win over the file; the file wins over the defaults.

Once every listener is up it prints to stdout, with the real ports (``0``
means "any free port")::

    Metrics and admin HTTP server listening on http://HOST:PORT (/metrics, /health, cluster page /)
    HTTP metadata server listening on http://HOST:PORT/metadata     (when enabled)
    Master service started on HOST:PORT

The last line means "ready".  ``PYMOONCAKE_CLUSTER_TOKEN`` (or the file named by
``--cluster_token_file``, which keeps the secret off the command line and out of
``ps``) turns on authentication on the RPC port, the admin HTTP port (except
``/metrics``, ``/metrics/summary``, ``/health``) and the embedded metadata server;
``PYMOONCAKE_TLS_CERT/_KEY/_CA`` add TLS (docs/security.md).  SIGINT/SIGTERM stop it with exit status 0.  A
port that cannot be bound, an invalid value, or a feature pymooncake does not
have (HA, snapshots, SSD offload, CXL, NoF, multi-tenancy, KV events ...) is
reported on one stderr line with exit status 1.  Unknown flags are refused
with gflags' wording.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib
import json
import logging
import os
import socket
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from .. import __version__
from .._authio import TOKEN_ENV, ClusterSecurity
from .._busypoll import poll_window_from_env, run_polling
from ..errors import ConfigError, MooncakeError, PortInUse
from ..store import MasterConfig
from ..store._config import parse_duration_ms
from ..store.master import MasterService, tune_gc_for_master
from ..store.master._exposition import summary_text
from ..store.master._ha import HaConfig
from ..store.master._service import MasterLimits
from ._gflags import Flag, FlagError, parse_flags, usage
from ._logsetup import setup_logging
from ._serve import lan_hint, stop_on_signals

__all__ = ["FLAGS", "main"]

log = logging.getLogger("pymooncake.cli.master")

PROG: Final = "mooncake_master"
#: reference: MasterMetricManager reports every 10 s when --enable_metric_reporting
_REPORT_INTERVAL_S: Final = 10.0
_INT64_MAX: Final = (1 << 63) - 1
_SIOCGIFADDR: Final = 0x8915

# Defaults are the reference's (master.cpp DEFINE_*, types.h DEFAULT_*).
FLAGS: Final[tuple[Flag, ...]] = (
    Flag("config_path", str, "", "master config file (.json; .yaml/.yml with PyYAML)"),
    Flag("version", bool, False, "print the version and exit"),
    # --- RPC
    Flag("port", int, 50051, "RPC port (deprecated, use rpc_port); 0 = any free port"),
    Flag("rpc_port", int, 0, "RPC port (0 = use --port)"),
    Flag("rpc_address", str, "0.0.0.0", "address the RPC server binds to"),
    Flag("rpc_interface", str, "", "NIC whose IPv4 address overrides rpc_address"),
    Flag("rpc_thread_num", int, 0, "RPC threads (accepted; pymooncake serves from one event loop)"),
    Flag("max_threads", int, 16, "deprecated, use rpc_thread_num (accepted, no effect)"),
    Flag(
        "rpc_conn_timeout_seconds",
        int,
        0,
        "close an RPC connection idle this long (0 = pymooncake's 600 s; clients reconnect)",
    ),
    Flag("rpc_enable_tcp_no_delay", bool, True, "TCP_NODELAY on RPC connections (always on)"),
    # --- metrics / admin HTTP
    Flag("enable_metric_reporting", bool, True, "log a metrics summary every 10 s"),
    Flag("metrics_port", int, 9003, "port of the metrics/admin HTTP server (0 = any free port)"),
    Flag("metrics_host", str, "0.0.0.0", "address of the metrics/admin HTTP server"),
    # --- leases, pins, eviction
    Flag("default_kv_lease_ttl", str, "10000", "read lease: ms, or a duration like 5s/5000ms"),
    Flag("default_kv_soft_pin_ttl", str, "1800000", "soft pin TTL: ms or a duration"),
    Flag("max_kv_soft_pin_ttl", str, "86400000", "maximum soft pin TTL: ms or a duration"),
    Flag("allow_evict_soft_pinned_objects", bool, True, "allow evicting soft-pinned objects"),
    Flag("eviction_ratio", float, 0.05, "share of capacity freed per eviction round"),
    Flag("eviction_high_watermark_ratio", float, 0.90, "usage ratio that triggers eviction"),
    Flag("client_ttl", int, 10, "seconds a silent client stays alive (file: client_live_ttl_sec)"),
    Flag("put_start_discard_timeout_sec", int, 30, "a newer put may preempt an older unfinished"),
    Flag("put_start_release_timeout_sec", int, 600, "unfinished puts are reclaimed after this"),
    # --- allocation
    Flag("memory_allocator", str, "offset", "segment allocator: offset (cachelib unavailable)"),
    Flag("allocation_strategy", str, "random", "random | free_ratio_first | local_first"),
    # --- embedded HTTP metadata server
    Flag("enable_http_metadata_server", bool, False, "serve TE metadata over HTTP"),
    Flag("http_metadata_server_host", str, "0.0.0.0", "address of the HTTP metadata server"),
    Flag("http_metadata_server_port", int, 8080, "port of the HTTP metadata server (0 = any)"),
    Flag("enable_metadata_cleanup_on_timeout", bool, False, "unavailable in pymooncake"),
    # --- HA
    Flag("enable_ha", bool, False, "high availability: leader election through etcd"),
    Flag("ha_backend_type", str, "etcd", "HA backend: etcd | redis | k8s (HA only)"),
    Flag("ha_backend_connstring", str, "", "HA backend connection string (HA only)"),
    Flag("etcd_endpoints", str, "", "etcd endpoints (HA only)"),
    Flag(
        "cluster_id", str, "mooncake_cluster", "cluster id (HA key namespace; MC_STORE_CLUSTER_ID)"
    ),
    Flag(
        "ha_lease_ttl_sec",
        int,
        5,
        "pymooncake: etcd lease of the leader key (seconds); a new leader warms up this long",
    ),
    Flag(
        "ha_sync_timeout_ms",
        int,
        2000,
        "pymooncake: how long replies wait for a standby's acknowledgement before it is dropped",
    ),
    Flag(
        "ha_advertise_address",
        str,
        "",
        "pymooncake: the RPC address written into the leader key (default: rpc_address:port)",
    ),
    Flag(
        "journal_path",
        str,
        "",
        "pymooncake: journal file; acknowledged puts survive a master crash/restart (empty = off)",
    ),
    Flag(
        "journal_fsync",
        bool,
        False,
        "pymooncake: fsync the journal on every change (host crashes too)",
    ),
    Flag(
        "cluster_token_file",
        str,
        "",
        "pymooncake: file holding the cluster token (PYMOONCAKE_CLUSTER_TOKEN otherwise; "
        "never put the token itself on a command line)",
    ),
    # --- pymooncake: bounds of the RPC listener (MasterLimits, docs/security.md)
    Flag(
        "rpc_max_connections",
        int,
        8192,
        "pymooncake: RPC connections at once (idle ones are closed to admit new ones; "
        "capped below the open-file limit)",
    ),
    Flag(
        "rpc_max_buffered_mb",
        int,
        512,
        "pymooncake: MiB of unfinished request frames all connections may hold together",
    ),
    Flag(
        "rpc_frame_timeout_sec",
        float,
        30.0,
        "pymooncake: a request frame must arrive completely within this many seconds",
    ),
    Flag(
        "rpc_auth_timeout_sec",
        float,
        5.0,
        "pymooncake: the cluster-token handshake must complete within this many seconds",
    ),
    Flag(
        "rpc_reply_cache_ttl_sec",
        float,
        120.0,
        "pymooncake: how long answers of mutations are kept for retries of the same request id "
        "(longer than a client's MC_RPC_TIMEOUT_MS)",
    ),
    Flag(
        "regex_timeout_ms",
        int,
        2000,
        "pymooncake: the longest a *ByRegex pattern may run over one slice of keys",
    ),
    Flag(
        "regex_max_results",
        int,
        100_000,
        "pymooncake: most keys one GetReplicaListByRegex returns",
    ),
    Flag("enable_oplog", bool, False, "HA oplog replication (unavailable)"),
    Flag("oplog_poll_interval_ms", int, 1000, "HA only"),
    Flag("oplog_batch_max_entries", int, 1024, "HA only"),
    Flag("batch_oplog_retry_timeout_sec", int, 180, "HA only"),
    Flag("pod_name", str, "", "K8s pod name (HA only)"),
    Flag("pod_namespace", str, "", "K8s pod namespace (HA only)"),
    # --- snapshots
    Flag("enable_snapshot", bool, False, "periodic snapshots (unavailable)"),
    Flag("enable_snapshot_restore", bool, False, "restore from a snapshot (unavailable)"),
    Flag("snapshot_interval_seconds", int, 600, "snapshots only"),
    Flag("snapshot_child_timeout_seconds", int, 300, "snapshots only"),
    Flag("snapshot_retention_count", int, 2, "snapshots only"),
    Flag("snapshot_object_store_type", str, "", "snapshots only: local | s3"),
    Flag("snapshot_payload_store_type", str, "", "deprecated alias"),
    Flag("snapshot_payload_backend_type", str, "", "deprecated alias"),
    Flag("snapshot_catalog_store_type", str, "", "snapshots only: embedded | redis"),
    Flag("snapshot_catalog_backend_type", str, "", "deprecated alias"),
    Flag("snapshot_catalog_store_connstring", str, "", "snapshots only"),
    Flag("snapshot_catalog_backend_connstring", str, "", "deprecated alias"),
    Flag("snapshot_backup_dir", str, "", "snapshots only"),
    # --- task manager
    Flag("max_total_finished_tasks", int, 10000, "copy/move tasks kept queryable when done"),
    Flag("max_total_pending_tasks", int, 10000, "copy/move tasks queued at most"),
    Flag("max_total_processing_tasks", int, 10000, "copy/move tasks handed out at once"),
    Flag("pending_task_timeout_sec", int, 300, "a task pending this long fails (0 = never)"),
    Flag("processing_task_timeout_sec", int, 300, "a silent running task fails (0 = never)"),
    Flag("max_retry_attempts", int, 10, "retries of a task that finds no space"),
    # --- SSD offload / promotion
    Flag("enable_offload", bool, False, "clients' SSD tiers hold LOCAL_DISK replicas"),
    Flag("offload_on_evict", bool, False, "offload when evicted (else at every put end)"),
    Flag("offload_force_evict", bool, False, "evict anyway when the offload queue is full"),
    Flag("offloading_queue_limit", int, 50000, "objects waiting to be offloaded"),
    Flag("offload_cap_ratio", float, 0.5, "accepted; unused by pymooncake"),
    Flag("promotion_on_hit", bool, False, "copy disk-only objects back to memory when hit"),
    Flag("promotion_admission_threshold", int, 2, "reads of a disk-only object that promote it"),
    Flag("promotion_queue_limit", int, 50000, "objects waiting to be promoted"),
    Flag("promotion_max_per_heartbeat", int, 1, "promotions handed out per client heartbeat"),
    Flag("quota_bytes", int, 0, "bytes of DISK replicas under --root_fs_dir (0 = no bound)"),
    Flag("enable_disk_eviction", bool, True, "delete the oldest DISK replicas above --quota_bytes"),
    # --- dynamic replication
    Flag("dynamic_replication_mode", str, "off", "off (observe/enforce unavailable)"),
    Flag("dynamic_replication_heat_window_seconds", int, 10, "dynamic replication only"),
    Flag("dynamic_replication_admission_qps_threshold", float, 0.8, "dynamic replication only"),
    Flag("dynamic_replication_max_memory_replicas", int, 2, "dynamic replication only"),
    # --- legacy file segment / CXL
    Flag("root_fs_dir", str, "", "shared filesystem: every put is also a DISK replica there"),
    Flag("global_file_segment_size", int, _INT64_MAX, "accepted; unused by pymooncake"),
    Flag("enable_cxl", bool, False, "CXL memory (unavailable)"),
    Flag("cxl_path", str, "/dev/dax0.0", "CXL only"),
    Flag("cxl_size", int, 8 << 30, "CXL only"),
    # --- NVMe-oF
    Flag("nof_eviction_ratio", float, 0.05, "NoF SSD only"),
    Flag("nof_eviction_high_watermark_ratio", float, 0.90, "NoF SSD only"),
    Flag("nof_heartbeat_interval_sec", int, 10, "NoF SSD only"),
    Flag("nof_heartbeat_probe_timeout_ms", int, 1000, "NoF SSD only"),
    Flag("nof_heartbeat_failures_threshold", int, 3, "NoF SSD only"),
    # --- tenancy
    Flag("enable_multi_tenants", bool, False, "multi-tenancy (unavailable)"),
    Flag("tenant_quota_connector_type", str, "file", "multi-tenancy only"),
    Flag("tenant_quota_connector_uri", str, "", "multi-tenancy only"),
    # --- KV events
    Flag("enable_kv_events", bool, False, "ZMQ KV event publisher (unavailable)"),
    Flag("kv_events_bind_endpoint", str, "", "KV events only"),
    Flag("kv_events_backend_id", str, "", "KV events only"),
    Flag("kv_events_emit_legacy_compat", bool, True, "KV events only"),
    Flag("kv_events_emit_object_key", bool, True, "KV events only"),
    Flag("kv_events_queue_capacity", int, 65536, "KV events only"),
    Flag("kv_events_model_name", str, "", "deprecated, KV events only"),
    Flag("kv_events_tenant_id", str, "default", "deprecated, KV events only"),
    Flag("kv_events_additional_salt", str, "", "deprecated, KV events only"),
    Flag("kv_events_lora_name", str, "", "deprecated, KV events only"),
    Flag("kv_events_block_size", int, 0, "deprecated, KV events only"),
    Flag("kv_events_dp_rank", int, 0, "deprecated, KV events only"),
)

_BY_NAME: Final = {f.name: f for f in FLAGS}
#: flags a config file may not set (reference: InitMasterConf reads none of these)
_NOT_IN_FILE: Final = frozenset({"config_path", "version"})
_DURATIONS: Final = ("default_kv_lease_ttl", "default_kv_soft_pin_ttl", "max_kv_soft_pin_ttl")
_PORTS: Final = ("port", "rpc_port", "metrics_port", "http_metadata_server_port")
_NON_NEGATIVE: Final = (
    "rpc_thread_num",
    "max_total_finished_tasks",
    "max_total_pending_tasks",
    "max_total_processing_tasks",
    "pending_task_timeout_sec",
    "processing_task_timeout_sec",
    "max_retry_attempts",
    "max_threads",
    "rpc_conn_timeout_seconds",
    "put_start_discard_timeout_sec",
    "put_start_release_timeout_sec",
    "offloading_queue_limit",
    "quota_bytes",
    "cxl_size",
)

# (flag, value that is fine, what it would enable) -- anything else is refused
_UNAVAILABLE: Final[tuple[tuple[str, Any, str], ...]] = (
    ("enable_oplog", False, "HA oplog replication"),
    ("enable_snapshot", False, "master snapshots"),
    ("enable_snapshot_restore", False, "restoring master snapshots"),
    ("enable_cxl", False, "CXL memory"),
    ("enable_multi_tenants", False, "multi-tenancy"),
    ("enable_kv_events", False, "the ZMQ KV event publisher"),
    ("dynamic_replication_mode", "off", "dynamic replication"),
    ("enable_metadata_cleanup_on_timeout", False, "metadata cleanup on client timeout"),
)


class _Refused(Exception):
    """A setting that makes the master refuse to start (one line for stderr)."""


# ----------------------------------------------------------------------------------
# settings: command line, config file, validation
# ----------------------------------------------------------------------------------


def _load_file(path: str) -> dict[str, Any]:
    """Read a JSON or YAML config file into a flat ``{key: value}`` mapping."""
    lower = path.lower()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise _Refused(f"cannot read --config_path={path}: {exc.strerror or exc}") from exc
    data: Any
    if lower.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _Refused(f"--config_path={path} is not valid JSON: {exc}") from exc
    elif lower.endswith((".yaml", ".yml")):
        try:
            yaml = importlib.import_module("yaml")
        except ImportError:
            raise _Refused(
                f"--config_path={path} is YAML but PyYAML is not installed: "
                "pip install pyyaml, or use a .json config file"
            ) from None
        try:
            data = yaml.safe_load(text)
        except Exception as exc:
            raise _Refused(f"--config_path={path} is not valid YAML: {exc}") from exc
    else:
        raise _Refused(
            f"--config_path={path}: unsupported config file format (use .json, .yaml or .yml)"
        )
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _Refused(f"--config_path={path}: the top level must be an object of key: value")
    flat: dict[str, Any] = {}

    def walk(node: dict[Any, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            elif isinstance(value, list):
                raise _Refused(f"--config_path={path}: key {name!r} holds a list")
            else:
                flat[name] = value

    walk(data, "")
    return flat


def _coerce(flag: Flag, key: str, value: Any, source: str) -> Any:
    """A config-file value (under ``key``) as the flag's type."""
    bad = _Refused(f"{source}: {key}={value!r} is not a valid {flag.type.__name__}")
    if flag.type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            return value.strip().lower() in ("true", "1")
        raise bad
    if flag.type is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if flag.type is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if isinstance(value, bool) or value is None:
        raise bad
    return str(value)


def _from_file(path: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    source = f"--config_path={path}"
    raw_values = _load_file(path)
    # the reference's key for --client_ttl; it wins over a "client_ttl" key
    live_ttl = raw_values.pop("client_live_ttl_sec", None)
    for key, raw in raw_values.items():
        flag = _BY_NAME.get(key)
        if flag is None or key in _NOT_IN_FILE:
            log.warning("%s: ignoring unknown key %r", source, key)
            continue
        values[key] = _coerce(flag, key, raw, source)
    if live_ttl is not None:
        values["client_ttl"] = _coerce(
            _BY_NAME["client_ttl"], "client_live_ttl_sec", live_ttl, source
        )
    return values


def _command_line(argv: Sequence[str]) -> dict[str, Any]:
    """The flags given on the command line (and the glog flags), nothing else.

    Raises:
        FlagError: bad command line (gflags wording).
    """
    unset = object()
    # parse with a sentinel default to learn which flags were given explicitly
    parsed = parse_flags([Flag(f.name, f.type, unset, f.help) for f in FLAGS], argv)
    return {k: v for k, v in parsed.items() if v is not unset}


def _settings(explicit: dict[str, Any]) -> dict[str, Any]:
    """Defaults, then the config file, then the flags given on the command line.

    Raises:
        _Refused: bad config file.
    """
    values = {f.name: f.default for f in FLAGS}
    path = explicit.get("config_path", "")
    if path:
        values.update(_from_file(path))
    values.update(explicit)
    env_cluster = os.environ.get("MC_STORE_CLUSTER_ID", "").strip()
    if env_cluster and "cluster_id" not in explicit and values["cluster_id"] == "mooncake_cluster":
        values["cluster_id"] = env_cluster  # reference: --cluster_id, MC_STORE_CLUSTER_ID, default
    # rpc_port 0 means "use --port" (reference LoadConfigFromCmdline)
    values["_port"] = values["rpc_port"] if values["rpc_port"] > 0 else values["port"]
    return values


def _validate(values: dict[str, Any]) -> MasterConfig:
    """Check the merged settings and build the master's config.

    Raises:
        _Refused: an invalid value or an unavailable feature.
    """
    if values["dynamic_replication_mode"] not in ("off", "observe", "enforce"):
        raise _Refused("--dynamic_replication_mode must be off, observe or enforce")
    if values["enable_ha"]:
        if values["ha_backend_type"] != "etcd":
            raise _Refused(
                f"--ha_backend_type={values['ha_backend_type']}: pymooncake elects masters "
                "through etcd only; use --ha_backend_type=etcd"
            )
        if not (values["ha_backend_connstring"] or values["etcd_endpoints"]):
            raise _Refused(
                "--enable_ha=true needs the etcd endpoints: --etcd_endpoints='h1:2379;h2:2379' "
                "(or --ha_backend_connstring)"
            )
        if values["ha_lease_ttl_sec"] < 1:
            raise _Refused("--ha_lease_ttl_sec must be at least 1")
    for name, fine, what in _UNAVAILABLE:
        if values[name] != fine:
            shown = str(values[name]).lower() if isinstance(fine, bool) else values[name]
            default = str(fine).lower() if isinstance(fine, bool) else repr(fine)
            raise _Refused(
                f"--{name}={shown}: {what} is not available in pymooncake; leave --{name} at "
                f"its default ({default})"
            )
    if values["memory_allocator"] == "cachelib":
        raise _Refused(
            "--memory_allocator=cachelib: the cachelib allocator is not available in pymooncake "
            "(use offset)"
        )
    if values["memory_allocator"] != "offset":
        raise _Refused(
            f"Invalid memory allocator: {values['memory_allocator']}, must be 'cachelib' or 'offset'"
        )
    if values["allocation_strategy"] in ("cxl", "ssd_free_ratio_first"):
        raise _Refused(
            f"--allocation_strategy={values['allocation_strategy']} is not available in "
            "pymooncake (random, free_ratio_first or local_first)"
        )
    if os.environ.get("MC_RPC_PROTOCOL", "").strip().lower() == "rdma":
        raise _Refused("MC_RPC_PROTOCOL=rdma: RPC over RDMA is not available in pymooncake (tcp)")
    for name in _PORTS:
        if not 0 <= values[name] <= 65535:
            raise _Refused(f"--{name}={values[name]} is outside 0..65535 (0 = any free port)")
    for name in _NON_NEGATIVE:
        if values[name] < 0:
            raise _Refused(f"--{name}={values[name]} must not be negative")
    for name in ("nof_eviction_ratio", "offload_cap_ratio"):
        if not 0.0 <= values[name] <= 1.0:
            raise _Refused(f"--{name}={values[name]} must be between 0.0 and 1.0")
    if values["client_ttl"] <= 0:
        raise _Refused(f"--client_ttl={values['client_ttl']} must be a positive number of seconds")
    try:
        durations = {n: parse_duration_ms(values[n], what=f"--{n}") for n in _DURATIONS}
        return MasterConfig(
            default_kv_lease_ttl_ms=durations["default_kv_lease_ttl"],
            default_kv_soft_pin_ttl_ms=durations["default_kv_soft_pin_ttl"],
            max_kv_soft_pin_ttl_ms=durations["max_kv_soft_pin_ttl"],
            allow_evict_soft_pinned_objects=values["allow_evict_soft_pinned_objects"],
            eviction_ratio=values["eviction_ratio"],
            eviction_high_watermark_ratio=values["eviction_high_watermark_ratio"],
            client_ttl_s=float(values["client_ttl"]),
            put_start_discard_timeout_s=float(values["put_start_discard_timeout_sec"]),
            put_start_release_timeout_s=float(values["put_start_release_timeout_sec"]),
            allocation_strategy=values["allocation_strategy"],
            cluster_id=values["cluster_id"],
            max_total_finished_tasks=values["max_total_finished_tasks"],
            max_total_pending_tasks=values["max_total_pending_tasks"],
            max_total_processing_tasks=values["max_total_processing_tasks"],
            pending_task_timeout_s=float(values["pending_task_timeout_sec"]),
            processing_task_timeout_s=float(values["processing_task_timeout_sec"]),
            max_retry_attempts=values["max_retry_attempts"],
            enable_offload=values["enable_offload"],
            offload_on_evict=values["offload_on_evict"],
            offload_force_evict=values["offload_force_evict"],
            offloading_queue_limit=values["offloading_queue_limit"],
            promotion_on_hit=values["promotion_on_hit"],
            promotion_admission_threshold=max(1, values["promotion_admission_threshold"]),
            promotion_queue_limit=values["promotion_queue_limit"],
            promotion_max_per_heartbeat=values["promotion_max_per_heartbeat"],
            root_fs_dir=values["root_fs_dir"],
            enable_disk_eviction=values["enable_disk_eviction"],
            quota_bytes=values["quota_bytes"],
        )
    except ConfigError as exc:
        raise _Refused(str(exc)) from exc


#: flags of MasterLimits that must be positive
_LIMIT_FLAGS: Final = (
    "rpc_max_connections",
    "rpc_max_buffered_mb",
    "rpc_frame_timeout_sec",
    "rpc_auth_timeout_sec",
    "rpc_reply_cache_ttl_sec",
    "regex_timeout_ms",
    "regex_max_results",
)


def _limits(values: dict[str, Any]) -> MasterLimits:
    """The RPC listener's bounds from the flags.

    Raises:
        _Refused: a limit that is not positive.
    """
    for name in _LIMIT_FLAGS:
        if not values[name] > 0:
            raise _Refused(
                f"--{name}={values[name]} must be positive (default "
                f"{_BY_NAME[name].default}; docs/security.md explains each limit)"
            )
    default = MasterLimits()
    idle = values["rpc_conn_timeout_seconds"]
    return MasterLimits(
        max_connections=values["rpc_max_connections"],
        max_buffered_bytes=values["rpc_max_buffered_mb"] << 20,
        frame_deadline_s=values["rpc_frame_timeout_sec"],
        idle_timeout_s=float(idle) if idle > 0 else default.idle_timeout_s,
        auth_timeout_s=values["rpc_auth_timeout_sec"],
        reply_cache_ttl_s=values["rpc_reply_cache_ttl_sec"],
        regex_deadline_s=values["regex_timeout_ms"] / 1000.0,
        max_regex_results=values["regex_max_results"],
    )


def read_token_file(path: str, *, what: str = "--cluster_token_file") -> str:
    """The cluster token stored in ``path`` (surrounding whitespace removed).

    Raises:
        ConfigError: the file cannot be read, is empty, or is not UTF-8.
    """
    try:
        raw = Path(path).read_bytes()
        token = raw.decode().strip()
    except OSError as exc:
        raise ConfigError(f"{what}={path}: cannot read it: {exc.strerror or exc}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"{what}={path}: the token is not UTF-8 text") from None
    if not token:
        raise ConfigError(f"{what}={path} is empty; put the cluster token in it")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0
    if mode & 0o077:
        log.warning(
            "%s=%s is readable by other users (mode %o); chmod 600 it", what, path, mode & 0o777
        )
    return token


def _poll_window() -> float:
    try:
        return poll_window_from_env()
    except ValueError as exc:
        raise _Refused(str(exc)) from exc


def _security(values: dict[str, Any], env: Mapping[str, str] | None = None) -> ClusterSecurity:
    """Token and TLS of the master: PYMOONCAKE_CLUSTER_TOKEN / PYMOONCAKE_TLS_* from the
    environment, the token from ``--cluster_token_file`` when given.

    Raises:
        _Refused: unreadable token file, a file and an environment token that
            differ, half-configured TLS.
    """
    try:
        sec = ClusterSecurity.from_env(env)
        path = values["cluster_token_file"]
        if path:
            token = read_token_file(path)
            if sec.token and sec.token != token:
                raise _Refused(
                    f"--cluster_token_file={path} and {TOKEN_ENV} hold different tokens; "
                    "give the master one of them"
                )
            sec = ClusterSecurity(token, sec.tls_cert_file, sec.tls_key_file, sec.tls_ca_file)
        return sec
    except ConfigError as exc:
        raise _Refused(str(exc)) from exc


def _interface_ipv4(name: str) -> str:
    """The IPv4 address of network interface ``name`` (for --rpc_interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError as exc:
            raise _Refused(
                f"Failed to resolve rpc_interface={name}: {exc.strerror or exc} "
                "(is it an interface of this host with an IPv4 address? see `ip -4 addr`)"
            ) from exc
    return socket.inet_ntoa(raw[20:24])


def _log_ignored(values: dict[str, Any]) -> None:
    defaults = {f.name: f.default for f in FLAGS}
    if not values["rpc_enable_tcp_no_delay"]:
        log.warning("--rpc_enable_tcp_no_delay=false has no effect: TCP_NODELAY is always on")
    if values["max_threads"] != 16:
        log.warning("max_threads is deprecated, use rpc_thread_num instead")
    if values["port"] != 50051 and values["rpc_port"] > 0:
        log.warning(
            "Both rpc_port and port are set. Using rpc_port=%d. Please migrate to use rpc_port "
            "only.",
            values["rpc_port"],
        )
    if not values["enable_ha"] and (values["ha_backend_connstring"] or values["etcd_endpoints"]):
        log.warning("HA backend connection string is set but will not be used in non-HA mode")
    changed = [
        name
        for name in (
            "snapshot_backup_dir",
            "snapshot_object_store_type",
            "snapshot_catalog_store_type",
            "kv_events_bind_endpoint",
        )
        if values[name] != defaults[name]
    ]
    if changed:
        log.info("settings of unavailable features are ignored: %s", ", ".join(changed))


# ----------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------


def _port_flag(values: dict[str, Any], message: str) -> str:
    """``--flag=port`` for the port a bind failure names."""
    rpc_flag = "--rpc_port" if values["rpc_port"] > 0 else "--port"
    for name, port in (
        (rpc_flag, values["_port"]),
        ("--metrics_port", values["metrics_port"]),
        ("--http_metadata_server_port", values["http_metadata_server_port"]),
    ):
        if f"port {port} " in message:
            return f"{name}={port}"
    return "listening"


async def _report(service: MasterService, interval_s: float = _REPORT_INTERVAL_S) -> None:
    """Log the reference's "Master Admin Metrics" line every ``interval_s``
    (request figures are rates over the interval)."""
    summary_text(service, update=True)  # the first window starts now
    while True:
        await asyncio.sleep(interval_s)
        log.info("Master Admin Metrics: %s", summary_text(service, update=True))


def _ha_config(values: dict[str, Any]) -> HaConfig | None:
    if not values["enable_ha"]:
        return None
    return HaConfig(
        etcd_endpoints=values["ha_backend_connstring"] or values["etcd_endpoints"],
        cluster_id=values["cluster_id"],
        lease_ttl_s=values["ha_lease_ttl_sec"],
        advertise=values["ha_advertise_address"],
    )


async def _serve(
    values: dict[str, Any], config: MasterConfig, security: ClusterSecurity, limits: MasterLimits
) -> int:
    with stop_on_signals() as stop:
        return await _run(values, config, security, limits, stop)


async def _run(
    values: dict[str, Any],
    config: MasterConfig,
    security: ClusterSecurity,
    limits: MasterLimits,
    stop: asyncio.Event,
) -> int:
    metadata = values["enable_http_metadata_server"]
    service = MasterService(
        config,
        host=values["rpc_address"],
        port=values["_port"],
        metrics_host=values["metrics_host"],
        metrics_port=values["metrics_port"],
        metadata_host=values["http_metadata_server_host"],
        metadata_port=values["http_metadata_server_port"] if metadata else None,
        journal_path=values["journal_path"] or None,
        journal_fsync=values["journal_fsync"],
        ha=_ha_config(values),
        ha_sync_timeout_s=values["ha_sync_timeout_ms"] / 1000.0,
        security=security,
        limits=limits,
        owns_process=True,
    )
    reporter: asyncio.Task[None] | None = None
    try:
        try:
            addrs = await service.start()
        except PortInUse as exc:
            text = str(exc)
            print(f"{PROG}: {_port_flag(values, text)}: {text}", file=sys.stderr)
            return 1
        except MooncakeError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return 1
        if addrs.metrics is not None:
            mh, mp = addrs.metrics
            print(
                f"Metrics and admin HTTP server listening on {addrs.metrics_url} (/metrics, /health, cluster page /)",
                flush=True,
            )
            lan_hint(log, mh, mp, "metrics server", lambda h, p: f"http://{h}:{p}/metrics")
        if addrs.metadata is not None:
            print(f"HTTP metadata server listening on {addrs.metadata_url}", flush=True)
            lan_hint(
                log,
                addrs.metadata[0],
                addrs.metadata[1],
                "HTTP metadata server",
                lambda h, p: f"http://{h}:{p}/metadata",
            )
        print(f"Master service started on {addrs.rpc_address}", flush=True)
        lan_hint(log, addrs.rpc[0], addrs.rpc[1], "master", lambda h, p: f"{h}:{p}")
        if values["enable_metric_reporting"]:
            reporter = asyncio.create_task(_report(service))
        await stop.wait()
        log.info("Shutdown signal received, exiting gracefully")
        return 0
    finally:
        if reporter is not None:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
        await service.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the master until SIGINT/SIGTERM.

    Returns:
        0 after a signal (or ``--help``/``--version``), 1 when the master cannot
        start (one line on stderr says why).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("--help", "-help", "-h", "--helpfull", "--helpshort") for a in args):
        print(usage(PROG, "Mooncake Store master (pymooncake)", FLAGS))
        return 0
    try:
        explicit = _command_line(args)
    except FlagError as exc:
        print(exc, file=sys.stderr)
        return 1
    if explicit.get("version"):
        print(f"{PROG} version {__version__} (pymooncake)")
        return 0
    setup_logging(explicit["minloglevel"], explicit["v"])
    try:
        values = _settings(explicit)
        config = _validate(values)
        limits = _limits(values)
        security = _security(values)
        poll_s = _poll_window()
        if values["rpc_interface"]:
            if values["rpc_address"] not in ("", "0.0.0.0"):
                log.warning(
                    "rpc_interface is set. Overriding rpc_address=%s", values["rpc_address"]
                )
            values["rpc_address"] = _interface_ipv4(values["rpc_interface"])
            log.info(
                "Resolved rpc_interface=%s to rpc_address=%s",
                values["rpc_interface"],
                values["rpc_address"],
            )
    except _Refused as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    _log_ignored(values)
    log.info(
        "Starting master: rpc=%s:%d, metrics=%s:%d, http_metadata_server=%s, "
        "default_kv_lease_ttl=%d ms, default_kv_soft_pin_ttl=%d ms, max_kv_soft_pin_ttl=%d ms, "
        "allow_evict_soft_pinned_objects=%s, eviction_ratio=%s, eviction_high_watermark_ratio=%s, "
        "client_ttl=%s s, put_start_discard_timeout_sec=%s, put_start_release_timeout_sec=%s, "
        "allocation_strategy=%s, memory_allocator=%s, cluster_id=%s, authentication=%s, "
        "rpc limits: %d connections, %d MiB buffered, frame %g s, idle %g s, auth %g s, "
        "reply cache %g s, regex %g s/slice and %d results",
        values["rpc_address"],
        values["_port"],
        values["metrics_host"],
        values["metrics_port"],
        (
            f"{values['http_metadata_server_host']}:{values['http_metadata_server_port']}"
            if values["enable_http_metadata_server"]
            else "off"
        ),
        config.default_kv_lease_ttl_ms,
        config.default_kv_soft_pin_ttl_ms,
        config.max_kv_soft_pin_ttl_ms,
        config.allow_evict_soft_pinned_objects,
        config.eviction_ratio,
        config.eviction_high_watermark_ratio,
        values["client_ttl"],
        values["put_start_discard_timeout_sec"],
        values["put_start_release_timeout_sec"],
        config.allocation_strategy,
        values["memory_allocator"],
        config.cluster_id,
        ("cluster token" + (" + TLS" if security.tls else "")) if security.token else "off",
        limits.max_connections,
        limits.max_buffered_bytes >> 20,
        limits.frame_deadline_s,
        limits.idle_timeout_s,
        limits.auth_timeout_s,
        limits.reply_cache_ttl_s,
        limits.regex_deadline_s,
        limits.max_regex_results,
    )
    tune_gc_for_master()
    with contextlib.suppress(KeyboardInterrupt):  # a signal before the handlers were set
        return run_polling(_serve(values, config, security, limits), poll_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
