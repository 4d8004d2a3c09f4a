"""Train a 1-D tokenizer (`flextok`, `one_d_piece`, `karl`) on the procedural image stream, resumably.

    vtc train tokenizer flextok --out assets/tokenizers/flextok --minutes 60 --threads 2
    python -m vtc.train.tokenizer flextok --out assets/tokenizers/flextok --minutes 60 --threads 2   # same

Every `save_every` steps the run writes `<out>/checkpoint/` (model.safetensors + config.json, the AdamW state as
optimizer.safetensors, the torch RNG state and the step in trainer_state.json); a rerun with the same `out` resumes
from it bit for bit (batches are a pure function of the step, model randomness comes from the restored RNG). At the
end the model is saved to `<out>/` (`vtc.create_tokenizer(name, pretrained=<out>)` loads it), with `log.jsonl`
(one line per logged step) and `eval.json` (held-out PSNR for token prefixes 1, 2, 4, ..., K).

`--no-tail-dropout` trains the same model on the full K tokens only (the TiTok-like ablation); its default output
directory is `assets/tokenizers/<name>_no_tail_dropout`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..tokenizers import Tokenizer1D, create_tokenizer, list_tokenizers
from ..tokenizers.base import ASSETS_DIR
from ..tokenizers.data import synthetic_batch, synthetic_images

CKPT = "checkpoint"


def default_out_dir(name: str, tail_dropout: bool = True) -> Path:
    return ASSETS_DIR / (name if tail_dropout else f"{name}_no_tail_dropout")


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdamW state as flat tensors (`state.<param index>.<key>`) plus the JSON-able param-group settings."""
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
            tensors[f"state.{pid}.{key}"] = t.detach().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = t
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    out: Path, model: Tokenizer1D, opt: torch.optim.Optimizer, step: int, elapsed: float, extra: dict[str, Any]
) -> None:
    """Write `<out>/checkpoint/` atomically (a temporary directory renamed over the old one)."""
    tmp = out / f"{CKPT}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tensors, meta = _optimizer_tensors(opt)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch_rng": torch.get_rng_state()}
    if next(model.parameters()).is_cuda:
        rng["cuda_rng"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    state = {"step": step, "elapsed_s": elapsed, "optimizer": meta, **extra}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
    final = out / CKPT
    old = out / f"{CKPT}.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


@torch.no_grad()
def prefix_psnr(
    model: Tokenizer1D, images: torch.Tensor, batch: int = 64, weight: torch.Tensor | None = None
) -> dict[int, float]:
    """Mean PSNR (dB, images in [0, 1]) of reconstructions from the first k tokens, k = 1, 2, 4, ..., K. With
    `weight [B, 1, H, W]` each image's MSE is the weighted mean (e.g. an object mask: PSNR on the objects only)."""
    k_max = model.config.num_tokens
    ks = sorted({2**i for i in range(int(math.log2(k_max)) + 1)} | {k_max})
    was_training = model.training
    model.eval()
    out = {}
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(0)
    for k in ks:
        vals = []
        for i in range(0, images.shape[0], batch):
            x = images[i : i + batch].to(dev)
            tok = model.encode(x, num_tokens=k)
            rec = model.decode(tok, generator=gen) if model.name == "flextok" else model.decode(tok)
            if weight is None:
                mse = ((rec - x) ** 2).mean((1, 2, 3))
            else:
                w = weight[i : i + batch].to(dev)
                mse = ((rec - x) ** 2 * w).sum((1, 2, 3)) / (w.sum((1, 2, 3)) * x.shape[1]).clamp_min(1e-12)
            vals.append(-10 * torch.log10(mse.clamp_min(1e-10)).cpu())
        out[k] = float(torch.cat(vals).mean())
    model.train(was_training)
    return out


DATA = ("synthetic", "shapes", "shapes_dense")
_VARIANT = {"shapes": "base", "shapes_dense": "dense"}


def _render_scaled(args: tuple[int, int, str, bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Scene `seed` (args: seed, size, variant, native) area-downscaled to `size`: image uint8 `[size, size, 3]`,
    object cover `[size, size]` and, if `native`, the full-size render."""
    import cv2

    from vtc.eval.benchmarks import shapes as S

    seed, size, variant, native = args
    sc = S.make_scene(seed, variant)
    full = sc.render()
    img = cv2.resize(full, (size, size), interpolation=cv2.INTER_AREA)
    cover = cv2.resize((sc.pixel_map() > 0).astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return img, cover, full if native else None


def shapes_batch(
    step: int, batch_size: int, size: int = 32, seed: int = 0, variant: str = "base", masks: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Training batch `step` of vtc-shapes scenes (training seeds: seed·10⁷ + 4·10⁶ + i, disjoint from every
    benchmark split and the VLM trainers' pools), area-downscaled to `size`: `[B, 3, S, S]`. `variant="dense"`:
    the crowded scenes (12-18 objects, 2-4 letters). `masks=True` also returns `[B, 1, S, S]`: the share of each
    pixel covered by an object or letter tag (area-downscaled from the scene's pixel map)."""
    start = seed * 10**7 + 4 * 10**6 + step * batch_size
    out = [_render_scaled((start + i, size, variant, False)) for i in range(batch_size)]
    x = torch.from_numpy(np.stack([o[0] for o in out])).permute(0, 3, 1, 2).float() / 255
    if not masks:
        return x
    return x, torch.from_numpy(np.stack([o[1] for o in out]))[:, None]


def load_teacher(path: str | os.PathLike, grid: int) -> tuple[Callable[[list[np.ndarray]], torch.Tensor], int]:
    """REPA's teacher: a `vtc train vlm` model (`from_pretrained` folder). Returns (features, width): `features`
    maps full-size scenes (uint8 `[S, S, 3]`) to the visual tokens the model's LLM reads, average-pooled onto the
    tokenizer's `grid` x `grid` patch grid in raster order, `[B, grid², D]` (the tiny Qwen2-VL's 12 x 12 tokens at
    192 px are already FlexTok's 12 x 12 patches at 96 px). Their per-cell colour, shape and letter were taught by
    dense supervision, so they stand for the semantic features (DINOv2) FlexTok's REPA aligns to."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from . import vlm

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    family = "qwen2_vl" if "qwen2" in model.config.model_type else "llava"

    @torch.no_grad()
    def features(images: list[np.ndarray]) -> torch.Tensor:
        f = vlm.image_features(model, vlm.pixel_inputs(processor, images, family), family).float()  # [B, N, D]
        side = math.isqrt(f.shape[1])
        if side * side != f.shape[1] or side % grid:
            raise ValueError(
                f"teacher {path} gives {f.shape[1]} tokens per image: not a square grid divisible by grid={grid}"
            )
        f = f.transpose(1, 2).reshape(f.shape[0], -1, side, side)  # [B, D, side, side]
        return torch.nn.functional.avg_pool2d(f, side // grid).flatten(2).transpose(1, 2)  # [B, grid², D]

    return features, int(getattr(model.config, "text_config", model.config).hidden_size)


class ShapesPool:
    """The first `n` scenes of `shapes_batch`'s stream, rendered once (by `workers` processes) and drawn in a fresh
    permutation each epoch: batch `step` is a pure function of the step, as the stream's is, without the ~0.14 s of
    rendering per batch of 32 that is half a small tokenizer's step on two CPU cores. Image and cover of pool scene
    i equal `shapes_batch`'s scene i exactly (uint8 pixels; the cover, a mean of 0/1 pixels, in float16). With a
    `teacher` (`load_teacher`) each scene also gets the teacher's per-patch features (float16), for REPA."""

    def __init__(
        self,
        n: int,
        size: int,
        seed: int,
        variant: str,
        batch_size: int,
        workers: int = 1,
        teacher: Callable[[list[np.ndarray]], torch.Tensor] | None = None,
        chunk: int = 512,
    ):
        if n < batch_size or n % batch_size:
            raise ValueError(
                f"pool={n} must be a positive multiple of batch_size={batch_size}, e.g. {64 * batch_size}"
            )
        from multiprocessing import get_context

        images, cover, feats = [], [], []
        native = teacher is not None
        ctx = get_context("fork").Pool(workers) if workers > 1 else None
        try:
            for c0 in range(0, n, chunk):  # in chunks: the full-size renders the teacher reads are not kept
                args = [(seed * 10**7 + 4 * 10**6 + i, size, variant, native) for i in range(c0, min(n, c0 + chunk))]
                out = ctx.map(_render_scaled, args, chunksize=32) if ctx else [_render_scaled(a) for a in args]
                images += [o[0] for o in out]
                cover += [o[1] for o in out]
                if teacher is not None:
                    feats.append(teacher([o[2] for o in out]).to(torch.float16))
        finally:
            if ctx:
                ctx.close()
        self.images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # [N, 3, S, S] uint8
        self.cover = torch.from_numpy(np.stack(cover)).to(torch.float16)[:, None]  # [N, 1, S, S]
        self.teacher = torch.cat(feats) if feats else None  # [N, G², D] float16
        self.n, self.seed, self.batch_size = n, seed, batch_size

    def indices(self, step: int) -> torch.Tensor:
        """Pool indices of batch `step`: epoch e = step·B // n is a permutation seeded by (seed, e)."""
        epoch, offset = divmod(step * self.batch_size, self.n)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return perm[offset : offset + self.batch_size]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Images `[B, 3, S, S]` in [0, 1], object cover `[B, 1, S, S]` and teacher features `[B, G², D]` (None
        without a teacher) of batch `step`."""
        idx = self.indices(step)
        align = None if self.teacher is None else self.teacher[idx].float()
        return self.images[idx].float() / 255, self.cover[idx].float(), align


def lr_at(step: int, lr: float, warmup: int, schedule: str, total: int | None, final: float = 0.1) -> float:
    """Learning rate of step `step` (0-based): linear warmup over `warmup` steps, then constant, or ("cosine") a
    half cosine from `lr` down to `final`·lr at step `total`."""
    scale = min(1.0, (step + 1) / max(warmup, 1))
    if schedule == "cosine":
        t = min(max(step + 1 - warmup, 0) / max(total - warmup, 1), 1.0)  # type: ignore[operator]
        scale *= final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))
    return lr * scale


def train_tokenizer(
    name: str,
    out_dir: str | os.PathLike | None = None,
    *,
    minutes: float | None = None,
    steps: int | None = None,
    threads: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    warmup: int = 200,
    grad_clip: float = 1.0,
    save_every: int = 500,
    log_every: int = 50,
    tail_dropout: bool = True,
    eval_images: int = 256,
    data: str = "synthetic",
    object_weight: float = 0.0,
    device: str = "cpu",
    pool: int = 0,
    lr_schedule: str = "constant",
    repa_teacher: str | None = None,
    config: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train tokenizer `name` until `steps` total steps or `minutes` of wall time (this run), whichever comes first.

    Resumes from `<out_dir>/checkpoint/` when present (the saved config wins; a different `config` raises).
    `data`: "synthetic" (procedural images from flat to noise, `vtc.tokenizers.data`), "shapes" or "shapes_dense"
    (vtc-shapes scenes at the tokenizer's size: the tokens a VLM bridge on that benchmark needs, `vtc train bridge`;
    on benchmark scenes the objects are so few pixels that an MSE-trained tokenizer learns the background only).
    `object_weight` (shapes data only): each pixel's reconstruction loss weighs 1 + object_weight * (its share
    covered by an object or letter tag), so that the objects, ~5% of a scene's pixels, are what the tokens encode.
    `pool` (shapes data): render the stream's first `pool` scenes once and draw batches from them
    (`ShapesPool`), instead of rendering every batch. `lr_schedule`: "constant" after the warmup, or "cosine" down
    to 0.1·lr at `steps` (which it needs). `repa_teacher` (FlexTok with a pool): a `vtc train vlm` model whose
    per-patch visual tokens the decoder aligns to (REPA, `FlexTok.training_loss`; weight `config["repa_weight"]`,
    default 1). These are recorded in the checkpoint, and a resume with others is refused.
    `device`: "cpu" or "cuda" (checkpoints are written on the CPU side and resume on either; bit-for-bit
    resumption holds on the same device).
    Returns a summary dict (steps, final loss, seconds per step, held-out prefix PSNR).
    """
    if minutes is None and steps is None:
        raise ValueError("give steps=... or minutes=... (or both) so that training stops")
    if steps is not None and steps < 0:
        raise ValueError(f"steps={steps} must be >= 0")
    if threads < 1:
        raise ValueError(f"threads={threads} must be >= 1")
    if data not in DATA:
        raise ValueError(f"data={data!r} is not one of {DATA}")
    if lr_schedule not in ("constant", "cosine") or (lr_schedule == "cosine" and steps is None):
        raise ValueError(
            f"lr_schedule={lr_schedule!r} must be 'constant' or 'cosine', and 'cosine' needs steps=... (--steps): "
            "it decays to 0.1·lr at that step"
        )
    if pool < 0 or (pool > 0 and data == "synthetic"):
        raise ValueError(f"pool={pool} must be >= 0, and > 0 only with data='shapes' or 'shapes_dense'")
    if repa_teacher is not None and (name != "flextok" or not pool):
        raise ValueError(
            f"repa_teacher={repa_teacher!r} is for FlexTok (REPA is in its paper) trained from a scene pool: "
            "pass --pool N (e.g. 32000) with flextok, or leave out --repa-teacher"
        )
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device; use device='cpu' (--device cpu)")
    if not object_weight >= 0 or (object_weight > 0 and data == "synthetic"):
        raise ValueError(
            f"object_weight={object_weight} must be >= 0, and > 0 only with data='shapes' or 'shapes_dense' "
            "(the synthetic images have no object masks)"
        )
    out = Path(out_dir) if out_dir is not None else default_out_dir(name, tail_dropout)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    say = log or (lambda s: None)

    cfg = dict(config or {})
    cfg["tail_dropout"] = tail_dropout
    schedule_steps = steps if lr_schedule == "cosine" else None  # the step the cosine ends at
    teacher = None
    if repa_teacher is not None:
        from ..tokenizers.flextok import FlexTokConfig

        fc = FlexTokConfig(**cfg)
        teacher, cfg["repa_dim"] = load_teacher(repa_teacher, fc.image_size // fc.patch_size)  # decoder's grid
    ckpt = out / CKPT
    start_step, elapsed_before = 0, 0.0
    if (ckpt / "trainer_state.json").is_file():
        model = create_tokenizer(name, pretrained=ckpt)
        saved = model.config.to_dict()
        for k, v in cfg.items():
            sv = saved.get(k)
            if (list(v) if isinstance(v, (list, tuple)) else v) != (list(sv) if isinstance(sv, (list, tuple)) else sv):
                raise ValueError(
                    f"{ckpt} was trained with {k}={sv!r}, not {v!r}; use another --out or delete the checkpoint"
                )
        model.to(dev).train()
        state = json.loads((ckpt / "trainer_state.json").read_text())
        start_step, elapsed_before = int(state["step"]), float(state["elapsed_s"])
        if state.get("data", "synthetic") != data:
            raise ValueError(f"{ckpt} was trained on data={state.get('data', 'synthetic')!r}, not {data!r}")
        if float(state.get("object_weight", 0.0)) != object_weight:
            raise ValueError(
                f"{ckpt} was trained with object_weight={state.get('object_weight', 0.0)}, not {object_weight}; "
                "pass the same --object-weight or use another --out"
            )
        if state.get("repa_teacher") != repa_teacher:
            raise ValueError(
                f"{ckpt} was trained with repa_teacher={state.get('repa_teacher')!r}, not {repa_teacher!r}; "
                "pass the same --repa-teacher or use another --out"
            )
        if (state.get("pool", 0), state.get("lr_schedule", "constant"), state.get("schedule_steps")) != (
            pool,
            lr_schedule,
            schedule_steps,
        ):
            raise ValueError(
                f"{ckpt} was trained with pool={state.get('pool', 0)}, lr_schedule="
                f"{state.get('lr_schedule', 'constant')!r} (steps {state.get('schedule_steps')}), not pool={pool}, "
                f"lr_schedule={lr_schedule!r} (steps {schedule_steps}); pass the same --pool, --lr-schedule and "
                "--steps, or use another --out"
            )
        if (state.get("seed", seed), state.get("batch_size", batch_size)) != (seed, batch_size):
            say(f"[{name}] resuming with the checkpoint's seed={state['seed']}, batch_size={state['batch_size']}")
            seed, batch_size = int(state["seed"]), int(state["batch_size"])
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
        _load_optimizer(opt, load_file(str(ckpt / "optimizer.safetensors")), state["optimizer"])
        rng = load_file(str(ckpt / "rng.safetensors"))
        torch.set_rng_state(rng["torch_rng"])
        if dev.type == "cuda" and "cuda_rng" in rng:
            torch.cuda.set_rng_state(rng["cuda_rng"])
        say(f"[{name}] resumed from {ckpt} at step {start_step}")
    else:
        torch.manual_seed(seed)
        model = create_tokenizer(name, **cfg)
        model.to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
        say(f"[{name}] new model, {model.num_params() / 1e6:.2f}M params, config {model.config.to_dict()}")

    c = model.config
    run_state = {
        "seed": seed, "batch_size": batch_size, "lr": lr, "data": data, "object_weight": object_weight,
        "pool": pool, "lr_schedule": lr_schedule, "schedule_steps": schedule_steps,
        "repa_teacher": repa_teacher,
    }  # fmt: skip
    scenes = None
    if pool:
        t_pool = time.monotonic()
        scenes = ShapesPool(pool, c.image_size, seed, _VARIANT[data], batch_size, workers=threads, teacher=teacher)
        say(f"[{name}] rendered a pool of {pool} scenes in {time.monotonic() - t_pool:.0f} s")
    deadline = None if minutes is None else time.monotonic() + 60 * minutes
    total = steps if steps is not None else None
    step = start_step
    t0 = time.monotonic()
    last_logs: dict[str, float] = {}
    log_path = out / "log.jsonl"
    window: list[float] = []
    while (total is None or step < total) and (deadline is None or time.monotonic() < deadline):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr, warmup, lr_schedule, steps)
        weight = align = None
        if data == "synthetic":
            x = synthetic_batch(step, batch_size, c.image_size, seed)
        elif scenes is not None:
            x, cover, align = scenes.batch(step)
            weight = 1 + object_weight * cover if object_weight > 0 else None
        elif object_weight > 0:
            x, cover = shapes_batch(step, batch_size, c.image_size, seed, _VARIANT[data], masks=True)
            weight = 1 + object_weight * cover
        else:
            x = shapes_batch(step, batch_size, c.image_size, seed, _VARIANT[data])
        x, weight = x.to(dev), None if weight is None else weight.to(dev)
        if align is None:
            loss, logs = model.training_loss(x, weight)
        else:
            loss, logs = model.training_loss(x, weight, align=align.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        step += 1
        window.append(logs["loss"])
        last_logs = logs
        if step % log_every == 0 or step == total:
            run_s = time.monotonic() - t0
            rec = {
                "step": step,
                "s_per_step": run_s / (step - start_step),
                **{k: round(v, 5) for k, v in logs.items()},
            }
            rec["loss_avg"] = sum(window) / len(window)
            window.clear()
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            say(f"[{name}] step {step} loss {rec['loss_avg']:.4f} ({rec['s_per_step']:.3f} s/step)")
        if step % save_every == 0:
            save_checkpoint(
                out,
                model,
                opt,
                step,
                elapsed_before + time.monotonic() - t0,
                run_state,
            )
    run_s = time.monotonic() - t0
    if step > start_step:
        save_checkpoint(
            out, model, opt, step, elapsed_before + run_s,
            run_state,
        )  # fmt: skip
    model.eval()
    model.save_pretrained(out)
    summary: dict[str, Any] = {
        "name": name,
        "steps": step,
        "steps_this_run": step - start_step,
        "s_per_step": run_s / max(step - start_step, 1),
        "threads": threads,
        "device": str(dev),
        "last": last_logs,
        "out": str(out),
    }
    if eval_images > 0 and data == "synthetic":
        held_out, _ = synthetic_images(eval_images, c.image_size, seed=seed + 10_000)
        summary["psnr_by_tokens"] = prefix_psnr(model, held_out)
    elif eval_images > 0:  # held-out scenes (seed + 99: a training range no run of seed <= 98 uses), and their objects
        held_out, cover = shapes_batch(0, eval_images, c.image_size, seed + 99, _VARIANT[data], masks=True)
        summary["psnr_by_tokens"] = prefix_psnr(model, held_out)
        summary["object_psnr_by_tokens"] = prefix_psnr(model, held_out, weight=cover)
    for key in ("psnr_by_tokens", "object_psnr_by_tokens"):
        if key in summary:
            say(f"[{name}] held-out {key}: " + ", ".join(f"{k}: {v:.2f}" for k, v in summary[key].items()))
    (out / "eval.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Mount `tokenizer` under a `train` command's subparsers (the parser's `func` is `main`)."""
    p = subparsers.add_parser(
        "tokenizer",
        help="train a 1-D image tokenizer (resumable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=list_tokenizers(), help="tokenizer to train")
    p.add_argument("--out", default=None, help="output directory (default assets/tokenizers/<name>[_no_tail_dropout])")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget of this run")
    p.add_argument("--steps", type=int, default=None, help="total steps (counting resumed ones)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (use the number of free cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-images", type=int, default=256, help="held-out images for the final PSNR curve (0 = skip)")
    p.add_argument("--no-tail-dropout", action="store_true", help="ablation: always train on all K tokens")
    p.add_argument("--data", choices=DATA, default="synthetic", help="training images (shapes: for a VLM bridge)")
    p.add_argument(
        "--object-weight",
        type=float,
        default=0.0,
        help="shapes data: extra loss weight of object pixels (a pixel weighs 1 + this x its object cover)",
    )
    p.add_argument(
        "--pool",
        type=int,
        default=0,
        help="shapes data: render this many training scenes once and draw batches from them (0: render each batch)",
    )
    p.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="after the warmup: constant, or cosine down to 0.1 x lr at --steps",
    )
    p.add_argument(
        "--repa-teacher",
        default=None,
        help="flextok with --pool: align the decoder to this vtc train vlm model's visual tokens (REPA), "
        "e.g. assets/tiny-qwen2-vl-shapes",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config field, e.g. --set width=96 (JSON values)",
    )
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    config = {}
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. --set width=96")
        k, v = item.split("=", 1)
        config[k.strip()] = _parse_value(v)
    if args.minutes is None and args.steps is None:
        raise SystemExit("give --minutes and/or --steps so that training stops")
    return train_tokenizer(
        args.name,
        args.out,
        minutes=args.minutes,
        steps=args.steps,
        threads=args.threads,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        save_every=args.save_every,
        log_every=args.log_every,
        tail_dropout=not args.no_tail_dropout,
        eval_images=args.eval_images,
        data=args.data,
        object_weight=args.object_weight,
        device=args.device,
        pool=args.pool,
        lr_schedule=args.lr_schedule,
        repa_teacher=args.repa_teacher,
        config=config,
    )


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m vtc.train.tokenizer")
    _sub = _parser.add_subparsers(dest="command", required=True)
    add_parser(_sub)
    import sys

    main(_parser.parse_args(["tokenizer", *sys.argv[1:]]))
