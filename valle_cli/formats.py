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
from collections.abc import Iterator
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


def display_name(path: str | os.PathLike[str]) -> str:
    return "<stdin>" if str(path) == STDIO else str(path)


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


def codes_from_bytes(data: bytes, name: str = "<codes>") -> Codes:
    if not data:
        raise FormatError(f"{name}: empty file, expected a codes .npz")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
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
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = display_name(path)
    data = read_input_bytes(path)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise FormatError(f"{name}: not a readable parquet file ({e})") from None
    raw = (table.schema.metadata or {}).get(b"valle")
    if raw is None:
        raise FormatError(f"{name}: parquet without valle metadata (not made by valle?)")
    meta = json.loads(raw)
    if meta.get("kind") != kind:
        raise FormatError(f"{name}: expected a {kind} file, found {meta.get('kind')!r}")
    return pl.from_arrow(table), meta


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
