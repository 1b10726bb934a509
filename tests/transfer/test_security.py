"""Every attacker capability on the engine's ports, with and without the cluster token.

Without a token the ports are open to anyone who can reach them (the default,
so that reference engines interoperate): these tests document it.  With a
token, a peer that does not hold it is refused before it can read, write,
list, publish or delete anything; both sides say why.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import urllib.parse
from collections.abc import Iterator

import pytest

from pymooncake import EngineConfig, NotifyMessage, TransferEngine
from pymooncake._authio import ClusterSecurity, http_request
from pymooncake.errors import AuthenticationError, MooncakeError, TransferFailed
from pymooncake.testing import wait_until
from pymooncake.transfer.metadata.server import MetadataServer
from pymooncake.wire import (
    STATUS,
    STATUS_OK,
    Frame,
    FrameDecoder,
    MessageType,
    encode_frame_json,
    encode_header,
)
from pymooncake.wire._auth import ClusterKey, FailureKind
from pymooncake.wire._tcp import STATUS_AUTH_REQUIRED

LOCAL = "127.0.0.1"
TOKEN = "cluster-secret-for-tests-0123456789"


def _cfg(config: EngineConfig, token: str = "") -> EngineConfig:
    return config.replace(cluster_token=token, rpc_server_timeout_s=2.0, auth_timeout_s=2.0)


@pytest.fixture
def secured(config: EngineConfig) -> Iterator[TransferEngine]:
    e = TransferEngine(LOCAL, config=_cfg(config, TOKEN))
    try:
        yield e
    finally:
        e.close()


@pytest.fixture
def open_engine(config: EngineConfig) -> Iterator[TransferEngine]:
    e = TransferEngine(LOCAL, config=_cfg(config))
    try:
        yield e
    finally:
        e.close()


def recv_all(s: socket.socket, limit: int = 1 << 20) -> bytes:
    out = bytearray()
    try:
        while len(out) < limit:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return bytes(out)


def raw_rpc(port: int, msg_type: MessageType, body: object) -> Frame | None:
    """What an attacker with a socket gets from the RPC port (None: nothing)."""
    with socket.create_connection((LOCAL, port), timeout=5) as s:
        s.sendall(encode_frame_json(msg_type, body))
        data = recv_all(s)
    dec = FrameDecoder()
    dec.feed(data)
    frame = dec.next_frame()
    return frame if isinstance(frame, Frame) else None


def raw_read(port: int, addr: int, size: int) -> bytes:
    with socket.create_connection((LOCAL, port), timeout=5) as s:
        s.sendall(encode_header(size, addr, is_write=False, v2=True))
        return recv_all(s, 8 + size)


def raw_write(port: int, addr: int, payload: bytes) -> bytes:
    with socket.create_connection((LOCAL, port), timeout=5) as s:
        s.sendall(encode_header(len(payload), addr, is_write=True, v2=True) + payload)
        return recv_all(s, 8)


# --- RPC / handshake port --------------------------------------------------------------


@pytest.mark.parametrize(
    ("msg_type", "body"),
    [
        (MessageType.METADATA, {}),  # dumps the segment descriptor (every buffer address)
        (MessageType.NOTIFY, {"name": "forged", "notify_msg": "evil"}),  # injects a notify
        (MessageType.PROBE, {}),
    ],
)
def test_rpc_port_open_without_token(
    open_engine: TransferEngine, msg_type: MessageType, body: object
) -> None:
    frame = raw_rpc(open_engine.rpc_port, msg_type, body)
    assert frame is not None and frame.type is msg_type  # anyone is served
    if msg_type is MessageType.METADATA:
        assert frame.json()["name"] == open_engine.segment_name
    if msg_type is MessageType.NOTIFY:
        assert open_engine.get_notifies() == [NotifyMessage("forged", "evil")]


@pytest.mark.parametrize(
    ("msg_type", "body"),
    [
        (MessageType.METADATA, {}),
        (MessageType.NOTIFY, {"name": "forged", "notify_msg": "evil"}),
        (MessageType.PROBE, {}),
        (MessageType.CONNECTION, {}),
    ],
)
def test_rpc_port_refuses_unauthenticated_peers(
    secured: TransferEngine,
    msg_type: MessageType,
    body: object,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, "pymooncake.rpc"):
        assert raw_rpc(secured.rpc_port, msg_type, body) is None
    assert secured.get_notifies() == []
    assert secured._rpc is not None and secured._rpc.auth_failures == 1
    assert secured._rpc.requests == 0
    text = caplog.text
    assert "without authenticating" in text and "PYMOONCAKE_CLUSTER_TOKEN" in text


def test_token_holders_work_together(config: EngineConfig) -> None:
    a = TransferEngine(LOCAL, config=_cfg(config, TOKEN))
    b = TransferEngine(LOCAL, config=_cfg(config, TOKEN))
    try:
        region = b.allocate(1 << 20)
        src = bytearray(b"x" * 4096)
        a.write(b.segment_name, src, region.addr)  # descriptor over RPC, bytes over TCP
        dst = bytearray(4096)
        a.read(b.segment_name, dst, region.addr)
        assert dst == src
        a.send_notify(b.segment_name, NotifyMessage("n", "m"))
        a.probe(b.segment_name)
        assert b.get_notifies() == [NotifyMessage("n", "m")]
        tcp = b.transport("tcp")
        assert wait_until(lambda: tcp.stats["requests_served"] >= 2)  # counted when parked
        assert tcp.stats["auth_failures"] == 0
    finally:
        a.close()
        b.close()


def test_token_on_one_side_only_both_sides_say_why(
    config: EngineConfig, caplog: pytest.LogCaptureFixture
) -> None:
    with_token = TransferEngine(LOCAL, config=_cfg(config, TOKEN))
    without = TransferEngine(LOCAL, config=_cfg(config))
    try:
        caplog.set_level(logging.ERROR)
        # the token holder asks the open engine: it answers that it has no token
        with pytest.raises(MooncakeError) as info:
            with_token.probe(without.segment_name)
        msg = str(info.value)
        assert "no cluster token" in msg and "PYMOONCAKE_CLUSTER_TOKEN" in msg
        assert without.segment_name.split(":")[1] in msg  # names the peer
        assert "has none" in caplog.text  # ... and the open engine logs it
        caplog.clear()
        # the open engine asks the token holder: refused, with a hint
        with pytest.raises(MooncakeError) as info2:
            without.probe(with_token.segment_name)
        assert "PYMOONCAKE_CLUSTER_TOKEN" in str(info2.value)
        assert "without authenticating" in caplog.text
    finally:
        with_token.close()
        without.close()


def test_different_tokens_are_refused(config: EngineConfig) -> None:
    a = TransferEngine(LOCAL, config=_cfg(config, TOKEN))
    b = TransferEngine(LOCAL, config=_cfg(config, "another-secret-0123456789"))
    try:
        with pytest.raises(AuthenticationError) as info:
            a.probe(b.segment_name)
        assert getattr(info.value.failure, "kind", None) is FailureKind.TOKEN_MISMATCH
        rpc = b._rpc
        assert rpc is not None and wait_until(lambda: rpc.auth_failures == 1)
    finally:
        a.close()
        b.close()


# --- TCP data port ----------------------------------------------------------------------


def test_data_port_open_without_token(open_engine: TransferEngine) -> None:
    """Anyone can dump or overwrite registered memory (the reference's behaviour)."""
    secret = bytearray(b"S" * 4096)
    region = open_engine.register(secret)
    port = open_engine.transport("tcp").data_port
    got = raw_read(port, region.addr, 4096)
    assert got[:8] == STATUS.pack(STATUS_OK) and got[8:] == bytes(secret)
    assert raw_write(port, region.addr, b"W" * 16) == STATUS.pack(STATUS_OK)
    assert secret[:16] == b"W" * 16


def test_data_port_refuses_raw_read_and_write_without_token(
    secured: TransferEngine, caplog: pytest.LogCaptureFixture
) -> None:
    secret = bytearray(b"S" * 4096)
    region = secured.register(secret)
    port = secured.transport("tcp").data_port
    with caplog.at_level(logging.ERROR, "pymooncake.transport.tcp"):
        assert raw_read(port, region.addr, 4096) == STATUS.pack(STATUS_AUTH_REQUIRED)
        assert raw_write(port, region.addr, b"W" * 16) == STATUS.pack(STATUS_AUTH_REQUIRED)
    assert secret == b"S" * 4096
    stats = secured.transport("tcp").stats
    assert stats["requests_served"] == 0 and stats["auth_failures"] == 2
    assert "data port" in caplog.text and "PYMOONCAKE_CLUSTER_TOKEN" in caplog.text


def test_data_transfer_from_an_engine_without_token_is_refused(
    config: EngineConfig, secured: TransferEngine
) -> None:
    """The open engine got the descriptor somehow (e.g. a leaked one): its bytes still
    do not land, and its error says that a token is required."""
    region = secured.allocate(1 << 16)
    without = TransferEngine(LOCAL, config=_cfg(config))
    try:
        desc = secured.local_descriptor()
        from pymooncake.transfer.transports import Peer
        from pymooncake.wire import decode_segment

        peer = Peer(
            name=secured.segment_name,
            desc=decode_segment(desc),
            rpc_host=LOCAL,
            rpc_port=secured.rpc_port,
            data_host=LOCAL,
        )
        with without._directory._lock:
            without._directory._cache[secured.segment_name] = peer
        with pytest.raises(TransferFailed) as info:
            without.write(secured.segment_name, bytearray(b"X" * 1024), region.addr)
        assert "requires the cluster token" in str(info.value)
        assert bytes(region.view[:1024]) == bytes(1024)
    finally:
        without.close()


# --- HTTP metadata server ---------------------------------------------------------------


def _forge(url: str) -> tuple[int, int, int, int]:
    """An attacker without the token: publish a descriptor pointing at itself, read,
    delete; returns the four statuses."""
    parts = urllib.parse.urlsplit(url)
    key = "mooncake/ram/victim"
    target = "/metadata?key=" + urllib.parse.quote(key, safe="")
    evil = json.dumps({"name": "victim", "protocol": "tcp", "tcp_data_port": 1}).encode()
    c = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=5)
    try:
        statuses = []
        for method, body in (("PUT", evil), ("GET", None), ("DELETE", None), ("GET", None)):
            c.request(method, target, body=body)
            resp = c.getresponse()
            resp.read()
            statuses.append(resp.status)
        return tuple(statuses)  # type: ignore[return-value]
    finally:
        c.close()


def test_metadata_server_open_without_token() -> None:
    md = MetadataServer()
    with md.serve() as http:
        assert _forge(md.url(http)) == (200, 200, 200, 404)  # forged, read, deleted


def test_metadata_server_refuses_forgery_without_token() -> None:
    md = MetadataServer()
    md.store["mooncake/ram/victim"] = b'{"name":"victim"}'
    sec = ClusterSecurity(token=TOKEN)
    with md.serve(security=sec) as http:
        assert _forge(md.url(http)) == (401, 401, 401, 401)
        assert md.store == {"mooncake/ram/victim": b'{"name":"victim"}'}
        # /health stays open; a token holder is served and the reply is signed
        assert http_request("GET", http.url + "/health")[0] == 200
        status, body = http_request(
            "GET", md.url(http) + "?key=mooncake%2Fram%2Fvictim", security=sec
        )
        assert (status, body) == (200, b'{"name":"victim"}')
        with pytest.raises(AuthenticationError, match="refused"):
            http_request(
                "GET",
                md.url(http) + "?key=x",
                security=ClusterSecurity(token="wrong-token-0123456789"),
            )


def test_engines_with_token_through_a_metadata_server_with_token(config: EngineConfig) -> None:
    md = MetadataServer()
    sec = ClusterSecurity(token=TOKEN)
    with md.serve(security=sec) as http:
        url = md.url(http)
        cfg = _cfg(config, TOKEN)
        a = TransferEngine("nodeA", url, config=cfg.replace(tcp_bind_address=LOCAL))
        b = TransferEngine("nodeB", url, config=cfg.replace(tcp_bind_address=LOCAL))
        try:
            region = b.allocate(1 << 16)
            a.write("nodeB", bytearray(b"z" * 100), region.addr)
            assert bytes(region.view[:100]) == b"z" * 100
        finally:
            a.close()
            b.close()
        assert md.store == {}  # both unpublished through the authenticated client


def test_engine_and_metadata_server_with_different_token_settings(
    config: EngineConfig, caplog: pytest.LogCaptureFixture
) -> None:
    md = MetadataServer()
    with md.serve() as http:  # server without a token
        caplog.set_level(logging.ERROR)
        with pytest.raises(AuthenticationError) as info:
            TransferEngine("nodeA", md.url(http), config=_cfg(config, TOKEN))
        assert "no cluster token configured" in str(info.value)
        assert "sent cluster-token credentials" in caplog.text  # the server's side
    with md.serve(security=ClusterSecurity(token=TOKEN)) as http:  # engine without one
        with pytest.raises(AuthenticationError) as info2:
            TransferEngine("nodeA", md.url(http), config=_cfg(config))
        assert "requires the cluster token" in str(info2.value)
    assert md.store == {}


def test_surrogate_segment_names_are_refused(config: EngineConfig) -> None:
    with pytest.raises(MooncakeError, match="lone surrogate"):
        TransferEngine("evil\ud800", config=_cfg(config))
    e = TransferEngine(LOCAL, config=_cfg(config))
    try:
        with pytest.raises(MooncakeError, match="lone surrogate"):
            e.open_segment("evil\ud800:1234")
    finally:
        e.close()


def test_cluster_key_equality_is_what_the_engine_uses(config: EngineConfig) -> None:
    assert _cfg(config, TOKEN).security.key == ClusterKey(TOKEN)
    assert TOKEN not in repr(_cfg(config, TOKEN))


def test_token_from_the_environment_of_another_process(config: EngineConfig) -> None:
    """A peer process started with PYMOONCAKE_CLUSTER_TOKEN (EngineConfig.from_env)."""
    import hashlib

    from pymooncake.testing._target import spawn_target

    proc = spawn_target({"PYMOONCAKE_CLUSTER_TOKEN": TOKEN, "PYMOONCAKE_SAME_HOST": "0"})
    ok = TransferEngine(LOCAL, config=_cfg(config, TOKEN).replace(same_host_transport=False))
    bad = TransferEngine(LOCAL, config=_cfg(config).replace(same_host_transport=False))
    try:
        ok.write(proc.segment, bytearray(b"q" * 4096), proc.plain)
        assert proc.digest("plain", 0, 4096) == hashlib.sha256(b"q" * 4096).hexdigest()
        with pytest.raises(MooncakeError, match="PYMOONCAKE_CLUSTER_TOKEN"):
            bad.write(proc.segment, bytearray(b"z" * 4096), proc.plain)
        assert proc.digest("plain", 0, 4096) == hashlib.sha256(b"q" * 4096).hexdigest()
    finally:
        ok.close()
        bad.close()
        proc.close()
