"""Helpers for flow tests: run a flow on recorded messages through the same Edge as production."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from bytewax.testing import TestingSource

from connectors.devices.mqtt import MqttSource
from flows.api import Edge
from flows.config import EdgeConfig
from flows.runtime import FlowBuilder
from flows.transports import mqtt_settings
from operators.records import RawMessage


def run_recorded(
    build: FlowBuilder,
    config: EdgeConfig,
    messages: Sequence[RawMessage],
    *,
    name: str = "flow",
    batch_size: int = 1,
    workers: int = 1,
) -> Edge:
    """Build ``build`` on an Edge fed ``messages`` and run it to the end (reports written)."""
    edge = Edge(config, name=name, source=TestingSource(list(messages), batch_size))
    build(edge)
    edge.run(workers=workers)
    return edge


def mqtt_edge(
    config: EdgeConfig, *, name: str, channels: tuple[str, ...]
) -> tuple[Edge, MqttSource]:
    """An Edge reading ``channels`` from ``transports.mqtt``, and its source (``source.ready``)."""
    stop = threading.Event()
    source = MqttSource(mqtt_settings(config, channels=channels), stop=stop)
    return Edge(config, name=name, stop=stop, source=source), source
