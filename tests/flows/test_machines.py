from __future__ import annotations

import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import bytewax.operators as op
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from connectors.codecs.evb1 import decode_vibration
from flows.machines import KINDS, Machine, blocks, publish_vibration
from operators.records import DeadLetter, RawMessage, VibrationBlock
from operators.spectral import Features, spectral

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def features_of(
    payloads: list[bytes], device: str = "pump-7", **settings_: object
) -> dict[str, list[Features]]:
    """Run EVB1 payloads through decode -> key by device -> spectral; rows by axis."""
    flow = Dataflow("machines_test")
    msgs = [RawMessage(device, "vibration", "mqtt", T0, p) for p in payloads]
    s = op.input("in", flow, TestingSource(msgs, batch_size=8))
    decoded = op.map("decode", s, decode_vibration)
    keyed = op.key_on("key", decoded, lambda b: b.device)
    out = spectral("spectral", keyed, **settings_)
    features: list[tuple[str, Features]] = []
    errors: list[tuple[str, DeadLetter]] = []
    op.output("features", out.features, TestingSink(features))
    op.output("errors", out.errors, TestingSink(errors))
    run_main(flow)
    assert errors == []
    by_axis: dict[str, list[Features]] = defaultdict(list)
    for _, f in features:
        by_axis[f.axis].append(f)
    return dict(by_axis)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("split", [1, 1000, 4095, 4096, 7777])
def test_signal_is_continuous_across_calls(kind, split):
    machine = Machine(kind, seed=3)
    n = 2 * 8192
    whole = machine.signal(0, n)
    assert whole.shape == (n, 3) and whole.dtype == np.float64
    parts = np.concatenate([machine.signal(0, split), machine.signal(split, n - split)])
    np.testing.assert_array_equal(parts, whole)
    later = machine.signal(100_000, 5000)
    np.testing.assert_array_equal(
        later, np.concatenate([machine.signal(100_000, 10), machine.signal(100_010, 4990)])
    )


def test_signal_is_deterministic_and_seeded():
    a = Machine("healthy", seed=1).signal(0, 4096)
    np.testing.assert_array_equal(a, Machine("healthy", seed=1).signal(0, 4096))
    b = Machine("healthy", seed=2).signal(0, 4096)
    assert not np.array_equal(a, b)
    noiseless = Machine("healthy", noise_rms=0.0).signal(0, 4096)
    assert np.std(a - noiseless) == pytest.approx(0.05, rel=0.1)


def test_axes_and_sample_rate_are_honoured():
    machine = Machine("bearing", axes=1, sample_rate_hz=51_200)
    assert machine.signal(0, 100).shape == (100, 1)
    (block,) = blocks(machine, device="m", count=1, start_ts=T0)
    decoded = decode_vibration(RawMessage("m", "vibration", "mqtt", T0, block))
    assert isinstance(decoded, VibrationBlock)
    assert decoded.sample_rate_hz == 51_200 and decoded.axes == 1


def test_healthy_machine_is_in_zone_a_on_every_row():
    rows = features_of(blocks(Machine("healthy"), device="pump-7", count=25, start_ts=T0), frames_per_row=1)
    assert sorted(rows) == ["x", "y", "z"]
    for axis, features in rows.items():
        assert len(features) == 25
        assert {f.iso_zone for f in features} == {"A"}, axis
        assert all(0.1 < f.velocity_rms_mm_s < 1.0 for f in features)
        assert all(f.kurtosis < 4 for f in features)
        # The dominant line is the shaft speed (within one 6.25 Hz bin).
        assert all(abs(f.dominant_hz - 24.75) <= 6.25 for f in features)


def test_imbalance_is_in_zone_c_or_d_on_every_row():
    rows = features_of(blocks(Machine("imbalance", seed=5), device="fan-2", count=25, start_ts=T0))
    for axis in ("x", "y"):
        assert {f.iso_zone for f in rows[axis]} == {"D"}
        assert all(6.0 < f.velocity_rms_mm_s < 7.2 for f in rows[axis])
    assert {f.iso_zone for f in rows["z"]} == {"C"}
    for features in rows.values():
        assert all(abs(f.dominant_hz - 24.75) <= 6.25 for f in features)
        assert all(f.kurtosis < 2 for f in features)


def test_bearing_fault_is_impulsive_with_energy_at_the_resonance():
    healthy = features_of(blocks(Machine("healthy"), device="m", count=25, start_ts=T0))
    bearing = features_of(blocks(Machine("bearing"), device="m", count=25, start_ts=T0))
    for axis, features in bearing.items():
        assert all(f.kurtosis > 5 for f in features), axis
        assert all(f.crest_factor > 5 for f in features), axis
        # The fault does not show in velocity: the resonance is far above 1 kHz.
        assert {f.iso_zone for f in features} == {"A"}
        high = np.mean([f.band_energy[2] for f in features])
        assert high > 10 * np.mean([f.band_energy[2] for f in healthy[axis]])
        assert high > 0.5 * sum(np.mean([f.band_energy for f in features], axis=0))
    assert all(3000 < f.dominant_hz < 4200 for f in bearing["x"])


def test_one_second_rows_with_frames_per_row():
    rows = features_of(
        blocks(Machine("bearing"), device="m", count=24, start_ts=T0), frames_per_row=6
    )
    assert [len(v) for v in rows.values()] == [4, 4, 4]
    assert rows["x"][1].ts == T0 + timedelta(seconds=6 * 4096 / 25_600)
    assert rows["x"][0].window_s == pytest.approx(0.96)


def test_blocks_are_contiguous_evb1_payloads():
    machine = Machine("imbalance")
    payloads = blocks(machine, device="m", block_frames=1000, count=5, start_ts=T0)
    assert len(payloads) == 5
    decoded = [decode_vibration(RawMessage("m", "vibration", "mqtt", T0, p)) for p in payloads]
    assert all(isinstance(b, VibrationBlock) for b in decoded)
    # Sample periods rounded half up to the microsecond: 39.0625 ms -> 39063 µs.
    assert [b.start_ts for b in decoded] == [
        T0 + timedelta(microseconds=us) for us in (0, 39_063, 78_125, 117_188, 156_250)
    ]
    assert all(len(p) == 24 + 1000 * 3 * 4 for p in payloads)
    joined = np.concatenate([b.samples for b in decoded])
    np.testing.assert_allclose(joined, machine.signal(0, 5000), rtol=1e-6, atol=1e-6)

    as_int16 = blocks(machine, device="m", count=2, start_ts=T0, dtype="int16")
    block = decode_vibration(RawMessage("m", "vibration", "mqtt", T0, as_int16[1]))
    assert isinstance(block, VibrationBlock)
    assert len(as_int16[1]) == 24 + 4096 * 3 * 2
    np.testing.assert_allclose(block.samples, machine.signal(4096, 4096), atol=2e-4)
    assert blocks(machine, device="m", count=0, start_ts=T0) == []


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (
            {"kind": "broken"},
            r"Machine `kind` must be one of healthy, imbalance, bearing; got 'broken'\. "
            r"Hint: Machine\('bearing'\)",
        ),
        ({"kind": "healthy", "axes": 4}, r"Machine `axes` must be 1, 2 or 3 \(x, y, z\); got 4\."),
        (
            {"kind": "healthy", "sample_rate_hz": 0},
            r"Machine `sample_rate_hz` must be a positive int; got 0\. Hint: 25_600",
        ),
        (
            {"kind": "healthy", "running_hz": 5000.0},
            r"Machine `running_hz` must be > 0 and well below the sample rate \(25600 Hz\); "
            r"got 5000\.0\. Hint: 24\.75 is 1485 rpm\.",
        ),
        (
            {"kind": "healthy", "noise_rms": -1.0},
            r"Machine `noise_rms` must be a finite number >= 0 m/s²; got -1\.0\.",
        ),
    ],
)
def test_machine_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        Machine(**kwargs)


def test_signal_and_blocks_errors():
    machine = Machine("healthy")
    with pytest.raises(
        ValueError, match=r"signal needs start_sample >= 0 and frames >= 0; got -1, 10"
    ):
        machine.signal(-1, 10)
    with pytest.raises(
        ValueError, match=r"blocks for 'm': block_frames must be an int >= 1; got 0"
    ):
        blocks(machine, device="m", block_frames=0, count=1, start_ts=T0)
    with pytest.raises(ValueError, match=r"blocks for 'm': count must be an int >= 0; got -2"):
        blocks(machine, device="m", count=-2, start_ts=T0)


def subscribe(port: int, topic: str) -> tuple[mqtt.Client, list[tuple[str, bytes]]]:
    received: list[tuple[str, bytes]] = []
    ready = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{time.monotonic_ns()}")
    client.on_message = lambda _c, _u, m: received.append((m.topic, m.payload))
    client.on_subscribe = lambda *_a: ready.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe(topic, qos=1)
    assert ready.wait(10), "subscription not acknowledged"
    return client, received


def test_publish_vibration_sends_every_block_to_the_device_topic(mosquitto, wait_for):
    payloads = blocks(Machine("bearing"), device="pump-7", count=12, start_ts=T0)
    client, received = subscribe(mosquitto.port, "v1/devices/+/vibration")
    try:
        sent = publish_vibration(mosquitto.url, "pump-7", payloads, rate_per_s=None)
        assert sent == 12
        wait_for(lambda: len(received) >= 12, "12 vibration blocks")
    finally:
        client.disconnect()
        client.loop_stop()
    assert [t for t, _ in received] == ["v1/devices/pump-7/vibration"] * 12
    assert [p for _, p in received] == payloads


def test_publish_vibration_is_paced_and_bounded_by_the_deadline(mosquitto):
    payloads = blocks(Machine("healthy"), device="m", block_frames=256, count=100, start_ts=T0)
    t0 = time.monotonic()
    sent = publish_vibration(mosquitto.url, "m", payloads[:5], rate_per_s=20)
    assert sent == 5
    assert time.monotonic() - t0 >= 4 / 20
    t0 = time.monotonic()
    sent = publish_vibration(mosquitto.url, "m", payloads, rate_per_s=10, deadline_s=0.5)
    elapsed = time.monotonic() - t0
    assert 3 <= sent <= 7
    assert elapsed < 3.0
    stop = threading.Event()
    stop.set()
    assert publish_vibration(mosquitto.url, "m", payloads, rate_per_s=None, stop=stop) == 0
