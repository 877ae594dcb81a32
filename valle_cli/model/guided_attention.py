"""Guided attention: a loss that teaches one attention head to read the text in step with the audio.

A codec LM must learn on its own which phoneme each audio frame says; until it does, it babbles in the
right voice. Tachibana et al. (2017, "Efficiently trainable text-to-speech system based on deep
convolutional networks with guided attention") showed that a cheap prior on the attention makes this
alignment appear far sooner: text and speech advance together, so the attention of frame t (of T) should
sit near text token n (of N) with n / N ~ t / T. Their loss is the attention mass weighted by how far it is
from that diagonal:

    W[t, n] = 1 - exp(-(n / N - t / T)^2 / (2 g^2))        g = ``width`` (0.2 in the paper)

In a decoder-only model a head also sees the prompt and earlier frames; for the guided heads any key
that is not text weighs 1, so the loss asks them to read the text, near the diagonal. It applies to the
response queries of every row that has text (AR, NAR and NAR-len rows alike); rows whose text was
dropped (the CFG null condition) are left out. Only training pays for it: the weights of the guided
heads are recomputed in fp32 beside the fused attention (``transformer.Attention.probe_heads``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from valle_cli.data import tasks


def guide_weights(segment: Tensor, width: float) -> tuple[Tensor, Tensor]:
    """(B, S) segment kinds -> W (B, S, S), the penalty of query i attending key j, and the (B, S) bool
    mask of the queries that count (response positions of rows with text)."""
    text, resp = segment == tasks.TEXT, segment == tasks.RESPONSE  # (B, S)
    n_text = text.sum(1, keepdim=True).clamp_min(1)  # (B, 1)
    n_resp = resp.sum(1, keepdim=True).clamp_min(1)
    n_rel = (text.cumsum(1) - 0.5) / n_text  # (B, S): (n + 0.5) / N at text positions
    t_rel = (resp.cumsum(1) - 0.5) / n_resp  # (B, S): (t + 0.5) / T at response positions
    near = torch.exp(-(n_rel[:, None, :] - t_rel[:, :, None]).square() / (2 * width**2))  # (B, S_q, S_k)
    weights = torch.where(text[:, None, :], 1.0 - near, torch.ones_like(near))
    queries = resp & text.any(1, keepdim=True)  # (B, S)
    return weights, queries


def guided_attention_loss(probs: Tensor, segment: Tensor, width: float) -> tuple[Tensor, int]:
    """probs (B, H, S, S) attention weights of the guided heads -> (sum of the penalty over heads and counted
    queries, number of head-queries). The mean, sum / count, is 0 for attention exactly on the diagonal
    of the text and 1 for attention anywhere but the text."""
    weights, queries = guide_weights(segment, width)  # (B, S, S), (B, S)
    per_query = (probs * weights[:, None]).sum(-1)  # (B, H, S)
    count = int(queries.sum()) * probs.shape[1]
    return (per_query * queries[:, None].to(per_query.dtype)).sum(), count
