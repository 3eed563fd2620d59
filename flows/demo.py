"""``edgesieve demo``: everything embedded on loopback, then the reduction report.

Starts an MQTT broker (``mosquitto`` when installed, else an embedded one),
simulated temperature/humidity sensors and vibrating machines (healthy,
imbalance, bearing fault), and the telemetry and vibration flows side by side
for a bounded time; then prints messages and bytes in, rows and bytes out,
alarms, and the reduction ratio per flow.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from connectors.broker import start_broker
from flows import telemetry, vibration
from flows.accounting import RECEIVED, FlowReport, Meter
from flows.config import EdgeConfig, parse_config
from flows.machines import Machine, blocks, publish_vibration
from flows.runtime import FlowBuilder, run_flow, stop_on_signals
from flows.simulator import publish_telemetry, telemetry_payloads

__all__ = ["DemoSettings", "run_demo"]

log = logging.getLogger("edgesieve.demo")

KINDS: tuple[Literal["healthy", "imbalance", "bearing"], ...] = ("healthy", "imbalance", "bearing")
BLOCK_FRAMES = 4096


@dataclass(frozen=True)
class DemoSettings:
    """How big and how long the demo is."""

    devices: int = 20
    seconds: float = 15.0
    rate_per_device: float = 10.0
    data_dir: Path | None = None
    broker: Literal["auto", "mosquitto", "embedded"] = "auto"
    machines: int = 3

    def __post_init__(self) -> None:
        if self.devices < 1 or self.seconds <= 0 or self.rate_per_device <= 0:
            msg = (
                f"demo needs at least one device, a positive duration and rate "
                f"(got devices={self.devices}, seconds={self.seconds}, "
                f"rate={self.rate_per_device})"
            )
            raise ValueError(msg)
        if self.machines < 0:
            msg = f"demo machines must be 0 or more (got {self.machines})"
            raise ValueError(msg)


def _demo_config(data_dir: Path, url: str) -> EdgeConfig:
    return parse_config(
        {
            "edge_id": "demo-edge",
            "data_dir": str(data_dir),
            "transports": {"mqtt": {"url": url, "qos": 1, "client_id": "edgesieve-demo"}},
            "telemetry": {
                "deadband": {"absolute": 0.1, "max_silence": 60},
                "window": {"length": 5, "allowed_lateness": 2},
            },
            "parquet": {"max_file_age": 5},
        },
        source="demo",
    )


class _FlowThread(threading.Thread):
    def __init__(self, build: FlowBuilder, config: EdgeConfig, stop: threading.Event, meter: Meter):
        super().__init__(name=f"demo-{meter.flow}", daemon=True)
        self._args = (build, config, stop, meter)
        self.report: FlowReport | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        build, config, stop, meter = self._args
        try:
            self.report = run_flow(
                build, config, stop=stop, meter=meter, handle_signals=False
            ).reports[meter.flow]
        except BaseException as exc:  # reported by run_demo
            self.error = exc
            stop.set()


def run_demo(settings: DemoSettings = DemoSettings()) -> dict[str, FlowReport]:
    """Run the demo; return each flow's report (also written to ``data_dir``)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    data_dir = (settings.data_dir or Path("var") / f"demo-{stamp}").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    per_device = max(1, int(settings.seconds * settings.rate_per_device))
    period = timedelta(seconds=1 / settings.rate_per_device)
    payloads = telemetry_payloads(settings.devices, per_device, period=period)
    machine_rate = Machine("healthy").sample_rate_hz / BLOCK_FRAMES
    block_count = max(1, int(settings.seconds * machine_rate))
    now = datetime.now(UTC)
    machines = {
        f"machine-{i:02d}-{KINDS[i % 3]}": blocks(
            Machine(KINDS[i % 3], seed=i),
            device=f"machine-{i:02d}-{KINDS[i % 3]}",
            count=block_count,
            start_ts=now,
        )
        for i in range(settings.machines)
    }
    stop = threading.Event()
    meters = {"telemetry": Meter("telemetry"), "vibration": Meter("vibration")}
    expected = {"telemetry": len(payloads), "vibration": block_count * len(machines)}
    deadline_s = settings.seconds * 3 + 30

    with stop_on_signals(stop), start_broker(data_dir / "broker", kind=settings.broker) as broker:
        print(f"broker: {type(broker).__name__} on {broker.url}")
        print(
            f"devices: {settings.devices} sensors sending {len(payloads)} telemetry messages and "
            f"{len(machines)} machines sending {expected['vibration']} vibration blocks "
            f"over {settings.seconds:g}s; outputs in {data_dir}"
        )
        config = _demo_config(data_dir, broker.url)
        flows = [
            _FlowThread(telemetry.build, config, stop, meters["telemetry"]),
            _FlowThread(vibration.build, config, stop, meters["vibration"]),
        ]
        for flow in flows:
            flow.start()

        def send() -> None:
            time.sleep(1.0)  # let the flows subscribe first
            senders = [
                threading.Thread(
                    target=publish_telemetry,
                    args=(broker.url, payloads),
                    kwargs={
                        "rate_per_s": settings.devices * settings.rate_per_device,
                        "deadline_s": deadline_s,
                        "stop": stop,
                    },
                ),
                *(
                    threading.Thread(
                        target=publish_vibration,
                        args=(broker.url, device, device_blocks),
                        kwargs={"rate_per_s": machine_rate, "deadline_s": deadline_s, "stop": stop},
                    )
                    for device, device_blocks in machines.items()
                ),
            ]
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join()

        try:
            send()
            until = time.monotonic() + 30
            while (
                time.monotonic() < until
                and not stop.is_set()
                and any(meters[f].totals[RECEIVED] < n for f, n in expected.items())
            ):
                time.sleep(0.1)
        finally:
            stop.set()
            for flow in flows:
                flow.join()
    for flow in flows:
        if flow.error is not None:
            raise flow.error
    reports = {flow.report.flow: flow.report for flow in flows if flow.report is not None}
    for rep in reports.values():
        print(rep.render())
    alarms = reports["vibration"].stages.get("alarms", 0) if "vibration" in reports else 0
    print(f"alarms: {alarms} raised/cleared events (also published on v1/devices/+/alarms)")
    raw = sum(r.raw_bytes for r in reports.values())
    out = sum(r.reduced_bytes() for r in reports.values())
    if out:
        print(f"total: {raw} raw bytes in, {out} bytes out, reduction {raw / out:.3g}:1")
    print(f"reports: {data_dir}/report-telemetry.json, {data_dir}/report-vibration.json")
    return reports
