"""Prefill latency and analytic FLOPs against the visual-token budget, through `vtc.compress`, for every adapter.

    python -m vtc.eval.bench_adapters                                  # tiny + mid models of every family, CPU
    python -m vtc.eval.bench_adapters --quick                          # tiny models, one budget, few repeats
    python -m vtc.eval.bench_adapters --families llava --sizes mid --methods fastv,divprune --budgets 64,32
    python -m vtc.eval.bench_adapters --device cuda --llava-7b-shape   # random-weight LLaVA-1.5-7B shape, fp16

Models: random weights, built from configs (nothing downloaded), `sdpa` attention, one image per prompt (B = 1) with
real visual token counts: LLaVA-1.5 336 px / patch 14 → 576 tokens; LLaVA-NeXT a 480×640 (h×w) photo → 2×2 AnyRes
crops + thumbnail, 2340 tokens after unpadding, newlines included (the reducers see the 2880 view tokens);
Qwen2-VL / Qwen2.5-VL a 476×644 image → a 34×46 patch grid → 391 tokens after the 2×2 merge. The prompt is `<bos>`,
the image run (Qwen: between vision start/end tokens) and `--text-tokens` random text tokens.
Sizes (`SIZES`): `tiny` (a few MB, LLM width 64) and `mid` (LLM width 1024, 8 layers, GQA where the family has
it, vocabulary 32000, a 6–8 block vision tower of width 384: roughly the LLM / vision cost ratio of the 7B models
at these token counts); `7b` (`--llava-7b-shape`) is LLaVA-1.5-7B's shape (CLIP ViT-L/14-336 + a 32-layer
4096-wide Llama), meant for a GPU in float16.

Rows: `none`/`full` is the stock model, not patched; every (method, budget) row runs the patched model
(`vtc.compress(model, method, budget=budget)`). The timed call is one prefill, `model(**inputs, use_cache=True,
logits_to_keep=1)` (what `generate()` runs first), under `torch.inference_mode`: `--warmup` untimed calls, then up to
`--repeats` timed ones (wall clock on CPU; CUDA events on GPU), median and IQR reported. The latency includes the
vision tower, the adapter's capture of what reducers need, the selection and the LLM. `select_ms` is the median time
inside the reducer (pre-LLM: its forward; in-LLM: its `score` calls), measured during the timed calls on CPU and in
extra calls with synchronisation on CUDA.

FLOPs: `vtc.eval.flops.prefill_flops` on the token schedule the adapter really produced (`last_prefill_tokens`:
text tokens, visual tokens per decoder layer), causal attention, the lm_head on the last position only, the
selection itself not counted. Derived columns (Markdown table): speed-up = full latency / latency, FLOPs ratio =
FLOPs / full FLOPs, and lat/FLOPs = (latency / full latency) / FLOPs ratio: 1.0 means the latency fell exactly as
the FLOPs did; above 1 the prefill is slower than the FLOPs bound (fixed costs: vision tower, selection, overhead).

Results go to `--out` (default `runs/bench_adapters/`): `bench.csv` gets one row per measurement, appended and synced
as soon as it is measured; `bench.md` is rewritten after every row and printed at the end. A rerun skips the rows
already in the CSV (same family, size, method, budget, device, dtype, text tokens) unless `--fresh`, and builds a
model only if one of its rows is missing; `bench.lock` keeps two runs apart. A failing row is reported at the end
and not written, so the next run retries it.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from vtc.eval import results_csv
from vtc.eval.bench_reducers import _iqr, acquire_lock, time_call
from vtc.eval.flops import last_prefill_tokens, prefill_flops, stock_visual_tokens

import vtc

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
KEY_FIELDS = ("family", "size", "method", "budget", "device", "dtype", "text_tokens", "batch")
FIELDS = KEY_FIELDS + (
    "visual_in",
    "visual_kept",
    "seq_len",
    "median_ms",
    "iqr_ms",
    "repeats",
    "select_ms",
    "gflops",
    "vision_gflops",
    "llm_gflops",
    "threads",
    "torch",
)
CSV_NAME, MD_NAME = "bench.csv", "bench.md"
PAD, BOS, EOS, IMAGE, VISION_START, VISION_END, VIDEO = 0, 1, 2, 3, 4, 5, 6
FIRST_TEXT_ID = 10
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-hf/llava-v1.6 (h, w)
NEXT_IMAGE = (480, 640)  # (height, width) of the LLaVA-NeXT photo
QWEN_GRID = (1, 34, 46)  # a 476×644 image in 14 px patches (the processor's smart resize of a 480×640 photo)


# ---------------------------------------------------------------------------------------------- model sizes
@dataclass(frozen=True)
class Size:
    """Widths of one model size. `vision_*`: the vision tower; the rest: the decoder."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int


SIZES: dict[str, Size] = {
    "tiny": Size(64, 4, 4, 2, 128, 1000, 32, 2, 2, 64),
    "mid": Size(1024, 8, 16, 4, 2816, 32000, 384, 6, 6, 1536),
    "7b": Size(4096, 32, 32, 32, 11008, 32064, 1024, 24, 16, 4096),  # LLaVA-1.5-7B: Vicuna-7B + CLIP ViT-L/14-336
}


def _llama(s: Size, kv_heads: int | None = None) -> dict[str, Any]:
    return dict(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=kv_heads or s.kv_heads,
        max_position_embeddings=4096,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )


def _clip(s: Size) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=s.vision_hidden,
        intermediate_size=s.vision_intermediate,
        num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads,
        image_size=336,
        patch_size=14,
    )


def model_config(family: str, size: str) -> Any:
    """The transformers config of one benchmark model (random weights are drawn from it)."""
    from transformers import LlamaConfig

    s = SIZES[size]
    if family == "llava":
        from transformers import LlavaConfig

        # LLaVA-1.5's Vicuna has no GQA: as many key/value heads as heads
        return LlavaConfig(
            vision_config=_clip(s),
            text_config=LlamaConfig(**_llama(s, kv_heads=s.heads)),
            image_token_id=IMAGE,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    if family == "llava_next":
        from transformers import LlavaNextConfig

        return LlavaNextConfig(
            vision_config=_clip(s),
            text_config=LlamaConfig(**_llama(s, kv_heads=s.heads)),
            image_token_index=IMAGE,
            image_grid_pinpoints=NEXT_PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    head_dim = s.hidden // s.heads
    q = head_dim // 16  # M-RoPE sections (t, h, w) in Qwen2-VL's 2:3:3 proportion, summing to head_dim / 2
    text = dict(
        _llama(s), rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2 * q, 3 * q, 3 * q]}
    )
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START)
    ids["vision_end_token_id"] = VISION_END
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        vision = dict(
            depth=s.vision_layers,
            embed_dim=s.vision_hidden,
            hidden_size=s.hidden,
            num_heads=s.vision_heads,
            mlp_ratio=s.vision_intermediate // s.vision_hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        depth = s.vision_layers + 2
        vision = dict(
            depth=depth,
            hidden_size=s.vision_hidden,
            intermediate_size=s.vision_intermediate * 2 // 3,  # gated MLP: about the same weights as fc1/fc2
            out_hidden_size=s.hidden,
            num_heads=s.vision_heads,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,  # Qwen2.5-VL's: 4×4 merged tokens per window
            fullatt_block_indexes=[depth // 2 - 1, depth - 1],
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    raise ValueError(f"bench_adapters: unknown family {family!r}; choose from {FAMILIES}")


def build_model(family: str, size: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A random-weight model of `family` at `size`, in eval mode on `device` in `dtype` (built there directly)."""
    import transformers

    cfg = model_config(family, size)
    cfg._attn_implementation = "sdpa"
    cls = {
        "llava": transformers.LlavaForConditionalGeneration,
        "llava_next": transformers.LlavaNextForConditionalGeneration,
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
    }[family]
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(device=device, dtype=dtype).eval()


def make_inputs(
    model: nn.Module, family: str, text_tokens: int, seed: int = 0, batch: int = 1
) -> tuple[dict[str, Any], Any]:
    """`batch` copies of one prompt with one image (see the module docstring) and the `images` argument of
    `prefill_flops` for one of them."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    vocab = cfg.get_text_config().vocab_size
    text = torch.randint(FIRST_TEXT_ID, vocab, (text_tokens,), generator=g).tolist()
    if family in ("llava", "llava_next"):
        vc = cfg.vision_config
        images: Any = 1 if family == "llava" else [NEXT_IMAGE]
        ids = [BOS] + [IMAGE] * stock_visual_tokens(cfg, images) + text
        inputs: dict[str, Any] = {"input_ids": torch.tensor([ids])}
        if family == "llava":
            inputs["pixel_values"] = torch.randn(1, 3, vc.image_size, vc.image_size, generator=g)
        else:
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            views = image_size_to_num_patches(list(NEXT_IMAGE), cfg.image_grid_pinpoints, vc.image_size)
            inputs["pixel_values"] = torch.randn(1, views, 3, vc.image_size, vc.image_size, generator=g)
            inputs["image_sizes"] = torch.tensor([NEXT_IMAGE])
    else:
        vc = cfg.vision_config
        images = [QWEN_GRID]
        ids = [BOS, VISION_START] + [IMAGE] * stock_visual_tokens(cfg, images) + [VISION_END] + text
        t, h, w = QWEN_GRID
        inputs = {
            "input_ids": torch.tensor([ids]),
            "pixel_values": torch.randn(t * h * w, 3 * vc.temporal_patch_size * vc.patch_size**2, generator=g),
            "image_grid_thw": torch.tensor([QWEN_GRID]),
        }
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == IMAGE).int()
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if batch > 1:  # every row the same prompt and image: Qwen's flat patches and grids are concatenated per image
        cat = ("pixel_values", "image_grid_thw") if family in ("qwen2_vl", "qwen2_5_vl") else ()
        inputs = {k: torch.cat([v] * batch) if k in cat else v.repeat(batch, *[1] * (v.dim() - 1))
                  for k, v in inputs.items()}  # fmt: skip
    return inputs, images


def _to(inputs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, dtype) if v.is_floating_point() else v.to(device)
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------- selection timer
class SelectTimer:
    """Time spent inside the reducer of a compressed model: its forward (pre-LLM) or its `score` calls (in-LLM)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.reducer = vtc.adapters.adapter_of(model).reducer
        self.device = device
        self.calls: list[float] = []  # seconds per prefill
        self._t0 = 0.0
        self._acc = 0.0
        self._handles: list[Any] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> SelectTimer:
        red = self.reducer
        if red.stage == "in_llm":
            orig = red.score

            def score(ctx):
                self._sync()
                t0 = time.perf_counter()
                out = orig(ctx)
                self._sync()
                self._acc += time.perf_counter() - t0
                return out

            red.score = score
        else:

            def pre(mod, args, kwargs):
                self._sync()
                self._t0 = time.perf_counter()

            def post(mod, args, kwargs, out):
                self._sync()
                self._acc += time.perf_counter() - self._t0

            self._handles = [
                red.register_forward_pre_hook(pre, with_kwargs=True),
                red.register_forward_hook(post, with_kwargs=True),
            ]
        return self

    def wrap(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """`fn` that records the selection time of each of its calls."""

        def call():
            self._acc = 0.0
            out = fn()
            self.calls.append(self._acc)
            return out

        return call

    def __exit__(self, *exc) -> None:
        if "score" in self.reducer.__dict__:
            del self.reducer.score
        for h in self._handles:
            h.remove()


# ---------------------------------------------------------------------------------------------- results files
def _key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(row[f]) for f in KEY_FIELDS)


def _num(s: Any) -> float:
    try:
        return float(s)
    except (TypeError, ValueError):
        return math.nan


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of the results CSV; a row cut short by a killed run is dropped so it is measured again."""
    return results_csv.read_rows(path, FIELDS, "bench_adapters")


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row and sync it to disk, so a killed run keeps it."""
    results_csv.append_row(path, row, FIELDS)


GROUP = ("family", "size", "device", "dtype", "text_tokens", "batch")  # rows compared with one full row


def derived(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with `speedup`, `flops_ratio` and `lat_per_flops` against the full row of their group (NaN if none)."""
    full = {tuple(str(r[k]) for k in GROUP): r for r in rows if r["method"] == "none"}
    out = []
    for r in rows:
        f = full.get(tuple(str(r[k]) for k in GROUP))
        lat, fl = _num(r["median_ms"]), _num(r["gflops"])
        speed = ratio = rel = math.nan
        if f is not None:
            speed = _num(f["median_ms"]) / lat
            ratio = fl / _num(f["gflops"])
            rel = (1.0 / speed) / ratio
        out.append(dict(r, speedup=speed, flops_ratio=ratio, lat_per_flops=rel))
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table: per family and size, the full row first, then methods and budgets."""
    head = (
        "| family | size | B | method | budget | visual in → kept | seq | latency ms | IQR | select ms | speed-up "
        "| GFLOPs | FLOPs ratio | lat/FLOPs |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    fam = {f: i for i, f in enumerate(FAMILIES)}
    size = {s: i for i, s in enumerate(SIZES)}

    def order(r: dict[str, Any]) -> tuple:
        b = _num(r["budget"])
        return (
            r["device"],
            r["dtype"],
            fam.get(r["family"], 99),
            size.get(r["size"], 99),
            r["family"],
            r["size"],
            int(_num(r["batch"])),
            r["method"] != "none",
            r["method"],
            -b if not math.isnan(b) else 0,
        )

    def fmt(x: Any, spec: str, suffix: str = "") -> str:
        v = _num(x)
        return "" if math.isnan(v) else format(v, spec) + suffix

    for r in sorted(derived(rows), key=order):
        lines.append(
            f"| {r['family']} | {r['size']} | {r['batch']} | {r['method']} | {r['budget']} | {r['visual_in']} → "
            f"{fmt(r['visual_kept'], '.0f')} | {r['seq_len']} | {fmt(r['median_ms'], '.1f')} | "
            f"{fmt(r['iqr_ms'], '.1f')} | {fmt(r['select_ms'], '.1f')} | {fmt(r['speedup'], '.2f', '×')} | "
            f"{fmt(r['gflops'], '.2f')} | {fmt(r['flops_ratio'], '.3f')} | {fmt(r['lat_per_flops'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, rows: list[dict[str, Any]], note: str) -> None:
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(note + "\n\n" + markdown_table(rows))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- measuring
def measure(
    model: nn.Module,
    family: str,
    method: str,
    budget: int | None,
    inputs: dict[str, Any],
    images: Any,
    device: torch.device,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Time one prefill configuration and count its FLOPs; the result columns of a row."""
    run = partial(model, **inputs, use_cache=True, logits_to_keep=1)
    ids = inputs["input_ids"]
    select: list[float] = []
    if method == "none":
        times, _ = time_call(run, device, args.warmup, args.repeats, args.max_seconds)
        vis = stock_visual_tokens(model, images)
        schedule = [(ids.shape[1] - vis, [vis] * model.config.get_text_config().num_hidden_layers)] * ids.shape[0]
    else:
        with vtc.compressed(model, method, budget=budget):
            with SelectTimer(model, device) as timer:
                if device.type == "cuda":  # synchronising inside the prefill would perturb the timed calls
                    times, _ = time_call(run, device, args.warmup, args.repeats, args.max_seconds)
                    time_call(timer.wrap(run), device, 0, min(3, args.repeats), args.max_seconds)
                else:
                    times, _ = time_call(timer.wrap(run), device, args.warmup, args.repeats, args.max_seconds)
                select = timer.calls[-len(times) :] if device.type != "cuda" else timer.calls
            schedule = last_prefill_tokens(model, ids, inputs["attention_mask"])
    # per row: a method may keep different tokens (so different counts, e.g. of AnyRes newlines) in each copy
    per_row = [prefill_flops(model, text, visual, images=images) for text, visual in schedule]
    f = {k: sum(r[k] for r in per_row) for k in ("total", "vision", "projector", "llm")}
    f["visual_effective"] = statistics.mean(r["visual_effective"] for r in per_row)
    f["seq_per_layer"] = [max(r["seq_per_layer"][0] for r in per_row)]
    return dict(
        visual_in=stock_visual_tokens(model, images),
        visual_kept=f"{f['visual_effective']:.2f}",
        seq_len=f["seq_per_layer"][0],
        median_ms=f"{statistics.median(times):.3f}",
        iqr_ms=f"{_iqr(times):.3f}",
        repeats=len(times),
        select_ms=f"{statistics.median(select) * 1e3:.3f}" if select else "",
        gflops=f"{f['total'] / 1e9:.4f}",
        vision_gflops=f"{(f['vision'] + f['projector']) / 1e9:.4f}",
        llm_gflops=f"{f['llm'] / 1e9:.4f}",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )


# ---------------------------------------------------------------------------------------------- main
def _list(s: str) -> list[str]:
    return [v for v in s.replace(" ", "").split(",") if v]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vtc.eval.bench_adapters", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, from {', '.join(FAMILIES)}")
    p.add_argument("--sizes", default="tiny,mid", help="comma-separated model sizes: tiny, mid (7b: --llava-7b-shape)")
    p.add_argument("--methods", default="random,fastv,divprune", help="comma-separated reducer names")
    p.add_argument("--budgets", default="192,128,64,32", help="visual tokens kept per image; full always runs")
    p.add_argument("--text-tokens", type=int, default=40, help="random text tokens after the image")
    p.add_argument("--batch", type=int, default=1, help="prompts per prefill (copies of the one prompt)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", help="float32, float16, bfloat16; auto: float32 on CPU, float16 on CUDA")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    p.add_argument("--max-seconds", type=float, default=20.0, help="stop repeating a row after this long (>= 3 calls)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--llava-7b-shape", action="store_true", help="only LLaVA-1.5 at the 7B shape (random, fp16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    p.add_argument("--out", type=Path, default=Path("runs/bench_adapters"), help="results folder")
    p.add_argument("--fresh", action="store_true", help="discard earlier results in --out instead of resuming")
    p.add_argument("--quick", action="store_true", help="tiny models, budget 64 only, 2 repeats, 5 s per row at most")
    args = p.parse_args(argv)
    args.families, args.sizes, args.methods = _list(args.families), _list(args.sizes), _list(args.methods)
    try:
        args.budgets = [int(b) for b in _list(args.budgets)]
    except ValueError:
        p.error(f"--budgets {args.budgets!r} must be comma-separated token counts, e.g. 192,64")
    if args.quick:
        args.sizes, args.repeats, args.warmup = ["tiny"], min(args.repeats, 2), min(args.warmup, 1)
        args.max_seconds = min(args.max_seconds, 5.0)
        if "--budgets" not in (argv if argv is not None else sys.argv[1:]):
            args.budgets = [64]
    if args.llava_7b_shape:
        args.families, args.sizes = ["llava"], ["7b"]
    bad = [f for f in args.families if f not in FAMILIES] + [s for s in args.sizes if s not in SIZES]
    if bad:
        p.error(f"unknown family/size {bad}; families: {', '.join(FAMILIES)}; sizes: {', '.join(SIZES)}")
    if "7b" in args.sizes and args.families != ["llava"]:
        p.error("size 7b is LLaVA-1.5's shape only: use --llava-7b-shape")
    unknown = [m for m in args.methods if m not in vtc.list_reducers()]
    if unknown:
        p.error(f"unknown method(s) {unknown}; registered: {', '.join(vtc.list_reducers())}")
    if any(b < 1 for b in args.budgets) or min(args.repeats, args.text_tokens, args.batch) < 1 or args.warmup < 0:
        p.error("--budgets must be >= 1, --repeats >= 1, --warmup >= 0, --text-tokens >= 1, --batch >= 1")
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for but CUDA is not available")
    if args.dtype == "auto":
        args.dtype = "float16" if args.device.type == "cuda" else "float32"
    if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        p.error(f"--dtype {args.dtype!r} is not a torch dtype")
    if "7b" in args.sizes and args.device.type != "cuda":
        p.error("--llava-7b-shape needs --device cuda (about 14 GB in float16 and minutes per prefill on a CPU)")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; returns the rows measured in this run (rows already in the CSV are not redone)."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(args.out)
    try:
        return _run(args)
    finally:
        lock.unlink(missing_ok=True)


def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    csv_path, md_path = args.out / CSV_NAME, args.out / MD_NAME
    if args.fresh:
        csv_path.unlink(missing_ok=True)
        md_path.unlink(missing_ok=True)
    rows = read_rows(csv_path)
    done = {_key(r) for r in rows}
    dtype = getattr(torch, args.dtype)
    dev = args.device
    note = (
        f"Adapter prefill (`python -m vtc.eval.bench_adapters`): random-weight models, B = {args.batch} "
        "(copies of one prompt), one image each, "
        f"{args.text_tokens} text tokens, {dev} {args.dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU thread(s); median of up to {args.repeats} prefills after {args.warmup} "
        "warm-up. FLOPs: analytic (`vtc.eval.flops`), causal attention, lm_head on the last position, selection "
        "not counted. Speed-up and FLOPs ratio are against the unpatched model (`none`/`full`); lat/FLOPs = "
        "(latency / full latency) / FLOPs ratio, 1.0 = latency falls exactly as FLOPs do."
    )
    jobs = [
        (fam, size, m, b)
        for fam in args.families
        for size in args.sizes
        for m, b in [("none", None)] + [(m, b) for m in args.methods for b in args.budgets]
    ]
    new_rows: list[dict[str, Any]] = []
    errors: list[str] = []
    current: tuple[Any, ...] | None = None
    model = inputs = images = None
    broken: str | None = None  # why the current model could not be built
    bar = tqdm(jobs, desc="bench_adapters", file=sys.stderr, dynamic_ncols=True)
    for fam, size, method, budget in bar:
        row: dict[str, Any] = dict(
            family=fam,
            size=size,
            method=method,
            budget="full" if budget is None else budget,
            device=str(dev),
            dtype=args.dtype,
            text_tokens=args.text_tokens,
            batch=args.batch,
        )
        if _key(row) in done:
            continue
        bar.set_postfix_str(f"{fam} {size} {method} {row['budget']}")
        try:
            if current != (fam, size):
                model = inputs = broken = None
                current = (fam, size)
                try:
                    model = build_model(fam, size, dev, dtype, seed=args.seed)
                    inputs, images = make_inputs(model, fam, args.text_tokens, seed=args.seed, batch=args.batch)
                    inputs = _to(inputs, dev, dtype)
                except Exception as e:
                    broken = f"building the model failed: {type(e).__name__}: {e}"
            if broken is not None:
                raise RuntimeError(broken)
            if budget is not None and budget >= stock_visual_tokens(model, images):
                continue  # not a reduction for this model
            row.update(measure(model, fam, method, budget, inputs, images, dev, args))
        except Exception as e:  # one failing row must not stop the others
            errors.append(f"{fam} {size} {method} budget={row['budget']}: {type(e).__name__}: {e}")
            continue
        append_row(csv_path, row)
        rows.append({k: str(row.get(k, "")) for k in FIELDS})
        new_rows.append(row)
        write_markdown(md_path, rows, note)
    bar.close()
    if rows:
        write_markdown(md_path, rows, note)
        print(note + "\n\n" + markdown_table(rows))
    print(f"bench_adapters: {len(new_rows)} rows measured, results in {csv_path} and {md_path}", file=sys.stderr)
    for e in errors:
        print(f"bench_adapters: FAILED {e}", file=sys.stderr)
    return new_rows


if __name__ == "__main__":
    main()
