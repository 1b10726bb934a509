"""The reference master's metric names, types and help texts, and what pymooncake
exports for each.

The reference (``master_metric_manager.cpp``, ``ha_metric_manager.cpp``)
exports a metric once it has been set, and sets most of them to zero at
start-up; the rest appear only once their feature is used.  pymooncake
exports:

* ``LIVE``: every name of a feature it has, with its real value;
* ``ZERO``: names of features it lacks that the reference exports from
  start-up anyway (promotion, copy/move tasks, the file tier ...), always 0,
  so dashboards and alerts built for the reference find them;
* nothing for names the reference exports only once a feature it lacks is
  used (``NOF``, ``TENANT``, ``SNAPSHOT``: the reason is ``ABSENT_REASONS``).

``docs/observability.md`` lists them; ``tests/store/test_master_metrics.py``
checks that a scrape has exactly the exported names.
"""

from __future__ import annotations

from typing import Final

__all__ = ["ABSENT_REASONS", "CATALOG", "HA_CATALOG", "LIVE", "ZERO"]

LIVE: Final = "live"
ZERO: Final = "zero"
NOF: Final = "nof"
TENANT: Final = "tenant"
SNAPSHOT: Final = "snapshot"

#: why a reference name is not exported
ABSENT_REASONS: Final[dict[str, str]] = {
    NOF: "NVMe-oF SSD segments (the reference exports these once a NoF segment is used)",
    TENANT: "tenant quotas (the reference exports these once a tenant is charged)",
    SNAPSHOT: "metadata snapshots (the reference exports these after its first snapshot)",
}

#: (name, type, status, help) in the reference's output order
# fmt: off
CATALOG: Final[tuple[tuple[str, str, str, str], ...]] = (
    ("master_allocated_bytes", "gauge", LIVE, "Total memory bytes currently allocated across all segments"),
    ("master_total_capacity_bytes", "gauge", LIVE, "Total memory capacity across all mounted segments"),
    ("segment_allocated_bytes", "gauge", LIVE, "Total memory bytes currently allocated of the segment"),
    ("segment_total_capacity_bytes", "gauge", LIVE, "Total memory capacity of the mounted segment"),
    ("master_nof_allocated_bytes", "gauge", NOF, "Total nof ssd bytes currently allocated across all segments"),
    ("master_total_nof_capacity_bytes", "gauge", NOF, "Total nof ssd capacity across all mounted segments"),
    ("nof_segment_allocated_bytes", "gauge", NOF, "Total nof ssd bytes currently allocated of the segment"),
    ("nof_segment_total_capacity_bytes", "gauge", NOF, "Total nof ssd capacity of the mounted segment"),
    ("master_allocated_file_size_bytes", "gauge", ZERO, "Total bytes currently allocated for file storage in 3fs/nfs"),
    ("master_total_file_capacity_bytes", "gauge", ZERO, "Total capacity for file storage in 3fs/nfs"),
    ("master_key_count", "gauge", LIVE, "Total number of keys managed by the master"),
    ("master_soft_pin_key_count", "gauge", LIVE, "Total number of soft-pinned keys managed by the master"),
    ("master_active_clients", "gauge", LIVE, "Total number of active clients"),
    ("master_value_size_bytes", "histogram", LIVE, "Distribution of object value sizes"),
    ("master_exist_key_requests_total", "counter", LIVE, "Total number of ExistKey requests received"),
    ("master_exist_key_failures_total", "counter", LIVE, "Total number of failed ExistKey requests"),
    ("master_put_start_requests_total", "counter", LIVE, "Total number of PutStart requests received"),
    ("master_put_start_failures_total", "counter", LIVE, "Total number of failed PutStart requests"),
    ("master_put_start_alloc_failures_total", "counter", LIVE, "Total number of PutStart failures caused by replica allocation failure"),
    ("master_put_start_partial_allocations_total", "counter", ZERO, "Total number of PutStart requests that succeeded with fewer replicas than requested (best-effort degradation)"),
    ("master_put_end_requests_total", "counter", LIVE, "Total number of PutEnd requests received"),
    ("master_put_end_failures_total", "counter", LIVE, "Total number of failed PutEnd requests"),
    ("master_put_revoke_requests_total", "counter", LIVE, "Total number of PutRevoke requests received"),
    ("master_put_revoke_failures_total", "counter", LIVE, "Total number of failed PutRevoke requests"),
    ("master_get_replica_list_requests_total", "counter", LIVE, "Total number of GetReplicaList requests received"),
    ("master_get_replica_list_failures_total", "counter", LIVE, "Total number of failed GetReplicaList requests"),
    ("master_get_replica_list_by_regex_requests_total", "counter", LIVE, "Total number of GetReplicaListByRegex requests received"),
    ("master_get_replica_list_by_regex_failures_total", "counter", LIVE, "Total number of failed GetReplicaListByRegex requests"),
    ("master_remove_requests_total", "counter", LIVE, "Total number of Remove requests received"),
    ("master_remove_failures_total", "counter", LIVE, "Total number of failed Remove requests"),
    ("master_remove_by_regex_requests_total", "counter", LIVE, "Total number of RemoveByRegex requests received"),
    ("master_remove_by_regex_failures_total", "counter", LIVE, "Total number of failed RemoveByRegex requests"),
    ("master_remove_all_requests_total", "counter", LIVE, "Total number of Remove all requests received"),
    ("master_remove_all_failures_total", "counter", LIVE, "Total number of failed Remove all requests"),
    ("master_mount_segment_requests_total", "counter", LIVE, "Total number of MountSegment requests received"),
    ("master_mount_segment_failures_total", "counter", LIVE, "Total number of failed MountSegment requests"),
    ("master_unmount_segment_requests_total", "counter", LIVE, "Total number of UnmountSegment requests received"),
    ("master_unmount_segment_failures_total", "counter", LIVE, "Total number of failed UnmountSegment requests"),
    ("master_remount_segment_requests_total", "counter", LIVE, "Total number of RemountSegment requests received"),
    ("master_remount_segment_failures_total", "counter", LIVE, "Total number of failed RemountSegment requests"),
    ("master_mount_nof_segment_requests_total", "counter", NOF, "Total number of MountNoFSegment requests received"),
    ("master_mount_nof_segment_failures_total", "counter", NOF, "Total number of failed MountNoFSegment requests"),
    ("master_unmount_nof_segment_requests_total", "counter", NOF, "Total number of UnmountNoFSegment requests received"),
    ("master_unmount_nof_segment_failures_total", "counter", NOF, "Total number of failed UnmountNoFSegment requests"),
    ("master_remount_nof_segment_requests_total", "counter", NOF, "Total number of RemountNoFSegment requests received"),
    ("master_remount_nof_segment_failures_total", "counter", NOF, "Total number of failed RemountNoFSegment requests"),
    ("master_ping_requests_total", "counter", LIVE, "Total number of ping requests received"),
    ("master_ping_failures_total", "counter", LIVE, "Total number of failed ping requests"),
    ("master_nof_heartbeat_success_total", "counter", NOF, "Total number of successful NoF heartbeat probes"),
    ("master_nof_heartbeat_failure_total", "counter", NOF, "Total number of failed NoF heartbeat probes"),
    ("master_nof_heartbeat_timeout_total", "counter", NOF, "Total number of timed out NoF heartbeat probes"),
    ("master_nof_segments_unmounted_by_heartbeat_total", "counter", NOF, "Total number of NoF segments unmounted due to heartbeat failures"),
    ("master_nof_heartbeat_probe_latency_ms", "histogram", NOF, "Latency distribution of NoF heartbeat probes in milliseconds"),
    ("master_copy_start_requests_total", "counter", LIVE, "Total number of CopyStart requests received"),
    ("master_copy_start_failures_total", "counter", LIVE, "Total number of failed CopyStart requests"),
    ("master_copy_end_requests_total", "counter", LIVE, "Total number of CopyEnd requests received"),
    ("master_copy_end_failures_total", "counter", LIVE, "Total number of failed CopyEnd requests"),
    ("master_copy_revoke_requests_total", "counter", LIVE, "Total number of CopyRevoke requests received"),
    ("master_copy_revoke_failures_total", "counter", LIVE, "Total number of failed CopyRevoke requests"),
    ("master_move_start_requests_total", "counter", LIVE, "Total number of MoveStart requests received"),
    ("master_move_start_failures_total", "counter", LIVE, "Total number of failed MoveStart requests"),
    ("master_move_end_requests_total", "counter", LIVE, "Total number of MoveEnd requests received"),
    ("master_move_end_failures_total", "counter", LIVE, "Total number of failed MoveEnd requests"),
    ("master_move_revoke_requests_total", "counter", LIVE, "Total number of MoveRevoke requests received"),
    ("master_move_revoke_failures_total", "counter", LIVE, "Total number of failed MoveRevoke requests"),
    ("master_evict_disk_replica_requests_total", "counter", ZERO, "Total number of EvictDiskReplica requests received"),
    ("master_evict_disk_replica_failures_total", "counter", ZERO, "Total number of failed EvictDiskReplica requests"),
    ("master_create_copy_task_requests_total", "counter", LIVE, "Total number of Copy requests received"),
    ("master_create_copy_task_failures_total", "counter", LIVE, "Total number of failed Copy requests"),
    ("master_create_move_task_requests_total", "counter", LIVE, "Total number of Move requests received"),
    ("master_create_move_task_failures_total", "counter", LIVE, "Total number of failed Move requests"),
    ("master_update_task_requests_total", "counter", LIVE, "Total number of MarkTaskToComplete requests received"),
    ("master_update_task_failures_total", "counter", LIVE, "Total number of failed MarkTaskToComplete requests"),
    ("master_query_task_requests_total", "counter", LIVE, "Total number of QueryTask requests received"),
    ("master_query_task_failures_total", "counter", LIVE, "Total number of failed QueryTask requests"),
    ("master_fetch_tasks_requests_total", "counter", LIVE, "Total number of FetchTasks requests received"),
    ("master_fetch_tasks_failures_total", "counter", LIVE, "Total number of failed FetchTasks requests"),
    ("master_batch_exist_key_requests_total", "counter", LIVE, "Total number of BatchExistKey requests received"),
    ("master_batch_exist_key_failures_total", "counter", LIVE, "Total number of failed BatchExistKey requests"),
    ("master_batch_exist_key_partial_successes_total", "counter", LIVE, "Total number of partially successful BatchExistKey requests"),
    ("master_batch_exist_key_items_total", "counter", LIVE, "Total number of items processed in BatchExistKey requests"),
    ("master_batch_exist_key_failed_items_total", "counter", LIVE, "Total number of failed items in BatchExistKey requests"),
    ("master_batch_query_ip_requests_total", "counter", ZERO, "Total number of BatchQueryIp requests received"),
    ("master_batch_query_ip_failures_total", "counter", ZERO, "Total number of failed BatchQueryIp requests"),
    ("master_batch_query_ip_partial_successes_total", "counter", ZERO, "Total number of partially successful BatchQueryIp requests"),
    ("master_batch_query_ip_items_total", "counter", ZERO, "Total number of items processed in BatchQueryIp requests"),
    ("master_batch_query_ip_failed_items_total", "counter", ZERO, "Total number of failed items in BatchQueryIp requests"),
    ("master_batch_replica_clear_requests_total", "counter", LIVE, "Total number of BatchReplicaClear requests received"),
    ("master_batch_replica_clear_failures_total", "counter", LIVE, "Total number of failed BatchReplicaClear requests"),
    ("master_batch_replica_clear_partial_successes_total", "counter", LIVE, "Total number of partially successful BatchReplicaClear requests"),
    ("master_batch_replica_clear_items_total", "counter", LIVE, "Total number of items processed in BatchReplicaClear requests"),
    ("master_batch_replica_clear_failed_items_total", "counter", LIVE, "Total number of failed items in BatchReplicaClear requests"),
    ("master_batch_get_replica_list_requests_total", "counter", LIVE, "Total number of BatchGetReplicaList requests received"),
    ("master_batch_get_replica_list_failures_total", "counter", LIVE, "Total number of failed BatchGetReplicaList requests"),
    ("master_batch_get_replica_list_partial_successes_total", "counter", LIVE, "Total number of partially successful BatchGetReplicaList requests"),
    ("master_batch_get_replica_list_items_total", "counter", LIVE, "Total number of items processed in BatchGetReplicaList requests"),
    ("master_batch_get_replica_list_failed_items_total", "counter", LIVE, "Total number of failed items in BatchGetReplicaList requests"),
    ("master_batch_put_start_requests_total", "counter", LIVE, "Total number of BatchPutStart requests received"),
    ("master_batch_put_start_failures_total", "counter", LIVE, "Total number of failed BatchPutStart requests"),
    ("master_batch_put_start_partial_successes_total", "counter", LIVE, "Total number of partially successful BatchPutStart requests"),
    ("master_batch_put_start_items_total", "counter", LIVE, "Total number of items processed in BatchPutStart requests"),
    ("master_batch_put_start_failed_items_total", "counter", LIVE, "Total number of failed items in BatchPutStart requests"),
    ("master_batch_put_end_requests_total", "counter", LIVE, "Total number of BatchPutEnd requests received"),
    ("master_batch_put_end_failures_total", "counter", LIVE, "Total number of failed BatchPutEnd requests"),
    ("master_batch_put_end_partial_successes_total", "counter", LIVE, "Total number of partially successful BatchPutEnd requests"),
    ("master_batch_put_end_items_total", "counter", LIVE, "Total number of items processed in BatchPutEnd requests"),
    ("master_batch_put_end_failed_items_total", "counter", LIVE, "Total number of failed items in BatchPutEnd requests"),
    ("master_batch_put_revoke_requests_total", "counter", LIVE, "Total number of BatchPutRevoke requests received"),
    ("master_batch_put_revoke_failures_total", "counter", LIVE, "Total number of failed BatchPutRevoke requests"),
    ("master_batch_put_revoke_partial_successes_total", "counter", LIVE, "Total number of partially successful BatchPutRevoke requests"),
    ("master_batch_put_revoke_items_total", "counter", LIVE, "Total number of items processed in BatchPutRevoke requests"),
    ("master_batch_put_revoke_failed_items_total", "counter", LIVE, "Total number of failed items in BatchPutRevoke requests"),
    ("mem_cache_hit_nums_", "counter", LIVE, "Total number of GetReplicaList results served from the memory pool"),
    ("file_cache_hit_nums_", "counter", ZERO, "Total number of GetReplicaList results served from the SSD cache"),
    ("mem_cache_hit_bytes_total", "counter", LIVE, "Total bytes of GetReplicaList results served from the memory pool"),
    ("file_cache_hit_bytes_total", "counter", ZERO, "Total bytes of GetReplicaList results served from the SSD cache"),
    ("mem_cache_nums_", "gauge", LIVE, "Current number of cached values in the memory pool"),
    ("file_cache_nums_", "gauge", ZERO, "Current number of cached values in SSD cache"),
    ("valid_get_nums_", "counter", LIVE, "Total number of GetReplicaList operations that returned at least one completed replica"),
    ("total_get_nums_", "counter", LIVE, "Total number of GetReplicaList operations"),
    ("master_successful_evictions_total", "counter", LIVE, "Total number of successful eviction operations"),
    ("master_attempted_evictions_total", "counter", LIVE, "Total number of attempted eviction operations"),
    ("master_evicted_key_count", "counter", LIVE, "Total number of keys evicted"),
    ("master_evicted_size_bytes", "counter", LIVE, "Total bytes of evicted objects"),
    ("master_successful_evictions_mem", "counter", LIVE, "Total number of successful eviction operations in mem"),
    ("master_attempted_evictions_mem", "counter", LIVE, "Total number of attempted eviction operations in mem"),
    ("master_evicted_key_count_mem", "counter", LIVE, "Total number of keys evicted in mem"),
    ("master_evicted_size_bytes_mem", "counter", LIVE, "Total bytes of evicted objects in mem"),
    ("master_successful_evictions_nof", "counter", NOF, "Total number of successful eviction operations in nof"),
    ("master_attempted_evictions_nof", "counter", NOF, "Total number of attempted eviction operations in nof"),
    ("master_evicted_key_count_nof", "counter", NOF, "Total number of keys evicted in nof"),
    ("master_evicted_size_bytes_nof", "counter", NOF, "Total bytes of evicted objects in nof"),
    ("master_put_start_discard_cnt", "counter", LIVE, "Total number of discarded PutStart operations"),
    ("master_put_start_release_cnt", "counter", LIVE, "Total number of released PutStart operations"),
    ("master_put_start_discarded_staging_size", "gauge", LIVE, "Total size of memory replicas in discarded but not yet released PutStart operations"),
    ("master_promotion_in_flight", "gauge", ZERO, "Current number of in-flight L2->L1 promotion tasks"),
    ("master_promotion_admitted_total", "counter", ZERO, "Total promotion tasks admitted past all gates and enqueued"),
    ("master_promotion_completed_total", "counter", ZERO, "Total promotion tasks committed via NotifyPromotionSuccess"),
    ("master_promotion_completed_bytes_total", "counter", ZERO, "Total bytes promoted from LOCAL_DISK to MEMORY"),
    ("master_promotion_expired_total", "counter", ZERO, "Total promotion tasks expired via the reaper (put_start_release_timeout_sec)"),
    ("master_promotion_failed_total", "counter", ZERO, "Total promotion tasks aborted by holder via NotifyPromotionFailure (holder reported a downstream failure)"),
    ("master_promotion_cancelled_total", "counter", ZERO, "Total promotion tasks removed because the prerequisite went away: object removal mid-flight (Remove / UpsertStart / etc.), holder-client expiry (ClearInvalidHandles), or staged replica lost (NotifyPromotionSuccess committed=false)"),
    ("master_promotion_rejected_frequency_total", "counter", ZERO, "Promotion attempts rejected because CountMinSketch frequency was below promotion_admission_threshold"),
    ("master_promotion_rejected_watermark_total", "counter", ZERO, "Promotion attempts rejected because DRAM was at or above the eviction high watermark"),
    ("master_promotion_rejected_cap_total", "counter", ZERO, "Promotion attempts rejected because promotion_in_flight was at promotion_queue_limit"),
    ("master_promotion_candidate_recorded_total", "counter", ZERO, "New promotion retry candidate entries created"),
    ("master_promotion_candidate_admitted_total", "counter", ZERO, "Promotion retry candidates successfully queued on background retry"),
    ("master_promotion_candidate_admission_rejected_total", "counter", ZERO, "Promotion retry candidates that hit a gate again during retry scan"),
    ("master_promotion_candidate_expired_evaluated_total", "counter", ZERO, "Promotion retry candidates expired or exhausted during a retry scan"),
    ("master_promotion_candidate_expired_unevaluated_total", "counter", ZERO, "Promotion retry candidates that aged out before the background scheduler ever evaluated them (scan budget too small to reach their shard within the TTL window)"),
    ("master_promotion_candidate_dropped_limit_total", "counter", ZERO, "Promotion retry candidates dropped at record time because the global candidate count limit was reached"),
    ("mooncake_tenant_quota_reject_total", "counter", TENANT, "Total number of tenant quota admission rejects"),
    ("mooncake_tenant_evict_bytes_total", "counter", TENANT, "Total bytes evicted by tenant-scoped quota eviction"),
    ("master_snapshot_duration_ms", "histogram", SNAPSHOT, "Distribution of snapshot operation durations in milliseconds"),
    ("master_snapshot_success", "counter", SNAPSHOT, "Total number of successful snapshot operations"),
    ("master_snapshot_fail", "counter", SNAPSHOT, "Total number of failed snapshot operations"),
)
# fmt: on

#: the HA gauges the reference exports from start-up (``ha_metric_manager.cpp``; its
#: ``ha_batch_record_*`` gauges only in builds with OpLog perf metrics, its counters and
#: histograms once HA is used); pymooncake fills them from its replication
#: (``_exposition.ha_values``)
HA_CATALOG: Final[tuple[tuple[str, str], ...]] = (
    ("ha_oplog_last_sequence_id", "Latest OpLog sequence ID written by Primary"),
    ("ha_oplog_applied_sequence_id", "Latest OpLog sequence ID applied by Standby"),
    ("ha_oplog_standby_lag", "Number of OpLog entries Standby is behind Primary"),
    ("ha_oplog_pending_entries", "Number of out-of-order entries waiting in OpLogApplier"),
    ("ha_pending_mutation_queue_size", "Number of mutations pending etcd write retry"),
    (
        "ha_standby_state",
        "Current state of the Standby service (0=STOPPED, 1=CONNECTING, 2=SYNCING, "
        "3=WATCHING, 4=RECOVERING, 5=RECONNECTING, 6=PROMOTING, 7=PROMOTED, 8=FAILED)",
    ),
)
