"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP vision tower → MLP projector → LLM, one fixed grid per image.

What reducers receive per image: projector outputs `[N, D]` (N = 576 for 336 px / patch 14), the pre-projector
features of the selected vision layer, the CLS-attention logits and keys of one CLIP layer (captured with forward
hooks on its `q_proj` / `k_proj`, so the stock SDPA attention runs unchanged), and the `(24, 24)` grid.
By default that layer is the one producing the features (`vision_feature_layer`, -2 for LLaVA-1.5), as FasterVLM
and VisionZip use; `vision_layer=` picks another.
A vision tower without ViT layers (`vtc.tokenizers.tower.TokenizerTower`, a 1-D tokenizer) gives its ordered token
codes, no CLS attention and no grid, plus the per-image `lengths` an adaptive tokenizer chose.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from vtc.types import VisualTokens

from .base import VLMAdapter, register_adapter


class _Capture:
    """Forward hooks that record a module's input or output for one call."""

    def __init__(self) -> None:
        self.handles, self.values = [], {}

    def output(self, module, key: str) -> None:
        self.handles.append(module.register_forward_hook(lambda m, i, o: self.values.__setitem__(key, o)))

    def input(self, module, key: str) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda m, i: self.values.__setitem__(key, i[0])))

    def __enter__(self) -> _Capture:
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def clip_layer_for_hidden_state(num_layers: int, hidden_index: int) -> int:
    """Index of the encoder layer whose output is `hidden_states[hidden_index]` (hidden_states[0] = embeddings)."""
    j = hidden_index if hidden_index >= 0 else num_layers + 1 + hidden_index
    if not 1 <= j <= num_layers:
        raise ValueError(f"vision_layer={hidden_index} does not name an encoder layer output (1..{num_layers})")
    return j - 1


def cls_logits_and_keys(q: Tensor, k: Tensor, heads: int, scale: float, prefix: int = 1) -> tuple[Tensor, Tensor]:
    """CLS-row attention logits `[B, H, N]` and patch keys `[B, N, Dk]` from q/k projections `[B, 1+N, Dk]`."""
    b, s, dk = k.shape
    dh = dk // heads
    qc = q[:, :1].float().reshape(b, 1, heads, dh).transpose(1, 2)  # [B, H, 1, dh]
    kh = k.float().reshape(b, s, heads, dh).transpose(1, 2)  # [B, H, S, dh]
    logits = (qc @ kh.transpose(-1, -2)).squeeze(2) * scale  # [B, H, S]
    return logits[:, :, prefix:], k[:, prefix:]


def encoder_layers(tower) -> torch.nn.ModuleList:
    """The transformer blocks of a CLIP/SigLIP vision tower (`encoder.layers`, possibly under `vision_model`)."""
    for path in ("encoder.layers", "vision_model.encoder.layers"):
        mod = tower
        try:
            for part in path.split("."):
                mod = getattr(mod, part)
        except AttributeError:
            continue
        return mod
    raise TypeError(f"vtc: cannot find the encoder layers of vision tower {type(tower).__name__}")


@register_adapter("LlavaForConditionalGeneration")
class LlavaAdapter(VLMAdapter):
    """LLaVA-1.5 adapter (see the module docstring)."""

    extra_image_keys = ("vision_feature_layer", "vision_feature_select_strategy")

    def encode(self, pixel_values: Tensor, extra: dict[str, Any]) -> list[VisualTokens]:
        inner = self.model.model
        cfg = self.model.config
        feat_layer = extra.get("vision_feature_layer") or cfg.vision_feature_layer
        strategy = extra.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        if not isinstance(feat_layer, int):
            raise ValueError(f"vtc: multi-layer vision features ({feat_layer}) are not supported yet")
        tower = inner.vision_tower
        try:
            layers = encoder_layers(tower)
        except TypeError:  # not a ViT (a 1-D tokenizer tower): no CLS attention, maybe per-image lengths
            layers = None
        with _Capture() as cap:
            cap.input(inner.multi_modal_projector, "features")
            if layers is not None:
                li = clip_layer_for_hidden_state(len(layers), self.config.vision_layer or feat_layer)
                attn = layers[li].self_attn
                cap.output(attn.q_proj, "q")
                cap.output(attn.k_proj, "k")
            out = inner.get_image_features(
                pixel_values=pixel_values, vision_feature_layer=feat_layer, vision_feature_select_strategy=strategy
            )
        tokens = torch.stack(list(out.pooler_output))  # [n_img, N, D]
        logits = keys = None
        if layers is not None:
            prefix = 1 if strategy == "default" else 0
            logits, keys = cls_logits_and_keys(cap.values["q"], cap.values["k"], attn.num_heads, attn.scale, prefix)
        n = tokens.shape[1]
        side = math.isqrt(n)
        grid = (side, side) if side * side == n and layers is not None else None
        lengths = getattr(out, "lengths", None)
        return [VisualTokens(tokens, cap.values["features"], logits, keys, grid, lengths=lengths)]
