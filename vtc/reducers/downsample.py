"""Spatially uniform downsampling: keep k tokens on an even lattice over each view's grid.

The "just use fewer patches" baseline that VTC-Bench and UniPruneBench ask every method to beat. It ignores the
content entirely. With several views or frames the budget is split over them in proportion to their size.

With `VisualTokens.valid` the lattice covers the valid tokens only (`vtc.ops.grid.view_lattice`): the budget is
split over the views in proportion to their valid tokens, and a view whose valid tokens form a rectangle (LLaVA-NeXT
unpadding removes whole rows or columns) gets the uniform lattice of that rectangle; any other valid set gets k of
its tokens at even steps in row-major order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.grid import view_lattice
from ..ops.select import pad_index_lists, pruned_selection
from ..ops.valid import sample_groups
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
        h, w = self.grid_of(vt)
        idx = view_lattice(k, h, w, vt.num_views()).to(x.device).expand(x.shape[0], k).contiguous()  # [B, k]
        return pruned_selection(x, idx)

    def _reduce_valid(self, vt: VisualTokens, ks: Tensor, query: Query | None) -> Selection:
        x = vt.tokens  # [B, N, D]
        h, w = self.grid_of(vt)
        rows: list[Tensor] = [x.new_empty(0, dtype=torch.long)] * x.shape[0]
        for group in sample_groups(vt.valid):  # one lattice per distinct valid pattern (same pattern, same k)
            b0 = int(group[0])
            lat = view_lattice(int(ks[b0]), h, w, vt.num_views(), vt.valid[b0]).to(x.device)
            for b in group.tolist():
                rows[b] = lat
        idx, mask = pad_index_lists(rows, x.device)
        return pruned_selection(x, idx, mask)
