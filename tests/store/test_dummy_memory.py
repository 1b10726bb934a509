"""Pure state of dummy clients: the real client's address translation and liveness
table, and the dummy's staging through its local buffer (no sockets)."""

from __future__ import annotations

import threading

import pytest

from pymooncake.errors import InvalidParams, NoAvailableHandle, StoreError
from pymooncake.store._buffers import LocalBuffer
from pymooncake.store._dummy_local import DummyMemory, Span, span_of
from pymooncake.store._dummy_memory import DummyState, DummyTable, MappedRegion
from pymooncake.store._shm import shm_registry

CID = "0123456789abcdef0123456789abcdef"


def test_translation_stays_inside_registered_regions() -> None:
    state = DummyState(CID)
    state.add(MappedRegion(0x10000, 0x1000, 0x90000))
    state.add(MappedRegion(0x20000, 0x2000, 0x50000, local_buffer=True))
    assert state.translate(0x10000, 0x1000) == 0x90000
    assert state.translate(0x10800, 16) == 0x90800
    assert state.translate(0x21FFF, 1) == 0x51FFF
    assert state.translate(0x20000, 0) == 0x50000
    for addr, n in [(0x10FFF, 2), (0xFFFF, 1), (0x11000, 1), (0x22000, 1), (0x10000, -1)]:
        with pytest.raises(InvalidParams, match="alloc_from_mem_pool"):
            state.translate(addr, n)
    assert state.region_count == 2 and state.mapped_bytes == 0x3000


def test_overlapping_and_unknown_regions_are_refused() -> None:
    state = DummyState(CID)
    state.add(MappedRegion(0x10000, 0x1000, 0x90000))
    for base, size in [(0xF800, 0x1000), (0x10800, 0x1000), (0x10000, 0x10)]:
        with pytest.raises(InvalidParams, match="overlaps"):
            state.add(MappedRegion(base, size, 0x1))
    state.add(MappedRegion(0x11000, 0x1000, 0x1))  # adjacent is fine
    with pytest.raises(InvalidParams, match="unregister_buffer"):
        state.remove(0x10800)
    assert state.remove(0x10000).real_base == 0x90000
    with pytest.raises(InvalidParams):
        state.translate(0x10000, 1)
    assert [r.dummy_base for r in state.regions()] == [0x11000]


def test_table_expires_silent_dummies_only() -> None:
    table = DummyTable(ttl_s=10.0)
    table.hello("a" * 32, 1, now=100.0)
    table.hello("b" * 32, 2, now=100.0)
    assert table.seen("c" * 32, now=101.0) is None
    assert table.seen("a" * 32, now=105.0) is not None
    assert table.expired(now=110.0) == []
    gone = table.expired(now=110.5)
    assert [s.client_id for s in gone] == ["b" * 32]
    assert "b" * 32 not in table and "a" * 32 in table
    again = table.hello("a" * 32, 1, now=111.0)
    assert again is table.get("a" * 32)  # a hello keeps the registered regions
    assert [s.client_id for s in table.expired(now=200.0)] == ["a" * 32]
    assert len(table) == 0


@pytest.fixture
def memory() -> DummyMemory:
    shm = shm_registry()
    local = shm.allocate(64 << 10)
    mem = DummyMemory(shm, LocalBuffer(local.view, local.addr), local, 1 << 20, wait_s=2.0)
    mem.mark_registered(local)
    yield mem
    mem.release_all()


def test_spans_resolve_buffers_and_addresses(memory: DummyMemory) -> None:
    data = bytearray(b"abcdef")
    s = span_of(data, writable=True)
    assert s.n == 6 and s.view is not None and not memory.shared(s)
    assert span_of(s, writable=True) is s
    assert span_of((memory.local.addr, 10), writable=False) == Span(memory.local.addr, 10)
    assert memory.shared(Span(memory.local.addr + 100, 10))
    assert not memory.shared(Span(memory.local.addr + (64 << 10) - 1, 2))
    with pytest.raises(InvalidParams, match="read-only"):
        span_of(b"ro", writable=True)
    with pytest.raises(InvalidParams, match="size"):
        span_of(memory.local.addr, None, writable=False)
    with pytest.raises(InvalidParams, match="exceeds"):
        span_of(data, 7, writable=False)


def test_pool_is_bounded_and_released(memory: DummyMemory) -> None:
    a = memory.alloc_pool(600 << 10, populate=False)
    assert shm_registry().find(a.addr) is a
    with pytest.raises(NoAvailableHandle, match="mem_pool_size"):
        memory.alloc_pool(500 << 10, populate=False)
    b = memory.alloc_pool(400 << 10, populate=True)
    memory.release_all()
    assert shm_registry().find(a.addr) is None and shm_registry().find(b.addr) is None
    memory.local_region = None  # released above; the fixture's release_all is a no-op


def test_staging_waits_for_other_calls_and_fails_on_its_own(memory: DummyMemory) -> None:
    with pytest.raises(StoreError, match="local_buffer_size"):
        memory.stage(128 << 10, 0, "put('big')")
    first = memory.stage(48 << 10, 0, "a")
    assert first is not None
    # this call holds the space itself: nothing to wait for
    assert memory.stage(32 << 10, memory.local.size_of(first[0]), "a") is None
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(memory.stage(32 << 10, 0, "b")))
    t.start()
    t.join(0.2)
    assert t.is_alive()  # waits for the first call's staging
    memory.unstage([first[0]])
    t.join(5)
    assert got and got[0] is not None
    memory.unstage([got[0][0]])  # type: ignore[index]
    err = memory.no_room(10, "get('k')", write=False)
    assert err.code == -200 and "get_buffer" in str(err)
    assert memory.no_room(10, "put('k')", write=True).code == -600
