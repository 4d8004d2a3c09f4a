"""LLaVA-PruMerge+: Adaptive Token Reduction for Efficient Large Multimodal Models.

Shang et al., arXiv 2403.15388 (https://github.com/42Shawn/LLaVA-PruMerge). PruMerge keeps the tokens whose
[CLS] attention is an outlier by the interquartile-range rule (a > Q3 + 1.5 IQR), an adaptive count; PruMerge+
adds spatially uniform samples so that regions without outliers stay covered. Each kept token then absorbs its
nearest neighbours in key space, weighted by their attention: y'_p = y_p + sum_{q in kNN(p)} a_q y_q (the
official code's update, with a the [CLS] attention probabilities).

Pinned choices (vtc keeps exactly k tokens; the paper's count is adaptive):
    * Attention a: head-mean CLS attention, softmax over the patches (`cls_attention_probs`). The official code
      uses one softmax over CLS + patches of the head-concatenated q/k. The IQR rule runs per sample (the
      official code pools the quartiles over the batch), quartiles by linear interpolation (numpy's default);
      the outlier count is reported as `info["iqr_count"]` `[B]`.
    * Kept set: the IQR outliers first, highest attention first, at most k. The rest of the k comes from a
      uniform lattice of k points over each view's grid (`uniform_grid_indices`, budget split over views as in
      `downsample`): the outliers displace the lattice points nearest to them (squared grid distance within a
      view; of equally near points the later one gives way), so exactly k - #outliers lattice points remain,
      none of them an outlier. (The official code appends a 1-D arithmetic sequence of about 3x the outlier
      count.) `info["is_outlier"]` `[B, k]` marks which outputs are kept outliers.
    * Merge: each kept token takes its `num_neighbors` (default 32, as the official code; at most N - k) most
      cosine-similar tokens by key among the *pruned* tokens. The official pool also holds the other kept
      tokens, which counts them twice and changes tokens even when nothing is pruned; vtc merges only what is
      dropped, so full budget is the identity. The official code's extra token (the attention-weighted sum of
      all pruned tokens, appended as token k + 1) is left out to keep the count exact.
    * The update is a sum, not a mean, and a pruned token can join several kept tokens or none, so the merge is
      not a partition: `conserves_mass = False`. `weights` holds the attention mass of each output
      (a_p + sum of its neighbours' a); `assignment` sends a kept token to its own row and a pruned token to
      the most similar kept token that absorbed it, or -1 when none did.
    * Output order: ascending index of the kept tokens (`info["anchors"]`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..budget import split_budget
from ..ops.attention import cls_attention_probs
from ..ops.grid import uniform_grid_indices
from ..ops.select import gather_tokens, keep_mask_to_indices
from ..types import Query, Selection, VisualTokens
from .base import Reducer, ReducerConfig, register_reducer

_FAR = 1e9  # distance to "no outlier in this view"


@dataclass
class PruMergePlusConfig(ReducerConfig):
    num_neighbors: int = 32  # pruned tokens (key-space kNN) each kept token absorbs; official code: 32
    iqr_scale: float = 1.5  # a token is an outlier if its attention exceeds Q3 + iqr_scale * (Q3 - Q1)

    def __post_init__(self) -> None:
        if self.num_neighbors < 0:
            raise ValueError(f"prumerge_plus: num_neighbors must be >= 0, got {self.num_neighbors!r}")


def iqr_outliers(a: Tensor, scale: float = 1.5) -> Tensor:
    """`[B, N]` bool: entries of `a` `[B, N]` above Q3 + scale * IQR of their row."""
    q = torch.quantile(a.float(), torch.tensor([0.25, 0.75], device=a.device), dim=-1)  # [2, B]
    return a > (q[1] + scale * (q[1] - q[0])).unsqueeze(-1)


@register_reducer("prumerge_plus", config=PruMergePlusConfig)
class PruMergePlus(Reducer):
    """Keep IQR attention outliers plus a uniform lattice, then fold key-space neighbours into them."""

    requires = ("cls_attn", "keys")
    merges = True
    conserves_mass = False

    def _lattice(self, vt: VisualTokens, k: int) -> tuple[Tensor, Tensor]:
        """k uniform positions `[k]` and their squared grid distance to every position `[k, N]`."""
        h, w = self.grid_of(vt)
        v = vt.num_views()
        dev = vt.tokens.device
        parts = [uniform_grid_indices(kv, h, w) + i * h * w for i, kv in enumerate(split_budget(k, [h * w] * v))]
        lattice = torch.cat(parts).to(dev)  # [k]
        pos = torch.arange(v * h * w, device=dev)
        view, row, col = pos // (h * w), pos % (h * w) // w, pos % w  # [N] each
        d2 = ((row[lattice, None] - row) ** 2 + (col[lattice, None] - col) ** 2).float()  # [k, N]
        return lattice, d2.masked_fill(view[lattice, None] != view, _FAR)

    def _reduce(self, vt: VisualTokens, k: int, query: Query | None) -> Selection:
        x = vt.tokens  # [B, N, D]
        b, n, _ = x.shape
        dev = x.device
        with torch.no_grad():
            a = cls_attention_probs(vt.cls_attn)  # [B, N]
            outlier = iqr_outliers(a, self.config.iqr_scale)  # [B, N]
            iqr_count = outlier.sum(-1)  # [B]
            m = iqr_count.clamp(max=k)  # [B] outliers kept
            ranked = a.masked_fill(~outlier, -1.0).sort(dim=-1, descending=True, stable=True).indices[:, :k]
            top = torch.arange(k, device=dev) < m.unsqueeze(-1)  # [B, k] ranked[:, j] is a kept outlier
            kept_out = torch.zeros(b, n, dtype=torch.bool, device=dev).scatter_(1, ranked, top)  # [B, N]

            # Uniform fill: drop the lattice points nearest to the kept outliers, keep k - m of them.
            lattice, d2 = self._lattice(vt, k)  # [k], [k, N]
            near = d2.expand(b, -1, -1).masked_fill(~kept_out.unsqueeze(1), _FAR).amin(-1)  # [B, k]
            far_first = near.sort(dim=-1, descending=True, stable=True).indices  # [B, k]
            fill = torch.arange(k, device=dev) < (k - m).unsqueeze(-1)  # [B, k] in far_first order
            keep_lat = torch.zeros(b, k, dtype=torch.bool, device=dev).scatter_(1, far_first, fill)
            on_lattice = torch.zeros(b, n, dtype=torch.bool, device=dev).scatter_(1, lattice.expand(b, k), keep_lat)
            kept = kept_out | on_lattice  # [B, N], exactly k per row
            anchors, _ = keep_mask_to_indices(kept)  # [B, k] ascending

            # Merge: each kept token absorbs its most key-similar pruned tokens, weighted by attention.
            keys = F.normalize(vt.keys.float(), dim=-1)  # [B, N, Dk]
            sim = gather_tokens(keys, anchors) @ keys.transpose(-1, -2)  # [B, k, N]
            sim = sim.masked_fill(kept.unsqueeze(1), -torch.inf)  # only pruned tokens can be absorbed
            nn_ = min(self.config.num_neighbors, n - k)
            nbr = torch.zeros(b, k, n, dtype=torch.bool, device=dev)
            if nn_ > 0:
                nbr.scatter_(2, sim.topk(nn_, dim=-1).indices, True)  # [B, k, N]
            coef = nbr.float() * a.unsqueeze(1)  # [B, k, N]
            weights = gather_tokens(a.unsqueeze(-1), anchors).squeeze(-1) + coef.sum(-1)  # [B, k]
            best, row = sim.masked_fill(~nbr, -torch.inf).max(dim=1)  # [B, N]
            assignment = torch.where(torch.isfinite(best), row, -1)
            assignment.scatter_(1, anchors, torch.arange(k, device=dev).expand(b, k))
            is_outlier = kept_out.gather(1, anchors)  # [B, k]
        tokens = gather_tokens(x, anchors)  # [B, k, D]
        if nn_ > 0:
            tokens = (tokens.float() + coef @ x.float()).to(x.dtype)
        mask = torch.ones(b, k, dtype=torch.bool, device=dev)
        info = {"scores": a, "anchors": anchors, "iqr_count": iqr_count, "is_outlier": is_outlier}
        return Selection(tokens, None, mask, weights=weights, assignment=assignment, info=info)
