"""Text stage as a library: normalisation, espeak phonemes, symbol segmentation, tokenizers, readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from valle_cli.errors import InputError, TextError
from valle_cli.text.normalize import cardinal, clean_text, normalize_english, ordinal, year
from valle_cli.text.phonemize import phonemize, phonemize_corpus, read_transcripts, text_to_tokens
from valle_cli.text.tokenizers import (
    ESPEAK_INVENTORY,
    SPECIALS,
    BpeTokenizer,
    PhonemeTokenizer,
    split_symbols,
    tokenizer_from_meta,
    train_bpe,
)

# ----------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("text, expected", [
    ("I have 3 cats.", "I have three cats."),
    ("It cost 1,234,567 dollars",
     "It cost one million two hundred thirty-four thousand five hundred sixty-seven dollars"),
    ("It is -5 degrees", "It is minus five degrees"),
    ("pi is 3.14", "pi is three point one four"),
    ("the 1st, 2nd, 3rd and 23rd", "the first, second, third and twenty-third"),
    ("the 101st and 12th", "the one hundred first and twelfth"),
    ("in 1984 and 1905", "in nineteen eighty-four and nineteen oh five"),
    ("in 2005 and 2024", "in two thousand five and twenty twenty-four"),
    ("the 1980s", "the nineteen eighties"),
    ("$5.50 each", "five dollars and fifty cents each"),
    ("only $1", "only one dollar"),
    ("£3 and €1.01", "three pounds and one euro and one cent"),
    ("$0.99", "ninety-nine cents"),
    ("$1.5 million", "one point five million dollars"),
    ("50% off", "fifty percent off"),
    ("at 10:30 or 10:05", "at ten thirty or ten oh five"),
    ("at 10:00", "at ten o clock"),
    ("by 7pm", "by seven p m"),
    ("Mr. Smith & Dr. Jones", "mister Smith and doctor Jones"),
    ("Mrs. Brown vs. St. John", "misses Brown versus saint John"),
    ("Baker St. is long", "Baker street is long"),
    ("apples, pears, etc.", "apples, pears, et cetera."),
    ("fruit, e.g. apples, i.e. food", "fruit, for example apples, that is food"),
    ("No. 5", "number five"),
    ("“Hi” — he said… ‘ok’", '"Hi", he said... \'ok\''),
    ("pages 10–20", "pages ten to twenty"),
    ("ＦＵＬＬ width", "FULL width"),
    ("MP3 player", "MP three player"),
    ("007", "zero zero seven"),
])
def test_normalize_english(text, expected):
    assert normalize_english(text) == expected


def test_number_words():
    assert cardinal(0) == "zero"
    assert cardinal(100) == "one hundred"
    assert cardinal(1_000_001) == "one million one"
    assert cardinal(10**18) == " ".join(["one"] + ["zero"] * 18)  # beyond quadrillions: digit by digit
    assert ordinal(40) == "fortieth" and ordinal(1000) == "one thousandth"
    assert year(1900) == "nineteen hundred" and year(2000) == "two thousand" and year(2010) == "twenty ten"


def test_clean_text_removes_unspeakable_characters():
    text, removed = clean_text("hello 😀 world ©\x00 1️⃣\tok 👍🏽")
    assert text == "hello world 1 ok"
    assert removed["😀"] == 1 and removed["©"] == 1 and removed["\x00"] == 1
    assert "\ufe0f" in removed and "\U0001f3fd" in removed  # emoji decorations go with the emoji
    assert clean_text("naïve café, 你好。")[0] == "naïve café, 你好."  # letters of any script stay


# ----------------------------------------------------------------------------- espeak


def test_phonemes_of_a_known_sentence_keep_stress_and_punctuation():
    (ph,), warnings = phonemize(["Hello, world! How are you?"])
    assert ph == "həlˈoʊ, wˈɜːld! hˈaʊ ɑːɹ juː?"
    assert not warnings
    (plain,), _ = phonemize(["Hello, world!"], punctuation=False, stress=False)
    assert plain == "həloʊ wɜːld"


def test_unknown_language_is_one_line_error():
    with pytest.raises(TextError, match="--list-langs"):
        phonemize(["hi"], lang="xx-nope")


# ----------------------------------------------------------------------------- symbols & vocabularies


def test_split_symbols_attaches_diacritics_and_length():
    assert split_symbols("tʃˈiːz") == ["t", "ʃ", "ˈ", "iː", "z"]
    assert split_symbols("bɔ̃ʒˈuʁ nʲet") == ["b", "ɔ̃", "ʒ", "ˈ", "u", "ʁ", " ", "nʲ", "e", "t"]
    assert split_symbols("bʌʔn̩") == ["b", "ʌ", "ʔ", "n̩"]
    assert split_symbols("t͡ʃa") == ["t͡ʃ", "a"]  # a tie bar joins two bases
    assert split_symbols("ũ") == split_symbols("u\u0303") == ["ũ"]  # NFC either way


def test_inventory_is_unique_and_vocab_ids_do_not_move():
    assert len(set(ESPEAK_INVENTORY)) == len(ESPEAK_INVENTORY)
    assert all(split_symbols(s) == [s] for s in ESPEAK_INVENTORY if s != " ")
    small = PhonemeTokenizer.build(["həlˈoʊ"])
    big = PhonemeTokenizer.build(["həlˈoʊ", "ʘ̃ x˞ ǃǃ", "ⱱ̥"])
    assert small.symbols[:4] == list(SPECIALS) == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert small.symbols == [*SPECIALS, *ESPEAK_INVENTORY]  # nothing outside the inventory
    assert big.symbols[: small.vocab_size] == small.symbols  # data symbols only append
    extras = big.symbols[small.vocab_size:]
    assert extras == sorted(extras) and "ʘ̃" in extras and "ⱱ̥" in extras
    assert small.ids[" "] == 4 and small.ids["ˈ"] == 28 and small.ids["ə"] == 126  # pinned ids
    assert big.decode(big.encode("ʘ̃ x")) == "ʘ̃ x"


def test_phoneme_tokenizer_unknowns():
    tok = PhonemeTokenizer.build(["abc"])
    with pytest.raises(TextError, match="'ⱱ̥'"):
        tok.encode("aⱱ̥")
    ids = tok.encode("aⱱ̥", allow_unk=True)
    assert ids[-1] == tok.unk_id
    assert tok.decode([tok.bos_id, *tok.encode("ab"), tok.eos_id, tok.pad_id]) == "ab"


def test_bpe_trainer_and_tiktoken_round_trip():
    corpus = ["həlˈoʊ, wˈɜːld! hˌaʊ ɑːɹ juː?", "ðə kwˈɪk bɹˈaʊn fˈɑːks dʒˈʌmps ˈoʊvɚ ðə lˈeɪzi dˈɑːɡ."] * 20
    tok = train_bpe(corpus, vocab_size=300)
    assert tok.vocab_size == 300 and len(tok.ranks) == 297
    assert train_bpe(corpus, vocab_size=300).ranks == tok.ranks  # deterministic
    for text in [*corpus[:2], "never seen: 漢字 😀 <eos> \x00", ""]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < 297 for i in ids)  # special tokens never come out of ordinary text
    assert len(tok.encode(corpus[1])) < len(corpus[1].encode())  # merges compress
    assert tok.specials == {"<pad>": 297, "<bos>": 298, "<eos>": 299}
    with pytest.raises(TextError):
        train_bpe(corpus, vocab_size=100)
    with pytest.raises(TextError):
        train_bpe(corpus, vocab_size=70_000)


@pytest.mark.parametrize("kind", ["phoneme", "bpe"])
def test_tokenizer_meta_round_trip(kind):
    corpus = ["həlˈoʊ wˈɜːld", "ʘ̃ hˈaʊ"] * 5
    tok = PhonemeTokenizer.build(corpus) if kind == "phoneme" else train_bpe(corpus, 270)
    meta = json.loads(json.dumps(tok.to_meta()))  # what the parquet metadata holds
    again = tokenizer_from_meta(meta)
    assert type(again) is type(tok) and again.vocab_size == tok.vocab_size == meta["vocab_size"]
    assert again.to_meta() == tok.to_meta()
    assert again.encode(corpus[1]) == tok.encode(corpus[1])
    assert isinstance(tokenizer_from_meta(BpeTokenizer(tok.ranks).to_meta()) if kind == "bpe" else again,
                      type(tok))


# ----------------------------------------------------------------------------- reading transcripts


def test_read_text_file_ids_and_blank_lines(tmp_path):
    f = tmp_path / "lines.txt"
    f.write_text("first line\n\n  \nsecond line\n")
    got = read_transcripts(f)
    assert [(r.id, r.text) for r in got.rows] == [("lines-000001", "first line"),
                                                  ("lines-000004", "second line")]
    assert got.blank_lines == 2 and not got.bad


def test_read_tables(tmp_path):
    lj = tmp_path / "metadata.csv"
    lj.write_text('LJ001-0001|Printing, in "the" only sense|Printing, in "the" only sense\n'
                  "LJ001-0002|in 1984 now|in nineteen eighty-four now\n")
    assert [(r.id, r.text) for r in read_transcripts(lj).rows] == [
        ("LJ001-0001", 'Printing, in "the" only sense'), ("LJ001-0002", "in nineteen eighty-four now")]
    f5 = tmp_path / "f5.csv"
    f5.write_text("audio_file|text\nwavs/a/b.wav|hello there\n./c.flac|bye\n")
    assert [(r.id, r.text) for r in read_transcripts(f5).rows] == [("wavs/a/b", "hello there"), ("c", "bye")]
    tsv = tmp_path / "list.tsv"
    tsv.write_text("u1\thi there\nu2\t\n")
    got = read_transcripts(tsv)
    assert [(r.id, r.text) for r in got.rows] == [("u1", "hi there")]
    assert [(b.id, b.reason) for b in got.bad] == [("u2", "empty transcript")]
    assert "list.tsv:2" in got.bad[0].where
    piped = tmp_path / "filelist.txt"  # a .txt whose every line has a '|' is a table too
    piped.write_text("x/y.wav|one\nz|two\n")
    assert [r.id for r in read_transcripts(piped).rows] == ["x/y", "z"]
    comma = tmp_path / "c.csv"
    comma.write_text('id,text\nq1,"hello, world"\n')
    assert [(r.id, r.text) for r in read_transcripts(comma).rows] == [("q1", "hello, world")]


def test_read_folder(tmp_path):
    (tmp_path / "spk1").mkdir()
    (tmp_path / "spk1" / "utt01.wav").write_bytes(b"")
    (tmp_path / "spk1" / "utt01.txt").write_text("hello\nthere\n")
    (tmp_path / "spk1" / "utt02.flac").write_bytes(b"")
    (tmp_path / "spk1" / "utt02.lab").write_text("from a lab file")
    (tmp_path / "spk1" / "utt03.wav").write_bytes(b"")  # no transcript
    (tmp_path / "libri").mkdir()
    (tmp_path / "libri" / "a_1.wav").write_bytes(b"")
    (tmp_path / "libri" / "a_1.original.txt").write_text("Original Text")
    (tmp_path / "libri" / "a_1.normalized.txt").write_text("normalized text")
    (tmp_path / "orphan.txt").write_text("a transcript without audio")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("skipped")
    got = read_transcripts(tmp_path)
    assert [(r.id, r.text) for r in got.rows] == [
        ("libri/a_1", "normalized text"), ("orphan", "a transcript without audio"),
        ("spk1/utt01", "hello there"), ("spk1/utt02", "from a lab file")]
    assert got.audio_without_text == ["spk1/utt03"] and got.text_without_audio == 1


def test_missing_input_is_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_transcripts(tmp_path / "nope.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="latin1.txt:1: not UTF-8"):
        read_transcripts(tmp_path / "latin1.txt")


# ----------------------------------------------------------------------------- the whole stage


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_phonemize_corpus_rows_and_report(tmp_path):
    src = _write(tmp_path / "t.txt", "Hello, world!\n\nI paid $5 😀 today.\nHello, world!\n")
    result = phonemize_corpus(src)
    df = result.df
    assert df.columns == ["id", "text", "lang", "phonemes", "tokens"]
    assert df["id"].to_list() == ["t-000001", "t-000003", "t-000004"]
    assert df["phonemes"][0] == "həlˈoʊ, wˈɜːld!"
    assert "fˈaɪv dˈɑːlɚz" in df["phonemes"][1]
    assert df["tokens"][0].to_list() == result.tokenizer.encode(df["phonemes"][0])
    assert result.report.blank_lines == 1 and result.report.rows == 3
    assert any("😀" in w for w in result.report.warnings)
    assert result.settings["espeak_version"].startswith("1.52") and result.settings["lang"] == "en-us"
    # the same sentence through the path `sample` uses gives the same ids
    meta = {"tokenizer": result.tokenizer_meta, "settings": result.settings}
    assert text_to_tokens("Hello, world!", meta)[1] == df["tokens"][0].to_list()


def test_bad_rows_stop_the_run_or_are_skipped(tmp_path):
    src = _write(tmp_path / "m.csv", "a|fine text\nb|\nc|😀😀\n")
    with pytest.raises(TextError) as err:
        phonemize_corpus(src)
    message = str(err.value)
    assert "2 bad row(s)" in message and "m.csv:2 [b] empty transcript" in message
    assert "m.csv:3 [c] nothing speakable" in message
    assert "\n" not in message and "--skip-bad" in message
    result = phonemize_corpus(src, skip_bad=True)
    assert result.df["id"].to_list() == ["a"] and len(result.report.skipped) == 2


def test_vocab_reuse_gives_identical_ids_and_names_unknown_symbols(tmp_path):
    from valle_cli.formats import write_phonemes

    first = phonemize_corpus(_write(tmp_path / "a.txt", "The cat sat.\n"))
    vocab = tmp_path / "a.parquet"
    write_phonemes(vocab, first.df, first.tokenizer_meta, first.settings)
    again = phonemize_corpus(_write(tmp_path / "b.txt", "The cat sat.\n"), vocab=vocab)
    assert again.tokenizer_meta == first.tokenizer_meta
    assert again.df["tokens"].to_list() == first.df["tokens"].to_list()

    small = PhonemeTokenizer([*SPECIALS, " ", "ð", "ə"])  # a vocabulary that lacks most symbols
    write_phonemes(vocab, first.df, small.to_meta(), first.settings)
    with pytest.raises(TextError, match=r"b.txt:1 \[b-000001\] phoneme symbol\(s\) 'k'"):
        phonemize_corpus(tmp_path / "b.txt", vocab=vocab)
    unk = phonemize_corpus(tmp_path / "b.txt", vocab=vocab, allow_unk=True)
    assert unk.report.unk_rows == 1 and small.unk_id in unk.df["tokens"][0].to_list()


def test_bpe_corpus_and_duplicate_ids(tmp_path):
    src = _write(tmp_path / "d.tsv", "x\tone two three\ny\tfour five\nx\tagain\n")
    with pytest.raises(TextError, match="duplicate id"):
        phonemize_corpus(src)
    result = phonemize_corpus(src, tokenizer="bpe", bpe_vocab_size=280, skip_bad=True)
    assert isinstance(result.tokenizer, BpeTokenizer)
    for ph, ids in zip(result.df["phonemes"], result.df["tokens"].to_list(), strict=True):
        assert result.tokenizer.decode(ids) == ph
