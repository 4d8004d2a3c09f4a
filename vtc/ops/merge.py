"""Token merging kernels: ToMe's bipartite soft matching and the bookkeeping of merged groups.

Bolya et al., "Token Merging: Your ViT but Faster", arXiv 2210.09461 (https://github.com/facebookresearch/ToMe).
A merge is described by an *assignment* `[B, N]`: the output row each input goes to (-1: dropped). Merged tokens
are size-weighted means (`vtc.ops.grid.scatter_mean`), so merging twice equals merging once with the composed
assignment.

Pinned choices (vs. ToMe's `bipartite_soft_matching`): A/B alternate over the current order (A = even
positions), as in ToMe; equal match scores are broken towards the lower A position (stable sort); and the output
rows are ordered by the smallest input position in each group (ToMe concatenates unmerged A then B instead), so
unmerged tokens keep their relative order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .grid import scatter_mean


def bipartite_soft_matching(metric: Tensor, r: int) -> Tensor:
    """Which r tokens merge into which: ToMe's bipartite soft matching on cosine similarity.

    Tokens alternate into sets A (even positions) and B (odd positions); every A token finds its most similar B
    token, and the r A tokens with the most similar matches merge into their match.

    Args:
        metric: `[B, N, C]` features compared by cosine similarity (attention keys, or the tokens).
        r: tokens removed, `0 <= r <= N // 2`.
    Returns:
        `[B, N]` int64 assignment of every token to one of `N - r` output rows, rows ordered by their smallest
        member position.
    """
    b, n, _ = metric.shape
    if not 0 <= r <= n // 2:
        raise ValueError(f"bipartite matching removes at most N // 2 = {n // 2} of {n} tokens per round, got r={r}")
    with torch.no_grad():
        pos = torch.arange(n, device=metric.device).expand(b, n)  # [B, N]
        if r == 0:
            return pos.clone()
        m = F.normalize(metric.float(), dim=-1)
        scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)  # [B, Na, Nb]
        best, match = scores.max(dim=-1)  # [B, Na]
        src = best.sort(dim=-1, descending=True, stable=True).indices[:, :r]  # [B, r] merged A rows
        rep = pos.clone()  # [B, N] position of the token each input ends up in
        rep.scatter_(1, 2 * src, 2 * match.gather(1, src) + 1)
        return _rank_groups(rep, pos)


def _rank_groups(rep: Tensor, pos: Tensor) -> Tensor:
    """Assignment from representatives: rows numbered by the smallest position in each group."""
    b, n = rep.shape
    first = torch.full((b, n), n, dtype=torch.long, device=rep.device)
    first = first.scatter_reduce(1, rep, pos, reduce="amin")  # [B, N] first member, N where no group
    order = first.argsort(dim=-1, stable=True)  # groups by their first member, empty slots last
    rank = torch.empty_like(order).scatter_(1, order, pos)  # [B, N] row of each representative
    return rank.gather(1, rep)


def bipartite_merge(x: Tensor, metric: Tensor, r: int, size: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One round of ToMe merging: match on `metric`, then size-weighted means of `x`.

    Args:
        x: `[B, N, D]` tokens to merge.
        metric: `[B, N, C]` similarity features (may be `x` itself).
        r: tokens removed, `0 <= r <= N // 2`.
        size: `[B, N]` mass already carried by each token (default 1).
    Returns:
        merged `[B, N - r, D]` (x's dtype), their sizes `[B, N - r]` float32, and the assignment `[B, N]`.
    """
    n = x.shape[1]
    assignment = bipartite_soft_matching(metric, r)
    merged, mass = scatter_mean(x, assignment, n - r, mass=size)
    return merged, mass, assignment


def compose_assignment(first: Tensor, second: Tensor) -> Tensor:
    """Chain two merges: `first` `[B, N]` into M rows, then `second` `[B, M]`; -1 stays -1. Returns `[B, N]`."""
    out = second.gather(1, first.clamp(min=0))
    return out.masked_fill(first < 0, -1)


def group_first_index(assignment: Tensor, k: int) -> Tensor:
    """Smallest input position assigned to each of k output rows, `[B, k]` int64 (N for a row with no input)."""
    b, n = assignment.shape
    pos = torch.arange(n, device=assignment.device).expand(b, n)
    tgt = torch.where(assignment >= 0, assignment, k)  # dropped inputs go to a spare column
    out = torch.full((b, k + 1), n, dtype=torch.long, device=assignment.device)
    return out.scatter_reduce(1, tgt, pos, reduce="amin")[:, :k]
