"""The stateful :func:`spectral` operator: per-device framing of vibration blocks.

Each device's :class:`~operators.records.VibrationBlock` stream is cut into
frames of ``fft_size`` samples (blocks need not align with frames; the tail
of one block is joined to the next), ``frames_per_row`` consecutive frames
make a row, and discontinuities (gaps, rate or axes changes) end the signal.
The math of a row is in :mod:`operators.spectral.features`, the settings in
:mod:`operators.spectral.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import bytewax.operators as op
import numpy as np
from bytewax.dataflow import operator
from bytewax.operators import KeyedStream, StatefulBatchLogic

from connectors.codecs.evb1 import encode_evb1
from operators.records import DeadLetter, VibrationBlock
from operators.spectral.config import ONE_US, SpectralConfig
from operators.spectral.features import (
    MAX_ABS_SAMPLE,
    Features,
    Frames,
    Plan,
    frame_results,
    row_features,
)

__all__ = ["SpectralLogic", "SpectralOut", "SpectralState", "spectral"]

_PREFIX = "vibration: "


@dataclass(frozen=True)
class SpectralOut:
    """Streams returned from :func:`spectral`."""

    features: KeyedStream[Features]
    """One :class:`Features` per axis and row, keyed like the input."""

    errors: KeyedStream[DeadLetter]
    """Discontinuities that discarded buffered samples, and blocks with samples that are not
    finite or beyond :data:`~operators.spectral.features.MAX_ABS_SAMPLE`, one per event."""


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
    complete, the first of which started at ``pending_ts``, as in
    :class:`~operators.spectral.features.Frames`. ``sum4_relative`` is false
    only in a state saved by an earlier version, whose ``pending_sum4`` was
    ``Σx⁴``; such a state is converted when it is resumed.
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
    sum4_relative: bool = False

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


class SpectralLogic(StatefulBatchLogic[VibrationBlock, Features | DeadLetter, SpectralState]):
    """Frame assembly, FFT and row averaging for one device."""

    def __init__(self, config: SpectralConfig, resume_state: SpectralState | None) -> None:
        self.config = config
        self.state = resume_state
        self.plans: dict[int, Plan] = {}
        if resume_state is not None and not resume_state.sum4_relative:
            peak2 = resume_state.pending_peak * resume_state.pending_peak
            sum4 = resume_state.pending_sum4
            resume_state.pending_sum4 = np.divide(
                np.divide(sum4, peak2, out=np.zeros_like(sum4), where=peak2 > 0),
                peak2,
                out=np.zeros_like(sum4),
                where=peak2 > 0,
            )
            resume_state.sum4_relative = True

    def plan(self, sample_rate_hz: int) -> Plan:
        """The cached :class:`Plan` of this configuration at ``sample_rate_hz``."""
        plan = self.plans.get(sample_rate_hz)
        if plan is None:
            plan = self.plans[sample_rate_hz] = Plan(self.config, sample_rate_hz)
        return plan

    def on_batch(self, values: list[VibrationBlock]) -> tuple[list[Features | DeadLetter], bool]:
        """Frame a batch of the device's blocks; rows and discontinuity reports."""
        out: list[Features | DeadLetter] = []
        segment: list[np.ndarray] = []
        for block in values:
            refused = _out_of_range(block)
            if refused is not None:
                out.append(refused)  # the next block then follows a gap
                continue
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
        """Emit the pending partial row; keep the samples short of a frame."""
        return self._flush(), StatefulBatchLogic.RETAIN

    def snapshot(self) -> SpectralState | None:
        """A copy of the device's state for recovery."""
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
            sum4_relative=True,
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
                f"{expected.isoformat()} (tolerance {tolerance / ONE_US:g} µs)"
            )
        if abs(delta) > ONE_US:
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
        fresh = frame_results(by_axis, self.plan(state.sample_rate_hz), count)
        pending = Frames(
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
        frames = Frames(
            state.pending_power, state.pending_sumsq, state.pending_sum4, state.pending_peak
        )
        rows = self._rows(frames, frames.count, [state.pending_ts])
        state.pending_power = state.pending_power[:0]
        state.pending_sumsq = state.pending_sumsq[:0]
        state.pending_sum4 = state.pending_sum4[:0]
        state.pending_peak = state.pending_peak[:0]
        state.pending_ts = None
        return list(rows)

    def _rows(self, frames: Frames, per_row: int, starts: list[datetime]) -> list[Features]:
        """Average ``per_row`` consecutive frames into rows; one Features per row and axis."""
        state = self.state
        assert state is not None
        plan = self.plan(state.sample_rate_hz)
        return row_features(
            frames, per_row, starts, plan, device=state.device, transport=state.transport
        )


def _out_of_range(block: VibrationBlock) -> DeadLetter | None:
    """A dead letter for a block with a sample that is not finite or beyond MAX_ABS_SAMPLE."""
    samples = block.samples
    largest = float(np.max(np.abs(samples))) if samples.size else 0.0
    if largest <= MAX_ABS_SAMPLE:  # False for NaN
        return None
    bad = int(np.count_nonzero(~(np.abs(samples) <= MAX_ABS_SAMPLE)))
    return DeadLetter(
        device=block.device,
        transport=block.transport,
        received_at=block.start_ts,
        reason=(
            f"{_PREFIX}block at {block.start_ts.isoformat()} refused: {bad} of {samples.size} "
            f"samples are NaN, infinite or beyond ±{MAX_ABS_SAMPLE:g} m/s²; hint: check the "
            "sensor's scale; the block is skipped and the next one follows a gap"
        ),
        payload=b"",
    )


def _is_features(item: Features | DeadLetter) -> bool:
    return isinstance(item, Features)


@operator
def spectral(
    step_id: str,
    up: KeyedStream[VibrationBlock],
    *,
    fft_size: int = SpectralConfig.fft_size,
    overlap: float = SpectralConfig.overlap,
    frames_per_row: int = SpectralConfig.frames_per_row,
    bands_hz: tuple[tuple[float, float], ...] = SpectralConfig.bands_hz,
    velocity_band_hz: tuple[float, float] = SpectralConfig.velocity_band_hz,
    iso_thresholds_mm_s: tuple[float, float, float] = SpectralConfig.iso_thresholds_mm_s,
    max_gap: timedelta | None = SpectralConfig.max_gap,
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

    A device's state is bounded by the settings, whatever it sends: fewer
    than ``fft_size`` samples per axis, the spectra of fewer than
    ``frames_per_row`` frames and the anchors of the blocks among those
    samples: ``8 * axes * (fft_size + (frames_per_row - 1) * (fft_size // 2 +
    1))`` bytes of samples and spectra (about 350 KB with the defaults and
    three axes) and at most one anchor per sample held.

    A dead letter's ``received_at`` is the ``start_ts`` of the block that
    broke the signal (blocks carry no receive time).

    Velocity is integrated bin by bin, so the Hann leakage of a line a few
    bins above DC is weighted with its neighbours' ``1/f²``: a line ``k``
    bins up reads about ``1/k²`` high (+3.5% for 24.75 Hz with 6.25 Hz bins,
    +0.2% at 100 Hz), and a line within two bins of a band edge loses part
    of its leakage to the other side. Pick ``fft_size`` so the slowest line
    of interest lies at least about eight bins above DC and the band edge.

    Every setting defaults to the :class:`SpectralConfig` default.

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

    def build(resume_state: SpectralState | None) -> SpectralLogic:
        return SpectralLogic(config, resume_state)

    both = op.stateful_batch("frames", up, build)
    split = op.branch("split", both, lambda kv: _is_features(kv[1]))
    return SpectralOut(features=split.trues, errors=split.falses)  # type: ignore[arg-type]
