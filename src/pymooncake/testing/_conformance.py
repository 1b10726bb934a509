"""Transport conformance checks: the same behaviour whatever moves the bytes.

Each ``check_*`` function takes an initiator :class:`TransferEngine` and a
:class:`TargetProcess` (see :func:`spawn_target`) and raises AssertionError
on a violation.  The test suite runs them with the same-host transport on and
off, against the target's memfd-backed and plain buffers, so TCP, shared
mappings and process_vm_* all answer to one contract.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time

from ..errors import PeerRejected, TransferFailed
from ..transfer import TransferEngine, TransferRequest
from ._target import TargetProcess

__all__ = [
    "check_many_threads",
    "check_offsets",
    "check_out_of_bounds",
    "check_peer_death",
    "check_unregister_during_use",
    "check_zero_length",
]


def _base(target: TargetProcess, which: str) -> int:
    return target.managed if which == "managed" else target.plain


def check_offsets(
    engine: TransferEngine, target: TargetProcess, which: str, rounds: int = 40
) -> None:
    """Writes and reads at random offsets and lengths land exactly where asked."""
    base = _base(target, which)
    rng = random.Random(1234)
    target.call(cmd="fill", which=which, byte=0)
    for _ in range(rounds):
        n = rng.choice([1, 7, 4096, 65537, 1 << 20])
        off = rng.randrange(0, target.size - n)
        data = os.urandom(n)
        engine.write(target.segment, data, base + off)
        assert target.digest(which, off, n) == hashlib.sha256(data).hexdigest(), (which, off, n)
        out = bytearray(n)
        engine.read(target.segment, out, base + off)
        assert out == data
    # a batch mixing reads and writes at many offsets
    reqs = []
    expect = {}
    for i in range(64):
        off = i * 4096 + rng.randrange(0, 100)
        data = os.urandom(1000)
        expect[off] = data
        reqs.append(TransferRequest.write(data, base + off))
    engine.transfer(target.segment, reqs)
    outs = {off: bytearray(1000) for off in expect}
    engine.transfer(
        target.segment, [TransferRequest.read(buf, base + off) for off, buf in outs.items()]
    )
    assert all(outs[o] == d for o, d in expect.items())


def check_zero_length(engine: TransferEngine, target: TargetProcess, which: str) -> None:
    """Zero-length requests complete, even at addresses outside every buffer."""
    engine.transfer(
        target.segment,
        [
            TransferRequest.write(b"", 0x10, 0),
            TransferRequest.read(bytearray(0), _base(target, which), 0),
        ],
    )


def check_out_of_bounds(engine: TransferEngine, target: TargetProcess, which: str) -> None:
    """Requests not wholly inside one registered buffer fail and touch nothing."""
    base = _base(target, which)
    target.call(cmd="fill", which=which, byte=0xAB)
    before = target.digest(which, 0, target.size)
    for addr, n in [(base + target.size - 10, 20), (base - 8, 16), (base + target.size, 1), (8, 8)]:
        for op in ("write", "read"):
            try:
                if op == "write":
                    engine.write(target.segment, b"\x00" * n, addr)
                else:
                    engine.read(target.segment, bytearray(n), addr)
            except TransferFailed as exc:
                assert isinstance(exc.errors[0], PeerRejected), exc
            else:
                raise AssertionError(f"{op} of {n} bytes at {addr:#x} was not refused")
    assert target.digest(which, 0, target.size) == before
    engine.write(target.segment, b"still ok", base)  # the target keeps serving


def check_many_threads(
    engine: TransferEngine, target: TargetProcess, which: str, threads: int = 8
) -> None:
    """Concurrent transfers from many threads never mix bytes."""
    base = _base(target, which)
    span = target.size // threads
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        rng = random.Random(t)
        try:
            for _ in range(30):
                n = rng.randint(1, min(span, 256 << 10))
                data = os.urandom(n)
                engine.write(target.segment, data, base + t * span)
                out = bytearray(n)
                engine.read(target.segment, out, base + t * span)
                assert out == data
        except BaseException as exc:
            errors.append(exc)

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors[0]


def check_unregister_during_use(engine: TransferEngine, target: TargetProcess, which: str) -> None:
    """Once the owner unregisters a buffer, transfers to it are refused."""
    base = _base(target, which)
    engine.write(target.segment, b"before", base)
    target.call(cmd="unregister", which=which)
    try:
        engine.write(target.segment, b"after", base)
    except TransferFailed as exc:
        assert isinstance(exc.errors[0], PeerRejected), exc
    else:
        raise AssertionError("a write to an unregistered buffer succeeded")


def check_peer_death(engine: TransferEngine, target: TargetProcess, which: str) -> None:
    """A peer killed while transfers run: they fail (not hang, not 'succeed') soon after."""
    base = _base(target, which)
    stop = threading.Event()
    outcome: dict[str, float] = {}

    def hammer() -> None:
        data = os.urandom(1 << 20)
        while not stop.is_set():
            try:
                engine.write(target.segment, data, base)
            except TransferFailed:
                outcome["failed_at"] = time.monotonic()
                return

    t = threading.Thread(target=hammer)
    t.start()
    time.sleep(0.2)
    target.kill()
    killed = time.monotonic()
    t.join(20)
    stop.set()
    assert not t.is_alive(), "transfers hung after the peer died"
    assert "failed_at" in outcome, "transfers kept succeeding after the peer died"
    assert outcome["failed_at"] - killed < 15
