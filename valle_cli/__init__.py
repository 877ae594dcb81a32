"""valle: small command-line stages for neural-codec language models of audio.

The main entry point of each stage is importable from here; each is loaded on first use (PEP 562),
so ``import valle_cli`` and ``valle --help`` stay cheap: no torch, no transformers.

    from valle_cli import Synthesizer, load_codec, quantize_folder, build_shards, train
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it, in pipeline order
_EXPORTS = {
    "phonemize_corpus": "valle_cli.text.phonemize",  # valle phonemize
    "load_codec": "valle_cli.codecs",
    "quantize_folder": "valle_cli.codecs.quantize",  # valle quantize
    "decode_folder": "valle_cli.codecs.decode",  # valle decode
    "score_codes_folder": "valle_cli.data.chunks",  # valle score-chunks
    "build_shards": "valle_cli.data.shards",  # valle shard
    "ShardOptions": "valle_cli.data.shards",
    "ModelConfig": "valle_cli.model.config",
    "preset": "valle_cli.model.config",
    "load_model": "valle_cli.model.load",
    "TrainConfig": "valle_cli.training.config",
    "train": "valle_cli.training.loop",  # valle train
    "Synthesizer": "valle_cli.generation.synthesizer",  # valle sample
    "GenerateConfig": "valle_cli.generation.params",
    "SamplingParams": "valle_cli.generation.params",
    "similarity_table": "valle_cli.evaluation.similarity",  # valle similarity
    "evaluate": "valle_cli.evaluation.evaluate",  # valle evaluate
    "ValleError": "valle_cli.errors",
}

__all__ = [  # the names of _EXPORTS, spelled out for linters and type checkers
    "__version__", "phonemize_corpus", "load_codec", "quantize_folder", "decode_folder", "score_codes_folder",
    "build_shards", "ShardOptions", "ModelConfig", "preset", "load_model", "TrainConfig", "train", "Synthesizer",
    "GenerateConfig", "SamplingParams", "similarity_table", "evaluate", "ValleError",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access, then keep the name here."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'valle_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what type checkers and editors see; nothing is imported at run time
    from valle_cli.codecs import load_codec
    from valle_cli.codecs.decode import decode_folder
    from valle_cli.codecs.quantize import quantize_folder
    from valle_cli.data.chunks import score_codes_folder
    from valle_cli.data.shards import ShardOptions, build_shards
    from valle_cli.errors import ValleError
    from valle_cli.evaluation.evaluate import evaluate
    from valle_cli.evaluation.similarity import similarity_table
    from valle_cli.generation.params import GenerateConfig, SamplingParams
    from valle_cli.generation.synthesizer import Synthesizer
    from valle_cli.model.config import ModelConfig, preset
    from valle_cli.model.load import load_model
    from valle_cli.text.phonemize import phonemize_corpus
    from valle_cli.training.config import TrainConfig
    from valle_cli.training.loop import train
