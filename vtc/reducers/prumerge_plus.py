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
    * Views with a share of fewer than one lattice point get none (`vtc.ops.grid.view_lattice`).
    * `VisualTokens.valid`: sample b keeps k_b tokens, all valid. The attention a stays the encoder's own (softmax
      over the whole view); the quartiles, the outliers, the uniform lattice (`view_lattice` over the valid tokens:
      split over the views by valid count, the rectangle of a view's valid tokens when they form one) and the
      absorbed neighbours (among the valid pruned tokens, at most min(num_neighbors, M_b − k_b)) only see valid
      tokens; an invalid token goes nowhere (assignment −1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.attention import cls_attention_probs
from ..ops.grid import view_lattice
from ..ops.select import gather_tokens, keep_mask_to_indices
from ..ops.valid import sample_groups
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


def iqr_outliers(a: Tensor, scale: float = 1.5, valid: Tensor | None = None) -> Tensor:
    """`[B, N]` bool: entries of `a` `[B, N]` above Q3 + scale * IQR of their row (of its `valid` entries only)."""
    probs = torch.tensor([0.25, 0.75], device=a.device)
    if valid is None:
        q = torch.quantile(a.float(), probs, dim=-1)  # [2, B]
        return a > (q[1] + scale * (q[1] - q[0])).unsqueeze(-1)
    q = torch.nanquantile(a.float().masked_fill(~valid, float("nan")), probs, dim=-1)  # [2, B] over valid entries
    return valid & (a > (q[1] + scale * (q[1] - q[0])).unsqueeze(-1))


@register_reducer("prumerge_plus", config=PruMergePlusConfig)
class PruMergePlus(Reducer):
    """Keep IQR attention outliers plus a uniform lattice, then fold key-space neighbours into them."""

    requires = ("cls_attn", "keys")
    merges = True
    conserves_mass = False

    def _lattice(self, vt: VisualTokens, k: int, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """k uniform positions `[k]` (over the `valid: [N]` tokens if given) and their squared grid distance to
        every position `[k, N]`."""
        h, w = self.grid_of(vt)
        v = vt.num_views()
        dev = vt.tokens.device
        lattice = view_lattice(k, h, w, v, valid).to(dev)  # [k]
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
            mask = torch.ones(b, k, dtype=torch.bool, device=dev)
        info = {"scores": a, "anchors": anchors, "iqr_count": iqr_count, "is_outlier": kept_out.gather(1, anchors)}
        return self._merge(vt, a, anchors, mask, kept, min(self.config.num_neighbors, n - k), info)

    def _merge(
        self,
        vt: VisualTokens,
        a: Tensor,
        anchors: Tensor,
        mask: Tensor,
        blocked: Tensor,
        nn_: int,
        info: dict,
    ) -> Selection:
        """Each kept token (`anchors` `[B, K]`, real where `mask`) absorbs its `nn_` most key-similar tokens that
        are not `blocked` (`[B, N]`: kept or invalid), weighted by the attention `a` `[B, N]`."""
        x = vt.tokens  # [B, N, D]
        b, n, _ = x.shape
        k = anchors.shape[1]
        dev = x.device
        with torch.no_grad():
            keys = F.normalize(vt.keys.float(), dim=-1)  # [B, N, Dk]
            sim = gather_tokens(keys, anchors) @ keys.transpose(-1, -2)  # [B, K, N]
            sim = sim.masked_fill(blocked.unsqueeze(1) | ~mask.unsqueeze(-1), -torch.inf)  # only pruned can join
            nbr = torch.zeros(b, k, n, dtype=torch.bool, device=dev)
            if nn_ > 0:
                top = sim.topk(nn_, dim=-1)  # rows with fewer candidates than nn_ get -inf picks: not neighbours
                nbr.scatter_(2, top.indices, torch.isfinite(top.values))  # [B, K, N]
            coef = nbr.float() * a.unsqueeze(1)  # [B, K, N]
            weights = (gather_tokens(a.unsqueeze(-1), anchors).squeeze(-1) + coef.sum(-1)) * mask  # [B, K]
            best, row = sim.masked_fill(~nbr, -torch.inf).max(dim=1)  # [B, N]
            assignment = torch.where(torch.isfinite(best), row, -1)
            assignment = torch.cat([assignment, assignment[:, :1]], 1)  # spare column n for padded anchors
            assignment.scatter_(1, anchors.masked_fill(~mask, n), torch.arange(k, device=dev).expand(b, k))
            assignment = assignment[:, :n].contiguous()
        tokens = gather_tokens(x, anchors)  # [B, K, D]
        if nn_ > 0:
            tokens = (tokens.float() + coef @ x.float()).to(x.dtype)
        tokens = tokens * mask.unsqueeze(-1).to(tokens.dtype)
        return Selection(tokens, None, mask, weights=weights, assignment=assignment, info=info)

    def _reduce_valid(self, vt: VisualTokens, ks: Tensor, query: Query | None) -> Selection:
        x = vt.tokens  # [B, N, D]
        b, n, _ = x.shape
        dev = x.device
        valid = vt.valid  # [B, N]
        kmax = int(ks.max())
        with torch.no_grad():
            a = cls_attention_probs(vt.cls_attn)  # [B, N]
            outlier = iqr_outliers(a, self.config.iqr_scale, valid)  # [B, N], valid tokens only
            iqr_count = outlier.sum(-1)  # [B]
            m = torch.minimum(iqr_count, ks)  # [B] outliers kept
            ranked = a.masked_fill(~outlier, -1.0).sort(dim=-1, descending=True, stable=True).indices[:, :kmax]
            top = torch.arange(kmax, device=dev) < m.unsqueeze(-1)  # [B, kmax] ranked[:, j] is a kept outlier
            kept_out = torch.zeros(b, n, dtype=torch.bool, device=dev).scatter_(1, ranked, top)  # [B, N]

            # Uniform fill over the valid tokens: k_b lattice points per sample (rows padded to kmax, never kept).
            lattice = torch.zeros(b, kmax, dtype=torch.long, device=dev)
            d2 = torch.full((b, kmax, n), _FAR, device=dev)
            for group in sample_groups(valid):
                b0, kb = int(group[0]), int(ks[group[0]])
                lat, dist = self._lattice(vt, kb, valid[b0])  # [kb], [kb, N]
                lattice[group, :kb] = lat
                d2[group, :kb] = dist
            real = torch.arange(kmax, device=dev) < ks.unsqueeze(-1)  # [B, kmax]
            near = d2.masked_fill(~kept_out.unsqueeze(1), _FAR).amin(-1).masked_fill(~real, -1.0)  # [B, kmax]
            far_first = near.sort(dim=-1, descending=True, stable=True).indices  # padding last
            fill = torch.arange(kmax, device=dev) < (ks - m).unsqueeze(-1)  # [B, kmax] in far_first order
            keep_lat = torch.zeros(b, kmax, dtype=torch.bool, device=dev).scatter_(1, far_first, fill)
            on_lattice = torch.zeros(b, n + 1, dtype=torch.bool, device=dev)
            on_lattice.scatter_(1, lattice.masked_fill(~keep_lat, n), True)
            kept = kept_out | on_lattice[:, :n]  # [B, N], exactly k_b per row, all valid
            anchors, mask = keep_mask_to_indices(kept)  # [B, kmax] ascending, padded
            nn_ = min(self.config.num_neighbors, int((valid.sum(-1) - ks).max()))
        is_outlier = kept_out.gather(1, anchors) & mask
        info = {"scores": a, "anchors": anchors, "iqr_count": iqr_count, "is_outlier": is_outlier}
        return self._merge(vt, a, anchors, mask, kept | ~valid, nn_, info)
