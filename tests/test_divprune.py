"""DivPrune and the max-min greedy (`vtc.ops.diversity`) against a per-sample reference written from the paper."""

from __future__ import annotations

import pytest
import torch

import vtc
from vtc.ops.diversity import cosine_distance, farthest_point_sampling, nearest_neighbour_distance


def _dist(x: torch.Tensor, i: int, j: int) -> float:
    """1 - cos between rows i and j of x (float64)."""
    a, b = x[i].double(), x[j].double()
    return 1.0 - float(torch.dot(a, b) / (a.norm() * b.norm()))


def reference_divprune(x: torch.Tensor, k: int) -> list[int]:
    """Selection order for one sample `x: [N, D]`: first the token farthest from its nearest neighbour, then
    repeatedly the token whose smallest distance to the kept ones is largest (ties: lowest index)."""
    n = x.shape[0]
    d = [[_dist(x, i, j) for j in range(n)] for i in range(n)]
    best, first = -1.0, -1
    for i in range(n):
        nn = min(d[i][j] for j in range(n) if j != i)
        if nn > best:
            best, first = nn, i
    order = [first]
    while len(order) < k:
        best, pick = -1.0, -1
        for i in range(n):
            if i in order:
                continue
            m = min(d[i][j] for j in order)
            if m > best:
                best, pick = m, i
        order.append(pick)
    return order


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b,n,d,k", [(1, 9, 4, 4), (3, 20, 8, 7), (2, 30, 16, 29), (2, 12, 3, 1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(b, n, d, k, seed, dtype):
    x = torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    sel = vtc.create_reducer("divprune")(x, budget=k)
    for i in range(b):
        order = reference_divprune(x[i], k)
        assert sel.info["order"][i].tolist() == order
        assert sel.indices[i].tolist() == sorted(order)
        assert torch.equal(sel.tokens[i], x[i, sorted(order)])


def test_selection_order_is_nested():
    x = torch.randn(2, 40, 8, generator=torch.Generator().manual_seed(3))
    r = vtc.create_reducer("divprune")
    orders = [r(x, budget=k).info["order"] for k in (1, 5, 17, 39)]
    for small, big in zip(orders, orders[1:], strict=False):
        assert torch.equal(big[:, : small.shape[1]], small)


def test_keeps_one_of_each_duplicate_group():
    """Tokens drawn from 6 distinct directions: 6 kept tokens are the 6 directions, never two copies."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(6, 8, generator=g)
    pick = torch.randperm(36, generator=g) % 6  # each direction 6 times, shuffled
    x = (base[pick] * torch.rand(36, 1, generator=g).add(0.5)).unsqueeze(0)  # rescaled copies: same cosine
    sel = vtc.create_reducer("divprune")(x, budget=6)
    assert sorted(pick[sel.indices[0]].tolist()) == list(range(6))
    # Once every direction is kept all remaining distances are 0: picks continue without repeats.
    sel = vtc.create_reducer("divprune")(x, budget=20)
    assert len(set(sel.indices[0].tolist())) == 20


def test_invariant_to_token_scale():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 25, 8, generator=g)
    scaled = x * torch.rand(2, 25, 1, generator=g).mul(10).add(0.1)
    r = vtc.create_reducer("divprune")
    assert torch.equal(r(x, budget=9).indices, r(scaled, budget=9).indices)


def test_uses_tokens_not_features():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 16, 8, generator=g)
    vt = vtc.VisualTokens(x, features=torch.randn(1, 16, 12, generator=g))
    sel = vtc.create_reducer("divprune")(vt, budget=5)
    assert sel.info["order"][0].tolist() == reference_divprune(x[0], 5)


def test_ops_distance_and_first_pick():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 10, 5, generator=g)
    dist = cosine_distance(x)
    assert dist.dtype == torch.float32
    assert torch.equal(dist, dist.transpose(1, 2)) and bool((dist.diagonal(dim1=1, dim2=2) == 0).all())
    for b in range(2):
        for i in range(10):
            for j in range(10):
                if i != j:
                    assert abs(float(dist[b, i, j]) - _dist(x[b], i, j)) < 1e-5
    nn = nearest_neighbour_distance(dist)
    order, idx = farthest_point_sampling(dist, 4)
    assert torch.equal(order[:, 0], nn.argmax(-1))
    assert torch.equal(idx, order.sort(-1).values)
    order, _ = farthest_point_sampling(dist, 4, first=torch.tensor([3, 8]))
    assert order[:, 0].tolist() == [3, 8]
    with pytest.raises(ValueError, match="k=11"):
        farthest_point_sampling(dist, 11)


def test_ties_go_to_the_lowest_index():
    # Four copies of one token: every distance is 0, so the picks are 0, 1, 2 in order.
    x = torch.ones(1, 4, 3)
    order, _ = farthest_point_sampling(cosine_distance(x), 3)
    assert order[0].tolist() == [0, 1, 2]
