"""The standard telemetry flow.

Device telemetry → decode → deadband → ``telemetry_points``; event-time window
aggregates → ``telemetry_summary``; string values → ``telemetry_text``;
client attributes → ``device_attributes``;
undecodable payloads, late readings and what ``limits`` refuses →
``dead_letters``. Series evicted as idle (``limits.series_idle_evict``) have
their open windows emitted and their state dropped.

Run it with ``edgesieve run flows.telemetry --config edge.yaml`` or with
``EDGESIEVE_CONFIG=edge.yaml python -m bytewax.run flows.telemetry``.
"""

from __future__ import annotations

from datetime import timedelta

import bytewax.operators as op

from connectors.codecs.attributes_json import ATTRIBUTES
from flows.api import Devices, Edge
from flows.ingest import reading_payload
from flows.runtime import lazy_flow
from operators.deadband import deadband
from operators.records import TELEMETRY, DeadLetter, Reading
from operators.windows import window_aggregate

__all__ = ["build", "pipeline"]


def late_letter(reading: Reading, allowed_lateness: timedelta) -> DeadLetter:
    """Describe a reading older than its series' newest one by more than the allowed lateness."""
    reason = (
        f"late: reading {reading.key!r} at {reading.ts.isoformat()} is older than the newest "
        f"reading of its series by more than the allowed lateness "
        f"({allowed_lateness.total_seconds():g}s); raise telemetry.window.allowed_lateness or "
        "fix the device clock"
    )
    return DeadLetter(
        reading.device, reading.transport, reading.ts, reason, reading_payload(reading)
    )


def pipeline(edge: Edge, dev: Devices) -> None:
    """Deadband, windows and outputs of the telemetry flow, on any device input."""
    settings = edge.config.telemetry
    band, window = settings.deadband, settings.window
    series = dev.series  # readings, and an Evict where limits.series_idle_evict forgets one
    points = deadband(
        edge.id("deadband"),
        series,
        absolute=band.absolute,
        percent=band.percent,
        max_silence=band.max_silence,
    )
    agg = window_aggregate(
        edge.id("window"),
        series,
        length=window.length,
        slide=window.slide,
        allowed_lateness=window.allowed_lateness,
    )
    late = op.map(edge.id("late"), agg.late, lambda kv: late_letter(kv[1], window.allowed_lateness))
    edge.output("telemetry_points", points)
    edge.output("telemetry_summary", agg.down)
    edge.output("telemetry_text", dev.text)
    edge.output("device_attributes", dev.attributes)
    edge.dead_letters(late)


def build(edge: Edge) -> None:
    """The telemetry flow: telemetry and attributes in; points, summaries, text, attributes out."""
    pipeline(edge, edge.devices("in", channels=[TELEMETRY, ATTRIBUTES]))


__getattr__ = lazy_flow(__name__, build)
