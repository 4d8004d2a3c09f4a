"""`vtc eval`: loading with from_pretrained, resumption after a kill, sharding on two gloo processes, the CLI."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
from vtc.eval import harness
from vtc.eval.benchmarks import create_benchmark

METHODS = ["random", "divprune", "fastv"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random-weight tiny LLaVA (32 px, 4×4 visual tokens) + processor saved as a user's checkpoint would be."""
    from vtc.train.vlm import build_model, build_processor, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model("llava", len(tok), image_size=32).eval()
    model.generation_config.pad_token_id = 0
    path = tmp_path_factory.mktemp("tiny") / "tiny-llava"
    model.save_pretrained(path)
    build_processor("llava", tok, image_size=32).save_pretrained(path)
    return path


def _cfg(tiny_dir, out, **kw):
    base = dict(model=str(tiny_dir), bench="shapes", bench_args={"per_type": 1}, methods=METHODS, budgets=[4, 8],
                batch_size=1, out=out, threads=1, progress=False, max_new_tokens=2)  # fmt: skip
    base.update(kw)
    return harness.EvalConfig(**base)


def _by_key(out):
    recs = harness.read_results(out)
    return {harness._key(r): (r["pred"], r["score"], r["visual_tokens"], r["flops"]) for r in recs}


def test_full_run_tables_and_plots(tiny_dir, tmp_path):
    rows = harness.run_eval(_cfg(tiny_dir, tmp_path))
    assert {(r["method"], str(r["budget"])) for r in rows} == {("full", "all")} | {
        (m, str(b)) for m in METHODS for b in (4, 8)
    }
    full = next(r for r in rows if r["method"] == "full")
    assert full["visual_tokens"] == 16 and full["agreement"] == 1.0 and full["flops_ratio"] == 1.0
    for r in rows:
        assert r["n"] == 6
        if r["method"] in ("random", "divprune"):  # pre-LLM: exactly the budget reaches the LLM
            assert r["visual_tokens"] == float(r["budget"]) and r["flops_ratio"] < 1
        if r["method"] == "fastv":  # in-LLM: layer-averaged count between the budget and all tokens
            assert float(r["budget"]) < r["visual_tokens"] < 16
    recs = harness.read_results(tmp_path)
    assert len(recs) == 6 * (1 + len(METHODS) * 2)
    assert all(r["kv_bytes"] > 0 and r["prefill_s"] > 0 for r in recs)
    md = (tmp_path / "summary.md").read_text()
    assert "| divprune | 4 |" in md and "accuracy/count" in md
    assert (tmp_path / "summary.csv").read_text().startswith("method,budget")
    assert (tmp_path / "plots" / "accuracy_vs_tokens.png").stat().st_size > 1000


def test_killed_run_resumes_without_loss_or_double_counting(tiny_dir, tmp_path):
    ref = tmp_path / "ref"
    harness.run_eval(_cfg(tiny_dir, ref, methods=["random"], budgets=[4]))
    out = tmp_path / "killed"
    harness.run_eval(_cfg(tiny_dir, out, methods=["random"], budgets=[4]))
    lines = (out / "results.jsonl").read_text().splitlines()
    # a kill mid-run: 7 complete lines, then half a line
    (out / "results.jsonl").write_text("\n".join(lines[:7]) + "\n" + lines[7][: len(lines[7]) // 2])
    harness.run_eval(_cfg(tiny_dir, out, methods=["random"], budgets=[4]))
    assert _by_key(out) == _by_key(ref)
    keys = [harness._key(r) for r in harness.read_results(out)]
    assert len(keys) == len(set(keys)) == 12


def _worker(rank, world, port, tiny_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        harness.run_eval(_cfg(tiny_dir, out, methods=["random", "fastv"], budgets=[4]))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_merge_to_the_one_process_result(tiny_dir, tmp_path):
    single = tmp_path / "single"
    rows1 = harness.run_eval(_cfg(tiny_dir, single, methods=["random", "fastv"], budgets=[4]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sharded = tmp_path / "sharded"
    torch.multiprocessing.spawn(_worker, args=(2, port, str(tiny_dir), str(sharded)), nprocs=2, join=True)
    assert sorted(p.name for p in sharded.glob("results*.jsonl")) == ["results.rank0.jsonl", "results.rank1.jsonl"]
    r0 = {json.loads(x)["id"] for x in (sharded / "results.rank0.jsonl").read_text().splitlines()}
    r1 = {json.loads(x)["id"] for x in (sharded / "results.rank1.jsonl").read_text().splitlines()}
    assert r0 and r1 and not r0 & r1  # disjoint shards
    assert _by_key(sharded) == _by_key(single)
    rows2 = harness.summarize(harness.read_results(sharded), create_benchmark("shapes", per_type=1))
    keep = ("method", "budget", "n", "accuracy", "retention", "agreement", "visual_tokens", "tflops")
    assert json.dumps([{k: r[k] for k in keep} for r in rows2]) == json.dumps([{k: r[k] for k in keep} for r in rows1])


def test_summary_retention_and_agreement_by_hand():
    bench = create_benchmark("shapes", per_type=1)
    base = dict(qtype="count", answer="two", visual_tokens=1.0, flops=1.0, prefill_s=0.1, select_s=0.0, kv_bytes=1)
    recs = [
        dict(base, method="full", budget=0, id="a", pred="two", score=1.0),
        dict(base, method="full", budget=0, id="b", pred="one", score=0.0),
        dict(base, method="m", budget=4, id="a", pred="one", score=0.0, flops=0.5),
        dict(base, method="m", budget=4, id="b", pred="one", score=0.0, flops=0.25),
    ]
    rows = {r["method"]: r for r in harness.summarize(recs, bench)}
    assert rows["full"]["accuracy"] == 0.5 and rows["m"]["accuracy"] == 0.0
    assert rows["m"]["retention"] == 0.0 and rows["m"]["agreement"] == 0.5
    assert rows["m"]["flops_ratio"] == pytest.approx(0.375)


def test_method_and_budget_parsing():
    from vtc import list_reducers

    assert harness.expand_methods(["all"]) == list_reducers()
    assert harness.expand_methods(["div*", "random", "divprune"]) == ["divprune", "random"]
    with pytest.raises(ValueError, match="divprune"):
        harness.expand_methods(["divprun"])
    with pytest.raises(ValueError, match="matches no reducer"):
        harness.expand_methods(["zzz*"])
    assert harness.parse_budgets("16,0.25") == [16, 0.25]
    with pytest.raises(ValueError, match="'abc'"):
        harness.parse_budgets("16,abc")
    with pytest.raises(ValueError, match="> 0"):
        harness.parse_budgets("0")
    with pytest.raises(ValueError, match="shipped models"):
        harness.resolve_model_path("no-such-model")


def test_cli_eval_and_list(tiny_dir, tmp_path, capsys):
    from vtc.cli import main

    assert main(["list", "reducers", "div*"]) == 0
    assert capsys.readouterr().out.split() == ["divprune"]
    assert main(["list", "benchmarks"]) == 0
    assert "shapes" in capsys.readouterr().out.split()
    args = ["eval", "--model", str(tiny_dir), "--methods", "random", "--budgets", "4", "--bench-arg", "per_type=1"]
    args += ["--batch-size", "3", "--out", str(tmp_path), "--no-progress", "--threads", "1", "--max-new-tokens", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| random | 4 | 6 |" in out and "| full | all | 6 |" in out
