"""``valle train``: the training loop, its configuration, validation, logs, curves and TensorBoard.

``config`` resolves a run's model, tasks and train configs (presets, TOML, ``--set``). ``loop``
builds the model, draws batches from the shards, trains with gradient accumulation, autocast, a
NaN guard, DDP and LoRA, validates, and saves resumable checkpoints (``checkpoint.py`` is their
format). ``curves`` draws curves.png from log.jsonl; ``tensorboard`` writes the same scalars and an
audio sample per evaluation as TensorBoard events. Everything a run writes is in its folder.
"""
