"""A reference engine reads and writes pymooncake device memory over TCP.

The reference only sees a TCP segment whose buffer carries an extra
``"location": "cuda:0"``; our TCP server stages each request through pinned
buffers.  Here the device is the fake one (CPU CI); on a GPU machine the same
path runs with CUDA (``tests/gpu``).
"""

from __future__ import annotations

import ctypes
import random
from collections.abc import Iterator

import pytest
from interop_support import MiB, Mode, Pair, assert_same, expect_ref_bytes, wait_for

from pymooncake import EngineConfig, TransferEngine
from pymooncake.transfer.device import get_backend

pytestmark = pytest.mark.interop

MODES = [Mode("p2p"), Mode("p2p", ref_v1=True)]
SIZE = 3 * MiB + 5


@pytest.fixture
def gpu_engine(pair: Pair) -> Iterator[tuple[TransferEngine, int]]:
    """Our engine with SIZE bytes of (fake) device memory registered at ``addr``."""
    fake = get_backend("fake")
    dev = fake.alloc(SIZE, 0)
    eng = TransferEngine(
        "127.0.0.1",
        "P2PHANDSHAKE",
        config=EngineConfig(
            device_backend="fake", staging_chunk_bytes=512 * 1024, transfer_timeout_s=10.0
        ),
    )
    try:
        eng.register(dev, SIZE)
        yield eng, dev
    finally:
        eng.close()
        fake.free(dev)


def _device_bytes(addr: int, n: int) -> bytes:
    buf = bytearray(n)
    get_backend("fake").copy(ctypes.addressof((ctypes.c_char * n).from_buffer(buf)), addr, n)
    return bytes(buf)


def test_reference_writes_and_reads_our_device_memory(
    pair: Pair, gpu_engine: tuple[TransferEngine, int]
) -> None:
    eng, dev = gpu_engine
    data = random.Random(SIZE).randbytes(SIZE)
    pair.ref.write_bytes(pair.ref_local, data)
    rc = pair.ref.call(
        "transfer_sync_write",
        segment=eng.segment_name,
        local=pair.ref_local,
        remote=dev,
        length=SIZE,
    )
    assert rc == 0
    # a v1 WRITE completes when sent (no acknowledgement): wait, bounded, for it to land
    wait_for(lambda: _device_bytes(dev, SIZE) == data, timeout_s=10.0)
    assert_same(_device_bytes(dev, SIZE), data, "our device memory after the reference's write")
    rc = pair.ref.call(
        "transfer_sync_read",
        segment=eng.segment_name,
        local=pair.ref_target,
        remote=dev + 1,
        length=SIZE - 1,
    )
    assert rc == 0
    expect_ref_bytes(pair, pair.ref_target, data[1:], "reference buffer after reading our device")


def test_our_device_memory_to_and_from_the_reference(
    pair: Pair, gpu_engine: tuple[TransferEngine, int]
) -> None:
    eng, dev = gpu_engine
    data = random.Random(7).randbytes(SIZE)
    fake = get_backend("fake")
    buf = bytearray(data)
    fake.copy(dev, ctypes.addressof((ctypes.c_char * SIZE).from_buffer(buf)), SIZE)
    eng.write(pair.ref_seg, dev, pair.ref_target, SIZE)  # staged initiator write
    expect_ref_bytes(pair, pair.ref_target, data, "reference target after our device write")
    pair.ref.write_bytes(pair.ref_target, data[::-1][:SIZE])
    eng.read(pair.ref_seg, dev, pair.ref_target, SIZE)
    assert_same(_device_bytes(dev, SIZE), data[::-1], "our device memory after the read")
