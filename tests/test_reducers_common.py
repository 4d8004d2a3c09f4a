"""Properties every registered reducer must have (run over `vtc.list_reducers()`, so new methods are covered)."""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import torch
from conftest import make_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vtc
from vtc.budget import resolve_budget
from vtc.reducers import get_reducer_class

ALL = vtc.list_reducers()
PRE = [n for n in ALL if get_reducer_class(n).stage == "pre_llm"]  # in-LLM methods: tests/test_adapter_in_llm.py
HYP = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
BASELINES = {"random", "downsample"}


def _make(name: str) -> vtc.Reducer:
    torch.manual_seed(0)  # trainable reducers initialise their heads from the global RNG
    return vtc.create_reducer(name).eval()


def _valid_indices(sel: vtc.Selection, b: int) -> torch.Tensor:
    return sel.indices[b][sel.mask[b]]


@st.composite
def cases(draw):
    grid = (draw(st.integers(2, 7)), draw(st.integers(2, 7)))
    b = draw(st.integers(1, 3))
    d = draw(st.sampled_from([4, 8, 16]))
    seed = draw(st.integers(0, 2**16))
    frac = draw(st.floats(0.05, 1.0))
    as_int = draw(st.booleans())
    return grid, b, d, seed, frac, as_int


def _budget(n: int, frac: float, as_int: bool):
    return max(1, min(n, round(frac * n))) if as_int else frac


@pytest.mark.parametrize("name", PRE)
@HYP
@given(case=cases())
def test_contract(name, case):
    """Shape, dtype, device, exact count, index validity, gathered tokens, merge bookkeeping."""
    grid, b, d, seed, frac, as_int = case
    r = _make(name)
    vt, q = make_inputs(name, b=b, grid=grid, d=d, seed=seed)
    n = vt.tokens.shape[1]
    budget = _budget(n, frac, as_int)
    k = resolve_budget(budget, n)
    with torch.no_grad():
        sel = r(vt, budget=budget, query=q)
    assert sel.tokens.dtype == vt.tokens.dtype and sel.tokens.device == vt.tokens.device
    assert sel.tokens.dim() == 3 and sel.tokens.shape[0] == b and sel.tokens.shape[2] == d
    assert sel.mask.dtype == torch.bool and sel.mask.shape == sel.tokens.shape[:2]
    counts = sel.num_kept
    if r.adaptive:
        assert bool((counts >= 1).all() and (counts <= k).all()), (counts, k)
        assert bool((sel.mask == (torch.arange(sel.mask.shape[1]) < counts[:, None])).all()), "padding must trail"
    else:
        assert sel.tokens.shape[1] == k and bool(sel.mask.all())
    assert torch.isfinite(sel.tokens).all()
    if sel.indices is not None:
        assert sel.indices.dtype == torch.int64 and sel.indices.shape == sel.mask.shape
        for i in range(b):
            idx = _valid_indices(sel, i)
            assert bool((idx[1:] > idx[:-1]).all()), "indices must be unique and ascending"
            assert int(idx.min()) >= 0 and int(idx.max()) < n
            if not r.merges:
                assert torch.equal(sel.tokens[i][sel.mask[i]], vt.tokens[i, idx])
    else:
        assert r.merges, "only merging reducers may return indices=None"
    if r.merges:
        assert sel.weights is not None and sel.assignment is not None
        assert sel.assignment.shape == (b, n)
        kk = sel.tokens.shape[1]
        assert int(sel.assignment.min()) >= -1 and int(sel.assignment.max()) < kk
        for i in range(b):  # every real output row has a source; padding has none
            used = torch.zeros(kk, dtype=torch.bool).index_fill_(0, sel.assignment[i][sel.assignment[i] >= 0], True)
            assert torch.equal(used, sel.mask[i])
        if r.conserves_mass:
            assigned = (sel.assignment >= 0).float()
            torch.testing.assert_close(sel.weights.float().sum(-1), assigned.sum(-1))
            lhs = (sel.weights.unsqueeze(-1) * sel.tokens.float() * sel.mask.unsqueeze(-1)).sum(1)
            rhs = (vt.tokens.float() * assigned.unsqueeze(-1)).sum(1)
            torch.testing.assert_close(lhs, rhs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", PRE)
def test_full_budget_is_identity(name):
    r = _make(name)
    vt, q = make_inputs(name)
    n = vt.tokens.shape[1]
    for budget in (n, 1.0):
        sel = r(vt, budget=budget, query=q)
        assert torch.equal(sel.tokens, vt.tokens)
        assert torch.equal(sel.indices, torch.arange(n).expand(vt.tokens.shape[0], n))
    if not r.adaptive:  # the algorithm itself (not only the base-class shortcut) must reduce to the identity
        with torch.no_grad():
            sel = r._reduce(vt, n, q)
        assert torch.equal(sel.tokens, vt.tokens), "the method's own k = N path is not the identity"


@pytest.mark.parametrize("name", [n for n in PRE if not get_reducer_class(n).stochastic])
@HYP
@given(case=cases())
def test_batch_equals_single_calls(name, case):
    grid, b, d, seed, frac, as_int = case
    r = _make(name)
    vt, q = make_inputs(name, b=max(b, 2), grid=grid, d=d, seed=seed)
    n = vt.tokens.shape[1]
    budget = _budget(n, frac, as_int)
    with torch.no_grad():
        full = r(vt, budget=budget, query=q)
        for i in range(vt.tokens.shape[0]):
            sl = slice(i, i + 1)
            one = r(vt.index_batch(sl), budget=budget, query=None if q is None else q.index_batch(sl))
            m = one.num_kept[0]
            assert int(full.num_kept[i]) == int(m)
            torch.testing.assert_close(full.tokens[i, :m], one.tokens[0, :m], atol=1e-5, rtol=1e-5)
            if full.indices is not None:
                assert torch.equal(full.indices[i, :m], one.indices[0, :m])


@pytest.mark.parametrize("name", PRE)
def test_same_seed_same_output(name):
    vt, q = make_inputs(name, b=2, grid=(5, 6))
    outs = []
    for _ in range(2):
        r = _make(name)
        torch.manual_seed(123)
        with torch.no_grad():
            outs.append(r(vt, budget=0.3, query=q))
    assert torch.equal(outs[0].tokens, outs[1].tokens)


@pytest.mark.parametrize("name", PRE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_nan_and_dtype_kept(name, dtype):
    r = _make(name)
    vt, q = make_inputs(name, b=2, grid=(8, 8), dtype=dtype)
    # Large-magnitude and repeated tokens are the usual sources of NaN in normalised similarities.
    vt.tokens[0, :5] = vt.tokens[0, 5:10]
    vt.tokens[1] *= 50
    with torch.no_grad():
        for valid in (None, _valid_mask(vt, "unpad", 3, first_full=False)):
            for budget in (1, 7, 0.5):
                sel = r(dataclasses.replace(vt, valid=valid), budget=budget, query=q)
                assert sel.tokens.dtype == dtype
                assert torch.isfinite(sel.tokens.float()).all()


@pytest.mark.parametrize("name", PRE)
def test_query_contract(name):
    r = _make(name)
    vt, q = make_inputs(name)
    if r.needs_query:
        with pytest.raises(ValueError, match=name):
            r(vt, budget=0.5)
    else:
        g = torch.Generator().manual_seed(1)
        q = torch.randn(vt.tokens.shape[0], 3, vt.tokens.shape[2], generator=g)
        torch.manual_seed(0)
        a = r(vt, budget=0.5)
        torch.manual_seed(0)
        b = r(vt, budget=0.5, query=q)
        assert torch.equal(a.tokens, b.tokens), "a reducer that is not query-aware must ignore the query"


@pytest.mark.parametrize("name", PRE)
def test_bad_inputs_name_the_reducer_and_value(name):
    r = _make(name)
    vt, q = make_inputs(name)
    n = vt.tokens.shape[1]
    with pytest.raises(ValueError, match=rf"{name}.*rank 2"):
        r(vt.tokens[0], budget=4, query=q)
    with pytest.raises(ValueError, match=rf"{name}.*\(2, 0, 16\)"):
        r(vt.tokens[:, :0], budget=4, query=q)
    for bad in (0, -3, n + 1):
        with pytest.raises(ValueError, match=rf"{name}.*budget={bad}"):
            r(vt, budget=bad, query=q)
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=rf"{name}.*budget={bad}"):
            r(vt, budget=bad, query=q)
    nan = dataclasses.replace(vt, tokens=vt.tokens.clone())
    nan.tokens[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match=rf"{name}.*NaN"):
        r(nan, budget=4, query=q)
    with pytest.raises(TypeError, match=rf"{name}.*not_a_field.*valid fields"):
        vtc.create_reducer(name, not_a_field=1)


@pytest.mark.parametrize("name", ALL)
def test_config_round_trip_and_docstring(name):
    r = _make(name)
    again = vtc.create_reducer(name, **r.config.to_dict())
    assert again.config == r.config
    doc = sys.modules[type(r).__module__].__doc__ or ""
    assert len(doc.strip()) > 40, "every reducer module explains its method"
    if name not in BASELINES:
        assert "arXiv" in doc, "a method named after a paper cites it in its module docstring"


def test_registry_listing_and_errors():
    assert ALL == sorted(ALL) and len(ALL) == len(set(ALL))
    assert vtc.list_reducers("rand*") == ["random"]
    assert vtc.list_reducers(exclude="*") == []
    with pytest.raises(ValueError, match="Did you mean 'random'"):
        vtc.create_reducer("randmo")
    from vtc.reducers import REDUCERS

    with pytest.raises(KeyError, match="already registered"):
        REDUCERS.register("random")(type("Dup", (vtc.Reducer,), {}))


# ---------------------------------------------------------------------- VisualTokens.valid
@st.composite
def valid_cases(draw):
    """A case plus a `valid` mask mode: "random" cells, or "unpad" (whole rows or columns of the crop canvas, or of
    the grid, removed at both ends, as LLaVA-NeXT's unpadding does), and whether sample 0 stays all valid."""
    return draw(cases()), draw(st.sampled_from(["random", "unpad"])), draw(st.booleans())


def _valid_mask(vt: vtc.VisualTokens, mode: str, seed: int, first_full: bool) -> torch.Tensor:
    """`[B, N]` bool with at least one valid token per sample (and at least one invalid somewhere)."""
    g = torch.Generator().manual_seed(seed + 1)
    b, n, _ = vt.tokens.shape
    h, w = vt.grid
    rows, cols = vt.views if vt.views is not None else (1, 1)
    thumb = h * w if vt.views is not None else 0
    valid = torch.ones(b, n, dtype=torch.bool)
    for i in range(b):
        if mode == "random":
            valid[i] = torch.rand(n, generator=g) < 0.2 + 0.7 * float(torch.rand(1, generator=g))
            valid[i, int(torch.randint(n, (1,), generator=g))] = True
        else:  # remove canvas rows (or columns) at both ends; the canvas is the crops stitched row-major
            big_h, big_w = rows * h, cols * w
            canvas = torch.ones(big_h, big_w, dtype=torch.bool)
            axis = int(torch.randint(2, (1,), generator=g))
            size = (big_h, big_w)[axis]
            cut = int(torch.randint(1, max(2, (size + 1) // 2), (1,), generator=g))  # keep at least one line
            lo = cut // 2
            hi = size - (cut - lo)
            if axis == 0:
                canvas[:lo], canvas[hi:] = False, False
            else:
                canvas[:, :lo], canvas[:, hi:] = False, False
            crops = canvas.reshape(rows, h, cols, w).permute(0, 2, 1, 3).reshape(-1)  # reducer order: crop by crop
            valid[i, thumb:] = crops
    if first_full:
        valid[0] = True
    if bool(valid.all()):
        valid[-1, 0] = False
        valid[-1, -1] = True
    return valid


def _expected_counts(valid: torch.Tensor, budget) -> list[int]:
    """k_b resolved against the valid count of every sample, written out from the budget rule."""
    out = []
    for c in valid.sum(-1).tolist():
        out.append(min(budget, c) if isinstance(budget, int) else max(1, min(c, math.floor(budget * c + 0.5))))
    return out


@pytest.mark.parametrize("name", PRE)
@HYP
@given(case=valid_cases())
def test_valid_mask_is_honoured(name, case):
    """With a random `valid` mask: no invalid token is kept or merged, every sample keeps min(budget, valid count)
    (fractions: of the valid count; adaptive methods at most that, at least one), padding trails and is zero,
    rows equal single-sample calls, and an all-True mask is the same as None."""
    (grid, b, d, seed, frac, as_int), mode, first_full = case
    r = _make(name)
    vt, q = make_inputs(name, b=max(b, 2), grid=grid, d=d, seed=seed)
    vt = dataclasses.replace(vt, valid=_valid_mask(vt, mode, seed, first_full))
    n = vt.tokens.shape[1]
    budget = _budget(n, frac, as_int)
    expected = _expected_counts(vt.valid, budget)
    torch.manual_seed(seed)
    with torch.no_grad():
        sel = r(vt, budget=budget, query=q)
    counts = sel.num_kept
    kk = sel.tokens.shape[1]
    assert kk == max(counts.tolist())
    assert bool((sel.mask == (torch.arange(kk) < counts[:, None])).all()), "padding must trail"
    assert bool((sel.tokens[~sel.mask] == 0).all()), "padded outputs are zeros"
    assert torch.isfinite(sel.tokens).all()
    for i, k in enumerate(expected):
        if r.adaptive:
            assert 1 <= int(counts[i]) <= k, (i, counts, expected)
        else:
            assert int(counts[i]) == k, (i, counts, expected)
    if sel.indices is not None:
        assert bool((sel.indices[~sel.mask] == 0).all())
        for i in range(sel.tokens.shape[0]):
            idx = _valid_indices(sel, i)
            assert bool((idx[1:] > idx[:-1]).all()) and bool(vt.valid[i, idx].all()), "an invalid token was kept"
            if not r.merges:
                assert torch.equal(sel.tokens[i][sel.mask[i]], vt.tokens[i, idx])
    if r.merges:
        a = sel.assignment
        assert bool((a[~vt.valid] == -1).all()), "an invalid token was merged"
        for i in range(a.shape[0]):
            used = torch.zeros(kk, dtype=torch.bool).index_fill_(0, a[i][a[i] >= 0], True)
            assert torch.equal(used, sel.mask[i]), "every real output needs a valid source; padding has none"
        if r.conserves_mass:
            assigned = (a >= 0).float()
            torch.testing.assert_close(sel.weights.float().sum(-1), assigned.sum(-1))
            lhs = (sel.weights.unsqueeze(-1) * sel.tokens.float() * sel.mask.unsqueeze(-1)).sum(1)
            rhs = (vt.tokens.float() * assigned.unsqueeze(-1)).sum(1)
            torch.testing.assert_close(lhs, rhs, atol=1e-4, rtol=1e-4)
    if not r.stochastic:  # per-sample budgets and padding do not couple the samples
        with torch.no_grad():
            for i in range(vt.tokens.shape[0]):
                sl = slice(i, i + 1)
                one = r(vt.index_batch(sl), budget=budget, query=None if q is None else q.index_batch(sl))
                m = int(one.num_kept[0])
                assert int(counts[i]) == m
                torch.testing.assert_close(sel.tokens[i, :m], one.tokens[0, :m], atol=1e-5, rtol=1e-5)
                if sel.indices is not None:
                    assert torch.equal(sel.indices[i, :m], one.indices[0, :m])
    full = dataclasses.replace(vt, valid=torch.ones_like(vt.valid))
    outs = []
    for v in (full, dataclasses.replace(vt, valid=None)):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(r(v, budget=budget, query=q))
    assert torch.equal(outs[0].tokens, outs[1].tokens), "an all-True valid mask must change nothing"


@pytest.mark.parametrize("name", PRE)
def test_valid_full_budget_keeps_exactly_the_valid_tokens(name):
    r = _make(name)
    vt, q = make_inputs(name, b=3)
    valid = _valid_mask(vt, "random", 5, first_full=True)
    vt = dataclasses.replace(vt, valid=valid)
    for budget in (1.0, vt.tokens.shape[1]):
        sel = r(vt, budget=budget, query=q)
        for i in range(3):
            assert torch.equal(_valid_indices(sel, i), valid[i].nonzero().squeeze(-1))
            assert torch.equal(sel.valid_tokens(i), vt.tokens[i, valid[i]])
        if r.merges:
            assert bool((sel.assignment[~valid] == -1).all()) and torch.equal(sel.weights, sel.mask.float())


# Methods for which honouring `valid` is, by design, running the method on the valid tokens alone (visionzip: with
# one head, where the full-view softmax ranks like the valid-only one).
ALONE = ["divprune", "todre", "mmtok", "tome", "qtsplus", "visionzip"]


@pytest.mark.parametrize("name", ALONE)
@pytest.mark.parametrize("budget", [5, 0.3])
def test_valid_equals_running_on_the_valid_tokens_alone(name, budget):
    r = _make(name)
    vt, q = make_inputs(name, b=3, grid=(6, 6), seed=4)
    vt = dataclasses.replace(vt, cls_attn=vt.cls_attn[:, :1], valid=_valid_mask(vt, "random", 4, first_full=False))
    with torch.no_grad():
        sel = r(vt, budget=budget, query=q)
        for i in range(3):
            cols = vt.valid[i].nonzero().squeeze(-1)
            alone = vtc.VisualTokens(
                vt.tokens[i : i + 1, cols],
                features=vt.features[i : i + 1, cols],
                cls_attn=vt.cls_attn[i : i + 1, :, cols],
                keys=vt.keys[i : i + 1, cols],
            )
            bi = min(budget, cols.numel()) if isinstance(budget, int) else budget
            one = r(alone, budget=bi, query=None if q is None else q.index_batch(slice(i, i + 1)))
            m = int(one.num_kept[0])
            assert int(sel.num_kept[i]) == m
            torch.testing.assert_close(sel.tokens[i, :m], one.tokens[0, :m], atol=1e-5, rtol=1e-5)
            if one.indices is not None:
                assert torch.equal(sel.indices[i, :m], cols[one.indices[0, :m]])
            else:
                expect = torch.full((vt.tokens.shape[1],), -1, dtype=torch.long)
                expect[cols] = one.assignment[0]
                assert torch.equal(sel.assignment[i], expect)


@pytest.mark.parametrize("name", ["downsample", "matryoshka"])
@pytest.mark.parametrize(("rect", "budget"), [((1, 0, 4, 7), 9), ((0, 2, 6, 3), 0.5), ((2, 1, 1, 5), 2)])
def test_valid_rectangle_equals_the_cropped_grid(name, rect, budget):
    """Grid methods on a 6×7 grid whose valid tokens form a rectangle act as on that rectangle's own grid."""
    r0, c0, hh, ww = rect
    r = _make(name)
    vt, _ = make_inputs(name, b=2, grid=(6, 7), seed=2)
    cells = torch.zeros(6, 7, dtype=torch.bool)
    cells[r0 : r0 + hh, c0 : c0 + ww] = True
    cols = cells.reshape(-1).nonzero().squeeze(-1)  # row-major: the cropped grid's order
    sel = r(dataclasses.replace(vt, valid=cells.reshape(1, -1).expand(2, -1).contiguous()), budget=budget)
    bi = min(budget, cols.numel()) if isinstance(budget, int) else budget
    crop = r(vtc.VisualTokens(vt.tokens[:, cols], grid=(hh, ww)), budget=bi)
    torch.testing.assert_close(sel.tokens, crop.tokens)
    if crop.indices is not None:
        assert torch.equal(sel.indices, cols[crop.indices])
    else:
        expect = torch.full((2, 42), -1, dtype=torch.long)
        expect[:, cols] = crop.assignment
        assert torch.equal(sel.assignment, expect)


@pytest.mark.parametrize("name", PRE)
def test_bad_valid_mask_is_named(name):
    r = _make(name)
    vt, q = make_inputs(name)
    b, n, _ = vt.tokens.shape
    with pytest.raises(ValueError, match=rf"{name}.*valid.*dtype torch.float32.*valid.bool\(\)"):
        r(dataclasses.replace(vt, valid=torch.ones(b, n)), budget=3, query=q)
    with pytest.raises(ValueError, match=rf"{name}.*valid must be \[B={b}, N={n}\], got \({b}, {n - 1}\)"):
        r(dataclasses.replace(vt, valid=torch.ones(b, n - 1, dtype=torch.bool)), budget=3, query=q)
    empty = torch.ones(b, n, dtype=torch.bool)
    empty[1] = False
    with pytest.raises(ValueError, match=rf"{name}.*no token of sample\(s\) \[1\]"):
        r(dataclasses.replace(vt, valid=empty), budget=3, query=q)
