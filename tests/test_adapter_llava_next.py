"""LLaVA-NeXT (AnyRes) adapter on a tiny model built from config: identity, exact pre-LLM logits against a packed
layout built independently from the stock `pack_image_features`, budgets of real (unpadded) tokens for every
pre-LLM reducer, cache, batching, restore, GlobalCom² end to end."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import IMAGE_TOKEN, llava_next_batch, tiny_llava_next
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches
from vtc.adapters import adapter_of

import vtc
from vtc.reducers import get_reducer_class
from vtc.types import VisualTokens

PROMPTS = [[10, 11, 12, 13], [14, 15], [16, 17, 18]]
# (height, width) → crops and unpadding of the 8×8 / 4×8 / 8×4 token canvas (4×4 tokens per view):
# (30, 40): 2×2, rows 0 and 7 removed; (12, 40): 1×2, rows 0 and 3 removed; (40, 30): 2×2, columns 0 and 7 removed.
SIZES = [(30, 40), (12, 40), (40, 30)]
PRE_LLM = [n for n in vtc.list_reducers() if get_reducer_class(n).stage == "pre_llm"]


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next()


@pytest.fixture(scope="module")
def pair(model):
    """Two prompts (left padded) whose images differ in crop layout and unpadding, and their stock generation."""
    batch = llava_next_batch(model, SIZES[:2], PROMPTS[:2])
    return batch, _gen(model, batch)


def _gen(m, batch, **kw):
    with torch.no_grad():
        return m.generate(**batch, max_new_tokens=5, do_sample=False, **kw)


@pytest.mark.parametrize("name", PRE_LLM)
def test_full_budget_generates_the_same_tokens(model, pair, name):
    batch, ref = pair
    with vtc.compressed(model, name, budget=1.0):
        out = _gen(model, batch)
        # Everything the stock model packs is kept: all thumbnail and unpadded crop tokens.
        assert adapter_of(model).last["kept"] == [16 + 6 * 8, 16 + 2 * 8]
    assert torch.equal(ref, out)


# ---------------------------------------------------------------------- independent reference
def _views(m, batch, b):
    """`VisualTokens` of image b, computed here from the vision tower and the projector (no adapter code); `valid`
    marks the tokens the stock packing keeps."""
    vc = m.config.vision_config
    sizes = batch["image_sizes"]
    v = image_size_to_num_patches(sizes[b], m.config.image_grid_pinpoints, vc.image_size)
    hs = m.model.vision_tower(batch["pixel_values"][b, :v], output_hidden_states=True).hidden_states[-2][:, 1:]
    tokens = m.model.multi_modal_projector(hs)  # [V, hw, D]
    views = tuple(get_anyres_image_grid_shape(sizes[b], m.config.image_grid_pinpoints, vc.image_size))
    side = vc.image_size // vc.patch_size
    n = tokens.shape[0] * tokens.shape[1]
    valid = torch.zeros(1, n, dtype=torch.bool)
    valid[0, [i for i in _packed_index(m, batch, b, n) if i >= 0]] = True
    return VisualTokens(tokens.reshape(1, -1, tokens.shape[-1]), grid=(side, side), views=views, valid=valid)


def _packed_index(m, batch, b, n):
    """Reducer index held by every placeholder of image b (-1: newline), from the stock packing of index values."""
    vc = m.config.vision_config
    hw = (vc.image_size // vc.patch_size) ** 2
    idx = torch.arange(n, dtype=torch.float32).reshape(n // hw, hw, 1)
    packed, _ = m.model.pack_image_features([idx], batch["image_sizes"][b : b + 1], "default", torch.tensor([-1.0]))
    return [int(x) for x in packed[0][:, 0]]


def _reference_logits(m, batch, b, sel, j, n):
    """The unpatched language model fed sample b's kept embeddings at their original positions (no padding).

    Placement, written out plainly: a pruned token sits at the placeholder that holds its index in the stock
    packed layout (dropped if the layout has none); a merged token at its first such source; a newline is kept
    iff its packed row keeps a token. Also returns the number of visual tokens placed and how many of the
    outputs were dropped or moved off their first source because unpadding removed it.
    """
    pack = _packed_index(m, batch, b, n)
    in_run = set(pack) - {-1}
    placed, affected = {}, 0
    rows = sel.tokens[j][sel.mask[j]]
    if sel.indices is not None:
        for i, tok in zip(sel.indices[j][sel.mask[j]].tolist(), rows, strict=True):
            if i in in_run:
                placed[i] = tok
            affected += i not in in_run
    else:
        a = sel.assignment[j].tolist()
        for r, tok in enumerate(rows):
            sources = [i for i in range(n) if a[i] == r]
            present = [i for i in sources if i in in_run]
            if present:
                placed[min(present)] = tok
            affected += min(sources) not in in_run
    ids, mask = batch["input_ids"][b], batch["attention_mask"][b].bool()
    emb = m.get_input_embeddings()(ids).clone()
    img_cols = (ids == IMAGE_TOKEN).nonzero().squeeze(-1).tolist()
    assert len(img_cols) == len(pack)
    hw = (m.config.vision_config.image_size // m.config.vision_config.patch_size) ** 2
    keep = mask.clone()
    row_has_token = False
    for p, (c, i) in enumerate(zip(img_cols, pack, strict=True)):
        if p == hw:  # the thumbnail (no newline) ends, the first crop row starts
            row_has_token = False
        if i >= 0:
            keep[c] = i in placed
            if i in placed:
                emb[c] = placed[i]
                row_has_token = True
        else:
            keep[c] = row_has_token
            emb[c] = m.model.image_newline
            row_has_token = False
    pos = (mask.long().cumsum(-1) - 1)[keep]
    out = m.model.language_model(inputs_embeds=emb[keep][None], position_ids=pos[None])
    return m.lm_head(out.last_hidden_state)[0], len(placed), affected


def test_reference_views_match_the_stock_packing(model):
    """The test's own tokens, put where `_packed_index` says, are exactly the stock packed features."""
    batch = llava_next_batch(model, SIZES, PROMPTS)
    with torch.no_grad():
        packed = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
        for b in range(len(SIZES)):
            vt = _views(model, batch, b)
            pack = torch.tensor(_packed_index(model, batch, b, vt.tokens.shape[1]))
            torch.testing.assert_close(packed[b][pack >= 0], vt.tokens[0, pack[pack >= 0]])
            assert torch.equal(packed[b][pack < 0], model.model.image_newline.expand(int((pack < 0).sum()), -1))


def _real_budget(m, batch, b, n, budget):
    """Tokens image b must keep: the budget resolved against its real tokens (those the stock packing keeps)."""
    real = sum(i >= 0 for i in _packed_index(m, batch, b, n))
    return min(budget, real) if isinstance(budget, int) else max(1, math.floor(budget * real + 0.5))


@pytest.mark.parametrize(
    ("name", "budget"), [("downsample", 20), ("random", 0.3), ("matryoshka", 0.2), ("divprune", 9)]
)
def test_pre_llm_logits_equal_the_language_model_on_kept_tokens(model, name, budget):
    """Reducers that need only the tokens: the selection made here on independently built views (`valid` from the
    stock packing) is the adapter's, every image keeps exactly its budget of real tokens, and the logits equal
    the language model's on those tokens."""
    batch = llava_next_batch(model, SIZES, PROMPTS)  # three different layouts: one reducer call per image
    reducer = vtc.create_reducer(name, **({"seed": 7} if name == "random" else {}))
    with torch.no_grad():
        with vtc.compressed(model, reducer, budget=budget):
            logits = model(**batch).logits  # [B, L', V] over the reduced, re-left-padded sequences
            kept = adapter_of(model).last["kept"]
        for b in range(len(SIZES)):
            vt = _views(model, batch, b)
            n = vt.tokens.shape[1]
            sel = reducer(vt, budget=budget)
            ref, n_placed, hit = _reference_logits(model, batch, b, sel, 0, n)
            torch.testing.assert_close(logits[b, -ref.shape[0] :], ref, atol=1e-5, rtol=1e-4)
            assert kept[b] == n_placed == _real_budget(model, batch, b, n, budget)
            assert hit == 0  # no output sits on (or starts at) a token that unpadding removes


# 2×2 crops with rows 0, 7 removed (64 real tokens) and with columns 0, 1, 6, 7 removed (48) share one reducer call;
# then 1×2 crops with rows 0, 3 removed (32).
UNPADDED = [(30, 40), (40, 24), (12, 40)]


@pytest.mark.parametrize("budget", [40, 0.25])
@pytest.mark.parametrize("name", PRE_LLM)
def test_every_image_keeps_its_budget_of_real_tokens(model, name, budget):
    """Every pre-LLM reducer, on non-square images whose unpadding differs within one reducer call: each image keeps
    exactly its budget of real tokens (adaptive methods: at most, at least one), none that unpadding removes (no
    kept index, no merged source), and the logits equal the language model's on the kept tokens."""
    batch = llava_next_batch(model, UNPADDED, PROMPTS)
    torch.manual_seed(0)
    with torch.no_grad():
        with vtc.compressed(model, name, budget=budget):
            logits = model(**batch).logits
            last = adapter_of(model).last
        sels = [(sel, j) for sel in last["selections"] for j in range(sel.tokens.shape[0])]
        assert len(last["selections"]) == 2 and len(sels) == 3
        for b, (sel, j) in enumerate(sels):
            n = 16 * (5, 5, 3)[b]  # thumbnail + crops of 4×4 tokens
            in_run = {i for i in _packed_index(model, batch, b, n) if i >= 0}
            k = _real_budget(model, batch, b, n, budget)
            if sel.indices is None:
                sources = (sel.assignment[j] >= 0).nonzero().squeeze(-1)
            else:
                sources = sel.indices[j][sel.mask[j]]
            assert set(sources.tolist()) <= in_run, "a kept or merged token was removed by unpadding"
            ref, n_placed, hit = _reference_logits(model, batch, b, sel, j, n)
            assert hit == 0 and last["kept"][b] == n_placed == int(sel.num_kept[j])
            if get_reducer_class(name).adaptive:
                assert 1 <= n_placed <= k
            else:
                assert n_placed == k
            torch.testing.assert_close(logits[b, -ref.shape[0] :], ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("positions", ["original", "renumber"])
def test_cache_decoding_equals_no_cache(model, positions):
    batch = llava_next_batch(model, SIZES, PROMPTS)
    with vtc.compressed(model, "fastervlm", budget=12, positions=positions):
        a = _gen(model, batch, use_cache=True)
        b = _gen(model, batch, use_cache=False)
    assert torch.equal(a, b)


def test_batch_equals_single_runs_and_groups_by_layout(model):
    sizes = [SIZES[0], SIZES[2], SIZES[1]]  # 2×2, 2×2, 1×2: the first two share one reducer call
    batch = llava_next_batch(model, sizes, PROMPTS)
    with vtc.compressed(model, "fastervlm", budget=16):
        full = _gen(model, batch)
        sels = adapter_of(model).last["selections"]
        assert [s.tokens.shape[0] for s in sels] == [2, 1]
        for b in range(len(PROMPTS)):
            one = llava_next_batch(model, [sizes[b]], [PROMPTS[b]])
            one["pixel_values"] = batch["pixel_values"][b : b + 1]
            out = _gen(model, one)
            assert torch.equal(full[b, -out.shape[1] :], out[0])


def test_globalcom2_end_to_end(model, pair):
    batch, _ = pair
    with torch.no_grad(), vtc.compressed(model, "globalcom2", budget=0.25):
        out = _gen(model, batch)
        logits = model(**batch).logits
        last = adapter_of(model).last
    assert out.shape == (2, batch["input_ids"].shape[1] + 5)
    assert len(last["selections"]) == 2  # one reducer call per image (different layouts)
    for b, sel in enumerate(last["selections"]):
        n = (1 + 2 * (2 - b)) * 16  # 2×2 then 1×2 crops of 4×4 tokens, plus the thumbnail
        k = _real_budget(model, batch, b, n, 0.25)  # a quarter of the real (unpadded) tokens
        assert int(sel.num_kept[0]) == k and "counts" in sel.info
        ref, n_placed, hit = _reference_logits(model, batch, b, sel, 0, n)
        assert last["kept"][b] == n_placed == k and hit == 0
        torch.testing.assert_close(logits[b, -ref.shape[0] :], ref, atol=1e-5, rtol=1e-4)


def test_restore_gives_identical_outputs(model, pair):
    batch, ref = pair
    with torch.no_grad():
        ref_logits = model(**batch).logits
        vtc.compress(model, "random", budget=8)
        assert model(**batch).logits.shape[1] < ref_logits.shape[1]
        vtc.restore(model)
        assert "forward" not in model.__dict__
        assert torch.equal(model(**batch).logits, ref_logits)
    assert torch.equal(_gen(model, batch), ref)


def test_captured_cls_attention_per_view_matches_eager_attention(model):
    """The adapter's per-image `cls_attn` `[H, V*hw]` is the eager CLS attention of each view, views in order."""
    from vtc.adapters.base import AdapterConfig
    from vtc.adapters.llava_next import LlavaNextAdapter

    batch = llava_next_batch(model, SIZES[:2], PROMPTS[:2])
    tower = model.model.vision_tower
    adapter = LlavaNextAdapter(model, vtc.create_reducer("fastervlm"), 8, AdapterConfig())
    with torch.no_grad():
        groups = adapter.encode(batch["pixel_values"], {"image_sizes": batch["image_sizes"]})
        tower.config._attn_implementation = "eager"
        try:
            for b, vt in enumerate(groups):
                assert vt.views == ((2, 2), (1, 2))[b] and vt.grid == (4, 4)
                v = vt.num_views()
                att = tower(batch["pixel_values"][b, :v], output_attentions=True).attentions[-2]  # [V, H, S, S]
                probs = att[:, :, 0, 1:]
                probs = probs / probs.sum(-1, keepdim=True)  # [V, H, hw]
                mine = vt.cls_attn[0].reshape(vt.cls_attn.shape[1], v, -1).softmax(-1).transpose(0, 1)
                torch.testing.assert_close(mine, probs, atol=1e-5, rtol=1e-4)
                assert vt.features.shape == (1, v * 16, 32) and vt.keys.shape == (1, v * 16, 32)
        finally:
            tower.config._attn_implementation = "sdpa"


def test_layout_rule(model):
    """Columns of the reducer's tokens in the packed run, and the newline of each row, for one unpadded image."""
    from vtc.adapters.llava_next import anyres_layout

    lay = anyres_layout((1, 2), (4, 4), [12, 40])  # canvas 4×8, rows 0 and 3 removed
    assert lay.length == 16 + 2 * 9
    crop0 = lay.column[16:32].reshape(4, 4)  # left crop
    crop1 = lay.column[32:48].reshape(4, 4)
    assert (crop0[[0, 3]] == -1).all() and (crop1[[0, 3]] == -1).all()
    assert crop0[1].tolist() == [16, 17, 18, 19] and crop1[1].tolist() == [20, 21, 22, 23]
    assert crop0[2].tolist() == [25, 26, 27, 28] and crop1[2].tolist() == [29, 30, 31, 32]
    assert set(lay.newline[16:].tolist()) == {-1, 24, 33} and (lay.newline[:16] == -1).all()
