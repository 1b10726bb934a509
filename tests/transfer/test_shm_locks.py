"""The copy locks of the same-host transport (``_shm_page._ofd_lock``): tried first
without waiting and with the GIL held, waiting the ordinary way only on a conflict."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator

import pytest

from pymooncake.transfer.transports import _shm_page
from pymooncake.transfer.transports._shm_page import _ofd_lock

pytestmark = pytest.mark.skipif(
    getattr(fcntl, "F_OFD_SETLK", None) is None, reason="open file description locks are Linux's"
)

ADDR = 0x7F00_0000_1000  # the lock byte of a buffer: its address


@pytest.fixture
def two_opens() -> Iterator[tuple[int, int]]:
    fd = os.memfd_create("locks")
    os.ftruncate(fd, 4096)
    other = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)  # a second open file description
    yield fd, other
    os.close(other)
    os.close(fd)


def test_shared_locks_coexist_and_a_writer_excludes_them(two_opens: tuple[int, int]) -> None:
    copier, owner = two_opens
    assert _ofd_lock(copier, fcntl.F_RDLCK, ADDR, wait=True)
    assert not _ofd_lock(owner, fcntl.F_WRLCK, ADDR, wait=False)  # a copy is in flight
    assert _ofd_lock(owner, fcntl.F_RDLCK, ADDR + 1, wait=False)  # another buffer: free
    assert _ofd_lock(copier, fcntl.F_UNLCK, ADDR, wait=False)
    assert _ofd_lock(owner, fcntl.F_WRLCK, ADDR, wait=False)
    assert not _ofd_lock(copier, fcntl.F_RDLCK, ADDR, wait=False)  # unregistering


def test_a_copier_waits_for_the_owner_on_a_conflict(two_opens: tuple[int, int]) -> None:
    """The held (non-blocking) attempt fails; the copier then waits in ``fcntl`` until
    the owner lets go, as before."""
    copier, owner = two_opens
    assert _shm_page._held_fcntl is not None  # the GIL-holding attempt is in use here
    assert _ofd_lock(owner, fcntl.F_WRLCK, ADDR, wait=False)
    got = threading.Event()
    t = threading.Thread(
        target=lambda: (_ofd_lock(copier, fcntl.F_RDLCK, ADDR, wait=True), got.set())
    )
    t.start()
    try:
        assert not got.wait(0.3)
    finally:
        _ofd_lock(owner, fcntl.F_UNLCK, ADDR, wait=False)
    t.join(10)
    assert got.is_set()


def test_a_bad_descriptor_is_an_error(two_opens: tuple[int, int]) -> None:
    r, w = os.pipe()
    os.close(w)
    os.close(r)
    with pytest.raises(OSError):
        _ofd_lock(r, fcntl.F_RDLCK, ADDR, wait=True)
