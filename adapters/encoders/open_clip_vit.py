"""open_clip vision towers as vtc encoders: `open_clip.transformer.VisionTransformer` (blocks with
`nn.MultiheadAttention` or open_clip's own `Attention`), any open_clip model whose `.visual` is one, and
`TimmModel` towers wrapping a timm ViT (SigLIP, EVA; handled by `timm_vit` with open_clip's preprocessing).

Written against open_clip 3.x, tested with 3.3.0 (`forward_intermediates`, one CLS token, `preprocess_cfg` on the
visual tower).

Where q and k are read: neither `nn.MultiheadAttention` nor open_clip's `Attention` calls its input projection as
a module (both use `in_proj_weight` through a functional call), so a forward pre-hook on the attention module
reads its input and recomputes the q and k rows of the input projection from the module's own weights (plus
`ln_q`/`ln_k` when the block has q/k norms). The value rows and the attention itself are not recomputed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import Attention, CustomResidualAttentionBlock, ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from .core import EncoderBackend, QKCallback


def backend_for(encoder: nn.Module) -> EncoderBackend | None:
    """The backend for an open_clip model or visual tower, None for other modules."""
    visual = encoder.visual if isinstance(getattr(encoder, "visual", None), nn.Module) else encoder
    if isinstance(visual, VisionTransformer):
        return OpenClipViT(visual)
    if isinstance(visual, TimmModel):
        from . import timm_vit

        backend = timm_vit.backend_for(visual.trunk, transform=_open_clip_transform(visual))
        if backend is None:
            raise TypeError(
                f"open_clip TimmModel wraps timm {type(visual.trunk).__name__}, which vtc cannot read; supported "
                "trunks are timm VisionTransformer and Eva"
            )
        return backend
    return None


class OpenClipViT(EncoderBackend):
    """An open_clip `VisionTransformer` (see the module docstring)."""

    library = "open_clip"

    def __init__(self, visual: VisionTransformer) -> None:
        self.model = visual
        self.name = type(visual).__name__
        self.blocks = list(visual.transformer.resblocks)
        self.num_prefix = 1  # open_clip's ViT always prepends one class token
        self.has_cls = True
        self.patch_module = visual.conv1
        for i, blk in enumerate(self.blocks):
            attn = getattr(blk, "attn", None)
            if isinstance(blk, CustomResidualAttentionBlock) and isinstance(attn, Attention):
                if attn.logit_scale is not None:
                    raise TypeError(
                        f"open_clip {self.name}: block {i} uses scaled-cosine attention, which vtc does not read "
                        "(and which open_clip 3.x cannot run on batched heads)"
                    )
            elif not (isinstance(blk, ResidualAttentionBlock) and isinstance(attn, nn.MultiheadAttention)):
                raise TypeError(
                    f"open_clip {self.name}: block {i} is {type(blk).__name__} with {type(attn).__name__}; vtc reads "
                    "q/k from ResidualAttentionBlock (nn.MultiheadAttention) and CustomResidualAttentionBlock "
                    "(open_clip Attention) only"
                )

    def grid(self, height: int, width: int) -> tuple[int, int]:
        v = self.model
        if (height, width) != tuple(v.image_size):
            raise ValueError(
                f"open_clip {self.name} takes {v.image_size[0]}x{v.image_size[1]} images (its position embedding "
                f"has a fixed size), got {height}x{width}; resize with vtc.adapters.encoders.image_transform(model) "
                "or open_clip's preprocess"
            )
        if v.training and isinstance(v.patch_dropout, nn.Module) and getattr(v.patch_dropout, "prob", 0.0) > 0:
            raise ValueError(f"open_clip {self.name} is in training mode with patch dropout; call encoder.eval()")
        return tuple(v.grid_size)

    def hidden_states(self, images: Tensor, layers: list[int], norm: bool) -> list[Tensor]:
        out = self.model.forward_intermediates(
            images,
            indices=layers,
            stop_early=True,
            normalize_intermediates=norm,
            intermediates_only=True,
            output_fmt="NLC",
        )
        return out["image_intermediates"]

    def num_heads(self, layer: int) -> int:
        return self.blocks[layer].attn.num_heads

    def hook_qk(self, layer: int, fn: QKCallback) -> list[Any]:
        attn = self.blocks[layer].attn
        return [attn.register_forward_pre_hook(_pre_hook(attn, fn), with_kwargs=True)]

    def attn_mask_kwargs(self, layer: int, bias: Tensor) -> dict[str, Tensor]:
        attn = self.blocks[layer].attn
        b, n = bias.shape
        if isinstance(attn, nn.MultiheadAttention):  # takes [B*heads, L, L] float masks
            h = attn.num_heads
            return {"attn_mask": bias[:, None, None, :].expand(b, h, n, n).reshape(b * h, n, n)}
        return {"attn_mask": bias[:, None, None, :]}  # open_clip Attention passes 4-D masks to SDPA

    def reduction_support(self) -> str | None:
        if not self.model.transformer.batch_first:
            return f"open_clip {self.name} runs its transformer sequence-first; vtc reduces batch-first blocks only"
        return None

    def transform(self) -> Callable[[Any], Tensor]:
        return _open_clip_transform(self.model)


def _open_clip_transform(visual: nn.Module) -> Callable[[Any], Tensor]:
    cfg = dict(open_clip.get_model_preprocess_cfg(visual))
    if "size" not in cfg:  # a tower built directly, not by open_clip's factory
        cfg["size"] = getattr(visual, "image_size", None) or visual.trunk.patch_embed.img_size
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def _pre_hook(attn: nn.Module, fn: QKCallback):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        with torch.no_grad():
            x = args[0] if args else kwargs.get("query", kwargs.get("x"))
            if isinstance(attn, nn.MultiheadAttention):
                if not attn.batch_first:
                    x = x.transpose(0, 1)
                if attn._qkv_same_embed_dim:
                    w = attn.in_proj_weight[: 2 * attn.embed_dim]
                else:
                    w = torch.cat((attn.q_proj_weight, attn.k_proj_weight))
                bias = None if attn.in_proj_bias is None else attn.in_proj_bias[: 2 * attn.embed_dim]
                q_norm = k_norm = nn.Identity()
            else:  # open_clip Attention
                w = attn.in_proj_weight[: 2 * attn.num_heads * attn.head_dim]
                bias = None if attn.in_proj_bias is None else attn.in_proj_bias[: w.shape[0]]
                q_norm, k_norm = attn.ln_q, attn.ln_k
            b, n, _ = x.shape
            q, k = F.linear(x, w, bias).reshape(b, n, 2, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k = q_norm(q), k_norm(k)  # [B, H, L, dh]
            fn(q, k, k.transpose(1, 2).reshape(b, n, -1))

    return hook
