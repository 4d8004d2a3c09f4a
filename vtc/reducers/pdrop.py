"""PyramidDrop: accelerating large vision-language models via pyramid visual redundancy reduction.

Xing et al., arXiv 2410.17247 (https://github.com/Cooperx521/PyramidDrop). The LLM is split into stages; at the end
of each stage the visual tokens are ranked by the attention of the last instruction token and a fixed ratio λ of
them survives, so the visual sequence shrinks like a pyramid (LLaVA-1.5: layers 8/16/24, λ = 0.5).

Pinned choices: `layers` default to the quarters of the LLM's depth (8/16/24 for 32 layers); `budget` is the number
of visual tokens after the last stage, so λ = (budget / N)^(1/S) for S stages unless `ratio` is given, in which case
stage s keeps round(N·λ^s) and the budget must equal the final count it implies. The layer-averaged count is
reported by the adapter. Scores come from the q/k of the layer before each stage, captured beside SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import InLLMReducer, ReducerConfig, register_reducer


@dataclass
class PDropConfig(ReducerConfig):
    layers: tuple[int, ...] | None = None  # stage boundaries (first layer of each reduced stage); None: quarters
    ratio: float | None = None  # λ kept per stage; None: derived from the budget


@register_reducer("pdrop", config=PDropConfig)
class PDrop(InLLMReducer):
    """Multi-stage pruning by last-instruction-token attention, λ of the visual tokens kept per stage."""

    def plan(self, n_visual: int, k: int, num_layers: int) -> list[tuple[int, int]]:
        layers = self.config.layers
        if layers is None:
            layers = tuple(sorted({max(1, min(num_layers - 1, round(num_layers * f))) for f in (0.25, 0.5, 0.75)}))
        layers = tuple(self._check_layer(int(x), num_layers) for x in layers)
        if list(layers) != sorted(set(layers)):
            raise self._fail(f"layers={layers} must be strictly increasing")
        s = len(layers)
        lam = self.config.ratio if self.config.ratio is not None else (k / n_visual) ** (1.0 / s)
        if not 0.0 < lam <= 1.0:
            raise self._fail(f"ratio={lam} must be in (0, 1]")
        counts = [max(1, round(n_visual * lam**i)) for i in range(1, s + 1)]
        counts[-1] = k if self.config.ratio is None else counts[-1]
        return list(zip(layers, counts, strict=True))

    def score(self, ctx) -> Tensor:
        return ctx.last_token_attention()
