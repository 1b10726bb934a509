"""Mooncake Store: a master that places objects in clients' memory, and clients
that move the bytes with the transfer engine.

Public names::

    StoreClient, StoreClientConfig     the client (sync, thread-safe)
    ReplicateConfig, ReplicaDesc        replication settings, replica locations
    ErrorCode, ReplicaStatus            reference enums
    MasterConfig                        master settings (see pymooncake.store.master)
"""

from ._buffers import BufferHandle
from ._client import StoreClient, StoreClientConfig
from ._config import MasterConfig, parse_size
from ._types import (
    ErrorCode,
    ReplicaDesc,
    ReplicaStatus,
    ReplicateConfig,
    SegmentInfo,
    SoftPinAction,
)

__all__ = [
    "BufferHandle",
    "ErrorCode",
    "MasterConfig",
    "ReplicaDesc",
    "ReplicaStatus",
    "ReplicateConfig",
    "SegmentInfo",
    "SoftPinAction",
    "StoreClient",
    "StoreClientConfig",
    "parse_size",
]
