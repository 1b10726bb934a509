"""Transfer engine metrics, under the names of the reference's TENT engine
(``tent_metrics.h``; its classic engine exports none).

========================================  =========  ==========  ================================
name                                      type       labels      recorded per request
========================================  =========  ==========  ================================
``tent_{read,write}_bytes_total``         counter    transport   bytes of requests that succeeded
``tent_{read,write}_requests_total``      counter    transport   every request (success, failure)
``tent_{read,write}_failures_total``      counter    transport   failed requests (no bytes)
``tent_{read,write}_latency_us``          histogram  transport   µs from submission to completion
``tent_{read,write}_size_bytes``          histogram  transport   request sizes
========================================  =========  ==========  ================================

``transport`` is the transport that ran the request (``tcp``, ``shm``,
``local``).  A request's latency is its group's: the engine runs the requests
to one peer together and they complete together.  Buckets are TENT's.

Theory of operation
-------------------
This is the engine's hot path (a 4 KiB transfer costs ~15 µs in all), so
each (transport, direction) keeps *one* per-thread cell holding all five
metrics (:class:`pymooncake._metrics.Cells`): a group's recording is one
thread-local lookup, a bisect per request size, one for the latency, and
integer adds -- no lock, no lost update.  The text is built at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping, Sequence
from typing import Final

from .._metrics import Cells, format_bytes, header, histogram_lines
from .transports import Slice

__all__ = ["EngineMetrics"]

#: TENT kLatencyBuckets (µs)
LATENCY_BUCKETS_US: Final = (100, 500, 1000, 5000, 10000, 50000, 100000, 500000, 1000000)
#: TENT kSizeBuckets (bytes)
SIZE_BUCKETS: Final = (
    1024, 4096, 16384, 65536, 262144, 1048576,
    4194304, 16777216, 67108864, 268435456, 1073741824,
)  # fmt: skip

# slots of a cell
_REQUESTS: Final = 0
_BYTES: Final = 1
_FAILURES: Final = 2
_LAT: Final = 3  # len(LATENCY_BUCKETS_US) + 1 bucket counts, then the sum
_LAT_SUM: Final = _LAT + len(LATENCY_BUCKETS_US) + 1
_SIZE: Final = _LAT_SUM + 1  # len(SIZE_BUCKETS) + 1 bucket counts, then the sum
_SIZE_SUM: Final = _SIZE + len(SIZE_BUCKETS) + 1
_WIDTH: Final = _SIZE_SUM + 1


class EngineMetrics:
    """One engine's transfer metrics; cheap to record from any thread."""

    def __init__(self) -> None:
        self._cells: dict[tuple[str, bool], Cells] = {}

    def _cell(self, transport: str, write: bool) -> list[int]:
        cells = self._cells.get((transport, write))
        if cells is None:
            cells = self._cells.setdefault((transport, write), Cells(_WIDTH))
        try:
            cell: list[int] = cells.local.cell
        except AttributeError:  # this thread's first write
            cell = cells.cell()
        return cell

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
        if not slices:
            return
        write = slices[0].is_write
        cell = self._cell(transport, write)
        sizes = SIZE_BUCKETS
        ok = ok_bytes = 0
        total = len(slices)
        for k, s in enumerate(slices):
            if s.is_write is not write:  # reads and writes in one group: account each apart
                rest = slices[k:]
                other = [x for x in rest if x.is_write is not write]
                self.record(transport, other, errors, latency_us, base=base)
                total -= len(other)
                for x in rest:
                    if x.is_write is write:
                        n = len(x.local) if x.device is None else x.device.nbytes
                        cell[_SIZE + bisect_left(sizes, n)] += 1
                        cell[_SIZE_SUM] += n
                        if errors[x.index - base] is None:
                            ok += 1
                            ok_bytes += n
                break
            n = len(s.local) if s.device is None else s.device.nbytes
            cell[_SIZE + bisect_left(sizes, n)] += 1
            cell[_SIZE_SUM] += n
            if errors[s.index - base] is None:
                ok += 1
                ok_bytes += n
        cell[_REQUESTS] += total
        if ok:
            cell[_BYTES] += ok_bytes
            cell[_LAT + bisect_left(LATENCY_BUCKETS_US, latency_us)] += ok
            cell[_LAT_SUM] += latency_us * ok
        if ok < total:
            cell[_FAILURES] += total - ok

    def totals(self) -> dict[tuple[str, bool], list[int]]:
        """(transport, write) -> summed slots."""
        return {key: cells.total() for key, cells in sorted(self._cells.items())}

    def value(self, name: str, transport: str) -> int:
        """A counter's value: ``name`` is ``{read,write}_{bytes,requests,failures}``."""
        op, _, what = name.partition("_")
        slot = {"bytes": _BYTES, "requests": _REQUESTS, "failures": _FAILURES}[what]
        cells = self._cells.get((transport, op == "write"))
        return cells.total()[slot] if cells is not None else 0

    def render(self) -> str:
        """Prometheus text of the engine's metrics."""
        totals = self.totals()
        out: list[str] = []
        t = ("transport",)
        for op, write, verb in (("read", False, "read"), ("write", True, "written")):
            rows = [(key[0], v) for key, v in totals.items() if key[1] is write]
            for what, slot, help_text in (
                ("bytes", _BYTES, f"Total bytes {verb} via TENT"),
                ("requests", _REQUESTS, f"Total {op} requests via TENT"),
                ("failures", _FAILURES, f"Total {op} failures via TENT"),
            ):
                name = f"tent_{op}_{what}_total"
                header(out, name, help_text, "counter")
                out += [f'{name}{{transport="{tr}"}} {v[slot]}' for tr, v in rows]
            name = f"tent_{op}_latency_us"
            header(
                out, name, f"{op.capitalize()} latency distribution in microseconds", "histogram"
            )
            for tr, v in rows:
                buckets = v[_LAT:_LAT_SUM]
                histogram_lines(out, name, t, (tr,), LATENCY_BUCKETS_US, buckets, v[_LAT_SUM])
            name = f"tent_{op}_size_bytes"
            header(out, name, f"{op.capitalize()} request size distribution in bytes", "histogram")
            for tr, v in rows:
                buckets = v[_SIZE:_SIZE_SUM]
                histogram_lines(out, name, t, (tr,), SIZE_BUCKETS, buckets, v[_SIZE_SUM])
        return "\n".join(out) + "\n"

    def summary(self) -> str:
        """One line per transport: ``tcp: Read: 1.00 MB (100 reqs, 2 fails) | Write: ...``."""
        totals = self.totals()
        lines = []
        for tr in sorted({key[0] for key in totals}):
            parts = []
            for title, write in (("Read", False), ("Write", True)):
                v = totals.get((tr, write), [0] * _WIDTH)
                parts.append(
                    f"{title}: {format_bytes(v[_BYTES])} ({v[_REQUESTS]} reqs, "
                    f"{v[_FAILURES]} fails)"
                )
            lines.append(f"{tr}: " + " | ".join(parts))
        return "\n".join(lines) + ("\n" if lines else "")
