"""asyncio face of the engine: awaitable transfers that never block the event loop.

The I/O runs on the engine's worker threads; the coroutine awaits a wrapped
``concurrent.futures.Future``.  Usable from any event loop, including several.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ..wire import NotifyMessage
from ._engine import TransferEngine
from ._request import TransferOpcode, TransferRequest

__all__ = ["AsyncTransferEngine"]


class AsyncTransferEngine:
    """Wraps a :class:`TransferEngine`; closing this closes the engine."""

    def __init__(self, engine: TransferEngine) -> None:
        self.engine = engine

    @property
    def segment_name(self) -> str:
        return self.engine.segment_name

    async def transfer(
        self,
        segment: str | int | None,
        requests: Sequence[TransferRequest],
        *,
        timeout_s: float | None = None,
    ) -> None:
        await asyncio.wrap_future(
            self.engine.submit_transfer(segment, requests, timeout_s=timeout_s)
        )

    async def write(
        self, segment: str | int, local: object, remote_addr: int, length: int | None = None
    ) -> None:
        await self.transfer(
            segment, [TransferRequest(TransferOpcode.WRITE, local, remote_addr, length)]
        )

    async def read(
        self, segment: str | int, local: object, remote_addr: int, length: int | None = None
    ) -> None:
        await self.transfer(
            segment, [TransferRequest(TransferOpcode.READ, local, remote_addr, length)]
        )

    async def send_notify(self, target: str | int, message: NotifyMessage) -> None:
        await asyncio.to_thread(self.engine.send_notify, target, message)

    async def probe(self, target: str | int) -> None:
        await asyncio.to_thread(self.engine.probe, target)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.engine.close)

    async def __aenter__(self) -> AsyncTransferEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
