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
    * `VisualTokens.valid`: the rounds run on the valid tokens of each sample alone, in their order, exactly as if
      the invalid tokens were not in the input (samples with the same valid tokens run as one batch); invalid
      tokens go nowhere (assignment −1). Rows are padded to the largest k_b (padding anchors hold N) and
      `info["rounds"]` becomes a `[B]` tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.grid import scatter_mean
from ..ops.merge import bipartite_merge, compose_assignment, group_first_index
from ..ops.select import gather_tokens
from ..ops.valid import sample_groups
from ..types import Query, Selection, VisualTokens
from .base import Reducer, ReducerConfig, register_reducer


@dataclass
class ToMeConfig(ReducerConfig):
    pass


@register_reducer("tome", config=ToMeConfig)
class ToMe(Reducer):
    """Bipartite soft matching rounds until k size-weighted merged tokens remain."""

    merges = True
    uses = ("keys",)

    def _reduce(self, vt: VisualTokens, k: int, query: Query | None) -> Selection:
        x = vt.tokens  # [B, N, D]
        b, n, _ = x.shape
        with torch.no_grad():
            assignment, rounds = self._match((vt.keys if vt.keys is not None else x).float(), k)  # [B, N]
            anchors = group_first_index(assignment, k)  # [B, k] ascending by construction
        tokens, weights = scatter_mean(x, assignment, k)  # [B, k, D], [B, k]
        mask = torch.ones(b, k, dtype=torch.bool, device=x.device)
        return Selection(
            tokens, None, mask, weights=weights, assignment=assignment, info={"anchors": anchors, "rounds": rounds}
        )

    def _reduce_valid(self, vt: VisualTokens, ks: Tensor, query: Query | None) -> Selection:
        x = vt.tokens  # [B, N, D]
        b, n, _ = x.shape
        kmax = int(ks.max())
        assignment = torch.full((b, n), -1, dtype=torch.long, device=x.device)
        rounds = torch.zeros(b, dtype=torch.long, device=x.device)
        with torch.no_grad():
            metric = (vt.keys if vt.keys is not None else x).float()  # [B, N, C]
            for group in sample_groups(vt.valid):  # the valid tokens of samples with the same pattern, as a batch
                cols = vt.valid[group[0]].nonzero().squeeze(-1)  # [M] ascending
                sub = gather_tokens(metric[group], cols.expand(group.numel(), -1))  # [G, M, C]
                a, r = self._match(sub, int(ks[group[0]]))  # [G, M]
                assignment[group.unsqueeze(-1), cols] = a
                rounds[group] = r
            anchors = group_first_index(assignment, kmax)  # [B, kmax]; padding rows hold N
        tokens, weights = scatter_mean(x, assignment, kmax)  # [B, kmax, D], [B, kmax] (padding: zeros)
        mask = torch.arange(kmax, device=x.device) < ks.unsqueeze(-1)
        return Selection(
            tokens, None, mask, weights=weights, assignment=assignment, info={"anchors": anchors, "rounds": rounds}
        )

    @staticmethod
    def _match(metric: Tensor, k: int) -> tuple[Tensor, int]:
        """Rounds of bipartite matching on `metric` `[B, N, C]` down to k groups: assignment `[B, N]`, rounds."""
        b, n, _ = metric.shape
        rounds, size, cur = 0, None, n
        assignment = torch.arange(n, device=metric.device).expand(b, n)  # [B, N]
        while cur > k:
            r = min(cur - k, cur // 2)
            metric, size, step = bipartite_merge(metric, metric, r, size)  # [B, cur - r, C]
            assignment = compose_assignment(assignment, step)
            cur -= r
            rounds += 1
        return assignment, rounds
