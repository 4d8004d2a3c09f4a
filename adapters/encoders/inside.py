"""Token reduction *inside* a timm / open_clip vision transformer, between blocks — reversible hooks on one instance.

`reduce_in_encoder(encoder, reducer, budget, layers)` makes every later forward of that encoder (its own
`forward`, `forward_intermediates`, or `vtc.adapters.encoders.encode`) carry fewer patch tokens after the listed
blocks; `handle.remove()` (or leaving the `with` block) takes every hook away again, after which the encoder's
outputs are bit-identical to the untouched model's. The methods that make sense there are the ones that need only
the encoder's own signals: ToMe-style merging by key similarity (`"tome"`) and FasterVLM-style pruning by CLS
attention (`"fastervlm"`), also `"random"` as a baseline; query-aware, multi-view and adaptive reducers are refused.

After block i, the patch tokens of the block's output go to the reducer together with the CLS logits and keys of
block i's own attention (read beside the fused attention, as in `encode`); prefix tokens are always kept.

Following ToMe (Bolya et al., "Token Merging: Your ViT but Faster", arXiv 2210.09461, https://github.com/
facebookresearch/ToMe), every token carries a size s (how many patches it stands for):

* merged tokens are the size-weighted means of their sources (recomputed from the reducer's `assignment`, so a
  token merged twice averages all of its patches with equal weight);
* with `prop_attn=True`, later blocks add log(s) to the attention logits of every key ("proportional attention"),
  passed as the blocks' own additive `attn_mask` so the fused attention is kept.

Pinned choices (where this differs from the papers):

* ToMe merges inside each block between attention and MLP with a constant r per block; here the reduction sits
  after the whole block (so timm/open_clip blocks stay untouched) and `budget` is the number of patch tokens left
  after the last listed block; the per-block counts fall linearly from N to the budget (ToMe's constant r), or are
  given one per block as a list.
* FasterVLM prunes after the encoder; between blocks it uses the CLS attention of the block that just ran.
* Pooling after the last block is the model's own (an unweighted mean for `global_pool="avg"`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vtc.budget import resolve_budget
from vtc.reducers import Reducer
from vtc.types import VisualTokens

from .core import AttentionRecord, EncoderBackend, _recorder, as_reducer, normalise_layers, resolve_attn_query
from .core import resolve_encoder as _resolve

_STATE_ATTR = "_vtc_in_encoder_reduction"


class EncoderReduction:
    """The hooks installed by `reduce_in_encoder` and what they saw in the last forward.

    Attributes:
        sizes: `[B, N']` float32, how many patches each remaining patch token stands for (last forward).
        source: `[B, N0]` int64, for every original patch the row of the remaining token it went to (-1: dropped).
        counts: patch tokens after each listed block (last forward).
    """

    def __init__(
        self,
        backend: EncoderBackend,
        reducer: Reducer,
        budget: int | float | Sequence[int | float],
        layers: list[int],
        prop_attn: bool,
        attn_query: str,
    ) -> None:
        self.backend, self.reducer, self.budget, self.layers = backend, reducer, budget, layers
        self.prop_attn = prop_attn and reducer.merges
        self.sizes: Tensor | None = None
        self.source: Tensor | None = None
        self.counts: list[int] = []
        self._grid: tuple[int, int] | None = None
        self._n0 = 0
        self._ks: dict[int, int] = {}
        self._handles: list[Any] = []
        self._records: dict[int, AttentionRecord] = {}
        mode = resolve_attn_query(attn_query, backend)
        p = backend.num_prefix
        self._handles.append(backend.patch_module.register_forward_pre_hook(self._on_images))
        self._handles.append(backend.blocks[0].register_forward_pre_hook(self._on_start))
        for i in layers:
            rec = AttentionRecord(num_prefix=p, mode=mode)
            self._records[i] = rec
            self._handles += backend.hook_qk(i, _recorder(rec, p))
            self._handles.append(backend.blocks[i].register_forward_hook(self._reduce_hook(i)))
        if self.prop_attn:
            for i in range(layers[0] + 1, len(backend.blocks)):
                hook = self._mask_hook(i)
                self._handles.append(backend.blocks[i].register_forward_pre_hook(hook, with_kwargs=True))
        setattr(backend.model, _STATE_ATTR, self)

    # ------------------------------------------------------------------ lifecycle
    def remove(self) -> None:
        """Take every hook away; the encoder is the untouched model again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if getattr(self.backend.model, _STATE_ATTR, None) is self:
            delattr(self.backend.model, _STATE_ATTR)

    def __enter__(self) -> EncoderReduction:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # ------------------------------------------------------------------ schedule
    def _targets(self, n0: int) -> list[int]:
        """Patch tokens left after each listed block for N0 patches."""
        m, who = len(self.layers), f"reduce_in_encoder({self.reducer.name})"
        if isinstance(self.budget, (list, tuple)):
            if len(self.budget) != m:
                raise ValueError(f"{who}: {len(self.budget)} budgets for {m} layers {self.layers}; give one per layer")
            ks = [resolve_budget(b, n0, who=who) for b in self.budget]
            if any(a < b for a, b in zip(ks, ks[1:], strict=False)):
                raise ValueError(f"{who}: per-layer budgets must not increase, got token counts {ks}")
            return ks
        k = resolve_budget(self.budget, n0, who=who)
        return [n0 - math.floor((n0 - k) * (j + 1) / m + 0.5) for j in range(m)]

    # ------------------------------------------------------------------ hooks
    def _on_images(self, module: nn.Module, args: tuple) -> None:
        self._grid = self.backend.grid(args[0].shape[-2], args[0].shape[-1])

    def _on_start(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        b, n0 = x.shape[0], x.shape[1] - self.backend.num_prefix
        self._n0, self.counts = n0, []
        self._ks = dict(zip(self.layers, self._targets(n0), strict=True))
        self.sizes = torch.ones(b, n0, dtype=torch.float32, device=x.device)
        self.source = torch.arange(n0, device=x.device).expand(b, n0).contiguous()

    def _mask_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            s = self.sizes
            if s is None or bool((s == 1).all()):
                return None
            if kwargs.get("attn_mask") is not None or len(args) > 1:
                raise RuntimeError(
                    "reduce_in_encoder: proportional attention needs the block's attn_mask argument, which the "
                    "caller already uses (or passes positionally, e.g. under gradient checkpointing); use "
                    "prop_attn=False"
                )
            x = args[0]
            prefix = torch.zeros(s.shape[0], self.backend.num_prefix, dtype=torch.float32, device=s.device)
            bias = torch.cat([prefix, s.log()], dim=1).to(x.dtype)  # [B, L]
            return args, {**kwargs, **self.backend.attn_mask_kwargs(i, bias)}

        return hook

    def _reduce_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
            return self._reduce(i, out)

        return hook

    def _reduce(self, i: int, x: Tensor) -> Tensor | None:
        p = self.backend.num_prefix
        prefix, patches = x[:, :p], x[:, p:]  # [B, P, D], [B, N, D]
        b, n, d = patches.shape
        k = self._ks[i]
        if k >= n:
            self.counts.append(n)
            return None
        rec = self._records[i]
        grid = self._grid if self._grid is not None and n == self._grid[0] * self._grid[1] else None
        vt = VisualTokens(patches, features=patches, cls_attn=rec.patch_logits, keys=rec.patch_keys, grid=grid)
        sel = self.reducer(vt, k)
        if not bool(sel.mask.all()):
            raise RuntimeError(f"reduce_in_encoder: {self.reducer.name} returned padded rows; it must keep k tokens")
        kk = sel.tokens.shape[1]
        if sel.assignment is not None:  # row of every input token, -1 dropped
            assign = sel.assignment
        elif sel.indices is None:
            raise RuntimeError(f"reduce_in_encoder: {self.reducer.name} returned neither indices nor an assignment")
        else:
            assign = torch.full((b, n), -1, dtype=torch.long, device=x.device)
            assign.scatter_(1, sel.indices, torch.arange(kk, device=x.device).expand(b, kk))
        keep = assign >= 0
        rows = assign.clamp(min=0)
        w = self.sizes * keep  # [B, N]
        new_sizes = torch.zeros(b, kk, dtype=torch.float32, device=x.device).scatter_add_(1, rows, w)
        if self.reducer.merges and self.reducer.conserves_mass:  # size-weighted means of the sources
            num = torch.zeros(b, kk, d, dtype=torch.float32, device=x.device)
            num.scatter_add_(1, rows[..., None].expand(b, n, d), patches.float() * w[..., None])
            new = (num / new_sizes.clamp_min(1e-12)[..., None]).to(x.dtype)
        else:
            new = sel.tokens.to(x.dtype)
        src = self.source
        self.source = torch.where(src >= 0, assign.gather(1, src.clamp(min=0)), src)
        self.sizes = new_sizes
        self.counts.append(kk)
        return torch.cat([prefix, new], dim=1)


def reduce_in_encoder(
    encoder: nn.Module,
    reducer: str | Reducer,
    budget: int | float | Sequence[int | float],
    layers: Sequence[int] | int,
    *,
    prop_attn: bool = True,
    attn_query: str = "auto",
) -> EncoderReduction:
    """Reduce patch tokens between the blocks of a timm / open_clip vision transformer (reversible).

    Args:
        encoder: a timm VisionTransformer, an open_clip VisionTransformer or open_clip model (see `encode`).
        reducer: "tome", "fastervlm", "random", ... (a name or a `vtc.Reducer`); not query-aware, not adaptive.
        budget: patch tokens left after the last of `layers` (int, or a fraction of the N patches), reached by a
            linear schedule over `layers`; or a list with one budget per layer.
        layers: blocks after which tokens are reduced (0-based, negative from the end).
        prop_attn: (merging reducers) later blocks attend in proportion to token sizes, as in ToMe.
        attn_query: the query row whose attention reducers see (see `encode`).
    Returns:
        An `EncoderReduction`; use it as a context manager or call `.remove()`.

    Example:
        >>> with reduce_in_encoder(vit, "tome", budget=0.5, layers=range(2, 10)) as red:
        ...     vt = encode(vit, images)   # fewer tokens, vt.grid is None
        >>> red.source                      # where every patch went
    """
    backend = _resolve(encoder)
    r = as_reducer(reducer)
    why = backend.reduction_support()
    if why is not None:
        raise ValueError(f"reduce_in_encoder: {why}")
    if r.needs_query:
        raise ValueError(f"reduce_in_encoder: {r.name} is query-aware; the encoder has no question to score against")
    if r.adaptive:
        raise ValueError(f"reduce_in_encoder: {r.name} keeps a different count per image, which a batch cannot carry")
    missing = [f for f in r.requires if f not in ("cls_attn", "keys", "features", "grid")]
    if missing:
        raise ValueError(f"reduce_in_encoder: {r.name} requires {missing}, which single images between blocks lack")
    if getattr(backend.model, _STATE_ATTR, None) is not None:
        raise RuntimeError("reduce_in_encoder: this encoder already reduces tokens; remove() that first")
    return EncoderReduction(backend, r, budget, normalise_layers(layers, len(backend.blocks)), prop_attn, attn_query)
