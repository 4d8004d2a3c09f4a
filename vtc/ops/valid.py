"""Helpers for `VisualTokens.valid` (tokens of a layout that do not exist in the model's sequence).

Reducers honour `valid` by masking (scores of invalid tokens never win, invalid tokens are never candidates, rows
or columns of invalid tokens drop out of normalisations) or, where masking would change a method's batched
bookkeeping, by running on the valid tokens of a group of samples alone (`sample_groups`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_groups(valid: Tensor) -> list[Tensor]:
    """Samples with identical `valid` rows (`[B, N]` bool): a list of `[B_g]` int64 sample indices, ascending.

    Groups are ordered by their first sample, so a method run group by group visits samples in batch order.
    """
    _, inverse = torch.unique(valid, dim=0, return_inverse=True)  # [B] group id of every sample
    groups = [(inverse == g).nonzero().squeeze(-1) for g in range(int(inverse.max()) + 1)]
    return sorted(groups, key=lambda rows: int(rows[0]))


def valid_rectangle(valid: Tensor, h: int, w: int) -> tuple[int, int, int, int] | None:
    """`(r0, c0, hh, ww)` when the valid cells of an h×w grid (`valid: [h*w]` bool) are exactly the full rectangle
    of rows r0…r0+hh−1 and columns c0…c0+ww−1 (unpadding removes whole rows/columns), else None (also when empty).
    """
    cells = valid.reshape(h, w)
    rows = cells.any(1).nonzero().squeeze(-1)
    cols = cells.any(0).nonzero().squeeze(-1)
    if rows.numel() == 0:
        return None
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if int(cells.sum()) != (r1 - r0) * (c1 - c0):
        return None
    return r0, c0, r1 - r0, c1 - c0


def masked_softmax(logits: Tensor, valid: Tensor | None, dim: int = -1) -> Tensor:
    """Softmax over the valid entries only (invalid entries get probability 0); `valid` broadcasts to `logits`.

    Every softmax slice must hold at least one valid entry.
    """
    if valid is None:
        return logits.softmax(dim)
    return logits.masked_fill(~valid, float("-inf")).softmax(dim)


def masked_mean(x: Tensor, valid: Tensor | None, dim: int = -1) -> Tensor:
    """Mean of `x` over its valid entries along `dim` (`valid` broadcasts to `x`), keeping no dimension."""
    if valid is None:
        return x.mean(dim)
    valid = valid.expand_as(x)
    return x.masked_fill(~valid, 0).sum(dim) / valid.sum(dim).clamp(min=1).to(x.dtype)
