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
* No unpadding: vtc's AnyRes layout is before unpadding, so all crop tokens compete (the adapter can drop padding
  rows first). Kept tokens are returned in their original order (the official thumbnail order is by score).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.grid import partition_pool_assignment
from ..ops.select import keep_mask_to_indices, pruned_selection
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


def crop_ratios(thumb: Tensor, h: int, w: int, rows: int, cols: int, r: float, tau: float) -> Tensor:
    """Retention ratio of each crop from the thumbnail's attention map.

    Args:
        thumb: `[B, h*w]` thumbnail attention (row-major).
        r: overall retention ratio.
    Returns:
        `[B, rows*cols]` float64, r_i = min(1, r (1 + π_i − mean π)), π = softmax(s / τ), s_i = block sums.
    """
    block = partition_pool_assignment(h, w, rows, cols).to(thumb.device)  # [h*w] crop block of each cell
    s = torch.zeros(thumb.shape[0], rows * cols, dtype=torch.float64, device=thumb.device)
    s.index_add_(1, block, thumb.double())  # [B, rows*cols]
    pi = (s / tau).softmax(-1)
    return (r * (1 + pi - pi.mean(-1, keepdim=True))).clamp(max=1.0)


def apportion(targets: Tensor, cap: int, k: int) -> Tensor:
    """Integer counts per part summing to exactly k: ⌊target⌋, then the rest dealt in rounds by largest remainder.

    Args:
        targets: `[B, V]` non-negative real targets (Σ ≤ k up to rounding).
        cap: most tokens a part can take (V·cap ≥ k).
    Returns:
        `[B, V]` int64.
    """
    base = targets.floor().clamp(0, cap).long()  # [B, V]
    left = (k - base.sum(-1)).clamp(min=0)  # [B]
    room = cap - base  # [B, V]
    # Water level m: every part gets min(room, m) in whole rounds, the largest m that fits into `left`.
    levels = torch.arange(cap + 1, device=targets.device)  # [cap + 1]
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

    def _reduce(self, vt: VisualTokens, k: int, query: Query | None) -> Selection:
        x = vt.tokens  # [B, N, D]
        b, n, _ = x.shape
        h, w = self.grid_of(vt)
        rows, cols = vt.views
        v, nv = vt.num_views(), h * w
        with torch.no_grad():
            logits = vt.cls_attn.float().reshape(b, -1, v, nv)  # [B, H, V, Nv]
            if self.config.attention == "softmax":
                attn = logits.softmax(-1).mean(1)  # [B, V, Nv]
            else:
                attn = logits.mean(1)
            thumb = attn[:, 0]  # [B, Nv]
            ratios = crop_ratios(thumb, h, w, rows, cols, k / n, self.config.temperature)  # [B, V - 1]
            ratios = torch.cat([torch.full_like(ratios[:, :1], k / n), ratios], 1)  # [B, V]
            counts = apportion(ratios * nv, nv, k)  # [B, V]

            # Crop scores: own attention plus the thumbnail's, upsampled over the crop canvas; both L2-normalised.
            g = F.interpolate(thumb.reshape(b, 1, h, w), (rows * h, cols * w), mode="bilinear", align_corners=False)
            g = g.reshape(b, rows, h, cols, w).permute(0, 1, 3, 2, 4).reshape(b, v - 1, nv)  # [B, crops, Nv]
            crop = F.normalize(attn[:, 1:], dim=-1) + F.normalize(g, dim=-1)
            scores = torch.cat([thumb.unsqueeze(1), crop], 1)  # [B, V, Nv]

            order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
            keep = (order.argsort(-1) < counts.unsqueeze(-1)).reshape(b, n)  # rank < count: exactly k per row
            idx, _ = keep_mask_to_indices(keep)
        return pruned_selection(x, idx, ratios=ratios, counts=counts, scores=scores.reshape(b, n))
