"""Loop bench: the master's asyncio event loop against a plain selector loop.

Issue 8 asks whether the master's RPC loop pays more than it must per request:
"profile asyncio vs a plain selector loop; keep whichever is faster, measured".
This bench serves the same requests four ways, in a child process, and measures
round trips from a client process:

* ``asyncio``: an ``asyncio`` ``BufferedProtocol`` per connection on a
  ``SelectorEventLoop`` whose selector is the master's ``PollingSelector`` (what
  ``mooncake_master`` ran until the twenty-second session);
* ``rpcloop``: what ``mooncake_master`` runs -- the same protocol served by
  ``pymooncake._rpcloop`` (``RpcLoop``: connections read and answered straight
  from the selector's result, ``StreamConn`` as their transport);
* ``add_reader``: the same loop, sockets served by ``loop.add_reader`` callbacks
  (no transports or protocols);
* ``selector``: no asyncio at all -- ``PollingSelector.select()`` in a ``while``
  loop, ``recv_into`` and ``send`` on the sockets.

Every variant does the master's own per-request work: decode the frame
(``MasterFrameDecoder``), validate the request (``decode_request``), run the real
handler against a ``MasterState`` holding ``--objects`` objects, encode the reply.
The client sends ``ExistKey`` (hits) back to back over a UNIX socket and waits for
each reply polling for 100 us first, as ``MasterClient`` does.  Reported: round
trip p50/p99 and the server's CPU time per request.  Polling is on in every
variant (``--poll-us``, 200 by default as the master), or off with 0.

Usage::

    python bench/loop_bench.py                # 3 runs x 20,000 calls per variant
    python bench/loop_bench.py --poll-us 0    # every side sleeps between requests
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as C

VARIANTS = ("asyncio", "rpcloop", "add_reader", "selector")


# ================================================================= server role


def _master_work(objects: int) -> Callable[[bytes | bytearray], bytes]:
    """feed(data) -> reply bytes: the master's per-request work on a real state."""
    from pymooncake.store._config import MasterConfig
    from pymooncake.store._types import ReplicateConfig, SegmentInfo
    from pymooncake.store.master._handlers import build_handlers
    from pymooncake.store.master._state import MasterState
    from pymooncake.wire import _master_msgs as msg
    from pymooncake.wire._master import MasterFrameDecoder, MasterRequest, encode_reply

    st = MasterState(MasterConfig(), rng=random.Random(1))
    st.mount_segment("c", SegmentInfo("s", "h:1", 1 << 32, 1 << 40, "h"), 0.0)
    keys = [f"key-{i}" for i in range(objects)]
    cfg = ReplicateConfig()
    for i in range(0, objects, 1000):
        chunk = keys[i : i + 1000]
        st.put_start_many("c", chunk, [64] * len(chunk), cfg, 0.0)
        st.put_end_many("c", chunk, 0.0)
    handlers = build_handlers(st)
    decoder = MasterFrameDecoder()

    def feed(data: bytes | bytearray) -> bytes:
        decoder.feed(data)
        out = []
        while True:
            frame = decoder.next_frame()
            if not isinstance(frame, MasterRequest):
                break
            req = msg.decode_request(frame.method, frame.params, escapes=frame.escapes)
            value = handlers[type(req)](req, time.monotonic()).to_wire()
            out.append(encode_reply(frame.id, 0, value))
        return b"".join(out)

    return feed


def serve(variant: str, path: str, objects: int, poll_s: float) -> None:
    from pymooncake._busypoll import PollingSelector

    feed = _master_work(objects)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    listener.setblocking(False)
    print("ready", flush=True)
    buf = bytearray(1 << 16)
    view = memoryview(buf)

    def answer(conn: socket.socket, closed: Callable[[socket.socket], None]) -> None:
        """Read what ``conn`` sent and answer it (``closed(conn)`` at EOF)."""
        n = conn.recv_into(buf)
        if not n:
            closed(conn)
            conn.close()
            return
        reply = feed(view[:n])
        if reply:
            conn.send(reply)

    def selector() -> selectors.BaseSelector:
        return PollingSelector(poll_s) if poll_s > 0 else selectors.DefaultSelector()

    if variant == "selector":
        sel = selector()
        sel.register(listener, selectors.EVENT_READ, None)
        while True:
            for key, _ in sel.select():
                if key.data is None:
                    conn, _ = listener.accept()
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, conn)
                    continue
                answer(key.data, sel.unregister)

    class Proto(asyncio.BufferedProtocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def get_buffer(self, sizehint: int) -> memoryview:
            return view

        def buffer_updated(self, nbytes: int) -> None:
            reply = feed(view[:nbytes])
            if reply:
                self.transport.write(reply)

    if variant == "rpcloop":
        from pymooncake._rpcloop import RpcLoop, RpcServer

        rpc_loop = RpcLoop(selector())
        asyncio.set_event_loop(rpc_loop)
        RpcServer(rpc_loop, Proto, listener)
        rpc_loop.run_forever()
        return

    loop = asyncio.SelectorEventLoop(selector())
    asyncio.set_event_loop(loop)

    if variant == "asyncio":

        async def main() -> None:
            server = await loop.create_unix_server(Proto, sock=listener)
            await server.serve_forever()

        loop.run_until_complete(main())
        return

    def accept() -> None:
        conn, _ = listener.accept()
        conn.setblocking(False)
        loop.add_reader(conn, answer, conn, loop.remove_reader)

    loop.add_reader(listener, accept)
    loop.run_forever()


# ================================================================= client role


def rounds(path: str, calls: int, objects: int, spin_s: float) -> dict[str, Any]:
    from pymooncake.wire import _master_msgs as msg
    from pymooncake.wire._master import MasterFrameDecoder, MasterReply, encode_request

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    decoder = MasterFrameDecoder()
    rng = random.Random(5)
    frames = [
        encode_request(i + 1, msg.ExistKey(f"key-{rng.randrange(objects)}")) for i in range(calls)
    ]
    lat: list[int] = []
    clock = time.perf_counter_ns
    for frame in frames:
        t0 = clock()
        sock.sendall(frame)
        deadline = time.monotonic() + spin_s
        sock.setblocking(False)
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                if time.monotonic() < deadline:
                    continue
                sock.setblocking(True)
                data = sock.recv(1 << 16)
                sock.setblocking(False)
            decoder.feed(data)
            reply = decoder.next_frame()
            if isinstance(reply, MasterReply):
                break
        lat.append(clock() - t0)
        if reply.code != 0 or reply.value is not True:
            raise RuntimeError(f"ExistKey answered {reply.code} {reply.value!r}")
    sock.close()
    lat.sort()
    return {
        "p50_us": C.percentile(lat, 50) / 1e3,
        "p99_us": C.percentile(lat, 99) / 1e3,
    }


# ================================================================= driver


def run_variant(variant: str, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    path = str(tmp / f"loop-{variant}-{os.getpid()}.sock")
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            variant,
            "--path",
            path,
            "--objects",
            str(a.objects),
            "--poll-us",
            str(a.poll_us),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{variant} server did not start")
        rounds(path, 2000, a.objects, a.poll_us / 1e6)  # warm-up
        cpu0 = _child_cpu(child.pid)
        t0 = time.perf_counter()
        res = rounds(path, a.calls, a.objects, a.poll_us / 1e6)
        wall = time.perf_counter() - t0
        res["server_cpu_us_per_call"] = (_child_cpu(child.pid) - cpu0) / a.calls * 1e6
        res["calls_s"] = a.calls / wall
        return res
    finally:
        child.kill()
        child.wait()
        Path(path).unlink(missing_ok=True)


def _child_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--calls", type=int, default=20_000)
    p.add_argument("--objects", type=int, default=100_000)
    p.add_argument("--poll-us", type=int, default=200, help="server poll and client spin (us)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve:
        serve(a.serve, a.path, a.objects, a.poll_us / 1e6)
        return
    variants = C.parse_list(a.variants, VARIANTS)
    data: dict[str, Any] = {"args": vars(a), "machine": C.machine_info(), "results": {}}
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="loop-bench-") as tmp:
        for r in range(a.runs):
            for v in variants if r % 2 == 0 else variants[::-1]:
                results[v].append(run_variant(v, a, Path(tmp)))
                C.log(f"run {r + 1} {v}: {results[v][-1]}")
    data["results"] = results
    data["machine"]["loadavg_end"] = os.getloadavg()
    data["wall_s"] = time.time() - t0
    cells = (("p50_us", "{:.1f}"), ("p99_us", "{:.1f}"), ("server_cpu_us_per_call", "{:.1f}"),
             ("calls_s", "{:.0f}"))  # fmt: skip
    rows = [
        [v, *(C.cell(C.summary([r[c] for r in results[v]]), fmt) for c, fmt in cells)]
        for v in variants
    ]
    text = "\n".join(
        [
            f"### Master loop: ExistKey round trips over a UNIX socket, {a.objects:,} objects, "
            f"poll {a.poll_us} us; median (min-max) of {a.runs} run(s) of {a.calls:,} calls",
            "",
            C.markdown_table(("loop", "p50 us", "p99 us", "server CPU us/call", "calls/s"), rows),
            "",
            C.machine_line(data),
        ]
    )
    C.publish("loop_bench", data, text)


if __name__ == "__main__":
    main()
