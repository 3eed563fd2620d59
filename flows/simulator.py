"""Simulated devices for the demo, tests and benchmarks.

Telemetry devices report temperature and humidity as slow random walks with
sensor noise and rare steps — the shape real environmental sensors have, and
the reason a deadband removes most of their traffic. Series are generated
with NumPy up front; publishing is bounded in message count and time.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import numpy as np
import paho.mqtt.client as mqtt

__all__ = [
    "LogMessage",
    "Post",
    "PostStats",
    "PublishStats",
    "post_coap",
    "post_http",
    "publish",
    "log_payloads",
    "publish_telemetry",
    "telemetry_payloads",
]

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
    prefix: str = "sensor",
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
    ids = [f"{prefix}-{i:03d}" for i in range(device_count)]
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


LOG_CHATTER = (
    ("info", "request {method} /api/v1/items/{n} took {ms} ms status 200"),
    ("debug", "cache hit ratio {pct}% over {n} lookups"),
    ("info", "worker {w} processed batch {n} of {m} records"),
    ("debug", "heartbeat from peer 10.0.{w}.{n} rtt {ms} ms"),
    ("info", "user {n} logged in from 192.168.{w}.{m}"),
)
"""INFO/DEBUG lines services log all the time (numbers vary, templates repeat)."""
LOG_TROUBLE = (
    ("warning", "slow query on table orders: {ms} ms (threshold 500 ms)"),
    ("error", "upstream payment-gateway returned 503 after {ms} ms (attempt {w})"),
    ("error", "failed to write segment {n}: disk quota exceeded ({pct}% used)"),
)
"""WARN/ERROR lines of a burst of trouble."""


@dataclass(frozen=True)
class LogMessage:
    """One logs message a service sends: its JSON lines, and the ERROR lines among them."""

    device: str
    sent_at: datetime
    body: bytes
    errors: tuple[str, ...]


def log_payloads(
    services: int,
    seconds: int,
    *,
    start: datetime | None = None,
    seed: int = 13,
    prefix: str = "svc",
) -> list[LogMessage]:
    """Services logging JSON lines: one message per second per service holding its lines.

    Each second a service logs 2-8 lines of INFO/DEBUG chatter; now and then
    (0.4 % of its seconds) a burst of 3-14 s begins in which 30 % of its lines
    are WARN/ERROR. Reproducible from ``seed``; in time order across services.
    """
    rng = np.random.default_rng(seed)
    start = start if start is not None else datetime.now(UTC)
    out: list[LogMessage] = []
    burst_until = dict.fromkeys(range(services), -1)
    for second in range(seconds):
        when = start + timedelta(seconds=second)
        for s in range(services):
            device = f"{prefix}-{s:02d}"
            if burst_until[s] < second and rng.random() < 0.004:
                burst_until[s] = second + int(rng.integers(3, 15))
            lines, errors = [], []
            for _ in range(int(rng.integers(2, 9))):
                if burst_until[s] >= second and rng.random() < 0.3:
                    level, text = LOG_TROUBLE[int(rng.integers(len(LOG_TROUBLE)))]
                else:
                    level, text = LOG_CHATTER[int(rng.integers(len(LOG_CHATTER)))]
                msg = text.format(
                    method=("GET", "POST", "PUT")[int(rng.integers(3))],
                    n=int(rng.integers(1, 100_000)),
                    m=int(rng.integers(1, 256)),
                    ms=int(rng.integers(1, 3000)),
                    pct=int(rng.integers(1, 100)),
                    w=int(rng.integers(1, 16)),
                )
                ts = int(when.timestamp() * 1000) + int(rng.integers(0, 1000))
                line = {"ts": ts, "level": level, "msg": msg, "service": device, "pid": 4000 + s}
                lines.append(json.dumps(line, separators=(",", ":")))
                if level == "error":
                    errors.append(msg)
            out.append(LogMessage(device, when, "\n".join(lines).encode(), tuple(errors)))
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
    password: str | None = None,
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
        client.username_pw_set(parts.username or username, parts.password or password)
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


@dataclass(frozen=True)
class Post:
    """One device request: the device's token, the channel and the body."""

    token: str
    channel: str
    body: bytes


@dataclass
class PostStats:
    """What a poster sent and how the edge answered (status code -> count)."""

    sent: int = 0
    bytes: int = 0
    seconds: float = 0.0
    answers: dict[str, int] = field(default_factory=dict)

    def count(self, answer: str) -> None:
        """Record one answer (an HTTP status or a CoAP code)."""
        self.answers[answer] = self.answers.get(answer, 0) + 1


async def _paced(
    posts: list[Post],
    send: Callable[[Post], Awaitable[str]],
    *,
    rate_per_s: float | None,
    deadline_s: float,
    stop: threading.Event | None,
    concurrency: int,
) -> PostStats:
    stats = PostStats()
    t0 = time.monotonic()
    gate = asyncio.Semaphore(concurrency)

    async def one(post: Post) -> None:
        try:
            answer = await asyncio.wait_for(send(post), timeout=10)
        except Exception as exc:  # a refused or timed-out request is counted, not raised
            answer = type(exc).__name__
        finally:
            gate.release()
        stats.count(answer)

    tasks = []
    for i, post in enumerate(posts):
        now = time.monotonic() - t0
        if now > deadline_s or (stop is not None and stop.is_set()):
            break
        if rate_per_s:
            ahead = i / rate_per_s - now
            if ahead > 0:
                await asyncio.sleep(ahead)
        await gate.acquire()
        tasks.append(asyncio.create_task(one(post)))
        stats.sent += 1
        stats.bytes += len(post.body)
    await asyncio.gather(*tasks)
    stats.seconds = time.monotonic() - t0
    return stats


def post_http(
    base_url: str,
    posts: list[Post],
    *,
    rate_per_s: float | None = None,
    deadline_s: float = 120.0,
    stop: threading.Event | None = None,
    concurrency: int = 8,
) -> PostStats:
    """POST each body to ``{base_url}/api/v1/{token}/{channel}`` over keep-alive connections.

    Bounded in count (``posts``), time (``deadline_s``) and concurrency.
    """
    import aiohttp

    async def run() -> PostStats:
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(base_url, connector=connector) as session:

            async def send(post: Post) -> str:
                kind = (
                    "application/octet-stream"
                    if post.channel == "vibration"
                    else "application/x-ndjson"
                    if post.channel == "logs"
                    else "application/json"
                )
                url = f"/api/v1/{post.token}/{post.channel}"
                async with session.post(
                    url, data=post.body, headers={"Content-Type": kind}
                ) as resp:
                    await resp.read()
                    return str(resp.status)

            return await _paced(
                posts,
                send,
                rate_per_s=rate_per_s,
                deadline_s=deadline_s,
                stop=stop,
                concurrency=concurrency,
            )

    return asyncio.run(run())


def post_coap(
    host_port: str,
    posts: list[Post],
    *,
    rate_per_s: float | None = None,
    deadline_s: float = 120.0,
    stop: threading.Event | None = None,
    concurrency: int = 8,
    confirmable: bool = True,
) -> PostStats:
    """POST each body to ``coap://{host_port}/api/v1/{token}/{channel}`` (block-wise when large).

    Bounded in count (``posts``), time (``deadline_s``) and concurrency.
    """
    import aiocoap

    async def run() -> PostStats:
        # aiocoap keeps one confirmable exchange per server in flight, so each
        # concurrent sender gets its own client, like separate devices.
        contexts = [await aiocoap.Context.create_client_context() for _ in range(concurrency)]
        turn = itertools.count()
        try:

            async def send(post: Post) -> str:
                request = aiocoap.Message(
                    code=aiocoap.POST,
                    transport_tuning=aiocoap.Reliable if confirmable else aiocoap.Unreliable,
                    uri=f"coap://{host_port}/api/v1/{post.token}/{post.channel}",
                    payload=post.body,
                )
                context = contexts[next(turn) % len(contexts)]
                response = await context.request(request).response
                return str(response.code.dotted)

            return await _paced(
                posts,
                send,
                rate_per_s=rate_per_s,
                deadline_s=deadline_s,
                stop=stop,
                concurrency=concurrency,
            )
        finally:
            for context in contexts:
                await context.shutdown()

    return asyncio.run(run())
