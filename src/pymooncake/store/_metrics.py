"""Store client metrics under the reference's names (``client_metric.h``).

=============================================  =========  ===========  ===================
name                                           type       labels       recorded
=============================================  =========  ===========  ===================
``mooncake_transfer_read_bytes``               counter                 bytes read (get*)
``mooncake_transfer_write_bytes``              counter                 bytes written, per replica
``mooncake_transfer_{get,put}_latency``        histogram               µs of one object's transfer
``mooncake_transfer_batch_{get,put}_latency``  histogram               µs of a batch's transfers
``mooncake_client_rpc_count``                  counter    rpc_name     every master RPC
``mooncake_client_rpc_latency``                histogram  rpc_name     µs, RPCs that got a reply
``mooncake_transfer_read_operation_*``         count, bytes, latency   per API (``op_name``)
``mooncake_transfer_write_operation_*``        count, bytes, latency   per API (``op_name``)
``mooncake_ssd_*``                             the SSD tier (enable_ssd_offload): files written, reads served
=============================================  =========  ===========  ===================

Latency buckets are the reference's ``kLatencyBucket`` (µs); every metric
carries ``cluster_id`` when ``MC_STORE_CLUSTER_ID`` is set.
:class:`ClientMetricsSettings.from_env` reads ``MC_STORE_CLIENT_METRIC``
(collection on/off, default on), ``MC_STORE_CLIENT_METRIC_INTERVAL`` (seconds
between summary log lines, 0 = none) and ``MC_STORE_CLIENT_METRIC_BANDWIDTH``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from .._metrics import (
    Counter,
    CounterFamily,
    CountOfFamily,
    Histogram,
    HistogramFamily,
    SummaryFamily,
    format_bytes,
    render,
)
from ..config import parse_bool_env
from ..errors import ConfigError

__all__ = ["LATENCY_BUCKETS_US", "ClientMetrics", "ClientMetricsSettings", "format_bytes"]

log = logging.getLogger("pymooncake.store.metrics")

#: reference kLatencyBucket (client_metric.h): fine below 1 ms, long tail to 20 s
LATENCY_BUCKETS_US: Final = (
    50, 75, 125, 150, 200, 250, 300, 400, 500, 750, 1000,
    1500, 2000, 3000, 5000, 7000, 15000, 20000,
    50000, 100000, 200000, 500000, 1000000, 2000000, 5000000, 10000000, 20000000,
)  # fmt: skip
#: reference kSsdLatencyBucket
SSD_BUCKETS_US: Final = (
    50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000,
    500000, 1000000, 2000000, 5000000, 10000000, 30000000,
)  # fmt: skip
#: the order in which the reference's summary lists RPCs; others follow by name
_RPC_ORDER: Final = (
    "GetReplicaList", "PutStart", "PutEnd", "PutRevoke", "ExistKey", "Remove", "RemoveAll",
    "MountSegment", "UnmountSegment", "GetFsdir", "BatchGetReplicaList", "BatchPutStart",
    "BatchPutEnd", "BatchPutRevoke", "MountLocalDiskSegment", "OffloadObjectHeartbeat",
    "NotifyOffloadSuccess",
)  # fmt: skip


@dataclass(frozen=True)
class ClientMetricsSettings:
    """Whether and how a store client collects metrics (reference environment names).

    Attributes:
        enabled: MC_STORE_CLIENT_METRIC (default on; unparsable = off, as the reference).
        interval_s: MC_STORE_CLIENT_METRIC_INTERVAL: log the summary this often (0 = never).
        bandwidth: MC_STORE_CLIENT_METRIC_BANDWIDTH: throughput lines in the summary.
        cluster_id: MC_STORE_CLUSTER_ID: a ``cluster_id`` label on every metric.
    """

    enabled: bool = True
    interval_s: int = 0
    bandwidth: bool = True
    cluster_id: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ClientMetricsSettings:
        """Read the variables; unusable values fall back (logged), never raise."""
        enabled = True
        raw = env.get("MC_STORE_CLIENT_METRIC")
        if raw is not None:
            try:
                enabled = parse_bool_env("MC_STORE_CLIENT_METRIC", raw)
            except ConfigError:
                enabled = False
        interval = 0
        raw = env.get("MC_STORE_CLIENT_METRIC_INTERVAL", "").strip().lstrip("+")
        if raw:
            if raw.isdigit():
                interval = int(raw)
            else:
                log.warning(
                    "Failed to parse MC_STORE_CLIENT_METRIC_INTERVAL: %s, disabling metrics "
                    "reporting",
                    raw,
                )
        bandwidth = True
        raw = env.get("MC_STORE_CLIENT_METRIC_BANDWIDTH")
        if raw is not None:
            try:
                bandwidth = parse_bool_env("MC_STORE_CLIENT_METRIC_BANDWIDTH", raw)
            except ConfigError:
                log.warning(
                    "Failed to parse MC_STORE_CLIENT_METRIC_BANDWIDTH: %s, fallback to "
                    "default=true",
                    raw,
                )
        return cls(enabled, interval, bandwidth, env.get("MC_STORE_CLUSTER_ID", "").strip())


def _rate(value: float, suffix: str) -> str:
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value >= size:
            return f"{value / size:.2f} {unit}{suffix}"
    return f"{value:.2f} {suffix}"


def _bound(v: int | float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def latency_summary(hist: Histogram) -> str:
    """``count=N, p95<Xμs, max<Yμs`` from bucket counts, or ``No data``."""
    buckets, _total, count = hist.snapshot()
    if not count:
        return "No data"
    bounds = hist.bounds
    text = f"count={count}"
    # the smallest bucket holding 95 % of the observations (the reference rounds the
    # target down, so one observation reported "p95" below its own bucket)
    target, running = max(1, -(-count * 95 // 100)), 0
    for bound, n in zip(bounds, buckets, strict=False):
        running += n
        if running >= target:
            text += f", p95<{_bound(bound)}μs"
            break
    top = max((i for i, n in enumerate(buckets[: len(bounds)]) if n), default=None)
    if top is not None:
        text += f", max<{_bound(bounds[top])}μs"
    return text


class ClientMetrics:
    """A store client's metrics; cheap to record from any thread.

    Args:
        settings: cluster id label, bandwidth lines, reporting interval.
        clock: seconds since some start, for the average throughput lines.
    """

    def __init__(
        self,
        settings: ClientMetricsSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings = settings or ClientMetricsSettings()
        self._clock = clock
        self._started = clock()
        const = {"cluster_id": settings.cluster_id} if settings.cluster_id else {}

        def counter(name: str, help_text: str, labels: Sequence[str] = ()) -> CounterFamily:
            return CounterFamily(name, help_text, labels, const_labels=const)

        def histogram(
            name: str,
            help_text: str,
            labels: Sequence[str] = (),
            bounds: Sequence[int] = LATENCY_BUCKETS_US,
        ) -> HistogramFamily:
            return HistogramFamily(name, help_text, bounds, labels, const_labels=const)

        self.read_bytes_family = counter("mooncake_transfer_read_bytes", "Total bytes read")
        self.write_bytes_family = counter("mooncake_transfer_write_bytes", "Total bytes written")
        self.batch_put_family = histogram(
            "mooncake_transfer_batch_put_latency", "Batch Put transfer latency (us)"
        )
        self.batch_get_family = histogram(
            "mooncake_transfer_batch_get_latency", "Batch Get transfer latency (us)"
        )
        self.get_family = histogram("mooncake_transfer_get_latency", "Get transfer latency (us)")
        self.put_family = histogram("mooncake_transfer_put_latency", "Put transfer latency (us)")
        self.rpc_count = counter(
            "mooncake_client_rpc_count",
            "Total number of RPC calls made by the client",
            ["rpc_name"],
        )
        self.rpc_latency = histogram(
            "mooncake_client_rpc_latency",
            "Latency of RPC calls made by the client (in us)",
            ["rpc_name"],
        )
        op = ["op_name"]
        self.read_op_bytes = counter(
            "mooncake_transfer_read_operation_bytes", "Total read bytes by interface type", op
        )
        self.read_op_latency = histogram(
            "mooncake_transfer_read_operation_latency",
            "Read operation latency by interface type (us)",
            op,
        )
        # an operation's count is its latency histogram's count: one update fewer per call
        self.read_op_count = CountOfFamily(
            "mooncake_transfer_read_operation_count",
            "Total read operations by interface type",
            self.read_op_latency,
        )
        self.write_op_bytes = counter(
            "mooncake_transfer_write_operation_bytes", "Total write bytes by interface type", op
        )
        self.write_op_latency = histogram(
            "mooncake_transfer_write_operation_latency",
            "Write operation latency by interface type (us)",
            op,
        )
        self.write_op_count = CountOfFamily(
            "mooncake_transfer_write_operation_count",
            "Total write operations by interface type",
            self.write_op_latency,
        )
        self._ssd: list[CounterFamily | HistogramFamily | SummaryFamily] = [
            counter("mooncake_ssd_read_bytes_total", "Total bytes read from SSD"),
            counter("mooncake_ssd_write_bytes_total", "Total bytes written to SSD"),
            counter("mooncake_ssd_read_ops_total", "Total number of SSD read operations (key count)"),
            counter(
                "mooncake_ssd_write_ops_total", "Total number of SSD write operations (key count)"
            ),
            histogram(
                "mooncake_ssd_read_latency_us", "SSD BatchLoad latency per batch (us)",
                bounds=SSD_BUCKETS_US,
            ),
            histogram(
                "mooncake_ssd_write_latency_us", "SSD BatchOffload latency per batch (us)",
                bounds=SSD_BUCKETS_US,
            ),
            counter("mooncake_ssd_total_bytes_total", "Total bytes read and written to SSD"),
            counter("mooncake_ssd_total_ops_total", "Total number of SSD operations (key count)"),
            histogram(
                "mooncake_ssd_total_latency_us", "SSD total latency per batch (us)",
                bounds=SSD_BUCKETS_US,
            ),
            SummaryFamily(
                "mooncake_ssd_read_latency_summary_us", "SSD read latency quantiles (us)",
                const_labels=const,
            ),
            SummaryFamily(
                "mooncake_ssd_write_latency_summary_us", "SSD write latency quantiles (us)",
                const_labels=const,
            ),
            SummaryFamily(
                "mooncake_ssd_total_latency_summary_us", "SSD total latency quantiles (us)",
                const_labels=const,
            ),
        ]  # fmt: skip
        # the unlabelled children, fetched once (the hot path skips the family lookup)
        self.read_bytes: Counter = self.read_bytes_family.labels()
        self.write_bytes: Counter = self.write_bytes_family.labels()
        self.put_latency: Histogram = self.put_family.labels()
        self.get_latency: Histogram = self.get_family.labels()
        self.batch_put_latency: Histogram = self.batch_put_family.labels()
        self.batch_get_latency: Histogram = self.batch_get_family.labels()
        self._rpc: dict[str, tuple[Counter, Histogram]] = {}
        self._ops: dict[tuple[bool, str], tuple[Counter, Histogram]] = {}
        self._reporter: threading.Thread | None = None
        self._stop = threading.Event()

    # --- recording ------------------------------------------------------------------

    def rpc(self, name: str) -> tuple[Counter, Histogram]:
        """The (count, latency) children of RPC ``name`` (a ``MasterMethod`` works as
        is: its value becomes the ``rpc_name`` label)."""
        pair = self._rpc.get(name)
        if pair is None:
            label = str(getattr(name, "value", name))
            pair = self._rpc[name] = (self.rpc_count.labels(label), self.rpc_latency.labels(label))
        return pair

    def ssd(self, write: bool, nbytes: int, ops: int, latency_us: int) -> None:
        """One batch of the SSD tier: files written (offload) or read (served)."""
        fam = self._ssd
        rb, wb, ro, wo, rl, wl, tb, to, tl, rs, ws, ts = fam
        assert isinstance(rb, CounterFamily) and isinstance(wb, CounterFamily)
        assert isinstance(ro, CounterFamily) and isinstance(wo, CounterFamily)
        assert isinstance(tb, CounterFamily) and isinstance(to, CounterFamily)
        assert isinstance(rl, HistogramFamily) and isinstance(wl, HistogramFamily)
        assert isinstance(tl, HistogramFamily)
        assert isinstance(rs, SummaryFamily) and isinstance(ws, SummaryFamily)
        assert isinstance(ts, SummaryFamily)
        (wb if write else rb).labels().inc(nbytes)
        (wo if write else ro).labels().inc(ops)
        (wl if write else rl).labels().observe(latency_us)
        (ws if write else rs).labels().observe(latency_us)
        tb.labels().inc(nbytes)
        to.labels().inc(ops)
        tl.labels().observe(latency_us)
        ts.labels().observe(latency_us)

    def transfer(self, write: bool, nbytes: int, latency_us: int, batch: bool) -> None:
        """One transfer phase of a put/get (or a batch of them)."""
        if write:
            self.write_bytes.inc(nbytes)
            (self.batch_put_latency if batch else self.put_latency).observe(latency_us)
        else:
            self.read_bytes.inc(nbytes)
            (self.batch_get_latency if batch else self.get_latency).observe(latency_us)

    def operation(self, write: bool, op: str, nbytes: int, latency_us: int) -> None:
        """One API call (``op`` is the reference's op_name, e.g. ``put_from``)."""
        children = self._ops.get((write, op))
        if children is None:
            if write:
                bytes_f, latency_f = self.write_op_bytes, self.write_op_latency
            else:
                bytes_f, latency_f = self.read_op_bytes, self.read_op_latency
            children = self._ops[(write, op)] = (bytes_f.labels(op), latency_f.labels(op))
        children[0].inc(nbytes)
        children[1].observe(latency_us)

    # --- reading ------------------------------------------------------------------------

    def families(self) -> list[CounterFamily | HistogramFamily | SummaryFamily]:
        """In the reference's serialisation order: transfer, RPC, operations, SSD."""
        return [
            self.read_bytes_family,
            self.write_bytes_family,
            self.batch_put_family,
            self.batch_get_family,
            self.get_family,
            self.put_family,
            self.rpc_count,
            self.rpc_latency,
            self.read_op_count,
            self.read_op_bytes,
            self.read_op_latency,
            self.write_op_count,
            self.write_op_bytes,
            self.write_op_latency,
            *self._ssd,
        ]

    def render(self) -> str:
        """Prometheus text of every client metric."""
        return render(self.families())

    def summary(self) -> str:
        """The human-readable summary (the reference's ``/metrics/summary`` layout)."""
        elapsed = max(self._clock() - self._started, 1e-9)
        read, write = self.read_bytes.value, self.write_bytes.value
        lines = ["Client Metrics Summary", "=== Transfer Metrics Summary ==="]
        lines += [f"Total Read: {format_bytes(read)}", f"Total Write: {format_bytes(write)}"]
        if self.settings.bandwidth:
            lines.append(f"Average Read Throughput: {_rate(read / elapsed, 'B/s')}")
            lines.append(f"Average Write Throughput: {_rate(write / elapsed, 'B/s')}")
        lines += ["", "=== Latency Summary (microseconds) ==="]
        for title, hist in (
            ("Get", self.get_latency),
            ("Put", self.put_latency),
            ("Batch Get", self.batch_get_latency),
            ("Batch Put", self.batch_put_latency),
        ):
            lines.append(f"{title}: {latency_summary(hist)}")
        lines += ["", "=== RPC Metrics Summary ==="]
        rpcs = {values[-1]: child for values, child in self.rpc_latency.children()}
        order = [n for n in _RPC_ORDER if n in rpcs] + sorted(set(rpcs) - set(_RPC_ORDER))
        shown = [
            f"{name}: {latency_summary(rpcs[name])}" for name in order if rpcs[name].snapshot()[2]
        ]
        lines += shown or ["No RPC calls recorded"]
        lines += ["", "=== Interface Operation Metrics Summary ==="]
        for title, count_f, bytes_f, latency_f in (
            ("Read Interfaces", self.read_op_count, self.read_op_bytes, self.read_op_latency),
            ("Write Interfaces", self.write_op_count, self.write_op_bytes, self.write_op_latency),
        ):
            lines.append(f"{title}:")
            nbytes = {v[-1]: c.value for v, c in bytes_f.children()}
            lats = {v[-1]: c for v, c in latency_f.children()}
            rows = []
            for values, counter in count_f.children():
                op, n = values[-1], counter.value
                if n:
                    tail = latency_summary(lats[op]).removeprefix(f"count={n}")
                    rows.append(f"{op}: count={n}, bytes={format_bytes(nbytes[op])}{tail}")
            lines += rows or ["No data"]
        lines += [
            "",
            "=== SSD Metrics Summary ===",
            "SSD Read: 0 B, ops=0",
            "SSD Write: 0 B, ops=0",
            "SSD Total: 0 B, ops=0",
            "",
            "=== SSD Latency Summary (microseconds) ===",
            "Read: No data",
            "Write: No data",
            "Total: No data",
        ]
        return "\n".join(lines) + "\n"

    # --- periodic report -------------------------------------------------------------------

    def start_reporting(self, interval_s: float, logger: logging.Logger = log) -> None:
        """Log the summary every ``interval_s`` seconds on a daemon thread."""
        if interval_s <= 0 or self._reporter is not None:
            return
        last: list[float] = [self.read_bytes.value, self.write_bytes.value, self._clock()]

        def run() -> None:
            while not self._stop.wait(interval_s):
                now = self._clock()
                read, write = self.read_bytes.value, self.write_bytes.value
                span = max(now - last[2], 1e-9)
                report = "Client Metrics Report:\n" + self.summary()
                if self.settings.bandwidth:
                    report += (
                        "\n=== Interval Throughput Summary ===\n"
                        f"Read Throughput: {_rate((read - last[0]) / span, 'B/s')} "
                        f"({format_bytes(int(read - last[0]))} over {span:.2f}s)\n"
                        f"Write Throughput: {_rate((write - last[1]) / span, 'B/s')} "
                        f"({format_bytes(int(write - last[1]))} over {span:.2f}s)"
                    )
                last[:] = [read, write, now]
                logger.info("%s", report)

        self._reporter = threading.Thread(target=run, name="mc-client-metrics", daemon=True)
        self._reporter.start()

    def close(self) -> None:
        """Stop the periodic report (idempotent)."""
        self._stop.set()
        if self._reporter is not None:
            self._reporter.join(5)
            self._reporter = None
