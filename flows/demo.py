"""``edgesieve demo``: everything embedded on loopback, then the reduction report.

Starts an MQTT broker (``mosquitto`` when installed, else an embedded one),
simulated temperature/humidity devices, and the telemetry flow for a bounded
time; prints messages and bytes in, rows and bytes out, and the ratio.
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
from flows import telemetry
from flows.accounting import RECEIVED, FlowReport, Meter
from flows.config import EdgeConfig, parse_config
from flows.runtime import run_flow
from flows.simulator import publish_telemetry, telemetry_payloads

__all__ = ["DemoSettings", "run_demo"]

log = logging.getLogger("edgesieve.demo")


@dataclass(frozen=True)
class DemoSettings:
    """How big and how long the demo is."""

    devices: int = 20
    seconds: float = 15.0
    rate_per_device: float = 10.0
    data_dir: Path | None = None
    broker: Literal["auto", "mosquitto", "embedded"] = "auto"

    def __post_init__(self) -> None:
        if self.devices < 1 or self.seconds <= 0 or self.rate_per_device <= 0:
            msg = (
                f"demo needs at least one device, a positive duration and rate "
                f"(got devices={self.devices}, seconds={self.seconds}, "
                f"rate={self.rate_per_device})"
            )
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


def run_demo(settings: DemoSettings = DemoSettings()) -> FlowReport:
    """Run the demo and return its report (also written to ``data_dir``)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    data_dir = (settings.data_dir or Path("var") / f"demo-{stamp}").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    per_device = max(1, int(settings.seconds * settings.rate_per_device))
    period = timedelta(seconds=1 / settings.rate_per_device)
    payloads = telemetry_payloads(settings.devices, per_device, period=period)
    stop = threading.Event()
    meter = Meter("telemetry")

    with start_broker(data_dir / "broker", kind=settings.broker) as broker:
        print(f"broker: {type(broker).__name__} on {broker.url}")
        print(
            f"devices: {settings.devices} simulated sensors, {len(payloads)} messages "
            f"over {settings.seconds:g}s; outputs in {data_dir}"
        )
        config = _demo_config(data_dir, broker.url)

        def devices() -> None:
            try:
                time.sleep(1.0)  # let the edge subscribe first
                rate = settings.devices * settings.rate_per_device
                sent = publish_telemetry(
                    broker.url,
                    payloads,
                    rate_per_s=rate,
                    deadline_s=settings.seconds * 3 + 30,
                    stop=stop,
                )
                deadline = time.monotonic() + 30
                while meter.totals[RECEIVED] < sent.messages and time.monotonic() < deadline:
                    time.sleep(0.1)
            except Exception:
                log.exception("simulated devices failed")
            finally:
                stop.set()

        threading.Thread(target=devices, name="demo-devices", daemon=True).start()
        result = run_flow(telemetry.build, config, stop=stop, meter=meter).report
    print(result.render())
    print(f"report: {data_dir / 'report-telemetry.json'}")
    return result
