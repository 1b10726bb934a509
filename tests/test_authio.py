"""The authentication I/O helpers over real sockets and asyncio streams."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable

import pytest

from pymooncake._authio import (
    ClusterSecurity,
    client_handshake,
    client_handshake_async,
    server_handshake,
    server_handshake_async,
)
from pymooncake.errors import AuthenticationError, ConfigError
from pymooncake.wire._auth import ClusterKey, FailureKind, no_token_reply

TOKEN = "test-cluster-token-0123456789"
KEY = ClusterKey(TOKEN)


def _in_thread(fn: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, errors


def test_blocking_handshake_and_pipelined_request_stays_in_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        t, errors = _in_thread(
            lambda: server_handshake(b, KEY, b"te-rpc", timeout_s=5, port="test port", peer="a")
        )
        client_handshake(a, KEY, b"te-rpc", timeout_s=5, port="test port", peer="b")
        a.sendall(b"first request")
        t.join()
        assert not errors
        assert b.recv(100) == b"first request"  # the helper read nothing beyond the handshake
        assert a.gettimeout() is None and b.gettimeout() is None


@pytest.mark.parametrize(
    ("client_token", "server_ctx", "kind"),
    [
        ("a different token 0123456789", b"te-rpc", FailureKind.TOKEN_MISMATCH),
        (TOKEN, b"te-data", FailureKind.TOKEN_MISMATCH),
    ],
)
def test_blocking_handshake_failures_name_port_peer_and_fix(
    client_token: str, server_ctx: bytes, kind: FailureKind
) -> None:
    a, b = socket.socketpair()
    with a, b:
        t, errors = _in_thread(
            lambda: server_handshake(b, KEY, server_ctx, timeout_s=5, port="data port", peer="A")
        )
        with pytest.raises(AuthenticationError) as info:
            client_handshake(
                a, ClusterKey(client_token), b"te-rpc", timeout_s=5, port="RPC port", peer="B"
            )
        t.join()
    msg = str(info.value)
    assert "RPC port" in msg and "B" in msg and "PYMOONCAKE_CLUSTER_TOKEN" in msg
    assert getattr(info.value.failure, "kind", None) is kind
    assert len(errors) == 1 and isinstance(errors[0], AuthenticationError)
    assert "data port" in str(errors[0]) and "different cluster token" in str(errors[0])


def test_client_against_server_without_token_and_against_a_silent_closer() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(no_token_reply())
        with pytest.raises(AuthenticationError, match="no cluster token configured"):
            client_handshake(a, KEY, b"te-rpc", timeout_s=5, port="p", peer="x")
    a, b = socket.socketpair()
    with a, b:
        b.close()
        with pytest.raises(AuthenticationError, match="reference engines cannot authenticate"):
            client_handshake(a, KEY, b"te-rpc", timeout_s=5, port="p", peer="x")


def test_handshake_deadline() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(AuthenticationError, match=r"within 0\.2 s"):
        server_handshake(b, KEY, b"te-rpc", timeout_s=0.2, port="p", peer="slowloris")


def test_async_handshake_both_sides() -> None:
    async def main() -> bytes:
        got = asyncio.get_running_loop().create_future()

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                await server_handshake_async(
                    r, w, KEY, b"master-rpc", timeout_s=5, port="m", peer="c"
                )
                got.set_result(await r.read(100))
            except BaseException as exc:
                got.set_exception(exc)
            finally:
                w.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await client_handshake_async(r, w, KEY, b"master-rpc", timeout_s=5, port="m", peer="s")
        w.write(b"hello master")
        await w.drain()
        data = await got
        w.close()
        await w.wait_closed()
        server.close()
        await server.wait_closed()
        return data

    assert asyncio.run(main()) == b"hello master"


def test_async_server_refuses_unauthenticated_request() -> None:
    async def main() -> AuthenticationError:
        got = asyncio.get_running_loop().create_future()

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                await server_handshake_async(
                    r, w, KEY, b"te-rpc", timeout_s=5, port="RPC", peer="x"
                )
            except AuthenticationError as exc:
                got.set_result(exc)
            finally:
                w.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"\x04\x00\x00\x00\x00\x00\x00\x00\x03{}\n")  # a plain Probe
        await w.drain()
        assert await r.read() == b""  # closed without an answer
        err = await got
        w.close()
        await w.wait_closed()
        server.close()
        await server.wait_closed()
        return err

    err = asyncio.run(main())
    assert "without authenticating" in str(err) and "PYMOONCAKE_CLUSTER_TOKEN" in str(err)


def test_security_config_from_env() -> None:
    sec = ClusterSecurity.from_env({"PYMOONCAKE_CLUSTER_TOKEN": TOKEN})
    assert sec.key == KEY and TOKEN not in repr(sec)
    assert ClusterSecurity.from_env({}).key is None
    assert not sec.tls and sec.server_ssl_context() is None and sec.client_ssl_context() is None
    with pytest.raises(ConfigError, match="half configured"):
        ClusterSecurity.from_env({"PYMOONCAKE_TLS_CERT": "/x.pem"})
    with pytest.raises(ConfigError, match="surrogate"):
        ClusterSecurity(token="bad\udc80")
    with pytest.raises(ConfigError, match="cannot load TLS files"):
        ClusterSecurity(
            tls_cert_file="/nonexistent.pem", tls_key_file="/k.pem", tls_ca_file="/ca.pem"
        ).server_ssl_context()


def test_first_request_pipelined_behind_proof() -> None:
    a, b = socket.socketpair()
    with a, b:
        got: list[bytes] = []

        def serve() -> None:
            server_handshake(b, KEY, b"te-rpc", timeout_s=5, port="p", peer="a")
            got.append(b.recv(100))  # read only after the proof checked out

        t, errors = _in_thread(serve)
        client_handshake(
            a, KEY, b"te-rpc", timeout_s=5, port="p", peer="b", first_request=b"GET-ME"
        )
        t.join()
        assert not errors and got == [b"GET-ME"]
