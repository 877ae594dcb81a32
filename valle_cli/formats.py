"""Every on-disk artifact of valle: how it is laid out, read and written (FORMATS.md is the spec).

This is the only module that knows file layouts. Writes are atomic (a temporary file in the same
folder, then ``os.replace``) so an interrupted run never leaves a file that looks complete.
``-`` names stdin/stdout for the formats that can travel through a pipe; binary data is buffered
whole because npz/parquet readers need a seekable stream. No pickle anywhere.
"""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from valle_cli.errors import FormatError, InputError

CODES_FORMAT_VERSION = 1
MANIFEST_FORMAT_VERSION = 1
PHONEMES_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.parquet"
STDIO = "-"


# ----------------------------------------------------------------------------- atomic files & stdio


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    On any exception the temporary file is removed and ``path`` (if it existed) is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def read_input_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a whole file, or stdin for '-' (refusing an interactive terminal instead of hanging)."""
    if str(path) == STDIO:
        if sys.stdin is None or sys.stdin.isatty():
            raise InputError("input is '-' but stdin is a terminal: pipe data in or name a file")
        return sys.stdin.buffer.read()
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a folder, expected a file")
    return p.read_bytes()


def write_output_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write to a file atomically, or to stdout for '-' (refusing to dump binary on a terminal)."""
    if str(path) == STDIO:
        if sys.stdout.isatty():
            raise InputError("refusing to write binary data to a terminal: redirect stdout or use -o FILE")
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    atomic_write_bytes(path, data)


def display_name(path: str | os.PathLike[str], output: bool = False) -> str:
    """A path for messages; '-' is <stdin> for an input and <stdout> for an output."""
    if str(path) == STDIO:
        return "<stdout>" if output else "<stdin>"
    return str(path)


# ----------------------------------------------------------------------------- codes (.npz)


@dataclass
class Codes:
    """One utterance of codec codes, as stored in ``<id>.npz``."""

    codes: np.ndarray  # (K, T) int16, K codebooks x T frames
    sample_rate: int  # the codec's audio rate
    frame_rate: float  # code frames per second
    codec: dict[str, Any]  # codec identity + settings (see valle_cli.codecs.CodecSpec)
    source: str = ""  # the audio file the codes were made from ('' when generated)
    seconds: float = 0.0  # duration of the source audio
    format_version: int = CODES_FORMAT_VERSION
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # further arrays, kept on round trip

    @property
    def n_codebooks(self) -> int:
        return int(self.codes.shape[0])

    @property
    def n_frames(self) -> int:
        return int(self.codes.shape[1])


_CODES_KEYS = ("codes", "sample_rate", "frame_rate", "codec", "source", "seconds", "format_version")


def codes_to_bytes(item: Codes) -> bytes:
    codes = np.asarray(item.codes)
    if codes.ndim != 2:
        raise FormatError(f"codes must be 2-D (K, T), got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() > np.iinfo(np.int16).max):
        raise FormatError("codes out of the int16 range")
    arrays: dict[str, np.ndarray] = {
        "codes": codes.astype(np.int16),
        "sample_rate": np.asarray(int(item.sample_rate), dtype=np.int64),
        "frame_rate": np.asarray(float(item.frame_rate), dtype=np.float64),
        "codec": np.asarray(json.dumps(item.codec, sort_keys=True)),
        "source": np.asarray(item.source),
        "seconds": np.asarray(float(item.seconds), dtype=np.float64),
        "format_version": np.asarray(int(item.format_version), dtype=np.int64),
    }
    for key, value in item.extra.items():
        if key in arrays:
            raise FormatError(f"extra array {key!r} would shadow a standard key")
        arrays[key] = np.asarray(value)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


_AUDIO_MAGIC = (b"RIFF", b"RF64", b"fLaC", b"OggS", b"ID3", b"FORM", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")


def _not_codes(data: bytes, name: str) -> FormatError:
    """What a file that is no zip archive (as every .npz is) was meant to be, in one line."""
    if data.startswith(_AUDIO_MAGIC):
        return FormatError(f"{name}: not a codes .npz file but audio (valle quantize turns audio into codes)")
    return FormatError(f"{name}: not a codes .npz file (made by valle quantize or valle sample)")


def codes_from_bytes(data: bytes, name: str = "<codes>") -> Codes:
    if not data:
        raise FormatError(f"{name}: empty file, expected a codes .npz")
    if not data.startswith(b"PK"):  # else numpy would try it as a pickle and talk about allow_pickle
        raise _not_codes(data, name)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:
        if "allow_pickle" in str(e):  # an array of Python objects: valle never writes one, nor loads it
            raise FormatError(f"{name}: not a valle codes file (it holds pickled Python objects)") from None
        raise FormatError(f"{name}: not a readable codes .npz (truncated or foreign file: {e})") from None
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise FormatError(f"{name}: not a readable codes .npz (truncated or foreign file: {e})") from None
    missing = [k for k in _CODES_KEYS if k not in arrays]
    if missing:
        raise FormatError(f"{name}: not a valle codes file (missing {', '.join(missing)})")
    version = int(arrays["format_version"])
    if version != CODES_FORMAT_VERSION:
        raise FormatError(
            f"{name}: codes format version {version}, this valle reads version {CODES_FORMAT_VERSION}"
        )
    codes = arrays["codes"]
    if codes.ndim != 2 or codes.dtype != np.int16:
        raise FormatError(f"{name}: 'codes' must be int16 (K, T), got {codes.dtype} {codes.shape}")
    try:
        codec = json.loads(str(arrays["codec"]))
    except json.JSONDecodeError:
        raise FormatError(f"{name}: 'codec' is not valid JSON") from None
    return Codes(
        codes=codes,
        sample_rate=int(arrays["sample_rate"]),
        frame_rate=float(arrays["frame_rate"]),
        codec=codec,
        source=str(arrays["source"]),
        seconds=float(arrays["seconds"]),
        format_version=version,
        extra={k: v for k, v in arrays.items() if k not in _CODES_KEYS},
    )


def write_codes(path: str | os.PathLike[str], item: Codes) -> None:
    write_output_bytes(path, codes_to_bytes(item))


def read_codes(path: str | os.PathLike[str]) -> Codes:
    return codes_from_bytes(read_input_bytes(path), display_name(path))


@dataclass(frozen=True)
class CodesHeader:
    shape: tuple[int, int]  # (K, T)
    codec: dict[str, Any]
    frame_rate: float
    seconds: float
    source: str


def read_codes_header(path: str | os.PathLike[str]) -> CodesHeader:
    """The small fields of a codes file, without reading the code array itself."""
    name = str(path)
    try:
        with zipfile.ZipFile(path) as zf:
            with zf.open("codes.npy") as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, _ = read_header(f)
            small = {}
            for key in ("codec", "frame_rate", "seconds", "source"):
                with zf.open(f"{key}.npy") as f:
                    small[key] = np.lib.format.read_array(f, allow_pickle=False)
        return CodesHeader(shape=tuple(shape), codec=json.loads(str(small["codec"])),
                           frame_rate=float(small["frame_rate"]), seconds=float(small["seconds"]),
                           source=str(small["source"]))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise FormatError(f"{name}: not a readable codes .npz ({e})") from None


# ----------------------------------------------------------------------------- parquet with metadata


def write_parquet(path: str | os.PathLike[str], df: Any, metadata: dict[str, Any]) -> None:
    """Write a polars DataFrame with JSON-encoded file metadata (key 'valle'), atomically or to stdout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = df.to_arrow()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"valle": json.dumps(metadata)})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    write_output_bytes(path, buf.getvalue().to_pybytes())


def read_parquet(path: str | os.PathLike[str], kind: str) -> tuple[Any, dict[str, Any]]:
    """Read a valle parquet; returns (polars DataFrame, metadata). ``kind`` names the expected artifact."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = display_name(path)
    data = read_input_bytes(path)
    try:
        schema = pq.read_schema(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise FormatError(f"{name}: not a readable parquet file ({e})") from None
    raw = (schema.metadata or {}).get(b"valle")
    if raw is None:
        raise FormatError(f"{name}: parquet without valle metadata (not made by valle?)")
    meta = json.loads(raw)
    if meta.get("kind") != kind:
        raise FormatError(f"{name}: expected a {kind} file, found {meta.get('kind')!r}")
    return _polars_from_parquet_bytes(data, name), meta


def _polars_from_parquet_bytes(data: bytes, name: str) -> Any:
    """The columns, read by polars itself: a pyarrow table read from memory and handed over with
    pl.from_arrow makes ~20 % of processes abort at exit ("terminate called without an active
    exception", pyarrow 26 + polars 2.1)."""
    import polars as pl

    try:
        return pl.read_parquet(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - polars raises several types for a damaged file
        raise FormatError(f"{name}: not a readable parquet file ({e})") from None


# ----------------------------------------------------------------------------- codes manifest


MANIFEST_COLUMNS = ("id", "path", "frames", "seconds", "codec", "source")


def write_manifest(folder: str | os.PathLike[str], rows: list[dict[str, Any]]) -> Path:
    """``manifest.parquet`` of a codes folder: one row per npz (paths relative to the folder)."""
    import polars as pl

    schema = {
        "id": pl.String,
        "path": pl.String,
        "frames": pl.Int64,
        "seconds": pl.Float64,
        "codec": pl.String,
        "source": pl.String,
    }
    df = pl.DataFrame(rows, schema=schema).sort("id")
    out = Path(folder) / MANIFEST_NAME
    write_parquet(out, df, {"kind": "codes-manifest", "format_version": MANIFEST_FORMAT_VERSION})
    return out


def read_manifest(folder: str | os.PathLike[str]) -> Any:
    folder = Path(folder)
    path = folder / MANIFEST_NAME if folder.is_dir() else folder
    df, meta = read_parquet(path, "codes-manifest")
    if meta.get("format_version") != MANIFEST_FORMAT_VERSION:
        raise FormatError(f"{path}: manifest format version {meta.get('format_version')} is not supported")
    return df


# ----------------------------------------------------------------------------- phonemes (.parquet)


def write_phonemes(path: str | os.PathLike[str], df: Any, tokenizer: dict[str, Any], settings: dict[str, Any]) -> None:
    """Columns id, text, lang, phonemes, tokens (list<u16>); tokenizer + settings in the metadata."""
    import polars as pl

    df = df.select(
        pl.col("id").cast(pl.String),
        pl.col("text").cast(pl.String),
        pl.col("lang").cast(pl.String),
        pl.col("phonemes").cast(pl.String),
        pl.col("tokens").cast(pl.List(pl.UInt16)),
    )
    meta = {
        "kind": "phonemes",
        "format_version": PHONEMES_FORMAT_VERSION,
        "tokenizer": tokenizer,
        "settings": settings,
    }
    write_parquet(path, df, meta)


def read_phonemes(path: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    df, meta = read_parquet(path, "phonemes")
    if meta.get("format_version") != PHONEMES_FORMAT_VERSION:
        raise FormatError(
            f"{display_name(path)}: phonemes format version {meta.get('format_version')} is not supported"
        )
    if "tokenizer" not in meta:
        raise FormatError(f"{display_name(path)}: phonemes file without a tokenizer in its metadata")
    return df, meta


# ----------------------------------------------------------------------------- sample manifest (id|text|prompt rows)


def read_sample_manifest(path: str | os.PathLike[str]) -> list[tuple[str, str, list[str]]]:
    """(id, text, prompts) rows of an ``id|text|prompt`` table ('|', tab or ',' separated; '+' joins prompts).

    The input of ``valle sample --manifest`` and ``valle evaluate``. A header row (id, text, prompt)
    is skipped; relative prompt paths are relative to the table.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such manifest")
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not lines:
        raise InputError(f"{path}: empty manifest")
    delimiter = next((d for d in ("|", "\t", ",") if all(d in line for line in lines)), None)
    if delimiter is None:
        raise InputError(f"{path}: expected id|text|prompt rows ('|', tab or ',' separated)")
    rows, seen = [], set()
    for number, line in enumerate(lines, 1):
        cells = [c.strip() for c in line.split(delimiter)]
        if number == 1 and [c.lower() for c in cells[:3]] == ["id", "text", "prompt"]:
            continue
        if len(cells) != 3 or not all(cells):
            raise InputError(f"{path}:{number}: expected 3 non-empty fields id{delimiter}text{delimiter}prompt")
        uid, text, prompt = cells
        if uid in seen:
            raise InputError(f"{path}:{number}: id {uid!r} appears twice")
        seen.add(uid)
        prompts = [str(p if Path(p).is_absolute() else path.parent / p) for p in prompt.split("+")]
        rows.append((uid, text, prompts))
    return rows


SAMPLES_INFO_NAME = "samples.json"  # beside the npz files of valle sample --manifest
SAMPLES_INFO_FORMAT_VERSION = 1


def write_samples_info(folder: str | os.PathLike[str], checkpoint: str, step: int, max_seconds: float,
                       params: dict[str, Any]) -> None:
    """``<folder>/samples.json``: what made the samples of a manifest folder (checkpoint, step, settings)."""
    info = {"kind": "valle-samples", "format_version": SAMPLES_INFO_FORMAT_VERSION, "checkpoint": checkpoint,
            "step": int(step), "max_seconds": float(max_seconds), "params": params}
    atomic_write_bytes(Path(folder) / SAMPLES_INFO_NAME, (json.dumps(info, indent=2) + "\n").encode())


def read_samples_info(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The samples.json of a manifest folder, or None where there is none (older folders, wav folders)."""
    path = Path(folder) / SAMPLES_INFO_NAME
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("kind") != "valle-samples":
        raise FormatError(f"{path}: not a valle samples.json")
    _check_version(str(path), "samples.json", info, SAMPLES_INFO_FORMAT_VERSION)
    return info


# ----------------------------------------------------------------------------- training shards (.bin + index)
# A shard is a fixed header then a flat little-endian uint16 body that np.memmap maps directly.
# Each record is one utterance: its text tokens (L,) followed by its codes (K, T) row-major, so
# record length = L + K*T elements. Where each record starts (and its L, T) lives only in
# index.parquet; the header says what the numbers mean (codec, K, codebook size, tokenizer).

SHARD_MAGIC = b"VALLESHD"  # llm.c / modded-nanogpt shards start with int32 20240520 instead
SHARD_FORMAT_VERSION = 1
SHARD_INDEX_FORMAT_VERSION = 1
SHARD_INDEX_NAME = "index.parquet"
SHARD_ALIGN = 4096  # header length is a multiple of this, so the uint16 body is page aligned
NO_TOKEN = 0xFFFFFFFF  # a special id the tokenizer does not have (BPE has no <unk>)
# The fixed part of the header, little-endian; then meta_bytes of UTF-8 JSON; then zeros up to header_bytes.
SHARD_HEADER_FIELDS = np.dtype([
    ("magic", "S8"),  # SHARD_MAGIC
    ("version", "<u4"),  # SHARD_FORMAT_VERSION
    ("header_bytes", "<u4"),  # where the body starts: a multiple of SHARD_ALIGN
    ("n_codebooks", "<u4"),  # K
    ("codebook_size", "<u4"),
    ("text_vocab_size", "<u4"),
    ("text_pad_id", "<u4"),  # text specials, NO_TOKEN when absent
    ("text_bos_id", "<u4"),
    ("text_eos_id", "<u4"),
    ("text_unk_id", "<u4"),
    ("shard", "<u4"),  # this shard's number
    ("frame_rate", "<f8"),  # code frames per second
    ("n_records", "<u8"),  # utterances in this shard
    ("n_elements", "<u8"),  # uint16 values in the body
    ("meta_bytes", "<u4"),  # length of the JSON block that follows
])  # 76 bytes
SHARD_INDEX_SCHEMA = {
    "id": "String",
    "speaker": "String",
    "split": "String",
    "shard": "Int32",
    "offset": "Int64",
    "text_len": "Int32",
    "frames": "Int32",
    "seconds": "Float64",
    "weight": "Float64",
    "prompts": "List(Int32)",
}


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.bin"


@dataclass(frozen=True)
class ShardHeader:
    """What a shard's numbers mean; ``meta`` (codec spec, tokenizer, split) is JSON in the header."""

    n_codebooks: int  # K
    codebook_size: int  # codes are in [0, codebook_size)
    text_vocab_size: int  # text tokens are in [0, text_vocab_size)
    text_pad_id: int  # NO_TOKEN when the tokenizer has no such special
    text_bos_id: int
    text_eos_id: int
    text_unk_id: int
    frame_rate: float  # code frames per second
    n_records: int  # utterances in this shard
    n_elements: int  # uint16 values in the body
    shard: int = 0  # this shard's number (its file is shard_name(shard))
    meta: dict[str, Any] = field(default_factory=dict)  # {"codec": spec, "tokenizer": meta, "split": name}
    header_bytes: int = 0  # filled in by pack/unpack: where the body starts
    version: int = SHARD_FORMAT_VERSION


def pack_shard_header(header: ShardHeader) -> bytes:
    """The header bytes (a multiple of SHARD_ALIGN long); deterministic: sorted JSON, no timestamps."""
    meta = json.dumps(header.meta, sort_keys=True, ensure_ascii=False).encode()
    size = -(-(SHARD_HEADER_FIELDS.itemsize + len(meta)) // SHARD_ALIGN) * SHARD_ALIGN
    fixed = np.array([(SHARD_MAGIC, header.version, size, header.n_codebooks, header.codebook_size,
                        header.text_vocab_size, header.text_pad_id, header.text_bos_id, header.text_eos_id,
                        header.text_unk_id, header.shard, header.frame_rate, header.n_records,
                        header.n_elements, len(meta))], dtype=SHARD_HEADER_FIELDS).tobytes()
    return (fixed + meta).ljust(size, b"\0")


def unpack_shard_header(data: bytes, name: str = "<shard>") -> ShardHeader:
    """Parse (at least the first header_bytes of) a shard; refuses foreign files and other versions."""
    if data[:8] != SHARD_MAGIC:
        raise FormatError(f"{name}: not a valle shard (bad magic; expected a file made by valle shard)")
    if len(data) < SHARD_HEADER_FIELDS.itemsize:
        raise FormatError(f"{name}: truncated shard header")
    h = np.frombuffer(data, dtype=SHARD_HEADER_FIELDS, count=1)[0]
    version, size, meta_bytes = int(h["version"]), int(h["header_bytes"]), int(h["meta_bytes"])
    if version != SHARD_FORMAT_VERSION:
        raise FormatError(f"{name}: shard format version {version}, this valle reads version {SHARD_FORMAT_VERSION}")
    if size % SHARD_ALIGN or size < SHARD_HEADER_FIELDS.itemsize + meta_bytes:
        raise FormatError(f"{name}: corrupt shard header (header length {size}, metadata {meta_bytes} bytes)")
    if len(data) < SHARD_HEADER_FIELDS.itemsize + meta_bytes:
        raise FormatError(f"{name}: truncated shard header")
    try:
        meta = json.loads(data[SHARD_HEADER_FIELDS.itemsize:SHARD_HEADER_FIELDS.itemsize + meta_bytes].decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{name}: corrupt shard header (metadata is not JSON)") from None
    return ShardHeader(
        n_codebooks=int(h["n_codebooks"]), codebook_size=int(h["codebook_size"]),
        text_vocab_size=int(h["text_vocab_size"]), text_pad_id=int(h["text_pad_id"]),
        text_bos_id=int(h["text_bos_id"]), text_eos_id=int(h["text_eos_id"]), text_unk_id=int(h["text_unk_id"]),
        frame_rate=float(h["frame_rate"]), n_records=int(h["n_records"]), n_elements=int(h["n_elements"]),
        shard=int(h["shard"]), meta=meta, header_bytes=size, version=version,
    )


def read_shard_header(path: str | os.PathLike[str]) -> ShardHeader:
    """The header of a shard file, checked against the file size (a truncated shard is refused)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: shard file is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        data = f.read(SHARD_ALIGN)
        header = unpack_shard_header(data, str(path))
        if header.header_bytes > len(data):  # a long tokenizer (BPE ranks) makes a longer header
            header = unpack_shard_header(data + f.read(header.header_bytes - len(data)), str(path))
    expected = header.header_bytes + 2 * header.n_elements
    if size < expected:
        raise FormatError(f"{path}: truncated shard ({size} bytes, its header says {expected})")
    if size > expected:
        raise FormatError(f"{path}: {size - expected} unexpected bytes after the shard body")
    return header


def shard_record(tokens: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """One record: text tokens (L,) then codes (K, T) row-major, as a flat uint16 (L + K*T,)."""
    return np.concatenate([np.asarray(tokens, dtype=np.uint16).ravel(), np.asarray(codes, dtype=np.uint16).ravel()])


def read_codes_array(path: str | os.PathLike[str]) -> np.ndarray:
    """Only the int16 (K, T) array of a codes file (version checked): 3-4x faster than read_codes,
    which parses all seven members. For bulk readers that take the codec from the manifest."""
    try:
        with zipfile.ZipFile(path) as zf:
            with zf.open("format_version.npy") as f:
                version = int(np.lib.format.read_array(f, allow_pickle=False))
            with zf.open("codes.npy") as f:
                codes = np.lib.format.read_array(f, allow_pickle=False)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as e:
        raise FormatError(f"{path}: not a readable codes .npz ({e})") from None
    if version != CODES_FORMAT_VERSION:
        raise FormatError(f"{path}: codes format version {version}, this valle reads version {CODES_FORMAT_VERSION}")
    if codes.ndim != 2 or codes.dtype != np.int16:
        raise FormatError(f"{path}: 'codes' must be int16 (K, T), got {codes.dtype} {codes.shape}")
    return codes


def write_shard(path: str | os.PathLike[str], header: ShardHeader, records: Iterable[np.ndarray]) -> None:
    """Write header + records atomically; the records must add up to the header's counts."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(pack_shard_header(header))
            n_records = n_elements = 0
            for record in records:  # each a flat uint16 array from shard_record
                record = np.ascontiguousarray(record, dtype="<u2")
                f.write(record.data)
                n_records += 1
                n_elements += record.size
            if (n_records, n_elements) != (header.n_records, header.n_elements):
                raise FormatError(f"{path}: wrote {n_records} records / {n_elements} values, the header "
                                  f"says {header.n_records} / {header.n_elements}")
            f.flush()
            os.fsync(f.fileno())


def open_shard_body(path: str | os.PathLike[str], header: ShardHeader) -> np.ndarray:
    """The body of a shard as a read-only uint16 memmap (n_elements,), nothing read yet."""
    if header.n_elements == 0:
        return np.zeros(0, dtype="<u2")
    return np.memmap(path, dtype="<u2", mode="r", offset=header.header_bytes, shape=(header.n_elements,))


def split_record(body: np.ndarray, offset: int, text_len: int, n_codebooks: int,
                 frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (L,), codes (K, T)) of the record at ``offset``: uint16 views into ``body``, no copy."""
    tokens = body[offset:offset + text_len]
    codes = body[offset + text_len:offset + text_len + n_codebooks * frames].reshape(n_codebooks, frames)
    return tokens, codes


def write_shard_index(folder: str | os.PathLike[str], df: Any, meta: dict[str, Any]) -> Path:
    """``<folder>/index.parquet``: one row per record (columns SHARD_INDEX_SCHEMA); written atomically."""
    import polars as pl

    df = df.select([pl.col(name).cast(_polars_type(kind)) for name, kind in SHARD_INDEX_SCHEMA.items()])
    out = Path(folder) / SHARD_INDEX_NAME
    write_parquet(out, df, {**meta, "kind": "shard-index", "format_version": SHARD_INDEX_FORMAT_VERSION})
    return out


def read_shard_index(folder: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """(polars DataFrame, metadata) of ``<folder>/index.parquet`` (or of that file itself)."""
    folder = Path(folder)
    path = folder / SHARD_INDEX_NAME if folder.is_dir() else folder
    if not path.is_file():
        raise InputError(f"{path}: no shard index (not a finished 'valle shard' output)")
    df, meta = read_parquet(path, "shard-index")
    _check_version(str(path), "shard index", meta, SHARD_INDEX_FORMAT_VERSION)
    _check_columns(str(path), "shard index", df, SHARD_INDEX_SCHEMA)
    return df, meta


def _check_version(name: str, what: str, meta: dict[str, Any], version: int) -> None:
    if meta.get("format_version") != version:
        raise FormatError(f"{name}: {what} format version {meta.get('format_version')} is not supported "
                          f"(this valle reads version {version})")


def _check_columns(name: str, what: str, df: Any, schema: dict[str, str]) -> None:
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise FormatError(f"{name}: {what} without column(s) {', '.join(missing)}")


def _polars_type(kind: str) -> Any:
    import polars as pl

    return pl.List(pl.Int32) if kind == "List(Int32)" else getattr(pl, kind)


# ----------------------------------------------------------------------------- chunk scores (.parquet)

CHUNK_SCORES_FORMAT_VERSION = 1
CHUNK_SCORES_KIND = "chunk-scores"
# Required columns and their polars types, in file order; a writer may add further columns after them.
CHUNK_SCORES_SCHEMA: dict[str, str] = {
    "id": "String",  # source (utterance) id, as in the codes manifest
    "chunk_idx": "Int32",  # 0.. within the source
    "frame_start": "Int64",  # first code frame of the chunk
    "frame_len": "Int32",  # code frames in the chunk (the last chunk of a source may be shorter)
    "frame_rate": "Float64",  # code frames per second
    "codec": "String",  # codec spec JSON, as in the manifest
    "rms_db": "Float32",
    "shape_flux": "Float32",
    "magnitude_flux": "Float32",
    "novelty": "Float32",
    "stability": "Float32",
    "priority": "Float32",
    "void": "Boolean",
}
_CHUNK_SCORES_PARAMS = ("chunk_frames", "frame_rate")  # what no reader should ever have to guess


def write_chunk_scores(path: str | os.PathLike[str], df: Any, params: dict[str, Any], **info: Any) -> None:
    """Chunk scores (columns CHUNK_SCORES_SCHEMA first, extras after) with the scoring ``params``
    (which must hold chunk_frames and frame_rate) and any further JSON ``info`` in the metadata."""
    import polars as pl

    missing = [c for c in CHUNK_SCORES_SCHEMA if c not in df.columns]
    if missing:
        raise FormatError(f"chunk scores without column(s) {', '.join(missing)}")
    lacking = [k for k in _CHUNK_SCORES_PARAMS if k not in params]
    if lacking:
        raise FormatError(f"chunk scores parameters without {', '.join(lacking)}")
    df = df.select([pl.col(c).cast(getattr(pl, t)) for c, t in CHUNK_SCORES_SCHEMA.items()]
                   + [c for c in df.columns if c not in CHUNK_SCORES_SCHEMA])
    meta = {**info, "kind": CHUNK_SCORES_KIND, "format_version": CHUNK_SCORES_FORMAT_VERSION, "params": params}
    write_parquet(path, df, meta)


def read_chunk_scores(path: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """(polars DataFrame, metadata) of a chunk-scores parquet, checked: kind, version, columns, params."""
    df, meta = read_parquet(path, CHUNK_SCORES_KIND)
    name = display_name(path)
    _check_version(name, "chunk-scores", meta, CHUNK_SCORES_FORMAT_VERSION)
    params = meta.get("params")
    if not isinstance(params, dict) or any(k not in params for k in _CHUNK_SCORES_PARAMS):
        raise FormatError(f"{name}: chunk scores without the expected metadata (params with "
                          f"{' and '.join(_CHUNK_SCORES_PARAMS)})")
    _check_columns(name, "chunk scores", df, CHUNK_SCORES_SCHEMA)
    return df, meta


# ----------------------------------------------------------------------------- training log (run/log.jsonl)

LOG_FILE = "log.jsonl"  # one JSON object per line: {"step", "split": "train" | "val", "loss", "tasks", ...}
CURVES_FILE = "curves.png"  # drawn from the log (valle_cli.training.curves)


def append_log(run: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Add one entry (a train log window or a validation) as a line of run/log.jsonl."""
    with open(Path(run) / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(run: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every entry of run/log.jsonl in order ([] when the run has not logged yet)."""
    path = Path(run) / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(run: str | os.PathLike[str], step: int) -> None:
    """Drop entries past ``step``: a killed run may have logged steps its last checkpoint lacks."""
    path = Path(run) / LOG_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))
