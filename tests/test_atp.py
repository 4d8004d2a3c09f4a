"""ATP-LLaVA: importance scores, SAP lattice, inference rule, training mask and loss against plain references."""

from __future__ import annotations

import math

import pytest
import torch

import vtc
from vtc.reducers.atp import (
    ATPThresholds,
    atp_loss,
    hard_keep,
    importance_scores,
    minmax,
    redundancy_score,
    soft_keep_mask,
    spatial_scores,
)


def _ref_scores(q_vis, k_vis, q_text, mask):
    """Loops: S_self[j] = mean_{h,i} q_i·k_j/√d; S_cross[j] = mean_{h, real t} softmax_j(q_t·k/√d)."""
    b, hq, n, dh = q_vis.shape
    rep = hq // k_vis.shape[1]
    s_self = torch.zeros(b, n, dtype=torch.float64)
    s_cross = torch.zeros(b, n, dtype=torch.float64)
    for bi in range(b):
        real = [t for t in range(q_text.shape[2]) if mask[bi, t]]
        for h in range(hq):
            kk = k_vis[bi, h // rep].double()
            for j in range(n):
                s_self[bi, j] += sum(float(q_vis[bi, h, i].double() @ kk[j]) for i in range(n)) / n / math.sqrt(dh)
            for t in real:
                logits = [float(q_text[bi, h, t].double() @ kk[j]) / math.sqrt(dh) for j in range(n)]
                z = [math.exp(x - max(logits)) for x in logits]
                for j in range(n):
                    s_cross[bi, j] += z[j] / sum(z) / len(real)
    return s_self / hq, s_cross / hq


def test_importance_scores_against_loops_with_gqa_and_padding():
    g = torch.Generator().manual_seed(0)
    b, h, hk, n, t, dh = 2, 4, 2, 7, 5, 6
    q_vis = torch.randn(b, h, n, dh, generator=g)
    k_vis = torch.randn(b, hk, n, dh, generator=g)
    q_text = torch.randn(b, h, t, dh, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 3:] = False
    s_self, s_cross = importance_scores(q_vis, k_vis, q_text, mask)
    ref_self, ref_cross = _ref_scores(q_vis, k_vis, q_text, mask)
    torch.testing.assert_close(s_self.double(), ref_self, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_cross.double(), ref_cross, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s_cross.sum(-1), torch.ones(b))  # a mean of distributions over the N tokens


def test_reducer_scores_come_from_the_embeddings():
    """Pre-LLM: q = k = visual embeddings, text queries = question embeddings, one head, scale 1/√D."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 8, generator=g)
    q = torch.randn(2, 3, 8, generator=g)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    torch.manual_seed(0)
    sel = vtc.create_reducer("atp").eval()(vtc.VisualTokens(x, grid=(3, 3)), budget=5, query=vtc.Query(q, mask))
    ref_self, ref_cross = _ref_scores(x[:, None], x[:, None], q[:, None], mask)
    expected = 0.5 * (minmax(ref_self) + minmax(ref_cross))
    torch.testing.assert_close(sel.info["s_red"].double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(redundancy_score(ref_self, ref_cross), expected)


def test_sap_lattice_positions():
    """Rate 1/16 of 24×24 is the 6×6 lattice of rows/cols 2, 6, …, 22; rate 1/64 the 3×3 one of 4, 12, 20."""
    lam = 3.0
    s = spatial_scores(24, 24, [1 / 16], lam).reshape(24, 24)
    on = torch.zeros(24, 24, dtype=torch.bool)
    for r in range(2, 24, 4):
        for c in range(2, 24, 4):
            on[r, c] = True
    assert torch.all(s[on] == 1 - lam / 16) and torch.all(s[~on] == 0)

    ladder = spatial_scores(24, 24, [1 / 64, 1 / 16], lam).reshape(24, 24)
    coarse = torch.zeros(24, 24, dtype=torch.bool)
    for r in (4, 12, 20):
        for c in (4, 12, 20):
            coarse[r, c] = True
    assert torch.all(ladder[coarse] == 1 - lam / 64)  # the sparsest lattice holding a token sets its score
    assert torch.all(ladder[on & ~coarse] == 1 - lam / 16)
    assert torch.all(ladder[~on & ~coarse] == 0)
    # Views/frames repeat the per-view pattern.
    assert torch.equal(spatial_scores(6, 6, [1 / 9], lam, views=3), spatial_scores(6, 6, [1 / 9], lam).repeat(3))


def test_sap_threshold_picks_the_sampling_density():
    """S_sp > θ_s keeps exactly the lattices with rate R < (1 − θ_s)/λ."""
    rates = (1 / 64, 1 / 36, 1 / 16, 1 / 9, 1 / 4)
    s = spatial_scores(24, 24, rates)
    for theta, expected in ((0.95, 9), (0.9, 9 + 16), (0.5, None)):
        kept = int((s > theta).sum())
        if expected is not None:
            assert kept == expected
        else:  # rates below 1/6: the 1/64, 1/36, 1/16 and 1/9 lattices
            union = torch.zeros(576, dtype=torch.bool)
            for r in rates[:4]:
                union[spatial_scores(24, 24, [r]) > 0] = True
            assert kept == int(union.sum())


def _ref_hard_keep(s_red, s_sp, theta, k):
    out = torch.zeros(s_red.shape, dtype=torch.bool)
    for b in range(s_red.shape[0]):
        tr, ts = float(theta[b, 0]), float(theta[b, 1])
        n = s_red.shape[1]
        passed = [j for j in range(n) if float(s_red[b, j]) > tr or float(s_sp[b, j]) > ts]
        margin = [max(float(s_red[b, j]) - tr, float(s_sp[b, j]) - ts) for j in range(n)]
        ranked = sorted(range(n), key=lambda j: (-margin[j], -float(s_red[b, j]), j))
        count = min(max(len(passed), 1), k)
        for j in ranked[:count]:
            out[b, j] = True
        if 1 <= len(passed) <= k:
            assert sorted(ranked[:count]) == passed
    return out


@pytest.mark.parametrize("k", [1, 3, 10, 36])
def test_inference_rule_against_per_token_loop(k):
    g = torch.Generator().manual_seed(k)
    b, n = 5, 36
    s_red = torch.rand(b, n, generator=g)
    s_red[0, :4] = s_red[0, 4:8]  # ties in S_red
    s_sp = spatial_scores(6, 6, (1 / 36, 1 / 9, 1 / 4)).expand(b, n)  # many equal spatial scores
    theta = torch.rand(b, 2, generator=g)
    theta[1] = torch.tensor([0.999, 0.999])  # nothing passes: the best token is still kept
    theta[2] = torch.tensor([0.0, 0.0])  # everything passes: the cap decides
    got = hard_keep(s_red, s_sp, theta, k)
    assert torch.equal(got, _ref_hard_keep(s_red, s_sp, theta, k))
    assert bool((got.sum(-1) >= 1).all() and (got.sum(-1) <= k).all())
    # Before the cap the rule is exactly "soft mask > 1/2".
    soft = soft_keep_mask(s_red, s_sp, theta, 10.0)
    passed = (s_red > theta[:, :1]) | (s_sp > theta[:, 1:])
    assert torch.equal(soft > 0.5, passed)


def test_budget_cap_and_adaptivity():
    g = torch.Generator().manual_seed(2)
    vt = vtc.VisualTokens(torch.randn(3, 144, 16, generator=g), grid=(12, 12))
    q = torch.randn(3, 6, 16, generator=g)
    torch.manual_seed(0)
    r = vtc.create_reducer("atp").eval()
    with torch.no_grad():
        loose = r(vt, budget=143, query=q)
        tight = r(vt, budget=10, query=q)
    passed = loose.info["num_passed"]
    assert torch.equal(loose.num_kept, passed.clamp(1, 143))  # under a loose cap the thresholds decide
    assert len(set(passed.tolist())) > 1  # and they decide per instance
    assert torch.all(tight.num_kept == 10)  # every sample passes more than 10
    for b in range(3):  # the capped set is the top of the uncapped one
        assert set(tight.indices[b].tolist()) <= set(loose.indices[b][loose.mask[b]].tolist())


def test_thresholds_init_and_training_mask_gradients():
    torch.manual_seed(0)
    r = vtc.create_reducer("atp").train()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 36, 8, generator=g, requires_grad=True)
    q = torch.randn(2, 4, 8, generator=g)
    sel = r(vtc.VisualTokens(x, grid=(6, 6)), budget=12, query=q)
    theta = sel.info["theta"]
    torch.testing.assert_close(theta, torch.tensor([[0.5, 0.7]]).expand(2, 2), atol=0.01, rtol=0)
    soft = sel.info["soft_mask"]
    assert soft.requires_grad and soft.shape == (2, 36)
    red = torch.sigmoid(10 * (sel.info["s_red"] - theta[:, :1]))
    expected = torch.maximum(red, torch.sigmoid(10 * (sel.info["s_spatial"] - theta[:, 1:])))
    torch.testing.assert_close(soft, expected)
    kept = soft.sum(-1, keepdim=True)  # [B, 1]: one pruning layer
    atp_loss(kept, [2], 36, target=9.0).backward()
    for name, p in r.thresholds.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert x.grad is not None and float(x.grad.abs().sum()) > 0  # and to the scores themselves


def test_threshold_head_is_per_instance():
    torch.manual_seed(0)
    head = ATPThresholds(hidden=8)
    with torch.no_grad():  # a trained-looking head: thresholds now depend on the inputs
        head.head.weight.normal_(std=1.0)
    a, c = torch.rand(3, 10), torch.rand(3, 10)
    a[0] *= 0.1
    th = head(a, c)
    assert th.shape == (3, 2) and bool(((th > 0) & (th < 1)).all())
    assert not torch.allclose(th[0], th[1])
    for i in range(3):  # no coupling across the batch
        torch.testing.assert_close(head(a[i : i + 1], c[i : i + 1])[0], th[i])


def test_loss_value():
    kept = torch.tensor([[100.0, 50.0], [200.0, 150.0]], requires_grad=True)
    loss = atp_loss(kept, [4, 16], 576, target=144)
    hand = []
    for row in kept.tolist():
        hand.append(0.05 * (row[0] / 576 * 4 + row[1] / 576 * 16) + 0.2 * abs(sum(row) / 2 - 144))
    assert math.isclose(float(loss), sum(hand) / 2, rel_tol=1e-6)
    loss.backward()
    assert kept.grad is not None
    with pytest.raises(ValueError, match="kept must be"):
        atp_loss(kept, [4], 576, target=144)


def test_bad_config():
    with pytest.raises(ValueError, match="init_theta_red"):
        vtc.create_reducer("atp", init_theta_red=1.5)
    with pytest.raises(ValueError, match="spatial_rates"):
        vtc.create_reducer("atp", spatial_rates=(0.0,))
