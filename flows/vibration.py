"""The standard vibration flow.

EVB1 blocks → decode (one NumPy array per block) → spectral features per
device and axis → ``vibration_features``; threshold rules on the features →
``alarms``, also published at once on ``v1/devices/{id}/alarms`` so the edge
reacts without the cloud; undecodable blocks and signal discontinuities →
``dead_letters``. Every feature row is kept locally; the cloud gets a row only
when it reports something (``vibration.report``: a feature moved beyond the
tolerance, the ISO zone changed, an alarm fired on it, or the heartbeat is due).

By default it warns when velocity RMS enters ISO 10816 zone C and raises a
critical alarm in zone D. Run it with
``edgesieve run flows.vibration --config edge.yaml``.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import bytewax.operators as op

from connectors.sinks.mqtt import alarm_payload
from flows.api import Devices, Edge
from flows.runtime import lazy_flow
from operators.exception import report_by_exception
from operators.records import VIBRATION
from operators.spectral import spectral
from operators.threshold import threshold

__all__ = ["build", "pipeline"]

ALARM_FILE_AGE = timedelta(seconds=1)
"""Alarms are published to Parquet within about this long, whatever ``parquet.max_file_age`` is."""


def pipeline(edge: Edge, dev: Devices) -> None:
    """Spectral features, alarms and outputs of the vibration flow, on any device input."""
    settings = edge.config.vibration
    config = settings.spectral()
    spec = spectral(
        edge.id("spectral"),
        dev.blocks,
        fft_size=config.fft_size,
        overlap=config.overlap,
        frames_per_row=config.frames_per_row,
        bands_hz=config.bands_hz,
        velocity_band_hz=config.velocity_band_hz,
        iso_thresholds_mm_s=config.iso_thresholds_mm_s,
    )
    features = op.map(edge.id("features"), spec.features, lambda kv: kv[1])
    by_axis = op.key_on(edge.id("by_axis"), features, lambda f: f"{f.device}/{f.axis}")
    raised = threshold(edge.id("alarms"), by_axis, rules=settings.rules())
    alarms = op.map(edge.id("alarm_rows"), raised, lambda kv: dataclasses.replace(kv[1], key=kv[0]))
    report = settings.report
    if report.enabled and edge.config.cloud is not None:
        reported = report_by_exception(
            edge.id("report"),
            by_axis,
            tolerance=report.tolerance,
            heartbeat=report.heartbeat,
            alarms=raised,
        )
        edge.output("vibration_features", features, cloud=False)
        edge.output(
            "vibration_features",
            op.map(edge.id("reported"), reported, lambda kv: kv[1]),
            local=False,
        )
    else:
        edge.output("vibration_features", features)
    prompt = min(ALARM_FILE_AGE, edge.config.parquet.max_file_age)
    edge.output("alarms", alarms, max_file_age=prompt)
    edge.dead_letters(spec.errors)
    edge.publish(
        "publish_alarms",
        alarms,
        topic=lambda a: f"v1/devices/{a.device}/alarms",
        payload=alarm_payload,
    )


def build(edge: Edge) -> None:
    """The vibration flow: EVB1 blocks in, features, alarms and dead letters out."""
    pipeline(edge, edge.devices("in", channels=[VIBRATION]))


__getattr__ = lazy_flow(__name__, build)
