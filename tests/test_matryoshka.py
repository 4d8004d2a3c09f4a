"""M3 (matryoshka): nested average pooling against avg_pool2d and a per-bin loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vtc
from vtc.budget import split_budget


def _pool2d(x: torch.Tensor, h: int, w: int, s: int) -> torch.Tensor:
    b, _, d = x.shape
    img = x.reshape(b, h, w, d).permute(0, 3, 1, 2)
    return F.avg_pool2d(img, kernel_size=s, stride=s).permute(0, 2, 3, 1).reshape(b, -1, d)


def _ref_layout(k: int, h: int, w: int) -> list[list[tuple[int, int, int, int]]]:
    """Bins (r0, r1, c0, c1) per band, written plainly from the pinned rule."""
    pairs = [(kh, k // kh) for kh in range(1, k + 1) if k % kh == 0 and kh <= h and k // kh <= w]
    errs = [abs(math.log((kh / kw) / (h / w))) for kh, kw in pairs]
    if pairs and min(errs) <= math.log(2.0):
        kh, kw = pairs[errs.index(min(errs))]
        per_band = [kw] * kh
    else:
        kh = min(h, k, max(math.ceil(k / w), round(math.sqrt(k * h / w))))
        per_band = [k // kh + (1 if r < k % kh else 0) for r in range(kh)]
    bands = []
    for r, c in enumerate(per_band):
        r0, r1 = math.floor(r * h / kh), math.floor((r + 1) * h / kh)
        bands.append([(r0, r1, math.floor(j * w / c), math.floor((j + 1) * w / c)) for j in range(c)])
    return bands


def _ref_pool(x: torch.Tensor, h: int, w: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sample `[h*w, D]` → pooled `[k, D]`, sizes `[k]`, assignment `[h*w]`, by a loop over the bins."""
    out, sizes, assign = [], [], torch.full((h * w,), -1)
    for band in _ref_layout(k, h, w):
        for r0, r1, c0, c1 in band:
            cells = [r * w + c for r in range(r0, r1) for c in range(c0, c1)]
            assign[cells] = len(out)
            out.append(x[cells].double().mean(0))
            sizes.append(len(cells))
    return torch.stack(out), torch.tensor(sizes, dtype=torch.float64), assign


@pytest.mark.parametrize("s", [576, 144, 36, 9, 1])
def test_equals_avg_pool2d_when_divisible(s):
    x = torch.randn(2, 576, 8)
    sel = vtc.create_reducer("matryoshka")(vtc.VisualTokens(x, grid=(24, 24)), budget=s)
    kernel = int(math.sqrt(576 // s))
    torch.testing.assert_close(sel.tokens, _pool2d(x, 24, 24, kernel), atol=1e-5, rtol=1e-5)
    assert sel.info["grid"] == (24 // kernel, 24 // kernel)
    assert torch.all(sel.weights == kernel * kernel)
    assert (sel.indices is None) == (s < 576)  # the full budget is the identity, with its indices


def test_rectangular_divisible_grid():
    x = torch.randn(1, 12 * 8, 4)
    sel = vtc.create_reducer("matryoshka")(vtc.VisualTokens(x, grid=(12, 8)), budget=24)
    assert sel.info["grid"] == (6, 4)
    torch.testing.assert_close(sel.tokens, _pool2d(x, 12, 8, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("h", "w", "k"), [(5, 5, 7), (7, 5, 6), (24, 24, 13), (24, 24, 128), (6, 9, 10), (3, 7, 21), (4, 4, 3), (5, 3, 11)]
)
def test_any_budget_against_per_bin_loop(h, w, k):
    x = torch.randn(2, h * w, 6)
    sel = vtc.create_reducer("matryoshka")(vtc.VisualTokens(x, grid=(h, w)), budget=k)
    assert sel.tokens.shape == (2, k, 6)
    for b in range(2):
        ref, sizes, assign = _ref_pool(x[b], h, w, k)
        torch.testing.assert_close(sel.tokens[b].double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sel.weights[b].double(), sizes)
        assert torch.equal(sel.assignment[b], assign)


def test_chosen_grids():
    r = vtc.create_reducer("matryoshka")
    x = torch.randn(1, 576, 4)
    assert r(vtc.VisualTokens(x, grid=(24, 24)), budget=128).info["grid"] == (8, 16)
    assert r(vtc.VisualTokens(x, grid=(24, 24)), budget=64).info["grid"] == (8, 8)
    # 13 is prime: 1×13 would be strips, so four bands of 4, 3, 3, 3 bins.
    assert r(vtc.VisualTokens(x, grid=(24, 24)), budget=13).info["grid"] == (4, (4, 3, 3, 3))
    # 7 on 5×5 has no factor pair inside the grid at all.
    assert r(vtc.VisualTokens(torch.randn(1, 25, 4), grid=(5, 5)), budget=7).info["grid"] == (3, (3, 2, 2))


@pytest.mark.parametrize(("first", "second"), [(144, 36), (36, 9), (144, 9), (9, 1)])
def test_nested_scales_are_consistent(first, second):
    """Pooling 576→144 and then 144→36 equals pooling 576→36 (the grids divide)."""
    r = vtc.create_reducer("matryoshka")
    x = torch.randn(2, 576, 8)
    a = r(vtc.VisualTokens(x, grid=(24, 24)), budget=first)
    side = int(math.sqrt(first))
    twice = r(vtc.VisualTokens(a.tokens, grid=(side, side)), budget=second).tokens
    direct = r(vtc.VisualTokens(x, grid=(24, 24)), budget=second).tokens
    torch.testing.assert_close(twice, direct, atol=1e-5, rtol=1e-5)


def test_all_scales_matches_forward():
    r = vtc.create_reducer("matryoshka")
    vt = vtc.VisualTokens(torch.randn(2, 576, 8), grid=(24, 24))
    out = r.all_scales(vt)
    assert sorted(out) == [1, 9, 36, 144, 576]
    for k, t in out.items():
        assert t.shape == (2, k, 8)
        assert torch.equal(t, r(vt, budget=k).tokens)
    assert sorted(r.all_scales(vt, scales=(0.25, 100))) == [100, 144]
    with pytest.raises(ValueError, match="matryoshka.*budget=576"):
        r.all_scales(torch.randn(1, 36, 4), scales=(576, 9))


def test_views_are_pooled_separately():
    """Thumbnail + 2 crops: the budget is split over the views and each view is pooled on its own."""
    h = w = 4
    x = torch.randn(2, 3 * h * w, 5)
    r = vtc.create_reducer("matryoshka")
    k = 14
    sel = r(vtc.VisualTokens(x, grid=(h, w), views=(1, 2)), budget=k)
    counts = split_budget(k, [h * w] * 3)
    assert counts == [5, 5, 4]
    parts = [
        r(vtc.VisualTokens(x[:, i * h * w : (i + 1) * h * w], grid=(h, w)), budget=c).tokens
        for i, c in enumerate(counts)
    ]
    torch.testing.assert_close(sel.tokens, torch.cat(parts, 1), atol=1e-6, rtol=1e-6)
    starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
    for i in range(3):  # no bin mixes views
        a = sel.assignment[:, i * h * w : (i + 1) * h * w]
        assert int(a.min()) >= starts[i] and int(a.max()) < starts[i + 1]
    assert sel.info["grid"] == [(2, (3, 2)), (2, (3, 2)), (2, 2)]  # 5 has no factor pair inside 4×4


def test_frames_share_one_grid():
    x = torch.randn(1, 4 * 36, 4)
    sel = vtc.create_reducer("matryoshka")(vtc.VisualTokens(x, grid=(6, 6), frames=4), budget=36)
    assert sel.info["grid"] == (3, 3)
    ref = torch.cat([_pool2d(x[:, i * 36 : (i + 1) * 36], 6, 6, 2) for i in range(4)], 1)
    torch.testing.assert_close(sel.tokens, ref, atol=1e-6, rtol=1e-6)


def test_gradient_reaches_every_input():
    """M3 trains through the pooling: d(sum of outputs)/d(input) = 1 / size of its bin."""
    x = torch.randn(1, 49, 3, requires_grad=True)
    sel = vtc.create_reducer("matryoshka")(vtc.VisualTokens(x, grid=(7, 7)), budget=6)
    sel.tokens.sum().backward()
    expected = (1.0 / sel.weights[0])[sel.assignment[0]]  # [N]
    torch.testing.assert_close(x.grad[0], expected[:, None].expand(-1, 3))


def test_full_budget_has_merge_bookkeeping():
    sel = vtc.create_reducer("matryoshka")(vtc.VisualTokens(torch.randn(2, 36, 4), grid=(6, 6)), budget=1.0)
    assert torch.equal(sel.assignment, torch.arange(36).expand(2, 36))
    assert torch.all(sel.weights == 1) and sel.info["grid"] == (6, 6)
