"""Target peer for ``test_engine_compat.py``: a ``mooncake.engine`` engine in its own process.

In the spirit of the reference's ``mooncake-wheel/tests/transfer_engine_target.py``:
initialize, make sure the segment has a buffer (falling back to a managed
buffer), announce readiness, serve.

Usage::

    python te_target_script.py LOCAL_HOSTNAME METADATA_SERVER

Prints exactly one stdout line, ``READY <segment name> <buffer address>``, or
``FAILED <what> <code>``.  Serves until stdin reaches EOF (the test closes the
pipe, or dies), then closes the engine and exits 0.
"""

from __future__ import annotations

import sys

from mooncake.engine import TransferEngine

#: as the reference target's DEFAULT_BUFFER_CAPACITY
BUFFER_BYTES = 64 * 1024 * 1024


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} LOCAL_HOSTNAME METADATA_SERVER", file=sys.stderr)
        return 2
    local_hostname, metadata_server = argv[1], argv[2]
    engine = TransferEngine()
    rc = engine.initialize(local_hostname, metadata_server, "tcp", "")
    if rc != 0:
        print(f"FAILED initialize {rc}", flush=True)
        return 1
    try:
        if metadata_server == "P2PHANDSHAKE":
            segment = f"{local_hostname.split(':')[0]}:{engine.get_rpc_port()}"
        else:
            segment = local_hostname
        addr = engine.get_first_buffer_address(segment)
        if addr == 0:
            addr = engine.allocate_managed_buffer(BUFFER_BYTES)
            if addr == 0:
                print("FAILED allocate_managed_buffer 0", flush=True)
                return 1
        print(f"READY {segment} {addr}", flush=True)
        sys.stdin.buffer.read()  # until the test closes our stdin
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
