"""The etcd client against a real etcd: key-value, transactions, leases,
watches, failover between endpoints, timeouts and the errors an operator reads."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pymooncake._etcd import (
    Compare,
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EtcdLeaseNotFound,
    EtcdUnreachable,
    KeepAlive,
    OpDelete,
    OpGet,
    OpPut,
    RangeResult,
)
from pymooncake._etcd import _http as etcd_http
from pymooncake.testing import EtcdCluster
from pymooncake.transfer.metadata.server import MetadataServer

LOCAL = "127.0.0.1"


@pytest.fixture
def key(request: pytest.FixtureRequest) -> str:
    return f"test/{request.node.name}/{time.monotonic_ns()}"


# ---------------------------------------------------------------------------------
# endpoints that misbehave
# ---------------------------------------------------------------------------------


@contextlib.contextmanager
def refused_endpoint() -> Iterator[str]:
    """host:port where connections are refused (bound, never listening)."""
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        yield f"{LOCAL}:{s.getsockname()[1]}"


@contextlib.contextmanager
def silent_endpoint() -> Iterator[str]:
    """host:port that accepts connections (in the backlog) and never answers."""
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        s.listen(16)
        yield f"{LOCAL}:{s.getsockname()[1]}"


@contextlib.contextmanager
def hang_up_endpoint() -> Iterator[tuple[str, list[bytes]]]:
    """host:port that reads a request and closes without answering; yields the
    endpoint and the requests it received."""
    srv = socket.socket()
    srv.bind((LOCAL, 0))
    srv.listen(16)
    srv.settimeout(0.1)
    seen: list[bytes] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2.0)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                seen.append(data)

    t = threading.Thread(target=run, name="hang-up-endpoint")
    t.start()
    try:
        yield f"{LOCAL}:{srv.getsockname()[1]}", seen
    finally:
        stop.set()
        t.join()
        srv.close()


# ---------------------------------------------------------------------------------
# key-value and transactions
# ---------------------------------------------------------------------------------


def test_put_get_delete_and_revisions(etcd_client: EtcdClient, key: str) -> None:
    first = etcd_client.put(key, b"one")
    second = etcd_client.put(key, b"two", prev_kv=True)
    assert second.prev_kv is not None and second.prev_kv.value == b"one"
    kv = etcd_client.get(key)
    assert kv is not None and kv.value == b"two" and kv.version == 2
    assert kv.create_revision == first.revision and kv.mod_revision == second.revision
    old = etcd_client.get(key, revision=first.revision)
    assert old is not None and old.value == b"one"  # a read in the past
    gone = etcd_client.delete(key, prev_kv=True)
    assert gone.deleted == 1 and gone.prev_kvs[0].value == b"two"
    assert etcd_client.get(key) is None
    assert etcd_client.delete(key).deleted == 0


def test_prefix_range_and_delete(etcd_client: EtcdClient, key: str) -> None:
    for name in ("b", "a", "c/d"):
        etcd_client.put(f"{key}/{name}", name.encode())
    etcd_client.put(f"{key}0", b"outside")  # shares the text prefix, not the "/" one
    result = etcd_client.get_prefix(f"{key}/")
    assert [kv.key for kv in result.kvs] == [f"{key}/{n}".encode() for n in ("a", "b", "c/d")]
    assert result.count == 3
    limited = etcd_client.get_prefix(f"{key}/", limit=2, keys_only=True)
    assert limited.more and [kv.value for kv in limited.kvs] == [b"", b""]
    assert etcd_client.delete_prefix(f"{key}/").deleted == 3
    assert etcd_client.get(f"{key}0") is not None
    etcd_client.delete(f"{key}0")


def test_create_if_absent(etcd_client: EtcdClient, key: str) -> None:
    won = etcd_client.create(key, b"mine")
    assert won.created and won.existing is None
    kv = etcd_client.get(key)
    assert kv is not None and kv.create_revision == won.revision
    lost = etcd_client.create(key, b"theirs")
    assert not lost.created and lost.existing is not None and lost.existing.value == b"mine"
    etcd_client.delete(key)


def test_concurrent_create_has_one_winner(etcd_cluster: EtcdCluster, key: str) -> None:
    clients = [EtcdClient(etcd_cluster.endpoints) for _ in range(8)]
    barrier = threading.Barrier(len(clients))
    results: list[bool] = [False] * len(clients)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = clients[i].create(key, str(i).encode()).created

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count(True) == 1
        kv = clients[0].get(key)
        assert kv is not None and kv.value == str(results.index(True)).encode()
        clients[0].delete(key)
    finally:
        for c in clients:
            c.close()


def test_compare_and_swap_and_delete(etcd_client: EtcdClient, key: str) -> None:
    etcd_client.put(key, b"a")
    assert not etcd_client.compare_and_swap(key, b"x", b"b")
    assert etcd_client.compare_and_swap(key, b"a", b"b")
    kv = etcd_client.get(key)
    assert kv is not None and kv.value == b"b"
    assert not etcd_client.compare_and_delete(key, value=b"a")
    assert not etcd_client.compare_and_delete(key, mod_revision=kv.mod_revision - 1)
    assert etcd_client.compare_and_delete(key, value=b"b", mod_revision=kv.mod_revision)
    assert etcd_client.get(key) is None
    with pytest.raises(ValueError):
        etcd_client.compare_and_delete(key)


def test_txn_compares_every_target(etcd_client: EtcdClient, key: str) -> None:
    put = etcd_client.put(key, b"v")
    lease = etcd_client.lease_grant(30)
    try:
        other = f"{key}/leased"
        etcd_client.put(other, b"x", lease=lease.id)
        ok = etcd_client.txn(
            [
                Compare.version(key, "==", 1),
                Compare.create_revision(key, "==", put.revision),
                Compare.mod_revision(key, "<", put.revision + 1),
                Compare.value(key, "==", b"v"),
                Compare.lease(other, "==", lease.id),
            ],
            [OpPut(key, b"w"), OpGet(key), OpDelete(other)],
            [OpGet(key)],
        )
        assert ok.succeeded and len(ok.responses) == 3
        got = ok.responses[1]
        assert isinstance(got, RangeResult) and got.kvs[0].value == b"w"
        failed = etcd_client.txn(
            [Compare.value(key, "==", b"v")], [OpPut(key, b"never")], [OpGet(key)]
        )
        assert not failed.succeeded
        assert (
            isinstance(failed.responses[0], RangeResult)
            and failed.responses[0].kvs[0].value == b"w"
        )
    finally:
        etcd_client.lease_revoke(lease.id)
        etcd_client.delete(key)


def test_etcd_refusals_are_errors_with_etcds_reason(etcd_client: EtcdClient) -> None:
    with pytest.raises(EtcdError, match="key is not provided"):
        etcd_client.put(b"", b"x")


# ---------------------------------------------------------------------------------
# leases
# ---------------------------------------------------------------------------------


def test_lease_grant_renew_ttl_revoke(etcd_client: EtcdClient, key: str) -> None:
    lease = etcd_client.lease_grant(10)
    assert lease.ttl_s == 10 and lease.id > 0
    etcd_client.put(key, b"x", lease=lease.id)
    assert etcd_client.lease_keepalive(lease.id) == 10
    status = etcd_client.lease_time_to_live(lease.id, keys=True)
    assert 0 < status.ttl_s <= 10 and status.granted_ttl_s == 10 and status.keys == (key.encode(),)
    assert etcd_client.lease_revoke(lease.id) is True
    assert etcd_client.get(key) is None  # the key went with its lease
    assert etcd_client.lease_revoke(lease.id) is False
    assert etcd_client.lease_time_to_live(lease.id).ttl_s == -1
    with pytest.raises(EtcdLeaseNotFound):
        etcd_client.lease_keepalive(lease.id)
    with pytest.raises(EtcdLeaseNotFound):
        etcd_client.put(key, b"y", lease=lease.id)
    with pytest.raises(EtcdLeaseNotFound):
        etcd_client.create(key, b"y", lease=lease.id)


def test_keep_alive_holds_a_short_lease_and_revokes_on_close(
    etcd_client: EtcdClient, key: str
) -> None:
    sent = time.monotonic()
    lease = etcd_client.lease_grant(2)
    keep = etcd_client.keep_alive(lease.id, lease.ttl_s, interval_s=0.3, granted_at=sent)
    etcd_client.put(key, b"x", lease=lease.id)
    first_deadline = keep.deadline
    time.sleep(3.0)  # longer than the TTL
    assert keep.alive and keep.renewals >= 5
    assert keep.deadline > first_deadline
    assert keep.deadline <= time.monotonic() + 2.0  # never beyond what etcd granted
    assert etcd_client.get(key) is not None
    keep.close(revoke=True)
    assert etcd_client.get(key) is None
    assert not keep.lost  # closing is not losing


def test_keep_alive_reports_a_revoked_lease_once(etcd_client: EtcdClient) -> None:
    lease = etcd_client.lease_grant(5)
    reasons: list[str] = []
    lost = threading.Event()

    def on_lost(reason: str) -> None:
        reasons.append(reason)
        lost.set()

    keep = etcd_client.keep_alive(lease.id, lease.ttl_s, interval_s=0.1, on_lost=on_lost)
    try:
        etcd_client.lease_revoke(lease.id)  # e.g. an operator, or etcd after a long pause
        assert lost.wait(3.0)
        assert not keep.alive and keep.lost and keep.remaining_s() == 0.0
        assert len(reasons) == 1 and "gone" in reasons[0]
        with pytest.raises(EtcdLeaseNotFound):
            keep.renew_now()
    finally:
        keep.close()


def test_keep_alive_loses_the_lease_when_etcd_stops_answering() -> None:
    """A paused etcd (SIGSTOP): renewals time out, and the lease is declared
    lost no later than its TTL after the last successful renewal."""
    with EtcdCluster() as cluster, EtcdClient(cluster.endpoints, timeout_s=0.5) as client:
        lease = client.lease_grant(2)
        lost = threading.Event()
        keep = client.keep_alive(
            lease.id, lease.ttl_s, interval_s=0.2, on_lost=lambda r: lost.set()
        )
        time.sleep(0.5)
        deadline = keep.deadline
        cluster.members[0].pause()
        try:
            assert lost.wait(4.0)
            assert time.monotonic() >= deadline - 0.05  # not before it had to
            assert keep.failures >= 1 and "not renewed within its TTL" in keep.lost_reason
        finally:
            cluster.members[0].resume()
            keep.close()


def test_keep_alive_with_a_safety_margin_ends_its_deadline_early() -> None:
    """A leader's lease (safety_s): the deadline stays safety_s before what etcd
    granted, so a holder cut off from etcd gives up that much earlier."""
    with EtcdCluster() as cluster, EtcdClient(cluster.endpoints, timeout_s=0.5) as client:
        sent = time.monotonic()
        lease = client.lease_grant(2)
        lost = threading.Event()
        keep = client.keep_alive(
            lease.id,
            lease.ttl_s,
            interval_s=0.2,
            on_lost=lambda r: lost.set(),
            granted_at=sent,
            safety_s=0.5,
        )
        try:
            assert keep.deadline <= sent + lease.ttl_s - 0.5 + 1e-6
            time.sleep(0.5)
            assert keep.renewals >= 1
            assert keep.remaining_s() <= lease.ttl_s - 0.5
            now = time.monotonic()
            deadline = keep.deadline  # the last renewal was sent before now
            assert deadline <= now + lease.ttl_s - 0.5 + 1e-6
            cluster.members[0].pause()
            try:
                assert lost.wait(4.0)
                gave_up = time.monotonic()
            finally:
                cluster.members[0].resume()
            assert deadline - 0.05 <= gave_up < deadline + 1.0
        finally:
            keep.close()
    with pytest.raises(ValueError, match="safety"):
        KeepAlive(None, 1, 2.0, interval_s=1.0, safety_s=1.0)  # type: ignore[arg-type]


def test_one_shot_renewal_driven_by_the_caller(etcd_client: EtcdClient) -> None:
    """What a leader's warm-up does: renew in its own loop and check each one."""
    lease = etcd_client.lease_grant(2)
    keep = etcd_client.keep_alive(lease.id, lease.ttl_s, interval_s=1.9)
    try:
        for _ in range(3):
            assert keep.renew_now() > 1.5
            time.sleep(0.2)
    finally:
        keep.close(revoke=True)


# ---------------------------------------------------------------------------------
# watches
# ---------------------------------------------------------------------------------


def test_watch_prefix_from_now_and_from_a_revision(etcd_client: EtcdClient, key: str) -> None:
    before = etcd_client.put(f"{key}/old", b"0")
    watch = etcd_client.watch(f"{key}/", prefix=True, prev_kv=True)
    try:
        assert watch.wait_created(5.0)
        created = watch.get(5.0)
        assert created is not None and created.created
        etcd_client.put(f"{key}/a", b"1")
        etcd_client.put(f"{key}/a", b"2")
        etcd_client.delete(f"{key}/a")
        etcd_client.put(f"{key}0", b"outside")
        events = []
        while len(events) < 3:
            resp = watch.get(5.0)
            assert resp is not None, events
            events += resp.events
        assert [(e.type, e.kv.value) for e in events] == [
            ("PUT", b"1"),
            ("PUT", b"2"),
            ("DELETE", b""),
        ]
        assert events[1].prev_kv is not None and events[1].prev_kv.value == b"1"
        assert watch.revision == events[-1].kv.mod_revision
    finally:
        watch.close()
    # from a past revision: the history is replayed
    replay = etcd_client.watch(f"{key}/", prefix=True, start_revision=before.revision)
    try:
        seen = []
        while len(seen) < 4:
            resp = replay.get(5.0)
            assert resp is not None, seen
            seen += [(e.type, e.kv.key) for e in resp.events]
        assert seen[0] == ("PUT", f"{key}/old".encode())
    finally:
        replay.close()
    # once closed, iterating hands out what is left and stops instead of blocking
    start = time.monotonic()
    leftover = list(replay)
    assert time.monotonic() - start < 1.0 and not any(r.canceled for r in leftover)
    assert replay.get(0.1) is None
    etcd_client.delete_prefix(key)


def test_watch_callback_mode(etcd_client: EtcdClient, key: str) -> None:
    got: list[bytes] = []
    done = threading.Event()

    def on_response(resp: object) -> None:
        for e in getattr(resp, "events", ()):
            got.append(e.kv.value)
            if len(got) == 2:
                done.set()

    watch = etcd_client.watch(key, on_response=on_response)
    try:
        assert watch.wait_created(5.0)
        etcd_client.put(key, b"a")
        etcd_client.put(key, b"b")
        assert done.wait(5.0) and got == [b"a", b"b"]
    finally:
        watch.close()
        etcd_client.delete(key)


def test_watch_of_compacted_history_is_canceled(etcd_client: EtcdClient, key: str) -> None:
    first = etcd_client.put(key, b"1")
    last = etcd_client.put(key, b"2")
    etcd_client.call("/v3/kv/compaction", {"revision": str(last.revision)}, what="compaction")
    watch = etcd_client.watch(key, start_revision=first.revision)
    try:
        responses = list(watch)  # ends by itself
        assert responses[-1].canceled and responses[-1].compact_revision == last.revision
        assert watch.canceled and watch.compact_revision == last.revision
    finally:
        watch.close()
    with pytest.raises(EtcdCompacted):
        etcd_client.get(key, revision=first.revision)
    etcd_client.delete(key)


def test_watch_resumes_across_member_failures_without_gaps() -> None:
    """Three members; the member a watch streams from is stopped and restarted
    twice while writes go on through the others: every change arrives once, in
    order, and the watch reports where it is."""
    with EtcdCluster(3) as cluster, EtcdClient(cluster.endpoints) as client:
        watch = client.watch("ha/", prefix=True)
        try:
            assert watch.wait_created(10.0)
            written = []
            for round_ in range(2):
                served_by = client.endpoint_order()[0]
                member = next(m for m in cluster.members if m.endpoint == str(served_by))
                member.stop()
                for i in range(5):
                    value = f"{round_}-{i}".encode()
                    client.put(f"ha/{round_}/{i}", value)  # fails over to a live member
                    written.append(value)
                member.start()
            seen: list[bytes] = []
            deadline = time.monotonic() + 20.0
            while len(seen) < len(written) and time.monotonic() < deadline:
                resp = watch.get(1.0)
                if resp is not None:
                    seen += [e.kv.value for e in resp.events]
            assert seen == written
            assert watch.reconnects >= 2
            assert watch.revision == client.get("ha/1/4").mod_revision  # type: ignore[union-attr]
        finally:
            watch.close()


# ---------------------------------------------------------------------------------
# endpoints, failover, timeouts, errors
# ---------------------------------------------------------------------------------


def test_failover_to_the_next_endpoint_and_stay_there(etcd_cluster: EtcdCluster) -> None:
    with refused_endpoint() as dead, EtcdClient(f"{dead};{etcd_cluster.endpoints}") as client:
        client.put("failover", b"1")
        assert str(client.endpoint_order()[0]) == etcd_cluster.endpoints
        assert client.get("failover") is not None
        client.delete("failover")


def test_every_endpoint_down_names_each_with_the_fix() -> None:
    with (
        refused_endpoint() as a,
        refused_endpoint() as b,
        EtcdClient(f"{a};{b}") as client,
        pytest.raises(EtcdUnreachable) as info,
    ):
        client.get("x")
    text = str(info.value)
    assert text.startswith("Error from etcd client")
    assert a in text and b in text and "connection refused" in text
    assert "etcd is not running on this host" in text and "curl http://" in text
    assert not info.value.maybe_applied


def test_silent_endpoint_times_out_and_the_next_one_answers(etcd_cluster: EtcdCluster) -> None:
    with silent_endpoint() as silent:
        with EtcdClient(f"{silent};{etcd_cluster.endpoints}", timeout_s=0.3) as client:
            start = time.monotonic()
            assert client.get("nothing") is None
            assert time.monotonic() - start < 2.0
        with EtcdClient(silent, timeout_s=0.3) as client, pytest.raises(EtcdUnreachable) as info:
            client.get("x")
    assert "no answer within 0.3 s" in str(info.value)


def test_a_lost_reply_repeats_reads_but_not_transactions(
    etcd_cluster: EtcdCluster, key: str
) -> None:
    with hang_up_endpoint() as (flaky, seen):
        with EtcdClient(f"{flaky};{etcd_cluster.endpoints}") as client:
            assert client.get(key) is None  # retried on the real etcd
            assert len(seen) == 1
        with EtcdClient(f"{flaky};{etcd_cluster.endpoints}") as client:
            with pytest.raises(EtcdUnreachable) as info:
                client.create(key, b"x")
            assert info.value.maybe_applied and "may have been applied" in str(info.value)
        with EtcdClient(etcd_cluster.endpoints) as client:
            assert client.get(key) is None  # not sent to the second endpoint


def test_an_endpoint_that_is_not_etcd_is_named() -> None:
    with (
        MetadataServer().serve() as http,
        EtcdClient(f"{http.host}:{http.port}") as client,
        pytest.raises(EtcdError, match=r"not the client URL of an etcd 3\.4"),
    ):
        client.get("x")


def test_proxy_variables_are_ignored_and_warned_about_once(
    etcd_cluster: EtcdCluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    etcd_http._warned_proxies.clear()
    with refused_endpoint() as proxy:
        monkeypatch.setenv("http_proxy", f"http://{proxy}")
        monkeypatch.setenv("https_proxy", f"http://{proxy}")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        with caplog.at_level(logging.WARNING, logger="pymooncake.etcd"):
            for _ in range(2):
                with EtcdClient(etcd_cluster.endpoints) as client:
                    client.put("proxied", b"1")  # went straight to etcd
                    client.delete("proxied")
    warnings = [r.getMessage() for r in caplog.records if "http_proxy is set" in r.getMessage()]
    assert len(warnings) == 1
    assert "unset http_proxy and https_proxy".lower() in warnings[0].lower()
    assert etcd_cluster.endpoints in warnings[0] and "no_proxy" in warnings[0]


def test_no_proxy_exemption_silences_the_warning(
    etcd_cluster: EtcdCluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    etcd_http._warned_proxies.clear()
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    monkeypatch.setenv("no_proxy", "localhost,127.0.0.1")
    with caplog.at_level(logging.WARNING, logger="pymooncake.etcd"):
        EtcdClient(etcd_cluster.endpoints).close()
    assert "http_proxy is set" not in caplog.text


def test_status_and_closing(etcd_cluster: EtcdCluster) -> None:
    client = EtcdClient(etcd_cluster.endpoints)
    status = client.status()
    assert status["version"].startswith("3.") and int(status["leader"]) > 0
    assert client.status(client.endpoints[0])["version"] == status["version"]
    lease = client.lease_grant(5)
    keep = client.keep_alive(lease.id, lease.ttl_s)
    watch = client.watch("closing")
    client.close()  # stops the keep-alive and the watch (the leak check verifies)
    assert keep.closed and watch.closed
    with pytest.raises(EtcdError, match="closed"):
        client.get("x")
    client.close()
