"""vtc.eval.viz: the drawn kept / dropped / merged regions match the selection exactly.

Oracle: the brightness of every patch's interior (its cell without the outline pixels), compared with the input
image: kept patches are untouched, dropped ones darkened by `alpha`, merged ones tinted with their group's colour,
one colour per group. Cell boxes are computed here from the layout rules in the module docstring (grid, AnyRes
thumbnail + crop canvas, frames side by side). End to end, the kept tokens of real tiny models are checked against
the reducer run directly on features computed here without adapter code.
"""

from __future__ import annotations

import argparse
import math

import cv2
import numpy as np
import pytest
import torch
from skimage import data
from tiny_models import tiny_llava, tiny_llava_next, tiny_qwen2_vl
from vtc.eval import viz

import vtc
from vtc.types import Selection, VisualTokens

ALPHA = 0.5


def photo(h: int, w: int, which: str = "coffee") -> np.ndarray:
    return cv2.resize(getattr(data, which)(), (w, h), interpolation=cv2.INTER_AREA)


def cell(y: int, x: int, hh: int, ww: int, grid: tuple[int, int], oy: int = 0, ox: int = 0, margin: int = 2):
    """Interior slices of cell (y, x) of a grid stretched over an hh×ww panel at (oy, ox)."""
    gh, gw = grid
    y0, y1 = math.ceil(y * hh / gh) + margin, math.floor((y + 1) * hh / gh) - margin
    x0, x1 = math.ceil(x * ww / gw) + margin, math.floor((x + 1) * ww / gw) - margin
    assert y1 > y0 and x1 > x0
    return slice(oy + y0, oy + y1), slice(ox + x0, ox + x1)


def check_cells(out: np.ndarray, ref: np.ndarray | None, boxes: dict[int, tuple], kept: set[int], refs=None):
    """Every token's interior: kept → identical to the reference, dropped → mean brightness × (1 - ALPHA).

    `refs[t]` are token t's reference pixels (default: `ref` at the same box). The kept set is read off the
    brightness change alone and must equal `kept`.
    """
    predicted = set()
    for t, box in boxes.items():
        r = ref[box] if refs is None else refs[t]
        o, rf = out[box].astype(np.float64), r.astype(np.float64)
        if rf.mean() - o.mean() < 0.25 * ALPHA * rf.mean():  # brightness unchanged: kept
            predicted.add(t)
            assert np.array_equal(out[box], r), f"kept token {t} was altered"
        else:
            assert abs(o.mean() - (1 - ALPHA) * rf.mean()) <= 0.6, f"dropped token {t} dimmed by the wrong amount"
    assert predicted == kept


# ---------------------------------------------------------------------- single image
def test_grid_kept_and_dropped_patches():
    img = photo(400, 600)
    grid = (7, 9)  # cells of 57.1 × 66.7 px: edges fall between pixels
    kept = set(np.random.default_rng(0).choice(63, 20, replace=False).tolist())
    out = viz.draw_kept(img, sorted(kept), grid=grid, alpha=ALPHA)
    assert out.shape == img.shape and out.dtype == np.uint8
    boxes = {y * 9 + x: cell(y, x, 400, 600, grid) for y in range(7) for x in range(9)}
    check_cells(out, img, boxes, kept)
    # outline: kept cells carry the colour on their own top border row, dropped cells never
    edges = [round(i * 400 / 7) for i in range(8)]
    for t in range(63):
        y, x = divmod(t, 9)
        mid = round((x + 0.5) * 600 / 9)
        assert (tuple(out[edges[y], mid]) == viz.KEPT_COLOR) == (t in kept)


def test_selection_mask_and_indices_draw_the_same():
    img = photo(96, 96, "astronaut")
    sel = vtc.create_reducer("divprune")(torch.randn(2, 36, 8, generator=torch.Generator().manual_seed(1)), 9)
    by_sel = viz.draw_kept(img, sel, grid=(6, 6), sample=1)
    by_idx = viz.draw_kept(img, sel.indices[1], grid=(6, 6))
    by_mask = viz.draw_kept(img, sel.source_mask(36)[1])  # grid inferred from N = 36
    assert np.array_equal(by_sel, by_idx) and np.array_equal(by_sel, by_mask)
    boxes = {y * 6 + x: cell(y, x, 96, 96, (6, 6)) for y in range(6) for x in range(6)}
    check_cells(viz.draw_kept(img, sel, grid=(6, 6), sample=1, alpha=ALPHA), img, boxes, set(sel.indices[1].tolist()))


# ---------------------------------------------------------------------- AnyRes views
def test_anyres_views_thumbnail_and_crop_canvas():
    s, grid, gap = 60, (3, 4), 8
    big = photo(240, 240, "astronaut")
    views = [cv2.resize(big, (s, s), interpolation=cv2.INTER_AREA)]
    views += [big[i * 120 : i * 120 + s, j * 120 : j * 120 + s] for i in range(2) for j in range(2)]
    kept = set(np.random.default_rng(1).choice(60, 25, replace=False).tolist())
    out = viz.draw_kept(views, sorted(kept), grid=grid, views=(2, 2), alpha=ALPHA, gap=gap)
    assert out.shape == (2 * s, s + gap + 2 * s, 3)
    assert (out[s:, :s] == 255).all() and (out[:, s : s + gap] == 255).all()  # background untouched
    boxes, refs = {}, {}  # where each token is drawn, and its pixels in its own view
    for t in range(60):
        v, (y, x) = t // 12, divmod(t % 12, 4)
        oy, ox = (0, 0) if v == 0 else ((v - 1) // 2 * s, s + gap + (v - 1) % 2 * s)  # thumbnail, or crop (i, j)
        boxes[t] = cell(y, x, s, s, grid, oy=oy, ox=ox)
        refs[t] = views[v][cell(y, x, s, s, grid)]
    check_cells(out, None, boxes, kept, refs)


@pytest.mark.parametrize("shape", [(400, 600), (370, 600), (600, 370)])
def test_anyres_views_follow_the_llava_next_processor(shape):
    """Against transformers' processor: the best fit is the 64×64 pinpoint (2×2 crops of 32 px); the fitted side
    of the content gets 64 px, the other ceil(64 * short / long) (43, 40, 40), centred, the odd pixel after."""
    from transformers import LlavaNextImageProcessor

    h, w = shape
    img = photo(h, w)
    proc = LlavaNextImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
    )
    pv = proc(images=[img], return_tensors="pt")["pixel_values"][0]  # [5, 3, 32, 32]
    theirs = [viz._denormalise(v, proc) for v in pv]
    ours = viz.anyres_views(img, (2, 2), 32)
    a, b = (np.concatenate([np.hstack(vs[1:3]), np.hstack(vs[3:5])]).astype(int) for vs in (ours, theirs))  # canvas
    content = math.ceil(64 * min(h, w) / max(h, w))
    before = (64 - content) // 2
    expected = list(range(before)) + list(range(before + content, 64))
    axis = 1 if h < w else 0  # padded rows (landscape) or columns (portrait)

    def padded(c: np.ndarray) -> list[int]:
        return [i for i in range(64) if (np.take(c, i, axis=1 - axis) == 0).all()]

    assert padded(a) == padded(b) == expected
    inner = (slice(before, before + content), slice(None)) if h < w else (slice(None), slice(before, before + content))
    assert np.abs(a - b)[inner].mean() < 8  # same content (resampling filters differ slightly)
    assert np.abs(ours[0].astype(int) - theirs[0].astype(int)).mean() < 8  # thumbnail: the whole image squashed


def test_views_from_one_full_resolution_image():
    img = photo(100, 200)  # 1:2 into 1×2 crops of 100 px: no padding
    kept = [0, 5, 9, 11]
    out = viz.draw_kept(img, kept, grid=(2, 2), views=(1, 2), alpha=ALPHA, gap=4)
    assert out.shape == (100, 100 + 4 + 200, 3)
    canvas = out[:, 104:]
    for t in range(4, 12):  # crop tokens on the canvas, against the image itself
        j, (y, x) = (t - 4) // 4, divmod(t % 4, 2)
        box = cell(y, x, 100, 100, (2, 2), ox=100 * j)
        ratio = canvas[box].mean() / img[box].mean()
        assert (ratio == 1.0) if t in kept else abs(ratio - (1 - ALPHA)) < 0.01


# ---------------------------------------------------------------------- frames
def test_frames_one_panel_per_frame():
    frames = [photo(80, 120, n) for n in ("coffee", "chelsea", "astronaut")]
    grid, gap = (4, 6), 8
    kept = set(np.random.default_rng(2).choice(72, 30, replace=False).tolist())
    out = viz.draw_kept(np.stack(frames), sorted(kept), grid=grid, frames=3, alpha=ALPHA, gap=gap)
    assert out.shape == (80, 3 * 120 + 2 * gap, 3)
    boxes, refs = {}, {}
    for t in range(72):
        f, (y, x) = t // 24, divmod(t % 24, 6)
        boxes[t] = cell(y, x, 80, 120, grid, ox=f * (120 + gap))
        refs[t] = frames[f][cell(y, x, 80, 120, grid)]
    check_cells(out, None, boxes, kept, refs)
    # two images per temporal patch: the first of each is shown
    six = [f for fr in frames for f in (fr, 255 - fr)]
    assert np.array_equal(
        viz.draw_kept(six, list(range(72)), grid=grid, frames=3, gap=gap),
        viz.draw_kept(frames, list(range(72)), grid=grid, frames=3, gap=gap),
    )
    # more than four frames wrap: five frames, four per row
    many = viz.draw_kept([frames[0]] * 5, [0], grid=grid, frames=5, gap=gap)
    assert many.shape == (2 * 80 + gap, 4 * 120 + 3 * gap, 3)


# ---------------------------------------------------------------------- merged tokens
def recovered_colours(out, img, boxes, tint):
    """The colour each cell was tinted with, solved from out = (1 - tint)·img + tint·colour."""
    return {
        t: ((out[b].astype(np.float64) - (1 - tint) * img[b]) / tint).reshape(-1, 3).mean(0) for t, b in boxes.items()
    }


@pytest.mark.parametrize("source", ["tome", "hand"])
def test_merged_groups_share_one_colour(source):
    img = photo(240, 320)
    grid, tint = (6, 8), 0.5
    if source == "tome":
        vt = VisualTokens(torch.randn(1, 48, 16, generator=torch.Generator().manual_seed(3)), grid=grid)
        sel = vtc.create_reducer("tome")(vt, 12)
        assignment = sel.assignment[0].numpy()
        out = viz.draw_kept(img, sel, grid=grid, alpha=ALPHA, tint=tint)
    else:  # spatial blocks of 2×2 cells, one row of cells dropped
        ys, xs = np.divmod(np.arange(48), 8)
        assignment = (ys // 2) * 4 + xs // 2
        assignment[ys == 5] = -1
        out = viz.draw_kept(img, None, grid=grid, assignment=assignment, alpha=ALPHA, tint=tint)
    boxes = {y * 8 + x: cell(y, x, 240, 320, grid) for y in range(6) for x in range(8)}
    dropped = {t for t in boxes if assignment[t] < 0}
    for t in dropped:
        assert abs(out[boxes[t]].mean() - (1 - ALPHA) * img[boxes[t]].mean()) <= 0.6
    col = recovered_colours(out, img, {t: b for t, b in boxes.items() if t not in dropped}, tint)
    palette = viz.group_colors(int(assignment.max()) + 1).astype(np.float64)
    for t, c in col.items():
        assert np.abs(c - palette[assignment[t]]).max() < 1.5, f"cell {t} is not its group's colour"
    same = {(a, b) for a in col for b in col if assignment[a] == assignment[b]}
    close = {(a, b) for a in col for b in col if np.abs(col[a] - col[b]).max() < 3}
    assert same == close  # one colour per group, different groups different colours
    if source == "hand":  # group outlines sit on borders between groups, not inside a group
        edge_x = [round(i * 320 / 8) for i in range(9)]
        row = round(0.5 * 240 / 6)
        assert tuple(out[row, edge_x[2] - 1]) == viz.GROUP_EDGE_COLOR  # right border of cell 1, group 0 | 1
        assert tuple(out[row, edge_x[1] - 1]) != viz.GROUP_EDGE_COLOR  # cell 0 | cell 1, both group 0


def test_group_colours_are_distinct():
    c = viz.group_colors(64).astype(int)
    d = np.abs(c[:, None] - c[None]).max(-1) + np.eye(64, dtype=int) * 255
    assert d.min() >= 10


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(kept=[0, 48], grid=(6, 8)), ValueError, "kept index 48 is out of range for N=48"),
        (dict(kept=[-1, 3], grid=(6, 8)), ValueError, "kept index -1 is out of range"),
        (dict(kept=np.ones(50, bool), grid=(6, 8)), ValueError, "has 48 cells but the selection has N=50"),
        (dict(kept=None, assignment=np.zeros(40, int), grid=(6, 8)), ValueError, "has 48 cells but .* N=40"),
        (dict(kept=[1, 2]), ValueError, "pass grid=\\(h, w\\)"),
        (dict(kept=np.ones(50, bool)), ValueError, "N=50 tokens are not 1 square grid"),
        (dict(kept=[0.5, 1.0], grid=(6, 8)), TypeError, "integer token indices"),
        (dict(kept=[[0, 1], [2, 3]], grid=(6, 8)), ValueError, "must be 1-D"),
        (dict(kept=None, assignment=np.full(48, -2), grid=(6, 8)), ValueError, "assignment holds -2"),
        (dict(kept=None), ValueError, "nothing to draw"),
        (dict(kept=[0], grid=(6, 8), alpha=1.5), ValueError, "alpha=1.5"),
        (dict(kept=[0], grid=(0, 8)), ValueError, "grid must have h, w >= 1"),
        (dict(kept=[0], grid=(6, 8), views=(2, 2), frames=2), ValueError, "not both"),
        (dict(kept=[0], grid=(6, 8), views=(2, 2), images=3), ValueError, "one full-resolution image or 5 views"),
        (dict(kept=[0], grid=(6, 8), frames=2, images=5), ValueError, "frames=2 needs 2 images"),
        (dict(kept=[0], grid=(6, 8), images=2), ValueError, "pass frames=T"),
    ],
)
def test_bad_inputs_name_the_problem(kwargs, err, match):
    n = kwargs.pop("images", 1)
    img = photo(48, 64)
    with pytest.raises(err, match=match):
        viz.draw_kept(img if n == 1 else [img] * n, **kwargs)


def test_bad_selection_sample():
    sel = Selection(torch.zeros(1, 2, 4), torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="sample=3 is out of range"):
        viz.draw_kept(photo(48, 64), sel, grid=(2, 2), sample=3)


# ---------------------------------------------------------------------- real models, end to end
def test_llava_kept_tokens_equal_the_reducer_on_the_towers_tokens():
    model = tiny_llava()  # 32 px, 8×8 tokens
    img = data.astronaut()
    k = viz.kept_tokens(model, img, "what is this?", "divprune", 10)
    with torch.no_grad():  # the tower's projected tokens, computed here (no adapter code)
        hs = model.model.vision_tower(k.inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        ref = vtc.create_reducer("divprune")(model.model.multi_modal_projector(hs), 10)
    assert (k.grid, k.views, k.frames, k.num_tokens) == ((8, 8), None, None, 64)
    assert np.flatnonzero(k.kept).tolist() == ref.indices[0].tolist()
    seen = k.images[0]  # what the model saw: the square, CLIP-processed image
    assert seen.shape == (32, 32, 3) and np.abs(seen.astype(int) - photo(32, 32, "astronaut")).mean() < 10
    out = k.draw(size=128, alpha=ALPHA)
    big = cv2.resize(seen, (128, 128), interpolation=cv2.INTER_CUBIC)
    check_cells(
        out,
        big,
        {y * 8 + x: cell(y, x, 128, 128, (8, 8)) for y in range(8) for x in range(8)},
        set(ref.indices[0].tolist()),
    )
    full = viz.visualize(model, img, "what is this?", "divprune", 10, size=128)
    assert full.shape == (26 + 128, 128, 3)  # caption band + image


def test_llava_through_a_processor_with_a_tokenizer():
    """A processor built here (word-level tokenizer, no download) expands <image> itself; same pixels, same picks."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<image>", "<unk>", "what", "is", "this", "?"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},  # one token, not split by the pre-tokenizer
    )
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    model = tiny_llava()
    k = viz.kept_tokens(model, data.astronaut(), "what is this ?", "divprune", 10, processor=proc)
    assert k.inputs["input_ids"][0].tolist() == [3] * 64 + [5, 6, 7, 8]
    k2 = viz.kept_tokens(model, data.astronaut(), "what is this ?", "divprune", 10)  # the stand-in path
    assert np.array_equal(k.kept, k2.kept) and np.array_equal(k.images[0], k2.images[0])


def test_in_llm_fastv_draws_the_tokens_alive_after_its_layer():
    model = tiny_llava(attn="eager")
    k = viz.kept_tokens(model, data.chelsea(), "the cat?", "fastv", 16, layer=2)
    with torch.no_grad():  # FastV's rule from the eager attention map of layer K-1 = 1 (no adapter code)
        att = model(**k.inputs, output_attentions=True).attentions[1][0]  # [H, L, L]
    cols = (k.inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(-1)
    score = att[:, -1, cols].mean(0)
    assert k.selection is None and np.flatnonzero(k.kept).tolist() == sorted(score.topk(16).indices.tolist())


def test_pre_llm_reducer_then_in_llm_stage():
    """divprune before the LLM, then FastV inside it on the tokens that entered (`in_llm=`)."""
    model = tiny_llava(attn="eager")
    k = viz.kept_tokens(model, data.chelsea(), "the cat?", "divprune", 24, in_llm="fastv", in_llm_budget=8)
    ids = k.inputs["input_ids"][0]
    with torch.no_grad():  # reference without adapter code: the reduced sequence at original positions
        hs = model.model.vision_tower(k.inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        tok = model.model.multi_modal_projector(hs)  # [1, 64, D]
        pre = vtc.create_reducer("divprune")(tok, 24).indices[0]
        img_cols = (ids == model.config.image_token_id).nonzero().squeeze(-1)
        emb = model.get_input_embeddings()(ids[None]).clone()
        emb[0, img_cols] = tok[0]
        text_cols = (ids != model.config.image_token_id).nonzero().squeeze(-1)
        cols = torch.cat([text_cols, img_cols[pre]]).sort().values
        att = model.model.language_model(
            inputs_embeds=emb[:, cols], position_ids=cols[None], output_attentions=True
        ).attentions[1][0]  # [H, L', L'] layer K-1 = 1
        vis = torch.isin(cols, img_cols[pre]).nonzero().squeeze(-1)  # reduced-sequence columns of the 24 tokens
        top = pre[att[:, -1, vis].mean(0).topk(8).indices]
    assert np.flatnonzero(k.kept).tolist() == sorted(top.tolist())


def test_llava_next_views_and_unpadding():
    model = tiny_llava_next()  # 16 px views of 4×4 tokens, pinpoints up to 2×2 crops
    img = data.coffee()  # 400 × 600 → 2×2 crops; unpadding removes canvas rows 0 and 7
    k = viz.kept_tokens(model, img, None, "divprune", 20)
    assert (k.grid, k.views, k.num_tokens, len(k.images)) == ((4, 4), (2, 2), 80, 5)
    pv, sizes = k.inputs["pixel_values"], k.inputs["image_sizes"]
    with torch.no_grad():
        hs = model.model.vision_tower(pv[0, :5], output_hidden_states=True).hidden_states[-2][:, 1:]
        tokens = model.model.multi_modal_projector(hs).reshape(1, 80, -1)
        idx = torch.arange(80, dtype=torch.float32).reshape(5, 16, 1)
        packed, _ = model.model.pack_image_features([idx], sizes, "default", torch.tensor([-1.0]))
        present = {int(v) for v in packed[0][:, 0] if v >= 0}  # tokens the stock model keeps after unpadding
        valid = torch.isin(torch.arange(80), torch.tensor(sorted(present)))[None]
        ref = vtc.create_reducer("divprune")(vtc.VisualTokens(tokens, valid=valid), 20).indices[0].tolist()
    assert len(present) == 16 + 6 * 8
    assert np.flatnonzero(k.kept).tolist() == ref and set(ref) <= present  # 20 real tokens, none unpadded away
    out = k.draw(size=32, gap=4, alpha=ALPHA)
    assert out.shape == (64, 32 + 4 + 64, 3)


def test_qwen2_vl_image_and_video_frames():
    model = tiny_qwen2_vl()  # patch 4, 2×2 merge: one token per 8×8 pixels
    img = photo(64, 96, "chelsea")  # already a multiple of 8 within the pixel range: no resize
    k = viz.kept_tokens(model, img, "cat?", "divprune", 12)
    assert (k.grid, k.frames, k.num_tokens) == ((8, 12), None, 96)
    assert np.abs(k.images[0].astype(int) - img).max() <= 1  # the patches folded back are the image
    with torch.no_grad():
        tok = model.model.get_image_features(
            pixel_values=k.inputs["pixel_values"], image_grid_thw=k.inputs["image_grid_thw"]
        ).pooler_output[0]
    assert np.flatnonzero(k.kept).tolist() == vtc.create_reducer("divprune")(tok[None], 12).indices[0].tolist()
    frames = [photo(64, 96, n) for n in ("chelsea", "chelsea", "coffee", "coffee")]
    kv = viz.kept_tokens(model, frames, "what happens?", "tome", 30)
    assert (kv.grid, kv.frames, kv.num_tokens, kv.num_kept) == ((8, 12), 2, 192, 30)
    assert np.abs(kv.images[1].astype(int) - frames[2]).max() <= 1  # temporal patch 1 starts at frame 2
    out = kv.draw(gap=8)
    assert out.shape == (64, 2 * 96 + 8, 3)


def test_encoder_path_with_anyres_views():
    import timm

    torch.manual_seed(0)
    enc = timm.create_model("test_vit", pretrained=False, depth=2, img_size=64).eval()
    k = viz.kept_tokens(enc, data.coffee(), None, "fastervlm", 12, views=(1, 2))
    assert (k.views, len(k.images), k.num_tokens) == ((1, 2), 3, 3 * k.grid[0] * k.grid[1])
    sel = vtc.encode_and_reduce(enc, k.inputs["images"], "fastervlm", 12, views=(1, 2))
    assert np.flatnonzero(k.kept).tolist() == sel.indices[0].tolist()
    with pytest.raises(TypeError, match="no text side"):
        viz.kept_tokens(enc, data.coffee(), "a question", "mmtok", 12)


def test_command_line(tmp_path):
    src = tmp_path / "in.png"
    cv2.imwrite(str(src), data.astronaut()[..., ::-1])
    parser = argparse.ArgumentParser(prog="vtc")
    viz.add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(
        [
            "viz",
            "--image",
            str(src),
            "--method",
            "random",
            "--budget",
            "0.1",
            "--out",
            str(tmp_path / "o.png"),
            "--size",
            "192",
        ]
    )
    assert args.func is viz.main and args.budget == 0.1
    assert args.func(args) == 0
    out = cv2.imread(str(tmp_path / "o.png"))
    assert out.shape == (26 + 192, 192, 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["viz", "--image", str(src), "--budget", "many"])


def test_command_line_with_a_saved_model(tmp_path):
    model = tiny_llava()
    model.save_pretrained(tmp_path / "m")  # safetensors + config, no processor files: the stand-in inputs
    src = tmp_path / "in.png"
    cv2.imwrite(str(src), data.astronaut()[..., ::-1])
    argv = ["--image", str(src), "--model", str(tmp_path / "m"), "--budget", "8", "--out", str(tmp_path / "o.png")]
    with pytest.warns(UserWarning, match="no processor"):
        assert viz.main([*argv, "--size", "64", "--numbers"]) == 0
    expected = viz.visualize(model, data.astronaut(), None, "divprune", 8, size=64, numbers=True)
    assert np.array_equal(cv2.imread(str(tmp_path / "o.png"))[..., ::-1], expected)


def test_video_file_frames_and_a_model_without_video_support(tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    levels = [20 * i for i in range(10)]
    for v in levels:  # frame i is a flat grey of level 20·i
        writer.write(np.full((48, 64, 3), v, np.uint8))
    writer.release()
    frames = viz.read_video(str(path), 4)  # evenly spaced: frames 0, 3, 6, 9
    assert [round(float(f.mean()) / 20) for f in frames] == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="needs a model that takes videos"):
        viz.main(["--video", str(path), "--num-frames", "2", "--out", str(tmp_path / "v.png")])
