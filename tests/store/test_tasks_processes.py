"""Copy, move and drain with real processes: ``mooncake_master`` and
``mooncake_client`` storage nodes as subprocesses (the nodes run the tasks: they
own the source replicas), clients in this process writing and reading a
checksummed load the whole time.

What must hold (the reference's ``scripts/test_drain_http_api.py`` and more):

* a drain job moves every replica off the drained segment while puts and gets
  go on; no read ever returns wrong bytes or fails;
* new puts that prefer the draining segment land elsewhere;
* the job reports its progress and SUCCEEDED, the segment DRAINED;
* after the drained node leaves, every key still reads back intact;
* the admin endpoints need the cluster token;
* with ``--journal_path`` tasks and drain jobs survive a master SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pymooncake import EngineConfig
from pymooncake._authio import ClusterSecurity, http_request
from pymooncake.errors import MooncakeError
from pymooncake.store import ReplicateConfig, StoreClient, StoreClientConfig
from pymooncake.store._tasks import TaskStatus
from pymooncake.testing import ProcessCluster, journaled_master_flags

pytestmark = pytest.mark.slow

TOKEN = "drain-test-token-0123456789abcdef"


def _client(cluster: ProcessCluster, **kw: Any) -> StoreClient:
    return StoreClient(
        StoreClientConfig(
            "127.0.0.1",
            cluster.metadata_url,
            cluster.master_address,
            0,
            8 << 20,
            rpc_timeout_s=10,
            engine=EngineConfig(
                tcp_bind_address="127.0.0.1",
                connect_timeout_s=2,
                transfer_timeout_s=10,
                cluster_token=cluster.token,
            ),
            **kw,
        )
    )


def _value(key: str, n: int) -> bytes:
    """``n`` bytes whose last 32 are the SHA-256 of the rest and the key."""
    body = random.randbytes(n - 32)
    return body + hashlib.sha256(key.encode() + body).digest()


def _intact(key: str, value: bytes) -> bool:
    return hashlib.sha256(key.encode() + value[:-32]).digest() == value[-32:]


def _http(cluster: ProcessCluster, path: str, body: Any = None, *, token: bool = True) -> Any:
    """GET (or POST with a JSON body) an admin path; the answer's JSON with its
    HTTP status under ``http_status``."""
    method = "POST" if body is not None else "GET"
    security = ClusterSecurity(token=cluster.token) if token and cluster.token else None
    status, payload = http_request(
        method,
        cluster.metrics_url + path,
        security=security,
        context=b"master-admin",
        body=None if body is None else json.dumps(body).encode(),
        timeout_s=10,
    )
    try:
        out = json.loads(payload)
    except ValueError:
        out = {"text": payload.decode(errors="replace")}
    return {"http_status": status, **out} if isinstance(out, dict) else out


def _wait(what: str, fn: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


class Load:
    """Threads that put new keys (preferring ``prefer``) and read back random known
    keys, checking every byte, until stopped."""

    def __init__(self, client: StoreClient, prefer: str, known: dict[str, bytes]) -> None:
        self.client = client
        self.prefer = prefer
        self.known = dict(known)
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.reads = 0
        self.puts: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._reader, name=f"load-reader-{i}") for i in range(2)
        ] + [threading.Thread(target=self._writer, name="load-writer")]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _reader(self) -> None:
        rng = random.Random()
        while not self._stop.is_set():
            with self.lock:
                key = rng.choice(list(self.known))
                want = self.known[key]
            try:
                got = self.client.get(key)
            except MooncakeError as exc:
                self.errors.append(f"get {key}: {exc}")
                continue
            if got != want or not _intact(key, got):
                self.errors.append(f"get {key}: wrong bytes")
            self.reads += 1

    def _writer(self) -> None:
        # at most ~15 MB in all: the segments never reach the eviction watermark,
        # so every key put stays readable
        i = 0
        while not self._stop.is_set() and i < 300:
            key = f"load-{i}"
            value = _value(key, random.choice((4096, 65536, 100_000)))
            try:
                self.client.put(key, value, ReplicateConfig(preferred_segments=(self.prefer,)))
            except MooncakeError as exc:
                self.errors.append(f"put {key}: {exc}")
                continue
            with self.lock:
                self.known[key] = value
                self.puts.append(key)
            i += 1
            time.sleep(0.02)


def _segments_of(client: StoreClient, key: str) -> list[str]:
    return sorted(r.endpoint for r in client.replicas(key))


def test_copy_move_and_drain_under_load() -> None:
    flags = ["--client_ttl=3", "--default_kv_lease_ttl=300"]
    with ProcessCluster(flags, token=TOKEN) as cluster:
        src_node, src = cluster.node("32 MB")
        _, dst = cluster.node("64 MB")
        _, other = cluster.node("16 MB")
        client = _client(cluster)
        try:
            # --- copy and move, run by the node that owns the source -------------
            v = _value("cm", 300_000)
            assert client.put("cm", v, ReplicateConfig(preferred_segments=(src,)))
            tid = client.create_copy_task("cm", [dst, other])
            info = _wait("copy", lambda: (i := client.query_task(tid)).finished and i)
            assert info.status == TaskStatus.SUCCESS, info
            assert _segments_of(client, "cm") == sorted([src, dst, other])
            tid = client.create_move_task("cm", other, dst)  # dst has it: drop other's
            assert (
                _wait("move", lambda: (i := client.query_task(tid)).finished and i).status
                == TaskStatus.SUCCESS
            )
            assert _segments_of(client, "cm") == sorted([src, dst])
            assert client.get("cm") == v

            # --- drain src under a put/get load ---------------------------------------
            preload = {f"pre-{i}": _value(f"pre-{i}", 64 * 1024 + i) for i in range(40)}
            for k, val in preload.items():
                assert client.put(k, val, ReplicateConfig(preferred_segments=(src,)))
                assert _segments_of(client, k) == [src]
            preload["cm"] = v
            assert (
                _http(cluster, "/api/v1/drain_jobs", {"segments": [src]}, token=False)[
                    "http_status"
                ]
                == 401
            )
            with Load(client, src, preload) as load:
                _wait("a few reads", lambda: load.reads > 20)
                resp = _http(
                    cluster,
                    "/api/v1/drain_jobs",
                    {"segments": [src], "target_segments": [dst], "max_concurrency": 2},
                )
                assert resp["success"], resp
                job = resp["job_id"]
                status = _http(cluster, f"/api/v1/segments/status?segment={src}")
                assert status["status_name"] in ("DRAINING", "DRAINED"), status
                progress = []

                def finished() -> bool:
                    q = _http(cluster, f"/api/v1/drain_jobs/query?job_id={job}")
                    progress.append(q)
                    return q["status_name"] in ("SUCCEEDED", "FAILED", "CANCELED")

                try:
                    _wait("the drain job", finished, 120)
                except AssertionError as exc:
                    raise AssertionError(f"{exc}: {progress[-1]}") from None
                final = progress[-1]
                assert final["status_name"] == "SUCCEEDED", final
                assert final["active_units"] == 0 and final["succeeded_units"] >= len(preload)
                assert final["migrated_bytes"] >= sum(len(x) for x in preload.values())
                assert final["segments"] == [src]
                _wait("more reads after the drain", lambda r=load.reads: load.reads > r + 20)
            assert not load.errors, load.errors[:5]
            assert load.reads > 40 and load.puts
            assert (
                _http(cluster, f"/api/v1/segments/status?segment={src}")["status_name"] == "DRAINED"
            )
            for k in list(preload) + load.puts:
                segs = _segments_of(client, k)
                assert src not in segs, (k, segs)
            # puts made while src drained never landed there
            drained_puts = [k for k in load.puts if k not in preload]
            assert drained_puts
            # --- the drained node leaves; every key still reads back intact -------
            src_node.stop()
            _wait(
                "the master to drop the node's segment",
                lambda: (
                    _http(cluster, f"/api/v1/segments/status?segment={src}").get("http_status")
                    == 404
                ),
                30,
            )
            for k, val in load.known.items():
                assert client.get(k) == val, k
            # the job stays queryable; a second cancel of an ended job is refused
            again = _http(cluster, f"/api/v1/drain_jobs/cancel?job_id={job}", {})
            assert again["http_status"] == 409 and again["error_code"] == -1010
            missing = _http(cluster, "/api/v1/drain_jobs/query?job_id=1-2")
            assert missing["http_status"] == 404 and missing["error_code"] == -1402
            bad = _http(cluster, "/api/v1/drain_jobs/query?job_id=nope")
            assert bad["http_status"] == 400 and bad["error_code"] == -600
        finally:
            client.close()


def test_drain_validation_and_cancel_over_http() -> None:
    with ProcessCluster(["--client_ttl=3"]) as cluster:
        _, a = cluster.node("16 MB")
        _, b = cluster.node("16 MB")
        cases = [
            ({"segments": []}, 400, -600),
            ({"segments": [a], "max_concurrency": 0}, 400, -600),
            ({"segments": [a, a]}, 400, -600),
            ({"segments": [a], "target_segments": [a]}, 400, -600),
            ({"segments": ["nope:1"]}, 404, -101),
            ({"segments": [a], "target_segments": ["nope:1"]}, 404, -101),
            ({"segments": "x"}, 400, -600),
        ]
        for body, http_status, code in cases:
            resp = _http(cluster, "/api/v1/drain_jobs", body)
            assert (resp["http_status"], resp["error_code"]) == (http_status, code), (body, resp)
        resp = _http(cluster, "/api/v1/drain_jobs", {"segments": [a], "target_segments": [b]})
        assert resp["success"]
        # an empty segment drains at once
        _wait(
            "an empty drain",
            lambda: (
                _http(cluster, f"/api/v1/drain_jobs/query?job_id={resp['job_id']}")["status_name"]
                == "SUCCEEDED"
            ),
        )
        again = _http(cluster, "/api/v1/drain_jobs", {"segments": [a]})
        assert (again["http_status"], again["error_code"]) == (409, -1010)
        assert _http(cluster, "/api/v1/segments/status")["http_status"] == 400


def test_tasks_and_drain_jobs_survive_a_master_restart(tmp_path: Path) -> None:
    flags = journaled_master_flags(tmp_path / "journal", "--client_ttl=30")
    with ProcessCluster(flags) as cluster:
        _, a = cluster.node("16 MB")
        _, b = cluster.node("16 MB")
        # a client that owns a segment but never fetches tasks: its task stays PENDING
        idle = StoreClient(
            StoreClientConfig(
                "127.0.0.1",
                cluster.metadata_url,
                cluster.master_address,
                8 << 20,
                4 << 20,
                ping_interval_s=3600,
                engine=EngineConfig(tcp_bind_address="127.0.0.1", connect_timeout_s=2),
            )
        )
        client = _client(cluster)
        try:
            assert client.put("done", b"x" * 5000, ReplicateConfig(preferred_segments=(a,)))
            done = client.create_copy_task("done", [b])
            _wait("copy", lambda: client.query_task(done).finished)
            assert client.put(
                "later", b"y" * 5000, ReplicateConfig(preferred_segments=(idle.hostname,))
            )
            pending = client.create_copy_task("later", [b])
            job = _http(cluster, "/api/v1/drain_jobs", {"segments": [b]})["job_id"]
            cluster.restart_master()
            q = _wait("the master back", lambda: _try(lambda: client.query_task(done)))
            assert q.status == TaskStatus.SUCCESS
            assert client.query_task(pending).status == TaskStatus.PENDING
            restored = _http(cluster, f"/api/v1/drain_jobs/query?job_id={job}")
            assert restored["success"] and restored["segments"] == [b], restored
            assert _http(cluster, f"/api/v1/segments/status?segment={b}")["status_name"] in (
                "DRAINING",
                "DRAINED",
            )
            # the copy's two replicas survived; the restored drain job may already
            # have moved the one in b to the only open segment left (idle's)
            held = sorted(r.endpoint for r in client.replicas("done"))
            assert held in (sorted([a, b]), sorted([a, idle.hostname])), held
        finally:
            client.close()
            idle.close()


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except MooncakeError:
        return None
