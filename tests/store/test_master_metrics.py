"""The master's /metrics against the reference's names, types, labels and help
texts; counters that follow real operations; scrapes under load; the summary
line; the reference Grafana dashboard's metric names against a real scrape."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pymooncake.errors import ObjectNotFound
from pymooncake.store import MasterConfig
from pymooncake.store.master import MasterService
from pymooncake.store.master._catalog import (
    ABSENT_REASONS,
    CATALOG,
    HA_CATALOG,
    LIVE,
    ZERO,
)
from pymooncake.store.master._exposition import EXTRA_NAMES, exported_names, summary_text
from pymooncake.testing import LocalCluster

KiB = 1 << 10
MiB = 1 << 20
DATA = Path(__file__).resolve().parents[1] / "data"
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"

# --- reading a scrape ------------------------------------------------------------------


def scrape(url: str, path: str = "/metrics") -> str:
    with urllib.request.urlopen(url + path, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body: bytes = resp.read()
    return body.decode()


def parse(text: str) -> dict[str, Any]:
    """Validate with prometheus_client's parser; families by name."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def raw_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample line exactly as Prometheus ingests
    it (prometheus_client renames counter samples to ``*_total``)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        assert m, f"malformed sample line {line!r}"
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


def heads(text: str) -> dict[str, tuple[str, str]]:
    """family -> (type, help) from the # TYPE / # HELP lines."""
    types: dict[str, str] = {}
    helps: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert name not in types, f"two TYPE lines for {name}"
            types[name] = kind
        elif line.startswith("# HELP "):
            _, _, name, help_text = line.split(" ", 3)
            helps[name] = help_text
    assert set(types) == set(helps)
    return {n: (types[n], helps[n]) for n in types}


def value(text: str, name: str, **labels: str) -> float:
    for sample, got, v in raw_samples(text):
        if sample == name and got == labels:
            return v
    raise AssertionError(f"{name}{labels or ''} not in the scrape")


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(MasterConfig(default_kv_lease_ttl_ms=200, client_ttl_s=5.0)) as c:
        yield c


# --- names, types, labels, help -----------------------------------------------------------


def test_scrape_has_the_reference_names_types_help_and_labels(cluster: LocalCluster) -> None:
    a = cluster.client(16 * MiB)
    b = cluster.client(8 * MiB)
    assert a.put("k", b"v" * 5000)
    text = scrape(cluster.metrics_url)
    parse(text)  # prometheus_client accepts it
    families = heads(text)
    assert list(families) == exported_names(), "names or order differ from the catalog"

    catalog = {name: (kind, status, help_text) for name, kind, status, help_text in CATALOG}
    for name, (kind, help_text) in families.items():
        if name in catalog:
            ref_kind, status, ref_help = catalog[name]
            assert (kind, help_text) == (ref_kind, ref_help), name
            assert status in (LIVE, ZERO)
    for name, help_text in HA_CATALOG:
        assert families[name] == ("gauge", help_text)
    absent = [name for name, _, status, _ in CATALOG if status not in (LIVE, ZERO)]
    assert len(absent) == 24 and not set(absent) & set(families)
    assert len(catalog) == 156  # every name of master_metric_manager.cpp

    # labels: the reference's per-segment gauges carry only "segment" (the name);
    # histogram buckets only "le"; every other reference name none
    for name, labels, _ in raw_samples(text):
        if name.startswith("segment_"):
            assert set(labels) == {"segment"}
        elif name.endswith("_bucket"):
            assert set(labels) == {"le"}
        elif name.startswith("master_rpc_call"):
            assert set(labels) == {"method"}
        else:
            assert labels == {}, name
    for name in ("segment_total_capacity_bytes", "segment_allocated_bytes"):
        per_segment = {labels["segment"]: v for n, labels, v in raw_samples(text) if n == name}
        assert set(per_segment) == {a.hostname, b.hostname}
    assert value(text, "segment_total_capacity_bytes", segment=a.hostname) == 16 * MiB
    assert value(text, "segment_allocated_bytes", segment=a.hostname) + value(
        text, "segment_allocated_bytes", segment=b.hostname
    ) == value(text, "master_allocated_bytes")
    assert value(text, "master_total_capacity_bytes") == 24 * MiB
    # the reference writes histogram bounds as C++ std::to_string(double)
    assert 'master_value_size_bytes_bucket{le="4096.000000"}' in text
    assert 'master_value_size_bytes_bucket{le="+Inf"} 1' in text
    for name in EXTRA_NAMES:
        assert not any(name == n for n, *_ in CATALOG)


def test_a_master_without_segments_leaves_out_the_per_segment_families() -> None:
    with LocalCluster() as cluster:
        text = scrape(cluster.metrics_url)
    names = set(heads(text))
    assert "segment_allocated_bytes" not in names
    assert names == set(exported_names()) - {
        "segment_allocated_bytes",
        "segment_total_capacity_bytes",
    }
    assert value(text, "master_total_capacity_bytes") == 0
    assert value(text, "master_value_size_bytes_count") == 0


# --- counters follow the operations ----------------------------------------------------------


def test_counters_follow_puts_gets_batches_and_removes(cluster: LocalCluster) -> None:
    c = cluster.client(16 * MiB)
    assert c.put("k", b"x" * 5000)
    assert c.put("k", b"x" * 5000) is False  # exists: the PutStart fails
    assert c.get("k") == b"x" * 5000
    with pytest.raises(ObjectNotFound):
        c.get("missing")
    got = c.get_many(["k", "nope"])
    assert got[0] == b"x" * 5000 and isinstance(got[1], ObjectNotFound)
    assert c.exists("k") and c.exists_many(["k", "z"]) == [True, False]
    c.put_many(["b1", "b2"], [[b"1" * 10], [b"2" * 20]])
    c.put_many(["b1", "b2"], [[b"1" * 10], [b"2" * 20]])  # both exist: a wholly failed batch
    c.put_many(["b2", "b3"], [[b"2" * 20], [b"3" * 30]])  # one exists: a partial success
    c.remove_many(["b1", "zz"])
    c.remove("b2")
    c.upsert("u", b"abc")
    c.upsert("u", b"abcd")
    # two values of the size the single puts reserved buffers for: one
    # BatchCommitSlots, counted as a batch put start and end of two items
    assert c.put_many(["s1", "s2"], [[b"s" * 5000], [b"t" * 5000]]) == [True, True]

    text = scrape(cluster.metrics_url)
    parse(text)
    v = lambda name: value(text, name)  # noqa: E731

    # single RPCs; upserts count as puts, as in the reference; a put through a
    # reserved buffer (CommitSlot) counts as a PutStart and, if it succeeded, a PutEnd
    assert v("master_put_start_requests_total") == 4
    assert v("master_put_start_failures_total") == 1
    assert v("master_put_end_requests_total") == 3
    assert v("master_get_replica_list_requests_total") == 2
    assert v("master_get_replica_list_failures_total") == 1
    assert v("master_exist_key_requests_total") == 1
    # BatchRemove counts each key as a Remove request (and each failed key)
    assert v("master_remove_requests_total") == 3
    assert v("master_remove_failures_total") == 1
    assert v("master_mount_segment_requests_total") >= 1
    assert v("master_ping_requests_total") >= 0
    # batches: Req / partial / whole failures / items / failed items
    assert v("master_batch_put_start_requests_total") == 4
    assert v("master_batch_put_start_failures_total") == 1
    assert v("master_batch_put_start_partial_successes_total") == 1
    assert v("master_batch_put_start_items_total") == 8
    assert v("master_batch_put_start_failed_items_total") == 3
    assert v("master_batch_put_end_items_total") == 5
    assert v("master_batch_get_replica_list_requests_total") == 1
    assert v("master_batch_get_replica_list_partial_successes_total") == 1
    assert v("master_batch_get_replica_list_items_total") == 2
    assert v("master_batch_get_replica_list_failed_items_total") == 1
    assert v("master_batch_exist_key_items_total") == 2
    assert v("master_batch_exist_key_failed_items_total") == 0  # False is an answer
    # reads: hits, their bytes, all reads
    assert v("mem_cache_hit_nums_") == v("valid_get_nums_") == 2
    assert v("mem_cache_hit_bytes_total") == 10000
    assert v("total_get_nums_") == 4
    # gauges against the state
    keys = cluster.master.call(lambda st: sorted(k for k in st.objects if k[:1] != "\x01"))
    assert keys == ["b3", "k", "s1", "s2", "u"]  # (reserved put buffers are not keys)
    assert v("master_key_count") == v("mem_cache_nums_") == 5
    assert v("master_active_clients") == 1
    # the replaced upsert value goes through the discard list (released at the next
    # tick: nobody holds a read lease on it)
    assert v("master_put_start_discard_cnt") == 1
    released = v("master_put_start_release_cnt")
    assert released in (0, 1)
    assert (v("master_put_start_discarded_staging_size") > 0) == (released == 0)
    # value sizes of the objects started: 5000, 10, 20, 30, 3, 4, 5000, 5000 (refused
    # puts count none)
    assert v("master_value_size_bytes_count") == 8
    assert value(text, "master_value_size_bytes_bucket", le="4096.000000") == 5
    assert v("master_value_size_bytes_sum") == 3 * 5000 + 10 + 20 + 30 + 3 + 4
    # pymooncake's per-method view of the same requests
    assert value(text, "master_rpc_calls_total", method="UpsertStart") == 2
    assert value(text, "master_rpc_calls_total", method="CommitSlot") == 2
    assert value(text, "master_rpc_call_failures_total", method="CommitSlot") == 1
    assert value(text, "master_rpc_calls_total", method="BatchCommitSlots") == 1
    cluster.master.call(lambda st: st.validate())


def test_eviction_counters_mirror_into_the_mem_names() -> None:
    config = MasterConfig(default_kv_lease_ttl_ms=50, client_ttl_s=5.0)
    with LocalCluster(config) as cluster:
        cluster.client(2 * MiB)
        writer = cluster.client(0)
        for i in range(24):  # 6 MiB into a 2 MiB segment
            assert writer.put(f"ev-{i}", bytes([i]) * (256 * KiB))

        # background eviction (above the watermark) may run between a scrape and a
        # look at the state: take a scrape between two equal looks
        def look(st: Any) -> tuple[int, int, int]:
            m = st.metrics
            return m.evicted_keys, m.successful_evictions, len(st.objects)

        for _ in range(50):
            before = cluster.master.call(look)
            text = scrape(cluster.metrics_url)
            if cluster.master.call(look) == before:
                break
        else:
            raise AssertionError("eviction never settled")
    evicted, successes, left = before
    assert evicted >= 24 - 8 and left == 24 - evicted
    for suffix in ("", "_mem"):
        assert value(text, f"master_evicted_key_count{suffix}") == evicted
        assert value(text, f"master_evicted_size_bytes{suffix}") >= evicted * 256 * KiB
    for suffix in ("_total", "_mem"):
        assert value(text, f"master_successful_evictions{suffix}") == successes >= 1
        assert value(text, f"master_attempted_evictions{suffix}") >= successes
    assert value(text, "master_put_start_alloc_failures_total") == 0  # eviction made room


# --- scrapes under load -------------------------------------------------------------------------


def test_scrapes_under_load_parse_and_counters_never_go_back(cluster: LocalCluster) -> None:
    owner = cluster.client(32 * MiB)
    writers = [cluster.client(0) for _ in range(3)]
    stop = threading.Event()
    errors: list[BaseException] = []
    done = [0] * len(writers)

    def work(i: int) -> None:
        client = writers[i]
        n = 0
        try:
            while not stop.is_set():
                key = f"load-{i}-{n % 64}"
                client.put(key, bytes([n % 251]) * (1 + n % 9000))
                client.get(key)
                if n % 7 == 0:
                    client.get_many([key, f"absent-{n}"])
                if n % 11 == 0:
                    client.remove_many([f"load-{i}-{(n + 32) % 64}"], force=True)
                n += 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        done[i] = n

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(writers))]
    for t in threads:
        t.start()
    counters = [name for name, kind, status, _ in CATALOG if kind == "counter" and status == LIVE]
    previous: dict[str, float] = {}
    scrapes = 0
    try:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline or scrapes < 10:
            text = scrape(cluster.metrics_url)
            families = parse(text)
            assert "master_key_count" in families
            summary = scrape(cluster.metrics_url, "/metrics/summary")
            assert summary.startswith("role=leader, state=serving, service_ready=true, master={")
            for name in counters:
                now = value(text, name)
                assert now >= previous.get(name, 0), f"{name} went back: {previous[name]} -> {now}"
                previous[name] = now
            scrapes += 1
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors
    assert sum(done) > 30, f"the load did too little work ({done})"
    text = scrape(cluster.metrics_url)
    keys = cluster.master.call(lambda st: st.key_count())  # reserved put buffers are not keys
    assert value(text, "master_key_count") == keys
    hits = cluster.master.call(lambda st: st.metrics.get_hits)
    assert value(text, "mem_cache_hit_nums_") == hits >= sum(done)
    assert owner.segments[0].size == 32 * MiB
    cluster.master.call(lambda st: st.validate())


# --- the summary and its periodic log line -------------------------------------------------------

_SUMMARY = re.compile(
    r"role=leader, state=serving, service_ready=true, master=\{"
    r"Mem Storage: \S+ \S+ / \S+ \S+( \(\d+\.\d%\))? \| "
    r"NVMe-oF SSD: 0 B / 0 B \| SSD Storage: 0 B / 0 B \| "
    r"Keys: \d+ \(soft-pinned: \d+\) \| Clients: \d+ \| "
    r"Requests \(Success/Total per sec\): PutStart=[\d.]+/[\d.]+, PutEnd=[\d.]+/[\d.]+, .*"
    r"EvictDiskReplica=0\.00/0\.00 \| "
    r"Batch Requests \(per sec, Req=Success/PartialSuccess/Total, Item=Success/Total\): "
    r"PutStart:\(Req=[\d.]+/[\d.]+/[\d.]+, Item=[\d.]+/[\d.]+\), .*MarkTaskToComplete:\(Req=0\.00/0\.00\) \| "
    r"Eviction: Success/Attempts=\d+/\d+, AllocFail=\d+, PartialAlloc=0, keys=\d+, size=[^|]+ \| "
    r"Mem Eviction: [^|]+ \| NoF Eviction: [^|]+ \| "
    r"Discard: Released/Total=\d+/\d+, StagingSize=[^|]+ \| "
    r"Promotion: in_flight=0, [^|]+ \| Snapshots: Success=0, Fail=0\}, "
    r"ha=\{HA Metrics Summary: last_seq=0, .*state=0\}"
)


def test_summary_has_the_reference_layout_and_rates_per_window(cluster: LocalCluster) -> None:
    client = cluster.client(8 * MiB)
    svc = cluster.master.service
    first = cluster.master.call(lambda st: summary_text(svc, update=True))
    assert _SUMMARY.fullmatch(first), first
    assert "Keys: 0 (soft-pinned: 0) | Clients: 1" in first
    for i in range(20):
        client.put(f"s-{i}", b"x" * 100)
    time.sleep(0.2)
    text = scrape(cluster.metrics_url, "/metrics/summary")
    assert text.endswith("}\n") and _SUMMARY.fullmatch(text.strip()), text
    m = re.search(r"PutStart=([\d.]+)/([\d.]+)", text)
    assert m and float(m.group(1)) == float(m.group(2)) > 0  # rates since the window began
    assert "Keys: 20 (soft-pinned: 0)" in text


def test_metric_reporting_logs_the_master_admin_metrics_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from pymooncake.cli import master as cli

    async def run() -> None:
        svc = MasterService(metrics_port=None)
        await svc.start()
        try:
            task = asyncio.create_task(cli._report(svc, interval_s=0.05))
            await asyncio.sleep(0.3)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        finally:
            await svc.close()

    with caplog.at_level(logging.INFO, logger="pymooncake.cli.master"):
        asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if "Master Admin Metrics" in r.getMessage()]
    assert len(lines) >= 2
    prefix = "Master Admin Metrics: "
    assert lines[0].startswith(prefix) and _SUMMARY.fullmatch(lines[0][len(prefix) :])


def test_role_is_read_from_the_service(cluster: LocalCluster) -> None:
    svc = cluster.master.service
    svc.role = "standby"
    try:
        with urllib.request.urlopen(cluster.metrics_url + "/role", timeout=5) as resp:
            assert resp.read() == b"standby"
        with urllib.request.urlopen(cluster.metrics_url + "/health", timeout=5) as resp:
            health = json.loads(resp.read())
        assert (health["role"], health["ha_state"]) == ("standby", "standby")
        assert scrape(cluster.metrics_url, "/metrics/summary").startswith(
            "role=standby, state=standby,"
        )
    finally:
        svc.role = "leader"


# --- the reference Grafana dashboard -----------------------------------------------------------


def _dashboard_script() -> Any:
    spec = importlib.util.spec_from_file_location(
        "dashboard_metric_names", SCRIPTS / "dashboard_metric_names.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dashboard_name_extractor_reads_promql() -> None:
    names = _dashboard_script().metric_names
    assert names("rate(master_put_start_requests_total[5m])") == {"master_put_start_requests_total"}
    assert names(
        "100 * rate(valid_get_nums_[5m]) / clamp_min(rate(total_get_nums_[5m]), 1e-9)"
    ) == {"valid_get_nums_", "total_get_nums_"}
    assert names(
        "histogram_quantile(0.95, sum by (le) (rate(master_value_size_bytes_bucket[5m])))"
    ) == {"master_value_size_bytes_bucket"}
    assert names('sum without (instance) (up{job="mooncake-master"}) or on(job) vector(0)') == {
        "up"
    }
    assert names("a_total + b offset 5m") == {"a_total", "b"}


def _base(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in {n for n, *_ in CATALOG}:
            return name[: -len(suffix)]
    return name


def test_every_reference_dashboard_query_finds_its_metrics() -> None:
    doc = json.loads((DATA / "reference_dashboard_metrics.json").read_text())
    assert len(doc["panels"]) == 51
    config = MasterConfig(default_kv_lease_ttl_ms=50, client_ttl_s=5.0)
    with LocalCluster(config) as cluster:
        cluster.client(2 * MiB)
        client = cluster.client(0)
        for i in range(12):  # enough to evict
            client.put(f"d-{i}", bytes([i]) * (256 * KiB))
        client.get(f"d-{11}")
        text = scrape(cluster.metrics_url)
    scraped = {name for name, _, _ in raw_samples(text)}
    status = {name: st for name, _, st, _ in CATALOG}
    missing: dict[str, list[str]] = {}
    for panel in doc["panels"]:
        for name in panel["metrics"]:
            if name in scraped:
                continue
            # absent only where the reference is absent too (feature not in pymooncake)
            reason = status.get(_base(name))
            assert reason in ABSENT_REASONS, (
                f"panel {panel['id']} queries {name}, which a pymooncake master does not "
                "export and the catalog does not explain"
            )
            missing.setdefault(reason, []).append(name)
    # what stays blank: NoF and snapshot panels, as on a reference master without them
    assert set(missing) <= {"nof", "snapshot"}
    # 39 panels find every metric; of the other 12, 3 also show their memory-tier series
    # (evictions), 9 are NoF- or snapshot-only
    answered = sum(1 for p in doc["panels"] if all(n in scraped for n in p["metrics"]))
    partly = sum(
        1
        for p in doc["panels"]
        if any(n in scraped for n in p["metrics"]) and not all(n in scraped for n in p["metrics"])
    )
    assert (answered, partly) == (39, 3), f"{answered} panels answered, {partly} partly"
