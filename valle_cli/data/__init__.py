"""Training data: chunk scores, shards, batch planning and the per-utterance task layout.

``chunks`` scores codes per chunk (novelty, stability, priority: ``valle score-chunks``);
``shards`` packs codes + phonemes into uint16 shards with a parquet index (``valle shard``) and
reads them back; ``batching`` plans token-budget batches and priority windows (deterministic,
DDP-aware, resumable); ``tasks`` decides which task each utterance trains and lays a batch out
as the padded arrays the model embeds. numpy only: nothing here imports torch.
"""
