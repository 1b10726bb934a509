"""``mooncake.mooncake_store_service``: the REST API end to end on a real master.

Routes, status codes and JSON bodies are the reference's
(``mooncake-wheel/mooncake/mooncake_store_service.py``); the service runs
in-process on a port chosen at run time, and once as
``python -m mooncake.mooncake_store_service`` stopped by SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from store_support import LOCAL, MiB, new_cluster

aiohttp = pytest.importorskip("aiohttp")

from mooncake.mooncake_store_service import MooncakeStoreService, _shm_name_to_path  # noqa: E402
from pymooncake.testing import LocalCluster  # noqa: E402


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with new_cluster() as c:
        yield c


@pytest.fixture
def config_file(cluster: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MC_TCP_BIND_ADDRESS", LOCAL)
    path = tmp_path / "mooncake.json"
    path.write_text(
        json.dumps(
            {
                "local_hostname": LOCAL,
                "metadata_server": cluster.metadata_url,
                "master_server_address": cluster.master_address,
                "global_segment_size": 32 * MiB,
                "local_buffer_size": 16 * MiB,
                "protocol": "tcp",
            }
        )
    )
    return path


@pytest.fixture
def shm_file() -> Iterator[str]:
    name = f"pymooncake-test-{uuid.uuid4().hex[:12]}"
    path = f"/dev/shm/{name}"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
    try:
        yield name
    finally:
        os.unlink(path)


class Client:
    def __init__(self, session: Any, base: str) -> None:
        self.session, self.base = session, base

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, self.base + path, json=body) as resp:
            raw = await resp.read()
            if resp.content_type == "application/json":
                return resp.status, json.loads(raw)
            return resp.status, raw


def run_service(config_file: Path, scenario: Any) -> None:
    async def main() -> None:
        service = MooncakeStoreService(str(config_file))
        assert await service.start_store_service(max_wait_time=10)
        await service.start_http_service(0, host=LOCAL)
        try:
            async with aiohttp.ClientSession() as session:
                await scenario(Client(session, f"http://{LOCAL}:{service.port}"), service)
        finally:
            await service.stop()

    asyncio.run(main())


def test_data_routes(config_file: Path) -> None:
    async def scenario(c: Client, service: MooncakeStoreService) -> None:
        assert await c.call("PUT", "/api/put", {"key": "k1", "value": "hello"}) == (
            200,
            {"status": "success"},
        )
        assert await c.call("GET", "/api/get/k1") == (200, b"hello")
        assert await c.call("GET", "/api/exist/k1") == (200, {"exists": True})
        assert await c.call("GET", "/api/exist/nope") == (200, {"exists": False})
        assert await c.call("GET", "/api/get/nope") == (404, {"error": "Key not found"})
        assert await c.call("PUT", "/api/put", {"key": "k2"}) == (
            400,
            {"error": "Missing key or value"},
        )
        assert await c.call("PUT", "/api/put", {"key": "", "value": "v"}) == (
            400,
            {"error": "Missing key or value"},
        )
        status, body = await c.call("PUT", "/api/put", {"key": "k3", "value": 5})
        assert status == 500 and "error" in body
        # the read lease of the GET above blocks remove for a moment (lease 500 ms)
        for _ in range(40):
            status, body = await c.call("DELETE", "/api/remove/k1")
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert (status, body) == (200, {"status": "success"})
        assert await c.call("DELETE", "/api/remove/k1") == (
            500,
            {"error": "Remove operation failed"},
        )
        assert await c.call("PUT", "/api/put", {"key": "k4", "value": "x"}) == (
            200,
            {"status": "success"},
        )
        status, body = await c.call("DELETE", "/api/remove_all")
        assert status == 200 and re.fullmatch(r"success removed \d+ keys", body["status"])
        assert service.store.is_exist("k4") == 0

    run_service(config_file, scenario)


def test_segment_routes_and_reconfigure(config_file: Path, shm_file: str) -> None:
    async def scenario(c: Client, service: MooncakeStoreService) -> None:
        status, body = await c.call("POST", "/api/mount_shm", {"name": shm_file, "size": 8 * MiB})
        assert status == 200 and body["status"] == "success" and len(body["segment_ids"]) == 1
        sid = body["segment_ids"][0]
        assert await c.call("POST", "/api/unmount_shm", {"segment_ids": sid}) == (
            200,
            {"status": "success"},
        )
        assert (await c.call("POST", "/api/unmount_shm", {"segment_ids": [sid]}))[0] == 500
        assert (await c.call("POST", "/api/mount_shm", {"name": "../etc", "size": 1}))[0] == 400
        assert (await c.call("POST", "/api/mount_shm", {"name": "x"}))[0] == 400
        assert (await c.call("POST", "/api/mount_shm", {"name": "no-such-shm", "size": MiB}))[
            0
        ] == 500
        assert (await c.call("POST", "/api/unmount_shm", {"segment_ids": []}))[0] == 400
        # prefill -> decode -> decode (make before break) -> prefill
        path = f"/dev/shm/{shm_file}"
        status, body = await c.call(
            "POST", "/api/reconfigure", {"mode": "decode", "path": path, "size": 4 * MiB}
        )
        assert status == 200 and body["mode"] == "decode" and len(body["segment_ids"]) == 1
        first = body["segment_ids"][0]
        status, body = await c.call(
            "POST",
            "/api/reconfigure",
            {"mode": "decode", "path": path, "size": 4 * MiB, "offset": 4 * MiB},
        )
        assert status == 200 and body["segment_ids"] != [first]
        status, body = await c.call(
            "POST", "/api/reconfigure", {"mode": "decode", "path": "/dev/shm/missing", "size": 1}
        )
        assert (
            status == 500
            and body["mode"] == "decode"
            and "keeping previous decode segments" in body["error"]
        )
        assert await c.call("POST", "/api/reconfigure", {"mode": "prefill"}) == (
            200,
            {"status": "success", "mode": "prefill"},
        )
        assert service.mounted_segment_ids == []
        assert (await c.call("POST", "/api/reconfigure", {"mode": "decode"}))[0] == 400
        assert (await c.call("POST", "/api/reconfigure", {"mode": "sideways"}))[0] == 400
        # fresh memory
        status, body = await c.call("POST", "/api/mount", {"size": MiB})
        assert status == 200 and body["allocated_size"] == 16 * MiB
        assert await c.call("POST", "/api/unmount", {"segment_ids": body["segment_ids"]}) == (
            200,
            {"status": "success"},
        )
        assert (await c.call("POST", "/api/mount", {"size": "1"}))[0] == 400
        assert (await c.call("POST", "/api/mount", {"size": 0}))[0] == 400
        assert (await c.call("POST", "/api/unmount", {}))[0] == 400
        # no SSD tier: nothing to drain
        assert await c.call("POST", "/api/unmount_local_disk", {"grace_period_seconds": 0}) == (
            200,
            {"status": "success"},
        )
        assert (await c.call("POST", "/api/unmount_local_disk", {"grace_period_seconds": 3601}))[
            0
        ] == 400
        assert (await c.call("POST", "/api/unmount_local_disk", [1]))[0] == 400

    run_service(config_file, scenario)


def test_shm_names() -> None:
    assert _shm_name_to_path("/seg") == "/dev/shm/seg"
    assert [_shm_name_to_path(n) for n in ("", None, 1, ".", "..", "a/b", "/", "/..")] == [None] * 8


def test_module_entry_point_serves_until_sigterm(config_file: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["MC_TCP_BIND_ADDRESS"] = LOCAL
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mooncake.mooncake_store_service",
            "--config",
            str(config_file),
            "--port",
            "0",
            "--max-wait-time",
            "10",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None
        port = None
        for line in proc.stderr:
            m = re.search(r"REST API started on port (\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "the service did not start"

        async def probe() -> None:
            async with aiohttp.ClientSession() as session:
                c = Client(session, f"http://127.0.0.1:{port}")
                assert await c.call("PUT", "/api/put", {"key": "cli", "value": "v"}) == (
                    200,
                    {"status": "success"},
                )
                assert await c.call("GET", "/api/get/cli") == (200, b"v")

        asyncio.run(probe())
        proc.send_signal(signal.SIGTERM)
        proc.stderr.read()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
