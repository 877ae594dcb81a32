"""score-chunks: cut every source's code frames into chunks and score each chunk for sampling.

A structural analysis of audio into chunks scored for novelty and stability, used to draw
training windows and prompts where the audio changes. Per source, everything is vectorised over
chunks (no Python loop over chunks):

    audio (S,) at the codec rate, T code frames, chunks of L frames (the last may be shorter)
      -> rms_db (C,)                      RMS of the chunk's samples in dBFS (floor -120)
      -> spectra (C, F)                   mean over the chunk's STFT windows of the dB magnitude
      -> shape_flux (C,)                  cosine *distance* between consecutive mean-centred spectra
      -> magnitude_flux (C,)              mean |dB change| per bin between consecutive spectra
      features (C, 3) --z-score per source--> z (C, 3)
      z -> novelty (C,)                   crossover: |EMA_fast(z) - EMA_slow(z)|, or velocity / activity;
                                          min-max scaled to [0, 1] over the non-void chunks
      z -> stability (C,)                 mean cosine similarity with the neighbours within the window
      priority = w_n * novelty + w_s * (1 - stability)^2, optionally smoothed; void chunks
                 (RMS below void_db) get 0; when all non-void chunks of a source score 0,
                 they all get 1.0 (uniform)

Properties of the scores:
- shape flux is a distance (identical spectra -> 0), not a similarity;
- features are z-scored per source before any cosine, so no feature dominates by its units; a
  per-feature floor on the standard deviation keeps a near-constant source from blowing its
  numerical noise up to unit variance;
- RMS is in dB; every time constant is given in seconds and converted with the real chunk length;
- chunk boundaries are exact code frames (frame_start, frame_len) and the parameters travel in
  the output's metadata, so no reader recomputes the chunk size.

Two further choices: the cosine similarities of stability compare z-vectors with a constant
unit coordinate appended (a chunk at the source mean is then similar to its like instead of
undefined), and a chunk's features at the first position (no previous chunk for a flux) copy
the second chunk's.

``score_source`` scores one source's audio; ``score_codes_folder`` scores every source listed in a
codes folder's manifest (features from the original audio when its file still exists, otherwise
from audio decoded by the recorded codec) and is what ``valle score-chunks`` runs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from valle_cli import formats
from valle_cli.errors import AudioError, CodecMismatchError, FormatError, InputError, PartialFailure, ValleError

NOVELTY_MODES = ("crossover", "velocity", "activity")
FEATURES = ("rms_db", "shape_flux", "magnitude_flux")
DB_FLOOR = -120.0  # dBFS given to digital silence (RMS and spectra)
# Smallest standard deviation a feature is divided by when z-scoring: a source that varies less
# than this is treated as constant in that feature (dB, cosine distance, dB).
Z_STD_FLOOR = np.array([1.0, 0.01, 0.5])
Z_CLIP = 5.0  # z-scores are clipped to +-Z_CLIP: one silent gap must not flatten the rest
# Raw novelty is divided by its range, but never by less than this (z units): a source whose
# features barely move gets proportionally little novelty instead of noise stretched to [0, 1].
NOVELTY_RANGE_FLOOR = 0.25
FFT_SECONDS = 0.02  # STFT window ~20 ms, rounded to a power of two in samples (512 at 24 kHz)


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ChunkParams:
    """Everything that decides the scores; recorded in the output's metadata."""

    chunk_seconds: float = 0.75  # chunk length, unless bpm is given
    bpm: float | None = None  # musical chunking: a chunk is beats_per_chunk beats at bpm
    beats_per_chunk: float = 2.0
    novelty: str = "crossover"  # crossover | velocity | activity
    fast_seconds: float = 4.0  # fast EMA time constant (span); also the velocity/activity scale
    slow_seconds: float = 90.0  # slow EMA time constant (span)
    stability_seconds: float = 6.0  # width of the neighbourhood stability looks at
    novelty_weight: float = 0.7
    instability_weight: float = 0.3  # weight of (1 - stability)^2
    smooth_seconds: float = 0.0  # Gaussian smoothing (sigma) of the priority; 0 = none
    void_db: float = -50.0  # chunks quieter than this (RMS, dBFS) are void: priority 0

    def __post_init__(self) -> None:
        positive = {"chunk_seconds": self.chunk_seconds, "beats_per_chunk": self.beats_per_chunk,
                    "fast_seconds": self.fast_seconds, "slow_seconds": self.slow_seconds,
                    "stability_seconds": self.stability_seconds}
        if self.bpm is not None:
            positive["bpm"] = self.bpm
        for name, value in positive.items():
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value}")
        if self.novelty not in NOVELTY_MODES:
            raise ValueError(f"novelty must be one of {', '.join(NOVELTY_MODES)}, got {self.novelty!r}")
        if self.smooth_seconds < 0 or self.novelty_weight < 0 or self.instability_weight < 0:
            raise ValueError("smooth_seconds and the weights must not be negative")
        if self.novelty_weight + self.instability_weight == 0:
            raise ValueError("novelty_weight and instability_weight cannot both be 0")

    @property
    def seconds_per_chunk(self) -> float:
        """The requested chunk length in seconds (before rounding to whole code frames)."""
        return 60.0 / self.bpm * self.beats_per_chunk if self.bpm else self.chunk_seconds

    def chunk_frames(self, frame_rate: float) -> int:
        """Code frames per chunk: seconds * frame_rate rounded (halves up), at least 1."""
        return max(1, math.floor(self.seconds_per_chunk * frame_rate + 0.5))


def fft_size(sample_rate: int) -> int:
    """STFT window in samples: the power of two nearest FFT_SECONDS (512 at 24 kHz, 256 at 16 kHz)."""
    return int(2 ** round(math.log2(FFT_SECONDS * sample_rate)))


def derived_settings(params: ChunkParams, frame_rate: float, sample_rate: int) -> dict[str, Any]:
    """The parameters plus what they become for one codec: the metadata 'params' of the output."""
    frames = params.chunk_frames(frame_rate)
    chunk_s = frames / frame_rate
    return {
        **asdict(params),
        "chunk_frames": frames,
        "chunk_seconds_actual": chunk_s,
        "frame_rate": frame_rate,
        "sample_rate": sample_rate,
        "n_fft": fft_size(sample_rate),
        "fast_span_chunks": params.fast_seconds / chunk_s,
        "slow_span_chunks": params.slow_seconds / chunk_s,
        "stability_half_width_chunks": _half_width(params.stability_seconds, chunk_s),
        "smooth_sigma_chunks": params.smooth_seconds / chunk_s,
        "z_std_floor": dict(zip(FEATURES, Z_STD_FLOOR.tolist(), strict=True)),
        "z_clip": Z_CLIP,
    }


def _half_width(seconds: float, chunk_s: float) -> int:
    """Neighbours on each side covered by a window of `seconds` (at least 1)."""
    return max(1, round(seconds / chunk_s / 2))


# ----------------------------------------------------------------------------- chunking & features


def chunk_layout(n_frames: int, chunk_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(frame_start (C,), frame_len (C,)) covering T frames in chunks of L; C = ceil(T / L)."""
    starts = np.arange(0, n_frames, chunk_frames, dtype=np.int64)  # (C,)
    lens = np.minimum(chunk_frames, n_frames - starts)  # (C,), last may be shorter
    return starts, lens


def chunk_features(audio: np.ndarray, sample_rate: int, frame_rate: float, frame_start: np.ndarray,
                   frame_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RMS in dBFS (C,) and the mean dB magnitude spectrum (C, F) of each chunk's samples.

    Frame t covers samples [t * sr / fr, (t + 1) * sr / fr). Each chunk gets the STFT windows
    (Hann, hop n_fft / 2) that fit in it, centred; a chunk shorter than a window gets one window
    centred on it. Magnitudes are scaled so a full-scale sine peaks at 0 dB.
    """
    import scipy.fft

    n = len(audio)
    spf = sample_rate / frame_rate  # samples per code frame
    a = np.minimum(np.round(frame_start * spf).astype(np.int64), max(n - 1, 0))  # (C,) first sample
    b = np.minimum(np.round((frame_start + frame_len) * spf).astype(np.int64), n)  # (C,) end (real audio)
    b = np.maximum(b, a + 1)

    # RMS over the real samples of each chunk (reduceat sums [a_c, a_{c+1}); the tail past b is 0).
    squares = np.concatenate([audio.astype(np.float32) ** 2, np.zeros(1, np.float32)])  # (S + 1,)
    sums = np.add.reduceat(squares, a).astype(np.float64)  # (C,)
    rms = np.sqrt(sums / (b - a))
    rms_db = np.maximum(20 * np.log10(np.maximum(rms, 1e-12)), DB_FLOOR)

    # STFT windows, gathered chunk by chunk but computed in a few large batches.
    n_fft = fft_size(sample_rate)
    hop = n_fft // 2
    nominal = np.round((frame_start + frame_len) * spf).astype(np.int64) - np.round(frame_start * spf).astype(np.int64)
    per_chunk = np.maximum(1, 1 + (nominal - n_fft) // hop)  # (C,) windows in each chunk
    offset = (nominal - n_fft - (per_chunk - 1) * hop) // 2  # (C,) centres them (negative when short)
    owner = np.repeat(np.arange(len(a)), per_chunk)  # (W,) chunk of each window
    first = np.cumsum(per_chunk) - per_chunk  # (C,) index of each chunk's first window
    k = np.arange(len(owner)) - first[owner]  # (W,) window index inside its chunk
    starts = a[owner] + offset[owner] + k * hop + n_fft  # (W,) into the audio padded by n_fft in front
    padded = np.zeros(n_fft + max(n, int(starts.max(initial=0))) + 2 * n_fft, np.float32)
    padded[n_fft:n_fft + n] = audio
    windows = np.lib.stride_tricks.sliding_window_view(padded, n_fft)  # (len, n_fft) view, no copy
    hann = np.hanning(n_fft + 1)[:-1].astype(np.float32)  # periodic Hann
    hann *= 2.0 / hann.sum()  # a full-scale sine then peaks at magnitude 1 (0 dB)
    power_floor = np.float32(10 ** (DB_FLOOR / 10))

    total = np.zeros((len(a), n_fft // 2 + 1), np.float64)  # (C, F) summed dB spectra
    block = max(1, (1 << 22) // n_fft)  # windows per batch: ~16 MB of float32 frames
    for lo in range(0, len(owner), block):  # loops over batches of windows, not over chunks
        sl = slice(lo, lo + block)
        frames = windows[starts[sl]]  # (w, n_fft) copy of the rows
        frames *= hann
        spec = scipy.fft.rfft(frames, axis=1)  # (w, F) complex64
        db = spec.real**2
        db += spec.imag**2
        np.maximum(db, power_floor, out=db)
        np.log10(db, out=db)
        db *= 10  # (w, F) dB magnitude
        chunks, at = np.unique(owner[sl], return_index=True)  # owner is sorted: contiguous runs
        total[chunks] += np.add.reduceat(db, at, axis=0)
    spectra = total / per_chunk[:, None]  # (C, F)
    return rms_db, spectra


def spectral_flux(spectra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shape_flux (C,), magnitude_flux (C,)) between consecutive dB spectra (C, F).

    shape_flux: cosine distance (1 - cosine similarity, in [0, 2]) between the mean-centred
    spectra, so a pure change of level is no change of shape; two flat (e.g. silent) spectra are
    at distance 0, a flat and a shaped one at 1. magnitude_flux: mean absolute dB change per bin.
    The first chunk has no predecessor and copies the second chunk's values.
    """
    c = len(spectra)
    if c < 2:
        return np.zeros(c), np.zeros(c)
    centred = spectra - spectra.mean(axis=1, keepdims=True)  # (C, F)
    norm = np.linalg.norm(centred, axis=1)  # (C,)
    shaped = norm > 1e-6 * np.sqrt(spectra.shape[1])  # (C,) False for a flat spectrum
    dot = (centred[1:] * centred[:-1]).sum(axis=1)  # (C-1,)
    both, one = shaped[1:] & shaped[:-1], shaped[1:] ^ shaped[:-1]
    cos = np.where(both, dot / np.where(both, norm[1:] * norm[:-1], 1.0), 1.0)
    shape = np.clip(np.where(one, 1.0, 1.0 - cos), 0.0, 2.0)  # (C-1,)
    magnitude = np.abs(spectra[1:] - spectra[:-1]).mean(axis=1)  # (C-1,)
    return np.concatenate([shape[:1], shape]), np.concatenate([magnitude[:1], magnitude])


def zscore(features: np.ndarray, void: np.ndarray) -> np.ndarray:
    """Features (C, D) standardised per column over the source's non-void chunks (all, if fewer
    than two are not void); the std never goes below Z_STD_FLOOR; result clipped to +-Z_CLIP."""
    ref = features[~void] if (~void).sum() >= 2 else features
    mean = ref.mean(axis=0)
    std = np.maximum(ref.std(axis=0), Z_STD_FLOOR[: features.shape[1]])
    return np.clip((features - mean) / std, -Z_CLIP, Z_CLIP)


# ----------------------------------------------------------------------------- novelty, stability, priority


def ema(x: np.ndarray, span: float) -> np.ndarray:
    """Exponential moving average along axis 0 of (C, D), alpha = 2 / (span + 1), started at x[0]
    (pandas' ewm(span, adjust=False)); computed by polars."""
    import polars as pl

    alpha = min(1.0, 2.0 / (span + 1.0))
    frame = pl.DataFrame(x, schema=[f"f{i}" for i in range(x.shape[1])])
    return frame.select(pl.all().ewm_mean(alpha=alpha, adjust=False)).to_numpy()


def _window_sums(x: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums of x (C, D) over the centred windows [i - half, i + half] clipped to the source, and
    the number of rows in each window (C,)."""
    c = len(x)
    cs = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(x, axis=0)])  # (C+1, D)
    i = np.arange(c)
    lo, hi = np.maximum(0, i - half), np.minimum(c, i + half + 1)
    return cs[hi] - cs[lo], hi - lo


def min_max(x: np.ndarray, void: np.ndarray | None = None) -> np.ndarray:
    """(x - min) / (max - min) clipped to [0, 1], the range floored at NOVELTY_RANGE_FLOOR. With
    ``void``, min and max are taken over the other chunks (when there are any): a silent gap,
    which is never drawn, does not squeeze the novelty of the sound around it."""
    ref = x[~void] if void is not None and (~void).any() else x
    if len(ref) == 0:
        return x
    lo = float(ref.min())
    return np.clip((x - lo) / max(float(ref.max()) - lo, NOVELTY_RANGE_FLOOR), 0.0, 1.0)


def novelty(z: np.ndarray, mode: str, fast_span: float, slow_span: float,
            void: np.ndarray | None = None) -> np.ndarray:
    """(C,) in [0, 1] from z-scored features (C, D), scaled over the non-void chunks.

    crossover: distance between a fast and a slow EMA of the features (a change that the long
    memory has not absorbed yet); velocity: distance between consecutive fast-EMA values;
    activity: size of the features' variance in a centred window of the fast span.
    """
    if mode == "crossover":
        raw = np.linalg.norm(ema(z, fast_span) - ema(z, slow_span), axis=1)
    elif mode == "velocity":
        smooth = ema(z, fast_span)
        step = np.linalg.norm(np.diff(smooth, axis=0), axis=1)  # (C-1,)
        raw = np.concatenate([step[:1], step]) if len(step) else np.zeros(len(z))
    elif mode == "activity":
        half = max(1, round(fast_span / 2))
        s1, count = _window_sums(z, half)
        s2, _ = _window_sums(z**2, half)
        var = np.maximum(s2 / count[:, None] - (s1 / count[:, None]) ** 2, 0.0)  # (C, D)
        raw = np.linalg.norm(var, axis=1)
    else:
        raise ValueError(f"unknown novelty mode {mode!r}")
    return min_max(raw, void)


def stability(z: np.ndarray, half_width: int) -> np.ndarray:
    """(C,) mean cosine similarity of each chunk's features with its neighbours j != i,
    |i - j| <= half_width, clipped to [0, 1]. The z-vectors get a constant 1 appended, so chunks
    at the source mean compare as alike (not undefined); a lone chunk has stability 1."""
    c = len(z)
    if c < 2:
        return np.ones(c)
    u = np.concatenate([z, np.ones((c, 1))], axis=1)  # (C, D+1), never the zero vector
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    sums, count = _window_sums(u, half_width)  # (C, D+1), (C,)
    sim = ((sums - u) * u).sum(axis=1) / (count - 1)  # neighbours only
    return np.clip(sim, 0.0, 1.0)


def gaussian_smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """x (C,) convolved with a normalised Gaussian of sigma chunks (edges extended)."""
    if sigma <= 0 or len(x) < 2:
        return x
    radius = max(1, int(math.ceil(4 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    padded = np.pad(x, radius, mode="edge")
    return np.convolve(padded, taps / taps.sum(), mode="valid")


def priority(novelty_: np.ndarray, stability_: np.ndarray, void: np.ndarray, params: ChunkParams,
             chunk_seconds: float) -> np.ndarray:
    """(C,) w_n * novelty + w_s * (1 - stability)^2, smoothed, clipped >= 0, void chunks 0; when
    no non-void chunk scores above 0 they all get 1.0 (uniform). An all-void source stays 0."""
    p = params.novelty_weight * novelty_ + params.instability_weight * (1.0 - stability_) ** 2
    p = np.maximum(gaussian_smooth(p, params.smooth_seconds / chunk_seconds), 0.0)
    p = np.where(void, 0.0, p)
    if not (p > 0).any():
        p = np.where(void, 0.0, 1.0)
    return p


# ----------------------------------------------------------------------------- one source


@dataclass
class SourceScores:
    """The chunks of one source; every array is (C,)."""

    frame_start: np.ndarray  # int64, first code frame of the chunk
    frame_len: np.ndarray  # int64, code frames in the chunk (the last may be shorter)
    rms_db: np.ndarray
    shape_flux: np.ndarray
    magnitude_flux: np.ndarray
    novelty: np.ndarray
    stability: np.ndarray
    priority: np.ndarray
    void: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.frame_start)


def score_source(audio: np.ndarray, sample_rate: int, frame_rate: float, params: ChunkParams = ChunkParams(),
                 n_frames: int | None = None) -> SourceScores:
    """Chunk and score one source: mono float audio (S,) at sample_rate, whose codes have
    n_frames frames at frame_rate (default: as many as a codec makes for S samples)."""
    from valle_cli.codecs import frames_for

    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1 or len(audio) == 0:
        raise AudioError(f"expected mono audio samples, got shape {audio.shape}")
    expected = frames_for(len(audio), sample_rate, frame_rate)
    n_frames = expected if n_frames is None else int(n_frames)
    if abs(expected - n_frames) > 1:
        raise AudioError(f"the audio is {len(audio) / sample_rate:.2f} s ({expected} code frames) but the codes "
                         f"have {n_frames} frames: not the audio these codes were made from")
    frames = params.chunk_frames(frame_rate)
    chunk_s = frames / frame_rate
    frame_start, frame_len = chunk_layout(n_frames, frames)
    rms_db, spectra = chunk_features(audio, sample_rate, frame_rate, frame_start, frame_len)
    shape_flux, magnitude_flux = spectral_flux(spectra)
    void = rms_db < params.void_db
    z = zscore(np.stack([rms_db, shape_flux, magnitude_flux], axis=1), void)  # (C, 3)
    nov = novelty(z, params.novelty, params.fast_seconds / chunk_s, params.slow_seconds / chunk_s, void)
    stab = stability(z, _half_width(params.stability_seconds, chunk_s))
    return SourceScores(frame_start=frame_start, frame_len=frame_len, rms_db=rms_db, shape_flux=shape_flux,
                        magnitude_flux=magnitude_flux, novelty=nov, stability=stab,
                        priority=priority(nov, stab, void, params, chunk_s), void=void)


# ----------------------------------------------------------------------------- a codes folder


@dataclass
class ScoreReport:
    sources: int = 0  # sources scored
    chunks: int = 0
    void_chunks: int = 0
    decoded: int = 0  # sources whose features came from decoded codes (original audio gone)
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)  # source id -> reason

    @property
    def hours_per_minute(self) -> float:
        return (self.audio_seconds / 3600) / max(self.wall_seconds / 60, 1e-12)


@dataclass
class FolderScores:
    df: Any  # polars DataFrame, the chunk-scores columns (FORMATS.md)
    params: dict[str, Any]  # derived_settings(): the metadata 'params'
    info: dict[str, Any]  # further metadata: codec, sources, incomplete
    report: ScoreReport

    def write(self, path: str | Path) -> None:
        formats.write_chunk_scores(path, self.df, self.params, **self.info)


class _FolderCodec:
    """The folder's codec, built on first use (only sources without their audio need it)."""

    def __init__(self, spec: dict[str, Any], device: str, search: list[Path]):
        self.spec, self.device, self.search = spec, device, search
        self._codec: Any = None
        self._error: ValleError | None = None  # a codec that cannot be built is tried once

    def decode(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        """Batch of int (K, T_i) -> mono float32 audio per item."""
        if self._error is not None:
            raise self._error
        if self._codec is None:
            from valle_cli.codecs import codec_from_spec
            from valle_cli.common import resolve_device

            try:
                self._codec = codec_from_spec(self.spec, resolve_device(self.device), search=self.search)
            except ValleError as e:
                self._error = e
                raise
        return self._codec.decode(codes)


def load_manifest(folder: str | Path) -> tuple[Path, Any]:
    """(manifest path, polars DataFrame) of a codes folder, or of the manifest file named."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder}: no such codes folder")
    path = folder / formats.MANIFEST_NAME if folder.is_dir() else folder
    if not path.is_file():
        raise InputError(f"{folder}: no {formats.MANIFEST_NAME} (not a codes folder made by valle quantize?)")
    manifest = formats.read_manifest(path)
    if len(manifest) == 0:
        raise InputError(f"{path}: lists no codes")
    return path, manifest


def _folder_codec(manifest: Any, where: Path) -> tuple[str, dict[str, Any]]:
    """The one codec of a manifest (JSON as recorded, parsed spec); mixed codecs are an error."""
    from valle_cli.codecs import codec_identity, describe

    by_identity: dict[str, str] = {}
    for text in manifest["codec"].unique(maintain_order=True).to_list():
        spec = json.loads(text)
        by_identity.setdefault(json.dumps(codec_identity(spec), sort_keys=True), text)
    if len(by_identity) > 1:
        names = ", ".join(describe(json.loads(t)) for t in by_identity.values())
        raise CodecMismatchError(f"{where}: codes of {len(by_identity)} different codecs ({names}); "
                                 "score one codec's codes at a time")
    text = next(iter(by_identity.values()))
    return text, json.loads(text)


def _length_batches(order: list[int], rows: list[dict[str, Any]], seconds: float) -> list[list[int]]:
    """Row indices sorted by duration, grouped into batches of about `seconds` of audio."""
    batches: list[list[int]] = []
    total = 0.0
    for i in sorted(order, key=lambda i: rows[i]["seconds"]):
        if not batches or total + rows[i]["seconds"] > seconds:
            batches.append([])
            total = 0.0
        batches[-1].append(i)
        total += rows[i]["seconds"]
    return batches


def _decode_isolated(codec: _FolderCodec, codes: list[np.ndarray]) -> list[np.ndarray | str]:
    """Decode a batch; when it fails, decode item by item so one bad item names itself."""
    if not codes:
        return []
    try:
        return list(codec.decode(codes))
    except ValleError as e:
        if len(codes) == 1:
            return [str(e)]
        out: list[np.ndarray | str] = []
        for c in codes:
            out += _decode_isolated(codec, [c])
        return out


Scored = tuple[SourceScores, dict[str, Any]]  # a source's scores and where they came from (origin, rates, seconds)


def score_codes_folder(folder: str | Path, params: ChunkParams = ChunkParams(), *, device: str = "auto",
                       workers: int = 4, decode_batch_seconds: float = 30.0,
                       on_progress: Callable[[float], None] | None = None) -> FolderScores:
    """Score every source of a codes folder (or of the manifest.parquet named).

    Features come from the source audio named in the manifest when that file exists (loaded at
    the codec's rate on ``workers`` threads), else from the codes decoded by the recorded codec
    (a builtin codec is also looked for beside the codes), in length-sorted batches of about
    ``decode_batch_seconds`` of audio, after the loading is done. A source that cannot be scored
    (unreadable codes or audio, audio that does not match its codes, codec unavailable) is left
    out, listed in ``report.failures`` and in the metadata key ``incomplete``; the other sources'
    scores do not depend on it. Raises when no source at all could be scored.
    """
    start = time.perf_counter()
    manifest_path, manifest = load_manifest(folder)
    codec_text, spec = _folder_codec(manifest, manifest_path)
    sources = _Sources(manifest_path.parent, spec, params, device)
    rows = manifest.select("id", "path", "source", "codec", "seconds").to_dicts()
    has_audio = [bool(row["source"]) and Path(row["source"]).is_file() for row in rows]

    results = sources.score_originals(rows, has_audio, workers, on_progress)
    # The sources without their audio after the pool is done, so that torch's decoding threads do not
    # fight the pool for the cores (that made decoding ~6x slower).
    results |= sources.score_decoded(rows, has_audio, decode_batch_seconds, on_progress)
    done, report = _sort_out(rows, results)
    if not done:
        first_id, first_reason = next(iter(report.failures.items()))
        raise ValleError(f"no source of {manifest_path} could be scored (first: {first_id}: {first_reason})")

    df = _scores_frame(rows, done)
    report.sources, report.chunks = len(done), len(df)
    report.void_chunks = int(df["void"].sum())
    report.decoded = sum(meta["origin"] == "decoded" for _, _, meta in done)
    report.wall_seconds = time.perf_counter() - start
    frame_rate, sample_rate = done[0][2]["frame_rate"], done[0][2]["sample_rate"]
    info = {"codec": json.loads(codec_text), "sources": report.sources, "incomplete": dict(report.failures)}
    return FolderScores(df=df, params=derived_settings(params, frame_rate, sample_rate), info=info, report=report)


class _Sources:
    """The sources of one codes folder, scored from their original audio or from their decoded codes."""

    def __init__(self, root: Path, spec: dict[str, Any], params: ChunkParams, device: str):
        self.root, self.spec, self.params = root, spec, params
        self.codec = _FolderCodec(spec, device, search=[root, root.parent])

    def read(self, row: dict[str, Any]) -> formats.Codes:
        from valle_cli.codecs import same_codec

        item = formats.read_codes(self.root / row["path"])
        if not same_codec(item.codec, self.spec):
            raise CodecMismatchError(f"{self.root / row['path']}: made by another codec than its manifest says")
        return item

    def score(self, item: formats.Codes, audio: np.ndarray, origin: str) -> Scored:
        scores = score_source(audio, item.sample_rate, item.frame_rate, self.params, n_frames=item.n_frames)
        return scores, {"origin": origin, "frame_rate": item.frame_rate, "sample_rate": item.sample_rate,
                        "seconds": item.n_frames / item.frame_rate}

    def from_original(self, row: dict[str, Any]) -> Scored:
        from valle_cli.codecs.audio import load_audio

        item = self.read(row)
        audio, _ = load_audio(row["source"], item.sample_rate)
        return self.score(item, audio, "original")

    def score_originals(self, rows: list[dict[str, Any]], has_audio: list[bool], workers: int,
                        on_progress: Callable[[float], None] | None) -> dict[int, Scored | str]:
        """Row -> scores (or failure message) of the sources with their audio, loaded and scored on a pool."""
        # The workers' lazy imports, done once here: two threads importing the same package for the
        # first time can see it half-initialised (a KeyError: 'scipy' inside scipy.fft was seen).
        import scipy.fft  # noqa: F401
        import soundfile  # noqa: F401
        import soxr  # noqa: F401

        results: dict[int, Scored | str] = {}
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {i: pool.submit(_guarded, self.from_original, row) for i, row in enumerate(rows) if has_audio[i]}
            for i, future in futures.items():
                results[i] = future.result()
                if on_progress:
                    on_progress(rows[i]["seconds"])
        return results

    def score_decoded(self, rows: list[dict[str, Any]], has_audio: list[bool], batch_seconds: float,
                      on_progress: Callable[[float], None] | None) -> dict[int, Scored | str]:
        """Row -> scores (or failure message) of the sources without their audio: codes read, decoded in
        length-sorted batches of about ``batch_seconds`` and scored here."""
        results: dict[int, Scored | str] = {}
        for batch in _length_batches([i for i in range(len(rows)) if not has_audio[i]], rows, batch_seconds):
            items = {i: _guarded(self.read, rows[i]) for i in batch}
            good = [i for i in batch if not isinstance(items[i], str)]
            results.update({i: items[i] for i in batch if isinstance(items[i], str)})
            for i, wav in zip(good, _decode_isolated(self.codec, [items[i].codes for i in good]), strict=True):
                results[i] = wav if isinstance(wav, str) else _guarded(self.score, items[i], wav, "decoded")
            if on_progress:
                on_progress(sum(rows[i]["seconds"] for i in batch))
        return results


def _guarded(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), or the message of the ValleError it raised."""
    try:
        return fn(*args)
    except ValleError as e:
        return str(e)


def _sort_out(rows: list[dict[str, Any]], results: dict[int, Scored | str]
              ) -> tuple[list[tuple[int, SourceScores, dict[str, Any]]], ScoreReport]:
    """The scored sources in manifest order as (row, scores, origin), and a report with the failures."""
    report = ScoreReport()
    done: list[tuple[int, SourceScores, dict[str, Any]]] = []
    for i, row in enumerate(rows):
        result = results[i]
        if isinstance(result, str):
            report.failures[row["id"]] = result
        else:
            done.append((i, *result))
            report.audio_seconds += result[1]["seconds"]
    return done, report


def _scores_frame(rows: list[dict[str, Any]], done: list[tuple[int, SourceScores, dict[str, Any]]]) -> Any:
    """One polars row per chunk of the scored sources: the chunk-scores columns (FORMATS.md)."""
    import polars as pl

    counts = np.array([len(s) for _, s, _ in done])  # (N,) chunks per source
    owner = np.repeat(np.arange(len(done)), counts)  # (R,) source of each row
    cat = {name: np.concatenate([getattr(s, name) for _, s, _ in done])
           for name in ("frame_start", "frame_len", *FEATURES, "novelty", "stability", "priority", "void")}
    ids = pl.Series([rows[i]["id"] for i, _, _ in done], dtype=pl.String)
    codecs = pl.Series([rows[i]["codec"] for i, _, _ in done], dtype=pl.String)
    origins = pl.Series([meta["origin"] for _, _, meta in done], dtype=pl.String)
    take = pl.Series(owner, dtype=pl.UInt32)
    return pl.DataFrame({
        "id": ids.gather(take),
        "chunk_idx": np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts),
        "frame_start": cat["frame_start"],
        "frame_len": cat["frame_len"],
        "frame_rate": np.array([meta["frame_rate"] for _, _, meta in done])[owner],
        "codec": codecs.gather(take),
        **{name: cat[name] for name in (*FEATURES, "novelty", "stability", "priority", "void")},
        "features_from": origins.gather(take),
    })


# ----------------------------------------------------------------------------- valle score-chunks


def score_chunks(codes: str | Path, out: str | Path, params: ChunkParams = ChunkParams(), *,
                 plot: Path | None = None, plot_source_id: str | None = None, device: str = "auto",
                 workers: int = 4, on_progress: Callable[[float], None] | None = None) -> FolderScores:
    """``valle score-chunks``: score a codes folder, write the scores to ``out`` (a path or - for stdout)
    and draw ``plot_source_id`` (default: the first source) to ``plot``. A source that could not be
    scored raises PartialFailure after the writing: the file lists what it misses (metadata key
    ``incomplete``), so a rerun scores it again."""
    manifest_path, manifest = load_manifest(codes)  # fails early, before any work
    if plot_source_id is not None and plot_source_id not in manifest["id"]:
        raise InputError(f"--plot-source {plot_source_id!r}: no such id in {manifest_path}")
    if plot is not None:
        require_matplotlib()
    result = score_codes_folder(codes, params, device=device, workers=workers, on_progress=on_progress)
    result.write(out)
    if plot is not None:
        plot_source(result.df, result.params, plot_source_id or result.df["id"][0], plot)
    report = result.report
    if report.failures:
        raise PartialFailure(f"{len(report.failures)} source(s) could not be scored ({report.sources} written; "
                             "the file lists the missing ones and a rerun scores it again)", report.failures)
    return result


def read_finished(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(df, metadata) of an existing complete chunk-scores file, or (None, metadata) when it lacks sources;
    anything that is not a chunk-scores file is an error rather than something to overwrite."""
    try:
        df, meta = formats.read_chunk_scores(path)
    except FormatError as e:
        raise FormatError(f"{e}; use --overwrite to replace it") from None
    return (None if meta.get("incomplete") else df), meta


# ----------------------------------------------------------------------------- plot


def require_matplotlib() -> None:
    """ValleError unless matplotlib is installed: --plot checks it before the work, not after it."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ValleError("--plot needs matplotlib, which is not installed (pip install matplotlib)")


def plot_source(df: Any, params: dict[str, Any], source_id: str, path: str | Path) -> None:
    """A 4-panel PNG of one source (z-scored features, novelty, stability, priority; void chunks
    shaded) written atomically. Needs matplotlib."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import polars as pl

    rows = df.filter(pl.col("id") == source_id).sort("chunk_idx")
    if len(rows) == 0:
        raise InputError(f"no source {source_id!r} in the scores")
    fr = rows["frame_rate"].to_numpy()
    t0 = rows["frame_start"].to_numpy() / fr  # (C,) chunk start, seconds
    t1 = (rows["frame_start"].to_numpy() + rows["frame_len"].to_numpy()) / fr
    void = rows["void"].to_numpy()
    z = zscore(rows.select(FEATURES).to_numpy().astype(np.float64), void)  # (C, 3)
    edges = np.append(t0, t1[-1])  # (C+1,)

    fig, axes = plt.subplots(4, 1, figsize=(11, 8), sharex=True)
    for j, name in enumerate(FEATURES):
        axes[0].stairs(z[:, j], edges, baseline=None, label=name)
    axes[0].set_ylabel("features (z)")
    axes[0].legend(loc="upper right", fontsize="small", ncol=3)
    for ax, name in zip(axes[1:], ("novelty", "stability", "priority"), strict=True):
        ax.stairs(rows[name].to_numpy(), edges, fill=name == "priority", baseline=0 if name == "priority" else None)
        ax.set_ylabel(name)
    for ax in axes:
        for a, b in zip(t0[void], t1[void], strict=True):
            ax.axvspan(a, b, color="0.85", zorder=0)
    axes[-1].set_xlabel("seconds")
    axes[0].set_title(f"{source_id}: {len(rows)} chunks of {params.get('chunk_frames')} frames "
                      f"({params.get('chunk_seconds_actual', 0):.3f} s), novelty={params.get('novelty')}; "
                      "grey = void")
    fig.tight_layout()
    with formats.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
