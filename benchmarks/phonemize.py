#!/usr/bin/env python
"""Throughput of the phonemize stage: batched espeak-ng calls vs one call per utterance.

    python benchmarks/phonemize.py [--n 1000]

Prints utterances/s for English normalisation, phonemizing the whole list in batched calls
(what ``valle phonemize`` does), phonemizing one utterance per call, tokenizing, and the whole
stage end to end on a text file. Sentences come from a seeded grammar with numbers, currency and
abbreviations, so normalisation has work to do.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from valle_cli.text.phonemize import phonemize, phonemize_corpus, prepare_text
from valle_cli.text.tokenizers import PhonemeTokenizer, train_bpe

_WHO = ["the old farmer", "Dr. Smith", "a young painter", "Mrs. Jones", "our teacher", "the captain"]
_DID = ["bought", "carried", "painted", "counted", "sold", "found"]
_WHAT = ["{n} apples", "a boat for ${p}", "{n} letters", "the {o} chair", "a map from {y}",
         "{pc}% of the seeds", "pens, ink, etc. and paper"]
_WHEN = ["at {h}:{m:02d}", "on the {o} day", "in {y}", "before dinner", "near the river", "by noon"]


def make_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    ordinals = ["1st", "2nd", "3rd", "4th", "21st", "33rd"]
    out = []
    for _ in range(n):
        fill = {"n": rng.randint(2, 9999), "p": f"{rng.randint(1, 500)}.{rng.randint(0, 99):02d}",
                "o": rng.choice(ordinals), "y": rng.randint(1800, 2030), "pc": rng.randint(1, 100),
                "h": rng.randint(1, 12), "m": rng.randint(0, 59)}
        template = f"{rng.choice(_WHO)} {rng.choice(_DID)} {rng.choice(_WHAT)} {rng.choice(_WHEN)}"
        words = template.format(**fill)
        out.append(words[0].upper() + words[1:] + rng.choice([".", "!", "?"]))
    return out


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:10,.0f} utt/s  ({seconds:6.2f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="sentences")
    args = parser.parse_args()
    sentences = make_sentences(args.n)
    phonemize(["warm up"])  # load espeak-ng and the voice outside the timings

    start = time.perf_counter()
    prepared = [prepare_text(s, "en-us")[0] for s in sentences]
    t_norm = time.perf_counter() - start

    start = time.perf_counter()
    batched, _ = phonemize(prepared)
    t_batched = time.perf_counter() - start

    start = time.perf_counter()
    single = [phonemize([s])[0][0] for s in prepared]
    t_single = time.perf_counter() - start
    same = sum(a == b for a, b in zip(batched, single, strict=True))

    start = time.perf_counter()
    tok = PhonemeTokenizer.build(batched)
    for p in batched:
        tok.encode(p)
    t_tok = time.perf_counter() - start

    start = time.perf_counter()
    bpe = train_bpe(batched, 512)
    t_bpe_train = time.perf_counter() - start
    start = time.perf_counter()
    for p in batched:
        bpe.encode(p)
    t_bpe = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "sentences.txt"
        src.write_text("\n".join(sentences) + "\n")
        start = time.perf_counter()
        phonemize_corpus(src)
        t_all = time.perf_counter() - start

    n = len(sentences)
    print(f"phonemize benchmark: {n} sentences, espeak-ng en-us, e.g. {sentences[0]!r}")
    print(f"  normalise (English)            {rate(n, t_norm)}")
    print(f"  espeak batched (1 call/1000)   {rate(n, t_batched)}")
    print(f"  espeak one call per utterance  {rate(n, t_single)}   "
          f"-> batched is {t_single / t_batched:.1f}x faster")
    print(f"  phoneme tokenizer build+encode {rate(n, t_tok)}")
    print(f"  BPE train (512) / encode       {t_bpe_train:.2f} s / {rate(n, t_bpe)}")
    print(f"  whole stage (phonemize_corpus) {rate(n, t_all)}")
    print(f"  batched == per-utterance output on {same}/{n} sentences")


if __name__ == "__main__":
    main()
