"""The one rule that turns a budget into a token count, for every method.

* an `int` k is the number of visual tokens kept per sample (one image with all its views, or one video);
  it must satisfy 1 <= k <= N;
* a `float` r in (0, 1] is a fraction of the N input tokens: k = floor(r * N + 1/2) (round half up),
  at least 1. So 0.25 of 576 is 144, 1/9 of 576 is 64, and 1.0 is always N.

Adaptive methods (ATP, QTSplus) treat k as the most tokens a sample may keep.

When some tokens of a sample do not exist in the model's sequence (`VisualTokens.valid`), the budget is resolved
against the sample's valid count M_b (`resolve_budgets`): an int k keeps min(k, M_b) tokens (k is still checked
against N), a fraction r keeps floor(r * M_b + 1/2), at least 1.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def resolve_budget(budget: int | float, num_tokens: int, who: str = "reducer") -> int:
    """Number of tokens to keep out of `num_tokens` for `budget` (see the module docstring)."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(
            f"{who}: budget must be an int (tokens kept) or a float in (0, 1] (fraction kept), "
            f"got {budget!r} of type {type(budget).__name__}"
        )
    if num_tokens <= 0:
        raise ValueError(f"{who}: there are no visual tokens to reduce (N = {num_tokens})")
    if isinstance(budget, numbers.Integral):
        k = int(budget)
        if not 1 <= k <= num_tokens:
            raise ValueError(
                f"{who}: budget={k} tokens is outside [1, N={num_tokens}]; pass a count in that range "
                f"or a fraction such as {min(1.0, max(k, 1) / num_tokens):.3g}"
            )
        return k
    r = float(budget)
    if math.isnan(r) or not 0.0 < r <= 1.0:
        hint = f" (did you mean the int {int(r)}?)" if r > 1 and r == int(r) else ""
        raise ValueError(f"{who}: budget={budget!r} as a fraction must lie in (0, 1]{hint}")
    return max(1, min(num_tokens, math.floor(r * num_tokens + 0.5)))


def resolve_budgets(budget: int | float, counts: Tensor, num_tokens: int, who: str = "reducer") -> Tensor:
    """Per-sample token counts `[B]` int64 for `budget` when sample b has `counts[b]` (>= 1) valid tokens of N.

    The budget is checked against N (`resolve_budget`) and then resolved against each valid count.
    """
    k = resolve_budget(budget, num_tokens, who=who)
    if isinstance(budget, numbers.Integral):
        return counts.clamp(max=k).long()
    out = [resolve_budget(float(budget), int(c), who=who) for c in counts.tolist()]
    return torch.tensor(out, dtype=torch.long, device=counts.device)


def split_budget(k: int, sizes: list[int]) -> list[int]:
    """Split k tokens over parts of the given sizes proportionally (largest remainder), each ≤ its size.

    Used when one sample has several views or frames and a method keeps tokens per part.
    """
    total = sum(sizes)
    if not 0 <= k <= total:
        raise ValueError(f"cannot keep {k} tokens out of {total}")
    raw = [k * s / total for s in sizes]
    out = [min(int(r), s) for r, s in zip(raw, sizes, strict=True)]
    order = sorted(range(len(sizes)), key=lambda i: (out[i] - raw[i], i))  # largest remainder first
    rest = k - sum(out)
    i = 0
    while rest > 0:
        j = order[i % len(order)]
        if out[j] < sizes[j]:
            out[j] += 1
            rest -= 1
        i += 1
    return out
