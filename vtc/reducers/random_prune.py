"""Random pruning: keep a uniformly random subset of k tokens (in order).

The baseline that UniPruneBench (arXiv 2511.02650) found hard to beat at moderate ratios. With `seed` set, each
call draws from a fresh generator seeded with it (reproducible across calls); otherwise from torch's global RNG.
With `VisualTokens.valid`, the k are drawn among the valid tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.select import pruned_selection, topk_ascending, topk_per_row
from ..types import Query, Selection, VisualTokens
from .base import Reducer, ReducerConfig, register_reducer


@dataclass
class RandomConfig(ReducerConfig):
    seed: int | None = None  # fixed seed per call; None uses torch's global RNG


@register_reducer("random", config=RandomConfig)
class RandomPrune(Reducer):
    """Keep k tokens chosen uniformly at random per sample."""

    stochastic = True

    def _scores(self, vt: VisualTokens) -> Tensor:
        b, n, _ = vt.tokens.shape
        gen = None if self.config.seed is None else torch.Generator().manual_seed(self.config.seed)
        return torch.rand(b, n, generator=gen).to(vt.tokens.device)  # [B, N]

    def _reduce(self, vt: VisualTokens, k: int, query: Query | None) -> Selection:
        return pruned_selection(vt.tokens, topk_ascending(self._scores(vt), k))

    def _reduce_valid(self, vt: VisualTokens, ks: Tensor, query: Query | None) -> Selection:
        idx, mask = topk_per_row(self._scores(vt), ks, vt.valid)
        return pruned_selection(vt.tokens, idx, mask)
