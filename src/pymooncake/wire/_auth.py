"""Cluster authentication: mutual HMAC-SHA256 challenge-response (sans-IO).

Theory of operation
-------------------
Every process of a cluster is given the same secret, the *cluster token*
(``PYMOONCAKE_CLUSTER_TOKEN``).  It never travels: each side proves it knows
the token by a keyed hash (HMAC-SHA256) over fresh random nonces from *both*
sides, so a recorded exchange is useless later (replay), a proof made for one
direction is useless in the other (reflection), and a proof made for one port
kind is useless on another (the *context*, e.g. ``b"te-rpc"``, ``b"te-data"``,
``b"master-rpc"``, is inside every MAC).

Stream form (RPC ports, the TCP data port), four fixed-size messages, all
starting with the same 12-byte prefix (``struct "<8sBBH"``: magic, kind,
version, code)::

    client -> server  HELLO      prefix | client nonce (32)                      44 B
    server -> client  CHALLENGE  prefix | server nonce (32) | server proof (32)  76 B
    client -> server  PROOF      prefix | client proof (32)                      44 B
    server -> client  RESULT     prefix                                          12 B

    server proof = HMAC(key, "pymooncake-auth-v1" 0 "server" 0 len(ctx) ctx | cn | sn)
    client proof = HMAC(key, "pymooncake-auth-v1" 0 "client" 0 len(ctx) ctx | cn | sn)

The client verifies the server's proof before it sends its own (mutual: a
client never talks to an impostor that lacks the token).  ``code`` carries the
reason of a refusal so that *both* sides can say what is wrong: CHALLENGE with
``NO_TOKEN`` (the server has no token configured), PROOF with ``BAD_PROOF``
(the client could not verify the server: the tokens differ), RESULT with
``BAD_PROOF`` (the server could not verify the client).  The client may send
its first request right after PROOF (in the same segment); the server keeps
such bytes as :attr:`ServerHandshake.trailing`.

The magic read as the u64 little-endian length of an RPC frame, or as the
``size`` of a TCP data header, is far above any accepted value, so a peer that
does not authenticate (a reference engine, or ours without a token) refuses a
HELLO at once instead of waiting for more bytes; :func:`looks_like_hello`
lets our servers without a token recognise it and answer :func:`no_token_reply`.

HTTP form (:func:`sign_request` / :func:`verify_request`, and for the reply
:func:`sign_response` / :func:`verify_response`): the request carries
``Authorization: Mooncake-HMAC v=1, ts=<unix s>, nonce=<32 hex>, sig=<64 hex>``
over the method, the request target (path and query as sent), the timestamp,
the nonce and the body's SHA-256; the server accepts a timestamp within
``skew_s`` of its clock and each nonce once (:class:`ReplayCache`, bounded in
size and time).  The response carries ``X-Mooncake-Signature: v=1, sig=<hex>``
over the request's nonce, the status and the response body's SHA-256, which
the client verifies (mutual).

Nothing here touches a socket or a clock: callers pass ``now`` and nonces may
be injected (tests); constant-time comparisons throughout
(:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any, Final

from ..errors import MalformedMessage

__all__ = [
    "CHALLENGE_SIZE",
    "HELLO_SIZE",
    "HTTP_AUTH_SCHEME",
    "HTTP_SIGNATURE_HEADER",
    "MAGIC",
    "MAGIC_U64",
    "NONCE_SIZE",
    "PROOF_SIZE",
    "RESULT_SIZE",
    "VERSION",
    "AuthCode",
    "AuthFailure",
    "ClientHandshake",
    "ClusterKey",
    "FailureKind",
    "HttpAuthError",
    "MessageKind",
    "ReplayCache",
    "ServerHandshake",
    "SignedRequest",
    "looks_like_hello",
    "no_token_reply",
    "sign_request",
    "sign_response",
    "verify_request",
    "verify_response",
]

#: 8 bytes; as a u64 LE it is ~7.2e17, far above any RPC frame length or data size
MAGIC: Final = b"MCAUTH1\n"
MAGIC_U64: Final = struct.unpack("<Q", MAGIC)[0]
VERSION: Final = 1
NONCE_SIZE: Final = 32
_MAC_SIZE: Final = 32  # SHA-256

_PREFIX: Final = struct.Struct("<8sBBH")  # magic, kind, version, code
_HELLO: Final = struct.Struct(f"<8sBBH{NONCE_SIZE}s")
_CHALLENGE: Final = struct.Struct(f"<8sBBH{NONCE_SIZE}s{_MAC_SIZE}s")
_PROOF: Final = struct.Struct(f"<8sBBH{_MAC_SIZE}s")
_RESULT: Final = _PREFIX

HELLO_SIZE: Final = _HELLO.size  # 44
CHALLENGE_SIZE: Final = _CHALLENGE.size  # 76
PROOF_SIZE: Final = _PROOF.size  # 44
RESULT_SIZE: Final = _RESULT.size  # 12

_LABEL: Final = b"pymooncake-auth-v1\x00"
_ZERO_NONCE: Final = bytes(NONCE_SIZE)
_ZERO_MAC: Final = bytes(_MAC_SIZE)
#: tokens shorter than this are accepted but weak (the CLIs warn)
MIN_STRONG_TOKEN_BYTES: Final = 16


class MessageKind(IntEnum):
    HELLO = 1
    CHALLENGE = 2
    PROOF = 3
    RESULT = 4


class AuthCode(IntEnum):
    """The ``code`` field: why a side refuses (0 = go on)."""

    OK = 0
    #: CHALLENGE: the server has no cluster token configured
    NO_TOKEN = 1
    #: CHALLENGE: the server does not speak this protocol version
    VERSION = 2
    #: PROOF: the client could not verify the server / RESULT: the server could
    #: not verify the client -- the two sides hold different tokens
    BAD_PROOF = 3


class FailureKind(Enum):
    """Why a handshake failed, from the point of view of the side that reports it."""

    #: server: the peer sent a plain request without authenticating
    UNAUTHENTICATED = "unauthenticated"
    #: client: the server answers but has no cluster token configured
    PEER_HAS_NO_TOKEN = "peer-has-no-token"
    #: either side: the two sides hold different tokens
    TOKEN_MISMATCH = "token-mismatch"
    #: either side: protocol version not supported
    VERSION = "version"
    #: either side: bytes that are not a handshake message of the expected kind
    MALFORMED = "malformed"
    #: client: the server answered with something that is not a handshake
    NOT_AUTH_PEER = "not-auth-peer"
    #: either side: the connection ended in the middle of the handshake
    TRUNCATED = "truncated"


@dataclass(frozen=True)
class AuthFailure:
    """A failed handshake: ``kind`` for programs, ``message`` for operators.

    The message says what the peer did; the I/O layer adds the port, the peer
    address and the fix.
    """

    kind: FailureKind
    message: str


class ClusterKey:
    """The cluster token, ready to key HMACs.  Its ``repr`` never shows the secret.

    Args:
        token: the shared secret (``PYMOONCAKE_CLUSTER_TOKEN``), a non-empty
            string (UTF-8) or bytes.

    Raises:
        ValueError: empty, or a string that is not UTF-8 encodable.
    """

    __slots__ = ("_key", "weak")

    def __init__(self, token: str | bytes) -> None:
        if isinstance(token, str):
            try:
                raw = token.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    "the cluster token contains characters that are not valid UTF-8 "
                    "(a lone surrogate); use printable text, e.g. `openssl rand -hex 32`"
                ) from None
        else:
            raw = bytes(token)
        if not raw:
            raise ValueError("the cluster token is empty; unset it or give a secret value")
        # domain separation from any other use of the same secret
        self._key = hmac.new(b"pymooncake cluster token v1", raw, hashlib.sha256).digest()
        #: shorter than MIN_STRONG_TOKEN_BYTES: guessable; callers warn
        self.weak = len(raw) < MIN_STRONG_TOKEN_BYTES

    def mac(self, *parts: bytes) -> bytes:
        h = hmac.new(self._key, digestmod=hashlib.sha256)
        for p in parts:
            h.update(p)
        return h.digest()

    def __repr__(self) -> str:
        return "<ClusterKey (secret)>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClusterKey) and hmac.compare_digest(self._key, other._key)

    def __hash__(self) -> int:
        return hash(self._key)


def _context_bytes(context: bytes) -> bytes:
    if not 0 < len(context) < 256:
        raise ValueError(f"auth context must be 1..255 bytes, got {len(context)}")
    return bytes((len(context),)) + context


def _stream_proof(key: ClusterKey, role: bytes, ctx: bytes, cn: bytes, sn: bytes) -> bytes:
    return key.mac(_LABEL, role, b"\x00", ctx, cn, sn)


def looks_like_hello(prefix: bytes | bytearray | memoryview) -> bool | None:
    """Whether the first bytes a peer sent start a HELLO.

    Returns:
        True if they start with :data:`MAGIC`, False if they cannot, None if
        fewer than 8 bytes are in and they match so far.
    """
    n = min(len(prefix), len(MAGIC))
    if bytes(prefix[:n]) != MAGIC[:n]:
        return False
    return True if n == len(MAGIC) else None


def no_token_reply() -> bytes:
    """The CHALLENGE a server without a cluster token answers a HELLO with."""
    return _CHALLENGE.pack(
        MAGIC, MessageKind.CHALLENGE, VERSION, AuthCode.NO_TOKEN, _ZERO_NONCE, _ZERO_MAC
    )


class _Side:
    """State shared by both handshake sides."""

    def __init__(self, context: bytes) -> None:
        self._ctx = _context_bytes(context)
        self._buf = bytearray()
        self._out = bytearray()
        self._done = False
        self._failure: AuthFailure | None = None
        self._eof = False

    @property
    def done(self) -> bool:
        """True once both sides are authenticated."""
        return self._done

    @property
    def failed(self) -> AuthFailure | None:
        """Why the handshake failed, or None (still running or done)."""
        return self._failure

    @property
    def finished(self) -> bool:
        return self._done or self._failure is not None

    @property
    def want(self) -> int:
        """Bytes still missing from the message awaited (0 once finished): an I/O
        layer that reads at most this many never reads past the handshake."""
        if self.finished:
            return 0
        return max(1, self._message_size() - len(self._buf))

    def _message_size(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def trailing(self) -> bytes:
        """Bytes received after the last handshake message (the first request)."""
        return bytes(self._buf) if self._done else b""

    def bytes_to_send(self) -> bytes:
        """The bytes to send now (drained: a second call returns ``b""``)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Process received bytes.  After :attr:`done`, bytes go to :attr:`trailing`;
        after a failure they are ignored."""
        if self._failure is not None:
            return
        self._buf += data
        if not self._done:
            self._advance()

    def feed_eof(self) -> None:
        """The peer closed the connection; a handshake still running fails (TRUNCATED)."""
        self._eof = True
        if not self.finished:
            self._fail(FailureKind.TRUNCATED, self._truncated_message())

    def _truncated_message(self) -> str:
        return (
            f"the connection ended in the middle of the authentication handshake "
            f"({len(self._buf)} byte(s) of the next message received)"
        )

    def _fail(self, kind: FailureKind, message: str) -> None:
        self._failure = AuthFailure(kind, message)
        self._buf.clear()

    def _advance(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _take(self, st: struct.Struct, kind: MessageKind) -> tuple[Any, ...] | None:
        """Unpack one message of ``kind`` if complete; fail on a bad prefix."""
        buf = self._buf
        ok = looks_like_hello(buf)  # same magic on every message
        if ok is False:
            self._fail_foreign()
            return None
        if len(buf) < st.size:
            return None
        fields = st.unpack_from(buf, 0)
        del buf[: st.size]
        got_kind, version = fields[1], fields[2]
        if got_kind != kind:
            self._fail(
                FailureKind.MALFORMED,
                f"expected a {kind.name} handshake message, got kind {got_kind}",
            )
            return None
        if version != VERSION and kind is not MessageKind.HELLO:
            self._fail(
                FailureKind.VERSION,
                f"the peer speaks authentication protocol version {version}, this side {VERSION}; "
                "run the same pymooncake version everywhere",
            )
            return None
        return fields

    def _fail_foreign(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class ServerHandshake(_Side):
    """The accepting side.

    Args:
        key: the cluster key.
        context: the port kind (1..255 bytes), e.g. ``b"te-rpc"``.
        nonce: the server nonce (32 bytes; random by default, tests inject one).

    Drive it with :meth:`feed`, :meth:`feed_eof` and :meth:`bytes_to_send`
    (send after every feed) until :attr:`done` or :attr:`failed`.  After a
    failure send what :meth:`bytes_to_send` still returns (a refusal the peer
    can explain), then close.

    Raises:
        ValueError: (constructor) bad context or nonce size.
    """

    def __init__(self, key: ClusterKey, context: bytes, *, nonce: bytes | None = None) -> None:
        super().__init__(context)
        self._key = key
        self._sn = secrets.token_bytes(NONCE_SIZE) if nonce is None else nonce
        if len(self._sn) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        self._cn = b""
        self._state = MessageKind.HELLO  # the message we wait for

    def _message_size(self) -> int:
        return HELLO_SIZE if self._state is MessageKind.HELLO else PROOF_SIZE

    def _fail_foreign(self) -> None:
        if self._state is MessageKind.PROOF:
            self._fail(FailureKind.MALFORMED, "the peer sent bytes that are not a PROOF message")
            return
        self._fail(
            FailureKind.UNAUTHENTICATED,
            "the peer sent a request without authenticating first (it has no cluster token: "
            "a reference engine, or pymooncake without PYMOONCAKE_CLUSTER_TOKEN)",
        )

    def _advance(self) -> None:
        while not self.finished:
            if self._state is MessageKind.HELLO:
                hello = self._take(_HELLO, MessageKind.HELLO)
                if hello is None:
                    return
                if hello[2] != VERSION:
                    self._out += _CHALLENGE.pack(
                        MAGIC,
                        MessageKind.CHALLENGE,
                        VERSION,
                        AuthCode.VERSION,
                        _ZERO_NONCE,
                        _ZERO_MAC,
                    )
                    self._fail(
                        FailureKind.VERSION,
                        f"the peer speaks authentication protocol version {hello[2]}, this side "
                        f"{VERSION}; run the same pymooncake version everywhere",
                    )
                    return
                cn: bytes = hello[4]
                self._cn = cn
                proof = _stream_proof(self._key, b"server", self._ctx, cn, self._sn)
                self._out += _CHALLENGE.pack(
                    MAGIC, MessageKind.CHALLENGE, VERSION, AuthCode.OK, self._sn, proof
                )
                self._state = MessageKind.PROOF
            else:
                msg = self._take(_PROOF, MessageKind.PROOF)
                if msg is None:
                    return
                if msg[3] == AuthCode.BAD_PROOF:
                    self._fail(
                        FailureKind.TOKEN_MISMATCH,
                        "the peer could not verify this side's proof: the two sides hold "
                        "different cluster tokens",
                    )
                    return
                expected = _stream_proof(self._key, b"client", self._ctx, self._cn, self._sn)
                got: bytes = msg[4]
                if msg[3] != AuthCode.OK or not hmac.compare_digest(got, expected):
                    self._out += _RESULT.pack(
                        MAGIC, MessageKind.RESULT, VERSION, AuthCode.BAD_PROOF
                    )
                    self._fail(
                        FailureKind.TOKEN_MISMATCH,
                        "the peer's proof is wrong: it holds a different cluster token",
                    )
                    return
                self._out += _RESULT.pack(MAGIC, MessageKind.RESULT, VERSION, AuthCode.OK)
                self._done = True


class ClientHandshake(_Side):
    """The connecting side; HELLO is queued at construction.

    Args:
        key: the cluster key.
        context: the port kind, as on the server.
        nonce: the client nonce (32 bytes; random by default).

    :attr:`proof_sent` turns True once PROOF is queued: a caller may pipeline
    its first request right behind it, but must still feed the RESULT (which
    precedes the reply) before :attr:`done`.

    Raises:
        ValueError: (constructor) bad context or nonce size.
    """

    def __init__(self, key: ClusterKey, context: bytes, *, nonce: bytes | None = None) -> None:
        super().__init__(context)
        self._key = key
        self._cn = secrets.token_bytes(NONCE_SIZE) if nonce is None else nonce
        if len(self._cn) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        self._out += _HELLO.pack(MAGIC, MessageKind.HELLO, VERSION, AuthCode.OK, self._cn)
        self._state = MessageKind.CHALLENGE
        self.proof_sent = False

    def _message_size(self) -> int:
        return CHALLENGE_SIZE if self._state is MessageKind.CHALLENGE else RESULT_SIZE

    def _fail_foreign(self) -> None:
        self._fail(
            FailureKind.NOT_AUTH_PEER,
            "the peer answered the authentication request with bytes that are not a "
            "handshake message (it does not speak pymooncake authentication)",
        )

    def _truncated_message(self) -> str:
        if self._state is MessageKind.CHALLENGE and not self._buf:
            return (
                "the peer closed the connection without answering the authentication request: "
                "it has no cluster token (a reference engine, or pymooncake without "
                "PYMOONCAKE_CLUSTER_TOKEN) or refuses this side"
            )
        return super()._truncated_message()

    def _advance(self) -> None:
        while not self.finished:
            if self._state is MessageKind.CHALLENGE:
                ch = self._take(_CHALLENGE, MessageKind.CHALLENGE)
                if ch is None:
                    return
                code = ch[3]
                if code == AuthCode.NO_TOKEN:
                    self._fail(
                        FailureKind.PEER_HAS_NO_TOKEN,
                        "the peer has no cluster token configured, so it cannot authenticate",
                    )
                    return
                if code == AuthCode.VERSION:
                    self._fail(
                        FailureKind.VERSION,
                        "the peer does not support this authentication protocol version; run the "
                        "same pymooncake version everywhere",
                    )
                    return
                sn: bytes = ch[4]
                proof: bytes = ch[5]
                expected = _stream_proof(self._key, b"server", self._ctx, self._cn, sn)
                if code != AuthCode.OK or not hmac.compare_digest(proof, expected):
                    self._out += _PROOF.pack(
                        MAGIC, MessageKind.PROOF, VERSION, AuthCode.BAD_PROOF, _ZERO_MAC
                    )
                    self._fail(
                        FailureKind.TOKEN_MISMATCH,
                        "the peer's proof is wrong: it holds a different cluster token (or is "
                        "not the server it claims to be)",
                    )
                    return
                mine = _stream_proof(self._key, b"client", self._ctx, self._cn, sn)
                self._out += _PROOF.pack(MAGIC, MessageKind.PROOF, VERSION, AuthCode.OK, mine)
                self.proof_sent = True
                self._state = MessageKind.RESULT
            else:
                res = self._take(_RESULT, MessageKind.RESULT)
                if res is None:
                    return
                if res[3] != AuthCode.OK:
                    self._fail(
                        FailureKind.TOKEN_MISMATCH,
                        "the peer rejected this side's proof: the two sides hold different "
                        "cluster tokens",
                    )
                    return
                self._done = True


# --------------------------------------------------------------------------------
# HTTP form
# --------------------------------------------------------------------------------

HTTP_AUTH_SCHEME: Final = "Mooncake-HMAC"
#: response header carrying the server's signature
HTTP_SIGNATURE_HEADER: Final = "X-Mooncake-Signature"
_HTTP_LABEL: Final = b"pymooncake-http-v1\x00"
#: accepted clock difference between client and server (Kerberos' classic 5 minutes)
DEFAULT_SKEW_S: Final = 300.0
#: nonces remembered for replay detection; beyond it the oldest are dropped and
#: requests not newer than them are refused (memory stays bounded, replay stays impossible)
DEFAULT_REPLAY_ENTRIES: Final = 65536
_MAX_HEADER_VALUE: Final = 512


class HttpAuthError(MalformedMessage):
    """A request or response signature is missing or wrong.

    ``status`` is the HTTP status a server answers with (401); ``reason`` a
    short machine-readable word (``missing``, ``malformed``, ``skew``,
    ``replay``, ``signature``).
    """

    def __init__(self, reason: str, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class SignedRequest:
    """What the client keeps to verify the reply: the header it sent and its nonce."""

    authorization: str
    nonce: str
    ts: int


def _body_hash(body: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(body).hexdigest().encode()


def _request_mac(
    key: ClusterKey, context: bytes, method: str, target: str, ts: int, nonce: str, body: bytes
) -> str:
    return key.mac(
        _HTTP_LABEL,
        b"request\x00",
        _context_bytes(context),
        method.encode("ascii", "replace"),
        b"\x00",
        target.encode("ascii", "replace"),
        b"\x00",
        str(ts).encode(),
        b"\x00",
        nonce.encode("ascii"),
        b"\x00",
        _body_hash(body),
    ).hex()


def _response_mac(key: ClusterKey, context: bytes, nonce: str, status: int, body: bytes) -> str:
    return key.mac(
        _HTTP_LABEL,
        b"response\x00",
        _context_bytes(context),
        nonce.encode("ascii", "replace"),
        b"\x00",
        str(status).encode(),
        b"\x00",
        _body_hash(body),
    ).hex()


def sign_request(
    key: ClusterKey,
    context: bytes,
    method: str,
    target: str,
    body: bytes = b"",
    *,
    now: float,
    nonce: str | None = None,
) -> SignedRequest:
    """Sign one HTTP request.

    Args:
        target: the request target exactly as sent (``/metadata?key=a%2Fb``).
        now: the client's clock (Unix seconds).
        nonce: 32 hex digits; random by default.

    Returns:
        The ``Authorization`` header value and what :func:`verify_response` needs.
    """
    nonce = secrets.token_hex(16) if nonce is None else nonce
    ts = int(now)
    sig = _request_mac(key, context, method, target, ts, nonce, body)
    header = f"{HTTP_AUTH_SCHEME} v=1, ts={ts}, nonce={nonce}, sig={sig}"
    return SignedRequest(header, nonce, ts)


def _parse_params(value: str, scheme: str | None) -> dict[str, str]:
    if len(value) > _MAX_HEADER_VALUE:
        raise HttpAuthError("malformed", "authentication header is too long")
    text = value.strip()
    if scheme is not None:
        name, _, text = text.partition(" ")
        if name.lower() != scheme.lower():
            raise HttpAuthError(
                "malformed",
                f"Authorization scheme {name[:40]!r} is not {scheme} (a cluster token is "
                "required; send the request with a pymooncake client holding the token)",
            )
    params: dict[str, str] = {}
    for part in text.split(","):
        k, eq, v = part.strip().partition("=")
        if not eq or not k:
            raise HttpAuthError("malformed", "authentication header parameters are malformed")
        params[k.strip().lower()] = v.strip()
    return params


class ReplayCache:
    """Nonces seen within the skew window, bounded in size and time.

    A nonce is accepted once.  Entries older than ``2 * skew_s`` are dropped
    (their timestamps are outside the window anyway).  When more than
    ``max_entries`` are held the oldest are dropped and a *watermark* rises:
    requests whose timestamp is not newer than the newest dropped entry are
    refused, so a dropped nonce can never be replayed.

    Only requests with a valid signature reach the cache, so only token holders
    (trusted) can fill it.
    """

    def __init__(
        self, *, skew_s: float = DEFAULT_SKEW_S, max_entries: int = DEFAULT_REPLAY_ENTRIES
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.skew_s = skew_s
        self.max_entries = max_entries
        self._seen: OrderedDict[str, int] = OrderedDict()  # nonce -> ts, in insertion order
        self._watermark = -1  # requests with ts <= watermark are refused

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_add(self, nonce: str, ts: int, now: float) -> str | None:
        """Record ``nonce``; returns None if fresh, else a reason (``replay``, ``skew``)."""
        self._expire(now)
        if ts <= self._watermark:
            return "skew"
        if nonce in self._seen:
            return "replay"
        self._seen[nonce] = ts
        while len(self._seen) > self.max_entries:
            _, old_ts = self._seen.popitem(last=False)
            self._watermark = max(self._watermark, old_ts)
        return None

    def _expire(self, now: float) -> None:
        horizon = now - 2 * self.skew_s
        seen = self._seen
        while seen:
            nonce, ts = next(iter(seen.items()))
            if ts >= horizon:
                break
            del seen[nonce]


def verify_request(
    key: ClusterKey,
    context: bytes,
    method: str,
    target: str,
    authorization: str | None,
    body: bytes,
    *,
    now: float,
    replay: ReplayCache,
) -> str:
    """Check an ``Authorization`` header.

    Returns:
        The request's nonce (the server signs its response with it).

    Raises:
        HttpAuthError: missing, malformed, outside the skew window, replayed,
            or a wrong signature (the tokens differ); ``reason`` says which.
    """
    if not authorization:
        raise HttpAuthError(
            "missing",
            "this server requires the cluster token (Authorization: Mooncake-HMAC); the client "
            "has none: set the same PYMOONCAKE_CLUSTER_TOKEN on the client",
        )
    params = _parse_params(authorization, HTTP_AUTH_SCHEME)
    if params.get("v") != "1":
        raise HttpAuthError("malformed", f"unsupported Mooncake-HMAC version {params.get('v')!r}")
    nonce, sig, ts_text = params.get("nonce", ""), params.get("sig", ""), params.get("ts", "")
    if not (len(nonce) == 32 and _is_hex(nonce)) or not (len(sig) == 64 and _is_hex(sig)):
        raise HttpAuthError("malformed", "Mooncake-HMAC nonce/sig must be 32/64 hex digits")
    if not (ts_text.isascii() and ts_text.isdigit() and len(ts_text) <= 12):
        raise HttpAuthError("malformed", "Mooncake-HMAC ts must be Unix seconds")
    ts = int(ts_text)
    if abs(now - ts) > replay.skew_s:
        raise HttpAuthError(
            "skew",
            f"request timestamp is {now - ts:+.0f} s away from the server clock (allowed "
            f"{replay.skew_s:g} s); synchronise the clocks (NTP)",
        )
    expected = _request_mac(key, context, method, target, ts, nonce, body)
    if not hmac.compare_digest(expected, sig.lower()):
        raise HttpAuthError(
            "signature",
            "request signature is wrong: the client holds a different cluster token (set the "
            "same PYMOONCAKE_CLUSTER_TOKEN everywhere)",
        )
    why = replay.check_and_add(nonce.lower(), ts, now)
    if why is not None:
        raise HttpAuthError(why, "request nonce was already used (a replayed request)")
    return nonce.lower()


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


def sign_response(key: ClusterKey, context: bytes, nonce: str, status: int, body: bytes) -> str:
    """The :data:`HTTP_SIGNATURE_HEADER` value for a response to the request with ``nonce``."""
    return f"v=1, sig={_response_mac(key, context, nonce, status, body)}"


def verify_response(
    key: ClusterKey, context: bytes, nonce: str, status: int, body: bytes, header: str | None
) -> None:
    """Check the server's signature of a response.

    Raises:
        HttpAuthError: missing (the server has no token configured) or wrong
            (the server holds a different token, or is an impostor).
    """
    if not header:
        raise HttpAuthError(
            "missing",
            "the server's response is not signed: the server has no cluster token configured "
            "(set the same PYMOONCAKE_CLUSTER_TOKEN on it) or is not the server you expect",
        )
    params = _parse_params(header, None)
    sig = params.get("sig", "")
    expected = _response_mac(key, context, nonce, status, body)
    if params.get("v") != "1" or not hmac.compare_digest(expected, sig.lower()):
        raise HttpAuthError(
            "signature",
            "the server's response signature is wrong: it holds a different cluster token",
        )
