"""M3: Matryoshka Multimodal Models — nested average pooling of the projector-output grid.

Cai et al., arXiv 2405.17430 (https://github.com/mu-cai/matryoshka-mm). The LLM is fine-tuned on visual tokens
average-pooled from the 24×24 projector grid with kernel = stride = √(576/s), s ∈ {576, 144, 36, 9, 1}, so one
model serves every scale; at inference the user picks s. On LLaVA-NeXT every crop and the thumbnail are pooled
separately (before unpadding). Nothing is learned here: the reducer is the pooling operator.

Pinned choices:

* Bins are contiguous and non-overlapping (`vtc.ops.grid.bin_edges`: bin i covers ⌊i·h/kh⌋ … ⌊(i+1)·h/kh⌋ − 1), so
  when the grid divides they equal `avg_pool2d(kernel=stride)`, and nested scales are consistent: 576→144→36 is
  576→36. Outputs are in row-major order of the pooled grid, view after view.
* Any budget k is kept exactly. With views/frames, k is split over them by `vtc.budget.split_budget` (largest
  remainder, earlier views first on ties) and every view is pooled on its own.
* A view's k_v tokens form the kh×kw grid with kh·kw = k_v, kh ≤ h, kw ≤ w, whose aspect is closest to h/w
  (`factor_grid`), as long as it lies within a factor 2 of that aspect. Otherwise (e.g. a prime k_v, or 13 of
  24×24, whose only pair 1×13 would make strips) the view is cut into kh ≈ √(k_v·h/w) bands of rows, and band r
  into c_r near-equal column bins with Σ c_r = k_v (earlier bands get the extra bin): still exact and contiguous.
* `sel.info["grid"]` is the pooled layout: `(kh, kw)` for a regular grid, `(kh, (c_1, …, c_kh))` for banded bins;
  one layout when all views share it, else a list with one per view. `weights` are the bin sizes and
  `assignment` maps every input to its bin.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..budget import resolve_budget, split_budget
from ..ops.grid import bin_edges, factor_grid, partition_pool_assignment, scatter_mean
from ..types import Query, Selection, VisualTokens
from .base import Reducer, ReducerConfig, register_reducer

Layout = tuple[int, int] | tuple[int, tuple[int, ...]]


@dataclass
class MatryoshkaConfig(ReducerConfig):
    max_aspect_error: float = 2.0  # a factor pair kh×kw is used if its aspect is within this factor of the grid's


def pool_layout(k: int, h: int, w: int, max_aspect_error: float = 2.0) -> tuple[Tensor, Layout]:
    """Bin id (row-major in the pooled layout) of every cell of an h×w grid for k bins: `[h*w]` int64, layout."""
    fg = factor_grid(k, h, w, max_aspect_error)
    if fg is not None:
        return partition_pool_assignment(h, w, *fg), fg
    kh = min(h, k, max(math.ceil(k / w), round(math.sqrt(k * h / w))))
    per_band = [k // kh + (r < k % kh) for r in range(kh)]  # near-equal, earlier bands first
    band = torch.bucketize(torch.arange(h), bin_edges(h, kh)[1:], right=True)  # [h] band of each row
    offsets = torch.tensor([0, *per_band]).cumsum(0)  # [kh + 1]
    cols = torch.stack([torch.bucketize(torch.arange(w), bin_edges(w, c)[1:], right=True) for c in per_band])
    assign = offsets[band][:, None] + cols[band]  # [h, w]
    return assign.reshape(-1), (kh, tuple(per_band))


@register_reducer("matryoshka", config=MatryoshkaConfig)
class Matryoshka(Reducer):
    """Average-pool each view's token grid to exactly k tokens (M3's nested scales for 576/144/36/9/1)."""

    merges = True

    def forward(
        self, tokens: Tensor | VisualTokens, budget: int | float, query: Tensor | Query | None = None
    ) -> Selection:
        sel = super().forward(tokens, budget, query)
        if "grid" not in sel.info:  # the base class's full-budget identity: every input is its own 1x1 bin
            sel.info["grid"] = self.grid_of(tokens if isinstance(tokens, VisualTokens) else VisualTokens(sel.tokens))
        return sel

    def _pool(self, vt: VisualTokens, k: int) -> Selection:
        x = vt.tokens  # [B, N, D]
        b, n, _ = x.shape
        h, w = self.grid_of(vt)
        parts, layouts, offset = [], [], 0
        for kv in split_budget(k, [h * w] * vt.num_views()):
            if kv == 0:  # a view with no budget is dropped entirely
                parts.append(torch.full((h * w,), -1, dtype=torch.long))
                layouts.append((0, 0))
                continue
            assign, layout = pool_layout(kv, h, w, self.config.max_aspect_error)
            parts.append(assign + offset)
            layouts.append(layout)
            offset += kv
        assignment = torch.cat(parts).to(x.device).expand(b, n).contiguous()  # [B, N]
        tokens, mass = scatter_mean(x, assignment, k)  # [B, k, D], [B, k]
        grid = layouts[0] if all(lay == layouts[0] for lay in layouts) else layouts
        mask = torch.ones(b, k, dtype=torch.bool, device=x.device)
        return Selection(tokens, None, mask, weights=mass, assignment=assignment, info={"grid": grid})

    def _reduce(self, vt: VisualTokens, k: int, query: Query | None) -> Selection:
        return self._pool(vt, k)

    def all_scales(
        self, tokens: Tensor | VisualTokens, scales: Iterable[int | float] = (576, 144, 36, 9, 1)
    ) -> dict[int, Tensor]:
        """Every scale from one call: `{count: [B, count, D]}`, each equal to `forward(tokens, count).tokens`.

        `scales` are budgets in the usual sense (tokens per sample, or fractions); a count above N raises.
        """
        vt = self._check_tokens(tokens)
        n = vt.tokens.shape[1]
        out = {}
        for s in scales:
            k = resolve_budget(s, n, who=self.name)
            out[k] = vt.tokens if k == n else self._pool(vt, k).tokens
        return out
