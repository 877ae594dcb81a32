#!/usr/bin/env python
"""Speed and quality of the built-in codec, fitted on an espeak corpus, measured on held-out speech.

    python benchmarks/codec_quality.py                      # makes a 12-voice corpus in a temp folder
    python benchmarks/codec_quality.py --corpus corpus/ --save-codec /tmp/codec.safetensors
    python benchmarks/codec_quality.py --codec /tmp/codec.safetensors   # skip fitting

Prints the fit time, the time to encode and to decode 10 s of audio, and, on the last
--held-out utterances of every speaker (never used for fitting):
  WER  pocketsphinx word error rate on the originals and on their resyntheses (decode(encode(x))),
       with a closed-vocabulary unigram language model and a dictionary built from the evaluated
       texts (pocketsphinx's general English LM is useless on synthetic voices);
  SIM  resemblyzer speaker-embedding cosine similarity of each resynthesis to its original (mean).
The quality part needs `pip install pocketsphinx jiwer webrtcvad-wheels` and
`pip install --no-deps resemblyzer`; without them it is skipped with a message.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

from valle_cli.codecs.builtin import BuiltinCodec, BuiltinCodecConfig  # noqa: E402

SR = 24000


def load_corpus(root: Path, held_out: int) -> tuple[list[np.ndarray], list[tuple[np.ndarray, str]]]:
    """Training audio, and (audio, text) of the last `held_out` utterances of every speaker."""
    train, test = [], []
    for spk in sorted(p for p in root.iterdir() if p.is_dir()):
        wavs = sorted(spk.glob("*.wav"))
        for j, path in enumerate(wavs):
            audio, sr = sf.read(path, dtype="float32")
            audio = soxr.resample(audio, sr, SR).astype(np.float32)
            if j >= len(wavs) - held_out:
                test.append((audio, path.with_suffix(".txt").read_text().strip()))
            else:
                train.append(audio)
    return train, test


def median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# ----------------------------------------------------------------------------- measures


def normalize_text(text: str) -> str:
    return " ".join(re.findall(r"[a-z']+", text.lower()))


class Recognizer:
    """pocketsphinx restricted to the words of `texts`, with their unigram frequencies as the LM."""

    def __init__(self, texts: list[str], workdir: Path):
        from pocketsphinx import Decoder, get_model_path

        model = Path(get_model_path()) / "en-us"
        counts = Counter(w for t in texts for w in normalize_text(t).split())
        total = sum(counts.values()) + len(texts)  # + one </s> per sentence
        lines = ["\\data\\", f"ngram 1={len(counts) + 2}", "", "\\1-grams:",
                 f"{np.log10(len(texts) / total):.4f} </s>", "-99.0000 <s>"]
        lines += [f"{np.log10(n / total):.4f} {w}" for w, n in sorted(counts.items())]
        lm = workdir / "closed.arpa"
        lm.write_text("\n".join(lines + ["", "\\end\\", ""]))
        entries = [line for line in (model / "cmudict-en-us.dict").read_text().splitlines()
                   if re.sub(r"\(\d+\)$", "", line.split(" ", 1)[0]) in counts]
        dic = workdir / "closed.dict"
        dic.write_text("\n".join(entries) + "\n")
        self.decoder = Decoder(hmm=str(model / "en-us"), lm=str(lm), dict=str(dic), logfn=os.devnull,
                               cmn="batch")  # per-utterance normalisation: no carry-over between files

    def __call__(self, audio: np.ndarray, sr: int) -> str:
        pcm = (np.clip(soxr.resample(audio, sr, 16000), -1, 1) * 32767).astype(np.int16)
        self.decoder.start_utt()
        self.decoder.process_raw(pcm.tobytes(), full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr if hyp is not None else ""


def quality(originals: list[np.ndarray], resynth: list[np.ndarray], texts: list[str]) -> dict[str, float]:
    import jiwer
    from resemblyzer import VoiceEncoder, preprocess_wav

    with tempfile.TemporaryDirectory() as tmp:
        asr = Recognizer(texts, Path(tmp))
        refs = [normalize_text(t) for t in texts]
        wer_orig = jiwer.wer(refs, [asr(a, SR) for a in originals])
        wer_resyn = jiwer.wer(refs, [asr(a, SR) for a in resynth])
    encoder = VoiceEncoder("cpu", verbose=False)
    sims = [float(encoder.embed_utterance(preprocess_wav(a, SR)) @ encoder.embed_utterance(preprocess_wav(b, SR)))
            for a, b in zip(originals, resynth, strict=True)]
    return {"wer_orig": wer_orig, "wer_resynth": wer_resyn, "sim": float(np.mean(sims)), "sim_min": min(sims)}


def have_quality_tools() -> str | None:
    """None when every measuring package imports, else what is missing."""
    missing = []
    for mod in ("pocketsphinx", "jiwer", "resemblyzer", "webrtcvad"):
        try:
            __import__(mod)
        except Exception:
            missing.append(mod)
    return ", ".join(missing) or None


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, help="corpus folder (default: make one with examples/make_corpus.py)")
    ap.add_argument("--speakers", type=int, default=12, help="voices of the made corpus")
    ap.add_argument("--per-speaker", type=int, default=32, help="utterances per voice of the made corpus")
    ap.add_argument("--held-out", type=int, default=4, help="evaluated utterances per speaker (not fitted on)")
    ap.add_argument("--codec", type=Path, help="use this fitted codec instead of fitting one")
    ap.add_argument("--save-codec", type=Path, help="save the fitted codec here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a BuiltinCodecConfig field, e.g. --set griffin_lim_iters=64")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    corpus = args.corpus
    if corpus is None:
        from make_corpus import make_corpus

        corpus = Path(tempfile.mkdtemp(prefix="valle-bench-corpus-"))
        make_corpus(corpus, n_speakers=args.speakers, per_speaker=args.per_speaker, seed=args.seed)
    train, test = load_corpus(corpus, args.held_out)
    print(f"corpus {corpus}: fit on {len(train)} utterances ({sum(map(len, train)) / SR / 60:.1f} min), "
          f"evaluate on {len(test)} ({sum(len(a) for a, _ in test) / SR / 60:.1f} min); "
          f"torch threads {torch.get_num_threads()}")

    types = {f.name: f.type for f in fields(BuiltinCodecConfig)}
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in types:
            ap.error(f"--set {item}: no such field (fields: {', '.join(types)})")
        overrides[key] = None if value == "None" else (int if "int" in str(types[key]) else float)(value)
    if args.codec:
        codec = BuiltinCodec.load(args.codec)
        if overrides:  # decoding settings can change without refitting
            codec = BuiltinCodec(replace(codec.config, **overrides), {
                "codebooks": codec.codebooks, "mel_basis": codec.mel_basis, "mean": codec.mean, "std": codec.std})
        print(f"codec {args.codec} (not fitted here)")
    else:
        config = replace(BuiltinCodecConfig(), **overrides)
        t0 = time.perf_counter()
        codec = BuiltinCodec.fit(train, config, seed=args.seed, progress=lambda m: print("  " + m, flush=True))
        print(f"fit {config.n_codebooks} x {config.codebook_size}: {time.perf_counter() - t0:.1f} s")
        if args.save_codec:
            codec.save(args.save_codec)
    print(f"config: {codec.config}")

    ten = np.concatenate([a for a, _ in test])[: 10 * SR]
    ten = np.pad(ten, (0, 10 * SR - len(ten)))
    codes = codec.encode([ten])
    codec.decode(codes)  # warm-up
    print(f"encode 10 s: {median_time(lambda: codec.encode([ten])):.3f} s   "
          f"decode 10 s: {median_time(lambda: codec.decode(codes)):.3f} s")

    originals = [a for a, _ in test]
    t0 = time.perf_counter()
    resynth = []
    for i in range(0, len(originals), 16):
        resynth += codec.decode(codec.encode(originals[i:i + 16]))
    print(f"resynthesised {len(originals)} utterances in {time.perf_counter() - t0:.1f} s (batches of 16)")
    missing = have_quality_tools()
    if missing:
        print(f"quality skipped: missing {missing} (pip install pocketsphinx jiwer webrtcvad-wheels; "
              "pip install --no-deps resemblyzer)")
        return
    q = quality(originals, resynth, [t for _, t in test])
    print(f"WER original {q['wer_orig']:.3f}   resynthesis {q['wer_resynth']:.3f}   "
          f"SIM resynthesis vs original {q['sim']:.3f} (min {q['sim_min']:.3f})")


if __name__ == "__main__":
    main()
