"""LLaVA-PruMerge+ (`prumerge_plus`): batched code against a per-sample loop, plus the IQR outlier rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vtc
from vtc.budget import split_budget
from vtc.ops.grid import uniform_grid_indices

FAR = 1e9


def _ref_lattice(kv, h, w, cells):
    """kv points over the valid `cells` (row-major positions) of an h×w grid: the uniform lattice of their rectangle
    when they fill one, else kv of them at even steps."""
    rows = sorted({c // w for c in cells})
    cols = sorted({c % w for c in cells})
    if (
        len(cells) == len(rows) * len(cols)
        and rows == list(range(rows[0], rows[-1] + 1))
        and cols == list(range(cols[0], cols[-1] + 1))
    ):
        hh, ww = len(rows), len(cols)
        return [(rows[0] + int(p) // ww) * w + cols[0] + int(p) % ww for p in uniform_grid_indices(kv, hh, ww)]
    return [cells[math.floor((i + 0.5) * len(cells) / kv)] for i in range(kv)]


def _ref_prumerge_plus(x, cls_attn, keys, k, grid, views=1, num_neighbors=32, iqr_scale=1.5, valid=None):
    """PruMerge+ by hand for one sample: x [N, D], cls_attn [H, N], keys [N, Dk]; `valid` [N] bool (None: all)."""
    n = x.shape[0]
    h, w = grid
    ok = [True] * n if valid is None else valid.tolist()
    a = cls_attn.float().softmax(-1).mean(0)
    q1, q3 = np.percentile(a.double().numpy()[np.array(ok)], [25, 75])
    outliers = [i for i in range(n) if ok[i] and float(a[i]) > q3 + iqr_scale * (q3 - q1)]
    kept_out = sorted(outliers, key=lambda i: (-float(a[i]), i))[:k]
    lattice = []
    cells = [[c for c in range(h * w) if ok[v * h * w + c]] for v in range(views)]
    for v, kv in enumerate(split_budget(k, [len(c) for c in cells])):
        if kv:
            lattice += [p + v * h * w for p in _ref_lattice(kv, h, w, cells[v])]

    def dist(p, o):
        if p // (h * w) != o // (h * w):
            return FAR
        (r1, c1), (r2, c2) = divmod(p % (h * w), w), divmod(o % (h * w), w)
        return (r1 - r2) ** 2 + (c1 - c2) ** 2

    near = [min([dist(p, o) for o in kept_out], default=FAR) for p in lattice]
    fill = sorted(range(k), key=lambda j: (-near[j], j))[: k - len(kept_out)]
    kept = sorted(kept_out + [lattice[j] for j in fill])
    assert len(set(kept)) == k
    pruned = [i for i in range(n) if i not in kept and ok[i]]
    kn = keys.float() / keys.float().norm(dim=-1, keepdim=True)
    m = min(num_neighbors, len(pruned))
    tokens, weights, assignment, best = [], [], [-1] * n, {}
    for row, p in enumerate(kept):
        sims = {q: float(kn[p] @ kn[q]) for q in pruned}
        nbrs = sorted(pruned, key=lambda q: -sims[q])[:m]
        tokens.append(x[p].double() + sum((float(a[q]) * x[q].double() for q in nbrs), torch.zeros(x.shape[1])))
        weights.append(float(a[p]) + sum(float(a[q]) for q in nbrs))
        assignment[p] = row
        for q in nbrs:
            if q not in best or sims[q] > best[q][0]:
                best[q] = (sims[q], row)
    for q, (_, row) in best.items():
        assignment[q] = row
    return torch.stack(tokens).float(), weights, assignment, kept, len(outliers)


def _inputs(b, grid, seed, views=None, spikes=0):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] * (1 + (views[0] * views[1] if views else 0))
    attn = torch.randn(b, 2, n, generator=g)
    if spikes:  # a few clear outliers per sample
        idx = torch.randint(0, n, (b, spikes), generator=g)
        attn.scatter_add_(2, idx.unsqueeze(1).expand(-1, 2, -1), torch.full((b, 2, spikes), 6.0))
    return vtc.VisualTokens(
        torch.randn(b, n, 5, generator=g),
        cls_attn=attn,
        keys=torch.randn(b, n, 8, generator=g),
        grid=grid,
        views=views,
    )


@pytest.mark.parametrize(
    "grid,k,views,spikes,nn",
    [((6, 6), 9, None, 4, 32), ((6, 6), 3, None, 6, 4), ((5, 7), 12, None, 0, 3), ((4, 4), 15, None, 2, 32),
     ((3, 3), 10, (1, 2), 3, 5), ((8, 8), 20, None, 5, 2)],
)  # fmt: skip
def test_matches_reference(grid, k, views, spikes, nn):
    vt = _inputs(3, grid, seed=k, views=views, spikes=spikes)
    sel = vtc.create_reducer("prumerge_plus", num_neighbors=nn)(vt, budget=k)
    nv = 1 + (views[0] * views[1] if views else 0)
    for i in range(3):
        tokens, weights, assignment, kept, count = _ref_prumerge_plus(
            vt.tokens[i], vt.cls_attn[i], vt.keys[i], k, grid, nv, num_neighbors=nn
        )
        assert sel.info["anchors"][i].tolist() == kept
        assert int(sel.info["iqr_count"][i]) == count
        assert sel.assignment[i].tolist() == assignment
        torch.testing.assert_close(sel.tokens[i], tokens, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sel.weights[i], torch.tensor(weights), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "grid,views,budget,nn",
    [((6, 6), None, 9, 32), ((4, 4), (2, 2), 0.3, 3), ((3, 3), (1, 2), 4, 32), ((5, 5), (2, 1), 2, 5)],
)
def test_valid_mask_matches_reference(grid, views, budget, nn):
    """Tokens marked invalid (rows/columns cut from the crop canvas, or random cells) are never kept or absorbed;
    quartiles, lattice and neighbours follow the valid tokens (batched code against the per-sample loop)."""
    vt = _inputs(3, grid, seed=len(grid) + nn, views=views, spikes=3)
    n, hw = vt.tokens.shape[1], grid[0] * grid[1]
    g = torch.Generator().manual_seed(nn)
    valid = torch.rand(3, n, generator=g) < 0.7  # sample 0: random cells
    valid[0, 0] = True
    valid[1:] = True
    rows, cols = views or (1, 1)
    valid[1].view(-1, *grid)[:, 0] = False  # sample 1: the first row of every view (thumbnail too) removed
    if views:  # sample 2: the first and last column of the crop canvas removed
        canvas = torch.ones(rows * grid[0], cols * grid[1], dtype=torch.bool)
        canvas[:, [0, -1]] = False
        valid[2, hw:] = canvas.reshape(rows, grid[0], cols, grid[1]).permute(0, 2, 1, 3).reshape(-1)
    vt.valid = valid
    sel = vtc.create_reducer("prumerge_plus", num_neighbors=nn)(vt, budget=budget)
    nv = 1 + rows * cols if views else 1
    for i in range(3):
        m = int(valid[i].sum())
        k = min(budget, m) if isinstance(budget, int) else math.floor(budget * m + 0.5)
        tokens, weights, assignment, kept, count = _ref_prumerge_plus(
            vt.tokens[i], vt.cls_attn[i], vt.keys[i], k, grid, nv, num_neighbors=nn, valid=valid[i]
        )
        assert int(sel.num_kept[i]) == k
        assert sel.info["anchors"][i, :k].tolist() == kept
        assert int(sel.info["iqr_count"][i]) == count
        assert sel.assignment[i].tolist() == assignment
        torch.testing.assert_close(sel.tokens[i, :k], tokens, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sel.weights[i, :k], torch.tensor(weights), atol=1e-6, rtol=1e-5)


def test_keeps_every_iqr_outlier():
    vt = _inputs(2, (8, 8), seed=1, spikes=5)
    a = vt.cls_attn.softmax(-1).mean(1)
    sel = vtc.create_reducer("prumerge_plus")(vt, budget=16)
    for i in range(2):
        q1, q3 = np.percentile(a[i].numpy(), [25, 75])
        outliers = set(torch.nonzero(a[i] > q3 + 1.5 * (q3 - q1)).flatten().tolist())
        assert 5 <= len(outliers) <= 16
        anchors = sel.info["anchors"][i]
        assert outliers <= set(anchors.tolist())
        assert set(anchors[sel.info["is_outlier"][i]].tolist()) == outliers
        assert int(sel.info["iqr_count"][i]) == len(outliers)


def test_more_outliers_than_budget_keeps_the_strongest():
    vt = _inputs(1, (6, 6), seed=2, spikes=8)
    a = vt.cls_attn.softmax(-1).mean(1)[0]
    sel = vtc.create_reducer("prumerge_plus")(vt, budget=3)
    assert int(sel.info["iqr_count"][0]) > 3
    assert sel.info["anchors"][0].tolist() == sorted(a.topk(3).indices.tolist())
    assert bool(sel.info["is_outlier"].all())


def test_no_outliers_gives_the_uniform_lattice():
    vt = _inputs(1, (6, 6), seed=0)
    vt.cls_attn = torch.zeros_like(vt.cls_attn)  # flat attention: IQR = 0, nothing above Q3
    sel = vtc.create_reducer("prumerge_plus", num_neighbors=0)(vt, budget=9)
    assert int(sel.info["iqr_count"][0]) == 0
    assert sel.info["anchors"][0].tolist() == uniform_grid_indices(9, 6, 6).tolist()
    assert torch.equal(sel.tokens[0], vt.tokens[0, sel.info["anchors"][0]])  # no neighbours: pure pruning


def test_outlier_displaces_the_nearest_lattice_point():
    vt = _inputs(1, (6, 6), seed=0)
    vt.cls_attn = torch.zeros_like(vt.cls_attn)
    vt.cls_attn[0, :, 6] = 10.0  # one outlier at (1, 0), next to lattice point (1, 1) = 7
    r = vtc.create_reducer("prumerge_plus")
    lattice = uniform_grid_indices(9, 6, 6).tolist()
    assert lattice[:2] == [7, 9]
    assert r(vt, budget=9).info["anchors"][0].tolist() == sorted([6] + [p for p in lattice if p != 7])
    vt.cls_attn[0, :, 6] = 0.0
    vt.cls_attn[0, :, 8] = 10.0  # at (1, 2), as near to 7 as to 9: the later lattice point gives way
    assert r(vt, budget=9).info["anchors"][0].tolist() == sorted([8] + [p for p in lattice if p != 9])


def test_merge_adds_attention_weighted_neighbours():
    vt = _inputs(1, (4, 4), seed=4, spikes=2)
    sel = vtc.create_reducer("prumerge_plus", num_neighbors=3)(vt, budget=4)
    a = vt.cls_attn.softmax(-1).mean(1)[0]
    for row, p in enumerate(sel.info["anchors"][0].tolist()):
        absorbed = (sel.assignment[0] == row).nonzero().flatten().tolist()
        assert p in absorbed and len(absorbed) <= 4  # itself plus at most 3 neighbours (shared ones go elsewhere)
        assert float(sel.weights[0, row]) >= float(a[absorbed].sum()) - 1e-6
