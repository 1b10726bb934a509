"""Socket-level fuzz of the live master: its RPC port and its admin HTTP port.

hypothesis sends random bytes, bytes that start like an authentication HELLO,
well-framed requests with random methods and parameters (JSON of any shape,
strings with lone surrogates, huge or negative numbers), and HTTP requests
with random paths and headers; then the connection is closed, or half-closed
and drained.  Afterwards every connection is gone on the master's side, no
buffered bytes are left, the state passes its cross-index check, the master
still answers a well-formed request -- and with a token, nothing at all was
stored, mounted or removed.  (tests/conftest.py checks that no thread, socket
or process is left behind.)
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from master_support import body, frame

from pymooncake._authio import ClusterSecurity
from pymooncake.store._master_client import MasterClient
from pymooncake.store.master import ThreadedMaster
from pymooncake.store.master._service import MasterLimits
from pymooncake.testing import wait_until
from pymooncake.wire import _master_msgs as msg
from pymooncake.wire._auth import MAGIC

LOCAL = "127.0.0.1"
TOKEN = "fuzz-master-token-0123456789abcdef"

METHODS = [cls.METHOD.value for cls in msg._ALL]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["evil\ud800", "", "k", ".*", "^(a+)+$"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    [
        "client_id",
        "key",
        "keys",
        "size",
        "sizes",
        "config",
        "segment",
        "segment_id",
        "pattern",
        "force",
    ]
)
params = st.dictionaries(field_names, json_values, max_size=5) | json_values


@st.composite
def framed_requests(draw: st.DrawFn) -> bytes:
    """One to three well-framed requests (kind 0) with random methods and parameters."""
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        method = draw(st.sampled_from(METHODS) | st.text(max_size=12))
        body = json.dumps([method, draw(params)], ensure_ascii=True).encode()
        if draw(st.booleans()):  # an rid/ack object, as mutations carry
            extra = {"rid": draw(st.integers(-1, 2**65)), "ack": draw(json_values)}
            body = json.dumps([method, draw(params), extra], ensure_ascii=True).encode()
        out += frame(
            draw(st.integers(0, 2**32 - 1)), body, kind=draw(st.sampled_from([0, 0, 1, 7]))
        )
    return out


rpc_payloads = st.one_of(
    st.binary(max_size=2000),
    st.binary(max_size=200).map(lambda b: MAGIC + b),  # starts like an authentication HELLO
    framed_requests(),
    framed_requests().map(lambda b: b[: len(b) // 2]),  # cut in the middle of a frame
    st.binary(min_size=4, max_size=4).map(lambda b: b + b"\x00" * 9),  # any length prefix
)
http_payloads = st.one_of(
    st.binary(max_size=1500),
    st.builds(
        lambda method, path, headers, body: (
            f"{method} {path} HTTP/1.1\r\n{headers}\r\n".encode("utf-8", "surrogatepass") + body
        ),
        st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "G\x00T"]),
        st.sampled_from(
            ["/", "/metrics", "/get_all_keys", "/query_key?key=%ff", "/login", "/role", "/x" * 40]
        )
        | st.text(max_size=30).map(lambda t: "/" + t),
        st.lists(
            st.sampled_from(
                [
                    "Content-Length: 99999999999999999999999",
                    "Content-Length: 5",
                    "Content-Length: -1",
                    "Authorization: Mooncake-HMAC v=1, ts=1, nonce=00, sig=00",
                    "Cookie: pymooncake_session=abc",
                    "Transfer-Encoding: chunked",
                    "Host: x",
                ]
            ),
            max_size=3,
        ).map(lambda hs: "".join(h + "\r\n" for h in hs)),
        st.binary(max_size=100),
    ),
)


def _poke(address: tuple[str, int], data: bytes, half_close: bool) -> None:
    with socket.create_connection(address, timeout=5) as s:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
                s.settimeout(0.5)
                while s.recv(65536):
                    pass
        except OSError:
            pass


def _summary(master: ThreadedMaster) -> Any:
    def look(st_: Any) -> Any:
        st_.validate()
        return (len(st_.objects), len(st_.segments), len(st_.inflight))

    return master.call(look)


@pytest.fixture(params=["open", "token"])
def master(request: pytest.FixtureRequest) -> Iterator[ThreadedMaster]:
    token = TOKEN if request.param == "token" else ""
    with ThreadedMaster(
        security=ClusterSecurity(token),
        limits=MasterLimits(frame_deadline_s=0.5, auth_timeout_s=0.5, idle_timeout_s=2.0),
    ) as m:
        yield m


def _served(master: ThreadedMaster) -> None:
    client = MasterClient(
        master.rpc_address,
        timeout_s=5.0,
        same_host_rpc=False,
        security=master.service.security,
    )
    try:
        assert client.check_version()
        assert client.call(msg.ExistKey("fuzz-key")).exists is False
    finally:
        client.close()


def test_fuzz_master_rpc_port(master: ThreadedMaster) -> None:
    host, port = master.addresses.rpc
    before = _summary(master)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(rpc_payloads, st.booleans())
    # well-formed requests, so that the open master's handlers are surely reached
    @example(frame(1, body("ServiceReady", {})), True)
    @example(frame(2, body("ExistKey", {"key": "k"})) + frame(3, body("Nope", [])), False)
    def poke(data: bytes, half_close: bool) -> None:
        _poke((host, port), data, half_close)

    poke()
    service = master.service

    def drained() -> tuple[int, int]:  # read on the master's loop: a consistent view
        return master.call(lambda _st: (service.connection_count, service.buffered))

    assert wait_until(lambda: drained() == (0, 0)), drained()
    after = _summary(master)  # validates every index
    counted = master.call(lambda st_: sum(st_.metrics.requests.values()))
    if service.security.token:
        assert after == before  # nothing stored, mounted or removed without the token
        assert counted == 0  # not one request got past the handshake
    else:
        assert counted > 0  # the fuzz reached the handlers, not only the framing
    _served(master)


def test_fuzz_master_admin_http_port(master: ThreadedMaster) -> None:
    assert master.addresses.metrics is not None
    address = master.addresses.metrics
    before = _summary(master)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(http_payloads, st.booleans())
    def poke(data: bytes, half_close: bool) -> None:
        _poke(address, data, half_close)

    poke()
    admin = master.service._admin
    assert admin is not None
    assert wait_until(lambda: (admin.connections, admin.buffered_bytes) == (0, 0)), (
        admin.connections,
        admin.buffered_bytes,
    )
    assert _summary(master) == before  # the admin port changes nothing
    with socket.create_connection(address, timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200")
    _served(master)
