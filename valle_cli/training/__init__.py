"""``valle train``: the training loop, its optimiser and schedule, validation, logs and curves.

``loop`` builds the model from a ``TrainConfig``, draws batches from the shards, trains with
gradient accumulation, autocast, a NaN guard, DDP and LoRA, validates, and saves resumable
checkpoints (``checkpoint.py`` is their format). Everything a run writes is in its folder.
"""
