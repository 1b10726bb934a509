"""``transfer_engine_bench``: the reference's throughput benchmark, same flags.

Target mode registers ``--buffer_size`` bytes and serves until SIGINT/SIGTERM.
On a terminal both modes keep a status line on stderr (elapsed time, batches
and throughput; requests served), rewritten in place; piped, they print only
the reference's lines.
Initiator mode runs ``--threads`` workers for ``--duration`` seconds; each
repeatedly transfers a batch of ``--batch_size`` requests of ``--block_size``
bytes at offsets ``block * (i * threads + tid)`` of the target's first buffer,
then prints ``Test completed: duration D, batch count N, throughput X``.

Deviations from the reference, on purpose: the defaults point at this host
(``P2PHANDSHAKE``, ``tcp``) instead of the reference authors' lab addresses,
and a batch that does not fit the target's buffer is refused up front instead
of failing mid-run.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from .._net import first_non_loopback_ipv4
from ..config import EngineConfig
from ..errors import MooncakeError
from ..transfer import TransferEngine, TransferOpcode, TransferRequest
from ._gflags import Flag, FlagError, parse_flags, usage
from ._logsetup import setup_logging
from ._progress import Progress

__all__ = ["main"]

RATE_UNITS = {
    "GB": 1000**3,
    "GiB": 1 << 30,
    "Gb": 1000**3 / 8,
    "MB": 1000**2,
    "MiB": 1 << 20,
    "Mb": 1000**2 / 8,
    "KB": 1000,
    "KiB": 1 << 10,
    "Kb": 1000 / 8,
}

FLAGS = (
    Flag(
        "local_server_name", str, "", "local server name (default: this host's first LAN address)"
    ),
    Flag(
        "metadata_server",
        str,
        "P2PHANDSHAKE",
        "metadata server: P2PHANDSHAKE or http://host:port/metadata",
    ),
    Flag("mode", str, "initiator", "initiator or target"),
    Flag("operation", str, "read", "read or write"),
    Flag("protocol", str, "tcp", "transfer protocol (pymooncake: tcp)"),
    Flag("device_name", str, "", "RDMA device names (ignored: no RDMA)"),
    Flag("nic_priority_matrix", str, "", "NIC priority matrix file (ignored: no RDMA)"),
    Flag("segment_id", str, "", "target segment name (P2P: host:rpc_port printed by the target)"),
    Flag("buffer_size", int, 1 << 30, "total size of data buffer"),
    Flag("batch_size", int, 128, "batch size"),
    Flag("block_size", int, 65536, "block size for each transfer request"),
    Flag("duration", int, 10, "test duration in seconds"),
    Flag("threads", int, 12, "task submission threads"),
    Flag("auto_discovery", bool, False, "enable auto discovery (no effect)"),
    Flag("report_unit", str, "GB", "report unit: GB|GiB|Gb|MB|MiB|Mb|KB|KiB|Kb"),
    Flag("report_precision", int, 2, "report precision"),
    Flag("backend", str, "classic", "classic (tent is not available)"),
)


def format_rate(nbytes: float, seconds: float, unit: str, precision: int) -> str:
    if unit not in RATE_UNITS:
        print(
            f"Invalid flag: report_unit only support GB|GiB|Gb|MB|MiB|Mb|KB|KiB|Kb, not support "
            f"{unit} . Now use GB(default) as report_unit",
            file=sys.stderr,
        )
        unit = "GB"
    return f"{nbytes / seconds / RATE_UNITS[unit]:.{precision}f} {unit}/s"


def _target(engine: TransferEngine, flags: dict[str, Any]) -> int:
    # pre-fault so the first seconds of a run do not measure page faults
    region = engine.allocate(flags["buffer_size"], populate=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(
        f"Transfer Engine target ready: segment {engine.segment_name}, buffer "
        f"{region.addr:#x} ({flags['buffer_size']} bytes)",
        flush=True,
    )
    started = time.monotonic()
    with Progress() as progress:
        while not stop.wait(0.5):
            progress.update(
                f"serving {engine.segment_name} for {time.monotonic() - started:.0f} s: "
                f"{_served(engine)} requests served over TCP (Ctrl-C to stop)"
            )
    return 0


def _served(engine: TransferEngine) -> int:
    """Requests served over TCP as a target (same-host initiators copy directly)."""
    stats = getattr(engine.transport("tcp"), "stats", {})
    return int(stats.get("requests_served", 0))


def _initiator(engine: TransferEngine, flags: dict[str, Any]) -> int:
    op = flags["operation"]
    if op not in ("read", "write"):
        print("Unsupported operation: must be 'read' or 'write'", file=sys.stderr)
        return 1
    opcode = TransferOpcode.READ if op == "read" else TransferOpcode.WRITE
    threads, batch, block = flags["threads"], flags["batch_size"], flags["block_size"]
    if threads < 1 or batch < 1 or block < 1 or flags["duration"] < 0:
        print("threads, batch_size and block_size must be positive", file=sys.stderr)
        return 1
    need = batch * block * threads
    if not flags["segment_id"]:
        print("--segment_id is required in initiator mode (the target prints it)", file=sys.stderr)
        return 1
    peer = engine.segment(flags["segment_id"])
    if not peer.desc.buffers:
        print(f"segment {flags['segment_id']!r} has no registered buffer", file=sys.stderr)
        return 1
    remote = peer.desc.buffers[0]
    if need > remote.length:
        print(
            f"batch_size * block_size * threads = {need} bytes does not fit the target's "
            f"{remote.length}-byte buffer; lower one of them or raise the target's --buffer_size",
            file=sys.stderr,
        )
        return 1
    local = engine.allocate(need, populate=True)
    running = threading.Event()
    running.set()
    counts = [0] * threads
    errors: list[BaseException] = []

    def worker(tid: int) -> None:
        reqs = [
            TransferRequest(
                opcode,
                local.addr + block * (i * threads + tid),
                remote.addr + block * (i * threads + tid),
                block,
            )
            for i in range(batch)
        ]
        try:
            while running.is_set():
                engine.transfer(flags["segment_id"], reqs)
                counts[tid] += 1  # this thread's own slot: read live by the progress line
        except MooncakeError as exc:
            errors.append(exc)
            running.clear()

    workers = [
        threading.Thread(target=worker, args=(t,), name=f"bench-{t}") for t in range(threads)
    ]
    start = time.monotonic()
    for w in workers:
        w.start()
    deadline = start + flags["duration"]
    with Progress() as progress:
        while running.is_set() and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            elapsed = time.monotonic() - start
            done = sum(counts)
            rate = format_rate(done * batch * block, max(elapsed, 1e-9), flags["report_unit"], 2)
            progress.update(
                f"{elapsed:5.1f}/{flags['duration']} s  {done} batches  {rate}  ({op}, "
                f"{threads} threads)"
            )
    running.clear()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - start
    if errors:
        print(f"transfer failed: {errors[0]}", file=sys.stderr)
        return 1
    total = sum(counts)
    rate = format_rate(
        total * batch * block, elapsed, flags["report_unit"], flags["report_precision"]
    )
    print(
        f"Test completed: duration {elapsed:.2f}, batch count {total}, throughput {rate}",
        flush=True,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("--help", "-help", "-h", "--helpfull") for a in args):
        print(
            usage("transfer_engine_bench", "Mooncake transfer engine throughput benchmark", FLAGS)
        )
        return 0
    try:
        flags = parse_flags(FLAGS, args)
    except FlagError as exc:
        print(exc, file=sys.stderr)
        return 1
    setup_logging(flags["minloglevel"], flags["v"])
    if flags["mode"] not in ("initiator", "target"):
        print(f"Unsupported mode: {flags['mode']} (initiator or target)", file=sys.stderr)
        return 1
    if flags["backend"] != "classic":
        print("backend 'tent' is not available in pymooncake; use classic", file=sys.stderr)
        return 1
    name = flags["local_server_name"] or first_non_loopback_ipv4() or "127.0.0.1"
    try:
        config = EngineConfig.from_env()
        with TransferEngine(name, flags["metadata_server"], config=config) as engine:
            if flags["mode"] == "target":
                return _target(engine, flags)
            return _initiator(engine, flags)
    except MooncakeError as exc:
        print(f"transfer_engine_bench: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
