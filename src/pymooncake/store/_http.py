"""The store client's HTTP endpoints (the reference's ``RealClient::start_http_server``).

=====================  ========================================================
``GET /health``        ``{"status":"healthy","code":0}`` (200), or
                       ``master_unreachable`` / ``not_initialized`` (503)
``GET /metrics``       Prometheus text: the client's metrics (reference names)
                       and its transfer engine's (TENT names)
``GET /metrics/summary``  the human-readable summary
=====================  ========================================================

With ``MC_STORE_CLIENT_METRIC=0`` the metrics endpoints answer 503
``metrics not available``.  Turned on by ``setup(...,
enable_client_http_server=True, client_http_port=9300)`` or
``MOONCAKE_ENABLE_CLIENT_HTTP_SERVER``/``MOONCAKE_CLIENT_HTTP_PORT``
(:func:`client_http_settings`), and by ``mooncake_client --enable_http_server``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from .._httpd import HttpRequest, HttpResponse, ThreadedHttpServer
from ..config import parse_bool_env
from ..errors import ConfigError, MooncakeError

if TYPE_CHECKING:
    from ._client import StoreClient

__all__ = [
    "DEFAULT_CLIENT_HTTP_PORT",
    "ClientHttpServer",
    "client_http_settings",
    "start_client_http_server",
]

log = logging.getLogger("pymooncake.store.http")

#: reference DEFAULT_CLIENT_HTTP_PORT
DEFAULT_CLIENT_HTTP_PORT: Final = 9300
#: reference health codes (pyclient.h HC_*)
HC_HEALTHY: Final = 0
HC_NOT_INITIALIZED: Final = 1
HC_MASTER_UNREACHABLE: Final = 2
_PROMETHEUS: Final = "text/plain; version=0.0.4"


def client_http_settings(enable: Any, port: Any, env: Mapping[str, str]) -> tuple[bool, int]:
    """(enabled, port) from ``setup``'s keywords and the environment.

    The server runs when ``enable`` is true or ``MOONCAKE_ENABLE_CLIENT_HTTP_SERVER``
    is; the port is ``port`` when the keyword enabled it, else
    ``MOONCAKE_CLIENT_HTTP_PORT``, else 9300.  Port 0 lets the kernel choose.

    Raises:
        ConfigError: a port outside 0..65535 or an unparsable variable
            ("Invalid client HTTP server port: N").
    """
    raw = env.get("MOONCAKE_ENABLE_CLIENT_HTTP_SERVER")
    from_env = bool(raw) and parse_bool_env("MOONCAKE_ENABLE_CLIENT_HTTP_SERVER", raw or "")
    enabled = bool(enable) or from_env
    if enable and port is not None:
        chosen: Any = port
    else:
        chosen = env.get("MOONCAKE_CLIENT_HTTP_PORT", "").strip() or DEFAULT_CLIENT_HTTP_PORT
    try:
        value = int(chosen)
    except (TypeError, ValueError):
        raise ConfigError(f"Invalid client HTTP server port: {chosen!r}") from None
    if enabled and not 0 <= value <= 65535:
        raise ConfigError(f"Invalid client HTTP server port: {value} (0..65535; 0 = any free port)")
    return enabled, value


class ClientHttpServer:
    """Serves a store client's health and metrics on a background thread.

    Args:
        client: the store client (its ``metrics`` and its engine's).
        host: address to listen on (reference: every address).
        port: 0 lets the kernel choose (see :attr:`port`).
    """

    def __init__(
        self, client: StoreClient, host: str = "0.0.0.0", port: int = DEFAULT_CLIENT_HTTP_PORT
    ) -> None:
        self._client = client
        self._server = ThreadedHttpServer(self._handle, host, port, name="client HTTP server")

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        return self._server.url

    def start(self) -> ClientHttpServer:
        """Listen.

        Raises:
            PortInUse: "bind address already in use: port N ..." and the other
                errors of :meth:`ThreadedHttpServer.start`.
        """
        self._server.start()
        return self

    def close(self) -> None:
        self._server.close()

    def __enter__(self) -> ClientHttpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _handle(self, request: HttpRequest) -> HttpResponse:
        if request.method not in ("GET", "HEAD"):
            return HttpResponse(405, b"use GET", headers=(("Allow", "GET"),))
        client = self._client
        path = request.path.rstrip("/") or "/"
        if path == "/health":
            if client.closed:
                code, status = HC_NOT_INITIALIZED, "not_initialized"
            elif not client.ping_healthy:
                code, status = HC_MASTER_UNREACHABLE, "master_unreachable"
            else:
                code, status = HC_HEALTHY, "healthy"
            body = json.dumps({"status": status, "code": code}, separators=(",", ":"))
            return HttpResponse(
                200 if code == HC_HEALTHY else 503, body.encode(), "application/json"
            )
        if path in ("/metrics", "/metrics/summary"):
            metrics = client.metrics
            if metrics is None:
                return HttpResponse.of_text(503, "metrics not available")
            engine = getattr(client, "engine", None)
            engine_metrics = engine.metrics if engine is not None else None
            if path == "/metrics":
                text = metrics.render()
                if engine_metrics is not None:
                    text += engine_metrics.render()
                return HttpResponse.of_text(200, text, _PROMETHEUS)
            text = metrics.summary()
            if engine_metrics is not None:
                text += "\n=== Transfer Engine Summary ===\n" + (
                    engine_metrics.summary() or "No data\n"
                )
            return HttpResponse.of_text(200, text)
        return HttpResponse.of_text(
            404, f"not found: {request.path}; try /health, /metrics or /metrics/summary"
        )


def start_client_http_server(
    client: StoreClient, port: int, host: str = "0.0.0.0"
) -> ClientHttpServer | None:
    """Start the endpoints; on failure log a warning and return None (the
    reference keeps the client running without them)."""
    server = ClientHttpServer(client, host, port)
    try:
        server.start()
    except MooncakeError as exc:
        log.warning(
            "Failed to start client HTTP server on port %d (%s); continuing without HTTP endpoints",
            port,
            exc,
        )
        server.close()
        return None
    log.info("Client HTTP server started on %s (/health, /metrics, /metrics/summary)", server.url)
    return server
