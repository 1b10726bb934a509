"""A dummy client in its own process, driven by ``test_dummy_clients.py``.

Reads one JSON command per stdin line and answers each with one stdout line
``REPLY <json>``; the dummy's log lines go to stdout too, prefixed ``LOG``,
so the test can read what a failed call said.  Commands (``op`` and its
arguments)::

    setup    addr pool local     -> setup_dummy's return code
    put      key hex             -> put's code (bytes API, staged)
    get      key                 -> the value as hex ("" when missing)
    put_pool key hex             -> put_from a registered alloc_from_mem_pool buffer
    get_pool key                 -> [get_into's result, the bytes as hex] (same buffer)
    exist    key                 -> is_exist
    size     key                 -> get_size
    remove   key force           -> remove's code
    health                       -> health_check()
    close                        -> close(); the script then exits

Exits 0 at EOF on stdin.
"""

from __future__ import annotations

import ctypes
import json
import logging
import sys
import threading
from typing import Any

from mooncake.store import MooncakeDistributedStore

POOL_BUFFER = 1 << 20


_OUT = threading.Lock()


def _say(kind: str, text: str) -> None:
    """One whole line on stdout: a reply and a log line from the dummy's own
    threads must never interleave (``print`` writes its pieces one by one)."""
    with _OUT:
        sys.stdout.write(f"{kind} {text}\n")
        sys.stdout.flush()


class _Lines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _say("LOG", self.format(record))


def main() -> int:
    handler = _Lines()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    store = MooncakeDistributedStore()
    pool = 0

    def buffer() -> int:
        nonlocal pool
        if not pool:
            pool = store.alloc_from_mem_pool(POOL_BUFFER)
            if not pool or store.register_buffer(pool, POOL_BUFFER) != 0:
                raise RuntimeError("no registered pool buffer")
        return pool

    for line in sys.stdin:
        cmd: dict[str, Any] = json.loads(line)
        op = cmd["op"]
        result: Any
        if op == "setup":
            result = store.setup_dummy(cmd["pool"], cmd["local"], cmd["addr"])
        elif op == "put":
            result = store.put(cmd["key"], bytes.fromhex(cmd["hex"]))
        elif op == "get":
            result = store.get(cmd["key"]).hex()
        elif op == "put_pool":
            data = bytes.fromhex(cmd["hex"])
            ptr = buffer()
            ctypes.memmove(ptr, data, len(data))
            result = store.put_from(cmd["key"], ptr, len(data))
        elif op == "get_pool":
            ptr = buffer()
            n = store.get_into(cmd["key"], ptr, POOL_BUFFER)
            result = [n, ctypes.string_at(ptr, max(n, 0)).hex()]
        elif op == "exist":
            result = store.is_exist(cmd["key"])
        elif op == "size":
            result = store.get_size(cmd["key"])
        elif op == "remove":
            result = store.remove(cmd["key"], cmd.get("force", False))
        elif op == "health":
            result = store.health_check()
        elif op == "close":
            result = store.close()
            _say("REPLY", json.dumps(result))
            return 0
        else:
            result = f"unknown op {op!r}"
        _say("REPLY", json.dumps(result))
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
