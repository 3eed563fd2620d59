from __future__ import annotations

import math
import pickle
import warnings
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import bytewax.operators as op
import numpy as np
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.codecs.evb1 import HEADER, MAGIC, decode_vibration, encode_evb1
from connectors.streams import spec_of, to_table
from operators.records import DeadLetter, RawMessage, VibrationBlock
from operators.spectral import Features, SpectralConfig, SpectralState, spectral
from operators.spectral.operator import SpectralLogic

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
FS = 25_600
N = 4096
DF = FS / N  # 6.25 Hz


def start_of(offset: int, fs: int, start: datetime = T0) -> datetime:
    """Start time of sample ``offset``, rounded to the microsecond (half up)."""
    return start + timedelta(microseconds=(offset * 2_000_000 + fs) // (2 * fs))


def cut(
    signal: np.ndarray,
    sizes: Sequence[int],
    *,
    fs: int = FS,
    device: str = "pump-7",
    start: datetime = T0,
    first_sample: int = 0,
) -> list[VibrationBlock]:
    """Cut ``signal`` into contiguous blocks of ``sizes`` (the rest in one last block)."""
    signal = signal.reshape(len(signal), -1)
    out, offset = [], 0
    for size in [*sizes, len(signal)]:
        size = min(size, len(signal) - offset)
        if size <= 0:
            break
        out.append(
            VibrationBlock(
                device=device,
                transport="mqtt",
                start_ts=start_of(first_sample + offset, fs, start),
                sample_rate_hz=fs,
                samples=signal[offset : offset + size],
                raw_bytes=24 + signal[offset : offset + size].size * 4,
            )
        )
        offset += size
    return out


def build(
    blocks: Sequence[VibrationBlock],
    features: list,
    errors: list,
    *,
    batch_size: int = 4,
    source: list | None = None,
    workers_seen: set[int] | None = None,
    **settings_: object,
) -> Dataflow:
    flow = Dataflow("spectral_test")
    items = [(b.device, b) for b in blocks] if source is None else source
    s = op.input("in", flow, TestingSource(items, batch_size=batch_size))
    out = spectral("spectral", s, **settings_)
    if workers_seen is not None:
        op.inspect_debug("where", out.features, lambda _s, _i, _e, w: workers_seen.add(w))
    op.output("features", out.features, TestingSink(features))
    op.output("errors", out.errors, TestingSink(errors))
    return flow


def run(
    blocks: Sequence[VibrationBlock],
    *,
    batch_size: int = 4,
    frames_per_row: int = 1,
    **settings_: object,
) -> tuple[list[Features], list[DeadLetter]]:
    """Run ``blocks`` through the operator; rows of one frame unless told otherwise."""
    features: list[tuple[str, Features]] = []
    errors: list[tuple[str, DeadLetter]] = []
    flow = build(
        blocks, features, errors, batch_size=batch_size, frames_per_row=frames_per_row, **settings_
    )
    run_main(flow)
    for key, f in features:
        assert key == f.device
    for key, e in errors:
        assert key == e.device
    return [f for _, f in features], [e for _, e in errors]


def tone(amplitude: float, hz: float, samples: int, *, fs: int = FS, phase: float = 0.3):
    t = np.arange(samples) / fs
    return amplitude * np.sin(2 * np.pi * hz * t + phase)


def velocity_mm_s(amplitude: float, hz: float) -> float:
    return amplitude / (2 * np.pi * hz) / math.sqrt(2) * 1000


# --- analytic signals ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("hz", "band", "in_velocity_band"),
    [
        (40 * DF, 1, True),  # 250 Hz, bin-centred
        (40.5 * DF, 1, True),  # 253.125 Hz, half-way between bins: worst scalloping
        (161.3, 1, True),  # off-bin
        (2000.0, 2, False),  # bin-centred, above the velocity band
        (3333.3, 2, False),  # off-bin, above the velocity band
        (56.25, 0, True),  # bin 9
    ],
)
def test_sinusoid_matches_the_analytic_values(hz, band, in_velocity_band):
    amplitude = 2.5
    frames = 6
    signal = tone(amplitude, hz, frames * N)
    features, errors = run(cut(signal, [1000] * 30))
    assert errors == []
    assert len(features) == frames
    for i, f in enumerate(features):
        assert f.axis == "x" and f.device == "pump-7" and f.transport == "mqtt"
        assert f.ts == start_of(i * N, FS)
        assert f.window_s == N / FS and f.frames == 1 and f.sample_rate_hz == FS
        assert f.rms == pytest.approx(amplitude / math.sqrt(2), rel=0.01)
        assert f.peak == pytest.approx(amplitude, rel=0.01)
        assert f.crest_factor == pytest.approx(math.sqrt(2), rel=0.02)
        assert f.kurtosis == pytest.approx(1.5, rel=0.02)
        assert abs(f.dominant_hz - hz) <= DF
        # The Hann main-lobe interpolation recovers off-bin tones too.
        assert abs(f.dominant_hz - hz) <= 0.05 * DF
        assert f.dominant_amplitude == pytest.approx(amplitude, rel=0.02)
        energies = f.band_energy
        assert len(energies) == 3
        assert energies[band] == pytest.approx(amplitude**2 / 2, rel=0.01)
        for other, energy in enumerate(energies):
            if other != band:
                assert energy < 1e-3 * amplitude**2
        if in_velocity_band:
            assert f.velocity_rms_mm_s == pytest.approx(velocity_mm_s(amplitude, hz), rel=0.02)
        else:
            assert f.velocity_rms_mm_s < 1e-3
            assert f.iso_zone == "A"


def test_bin_centred_amplitude_is_exact_without_interpolation_error():
    f = run(cut(tone(3.0, 64 * DF, N), [N]))[0][0]
    assert f.dominant_hz == pytest.approx(64 * DF, abs=1e-9)
    assert f.dominant_amplitude == pytest.approx(3.0, rel=1e-6)
    assert f.band_energy[1] == pytest.approx(4.5, rel=1e-6)


def test_dc_offset_is_removed_before_the_features():
    # Gravity on the z axis must not inflate the vibration RMS, peak or spectrum.
    signal = np.stack([tone(1.0, 250.0, 2 * N), tone(1.0, 250.0, 2 * N) + 9.81], axis=1)
    plain, offset = run(cut(signal, [N, N]))[0][:2]
    assert (plain.axis, offset.axis) == ("x", "y")
    assert offset.rms == pytest.approx(plain.rms, rel=1e-9)
    assert offset.peak == pytest.approx(plain.peak, rel=1e-9)
    assert offset.band_energy == pytest.approx(plain.band_energy, rel=1e-9)
    assert offset.dominant_hz == pytest.approx(250.0, abs=DF)


def test_velocity_follows_one_over_f_and_sets_the_iso_zone():
    # 1.0 m/s² at 50 Hz is 2.25 mm/s (zone B), at 200 Hz 0.56 mm/s (A); 1.5 at 50 Hz 3.38 (C).
    for hz, amplitude, zone in [(50.0, 1.0, "B"), (200.0, 1.0, "A"), (50.0, 1.5, "C")]:
        f = run(cut(tone(amplitude, hz, N), [N]))[0][0]
        assert f.velocity_rms_mm_s == pytest.approx(velocity_mm_s(amplitude, hz), rel=0.02)
        assert f.iso_zone == zone
    f = run(cut(tone(2.0, 50.0, N), [N]), iso_thresholds_mm_s=(1.0, 2.0, 5.0))[0][0]
    assert f.iso_zone == "C"
    f = run(cut(tone(2.0, 50.0, N), [N]), iso_thresholds_mm_s=(1.0, 2.0, 3.0))[0][0]
    assert f.iso_zone == "D"


def test_velocity_band_limits_the_integration():
    signal = tone(1.0, 50.0, N) + tone(1.0, 500.0, N)
    full = run(cut(signal, [N]))[0][0]
    low = run(cut(signal, [N]), velocity_band_hz=(10.0, 200.0))[0][0]
    high = run(cut(signal, [N]), velocity_band_hz=(200.0, 1000.0))[0][0]
    assert low.velocity_rms_mm_s == pytest.approx(velocity_mm_s(1.0, 50.0), rel=0.02)
    assert high.velocity_rms_mm_s == pytest.approx(velocity_mm_s(1.0, 500.0), rel=0.02)
    assert full.velocity_rms_mm_s == pytest.approx(
        math.hypot(low.velocity_rms_mm_s, high.velocity_rms_mm_s), rel=1e-6
    )


@pytest.mark.parametrize("level", [0.0, 4.0, 0.1, -9.81, 1e-300, 3.3e38 * 3.3e38])
def test_silent_and_constant_signals_have_zero_spectrum_and_null_shape_factors(level):
    # 0.1 and 9.81 leave rounding residue in the frame mean; it is not vibration
    f = run(cut(np.full(N, level), [N]))[0][0]
    assert f.rms == 0.0 and f.peak == 0.0 and f.velocity_rms_mm_s == 0.0
    assert f.band_energy == (0.0, 0.0, 0.0)
    assert (f.dominant_hz, f.dominant_amplitude) == (0.0, 0.0)
    assert f.crest_factor is None and f.kurtosis is None
    assert f.iso_zone == "A"


def test_a_silent_evb1_block_gives_null_shape_factors_in_the_stream():
    block = encode_evb1(np.zeros((N, 3)), sample_rate_hz=FS, start_ts=T0, dtype="int16")
    decoded = decode_vibration(RawMessage("pump-7", "vibration", "http", T0, block))
    assert isinstance(decoded, VibrationBlock)
    features, errors = run([decoded])
    assert errors == [] and len(features) == 3
    assert all(f.crest_factor is None and f.kurtosis is None for f in features)
    table = to_table(spec_of("vibration_features", "test"), features)
    assert table.column("kurtosis").null_count == 3
    assert table.column("crest_factor").null_count == 3
    assert table.column("rms").to_pylist() == [0.0, 0.0, 0.0]


def evb1_raw(samples: np.ndarray, *, dtype: str, scale: float) -> bytes:
    """An EVB1 block of already quantised ``samples`` with any stored ``scale``."""
    code, kind = (1, "<i2") if dtype == "int16" else (2, "<f4")
    start_us = int((T0 - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1))
    header = HEADER.pack(MAGIC, code, samples.shape[1], 0, FS, start_us, scale)
    return header + samples.astype(kind).tobytes()


@pytest.mark.parametrize(
    ("dtype", "peak", "scale"),
    [
        ("int16", 32767, 3.4e38),  # the scale's float32 maximum on full-scale int16
        ("float32", 3.4e38, 3.4e38),  # the largest block EVB1 can carry: about 1.2e77 m/s²
        ("float32", 3.4e38, 1.0),
        ("int16", 32767, 1e-38),
    ],
)
def test_saturated_and_huge_scale_blocks_have_finite_features(dtype, peak, scale):
    rng = np.random.default_rng(11)
    unit = np.clip(rng.normal(0, 0.2, (N, 2)), -1, 1)
    unit[::97] = 1.0  # clipped, saturated samples
    raw = evb1_raw(unit * peak, dtype=dtype, scale=scale)
    big = decode_vibration(RawMessage("pump-7", "vibration", "http", T0, raw))
    assert isinstance(big, VibrationBlock)
    reference = VibrationBlock(
        "pump-7", "http", T0, FS, big.samples / np.abs(big.samples).max(), raw_bytes=len(raw)
    )
    got, errors = run([big])
    want, _ = run([reference])
    assert errors == []
    factor = float(np.abs(big.samples).max())
    for g, w in zip(got, want, strict=True):
        values = [g.rms, g.peak, g.velocity_rms_mm_s, g.crest_factor, g.kurtosis, *g.band_energy]
        assert all(math.isfinite(v) for v in values), g
        # shape factors do not depend on the scale; levels are proportional to it
        assert g.kurtosis == pytest.approx(w.kurtosis, rel=1e-9)
        assert g.crest_factor == pytest.approx(w.crest_factor, rel=1e-9)
        assert g.rms == pytest.approx(w.rms * factor, rel=1e-9)
        assert g.velocity_rms_mm_s == pytest.approx(w.velocity_rms_mm_s * factor, rel=1e-9)
        assert g.dominant_hz == pytest.approx(w.dominant_hz, rel=1e-9)


@pytest.mark.parametrize(
    ("bad", "count"), [(np.nan, 1), (np.inf, 1), (-np.inf, 1), (1e101, 1), (2e150, 1)]
)
def test_blocks_with_non_finite_or_out_of_range_samples_are_dead_letters(bad, count):
    signal = tone(1.0, 100.0, 3 * N)
    signal[N + 5] = bad
    blocks = cut(signal, [N, N])
    features, errors = run(blocks)
    # the first and the last block give a row each; the bad one is refused, then the last
    # block follows a gap
    assert len(features) == 2
    assert all(
        f.crest_factor is not None and math.isfinite(f.kurtosis) and math.isfinite(f.rms)
        for f in features
    )
    [refused, gap] = errors
    assert refused.reason == (
        f"vibration: block at {blocks[1].start_ts.isoformat()} refused: {count} of {N} samples "
        "are NaN, infinite or beyond ±1e+100 m/s²; hint: check the sensor's scale; the block is "
        "skipped and the next one follows a gap"
    )
    assert refused.received_at == blocks[1].start_ts and refused.payload == b""
    assert gap.reason.startswith("vibration: gap of 0.160000 s")


def test_a_state_saved_with_absolute_fourth_moments_is_converted_on_resume():
    config = SpectralConfig(fft_size=256, frames_per_row=4)
    blocks = cut(np.random.default_rng(5).normal(0, 2, (2600, 2)), [300] * 8)
    straight = SpectralLogic(config, None)
    expected = [f for b in blocks for f in straight.on_batch([b])[0]]

    first = SpectralLogic(config, None)
    got = [f for b in blocks[:5] for f in first.on_batch([b])[0]]
    state = first.snapshot()
    assert state is not None and len(state.pending_sum4)
    # what an earlier version saved: the sum of x^4 and no sum4_relative attribute
    old = pickle.loads(pickle.dumps(state))
    old.pending_sum4 = old.pending_sum4 * old.pending_peak**4
    del old.__dict__["sum4_relative"]
    assert pickle.loads(pickle.dumps(old)).sum4_relative is False
    second = SpectralLogic(config, pickle.loads(pickle.dumps(old)))
    got += [f for b in blocks[5:] for f in second.on_batch([b])[0]]
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.kurtosis == pytest.approx(e.kurtosis, rel=1e-12)
        assert g.rms == e.rms


@st.composite
def evb1_blocks(draw: st.DrawFn) -> bytes:
    """Any valid EVB1 block: int16 or any finite float32 samples, any positive float32 scale."""
    axes = draw(st.integers(1, 3))
    frames = draw(st.integers(1, 300))
    dtype = draw(st.sampled_from(["int16", "float32"]))
    if dtype == "int16":
        element = st.integers(-32768, 32767)
    else:
        element = st.floats(width=32, allow_nan=False, allow_infinity=False)
    pattern = draw(st.lists(element, min_size=1, max_size=64))
    fill = draw(st.sampled_from(["repeat", "constant", "zeros"]))
    flat = np.resize(np.array(pattern, dtype=np.float64), frames * axes)
    if fill == "constant":
        flat[:] = pattern[0]
    elif fill == "zeros":
        flat[:] = 0
    scale = draw(st.floats(min_value=0.0, exclude_min=True, width=32, allow_infinity=False))
    return evb1_raw(flat.reshape(frames, axes), dtype=dtype, scale=scale)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.lists(evb1_blocks(), min_size=1, max_size=3), per_row=st.integers(1, 3))
def test_any_evb1_block_gives_finite_or_null_features(blocks, per_row):
    config = SpectralConfig(fft_size=64, frames_per_row=per_row, overlap=0.5)
    logic = SpectralLogic(config, None)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NumPy overflow / invalid-value warning either
        for i, raw in enumerate(blocks):
            msg = RawMessage("pump-7", "vibration", "http", T0 + timedelta(seconds=i), raw)
            block = decode_vibration(msg)
            assert isinstance(block, VibrationBlock), block
            out += logic.on_batch([block])[0]
        out += logic.on_eof()[0]
    for item in out:
        if isinstance(item, DeadLetter):
            assert item.reason.startswith("vibration: ")
            continue
        values = [
            item.window_s,
            item.rms,
            item.velocity_rms_mm_s,
            item.peak,
            item.dominant_hz,
            item.dominant_amplitude,
            *item.band_energy,
        ]
        assert all(math.isfinite(v) for v in values), item
        for shape in (item.crest_factor, item.kurtosis):
            assert shape is None or (math.isfinite(shape) and shape >= 1.0 - 1e-9), item
        assert (item.crest_factor is None) == (item.kurtosis is None) == (item.peak == 0.0)
        assert item.iso_zone in "ABCD"


# --- white noise -------------------------------------------------------------------


def test_white_noise_band_energies_are_flat_and_add_up_to_rms_squared():
    rng = np.random.default_rng(42)
    sigma = 0.7
    frames = 40
    signal = rng.normal(0.0, sigma, (frames * N, 3))
    nyquist = FS / 2
    quarters = tuple(
        (i * nyquist / 4, (i + 1) * nyquist / 4 + (1 if i == 3 else 0)) for i in range(4)
    )
    features, _ = run(cut(signal, [N] * frames), frames_per_row=frames, bands_hz=quarters)
    assert len(features) == 3
    for f in features:
        assert f.frames == frames
        # Parseval: bands covering 0..Nyquist add up to the time-domain mean square.
        assert sum(f.band_energy) == pytest.approx(f.rms**2, rel=0.02)
        assert f.rms == pytest.approx(sigma, rel=0.02)
        for energy in f.band_energy:
            assert energy == pytest.approx(sigma**2 / 4, rel=0.05)
        assert f.kurtosis == pytest.approx(3.0, abs=0.1)

    # Unequal bands: energy proportional to bandwidth.
    bands = ((100.0, 200.0), (200.0, 1000.0), (1000.0, 5000.0), (5000.0, 12000.0))
    features, _ = run(cut(signal, [N] * frames), frames_per_row=frames, bands_hz=bands)
    density = sigma**2 / nyquist
    for f in features:
        tolerances = (0.15, 0.06, 0.04, 0.03)
        for (lo, hi), energy, tolerance in zip(bands, f.band_energy, tolerances, strict=True):
            assert energy == pytest.approx(density * (hi - lo), rel=tolerance)


# --- frame assembly ----------------------------------------------------------------


def reference_frame_count(samples: int, fft_size: int, overlap: float) -> int:
    hop = fft_size - round(fft_size * overlap)
    return 0 if samples < fft_size else (samples - fft_size) // hop + 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 700), min_size=1, max_size=25),
    overlap=st.sampled_from([0.0, 0.5, 0.75, 0.3]),
    frames_per_row=st.integers(1, 3),
    batch_size=st.integers(1, 6),
    axes=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_blocks_cut_anywhere_give_the_same_rows_as_the_whole_signal(
    sizes, overlap, frames_per_row, batch_size, axes, seed
):
    fft_size = 256
    rng = np.random.default_rng(seed)
    total = sum(sizes)
    t = np.arange(total) / FS
    signal = rng.normal(0.0, 0.3, (total, axes)) + np.sin(2 * np.pi * 1234.5 * t)[:, None]
    settings_ = {"fft_size": fft_size, "overlap": overlap, "frames_per_row": frames_per_row}
    whole, whole_errors = run(cut(signal, [total]), batch_size=1, **settings_)
    pieces, piece_errors = run(cut(signal, sizes), batch_size=batch_size, **settings_)
    assert whole_errors == piece_errors == []
    assert pieces == whole

    frames = reference_frame_count(total, fft_size, overlap)
    rows = -(-frames // frames_per_row)
    assert len(whole) == rows * axes
    hop = fft_size - round(fft_size * overlap)
    for r in range(rows):
        row = whole[r * axes : (r + 1) * axes]
        assert [f.axis for f in row] == ["x", "y", "z"][:axes]
        assert {f.ts for f in row} == {start_of(r * frames_per_row * hop, FS)}
        expected_frames = min(frames_per_row, frames - r * frames_per_row)
        assert {f.frames for f in row} == {expected_frames}
        assert row[0].window_s == pytest.approx(((expected_frames - 1) * hop + fft_size) / FS)


def test_fifty_percent_overlap_gives_the_expected_frame_count():
    blocks = 10
    signal = tone(1.0, 250.0, blocks * N)
    no_overlap, _ = run(cut(signal, [N] * blocks))
    half, _ = run(cut(signal, [N] * blocks), overlap=0.5)
    assert len(no_overlap) == blocks
    assert len(half) == 2 * blocks - 1
    assert [f.ts for f in half] == [start_of(i * N // 2, FS) for i in range(2 * blocks - 1)]
    for f in half:
        assert f.dominant_amplitude == pytest.approx(1.0, rel=0.02)


def test_frames_per_row_averages_power_and_time_statistics():
    a1, a2 = 1.0, 3.0
    signal = np.concatenate([tone(a1, 250.0, 3 * N), tone(a2, 250.0, 3 * N)])
    rows3, _ = run(cut(signal, [1500] * 20), frames_per_row=3)
    assert len(rows3) == 2
    assert rows3[0].band_energy[1] == pytest.approx(a1**2 / 2, rel=0.01)
    assert rows3[1].band_energy[1] == pytest.approx(a2**2 / 2, rel=0.01)
    assert [r.ts for r in rows3] == [T0, start_of(3 * N, FS)]
    assert rows3[0].window_s == pytest.approx(3 * N / FS)

    (row6,), _ = run(cut(signal, [1500] * 20), frames_per_row=6)
    mean_square = (a1**2 + a2**2) / 4
    assert row6.frames == 6 and row6.ts == T0
    assert row6.window_s == pytest.approx(6 * N / FS)
    assert row6.band_energy[1] == pytest.approx(mean_square, rel=0.01)
    assert row6.rms == pytest.approx(math.sqrt(mean_square), rel=0.01)
    assert row6.peak == pytest.approx(a2, rel=0.01)
    # Welch: the averaged power spectrum, so the line is the RMS of both amplitudes.
    assert row6.dominant_amplitude == pytest.approx(math.sqrt((a1**2 + a2**2) / 2), rel=0.02)
    # A mixture of two levels is more peaked than one sinusoid.
    assert row6.kurtosis > 1.5


def test_partial_row_is_emitted_at_end_of_input():
    features, _ = run(cut(tone(1.0, 250.0, 5 * N), [N] * 5), frames_per_row=3)
    assert [f.frames for f in features] == [3, 2]
    assert features[1].ts == start_of(3 * N, FS)
    assert features[1].window_s == pytest.approx(2 * N / FS)


def test_devices_are_independent():
    a = cut(tone(1.0, 250.0, 4 * N), [1000] * 20, device="a")
    b = cut(tone(2.0, 500.0, 4 * N), [3000] * 20, device="b", start=T0 + timedelta(hours=1))
    interleaved = [blk for pair in zip(a, b, strict=False) for blk in pair] + a[len(b) :]
    features, errors = run(interleaved)
    assert errors == []
    by_device = defaultdict(list)
    for f in features:
        by_device[f.device].append(f)
    assert len(by_device["a"]) == len(by_device["b"]) == 4
    assert {round(f.dominant_hz) for f in by_device["b"]} == {500}
    assert by_device["b"][0].ts == T0 + timedelta(hours=1)


# --- discontinuities -----------------------------------------------------------------


def test_gap_discards_the_tail_reports_it_and_restarts_the_frame():
    signal = np.stack([tone(1.0, 250.0, 6 * N), tone(0.5, 500.0, 6 * N)], axis=1)
    before = cut(signal[: 2 * N + 1000], [N, N, 1000])  # two frames plus a 1000-sample tail
    gap_start = start_of(2 * N + 1000, FS) + timedelta(milliseconds=10)
    after = cut(signal[2 * N + 1000 :], [1500] * 10, start=gap_start)
    features, errors = run(before + after, batch_size=2)
    (error,) = errors
    assert error.reason.startswith("vibration: gap of 0.010000 s: block starts ")
    assert "1000 buffered samples per axis (2 axes) discarded and the frame restarted" in (
        error.reason
    )
    assert "\n" not in error.reason
    assert error.device == "pump-7" and error.transport == "mqtt"
    assert error.received_at == gap_start
    # The discarded samples travel in the dead letter as an EVB1 block.
    discarded = decode_vibration(RawMessage("pump-7", "vibration", "mqtt", T0, error.payload))
    assert isinstance(discarded, VibrationBlock)
    assert discarded.start_ts == start_of(2 * N, FS)
    np.testing.assert_allclose(discarded.samples, signal[2 * N : 2 * N + 1000], rtol=1e-6)
    # Frames continue from the new block's start.
    remaining = len(signal) - 2 * N - 1000
    assert len(features) == 2 * (2 + remaining // N)
    assert [f.ts for f in features[::2]] == [
        T0,
        start_of(N, FS),
        *[
            gap_start + timedelta(microseconds=round(i * N * 1e6 / FS))
            for i in range(remaining // N)
        ],
    ]


def test_gap_flushes_the_partial_row():
    first = cut(tone(1.0, 250.0, 2 * N), [N, N])
    later = cut(tone(1.0, 250.0, 3 * N), [N] * 3, start=T0 + timedelta(seconds=5))
    features, errors = run(first + later, frames_per_row=3)
    assert len(errors) == 1
    assert "0 buffered samples per axis" in errors[0].reason
    assert errors[0].payload == b""
    assert [(f.ts, f.frames) for f in features] == [
        (T0, 2),
        (T0 + timedelta(seconds=5), 3),
    ]


def test_block_from_the_past_is_reported_as_an_overlap():
    blocks = cut(tone(1.0, 250.0, 3 * N), [N + 100, N, N - 100])
    features, errors = run(blocks[:2] + blocks[:1] + blocks[2:], batch_size=1)
    back = (2 * N + 100) / FS
    assert errors[0].reason.startswith(
        f"vibration: block overlaps the previous one by {back:.6f} s (out of order?): "
        f"block starts {T0.isoformat()}, expected {start_of(2 * N + 100, FS).isoformat()}"
    )
    assert "100 buffered samples per axis" in errors[0].reason
    # The replayed block restarts the signal; the block after it is then a gap.
    assert len(errors) == 2 and errors[1].reason.startswith("vibration: gap of ")
    assert len(features) == 2 + 1


def test_sample_rate_change_is_reported_and_the_next_frames_use_the_new_rate():
    fast = cut(tone(1.0, 250.0, N + 500), [N + 500])
    slow_start = start_of(N + 500, FS)
    slow = cut(tone(1.0, 250.0, 2 * N, fs=12_800), [N, N], fs=12_800, start=slow_start)
    features, errors = run(fast + slow)
    (error,) = errors
    assert error.reason == (
        f"vibration: sample rate changed from 25600 Hz to 12800 Hz at {slow_start.isoformat()}; "
        "500 buffered samples per axis (1 axes) discarded and the frame restarted"
    )
    assert [f.sample_rate_hz for f in features] == [25_600, 12_800, 12_800]
    assert features[1].ts == slow_start
    assert features[1].window_s == pytest.approx(N / 12_800)
    assert features[1].dominant_hz == pytest.approx(250.0, abs=12_800 / N)


def test_axes_change_is_reported():
    three = cut(np.zeros((N + 7, 3)) + tone(1.0, 250.0, N + 7)[:, None], [N + 7])
    one = cut(tone(1.0, 250.0, N), [N], start=start_of(N + 7, FS))
    features, errors = run(three + one)
    (error,) = errors
    assert error.reason.startswith("vibration: axes changed from 3 to 1 at ")
    assert "7 buffered samples per axis (3 axes) discarded" in error.reason
    assert [f.axis for f in features] == ["x", "y", "z", "x"]


def test_timestamp_jitter_within_tolerance_is_not_a_gap():
    blocks = cut(tone(1.0, 250.0, 4 * N), [1000] * 20)
    jittered = [
        VibrationBlock(
            b.device,
            b.transport,
            b.start_ts + timedelta(microseconds=(8, -8)[i % 2] if i else 0),
            b.sample_rate_hz,
            b.samples,
            b.raw_bytes,
        )
        for i, b in enumerate(blocks)
    ]
    features, errors = run(jittered)
    assert errors == []
    assert len(features) == 4
    # With a tighter tolerance the same jitter is a gap.
    _, errors = run(jittered, max_gap=timedelta(microseconds=10))
    assert errors and all(e.reason.startswith("vibration: ") for e in errors)


def test_max_gap_bridges_short_gaps():
    blocks = cut(tone(1.0, 250.0, 4 * N), [N] * 4)
    late = [
        VibrationBlock(
            b.device,
            b.transport,
            b.start_ts + timedelta(milliseconds=3 * i),
            b.sample_rate_hz,
            b.samples,
            b.raw_bytes,
        )
        for i, b in enumerate(blocks)
    ]
    features, errors = run(late, max_gap=timedelta(milliseconds=5))
    assert errors == []
    # The timeline follows the device's clock.
    assert [f.ts for f in features] == [b.start_ts for b in late]
    _, errors = run(late, max_gap=timedelta(milliseconds=2))
    assert len(errors) == 3


# --- scale-out and recovery ----------------------------------------------------------


def machine_blocks(device: str, seed: int, blocks: int = 12) -> list[VibrationBlock]:
    rng = np.random.default_rng(seed)
    signal = (
        rng.normal(0, 0.2, (blocks * 1500, 3))
        + tone(1 + seed, 100.0 * (seed + 1), blocks * 1500)[:, None]
    )
    return cut(signal, [1500] * blocks, device=device)


def test_two_workers_give_the_same_features_as_one():
    per_device = [machine_blocks(f"dev-{i}", i) for i in range(6)]
    blocks = [b for group in zip(*per_device, strict=True) for b in group]
    single, _ = run(blocks, frames_per_row=2, overlap=0.5)
    features: list = []
    errors: list = []
    workers: set[int] = set()
    flow = build(blocks, features, errors, workers_seen=workers, frames_per_row=2, overlap=0.5)
    cluster_main(flow, [], 0, worker_count_per_proc=2)
    assert workers == {0, 1}
    assert errors == []

    def by_device(items):
        grouped = defaultdict(list)
        for f in items:
            grouped[f.device].append(f)
        return dict(grouped)

    assert by_device(f for _, f in features) == by_device(single)
    assert len(single) == 6 * 3 * 4


def test_resume_from_recovery_snapshot_gives_the_same_features(tmp_path):
    per_device = [machine_blocks(f"dev-{i}", i, blocks=16) for i in range(3)]
    blocks = [b for group in zip(*per_device, strict=True) for b in group]
    expected, _ = run(blocks, frames_per_row=2)
    source: list = [(b.device, b) for b in blocks]
    source.insert(25, TestingSource.ABORT())
    init_db_dir(tmp_path, 1)
    features: list = []
    errors: list = []
    for _ in range(2):
        flow = build(blocks, features, errors, source=source, batch_size=3, frames_per_row=2)
        run_main(flow, epoch_interval=timedelta(0), recovery_config=RecoveryConfig(str(tmp_path)))
    both = [f for _, f in features]
    assert errors == []
    # At-least-once: rows after the last snapshot may be emitted again.
    assert set(both) == set(expected)
    assert len(both) < 2 * len(expected)


def test_state_pickles_and_resumes_mid_frame():
    config = SpectralConfig(fft_size=256, frames_per_row=3, overlap=0.5)
    blocks = cut(np.random.default_rng(3).normal(0, 1, (3000, 2)), [333] * 10)
    straight = SpectralLogic(config, None)
    expected = [f for b in blocks for f in straight.on_batch([b])[0]]

    first = SpectralLogic(config, None)
    got = [f for b in blocks[:7] for f in first.on_batch([b])[0]]
    state = pickle.loads(pickle.dumps(first.snapshot()))
    assert isinstance(state, SpectralState)
    assert len(state.tail) and len(state.pending_power)
    second = SpectralLogic(config, state)
    got += [f for b in blocks[7:] for f in second.on_batch([b])[0]]
    assert got == expected
    assert len(pickle.dumps(state)) < 20_000


# --- configuration errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("settings_", "error", "pattern"),
    [
        (
            {"fft_size": 4096.0},
            TypeError,
            r"spectral `fft_size` must be an int; got 4096\.0 \(float\)\. Hint: fft_size=4096",
        ),
        (
            {"fft_size": True},
            TypeError,
            r"spectral `fft_size` must be an int; got True \(bool\)",
        ),
        (
            {"fft_size": 1000},
            ValueError,
            r"spectral `fft_size` must be a power of two from 64 to 1048576; got 1000\. "
            r"Hint: round to 1024\.",
        ),
        (
            {"fft_size": 32},
            ValueError,
            r"spectral `fft_size` must be a power of two from 64 to 1048576; got 32\. "
            r"Hint: round to 64\.",
        ),
        (
            {"fft_size": 1 << 21},
            ValueError,
            r"spectral `fft_size` must be a power of two .*got 2097152\. Hint: round to 1048576",
        ),
        (
            {"overlap": "half"},
            TypeError,
            r"spectral `overlap` must be a number; got 'half' \(str\)\. Hint: overlap=0\.5",
        ),
        (
            {"overlap": 50},
            ValueError,
            r"spectral `overlap` must be a fraction in \[0, 0\.95\]; got 50\. "
            r"Hint: 0\.5 means 50% \(not 50\)",
        ),
        (
            {"overlap": -0.1},
            ValueError,
            r"spectral `overlap` must be a fraction in \[0, 0\.95\]; got -0\.1\.",
        ),
        (
            {"frames_per_row": 1.5},
            TypeError,
            r"spectral `frames_per_row` must be an int; got 1\.5 \(float\)\. "
            r"Hint: frames_per_row=6",
        ),
        (
            {"frames_per_row": 0},
            ValueError,
            r"spectral `frames_per_row` must be at least 1; got 0\. Hint: 1 emits one row",
        ),
        (
            {"bands_hz": "10-100"},
            TypeError,
            r"spectral `bands_hz` must be a sequence of \(lo_hz, hi_hz\) pairs; got "
            r"'10-100' \(str\)\. Hint: bands_hz=\(\(10, 100\)",
        ),
        (
            {"bands_hz": ((10, 100), (100,))},
            TypeError,
            r"spectral `bands_hz\[1\]` must be a pair of numbers \(lo_hz, hi_hz\); "
            r"got \(100,\) \(tuple\)\.",
        ),
        (
            {"bands_hz": ((10, "100"),)},
            TypeError,
            r"spectral `bands_hz\[0\]` must be a pair of numbers",
        ),
        (
            {"bands_hz": ((10, math.inf),)},
            ValueError,
            r"spectral `bands_hz\[0\]` must be finite; got \(10\.0, inf\)\. Hint:",
        ),
        (
            {"bands_hz": ((-5, 10),)},
            ValueError,
            r"spectral `bands_hz\[0\]` must not start below 0 Hz; got \(-5, 10\)\.",
        ),
        (
            {"bands_hz": ((10, 100), (1000, 100))},
            ValueError,
            r"spectral `bands_hz\[1\]` needs lo < hi; got \(1000, 100\)\. "
            r"Hint: give the lower edge first",
        ),
        (
            {"velocity_band_hz": (0, 1000)},
            ValueError,
            r"spectral `velocity_band_hz` must start above 0 Hz; got \(0, 1000\)\. "
            r"Hint: velocity is acceleration divided by 2πf",
        ),
        (
            {"velocity_band_hz": (1000, 10)},
            ValueError,
            r"spectral `velocity_band_hz` needs lo < hi; got \(1000, 10\)\. .*ISO 10816",
        ),
        (
            {"velocity_band_hz": 1000},
            TypeError,
            r"spectral `velocity_band_hz` must be a pair of numbers \(lo_hz, hi_hz\); "
            r"got 1000 \(int\)",
        ),
        (
            {"iso_thresholds_mm_s": (1.4, 2.8)},
            TypeError,
            r"spectral `iso_thresholds_mm_s` must be three numbers; got \(1\.4, 2\.8\) "
            r"\(tuple\)\. Hint: iso_thresholds_mm_s=\(1\.4, 2\.8, 4\.5\)",
        ),
        (
            {"iso_thresholds_mm_s": (4.5, 2.8, 1.4)},
            ValueError,
            r"spectral `iso_thresholds_mm_s` must be finite, > 0 and strictly increasing; "
            r"got \(4\.5, 2\.8, 1\.4\)\.",
        ),
        (
            {"iso_thresholds_mm_s": (0, 2.8, 4.5)},
            ValueError,
            r"spectral `iso_thresholds_mm_s` must be finite, > 0 and strictly increasing",
        ),
        (
            {"max_gap": 0.001},
            TypeError,
            r"spectral `max_gap` must be a datetime\.timedelta or None; got 0\.001 \(float\)\. "
            r"Hint: max_gap=timedelta\(milliseconds=1\)",
        ),
        (
            {"max_gap": timedelta(seconds=-1)},
            ValueError,
            r"spectral `max_gap` must be >= 0; got datetime\.timedelta\(days=-1.*Hint: leave it "
            r"None",
        ),
    ],
)
def test_config_errors(settings_, error, pattern):
    with pytest.raises(error, match=pattern):
        SpectralConfig(**settings_)
    # The operator checks its settings while the flow is built, before any data.
    flow = Dataflow("bad")
    s = op.input("in", flow, TestingSource([]))
    with pytest.raises(error, match=pattern):
        spectral("spectral", s, **settings_)


def test_operator_defaults_are_the_config_defaults():
    # Six 4096-sample frames per row, about 1 s at 25.6 kHz.
    default = SpectralConfig()
    assert (default.fft_size, default.overlap, default.frames_per_row) == (4096, 0.0, 6)
    signal = tone(1.0, 250.0, 7 * N)
    features: list[tuple[str, Features]] = []
    run_main(build(cut(signal, [N] * 7), features, []))
    rows = [f for _, f in features]
    assert [(f.frames, f.ts) for f in rows] == [(6, T0), (1, start_of(6 * N, FS))]
    assert rows[0].window_s == 6 * N / FS
    assert len(rows[0].band_energy) == len(default.bands_hz)
    assert rows[0].velocity_rms_mm_s == pytest.approx(velocity_mm_s(1.0, 250.0), rel=0.01)
    assert rows[0].iso_zone == default.zone(rows[0].velocity_rms_mm_s)


def test_config_accepts_and_normalises_valid_settings():
    config = SpectralConfig(
        fft_size=np.int64(1024),
        overlap=0.5,
        bands_hz=[[0, 10], (10, 12_800.5)],
        velocity_band_hz=[2, 1000],
        iso_thresholds_mm_s=[0.71, 1.8, 4.5],
        max_gap=timedelta(0),
    )
    assert config.fft_size == 1024 and type(config.fft_size) is int
    assert config.bands_hz == ((0.0, 10.0), (10.0, 12_800.5))
    assert config.velocity_band_hz == (2.0, 1000.0)
    assert config.hop == 512
    assert SpectralConfig(overlap=0.95, fft_size=64).hop == 3
    assert SpectralConfig().gap_tolerance(25_600) == timedelta(microseconds=20)
    assert SpectralConfig().gap_tolerance(1_000_000) == timedelta(microseconds=1)
    assert [config.zone(v) for v in (0.5, 0.71, 2.0, 4.5)] == ["A", "B", "C", "D"]
    assert SpectralConfig(bands_hz=()).bands_hz == ()
