"""Selection helpers shared by pruning reducers: top-k in token order, gathering, padding ragged keeps."""

from __future__ import annotations

import torch
from torch import Tensor

from ..types import Selection


def topk_ascending(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores per row, sorted ascending by position.

    Args:
        scores: `[B, N]`.
    Returns:
        `[B, k]` int64. Ties are broken towards the lower index (stable), so results do not depend on
        the backend's top-k tie order.
    """
    # A stable descending sort gives the lowest index first among equal scores.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=-1).values


def rank_valid_first(scores: Tensor, valid: Tensor | None = None) -> Tensor:
    """`[B, N]` rank of every score in its row, highest first, lower index first on ties; invalid tokens
    (`valid` False) rank after every valid one, whatever their score."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # [B, N]
    if valid is not None:  # a stable sort on "is invalid" moves the valid tokens to the front, order kept
        order = order.gather(1, torch.sort((~valid).gather(1, order).byte(), dim=-1, stable=True).indices)
    return order.argsort(-1)


def topk_per_row(scores: Tensor, ks: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The `ks[b]` highest valid scores of each row, ascending by position, padded (see `keep_mask_to_indices`).

    Args:
        scores: `[B, N]`.
        ks: `[B]` int64 counts, each at most the row's valid count.
        valid: `[B, N]` bool (None: all valid).
    Returns:
        `[B, Kmax]` int64 indices (padding 0) and `[B, Kmax]` bool mask. Ties go to the lower index.
    """
    keep = rank_valid_first(scores, valid) < ks.unsqueeze(-1)
    return keep_mask_to_indices(keep)


def prefix_indices(order: Tensor, ks: Tensor) -> tuple[Tensor, Tensor]:
    """The first `ks[b]` entries of each row of a greedy selection `order` `[B, K]`, ascending and padded.

    Greedy selections are nested (a run with a smaller k is a prefix), so one batched run to `max(ks)` serves
    every row. Returns `[B, max(ks)]` int64 indices (padding 0) and their `[B, max(ks)]` bool mask.
    """
    kmax = int(ks.max())
    mask = torch.arange(kmax, device=order.device) < ks.unsqueeze(-1)  # [B, kmax]
    big = torch.iinfo(torch.long).max
    idx = order[:, :kmax].masked_fill(~mask, big).sort(dim=-1).values
    return idx.masked_fill(~mask, 0), mask


def gather_tokens(x: Tensor, indices: Tensor) -> Tensor:
    """`x[b, indices[b]]` for `x: [B, N, D]`, `indices: [B, K]` → `[B, K, D]`."""
    return x.gather(1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def pad_index_lists(rows: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """Stack ragged ascending index rows into `[B, Kmax]` (padded with 0) and a `[B, Kmax]` validity mask."""
    kmax = max((int(r.numel()) for r in rows), default=0)
    idx = torch.zeros(len(rows), kmax, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), kmax, dtype=torch.bool, device=device)
    for b, r in enumerate(rows):
        idx[b, : r.numel()] = r
        mask[b, : r.numel()] = True
    return idx, mask


def keep_mask_to_indices(keep: Tensor) -> tuple[Tensor, Tensor]:
    """`[B, N]` bool keep mask → ascending `[B, Kmax]` indices (padded with 0) and their `[B, Kmax]` mask."""
    counts = keep.sum(-1)  # [B]
    kmax = int(counts.max()) if keep.numel() else 0
    n = keep.shape[-1]
    pos = torch.arange(n, device=keep.device).expand_as(keep)
    # Kept positions sort first (in order), dropped ones get N and sort last.
    idx = torch.where(keep, pos, torch.full_like(pos, n)).sort(dim=-1).values[:, :kmax]
    mask = torch.arange(kmax, device=keep.device) < counts.unsqueeze(-1)
    return idx.masked_fill(~mask, 0), mask


def pruned_selection(x: Tensor, indices: Tensor, mask: Tensor | None = None, **info) -> Selection:
    """The `Selection` of a pruning method: `x: [B, N, D]` gathered at ascending `indices: [B, K]`.

    Padded slots (mask False) get zero tokens and index 0.
    """
    if mask is None:
        mask = torch.ones(indices.shape, dtype=torch.bool, device=indices.device)
    tokens = gather_tokens(x, indices)
    if not bool(mask.all()):
        tokens = tokens * mask.unsqueeze(-1).to(tokens.dtype)
    return Selection(tokens, indices, mask, info=info)
