"""SparseVLM, ATP's and ToDRE's in-LLM stages and pre-LLM + in-LLM composition through the Qwen2-VL / Qwen2.5-VL
adapter (M-RoPE): prefill logits against the masked full-sequence reference of the unpatched model (its own
(t, h, w) ids; recycled tokens written into it here, from the reported groups), cached decoding against masked
recomputation (every step's logits), a left-padded batch against single runs, full budget = the untouched model,
the rotary embeddings every decoder layer really gets (prefill: the original ids of the columns it keeps; decode:
the unpruned model's), per-layer KV-cache lengths, ATP's spatial scores per image grid, and videos."""

from __future__ import annotations

import pytest
import torch
from test_adapter_qwen2_vl import GRIDS, PROMPTS, VIDEO_IMAGES, VIDEOS, _masked_reference
from test_in_llm_methods import _assert_single_matches_batch, _counts_per_layer, _gen, _recycling, _stages
from tiny_models import qwen_batch, qwen_video_batch, stage_masked_attention, tiny_qwen2_5_vl, tiny_qwen2_vl
from vtc.adapters import adapter_of

import vtc
from vtc.reducers.atp import spatial_scores

BUILDERS = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}
N_VISUAL = [24, 12, 15]  # merged tokens of GRIDS' images
TODRE_2 = vtc.create_reducer("todre_llm", layer=1, drop_layer=2)
ATP_2 = vtc.create_reducer("atp_llm", layers=(1, 2))
CASES = {  # id → (reducer, budget, config); the tiny LLMs have 3 layers
    "sparsevlm": ("sparsevlm", 6, {"layers": (1, 2)}),
    "sparsevlm_schedule": ("sparsevlm", 6, {"layers": (1, 2), "scale": 0.0}),  # budget schedule: many recycled
    "atp_llm": ("atp_llm", 0.5, {"layers": (1, 2)}),
    "todre_llm": ("todre_llm", 6, {"layer": 1, "drop_layer": 2}),
    "todre+todre_llm": ("todre", 10, {"in_llm": TODRE_2}),
    "atp+atp_llm": ("atp", 0.75, {"in_llm": ATP_2}),
    "divprune+fastv": ("divprune", 10, {"in_llm": "fastv", "in_llm_budget": 4}),
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model(request):
    return BUILDERS[request.param](seed=3)


def _reference(m, batch, stages, recycled, ids=None):
    """Logits of the unpatched model (its own M-RoPE ids) over `ids`: pruned columns masked out of attention from
    their stage on, recycled tokens written at their hosts."""
    ids = batch["input_ids"] if ids is None else ids
    with _recycling(m, recycled):
        return _masked_reference(m, batch, stages, ids)


@pytest.mark.parametrize("case", CASES)
def test_prefill_logits_equal_masked_reference_and_effective_tokens(model, case):
    name, budget, cfg = CASES[case]
    batch = qwen_batch(model, GRIDS, PROMPTS)
    with torch.no_grad(), vtc.compressed(model, name, budget=budget, **cfg):
        logits = model(**batch).logits
        stages, recycled, last = _stages(model)
        a = adapter_of(model)
        effective, per_layer = a.last["effective_visual_tokens"], a.last["visual_tokens_per_layer"].clone()
    ref = _reference(model, batch, stages, recycled)
    for b, rows in enumerate(last):
        real = batch["attention_mask"][b, rows].bool()
        torch.testing.assert_close(logits[b, -rows.numel() :][real], ref[b, rows][real], atol=1e-4, rtol=1e-4)
    counts = _counts_per_layer(model, batch, stages, 3)
    assert torch.equal(per_layer.cpu(), counts)
    assert effective == pytest.approx(counts.sum().item() / (3 * len(PROMPTS)))
    assert (counts[:, -1] < torch.tensor(N_VISUAL)).all()  # every sample is pruned
    if case == "sparsevlm_schedule":  # some recycled token really aggregates several dropped tokens
        assert any(len(mem) > 1 for g in recycled[1] for _, mem in g)


@pytest.mark.parametrize("case", CASES)
def test_cached_decoding_equals_masked_recompute(model, case):
    """Every decode step's logits (from the pruned caches) equal the masked recomputation of the whole sequence
    under the same prefill decisions, teacher-forced on the generated tokens; the tokens are its greedy ones."""
    name, budget, cfg = CASES[case]
    batch = qwen_batch(model, GRIDS, PROMPTS)
    with vtc.compressed(model, name, budget=budget, **cfg), torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        stages, recycled, _ = _stages(model)
    seqs, start = out.sequences, batch["input_ids"].shape[1]
    ref = _reference(model, batch, stages, recycled, seqs)  # [B, start + 4, V]
    for j, step in enumerate(out.logits):  # [B, V] logits that chose token start + j
        torch.testing.assert_close(step, ref[:, start - 1 + j], atol=1e-4, rtol=1e-4)
        done = (seqs[:, start : start + j] == 2).any(-1)  # generate() pads a row after its EOS (token 2)
        assert torch.equal(seqs[~done, start + j], ref[~done, start - 1 + j].argmax(-1))  # greedy on the reference


@pytest.mark.parametrize("case", ["sparsevlm_schedule", "atp+atp_llm", "todre+todre_llm"])
def test_batch_equals_single_runs(model, case):
    name, budget, cfg = CASES[case]
    batch = qwen_batch(model, GRIDS, PROMPTS)
    with torch.no_grad(), vtc.compressed(model, name, budget=budget, **cfg):
        logits = model(**batch).logits[:, -1]
        stages, _, _ = _stages(model)
        per_layer = adapter_of(model).last["visual_tokens_per_layer"].clone()
        start = 0
        for b in range(len(PROMPTS)):
            pad = int((batch["attention_mask"][b] == 0).sum())
            one = qwen_batch(model, [GRIDS[b]], [PROMPTS[b]])
            assert torch.equal(one["input_ids"][0], batch["input_ids"][b, pad:])
            one["pixel_values"] = batch["pixel_values"][start : start + one["pixel_values"].shape[0]]
            start += one["pixel_values"].shape[0]
            _assert_single_matches_batch(model, one, logits, stages, per_layer, b, pad)


@pytest.mark.parametrize("name", ["sparsevlm", "atp_llm", "todre_llm"])
def test_full_budget_is_the_untouched_model(model, name):
    batch = qwen_batch(model, GRIDS[:2], PROMPTS[:2])
    ref = _gen(model, batch)
    cfg = {"sparsevlm": {"layers": (1, 2)}, "atp_llm": {"layers": (1, 2)}, "todre_llm": {"layer": 1, "drop_layer": 2}}
    with vtc.compressed(model, name, budget=1.0, **cfg[name]):
        assert torch.equal(_gen(model, batch), ref)
        assert adapter_of(model).last["effective_visual_tokens"] == pytest.approx(sum(N_VISUAL[:2]) / 2)
        assert adapter_of(model).in_llm.plan == []


def _record_rotary(m):
    """Pre-hooks on every layer's attention: per call, the layer and the `(cos, sin)` it is given (after the
    in-LLM wrappers have gathered them)."""
    calls = []
    handles = [
        layer.self_attn.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: calls.append((i, [t.clone() for t in kwargs["position_embeddings"]])),
            with_kwargs=True,
        )
        for i, layer in enumerate(m.model.language_model.layers)
    ]
    return calls, handles


@pytest.mark.parametrize("case", ["sparsevlm_schedule", "atp+atp_llm"])
def test_layers_get_the_original_ids_and_decoding_continues_from_the_unpruned_length(model, case):
    """Every layer's kept (and recycled) columns carry the rotary embedding of their original (t, h, w) ids; at
    decode every layer, however short its cache, gets the unpruned model's next positions."""
    name, budget, cfg = CASES[case]
    batch = qwen_batch(model, GRIDS, PROMPTS)
    n_layers = len(model.model.language_model.layers)
    calls, handles = _record_rotary(model)
    try:
        _gen(model, batch)
        ref_calls = list(calls)
        calls.clear()
        with vtc.compressed(model, name, budget=budget, **cfg):
            _gen(model, batch)
            a = adapter_of(model)
            sc = a.last["source_columns"]  # [B, L'] unreduced column of each LLM-input column, -1 padding
            p = a.in_llm
            plan = [s for s, _ in p.plan]
            srcs = {s: (sc.gather(1, p.stage_src[s]), p.stage_valid[s]) for s in plan}
            hosts = {
                s: [[int(sc[b, h]) for h, _ in g] for b, g in enumerate(groups)] for s, groups in p.recycled.items()
            }
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == len(ref_calls) == 3 * n_layers  # prefill + 2 decode steps, every layer
    mask = batch["attention_mask"].bool()
    for (i, (cos, sin)), (ri, (rcos, rsin)) in zip(calls[:n_layers], ref_calls[:n_layers], strict=True):
        assert i == ri
        stage = max((s for s in plan if s <= i), default=None)
        src, valid = (sc.clamp(min=0), sc >= 0) if stage is None else srcs[stage]
        assert cos.shape[:2] == src.shape and (stage is None or src.shape[1] < sc.shape[1])
        for b in range(len(PROMPTS)):
            cols = src[b][valid[b]]
            real = mask[b, cols]
            torch.testing.assert_close(cos[b][valid[b]][real], rcos[b, cols[real]], atol=0, rtol=0)
            torch.testing.assert_close(sin[b][valid[b]][real], rsin[b, cols[real]], atol=0, rtol=0)
            if stage is not None and stage in hosts:  # a recycled token sits at its host's original ids
                assert set(hosts[stage][b]) <= set(cols.tolist())
    for (i, (cos, sin)), (ri, (rcos, rsin)) in zip(calls[n_layers:], ref_calls[n_layers:], strict=True):
        assert i == ri and cos.shape[1] == 1
        torch.testing.assert_close(cos, rcos, atol=0, rtol=0)
        torch.testing.assert_close(sin, rsin, atol=0, rtol=0)
    if case == "sparsevlm_schedule":
        assert any(hosts[plan[0]])


def test_kv_cache_lengths_per_layer(model):
    """After prefill, each layer caches the columns that enter it: shorter from every stage on."""
    batch = qwen_batch(model, GRIDS, PROMPTS)
    name, budget, cfg = CASES["todre+todre_llm"]
    with torch.no_grad(), vtc.compressed(model, name, budget=budget, **cfg):
        out = model(**batch, use_cache=True)
        a = adapter_of(model)
        width0 = a.last["source_columns"].shape[1]
        widths = {s: a.in_llm.stage_src[s].shape[1] for s, _ in a.in_llm.plan}
    cache = out.past_key_values
    lengths = [cache.layers[i].keys.shape[-2] for i in range(3)]
    assert lengths == [width0, widths[1], widths[2]]
    assert width0 < batch["input_ids"].shape[1] and widths[2] < widths[1] < width0


def test_atp_llm_spatial_scores_use_each_image_grid(model):
    """ATP's SAP scores on Qwen come from each image's merged (h/2, w/2) grid, by the token's place in it."""
    batch = qwen_batch(model, GRIDS, PROMPTS)
    with torch.no_grad(), vtc.compressed(model, "atp_llm", budget=0.5, layers=(1, 2)):
        model(**batch)
        sap = adapter_of(model).in_llm.memo["atp_sap"]
    assert sorted(sap) == [0, 1, 2] and [sap[i].numel() for i in range(3)] == N_VISUAL
    c = ATP_2.config
    for i, (_, h, w) in enumerate(GRIDS):
        torch.testing.assert_close(sap[i], spatial_scores(h // 2, w // 2, c.spatial_rates, c.spatial_lambda, 1))


VIDEO_CASES = ["sparsevlm_schedule", "atp+atp_llm"]


@pytest.mark.parametrize("case", VIDEO_CASES)
def test_videos_prefill_and_decoding_equal_masked_reference(model, case):
    """A video (frames at their own temporal ids) and, in sample 1, an image after it: every decode step's logits
    (the first one is the prefill's) against the masked recomputation; ATP's SAP of a video is per frame."""
    name, budget, cfg = CASES[case]
    batch = qwen_video_batch(model, VIDEOS, VIDEO_IMAGES, PROMPTS[:2])
    with vtc.compressed(model, name, budget=budget, **cfg), torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        stages, recycled, _ = _stages(model)
        a = adapter_of(model)
        per_layer, memo = a.last["visual_tokens_per_layer"], a.in_llm.memo
    seqs, start = out.sequences, batch["input_ids"].shape[1]
    b, seq = seqs.shape
    mm = torch.cat([batch["mm_token_type_ids"], torch.zeros(b, seq - start, dtype=torch.int)], 1)
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    with torch.no_grad(), _recycling(model, recycled):
        with stage_masked_attention(model, batch["attention_mask"], stages, seq) as mask:
            ref = model(input_ids=seqs, attention_mask=mask.long(), mm_token_type_ids=mm, **extra).logits
    for j, step in enumerate(out.logits):
        torch.testing.assert_close(step, ref[:, start - 1 + j], atol=1e-4, rtol=1e-4)
    assert (per_layer[:, -1] < torch.tensor([32, 18 + 12])).all()
    if name == "atp":  # images in placeholder order over the batch: sample 1's image, then the two videos
        c = ATP_2.config
        want = [((3, 4), 1), ((4, 4), 2), ((2, 3), 3)]
        for i, ((h, w), views) in enumerate(want):
            sap = spatial_scores(h, w, c.spatial_rates, c.spatial_lambda, views)
            torch.testing.assert_close(memo["atp_sap"][i], sap)
