"""QTSplus: scores, budget head, Newton threshold, training gradients, cap, re-encoder, losses, lazy build."""

from __future__ import annotations

import math

import pytest
import torch

import vtc
from vtc.reducers.qtsplus import newton_threshold, qtsplus_aux_loss


def _inputs(b: int = 3, n: int = 30, d: int = 12, t: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g)
    q = torch.randn(b, t, d, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, -2:] = False
    mask[1, -1] = False
    return vtc.VisualTokens(x), vtc.Query(q, mask)


def _make(**cfg) -> vtc.Reducer:
    torch.manual_seed(0)
    return vtc.create_reducer("qtsplus", **cfg).eval()


def _spread_rho(r: vtc.Reducer) -> None:
    """Make the (untrained) budget head spread ρ over samples, so per-sample counts differ (needs `dim` set)."""
    with torch.no_grad():
        r.budget_head.mlp[2].weight.mul_(200.0)


def _slow_scores(r: vtc.Reducer, x: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """r_j = max over heads and real text tokens of softmax_j(q_t · k_j / sqrt(dh)), one sample at a time."""
    sc = r.scorer
    h, dh = sc.n_heads, sc.head_dim

    def norm(v, w):
        return v / torch.sqrt((v * v).mean() + 1e-6) * w

    out = torch.zeros(x.shape[:2])
    for b in range(x.shape[0]):
        keys = [sc.k_proj(norm(x[b, j], sc.kv_norm)) for j in range(x.shape[1])]
        best = torch.full((x.shape[1],), -1.0)
        for ti in range(q.shape[1]):
            if not mask[b, ti]:
                continue
            u = sc.q_proj(norm(q[b, ti], sc.q_norm))
            for hh in range(h):
                sl = slice(hh * dh, (hh + 1) * dh)
                logits = torch.stack([u[sl] @ kj[sl] / math.sqrt(dh) for kj in keys])
                e = torch.exp(logits - logits.max())
                best = torch.maximum(best, e / e.sum())
        out[b] = best
    return out


def test_scores_match_slow_loop_and_ignore_padded_text():
    r = _make(n_heads=3)
    vt, q = _inputs()
    with torch.no_grad():
        sel = r(vt, budget=10, query=q)
        slow = _slow_scores(r, vt.tokens, q.embeds, q.mask)
    torch.testing.assert_close(sel.info["scores"], slow, atol=1e-5, rtol=1e-4)
    changed = q.embeds.clone()
    changed[0, -1] += 100.0  # a padded text token: must change nothing
    with torch.no_grad():
        again = r(vt, budget=10, query=vtc.Query(changed, q.mask))
    assert torch.equal(again.info["scores"], sel.info["scores"])
    assert torch.equal(again.info["rho"], sel.info["rho"])


def test_budget_head_and_count_match_hand_computation():
    r = _make(n_heads=2, head_dim=5, dim=12)
    _spread_rho(r)
    vt, q = _inputs(b=4, n=40)
    k = 15
    with torch.no_grad():
        sel = r(vt, budget=k, query=q)
    scores, rho = sel.info["scores"], sel.info["rho"]
    lin1, lin2 = r.budget_head.mlp[0], r.budget_head.mlp[2]
    m = vt.tokens.shape[1]
    counts = []
    for b in range(4):
        rb = scores[b].double()
        p = rb / rb.sum()
        ent = -sum(float(pj) * math.log(float(pj)) for pj in p)
        sq = q.embeds[b][q.mask[b]].double().mean(0)
        feat = torch.cat([sq, torch.tensor([math.log(m), float(rb.max()), ent], dtype=torch.float64)])
        hid = torch.nn.functional.gelu(lin1.weight.detach().double() @ feat + lin1.bias.detach().double())
        z = (lin2.weight.detach().double() @ hid + lin2.bias.detach().double()).item()
        rho_hand = 0.05 + (0.5 - 0.05) / (1 + math.exp(-z))
        assert abs(rho_hand - float(rho[b])) < 1e-5
        n_hand = min(max(math.ceil(float(rho[b]) * m), 1), k)
        assert int(sel.info["n"][b]) == n_hand == int(sel.num_kept[b])
        counts.append(n_hand)
        # the kept tokens are the top-n by score (lowest index first among ties), ascending
        order = sorted(range(m), key=lambda j: (-float(scores[b, j]), j))[:n_hand]
        assert sel.indices[b][sel.mask[b]].tolist() == sorted(order)
        assert torch.equal(sel.tokens[b][sel.mask[b]], vt.tokens[b, sorted(order)])
        assert not sel.tokens[b][~sel.mask[b]].any()
    assert len(set(counts)) > 1, "the test needs samples with different counts"
    assert sel.tokens.shape[1] == max(counts)


@pytest.mark.parametrize("tau", [0.01, 0.1, 1.0])
def test_newton_threshold_solves_the_budget_equation(tau):
    g = torch.Generator().manual_seed(3)
    r = torch.rand(6, 50, generator=g)
    r[1] = 0.3  # all tied
    r[2, :45] = 1e-4  # a few large scores among near-zero ones
    rho = torch.tensor([0.05, 0.3, 0.5, 0.9, 0.01, 0.5])
    t = newton_threshold(r, rho, tau)
    got = torch.sigmoid((r - t[:, None]) / tau).sum(-1)
    torch.testing.assert_close(got, rho * 50, atol=1e-3, rtol=0)


def test_newton_threshold_gradient_is_the_implicit_one():
    g = torch.Generator().manual_seed(4)
    r = torch.rand(2, 20, generator=g, dtype=torch.float64, requires_grad=True)
    rho = torch.tensor([0.2, 0.45], dtype=torch.float64, requires_grad=True)
    t = newton_threshold(r, rho, 0.1)
    t.sum().backward()
    s = torch.sigmoid((r.detach() - t.detach()[:, None]) / 0.1)
    ds = s * (1 - s) / 0.1  # ∂σ/∂r_j; f = Σσ − ρM, ∂f/∂t = −Σ ds
    torch.testing.assert_close(r.grad, ds / ds.sum(-1, keepdim=True))
    torch.testing.assert_close(rho.grad, -20 / ds.sum(-1))  # ∂f/∂ρ = −M


def test_newton_threshold_with_valid_solves_the_valid_equation():
    """Σ over valid j of σ((r_j − t)/τ) = ρ·M_b, the same t as on the valid entries alone."""
    g = torch.Generator().manual_seed(5)
    r = torch.rand(3, 40, generator=g)
    valid = torch.rand(3, 40, generator=g) < 0.5
    r = r.masked_fill(~valid, 5.0)  # invalid scores, large on purpose: they must not count
    rho = torch.tensor([0.1, 0.4, 0.7])
    t = newton_threshold(r, rho, 0.1, valid=valid)
    for b in range(3):
        alone = newton_threshold(r[b : b + 1, valid[b]], rho[b : b + 1], 0.1)
        torch.testing.assert_close(t[b : b + 1], alone, atol=1e-5, rtol=0)
        got = torch.sigmoid((r[b, valid[b]] - t[b]) / 0.1).sum()
        torch.testing.assert_close(got, rho[b] * valid[b].sum(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("sampling", [True, False])
def test_training_with_valid_keeps_only_valid_tokens_with_gradients(sampling):
    r = _make(n_heads=3, train_sampling=sampling).train()
    vt, q = _inputs(b=3, n=36)
    valid = torch.rand(3, 36, generator=torch.Generator().manual_seed(6)) < 0.6
    vt.valid = valid
    torch.manual_seed(1)
    sel = r(vt, budget=0.5, query=q)
    counts = valid.sum(-1)
    for b in range(3):
        idx = sel.indices[b][sel.mask[b]]
        assert bool(valid[b, idx].all()) and 1 <= idx.numel() <= vtc.resolve_budget(0.5, int(counts[b]))
        assert torch.equal(sel.tokens[b][sel.mask[b]], vt.tokens[b, idx])
    assert not sel.info["soft_mask"][~valid].any() and not sel.info["keep_prob"][~valid].any()
    (sel.tokens * torch.randn(sel.tokens.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    for p in (r.scorer.k_proj.weight, r.budget_head.mlp[2].bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("sampling", [True, False])
def test_training_gradients_reach_scorer_and_budget_head(sampling):
    r = _make(n_heads=3, train_sampling=sampling).train()
    vt, q = _inputs(b=2, n=36)
    k = 20
    torch.manual_seed(1)
    sel = r(vt, budget=k, query=q)
    assert bool((sel.num_kept >= 1).all() and (sel.num_kept <= k).all())
    for b in range(2):  # the straight-through mask is exactly 1 in the forward pass
        assert torch.equal(sel.tokens[b][sel.mask[b]], vt.tokens[b, sel.indices[b][sel.mask[b]]])
    st = sel.info["soft_mask"]
    assert torch.equal(st.detach(), sel.info["hard_mask"].float())
    if not sampling:
        assert torch.equal(sel.num_kept, sel.info["n"])
    w = torch.randn(sel.tokens.shape, generator=torch.Generator().manual_seed(2))
    (sel.tokens * w).sum().backward()  # no auxiliary loss: gradients come through the selection only
    for p in (r.scorer.q_proj.weight, r.scorer.k_proj.weight, r.budget_head.mlp[0].weight, r.budget_head.mlp[2].bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_training_sample_keeps_rho_m_on_average():
    r = _make(rho_min=0.3, rho_max=0.3001).train()
    vt, q = _inputs(b=2, n=100)
    torch.manual_seed(0)
    with torch.no_grad():
        mean = torch.stack([r(vt, budget=100 - 1, query=q).num_kept.float() for _ in range(60)]).mean()
    assert abs(float(mean) - 30.0) < 2.0


def test_budget_cap_holds():
    r = _make(rho_min=0.6, rho_max=0.9)
    vt, q = _inputs(b=3, n=40)
    for k in (1, 5, 17):
        with torch.no_grad():
            sel = r(vt, budget=k, query=q)
        assert torch.equal(sel.num_kept, torch.full((3,), k)) and sel.info["n_max"] == k
    r.train()
    torch.manual_seed(0)
    for k in (1, 5, 17):
        with torch.no_grad():
            assert bool((r(vt, budget=k, query=q).num_kept <= k).all())


def test_reencoder_off_keeps_inputs_on_transforms_them():
    vt, q = _inputs(b=3, n=30)
    off = _make(reencode=False, dim=12)
    on = _make(reencode=True, dim=12)
    _spread_rho(off)
    _spread_rho(on)
    with torch.no_grad():
        a = off(vt, budget=12, query=q)
        b = on(vt, budget=12, query=q)  # zero-initialised output projection: exactly the identity
        assert off.reencoder is None and a.info["reencoded"] is False and b.info["reencoded"] is True
        for i in range(3):
            assert torch.equal(a.tokens[i][a.mask[i]], vt.tokens[i, a.indices[i][a.mask[i]]])
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.indices, b.indices)
        on.reencoder.o_proj.weight.normal_()
        c = on(vt, budget=12, query=q)
        assert torch.equal(c.indices, a.indices) and torch.equal(c.mask, a.mask)  # indices name the sources
        assert not torch.allclose(c.tokens[c.mask], a.tokens[a.mask])
        assert not c.tokens[~c.mask].any()
        for i in range(3):  # padding is never attended to: batch rows equal single calls
            one = on(vt.index_batch(slice(i, i + 1)), budget=12, query=q.index_batch(slice(i, i + 1)))
            m = int(one.num_kept[0])
            torch.testing.assert_close(c.tokens[i, :m], one.tokens[0, :m], atol=1e-5, rtol=1e-5)


def test_aux_loss_terms():
    rho = torch.tensor([0.1, 0.3], requires_grad=True)
    out = qtsplus_aux_loss(rho, num_tokens=200, n_max=64, rho_mean=0.15, lambda_t=2.0, lambda_m=0.5, lambda_s=3.0)
    flops = 2.0 * ((20.0**2 + 60.0**2) / 2) / 64**2
    kv = 0.5 * ((20.0 + 60.0) / 2) / 64
    smooth = 3.0 * ((0.1 - 0.15) ** 2 + (0.3 - 0.15) ** 2) / 2
    for key, want in (("flops", flops), ("kv", kv), ("smooth", smooth), ("total", flops + kv + smooth)):
        assert abs(out[key].item() - want) < 1e-6, key
    out["total"].backward()
    assert rho.grad is not None and bool((rho.grad > 0).all())
    default = qtsplus_aux_loss(torch.tensor([0.2, 0.4]), 100, 50)  # ρ̄ = batch mean, official lambdas
    assert abs(float(default["smooth"]) - 0.05 * 0.01) < 1e-7


def test_lazy_build_matches_eager_and_loads_checkpoints():
    vt, q = _inputs(d=12)
    lazy, eager = _make(), _make(dim=12)
    state = torch.get_rng_state()
    with torch.no_grad():
        a = lazy(vt, budget=9, query=q)
    assert torch.equal(torch.get_rng_state(), state), "building the parameters must not consume the global RNG"
    sd = lazy.state_dict()
    assert sd.keys() == eager.state_dict().keys()
    assert all(torch.equal(sd[key], eager.state_dict()[key]) for key in sd)
    fresh = vtc.create_reducer("qtsplus").eval()
    fresh.load_state_dict(sd)
    with torch.no_grad():
        b = fresh(vt, budget=9, query=q)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.info["rho"], b.info["rho"])
    with torch.inference_mode():
        built_late = _make()
        built_late(vt, budget=9, query=q)
    assert not built_late.scorer.q_proj.weight.is_inference() and built_late.scorer.q_proj.weight.requires_grad
    with pytest.raises(ValueError, match=r"qtsplus.*D=12.*D=8"):
        lazy(vtc.VisualTokens(vt.tokens[..., :8]), budget=9, query=q.embeds[..., :8])


def test_bad_config_names_the_reducer():
    with pytest.raises(ValueError, match=r"qtsplus.*rho_min=0.6"):
        vtc.create_reducer("qtsplus", rho_min=0.6, rho_max=0.5)
    with pytest.raises(ValueError, match=r"qtsplus.*tau=0"):
        vtc.create_reducer("qtsplus", tau=0.0)
