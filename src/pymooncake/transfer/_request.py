"""Transfer requests and task states (reference ``TransferRequest``/``TransferStatusEnum``)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

__all__ = ["TaskState", "TransferOpcode", "TransferRequest", "TransferStatus"]


class TransferOpcode(IntEnum):
    """READ = remote -> local, WRITE = local -> remote (reference values 0 / 1)."""

    READ = 0
    WRITE = 1


class TaskState(IntEnum):
    """Reference ``TransferStatusEnum`` (values 0..6)."""

    WAITING = 0
    PENDING = 1
    INVALID = 2
    CANCELED = 3
    COMPLETED = 4
    TIMEOUT = 5
    FAILED = 6

    @property
    def terminal(self) -> bool:
        return self in (
            TaskState.COMPLETED,
            TaskState.FAILED,
            TaskState.TIMEOUT,
            TaskState.CANCELED,
        )


@dataclass(frozen=True, slots=True)
class TransferStatus:
    state: TaskState
    transferred_bytes: int


@dataclass(frozen=True, slots=True)
class TransferRequest:
    """One contiguous transfer.

    Attributes:
        opcode: READ (remote -> local) or WRITE (local -> remote).
        local: an address (int) in this process or a buffer-protocol object.
        remote_addr: virtual address in the target segment.
        length: bytes to move; None means the whole ``local`` buffer.
        segment: target segment name or handle; None means the segment given
            to the call that submits the request.
    """

    opcode: TransferOpcode
    local: object
    remote_addr: int
    length: int | None = None
    segment: str | int | None = None

    @classmethod
    def write(
        cls,
        local: object,
        remote_addr: int,
        length: int | None = None,
        segment: str | int | None = None,
    ) -> TransferRequest:
        return cls(TransferOpcode.WRITE, local, remote_addr, length, segment)

    @classmethod
    def read(
        cls,
        local: object,
        remote_addr: int,
        length: int | None = None,
        segment: str | int | None = None,
    ) -> TransferRequest:
        return cls(TransferOpcode.READ, local, remote_addr, length, segment)
