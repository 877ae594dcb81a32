"""Token vocabularies over phoneme strings; each one lives in a phonemes file's metadata.

Two kinds, both rebuilt from that metadata by ``tokenizer_from_meta`` (so ``shard`` and ``sample``
get exactly the ids ``phonemize`` wrote):

* ``PhonemeTokenizer``: one id per IPA symbol. A symbol is a base character with the combining
  marks and spacing modifier letters that follow it (``aː``, ``ɔ̃``, ``tʲ``, ``n̩``; a tie bar
  joins two bases: ``t͡ʃ``); stress marks, spaces and punctuation are symbols of their own. Ids:
  the specials ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then a FIXED inventory of the
  symbols espeak-ng emits (so two corpora of one language share ids), then any further symbols
  found in the data, sorted.
* ``BpeTokenizer``: byte-level BPE over the UTF-8 of the phoneme strings, encoded by ``tiktoken``
  with a ranks table learned here from the corpus (``train_bpe``); all 256 bytes are ranks
  0..255, so any string encodes. Specials follow the ranks. Never downloads anything.

Ids always fit uint16.
"""

from __future__ import annotations

import base64
import hashlib
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any, Union

from valle_cli.errors import FormatError, TextError

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
MAX_VOCAB = 1 << 16  # ids are stored as uint16
TIE_BARS = "\u0361\u035c"
STRESS = "ˈˌ"

# ----------------------------------------------------------------------------- the fixed inventory
# NEVER reorder or remove an entry: trained models depend on these ids. Append new symbols at the end
# and bump INVENTORY_NAME only if the list is ever replaced.

INVENTORY_NAME = "espeak-ipa-1"
_VOWELS = "iyɨʉɯuɪʏʊeøɘɵɤoəɛœɜɞʌɔæɐaɶɑɒ"
_INVENTORY_GROUPS: tuple[Iterable[str], ...] = (
    " ",  # word separator
    ';:,.!?¡¿—…"«»“”(){}[]-\'',  # punctuation kept by the phonemizer, hyphen, apostrophe
    STRESS,
    "pbtdʈɖcɟkɡqɢʔmɱnɳɲŋɴʙrʀⱱɾɽɸβfvθðszʃʒʂʐçʝxɣχʁħʕhɦɬɮʋɹɻjɰlɭʎʟ",  # pulmonic consonants
    "ʍwɥʜʢʡɕʑɺɧɫɓɗʄɠʛʘǀǃǂǁg",  # other consonants, implosives, clicks, ASCII g
    _VOWELS,
    "ᵻɚɝ",  # espeak's reduced vowels
    "0123456789˥˦˧˨˩",  # tone numbers and letters (cmn, yue, vi, ...)
    [v + "ː" for v in _VOWELS + "ɚ"],  # long vowels
    [c + "ː" for c in "pbtdkɡcɟfvszʃʒlmnrɲʎ"],  # geminates
    [c + "ʲ" for c in "bdfɡklmnprstvzʃʒɾ"],  # palatalised
    ["ɑ̃", "ɛ̃", "œ̃", "ɔ̃", "ɐ̃", "ã", "ẽ", "ĩ", "õ", "ũ", "ʊ̃"],  # nasal vowels
    ["n̩", "l̩", "m̩", "r̩", "ŋ̩", "ɪ̯", "ʊ̯", "ɐ̯", "i̯", "u̯", "e̯", "o̯"],  # syllabic, non-syllabic
    ["t̪", "d̪", "n̪", "s̪", "l̪", "e̞", "o̞", "ä", "ɯᵝ", "r̝", "r̝̊", "pʰ", "tʰ", "kʰ", "cʰ", "kʷ", "ɡʷ"],
)
ESPEAK_INVENTORY: tuple[str, ...] = tuple(
    unicodedata.normalize("NFC", s) for group in _INVENTORY_GROUPS for s in group
)


def _attaches(ch: str) -> bool:
    """Combining marks and spacing modifier letters (ː ʲ ʰ ...) belong to the symbol before them."""
    cat = unicodedata.category(ch)
    return cat in ("Mn", "Me") or (cat == "Lm" and ch not in STRESS) or ch == "˞"


def split_symbols(phonemes: str) -> list[str]:
    """'tʃˈiːz' -> ['t', 'ʃ', 'ˈ', 'iː', 'z']; see the module docstring for what one symbol is."""
    symbols: list[str] = []
    join_next = False
    for ch in unicodedata.normalize("NFC", phonemes):
        if symbols and (join_next or (_attaches(ch) and symbols[-1] != " ")):
            symbols[-1] += ch
            join_next = False
        else:
            symbols.append(ch)
        if ch in TIE_BARS:
            join_next = True
    return symbols


# ----------------------------------------------------------------------------- phoneme vocabulary


class PhonemeTokenizer:
    """One id per phoneme symbol: specials, the fixed espeak inventory, then symbols of the data."""

    kind = "phoneme"

    def __init__(self, symbols: Sequence[str], inventory: str = INVENTORY_NAME):
        if tuple(symbols[: len(SPECIALS)]) != SPECIALS:
            raise FormatError(f"phoneme vocabulary must start with {', '.join(SPECIALS)}")
        if len(set(symbols)) != len(symbols):
            raise FormatError("phoneme vocabulary has duplicate symbols")
        if len(symbols) > MAX_VOCAB:
            raise TextError(f"{len(symbols)} phoneme symbols do not fit uint16 ids")
        self.symbols = list(symbols)
        self.inventory = inventory
        self.ids = {s: i for i, s in enumerate(self.symbols)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(len(SPECIALS))

    @classmethod
    def build(cls, phoneme_strings: Iterable[str]) -> PhonemeTokenizer:
        """Specials + the fixed inventory + every other symbol seen in the data (sorted)."""
        base = [*SPECIALS, *ESPEAK_INVENTORY]
        known = set(base)
        found = {s for text in phoneme_strings for s in split_symbols(text)} - known
        return cls(base + sorted(found))

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def unknown_symbols(self, phonemes: str) -> list[str]:
        return [s for s in split_symbols(phonemes) if s not in self.ids]

    def encode(self, phonemes: str, allow_unk: bool = False) -> list[int]:
        ids = []
        for s in split_symbols(phonemes):
            i = self.ids.get(s)
            if i is None:
                if not allow_unk:
                    raise TextError(f"phoneme symbol {s!r} ({_codepoints(s)}) is not in the vocabulary")
                i = self.unk_id
            ids.append(i)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Symbols back to a string; <pad>, <bos> and <eos> are dropped, <unk> is kept as text."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.symbols):
                raise TextError(f"token id {i} is outside the vocabulary (size {len(self.symbols)})")
            if i not in (self.pad_id, self.bos_id, self.eos_id):
                out.append(self.symbols[i])
        return "".join(out)

    def to_meta(self) -> dict[str, Any]:
        return {"type": self.kind, "inventory": self.inventory, "symbols": self.symbols,
                "specials": {s: i for i, s in enumerate(SPECIALS)}, "vocab_size": self.vocab_size}


def _codepoints(s: str) -> str:
    return " ".join(f"U+{ord(c):04X}" for c in s)


# ----------------------------------------------------------------------------- byte-level BPE

# Pre-tokenisation (tiktoken / fancy-regex syntax): a word with its leading space, a punctuation run.
BPE_PATTERN = r" ?[^\s\p{P}\p{S}]+| ?[\p{P}\p{S}]+|\s+"
BPE_SPECIALS = ("<pad>", "<bos>", "<eos>")


class BpeTokenizer:
    """Byte-level BPE through tiktoken; ranks are token ids, specials come right after them."""

    kind = "bpe"

    def __init__(self, ranks: Sequence[bytes], pat_str: str = BPE_PATTERN):
        if len(ranks) < 256 or sorted(ranks[:256]) != [bytes([b]) for b in range(256)]:
            raise FormatError("BPE ranks must start with all 256 single bytes")
        if len(ranks) + len(BPE_SPECIALS) > MAX_VOCAB:
            raise TextError(f"a BPE vocabulary of {len(ranks) + len(BPE_SPECIALS)} does not fit uint16 ids")
        self.ranks = list(ranks)
        self.pat_str = pat_str
        self.pad_id, self.bos_id, self.eos_id = range(len(ranks), len(ranks) + len(BPE_SPECIALS))
        self.unk_id = None
        self.specials = {s: len(ranks) + i for i, s in enumerate(BPE_SPECIALS)}
        self.name = "valle-bpe-" + hashlib.sha256(b"\n".join(self.ranks)).hexdigest()[:12]
        self._encoding: Any = None

    @property
    def encoding(self) -> Any:
        """The tiktoken.Encoding (built on first use; tiktoken is imported only here)."""
        if self._encoding is None:
            import tiktoken

            self._encoding = tiktoken.Encoding(
                name=self.name,
                pat_str=self.pat_str,
                mergeable_ranks={token: rank for rank, token in enumerate(self.ranks)},
                special_tokens=self.specials,
                explicit_n_vocab=self.vocab_size,
            )
        return self._encoding

    @property
    def vocab_size(self) -> int:
        return len(self.ranks) + len(BPE_SPECIALS)

    def unknown_symbols(self, phonemes: str) -> list[str]:
        return []  # every string has a byte encoding

    def encode(self, phonemes: str, allow_unk: bool = False) -> list[int]:
        return self.encoding.encode_ordinary(phonemes)

    def decode(self, ids: Iterable[int]) -> str:
        """Tokens back to a string; special tokens are dropped, broken UTF-8 becomes U+FFFD."""
        ranks = [int(i) for i in ids if int(i) < len(self.ranks)]
        return self.encoding.decode_bytes(ranks).decode("utf-8", errors="replace")

    def to_meta(self) -> dict[str, Any]:
        return {"type": self.kind, "name": self.name, "pat_str": self.pat_str,
                "ranks": [base64.b64encode(t).decode("ascii") for t in self.ranks],
                "specials": self.specials,
                "vocab_size": self.vocab_size}


def train_bpe(texts: Iterable[str], vocab_size: int = 512, pat_str: str = BPE_PATTERN) -> BpeTokenizer:
    """Learn byte-level BPE merges from phoneme strings; deterministic for the same input.

    ``vocab_size`` counts everything: 256 bytes + merges + 3 specials. Training stops early when
    no pair occurs twice. Classic BPE over the unique pre-tokenised chunks weighted by frequency:
    the most frequent adjacent pair is merged (ties: the smallest pair of byte strings), and only
    the chunks that contain it are recounted.
    """
    import regex

    n_ranks = vocab_size - len(BPE_SPECIALS)
    if n_ranks < 256:
        raise TextError(f"--bpe-vocab-size {vocab_size}: needs at least {256 + len(BPE_SPECIALS)} "
                        f"(256 bytes + {len(BPE_SPECIALS)} specials)")
    if vocab_size > MAX_VOCAB:
        raise TextError(f"--bpe-vocab-size {vocab_size}: token ids must fit uint16 (at most {MAX_VOCAB})")
    pattern = regex.compile(pat_str)
    chunks = Counter(c.encode("utf-8") for text in texts for c in pattern.findall(text))
    words = [[bytes([b]) for b in chunk] for chunk in chunks]
    counts = list(chunks.values())

    pairs: Counter[tuple[bytes, bytes]] = Counter()
    where: dict[tuple[bytes, bytes], set[int]] = {}
    for w, (word, n) in enumerate(zip(words, counts, strict=True)):
        for pair in pairwise(word):
            pairs[pair] += n
            where.setdefault(pair, set()).add(w)

    ranks = [bytes([b]) for b in range(256)]
    known = set(ranks)
    while len(ranks) < n_ranks and pairs:
        best, n = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if n < 2:
            break
        merged = best[0] + best[1]
        if merged not in known:
            known.add(merged)
            ranks.append(merged)
        for w in where.pop(best, ()):
            word, count = words[w], counts[w]
            for pair in pairwise(word):
                pairs[pair] -= count
                if pairs[pair] <= 0:
                    del pairs[pair]
            words[w] = word = _merge(word, best, merged)
            for pair in pairwise(word):
                pairs[pair] += count
                where.setdefault(pair, set()).add(w)
    return BpeTokenizer(ranks, pat_str)


def _merge(word: list[bytes], pair: tuple[bytes, bytes], merged: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


# ----------------------------------------------------------------------------- from metadata

Tokenizer = Union[PhonemeTokenizer, BpeTokenizer]  # noqa: UP007 - a runtime alias on python 3.10


def tokenizer_from_meta(meta: dict[str, Any]) -> Tokenizer:
    """Rebuild the tokenizer stored by ``phonemize`` (the ``tokenizer`` entry of the file metadata)."""
    kind = meta.get("type")
    try:
        if kind == PhonemeTokenizer.kind:
            return PhonemeTokenizer(meta["symbols"], meta.get("inventory", INVENTORY_NAME))
        if kind == BpeTokenizer.kind:
            return BpeTokenizer([base64.b64decode(t) for t in meta["ranks"]], meta["pat_str"])
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{kind} tokenizer metadata is incomplete or corrupt ({e})") from None
    raise FormatError(f"unknown tokenizer type {kind!r} (expected 'phoneme' or 'bpe')")
