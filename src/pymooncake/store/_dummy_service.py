"""The real client's service for dummy clients (``mooncake_client --port``).

Theory of operation
-------------------
A standalone ``mooncake_client`` owns the memory, the transfer engine and the
master connection of a node; serving ranks embed thin *dummy* clients
(``MooncakeDistributedStore.setup_dummy``) that forward every store call here
(reference ``real_client_main.cpp``, ``real_client.cpp``).

* **RPC port** (TCP, ``--port``): one thread per connection reads request
  frames (``wire/_dummy.py``) and answers them in order; the work is in
  ``_dummy_handlers.py``.  With a cluster token every connection first passes
  the HMAC handshake (context ``b"dummy-rpc"``): the port is reachable from
  other hosts.
* **Memory** (abstract UNIX socket ``@mooncake_client_<port>.sock``): a dummy
  sends a memfd (``SCM_RIGHTS``) with its address in the dummy's process; the
  real client checks the memfd is large enough and sealed against shrinking,
  maps it ``MAP_SHARED`` and registers it with its engine (not remotely
  accessible, not published).  Store calls then name dummy addresses, which
  are translated into this mapping (``_dummy_memory.py``), so the engine reads
  and writes the dummy's pages directly.  Only dummies that said ``hello``
  over the RPC port (and so passed the token check) may register memory.
* **Liveness**: dummies ping every second; a monitor thread expires a dummy
  silent for ``ttl_s`` (10 s, the reference's ``DEFAULT_CLIENT_LIVE_TTL_SEC``)
  and unmaps its memory (``dummy_client_monitor_func``).  A dummy that comes
  back later is told it is unknown and registers again.

Unmapping never races a call: every call holds its dummy's memory for its
whole duration (``in_flight``); unregistering one buffer waits for the calls
of that dummy to finish, and expired or closed dummies are unmapped by the
monitor once their last call returned.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .._authio import ClusterSecurity, server_handshake
from .._logging import RepeatLimiter
from .._net import bind_listener, join_host_port
from ..errors import (
    AuthenticationError,
    InvalidParams,
    MalformedMessage,
    MooncakeError,
    PortInUse,
    StoreError,
    store_error,
)
from ..transfer._memory import Region
from ..wire._auth import looks_like_hello, no_token_reply
from ..wire._dummy import (
    DUMMY_AUTH_CONTEXT,
    DUMMY_PROTOCOL_VERSION,
    SHM_REGISTER_SIZE,
    DummyFrameDecoder,
    DummyReply,
    DummyRequest,
    ShmRegister,
    decode_shm_register,
    dummy_ipc_name,
    encode_dummy_reply,
    encode_shm_result,
)
from ._client import StoreClient
from ._dummy_handlers import HANDLERS, error_code
from ._dummy_memory import DummyState, DummyTable, MappedRegion
from ._types import ErrorCode

__all__ = ["AUTH_CONTEXT", "DummyService", "DummyServiceConfig"]

log = logging.getLogger("pymooncake.store.dummy")

#: HMAC context of the dummy-client RPC port (the dummy uses the same)
AUTH_CONTEXT = DUMMY_AUTH_CONTEXT


@dataclass(frozen=True)
class DummyServiceConfig:
    """Settings of the dummy-client service.

    Attributes:
        host: address to listen on (``mooncake_client --host`` without its port).
        port: the RPC port (``--port``, reference default 50052; 0 = any free port).
        ttl_s: a dummy silent this long is expired and its memory unmapped
            (reference DEFAULT_CLIENT_LIVE_TTL_SEC).
        monitor_interval_s: how often expiry is checked (reference kDummyClientMonitorSleepMs).
        max_connections: RPC connections served at once (each has a thread).
        auth_timeout_s: a connection must finish the token handshake this fast.
        drain_timeout_s: unregistering a buffer waits this long for the dummy's
            running calls.
        security: cluster token / TLS of the RPC port.
    """

    host: str = "0.0.0.0"
    port: int = 50052
    ttl_s: float = 10.0
    monitor_interval_s: float = 1.0
    max_connections: int = 1024
    auth_timeout_s: float = 5.0
    drain_timeout_s: float = 60.0
    security: ClusterSecurity = field(default_factory=ClusterSecurity)


@dataclass(eq=False)
class _Mapping:
    mm: mmap.mmap
    region: Region


@dataclass(eq=False)
class _Live:
    """The I/O side of one dummy: its mappings and the calls running for it."""

    state: DummyState
    mappings: dict[int, _Mapping] = field(default_factory=dict)
    in_flight: int = 0
    exclusive: int = 0
    closed: bool = False


class _Translator:
    def __init__(self, service: DummyService, live: _Live) -> None:
        self._svc = service
        self._live = live

    def translate(self, addr: int, length: int) -> int:
        with self._svc._lock:
            return self._live.state.translate(addr, length)


#: master connections opened when the service starts (see ``preconnect``)
_MASTER_CONNECTIONS = 4


def _peer_pid(sock: socket.socket) -> int:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[0])
    except OSError:
        return 0


class DummyService:
    """Serves dummy clients on behalf of ``client`` until :meth:`close`.

    Raises:
        PortInUse: the RPC port, or the UNIX socket of that port, is taken.
        PeerSocketError / DnsError: ``host`` is not an address of this machine.
    """

    def __init__(self, client: StoreClient, config: DummyServiceConfig | None = None) -> None:
        self.client = client
        self.config = config = config or DummyServiceConfig()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._table = DummyTable(config.ttl_s)
        self._live: dict[str, _Live] = {}
        self._zombies: list[_Live] = []
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._stop = threading.Event()
        self._bad = RepeatLimiter(log, every=100)
        self._key = config.security.key
        self._ssl = config.security.server_ssl_context() if config.security.tls else None
        self._listener = bind_listener(
            config.host, port=config.port, what="dummy-client RPC port (--port)"
        )
        self.port = int(self._listener.getsockname()[1])
        self.ipc_name = dummy_ipc_name(self.port)
        self._ipc = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._ipc.bind(self.ipc_name)
            self._ipc.listen(128)
        except OSError as exc:
            self._ipc.close()
            self._listener.close()
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"the UNIX socket @{self.ipc_name[1:]} is taken: another mooncake_client on "
                    f"this host serves dummy clients with --port={self.port}; give each its own "
                    "--port"
                ) from exc
            raise
        host = self._listener.getsockname()[0]
        self.address = join_host_port(str(host), self.port)
        self._threads = [
            threading.Thread(target=self._accept_loop, name="mc-dummy-accept", daemon=True),
            threading.Thread(target=self._ipc_loop, name="mc-dummy-ipc", daemon=True),
            threading.Thread(target=self._monitor_loop, name="mc-dummy-monitor", daemon=True),
        ]
        for t in self._threads:
            t.start()
        # Dummies call through this client concurrently (a thread per dummy
        # connection, beside the client's own pings): open the master connections
        # they will share now rather than one by one under their first burst.
        try:
            client.master.preconnect(_MASTER_CONNECTIONS)
        except MooncakeError as exc:  # the calls open their own when it is back
            log.warning("dummy-client service: no master connection yet: %s", exc)

    # ------------------------------------------------------------------------------
    # what the handlers call (ServiceContext)
    # ------------------------------------------------------------------------------

    def hello(self, client_id: str, pid: int) -> dict[str, Any]:
        _check_client_id(client_id)
        with self._lock:
            state = self._table.hello(client_id, pid, time.monotonic())
            live = self._live.get(client_id)
            if live is None:
                live = self._live[client_id] = _Live(state)
                log.info("dummy client %s (pid %d) connected", client_id, pid)
            bases = [r.dummy_base for r in state.regions()]
        return {
            "version": DUMMY_PROTOCOL_VERSION,
            "segment": self.client.hostname,
            "ttl_s": self.config.ttl_s,
            "regions": bases,
        }

    def ping(self, client_id: str) -> dict[str, Any]:
        with self._lock:
            state = self._table.seen(client_id, time.monotonic())
            bases = [r.dummy_base for r in state.regions()] if state is not None else []
        return {
            "known": state is not None,
            "healthy": self.client.ping_healthy,
            "regions": bases,
        }

    def unregister(self, client_id: str, base: int | None) -> None:
        if base is None:  # the dummy closes: everything goes
            with self._lock:
                live = self._live.pop(client_id, None)
                self._table.pop(client_id)
                if live is not None:
                    live.closed = True
                    self._zombies.append(live)
            if live is not None:
                log.info("dummy client %s closed", client_id)
                self._reap()
            return
        with self._lock:
            live = self._live.get(client_id)
            if live is None or live.closed:
                raise self._unknown(client_id)
            live.exclusive += 1
            try:
                deadline = time.monotonic() + self.config.drain_timeout_s
                while live.in_flight:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise store_error(
                            int(ErrorCode.INTERNAL_ERROR),
                            f"unregister_buffer({base:#x}): calls of this dummy client still run "
                            f"after {self.config.drain_timeout_s:g} s; retry when they finished",
                        )
                    self._cond.wait(left)
                live.state.remove(base)
                mapping = live.mappings.pop(base)
            finally:
                live.exclusive -= 1
                self._cond.notify_all()
        self._unmap(mapping)

    @contextlib.contextmanager
    def using(self, client_id: str) -> Iterator[_Translator]:
        """The dummy's memory, held (not unmapped) until the block ends.

        Raises:
            StoreError(CLIENT_NOT_FOUND): the dummy is not registered here (this
                real client restarted or expired it); the dummy registers again.
        """
        with self._lock:
            live = self._live.get(client_id)
            while live is not None and live.exclusive and not live.closed:
                self._cond.wait()
            if live is None or live.closed:
                raise self._unknown(client_id)
            live.in_flight += 1
            self._table.seen(client_id, time.monotonic())
        try:
            yield _Translator(self, live)
        finally:
            with self._lock:
                live.in_flight -= 1
                if not live.in_flight:
                    self._cond.notify_all()

    def _unknown(self, client_id: str) -> StoreError:
        return store_error(
            int(ErrorCode.CLIENT_NOT_FOUND),
            f"dummy client {client_id} is not registered with the real client at "
            f"{self.address} (it restarted, or expired the dummy after {self.config.ttl_s:g} s "
            "without a ping)",
        )

    # ------------------------------------------------------------------------------
    # introspection
    # ------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Dummies known, shared regions mapped and their bytes."""
        with self._lock:
            states = [live.state for live in self._live.values()]
            return {
                "dummies": len(states),
                "regions": sum(s.region_count for s in states),
                "mapped_bytes": sum(s.mapped_bytes for s in states),
                "pending_unmaps": len(self._zombies),
            }

    # ------------------------------------------------------------------------------
    # RPC connections
    # ------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, addr = self._listener.accept()
            except OSError as exc:
                if self._stop.is_set():
                    return
                self._bad("accept", logging.WARNING, "dummy-client RPC port: accept: %s", exc)
                time.sleep(0.05)
                continue
            peer = join_host_port(str(addr[0]), int(addr[1]))
            with self._lock:
                if self._stop.is_set() or len(self._conns) >= self.config.max_connections:
                    full = True
                else:
                    full = False
                    t = threading.Thread(
                        target=self._serve, args=(sock, peer), name="mc-dummy-conn", daemon=True
                    )
                    self._conns[sock] = t
                    t.start()
            if full:
                self._bad(
                    "full",
                    logging.WARNING,
                    "dummy-client RPC port: refusing %s: %d connections are open (max_connections)",
                    peer,
                    self.config.max_connections,
                )
                sock.close()

    def _serve(self, sock: socket.socket, peer: str) -> None:
        conn = sock
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:
                conn.settimeout(self.config.auth_timeout_s)
                conn = self._ssl.wrap_socket(conn, server_side=True)
                conn.settimeout(None)
            if self._key is not None:
                if self._ssl is None and self._refused_without_token(conn, peer):
                    return
                server_handshake(
                    conn,
                    self._key,
                    AUTH_CONTEXT,
                    timeout_s=self.config.auth_timeout_s,
                    port="dummy-client RPC port",
                    peer=peer,
                )
            self._requests(conn, peer)
        except AuthenticationError as exc:
            self._bad(
                f"auth:{peer.rsplit(':', 1)[0]}",
                logging.WARNING,
                "dummy-client RPC port: refusing %s: %s",
                peer,
                exc,
            )
        except MalformedMessage as exc:
            self._bad("malformed", logging.WARNING, "dummy-client RPC: closing %s: %s", peer, exc)
        except OSError:
            pass  # the dummy went away (or close() shut the socket)
        finally:
            with self._lock:
                self._conns.pop(sock, None)
            conn.close()

    def _refused_without_token(self, conn: socket.socket, peer: str) -> bool:
        """A dummy without the token sends a request instead of a HELLO: answer
        that request with an error that says so (not just a closed connection)."""
        conn.settimeout(self.config.auth_timeout_s)
        try:
            first = conn.recv(16, socket.MSG_PEEK)
            if not first or looks_like_hello(first) is not False:
                return False
            decoder = DummyFrameDecoder(max_length=1 << 20)
            frame = decoder.next_frame()
            while not isinstance(frame, (DummyRequest, DummyReply)):
                data = conn.recv(1 << 16)
                if not data:
                    return True
                decoder.feed(data)
                frame = decoder.next_frame()
        except (OSError, MalformedMessage):
            return True
        finally:
            with contextlib.suppress(OSError):
                conn.settimeout(None)
        self._bad(
            f"notoken-dummy:{peer.rsplit(':', 1)[0]}",
            logging.WARNING,
            "dummy-client RPC port: refusing %s: it has no cluster token (this mooncake_client "
            "has one); set the same PYMOONCAKE_CLUSTER_TOKEN in the dummy's process",
            peer,
        )
        with contextlib.suppress(OSError):
            conn.sendall(
                encode_dummy_reply(
                    frame.id,
                    int(ErrorCode.ILLEGAL_CLIENT),
                    f"the real client at {self.address} requires the cluster token: set the "
                    "same PYMOONCAKE_CLUSTER_TOKEN in this process as in mooncake_client's",
                )
            )
        return True

    def _requests(self, conn: socket.socket, peer: str) -> None:
        decoder = DummyFrameDecoder()
        first = self._key is None
        while True:
            data = conn.recv(1 << 16)
            if not data:
                return
            if first:
                first = False
                if looks_like_hello(data[:16]):
                    self._bad(
                        f"notoken:{peer.rsplit(':', 1)[0]}",
                        logging.ERROR,
                        "dummy-client RPC: %s authenticates with a cluster token but this "
                        "mooncake_client has none; set the same PYMOONCAKE_CLUSTER_TOKEN here",
                        peer,
                    )
                    conn.sendall(no_token_reply())
                    return
            decoder.feed(data)
            while True:
                frame = decoder.next_frame()
                if isinstance(frame, DummyReply):
                    raise MalformedMessage("a dummy client sent a reply frame")
                if not isinstance(frame, DummyRequest):
                    break
                conn.sendall(self._dispatch(frame))

    def _dispatch(self, frame: DummyRequest) -> bytes:
        params = frame.params
        try:
            if type(params) is not dict:
                raise InvalidParams(f"{frame.method.value}: parameters must be a JSON object")
            if frame.method.value == "hello":
                version = params.get("version")
                if version != DUMMY_PROTOCOL_VERSION:
                    raise store_error(
                        int(ErrorCode.INVALID_VERSION),
                        f"the dummy client speaks {version!r}, this mooncake_client "
                        f"{DUMMY_PROTOCOL_VERSION!r}: run the same pymooncake version in both",
                    )
            value = HANDLERS[frame.method](self, params)
            return encode_dummy_reply(frame.id, 0, value)
        except MooncakeError as exc:
            return encode_dummy_reply(frame.id, error_code(exc), str(exc))
        except (KeyError, TypeError, ValueError) as exc:
            return encode_dummy_reply(
                frame.id,
                int(ErrorCode.INVALID_PARAMS),
                f"malformed {frame.method.value} request: {exc}",
            )
        except Exception as exc:  # a bug: answer it, keep serving
            log.exception("dummy-client RPC %s failed", frame.method.value)
            return encode_dummy_reply(
                frame.id, int(ErrorCode.INTERNAL_ERROR), f"{frame.method.value}: {exc!r}"
            )

    # ------------------------------------------------------------------------------
    # memory registration (UNIX socket)
    # ------------------------------------------------------------------------------

    def _ipc_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._ipc.accept()
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            with conn:
                self._register_one(conn)

    def _register_one(self, conn: socket.socket) -> None:
        conn.settimeout(5.0)
        pid = _peer_pid(conn)
        data = b""
        fds: list[int] = []
        try:
            while len(data) < SHM_REGISTER_SIZE:
                chunk, got, _flags, _addr = socket.recv_fds(conn, SHM_REGISTER_SIZE - len(data), 4)
                fds.extend(got)
                if not chunk:
                    break
                data += chunk
            status, message = 0, ""
            try:
                req = decode_shm_register(data)
                if len(fds) != 1:
                    raise InvalidParams(
                        f"a memory registration carries one memfd; this one carried {len(fds)}"
                    )
                self._map(req, fds[0], pid)
            except (MooncakeError, OSError) as exc:
                status = error_code(exc) if isinstance(exc, MooncakeError) else -1
                message = str(exc)
                self._bad(
                    f"ipc:{type(exc).__name__}",
                    logging.WARNING,
                    "dummy-client memory registration from pid %d refused: %s",
                    pid,
                    exc,
                )
            conn.sendall(encode_shm_result(status, message))
        except OSError as exc:
            self._bad("ipc-io", logging.WARNING, "dummy-client memory registration: %s", exc)
        finally:
            for fd in fds:
                os.close(fd)

    def _map(self, req: ShmRegister, fd: int, pid: int) -> None:
        with self._lock:
            live = self._live.get(req.client_id)
            if live is None or live.closed:
                raise store_error(
                    int(ErrorCode.CLIENT_NOT_FOUND),
                    f"memory registration by unknown dummy client {req.client_id}: a dummy "
                    "registers memory after its hello on the RPC port",
                )
            known = live.state.get(req.base)
        if known is not None:
            if known.size == req.size:
                return  # registered before (a re-registration that raced a ping)
            raise InvalidParams(
                f"dummy region {req.base:#x} is registered with {known.size} bytes, not {req.size}"
            )
        st = os.fstat(fd)
        if st.st_size < req.size:
            raise InvalidParams(
                f"the memfd holds {st.st_size} bytes, fewer than the {req.size} registered"
            )
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if not seals & fcntl.F_SEAL_SHRINK:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        except OSError as exc:
            raise InvalidParams(
                "the shared memory must be a memfd sealed against shrinking (memfd_create with "
                "MFD_ALLOW_SEALING, then F_SEAL_SHRINK): truncating it would crash this "
                f"mooncake_client ({exc.strerror})"
            ) from exc
        mm = mmap.mmap(fd, req.size, flags=mmap.MAP_SHARED)
        try:
            region = self.client.engine.register(mm, remote_accessible=False, publish=False)
        except BaseException:
            mm.close()
            raise
        mapping = _Mapping(mm, region)
        try:
            with self._lock:
                if live.closed:
                    raise self._unknown(req.client_id)
                live.state.add(MappedRegion(req.base, req.size, region.addr, req.local_buffer))
                live.mappings[req.base] = mapping
        except BaseException:
            self._unmap(mapping)
            raise
        log.info(
            "dummy client %s (pid %d): mapped its %s of %d bytes (%#x there, %#x here)",
            req.client_id,
            pid,
            "local buffer" if req.local_buffer else "buffer",
            req.size,
            req.base,
            region.addr,
        )

    def _unmap(self, mapping: _Mapping) -> None:
        try:
            self.client.engine.unregister(mapping.region.addr, publish=False)
        except MooncakeError as exc:
            log.debug("unregistering dummy memory %#x: %s", mapping.region.addr, exc)
        try:
            mapping.region.view.release()
        except (BufferError, ValueError):
            pass
        try:
            mapping.mm.close()
        except BufferError:
            pass  # a view still points into it: unmapped when that view goes

    # ------------------------------------------------------------------------------
    # liveness
    # ------------------------------------------------------------------------------

    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.config.monitor_interval_s):
            now = time.monotonic()
            with self._lock:
                expired = self._table.expired(now)
                for state in expired:
                    live = self._live.pop(state.client_id, None)
                    if live is not None:
                        live.closed = True
                        self._zombies.append(live)
            for state in expired:
                log.warning(
                    "dummy client %s (pid %d) sent no ping for %g s: unmapping its %d shared "
                    "region(s), %d bytes",
                    state.client_id,
                    state.pid,
                    self.config.ttl_s,
                    state.region_count,
                    state.mapped_bytes,
                )
            self._reap()

    def _reap(self) -> None:
        """Unmap the memory of closed/expired dummies whose calls have all returned."""
        with self._lock:
            ready = [z for z in self._zombies if not z.in_flight]
            self._zombies = [z for z in self._zombies if z.in_flight]
            mappings = [m for z in ready for m in z.mappings.values()]
            for z in ready:
                z.mappings.clear()
        for m in mappings:
            self._unmap(m)

    # ------------------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving: close every connection, wait for running calls, unmap
        every dummy's memory.  Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        for s in (self._listener, self._ipc):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        with self._lock:
            conns = list(self._conns.items())
        for sock, _ in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, t in conns:
            t.join(30)
        for t in self._threads:
            t.join(10)
        with self._lock:
            for live in self._live.values():
                live.closed = True
                self._zombies.append(live)
            self._live.clear()
        self._reap()

    def __enter__(self) -> DummyService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_client_id(client_id: str) -> None:
    try:
        if uuid.UUID(hex=client_id).hex != client_id:
            raise ValueError
    except ValueError:
        raise InvalidParams(f"client_id {client_id[:40]!r} is not 32 hex digits") from None
