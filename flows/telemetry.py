"""The standard telemetry flow.

MQTT ``v1/devices/+/telemetry`` → decode → deadband → ``telemetry_points``;
event-time window aggregates → ``telemetry_summary``; string values →
``telemetry_text``; undecodable payloads and late readings → ``dead_letters``.
Everything lands in Parquet under ``data_dir/parquet``.

Run it with ``edgesieve run flows.telemetry --config edge.yaml`` or with
``EDGESIEVE_CONFIG=edge.yaml python -m bytewax.run flows.telemetry``.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream, operator
from bytewax.inputs import Source
from bytewax.operators import KeyedStream

from flows.accounting import Meter, counted
from flows.config import EdgeConfig
from flows.ingest import Decoded, as_dead_letter, decoder, reading_payload
from flows.runtime import channel_flow, cloud_sink, lazy_flow, parquet_sink
from operators.deadband import deadband
from operators.records import DeadLetter, RawMessage, Reading
from operators.windows import window_aggregate

__all__ = ["STREAMS", "build", "pipeline"]

STREAMS = ("telemetry_points", "telemetry_summary", "telemetry_text", "dead_letters")


def late_letter(reading: Reading, allowed_lateness: timedelta) -> DeadLetter:
    """Describe a reading that arrived after its window closed."""
    reason = (
        f"late: reading {reading.key!r} at {reading.ts.isoformat()} arrived after its window "
        f"closed (allowed lateness {allowed_lateness.total_seconds():g}s); "
        "raise telemetry.window.allowed_lateness or fix the device clock"
    )
    return DeadLetter(
        reading.device, reading.transport, datetime.now(UTC), reason, reading_payload(reading)
    )


def _is_number(item: tuple[str, Decoded]) -> bool:
    value = item[1]
    return type(value) is Reading and type(value.value) is float


@operator
def pipeline(step_id: str, up: Stream[RawMessage], config: EdgeConfig, meter: Meter) -> None:
    """Decode, deadband, windows and sinks of the telemetry flow, on any message stream."""
    settings = config.telemetry
    decoded = op.flat_map_batch("decode", up, decoder(config.max_payload_bytes, meter))
    numbers = op.branch("split_numbers", decoded, _is_number)
    keyed: KeyedStream[Reading] = numbers.trues  # type: ignore[assignment]
    others = op.branch("split_text", numbers.falses, lambda kv: type(kv[1]) is Reading)
    text = op.map("text", others.trues, lambda kv: kv[1])
    errors = op.map("errors", others.falses, lambda kv: as_dead_letter(kv[1], "telemetry"))

    band = settings.deadband
    points = deadband(
        "deadband",
        keyed,
        absolute=band.absolute,
        percent=band.percent,
        max_silence=band.max_silence,
    )
    points_out = op.map("points", points, lambda kv: kv[1])
    points_out = counted("count_points", points_out, meter, "telemetry_points", lambda r: r.device)

    window = settings.window
    agg = window_aggregate(
        "window",
        keyed,
        length=window.length,
        slide=window.slide,
        allowed_lateness=window.allowed_lateness,
    )
    summaries = op.map("summaries", agg.down, lambda kv: kv[1])
    summaries = counted(
        "count_summaries", summaries, meter, "telemetry_summary", lambda s: s.device
    )
    late = op.map("late", agg.late, lambda kv: late_letter(kv[1], window.allowed_lateness))
    dead = op.merge("dead", errors, late)
    dead = counted("count_dead_letters", dead, meter, "dead_letters", lambda d: d.device)

    op.output("out_points", points_out, parquet_sink(config, "telemetry_points", meter))
    op.output("out_summary", summaries, parquet_sink(config, "telemetry_summary", meter))
    op.output("out_text", text, parquet_sink(config, "telemetry_text", meter))
    op.output("out_dead_letters", dead, parquet_sink(config, "dead_letters", meter))
    to_cloud = cloud_sink(config, "telemetry_summary", meter, claims_raw_bytes=True)
    if to_cloud is not None:
        op.output("cloud_telemetry_summary", summaries, to_cloud)
    if config.cloud is not None and config.cloud.send_points:
        points_to_cloud = cloud_sink(config, "telemetry_points", meter)
        assert points_to_cloud is not None
        op.output("cloud_telemetry_points", points_out, points_to_cloud)


def build(
    config: EdgeConfig,
    *,
    stop: threading.Event | None = None,
    meter: Meter | None = None,
    source: Source[RawMessage] | None = None,
) -> Dataflow:
    """Build the telemetry dataflow from a validated configuration.

    Input comes from every configured transport, or from ``source`` (tests and
    benchmarks feed recorded messages); ``stop`` ends the flow cleanly when
    set; ``meter`` collects the traffic counters for the reduction report.
    """
    return channel_flow("telemetry", pipeline, config, stop=stop, meter=meter, source=source)


__getattr__ = lazy_flow(__name__, build)
