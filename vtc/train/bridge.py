"""Train a tiny VLM whose visual input is a 1-D tokenizer's tokens (the tokenizer → VLM bridge of issue 5).

    vtc train bridge flextok --tokenizer-path assets/tokenizers/flextok_shapes --vision-steps 8000 \
        --out assets/tiny-flextok-llava-shapes
    vtc train bridge one_d_piece --tokenizer-path assets/tokenizers/one_d_piece_shapes --vision-steps 8000 \
        --out assets/tiny-one-d-piece-llava-shapes
    vtc train bridge karl --error 0.08 --vision-steps 4000 --out assets/tiny-karl-llava-shapes

The model is a stock `LlavaForConditionalGeneration`: the frozen, trained tokenizer (`assets/tokenizers/NAME`) is
its vision tower (`vtc.tokenizers.tower.TokenizerTower`, giving the K latent tokens of the image at its size), then
the LLaVA MLP projector and the same Llama LM as `vtc train vlm llava`. The projector and LM learn from
multi-turn vtc-shapes QA on **random prefix lengths** (as TokenFLEX, arXiv 2504.03154, and MQT-LLaVA, arXiv
2405.19315, train for a variable number of visual tokens): each training image keeps its first k tokens, k uniform in
1..K, or all K with probability `full_prob`. The `prefix` reducer then truncates the sequence at evaluation, and
KARL's tower reports the length it picks per image for `--error`.

Grounding (`attn_sup`, default 1): the latent tokens are global, so which tokens carry an object is measured, not
given: `token_attribution` replaces one token at a time by the neutral code and records how much each object's
pixels change in the reconstruction; an object's targets are the fewest kept tokens holding half of that change
(mostly one or two tokens per object on the 96-px FlexTok below). Heads 0 (and 1, for spatial questions' second
object) of layers 1.. must attend from each answer row to them, as `vtc train vlm` grounds on object cells;
`question_sup` is `vtc train vlm`'s layer-0 question loss.

The projector (`proj_rms`, default 4): a fresh LM stage starts from `init_projector` (standardised latents, tokens
of RMS 4 per dimension), not from transformers' init (std 0.02, tokens of norm ~0.1): from that init the LM never
learnt to read its visual tokens, not even one-hot oracle ones on which its grounding heads already attended to the
right token (README). `vtc train vlm` does not need this: its dense stage trains the projector.

Measured (README, one run each, 600 test questions): the shipped bridges (the commands above, 3 000 LM steps from
`init_projector`) answer 0.892 (FlexTok), 0.910 (One-D-Piece) and 0.648 (KARL at 32 px) with all 32 tokens; the
first 8 tokens of FlexTok 0.795 and of One-D-Piece 0.787, against 0.767 / 0.782 for DivPrune's 8 and 0.720 / 0.590
for 8 random ones. Vision-stage latents whose LM stage started from transformers' projector init scored 0.308 (the
same latents from `init_projector`: 0.873), and earlier bridges without a vision stage 0.31-0.39.

Fine-tuning the tokenizer (`tower_lr` > 0): the QA loss also trains the tokenizer's encoder (the parameters on the
path to the latents; decoder, quantizer and KARL's halting head get no gradient), as LLaVA-style recipes unfreeze
the vision tower. The saved tower is then that tuned encoder, so its latents no longer match the decoder's training.
With `tower_lr` = 0 the tokenizer stays exactly as trained.

Vision stage (`vision_steps` > 0, before the LM stage; `vtc train vlm`'s dense stage for a 1-D tokenizer): the
encoder alone learns what the questions ask about. Object heads read each object's colour and shape and each letter
tag's letter from a random prefix of the latents (a query built from its centre, `ObjectHeads`), and per-patch
heads (`patch_sup`) read each cell's from the patch states the latents attend to in the encoder's last block, on
crowded "dense"-variant scenes. The LM stage then caches the latents of that tuned encoder, and its grounding
targets come from where the object heads read each object (`ObjectHeads.attribution`, the same fewest-tokens rule):
the decoder-ablation attribution would ask a decoder that never saw the tuned latents. The pixel loss of the
tokenizers' own training keeps colour and place but not shape (a blob of the right colour), and nearly every
question names a shape: this stage is what puts the shapes into the tokens.

Pinned choices: the LM sees the encoder's continuous latent tokens (what the quantizer rounds; see
`vtc.tokenizers.tower`); with a frozen tower the latents of the training pool are computed once; for KARL they
are computed with the error condition used at evaluation, so training and evaluation see the same latents.
Checkpoints are safetensors and a killed run resumes where it stopped, with the settings it started with (a run
asking for other ones is refused).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from vtc.eval.benchmarks import shapes as S
from vtc.tokenizers.base import ASSETS_DIR, TokenizedImages
from vtc.train import vlm


@dataclass
class BridgeConfig:
    tokenizer: str = "flextok"
    tokenizer_path: str = ""  # a saved tokenizer folder; "" = assets/tokenizers/<tokenizer>
    error: float = 0.0  # adaptive tokenizers (KARL): requested mean L1 error per pixel; 0 = keep all K
    pool: int = 8000  # training scenes (rendered once, cached)
    steps: int = 3000
    batch: int = 16
    qa_per_image: int = 20
    lr: float = 2e-3
    full_prob: float = 0.25  # share of training images that keep all K tokens
    attn_sup: float = 1.0  # grounding loss weight: heads 0 (and 1) of layers 1.. attend to the asked objects' tokens
    question_sup: float = 1.0  # weight of the layer-0 question loss (`vtc train vlm`'s question_sup)
    tower_lr: float = 0.0  # 0: frozen tokenizer (cached latents); > 0: its encoder is fine-tuned at this peak lr
    obj_sup: float = 0.0  # weight of the object heads' loss (colour, shape, letter read from the kept latents)
    vision_steps: int = 0  # steps of the vision stage (encoder + object and patch heads, no LM) before the LM stage
    vision_pool: int = 8000  # crowded "dense"-variant scenes for the vision stage (rendered once, cached)
    vision_batch: int = 32
    vision_lr: float = 1e-3
    patch_sup: float = 1.0  # vision stage: weight of the per-patch heads on the encoder's patch states
    halt_keep: float = 1.0  # vision stage, adaptive towers (KARL): weight of the loss keeping the halting as trained
    slot_sup: float = 0.0  # vision stage: weight of the object-slot loss (`SlotHeads`: one object per token)
    proj_rms: float = 4.0  # LM stage start: projected tokens' RMS per dimension (`init_projector`); 0: transformers'
    seed: int = 0
    threads: int = 1
    checkpoint_every: int = 100
    val_every: int = 500
    val_per_type: int = 40


BRIDGE_SETTINGS = (
    "pool", "steps", "batch", "qa_per_image", "lr", "full_prob", "attn_sup", "question_sup", "tower_lr", "obj_sup",
    "seed", "vision_steps", "vision_pool", "vision_batch", "vision_lr", "patch_sup", "halt_keep",
    "slot_sup", "proj_rms"
)  # fmt: skip


def build_bridge(cfg: BridgeConfig):
    """(model, processor, word tokenizer): the trained tokenizer as tower, random projector and LM."""
    from transformers import (
        CLIPImageProcessor,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from vtc.tokenizers import create_tokenizer
    from vtc.tokenizers.tower import TokenizerTowerConfig, bridge_processor_kwargs, load_tokenizer_into

    path = cfg.tokenizer_path or str(ASSETS_DIR / cfg.tokenizer)
    trained = create_tokenizer(cfg.tokenizer, pretrained=path)
    tower_cfg = TokenizerTowerConfig(cfg.tokenizer, trained.config.to_dict(), error=cfg.error or None)
    tok = vlm.build_tokenizer()
    mcfg = LlavaConfig(
        vision_config=tower_cfg, text_config=LlamaConfig(**vlm.text_config_kwargs(len(tok))),
        image_token_id=vlm.SPECIAL.index("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", projector_hidden_act="gelu",
    )  # fmt: skip
    model = LlavaForConditionalGeneration(mcfg)
    load_tokenizer_into(model.model.vision_tower, trained)
    side = tower_cfg.image_size
    ip = CLIPImageProcessor(size={"height": side, "width": side}, do_center_crop=False, do_normalize=False)
    kw = bridge_processor_kwargs(tower_cfg)
    processor = LlavaProcessor(image_processor=ip, tokenizer=tok, chat_template=vlm.CHAT_TEMPLATE["llava"], **kw)
    return model, processor, tok


@torch.no_grad()
def tower_latents(model, processor, images: np.ndarray, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Latent tokens `[n, K, width]` and lengths `[n]` (K when not adaptive) of uint8 images `[n, H, W, 3]`."""
    tower = model.model.vision_tower.eval()
    latents, lengths = [], []
    for i in range(0, len(images), chunk):
        pix = processor.image_processor(images=list(images[i : i + chunk]), return_tensors="pt")["pixel_values"]
        out = tower(pix)
        latents.append(out.last_hidden_state.float())
        k = out.last_hidden_state.shape[1]
        lengths.append(out.lengths if out.lengths is not None else torch.full((len(pix),), k))
    return torch.cat(latents), torch.cat(lengths).long()


def tower_pixels(processor, images: np.ndarray, chunk: int = 256) -> Tensor:
    """The tower's input `[n, 3, S, S]` uint8 (the processor's [0, 1] pixels x 255, rounded) of uint8 images."""
    out = []
    for i in range(0, len(images), chunk):
        pix = processor.image_processor(images=list(images[i : i + chunk]), return_tensors="pt")["pixel_values"]
        out.append((pix.float().clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(out)


SLOTS = 8  # attribution slots per scene: up to 6 objects (base variant) and the letter tag, by pixel-map id - 1


@torch.no_grad()
def token_attribution(tokenizer, images: Tensor, pixel_ids: Tensor, slots: int = SLOTS) -> Tensor:
    """`[B, K, slots]`: how much each token draws each object. Entry (b, j, m) is the mean squared change, over the
    pixels of object m (`pixel_ids [B, S, S]` = m + 1 there, 0 on the background), of image b's reconstruction from
    all K tokens when token j alone is replaced by the neutral code (the codebook entry nearest zero).

    The latent tokens are global: no token is tied to a place, so this ablation is what says which tokens carry an
    object (the LM's grounding targets; for the ViT towers they are the object's cells)."""
    t = tokenizer.encode(images)
    q = tokenizer.quantizer
    neutral = int(q.ids_to_codes(torch.arange(q.codebook_size)).float().norm(dim=-1).argmin())

    def decode(ids: Tensor) -> Tensor:
        extra = {"generator": torch.Generator().manual_seed(0)} if tokenizer.name == "flextok" else {}
        return tokenizer.decode(TokenizedImages(ids, t.mask), **extra)

    base = decode(t.ids)
    own = nn.functional.one_hot(pixel_ids.long(), slots + 1)[..., 1:].float()  # [B, S, S, slots]
    area = own.sum((1, 2)).clamp_min(1)  # [B, slots]
    out = torch.zeros(images.shape[0], t.ids.shape[1], slots)
    for j in range(t.ids.shape[1]):
        ids = t.ids.clone()
        ids[:, j] = neutral
        change = (decode(ids) - base).pow(2).sum(1)  # [B, S, S]
        out[:, j] = torch.einsum("bhw,bhwm->bm", change, own) / area
    return out


def grounding_tokens(effect: Tensor, k: int, share: float = 0.5) -> list[int]:
    """The fewest of the first `k` tokens whose ablation effects on an object (`effect [K]`) add up to `share` of
    its effect over those k (largest first); none for an object no kept token draws."""
    e = effect[:k].float()
    if float(e.sum()) <= 0:
        return []
    order = torch.argsort(e, descending=True)
    need = int((torch.cumsum(e[order], 0) < share * e.sum()).sum()) + 1
    return sorted(order[:need].tolist())


def question_tokens(scene: S.Scene, question: str, attribution: Tensor, k: int) -> list[list[int]]:
    """Per supervised head, the sequence columns (token j at 1 + j, after <s>) of the kept tokens that carry the
    objects `question` is about: head 0 all of them, or for spatial questions head 0 object A's and head 1 object
    B's (as `vtc train vlm` grounds on object cells). `attribution [K, slots]` is `token_attribution` of the scene."""
    return [sorted({1 + j for i in g if i < attribution.shape[1] for j in grounding_tokens(attribution[:, i], k)})
            for g in vlm.head_objects(scene, question)]  # fmt: skip


def attribution_pool(model, processor, images: np.ndarray, seeds: np.ndarray, chunk: int = 128) -> Tensor:
    """`token_attribution` `[n, K, SLOTS]` of the pool's scenes as the tower sees them (the processor's pixels)."""
    import cv2

    tokenizer = model.model.vision_tower.tokenizer.eval()
    side = tokenizer.config.image_size
    out = []
    for i in range(0, len(images), chunk):
        pix = processor.image_processor(images=list(images[i : i + chunk]), return_tensors="pt")["pixel_values"]
        maps = [cv2.resize(S.make_scene(int(sd)).pixel_map(), (side, side), interpolation=cv2.INTER_NEAREST)
                for sd in seeds[i : i + chunk]]  # fmt: skip
        out.append(token_attribution(tokenizer, pix.float().clamp(0, 1), torch.from_numpy(np.stack(maps))))
    return torch.cat(out)


@torch.no_grad()
def init_projector(projector, latents: Tensor, rms: float, seed: int = 0) -> None:
    """Start the LLaVA projector `latents [..., w] -> [..., D]` where the LM can read its tokens: the latents
    standardised per dimension (folded into `linear_1`), Gaussian fan-in weights, zero biases, and `linear_2` scaled
    so the projected tokens have root-mean-square `rms` per dimension on `latents`.

    transformers initialises the projector like the LM (std 0.02), so projected tokens start at norm ~0.1 (word
    embeddings: ~0.2). From there the bridge's LM did not learn to read its tokens, not even one-hot oracle tokens on
    which its grounding heads already attended to the asked object; with the projector's weights scaled up it did
    (README; how the small scale blocks it was not pinned down). `vtc train vlm` never meets this: its dense stage
    trains the projector, to tokens of norm ~9. The statistics come from up to 16 384 of the latent tokens."""
    x = latents.reshape(-1, latents.shape[-1]).float()  # [n*K, w]
    g = torch.Generator().manual_seed(seed)
    x = x[torch.randperm(len(x), generator=g)[:16384]]
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)  # [w]
    l1, l2 = projector.linear_1, projector.linear_2
    w1 = torch.randn(l1.weight.shape, generator=g) / l1.in_features**0.5 / sd  # [D, w]
    l1.weight.copy_(w1)
    l1.bias.copy_(-(w1 @ mu))
    l2.weight.copy_(torch.randn(l2.weight.shape, generator=g) / l2.in_features**0.5)
    l2.bias.zero_()
    l2.weight.mul_(rms / projector(x.to(l1.weight.dtype)).float().pow(2).mean().sqrt())


def prefix_batch(
    model,
    tok,
    latents: Tensor,
    ks: list[int],
    turns: list[list[tuple[str, str]]],
    rows: list | None = None,
    starts: list | None = None,
):
    """ids, labels, mask, position ids `[B, L]` and the projected visual tokens `[sum(ks), D]` (placeholder order);
    `rows` / `starts`, if given, receive per sample the positions of the tokens that predict its answers / of its
    questions' first tokens.

    Positions are those `vtc.compress` gives a truncated sequence by default (`positions="original"`): the text
    after a k-token prefix sits where it would after all K tokens, so training and evaluation agree."""
    n_tok = latents.shape[1]
    seqs = []
    for k, t in zip(ks, turns, strict=True):
        r: list[int] = []
        st: list[int] = []
        seqs.append(vlm.build_sequence(vlm.image_prefix("llava", k), t, tok, r, st))
        if rows is not None:
            rows.append(r)
        if starts is not None:
            starts.append(st)
    ids, lab, mask = vlm.pad_batch(seqs)
    pos = torch.arange(ids.shape[1]).repeat(len(seqs), 1)
    for j, k in enumerate(ks):
        pos[j, 1 + k :] += n_tok - k  # bos, k image tokens, then the text at its full-length position
    proj = model.model.multi_modal_projector(latents)  # [B, K, D]
    feats = torch.cat([proj[j, :k] for j, k in enumerate(ks)])  # [sum ks, D]
    return ids, lab, mask, pos, feats


def qa_losses(
    model, tok, capture, latents: Tensor, ks: list[int], turns: list, targets: list | None, question_sup: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The LM stage's losses on `latents [B, K, w]` cut to `ks` with `turns`, inside an active `capture`
    (`vlm.AttentionCapture` of layer 0 and the grounded layers): answer cross-entropy; the layer-0 question loss
    (`question_sup`: head 0 reads the words that pick the objects, as `vtc train vlm`); and the grounding loss
    (`targets`, `question_tokens` per turn: the answer rows attend to the asked objects' tokens). Off: zero."""
    rows: list[list[int]] = []
    starts: list[list[int]] = []
    ids, lab, mask, pos, feats = prefix_batch(model, tok, latents, ks, turns, rows, starts)
    logits, _ = vlm.lm_forward(model, "llava", ids, mask, feats, 0, None, pos)
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), lab[:, 1:].flatten())
    layer0 = {0: capture.store.pop(0)} if 0 in capture.store else {}
    q_ground = torch.zeros(())
    if question_sup:
        q_cols = [
            [vlm.question_columns(q, a) for (q, _), a in zip(t, st, strict=True)]
            for t, st in zip(turns, starts, strict=True)
        ]
        q_ground = vlm.grounding_loss(layer0, rows, q_cols, spread=True)
    ground = vlm.grounding_loss(capture.store, rows, targets) if targets is not None else torch.zeros(())
    return loss, q_ground, ground


class ObjectHeads(nn.Module):
    """What is at (x, y)? One query per object (or letter tag), made from its centre, attends over the kept latent
    tokens `[B, K, width]`; linear read-outs give its colour and shape (objects) or its letter (tags).

    The bridge's counterpart of `vtc train vlm`'s dense heads, which read each ViT cell's colour, shape and letter:
    latent tokens have no cells, so the object's place is the query instead. A training head, never saved with the
    model; with `tower_lr` it teaches the tuned encoder to keep what the pixel loss left out (the shapes)."""

    FREQS = 8

    def __init__(self, width: int, heads: int = 4) -> None:
        super().__init__()
        self.query = nn.Sequential(nn.Linear(4 * self.FREQS + 2, width), nn.GELU(), nn.Linear(width, width))
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.colour = nn.Linear(width, len(S.COLOURS))
        self.shape = nn.Linear(width, len(S.SHAPES))
        self.letter = nn.Linear(width, len(S.LETTERS))

    def embed(self, xy: Tensor, is_tag: Tensor) -> Tensor:
        """`xy [B, M, 2]` centres in [0, 1], `is_tag [B, M]` -> queries `[B, M, width]`."""
        f = 2 ** torch.arange(self.FREQS, dtype=xy.dtype, device=xy.device) * torch.pi  # [F]
        ang = xy[..., None] * f  # [B, M, 2, F]
        four = torch.cat([ang.sin(), ang.cos()], -1).flatten(-2)  # [B, M, 4F]
        return self.query(torch.cat([four, is_tag[..., None].to(xy.dtype), 1 - is_tag[..., None].to(xy.dtype)], -1))

    @staticmethod
    def labels(scenes: list[S.Scene]) -> Tensor:
        """`[B, M, 5]` `object_labels` of each scene (x, y, is_tag, class, valid), padded with -1 rows."""
        objs = [object_labels(sc) for sc in scenes]
        lab = torch.full((len(scenes), max(1, max(len(o) for o in objs)), 5), -1.0)
        for i, o in enumerate(objs):
            if o:
                lab[i, : len(o)] = torch.tensor(o)
        return lab

    def attend(self, latents: Tensor, ks: list[int], lab: Tensor, weights: bool = False) -> tuple[Tensor, Tensor]:
        """Each object's (or tag's) query over the first `ks[b]` latents: states `[B, M, width]` and, with
        `weights`, the attention `[B, M, K]` (mean over heads; the dropped tail gets 0)."""
        n = latents.shape[1]
        kv = self.norm(latents)
        pad = torch.arange(n)[None] >= torch.tensor(ks)[:, None]  # [B, K]: dropped tail
        q = self.embed(lab[..., :2].clamp(0, 1).to(kv.dtype), lab[..., 2].clamp(0, 1))
        return self.attn(q, kv, kv, key_padding_mask=pad, need_weights=weights)  # [B, M, width], [B, M, K]

    @torch.no_grad()
    def attribution(self, latents: Tensor, scenes: list[S.Scene], slots: int = SLOTS) -> Tensor:
        """`[B, K, slots]` as `token_attribution`, from where the heads read each object: entry (b, j, m) is the
        attention of object m's query (slot = pixel-map id - 1: the objects, then the letter tag) on token j."""
        lab = self.labels(scenes)
        _, att = self.attend(latents, [latents.shape[1]] * len(scenes), lab, weights=True)
        out = torch.zeros(latents.shape[0], latents.shape[1], slots)
        for b, sc in enumerate(scenes):
            m = min(slots, len(sc.objects) + len(sc.tags()))
            out[b, :, :m] = att[b, :m].float().T
        return out

    def read(self, latents: Tensor, ks: list[int], scenes: list[S.Scene]) -> list[tuple[Tensor, Tensor]]:
        """(logits `[M, C]`, targets `[M]`) of the colour, shape and letter read-outs over every object (colour,
        shape) and letter tag (letter) of `scenes`, each read from the first `ks[b]` latent tokens of image b."""
        lab = self.labels(scenes)
        h, _ = self.attend(latents, ks, lab)
        h = h.float()
        valid, tag, cls = lab[..., 4] > 0, lab[..., 2] > 0, lab[..., 3].long()
        return [
            (self.colour(h[valid & ~tag]), (cls // len(S.SHAPES))[valid & ~tag]),
            (self.shape(h[valid & ~tag]), (cls % len(S.SHAPES))[valid & ~tag]),
            (self.letter(h[valid & tag]), cls[valid & tag]),
        ]

    def loss(self, latents: Tensor, ks: list[int], scenes: list[S.Scene]) -> Tensor:
        """Mean cross-entropy of every object's colour and shape and every tag's letter (`read`)."""
        terms = [nn.functional.cross_entropy(x, y) for x, y in self.read(latents, ks, scenes) if len(y)]
        return torch.stack(terms).mean() if terms else latents.sum() * 0

    @torch.no_grad()
    def accuracy(self, latents: Tensor, ks: list[int], scenes: list[S.Scene]) -> dict[str, float]:
        """Share of objects whose colour / shape, and of tags whose letter, the read-outs get right."""
        out = {}
        for name, (x, y) in zip(("colour", "shape", "letter"), self.read(latents, ks, scenes), strict=True):
            if len(y):
                out[name] = round(float((x.argmax(-1) == y).float().mean()), 3)
        return out


class SlotHeads(nn.Module):
    """Object slots: every kept latent token `[B, K, width]` names one object (its colour and shape, or a tag's
    letter) and its centre, or "nothing", by linear read-outs; objects are matched one-to-one to the first `ks[b]`
    tokens of image b by the Hungarian algorithm on the read-out's cost (DETR's set prediction, arXiv 2005.12872).

    Where `ObjectHeads` finds an object by its place, this makes each object's content sit in one token, as in a ViT
    cell, so that a language model can find it by what the question names."""

    NONE_WEIGHT = 0.1  # weight of the "nothing" class on unmatched tokens (DETR's eos_coef)

    def __init__(self, width: int) -> None:
        super().__init__()
        self.classes = len(S.COLOURS) * len(S.SHAPES) + len(S.LETTERS)  # objects, then letters; then "nothing"
        self.cls = nn.Linear(width, self.classes + 1)
        self.xy = nn.Linear(width, 2)

    def targets(self, scene: S.Scene) -> tuple[Tensor, Tensor]:
        """Class `[M]` (objects: colour * #shapes + shape; tags: objects' classes + letter) and centre `[M, 2]`."""
        rows = object_labels(scene)
        cls = [int(c) + (len(S.COLOURS) * len(S.SHAPES) if tag else 0) for _, _, tag, c, _ in rows]
        return torch.tensor(cls, dtype=torch.long), torch.tensor([r[:2] for r in rows]).reshape(-1, 2)

    @staticmethod
    def match(cost: Tensor) -> tuple[list[int], list[int]]:
        """Minimum-cost one-to-one matching of a `[tokens, objects]` cost: (token rows, object columns)."""
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(cost.detach().float().numpy())
        return rows.tolist(), cols.tolist()

    def predict(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        """Class log-probabilities `[B, K, C + 1]` and centres `[B, K, 2]` in [0, 1] of every token."""
        return self.cls(latents).float().log_softmax(-1), self.xy(latents).float().sigmoid()

    @staticmethod
    def cost(logp: Tensor, xy: Tensor, cls: Tensor, cen: Tensor) -> Tensor:
        """Matching cost `[k, M]` of k tokens (`logp [k, C + 1]`, `xy [k, 2]`) against M objects."""
        return -logp[:, cls] + 5 * (xy[:, None] - cen[None]).abs().sum(-1)

    def loss(self, latents: Tensor, ks: list[int], scenes: list[S.Scene]) -> Tensor:
        logp, xy = self.predict(latents)
        terms = []
        for b, (k, sc) in enumerate(zip(ks, scenes, strict=True)):
            cls, cen = self.targets(sc)
            target = torch.full((k,), self.classes, dtype=torch.long)  # "nothing" unless matched
            weight = torch.full((k,), self.NONE_WEIGHT)
            box = torch.zeros(())
            if len(cls):
                rows, cols = self.match(self.cost(logp[b, :k], xy[b, :k], cls, cen))
                target[rows], weight[rows] = cls[cols], 1.0
                box = (xy[b, rows] - cen[cols]).abs().sum(-1).sum()
            ce = nn.functional.nll_loss(logp[b, :k], target, reduction="none")
            terms.append(((ce * weight).sum() + 5 * box) / weight.sum())
        return torch.stack(terms).mean()

    @torch.no_grad()
    def accuracy(self, latents: Tensor, ks: list[int], scenes: list[S.Scene]) -> float:
        """Share of objects and tags whose matched token names their class."""
        logp, xy = self.predict(latents)
        hits, total = 0, 0
        for b, (k, sc) in enumerate(zip(ks, scenes, strict=True)):
            cls, cen = self.targets(sc)
            if len(cls):
                rows, cols = self.match(self.cost(logp[b, :k], xy[b, :k], cls, cen))
                hits += int((logp[b, rows].argmax(-1) == cls[cols]).sum())
                total += len(cls)
        return round(hits / max(total, 1), 3)


def object_labels(scene: S.Scene) -> list[tuple[float, float, float, float, float]]:
    """(x, y, is_tag, class, 1) per object (class = colour * #shapes + shape) and letter tag (class = letter), the
    centre as a fraction of the image side."""
    colours = list(S.COLOURS)
    out = [(o.cx / scene.size, o.cy / scene.size, 0.0, float(colours.index(o.colour) * len(S.SHAPES)
            + S.SHAPES.index(o.shape)), 1.0) for o in scene.objects]  # fmt: skip
    for letter, (x0, y0, x1, y1) in scene.tags():
        cx, cy = (x0 + x1) / 2 / scene.size, (y0 + y1) / 2 / scene.size
        out.append((cx, cy, 1.0, float(S.LETTERS.index(letter)), 1.0))
    return out


def train_mode(model) -> None:
    """Projector and LM in training mode, the tokenizer tower never: a VQ quantizer in training mode re-seeds
    unused codes (`restart_after`), which would rewrite the codebook of a tower being fine-tuned (`tower_lr`)."""
    model.train()
    model.model.vision_tower.eval()


class PatchCapture:
    """Within the block: the patch states `[B, N, width]` the latents read in the tokenizer encoder's last block
    (that block's input), where the vision stage's per-patch heads supervise them."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.states: Tensor | None = None

    def __enter__(self) -> PatchCapture:
        self.handle = self.encoder.blocks[-1].register_forward_pre_hook(self._hook)
        return self

    def _hook(self, module, args) -> None:
        self.states = args[0]  # [B, P + N + n, width]: prefix (KARL's error token), patches, latents

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def patches(self, num_latents: int) -> Tensor:
        n = self.encoder.num_patches
        p = self.states.shape[1] - n - num_latents
        return self.states[:, p : p + n]


def binary_kl(p: Tensor, q: Tensor, eps: float = 1e-6) -> Tensor:
    """Mean KL(Bernoulli(p) || Bernoulli(q)) over the elements of `p`, `q` (probabilities, same shape)."""
    p, q = p.clamp(eps, 1 - eps), q.clamp(eps, 1 - eps)
    return (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).mean()


VISION_VAL = 256  # held-out benchmark-variant scenes for the vision stage's read-out accuracy


def vision_pool(cfg: BridgeConfig, processor, grid: int, work: Path, log=print) -> dict[str, Tensor]:
    """The vision stage's scenes, rendered once and cached: `pixels [n, 3, S, S]` uint8 (the tower's input),
    `labels [n, 4, G, G]` (`vtc train vlm`'s per-cell maps), `seeds [n]`; `val_*` alike for `VISION_VAL`
    benchmark-variant scenes."""
    from safetensors.torch import load_file, save_file

    path = work / "vision_pool.safetensors"
    if path.exists():
        return load_file(str(path))
    t0 = time.time()
    seed0 = cfg.seed * 10**7 + 4 * 10**6  # disjoint from the LM stage's pool and from every benchmark split
    z = {}
    for key, n, s0, variant in (
        ("", cfg.vision_pool, seed0, "dense"),
        ("val_", VISION_VAL, seed0 + 9 * 10**5, "base"),
    ):
        images, labels = vlm.render_pool(n, grid, seed0=s0, workers=cfg.threads, variant=variant)
        z[key + "pixels"] = tower_pixels(processor, images)
        z[key + "labels"] = torch.from_numpy(labels)
        z[key + "seeds"] = torch.arange(n, dtype=torch.int64) + s0
    save_file(z, str(path))
    log(f"vision pool: {cfg.vision_pool} dense scenes + {VISION_VAL} held-out in {time.time() - t0:.0f}s")
    return z


def vision_stage(model, processor, heads: ObjectHeads, cfg: BridgeConfig, ckpt: Path, settings: dict, log, record):
    """Stage 1 (`vision_steps` > 0): the tokenizer's encoder learns what the questions ask about before any LM
    sees it. Object heads (`ObjectHeads`) read each object's colour and shape and each tag's letter from a random
    prefix of the latents, and per-patch heads (`vtc train vlm`'s `DenseHeads`, weight `patch_sup`) read each
    cell's from the patch states the latents attend to, on crowded "dense"-variant scenes (as `vtc train vlm`'s
    dense stage). Decoder and quantizer never move (`train_mode`: no VQ code is re-seeded).

    An adaptive tower (KARL with `error`) picks each image's length with a halting head that reads the latents;
    `halt_keep` weighs the mean binary KL divergence from the tokenizer as trained (a frozen copy) to the tuned
    tower's halting probabilities (encoder and halting head both learn it), so the lengths stay the ones KARL's
    training taught."""
    tower = model.model.vision_tower
    enc = tower.tokenizer.encoder
    grid = int(round(enc.num_patches**0.5))
    patch_heads = vlm.DenseHeads(enc.ln_post.normalized_shape[0])
    z = vision_pool(cfg, processor, grid, ckpt.parent, log)
    scenes = [S.make_scene(int(sd), "dense") for sd in z["seeds"]]
    val_scenes = [S.make_scene(int(sd)) for sd in z["val_seeds"]]
    slots = SlotHeads(enc.ln_post.normalized_shape[0])
    params = [*tower.parameters(), *heads.parameters(), *patch_heads.parameters(), *slots.parameters()]
    keep = cfg.halt_keep > 0 and tower.adaptive and tower.config.error is not None
    teacher = copy.deepcopy(tower).requires_grad_(False) if keep else None  # the halting as trained
    for p in tower.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=0.01)
    modules = {"model": model, "heads": heads, "patch_heads": patch_heads, "slots": slots}
    start = 0
    if ckpt.exists():
        meta = vlm.load_state(ckpt, modules, opt)
        vlm.check_settings(meta, settings, ckpt)
        start = meta["step"]
        log(f"resuming the vision stage at step {start}")
    n_tok = tower.config.num_tokens
    train_mode(model)
    t0 = time.time()
    for step in range(start, cfg.vision_steps):
        r = np.random.default_rng(cfg.seed * 7919 + step)
        idx = r.integers(0, len(scenes), cfg.vision_batch)
        ks = [n_tok if r.random() < cfg.full_prob else int(r.integers(1, n_tok + 1)) for _ in idx]
        for g in opt.param_groups:
            g["lr"] = vlm.lr_at(step, cfg.vision_steps, cfg.vision_lr)
        with torch.autocast("cpu", dtype=torch.bfloat16), PatchCapture(enc) as cap:
            pix = z["pixels"][idx].float() / 255
            out = tower(pix)
            lat = out.last_hidden_state  # [B, K, width]
            obj = heads.loss(lat, ks, [scenes[i] for i in idx])
            slot = slots.loss(lat, ks, [scenes[i] for i in idx]) if cfg.slot_sup > 0 else torch.zeros(())
            halt = torch.zeros(())
            if teacher is not None:
                with torch.no_grad():
                    ref = teacher(pix).halt_prob.float()  # [B, K]
                halt = binary_kl(ref, out.halt_prob.float())
            patch = torch.zeros(())
            if cfg.patch_sup > 0:
                patch, _ = patch_heads.loss(cap.patches(lat.shape[1]), z["labels"][idx], grid, False)
        opt.zero_grad(set_to_none=True)
        (obj + cfg.patch_sup * patch + cfg.halt_keep * halt + cfg.slot_sup * slot).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0:
            parts = {k: float(v.detach()) for k, v in {"obj": obj, "patch": patch, "halt": halt, "slot": slot}.items()}
            msg = " ".join(f"{k} {v:.3f}" for k, v in parts.items())
            log(f"vision {step}/{cfg.vision_steps} {msg} {time.time() - t0:.0f}s")
            record(stage="vision", step=step, **parts)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vision_steps:
            vlm.save_state(ckpt, modules, opt, {"stage": "vision", "step": step + 1, "settings": settings})
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.vision_steps:
            with torch.no_grad():
                lat = tower(z["val_pixels"].float() / 255).last_hidden_state
            acc = {}
            for k in (n_tok, max(1, n_tok // 4)):
                acc.update({f"k{k}_{name}": v for name, v in heads.accuracy(lat, [k] * len(lat), val_scenes).items()})
                if cfg.slot_sup > 0:
                    acc[f"k{k}_slot"] = slots.accuracy(lat, [k] * len(lat), val_scenes)
            log(f"vision val {step + 1}: {acc}")
            record(stage="vision_val", step=step + 1, **acc)
    vlm.save_state(ckpt, modules, None, {"stage": "lm", "step": 0, "settings": settings})  # the LM stage starts


@torch.no_grad()
def bridge_val(model, processor, tok, cfg: BridgeConfig, ks: tuple[int, ...]) -> dict[str, float]:
    """Teacher-forced exact-match accuracy on the vtc-shapes val split at each prefix length in `ks`."""
    model.eval()
    bench = S.ShapesBenchmark(split="val", per_type=cfg.val_per_type)
    samples = [bench[i] for i in range(len(bench))]
    latents, _ = tower_latents(model, processor, np.stack([np.asarray(s.images[0]) for s in samples]))
    res = {}
    for k in ks:
        hits = []
        for i in range(0, len(samples), 32):
            part = samples[i : i + 32]
            ids, lab, mask, pos, feats = prefix_batch(
                model, tok, latents[i : i + 32], [k] * len(part), [[(s.question, s.answer)] for s in part]
            )
            logits, _ = vlm.lm_forward(model, "llava", ids, mask, feats, 0, None, pos)
            ok = ((logits[:, :-1].argmax(-1) == lab[:, 1:]) | (lab[:, 1:] == -100)).all(1)
            hits += ok.tolist()
        res[f"k{k}"] = round(sum(hits) / len(hits), 3)
    train_mode(model)
    return res


def train_bridge(cfg: BridgeConfig, out: str | Path, log=print) -> Path:
    torch.set_num_threads(cfg.threads)
    out = Path(out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model, processor, tok = build_bridge(cfg)
    logf = open(work / "log.jsonl", "a")

    def record(**kw):
        logf.write(json.dumps({**kw, "time": time.time()}) + "\n")
        logf.flush()

    seed0 = cfg.seed * 10**7 + 3 * 10**6  # disjoint from every benchmark split and from the other trainers' pools
    seeds = np.arange(cfg.pool) + seed0
    cache = work / "latents.safetensors"
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    ckpt = work / "state.safetensors"
    settings = vlm.settings_of(cfg, BRIDGE_SETTINGS)
    heads = ObjectHeads(model.config.vision_config.hidden_size)  # a training head (checkpointed, not saved)
    if cfg.vision_steps > 0:
        stage = "vision"
        if ckpt.exists():
            with safe_open(str(ckpt), "pt") as f:
                stage = json.loads(f.metadata()["meta"]).get("stage", "lm")
        if stage == "vision":  # the LM pool's latents below come from the encoder this stage trains
            vision_stage(model, processor, heads, cfg, ckpt, settings, log, record)
        else:  # done in an earlier run: its encoder computes the LM pool's latents
            vlm.load_state(ckpt, {"model": model, "heads": heads}, None)
    torch.manual_seed(cfg.seed + 1)  # the LM stage's randomness does not depend on whether the vision stage ran here

    z = load_file(str(cache)) if cache.exists() else {}
    tune = cfg.tower_lr > 0
    key = "head_attribution" if cfg.vision_steps > 0 else "attribution"  # the grounding targets' source
    if not z or (cfg.attn_sup > 0 and key not in z) or (tune and "pixels" not in z):
        t0 = time.time()
        images, _ = vlm.render_pool(cfg.pool, 4, seed0=seed0, workers=cfg.threads)
        if not z:
            z["latents"], z["lengths"] = tower_latents(model, processor, images)
            log(f"latent tokens of {cfg.pool} scenes {tuple(z['latents'].shape)} in {time.time() - t0:.0f}s")
        if cfg.attn_sup > 0 and key not in z and cfg.vision_steps > 0:  # where the vision stage's heads read
            heads.eval()
            z[key] = torch.cat([heads.attribution(z["latents"][i : i + 256], [S.make_scene(int(sd)) for sd in
                                seeds[i : i + 256]]) for i in range(0, cfg.pool, 256)])  # fmt: skip
            heads.train()
        elif cfg.attn_sup > 0 and key not in z:
            z[key] = attribution_pool(model, processor, images, seeds)
            log(f"token attribution of {cfg.pool} scenes in {time.time() - t0:.0f}s")
        if tune and "pixels" not in z:  # the tower's input, uint8 [n, 3, S, S]: a tuned tower is run every step
            z["pixels"] = tower_pixels(processor, images)
        save_file(z, str(cache))
    latents = z["latents"]
    n_tok = latents.shape[1]
    tower = model.model.vision_tower
    for p in tower.parameters():
        p.requires_grad_(tune)
    groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")],
               "base_lr": cfg.lr}]  # fmt: skip
    if tune:
        groups.append({"params": list(tower.parameters()), "base_lr": cfg.tower_lr})
    if cfg.obj_sup > 0:
        groups[0]["params"] += list(heads.parameters())
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.01)
    start = 0
    if ckpt.exists():
        meta = vlm.load_state(ckpt, {"model": model, "heads": heads}, opt)
        vlm.check_settings(meta, settings, ckpt)  # a run goes on with the recipe it started with
        start = meta["step"]
    if start:
        log(f"resuming at step {start}")
    elif cfg.proj_rms > 0:  # a fresh LM stage: the projector starts where the LM can read its tokens
        init_projector(model.model.multi_modal_projector, latents, cfg.proj_rms, cfg.seed)
    layers = model.model.language_model.layers
    supervised = ([0] if cfg.question_sup > 0 else []) + (list(range(1, len(layers))) if cfg.attn_sup > 0 else [])
    capture = vlm.AttentionCapture({i: layers[i].self_attn for i in supervised})
    train_mode(model)
    t0 = time.time()
    for step in range(start, cfg.steps):
        r = np.random.default_rng(cfg.seed * 15485863 + step)
        idx = r.integers(0, cfg.pool, cfg.batch)
        ks = [n_tok if r.random() < cfg.full_prob else int(r.integers(1, n_tok + 1)) for _ in idx]
        made = [vlm.make_turns(int(seeds[i]), cfg.qa_per_image, r) for i in idx]
        turns = [t for _, t in made]
        for g in opt.param_groups:
            g["lr"] = vlm.lr_at(step, cfg.steps, g["base_lr"])
        capture.store.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16), capture:
            lat = tower(z["pixels"][idx].float() / 255).last_hidden_state if tune else latents[idx]  # [B, K, w]
            targets = None
            if cfg.attn_sup > 0:  # answer rows attend to the kept tokens that draw the asked objects
                targets = [
                    [question_tokens(scene, q, z[key][i], k) for q, _ in t]
                    for (scene, t), i, k in zip(made, idx, ks, strict=True)
                ]
            loss, q_ground, ground = qa_losses(model, tok, capture, lat, ks, turns, targets, cfg.question_sup > 0)
            obj = heads.loss(lat, ks, [sc for sc, _ in made]) if cfg.obj_sup > 0 else torch.zeros(())
        opt.zero_grad(set_to_none=True)
        (loss + cfg.attn_sup * ground + cfg.question_sup * q_ground + cfg.obj_sup * obj).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0:
            terms = {"loss": loss, "ground": ground, "qground": q_ground, "obj": obj}
            parts = {k: float(v.detach()) for k, v in terms.items()}
            log(
                f"bridge {step}/{cfg.steps} "
                + " ".join(f"{k} {v:.3f}" for k, v in parts.items())
                + f" {time.time() - t0:.0f}s"
            )
            record(stage="lm", step=step, **parts)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            state = {"stage": "lm", "step": step + 1, "settings": settings}
            vlm.save_state(ckpt, {"model": model, "heads": heads}, opt, state)
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            acc = bridge_val(model, processor, tok, cfg, (n_tok, max(1, n_tok // 4)))
            log(f"val {step + 1}: {acc}")
            record(stage="val", step=step + 1, **acc)
    return vlm.save_model(model, processor, cfg, out, log)


def add_parser(sub) -> None:
    p = sub.add_parser("bridge", help="train a tiny LLaVA on a 1-D tokenizer's tokens (random prefix lengths)")
    p.add_argument("tokenizer", help="a registered tokenizer with a trained checkpoint (see vtc.list_tokenizers())")
    p.add_argument("--out", required=True, help="output folder (from_pretrained-loadable); resumes if present")
    vlm.add_config_args(p, BridgeConfig, skip="tokenizer")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> None:
    train_bridge(vlm.config_from_args(BridgeConfig, args), args.out)  # `tokenizer` is the positional argument
