"""Diversity kernels: cosine similarity / distance and batched greedy max-min (farthest point, k-center) selection.

`farthest_point_sampling` is the greedy of Gonzalez (1985) for k-center and of max-min dispersion: after a first
pick, each step adds the candidate whose distance to the selected set (its nearest selected point) is largest.
Every step is one vectorised `[B, N]` update over the whole batch; only the k steps are a Python loop.

Numerics: scores are computed once in float32 (float64 inputs stay float64). The distance matrix is made exactly
symmetric with a zero diagonal, so mutual ties are exact ties, and every tie goes to the lowest index.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def l2_normalize(x: Tensor, eps: float = 1e-8) -> Tensor:
    """`x / max(||x||, eps)` over the last dim, in `compute_dtype` (a zero vector stays zero)."""
    x = x.to(compute_dtype(x))
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def cosine_similarity(a: Tensor, b: Tensor | None = None) -> Tensor:
    """Batched pairwise cosine similarity `[B, M, D] x [B, N, D] → [B, M, N]` (`b=None`: `a` with itself)."""
    an = l2_normalize(a)
    if b is None:
        return an @ an.transpose(-1, -2)
    bn = l2_normalize(b)
    dtype = torch.promote_types(an.dtype, bn.dtype)
    return an.to(dtype) @ bn.to(dtype).transpose(-1, -2)


def cosine_distance(x: Tensor) -> Tensor:
    """`1 - cos` between all pairs of `x: [B, N, D]` → `[B, N, N]`, symmetric, zero diagonal, clamped to >= 0."""
    dist = (1.0 - cosine_similarity(x)).clamp_min(0.0)  # [B, N, N]
    dist = (dist + dist.transpose(-1, -2)) / 2  # a + b == b + a exactly, so this is bitwise symmetric
    return dist.diagonal_scatter(torch.zeros_like(dist[..., 0]), dim1=-2, dim2=-1)


def nearest_neighbour_distance(dist: Tensor, valid: Tensor | None = None) -> Tensor:
    """`[B, N, N]` distances → `[B, N]` distance of each point to its nearest *other* point (inf if none).

    `valid` (`[B, N]` bool): only valid points count as neighbours.
    """
    eye = torch.eye(dist.shape[-1], dtype=torch.bool, device=dist.device)
    if valid is not None:
        eye = eye | ~valid.unsqueeze(1)  # [B, N, N]: invalid columns are no one's neighbour
    return dist.masked_fill(eye, float("inf")).amin(dim=-1)


def farthest_point_sampling(
    dist: Tensor, k: int, first: Tensor | None = None, candidates: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Greedy max-min selection of k points per sample from a distance matrix.

    Args:
        dist: `[B, N, N]` symmetric distances (e.g. `cosine_distance(x)`).
        k: points to select, 1 <= k <= N.
        first: `[B]` int64 index of the first pick per sample; None picks the point with the largest
            nearest-neighbour distance (DivPrune's rule, among the candidates).
        candidates: `[B, N]` bool, the points that may be picked (None: all). Only candidates are picked and
            only they count as neighbours for the first pick; once a row's candidates are exhausted its later
            picks are meaningless (take a prefix, `vtc.ops.select.prefix_indices`).
    Returns:
        `order` `[B, k]` (selection order: a run with a smaller k is a prefix of it) and `indices` `[B, k]`
        (the same set, ascending). Ties go to the lowest index.
    """
    b, n, _ = dist.shape
    if not 1 <= k <= n:
        raise ValueError(f"farthest_point_sampling: k={k} must lie in [1, N={n}]")
    with torch.no_grad():
        if first is None:
            nn_dist = nearest_neighbour_distance(dist, candidates)  # [B, N]
            if candidates is not None:
                nn_dist = nn_dist.masked_fill(~candidates, float("-inf"))
            first = nn_dist.argmax(dim=-1)  # [B]
        first = first.to(device=dist.device, dtype=torch.long)
        order = torch.empty(b, k, dtype=torch.long, device=dist.device)
        order[:, 0] = first
        # Distance of every candidate to the selected set; selected points (and non-candidates) are pinned to -inf.
        min_dist = dist.gather(1, first.view(b, 1, 1).expand(b, 1, n)).squeeze(1)  # [B, N]
        if candidates is not None:
            min_dist = min_dist.masked_fill(~candidates, float("-inf"))
        min_dist = min_dist.scatter(1, first.view(b, 1), float("-inf"))
        for step in range(1, k):
            j = min_dist.argmax(dim=-1)  # [B], first maximum = lowest index
            order[:, step] = j
            row = dist.gather(1, j.view(b, 1, 1).expand(b, 1, n)).squeeze(1)  # [B, N]
            min_dist = torch.minimum(min_dist, row).scatter(1, j.view(b, 1), float("-inf"))
        return order, order.sort(dim=-1).values
