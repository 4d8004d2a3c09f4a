"""SparseVLM: visual token sparsification for efficient vision-language model inference.

Zhang et al., arXiv 2410.04417 (ICML 2025; https://github.com/Gumpest/SparseVLMs). Training-free, inside the LLM:

* **Text raters.** Once per prompt, the text tokens after the image are rated by their relevance to it, from the
  LLM's input embeddings: R_t = mean over visual tokens v of softmax_t(H_v · H_t); the raters are the text tokens
  with R_t above the mean.
* **Visual scores.** At each sparsification layer, P = the head-mean attention of the raters (query rows) over the
  visual tokens (softmax over the whole sequence, as the layer computes it); a visual token's score is its mean
  over the raters.
* **Adaptive deletion.** The number of visual tokens deleted at a layer is N = ⌊λ·(L_v − rank(P))⌋: the rank of
  the raters' attention measures how much of the image they can tell apart, and the rest is redundant.
* **Token recycling.** Of the deleted tokens, the ⌊τ·N⌋ + 1 with the highest scores (τ = 30%) are clustered by
  density-peak clustering with k-NN density (`vtc.ops.cluster.dpc_knn`, C = ⌊m/10⌋ + 1 clusters for m tokens,
  k = C) and every cluster is averaged into one recycled token.
* Three sparsification layers (after decoder layers 2, 6 and 15 of LLaVA-1.5-7B's 32); recycled tokens are
  visual tokens for the later layers.

Pinned choices:

* Stages: `layers` are the first layers that see the reduced sequence, so the attention comes from the layer
  before (the official code prunes the output of layers 2/6/15: here layers 3/7/16 of 32, scaled to the depth).
  The attention comes from that layer's q/k captured beside SDPA, never from eager attention.
* Budget: `budget` caps the visual tokens *selected* at each stage with a geometric schedule, n·(k/n)^(s/S) for
  stage s of S, ending at k (as `pdrop`); the rank rule may delete more. λ (`scale`) = 1 is the official
  adaptive code (its video branch keeps exactly rank(P) tokens); λ = 0 leaves only the budget schedule, which is
  what the released LLaVA code runs with its hard-coded per-budget counts. Per sample: each sample has its own
  raters, rank and counts. The rank is `torch.linalg.matrix_rank` of the sample's rater × visual block in float32
  with the relative tolerance max(rows, columns)·ε of that block.
* Recycled tokens come on top of the selected ones (as in the official code) and count in the adapter's
  effective (layer-averaged) number of visual tokens. Each sits at the column, and so the position, of its
  cluster's centre (the official code appends them after the kept visual tokens and renumbers positions).
* Raters: "text after the image" is the real text after the sample's last visual token (all its text if none
  follows); with no text token above the mean relevance (all equal), every text token rates. Ties in scores go
  to the lower column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.cluster import cluster_means, dpc_knn
from .base import InLLMReducer, ReducerConfig, StageDecision, register_reducer, top_visual

DEFAULT_FRACTIONS = (3 / 32, 7 / 32, 16 / 32)  # after layers 2, 6, 15 of LLaVA-1.5's 32


@dataclass
class SparseVLMConfig(ReducerConfig):
    layers: tuple[int, ...] | None = None  # first layer of each reduced stage; None: 3/32, 7/32, 16/32 of the depth
    scale: float = 1.0  # λ: delete ⌊λ·(L_v − rank(P))⌋ visual tokens per stage; 0: the budget schedule alone
    recycle: bool = True  # aggregate the best deleted tokens into recycled tokens
    recycle_ratio: float = 0.3  # τ: share of the deleted tokens (best scored) that are recycled
    cluster_ratio: float = 0.1  # recycled tokens per recycled source: C = ⌊m·ratio⌋ + 1

    def __post_init__(self) -> None:
        if self.scale < 0:
            raise ValueError(f"sparsevlm: scale={self.scale!r} must be >= 0")
        for name in ("recycle_ratio", "cluster_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"sparsevlm: {name}={getattr(self, name)!r} must lie in [0, 1]")


@register_reducer("sparsevlm", config=SparseVLMConfig)
class SparseVLM(InLLMReducer):
    """Text-rater attention scores, rank-adaptive deletion at several layers, deleted tokens recycled."""

    adaptive = True

    def plan(self, n_visual: int, k: int, num_layers: int) -> list[tuple[int, int]]:
        layers = self._layers_at(self.config.layers, DEFAULT_FRACTIONS, num_layers)
        s = len(layers)
        counts = [max(1, round(n_visual * (k / n_visual) ** ((i + 1) / s))) for i in range(s)]
        counts[-1] = k
        return list(zip(layers, counts, strict=True))

    # ------------------------------------------------------------------ raters and scores
    def raters(self, ctx) -> Tensor:
        """`[B, L]` bool rater columns (chosen at the first stage from the input embeddings, then followed)."""
        if "raters" not in ctx.memo:
            text = ctx.text_after_visual()  # [B, L]
            emb = ctx.embeds.float()
            rel = torch.einsum("bvd,btd->bvt", emb, emb)  # [B, L, L] visual rows × text columns
            rel = rel.masked_fill(~text[:, None, :], float("-inf")).softmax(-1)
            rel = rel.nan_to_num(0.0) * ctx.visual[:, :, None]  # rows of non-visual columns: 0
            r = rel.sum(1) / ctx.visual.sum(-1, keepdim=True).clamp(min=1)  # [B, L] mean over visual tokens
            mean = (r * text).sum(-1, keepdim=True) / text.sum(-1, keepdim=True).clamp(min=1)
            chosen = text & (r > mean)
            chosen = torch.where(chosen.any(-1, keepdim=True), chosen, text)
            ctx.memo["raters"] = [ctx.src[b][chosen[b]] for b in range(chosen.shape[0])]  # input columns
        cols = ctx.memo["raters"]
        return torch.stack([torch.isin(ctx.src[b], cols[b]) for b in range(len(cols))])

    def rater_attention(self, ctx) -> tuple[Tensor, Tensor, Tensor]:
        """P `[B, R, L]` (visual columns only, padded rows 0), its row mask `[B, R]`, scores `[B, L]`."""
        probs, rmask = ctx.attention_rows(self.raters(ctx))
        p = probs * ctx.visual[:, None, :]
        score = p.sum(1) / rmask.sum(-1, keepdim=True).clamp(min=1)
        return p, rmask, score

    def score(self, ctx) -> Tensor:
        return self.rater_attention(ctx)[2]

    # ------------------------------------------------------------------ one stage
    def select(self, ctx, n_keep: Tensor) -> StageDecision:
        p, rmask, score = self.rater_attention(ctx)
        nv = ctx.visual.sum(-1)  # [B]
        eps = torch.finfo(torch.float32).eps
        rtol = torch.maximum(rmask.sum(-1), nv).clamp(min=1).float() * eps
        rank = torch.linalg.matrix_rank(p, rtol=rtol)  # [B]
        n_del = torch.floor(self.config.scale * (nv - rank).clamp(min=0).float()).long()
        n_after = torch.minimum(n_keep, nv - n_del).clamp(min=0)
        n_after = torch.maximum(n_after, (nv > 0).long().clamp(max=n_keep))  # at least one token stays
        keep = top_visual(score, ctx.visual, n_after)
        if not self.config.recycle:
            return StageDecision(keep)
        return self.recycle(ctx, score, keep)

    def recycle(self, ctx, score: Tensor, keep: Tensor) -> StageDecision:
        """Cluster the best ⌊τ·N⌋ + 1 deleted tokens of each sample (DPC-kNN) into recycled tokens (cluster means)."""
        c = self.config
        dropped = ctx.visual & ~keep  # [B, L]
        b, seq, d = ctx.hidden.shape
        hosts, values, group = [], [], torch.full((b, seq), -1, dtype=torch.long, device=keep.device)
        for i in range(b):
            cols = dropped[i].nonzero().squeeze(-1)
            if cols.numel() == 0:
                hosts.append(cols)
                values.append(ctx.hidden.new_zeros(0, d, dtype=torch.float32))
                continue
            m = min(cols.numel(), int(cols.numel() * c.recycle_ratio) + 1)
            best = cols[torch.sort(score[i, cols], descending=True, stable=True).indices[:m]]  # [m]
            nc = min(m, int(m * c.cluster_ratio) + 1)
            x = ctx.hidden[i, best].float()  # [m, D]
            centers, assign = dpc_knn(x, nc)
            hosts.append(best[centers])
            values.append(cluster_means(x, assign, nc))
            group[i, best] = assign
        width = max(h.numel() for h in hosts)
        host = torch.full((b, width), -1, dtype=torch.long, device=keep.device)
        value = ctx.hidden.new_zeros(b, width, d, dtype=torch.float32)
        for i, (h, v) in enumerate(zip(hosts, values, strict=True)):
            host[i, : h.numel()] = h
            value[i, : h.numel()] = v
        return StageDecision(keep, host=host, value=value, group=group)
