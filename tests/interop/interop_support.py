"""Helpers for the interop tests: memory with canaries, the modes a pair of
engines runs in, the pymooncake/reference :class:`Pair`, and byte checks.

The processes live in :mod:`interop_procs`, the header relay in
:mod:`interop_tap`; their public names are re-exported here.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import mmap
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from interop_procs import (
    CANARY,
    MARKER,
    REF_PACKAGE,
    REF_PACKAGE_VERSION,
    REPO_ROOT,
    KiB,
    MetadataServerProc,
    MiB,
    RefPeer,
    RefPeerError,
    free_port,
    start_metadata_server,
    unique_name,
)
from interop_tap import OPCODE_WRITE_BITS, SESSION_HEADER, V2_FLAG_BIT, HeaderTap

from pymooncake import TransferEngine
from pymooncake.config import EngineConfig

__all__ = [
    "CANARY",
    "MARKER",
    "OPCODE_WRITE_BITS",
    "PAD_BYTES",
    "REF_PACKAGE",
    "REF_PACKAGE_VERSION",
    "REPO_ROOT",
    "SESSION_HEADER",
    "TARGET_BYTES",
    "V2_FLAG_BIT",
    "GuardedMemory",
    "HeaderTap",
    "KiB",
    "MetadataServerProc",
    "MiB",
    "Mode",
    "Pair",
    "RefPeer",
    "RefPeerError",
    "assert_same",
    "expect_our_bytes",
    "expect_ref_bytes",
    "free_port",
    "metadata_string",
    "open_pair",
    "start_metadata_server",
    "unique_name",
    "wait_for",
]

#: host part of every engine name (P2P segment names are ``127.0.0.1:<rpc port>``)
P2P_HOST: Final = "127.0.0.1"


# ---------------------------------------------------------------------------------
# memory with canaries, on our side
# ---------------------------------------------------------------------------------


class GuardedMemory:
    """``size + 2 * pad`` bytes of our memory, the pads filled with :data:`CANARY`.

    ``addr``/``view`` cover the middle ``size`` bytes, which is what gets registered.
    """

    def __init__(self, size: int, pad: int = 4 * KiB) -> None:
        self.size, self.pad = size, pad
        self._map = mmap.mmap(-1, size + 2 * pad)
        self._map[:pad] = bytes([CANARY]) * pad
        self._map[pad + size :] = bytes([CANARY]) * pad
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self.addr = self.base + pad
        self.view = memoryview(self._map)[pad : pad + size]

    def canaries_intact(self) -> bool:
        expected = bytes([CANARY]) * self.pad
        return self._map[: self.pad] == expected and self._map[self.pad + self.size :] == expected

    def close(self) -> None:
        self.view.release()
        with contextlib.suppress(BufferError):
            self._map.close()


# ---------------------------------------------------------------------------------
# modes and pairs
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """How the two engines find each other and which TCP protocol they speak.

    metadata: ``p2p``, ``http-ours`` (our metadata server) or ``http-ref``
    (the reference's).  ``ref_v1``: the reference runs with MC_TCP_PROTO=1;
    ``ours_v1``: our engine runs with ``tcp_force_v1``.
    """

    metadata: str = "p2p"
    ref_v1: bool = False
    ours_v1: bool = False

    def __str__(self) -> str:
        parts = [self.metadata]
        if self.ref_v1:
            parts.append("ref-v1")
        if self.ours_v1:
            parts.append("ours-v1")
        return "-".join(parts)

    @property
    def p2p(self) -> bool:
        return self.metadata == "p2p"

    @property
    def our_initiator_v1(self) -> bool:
        """Our initiator speaks v1 (forced; the reference target advertises v2)."""
        return self.ours_v1

    @property
    def ref_initiator_v1(self) -> bool:
        """The reference initiator speaks v1 (forced, or because our descriptor says 1)."""
        return self.ref_v1 or self.ours_v1

    def ref_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.ref_v1:
            env["MC_TCP_PROTO"] = "1"
        if not self.p2p:
            # otherwise the reference advertises its first non-loopback interface
            env["MC_TCP_BIND_ADDRESS"] = "127.0.0.1"
        return env

    def our_config(self) -> EngineConfig:
        return EngineConfig(
            tcp_force_v1=self.ours_v1,
            tcp_bind_address=None if self.p2p else "127.0.0.1",
            transfer_timeout_s=10.0,
        )


#: sizes of the buffers each side registers in a pair
TARGET_BYTES: Final = 16 * MiB + 64 * KiB
PAD_BYTES: Final = 4 * KiB


@dataclass
class Pair:
    """A reference engine and a pymooncake engine that know each other.

    ``ref_target``/``ref_local``: registered buffers in the reference process
    (``ref_target`` guarded by canaries).  ``our_target``/``our_local``: ours.
    """

    mode: Mode
    ref: RefPeer
    ours: TransferEngine
    ref_target: int
    ref_local: int
    our_target: GuardedMemory
    our_local: GuardedMemory
    metadata_url: str

    @property
    def ref_seg(self) -> str:
        """How our engine names the reference's segment."""
        return self.ref.segment_name

    @property
    def our_seg(self) -> str:
        """How the reference names our segment."""
        return self.ours.segment_name


def metadata_string(mode: Mode, servers: Mapping[str, MetadataServerProc]) -> str:
    if mode.p2p:
        return "P2PHANDSHAKE"
    return servers["ours" if mode.metadata == "http-ours" else "reference"].url


@contextlib.contextmanager
def open_pair(
    mode: Mode, metadata: str, ref_python: str, log_dir: Path, label: str
) -> Iterator[Pair]:
    """Start a reference peer and our engine in ``mode``; both see each other."""
    ref = RefPeer(ref_python, label, log_dir / f"{label}.stderr", mode.ref_env())
    ours: TransferEngine | None = None
    mems: list[GuardedMemory] = []
    try:
        if mode.p2p:
            ref.init(P2P_HOST, metadata)
            ours = TransferEngine(P2P_HOST, metadata, config=mode.our_config())
        else:
            ref.init(unique_name(), metadata)
            ours = TransferEngine(unique_name(), metadata, config=mode.our_config())
        ref_target = ref.alloc(TARGET_BYTES, pad=PAD_BYTES)
        ref_local = ref.alloc(TARGET_BYTES, pad=PAD_BYTES)
        our_target = GuardedMemory(TARGET_BYTES, PAD_BYTES)
        mems.append(our_target)
        our_local = GuardedMemory(TARGET_BYTES, PAD_BYTES)
        mems.append(our_local)
        ours.register(our_target.addr, our_target.size)
        ours.register(our_local.addr, our_local.size)
        yield Pair(mode, ref, ours, ref_target, ref_local, our_target, our_local, metadata)
    finally:
        # the reference first: in metadata-server mode it unpublishes itself
        ref.close()
        if ours is not None:
            ours.close()
        for m in mems:
            m.close()


# ---------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------


def assert_same(got: bytes | bytearray | memoryview, expected: bytes, what: str) -> None:
    """Byte-for-byte equality, reported as the first differing offset (not a diff
    of megabytes)."""
    got = bytes(got)
    if got == expected:
        return
    if len(got) != len(expected):
        raise AssertionError(f"{what}: got {len(got)} bytes, expected {len(expected)}")
    first = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
    wrong = sum(1 for a, b in zip(got, expected, strict=True) if a != b)
    raise AssertionError(
        f"{what}: {wrong} of {len(expected)} bytes differ, the first at offset {first} "
        f"(got {got[first : first + 16].hex()}, expected {expected[first : first + 16].hex()})"
    )


def wait_for(
    predicate: Callable[[], object], timeout_s: float = 5.0, interval_s: float = 0.02
) -> bool:
    """Poll ``predicate`` until it is true or ``timeout_s`` passed (bounded both ways)."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / interval_s) + 2):
        if predicate():
            return True
        if time.monotonic() > deadline:
            break
        time.sleep(interval_s)
    return bool(predicate())


def expect_ref_bytes(pair: Pair, addr: int, expected: bytes, what: str) -> None:
    """The reference's memory at ``addr`` holds ``expected``.

    With protocol v1 a WRITE completes once the initiator has sent the bytes (the
    reference's documented v1 semantics: no acknowledgement), so they may still be
    in flight: wait, bounded, for them to land before comparing.
    """
    if pair.mode.our_initiator_v1:
        digest = hashlib.sha256(expected).hexdigest()
        wait_for(lambda: pair.ref.call("digest", addr=addr, length=len(expected)) == digest)
    assert_same(pair.ref.read_bytes(addr, len(expected)), expected, what)


def expect_our_bytes(pair: Pair, view: memoryview, expected: bytes, what: str) -> None:
    """Our memory ``view`` holds ``expected`` (waiting, bounded, for v1 WRITEs to land)."""
    if pair.mode.ref_initiator_v1:
        wait_for(lambda: view == expected)
    assert_same(view, expected, what)
