#!/usr/bin/env python
"""Make a multi-speaker English speech corpus with espeak-ng, offline, no downloads.

    python examples/make_corpus.py -o corpus/ --speakers 300 --per-speaker 20 \
        --eval-out eval/ --eval-per-speaker 2 --eval-speakers 30 --unseen-speakers 12

writes corpus/<speaker>/<speaker>_<nnnn>.wav (16-bit mono, 22.05 kHz) + .txt transcripts, and
corpus/speakers.tsv describing each voice. Sentences come from a small seeded grammar over a
closed vocabulary of CMUdict words (which keeps offline word-error-rate scoring honest); part of
every word list is reserved for the held-out sentences, so each of them has a word the corpus
never speaks. Speakers are distinct espeak voices: an accent x a voice variant x pitch x pitch
range x speaking rate, hundreds of them; some variants are reserved for the unseen voices of the
evaluation, which never speak in the corpus.

The espeak-ng library is the one shipped by the `espeakng-loader` wheel (espeak-ng 1.52), driven
through ctypes, so the corpus is the same on every machine and needs no system package; every file
is the same bytes for a seed whatever the number of worker processes.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

# ----------------------------------------------------------------------------- vocabulary
# Every word list is split in two: the words the corpus speaks, and words reserved for held-out
# sentences. No reserved word occurs anywhere in a training sentence (tests/test_make_corpus.py
# checks the lists, and that every word is in pocketsphinx's cmudict-en-us.dict, the judge's).
# Together they cover every phoneme of CMUdict's 39 (ZH: measured, treasure; OY: coin, toy; ...).


@dataclass(frozen=True)
class Words:
    train: tuple[str, ...]
    held_out: tuple[str, ...]


def _words(train: str, held_out: str) -> Words:
    return Words(tuple(train.split()), tuple(held_out.split()))


_PEOPLE = _words(
    "farmer painter neighbor student brother doctor baker girl teacher captain driver nurse sister fox dog "
    "sailor singer mother father uncle cousin soldier pilot worker writer dancer hunter fisherman miner tailor "
    "butcher cat horse monkey rabbit boy king queen child lawyer officer clerk chef guard prince actor",
    "carpenter plumber goose mayor shepherd banker poet wizard dentist tourist parrot giraffe")
_PERSON_ADJECTIVES = _words(
    "old young quiet tall busy little tired friendly clever brown happy angry lazy brave gentle proud careful "
    "hungry lucky strange noisy polite famous lonely curious shy kind rich poor sleepy honest",
    "nervous cheerful grumpy elderly stubborn patient")
_VERBS = _words(
    "carried painted found opened cleaned followed watched borrowed repaired dropped noticed bought wanted "
    "moved counted washed pushed pulled lifted hid sold kept chose brought touched tied fixed showed threw "
    "caught held packed measured filled shared checked kicked loaded wrapped chased fetched dragged",
    "polished delivered rescued collected examined described stretched juggled")
_THINGS = _words(
    "basket door chair boat key map kite blanket box umbrella gate bird window bottle hammer ladder coin jar "
    "shoe book cup bell lamp rope shirt wheel clock candle mirror pillow bucket ribbon treasure cheese bread "
    "jacket toy ring drum bag card coat glove pencil apple envelope",
    "violin saddle trumpet anchor compass feather puzzle helmet carpet kettle lantern oyster")
_THING_ADJECTIVES = _words(
    "heavy green broken small silver yellow warm wooden red paper blue purple dirty clean shiny empty round "
    "tiny soft golden plastic strong long short white black dark bright cold new square thick",
    "crooked velvet rusty striped enormous fragile")
_COUNTED_THINGS = _words(
    "apples letters coins books cups candles shoes keys bottles stones flowers eggs",
    "pebbles acorns buttons marbles")
_NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_PLACES = _words(
    "river bridge station house lake hill street market school forest garden church castle harbor village "
    "field road farm beach mountain library office shop tower valley park cave barn palace island",
    "airport museum desert cottage factory stadium temple canyon jungle")
_PREPOSITIONS = ("near", "behind", "under", "beside", "across", "inside", "by", "at", "in", "on", "above", "past",
                 "along", "toward")
_TIMES = ("before dinner", "in the morning", "after the storm", "during the winter", "at midnight", "after lunch",
          "in the evening", "before sunrise", "during the summer", "at noon", "after school", "before breakfast")
_DETERMINERS = ("the", "a", "my", "our", "his", "her", "their", "your", "the")
_OPENERS = ("", "", "", "", "yesterday, ", "later, ", "once again, ", "quite suddenly, ", "every day, ",
            "at last, ", "this morning, ")
_ENDINGS = (".", ".", ".", "!", "?")
_VOWEL_SOUNDS = tuple("aeio")  # 'an' before these (no word here starts with a 'you' u or a silent h)
_SLOTS = ("person", "person_adjective", "verb", "thing", "thing_adjective", "place")


def _article(determiner: str, word: str) -> str:
    if determiner == "a" and word.startswith(_VOWEL_SOUNDS + ("u",)):
        return "an"
    return determiner


class _Grammar:
    """Sentences like 'Yesterday, the old farmer carried a heavy basket near the river.' (2-4 s).

    ``reserved``: the slots whose word is drawn from the held-out part of its list (none: a
    training sentence).
    """

    def __init__(self, rng: random.Random):
        self.rng = rng

    def pick(self, words: Words, reserved: bool) -> str:
        return self.rng.choice(words.held_out if reserved else words.train)

    def noun_phrase(self, nouns: Words, adjectives: Words, reserved: set[str], noun_slot: str,
                    adjective_slot: str) -> str:
        noun = self.pick(nouns, noun_slot in reserved)
        with_adjective = adjective_slot in reserved or self.rng.random() < 0.6
        words = [self.pick(adjectives, adjective_slot in reserved), noun] if with_adjective else [noun]
        determiner = self.rng.choice(_DETERMINERS)
        return " ".join([_article(determiner, words[0]), *words])

    def thing_phrase(self, reserved: set[str]) -> str:
        if self.rng.random() < 0.2 and not ({"thing", "thing_adjective"} & reserved):
            return f"{self.rng.choice(_NUMBERS)} {self.pick(_COUNTED_THINGS, False)}"
        if self.rng.random() < 0.2 and "thing" in reserved and "thing_adjective" not in reserved:
            return f"{self.rng.choice(_NUMBERS)} {self.pick(_COUNTED_THINGS, True)}"
        return self.noun_phrase(_THINGS, _THING_ADJECTIVES, reserved, "thing", "thing_adjective")

    def place_phrase(self, reserved: set[str]) -> str:
        if "place" not in reserved and self.rng.random() < 0.25:
            return self.rng.choice(_TIMES)
        return f"{self.rng.choice(_PREPOSITIONS)} the {self.pick(_PLACES, 'place' in reserved)}"

    def sentence(self, reserved: set[str]) -> str:
        subject = self.noun_phrase(_PEOPLE, _PERSON_ADJECTIVES, reserved, "person", "person_adjective")
        verb = self.pick(_VERBS, "verb" in reserved)
        words = f"{subject} {verb} {self.thing_phrase(reserved)} {self.place_phrase(reserved)}"
        end = self.rng.choice(_ENDINGS)
        words = f"why {words}" if end == "?" else f"{self.rng.choice(_OPENERS)}{words}"
        return words[0].upper() + words[1:] + end


def make_sentences(n: int, seed: int) -> list[str]:
    """n distinct training sentences (no reserved word), reproducible for a seed; the first k are the
    same whatever n."""
    grammar = _Grammar(random.Random(seed))
    return _distinct(n, lambda: grammar.sentence(set()))


def make_held_out_sentences(n: int, seed: int) -> list[str]:
    """n distinct held-out sentences: each has a word of a reserved list (one slot for sure, any other
    with p = 0.25), so none is a training sentence and each says a word the corpus never speaks."""
    rng = random.Random(f"held-out {seed}")
    grammar = _Grammar(rng)

    def one() -> str:
        forced = rng.choice(_SLOTS)
        return grammar.sentence({forced} | {s for s in _SLOTS if rng.random() < 0.25})

    return _distinct(n, one)


def _distinct(n: int, draw) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(1000 * n + 1000):  # a bound, not an expected count: the grammar has millions of sentences
        if len(out) == n:
            return out
        sentence = draw()
        if sentence not in seen:
            seen.add(sentence)
            out.append(sentence)
    raise ValueError(f"the grammar cannot make {n} distinct sentences")


def training_words() -> set[str]:
    """Every word a training sentence can contain (lowercase, no punctuation)."""
    lists = (_PEOPLE, _PERSON_ADJECTIVES, _VERBS, _THINGS, _THING_ADJECTIVES, _COUNTED_THINGS, _PLACES)
    phrases = [*_NUMBERS, *_PREPOSITIONS, *_TIMES, *_DETERMINERS, *_OPENERS, "an", "why"]
    return {w for words in lists for w in words.train} | {w.strip(", ") for p in phrases for w in p.split()} - {""}


def held_out_words() -> set[str]:
    """The reserved words: they occur in held-out sentences only."""
    lists = (_PEOPLE, _PERSON_ADJECTIVES, _VERBS, _THINGS, _THING_ADJECTIVES, _COUNTED_THINGS, _PLACES)
    return {w for words in lists for w in words.held_out}


# ----------------------------------------------------------------------------- voices


@dataclass(frozen=True)
class Voice:
    speaker: str
    name: str  # espeak voice + variant, e.g. "en-us+f3"
    pitch: int  # 0..99 (espeak default 50)
    pitch_range: int  # 0..99 (espeak default 50)
    rate: int  # words per minute (espeak default 175)

    @property
    def accent(self) -> str:
        return self.name.split("+")[0]

    @property
    def variant(self) -> str:
        return self.name.split("+")[1]


# espeak-ng 1.52's English voices (espeak-ng-data/lang/gmw/en*; en-Shaw is a spelling, not an accent).
_ACCENTS = ("en-us", "en", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
            "en-us-nyc")
# The variants of espeak-ng-data/voices/!v/ that sound like a plain voice. Left out: the whispered ones
# (whisper, whisperf, caleb: voicing 0), the shaking ones (croak, grandma, grandpa, aunty: flutter >= 12),
# the echoing robots (robosoft*, RicishayMax*, UniRobot, anikaRobot, announcer, Demonic, Tweaky, Mr serious,
# Marco, Alicia), a cartoon child (zac: pitch 240-390), a test setting (fast), and those pocketsphinx
# understood worst on four sentences (WER >= 0.85: Andy, AnxiousAndy, boris, gustave, ian, kaukovalta, Lee,
# linda, marcelo, norbert, quincy, rob, robert, shelby, steph, Storm, travis; the kept ones scored 0.27-0.84
# at pitch 50, rate 170 with en-us, as did m1-m8 and f1-f5, espeak's own).
_FEMALE = ("f1", "f2", "f3", "f5", "anika", "Andrea", "belinda")
_MALE = ("m1", "m2", "m3", "m5", "m6", "m7", "m8", "adam", "benjamin", "Denis", "Diogo", "ed", "edward",
         "edward2", "Gene", "Gene2", "Henrique", "Hugo", "iven", "iven2", "iven3", "john", "klatt", "klatt2",
         "klatt3", "klatt4", "klatt5", "klatt6", "Michael", "michel", "miguel", "Mike", "mike2", "Nguyen", "pablo",
         "paul", "Reed", "victor", "antonio", "Mario")
# Variants reserved for the unseen voices of an evaluation: timbres (formant sets) the corpus never has,
# none a near-copy of a training variant (steph2 and steph3 go together; iven*, Gene* and edward* stay).
_UNSEEN_FEMALE = ("f4", "Annie", "steph2", "steph3")
_UNSEEN_MALE = ("m4", "david", "Jacky", "max", "pedro", "sandro", "Alex")
PITCH, PITCH_RANGE, RATE = (20, 80), (20, 90), (130, 210)
# The voices the judge hears. valle evaluate's recogniser is pocketsphinx's US-English acoustic model and
# dictionary; on the originals of this corpus its WER depends far more on the voice than on anything else.
# Measured on held-out sentences (a closed bigram LM of 48 of them; wrong-sentence floor 0.90-0.94), per
# accent (48 sentences each, random variants, pitch, rate): en-us 0.41, en 0.50, en-us-nyc 0.53,
# en-gb-x-gbclan 0.54, en-gb-x-rp 0.60, en-gb-scotland 0.69, en-gb-x-gbcwmd 0.70, en-029 0.70; and per
# variant with en-us (6 sentences each, pitch 30-70, range 30-80, rate 140-200): from f5 0.02, miguel 0.04,
# mike2 0.07 ... to Michael 0.79, belinda 0.86, Andrea 0.86, Annie 0.88. Kept: WER <= 0.40 (35 variants; of
# the unseen-voice ones, sandro 0.30 and david 0.38). `--eval-voices heard` has the held-out sentences
# spoken by such voices only, so that the judge separates right words from wrong ones (its ceiling WER well
# under half the wrong-sentence WER); the training voices are not affected and keep every accent and variant.
HEARD_ACCENTS = ("en-us",)
HEARD_VARIANTS = frozenset((
    "f5", "miguel", "mike2", "Hugo", "f2", "edward2", "benjamin", "klatt5", "Reed", "michel", "klatt4", "edward",
    "Henrique", "m6", "Diogo", "klatt6", "m5", "adam", "klatt3", "anika", "klatt2", "klatt", "f1", "Gene2",
    "sandro", "Denis", "Gene", "m1", "f3", "victor", "david", "antonio", "m2", "iven", "ed"))


def _combos(female: Sequence[str], male: Sequence[str], rng: random.Random,
            accents: Sequence[str] = _ACCENTS) -> list[tuple[str, str]]:
    """Every (accent, variant) pair once, in a seeded order balanced over accents, variants and sexes.

    Within a sex, pass r pairs the j-th variant with accent j + r: each pass uses every variant once and
    spreads the accents evenly, and no pair repeats over len(_ACCENTS) passes. Female and male pairs
    alternate until the (fewer) female ones run out.
    """
    def spread(variants: Sequence[str]) -> list[tuple[str, str]]:
        variants, order = rng.sample(list(variants), len(variants)), rng.sample(list(accents), len(accents))
        return [(order[(j + r) % len(order)], v) for r in range(len(order)) for j, v in enumerate(variants)]

    females, males = spread(female), spread(male)
    alternating = [pair for f, m in zip(females, males, strict=False) for pair in (f, m)]
    n = min(len(females), len(males))
    return alternating + females[n:] + males[n:]


def _spread(n: int, low: int, high: int, rng: random.Random) -> list[int]:
    """n integers in [low, high], one in each of n equal strata, in a seeded order (a Latin hypercube
    column: every region of the range gets its share of voices)."""
    strata = rng.sample(range(n), n)
    return [round(low + (k + rng.random()) / n * (high - low)) for k in strata]


def _voices(n: int, prefix: str, female: Sequence[str], male: Sequence[str], rng: random.Random,
            accents: Sequence[str] = _ACCENTS) -> list[Voice]:
    combos = _combos(female, male, rng, accents)
    pitches, ranges, rates = (_spread(n, lo, hi, rng) for lo, hi in (PITCH, PITCH_RANGE, RATE))
    width = max(2, len(str(n - 1)))
    voices: list[Voice] = []
    taken: set[tuple] = set()
    for i in range(n):
        accent, variant = combos[i % len(combos)]
        key = (accent, variant, pitches[i], ranges[i], rates[i])
        while key in taken:  # past len(combos) voices a pair repeats: make its rate differ
            key = (*key[:4], RATE[0] + (key[4] + 1 - RATE[0]) % (RATE[1] - RATE[0] + 1))
        taken.add(key)
        voices.append(Voice(f"{prefix}{i:0{width}d}", f"{accent}+{variant}", *key[2:]))
    return voices


def make_voices(n: int, seed: int) -> list[Voice]:
    """n distinct training voices, spread over accents x plain variants (never an unseen-voice variant),
    pitch 20..80, pitch range 20..90 and rate 130..210 words a minute; reproducible for a seed."""
    return _voices(n, "spk", _FEMALE, _MALE, random.Random(seed + 1))


def make_unseen_voices(n: int, seed: int, heard: bool = False) -> list[Voice]:
    """n voices for evaluation only, made of the variants make_voices never uses: unseen00, unseen01, ...
    heard: only the accents and variants the judge hears (``is_heard``)."""
    rng = random.Random(f"unseen {seed}")
    if not heard:
        return _voices(n, "unseen", _UNSEEN_FEMALE, _UNSEEN_MALE, rng)
    female, male = ([v for v in group if v in HEARD_VARIANTS] for group in (_UNSEEN_FEMALE, _UNSEEN_MALE))
    return _voices(n, "unseen", female, male, rng, HEARD_ACCENTS)


def is_heard(voice: Voice) -> bool:
    """Whether the judge (pocketsphinx's US-English model, ``valle evaluate``) understands this kind of voice."""
    return voice.accent in HEARD_ACCENTS and voice.variant in HEARD_VARIANTS


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
        self._libc = ctypes.CDLL(None)  # the process's C library: rand() is the one espeak-ng calls
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
        # espeak-ng draws noise (roughness, Klatt aspiration) from its own generator and from libc's
        # rand(): both are seeded from the text and voice (see _speak_batch for the state it also keeps).
        seed = zlib.crc32(f"{voice}|{text}".encode())
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
        self._libc.srand(ctypes.c_uint(seed))
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


# ----------------------------------------------------------------------------- speaking many files

Job = tuple[Path, str, Voice]  # (wav path, text, voice)


def _speak_batch(batch: list[Job], todo: list[bool]) -> None:
    """Speak a batch in order, in a fresh process, writing the files marked in ``todo`` (16-bit wav +
    .txt transcript). espeak-ng keeps state from one utterance to the next in static variables that
    espeak_Initialize does not reset (the pitch flutter's phase, the Klatt synthesiser's filters), so a
    file depends on what the process spoke before it: a batch always starts in a new process and
    speaks all its sentences, and the files are the same bytes whatever the worker count or the
    files that already exist."""
    espeak = Espeak()
    for (wav_path, text, voice), write in zip(batch, todo, strict=True):
        wav = _trim_silence(espeak.speak(text, voice), espeak.sample_rate)
        if write:
            _write_atomic(wav_path.with_suffix(".txt"), lambda p, text=text: p.write_text(text + "\n"))
            _write_atomic(wav_path, lambda p, wav=wav: sf.write(p, wav, espeak.sample_rate, subtype="PCM_16",
                                                                format="WAV"))


def _speak_all(batches: list[list[Job]], overwrite: bool, workers: int) -> None:
    """Speak the batches that miss a wav (all of them with overwrite), on ``workers`` processes, each
    batch in a process of its own (forked: no interpreter start-up; maxtasksperchild=1)."""
    import multiprocessing

    tasks = [(batch, [overwrite or not path.exists() for path, _, _ in batch]) for batch in batches]
    tasks = [task for task in tasks if any(task[1])]
    if not tasks:
        return
    with multiprocessing.get_context("fork").Pool(max(1, min(workers, len(tasks))), maxtasksperchild=1) as pool:
        pool.starmap(_speak_batch, tasks, chunksize=1)


# ----------------------------------------------------------------------------- the corpus and its held-out set


def make_corpus(out_dir: str | Path, n_speakers: int = 6, per_speaker: int = 20, seed: int = 0,
                overwrite: bool = False, eval_dir: str | Path | None = None, eval_per_speaker: int = 0,
                unseen_speakers: int = 0, eval_speakers: int | None = None, workers: int = 1,
                eval_voices: str = "any") -> list[Path]:
    """Write the corpus; returns the wav paths. Existing files are kept unless overwrite.

    With ``eval_dir`` and ``eval_per_speaker``, ``eval_speakers`` of the voices (all by default; else
    spread evenly over the voice list) and ``unseen_speakers`` voices that never speak in the corpus
    each speak ``eval_per_speaker`` held-out sentences into ``eval_dir/<speaker>_eval<k>.wav`` + ``.txt``,
    and ``eval_dir/rows.csv`` lists them as ``id|text|prompt`` rows, ready for ``valle sample --manifest``
    and ``valle evaluate --references eval_dir``. A seen voice's prompt is its first corpus file; an
    unseen voice's is ``eval_dir/prompts/<speaker>/<speaker>_prompt.wav`` (a sentence of its own).
    ``eval_dir/speakers.tsv`` describes the voices of the rows, with a ``seen`` column (1 or 0).
    ``eval_voices="heard"``: the held-out sentences are spoken by voices the judge hears (``is_heard``): unseen
    voices of those accents and variants only, and ``eval_speakers`` corpus voices that are (other corpus
    voices only when too few are: a tiny corpus).
    The training voices and sentences do not depend on the evaluation options.
    """
    out_dir = Path(out_dir)
    voices = make_voices(n_speakers, seed)
    with_eval = eval_dir is not None and eval_per_speaker > 0
    unseen = make_unseen_voices(unseen_speakers, seed, heard=eval_voices == "heard") if with_eval else []
    # Every utterance of the corpus is a different sentence; the unseen voices' prompts come after them.
    sentences = make_sentences(n_speakers * per_speaker + len(unseen), seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, batches = [], []  # one batch per voice
    for s, voice in enumerate(voices):
        (out_dir / voice.speaker).mkdir(exist_ok=True)
        batches.append([(out_dir / voice.speaker / f"{voice.speaker}_{j:04d}.wav", sentences[s * per_speaker + j],
                         voice) for j in range(per_speaker)])
        paths += [job[0] for job in batches[-1]]
    eval_tables: dict[Path, str] = {}
    if with_eval:
        batches += _eval_set(Path(eval_dir), out_dir, _eval_speakers(voices, eval_speakers, eval_voices), unseen,
                          sentences[n_speakers * per_speaker:], eval_per_speaker, seed, eval_tables)
    _speak_all(batches, overwrite, workers)
    for path, text in eval_tables.items():  # written last: rows.csv tells make the held-out set is complete
        _write_atomic(path, lambda p, text=text: p.write_text(text))
    table, speakers = _speakers_table(voices), out_dir / "speakers.tsv"
    # An unchanged speakers.tsv keeps its time: pipelines/espeak.mk takes it for "the corpus is
    # ready", and a newer one would make every file built from the corpus look stale.
    if overwrite or not speakers.exists() or speakers.read_text() != table:
        _write_atomic(speakers, lambda p: p.write_text(table))
    return paths


def _evenly_spaced(voices: list[Voice], k: int | None) -> list[Voice]:
    """k voices spread evenly over the list (all of them for None), each the first voice at or after its
    place whose variant no earlier pick has (while there are such), so the k differ in timbre too."""
    if k is None or k >= len(voices):
        return voices
    picked: list[Voice] = []
    for i in range(max(k, 0)):
        start = i * len(voices) // k
        order = [voices[(start + j) % len(voices)] for j in range(len(voices))]
        used_variants, used = {v.variant for v in picked}, set(picked)
        fresh = [v for v in order if v.variant not in used_variants and v not in used]
        picked.append(fresh[0] if fresh else next(v for v in order if v not in used))
    return picked


def _eval_speakers(voices: list[Voice], k: int | None, which: str) -> list[Voice]:
    """The corpus voices that speak held-out sentences: k (None: all) spread over the list; with which="heard"
    those the judge hears (all of them for None), and only when there are fewer than k, others to make up k."""
    if which != "heard":
        return _evenly_spaced(voices, k)
    heard = [v for v in voices if is_heard(v)]
    if k is None or len(heard) >= k:
        return _evenly_spaced(heard, k)
    others = _evenly_spaced([v for v in voices if not is_heard(v)], k - len(heard))
    return sorted(heard + others, key=voices.index)


def _speakers_table(voices: list[Voice], seen: set[str] | None = None) -> str:
    columns = ["speaker", "voice", "pitch", "pitch_range", "rate"] + (["seen"] if seen is not None else [])
    rows = ["\t".join(columns)]
    for v in voices:
        cells = [v.speaker, v.name, str(v.pitch), str(v.pitch_range), str(v.rate)]
        rows.append("\t".join(cells + ([str(int(v.speaker in seen))] if seen is not None else [])))
    return "\n".join(rows) + "\n"


def _eval_set(eval_dir: Path, corpus: Path, seen: list[Voice], unseen: list[Voice], prompt_sentences: list[str],
              per_speaker: int, seed: int, tables: dict[Path, str]) -> list[list[Job]]:
    """The batches (one per voice) of the held-out set; its speakers.tsv and rows.csv go into ``tables``."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    voices = seen + unseen
    sentences = make_held_out_sentences(len(voices) * per_speaker, seed)
    rows, batches = ["id|text|prompt"], []
    for s, voice in enumerate(voices):
        jobs: list[Job] = []
        if s < len(seen):
            prompt = os.path.relpath(corpus / voice.speaker / f"{voice.speaker}_0000.wav", eval_dir)
        else:  # the folder names the voice: valle evaluate's voice of a row is its prompt's folder
            prompt_wav = eval_dir / "prompts" / voice.speaker / f"{voice.speaker}_prompt.wav"
            prompt_wav.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((prompt_wav, prompt_sentences[s - len(seen)], voice))
            prompt = os.path.relpath(prompt_wav, eval_dir)
        for k in range(per_speaker):
            uid, text = f"{voice.speaker}_eval{k:02d}", sentences[s * per_speaker + k]
            rows.append(f"{uid}|{text}|{prompt}")
            jobs.append((eval_dir / f"{uid}.wav", text, voice))
        batches.append(jobs)
    tables[eval_dir / "speakers.tsv"] = _speakers_table(voices, {v.speaker for v in seen})
    tables[eval_dir / "rows.csv"] = "\n".join(rows) + "\n"
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", required=True, help="output folder")
    parser.add_argument("--speakers", type=int, default=6, help="number of distinct voices (default 6)")
    parser.add_argument("--per-speaker", type=int, default=20, help="utterances per voice (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sentences and voices")
    parser.add_argument("--overwrite", action="store_true", help="redo files that exist")
    parser.add_argument("--eval-out", help="also write held-out sentences here, with rows.csv")
    parser.add_argument("--eval-per-speaker", type=int, default=2, help="held-out sentences per voice (default 2)")
    parser.add_argument("--eval-speakers", type=int, default=None,
                        help="how many corpus voices (spread over the list) get held-out sentences (default all)")
    parser.add_argument("--unseen-speakers", type=int, default=0,
                        help="voices made for --eval-out only, of variants the corpus never uses (default 0)")
    parser.add_argument("--eval-voices", choices=("any", "heard"), default="any",
                        help="which voices speak the held-out sentences: any, or only accents and variants "
                             "that valle evaluate's recogniser hears well (default any)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes that speak (default: the CPU count); the files do not depend on it")
    args = parser.parse_args()
    for flag in ("speakers", "per_speaker", "eval_per_speaker", "unseen_speakers", "workers"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0")
    if args.eval_speakers is not None and args.eval_speakers < 0:
        parser.error("--eval-speakers must be >= 0")
    paths = make_corpus(args.out, args.speakers, args.per_speaker, args.seed, args.overwrite,
                        eval_dir=args.eval_out, eval_per_speaker=args.eval_per_speaker if args.eval_out else 0,
                        unseen_speakers=args.unseen_speakers, eval_speakers=args.eval_speakers, workers=args.workers,
                        eval_voices=args.eval_voices)
    seconds = sum(sf.info(p).duration for p in paths)
    print(f"{len(paths)} utterances, {args.speakers} speakers, {seconds / 60:.1f} min of audio in {args.out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
