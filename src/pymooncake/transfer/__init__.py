"""The Transfer Engine: registered memory, segments, transports, batches.

Public names::

    TransferEngine        sync, exception-raising engine (thread-safe)
    AsyncTransferEngine   asyncio face of the same engine
    TransferRequest, TransferOpcode, TaskState, TransferStatus
    Region                a registered buffer
"""

from ._async import AsyncTransferEngine
from ._engine import LOCAL_SEGMENT_ID, TransferEngine
from ._memory import MemoryRegistry, Region, address_of, view_at
from ._request import TaskState, TransferOpcode, TransferRequest, TransferStatus

__all__ = [
    "LOCAL_SEGMENT_ID",
    "AsyncTransferEngine",
    "MemoryRegistry",
    "Region",
    "TaskState",
    "TransferEngine",
    "TransferOpcode",
    "TransferRequest",
    "TransferStatus",
    "address_of",
    "view_at",
]
