"""`vtc eval`: every method at every budget on one model and one benchmark, resumable and data-parallel.

    vtc eval --model tiny-qwen2-vl-shapes --bench shapes --methods all --budgets 16,32,64,128

For each (method, budget) — plus the full-token run of the same model in the same harness — and each sample it
records the prediction and its score, the visual tokens the LLM actually received (layer-averaged for in-LLM
methods), analytic prefill FLOPs (`vtc.eval.flops`), prefill latency (time to the first generated token), the time
spent inside the reducer alone, and memory (the KV cache after prefill, measured; CUDA peak allocation on GPU).
Records are appended to `results.jsonl` (one line per sample, flushed per batch); a killed run resumes where it
stopped and never counts a sample twice. `summary.md` / `summary.csv` give per (method, budget): accuracy, retention
(accuracy / full-token accuracy), agreement with the full-token answers, kept tokens, FLOPs, latency, selection
time and memory; `plots/` the accuracy-against-tokens and accuracy-against-prefill-time curves.

Under `torchrun` (or `accelerate launch`) every rank takes the samples `i % world == rank` and writes its own
`results.rank<r>.jsonl`; the summary reads all of them, so the merged result equals a one-process run.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .benchmarks import Benchmark, Sample, create_benchmark, normalize_answer

FULL = "full"
ASSETS = Path(os.environ.get("VTC_ASSETS", Path(__file__).resolve().parent.parent / "assets"))


@dataclass
class EvalConfig:
    model: str = "tiny-qwen2-vl-shapes"
    bench: str = "shapes"
    bench_args: dict[str, Any] = field(default_factory=dict)
    methods: Sequence[str] = ("all",)
    budgets: Sequence[int | float] = (16, 32, 64, 128)  # valid for every shipped model (Qwen2-VL: 144 tokens)
    batch_size: int = 8
    limit: int | None = None
    out: str | Path | None = None
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    max_new_tokens: int | None = None
    method_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: bool = True


# ---------------------------------------------------------------------- loading
def resolve_model_path(name: str) -> str:
    """An assets name (`tiny-qwen2-vl-shapes`), a local folder, or a hub id (returned unchanged)."""
    if (ASSETS / name / "config.json").exists():
        return str(ASSETS / name)
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if "/" not in name:
        shipped = sorted(p.name for p in ASSETS.glob("*") if (p / "config.json").exists())
        raise ValueError(
            f"model {name!r} is neither a folder nor an assets name; shipped models: {shipped}; "
            "or pass a local path or a Hugging Face hub id (org/name)"
        )
    return name


def load_model(name: str, device: str = "cpu", dtype: str = "float32"):
    """(model, processor) with `from_pretrained`; `name` as in `resolve_model_path`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = resolve_model_path(name)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return model, processor


def expand_methods(methods: Sequence[str]) -> list[str]:
    """Names, wildcards (`div*`) or `all` → registered reducer names, in the order given."""
    from vtc import list_reducers

    out: list[str] = []
    for m in methods:
        names = list_reducers() if m == "all" else list_reducers(m) if any(c in m for c in "*?[") else [m]
        if not names:
            raise ValueError(f"--methods {m!r} matches no reducer; see vtc.list_reducers()")
        for n in names:
            if n not in out and n != FULL:
                out.append(n)
    from vtc.reducers import REDUCERS

    for m in out:
        REDUCERS.get(m)  # an unknown name raises, naming close matches
    return out


def parse_budgets(text: str | Sequence) -> list[int | float]:
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[int | float] = []
    for b in items:
        s = str(b).strip()
        try:
            v = float(s) if "." in s else int(s)
        except ValueError:
            raise ValueError(f"--budgets item {s!r} is not a number; use e.g. 16,32,64 or 0.25,0.5") from None
        if v <= 0:
            raise ValueError(f"--budgets item {s!r} must be > 0 (tokens per image, or a fraction in (0, 1])")
        out.append(v)
    return out


# ---------------------------------------------------------------------- inputs
def build_inputs(processor, samples: Sequence[Sample], bench: Benchmark, device: str) -> dict[str, torch.Tensor]:
    """Processor inputs for a batch: the chat template when the processor has one, else `<image>\\n{prompt}`."""
    texts, images = [], []
    for s in samples:
        content = [{"type": "image"} for _ in s.images] + [{"type": "text", "text": bench.prompt(s)}]
        if getattr(processor, "chat_template", None):
            texts.append(
                processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            )
        else:
            tag = getattr(processor, "image_token", "<image>")
            texts.append("".join(tag + "\n" for _ in s.images) + bench.prompt(s))
        images.extend(im.convert("RGB") if hasattr(im, "convert") else im for im in s.images)
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


class _FirstToken:
    """A stopping criterion that never stops and remembers when the first new token was produced."""

    def __init__(self, device: str) -> None:
        self.t: float | None = None
        self.device = device

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        if self.t is None:
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            self.t = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@contextlib.contextmanager
def _timed_reducer(model) -> Iterator[list[float]]:
    """Accumulates seconds spent inside the compressed model's reducer (pre-LLM forward, in-LLM plan/score)."""
    spent: list[float] = [0.0]
    try:
        from vtc.adapters import adapter_of

        red = adapter_of(model).reducer
    except RuntimeError:
        yield spent
        return
    saved = {}

    def wrap(fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t

        return timed

    for name in ("forward", "plan", "score", "select", "decide"):
        fn = getattr(red, name, None)
        if callable(fn):
            saved[name] = red.__dict__.get(name)
            setattr(red, name, wrap(fn))
    try:
        yield spent
    finally:
        for name, old in saved.items():
            if old is None:
                delattr(red, name)
            else:
                setattr(red, name, old)


def _cache_bytes(cache) -> int:
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if torch.is_tensor(t):
                    total += t.numel() * t.element_size()
        return total
    for item in cache or []:
        for t in item:
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()
    return total


def _vision_images(model, inputs: dict[str, torch.Tensor], b: int, n_images: int) -> Any:
    """What `vtc.eval.flops` needs to count the vision tower of sample b."""
    if "image_grid_thw" in inputs:
        per = inputs["image_grid_thw"].tolist()
        k = len(per) // max(1, inputs["input_ids"].shape[0])
        return [tuple(g) for g in per[b * k : (b + 1) * k]]
    if "image_sizes" in inputs:
        sizes = inputs["image_sizes"].tolist()
        k = len(sizes) // max(1, inputs["input_ids"].shape[0])
        return [tuple(s) for s in sizes[b * k : (b + 1) * k]]
    return n_images


# ---------------------------------------------------------------------- the run
def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _key(r: dict) -> tuple:
    return (r["method"], str(r["budget"]), r["id"])


def read_results(out: Path) -> list[dict]:
    """Every record of every rank file; a torn last line (killed mid-write) is ignored, duplicates dropped."""
    rows, seen = [], set()
    for f in sorted(out.glob("results*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if _key(r) not in seen:
                seen.add(_key(r))
                rows.append(r)
    return rows


def run_eval(cfg: EvalConfig, model=None, processor=None, bench: Benchmark | None = None) -> dict[str, Any]:
    """Run (or resume) the comparison; returns the summary rows. Model/processor/bench may be passed in."""
    from vtc import compress, restore

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if model is None:
        model, processor = load_model(cfg.model, cfg.device, cfg.dtype)
    if bench is None:
        bench = create_benchmark(cfg.bench, **cfg.bench_args)
    methods = expand_methods(cfg.methods)
    budgets = parse_budgets(cfg.budgets)
    out = Path(cfg.out or Path("runs") / "eval" / f"{Path(cfg.model).name}-{cfg.bench}")
    out.mkdir(parents=True, exist_ok=True)
    rank, world = _rank_world()
    res_path = out / ("results.jsonl" if world == 1 else f"results.rank{rank}.jsonl")
    (out / f"errors.rank{rank}.json").unlink(missing_ok=True)  # a resumed run reports its own failures
    (out / "config.json").write_text(json.dumps({**cfg.__dict__, "out": str(out)}, default=str, indent=1))
    n = len(bench) if cfg.limit is None else min(cfg.limit, len(bench))
    mine = [i for i in range(n) if i % world == rank]
    done = {_key(r) for r in read_results(out)}
    runs = [(FULL, 0)] + [(m, b) for m in methods for b in budgets]
    max_new = cfg.max_new_tokens or bench.max_new_tokens
    errors: dict[str, str] = {}
    total = sum(1 for m, b in runs for i in mine if (m, str(b), bench[i].id) not in done)
    bar = _progress(total, cfg.progress and rank == 0)
    _drop_torn_tail(res_path)
    with open(res_path, "a") as fh:
        for method, budget in runs:
            todo = [i for i in mine if (method, str(budget), bench[i].id) not in done]
            if not todo:
                continue
            if method != FULL:
                try:
                    compress(model, method, budget=budget, **cfg.method_args.get(method, {}))
                except Exception as e:  # noqa: BLE001 - a method the model cannot run is reported, not fatal
                    errors[f"{method}@{budget}"] = f"{type(e).__name__}: {e}"
                    bar.update(len(todo))
                    continue
            try:
                for s in range(0, len(todo), cfg.batch_size):
                    batch = [bench[i] for i in todo[s : s + cfg.batch_size]]
                    # stochastic methods draw from a seed of (method, budget, first sample): a resumed or sharded
                    # run reproduces the same draws for the same batches
                    torch.manual_seed(zlib.crc32(f"{method}|{budget}|{batch[0].id}".encode()))
                    try:
                        recs = _run_batch(model, processor, bench, batch, method, budget, cfg.device, max_new)
                    except Exception as e:  # noqa: BLE001
                        if method == FULL:
                            raise
                        errors[f"{method}@{budget}"] = f"{type(e).__name__}: {e}"
                        bar.update(len(todo) - s)
                        break
                    for r in recs:
                        fh.write(json.dumps(r) + "\n")
                    fh.flush()
                    bar.update(len(batch))
            finally:
                if method != FULL:
                    restore(model)
    bar.close()
    if errors:
        (out / f"errors.rank{rank}.json").write_text(json.dumps(errors, indent=1))
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank != 0:
        return {}
    summary = summarize(read_results(out), bench)
    write_reports(summary, out, bench)
    return summary


def _drop_torn_tail(path: Path) -> None:
    """A run killed mid-write leaves half a line: cut it so that appended records start on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, disable=not enabled, desc="vtc eval", unit="sample")
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()


@torch.no_grad()
def _run_batch(model, processor, bench, batch, method, budget, device, max_new) -> list[dict]:
    from transformers import StoppingCriteriaList

    inputs = build_inputs(processor, batch, bench, device)
    first = _FirstToken(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with _timed_reducer(model) as spent:
        t0 = time.perf_counter()
        gen = model.generate(
            **inputs, max_new_tokens=max_new, do_sample=False, num_beams=1, return_dict_in_generate=True,
            stopping_criteria=StoppingCriteriaList([first]),
        )  # fmt: skip
    prefill = (first.t or time.perf_counter()) - t0
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    tok = getattr(processor, "tokenizer", processor)
    new = gen.sequences[:, inputs["input_ids"].shape[1] :]
    preds = tok.batch_decode(new, skip_special_tokens=True)
    tokens = _token_counts(model, inputs, method)
    kv = _cache_bytes(getattr(gen, "past_key_values", None))
    recs = []
    for b, (s, p) in enumerate(zip(batch, preds, strict=True)):
        text_tokens, visual = tokens[b]
        flops = _flops(model, text_tokens, visual, _vision_images(model, inputs, b, len(s.images)))
        recs.append({
            "method": method, "budget": budget, "id": s.id, "qtype": s.qtype, "pred": p.strip(),
            "answer": s.answer if isinstance(s.answer, str) else s.answer[0], "score": bench.score(p, s),
            "visual_tokens": sum(visual) / max(len(visual), 1), "text_tokens": text_tokens,
            "flops": flops, "prefill_s": prefill / len(batch), "select_s": spent[0] / len(batch),
            "kv_bytes": kv // len(batch), "peak_bytes": peak, "batch": len(batch),
        })  # fmt: skip
    return recs


def _token_counts(model, inputs, method) -> list[tuple[int, list[int]]]:
    """(text tokens, visual tokens per decoder layer) of each sample of the last prefill."""
    from .flops import last_prefill_tokens, visual_schedule

    if method != FULL:
        return last_prefill_tokens(model, inputs["input_ids"], inputs.get("attention_mask"))
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    vis_ids = {getattr(model.config, k, None) for k in ("image_token_id", "video_token_id", "image_token_index")}
    vis_ids.discard(None)
    is_vis = torch.zeros_like(ids, dtype=torch.bool)
    for v in vis_ids:
        is_vis |= ids == v
    valid = mask.bool() if mask is not None else torch.ones_like(is_vis)
    n_layers = model.config.get_text_config().num_hidden_layers
    out = []
    for b in range(ids.shape[0]):
        v = int((is_vis[b] & valid[b]).sum())
        out.append((int(valid[b].sum()) - v, visual_schedule(n_layers, v)))
    return out


def _flops(model, text_tokens: int, visual: list[int], images: Any) -> float | None:
    from .flops import prefill_flops

    try:
        return float(prefill_flops(model, text_tokens, visual, images)["total"])
    except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError):
        return None


# ---------------------------------------------------------------------- reports
def summarize(records: Sequence[dict], bench: Benchmark) -> list[dict[str, Any]]:
    """One row per (method, budget): the benchmark's metrics, retention and agreement against the full run."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["method"], str(r["budget"]))].append(r)
    full = {r["id"]: r for r in groups.get((FULL, "0"), [])}
    full_acc = _mean([r["score"] for r in full.values()])
    rows = []
    for (method, budget), recs in groups.items():
        metrics = bench.aggregate(recs)
        acc = _mean([r["score"] for r in recs])
        both = [r for r in recs if r["id"] in full]
        agree = _mean([normalize_answer(r["pred"]) == normalize_answer(full[r["id"]]["pred"]) for r in both])
        full_ids = [full[r["id"]] for r in both]
        row = {
            "method": method, "budget": budget if method != FULL else "all", "n": len(recs),
            "accuracy": acc, "retention": acc / full_acc if full_acc else float("nan"), "agreement": agree,
            "visual_tokens": _mean([r["visual_tokens"] for r in recs]),
            "tflops": _mean([r["flops"] for r in recs if r["flops"] is not None]) / 1e12,
            "flops_ratio": _ratio([r["flops"] for r in both], [f["flops"] for f in full_ids]),
            "prefill_ms": 1e3 * _mean([r["prefill_s"] for r in recs]),
            "select_ms": 1e3 * _mean([r["select_s"] for r in recs]),
            "kv_mb": _mean([r["kv_bytes"] for r in recs]) / 2**20,
        }  # fmt: skip
        peaks = [r["peak_bytes"] for r in recs if r.get("peak_bytes")]
        if peaks:
            row["peak_mb"] = max(peaks) / 2**20
        for k, v in metrics.items():
            if k != "accuracy":
                row[k] = v
        rows.append(row)
    rows.sort(key=lambda r: (r["method"] != FULL, r["method"], float(r["budget"]) if r["method"] != FULL else 0))
    return rows


def _mean(xs: Sequence[float]) -> float:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def _ratio(a: Sequence, b: Sequence) -> float:
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y]
    return sum(x for x, _ in pairs) / sum(y for _, y in pairs) if pairs else float("nan")


MAIN_COLUMNS = ["method", "budget", "n", "accuracy", "retention", "agreement", "visual_tokens", "tflops",
                "flops_ratio", "prefill_ms", "select_ms", "kv_mb"]  # fmt: skip


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    cols = list(columns or MAIN_COLUMNS)
    extra = sorted({k for r in rows for k in r} - set(cols) - {"peak_mb"})
    if columns is None:
        cols += (["peak_mb"] if any("peak_mb" in r for r in rows) else []) + extra
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def write_reports(rows: Sequence[dict], out: Path, bench: Benchmark) -> None:
    out = Path(out)
    (out / "summary.md").write_text(markdown_table(rows) + "\n")
    cols = sorted({k for r in rows for k in r}, key=lambda c: (c not in MAIN_COLUMNS, MAIN_COLUMNS.index(c) if c in
                                                              MAIN_COLUMNS else 0, c))  # fmt: skip
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    plot(rows, out / "plots")


def plot(rows: Sequence[dict], folder: Path) -> list[Path]:
    """accuracy_vs_tokens.png and accuracy_vs_prefill.png: one line per method, the full run as a reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["method"]].append(r)
    full = by.pop(FULL, [None])[0]
    paths = []
    for x, label, name in (("visual_tokens", "visual tokens kept (layer-averaged)", "accuracy_vs_tokens"),
                           ("prefill_ms", "prefill latency (ms / sample)", "accuracy_vs_prefill")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (m, rs) in enumerate(sorted(by.items())):
            rs = sorted(rs, key=lambda r: r[x])
            ax.plot([r[x] for r in rs], [r["accuracy"] for r in rs], marker="o", ms=3,
                    ls="-" if i < 10 else "--", label=m)  # fmt: skip
        if full is not None:
            ax.axhline(full["accuracy"], color="k", ls=":", lw=1, label="all tokens")
            ax.plot([full[x]], [full["accuracy"]], "k*", ms=9)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
        if x == "visual_tokens":
            ax.set_xscale("log", base=2)
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = folder / f"{name}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
