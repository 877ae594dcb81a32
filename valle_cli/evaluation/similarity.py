"""Speaker similarity between utterances: one embedding per file, the cosine of two embeddings per pair,
and over a folder of speakers the mean same- and different-speaker similarity and the equal-error rate.

Encoders (each maps one file to one vector):

  ge2e   resemblyzer's VoiceEncoder (GE2E loss, Wan et al. 2018): a 3-layer LSTM over 40-band mel frames
         of 16 kHz audio, giving a 256-d unit vector per utterance (the mean of its 1.6 s partials).
         Its weights ship inside the resemblyzer wheel, so it works offline; it is an optional extra:
         ``pip install --no-deps resemblyzer webrtcvad-wheels`` (its other needs are valle's own).
         The audio is volume-normalised and long silences cut (webrtcvad) by resemblyzer.preprocess_wav.
  mfcc   no model, nothing to download: 20 MFCCs (c1..c20 of 16 kHz audio; c0, the loudness, left out),
         each weighted by its index (a linear lifter, so the fine spectral shape counts as much as the
         coarse tilt), their mean and their std over time, each standardised over its 20 values and
         concatenated: 40-d. A baseline that follows the channel and the spectral envelope as much as
         the speaker.
  codes  a trained valle checkpoint (offline: it is a local folder): the sum over codebook levels k of
         the model's prompt embedding prompt_emb[k](code_k), averaged over time: model-dim vectors.
         Codes files must come from the checkpoint's codec; audio is encoded with that codec first.
         How speaker-like these vectors are depends on the training; a check of what the model sees.

Codes files (.npz) given to ge2e or mfcc are decoded to audio with the codec they record. Each distinct
file is embedded once, however many pairs it is in.

A similarity of audio that holds no voice means nothing, so the tables (``similarity_table``, ``matrix``)
refuse a clip shorter than 50 ms (as quantize does) and digital silence (which is also what anti-phase
stereo becomes once mixed to mono): one such file of a single pair is the error; of many pairs it is
listed and left out, and ``write_table`` raises PartialFailure once the rest is written. ``embed_files``
alone scores any non-empty clip (``evaluate`` scores generated outputs of a few frames).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from valle_cli import formats
from valle_cli.codecs.audio import AUDIO_EXTENSIONS
from valle_cli.common import torch_threads
from valle_cli.errors import AudioError, CodecError, InputError, PartialFailure, ValleError

ENCODERS = ("ge2e", "mfcc", "codes")
EMBED_RATE = 16000  # Hz: what ge2e and mfcc listen at
MIN_EMBED_SAMPLES = EMBED_RATE // 20  # 50 ms (quantize's floor too): the tables refuse shorter clips, else padded
SILENT_PEAK = 1e-4  # -80 dBFS, about 3 steps of 16-bit audio: below it a clip is digital silence
INPUT_EXTENSIONS = (*AUDIO_EXTENSIONS, ".npz")
N_MFCC = 20
SIMILARITY_FORMAT_VERSION = 1
TABLE_EXTENSIONS = (".csv", ".parquet", ".json")
_PAIR_DELIMITERS = "|\t,"  # the first of these in a table's first row separates its columns

Pair = tuple[Path, Path]


# ----------------------------------------------------------------------------- inputs


def find_inputs(folder: str | os.PathLike[str]) -> list[Path]:
    """Audio and codes files under ``folder``, recursively, sorted by path (hidden ones skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root) / f for f in files if not f.startswith(".") and f.lower().endswith(INPUT_EXTENSIONS)]
    if not found:
        raise InputError(f"{folder}: no audio or codes (.npz) files in it")
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def check_files(paths: Sequence[Path]) -> None:
    """Every path is an existing file (fail before any model is loaded)."""
    for path in paths:
        if str(path) == formats.STDIO:
            raise InputError("-: similarity compares files, not stdin (a table of pairs can come from stdin: "
                             "--pairs -)")
        if not path.is_file():
            raise InputError(f"{path}: {'is a folder, expected a file' if path.is_dir() else 'no such file'}")


def read_pairs(table: str | os.PathLike[str]) -> list[Pair]:
    """Pairs from a table of rows ``a|b``, ``a,b`` or ``a<TAB>b`` (the first row's delimiter holds for
    all; an optional header ``a,b``; blank lines and ``#`` comments skipped). Relative paths are
    relative to the table's folder (to the working folder for stdin). Every file must exist."""
    name = formats.display_name(table)
    try:
        text = formats.read_input_bytes(table).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{name}: not a text table of pairs (not UTF-8)") from None
    base = Path.cwd() if str(table) == formats.STDIO else Path(table).parent
    delimiter: str | None = None
    pairs: list[Pair] = []
    for number, line in enumerate(text.splitlines(), 1):
        row = line.strip()
        if not row or row.startswith("#"):
            continue
        if delimiter is None:
            delimiter = next((d for d in _PAIR_DELIMITERS if d in row), None)
            if delimiter is None:
                raise InputError(f"{name} line {number}: expected two paths separated by '|', ',' or a tab")
            if [f.strip().lower() for f in row.split(delimiter)] == ["a", "b"]:
                continue  # the header
        fields = [f.strip() for f in row.split(delimiter)]
        if len(fields) != 2 or not all(fields):
            raise InputError(f"{name} line {number}: expected two paths separated by {delimiter!r}, "
                             f"got {len([f for f in fields if f])} in {row!r}")
        a, b = (base / Path(f).expanduser() for f in fields)
        for path in (a, b):
            if not path.is_file():
                raise InputError(f"{name} line {number}: {path}: no such file")
        pairs.append((a, b))
    if not pairs:
        raise InputError(f"{name}: no pairs in it")
    return pairs


@dataclass
class FolderPairs:
    """Two folders paired by relative path without extension, and what one of them lacks."""

    pairs: list[Pair]
    only_a: list[str]  # relative paths (no extension) found in the first folder only
    only_b: list[str]


def pair_folders(a_dir: str | os.PathLike[str], b_dir: str | os.PathLike[str]) -> FolderPairs:
    """Pair ``a_dir/x/y.wav`` with ``b_dir/x/y.<any extension>``; unmatched files are listed, not paired."""
    by_key_a, by_key_b = _by_key(Path(a_dir)), _by_key(Path(b_dir))
    common = sorted(by_key_a.keys() & by_key_b.keys())
    if not common:
        raise InputError(f"no file of {a_dir} has a counterpart in {b_dir} (files are paired by relative path "
                         "without extension)")
    return FolderPairs(pairs=[(by_key_a[k], by_key_b[k]) for k in common],
                       only_a=sorted(by_key_a.keys() - by_key_b.keys()),
                       only_b=sorted(by_key_b.keys() - by_key_a.keys()))


def _by_key(folder: Path) -> dict[str, Path]:
    keys: dict[str, Path] = {}
    for path in find_inputs(folder):
        key = path.relative_to(folder).with_suffix("").as_posix()
        if key in keys:
            raise InputError(f"{folder}: {keys[key].name} and {path.name} in {path.parent} have the same name "
                             "without extension: cannot tell which to pair")
        keys[key] = path
    return keys


def speakers_of(paths: Sequence[Path], root: Path) -> list[str] | None:
    """The speaker subfolder of each file (``root/spk/utt.wav`` -> spk), or None when some file is not
    in a subfolder of ``root``."""
    parts = [p.relative_to(root).parts for p in paths]
    if any(len(rel) < 2 for rel in parts):
        return None
    return [rel[0] for rel in parts]


# ----------------------------------------------------------------------------- encoders


class Encoder(Protocol):
    name: str

    def embed(self, path: Path) -> np.ndarray:
        """One file -> one float32 vector (D,)."""
        ...


def make_encoder(name: str, *, checkpoint: str | os.PathLike[str] | None = None, device: str = "cpu") -> Encoder:
    """An encoder by name (see the module doc); ``codes`` needs a checkpoint or run folder."""
    if name == "ge2e":
        return Ge2eEncoder(device)
    if name == "mfcc":
        return MfccEncoder(device)
    if name == "codes":
        if checkpoint is None:
            raise InputError("the codes encoder needs a checkpoint (--checkpoint run/)")
        return CodesEncoder(checkpoint, device)
    raise InputError(f"unknown encoder {name!r}: expected one of {', '.join(ENCODERS)}")


def _resolve(device: str) -> str:
    from valle_cli.common import resolve_device

    return resolve_device(device)


class _AudioInput:
    """Audio at EMBED_RATE from an audio file, or from a codes file decoded with the codec it records."""

    def __init__(self, device: str):
        self._device = device
        self._codecs: Any = None  # a CodecCache, made at the first codes file

    def embed(self, path: Path) -> np.ndarray:
        return self.embed_audio(self.audio(path))

    def embed_audio(self, wav: np.ndarray) -> np.ndarray:
        """(S,) float32 at EMBED_RATE -> (D,)."""
        raise NotImplementedError

    def audio(self, path: Path) -> np.ndarray:  # (S,) float32 at EMBED_RATE, any non-empty length
        if path.suffix.lower() != ".npz":
            return _audio_file(path)
        import soxr

        from valle_cli.codecs.decode import CodecCache, decode_item

        if self._codecs is None:
            self._codecs = CodecCache(_resolve(self._device))
        item = formats.read_codes(path)
        codec = self._codecs.for_codes(item, path.parent, str(path))
        wav = np.asarray(decode_item(item, codec, str(path)), np.float32)  # (S,) at the codec's rate
        if wav.size == 0 or not np.isfinite(wav).all():
            raise AudioError(f"{path}: its codes decode to no usable audio")
        if codec.sample_rate != EMBED_RATE:
            wav = soxr.resample(wav, codec.sample_rate, EMBED_RATE, quality="HQ").astype(np.float32)
        return wav


def _audio_file(path: Path) -> np.ndarray:
    """(S,) float32 mono at EMBED_RATE of any non-empty audio file: a generated output that stopped after
    a frame or two scores badly in ``evaluate``, it does not end the run."""
    from valle_cli.codecs.audio import load_audio

    return load_audio(path, EMBED_RATE, min_seconds=0.0)[0]


class UnusableAudio(AudioError):
    """Audio that holds no voice to compare: too short, or digital silence."""


def check_usable(wav: np.ndarray, path: Path) -> None:
    """(S,) audio at EMBED_RATE is at least 50 ms long and not digital silence, else UnusableAudio."""
    if len(wav) < MIN_EMBED_SAMPLES:
        raise UnusableAudio(f"{path}: {1000 * len(wav) / EMBED_RATE:.0f} ms of audio, shorter than "
                            f"{1000 * MIN_EMBED_SAMPLES // EMBED_RATE} ms: too short to compare voices")
    if float(np.abs(wav).max()) < SILENT_PEAK:
        raise UnusableAudio(f"{path}: digital silence (peak below -80 dBFS once mixed to mono; anti-phase stereo "
                            "cancels out too): no voice to compare")


def _at_least(wav: np.ndarray, n: int) -> np.ndarray:
    """(S,) padded with silence to at least n samples, so that every encoder gets whole frames."""
    return wav if len(wav) >= n else np.pad(wav, (0, n - len(wav)))


class Ge2eEncoder(_AudioInput):
    name = "ge2e"

    def __init__(self, device: str):
        super().__init__(device)
        try:
            with warnings.catch_warnings():  # resemblyzer imports a deprecated scipy module
                warnings.simplefilter("ignore")
                from resemblyzer import VoiceEncoder, preprocess_wav
        except ImportError as e:
            raise ValleError(f"--encoder ge2e needs resemblyzer ({e}): pip install --no-deps resemblyzer "
                             "webrtcvad-wheels") from None
        resolved = _resolve(device)
        self._preprocess, self._on_cpu = preprocess_wav, resolved == "cpu"
        self._model = VoiceEncoder(resolved, verbose=False)

    def embed_audio(self, wav: np.ndarray) -> np.ndarray:
        wav = _at_least(wav, MIN_EMBED_SAMPLES)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            speech = self._preprocess(wav)  # volume-normalised, long silences cut
        if len(speech) < EMBED_RATE // 10:  # nothing the VAD calls speech: use the whole clip
            speech = wav
        if self._on_cpu:
            # one small LSTM per utterance is several times faster on one thread than on all cores
            with torch_threads(1):
                return np.asarray(self._model.embed_utterance(speech), np.float32)  # (256,)
        return np.asarray(self._model.embed_utterance(speech), np.float32)


class MfccEncoder(_AudioInput):
    name = "mfcc"

    def embed_audio(self, wav: np.ndarray) -> np.ndarray:
        import librosa

        wav = _at_least(wav, MIN_EMBED_SAMPLES)
        with warnings.catch_warnings():  # short clips: librosa warns that n_fft exceeds the input
            warnings.simplefilter("ignore")
            mfcc = librosa.feature.mfcc(y=wav, sr=EMBED_RATE, n_mfcc=N_MFCC + 1)[1:]  # (20, F), c0 dropped
        mfcc = mfcc * np.arange(1, N_MFCC + 1)[:, None]  # linear lifter
        return np.concatenate([_standardise(mfcc.mean(axis=1)), _standardise(mfcc.std(axis=1))])  # (40,)


def _standardise(v: np.ndarray) -> np.ndarray:
    return ((v - v.mean()) / max(float(v.std()), 1e-8)).astype(np.float32)


class CodesEncoder:
    name = "codes"

    def __init__(self, checkpoint: str | os.PathLike[str], device: str):
        from valle_cli.generation.synthesizer import Synthesizer

        self._device = _resolve(device)
        self._synth = Synthesizer.load(checkpoint, self._device)
        self._model = self._synth.model

    def codes(self, path: Path) -> np.ndarray:
        """(K, T) int64 codes of the checkpoint's codec: read from a codes file, or encoded from audio."""
        codes = self._synth.codes_of(path)
        if codes.shape[1] == 0:
            raise InputError(f"{path}: no code frames")
        return codes

    def embed(self, path: Path) -> np.ndarray:
        import torch

        codes = torch.from_numpy(self.codes(path)).to(self._device)  # (K, T)
        with torch.no_grad():
            summed = sum(emb(codes[k]) for k, emb in enumerate(self._model.prompt_emb))  # (T, D)
            return summed.float().mean(dim=0).cpu().numpy()  # (D,)


# ----------------------------------------------------------------------------- embeddings and scores


def distinct_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The files of ``paths`` once each (by resolved path), in first-seen order."""
    seen: dict[Path, Path] = {}
    for path in paths:
        seen.setdefault(Path(path).resolve(), Path(path))
    return list(seen.values())


def embed_files(paths: Sequence[str | os.PathLike[str]], encoder: str | Encoder, *,
                checkpoint: str | os.PathLike[str] | None = None, device: str = "cpu",
                on_progress: Callable[[int], None] | None = None, usable_only: bool = False,
                unusable: dict[str, str] | None = None) -> np.ndarray:
    """(N, D) float32 embeddings of ``paths`` (each distinct file embedded once); every failure names its file.

    ``usable_only``: audio too short or silent to compare is refused (UnusableAudio, see ``check_usable``),
    or, given an ``unusable`` dict, recorded there (path -> reason) and its row left NaN.
    """
    paths = [Path(p) for p in paths]
    distinct = distinct_files(paths)
    check_files(distinct)
    if isinstance(encoder, str):
        encoder = make_encoder(encoder, checkpoint=checkpoint, device=device)
    vectors: dict[Path, np.ndarray] = {}
    for path in distinct:
        try:
            vectors[path.resolve()] = _embed_one(encoder, path, usable_only)
        except UnusableAudio as e:
            if unusable is None:
                raise
            unusable[str(path)] = str(e).removeprefix(f"{path}: ")
        if on_progress:
            on_progress(1)
    size = next((len(v) for v in vectors.values()), 1)
    nan = np.full(size, np.nan, np.float32)
    return np.stack([vectors.get(p.resolve(), nan) for p in paths]).astype(np.float32)  # (N, D)


def _embed_one(encoder: Encoder, path: Path, usable_only: bool = False) -> np.ndarray:
    try:
        if not usable_only:
            return encoder.embed(path)
        if isinstance(encoder, _AudioInput):
            wav = encoder.audio(path)
            check_usable(wav, path)
            return encoder.embed_audio(wav)
        if path.suffix.lower() != ".npz":  # the codes encoder: check the audio it is about to encode
            check_usable(_audio_file(path), path)
        return encoder.embed(path)
    except ValleError as e:
        if str(e).startswith(str(path)) or not isinstance(e, (InputError, CodecError)):
            raise
        raise type(e)(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a decoder or model failure on one file: say which file
        raise InputError(f"{path}: cannot embed it ({type(e).__name__}: {e})") from None


def _unit(v: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero): (N, D) -> (N, D)."""
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(norm, 1e-12)


def cosine_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two aligned sets of vectors: (P, D), (P, D) -> (P,)."""
    return np.einsum("pd,pd->p", _unit(np.asarray(a, np.float64)), _unit(np.asarray(b, np.float64)))


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """All-vs-all cosine similarity: (N, D) -> (N, N)."""
    unit = _unit(np.asarray(vectors, np.float64))
    return unit @ unit.T


def equal_error_rate(scores: Sequence[float] | np.ndarray, same: Sequence[bool] | np.ndarray) -> float:
    """The error rate where a threshold on ``scores`` (accept a pair as same-speaker when score >= t)
    falsely accepts as often as it falsely rejects; linear between the thresholds that bracket it.
    0 when every same pair outscores every different pair, 0.5 for scores that tell nothing."""
    scores, same = np.asarray(scores, np.float64).ravel(), np.asarray(same, bool).ravel()
    if scores.shape != same.shape:
        raise ValueError(f"{scores.size} scores but {same.size} same/different labels")
    n_same, n_diff = int(same.sum()), int((~same).sum())
    if n_same == 0 or n_diff == 0:
        raise ValueError("the equal-error rate needs both same-speaker and different-speaker pairs")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], same[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]  # tied scores are accepted together
    accepted_same, accepted_diff = np.cumsum(y)[last_of_tie], np.cumsum(~y)[last_of_tie]
    far = np.r_[0.0, accepted_diff / n_diff]  # false accepts, from accepting nothing to accepting all
    frr = np.r_[1.0, 1.0 - accepted_same / n_same]  # false rejects
    i = int(np.argmax(far >= frr))  # the first threshold where they cross (i >= 1: far[0] < frr[0])
    before, after = frr[i - 1] - far[i - 1], far[i] - frr[i]  # > 0, >= 0
    t = before / (before + after)
    return float(far[i - 1] + t * (far[i] - far[i - 1]))


def summarize(scores: Sequence[float] | np.ndarray) -> dict[str, float]:
    """n, mean, std, min and max of similarity scores."""
    scores = np.asarray(scores, np.float64)
    if scores.size == 0:
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"n": int(scores.size), "mean": float(scores.mean()), "std": float(scores.std()),
            "min": float(scores.min()), "max": float(scores.max())}


# ----------------------------------------------------------------------------- tables


def similarity_table(pairs: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]], encoder: str | Encoder,
                     *, checkpoint: str | os.PathLike[str] | None = None, device: str = "cpu",
                     on_progress: Callable[[int], None] | None = None,
                     unusable: dict[str, str] | None = None) -> Any:
    """polars DataFrame with columns a, b, similarity (cosine), encoder: one row per pair.

    A file too short or silent to compare (``check_usable``) is the error, or, given an ``unusable``
    dict, recorded there and its pairs left out of the table (``write_table`` then raises PartialFailure).
    """
    import polars as pl

    if not pairs:
        raise InputError("no pairs to compare")
    files = [Path(p) for pair in pairs for p in pair]  # a0, b0, a1, b1, ...
    vectors = embed_files(files, encoder, checkpoint=checkpoint, device=device, on_progress=on_progress,
                          usable_only=True, unusable=unusable)  # (2P, D), NaN rows for unusable files
    a, b = vectors[0::2], vectors[1::2]
    keep = ~(np.isnan(a[:, 0]) | np.isnan(b[:, 0]))  # (P,)
    return pl.DataFrame({"a": [str(p) for p, k in zip(files[0::2], keep, strict=True) if k],
                         "b": [str(p) for p, k in zip(files[1::2], keep, strict=True) if k],
                         "similarity": cosine_pairs(a[keep], b[keep]), "encoder": [_name(encoder)] * int(keep.sum())})


@dataclass
class Matrix:
    """All-vs-all similarity of a set of files, and what it says about their speakers."""

    paths: list[Path]
    scores: np.ndarray  # (N, N) cosine similarities
    table: Any  # polars DataFrame: a, b, similarity, encoder (+ same_speaker) for each pair i < j
    speakers: list[str] | None = None
    summary: dict[str, float] = field(default_factory=dict)  # over all pairs i < j
    same: dict[str, float] = field(default_factory=dict)  # summary of the same-speaker pairs
    different: dict[str, float] = field(default_factory=dict)  # summary of the different-speaker pairs
    eer: float | None = None  # equal-error rate of a same/different threshold (needs both kinds)


def matrix(paths: Sequence[str | os.PathLike[str]], encoder: str | Encoder, *, speakers: Sequence[str] | None = None,
           checkpoint: str | os.PathLike[str] | None = None, device: str = "cpu",
           on_progress: Callable[[int], None] | None = None, unusable: dict[str, str] | None = None) -> Matrix:
    """Every file against every other; with ``speakers`` (one label per file) also the mean same- and
    different-speaker similarity and the equal-error rate. Files too short or silent to compare are the
    error, or, given an ``unusable`` dict, recorded there and left out (as in ``similarity_table``)."""
    import polars as pl

    paths = distinct_files(paths)
    if len(paths) < 2:
        raise InputError(f"a similarity matrix needs at least 2 files, got {len(paths)}")
    if speakers is not None and len(speakers) != len(paths):
        raise ValueError(f"{len(speakers)} speaker labels for {len(paths)} distinct files")
    vectors = embed_files(paths, encoder, checkpoint=checkpoint, device=device, on_progress=on_progress,
                          usable_only=True, unusable=unusable)  # (N, D), NaN rows for unusable files
    keep = ~np.isnan(vectors[:, 0])  # (N,)
    if keep.sum() < 2:
        raise PartialFailure(f"{int((~keep).sum())} unusable file(s): fewer than 2 files left, no matrix",
                             unusable or {})
    paths, vectors = [p for p, k in zip(paths, keep, strict=True) if k], vectors[keep]
    speakers = None if speakers is None else [s for s, k in zip(speakers, keep, strict=True) if k]
    scores = cosine_matrix(vectors)  # (N, N)
    i, j = np.triu_indices(len(paths), k=1)  # (P,) each, i < j
    columns: dict[str, Any] = {"a": [str(paths[k]) for k in i], "b": [str(paths[k]) for k in j],
                               "similarity": scores[i, j], "encoder": [_name(encoder)] * len(i)}
    result = Matrix(paths=paths, scores=scores, table=None, summary=summarize(scores[i, j]))
    if speakers is not None:
        labels = np.asarray(list(speakers))
        same = labels[i] == labels[j]  # (P,)
        columns["same_speaker"] = same
        result.speakers = list(speakers)
        result.same, result.different = summarize(scores[i, j][same]), summarize(scores[i, j][~same])
        if same.any() and (~same).any():
            result.eer = equal_error_rate(scores[i, j], same)
    result.table = pl.DataFrame(columns)
    return result


def _name(encoder: str | Encoder) -> str:
    return encoder if isinstance(encoder, str) else encoder.name


def write_table(df: Any, out: str | os.PathLike[str], metadata: dict[str, Any],
                unusable: dict[str, str] | None = None) -> None:
    """CSV to stdout for '-', else by extension: .csv, .json (a list of rows) or .parquet (with
    ``metadata`` under the 'valle' key); files are written atomically. Then, when files were left out
    as ``unusable`` (path -> reason), PartialFailure lists them."""
    _write_table(df, out, metadata)
    if unusable:
        raise PartialFailure(f"{len(unusable)} file(s) too short or silent to compare, left out "
                             f"({len(df)} pair(s) written)", unusable)


def _write_table(df: Any, out: str | os.PathLike[str], metadata: dict[str, Any]) -> None:
    if str(out) == formats.STDIO:
        sys.stdout.write(df.write_csv())
        sys.stdout.flush()
        return
    suffix = Path(out).suffix.lower()
    if suffix == ".csv":
        formats.atomic_write_bytes(out, df.write_csv().encode())
    elif suffix == ".json":
        formats.atomic_write_bytes(out, df.write_json().encode())
    elif suffix == ".parquet":
        formats.write_parquet(out, df, {"kind": "speaker-similarity", "format_version": SIMILARITY_FORMAT_VERSION,
                                        **metadata})
    else:
        raise InputError(f"{out}: unknown table format (expected {', '.join(TABLE_EXTENSIONS)} or - for stdout)")
