"""A peer engine with device memory, in its own process, driven over stdin/stdout.

Started by ``tests/gpu`` (``spawn_device_peer``): the backend comes from
PYMOONCAKE_DEVICE (fake or cuda), the same-host transport from
PYMOONCAKE_SAME_HOST.  It registers three buffers -- device memory on cuda:0,
device memory on the last device, and a managed host buffer -- and answers one
JSON command per line::

    {"cmd": "info"}                                    -> segment, pid, addresses
    {"cmd": "fill", "which": w, "seed": s}              -> fills the buffer with a pattern
    {"cmd": "digest", "which": w, "offset": o, "length": n} -> sha256 of those bytes
    {"cmd": "stats"}                                    -> transport/backend counters
    {"cmd": "unregister", "which": w}                   -> unregisters that buffer
    {"cmd": "quit"}
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import sys
from typing import Any

BUFFER_BYTES = 3 << 20


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def main() -> int:
    from pymooncake import EngineConfig, TransferEngine
    from pymooncake.transfer.device import get_backend

    config = EngineConfig.from_env().replace(tcp_bind_address="127.0.0.1")
    if os.environ.get("PYMOONCAKE_TEST_CUDA_EMULATOR") == "1":
        # the CUDA backend over an emulated driver (tests/gpu/cuda_emulator.py)
        from cuda_emulator import EmulatedDriver

        from pymooncake.transfer.device import _select
        from pymooncake.transfer.device.cuda import CudaDevice

        _select._instances["cuda"] = CudaDevice(EmulatedDriver(get_backend("fake")))  # type: ignore[arg-type]
    engine = TransferEngine("127.0.0.1", "P2PHANDSHAKE", config=config)
    backend = get_backend(config.device_backend)
    last = backend.device_count() - 1
    dev0 = backend.alloc(BUFFER_BYTES, 0)
    devn = backend.alloc(BUFFER_BYTES, last)
    managed = engine.allocate(BUFFER_BYTES)
    engine.register(dev0, BUFFER_BYTES)
    engine.register(devn, BUFFER_BYTES, location=f"cuda:{last}")
    addrs = {"dev0": dev0, "devn": devn, "host": managed.addr}
    scratch = bytearray(BUFFER_BYTES)
    scratch_addr = ctypes.addressof((ctypes.c_char * BUFFER_BYTES).from_buffer(scratch))
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        reply: dict[str, Any] = {"ok": True}
        if cmd == "info":
            reply.update(
                segment=engine.segment_name,
                pid=os.getpid(),
                size=BUFFER_BYTES,
                last_device=last,
                **addrs,
            )
        elif cmd == "fill":
            scratch[:] = pattern(req["seed"], BUFFER_BYTES)
            backend.copy(addrs[req["which"]], scratch_addr, BUFFER_BYTES)
        elif cmd == "digest":
            o, n = req["offset"], req["length"]
            backend.copy(scratch_addr, addrs[req["which"]] + o, n)
            reply["sha256"] = hashlib.sha256(scratch[:n]).hexdigest()
        elif cmd == "stats":
            reply["tcp"] = engine.transport("tcp").stats  # type: ignore[attr-defined]
            reply["backend"] = dict(getattr(backend, "stats", {}))
        elif cmd == "unregister":
            engine.unregister(addrs[req["which"]])
        elif cmd == "quit":
            break
        out.write(json.dumps(reply) + "\n")
        out.flush()
    engine.close()
    backend.free(dev0)
    backend.free(devn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
