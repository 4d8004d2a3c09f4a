"""GlobalCom²: the thumbnail commands how much of each crop a high-resolution VLM keeps.

Liu et al., "Global Compression Commander: Plug-and-Play Inference Acceleration for High-Resolution Large
Vision-Language Models", arXiv 2501.05179 (https://github.com/xuyang-liu16/GlobalCom2). Training-free, for
AnyRes inputs (LLaVA-NeXT): a thumbnail plus rows×cols crops, each encoded on its own. With r = k/N:

1. A_v = the [CLS] attention map of view v (thumbnail v = 0, crops v = 1…rows·cols).
2. The thumbnail grid is cut into rows×cols blocks, one per crop; s_i = Σ of A_0 over block i,
   π = softmax(s / τ) with τ = 10, and crop i keeps the ratio r_i = min(1, r·(1 + π_i − mean π)).
3. The thumbnail keeps its top ⌊N_v·r⌋ tokens by A_0.
4. Crop i ranks its tokens by A_i/‖A_i‖ + G_i/‖G_i‖, where G is A_0 bilinearly upsampled
   (align_corners=False) to the whole crop canvas (rows·h × cols·w) and G_i is crop i's part of it.

Pinned choices (vtc keeps exactly k tokens per sample, the official code keeps ⌊N_v·r_v⌋ per view):

* `attention="logits"` (default) uses the head-mean of the pre-softmax logits in `VisualTokens.cls_attn`, as the
  official code does (its τ = 10 is scaled for sums of logits). `attention="softmax"` uses the head-mean of the
  per-view softmax instead; then every s_i ≤ 1, π is almost uniform and the crop ratios barely differ from r.
* Per-view counts: the targets t_v = N_v·r_v (r_0 = r) sum to k unless a crop ratio was capped at 1. Each view
  gets ⌊t_v⌋ (at most N_v); the remaining tokens are dealt one per view in rounds, in the order of the largest
  fractional part of t_v (lower view index on ties), skipping full views, until the counts sum to exactly k.
* The blocks of the thumbnail are `bin_edges` bins (near-equal, contiguous) rather than the official floor size
  with the remainder in the last block; they coincide when rows and cols divide the grid (24 by 1…4, 6, 8).
* Unpadding: vtc's AnyRes layout is before unpadding. Without `VisualTokens.valid` all crop tokens compete. With
  it (the LLaVA-NeXT adapter marks the tokens unpadding removes), as in the official code's scoring of unpadded
  crops: r = k_b / M_b over the M_b valid tokens of the sample, N_v is the valid count of view v (its cap), the mean
  of π becomes the mean weighted by the crops' valid counts (so Σ_v t_v = k_b still holds; with equal counts it is
  the plain mean), and only valid tokens are ranked. The attention maps themselves (block sums s_i, the upsampled
  thumbnail G, the norms) are computed on the full views, as the encoder produced them.
* Kept tokens are returned in their original order (the official thumbnail order is by score).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.grid import partition_pool_assignment
from ..ops.select import keep_mask_to_indices, pruned_selection, rank_valid_first
from ..types import Query, Selection, VisualTokens
from .base import Reducer, ReducerConfig, register_reducer


@dataclass
class GlobalCom2Config(ReducerConfig):
    temperature: float = 10.0  # τ of the softmax over the crops' summed thumbnail attention
    attention: str = "logits"  # "logits": head-mean CLS logits (official code); "softmax": head-mean probabilities

    def __post_init__(self) -> None:
        if self.attention not in ("logits", "softmax"):
            raise ValueError(f"globalcom2: attention must be 'logits' or 'softmax', got {self.attention!r}")
        if not self.temperature > 0:
            raise ValueError(f"globalcom2: temperature must be > 0, got {self.temperature!r}")


def crop_ratios(
    thumb: Tensor, h: int, w: int, rows: int, cols: int, r: float | Tensor, tau: float, sizes: Tensor | None = None
) -> Tensor:
    """Retention ratio of each crop from the thumbnail's attention map.

    Args:
        thumb: `[B, h*w]` thumbnail attention (row-major).
        r: overall retention ratio (or `[B, 1]`, one per sample).
        sizes: `[B, rows*cols]` tokens of each crop that count (valid tokens); None: equal crops.
    Returns:
        `[B, rows*cols]` float64, r_i = min(1, r (1 + π_i − mean π)), π = softmax(s / τ), s_i = block sums; the mean
        of π is weighted by `sizes` when given.
    """
    block = partition_pool_assignment(h, w, rows, cols).to(thumb.device)  # [h*w] crop block of each cell
    s = torch.zeros(thumb.shape[0], rows * cols, dtype=torch.float64, device=thumb.device)
    s.index_add_(1, block, thumb.double())  # [B, rows*cols]
    pi = (s / tau).softmax(-1)
    if sizes is None:
        mean = pi.mean(-1, keepdim=True)
    else:
        wts = sizes.double()
        mean = (pi * wts).sum(-1, keepdim=True) / wts.sum(-1, keepdim=True).clamp(min=1)
    return (r * (1 + pi - mean)).clamp(max=1.0)


def apportion(targets: Tensor, cap: int | Tensor, k: int | Tensor) -> Tensor:
    """Integer counts per part summing to exactly k: ⌊target⌋, then the rest dealt in rounds by largest remainder.

    Args:
        targets: `[B, V]` non-negative real targets (Σ ≤ k up to rounding).
        cap: most tokens a part can take, or `[B, V]` caps per part (Σ caps ≥ k).
        k: tokens per sample, or `[B]`.
    Returns:
        `[B, V]` int64.
    """
    if isinstance(cap, Tensor):
        base = torch.minimum(targets.floor().clamp(min=0).long(), cap)  # [B, V]
        top = int(cap.max())
    else:
        base = targets.floor().clamp(0, cap).long()  # [B, V]
        top = cap
    left = (k - base.sum(-1)).clamp(min=0)  # [B]
    room = cap - base  # [B, V]
    # Water level m: every part gets min(room, m) in whole rounds, the largest m that fits into `left`.
    levels = torch.arange(top + 1, device=targets.device)  # [cap + 1]
    filled = torch.minimum(room.unsqueeze(-1), levels).sum(1)  # [B, cap + 1], non-decreasing in m
    m = (filled <= left.unsqueeze(-1)).sum(-1, keepdim=True) - 1  # [B, 1]
    give = torch.minimum(room, m)
    rest = left - give.sum(-1)  # [B] < number of parts with room > m
    # The last, partial round goes to the largest fractional parts first (stable: lower index on ties).
    order = torch.sort(targets - targets.floor(), dim=-1, descending=True, stable=True).indices  # [B, V]
    eligible = (room > m).gather(1, order)
    extra_sorted = eligible & (eligible.cumsum(-1) <= rest.unsqueeze(-1))
    extra = torch.zeros_like(eligible).scatter(1, order, extra_sorted)
    return base + give + extra.long()


@register_reducer("globalcom2", config=GlobalCom2Config)
class GlobalCom2(Reducer):
    """Thumbnail-guided, per-crop adaptive pruning for thumbnail + crops inputs (LLaVA-NeXT AnyRes)."""

    requires = ("cls_attn", "views")

    def _scores_and_ratios(
        self, vt: VisualTokens, r: float | Tensor, sizes: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per-view token scores `[B, V, Nv]` and crop ratios `[B, V - 1]` (`crop_ratios` with `r`, `sizes`)."""
        b = vt.tokens.shape[0]
        h, w = self.grid_of(vt)
        rows, cols = vt.views
        v, nv = vt.num_views(), h * w
        logits = vt.cls_attn.float().reshape(b, -1, v, nv)  # [B, H, V, Nv]
        if self.config.attention == "softmax":
            attn = logits.softmax(-1).mean(1)  # [B, V, Nv]
        else:
            attn = logits.mean(1)
        thumb = attn[:, 0]  # [B, Nv]
        ratios = crop_ratios(thumb, h, w, rows, cols, r, self.config.temperature, sizes)  # [B, V - 1]

        # Crop scores: own attention plus the thumbnail's, upsampled over the crop canvas; both L2-normalised.
        g = F.interpolate(thumb.reshape(b, 1, h, w), (rows * h, cols * w), mode="bilinear", align_corners=False)
        g = g.reshape(b, rows, h, cols, w).permute(0, 1, 3, 2, 4).reshape(b, v - 1, nv)  # [B, crops, Nv]
        crop = F.normalize(attn[:, 1:], dim=-1) + F.normalize(g, dim=-1)
        return torch.cat([thumb.unsqueeze(1), crop], 1), ratios  # [B, V, Nv], [B, V - 1]

    def _reduce(self, vt: VisualTokens, k: int, query: Query | None) -> Selection:
        x = vt.tokens  # [B, N, D]
        b, n, _ = x.shape
        nv = n // vt.num_views()
        with torch.no_grad():
            scores, ratios = self._scores_and_ratios(vt, k / n)
            ratios = torch.cat([torch.full_like(ratios[:, :1], k / n), ratios], 1)  # [B, V]
            counts = apportion(ratios * nv, nv, k)  # [B, V]
            order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
            keep = (order.argsort(-1) < counts.unsqueeze(-1)).reshape(b, n)  # rank < count: exactly k per row
            idx, _ = keep_mask_to_indices(keep)
        return pruned_selection(x, idx, ratios=ratios, counts=counts, scores=scores.reshape(b, n))

    def _reduce_valid(self, vt: VisualTokens, ks: Tensor, query: Query | None) -> Selection:
        x = vt.tokens  # [B, N, D]
        b, n, _ = x.shape
        v = vt.num_views()
        nv = n // v
        valid = vt.valid.reshape(b * v, nv)  # [B·V, Nv]
        with torch.no_grad():
            sizes = valid.sum(-1).reshape(b, v)  # [B, V] valid tokens per view
            r = (ks.double() / sizes.sum(-1).double()).unsqueeze(-1)  # [B, 1]
            scores, ratios = self._scores_and_ratios(vt, r, sizes[:, 1:])
            ratios = torch.cat([r, ratios], 1)  # [B, V]
            counts = apportion(ratios * sizes, sizes, ks)  # [B, V], Σ = ks, each at most its valid tokens
            rank = rank_valid_first(scores.reshape(b * v, nv), valid).reshape(b, v, nv)
            keep = (rank < counts.unsqueeze(-1)).reshape(b, n)  # only valid tokens rank below their view's count
            idx, mask = keep_mask_to_indices(keep)
        return pruned_selection(x, idx, mask, ratios=ratios, counts=counts, scores=scores.reshape(b, n))
