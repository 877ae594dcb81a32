"""Intelligibility: an offline recogniser (pocketsphinx) restricted to the words that may be spoken.

pocketsphinx's en-us acoustic model with a closed-vocabulary language model made of exactly the
evaluated texts (a backoff bigram by default, or unigram) and a dictionary of just their words: its
general English LM is useless on synthetic voices. Texts and hypotheses are normalised alike
(English numbers and abbreviations spelled out, lowercase, punctuation stripped) and scored with
jiwer. Words missing from the pronouncing dictionary cannot be recognised and are reported.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from valle_cli.errors import InputError, ValleError

LMS = ("unigram", "bigram")
ASR_RATE = 16000  # Hz: pocketsphinx's en-us model
DEFAULT_LM = "bigram"
# The judge's decoder settings. Measured on 60 held-out espeak sentences (12 voices x 5, make_corpus.py), WER of
# the codec-resynthesised references against their own texts vs against another item's text: unigram LM
# 0.637 vs 0.936 (separation fails), bigram 0.308 vs 0.889 (holds, 0.35x), bigram with 0.3 s of silence before
# and after each utterance 0.239 vs 0.857 (0.28x). Language weights 12 and 20 were worse (references 0.41,
# 0.47 against 0.40), wider beams and live CMN the same within 0.01: pocketsphinx's defaults stay, with
# per-utterance CMN.
JUDGE_SETTINGS: dict[str, float | str] = {"cmn": "batch",  # per-utterance normalisation: no carry-over
                                          "lw": 6.5}  # pocketsphinx's default language weight
PAD_SECONDS = 0.3  # silence added before and after each utterance: the decoder sees its start and end
_BIGRAM_DISCOUNT = 0.5  # absolute discount of seen bigram counts, given to the unigram backoff


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

    def __init__(self, texts: Sequence[str], lm: str = DEFAULT_LM):
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
        self.settings = {"lm": lm, **JUDGE_SETTINGS, "pad_seconds": PAD_SECONDS}  # printed by the report
        with tempfile.TemporaryDirectory(prefix="valle-asr-") as tmp:
            (Path(tmp) / "closed.arpa").write_text(arpa_lm(sentences, lm))
            (Path(tmp) / "closed.dict").write_text("\n".join(entries) + "\n")
            self._decoder = Decoder(hmm=str(_model_dir() / "en-us"), lm=f"{tmp}/closed.arpa",
                                    dict=f"{tmp}/closed.dict", logfn=os.devnull, **JUDGE_SETTINGS)

    def __call__(self, wav: np.ndarray, sample_rate: int) -> str:
        """The recognised words of one utterance (mono float), normalised; '' when nothing was heard."""
        import soxr

        if sample_rate != ASR_RATE:
            wav = soxr.resample(wav, sample_rate, ASR_RATE)
        pad = np.zeros(int(PAD_SECONDS * ASR_RATE), np.float32)
        pcm = (np.clip(np.concatenate([pad, wav, pad]), -1.0, 1.0) * 32767).astype(np.int16)
        self._decoder.start_utt()
        self._decoder.process_raw(pcm.tobytes(), full_utt=True)
        self._decoder.end_utt()
        hyp = self._decoder.hyp()
        return normalise_text(hyp.hypstr) if hyp is not None else ""


def recognise(wavs: Sequence[np.ndarray], sample_rate: int, texts: Sequence[str], lm: str = DEFAULT_LM) -> list[str]:
    """Hypotheses (normalised text) of ``wavs`` by pocketsphinx with a closed LM made of ``texts`` (all the
    texts that may be spoken, not necessarily one per wav)."""
    asr = Recogniser(texts, lm)
    return [asr(np.asarray(w, np.float32), sample_rate) for w in wavs]


