"""LLaVA-1.5 adapter on a tiny model built from config: identity, exact pre-LLM logits, cache, batching, restore."""

from __future__ import annotations

import pytest
import torch
from tiny_models import IMAGE_TOKEN, llava_batch, tiny_llava
from vtc.adapters import adapter_of

import vtc
from vtc.reducers import get_reducer_class

PROMPTS = [[10, 11, 12, 13], [14, 15], [16, 17, 18]]
PRE_LLM = [
    n
    for n in vtc.list_reducers()
    if get_reducer_class(n).stage == "pre_llm" and "views" not in get_reducer_class(n).requires
]


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def _gen(m, batch, **kw):
    with torch.no_grad():
        return m.generate(**batch, max_new_tokens=5, do_sample=False, **kw)


@pytest.mark.parametrize("name", PRE_LLM)
def test_full_budget_generates_the_same_tokens(model, name):
    batch = llava_batch(model, PROMPTS)
    ref = _gen(model, batch)
    with vtc.compressed(model, name, budget=1.0):
        out = _gen(model, batch)
    assert torch.equal(ref, out)


def _reference_logits(m, batch, b, keep_cols, tokens):
    """The unpatched language model fed sample b's kept embeddings at their original positions (no padding)."""
    ids, mask = batch["input_ids"][b], batch["attention_mask"][b].bool()
    emb = m.get_input_embeddings()(ids).clone()
    img_cols = (ids == IMAGE_TOKEN).nonzero().squeeze(-1)
    emb[img_cols[keep_cols]] = tokens
    keep = mask.clone()
    keep[img_cols] = False
    keep[img_cols[keep_cols]] = True
    pos = (mask.long().cumsum(-1) - 1)[keep]
    out = m.model.language_model(inputs_embeds=emb[keep][None], position_ids=pos[None])
    return m.lm_head(out.last_hidden_state)[0]


@pytest.mark.parametrize("name", ["downsample", "random"])
def test_pre_llm_logits_equal_the_language_model_on_kept_tokens(model, name):
    batch = llava_batch(model, PROMPTS)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        feats = torch.stack(list(feats))  # [B, N, D]
        reducer = vtc.create_reducer(name, **({"seed": 7} if name == "random" else {}))
        sel = reducer(feats, budget=10)
        with vtc.compressed(model, reducer, budget=10):
            logits = model(**batch).logits  # [B, L', V] over the reduced, re-left-padded sequences
        for b in range(len(PROMPTS)):
            ref = _reference_logits(model, batch, b, sel.indices[b], sel.tokens[b])
            torch.testing.assert_close(logits[b, -ref.shape[0] :], ref, atol=1e-5, rtol=1e-4)


def test_merged_tokens_sit_at_their_first_source(model):
    if "matryoshka" not in vtc.list_reducers():
        pytest.skip("matryoshka not registered")
    batch = llava_batch(model, PROMPTS[:1])
    with torch.no_grad():
        feats = torch.stack(list(model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output))
        sel = vtc.create_reducer("matryoshka")(feats, budget=16)  # 8x8 → 4x4 bins of 2x2
        with vtc.compressed(model, "matryoshka", budget=16):
            logits = model(**batch).logits
    first = torch.tensor([r * 16 + c * 2 for r in range(4) for c in range(4)])  # top-left cell of every 2x2 bin
    ref = _reference_logits(model, batch, 0, first, sel.tokens[0])
    torch.testing.assert_close(logits[0], ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("positions", ["original", "renumber"])
def test_cache_decoding_equals_no_cache(model, positions):
    batch = llava_batch(model, PROMPTS)
    with vtc.compressed(model, "fastervlm", budget=12, positions=positions):
        a = _gen(model, batch, use_cache=True)
        b = _gen(model, batch, use_cache=False)
    assert torch.equal(a, b)


def test_batch_equals_single_runs_and_counts(model):
    batch = llava_batch(model, PROMPTS)
    with vtc.compressed(model, "fastervlm", budget=9):
        full = _gen(model, batch)
        assert adapter_of(model).last["kept"] == [9, 9, 9]
        for b in range(len(PROMPTS)):
            one = llava_batch(model, [PROMPTS[b]])
            one["pixel_values"] = batch["pixel_values"][b : b + 1]
            out = _gen(model, one)
            n = out.shape[1]
            assert torch.equal(full[b, -n:], out[0])


def test_several_images_per_prompt(model):
    batch = llava_batch(model, PROMPTS[:2], images_per_prompt=2)
    with vtc.compressed(model, "downsample", budget=4):
        out = _gen(model, batch)
        a = adapter_of(model)
        assert a.last["kept"] == [4, 4, 4, 4] and a.last["num_visual_in"] == 4 * 64
    assert out.shape[0] == 2


def test_restore_and_other_instances_untouched(model):
    other = tiny_llava(seed=1)
    batch = llava_batch(model, PROMPTS)
    with torch.no_grad():
        ref_logits = model(**batch).logits
        ref_other = other(**batch).logits
        vtc.compress(model, "random", budget=8)
        assert "forward" not in other.__dict__
        assert torch.equal(other(**batch).logits, ref_other)
        assert model(**batch).logits.shape[1] < ref_logits.shape[1]
        with pytest.raises(RuntimeError, match="already compressed"):
            vtc.compress(model, "random", budget=8)
        vtc.restore(model)
        assert "forward" not in model.__dict__
        assert torch.equal(model(**batch).logits, ref_logits)
        with pytest.raises(RuntimeError, match="not compressed"):
            vtc.restore(model)


def test_context_manager_restores_on_error(model):
    with pytest.raises(ZeroDivisionError):
        with vtc.compressed(model, "random", budget=8):
            raise ZeroDivisionError
    assert "forward" not in model.__dict__


def test_captured_cls_attention_matches_eager_attention(model):
    """The hook-computed CLS logits, softmaxed, equal the attention probabilities of an eager run."""
    from vtc.adapters.llava import LlavaAdapter

    batch = llava_batch(model, PROMPTS[:2])
    tower = model.model.vision_tower
    adapter = LlavaAdapter(model, vtc.create_reducer("fastervlm"), 8, vtc.adapters.base.AdapterConfig())
    with torch.no_grad():
        vt = adapter.encode(batch["pixel_values"], {})[0]
        tower.config._attn_implementation = "eager"
        try:
            att = tower(batch["pixel_values"], output_attentions=True).attentions[-2]  # layer producing hs[-2]
        finally:
            tower.config._attn_implementation = "sdpa"
    probs = att[:, :, 0, 1:]  # CLS row over patches, [B, H, N]
    # Softmax over patches only renormalises the row without the CLS column.
    torch.testing.assert_close(vt.cls_attn.softmax(-1), probs / probs.sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)
    assert vt.grid == (8, 8) and vt.features.shape == (2, 64, 32)


def test_unsupported_model_and_bad_options(model):
    with pytest.raises(TypeError, match="supported model classes: .*LlavaForConditionalGeneration"):
        vtc.compress(torch.nn.Linear(2, 2), "random", budget=4)
    with pytest.raises(ValueError, match="positions='middle'"):
        vtc.compress(model, "random", budget=4, positions="middle")
    with pytest.raises(TypeError, match="not_a_field"):
        vtc.compress(model, "random", budget=4, not_a_field=1)
    assert "forward" not in model.__dict__
