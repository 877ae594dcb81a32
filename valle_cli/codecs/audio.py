"""Reading any audio file into mono float32 at a codec's rate, and writing wavs.

Accepts wav (8/16/24/32-bit int, float), flac, ogg and mp3 through libsndfile, with librosa's
decoders as a fallback; mixes channels to mono and resamples with soxr. Every failure is an
AudioError naming the file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from valle_cli.errors import AudioError

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aiff", ".aif")
MIN_SECONDS = 0.05  # shorter clips make fewer than ~4 code frames: nothing a model can learn from


def find_audio(folder: Path) -> list[Path]:
    """Audio files under folder, recursively, in a stable order (hidden files and folders skipped)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(AUDIO_EXTENSIONS):
                found.append(Path(root) / name)
    return found


def _decode(source: Path | bytes, name: str) -> tuple[np.ndarray, int]:
    """(samples (S, C) float32, sample_rate) from a file path or in-memory bytes."""
    import soundfile as sf

    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        data, rate = sf.read(handle, dtype="float32", always_2d=True)
        return data, int(rate)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as sf_error:
        if isinstance(source, bytes):
            raise AudioError(f"{name}: not a readable audio file ({sf_error})") from None
        first_error = sf_error
    try:  # formats libsndfile lacks (m4a, some mp3s) through librosa's audioread backend
        import warnings

        import librosa

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data, rate = librosa.load(source, sr=None, mono=False)
    except Exception:  # noqa: BLE001 - any decoder failure means the same thing to the user
        raise AudioError(f"{name}: not a readable audio file ({first_error})") from None
    data = np.atleast_2d(data).T if data.ndim == 1 else data.T
    return data.astype(np.float32), int(rate)


def load_audio(source: str | Path | bytes, sample_rate: int, name: str | None = None,
               min_seconds: float = MIN_SECONDS) -> tuple[np.ndarray, float]:
    """Mono float32 samples at ``sample_rate`` and the original duration in seconds.

    Raises AudioError for missing, empty, corrupt, too short, or non-finite audio.
    """
    import soxr

    name = name or str(source if not isinstance(source, bytes) else "<stdin>")
    if not isinstance(source, bytes):
        source = Path(source)
        if not source.is_file():
            raise AudioError(f"{name}: no such file")
        if source.stat().st_size == 0:
            raise AudioError(f"{name}: empty file (0 bytes)")
    data, rate = _decode(source, name)  # (S, C)
    if data.shape[0] == 0:
        raise AudioError(f"{name}: no audio samples")
    if not np.isfinite(data).all():
        raise AudioError(f"{name}: contains NaN or infinite samples")
    seconds = data.shape[0] / rate
    if seconds < min_seconds:
        raise AudioError(f"{name}: too short ({seconds * 1000:.0f} ms < {min_seconds * 1000:.0f} ms)")
    mono = data.mean(axis=1)  # (S,)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ").astype(np.float32)
    peak = float(np.abs(mono).max(initial=0.0))
    if peak > 1.0:  # float files may exceed full scale; keep the waveform, bring it into range
        mono = mono / peak
    return np.ascontiguousarray(mono, dtype=np.float32), seconds


def wav_bytes(samples: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> bytes:
    """A complete wav file in memory (for atomic writes and stdout)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), sample_rate, subtype=subtype, format="WAV")
    return buf.getvalue()
