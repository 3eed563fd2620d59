"""Accepted means kept, for vibration: kill -9 the whole edge while a machine streams blocks.

An MQTT vibration sensor (QoS 1; the edge's persistent session exists before
it publishes) sends a fixed sequence of EVB1 blocks, contiguous in time, at
about real-time pace: a machine that runs healthy, unbalanced, healthy,
with a bearing defect, healthy and unbalanced again, so the alarm rules raise
and clear several times. Blocks are 3000 samples, so the 4096-sample frames
span blocks and a row (6 frames) spans 8 or 9 of them. Meanwhile
``edgesieve run flows.edge`` (one process group: the flow and its ingest
child) is killed with SIGKILL at random moments and restarted, with a real
cloud receiver up. After the device is done and the broker's backlog is in,
the edge stops cleanly (SIGTERM: end of input, which flushes the last,
partial row once, as in the reference).

The reference is the same blocks through the production ``Edge`` in this
process, uninterrupted, with the same settings except transports and cloud.
``vibration_features`` and ``alarms`` in Parquet, in ``edge.duckdb`` and in
the cloud must equal the reference rows exactly, every column (each depends
only on the blocks: timestamps are the device's, ``transport`` is ``mqtt`` in
both), and hold no two rows with the same natural key.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from connectors.cloud import CloudReceiver
from connectors.codecs.evb1 import encode_evb1
from connectors.streams import STREAMS
from flows import edge
from flows.config import parse_config
from flows.machines import Machine, publish_vibration
from operators.records import RawMessage
from tests.conftest import free_port, query_parquet, wait_for
from tests.flows.conftest import run_recorded
from tests.flows.test_durability import EDGE, start
from tests.flows.test_metrics import scrape, value

CYCLES = 14
RUN_S = (0.5, 3.0)
SECRET = "cloud-secret-for-vibration-chaos"
DEVICE = "vib-1"
T0 = datetime(2026, 11, 21, 8, 0, tzinfo=UTC)
FS = 25_600
BLOCK_FRAMES = 3000
RATE = FS / BLOCK_FRAMES  # blocks per second: real time
SEGMENTS = (
    ("healthy", 30),
    ("imbalance", 50),
    ("healthy", 40),
    ("bearing", 50),
    ("healthy", 40),
    ("imbalance", 50),
    ("healthy", 40),
)
"""The machine's condition over time, in blocks (300 blocks: 35 s of signal, 36.6 rows)."""

RULES = [
    {"name": "iso_zone_c", "raise_above": 2.8, "clear_below": 2.52, "min_count": 2},
    {
        "name": "iso_zone_d",
        "raise_above": 4.5,
        "clear_below": 4.05,
        "min_count": 2,
        "severity": "critical",
    },
    {
        "name": "impacts",
        "field": "kurtosis",
        "raise_above": 8.0,
        "clear_below": 5.0,
        "min_count": 2,
        "min_duration": 1.5,
    },
]
FEATURES = STREAMS["vibration_features"].columns
ALARMS = STREAMS["alarms"].columns
KEYS = {
    "vibration_features": ("device", "axis", "ts"),
    "alarms": ("device", "key", "rule", "ts", "state"),
}


def vibration_blocks() -> list[bytes]:
    """The sensor's blocks: each segment's machine continues the signal where the last left off."""
    parts, at = [], 0
    for seed, (kind, count) in enumerate(SEGMENTS):
        frames = count * BLOCK_FRAMES
        parts.append(Machine(kind, seed=seed).signal(at, frames))
        at += frames
    signal_ = np.concatenate(parts)
    out = []
    for first in range(0, len(signal_), BLOCK_FRAMES):
        us = (first * 2_000_000 + FS) // (2 * FS)  # as flows.machines.blocks rounds
        out.append(
            encode_evb1(
                signal_[first : first + BLOCK_FRAMES],
                sample_rate_hz=FS,
                start_ts=T0 + timedelta(microseconds=us),
            )
        )
    return out


def settings(data_dir: Path) -> dict:
    return {
        "data_dir": str(data_dir),
        "vibration": {"alarms": RULES},
        "recovery": {"snapshot_interval": 0.5},
        "parquet": {"max_file_age": 1},
    }


def chaos_config(tmp_path: Path, mqtt_url: str, cloud: int, metrics: int) -> Path:
    data = settings(tmp_path / "var")
    data["metrics_listen"] = f"127.0.0.1:{metrics}"
    data["transports"] = {"mqtt": {"url": mqtt_url, "client_id": "vib-chaos-edge"}}
    data["cloud"] = {
        "target": f"127.0.0.1:{cloud}",
        "key": "edge-01",
        "secret": SECRET,
        "batch_age": 1,
        "backoff_max": 1,
        "stop_timeout": 60,
    }
    config = tmp_path / "edge.yaml"
    config.write_text(json.dumps(data, indent=1))  # JSON is YAML
    return config


class AlarmListener:
    """A consumer of the edge's MQTT alarms (QoS 1): every payload it got, duplicates included."""

    def __init__(self, port: int) -> None:
        self.payloads: list[dict] = []
        self.subscribed = threading.Event()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id="alarm-listener")
        self._client.on_connect = lambda c, *_: c.subscribe("v1/devices/+/alarms", qos=1)
        self._client.on_subscribe = lambda *_: self.subscribed.set()
        self._client.on_message = lambda _c, _u, msg: self.payloads.append(json.loads(msg.payload))
        self._client.connect("127.0.0.1", port)

    def start(self) -> AlarmListener:
        self._client.loop_start()
        wait_for(self.subscribed.is_set, "the alarm listener to subscribe")
        return self

    def ids(self) -> set[str]:
        return {message["id"] for message in list(self.payloads)}

    def stop(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def ready(log: Path) -> int:
    """How many times an edge logging to ``log`` got ready (its ingest took devices)."""
    return log.read_bytes().count(b"ingest: ready")


def poll(cond: Callable[[], bool], timeout: float) -> bool:
    """Whether ``cond()`` came true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def parquet_keys(data: Path) -> list[tuple]:
    try:
        return query_parquet(data, "vibration_features", "select device, axis, ts from {src}")
    except duckdb.Error:  # a file replaced while read
        return []


def drained(port: int) -> bool:
    """Whether the edge serving /metrics on ``port`` has read everything the journal was given."""
    try:
        metrics = scrape(port)
    except OSError:  # not up (yet)
        return False
    names = (
        "edgesieve_journal_lag_messages",
        "edgesieve_journal_queued_messages",
        "edgesieve_mqtt_withheld_messages",
    )
    return all(value(metrics, name) == 0 for name in names)


def select(stream: str) -> str:
    return f"select {', '.join(STREAMS[stream].columns)} from {{src}}"


def rows_of(con: duckdb.DuckDBPyConnection, stream: str, source: str) -> list[tuple]:
    """The rows of ``stream`` in ``source``, sorted, lists (``band_energy``) as tuples."""
    rows = con.sql(select(stream).format(src=source)).fetchall()
    return sorted(tuple(tuple(v) if isinstance(v, list) else v for v in row) for row in rows)


def assert_no_duplicates(where: str, stream: str, rows: list[tuple]) -> None:
    columns = STREAMS[stream].columns
    index = [columns.index(k) for k in KEYS[stream]]
    keys = Counter(tuple(row[i] for i in index) for row in rows)
    doubled = sorted(k for k, n in keys.items() if n > 1)
    assert not doubled, (
        f"{where}: {stream} rows stored more than once: {doubled[:5]} ({len(doubled)})"
    )


def assert_rows(where: str, stream: str, got: list[tuple], want: list[tuple]) -> None:
    assert_no_duplicates(where, stream, got)
    if got == want:
        return
    missing = sorted(set(want) - set(got), key=repr)
    extra = sorted(set(got) - set(want), key=repr)
    pytest.fail(
        f"{where}: {stream} holds {len(got)} rows, the uninterrupted run {len(want)}; "
        f"missing {len(missing)} {missing[:3]}, unexpected {len(extra)} {extra[:3]}"
    )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[dict[str, list[tuple]], dict[str, list[tuple]]]:
    """Both streams of an uninterrupted run of the same blocks, sorted: local, and in the cloud.

    The cloud gets the reported feature rows only (``vibration.report``), as float32.
    """
    data = tmp_path_factory.mktemp("reference")
    received = datetime.now(UTC)  # blocks carry their own time; when they arrived is not used
    messages = [RawMessage(DEVICE, "vibration", "mqtt", received, b) for b in vibration_blocks()]
    port = free_port()
    config = settings(data) | {
        "cloud": {"target": f"127.0.0.1:{port}", "key": "edge-01", "secret": SECRET}
    }
    with CloudReceiver(f"127.0.0.1:{port}", data / "cloud.duckdb", {"edge-01": SECRET}):
        run_recorded(edge.build, parse_config(config), messages, name="edge", batch_size=7)
    local, cloud = {}, {}
    with duckdb.connect() as con:
        for stream in ("vibration_features", "alarms"):
            glob = data / "parquet" / stream / "**" / "*.parquet"
            local[stream] = rows_of(con, stream, f"read_parquet('{glob}', hive_partitioning=true)")
    with duckdb.connect(str(data / "cloud.duckdb"), read_only=True) as con:
        for stream in local:
            cloud[stream] = rows_of(con, stream, stream)
    return local, cloud


@pytest.fixture(scope="module")
def reference(reference_run) -> dict[str, list[tuple]]:
    """Both streams of an uninterrupted run of the same blocks, sorted, as kept on the edge."""
    return reference_run[0]


@pytest.fixture(scope="module")
def reference_cloud(reference_run) -> dict[str, list[tuple]]:
    """Both streams of an uninterrupted run as the cloud stored them."""
    return reference_run[1]


def test_the_cloud_gets_the_reported_rows_and_every_alarm(reference, reference_cloud):
    local, cloud = reference["vibration_features"], reference_cloud["vibration_features"]
    keys = {row[:3] for row in local}
    assert {row[:3] for row in cloud} <= keys and 6 <= len(cloud) < len(local)
    assert len(reference_cloud["alarms"]) == len(reference["alarms"])


def test_the_reference_raises_and_clears_alarms_again_and_again(reference):
    features, alarms = reference["vibration_features"], reference["alarms"]
    assert len(features) == 3 * 37  # 36 rows and, at end of input, a partial one
    assert sorted(Counter(row[FEATURES.index("frames")] for row in features).items()) == [
        (3, 3),
        (6, 108),
    ]
    ts, key, rule, state = (ALARMS.index(c) for c in ("ts", "key", "rule", "state"))
    episodes = Counter((row[rule], row[state]) for row in alarms)
    # two unbalanced spells raise zone C on every axis and zone D on x and y; the bearing spell
    # raises the impacts rule on every axis; each alarm clears in the healthy spell after it
    assert episodes == {
        ("iso_zone_c", "raised"): 6,
        ("iso_zone_c", "cleared"): 6,
        ("iso_zone_d", "raised"): 4,
        ("iso_zone_d", "cleared"): 4,
        ("impacts", "raised"): 3,
        ("impacts", "cleared"): 3,
    }
    for k in {(row[key], row[rule]) for row in alarms}:
        states = [
            row[state] for row in sorted(alarms, key=lambda r: r[ts]) if (row[key], row[rule]) == k
        ]
        assert states == ["raised", "cleared"] * (len(states) // 2), (k, states)


def test_kill_9_of_the_whole_edge_gives_the_vibration_rows_of_an_uninterrupted_run(
    tmp_path, mosquitto, reference, reference_cloud
):
    rng = random.Random(11)
    payloads = vibration_blocks()
    cloud_port, metrics_port = free_port(), free_port()
    config = chaos_config(tmp_path, mosquitto.url, cloud_port, metrics_port)
    data = tmp_path / "var"
    log = tmp_path / "edge.log"
    cloud_db = tmp_path / "cloud.duckdb"
    receiver = CloudReceiver(f"127.0.0.1:{cloud_port}", cloud_db, {"edge-01": SECRET}).start()
    listener = AlarmListener(mosquitto.port).start()
    proc = start(EDGE, config, log)
    sent: list[int] = []
    device = threading.Thread(
        target=lambda: sent.append(
            publish_vibration(mosquitto.url, DEVICE, payloads, rate_per_s=RATE, deadline_s=90)
        ),
        daemon=True,
    )
    try:
        for cycle in range(CYCLES):
            # each edge runs a while once up (under load, starting alone can take over a second)
            up = lambda c=cycle, p=proc: ready(log) > c or p.poll() is not None  # noqa: E731
            wait_for(up, "the edge to start", 60)
            assert proc.poll() is None, log.read_text()[-4000:]
            if cycle == 0:
                device.start()  # the edge's persistent session exists before the sensor publishes
            time.sleep(rng.uniform(*RUN_S))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            proc = start(EDGE, config, log)
        device.join(90)
        assert sent == [len(payloads)], f"the sensor published {sent} of {len(payloads)} blocks"

        # Stop cleanly only once every block is in the journal: a clean stop stops ingest (what
        # the broker still holds stays there), drains the journal through the flow, then ends
        # the input, which emits the partial row of what was read by then. Every complete row in
        # Parquet (files written after the resumed snapshot are removed at start, so the last edge
        # wrote them) means the broker's backlog reached the journal up to the last few blocks,
        # sent with them; nothing queued for or withheld from the journal and no journal lag
        # means the rest is in too.
        frames = FEATURES.index("frames")
        full = {row[:3] for row in reference["vibration_features"] if row[frames] == 6}
        done = lambda: drained(metrics_port) or proc.poll() is not None  # noqa: E731
        wait_for(done, "the last edge to start and read its backlog", 60)
        # (if some never come, the comparison below says which)
        poll(lambda: full <= set(parquet_keys(data)) or proc.poll() is not None, 30)
        wait_for(done, "the journal to drain", 30)
        time.sleep(1.0)
        assert drained(metrics_port), "the journal took more after the backlog was in"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log.read_text()[-4000:]
        alarms = len(reference["alarms"])
        wait_for(lambda: len(listener.ids()) >= alarms, "every alarm on MQTT", 10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        receiver.stop(grace=1)
        listener.stop()
    assert query_parquet(data, "dead_letters", "select reason from {src}") == []
    with duckdb.connect() as con:
        for stream, want in reference.items():
            glob = data / "parquet" / stream / "**" / "*.parquet"
            got = rows_of(con, stream, f"read_parquet('{glob}', hive_partitioning=true)")
            assert_rows("parquet", stream, got, want)
    with duckdb.connect(str(data / "edge.duckdb"), read_only=True) as con:
        for stream, want in reference.items():
            assert_rows("edge.duckdb", stream, rows_of(con, stream, f"main.{stream}"), want)
    with duckdb.connect(str(cloud_db), read_only=True) as con:
        for stream, want in reference_cloud.items():  # the same reported rows, despite the kills
            assert_rows("cloud", stream, rows_of(con, stream, stream), want)

    # MQTT alarms are at least once: a replay may publish one again, under the same id
    by_id: dict[str, set[str]] = {}
    for message in listener.payloads:
        by_id.setdefault(message.pop("id"), set()).add(json.dumps(message, sort_keys=True))
    assert all(len(v) == 1 for v in by_id.values()), "an alarm id was published with two contents"
    published = sorted(next(iter(v)) for v in by_id.values())
    columns = ("ts", "rule", "state", "severity", "value", "key")
    want = [
        dict(zip(columns, (int(row[1].timestamp() * 1000), *row[2:]), strict=True))
        for row in reference["alarms"]
    ]
    assert published == sorted(json.dumps(alarm, sort_keys=True) for alarm in want)

    # kills landed after rows had been written and before the next snapshot: rows were replayed
    text = (data / "logs" / "edgesieve.log").read_text()  # INFO lines: the log file
    replays = sum(
        text.count(f"(stream '{stream}', partition p0): resumed at file") for stream in reference
    )
    assert replays >= 3, f"only {replays} restarts replayed vibration rows or alarms"
