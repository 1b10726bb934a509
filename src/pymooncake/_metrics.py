"""Counters and histograms for the hot path, rendered as Prometheus text.

Theory of operation
-------------------
Each metric child keeps one cell (a small list of ints) per thread that
writes to it, reached through a ``threading.local``: an increment is a
list-item add on the caller's own cell, so writers never contend and never
lose an update (a shared ``x += n`` can, between threads).  A thread's first
write registers its cell under a lock; readers sum the cells.  Cells of
threads that have ended are folded into a ``retired`` cell at read time, so a
program that starts many short threads does not grow without bound.

Histograms keep, per cell, one count per bucket (upper bounds inclusive, as
Prometheus' ``le``), the +Inf bucket and the sum; ``observe`` is a
``bisect`` plus two adds.  Values are integers (microseconds, bytes), as in
the reference (``ylt::metric`` histograms of ``int64``).

:func:`render` writes the text exposition format 0.0.4 (``# HELP``,
``# TYPE``, cumulative ``_bucket{le=...}``, ``_sum``, ``_count``).
"""

from __future__ import annotations

import threading
from bisect import bisect_left as _bisect_left
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, Generic, TypeVar

__all__ = [
    "Cells",
    "CountOfFamily",
    "Counter",
    "CounterFamily",
    "Histogram",
    "HistogramFamily",
    "Summary",
    "SummaryFamily",
    "format_bytes",
    "header",
    "histogram_lines",
    "render",
]


class Cells:
    """Per-thread integer cells of ``width`` slots, summed on read."""

    __slots__ = ("_cells", "_lock", "_retired", "_width", "local")

    def __init__(self, width: int) -> None:
        self._width = width
        #: ``local.cell`` is the calling thread's cell once it has written
        self.local = threading.local()
        self._lock = threading.Lock()
        self._cells: list[tuple[threading.Thread, list[int]]] = []
        self._retired = [0] * width

    def cell(self) -> list[int]:
        """The calling thread's cell (created on its first use)."""
        try:
            cell: list[int] = self.local.cell
        except AttributeError:
            cell = [0] * self._width
            with self._lock:
                self._cells.append((threading.current_thread(), cell))
            self.local.cell = cell
        return cell

    def total(self) -> list[int]:
        """Slot-wise sum over every thread's cell."""
        with self._lock:
            live = []
            for thread, cell in self._cells:
                if thread.is_alive():
                    live.append((thread, cell))
                else:  # the thread ended: no more writes to its cell
                    for i, v in enumerate(cell):
                        self._retired[i] += v
            self._cells = live
            out = list(self._retired)
            cells = [cell for _, cell in live]
        for cell in cells:
            for i, v in enumerate(cell):
                out[i] += v
        return out


def _labels_text(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    return "{" + ",".join(parts) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Counter:
    """A monotonically increasing integer."""

    __slots__ = ("_cells", "_local")

    def __init__(self) -> None:
        self._cells = Cells(1)
        self._local = self._cells.local

    def inc(self, n: int = 1) -> None:
        try:
            self._local.cell[0] += n
        except AttributeError:  # this thread's first write
            self._cells.cell()[0] += n

    @property
    def value(self) -> int:
        return self._cells.total()[0]


class Histogram:
    """Counts of observations per bucket, and their sum.

    Args:
        bounds: ascending upper bounds (inclusive); +Inf is implied.
    """

    __slots__ = ("_bounds", "_cells", "_local", "_n")

    def __init__(self, bounds: Sequence[int | float]) -> None:
        self._bounds = tuple(bounds)
        self._n = len(self._bounds)
        # slots: one per bound, +Inf, then the sum
        self._cells = Cells(self._n + 2)
        self._local = self._cells.local

    @property
    def bounds(self) -> tuple[int | float, ...]:
        return self._bounds

    def observe(self, value: int, times: int = 1) -> None:
        """Record ``value`` (``times`` observations of it)."""
        try:
            cell: list[int] = self._local.cell
        except AttributeError:  # this thread's first write
            cell = self._cells.cell()
        cell[_bisect_left(self._bounds, value)] += times
        cell[-1] += value * times

    def snapshot(self) -> tuple[list[int], int, int]:
        """(per-bucket counts including +Inf, not cumulative; sum; count)."""
        total = self._cells.total()
        buckets = total[: self._n + 1]
        return buckets, total[-1], sum(buckets)


class Summary:
    """Count and sum of observations (a Prometheus summary without quantiles)."""

    __slots__ = ("_cells",)

    def __init__(self) -> None:
        self._cells = Cells(2)

    def observe(self, value: int) -> None:
        cell = self._cells.cell()
        cell[0] += 1
        cell[1] += value

    def snapshot(self) -> tuple[int, int]:
        """(count, sum)."""
        count, total = self._cells.total()
        return count, total


M = TypeVar("M", Counter, Histogram, Summary)


class _Family(Generic[M]):
    """A metric name with label names and one child per label-value tuple."""

    kind: str = ""

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        *,
        const_labels: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.help = help_text
        self._const = dict(const_labels or {})
        self.const_labels: Mapping[str, str] = self._const
        self.labelnames = (*self._const, *labelnames)
        self._children: dict[tuple[str, ...], M] = {}
        self._lock = threading.Lock()
        self._labelled = bool(labelnames)

    def _start(self) -> None:
        """Unlabelled families have their one child from the start (rendered as 0)."""
        if not self._labelled:
            self._children[()] = self._new()

    def _new(self) -> M:
        raise NotImplementedError

    def labels(self, *values: str) -> M:
        """The child for these label values (created on first use)."""
        child = self._children.get(values)
        if child is None:
            with self._lock:
                child = self._children.setdefault(values, self._new())
        return child

    def children(self) -> list[tuple[tuple[str, ...], M]]:
        """(label values including constant labels, child), sorted by values."""
        with self._lock:
            items = list(self._children.items())
        const = tuple(self._const.values())
        return [(const + values, child) for values, child in sorted(items)]


class CounterFamily(_Family[Counter]):
    kind = "counter"

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        *,
        const_labels: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(name, help_text, labelnames, const_labels=const_labels)
        self._start()

    def _new(self) -> Counter:
        return Counter()


class _Snapshot(Counter):
    """A counter whose value was taken from elsewhere at read time."""

    __slots__ = ("_fixed",)

    def __init__(self, value: int) -> None:
        super().__init__()
        self._fixed = value

    @property
    def value(self) -> int:
        return self._fixed


class CountOfFamily(CounterFamily):
    """A counter family that is the observation count of a histogram family
    (the reference exports both; counting once saves an update per call)."""

    def __init__(self, name: str, help_text: str, source: HistogramFamily) -> None:
        super().__init__(name, help_text, source.labelnames[len(source.const_labels) :])
        self._const = dict(source.const_labels)
        self.labelnames = source.labelnames
        self._source = source

    def labels(self, *values: str) -> Counter:
        raise TypeError(f"{self.name} is derived from {self._source.name}; observe that instead")

    def children(self) -> list[tuple[tuple[str, ...], Counter]]:
        return [(values, _Snapshot(hist.snapshot()[2])) for values, hist in self._source.children()]


class HistogramFamily(_Family[Histogram]):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        bounds: Sequence[int | float],
        labelnames: Sequence[str] = (),
        *,
        const_labels: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(name, help_text, labelnames, const_labels=const_labels)
        self.bounds = tuple(bounds)
        self._start()

    def _new(self) -> Histogram:
        return Histogram(self.bounds)


class SummaryFamily(_Family[Summary]):
    kind = "summary"

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        *,
        const_labels: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(name, help_text, labelnames, const_labels=const_labels)
        self._start()

    def _new(self) -> Summary:
        return Summary()


_INF: Final = "+Inf"


def format_bytes(n: int) -> str:
    """``1.50 MB`` style (binary multiples, two decimals; plain bytes below 1 KB), as
    the reference's ``byte_size_to_string``."""
    for unit, size in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _number(v: int | float) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def header(out: list[str], name: str, help_text: str, kind: str) -> None:
    """The ``# HELP`` and ``# TYPE`` lines of a family."""
    escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    out.append(f"# HELP {name} {escaped}")
    out.append(f"# TYPE {name} {kind}")


def histogram_lines(
    out: list[str],
    name: str,
    names: Sequence[str],
    values: Sequence[str],
    bounds: Sequence[int | float],
    buckets: Sequence[int],
    total: int,
) -> None:
    """``_bucket`` (cumulative), ``_sum`` and ``_count`` lines of one histogram child;
    ``buckets`` are per-bucket counts, the last one +Inf."""
    running = 0
    le_names = (*names, "le")
    for bound, n in zip((*bounds, _INF), buckets, strict=True):
        running += n
        le = bound if isinstance(bound, str) else _number(bound)
        out.append(f"{name}_bucket{_labels_text(le_names, (*values, le))} {running}")
    labels = _labels_text(names, values)
    out.append(f"{name}_sum{labels} {total}")
    out.append(f"{name}_count{labels} {running}")


def render(families: Iterable[_Family[Counter] | _Family[Histogram] | _Family[Summary]]) -> str:
    """Prometheus text format 0.0.4 of ``families`` (children in label order)."""
    out: list[str] = []
    for fam in families:
        header(out, fam.name, fam.help, fam.kind)
        names = fam.labelnames
        for values, child in fam.children():
            labels = _labels_text(names, values)
            if isinstance(child, Counter):
                out.append(f"{fam.name}{labels} {child.value}")
            elif isinstance(child, Histogram):
                buckets, total, _count = child.snapshot()
                histogram_lines(out, fam.name, names, values, child.bounds, buckets, total)
            else:
                count, total = child.snapshot()
                out.append(f"{fam.name}_sum{labels} {total}")
                out.append(f"{fam.name}_count{labels} {count}")
    return "\n".join(out) + "\n"
