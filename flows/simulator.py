"""Simulated devices for the demo, tests and benchmarks.

Telemetry devices report temperature and humidity as slow random walks with
sensor noise and rare steps — the shape real environmental sensors have, and
the reason a deadband removes most of their traffic. Series are generated
with NumPy up front; publishing is bounded in message count and time.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import numpy as np
import paho.mqtt.client as mqtt

__all__ = ["PublishStats", "publish", "publish_telemetry", "telemetry_payloads"]

MAX_IN_FLIGHT = 1000
"""Messages a publisher may have unacknowledged; bounds its memory and message ids."""


def telemetry_payloads(
    device_count: int,
    messages_per_device: int,
    *,
    period: timedelta = timedelta(seconds=1),
    start: datetime | None = None,
    seed: int = 7,
    with_ts: bool = True,
) -> list[tuple[str, bytes]]:
    """``(device_id, json_payload)`` pairs, interleaved across devices in time order."""
    rng = np.random.default_rng(seed)
    n = messages_per_device
    shape = (device_count, n)
    steps = rng.normal(0.0, 0.01, shape) + (rng.random(shape) < 0.002) * rng.normal(0, 1.5, shape)
    temperature = 21.0 + rng.normal(0, 2, (device_count, 1)) + np.cumsum(steps, axis=1)
    temperature += rng.normal(0, 0.02, shape)
    humidity = np.clip(45.0 + np.cumsum(rng.normal(0, 0.03, shape), axis=1), 0, 100)
    start = start if start is not None else datetime.now(UTC)
    start_ms = int(start.timestamp() * 1000)
    period_ms = int(period.total_seconds() * 1000)
    ids = [f"sensor-{i:03d}" for i in range(device_count)]
    out: list[tuple[str, bytes]] = []
    for j in range(n):
        ts = start_ms + j * period_ms
        for i, device in enumerate(ids):
            values = {
                "temperature": round(float(temperature[i, j]), 3),
                "humidity": round(float(humidity[i, j]), 2),
            }
            body = {"ts": ts, "values": values} if with_ts else values
            out.append((device, json.dumps(body, separators=(",", ":")).encode()))
    return out


@dataclass
class PublishStats:
    """What a publisher sent."""

    messages: int = 0
    bytes: int = 0
    seconds: float = 0.0


def publish(
    url: str,
    messages: Iterable[tuple[str, bytes]],
    *,
    rate_per_s: float | None = None,
    qos: int = 1,
    deadline_s: float = 120.0,
    stop: threading.Event | None = None,
    username: str | None = None,
) -> PublishStats:
    """Publish ``(topic, payload)`` pairs with one client, paced to ``rate_per_s``.

    Bounded: stops after the last message, at ``deadline_s`` or when ``stop`` is
    set; at most :data:`MAX_IN_FLIGHT` messages wait for their acknowledgement.
    """
    parts = urlsplit(url)
    stats = PublishStats()
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgesieve-sim-{time.monotonic_ns()}"
    )
    if username or parts.username:
        client.username_pw_set(parts.username or username, parts.password)
    client.max_inflight_messages_set(MAX_IN_FLIGHT)
    client.max_queued_messages_set(0)
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
    client.loop_start()
    t0 = time.monotonic()
    pending: deque[mqtt.MQTTMessageInfo] = deque()
    try:
        for i, (topic, payload) in enumerate(messages):
            now = time.monotonic() - t0
            if now > deadline_s or (stop is not None and stop.is_set()):
                break
            if rate_per_s:
                ahead = i / rate_per_s - now
                if ahead > 0:
                    if now + ahead > deadline_s:
                        break
                    time.sleep(ahead)
            pending.append(client.publish(topic, payload, qos=qos))
            stats.messages += 1
            stats.bytes += len(payload)
            if len(pending) >= MAX_IN_FLIGHT:
                pending.popleft().wait_for_publish(timeout=max(1.0, deadline_s - now))
        for info in pending:
            info.wait_for_publish(timeout=max(1.0, deadline_s - (time.monotonic() - t0)))
    finally:
        stats.seconds = time.monotonic() - t0
        client.disconnect()
        client.loop_stop()
    return stats


def publish_telemetry(
    url: str,
    payloads: list[tuple[str, bytes]],
    *,
    rate_per_s: float | None = None,
    qos: int = 1,
    deadline_s: float = 120.0,
    stop: threading.Event | None = None,
) -> PublishStats:
    """Publish ``(device, payload)`` pairs to ``v1/devices/{device}/telemetry``."""
    messages = ((f"v1/devices/{device}/telemetry", payload) for device, payload in payloads)
    return publish(url, messages, rate_per_s=rate_per_s, qos=qos, deadline_s=deadline_s, stop=stop)
