"""GlobalCom²: crop ratios, per-view counts and kept tokens against a per-sample reference from the paper."""

from __future__ import annotations

import math

import pytest
import torch

import vtc
from vtc.budget import resolve_budget
from vtc.reducers.globalcom2 import apportion


def _ref_apportion(targets: list[float], cap: int | list[int], k: int) -> list[int]:
    """Floors, then one token per view per round, largest fractional part first, full views skipped."""
    caps = cap if isinstance(cap, list) else [cap] * len(targets)
    out = [min(c, math.floor(t)) for t, c in zip(targets, caps, strict=True)]
    order = sorted(range(len(targets)), key=lambda i: (-(targets[i] - math.floor(targets[i])), i))
    i = 0
    while sum(out) < k:
        j = order[i % len(order)]
        if out[j] < caps[j]:
            out[j] += 1
        i += 1
    return out


def _bilinear(img: list[list[float]], oh: int, ow: int) -> list[list[float]]:
    """Bilinear resize with align_corners=False (half-pixel centres, edge clamped), by loops."""
    ih, iw = len(img), len(img[0])

    def src(o: int, n_in: int, n_out: int) -> tuple[int, int, float]:
        s = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(s)
        return i0, min(i0 + 1, n_in - 1), s - i0

    out = []
    for y in range(oh):
        y0, y1, fy = src(y, ih, oh)
        row = []
        for x in range(ow):
            x0, x1, fx = src(x, iw, ow)
            top = (1 - fx) * img[y0][x0] + fx * img[y0][x1]
            bot = (1 - fx) * img[y1][x0] + fx * img[y1][x1]
            row.append((1 - fy) * top + fy * bot)
        out.append(row)
    return out


def _ref_sample(
    cls_attn: torch.Tensor, h: int, w: int, rows: int, cols: int, k: int, mode: str, tau: float = 10.0, valid=None
):
    """One sample: cls_attn `[H, N]` → (ratios, counts, kept indices) from the paper's formulas. With `valid` `[N]`
    bool, N_v counts the valid tokens of view v, the mean of π is weighted by them and only valid tokens rank."""
    v, nv = 1 + rows * cols, h * w
    ok = [True] * (v * nv) if valid is None else valid.tolist()
    sizes = [sum(ok[i * nv : (i + 1) * nv]) for i in range(v)]
    n = sum(sizes)
    a = cls_attn.double()
    maps = []
    for i in range(v):
        part = a[:, i * nv : (i + 1) * nv]
        maps.append((part.softmax(-1) if mode == "softmax" else part).mean(0).tolist())
    thumb = maps[0]
    r = k / n
    s = [0.0] * (rows * cols)  # thumbnail attention summed over the block of each crop
    for y in range(h):
        for x in range(w):
            by = next(i for i in range(rows) if math.floor(i * h / rows) <= y < math.floor((i + 1) * h / rows))
            bx = next(j for j in range(cols) if math.floor(j * w / cols) <= x < math.floor((j + 1) * w / cols))
            s[by * cols + bx] += thumb[y * w + x]
    e = [math.exp((si - max(s)) / tau) for si in s]
    pi = [ei / sum(e) for ei in e]
    if valid is None:
        mean = sum(pi) / len(pi)
    else:  # weighted by the crops' valid tokens, so that Σ_v N_v r_v = k
        mean = sum(p * c for p, c in zip(pi, sizes[1:], strict=True)) / sum(sizes[1:])
    ratios = [r] + [min(1.0, r * (1 + p - mean)) for p in pi]
    counts = _ref_apportion([c * q for c, q in zip(sizes, ratios, strict=True)], sizes, k)

    big = _bilinear([thumb[y * w : (y + 1) * w] for y in range(h)], rows * h, cols * w)
    kept = []
    for vi in range(v):
        if vi == 0:
            score = thumb
        else:
            cy, cx = divmod(vi - 1, cols)
            g = [big[cy * h + y][cx * w + x] for y in range(h) for x in range(w)]
            own = maps[vi]
            ng, no = math.sqrt(sum(t * t for t in g)), math.sqrt(sum(t * t for t in own))
            score = [o / no + t / ng for o, t in zip(own, g, strict=True)]
        best = sorted((j for j in range(nv) if ok[vi * nv + j]), key=lambda j: (-score[j], j))[: counts[vi]]
        kept += [vi * nv + j for j in best]
    return ratios, counts, sorted(kept)


@pytest.mark.parametrize("mode", ["logits", "softmax"])
@pytest.mark.parametrize(
    ("grid", "views", "budget"),
    [((4, 4), (2, 2), 0.25), ((4, 4), (2, 2), 7), ((3, 5), (1, 3), 0.4), ((6, 6), (3, 2), 0.1), ((4, 6), (2, 3), 0.9)],
)
def test_against_reference(mode, grid, views, budget):
    h, w = grid
    n = h * w * (1 + views[0] * views[1])
    g = torch.Generator().manual_seed(n + views[1])
    vt = vtc.VisualTokens(
        torch.randn(3, n, 8, generator=g), cls_attn=3 * torch.randn(3, 4, n, generator=g), grid=grid, views=views
    )
    r = vtc.create_reducer("globalcom2", attention=mode)
    sel = r(vt, budget=budget)
    k = resolve_budget(budget, n)
    assert sel.tokens.shape == (3, k, 8) and bool(sel.mask.all())
    for b in range(3):
        ratios, counts, kept = _ref_sample(vt.cls_attn[b], h, w, *views, k, mode)
        torch.testing.assert_close(sel.info["ratios"][b], torch.tensor(ratios, dtype=torch.float64))
        assert sel.info["counts"][b].tolist() == counts
        assert sel.indices[b].tolist() == kept


@pytest.mark.parametrize("mode", ["logits", "softmax"])
@pytest.mark.parametrize(
    ("grid", "views", "budget"), [((4, 4), (2, 2), 0.25), ((4, 4), (1, 2), 9), ((3, 5), (2, 3), 0.6)]
)
def test_valid_mask_against_reference(mode, grid, views, budget):
    """Unpadding-like masks (canvas rows, or columns, cut at both ends; different per sample) and random cells."""
    h, w = grid
    rows, cols = views
    hw = h * w
    n = hw * (1 + rows * cols)
    g = torch.Generator().manual_seed(n + rows)
    vt = vtc.VisualTokens(
        torch.randn(3, n, 8, generator=g), cls_attn=3 * torch.randn(3, 4, n, generator=g), grid=grid, views=views
    )
    valid = torch.ones(3, n, dtype=torch.bool)
    for i, cut in enumerate([(1, 0), (0, 1)]):  # sample 0: first/last canvas row removed; sample 1: columns
        canvas = torch.ones(rows * h, cols * w, dtype=torch.bool)
        canvas[[0, -1]] = not cut[0]
        canvas[:, [0, -1]] &= not cut[1]
        valid[i, hw:] = canvas.reshape(rows, h, cols, w).permute(0, 2, 1, 3).reshape(-1)
    valid[2] = torch.rand(n, generator=g) < 0.6
    vt.valid = valid
    sel = vtc.create_reducer("globalcom2", attention=mode)(vt, budget=budget)
    for b in range(3):
        m = int(valid[b].sum())
        k = min(budget, m) if isinstance(budget, int) else resolve_budget(budget, m)
        ratios, counts, kept = _ref_sample(vt.cls_attn[b], h, w, rows, cols, k, mode, valid=valid[b])
        torch.testing.assert_close(sel.info["ratios"][b], torch.tensor(ratios, dtype=torch.float64))
        assert sel.info["counts"][b].tolist() == counts and sum(counts) == k
        assert sel.indices[b][sel.mask[b]].tolist() == kept


def test_crop_with_most_thumbnail_attention_keeps_most():
    h = w = 6
    rows, cols = 2, 2
    n = h * w * 5
    g = torch.Generator().manual_seed(0)
    attn = torch.randn(2, 3, n, generator=g)
    # Sample 0: the bottom-left block of the thumbnail (crop 2) is salient; sample 1: the top-right one (crop 1).
    thumb = attn[:, :, : h * w].reshape(2, 3, h, w)
    thumb[0, :, 3:, :3] += 4.0
    thumb[1, :, :3, 3:] += 4.0
    vt = vtc.VisualTokens(torch.randn(2, n, 4, generator=g), cls_attn=attn, grid=(h, w), views=(rows, cols))
    sel = vtc.create_reducer("globalcom2")(vt, budget=0.25)
    counts, ratios = sel.info["counts"], sel.info["ratios"]
    for b, salient in ((0, 2), (1, 1)):
        crop_counts = counts[b, 1:]
        assert int(crop_counts.argmax()) == salient
        assert all(int(crop_counts[salient]) > int(c) for i, c in enumerate(crop_counts) if i != salient)
        assert float(ratios[b, 1 + salient]) > 0.25 > float(ratios[b, 1:].min())
        # The per-crop ratios average to r, so the crops still keep a quarter between them.
        assert abs(float(ratios[b, 1:].mean()) - 0.25) < 1e-9
    assert sel.num_kept.tolist() == [resolve_budget(0.25, n)] * 2
    assert counts.sum(-1).tolist() == [resolve_budget(0.25, n)] * 2


def test_every_budget_is_exact_and_capped():
    h = w = 4
    n = h * w * 5
    g = torch.Generator().manual_seed(3)
    attn = torch.randn(1, 2, n, generator=g)
    attn[0, :, :4] += 30  # one block dominates: at high budgets its crop ratio caps at 1
    vt = vtc.VisualTokens(torch.randn(1, n, 4, generator=g), cls_attn=attn, grid=(h, w), views=(2, 2))
    r = vtc.create_reducer("globalcom2")
    for k in range(1, n + 1):
        sel = r(vt, budget=k)
        assert sel.tokens.shape[1] == k
        if k < n:
            counts = sel.info["counts"][0]
            assert int(counts.sum()) == k and int(counts.max()) <= h * w
            kept_per_view = torch.bincount(sel.indices[0] // (h * w), minlength=5)
            assert torch.equal(kept_per_view, counts)


def test_apportion_against_loop():
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        v = int(torch.randint(1, 7, (1,), generator=g))
        cap = int(torch.randint(1, 12, (1,), generator=g))
        k = int(torch.randint(0, v * cap + 1, (1,), generator=g))
        w = torch.rand(v, generator=g, dtype=torch.float64) * 3
        targets = (w / w.sum() * k).clamp(max=cap)  # capped proportional targets, Σ ≤ k
        got = apportion(targets[None], cap, k)[0].tolist()
        assert got == _ref_apportion(targets.tolist(), cap, k), (targets, cap, k)
        assert sum(got) == k and max(got) <= cap


def test_apportion_with_caps_per_part_against_loop():
    g = torch.Generator().manual_seed(2)
    rows, expected = [], []
    for _ in range(100):
        caps = torch.randint(0, 9, (5,), generator=g)
        k = int(torch.randint(0, int(caps.sum()) + 1, (1,), generator=g))
        w = torch.rand(5, generator=g, dtype=torch.float64) * caps
        targets = torch.minimum(w / w.sum().clamp(min=1e-9) * k, caps.double())
        rows.append((targets, caps, k))
        expected.append(_ref_apportion(targets.tolist(), caps.tolist(), k))
    got = apportion(
        torch.stack([t for t, _, _ in rows]), torch.stack([c for _, c, _ in rows]), torch.tensor([k for *_, k in rows])
    )
    for i, (_, caps, k) in enumerate(rows):  # one batched call, rows with different caps and k
        assert got[i].tolist() == expected[i], rows[i]
        assert int(got[i].sum()) == k and bool((got[i] <= caps).all())


def test_needs_views():
    vt = vtc.VisualTokens(torch.randn(1, 36, 4), cls_attn=torch.randn(1, 2, 36), grid=(6, 6))
    with pytest.raises(ValueError, match=r"globalcom2.*views"):
        vtc.create_reducer("globalcom2")(vt, budget=9)


def test_bad_config():
    with pytest.raises(ValueError, match="attention"):
        vtc.create_reducer("globalcom2", attention="probs")
