"""pymooncake: Mooncake's Transfer Engine and Store in pure Python.

``pymooncake`` is the native API (typed, raising exceptions, buffer objects
and asyncio welcome); ``mooncake`` is the drop-in compatibility package with
the reference's names, positional signatures and integer return codes.
"""

from .config import EngineConfig
from .errors import MooncakeError
from .transfer import (
    AsyncTransferEngine,
    TaskState,
    TransferEngine,
    TransferOpcode,
    TransferRequest,
    TransferStatus,
)
from .wire import NotifyMessage

__version__ = "0.1.0"

__all__ = [
    "AsyncTransferEngine",
    "EngineConfig",
    "MooncakeError",
    "NotifyMessage",
    "TaskState",
    "TransferEngine",
    "TransferOpcode",
    "TransferRequest",
    "TransferStatus",
    "__version__",
]
