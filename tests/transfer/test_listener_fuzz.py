"""Socket-level fuzz of the live listeners: random bytes, then close.

Afterwards every connection is gone on the server side, no thread is left over
(the leak check of tests/conftest.py), nothing was written into registered
memory, and the listener still serves a well-formed request.
"""

from __future__ import annotations

import socket
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from pymooncake import EngineConfig, TransferEngine
from pymooncake._httpd import HttpLimits
from pymooncake.testing import wait_until
from pymooncake.transfer.metadata.server import MetadataServer
from pymooncake.wire._auth import MAGIC

LOCAL = "127.0.0.1"

payloads = st.one_of(
    st.binary(max_size=3000),
    st.binary(max_size=200).map(lambda b: MAGIC + b),  # starts like an authentication HELLO
    st.binary(max_size=200).map(lambda b: b"\x10\x00\x00\x00\x00\x00\x00\x00" + b),
    st.binary(max_size=200).map(lambda b: b"PUT /metadata?key=x HTTP/1.1\r\n" + b),
)


def _poke(port: int, data: bytes, half_close: bool) -> None:
    with socket.create_connection((LOCAL, port), timeout=5) as s:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
                s.settimeout(0.5)
                while s.recv(65536):
                    pass
        except OSError:
            pass


def _engine(config: EngineConfig, token: str) -> TransferEngine:
    return TransferEngine(
        LOCAL,
        config=config.replace(
            cluster_token=token,
            rpc_server_timeout_s=0.5,
            auth_timeout_s=0.5,
            tcp_status_timeout_s=0.5,
        ),
    )


def _fuzz_engine(config: EngineConfig, token: str) -> None:
    e = _engine(config, token)
    try:
        memory = bytearray(1 << 16)
        e.register(memory)
        tcp = e.transport("tcp")
        rpc = e._rpc
        assert rpc is not None
        threads = threading.active_count()

        @settings(max_examples=25)
        @given(payloads, st.booleans())
        def poke_both(data: bytes, half_close: bool) -> None:
            _poke(e.rpc_port, data, half_close)
            _poke(tcp.data_port, data, half_close)

        poke_both()
        assert wait_until(lambda: rpc.connections == 0 and tcp.stats["connections"] == 0)
        assert memory == bytes(len(memory))
        # the listeners still work (worker threads may remain until they idle out)
        peer = _engine(config, token)
        try:
            region = e.allocate(4096)
            peer.write(e.segment_name, bytearray(b"ok" * 8), region.addr)
            peer.probe(e.segment_name)
        finally:
            peer.close()
        assert threading.active_count() <= threads + config.data_workers
    finally:
        e.close()


def test_fuzz_engine_ports_without_token(config: EngineConfig) -> None:
    _fuzz_engine(config, "")


def test_fuzz_engine_ports_with_token(config: EngineConfig) -> None:
    _fuzz_engine(config, "fuzz-token-0123456789abcdef")


def test_fuzz_metadata_server() -> None:
    md = MetadataServer()
    with md.serve(limits=HttpLimits(header_timeout_s=0.5, body_timeout_s=0.5)) as http:

        @settings(max_examples=40)
        @given(payloads, st.booleans())
        def poke(data: bytes, half_close: bool) -> None:
            _poke(http.port, data, half_close)

        poke()
        assert wait_until(lambda: http.server.connections == 0)
        assert http.server.buffered_bytes == 0
        with socket.create_connection((LOCAL, http.port), timeout=5) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")
    # what was stored came through well-formed requests only
    assert all(isinstance(v, bytes) for v in md.store.values())
