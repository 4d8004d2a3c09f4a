"""A 1-D tokenizer as the vision tower of a stock `LlavaForConditionalGeneration` (the tokenizer → VLM bridge).

`TokenizerTower` is a transformers `PreTrainedModel` whose output "hidden state" is an image's K ordered latent
tokens `[B, K, width]`: the encoder's continuous latents, the values the quantizer rounds into the discrete tokens
(pinned, as TokenFLEX and MQT-LLaVA feed continuous features to the projector; on vtc-shapes an MLP probe reads
the colours present from them at 0.74 against 0.59 from the FSQ codes). Put into a `LlavaConfig` as
`vision_config` (`vision_feature_layer=-1`, `vision_feature_select_strategy="full"`), the LLaVA projector maps those
latents into the LLM, and the model saves, loads (`from_pretrained`, after `import vtc`), generates and is
compressed like any LLaVA. The stock `LlavaProcessor` expands `<image>` to `(S // patch_size)^2 +
num_additional_image_tokens` placeholders; `bridge_processor_kwargs`
pins patch_size = image side and `num_additional_image_tokens = K - 1`, i.e. K placeholders.

Token budgets then act on the ordered sequence: the `prefix` reducer keeps the first k tokens (the coarse image, as
nested tail dropout trained them), any other reducer picks its own k. An adaptive tokenizer (KARL) also reports
`lengths` `[B]`: how many tokens each image needs for the requested error `config.error` (one encoder pass); the
adapter passes them on as `VisualTokens.lengths`, and `prefix` keeps min(k, length) per image.

Registered with `AutoConfig` / `AutoModel` as model type `vtc_tokenizer_tower` when `vtc` is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .base import TOKENIZERS


class TokenizerTowerConfig(PretrainedConfig):
    """`tokenizer`: a registered tokenizer name; `tokenizer_config`: its config fields; `error`: the desired mean
    L1 error per pixel for adaptive tokenizers (KARL), None = keep all K."""

    model_type = "vtc_tokenizer_tower"

    def __init__(
        self, tokenizer: str = "flextok", tokenizer_config: dict | None = None, error: float | None = None, **kw
    ) -> None:
        self.tokenizer = tokenizer
        self.tokenizer_config = dict(tokenizer_config or {})
        self.error = error
        super().__init__(**kw)
        cfg = TOKENIZERS.get(tokenizer).config_cls(**self.tokenizer_config)
        self.image_size = cfg.image_size
        self.hidden_size = cfg.width  # what the projector receives: the latent tokens
        self.num_tokens = cfg.num_tokens


@dataclass
class TokenizerTowerOutput(BaseModelOutputWithPooling):
    """`last_hidden_state` / `hidden_states[-1]`: `[B, K, width]` latent tokens; `lengths`: `[B]` tokens each
    image needs for `config.error` (adaptive tokenizers only, else None); `halt_prob`: `[B, K]` the halting
    probabilities those lengths come from (adaptive tokenizers with `config.error`, else None)."""

    lengths: Tensor | None = None
    halt_prob: Tensor | None = None


class TokenizerTower(PreTrainedModel):
    config_class = TokenizerTowerConfig
    base_model_prefix = "tokenizer_tower"
    main_input_name = "pixel_values"
    _no_split_modules: list[str] = []

    def __init__(self, config: TokenizerTowerConfig) -> None:
        super().__init__(config)
        cls = TOKENIZERS.get(config.tokenizer)
        self.tokenizer = cls(cls.config_cls(**config.tokenizer_config))
        self.post_init()

    def _init_weights(self, module) -> None:
        """Weights come from the trained tokenizer and are never re-initialised; only the derived (non-persistent)
        buffers, which `from_pretrained` leaves empty, are recomputed from a fresh tokenizer of the same config."""
        if not module._non_persistent_buffers_set:
            return
        name = next((n for n, m in self.tokenizer.named_modules() if m is module), None)
        if name is None:
            return
        cls = TOKENIZERS.get(self.config.tokenizer)
        with torch.device("cpu"):
            ref = cls(cls.config_cls(**self.config.tokenizer_config)).get_submodule(name)
        for b in module._non_persistent_buffers_set:
            setattr(module, b, getattr(ref, b).to(getattr(module, b).device))

    @property
    def adaptive(self) -> bool:
        return hasattr(self.tokenizer, "predict_num_tokens")

    def forward(self, pixel_values: Tensor, **kwargs: Any) -> TokenizerTowerOutput:
        """`pixel_values [B, 3, S, S]` in [0, 1] (the processor rescales and does not normalise). Differentiable:
        `vtc train bridge --tower-lr` fine-tunes the encoder through it."""
        x = pixel_values.float().clamp(0, 1)
        tok = self.tokenizer
        if self.adaptive and self.config.error is not None:
            t = tok.encode(x, error=self.config.error)
            lengths, halt = t.lengths, t.extras["halt_prob"]
        else:
            t, lengths, halt = tok.encode(x), None, None
        latents = t.features.to(pixel_values.dtype)  # [B, K, width]
        return TokenizerTowerOutput(
            last_hidden_state=latents, hidden_states=(latents,), lengths=lengths, halt_prob=halt
        )


def load_tokenizer_into(tower: TokenizerTower, tokenizer) -> None:
    """Copy a trained tokenizer's weights into `tower` (same name and config)."""
    if tokenizer.name != tower.config.tokenizer:
        raise ValueError(f"tower holds a {tower.config.tokenizer!r} tokenizer, got {tokenizer.name!r}")
    tower.tokenizer.load_state_dict(tokenizer.state_dict(), strict=True)


def bridge_processor_kwargs(tower_config: TokenizerTowerConfig) -> dict[str, Any]:
    """`LlavaProcessor` arguments that expand `<image>` to exactly K placeholders (see the module docstring)."""
    return {
        "patch_size": tower_config.image_size,
        "vision_feature_select_strategy": "full",
        "num_additional_image_tokens": tower_config.num_tokens - 1,
    }


AutoConfig.register(TokenizerTowerConfig.model_type, TokenizerTowerConfig, exist_ok=True)
AutoModel.register(TokenizerTowerConfig, TokenizerTower, exist_ok=True)
