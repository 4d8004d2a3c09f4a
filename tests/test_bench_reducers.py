"""The reducer benchmark: quick mode on a tiny subset, results files, resuming, and the slow greedy references."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_inputs
from vtc.eval import bench_reducers as bench

import vtc
from vtc.reducers import get_reducer_class

ARGS = ["--quick", "--methods", "random,downsample", "--budgets", "8", "--n", "64", "--dim", "16", "--device", "cpu"]


def _csv(out) -> list[dict[str, str]]:
    with (out / "bench.csv").open(newline="") as f:
        return list(csv.DictReader(f))


class _CountCalls:
    """Stands in for `time_call`; the bench catches exceptions per method, so raising would go unnoticed."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise RuntimeError("a row already in the CSV was measured again")


def test_quick_run_writes_rows_and_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "res"
    rows = bench.main([*ARGS, "--out", str(out)])
    assert [(r["method"], r["batch"], r["budget"], r["n"]) for r in rows] == [
        ("downsample", 1, 8, 64),
        ("random", 1, 8, 64),
    ]
    saved = _csv(out)
    assert [r["method"] for r in saved] == ["downsample", "random"]
    for r in saved:
        assert (r["device"], r["dtype"], r["layout"], r["d"], r["budget"], r["kept"]) == (
            "cpu",
            "float32",
            "8x8",
            "16",
            "8",
            "8.00",
        )
        assert float(r["median_ms"]) > 0 and 1 <= int(r["repeats"]) <= 3
        assert r["speedup"] == r["ref_median_ms"] == r["core_ms"] == ""  # no slow reference for these
    md = (out / "bench.md").read_text()
    assert "| random | 8x8 | 64 | 16 | cpu | float32 | 1 | 8 | 8.0 |" in md
    assert "| downsample | 8x8 | 64 | 16 | cpu | float32 | 1 | 8 | 8.0 |" in md
    assert "| random | 8x8 |" in capsys.readouterr().out  # the table is printed too

    counter = _CountCalls()
    monkeypatch.setattr(bench, "time_call", counter)
    assert bench.main([*ARGS, "--out", str(out)]) == []  # everything done: nothing is timed
    assert counter.calls == 0
    assert _csv(out) == saved
    monkeypatch.undo()

    # A killed run: the second row never made it, the third was cut mid-write.
    lines = (out / "bench.csv").read_text().splitlines(keepends=True)
    (out / "bench.csv").write_text(lines[0] + lines[1] + lines[2][:15])
    rows = bench.main([*ARGS, "--out", str(out)])
    assert [r["method"] for r in rows] == ["random"]
    again = _csv(out)
    assert [r["method"] for r in again] == ["downsample", "random"] and again[0] == saved[0]

    rows = bench.main([*ARGS, "--out", str(out), "--fresh"])
    assert len(rows) == 2 and len(_csv(out)) == 2


def test_views_layout_and_unknown_methods(tmp_path, capsys):
    names = [n for n in vtc.list_reducers() if "views" in get_reducer_class(n).requires]
    if not names:
        pytest.skip("no registered reducer requires views")
    rows = bench.main(
        ["--quick", "--methods", f"{names[0]},not_a_method", "--budgets", "8", "--n", "16", "--dim", "8"]
        + ["--device", "cpu", "--out", str(tmp_path), "--repeats", "1"]
    )
    assert [(r["layout"], r["n"]) for r in rows] == [("4x4+2x2 crops", 80)]
    assert "'not_a_method' is not registered" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(bench.REFERENCES))
def test_slow_references_match_the_reducers(name):
    if name not in vtc.list_reducers():
        pytest.skip(f"{name} is not registered")
    torch.manual_seed(0)
    red = vtc.create_reducer(name).eval()
    for seed in range(3):
        vt, q = make_inputs(name, b=3, grid=(5, 6), d=16, t=5, seed=seed)
        for k in (1, 7, 29):
            with torch.no_grad():
                sel = red(vt, budget=k, query=q)
            assert torch.equal(bench.REFERENCES[name](red, vt, q, k), sel.indices), (name, seed, k)


def test_greedy_rows_report_speedup_and_agreement(tmp_path):
    names = [n for n in bench.REFERENCES if n in vtc.list_reducers()]
    if not names:
        pytest.skip("no greedy reducer is registered")
    rows = bench.main(
        ["--quick", "--methods", ",".join(names), "--budgets", "4", "--n", "16", "--dim", "8", "--device", "cpu"]
        + ["--out", str(tmp_path), "--repeats", "1", "--warmup", "0"]
    )
    assert sorted(r["method"] for r in rows) == sorted(names)
    for r in rows:
        assert float(r["ref_median_ms"]) > 0 and float(r["core_ms"]) > 0 and float(r["agree"]) == 1.0
        # the CSV holds the speed-up to 3 decimals and both times to 4 (in ms): the ratio of the rounded times
        # can differ from the rounded ratio by the rounding of each (fast 16-token runs take ~0.05 ms)
        ref, core = float(r["ref_median_ms"]), float(r["core_ms"])
        want = ref / core
        tol = 6e-4 + want * (5e-5 / ref + 5e-5 / core)
        assert float(r["speedup"]) == pytest.approx(want, rel=1e-3, abs=tol)


def test_lock_keeps_two_runs_apart_and_a_killed_runs_lock_is_taken_over(tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    (out / "bench.lock").write_text(str(os.getppid()))  # a live process holds the folder
    with pytest.raises(SystemExit, match="another run"):
        bench.main([*ARGS, "--out", str(out)])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "bench.lock").write_text(str(dead.pid))  # the holder was killed
    assert len(bench.main([*ARGS, "--out", str(out)])) == 2
    assert not (out / "bench.lock").exists()
