"""The `vtc` command line.

vtc eval --model tiny-qwen2-vl-shapes --bench shapes --methods all --budgets 16,32,64,128
vtc train vlm llava --out assets/tiny-llava-shapes
vtc train tokenizer flextok
vtc train bridge flextok --out assets/tiny-flextok-llava-shapes
vtc viz --image photo.png --method divprune --budget 64 --out kept.png
vtc list [reducers|benchmarks|tokenizers|models]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="compare methods and budgets on a model and a benchmark (resumable)")
    p.add_argument("--model", default="tiny-qwen2-vl-shapes", help="assets name, local folder or hub id")
    p.add_argument("--bench", default="shapes", help="benchmark name (vtc list benchmarks)")
    p.add_argument("--bench-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="benchmark option, e.g. --bench-arg path=~/data/pope")  # fmt: skip
    p.add_argument("--methods", default="all", help="comma-separated names or wildcards, or 'all'")
    p.add_argument("--budgets", default="16,32,64,128", help="tokens per image (ints) or fractions")
    p.add_argument("--method-arg", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="reducer option, e.g. --method-arg fastv.layer=2 (JSON values)")  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="first N samples only")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--out", default=None, help="results folder (default runs/eval/<model>-<bench>)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_eval)


def _kv(items: Sequence[str], flag: str) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"{flag} {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _run_eval(args: argparse.Namespace) -> int:
    from vtc.eval.harness import EvalConfig, markdown_table, run_eval

    method_args: dict[str, dict] = {}
    for k, v in _kv(args.method_arg, "--method-arg").items():
        if "." not in k:
            raise SystemExit(f"--method-arg {k!r}: expected METHOD.KEY=VALUE, e.g. fastv.layer=2")
        m, key = k.split(".", 1)
        method_args.setdefault(m, {})[key] = v
    cfg = EvalConfig(
        model=args.model, bench=args.bench, bench_args=_kv(args.bench_arg, "--bench-arg"),
        methods=[m.strip() for m in args.methods.split(",") if m.strip()], budgets=args.budgets,
        batch_size=args.batch_size, limit=args.limit, out=args.out, device=args.device, dtype=args.dtype,
        threads=args.threads, max_new_tokens=args.max_new_tokens, method_args=method_args,
        progress=not args.no_progress,
    )  # fmt: skip
    _maybe_init_distributed()
    rows = run_eval(cfg)
    if rows:
        print(markdown_table(rows))
    out = Path(cfg.out or Path("runs") / "eval" / f"{Path(cfg.model).name}-{cfg.bench}")
    for f in sorted(out.glob("errors.rank*.json")):
        for run, err in json.loads(f.read_text()).items():
            print(f"not run: {run}: {err}")
    return 0


def _maybe_init_distributed() -> None:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1), join the process group (gloo on CPU, nccl on GPU)."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def _list(args: argparse.Namespace) -> int:
    what = args.what
    if what == "reducers":
        from vtc import list_reducers

        names = list_reducers(args.pattern)
    elif what == "benchmarks":
        from vtc.eval.benchmarks import list_benchmarks

        names = list_benchmarks(args.pattern)
    elif what == "tokenizers":
        from vtc import list_tokenizers

        names = list_tokenizers(args.pattern)
    else:
        from vtc.eval.harness import ASSETS

        names = sorted(p.name for p in ASSETS.glob("*") if (p / "config.json").exists())
    print("\n".join(names))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtc", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _eval_parser(sub)
    train = sub.add_parser("train", help="train a tiny VLM or a tokenizer").add_subparsers(dest="what", required=True)
    from vtc.train import vlm

    vlm.add_parser(train)
    from vtc.train import bridge

    bridge.add_parser(train)
    try:
        from vtc.train import tokenizer
    except ImportError:  # pragma: no cover - tokenizers not installed in this checkout
        tokenizer = None
    if tokenizer is not None:
        tokenizer.add_parser(train)
    try:
        from vtc.eval import viz
    except ImportError:  # pragma: no cover
        viz = None
    if viz is not None:
        viz.add_parser(sub)
    p = sub.add_parser("list", help="list reducers, benchmarks, tokenizers or shipped models")
    p.add_argument("what", choices=["reducers", "benchmarks", "tokenizers", "models"], nargs="?", default="reducers")
    p.add_argument("pattern", nargs="?", default="*")
    p.set_defaults(func=_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = args.func(args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
