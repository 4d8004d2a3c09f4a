"""Clustering kernels: density-peak clustering with k-nearest-neighbour density (DPC-kNN).

Du, Ding and Jia, "Study on density peaks clustering based on k-nearest neighbors and principal component analysis"
(Knowledge-Based Systems 2016), in the form TCFormer (Zeng et al., CVPR 2022) uses for tokens and SparseVLM
(arXiv 2410.04417) for its token recycling:

* distance d_ij = ‖x_i − x_j‖₂ / √D;
* density ρ_i = exp(−mean of d_ij² over the k nearest points j, the point itself included);
* δ_i = distance to the nearest point of higher density (the largest distance overall for the densest point);
* centres: the C points with the largest ρ_i·δ_i; every point joins its nearest centre, a centre joins itself.

Pinned: ties in density go to the lower index (instead of TCFormer's 1e-6 random noise), ties in ρ·δ and in the
nearest centre likewise, so the result is deterministic; distances are exact (no matmul expansion) in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dpc_knn(x: Tensor, num_clusters: int, k: int | None = None) -> tuple[Tensor, Tensor]:
    """DPC-kNN clustering of the rows of `x`.

    Args:
        x: `[N, D]` points.
        num_clusters: C, 1 ≤ C ≤ N.
        k: neighbours for the density (default C, as TCFormer and SparseVLM), clipped to N.
    Returns:
        `[C]` int64 indices of the centres (by descending ρ·δ) and `[N]` int64 cluster (0..C-1) of every point.
    """
    n, d = x.shape
    if not 1 <= num_clusters <= n:
        raise ValueError(f"dpc_knn: num_clusters={num_clusters} must be in [1, N={n}]")
    k = min(num_clusters if k is None else k, n)
    xf = x.float()
    dist = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist") / d**0.5  # [N, N]
    knn = dist.topk(k, dim=-1, largest=False).values  # [N, k], the point itself (0) included
    density = (-(knn**2).mean(-1)).exp()  # [N]
    idx = torch.arange(n, device=x.device)
    higher = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])
    )  # [N, N]: j is denser than i
    delta = torch.where(higher, dist, dist.max()).amin(-1)  # [N]
    centers = torch.sort(delta * density, descending=True, stable=True).indices[:num_clusters]  # [C]
    assign = dist[:, centers].argmin(-1)  # [N] nearest centre (first on ties)
    assign[centers] = torch.arange(num_clusters, device=x.device)
    return centers, assign


def cluster_means(x: Tensor, assign: Tensor, num_clusters: int) -> Tensor:
    """`[C, D]` mean of the rows of `x: [N, D]` in each cluster of `assign: [N]` (every cluster non-empty)."""
    sums = x.new_zeros(num_clusters, x.shape[-1]).index_add_(0, assign, x)
    counts = torch.bincount(assign, minlength=num_clusters).clamp(min=1).to(x.dtype)
    return sums / counts.unsqueeze(-1)
