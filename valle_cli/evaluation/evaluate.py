"""Scores of generated speech against what was asked: intelligibility (WER, CER) and speaker similarity.

The inputs are the ``id|text|prompt`` manifest given to ``valle sample --manifest`` and the folder it
wrote (``<id>.npz`` codes, decoded with the codec they record, or ``<id>.wav``). Optionally references:
ground-truth audio for the same ids (``<id>.wav`` / ``.npz``), and their resyntheses through the codec
of the outputs (quantize + decode), so every figure sits next to its ceiling with and without codec loss.

  WER, CER  of an offline recogniser, pocketsphinx (en-us acoustic model), restricted to the words of
            all the evaluated texts: a closed-vocabulary unigram (default) or bigram language model
            and a dictionary of just those words (pocketsphinx's general English LM is useless on
            synthetic voices). Texts and hypotheses are normalised alike: English numbers and
            abbreviations spelled out (valle_cli.text.normalize), lowercase, punctuation stripped.
            Scored with jiwer, per item; words missing from the pronouncing dictionary cannot be
            recognised and are listed as out of vocabulary.
  SIM       cosine of the speaker embeddings of the audio and its prompt (valle_cli.evaluation.similarity:
            ge2e by default, mfcc, or codes with a checkpoint).

Aggregates are per-item means, and the ratios output / reference of the mean WER and mean SIM
(1 = as good as the ceiling; WER ratios above 1 and SIM ratios below 1 are worse). ``write_report``
(``evaluation/report.py``) makes a folder: scores.csv, summary.json and index.html with audio players
and spectrograms; the recogniser is in ``evaluation/asr.py``.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from valle_cli import formats
from valle_cli.errors import AudioError, InputError, ValleError
from valle_cli.evaluation.asr import LMS, Recogniser, error_rates, normalise_text, require_tools

AUDIO_RATE = 24000  # Hz: every audio file of the report
EVALUATION_FORMAT_VERSION = 1
ROLES = ("prompt", "reference", "codec_reference", "output")  # the audio of one item, in page order
SCORED = ("output", "reference", "codec_reference")  # the roles that get WER, CER and SIM
_OUTPUT_EXTENSIONS = (".npz", ".wav", ".flac")


# ----------------------------------------------------------------------------- items and scores


@dataclass
class Scores:
    """What the recogniser heard in one audio, its error rates and its speaker similarity to the prompt."""

    hypothesis: str
    wer: float
    cer: float
    sim: float


@dataclass
class Item:
    """One manifest row: its texts, its audio files (wav at AUDIO_RATE, by role) and their scores."""

    id: str
    text: str
    prompts: list[str]
    audio: dict[str, Path] = field(default_factory=dict)  # role -> wav
    scores: dict[str, Scores] = field(default_factory=dict)  # scored role -> scores


@dataclass
class Report:
    """Everything ``write_report`` puts on disk."""

    items: list[Item]
    summary: dict[str, Any]
    _keep: Any = None  # the temporary folder holding the audio, when evaluate made one


def score_items(texts: Sequence[str], wavs: Sequence[np.ndarray], prompts: Sequence[np.ndarray], *,
                sample_rate: int = AUDIO_RATE, recogniser: Recogniser | None = None, lm: str = "unigram",
                encoder: Any = "ge2e", device: str = "cpu",
                on_progress: Callable[[int], None] | None = None) -> list[Scores]:
    """Scores of ``wavs[i]`` (mono float at ``sample_rate``) against ``texts[i]`` and ``prompts[i]``.

    The closed LM is made of ``texts`` unless a ``recogniser`` is given (evaluate makes one of every text
    of the manifest). ``encoder`` is a name or a valle_cli.evaluation.similarity encoder; a prompt passed several
    times as the same array is embedded once."""
    from valle_cli.codecs.audio import wav_bytes
    from valle_cli.evaluation.similarity import cosine_pairs, embed_files

    if not (len(texts) == len(wavs) == len(prompts)):
        raise ValueError(f"{len(texts)} texts, {len(wavs)} wavs and {len(prompts)} prompts")
    asr = recogniser or Recogniser(texts, lm)
    hypotheses, rates = [], []
    for text, wav in zip(texts, wavs, strict=True):
        reference = normalise_text(text)
        hypothesis = asr(np.asarray(wav, np.float32), sample_rate)
        hypotheses.append(hypothesis)
        rates.append(error_rates(reference, hypothesis) if reference else (math.nan, math.nan))
        if on_progress:
            on_progress(1)
    with tempfile.TemporaryDirectory(prefix="valle-embed-") as tmp:
        files, written = [], {}  # the same prompt array (by identity) is written and embedded once
        for i, audio in enumerate([a for pair in zip(wavs, prompts, strict=True) for a in pair]):
            if id(audio) not in written:  # any length: the embedding pads a clip of a few frames
                written[id(audio)] = Path(tmp) / f"{i}.wav"
                written[id(audio)].write_bytes(wav_bytes(np.asarray(audio, np.float32), sample_rate))
            files.append(written[id(audio)])
        vectors = embed_files(files, encoder, device=device)  # (2N, D)
    sims = cosine_pairs(vectors[0::2], vectors[1::2])  # (N,)
    return [Scores(h, w, c, float(s)) for h, (w, c), s in zip(hypotheses, rates, sims, strict=True)]


def find_output(folder: Path, uid: str) -> Path | None:
    """``folder/<id>.npz``, else ``.wav`` or ``.flac``."""
    for ext in _OUTPUT_EXTENSIONS:
        if (folder / f"{uid}{ext}").is_file():
            return folder / f"{uid}{ext}"
    return None


class _AudioReader:
    """Audio at AUDIO_RATE from audio files, or from codes files decoded with the codec they record."""

    def __init__(self, device: str):
        from valle_cli.codecs.decode import CodecCache
        from valle_cli.common import resolve_device

        self.codecs = CodecCache(resolve_device(device))

    def codec_of(self, path: Path) -> Any:
        item = formats.read_codes(path)
        return self.codecs.for_codes(item, path.parent, str(path))

    def read(self, path: Path) -> np.ndarray:
        from valle_cli.codecs.audio import load_audio

        if path.suffix.lower() != ".npz":
            return load_audio(path, AUDIO_RATE, min_seconds=0.0)[0]  # a short output is scored, not refused
        item = formats.read_codes(path)
        codec = self.codecs.for_codes(item, path.parent, str(path))
        return self._decoded(codec, item.codes, str(path))

    def resynthesise(self, path: Path, codec: Any) -> np.ndarray:
        """``path`` (audio or codes) through ``codec``: encode then decode."""
        from valle_cli.codecs.audio import load_audio

        wav = load_audio(path, codec.sample_rate)[0] if path.suffix.lower() != ".npz" else self._at(
            self.read(path), AUDIO_RATE, codec.sample_rate)
        (codes,) = codec.encode([wav])
        return self._decoded(codec, np.asarray(codes), str(path))

    def _decoded(self, codec: Any, codes: np.ndarray, name: str) -> np.ndarray:
        (wav,) = codec.decode([codes])
        wav = np.asarray(wav, np.float32)
        if wav.size == 0 or not np.isfinite(wav).all():
            raise AudioError(f"{name}: its codes decode to no usable audio")
        return self._at(wav, codec.sample_rate, AUDIO_RATE)

    @staticmethod
    def _at(wav: np.ndarray, rate: int, target: int) -> np.ndarray:
        import soxr

        return wav if rate == target else soxr.resample(wav, rate, target, quality="HQ").astype(np.float32)


def _file_stem(index: int, uid: str) -> str:
    return f"{index:04d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', uid)}"


def evaluate(manifest: str | os.PathLike[str], outputs: str | os.PathLike[str], *,
             references: str | os.PathLike[str] | None = None, codec_references: bool = False, lm: str = "unigram",
             encoder: str = "ge2e", checkpoint: str | os.PathLike[str] | None = None, device: str = "cpu",
             audio_dir: str | os.PathLike[str] | None = None, held_out: Sequence[str] | None = None,
             on_progress: Callable[[int], None] | None = None) -> Report:
    """Score the outputs of ``valle sample --manifest`` (and the references, when given) for every row.

    Rows without an output are listed in the summary as missing, rows whose audio cannot be read as
    failures; it is an error when no row is left. The audio of every item is written as wav to
    ``audio_dir`` (a temporary folder when None) for write_report. ``on_progress`` counts scored audios.
    ``held_out`` names voices the model never trained on (``held_out_voices`` of a shard set): the
    summary then also gives every mean for those voices and for the others apart (``by_voice``)."""
    from valle_cli.evaluation.similarity import make_encoder
    from valle_cli.formats import read_sample_manifest

    _check_arguments(outputs, references, codec_references, lm)
    rows = read_sample_manifest(manifest)
    keep = None
    if audio_dir is None:
        keep = tempfile.TemporaryDirectory(prefix="valle-evaluate-")
        audio_dir = keep.name
    gathered = _gather_audio(rows, Path(outputs), references, codec_references, Path(audio_dir), device)
    asr = Recogniser([item.text for item in gathered.items], lm)
    _score_gathered(gathered, asr, make_encoder(encoder, checkpoint=checkpoint, device=device), device, on_progress)
    summary = summarise(gathered.items, rows=len(rows), missing=gathered.missing, failures=gathered.failures,
                        lm=lm, encoder=encoder, oov=sorted(asr.oov))
    if held_out is not None:
        summary.update(_by_voice(gathered.items, set(held_out), lm, encoder))
    return Report(items=gathered.items, summary=summary, _keep=keep)


def _check_arguments(outputs: str | os.PathLike[str], references: str | os.PathLike[str] | None,
                     codec_references: bool, lm: str) -> None:
    if lm not in LMS:
        raise InputError(f"unknown language model {lm!r}: expected one of {', '.join(LMS)}")
    if codec_references and references is None:
        raise InputError("codec references are made from the references: give references too")
    require_tools()
    for folder in (outputs, references):
        if folder is not None and not Path(folder).is_dir():
            raise InputError(f"{folder}: no such folder")


@dataclass
class _Gathered:
    """The items whose audio could be read, their audio by (id, role), and the rows that could not."""

    items: list[Item] = field(default_factory=list)
    waves: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (id, role) -> audio at AUDIO_RATE
    missing: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)


def _gather_audio(rows: list[tuple[str, str, list[str]]], outputs: Path, references: str | os.PathLike[str] | None,
                  codec_references: bool, audio_dir: Path, device: str) -> _Gathered:
    """Read every row's output, prompt and reference (and its codec resynthesis) at AUDIO_RATE, and write
    each as ``audio_dir/<nnnn>_<id>.<role>.wav``; raise when no row has any."""
    from valle_cli.codecs.audio import wav_bytes

    audio_dir.mkdir(parents=True, exist_ok=True)
    reader = _AudioReader(device)
    got = _Gathered()
    for index, (uid, text, prompts) in enumerate(rows):
        output = find_output(outputs, uid)
        if output is None:
            got.missing.append(uid)
            continue
        try:
            audio = _read_item_audio(reader, uid, output, prompts, references, codec_references)
        except ValleError as e:
            got.failures[uid] = str(e)
            continue
        item = Item(uid, text, prompts)
        for role, wav in audio.items():
            path = audio_dir / f"{_file_stem(index, uid)}.{role}.wav"
            formats.atomic_write_bytes(path, wav_bytes(wav, AUDIO_RATE))
            item.audio[role] = path
            got.waves[uid, role] = wav
        got.items.append(item)
    if not got.items:
        why = "; ".join(f"{k}: {v}" for k, v in list(got.failures.items())[:3])
        why = why or f"none of the {len(rows)} ids has an output (<id>.npz or .wav) in {outputs}"
        raise InputError(f"nothing to evaluate: {why}")
    return got


def _read_item_audio(reader: _AudioReader, uid: str, output: Path, prompts: list[str],
                     references: str | os.PathLike[str] | None, codec_references: bool) -> dict[str, np.ndarray]:
    """role -> audio of one row; a ValleError when a file is missing or unreadable."""
    audio = {"output": reader.read(output), "prompt": np.concatenate([reader.read(Path(p)) for p in prompts])}
    if references is None:
        return audio
    reference = find_output(Path(references), uid)
    if reference is None:
        raise InputError(f"no reference {uid}.wav/.npz in {references}")
    audio["reference"] = reader.read(reference)
    if codec_references:
        if output.suffix.lower() != ".npz":
            raise InputError(f"{output}: codec references need codes (.npz) outputs that record their codec")
        audio["codec_reference"] = reader.resynthesise(reference, reader.codec_of(output))
    return audio


def _score_gathered(got: _Gathered, asr: Recogniser, encoder: Any, device: str,
                    on_progress: Callable[[int], None] | None) -> None:
    """WER, CER and SIM of every scored role of every item, stored in ``item.scores``."""
    pairs = [(item, role) for role in SCORED for item in got.items if role in item.audio]
    scores = score_items([i.text for i, _ in pairs], [got.waves[i.id, role] for i, role in pairs],
                         [got.waves[i.id, "prompt"] for i, _ in pairs], recogniser=asr, encoder=encoder,
                         device=device, on_progress=on_progress)
    for (item, role), score in zip(pairs, scores, strict=True):
        item.scores[role] = score


def _by_voice(items: list[Item], unseen: set[str], lm: str, encoder: str) -> dict[str, Any]:
    """The means and ratios of held-out voices and of seen voices apart (summary keys by_voice, held_out_voices)."""
    groups = {"held_out": [i for i in items if voice_of(i) in unseen],
              "seen": [i for i in items if voice_of(i) not in unseen]}
    by_voice = {}
    for name, group in groups.items():
        if group:
            part = summarise(group, rows=len(group), missing=(), failures={}, lm=lm, encoder=encoder, oov=())
            by_voice[name] = {"means": part["means"], "ratios": part["ratios"]}
    return {"by_voice": by_voice, "held_out_voices": sorted(unseen)}


def voice_of(item: Item) -> str:
    """The voice of an item: the folder of its first prompt file (corpus/<speaker>/<utterance>.wav)."""
    return Path(item.prompts[0]).parent.name if item.prompts else ""


def held_out_voices(shards: str | os.PathLike[str]) -> list[str]:
    """Speakers of a shard set's validation split that have no training utterance (valle shard --split-by speaker)."""
    from valle_cli.data.shards import ShardSet

    index = ShardSet(shards).index
    train = set(index.filter(index["split"] == "train")["speaker"].to_list())
    return sorted(set(index.filter(index["split"] == "val")["speaker"].to_list()) - train)


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def summarise(items: Sequence[Item], *, rows: int, missing: Sequence[str], failures: dict[str, str], lm: str,
              encoder: str, oov: Sequence[str]) -> dict[str, Any]:
    """Means per scored role, the ratios output / ceiling, the settings and the counts."""
    means: dict[str, dict[str, float | None]] = {}
    for role in SCORED:
        scored = [item.scores[role] for item in items if role in item.scores]
        if scored:
            means[role] = {"n": len(scored), "wer": _mean([s.wer for s in scored]),
                           "cer": _mean([s.cer for s in scored]), "sim": _mean([s.sim for s in scored])}
    ratios = {}
    for role in ("reference", "codec_reference"):
        if role in means:
            ratios[role] = {m: _ratio(means["output"][m], means[role][m]) for m in ("wer", "cer", "sim")}
    return {"kind": "evaluation", "format_version": EVALUATION_FORMAT_VERSION,
            "recogniser": f"pocketsphinx en-us, closed-vocabulary {lm} LM of the {len(items)} evaluated texts",
            "lm": lm, "encoder": encoder,
            "counts": {"rows": rows, "scored": len(items), "missing": len(missing), "failed": len(failures)},
            "means": means, "ratios": ratios, "missing": list(missing), "failures": dict(failures),
            "out_of_vocabulary": list(oov)}
