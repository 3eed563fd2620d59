"""The standard vibration flow.

MQTT ``v1/devices/+/vibration`` EVB1 blocks → decode (one NumPy array per
block) → spectral features per device and axis → ``vibration_features``;
threshold rules on the features → ``alarms``, also published at once on
``v1/devices/{id}/alarms`` so the edge reacts without the cloud; undecodable
blocks and signal discontinuities → ``dead_letters``.

By default it warns when velocity RMS enters ISO 10816 zone C and raises a
critical alarm in zone D. Run it with
``edgesieve run flows.vibration --config edge.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from datetime import timedelta

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream, operator
from bytewax.inputs import Source
from bytewax.operators import KeyedStream

from connectors.devices.mqtt import MqttSink
from flows.accounting import Meter, counted
from flows.config import EdgeConfig
from flows.ingest import Decoded, as_dead_letter, decoder
from flows.runtime import channel_flow, cloud_sink, lazy_flow, mqtt_settings, parquet_sink
from operators.records import RawMessage, VibrationBlock
from operators.spectral import spectral
from operators.threshold import Alarm, threshold

__all__ = ["STREAMS", "alarm_payload", "build", "pipeline"]

STREAMS = ("vibration_features", "alarms", "dead_letters")
ALARM_FILE_AGE = timedelta(seconds=1)
"""Alarms are published to Parquet within about this long, whatever ``parquet.max_file_age`` is."""


def alarm_payload(alarm: Alarm) -> bytes:
    """The JSON published on ``v1/devices/{id}/alarms``."""
    return json.dumps(
        {
            "ts": int(alarm.ts.timestamp() * 1000),
            "rule": alarm.rule,
            "state": alarm.state,
            "severity": alarm.severity,
            "value": alarm.value,
            "key": alarm.key,
        }
    ).encode()


def _is_block(item: tuple[str, Decoded]) -> bool:
    return type(item[1]) is VibrationBlock


@operator
def pipeline(step_id: str, up: Stream[RawMessage], config: EdgeConfig, meter: Meter) -> None:
    """Decode, spectral features, alarms and sinks of the vibration flow, on any message stream."""
    settings = config.vibration
    spectral_config = settings.spectral()
    decoded = op.flat_map_batch("decode", up, decoder(config.max_payload_bytes, meter))
    split = op.branch("split_blocks", decoded, _is_block)
    blocks: KeyedStream[VibrationBlock] = split.trues  # type: ignore[assignment]
    rejected = op.map("rejected", split.falses, lambda kv: as_dead_letter(kv[1], "vibration"))

    spec = spectral(
        "spectral",
        blocks,
        fft_size=spectral_config.fft_size,
        overlap=spectral_config.overlap,
        frames_per_row=spectral_config.frames_per_row,
        bands_hz=spectral_config.bands_hz,
        velocity_band_hz=spectral_config.velocity_band_hz,
        iso_thresholds_mm_s=spectral_config.iso_thresholds_mm_s,
    )
    features = op.map("features", spec.features, lambda kv: kv[1])
    features = counted("count_features", features, meter, "vibration_features", lambda f: f.device)
    by_axis = op.key_on("by_axis", features, lambda f: f"{f.device}/{f.axis}")
    raised = threshold("alarms", by_axis, rules=settings.rules())
    alarms = op.map("alarm_rows", raised, lambda kv: dataclasses.replace(kv[1], key=kv[0]))
    alarms = counted("count_alarms", alarms, meter, "alarms", lambda a: a.device)

    gaps = op.map("discontinuities", spec.errors, lambda kv: kv[1])
    dead = op.merge("dead", rejected, gaps)
    dead = counted("count_dead_letters", dead, meter, "dead_letters", lambda d: d.device)

    op.output("out_features", features, parquet_sink(config, "vibration_features", meter))
    prompt = min(ALARM_FILE_AGE, config.parquet.max_file_age)
    op.output("out_alarms", alarms, parquet_sink(config, "alarms", meter, max_file_age=prompt))
    op.output("out_dead_letters", dead, parquet_sink(config, "dead_letters", meter))
    to_cloud = cloud_sink(config, "vibration_features", meter, claims_raw_bytes=True)
    if to_cloud is not None:
        op.output("cloud_vibration_features", features, to_cloud)
    to_cloud = cloud_sink(config, "alarms", meter, claims_raw_bytes=False)
    if to_cloud is not None:
        op.output("cloud_alarms", alarms, to_cloud)
    if config.transports.mqtt is not None:
        publisher = mqtt_settings(config, channels=("vibration",), role="alarms")
        sink = MqttSink(
            publisher,
            topic=lambda a: f"v1/devices/{a.device}/alarms",
            payload=alarm_payload,
        )
        op.output("publish_alarms", alarms, sink)


def build(
    config: EdgeConfig,
    *,
    stop: threading.Event | None = None,
    meter: Meter | None = None,
    source: Source[RawMessage] | None = None,
) -> Dataflow:
    """Build the vibration dataflow from a validated configuration.

    Input comes from every configured transport, or from ``source`` (tests and
    benchmarks feed recorded messages); ``stop`` ends the flow cleanly when
    set; ``meter`` collects the traffic counters for the reduction report.
    """
    return channel_flow("vibration", pipeline, config, stop=stop, meter=meter, source=source)


__getattr__ = lazy_flow(__name__, build)
