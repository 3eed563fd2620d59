"""Simulated vibration sensors on rotating machines, for tests, benchmarks and the demo.

A :class:`Machine` produces a deterministic ``(frames, axes)`` acceleration
signal in m/s² that is continuous across calls, so it can be cut into EVB1
blocks of any size (:func:`blocks`) and published over MQTT
(:func:`publish_vibration`). Axes are x and y (radial, 90° apart) and z
(axial).

Three conditions, with the levels they give under the :func:`~operators.spectral.spectral`
defaults (4096-point FFT at 25.6 kHz, velocity RMS over 10–1000 Hz, ISO
thresholds 1.4 / 2.8 / 4.5 mm/s), all at ``running_hz = 24.75`` (1485 rpm):

``healthy``
    1x at 0.10 m/s² and 2x at 0.05 m/s² (radial; axial at 50%), plus
    sensor noise: velocity RMS about 0.49 mm/s radial and 0.24 mm/s axial,
    zone A; kurtosis 2.4 to 3.
``imbalance``
    The healthy signal plus a strong 1x from the rotating unbalance force,
    1.3 m/s² radial (x and y in quadrature, so the shaft orbit is a circle)
    and 0.8 m/s² axial: velocity RMS about 6.6 mm/s radial (zone D) and
    4.0 mm/s axial (zone C); kurtosis 1.5 (a sinusoid).
``bearing``
    The healthy signal plus an outer-race defect: impacts at BPFO (3.58x
    running speed, 88.6 Hz), each ringing a structural resonance at 3.6 kHz
    that decays with a 0.4 ms time constant, 4 m/s² on x (y 60%, z 35%),
    amplitude modulated ±20% at the shaft speed. Velocity stays in zone A
    (the resonance lies far above 1 kHz) while kurtosis is about 38 on x,
    33 on y and 29 on z, and the 1–5 kHz band holds 0.13 (m/s²)² on x
    against 0.0008 (sensor noise only) on a healthy machine; the dominant
    line on x is the BPFO harmonic nearest the resonance (about 3545 Hz).

The 1x line lies only four 6.25 Hz bins above DC, so the Hann window's
leakage biases its frequency-domain velocity up by about 3% (see
:func:`operators.spectral.spectral`); the zones above include that.

Noise is white Gaussian, ``noise_rms`` per axis, drawn per chunk of 4096
samples from a generator seeded with ``(seed, axis, chunk)``, so any range
of samples is the same whichever calls produced it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import numpy as np

from connectors.codecs.evb1 import encode_evb1
from flows.simulator import publish

__all__ = ["KINDS", "Machine", "blocks", "publish_vibration"]

KINDS = ("healthy", "imbalance", "bearing")
"""The machine conditions :class:`Machine` simulates."""

BPFO_ORDER = 3.58
"""Ball-pass frequency, outer race, as a multiple of the running speed."""

RESONANCE_HZ = 3600.0
"""Structural resonance the bearing impacts excite."""

RESONANCE_TAU_S = 0.0004
"""Decay time constant of the ringing after one impact."""

_NOISE_CHUNK = 4096
_AXIS_GAIN = np.array([1.0, 1.0, 0.5])
_IMBALANCE = np.array([1.3, 1.3, 0.8])
_IMPACT = np.array([4.0, 2.4, 1.4])
_HEALTHY_1X = 0.10
_HEALTHY_2X = 0.05
_RING = 12 * RESONANCE_TAU_S


@dataclass(frozen=True)
class Machine:
    """A rotating machine with a triaxial accelerometer.

    :arg kind: ``"healthy"``, ``"imbalance"`` or ``"bearing"`` (see the
        module docstring for the levels).
    :arg running_hz: Shaft speed in Hz (24.75 Hz is 1485 rpm).
    :arg sample_rate_hz: Samples per second per axis.
    :arg axes: 1 to 3 (x, y, z).
    :arg noise_rms: Sensor noise per axis, m/s² RMS.
    :arg seed: Seed of the noise; machines with different seeds have
        independent noise.
    """

    kind: Literal["healthy", "imbalance", "bearing"]
    running_hz: float = 24.75
    sample_rate_hz: int = 25_600
    axes: int = 3
    noise_rms: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            msg = (
                f"Machine `kind` must be one of {', '.join(KINDS)}; got {self.kind!r}. "
                "Hint: Machine('bearing') simulates an outer-race defect."
            )
            raise ValueError(msg)
        if isinstance(self.axes, bool) or self.axes not in (1, 2, 3):
            msg = f"Machine `axes` must be 1, 2 or 3 (x, y, z); got {self.axes!r}."
            raise ValueError(msg)
        if (
            isinstance(self.sample_rate_hz, bool)
            or not isinstance(self.sample_rate_hz, int)
            or self.sample_rate_hz < 1
        ):
            msg = (
                f"Machine `sample_rate_hz` must be a positive int; got "
                f"{self.sample_rate_hz!r}. Hint: 25_600 is common for vibration sensors."
            )
            raise ValueError(msg)
        if not (math.isfinite(self.running_hz) and 0 < self.running_hz < self.sample_rate_hz / 8):
            msg = (
                f"Machine `running_hz` must be > 0 and well below the sample rate "
                f"({self.sample_rate_hz} Hz); got {self.running_hz!r}. Hint: 24.75 is 1485 rpm."
            )
            raise ValueError(msg)
        if not (math.isfinite(self.noise_rms) and self.noise_rms >= 0):
            msg = f"Machine `noise_rms` must be a finite number >= 0 m/s²; got {self.noise_rms!r}."
            raise ValueError(msg)

    def signal(self, start_sample: int, frames: int) -> np.ndarray:
        """Return samples ``start_sample`` to ``start_sample + frames``, ``(frames, axes)`` m/s².

        Deterministic and continuous: ``signal(0, 2 * n)`` equals the
        concatenation of ``signal(0, n)`` and ``signal(n, n)``.
        """
        if start_sample < 0 or frames < 0:
            msg = f"signal needs start_sample >= 0 and frames >= 0; got {start_sample}, {frames}"
            raise ValueError(msg)
        fs = self.sample_rate_hz
        index = np.arange(start_sample, start_sample + frames, dtype=np.int64)
        t = index / fs
        phase = 2.0 * np.pi * self.running_hz * t
        axes = self.axes
        out = np.empty((frames, axes))
        for a in range(axes):
            shift = 0.5 * np.pi * a
            x = _AXIS_GAIN[a] * (
                _HEALTHY_1X * np.sin(phase + shift) + _HEALTHY_2X * np.sin(2.0 * phase + 0.3 + a)
            )
            if self.kind == "imbalance":
                x += _IMBALANCE[a] * np.sin(phase + shift + 0.2)
            out[:, a] = x
        if self.kind == "bearing":
            out += self._impacts(start_sample, frames)
        if self.noise_rms > 0:
            out += self._noise(start_sample, frames)
        return out

    def _impacts(self, start_sample: int, frames: int) -> np.ndarray:
        """Outer-race impacts, each ringing the resonance, over the requested samples."""
        fs = self.sample_rate_hz
        rate = BPFO_ORDER * self.running_hz
        ring = int(math.ceil(_RING * fs))
        t0 = (start_sample - ring) / fs
        t1 = (start_sample + frames) / fs
        first = max(0, math.ceil(t0 * rate))
        last = math.floor(t1 * rate)
        out = np.zeros((frames, self.axes))
        if last + 1 < first:
            return out
        j = np.arange(max(0, first - 1), last + 2)
        hit = np.rint(j * fs / rate).astype(np.int64) - (start_sample - ring)
        gain = 1.0 + 0.2 * np.cos(2.0 * np.pi * self.running_hz * j / rate)
        inside = (hit >= 0) & (hit < frames + ring)
        impulses = np.zeros(frames + ring)
        np.add.at(impulses, hit[inside], gain[inside])
        tk = np.arange(ring) / fs
        kernel = np.exp(-tk / RESONANCE_TAU_S) * np.sin(2.0 * np.pi * RESONANCE_HZ * tk)
        response = np.convolve(impulses, kernel)[ring : ring + frames]
        for a in range(self.axes):
            out[:, a] = _IMPACT[a] * response
        return out

    def _noise(self, start_sample: int, frames: int) -> np.ndarray:
        """White noise, generated per fixed chunk so any range is reproducible."""
        c0 = start_sample // _NOISE_CHUNK
        c1 = (start_sample + frames + _NOISE_CHUNK - 1) // _NOISE_CHUNK
        chunks = [
            np.stack(
                [
                    np.random.default_rng((self.seed, a, c)).standard_normal(_NOISE_CHUNK)
                    for a in range(self.axes)
                ],
                axis=1,
            )
            for c in range(c0, max(c1, c0 + 1))
        ]
        noise = np.concatenate(chunks)
        offset = start_sample - c0 * _NOISE_CHUNK
        return self.noise_rms * noise[offset : offset + frames]


def blocks(
    machine: Machine,
    *,
    device: str,
    block_frames: int = 4096,
    count: int,
    start_ts: datetime,
    dtype: Literal["int16", "float32"] = "float32",
) -> list[bytes]:
    """``count`` EVB1 blocks of ``block_frames`` frames each, contiguous in time.

    Block ``i`` holds samples ``i * block_frames`` onwards of
    ``machine.signal`` and starts at ``start_ts`` plus that many sample
    periods (rounded half up to the microsecond, EVB1's resolution). ``device`` is
    not part of the block (transports carry it); it names the machine in
    error messages.
    """
    if isinstance(block_frames, bool) or not isinstance(block_frames, int) or block_frames < 1:
        msg = f"blocks for {device!r}: block_frames must be an int >= 1; got {block_frames!r}"
        raise ValueError(msg)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        msg = f"blocks for {device!r}: count must be an int >= 0; got {count!r}"
        raise ValueError(msg)
    fs = machine.sample_rate_hz
    signal = machine.signal(0, block_frames * count)
    out = []
    for i in range(count):
        first = i * block_frames
        us = (first * 2_000_000 + fs) // (2 * fs)
        out.append(
            encode_evb1(
                signal[first : first + block_frames],
                sample_rate_hz=fs,
                start_ts=start_ts + timedelta(microseconds=us),
                dtype=dtype,
            )
        )
    return out


def publish_vibration(
    url: str,
    device: str,
    payloads: list[bytes],
    *,
    rate_per_s: float | None,
    qos: int = 1,
    deadline_s: float = 60,
    stop: threading.Event | None = None,
    token: str | None = None,
) -> int:
    """Publish ``payloads`` to ``v1/devices/{device}/vibration``; return how many were sent.

    Paced to ``rate_per_s`` blocks per second (``None``: as fast as the
    broker accepts them). Bounded: stops after the last payload, at
    ``deadline_s`` or when ``stop`` is set, and waits (within the deadline)
    for the last QoS 1/2 publish to be acknowledged. The client connects as
    ``device`` with ``token`` as password (the device API's MQTT credentials).
    """
    topic = f"v1/devices/{device}/vibration"
    stats = publish(
        url,
        ((topic, payload) for payload in payloads),
        rate_per_s=rate_per_s,
        qos=qos,
        deadline_s=deadline_s,
        stop=stop,
        username=device,
        password=token,
    )
    return stats.messages
