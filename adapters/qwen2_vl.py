"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

Both families share one layout: a ViT over 14 px patches (two frames deep) at the image's own resolution, a 2×2
`PatchMerger` (the projector) whose outputs are the LLM's visual tokens, and 3-D M-RoPE positions (t, h, w) in the
LLM. Qwen2.5-VL adds window attention in most vision blocks (`fullatt_block_indexes` lists the full ones) and runs
the tower in window order, un-permuting only the merger outputs. One adapter serves both.

What reducers receive, one `VisualTokens` group per image (images differ in size, so they are not stacked):

* `tokens` `[1, N_i, D]`: merger outputs, row-major over the merged `(h/2, w/2)` grid (`grid`). Videos
  (`pixel_values_videos`) are reduced too, one group per video after the images' groups: frame-major tokens with
  `frames = t` (temporal patches of two frames each), the budget counting the whole video.
* `features` `[1, N_i, 4*C]`: the merger's input (last vision block output before the merger's norm), the four
  patches of each 2×2 group concatenated in the merger's own order (pinned: concatenation, not the mean, so the
  merger sees exactly these features).
* `cls_attn` `[1, H, N_i]`: the tower has no CLS token. Substitute (pinned): *mean-query attention* of one vision
  block, i.e. the attention a token receives averaged over all queries, `a_j = mean_i softmax_j(q_i·k_j/√d)` per
  head, computed beside SDPA from that block's q/k (after the vision RoPE) block-diagonally over the segments the
  block really attends within (its `cu_seqlens`: one image or video frame for full-attention blocks, one window
  for Qwen2.5-VL's windowed blocks), summed over each 2×2 merge group and returned as `log a`, so that a
  reducer's softmax over the N_i tokens recovers `a` (divided by the number of segments). Queries are processed
  in chunks, so memory stays bounded for large images.
* `keys` `[1, N_i, C]`: that block's keys before RoPE (heads concatenated), averaged over the 2×2 group.

Both are computed only for reducers that name them in `requires` or `uses` (the others skip the P x P pass).
The block defaults to the last vision block for Qwen2-VL and to the last full-attention block for Qwen2.5-VL;
`vision_layer=j` picks the block producing vision hidden state j (0 = patch embeddings, negative from the end).

Positions: the unreduced (t, h, w) ids come from `generate()`'s `position_ids` (its `[4, B, L]` form: text row +
M-RoPE rows; the text row is dropped, see below) or, when a forward gets none, from the model's own
`get_rope_index` on the full sequence. Kept tokens keep their columns of those ids (`positions="original"`), or
all three rows are renumbered 0..L'-1 like text (`positions="renumber"`, pinned: visual tokens then lose their
2-D ids). Decoding continues from the unreduced positions: the base wrapper passes generate()'s own decode
positions through (original) or shifts them (renumber). The adapter also sets the model's `rope_deltas` so that
the model's own fallback (positions from the attention mask plus `rope_deltas`, used when a decode call carries
no `position_ids`) gives the same positions on the shorter cache: `rope_deltas = next position - kept length`.
The text row of `[4, B, L]` position ids only serves packed-sequence mask detection and FlashAttention's varlen
path; with gaps in the kept positions it would be misread as packing, so the adapter passes the three M-RoPE rows.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from torch import Tensor, nn

from vtc.types import VisualTokens

from .base import ImageSlot, VLMAdapter, _DecodeState, register_adapter
from .llava import clip_layer_for_hidden_state

_MAX_SCORE_ELEMENTS = 1 << 24  # attention scores materialised at once per segment chunk (64 MiB in float32)


def mean_query_attention(q: Tensor, k: Tensor, cu_seqlens: Tensor, scale: float) -> Tensor:
    """`[H, P]` attention each token receives, averaged over the queries of its segment.

    Args:
        q, k: `[P, H, d]` queries and keys (after RoPE) of P tokens in the tower's order.
        cu_seqlens: `[S + 1]` segment boundaries; attention runs within each segment only.
        scale: the softmax scale of the block.
    """
    p, h, _ = k.shape
    out = torch.empty(h, p, dtype=torch.float32, device=k.device)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        n = e - s
        kh = k[s:e].float().transpose(0, 1)  # [H, n, d]
        acc = torch.zeros(h, n, dtype=torch.float32, device=k.device)
        rows = max(1, _MAX_SCORE_ELEMENTS // (h * n))
        for c in range(s, e, rows):
            qh = q[c : min(c + rows, e)].float().transpose(0, 1)  # [H, r, d]
            acc += ((qh @ kh.transpose(-1, -2)) * scale).softmax(-1).sum(1)
        out[:, s:e] = acc / n
    return out


class _Hooks:
    """Forward hooks recording a module's input/output (and keyword inputs) for one call."""

    def __init__(self) -> None:
        self.handles, self.values = [], {}

    def output(self, module: nn.Module, key: str) -> None:
        self.handles.append(module.register_forward_hook(lambda m, i, o: self.values.__setitem__(key, o)))

    def input(self, module: nn.Module, key: str) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda m, i: self.values.__setitem__(key, i[0])))

    def kwargs(self, module: nn.Module, key: str) -> None:
        def hook(m, args, kwargs):
            self.values[key] = kwargs

        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def __enter__(self) -> _Hooks:
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


@register_adapter("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
class Qwen2VLAdapter(VLMAdapter):
    """Qwen2-VL / Qwen2.5-VL adapter (see the module docstring)."""

    pixel_keys = ("pixel_values", "pixel_values_videos")
    extra_image_keys = (
        "image_grid_thw",
        "mm_token_type_ids",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
    )

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> None:
        self._orig_rope_deltas = self.model.model.rope_deltas
        super().attach()

    def detach(self) -> None:
        super().detach()
        self.model.model.rope_deltas = self._orig_rope_deltas

    # ------------------------------------------------------------------ vision
    def vision_block(self) -> int:
        """Index of the vision block whose q/k give `cls_attn` and `keys`."""
        visual = self.model.model.visual
        if self.config.vision_layer is not None:
            return clip_layer_for_hidden_state(len(visual.blocks), self.config.vision_layer)
        full = getattr(visual, "fullatt_block_indexes", None)
        return int(full[-1]) if full else len(visual.blocks) - 1

    def _window_order(self, grid_thw: Tensor) -> Tensor | None:
        """`[G]` merge group of each position in the tower's (window) order, None when it is the sequence order."""
        visual = self.model.model.visual
        if getattr(visual, "fullatt_block_indexes", None) is None:
            return None
        from transformers.vision_utils import get_vision_window_index

        index, _ = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)
        return index.to(grid_thw.device)

    def encode(self, pixel_values: Tensor | None, extra: dict[str, Any]) -> list[VisualTokens]:
        """One group per image (in `image_grid_thw` order), then one per video (in `video_grid_thw` order)."""
        groups, self._num_images = [], 0
        for pixels, key, video in (
            (pixel_values, "image_grid_thw", False),
            (extra.get("pixel_values_videos"), "video_grid_thw", True),
        ):
            if pixels is None:
                continue
            if extra.get(key) is None:
                raise ValueError(f"vtc: Qwen2-VL needs {key} together with its pixel values")
            groups += self._encode(pixels, extra[key], video)
            self._num_images += 0 if video else len(groups)
        return groups

    def _encode(self, pixels: Tensor, grid_thw: Tensor, video: bool) -> list[VisualTokens]:
        inner = self.model.model
        visual = inner.visual
        attn = visual.blocks[self.vision_block()].attn
        attention = bool(self.wants & {"cls_attn", "keys"})  # the substitute costs a P x P pass: only if used
        with _Hooks() as cap:
            cap.input(visual.merger, "features")
            if attention:
                cap.output(attn.qkv, "qkv")
                cap.kwargs(attn, "attn_kwargs")
            if video:
                out = inner.get_video_features(pixel_values_videos=pixels, video_grid_thw=grid_thw)
            else:
                out = inner.get_image_features(pixel_values=pixels, image_grid_thw=grid_thw)
        side = int(visual.spatial_merge_size)
        unit = side * side
        feats = cap.values["features"]  # [P, C] in the tower's order
        p, c = feats.shape
        feats = feats.reshape(p // unit, unit * c)  # [G, 4C], the merger's concatenation
        logits = keys = None
        if attention:
            heads = attn.num_heads
            q, k, _ = cap.values["qkv"].reshape(p, 3, heads, -1).unbind(1)  # [P, H, d] each, before RoPE
            akw = cap.values["attn_kwargs"]
            cos, sin = akw["position_embeddings"]
            rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
            q_rot, k_rot = rope(q, k, cos, sin)
            probs = mean_query_attention(q_rot, k_rot, akw["cu_seqlens"], attn.scaling)  # [H, P]
            probs = probs.view(heads, p // unit, unit).sum(-1)  # [H, G] attention of each merge group
            keys = k.reshape(p // unit, unit, heads * k.shape[-1]).mean(1)  # [G, C]
            logits = probs.clamp_min(torch.finfo(torch.float32).tiny).log()
        order = self._window_order(grid_thw)
        if order is not None:  # back from window order to the sequence order of the merger outputs
            back = order.argsort()
            feats = feats[back]
            if attention:
                logits, keys = logits[:, back], keys[back]
        groups, start = [], 0
        for i, (t, h, w) in enumerate(grid_thw.tolist()):
            tokens = out.pooler_output[i]  # [N_i, D], frame-major for a video
            sl = slice(start, start + tokens.shape[0])
            groups.append(
                VisualTokens(
                    tokens=tokens[None],
                    features=feats[sl][None],
                    cls_attn=None if logits is None else logits[:, sl][None],
                    keys=None if keys is None else keys[sl][None],
                    grid=(h // side, w // side),
                    frames=t if video else None,
                )
            )
            start += tokens.shape[0]
        return groups

    def placeholder_mask(self, input_ids: Tensor) -> Tensor:
        return (input_ids == self.image_token_id) | (input_ids == self.video_token_id)

    @property
    def video_token_id(self) -> int:
        return int(self.model.config.video_token_id)

    def image_slots(self, input_ids: Tensor, counts: list[int]) -> list[ImageSlot]:
        """Image runs in order, then video runs in order (the order of `encode`'s groups)."""
        m = self._num_images
        # the base class finds runs of `image_token_id`; videos are found by relabelling their placeholders
        vid_ids = torch.where(input_ids == self.video_token_id, self.image_token_id, -1)
        return super().image_slots(input_ids, counts[:m]) + super().image_slots(vid_ids, counts[m:])

    # ------------------------------------------------------------------ positions
    def full_positions(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None, extra):
        """`[3, B, L]` M-RoPE ids of the unreduced sequence (generate()'s, or the model's `get_rope_index`)."""
        if position_ids is not None:
            if position_ids.dim() == 2:
                return position_ids[None].expand(3, -1, -1)
            return position_ids[-3:]  # drop the text row of generate()'s [4, B, L] form
        inner = self.model.model
        mm = extra.get("mm_token_type_ids")
        if mm is None:
            mm = (input_ids == self.image_token_id).int()
            mm[input_ids == self.video_token_id] = 2
        args = {
            "mm_token_type_ids": mm,
            "image_grid_thw": extra.get("image_grid_thw"),
            "video_grid_thw": extra.get("video_grid_thw"),
            "second_per_grid_ts": extra.get("second_per_grid_ts"),
            "attention_mask": attention_mask,
        }
        params = inspect.signature(inner.get_rope_index).parameters
        positions, _ = inner.get_rope_index(input_ids, **{k: v for k, v in args.items() if k in params})
        return positions

    def set_rope_state(self, positions: Tensor, keep_src: Tensor, new_mask: Tensor) -> None:
        """`rope_deltas` [B, 1] such that `mask.cumsum - 1 + rope_deltas` continues the used positions."""
        kept = new_mask.long().sum(-1, keepdim=True)  # [B, 1]
        if self.config.positions == "renumber":
            last = kept - 1
        else:
            last = positions[0].gather(1, keep_src[:, -1:])  # [B, 1] temporal id of the last kept column
        self.model.model.rope_deltas = last + 1 - kept

    def _continue(self, kw: dict[str, Any], st: _DecodeState) -> Any:
        pos = kw.get("position_ids")
        if pos is not None and pos.dim() == 3 and pos.shape[0] == 4:
            kw["position_ids"] = pos[1:]  # the M-RoPE rows; see the module docstring on the text row
        return super()._continue(kw, st)
