"""Text clean-up before phonemizing: unspeakable characters (any language) and English normalisation.

``clean_text`` removes what no phonemizer can speak (emoji, control and private-use characters,
pictographic symbols like ©) and reports what it removed. ``normalize_english`` spells out what
espeak-ng reads badly or not at all: numbers (cardinals, negatives, decimals, ordinals, years,
decades, currency, percentages, clock times), common abbreviations, ``&``, typographic quotes
and dashes. Pure Python, no dependencies; every rule is a regular expression applied in order.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

# ----------------------------------------------------------------------------- unspeakable characters

_KEEP_FORMAT = {"\u200c"}  # zero-width non-joiner: spelling in Persian, Hindi, ...
# variation selectors and the keycap mark: they only decorate the emoji they follow
_DROP_ALWAYS = set(range(0xFE00, 0xFE10)) | set(range(0xE0100, 0xE01F0)) | {0x20E3}
_CJK_PUNCT = str.maketrans({"。": ".", "、": ",", "，": ",", "！": "!", "？": "?", "：": ":", "；": ";"})


def _unspeakable(ch: str) -> bool:
    if ord(ch) in _DROP_ALWAYS:
        return True
    cat = unicodedata.category(ch)
    if cat[0] == "C":  # control, format, private use, surrogate, unassigned
        return ch not in _KEEP_FORMAT
    if cat == "So":  # emoji, ©, ®, arrows drawn as pictographs, ...
        return True
    return cat in ("Sm", "Sk") and ord(ch) > 0x7F  # non-ASCII maths and modifier symbols (→, ±, skin tones)


def clean_text(text: str) -> tuple[str, Counter[str]]:
    """Remove unspeakable characters and collapse whitespace; returns (text, removed character counts).

    A combining mark whose base character was removed goes with it (emoji + variation selector).
    Whitespace of any kind becomes one space; it is never counted as removed.
    """
    removed: Counter[str] = Counter()
    out: list[str] = []
    dropped_base = False
    for ch in text.translate(_CJK_PUNCT):
        if ch.isspace():
            out.append(" ")
            dropped_base = False
        elif _unspeakable(ch) or (dropped_base and unicodedata.category(ch) in ("Mn", "Me")):
            removed[ch] += 1
            dropped_base = True
        else:
            out.append(ch)
            dropped_base = False
    return " ".join("".join(out).split()), removed


def describe_removed(removed: Counter[str], limit: int = 8) -> str:
    """'😀' U+1F600 x3, '©' U+00A9 x1, ... for a warning line."""
    parts = [f"{ch!r} U+{ord(ch):04X} x{n}" for ch, n in removed.most_common(limit)]
    if len(removed) > limit:
        parts.append(f"and {len(removed) - limit} more kinds")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- numbers as words

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = ["", "thousand", "million", "billion", "trillion", "quadrillion"]
_ORDINAL_WORDS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                  "nine": "ninth", "twelve": "twelfth"}


def _below_thousand(n: int) -> str:
    words = []
    if n >= 100:
        words.append(f"{_ONES[n // 100]} hundred")
        n %= 100
    if n >= 20:
        words.append(_TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else ""))
    elif n or not words:
        words.append(_ONES[n])
    return " ".join(words)


def digits_to_words(digits: str) -> str:
    """'007' -> 'zero zero seven'."""
    return " ".join(_ONES[int(d)] for d in digits)


def cardinal(n: int) -> str:
    """1234567 -> 'one million two hundred thirty-four thousand five hundred sixty-seven'."""
    if n < 0:
        return f"minus {cardinal(-n)}"
    if n >= 1000 ** len(_SCALES):
        return digits_to_words(str(n))
    if n < 1000:
        return _below_thousand(n)
    groups = []
    scale = 0
    while n:
        n, part = divmod(n, 1000)
        if part:
            groups.append(f"{_below_thousand(part)} {_SCALES[scale]}".strip())
        scale += 1
    return " ".join(reversed(groups))


def ordinal(n: int) -> str:
    """23 -> 'twenty-third'."""
    words = cardinal(n)
    head, sep, last = words.rpartition(" ")
    stem, hyphen, unit = last.rpartition("-")
    if unit in _ORDINAL_WORDS:
        unit = _ORDINAL_WORDS[unit]
    elif unit.endswith("y"):
        unit = unit[:-1] + "ieth"
    else:
        unit += "th"
    return f"{head}{sep}{stem}{hyphen}{unit}"


def year(n: int) -> str:
    """1984 -> 'nineteen eighty-four', 1905 -> 'nineteen oh five', 2005 -> 'two thousand five'."""
    if 2000 <= n < 2010 or n % 1000 == 0:
        return cardinal(n)
    century, rest = divmod(n, 100)
    if rest == 0:
        return f"{cardinal(century)} hundred"
    return f"{cardinal(century)} {'oh ' if rest < 10 else ''}{cardinal(rest)}"


def _plural(words: str) -> str:
    return words[:-1] + "ies" if words.endswith("y") else words + "s"


def _decimal(number: str) -> str:
    """'3.14' -> 'three point one four'; '1,000.5' -> 'one thousand point five'."""
    whole, _, frac = number.replace(",", "").partition(".")
    words = cardinal(int(whole)) if whole else ""
    if frac:
        words = f"{words} point {digits_to_words(frac)}".strip()
    return words


def _integer(number: str) -> str:
    digits = number.replace(",", "")
    if len(digits) > 1 and digits.startswith("0"):
        return digits_to_words(digits)
    n = int(digits)
    if "," not in number and len(digits) == 4 and 1100 <= n <= 2099:
        return year(n)
    return cardinal(n)


# ----------------------------------------------------------------------------- currency, times, ...

_CURRENCIES = {"$": ("dollar", "dollars", "cent", "cents"), "£": ("pound", "pounds", "penny", "pence"),
               "€": ("euro", "euros", "cent", "cents"), "¥": ("yen", "yen", "sen", "sen")}
_SCALE_WORDS = {"k": "thousand", "thousand": "thousand", "m": "million", "mn": "million",
                "million": "million", "b": "billion", "bn": "billion", "billion": "billion",
                "trillion": "trillion"}
_AM_PM = r"(?P<ap>[AaPp])\.?[Mm]\b(?:\.(?!\s*$))?"  # am, p.m. (a final full stop stays: it ends the sentence)
_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+"  # 1,234.5 | 12.5 | .5
_MINUS = r"(?<![\w.,])-"  # a minus sign, not a hyphen inside a word or range


def _money(m: re.Match[str]) -> str:
    one, many, sub_one, sub_many = _CURRENCIES[m["cur"]]
    amount, scale = m["amount"], m["scale"]
    if scale:
        return f"{_decimal(amount)} {_SCALE_WORDS[scale.lower()]} {many}"
    whole, _, frac = amount.replace(",", "").partition(".")
    if len(frac) > 2:
        return f"{_decimal(amount)} {many}"
    units, cents = int(whole or 0), int(frac.ljust(2, "0")) if frac else 0
    parts = []
    if units or not cents:
        parts.append(f"{cardinal(units)} {one if units == 1 else many}")
    if cents:
        parts.append(f"{cardinal(cents)} {sub_one if cents == 1 else sub_many}")
    return " and ".join(parts)


def _clock(m: re.Match[str]) -> str:
    hour, minute = int(m["h"]), int(m["m"])
    suffix = f" {m['ap'][0].lower()} m" if m["ap"] else ""
    if minute == 0:
        return f"{cardinal(hour)}{suffix or ' o clock'}"
    return f"{cardinal(hour)} {'oh ' if minute < 10 else ''}{cardinal(minute)}{suffix}"


def _spaced(words: str, m: re.Match[str]) -> str:
    """Keep a number that touched letters ('3D', 'MP3') a separate word once spelled out."""
    text = m.string
    before = " " if m.start() > 0 and text[m.start() - 1].isalpha() else ""
    after = " " if m.end() < len(text) and text[m.end()].isalpha() else ""
    return f"{before}{words}{after}"


_NUMBER_RULES: list[tuple[re.Pattern[str], object]] = [
    (re.compile(rf"(?P<cur>[$£€¥])\s?(?P<amount>{_NUM})(?:\s?(?P<scale>thousand|million|billion|trillion"
                r"|bn|mn|[kKmMbB])\b)?"), _money),
    (re.compile(rf"(?P<n>(?:{_MINUS})?(?:{_NUM}))\s?%"), lambda m: f"{_signed(m['n'])} percent"),
    (re.compile(rf"\b(?P<h>[01]?\d|2[0-4]):(?P<m>[0-5]\d)(?::[0-5]\d)?(?:\s?{_AM_PM})?"), _clock),
    (re.compile(rf"\b(?P<h>1[0-2]|0?[1-9])\s?{_AM_PM}"),
     lambda m: f"{cardinal(int(m['h']))} {m['ap'].lower()} m"),
    (re.compile(r"(?P<n>\d+)(?:st|nd|rd|th)\b", re.IGNORECASE), lambda m: ordinal(int(m["n"]))),
    (re.compile(r"\b(?P<n>\d{4})'?s\b"),
     lambda m: _plural(year(int(m["n"])) if 1100 <= int(m["n"]) <= 2099 else cardinal(int(m["n"])))),
    (re.compile(rf"{_MINUS}(?P<n>{_NUM})"), lambda m: f"minus {_number(m['n'])}"),
    (re.compile(rf"(?P<n>{_NUM})"), lambda m: _number(m["n"])),
]


def _number(text: str) -> str:
    return _decimal(text) if "." in text else _integer(text)


def _signed(text: str) -> str:
    return f"minus {_number(text[1:])}" if text.startswith("-") else _number(text)


# ----------------------------------------------------------------------------- abbreviations, symbols

_ABBREVIATIONS = {
    "mr": "mister", "mrs": "misses", "ms": "miz", "dr": "doctor", "prof": "professor", "jr": "junior",
    "sr": "senior", "mt": "mount", "ft": "fort", "gen": "general", "capt": "captain", "lt": "lieutenant",
    "col": "colonel", "sgt": "sergeant", "rev": "reverend", "hon": "honorable", "gov": "governor",
    "sen": "senator", "rep": "representative", "ave": "avenue", "blvd": "boulevard", "co": "company",
    "corp": "corporation", "inc": "incorporated", "ltd": "limited", "dept": "department",
    "approx": "approximately", "vs": "versus", "etc": "et cetera",
}
_MONTHS = {"jan": "january", "feb": "february", "mar": "march", "apr": "april", "jun": "june", "jul": "july",
           "aug": "august", "sep": "september", "sept": "september", "oct": "october", "nov": "november",
           "dec": "december"}


def _alternation(words: dict[str, str]) -> str:
    return "|".join(sorted(words, key=len, reverse=True))


_ABBREVIATION_RE = re.compile(rf"\b({_alternation(_ABBREVIATIONS)})\.", re.IGNORECASE)
_MONTH_RE = re.compile(rf"\b({_alternation(_MONTHS)})\.(?=\s*\d)", re.IGNORECASE)  # 'Jan. 5', not 'met Jan.'
_LATIN_RE = [(re.compile(r"\be\.\s?g\.", re.IGNORECASE), "for example"),
             (re.compile(r"\bi\.\s?e\.", re.IGNORECASE), "that is"),
             (re.compile(r"\ba\.\s?k\.\s?a\.", re.IGNORECASE), "also known as")]
_NUMBER_ABBR_RE = re.compile(r"\b[Nn]os?\.\s?(?=\d)")
_ST_RE = re.compile(r"\bSt\.")
_RANGE_RE = re.compile(r"(\d)\s?–\s?(?=\d)")  # en dash between numbers: 1990–1995

_TYPOGRAPHY = str.maketrans({"‘": "'", "’": "'", "‚": "'", "‛": "'", "′": "'", "“": '"', "”": '"', "„": '"',
                             "‟": '"', "″": '"', "«": '"', "»": '"', "‐": "-", "‑": "-", "‒": "-", "−": "-",
                             "–": " - ", "—": " -- ", "―": " -- "})


def _sentence_end(replacement: str, m: re.Match[str]) -> str:
    """An abbreviation that ends the text keeps its full stop as the sentence end."""
    return replacement + ("." if m.end() == len(m.string.rstrip()) else "")


def _saint_or_street(m: re.Match[str]) -> str:
    """'St. John' -> saint; 'Baker St.' (after a capitalised word) -> street."""
    before = m.string[: m.start()].split()
    after = m.string[m.end():].split()
    after_name = bool(before) and before[-1][:1].isupper() and before[-1].isalpha()
    if not after_name and after and after[0][:1].isupper():
        return "saint"
    return _sentence_end("street", m)


def normalize_english(text: str) -> str:
    """Spell out an English transcript for espeak-ng; see the module docstring for the rules."""
    text = unicodedata.normalize("NFKC", text)
    text = _RANGE_RE.sub(r"\1 to ", text).translate(_TYPOGRAPHY)
    text = re.sub(r"\s*(?:--+|\s-\s)\s*", ", ", text)  # a dash used as a pause
    for pattern, words in _LATIN_RE:
        text = pattern.sub(lambda m, w=words: _sentence_end(w, m), text)
    text = _ST_RE.sub(_saint_or_street, text)
    text = _NUMBER_ABBR_RE.sub("number ", text)
    text = _MONTH_RE.sub(lambda m: _MONTHS[m[1].lower()], text)
    text = _ABBREVIATION_RE.sub(lambda m: _sentence_end(_ABBREVIATIONS[m[1].lower()], m), text)
    text = re.sub(r"\s*&\s*", " and ", text)
    for pattern, spell in _NUMBER_RULES:
        text = pattern.sub(lambda m, f=spell: _spaced(f(m), m), text)  # type: ignore[operator]
    text = re.sub(r"\s+([,.!?;:])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    text = re.sub(r"([,;:])(?=[^\s\d\"')\]])", r"\1 ", text)  # 'one,two' -> 'one, two'
    return " ".join(text.split()).strip(" ,")
