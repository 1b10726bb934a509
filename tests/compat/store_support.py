"""Shared helpers of the ``mooncake.store`` compat tests (not a test module).

``test_store_compat.py`` and ``test_client_replays.py`` both run compat
``MooncakeDistributedStore`` objects against an in-process
:class:`pymooncake.testing.LocalCluster` (master + embedded HTTP metadata
server on 127.0.0.1, ports chosen at run time).  :class:`Stores` sets stores
up the way the clients do -- seven positional arguments -- and closes every
one of them at teardown, so the leak check of ``tests/conftest.py`` sees no
thread or socket left behind.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mooncake.store import MooncakeDistributedStore
from pymooncake.store import MasterConfig
from pymooncake.testing import LocalCluster

__all__ = [
    "LEASE_MS",
    "LOCAL",
    "MiB",
    "Stores",
    "addr",
    "new_cluster",
    "pattern",
]

LOCAL = "127.0.0.1"
MiB = 1 << 20
#: read lease of the test master: short, so "wait for the lease" tests stay fast,
#: long enough that a read on a busy CI machine still finishes inside it
LEASE_MS = 500


def new_cluster(**master: Any) -> LocalCluster:
    """A master (short read leases unless overridden) with its HTTP metadata server."""
    master.setdefault("default_kv_lease_ttl_ms", LEASE_MS)
    return LocalCluster(MasterConfig(**master))


def addr(array: np.ndarray) -> int:
    """Address of a numpy array's first byte (numpy arrays stand in for GPU/pinned memory)."""
    return int(array.ctypes.data)


def pattern(n: int, seed: int) -> bytes:
    """``n`` reproducible, non-repeating bytes."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


class Stores:
    """Creates compat stores against ``cluster`` and closes them all in :meth:`close_all`."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self._stores: list[MooncakeDistributedStore] = []

    def track(self, store: MooncakeDistributedStore) -> MooncakeDistributedStore:
        """Close ``store`` at teardown too (for stores set up by the test itself)."""
        self._stores.append(store)
        return store

    def new(
        self,
        segment: int | str = 16 * MiB,
        local_buffer: int | str = 16 * MiB,
        *,
        hostname: str = LOCAL,
        metadata_server: str | None = None,
        protocol: str = "tcp",
        **keywords: Any,
    ) -> MooncakeDistributedStore:
        """A store set up with the reference's seven positional arguments (+ keywords)."""
        store = self.track(MooncakeDistributedStore())
        rc = store.setup(
            hostname,
            metadata_server or self.cluster.metadata_url,
            segment,
            local_buffer,
            protocol,
            "",
            self.cluster.master_address,
            **keywords,
        )
        assert rc == 0, f"setup returned {rc}"
        return store

    def close_all(self) -> None:
        codes = [store.close() for store in reversed(self._stores)]
        self._stores.clear()
        assert all(rc == 0 for rc in codes), codes
