"""Which TCP transport protocol version actually goes over the wire.

With an HTTP metadata server the tests can publish an alias of a segment whose
``tcp_data_port`` is a relay (:class:`HeaderTap`) in front of the real data
port; the relay records every 24-byte session header the initiator sends.  So
for each direction the opcode byte is checked: bit 7 set (v2) unless the
initiator forces v1 (MC_TCP_PROTO=1 / ``tcp_force_v1``) or the target's
descriptor says ``tcp_proto_version: 1``; low bits 1 for WRITE, 0 for READ.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest
from interop_support import (
    OPCODE_WRITE_BITS,
    V2_FLAG_BIT,
    HeaderTap,
    KiB,
    MetadataServerProc,
    Mode,
    Pair,
    assert_same,
    expect_our_bytes,
    expect_ref_bytes,
    unique_name,
)

pytestmark = pytest.mark.interop

MODES = [
    Mode("http-ours"),
    Mode("http-ours", ref_v1=True),
    Mode("http-ref", ours_v1=True),
    Mode("http-ref", ref_v1=True, ours_v1=True),
]
SIZES = [1, 64 * KiB + 5]


@pytest.fixture
def server(pair: Pair, metadata_servers: Callable[[str], MetadataServerProc]) -> MetadataServerProc:
    return metadata_servers("ours" if pair.mode.metadata == "http-ours" else "reference")


def _alias_through_tap(server: MetadataServerProc, segment: str) -> tuple[str, HeaderTap]:
    """Publish ``segment``'s descriptor under a new name whose data port is a tap."""
    status, body = server.get(f"mooncake/ram/{segment}")
    assert status == 200, body
    desc = json.loads(body)
    tap = HeaderTap((desc.get("tcp_data_host") or "127.0.0.1", desc["tcp_data_port"]))
    try:
        alias = unique_name()
        desc.update(tcp_data_host="127.0.0.1", tcp_data_port=tap.port)
        status, rpc_meta = server.get(f"mooncake/rpc_meta/{segment}")
        assert status == 200, rpc_meta
        assert server.put(f"mooncake/rpc_meta/{alias}", rpc_meta)[0] == 200
        assert server.put(f"mooncake/ram/{alias}", json.dumps(desc).encode())[0] == 200
    except BaseException:
        tap.close()
        raise
    return alias, tap


def _expected(v1: bool, sizes: list[int]) -> list[tuple[int, int]]:
    flag = 0 if v1 else V2_FLAG_BIT
    out = []
    for size in sizes:
        out += [(flag | OPCODE_WRITE_BITS, size), (flag, size)]
    return out


def test_our_initiator_headers(pair: Pair, server: MetadataServerProc) -> None:
    rng = random.Random(str(pair.mode))
    alias, tap = _alias_through_tap(server, pair.ref_seg)
    try:
        for size in SIZES:
            data = rng.randbytes(size)
            pair.ours.write(alias, data, pair.ref_target)
            expect_ref_bytes(pair, pair.ref_target, data, "reference target via the tap")
            sink = bytearray(size)
            pair.ours.read(alias, sink, pair.ref_target)
            assert_same(sink, data, "read via the tap")
    finally:
        tap.close()
    assert tap.headers == _expected(pair.mode.our_initiator_v1, SIZES)


def test_reference_initiator_headers(pair: Pair, server: MetadataServerProc) -> None:
    rng = random.Random(str(pair.mode))
    alias, tap = _alias_through_tap(server, pair.our_seg)
    try:
        for size in SIZES:
            data = rng.randbytes(size)
            pair.ref.write_bytes(pair.ref_local, data)
            args = {"segment": alias, "local": pair.ref_local, "length": size}
            assert pair.ref.call("transfer_sync_write", remote=pair.our_target.addr, **args) == 0
            expect_our_bytes(pair, pair.our_target.view[:size], data, "our target via the tap")
            pair.ref.write_bytes(pair.ref_local, bytes(size))
            assert pair.ref.call("transfer_sync_read", remote=pair.our_target.addr, **args) == 0
            assert_same(pair.ref.read_bytes(pair.ref_local, size), data, "reference read")
    finally:
        tap.close()
    assert tap.headers == _expected(pair.mode.ref_initiator_v1, SIZES)
