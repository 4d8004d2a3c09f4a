"""ToMe (`tome`) and the shared merge kernels (`vtc.ops.merge`): batched code against a per-sample loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vtc
from vtc.ops.merge import bipartite_merge, bipartite_soft_matching, compose_assignment, group_first_index


def _ref_tome(x: torch.Tensor, metric: torch.Tensor, k: int) -> tuple[torch.Tensor, list[int], list[list[int]]]:
    """ToMe by hand for one sample: `x` [N, D], `metric` [N, C] → tokens [k, D], assignment, groups."""
    n = x.shape[0]
    groups = [[i] for i in range(n)]  # kept sorted by their smallest member
    while len(groups) > k:
        cur = len(groups)
        r = min(cur - k, cur // 2)
        feats = [metric[g].double().mean(0) for g in groups]  # a group's key: the mean of its members' keys
        a_set, b_set = list(range(0, cur, 2)), list(range(1, cur, 2))
        edges = []  # (score, A position, best B position)
        for i in a_set:
            sims = [float(F.cosine_similarity(feats[i], feats[j], dim=0)) for j in b_set]
            best = max(range(len(b_set)), key=lambda t: (sims[t], -t))
            edges.append((sims[best], i, b_set[best]))
        chosen = sorted(range(len(edges)), key=lambda t: (-edges[t][0], t))[:r]
        into = {edges[t][1]: edges[t][2] for t in chosen}
        merged: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            merged.setdefault(into.get(i, i), []).extend(g)
        groups = sorted((sorted(g) for g in merged.values()), key=lambda g: g[0])
    assignment = [0] * n
    for row, g in enumerate(groups):
        for i in g:
            assignment[i] = row
    tokens = torch.stack([x[g].double().mean(0) for g in groups]).to(x.dtype)
    return tokens, assignment, groups


def test_one_round_hand_computed():
    # A = {0, 2}, B = {1, 3}. Token 0 is closest to 3 (cos 0.9988), token 2 to 1 (cos 0.8).
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.05]]).unsqueeze(0)
    x = torch.tensor([[1.0], [2.0], [4.0], [8.0]]).unsqueeze(0)
    r = vtc.create_reducer("tome")
    sel = r(vtc.VisualTokens(x, keys=keys), budget=3)  # r = 1: only the best edge 0 → 3 merges
    assert sel.assignment.tolist() == [[0, 1, 2, 0]]
    assert sel.tokens.squeeze(-1).tolist() == [[4.5, 2.0, 4.0]]
    assert sel.weights.tolist() == [[2.0, 1.0, 1.0]]
    assert sel.info["anchors"].tolist() == [[0, 1, 2]] and sel.info["rounds"] == 1
    sel = r(vtc.VisualTokens(x, keys=keys), budget=2)  # r = 2: both edges, still one round
    assert sel.assignment.tolist() == [[0, 1, 1, 0]]
    assert sel.tokens.squeeze(-1).tolist() == [[4.5, 3.0]]
    assert sel.info["rounds"] == 1


@pytest.mark.parametrize("use_keys", [True, False])
@pytest.mark.parametrize("n,k", [(12, 9), (12, 6), (30, 7), (25, 1), (17, 2)])
def test_matches_reference(use_keys, n, k):
    g = torch.Generator().manual_seed(n * 100 + k)
    b = 3
    x = torch.randn(b, n, 5, generator=g)
    keys = torch.randn(b, n, 6, generator=g)
    vt = vtc.VisualTokens(x, keys=keys if use_keys else None)
    sel = vtc.create_reducer("tome")(vt, budget=k)
    for i in range(b):
        tokens, assignment, groups = _ref_tome(x[i], keys[i] if use_keys else x[i], k)
        assert sel.assignment[i].tolist() == assignment
        torch.testing.assert_close(sel.tokens[i], tokens, atol=1e-5, rtol=1e-5)
        assert sel.weights[i].tolist() == [float(len(gr)) for gr in groups]
        assert sel.info["anchors"][i].tolist() == [gr[0] for gr in groups]


def test_rounds_halve_at_most():
    x = torch.randn(1, 64, 4)
    sel = vtc.create_reducer("tome")(x, budget=5)  # 64 → 32 → 16 → 8 → 5
    assert sel.info["rounds"] == 4
    assert vtc.create_reducer("tome")(x, budget=32).info["rounds"] == 1
    assert vtc.create_reducer("tome")(x, budget=31).info["rounds"] == 2


def test_gradient_reaches_tokens():
    x = torch.randn(2, 16, 4, requires_grad=True)
    sel = vtc.create_reducer("tome")(x, budget=5)
    (sel.weights.unsqueeze(-1) * sel.tokens).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # every input counted once


def test_bipartite_merge_kernel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 3, generator=g)
    merged, size, assignment = bipartite_merge(x, x, 4)
    assert merged.shape == (2, 5, 3) and size.sum(-1).tolist() == [9.0, 9.0]
    b_rows = assignment[:, 1::2]  # every B token keeps a row of its own
    assert all(len(set(row)) == 4 for row in b_rows.tolist())
    assert bool((group_first_index(assignment, 5).diff(dim=-1) > 0).all())  # rows ordered by their first member
    # A second merge with sizes equals one merge with the composed assignment.
    merged2, size2, a2 = bipartite_merge(merged, merged, 2, size)
    full = compose_assignment(assignment, a2)
    direct = torch.stack([torch.stack([x[i][full[i] == r].mean(0) for r in range(3)]) for i in range(2)])
    torch.testing.assert_close(merged2, direct)
    assert size2.tolist() == [[float((full[i] == r).sum()) for r in range(3)] for i in range(2)]
    assert bool((group_first_index(full, 3).diff(dim=-1) > 0).all())  # rows ordered by their first member
    with pytest.raises(ValueError, match="at most N // 2 = 4"):
        bipartite_soft_matching(x, 5)


def test_compose_and_first_index_keep_dropped():
    first = torch.tensor([[0, -1, 1, 2]])
    second = torch.tensor([[1, 0, 0]])
    assert compose_assignment(first, second).tolist() == [[1, -1, 0, 0]]
    assert group_first_index(torch.tensor([[1, -1, 1, 0]]), 3).tolist() == [[3, 0, 4]]


@pytest.mark.parametrize("name", ["tome", "visionzip", "prumerge_plus"])
def test_full_budget_reports_merge_bookkeeping(name):
    g = torch.Generator().manual_seed(0)
    vt = vtc.VisualTokens(
        torch.randn(2, 9, 4, generator=g),
        cls_attn=torch.randn(2, 2, 9, generator=g),
        keys=torch.randn(2, 9, 4, generator=g),
        grid=(3, 3),
    )
    sel = vtc.create_reducer(name)(vt, budget=1.0)
    assert torch.equal(sel.tokens, vt.tokens)
    assert sel.weights.tolist() == [[1.0] * 9] * 2 and sel.assignment.tolist() == [list(range(9))] * 2
