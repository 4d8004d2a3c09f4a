"""ToDRE stage 1: diverse visual tokens by greedy k-center after the vision encoder.

Li, Yang and Lu, "ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large
Vision-Language Models", arXiv 2505.18757 (v1; no official code). Stage 1 keeps a small, diverse subset of the
visual tokens with the greedy k-center algorithm (Gonzalez): after a first center, each step adds the token
farthest from its nearest center. Stage 2 ("information migration": text-to-vision attention drops
task-irrelevant tokens at a late decoder layer, then all visual tokens in later layers) acts inside the LLM and
lives with the model adapters, not here. (v2 of the paper switched stage 1 to max-sum diversification; this is v1.)

Pinned choices (the paper does not let us verify them):
* distance d = 1 - cos on the vision-encoder outputs (`VisualTokens.features`) when given, else on `tokens`;
* first center (`first_center`): "medoid" (default), the token with the smallest summed distance to all tokens,
  i.e. the one most aligned with the mean normalised token; "max_nn" uses DivPrune's rule (the token farthest
  from its nearest neighbour) instead;
* ties go to the lowest index; distances are float32; kept tokens stay in input order.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ops.diversity import cosine_distance, farthest_point_sampling
from ..ops.select import pruned_selection
from ..types import Query, Selection, VisualTokens
from .base import Reducer, ReducerConfig, register_reducer

FIRST_CENTERS = ("medoid", "max_nn")


@dataclass
class ToDREConfig(ReducerConfig):
    first_center: str = "medoid"  # "medoid" (least summed distance) or "max_nn" (largest nearest-neighbour distance)

    def __post_init__(self) -> None:
        if self.first_center not in FIRST_CENTERS:
            raise ValueError(f"todre: first_center={self.first_center!r} must be one of {FIRST_CENTERS}")


@register_reducer("todre", config=ToDREConfig)
class ToDRE(Reducer):
    """Stage 1 of ToDRE: keep k tokens chosen by greedy k-center on cosine distance of the encoder features."""

    def _reduce(self, vt: VisualTokens, k: int, query: Query | None) -> Selection:
        space = vt.features if vt.features is not None else vt.tokens  # [B, N, Dv]
        dist = cosine_distance(space)  # [B, N, N]
        first = dist.sum(dim=-1).argmin(dim=-1) if self.config.first_center == "medoid" else None  # [B]
        order, idx = farthest_point_sampling(dist, k, first=first)  # [B, k] each
        return pruned_selection(vt.tokens, idx, order=order)
