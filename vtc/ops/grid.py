"""Grid helpers: choosing a k-cell sub-lattice of an h×w grid, and partition (bin) pooling."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..budget import split_budget
from .valid import valid_rectangle


def factor_grid(k: int, h: int, w: int, max_aspect_error: float = 2.0) -> tuple[int, int] | None:
    """The factorisation k = kh·kw (kh ≤ h, kw ≤ w) whose aspect is closest to h/w, or None if none is within
    a factor `max_aspect_error` of it."""
    best, best_err = None, math.inf
    for kh in range(1, min(k, h) + 1):
        if k % kh or k // kh > w:
            continue
        err = abs(math.log((kh / (k // kh)) / (h / w)))
        if err < best_err - 1e-12:
            best, best_err = (kh, k // kh), err
    return best if best is not None and best_err <= math.log(max_aspect_error) else None


def uniform_grid_indices(k: int, h: int, w: int) -> Tensor:
    """k row-major positions spread uniformly over an h×w grid, ascending, `[k]` int64.

    When k factors into a kh×kw lattice of about the grid's aspect, the positions are the lattice's cell centres
    (k = 144 of 24×24 → every second row and column). Otherwise a slightly larger lattice (≥ k points) is laid
    out and k of its points are taken at even steps along it.
    """
    if not 1 <= k <= h * w:
        raise ValueError(f"cannot place {k} points on a {h}x{w} grid")
    fg = factor_grid(k, h, w)
    if fg is not None:
        kh, kw = fg
    else:
        kh = min(h, max(1, round(math.sqrt(k * h / w))))
        kw = min(w, math.ceil(k / kh))
        while kh * kw < k:
            kh += 1
    rows = ((torch.arange(kh) + 0.5) * h / kh).floor().long()  # [kh]
    cols = ((torch.arange(kw) + 0.5) * w / kw).floor().long()  # [kw]
    lattice = (rows[:, None] * w + cols[None, :]).reshape(-1)  # [kh*kw] ascending
    m = lattice.numel()
    if m > k:
        lattice = lattice[((torch.arange(k) + 0.5) * m / k).floor().long()]
    return lattice


def valid_lattice(k: int, h: int, w: int, valid: Tensor) -> Tensor:
    """k of the valid cells (`valid: [h*w]` bool) of an h×w grid, spread uniformly, ascending, `[k]` int64.

    When the valid cells form a full rectangle (unpadding removes whole rows/columns), the `uniform_grid_indices`
    lattice is laid on that rectangle. Otherwise the valid cells are taken in row-major order and k of them at even
    steps along it (cell ⌊(i + 1/2)·M/k⌋ of the M valid ones).
    """
    m = int(valid.sum())
    if not 1 <= k <= m:
        raise ValueError(f"cannot place {k} points on {m} valid cells of a {h}x{w} grid")
    rect = valid_rectangle(valid, h, w)
    if rect is not None:
        r0, c0, hh, ww = rect
        lat = uniform_grid_indices(k, hh, ww)  # row-major within the rectangle: stays ascending on the grid
        return (r0 + lat // ww) * w + c0 + lat % ww
    cells = valid.nonzero().squeeze(-1).cpu()  # [M] ascending
    return cells[((torch.arange(k) + 0.5) * m / k).floor().long()]


def view_lattice(k: int, h: int, w: int, views: int = 1, valid: Tensor | None = None) -> Tensor:
    """k positions spread uniformly over `views` consecutive h×w grids, ascending, `[k]` int64 (on the CPU).

    The budget is split over the views in proportion to their (valid) cells (`vtc.budget.split_budget`), and each
    view with a share gets `uniform_grid_indices` (or `valid_lattice` when `valid: [views*h*w]` bool is given).
    """
    hw = h * w
    if valid is None:
        parts = [uniform_grid_indices(kv, h, w) + i * hw for i, kv in enumerate(split_budget(k, [hw] * views)) if kv]
    else:
        per_view = valid.reshape(views, hw).cpu()
        shares = split_budget(k, per_view.sum(-1).tolist())
        parts = [valid_lattice(kv, h, w, per_view[i]) + i * hw for i, kv in enumerate(shares) if kv]
    return torch.cat(parts)


def bin_edges(n: int, bins: int) -> Tensor:
    """Edges of `bins` contiguous, near-equal bins covering range(n): `[bins + 1]` int64 (avg_pool when n%bins==0)."""
    return (torch.arange(bins + 1) * n / bins).floor().long()


def partition_pool_assignment(h: int, w: int, oh: int, ow: int) -> Tensor:
    """For each cell of an h×w grid, the row-major index of its bin in an oh×ow partition: `[h*w]` int64."""
    r = torch.bucketize(torch.arange(h), bin_edges(h, oh)[1:], right=True)  # [h] in [0, oh)
    c = torch.bucketize(torch.arange(w), bin_edges(w, ow)[1:], right=True)  # [w] in [0, ow)
    return (r[:, None] * ow + c[None, :]).reshape(-1)


def scatter_mean(x: Tensor, assignment: Tensor, k: int, mass: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mass-weighted mean of the tokens assigned to each of k outputs.

    Args:
        x: `[B, N, D]`.
        assignment: `[B, N]` int64 output row of each input, -1 for dropped inputs.
        mass: `[B, N]` weight of each input (default 1).
    Returns:
        merged `[B, k, D]` in x's dtype (accumulated in float32) and total mass `[B, k]` float32.
    """
    b, n, d = x.shape
    m = torch.ones(b, n, device=x.device) if mass is None else mass.float()
    keep = assignment >= 0
    tgt = assignment.clamp(min=0)
    m = m * keep
    acc = torch.zeros(b, k, d, device=x.device, dtype=torch.float32)
    acc.scatter_add_(1, tgt.unsqueeze(-1).expand(-1, -1, d), x.float() * m.unsqueeze(-1))
    tot = torch.zeros(b, k, device=x.device, dtype=torch.float32).scatter_add_(1, tgt, m)
    return (acc / tot.clamp(min=1e-12).unsqueeze(-1)).to(x.dtype), tot
