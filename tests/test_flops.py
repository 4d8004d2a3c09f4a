"""Analytic prefill FLOPs (vtc.eval.flops) against a brute-force count with torch's FlopCounterMode.

FlopCounterMode counts exactly the op classes the analytic model counts (matrix products, convolutions, SDPA) and
nothing else (norms, softmax, activations, RoPE are elementwise), and dense kernels compute the full attention
square, so with `causal=False` the two agree to the FLOP on the stock models. Through `vtc.compress` the count
also holds the cost of selecting tokens, which the analytic count leaves out on purpose: the adapter's CLS-attention
substitute (LLaVA: the CLS query row of one CLIP layer, `2·C·S` per view; Qwen, only for methods that use it:
mean-query attention of one vision block, `2·C·n²` per segment) and an in-LLM reducer's scores (FastV / PDrop: the
last query row against the keys of the layer before each stage, `2·heads·head_dim·L`). The tests check that the
difference is exactly that.
"""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from torch.utils.flop_counter import FlopCounterMode
from vtc.adapters import adapter_of
from vtc.eval.flops import attention_pairs, last_prefill_tokens, prefill_flops, stock_visual_tokens, visual_schedule

import vtc


def _measure(model, inputs, **kw) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(**inputs, **kw)
    return fc.get_total_flops()


def _llava():
    m = tm.tiny_llava()
    return m, tm.llava_batch(m, [[7, 8, 9, 10]]), 1


def _llava_next():
    m = tm.tiny_llava_next()
    sizes = [(20, 36)]  # 1x2 crops, unpadded: the stock packed run has fewer than the 48 crop tokens
    return m, tm.llava_next_batch(m, sizes, [[7, 8, 9]]), sizes


def _qwen2_vl():
    m = tm.tiny_qwen2_vl()
    return m, tm.qwen_batch(m, [(1, 12, 20)], [[7, 8, 9]]), [(1, 12, 20)]


def _qwen2_5_vl():
    # a 2-frame video and an image whose merged grids (5x7, 4x6) leave partial windows at the edges
    m = tm.tiny_qwen2_5_vl()
    video, image = (2, 10, 14), (1, 8, 12)
    return m, tm.qwen_video_batch(m, [video], [image], [[7, 8]]), [image, video]


FAMILIES = {"llava": _llava, "llava_next": _llava_next, "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl}


def _text_and_visual(model, inputs) -> tuple[int, int]:
    ids = inputs["input_ids"]
    vis = int(((ids == tm.IMAGE_TOKEN) | (ids == tm.QWEN_VIDEO_TOKEN)).sum())
    return ids.shape[1] - vis, vis


def _selection_cost(model, images) -> int:
    """FLOPs the adapter spends on the CLS-attention substitute of one vision layer (see the module docstring)."""
    vc = model.config.vision_config
    if model.config.model_type == "llava":
        return 2 * vc.hidden_size * ((vc.image_size // vc.patch_size) ** 2 + 1) * images
    if model.config.model_type == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        views = sum(image_size_to_num_patches(s, model.config.image_grid_pinpoints, vc.image_size) for s in images)
        return 2 * vc.hidden_size * ((vc.image_size // vc.patch_size) ** 2 + 1) * views
    width = vc.embed_dim if model.config.model_type == "qwen2_vl" else vc.hidden_size
    return sum(2 * width * (h * w) ** 2 * t for t, h, w in images)  # a full-attention block: one segment per frame


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stock_prefill_matches_flop_counter(family):
    model, inputs, images = FAMILIES[family]()
    text, vis = _text_and_visual(model, inputs)
    assert stock_visual_tokens(model, images) == vis  # the analytic token count is the stock placeholder count
    f = prefill_flops(model, text, None, images=images, causal=False)
    assert f["total"] == _measure(model, inputs, logits_to_keep=1)
    assert f["total"] == f["vision"] + f["projector"] + f["llm"] > f["llm"] > 0
    assert f["llm"] == sum(f["llm_layers"]) + f["lm_head"]
    every = prefill_flops(model, text, None, images=images, causal=False, lm_head="all")
    assert every["total"] == _measure(model, inputs)  # logits of every position
    assert every["lm_head"] == f["lm_head"] * (text + vis)


def test_qwen2_5_window_attention_is_cheaper_than_full():
    model, _, images = _qwen2_5_vl()
    f = prefill_flops(model, 10, None, images=images)
    vc = model.config.vision_config
    full_blocks = len(vc.fullatt_block_indexes)
    per_frame = [h * w for t, h, w in images for _ in range(t)]
    all_full = vc.depth * sum(4 * vc.hidden_size * n * n for n in per_frame)
    assert f["vision_attention"] < all_full
    assert f["vision_attention"] > full_blocks * all_full // vc.depth


def test_pre_llm_reduction_matches_flop_counter():
    model, inputs, images = _llava()
    with vtc.compressed(model, "random", budget=13):
        measured = _measure(model, inputs, logits_to_keep=1)
        ((text, visual),) = last_prefill_tokens(model, inputs["input_ids"], inputs["attention_mask"])
    assert visual == [13] * 3 and text == inputs["input_ids"].shape[1] - 64
    f = prefill_flops(model, text, visual, images=images, causal=False)
    assert measured - f["total"] == _selection_cost(model, images)


@pytest.mark.parametrize("family,method", [("llava", "fastv"), ("qwen2_vl", "pdrop"), ("llava_next", "fastv")])
def test_in_llm_reduction_matches_flop_counter_up_to_the_scoring(family, method):
    model, inputs, images = FAMILIES[family]()
    budget = 5
    with vtc.compressed(model, method, budget=budget):
        measured = _measure(model, inputs, logits_to_keep=1)
        ((text, visual),) = last_prefill_tokens(model, inputs["input_ids"])
        plan = adapter_of(model).in_llm.plan
    _, vis = _text_and_visual(model, inputs)
    assert visual[0] == vis and visual[-1] < vis
    if family != "llava_next":  # (NeXT's row newlines are placeholders too)
        assert visual == visual_schedule(3, vis, plan) and visual[-1] == budget
    f = prefill_flops(model, text, visual, images=images, causal=False)
    tc = model.config.get_text_config()
    head_dim = tc.hidden_size // tc.num_attention_heads
    # each stage scores with the last query row against the keys of the layer before it
    scoring = sum(2 * tc.num_attention_heads * head_dim * (text + visual[layer - 1]) for layer, _ in plan)
    # LLaVA's CLS row is captured for every method; Qwen's P x P substitute only for methods that use it (not these)
    selection = _selection_cost(model, images) if family != "qwen2_vl" else 0
    assert measured - f["total"] == scoring + selection
    stock = prefill_flops(model, text, vis, images=images, causal=False)
    assert f["vision"] == stock["vision"] and f["llm"] < stock["llm"]


def test_causal_counts_the_lower_triangle_and_sliding_windows():
    from transformers import MistralConfig

    assert attention_pairs(5, causal=False) == 25 and attention_pairs(5) == 15
    assert attention_pairs(5, window=2) == 1 + 2 * 4  # the first query sees itself, the others two keys
    assert attention_pairs(5, window=9) == 15
    model, _, _ = _llava()
    tc = model.config.text_config
    full = prefill_flops(model, 10, [20, 20, 5], images=1, causal=False)
    causal = prefill_flops(model, 10, [20, 20, 5], images=1)
    gap = sum(4 * tc.hidden_size * (n * n - n * (n + 1) // 2) for n in (30, 30, 15))
    assert full["total"] - causal["total"] == gap == full["llm_attention"] - causal["llm_attention"]
    assert full["vision"] == causal["vision"]  # the vision tower attends both ways

    mc = MistralConfig(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        sliding_window=3,
    )
    m = prefill_flops(mc, 6, 0)
    assert m["llm_attention"] == 2 * 4 * 2 * 4 * attention_pairs(6, window=3)
    per_layer_linear = 2 * 6 * (8 * 2 * 4 + 2 * 8 * 1 * 4 + 2 * 4 * 8 + 3 * 8 * 16)
    assert m["llm_linear"] == 2 * per_layer_linear and m["vision"] == 0 and m["lm_head"] == 2 * 8 * 10


def test_schedule_batch_and_bad_input():
    assert visual_schedule(5, 100, [(2, 40), (4, 10)]) == [100, 100, 40, 40, 10]
    assert visual_schedule(3, 8, [(1, 20)]) == [8, 8, 8]  # a stage never adds tokens
    model, _, _ = _llava()
    one = prefill_flops(model, 10, 64, images=1)
    two = prefill_flops(model, 10, 64, images=1, batch=2)
    assert two["total"] == 2 * one["total"] and two["llm_layers"] == [2 * x for x in one["llm_layers"]]
    with pytest.raises(ValueError, match="3-layer LLM"):
        prefill_flops(model, 10, [64, 64], images=1)
    with pytest.raises(ValueError, match="text_tokens=-1"):
        prefill_flops(model, -1, 64, images=1)
    with pytest.raises(ValueError, match="lm_head='first'"):
        prefill_flops(model, 10, 64, images=1, lm_head="first")
    nxt, _, _ = _llava_next()
    with pytest.raises(ValueError, match=r"image sizes, images=\[\(height, width\)"):
        prefill_flops(nxt, 10, 64, images=2)
    with pytest.raises(TypeError, match="transformers model or config"):
        prefill_flops(object(), 10, 64)


@pytest.mark.parametrize("name", ["flextok", "one_d_piece", "karl"])
def test_tokenizer_tower_prefill_matches_flop_counter(name, tmp_path):
    from vtc.train import bridge

    tiny = dict(image_size=16, patch_size=4, width=32, enc_depth=2, dec_depth=1, num_heads=2, num_tokens=8)
    vtc.create_tokenizer(name, **tiny).save_pretrained(tmp_path / name)
    cfg = bridge.BridgeConfig(tokenizer=name, tokenizer_path=str(tmp_path / name), error=0.1 if name == "karl" else 0)
    model, processor, tok = bridge.build_bridge(cfg)
    model.eval()
    image = torch.zeros(16, 16, 3, dtype=torch.uint8).numpy()
    inputs = processor(images=[image], text=["<image> is there a red circle ?"], return_tensors="pt")
    vis = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert stock_visual_tokens(model, 1) == vis == 8
    f = prefill_flops(model, inputs["input_ids"].shape[1] - vis, None, images=1, causal=False)
    assert f["total"] == _measure(model, inputs, logits_to_keep=1)
