"""Spatially uniform downsampling: keep k tokens on an even lattice over each view's grid.

The "just use fewer patches" baseline that VTC-Bench and UniPruneBench ask every method to beat. It ignores the
content entirely. With several views or frames the budget is split over them in proportion to their size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import split_budget
from ..ops.grid import uniform_grid_indices
from ..ops.select import pruned_selection
from ..types import Query, Selection, VisualTokens
from .base import Reducer, ReducerConfig, register_reducer


@dataclass
class DownsampleConfig(ReducerConfig):
    pass


@register_reducer("downsample", config=DownsampleConfig)
class Downsample(Reducer):
    """Keep a uniform spatial lattice of k tokens (content-independent)."""

    def _reduce(self, vt: VisualTokens, k: int, query: Query | None) -> Selection:
        x = vt.tokens  # [B, N, D]
        b, n, _ = x.shape
        h, w = self.grid_of(vt)
        v = vt.num_views()
        parts = [
            uniform_grid_indices(kv, h, w) + i * h * w for i, kv in enumerate(split_budget(k, [h * w] * v)) if kv > 0
        ]
        idx = torch.cat(parts).to(x.device).expand(b, k).contiguous()  # [B, k]
        return pruned_selection(x, idx)
