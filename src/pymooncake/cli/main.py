"""``pymooncake``: the project's own command (demo, doctor, version).

``pymooncake demo`` starts a target engine in a child process and an
initiator here, both on 127.0.0.1 in P2P handshake mode, moves data both ways
at several block sizes, checks the bytes, and prints throughput.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection

from .. import __version__
from ..config import EngineConfig
from ..errors import MooncakeError
from ..transfer import TransferEngine, TransferRequest
from ._logsetup import setup_logging

__all__ = ["main"]

_MiB = 1 << 20


def _target_main(conn: Connection, buffer_bytes: int) -> None:
    setup_logging(2)
    with TransferEngine("127.0.0.1", "P2PHANDSHAKE", config=EngineConfig.from_env()) as engine:
        region = engine.allocate(buffer_bytes, populate=True)
        conn.send((engine.segment_name, region.addr))
        conn.recv()  # wait for "stop"


def _human(n: int) -> str:
    for unit, size in (("MiB", _MiB), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def _demo(args: argparse.Namespace) -> int:
    blocks = [int(b) for b in args.blocks.split(",")]
    batch = args.batch
    need = max(blocks) * batch
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_target_main, args=(child, need), daemon=True)
    proc.start()
    try:
        if not parent.poll(30):
            print("target engine did not start within 30 s", file=sys.stderr)
            return 1
        segment, remote = parent.recv()
        print(f"target engine: segment {segment} (pid {proc.pid}), {_human(need)} registered")
        with TransferEngine("127.0.0.1", "P2PHANDSHAKE", config=EngineConfig.from_env()) as engine:
            local = engine.allocate(need, populate=True)
            print(f"initiator engine: segment {engine.segment_name}")
            print()
            print(f"| {'op':5} | {'block':>8} | {'batch':>5} | {'GB/s':>6} | {'check':5} |")
            print(f"|{'-' * 7}|{'-' * 10}|{'-' * 7}|{'-' * 8}|{'-' * 7}|")
            for block in blocks:
                pattern = os.urandom(block * batch)
                local.view[: len(pattern)] = pattern
                for op in ("write", "read"):
                    if op == "read":
                        local.view[: len(pattern)] = bytes(len(pattern))
                    maker = TransferRequest.write if op == "write" else TransferRequest.read
                    reqs = [
                        maker(local.addr + i * block, remote + i * block, block)
                        for i in range(batch)
                    ]
                    n = 0
                    start = time.perf_counter()
                    while True:
                        engine.transfer(segment, reqs)
                        n += 1
                        elapsed = time.perf_counter() - start
                        if elapsed >= args.seconds:
                            break
                    ok = bytes(local.view[: len(pattern)]) == pattern
                    gbps = n * batch * block / elapsed / 1e9
                    check = "ok" if ok else "BAD"
                    print(f"| {op:5} | {_human(block):>8} | {batch:>5} | {gbps:6.2f} | {check:5} |")
                    if not ok:
                        return 1
        return 0
    except MooncakeError as exc:
        print(f"pymooncake demo: {exc}", file=sys.stderr)
        return 1
    finally:
        try:
            parent.send("stop")
        except OSError:
            pass
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _version(args: argparse.Namespace) -> int:
    print(f"pymooncake {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pymooncake", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pymooncake {__version__}")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="local transfer demo: target + initiator on 127.0.0.1")
    demo.add_argument(
        "--blocks", default="4096,65536,1048576,16777216", help="block sizes, comma-separated"
    )
    demo.add_argument("--batch", type=int, default=16, help="requests per transfer call")
    demo.add_argument("--seconds", type=float, default=1.0, help="time per case")
    demo.set_defaults(func=_demo)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        args = parser.parse_args(["demo", *(argv or [])])
    setup_logging(2)  # the demo runs on loopback on purpose: no loopback warnings
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
