"""``mooncake.http_metadata_server``: the reference wheel's HTTP metadata server names.

An adapter over :class:`pymooncake.transfer.metadata.server.MetadataServer`;
the request logic lives there.  Differences from the reference: no aiohttp,
and :meth:`KVBootstrapServer.run` raises :class:`pymooncake.errors.PortInUse`
when the port is taken instead of logging from a dying thread.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Protocol

from pymooncake._authio import ClusterSecurity
from pymooncake._httpd import HttpResponse, ThreadedHttpServer
from pymooncake.cli import http_metadata_server as _cli
from pymooncake.transfer.metadata.server import MetadataServer

__all__ = ["KVBootstrapServer", "KVPoll", "main"]

log = logging.getLogger("mooncake.http_metadata_server")


class KVPoll(Enum):
    """Status of the server, as the reference reports it."""

    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4


class _Request(Protocol):
    """What ``_handle_metadata`` needs of a request (an aiohttp request fits)."""

    @property
    def method(self) -> str: ...

    @property
    def query(self) -> Mapping[str, str]: ...

    async def read(self) -> bytes: ...


class KVBootstrapServer:
    """HTTP metadata server (reference signature).

    Args:
        port: port to listen on; 0 picks a free one, written to ``port`` by
            :meth:`run`.
        host: address to listen on.

    Attributes:
        store: the key -> bytes dict served.
        thread: the server thread after :meth:`run`.
    """

    def __init__(self, port: int, host: str = "0.0.0.0") -> None:
        self.port = port
        self.host = host
        self.store: dict[str, bytes] = {}
        self.thread: threading.Thread | None = None
        self._server = MetadataServer(store=self.store)
        self._http: ThreadedHttpServer | None = None

    async def _handle_metadata(self, request: _Request) -> HttpResponse:
        """Answer one ``/metadata`` request; the response has ``status``,
        ``content_type``, ``body`` and ``text``."""
        body = await request.read()
        return self._server.handle_metadata(request.method, request.query.get("key"), body)

    def run(self) -> threading.Thread:
        """Start serving in a background thread; returns the thread once listening.

        Raises:
            PortInUse: the port is taken.
            RuntimeError: already running.
        """
        if self._http is not None:
            raise RuntimeError(f"KVBootstrapServer is already running on port {self.port}")
        # the compatibility edge, like the CLIs, takes the token from the environment
        self._http = self._server.serve(self.host, self.port, security=ClusterSecurity.from_env())
        self.port = self._http.port
        self.thread = self._http.thread
        log.info("HTTP Metadata Server started on %s:%d", self.host, self.port)
        assert self.thread is not None  # set by a successful start
        return self.thread

    def close(self) -> None:
        """Stop serving and join the thread (idempotent)."""
        if self._http is not None:
            self._http.close()

    def poll(self) -> KVPoll:
        """``Success`` while the server thread runs, otherwise ``Failed``."""
        if self.thread is None or not self.thread.is_alive():
            return KVPoll.Failed
        return KVPoll.Success


def main(argv: Sequence[str] | None = None) -> int:
    """The ``mooncake_http_metadata_server`` command: ``--port`` (8080),
    ``--host`` (0.0.0.0), ``--log-level``; serves until SIGINT/SIGTERM."""
    return _cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
