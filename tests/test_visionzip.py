"""VisionZip (`visionzip`): batched code against a per-sample loop, plus the dominant/contextual split."""

from __future__ import annotations

import math

import pytest
import torch

import vtc
from vtc.reducers.visionzip import contextual_count


def _ref_visionzip(x, cls_attn, keys, k, head_mean=True):
    """VisionZip by hand for one sample: x [N, D], cls_attn [H, N], keys [N, Dk] → tokens, weights, assignment."""
    n, h = x.shape[0], cls_attn.shape[0]
    c = math.floor(k * 10 / 64 + 0.5)
    if k >= 2:
        c = max(c, 1)
    c = min(c, n - k)
    d = k - c
    probs = cls_attn.float().softmax(-1).mean(0)
    dominant = sorted(sorted(range(n), key=lambda i: (-float(probs[i]), i))[:d])
    rest = [i for i in range(n) if i not in dominant]
    step = max(1, len(rest) // max(c, 1))
    targets = [rest[j] for j in range(0, len(rest), step)][:c]
    kk = keys.float().reshape(n, h, -1).mean(1) if head_mean else keys.float()
    kk = kk / kk.norm(dim=-1, keepdim=True)
    groups = {t: [t] for t in targets}
    for i in rest:
        if i in groups or c == 0:  # without contextual tokens the rest is dropped
            continue
        sims = [float(kk[i] @ kk[t]) for t in targets]
        groups[targets[max(range(c), key=lambda j: (sims[j], -j))]].append(i)
    rows = [[i] for i in dominant] + [groups[t] for t in targets]
    tokens = torch.stack([x[g].double().mean(0) for g in rows]).to(x.dtype)
    assignment = [-1] * n
    for r, g in enumerate(rows):
        for i in g:
            assignment[i] = r
    return tokens, [float(len(g)) for g in rows], assignment, dominant, targets


def _inputs(b, n, seed, heads=2, dk=8):
    g = torch.Generator().manual_seed(seed)
    return vtc.VisualTokens(
        torch.randn(b, n, 6, generator=g),
        cls_attn=2 * torch.randn(b, heads, n, generator=g),
        keys=torch.randn(b, n, dk, generator=g),
    )


def test_paper_budget_split():
    assert [contextual_count(k, 576, 10 / 64) for k in (64, 128, 192)] == [10, 20, 30]
    assert contextual_count(1, 576, 10 / 64) == 0  # a single token is a dominant one
    assert contextual_count(2, 576, 10 / 64) == 1  # at least one contextual token from k = 2
    assert contextual_count(36, 36, 10 / 64) == 0  # nothing left to merge at full budget
    assert contextual_count(35, 36, 10 / 64) == 1  # at most N - k


@pytest.mark.parametrize("head_mean", [True, False])
@pytest.mark.parametrize("n,k", [(36, 12), (36, 2), (49, 30), (20, 1), (64, 35), (36, 35)])
def test_matches_reference(head_mean, n, k):
    vt = _inputs(3, n, seed=n + k)
    sel = vtc.create_reducer("visionzip", head_mean_keys=head_mean)(vt, budget=k)
    for i in range(3):
        tokens, weights, assignment, dominant, targets = _ref_visionzip(
            vt.tokens[i], vt.cls_attn[i], vt.keys[i], k, head_mean
        )
        assert sel.assignment[i].tolist() == assignment
        assert sel.weights[i].tolist() == weights
        torch.testing.assert_close(sel.tokens[i], tokens, atol=1e-5, rtol=1e-5)
        assert sel.info["anchors"][i].tolist() == dominant + targets


def test_dominant_tokens_are_the_top_cls_tokens_unchanged():
    vt = _inputs(2, 64, seed=3)
    sel = vtc.create_reducer("visionzip")(vt, budget=16)
    d, c = sel.info["num_dominant"], sel.info["num_contextual"]
    assert (d, c) == (13, 3)  # 16 * 10 / 64 = 2.5 rounds half up
    probs = vt.cls_attn.softmax(-1).mean(1)
    top = probs.topk(d, dim=-1).indices.sort(-1).values
    assert torch.equal(sel.info["anchors"][:, :d], top)
    assert torch.equal(sel.tokens[:, :d], vt.tokens.gather(1, top.unsqueeze(-1).expand(-1, -1, 6)))
    assert bool((sel.weights[:, :d] == 1).all())
    assert sel.weights.sum(-1).tolist() == [64.0, 64.0]  # contextual weights are group sizes


def test_every_remaining_token_is_merged_and_targets_are_strided():
    vt = _inputs(1, 36, seed=5)
    sel = vtc.create_reducer("visionzip")(vt, budget=13)  # c = 2, d = 11, R = 25, stride 12
    d = sel.info["num_dominant"]
    rest = [i for i in range(36) if i not in sel.info["anchors"][0, :d].tolist()]
    assert sel.info["anchors"][0, d:].tolist() == [rest[0], rest[12]]
    assert bool((sel.assignment >= 0).all())  # nothing dropped
    assert bool((sel.assignment[0, rest] >= d).all())


def test_head_mean_needs_divisible_keys():
    vt = _inputs(1, 16, seed=0, heads=3, dk=8)
    with pytest.raises(ValueError, match="visionzip.*Dk=8.*3 heads"):
        vtc.create_reducer("visionzip")(vt, budget=8)
    vtc.create_reducer("visionzip", head_mean_keys=False)(vt, budget=8)
    with pytest.raises(ValueError, match="contextual_ratio"):
        vtc.create_reducer("visionzip", contextual_ratio=1.5)
