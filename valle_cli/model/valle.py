"""The unified codec language model: AR + NAR + NAR-len over one backbone (as in e-c-k-e-r/vall-e).

One transformer serves every task; what changes is how the input sequence is embedded and which
head reads the output. A sequence is ``<text> <lang> <task> <prompt> <response>`` (tasks.py lays
it out):

    text       text_emb(token)                                   (vocabulary of the tokenizer)
    lang       lang_emb(lang)
    task       task_emb(t): t = 0 AR, l = NAR level l, K = NAR-len (masked level 0)
    prompt     sum over levels k of prompt_emb[k](code_k)        (all K codebooks of the prompt)
    sep        sep_emb: in-fill prompts are prefix, sep, suffix (continuation: just the past)
    response   AR:      resp_ar(c0)       (+ a start id = codebook_size at the first position)
               NAR l:   sum_{j<l} resp_nar[j](c_j)  with audio_embedding_sums, else resp_nar[l-1](c_{l-1})
               NAR-len: resp_mask(c0)     (masked frames carry the mask id = codebook_size)

Heads are split per macro-task, as the classifiers of e-c-k-e-r/vall-e's model documentation are:
``head_ar`` (codes + stop), ``head_nar[l-1]`` per NAR level, ``head_mask`` for NAR-len, and
``head_len``, which reads the last prefix position of a NAR-len row and predicts the response
length as ``len_digits`` base-10 digits. The prefix is causal in every task, so that position
never sees the response: the len prediction costs nothing extra in training and one prefix pass
at inference.

``forward(batch)`` returns the training loss (token-mean cross-entropy over every target, plus
``len_loss_weight`` times the len loss, plus the router loss of MoE backbones) and per-task sums
of loss, tokens and correct top-1 predictions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from valle_cli.data import tasks
from valle_cli.errors import InputError
from valle_cli.model import build_backbone
from valle_cli.model.config import ModelConfig
from valle_cli.model.guided_attention import guided_attention_loss
from valle_cli.model.masks import prefix_bidirectional_mask


@dataclass
class Batch:
    """``tasks.SequenceBatch`` as tensors on a device, plus host-side facts (no device sync needed)."""

    segment: Tensor  # (B, S) int8
    text: Tensor  # (B, S) long
    prompt: Tensor  # (B, K, S) long
    response: Tensor  # (B, K, S) long
    positions: Tensor  # (B, S) long
    lang: Tensor  # (B,)
    task: Tensor  # (B,)
    level: Tensor  # (B,)
    bidir_start: Tensor  # (B,)
    targets: Tensor  # (B, S) long, tasks.IGNORE where no loss
    len_position: Tensor  # (B,)
    len_target: Tensor  # (B,)
    tasks_present: tuple[int, ...]  # task tokens found in the batch
    has_len: bool
    tokens: int  # real positions

    @classmethod
    def from_numpy(cls, b: tasks.SequenceBatch, device: str | torch.device = "cpu") -> Batch:
        def t(a: np.ndarray) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)

        return cls(segment=t(b.segment), text=t(b.text), prompt=t(b.prompt), response=t(b.response),
                   positions=t(b.positions), lang=t(b.lang), task=t(b.task), level=t(b.level),
                   bidir_start=t(b.bidir_start), targets=t(b.targets), len_position=t(b.len_position),
                   len_target=t(b.len_target), tasks_present=tuple(sorted(set(b.task.tolist()))),
                   has_len=bool((b.len_target >= 0).any()), tokens=b.tokens)


@dataclass
class ModelOutput:
    loss: Tensor  # scalar: what the optimiser minimises
    # name -> (loss sum, tokens, correct top-1); names: ar, nar1.., mask, len (len: exact durations)
    stats: dict[str, tuple[Tensor, float, Tensor]] = field(default_factory=dict)
    aux_loss: Tensor | None = None


def task_name(task: int, n_codebooks: int) -> str:
    return "ar" if task == 0 else ("mask" if task == n_codebooks else f"nar{task}")


@dataclass(frozen=True)
class GuideConfig:
    """Guided attention in training (model/guided_attention.py); weight 0 = off."""

    weight: float = 0.0  # of the penalty's mean, added to the loss
    width: float = 0.2  # g of the diagonal band, in fractions of the text and speech lengths
    layer: int = -1  # the guided layer; -1 = the middle one, n_layers // 2
    heads: int = 1  # heads 0..heads-1 of that layer are guided


class CodecLM(nn.Module):
    def __init__(self, config: ModelConfig, len_loss_weight: float = 0.1, guide: GuideConfig = GuideConfig()):
        super().__init__()
        self.config = config
        self.len_loss_weight = len_loss_weight
        self.guide = guide
        d, k, v = config.dim, config.n_codebooks, config.codebook_size
        self.text_emb = nn.Embedding(config.text_vocab_size, d)
        self.lang_emb = nn.Embedding(config.n_langs, d)
        self.task_emb = nn.Embedding(k + 1, d)
        self.sep_emb = nn.Parameter(torch.randn(d) * 0.02)  # in-fill: between the prefix and the suffix
        self.prompt_emb = nn.ModuleList(nn.Embedding(v, d) for _ in range(k))
        self.resp_ar = nn.Embedding(v + 1, d)  # + the start id
        self.resp_mask = nn.Embedding(v + 1, d)  # + the mask id
        self.resp_nar = nn.ModuleList(nn.Embedding(v, d) for _ in range(k - 1))  # level j as NAR input
        self.backbone = build_backbone(config)
        self.head_ar = nn.Linear(d, v + 1)  # + stop
        self.head_nar = nn.ModuleList(nn.Linear(d, v) for _ in range(k - 1))
        self.head_mask = nn.Linear(d, v)
        self.head_len = nn.Linear(d, config.len_digits * 10)
        for module in [self.text_emb, self.lang_emb, self.task_emb, self.resp_ar, self.resp_mask,
                       *self.prompt_emb, *self.resp_nar]:
            nn.init.normal_(module.weight, std=0.02)
        for head in [self.head_ar, self.head_mask, self.head_len, *self.head_nar]:
            nn.init.normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        self.guided_layer: int | None = None  # the layer whose first heads are guided (an index: no second
        if guide.weight > 0:                  # reference to the module, which would double its state_dict keys)
            layer = guide.layer if guide.layer >= 0 else config.n_layers // 2
            if config.arch != "transformer":
                raise InputError(f"guided attention needs the native backbone (arch transformer), not {config.arch}")
            if not (0 <= layer < config.n_layers and 1 <= guide.heads <= config.n_heads):
                raise InputError(f"guided attention: layer {guide.layer} / heads {guide.heads} do not fit a model of "
                                 f"{config.n_layers} layers x {config.n_heads} heads")
            self.guided_layer = layer
            self.guided.probe_heads = guide.heads

    @property
    def guided(self) -> nn.Module | None:
        """The attention module of the guided layer, or None."""
        return None if self.guided_layer is None else self.backbone.layers[self.guided_layer].attention

    # ------------------------------------------------------------------------- embeddings

    def embed(self, batch: Batch) -> Tensor:
        """(B, S, D) input embeddings of a laid-out batch (tasks.collate)."""
        seg, k = batch.segment, self.config.n_codebooks

        def where(kind_mask: Tensor, values: Tensor) -> Tensor:  # (B, S) bool, (B, S, D) -> masked values
            return values * kind_mask.unsqueeze(-1).to(values.dtype)

        x = where(seg == tasks.TEXT, self.text_emb(batch.text))  # (B, S, D)
        x = x + where(seg == tasks.LANG, self.lang_emb(batch.lang)[:, None].expand_as(x))
        x = x + where(seg == tasks.TASK, self.task_emb(batch.task)[:, None].expand_as(x))
        x = x + where(seg == tasks.SEP, self.sep_emb.expand_as(x))
        is_prompt = seg == tasks.PROMPT
        for level in range(k):
            x = x + where(is_prompt, self.prompt_emb[level](batch.prompt[:, level]))
        is_resp = seg == tasks.RESPONSE
        if 0 in batch.tasks_present:
            x = x + where(is_resp & (batch.task == 0)[:, None], self.resp_ar(batch.response[:, 0]))
        if k in batch.tasks_present:
            x = x + where(is_resp & (batch.task == k)[:, None], self.resp_mask(batch.response[:, 0]))
        nar_levels = [t for t in batch.tasks_present if 0 < t < k]
        if nar_levels:
            top = max(nar_levels)
            is_nar = (batch.task > 0) & (batch.task < k)  # (B,)
            for j in range(top):  # input level j feeds targets j + 1 (and above, when summing)
                uses = (j < batch.level) if self.config.audio_embedding_sums else (j == batch.level - 1)
                # AR and NAR-len rows hold the start / mask id (= codebook_size) in level 0; they are
                # masked out here, but the lookup must stay in range.
                codes = batch.response[:, j].clamp(max=self.config.codebook_size - 1)
                x = x + where(is_resp & (is_nar & uses)[:, None], self.resp_nar[j](codes))
        return x

    # ------------------------------------------------------------------------- heads

    def head(self, task: int) -> nn.Linear:
        k = self.config.n_codebooks
        return self.head_ar if task == 0 else (self.head_mask if task == k else self.head_nar[task - 1])

    def len_logits(self, hidden: Tensor) -> Tensor:
        """(..., D) -> (..., len_digits, 10)."""
        return self.head_len(hidden).unflatten(-1, (self.config.len_digits, 10))

    def predict_len(self, hidden: Tensor) -> Tensor:
        """(B, D) hidden state of the last prefix position -> (B,) predicted response frames."""
        digits = self.len_logits(hidden).argmax(-1)  # (B, len_digits)
        return (digits * digit_powers(self.config.len_digits, hidden.device)).sum(-1)

    # ------------------------------------------------------------------------- training forward

    def hidden_states(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(B, S, D) last hidden states and the backbone's aux loss, for a whole batch."""
        x = self.embed(batch)
        valid = batch.segment != tasks.PAD
        mask = prefix_bidirectional_mask(valid, batch.bidir_start)
        out = self.backbone(x, batch.positions, mask, token_mask=valid)
        return out.hidden, out.aux_loss

    def forward(self, batch: Batch) -> ModelOutput:
        hidden, aux = self.hidden_states(batch)
        k = self.config.n_codebooks
        at = batch.targets != tasks.IGNORE  # (B, S)
        h = hidden[at]  # (N, D): only positions with a loss reach a head
        targets = batch.targets[at]  # (N,)
        task_at = batch.task[:, None].expand_as(batch.targets)[at]  # (N,)
        n_total = max(int(targets.numel()), 1)
        total = hidden.new_zeros((), dtype=torch.float32)
        stats: dict[str, tuple[Tensor, float, Tensor]] = {}
        for task in batch.tasks_present:
            rows = task_at == task
            logits = self.head(task)(h[rows]).float()  # (n, V or V + 1)
            y = targets[rows]
            loss_sum = F.cross_entropy(logits, y, reduction="sum")
            total = total + loss_sum
            correct = (logits.argmax(-1) == y).sum()
            stats[task_name(task, k)] = (loss_sum.detach(), float(y.numel()), correct.detach().float())
        loss = total / n_total
        if batch.has_len:
            rows = batch.len_target >= 0
            b_idx = torch.nonzero(rows).squeeze(1)
            h_len = hidden[b_idx, batch.len_position[b_idx]]  # (n, D)
            logits = self.len_logits(h_len).float()  # (n, digits, 10)
            digits = len_digits(batch.len_target[b_idx], self.config.len_digits)  # (n, digits)
            len_sum = F.cross_entropy(logits.flatten(0, 1), digits.flatten(), reduction="sum") / self.config.len_digits
            loss = loss + self.len_loss_weight * len_sum / len(b_idx)
            exact = (logits.argmax(-1) == digits).all(-1).sum()
            stats["len"] = (len_sum.detach(), float(len(b_idx)), exact.detach().float())
        guided = self.guided
        if guided is not None and guided.probed is not None:
            align_sum, n_align = guided_attention_loss(guided.probed, batch.segment, self.guide.width)
            guided.probed = None
            if n_align:
                loss = loss + self.guide.weight * align_sum / n_align
                stats["align"] = (align_sum.detach(), float(n_align), align_sum.new_zeros(()))
        if aux is not None:
            loss = loss + aux
        return ModelOutput(loss=loss, stats=stats, aux_loss=aux)


def digit_powers(digits: int, device: torch.device | str) -> Tensor:
    """(digits,) 10 ** (digits - 1) .. 1: the place values of the len head's digits, most significant first."""
    return 10 ** torch.arange(digits - 1, -1, -1, device=device)


def len_digits(frames: Tensor, digits: int) -> Tensor:
    """(B,) frame counts -> (B, digits) base-10 digits, most significant first (clipped to 10**digits - 1)."""
    frames = frames.clamp(0, 10**digits - 1)
    return (frames[:, None] // digit_powers(digits, frames.device)[None, :]) % 10


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters in all, in the backbone, and in embeddings + heads."""
    total = sum(p.numel() for p in model.parameters())
    backbone = sum(p.numel() for p in model.backbone.parameters()) if hasattr(model, "backbone") else total
    return {"total": total, "backbone": backbone, "embeddings_heads": total - backbone}


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of the backbone: 6 N + attention (PaLM appendix B)."""
    d, layers = config.dim, config.n_layers
    kv = config.kv_heads * config.head_dim
    attn_params = d * d * 2 + d * kv * 2  # wq, wo, wk, wv
    ffn = 3 * d * config.hidden_dim
    if config.moe_experts:
        ffn = ffn * (config.moe_top_k + int(config.moe_shared_expert))
    n = layers * (attn_params + ffn)
    return 6.0 * n + 12.0 * layers * d * seq_len

