"""Train the tiny VLMs that `vtc eval` runs by default: real transformers classes, competent on `vtc-shapes`.

    vtc train vlm llava  --out assets/tiny-llava-shapes      # LlavaForConditionalGeneration, CLIP tower, 576 tokens
    vtc train vlm qwen2_vl --out assets/tiny-qwen2-vl-shapes  # Qwen2VLForConditionalGeneration, 144 merged tokens

Recipe (answer-only training from scratch does not learn on 2 CPU cores; see the project notes):
1. `dense`: the vision tower and projector learn rich patch tokens from dense per-token supervision of the rendered
   scene — colour, shape, letter and object-centre class of every cell of the token grid, and (for LLaVA, whose CLIP
   tower has absolute position embeddings) the cell's row and column — through linear heads that are then discarded.
   This stage trains on the crowded `dense` variant of vtc-shapes (12-18 objects, 2-4 letter tags: ~4x the labelled
   cells of a benchmark scene per image paid for), with labelled cells weighted up. Colour is read from single
   pixels and is learnt in a few steps; shape and letter need the outline across neighbouring patches and are what
   this stage's length is for. Every 100 steps the heads' accuracy on the labelled cells of held-out benchmark
   scenes is logged (`dense_val` in work/log.jsonl): the questions can only be answered from what these tokens hold.
2. `cache`: the tower and projector are frozen; their outputs for a pool of training scenes are computed once.
3. `lm`: the language model learns from sequences of one image followed by many question-answer turns (each image's
   visual tokens are paid for once per 20 (Qwen2-VL, 144 tokens) or up to 40 (LLaVA, 576) supervised answers).
   For Qwen2-VL, whose vision tokens carry no absolute position (2-D RoPE only), an auxiliary head reads each visual
   token's row and column from the LM's first layer, so the LM learns where its tokens are; the head is discarded.
   Two kinds of supervision route that information:
   a grounding loss makes head 0 of every layer >= 1 attend, from the row that predicts an answer, to the objects the
   question is about (spatial questions: head 0 on object A, head 1 on object B), and a linear read-out must recover
   A's offset from B, (dy, dx), from that row after layer 2 (without it the relation stayed at chance: the heads
   found the objects but the answer row held no usable position; a linear probe of it scored 0.30 for 4 classes),
   and another the number a "how many" question asks for.
   For LLaVA a third routes the question itself (`question_sup`): head 0 of layer 0, from the answer row, must spread
   its attention evenly over the words that pick the objects (colours and shapes; spatial questions: A's words on
   head 0, B's on head 1). Without it, in one of two runs of the same recipe no head of layer 0 carried the colour
   word to the answer row (mass on "green" in "what shape is the green object ?" 0.00, on "red" in "is there a red
   circle ?" <= 0.01; they read the shape word, "shape", "a"), so the colour look-ups never formed (head 0 of layers
   1-3 put 0.28 of its mass on the green object; validation shape 0.50, existence 0.53); in the run that reached the
   bar two heads of layer 0 put 0.42-0.55 on the colour word. With 1-D RoPE and base 1e6 the LLM has few
   fast-rotating dimensions to find a question's words by position, and 40 earlier turns to confuse them with.

Every stage checkpoints (safetensors: model, optimiser moments, RNG-free step counter) and a killed run resumes
where it stopped. The final model and its processor (word-level tokenizer, image processor, chat template) are
saved with `save_pretrained` and load with `from_pretrained`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vtc.eval.benchmarks import shapes as S

FAMILIES = ("llava", "qwen2_vl")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]  # fmt: skip
CHAT_TEMPLATE = {
    # the tiny models are trained on "<image-run> question" → "answer </s>"; the template yields exactly that
    "llava": "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% elif c['type'] == 'video' %}<image> {% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endfor %}",
    "qwen2_vl": "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|> {% elif c['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|> {% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endfor %}",
}
IMAGE_SIZE = 192
ATTRS = ("colour", "shape", "letter", "centre")  # the per-cell label maps, in this order


# One-run recipes: `None` fields of TrainConfig take their family's value. Qwen2-VL's trained its shipped model.
# LLaVA: RoPE base 1e6 (with 1-D RoPE its questions sit 600-900 positions after the image tokens; base 10 000 left
# the LLM stage near 0.65) and the layer-0 question loss, without which one of three runs of 4 500-5 500 LLM steps
# reached the bar and two plateaued at 0.77; with it 2 500 steps are enough (README). LLaVA pays for 576 visual
# tokens per sequence (Qwen2-VL: 144), so it asks more questions per image.
FAMILY_DEFAULTS: dict[str, dict[str, float]] = {
    "llava": {
        "dense_steps": 2000,
        "lm_steps": 2500,
        "lm_batch": 6,
        "qa_per_image": 40,
        "rope_theta": 1e6,
        "question_sup": 1.0,
    },
    "qwen2_vl": {
        "dense_steps": 1000,
        "lm_steps": 6000,
        "lm_batch": 8,
        "qa_per_image": 20,
        "rope_theta": 10000.0,
        "question_sup": 0.0,
    },
}


@dataclass
class TrainConfig:
    family: str = "llava"
    pool: int = 12000  # training scenes (rendered once, cached)
    dense_pool: int = 8000  # crowded "dense"-variant scenes for the vision pretraining
    dense_steps: int | None = None  # None: FAMILY_DEFAULTS[family], as for every `None` below
    dense_batch: int = 16
    dense_lr: float = 2e-3
    dense_fg_weight: float = 20.0  # labelled (object, letter) cells weigh 1 + this, background 1
    lm_steps: int | None = None
    lm_batch: int | None = None
    lm_lr: float = 2e-3
    qa_per_image: int | None = None
    val_per_type: int = 40
    seed: int = 0
    threads: int = 2
    checkpoint_every: int = 100
    attn_sup: float = 1.0  # weight of the grounding loss on heads 0 (and 1) of layers 1.. (0 disables it)
    question_sup: float | None = None  # weight of the loss making head 0 of layer 0 read the current question
    rel_sup: float = 1.0  # weight of the spatial read-out: (dy, dx) of A - B from the answer row after layer 2
    count_sup: float = 1.0  # weight of the count read-out: the number asked for, from the answer row after layer 2
    rope_theta: float | None = None  # the LM's RoPE base (shipped models: Qwen2-VL 10 000, LLaVA 1e6; README)
    device: str = "cpu"  # "cuda" trains on a GPU (bf16 autocast there as on the CPU); checkpoints resume on either

    def __post_init__(self) -> None:
        check_family(self.family)
        for k, v in FAMILY_DEFAULTS[self.family].items():
            if getattr(self, k) is None:
                setattr(self, k, v)


# ---------------------------------------------------------------------- model, tokenizer, processor
def build_tokenizer():
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + S.vocabulary()
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.padding_side = "left"
    return fast


def text_config_kwargs(vocab_size: int) -> dict[str, Any]:
    """The tiny Llama / Qwen2 language model shared by every tiny VLM (4 layers, width 128)."""
    return dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )  # fmt: skip


def build_model(family: str, vocab_size: int, image_size: int = IMAGE_SIZE, rope_theta: float = 10000.0):
    """The tiny architecture of each family (random weights); `image_size` only matters for LLaVA's CLIP,
    `rope_theta` is the language model's RoPE base."""
    check_family(family)
    text = text_config_kwargs(vocab_size)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": float(rope_theta)}
    if family == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        vision = CLIPVisionConfig(
            hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
            image_size=image_size, patch_size=8, projection_dim=96,
        )  # fmt: skip
        cfg = LlavaConfig(
            vision_config=vision, text_config=LlamaConfig(**text), image_token_id=SPECIAL.index("<image>"),
            vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        )  # fmt: skip
        return LlavaForConditionalGeneration(cfg)
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text["rope_parameters"]["mrope_section"] = [4, 6, 6]
    vision = dict(depth=3, embed_dim=96, hidden_size=128, num_heads=4, mlp_ratio=4, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip
    cfg = Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=SPECIAL.index("<|image_pad|>"),
        video_token_id=SPECIAL.index("<|video_pad|>"), vision_start_token_id=SPECIAL.index("<|vision_start|>"),
        vision_end_token_id=SPECIAL.index("<|vision_end|>"),
    )  # fmt: skip
    return Qwen2VLForConditionalGeneration(cfg)


def build_processor(family: str, tokenizer, image_size: int = IMAGE_SIZE):
    check_family(family)
    if family == "llava":
        from transformers import CLIPImageProcessor, LlavaProcessor

        ip = CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        )  # fmt: skip
        return LlavaProcessor(
            image_processor=ip, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE[family],
        )  # fmt: skip
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    kw = dict(patch_size=8, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
              min_pixels=32 * 32, max_pixels=768**2 if image_size == IMAGE_SIZE else image_size**2)  # fmt: skip
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**kw),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**kw),
        chat_template=CHAT_TEMPLATE[family],
    )


def check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny VLM family {family!r}; choose one of {FAMILIES}")


# ---------------------------------------------------------------------- data
def grid_of(family: str) -> int:
    return IMAGE_SIZE // 8 if family == "llava" else IMAGE_SIZE // 16


def _render(args: tuple[int, int, str]) -> tuple[np.ndarray, np.ndarray]:
    seed, grid, variant = args
    scene = S.make_scene(seed, variant)
    m = scene.label_maps(grid)
    return scene.render(), np.stack([m[k] for k in ATTRS])


def render_pool(
    n: int, grid: int, seed0: int, workers: int = 2, variant: str = "base"
) -> tuple[np.ndarray, np.ndarray]:
    """Images [n, S, S, 3] uint8 and label maps [n, 4, G, G] of training scenes seed0 .. seed0 + n - 1."""
    from multiprocessing import get_context

    args = [(seed0 + i, grid, variant) for i in range(n)]
    if workers > 1:
        with get_context("fork").Pool(workers) as pool:
            out = pool.map(_render, args, chunksize=64)
    else:
        out = [_render(a) for a in args]
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


def pixel_inputs(processor, images: list[np.ndarray], family: str) -> dict[str, Tensor]:
    out = processor.image_processor(images=images, return_tensors="pt")
    keys = ["pixel_values"] + (["image_grid_thw"] if family == "qwen2_vl" else [])
    return {k: out[k] for k in keys}


def image_features(model, pix: dict[str, Tensor], family: str) -> Tensor:
    """Projected visual tokens [B, N, D] (N = 576 for LLaVA, 144 for Qwen2-VL at 192 px), on the model's device."""
    inner = model.model
    dev = model.lm_head.weight.device
    out = inner.get_image_features(**{k: v.to(dev) for k, v in pix.items()})
    return torch.stack(list(out.pooler_output))


# ---------------------------------------------------------------------- checkpoints (safetensors only)
def save_state(path: Path, modules: dict[str, nn.Module], opt: torch.optim.Optimizer | None, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    for name, mod in modules.items():
        for k, v in mod.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().contiguous().cpu()
    if opt is not None:
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                for k, v in opt.state.get(p, {}).items():
                    if torch.is_tensor(v):
                        tensors[f"opt.{gi}.{pi}.{k}"] = v.detach().reshape(v.shape).contiguous().cpu().clone()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def load_state(path: Path, modules: dict[str, nn.Module], opt: torch.optim.Optimizer | None) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    for name, mod in modules.items():
        pre = f"{name}."
        state = {k[len(pre) :]: v for k, v in tensors.items() if k.startswith(pre)}
        if state or not list(mod.state_dict()):  # a module added after the checkpoint was written keeps its init
            mod.load_state_dict(state)
    if opt is not None:
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                st = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(f"opt.{gi}.{pi}.")}
                # moments live on the parameter's device; AdamW keeps its step count on the CPU
                st = {k: v if k == "step" else v.to(p.device) for k, v in st.items()}
                if st:
                    opt.state[p] = st
    return meta


ROPE_BEFORE_OPTION = 10000.0  # the RoPE base of every checkpoint written before `rope_theta` was recorded


def check_rope_theta(meta: dict, cfg: TrainConfig, ckpt: Path) -> None:
    """A run resumes or exports with the RoPE base it was trained with (the weights do not say which it was)."""
    saved = float(meta.get("rope_theta", ROPE_BEFORE_OPTION))
    if saved != cfg.rope_theta:
        raise ValueError(
            f"{ckpt} was trained with rope_theta={saved:g}, but this run asks for {cfg.rope_theta:g}; "
            f"pass --rope-theta {saved:g} to resume or export it"
        )


LM_SETTINGS = ("lm_steps", "lm_batch", "lm_lr", "qa_per_image", "attn_sup", "question_sup", "rel_sup", "count_sup")
LM_BEFORE_RECORDED = {"question_sup": 0.0}  # LLM-stage checkpoints written before settings were recorded had these


def settings_of(cfg: Any, keys: tuple[str, ...]) -> dict[str, float]:
    """The config fields `keys` as floats: what a checkpoint records of the recipe it was trained with."""
    return {k: float(getattr(cfg, k)) for k in keys}


def check_settings(meta: dict, settings: dict[str, float], ckpt: Path, before: dict | None = None) -> None:
    """A run resumes with the settings it started with: a different loss weight, step count (the learning-rate
    schedule) or batch mid-run would train a model no single recipe describes. Settings the checkpoint does not
    record (older ones) are taken from `before`, or not checked."""
    saved = {**(before or {}), **meta.get("settings", {})}
    for k, want in settings.items():
        if k in saved and float(saved[k]) != want:
            raise ValueError(
                f"{ckpt} was trained with {k}={saved[k]:g}, but this run asks for {want:g}; "
                f"pass --{k.replace('_', '-')} {saved[k]:g} to resume it, or use another --out"
            )


def grid_positions(grid: int) -> Tensor:
    """[G*G, 2] (row, column) of every cell of a `grid` x `grid` raster, scaled to [0, 1]."""
    rows = torch.arange(grid).repeat_interleave(grid).float() / (grid - 1)
    cols = torch.arange(grid).repeat(grid).float() / (grid - 1)
    return torch.stack([rows, cols], -1)


def lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def projector_out(model, family: str) -> nn.Linear:
    """The last linear layer before the LLM (LLaVA projector linear_2, Qwen2-VL merger mlp[2])."""
    return model.model.multi_modal_projector.linear_2 if family == "llava" else model.model.visual.merger.mlp[2]


@torch.no_grad()
def standardize_projector(model, family: str, feats: Tensor) -> None:
    """Fold a per-dimension standardisation of the visual tokens into the projector's last linear layer.

    After the dense stage the tokens share one large mean vector (norm ~25 against ~5 of variation), so after the
    LLM's RMSNorm every visual token looks alike and the LLM learns very slowly to tell them apart. The fold
    y' = (W x + b - mu) / sd is exact and keeps the architecture stock."""
    flat = feats.float().flatten(0, -2)  # [M, D]
    mu, sd = flat.mean(0), flat.std(0).clamp_min(1e-3)
    lin = projector_out(model, family)
    lin.weight.div_(sd[:, None])
    lin.bias.sub_(mu).div_(sd)


# ---------------------------------------------------------------------- stage 1: dense patch supervision
class DenseHeads(nn.Module):
    """Linear read-outs of every visual token: colour, shape, letter, object centre, row/column."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.colour = nn.Linear(dim, len(S.COLOURS) + 1)
        self.shape = nn.Linear(dim, len(S.SHAPES) + 1)
        self.letter = nn.Linear(dim, len(S.LETTERS) + 1)
        self.centre = nn.Linear(dim, 2)
        self.pos = nn.Linear(dim, 2)

    def loss(
        self, feats: Tensor, labels: Tensor, grid: int, with_pos: bool, fg_weight: float = 20.0
    ) -> tuple[Tensor, dict[str, float]]:
        """feats [B, G*G, D]; labels [B, 4, G, G] (colour, shape, letter, centre)."""
        lab = labels.flatten(2)  # [B, 4, G*G]
        fg = (lab[:, 0] > 0) | (lab[:, 2] > 0)
        w = 1.0 + fg_weight * fg.float()  # foreground cells are few and hold all the answers: weight them up
        logs, total = {}, feats.new_zeros(())
        for i, name in enumerate(ATTRS):
            logits = getattr(self, name)(feats).flatten(0, 1).float()
            ce = nn.functional.cross_entropy(logits, lab[:, i].flatten(), reduction="none")
            term = (ce * w.flatten()).sum() / w.sum()
            total = total + term
            logs[name] = float(term.detach())
        if with_pos:
            target = grid_positions(grid).to(feats.device).expand(feats.shape[0], -1, -1)
            mse = nn.functional.mse_loss(self.pos(feats).float(), target) * 20
            total = total + mse
            logs["pos"] = float(mse.detach())
        return total, logs

    @torch.no_grad()
    def accuracy(self, feats: Tensor, labels: Tensor) -> dict[str, float]:
        """Accuracy of each attribute head on the cells that carry that attribute (background cells excluded):
        the number that says whether the visual tokens hold what the questions ask about."""
        lab = labels.flatten(2)  # [B, 4, G*G]
        out = {}
        for i, name in enumerate(ATTRS):
            y = lab[:, i]
            pred = getattr(self, name)(feats.float()).argmax(-1)
            if (y > 0).any():
                out[f"acc_{name}"] = round(float((pred[y > 0] == y[y > 0]).float().mean()), 4)
        return out


# ---------------------------------------------------------------------- stage 3: multi-turn question answering
def make_turns(seed: int, n: int, rng: np.random.Generator) -> tuple[S.Scene, list[tuple[str, str]]]:
    """The scene of `seed` and up to `n` distinct question-answer turns about it (question types uniform)."""
    scene = S.make_scene(seed)
    turns, seen = [], set()
    for _ in range(4 * n):
        qa = S.ask(scene, S.QTYPES[int(rng.integers(len(S.QTYPES)))], rng)
        if qa is not None and qa[0] not in seen:
            seen.add(qa[0])
            turns.append(qa)
        if len(turns) == n:
            break
    return scene, turns


def build_sequence(
    prefix: list[int], turns: list[tuple[str, str]], tok, rows: list | None = None, starts: list | None = None
):
    """Token ids and labels (-100 except answers and their </s>) for `prefix` + q1 a1 </s> q2 a2 </s> ...

    `rows`, if given, receives the position of each question's last token (the one that predicts the answer);
    `starts` the position of each question's first token."""
    ids, labels = list(prefix), [-100] * len(prefix)
    for q, a in turns:
        qi = tok(q, add_special_tokens=False)["input_ids"]
        ai = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if starts is not None:
            starts.append(len(ids))
        ids += qi + ai
        labels += [-100] * len(qi) + ai
        if rows is not None:
            rows.append(len(ids) - len(ai) - 1)
    return ids, labels


def pad_batch(seqs: list[tuple[list[int], list[int]]]) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ids, labels (-100 padding) and attention mask `[B, L]` of (ids, labels) pairs."""
    width = max(len(a) for a, _ in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for j, (a, b) in enumerate(seqs):
        ids[j, : len(a)], lab[j, : len(b)], mask[j, : len(a)] = torch.tensor(a), torch.tensor(b), 1
    return ids, lab, mask


def image_prefix(family: str, n_tokens: int) -> list[int]:
    if family == "llava":
        return [1] + [SPECIAL.index("<image>")] * n_tokens
    return (
        [1, SPECIAL.index("<|vision_start|>")]
        + [SPECIAL.index("<|image_pad|>")] * n_tokens
        + [SPECIAL.index("<|vision_end|>")]
    )


def lm_forward(
    model,
    family: str,
    ids: Tensor,
    mask: Tensor,
    feats: Tensor,
    grid: int,
    hidden_layer: int | tuple[int, ...] | None,
    position_ids: Tensor | None = None,
):
    """Logits of the language model fed `feats` [B, N, D] at the image placeholders (what the full forward does
    with a frozen tower), and optionally the hidden state after layer `hidden_layer` (a tuple: one per index).
    `position_ids` (LLaVA only) replace the default 0..L-1."""
    inner = model.model
    emb = inner.get_input_embeddings()(ids)  # [B, L, D]
    img = ids == model.config.image_token_id
    emb = emb.masked_scatter(img[..., None], feats.to(emb.dtype))
    kwargs: dict[str, Any] = {} if position_ids is None else {"position_ids": position_ids}
    if family == "qwen2_vl":
        b = ids.shape[0]
        thw = torch.tensor([[1, 2 * grid, 2 * grid]] * b, device=ids.device)
        pos, _ = inner.get_rope_index(ids, mm_token_type_ids=img.int(), image_grid_thw=thw, attention_mask=mask)
        kwargs["position_ids"] = pos
    out = inner.language_model(
        inputs_embeds=emb, attention_mask=mask, output_hidden_states=hidden_layer is not None, **kwargs
    )
    logits = model.lm_head(out.last_hidden_state)
    if hidden_layer is None:
        return logits, None
    if isinstance(hidden_layer, tuple):
        return logits, tuple(out.hidden_states[i] for i in hidden_layer)
    return logits, out.hidden_states[hidden_layer]


# ---------------------------------------------------------------------- grounding supervision
class AttentionCapture:
    """Wraps the process's SDPA attention function while training: for the LM's layers in `layers`, keeps the
    post-RoPE queries and keys that SDPA received, so that a loss can be put on one head's attention rows.

    (transformers computes attention through `ALL_ATTENTION_FUNCTIONS["sdpa"]`; the wrapper calls the original and
    is removed on exit, so only this training process is affected and the saved model is stock.)"""

    def __init__(self, modules: dict[int, nn.Module]) -> None:
        self.ids = {id(m): i for i, m in modules.items()}
        self.store: dict[int, tuple[Tensor, Tensor, float]] = {}

    def __enter__(self) -> AttentionCapture:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self._orig = ALL_ATTENTION_FUNCTIONS["sdpa"]
        orig = self._orig

        def sdpa(module, query, key, value, attention_mask, *args, **kwargs):
            layer = self.ids.get(id(module))
            if layer is not None:
                self.store[layer] = (query, key, float(kwargs.get("scaling") or query.shape[-1] ** -0.5))
            return orig(module, query, key, value, attention_mask, *args, **kwargs)

        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa
        return self

    def __exit__(self, *exc) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS["sdpa"] = self._orig


def grounding_loss(
    store: dict, rows: list[list[int]], targets: list[list[list[list[int]]]], spread: bool = False
) -> Tensor:
    """Mean over supervised layers, turns and heads of -log(attention mass that head h of the answer-predicting row
    puts on `targets[b][turn][h]`, the visual columns that head must look at). Empty column lists are skipped.
    `spread`: the cross-entropy against a uniform target on those columns instead (-mean of their log
    probabilities): minimal only when every column gets an equal share, so the head cannot settle on one of them.

    Batched: one [B, H, R, L] score tensor per layer (R = most turns in a row of the batch), not a loop per row."""
    if not store:
        return torch.zeros(())
    q0, k0, _ = next(iter(store.values()))
    n_b, n_len = q0.shape[0], k0.shape[2]
    n_r = max(len(rs) for rs in rows)
    n_h = max((len(ph) for ts in targets for ph in ts), default=0)
    if n_r == 0 or n_h == 0:
        return torch.zeros(())
    dev = q0.device
    row_t = torch.zeros(n_b, n_r, dtype=torch.long)  # [B, R]
    want = torch.zeros(n_b, n_h, n_r, n_len, dtype=torch.bool)  # [B, H, R, L] target columns
    for b, (rs, ts) in enumerate(zip(rows, targets, strict=True)):
        for t, (r, per_head) in enumerate(zip(rs, ts, strict=True)):
            row_t[b, t] = r
            for head, cols in enumerate(per_head):
                want[b, head, t, cols] = True
    used = want.any(-1)  # [B, H, R]
    if not used.any():
        return torch.zeros(())
    want |= ~used[..., None]  # unused (padding) entries sum over every column: finite, so no NaN gradient
    row_t, want, used = row_t.to(dev), want.to(dev), used.to(dev)  # filled on the CPU (Python loops), used on `dev`
    future = torch.arange(n_len, device=dev)[None, None, :] > row_t[..., None]  # [B, R, L] causal: keys after the row
    b_i = torch.arange(n_b, device=dev)[:, None, None]
    h_i = torch.arange(n_h, device=dev)[None, :, None]
    losses = []
    for q, k, scale in store.values():
        groups = q.shape[1] // k.shape[1]
        qr = q[b_i, h_i, row_t[:, None, :]].float()  # [B, H, R, d]
        kh = k[:, torch.arange(n_h, device=dev) // groups].float()  # [B, H, L, d]
        logits = (qr @ kh.transpose(-1, -2)) * scale  # [B, H, R, L]
        logp = logits.masked_fill(future[:, None], float("-inf")).log_softmax(-1)
        if spread:
            past = want & ~future[:, None]  # padding entries want every column: keep only finite ones
            mass = logp.masked_fill(~past, 0.0).sum(-1) / past.sum(-1)  # [B, H, R] mean log p over the columns
        else:
            mass = logp.masked_fill(~want, float("-inf")).logsumexp(-1)  # [B, H, R]
        losses.append(-mass[used])
    return torch.cat(losses).mean()


def head_objects(scene: S.Scene, question: str) -> list[list[int]]:
    """Per supervised head, the objects it must attend to for `question` (indices; len(objects) = the letter tag).

    One head (0) looks at every object the question refers to, except for spatial questions: there head 0 looks at
    the first object and head 1 at the reference object, so that each reads one position rather than a blend of
    both (the union target left the relation at chance)."""
    ids = scene.referred(question)
    if question.startswith("where is") and len(ids) == 2:
        a = " ".join(question.split()[3:5])
        first = [i for i in ids if scene.objects[i].name == a]
        return [first, [i for i in ids if i not in first]]
    return [ids]


def target_columns(scene: S.Scene, question: str, grid: int, offset: int, omap: np.ndarray) -> list[list[int]]:
    """Per supervised head (`head_objects`), the sequence columns of the visual tokens it must attend to."""

    def cols(group: list[int]) -> list[int]:
        cells = np.flatnonzero(np.isin(omap.ravel(), np.array(group) + 1)) if group else []
        return [offset + int(c) for c in cells]

    return [cols(g) for g in head_objects(scene, question)]


ATTRIBUTE_WORDS = frozenset(S.COLOURS) | frozenset(S.SHAPES) | frozenset(S.PLURAL.values())


def question_columns(question: str, start: int) -> list[list[int]]:
    """Per supervised head of layer 0, the sequence columns of the words that pick out what the question is about
    (colours and shapes; the question's words sit at `start`, one token per word): head 0 reads all of them, except
    for spatial questions, where head 0 reads object A's words and head 1 object B's (as `target_columns`).
    Questions without such words (the letter's) give no column."""
    words = question.split()
    cols = [start + i for i, w in enumerate(words) if w in ATTRIBUTE_WORDS]
    if question.startswith("where is") and "relative" in words:
        cut = start + words.index("relative")
        return [[c for c in cols if c < cut], [c for c in cols if c > cut]]
    return [cols]


def relation_target(scene: S.Scene, question: str) -> tuple[float, float] | None:
    """(dy, dx) of object A minus object B in half-image units for "where is A relative to B ?", else None."""
    if not question.startswith("where is"):
        return None
    w = question.split()
    by_name = {o.name: o for o in scene.objects}
    a, b = by_name.get(" ".join(w[3:5])), by_name.get(" ".join(w[-3:-1]))
    if a is None or b is None:
        return None
    half = scene.size / 2
    return (a.cy - b.cy) / half, (a.cx - b.cx) / half


def count_target(scene: S.Scene, question: str) -> float | None:
    """The answer of "how many ... are there ?" as a number (a third of it), else None."""
    if not question.startswith("how many"):
        return None
    return len(scene.referred(question)) / 3


# ---------------------------------------------------------------------- the run
def training_device(device: str) -> torch.device:
    """The torch device of `TrainConfig.device`, checked."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device={device!r} is not a torch device; pass cpu or cuda (cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available here; pass --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: training runs on cpu or cuda")
    return dev


def bf16(dev: torch.device):
    """bfloat16 autocast on `dev`'s kind of device (the mixed precision of every stage, CPU and GPU alike)."""
    return torch.autocast(dev.type, dtype=torch.bfloat16)


def train_vlm(cfg: TrainConfig, out: str | Path, log=print) -> Path:
    check_family(cfg.family)
    dev = training_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    out = Path(out)
    work = out / "work"  # resumable state, not shipped
    work.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    processor = build_processor(cfg.family, tok)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.family, len(tok), rope_theta=cfg.rope_theta)
    grid = grid_of(cfg.family)
    dim = model.config.text_config.hidden_size
    model.to(dev)
    heads = DenseHeads(dim).to(dev)
    aux = nn.Linear(dim, 2).to(dev)
    rel = nn.Linear(dim, 2).to(dev)  # spatial read-out (training only)
    cnt = nn.Linear(dim, 1).to(dev)  # count read-out (training only)
    logf = open(work / "log.jsonl", "a")

    def record(**kw):
        kw["time"] = time.time()
        logf.write(json.dumps(kw) + "\n")
        logf.flush()

    # ---- data pools (rendered once; cached as .npz, not weights): crowded scenes for the vision pretraining,
    # benchmark-distribution scenes for the language model (their last 128 also measure the vision heads)
    def pool(n: int, variant: str, seed0: int) -> tuple[np.ndarray, np.ndarray]:
        path = work / f"pool_{variant}_{n}_{grid}.npz"
        if path.exists():
            z = np.load(path)
            had = int(z["seed0"]) if "seed0" in z else 0  # pools saved before the key existed: seed 0, the default
            if had != seed0:  # the questions are asked of scenes seed0.., which must be the images of this pool
                raise ValueError(
                    f"{path} holds the scenes of --seed {had // 10**7}, but this run asks for --seed {cfg.seed}: "
                    f"train into a new --out, or pass --seed {had // 10**7} to go on with this one"
                )
            return z["images"], z["labels"]
        t0 = time.time()
        images, labels = render_pool(n, grid, seed0=seed0, workers=cfg.threads, variant=variant)
        np.savez(path, images=images, labels=labels, seed0=np.int64(seed0))
        log(f"rendered {n} {variant} scenes in {time.time() - t0:.0f}s")
        return images, labels

    images, labels = pool(cfg.pool, "base", cfg.seed * 10**7)
    seeds = np.arange(cfg.pool) + cfg.seed * 10**7
    held = slice(max(0, cfg.pool - 128), cfg.pool)

    visual = [model.model.vision_tower if cfg.family == "llava" else model.model.visual]
    if cfg.family == "llava":
        visual.append(model.model.multi_modal_projector)
    vis_params = [p for m in visual for p in m.parameters()]
    ckpt = work / "state.safetensors"
    modules = {"model": model, "heads": heads, "aux": aux, "rel": rel, "cnt": cnt}

    # ---- stage 1: dense
    opt1 = torch.optim.AdamW(vis_params + list(heads.parameters()), lr=cfg.dense_lr, weight_decay=0.01)
    meta = {"stage": "dense", "step": 0}
    if ckpt.exists():
        meta = load_state(ckpt, modules, None)
        check_rope_theta(meta, cfg, ckpt)
        log(f"resuming at {meta}")

    def held_accuracy() -> dict[str, float]:
        model.eval()
        with torch.no_grad(), bf16(dev):
            f = image_features(model, pixel_inputs(processor, list(images[held]), cfg.family), cfg.family)
        model.train()
        return heads.accuracy(f, torch.from_numpy(labels[held]).to(dev))

    if meta["stage"] == "dense":
        if meta["step"] > 0:
            meta = load_state(ckpt, modules, opt1)
        d_images, d_labels = pool(cfg.dense_pool, "dense", cfg.seed * 10**7 + 5 * 10**6)
        model.train()
        t0 = time.time()
        for step in range(meta["step"], cfg.dense_steps):
            idx = np.random.default_rng(cfg.seed * 7919 + step).integers(0, len(d_images), cfg.dense_batch)
            pix = pixel_inputs(processor, list(d_images[idx]), cfg.family)
            for g in opt1.param_groups:
                g["lr"] = lr_at(step, cfg.dense_steps, cfg.dense_lr, warmup=50)
            with bf16(dev):
                feats = image_features(model, pix, cfg.family)
                loss, parts = heads.loss(
                    feats, torch.from_numpy(d_labels[idx]).to(dev), grid, cfg.family == "llava", cfg.dense_fg_weight
                )
            opt1.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vis_params, 1.0)
            opt1.step()
            if step % 20 == 0:
                log(f"dense {step}/{cfg.dense_steps} loss {float(loss.detach()):.3f} {parts} {time.time() - t0:.0f}s")
                record(stage="dense", step=step, loss=float(loss.detach()), **parts)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.dense_steps:
                save_state(ckpt, modules, opt1, {"stage": "dense", "step": step + 1, "rope_theta": cfg.rope_theta})
            if (step + 1) % 100 == 0 or step + 1 == cfg.dense_steps:
                acc = held_accuracy()  # per-attribute accuracy on held-out benchmark scenes
                log(f"dense {step + 1} held-out {acc}")
                record(stage="dense_val", step=step + 1, **acc)
        del d_images, d_labels
        model.eval()
        with torch.no_grad(), bf16(dev):
            sample = image_features(model, pixel_inputs(processor, list(images[:256]), cfg.family), cfg.family)
        standardize_projector(model, cfg.family, sample)
        meta = {"stage": "cache", "step": 0, "rope_theta": cfg.rope_theta}
        save_state(ckpt, modules, None, meta)
        # kept beside the rolling checkpoint: copied over a new work dir's state.safetensors (with the pools and
        # feats.safetensors), it starts the LLM stage again from here, e.g. to try other LLM-stage settings
        save_state(work / "after_dense.safetensors", modules, None, meta)
    del opt1

    # ---- stage 2: cache frozen visual tokens
    for p in vis_params:
        p.requires_grad_(False)
    for m in visual:
        m.eval()
    cache_path = work / "feats.safetensors"
    if cache_path.exists():
        from safetensors.torch import load_file

        feats_all = load_file(str(cache_path))["feats"]
    else:
        t0 = time.time()
        chunks = []
        with torch.no_grad(), bf16(dev):
            for i in range(0, cfg.pool, 64):
                pix = pixel_inputs(processor, list(images[i : i + 64]), cfg.family)
                chunks.append(image_features(model, pix, cfg.family).to(torch.bfloat16).cpu())
        feats_all = torch.cat(chunks)
        from safetensors.torch import save_file

        save_file({"feats": feats_all}, str(cache_path))
        log(f"cached visual tokens {tuple(feats_all.shape)} in {time.time() - t0:.0f}s")
    if meta["stage"] == "cache":
        meta = {"stage": "lm", "step": 0}

    # ---- stage 3: language model on multi-turn QA
    lm_params = [p for n, p in model.named_parameters() if p.requires_grad]
    # appended last, in the order they were introduced: older checkpoints keep their optimiser indices
    extra = list(aux.parameters()) + list(rel.parameters()) + list(cnt.parameters())
    opt3 = torch.optim.AdamW(lm_params + extra, lr=cfg.lm_lr, weight_decay=0.01)
    lm_recipe = settings_of(cfg, LM_SETTINGS)
    if meta["stage"] == "lm" and meta["step"] > 0:
        meta = load_state(ckpt, modules, opt3)
        check_settings(meta, lm_recipe, ckpt, LM_BEFORE_RECORDED)
    n_tok = feats_all.shape[1]
    prefix = image_prefix(cfg.family, n_tok)
    use_aux = cfg.family == "qwen2_vl"
    offset = prefix.index(model.config.image_token_id)
    lm_layers = model.model.language_model.layers
    first = 0 if cfg.question_sup > 0 else 1  # layer 0 is captured only for the question loss
    capture = AttentionCapture({i: lm_layers[i].self_attn for i in range(first, len(lm_layers))})
    supervised = cfg.attn_sup > 0 or cfg.question_sup > 0
    model.train()
    for m in visual:
        m.eval()
    t0 = time.time()
    for step in range(meta["step"] if meta["stage"] == "lm" else cfg.lm_steps, cfg.lm_steps):
        r = np.random.default_rng(cfg.seed * 104729 + step)
        idx = r.integers(0, cfg.pool, cfg.lm_batch)
        batch, rows, targets, rel_at, rel_y, cnt_at, cnt_y, q_cols = [], [], [], [], [], [], [], []
        for j, i in enumerate(idx):
            scene, turns = make_turns(int(seeds[i]), cfg.qa_per_image, r)
            rws: list[int] = []
            sts: list[int] = []
            batch.append(build_sequence(prefix, turns, tok, rws, sts))
            rows.append(rws)
            if cfg.question_sup > 0:
                q_cols.append([question_columns(q, a) for (q, _), a in zip(turns, sts, strict=True)])
            for (q, _), row in zip(turns, rws, strict=True):
                t = relation_target(scene, q)
                if t is not None:
                    rel_at.append((j, row))
                    rel_y.append(t)
                c = count_target(scene, q)
                if c is not None:
                    cnt_at.append((j, row))
                    cnt_y.append(c)
            if cfg.attn_sup > 0:
                omap = scene.object_map(grid)
                targets.append([target_columns(scene, q, grid, offset, omap) for q, _ in turns])
        ids, lab, mask = (t.to(dev) for t in pad_batch(batch))
        for g in opt3.param_groups:
            g["lr"] = lr_at(step, cfg.lm_steps, cfg.lm_lr)
        capture.store.clear()
        with bf16(dev), capture if supervised else contextlib.nullcontext():
            logits, (hid, hid_rel) = lm_forward(model, cfg.family, ids, mask, feats_all[idx].to(dev), grid, (1, 3))
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), lab[:, 1:].flatten())
            layer0 = {0: capture.store.pop(0)} if 0 in capture.store else {}
            ground = grounding_loss(capture.store, rows, targets) if cfg.attn_sup > 0 else torch.zeros(())
            q_ground = grounding_loss(layer0, rows, q_cols, spread=True) if cfg.question_sup > 0 else torch.zeros(())
            aux_loss = torch.zeros(())
            if use_aux:
                vis = hid[ids == model.config.image_token_id].view(len(batch), n_tok, -1)
                target = grid_positions(grid).to(dev).expand(len(batch), -1, -1)
                aux_loss = 20 * nn.functional.mse_loss(aux(vis).float(), target)
            rel_loss = torch.zeros(())
            if cfg.rel_sup > 0 and rel_at:  # the answer row must hold where A is relative to B
                at = torch.tensor(rel_at, device=dev)
                pred = rel(hid_rel[at[:, 0], at[:, 1]]).float()
                rel_loss = 10 * nn.functional.mse_loss(pred, torch.tensor(rel_y, dtype=torch.float32, device=dev))
            cnt_loss = torch.zeros(())
            if cfg.count_sup > 0 and cnt_at:  # ... and how many objects the question counts
                at = torch.tensor(cnt_at, device=dev)
                pred = cnt(hid_rel[at[:, 0], at[:, 1]]).float()[:, 0]
                cnt_loss = 10 * nn.functional.mse_loss(pred, torch.tensor(cnt_y, dtype=torch.float32, device=dev))
        opt3.zero_grad(set_to_none=True)
        total = (
            loss + aux_loss + cfg.attn_sup * ground + cfg.question_sup * q_ground
            + cfg.rel_sup * rel_loss + cfg.count_sup * cnt_loss
        )  # fmt: skip
        total.backward()
        torch.nn.utils.clip_grad_norm_(lm_params, 1.0)
        opt3.step()
        if step % 20 == 0:
            parts = {
                "loss": loss, "aux": aux_loss, "ground": ground, "qground": q_ground, "rel": rel_loss,
                "count": cnt_loss,
            }  # fmt: skip
            parts = {k: float(v.detach()) for k, v in parts.items()}
            shown = " ".join(f"{k} {v:.3f}" for k, v in parts.items())
            log(f"lm {step}/{cfg.lm_steps} {shown} {time.time() - t0:.0f}s")
            record(stage="lm", step=step, **parts)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.lm_steps:
            state_meta = {"stage": "lm", "step": step + 1, "rope_theta": cfg.rope_theta, "settings": lm_recipe}
            save_state(ckpt, modules, opt3, state_meta)
        if (step + 1) % 500 == 0 or step + 1 == cfg.lm_steps:
            acc = quick_val(model, processor, cfg, tok)
            log(f"val {step + 1}: {acc}")
            record(stage="val", step=step + 1, **acc)
            model.train()
            for m in visual:
                m.eval()
    return save_model(model, processor, cfg, out, log)


def save_model(model, processor, cfg: Any, out: Path, log=print) -> Path:
    """`save_pretrained` of model and processor with the tiny word tokenizer's special ids, and `cfg` (a training
    config dataclass) as training.json."""
    model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = 1
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(asdict(cfg), indent=1))
    log(f"saved {out}")
    return out


def export_checkpoint(cfg: TrainConfig, out: str | Path, log=print) -> Path:
    """Save the model of the last checkpoint in `out/work/` (e.g. of a run stopped before its last step) with
    `save_pretrained`, as the end of training does."""
    out = Path(out)
    ckpt = out / "work" / "state.safetensors"
    if not ckpt.exists():
        raise FileNotFoundError(f"no checkpoint at {ckpt}; train first: vtc train vlm {cfg.family} --out {out}")
    tok = build_tokenizer()
    model = build_model(cfg.family, len(tok), rope_theta=cfg.rope_theta)
    dim = model.config.text_config.hidden_size
    meta = load_state(ckpt, {"model": model, "heads": DenseHeads(dim), "aux": nn.Linear(dim, 2)}, None)
    check_rope_theta(meta, cfg, ckpt)
    log(f"exporting {meta}")
    return save_model(model, build_processor(cfg.family, tok), cfg, out, log)


@torch.no_grad()
def quick_val(model, processor, cfg: TrainConfig, tok) -> dict[str, float]:
    """Greedy-equivalent (teacher-forced exact match) accuracy per question type on the vtc-shapes val split."""
    model.eval()
    bench = S.ShapesBenchmark(split="val", per_type=cfg.val_per_type)
    grid = grid_of(cfg.family)
    dev = model.lm_head.weight.device
    hits: dict[str, list[bool]] = {}
    for i in range(0, len(bench), 32):
        samples = [bench[j] for j in range(i, min(i + 32, len(bench)))]
        pix = pixel_inputs(processor, [np.asarray(s.images[0]) for s in samples], cfg.family)
        with bf16(dev):
            feats = image_features(model, pix, cfg.family)
        prefix = image_prefix(cfg.family, feats.shape[1])
        seqs = [build_sequence(prefix, [(s.question, s.answer)], tok) for s in samples]
        ids, lab, mask = (t.to(dev) for t in pad_batch(seqs))
        with bf16(dev):
            logits, _ = lm_forward(model, cfg.family, ids, mask, feats, grid, None)
        pred = logits[:, :-1].argmax(-1)
        ok = ((pred == lab[:, 1:]) | (lab[:, 1:] == -100)).all(1)
        for s, o in zip(samples, ok.tolist(), strict=True):
            hits.setdefault(s.qtype, []).append(o)
    res = {t: round(sum(v) / len(v), 3) for t, v in hits.items()}
    res["all"] = round(sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values()), 3)
    return res


# ---------------------------------------------------------------------- CLI
def add_config_args(p: argparse.ArgumentParser, cfg_cls: type, skip: str) -> None:
    """One `--field-name` option per field of the config dataclass `cfg_cls` (its default and type), except `skip`."""
    for f in fields(cfg_cls):
        if f.name != skip:
            v = f.default
            per = " (default: per family, FAMILY_DEFAULTS)" if v is None else ""
            kind = type(FAMILY_DEFAULTS[FAMILIES[0]][f.name]) if v is None else type(v)
            p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=v, help=per)


def config_from_args(cfg_cls: type, args: argparse.Namespace) -> Any:
    return cfg_cls(**{f.name: getattr(args, f.name) for f in fields(cfg_cls) if hasattr(args, f.name)})


def add_parser(sub) -> None:
    p = sub.add_parser("vlm", help="train a tiny VLM (llava or qwen2_vl) on vtc-shapes")
    p.add_argument("family", choices=FAMILIES)
    p.add_argument("--out", required=True, help="output folder (from_pretrained-loadable); resumes if present")
    p.add_argument("--export", action="store_true", help="only save the model of the last checkpoint in OUT/work")
    add_config_args(p, TrainConfig, skip="family")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    cfg = config_from_args(TrainConfig, args)  # `family` is the positional argument of the same name
    if args.export:
        export_checkpoint(cfg, args.out)
    else:
        train_vlm(cfg, args.out)
