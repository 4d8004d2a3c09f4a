"""Kept-token visualisation: which visual tokens a reducer keeps (or merges), drawn over the image (`vtc viz`).

    vtc viz --image photo.png --method divprune --budget 64 --out kept.png [--model PATH] [--question "..."]

Three levels, each usable alone:

* `draw_kept(image, kept, grid=(h, w), views=None, frames=None, assignment=None)`: pure drawing with OpenCV. Dropped
  patches are dimmed, kept ones outlined (optionally numbered with their token index); merged tokens colour every
  input patch with its group's colour and outline the groups.
* `kept_tokens(model, image, ...)`: runs a reducer on real inputs, either a transformers VLM through `vtc.compress`
  (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL; in-LLM methods too) or a timm / open_clip encoder through
  `vtc.encode_and_reduce`, and returns `KeptTokens`: the pictures the model saw and what it kept.
* `visualize(model, image, ...)`: both, plus a one-line caption; `add_parser` / `main` make the `vtc viz` command.

Layout rules (pinned; the tests check them pixel by pixel):

* Grid: a view / frame of H×W pixels shows an h×w token grid stretched over it; cell (y, x) is token `y*w + x` and
  spans rows `round(y*H/h) .. round((y+1)*H/h)` and the same for columns. A one-image sample is one panel.
* AnyRes (`views=(rows, cols)`, LLaVA-NeXT; token order as in `vtc/types.py`): two panels, the thumbnail (tokens
  `0 .. h*w`) and the *canvas* the crops tile, `rows*S` × `cols*S` pixels for views of S×S pixels, on which crop
  (i, j) is the S×S square at row i, column j with its own h×w grid (tokens `h*w*(1 + i*cols + j) + y*w + x`).
  `image` is either the `1 + rows*cols` views as the model saw them or one full-resolution image; from one image
  the views follow LLaVA-NeXT's AnyRes rule (`anyres_views`): the thumbnail is the image resized to S×S, the
  canvas is the image resized to fit `rows*S` × `cols*S` keeping its aspect ratio, centred and padded with black.
* Frames (`frames=T`, e.g. Qwen2-VL temporal patches): one panel per frame, frame t holding tokens
  `t*h*w .. (t+1)*h*w`. With `k*T` images, k per temporal patch, the first image of each patch is shown.
* Panels sit left to right, top-aligned, `gap` white pixels apart, `per_row` panels per row (default: all in one
  row, for frames at most 4 per row).

Drawing rules: a dropped pixel becomes `round(pixel * (1 - alpha))`; a kept (pruning) cell is untouched except for a
`thickness`-pixel outline on its own border pixels; with an assignment every kept input cell is tinted
`round((1 - tint) * pixel + tint * colour)` with its group's colour (`group_colors`) and the groups are outlined
where neighbouring cells belong to different groups. Numbers (`numbers=True`) go in the cell centres: the token
index of a kept token, or the output row of a group at its first source token; cells smaller than 12 px get none.
A 1-px white line marks the crop borders on the AnyRes canvas.

Real inputs: a transformers VLM is run once (prefill) under `vtc.compressed`; the panels are its own
`pixel_values`, denormalised (LLaVA: the processed square; LLaVA-NeXT: thumbnail + crops; Qwen2-VL: the patches
folded back into frames, the first frame of each temporal patch), so the grid is exactly what the model saw.
Without a processor, the family's standard image processor is built from the model config (CLIP mean/std) and the
question is turned into ids byte by byte (a stand-in for config-built models with random weights; pass
`processor=` for a real model). What counts as kept is what reaches the LLM: LLaVA-NeXT tokens that unpadding
removes are drawn as dropped (a merged group only if all its sources are); in-LLM methods (FastV, PDrop, DART),
alone or composed after a pre-LLM reducer (`in_llm=`), show the tokens alive after their last stage (a merged
group lives while the column of its first source does). An encoder shows its own transform's output,
denormalised. Without any model, a tiny LLaVA with random weights is built from a config (`default_model`): its
selections show the mechanics, not a meaningful choice of tokens.
"""

from __future__ import annotations

import argparse
import colorsys
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from vtc.types import Query, Selection

__all__ = [
    "KeptTokens",
    "add_parser",
    "anyres_views",
    "default_model",
    "draw_kept",
    "group_colors",
    "kept_tokens",
    "main",
    "visualize",
]

KEPT_COLOR = (255, 220, 0)  # RGB outline of a kept token
GROUP_EDGE_COLOR = (255, 255, 255)  # RGB outline between merge groups
CROP_EDGE_COLOR = (255, 255, 255)  # RGB line along crop borders on the AnyRes canvas
MIN_NUMBER_CELL = 12  # px: smaller cells get no index numbers
# the model `visualize` loads when given none: the shipped tiny LLaVA, or a random tiny one where its files are absent
DEFAULT_MODEL: str | None = (
    "tiny-llava-shapes" if (Path(__file__).resolve().parent.parent / "assets/tiny-llava-shapes/config.json").exists()
    else None
)  # fmt: skip


# ---------------------------------------------------------------------- images
def _as_rgb(image: Any, what: str = "image") -> np.ndarray:
    """`[H, W, 3]` uint8 RGB from an array (HW, HWC uint8 or float in [0, 1]), a PIL image or a `[3, H, W]` tensor."""
    if hasattr(image, "convert") and not isinstance(image, np.ndarray):  # PIL
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, Tensor):
        image = image.detach().cpu()
        if image.dim() == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3, 4):
            image = image.permute(1, 2, 0)
        image = image.float().numpy() if image.is_floating_point() else image.numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, PIL image or tensor, got {type(image).__name__}")
    a = image
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{what} must be H×W, H×W×3 or H×W×4, got shape {image.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError(f"{what} contains NaN/Inf")
        a = np.clip(np.rint(a * 255.0 if a.max() <= 1.0 else a), 0, 255).astype(np.uint8)  # [0, 1] or [0, 255]
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a[..., :3])


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    down = height * width < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if down else cv2.INTER_CUBIC)


def _fit_long_side(image: np.ndarray, size: int | None) -> np.ndarray:
    if size is None:
        return image
    h, w = image.shape[:2]
    s = size / max(h, w)
    return _resize(image, max(1, round(h * s)), max(1, round(w * s)))


def anyres_views(image: Any, views: tuple[int, int], view_size: int | None = None) -> list[np.ndarray]:
    """The `1 + rows*cols` views LLaVA-NeXT makes of one image: thumbnail, then crops in row-major order.

    The rule of transformers' `LlavaNextImageProcessor`: the thumbnail is the image resized to S×S; the crops tile
    the image resized to fit `rows*S` × `cols*S` keeping its aspect ratio (the fitted side gets the whole target,
    the other `ceil`), pasted centred (odd padding pixel at the bottom / right) on a black canvas.

    Args:
        image: the full-resolution image.
        views: `(rows, cols)` crop layout.
        view_size: S; default `ceil(max(H / rows, W / cols))`, so the canvas keeps about the image's resolution.
    """
    img = _as_rgb(image)
    rows, cols = _check_views(views)
    h, w = img.shape[:2]
    s = int(view_size) if view_size is not None else math.ceil(max(h / rows, w / cols))
    if s < 1:
        raise ValueError(f"view_size must be >= 1, got {view_size}")
    th, tw = rows * s, cols * s
    if tw / w < th / h:
        new_w, new_h = tw, min(math.ceil(h * tw / w), th)
    else:
        new_h, new_w = th, min(math.ceil(w * th / h), tw)
    canvas = np.zeros((th, tw, 3), dtype=np.uint8)
    y0, x0 = (th - new_h) // 2, (tw - new_w) // 2
    canvas[y0 : y0 + new_h, x0 : x0 + new_w] = _resize(img, new_h, new_w)
    crops = [canvas[i * s : (i + 1) * s, j * s : (j + 1) * s] for i in range(rows) for j in range(cols)]
    return [_resize(img, s, s)] + crops


# ---------------------------------------------------------------------- validation
def _check_views(views: Any) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in views)
    except (TypeError, ValueError):
        raise ValueError(f"views must be (rows, cols), got {views!r}") from None
    if rows < 1 or cols < 1:
        raise ValueError(f"views must be (rows, cols) with rows, cols >= 1, got {tuple(views)}")
    return rows, cols


def _check_grid(grid: Any) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be (h, w) token rows and columns of one view / frame, got {grid!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"grid must have h, w >= 1, got {tuple(grid)}")
    return h, w


def _to_numpy_1d(x: Any, what: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 1:
        raise ValueError(
            f"{what} must be 1-D (one sample), got shape {a.shape}; pass one row, e.g. sel.indices[0], "
            "or the Selection itself with sample=i"
        )
    return a


def _as_index_array(x: Any, what: str) -> np.ndarray:
    a = _to_numpy_1d(x, what)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{what} must hold integer token indices, got dtype {a.dtype}")
    return a.astype(np.int64)


@dataclass
class _Marks:
    """What to draw for one sample: `kept` `[N]` bool, optional `assignment` `[N]`, the number of inputs N."""

    kept: np.ndarray
    assignment: np.ndarray | None
    n: int
    labels: dict[int, int] = field(default_factory=dict)  # token index → number written in its cell


def _marks(
    kept: Any, assignment: Any, grid: tuple[int, int] | None, num_views: int, layout: str, sample: int
) -> tuple[_Marks, tuple[int, int]]:
    """Validate `kept` / `assignment` against the layout; infer a square grid when N is known and grid is None."""
    mask = indices = None
    if isinstance(kept, Selection):
        b = kept.tokens.shape[0]
        if not -b <= sample < b:
            raise ValueError(f"sample={sample} is out of range for a Selection of {b} samples")
        if assignment is None and kept.assignment is not None:
            assignment = kept.assignment[sample]
        if kept.indices is not None:
            indices = kept.indices[sample][kept.mask[sample]]
        elif assignment is None:
            raise ValueError("the Selection has neither indices nor an assignment; nothing says what was kept")
    elif kept is not None:
        a = _to_numpy_1d(kept, "kept")
        if a.dtype == np.bool_:
            mask = a
        else:
            indices = kept
    if assignment is not None:
        assignment = _as_index_array(assignment, "assignment")
    if mask is None and indices is None and assignment is None:
        raise ValueError("nothing to draw: pass kept (indices, a bool mask or a Selection) and/or an assignment")

    n = None  # the number of input tokens, where the inputs say it
    for what, arr in (("kept mask", mask), ("assignment", assignment)):
        if arr is not None:
            if n is not None and arr.shape[0] != n:
                raise ValueError(f"the kept mask has {n} entries, the assignment {arr.shape[0]}; both are per input")
            n = arr.shape[0]
            if n == 0:
                raise ValueError(f"{what} is empty")
    if grid is None:
        if n is None:
            raise ValueError(f"grid=None: pass grid=(h, w), the token grid of one view / frame ({layout})")
        per, rem = divmod(n, num_views)
        side = math.isqrt(per)
        if rem or side * side != per:
            raise ValueError(
                f"N={n} tokens are not {num_views} square grid(s) ({layout}); pass grid=(h, w) of one view / frame"
            )
        grid = (side, side)
    grid = _check_grid(grid)
    cells = grid[0] * grid[1] * num_views
    if n is not None and n != cells:
        raise ValueError(
            f"grid={grid} × {num_views} view(s)/frame(s) ({layout}) has {cells} cells but the selection has N={n} "
            f"input tokens; pass the grid of one view / frame (h*w = N / {num_views}) and the right views/frames"
        )
    n = cells
    if indices is not None:
        idx = _as_index_array(indices, "kept")
        bad = idx[(idx < 0) | (idx >= n)]
        if bad.size:
            raise ValueError(
                f"kept index {int(bad[0])} is out of range for N={n} tokens (grid={grid} × {num_views} view(s)/"
                f"frame(s), {layout}); indices are positions 0..{n - 1} in the reducer's input"
            )
        mask = np.zeros(n, dtype=bool)
        mask[idx] = True
    labels: dict[int, int] = {}
    if assignment is not None:
        if (assignment < -1).any():
            raise ValueError(f"assignment holds {int(assignment.min())}; entries are output rows >= 0 or -1 (dropped)")
        if mask is None:
            mask = assignment >= 0
        for g in np.unique(assignment[assignment >= 0]):
            labels[int(np.flatnonzero(assignment == g)[0])] = int(g)  # a group's number at its first source
    else:
        labels = {int(i): int(i) for i in np.flatnonzero(mask)}
    return _Marks(mask.astype(bool), assignment, n, labels), grid


# ---------------------------------------------------------------------- layout
def _cell_edges(pixels: int, cells: int) -> np.ndarray:
    return np.array([round(i * pixels / cells) for i in range(cells + 1)], dtype=np.int64)


def _cell_map(height: int, width: int, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column `[H, W]` of the grid cell under every pixel (edges at `round(i * size / cells)`)."""
    ys = np.searchsorted(_cell_edges(height, grid[0]), np.arange(height), side="right") - 1
    xs = np.searchsorted(_cell_edges(width, grid[1]), np.arange(width), side="right") - 1
    return np.broadcast_to(ys[:, None], (height, width)), np.broadcast_to(xs[None, :], (height, width))


@dataclass
class _Panel:
    image: np.ndarray  # [H, W, 3] uint8
    token: np.ndarray  # [H, W] int64 token index under every pixel
    lines: list[tuple[int, int, int, int]] = field(default_factory=list)  # crop borders (x0, y0, x1, y1)


def _grid_panel(image: np.ndarray, grid: tuple[int, int], offset: int) -> _Panel:
    ys, xs = _cell_map(image.shape[0], image.shape[1], grid)
    return _Panel(image, offset + ys * grid[1] + xs)


def _panels(
    image: Any, grid: tuple[int, int], views: tuple[int, int] | None, frames: int | None, size: int | None
) -> list[_Panel]:
    h, w = grid
    if views is not None:
        rows, cols = views
        items = _image_list(image)
        if len(items) == 1:
            vs = anyres_views(items[0], views, None if size is None else int(size))
        elif len(items) == 1 + rows * cols:
            vs = [_as_rgb(v, f"view {i}") for i, v in enumerate(items)]
            s = int(size) if size is not None else vs[0].shape[0]
            vs = [_resize(v, s, s) for v in vs]
        else:
            raise ValueError(
                f"views={views} needs one full-resolution image or {1 + rows * cols} views (thumbnail + "
                f"{rows * cols} crops), got {len(items)} images"
            )
        s = vs[0].shape[0]
        canvas = np.zeros((rows * s, cols * s, 3), dtype=np.uint8)
        for c, crop in enumerate(vs[1:]):
            i, j = divmod(c, cols)
            canvas[i * s : (i + 1) * s, j * s : (j + 1) * s] = crop
        ys, xs = _cell_map(rows * s, cols * s, (rows * h, cols * w))
        crop_id = (ys // h) * cols + xs // w
        token = h * w * (1 + crop_id) + (ys % h) * w + xs % w
        lines = [(j * s, 0, j * s, rows * s - 1) for j in range(1, cols)]
        lines += [(0, i * s, cols * s - 1, i * s) for i in range(1, rows)]
        return [_grid_panel(vs[0], grid, 0), _Panel(canvas, token, lines)]
    items = _image_list(image)
    if frames is not None:
        if len(items) % frames:
            raise ValueError(
                f"frames={frames} needs {frames} images (one per frame / temporal patch) or a multiple of it "
                f"(k per temporal patch, the first of each is shown), got {len(items)}"
            )
        items = items[:: len(items) // frames]
    elif len(items) != 1:
        raise ValueError(f"got {len(items)} images for one image; pass frames=T for a video or views=(rows, cols)")
    imgs = [_fit_long_side(_as_rgb(im, f"frame {t}" if frames else "image"), size) for t, im in enumerate(items)]
    shape = imgs[0].shape[:2]
    imgs = [_resize(im, *shape) for im in imgs]  # frames of one video share a size
    return [_grid_panel(im, grid, t * h * w) for t, im in enumerate(imgs)]


def _image_list(image: Any) -> list[Any]:
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("image is an empty list")
        return list(image)
    if isinstance(image, np.ndarray) and image.ndim == 4:
        return list(image)
    if isinstance(image, Tensor) and image.dim() == 4:
        return list(image)
    return [image]


def _compose(panels: list[_Panel], gap: int, per_row: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Place panels left to right (top-aligned, `per_row` per row): image, token map (-2 off-panel), lines."""
    rows = [panels[i : i + per_row] for i in range(0, len(panels), per_row)]
    width = max(sum(p.image.shape[1] for p in r) + gap * (len(r) - 1) for r in rows)
    heights = [max(p.image.shape[0] for p in r) for r in rows]
    height = sum(heights) + gap * (len(rows) - 1)
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    token = np.full((height, width), -2, dtype=np.int64)
    lines = []
    y = 0
    for r, rh in zip(rows, heights, strict=True):
        x = 0
        for p in r:
            ph, pw = p.image.shape[:2]
            out[y : y + ph, x : x + pw] = p.image
            token[y : y + ph, x : x + pw] = p.token
            lines += [(x + a, y + b, x + c, y + d) for a, b, c, d in p.lines]
            x += pw + gap
        y += rh + gap
    return out, token, lines


# ---------------------------------------------------------------------- drawing
def group_colors(num: int) -> np.ndarray:
    """`[num, 3]` uint8 RGB: distinct, saturated colours for merge groups (golden-ratio hue steps, 3 brightness
    levels), deterministic."""
    out = np.zeros((max(num, 0), 3), dtype=np.uint8)
    for g in range(num):
        hue = (g * 0.6180339887498949) % 1.0
        sat, val = (0.9, 1.0) if g % 3 == 0 else ((0.65, 0.95) if g % 3 == 1 else (1.0, 0.75))
        out[g] = np.rint(np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255)
    return out


def _boundary(label: np.ndarray, thickness: int) -> np.ndarray:
    """`[H, W]` bool: pixels within `thickness` of a pixel with another label (4-neighbourhood) or the border."""
    edge = np.zeros(label.shape, dtype=bool)
    pad = np.pad(label, 1, constant_values=np.iinfo(np.int64).min)
    core = pad[1:-1, 1:-1]
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= pad[dy : dy + label.shape[0], dx : dx + label.shape[1]] != core
    if thickness > 1:  # grow inwards: a pixel is an edge if an edge pixel of its own label is that near
        edge = _near_same_label(label, edge, thickness)
    return edge


def _near_same_label(label: np.ndarray, edge: np.ndarray, thickness: int) -> np.ndarray:
    out = edge.copy()
    h, w = label.shape
    for dy in range(-thickness + 1, thickness):
        for dx in range(-thickness + 1, thickness):
            ys = slice(max(dy, 0), h + min(dy, 0))
            yd = slice(max(-dy, 0), h + min(-dy, 0))
            xs = slice(max(dx, 0), w + min(dx, 0))
            xd = slice(max(-dx, 0), w + min(-dx, 0))
            out[yd, xd] |= edge[ys, xs] & (label[ys, xs] == label[yd, xd])
    return out


def _put_numbers(out: np.ndarray, token: np.ndarray, labels: dict[int, int]) -> None:
    if not labels:
        return
    ys, xs = np.nonzero(token >= 0)
    if ys.size == 0:
        return
    # one pass: the bounding box of every token's cell
    t = token[ys, xs]
    n = int(t.max()) + 1
    y0 = np.full(n, np.iinfo(np.int64).max)
    x0 = y0.copy()
    y1 = np.full(n, -1)
    x1 = y1.copy()
    np.minimum.at(y0, t, ys)
    np.minimum.at(x0, t, xs)
    np.maximum.at(y1, t, ys)
    np.maximum.at(x1, t, xs)
    for tok, label in labels.items():
        if tok >= n or y1[tok] < 0:
            continue  # not shown (e.g. a token outside every panel)
        ch, cw = y1[tok] - y0[tok] + 1, x1[tok] - x0[tok] + 1
        if min(ch, cw) < MIN_NUMBER_CELL:
            continue
        text = str(label)
        scale = 0.3
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        scale *= min(0.8 * cw / tw, 0.5 * ch / th, 3.0)
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        org = (int(x0[tok] + (cw - tw) // 2), int(y0[tok] + (ch + th) // 2))
        cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 2, cv2.LINE_AA)
        cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def draw_kept(
    image: Any,
    kept: Any = None,
    grid: tuple[int, int] | None = None,
    views: tuple[int, int] | None = None,
    frames: int | None = None,
    assignment: Any = None,
    alpha: float = 0.65,
    *,
    tint: float = 0.45,
    numbers: bool = False,
    thickness: int = 1,
    size: int | None = None,
    gap: int = 8,
    per_row: int | None = None,
    sample: int = 0,
    color: tuple[int, int, int] = KEPT_COLOR,
) -> np.ndarray:
    """Draw which visual tokens were kept over the image(s); returns an `[H, W, 3]` uint8 RGB array.

    Args:
        image: one image (H×W×3 uint8 / float in [0, 1], H×W, PIL); for `views` one full-resolution image or the
            `1 + rows*cols` views; for `frames` a list or `[T, H, W, 3]` array of frames.
        kept: kept token indices `[K]` (positions in the reducer's input), a bool mask `[N]`, or a `vtc.Selection`
            (its row `sample`; a merging reducer's assignment is used automatically). None with `assignment`.
        grid: `(h, w)` tokens of one view / frame; None infers a square grid from N when N is known.
        views: `(rows, cols)` AnyRes crop layout (thumbnail + crops).
        frames: number of frames (temporal patches) of a video.
        assignment: `[N]` output row of every input token, -1 if dropped (merging reducers).
        alpha: how much dropped patches are dimmed, in [0, 1].
        tint: opacity of the group colours of merged tokens, in [0, 1].
        numbers: write token indices (merged: group rows) in kept cells of at least 12 px.
        thickness: outline width in pixels.
        size: display size: the longer side of an image / frame, the side of one AnyRes view; None: as given.
        gap: white pixels between panels.
        per_row: panels per row (default: all; frames: at most 4).
        sample: the row of a batched `Selection`.
        color: RGB outline colour of kept tokens.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1] (0: dropped patches unchanged, 1: black)")
    if not 0.0 <= float(tint) <= 1.0:
        raise ValueError(f"tint={tint} must be in [0, 1]")
    if thickness < 1 or gap < 0:
        raise ValueError(f"thickness must be >= 1 and gap >= 0, got thickness={thickness}, gap={gap}")
    if size is not None and int(size) < 1:
        raise ValueError(f"size={size} must be a positive number of pixels (or None)")
    if views is not None and frames is not None:
        raise ValueError("pass views=(rows, cols) for an AnyRes image or frames=T for a video, not both")
    if views is not None:
        views = _check_views(views)
        num_views, layout = 1 + views[0] * views[1], f"views={views}: thumbnail + {views[0] * views[1]} crops"
    elif frames is not None:
        if int(frames) < 1:
            raise ValueError(f"frames={frames} must be >= 1")
        frames = int(frames)
        num_views, layout = frames, f"frames={frames}"
    else:
        num_views, layout = 1, "one image"
    marks, grid = _marks(kept, assignment, grid, num_views, layout, sample)

    panels = _panels(image, grid, views, frames, size)
    if per_row is None:
        per_row = min(len(panels), 4) if frames is not None else len(panels)
    if per_row < 1:
        raise ValueError(f"per_row={per_row} must be >= 1")
    out, token, lines = _compose(panels, gap, per_row)
    on = token >= 0
    tok = np.where(on, token, 0)
    kept_px = on & marks.kept[tok]
    dropped_px = on & ~marks.kept[tok]

    dimmed = np.rint(out.astype(np.float32) * (1.0 - float(alpha))).astype(np.uint8)
    out = np.where(dropped_px[..., None], dimmed, out)
    if marks.assignment is not None:
        group = np.where(on, marks.assignment[tok], -2)
        in_group = kept_px & (group >= 0)
        colors = group_colors(int(marks.assignment.max()) + 1 if (marks.assignment >= 0).any() else 0)
        col = colors[np.where(in_group, group, 0)] if colors.size else np.zeros_like(out)
        tinted = np.rint((1.0 - tint) * out.astype(np.float32) + tint * col.astype(np.float32)).astype(np.uint8)
        out = np.where(in_group[..., None], tinted, out)
        label = np.where(in_group, group, np.where(on, -1, -2))
        # outline each group along its border (neighbouring cells of other groups, dropped cells, panel edges)
        out[_boundary(label, thickness) & in_group] = GROUP_EDGE_COLOR
        out[_boundary(token, thickness) & kept_px & ~in_group] = color  # kept without a group (mask-only)
    else:
        out[_boundary(token, thickness) & kept_px] = color
    for x0, y0, x1, y1 in lines:
        cv2.line(out, (x0, y0), (x1, y1), CROP_EDGE_COLOR, 1)
    if numbers:
        _put_numbers(out, token, {t: v for t, v in marks.labels.items() if marks.kept[t]})
    return out


def caption(image: np.ndarray, text: str, height: int = 26) -> np.ndarray:
    """`image` with a white band of `height` pixels on top holding one line of black text."""
    band = np.full((height, image.shape[1], 3), 255, dtype=np.uint8)
    scale = 0.5
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    if tw > image.shape[1] - 8:
        scale *= (image.shape[1] - 8) / tw
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    cv2.putText(band, text, (4, (height + th) // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, image], axis=0)


# ---------------------------------------------------------------------- real inputs
@dataclass
class KeptTokens:
    """What a reducer kept on one real input, ready for `draw_kept`.

    Attributes:
        images: the pictures the model saw (RGB uint8): one image, the `1 + rows*cols` AnyRes views, or one per frame.
        kept: `[N]` bool, input tokens that survive or contribute to an output.
        assignment: `[N]` output row of every input (-1 dropped) for merging reducers, else None.
        grid, views, frames: the layout (see `vtc/types.py`).
        method: the reducer's name; budget: as requested; num_tokens: N.
        inputs: the model inputs that were run (for reproducing the selection).
        selection: the pre-LLM reducer's `Selection` (None for an in-LLM method alone, which selects in the LLM).
        note: a remark for the caption (e.g. random weights).
    """

    images: list[np.ndarray]
    kept: np.ndarray
    assignment: np.ndarray | None
    grid: tuple[int, int]
    views: tuple[int, int] | None
    frames: int | None
    method: str
    budget: int | float
    num_tokens: int
    inputs: dict[str, Any] = field(default_factory=dict)
    selection: Selection | None = None
    note: str = ""

    @property
    def num_kept(self) -> int:
        """Tokens that go on to the LLM (merged groups count once)."""
        if self.assignment is not None:
            return int(np.unique(self.assignment[self.assignment >= 0]).size)
        return int(self.kept.sum())

    def draw(self, **kwargs: Any) -> np.ndarray:
        return draw_kept(
            self.images,
            self.kept if self.assignment is None else None,
            grid=self.grid,
            views=self.views,
            frames=self.frames,
            assignment=self.assignment,
            **kwargs,
        )

    def describe(self) -> str:
        what = f"{self.method}: {self.num_kept}/{self.num_tokens} visual tokens (budget {self.budget})"
        return f"{what}; {self.note}" if self.note else what


def default_model(seed: int = 0) -> nn.Module:
    """The model `vtc viz` uses without `--model`: `DEFAULT_MODEL` if set, else a tiny LLaVA with random weights.

    The random one: CLIP tower of 3 layers, 96×96 px images in 4 px patches (a 24×24 grid, 576 tokens, as
    LLaVA-1.5), a 3-layer Llama; built from configs, nothing downloaded. Its selections are not meaningful.
    """
    if DEFAULT_MODEL is not None:
        return _load_model(DEFAULT_MODEL)[0]
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=96,
        patch_size=4,
        projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=3,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    model._vtc_random_weights = True  # read by kept_tokens for the caption note
    return model


def _load_model(path: str) -> tuple[nn.Module, Any]:
    """A transformers VLM and its processor (None when the directory has none) from a local directory / hub id."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .harness import resolve_model_path

    path = resolve_model_path(path)  # an assets name (vtc list models), a folder or a hub id
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        warnings.warn(f"vtc viz: no processor in {path} ({e}); using the config's standard one", stacklevel=2)
        processor = None
    if processor is not None and not hasattr(processor, "tokenizer"):
        processor = None  # an image processor alone: the stand-in path builds the prompt
    return model, processor


def _is_vlm(model: Any) -> bool:
    from vtc.adapters.base import _ADAPTERS

    return isinstance(model, nn.Module) and any(c.__name__ in _ADAPTERS for c in type(model).__mro__)


def kept_tokens(
    model: Any,
    image: Any,
    question: str | Tensor | Query | None = None,
    method: Any = "divprune",
    budget: int | float = 64,
    *,
    processor: Any = None,
    views: tuple[int, int] | None = None,
    frames: int | None = None,
    **config: Any,
) -> KeptTokens:
    """Run `method` on real inputs and return what it kept (see `KeptTokens`).

    Args:
        model: a supported transformers VLM (`vtc.adapters.supported_models()`), a timm / open_clip vision
            encoder, or None for `default_model()`.
        image: one image (array, PIL); a list of frames for a video (Qwen2-VL, encoders).
        question: VLMs: the question text (query-aware methods score against it; default "Describe the image.").
            Encoders: question embeddings `[T, D]` / `[1, T, D]` in the tokens' space, or a `vtc.Query`.
        method: a reducer name or instance; budget: tokens kept (int) or a fraction (float), as everywhere.
        processor: the VLM's transformers processor (with a tokenizer); None: the config's standard image processor
            and a byte-level stand-in for the tokenizer (config-built models only).
        views: encoders only: `(rows, cols)` AnyRes crops of `image` (LLaVA-NeXT models pick their own layout).
        frames: encoders only: frames per sample (default: the number of images given, when more than one).
        **config: reducer config keys (with a name) and adapter options (`vision_layer`, ...).
    """
    if model is None:
        model = default_model()
    if _is_vlm(model):
        if views is not None or frames is not None:
            raise ValueError("views / frames are for encoders; a VLM's own processor decides its views and frames")
        return _kept_vlm(model, image, question, method, budget, processor, config)
    from vtc.adapters.encoders import resolve_encoder

    try:
        resolve_encoder(model)
    except TypeError as e:
        from vtc.adapters import supported_models

        raise TypeError(
            f"visualize: {type(model).__name__} is neither a supported transformers VLM "
            f"({', '.join(supported_models())}) nor a timm / open_clip vision encoder ({e})"
        ) from None
    return _kept_encoder(model, image, question, method, budget, views, frames, config)


# ---------------------------------------------------------------------- VLM path
def _family(model: nn.Module) -> str:
    names = {c.__name__ for c in type(model).__mro__}
    if "LlavaNextForConditionalGeneration" in names:
        return "llava_next"
    if "LlavaForConditionalGeneration" in names:
        return "llava"
    if names & {"Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"}:
        return "qwen2_vl"
    raise TypeError(f"visualize: no input builder for {type(model).__name__}")


def _standard_processor(model: nn.Module, family: str, video: bool) -> Any:
    """The family's stock image (or video) processor with the sizes of this model's config (CLIP mean / std)."""
    vc = model.config.vision_config
    if family == "llava":
        from transformers import CLIPImageProcessor

        s = vc.image_size
        return CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    if family == "llava_next":
        from transformers import LlavaNextImageProcessor

        s = vc.image_size
        return LlavaNextImageProcessor(
            size={"shortest_edge": s},
            crop_size={"height": s, "width": s},
            image_grid_pinpoints=model.config.image_grid_pinpoints,
        )
    unit = vc.patch_size * vc.spatial_merge_size
    kw = dict(
        patch_size=vc.patch_size,
        merge_size=vc.spatial_merge_size,
        temporal_patch_size=vc.temporal_patch_size,
        size={"shortest_edge": (4 * unit) ** 2, "longest_edge": (16 * unit) ** 2},
    )
    if video:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        if hasattr(Qwen2VLVideoProcessor, "cap_pixels_per_frame"):  # transformers 5.x: keep the plain behaviour
            kw["cap_pixels_per_frame"] = False
        return Qwen2VLVideoProcessor(**kw, do_sample_frames=False)
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(**kw)


def _stand_in_ids(model: nn.Module, text: str) -> list[int]:
    """Question ids for a model without a tokenizer: each UTF-8 byte mapped onto a non-special id."""
    cfg = model.config
    tc = getattr(cfg, "text_config", cfg)
    special = {getattr(tc, a, None) for a in ("pad_token_id", "bos_token_id", "eos_token_id")}
    special |= {getattr(cfg, a, None) for a in ("image_token_id", "image_token_index", "video_token_id")}
    special |= {getattr(cfg, a, None) for a in ("vision_start_token_id", "vision_end_token_id")}
    ids = [i for i in range(tc.vocab_size) if i not in special]
    return [ids[b % len(ids)] for b in text.encode("utf-8")]


def _stand_in_inputs(model: nn.Module, family: str, images: list[np.ndarray], question: str, video: bool):
    """Inputs built without a tokenizer: `[bos] [<vision_start>] <image>*n [<vision_end>] question-bytes`."""
    proc = _standard_processor(model, family, video)
    cfg = model.config
    if video:
        feats = proc(videos=[np.stack(images)], return_tensors="pt")
    else:
        feats = proc(images=[images[0]], return_tensors="pt")
    feats = dict(feats)
    if family == "llava":
        n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        if cfg.vision_feature_select_strategy == "full":
            n += 1
        mid = [cfg.image_token_id] * n
    elif family == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
        from vtc.adapters.llava_next import anyres_layout

        vc = cfg.vision_config
        size = [int(v) for v in feats["image_sizes"][0]]
        lay = anyres_layout(
            tuple(get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, vc.image_size)),
            (vc.image_size // vc.patch_size,) * 2,
            size,
        )
        mid = [cfg.image_token_id] * lay.length
    else:
        thw = feats["video_grid_thw" if video else "image_grid_thw"][0]
        n = int(thw.prod()) // cfg.vision_config.spatial_merge_size**2
        tok = cfg.video_token_id if video else cfg.image_token_id
        mid = [cfg.vision_start_token_id] + [tok] * n + [cfg.vision_end_token_id]
    bos = getattr(getattr(cfg, "text_config", cfg), "bos_token_id", None)
    ids = ([bos] if bos is not None else []) + mid + _stand_in_ids(model, "\n" + question)
    input_ids = torch.tensor([ids], dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **feats}
    if family == "qwen2_vl":
        mm = (input_ids == cfg.image_token_id).int() + 2 * (input_ids == cfg.video_token_id).int()
        out["mm_token_type_ids"] = mm
    return out, proc


def _processor_inputs(processor: Any, images: list[np.ndarray], question: str, video: bool):
    from PIL import Image

    content = [{"type": "video" if video else "image"}, {"type": "text", "text": question}]
    if getattr(processor, "chat_template", None):
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    else:
        token = getattr(processor, "video_token" if video else "image_token", "<image>")
        text = f"{token}\n{question}"
    if video:
        feats = processor(videos=[np.stack(images)], text=[text], return_tensors="pt")
        proc = getattr(processor, "video_processor", processor)
    else:
        feats = processor(images=[Image.fromarray(images[0])], text=[text], return_tensors="pt")
        proc = getattr(processor, "image_processor", processor)
    return dict(feats), proc


def _denormalise(x: Tensor, proc: Any) -> np.ndarray:
    """`[3, H, W]` processed pixels → `[H, W, 3]` uint8 with the processor's own mean / std / rescale factor."""
    x = x.detach().float().cpu()
    if getattr(proc, "do_normalize", True):
        mean = torch.tensor(proc.image_mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(proc.image_std, dtype=torch.float32).view(-1, 1, 1)
        x = x * std + mean
    scale = getattr(proc, "rescale_factor", 1 / 255) if getattr(proc, "do_rescale", True) else 1.0
    return np.clip(np.rint((x / scale).numpy()), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def qwen_unpatchify(pixels: Tensor, thw: Sequence[int], merge: int, patch: int, temporal: int) -> Tensor:
    """Qwen2-VL flattened patches `[t*h*w, C*temporal*patch²]` → frames `[t*temporal, C, h*patch, w*patch]`.

    The inverse of the processors' layout `[t, h/m, w/m, m, m, C, temporal, p, p]`.
    """
    t, h, w = (int(v) for v in thw)
    c = pixels.shape[-1] // (temporal * patch * patch)
    x = pixels.reshape(t, h // merge, w // merge, merge, merge, c, temporal, patch, patch)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)  # [t, temporal, C, h/m, m, p, w/m, m, p]
    return x.reshape(t * temporal, c, h * patch, w * patch)


def _seen_images(model: nn.Module, family: str, inputs: dict[str, Any], proc: Any, video: bool) -> list[np.ndarray]:
    """The pictures the model saw, from its own pixel inputs."""
    if family == "llava":
        return [_denormalise(inputs["pixel_values"][0], proc)]
    if family == "llava_next":
        pv = inputs["pixel_values"][0]  # [V_max, 3, S, S], zero-padded views at the end
        return [_denormalise(v, proc) for v in pv]
    vc = model.config.vision_config
    key = "video" if video else "image"
    frames = qwen_unpatchify(
        inputs["pixel_values_videos" if video else "pixel_values"],
        inputs[f"{key}_grid_thw"][0],
        vc.spatial_merge_size,
        vc.patch_size,
        vc.temporal_patch_size,
    )
    return [_denormalise(f, proc) for f in frames[:: vc.temporal_patch_size]]


def _token_columns(adapter: Any, image: int, n: int) -> Tensor:
    """`[N]` column of every reducer-layout token in its image's placeholder run (-1: not in the run)."""
    layouts = getattr(adapter, "layouts", None)  # LLaVA-NeXT packs and unpads its views
    if layouts and hasattr(layouts[image], "column"):
        return layouts[image].column.cpu()
    return torch.arange(n)


def _in_llm_kept(adapter: Any, image: int, n: int, seq: int) -> np.ndarray:
    """`[N]` bool: visual tokens of image `image` alive after the last in-LLM stage of the last prefill."""
    pruner, last = adapter.in_llm, adapter.last
    slot = last["slots"][image]
    if not pruner.stage_src:  # no stage ran (full budget)
        return np.ones(n, dtype=bool)
    layer = max(pruner.stage_src)
    src = pruner.stage_src[layer][slot.b].cpu()  # [L_s] columns of the prefill sequence
    valid = pruner.stage_valid[layer][slot.b].cpu()
    orig = last["source_columns"][slot.b].cpu()[src[valid]]  # columns of the unreduced prompt
    alive = torch.zeros(seq + 1, dtype=torch.bool)
    alive[orig.clamp(min=-1)] = True  # -1 (padding) lands in the spare last entry
    cols = _token_columns(adapter, image, n)
    run = slot.cols.cpu()
    ok = cols >= 0
    kept = torch.zeros(n, dtype=torch.bool)
    kept[ok] = alive[run[cols[ok]]]
    return kept.numpy()


def _kept_vlm(model, image, question, method, budget, processor, config) -> KeptTokens:
    from vtc.adapters import adapter_of

    import vtc

    family = _family(model)
    video = isinstance(image, (list, tuple)) or (isinstance(image, np.ndarray) and image.ndim == 4)
    if video and family != "qwen2_vl":
        raise ValueError(f"a list of frames (a video) needs a model that takes videos (Qwen2-VL); got {family}")
    images = [_as_rgb(im, f"frame {i}") for i, im in enumerate(image)] if video else [_as_rgb(image)]
    if question is not None and not isinstance(question, str):
        raise TypeError(f"question must be text for a VLM, got {type(question).__name__}")
    question = question or "Describe the image."
    if processor is None:
        inputs, proc = _stand_in_inputs(model, family, images, question, video)
    else:
        inputs, proc = _processor_inputs(processor, images, question, video)
    p = next(model.parameters())
    inputs = {k: v.to(p.device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    for k in ("pixel_values", "pixel_values_videos"):
        if k in inputs:
            inputs[k] = inputs[k].to(p.dtype)
    with torch.no_grad(), vtc.compressed(model, method, budget=budget, **config):
        adapter = adapter_of(model)
        model(**inputs)
        last = adapter.last
        reducer = adapter.reducer
    grid, views, frames = last["layouts"][0]
    sel = last["selections"][0]
    if grid is None:
        raise ValueError(f"the model's {sel.tokens.shape[1]} visual tokens per view are not a grid; nothing to draw")
    num_views = (1 + views[0] * views[1]) if views else (frames or 1)
    n = grid[0] * grid[1] * num_views
    # tokens the family removes after the reducer (LLaVA-NeXT's unpadding) never reach the LLM
    present = (_token_columns(adapter, 0, n) >= 0).numpy()
    assignment = None
    if reducer.stage == "in_llm":  # the pre-LLM step keeps everything
        kept, sel = present.copy(), None
    elif sel.assignment is not None:
        assignment = sel.assignment[0].cpu().numpy()
        reaches = np.zeros(sel.tokens.shape[1] + 1, dtype=bool)  # a group with a source in the packed layout
        reaches[assignment[present & (assignment >= 0)]] = True
        assignment = np.where(reaches[assignment], assignment, -1)  # index -1 reads the spare False
        kept = assignment >= 0
    else:
        kept = sel.source_mask(n)[0].cpu().numpy() & present
    if adapter.in_llm is not None:  # an in-LLM method, alone or after the pre-LLM reducer: alive after its last stage
        alive = _in_llm_kept(adapter, 0, n, inputs["input_ids"].shape[1])
        if assignment is not None:  # a merged token sits at its first source in the packed layout
            first = {}
            for t in np.flatnonzero(present & (assignment >= 0)):
                first.setdefault(int(assignment[t]), int(t))
            dead = [g for g, t in first.items() if not alive[t]]
            assignment = np.where(np.isin(assignment, dead), -1, assignment)
            kept = assignment >= 0
        else:
            kept = kept & alive
    seen = _seen_images(model, family, inputs, proc, video)
    if views is not None:
        seen = seen[: 1 + views[0] * views[1]]
    note = "random weights: the selection is not meaningful" if getattr(model, "_vtc_random_weights", False) else ""
    return KeptTokens(
        images=seen,
        kept=kept,
        assignment=assignment,
        grid=tuple(grid),
        views=tuple(views) if views else None,
        frames=frames,
        method=reducer.name,
        budget=budget,
        num_tokens=n,
        inputs=inputs,
        selection=sel,
        note=note,
    )


# ---------------------------------------------------------------------- encoder path
def _transform_normalize(tf: Any) -> tuple[list[float], list[float]] | None:
    for t in getattr(tf, "transforms", [tf]):
        if hasattr(t, "mean") and hasattr(t, "std") and type(t).__name__ == "Normalize":
            return list(t.mean), list(t.std)
    return None


def _kept_encoder(encoder, image, question, method, budget, views, frames, config) -> KeptTokens:
    from vtc.adapters.encoders import encode_and_reduce, resolve_encoder
    from vtc.adapters.encoders.core import as_image_batch

    if isinstance(question, str):
        raise TypeError(
            "an encoder has no text side: pass the question as embeddings [T, D] in the tokens' space "
            "(a vtc.Query or tensor), or use a VLM"
        )
    backend = resolve_encoder(encoder)
    items = _image_list(image)
    if views is not None:
        if len(items) != 1:
            raise ValueError(f"views={views} splits one image into crops; got {len(items)} images")
        tf = backend.transform()
        probe = tf(_pil(_as_rgb(items[0])))
        items = anyres_views(items[0], views, int(probe.shape[-1]))
    elif frames is None and len(items) > 1:
        frames = len(items)
    pil = [_pil(_as_rgb(im, f"image {i}")) for i, im in enumerate(items)]
    x = as_image_batch(backend, pil)  # [V, 3, H, W] through the encoder's own transform
    if isinstance(question, Tensor) and question.dim() == 2:
        question = question.unsqueeze(0)
    sel = encode_and_reduce(encoder, x, method, budget, query=question, views=views, frames=frames, **config)
    g = backend.grid(x.shape[-2], x.shape[-1])
    num_views = (1 + views[0] * views[1]) if views else (frames or 1)
    n = g[0] * g[1] * num_views
    norm = _transform_normalize(backend.transform())
    seen = []
    for v in x:
        if norm is not None:
            v = v * torch.tensor(norm[1]).view(-1, 1, 1) + torch.tensor(norm[0]).view(-1, 1, 1)
        else:
            v = (v - v.min()) / (v.max() - v.min()).clamp_min(1e-8)
        seen.append(np.clip(np.rint(v.float().numpy() * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0))
    assignment = None if sel.assignment is None else sel.assignment[0].cpu().numpy()
    kept = sel.source_mask(n)[0].cpu().numpy()
    name = method if isinstance(method, str) else getattr(method, "name", type(method).__name__)
    return KeptTokens(
        images=seen,
        kept=kept,
        assignment=assignment,
        grid=g,
        views=views,
        frames=frames,
        method=name,
        budget=budget,
        num_tokens=n,
        inputs={"images": x},
        selection=sel,
    )


def _pil(a: np.ndarray):
    from PIL import Image

    return Image.fromarray(a)


# ---------------------------------------------------------------------- one call
def visualize(
    model_or_reducer: Any = None,
    image: Any = None,
    question: str | Tensor | Query | None = None,
    method: Any = "divprune",
    budget: int | float = 64,
    *,
    processor: Any = None,
    views: tuple[int, int] | None = None,
    frames: int | None = None,
    size: int | None = None,
    numbers: bool = False,
    alpha: float = 0.65,
    title: bool = True,
    **config: Any,
) -> np.ndarray:
    """Run a reducer on a real image (or video) and draw what it kept; returns an `[H, W, 3]` uint8 RGB array.

    Args:
        model_or_reducer: a transformers VLM, a timm / open_clip encoder, or a reducer (name or instance) to run on
            `default_model()`; None: `method` on `default_model()`.
        image: the image (array, PIL, or a path); a list of frames for a video.
        question, method, budget, processor, views, frames, **config: see `kept_tokens`.
        size: display size (see `draw_kept`); default: 448 px per view for AnyRes, 512 px otherwise.
        numbers, alpha: see `draw_kept`. title: add a caption line (method, kept / total, notes).

    Example:
        >>> from skimage import data
        >>> out = visualize(model, data.astronaut(), "What is she holding?", method="fastervlm", budget=64)
        >>> cv2.imwrite("kept.png", out[..., ::-1])
    """
    from vtc.reducers import Reducer

    if image is None:
        raise ValueError("visualize needs an image (array, PIL image or path)")
    if isinstance(model_or_reducer, (str, Reducer)):
        model, method = None, model_or_reducer
    else:
        model = model_or_reducer
    if isinstance(image, str):
        image = read_image(image)
    k = kept_tokens(model, image, question, method, budget, processor=processor, views=views, frames=frames, **config)
    if size is None:
        size = 448 if k.views else 512
    out = k.draw(size=size, numbers=numbers, alpha=alpha)
    return caption(out, k.describe()) if title else out


def read_image(path: str) -> np.ndarray:
    """An image file as `[H, W, 3]` uint8 RGB."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cannot read an image from {path!r} (missing, or not an image OpenCV can decode)")
    return img[..., ::-1].copy()


def read_video(path: str, num_frames: int) -> list[np.ndarray]:
    """`num_frames` frames evenly spaced over a video file, RGB uint8."""
    cap = cv2.VideoCapture(str(path))
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    if not cap.isOpened() or total <= 0:
        raise FileNotFoundError(f"cannot read a video from {path!r}")
    out = []
    for i in np.linspace(0, total - 1, num_frames).round().astype(int):
        cap.set(cv2.CAP_PROP_POS_FRAMES, int(i))
        ok, frame = cap.read()
        if ok:
            out.append(frame[..., ::-1].copy())
    cap.release()
    if len(out) != num_frames:
        raise ValueError(f"read {len(out)} of {num_frames} frames from {path!r}")
    return out


# ---------------------------------------------------------------------- command line
def _budget(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budget {text!r} is neither an int (tokens kept) nor a float in (0, 1] (a fraction)"
        ) from None


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", nargs="+", help="image file; several files are the frames of a video")
    src.add_argument("--video", help="video file (frames taken evenly, see --num-frames)")
    p.add_argument("--num-frames", type=int, default=8, help="frames read from --video (default 8)")
    p.add_argument("--method", default="divprune", help="reducer name (vtc.list_reducers()), default divprune")
    p.add_argument("--budget", type=_budget, default=64, help="tokens kept (int) or a fraction (float), default 64")
    p.add_argument("--out", default="kept.png", help="output image (default kept.png)")
    p.add_argument("--model", help="transformers VLM directory or hub id (default: a tiny random-weight LLaVA)")
    p.add_argument("--question", default=None, help="question text (query-aware methods score against it)")
    p.add_argument("--numbers", action="store_true", help="write token indices in kept cells")
    p.add_argument("--size", type=int, default=None, help="display size of an image / frame / AnyRes view (px)")
    p.add_argument("--alpha", type=float, default=0.65, help="dimming of dropped patches in [0, 1] (default 0.65)")
    p.add_argument("--no-title", action="store_true", help="no caption line")
    return p


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `viz` command to an argparse subparsers object (its `func` default is `main`)."""
    p = subparsers.add_parser(
        "viz",
        help="draw the visual tokens a reducer keeps over an image",
        description="Draw the visual tokens a reducer keeps (dims dropped patches, outlines kept ones, colours "
        "merged groups) over an image, AnyRes views or video frames.",
    )
    _configure(p)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Run `vtc viz` with parsed arguments (or an argv list); writes `--out` and returns 0."""
    if not isinstance(args, argparse.Namespace):
        args = _configure(argparse.ArgumentParser(prog="vtc viz")).parse_args(args)
    if args.video:
        image: Any = read_video(args.video, args.num_frames)
    elif len(args.image) > 1:
        image = [read_image(p) for p in args.image]
    else:
        image = read_image(args.image[0])
    processor = None
    if args.model or DEFAULT_MODEL:
        model, processor = _load_model(args.model or DEFAULT_MODEL)
    else:
        model = default_model()
        print(
            "vtc viz: no --model given, using a tiny LLaVA with random weights: the kept tokens show how the "
            "method selects, not a meaningful choice (pass --model PATH for a real VLM)",
            file=sys.stderr,
        )
    out = visualize(
        model,
        image,
        args.question,
        args.method,
        args.budget,
        processor=processor,
        size=args.size,
        numbers=args.numbers,
        alpha=args.alpha,
        title=not args.no_title,
    )
    if not cv2.imwrite(str(args.out), np.ascontiguousarray(out[..., ::-1])):
        raise OSError(f"could not write {args.out!r} (unknown extension or unwritable folder)")
    print(f"wrote {args.out} ({out.shape[1]}×{out.shape[0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
