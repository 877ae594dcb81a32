"""Reading transcripts: a text file, an id|text table, a corpus folder, or lines on stdin.

``read_transcripts`` returns rows (id, text, where) plus what did not make a row: blank lines
(counted), bad rows (an empty transcript, a malformed table line), audio files without a
transcript. Ids follow one rule per input kind so they join with the codes ``quantize`` writes:
a folder gives the audio path relative to the folder without extension (``spk1/utt01``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from valle_cli.errors import InputError
from valle_cli.formats import STDIO, display_name, read_input_bytes

TABLE_DELIMITERS = {".csv": None, ".tsv": "\t", ".psv": "|"}  # None: sniff '|', tab, then ','
# transcript file endings, the preferred one first when several share a stem (LibriTTS has two)
TRANSCRIPT_SUFFIXES = (".normalized.txt", ".txt", ".lab", ".original.txt")
_ID_HEADERS = {"id", "utt", "utt_id", "name", "file", "filename", "path", "audio", "audio_file", "audio_path",
               "wav"}
_TEXT_HEADERS = {"text", "transcript", "transcription", "sentence", "normalized_text", "normalised_text"}


@dataclass
class Row:
    id: str
    text: str
    where: str  # file:line (or the transcript file) for messages


@dataclass
class BadRow:
    where: str
    id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where} [{self.id}] {self.reason}" if self.id else f"{self.where} {self.reason}"


@dataclass
class Transcripts:
    rows: list[Row]
    bad: list[BadRow] = field(default_factory=list)
    blank_lines: int = 0
    audio_without_text: list[str] = field(default_factory=list)
    text_without_audio: int = 0


def read_transcripts(source: str | os.PathLike[str]) -> Transcripts:
    """Rows of a text file (one utterance a line), an id|text table, a corpus folder, or '-' (stdin).

    A file ending in .csv/.tsv/.psv is a table; any other file (and stdin) is a table when every
    non-blank line holds a '|', else plain lines with ids ``<stem>-<line, 6 digits>``.
    """
    if str(source) != STDIO and Path(source).is_dir():
        return _read_folder(Path(source))
    name = display_name(source)
    text = _decode(read_input_bytes(source), name)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [line.rstrip("\r") for line in lines]
    suffix = "" if str(source) == STDIO else Path(source).suffix.lower()
    if suffix in TABLE_DELIMITERS:
        return _read_table(lines, name, TABLE_DELIMITERS[suffix])
    if any(line.strip() for line in lines) and all("|" in line for line in lines if line.strip()):
        return _read_table(lines, name, "|")
    stem = "stdin" if str(source) == STDIO else Path(source).stem
    out = Transcripts(rows=[])
    for number, line in enumerate(lines, 1):
        if line.strip():
            out.rows.append(Row(f"{stem}-{number:06d}", line, f"{name}:{number}"))
        else:
            out.blank_lines += 1
    return out


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{_where_not_utf8(data, e, name)}: {_not_utf8(data, e)}") from None


def _where_not_utf8(data: bytes, error: UnicodeDecodeError, name: str) -> str:
    line = data[: error.start].count(b"\n") + 1
    return f"{name}:{line}"


def _not_utf8(data: bytes, error: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start})"


def _read_table(lines: list[str], name: str, delimiter: str | None) -> Transcripts:
    """id|text, id|text|normalized text (LJSpeech), audio_path|text (F5, header optional), tab or comma."""
    first = next((line for line in lines if line.strip()), "")
    if delimiter is None:
        delimiter = "|" if "|" in first else "\t" if "\t" in first else ","
    if delimiter == ",":
        import csv

        split = [next(csv.reader([line])) if line.strip() else [] for line in lines]
    else:
        split = [line.split(delimiter) if line.strip() else [] for line in lines]
    out = Transcripts(rows=[])
    text_column = None
    first_row = next((i for i, f in enumerate(split, 1) if f), 0)
    for number, fields in enumerate(split, 1):
        where = f"{name}:{number}"
        if not fields:
            out.blank_lines += 1
            continue
        fields = [f.strip() for f in fields]
        if number == first_row and _is_header(fields):
            names = [f.lower() for f in fields]
            text_column = next((names.index(n) for n in ("normalized_text", "normalised_text") if n in names),
                               next(i for i, n in enumerate(names) if n in _TEXT_HEADERS))
            continue
        if len(fields) < 2 or (len(fields) > 3 and text_column is None):
            out.bad.append(BadRow(where, "", f"expected id{delimiter}text or id{delimiter}text{delimiter}"
                                  f"normalized text, found {len(fields)} field(s)"))
            continue
        if text_column is not None:
            text = fields[text_column] if text_column < len(fields) else ""
        else:
            text = fields[2] if len(fields) == 3 and fields[2] else fields[1]
        uid = _table_id(fields[0])
        if not text:
            out.bad.append(BadRow(where, uid, "empty transcript"))
        elif not uid:
            out.bad.append(BadRow(where, "", "empty id"))
        else:
            out.rows.append(Row(uid, text, where))
    return out


def _is_header(fields: list[str]) -> bool:
    names = [f.lower() for f in fields]
    return names[0] in _ID_HEADERS and any(n in _TEXT_HEADERS for n in names[1:])


def _table_id(first: str) -> str:
    """'wavs/LJ001-0001.wav' -> 'wavs/LJ001-0001'; a plain id stays as it is."""
    from valle_cli.codecs.audio import AUDIO_EXTENSIONS

    path = first.replace("\\", "/")
    if path.lower().endswith(AUDIO_EXTENSIONS):
        path = path.rsplit(".", 1)[0]
    return path.removeprefix("./")


def _read_folder(folder: Path) -> Transcripts:
    """<id>.txt / .lab beside <id>.wav (recursive); ids are paths relative to the folder, no extension."""
    from valle_cli.codecs.audio import find_audio

    audio = {p.relative_to(folder).with_suffix("").as_posix() for p in find_audio(folder)}
    best: dict[str, tuple[int, Path]] = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            matches = [i for i, s in enumerate(TRANSCRIPT_SUFFIXES) if name.lower().endswith(s)]
            if not matches or name.startswith("."):
                continue
            rank = max(matches, key=lambda i: len(TRANSCRIPT_SUFFIXES[i]))  # longest: x.original.txt

            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            key = rel[: len(rel) - len(TRANSCRIPT_SUFFIXES[rank])]
            if key not in best or rank < best[key][0]:
                best[key] = (rank, path)
    if not best:
        raise InputError(f"{folder}: no .txt or .lab transcripts found ({len(audio)} audio files)")
    out = Transcripts(rows=[], audio_without_text=sorted(audio - best.keys()),
                      text_without_audio=len(best.keys() - audio))
    for key in sorted(best):
        path = best[key][1]
        data = path.read_bytes()
        try:
            text = " ".join(data.decode("utf-8-sig").split())
        except UnicodeDecodeError as e:  # one bad file is a bad row, like an empty transcript
            out.bad.append(BadRow(_where_not_utf8(data, e, str(path)), key, _not_utf8(data, e)))
            continue
        if text:
            out.rows.append(Row(key, text, str(path)))
        else:
            out.bad.append(BadRow(str(path), key, "empty transcript"))
    return out
