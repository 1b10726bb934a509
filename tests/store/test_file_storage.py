"""FileStorage (the SSD tier's object files): round trips, crash mid-write,
damage detection, bounded use with two-phase eviction, restart scan."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pymooncake.store._file_storage import (
    BLOCK,
    CorruptObject,
    FileStorage,
    StorageFull,
    header_bytes,
)


def _value(n: int, seed: int) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(n))


def test_round_trip_buffered_and_direct(tmp_path: os.PathLike[str]) -> None:
    fs = FileStorage(str(tmp_path), capacity_bytes=1 << 24)
    a, b = _value(5000, 1), _value(1 << 16, 2)
    fs.put("a", [memoryview(a)])
    fs.put("key/with/slashes\u00e9", [memoryview(b[:100]), memoryview(b[100:])])
    out = bytearray(len(a))
    assert fs.read_into("a", memoryview(out)) == len(a) and out == a
    scratch = mmap.mmap(-1, fs.direct_bytes("key/with/slashes\u00e9"))
    assert bytes(fs.read_direct("key/with/slashes\u00e9", scratch)) == b
    assert fs.used_bytes == header_bytes(1) + len(a) + header_bytes(19) + len(b)
    with pytest.raises(KeyError):
        fs.read_into("missing", memoryview(out))
    # the value starts on a block boundary (O_DIRECT-readable)
    assert fs.get("a") is not None and fs.get("a").header % BLOCK == 0  # type: ignore[union-attr]
    scratch.close()


def test_restart_scan_rebuilds_the_index(tmp_path: os.PathLike[str]) -> None:
    fs = FileStorage(str(tmp_path), capacity_bytes=1 << 24)
    for i in range(20):
        fs.put(f"k{i}", [memoryview(_value(1000 + i, i))])
    fs.put("k3", [memoryview(_value(77, 99))])  # replaced: newest now
    again = FileStorage(str(tmp_path), capacity_bytes=1 << 24)
    found = again.open()
    assert [e.key for e in found][-1] == "k3"
    assert len(again) == 20 and again.used_bytes == fs.used_bytes
    out = bytearray(77)
    again.read_into("k3", memoryview(out))
    assert out == _value(77, 99)


_WRITER = textwrap.dedent(
    """
    import os, sys
    from pymooncake.store import _file_storage as m
    fs = m.FileStorage(sys.argv[1], capacity_bytes=1 << 30)
    value = memoryview(bytes(range(256)) * 4096)
    fs.put("committed", [value])
    real = os.fsync
    def stall(fd):
        print("WRITING", flush=True)   # the temporary file is written, not renamed
        import time; time.sleep(60)
    os.fsync = stall
    fs.put("half", [value])
    """
)


def test_crash_mid_write_never_yields_a_corrupt_object(tmp_path: os.PathLike[str]) -> None:
    root = str(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, root], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "WRITING"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
    leftovers = [n for d in os.listdir(root) for n in os.listdir(os.path.join(root, d))]
    assert any(".tmp." in n for n in leftovers), leftovers  # killed mid-write
    fs = FileStorage(root, capacity_bytes=1 << 30, verify_checksum=True)
    assert [e.key for e in fs.open()] == ["committed"]
    fs.verify("committed")
    after = [n for d in os.listdir(root) for n in os.listdir(os.path.join(root, d))]
    assert not any(".tmp." in n for n in after), "leftover temporary file not removed"


def test_damaged_files_are_detected_and_dropped(tmp_path: os.PathLike[str]) -> None:
    fs = FileStorage(str(tmp_path), capacity_bytes=1 << 24)
    for k in ("trunc", "flip", "head", "ok"):
        fs.put(k, [memoryview(_value(10_000, len(k)))])
    trunc, flip, head = fs.path_of("trunc"), fs.path_of("flip"), fs.path_of("head")
    os.truncate(trunc, os.path.getsize(trunc) - 10)
    with open(flip, "r+b") as f:
        f.seek(BLOCK + 123)
        byte = f.read(1)
        f.seek(BLOCK + 123)
        f.write(bytes([byte[0] ^ 0x40]))
    with open(head, "r+b") as f:
        f.write(b"XXXX")
    out = memoryview(bytearray(10_000))
    # size check on every read
    with pytest.raises(CorruptObject, match="length"):
        fs.read_into("trunc", out)
    assert "trunc" not in fs and not os.path.exists(trunc)
    with pytest.raises(CorruptObject, match="header"):
        fs.read_into("head", out)
    # a flipped bit passes the size check; the checksum catches it
    fs.read_into("flip", out)
    with pytest.raises(CorruptObject, match="checksum"):
        fs.verify("flip")
    assert "flip" not in fs
    fs.read_into("ok", out)
    # the restart scan drops damaged files as well
    fs.put("trunc2", [memoryview(_value(5000, 3))])
    p = fs.path_of("trunc2")
    os.truncate(p, os.path.getsize(p) - 1)
    again = FileStorage(str(tmp_path), capacity_bytes=1 << 24)
    assert {e.key for e in again.open()} == {"ok"}
    assert again.corrupt_dropped == 1 and not os.path.exists(p)


def test_bounded_use_evicts_oldest_first_two_phase(tmp_path: os.PathLike[str]) -> None:
    per = header_bytes(2) + 8192
    fs = FileStorage(str(tmp_path), capacity_bytes=4 * per, max_keys=100)
    for i in range(4):
        assert fs.make_room(per) == []
        fs.put(f"k{i}", [memoryview(_value(8192, i))])
    victims = fs.make_room(per)
    assert [v.key for v in victims] == ["k0"]
    assert "k0" not in fs and os.path.exists(victims[0].path)  # phase 1: index only
    fs.unlink(victims)
    assert not os.path.exists(victims[0].path)
    fs.put("k4", [memoryview(_value(8192, 4))])
    assert fs.used_bytes == 4 * per
    with pytest.raises(StorageFull):
        fs.make_room(5 * per)
    # the key-count bound
    small = FileStorage(str(tmp_path) + "-keys", capacity_bytes=1 << 30, max_keys=2)
    for i in range(3):
        small.unlink(small.make_room(per))
        small.put(f"s{i}", [memoryview(b"x")])
    assert small.keys() == ["s1", "s2"]


def test_lru_policy_keeps_what_is_read(tmp_path: os.PathLike[str]) -> None:
    per = header_bytes(2) + 100
    fs = FileStorage(str(tmp_path), capacity_bytes=3 * per, policy="lru")
    for i in range(3):
        fs.put(f"k{i}", [memoryview(_value(100, i))])
    fs.read_into("k0", memoryview(bytearray(100)))
    assert [v.key for v in fs.make_room(per)] == ["k1"]


def test_capacity_default_is_a_share_of_the_free_space(tmp_path: os.PathLike[str]) -> None:
    st = os.statvfs(str(tmp_path))
    fs = FileStorage(str(tmp_path))
    assert 0 < fs.capacity_bytes <= st.f_bavail * st.f_frsize
