"""Attention scores computed from queries and keys, beside (not instead of) the model's fused attention."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def attention_logits(q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """Pre-softmax logits `q k^T * scale` for the few query rows a method needs.

    Args:
        q: `[B, H, Tq, Dh]` queries (only the rows needed, e.g. the CLS row or the last text token).
        k: `[B, H, N, Dh]` keys.
    Returns:
        `[B, H, Tq, N]` in float32.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale


def cls_attention_probs(cls_attn: Tensor) -> Tensor:
    """Head-mean CLS attention over patches: softmax over N per head, then the mean over heads.

    Args:
        cls_attn: `[B, H, N]` pre-softmax logits (or `[B, N]` for one head).
    Returns:
        `[B, N]` float32, each row sums to 1.
    """
    a = cls_attn.float()
    if a.dim() == 2:
        a = a.unsqueeze(1)
    return a.softmax(dim=-1).mean(dim=1)
