"""Random pruning: keep a uniformly random subset of k tokens (in order).

The baseline that UniPruneBench (arXiv 2511.02650) found hard to beat at moderate ratios. With `seed` set, each
call draws from a fresh generator seeded with it (reproducible across calls); otherwise from torch's global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.select import pruned_selection, topk_ascending
from ..types import Query, Selection, VisualTokens
from .base import Reducer, ReducerConfig, register_reducer


@dataclass
class RandomConfig(ReducerConfig):
    seed: int | None = None  # fixed seed per call; None uses torch's global RNG


@register_reducer("random", config=RandomConfig)
class RandomPrune(Reducer):
    """Keep k tokens chosen uniformly at random per sample."""

    stochastic = True

    def _reduce(self, vt: VisualTokens, k: int, query: Query | None) -> Selection:
        x = vt.tokens  # [B, N, D]
        b, n, _ = x.shape
        gen = None if self.config.seed is None else torch.Generator().manual_seed(self.config.seed)
        scores = torch.rand(b, n, generator=gen).to(x.device)  # [B, N]
        idx = topk_ascending(scores, k)
        return pruned_selection(x, idx)
