"""A reference (C++) Mooncake transfer engine driven over stdin/stdout.

Run by the *reference* virtual environment's interpreter (the wheel
``mooncake-transfer-engine-non-cuda``); it must never import pymooncake, and
pymooncake's interpreter must never import this package's ``mooncake``.

Protocol: one JSON object per line on stdin, ``{"id": N, "cmd": NAME, ...args}``;
one reply per command on stdout, ``@@REFPEER@@ {"id": N, "ok": true, "result": R}``
or ``... {"id": N, "ok": false, "error": TEXT}``.  The reference's own logging
goes to stderr; its stdout (file descriptor 1) is redirected to stderr at start
so that nothing but replies appears on the protocol stream.  Byte strings
travel as base64.  EOF on stdin or ``quit`` ends the process.

Memory: ``alloc`` maps ``size + 2 * pad`` bytes, fills the pads with the canary
byte ``0xA5`` and (optionally) registers only the middle ``size`` bytes, so
bounds violations are visible as changed canaries.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import mmap
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

MARKER = "@@REFPEER@@ "
CANARY = 0xA5

# Keep the protocol stream private before the extension module can print.
_proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
os.dup2(2, 1)
sys.stdout = sys.stderr

from mooncake.engine import (  # noqa: E402  (after the stdout redirection on purpose)
    TransferEngine,
    TransferNotify,
    TransferOpcode,
)

engine = TransferEngine()
#: mapping address -> (mmap, base address); keeps allocations alive
_maps: dict[int, tuple[mmap.mmap, int]] = {}


def _addr_of(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def _opcode(name: str) -> Any:
    return {"read": TransferOpcode.Read, "write": TransferOpcode.Write}[name.lower()]


def _notify(value: list[str] | None) -> Any:
    return None if value is None else TransferNotify(value[0], value[1])


def cmd_init(a: dict[str, Any]) -> Any:
    rc = engine.initialize(a["name"], a["metadata"], a.get("protocol", "tcp"), a.get("device", ""))
    return {"rc": rc, "rpc_port": engine.get_rpc_port() if rc == 0 else 0}


def cmd_alloc(a: dict[str, Any]) -> Any:
    size, pad = int(a["size"]), int(a.get("pad", 0))
    m = mmap.mmap(-1, size + 2 * pad)
    base = _addr_of(m)
    ctypes.memset(base, CANARY, pad)
    ctypes.memset(base + pad + size, CANARY, pad)
    addr = base + pad
    _maps[addr] = (m, base)
    rc = engine.register_memory(addr, size) if a.get("register", True) else 0
    return {"addr": addr, "rc": rc}


def cmd_canaries_intact(a: dict[str, Any]) -> Any:
    addr, size, pad = int(a["addr"]), int(a["size"]), int(a["pad"])
    base = _maps[addr][1]
    expected = bytes([CANARY]) * pad
    return ctypes.string_at(base, pad) == expected and (
        ctypes.string_at(base + pad + size, pad) == expected
    )


def cmd_write_bytes(a: dict[str, Any]) -> Any:
    data = base64.b64decode(a["data"])
    return engine.write_bytes_to_buffer(int(a["addr"]), data, len(data))


def cmd_read_bytes(a: dict[str, Any]) -> Any:
    data = engine.read_bytes_from_buffer(int(a["addr"]), int(a["length"]))
    return base64.b64encode(data).decode("ascii")


def cmd_digest(a: dict[str, Any]) -> Any:
    return hashlib.sha256(ctypes.string_at(int(a["addr"]), int(a["length"]))).hexdigest()


def cmd_transfer_sync(a: dict[str, Any]) -> Any:
    return engine.transfer_sync(
        a["segment"],
        int(a["local"]),
        int(a["remote"]),
        int(a["length"]),
        _opcode(a["opcode"]),
        _notify(a.get("notify")),
    )


def cmd_batch_transfer_sync(a: dict[str, Any]) -> Any:
    return engine.batch_transfer_sync(
        a["segment"],
        a["locals"],
        a["remotes"],
        a["lengths"],
        _opcode(a["opcode"]),
        _notify(a.get("notify")),
    )


def cmd_batch_transfer_async(a: dict[str, Any]) -> Any:
    return engine.batch_transfer_async(
        a["segment"], a["locals"], a["remotes"], a["lengths"], _opcode(a["opcode"])
    )


def _sync(method: str) -> Callable[[dict[str, Any]], Any]:
    def run(a: dict[str, Any]) -> Any:
        fn = getattr(engine, method)
        return fn(a["segment"], int(a["local"]), int(a["remote"]), int(a["length"]))

    return run


def _batch(method: str) -> Callable[[dict[str, Any]], Any]:
    def run(a: dict[str, Any]) -> Any:
        return getattr(engine, method)(a["segment"], a["locals"], a["remotes"], a["lengths"])

    return run


COMMANDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "init": cmd_init,
    "alloc": cmd_alloc,
    "alloc_managed": lambda a: engine.allocate_managed_buffer(int(a["size"])),
    "register": lambda a: engine.register_memory(int(a["addr"]), int(a["length"])),
    "unregister": lambda a: engine.unregister_memory(int(a["addr"])),
    "canaries_intact": cmd_canaries_intact,
    "write_bytes": cmd_write_bytes,
    "read_bytes": cmd_read_bytes,
    "digest": cmd_digest,
    "transfer_sync_write": _sync("transfer_sync_write"),
    "transfer_sync_read": _sync("transfer_sync_read"),
    "transfer_sync": cmd_transfer_sync,
    "batch_transfer_sync_write": _batch("batch_transfer_sync_write"),
    "batch_transfer_sync_read": _batch("batch_transfer_sync_read"),
    "batch_transfer_sync": cmd_batch_transfer_sync,
    "batch_transfer_async_write": _batch("batch_transfer_async_write"),
    "batch_transfer_async_read": _batch("batch_transfer_async_read"),
    "batch_transfer_async": cmd_batch_transfer_async,
    "get_batch_transfer_status": lambda a: engine.get_batch_transfer_status(a["batch_ids"]),
    "get_notifies": lambda a: [[n.name, n.msg] for n in engine.get_notifies()],
    "send_probe": lambda a: engine.send_probe(a["segment"]),
    "get_first_buffer_address": lambda a: engine.get_first_buffer_address(a["segment"]),
    "get_rpc_port": lambda a: engine.get_rpc_port(),
    "ping": lambda a: "pong",
}


def reply(obj: dict[str, Any]) -> None:
    _proto.write(MARKER + json.dumps(obj) + "\n")
    _proto.flush()


def main() -> int:
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
        except ValueError as exc:
            reply({"id": None, "ok": False, "error": f"bad JSON: {exc}"})
            continue
        ident, cmd = msg.get("id"), msg.get("cmd")
        if cmd == "quit":
            reply({"id": ident, "ok": True, "result": None})
            break
        handler = COMMANDS.get(cmd)
        if handler is None:
            reply({"id": ident, "ok": False, "error": f"unknown command {cmd!r}"})
            continue
        try:
            result = handler(msg)
        except Exception:
            reply({"id": ident, "ok": False, "error": traceback.format_exc()})
        else:
            reply({"id": ident, "ok": True, "result": result})
    _proto.flush()
    # Skip interpreter teardown: the engine's destructor may block on peers that are gone.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
