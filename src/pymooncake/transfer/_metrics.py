"""Transfer engine metrics, under the names of the reference's TENT engine
(``tent_metrics.h``; its classic engine exports none).

=================================  =========  ==========  =======================================
name                               type       labels      recorded per request
=================================  =========  ==========  =======================================
``tent_{read,write}_bytes_total``  counter    transport   bytes of requests that succeeded
``tent_{read,write}_requests_total``  counter transport   every request (success and failure)
``tent_{read,write}_failures_total``  counter transport   failed requests (no bytes counted)
``tent_{read,write}_latency_us``   histogram  transport   µs from submission to completion
``tent_{read,write}_size_bytes``   histogram  transport   request sizes
=================================  =========  ==========  =======================================

``transport`` is the transport that ran the request (``tcp``, ``shm``,
``local``).  A request's latency is its group's: the engine runs the requests
to one peer together and they complete together.  Buckets are TENT's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from .._metrics import (
    Counter,
    CounterFamily,
    Histogram,
    HistogramFamily,
    format_bytes,
    render,
)
from .transports import Slice

__all__ = ["EngineMetrics"]

#: TENT kLatencyBuckets (µs)
LATENCY_BUCKETS_US: Final = (100, 500, 1000, 5000, 10000, 50000, 100000, 500000, 1000000)
#: TENT kSizeBuckets (bytes)
SIZE_BUCKETS: Final = (
    1024, 4096, 16384, 65536, 262144, 1048576,
    4194304, 16777216, 67108864, 268435456, 1073741824,
)  # fmt: skip


class _Direction:
    """The children of one (transport, read/write) pair, fetched once."""

    __slots__ = ("bytes", "failures", "latency", "requests", "size")

    def __init__(self, m: EngineMetrics, op: str, transport: str) -> None:
        fam = m.read if op == "read" else m.write
        self.bytes: Counter = fam[0].labels(transport)
        self.requests: Counter = fam[1].labels(transport)
        self.failures: Counter = fam[2].labels(transport)
        self.latency: Histogram = fam[3].labels(transport)
        self.size: Histogram = fam[4].labels(transport)


class EngineMetrics:
    """One engine's transfer metrics; cheap to record from any thread."""

    def __init__(self) -> None:
        def families(
            op: str, verb: str
        ) -> tuple[CounterFamily, CounterFamily, CounterFamily, HistogramFamily, HistogramFamily]:
            t = ["transport"]
            return (
                CounterFamily(f"tent_{op}_bytes_total", f"Total bytes {verb} via TENT", t),
                CounterFamily(f"tent_{op}_requests_total", f"Total {op} requests via TENT", t),
                CounterFamily(f"tent_{op}_failures_total", f"Total {op} failures via TENT", t),
                HistogramFamily(
                    f"tent_{op}_latency_us",
                    f"{op.capitalize()} latency distribution in microseconds",
                    LATENCY_BUCKETS_US,
                    t,
                ),
                HistogramFamily(
                    f"tent_{op}_size_bytes",
                    f"{op.capitalize()} request size distribution in bytes",
                    SIZE_BUCKETS,
                    t,
                ),
            )

        self.read = families("read", "read")
        self.write = families("write", "written")
        self._dirs: dict[tuple[str, bool], _Direction] = {}

    def _direction(self, transport: str, write: bool) -> _Direction:
        d = self._dirs.get((transport, write))
        if d is None:
            d = self._dirs[(transport, write)] = _Direction(
                self, "write" if write else "read", transport
            )
        return d

    def record(
        self,
        transport: str,
        slices: Sequence[Slice],
        errors: Sequence[BaseException | None] | Mapping[int, BaseException | None],
        latency_us: int,
        *,
        base: int = 0,
    ) -> None:
        """Account for a group of requests run together.

        Args:
            transport: the transport's name.
            slices: the group's requests.
            errors: by request index (minus ``base``): None for success.
            latency_us: time from the group's start to its completion.
        """
        dirs = (self._direction(transport, False), self._direction(transport, True))
        tally = [[0, 0, 0], [0, 0, 0]]  # per direction: succeeded, failed, bytes succeeded
        for s in slices:
            n = len(s.local)
            w = s.is_write
            dirs[w].size.observe(n)
            t = tally[w]
            if errors[s.index - base] is None:
                t[0] += 1
                t[2] += n
            else:
                t[1] += 1
        for d, (ok, failed, ok_bytes) in zip(dirs, tally, strict=True):
            if ok or failed:
                d.requests.inc(ok + failed)
            if ok:
                d.bytes.inc(ok_bytes)
                d.latency.observe(latency_us, ok)
            if failed:
                d.failures.inc(failed)

    def families(self) -> list[CounterFamily | HistogramFamily]:
        return [*self.read, *self.write]

    def render(self) -> str:
        """Prometheus text of the engine's metrics."""
        return render(self.families())

    def summary(self) -> str:
        """One line per transport: ``tcp: Read: 1.00 MB (100 reqs, 2 fails) | Write: ...``."""
        lines = []
        transports = sorted(
            {v[0] for fam in (self.read[1], self.write[1]) for v, _ in fam.children()}
        )
        for t in transports:
            parts = []
            for title, fams in (("Read", self.read), ("Write", self.write)):
                parts.append(
                    f"{title}: {format_bytes(fams[0].labels(t).value)} "
                    f"({fams[1].labels(t).value} reqs, {fams[2].labels(t).value} fails)"
                )
            lines.append(f"{t}: " + " | ".join(parts))
        return "\n".join(lines) + ("\n" if lines else "")
