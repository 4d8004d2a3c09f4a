"""The adapter prefill benchmark: a quick run on a tiny LLaVA, its FLOPs column, resuming after a kill."""

from __future__ import annotations

import csv
import math

import pytest
from vtc.eval import bench_adapters as bench
from vtc.eval.flops import prefill_flops

ARGS = ["--quick", "--families", "llava", "--methods", "random,fastv", "--budgets", "32", "--text-tokens", "8"]


def _csv(out) -> list[dict[str, str]]:
    with (out / "bench.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_quick_run_counts_flops_and_resumes_without_duplicates(tmp_path, monkeypatch, capsys):
    out = tmp_path / "res"
    rows = bench.main([*ARGS, "--out", str(out)])
    assert [(r["method"], r["budget"]) for r in rows] == [("none", "full"), ("random", 32), ("fastv", 32)]
    saved = _csv(out)
    assert [(r["method"], r["budget"]) for r in saved] == [("none", "full"), ("random", "32"), ("fastv", "32")]
    cfg = bench.model_config("llava", "tiny")
    layers = cfg.text_config.num_hidden_layers
    text = 1 + 8  # <bos> + the text tokens
    expected = {
        "none": prefill_flops(cfg, text, 576, images=1),
        "random": prefill_flops(cfg, text, 32, images=1),
        "fastv": prefill_flops(cfg, text, [576, 576] + [32] * (layers - 2), images=1),  # FastV's K = 2
    }
    for r in saved:
        f = expected[r["method"]]
        assert float(r["gflops"]) == pytest.approx(f["total"] / 1e9, abs=1e-4)
        assert float(r["visual_kept"]) == pytest.approx(f["visual_effective"])
        assert int(r["visual_in"]) == 576 and float(r["median_ms"]) > 0 and 1 <= int(r["repeats"]) <= 2
        assert (r["select_ms"] == "") == (r["method"] == "none")
    assert int(saved[1]["seq_len"]) == text + 32 and int(saved[2]["seq_len"]) == text + 576
    full, rand, _ = bench.derived(saved)
    assert full["speedup"] == 1.0 and full["flops_ratio"] == 1.0
    assert rand["flops_ratio"] == pytest.approx(float(rand["gflops"]) / float(full["gflops"]))
    lat = float(rand["median_ms"]) / float(full["median_ms"])
    assert rand["lat_per_flops"] == pytest.approx(lat / rand["flops_ratio"])
    md = (out / "bench.md").read_text()
    assert "| llava | tiny | 1 | none | full | 576 → 576 | 585 |" in md
    assert "| llava | tiny | 1 | random | 32 | 576 → 32 | 41 |" in md
    assert "| llava | tiny | 1 | fastv | 32 |" in capsys.readouterr().out

    calls = []  # (a raising stub would be caught as a failed row, so record instead)
    monkeypatch.setattr(bench, "build_model", lambda *a, **k: calls.append("build"))
    monkeypatch.setattr(bench, "time_call", lambda *a, **k: calls.append("time"))
    assert bench.main([*ARGS, "--out", str(out)]) == []  # everything is done: nothing is built or timed
    assert calls == [] and _csv(out) == saved
    monkeypatch.undo()

    # A killed run: the third row never made it, the second was cut while being written.
    lines = (out / "bench.csv").read_text().splitlines(keepends=True)
    (out / "bench.csv").write_text(lines[0] + lines[1] + lines[2][:20])
    rows = bench.main([*ARGS, "--out", str(out)])
    assert [r["method"] for r in rows] == ["random", "fastv"]
    again = _csv(out)
    assert [r["method"] for r in again] == ["none", "random", "fastv"] and again[0] == saved[0]


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_a_batch_of_copies_costs_batch_times_one_and_keeps_its_own_full_row(tmp_path, family):
    args = ["--quick", "--families", family, "--methods", "random", "--budgets", "32", "--text-tokens", "8"]
    out = tmp_path / "res"
    one = bench.main([*args, "--out", str(out)])
    three = bench.main([*args, "--batch", "3", "--out", str(out)])  # same CSV: the batch is part of a row's key
    assert [r["batch"] for r in one + three] == [1, 1, 3, 3]
    for a, b in zip(one, three, strict=True):
        if b["method"] == "none":  # copies of one prompt: three times the work
            assert float(b["gflops"]) == pytest.approx(3 * float(a["gflops"]), abs=3e-4)  # written to 4 decimals
            assert (b["seq_len"], b["visual_kept"]) == (a["seq_len"], a["visual_kept"])
        else:  # random keeps other tokens in each copy: each row's schedule is counted on its own
            assert float(b["gflops"]) < 3 * float(one[0]["gflops"]) and b["seq_len"] >= a["seq_len"]
    derived = bench.derived(_csv(out))
    assert [d["flops_ratio"] for d in derived if d["method"] == "none"] == [1.0, 1.0]
    assert f"| {family} | tiny | 3 | random | 32 |" in (out / "bench.md").read_text()


def test_derived_without_a_full_row_and_bad_options(tmp_path):
    row = dict.fromkeys(bench.FIELDS, "1")
    row.update(family="llava", size="tiny", method="random", budget="32")
    (d,) = bench.derived([row])
    assert math.isnan(d["speedup"]) and math.isnan(d["lat_per_flops"])
    with pytest.raises(SystemExit):
        bench.main(["--families", "llava,gpt2", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench.main(["--methods", "not_a_method", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench.main(["--budgets", "64,abc", "--out", str(tmp_path)])


def test_model_sizes_have_the_stated_shapes():
    from vtc.eval.flops import stock_visual_tokens

    cfg = bench.model_config("llava", "7b")
    assert (cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers, cfg.vision_config.num_hidden_layers) == (
        4096,
        32,
        24,
    )
    assert stock_visual_tokens(cfg, 1) == 576
    assert stock_visual_tokens(bench.model_config("llava_next", "mid"), [bench.NEXT_IMAGE]) == 2340
    for fam in ("qwen2_vl", "qwen2_5_vl"):
        c = bench.model_config(fam, "mid")
        assert stock_visual_tokens(c, [bench.QWEN_GRID]) == 391
        tc = c.text_config
        assert sum(tc.rope_parameters["mrope_section"]) == tc.hidden_size // tc.num_attention_heads // 2
