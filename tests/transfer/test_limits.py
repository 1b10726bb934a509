"""Bounded resources on the engine's listeners and the metadata server.

Each test is one defect of issue 7 that the code before it did not handle: idle
and slow connections held forever, a notify flood growing memory without bound,
a thread (and 256 KiB) per idle data connection, hostile JSON and lengths.
"""

from __future__ import annotations

import http.client
import logging
import os
import resource
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from pymooncake import EngineConfig, NotifyMessage, TransferEngine
from pymooncake._httpd import HttpLimits
from pymooncake.errors import HandshakeRejected
from pymooncake.testing import wait_until
from pymooncake.transfer.metadata.server import MetadataServer
from pymooncake.wire import (
    STATUS,
    STATUS_OK,
    Frame,
    FrameDecoder,
    MessageType,
    encode_frame,
    encode_frame_json,
    encode_header,
)

LOCAL = "127.0.0.1"


def closed_within(s: socket.socket, seconds: float) -> bool:
    """The peer closes ``s`` (EOF or reset) within ``seconds``."""
    s.settimeout(seconds)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def rpc_reply(port: int, raw: bytes) -> Frame | None:
    with socket.create_connection((LOCAL, port), timeout=5) as s:
        s.sendall(raw)
        data = bytearray()
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    dec = FrameDecoder()
    dec.feed(bytes(data))
    frame = dec.next_frame()
    return frame if isinstance(frame, Frame) else None


@pytest.fixture
def engine(config: EngineConfig) -> Iterator[TransferEngine]:
    e = TransferEngine(
        LOCAL,
        config=config.replace(
            rpc_server_timeout_s=0.5,
            rpc_max_connections=8,
            rpc_max_buffered_bytes=64 << 10,
            notify_queue_max=10,
            notify_queue_max_bytes=1 << 20,
            tcp_status_timeout_s=0.5,
            data_max_connections=600,
        ),
    )
    try:
        yield e
    finally:
        e.close()


# --- RPC port ------------------------------------------------------------------------


def test_rpc_idle_and_slow_connections_are_closed(engine: TransferEngine) -> None:
    with socket.create_connection((LOCAL, engine.rpc_port), timeout=5) as idle:
        start = time.monotonic()
        assert idle.recv(10) == b""
        assert time.monotonic() - start < 3
    frame = encode_frame_json(MessageType.PROBE, {})
    with socket.create_connection((LOCAL, engine.rpc_port), timeout=5) as slow:
        start = time.monotonic()
        for b in frame[:5]:  # a slow-loris: one byte now and then
            slow.sendall(bytes([b]))
            time.sleep(0.15)
        assert slow.recv(10) == b""
        assert time.monotonic() - start < 3


def test_rpc_connection_cap(engine: TransferEngine) -> None:
    rpc = engine._rpc
    assert rpc is not None
    held = [socket.create_connection((LOCAL, engine.rpc_port), timeout=5) for _ in range(8)]
    try:
        assert wait_until(lambda: rpc.connections == 8)
        with socket.create_connection((LOCAL, engine.rpc_port), timeout=5) as extra:
            try:
                assert extra.recv(10) == b""
            except ConnectionResetError:
                pass
        assert rpc.refused_connections == 1
    finally:
        for s in held:
            s.close()
    # capacity comes back once they are gone
    assert wait_until(lambda: rpc.connections == 0)
    assert rpc_reply(engine.rpc_port, encode_frame_json(MessageType.PROBE, {})) is not None


def test_rpc_aggregate_buffer_limit(engine: TransferEngine) -> None:
    rpc = engine._rpc
    assert rpc is not None
    # each announces a 40 KiB frame (under the 1 MiB frame limit); two exceed the 64 KiB budget
    head = struct.pack("<Q", 40 << 10)
    a = socket.create_connection((LOCAL, engine.rpc_port), timeout=5)
    b = socket.create_connection((LOCAL, engine.rpc_port), timeout=5)
    try:
        a.sendall(head + b"\x03")
        assert wait_until(lambda: rpc._buffered > 0)
        b.sendall(head + b"\x03")
        assert b.recv(10) == b""  # refused before its payload is read
        assert rpc.refused_busy == 1
    finally:
        a.close()
        b.close()
    assert wait_until(lambda: rpc._buffered == 0)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000 + b"\n",  # deep nesting (RecursionError before)
        b'{"name": NaN, "notify_msg": Infinity}\n',
        b'{"name": "evil\\ud800", "notify_msg": "x"}\n',  # a lone surrogate
        b'{"name": "a", "notify_msg": 1e999}\n',
        b'{"name": "a", "notify_msg": ' + b"9" * 5000 + b"}\n",
    ],
)
def test_rpc_hostile_json_is_refused_and_the_server_lives_on(
    engine: TransferEngine, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "pymooncake.rpc"):
        assert rpc_reply(engine.rpc_port, encode_frame(MessageType.NOTIFY, body)) is None
    assert "Traceback" not in caplog.text and "Task exception" not in caplog.text
    assert engine.get_notifies() == []
    assert rpc_reply(engine.rpc_port, encode_frame_json(MessageType.PROBE, {})) is not None


def test_notify_flood_is_bounded_by_count(config: EngineConfig, engine: TransferEngine) -> None:
    sender = TransferEngine(LOCAL, config=config)
    try:
        for i in range(10):
            sender.send_notify(engine.segment_name, NotifyMessage("n", str(i)))
        with pytest.raises(HandshakeRejected, match=r"notification queue .* is full"):
            sender.send_notify(engine.segment_name, NotifyMessage("n", "overflow"))
        assert engine.notifies_refused == 1
        assert len(engine.get_notifies()) == 10
        sender.send_notify(engine.segment_name, NotifyMessage("n", "again"))  # drained: room
        assert engine.get_notifies() == [NotifyMessage("n", "again")]
    finally:
        sender.close()


def test_notify_flood_is_bounded_by_bytes(config: EngineConfig, engine: TransferEngine) -> None:
    """100 x 1 MiB notifies grew the queue by 100 MiB before; here 1 MiB is the cap."""
    sender = TransferEngine(LOCAL, config=config.replace(handshake_max_length=2 << 20))
    engine_big = TransferEngine(
        LOCAL,
        config=config.replace(handshake_max_length=2 << 20, notify_queue_max_bytes=1 << 20),
    )
    try:
        big = "x" * (400 << 10)
        accepted = refused = 0
        for _ in range(6):
            try:
                sender.send_notify(engine_big.segment_name, NotifyMessage("n", big))
                accepted += 1
            except HandshakeRejected:
                refused += 1
        assert (accepted, refused) == (2, 4)
        assert engine_big._notify_bytes <= 1 << 20
    finally:
        sender.close()
        engine_big.close()


# --- TCP data port -----------------------------------------------------------------------


def _rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_500_idle_data_connections_cost_no_threads(engine: TransferEngine) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1200  # 500 connections are 1000 descriptors here (both ends)
    if soft < want:
        cap = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (cap, hard))
    # a hard limit below 1200 (rare): as many as fit, still far more than workers
    n = min(500, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200) // 2)
    try:
        _idle_connections(engine, n)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _idle_connections(engine: TransferEngine, n: int) -> None:
    assert n >= 200
    tcp = engine.transport("tcp")
    port = tcp.data_port
    region = engine.allocate(1 << 16)
    threads_before = threading.active_count()
    rss_before = _rss_kib()
    conns = [socket.create_connection((LOCAL, port), timeout=5) for _ in range(n)]
    try:
        assert wait_until(lambda: tcp.stats["connections"] == n)
        time.sleep(0.2)
        assert threading.active_count() == threads_before  # not one thread more
        grown = _rss_kib() - rss_before
        assert grown < 20 << 10, f"{n} idle connections grew RSS by {grown} KiB"
        # they are all alive: a request on the last one is served
        c = conns[-1]
        c.sendall(encode_header(8, region.addr, is_write=True, v2=True) + b"12345678")
        assert c.recv(8) == STATUS.pack(STATUS_OK)
        assert bytes(region.view[:8]) == b"12345678"
    finally:
        for c in conns:
            c.close()
    assert wait_until(lambda: tcp.stats["connections"] == 0)


def test_a_connection_parked_while_the_engine_closes_is_closed(engine: TransferEngine) -> None:
    """A worker that finishes a request and parks its connection just as close()
    runs must close it (the reactor that would take it back is gone); it used to
    stay open forever (an unclosed socket, seen under load in the full suite)."""
    server = engine.transport("tcp")._server
    serving = threading.Event()
    seen: list[socket.socket] = []

    def serve_until_closed(conn, reader, slot):  # type: ignore[no-untyped-def]
        seen.append(conn.sock)
        serving.set()
        assert wait_until(lambda: server._closed)
        return True  # "went idle: park it" -- after close() collected what to close

    server._serve = serve_until_closed
    region = engine.allocate(4096)
    with socket.create_connection((LOCAL, server.port), timeout=5) as c:
        c.sendall(encode_header(8, region.addr, is_write=True, v2=True) + b"12345678")
        assert serving.wait(5)
        engine.close()
        assert seen[0].fileno() == -1  # closed by the worker, not leaked
        c.settimeout(5)
        assert c.recv(1) == b""  # the peer sees the close


def test_data_connection_cap(config: EngineConfig) -> None:
    e = TransferEngine(LOCAL, config=config.replace(data_max_connections=4))
    try:
        tcp = e.transport("tcp")
        held = [socket.create_connection((LOCAL, tcp.data_port), timeout=5) for _ in range(4)]
        try:
            assert wait_until(lambda: tcp.stats["connections"] == 4)
            with socket.create_connection((LOCAL, tcp.data_port), timeout=5) as extra:
                assert closed_within(extra, 3)
            assert tcp.stats["refused_connections"] == 1
        finally:
            for s in held:
                s.close()
    finally:
        e.close()


def test_data_partial_header_and_stalled_payload_time_out(engine: TransferEngine) -> None:
    tcp = engine.transport("tcp")
    region = engine.allocate(1 << 16)
    with socket.create_connection((LOCAL, tcp.data_port), timeout=5) as partial:
        partial.sendall(encode_header(8, region.addr, is_write=True, v2=True)[:10])
        start = time.monotonic()
        assert closed_within(partial, 5)
        assert time.monotonic() - start < 4
    with socket.create_connection((LOCAL, tcp.data_port), timeout=5) as stalled:
        stalled.sendall(encode_header(4096, region.addr, is_write=True, v2=True) + b"x" * 100)
        start = time.monotonic()
        assert closed_within(stalled, 5)
        assert time.monotonic() - start < 4
    assert wait_until(lambda: tcp.stats["timed_out"] == 2)


def test_data_handshake_deadline(config: EngineConfig) -> None:
    e = TransferEngine(LOCAL, config=config.replace(cluster_token="t" * 32, auth_timeout_s=0.3))
    try:
        tcp = e.transport("tcp")
        with socket.create_connection((LOCAL, tcp.data_port), timeout=5) as s:
            s.sendall(b"MCAUTH1\n")  # the start of a HELLO, then nothing
            start = time.monotonic()
            assert closed_within(s, 5)
            assert time.monotonic() - start < 3
        assert tcp.stats["timed_out"] == 1
    finally:
        e.close()


def test_rejection_log_limiter_is_keyed_by_host(
    engine: TransferEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the key held the peer's ephemeral port: it never limited and grew forever."""
    tcp = engine.transport("tcp")
    with caplog.at_level(logging.WARNING, "pymooncake.transport.tcp"):
        for _ in range(50):
            with socket.create_connection((LOCAL, tcp.data_port), timeout=5) as s:
                s.sendall(encode_header(8, 0x10, is_write=False, v2=True))
                s.recv(8)
    assert wait_until(lambda: tcp.stats["requests_rejected"] == 50)
    assert caplog.text.count("not within any registered buffer") == 1
    assert len(tcp.server._log) == 1


# --- HTTP metadata server -----------------------------------------------------------------


def _raw_http(port: int, raw: bytes, timeout: float = 5) -> bytes:
    with socket.create_connection((LOCAL, port), timeout=timeout) as s:
        s.sendall(raw)
        data = bytearray()
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return bytes(data)


@pytest.fixture
def md_http() -> Iterator[tuple[MetadataServer, int]]:
    md = MetadataServer()
    limits = HttpLimits(header_timeout_s=0.5, body_timeout_s=0.5, max_connections=4)
    with md.serve(limits=limits) as http:
        yield md, http.port


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"name": NaN}', "invalid JSON"),
        (b'{"x": Infinity}', "invalid JSON"),
        (b"[" * 5000 + b"]" * 5000, "deeper"),
        (b'{"name": "evil\\ud800"}', "lone surrogate"),
        (b"\xff\xfe", "invalid JSON"),
    ],
)
def test_metadata_put_of_hostile_json_is_400(
    md_http: tuple[MetadataServer, int], body: bytes, why: str
) -> None:
    md, port = md_http
    c = http.client.HTTPConnection(LOCAL, port, timeout=5)
    try:
        c.request("PUT", "/metadata?key=mooncake%2Fram%2Fx", body=body)
        resp = c.getresponse()
        text = resp.read().decode()
        assert resp.status == 400 and why in text
        c.request("GET", "/health")  # same connection: still served
        assert c.getresponse().status == 200
    finally:
        c.close()
    assert md.store == {}


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 413),
        (
            b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 0000000000000000000000000005\r\n\r\nhello",
            200,
        ),
        (b"GET /metadata?key=%ED%A0%80 HTTP/1.1\r\n\r\n", 400),  # a surrogate, percent-encoded
        (b"GET /metadata?key=%FF HTTP/1.1\r\n\r\n", 400),
        (b"GET http://[::1 HTTP/1.1\r\n\r\n", 400),
    ],
)
def test_metadata_hostile_requests_get_an_error_reply(
    md_http: tuple[MetadataServer, int], raw: bytes, status: int
) -> None:
    _, port = md_http
    data = _raw_http(port, raw + b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert data.startswith(f"HTTP/1.1 {status} ".encode()), data[:100]


def test_metadata_key_with_surrogate_refused_directly() -> None:
    md = MetadataServer()
    resp = md.handle_metadata("PUT", "evil\ud800", b"{}")
    assert resp.status == 400 and b"surrogate" in resp.body
    assert md.handle_metadata("PUT", "k" * 5000, b"{}").status == 400
    assert md.store == {}


def test_metadata_slow_headers_and_body_get_408(md_http: tuple[MetadataServer, int]) -> None:
    md, port = md_http
    start = time.monotonic()
    assert _raw_http(port, b"GET /metadata?key=k HTTP/1.1\r\nX-Slow: ").startswith(b"HTTP/1.1 408 ")
    assert _raw_http(
        port, b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 100\r\n\r\nonly-part"
    ).startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - start < 4
    assert md.store == {}


def test_metadata_connection_cap_answers_503(md_http: tuple[MetadataServer, int]) -> None:
    _, port = md_http
    held = [socket.create_connection((LOCAL, port), timeout=5) for _ in range(4)]
    try:
        time.sleep(0.1)
        assert _raw_http(port, b"GET /health HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 503 ")
    finally:
        for s in held:
            s.close()


def test_metadata_aggregate_body_budget() -> None:
    md = MetadataServer()
    limits = HttpLimits(max_buffered_bytes=100_000, body_timeout_s=5)
    with md.serve(limits=limits) as http:
        port = http.port
        server = http.server
        first = socket.create_connection((LOCAL, port), timeout=5)
        try:
            first.sendall(b"PUT /metadata?key=a HTTP/1.1\r\nContent-Length: 80000\r\n\r\nxx")
            assert wait_until(lambda: server.buffered_bytes == 80000)
            data = _raw_http(port, b"PUT /metadata?key=b HTTP/1.1\r\nContent-Length: 30000\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in data
            assert server.refused_busy == 1
        finally:
            first.close()
        assert wait_until(lambda: server.buffered_bytes == 0)


def test_fair_turns_never_strand_buffered_requests(config: EngineConfig) -> None:
    """One worker, two connections pipelining 1000 READs each: the worker takes turns
    between them and every request is answered (a connection parked while its
    requests sat in the worker's buffer would wait for its socket forever)."""
    e = TransferEngine(LOCAL, config=config.replace(data_workers=1))
    try:
        region = e.allocate(1 << 16)
        region.view[:8] = b"abcdefgh"
        port = e.transport("tcp").data_port
        n = 1000
        burst = encode_header(8, region.addr, is_write=False, v2=True) * n
        socks = [socket.create_connection((LOCAL, port), timeout=10) for _ in range(2)]
        try:
            for s in socks:
                s.sendall(burst)
            for s in socks:
                want = n * 16
                got = bytearray()
                while len(got) < want:
                    chunk = s.recv(65536)
                    assert chunk, f"closed after {len(got)} of {want} bytes"
                    got += chunk
                assert bytes(got) == (STATUS.pack(STATUS_OK) + b"abcdefgh") * n
        finally:
            for s in socks:
                s.close()
    finally:
        e.close()
