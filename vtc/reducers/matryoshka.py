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
* `VisualTokens.valid` (e.g. the tokens LLaVA-NeXT's unpadding keeps): only valid tokens are pooled, and sample b
  keeps k_b tokens. k_b is split over the views by their valid counts; a view whose valid tokens form an h'×w'
  rectangle (unpadding removes whole rows/columns) pools that rectangle as above; any other valid set is pooled as
  a 1×M strip of its valid tokens in row-major order (contiguous runs, layout `(1, k_v)` or `(1, (k_v,))`).
  Invalid tokens go to no bin (assignment −1). `info["grid"]` is then a list with one entry per sample. The
  official M3 code pools each crop before unpadding and then unpads the pooled grid; vtc pools the tokens the
  model keeps, so every bin holds only real tokens and the count is exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..budget import resolve_budget, split_budget
from ..ops.grid import bin_edges, factor_grid, partition_pool_assignment, scatter_mean
from ..ops.valid import sample_groups, valid_rectangle
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


def pool_views(
    k: int, h: int, w: int, views: int = 1, valid: Tensor | None = None, max_aspect_error: float = 2.0
) -> tuple[Tensor, list]:
    """Bin of every token of `views` consecutive h×w grids for k bins in all: `[views*h*w]` int64 (−1: no bin,
    for a view without budget or an invalid token) and the layout of every view (see the module docstring)."""
    hw = h * w
    per_view = None if valid is None else valid.reshape(views, hw).cpu()
    sizes = [hw] * views if per_view is None else per_view.sum(-1).tolist()
    parts, layouts, offset = [], [], 0
    for i, kv in enumerate(split_budget(k, sizes)):
        assign = torch.full((hw,), -1, dtype=torch.long)
        if kv == 0:  # a view with no budget is dropped entirely
            parts.append(assign)
            layouts.append((0, 0))
            continue
        if per_view is None:
            assign, layout = pool_layout(kv, h, w, max_aspect_error)
        elif (rect := valid_rectangle(per_view[i], h, w)) is not None:
            r0, c0, hh, ww = rect
            bins, layout = pool_layout(kv, hh, ww, max_aspect_error)
            assign.view(h, w)[r0 : r0 + hh, c0 : c0 + ww] = bins.view(hh, ww)
        else:  # not a rectangle: a 1×M strip of the valid tokens in row-major order
            bins, layout = pool_layout(kv, 1, sizes[i], max_aspect_error)
            assign[per_view[i]] = bins
        parts.append(torch.where(assign >= 0, assign + offset, -1))
        layouts.append(layout)
        offset += kv
    return torch.cat(parts), layouts


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
        assign, layouts = pool_views(k, h, w, vt.num_views(), max_aspect_error=self.config.max_aspect_error)
        assignment = assign.to(x.device).expand(b, n).contiguous()  # [B, N]
        tokens, mass = scatter_mean(x, assignment, k)  # [B, k, D], [B, k]
        mask = torch.ones(b, k, dtype=torch.bool, device=x.device)
        return Selection(tokens, None, mask, weights=mass, assignment=assignment, info={"grid": _one_layout(layouts)})

    def _reduce(self, vt: VisualTokens, k: int, query: Query | None) -> Selection:
        return self._pool(vt, k)

    def _reduce_valid(self, vt: VisualTokens, ks: Tensor, query: Query | None) -> Selection:
        x = vt.tokens  # [B, N, D]
        b, n, _ = x.shape
        h, w = self.grid_of(vt)
        assignment = torch.full((b, n), -1, dtype=torch.long, device=x.device)
        grids: list = [None] * b
        for group in sample_groups(vt.valid):  # one pooling layout per distinct valid pattern
            b0 = int(group[0])
            assign, layouts = pool_views(
                int(ks[b0]), h, w, vt.num_views(), vt.valid[b0], max_aspect_error=self.config.max_aspect_error
            )
            assignment[group] = assign.to(x.device)
            for i in group.tolist():
                grids[i] = _one_layout(layouts)
        kmax = int(ks.max())
        tokens, mass = scatter_mean(x, assignment, kmax)  # [B, kmax, D], [B, kmax] (padding: zeros)
        mask = torch.arange(kmax, device=x.device) < ks.unsqueeze(-1)
        return Selection(tokens, None, mask, weights=mass, assignment=assignment, info={"grid": grids})

    def all_scales(
        self, tokens: Tensor | VisualTokens, scales: Iterable[int | float] = (576, 144, 36, 9, 1)
    ) -> dict[int, Tensor]:
        """Every scale from one call: `{count: [B, count, D]}`, each equal to `forward(tokens, count).tokens`.

        `scales` are budgets in the usual sense (tokens per sample, or fractions); a count above N raises.
        With `VisualTokens.valid` the counts differ per sample: call the reducer once per scale instead.
        """
        vt = self._check_tokens(tokens)
        if vt.valid is not None:
            raise self._fail(
                "all_scales needs every token valid (per-sample counts differ with VisualTokens.valid); "
                "call the reducer once per scale"
            )
        n = vt.tokens.shape[1]
        out = {}
        for s in scales:
            k = resolve_budget(s, n, who=self.name)
            out[k] = vt.tokens if k == n else self._pool(vt, k).tokens
        return out


def _one_layout(layouts: list) -> Layout | list:
    """One layout when all views share it, else the list with one per view."""
    return layouts[0] if all(lay == layouts[0] for lay in layouts) else layouts
