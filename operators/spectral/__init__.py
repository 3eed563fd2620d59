"""Spectral (FFT) features of vibration blocks: band energies, velocity RMS, ISO zone.

Each device's :class:`~operators.records.VibrationBlock` stream is cut into
Hann-windowed frames of ``fft_size`` samples, the power spectra of
``frames_per_row`` consecutive frames are averaged (Welch's method) and every
row yields one :class:`Features` record per axis: band energies, RMS,
velocity RMS over the ISO 10816 / 20816 band, peak, crest factor, kurtosis,
the dominant spectral line and the ISO zone.

- :mod:`~operators.spectral.config`: :class:`SpectralConfig`, the settings
  and their defaults.
- :mod:`~operators.spectral.features`: the vectorised NumPy feature math.
- :mod:`~operators.spectral.operator`: per-device framing state and the
  :func:`spectral` Bytewax operator.
"""

from operators.spectral.config import SpectralConfig
from operators.spectral.features import AXIS_NAMES, Features
from operators.spectral.operator import SpectralOut, SpectralState, spectral

__all__ = [
    "AXIS_NAMES",
    "Features",
    "SpectralConfig",
    "SpectralOut",
    "SpectralState",
    "spectral",
]
