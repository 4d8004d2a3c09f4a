"""MMTok: multimodal coverage maximisation for efficient inference of VLMs.

Dong et al., arXiv 2508.18264 (ICLR 2026), https://github.com/Ironieser/MMTok. The kept tokens should cover both
the question and the image. With m question tokens z_t, N projector-output tokens x_j and vision-encoder
features v_j, two nonnegative coverage matrices over the N candidate columns are built:

    P[t, j] = softmax_j(cos(z_t, x_j) / tau_text) / m          (text rows, m = real question tokens)
    Q[i, j] = alpha * softmax_j(cos(v_i, v_j) / tau_vision) / N  (vision rows)

and the facility-location coverage f(S) = sum over the rows of [P; Q] of max_{j in S} is maximised greedily
(`vtc.ops.coverage.greedy_coverage`); the kept indices are sorted ascending. Defaults follow the official code for
LLaVA (alpha 0.5, tau_text 0.02, tau_vision 0.2; the official Qwen2.5-VL setting is tau_text 0.01).

Pinned choices:
* v = `VisualTokens.features` (the encoder outputs, CLS excluded) when given, else the tokens themselves;
* z = the `Query` embeddings as given; the official pipeline first strips stop-words and answer-format prompts
  and embeds each keyword alone without BOS, which is the caller's (adapter's) job;
* padded query positions (mask False) are rows that contribute nothing, and m counts the real ones;
* one selection over all N tokens of a sample (the official LLaVA-NeXT integration splits the budget per crop
  and drops padding/newline tokens; that belongs to the adapter);
* scores in float32, ties to the lowest index.
* `VisualTokens.valid`: the invalid tokens leave both matrices (no candidate column, no vision row, no share of
  the softmaxes, N = the valid count), exactly as if they were not in the input. This is what the official
  LLaVA-NeXT integration's dropping of padding amounts to, over one selection for the whole sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.coverage import greedy_coverage
from ..ops.diversity import cosine_similarity
from ..ops.select import prefix_indices, pruned_selection
from ..ops.valid import masked_softmax
from ..types import Query, Selection, VisualTokens
from .base import Reducer, ReducerConfig, register_reducer


@dataclass
class MMTokConfig(ReducerConfig):
    alpha: float = 0.5  # weight of the vision-coverage rows Q against the text-coverage rows P
    tau_text: float = 0.02  # softmax temperature of text-to-vision cosines (official Qwen2.5-VL setting: 0.01)
    tau_vision: float = 0.2  # softmax temperature of vision-to-vision cosines

    def __post_init__(self) -> None:
        for name in ("tau_text", "tau_vision"):
            if not getattr(self, name) > 0:
                raise ValueError(f"mmtok: {name}={getattr(self, name)!r} must be > 0")
        if not self.alpha >= 0:
            raise ValueError(f"mmtok: alpha={self.alpha!r} must be >= 0")


@register_reducer("mmtok", config=MMTokConfig)
class MMTok(Reducer):
    """Keep the k tokens that greedily maximise the coverage of the question's tokens and of all vision tokens."""

    needs_query = True
    uses = ("features",)

    def _reduce(self, vt: VisualTokens, k: int, query: Query | None) -> Selection:
        cfg = self.config
        x = vt.tokens  # [B, N, D]
        v = vt.features if vt.features is not None else x  # [B, N, Dv]
        n = x.shape[1]
        qmask = query.valid_mask()  # [B, T]
        m = qmask.sum(dim=-1, keepdim=True, dtype=torch.long).unsqueeze(-1)  # [B, 1, 1]
        p = (cosine_similarity(query.embeds, x) / cfg.tau_text).softmax(dim=-1) / m  # [B, T, N]
        q = cfg.alpha * (cosine_similarity(v) / cfg.tau_vision).softmax(dim=-1) / n  # [B, N, N]
        rows = torch.cat([qmask, torch.ones_like(qmask[:, :1]).expand(-1, n)], dim=1)  # [B, T + N]
        order, idx, gains = greedy_coverage(torch.cat([p, q], dim=1), k, row_mask=rows)  # [B, k] each
        return pruned_selection(x, idx, order=order, coverage=gains.sum(dim=-1))

    def _reduce_valid(self, vt: VisualTokens, ks: Tensor, query: Query | None) -> Selection:
        cfg = self.config
        x = vt.tokens  # [B, N, D]
        v = vt.features if vt.features is not None else x  # [B, N, Dv]
        valid = vt.valid  # [B, N]
        cols = valid.unsqueeze(1)  # [B, 1, N]
        n = valid.sum(dim=-1).view(-1, 1, 1)  # [B, 1, 1] valid tokens
        qmask = query.valid_mask()  # [B, T]
        m = qmask.sum(dim=-1, keepdim=True, dtype=torch.long).unsqueeze(-1)  # [B, 1, 1]
        p = masked_softmax(cosine_similarity(query.embeds, x) / cfg.tau_text, cols) / m  # [B, T, N]
        q = cfg.alpha * masked_softmax(cosine_similarity(v) / cfg.tau_vision, cols) / n  # [B, N, N]
        rows = torch.cat([qmask, valid], dim=1)  # [B, T + N]: invalid tokens are no rows to cover
        order, _, gains = greedy_coverage(torch.cat([p, q], dim=1), int(ks.max()), row_mask=rows, candidates=valid)
        idx, mask = prefix_indices(order, ks)
        coverage = gains.masked_fill(~mask, 0.0).sum(dim=-1)
        return pruned_selection(x, idx, mask, order=order.masked_fill(~mask, -1), coverage=coverage)
