"""examples/make_corpus.py: many distinct voices, unseen voices apart, held-out sentences with unseen words,
the same bytes for a seed whatever the worker count."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "examples"))
import make_corpus as mc  # noqa: E402


def _words(sentence: str) -> set[str]:
    return set(re.findall(r"[a-z]+", sentence.lower()))


def test_300_voices_are_distinct_and_spread_over_accents_variants_and_ranges():
    voices = mc.make_voices(300, seed=0)
    assert len({(v.name, v.pitch, v.pitch_range, v.rate) for v in voices}) == 300
    assert len({v.speaker for v in voices}) == 300 and voices[0].speaker == "spk000"
    accents = Counter(v.accent for v in voices)
    assert set(accents) == set(mc._ACCENTS) and max(accents.values()) - min(accents.values()) <= 1
    variants = Counter(v.variant for v in voices)
    assert set(variants) == set(mc._FEMALE + mc._MALE) and min(variants.values()) >= 300 // len(variants) - 1
    for lo, hi, values in ((*mc.PITCH, [v.pitch for v in voices]), (*mc.PITCH_RANGE, [v.pitch_range for v in voices]),
                           (*mc.RATE, [v.rate for v in voices])):
        assert lo <= min(values) and max(values) <= hi
        quarters = Counter(min(3, 4 * (x - lo) // (hi - lo + 1)) for x in values)
        assert min(quarters.values()) >= 70  # every quarter of the range has its ~75 voices
    assert mc.make_voices(6, seed=0)[0].speaker == "spk00"
    assert {v.variant in mc._FEMALE for v in mc.make_voices(6, seed=0)} == {True, False}


def test_voices_are_reproducible_and_depend_on_the_seed():
    assert mc.make_voices(40, seed=3) == mc.make_voices(40, seed=3)
    assert mc.make_voices(40, seed=3) != mc.make_voices(40, seed=4)


def test_unseen_voices_use_variants_no_training_voice_has():
    train = {v.variant for v in mc.make_voices(500, seed=0)}
    unseen = mc.make_unseen_voices(30, seed=0)
    assert {v.variant for v in unseen}.isdisjoint(train)
    assert len({v.variant for v in unseen}) == len(mc._UNSEEN_FEMALE + mc._UNSEEN_MALE)
    assert len({(v.name, v.pitch, v.pitch_range, v.rate) for v in unseen}) == 30
    assert unseen[0].speaker == "unseen00"


def test_every_word_is_in_the_judges_dictionary():
    pocketsphinx = pytest.importorskip("pocketsphinx")
    dictionary = Path(pocketsphinx.get_model_path()) / "en-us" / "cmudict-en-us.dict"
    known = {re.sub(r"\(\d+\)$", "", line.split(" ", 1)[0]) for line in dictionary.read_text().splitlines()}
    assert not (mc.training_words() | mc.held_out_words()) - known


def test_a_and_an_agree_with_the_next_word():
    for sentence in mc.make_sentences(2000, seed=0) + mc.make_held_out_sentences(500, seed=0):
        for article, word in re.findall(r"\b(an?) (\w+)", sentence.lower()):
            assert (article == "an") == word.startswith(tuple("aeiou")), sentence


def test_held_out_sentences_each_say_a_word_no_training_sentence_says():
    assert not mc.training_words() & mc.held_out_words()
    train = mc.make_sentences(6000, seed=0)
    spoken = set().union(*map(_words, train))
    assert spoken <= mc.training_words() and not spoken & mc.held_out_words()
    held_out = mc.make_held_out_sentences(600, seed=0)
    assert len(set(held_out)) == 600 and not set(held_out) & set(train)
    assert all(_words(s) - spoken for s in held_out)
    # about as long as the training sentences (2-4 s of speech)
    mean = lambda sentences: sum(len(s.split()) for s in sentences) / len(sentences)  # noqa: E731
    assert 8 <= mean(train) <= 12 and abs(mean(held_out) - mean(train)) < 1.5


def test_training_sentences_do_not_depend_on_how_many_are_drawn():
    assert mc.make_sentences(50, seed=1) == mc.make_sentences(80, seed=1)[:50]


def test_eval_speakers_are_spread_over_the_voice_list():
    voices = mc.make_voices(300, seed=0)
    picked = mc._evenly_spaced(voices, 30)
    assert len({v.speaker for v in picked}) == 30
    assert len({v.accent for v in picked}) == len(mc._ACCENTS)
    assert any(v.variant in mc._FEMALE for v in picked) and len({v.variant for v in picked}) == 30
    places = [voices.index(v) for v in picked]
    assert places == sorted(places) and max(b - a for a, b in zip(places, places[1:], strict=False)) <= 300 // 30 + 5
    assert mc._evenly_spaced(voices, None) == voices


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_eval_set_layout_unseen_prompts_and_bytes_whatever_the_workers(tmp_path):
    kwargs = dict(n_speakers=4, per_speaker=2, seed=0, eval_per_speaker=2, unseen_speakers=2, eval_speakers=2)
    mc.make_corpus(tmp_path / "a" / "corpus", eval_dir=tmp_path / "a" / "eval", workers=1, **kwargs)
    mc.make_corpus(tmp_path / "b" / "corpus", eval_dir=tmp_path / "b" / "eval", workers=3, **kwargs)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    corpus, eval_dir = tmp_path / "a" / "corpus", tmp_path / "a" / "eval"
    assert sorted(p.name for p in corpus.iterdir()) == ["speakers.tsv", "spk00", "spk01", "spk02", "spk03"]
    rows = [line.split("|") for line in (eval_dir / "rows.csv").read_text().splitlines()[1:]]
    prompts = {uid.rsplit("_eval", 1)[0]: prompt for uid, _, prompt in rows}
    # two of the four corpus voices, spread over the list, prompted by their first corpus file
    assert prompts == {"spk00": "../corpus/spk00/spk00_0000.wav", "spk02": "../corpus/spk02/spk02_0000.wav",
                       "unseen00": "prompts/unseen00/unseen00_prompt.wav",
                       "unseen01": "prompts/unseen01/unseen01_prompt.wav"}
    for speaker in ("unseen00", "unseen01"):  # the folder of the prompt names the voice (valle evaluate)
        prompt = eval_dir / "prompts" / speaker / f"{speaker}_prompt.wav"
        assert prompt.is_file() and prompt.with_suffix(".txt").is_file()
        assert not (corpus / speaker).exists()
    assert len(rows) == 8 and all((eval_dir / f"{uid}.wav").is_file() for uid, _, _ in rows)
    corpus_texts = {p.read_text().strip() for p in corpus.rglob("*.txt")}
    assert not corpus_texts & {text for _, text, _ in rows}
    table = [line.split("\t") for line in (eval_dir / "speakers.tsv").read_text().splitlines()]
    assert table[0][-1] == "seen" and {row[0]: row[-1] for row in table[1:]} == {
        "spk00": "1", "spk02": "1", "unseen00": "0", "unseen01": "0"}
    # a missing file is spoken again, the same bytes
    (corpus / "spk01" / "spk01_0001.wav").unlink()
    (eval_dir / "unseen01_eval00.wav").unlink()
    mc.make_corpus(corpus, eval_dir=eval_dir, workers=2, **kwargs)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")


def test_the_training_corpus_does_not_depend_on_the_eval_options(tmp_path):
    mc.make_corpus(tmp_path / "a", n_speakers=3, per_speaker=2, seed=5, workers=2)
    mc.make_corpus(tmp_path / "b", n_speakers=3, per_speaker=2, seed=5, workers=1, eval_dir=tmp_path / "eval",
                   eval_per_speaker=1, unseen_speakers=3, eval_speakers=1)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    mc.make_corpus(tmp_path / "c", n_speakers=3, per_speaker=2, seed=6, workers=2)
    assert _digests(tmp_path / "a") != _digests(tmp_path / "c")


def test_cli_refuses_a_negative_count(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "examples" / "make_corpus.py"), "-o", str(tmp_path / "c"),
                          "--unseen-speakers", "-1"], capture_output=True, timeout=60)
    assert res.returncode == 2 and b"--unseen-speakers must be >= 0" in res.stderr


def test_heard_eval_voices_are_of_accents_and_variants_the_judge_hears(tmp_path):
    unseen = mc.make_unseen_voices(8, seed=0, heard=True)
    assert all(mc.is_heard(v) for v in unseen) and len({v.speaker for v in unseen}) == 8
    assert {v.variant for v in unseen} <= set(mc._UNSEEN_FEMALE + mc._UNSEEN_MALE)
    assert mc.make_unseen_voices(8, seed=0) == mc.make_unseen_voices(8, seed=0, heard=False)  # the default: any
    corpus = mc.make_voices(40, seed=0)
    heard = [v.speaker for v in corpus if mc.is_heard(v)]
    assert 2 <= len(heard) < 40
    mc.make_corpus(tmp_path / "corpus", n_speakers=40, per_speaker=1, seed=0, eval_dir=tmp_path / "eval",
                   eval_per_speaker=1, unseen_speakers=2, eval_speakers=2, workers=2, eval_voices="heard")
    table = [line.split("\t") for line in (tmp_path / "eval" / "speakers.tsv").read_text().splitlines()[1:]]
    seen = [row[0] for row in table if row[-1] == "1"]
    assert len(seen) == 2 and set(seen) <= set(heard)
    assert all(row[1].split("+")[0] in mc.HEARD_ACCENTS and row[1].split("+")[1] in mc.HEARD_VARIANTS for row in table)
    # too few heard voices (a tiny corpus): the others make up the count
    few = mc._eval_speakers(corpus, len(heard) + 2, "heard")
    assert len(few) == len(heard) + 2 and {v.speaker for v in few} >= set(heard)
    assert mc._eval_speakers(corpus, None, "heard") == [v for v in corpus if mc.is_heard(v)]
    assert mc._eval_speakers(corpus, 5, "any") == mc._evenly_spaced(corpus, 5)
