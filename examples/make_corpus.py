#!/usr/bin/env python
"""Make a small multi-speaker English speech corpus with espeak-ng, offline, no downloads.

    python examples/make_corpus.py -o corpus/ --speakers 8 --per-speaker 20

writes corpus/<speaker>/<speaker>_<nnnn>.wav (16-bit mono, 22.05 kHz) + .txt transcripts, and
corpus/speakers.tsv describing each voice. Sentences come from a small seeded grammar (a closed
vocabulary, which keeps offline word-error-rate scoring honest); speakers are distinct espeak
voices: a base accent x a voice variant x pitch x pitch range x speaking rate.

The espeak-ng library is the one shipped by the `espeakng-loader` wheel (espeak-ng 1.52), driven
through ctypes, so the corpus is the same on every machine and needs no system package.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

# ----------------------------------------------------------------------------- sentences

_SUBJECTS = ["the old farmer", "a young painter", "my neighbour", "the quiet student", "her brother",
             "the tall doctor", "a busy baker", "the little girl", "our teacher", "the captain",
             "a tired driver", "the friendly nurse", "his sister", "the clever fox", "a brown dog"]
_VERBS = ["carried", "painted", "found", "opened", "cleaned", "followed", "watched", "borrowed",
          "repaired", "dropped", "noticed", "bought", "wanted", "moved", "counted"]
_OBJECTS = ["a heavy basket", "the green door", "seven apples", "the broken chair", "a small boat",
            "the silver key", "an old map", "the yellow kite", "a warm blanket", "the wooden box",
            "three letters", "a red umbrella", "the garden gate", "a paper bird", "the kitchen window"]
_PLACES = ["near the river", "before dinner", "in the morning", "after the storm", "under the bridge",
           "at the station", "behind the house", "during the winter", "by the lake", "on the hill",
           "across the street", "in the market", "at midnight", "beside the school", "in the forest"]
_OPENERS = ["", "", "", "yesterday, ", "later, ", "once again, ", "quite suddenly, ", "every day, "]
_ENDINGS = [".", ".", ".", "!", "?"]


def make_sentences(n: int, seed: int) -> list[str]:
    """n distinct grammatical sentences from a fixed vocabulary, reproducible for a seed."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        words = f"{rng.choice(_OPENERS)}{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} " \
                f"{rng.choice(_OBJECTS)} {rng.choice(_PLACES)}"
        end = rng.choice(_ENDINGS)
        if end == "?":
            words = f"why {words.split(', ')[-1]}"
        sentence = words[0].upper() + words[1:] + end
        if sentence not in seen:
            seen.add(sentence)
            out.append(sentence)
    return out


# ----------------------------------------------------------------------------- voices


@dataclass(frozen=True)
class Voice:
    speaker: str
    name: str  # espeak voice + variant, e.g. "en-us+f3"
    pitch: int  # 0..99 (espeak default 50)
    pitch_range: int  # 0..99 (espeak default 50)
    rate: int  # words per minute (espeak default 175)


_ACCENTS = ["en-us", "en", "en-gb-scotland", "en-029", "en-gb-x-rp"]
_VARIANTS = ["m1", "f1", "m3", "f2", "m2", "f3", "m4", "f4", "m5", "f5", "m6", "m7"]


def make_voices(n: int, seed: int) -> list[Voice]:
    """n voices that differ in variant, accent, pitch and rate (reproducible for a seed)."""
    rng = random.Random(seed + 1)
    voices = []
    for i in range(n):
        variant = _VARIANTS[i % len(_VARIANTS)]
        accent = _ACCENTS[(i // len(_VARIANTS) + i) % len(_ACCENTS)]
        voices.append(Voice(
            speaker=f"spk{i:02d}",
            name=f"{accent}+{variant}",
            pitch=rng.randint(25, 75),
            pitch_range=rng.randint(30, 80),
            rate=rng.randint(145, 190),
        ))
    return voices


# ----------------------------------------------------------------------------- espeak-ng via ctypes

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH, _RANGE = 1, 3, 4


class Espeak:
    """The espeak-ng shared library of the espeakng-loader wheel, synthesising to numpy."""

    def __init__(self) -> None:
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        data = espeakng_loader.get_data_path().encode()
        self.lib.espeak_Initialize.restype = ctypes.c_int
        rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, ctypes.c_char_p(data), 0)
        if rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise")
        self.sample_rate = int(rate)
        self._chunks: list[np.ndarray] = []

        def on_audio(wav: ctypes.POINTER(ctypes.c_short), n: int, _events: int) -> int:
            if wav and n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0  # 0 = continue synthesis

        self._callback = _SYNTH_CALLBACK(on_audio)  # keep a reference: C holds only the pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def speak(self, text: str, voice: Voice) -> np.ndarray:
        """int16 mono samples at self.sample_rate."""
        if self.lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice.name!r}")
        self.lib.espeak_SetParameter(_RATE, voice.rate, 0)
        self.lib.espeak_SetParameter(_PITCH, voice.pitch, 0)
        self.lib.espeak_SetParameter(_RANGE, voice.pitch_range, 0)
        self._chunks = []
        data = text.encode("utf-8") + b"\0"
        err = self.lib.espeak_Synth(ctypes.c_char_p(data), ctypes.c_size_t(len(data)), 0, _POS_CHARACTER, 0,
                                    _CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak-ng synthesis failed (error {err}) for {text!r}")
        self.lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


def _trim_silence(wav: np.ndarray, sample_rate: int, keep_seconds: float = 0.1) -> np.ndarray:
    """Cut leading/trailing digital silence down to keep_seconds on each side."""
    loud = np.flatnonzero(np.abs(wav.astype(np.int32)) > 64)
    if loud.size == 0:
        return wav
    pad = int(keep_seconds * sample_rate)
    return wav[max(0, loud[0] - pad): loud[-1] + pad]


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _speak_to(wav_path: Path, text: str, voice: Voice, espeak: Espeak, overwrite: bool) -> None:
    """wav_path (16-bit wav) + its .txt transcript; an existing wav is kept unless overwrite."""
    if wav_path.exists() and not overwrite:
        return
    wav = _trim_silence(espeak.speak(text, voice), espeak.sample_rate)
    _write_atomic(wav_path.with_suffix(".txt"), lambda p: p.write_text(text + "\n"))
    _write_atomic(wav_path, lambda p: sf.write(p, wav, espeak.sample_rate, subtype="PCM_16", format="WAV"))


def make_corpus(out_dir: str | Path, n_speakers: int = 6, per_speaker: int = 20, seed: int = 0,
                overwrite: bool = False, eval_dir: str | Path | None = None, eval_per_speaker: int = 0) -> list[Path]:
    """Write the corpus; returns the wav paths. Existing files are kept unless overwrite.

    With ``eval_dir``, every voice also speaks ``eval_per_speaker`` sentences that appear nowhere
    in the corpus, into ``eval_dir/<speaker>_eval<k>.wav`` + ``.txt``, and ``eval_dir/rows.csv``
    lists them as ``id|text|prompt`` rows (prompt: the voice's first corpus file), ready for
    ``valle sample --manifest`` and ``valle evaluate --references eval_dir``.
    """
    out_dir = Path(out_dir)
    voices = make_voices(n_speakers, seed)
    # Every speaker reads a different set of sentences, drawn from one pool: a held-out sentence
    # for one voice is never a training sentence of another in the demo split.
    sentences = make_sentences(n_speakers * (per_speaker + eval_per_speaker), seed)
    espeak = Espeak()
    paths: list[Path] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for s, voice in enumerate(voices):
        spk_dir = out_dir / voice.speaker
        spk_dir.mkdir(exist_ok=True)
        for j in range(per_speaker):
            text = sentences[s * per_speaker + j]
            wav_path = spk_dir / f"{voice.speaker}_{j:04d}.wav"
            paths.append(wav_path)
            _speak_to(wav_path, text, voice, espeak, overwrite)
    if eval_dir is not None and eval_per_speaker > 0:
        _write_eval_set(Path(eval_dir), out_dir, voices, sentences[n_speakers * per_speaker:], eval_per_speaker,
                        espeak, overwrite)
    rows = ["speaker\tvoice\tpitch\tpitch_range\trate"]
    rows += [f"{v.speaker}\t{v.name}\t{v.pitch}\t{v.pitch_range}\t{v.rate}" for v in voices]
    table, speakers = "\n".join(rows) + "\n", out_dir / "speakers.tsv"
    # An unchanged speakers.tsv keeps its time: pipelines/espeak.mk takes it for "the corpus is
    # ready", and a newer one would make every file built from the corpus look stale.
    if overwrite or not speakers.exists() or speakers.read_text() != table:
        _write_atomic(speakers, lambda p: p.write_text(table))
    return paths


def _write_eval_set(eval_dir: Path, corpus: Path, voices: list[Voice], sentences: list[str], per_speaker: int,
                    espeak: Espeak, overwrite: bool) -> None:
    eval_dir.mkdir(parents=True, exist_ok=True)
    rows = ["id|text|prompt"]
    for s, voice in enumerate(voices):
        prompt = os.path.relpath(corpus / voice.speaker / f"{voice.speaker}_0000.wav", eval_dir)
        for k in range(per_speaker):
            text = sentences[s * per_speaker + k]
            uid = f"{voice.speaker}_eval{k:02d}"
            rows.append(f"{uid}|{text}|{prompt}")
            _speak_to(eval_dir / f"{uid}.wav", text, voice, espeak, overwrite)
    _write_atomic(eval_dir / "rows.csv", lambda p: p.write_text("\n".join(rows) + "\n"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", required=True, help="output folder")
    parser.add_argument("--speakers", type=int, default=6, help="number of distinct voices (default 6)")
    parser.add_argument("--per-speaker", type=int, default=20, help="utterances per voice (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sentences and voices")
    parser.add_argument("--overwrite", action="store_true", help="redo files that exist")
    parser.add_argument("--eval-out", help="also write held-out sentences of every voice here, with rows.csv")
    parser.add_argument("--eval-per-speaker", type=int, default=2, help="held-out sentences per voice (default 2)")
    args = parser.parse_args()
    paths = make_corpus(args.out, args.speakers, args.per_speaker, args.seed, args.overwrite,
                        eval_dir=args.eval_out, eval_per_speaker=args.eval_per_speaker if args.eval_out else 0)
    seconds = sum(sf.info(p).duration for p in paths)
    print(f"{len(paths)} utterances, {args.speakers} speakers, {seconds / 60:.1f} min of audio in {args.out}",
          file=__import__("sys").stderr)


if __name__ == "__main__":
    main()
