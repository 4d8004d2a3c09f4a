"""timm vision transformers as vtc encoders: `VisionTransformer` (ViT, DeiT incl. distilled, SigLIP, register
ViTs; `Block`/`ResPostBlock` with `timm.layers.Attention`) and `Eva` (EVA-02 and relatives with `EvaAttention`).

Written against timm 1.0.x, tested with 1.0.31 (`forward_intermediates`, `Attention.qkv`/`q_norm`/`k_norm`,
`EvaAttention` with fused or separate projections, `q_bias`/`v_bias` and rotary embeddings applied after the prefix
tokens).

Where q and k are read:

* `Attention`: a forward hook on `attn.qkv` (the fused projection the block calls); q and k are its output
  reshaped as the block reshapes it, then `q_norm`/`k_norm` are applied — nothing is recomputed.
* `EvaAttention`: its fused projection is called through `F.linear` with a concatenated bias, which module hooks do
  not see, so a forward pre-hook on the attention reads its input (and the `rope` it is given) and recomputes the q
  and k projections from the module's own weights, then the norms and the rotary embedding of the patch positions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from .core import EncoderBackend, QKCallback


def backend_for(model: nn.Module, transform: Callable[[Any], Tensor] | None = None) -> TimmViT | None:
    """A `TimmViT` for a supported timm model, None for other models."""
    if isinstance(model, (VisionTransformer, Eva)):
        return TimmViT(model, transform)
    return None


class TimmViT(EncoderBackend):
    """A timm `VisionTransformer` or `Eva` (see the module docstring)."""

    library = "timm"

    def __init__(self, model: VisionTransformer | Eva, transform: Callable[[Any], Tensor] | None = None) -> None:
        self.model = model
        self.name = type(model).__name__
        self.blocks = list(model.blocks)
        self.num_prefix = int(model.num_prefix_tokens)
        self.has_cls = getattr(model, "cls_token", None) is not None
        self.patch_module = model.patch_embed
        self._transform = transform
        for i, blk in enumerate(self.blocks):
            attn = getattr(blk, "attn", None)
            ok = (isinstance(attn, Attention) and isinstance(attn.qkv, nn.Linear)) or isinstance(attn, EvaAttention)
            if not ok:
                raise TypeError(
                    f"timm {self.name}: block {i} ({type(blk).__name__}) has attention "
                    f"{type(attn).__name__ if attn is not None else 'None'}; vtc reads q/k from timm.layers.Attention "
                    "(fused qkv) and EvaAttention only (parallel / differential / rope-attention blocks are not "
                    "supported)"
                )

    # ------------------------------------------------------------------ shapes and forward
    def grid(self, height: int, width: int) -> tuple[int, int]:
        pe = self.model.patch_embed
        ph, pw = pe.patch_size
        dynamic = bool(getattr(self.model, "dynamic_img_size", False))
        if pe.img_size is not None and not dynamic and (height, width) != tuple(pe.img_size):
            raise ValueError(
                f"timm {self.name} takes {pe.img_size[0]}x{pe.img_size[1]} images, got {height}x{width}; resize "
                "with vtc.adapters.encoders.image_transform(encoder), or create the model with "
                "dynamic_img_size=True to accept other sizes"
            )
        if not getattr(pe, "dynamic_img_pad", False) and (height % ph or width % pw):
            raise ValueError(
                f"timm {self.name}: image size {height}x{width} is not a multiple of the patch size {ph}x{pw}; "
                f"resize or crop to a multiple (e.g. {height // ph * ph}x{width // pw * pw}), or create the model "
                "with dynamic_img_pad=True"
            )
        return tuple(pe.dynamic_feat_size((height, width)))

    def hidden_states(self, images: Tensor, layers: list[int], norm: bool) -> list[Tensor]:
        return self.model.forward_intermediates(
            images, indices=layers, norm=norm, stop_early=True, output_fmt="NLC", intermediates_only=True
        )

    def num_heads(self, layer: int) -> int:
        return self.blocks[layer].attn.num_heads

    # ------------------------------------------------------------------ q/k capture
    def hook_qk(self, layer: int, fn: QKCallback) -> list[Any]:
        attn = self.blocks[layer].attn
        if isinstance(attn, EvaAttention):
            return [attn.register_forward_pre_hook(_eva_pre_hook(attn, fn), with_kwargs=True)]
        return [attn.qkv.register_forward_hook(_vit_qkv_hook(attn, fn))]

    def attn_mask_kwargs(self, layer: int, bias: Tensor) -> dict[str, Tensor]:
        return {"attn_mask": bias[:, None, None, :]}  # [B, 1, 1, L], broadcast by SDPA and the eager path

    def reduction_support(self) -> str | None:
        if isinstance(self.model, Eva) and self.model.rope is not None:
            return (
                f"timm {self.name} applies rotary position embeddings of the full patch grid in every block, "
                "which no longer line up once tokens are removed"
            )
        return None

    def transform(self) -> Callable[[Any], Tensor]:
        if self._transform is not None:
            return self._transform
        from timm.data import create_transform, resolve_model_data_config

        cfg = resolve_model_data_config(self.model)
        img_size = self.model.patch_embed.img_size
        if img_size is not None:  # the pretrained cfg may name another size than the model was built with
            cfg["input_size"] = (cfg["input_size"][0], *img_size)
        return create_transform(**cfg, is_training=False)


def _vit_qkv_hook(attn: Attention, fn: QKCallback):
    def hook(module: nn.Module, args: Any, out: Tensor) -> None:
        with torch.no_grad():
            b, n, _ = out.shape
            qkv = out.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # [B, H, L, dh]
            fn(q, k, k.transpose(1, 2).reshape(b, n, -1))

    return hook


def _eva_pre_hook(attn: EvaAttention, fn: QKCallback):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        with torch.no_grad():
            x = args[0] if args else kwargs["x"]
            rope = args[1] if len(args) > 1 else kwargs.get("rope")
            b, n, _ = x.shape
            h = attn.num_heads
            if attn.qkv is not None:
                w = attn.qkv.weight
                d = w.shape[0] // 3
                if attn.q_bias is not None:
                    bias = torch.cat((attn.q_bias, attn.k_bias))
                else:
                    bias = None if attn.qkv.bias is None else attn.qkv.bias[: 2 * d]
                q, k = F.linear(x, w[: 2 * d], bias).reshape(b, n, 2, h, -1).permute(2, 0, 3, 1, 4)
            else:
                q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).reshape(b, n, h, -1).transpose(1, 2)
                k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).reshape(b, n, h, -1).transpose(1, 2)
            q, k = attn.q_norm(q), attn.k_norm(k)
            keys = k.transpose(1, 2).reshape(b, n, -1)  # before the rotary embedding
            if rope is not None:
                p, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
                q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=half)], dim=2)
                k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=half)], dim=2)
            fn(q, k, keys)

    return hook
