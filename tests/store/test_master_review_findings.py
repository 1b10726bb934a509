"""The review findings of issue 7 on the store master and its client.

* A client configured for a *remote* master must never land on a local master
  that happens to share the port (the abstract UNIX socket fallback for
  wildcard listeners is only for addresses of this machine).
* The journal's compaction makes its ``os.replace`` durable with an fsync of
  the directory (after the new file's own fsync, before appending to it).
* An exception raised inside the master's state is the master's bug: it is
  logged with its traceback and answered INTERNAL_ERROR, never INVALID_PARAMS
  (which tells a client that *it* sent something wrong), and the connection
  and the master go on serving.

(The fourth finding, the TCP rejection log limiter keyed by ephemeral port, is
tested in tests/transfer/test_limits.py.)

Before commit 5ee5100 the client tried the wildcard names for any address, the
compaction renamed without a directory fsync, and the master mapped any
KeyError/TypeError/ValueError/AttributeError to INVALID_PARAMS.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from pymooncake.errors import RpcFailed, StoreError
from pymooncake.store import ErrorCode, MasterConfig
from pymooncake.store._master_client import MasterClient
from pymooncake.store.master import ThreadedMaster, _journal
from pymooncake.store.master._effects import ObjectDeleted
from pymooncake.testing import LocalCluster
from pymooncake.wire import _master_msgs as msg

MiB = 1 << 20
#: TEST-NET-1 (RFC 5737): never an address of this machine
REMOTE = "192.0.2.1"


@pytest.mark.skipif(sys.platform != "linux", reason="abstract UNIX sockets are Linux-only")
def test_a_client_for_a_remote_master_never_lands_on_a_local_one() -> None:
    with ThreadedMaster(host="0.0.0.0", metrics_port=None) as master:
        port = master.addresses.rpc[1]
        # an address of this machine: the wildcard listener's UNIX socket is this master
        local = MasterClient(f"127.0.0.1:{port}", timeout_s=3.0)
        try:
            assert local.call(msg.ServiceReady())
            assert local.last_transport == "unix"
        finally:
            local.close()
        # the same port on another host: TCP to that host, which is not there
        remote = MasterClient(
            f"{REMOTE}:{port}", timeout_s=1.0, connect_timeout_s=0.3, reconnect_s=0.0
        )
        try:
            with pytest.raises(RpcFailed, match=REMOTE):
                remote.call(msg.ServiceReady())
            assert remote.last_transport == ""  # never connected, least of all locally
        finally:
            remote.close()


def test_journal_compaction_fsyncs_the_directory_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "master.journal"
    journal = _journal.Journal(str(path))
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(_journal.os, "fsync", fsync)
    monkeypatch.setattr(_journal.os, "replace", replace)
    effect = ObjectDeleted("k")
    try:
        journal.rewrite([effect])
    finally:
        journal.close()
    assert events == [
        ("fsync", f"{path}.tmp"),  # the new file's bytes
        ("replace", str(path)),
        ("fsync", str(tmp_path)),  # the rename itself
    ]
    assert journal.load() == [effect]


def test_an_exception_inside_the_master_is_an_internal_error_not_the_clients(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with LocalCluster(MasterConfig(client_ttl_s=30.0)) as cluster:
        client = cluster.client(4 * MiB, 1 * MiB, prefault=False)
        assert client.put("k", b"v" * 100) is True
        service = cluster.master.service

        def broken(req: Any, now: float) -> Any:
            raise KeyError("a bug of the master")

        async def scan_broken(req: Any) -> Any:
            raise TypeError("a bug of the master's scan")

        def break_master(_state: Any) -> None:
            service._handlers[msg.ExistKey] = broken
            service._scan = scan_broken  # type: ignore[method-assign]

        cluster.master.call(break_master)
        with caplog.at_level(logging.ERROR, logger="pymooncake"):
            with pytest.raises(StoreError) as info:
                client.exists("k")
            assert info.value.code == ErrorCode.INTERNAL_ERROR != ErrorCode.INVALID_PARAMS
            assert "internal error of the master handling ExistKey" in str(info.value)
            assert "see the master log" in str(info.value)
            with pytest.raises(StoreError) as scan:
                client.master.call(msg.GetReplicaListByRegex("^k"))
            assert scan.value.code == ErrorCode.INTERNAL_ERROR
        logged = [r for r in caplog.records if "internal error handling" in r.getMessage()]
        assert {r.getMessage() for r in logged} == {
            "master: internal error handling ExistKey",
            "master: internal error handling GetReplicaListByRegex",
        }
        assert all(r.exc_info is not None for r in logged)  # with the traceback
        # the same connection and the master go on serving
        assert client.get("k") == b"v" * 100
        assert client.exists_many(["k", "missing"]) == [True, False]
