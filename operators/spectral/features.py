"""Vectorised feature math of the spectral operator: FFT frames to :class:`Features` rows.

All frames of a batch are stacked into one array and transformed with a
single ``numpy.fft.rfft`` call (:func:`frame_results`); :func:`row_features`
averages the per-frame results of a row (Welch's method) and derives band
energies, RMS, velocity RMS, peak, crest factor, kurtosis, the dominant
spectral line and the ISO zone. Python runs once per batch and once per
output row, never per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np

from operators.spectral.config import SpectralConfig

__all__ = [
    "AXIS_NAMES",
    "MAX_ABS_SAMPLE",
    "SILENT_PEAK",
    "CONSTANT_SPREAD",
    "Features",
    "Frames",
    "Plan",
    "frame_results",
    "row_features",
]

AXIS_NAMES = ("x", "y", "z")
"""Names of the axes of a block, in column order."""

MAX_ABS_SAMPLE = 1e100
"""Largest ``|sample|`` in m/s² the operator computes features of (blocks beyond are refused).

Every feature of samples within it is a finite float64: powers of FFT sums
stay far below 1.8e308. EVB1 cannot exceed about 1.2e77 (float32 × float32 scale).
"""

SILENT_PEAK = 1e-100
"""A frame whose largest ``|sample - frame mean|`` is at most this (m/s²) has no vibration.

So does a frame whose samples vary by at most :data:`CONSTANT_SPREAD` times
its mean (the rounding of a constant signal's mean). Such a frame counts as
exactly zero; a row of them has ``rms``, ``peak``, velocity and band
energies ``0.0`` and ``crest_factor`` and ``kurtosis`` (ratios to an RMS of
0) ``None``.
"""

CONSTANT_SPREAD = 1e-9
"""Relative spread below float32 resolution (6e-8): a frame within it is constant."""


@dataclass(frozen=True)
class Features:
    """Spectral and time-domain features of one axis over one row of frames.

    The ``vibration_features`` row. Each frame's mean (DC, e.g. gravity) is
    removed before anything is computed, so ``rms``, ``peak``,
    ``crest_factor`` and ``kurtosis`` describe the vibration only.

    - ``ts``: start of the row's first frame, timezone-aware UTC.
    - ``window_s``: seconds of signal the row covers (first frame start to
      last frame end); ``frames``: how many frames were averaged (fewer than
      ``frames_per_row`` only for a row flushed at a discontinuity or at end
      of input).
    - ``band_energy``: mean-square acceleration in (m/s²)² per configured
      band, from the one-sided Hann PSD (noise-bandwidth corrected), so bands
      that cover the whole spectrum add up to ``rms ** 2``.
    - ``rms``: time-domain acceleration RMS in m/s² over the row's frames.
    - ``velocity_rms_mm_s``: velocity RMS in mm/s over ``velocity_band_hz``,
      integrated in the frequency domain (``A(f) / 2πf``).
    - ``peak``: largest ``|acceleration|`` in m/s²; ``crest_factor`` is
      ``peak / rms`` and ``kurtosis`` is Pearson's (3 for Gaussian noise,
      1.5 for a sinusoid); both are ``None`` (null) for a row without
      vibration (:data:`SILENT_PEAK`: a silent or constant signal), where
      ``rms``, ``peak``, velocity and band energies are ``0.0``.

    Every value is finite or ``None``, never NaN or infinite, for any
    samples within :data:`MAX_ABS_SAMPLE`, and the math raises no NumPy
    warning: the fourth moment is kept relative to each frame's peak, so it
    cannot overflow for a saturated or huge-scale block.
    - ``dominant_hz`` / ``dominant_amplitude``: the largest line of the
      amplitude spectrum (DC excluded) in Hz and m/s² amplitude, refined
      between bins with the Hann window's exact main-lobe shape, so an
      off-bin tone is reported without scalloping loss. ``0.0`` for both
      when the spectrum is empty.
    - ``iso_zone``: ``"A"`` to ``"D"`` from ``velocity_rms_mm_s``.
    """

    device: str
    axis: str
    ts: datetime
    window_s: float
    sample_rate_hz: int
    band_energy: tuple[float, ...]
    rms: float
    velocity_rms_mm_s: float
    peak: float
    crest_factor: float | None
    kurtosis: float | None
    dominant_hz: float
    dominant_amplitude: float
    iso_zone: str
    transport: str
    frames: int


@dataclass
class Frames:
    """Per-frame results, frame axis first: ``power`` is ``(F, axes, bins)``.

    ``sumsq`` is ``Σx²`` in (m/s²)², ``peak`` is ``max |x|`` in m/s² and
    ``sum4`` is ``Σ(x / peak)⁴`` (0 for a frame without vibration), of the
    frame's samples ``x`` less their mean.
    """

    power: np.ndarray
    sumsq: np.ndarray
    sum4: np.ndarray
    peak: np.ndarray

    @property
    def count(self) -> int:
        """Number of frames."""
        return int(self.power.shape[0])

    def join(self, other: Frames) -> Frames:
        """These frames followed by ``other``."""
        if self.count == 0:
            return other
        return Frames(
            np.concatenate((self.power, other.power)),
            np.concatenate((self.sumsq, other.sumsq)),
            np.concatenate((self.sum4, other.sum4)),
            np.concatenate((self.peak, other.peak)),
        )

    def take(self, start: int, stop: int | None = None) -> Frames:
        """Frames ``start`` to ``stop`` (views, not copies)."""
        sl = slice(start, stop)
        return Frames(self.power[sl], self.sumsq[sl], self.sum4[sl], self.peak[sl])


class Plan:
    """Window, scaling and band weights for one ``(config, sample_rate)``."""

    def __init__(self, config: SpectralConfig, sample_rate_hz: int) -> None:
        n = config.fft_size
        window = np.hanning(n + 1)[:n]
        s1 = float(window.sum())
        s2 = float(np.dot(window, window))
        bins = n // 2 + 1
        freqs = np.arange(bins) * (sample_rate_hz / n)
        one_sided = np.full(bins, 2.0)
        one_sided[0] = 1.0
        one_sided[-1] = 1.0
        self.config = config
        self.sample_rate_hz = sample_rate_hz
        self.window = window
        self.df = sample_rate_hz / n
        self.freqs = freqs
        self.energy_weight = one_sided / (n * s2)
        self.amplitude_scale = 2.0 / s1
        self.bands = [
            (int(np.searchsorted(freqs, lo)), int(np.searchsorted(freqs, hi)))
            for lo, hi in config.bands_hz
        ]
        lo, hi = config.velocity_band_hz
        v0, v1 = int(np.searchsorted(freqs, lo)), int(np.searchsorted(freqs, hi))
        self.velocity = (v0, v1, 1.0 / (2.0 * np.pi * freqs[v0:v1]) ** 2)

    def band_energy(self, energy: np.ndarray) -> np.ndarray:
        """Sum per-bin energies ``(..., bins)`` over each band: ``(..., bands)``."""
        if not self.bands:
            return np.zeros((*energy.shape[:-1], 0))
        return np.stack([energy[..., i0:i1].sum(axis=-1) for i0, i1 in self.bands], axis=-1)

    def velocity_ms(self, energy: np.ndarray) -> np.ndarray:
        """Velocity RMS in m/s over the velocity band from per-bin acceleration energies."""
        v0, v1, weight = self.velocity
        return np.sqrt((energy[..., v0:v1] * weight).sum(axis=-1))


def frame_results(by_axis: np.ndarray, plan: Plan, count: int) -> Frames:
    """FFT ``count`` frames of ``by_axis`` ``(axes, samples)`` in one call.

    ``by_axis`` is a C-contiguous scratch copy; without overlap its frames
    are modified in place.
    """
    n, hop = plan.config.fft_size, plan.config.hop
    if hop == n:
        frames = by_axis[:, : count * n].reshape(by_axis.shape[0], count, n)
    else:
        view = np.lib.stride_tricks.sliding_window_view(by_axis, n, axis=1)[:, ::hop]
        frames = np.array(view[:, :count])
    mean = frames.mean(axis=2, keepdims=True)
    frames -= mean
    peak = np.abs(frames).max(axis=2)
    quiet = peak <= np.maximum(SILENT_PEAK, CONSTANT_SPREAD * np.abs(mean[..., 0]))
    if quiet.any():
        frames[quiet] = 0.0
        peak[quiet] = 0.0
    squared = frames * frames
    sumsq = squared.sum(axis=2)
    # (x / peak)^4 is in [0, 1]: x^4 itself overflows float64 beyond about 1e77 m/s²
    inverse = np.divide(1.0, peak, out=np.zeros_like(peak), where=peak > SILENT_PEAK)
    squared *= (inverse * inverse)[..., None]
    np.multiply(squared, squared, out=squared)
    sum4 = squared.sum(axis=2)
    frames *= plan.window
    spectrum = np.fft.rfft(frames, axis=2)
    power = spectrum.real * spectrum.real
    power += spectrum.imag * spectrum.imag
    return Frames(
        power=np.ascontiguousarray(power.transpose(1, 0, 2)),
        sumsq=np.ascontiguousarray(sumsq.T),
        sum4=np.ascontiguousarray(sum4.T),
        peak=np.ascontiguousarray(peak.T),
    )


def row_features(
    frames: Frames,
    per_row: int,
    starts: list[datetime],
    plan: Plan,
    *,
    device: str,
    transport: str,
) -> list[Features]:
    """Average ``per_row`` consecutive frames into rows; one :class:`Features` per row and axis.

    ``frames`` holds ``len(starts) * per_row`` frames; row ``r`` starts at
    ``starts[r]``.
    """
    config = plan.config
    rate = plan.sample_rate_hz
    rows = len(starts)
    power = frames.power[0::per_row].copy()
    sumsq = frames.sumsq[0::per_row].copy()
    peak = frames.peak[0::per_row].copy()
    for j in range(1, per_row):
        power += frames.power[j::per_row]
        sumsq += frames.sumsq[j::per_row]
        np.maximum(peak, frames.peak[j::per_row], out=peak)
    power /= per_row
    samples = per_row * config.fft_size
    mean_square = sumsq / samples
    rms = np.sqrt(mean_square)
    # crest factor and kurtosis relative to the row's peak: each frame's (x / peak_f)^4 sum
    # times (peak_f / peak)^4; all ratios are at most 1, so nothing overflows
    vibrating = peak > SILENT_PEAK
    scale = np.where(vibrating, peak, 1.0)
    sum4 = np.zeros_like(peak)
    for j in range(per_row):
        ratio = frames.peak[j::per_row] / scale
        ratio *= ratio
        sum4 += frames.sum4[j::per_row] * (ratio * ratio)
    relative_ms = np.where(vibrating, sumsq / (scale * scale) / samples, 1.0)
    crest = np.where(vibrating, 1.0 / np.sqrt(relative_ms), np.nan)
    kurtosis = np.where(vibrating, (sum4 / samples) / (relative_ms * relative_ms), np.nan)
    energy = power * plan.energy_weight
    band_energy = plan.band_energy(energy)
    velocity = plan.velocity_ms(energy) * 1000.0
    dominant_hz, dominant_amp = _dominant(power, plan)
    window_s = ((per_row - 1) * config.hop + config.fft_size) / rate

    zone = config.zone
    names = AXIS_NAMES
    axes = int(power.shape[1])
    out: list[Features] = []
    band_rows = band_energy.tolist()
    rms_l, vel_l, peak_l = rms.tolist(), velocity.tolist(), peak.tolist()
    crest_l, kurt_l = _nullable(crest), _nullable(kurtosis)
    hz_l, amp_l = dominant_hz.tolist(), dominant_amp.tolist()
    for r in range(rows):
        ts = starts[r]
        for a in range(axes):
            v = vel_l[r][a]
            out.append(
                Features(
                    device=device,
                    axis=names[a],
                    ts=ts,
                    window_s=window_s,
                    sample_rate_hz=rate,
                    band_energy=tuple(band_rows[r][a]),
                    rms=rms_l[r][a],
                    velocity_rms_mm_s=v,
                    peak=peak_l[r][a],
                    crest_factor=crest_l[r][a],
                    kurtosis=kurt_l[r][a],
                    dominant_hz=hz_l[r][a],
                    dominant_amplitude=amp_l[r][a],
                    iso_zone=zone(v),
                    transport=transport,
                    frames=per_row,
                )
            )
    return out


def _nullable(values: np.ndarray) -> list[list[float | None]]:
    """``values`` as nested lists with ``None`` where NaN marks an undefined feature."""
    rows = values.tolist()
    if np.isnan(values).any():
        rows = [[None if v != v else v for v in row] for row in rows]
    return rows


def _dominant(power: np.ndarray, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """Frequency and amplitude of the largest spectral line, DC excluded.

    ``power`` is mean ``|X|²`` of shape ``(rows, axes, bins)``. The peak bin
    ``k`` and its larger neighbour give the offset ``d`` of a tone from ``k``
    through the Hann main lobe, ``|W(1-d)| / |W(d)| = (1+d) / (2-d)``, and the
    amplitude is corrected by ``|W(0)| / |W(d)| = πd(1-d²) / sin(πd)``.
    """
    mag = np.sqrt(power)
    bins = mag.shape[-1]
    k = np.argmax(mag[..., 1:], axis=-1) + 1
    peak = np.take_along_axis(mag, k[..., None], axis=-1)[..., 0]
    left = np.take_along_axis(mag, (k - 1)[..., None], axis=-1)[..., 0]
    left = np.where(k - 1 >= 1, left, 0.0)
    right = np.take_along_axis(mag, np.minimum(k + 1, bins - 1)[..., None], axis=-1)[..., 0]
    right = np.where(k + 1 <= bins - 1, right, 0.0)
    side = np.where(right >= left, 1.0, -1.0)
    neighbour = np.maximum(left, right)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(peak > 0, neighbour / peak, 0.0)
    d = np.clip((2.0 * alpha - 1.0) / (alpha + 1.0), 0.0, 0.5)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(d > 0, np.pi * d * (1.0 - d * d) / np.sin(np.pi * d), 1.0)
    amplitude = peak * plan.amplitude_scale * gain
    hz = (k + side * d) * plan.df
    empty = peak <= 0
    return np.where(empty, 0.0, hz), np.where(empty, 0.0, amplitude)
