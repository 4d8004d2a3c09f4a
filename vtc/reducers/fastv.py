"""FastV: an image is worth 1/2 tokens after layer 2.

Chen et al., arXiv 2403.06764 (https://github.com/pkunlp-icler/FastV). At prefill, after layer K−1 the visual
tokens are ranked by the attention the last prompt token pays them in layer K−1 (softmax over the sequence, mean over
heads); from layer K on only the top ones are computed and cached.

Pinned choices: `budget` is the number of visual tokens kept from layer K on (FastV's R = 1 − budget/N); the adapter
reports the layer-averaged count in `adapter.last["effective_visual_tokens"]`. The official code re-runs layer K−1 in
eager mode to get the attention map; here the scores come from that layer's q/k captured beside SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import InLLMReducer, ReducerConfig, register_reducer


@dataclass
class FastVConfig(ReducerConfig):
    layer: int = 2  # K: first layer that sees the reduced sequence (scores from layer K-1)


@register_reducer("fastv", config=FastVConfig)
class FastV(InLLMReducer):
    """Drop the least-attended visual tokens (last prompt token's attention) from layer K on."""

    def plan(self, n_visual: int, k: int, num_layers: int) -> list[tuple[int, int]]:
        return [(self._check_layer(self.config.layer, num_layers), k)]

    def score(self, ctx) -> Tensor:
        return ctx.last_token_attention()
