"""Writes of the store client: two-phase puts and upserts, grouped per peer."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

from .._logging import RepeatLimiter
from ..errors import (
    InvalidParams,
    StoreError,
    StoreTransferFailed,
    store_error,
)
from ..transfer import TransferRequest
from ..wire import MasterMethod
from ._client_io import BATCH_OPS, ClientIO, M, Parts, _as_view, log, transfer_failed
from ._types import ErrorCode, ReplicaDesc, ReplicateConfig

__all__ = ["WriteOps"]

#: one line per set of unreachable segments, then every 100th repeat with the count
_unreachable_log = RepeatLimiter(log, every=100)
#: ReplicateConfig is immutable: one default serves every call
_DEFAULT_CONFIG = ReplicateConfig()


class WriteOps(ClientIO):
    """put / put_parts / put_from / put_many / upsert / upsert_many."""

    # ------------------------------------------------------------------------------
    # writes
    # ------------------------------------------------------------------------------

    def _write_batch(
        self,
        keys: Sequence[str],
        parts: Sequence[Parts],
        config: ReplicateConfig,
        upsert: bool,
        op: str = "put_batch",
    ) -> list[bool | StoreError]:
        """Two-phase write of many objects; True stored, False already existed.

        Objects whose replica landed on a peer that turned out to be unreachable
        (crashed, not yet expired by the master) are written once more, elsewhere.
        ``op`` names the API for the operation metrics (the reference's op_name).
        """
        self._check_open()
        started = time.perf_counter_ns()
        unreachable: set[str] = set()
        results = self._write_once(keys, parts, config, upsert, unreachable, op)
        retry = [i for i, r in enumerate(results) if isinstance(r, StoreTransferFailed)]
        if retry and unreachable:
            _unreachable_log(
                ",".join(sorted(unreachable)),
                logging.WARNING,
                "segment(s) %s unreachable (a peer died and the master has not expired it "
                "yet); writing %d object(s) elsewhere",
                sorted(unreachable),
                len(retry),
            )
            again = dataclasses.replace(
                config, excluded_segments=(*config.excluded_segments, *sorted(unreachable))
            )
            sub = self._write_once(
                [keys[i] for i in retry], [parts[i] for i in retry], again, upsert, set(), op
            )
            for i, r in zip(retry, sub, strict=True):
                results[i] = r
        if self.metrics is not None:
            stored = sum(sum(len(p) for p in parts[i]) for i, r in enumerate(results) if r is True)
            self.metrics.operation(True, op, stored, (time.perf_counter_ns() - started) // 1000)
        return results

    def _write_once(
        self,
        keys: Sequence[str],
        parts: Sequence[Parts],
        config: ReplicateConfig,
        upsert: bool,
        unreachable: set[str],
        op: str,
    ) -> list[bool | StoreError]:
        n = len(keys)
        results: list[bool | StoreError] = [True] * n
        sizes = [sum(len(p) for p in ps) for ps in parts]
        start, end, revoke = (
            (M.BATCH_UPSERT_START, M.BATCH_UPSERT_END, M.BATCH_UPSERT_REVOKE)
            if upsert
            else (M.BATCH_PUT_START, M.BATCH_PUT_END, M.BATCH_PUT_REVOKE)
        )
        if n == 1:  # the single-key RPCs are cheaper to encode
            single = M.UPSERT_START if upsert else M.PUT_START
            try:
                reps = self.master.call(
                    single,
                    {
                        "client_id": self.client_id,
                        "key": keys[0],
                        "size": sizes[0],
                        "config": config.to_wire(),
                    },
                )
                started: list[list[Any]] = [[0, reps]]
            except StoreError as exc:
                started = [[exc.code, exc.message]]
        else:
            started = self.master.call(
                start,
                {
                    "client_id": self.client_id,
                    "keys": list(keys),
                    "sizes": sizes,
                    "config": config.to_wire(),
                },
            )
        per_endpoint: dict[str, list[tuple[int, TransferRequest]]] = {}
        errors: list[BaseException | None] = [None] * n
        writing: list[int] = []
        copies: dict[int, int] = {}  # replicas written per object
        transfer_start = time.perf_counter_ns()
        for i, (code, value) in enumerate(started):
            if code == ErrorCode.OBJECT_ALREADY_EXISTS and not upsert:
                results[i] = False
                continue
            if code != 0:
                results[i] = store_error(code, f"{keys[i]!r}: {value}")
                continue
            writing.append(i)
            copies[i] = len(value)
            for r in value:
                rep = ReplicaDesc.from_wire(r)
                self._route_parts(
                    i, rep.endpoint, rep.address, parts[i], True, per_endpoint, errors
                )
        self._run_transfers(per_endpoint, errors, unreachable)
        good = [i for i in writing if errors[i] is None]
        bad = [i for i in writing if errors[i] is not None]
        if self.metrics is not None and writing:
            self.metrics.transfer(
                True,
                sum(sizes[i] * copies[i] for i in good),
                (time.perf_counter_ns() - transfer_start) // 1000,
                op in BATCH_OPS,
            )
        if n == 1 and good:  # the common single put: the plain RPC is cheapest
            single_end = M.UPSERT_END if upsert else M.PUT_END
            try:
                self.master.call(single_end, {"client_id": self.client_id, "key": keys[0]})
            except StoreError as exc:
                results[0] = exc
            return results
        finish: list[tuple[MasterMethod, dict[str, Any]]] = []
        if good:
            finish.append((end, {"client_id": self.client_id, "keys": [keys[i] for i in good]}))
        if bad:
            finish.append((revoke, {"client_id": self.client_id, "keys": [keys[i] for i in bad]}))
        replies = self.master.call_many(finish)
        if good:
            code, value = replies[0]
            if code != 0:
                raise store_error(code, str(value))
            for i, (c, v) in zip(good, value, strict=True):
                if c != 0:
                    results[i] = store_error(c, f"{keys[i]!r}: {v}")
        for i in bad:
            results[i] = transfer_failed(f"writing {keys[i]!r} failed: {errors[i]}", errors[i])
        return results

    @staticmethod
    def _raise_or(result: bool | StoreError) -> bool:
        if isinstance(result, StoreError):
            raise result
        return result

    def put(self, key: str, value: Any, config: ReplicateConfig | None = None) -> bool:
        """Store ``value`` (any buffer) under ``key``.

        Returns:
            True if stored, False if the key already existed (it is never overwritten).

        Raises:
            InvalidParams: empty key/value, or larger than local_buffer_size.
            NoAvailableHandle: no room in the pool, even after eviction.
            StoreTransferFailed: a replica's owner could not be written.
            RpcFailed: the master is unreachable.
        """
        return self._put_views(key, [_as_view(value)], config, "put")

    def put_parts(
        self, key: str, parts: Sequence[Any], config: ReplicateConfig | None = None
    ) -> bool:
        """Store the concatenation of ``parts`` (each a buffer) without joining them."""
        return self._put_views(key, [_as_view(p) for p in parts], config, "put_parts")

    def _put_views(self, key: str, views: Parts, config: ReplicateConfig | None, op: str) -> bool:
        self._bytes_api_limit(sum(len(v) for v in views), f"put {key!r}")
        return self._raise_or(
            self._write_batch([key], [views], config or _DEFAULT_CONFIG, False, op)[0]
        )

    def put_from(
        self, key: str, buffer: Any, size: int | None = None, config: ReplicateConfig | None = None
    ) -> bool:
        """Store ``size`` bytes from registered memory (an address or a buffer) without staging."""
        view = self.engine.local_view(buffer, size, writable=False)
        return self._raise_or(
            self._write_batch([key], [[view]], config or _DEFAULT_CONFIG, False, "put_from")[0]
        )

    def put_many(
        self,
        keys: Sequence[str],
        values: Sequence[Sequence[Any]],
        config: ReplicateConfig | None = None,
        *,
        bytes_api: bool = False,
    ) -> list[bool | StoreError]:
        """Store many objects; each value is a sequence of parts (buffers or
        ``(address, size)`` pairs).  Results per key: True, False (existed) or the error."""
        if len(keys) != len(values):
            raise InvalidParams(f"{len(keys)} keys but {len(values)} values")
        parts = [[self._part(p) for p in ps] for ps in values]
        if bytes_api:
            for k, ps in zip(keys, parts, strict=True):
                self._bytes_api_limit(sum(len(p) for p in ps), f"put {k!r}")
        op = "put_batch" if bytes_api else "batch_put_from"
        return self._write_batch(keys, parts, config or _DEFAULT_CONFIG, False, op)

    def _part(self, p: Any) -> memoryview:
        if isinstance(p, tuple):
            addr, size = p
            return self.engine.local_view(int(addr), int(size), writable=False)
        return _as_view(p)

    def upsert(self, key: str, value: Any, config: ReplicateConfig | None = None) -> None:
        """Insert or replace; readers see the old value until the new one is complete."""
        views = [_as_view(value)]
        self._bytes_api_limit(len(views[0]), f"upsert {key!r}")
        self._raise_or(
            self._write_batch([key], [views], config or _DEFAULT_CONFIG, True, "upsert")[0]
        )

    def upsert_many(
        self,
        keys: Sequence[str],
        values: Sequence[Sequence[Any]],
        config: ReplicateConfig | None = None,
    ) -> list[bool | StoreError]:
        if len(keys) != len(values):
            raise InvalidParams(f"{len(keys)} keys but {len(values)} values")
        pointers = bool(values) and bool(values[0]) and isinstance(values[0][0], tuple)
        parts = [[self._part(p) for p in ps] for ps in values]
        op = "batch_upsert_from" if pointers else "upsert_batch"
        return self._write_batch(keys, parts, config or _DEFAULT_CONFIG, True, op)
