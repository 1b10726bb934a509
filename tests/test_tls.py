"""TLS (stdlib ssl) on the HTTP metadata server/client and the engine RPC port.

Certificates are made at test time with Debian's ``openssl`` (a throw-away CA
and one node certificate); without the binary the tests are skipped.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from pymooncake import EngineConfig, TransferEngine
from pymooncake._authio import ClusterSecurity, secure_client
from pymooncake.errors import AuthenticationError, MooncakeError
from pymooncake.transfer.metadata.http import HttpMetadataStore
from pymooncake.transfer.metadata.server import MetadataServer

LOCAL = "127.0.0.1"
TOKEN = "tls-and-token-test-secret-0123456789"

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="the openssl binary is needed to make test certificates"
)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=pymooncake-test-ca", cwd=d)  # fmt: skip
    _openssl("req", "-new", *ec, "-keyout", "node.key", "-out", "node.csr",
             "-subj", "/CN=node", cwd=d)  # fmt: skip
    _openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "node.pem", "-days", "2", cwd=d)  # fmt: skip
    # a certificate from another CA: must be refused
    _openssl("req", "-x509", *ec, "-keyout", "rogue.key", "-out", "rogue.pem", "-days", "2",
             "-subj", "/CN=rogue", cwd=d)  # fmt: skip
    return d


@pytest.fixture
def security(pki: Path) -> ClusterSecurity:
    return ClusterSecurity(
        token=TOKEN,
        tls_cert_file=str(pki / "node.pem"),
        tls_key_file=str(pki / "node.key"),
        tls_ca_file=str(pki / "ca.pem"),
    )


def test_from_env_reads_the_tls_files(pki: Path) -> None:
    sec = ClusterSecurity.from_env(
        {
            "PYMOONCAKE_TLS_CERT": str(pki / "node.pem"),
            "PYMOONCAKE_TLS_KEY": str(pki / "node.key"),
            "PYMOONCAKE_TLS_CA": str(pki / "ca.pem"),
        }
    )
    assert sec.tls and isinstance(sec.server_ssl_context(), ssl.SSLContext)
    cfg = EngineConfig.from_env({"PYMOONCAKE_TLS_CERT": str(pki / "node.pem"),
                                 "PYMOONCAKE_TLS_KEY": str(pki / "node.key"),
                                 "PYMOONCAKE_TLS_CA": str(pki / "ca.pem")})  # fmt: skip
    assert cfg.security.tls


def test_https_metadata_server_and_client(security: ClusterSecurity, pki: Path) -> None:
    md = MetadataServer()
    with md.serve(security=security) as http:
        assert http.url.startswith("https://")
        url = md.url(http)
        client = HttpMetadataStore(url, security=security)
        try:
            client.set("mooncake/ram/a", b'{"x":1}')
            assert client.get("mooncake/ram/a") == b'{"x":1}'
            assert client.remove("mooncake/ram/a")
        finally:
            client.close()
        # plain HTTP to the TLS port gets nowhere
        with socket.create_connection((LOCAL, http.port), timeout=5) as s:
            s.sendall(b"GET /metadata?key=a HTTP/1.1\r\n\r\n")
            try:
                data = s.recv(100)
            except ConnectionResetError:
                data = b""
            assert not data.startswith(b"HTTP/1.1 200")
        # a client whose certificate comes from another CA is refused
        rogue = ClusterSecurity(
            token=TOKEN,
            tls_cert_file=str(pki / "rogue.pem"),
            tls_key_file=str(pki / "rogue.key"),
            tls_ca_file=str(pki / "ca.pem"),
        )
        bad = HttpMetadataStore(url, security=rogue)
        try:
            with pytest.raises(MooncakeError):
                bad.get("x")
        finally:
            bad.close()


def test_engine_rpc_port_over_tls(config: EngineConfig, security: ClusterSecurity) -> None:
    cfg = config.replace(
        cluster_token=security.token,
        tls_cert_file=security.tls_cert_file,
        tls_key_file=security.tls_key_file,
        tls_ca_file=security.tls_ca_file,
    )
    a = TransferEngine(LOCAL, config=cfg)
    b = TransferEngine(LOCAL, config=cfg)
    try:
        region = b.allocate(1 << 16)
        a.write(b.segment_name, bytearray(b"t" * 64), region.addr)  # descriptor over TLS RPC
        assert bytes(region.view[:64]) == b"t" * 64
        a.probe(b.segment_name)
        # a plain (non-TLS) peer cannot talk to it
        plain = TransferEngine(LOCAL, config=config.replace(cluster_token=TOKEN))
        try:
            with pytest.raises(MooncakeError):
                plain.probe(b.segment_name)
        finally:
            plain.close()
    finally:
        a.close()
        b.close()


def _one_peer(behave: Callable[[socket.socket], None]) -> tuple[socket.socket, threading.Thread]:
    """A listener on 127.0.0.1 whose one accepted connection gets ``behave``."""
    listener = socket.create_server((LOCAL, 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, contextlib.suppress(OSError):
            behave(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_secure_client_tells_a_foreign_certificate_from_a_connection_that_ended(
    security: ClusterSecurity, pki: Path
) -> None:
    """Every client connects through ``secure_client``: a certificate from another
    CA is a configuration error whose message names the fix; a peer that closes
    during the TLS handshake (a master restarting) is a connection error, which
    callers retry.  The socket is closed either way."""
    rogue = ClusterSecurity(
        token=TOKEN,
        tls_cert_file=str(pki / "rogue.pem"),
        tls_key_file=str(pki / "rogue.key"),
        tls_ca_file=str(pki / "ca.pem"),
    ).server_ssl_context()
    assert rogue is not None

    def present_rogue(conn: socket.socket) -> None:
        rogue.wrap_socket(conn, server_side=True).close()

    cases: list[tuple[Callable[[socket.socket], None], type[BaseException], str | None]] = [
        (present_rogue, AuthenticationError, "same cluster CA"),
        (lambda conn: None, OSError, None),  # accepted, then closed at once
    ]
    for behave, error, text in cases:
        listener, thread = _one_peer(behave)
        sock = socket.create_connection(listener.getsockname(), timeout=5)
        try:
            with pytest.raises(error, match=text) as info:
                secure_client(
                    sock,
                    ssl_context=security.client_ssl_context(),
                    key=security.key,
                    context=b"test",
                    timeout_s=5.0,
                    port="test port",
                    peer="127.0.0.1:1",
                    server_hostname=LOCAL,
                )
            if error is OSError:
                assert not isinstance(info.value, AuthenticationError)
            assert sock.fileno() == -1  # closed by secure_client
        finally:
            sock.close()
            thread.join(5)
            listener.close()
