"""MMTok and the greedy coverage kernel (`vtc.ops.coverage`) against a per-sample reference from the paper:
f(S) recomputed from scratch for every candidate at every step."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import vtc
from vtc.ops.coverage import facility_location_value, greedy_coverage


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def _softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    e = [math.exp(v - top) for v in xs]
    return [v / sum(e) for v in e]


def reference_matrix(z, x, v, alpha=0.5, tau_t=0.02, tau_v=0.2) -> torch.Tensor:
    """[P; Q] for one sample: z [m, D] real query tokens, x [N, D] tokens, v [N, Dv] vision features."""
    m, n = z.shape[0], x.shape[0]
    p = [[s / m for s in _softmax([_cos(z[t], x[j]) / tau_t for j in range(n)])] for t in range(m)]
    q = [[alpha * s / n for s in _softmax([_cos(v[i], v[j]) / tau_v for j in range(n)])] for i in range(n)]
    return torch.tensor(p + q, dtype=torch.float64)


def coverage(w: torch.Tensor, s: list[int]) -> float:
    """f(S) = sum over rows of the best similarity to a member of S (0 for the empty set)."""
    return sum(max(float(w[r, j]) for j in s) for r in range(w.shape[0])) if s else 0.0


def reference_greedy(w: torch.Tensor, k: int) -> list[int]:
    """Add the candidate with the largest f(S + [j]), recomputed from scratch; ties go to the lowest index."""
    s: list[int] = []
    while len(s) < k:
        vals = {j: coverage(w, s + [j]) for j in range(w.shape[1]) if j not in s}
        best = max(vals.values())
        s.append(min(j for j, val in vals.items() if val == best))
    return s


def _inputs(b, n, d, t, seed, dtype=torch.float64, features=True, pad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    f = torch.randn(b, n, d + 2, generator=g, dtype=torch.float64) if features else None
    q = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.bool)
    if pad:  # ragged questions: sample i has t - i real tokens (at least 1)
        for i in range(b):
            mask[i, max(1, t - i) :] = False
    vt = vtc.VisualTokens(x.to(dtype), features=None if f is None else f.to(dtype))
    return vt, vtc.Query(q.to(dtype), mask)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b,n,d,t,k", [(1, 9, 4, 3, 4), (3, 16, 8, 5, 7), (2, 20, 16, 4, 19), (2, 12, 3, 1, 1)])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("features", [True, False])
def test_matches_reference(b, n, d, t, k, seed, dtype, features):
    vt, q = _inputs(b, n, d, t, seed, dtype, features)
    cfg = dict(alpha=0.7, tau_text=0.05, tau_vision=0.3) if seed else {}
    sel = vtc.create_reducer("mmtok", **cfg)(vt, budget=k, query=q)
    ref_cfg = dict(alpha=cfg.get("alpha", 0.5), tau_t=cfg.get("tau_text", 0.02), tau_v=cfg.get("tau_vision", 0.2))
    for i in range(b):
        v = vt.features[i] if features else vt.tokens[i]
        w = reference_matrix(q.embeds[i][q.mask[i]], vt.tokens[i], v, **ref_cfg)
        order = reference_greedy(w, k)
        assert sel.info["order"][i].tolist() == order
        assert sel.indices[i].tolist() == sorted(order)
        assert torch.equal(sel.tokens[i], vt.tokens[i, sorted(order)])
        assert math.isclose(float(sel.info["coverage"][i]), coverage(w, order), rel_tol=1e-5)


def test_padded_query_rows_count_for_nothing():
    vt, q = _inputs(2, 20, 8, 6, seed=3, dtype=torch.float32)
    r = vtc.create_reducer("mmtok")
    base = r(vt, budget=5, query=q)
    noisy = q.embeds.clone()
    noisy[~q.mask] = 100 * torch.randn(int((~q.mask).sum()), 8)
    assert torch.equal(r(vt, budget=5, query=vtc.Query(noisy, q.mask)).indices, base.indices)
    for i in range(2):  # same as a call with only the real question tokens
        one = r(vt.index_batch(slice(i, i + 1)), budget=5, query=q.embeds[i][q.mask[i]])
        assert torch.equal(one.indices[0], base.indices[i])
    # ...and the mask matters: counting the padded rows changes the choice here.
    assert not torch.equal(r(vt, budget=5, query=q.embeds).indices, base.indices)


def test_question_pulls_its_token_first():
    vt, _ = _inputs(2, 20, 8, 1, seed=4, dtype=torch.float32)
    q = torch.stack([vt.tokens[0, 7:8], vt.tokens[1, 13:14]])  # [2, 1, D]: each question is one visual token
    sel = vtc.create_reducer("mmtok")(vt, budget=3, query=q)
    assert sel.info["order"][:, 0].tolist() == [7, 13]


def test_coverage_grows_with_k_and_order_is_nested():
    vt, q = _inputs(2, 24, 8, 4, seed=5, dtype=torch.float32)
    r = vtc.create_reducer("mmtok")
    sels = [r(vt, budget=k, query=q) for k in range(1, 24)]
    cov = torch.stack([s.info["coverage"] for s in sels], 1)  # [B, 23]
    assert bool((cov[:, 1:] >= cov[:, :-1]).all())
    for small, big in zip(sels, sels[1:], strict=False):
        assert torch.equal(big.info["order"][:, : small.info["order"].shape[1]], small.info["order"])


def test_greedy_kernel_against_brute_force():
    """Coverage values, masked rows, and the (1 - 1/e) guarantee of the greedy on small random problems."""
    g = torch.Generator().manual_seed(6)
    w = torch.rand(3, 7, 8, generator=g, dtype=torch.float64) ** 3  # [B, R, N]
    rows = torch.rand(3, 7, generator=g) > 0.3
    order, idx, gains = greedy_coverage(w, 3, row_mask=rows)
    assert torch.equal(idx, order.sort(-1).values)
    for b in range(3):
        wb = w[b][rows[b]]
        assert order[b].tolist() == reference_greedy(wb, 3)
        assert math.isclose(float(gains[b].sum()), coverage(wb, order[b].tolist()), rel_tol=1e-12)
        assert math.isclose(float(facility_location_value(w, idx, rows)[b]), coverage(wb, idx[b].tolist()))
        best = max(coverage(wb, list(s)) for s in itertools.combinations(range(8), 3))
        assert float(gains[b].sum()) >= (1 - 1 / math.e) * best - 1e-12
    # Masked rows can hold anything.
    w2 = torch.where(rows.unsqueeze(-1), w, 5 * torch.rand(w.shape, generator=g, dtype=w.dtype))
    assert torch.equal(greedy_coverage(w2, 3, row_mask=rows)[0], order)
    assert not torch.equal(greedy_coverage(w2, 3)[0], order)
    with pytest.raises(ValueError, match="k=9"):
        greedy_coverage(w, 9)


def test_bad_config():
    for bad in (dict(tau_text=0.0), dict(tau_vision=-1.0), dict(alpha=-0.1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            vtc.create_reducer("mmtok", **bad)
