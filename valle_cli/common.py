"""Device selection, torch threads, seeding and the output-is-not-an-input rule, shared by every stage.
Imports torch lazily."""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from valle_cli.errors import InputError, ValleError

T = TypeVar("T")


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run torch ops on n intra-op threads inside the block (None: leave it), then restore the count."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; validates 'cpu', 'cuda', 'cuda:N'."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValleError(f"--device {device}: no CUDA device is available here (use --device cpu or auto)")
        if ":" in device:
            index = device.split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise ValleError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        return device
    raise ValleError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")


def seed_everything(seed: int | None) -> None:
    """Seed python, numpy and torch so a run with the same --seed gives the same result."""
    if seed is None:
        return
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON-able data (tuples become lists)."""
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def config_from_dict(cls: type[T], data: dict[str, Any], what: str) -> T:
    """A config dataclass from ``config_to_dict`` data: unknown fields refused, lists back to tuples."""
    from dataclasses import fields

    unknown = sorted(set(data) - {f.name for f in fields(cls)})  # type: ignore[arg-type]
    if unknown:
        raise InputError(f"unknown {what} config field(s): {', '.join(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def same_path(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file or folder: equal once resolved (symlinks, ``..``), or one file
    under two names (a hard link)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def refuse_output_over_input(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None],
                             flag: str = "-o", inside: bool = False) -> None:
    """Refuse an output that is, or resolves to, one of the inputs: writing it would destroy the input,
    --overwrite or not. With ``inside`` (an output folder whose contents a verb replaces) an input
    anywhere under the output is refused too. '-' (stdin, stdout) and None are no paths."""
    if str(out) == "-":
        return
    out = Path(out)
    for given in inputs:
        if given is None or str(given) == "-":
            continue
        path = Path(given)
        if same_path(out, path) or (inside and _inside(path, out)):
            where = "is" if str(out) == str(path) else "resolves to" if same_path(out, path) else "holds"
            raise InputError(f"{flag} {out} {where} the input {path}: write the output elsewhere "
                             "(valle never replaces an input, even with --overwrite)")
