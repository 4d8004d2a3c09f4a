"""Qwen2-VL / Qwen2.5-VL adapter on tiny models built from config: identity, exact pre-LLM logits at the original
(t, h, w) positions, cache, batching, restore, decode positions, and the mean-query attention substitute."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny_models import (
    IMAGE_TOKEN,
    QWEN_VIDEO_TOKEN,
    qwen_batch,
    qwen_video_batch,
    stage_masked_attention,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
)
from vtc.adapters import adapter_of

import vtc
from vtc.reducers import get_reducer_class

BUILDERS = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}
GRIDS = [(1, 8, 12), (1, 6, 8), (1, 10, 6)]  # patch grids; merged grids (4, 6), (3, 4), (5, 3)
PROMPTS = [[10, 11, 12, 13], [14, 15], [16, 17, 18]]
PRE_LLM = [
    n
    for n in vtc.list_reducers()
    if get_reducer_class(n).stage == "pre_llm" and "views" not in get_reducer_class(n).requires
]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model(request):
    return BUILDERS[request.param]()


def _gen(m, batch, **kw):
    with torch.no_grad():
        return m.generate(**batch, max_new_tokens=4, do_sample=False, **kw)


def _vt(m, batch, i):
    """VisualTokens of image i as a reducer sees them without the adapter (tokens and merged grid only)."""
    with torch.no_grad():
        out = m.model.get_image_features(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    _, h, w = batch["image_grid_thw"][i].tolist()
    return vtc.VisualTokens(out.pooler_output[i][None], grid=(h // 2, w // 2))


def _mrope_positions(ids: torch.Tensor, runs: list[tuple[tuple[int, int, int], int]]) -> torch.Tensor:
    """`[3, L]` M-RoPE ids of one unpadded sequence: text counts up by one on all three rows; visual run r with
    patch grid (t, h, w) and temporal step s puts its merged (t, h/2, w/2) grid at offset `start` (the temporal
    row as start + s·t), and text resumes at start + max(h/2, w/2)."""
    rows, pos, i, r = [], 0, 0, 0
    while i < ids.numel():
        if int(ids[i]) in (IMAGE_TOKEN, QWEN_VIDEO_TOKEN):
            (t, h, w), step = runs[r]
            h, w = h // 2, w // 2
            tt, hh, ww = torch.meshgrid(torch.arange(t) * step, torch.arange(h), torch.arange(w), indexing="ij")
            rows.append(torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + pos)
            i, r, pos = i + t * h * w, r + 1, pos + max(h, w)
        else:
            rows.append(torch.full((3, 1), pos))
            i, pos = i + 1, pos + 1
    return torch.cat(rows, dim=1)


def _reference_logits(m, batch, b, kept, runs=None):
    """The unpatched language model fed sample b's kept embeddings at their original (t, h, w) ids (no padding).

    `kept`: per visual run of the sample (in sequence order), the kept columns within the run and their tokens;
    `runs`: per run its patch grid and temporal step (default: the sample's one image)."""
    mask = batch["attention_mask"][b].bool()
    ids = batch["input_ids"][b][mask]
    runs = runs or [(tuple(batch["image_grid_thw"][b].tolist()), 1)]
    pos = _mrope_positions(ids, runs)
    emb = m.get_input_embeddings()(ids).clone()
    visual = (ids == IMAGE_TOKEN) | (ids == QWEN_VIDEO_TOKEN)
    keep = ~visual
    starts = (visual & ~torch.cat([visual.new_zeros(1), visual[:-1]])).nonzero().squeeze(-1)  # runs are separated
    for start, ((t, h, w), _), (cols, tokens) in zip(starts.tolist(), runs, kept, strict=True):
        run = torch.arange(start, start + t * h * w // 4)
        emb[run[cols]] = tokens
        keep[run[cols]] = True
    out = m.model.language_model(inputs_embeds=emb[keep][None], position_ids=pos[:, keep][:, None])
    return m.lm_head(out.last_hidden_state)[0]


@pytest.fixture(scope="module")
def unpatched_tokens(model):
    batch = qwen_batch(model, GRIDS[:2], PROMPTS[:2])
    return batch, _gen(model, batch)


@pytest.mark.parametrize("name", PRE_LLM)
def test_full_budget_generates_the_same_tokens(model, unpatched_tokens, name):
    batch, ref = unpatched_tokens
    with vtc.compressed(model, name, budget=1.0):
        out = _gen(model, batch)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("name", PRE_LLM)
def test_every_pre_llm_reducer_runs_on_qwen_inputs(model, name):
    batch = qwen_batch(model, GRIDS, PROMPTS)
    with torch.no_grad(), vtc.compressed(model, name, budget=0.5):
        logits = model(**batch).logits
        last = adapter_of(model).last
    assert torch.isfinite(logits).all() and last["num_visual_in"] == 24 + 12 + 15
    assert all(0 < k <= n for k, n in zip(last["kept"], [24, 12, 15], strict=True))


@pytest.mark.parametrize("name", ["downsample", "random", "fastervlm"])
def test_pre_llm_logits_equal_the_language_model_on_kept_tokens(model, name):
    batch = qwen_batch(model, GRIDS, PROMPTS)
    reducer = vtc.create_reducer(name, **({"seed": 7} if name == "random" else {}))
    with torch.no_grad():
        with vtc.compressed(model, reducer, budget=5):
            logits = model(**batch).logits  # [B, L', V] over the reduced, re-left-padded sequences
            sels = adapter_of(model).last["selections"]
        for b in range(len(PROMPTS)):
            if name == "fastervlm":  # needs the adapter's attention substitute; its values are tested below
                sel = sels[b]
            else:
                sel = reducer(_vt(model, batch, b), budget=5)
            assert sel.indices.shape == (1, 5)
            ref = _reference_logits(model, batch, b, [(sel.indices[0], sel.tokens[0])])
            torch.testing.assert_close(logits[b, -ref.shape[0] :], ref, atol=1e-5, rtol=1e-4)


def test_merged_tokens_sit_at_their_first_source(model):
    if "matryoshka" not in vtc.list_reducers():
        pytest.skip("matryoshka not registered")
    batch = qwen_batch(model, GRIDS[:1], PROMPTS[:1])
    with torch.no_grad():
        sel = vtc.create_reducer("matryoshka")(_vt(model, batch, 0), budget=6)  # 4x6 → 2x3 bins of 2x2
        with vtc.compressed(model, "matryoshka", budget=6):
            logits = model(**batch).logits
    first = torch.tensor([r * 12 + c * 2 for r in range(2) for c in range(3)])  # top-left cell of every bin
    ref = _reference_logits(model, batch, 0, [(first, sel.tokens[0])])
    torch.testing.assert_close(logits[0], ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("positions", ["original", "renumber"])
def test_cache_decoding_equals_no_cache(model, positions):
    batch = qwen_batch(model, GRIDS, PROMPTS)
    with vtc.compressed(model, "fastervlm", budget=5, positions=positions):
        a = _gen(model, batch, use_cache=True)
        b = _gen(model, batch, use_cache=False)
    assert torch.equal(a, b)


def test_batch_equals_single_runs_and_counts(model):
    batch = qwen_batch(model, GRIDS, PROMPTS)
    with vtc.compressed(model, "visionzip" if "visionzip" in vtc.list_reducers() else "fastervlm", budget=6):
        full = _gen(model, batch)
        assert adapter_of(model).last["kept"] == [6, 6, 6]
        for b in range(len(PROMPTS)):
            one = qwen_batch(model, [GRIDS[b]], [PROMPTS[b]])
            start = sum(t * h * w for t, h, w in GRIDS[:b])
            one["pixel_values"] = batch["pixel_values"][start : start + one["pixel_values"].shape[0]]
            new = _gen(model, one)[0, one["input_ids"].shape[1] :]  # may stop early at EOS
            assert torch.equal(full[b, batch["input_ids"].shape[1] :][: new.numel()], new)


def test_restore_and_other_instances_untouched(model):
    other = type(model)(model.config).eval()
    batch = qwen_batch(model, GRIDS, PROMPTS)
    with torch.no_grad():
        ref_logits = model(**batch).logits
        ref_other = other(**batch).logits
        deltas = model.model.rope_deltas
        vtc.compress(model, "random", budget=4)
        _gen(model, batch)
        assert "forward" not in other.__dict__
        assert torch.equal(other(**batch).logits, ref_other)
        assert model(**batch).logits.shape[1] < ref_logits.shape[1]
        vtc.restore(model)
        assert "forward" not in model.__dict__
        assert model.model.rope_deltas is deltas
        assert torch.equal(model(**batch).logits, ref_logits)


def _record_positions(m):
    """Forward pre-hook on the language model: the `[3, B, L]` M-RoPE ids and attention mask of every call."""
    calls = []

    def hook(mod, args, kwargs):
        p = kwargs["position_ids"]
        calls.append((p[-3:].clone(), kwargs["attention_mask"].clone()))

    return calls, m.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_kept_tokens_keep_their_ids_and_decoding_continues_from_the_unreduced_length(model):
    batch = qwen_batch(model, GRIDS, PROMPTS)
    calls, handle = _record_positions(model)
    try:
        _gen(model, batch)
        ref_calls = list(calls)
        calls.clear()
        with vtc.compressed(model, "random", budget=5, seed=3):
            _gen(model, batch)
            a = adapter_of(model)
            src = a.last["source_columns"]  # [B, L'] unreduced column of each reduced one, -1 padding
            kept = a.last["kept"]
            deltas = model.model.rope_deltas.clone()
    finally:
        handle.remove()
    full_pos, _ = ref_calls[0]
    pos, mask = calls[0]
    assert pos.shape[-1] == src.shape[1] < full_pos.shape[-1]
    for b in range(len(PROMPTS)):
        valid = (src[b] >= 0) & batch["attention_mask"][b][src[b].clamp(min=0)].bool()
        assert torch.equal(mask[b].bool(), valid)
        assert torch.equal(pos[:, b, valid], full_pos[:, b, src[b][valid]])  # original (t, h, w) ids
        n_img = (batch["input_ids"][b][src[b][valid]] == IMAGE_TOKEN).sum()
        assert int(n_img) == kept[b] == 5
    assert len(calls) == len(ref_calls) == 4
    for (p, m), (rp, rm) in zip(calls[1:], ref_calls[1:], strict=True):  # decode steps: the unreduced positions
        assert p.shape == rp.shape == (3, 3, 1)
        assert torch.equal(p, rp)
        assert m.shape[1] == rm.shape[1] - (full_pos.shape[-1] - pos.shape[-1])
    # rope_deltas: the model's own fallback (mask cumsum + delta) gives the same first decode position.
    n_real = mask.long().sum(-1, keepdim=True)
    assert torch.equal(n_real + deltas, ref_calls[1][0][0, :, :1])


def test_renumbered_positions_are_contiguous(model):
    batch = qwen_batch(model, GRIDS, PROMPTS)
    calls, handle = _record_positions(model)
    try:
        with vtc.compressed(model, "downsample", budget=4, positions="renumber"):
            _gen(model, batch)
    finally:
        handle.remove()
    pos, mask = calls[0]
    expect = (mask.long().cumsum(-1) - 1).clamp(min=0) * mask
    assert torch.equal(pos, expect.expand(3, -1, -1))
    for step, (p, _) in enumerate(calls[1:]):
        assert torch.equal(p[:, :, 0], (mask.sum(-1) + step).expand(3, -1))


def test_mean_query_attention_matches_eager_attention(model, monkeypatch):
    """The substitute for CLS attention equals the eager attention probabilities of the chosen block, averaged over
    the queries of each segment and summed over each 2x2 merge group, in the merger's output order."""
    from vtc.adapters.base import AdapterConfig
    from vtc.adapters.qwen2_vl import Qwen2VLAdapter

    batch = qwen_batch(model, GRIDS, PROMPTS)
    visual = model.model.visual
    adapter = Qwen2VLAdapter(model, vtc.create_reducer("fastervlm"), 8, AdapterConfig())
    block = adapter.vision_block()
    assert block == (1 if hasattr(visual, "fullatt_block_indexes") else 2)
    with torch.no_grad():
        vts = adapter.encode(batch["pixel_values"], {"image_grid_thw": batch["image_grid_thw"]})
        module = sys.modules[type(visual.blocks[0].attn).__module__]
        eager, seen = module.eager_attention_forward, []

        def recording(mod, *args, **kwargs):
            out, weights = eager(mod, *args, **kwargs)
            if mod is visual.blocks[block].attn:
                seen.append(weights[0])  # [H, n, n] of one segment
            return out, weights

        monkeypatch.setattr(module, "eager_attention_forward", recording)
        monkeypatch.setattr(visual.config, "_attn_implementation", "eager")
        qkv = []
        hook = visual.blocks[block].attn.qkv.register_forward_hook(lambda m, i, o: qkv.append(o))
        try:
            tokens = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        finally:
            hook.remove()
    c = visual.blocks[block].attn.proj.in_features
    keys = qkv[0][:, c : 2 * c].split([t * h * w for t, h, w in GRIDS])  # per image [n, C], before RoPE
    assert len(seen) == len(GRIDS)  # a full-attention block: one segment per image
    for i, (_, h, w) in enumerate(GRIDS):
        probs = seen[i].mean(1)  # [H, n] over the tower's patch order of image i
        n = probs.shape[-1]
        groups = probs.view(probs.shape[0], n // 4, 4).sum(-1)  # [H, G] in the tower's group order
        group_keys = keys[i].view(n // 4, 4, c).mean(1)  # [G, C]
        if hasattr(visual, "fullatt_block_indexes"):  # Qwen2.5-VL: windows of 2x2 merged tokens, row-major
            gh, gw = h // 2, w // 2
            order = torch.tensor(
                [
                    r * gw + c
                    for wr in range(0, gh, 2)
                    for wc in range(0, gw, 2)
                    for r in range(wr, min(wr + 2, gh))
                    for c in range(wc, min(wc + 2, gw))
                ]
            )
            groups, group_keys = groups[:, order.argsort()], group_keys[order.argsort()]
        vt = vts[i]
        assert vt.grid == (h // 2, w // 2) and vt.frames is None
        torch.testing.assert_close(vt.cls_attn[0].softmax(-1), groups, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(vt.tokens[0], tokens[i], atol=1e-5, rtol=1e-4)  # eager vs SDPA run
        # features are the merger's input in the output order: the merger reproduces the tokens from them
        merged = visual.merger(vt.features[0].reshape(-1, c))
        torch.testing.assert_close(merged, tokens[i], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(vt.keys[0], group_keys, atol=1e-5, rtol=1e-4)  # mean key of each 2x2 group


def test_windowed_block_uses_its_windows():
    """On Qwen2.5-VL a windowed block's substitute is normalised per window (each window's mass is 1)."""
    model = tiny_qwen2_5_vl()
    batch = qwen_batch(model, GRIDS[:1], PROMPTS[:1])
    from vtc.adapters.base import AdapterConfig
    from vtc.adapters.qwen2_vl import Qwen2VLAdapter

    adapter = Qwen2VLAdapter(model, vtc.create_reducer("fastervlm"), 8, AdapterConfig(vision_layer=1))  # block 0
    assert adapter.vision_block() == 0
    with torch.no_grad():
        vt = adapter.encode(batch["pixel_values"], {"image_grid_thw": batch["image_grid_thw"]})[0]
    probs = vt.cls_attn[0].exp().view(-1, 2, 2, 3, 2).sum((2, 4))  # [H, 2, 3] windows of 2x2 merged tokens
    torch.testing.assert_close(probs, torch.ones_like(probs), atol=1e-5, rtol=1e-5)


def test_chunked_scores_equal_unchunked(monkeypatch):
    from vtc.adapters import qwen2_vl

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 20, 3, 8, generator=g).unbind(0)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    full = qwen2_vl.mean_query_attention(q, k, cu, 0.3)
    monkeypatch.setattr(qwen2_vl, "_MAX_SCORE_ELEMENTS", 7)
    torch.testing.assert_close(qwen2_vl.mean_query_attention(q, k, cu, 0.3), full)
    ref = torch.cat(
        [(q[s:e].transpose(0, 1) @ k[s:e].permute(1, 2, 0) * 0.3).softmax(-1).mean(1) for s, e in [(0, 7), (7, 20)]], 1
    )
    torch.testing.assert_close(full, ref)


# ---------------------------------------------------------------------- in-LLM reducers through the Qwen adapter
IN_LLM = [n for n in ("fastv", "pdrop", "dart") if n in vtc.list_reducers()]


def _masked_reference(m, batch, stages, ids):
    """Logits of the unpatched model over the full sequence `ids` (prompt + generated), where from each stage's
    layer on the pruned visual columns are masked out of attention (every token is still computed)."""
    b, seq = ids.shape
    mm = torch.cat(
        [batch["mm_token_type_ids"], torch.zeros(b, seq - batch["attention_mask"].shape[1], dtype=torch.int)], 1
    )
    with torch.no_grad(), stage_masked_attention(m, batch["attention_mask"], stages, seq) as mask:
        out = m(
            input_ids=ids,
            attention_mask=mask.long(),
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=mm,
        )
    return out.logits


def _stages(m):
    p = adapter_of(m).in_llm
    return [(s, p.stage_src[s].masked_fill(~p.stage_valid[s], 0)) for s, _ in p.plan]


@pytest.mark.parametrize("name", IN_LLM)
def test_in_llm_prefill_logits_equal_masked_reference(model, name):
    batch = qwen_batch(model, GRIDS, PROMPTS)
    with torch.no_grad(), vtc.compressed(model, name, budget=6, **({"layer": 1} if name != "pdrop" else {})):
        logits = model(**batch).logits
        stages = _stages(model)
        p = adapter_of(model).in_llm
        last_src, last_valid = p.stage_src[p.plan[-1][0]], p.stage_valid[p.plan[-1][0]]
    ref = _masked_reference(model, batch, stages, batch["input_ids"])
    for b in range(len(PROMPTS)):
        rows = last_src[b][last_valid[b]]
        real = batch["attention_mask"][b, rows].bool()
        torch.testing.assert_close(logits[b, -rows.numel() :][real], ref[b, rows][real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", IN_LLM)
def test_in_llm_cached_decoding_equals_masked_recompute(model, name):
    batch = qwen_batch(model, GRIDS, PROMPTS)
    with vtc.compressed(model, name, budget=6):
        out = _gen(model, batch)
        stages = _stages(model)
    ids = batch["input_ids"]
    for _ in range(4):  # greedy decoding by full recomputation, pruned columns masked from their stage on
        nxt = _masked_reference(model, batch, stages, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    assert out.shape == ids.shape
    for row, ref in zip(out, ids, strict=True):  # generate() pads a row after its EOS (token 2)
        start = batch["input_ids"].shape[1]
        eos = (ref[start:] == 2).nonzero()
        stop = start + (int(eos[0]) + 1 if eos.numel() else ref.numel() - start)
        assert torch.equal(row[:stop], ref[:stop])


# ---------------------------------------------------------------------- videos
VIDEOS = [(2, 8, 8), (3, 4, 6)]  # (t, h, w) patch grids: 2 frames of 4x4 and 3 frames of 2x3 merged tokens
VIDEO_IMAGES = [None, (1, 6, 8)]  # sample 1 also has an image after its video


def _video_batch(m):
    return qwen_video_batch(m, VIDEOS, VIDEO_IMAGES, PROMPTS[:2])


def test_video_full_budget_generates_the_same_tokens(model):
    batch = _video_batch(model)
    ref = _gen(model, batch)
    with vtc.compressed(model, "fastervlm", budget=1.0):
        assert torch.equal(_gen(model, batch), ref)


def test_video_groups_and_logits_at_original_positions(model):
    """Videos are reduced as one group each (frames = t); the logits equal the language model on the kept tokens
    at their original (t, h, w) ids, with Qwen2.5-VL's temporal step (tokens_per_second per temporal patch)."""
    batch = _video_batch(model)
    reducer = vtc.create_reducer("downsample")
    with torch.no_grad():
        with vtc.compressed(model, reducer, budget=6):
            logits = model(**batch).logits
            a = adapter_of(model)
            assert a.last["kept"] == [6, 6, 6] and a.last["num_visual_in"] == 32 + 18 + 12
        video = model.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"]).pooler_output
        image = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
    step = getattr(model.config.vision_config, "tokens_per_second", 1)  # Qwen2-VL: one id per temporal patch
    for b, ((t, h, w), ig) in enumerate(zip(VIDEOS, VIDEO_IMAGES, strict=True)):
        vt = vtc.VisualTokens(video[b][None], grid=(h // 2, w // 2), frames=t)
        sel = reducer(vt, budget=6)
        kept, runs = [(sel.indices[0], sel.tokens[0])], [((t, h, w), step)]
        if ig is not None:
            sel_i = reducer(vtc.VisualTokens(image[0][None], grid=(ig[1] // 2, ig[2] // 2)), budget=6)
            kept.append((sel_i.indices[0], sel_i.tokens[0]))
            runs.append((ig, 1))
        ref = _reference_logits(model, batch, b, kept, runs)
        torch.testing.assert_close(logits[b, -ref.shape[0] :], ref, atol=1e-5, rtol=1e-4)


def test_video_attention_substitute_is_per_frame(model):
    from vtc.adapters.base import AdapterConfig
    from vtc.adapters.qwen2_vl import Qwen2VLAdapter

    batch = _video_batch(model)
    adapter = Qwen2VLAdapter(model, vtc.create_reducer("fastervlm"), 8, AdapterConfig())
    extra = {k: batch[k] for k in ("pixel_values_videos", "video_grid_thw", "image_grid_thw")}
    with torch.no_grad():
        vts = adapter.encode(batch["pixel_values"], extra)
    assert [(v.frames, v.grid, v.tokens.shape[1]) for v in vts] == [
        (None, (3, 4), 12),
        (2, (4, 4), 32),
        (3, (2, 3), 18),
    ]
    for vt in vts[1:]:  # full attention within each frame: each frame's mass is 1
        mass = vt.cls_attn[0].exp().view(vt.cls_attn.shape[1], vt.frames, -1).sum(-1)
        torch.testing.assert_close(mass, torch.ones_like(mass), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["original", "renumber"])
def test_video_cache_decoding_equals_no_cache(model, positions):
    batch = _video_batch(model)
    with vtc.compressed(model, "fastervlm", budget=5, positions=positions):
        assert torch.equal(_gen(model, batch, use_cache=True), _gen(model, batch, use_cache=False))


def test_attention_substitute_only_for_reducers_that_use_it(model, monkeypatch):
    """The P x P mean-query pass runs for methods that name cls_attn or keys (required or used), and no other."""
    import vtc.adapters.qwen2_vl as qa

    calls = []
    real = qa.mean_query_attention
    monkeypatch.setattr(qa, "mean_query_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = qwen_batch(model, GRIDS, PROMPTS)
    for name in PRE_LLM:
        cls = get_reducer_class(name)
        calls.clear()
        with vtc.compressed(model, name, budget=6):
            _gen(model, batch)
        assert bool(calls) == bool({"cls_attn", "keys"} & set(cls.requires + cls.uses)), name
