"""Cluster authentication messages: exact bytes, incremental feeding, every refusal."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest

from pymooncake.wire._auth import (
    CHALLENGE_SIZE,
    HELLO_SIZE,
    HTTP_AUTH_SCHEME,
    MAGIC,
    MAGIC_U64,
    PROOF_SIZE,
    RESULT_SIZE,
    AuthCode,
    ClientHandshake,
    ClusterKey,
    FailureKind,
    HttpAuthError,
    ReplayCache,
    ServerHandshake,
    looks_like_hello,
    no_token_reply,
    sign_request,
    sign_response,
    verify_request,
    verify_response,
)

TOKEN = "correct horse battery staple"
CN = bytes(range(32))
SN = bytes(range(100, 132))
CTX = b"te-rpc"


def _key(token: str) -> bytes:
    # the documented derivation, written independently of the module
    return hmac.new(b"pymooncake cluster token v1", token.encode(), hashlib.sha256).digest()


def _proof(token: str, role: bytes, ctx: bytes, cn: bytes, sn: bytes) -> bytes:
    msg = b"pymooncake-auth-v1\x00" + role + b"\x00" + bytes([len(ctx)]) + ctx + cn + sn
    return hmac.new(_key(token), msg, hashlib.sha256).digest()


HELLO = b"MCAUTH1\n" + b"\x01\x01\x00\x00" + CN
CHALLENGE = b"MCAUTH1\n" + b"\x02\x01\x00\x00" + SN + _proof(TOKEN, b"server", CTX, CN, SN)
PROOF = b"MCAUTH1\n" + b"\x03\x01\x00\x00" + _proof(TOKEN, b"client", CTX, CN, SN)
RESULT_OK = b"MCAUTH1\n" + b"\x04\x01\x00\x00"
RESULT_BAD = b"MCAUTH1\n" + b"\x04\x01\x03\x00"


def _pair(
    client_token: str = TOKEN, server_token: str = TOKEN, ctx: tuple[bytes, bytes] = (CTX, CTX)
) -> tuple[ClientHandshake, ServerHandshake]:
    c = ClientHandshake(ClusterKey(client_token), ctx[0], nonce=CN)
    s = ServerHandshake(ClusterKey(server_token), ctx[1], nonce=SN)
    return c, s


def _run(c: ClientHandshake, s: ServerHandshake) -> None:
    for _ in range(4):
        s.feed(c.bytes_to_send())
        c.feed(s.bytes_to_send())


def test_sizes_and_magic() -> None:
    assert (HELLO_SIZE, CHALLENGE_SIZE, PROOF_SIZE, RESULT_SIZE) == (44, 76, 44, 12)
    assert struct.unpack("<Q", MAGIC)[0] == MAGIC_U64
    # far above any RPC frame length (128 MiB) and any plausible data size
    assert MAGIC_U64 > 1 << 56


def test_exact_bytes_of_a_successful_exchange() -> None:
    c, s = _pair()
    assert c.bytes_to_send() == HELLO
    s.feed(HELLO)
    assert s.bytes_to_send() == CHALLENGE
    c.feed(CHALLENGE)
    assert c.proof_sent
    assert c.bytes_to_send() == PROOF
    s.feed(PROOF)
    assert s.done and s.failed is None
    assert s.bytes_to_send() == RESULT_OK
    c.feed(RESULT_OK)
    assert c.done and c.failed is None
    assert c.trailing == s.trailing == b""


def test_one_byte_at_a_time() -> None:
    c, s = _pair()
    for b in c.bytes_to_send():
        assert not s.finished
        s.feed(bytes([b]))
    challenge = s.bytes_to_send()
    assert challenge == CHALLENGE
    for b in challenge:
        assert c.want >= 1
        c.feed(bytes([b]))
    for b in c.bytes_to_send():
        assert not s.done
        s.feed(bytes([b]))
    assert s.done
    for b in s.bytes_to_send():
        assert not c.done
        c.feed(bytes([b]))
    assert c.done


def test_want_never_reads_past_the_handshake() -> None:
    c, s = _pair()
    assert c.bytes_to_send() == HELLO
    assert s.want == HELLO_SIZE
    s.feed(HELLO[:10])
    assert s.want == HELLO_SIZE - 10
    s.feed(HELLO[10:])
    assert c.want == CHALLENGE_SIZE
    c.feed(s.bytes_to_send())
    assert c.want == RESULT_SIZE
    s.feed(c.bytes_to_send())
    assert s.want == 0 and s.done


def test_first_request_pipelined_behind_proof_is_trailing() -> None:
    c, s = _pair()
    s.feed(c.bytes_to_send())
    c.feed(s.bytes_to_send())
    request = b"\x04\x00\x00\x00\x00\x00\x00\x00\x03{}\n"
    s.feed(c.bytes_to_send() + request)
    assert s.done and s.trailing == request
    s.feed(b"more")
    assert s.trailing == request + b"more"
    # the client side: RESULT followed by the reply in one segment
    c.feed(s.bytes_to_send() + b"reply")
    assert c.done and c.trailing == b"reply"


def test_wrong_token_fails_on_both_sides_with_reasons() -> None:
    c, s = _pair(client_token="another token entirely!")
    s.feed(c.bytes_to_send())
    c.feed(s.bytes_to_send())  # the client cannot verify the server's proof
    assert c.failed is not None and c.failed.kind is FailureKind.TOKEN_MISMATCH
    refusal = c.bytes_to_send()
    assert refusal == b"MCAUTH1\n\x03\x01\x03\x00" + bytes(32)
    s.feed(refusal)
    assert s.failed is not None and s.failed.kind is FailureKind.TOKEN_MISMATCH
    assert "different cluster tokens" in s.failed.message
    assert not s.done and not c.done


def test_server_rejects_a_wrong_client_proof() -> None:
    c, s = _pair()
    s.feed(c.bytes_to_send())
    c.feed(s.bytes_to_send())
    forged = b"MCAUTH1\n\x03\x01\x00\x00" + bytes(32)
    s.feed(forged)
    assert s.failed is not None and s.failed.kind is FailureKind.TOKEN_MISMATCH
    assert s.bytes_to_send() == RESULT_BAD
    c.bytes_to_send()
    c.feed(RESULT_BAD)
    assert c.failed is not None and c.failed.kind is FailureKind.TOKEN_MISMATCH


def test_replayed_proof_is_useless_against_a_fresh_server_nonce() -> None:
    # an eavesdropper recorded HELLO and PROOF of a good session ...
    # ... and replays them to a server, which picks a new nonce
    s = ServerHandshake(ClusterKey(TOKEN), CTX)  # random nonce
    s.feed(HELLO)
    s.bytes_to_send()
    s.feed(PROOF)
    assert s.failed is not None and s.failed.kind is FailureKind.TOKEN_MISMATCH
    assert not s.done


def test_proof_for_another_port_kind_is_refused() -> None:
    c, s = _pair(ctx=(b"te-rpc", b"te-data"))
    s.feed(c.bytes_to_send())
    c.feed(s.bytes_to_send())
    assert c.failed is not None and c.failed.kind is FailureKind.TOKEN_MISMATCH


def test_reflection_server_proof_is_not_a_client_proof() -> None:
    c, s = _pair()
    s.feed(c.bytes_to_send())
    challenge = s.bytes_to_send()
    # send the server's own proof back as the client's
    s.feed(b"MCAUTH1\n\x03\x01\x00\x00" + challenge[44:76])
    assert s.failed is not None


def test_plain_request_to_an_authenticating_server_fails_fast() -> None:
    s = ServerHandshake(ClusterKey(TOKEN), CTX)
    s.feed(b"\x04")  # first byte of an RPC frame length
    assert s.failed is not None and s.failed.kind is FailureKind.UNAUTHENTICATED
    assert s.bytes_to_send() == b""
    s.feed(b"ignored")
    assert s.trailing == b""


def test_server_without_token_answer() -> None:
    assert looks_like_hello(HELLO) is True
    assert looks_like_hello(HELLO[:5]) is None
    assert looks_like_hello(b"GET / HTTP/1.1") is False
    assert looks_like_hello(b"") is None
    c = ClientHandshake(ClusterKey(TOKEN), CTX, nonce=CN)
    c.bytes_to_send()
    reply = no_token_reply()
    assert len(reply) == CHALLENGE_SIZE
    assert reply[:12] == b"MCAUTH1\n\x02\x01\x01\x00"
    c.feed(reply)
    assert c.failed is not None and c.failed.kind is FailureKind.PEER_HAS_NO_TOKEN


def test_reference_peer_answers_garbage_or_closes() -> None:
    c = ClientHandshake(ClusterKey(TOKEN), CTX)
    c.bytes_to_send()
    c.feed(struct.pack("<Q", 0x4D43545600000001))  # a TCP v2 rejection status
    assert c.failed is not None and c.failed.kind is FailureKind.NOT_AUTH_PEER
    c2 = ClientHandshake(ClusterKey(TOKEN), CTX)
    c2.feed_eof()
    assert c2.failed is not None and c2.failed.kind is FailureKind.TRUNCATED
    assert "no cluster token" in c2.failed.message


@pytest.mark.parametrize("cut", [1, 11, 12, 43])
def test_truncated_hello(cut: int) -> None:
    s = ServerHandshake(ClusterKey(TOKEN), CTX)
    s.feed(HELLO[:cut])
    assert not s.finished
    s.feed_eof()
    assert s.failed is not None and s.failed.kind is FailureKind.TRUNCATED


def test_truncated_result_and_eof_after_done() -> None:
    c, s = _pair()
    s.feed(c.bytes_to_send())
    c.feed(s.bytes_to_send())
    s.feed(c.bytes_to_send())
    c.feed(s.bytes_to_send()[:5])
    c.feed_eof()
    assert c.failed is not None and c.failed.kind is FailureKind.TRUNCATED
    assert s.done
    s.feed_eof()  # after done: nothing changes
    assert s.done and s.failed is None


def test_wrong_kind_and_version() -> None:
    s = ServerHandshake(ClusterKey(TOKEN), CTX)
    s.feed(PROOF)  # a PROOF where HELLO belongs
    assert s.failed is not None and s.failed.kind is FailureKind.MALFORMED
    s2 = ServerHandshake(ClusterKey(TOKEN), CTX)
    s2.feed(b"MCAUTH1\n\x01\x07\x00\x00" + CN)
    assert s2.failed is not None and s2.failed.kind is FailureKind.VERSION
    c = ClientHandshake(ClusterKey(TOKEN), CTX)
    c.bytes_to_send()
    c.feed(s2.bytes_to_send())
    assert c.failed is not None and c.failed.kind is FailureKind.VERSION


def test_key_validation_and_secrecy() -> None:
    with pytest.raises(ValueError, match="empty"):
        ClusterKey("")
    with pytest.raises(ValueError, match="surrogate"):
        ClusterKey("evil\ud800")
    k = ClusterKey(TOKEN)
    assert TOKEN not in repr(k)
    assert ClusterKey(b"short").weak and not k.weak
    assert k == ClusterKey(TOKEN) and k != ClusterKey(TOKEN + "x")
    with pytest.raises(ValueError):
        ClientHandshake(k, b"")
    with pytest.raises(ValueError):
        ServerHandshake(k, CTX, nonce=b"short")
    assert AuthCode.BAD_PROOF == 3


# --- HTTP form ------------------------------------------------------------------------

HKEY = ClusterKey(TOKEN)
HCTX = b"http-metadata"
NOW = 1_700_000_000.0


def test_http_request_signature_round_trip_and_exact_value() -> None:
    signed = sign_request(
        HKEY, HCTX, "PUT", "/metadata?key=a%2Fb", b'{"x":1}', now=NOW, nonce="ab" * 16
    )
    body_hash = hashlib.sha256(b'{"x":1}').hexdigest().encode()
    msg = (
        b"pymooncake-http-v1\x00request\x00\x0dhttp-metadataPUT\x00/metadata?key=a%2Fb\x00"
        + b"1700000000\x00"
        + b"ab" * 16
        + b"\x00"
        + body_hash
    )
    sig = hmac.new(_key(TOKEN), msg, hashlib.sha256).hexdigest()
    assert signed.authorization == (
        f"{HTTP_AUTH_SCHEME} v=1, ts=1700000000, nonce={'ab' * 16}, sig={sig}"
    )
    cache = ReplayCache()
    nonce = verify_request(
        HKEY, HCTX, "PUT", "/metadata?key=a%2Fb", signed.authorization, b'{"x":1}',
        now=NOW + 3, replay=cache,
    )  # fmt: skip
    assert nonce == "ab" * 16
    header = sign_response(HKEY, HCTX, nonce, 200, b"ok")
    verify_response(HKEY, HCTX, nonce, 200, b"ok", header)
    with pytest.raises(HttpAuthError, match="different cluster token"):
        verify_response(HKEY, HCTX, nonce, 200, b"tampered", header)
    with pytest.raises(HttpAuthError, match="not signed"):
        verify_response(HKEY, HCTX, nonce, 200, b"ok", None)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"method": "DELETE"}, "signature"),
        ({"target": "/metadata?key=other"}, "signature"),
        ({"body": b"forged"}, "signature"),
        ({"key": ClusterKey("wrong token, wrong token")}, "signature"),
        ({"context": b"master-admin"}, "signature"),
        ({"now": NOW + 301}, "skew"),
        ({"now": NOW - 301}, "skew"),
    ],
)
def test_http_request_tampering_is_refused(change: dict[str, object], reason: str) -> None:
    signed = sign_request(HKEY, HCTX, "PUT", "/metadata?key=a", b"body", now=NOW)
    args: dict[str, object] = {
        "key": HKEY,
        "context": HCTX,
        "method": "PUT",
        "target": "/metadata?key=a",
        "body": b"body",
        "now": NOW,
    }
    args.update(change)
    with pytest.raises(HttpAuthError) as info:
        verify_request(
            args["key"],  # type: ignore[arg-type]
            args["context"],  # type: ignore[arg-type]
            args["method"],  # type: ignore[arg-type]
            args["target"],  # type: ignore[arg-type]
            signed.authorization,
            args["body"],  # type: ignore[arg-type]
            now=args["now"],  # type: ignore[arg-type]
            replay=ReplayCache(),
        )
    assert info.value.reason == reason and info.value.status == 401


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer abc",
        "Mooncake-HMAC",
        "Mooncake-HMAC v=2, ts=1, nonce=" + "a" * 32 + ", sig=" + "b" * 64,
        "Mooncake-HMAC v=1, ts=x, nonce=" + "a" * 32 + ", sig=" + "b" * 64,
        "Mooncake-HMAC v=1, ts=" + "9" * 5000,
        "Mooncake-HMAC v=1, ts=1, nonce=zz, sig=" + "b" * 64,
        "Mooncake-HMAC v=1,,,",
    ],
)
def test_http_malformed_authorization(header: str | None) -> None:
    with pytest.raises(HttpAuthError) as info:
        verify_request(HKEY, HCTX, "GET", "/", header, b"", now=NOW, replay=ReplayCache())
    assert info.value.reason in ("missing", "malformed")


def test_http_replay_is_refused_and_cache_is_bounded() -> None:
    cache = ReplayCache(max_entries=3)
    signed = sign_request(HKEY, HCTX, "GET", "/x", now=NOW)
    verify_request(HKEY, HCTX, "GET", "/x", signed.authorization, b"", now=NOW, replay=cache)
    with pytest.raises(HttpAuthError) as info:
        verify_request(HKEY, HCTX, "GET", "/x", signed.authorization, b"", now=NOW, replay=cache)
    assert info.value.reason == "replay"
    # fill beyond the bound: the oldest entries go, and so does their time window
    for i in range(5):
        s = sign_request(HKEY, HCTX, "GET", "/x", now=NOW + 1 + i)
        verify_request(HKEY, HCTX, "GET", "/x", s.authorization, b"", now=NOW + 5, replay=cache)
    assert len(cache) == 3
    with pytest.raises(HttpAuthError) as info:  # evicted, but still refused
        verify_request(HKEY, HCTX, "GET", "/x", signed.authorization, b"", now=NOW, replay=cache)
    assert info.value.reason == "skew"
    # entries age out with time
    late = NOW + 2 * cache.skew_s + 10
    s = sign_request(HKEY, HCTX, "GET", "/x", now=late)
    verify_request(HKEY, HCTX, "GET", "/x", s.authorization, b"", now=late, replay=cache)
    assert len(cache) == 1
