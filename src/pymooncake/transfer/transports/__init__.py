"""Transports, one module each, chosen by name through :data:`TRANSPORTS`.

Optional transports (future: rdma, gpu) are imported only when selected and
fail with a clear message if their dependencies are missing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ...errors import NotSupported
from ._base import Peer, Slice, SliceCallback, Transport, TransportContext

__all__ = [
    "TRANSPORTS",
    "Peer",
    "Slice",
    "SliceCallback",
    "Transport",
    "TransportContext",
    "create_transport",
]

#: name -> "module:Class"; modules import lazily
TRANSPORTS: dict[str, str] = {
    "tcp": "pymooncake.transfer.transports.tcp:TcpTransport",
    "local": "pymooncake.transfer.transports.local:LocalTransport",
    "shm": "pymooncake.transfer.transports.shm:ShmTransport",
}

#: names the reference knows but this build cannot serve, with the reason
_UNAVAILABLE: dict[str, str] = {
    "rdma": "RDMA needs verbs hardware and bindings; pymooncake moves data over TCP "
    "(set the peer to protocol 'tcp', e.g. MC_FORCE_TCP=1 on reference engines)",
    "efa": "AWS EFA is not available in pymooncake; use 'tcp'",
    "barex": "Barex RDMA is not available in pymooncake; use 'tcp'",
    "cxi": "HPE Slingshot is not available in pymooncake; use 'tcp'",
    "nvlink": "cross-node NVLink (MNNVL) is not available in pymooncake; use 'tcp'",
    "nvmeof": "NVMe-oF segments are not available in pymooncake",
}


def create_transport(name: str, ctx: TransportContext) -> Transport:
    """Instantiate the transport registered under ``name``.

    Raises:
        NotSupported: unknown name or a transport this build cannot provide.
    """
    target = TRANSPORTS.get(name)
    if target is None:
        reason = _UNAVAILABLE.get(name, f"no transport named {name!r} is registered")
        raise NotSupported(f"transport {name!r}: {reason}")
    module_name, _, cls_name = target.partition(":")
    module = importlib.import_module(module_name)
    factory: Callable[[TransportContext], Transport] = getattr(module, cls_name)
    return factory(ctx)


def unavailable_reason(protocol: str) -> str:
    return _UNAVAILABLE.get(protocol, f"no transport serves protocol {protocol!r}")
