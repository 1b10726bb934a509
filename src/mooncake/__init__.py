"""Drop-in compatibility package for the reference ``mooncake`` wheel.

``from mooncake.engine import TransferEngine`` and ``from mooncake.store import
MooncakeDistributedStore, ReplicateConfig`` work unchanged, with the
reference's names, positional signatures and integer return codes.  This
package only adapts; the implementation lives in :mod:`pymooncake`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BufferPool", "RegisteredBufferPool"]


def __getattr__(name: str) -> Any:
    # imported lazily so that ``import mooncake.engine`` does not load the store
    if name in ("BufferPool", "RegisteredBufferPool"):
        from . import buffer_pool

        return getattr(buffer_pool, name)
    raise AttributeError(f"module 'mooncake' has no attribute {name!r}")
