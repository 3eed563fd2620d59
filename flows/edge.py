"""The whole edge in one dataflow: the telemetry and vibration flows side by side.

Every configured transport feeds one stream of device messages, split by
channel into :func:`flows.telemetry.pipeline` and :func:`flows.vibration.pipeline`.
Run it when devices use HTTP or CoAP (one process owns those ports and serves
both channels) or simply to run everything at once:
``edgesieve run flows.edge --config edge.yaml``. Reports stay per flow.
"""

from __future__ import annotations

import threading

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source

from flows import telemetry, vibration
from flows.accounting import Meter
from flows.config import EdgeConfig
from flows.runtime import flow_inputs, lazy_flow
from operators.records import TELEMETRY, VIBRATION, RawMessage

__all__ = ["build"]


def build(
    config: EdgeConfig,
    *,
    stop: threading.Event | None = None,
    meter: Meter | None = None,
    source: Source[RawMessage] | None = None,
) -> Dataflow:
    """Build the edge dataflow; counts go to ``telemetry``/``vibration`` siblings of ``meter``."""
    meter = meter if meter is not None else Meter("edge")
    flow = Dataflow("edge")
    raw = flow_inputs(flow, config, channels=(TELEMETRY, VIBRATION), stop=stop, source=source)
    by_channel = op.branch("by_channel", raw, lambda m: m.channel == TELEMETRY)
    telemetry.pipeline("telemetry", by_channel.trues, config, meter.sibling("telemetry"))
    vibration.pipeline("vibration", by_channel.falses, config, meter.sibling("vibration"))
    return flow


__getattr__ = lazy_flow(__name__, build)
