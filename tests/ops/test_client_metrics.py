"""Client and engine metrics: the reference's names, exact values after real puts
and gets, the client HTTP server (``setup(..., enable_client_http_server=True)``,
``MOONCAKE_*`` variables, ``mooncake_client``), every scrape validated with
``prometheus_client``'s parser, and scrapes under load."""

from __future__ import annotations

import http.client
import json
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mooncake.store import MooncakeDistributedStore
from pymooncake._metrics import Counter, CounterFamily, Histogram, HistogramFamily, render
from pymooncake.config import EngineConfig
from pymooncake.errors import TransferFailed
from pymooncake.store import StoreClient
from pymooncake.store._http import ClientHttpServer, client_http_settings
from pymooncake.store._metrics import ClientMetrics, ClientMetricsSettings
from pymooncake.testing import LocalCluster
from pymooncake.transfer import TransferEngine, TransferRequest

LOCAL = "127.0.0.1"
HTTP_STARTED = re.compile(r"Client HTTP server started on http://[0-9.]+:([0-9]+) ")


def parse(text: str) -> dict[str, Any]:
    """name -> family, through prometheus_client (raises on malformed text)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], name: str, sample: str | None = None, **labels: str) -> float:
    """A sample's value (counter samples are ``<name>_total`` after parsing)."""
    fam = fams[name] if name in fams else fams[name.removesuffix("_total")]
    wanted = sample or (fam.name + "_total" if fam.type == "counter" else name)
    for s in fam.samples:
        if s.name == wanted and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise KeyError(f"{wanted}{labels} not in {[(s.name, s.labels) for s in fam.samples]}")


def total(fams: dict[str, Any], name: str) -> float:
    """Sum of a counter's samples over every label set."""
    fam = fams[name.removesuffix("_total")]
    return sum(float(s.value) for s in fam.samples if s.name == fam.name + "_total")


def get(port: int, path: str) -> tuple[int, str, str]:
    c = http.client.HTTPConnection(LOCAL, port, timeout=10)
    try:
        c.request("GET", path)
        resp = c.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        c.close()


# --- primitives --------------------------------------------------------------------------


def test_counters_from_many_threads_lose_nothing_and_dead_threads_fold() -> None:
    c = Counter()
    h = Histogram((10, 100))

    def work() -> None:
        for i in range(20_000):
            c.inc(2)
            h.observe(i % 200)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.value == 8 * 40_000
    buckets, total, count = h.snapshot()
    assert count == 160_000
    assert buckets == [8 * 100 * 11, 8 * 100 * 90, 8 * 100 * 99]  # le=10, le=100, +Inf
    assert total == 8 * 100 * sum(range(200))
    assert c._cells._cells == []  # the ended threads' cells were folded into one
    assert c.value == 8 * 40_000


def test_render_is_valid_prometheus_text_with_inclusive_buckets() -> None:
    fam = HistogramFamily("x_latency", "help \\ with\nnewline", (50, 100), ["op"])
    fam.labels('we"ird').observe(50)
    fam.labels('we"ird').observe(51)
    cnt = CounterFamily("x_count", "a counter")
    cnt.labels().inc(3)
    fams = parse(render([fam, cnt]))
    assert value(fams, "x_latency", "x_latency_bucket", op='we"ird', le="50") == 1
    assert value(fams, "x_latency", "x_latency_bucket", op='we"ird', le="100") == 2
    assert value(fams, "x_latency", "x_latency_bucket", op='we"ird', le="+Inf") == 2
    assert value(fams, "x_latency", "x_latency_sum", op='we"ird') == 101
    assert value(fams, "x_count") == 3


def test_settings_from_the_environment() -> None:
    assert ClientMetricsSettings.from_env({}) == ClientMetricsSettings()
    s = ClientMetricsSettings.from_env(
        {
            "MC_STORE_CLIENT_METRIC": "0",
            "MC_STORE_CLIENT_METRIC_INTERVAL": "5",
            "MC_STORE_CLIENT_METRIC_BANDWIDTH": "false",
            "MC_STORE_CLUSTER_ID": "c1",
        }
    )
    assert s == ClientMetricsSettings(False, 5, False, "c1")
    assert not ClientMetricsSettings.from_env({"MC_STORE_CLIENT_METRIC": "maybe"}).enabled
    assert ClientMetricsSettings.from_env({"MC_STORE_CLIENT_METRIC_INTERVAL": "x"}).interval_s == 0
    assert client_http_settings(None, None, {}) == (False, 9300)
    assert client_http_settings(True, 0, {}) == (True, 0)
    env = {"MOONCAKE_ENABLE_CLIENT_HTTP_SERVER": "true", "MOONCAKE_CLIENT_HTTP_PORT": "9311"}
    assert client_http_settings(False, 9300, env) == (True, 9311)
    with pytest.raises(ValueError, match="Invalid client HTTP server port: 70000"):
        client_http_settings(True, 70000, {})


def test_cluster_id_labels_every_metric() -> None:
    m = ClientMetrics(ClientMetricsSettings(cluster_id="prod"))
    m.rpc("Ping")[0].inc()
    fams = parse(m.render())
    assert value(fams, "mooncake_client_rpc_count", rpc_name="Ping", cluster_id="prod") == 1
    assert value(fams, "mooncake_transfer_read_bytes", cluster_id="prod") == 0


# --- the store client -----------------------------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster() as c:
        yield c


def test_store_client_records_rpcs_transfers_and_operations(cluster: LocalCluster) -> None:
    owner = cluster.client(32 << 20)
    reader = cluster.client(0)
    assert reader.metrics is not None
    value_a, value_b = b"a" * 5000, b"b" * 3000
    assert reader.put("k1", value_a)  # lands in the owner's segment (a TCP transfer)
    assert reader.get("k1") == value_a
    reader.put_many(["k2", "k3"], [[value_b], [value_b]], bytes_api=True)
    assert reader.get_many(["k2", "k3"]) == [value_b, value_b]
    buf = bytearray(5000)
    assert reader.get_into("k1", buf) == 5000
    fams = parse(reader.metrics.render())
    assert value(fams, "mooncake_transfer_write_bytes") == 5000 + 2 * 3000
    assert value(fams, "mooncake_transfer_read_bytes") == 5000 + 2 * 3000 + 5000
    assert value(fams, "mooncake_transfer_put_latency", "mooncake_transfer_put_latency_count") == 1
    assert value(fams, "mooncake_transfer_get_latency", "mooncake_transfer_get_latency_count") == 2
    batch_put = "mooncake_transfer_batch_put_latency"
    assert value(fams, batch_put, batch_put + "_count") == 1
    # a single put and a batch of one size: a reservation each (of one buffer,
    # then of two) and its commit (store/_slots.py)
    assert value(fams, "mooncake_client_rpc_count", rpc_name="ReserveSlots") == 2
    assert value(fams, "mooncake_client_rpc_count", rpc_name="CommitSlot") == 1
    assert value(fams, "mooncake_client_rpc_count", rpc_name="BatchCommitSlots") == 1
    assert value(fams, "mooncake_client_rpc_count", rpc_name="GetReplicaList") == 2
    assert value(fams, "mooncake_client_rpc_count", rpc_name="ServiceReady") == 1
    rpc_latency = "mooncake_client_rpc_latency"
    assert value(fams, rpc_latency, rpc_latency + "_count", rpc_name="CommitSlot") == 1
    ops = "mooncake_transfer_write_operation_count"
    assert value(fams, ops, op_name="put") == 1
    assert value(fams, ops, op_name="put_batch") == 1
    reads = "mooncake_transfer_read_operation_bytes"
    assert value(fams, reads, op_name="get") == 5000
    assert value(fams, reads, op_name="get_batch") == 6000
    assert value(fams, reads, op_name="get_into") == 5000
    # the engine under it counted the same bytes, per transport
    assert reader.engine.metrics is not None  # the store client turned them on
    efams = parse(reader.engine.metrics.render())
    assert total(efams, "tent_write_bytes_total") == 5000 + 2 * 3000
    assert total(efams, "tent_read_bytes_total") == 5000 + 2 * 3000 + 5000
    summary = reader.metrics.summary()
    assert "Total Write: 10.74 KB" in summary
    assert "CommitSlot: count=1" in summary
    assert "put_batch: count=1, bytes=5.86 KB" in summary
    assert owner.metrics is not None and owner.metrics.read_bytes.value == 0


def test_metrics_can_be_turned_off(cluster: LocalCluster) -> None:
    client = cluster.client(0, metrics=ClientMetricsSettings(enabled=False))
    assert client.metrics is None
    assert client.master._metrics is None


def test_periodic_report_logs_the_summary(cluster: LocalCluster, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="pymooncake.store.metrics")
    client = cluster.client(16 << 20, metrics=ClientMetricsSettings(interval_s=1))
    client.put("k", b"x" * 100)
    deadline = threading.Event()
    for _ in range(40):
        if any("Client Metrics Report:" in r.getMessage() for r in caplog.records):
            break
        deadline.wait(0.1)
    text = next(r.getMessage() for r in caplog.records if "Client Metrics Report" in r.getMessage())
    assert "=== Interval Throughput Summary ===" in text and "Write Throughput:" in text


# --- the engine ------------------------------------------------------------------------------


def test_engine_metrics_count_bytes_requests_and_failures(config: EngineConfig) -> None:
    cfg = config.replace(same_host_transport=False, connect_timeout_s=0.5)
    with (
        TransferEngine(LOCAL, "P2PHANDSHAKE", config=cfg) as a,
        TransferEngine(LOCAL, "P2PHANDSHAKE", config=cfg) as b,
    ):
        assert a.metrics is None  # off until someone exports them
        metrics = a.enable_metrics()
        assert a.enable_metrics() is metrics
        src = a.allocate(1 << 20)
        dst = b.allocate(1 << 20)
        a.transfer(b.segment_name, [TransferRequest.write(src.addr, dst.addr, 4096)] * 3)
        a.transfer(b.segment_name, [TransferRequest.read(src.addr, dst.addr, 65536)])
        batch = a.allocate_batch(4)
        a.submit(batch, [TransferRequest.write(src.addr, dst.addr, 1000)], segment=b.segment_name)
        assert a.wait_batch(batch, 10)
        a.free_batch(batch)
        b.close()  # its descriptor stays cached: the transport fails the request
        with pytest.raises(TransferFailed):
            a.transfer(b.segment_name, [TransferRequest.write(src.addr, dst.addr, 10)])
        fams = parse(a.metrics.render())
    assert value(fams, "tent_write_bytes_total", transport="tcp") == 3 * 4096 + 1000
    assert value(fams, "tent_write_requests_total", transport="tcp") == 5
    assert value(fams, "tent_write_failures_total", transport="tcp") == 1
    assert value(fams, "tent_read_bytes_total", transport="tcp") == 65536
    assert value(fams, "tent_read_latency_us", "tent_read_latency_us_count", transport="tcp") == 1
    sizes = "tent_write_size_bytes"
    assert value(fams, sizes, sizes + "_bucket", transport="tcp", le="1024") == 2  # 1000, 10
    assert value(fams, sizes, sizes + "_bucket", transport="tcp", le="4096") == 5
    assert "tcp: Read: 64.00 KB (1 reqs, 0 fails)" in metrics.summary()


def test_engine_metrics_split_a_mixed_group_by_direction() -> None:
    from pymooncake.transfer._metrics import EngineMetrics
    from pymooncake.transfer.transports import Slice

    m = EngineMetrics()
    view = memoryview(bytearray(100))
    slices = [Slice(0, False, view[:10], 0), Slice(1, True, view[:20], 0), Slice(2, False, view, 0)]
    m.record("tcp", slices, [None, RuntimeError("x"), None], 7)
    fams = parse(m.render())
    assert value(fams, "tent_read_requests_total", transport="tcp") == 2
    assert value(fams, "tent_read_bytes_total", transport="tcp") == 110
    assert value(fams, "tent_write_requests_total", transport="tcp") == 1
    assert value(fams, "tent_write_failures_total", transport="tcp") == 1
    assert value(fams, "tent_read_size_bytes", "tent_read_size_bytes_count", transport="tcp") == 2
    assert value(fams, "tent_write_size_bytes", "tent_write_size_bytes_count", transport="tcp") == 1
    assert value(fams, "tent_read_latency_us", "tent_read_latency_us_sum", transport="tcp") == 14


# --- the HTTP server ---------------------------------------------------------------------------


def setup_store(
    cluster: LocalCluster, caplog: Any, **kw: Any
) -> tuple[MooncakeDistributedStore, int]:
    caplog.set_level(logging.INFO, logger="pymooncake.store.http")
    store = MooncakeDistributedStore()
    rc = store.setup(
        LOCAL, cluster.metadata_url, 16 << 20, 16 << 20, "tcp", "", cluster.master_address, **kw
    )
    assert rc == 0
    port = 0
    for r in caplog.records:
        m = HTTP_STARTED.search(r.getMessage())
        if m:
            port = int(m.group(1))
    return store, port


@pytest.fixture
def store_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MC_TCP_BIND_ADDRESS", LOCAL)


def test_setup_starts_the_client_http_server(
    cluster: LocalCluster, caplog: Any, store_env: None
) -> None:
    store, port = setup_store(cluster, caplog, enable_client_http_server=True, client_http_port=0)
    try:
        assert port
        assert store.put("key", np.arange(1000, dtype=np.uint8).tobytes()) == 0
        assert len(store.get("key")) == 1000
        status, ctype, body = get(port, "/health")
        assert (status, json.loads(body)) == (200, {"status": "healthy", "code": 0})
        assert ctype.startswith("application/json")
        status, ctype, body = get(port, "/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        fams = parse(body)
        assert value(fams, "mooncake_transfer_write_operation_count", op_name="put") == 1
        assert value(fams, "mooncake_client_rpc_count", rpc_name="GetReplicaList") == 1
        assert "tent_write_bytes" in fams  # the engine's families follow the client's
        status, _, text = get(port, "/metrics/summary")
        assert status == 200 and text.startswith("Client Metrics Summary\n")
        assert "=== RPC Metrics Summary ===" in text
        assert get(port, "/nope")[0] == 404
    finally:
        store.close()
    with pytest.raises(OSError):
        get(port, "/health")  # closed with the store


def test_metrics_off_answers_503(
    cluster: LocalCluster, caplog: Any, store_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MC_STORE_CLIENT_METRIC", "0")
    monkeypatch.setenv("MOONCAKE_ENABLE_CLIENT_HTTP_SERVER", "1")
    monkeypatch.setenv("MOONCAKE_CLIENT_HTTP_PORT", "0")
    store, port = setup_store(cluster, caplog)
    try:
        assert get(port, "/metrics") == (503, "text/plain; charset=utf-8", "metrics not available")
        assert get(port, "/metrics/summary")[0] == 503
        assert get(port, "/health")[0] == 200
    finally:
        store.close()


def test_bad_port_fails_setup_and_a_taken_port_only_warns(
    cluster: LocalCluster, caplog: Any, store_env: None
) -> None:
    store = MooncakeDistributedStore()
    rc = store.setup(
        LOCAL, cluster.metadata_url, 0, 16 << 20, "tcp", "", cluster.master_address,
        enable_client_http_server=True, client_http_port=70000,
    )  # fmt: skip
    assert rc == -600  # INVALID_PARAMS, as the reference
    assert "Invalid client HTTP server port: 70000" in caplog.text
    with ClientHttpServer(cluster.client(0), LOCAL, 0) as taken:
        store, port = setup_store(
            cluster, caplog, enable_client_http_server=True, client_http_port=taken.port
        )
        try:
            assert port == 0
            assert "Failed to start client HTTP server on port" in caplog.text
            assert "bind address already in use" in caplog.text
            assert store.put("k", b"v") == 0  # the client works without the endpoints
        finally:
            store.close()


def test_health_reports_an_unreachable_master(caplog: Any) -> None:
    cluster = LocalCluster()
    client = cluster.client(0, ping_interval_s=0.05)
    try:
        with ClientHttpServer(client, LOCAL, 0) as server:
            assert get(server.port, "/health")[0] == 200
            cluster.master.close()
            for _ in range(100):
                status, _, body = get(server.port, "/health")
                if status == 503:
                    break
                threading.Event().wait(0.05)
            assert (status, json.loads(body)) == (503, {"status": "master_unreachable", "code": 2})
            client.close()
            status, _, body = get(server.port, "/health")
            assert json.loads(body) == {"status": "not_initialized", "code": 1}
    finally:
        cluster.close()


def test_scrapes_under_load_stay_valid_and_monotonic(cluster: LocalCluster) -> None:
    cluster.client(64 << 20)
    client: StoreClient = cluster.client(0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def load(tid: int) -> None:
        n = 0
        try:
            while not stop.is_set():
                key = f"load-{tid}-{n % 50}"
                client.put(key, b"z" * 2048)
                client.get(key)
                client.remove(key, force=True)
                n += 1
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=load, args=(t,)) for t in range(3)]
    with ClientHttpServer(client, LOCAL, 0) as server:
        for w in workers:
            w.start()
        last = -1.0
        try:
            for _ in range(15):
                status, _, body = get(server.port, "/metrics")
                assert status == 200
                fams = parse(body)
                seen = (
                    value(fams, "mooncake_client_rpc_count", rpc_name="Remove")
                    if any(
                        s.labels.get("rpc_name") == "Remove"
                        for s in fams["mooncake_client_rpc_count"].samples
                    )
                    else 0.0
                )
                assert seen >= last
                last = seen
                threading.Event().wait(0.02)
        finally:
            stop.set()
            for w in workers:
                w.join()
    assert not errors, errors
    assert last > 0
