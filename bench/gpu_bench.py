#!/usr/bin/env python3
"""GPU memory through the engine, as a fraction of what the hardware does.

One command; prints a markdown table and writes ``bench/results/gpu_bench-*.json``.

Rows:

* ``raw``: the device backend alone -- pinned H2D / D2H (a stream copy from/to
  a ``host_register``-ed memfd buffer) and a device-to-device copy.  These are
  this machine's limits, next to the anchor figures of an H200 host
  (``shared/reference/anchor-bench.md``: pinned 55 GB/s, CUDA IPC 2,055 GB/s).
* ``tcp``: two engines in this process, TCP over 127.0.0.1 (same-host transport
  off): host -> remote device (the target stages H2D), remote device -> host
  (D2H), device -> device (staged on both ends).
* ``same-host``: this process and a peer process (``--role peer``) on the same
  host: device -> device through CUDA IPC (one device copy), both directions,
  and host -> device.

With a real GPU (cuda-python, ``PYMOONCAKE_DEVICE=cuda`` or auto) the numbers are
measurements.  Without one the fake device runs the same code paths on host
memory; the table then says that no GPU was measured and gives no fractions.

Usage: ``python bench/gpu_bench.py [--size 256M] [--repeat 3] [--device auto|cuda|fake]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    HOST,
    MiB,
    log,
    machine_info,
    markdown_table,
    parse_size,
    publish,
    size_label,
)

from pymooncake import EngineConfig, TransferEngine
from pymooncake.errors import DeviceUnavailable
from pymooncake.transfer.device import DeviceBackend, get_backend

#: anchor limits, GB/s (one NVIDIA H200; shared/reference/anchor-bench.md)
ANCHOR_PINNED = 55.3
ANCHOR_IPC = 2055.0
GB = 1e9


def pick_backend(mode: str) -> DeviceBackend:
    if mode in ("auto", "cuda"):
        try:
            return get_backend("cuda")
        except DeviceUnavailable as exc:
            if mode == "cuda":
                raise
            log(f"no CUDA ({exc}); running on the fake device: nothing is measured")
    return get_backend("fake")


def best_rate(nbytes: int, repeat: int, fn: Callable[[], None]) -> float:
    """Best of ``repeat`` timed runs (after one warm-up), in GB/s."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / GB


def engine_config(backend: DeviceBackend, same_host: bool) -> EngineConfig:
    return EngineConfig(
        tcp_bind_address=HOST,
        transfer_timeout_s=120.0,
        tcp_status_timeout_s=120.0,
        device_backend=backend.name,
        same_host_transport=same_host,
    )


# ---------------------------------------------------------------- raw limits


def raw_rows(b: DeviceBackend, size: int, repeat: int) -> list[dict[str, Any]]:
    from pymooncake.transfer._memory import allocate_shared

    dev = b.alloc(size, 0)
    dev2 = b.alloc(size, 0)
    mm, view, addr, fd = allocate_shared(size, populate=True, name="gpu-bench-pinned")
    b.host_register(addr, size)
    stream = b.stream(0)
    rows = []
    try:

        def h2d() -> None:
            stream.copy_async(dev, addr, size)
            stream.synchronize()

        def d2h() -> None:
            stream.copy_async(addr, dev, size)
            stream.synchronize()

        rows.append(
            row("raw", "pinned H2D (stream copy)", best_rate(size, repeat, h2d), ANCHOR_PINNED)
        )
        rows.append(
            row("raw", "pinned D2H (stream copy)", best_rate(size, repeat, d2h), ANCHOR_PINNED)
        )
        rows.append(
            row("raw", "D2D copy", best_rate(size, repeat, lambda: b.copy(dev2, dev, size)), 2066.0)
        )
    finally:
        stream.close()
        b.host_unregister(addr)
        view.release()
        mm.close()
        os.close(fd)
        b.free(dev)
        b.free(dev2)
    return rows


def row(
    group: str, what: str, gbps: float, anchor: float, raw: float | None = None
) -> dict[str, Any]:
    return {"group": group, "what": what, "gbps": gbps, "anchor_gbps": anchor, "raw_gbps": raw}


# ---------------------------------------------------------------- through the engine


def tcp_rows(
    b: DeviceBackend, size: int, repeat: int, raw: dict[str, float]
) -> list[dict[str, Any]]:
    cfg = engine_config(b, same_host=False)
    a = TransferEngine(HOST, "P2PHANDSHAKE", config=cfg)
    t = TransferEngine(HOST, "P2PHANDSHAKE", config=cfg)
    dev_local = b.alloc(size, 0)
    dev_remote = b.alloc(size, 0)
    try:
        host = a.allocate(size, populate=True)
        t.register(dev_remote, size)
        seg = t.segment_name
        rows = [
            row(
                "tcp",
                "host -> remote device (target stages H2D)",
                best_rate(size, repeat, lambda: a.write(seg, host.addr, dev_remote, size)),
                ANCHOR_PINNED,
                raw.get("h2d"),
            ),
            row(
                "tcp",
                "remote device -> host (target stages D2H)",
                best_rate(size, repeat, lambda: a.read(seg, host.addr, dev_remote, size)),
                ANCHOR_PINNED,
                raw.get("d2h"),
            ),
            row(
                "tcp",
                "device -> remote device (staged both ends)",
                best_rate(size, repeat, lambda: a.write(seg, dev_local, dev_remote, size)),
                ANCHOR_PINNED,
                raw.get("h2d"),
            ),
        ]
    finally:
        a.close()
        t.close()
        b.free(dev_local)
        b.free(dev_remote)
    return rows


def peer_main(size: int) -> int:
    """``--role peer``: a target engine with ``size`` bytes of device memory."""
    cfg = EngineConfig.from_env().replace(tcp_bind_address=HOST, same_host_transport=True)
    b = get_backend(cfg.device_backend)
    eng = TransferEngine(HOST, "P2PHANDSHAKE", config=cfg)
    dev = b.alloc(size, 0)
    eng.register(dev, size)
    print(json.dumps({"segment": eng.segment_name, "addr": dev}), flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    eng.close()
    b.free(dev)
    return 0


def samehost_rows(
    b: DeviceBackend, size: int, repeat: int, raw: dict[str, float]
) -> list[dict[str, Any]]:
    env = {**os.environ, "PYMOONCAKE_DEVICE": b.name}
    env.pop("PYMOONCAKE_FAKE_GPU", None)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--role", "peer", "--size", str(size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    eng = TransferEngine(HOST, "P2PHANDSHAKE", config=engine_config(b, same_host=True))
    dev = b.alloc(size, 0)
    try:
        info = json.loads(proc.stdout.readline())
        seg, remote = info["segment"], int(info["addr"])
        host = eng.allocate(size, populate=True)
        rows = [
            row(
                "same-host",
                "device -> peer device (CUDA IPC write)",
                best_rate(size, repeat, lambda: eng.write(seg, dev, remote, size)),
                ANCHOR_IPC,
                raw.get("d2d"),
            ),
            row(
                "same-host",
                "peer device -> device (CUDA IPC read)",
                best_rate(size, repeat, lambda: eng.read(seg, dev, remote, size)),
                ANCHOR_IPC,
                raw.get("d2d"),
            ),
            row(
                "same-host",
                "host -> peer device (IPC, pageable H2D)",
                best_rate(size, repeat, lambda: eng.write(seg, host.addr, remote, size)),
                ANCHOR_PINNED,
                raw.get("h2d"),
            ),
        ]
        shm = eng.transport("shm").stats  # type: ignore[attr-defined]
        if shm["slices_device"] == 0:
            log(f"warning: the same-host rows did not use IPC ({shm}); the peer fell back to TCP")
    finally:
        eng.close()
        b.free(dev)
        proc.stdin.close()
        proc.wait(30)
        proc.stdout.close()
    return rows


# ---------------------------------------------------------------- report


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--size", default=None, help="bytes per transfer (default 256M on a GPU, 32M fake)"
    )
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default=os.environ.get("PYMOONCAKE_DEVICE", "auto"))
    p.add_argument("--role", default="main", choices=["main", "peer"])
    args = p.parse_args()
    if args.role == "peer":
        return peer_main(parse_size(args.size))
    t0 = time.monotonic()
    data: dict[str, Any] = {"machine": machine_info()}
    b = pick_backend(args.device)
    size = parse_size(args.size) if args.size else (256 * MiB if b.real else 32 * MiB)
    data.update(backend=b.name, real_gpu=b.real, device=b.describe(), size=size, repeat=args.repeat)
    log(f"{b.describe()}; {size_label(size)} per transfer, best of {args.repeat}")
    rows = raw_rows(b, size, args.repeat)
    raw = {"h2d": rows[0]["gbps"], "d2h": rows[1]["gbps"], "d2d": rows[2]["gbps"]}
    log("raw limits measured; TCP staging ...")
    rows += tcp_rows(b, size, args.repeat, raw)
    log("same-host (peer process) ...")
    rows += samehost_rows(b, size, args.repeat, raw)
    data["rows"] = rows
    data["wall_s"] = time.monotonic() - t0
    data["machine"]["loadavg_end"] = os.getloadavg()

    def frac(value: float, limit: float | None) -> str:
        if not b.real or not limit:
            return "n/a"
        return f"{100 * value / limit:.0f}%"

    table = markdown_table(
        ["group", "transfer", "GB/s", "% of anchor limit", "% of this machine's raw"],
        [
            [
                r["group"],
                r["what"],
                f"{r['gbps']:.2f}",
                frac(r["gbps"], r["anchor_gbps"]),
                frac(r["gbps"], r["raw_gbps"]),
            ]
            for r in rows
        ],
    )
    head = f"GPU bench: {b.describe()}, {size_label(size)} per transfer, best of {args.repeat}"
    if not b.real:
        head += (
            "\n\n**No real GPU was measured**: the fake device ran every code path on host memory; "
            "its rates say nothing about a GPU."
        )
    m = data["machine"]
    text = f"{head}\n\n{table}\n\nMachine: {m.get('cpu', '?')}, nproc {m['nproc']}; wall {data['wall_s']:.0f} s"
    publish("gpu_bench", data, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
