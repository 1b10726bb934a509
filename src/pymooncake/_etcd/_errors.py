"""Errors of the etcd client.

All derive from :class:`EtcdError` (a :class:`~pymooncake.errors.MooncakeError`
with the reference's metadata code).  Callers that present etcd as something
else (the metadata backend, the master's HA) catch these and re-raise their own
error with the message kept, so the operator still reads what etcd said.
"""

from __future__ import annotations

from ..errors import ErrCode, MooncakeError
from ._wire import GatewayError, GrpcCode

__all__ = [
    "EtcdCompacted",
    "EtcdError",
    "EtcdLeaseNotFound",
    "EtcdUnreachable",
    "error_from_gateway",
]


class EtcdError(MooncakeError):
    """etcd answered with an error, or with something that is not etcd.

    Attributes:
        grpc_code: the gRPC status code etcd reported (None: not from etcd).
    """

    code = ErrCode.METADATA

    def __init__(self, message: str, *, grpc_code: int | None = None) -> None:
        super().__init__(message)
        self.grpc_code = grpc_code


class EtcdUnreachable(EtcdError):
    """No endpoint could serve the request (refused, timed out, no leader).

    Attributes:
        maybe_applied: the request reached an endpoint before the connection
            failed, so a write may have taken effect; read back before retrying
            a non-idempotent request (a transaction, a lease grant).
    """

    def __init__(
        self, message: str, *, grpc_code: int | None = None, maybe_applied: bool = False
    ) -> None:
        super().__init__(message, grpc_code=grpc_code)
        self.maybe_applied = maybe_applied


class EtcdCompacted(EtcdError):
    """The requested revision was compacted away.

    Attributes:
        compact_revision: the oldest revision still available (0 if unknown);
            read the current state and continue from there.
    """

    def __init__(self, message: str, *, compact_revision: int = 0) -> None:
        super().__init__(message, grpc_code=GrpcCode.OUT_OF_RANGE)
        self.compact_revision = compact_revision


class EtcdLeaseNotFound(EtcdError):
    """The lease expired or was revoked (etcd: "requested lease not found")."""

    def __init__(self, message: str) -> None:
        super().__init__(message, grpc_code=GrpcCode.NOT_FOUND)


def error_from_gateway(err: GatewayError, what: str) -> EtcdError:
    """The exception for an error etcd reported while doing ``what``."""
    text = f"etcd {what} failed: {err.message} (gRPC code {err.code})"
    if err.code == GrpcCode.NOT_FOUND and "lease" in err.message:
        return EtcdLeaseNotFound(text)
    if err.code == GrpcCode.OUT_OF_RANGE and "compacted" in err.message:
        return EtcdCompacted(text)
    if err.code == GrpcCode.UNAUTHENTICATED or err.code == GrpcCode.PERMISSION_DENIED:
        return EtcdError(
            text + "; etcd has authentication enabled, which pymooncake's etcd client does "
            "not support: run etcd without --auth or give Mooncake a cluster of its own",
            grpc_code=err.code,
        )
    if err.code == GrpcCode.UNAVAILABLE:
        return EtcdUnreachable(text, grpc_code=err.code)
    return EtcdError(text, grpc_code=err.code)
