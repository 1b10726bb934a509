"""Device (GPU) memory: one small interface, a CUDA and a fake implementation.

``get_backend("cuda")`` / ``get_backend("fake")`` give the process's backend of
that kind; engines pick theirs from ``EngineConfig.device_backend``.  See
``_interface.py`` for the contract, ``_staging.py`` for how TCP moves device
bytes and ``docs/gpu.md`` for the design.  ``cuda.py`` (cuda-python) is
imported only when CUDA is selected.
"""

from __future__ import annotations

from ._interface import (
    IPC_HANDLE_BYTES,
    DeviceBackend,
    DeviceEvent,
    DeviceSpan,
    DeviceStream,
    IpcHandle,
    parse_location,
)
from ._select import BACKENDS, MODES, get_backend, resolve_mode, unavailable_reason

__all__ = [
    "BACKENDS",
    "IPC_HANDLE_BYTES",
    "MODES",
    "DeviceBackend",
    "DeviceEvent",
    "DeviceSpan",
    "DeviceStream",
    "IpcHandle",
    "get_backend",
    "parse_location",
    "resolve_mode",
    "unavailable_reason",
]
