"""Which device backend serves this process: one instance per kind, made on first use.

Modes (``EngineConfig.device_backend``; ``PYMOONCAKE_DEVICE``, or
``PYMOONCAKE_FAKE_GPU=1`` for ``fake``):

* ``auto`` -- CUDA when cuda-python imports and a device answers, else none;
* ``cuda`` -- CUDA, or an error that says why not;
* ``fake`` -- the fake device of ``fake.py`` (tests, CPU-only CI);
* ``none`` -- host memory only.

The backend modules import lazily: a process that never meets device memory
never imports cuda-python.
"""

from __future__ import annotations

import importlib
import threading
from typing import Final

from ...errors import ConfigError, DeviceUnavailable
from ._interface import DeviceBackend

__all__ = ["BACKENDS", "MODES", "get_backend", "resolve_mode"]

#: name -> "module:Class"
BACKENDS: Final = {
    "cuda": "pymooncake.transfer.device.cuda:CudaDevice",
    "fake": "pymooncake.transfer.device.fake:FakeDevice",
}
MODES: Final = ("auto", "cuda", "fake", "none")

_lock = threading.Lock()
_instances: dict[str, DeviceBackend] = {}
_failures: dict[str, DeviceUnavailable] = {}


def get_backend(name: str) -> DeviceBackend:
    """The process's backend of kind ``name`` (made once; a failure is remembered).

    Raises:
        DeviceUnavailable: it cannot work here; the message says why and what to install.
    """
    target = BACKENDS.get(name)
    if target is None:
        raise ConfigError(f"no device backend named {name!r}; choose one of {sorted(BACKENDS)}")
    with _lock:
        got = _instances.get(name)
        if got is not None:
            return got
        failed = _failures.get(name)
        if failed is not None:
            raise DeviceUnavailable(str(failed))
        module_name, _, cls_name = target.partition(":")
        try:
            module = importlib.import_module(module_name)
            backend: DeviceBackend = getattr(module, cls_name)()
        except DeviceUnavailable as exc:
            _failures[name] = exc
            raise
        _instances[name] = backend
        return backend


def resolve_mode(mode: str) -> DeviceBackend | None:
    """The backend for an engine's ``device_backend`` mode (None: host memory only).

    Raises:
        ConfigError: an unknown mode.
        DeviceUnavailable: mode ``cuda`` and CUDA cannot work here.
    """
    if mode not in MODES:
        raise ConfigError(f"device backend {mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        return None
    if mode == "auto":
        try:
            return get_backend("cuda")
        except DeviceUnavailable:
            return None
    return get_backend(mode)


def unavailable_reason() -> str:
    """Why CUDA is not in use (for error messages), or ''."""
    with _lock:
        failed = _failures.get("cuda")
    return str(failed) if failed is not None else ""
