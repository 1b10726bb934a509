"""Every situation of the troubleshooting guide that can happen without RDMA
hardware, provoked for real, asserting what pymooncake says and returns
(docs/troubleshooting.md is the table of these)."""

from __future__ import annotations

import logging
import random
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from mooncake.engine import TransferEngine as CompatEngine
from mooncake.store import MooncakeDistributedStore
from pymooncake._cascade import CascadeLog, root_cause
from pymooncake._net import connect_tcp
from pymooncake.config import EngineConfig
from pymooncake.errors import (
    ErrCode,
    HandshakeRejected,
    MetadataError,
    MetadataUnreachable,
    MooncakeError,
    PeerRejected,
    PeerSocketError,
    PortInUse,
    SegmentNotFound,
    TransferFailed,
)
from pymooncake.testing import LocalCluster, free_port
from pymooncake.transfer import TransferEngine, TransferRequest
from pymooncake.transfer.metadata import HttpMetadataStore
from pymooncake.transfer.metadata.server import MetadataServer
from pymooncake.wire import (
    Frame,
    FrameDecoder,
    MessageType,
    NotifyMessage,
    RpcMeta,
    SegmentDesc,
    dumps_json,
    encode_frame_json,
    encode_rpc_meta,
    encode_segment,
    rpc_meta_key,
)

LOCAL = "127.0.0.1"
#: TEST-NET-2 (RFC 5737): never an address of this host
FOREIGN = "198.51.100.77"


@pytest.fixture
def metadata() -> Iterator[tuple[MetadataServer, str]]:
    server = MetadataServer()
    with server.serve(LOCAL, 0) as http:
        yield server, server.url(http)


def cfg(**kw: Any) -> EngineConfig:
    kw.setdefault("tcp_bind_address", LOCAL)
    kw.setdefault("connect_timeout_s", 1.0)
    return EngineConfig(**kw)


# --- Checklist: connectable_name ---------------------------------------------------------


def test_loopback_local_hostname_is_warned_once(caplog: Any) -> None:
    name = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    caplog.set_level(logging.WARNING, logger="pymooncake.engine")
    with TransferEngine(name, "P2PHANDSHAKE", config=EngineConfig()):
        pass
    with TransferEngine(name, "P2PHANDSHAKE", config=EngineConfig()):
        pass
    lines = [r.getMessage() for r in caplog.records if "loopback" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith(f"local_hostname {name!r} resolves to the loopback address {name}")
    assert "connectable_name must be a non-loopback IP address of this node" in lines[0]


def test_local_hostname_of_another_machine() -> None:
    with pytest.raises(PeerSocketError) as info:
        TransferEngine(FOREIGN, "P2PHANDSHAKE", config=EngineConfig())
    assert info.value.code == ErrCode.SOCKET
    assert f"{FOREIGN} is not an address of this machine" in str(info.value)
    assert "local_hostname / MC_TCP_BIND_ADDRESS must be this node's own LAN address" in str(
        info.value
    )
    assert CompatEngine().initialize(FOREIGN, "P2PHANDSHAKE", "tcp", "") == -1


# --- metadata server unreachable / bound to loopback / proxies ---------------------------------


def test_metadata_server_unreachable(caplog: Any) -> None:
    url = f"http://{LOCAL}:{free_port()}/metadata"
    with pytest.raises(MetadataUnreachable) as info:
        TransferEngine(LOCAL, url, config=cfg())
    text = str(info.value)
    assert info.value.code == ErrCode.METADATA
    assert text.startswith(f"metadata server {url} is unreachable")
    assert (
        "a server bound to 127.0.0.1 is invisible to other nodes; start it with --host 0.0.0.0"
        in text
    )
    assert f"curl '{url}?key=x'" in text
    caplog.set_level(logging.ERROR, logger="mooncake")
    assert CompatEngine().initialize(LOCAL, url, "tcp", "") == -1
    assert "is unreachable" in caplog.text


def test_etcd_address_that_does_not_answer() -> None:
    dead = f"{LOCAL}:{free_port()}"
    with pytest.raises(MooncakeError) as info:  # plain host:port means etcd, as in the reference
        TransferEngine(LOCAL, dead, config=cfg())
    assert dead in str(info.value)
    assert info.value.code in (ErrCode.METADATA, ErrCode.NOT_IMPLEMENTED)


def test_proxy_variables_do_not_intercept_metadata(
    metadata: tuple[MetadataServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dead_proxy = f"http://{LOCAL}:{free_port()}"
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "all_proxy"):
        monkeypatch.setenv(var, dead_proxy)
    _, url = metadata
    with TransferEngine(LOCAL, url, config=cfg(), append_rpc_port=True) as engine:
        store = HttpMetadataStore(url)
        try:
            assert store.get(f"mooncake/ram/{engine.segment_name}") is not None
        finally:
            store.close()


# --- ports -------------------------------------------------------------------------------------


def test_bind_address_already_in_use() -> None:
    with socket.socket() as taken:
        taken.bind((LOCAL, 0))
        taken.listen()
        port = taken.getsockname()[1]
        legacy = cfg(legacy_rpc_port_binding=True)
        with pytest.raises(PortInUse) as info:
            TransferEngine(f"{LOCAL}:{port}", "P2PHANDSHAKE", config=legacy)
        assert info.value.code == ErrCode.SOCKET
        assert str(info.value) == (
            f"bind address already in use: port {port} on 127.0.0.1 (transfer engine "
            "RPC/handshake listener) is taken by another process; choose another port or stop "
            f"the process holding it (ss -ltnp 'sport = :{port}')"
        )
        ranged = cfg(rpc_port_min=port, rpc_port_max=port)
        with pytest.raises(PortInUse) as info:
            TransferEngine(LOCAL, "P2PHANDSHAKE", config=ranged)
        assert (
            f"no free port for the transfer engine RPC/handshake listener on 127.0.0.1 after 500 tries in [{port}, {port}]"
            in str(info.value)
        )
        assert "widen MC_MIN_RPC_PORT/MC_MAX_RPC_PORT" in str(info.value)


# --- a peer that refuses connections -------------------------------------------------------------


def test_connection_refused_by_a_peer_that_exited() -> None:
    with TransferEngine(LOCAL, "P2PHANDSHAKE", config=cfg(same_host_transport=False)) as a:
        src = a.allocate(4096)
        b = TransferEngine(LOCAL, "P2PHANDSHAKE", config=cfg(same_host_transport=False))
        dst = b.allocate(4096)
        name = b.segment_name
        a.write(name, src.addr, dst.addr, 4096)  # resolves and caches b
        b.close()
        with pytest.raises(TransferFailed) as info:
            a.write(name, src.addr, dst.addr, 4096)
        assert info.value.code == ErrCode.SOCKET
        assert "1 of 1 transfer request(s) failed; first: connection refused by 127.0.0.1:" in str(
            info.value
        )
        assert "nothing listens there. Check that the peer is running" in str(info.value)
        a.sync_segment_cache()
        with pytest.raises(PeerSocketError) as first:
            a.write(name, src.addr, dst.addr, 4096)
        assert str(first.value).startswith(f"Failed to get description of {name}")
        assert f"connection refused by {name} (RPC port of segment {name!r})" in str(first.value)


def test_a_peer_whose_packets_are_dropped_times_out() -> None:
    """A full accept queue drops SYNs, as a firewall would: connecting times out."""
    with socket.socket() as listener:
        listener.bind((LOCAL, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        backlog = []
        try:
            for _ in range(3):
                s = socket.socket()
                s.setblocking(False)
                backlog.append(s)
                try:
                    s.connect((LOCAL, port))
                except BlockingIOError:
                    pass
            threading.Event().wait(0.2)
            with pytest.raises(PeerSocketError) as info:
                connect_tcp(LOCAL, port, timeout_s=0.3, what="TCP data port of segment 'x'")
        finally:
            for s in backlog:
                s.close()
    assert info.value.code == ErrCode.SOCKET
    assert str(info.value) == (
        f"connecting to 127.0.0.1:{port} (TCP data port of segment 'x') timed out after 0.3 s: "
        "the host is unreachable or a firewall drops packets; check routing and whitelists"
    )


# --- stale or duplicate registrations ("clear the etcd database") ------------------------------------


def test_stale_registration_is_replaced_and_a_live_duplicate_refused(
    metadata: tuple[MetadataServer, str], caplog: Any
) -> None:
    server, url = metadata
    name = f"node-{random.randint(0, 1 << 30)}"
    dead = RpcMeta(LOCAL, free_port())
    server.store[rpc_meta_key(name)] = dumps_json(encode_rpc_meta(dead))
    caplog.set_level(logging.WARNING, logger="pymooncake.engine")
    with TransferEngine(name, url, config=cfg()) as first:
        assert f"replacing stale rpc_meta of {name!r}" in caplog.text
        assert "did not answer a probe; its process exited without unregistering" in caplog.text
        with pytest.raises(MetadataError) as info:
            TransferEngine(name, url, config=cfg())
        assert info.value.code == ErrCode.METADATA
        assert str(info.value) == (
            f"segment name {name!r} is already registered by a live engine at "
            f"127.0.0.1:{first.rpc_port} ({rpc_meta_key(name)} on {url}); every engine needs a "
            "unique local_hostname (add a port, e.g. 'host:12345')"
        )


# --- "Failed to get description of XXX" --------------------------------------------------------------


def test_wrong_segment_name(metadata: tuple[MetadataServer, str], caplog: Any) -> None:
    _, url = metadata
    with TransferEngine(LOCAL, url, config=cfg(), append_rpc_port=True) as peer:
        with pytest.raises(SegmentNotFound) as info:
            peer.open_segment("no-such-node")
        assert info.value.code == ErrCode.METADATA
        assert str(info.value) == (
            "Failed to get description of no-such-node (Failed to retrieve segment descriptor, "
            f"name no-such-node): no descriptor under 'mooncake/ram/no-such-node' on {url}; the "
            "Segment name needs to strictly match the local_hostname the other node passed at "
            "initialization, and both nodes must use the same metadata server and "
            "MC_METADATA_CLUSTER_ID"
        )
    engine = CompatEngine()
    assert engine.initialize(LOCAL, url, "tcp", "") == 0
    try:
        caplog.set_level(logging.ERROR, logger="mooncake")
        buf = engine.allocate_managed_buffer(4096)
        assert engine.transfer_sync_write("no-such-node", buf, 0, 16) == -1
        assert "Failed to get description of no-such-node" in caplog.text
    finally:
        engine.close()


# --- a peer rejecting a request ("Handshake request rejected by peer endpoint") ------------------------


def test_request_outside_the_peers_buffers_is_rejected(caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="pymooncake.transport.tcp")
    config = cfg(same_host_transport=False)
    with (
        TransferEngine(LOCAL, "P2PHANDSHAKE", config=config) as a,
        TransferEngine(LOCAL, "P2PHANDSHAKE", config=config) as b,
    ):
        src = a.allocate(4096)
        dst = b.allocate(4096)
        with pytest.raises(TransferFailed) as info:
            a.write(b.segment_name, src.addr, dst.addr + (1 << 30), 4096)
        err = info.value.errors[0]
        assert isinstance(err, PeerRejected)
        assert info.value.code == ErrCode.ADDRESS_NOT_REGISTERED
        assert str(err).startswith(
            f"WRITE/READ rejected by segment {b.segment_name!r}: remote address"
        )
        assert "is not within any buffer the peer registered" in str(err)
        # and the target says so once, on its side
        assert "ServerSession: remote-supplied address" in caplog.text
        assert "is not within any registered buffer; closing the connection" in caplog.text


class RejectingPeer:
    """An RPC port that describes itself (Metadata) but answers Notify with an empty
    acknowledgement, as a peer rejecting the handshake does."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((LOCAL, 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.name = f"{LOCAL}:{self.port}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                decoder = FrameDecoder(1 << 20)
                frame = decoder.next_frame()
                while not isinstance(frame, Frame):
                    data = conn.recv(65536)
                    if not data:
                        break
                    decoder.feed(data)
                    frame = decoder.next_frame()
                if not isinstance(frame, Frame):
                    continue
                if frame.type is MessageType.METADATA:
                    desc = SegmentDesc(self.name, "tcp", tcp_data_port=1, tcp_data_host=LOCAL)
                    conn.sendall(encode_frame_json(frame.type, encode_segment(desc)))
                else:
                    conn.sendall(encode_frame_json(frame.type, {}))

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


def test_a_peer_rejecting_the_notification() -> None:
    peer = RejectingPeer()
    try:
        with (
            TransferEngine(LOCAL, "P2PHANDSHAKE", config=cfg()) as engine,
            pytest.raises(HandshakeRejected) as info,
        ):
            engine.send_notify(peer.name, NotifyMessage("hello", "world"))
        assert info.value.code == ErrCode.REJECT_HANDSHAKE
        assert str(info.value) == f"segment {peer.name!r} rejected the notification 'hello'"
    finally:
        peer.close()


# --- cascades: the first failure logged, the rest counted -------------------------------------------------


def test_a_dead_peer_cascade_is_one_log_line_plus_a_count(caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="mooncake")
    a, b = CompatEngine(), CompatEngine()
    assert a.initialize(LOCAL, "P2PHANDSHAKE", "tcp", "") == 0
    assert b.initialize(LOCAL, "P2PHANDSHAKE", "tcp", "") == 0
    try:
        src = a.allocate_managed_buffer(4096)
        dst = b.allocate_managed_buffer(4096)
        target = f"{LOCAL}:{b.get_rpc_port()}"
        assert a.transfer_sync_write(target, src, dst, 4096) == 0
        b.close()
        caplog.clear()
        for _ in range(50):
            assert a.transfer_sync_write(target, src, dst, 4096) == -1
        failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(failures) == 1, [r.getMessage() for r in failures]
        assert f"transfer_sync_write to {target!r} failed:" in failures[0].getMessage()
        key = next(k for k in a._failures._episodes if target in k)
        assert a._failures.count(key) == 50
    finally:
        a.close()  # flushes the count
    flushed = [r.getMessage() for r in caplog.records if "were not logged" in r.getMessage()]
    assert any(m.startswith("49 more failure(s) with the same cause") for m in flushed), flushed


def test_a_batch_to_a_dead_peer_fails_every_request_with_one_cause() -> None:
    config = cfg(same_host_transport=False)
    with TransferEngine(LOCAL, "P2PHANDSHAKE", config=config) as a:
        b = TransferEngine(LOCAL, "P2PHANDSHAKE", config=config)
        src, dst = a.allocate(1 << 16), b.allocate(1 << 16)
        a.write(b.segment_name, src.addr, dst.addr, 16)
        b.close()
        reqs = [TransferRequest.write(src.addr + i * 64, dst.addr + i * 64, 64) for i in range(32)]
        with pytest.raises(TransferFailed) as info:
            a.transfer(b.segment_name, reqs)
        assert all(isinstance(e, PeerSocketError) for e in info.value.errors)
        log = CascadeLog(logging.getLogger("test.cascade"))
        keys = {log.key(e) for e in info.value.errors if e is not None}
        assert len(keys) == 1  # one cause: one line
        assert root_cause(info.value) is info.value.errors[0]


def test_store_reads_from_a_dead_owner_log_once(
    caplog: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MC_TCP_BIND_ADDRESS", LOCAL)
    monkeypatch.setenv("PYMOONCAKE_SAME_HOST", "0")
    with LocalCluster() as cluster:
        owner = cluster.client(32 << 20)
        store = MooncakeDistributedStore()
        assert (
            store.setup(LOCAL, cluster.metadata_url, 0, 16 << 20, "tcp", "", cluster.master_address)
            == 0
        )
        try:
            data = np.ones(4096, dtype=np.uint8).tobytes()
            for i in range(20):
                assert store.put(f"k{i}", data) == 0
            owner.engine.close()  # the owner's data port goes away; the master still lists it
            caplog.set_level(logging.ERROR, logger="mooncake.store")
            caplog.clear()
            for i in range(20):
                assert store.get(f"k{i}") == b""
            lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(lines) == 1, lines
            assert lines[0].startswith("get('k0') failed: reading 'k0' failed on every replica")
            assert "connection refused by" in lines[0]
            assert "the segment's owner is down or unreachable; the master forgets" in lines[0]
        finally:
            store.close()


def test_cascade_log_episodes_and_periodic_counts() -> None:
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("test.cascade.episodes")
    logger.addHandler(handler := Capture())
    logger.propagate = False
    now = [0.0]
    try:
        log = CascadeLog(logger, every=10, quiet_s=5.0, clock=lambda: now[0])
        cause = PeerSocketError("connection refused by 10.0.0.2:1234 (peer)")
        for i in range(25):
            failure = TransferFailed("1 of 1 transfer request(s) failed", [cause])
            log.failed(f"op{i}", failure)
        assert records[0] == "op0 failed: 1 of 1 transfer request(s) failed"
        assert records[1:] == [
            "op10: 10 more failure(s) with the same cause since the last report: "
            "PeerSocketError: connection refused by 10.0.0.2:1234 (peer)",
            "op20: 10 more failure(s) with the same cause since the last report: "
            "PeerSocketError: connection refused by 10.0.0.2:1234 (peer)",
        ]
        now[0] = 100.0  # quiet long enough: a new episode, with the last one's count
        log.failed("later", cause)
        assert records[-1] == (
            "later failed: connection refused by 10.0.0.2:1234 (peer) (4 more failure(s) with "
            "this cause earlier were not logged one by one)"
        )
        log.failed("again", cause)
        log.flush()
        assert records[-1] == (
            "1 more failure(s) with the same cause were not logged: PeerSocketError: connection "
            "refused by 10.0.0.2:1234 (peer)"
        )
        assert log.count(cause) == 27
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def test_master_unreachable(caplog: Any) -> None:
    dead = f"{LOCAL}:{free_port()}"
    store = MooncakeDistributedStore()
    caplog.set_level(logging.ERROR, logger="mooncake.store")
    rc = store.setup(LOCAL, "P2PHANDSHAKE", 0, 1 << 20, "tcp", "", dead)
    assert rc == -900  # RPC_FAIL
    assert f"cannot reach the master at {dead}" in caplog.text
    assert "Check that mooncake_master is running there" in caplog.text
    threading.Event().wait(0)  # (no threads left behind: the failed setup cleaned up)
