"""MemoryRegistry: non-overlapping ranges, lookups, views over raw addresses."""

from __future__ import annotations

import ctypes
import mmap
import threading
import time

import numpy as np
import pytest

from pymooncake.errors import AddressNotRegistered, AddressOverlapped, InvalidArgument
from pymooncake.transfer import MemoryRegistry, Region, address_of, view_at


def region(addr: int, length: int, remote: bool = True) -> Region:
    return Region(addr, length, "cpu:0", remote, memoryview(bytearray(length)))


def test_add_find_remove() -> None:
    reg = MemoryRegistry()
    reg.add(region(0x1000, 0x100))
    reg.add(region(0x2000, 0x100))
    assert reg.find(0x1000, 0x100) is not None
    assert reg.find(0x10FF, 1) is not None
    assert reg.find(0x10FF, 2) is None  # crosses the end
    assert reg.find(0x1100, 1) is None  # gap
    assert reg.find(0xFFF, 1) is None
    assert [r.addr for r in reg.regions()] == [0x1000, 0x2000]
    reg.remove(0x1000)
    assert reg.find(0x1000, 1) is None
    with pytest.raises(AddressNotRegistered, match="0x1000"):
        reg.remove(0x1000)


def test_the_remembered_region_is_forgotten_with_its_registration() -> None:
    reg = MemoryRegistry()
    first = region(0x1000, 0x100)
    reg.add(first)
    assert reg.find(0x1010, 0x10) is first  # remembered
    assert reg.find(0x10F0, 0x20) is None  # still checks the end
    reg.remove(0x1000)
    assert reg.find(0x1010, 0x10) is None
    again = region(0x1000, 0x80)  # the same start, shorter: the old span must not be used
    reg.add(again)
    assert reg.find(0x1010, 0x10) is again
    assert reg.find(0x1090, 0x10) is None


def test_a_copier_copies_within_regions_and_refuses_the_rest() -> None:
    reg = MemoryRegistry()
    a, b = region(0x1000, 0x100), region(0x3000, 0x100)
    local = region(0x5000, 0x100, remote=False)
    for r in (a, b, local):
        reg.add(r)
    copy = reg.copier()
    assert copy(0x1010, memoryview(b"abcd"), True)
    assert copy(0x3000, memoryview(b"xy"), True)  # another region
    assert copy(0x1020, memoryview(b"ef"), True)  # and back
    out = bytearray(4)
    assert copy(0x1010, memoryview(out), False)
    assert bytes(out) == b"abcd"
    assert bytes(a.view[0x20:0x22]) == b"ef" and bytes(b.view[:2]) == b"xy"
    assert not copy(0x10FF, memoryview(b"zz"), True)  # crosses the end
    assert not copy(0x2000, memoryview(b"z"), True)  # unregistered
    assert not copy(0x5000, memoryview(b"z"), True)  # not remote-accessible
    assert not copy(0x1000, memoryview(b""), True)  # empty
    assert bytes(local.view[:1]) == b"\0"
    reg.remove(0x1000)
    assert not copy(0x1010, memoryview(b"q"), True)  # unregistered meanwhile
    assert copy(0x3001, memoryview(b"q"), True)
    assert bytes(b.view[:2]) == b"xq"


def test_adjacent_regions_do_not_merge() -> None:
    reg = MemoryRegistry()
    reg.add(region(0x1000, 0x100))
    reg.add(region(0x1100, 0x100))
    assert reg.find(0x10F0, 0x20) is None  # spans two buffers: refused like the reference


@pytest.mark.parametrize(
    ("addr", "length"), [(0x1000, 0x100), (0x10FF, 2), (0xF00, 0x101), (0x800, 0x2000), (0x1050, 8)]
)
def test_overlaps_are_refused(addr: int, length: int) -> None:
    reg = MemoryRegistry()
    reg.add(region(0x1000, 0x100))
    with pytest.raises(AddressOverlapped, match="overlapped"):
        reg.add(region(addr, length))
    assert len(reg.regions()) == 1


def test_zero_length_and_zero_address_refused() -> None:
    reg = MemoryRegistry()
    with pytest.raises(InvalidArgument):
        reg.add(Region(0x1000, 0, "cpu:0", True, memoryview(bytearray(0))))
    with pytest.raises(InvalidArgument):
        reg.add(Region(0, 10, "cpu:0", True, memoryview(bytearray(10))))


def test_find_remote_rules() -> None:
    reg = MemoryRegistry()
    reg.add(region(0x1000, 0x100))
    reg.add(region(0x3000, 0x100, remote=False))
    assert reg.find_remote(0x1000, 0x100) is not None
    assert reg.find_remote(0x1000, 0) is None  # zero-size requests from peers are refused
    assert reg.find_remote(0x3000, 1) is None  # not remote accessible
    assert reg.find_remote((1 << 64) - 1, 2) is None  # overflow
    assert reg.find_remote(-1, 1) is None


def test_resolve_gives_the_right_bytes() -> None:
    buf = bytearray(b"0123456789")
    addr, n = address_of(buf)
    reg = MemoryRegistry()
    reg.add(Region(addr, n, "cpu:0", True, memoryview(buf)))
    assert bytes(reg.resolve(addr + 3, 4)) == b"3456"
    with pytest.raises(AddressNotRegistered):
        reg.resolve(addr + 8, 4)


def test_view_at_raw_address_aliases_memory() -> None:
    arr = np.zeros(16, dtype=np.uint8)
    view = view_at(arr.ctypes.data + 4, 4)
    view[:] = b"abcd"
    assert bytes(arr[4:8]) == b"abcd"
    assert len(view_at(arr.ctypes.data, 0)) == 0
    with pytest.raises(InvalidArgument):
        view_at(0, 4)


def test_address_of_various_buffers() -> None:
    ba = bytearray(10)
    assert address_of(ba) == (ctypes.addressof(ctypes.c_char.from_buffer(ba)), 10)
    arr = np.zeros((4, 4), dtype=np.float32)
    assert address_of(arr) == (arr.ctypes.data, 64)
    mm = mmap.mmap(-1, 4096)
    try:
        addr, n = address_of(mm)
        assert n == 4096 and addr % 4096 == 0
    finally:
        mm.close()
    with pytest.raises(InvalidArgument, match="read-only"):
        address_of(b"bytes are read-only")
    with pytest.raises(InvalidArgument, match="contiguous"):
        address_of(np.zeros((4, 4))[:, 1])
    with pytest.raises(InvalidArgument):
        address_of(12345)


def test_concurrent_lookups_during_updates() -> None:
    reg = MemoryRegistry()
    reg.add(region(0x100000, 0x1000))
    stop = threading.Event()
    misses = []

    def reader() -> None:
        while not stop.is_set():
            if reg.find(0x100000, 0x1000) is None:
                misses.append(1)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(500):
        base = 0x200000 + i * 0x2000
        reg.add(region(base, 0x1000))
        reg.remove(base)
    stop.set()
    for t in threads:
        t.join()
    assert not misses


# --- pins and quiesce (unregister waits) ----------------------------------------------


def test_pin_claims_only_live_remote_regions() -> None:
    buf = (ctypes.c_char * 4096)()
    addr = ctypes.addressof(buf)
    view = memoryview(buf).cast("B")
    reg = MemoryRegistry()
    r = reg.add(Region(addr, 4096, "cpu:0", True, view))
    slot = reg.new_slot()
    assert reg.pin(slot, addr + 10, 100) is r and slot.region is r
    slot.region = None
    assert reg.pin(slot, addr + 4000, 200) is None and slot.region is None  # past the end
    assert reg.pin(slot, addr, 0) is None
    reg.remove(addr)
    assert reg.pin(slot, addr, 10) is None and slot.region is None
    reg.drop_slot(slot)


def test_quiesce_waits_for_the_holder_then_cuts_it() -> None:
    buf = (ctypes.c_char * 4096)()
    addr = ctypes.addressof(buf)
    reg = MemoryRegistry()
    r = reg.add(Region(addr, 4096, "cpu:0", True, memoryview(buf).cast("B")))
    # a holder that lets go by itself within the drain time
    slot = reg.new_slot()
    reg.pin(slot, addr, 8)
    threading.Timer(0.1, lambda: setattr(slot, "region", None)).start()
    reg.remove(addr)
    start = time.monotonic()
    assert reg.quiesce(r, drain_s=2.0) == 0
    assert 0.05 < time.monotonic() - start < 1.5
    # a holder that does not: aborted after the drain time, then waited for
    r2 = reg.add(Region(addr, 4096, "cpu:0", True, memoryview(buf).cast("B")))
    aborted = []
    stuck = reg.new_slot(abort=lambda: (aborted.append(1), setattr(stuck, "region", None)))
    reg.pin(stuck, addr, 8)
    reg.remove(addr)
    start = time.monotonic()
    assert reg.quiesce(r2, drain_s=0.2) == 1
    assert aborted == [1] and time.monotonic() - start >= 0.2
    reg.drop_slot(slot)
    reg.drop_slot(stuck)
