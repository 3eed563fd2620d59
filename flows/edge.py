"""The whole edge in one dataflow: the telemetry, vibration and logs flows side by side.

Every configured transport feeds one stream of device messages; its
telemetry and client attributes go to :func:`flows.telemetry.pipeline`, its
vibration blocks to :func:`flows.vibration.pipeline` and its log lines to
:func:`flows.logs.pipeline`. Run it when devices use HTTP or CoAP (one
process owns those ports and serves every channel) or simply to run
everything at once: ``edgesieve run flows.edge --config edge.yaml``. Reports
stay per part (telemetry, vibration, logs).
"""

from __future__ import annotations

from connectors.codecs.attributes_json import ATTRIBUTES
from flows import logs, telemetry, vibration
from flows.api import Edge
from flows.runtime import lazy_flow
from operators.records import LOGS, TELEMETRY, VIBRATION

__all__ = ["build"]


def build(edge: Edge) -> None:
    """The standard pipelines on one device input, each with its own report."""
    dev = edge.devices("in", channels=[TELEMETRY, VIBRATION, ATTRIBUTES, LOGS])
    telemetry.pipeline(edge.part("telemetry", channel=(TELEMETRY, ATTRIBUTES)), dev)
    vibration.pipeline(edge.part("vibration", channel=VIBRATION), dev)
    logs.pipeline(edge.part("logs", channel=LOGS), dev)


__getattr__ = lazy_flow(__name__, build)
