"""SparseVLM, ATP's and ToDRE's in-LLM stages and pre-LLM + in-LLM composition through the LLaVA and LLaVA-NeXT
adapters: prefill logits against a masked full-sequence reference (recycled tokens written into it here, from the
reported groups), cached decoding against masked recomputation, a batch against single runs, effective visual tokens
counted independently, stage decisions against eager attention, and DPC-kNN against a plain loop."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from tiny_models import IMAGE_TOKEN, llava_batch, llava_next_batch, stage_masked_attention, tiny_llava, tiny_llava_next
from vtc.adapters import adapter_of

import vtc
from vtc.ops.cluster import cluster_means, dpc_knn

PROMPTS = [[10, 11, 12, 13], [14, 15], [16, 17, 18]]
TODRE_2 = vtc.create_reducer("todre_llm", layer=1, drop_layer=2)
ATP_2 = vtc.create_reducer("atp_llm", layers=(1, 2))
CASES = {  # id → (reducer, budget, config); the tiny LLMs have 3 layers
    "sparsevlm": ("sparsevlm", 10, {"layers": (1, 2)}),
    "sparsevlm_schedule": ("sparsevlm", 10, {"layers": (1, 2), "scale": 0.0}),  # budget schedule: many recycled
    "atp_llm": ("atp_llm", 0.5, {"layers": (1, 2)}),
    "todre_llm": ("todre_llm", 12, {"layer": 1, "drop_layer": 2}),
    "todre+todre_llm": ("todre", 32, {"in_llm": TODRE_2}),
    "atp+atp_llm": ("atp", 40, {"in_llm": ATP_2}),
    "divprune+fastv": ("divprune", 24, {"in_llm": "fastv", "in_llm_budget": 8}),
}


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=3)


def _gen(m, batch, n=3):
    with torch.no_grad():
        return m.generate(**batch, max_new_tokens=n, do_sample=False)


def _stages(m):
    """Stages in the unreduced prompt's columns: [(layer, kept columns [B, K])] (layer 0: the pre-LLM reduction),
    the recycled tokens {layer: per sample [(host column, source columns)]}, and per sample the columns that reach
    the last layer."""
    a = adapter_of(m)
    p = a.in_llm
    sc = a.last["source_columns"]  # [B, L'] unreduced column of every LLM-input column, -1 padding
    stages = [] if a.reducer.stage == "in_llm" else [(0, sc.clamp(min=0))]
    for s, _ in p.plan:
        stages.append((s, sc.gather(1, p.stage_src[s]).clamp(min=0).masked_fill(~p.stage_valid[s], 0)))
    recycled = {
        s: [[(int(sc[b, h]), sc[b, mem]) for h, mem in g] for b, g in enumerate(groups)]
        for s, groups in p.recycled.items()
    }
    if p.plan:
        s = p.plan[-1][0]
        last = [sc[b][p.stage_src[s][b][p.stage_valid[s][b]]] for b in range(sc.shape[0])]
    else:
        last = [sc[b][sc[b] >= 0] for b in range(sc.shape[0])]
    return stages, recycled, last


@contextlib.contextmanager
def _recycling(m, recycled):
    """Pre-hooks that write every recycled token, the mean of its sources' hidden states entering its layer, at its
    host column (every column is still computed in the reference, so the sources are there)."""
    handles = []
    for s, groups in recycled.items():

        def pre(mod, args, kwargs, groups=groups):
            h = args[0]
            new = h.clone()
            for b, g in enumerate(groups):
                for host, members in g:
                    new[b, host] = h[b, members].float().mean(0).to(h.dtype)
            return (new, *args[1:]), kwargs

        handles.append(m.model.language_model.layers[s].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _reference(m, batch, stages, recycled, ids=None):
    """Logits of the unpatched model over the whole sequence: pruned columns masked out of attention from their
    stage on, recycled tokens written at their hosts."""
    ids = batch["input_ids"] if ids is None else ids
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad(), _recycling(m, recycled):
        with stage_masked_attention(m, batch["attention_mask"], stages, ids.shape[1]) as mask:
            return m(input_ids=ids, attention_mask=mask.long(), **extra).logits


def _counts_per_layer(m, batch, stages, num_layers):
    """`[B, num_layers]` visual tokens per layer, counted from the kept columns (image placeholders only)."""
    img = batch["input_ids"] == IMAGE_TOKEN
    b = img.shape[0]
    out = torch.zeros(b, num_layers, dtype=torch.long)
    for layer in range(num_layers):
        alive = img & batch["attention_mask"].bool()
        for s, cols in stages:
            if layer >= s:
                alive = img & torch.zeros_like(img).scatter_(1, cols, True) & batch["attention_mask"].bool()
        out[:, layer] = alive.sum(-1)
    return out


# ---------------------------------------------------------------------- LLaVA-1.5
@pytest.mark.parametrize("case", CASES)
def test_prefill_logits_equal_masked_reference_and_effective_tokens(llava, case):
    name, budget, cfg = CASES[case]
    batch = llava_batch(llava, PROMPTS)
    with torch.no_grad(), vtc.compressed(llava, name, budget=budget, **cfg):
        logits = llava(**batch).logits
        stages, recycled, last = _stages(llava)
        a = adapter_of(llava)
        effective, per_layer = a.last["effective_visual_tokens"], a.last["visual_tokens_per_layer"]
    ref = _reference(llava, batch, stages, recycled)
    for b, rows in enumerate(last):
        real = batch["attention_mask"][b, rows].bool()
        torch.testing.assert_close(logits[b, -rows.numel() :][real], ref[b, rows][real], atol=1e-4, rtol=1e-4)
    counts = _counts_per_layer(llava, batch, stages, 3)
    assert torch.equal(per_layer.cpu(), counts)
    assert effective == pytest.approx(counts.sum().item() / (3 * len(PROMPTS)))
    assert effective < 64
    if case == "sparsevlm_schedule":  # some recycled token really aggregates several dropped tokens
        assert any(len(mem) > 1 for g in recycled[1] for _, mem in g)
    if name == "atp_llm":  # instance-adaptive: the samples keep different counts
        assert len(set(per_layer[:, -1].tolist())) > 1


@pytest.mark.parametrize("case", CASES)
def test_cached_decoding_equals_masked_recompute(llava, case):
    name, budget, cfg = CASES[case]
    batch = llava_batch(llava, PROMPTS)
    with vtc.compressed(llava, name, budget=budget, **cfg):
        out = _gen(llava, batch)
        stages, recycled, _ = _stages(llava)
    ids = batch["input_ids"]
    for _ in range(3):  # greedy decoding by full recomputation under the same prefill decisions
        nxt = _reference(llava, batch, stages, recycled, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    start = batch["input_ids"].shape[1]
    for row, ref in zip(out, ids, strict=True):  # generate() pads a row after its EOS (token 2)
        eos = (ref[start:] == 2).nonzero()
        stop = start + (int(eos[0]) + 1 if eos.numel() else ref.numel() - start)
        assert torch.equal(row[:stop], ref[:stop])


@pytest.mark.parametrize("case", ["sparsevlm_schedule", "atp+atp_llm", "todre+todre_llm"])
def test_batch_equals_single_runs(llava, case):
    name, budget, cfg = CASES[case]
    batch = llava_batch(llava, PROMPTS)
    with torch.no_grad(), vtc.compressed(llava, name, budget=budget, **cfg):
        logits = llava(**batch).logits[:, -1]
        stages, _, _ = _stages(llava)
        per_layer = adapter_of(llava).last["visual_tokens_per_layer"].clone()
        for b in range(len(PROMPTS)):
            pad = int((batch["attention_mask"][b] == 0).sum())
            one = {
                "input_ids": batch["input_ids"][b : b + 1, pad:],
                "attention_mask": batch["attention_mask"][b : b + 1, pad:],
                "pixel_values": batch["pixel_values"][b : b + 1],
            }
            _assert_single_matches_batch(llava, one, logits, stages, per_layer, b, pad)


def _assert_single_matches_batch(m, one, logits, stages, per_layer, b, pad):
    """Sample `b` run alone (`one`, its prompt without the batch's `pad` left-padding) gives the batched logits,
    visual-token counts per layer and kept columns at every stage."""
    single = m(**one).logits[:, -1]
    one_stages, _, _ = _stages(m)
    torch.testing.assert_close(single[0], logits[b], atol=1e-4, rtol=1e-4)
    assert torch.equal(adapter_of(m).last["visual_tokens_per_layer"][0], per_layer[b])
    for (s, cols), (s1, cols1) in zip(stages, one_stages, strict=True):
        kept = set(cols[b].tolist()) - set(range(pad))
        assert s == s1 and kept == {c + pad for c in cols1[0].tolist()}


@pytest.mark.parametrize("name", ["sparsevlm", "atp_llm", "todre_llm"])
def test_full_budget_is_the_untouched_model(llava, name):
    batch = llava_batch(llava, PROMPTS[:2])
    ref = _gen(llava, batch)
    cfg = {"sparsevlm": {"layers": (1, 2)}, "atp_llm": {"layers": (1, 2)}, "todre_llm": {"layer": 1, "drop_layer": 2}}
    with vtc.compressed(llava, name, budget=1.0, **cfg[name]):
        assert torch.equal(_gen(llava, batch), ref)
        assert adapter_of(llava).last["effective_visual_tokens"] == 64


def test_todre_composition_runs_both_stages(llava):
    """`in_llm=True` runs the method's own stage 2: k-center before the LLM, then relevance, then nothing visual."""
    batch = llava_batch(llava, PROMPTS)
    with torch.no_grad(), vtc.compressed(llava, "todre", budget=20, in_llm=True) as m:
        assert adapter_of(m).in_llm.reducer.name == "todre_llm"
        m(**batch)  # the defaults (16 and 24 of 32) both round to 2 of 3: spread to layers 1 and 2
        assert adapter_of(m).last["visual_tokens_per_layer"].tolist() == [[20, 10, 0]] * 3
    with torch.no_grad(), vtc.compressed(llava, "todre", budget=20, in_llm=TODRE_2, in_llm_budget=4) as m:
        m(**batch)
        a = adapter_of(m)
        assert a.last["visual_tokens_per_layer"].tolist() == [[20, 4, 0]] * 3
        assert a.last["effective_visual_tokens"] == pytest.approx(8.0)


def test_composition_errors(llava):
    with pytest.raises(ValueError, match="divprune has no in-LLM stage"):
        vtc.compress(llava, "divprune", budget=8, in_llm=True)
    with pytest.raises(ValueError, match="fastv already prunes inside the LLM"):
        vtc.compress(llava, "fastv", budget=8, in_llm="dart")
    with pytest.raises(ValueError, match="not an in-LLM reducer"):
        vtc.compress(llava, "todre", budget=8, in_llm="divprune")
    with pytest.raises(ValueError, match="sparsevlm: its default layers collapse"):
        vtc.create_reducer("sparsevlm").plan(64, 8, 3)  # 3 stages, 2 usable layers
    assert [s for s, _ in vtc.create_reducer("sparsevlm").plan(64, 8, 4)] == [1, 2, 3]  # (2, 4, 2) spread
    assert [s for s, _ in vtc.create_reducer("sparsevlm").plan(576, 64, 32)] == [3, 7, 16]
    assert vtc.create_reducer("todre_llm").plan(58, 29, 32) == [(16, 29), (24, 0)]
    assert [s for s, _ in vtc.create_reducer("atp_llm").plan(576, 144, 32)] == [2, 8, 16, 24]


# ---------------------------------------------------------------------- decisions against eager attention
def _eager_pass(batch):
    """Layer-0 attention probabilities and the hidden states entering layers 0 and 1, of an eager twin model."""
    m = tiny_llava(seed=3, attn="eager")
    seen = {}
    layers = m.model.language_model.layers
    h0 = layers[0].register_forward_pre_hook(lambda mod, a: seen.__setitem__("h0", a[0]))
    h1 = layers[1].register_forward_pre_hook(lambda mod, a: seen.__setitem__("h1", a[0]))
    with torch.no_grad():
        out = m(**batch, output_attentions=True)
    h0.remove()
    h1.remove()
    return out.attentions[0].mean(1), seen["h0"], seen["h1"]  # [B, L, L], [B, L, D], [B, L, D]


def _dpc_loop(x: torch.Tensor, c: int) -> tuple[list[int], list[int]]:
    """DPC-kNN written out point by point (k = c neighbours, self included)."""
    n, d = x.shape
    dist = [[float((x[i] - x[j]).norm()) / math.sqrt(d) for j in range(n)] for i in range(n)]
    dens = [math.exp(-sum(v * v for v in sorted(dist[i])[: min(c, n)]) / min(c, n)) for i in range(n)]
    far = max(max(r) for r in dist)
    delta = []
    for i in range(n):
        higher = [dist[i][j] for j in range(n) if dens[j] > dens[i] or (dens[j] == dens[i] and j < i)]
        delta.append(min(higher) if higher else far)
    centers = sorted(range(n), key=lambda i: (-delta[i] * dens[i], i))[:c]
    assign = [min(range(c), key=lambda j: (dist[i][centers[j]], j)) for i in range(n)]
    for j, ctr in enumerate(centers):
        assign[ctr] = j
    return centers, assign


def test_dpc_knn_matches_loop():
    g = torch.Generator().manual_seed(0)
    blobs = torch.randn(4, 8, generator=g) * 4
    x = (blobs.repeat_interleave(6, 0) + torch.randn(24, 8, generator=g)).double()
    for c in (1, 3, 4, 7):
        centers, assign = dpc_knn(x, c)
        ref_c, ref_a = _dpc_loop(x, c)
        assert centers.tolist() == ref_c and assign.tolist() == ref_a
    means = cluster_means(x.float(), assign, 7)
    torch.testing.assert_close(means[assign[5]], x[assign == assign[5]].float().mean(0))


def test_sparsevlm_first_stage_matches_eager_attention(llava):
    """Raters, scores, rank-adaptive count, recycled groups and hosts, recomputed from an eager model's attention."""
    batch = llava_batch(llava, PROMPTS)
    lam = 0.9  # the rank rule binds: fewer tokens than the budget schedule's cap
    with torch.no_grad(), vtc.compressed(llava, "sparsevlm", budget=10, layers=(1, 2), scale=lam):
        llava(**batch)
        stages, recycled, _ = _stages(llava)
        cap = adapter_of(llava).in_llm.caps[0].tolist()
    attn, h0, h1 = _eager_pass(batch)
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    for b in range(len(PROMPTS)):
        vis = (ids[b] == IMAGE_TOKEN).nonzero().squeeze(-1)
        text = (valid[b] & (torch.arange(ids.shape[1]) > vis.max())).nonzero().squeeze(-1)
        rel = (h0[b, vis] @ h0[b, text].T).softmax(-1).mean(0)  # [T]
        raters = text[rel > rel.mean()] if bool((rel > rel.mean()).any()) else text
        p = attn[b][raters][:, vis]  # [R, V]
        score = p.mean(0)
        rank = int(torch.linalg.matrix_rank(p))
        n = vis.numel() - math.floor(lam * (vis.numel() - rank))
        assert n < cap[b]
        order = torch.sort(score, descending=True, stable=True).indices
        kept = vis[order[:n]]
        dropped = vis[order[n:]]  # best first
        best = dropped[: int(dropped.numel() * 0.3) + 1]
        centers, assign = _dpc_loop(h1[b, best].double(), int(best.numel() * 0.1) + 1)
        hosts = best[centers]
        assert set(stages[0][1][b].tolist()) & set(vis.tolist()) == set(kept.tolist()) | set(hosts.tolist())
        got = {h: sorted(mem.tolist()) for h, mem in recycled[1][b]}
        want = {
            int(h): sorted(best[[i for i, a in enumerate(assign) if a == j]].tolist()) for j, h in enumerate(hosts)
        }
        assert got == want


def test_todre_relevance_matches_eager_attention(llava):
    batch = llava_batch(llava, PROMPTS)
    with torch.no_grad(), vtc.compressed(llava, "todre_llm", budget=12, layer=1, drop_layer=2):
        llava(**batch)
        stages, _, _ = _stages(llava)
    attn, _, _ = _eager_pass(batch)
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    for b in range(len(PROMPTS)):
        vis = (ids[b] == IMAGE_TOKEN).nonzero().squeeze(-1)
        text = (valid[b] & (torch.arange(ids.shape[1]) > vis.max())).nonzero().squeeze(-1)
        score = attn[b][text][:, vis].mean(0)
        kept = vis[torch.sort(score, descending=True, stable=True).indices[:12]]
        assert set(stages[0][1][b].tolist()) & set(vis.tolist()) == set(kept.tolist())


# ---------------------------------------------------------------------- LLaVA-NeXT (AnyRes)
NEXT_SIZES = [(30, 40), (12, 40)]  # 2×2 crops (rows 0 and 7 unpadded away) and 1×2 crops: 64 and 32 visual tokens
NEXT_CASES = {
    "fastv": ("fastv", 12, {"layer": 1}),
    "sparsevlm": ("sparsevlm", 12, {"layers": (1, 2), "scale": 0.0}),
    "todre+todre_llm": ("todre", 24, {"in_llm": TODRE_2}),
}


@pytest.fixture(scope="module")
def llava_next():
    return tiny_llava_next()


@pytest.mark.parametrize("case", NEXT_CASES)
def test_llava_next_prefill_and_cached_decoding_equal_masked_reference(llava_next, case):
    name, budget, cfg = NEXT_CASES[case]
    m = llava_next
    batch = llava_next_batch(m, NEXT_SIZES, PROMPTS[:2])
    with torch.no_grad(), vtc.compressed(m, name, budget=budget, **cfg):
        logits = m(**batch).logits
        stages, recycled, last = _stages(m)
        a = adapter_of(m)
        kept, per_layer = list(a.last["kept"]), a.last["visual_tokens_per_layer"].clone()
        out = _gen(m, batch)
        assert a.last["visual_tokens_per_layer"].tolist() == per_layer.tolist()  # same prefill decisions
    ref = _reference(m, batch, stages, recycled)
    for b, rows in enumerate(last):
        real = batch["attention_mask"][b, rows].bool()
        torch.testing.assert_close(logits[b, -rows.numel() :][real], ref[b, rows][real], atol=1e-4, rtol=1e-4)
    # Visual tokens exclude the row newlines: before the first stage, exactly the tokens placed in the runs.
    assert per_layer[:, 0].tolist() == kept
    if name == "fastv":
        assert kept == [16 + 6 * 8, 16 + 2 * 8] and per_layer[:, 1:].tolist() == [[12, 12], [12, 12]]
    ids = batch["input_ids"]
    for _ in range(3):
        nxt = _reference(m, batch, stages, recycled, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    start = batch["input_ids"].shape[1]
    for row, r in zip(out, ids, strict=True):
        eos = (r[start:] == 2).nonzero()
        stop = start + (int(eos[0]) + 1 if eos.numel() else r.numel() - start)
        assert torch.equal(row[:stop], r[:stop])


def test_llava_next_newlines_stay_and_atp_sees_layout_positions(llava_next):
    """In-LLM stages never drop LLaVA-NeXT's row newlines; ATP's spatial scores use each token's place in the
    reducer layout (thumbnail, then crops), recovered from the packed run."""
    m = llava_next
    batch = llava_next_batch(m, NEXT_SIZES, PROMPTS[:2])
    with torch.no_grad(), vtc.compressed(m, "atp_llm", budget=0.5, layers=(1, 2)):
        m(**batch)
        p = adapter_of(m).in_llm
        layouts = adapter_of(m).layouts
        stages, _, _ = _stages(m)
    ids = batch["input_ids"]
    for b, lay in enumerate(layouts):
        run = (ids[b] == IMAGE_TOKEN).nonzero().squeeze(-1)
        newlines = set(run[lay.newline[lay.newline >= 0].unique()].tolist())
        for _, cols in stages:
            assert newlines <= set(cols[b].tolist())
    sap = p.memo["atp_sap"]
    assert sorted(sap) == [0, 1] and [v.numel() for v in (sap[0], sap[1])] == [16 * 5, 16 * 3]
