"""ToDRE stage 1 (greedy k-center) against a per-sample reference written from the algorithm."""

from __future__ import annotations

import pytest
import torch

import vtc


def _cos_dist(x: torch.Tensor) -> list[list[float]]:
    """1 - cos between all rows of one sample `x: [N, D]`, pair by pair (float64)."""
    n = x.shape[0]
    x = x.double()
    return [[1.0 - float(torch.dot(x[i], x[j]) / (x[i].norm() * x[j].norm())) for j in range(n)] for i in range(n)]


def reference_kcenter(x: torch.Tensor, k: int, first_center: str = "medoid") -> list[int]:
    """Gonzalez's greedy k-center on cosine distance for one sample; ties go to the lowest index."""
    n = x.shape[0]
    d = _cos_dist(x)
    for i in range(n):
        d[i][i] = 0.0
    if first_center == "medoid":  # smallest summed distance to all tokens
        sums = [sum(row) for row in d]
        first = min(range(n), key=lambda i: (sums[i], i))
    else:  # largest distance to the nearest other token
        nn = [min(d[i][j] for j in range(n) if j != i) for i in range(n)]
        first = max(range(n), key=lambda i: (nn[i], -i))
    centers = [first]
    while len(centers) < k:
        radius = [min(d[i][c] for c in centers) for i in range(n)]  # distance to the nearest center
        pick = max((i for i in range(n) if i not in centers), key=lambda i: (radius[i], -i))
        centers.append(pick)
    return centers


def _inputs(b: int, n: int, d: int, seed: int, dtype=torch.float64, features: bool = True) -> vtc.VisualTokens:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64).to(dtype)
    f = torch.randn(b, n, d + 3, generator=g, dtype=torch.float64).to(dtype) if features else None
    return vtc.VisualTokens(x, features=f)


@pytest.mark.parametrize("first_center", ["medoid", "max_nn"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b,n,d,k", [(1, 9, 4, 4), (3, 20, 8, 7), (2, 30, 16, 29), (2, 12, 3, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(b, n, d, k, seed, dtype, first_center):
    vt = _inputs(b, n, d, seed, dtype)
    sel = vtc.create_reducer("todre", first_center=first_center)(vt, budget=k)
    for i in range(b):
        order = reference_kcenter(vt.features[i], k, first_center)
        assert sel.info["order"][i].tolist() == order
        assert sel.indices[i].tolist() == sorted(order)
        assert torch.equal(sel.tokens[i], vt.tokens[i, sorted(order)])  # features choose, tokens are kept


def test_uses_features_when_present_else_tokens():
    with_f = _inputs(2, 24, 8, seed=5)
    no_f = _inputs(2, 24, 8, seed=5, features=False)
    r = vtc.create_reducer("todre")
    a, b = r(with_f, budget=6), r(no_f, budget=6)
    for i in range(2):
        assert a.info["order"][i].tolist() == reference_kcenter(with_f.features[i], 6)
        assert b.info["order"][i].tolist() == reference_kcenter(no_f.tokens[i], 6)
    assert not torch.equal(a.indices, b.indices), "features and tokens should lead to different picks here"


def test_selection_order_is_nested():
    vt = _inputs(2, 40, 8, seed=3, dtype=torch.float32)
    r = vtc.create_reducer("todre")
    orders = [r(vt, budget=k).info["order"] for k in (1, 4, 13, 39)]
    for small, big in zip(orders, orders[1:], strict=False):
        assert torch.equal(big[:, : small.shape[1]], small)


def test_covering_radius_shrinks_with_k():
    """The k-center objective (largest distance of any token to its nearest center) never grows with k."""
    vt = _inputs(1, 30, 6, seed=4)
    d = torch.tensor(_cos_dist(vt.features[0]))
    r = vtc.create_reducer("todre")
    radii = [float(d[:, r(vt, budget=k).indices[0]].amin(1).max()) for k in range(1, 30)]
    assert all(b <= a + 1e-12 for a, b in zip(radii, radii[1:], strict=False))
    assert radii[-1] < radii[0]


def test_bad_first_center():
    with pytest.raises(ValueError, match="first_center='random'"):
        vtc.create_reducer("todre", first_center="random")
