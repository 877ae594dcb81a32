"""The math of score-chunks on synthetic signals: chunking, features, novelty, stability, priority."""

from __future__ import annotations

import numpy as np
import pytest

from valle_cli.data import chunks
from valle_cli.data.chunks import ChunkParams, score_source
from valle_cli.errors import AudioError

SR, FR = 16000, 50.0  # 320 samples per code frame


def tone(seconds: float, freq: float, amp: float = 0.3, phase_s: float = 0.0) -> np.ndarray:
    t = phase_s + np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def chunk_times(s: chunks.SourceScores) -> np.ndarray:
    return s.frame_start / FR  # (C,) chunk start in seconds


# ----------------------------------------------------------------------------- chunking


def test_chunk_frames_by_seconds_and_by_bpm():
    assert ChunkParams(chunk_seconds=1.0).chunk_frames(75.0) == 75
    assert ChunkParams().chunk_frames(75.0) == 56  # default 0.75 s: round(56.25)
    # 165 BPM, 2 beats per chunk = 0.7273 s: round(54.55) = 55 frames (rounded, not truncated to 54)
    assert ChunkParams(bpm=165, beats_per_chunk=2).chunk_frames(75.0) == 55
    assert ChunkParams(bpm=120, beats_per_chunk=4).chunk_frames(50.0) == 100
    assert ChunkParams(chunk_seconds=0.001).chunk_frames(75.0) == 1  # never zero frames


def test_layout_covers_every_frame_once_and_only_the_last_chunk_is_shorter():
    start, length = chunks.chunk_layout(200, 56)
    assert start.tolist() == [0, 56, 112, 168] and length.tolist() == [56, 56, 56, 32]
    start, length = chunks.chunk_layout(112, 56)
    assert length.tolist() == [56, 56]
    s = score_source(tone(7.3, 440), SR, FR, ChunkParams(chunk_seconds=1.0))  # 365 frames
    assert len(s) == 8 and s.frame_len.sum() == 365 and s.frame_len[-1] == 15
    assert np.array_equal(s.frame_start, np.arange(8) * 50)


@pytest.mark.parametrize("kwargs", [{"chunk_seconds": 0}, {"bpm": -1}, {"novelty": "magic"},
                                    {"novelty_weight": 0, "instability_weight": 0}, {"smooth_seconds": -1}])
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        ChunkParams(**kwargs)


def test_audio_that_does_not_match_its_codes_is_refused():
    with pytest.raises(AudioError, match="not the audio these codes were made from"):
        score_source(tone(2.0, 440), SR, FR, n_frames=400)
    score_source(tone(2.0, 440), SR, FR, n_frames=101)  # one frame of codec padding is fine


# ----------------------------------------------------------------------------- features


def test_rms_is_in_dbfs_and_follows_the_chunk():
    audio = np.concatenate([tone(2.0, 440, amp=1.0), tone(2.0, 440, amp=0.1)])
    s = score_source(audio, SR, FR, ChunkParams(chunk_seconds=1.0))
    assert np.allclose(s.rms_db, [-3.01, -3.01, -23.01, -23.01], atol=0.05)  # a sine's RMS is amp / sqrt(2)


def test_shape_flux_is_a_distance():
    rng = np.random.default_rng(0)
    spectrum = rng.normal(-40, 10, size=257)
    same = np.stack([spectrum] * 4)  # (C, F): identical spectra
    shape, magnitude = chunks.spectral_flux(same)
    assert np.allclose(shape, 0) and np.allclose(magnitude, 0)
    louder = np.stack([spectrum, spectrum + 12.0])  # same shape, 12 dB up: no shape change
    shape, magnitude = chunks.spectral_flux(louder)
    assert np.allclose(shape, 0, atol=1e-9) and np.allclose(magnitude, 12.0)
    other = np.stack([spectrum, rng.normal(-40, 10, size=257), -spectrum])
    shape, _ = chunks.spectral_flux(other)
    assert 0.5 < shape[1] < 1.5 and shape[2] > shape[1]  # unrelated ~1, anti-correlated towards 2
    flat = np.full((3, 257), chunks.DB_FLOOR)  # silence: flat spectra, no shape at all
    shape, _ = chunks.spectral_flux(np.concatenate([flat, same[:1]]))
    assert shape.tolist() == [0.0, 0.0, 0.0, 1.0]


def test_zscore_keeps_one_feature_from_dominating():
    rng = np.random.default_rng(1)
    features = np.stack([rng.normal(-30, 4, 200), rng.uniform(0, 0.5, 200), rng.gamma(2, 2, 200)], axis=1)
    void = np.zeros(200, bool)
    z = chunks.zscore(features, void)
    assert np.allclose(z.std(axis=0), 1.0, atol=0.05) and np.allclose(z.mean(axis=0), 0, atol=0.05)
    # the units of a feature do not matter: dB x 1000 gives the same z-scores
    assert np.allclose(chunks.zscore(features * [1000, 1, 1], void), z, atol=1e-6)
    # ...and so cosines see each feature equally: without z-scoring, rms_db (~-30) decides them all
    cos = (features[:-1] * features[1:]).sum(1) / np.linalg.norm(features[:-1], axis=1) / \
        np.linalg.norm(features[1:], axis=1)
    assert cos.min() > 0.9  # raw features: every pair of chunks looks alike
    assert chunks.stability(z, 1).min() < 0.5  # z-scored: they do not


def test_zscore_does_not_blow_up_numerical_noise():
    features = np.stack([np.full(50, -10.0) + 1e-6 * np.arange(50), np.zeros(50), np.full(50, 0.01)], axis=1)
    assert np.abs(chunks.zscore(features, np.zeros(50, bool))).max() < 1e-3


# ----------------------------------------------------------------------------- scores


def test_abrupt_change_gives_a_novelty_peak_at_the_change():
    audio = np.concatenate([tone(20.0, 220), tone(20.0, 1500, amp=0.2, phase_s=20.0)])
    s = score_source(audio, SR, FR)
    peak = chunk_times(s)[np.argmax(s.novelty)]
    assert 19.0 <= peak <= 21.0, peak
    assert s.novelty.max() == pytest.approx(1.0)
    assert s.novelty[chunk_times(s) < 15].max() < 0.05  # nothing new before the change
    change = np.argmin(np.abs(chunk_times(s) - 20.0))
    assert s.stability[change - 1: change + 2].min() < 0.5 < s.stability[:10].min()
    assert chunk_times(s)[np.argmax(s.priority)] == pytest.approx(peak, abs=1.0)
    for mode in ("velocity", "activity"):
        other = score_source(audio, SR, FR, ChunkParams(novelty=mode))
        assert 17.0 <= chunk_times(other)[np.argmax(other.novelty)] <= 23.0, mode
        assert other.novelty.min() >= 0 and other.novelty.max() <= 1


def test_constant_signal_is_stable_and_not_novel():
    s = score_source(tone(30.0, 330), SR, FR)
    assert s.stability.min() > 0.95
    assert s.novelty.max() < 0.1
    assert not s.void.any() and (s.priority >= 0).all()


def test_silence_is_void_with_zero_priority():
    s = score_source(np.zeros(5 * SR, np.float32), SR, FR)
    assert s.void.all() and (s.priority == 0).all() and (s.rms_db == chunks.DB_FLOOR).all()
    audio = np.concatenate([np.zeros(4 * SR, np.float32), tone(6.0, 440), 1e-4 * tone(4.0, 440)])  # -83 dBFS tail
    s = score_source(audio, SR, FR, ChunkParams(chunk_seconds=1.0))
    assert s.void.tolist() == [True] * 4 + [False] * 6 + [True] * 4
    assert (s.priority[s.void] == 0).all() and (s.priority[~s.void] > 0).all()
    assert s.novelty[~s.void].max() == pytest.approx(1.0)  # scaled over the sound, not the silence


def test_all_zero_priority_falls_back_to_uniform():
    params = ChunkParams()
    void = np.array([False, False, True, False])
    p = chunks.priority(np.zeros(4), np.ones(4), void, params, chunk_seconds=0.75)
    assert p.tolist() == [1.0, 1.0, 0.0, 1.0]
    p = chunks.priority(np.zeros(4), np.ones(4), np.ones(4, bool), params, chunk_seconds=0.75)
    assert p.tolist() == [0.0] * 4  # all void: nothing to fall back to


def test_priority_blend_weights_and_smoothing():
    nov = np.zeros(15)
    nov[6] = 1.0
    stab = np.ones(15)
    stab[7] = 0.5
    void = np.zeros(15, bool)
    p = chunks.priority(nov, stab, void, ChunkParams(), chunk_seconds=1.0)
    assert np.allclose(p[5:9], [0, 0.7, 0.3 * 0.25, 0]) and p.sum() == pytest.approx(0.775)
    p = chunks.priority(nov, stab, void, ChunkParams(novelty_weight=0, instability_weight=1), chunk_seconds=1.0)
    assert p[7] == pytest.approx(0.25) and p.sum() == pytest.approx(0.25)
    smooth = chunks.priority(nov, stab, void, ChunkParams(smooth_seconds=1.0), chunk_seconds=1.0)
    assert smooth.sum() == pytest.approx(0.775) and smooth.max() < 0.5 and smooth[4] > 0  # spread, mass kept


def test_stability_window_and_lone_chunk():
    z = np.zeros((9, 3))
    z[4] = [3.0, -3.0, 3.0]  # one odd chunk
    s = chunks.stability(z, half_width=1)
    assert s[4] < 0.5 and s[0] == pytest.approx(1.0) and s[3] < s[0]
    assert chunks.stability(np.ones((1, 3)), 4).tolist() == [1.0]


def test_long_source_is_scored_in_one_pass():
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(600 * SR)).astype(np.float32)  # 10 minutes
    s = score_source(audio, SR, FR)  # 0.75 s x 50 frames/s = 37.5 -> 38 frames per chunk
    assert len(s) == 790 and np.isfinite(s.priority).all()
