"""The whole edge in one dataflow: the telemetry and vibration flows side by side.

Every configured transport feeds one stream of device messages; its
telemetry and client attributes go to :func:`flows.telemetry.pipeline` and its vibration blocks to
:func:`flows.vibration.pipeline`. Run it when devices use HTTP or CoAP (one
process owns those ports and serves both channels) or simply to run
everything at once: ``edgesieve run flows.edge --config edge.yaml``. Reports
stay per part (telemetry, vibration).
"""

from __future__ import annotations

from connectors.codecs.attributes_json import ATTRIBUTES
from flows import telemetry, vibration
from flows.api import Edge
from flows.runtime import lazy_flow
from operators.records import TELEMETRY, VIBRATION

__all__ = ["build"]


def build(edge: Edge) -> None:
    """Both standard pipelines on one device input, each with its own report."""
    dev = edge.devices("in", channels=[TELEMETRY, VIBRATION, ATTRIBUTES])
    telemetry.pipeline(edge.part("telemetry", channel=(TELEMETRY, ATTRIBUTES)), dev)
    vibration.pipeline(edge.part("vibration", channel=VIBRATION), dev)


__getattr__ = lazy_flow(__name__, build)
