"""Attention masks of the codec LM: a causal prefix, then (optionally) a bidirectional response.

Every sequence is ``<text> <lang> <task> <prompt> <response>`` (as in e-c-k-e-r/vall-e). The AR
task is causal everywhere. NAR and NAR-len tasks keep the prefix causal and let the response
attend to the whole response (and everything before it). One boolean mask describes every row of a batch:

    mask[b, 0, i, j] = valid[b, j] and (j <= i or i >= bidir_start[b]) or i == j

``bidir_start[b]`` is the first response position of a bidirectional row, and the sequence
length for a causal one. The diagonal is always allowed so a padding query never has an empty
row (an all-masked softmax gives NaN); padding outputs are never read. True = may attend.
"""

from __future__ import annotations

import torch
from torch import Tensor


def prefix_bidirectional_mask(valid: Tensor, bidir_start: Tensor) -> Tensor:
    """valid (B, S) bool, bidir_start (B,) long -> (B, 1, S, S) bool."""
    _, s = valid.shape
    i = torch.arange(s, device=valid.device)
    causal = i[None, :] <= i[:, None]  # (S, S): key j <= query i
    bidir = i[None, :, None] >= bidir_start[:, None, None]  # (B, S, 1): query in the bidirectional part
    mask = (causal[None] | bidir) & valid[:, None, :]
    mask |= torch.eye(s, dtype=torch.bool, device=valid.device)[None]
    return mask[:, None]


def decode_step_mask(valid: Tensor, query_positions: int) -> Tensor:
    """Mask of the last ``query_positions`` tokens of a causal sequence, for a cached forward.

    valid (B, S) bool over every cached + new key -> (B, 1, Q, S) bool: new query q (at absolute
    position S - Q + q) sees the valid keys up to itself.
    """
    b, s = valid.shape
    q = torch.arange(s - query_positions, s, device=valid.device)  # (Q,) absolute positions
    j = torch.arange(s, device=valid.device)
    mask = (j[None, :] <= q[:, None])[None] & valid[:, None, :]  # (B, Q, S)
    mask |= (j[None, :] == q[:, None])[None]
    return mask[:, None]


def chunked_local(mask: Tensor, chunk: int, query_offset: int | Tensor = 0) -> Tensor:
    """Restrict a (B, 1, Q, S) mask to keys in the query's chunk of ``chunk`` tokens (Llama 4 iRoPE).

    Query q sits at absolute position ``query_offset + q``, or at ``query_offset[q]`` when it is a (Q,)
    tensor of slots (the fixed-shape decode step); key j at position j.
    """
    _, _, nq, s = mask.shape
    if isinstance(query_offset, Tensor):
        q = query_offset // chunk
    else:
        q = torch.arange(query_offset, query_offset + nq, device=mask.device) // chunk
    j = torch.arange(s, device=mask.device) // chunk
    return mask & (q[:, None] == j[None, :])
