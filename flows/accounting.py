"""Traffic accounting: messages and bytes per flow, stage and device.

Counters live in a Prometheus registry (served on ``/metrics`` when
``metrics_listen`` is configured); the reduction report is read back from the
same counters, so what is printed and what is scraped cannot disagree.
Counting happens once per Bytewax batch, not per item.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import bytewax.operators as op
from bytewax.dataflow import Stream
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from connectors.devices.journal_source import JournalSource, journal_depth
from flows.ingest_stats import read_snapshot

__all__ = [
    "FlowReport",
    "IngestCollector",
    "JournalCollector",
    "Meter",
    "counted",
    "ratio_text",
    "report",
]

X = TypeVar("X")

log = logging.getLogger("edgesieve.run")

RECEIVED = "received"
MAX_DEVICE_LABELS: Final = 1000
"""Devices a flow counts under their own name; the devices seen after them share
:data:`OTHER_DEVICES`, so a gateway reporting for ever new child devices cannot grow the
counters (and the ``device`` label values on ``/metrics``) without bound."""
OTHER_DEVICES: Final = "<other>"


class Meter:
    """Counters of one flow, exported through a (possibly shared) Prometheus registry.

    Counting is plain dictionary arithmetic under one lock per batch; Prometheus
    reads the tallies only when scraped or reported.
    """

    def __init__(self, flow: str, registry: CollectorRegistry | None = None) -> None:
        self.flow = flow
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._messages: Tally[tuple[str, str]] = Tally()
        self._bytes: Tally[tuple[str, str]] = Tally()
        self._rows: Tally[str] = Tally()
        self._file_bytes: Tally[str] = Tally()
        self._wire_rows: Tally[str] = Tally()
        self._wire_bytes: Tally[str] = Tally()
        self.totals: Tally[str] = Tally()
        """Records per stage summed over devices: a cheap progress view of the counters."""
        self._unclaimed_raw = 0
        self._named: set[str] = set()
        """Devices counted under their own name (at most MAX_DEVICE_LABELS)."""
        self.registry.register(_MeterCollector(self))
        self._family: list[Meter] = [self]

    def sibling(self, flow: str) -> Meter:
        """A meter for another flow in the same run, sharing this one's registry."""
        meter = Meter(flow, self.registry)
        meter._family = self._family
        self._family.append(meter)
        return meter

    def family(self) -> list[Meter]:
        """The meter and its siblings, in creation order."""
        return list(self._family)

    def add(
        self, stage: str, counts: Mapping[str, int], sizes: Mapping[str, int] | None = None
    ) -> None:
        """Add per-device record counts (and payload bytes) for one stage."""
        with self._lock:
            self.totals[stage] += sum(counts.values())
            label = self._label
            for device, n in counts.items():
                self._messages[stage, label(device)] += n
            for device, n in (sizes or {}).items():
                self._bytes[stage, label(device)] += n
            if stage == RECEIVED and sizes:
                self._unclaimed_raw += sum(sizes.values())

    def _label(self, device: str) -> str:
        """``device``, or :data:`OTHER_DEVICES` once MAX_DEVICE_LABELS are named (lock held)."""
        named = self._named
        if device in named:
            return device
        if len(named) < MAX_DEVICE_LABELS:
            named.add(device)
            return device
        return OTHER_DEVICES

    def claim_raw_bytes(self) -> int:
        """Device bytes received since the last claim (a sealed cloud batch stands for them)."""
        with self._lock:
            claimed, self._unclaimed_raw = self._unclaimed_raw, 0
            return claimed

    def on_file(self, stream: str, rows: int, nbytes: int) -> None:
        """Record one published output file; matches ``ParquetSink``'s ``on_write``."""
        with self._lock:
            self._rows[stream] += rows
            self._file_bytes[stream] += nbytes

    def on_wire(self, stream: str, rows: int, nbytes: int) -> None:
        """Record one batch sealed for the cloud: ``nbytes`` is its serialized gRPC message."""
        with self._lock:
            self._wire_rows[stream] += rows
            self._wire_bytes[stream] += nbytes

    def snapshot(self) -> dict[str, dict]:
        """A consistent copy of every tally."""
        with self._lock:
            return {
                "messages": dict(self._messages),
                "bytes": dict(self._bytes),
                "rows": dict(self._rows),
                "file_bytes": dict(self._file_bytes),
                "wire_rows": dict(self._wire_rows),
                "wire_bytes": dict(self._wire_bytes),
            }


class _MeterCollector(Collector):
    """Exports a :class:`Meter`'s tallies as Prometheus counters."""

    def __init__(self, meter: Meter) -> None:
        self._meter = meter

    def collect(self) -> Iterator[CounterMetricFamily]:
        flow = self._meter.flow
        snap = self._meter.snapshot()
        families = (
            (
                "edgesieve_messages",
                "Records per flow stage and device",
                ["flow", "stage", "device"],
                snap["messages"],
            ),
            (
                "edgesieve_bytes",
                "Device payload bytes per flow stage and device",
                ["flow", "stage", "device"],
                snap["bytes"],
            ),
            (
                "edgesieve_output_rows",
                "Rows published to local files per stream",
                ["flow", "stream"],
                snap["rows"],
            ),
            (
                "edgesieve_output_bytes",
                "Bytes of local files published per stream",
                ["flow", "stream"],
                snap["file_bytes"],
            ),
        )
        for name, doc, labels, tally in families:
            family = CounterMetricFamily(name, doc, labels=labels)
            for key, value in tally.items():
                parts = key if isinstance(key, tuple) else (key,)
                family.add_metric([flow, *parts], value)
            yield family


class JournalCollector(Collector):
    """The ingest journal's depth and the flow's lag behind it, as Prometheus gauges."""

    def __init__(self, source: JournalSource) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Read the journal's files and the source's progress at scrape time."""
        messages, nbytes = journal_depth(self._source.root)
        gauges = (
            ("edgesieve_journal_messages", "Messages the ingest journal holds", messages),
            ("edgesieve_journal_bytes", "Payload bytes the ingest journal holds", nbytes),
            (
                "edgesieve_journal_lag_messages",
                "Messages committed to the journal that the flow has not read yet",
                self._source.lag,
            ),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)


_INGEST_COUNTERS = (
    ("edgesieve_journal_commits", "Group commits of the ingest journal", "commits"),
    (
        "edgesieve_journal_duplicates",
        "Redelivered messages (MQTT DUP, CoAP retransmission) the journal stored once",
        "duplicates",
    ),
    (
        "edgesieve_journal_refused",
        "Submissions the journal refused (over journal.max_bytes or its queue bound)",
        "journal_refused",
    ),
    (
        "edgesieve_ingest_refused",
        "HTTP and CoAP messages refused with 503 / 5.03 (journal push-back, stopping) "
        "or found too large once read",
        "refused",
    ),
    (
        "edgesieve_mqtt_acks_withheld",
        "MQTT messages whose PUBACK was withheld because the journal was full",
        "mqtt_withheld",
    ),
    ("edgesieve_mqtt_acked", "MQTT messages acknowledged after their journal commit", "mqtt_acked"),
    (
        "edgesieve_mqtt_server_refused_connections",
        "ThingsBoard MQTT endpoint: CONNECTs refused (unknown token, too many connections)",
        "mqtt_server_refused_connections",
    ),
    (
        "edgesieve_mqtt_server_keepalive_timeouts",
        "ThingsBoard MQTT endpoint: connections closed after 1.5 x keepalive of silence",
        "mqtt_server_keepalive_timeouts",
    ),
    (
        "edgesieve_journal_refused_share",
        "Messages refused because their device held its journal.device_share",
        "refused_share",
    ),
    (
        "edgesieve_journal_over_share",
        "MQTT messages journaled over their device's share while the reserve lasted",
        "over_share",
    ),
    (
        "edgesieve_http_client_aborted",
        "HTTP requests whose client closed the connection mid-body (nothing stored)",
        "client_aborted",
    ),
)


class IngestCollector(Collector):
    """The ingest process's counters (its stats snapshot) and restarts, read at scrape time.

    See :mod:`flows.ingest_stats`. Without a snapshot (ingest not started yet)
    only ``edgesieve_ingest_up`` (0) and the restarts are exported.
    """

    def __init__(self, root: Path, restarts: Callable[[], int]) -> None:
        self._root = Path(root)
        self._restarts = restarts

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Read ``ingest-stats.json`` under the journal directory."""
        snap = read_snapshot(self._root)
        yield GaugeMetricFamily(
            "edgesieve_ingest_up",
            "1 when the ingest process is running and its stats are fresh; 0: stale or stopped",
            value=1 if snap is not None and snap["up"] else 0,
        )
        yield CounterMetricFamily(
            "edgesieve_ingest_restarts",
            "Times the ingest process was started again after it died",
            value=self._restarts(),
        )
        if snap is None:
            return
        yield GaugeMetricFamily(
            "edgesieve_ingest_stats_age_seconds",
            "Seconds since the ingest process wrote the stats exported here",
            value=snap["age_s"],
        )
        journal = snap["journal"]
        yield GaugeMetricFamily(
            "edgesieve_journal_oldest_age_seconds",
            "Age of the oldest message the ingest journal holds (0 when empty)",
            value=journal["oldest_age_s"],
        )
        yield GaugeMetricFamily(
            "edgesieve_journal_queued_messages",
            "Messages waiting for the journal's writer to commit them",
            value=journal["queued"],
        )
        yield GaugeMetricFamily(
            "edgesieve_mqtt_withheld_messages",
            "MQTT messages waiting, unacknowledged, for room in the journal",
            value=snap.get("mqtt_withheld_now", 0),
        )
        yield GaugeMetricFamily(
            "edgesieve_mqtt_server_connections",
            "ThingsBoard MQTT endpoint: devices and gateways connected now",
            value=snap.get("mqtt_server_connections", 0),
        )
        for name, doc, key in _INGEST_COUNTERS:
            yield CounterMetricFamily(name, doc, value=snap.get(key, 0))
        hist = snap["commit_seconds"]
        cumulative, buckets = 0, []
        bounds = [*hist["buckets"], float("inf")]
        for bound, n in zip(bounds, hist["counts"], strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        yield HistogramMetricFamily(
            "edgesieve_journal_commit_seconds",
            "Journal group commits by their first message's wait, submission to durable commit",
            buckets=buckets,
            sum_value=hist["sum"],
        )


def counted(
    step_id: str,
    up: Stream[X],
    meter: Meter,
    stage: str,
    device: Callable[[X], str],
    size: Callable[[X], int] | None = None,
) -> Stream[X]:
    """Pass ``up`` through unchanged, counting each batch per device."""

    def tally(batch: list[X]) -> list[X]:
        devices = [device(x) for x in batch]
        sizes: Tally[str] | None = None
        if size is not None:
            sizes = Tally()
            for d, x in zip(devices, batch, strict=True):
                sizes[d] += size(x)
        meter.add(stage, Tally(devices), sizes)
        return batch

    return op.flat_map_batch(step_id, up, tally)


@dataclass
class FlowReport:
    """What one flow received and produced; ``ratio`` is raw bytes / output bytes."""

    flow: str
    messages_in: int = 0
    raw_bytes: int = 0
    stages: dict[str, int] = field(default_factory=dict)
    output_rows: dict[str, int] = field(default_factory=dict)
    output_bytes: dict[str, int] = field(default_factory=dict)
    wire_rows: dict[str, int] = field(default_factory=dict)
    wire_bytes: dict[str, int] = field(default_factory=dict)
    devices: dict[str, dict[str, int]] = field(default_factory=dict)
    journal_messages: int | None = None
    """Messages left in the ingest journal (None when the flow does not read one)."""
    journal_bytes: int | None = None
    """Payload bytes left in the ingest journal."""
    journal_lag: int | None = None
    """Messages committed to the journal that the flow had not read."""
    journal_oldest_age_s: float | None = None
    """Age of the oldest message left in the journal (None without ingest stats)."""
    journal_commits: int | None = None
    """Group commits of the journal in this run."""
    journal_commit_p50_ms: float | None = None
    """Median commit latency of the last ingest process (the journal's own figure)."""
    journal_commit_p99_ms: float | None = None
    """99th percentile commit latency of the last ingest process."""
    duplicates: int | None = None
    """Redelivered messages (MQTT DUP, CoAP retransmissions) stored once."""
    refused: int | None = None
    """HTTP/CoAP messages refused by the ingress (503 / 5.03 push-back, too large once read)."""
    acks_withheld: int | None = None
    """MQTT messages whose PUBACK was withheld while the journal was full."""
    ingest_restarts: int | None = None
    """Times the ingest process was started again after it died."""

    def reduced_bytes(self, exclude: Iterable[str] = ("dead_letters", "raw_readings")) -> int:
        """Bytes of the reduced output streams (dead letters and raw readings are not reduction)."""
        skip = set(exclude)
        return sum(n for s, n in self.output_bytes.items() if s not in skip)

    @property
    def ratio(self) -> float | None:
        """Raw device bytes per output byte, or None before anything was written."""
        out = self.reduced_bytes()
        return self.raw_bytes / out if out else None

    @property
    def idle(self) -> bool:
        """Whether the flow received, processed and wrote nothing in this run."""
        return not (
            self.messages_in
            or any(self.stages.values())
            or any(self.output_rows.values())
            or any(self.wire_rows.values())
        )

    @property
    def wire_ratio(self) -> float | None:
        """Raw device bytes per byte sent to the cloud, if any was."""
        wire = sum(self.wire_bytes.values())
        return self.raw_bytes / wire if wire else None

    def to_json(self) -> str:
        """The report as JSON (for ``data_dir/report.json``)."""
        body = {**asdict(self), "ratio": self.ratio, "wire_ratio": self.wire_ratio}
        return json.dumps(body, indent=2, sort_keys=True)

    def write(self, path: Path) -> bool:
        """Write the JSON report atomically (temporary file, fsync, rename); return whether it was.

        When it cannot be written (a full disk, say) the temporary file is
        removed, one warning is logged and the previous report stays as it was.
        """
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("w", encoding="utf-8") as fh:
                fh.write(self.to_json())
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning(
                "report: %s not written (%s); the report is printed only; hint: free space "
                "or fix the permissions of %s",
                path,
                exc.strerror or exc,
                path.parent,
            )
            return False
        return True

    def render(self) -> str:
        """A short human-readable summary."""
        if self.idle:
            lines = [f"flow {self.flow}: no device messages in this run, nothing written"]
            return "\n".join(lines + self._journal_lines())
        lines = [f"flow {self.flow}: {self.messages_in} messages, {self.raw_bytes} raw bytes in"]
        for stage, n in sorted(self.stages.items()):
            lines.append(f"  stage {stage:<20} {n:>10} records")
        for stream in sorted(self.output_rows):
            rows, nbytes = self.output_rows[stream], self.output_bytes.get(stream, 0)
            lines.append(f"  out   {stream:<20} {rows:>10} rows {nbytes:>12} bytes")
        for stream in sorted(self.wire_rows):
            rows, nbytes = self.wire_rows[stream], self.wire_bytes.get(stream, 0)
            lines.append(f"  cloud {stream:<20} {rows:>10} rows {nbytes:>12} wire bytes")
        ratio = self.ratio
        shown = ratio_text(ratio) if ratio is not None else "n/a (nothing written yet)"
        lines.append(f"  reduction (raw bytes / local output bytes): {shown}")
        wire = self.wire_ratio
        if wire is not None:
            lines.append(f"  reduction (raw bytes / wire bytes to the cloud): {ratio_text(wire)}")
        return "\n".join(lines + self._journal_lines())

    def _journal_lines(self) -> list[str]:
        lines = []
        if self.journal_messages is not None:
            lines.append(
                f"  journal: {self.journal_messages} messages, {self.journal_bytes} bytes held, "
                f"{self.journal_lag} not read by the flow"
            )
        if self.journal_commits is not None:
            lines.append(
                f"  ingest: {self.journal_commits} commits (p50 "
                f"{self.journal_commit_p50_ms:.1f} ms, p99 {self.journal_commit_p99_ms:.1f} ms), "
                f"oldest held {self.journal_oldest_age_s:.1f} s, "
                f"{self.duplicates} duplicates stored once, "
                f"{self.refused} refused, {self.acks_withheld} MQTT acks withheld, "
                f"{self.ingest_restarts} restarts"
            )
        return lines


def ratio_text(ratio: float) -> str:
    """``1,012:1`` for large ratios, three significant digits below 100."""
    return f"{ratio:,.0f}:1" if ratio >= 100 else f"{ratio:.3g}:1"


def report(
    meter: Meter,
    journal: JournalSource | None = None,
    *,
    ingest: Mapping[str, Any] | None = None,
    restarts: int = 0,
) -> FlowReport:
    """Read the flow's tallies (and where it stands in its ``journal``) into a report.

    ``ingest`` is the ingest process's stats snapshot (:func:`flows.ingest_stats.read_snapshot`),
    ``restarts`` how often the ingest process was restarted.
    """
    snap = meter.snapshot()
    rep = FlowReport(meter.flow)
    if journal is not None:
        rep.journal_messages, rep.journal_bytes = journal_depth(journal.root)
        rep.journal_lag = journal.lag
    if ingest is not None:
        stats = ingest["journal"]
        rep.journal_oldest_age_s = float(stats["oldest_age_s"])
        rep.journal_commits = int(ingest["commits"])
        rep.journal_commit_p50_ms = float(stats["commit_p50_ms"])
        rep.journal_commit_p99_ms = float(stats["commit_p99_ms"])
        rep.duplicates = int(ingest["duplicates"])
        rep.refused = int(ingest["refused"])
        rep.acks_withheld = int(ingest["mqtt_withheld"])
        rep.ingest_restarts = restarts
    for (stage, device), n in snap["messages"].items():
        rep.stages[stage] = rep.stages.get(stage, 0) + n
        rep.devices.setdefault(device, {})[stage] = n
        if stage == RECEIVED:
            rep.messages_in += n
    for (stage, device), n in snap["bytes"].items():
        rep.devices.setdefault(device, {})[f"{stage}_bytes"] = n
        if stage == RECEIVED:
            rep.raw_bytes += n
    rep.output_rows = dict(snap["rows"])
    rep.output_bytes = dict(snap["file_bytes"])
    rep.wire_rows = dict(snap["wire_rows"])
    rep.wire_bytes = dict(snap["wire_bytes"])
    return rep
