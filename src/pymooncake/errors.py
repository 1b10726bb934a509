"""Exception hierarchy of pymooncake.

Inside pymooncake every failure is an exception; integer codes appear only at the
``mooncake`` compatibility edge.  Each transfer-engine exception carries the
reference's ``ERR_*`` value (``mooncake-transfer-engine/include/error.h``) in
``code`` so the edge can translate without a lookup table of its own.

Messages are written for operators: what failed, with which name/address/key,
and what to check.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "AddressNotRegistered",
    "AddressOverlapped",
    "AuthenticationError",
    "BatchBusy",
    "ClosedError",
    "ConfigError",
    "DeviceError",
    "DeviceUnavailable",
    "DnsError",
    "ErrCode",
    "HandshakeRejected",
    "InvalidArgument",
    "InvalidParams",
    "LeaseExpired",
    "MalformedMessage",
    "MetadataError",
    "MetadataUnreachable",
    "MooncakeError",
    "NoAvailableHandle",
    "NotSupported",
    "ObjectExists",
    "ObjectHasLease",
    "ObjectNotFound",
    "PeerRejected",
    "PeerSocketError",
    "PortInUse",
    "ProtocolError",
    "ReplicaNotReady",
    "RpcFailed",
    "RpcTimeout",
    "SegmentNotFound",
    "StoreError",
    "StoreTransferFailed",
    "TooManyRequests",
    "TransferError",
    "TransferFailed",
    "TransferTimeout",
    "store_error",
]


class ErrCode(IntEnum):
    """The reference's transfer-engine error codes (``error.h``)."""

    OK = 0
    INVALID_ARGUMENT = -1
    TOO_MANY_REQUESTS = -2
    ADDRESS_NOT_REGISTERED = -3
    BATCH_BUSY = -4
    DEVICE_NOT_FOUND = -6
    ADDRESS_OVERLAPPED = -7
    DNS = -101
    SOCKET = -102
    MALFORMED_JSON = -103
    REJECT_HANDSHAKE = -104
    METADATA = -200
    ENDPOINT = -201
    CONTEXT = -202
    NUMA = -300
    CLOCK = -301
    MEMORY = -302
    NOT_IMPLEMENTED = -303


class MooncakeError(Exception):
    """Root of every pymooncake error.  ``code`` is the reference's int code."""

    code: int = ErrCode.INVALID_ARGUMENT

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(MooncakeError, ValueError):
    """A configuration value (argument, env var, file) is unusable."""

    code = ErrCode.INVALID_ARGUMENT


class InvalidArgument(MooncakeError, ValueError):
    code = ErrCode.INVALID_ARGUMENT


class NotSupported(MooncakeError):
    """The request needs hardware or a backend this build/host does not have."""

    code = ErrCode.NOT_IMPLEMENTED


class ClosedError(MooncakeError):
    """The engine/server/connection was closed by our side."""

    code = ErrCode.INVALID_ARGUMENT


# --- memory registration ---------------------------------------------------


class AddressOverlapped(MooncakeError):
    code = ErrCode.ADDRESS_OVERLAPPED


class AddressNotRegistered(MooncakeError):
    code = ErrCode.ADDRESS_NOT_REGISTERED


# --- batches ------------------------------------------------------------------


class TooManyRequests(MooncakeError):
    code = ErrCode.TOO_MANY_REQUESTS


class BatchBusy(MooncakeError):
    code = ErrCode.BATCH_BUSY


# --- metadata -------------------------------------------------------------------


class MetadataError(MooncakeError):
    """The metadata backend failed or returned something unusable."""

    code = ErrCode.METADATA


class MetadataUnreachable(MetadataError):
    """The metadata server could not be contacted at all."""


class SegmentNotFound(MetadataError):
    """No descriptor is published under the requested segment name."""


# --- peers and the wire ---------------------------------------------------------


class TransferError(MooncakeError):
    """A transfer to or from a peer failed."""

    code = ErrCode.SOCKET


class DnsError(TransferError):
    code = ErrCode.DNS


class PeerSocketError(TransferError):
    """Connecting to or talking with a peer failed at the socket level."""

    code = ErrCode.SOCKET


class PortInUse(PeerSocketError):
    """A listening port could not be bound."""


class MalformedMessage(TransferError):
    """A peer sent bytes that do not decode (bad frame, bad JSON)."""

    code = ErrCode.MALFORMED_JSON


ProtocolError = MalformedMessage


class HandshakeRejected(TransferError):
    code = ErrCode.REJECT_HANDSHAKE


class AuthenticationError(HandshakeRejected):
    """Cluster authentication failed (no token, a different token, or a peer that
    does not authenticate); the message names the port, the peer and the fix.

    ``failure`` is the :class:`pymooncake.wire._auth.AuthFailure` when known.
    """

    failure: object = None


class PeerRejected(TransferError):
    """The target refused a request (address outside its registered buffers)."""

    code = ErrCode.ADDRESS_NOT_REGISTERED


class TransferTimeout(TransferError):
    code = ErrCode.SOCKET


class TransferFailed(TransferError):
    """Some requests of a transfer failed.

    ``errors[i]`` is None for request ``i`` if it succeeded, else its exception.
    ``code`` is the first failure's code.
    """

    def __init__(self, message: str, errors: list[BaseException | None]) -> None:
        first = next((e for e in errors if e is not None), None)
        super().__init__(message, code=getattr(first, "code", ErrCode.SOCKET))
        self.errors = errors


# --- device memory ------------------------------------------------------------------


class DeviceError(MooncakeError):
    """A device-memory (GPU) operation failed: a copy, an IPC handle, a registration."""

    code = ErrCode.MEMORY


class DeviceUnavailable(DeviceError, NotSupported):
    """Device memory was met but no device backend can serve it (no cuda-python, no GPU)."""

    code = ErrCode.DEVICE_NOT_FOUND


# --- store ------------------------------------------------------------------------


class StoreError(MooncakeError):
    """A store operation failed; ``code`` is the reference ``ErrorCode`` value."""

    code = -1  # INTERNAL_ERROR

    @property
    def name(self) -> str:
        from .store._types import ErrorCode

        try:
            return ErrorCode(self.code).name
        except ValueError:
            return str(self.code)


class ObjectNotFound(StoreError):
    code = -704


class ObjectExists(StoreError):
    code = -705


class ObjectHasLease(StoreError):
    code = -706


class LeaseExpired(StoreError):
    code = -707


class ReplicaNotReady(StoreError):
    code = -703


class NoAvailableHandle(StoreError):
    """No segment has room for the object, even after eviction."""

    code = -200


class InvalidParams(StoreError):
    code = -600


class StoreTransferFailed(StoreError):
    code = -800


class RpcFailed(StoreError):
    """The master could not be reached or did not answer."""

    code = -900


class RpcTimeout(RpcFailed):
    code = -901


_STORE_ERRORS: dict[int, type[StoreError]] = {
    cls.code: cls
    for cls in (
        ObjectNotFound,
        ObjectExists,
        ObjectHasLease,
        LeaseExpired,
        ReplicaNotReady,
        NoAvailableHandle,
        InvalidParams,
        StoreTransferFailed,
        RpcFailed,
        RpcTimeout,
    )
}


def store_error(code: int, message: str) -> StoreError:
    """The exception class for a store ``ErrorCode`` value."""
    cls = _STORE_ERRORS.get(code, StoreError)
    return cls(message, code=code)
