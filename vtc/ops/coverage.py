"""Facility-location coverage and its batched greedy maximisation.

For a nonnegative similarity matrix `W [B, R, N]` (rows = things to cover, columns = candidate tokens) the
coverage of a set S of columns is `f(S) = sum_r max_{j in S} W[r, j]` (0 for the empty set). f is monotone and
submodular, so the greedy that adds the column with the largest marginal gain is a (1 - 1/e)-approximation
(Nemhauser et al., 1978). The greedy keeps the current coverage `cur [B, R]` of every row; the gain of every
candidate at once is `sum_r relu(W[:, r, j] - cur[:, r])`, one tensor op per step over the whole batch.
Ties go to the lowest index. Scores are float32 (float64 inputs stay float64).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _masked_weights(weights: Tensor, row_mask: Tensor | None) -> Tensor:
    w = weights.to(torch.promote_types(weights.dtype, torch.float32))  # [B, R, N]
    if row_mask is not None:  # a masked row is all zeros: it is covered from the start and never adds gain
        w = w.masked_fill(~row_mask.bool().unsqueeze(-1), 0.0)
    return w


def facility_location_value(weights: Tensor, indices: Tensor, row_mask: Tensor | None = None) -> Tensor:
    """`f(S) = sum_r max_{j in S} W[r, j]` for `S = indices [B, K]` (K = 0: zero) → `[B]`."""
    w = _masked_weights(weights, row_mask)  # [B, R, N]
    if indices.shape[-1] == 0:
        return w.new_zeros(w.shape[0])
    cols = w.gather(2, indices.unsqueeze(1).expand(-1, w.shape[1], -1))  # [B, R, K]
    return cols.amax(dim=-1).sum(dim=-1)


def greedy_coverage(
    weights: Tensor, k: int, row_mask: Tensor | None = None, candidates: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy maximisation of the facility-location coverage, k columns per sample.

    Args:
        weights: `[B, R, N]` nonnegative similarities of R rows to N candidate columns.
        k: columns to select, 1 <= k <= N.
        row_mask: `[B, R]` bool, False for padded rows (they contribute nothing); None: all rows count.
        candidates: `[B, N]` bool, the columns that may be picked (None: all). Once a row's candidates are
            exhausted its later picks (gain -inf) are meaningless: take a prefix (`vtc.ops.select.prefix_indices`).
    Returns:
        `order` `[B, k]` (selection order), `indices` `[B, k]` (the same set, ascending) and `gains` `[B, k]`
        (marginal gain of each pick, so `gains.cumsum(-1)` is f of each greedy prefix).
    """
    b, r, n = weights.shape
    if not 1 <= k <= n:
        raise ValueError(f"greedy_coverage: k={k} must lie in [1, N={n}]")
    with torch.no_grad():
        w = _masked_weights(weights, row_mask)  # [B, R, N]
        cur = w.new_zeros(b, r)  # [B, R] best coverage of each row so far
        taken = torch.zeros(b, n, dtype=torch.bool, device=w.device)  # [B, N] picked, or never to be picked
        if candidates is not None:
            taken = ~candidates.to(device=w.device, dtype=torch.bool)
        order = torch.empty(b, k, dtype=torch.long, device=w.device)
        gains = w.new_empty(b, k)
        buf = torch.empty_like(w)  # reused every step: the step is memory-bound, allocation doubled its time
        for step in range(k):
            gain = torch.sub(w, cur.unsqueeze(-1), out=buf).clamp_(min=0.0).sum(dim=1)  # [B, N]
            gain = gain.masked_fill(taken, float("-inf"))
            j = gain.argmax(dim=-1)  # [B], first maximum = lowest index
            order[:, step] = j
            gains[:, step] = gain.gather(1, j.view(b, 1)).squeeze(1)
            taken.scatter_(1, j.view(b, 1), True)
            cur = torch.maximum(cur, w.gather(2, j.view(b, 1, 1).expand(b, r, 1)).squeeze(-1))
        return order, order.sort(dim=-1).values, gains
