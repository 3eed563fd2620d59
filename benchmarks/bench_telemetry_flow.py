"""The telemetry flow's own throughput versus a bare Bytewax JSON drain, without MQTT.

The same recorded telemetry messages (``--devices`` devices, two values each,
one message per device and second) go through (a) a bare dataflow that parses
every payload with :func:`json.loads` and drops the result (what a non-durable
Node-RED flow does), and (b) ``flows.telemetry`` on the production ``Edge``
(decode, deadband, windows, Parquet and DuckDB sinks; recovery off, as the
Node-RED flow keeps nothing). Both run ``--repeat`` times alternately in one
process; prints the median messages/s of each and the ratio (b)/(a).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import TestingSource, run_main

from flows import telemetry
from flows.api import Edge
from flows.config import parse_config
from flows.simulator import telemetry_payloads
from operators.records import TELEMETRY, RawMessage

T0 = datetime(2026, 12, 1, tzinfo=UTC)


class _Drop(StatelessSinkPartition[object]):
    def write_batch(self, items: list[object]) -> None:
        pass


class _DropSink(DynamicSink[object]):
    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Drop:
        return _Drop()


def messages(devices: int, per_device: int) -> list[RawMessage]:
    return [
        RawMessage(device, TELEMETRY, "mqtt", T0, payload)
        for device, payload in telemetry_payloads(devices, per_device, start=T0)
    ]


def bare(batch: list[RawMessage], batch_size: int) -> float:
    """Seconds for a dataflow that only parses every payload."""
    flow = Dataflow("bare")
    raw = op.input("in", flow, TestingSource(batch, batch_size))
    parsed = op.map("parse", raw, lambda msg: json.loads(msg.payload))
    op.output("out", parsed, _DropSink())
    t0 = time.perf_counter()
    run_main(flow)
    return time.perf_counter() - t0


def flow(batch: list[RawMessage], batch_size: int) -> float:
    """Seconds for ``flows.telemetry`` on the production Edge, sinks included."""
    with tempfile.TemporaryDirectory() as tmp:
        config = parse_config({"data_dir": tmp, "recovery": {"enabled": False}})
        edge = Edge(config, name="telemetry", source=TestingSource(batch, batch_size))
        telemetry.build(edge)
        t0 = time.perf_counter()
        edge.run()
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000, help="telemetry messages")
    parser.add_argument("--devices", type=int, default=100, help="devices")
    parser.add_argument("--batch", type=int, default=500, help="messages per source batch")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (median)")
    args = parser.parse_args()

    data = messages(args.devices, max(1, args.messages // args.devices))
    n = len(data)
    bare_s: list[float] = []
    flow_s: list[float] = []
    for _ in range(args.repeat):
        bare_s.append(bare(data, args.batch))
        flow_s.append(flow(data, args.batch))
    b, f = statistics.median(bare_s), statistics.median(flow_s)
    print(f"{n} messages, {args.devices} devices, median of {args.repeat}")
    print(f"bare json drain   {n / b:>9,.0f} msg/s  ({', '.join(f'{s:.2f}' for s in bare_s)} s)")
    print(f"telemetry flow    {n / f:>9,.0f} msg/s  ({', '.join(f'{s:.2f}' for s in flow_s)} s)")
    print(f"ratio flow/bare   {b / f:.2f}")


if __name__ == "__main__":
    main()
