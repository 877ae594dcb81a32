"""Scores of generated speech against what was asked: intelligibility (WER, CER) and speaker similarity.

The inputs are the ``id|text|prompt`` manifest given to ``valle sample --manifest`` and the folder it
wrote (``<id>.npz`` codes, decoded with the codec they record, or ``<id>.wav``). Optionally references:
ground-truth audio for the same ids (``<id>.wav`` / ``.npz``), and their resyntheses through the codec
of the outputs (quantize + decode), so every figure sits next to its ceiling with and without codec loss.

  WER, CER  of an offline recogniser, pocketsphinx (en-us acoustic model), restricted to the words of
            all the evaluated texts: a closed-vocabulary bigram (default) or unigram language model
            and a dictionary of just those words (pocketsphinx's general English LM is useless on
            synthetic voices). Texts and hypotheses are normalised alike: English numbers and
            abbreviations spelled out (valle_cli.text.normalize), lowercase, punctuation stripped.
            Scored with jiwer, per item; words missing from the pronouncing dictionary cannot be
            recognised and are listed as out of vocabulary.
  SIM       cosine of the speaker embeddings of the audio and its prompt (valle_cli.evaluation.similarity:
            ge2e by default, mfcc, or codes with a checkpoint).

Aggregates are per-item means, and the ratios output / reference of the mean WER and mean SIM
(1 = as good as the ceiling; WER ratios above 1 and SIM ratios below 1 are worse). Floors come from
the same items, with no extra generation: the ceiling's hypotheses scored against another item's text
(wrong-sentence WER) and the references against another voice's prompt (different-voice SIM); the
share of the floor-to-ceiling range an output recovers is 0 for babble and 1 at the ceiling. The
judge is trusted when the ceiling's WER is at most half the wrong-sentence WER (``separation``).
Durations (output vs reference, early stops, outputs at samples.json's cap), the goals, and all of it
for seen and unseen voices apart. ``write_report``
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
from valle_cli.evaluation.asr import DEFAULT_LM, LMS, Recogniser, error_rates, normalise_text, require_tools

AUDIO_RATE = 24000  # Hz: every audio file of the report
EVALUATION_FORMAT_VERSION = 2
# The goals of a model that speaks (ratios to the codec references, shares of the floor-to-ceiling range)
GOALS = {"wer_ratio": 1.1, "sim_ratio": 0.9, "wer_share": 0.8, "sim_share": 0.8, "duration_within": 0.25}
SEPARATION = 0.5  # the judge is trusted when the ceiling's WER is at most this times the wrong-sentence WER
EARLY_STOP = 0.75  # an output shorter than this times its reference's duration stopped early
RESUME_GAP_S = 600.0  # log.jsonl: a gap this much longer than the run's usual one is a resume, not training
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
    seconds: dict[str, float] = field(default_factory=dict)  # role -> duration of its audio
    frame_rate: float | None = None  # of the output's codes (the cap check allows one frame)
    wrong_wer: float | None = None  # the ceiling's hypothesis scored against another item's text
    other_voice_sim: float | None = None  # the reference (or prompt) against another voice's prompt


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
             references: str | os.PathLike[str] | None = None, codec_references: bool = False, lm: str = DEFAULT_LM,
             encoder: str = "ge2e", checkpoint: str | os.PathLike[str] | None = None, device: str = "cpu",
             audio_dir: str | os.PathLike[str] | None = None, trained_voices: Sequence[str] | None = None,
             run: str | os.PathLike[str] | None = None,
             on_progress: Callable[[int], None] | None = None) -> Report:
    """Score the outputs of ``valle sample --manifest`` (and the references, when given) for every row.

    Rows without an output are listed in the summary as missing, rows whose audio cannot be read as
    failures; it is an error when no row is left. The audio of every item is written as wav to
    ``audio_dir`` (a temporary folder when None) for write_report. ``on_progress`` counts scored audios.
    ``trained_voices`` names the voices of the training split (``training_voices`` of a shard set): the
    summary then also gives every figure for seen voices and for unseen ones (any other voice) apart
    (``by_voice``). ``outputs/samples.json`` (valle sample) gives the step and the length cap; ``run`` (the
    training run folder) the minutes of training at that step."""
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
    embedder = make_encoder(encoder, checkpoint=checkpoint, device=device)
    _score_gathered(gathered, asr, embedder, device, on_progress)
    score_floors(gathered.items, embedder, device)
    info = formats.read_samples_info(outputs)
    summary = summarise(gathered.items, rows=len(rows), missing=gathered.missing, failures=gathered.failures,
                        lm=lm, encoder=encoder, oov=sorted(asr.oov), max_seconds=(info or {}).get("max_seconds"))
    summary["judge"]["settings"] = asr.settings
    summary.update(samples=info, step=(info or {}).get("step"))
    summary["training_minutes"] = training_minutes(run, summary["step"]) if run is not None else None
    if trained_voices is not None:
        summary.update(by_voice_group(gathered.items, set(trained_voices), summary["durations"]["max_seconds"]))
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
        if output.suffix.lower() == ".npz":
            item.frame_rate = formats.read_codes(output).frame_rate
        for role, wav in audio.items():
            item.seconds[role] = len(wav) / AUDIO_RATE
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


# ----------------------------------------------------------------------------- floors


def partner(n: int, i: int, differs: Callable[[int], bool]) -> int | None:
    """A fixed derangement: the first item from ``i + n // 2`` on (wrapping, never ``i``) that ``differs``."""
    for step in range(n):
        k = (i + max(1, n // 2) + step) % n
        if k != i and differs(k):
            return k
    return None


def ceiling_role(items: Sequence[Item]) -> str | None:
    """The scored role the outputs are measured against: the codec references, else the references."""
    for role in ("codec_reference", "reference"):
        if any(role in item.scores for item in items):
            return role
    return None


def score_floors(items: Sequence[Item], encoder: Any, device: str = "cpu") -> None:
    """What wrong speech scores, on the same items (no generation): ``item.wrong_wer``, the ceiling's hypothesis
    against the text of another item (a fixed derangement, skipping equal texts), and ``item.other_voice_sim``,
    the reference's embedding (the prompt's when there is no reference) against the prompt of an item of a
    different voice (none when every item has one voice)."""
    from valle_cli.evaluation.similarity import cosine_pairs, embed_files

    n, role = len(items), ceiling_role(items)
    texts = [normalise_text(item.text) for item in items]
    if role is not None:
        for i, item in enumerate(items):
            k = partner(n, i, lambda k, i=i: bool(texts[k]) and texts[k] != texts[i])
            if k is not None and role in item.scores:
                item.wrong_wer = error_rates(texts[k], item.scores[role].hypothesis)[0]
    found = [(item, partner(n, i, lambda k, i=i: voice_of(items[k]) != voice_of(items[i])))
             for i, item in enumerate(items)]
    pairs = [(item, items[k]) for item, k in found if k is not None]
    if not pairs:
        return
    own = [item.audio.get("reference", item.audio["prompt"]) for item, _ in pairs]
    vectors = embed_files([*own, *(other.audio["prompt"] for _, other in pairs)], encoder, device=device)  # (2P, D)
    for (item, _), sim in zip(pairs, cosine_pairs(vectors[: len(pairs)], vectors[len(pairs):]), strict=True):
        item.other_voice_sim = float(sim)


# ----------------------------------------------------------------------------- voices, durations, training time


def voice_of(item: Item) -> str:
    """The voice of an item: the folder of its first prompt file (corpus/<speaker>/<utterance>.wav)."""
    return Path(item.prompts[0]).parent.name if item.prompts else ""


def training_voices(shards: str | os.PathLike[str]) -> list[str]:
    """Speakers with an utterance in a shard set's training split: every other voice is unseen."""
    from valle_cli.data.shards import ShardSet

    index = ShardSet(shards).index
    return sorted(set(index.filter(index["split"] == "train")["speaker"].to_list()))


def duration_ratio(item: Item) -> float | None:
    """Output duration / reference duration of one item (None without a reference)."""
    if "output" not in item.seconds or not item.seconds.get("reference"):
        return None
    return item.seconds["output"] / item.seconds["reference"]


def is_capped(item: Item, max_seconds: float | None) -> bool:
    """The output ran to the length cap (within one frame of it; one sample for wav outputs)."""
    frame = 1.0 / (item.frame_rate or AUDIO_RATE)
    return max_seconds is not None and item.seconds.get("output", 0.0) >= max_seconds - frame


def duration_check(items: Sequence[Item], max_seconds: float | None) -> dict[str, Any]:
    """Outputs within +-25 % of their reference's duration, early stops (< 0.75x) and outputs at the cap
    (``max_seconds`` of samples.json)."""
    ratios = {i.id: r for i in items if (r := duration_ratio(i)) is not None}
    within = sum(abs(r - 1.0) <= GOALS["duration_within"] for r in ratios.values())
    return {"n": len(ratios), "within": int(within), "fraction_within": within / len(ratios) if ratios else None,
            "mean_ratio": _mean(list(ratios.values())),
            "early_stops": [uid for uid, r in ratios.items() if r < EARLY_STOP],
            "capped": [i.id for i in items if is_capped(i, max_seconds)], "max_seconds": max_seconds}


def training_minutes(run: str | os.PathLike[str], step: int | None) -> float | None:
    """Minutes of training up to ``step``, from run/log.jsonl ("step", "time" in unix seconds).

    The sum of the gaps between consecutive records up to the first record at or past ``step``, plus the
    first window (its steps at the run's median seconds per step). A gap longer than the median gap plus
    RESUME_GAP_S holds a stop and resume: it counts as its steps at the median seconds per step instead.
    None without a step or two timed records."""
    if step is None:
        return None
    records = sorted((r for r in formats.read_log(run) if "time" in r and "step" in r),
                     key=lambda r: (r["time"], r["step"]))
    gaps = [(b["time"] - a["time"], b["step"] - a["step"]) for a, b in zip(records, records[1:], strict=False)]
    if not gaps:
        return None
    upto = next((k for k, r in enumerate(records) if r["step"] >= step), len(records) - 1)
    usual = float(np.median([g for g, _ in gaps]))
    per_step = float(np.median([g / d for g, d in gaps if d > 0] or [0.0]))
    counted = sum(g if g <= usual + RESUME_GAP_S else d * per_step for g, d in gaps[:upto])
    return (counted + records[0]["step"] * per_step) / 60.0


# ----------------------------------------------------------------------------- the summary


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _share(floor: float | None, value: float | None, ceiling: float | None) -> float | None:
    """(floor - value) / (floor - ceiling): 0 = as bad as wrong speech, 1 = as good as the ceiling."""
    if floor is None or value is None or ceiling is None or abs(floor - ceiling) < 1e-9:
        return None
    return (floor - value) / (floor - ceiling)


def _goal(value: float | None, goal: float, better: str) -> dict[str, Any]:
    met = None if value is None else (value <= goal if better == "lower" else value >= goal)
    return {"value": value, "goal": f"{'<=' if better == 'lower' else '>='} {goal:g}", "met": met}


def figures(items: Sequence[Item], max_seconds: float | None = None) -> dict[str, Any]:
    """Means per scored role, ratios output / ceiling, the floors, the shares of the range, the durations and
    the goals of ``items`` (all of them, or one voice group)."""
    means: dict[str, dict[str, float | None]] = {}
    for role in SCORED:
        scored = [item.scores[role] for item in items if role in item.scores]
        if scored:
            means[role] = {"n": len(scored), "wer": _mean([s.wer for s in scored]),
                           "cer": _mean([s.cer for s in scored]), "sim": _mean([s.sim for s in scored])}
    ratios = {}
    for role in ("reference", "codec_reference"):
        if role in means and "output" in means:
            ratios[role] = {m: _ratio(means["output"][m], means[role][m]) for m in ("wer", "cer", "sim")}
    ceiling = ceiling_role(items)
    floors = {"wrong_sentence_wer": _mean([i.wrong_wer for i in items]),
              "different_voice_sim": _mean([i.other_voice_sim for i in items])}
    out, top = means.get("output", {}), means.get(ceiling, {}) if ceiling else {}
    # WER: lower is better, (floor - output) / (floor - ceiling); SIM: higher is better, the same with signs turned
    shares = {"wer": _share(floors["wrong_sentence_wer"], out.get("wer"), top.get("wer")),
              "sim": _share(floors["different_voice_sim"], out.get("sim"), top.get("sim"))}
    durations = duration_check(items, max_seconds)
    ratio = ratios.get(ceiling or "", {})
    goals = {"wer_ratio": _goal(ratio.get("wer"), GOALS["wer_ratio"], "lower"),
             "sim_ratio": _goal(ratio.get("sim"), GOALS["sim_ratio"], "higher"),
             "wer_share": _goal(shares["wer"], GOALS["wer_share"], "higher"),
             "sim_share": _goal(shares["sim"], GOALS["sim_share"], "higher"),
             "duration_within": _goal(durations["fraction_within"], 1.0, "higher")}
    return {"means": means, "ratios": ratios, "ceiling": ceiling, "floors": floors, "shares": shares,
            "durations": durations, "goals": goals}


def separation(items: Sequence[Item]) -> dict[str, Any]:
    """Whether the judge tells right speech from wrong text: the ceiling's WER against its own texts vs against
    the deranged texts; it holds when the first is at most SEPARATION times the second."""
    role = ceiling_role(items)
    own = _mean([i.scores[role].wer for i in items if role in i.scores]) if role else None
    wrong = _mean([i.wrong_wer for i in items])
    holds = None if own is None or wrong is None else own <= SEPARATION * wrong
    return {"role": role, "own_text_wer": own, "wrong_sentence_wer": wrong, "limit": SEPARATION, "holds": holds}


def by_voice_group(items: Sequence[Item], trained: set[str], max_seconds: float | None) -> dict[str, Any]:
    """The figures of seen voices (in the training split) and of unseen ones (any other voice) apart."""
    groups = {"seen": [i for i in items if voice_of(i) in trained],
              "unseen": [i for i in items if voice_of(i) not in trained]}
    return {"by_voice": {name: figures(group, max_seconds) for name, group in groups.items() if group},
            "seen_voices": sorted({voice_of(i) for i in groups["seen"]}),
            "unseen_voices": sorted({voice_of(i) for i in groups["unseen"]})}


def summarise(items: Sequence[Item], *, rows: int, missing: Sequence[str], failures: dict[str, str], lm: str,
              encoder: str, oov: Sequence[str], max_seconds: float | None = None) -> dict[str, Any]:
    """The figures of all items, the judge and its separation check, the settings and the counts."""
    recogniser = f"pocketsphinx en-us, closed-vocabulary {lm} LM of the {len(items)} evaluated texts"
    return {"kind": "evaluation", "format_version": EVALUATION_FORMAT_VERSION, "recogniser": recogniser,
            "lm": lm, "encoder": encoder,
            "judge": {"recogniser": recogniser, "settings": {"lm": lm}, "separation": separation(items)},
            "counts": {"rows": rows, "scored": len(items), "missing": len(missing), "failed": len(failures)},
            **figures(items, max_seconds), "goal_values": dict(GOALS),
            "missing": list(missing), "failures": dict(failures), "out_of_vocabulary": list(oov)}
