"""ToDRE: diverse visual tokens by greedy k-center after the vision encoder (`todre`), then task relevance and
information migration inside the LLM (`todre_llm`).

Li, Yang and Lu, "ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large
Vision-Language Models", arXiv 2505.18757 (v1; no official code). Stage 1 keeps a small, diverse subset of the
visual tokens with the greedy k-center algorithm (Gonzalez): after a first center, each step adds the token
farthest from its nearest center. Stage 2 ("information migration") acts inside the LLM: at a late decoder
layer the visual tokens are scored by the attention the text (the question) pays them and the task-irrelevant
ones are dropped; deeper still, the visual information has migrated into the text tokens and every visual token
is removed. (v2 of the paper switched stage 1 to max-sum diversification; this is v1.)

Both stages run with `vtc.compress(model, "todre", budget=k, in_llm=True)`: `budget` is stage 1's kept count per
image, `in_llm_budget` (default: half of the tokens that reach the LLM) stage 2's relevance cut; the adapter
reports the layer-averaged visual tokens in `adapter_of(model).last["effective_visual_tokens"]`.

Pinned choices (the paper does not let us verify them):
* distance d = 1 - cos on the vision-encoder outputs (`VisualTokens.features`) when given, else on `tokens`;
* first center (`first_center`): "medoid" (default), the token with the smallest summed distance to all tokens,
  i.e. the one most aligned with the mean normalised token; "max_nn" uses DivPrune's rule (the token farthest
  from its nearest neighbour) instead;
* ties go to the lowest index; distances are float32; kept tokens stay in input order.
* `VisualTokens.valid` (stage 1): the medoid and the greedy run on the valid tokens alone, exactly as if the
  invalid tokens were not in the input.
* stage 2 (`todre_llm`): relevance = head-mean softmax attention (over the whole sequence, causal) of the real
  text tokens after the last visual token, averaged over those text tokens, from the q/k of the layer before
  `layer` (captured beside SDPA); `budget` is the number kept from `layer` on; every visual token is gone from
  `drop_layer` on. Defaults (not verifiable from the paper): `layer` = half the depth (16 of 32), `drop_layer` =
  three quarters (24 of 32). v1's abstract says all visual tokens are pruned "adaptively" in certain layers; no
  criterion for choosing those layers per input is given in what we could read, so `drop_layer` is fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..ops.diversity import cosine_distance, farthest_point_sampling
from ..ops.select import prefix_indices, pruned_selection
from ..types import Query, Selection, VisualTokens
from .base import InLLMReducer, Reducer, ReducerConfig, register_reducer

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

    uses = ("features",)

    in_llm_stage = "todre_llm"

    def _reduce(self, vt: VisualTokens, k: int, query: Query | None) -> Selection:
        space = vt.features if vt.features is not None else vt.tokens  # [B, N, Dv]
        dist = cosine_distance(space)  # [B, N, N]
        first = dist.sum(dim=-1).argmin(dim=-1) if self.config.first_center == "medoid" else None  # [B]
        order, idx = farthest_point_sampling(dist, k, first=first)  # [B, k] each
        return pruned_selection(vt.tokens, idx, order=order)

    def _reduce_valid(self, vt: VisualTokens, ks: Tensor, query: Query | None) -> Selection:
        space = vt.features if vt.features is not None else vt.tokens  # [B, N, Dv]
        valid = vt.valid  # [B, N]
        dist = cosine_distance(space)  # [B, N, N]
        first = None
        if self.config.first_center == "medoid":  # least summed distance to the valid tokens, among them
            total = dist.masked_fill(~valid.unsqueeze(1), 0.0).sum(dim=-1)  # [B, N]
            first = total.masked_fill(~valid, float("inf")).argmin(dim=-1)
        order, _ = farthest_point_sampling(dist, int(ks.max()), first=first, candidates=valid)
        idx, mask = prefix_indices(order, ks)
        return pruned_selection(vt.tokens, idx, mask, order=order.masked_fill(~mask, -1))


@dataclass
class ToDREInLLMConfig(ReducerConfig):
    layer: int | None = None  # first layer with only the task-relevant visual tokens; None: half the depth
    drop_layer: int | None = None  # first layer with no visual token; None: three quarters of the depth


@register_reducer("todre_llm", config=ToDREInLLMConfig)
class ToDREInLLM(InLLMReducer):
    """Stage 2 of ToDRE: keep the visual tokens the question attends to most, then remove all visual tokens."""

    def plan(self, n_visual: int, k: int, num_layers: int) -> list[tuple[int, int]]:
        c = self.config
        layers = None
        if c.layer is not None or c.drop_layer is not None:
            default = [max(1, min(num_layers - 1, round(num_layers * f))) for f in (0.5, 0.75)]
            layers = (default[0] if c.layer is None else c.layer, default[1] if c.drop_layer is None else c.drop_layer)
        layer, drop = self._layers_at(layers, (0.5, 0.75), num_layers, option="layer=..., drop_layer=...")
        return [(layer, k), (drop, 0)]

    def score(self, ctx) -> Tensor:
        probs, rows = ctx.attention_rows(ctx.text_after_visual())  # [B, T, L], [B, T]
        return probs.sum(1) / rows.sum(-1, keepdim=True).clamp(min=1)
