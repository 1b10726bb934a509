"""How a target ends a connection after refusing a request, byte for byte.

A raw initiator sends a session header for an address outside the target's
registered buffer (plus the WRITE payload, in one segment) and then reads what
comes back: the v2 status frame, and how the connection ends -- orderly (FIN,
``recv`` returns ``b""``) or reset (RST).  The reference target never reads
the payload of a refused WRITE, so closing its socket resets the connection;
initiators rely on that: a reference v1 initiator that reuses a pooled
connection after a refused WRITE sees its next WRITE fail, while after an
orderly close that WRITE is reported done and silently lost.
"""

from __future__ import annotations

import socket
import time

import pytest
from interop_support import SESSION_HEADER, TARGET_BYTES, Pair

pytestmark = pytest.mark.interop

#: (label, opcode, payload bytes sent after the header)
REQUESTS = {
    "v1-write": (0x01, 20),
    "v2-write": (0x81, 20),
    "v1-read": (0x00, 0),
    "v2-read": (0x80, 0),
}


def _ending(port: int, addr: int, opcode: int, payload: int) -> list[str]:
    """Send one refused request; what the target sends back, then how it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(SESSION_HEADER.pack(max(payload, 20), addr, opcode) + b"\x5a" * payload)
        time.sleep(0.1)  # let the target refuse and close before looking
        out: list[str] = []
        for _ in range(3):
            try:
                data = sock.recv(64)
            except ConnectionResetError:
                out.append("RST")
                break
            if not data:
                out.append("FIN")
                break
            out.append(data.hex())
        return out


def _reference_port(pair: Pair) -> int:
    return pair.ours.segment(pair.ref_seg).data_port


def _our_port(pair: Pair) -> int:
    return int(pair.ours.local_descriptor()["tcp_data_port"])


@pytest.mark.parametrize("request_kind", list(REQUESTS))
def test_reference_target_ending(pair: Pair, request_kind: str) -> None:
    """What the reference does (documents the behaviour the next test expects)."""
    opcode, payload = REQUESTS[request_kind]
    got = _ending(_reference_port(pair), pair.ref_target + TARGET_BYTES - 10, opcode, payload)
    status = ["010000005654434d"] if opcode & 0x80 else []  # kStatusAddrRejected, LE
    assert got == [*status, "RST" if payload else "FIN"]


@pytest.mark.parametrize(
    "request_kind",
    ["v1-write", "v2-write", "v1-read", "v2-read"],
)
def test_our_target_ends_like_the_reference(pair: Pair, request_kind: str) -> None:
    opcode, payload = REQUESTS[request_kind]
    theirs = _ending(_reference_port(pair), pair.ref_target + TARGET_BYTES - 10, opcode, payload)
    ours = _ending(_our_port(pair), pair.our_target.addr + TARGET_BYTES - 10, opcode, payload)
    assert ours == theirs
