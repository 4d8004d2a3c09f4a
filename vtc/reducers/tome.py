"""ToMe: Token Merging: Your ViT but Faster, applied once to the visual tokens.

Bolya et al., arXiv 2210.09461 (https://github.com/facebookresearch/ToMe). ToMe merges r tokens per ViT block
by bipartite soft matching: tokens alternate into sets A and B, each A token is matched to its most similar B
token (cosine of the attention keys), and the r best-matched A tokens are averaged into their match, weighted by
the number of patches each already holds. Here there are no blocks: rounds of matching run on the visual tokens
until exactly k remain (see `vtc.ops.merge`).

Pinned choices:
    * Each round removes r = min(current - k, current // 2) tokens (bipartite matching can remove at most half),
      so as few rounds as possible run; a budget of at least N/2 takes a single round.
    * Similarity: cosine of `VisualTokens.keys` (heads concatenated) if given, else of the tokens. A merged
      group's key for the next round is the mean of its members' keys (ToMe would recompute keys in the next
      block; there is none here).
    * Outputs are exact means of the inputs of each group (computed once from the composed assignment, in
      float32), so `weights` (group sizes) conserve the input mass.
    * Output order: groups sorted by the smallest original index among their members; every round alternates A/B
      over that order. `info["anchors"]` holds that smallest index per output, `info["rounds"]` the round count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.grid import scatter_mean
from ..ops.merge import bipartite_merge, compose_assignment, group_first_index
from ..types import Query, Selection, VisualTokens
from .base import Reducer, ReducerConfig, register_reducer


@dataclass
class ToMeConfig(ReducerConfig):
    pass


@register_reducer("tome", config=ToMeConfig)
class ToMe(Reducer):
    """Bipartite soft matching rounds until k size-weighted merged tokens remain."""

    merges = True

    def _reduce(self, vt: VisualTokens, k: int, query: Query | None) -> Selection:
        x = vt.tokens  # [B, N, D]
        b, n, _ = x.shape
        rounds = 0
        with torch.no_grad():
            metric = (vt.keys if vt.keys is not None else x).float()  # [B, N, C]
            size = None
            assignment = torch.arange(n, device=x.device).expand(b, n)  # [B, N]
            cur = n
            while cur > k:
                r = min(cur - k, cur // 2)
                metric, size, step = bipartite_merge(metric, metric, r, size)  # [B, cur - r, C]
                assignment = compose_assignment(assignment, step)
                cur -= r
                rounds += 1
            anchors = group_first_index(assignment, k)  # [B, k] ascending by construction
        tokens, weights = scatter_mean(x, assignment, k)  # [B, k, D], [B, k]
        mask = torch.ones(b, k, dtype=torch.bool, device=x.device)
        return Selection(
            tokens, None, mask, weights=weights, assignment=assignment, info={"anchors": anchors, "rounds": rounds}
        )
