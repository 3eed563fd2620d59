"""Helpers for flow tests: run a flow on recorded messages through the same Edge as production."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
from bytewax.testing import TestingSource, run_main

from connectors.devices.mqtt import MqttSource
from flows.api import Edge
from flows.config import EdgeConfig
from flows.runtime import FlowBuilder
from flows.transports import mqtt_settings
from operators.records import RawMessage

RUNNERS = ("run_main", "cluster_main-1", "cluster_main-2")
"""The ways a flow runs in production: Bytewax's single-worker runner, and 1 or 2 worker threads."""


@pytest.fixture(params=RUNNERS)
def runner(request: pytest.FixtureRequest) -> str:
    """Run the test once per way a flow runs (see :data:`RUNNERS`)."""
    return str(request.param)


def run_recorded(
    build: FlowBuilder,
    config: EdgeConfig,
    messages: Sequence[RawMessage],
    *,
    name: str = "flow",
    batch_size: int = 1,
    runner: str = "cluster_main-1",
) -> Edge:
    """Build ``build`` on an Edge fed ``messages`` and run it to the end (reports written)."""
    edge = Edge(config, name=name, source=TestingSource(list(messages), batch_size))
    build(edge)
    if runner == "run_main":
        run_main(edge.dataflow())
        edge.close()
        edge.reports(write=True)
    else:
        edge.run(workers=int(runner.rsplit("-", 1)[1]))
    return edge


def mqtt_edge(
    config: EdgeConfig, *, name: str, channels: tuple[str, ...]
) -> tuple[Edge, MqttSource]:
    """An Edge reading ``channels`` from ``transports.mqtt``, and its source (``source.ready``)."""
    stop = threading.Event()
    source = MqttSource(mqtt_settings(config, channels=channels), stop=stop)
    return Edge(config, name=name, stop=stop, source=source), source
