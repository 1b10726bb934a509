"""``mooncake.engine``: the reference's Python TransferEngine API on pymooncake.

Names, positional-only arguments (``arg0..`` in the reference's pybind
signatures), keyword names where the reference has them, and return
conventions (0 / -1 / batch id 0 / negative ``ERR_*``) follow the reference
wheel ``mooncake-transfer-engine-non-cuda``.  Every failure is logged once
with its cause before the integer is returned.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
import time
import weakref
from enum import IntEnum
from typing import Any

from pymooncake._cascade import CascadeLog
from pymooncake.config import EngineConfig
from pymooncake.errors import ErrCode, InvalidArgument, MooncakeError
from pymooncake.transfer import TransferEngine as _NativeEngine
from pymooncake.transfer import TransferOpcode as _Op
from pymooncake.transfer import TransferRequest
from pymooncake.transfer.metadata import P2P_HANDSHAKE
from pymooncake.wire import NotifyMessage

from ._adapt import call_code, call_value, log

__all__ = [
    "SUPPORT_CUDA",
    "SUPPORT_EFA",
    "SUPPORT_HIP",
    "SUPPORT_INTRA_NVLINK",
    "SUPPORT_MNNVL",
    "SUPPORT_MUSA",
    "InnerTransferEngine",
    "Read",
    "TransferEngine",
    "TransferNotify",
    "TransferOpcode",
    "Write",
]

SUPPORT_CUDA = False
SUPPORT_EFA = False
SUPPORT_HIP = False
SUPPORT_MNNVL = False
SUPPORT_MUSA = False
SUPPORT_INTRA_NVLINK = False

#: protocols that only pick a GPU allocator in the reference; pure TCP here
_HARDWARE_PROTOCOLS = (
    "rdma",
    "efa",
    "cxi",
    "barex",
    "nvlink",
    "nvlink_intra",
    "hip",
    "musa",
    "maca",
    "ascend",
    "ubshmem",
    "sunrise_link",
)


class TransferOpcode(IntEnum):
    Read = 0
    Write = 1


Read = TransferOpcode.Read
Write = TransferOpcode.Write


class TransferNotify:
    """A notification: ``name`` and ``msg`` (reference ``TransferNotify``)."""

    def __init__(self, name: str = "", msg: str = "") -> None:
        self.name = name
        self.msg = msg

    def __repr__(self) -> str:
        return f"TransferNotify(name={self.name!r}, msg={self.msg!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TransferNotify) and (self.name, self.msg) == (
            other.name,
            other.msg,
        )

    __hash__ = None  # type: ignore[assignment]


class InnerTransferEngine:
    """Opaque handle to the engine (``get_engine()``); ``mooncake.store`` accepts it
    to reuse this engine instead of starting its own."""

    def __init__(self, engine: _NativeEngine) -> None:
        self.native = engine

    def __repr__(self) -> str:
        return f"<mooncake.engine.InnerTransferEngine {self.native.segment_name!r}>"


def _connection_string(metadata_server: str) -> str:
    text = metadata_server.strip()
    if text.upper() == P2P_HANDSHAKE or "://" in text:
        return text
    return f"etcd://{text}"


def _topology_json() -> str:
    """The priority matrix of a host without RDMA NICs, as jsoncpp's StyledWriter prints it."""
    nodes = sorted(
        int(os.path.basename(p)[4:]) for p in glob.glob("/sys/devices/system/node/node[0-9]*")
    ) or [0]
    entries = [f'\t"cpu:{n}" : \n\t[\n\t\t[],\n\t\t[]\n\t]' for n in nodes]
    return "{\n" + ",\n".join(entries) + "\n}\n"


class TransferEngine:
    """Reference-compatible transfer engine.  Construct, then :meth:`initialize`."""

    TransferOpcode = TransferOpcode

    def __init__(self) -> None:
        self._engine: _NativeEngine | None = None
        self._lock = threading.Lock()
        #: transfer failures, logged once per root cause (a dead peer fails every call)
        self._failures = CascadeLog(log)
        self._finalizer: weakref.finalize[[], TransferEngine] | None = None

    # --- set-up -----------------------------------------------------------------

    def initialize(
        self, local_hostname: str, metadata_server: str, protocol: str, device_name: str, /
    ) -> int:
        """Start the engine.  Returns 0, or -1 after logging the cause."""
        return self._init(local_hostname, _connection_string(metadata_server), protocol)

    def initialize_ext(
        self,
        local_hostname: str,
        metadata_server: str,
        protocol: str,
        device_name: str,
        metadata_type: str,
        /,
    ) -> int:
        conn = metadata_server.strip()
        if conn.upper() != P2P_HANDSHAKE and "://" not in conn and metadata_type:
            conn = f"{metadata_type}://{conn}"
        return self._init(local_hostname, _connection_string(conn), protocol)

    def _init(self, local_hostname: str, conn: str, protocol: str) -> int:
        if protocol == "xgmi":
            log.error("Protocol 'xgmi' is not exposed in the Python API; use 'hip' instead")
            return -1
        if protocol in _HARDWARE_PROTOCOLS:
            log.info(
                "protocol %r requested: pymooncake moves data over TCP (as a reference engine "
                "does on a host without RDMA NICs); peers must use TCP too",
                protocol,
            )
        with self._lock:
            if self._engine is not None:
                log.error("initialize called twice on one TransferEngine; create a new one")
                return -1

            def start() -> _NativeEngine:
                return _NativeEngine(local_hostname, conn, config=EngineConfig.from_env())

            engine = call_value(
                f"TransferEngine.initialize({local_hostname!r}, {conn!r})", start, None
            )
            if engine is None:
                return -1
            self._engine = engine
            self._finalizer = weakref.finalize(self, engine.close)
            return 0

    def _native(self) -> _NativeEngine:
        if self._engine is None:
            raise InvalidArgument("the TransferEngine is not initialized; call initialize() first")
        return self._engine

    def get_rpc_port(self) -> int:
        return self._engine.rpc_port if self._engine is not None else -1

    def get_engine(self) -> InnerTransferEngine | None:
        if self._engine is None:
            return None
        return InnerTransferEngine(self._engine)

    def get_engine_ptr(self) -> int:
        return id(self._engine) if self._engine is not None else 0

    def get_local_topology(self, device_name: str | None = None) -> str:
        return _topology_json()

    def warmup_efa_segment(self, segment_name: str) -> int:
        return 0

    # --- memory ------------------------------------------------------------------

    def allocate_managed_buffer(self, length: int, /) -> int:
        """Address of ``length`` fresh registered bytes, or 0."""

        def alloc() -> int:
            return self._native().allocate(length).addr

        return call_value(f"allocate_managed_buffer({length})", alloc, 0)

    def free_managed_buffer(self, buffer_addr: int, length: int, /) -> int:
        def free() -> None:
            self._native().free(buffer_addr)

        rc = call_code(f"free_managed_buffer({buffer_addr:#x})", free)
        return 0 if rc == 0 else -1

    def register_memory(self, buffer_addr: int, capacity: int, location: str = "*") -> int:
        return call_code(
            f"register_memory({buffer_addr:#x}, {capacity})",
            lambda: self._native().register(buffer_addr, capacity, location=location),
        )

    def unregister_memory(self, buffer_addr: int, /) -> int:
        return call_code(
            f"unregister_memory({buffer_addr:#x})", lambda: self._native().unregister(buffer_addr)
        )

    def batch_register_memory(
        self, buffer_addresses: list[int], capacities: list[int], location: str = "*"
    ) -> int:
        def reg() -> None:
            if len(buffer_addresses) != len(capacities):
                raise InvalidArgument(
                    f"{len(buffer_addresses)} addresses but {len(capacities)} capacities"
                )
            self._native().register_many(
                list(zip(buffer_addresses, capacities, strict=True)), location=location
            )

        return call_code("batch_register_memory", reg)

    def batch_unregister_memory(self, buffer_addresses: list[int], /) -> int:
        return call_code(
            "batch_unregister_memory", lambda: self._native().unregister_many(buffer_addresses)
        )

    def write_bytes_to_buffer(self, dest_address: int, src: bytes | str, length: int, /) -> int:
        data = src.encode() if isinstance(src, str) else bytes(src)
        if length < 0 or length > len(data):
            log.error(
                "write_bytes_to_buffer: length %d exceeds the %d bytes given", length, len(data)
            )
            return -1
        if dest_address <= 0:
            log.error("write_bytes_to_buffer: invalid address %#x", dest_address)
            return -1
        ctypes.memmove(dest_address, data, length)
        return 0

    def read_bytes_from_buffer(self, source_address: int, length: int, /) -> bytes:
        if length <= 0:
            return b""
        if source_address <= 0:
            log.error("read_bytes_from_buffer: invalid address %#x", source_address)
            return b""
        return ctypes.string_at(source_address, length)

    def get_first_buffer_address(self, segment_name: str, /) -> int:
        return call_value(
            f"get_first_buffer_address({segment_name!r})",
            lambda: self._native().first_buffer_address(segment_name),
            0,
        )

    # --- sync transfers -------------------------------------------------------------

    def _requests(
        self, opcode: int, buffers: list[int], peers: list[int], lengths: list[int]
    ) -> list[TransferRequest]:
        if not len(buffers) == len(peers) == len(lengths):
            raise InvalidArgument(
                f"buffers ({len(buffers)}), peer_buffer_addresses ({len(peers)}) and lengths "
                f"({len(lengths)}) differ in length"
            )
        op = _Op(int(opcode))
        return [
            TransferRequest(op, b, p, n) for b, p, n in zip(buffers, peers, lengths, strict=True)
        ]

    def _sync(
        self,
        what: str,
        target_hostname: str,
        requests_fn: Any,
        notify: TransferNotify | None,
    ) -> int:
        def run() -> None:
            eng = self._native()
            eng.transfer(target_hostname, requests_fn())
            if notify is not None:
                eng.send_notify(target_hostname, NotifyMessage(notify.name, notify.msg))

        return call_code(f"{what} to {target_hostname!r}", run, failure=-1, cascade=self._failures)

    def transfer_sync_write(
        self,
        target_hostname: str,
        buffer: int,
        peer_buffer_address: int,
        length: int,
        transport_hint: str = "",
    ) -> int:
        return self._sync(
            "transfer_sync_write",
            target_hostname,
            lambda: self._requests(1, [buffer], [peer_buffer_address], [length]),
            None,
        )

    def transfer_sync_read(
        self,
        target_hostname: str,
        buffer: int,
        peer_buffer_address: int,
        length: int,
        transport_hint: str = "",
    ) -> int:
        return self._sync(
            "transfer_sync_read",
            target_hostname,
            lambda: self._requests(0, [buffer], [peer_buffer_address], [length]),
            None,
        )

    def transfer_sync(
        self,
        target_hostname: str,
        buffer: int,
        peer_buffer_address: int,
        length: int,
        opcode: int,
        notify: TransferNotify | None = None,
        transport_hint: str = "",
    ) -> int:
        return self._sync(
            "transfer_sync",
            target_hostname,
            lambda: self._requests(opcode, [buffer], [peer_buffer_address], [length]),
            notify,
        )

    def batch_transfer_sync_write(
        self,
        target_hostname: str,
        buffers: list[int],
        peer_buffer_addresses: list[int],
        lengths: list[int],
        transport_hint: str = "",
    ) -> int:
        return self._sync(
            "batch_transfer_sync_write",
            target_hostname,
            lambda: self._requests(1, buffers, peer_buffer_addresses, lengths),
            None,
        )

    def batch_transfer_sync_read(
        self,
        target_hostname: str,
        buffers: list[int],
        peer_buffer_addresses: list[int],
        lengths: list[int],
        transport_hint: str = "",
    ) -> int:
        return self._sync(
            "batch_transfer_sync_read",
            target_hostname,
            lambda: self._requests(0, buffers, peer_buffer_addresses, lengths),
            None,
        )

    def batch_transfer_sync(
        self,
        target_hostname: str,
        buffers: list[int],
        peer_buffer_addresses: list[int],
        lengths: list[int],
        opcode: int,
        notify: TransferNotify | None = None,
        transport_hint: str = "",
    ) -> int:
        return self._sync(
            "batch_transfer_sync",
            target_hostname,
            lambda: self._requests(opcode, buffers, peer_buffer_addresses, lengths),
            notify,
        )

    # --- async transfers -------------------------------------------------------------

    def _submit(
        self,
        what: str,
        target_hostname: str,
        opcode: int,
        buffers: list[int],
        peers: list[int],
        lengths: list[int],
    ) -> int:
        def submit() -> int:
            eng = self._native()
            requests = self._requests(opcode, buffers, peers, lengths)
            batch_id = eng.allocate_batch(max(1, len(requests)))
            try:
                eng.submit(batch_id, requests, segment=target_hostname)
            except BaseException:
                eng.free_batch(batch_id)
                raise
            return batch_id

        return call_value(f"{what} to {target_hostname!r}", submit, 0, cascade=self._failures)

    def batch_transfer_async_write(
        self,
        target_hostname: str,
        buffers: list[int],
        peer_buffer_addresses: list[int],
        lengths: list[int],
        transport_hint: str = "",
    ) -> int:
        return self._submit(
            "batch_transfer_async_write",
            target_hostname,
            1,
            buffers,
            peer_buffer_addresses,
            lengths,
        )

    def batch_transfer_async_read(
        self,
        target_hostname: str,
        buffers: list[int],
        peer_buffer_addresses: list[int],
        lengths: list[int],
        transport_hint: str = "",
    ) -> int:
        return self._submit(
            "batch_transfer_async_read", target_hostname, 0, buffers, peer_buffer_addresses, lengths
        )

    def batch_transfer_async(
        self,
        target_hostname: str,
        buffers: list[int],
        peer_buffer_addresses: list[int],
        lengths: list[int],
        opcode: int,
        transport_hint: str = "",
    ) -> int:
        return self._submit(
            "batch_transfer_async",
            target_hostname,
            int(opcode),
            buffers,
            peer_buffer_addresses,
            lengths,
        )

    def transfer_submit_write(
        self,
        target_hostname: str,
        buffer: int,
        peer_buffer_address: int,
        length: int,
        transport_hint: str = "",
    ) -> int:
        return self._submit(
            "transfer_submit_write", target_hostname, 1, [buffer], [peer_buffer_address], [length]
        )

    def get_batch_transfer_status(self, batch_ids: list[int], /) -> int:
        """Wait for every batch; 0 if all completed, -1 on failure or timeout.
        The batches are freed either way."""
        if self._engine is None:
            return -1
        eng = self._engine
        failed = False
        for batch_id in batch_ids:
            try:
                batch = eng.batch(batch_id)
            except MooncakeError as exc:
                log.error("get_batch_transfer_status: %s", str(exc))
                failed = True
                continue
            total = sum(t.length for t in batch.tasks)
            started = min((t.submitted_at for t in batch.tasks), default=time.monotonic())
            deadline = started + eng.config.transfer_timeout_s + total * 1e-9
            # every batch is waited for (bounded by its deadline) so all can be freed
            if not batch.wait(max(0.0, deadline - time.monotonic())):
                log.error(
                    "Sync batch data transfer timeout: batch %d not done within %.1f s "
                    "(MC_TRANSFER_TIMEOUT)",
                    batch_id,
                    eng.config.transfer_timeout_s,
                )
                failed = True
                continue
            errors = [e for e in batch.errors() if e is not None]
            if errors:
                log.error("batch %d failed: %s", batch_id, str(errors[0]))
                failed = True
        for batch_id in batch_ids:
            try:
                batch = eng.batch(batch_id)
            except MooncakeError:
                continue
            if batch.finished:
                eng.free_batch(batch_id)
        return -1 if failed else 0

    def transfer_check_status(self, batch_id: int, /) -> int:
        """1 done (freed), 0 in progress, -1 failed (freed), -2 timed out."""
        if self._engine is None:
            return -1
        eng = self._engine
        try:
            status = eng.task_status(batch_id, 0)
        except MooncakeError as exc:
            log.error("transfer_check_status(%d): %s", batch_id, str(exc))
            return -1
        name = status.state.name
        if name in ("COMPLETED", "FAILED"):
            # the reference looks at task 0 only; free the batch when it can be freed
            try:
                eng.free_batch(batch_id)
            except MooncakeError:
                pass
            return 1 if name == "COMPLETED" else -1
        if name == "TIMEOUT":
            return -2
        return 0

    # --- notifications and probes -------------------------------------------------------

    def get_notifies(self) -> list[TransferNotify]:
        if self._engine is None:
            return []
        return [TransferNotify(n.name, n.notify_msg) for n in self._engine.get_notifies()]

    def send_probe(self, peer_server_name: str) -> int:
        if self._engine is None:
            return -1
        eng = self._engine
        rc = call_code(f"send_probe({peer_server_name!r})", lambda: eng.probe(peer_server_name))
        return rc if rc <= 0 else int(ErrCode.SOCKET)

    # --- extras (not in the reference) ---------------------------------------------------

    @property
    def native(self) -> _NativeEngine:
        """The underlying :class:`pymooncake.TransferEngine`."""
        return self._native()

    def close(self) -> None:
        """Shut the engine down now (the reference does this in its destructor)."""
        if self._finalizer is not None:
            self._finalizer()
        self._engine = None
        self._failures.flush()  # the counts of failure cascades not yet reported
