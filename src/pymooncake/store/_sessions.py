"""Put sessions: reserve objects, fill byte ranges of them, then publish.

The reference's ``batch_put_session_start`` / ``batch_put_from_multi_buffer_ranges``
/ ``batch_put_session_end`` / ``batch_put_session_revoke`` (SGLang's direct
linker) split a put's two phases across calls: *start* asks the master for
the replicas (``BatchPutStart``; the objects stay invisible), *ranges* write
any byte ranges into every replica (as often as needed, from any thread),
*end* publishes (``BatchPutEnd``) and *revoke* gives the space back
(``BatchPutRevoke``).  A key has at most one open session per client; end and
revoke wait for range writes still in flight.

Results are per key: a byte count or True for success, else the
:class:`~pymooncake.errors.StoreError` (the edge maps them to ints).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import (
    MalformedMessage,
    MooncakeError,
    StoreError,
    StoreTransferFailed,
    store_error,
)
from ..transfer import TransferRequest
from ..wire import _master_msgs as msg
from ._types import ErrorCode, ReplicaDesc, ReplicaStatus, ReplicateConfig

if TYPE_CHECKING:
    from ._client import StoreClient

__all__ = ["PutSessions"]


@dataclass
class _Session:
    replicas: list[ReplicaDesc]
    size: int
    writable: bool = True
    inflight: int = 0
    done: threading.Condition = field(default_factory=threading.Condition)


def _invalid(message: str) -> StoreError:
    return store_error(int(ErrorCode.INVALID_PARAMS), message)


class PutSessions:
    """Open put sessions of one client (thread-safe)."""

    def __init__(self, client: StoreClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}

    def start(
        self, keys: Sequence[str], sizes: Sequence[int], config: ReplicateConfig
    ) -> list[bool | StoreError]:
        """Reserve ``sizes[i]`` bytes for each key.  A key that exists already
        fails with OBJECT_ALREADY_EXISTS (a session never overwrites)."""
        if len(keys) != len(sizes):
            return [_invalid("keys and sizes differ in length")] * len(keys)
        out: list[bool | StoreError] = [True] * len(keys)
        todo: list[int] = []
        with self._lock:
            for i, key in enumerate(keys):
                if key in self._sessions:
                    out[i] = _invalid(f"a put session for {key!r} is already open")
                else:
                    todo.append(i)
        if not todo:
            return out
        client = self._client
        todo_sizes = tuple(int(sizes[i]) for i in todo)
        started = client.master.call(
            msg.BatchPutStart(
                client.client_id, tuple(keys[i] for i in todo), todo_sizes, config.to_params()
            )
        ).columns
        if len(started) != len(todo):
            raise MalformedMessage(f"the master answered {len(started)} of {len(todo)} keys")
        with self._lock:
            for n, (i, code, reps) in enumerate(
                zip(todo, started.code, started.replicas(), strict=True)
            ):
                if code == ErrorCode.REPLICA_IS_NOT_READY:
                    # another put is writing the key: the reference's code for it
                    code = int(ErrorCode.OBJECT_ALREADY_EXISTS)
                if code != 0:
                    out[i] = store_error(code, f"{keys[i]!r}: {started.message(n)}")
                    continue
                size = todo_sizes[n]
                self._sessions[keys[i]] = _Session(
                    [
                        ReplicaDesc(rid, ep, addr, size, ReplicaStatus.PROCESSING, sid)
                        for ep, addr, sid, rid in reps
                    ],
                    size,
                )
        return out

    def write_ranges(
        self, keys: Sequence[str], ranges: Sequence[Sequence[tuple[memoryview, int]]]
    ) -> list[int | StoreError]:
        """Write ``(view, object offset)`` ranges into every replica of each
        key's open session; results are the bytes written per key."""
        client = self._client
        out: list[int | StoreError] = [_invalid("no open put session")] * len(keys)
        taken: list[tuple[int, _Session]] = []
        with self._lock:
            for i, key in enumerate(keys):
                session = self._sessions.get(key)
                if session is None or not session.writable:
                    continue
                if any(
                    off < 0 or len(v) > session.size or off > session.size - len(v)
                    for v, off in ranges[i]
                ):
                    out[i] = _invalid(f"a range is outside the {session.size}-byte object {key!r}")
                    continue
                session.inflight += 1
                taken.append((i, session))
        try:
            per_endpoint: dict[str, list[tuple[int, TransferRequest]]] = {}
            errors: list[BaseException | None] = [None] * len(keys)
            for i, session in taken:
                for rep in session.replicas:
                    for view, off in ranges[i]:
                        client._route_parts(
                            i, rep.endpoint, rep.address + off, [view], True, per_endpoint, errors
                        )
            client._run_transfers(per_endpoint, errors)
            for i, _session in taken:
                err = errors[i]
                out[i] = (
                    sum(len(v) for v, _ in ranges[i])
                    if err is None
                    else StoreTransferFailed(f"writing ranges of {keys[i]!r} failed: {err}")
                )
        finally:
            for _i, session in taken:
                with session.done:
                    session.inflight -= 1
                    session.done.notify_all()
        return out

    def _seal(self, keys: Sequence[str]) -> tuple[list[int], list[bool | StoreError]]:
        """Stop new range writes to the keys' sessions and wait for those in flight."""
        out: list[bool | StoreError] = [_invalid("no open put session")] * len(keys)
        sealed: list[tuple[int, _Session]] = []
        with self._lock:
            for i, key in enumerate(keys):
                session = self._sessions.get(key)
                if session is not None:
                    session.writable = False
                    sealed.append((i, session))
        for _i, session in sealed:
            with session.done:
                while session.inflight:
                    session.done.wait()
        return [i for i, _ in sealed], out

    def _finish(
        self,
        keys: Sequence[str],
        method: type[msg.BatchPutEnd] | type[msg.BatchPutRevoke],
        ok_codes: tuple[int, ...],
    ) -> list[bool | StoreError]:
        sealed, out = self._seal(keys)
        if not sealed:
            return out
        client = self._client
        try:
            replies = client.master.call(method(client.client_id, tuple(keys[i] for i in sealed)))
        except MooncakeError as exc:  # state unknown at the master: keep the sessions
            err = (
                exc
                if isinstance(exc, StoreError)
                else store_error(int(ErrorCode.RPC_FAIL), str(exc))
            )
            for i in sealed:
                out[i] = err
            return out
        if len(replies.codes) != len(sealed):
            raise MalformedMessage(
                f"the master answered {len(replies.codes)} of {len(sealed)} keys"
            )
        with self._lock:
            for i, code, value in zip(sealed, replies.codes, replies.messages, strict=True):
                if code == 0 or code in ok_codes:
                    self._sessions.pop(keys[i], None)
                    out[i] = True
                else:  # kept for a retry of end / revoke
                    out[i] = store_error(code, f"{keys[i]!r}: {value}")
        return out

    def end(self, keys: Sequence[str]) -> list[bool | StoreError]:
        """Publish the objects (they become readable)."""
        return self._finish(keys, msg.BatchPutEnd, ())

    def revoke(self, keys: Sequence[str]) -> list[bool | StoreError]:
        """Drop the reservations (an object the master no longer knows counts as revoked)."""
        return self._finish(keys, msg.BatchPutRevoke, (int(ErrorCode.OBJECT_NOT_FOUND),))

    def close(self) -> None:
        """Revoke every open session (best effort; the client is closing)."""
        with self._lock:
            keys = list(self._sessions)
        if keys:
            try:
                self.revoke(keys)
            except MooncakeError:
                pass
