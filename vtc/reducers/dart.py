"""DART: stop looking for important tokens; duplication matters more.

Wen et al., arXiv 2502.11494 (https://github.com/ZichenWen1/DART). At layer K a few *pivot* visual tokens are chosen
by the L1 norm of their keys; every other visual token is scored by its cosine similarity to the pivots (on the hidden
states entering layer K) and the least duplicated ones are kept, pivots included. No attention map is needed, so it
is compatible with fused attention by construction.

Pinned choices: keys are those of layer K−1 (rotated, heads concatenated), `num_pivots` = 8, a token's duplication
is its maximum cosine similarity to any pivot; `budget` is the visual tokens kept from layer K on (pivots count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import InLLMReducer, ReducerConfig, register_reducer


@dataclass
class DARTConfig(ReducerConfig):
    layer: int = 2  # K: first layer that sees the reduced sequence
    num_pivots: int = 8  # pivot tokens, chosen by key L1 norm


@register_reducer("dart", config=DARTConfig)
class DART(InLLMReducer):
    """Keep the visual tokens least similar to a few high-key-norm pivots."""

    def plan(self, n_visual: int, k: int, num_layers: int) -> list[tuple[int, int]]:
        return [(self._check_layer(self.config.layer, num_layers), k)]

    def score(self, ctx) -> Tensor:
        knorm = ctx.k.abs().sum(dim=(1, 3))  # [B, L] L1 norm over heads and channels
        knorm = knorm.masked_fill(~ctx.visual, float("-inf"))
        p = min(self.config.num_pivots, int(ctx.visual.sum(-1).min()))
        pivots = knorm.topk(p, dim=-1).indices  # [B, P]
        h = torch.nn.functional.normalize(ctx.hidden.float(), dim=-1)  # [B, L, D]
        hp = h.gather(1, pivots.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # [B, P, D]
        dup = torch.einsum("bld,bpd->blp", h, hp).amax(-1)  # [B, L]
        score = -dup
        return score.scatter(1, pivots, float("inf"))
