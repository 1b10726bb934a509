"""Property tests of the authentication decoders: any bytes, any split, no crash."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pymooncake.wire._auth import (
    CHALLENGE_SIZE,
    HELLO_SIZE,
    MAGIC,
    ClientHandshake,
    ClusterKey,
    HttpAuthError,
    ReplayCache,
    ServerHandshake,
    verify_request,
)

KEY = ClusterKey("property-test token 0123456789")
CTX = b"te-data"

# random bytes, and random bytes behind a valid magic (reaches the deeper states)
_payload = st.one_of(
    st.binary(max_size=400),
    st.binary(max_size=200).map(lambda b: MAGIC + b),
    st.binary(max_size=200).map(lambda b: MAGIC + b"\x01\x01\x00\x00" + b),
)
_splits = st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=20)


def _feed_split(side: ClientHandshake | ServerHandshake, data: bytes, sizes: list[int]) -> None:
    pos = 0
    i = 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        side.feed(data[pos : pos + n])
        side.bytes_to_send()
        pos += n
        i += 1


def _check_bounded(side: ClientHandshake | ServerHandshake, limit: int) -> None:
    # before it finishes, a side never holds more than one message
    if not side.finished:
        assert len(side._buf) < limit
        assert 1 <= side.want <= limit
    else:
        assert side.want == 0


@given(_payload, _splits)
def test_server_any_input(data: bytes, sizes: list[int]) -> None:
    s = ServerHandshake(KEY, CTX)
    _feed_split(s, data, sizes)
    _check_bounded(s, max(HELLO_SIZE, CHALLENGE_SIZE))
    assert not s.done  # nobody without the key gets in
    s.feed_eof()
    assert s.failed is not None


@given(_payload, _splits)
def test_client_any_input(data: bytes, sizes: list[int]) -> None:
    c = ClientHandshake(KEY, CTX)
    c.bytes_to_send()
    _feed_split(c, data, sizes)
    _check_bounded(c, CHALLENGE_SIZE)
    assert not c.done
    c.feed_eof()
    assert c.failed is not None


@given(st.one_of(st.none(), st.text(max_size=300)), st.binary(max_size=64), st.text(max_size=50))
def test_http_verify_any_header(header: str | None, body: bytes, target: str) -> None:
    try:
        verify_request(KEY, b"http-metadata", "GET", target, header, body, now=1e9,
                       replay=ReplayCache())  # fmt: skip
    except HttpAuthError as exc:
        assert exc.status == 401
    else:  # pragma: no cover - a random header is never a valid signature
        raise AssertionError("accepted a random Authorization header")
