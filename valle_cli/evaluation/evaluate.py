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
makes a folder: scores.csv, summary.json and index.html with audio players and spectrograms.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from valle_cli import formats
from valle_cli.errors import AudioError, InputError, ValleError

LMS = ("unigram", "bigram")
ASR_RATE = 16000  # Hz: pocketsphinx's en-us model
AUDIO_RATE = 24000  # Hz: every audio file of the report
EVALUATION_FORMAT_VERSION = 1
ROLES = ("prompt", "reference", "codec_reference", "output")  # the audio of one item, in page order
SCORED = ("output", "reference", "codec_reference")  # the roles that get WER, CER and SIM
_COLUMN_PREFIX = {"output": "", "reference": "ref_", "codec_reference": "codec_ref_"}
_BIGRAM_DISCOUNT = 0.5  # absolute discount of seen bigram counts, given to the unigram backoff
_OUTPUT_EXTENSIONS = (".npz", ".wav", ".flac")


# ----------------------------------------------------------------------------- text


def normalise_text(text: str) -> str:
    """What WER compares: English numbers spelled out, lowercase, punctuation stripped (apostrophes kept
    inside words)."""
    from valle_cli.text.normalize import normalize_english

    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z0-9]+)*", normalize_english(text).lower()))


def error_rates(reference: str, hypothesis: str) -> tuple[float, float]:
    """(WER, CER) of one normalised hypothesis against its normalised reference (not empty)."""
    import jiwer

    return float(jiwer.wer(reference, hypothesis)), float(jiwer.cer(reference, hypothesis))


# ----------------------------------------------------------------------------- the recogniser


def require_tools() -> None:
    """Fail with what to install when pocketsphinx or jiwer cannot be imported."""
    for module, package in (("pocketsphinx", "pocketsphinx"), ("jiwer", "jiwer")):
        try:
            __import__(module)
        except ImportError as e:
            raise ValleError(f"evaluate needs {package} for word error rates ({e}): pip install pocketsphinx "
                             "jiwer") from None


def _model_dir() -> Path:
    from pocketsphinx import get_model_path

    return Path(get_model_path()) / "en-us"


def read_pronunciations(words: set[str]) -> tuple[list[str], set[str]]:
    """The CMU dictionary lines of ``words`` (alternates included) and the words it lacks."""
    lines, found = [], set()
    with open(_model_dir() / "cmudict-en-us.dict", encoding="utf-8") as f:
        for line in f:
            word = re.sub(r"\(\d+\)$", "", line.split(" ", 1)[0])
            if word in words:
                lines.append(line.rstrip("\n"))
                found.add(word)
    return lines, words - found


def arpa_lm(sentences: Sequence[Sequence[str]], order: str = "unigram") -> str:
    """An ARPA language model of exactly these word sequences.

    unigram: each word (and </s>) with its relative frequency. bigram: seen bigrams with their counts
    less an absolute discount, the freed mass backing off to the unigrams (a proper backoff model)."""
    if order not in LMS:
        raise InputError(f"unknown language model {order!r}: expected one of {', '.join(LMS)}")
    unigrams = Counter(w for s in sentences for w in [*s, "</s>"])
    total = sum(unigrams.values())
    p_uni = {w: n / total for w, n in unigrams.items()}
    if order == "unigram":
        lines = ["\\data\\", f"ngram 1={len(unigrams) + 1}", "", "\\1-grams:", "-99.0000 <s>"]
        lines += [f"{math.log10(p):.6f} {w}" for w, p in sorted(p_uni.items())]
        return "\n".join([*lines, "", "\\end\\", ""])
    bigrams = Counter((a, b) for s in sentences for a, b in zip(["<s>", *s], [*s, "</s>"], strict=True))
    context: Counter[str] = Counter()
    followers: dict[str, list[str]] = {}
    for (a, b), n in bigrams.items():
        context[a] += n
        followers.setdefault(a, []).append(b)
    backoff = {}
    for a, seen in followers.items():
        freed = _BIGRAM_DISCOUNT * len(seen) / context[a]
        unseen_mass = 1.0 - sum(p_uni[b] for b in seen)
        backoff[a] = math.log10(freed / unseen_mass) if unseen_mass > 1e-9 else 0.0
    lines = ["\\data\\", f"ngram 1={len(unigrams) + 1}", f"ngram 2={len(bigrams)}", "", "\\1-grams:",
             f"-99.0000 <s> {backoff.get('<s>', 0.0):.6f}"]
    lines += [f"{math.log10(p):.6f} {w} {backoff.get(w, 0.0):.6f}" for w, p in sorted(p_uni.items())]
    lines += ["", "\\2-grams:"]
    lines += [f"{math.log10((n - _BIGRAM_DISCOUNT) / context[a]):.6f} {a} {b}" for (a, b), n in sorted(bigrams.items())]
    return "\n".join([*lines, "", "\\end\\", ""])


class Recogniser:
    """pocketsphinx limited to the words of ``texts``, with a unigram or bigram LM made of them."""

    def __init__(self, texts: Sequence[str], lm: str = "unigram"):
        require_tools()
        from pocketsphinx import Decoder

        if lm not in LMS:
            raise InputError(f"unknown language model {lm!r}: expected one of {', '.join(LMS)}")
        sentences = [normalise_text(t).split() for t in texts]
        entries, self.oov = read_pronunciations({w for s in sentences for w in s})
        if not entries:
            raise InputError("no word of the texts is in pocketsphinx's English dictionary: cannot recognise")
        sentences = [[w for w in s if w not in self.oov] for s in sentences]
        self.lm = lm
        with tempfile.TemporaryDirectory(prefix="valle-asr-") as tmp:
            (Path(tmp) / "closed.arpa").write_text(arpa_lm(sentences, lm))
            (Path(tmp) / "closed.dict").write_text("\n".join(entries) + "\n")
            self._decoder = Decoder(hmm=str(_model_dir() / "en-us"), lm=f"{tmp}/closed.arpa",
                                    dict=f"{tmp}/closed.dict", logfn=os.devnull,
                                    cmn="batch")  # per-utterance normalisation: no carry-over between files

    def __call__(self, wav: np.ndarray, sample_rate: int) -> str:
        """The recognised words of one utterance (mono float), normalised; '' when nothing was heard."""
        import soxr

        if sample_rate != ASR_RATE:
            wav = soxr.resample(wav, sample_rate, ASR_RATE)
        pcm = (np.clip(wav, -1.0, 1.0) * 32767).astype(np.int16)
        self._decoder.start_utt()
        self._decoder.process_raw(pcm.tobytes(), full_utt=True)
        self._decoder.end_utt()
        hyp = self._decoder.hyp()
        return normalise_text(hyp.hypstr) if hyp is not None else ""


def recognise(wavs: Sequence[np.ndarray], sample_rate: int, texts: Sequence[str], lm: str = "unigram") -> list[str]:
    """Hypotheses (normalised text) of ``wavs`` by pocketsphinx with a closed LM made of ``texts`` (all the
    texts that may be spoken, not necessarily one per wav)."""
    asr = Recogniser(texts, lm)
    return [asr(np.asarray(w, np.float32), sample_rate) for w in wavs]


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
    from valle_cli.codecs.audio import wav_bytes
    from valle_cli.evaluation.similarity import make_encoder
    from valle_cli.generation.synthesizer import read_sample_manifest

    if lm not in LMS:
        raise InputError(f"unknown language model {lm!r}: expected one of {', '.join(LMS)}")
    if codec_references and references is None:
        raise InputError("codec references are made from the references: give references too")
    require_tools()
    outputs = Path(outputs)
    for folder in (outputs, references):
        if folder is not None and not Path(folder).is_dir():
            raise InputError(f"{folder}: no such folder")
    rows = read_sample_manifest(manifest)
    keep = None
    if audio_dir is None:
        keep = tempfile.TemporaryDirectory(prefix="valle-evaluate-")
        audio_dir = keep.name
    audio_dir = Path(audio_dir)
    audio_dir.mkdir(parents=True, exist_ok=True)

    reader = _AudioReader(device)
    missing: list[str] = []
    failures: dict[str, str] = {}
    items: list[Item] = []
    waves: dict[tuple[str, str], np.ndarray] = {}  # (id, role) -> audio at AUDIO_RATE
    for index, (uid, text, prompts) in enumerate(rows):
        output = find_output(outputs, uid)
        if output is None:
            missing.append(uid)
            continue
        reference = None
        if references is not None:
            reference = find_output(Path(references), uid)
            if reference is None:
                failures[uid] = f"no reference {uid}.wav/.npz in {references}"
                continue
        item = Item(uid, text, prompts)
        try:
            audio = {"output": reader.read(output),
                     "prompt": np.concatenate([reader.read(Path(p)) for p in prompts])}
            if reference is not None:
                audio["reference"] = reader.read(reference)
                if codec_references:
                    if output.suffix.lower() != ".npz":
                        raise InputError(f"{output}: codec references need codes (.npz) outputs that record "
                                         "their codec")
                    audio["codec_reference"] = reader.resynthesise(reference, reader.codec_of(output))
        except ValleError as e:
            failures[uid] = str(e)
            continue
        for role, wav in audio.items():
            path = audio_dir / f"{_file_stem(index, uid)}.{role}.wav"
            formats.atomic_write_bytes(path, wav_bytes(wav, AUDIO_RATE))
            item.audio[role] = path
            waves[uid, role] = wav
        items.append(item)
    if not items:
        why = "; ".join(f"{k}: {v}" for k, v in list(failures.items())[:3])
        why = why or f"none of the {len(rows)} ids has an output (<id>.npz or .wav) in {outputs}"
        raise InputError(f"nothing to evaluate: {why}")

    asr = Recogniser([item.text for item in items], lm)
    the_encoder = make_encoder(encoder, checkpoint=checkpoint, device=device)
    pairs = [(item, role) for role in SCORED for item in items if role in item.audio]
    scores = score_items([i.text for i, _ in pairs], [waves[i.id, role] for i, role in pairs],
                         [waves[i.id, "prompt"] for i, _ in pairs], recogniser=asr, encoder=the_encoder,
                         device=device, on_progress=on_progress)
    for (item, role), score in zip(pairs, scores, strict=True):
        item.scores[role] = score
    summary = summarise(items, rows=len(rows), missing=missing, failures=failures, lm=lm, encoder=encoder,
                        oov=sorted(asr.oov))
    if held_out is not None:
        unseen = set(held_out)
        groups = {"held_out": [i for i in items if voice_of(i) in unseen],
                  "seen": [i for i in items if voice_of(i) not in unseen]}
        summary["by_voice"] = {name: {"means": part["means"], "ratios": part["ratios"]}
                               for name, group in groups.items() if group
                               for part in [summarise(group, rows=len(group), missing=(), failures={}, lm=lm,
                                                      encoder=encoder, oov=())]}
        summary["held_out_voices"] = sorted(unseen)
    return Report(items=items, summary=summary, _keep=keep)


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


# ----------------------------------------------------------------------------- the report folder


def scores_table(items: Sequence[Item]) -> list[dict[str, Any]]:
    """One row per item: id, text, then hypothesis, wer, cer, sim of the output and of each ceiling."""
    roles = [r for r in SCORED if any(r in item.scores for item in items)]
    table = []
    for item in items:
        row: dict[str, Any] = {"id": item.id, "text": item.text}
        for role in roles:
            score = item.scores.get(role)
            prefix = _COLUMN_PREFIX[role]
            row[f"{prefix}hypothesis"] = score.hypothesis if score else ""
            for metric in ("wer", "cer", "sim"):
                row[f"{prefix}{metric}"] = "" if score is None else round(getattr(score, metric), 6)
        table.append(row)
    return table


def _csv_bytes(rows: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def spectrogram_png(wav: np.ndarray, path: Path, sample_rate: int = AUDIO_RATE) -> None:
    """A log-magnitude spectrogram (0-8 kHz) of ``wav``, written atomically as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_fft, hop = 512, 128
    wav = np.pad(np.asarray(wav, np.float32), (0, max(0, n_fft - len(wav))))
    frames = np.lib.stride_tricks.sliding_window_view(wav, n_fft)[::hop] * np.hanning(n_fft)  # (F, n_fft)
    db = 20 * np.log10(np.abs(np.fft.rfft(frames, axis=1)).T + 1e-5)  # (n_fft/2+1, F)
    top = int(8000 / (sample_rate / n_fft))
    fig, ax = plt.subplots(figsize=(3.6, 1.4), dpi=80)
    ax.imshow(db[:top], origin="lower", aspect="auto", cmap="magma", vmin=db.max() - 80, vmax=db.max(),
              extent=(0, len(wav) / sample_rate, 0, 8))
    ax.set(xlabel="s", ylabel="kHz")
    ax.tick_params(labelsize=6)
    ax.xaxis.label.set_size(6)
    ax.yaxis.label.set_size(6)
    fig.tight_layout(pad=0.2)
    with formats.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def training_curves(run: str | os.PathLike[str], path: Path) -> bool:
    """run/curves.png copied to ``path``, or redrawn from run/log.jsonl (run/ is not written); False if neither."""
    from valle_cli.training.loop import CURVES_FILE, LOG_FILE, plot_curves

    run = Path(run)
    if not run.is_dir():
        raise InputError(f"{run}: no such run folder")
    if (run / CURVES_FILE).is_file():
        with formats.atomic_path(path) as tmp:
            shutil.copyfile(run / CURVES_FILE, tmp)
        return True
    if not (run / LOG_FILE).is_file():
        return False
    with tempfile.TemporaryDirectory(prefix="valle-curves-") as tmp:
        shutil.copyfile(run / LOG_FILE, Path(tmp) / LOG_FILE)
        drawn = plot_curves(Path(tmp))
        if drawn is None:
            return False
        with formats.atomic_path(path) as out:
            shutil.copyfile(drawn, out)
    return True


def write_report(report: Report, out: str | os.PathLike[str], *, run: str | os.PathLike[str] | None = None,
                 on_progress: Callable[[int], None] | None = None) -> Path:
    """``out/``: scores.csv, summary.json, index.html, audio/ (wav) and img/ (spectrograms); returns index.html."""
    import soundfile as sf

    out = Path(out)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    (out / "img").mkdir(exist_ok=True)
    for item in report.items:
        for role, path in list(item.audio.items()):
            target = out / "audio" / path.name
            if path.resolve() != target.resolve():
                with formats.atomic_path(target) as tmp:
                    shutil.copyfile(path, tmp)
                item.audio[role] = target
            wav, rate = sf.read(target, dtype="float32")
            spectrogram_png(wav, out / "img" / f"{path.stem}.png", rate)
        if on_progress:
            on_progress(1)
    curves = None
    if run is not None and training_curves(run, out / "img" / "curves.png"):
        curves = "img/curves.png"
    summary = {**report.summary, "training_curves": curves}
    formats.atomic_write_bytes(out / "scores.csv", _csv_bytes(scores_table(report.items)))
    formats.atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    formats.atomic_write_bytes(out / "index.html", page(report.items, summary, out).encode())
    return out / "index.html"


# ----------------------------------------------------------------------------- the page

_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}.hyp{color:#555;font-style:italic}
.item{border-top:2px solid #ddd;padding-top:0.6em;margin-top:1em}.audio{display:inline-block;margin:0 1em 0.5em 0}
audio{width:300px;display:block}img{display:block}"""


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _summary_table(summary: dict[str, Any]) -> str:
    e = html.escape
    rows = ["<tr><th></th><th>n</th><th>WER</th><th>CER</th><th>SIM</th></tr>"]
    for role, means in summary["means"].items():
        cells = "".join(f"<td class=num>{_fmt(means[m])}</td>" for m in ("wer", "cer", "sim"))
        rows.append(f"<tr><th>{e(role.replace('_', ' '))}</th><td class=num>{means['n']}</td>{cells}</tr>")
    for role, ratio in summary["ratios"].items():
        cells = "".join(f"<td class=num>{_fmt(ratio[m])}</td>" for m in ("wer", "cer", "sim"))
        rows.append(f"<tr><th>output / {e(role.replace('_', ' '))}</th><td></td>{cells}</tr>")
    for group, part in summary.get("by_voice", {}).items():
        label = "held-out voices" if group == "held_out" else "seen voices"
        output = part["means"].get("output")
        if output:
            cells = "".join(f"<td class=num>{_fmt(output[m])}</td>" for m in ("wer", "cer", "sim"))
            rows.append(f"<tr><th>output, {label}</th><td class=num>{output['n']}</td>{cells}</tr>")
        for role, ratio in part["ratios"].items():
            cells = "".join(f"<td class=num>{_fmt(ratio[m])}</td>" for m in ("wer", "cer", "sim"))
            rows.append(f"<tr><th>{label}: output / {e(role.replace('_', ' '))}</th><td></td>{cells}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def page(items: Sequence[Item], summary: dict[str, Any], out: Path) -> str:
    """index.html: the summary table, the training curves, then per item its texts, players, spectrograms
    and scores. Every text is HTML-escaped; audio and images are linked relative to the page."""
    e = html.escape
    counts = summary["counts"]
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>valle evaluate</title>",
             f"<style>{_STYLE}</style></head><body>", "<h1>valle evaluate</h1>",
             f"<p>{e(summary['recogniser'])}; speaker similarity: {e(summary['encoder'])} cosine to the prompt. "
             f"{counts['scored']} of {counts['rows']} rows scored, {counts['missing']} missing, "
             f"{counts['failed']} failed.</p>", _summary_table(summary)]
    if summary["missing"]:
        parts.append(f"<p>Missing outputs: {e(', '.join(summary['missing']))}</p>")
    if summary["failures"]:
        parts.append("<ul>" + "".join(f"<li>{e(k)}: {e(v)}</li>" for k, v in summary["failures"].items()) + "</ul>")
    if summary["out_of_vocabulary"]:
        parts.append(f"<p>Not in the pronouncing dictionary (never recognised): "
                     f"{e(', '.join(summary['out_of_vocabulary']))}</p>")
    if summary.get("training_curves"):
        parts.append(f"<h2>Training</h2><img src='{e(summary['training_curves'])}' alt='training curves' width=900>")
    parts.append("<h2>Items</h2>")
    for item in items:
        parts.append(f"<div class=item><h3>{e(item.id)}</h3><p>{e(item.text)}</p>")
        for role in ROLES:
            if role not in item.audio:
                continue
            rel = item.audio[role].relative_to(out).as_posix()
            img = f"img/{item.audio[role].stem}.png"
            parts.append(f"<div class=audio><b>{e(role.replace('_', ' '))}</b>"
                         f"<audio controls preload=none src='{e(rel)}'></audio>"
                         f"<img src='{e(img)}' alt='spectrogram of the {e(role)}'></div>")
        rows = ["<tr><th></th><th>heard</th><th>WER</th><th>CER</th><th>SIM</th></tr>"]
        for role in SCORED:
            if role in item.scores:
                s = item.scores[role]
                rows.append(f"<tr><th>{e(role.replace('_', ' '))}</th><td class=hyp>{e(s.hypothesis)}</td>"
                            f"<td class=num>{_fmt(s.wer)}</td><td class=num>{_fmt(s.cer)}</td>"
                            f"<td class=num>{_fmt(s.sim)}</td></tr>")
        parts.append("<table>" + "".join(rows) + "</table></div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
