"""sendmsg_all and SocketReader against a real socket pair: every byte, in order."""

from __future__ import annotations

import os
import socket
import threading

from pymooncake.transfer.transports._sockio import SocketReader, sendmsg_all


def test_sendmsg_all_splits_big_buffers_and_resumes_partial_sends() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # force partial sends
        parts: list[bytes | bytearray | memoryview] = [
            os.urandom(7),
            memoryview(os.urandom(5 << 20)),
            b"",
            bytearray(os.urandom(3000)),
            *[os.urandom(100) for _ in range(1500)],  # more than IOV_MAX buffers
        ]
        expect = b"".join(bytes(p) for p in parts)
        got = bytearray()

        def drain() -> None:
            while len(got) < len(expect):
                chunk = b.recv(1 << 16)
                if not chunk:
                    return
                got.extend(chunk)

        t = threading.Thread(target=drain)
        t.start()
        assert sendmsg_all(a, list(parts)) == len(expect)
        t.join(30)
        assert bytes(got) == expect


def test_reader_flushes_only_when_it_would_wait() -> None:
    a, b = socket.socketpair()
    with a, b:
        flushes = []
        reader = SocketReader(b, before_block=lambda: flushes.append(1))
        a.sendall(b"x" * 100)
        off = reader.take(100)
        assert bytes(reader.buffer[off : off + 100]) == b"x" * 100
        assert flushes == []  # data was there: no flush
        threading.Timer(0.05, a.sendall, args=(b"yz",)).start()
        dst = bytearray(2)
        reader.readinto(memoryview(dst))
        assert dst == b"yz" and flushes == [1]
