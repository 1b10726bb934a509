"""RpcLoop / StreamConn / RpcServer (the master's inline RPC connections) on real sockets."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pymooncake._busypoll import PollingSelector
from pymooncake._rpcloop import RpcLoop, RpcServer, StreamConn


class Echo(asyncio.BufferedProtocol):
    """Echoes what it reads; records its callbacks."""

    def __init__(self, reply: bool = True) -> None:
        self.buf = bytearray(4096)
        self.reply = reply
        self.got = bytearray()
        self.transport: Any = None
        self.events: list[str] = []
        self.lost: list[BaseException | None] = []
        self.lost_event = asyncio.Event()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.events.append("made")

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)

    def buffer_updated(self, nbytes: int) -> None:
        data = bytes(self.buf[:nbytes])
        self.got += data
        if data == b"boom":
            raise RuntimeError("a bug in the protocol")
        if self.reply:
            self.transport.write(data)

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append("lost")
        self.lost.append(exc)
        self.lost_event.set()


@pytest.fixture(params=["plain", "polling"])
def loop(request: pytest.FixtureRequest) -> Iterator[RpcLoop]:
    lp = RpcLoop(PollingSelector(100e-6) if request.param == "polling" else None)
    try:
        yield lp
    finally:
        lp.close()


def _pair(loop: RpcLoop, proto: Echo) -> tuple[StreamConn, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)
    return StreamConn(loop, ours, proto), theirs


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


async def _until(cond: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def test_echo_round_trips_and_eof_loses_the_connection(loop: RpcLoop) -> None:
    proto = Echo()

    async def main() -> None:
        conn, peer = _pair(loop, proto)
        assert proto.events == ["made"]
        assert conn.get_extra_info("socket") is not None
        sent = b""
        for i in range(50):
            msg = f"ping {i}".encode()
            peer.sendall(msg)
            sent += msg
            want = len(sent)
            await _until(lambda want=want: len(proto.got) >= want)  # type: ignore[misc]
        echoed = await asyncio.to_thread(_recv_exactly, peer, len(sent))
        assert echoed == sent == bytes(proto.got)
        peer.shutdown(socket.SHUT_WR)  # EOF: the default protocol closes
        await asyncio.wait_for(proto.lost_event.wait(), 5)
        assert proto.lost == [None] and conn.is_closing()
        assert await asyncio.to_thread(peer.recv, 10) == b""  # closed on our side too
        peer.close()

    loop.run_until_complete(main())


def test_write_queues_pauses_the_protocol_and_close_flushes_first(loop: RpcLoop) -> None:
    proto = Echo(reply=False)

    async def main() -> None:
        conn, peer = _pair(loop, proto)
        blob = bytes(range(256)) * 4096  # 1 MiB: more than the socket buffers take
        conn.write(blob)
        assert conn.get_write_buffer_size() > 64 * 1024
        assert proto.events == ["made", "pause"]
        conn.write(b"tail")
        conn.close()  # still sends everything queued, then the connection is lost
        assert conn.is_closing() and not proto.lost
        got = await asyncio.to_thread(_recv_exactly, peer, len(blob) + 4)
        assert got == blob + b"tail"
        await asyncio.wait_for(proto.lost_event.wait(), 5)
        assert proto.events == ["made", "pause", "resume", "lost"]
        assert conn.get_write_buffer_size() == 0
        assert await asyncio.to_thread(peer.recv, 10) == b""
        conn.write(b"after close")  # dropped, as asyncio does
        peer.close()

    loop.run_until_complete(main())


def test_abort_drops_what_is_queued(loop: RpcLoop) -> None:
    proto = Echo(reply=False)

    async def main() -> None:
        conn, peer = _pair(loop, proto)
        conn.write(b"x" * (4 << 20))
        conn.abort()
        assert not proto.lost  # connection_lost comes from the loop, not from abort()
        await asyncio.wait_for(proto.lost_event.wait(), 5)
        assert proto.lost == [None]
        received = await asyncio.to_thread(_recv_exactly, peer, 8 << 20)
        assert len(received) < 4 << 20  # the rest was never sent
        peer.close()

    loop.run_until_complete(main())


def test_pause_reading_stops_reads_until_resumed(loop: RpcLoop) -> None:
    proto = Echo(reply=False)

    async def main() -> None:
        conn, peer = _pair(loop, proto)
        conn.pause_reading()
        assert not conn.is_reading()
        peer.sendall(b"held")
        await asyncio.sleep(0.05)
        assert proto.got == b""
        conn.resume_reading()
        await _until(lambda: proto.got == b"held")
        conn.close()
        await asyncio.wait_for(proto.lost_event.wait(), 5)
        peer.close()

    loop.run_until_complete(main())


def test_a_reset_peer_loses_the_connection_with_the_error(loop: RpcLoop) -> None:
    proto = Echo(reply=False)

    async def main() -> None:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        StreamConn(loop, ours, proto)
        theirs.close()
        await asyncio.wait_for(proto.lost_event.wait(), 5)

    loop.run_until_complete(main())
    assert proto.events[-1] == "lost"


def test_a_protocol_bug_is_reported_and_drops_only_that_connection(
    loop: RpcLoop, caplog: pytest.LogCaptureFixture
) -> None:
    bad, good = Echo(), Echo()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda lp, ctx: reported.append(ctx))

    async def main() -> None:
        _, bad_peer = _pair(loop, bad)
        _, good_peer = _pair(loop, good)
        bad_peer.sendall(b"boom")
        await asyncio.wait_for(bad.lost_event.wait(), 5)
        good_peer.sendall(b"still here")
        assert await asyncio.to_thread(_recv_exactly, good_peer, 10) == b"still here"
        bad_peer.close()
        good_peer.close()

    loop.run_until_complete(main())
    assert len(reported) == 1
    assert isinstance(reported[0]["exception"], RuntimeError)
    assert "RPC connection" in reported[0]["message"]
    assert isinstance(bad.lost[0], RuntimeError)


def test_an_empty_read_buffer_is_a_protocol_bug(loop: RpcLoop) -> None:
    class NoRoom(Echo):
        def get_buffer(self, sizehint: int) -> memoryview:
            return memoryview(b"")

    proto = NoRoom()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda lp, ctx: reported.append(ctx))

    async def main() -> None:
        _, peer = _pair(loop, proto)
        try:
            peer.sendall(b"x")
            await asyncio.wait_for(proto.lost_event.wait(), 5)
        finally:
            peer.close()

    loop.run_until_complete(main())
    assert "empty buffer" in str(reported[0]["exception"])
    assert isinstance(proto.lost[0], RuntimeError)


def test_abort_inside_connection_made_never_reads(loop: RpcLoop) -> None:
    class Refuse(Echo):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            transport.abort()

    proto = Refuse()

    async def main() -> None:
        _, peer = _pair(loop, proto)
        try:
            peer.sendall(b"ignored")
            await asyncio.wait_for(proto.lost_event.wait(), 5)
            try:  # closed with the bytes unread: an EOF or a reset
                assert await asyncio.to_thread(peer.recv, 10) == b""
            except ConnectionResetError:
                pass
        finally:
            peer.close()

    loop.run_until_complete(main())
    assert proto.got == b"" and proto.events == ["made", "lost"]


def test_other_descriptors_and_timers_keep_asyncio_s_path(loop: RpcLoop) -> None:
    proto = Echo()

    async def main() -> None:
        a, b = socket.socketpair()
        a.setblocking(False)
        seen = asyncio.Event()
        loop.add_reader(a.fileno(), lambda: (a.recv(10), seen.set()))
        conn, peer = _pair(loop, proto)
        fired = asyncio.Event()
        loop.call_later(0.01, fired.set)
        b.sendall(b"x")
        peer.sendall(b"y")
        await asyncio.wait_for(asyncio.gather(seen.wait(), fired.wait()), 5)
        assert await asyncio.to_thread(_recv_exactly, peer, 1) == b"y"
        loop.remove_reader(a.fileno())
        conn.close()
        await asyncio.wait_for(proto.lost_event.wait(), 5)
        for s in (a, b, peer):
            s.close()

    loop.run_until_complete(main())


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_server_accepts_serves_and_stops_accepting_on_close(loop: RpcLoop, family: str) -> None:
    protos: list[Echo] = []

    def factory() -> Echo:
        protos.append(Echo())
        return protos[-1]

    if family == "tcp":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        address: Any = listener.getsockname()
        kind = socket.AF_INET
    else:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = f"\0pymooncake-test-rpcloop-{id(listener)}"
        listener.bind(address)
        kind = socket.AF_UNIX
    listener.listen(16)

    def client(payload: bytes) -> bytes:
        with socket.socket(kind, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(address)
            s.sendall(payload)
            return _recv_exactly(s, len(payload))

    async def main() -> None:
        server = RpcServer(loop, factory, listener, burst=4, what="test listener")
        assert server.sockets == (listener,)
        replies = await asyncio.gather(
            *(asyncio.to_thread(client, f"client {i}".encode()) for i in range(10))
        )
        assert replies == [f"client {i}".encode() for i in range(10)]
        await _until(lambda: all(p.lost for p in protos))
        server.close()
        await server.wait_closed()
        assert server.sockets == ()
        with pytest.raises(OSError), socket.socket(kind, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(address)

    loop.run_until_complete(main())
    assert len(protos) == 10 and all(p.events[0] == "made" for p in protos)
    if family == "tcp":
        assert all(isinstance(p.transport.get_extra_info("peername"), tuple) for p in protos)


def test_server_out_of_files_pauses_accepting_and_says_why(
    loop: RpcLoop, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    address = listener.getsockname()
    monkeypatch.setattr("pymooncake._rpcloop._ACCEPT_PAUSE_S", 0.05)
    protos: list[Echo] = []
    real_accept = listener.accept
    failures = [OSError(errno.EMFILE, "Too many open files")]

    class Listener:  # the listening socket, whose first accept() finds no file left
        def __getattr__(self, name: str) -> Any:
            return getattr(listener, name)

        def accept(self) -> Any:
            if failures:
                raise failures.pop()
            return real_accept()

    def client() -> bytes:
        with socket.create_connection(address, timeout=5) as s:
            s.sendall(b"hello")
            return _recv_exactly(s, 5)

    async def main() -> None:
        server = RpcServer(loop, lambda: protos.append(Echo()) or protos[-1], Listener())  # type: ignore[arg-type]
        assert await asyncio.to_thread(client) == b"hello"  # served after the pause
        server.close()

    with caplog.at_level(logging.ERROR, logger="pymooncake._rpcloop"):
        loop.run_until_complete(main())
    assert "cannot accept connections" in caplog.text and "ulimit -n" in caplog.text
    assert len(protos) == 1
