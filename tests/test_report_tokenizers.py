"""The tokenizer report (vtc.eval.report_tokenizers): its maths against slow oracles, and a run on tiny tokenizers."""

from __future__ import annotations

import csv
import math

import cv2
import numpy as np
import pytest
import torch
from vtc.eval import report_tokenizers as rt

import vtc
from vtc.tokenizers.data import COMPLEXITY_LEVELS, synthetic_images

PHOTOS = ("astronaut", "camera")
TINY = dict(image_size=16, patch_size=4, width=32, enc_depth=1, dec_depth=1, num_heads=2, num_tokens=8)


def _save(path, name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = {**TINY, **kw}
    if name != "flextok":
        cfg.setdefault("vq_codebook_size", 64)
    tok = vtc.create_tokenizer(name, **cfg).eval()
    tok.save_pretrained(path)
    return tok


def _csv(path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


# ---------------------------------------------------------------------------------------------- oracles
def test_psnr_and_l1_match_a_pixel_loop():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    b[2] = a[2]  # an exact copy: capped
    got, l1 = rt.psnr(b, a), rt.mean_l1(b, a)
    for i in range(3):
        sq = ab = 0.0
        count = 0
        for v, w in zip(a[i].ravel().tolist(), b[i].ravel().tolist(), strict=True):
            sq += ((v - w) / 255) ** 2
            ab += abs(v - w) / 255
            count += 1
        mse = sq / count
        want = 10 * math.log10(1 / mse) if mse > 0 else rt.MAX_PSNR
        assert got[i] == pytest.approx(min(want, rt.MAX_PSNR), abs=1e-9)
        assert l1[i] == pytest.approx(ab / count, abs=1e-12)
    assert got[2] == pytest.approx(10 * math.log10(12 * 255**2))
    x = torch.rand(2, 3, 5, 5)
    assert np.array_equal(rt.to_uint8(x), np.round(x.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8))


def _brute_ranks(x: list[float]) -> list[float]:
    return [1 + sum(v < xi for v in x) + (sum(v == xi for v in x) - 1) / 2 for xi in x]


def _brute_pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((p - ma) * (q - mb) for p, q in zip(a, b, strict=True))
    den = math.sqrt(sum((p - ma) ** 2 for p in a) * sum((q - mb) ** 2 for q in b))
    return num / den


@pytest.mark.parametrize("seed", range(6))
def test_spearman_matches_brute_force_ranks_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 40))
    x = rng.integers(0, 5, n).astype(float)  # many ties
    y = (x * rng.choice([-1, 1]) + rng.integers(0, 4, n)).astype(float)
    assert rt.rankdata(x).tolist() == _brute_ranks(x.tolist())
    if len(set(x.tolist())) > 1 and len(set(y.tolist())) > 1:
        want = _brute_pearson(_brute_ranks(x.tolist()), _brute_ranks(y.tolist()))
        assert rt.spearman(x, y) == pytest.approx(want, abs=1e-12)


def test_spearman_edge_cases():
    assert rt.spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert rt.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(rt.spearman([3, 3, 3], [1, 2, 3]))  # a constant side
    assert math.isnan(rt.spearman([1], [2]))
    with pytest.raises(ValueError, match="equal lengths"):
        rt.spearman([1, 2], [1, 2, 3])


def test_codec_bits_are_the_encoded_byte_lengths():
    x, _ = synthetic_images(6, 16, seed=3)
    s = rt.ImageSet("procedural", x, np.zeros(6, int), [str(i) for i in range(6)])
    qualities = [10, 80]
    base = rt.codec_baselines(s, qualities)
    x8 = rt.to_uint8(x)
    headers = set()
    for i, img in enumerate(x8):
        bgr = np.ascontiguousarray(img[..., ::-1])
        png = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 9])[1]
        assert base["png_bits"][i] == 8 * len(png)
        assert np.array_equal(cv2.imdecode(png, cv2.IMREAD_COLOR), bgr)  # lossless
        for a, q in enumerate(qualities):
            jpg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, q])[1]
            assert base["jpeg_bits"][a, i] == 8 * len(jpg)
            dec = cv2.imdecode(jpg, cv2.IMREAD_COLOR)[..., ::-1]
            assert base["jpeg_psnr"][a, i] == pytest.approx(rt.psnr(dec[None], img[None])[0])
            assert 0 < base["jpeg_scan_bits"][a, i] < base["jpeg_bits"][a, i]
            headers.add((q, int(base["jpeg_bits"][a, i] - base["jpeg_scan_bits"][a, i])))
    # the same tables and headers for every image of a size and quality: only the scan differs
    assert len(headers) == len(qualities)
    assert len(set(base["jpeg_scan_bits"][0].tolist())) > 1
    with pytest.raises(ValueError, match="not a JPEG"):
        rt.jpeg_scan_bytes(b"\x89PNG....")


def test_monotone_fraction_on_hand_made_curves():
    curves = np.array(
        [
            [10.0, 12.0, 15.0, 20.0],  # rising
            [10.0, 10.0, 10.0, 10.0],  # flat
            [10.0, 9.96, 12.0, 13.0],  # drops 0.04 dB: within 0.05
            [10.0, 9.94, 12.0, 13.0],  # drops 0.06 dB
            [10.0, 12.0, 15.0, 14.0],  # drops at the end
        ]
    )
    assert rt.monotone_mask(curves, 0.05).tolist() == [True, True, True, False, False]
    assert rt.monotone_fraction(curves, 0.05) == pytest.approx(3 / 5)
    assert rt.monotone_fraction(curves, 0.0) == pytest.approx(2 / 5)
    assert rt.monotone_fraction(curves, 2.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="tol"):
        rt.monotone_fraction(curves, -1)


def test_prefix_ks_and_constant_length_reach():
    assert rt.prefix_ks(8) == [1, 2, 4, 8]
    assert rt.prefix_ks(12) == [1, 2, 4, 8, 12]
    assert rt.prefix_ks(1) == [1]
    reach = np.array([0.0, 0.1, 0.5, 0.9])  # k = 1..4
    assert rt.constant_length_reach(reach, 2.0) == pytest.approx(0.1)
    assert rt.constant_length_reach(reach, 2.25) == pytest.approx(0.75 * 0.1 + 0.25 * 0.5)
    assert rt.constant_length_reach(reach, 4.0) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="outside"):
        rt.constant_length_reach(reach, 0.5)


def _feasible_reference(l1_by_k, lengths, l1_adaptive, error):
    """The feasible-image comparison with plain loops."""
    n, k_max = l1_by_k.shape
    feas = [i for i in range(n) if any(l1_by_k[i, k] <= error for k in range(k_max))]
    infeas = [i for i in range(n) if i not in feas]
    if not feas:
        return len(feas), None, None, None, None
    reach = sum(l1_adaptive[i] <= error for i in feas) / len(feas)
    mean = sum(lengths[i] for i in feas) / len(feas)
    at = [sum(l1_by_k[i, c - 1] <= error for i in feas) / len(feas) for c in range(1, k_max + 1)]
    lo = int(mean)
    hi = min(lo + 1, k_max)
    const = (1 - (mean - lo)) * at[lo - 1] + (mean - lo) * at[hi - 1]
    match = next((c for c in range(1, k_max + 1) if at[c - 1] >= reach), None)
    inf_mean = sum(lengths[i] for i in infeas) / len(infeas) if infeas else None
    return len(feas), reach, const, match, inf_mean


@pytest.mark.parametrize("seed", range(6))
def test_feasible_comparison_matches_a_loop(seed):
    g = np.random.default_rng(seed)
    n, k_max = 40, 8
    l1 = np.sort(g.uniform(0.0, 0.3, (n, k_max)), axis=1)[:, ::-1] + g.uniform(0, 0.02, (n, k_max))  # ~falling in k
    lengths = g.integers(1, k_max + 1, n).astype(np.float64)
    l1_ad = l1[np.arange(n), lengths.astype(int) - 1]
    for error in (0.01, 0.05, 0.1, 0.2, 0.5):
        got = rt.feasible_comparison(l1, lengths, l1_ad, error)
        n_f, reach, const, match, inf_mean = _feasible_reference(l1, lengths, l1_ad, error)
        assert got["n_feasible"] == n_f and got["feasible_frac"] == pytest.approx(n_f / n)
        assert got["reach_feasible"] == (None if reach is None else pytest.approx(reach))
        assert got["const_reach_feasible"] == (None if const is None else pytest.approx(const))
        assert got["const_len_to_match_feasible"] == match
        assert got["len_mean_infeasible"] == (None if inf_mean is None else pytest.approx(inf_mean))


def test_feasible_comparison_separates_good_and_bad_predictors():
    """Image 0 needs 1 token, image 1 needs 4, image 2 never reaches: the oracle lengths (1, 4) reach both feasible
    images with 2.5 tokens on average, where a constant needs 4; swapped lengths (4, 1) reach one of the two."""
    l1 = np.array([[0.05, 0.05, 0.05, 0.05], [0.5, 0.4, 0.3, 0.05], [0.9, 0.9, 0.9, 0.9]])
    error = 0.1
    good = rt.feasible_comparison(l1, np.array([1.0, 4.0, 4.0]), np.array([0.05, 0.05, 0.9]), error)
    assert good["reach_feasible"] == 1.0 and good["len_mean_feasible"] == 2.5
    assert good["const_reach_feasible"] == pytest.approx(0.5) and good["const_len_to_match_feasible"] == 4
    assert good["len_mean_infeasible"] == 4.0 and good["feasible_frac"] == pytest.approx(2 / 3)
    bad = rt.feasible_comparison(l1, np.array([4.0, 1.0, 4.0]), np.array([0.05, 0.5, 0.9]), error)
    assert bad["reach_feasible"] == 0.5 and bad["const_len_to_match_feasible"] == 1
    none = rt.feasible_comparison(l1, np.array([1.0, 1.0, 1.0]), l1[:, 0], 0.01)
    assert none["n_feasible"] == 0 and none["reach_feasible"] is None and none["len_mean_infeasible"] == 1.0


def test_prefix_identity_check_can_fail():
    """The FlexTok check reports 1.0 for causal registers and less once the registers see later ones."""
    torch.manual_seed(0)
    tok = vtc.create_tokenizer("flextok", **TINY).eval()
    x, lv = synthetic_images(4, 16, seed=1)
    s = rt.ImageSet("procedural", x, lv.numpy(), ["a", "b", "c", "d"])
    good = rt.measure(tok, s, errors=[], rows=[])
    assert good["ids_eq"].all() and good["feat_eq"].all()
    tok.encoder.register_attention = "full"  # bidirectional registers: a prefix now depends on the tail
    bad = rt.measure(tok, s, errors=[], rows=[])
    assert bad["feat_eq"][:, -1].all()  # k = K compares the encode with itself
    assert not bad["feat_eq"][:, :-1].any()


# ---------------------------------------------------------------------------------------------- end to end
def test_report_on_tiny_tokenizers(tmp_path, monkeypatch):
    d = tmp_path / "tok"
    _save(d / "flextok", "flextok")
    _save(d / "flextok_no_tail_dropout", "flextok", seed=1, tail_dropout=False)
    _save(d / "one_d_piece", "one_d_piece")
    karl = _save(d / "karl", "karl")
    sets = rt.build_image_sets(16, 2, 10_000, 1, PHOTOS)
    with torch.no_grad():  # identical latents: one halting logit per image; the median image sits at the threshold
        for p in (karl.encoder.latent_tokens, karl.encoder.latent_pos):
            p.copy_(p[:1].expand_as(p))
        karl.halt_mlp[-1].weight.mul_(40.0)
        logit = torch.logit(karl.encode(sets["procedural"].images, error=0.2).extras["halt_prob"][:, 0].double())
        karl.halt_mlp[-1].bias.add_(math.log(3) - float(logit.median()) + 1e-3)  # p_halt > 0.75 <=> logit > log 3
    karl.save_pretrained(d / "karl")
    out = tmp_path / "report"
    argv = ["--tokenizers", str(d / "karl"), str(d / "flextok_no_tail_dropout"), str(d / "one_d_piece"),
            str(d / "flextok"), "--out", str(out), "--per-level", "2", "--photos", ",".join(PHOTOS),
            "--photo-tiles", "1", "--karl-errors", "0.2,0.3", "--jpeg-qualities", "20,80",
            "--row-images", "1"]  # fmt: skip
    res = rt.main(argv)
    for f in ("report.md", "tokenizers.csv", "psnr_vs_k.csv", "psnr_per_image.csv", "rd.csv", "karl.csv",
              "karl_levels.csv", "psnr_vs_k.png", "rd.png", "recon_row.png", "karl_lengths.png"):  # fmt: skip
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f

    cols, toks = _csv(out / "tokenizers.csv")
    assert cols[: len(rt.TOKENIZER_COLS)] == list(rt.TOKENIZER_COLS)
    assert {"monotone_procedural", "monotone_photos", "prefix_ids_identical_photos"} <= set(cols)
    # nested models sorted by label, each ablation right after its twin
    assert [t["tokenizer"] for t in toks] == ["flextok", "flextok_no_tail_dropout", "karl", "one_d_piece"]
    assert toks[1]["twin"] == "flextok" and toks[1]["tail_dropout"] == "False"
    for t in toks:
        flex = t["method"] == "flextok"
        for sname in ("procedural", "photos"):
            assert (t[f"prefix_ids_identical_{sname}"] == "1") == flex
            assert (t[f"prefix_features_identical_{sname}"] == "1") == flex
            assert 0 <= float(t[f"monotone_{sname}"]) <= 1

    cols, krows = _csv(out / "psnr_vs_k.csv")
    assert cols == ["tokenizer", "set", "k", "bits", "psnr_mean", "psnr_std", "n"]
    _, per_img = _csv(out / "psnr_per_image.csv")
    for r in krows:
        key = (r["tokenizer"], r["set"], r["k"])
        vals = [float(p["psnr"]) for p in per_img if (p["tokenizer"], p["set"], p["k"]) == key]
        assert len(vals) == int(r["n"]) == (10 if r["set"] == "procedural" else 2)
        assert float(r["psnr_mean"]) == pytest.approx(np.mean(vals), rel=1e-5)
        cb = 1000 if r["tokenizer"].startswith("flextok") else 64
        assert float(r["bits"]) == pytest.approx(int(r["k"]) * math.log2(cb), rel=1e-5)
    assert sorted({int(r["k"]) for r in krows}) == [1, 2, 4, 8]

    # PSNR recomputed for one tokenizer, k and image set straight from the model
    tok = vtc.create_tokenizer("one_d_piece", pretrained=d / "one_d_piece")
    x = sets["photos"].images
    with torch.no_grad():
        rec = tok.decode(tok.encode(x, num_tokens=2))
    want = rt.psnr(rt.to_uint8(rec), rt.to_uint8(x))
    got = [float(p["psnr"]) for p in per_img if (p["tokenizer"], p["set"], p["k"]) == ("one_d_piece", "photos", "2")]
    assert got == pytest.approx(want.tolist(), abs=1e-4)

    cols, rd = _csv(out / "rd.csv")
    assert cols == list(rt.RD_COLS)
    codecs = {r["codec"] for r in rd}
    assert {"jpeg", "jpeg_scan", "png", "raw", "flextok", "karl (adaptive)"} <= codecs
    assert all(r["psnr_db"] == "" for r in rd if r["codec"] in ("png", "raw"))

    cols, karl_rows = _csv(out / "karl.csv")
    assert cols == list(rt.KARL_COLS)
    assert [(r["set"], r["error"]) for r in karl_rows] == [
        ("procedural", "0.2"), ("procedural", "0.3"), ("photos", "0.2"), ("photos", "0.3")
    ]  # fmt: skip
    cached = np.load(out / "cache" / "karl.procedural.npz")
    lens, l1 = cached["karl_lengths"], cached["karl_l1"]
    assert lens.min() >= 1 and lens.max() <= 8 and lens.std() > 0  # the spread halting head varies the length
    r0 = karl_rows[0]
    assert float(r0["len_mean"]) == pytest.approx(lens[0].mean(), rel=1e-5)
    assert float(r0["len_std"]) == pytest.approx(lens[0].std(), rel=1e-5, abs=1e-9)
    assert float(r0["reach_frac"]) == pytest.approx((l1[0] <= 0.2).mean())
    n_f, reach, _, match, _ = _feasible_reference(cached["l1_all"], lens[0], l1[0], 0.2)
    assert int(r0["n_feasible"]) == n_f
    if reach is None:
        assert r0["reach_feasible"] == ""
    else:
        assert float(r0["reach_feasible"]) == pytest.approx(reach, rel=1e-5)
    assert r0["const_len_to_match_feasible"] == ("" if match is None else str(match))
    with torch.no_grad():  # the predicted lengths are those of one encoder pass of the saved model
        k2 = vtc.create_tokenizer("karl", pretrained=d / "karl")
        xp, _ = synthetic_images(2, 16, seed=10_000, start=0, complexity=0)
        assert k2.predict_num_tokens(xp, 0.2).tolist() == lens[0, :2].tolist()
    _, levels = _csv(out / "karl_levels.csv")
    assert [float(levels[0][n]) for n in COMPLEXITY_LEVELS] == pytest.approx(
        [lens[0][2 * i : 2 * i + 2].mean() for i in range(5)], rel=1e-5
    )
    md = (out / "report.md").read_text()
    for heading in ("## Tokenizers", "## PSNR (dB) vs tokens k: procedural", "## FlexTok", "## Rate", "## KARL"):
        assert heading in md
    assert len(res["psnr_vs_k"]) == len(krows)
    mean = {(r["tokenizer"], r["set"], r["k"]): r["psnr_mean"] for r in res["psnr_vs_k"]}  # full precision
    diffs = [
        mean[("flextok", "procedural", k)] - mean[("flextok_no_tail_dropout", "procedural", k)] for k in (1, 2, 4, 8)
    ]
    row = "| flextok | flextok_no_tail_dropout | procedural | " + " | ".join(f"{v:.2f}" for v in diffs) + " |"
    assert row in md


def test_cached_measure_resumes_and_notices_new_weights(tmp_path, monkeypatch):
    d = tmp_path / "flextok"
    _save(d, "flextok")
    (entry,) = rt.load_entries([d], "cpu")
    x, lv = synthetic_images(3, 16, seed=2)
    s = rt.ImageSet("procedural", x, lv.numpy(), ["a", "b", "c"])
    calls = []
    real = rt.measure
    monkeypatch.setattr(rt, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = rt.cached_measure(tmp_path / "cache", entry, s, {"seed": 1}, errors=[], rows=[0])
    again = rt.cached_measure(tmp_path / "cache", entry, s, {"seed": 1}, errors=[], rows=[0])
    assert len(calls) == 1 and set(first) == set(again)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    rt.cached_measure(tmp_path / "cache", entry, s, {"seed": 2}, errors=[], rows=[0])  # other settings
    assert len(calls) == 2
    _save(d, "flextok", seed=5)  # new weights in the same folder
    (entry,) = rt.load_entries([d], "cpu")
    rt.cached_measure(tmp_path / "cache", entry, s, {"seed": 1}, errors=[], rows=[0])
    assert len(calls) == 3


def test_no_tokenizers_says_how_to_train(tmp_path):
    assert rt.default_dirs(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="vtc train tokenizer"):
        rt.load_entries([], "cpu")
    with pytest.raises(FileNotFoundError, match="not a saved tokenizer"):
        rt.load_entries([tmp_path], "cpu")
    _save(tmp_path / "karl_no_tail_dropout", "karl", tail_dropout=False)
    assert rt.default_dirs(tmp_path) == [tmp_path / "karl_no_tail_dropout"]
    with pytest.raises(SystemExit):
        rt.parse_args(["--karl-errors", "0.1,-2"])
