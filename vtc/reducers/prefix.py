"""Prefix: keep the first k tokens in sequence order — the budget rule of ordered 1-D image tokenizers.

FlexTok (arXiv 2502.13967), One-D-Piece (arXiv 2501.10064) and KARL (arXiv 2507.07995) emit an ordered token
sequence trained with tail dropout, so that its first k tokens are already a coarse description of the image; a VLM
fed such tokens (`vtc.tokenizers.tower`, trained with random prefix lengths as TokenFLEX and MQT-LLaVA do) is
compressed by truncating the sequence. That truncation is this reducer.

Adaptive lengths: when `VisualTokens.lengths` is set (KARL chose, per image and in one encoder pass, how many
tokens reach the requested error), sample b keeps its first min(k, lengths[b]) tokens, at least one: the budget is
a cap and the tokenizer decides below it. At full budget every reducer is the identity, so KARL's own choice shows
at budgets below K. On a 2-D grid (an ordinary vision tower) the prefix is the top rows of the image: a naive,
content-blind baseline, not a method anyone should use there.
With `VisualTokens.valid`, the first k *valid* tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.select import keep_mask_to_indices, pruned_selection
from ..types import Query, Selection, VisualTokens
from .base import Reducer, ReducerConfig, register_reducer


@dataclass
class PrefixConfig(ReducerConfig):
    use_lengths: bool = True  # honour VisualTokens.lengths (adaptive tokenizers) when present


@register_reducer("prefix", config=PrefixConfig)
class Prefix(Reducer):
    """Keep the first k (valid) tokens; adaptive tokenizers' per-image lengths cap k further."""

    adaptive = True
    uses = ("lengths",)

    def _keep(self, vt: VisualTokens, ks: Tensor) -> Selection:
        b, n, _ = vt.tokens.shape
        if self.config.use_lengths and vt.lengths is not None:
            lengths = vt.lengths.to(ks.device).long().reshape(-1)
            if lengths.numel() != b:
                raise self._fail(f"VisualTokens.lengths must hold one count per sample ({b}), got {lengths.numel()}")
            ks = torch.minimum(ks, lengths.clamp(min=1))
        valid = vt.valid if vt.valid is not None else torch.ones(b, n, dtype=torch.bool, device=vt.tokens.device)
        rank = valid.long().cumsum(-1) - 1  # [B, N] position among the valid tokens
        keep = valid & (rank < ks.to(valid.device).unsqueeze(-1))  # [B, N]
        idx, mask = keep_mask_to_indices(keep)
        return pruned_selection(vt.tokens, idx, mask)

    def _reduce(self, vt: VisualTokens, k: int, query: Query | None) -> Selection:
        return self._keep(vt, torch.full((vt.tokens.shape[0],), k, dtype=torch.long))

    def _reduce_valid(self, vt: VisualTokens, ks: Tensor, query: Query | None) -> Selection:
        return self._keep(vt, ks)
