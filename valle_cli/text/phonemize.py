"""Transcripts to phonemes: espeak-ng IPA, and the whole ``phonemize`` stage as one function.

``phonemize_corpus(source)`` reads transcripts (``valle_cli.text.transcripts``), cleans and normalises
them (``prepare_text``, see ``valle_cli.text.normalize``), phonemizes them in batched espeak-ng calls
(``phonemize``), builds or reuses a tokenizer (``valle_cli.text.tokenizers``) and returns the rows of a
phonemes file. Rows that cannot be used (empty transcripts, text with nothing speakable, symbols a
reused vocabulary lacks, duplicate ids) are collected and raised together as one ``TextError``,
or skipped and reported with ``skip_bad``. ``text_to_tokens`` does the same for one sentence
with the settings a phonemes file records (what ``sample`` needs).

espeak-ng is the library shipped by the ``espeakng-loader`` wheel (one pinned version, so the
phoneme inventory stays the same everywhere), driven through the ``phonemizer`` package.
"""

from __future__ import annotations

import logging
import os
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from valle_cli.errors import InputError, TextError
from valle_cli.formats import display_name
from valle_cli.text.normalize import clean_text, describe_removed, normalize_english
from valle_cli.text.tokenizers import PhonemeTokenizer, Tokenizer, tokenizer_from_meta, train_bpe
from valle_cli.text.transcripts import BadRow, Row, read_transcripts

__all__ = ["phonemize_corpus", "phonemize", "prepare_text", "read_transcripts", "text_to_tokens",
           "list_languages", "espeak_version", "PhonemizedCorpus", "PhonemizeReport"]

CHUNK = 1000  # utterances per espeak call: phonemizer restores punctuation in time quadratic in a call's size
PARALLEL_FROM = 20_000  # utterances; below this one espeak process beats starting workers

# ----------------------------------------------------------------------------- espeak-ng


def prepare_text(text: str, lang: str, normalize: bool = True) -> tuple[str, Counter[str]]:
    """Normalise (NFKC; English spelled out for en*) and drop unspeakable characters."""
    if normalize and lang.lower().startswith("en"):
        text = normalize_english(text)
    elif normalize:
        text = unicodedata.normalize("NFKC", text)
    return clean_text(text)


@lru_cache(maxsize=1)
def _setup_espeak() -> tuple[str, str]:
    """Point phonemizer at the espeak-ng library and data of the espeakng-loader wheel."""
    import espeakng_loader
    from phonemizer.backend.espeak.wrapper import EspeakWrapper

    library, data = espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
    EspeakWrapper.set_library(library)
    EspeakWrapper.set_data_path(data)
    return library, data


def list_languages() -> dict[str, str]:
    """espeak-ng language codes -> names."""
    _setup_espeak()
    from phonemizer.backend import EspeakBackend

    return dict(EspeakBackend.supported_languages())


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not message.startswith("words count mismatch"):  # espeak joins words ('in the'): harmless
            self.messages.append(message)


_LOGGER = logging.getLogger("valle_cli.phonemizer")  # phonemizer's warnings, collected per call
_LOGGER.propagate = False
_LOGGER.setLevel(logging.WARNING)
_LOGGER.addHandler(logging.NullHandler())


@lru_cache(maxsize=8)
def espeak_backend(lang: str, punctuation: bool = True, stress: bool = True) -> Any:
    """A phonemizer EspeakBackend (cached); an unknown language is a one-line TextError."""
    _setup_espeak()
    from phonemizer.backend import EspeakBackend

    if not EspeakBackend.is_supported_language(lang):
        raise TextError(f"--lang {lang}: not a language espeak-ng knows "
                        "(list them: valle phonemize --list-langs)")
    return EspeakBackend(lang, preserve_punctuation=punctuation, with_stress=stress,
                         language_switch="remove-flags", logger=_LOGGER)


def espeak_version() -> str:
    _setup_espeak()
    from phonemizer.backend import EspeakBackend

    return ".".join(map(str, EspeakBackend.version()))


@contextmanager
def _worker_environment() -> Iterator[None]:
    """Parallel phonemizer jobs run in fresh processes: tell them where the library is."""
    library, data = _setup_espeak()
    wanted = {"PHONEMIZER_ESPEAK_LIBRARY": library, "PHONEMIZER_ESPEAK_DATA_PATH": data}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def phonemize(
    texts: list[str], lang: str = "en-us", punctuation: bool = True, stress: bool = True, njobs: int = 1,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[list[str], list[str]]:
    """IPA for every text, in batched espeak-ng calls; returns (phonemes, phonemizer warnings).

    Texts must be prepared (``prepare_text``): one line each. Words are separated by one space.
    ``njobs`` > 1 phonemizes on that many processes; ``on_progress(n)`` is told of each batch done.
    """
    from phonemizer.separator import Separator

    backend = espeak_backend(lang, punctuation, stress)
    separator = Separator(phone="", syllable="", word=" ")
    out: list[str] = []
    collect = _Collect()
    _LOGGER.addHandler(collect)
    try:
        with _worker_environment() if njobs > 1 else nullcontext():
            step = CHUNK * njobs
            for start in range(0, len(texts), step):
                batch = texts[start:start + step]
                jobs = njobs if len(batch) >= 2 * njobs else 1
                out += backend.phonemize(batch, separator=separator, strip=True, njobs=jobs)
                if on_progress:
                    on_progress(len(batch))
    finally:
        _LOGGER.removeHandler(collect)
    if len(out) != len(texts):  # pragma: no cover - a phonemizer bug would misalign every later row
        raise TextError(f"espeak-ng returned {len(out)} lines for {len(texts)} utterances")
    return [unicodedata.normalize("NFC", " ".join(p.split())) for p in out], collect.messages


# ----------------------------------------------------------------------------- the whole stage


@dataclass
class PhonemizeReport:
    source: str
    rows: int = 0
    blank_lines: int = 0
    skipped: list[BadRow] = field(default_factory=list)  # bad rows left out (skip_bad)
    audio_without_text: list[str] = field(default_factory=list)
    text_without_audio: int = 0
    removed_chars: Counter[str] = field(default_factory=Counter)
    rows_with_removed_chars: int = 0
    unk_rows: int = 0  # rows with a symbol mapped to <unk> (allow_unk)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def utterances_per_second(self) -> float:
        return self.rows / max(self.seconds, 1e-9)


@dataclass
class PhonemizedCorpus:
    df: Any  # polars DataFrame: id, text, lang, phonemes, tokens (list[u16])
    tokenizer: Tokenizer
    settings: dict[str, Any]
    report: PhonemizeReport

    @property
    def tokenizer_meta(self) -> dict[str, Any]:
        return self.tokenizer.to_meta()


def phonemize_corpus(
    source: str | os.PathLike[str],
    *,
    lang: str = "en-us",
    tokenizer: str = "phoneme",
    vocab: str | os.PathLike[str] | None = None,
    punctuation: bool = True,
    stress: bool = True,
    normalize: bool = True,
    skip_bad: bool = False,
    allow_unk: bool = False,
    bpe_vocab_size: int = 512,
    njobs: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> PhonemizedCorpus:
    """Everything ``valle phonemize`` does except writing: see the module docstring.

    ``tokenizer`` is 'phoneme' or 'bpe'; ``vocab`` names a phonemes file whose tokenizer is reused
    instead (same ids for new data). ``njobs`` None picks parallel jobs only for big inputs on
    machines with 4+ cores; ``on_progress(n)`` hears of each batch of n utterances phonemized.
    """
    start = time.perf_counter()
    if tokenizer not in ("phoneme", "bpe"):
        raise TextError(f"tokenizer {tokenizer!r}: expected 'phoneme' or 'bpe'")
    espeak_backend(lang, punctuation, stress)  # fail fast on an unknown language
    transcripts = read_transcripts(source)
    report = PhonemizeReport(source=display_name(source), blank_lines=transcripts.blank_lines,
                             audio_without_text=transcripts.audio_without_text,
                             text_without_audio=transcripts.text_without_audio)
    bad = list(transcripts.bad)

    rows, texts = _prepare(transcripts.rows, lang, normalize, report, bad)
    good = _phonemize_rows(rows, texts, lang, punctuation, stress, njobs, on_progress, report, bad)
    tok, vocab_settings = _tokenizer(vocab, tokenizer, [p for _, p in good], bpe_vocab_size)
    if vocab_settings:
        report.warnings += _settings_mismatch(vocab_settings, lang, punctuation, stress, normalize, vocab)
    kept, tokens = _encode(good, tok, allow_unk, vocab, report, bad)
    _settle_bad_rows(bad, kept, skip_bad, report)

    df = _phonemes_frame(kept, tokens, lang)
    settings = _settings(lang, punctuation, stress, normalize, report.source)
    report.rows = len(kept)
    report.seconds = time.perf_counter() - start
    return PhonemizedCorpus(df, tok, settings, report)


def _phonemize_rows(rows: list[Row], texts: list[str], lang: str, punctuation: bool, stress: bool,
                    njobs: int | None, on_progress: Callable[[int], None] | None, report: PhonemizeReport,
                    bad: list[BadRow]) -> list[tuple[Row, str]]:
    """(row, phonemes) of the rows espeak-ng made phonemes of; the others go to ``bad``. ``njobs`` None
    runs parallel jobs only for big inputs on machines with 4+ cores."""
    if njobs is None:
        cores = os.cpu_count() or 1
        njobs = min(cores, 8) if len(texts) >= PARALLEL_FROM and cores >= 4 else 1
    phonemes, report.warnings = phonemize(texts, lang, punctuation, stress, njobs, on_progress)
    good = []
    for row, ph in zip(rows, phonemes, strict=True):
        if any(c.isalpha() for c in ph):
            good.append((row, ph))
        else:
            bad.append(BadRow(row.where, row.id, "espeak-ng made no phonemes of it"))
    return good


def _settle_bad_rows(bad: list[BadRow], kept: list[tuple[Row, str]], skip_bad: bool, report: PhonemizeReport) -> None:
    """Refuse bad rows unless ``skip_bad`` (then list them in the report), refuse an empty result, and warn
    about the characters normalisation removed."""
    if bad and not skip_bad:
        raise TextError(_describe_bad(bad) + " (fix them, or pass --skip-bad to leave them out)")
    report.skipped = bad
    if not kept:
        raise InputError(f"{report.source}: no usable utterances")
    if report.removed_chars:
        count, rows_hit = sum(report.removed_chars.values()), report.rows_with_removed_chars
        report.warnings.insert(0, f"removed {count} unspeakable character(s) from {rows_hit} row(s): "
                                  f"{describe_removed(report.removed_chars)}")


def _phonemes_frame(kept: list[tuple[Row, str]], tokens: list[list[int]], lang: str) -> Any:
    """polars DataFrame id, text, lang, phonemes, tokens (list[u16]): the rows of a phonemes file."""
    import polars as pl

    return pl.DataFrame(
        {"id": [r.id for r, _ in kept], "text": [" ".join(r.text.split()) for r, _ in kept],
         "lang": [lang] * len(kept), "phonemes": [p for _, p in kept], "tokens": tokens},
        schema={"id": pl.String, "text": pl.String, "lang": pl.String, "phonemes": pl.String,
                "tokens": pl.List(pl.UInt16)},
    )


def _prepare(rows: list[Row], lang: str, normalize: bool, report: PhonemizeReport,
             bad: list[BadRow]) -> tuple[list[Row], list[str]]:
    """Rows with unique ids and something speakable, and their prepared texts; the rest go to ``bad``."""
    kept, texts, first_seen = [], [], {}
    for row in rows:
        if row.id in first_seen:
            bad.append(BadRow(row.where, row.id, f"duplicate id (first at {first_seen[row.id]})"))
            continue
        first_seen[row.id] = row.where
        text, removed = prepare_text(row.text, lang, normalize)
        if removed:
            report.removed_chars.update(removed)
            report.rows_with_removed_chars += 1
        if not text:
            bad.append(BadRow(row.where, row.id, "nothing speakable left after normalisation"))
            continue
        kept.append(row)
        texts.append(text)
    return kept, texts


def _encode(rows: list[tuple[Row, str]], tok: Tokenizer, allow_unk: bool, vocab: Any, report: PhonemizeReport,
            bad: list[BadRow]) -> tuple[list[tuple[Row, str]], list[list[int]]]:
    """Token ids of each (row, phonemes); rows with symbols a reused vocabulary lacks go to ``bad``."""
    kept, tokens = [], []
    for row, ph in rows:
        ids = tok.encode(ph, allow_unk=True)
        if tok.unk_id is not None and tok.unk_id in ids:  # only a reused vocabulary can lack a symbol
            if not allow_unk:
                symbols = ", ".join(repr(s) for s in dict.fromkeys(tok.unknown_symbols(ph)))
                bad.append(BadRow(row.where, row.id, f"phoneme symbol(s) {symbols} not in the vocabulary of "
                                                     f"{vocab} (--allow-unk maps them to <unk>)"))
                continue
            report.unk_rows += 1
        kept.append((row, ph))
        tokens.append(ids)
    return kept, tokens


def _tokenizer(vocab: str | os.PathLike[str] | None, kind: str, phonemes: list[str],
               bpe_vocab_size: int) -> tuple[Tokenizer, dict[str, Any] | None]:
    """(tokenizer, settings of the vocab file or None): reuse --vocab, or build from the data."""
    if vocab is not None:
        from valle_cli.formats import read_phonemes

        _, meta = read_phonemes(vocab)
        return tokenizer_from_meta(meta["tokenizer"]), meta.get("settings", {})
    if kind == "bpe":
        return train_bpe(phonemes, bpe_vocab_size), None
    return PhonemeTokenizer.build(phonemes), None


def _settings_mismatch(old: dict[str, Any], lang: str, punctuation: bool, stress: bool, normalize: bool,
                       vocab: Any) -> list[str]:
    new = {"lang": lang, "punctuation": punctuation, "stress": stress, "normalize": normalize}
    diff = [f"{k} {old[k]!r} there, {v!r} here" for k, v in new.items() if k in old and old[k] != v]
    return [f"settings differ from the --vocab file {vocab}: {'; '.join(diff)}"] if diff else []


def _settings(lang: str, punctuation: bool, stress: bool, normalize: bool, source: str) -> dict[str, Any]:
    from importlib.metadata import version

    return {"lang": lang, "punctuation": punctuation, "stress": stress, "normalize": normalize,
            "backend": "espeak-ng", "espeak_version": espeak_version(),
            "phonemizer_version": version("phonemizer"), "source": source}


def _describe_bad(bad: list[BadRow], limit: int = 3) -> str:
    shown = "; ".join(str(b) for b in bad[:limit])
    more = f"; and {len(bad) - limit} more" if len(bad) > limit else ""
    return f"{len(bad)} bad row(s): {shown}{more}"


def text_to_tokens(text: str, meta: dict[str, Any], allow_unk: bool = False) -> tuple[str, list[int]]:
    """One sentence -> (phonemes, token ids) exactly as a phonemes file's metadata prescribes.

    ``meta`` is the metadata of a phonemes file (or a checkpoint's copy of it): 'tokenizer' and
    'settings'. This is how ``sample`` turns user text into the ids a model was trained on.
    """
    settings = meta.get("settings", {})
    lang = settings.get("lang", "en-us")
    prepared, _ = prepare_text(text, lang, settings.get("normalize", True))
    if not prepared:
        raise TextError(f"{text!r}: nothing speakable left after normalisation")
    punctuation, stress = settings.get("punctuation", True), settings.get("stress", True)
    (phonemes,), _ = phonemize([prepared], lang, punctuation, stress)
    if not any(c.isalpha() for c in phonemes):
        raise TextError(f"{text!r}: espeak-ng made no phonemes of it")
    return phonemes, tokenizer_from_meta(meta["tokenizer"]).encode(phonemes, allow_unk=allow_unk)
