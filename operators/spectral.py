"""Spectral (FFT) features of vibration blocks: band energies, velocity RMS, ISO zone.

Each device's :class:`~operators.records.VibrationBlock` stream is cut into
Hann-windowed frames of ``fft_size`` samples (blocks need not align with
frames; the tail of one block is joined to the next), the power spectra of
``frames_per_row`` consecutive frames are averaged (Welch's method) and every
row yields one :class:`Features` record per axis: band energies, RMS,
velocity RMS over the ISO 10816 / 20816 band, peak, crest factor, kurtosis,
the dominant spectral line and the ISO zone.

All frames of a batch of blocks are stacked into one array and transformed
with a single ``numpy.fft.rfft`` call; Python runs once per batch and once
per output row, never per sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import bytewax.operators as op
import numpy as np
from bytewax.dataflow import operator
from bytewax.operators import KeyedStream, StatefulBatchLogic

from connectors.codecs.evb1 import encode_evb1
from operators.records import DeadLetter, VibrationBlock

__all__ = [
    "AXIS_NAMES",
    "Features",
    "SpectralConfig",
    "SpectralOut",
    "SpectralState",
    "spectral",
]

AXIS_NAMES = ("x", "y", "z")
"""Names of the axes of a block, in column order."""

_ZONES = ("A", "B", "C", "D")
_MIN_FFT = 64
_MAX_FFT = 1 << 20
_MAX_OVERLAP = 0.95
_ONE_US = timedelta(microseconds=1)
_PREFIX = "vibration: "


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)


def _pair(name: str, value: object, hint: str, *, positive: bool) -> tuple[float, float]:
    """Check a ``(lo, hi)`` frequency pair and return it as floats."""
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 2
        or not all(_is_number(v) for v in value)
    ):
        msg = (
            f"spectral `{name}` must be a pair of numbers (lo_hz, hi_hz); got "
            f"{_describe(value)}. Hint: {hint}"
        )
        raise TypeError(msg)
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        msg = f"spectral `{name}` must be finite; got ({lo!r}, {hi!r}). Hint: {hint}"
        raise ValueError(msg)
    if positive and lo <= 0:
        msg = (
            f"spectral `{name}` must start above 0 Hz; got ({lo:g}, {hi:g}). Hint: velocity "
            f"is acceleration divided by 2πf, which has no value at 0 Hz; {hint}"
        )
        raise ValueError(msg)
    if lo < 0:
        msg = f"spectral `{name}` must not start below 0 Hz; got ({lo:g}, {hi:g}). Hint: {hint}"
        raise ValueError(msg)
    if not lo < hi:
        msg = (
            f"spectral `{name}` needs lo < hi; got ({lo:g}, {hi:g}). Hint: give the lower "
            f"edge first; {hint}"
        )
        raise ValueError(msg)
    return lo, hi


@dataclass(frozen=True)
class SpectralConfig:
    """Settings of :func:`spectral`, checked when the flow is built.

    :arg fft_size: Samples per frame, a power of two from 64 to 2**20. The
        frequency resolution is ``sample_rate_hz / fft_size``.
    :arg overlap: Fraction of a frame shared with the next one, in
        ``[0, 0.95]``. Frames start every
        ``hop = fft_size - round(fft_size * overlap)`` samples.
    :arg frames_per_row: Frames whose power spectra are averaged (Welch) into
        one feature row (``>= 1``).
    :arg bands_hz: ``(lo, hi)`` bands for ``band_energy``; a bin at frequency
        ``f`` belongs to a band when ``lo <= f < hi``. Bands may overlap.
    :arg velocity_band_hz: ``(lo, hi)`` band (``lo > 0``) over which velocity
        RMS is integrated, ``lo <= f < hi``.
    :arg iso_thresholds_mm_s: The A/B, B/C and C/D zone boundaries in mm/s,
        strictly increasing (ISO 10816-3 group 2, rigid mounting, by default).
    :arg max_gap: How far a block's ``start_ts`` may be from the end of the
        previous block of the device and still be treated as contiguous.
        ``None`` means half a sample period, but at least 1 µs (the EVB1
        timestamp resolution).
    """

    fft_size: int = 4096
    overlap: float = 0.0
    frames_per_row: int = 1
    bands_hz: tuple[tuple[float, float], ...] = ((10, 100), (100, 1000), (1000, 5000))
    velocity_band_hz: tuple[float, float] = (10.0, 1000.0)
    iso_thresholds_mm_s: tuple[float, float, float] = (1.4, 2.8, 4.5)
    max_gap: timedelta | None = None

    def __post_init__(self) -> None:
        n = self.fft_size
        if isinstance(n, bool) or not isinstance(n, int | np.integer):
            msg = (
                f"spectral `fft_size` must be an int; got {_describe(n)}. "
                "Hint: fft_size=4096 gives 6.25 Hz bins at 25.6 kHz."
            )
            raise TypeError(msg)
        if not (_MIN_FFT <= n <= _MAX_FFT and n & (n - 1) == 0):
            msg = (
                f"spectral `fft_size` must be a power of two from {_MIN_FFT} to {_MAX_FFT}; "
                f"got {n}. Hint: round to {_nearest_power_of_two(int(n))}."
            )
            raise ValueError(msg)
        object.__setattr__(self, "fft_size", int(n))

        if not _is_number(self.overlap):
            msg = (
                f"spectral `overlap` must be a number; got {_describe(self.overlap)}. "
                "Hint: overlap=0.5 starts a frame every half frame."
            )
            raise TypeError(msg)
        if not 0.0 <= float(self.overlap) <= _MAX_OVERLAP:
            msg = (
                f"spectral `overlap` must be a fraction in [0, {_MAX_OVERLAP}]; got "
                f"{self.overlap!r}. Hint: 0.5 means 50% (not 50); 0 means no overlap."
            )
            raise ValueError(msg)
        object.__setattr__(self, "overlap", float(self.overlap))

        k = self.frames_per_row
        if isinstance(k, bool) or not isinstance(k, int | np.integer):
            msg = (
                f"spectral `frames_per_row` must be an int; got {_describe(k)}. "
                "Hint: frames_per_row=6 averages six frames into one row."
            )
            raise TypeError(msg)
        if k < 1:
            msg = (
                f"spectral `frames_per_row` must be at least 1; got {k}. "
                "Hint: 1 emits one row per frame."
            )
            raise ValueError(msg)
        object.__setattr__(self, "frames_per_row", int(k))

        bands = self.bands_hz
        band_hint = "bands_hz=((10, 100), (100, 1000), (1000, 5000))."
        if not isinstance(bands, Sequence) or isinstance(bands, str):
            msg = (
                f"spectral `bands_hz` must be a sequence of (lo_hz, hi_hz) pairs; got "
                f"{_describe(bands)}. Hint: {band_hint}"
            )
            raise TypeError(msg)
        checked = tuple(
            _pair(f"bands_hz[{i}]", band, band_hint, positive=False) for i, band in enumerate(bands)
        )
        object.__setattr__(self, "bands_hz", checked)

        velocity = _pair(
            "velocity_band_hz",
            self.velocity_band_hz,
            "ISO 10816 uses velocity_band_hz=(10, 1000) for machines running above 600 rpm.",
            positive=True,
        )
        object.__setattr__(self, "velocity_band_hz", velocity)

        thresholds = self.iso_thresholds_mm_s
        iso_hint = "iso_thresholds_mm_s=(1.4, 2.8, 4.5) (A/B, B/C, C/D in mm/s)."
        if (
            not isinstance(thresholds, Sequence)
            or isinstance(thresholds, str)
            or len(thresholds) != 3
            or not all(_is_number(t) for t in thresholds)
        ):
            msg = (
                f"spectral `iso_thresholds_mm_s` must be three numbers; got "
                f"{_describe(thresholds)}. Hint: {iso_hint}"
            )
            raise TypeError(msg)
        t = tuple(float(v) for v in thresholds)
        if not (all(math.isfinite(v) for v in t) and 0 < t[0] < t[1] < t[2]):
            msg = (
                f"spectral `iso_thresholds_mm_s` must be finite, > 0 and strictly "
                f"increasing; got {t}. Hint: {iso_hint}"
            )
            raise ValueError(msg)
        object.__setattr__(self, "iso_thresholds_mm_s", t)

        gap = self.max_gap
        if gap is not None:
            if not isinstance(gap, timedelta):
                msg = (
                    f"spectral `max_gap` must be a datetime.timedelta or None; got "
                    f"{_describe(gap)}. Hint: max_gap=timedelta(milliseconds=1)."
                )
                raise TypeError(msg)
            if gap < timedelta(0):
                msg = (
                    f"spectral `max_gap` must be >= 0; got {gap!r}. Hint: leave it None "
                    "for half a sample period."
                )
                raise ValueError(msg)

    @property
    def hop(self) -> int:
        """Samples between the starts of consecutive frames."""
        return self.fft_size - round(self.fft_size * self.overlap)

    def gap_tolerance(self, sample_rate_hz: int) -> timedelta:
        """Largest ``start_ts`` deviation still treated as contiguous at this rate."""
        if self.max_gap is not None:
            return self.max_gap
        return max(timedelta(microseconds=500_000 / sample_rate_hz), _ONE_US)

    def zone(self, velocity_mm_s: float) -> str:
        """ISO zone letter (``"A"`` to ``"D"``) of a velocity RMS in mm/s."""
        ab, bc, cd = self.iso_thresholds_mm_s
        if velocity_mm_s < ab:
            return "A"
        if velocity_mm_s < bc:
            return "B"
        if velocity_mm_s < cd:
            return "C"
        return "D"


def _nearest_power_of_two(n: int) -> int:
    if n <= _MIN_FFT:
        return _MIN_FFT
    if n >= _MAX_FFT:
        return _MAX_FFT
    lower = 1 << (n.bit_length() - 1)
    return lower if n - lower < 2 * lower - n else 2 * lower


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
      1.5 for a sinusoid); both are NaN for a constant signal.
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
    crest_factor: float
    kurtosis: float
    dominant_hz: float
    dominant_amplitude: float
    iso_zone: str
    transport: str
    frames: int


@dataclass(frozen=True)
class SpectralOut:
    """Streams returned from :func:`spectral`."""

    features: KeyedStream[Features]
    """One :class:`Features` per axis and row, keyed like the input."""

    errors: KeyedStream[DeadLetter]
    """Discontinuities that discarded buffered samples, one per event."""


@dataclass
class _Frames:
    """Per-frame results, frame axis first: ``power`` is ``(F, axes, bins)``."""

    power: np.ndarray
    sumsq: np.ndarray
    sum4: np.ndarray
    peak: np.ndarray

    @property
    def count(self) -> int:
        return int(self.power.shape[0])

    def join(self, other: _Frames) -> _Frames:
        if self.count == 0:
            return other
        return _Frames(
            np.concatenate((self.power, other.power)),
            np.concatenate((self.sumsq, other.sumsq)),
            np.concatenate((self.sum4, other.sum4)),
            np.concatenate((self.peak, other.peak)),
        )

    def take(self, start: int, stop: int | None = None) -> _Frames:
        sl = slice(start, stop)
        return _Frames(self.power[sl], self.sumsq[sl], self.sum4[sl], self.peak[sl])


@dataclass
class SpectralState:
    """Per-device state of :func:`spectral`; plain data, pickled into recovery snapshots.

    The device's contiguous signal is indexed by sample number from 0.
    ``anchors`` are ``(index, start_ts)`` pairs, increasing in index, that
    pin sample numbers to the device's clock: the first block of the signal
    and every later block whose ``start_ts`` moved by more than 1 µs (within
    the gap tolerance). A sample's time counts from the last anchor at or
    before it, so timestamps do not depend on how blocks were batched.
    ``received`` is the index of the next expected sample; ``tail`` holds the
    samples from ``received - len(tail)`` on that have not yet been the
    start of a frame (with overlap, it includes the part shared with the
    next frame). ``pending_*`` are per-frame results of a row not yet
    complete, the first of which started at ``pending_ts``.
    """

    device: str
    transport: str
    sample_rate_hz: int
    axes: int
    anchors: list[tuple[int, datetime]]
    received: int
    tail: np.ndarray
    pending_power: np.ndarray
    pending_sumsq: np.ndarray
    pending_sum4: np.ndarray
    pending_peak: np.ndarray
    pending_ts: datetime | None = None

    def ts_of(self, index: int) -> datetime:
        """Timestamp of sample ``index`` of the current contiguous signal."""
        anchors = self.anchors
        i = len(anchors) - 1
        while i > 0 and anchors[i][0] > index:
            i -= 1
        anchor_index, anchor_ts = anchors[i]
        rate = self.sample_rate_hz
        us = ((index - anchor_index) * 2_000_000 + rate) // (2 * rate)
        return anchor_ts + timedelta(microseconds=us)

    def forget_anchors_before(self, index: int) -> None:
        """Drop anchors no longer needed for samples at or after ``index``."""
        anchors = self.anchors
        keep = 0
        while keep + 1 < len(anchors) and anchors[keep + 1][0] <= index:
            keep += 1
        if keep:
            del anchors[:keep]


class _Plan:
    """Window, scaling and band weights for one ``(fft_size, sample_rate)``."""

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


def _frame_results(by_axis: np.ndarray, config: SpectralConfig, plan: _Plan, count: int) -> _Frames:
    """FFT ``count`` frames of ``by_axis`` ``(axes, samples)`` in one call.

    ``by_axis`` is a C-contiguous scratch copy; without overlap its frames
    are modified in place.
    """
    n, hop = config.fft_size, config.hop
    if hop == n:
        frames = by_axis[:, : count * n].reshape(by_axis.shape[0], count, n)
    else:
        view = np.lib.stride_tricks.sliding_window_view(by_axis, n, axis=1)[:, ::hop]
        frames = np.array(view[:, :count])
    frames -= frames.mean(axis=2, keepdims=True)
    squared = frames * frames
    sumsq = squared.sum(axis=2)
    np.multiply(squared, squared, out=squared)
    sum4 = squared.sum(axis=2)
    peak = np.abs(frames).max(axis=2)
    frames *= plan.window
    spectrum = np.fft.rfft(frames, axis=2)
    power = spectrum.real * spectrum.real
    power += spectrum.imag * spectrum.imag
    return _Frames(
        power=np.ascontiguousarray(power.transpose(1, 0, 2)),
        sumsq=np.ascontiguousarray(sumsq.T),
        sum4=np.ascontiguousarray(sum4.T),
        peak=np.ascontiguousarray(peak.T),
    )


class _SpectralLogic(StatefulBatchLogic[VibrationBlock, Features | DeadLetter, SpectralState]):
    """Frame assembly, FFT and row averaging for one device."""

    def __init__(self, config: SpectralConfig, resume_state: SpectralState | None) -> None:
        self.config = config
        self.state = resume_state
        self.plans: dict[int, _Plan] = {}

    def plan(self, sample_rate_hz: int) -> _Plan:
        plan = self.plans.get(sample_rate_hz)
        if plan is None:
            plan = self.plans[sample_rate_hz] = _Plan(self.config, sample_rate_hz)
        return plan

    def on_batch(self, values: list[VibrationBlock]) -> tuple[list[Features | DeadLetter], bool]:
        out: list[Features | DeadLetter] = []
        segment: list[np.ndarray] = []
        for block in values:
            state = self.state
            if state is not None:
                reason = self._discontinuity(state, block)
                if reason is None:
                    segment.append(block.samples)
                    state.received += block.frames
                    state.transport = block.transport
                    continue
                self._process(segment, out)
                segment = []
                out.extend(self._flush())
                out.append(self._discard(reason, block))
            state = self.state = self._fresh(block)
            segment.append(block.samples)
            state.received += block.frames
        self._process(segment, out)
        return out, StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list[Features | DeadLetter], bool]:
        return self._flush(), StatefulBatchLogic.RETAIN

    def snapshot(self) -> SpectralState | None:
        state = self.state
        return None if state is None else replace(state, anchors=list(state.anchors))

    def _fresh(self, block: VibrationBlock) -> SpectralState:
        axes = block.axes
        bins = self.config.fft_size // 2 + 1
        return SpectralState(
            device=block.device,
            transport=block.transport,
            sample_rate_hz=block.sample_rate_hz,
            axes=axes,
            anchors=[(0, block.start_ts)],
            received=0,
            tail=np.empty((0, axes)),
            pending_power=np.empty((0, axes, bins)),
            pending_sumsq=np.empty((0, axes)),
            pending_sum4=np.empty((0, axes)),
            pending_peak=np.empty((0, axes)),
        )

    def _discontinuity(self, state: SpectralState, block: VibrationBlock) -> str | None:
        """Why ``block`` cannot continue the device's signal, or ``None`` if it can.

        A block that continues the signal with its clock more than 1 µs off
        the expected start adds an anchor (the timeline follows the device).
        """
        if block.sample_rate_hz != state.sample_rate_hz:
            return (
                f"sample rate changed from {state.sample_rate_hz} Hz to "
                f"{block.sample_rate_hz} Hz at {block.start_ts.isoformat()}"
            )
        if block.axes != state.axes:
            return f"axes changed from {state.axes} to {block.axes} at {block.start_ts.isoformat()}"
        expected = state.ts_of(state.received)
        delta = block.start_ts - expected
        tolerance = self.config.gap_tolerance(state.sample_rate_hz)
        if abs(delta) > tolerance:
            seconds = delta / timedelta(seconds=1)
            what = (
                f"gap of {seconds:.6f} s"
                if seconds > 0
                else f"block overlaps the previous one by {-seconds:.6f} s (out of order?)"
            )
            return (
                f"{what}: block starts {block.start_ts.isoformat()}, expected "
                f"{expected.isoformat()} (tolerance {tolerance / _ONE_US:g} µs)"
            )
        if abs(delta) > _ONE_US:
            state.anchors.append((state.received, block.start_ts))
        return None

    def _discard(self, reason: str, block: VibrationBlock) -> DeadLetter:
        """Report the discontinuity; the payload is the discarded tail as EVB1."""
        state = self.state
        assert state is not None
        tail = state.tail
        payload = b""
        if len(tail):
            try:
                payload = encode_evb1(
                    tail,
                    sample_rate_hz=state.sample_rate_hz,
                    start_ts=state.ts_of(state.received - len(tail)),
                )
            except ValueError:
                payload = b""
        text = (
            f"{_PREFIX}{reason}; {len(tail)} buffered samples per axis "
            f"({state.axes} axes) discarded and the frame restarted"
        )
        return DeadLetter(
            device=block.device,
            transport=block.transport,
            received_at=block.start_ts,
            reason=" ".join(text.splitlines()),
            payload=payload,
        )

    def _process(self, segment: list[np.ndarray], out: list[Features | DeadLetter]) -> None:
        """Frame the tail plus ``segment`` (contiguous samples) and emit complete rows."""
        state = self.state
        if state is None or not segment:
            return
        config = self.config
        n, hop, k = config.fft_size, config.hop, config.frames_per_row
        parts = [state.tail, *segment] if len(state.tail) else segment
        length = sum(len(p) for p in parts)
        by_axis = np.empty((state.axes, length))
        at = 0
        for part in parts:
            by_axis[:, at : at + len(part)] = part.T
            at += len(part)
        count = (length - n) // hop + 1 if length >= n else 0
        state.tail = np.array(by_axis[:, count * hop :].T)
        if count == 0:
            return
        start_index = state.received - length
        fresh = _frame_results(by_axis, config, self.plan(state.sample_rate_hz), count)
        pending = _Frames(
            state.pending_power, state.pending_sumsq, state.pending_sum4, state.pending_peak
        )
        first = start_index - pending.count * hop
        frames = pending.join(fresh)
        rows = frames.count // k
        if rows:
            starts = [
                state.pending_ts
                if r == 0 and pending.count and state.pending_ts is not None
                else state.ts_of(first + r * k * hop)
                for r in range(rows)
            ]
            out.extend(self._rows(frames.take(0, rows * k), k, starts))
        rest = frames.take(rows * k)
        state.pending_power = np.array(rest.power)
        state.pending_sumsq = np.array(rest.sumsq)
        state.pending_sum4 = np.array(rest.sum4)
        state.pending_peak = np.array(rest.peak)
        if rest.count == 0:
            state.pending_ts = None
        elif rows or not pending.count:
            state.pending_ts = state.ts_of(first + rows * k * hop)
        state.forget_anchors_before(state.received - len(state.tail))

    def _flush(self) -> list[Features | DeadLetter]:
        """Emit the pending partial row, if any."""
        state = self.state
        if state is None or len(state.pending_power) == 0:
            return []
        assert state.pending_ts is not None
        frames = _Frames(
            state.pending_power, state.pending_sumsq, state.pending_sum4, state.pending_peak
        )
        rows = self._rows(frames, frames.count, [state.pending_ts])
        state.pending_power = state.pending_power[:0]
        state.pending_sumsq = state.pending_sumsq[:0]
        state.pending_sum4 = state.pending_sum4[:0]
        state.pending_peak = state.pending_peak[:0]
        state.pending_ts = None
        return list(rows)

    def _rows(self, frames: _Frames, per_row: int, starts: list[datetime]) -> list[Features]:
        """Average ``per_row`` consecutive frames into rows; one Features per row and axis."""
        state = self.state
        assert state is not None
        config = self.config
        plan = self.plan(state.sample_rate_hz)
        rows = len(starts)
        power = frames.power[0::per_row].copy()
        sumsq = frames.sumsq[0::per_row].copy()
        sum4 = frames.sum4[0::per_row].copy()
        peak = frames.peak[0::per_row].copy()
        for j in range(1, per_row):
            power += frames.power[j::per_row]
            sumsq += frames.sumsq[j::per_row]
            sum4 += frames.sum4[j::per_row]
            np.maximum(peak, frames.peak[j::per_row], out=peak)
        power /= per_row
        samples = per_row * config.fft_size
        mean_square = sumsq / samples
        rms = np.sqrt(mean_square)
        with np.errstate(divide="ignore", invalid="ignore"):
            crest = peak / rms
            kurtosis = (sum4 / samples) / (mean_square * mean_square)
        energy = power * plan.energy_weight
        band_energy = plan.band_energy(energy)
        velocity = plan.velocity_ms(energy) * 1000.0
        dominant_hz, dominant_amp = _dominant(power, plan)
        window_s = ((per_row - 1) * config.hop + config.fft_size) / state.sample_rate_hz

        zone = config.zone
        device, transport, rate = state.device, state.transport, state.sample_rate_hz
        names = AXIS_NAMES
        out: list[Features] = []
        band_rows = band_energy.tolist()
        rms_l, vel_l, peak_l = rms.tolist(), velocity.tolist(), peak.tolist()
        crest_l, kurt_l = crest.tolist(), kurtosis.tolist()
        hz_l, amp_l = dominant_hz.tolist(), dominant_amp.tolist()
        for r in range(rows):
            ts = starts[r]
            for a in range(state.axes):
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


def _dominant(power: np.ndarray, plan: _Plan) -> tuple[np.ndarray, np.ndarray]:
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


def _is_features(item: Features | DeadLetter) -> bool:
    return isinstance(item, Features)


@operator
def spectral(
    step_id: str,
    up: KeyedStream[VibrationBlock],
    *,
    fft_size: int = 4096,
    overlap: float = 0.0,
    frames_per_row: int = 1,
    bands_hz: tuple[tuple[float, float], ...] = ((10, 100), (100, 1000), (1000, 5000)),
    velocity_band_hz: tuple[float, float] = (10.0, 1000.0),
    iso_thresholds_mm_s: tuple[float, float, float] = (1.4, 2.8, 4.5),
    max_gap: timedelta | None = None,
) -> SpectralOut:
    """Turn each device's vibration blocks into per-axis spectral feature rows.

    State is per key (flows key by device). Per device the operator keeps
    the samples that have not yet started a frame and the expected start of
    the next block, so frames span block boundaries exactly as if the blocks
    had been concatenated:

    - Frames of ``fft_size`` samples start every ``hop`` samples
      (``fft_size - round(fft_size * overlap)``); each frame's mean is
      removed, it is Hann-windowed and transformed. ``frames_per_row``
      consecutive frames are averaged into one row; a row yields one
      :class:`Features` per axis (``"x"``, ``"y"``, ``"z"``).
    - A block is contiguous when its ``start_ts`` is within ``max_gap`` of
      the end of the previous block (a deviation of more than 1 µs inside the
      tolerance re-anchors the timeline to the device's clock, so clock drift
      does not add up to a false gap; row timestamps are the device's).
    - A gap or overlap beyond ``max_gap``, a sample-rate change or an
      axes-count change ends the signal: the pending partial row is emitted
      (``frames`` tells how many frames it averages), the buffered samples
      that had not filled a frame are discarded, and a :class:`DeadLetter`
      on ``errors`` says what happened and how many samples were dropped
      (its payload is those samples as an EVB1 float32 block). The new
      block starts a fresh signal.
    - At end of input the pending partial row is emitted; samples short of
      a frame stay in the state (and in recovery snapshots).

    A dead letter's ``received_at`` is the ``start_ts`` of the block that
    broke the signal (blocks carry no receive time).

    Velocity is integrated bin by bin, so the Hann leakage of a line a few
    bins above DC is weighted with its neighbours' ``1/f²``: a line ``k``
    bins up reads about ``1/k²`` high (+3.5% for 24.75 Hz with 6.25 Hz bins,
    +0.2% at 100 Hz), and a line within two bins of a band edge loses part
    of its leakage to the other side. Pick ``fft_size`` so the slowest line
    of interest lies at least about eight bins above DC and the band edge.

    :arg step_id: Unique ID.
    :arg up: Vibration blocks keyed by device.
    :arg fft_size: Samples per frame, a power of two from 64 to 2**20.
    :arg overlap: Frame overlap fraction in ``[0, 0.95]``.
    :arg frames_per_row: Frames averaged into one row (``>= 1``).
    :arg bands_hz: ``(lo, hi)`` bands for ``band_energy`` (``lo <= f < hi``).
    :arg velocity_band_hz: Band of the velocity RMS, ``lo > 0``.
    :arg iso_thresholds_mm_s: A/B, B/C and C/D boundaries in mm/s.
    :arg max_gap: Start-time tolerance between blocks; ``None`` for half a
        sample period (at least 1 µs).
    :returns: ``features`` and ``errors``, both keyed like ``up``.
    :raises ValueError: When a setting is out of range (while the flow is
        built); :class:`TypeError` when it has the wrong type.
    """
    config = SpectralConfig(
        fft_size=fft_size,
        overlap=overlap,
        frames_per_row=frames_per_row,
        bands_hz=bands_hz,
        velocity_band_hz=velocity_band_hz,
        iso_thresholds_mm_s=iso_thresholds_mm_s,
        max_gap=max_gap,
    )

    def build(resume_state: SpectralState | None) -> _SpectralLogic:
        return _SpectralLogic(config, resume_state)

    both = op.stateful_batch("frames", up, build)
    split = op.branch("split", both, lambda kv: _is_features(kv[1]))
    return SpectralOut(features=split.trues, errors=split.falses)  # type: ignore[arg-type]
