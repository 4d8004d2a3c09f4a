"""What reducers take (`VisualTokens`, `Query`) and what they return (`Selection`).

Layout conventions, shared by every reducer and adapter:

* One row of the batch is one *sample*: one image (all of its views) or one video (all of its frames).
* `tokens` are what the LLM would see (projector outputs), `[B, N, D]`.
* With `views=(rows, cols)` the N tokens are the thumbnail's `h*w` tokens followed by `rows*cols` crops of
  `h*w` tokens each, crops in row-major order (LLaVA-NeXT AnyRes before unpadding); `grid=(h, w)` is one view.
* With `frames=T` the N tokens are T frames of `h*w` tokens each.
* Otherwise `grid=(h, w)` with `h*w == N`, row-major; `None` means "not a grid" (methods that need one
  then assume a square grid and say so if N is not a square).
* `valid` (optional, `[B, N]` bool) marks the tokens that exist in the model's sequence; False marks a slot of the
  layout the model never sees (LLaVA-NeXT's unpadding removes whole rows/columns of the crop canvas). Reducers
  never keep or merge an invalid token, and a budget is resolved against each sample's valid count
  (`vtc.budget.resolve_budgets`): an int k keeps min(k, valid) tokens, a fraction r of the valid tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class VisualTokens:
    """The visual tokens of a batch plus the side information some methods need.

    Attributes:
        tokens: `[B, N, D]` projector outputs (the LLM's view of the image).
        features: `[B, N, Dv]` vision-encoder features before the projector (prefix tokens excluded).
        cls_attn: `[B, H, N]` pre-softmax attention logits of the CLS query to the N patches, per head, in a
            chosen vision layer. Methods softmax over N themselves (and the CLS column is excluded).
        keys: `[B, N, Dk]` attention keys of the patches in that same layer (heads concatenated).
        grid: `(h, w)` of one view / frame.
        views: `(rows, cols)` crop layout of a high-resolution input, thumbnail first.
        frames: number of video frames.
        valid: `[B, N]` bool, True for the tokens that exist in the model's sequence (None: all of them).
        lengths: `[B]` int64, for an ordered 1-D token sequence from an adaptive tokenizer (KARL), how many leading
            tokens each sample needs (None: not adaptive). Only order-aware methods (`prefix`) use it.
    """

    tokens: Tensor
    features: Tensor | None = None
    cls_attn: Tensor | None = None
    keys: Tensor | None = None
    grid: tuple[int, int] | None = None
    views: tuple[int, int] | None = None
    frames: int | None = None
    valid: Tensor | None = None
    lengths: Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.tokens.shape

    def index_batch(self, sl: slice) -> VisualTokens:
        """The same inputs for samples `sl` of the batch."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[sl] if isinstance(v, Tensor) else v
        return VisualTokens(**out)

    def to(self, *args: Any, **kwargs: Any) -> VisualTokens:
        """Floating-point fields to the given device/dtype; `valid` (bool) only follows the device."""
        tokens = self.tokens.to(*args, **kwargs)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out[f.name] = v.to(*args, **kwargs) if v.is_floating_point() else v.to(tokens.device)
        return replace(self, **out)

    def num_views(self) -> int:
        """Number of equally sized grids in the sequence (views or frames), 1 for a plain image."""
        if self.views is not None:
            return 1 + self.views[0] * self.views[1]
        return self.frames or 1


@dataclass
class Query:
    """The question text in the LLM's embedding space.

    Attributes:
        embeds: `[B, T, D]` text token embeddings (same D as the visual tokens).
        mask: `[B, T]` bool, True for real tokens (None: all real).
    """

    embeds: Tensor
    mask: Tensor | None = None

    def index_batch(self, sl: slice) -> Query:
        return Query(self.embeds[sl], None if self.mask is None else self.mask[sl])

    def valid_mask(self) -> Tensor:
        """`[B, T]` bool."""
        if self.mask is None:
            return torch.ones(self.embeds.shape[:2], dtype=torch.bool, device=self.embeds.device)
        return self.mask.bool()


@dataclass
class Selection:
    """The output of a reducer.

    Attributes:
        tokens: `[B, K, D]` tokens that go on to the LLM.
        indices: `[B, K]` int64 positions of the kept tokens in the input, ascending per row; `None` when the
            outputs are merged tokens. Padded rows (mask False) hold 0.
        mask: `[B, K]` bool; False marks padding when samples keep different counts (padding sits at the end).
        weights: `[B, K]` how much input mass each output token carries (mergers: number of input tokens
            averaged into it); `None` for pure pruning, where every weight is 1.
        assignment: `[B, N]` int64, for every input token the output row it went to, -1 if dropped.
        info: method-specific extras (scores, predicted ratios, other scales, effective counts, ...).
    """

    tokens: Tensor
    indices: Tensor | None
    mask: Tensor
    weights: Tensor | None = None
    assignment: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_kept(self) -> Tensor:
        """`[B]` int64 number of real output tokens per sample."""
        return self.mask.sum(-1)

    def source_mask(self, num_inputs: int) -> Tensor:
        """`[B, N]` bool: which input tokens survive or contribute to an output (for visualisation)."""
        if self.assignment is not None:
            return self.assignment >= 0
        b = self.tokens.shape[0]
        out = torch.zeros(b, num_inputs + 1, dtype=torch.bool, device=self.tokens.device)
        if self.indices is not None:  # padded slots write into the spare last column
            out.scatter_(1, self.indices.masked_fill(~self.mask, num_inputs), True)
        return out[:, :num_inputs]

    def valid_tokens(self, b: int) -> Tensor:
        """`[K_b, D]` the real output tokens of sample b."""
        return self.tokens[b][self.mask[b]]
