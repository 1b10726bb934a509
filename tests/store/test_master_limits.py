"""Bounded resources on the master RPC listener (issue 7, "unbounded resources").

Idle and slow connections are closed by deadlines, connections beyond the cap
(or the open-file limit) cannot lock honest clients out, and connections each
holding part of a big frame cannot make the master buffer more than
``MasterLimits.max_buffered_bytes``.  Small limits make each case take about a
second.

Before commit 5ee5100 none of these limits existed: idle and slow connections
stayed forever, and 300 idle connections under a 256-fd limit made the master's
accept loop fail with EMFILE (its RPC timed out).
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from master_support import PREFIX, RawConn, body, frame

from pymooncake._authio import http_request
from pymooncake.store import MasterConfig
from pymooncake.store._master_client import MasterClient
from pymooncake.store.master._service import MasterLimits
from pymooncake.testing import LocalCluster
from pymooncake.wire import _master_msgs as msg

MiB = 1 << 20
KiB = 1 << 10


def _cluster(**limits: float) -> LocalCluster:
    return LocalCluster(
        MasterConfig(client_ttl_s=30.0),
        limits=MasterLimits(**limits),
    )


def _conn(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _settled_fds(timeout_s: float = 5.0) -> int:
    """This process's open fds once the count stops changing (the master, a
    thread here, accepts and closes its ends of connections on its own time)."""
    deadline = time.monotonic() + timeout_s
    last = len(os.listdir("/proc/self/fd"))
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = len(os.listdir("/proc/self/fd"))
        if now == last:
            return now
        last = now
    return last


def test_preconnect_pools_connections_that_later_calls_reuse() -> None:
    with _cluster() as cluster:
        before = _settled_fds()
        client = MasterClient(cluster.master_address, timeout_s=5, max_idle=4)
        try:
            client.preconnect(3)
            # both ends of each connection live in this process
            assert _settled_fds() == before + 2 * 3
            client.preconnect(3)  # already pooled: nothing new
            assert _settled_fds() == before + 2 * 3
            client.preconnect(100)  # at most max_idle
            assert _settled_fds() == before + 2 * 4
            for _ in range(10):
                assert client.call(msg.ServiceReady()) is not None
            assert _settled_fds() == before + 2 * 4
        finally:
            client.close()
        assert _settled_fds() == before


def test_idle_connections_are_closed_and_active_ones_kept() -> None:
    with _cluster(idle_timeout_s=0.5) as cluster:
        address = cluster.master_address
        with RawConn(address) as idle, RawConn(address) as active:
            assert active.request("ServiceReady", {})[0] == 0
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:  # a request every 0.2 s: never idle
                assert active.request("ExistKey", {"key": "k"})[0] == 0
                time.sleep(0.2)
            assert idle.closed_by_peer(0.1)
            assert not active.closed_by_peer(0.1)
        # a pooled client connection that was closed while idle is transparently replaced
        client = MasterClient(address, timeout_s=5)
        try:
            assert client.call(msg.ExistKey("k")).exists is False
            time.sleep(2.0)
            assert client.call(msg.ExistKey("k")).exists is False
        finally:
            client.close()


def test_a_slow_sender_is_closed_by_the_frame_deadline() -> None:
    with _cluster(frame_deadline_s=0.5) as cluster, RawConn(cluster.master_address) as slow:
        data = frame(1, body("ExistKey", {"key": "x" * 200}))
        started = time.monotonic()
        closed = False
        for i in range(len(data)):  # a byte every 0.1 s: the frame never completes in time
            try:
                slow.send(data[i : i + 1])
            except OSError:
                closed = True
                break
            if slow.closed_by_peer(0.1):
                closed = True
                break
        assert closed
        assert time.monotonic() - started < 3.0
        # an honest client is unaffected
        with RawConn(cluster.master_address) as honest:
            assert honest.request("ServiceReady", {})[0] == 0


def test_a_connection_that_does_not_authenticate_is_closed() -> None:
    limits = MasterLimits(auth_timeout_s=0.5)
    with LocalCluster(token="t" * 32, limits=limits) as cluster:
        silent = RawConn(cluster.master_address)
        try:
            assert silent.closed_by_peer(3.0)
        finally:
            silent.close()


def test_connections_beyond_the_cap_do_not_lock_honest_clients_out() -> None:
    with _cluster(max_connections=20) as cluster:
        address = cluster.master_address
        hogs = [_conn(address) for _ in range(60)]
        try:
            time.sleep(0.2)
            client = MasterClient(address, timeout_s=5, same_host_rpc=False)
            try:
                started = time.monotonic()
                assert client.call(msg.ExistKey("k")).exists is False
                assert time.monotonic() - started < 1.0
            finally:
                client.close()
            svc = cluster.master.service
            assert len(svc._conns) <= 20
            assert svc.refused_connections + svc.evicted_connections >= 40
        finally:
            for s in hogs:
                s.close()


def test_a_lazy_connection_is_not_evicted_to_admit_others() -> None:
    """A connection a client posts HA confirmations on without waiting is read
    only now and then (``_RpcProtocol._go_lazy``): bytes it holds unread may be
    confirmations, so the connection cap never evicts it as idle."""
    with _cluster(max_connections=20) as cluster:
        address = cluster.master_address
        client = MasterClient(address, timeout_s=5, same_host_rpc=False)
        link = client.link()
        confirm = msg.HaConfirm("client-a", ("k",), ("slot-1",), lazy=True)
        try:
            link.post(confirm)
            got: list[object] = []
            deadline = time.monotonic() + 5
            while not got:  # this master is no standby: it answers (on its tick)
                assert time.monotonic() < deadline, "the lazy connection was never read"
                time.sleep(0.02)
                got += link.answers()
            svc = cluster.master.service
            assert len(svc.lazy) == 1
            hogs = [_conn(address) for _ in range(60)]
            try:
                time.sleep(0.2)
                assert svc.evicted_connections > 0
                link.post(confirm)
                got = []
                deadline = time.monotonic() + 5
                while not got:
                    assert time.monotonic() < deadline, "no answer after the hogs came"
                    time.sleep(0.02)
                    got += link.answers()
                ((_request, answer),) = got
                assert answer.missing == ("k",)  # answered, not failed: still connected
                assert len(svc.lazy) == 1
            finally:
                for s in hogs:
                    s.close()
        finally:
            link.close()
            client.close()


_MASTER_UNDER_RLIMIT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from pymooncake.cli.master import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def master_under_rlimit() -> Iterator[tuple[str, str, list[str]]]:
    """mooncake_master in a subprocess whose open-file limit is 256: its RPC
    address, admin URL and the lines of its log so far."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _MASTER_UNDER_RLIMIT,
            "--rpc_address=127.0.0.1",
            "--port=0",
            "--metrics_host=127.0.0.1",
            "--metrics_port=0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYMOONCAKE_CLUSTER_TOKEN": ""},
    )
    try:
        assert proc.stdout is not None
        metrics = rpc = ""
        deadline = time.monotonic() + 30
        while not rpc and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if m := re.search(r"listening on (http://\S+)", line):
                metrics = m.group(1)
            if m := re.search(r"Master service started on (\S+)", line):
                rpc = m.group(1)
        assert rpc, proc.stderr.read() if proc.stderr else ""
        log: list[str] = []
        drain = threading.Thread(target=lambda: log.extend(proc.stderr or ()), daemon=True)
        drain.start()
        yield rpc, metrics, log
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def test_300_idle_connections_under_a_256_fd_limit_do_not_stop_the_master(
    master_under_rlimit: tuple[str, str, list[str]],
) -> None:
    address, metrics, log = master_under_rlimit
    hogs = []
    try:
        for _ in range(300):
            hogs.append(_conn(address))
        time.sleep(0.3)
        for same_host in (False, True):
            client = MasterClient(address, timeout_s=5, same_host_rpc=same_host)
            try:
                started = time.monotonic()
                assert client.call(msg.ExistKey("k")).exists is False
                assert time.monotonic() - started < 2.0
            finally:
                client.close()
        status, _ = http_request("GET", metrics + "/health")
        assert status == 200
        # the cap leaves room for a burst of accepts: the master never ran out
        # of files (asyncio would then stop accepting for a second at a time)
        assert not [line for line in log if "Too many open files" in line]
        assert any("closing idle connection" in line for line in log)
    finally:
        for s in hogs:
            s.close()


def test_partial_big_frames_stay_within_the_buffered_bytes_bound() -> None:
    bound = 4 * MiB
    with LocalCluster(
        MasterConfig(client_ttl_s=30.0),
        limits=MasterLimits(max_buffered_bytes=bound, frame_deadline_s=3.0),
        max_frame=2 * MiB,
    ) as cluster:
        svc = cluster.master.service
        address = cluster.master_address
        n = 16
        hogs = [_conn(address) for _ in range(n)]
        peak = [0]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], svc.buffered)
                time.sleep(0.001)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            part = PREFIX.pack(2 * MiB, 0, 1) + b"[" + b" " * (1536 * KiB)  # 1.5 of 2 MiB

            def send(s: socket.socket) -> None:
                s.settimeout(5)
                try:
                    s.sendall(part)
                except OSError:
                    pass  # paused (the kernel buffers fill) or closed by the deadline

            senders = [threading.Thread(target=send, args=(s,)) for s in hogs]
            for t in senders:
                t.start()
            time.sleep(1.0)
            # unbounded, the master would hold 16 x 1.5 MiB = 24 MiB here
            assert peak[0] <= bound + 256 * KiB, peak[0]
            assert svc.buffered <= bound + 256 * KiB
            # honest clients are still served meanwhile
            with RawConn(address) as honest:
                started = time.monotonic()
                assert honest.request("ServiceReady", {})[0] == 0
                assert time.monotonic() - started < 0.5
            for t in senders:
                t.join(10)
            # the frame deadline ends the hogs and frees what they held
            deadline = time.monotonic() + 10
            while svc.buffered and time.monotonic() < deadline:
                time.sleep(0.05)
            assert svc.buffered == 0
        finally:
            stop.set()
            watcher.join()
            for s in hogs:
                s.close()
        assert peak[0] > bound // 2  # the hogs did fill the budget


def test_a_frame_longer_than_the_limit_is_refused_before_it_is_buffered() -> None:
    with LocalCluster(max_frame=1 * MiB) as cluster:
        with RawConn(cluster.master_address) as raw:
            raw.send(struct.pack("<IBI", 64 * MiB, 0, 1) + b"[" * 1000)
            assert raw.closed_by_peer(2.0)
        assert cluster.master.service.buffered == 0
