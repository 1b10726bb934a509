"""HTTP/1.1 request parsing and response encoding for our small services.

Theory of operation
-------------------
:class:`RequestParser` turns the bytes a client sent on one connection into
:class:`HttpRequest` values; :func:`encode_response` turns an
:class:`HttpResponse` into the bytes to send back.  Nothing here touches a
socket, so the whole protocol is tested by feeding bytes.

What is accepted (RFC 9112, the subset our clients use -- libcurl in the
reference engine, ``http.client`` in ours, curl by operators):

* ``METHOD SP request-target SP HTTP/1.x`` request lines, origin-form
  (``/path?query``) or absolute-form targets; a few empty lines before a
  request are skipped.  Lines may end in CRLF or a bare LF.
* Header names are matched case-insensitively (stored lowercased); repeated
  headers are joined with ``", "``.  Obsolete line folding is refused.
* Bodies framed by ``Content-Length`` only.  A ``Transfer-Encoding`` (chunked
  upload) is answered with 411 Length Required: none of our clients sends one.
* ``Expect: 100-continue`` is noticed so that the server can send the interim
  response libcurl waits for (otherwise curl stalls a second before a large PUT).
* Keep-alive: the HTTP/1.1 default unless ``Connection: close``; HTTP/1.0 only
  with ``Connection: keep-alive``.  Pipelined requests are returned in order.

Limits: the request line plus headers may not exceed ``max_header_bytes``
(431) and a body may not exceed ``max_body_bytes`` (413, decided from the
header before any body byte is buffered).  Any error leaves the parser failed:
the connection is to be answered with :func:`error_response` and closed.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final

from ..errors import MalformedMessage
from ._rpc import NEED_DATA, NeedData, take_bytes

__all__ = [
    "CONTINUE_RESPONSE",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_HEADER_BYTES",
    "HttpParseError",
    "HttpRequest",
    "HttpResponse",
    "RequestParser",
    "encode_response",
    "error_response",
]

#: request line + headers; large enough for any real client (nginx uses 8-32 KiB)
DEFAULT_MAX_HEADER_BYTES: Final = 64 << 10
#: segment descriptors are a few KiB to a few MiB; 64 MiB leaves ample room
DEFAULT_MAX_BODY_BYTES: Final = 64 << 20

#: the interim response sent to a client that asked ``Expect: 100-continue``
CONTINUE_RESPONSE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

_TOKEN: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE: Final = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_HEADER_NAME: Final = re.compile(_TOKEN)
_BAD_VALUE_CHARS: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEADERS_END: Final = re.compile(rb"\r?\n\r?\n")
#: a u64 has 20 digits; any longer Content-Length is refused before int() sees it
_MAX_LENGTH_DIGITS: Final = 20
#: query parameters accepted per request (parse_qsl's max_num_fields)
MAX_QUERY_FIELDS: Final = 256


class HttpParseError(MalformedMessage):
    """A request cannot be parsed or is refused by a limit.

    ``status`` is the HTTP status to answer with (400, 411, 413, 431, 505); the
    message says what was wrong, for the response body and the server log.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class HttpRequest:
    """One complete request.

    Attributes:
        method: as sent (methods are case-sensitive), e.g. ``"GET"``.
        path: the percent-decoded path of the target, e.g. ``"/metadata"``.
        query: first value of each query parameter, percent-decoded
            (``+`` means space, as in form encoding); blank values are kept.
        headers: lowercased header names to values.
        body: the exact body bytes (empty without ``Content-Length``).
        version: ``"HTTP/1.1"`` or ``"HTTP/1.0"``.
        target: the raw request target, for logs.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""
    version: str = "HTTP/1.1"
    target: str = ""

    def header(self, name: str, default: str | None = None) -> str | None:
        """A header's value by case-insensitive name."""
        return self.headers.get(name.lower(), default)

    @property
    def keep_alive(self) -> bool:
        """Whether the client lets the connection stay open after this request."""
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


@dataclass(frozen=True)
class HttpResponse:
    """A complete response.

    Attributes:
        status: the HTTP status code.
        body: the body bytes.
        content_type: media type sent as ``Content-Type``; ``text/*`` types
            get ``; charset=utf-8`` on the wire when no charset is given.
        headers: extra ``(name, value)`` pairs; framing headers
            (Content-Length, Connection) are written by :func:`encode_response`.
    """

    status: int
    body: bytes = b""
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def of_text(cls, status: int, text: str, content_type: str = "text/plain") -> HttpResponse:
        """A response whose body is ``text`` encoded as UTF-8."""
        return cls(status, text.encode(), content_type)

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (undecodable bytes replaced)."""
        return self.body.decode("utf-8", errors="replace")


def encode_response(
    response: HttpResponse,
    *,
    keep_alive: bool,
    include_body: bool = True,
    date: str | None = None,
) -> bytes:
    """Serialise ``response`` as an HTTP/1.1 response.

    Args:
        keep_alive: False adds ``Connection: close`` (the caller then closes).
        include_body: False for a HEAD request: headers (with the length the
            body would have) but no body.
        date: an RFC 9110 date for the ``Date`` header, omitted when None.

    Raises:
        ValueError: a status outside 200..599 or a header containing CR/LF.
    """
    status = response.status
    if not 200 <= status <= 599:
        raise ValueError(f"response status {status} is not a final status (200..599)")
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    content_type = response.content_type
    if content_type.startswith("text/") and "charset" not in content_type:
        content_type += "; charset=utf-8"
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}"]
    lines.append(f"Content-Length: {len(response.body)}")
    if date is not None:
        lines.append(f"Date: {date}")
    for name, value in response.headers:
        if not _HEADER_NAME.fullmatch(name.encode("latin-1", errors="replace")):
            raise ValueError(f"response header name {name!r} is not an HTTP token")
        if "\r" in value or "\n" in value:
            raise ValueError(f"response header {name!r} value {value!r} contains CR or LF")
        lines.append(f"{name}: {value}")
    if not keep_alive:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + response.body if include_body else head


def error_response(error: HttpParseError) -> HttpResponse:
    """The plain-text response for a request the parser refused."""
    return HttpResponse.of_text(error.status, f"{error.message}\n")


@dataclass(frozen=True)
class _Head:
    """A parsed request line and header block, waiting for its body."""

    method: str
    target: str
    path: str
    query: dict[str, str]
    version: str
    headers: dict[str, str]
    body_bytes: int


class RequestParser:
    """Incremental parser for the requests arriving on one connection.

    Feed bytes with :meth:`feed`, then call :meth:`next_request` until it
    returns :data:`NEED_DATA`.  Bytes after a complete request stay buffered
    for the next call (``trailing`` exposes them).

    Args:
        max_header_bytes: largest request line + header block (431 beyond).
        max_body_bytes: largest ``Content-Length`` accepted (413 beyond).

    Raises (from ``next_request``):
        HttpParseError: malformed request (400), chunked body (411), body or
            header limit exceeded (413/431), HTTP major version other than 1
            (505).  The parser stays failed and raises the same error again.
    """

    def __init__(
        self,
        *,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        if max_header_bytes < 16:
            raise ValueError(f"max_header_bytes={max_header_bytes} is too small (minimum 16)")
        if max_body_bytes < 0:
            raise ValueError(f"max_body_bytes={max_body_bytes} must not be negative")
        self._max_header = max_header_bytes
        self._max_body = max_body_bytes
        self._buf = bytearray()
        self._scanned = 0  # bytes already searched for the end of the header block
        self._head: _Head | None = None
        self._continue_due = False
        self._error: HttpParseError | None = None

    @property
    def trailing(self) -> bytes:
        """Buffered bytes not yet returned as (part of) a request."""
        return bytes(self._buf)

    @property
    def expected_body(self) -> int:
        """The ``Content-Length`` of the request whose headers are parsed and whose
        body is still arriving (0 otherwise): reserve it before buffering it."""
        return self._head.body_bytes if self._head is not None else 0

    @property
    def buffered(self) -> int:
        """Bytes held by the parser."""
        return len(self._buf)

    @property
    def in_progress(self) -> bool:
        """True while part of a request has been received."""
        return self._head is not None or bool(self._buf.strip(b"\r\n"))

    def feed(self, data: bytes) -> None:
        """Append received bytes (``b""`` is allowed and changes nothing)."""
        self._buf += data

    def take_continue(self) -> bool:
        """True once per request that asked ``Expect: 100-continue`` and whose
        body has not fully arrived: send :data:`CONTINUE_RESPONSE` now."""
        due, self._continue_due = self._continue_due, False
        return due

    def next_request(self) -> HttpRequest | NeedData:
        """The next complete request, or :data:`NEED_DATA`."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except HttpParseError as exc:
            self._error = exc
            self._continue_due = False
            raise

    def _next(self) -> HttpRequest | NeedData:
        if self._head is None:
            head = self._parse_head()
            if isinstance(head, NeedData):
                return head
            self._head = head
        head = self._head
        if len(self._buf) < head.body_bytes:
            return NEED_DATA
        body = take_bytes(self._buf, 0, head.body_bytes)
        del self._buf[: head.body_bytes]
        self._head = None
        self._continue_due = False
        return HttpRequest(
            method=head.method,
            path=head.path,
            query=head.query,
            headers=head.headers,
            body=body,
            version=head.version,
            target=head.target,
        )

    def _parse_head(self) -> _Head | NeedData:
        buf = self._buf
        # RFC 9112 2.2: ignore empty lines received before a request line
        skip = 0
        while buf[skip : skip + 2] == b"\r\n" or buf[skip : skip + 1] == b"\n":
            skip += 2 if buf[skip] == 0x0D else 1
        if skip:
            del buf[:skip]
            self._scanned = 0
        match = _HEADERS_END.search(buf, max(0, self._scanned - 3))
        if match is None:
            self._scanned = len(buf)
            if len(buf) > self._max_header:
                raise self._too_large_header()
            return NEED_DATA
        if match.end() > self._max_header:
            raise self._too_large_header()
        block = take_bytes(buf, 0, match.start())
        del buf[: match.end()]
        self._scanned = 0
        lines = [line[:-1] if line.endswith(b"\r") else line for line in block.split(b"\n")]
        head = _parse_block(lines, self._max_body)
        if (
            head.body_bytes > 0
            and head.version == "HTTP/1.1"
            and head.headers.get("expect", "").lower() == "100-continue"
            and len(buf) < head.body_bytes
        ):
            self._continue_due = True
        return head

    def _too_large_header(self) -> HttpParseError:
        return HttpParseError(
            431,
            f"request line and headers exceed {self._max_header} bytes; send smaller headers "
            "(is a cookie or a proxy adding headers?)",
        )


def _parse_block(lines: list[bytes], max_body: int) -> _Head:
    request_line = lines[0]
    match = _REQUEST_LINE.fullmatch(request_line)
    if match is None:
        shown = request_line[:200].decode("latin-1")
        raise HttpParseError(
            400,
            f"malformed request line {shown!r}; expected 'METHOD /path HTTP/1.1' (is this client "
            "speaking HTTP to an HTTP port?)",
        )
    method = match.group(1).decode("ascii")
    target = match.group(2).decode("ascii")
    major, minor = int(match.group(3)), int(match.group(4))
    if major != 1:
        raise HttpParseError(505, f"HTTP/{major}.{minor} is not supported; use HTTP/1.1")
    version = "HTTP/1.0" if minor == 0 else "HTTP/1.1"
    path, query = _split_target(target)
    headers = _parse_headers(lines[1:])
    if "transfer-encoding" in headers:
        raise HttpParseError(
            411,
            f"Transfer-Encoding {headers['transfer-encoding']!r} request bodies are not "
            "supported; send the body with a Content-Length header",
        )
    body_bytes = _content_length(headers.get("content-length"), max_body)
    return _Head(method, target, path, query, version, headers, body_bytes)


def _split_target(target: str) -> tuple[str, dict[str, str]]:
    if target == "*":
        return "*", {}
    if target.startswith("/"):
        raw_path, _, raw_query = target.partition("?")
    elif target.lower().startswith(("http://", "https://")):
        try:
            parts = urllib.parse.urlsplit(target)
        except ValueError:
            raise HttpParseError(400, f"request target {target[:200]!r} is not a URL") from None
        raw_path, raw_query = parts.path or "/", parts.query
    else:
        raise HttpParseError(
            400, f"request target {target[:200]!r} must be a path starting with '/'"
        )
    raw_path = raw_path.partition("#")[0]
    query: dict[str, str] = {}
    try:
        pairs = urllib.parse.parse_qsl(
            raw_query, keep_blank_values=True, errors="strict", max_num_fields=MAX_QUERY_FIELDS
        )
        path = urllib.parse.unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        raise HttpParseError(
            400,
            f"request target {target[:200]!r} percent-encodes bytes that are not UTF-8; "
            "names and keys must be valid UTF-8",
        ) from None
    except ValueError:
        raise HttpParseError(
            400, f"request target has more than {MAX_QUERY_FIELDS} query parameters"
        ) from None
    for name, value in pairs:
        query.setdefault(name, value)
    return path, query


def _parse_headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise HttpParseError(400, "obsolete header line folding is not accepted")
        name, colon, value = line.partition(b":")
        if not colon or not _HEADER_NAME.fullmatch(name):
            shown = line[:100].decode("latin-1")
            raise HttpParseError(400, f"malformed header line {shown!r}; expected 'Name: value'")
        value = value.strip(b" \t")
        if _BAD_VALUE_CHARS.search(value):
            raise HttpParseError(
                400, f"header {name.decode('ascii')!r} contains control characters"
            )
        key = name.decode("ascii").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def _content_length(value: str | None, max_body: int) -> int:
    if value is None:
        return 0
    # repeated identical values ("5, 5") are allowed by RFC 9110 8.6
    values = {v.strip() for v in value.split(",")}
    if len(values) != 1:
        raise HttpParseError(400, f"conflicting Content-Length values {value!r}")
    (text,) = values
    if not text.isdigit() or not text.isascii():
        raise HttpParseError(400, f"Content-Length {value[:40]!r} is not a non-negative integer")
    digits = text.lstrip("0") or "0"
    if len(digits) > _MAX_LENGTH_DIGITS:  # int() of thousands of digits is slow or refused
        raise HttpParseError(
            413,
            f"request body of a {len(digits)}-digit length exceeds the limit of {max_body} bytes",
        )
    length = int(digits)
    if length > max_body:
        raise HttpParseError(
            413,
            f"request body of {length} bytes exceeds the limit of {max_body} bytes; "
            "raise the server's body limit if such values are expected",
        )
    return length
