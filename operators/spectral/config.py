"""Settings of the spectral operator: :class:`SpectralConfig` and its checks.

Every default of :func:`~operators.spectral.spectral` is defined here, once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np

__all__ = ["ONE_US", "SpectralConfig"]

ONE_US = timedelta(microseconds=1)
"""EVB1 timestamp resolution; the smallest clock deviation the operator follows."""

_MIN_FFT = 64
_MAX_FFT = 1 << 20
_MAX_OVERLAP = 0.95


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
    """Settings of :func:`~operators.spectral.spectral`, checked when the flow is built.

    :arg fft_size: Samples per frame, a power of two from 64 to 2**20. The
        frequency resolution is ``sample_rate_hz / fft_size``.
    :arg overlap: Fraction of a frame shared with the next one, in
        ``[0, 0.95]``. Frames start every
        ``hop = fft_size - round(fft_size * overlap)`` samples.
    :arg frames_per_row: Frames whose power spectra are averaged (Welch) into
        one feature row (``>= 1``); six 4096-sample frames are about 1 s at
        25.6 kHz.
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
    frames_per_row: int = 6
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
        return max(timedelta(microseconds=500_000 / sample_rate_hz), ONE_US)

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
