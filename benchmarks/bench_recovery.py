"""Recovery's cost: the telemetry and vibration flows with Bytewax recovery on versus off.

The same recorded messages go through ``flows.telemetry`` and ``flows.vibration``
(the production ``Edge``, its sinks included) twice each in one run: with
recovery (snapshots every ``--snapshot`` seconds under ``data_dir/recovery``,
the default interval unless given) and without. Prints messages/s of both and
the ratio on/off per flow.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime, timedelta

from bytewax.testing import TestingSource

from flows import telemetry, vibration
from flows.api import Edge
from flows.config import RecoverySection, parse_config
from flows.machines import Machine, blocks
from flows.runtime import FlowBuilder
from flows.simulator import telemetry_payloads
from operators.records import TELEMETRY, VIBRATION, RawMessage

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def telemetry_messages(devices: int, per_device: int) -> list[RawMessage]:
    return [
        RawMessage(device, TELEMETRY, "mqtt", T0, payload)
        for device, payload in telemetry_payloads(devices, per_device, start=T0)
    ]


def vibration_messages(machines: int, per_machine: int) -> list[RawMessage]:
    out: list[RawMessage] = []
    for m in range(machines):
        machine = Machine("imbalance" if m % 2 else "healthy", seed=m)
        for payload in blocks(machine, device=f"pump-{m}", count=per_machine, start_ts=T0):
            out.append(RawMessage(f"pump-{m}", VIBRATION, "mqtt", T0, payload))
    return out


def run(build: FlowBuilder, name: str, messages: list[RawMessage], *, recovery: bool,
        snapshot_s: float) -> float:
    """Seconds to run ``messages`` through the flow from start to its end."""
    with tempfile.TemporaryDirectory() as tmp:
        config = parse_config(
            {
                "data_dir": tmp,
                "recovery": {"enabled": recovery, "snapshot_interval": snapshot_s},
            }
        )
        edge = Edge(config, name=name, source=TestingSource(messages, 500))
        build(edge)
        t0 = time.perf_counter()
        edge.run()
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--telemetry", type=int, default=200_000, help="telemetry messages")
    parser.add_argument("--blocks", type=int, default=8_000, help="vibration blocks")
    default_s = RecoverySection().snapshot_interval / timedelta(seconds=1)
    parser.add_argument("--snapshot", type=float, default=default_s, help="seconds")
    args = parser.parse_args()

    cases = [
        ("telemetry", telemetry.build, telemetry_messages(100, max(1, args.telemetry // 100))),
        ("vibration", vibration.build, vibration_messages(10, max(1, args.blocks // 10))),
    ]
    print(f"snapshot interval {args.snapshot:g} s")
    for name, build, messages in cases:
        off = run(build, name, messages, recovery=False, snapshot_s=args.snapshot)
        on = run(build, name, messages, recovery=True, snapshot_s=args.snapshot)
        n = len(messages)
        print(
            f"{name:<10} {n:>7} messages  recovery off {n / off:>9,.0f} msg/s ({off:.2f} s)  "
            f"on {n / on:>9,.0f} msg/s ({on:.2f} s)  ratio on/off {off / on:.2f} (target >= 0.8)"
        )


if __name__ == "__main__":
    main()
