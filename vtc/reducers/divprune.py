"""DivPrune: diversity-based visual token pruning for large multimodal models.

Alvar et al., CVPR 2025, arXiv 2503.02175 (https://github.com/vbdi/divprune). Token pruning as a max-min
diversity problem (maximise the smallest pairwise distance among the kept tokens), solved greedily: with
d = 1 - cos, the first token is the one with the largest distance to its nearest neighbour, then each step adds
the token whose distance to the kept set (its nearest kept token) is largest. Kept tokens stay in input order.

Pinned choices (checked against the official LLaVA code):
* distances are computed on the projector outputs, the tokens the LLM sees (`VisualTokens.tokens`);
* "nearest neighbour" excludes the token itself, and an already kept token is never picked again (the official
  loop can re-pick one when all remaining distances are 0, e.g. duplicate tokens);
* ties go to the lowest index; distances are float32.
* `VisualTokens.valid`: the greedy runs on the valid tokens alone (invalid ones are neither picked nor anyone's
  nearest neighbour), exactly as if the invalid tokens were not in the input.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..ops.diversity import cosine_distance, farthest_point_sampling
from ..ops.select import prefix_indices, pruned_selection
from ..types import Query, Selection, VisualTokens
from .base import Reducer, ReducerConfig, register_reducer


@dataclass
class DivPruneConfig(ReducerConfig):
    pass


@register_reducer("divprune", config=DivPruneConfig)
class DivPrune(Reducer):
    """Keep the k tokens picked by greedy max-min diversity on cosine distance."""

    def _reduce(self, vt: VisualTokens, k: int, query: Query | None) -> Selection:
        dist = cosine_distance(vt.tokens)  # [B, N, N]
        order, idx = farthest_point_sampling(dist, k)  # [B, k] each
        return pruned_selection(vt.tokens, idx, order=order)

    def _reduce_valid(self, vt: VisualTokens, ks: Tensor, query: Query | None) -> Selection:
        dist = cosine_distance(vt.tokens)  # [B, N, N]
        order, _ = farthest_point_sampling(dist, int(ks.max()), candidates=vt.valid)  # nested: prefixes per row
        idx, mask = prefix_indices(order, ks)
        return pruned_selection(vt.tokens, idx, mask, order=order.masked_fill(~mask, -1))
