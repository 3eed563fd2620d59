"""``edgesieve demo``: everything embedded on loopback, then the reduction report.

Writes a device registry, starts an MQTT broker that enforces it (``mosquitto``
when installed, else an embedded one), the edge (``flows.edge``: telemetry and
vibration flows fed by MQTT, HTTP and CoAP), and simulated devices on all
three transports: temperature/humidity sensors and vibrating machines
(healthy, imbalance, bearing fault). After a bounded time it stops cleanly and
prints messages and bytes in, rows and bytes out, alarms and the reduction
ratio per flow.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import duckdb
import yaml

from connectors.cloud import CloudReceiver
from connectors.devices.broker import start_broker
from connectors.devices.broker_auth import EdgeAccount
from connectors.devices.registry import Device, DeviceRegistry
from flows import edge
from flows.accounting import RECEIVED, FlowReport, ratio_text
from flows.api import Edge
from flows.config import EdgeConfig, parse_config
from flows.console import LogSetup, StatusConsole
from flows.machines import Machine, blocks, publish_vibration
from flows.runtime import stop_on_signals
from flows.simulator import (
    Post,
    log_payloads,
    post_coap,
    post_http,
    publish,
    telemetry_payloads,
)

__all__ = ["DemoSettings", "run_demo"]

log = logging.getLogger("edgesieve.demo")

KINDS: tuple[Literal["healthy", "imbalance", "bearing"], ...] = ("healthy", "imbalance", "bearing")
BLOCK_FRAMES = 4096


@dataclass(frozen=True)
class DemoSettings:
    """How big and how long the demo is.

    ``devices`` MQTT sensors, ``machines`` vibrating machines on MQTT, and
    ``http_devices`` / ``coap_devices`` sensors on those transports, and
    ``log_devices`` services posting their log lines over HTTP once a second.
    """

    devices: int = 20
    seconds: float = 15.0
    rate_per_device: float = 10.0
    data_dir: Path | None = None
    broker: Literal["auto", "mosquitto", "embedded"] = "auto"
    machines: int = 3
    http_devices: int = 3
    coap_devices: int = 3
    log_devices: int = 2

    def __post_init__(self) -> None:
        if self.devices < 1 or self.seconds <= 0 or self.rate_per_device <= 0:
            msg = (
                f"demo needs at least one device, a positive duration and rate "
                f"(got devices={self.devices}, seconds={self.seconds}, "
                f"rate={self.rate_per_device})"
            )
            raise ValueError(msg)
        if min(self.machines, self.http_devices, self.coap_devices, self.log_devices) < 0:
            msg = (
                f"demo machines, http_devices, coap_devices and log_devices must be 0 or more "
                f"(got {self.machines}, {self.http_devices}, {self.coap_devices}, "
                f"{self.log_devices})"
            )
            raise ValueError(msg)


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _demo_config(
    data_dir: Path, url: str, edge_account: EdgeAccount, cloud_port: int, cloud_secret: str
) -> EdgeConfig:
    return parse_config(
        {
            "edge_id": "demo-edge",
            "data_dir": str(data_dir),
            "devices": str(data_dir / "devices.yaml"),
            "transports": {
                "mqtt": {
                    "url": url,
                    "qos": 1,
                    "client_id": "edgesieve-demo",
                    "username": edge_account.username,
                    "password": edge_account.password,
                },
                "http": {"listen": f"127.0.0.1:{_free_port(socket.SOCK_STREAM)}"},
                "coap": {"listen": f"127.0.0.1:{_free_port(socket.SOCK_DGRAM)}"},
            },
            "telemetry": {
                "deadband": {"absolute": 0.1, "max_silence": 60},
                "window": {"length": 5, "allowed_lateness": 2},
            },
            "parquet": {"max_file_age": 5},
            "sinks": {"raw_readings": True},  # the report plots them against the kept points
            "cloud": {
                "target": f"127.0.0.1:{cloud_port}",
                "key": "demo-edge",
                "secret": cloud_secret,
                "batch_age": 2,
            },
        },
        source="demo",
    )


STREAM_FLOWS = {
    "telemetry_points": "telemetry",
    "telemetry_summary": "telemetry",
    "vibration_features": "vibration",
    "alarms": "vibration",
    "log_events": "logs",
    "log_summary": "logs",
}


def cloud_totals(db: Path) -> dict[str, tuple[int, int, int, int]]:
    """Per flow, from the receiver's ``uplink_batches``: batches, rows, raw bytes, wire bytes."""
    if not db.exists():
        return {}
    with duckdb.connect(str(db), read_only=True) as con:
        found = con.sql(
            "select stream, count(*), sum(rows), sum(raw_bytes), sum(wire_bytes) "
            "from uplink_batches group by stream"
        ).fetchall()
    totals: dict[str, list[int]] = {}
    for stream, *numbers in found:
        acc = totals.setdefault(STREAM_FLOWS.get(stream, stream), [0, 0, 0, 0])
        for i, n in enumerate(numbers):
            acc[i] += int(n or 0)
    return {flow: (a[0], a[1], a[2], a[3]) for flow, a in totals.items()}


def run_demo(
    settings: DemoSettings = DemoSettings(),
    *,
    status_every: float = 10.0,
    logs: LogSetup | None = None,
) -> dict[str, FlowReport]:
    """Run the demo; return each flow's report (also written to ``data_dir``).

    While it runs the console shows the edge's status (:class:`~flows.console.StatusConsole`:
    a live block on a terminal, else a line every ``status_every`` seconds). With ``logs``
    the logs go to ``data_dir/logs`` too.
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    data_dir = (settings.data_dir or Path("var") / f"demo-{stamp}").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if logs is not None:
        replace(logs, log_dir=data_dir / "logs").apply()
    per_device = max(1, int(settings.seconds * settings.rate_per_device))
    period = timedelta(seconds=1 / settings.rate_per_device)
    mqtt_payloads = telemetry_payloads(settings.devices, per_device, period=period)
    http_payloads = telemetry_payloads(
        settings.http_devices, per_device, period=period, prefix="http-sensor", seed=8
    )
    coap_payloads = telemetry_payloads(
        settings.coap_devices, per_device, period=period, prefix="coap-sensor", seed=9
    )
    log_messages = log_payloads(
        settings.log_devices, max(1, int(settings.seconds)), prefix="gateway", seed=10
    )
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
    ids = sorted(
        {d for d, _ in mqtt_payloads + http_payloads + coap_payloads}
        | set(machines)
        | {m.device for m in log_messages}
    )
    tokens = {device: secrets.token_urlsafe(18) for device in ids}
    registry = DeviceRegistry(Device(d, t) for d, t in tokens.items())
    (data_dir / "devices.yaml").write_text(
        yaml.safe_dump({"devices": [{"id": d, "token": t} for d, t in tokens.items()]})
    )
    edge_account = EdgeAccount("edgesieve-demo", secrets.token_urlsafe(18))
    stop = threading.Event()
    expected_telemetry = len(mqtt_payloads) + len(http_payloads) + len(coap_payloads)
    expected_vibration = block_count * len(machines)
    expected_logs = len(log_messages)
    deadline_s = settings.seconds * 3 + 30
    results: dict[str, Any] = {}

    cloud_secret = secrets.token_urlsafe(18)
    cloud_db = data_dir / "cloud.duckdb"
    with (
        stop_on_signals(stop),
        CloudReceiver("127.0.0.1:0", cloud_db, {"demo-edge": cloud_secret}) as receiver,
        start_broker(
            data_dir / "broker", kind=settings.broker, registry=registry, edge=edge_account
        ) as broker,
    ):
        config = _demo_config(data_dir, broker.url, edge_account, receiver.port, cloud_secret)
        transports = config.transports
        assert transports.http is not None and transports.coap is not None
        print(f"broker: {type(broker).__name__} on {broker.url} (registry passwords and ACL)")
        print(f"cloud: reference receiver on 127.0.0.1:{receiver.port}, storing into {cloud_db}")
        print(
            f"edge: flows.edge on MQTT, http://{transports.http.listen}, "
            f"coap://{transports.coap.listen}; outputs in {data_dir}"
        )
        print(
            f"devices: {settings.devices} MQTT, {settings.http_devices} HTTP and "
            f"{settings.coap_devices} CoAP sensors ({expected_telemetry} messages), "
            f"{len(machines)} machines ({expected_vibration} vibration blocks), "
            f"{settings.log_devices} services logging over HTTP ({expected_logs} messages) "
            f"over {settings.seconds:g}s"
        )

        flow = Edge(config, name="edge", stop=stop)
        edge.build(flow)
        meter = flow.meter

        def edge_run() -> None:
            try:
                results["edge"] = flow.run()
            except BaseException as exc:
                results["error"] = exc
                stop.set()

        edge_thread = threading.Thread(target=edge_run, name="demo-edge", daemon=True)
        sending: dict[str, float] = {}

        def left() -> float:
            since = sending.get("since")
            return settings.seconds - (time.monotonic() - since if since else 0.0)

        console = StatusConsole(flow, every=status_every, left=left)
        console.__enter__()
        edge_thread.start()

        def posts(payloads: list[tuple[str, bytes]]) -> list[Post]:
            return [Post(tokens[d], "telemetry", body) for d, body in payloads]

        by_device: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
        for device, body in mqtt_payloads:
            by_device[device].append((f"v1/devices/{device}/telemetry", body))
        rate = settings.rate_per_device
        jobs: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = [
            (
                publish,
                (broker.url, msgs),
                {
                    "rate_per_s": rate,
                    "deadline_s": deadline_s,
                    "stop": stop,
                    "username": device,
                    "password": tokens[device],
                },
            )
            for device, msgs in by_device.items()
        ]
        jobs += [
            (
                publish_vibration,
                (broker.url, device, device_blocks),
                {
                    "rate_per_s": machine_rate,
                    "deadline_s": deadline_s,
                    "stop": stop,
                    "token": tokens[device],
                },
            )
            for device, device_blocks in machines.items()
        ]
        if http_payloads:
            jobs.append(
                (
                    post_http,
                    (f"http://{transports.http.listen}", posts(http_payloads)),
                    {
                        "rate_per_s": rate * settings.http_devices,
                        "deadline_s": deadline_s,
                        "stop": stop,
                    },
                )
            )
        if log_messages:
            jobs.append(
                (
                    post_http,
                    (
                        f"http://{transports.http.listen}",
                        [Post(tokens[m.device], "logs", m.body) for m in log_messages],
                    ),
                    {
                        "rate_per_s": float(settings.log_devices),
                        "deadline_s": deadline_s,
                        "stop": stop,
                    },
                )
            )
        if coap_payloads:
            jobs.append(
                (
                    post_coap,
                    (transports.coap.listen, posts(coap_payloads)),
                    {
                        "rate_per_s": rate * settings.coap_devices,
                        "deadline_s": deadline_s,
                        "stop": stop,
                    },
                )
            )

        def run_job(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            try:
                results.setdefault(fn.__name__, []).append(fn(*args, **kwargs))
            except Exception:
                log.exception("simulated devices (%s) failed", fn.__name__)

        try:
            if not flow.wait_ready(timeout=30):  # devices start once the edge listens
                log.warning("the edge's inputs were not all ready after 30 s; devices start anyway")
            senders = [threading.Thread(target=run_job, args=job, daemon=True) for job in jobs]
            sending["since"] = time.monotonic()
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join(timeout=deadline_s + 10)
            flows = {m.flow: m for m in meter.family()}
            expected = {
                "telemetry": expected_telemetry,
                "vibration": expected_vibration,
                "logs": expected_logs,
            }
            until = time.monotonic() + 30
            while (
                time.monotonic() < until
                and not stop.is_set()
                and any(flows[f].totals[RECEIVED] < n for f, n in expected.items() if f in flows)
            ):
                time.sleep(0.1)
        finally:
            stop.set()
            edge_thread.join()
            console.__exit__(None, None, None)
    if "error" in results:
        raise results["error"]
    reports: dict[str, FlowReport] = {
        f: r for f, r in results["edge"].reports.items() if f != "edge"
    }
    for rep in reports.values():
        print(rep.render())
    for name in ("post_http", "post_coap"):
        for stats in results.get(name, []):
            kind = name.removeprefix("post_")
            print(f"{kind} devices: {stats.sent} requests, answers {stats.answers}")
    for flow, (batches, rows, raw, wire) in sorted(cloud_totals(cloud_db).items()):
        ratio = ratio_text(raw / wire) if wire else "n/a"
        print(
            f"cloud received for {flow}: {batches} batches, {rows} rows, {raw} raw bytes, "
            f"{wire} wire bytes -> reduction {ratio} (receiver's uplink_batches)"
        )
    alarms = reports["vibration"].stages.get("alarms", 0) if "vibration" in reports else 0
    print(f"alarms: {alarms} raised/cleared events (also published on v1/devices/+/alarms)")
    raw = sum(r.raw_bytes for r in reports.values())
    out = sum(r.reduced_bytes() for r in reports.values())
    if out:
        print(f"total: {raw} raw bytes in, {out} bytes out, reduction {ratio_text(raw / out)}")
    print("reports: " + ", ".join(f"{data_dir}/report-{name}.json" for name in sorted(reports)))
    from flows.report import build_report

    page = build_report(data_dir, data_dir / "report.html", cloud=cloud_db)
    print(f"report with charts: {page} (open it in a browser; `edgesieve report` remakes it)")
    return reports
