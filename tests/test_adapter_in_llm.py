"""In-LLM pruning (FastV, PDrop, DART) through the LLaVA adapter, against a masked full-sequence reference."""

from __future__ import annotations

import pytest
import torch
from tiny_models import llava_batch, stage_masked_attention, tiny_llava
from vtc.adapters import adapter_of

import vtc

PROMPTS = [[10, 11, 12, 13], [14, 15], [16, 17, 18]]
IN_LLM = ["fastv", "pdrop", "dart"]


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=3)


def _gen(m, batch, n=4, **kw):
    with torch.no_grad():
        return m.generate(**batch, max_new_tokens=n, do_sample=False, **kw)


@pytest.mark.parametrize("name", IN_LLM)
def test_full_budget_is_the_untouched_model(model, name):
    batch = llava_batch(model, PROMPTS)
    ref = _gen(model, batch)
    with vtc.compressed(model, name, budget=1.0):
        assert torch.equal(_gen(model, batch), ref)


def _masked_reference(m, batch, stages, ids=None):
    """Logits of the unpatched model over the full sequence, pruned columns masked from their stage on."""
    ids = batch["input_ids"] if ids is None else ids
    with torch.no_grad(), stage_masked_attention(m, batch["attention_mask"], stages, ids.shape[1]) as mask:
        return m(input_ids=ids, attention_mask=mask.long(), pixel_values=batch["pixel_values"]).logits


def _stages(m):
    p = adapter_of(m).in_llm
    return [(s, p.stage_src[s].masked_fill(~p.stage_valid[s], 0)) for s, _ in p.plan]


@pytest.mark.parametrize("name", IN_LLM)
def test_prefill_logits_equal_masked_reference(model, name):
    batch = llava_batch(model, PROMPTS)
    with torch.no_grad(), vtc.compressed(model, name, budget=10, **({"layer": 1} if name != "pdrop" else {})):
        logits = model(**batch).logits
        stages = _stages(model)
        p = adapter_of(model).in_llm
        last_src, last_valid = p.stage_src[p.plan[-1][0]], p.stage_valid[p.plan[-1][0]]
    ref = _masked_reference(model, batch, stages)
    for b in range(len(PROMPTS)):
        rows = last_src[b][last_valid[b]]
        got = logits[b, -rows.numel() :]
        # Only the rows that survive the last stage are output; compare those that are real tokens.
        real = batch["attention_mask"][b, rows].bool()
        torch.testing.assert_close(got[real], ref[b, rows][real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", IN_LLM)
def test_cached_decoding_equals_masked_recompute(model, name):
    batch = llava_batch(model, PROMPTS)
    with vtc.compressed(model, name, budget=10):
        out = _gen(model, batch, n=4)
        stages = _stages(model)
        assert adapter_of(model).last["effective_visual_tokens"] < 64
    ids = batch["input_ids"]
    for _ in range(4):  # greedy decoding by full recomputation, pruned columns masked from their stage on
        nxt = _masked_reference(model, batch, stages, ids=ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    assert torch.equal(out, ids)


def test_plans_and_errors():
    assert vtc.create_reducer("fastv").plan(576, 64, 32) == [(2, 64)]
    pd = vtc.create_reducer("pdrop").plan(576, 72, 32)
    assert [s for s, _ in pd] == [8, 16, 24] and [n for _, n in pd] == [288, 144, 72]
    with pytest.raises(ValueError, match="fastv.*layer=40"):
        vtc.create_reducer("fastv", layer=40).plan(576, 64, 32)
    with pytest.raises(TypeError, match="fastv prunes inside the LLM"):
        vtc.create_reducer("fastv")(torch.randn(1, 16, 8), budget=4)
