"""Shared fixtures: random visual tokens with every side field a reducer may need."""

from __future__ import annotations

import torch

import vtc
from vtc.reducers import get_reducer_class


def make_inputs(
    name: str,
    b: int = 2,
    grid: tuple[int, int] = (6, 6),
    d: int = 16,
    t: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    views: tuple[int, int] = (1, 2),
) -> tuple[vtc.VisualTokens, vtc.Query | None]:
    """Inputs for reducer `name`: a high-resolution layout (thumbnail + crops) if it requires `views`,
    a plain grid otherwise; a query with one padded position in sample 0 if it is query-aware."""
    cls = get_reducer_class(name)
    g = torch.Generator().manual_seed(seed)
    hw = grid[0] * grid[1]
    use_views = "views" in cls.requires
    n = hw * (1 + views[0] * views[1]) if use_views else hw
    heads, dk, dv = 2, 8, d + 4
    vt = vtc.VisualTokens(
        tokens=torch.randn(b, n, d, generator=g).to(dtype),
        features=torch.randn(b, n, dv, generator=g).to(dtype),
        cls_attn=(2 * torch.randn(b, heads, n, generator=g)).to(dtype),
        keys=torch.randn(b, n, dk, generator=g).to(dtype),
        grid=grid,
        views=views if use_views else None,
    )
    query = None
    if cls.needs_query:
        mask = torch.ones(b, t, dtype=torch.bool)
        if t > 1:
            mask[0, -1] = False
        query = vtc.Query(torch.randn(b, t, d, generator=g).to(dtype), mask)
    return vt, query
