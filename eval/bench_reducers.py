"""Latency of every registered reducer at LLaVA-1.5 sizes, with slow per-sample references for the greedy methods.

    python -m vtc.eval.bench_reducers                      # all reducers, CPU (+ CUDA when available)
    python -m vtc.eval.bench_reducers --methods "div*,mmtok" --device cuda --batch 8
    python -m vtc.eval.bench_reducers --quick              # fewer repeats, B = 1 only

Setup (every size is an option): N = 576 visual tokens on a 24×24 grid, D = 4096 (LLaVA-1.5-7B width), budgets
64 / 128 / 192, B = 1 and 8. Side inputs are shaped like `tests/conftest.py`'s `make_inputs`: `cls_attn`
`[B, 16, N]` (2·randn logits), `keys` `[B, N, 1024]`, `features` `[B, N, 1024]`, and for query-aware methods a
32-token query with one padded position in sample 0. Reducers that require `views` get a thumbnail + 2×2 crops,
each 24×24 (so N = 2880 and the budget is for all five views); the `layout` column says which.

Timing: reducers are built after `torch.manual_seed(0)` and put in eval mode; inputs are fixed by `--seed`. Each
row runs `--warmup` untimed calls (lazily built parameters are created there), then up to `--repeats` timed calls
under `torch.inference_mode` (wall clock on CPU; CUDA events after a synchronize on GPU), stopping early once at
least three calls are in and `--max-seconds` have passed; it reports the median and the interquartile range.

Slow references: for the greedy methods (DivPrune, ToDRE stage 1, MMTok) the benchmark also times a naive loop
written here from the papers' formulas in the style of the official code: one sample at a time, one Python step per
kept token, each step recomputing its scores from plain tensors (DivPrune / ToDRE: the distance of every candidate
to its nearest kept token, as a minimum over all kept rows; MMTok: the coverage gain of every candidate). For these
rows `core_ms` also times the method's own `_reduce` on inputs already checked, i.e. without the base class's input
validation (a NaN/Inf scan of every input, which the references skip); `speedup` is the reference's median over
`core_ms`, both measured in the same run on the same inputs, and `agree` the fraction of samples whose kept set
equals the reference's (a check that the two compute the same thing). Methods
that are not registered are skipped, and so are in-LLM reducers (stage != "pre_llm"), which need a model.

Results go to `--out` (default `runs/bench_reducers/`): `bench.csv` gets one row per measurement, appended and
synced as soon as it is measured, so a killed run loses nothing; `bench.md` (the Markdown table, also printed at the
end) is rewritten after every row. A rerun skips the rows already in the CSV (same method, device, dtype and sizes)
unless `--fresh`. `bench.lock` keeps two runs from writing to the same folder at once (a killed run's lock is
taken over). A method that raises is reported at the end and not written, so the next run retries it.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm
from vtc.eval import results_csv

import vtc
from vtc.reducers import get_reducer_class

KEY_FIELDS = ("method", "device", "dtype", "batch", "n", "layout", "d", "dv", "dk", "heads", "query_len", "budget")
FIELDS = KEY_FIELDS + (
    "kept",
    "median_ms",
    "iqr_ms",
    "repeats",
    "core_ms",
    "ref_median_ms",
    "speedup",
    "agree",
    "threads",
    "torch",
)
CSV_NAME, MD_NAME = "bench.csv", "bench.md"
CROPS = (2, 2)


# ---------------------------------------------------------------------------------------------- slow references
def _cos_dist(x: Tensor) -> Tensor:
    """`[N, D]` → `[N, N]` 1 − cos, float32, zero diagonal."""
    xn = F.normalize(x.float(), dim=-1)
    d = (1.0 - xn @ xn.T).clamp_min(0.0)
    return d.fill_diagonal_(0.0)


def _naive_max_min(dist: Tensor, k: int, first: int) -> list[int]:
    """Greedy max-min: every step scores each candidate by its distance to the nearest kept token (the minimum over
    all kept rows, recomputed) and keeps the farthest one."""
    kept = [first]
    for _ in range(1, k):
        score = dist[kept].amin(dim=0)  # [N]
        score[kept] = -math.inf
        kept.append(int(score.argmax()))
    return sorted(kept)


def _nn_first(dist: Tensor) -> int:
    """DivPrune's first pick: the token farthest from its nearest other token."""
    return int((dist + torch.diag(torch.full_like(dist[0], math.inf))).amin(dim=1).argmax())


def ref_divprune(reducer: vtc.Reducer, vt: vtc.VisualTokens, query: vtc.Query | None, k: int) -> Tensor:
    """DivPrune (arXiv 2503.02175): max-min diversity on 1 − cos of the tokens, first = largest NN distance."""
    rows = []
    for b in range(vt.tokens.shape[0]):
        dist = _cos_dist(vt.tokens[b])
        rows.append(_naive_max_min(dist, k, _nn_first(dist)))
    return torch.tensor(rows)


def ref_todre(reducer: vtc.Reducer, vt: vtc.VisualTokens, query: vtc.Query | None, k: int) -> Tensor:
    """ToDRE stage 1 (arXiv 2505.18757): greedy k-center on 1 − cos of the encoder features (tokens if absent)."""
    first_rule = getattr(reducer.config, "first_center", "medoid")
    rows = []
    for b in range(vt.tokens.shape[0]):
        dist = _cos_dist((vt.features if vt.features is not None else vt.tokens)[b])
        first = int(dist.sum(dim=1).argmin()) if first_rule == "medoid" else _nn_first(dist)
        rows.append(_naive_max_min(dist, k, first))
    return torch.tensor(rows)


def ref_mmtok(reducer: vtc.Reducer, vt: vtc.VisualTokens, query: vtc.Query | None, k: int) -> Tensor:
    """MMTok (arXiv 2508.18264): greedy facility-location coverage of the question tokens and the vision tokens,

    P = softmax_j(cos(z_t, x_j)/τ_t)/m, Q = α·softmax_j(cos(v_i, v_j)/τ_v)/N, f(S) = Σ_rows max_{j∈S} [P; Q].
    """
    cfg = reducer.config
    rows = []
    for b in range(vt.tokens.shape[0]):
        x = F.normalize(vt.tokens[b].float(), dim=-1)  # [N, D]
        v = F.normalize((vt.features if vt.features is not None else vt.tokens)[b].float(), dim=-1)
        z = F.normalize(query.embeds[b][query.valid_mask()[b]].float(), dim=-1)  # [m, D]
        n = x.shape[0]
        p = (z @ x.T / cfg.tau_text).softmax(dim=1) / z.shape[0]
        q = cfg.alpha * (v @ v.T / cfg.tau_vision).softmax(dim=1) / n
        w = torch.cat([p, q], dim=0)  # [m + N, N]
        cur = torch.zeros(w.shape[0])
        kept: list[int] = []
        for _ in range(k):
            gain = (w - cur[:, None]).clamp_min(0.0).sum(dim=0)  # [N] coverage gain of each candidate
            gain[kept] = -math.inf
            j = int(gain.argmax())
            kept.append(j)
            cur = torch.maximum(cur, w[:, j])
        rows.append(sorted(kept))
    return torch.tensor(rows)


REFERENCES: dict[str, Callable[..., Tensor]] = {"divprune": ref_divprune, "todre": ref_todre, "mmtok": ref_mmtok}


# ---------------------------------------------------------------------------------------------- inputs and timing
def make_inputs(
    b: int,
    grid: tuple[int, int],
    d: int,
    *,
    views: tuple[int, int] | None = None,
    dv: int = 1024,
    dk: int = 1024,
    heads: int = 16,
    t: int = 32,
    seed: int = 0,
) -> tuple[vtc.VisualTokens, vtc.Query]:
    """Random inputs with every side field, as in `tests/conftest.py` but at benchmark sizes (float32, CPU)."""
    g = torch.Generator().manual_seed(seed)
    hw = grid[0] * grid[1]
    n = hw * (1 + views[0] * views[1]) if views is not None else hw
    vt = vtc.VisualTokens(
        tokens=torch.randn(b, n, d, generator=g),
        features=torch.randn(b, n, dv, generator=g),
        cls_attn=2 * torch.randn(b, heads, n, generator=g),
        keys=torch.randn(b, n, dk, generator=g),
        grid=grid,
        views=views,
    )
    mask = torch.ones(b, t, dtype=torch.bool)
    if t > 1:
        mask[0, -1] = False
    return vt, vtc.Query(torch.randn(b, t, d, generator=g), mask)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int, max_seconds: float
) -> tuple[list[float], Any]:
    """Milliseconds of `repeats` calls of `fn` after `warmup` untimed ones (stops early after `max_seconds` once
    three calls are in); returns the times and the last output."""
    out = None
    with torch.inference_mode():
        for _ in range(warmup):
            out = fn()
        _sync(device)
        times: list[float] = []
        start = time.perf_counter()
        for _ in range(repeats):
            if device.type == "cuda":
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                out = fn()
                e1.record()
                e1.synchronize()
                times.append(e0.elapsed_time(e1))
            else:
                t0 = time.perf_counter()
                out = fn()
                times.append((time.perf_counter() - t0) * 1e3)
            if len(times) >= min(3, repeats) and time.perf_counter() - start > max_seconds:
                break
    return times, out


def _iqr(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[2] - q[0]


def _kept_sets(sel: vtc.Selection) -> list[list[int]] | None:
    if sel.indices is None:
        return None
    return [sel.indices[b][sel.mask[b]].tolist() for b in range(sel.indices.shape[0])]


# ---------------------------------------------------------------------------------------------- results files
def _key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(row[f]) for f in KEY_FIELDS)


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of the results CSV; a row cut short by a killed run is dropped so it is measured again."""
    return results_csv.read_rows(path, FIELDS, "bench_reducers")


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row and sync it to disk, so a killed run keeps it."""
    results_csv.append_row(path, row, FIELDS)


def _num(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        return math.nan


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table, sorted by device, dtype, sizes, method and budget."""
    head = (
        "| method | layout | N | D | device | dtype | B | budget | kept | median ms | IQR ms | reps | core ms "
        "| ref ms | speed-up | agree |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    order = sorted(
        rows,
        key=lambda r: (
            r["device"],
            r["dtype"],
            int(r["d"]),
            int(r["batch"]),
            r["method"],
            int(r["n"]),
            int(r["budget"]),
        ),
    )

    def fmt(s: Any, spec: str) -> str:
        x = _num(str(s))
        return "" if math.isnan(x) else format(x, spec)

    for r in order:
        speed = fmt(r["speedup"], ".1f")
        lines.append(
            f"| {r['method']} | {r['layout']} | {r['n']} | {r['d']} | {r['device']} | {r['dtype']} | {r['batch']} | "
            f"{r['budget']} | {fmt(r['kept'], '.1f')} | {fmt(r['median_ms'], '.2f')} | {fmt(r['iqr_ms'], '.2f')} | "
            f"{r['repeats']} | {fmt(r['core_ms'], '.2f')} | {fmt(r['ref_median_ms'], '.2f')} | "
            f"{speed + '×' if speed else ''} | "
            f"{fmt(r['agree'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, rows: list[dict[str, Any]], note: str) -> None:
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(note + "\n\n" + markdown_table(rows))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- main
def acquire_lock(out: Path) -> Path:
    """Claim `out` for this process (`bench.lock` holds the pid); a live holder is an error, a dead one's is taken."""
    lock = out / "bench.lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                if pid > 0 and pid != os.getpid():
                    os.kill(pid, 0)  # raises if that process is gone
                    raise SystemExit(
                        f"bench_reducers: another run (pid {pid}) is writing to {out}; wait or use another --out"
                    )
            except (ProcessLookupError, ValueError):
                pass
            except PermissionError:  # alive, owned by someone else
                raise SystemExit(f"bench_reducers: another run is writing to {out}; use another --out") from None
            lock.unlink(missing_ok=True)  # stale: its run was killed
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lock


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.replace(" ", "").split(",") if v]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vtc.eval.bench_reducers", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--methods", default="*", help="comma-separated names or fnmatch patterns (default: all)")
    p.add_argument("--exclude", default="", help="comma-separated names or patterns to leave out")
    p.add_argument("--budgets", type=_ints, default=[64, 128, 192], help="token budgets (ints), e.g. 64,128,192")
    p.add_argument("--batch", type=_ints, default=[1, 8], help="batch sizes, e.g. 1,8")
    p.add_argument("--n", type=int, default=576, help="visual tokens per view, a square (24x24 = 576)")
    p.add_argument("--dim", type=int, default=4096, help="token width D (LLaVA-1.5-7B: 4096)")
    p.add_argument("--feat-dim", type=int, default=1024, help="vision feature width Dv (CLIP ViT-L: 1024)")
    p.add_argument("--key-dim", type=int, default=1024, help="attention key width Dk")
    p.add_argument("--heads", type=int, default=16, help="heads of cls_attn")
    p.add_argument("--query-len", type=int, default=32, help="question tokens T")
    p.add_argument("--device", default="auto", help="comma-separated devices; auto = cpu plus cuda if available")
    p.add_argument("--dtype", default="float32", help="input dtype: float32, bfloat16 or float16")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per row (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    p.add_argument("--max-seconds", type=float, default=30.0, help="stop repeating a row after this long (>= 3 calls)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-reference", action="store_true", help="skip the slow reference loops of the greedy methods")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--out", type=Path, default=Path("runs/bench_reducers"), help="results folder")
    p.add_argument("--fresh", action="store_true", help="discard earlier results in --out instead of resuming")
    p.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up, B = 1 only, 5 s per row at most")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.batch, args.max_seconds = (
            min(args.repeats, 3),
            1,
            [1],
            min(args.max_seconds, 5),
        )
    side = math.isqrt(args.n)
    if side * side != args.n:
        p.error(f"--n {args.n} must be a square number of tokens (a side x side grid), e.g. 576")
    if args.repeats < 1 or args.warmup < 0 or not args.budgets or not args.batch:
        p.error("--repeats must be >= 1, --warmup >= 0, and --budgets / --batch non-empty")
    return args


def _devices(spec: str) -> list[torch.device]:
    if spec == "auto":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    devs = [torch.device(s) for s in spec.split(",") if s]
    for d in devs:
        if d.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("bench_reducers: --device cuda was asked for but CUDA is not available")
    return devs


def _select_methods(spec: str, exclude: str) -> list[str]:
    pats = [s for s in spec.replace(" ", "").split(",") if s]
    excl = [s for s in exclude.replace(" ", "").split(",") if s]
    names = vtc.list_reducers(pats, excl)
    for p in pats:  # a plain name that is not registered (yet) is skipped, not an error
        if not any(ch in p for ch in "*?[") and p not in names and not any(fnmatch.fnmatchcase(p, e) for e in excl):
            print(f"bench_reducers: {p!r} is not registered, skipped", file=sys.stderr)
    in_llm = [n for n in names if get_reducer_class(n).stage != "pre_llm"]
    if in_llm:  # they act inside the LLM's layers and need the model (vtc.compress), not a bare tensor call
        print(f"bench_reducers: in-LLM reducers need a model, skipped: {', '.join(in_llm)}", file=sys.stderr)
    return [n for n in names if n not in in_llm]


def measure(
    red: vtc.Reducer,
    vt: vtc.VisualTokens,
    query: vtc.Query | None,
    k: int,
    dev: torch.device,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Time one reducer (and its slow reference, if it has one) on one input; the result columns of a row."""
    times, sel = time_call(partial(red, vt, budget=k, query=query), dev, args.warmup, args.repeats, args.max_seconds)
    out: dict[str, Any] = dict(
        kept=f"{float(sel.num_kept.float().mean()):.2f}",
        median_ms=f"{statistics.median(times):.4f}",
        iqr_ms=f"{_iqr(times):.4f}",
        repeats=len(times),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    ref = REFERENCES.get(red.name)
    if ref is not None and not args.no_reference:
        vt_ok, q_ok = red._check_tokens(vt), red._check_query(query, vt)  # what forward() hands to _reduce
        ctimes, _ = time_call(partial(red._reduce, vt_ok, k, q_ok), dev, args.warmup, args.repeats, args.max_seconds)
        rtimes, ref_idx = time_call(
            partial(ref, red, vt, query, k), dev, min(args.warmup, 1), args.repeats, args.max_seconds
        )
        kept = _kept_sets(sel)
        b = vt.tokens.shape[0]
        agree = math.nan if kept is None else sum(kept[i] == ref_idx[i].tolist() for i in range(b)) / b
        out.update(
            core_ms=f"{statistics.median(ctimes):.4f}",
            ref_median_ms=f"{statistics.median(rtimes):.4f}",
            speedup=f"{statistics.median(rtimes) / statistics.median(ctimes):.3f}",
            agree=f"{agree:.3f}",
        )
    return out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; returns the rows measured in this run (rows found in the CSV are not redone)."""
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SystemExit(f"bench_reducers: --dtype {args.dtype!r} is not a floating torch dtype")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(args.out)
    try:
        return _run(args, dtype)
    finally:
        lock.unlink(missing_ok=True)


def _run(args: argparse.Namespace, dtype: torch.dtype) -> list[dict[str, Any]]:
    csv_path, md_path = args.out / CSV_NAME, args.out / MD_NAME
    if args.fresh:
        csv_path.unlink(missing_ok=True)
        md_path.unlink(missing_ok=True)
    rows = read_rows(csv_path)
    done = {_key(r) for r in rows}
    methods = _select_methods(args.methods, args.exclude)
    side = math.isqrt(args.n)
    grid = (side, side)
    note = (
        f"Reducer latency (`python -m vtc.eval.bench_reducers`): Dv={args.feat_dim}, Dk={args.key_dim}, "
        f"cls_attn heads={args.heads}, query={args.query_len} tokens; median of up to {args.repeats} timed calls "
        f"after {args.warmup} warm-up, torch {torch.__version__}, CPU threads: {torch.get_num_threads()}. "
        f"Layout '{side}x{side}' is one grid; '+{CROPS[0]}x{CROPS[1]} crops' is a thumbnail plus "
        f"{CROPS[0]}x{CROPS[1]} crops of {side}x{side} each (reducers that require views). `ref ms` is the naive "
        "per-sample, per-token loop of the greedy methods, `core ms` the method's `_reduce` without the base "
        "class's input checks; speed-up = ref / core in the same run."
    )

    jobs = [(dev, b, m, k) for dev in _devices(args.device) for b in args.batch for m in methods for k in args.budgets]
    new_rows: list[dict[str, Any]] = []
    errors: list[str] = []
    reducers: dict[tuple[str, str], vtc.Reducer] = {}
    inputs: dict[tuple[str, int, bool], tuple[vtc.VisualTokens, vtc.Query]] = {}
    bar = tqdm(jobs, desc="bench_reducers", file=sys.stderr, dynamic_ncols=True)
    for dev, b, name, k in bar:
        cls = get_reducer_class(name)
        use_views = "views" in cls.requires
        n = args.n * (1 + CROPS[0] * CROPS[1]) if use_views else args.n
        layout = f"{side}x{side}" + (f"+{CROPS[0]}x{CROPS[1]} crops" if use_views else "")
        row: dict[str, Any] = dict(
            method=name,
            device=str(dev),
            dtype=args.dtype,
            batch=b,
            n=n,
            layout=layout,
            d=args.dim,
            dv=args.feat_dim,
            dk=args.key_dim,
            heads=args.heads,
            query_len=args.query_len,
            budget=k,
        )
        if _key(row) in done or k > n:
            continue
        bar.set_postfix_str(f"{name} {dev} B={b} k={k}")
        try:
            ikey = (str(dev), b, use_views)
            if ikey not in inputs:
                inputs = {key: v for key, v in inputs.items() if key[:2] == ikey[:2]}  # free other sizes
                vt, q = make_inputs(
                    b,
                    grid,
                    args.dim,
                    views=CROPS if use_views else None,
                    dv=args.feat_dim,
                    dk=args.key_dim,
                    heads=args.heads,
                    t=args.query_len,
                    seed=args.seed,
                )
                inputs[ikey] = (vt.to(dev, dtype), vtc.Query(q.embeds.to(dev, dtype), q.mask.to(dev)))
            vt, q = inputs[ikey]
            query = q if cls.needs_query else None
            if (name, str(dev)) not in reducers:
                torch.manual_seed(0)
                reducers[(name, str(dev))] = vtc.create_reducer(name).eval().to(dev)
            row.update(measure(reducers[(name, str(dev))], vt, query, k, dev, args))
        except Exception as e:  # one broken method must not stop the others
            errors.append(f"{name} on {dev}, B={b}, budget={k}: {type(e).__name__}: {e}")
            continue
        append_row(csv_path, row)
        rows.append({k2: str(row.get(k2, "")) for k2 in FIELDS})
        new_rows.append(row)
        write_markdown(md_path, rows, note)
    bar.close()
    if rows:
        write_markdown(md_path, rows, note)
        print(note + "\n\n" + markdown_table(rows))
    print(f"bench_reducers: {len(new_rows)} rows measured, results in {csv_path} and {md_path}", file=sys.stderr)
    for e in errors:
        print(f"bench_reducers: FAILED {e}", file=sys.stderr)
    return new_rows


if __name__ == "__main__":
    main()
