"""A watch that survives reconnects: ``POST /v3/watch`` streamed on a thread.

Resuming without gaps or repeats: the watch remembers the revision after the
last change it delivered (``next_revision``) and, when the stream breaks
(endpoint down, connection reset, idle for ``idle_reconnect_s``), opens a new
one on the next endpoint with ``start_revision = next_revision``.  etcd then
replays every change since, so the consumer sees each revision exactly once,
in order, across any number of reconnects.  Revisions are cluster-wide, so
this holds across endpoints of one cluster too.

The one gap etcd cannot fill: changes older than its last compaction.  Then
the stream ends with a response whose ``canceled`` is set and whose
``compact_revision`` says where history now starts; the watch stops after
delivering it, and the consumer must re-read the state (``get`` at some
revision R) and start a new watch at R + 1.
"""

from __future__ import annotations

import http.client
import json
import logging
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final

from ._endpoints import Endpoint
from ._errors import EtcdCompacted, EtcdError, error_from_gateway
from ._http import NotSent, describe_failure
from ._stream import StreamDecoder, WatchResponse, decode_watch_message, watch_request
from ._wire import GatewayError, decode_error

if TYPE_CHECKING:
    from ._client import EtcdClient

__all__ = ["Watch"]

log = logging.getLogger("pymooncake.etcd")

_FIRST_BACKOFF_S: Final = 0.05
_MAX_BACKOFF_S: Final = 2.0
_READ_BYTES: Final = 1 << 16


class _StreamEnded(Exception):
    """The stream stopped without an error from etcd (EOF, idle timeout)."""


class Watch:
    """Changes to a key or range, delivered in revision order.

    Created by :meth:`EtcdClient.watch`.  Responses go to ``on_response`` (called
    on the watch thread) or, without it, to a queue read with :meth:`get` or by
    iterating.  Each (re)opened stream first delivers a response with
    ``created`` set.

    Attributes:
        reconnects: streams opened after the first.
        last_error: why the last stream broke ("" if none did).
    """

    def __init__(
        self,
        client: EtcdClient,
        key: bytes,
        range_end: bytes | None,
        *,
        start_revision: int = 0,
        prev_kv: bool = False,
        on_response: Callable[[WatchResponse], None] | None = None,
        idle_reconnect_s: float = 30.0,
    ) -> None:
        if idle_reconnect_s <= 0:
            raise ValueError("idle_reconnect_s must be positive")
        self.key = key
        self.range_end = range_end
        self.prev_kv = prev_kv
        self.idle_reconnect_s = idle_reconnect_s
        self.reconnects = 0
        self.last_error = ""
        self.compact_revision = 0
        self._client = client
        self._on_response = on_response
        self._next_revision = start_revision
        self._revision = max(0, start_revision - 1)
        self._queue: queue.SimpleQueue[WatchResponse | None] = queue.SimpleQueue()
        self._created = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._streams = 0
        self._thread = threading.Thread(
            target=self._run,
            name=f"etcd-watch-{key.decode('utf-8', 'backslashreplace')}",
            daemon=True,
        )
        self._thread.start()

    def __repr__(self) -> str:
        return (
            f"<Watch {self.key!r} revision={self.revision} reconnects={self.reconnects}"
            f"{' closed' if self.closed else ''}>"
        )

    # --- state ------------------------------------------------------------------

    @property
    def revision(self) -> int:
        """Every change up to this revision has been delivered."""
        with self._lock:
            return self._revision

    @property
    def next_revision(self) -> int:
        """Where a resumed stream starts (0 before the first stream said where "now" is)."""
        with self._lock:
            return self._next_revision

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    @property
    def canceled(self) -> bool:
        """etcd ended the watch for good (its start revision was compacted)."""
        return self.compact_revision > 0

    def wait_created(self, timeout_s: float | None = None) -> bool:
        """Wait until a stream is established; True if it is."""
        return self._created.wait(timeout_s)

    # --- consuming --------------------------------------------------------------

    def get(self, timeout_s: float | None = None) -> WatchResponse | None:
        """The next response; None on timeout, or once the watch is closed and drained."""
        try:
            item = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if item is None:
            self._queue.put(None)  # keep the end marker for other readers
        return item

    def __iter__(self) -> Iterator[WatchResponse]:
        """Responses until the watch is closed or canceled (blocks in between)."""
        while True:
            item = self.get()
            if item is None:
                return
            yield item

    # --- the thread -------------------------------------------------------------

    def _deliver(self, resp: WatchResponse) -> None:
        if self._on_response is None:
            self._queue.put(resp)
            return
        try:
            self._on_response(resp)
        except Exception:
            log.exception("watch callback for %r failed", self.key)

    def _handle(self, resp: WatchResponse, ep: Endpoint) -> None:
        if resp.canceled:
            if resp.compact_revision:
                self.compact_revision = resp.compact_revision
                self._deliver(resp)
                self._stop.set()
                raise EtcdCompacted(
                    f"etcd watch of {self.key!r} from revision {self.next_revision}: history "
                    f"before {resp.compact_revision} was compacted",
                    compact_revision=resp.compact_revision,
                )
            raise EtcdError(f"etcd canceled the watch of {self.key!r}: {resp.cancel_reason}")
        with self._lock:
            if resp.created:
                if self._next_revision == 0:
                    self._next_revision = resp.revision + 1
                    self._revision = resp.revision
            elif resp.events:
                last = resp.events[-1].kv.mod_revision
                self._next_revision = last + 1
                self._revision = max(self._revision, last)
            else:  # a progress notification: nothing is pending up to its revision
                self._next_revision = max(self._next_revision, resp.revision + 1)
                self._revision = max(self._revision, resp.revision)
        if resp.created:
            self._client.prefer(ep)
            self._created.set()
        self._deliver(resp)

    def _stream(self, ep: Endpoint) -> None:
        conn = self._client.new_connection(ep)
        with self._lock:
            if self._stop.is_set():
                self._client.discard_connection(conn)
                return
            self._conn = conn
            start = self._next_revision
        try:
            assert conn.sock is not None
            conn.sock.settimeout(self._client.timeout_s)
            body = watch_request(
                self.key, self.range_end, start_revision=start, prev_kv=self.prev_kv
            )
            conn.request(
                "POST",
                "/v3/watch",
                body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            if resp.status != 200:
                raise error_from_gateway(decode_error(resp.status, resp.read()), "watch")
            conn.sock.settimeout(self.idle_reconnect_s)
            decoder = StreamDecoder()
            self._streams += 1
            while not self._stop.is_set():
                try:
                    data = resp.read1(_READ_BYTES)
                except TimeoutError:
                    raise _StreamEnded(
                        f"no message for {self.idle_reconnect_s:g} s; reopening"
                    ) from None
                if not data:
                    raise _StreamEnded(f"{ep} closed the watch stream")
                decoder.feed(data)
                while (obj := decoder.next()) is not None:
                    msg = decode_watch_message(obj)
                    if isinstance(msg, GatewayError):
                        raise error_from_gateway(msg, "watch")
                    self._handle(msg, ep)
        finally:
            with self._lock:
                self._conn = None
            self._client.discard_connection(conn)

    def _run(self) -> None:
        backoff = _FIRST_BACKOFF_S
        index = 0
        try:
            while not self._stop.is_set():
                order = self._client.endpoint_order()
                ep = order[index % len(order)]
                streams_before = self._streams
                try:
                    self._stream(ep)
                except EtcdCompacted as exc:
                    self.last_error = str(exc)
                    return
                except _StreamEnded as exc:
                    self.last_error = str(exc)
                except (NotSent, OSError, http.client.HTTPException, EtcdError) as exc:
                    if self._stop.is_set():
                        return
                    self.last_error = describe_failure(ep, exc, self._client.timeout_s)
                    index += 1  # try the next endpoint
                    if self.reconnects == 0 or self.reconnects % 50 == 0:
                        log.warning(
                            "etcd watch of %r interrupted (%s); resuming from revision %d",
                            self.key,
                            self.last_error,
                            self.next_revision,
                        )
                if self._stop.is_set():
                    return
                self.reconnects += 1
                if self._streams > streams_before:
                    backoff = _FIRST_BACKOFF_S  # that stream worked for a while
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
        finally:
            self._queue.put(None)

    # --- closing ------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the thread to stop, without waiting (see :meth:`close`)."""
        self._stop.set()
        with self._lock:
            conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked read
            except OSError:
                pass

    def close(self) -> None:
        """Stop watching; pending responses can still be read with :meth:`get`. Idempotent."""
        self.stop()
        if self._thread is not threading.current_thread():
            self._thread.join()
