"""FasterVLM: [CLS] attention is all you need for training-free visual token pruning.

Zhang et al., arXiv 2412.01818 (https://github.com/Theia-4869/FasterVLM). Tokens are ranked by the attention the
vision encoder's [CLS] token pays them (softmax over patches per head, mean over heads) and the top k are kept in
their original order. Which vision layer supplies the logits is the adapter's choice (the paper uses the layer
whose features feed the projector, the penultimate one for LLaVA).

With `VisualTokens.valid`, the scores stay the encoder's own (softmax over all patches of the view, which the
encoder did attend to) and the top k are taken among the valid tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..ops.attention import cls_attention_probs
from ..ops.select import pruned_selection, topk_ascending, topk_per_row
from ..types import Query, Selection, VisualTokens
from .base import Reducer, ReducerConfig, register_reducer


@dataclass
class FasterVLMConfig(ReducerConfig):
    pass


@register_reducer("fastervlm", config=FasterVLMConfig)
class FasterVLM(Reducer):
    """Keep the k tokens with the highest [CLS] attention."""

    requires = ("cls_attn",)

    def _reduce(self, vt: VisualTokens, k: int, query: Query | None) -> Selection:
        scores = cls_attention_probs(vt.cls_attn)  # [B, N]
        idx = topk_ascending(scores, k)
        return pruned_selection(vt.tokens, idx, scores=scores)

    def _reduce_valid(self, vt: VisualTokens, ks: Tensor, query: Query | None) -> Selection:
        scores = cls_attention_probs(vt.cls_attn)  # [B, N]
        idx, mask = topk_per_row(scores, ks, vt.valid)
        return pruned_selection(vt.tokens, idx, mask, scores=scores)
