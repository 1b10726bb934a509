"""The embedded metadata server's entries survive a master restart
(``MetadataSnapshot``, saved next to the master's journal)."""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from pathlib import Path

import pytest

from pymooncake.store import StoreClient, StoreClientConfig
from pymooncake.testing import ProcessCluster, journaled_master_flags
from pymooncake.transfer.metadata._snapshot import MetadataSnapshot
from pymooncake.transfer.metadata.server import MetadataServer


def _server(path: Path) -> MetadataServer:
    return MetadataServer(snapshot=MetadataSnapshot(str(path)))


def test_every_kind_of_change_is_saved_before_it_is_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "meta"
    server = _server(path)
    assert not path.exists()  # nothing changed yet
    assert server.handle_metadata("PUT", "mooncake/ram/a", b'{"a":1}').status == 200
    assert server.handle_metadata("PUT", "raw", b"\x00\xffbinary").status == 200
    created = server.handle_metadata("PUT", "mooncake/rpc_meta/a", b'{"p":1}', if_none_match="*")
    assert created.status == 200
    assert server.handle_metadata("PUT", "gone", b"x").status == 200
    assert server.handle_metadata("DELETE", "gone").status == 200
    assert server.handle_metadata("PUT", "gone-too", b"y").status == 200
    assert server.handle_metadata("DELETE", "gone-too", if_match="*").status == 200
    # a new server (a restarted master) starts from the file
    again = _server(path)
    assert sorted(again.keys()) == ["mooncake/ram/a", "mooncake/rpc_meta/a", "raw"]
    assert again.get("raw") == b"\x00\xffbinary"
    assert again.get("mooncake/rpc_meta/a") == b'{"p":1}'
    # the write-once rule holds for restored entries too
    assert again.handle_metadata("PUT", "mooncake/rpc_meta/a", b'{"p":2}').status == 400
    assert not (tmp_path / "meta.tmp").exists()


def test_refused_and_unchanged_requests_do_not_rewrite_the_file(tmp_path: Path) -> None:
    path = tmp_path / "meta"
    server = _server(path)
    server.handle_metadata("PUT", "mooncake/ram/a", b'{"a":1}')
    server.handle_metadata("PUT", "mooncake/rpc_meta/a", b'{"p":1}')
    before = path.stat().st_mtime_ns, path.stat().st_ino
    os.utime(path, ns=(1, 1))
    assert server.handle_metadata("PUT", "mooncake/ram/a", b'{"a":1}').status == 200  # re-publish
    assert server.handle_metadata("PUT", "mooncake/rpc_meta/a", b'{"p":2}').status == 400
    assert server.handle_metadata("PUT", "mooncake/ram/b", b"not json").status == 400
    assert server.handle_metadata("DELETE", "nothing").status == 404
    assert server.handle_metadata("DELETE", "mooncake/ram/a", if_match='"x"').status == 412
    assert path.stat().st_mtime_ns == 1 and path.stat().st_ino == before[1]


def test_an_unreadable_file_is_set_aside_and_the_server_starts_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "meta"
    path.write_bytes(b'{"format": "pymooncake-metadata/1", "entries": [["k", "!!"]]}')
    with caplog.at_level(logging.WARNING, logger="pymooncake.metadata.server"):
        server = _server(path)
    assert server.keys() == []
    assert (tmp_path / "meta.bad").exists() and not path.exists()
    assert "unreadable" in caplog.text and "meta.bad" in caplog.text
    # and it saves again from then on
    server.handle_metadata("PUT", "k", b"v")
    assert json.loads(path.read_bytes())["entries"] == [["k", "dg=="]]


def test_a_failed_save_keeps_serving(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = _server(tmp_path / "no-such-dir" / "meta")
    with caplog.at_level(logging.ERROR, logger="pymooncake.metadata.server"):
        assert server.handle_metadata("PUT", "k", b"v").status == 200
    assert server.get("k") == b"v"
    assert "could not save the metadata snapshot" in caplog.text


def _fetch(url: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
def test_a_restarted_master_serves_the_descriptors_at_once(tmp_path: Path) -> None:
    """Right after a restart from its journal, the master's metadata server has
    every engine's descriptor (before the engines noticed the restart), so a
    client that starts then reads from a storage node at once."""
    flags = journaled_master_flags(tmp_path / "journal", "--client_ttl=5")
    with ProcessCluster(flags) as cluster:
        _, segment = cluster.node("16 MB")
        writer = StoreClient(
            StoreClientConfig("127.0.0.1", cluster.metadata_url, cluster.master_address, 0)
        )
        try:
            assert writer.put("k", b"v" * 5000)
        finally:
            writer.close()
        key = f"{cluster.metadata_url}?key=mooncake/ram/{segment}"
        assert _fetch(key) == 200
        cluster.restart_master()
        assert _fetch(key) == 200  # no wait for the node's next heartbeat
        reader = StoreClient(
            StoreClientConfig("127.0.0.1", cluster.metadata_url, cluster.master_address, 0)
        )
        try:
            assert reader.get("k") == b"v" * 5000
        finally:
            reader.close()
