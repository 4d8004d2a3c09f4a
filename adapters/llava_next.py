"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, AnyRes): a thumbnail plus rows×cols crops, each a CLIP view.

Liu et al., "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge" (2024); AnyRes as in transformers'
`modeling_llava_next.py`. The stock model encodes the thumbnail and every crop separately (h×w tokens each, 24×24
for 336 px / patch 14), then *packs* them: the thumbnail's tokens, then the crops stitched into one
(rows·h)×(cols·w) grid, cut back to the image's aspect ratio (*unpadding*: whole rows or whole columns of the grid
are removed), each remaining row followed by one `image_newline` embedding.

What reducers receive per image (`VisualTokens`, see `vtc/types.py`): `views=(rows, cols)`, `grid=(h, w)`,
`tokens` = projector outputs of the thumbnail followed by the crops in row-major order, each view row-major,
*before* unpadding and without newlines; `valid` = False for the tokens unpadding removes; `features` (projector
input), `cls_attn` `[H, V·h·w]` and `keys` of one CLIP layer, per view, captured as for LLaVA-1.5
(`vision_layer`, default: the feature layer). Images are batched into one reducer call per run of consecutive
images with the same crop layout (their unpadding may differ).

Pinned rules for placing a reduced image back into its placeholder run:

* Unpadding: reducers see the whole crop canvas (methods that need the grid keep it) but the tokens unpadding
  removes are marked invalid, so no reducer keeps or merges one (`vtc.Reducer` checks `valid`; methods honour it).
* Budget: resolved against the image's real tokens M (thumbnail + unpadded crop tokens; newline tokens never
  count): an int k keeps min(k, M) tokens, a float r keeps round(r·M) (`vtc.budget.resolve_budgets`); an int
  budget is still checked against the whole layout N. `adapter.last["kept"]` counts the visual tokens placed.
* Positions: a kept token sits in the column it has in the stock packed layout, so (with the default
  `positions="original"`) it keeps its original position id; columns of dropped tokens are removed. A merged token
  sits at its first source token. (Should a custom reducer still return an invalid token, it is dropped, and a
  merged token sits at its first source in the packed layout, or is dropped if it has none.)
* Newlines: the newline of a packed row is kept iff at least one visual token of that row is kept (as
  GlobalCom² keeps the newline of every row); the thumbnail has no newline. At full budget the run is exactly
  the stock one, so `generate()` is unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from vtc.types import Selection, VisualTokens

from .base import ImageSlot, VLMAdapter, _placed_tokens, register_adapter
from .llava import _Capture, clip_layer_for_hidden_state, cls_logits_and_keys, encoder_layers


@dataclass
class AnyResLayout:
    """Where the reducer's tokens of one image go in its placeholder run.

    Attributes:
        views: `(rows, cols)` crop layout.
        length: number of placeholders of the run (thumbnail, then each unpadded row and its newline).
        column: `[N]` run column of every token of the reducer's layout, -1 if unpadding removed it.
        newline: `[N]` run column of the newline closing the token's packed row, -1 for thumbnail/removed tokens.
    """

    views: tuple[int, int]
    length: int
    column: Tensor
    newline: Tensor


def anyres_layout(views: tuple[int, int], grid: tuple[int, int], image_size: list[int]) -> AnyResLayout:
    """The packed layout of one image of size `image_size = (height, width)` (the rule of `pack_image_features`)."""
    rows, cols = views
    h, w = grid
    hw, big_h, big_w = h * w, rows * h, cols * w
    cells = torch.arange(big_h * big_w).reshape(1, big_h, big_w)  # id Y·W + X of every cell of the crop canvas
    kept = unpad_image(cells, image_size)[0]  # [H', W'] cells the model keeps, in packed (row-major) order
    hp, wp = kept.shape
    row_start = hw + torch.arange(hp) * (wp + 1)  # [H'] run column of each packed row's first token
    col_of_cell = torch.full((big_h * big_w,), -1, dtype=torch.long)
    nl_of_cell = torch.full((big_h * big_w,), -1, dtype=torch.long)
    col_of_cell[kept.reshape(-1)] = (row_start[:, None] + torch.arange(wp)).reshape(-1)
    nl_of_cell[kept.reshape(-1)] = (row_start + wp)[:, None].expand(hp, wp).reshape(-1)
    # Reducer order: crop (i, j) row-major, then its cell (y, x) row-major; canvas cell (i·h + y, j·w + x).
    order = torch.arange(big_h * big_w).reshape(rows, h, cols, w).permute(0, 2, 1, 3).reshape(-1)
    thumb = torch.arange(hw)
    column = torch.cat([thumb, col_of_cell[order]])  # [N]
    newline = torch.cat([torch.full((hw,), -1, dtype=torch.long), nl_of_cell[order]])  # [N]
    return AnyResLayout((rows, cols), hw + hp * (wp + 1), column, newline)


@register_adapter("LlavaNextForConditionalGeneration")
class LlavaNextAdapter(VLMAdapter):
    """LLaVA-NeXT adapter (see the module docstring for the layout and the placement rules)."""

    extra_image_keys = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layouts: list[AnyResLayout] = []  # of every image of the last prefill, in placeholder order

    def encode(self, pixel_values: Tensor, extra: dict[str, Any]) -> list[VisualTokens]:
        inner = self.model.model
        cfg = self.model.config
        vcfg = cfg.vision_config
        image_sizes = extra.get("image_sizes")
        if image_sizes is None:
            raise ValueError("vtc: LLaVA-NeXT needs image_sizes together with pixel_values")
        feat_layer = extra.get("vision_feature_layer")
        feat_layer = cfg.vision_feature_layer if feat_layer is None else feat_layer
        strategy = extra.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        if not isinstance(feat_layer, int):
            raise ValueError(f"vtc: multi-layer vision features ({feat_layer}) are not supported yet")
        layers = encoder_layers(inner.vision_tower)
        attn = layers[clip_layer_for_hidden_state(len(layers), self.config.vision_layer or feat_layer)].self_attn
        proj = inner.multi_modal_projector
        with _Capture() as cap:
            cap.input(proj, "features")
            cap.output(proj, "tokens")
            cap.output(attn.q_proj, "q")
            cap.output(attn.k_proj, "k")
            inner.get_image_features(
                pixel_values=pixel_values,
                image_sizes=image_sizes,
                vision_feature_layer=feat_layer,
                vision_feature_select_strategy=strategy,
            )
        tokens, features = cap.values["tokens"], cap.values["features"]  # [P, hw, D], [P, hw, Dv]: all views
        prefix = 1 if strategy == "default" else 0
        logits, keys = cls_logits_and_keys(cap.values["q"], cap.values["k"], attn.num_heads, attn.scale, prefix)
        side = vcfg.image_size // vcfg.patch_size
        grid = (side, side)
        if tokens.shape[1] != side * side:
            raise ValueError(f"vtc: {tokens.shape[1]} tokens per view, expected a {side}x{side} grid")

        sizes = image_sizes.tolist() if isinstance(image_sizes, Tensor) else [list(s) for s in image_sizes]
        dev = tokens.device
        self.layouts = []
        for size in sizes:
            views = tuple(get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, vcfg.image_size))
            lay = anyres_layout(views, grid, size)
            self.layouts.append(dataclasses.replace(lay, column=lay.column.to(dev), newline=lay.newline.to(dev)))
        if sum(1 + r * c for r, c in (lay.views for lay in self.layouts)) != tokens.shape[0]:
            raise ValueError("vtc: the views of pixel_values do not match image_sizes")

        groups, start, i = [], 0, 0
        while i < len(self.layouts):  # one group per run of consecutive images with the same crop layout
            views = self.layouts[i].views
            m = 1
            while i + m < len(self.layouts) and self.layouts[i + m].views == views:
                m += 1
            v = 1 + views[0] * views[1]
            sl = slice(start, start + m * v)
            heads = logits.shape[1]
            groups.append(
                VisualTokens(
                    tokens=tokens[sl].reshape(m, v * side * side, -1),
                    features=features[sl].reshape(m, v * side * side, -1),
                    cls_attn=logits[sl].reshape(m, v, heads, -1).transpose(1, 2).reshape(m, heads, -1),
                    keys=keys[sl].reshape(m, v * side * side, -1),
                    grid=grid,
                    views=views,
                    valid=torch.stack([lay.column >= 0 for lay in self.layouts[i : i + m]]),  # [m, N]
                )
            )
            start, i = start + m * v, i + m
        return groups

    def image_slots(self, input_ids: Tensor, counts: list[int]) -> list[ImageSlot]:
        """Placeholder runs: each holds the packed layout (thumbnail, unpadded rows + newlines), not N tokens."""
        return super().image_slots(input_ids, [lay.length for lay in self.layouts])

    def layout_index(self, image: int, run_cols: Tensor) -> Tensor:
        lay = self.layouts[image]
        present = lay.column >= 0
        inverse = torch.full((lay.length,), -1, dtype=torch.long, device=lay.column.device)
        inverse[lay.column[present]] = present.nonzero().squeeze(-1)  # run column → index in the reducer layout
        return inverse[run_cols]

    def place(self, image: int, sel: Selection, j: int) -> tuple[Tensor, Tensor, int]:
        lay = self.layouts[image]
        n = lay.column.numel()
        present = torch.cat([lay.column >= 0, lay.column.new_zeros(1, dtype=torch.bool)])  # [N + 1]
        if sel.indices is None:  # merged: each output sits at its first source that is in the packed layout
            a = sel.assignment.clone()
            a[j] = a[j].masked_fill(~present[:n], -1)
            sel = dataclasses.replace(sel, assignment=a)
        src, toks = _placed_tokens(sel, j)  # source index n: no source left
        ok = present[src]
        src, toks = src[ok], toks[ok]
        nl = lay.newline[src]
        nl = nl[nl >= 0].unique()  # the newline of every packed row with a kept token
        newline = self.model.model.image_newline.to(toks.dtype).expand(nl.numel(), -1)
        return torch.cat([lay.column[src], nl]), torch.cat([toks, newline]), int(src.numel())
