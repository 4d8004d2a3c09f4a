"""Analytic prefill FLOPs of a transformers VLM for a given token schedule (installed as `vtc.eval.flops`).

    from vtc.eval.flops import prefill_flops, visual_schedule
    f = prefill_flops(model, text_tokens=40, visual_per_layer=64, images=1)         # LLaVA-1.5, 64 kept tokens
    f = prefill_flops(model, 40, visual_schedule(32, 576, [(2, 64)]), images=1)     # FastV K=2: 576, 576, 64, ...
    f = prefill_flops(qwen, 40, None, images=[(1, 34, 48)])                          # Qwen2-VL, stock token count
    f["total"], f["vision"], f["llm"], f["llm_layers"]

Conventions (pinned):

* One FLOP is one multiply or one add, so a `[m, k] @ [k, n]` product costs `2·m·k·n` (as
  `torch.utils.flop_counter` counts). Only matrix products and convolutions are counted: linear layers (biases
  ignored), the patch-embedding convolution, the attention products `QKᵀ` and `AV`, the projector / merger and the
  `lm_head`. Norms, activations, softmax, RoPE, residual adds and embedding look-ups are not counted (together well
  under 1% of a model of any realistic width).
* The cost of the token reduction itself (scores, distances, top-k) is NOT counted: the harness times it.
* Vision tower: every view / image / video frame is encoded in full, whatever the reduction (the pre-LLM reducers of
  `vtc.adapters` act after the projector). LLaVA(-NeXT): CLIP ViT, all `num_hidden_layers` layers (transformers runs
  them all even when `vision_feature_layer` = -2), `(image_size/patch)² + 1` tokens per view with the CLS token, full
  attention per view, then the two-layer MLP projector on the selected features (`default`: CLS dropped); a 1-D
  tokenizer as LLaVA's tower (`vtc.tokenizers.tower`): its encoder ViT over patches + K latents, then the projector
  on the K token codes. Qwen2-VL /
  Qwen2.5-VL: the Conv3d patch embedding over `t·h·w` patches, attention within each temporal frame (Qwen2-VL: every
  block; Qwen2.5-VL: blocks in `fullatt_block_indexes`) or within each window of `window_size` pixels (the other
  Qwen2.5-VL blocks; edge windows are smaller, as in transformers), then the 2×2 patch merger MLP.
* Decoder (Llama / Mistral / Qwen2 and the Qwen2-VL text models): per layer q/k/v/o projections with GQA
  (`num_key_value_heads`, `head_dim`), the gated MLP (gate, up, down) and attention `QKᵀ` + `AV` =
  `4 · heads · head_dim · pairs`. Layer `i` runs on `text_tokens + visual_per_layer[i]` tokens, so in-LLM pruning
  (FastV, PDrop, DART) is counted layer by layer; a prefill has no cache, so queries = keys = that length.
* `causal=True` (default) counts the query–key pairs a causal prefill needs, `L(L+1)/2` (fewer with a sliding
  window: Mistral's `sliding_window`, or layers marked `sliding_attention`); `causal=False` counts the full `L²`
  square, which is what dense SDPA / eager kernels compute, what `FlopCounterMode` reports, and what FastV-style
  papers count (they also count multiply-adds, i.e. half of these numbers).
* `lm_head`: `"last"` (default: one position, as `generate()` asks with `logits_to_keep=1`), `"all"` (every
  position), `"none"`, or an int number of positions.
* `batch` multiplies everything: samples of a batch with different lengths are best counted one by one and summed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CLIP_FAMILIES = ("llava", "llava_next")
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
GATED_DECODERS = ("llama", "mistral", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3")


def _config(model_or_config: Any) -> Any:
    cfg = getattr(model_or_config, "config", model_or_config)
    if not hasattr(cfg, "model_type"):
        got = type(model_or_config).__name__
        raise TypeError(f"prefill_flops: expected a transformers model or config, got {got}")
    return cfg


def _text_config(cfg: Any) -> Any:
    return cfg.text_config if getattr(cfg, "text_config", None) is not None else cfg


def _head_dim(tc: Any) -> int:
    hd = getattr(tc, "head_dim", None)
    return int(hd) if hd else tc.hidden_size // tc.num_attention_heads


# ---------------------------------------------------------------------------------------------- decoder
def attention_pairs(length: int, causal: bool = True, window: int | None = None) -> int:
    """Query–key pairs of self-attention over `length` tokens (prefill: queries = keys)."""
    if length < 0:
        raise ValueError(f"attention_pairs: length={length} must be >= 0")
    if not causal:
        return length * length
    w = length if window is None else min(int(window), length)
    return w * (w + 1) // 2 + (length - w) * w


def _layer_windows(tc: Any) -> list[int | None]:
    n = tc.num_hidden_layers
    sw = getattr(tc, "sliding_window", None)
    types = getattr(tc, "layer_types", None)
    if types:
        return [sw if t == "sliding_attention" and sw else None for t in types]
    if tc.model_type == "mistral" and sw:
        return [int(sw)] * n
    return [None] * n


def decoder_layer_flops(tc: Any, length: int, causal: bool = True, window: int | None = None) -> dict[str, int]:
    """FLOPs of one gated-MLP decoder layer on `length` tokens: `linear` (projections + MLP) and `attention`."""
    d, heads, hd = tc.hidden_size, tc.num_attention_heads, _head_dim(tc)
    kv = getattr(tc, "num_key_value_heads", None) or heads
    proj = d * heads * hd + 2 * d * kv * hd + heads * hd * d  # q, k, v, o weights
    mlp = 3 * d * tc.intermediate_size  # gate, up, down
    return {
        "linear": 2 * length * (proj + mlp),
        "attention": 4 * heads * hd * attention_pairs(length, causal, window),
    }


def llm_flops(
    tc: Any,
    seq_per_layer: Sequence[int],
    *,
    lm_head: str | int = "last",
    causal: bool = True,
) -> dict[str, Any]:
    """Decoder FLOPs for a sequence of `seq_per_layer[i]` tokens at layer i (one entry per decoder layer)."""
    if tc.model_type not in GATED_DECODERS:
        raise ValueError(
            f"prefill_flops: decoder model_type {tc.model_type!r} is not supported; supported: {GATED_DECODERS}"
        )
    if len(seq_per_layer) != tc.num_hidden_layers:
        raise ValueError(
            f"prefill_flops: {len(seq_per_layer)} per-layer token counts for a {tc.num_hidden_layers}-layer LLM; "
            "give one count per decoder layer (or one int for all)"
        )
    windows = _layer_windows(tc)
    per = [decoder_layer_flops(tc, n, causal, w) for n, w in zip(seq_per_layer, windows, strict=True)]
    last = seq_per_layer[-1]
    if lm_head == "last":
        n_head = min(1, last)
    elif lm_head == "all":
        n_head = last
    elif lm_head == "none":
        n_head = 0
    elif isinstance(lm_head, int) and not isinstance(lm_head, bool) and lm_head >= 0:
        n_head = min(lm_head, last)
    else:
        raise ValueError(f"prefill_flops: lm_head={lm_head!r}; use 'last', 'all', 'none' or a number of positions")
    head = 2 * n_head * tc.hidden_size * tc.vocab_size
    linear, attn = sum(p["linear"] for p in per), sum(p["attention"] for p in per)
    return {
        "llm_linear": linear,
        "llm_attention": attn,
        "lm_head": head,
        "llm": linear + attn + head,
        "llm_layers": [p["linear"] + p["attention"] for p in per],
    }


# ---------------------------------------------------------------------------------------------- vision
def _clip_views(cfg: Any, images: Any) -> int:
    """Number of CLIP views the stock model encodes."""
    if images is None:
        return 0
    if cfg.model_type == "llava":
        n = images if isinstance(images, int) else len(images)
        if n < 0:
            raise ValueError(f"prefill_flops: images={images} must be >= 0")
        return n
    if isinstance(images, int):
        raise ValueError(
            "prefill_flops: LLaVA-NeXT needs the image sizes, images=[(height, width), ...], "
            f"to know its AnyRes views; got images={images}"
        )
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    vc = cfg.vision_config
    return sum(image_size_to_num_patches(list(s), cfg.image_grid_pinpoints, vc.image_size) for s in images)


def _tokenizer_tower_flops(cfg: Any, images: Any) -> dict[str, int]:
    """A 1-D tokenizer's encoder as LLaVA's tower (`vtc.tokenizers.tower`): the ViT over patches + K latents
    (+ KARL's error-condition token), full attention square, the code projection (+ VQ's code distances, + KARL's
    halting head), then the LLaVA projector on the K codes. The tokenizer's decoder never runs in a VLM."""
    vc = cfg.vision_config
    t = vc.tokenizer_config
    views = _clip_views(cfg, images)
    w, p, k = t["width"], t["patch_size"], t["num_tokens"]
    patches = (t["image_size"] // p) ** 2
    n = patches + k + (1 if vc.tokenizer == "karl" else 0)
    hidden = int(w * t.get("mlp_ratio", 4.0))
    embed = 2 * views * patches * 3 * p * p * w
    code_dim = len(t["fsq_levels"]) if t.get("quantizer", "fsq") == "fsq" else t["vq_dim"]
    per_token = w * code_dim  # the code projection (encode quantizes; the VLM reads the latents before it)
    if t.get("quantizer") == "vq":  # distances of every latent to every code
        per_token += t["vq_dim"] * t["vq_codebook_size"]
    if "halt_hidden" in t:  # KARL's halting head
        per_token += w * t["halt_hidden"] + t["halt_hidden"]
    linear = 2 * views * (n * (4 * w * w + 2 * w * hidden) * t["enc_depth"] + k * per_token)
    attn = 4 * w * n * n * views * t["enc_depth"]
    d = _text_config(cfg).hidden_size
    projector = 2 * views * k * (vc.hidden_size * d + d * d)
    return {"vision_embed": embed, "vision_linear": linear, "vision_attention": attn, "projector": projector}


def _clip_flops(cfg: Any, images: Any) -> dict[str, int]:
    vc = cfg.vision_config
    if vc.model_type == "vtc_tokenizer_tower":
        return _tokenizer_tower_flops(cfg, images)
    if vc.model_type != "clip_vision_model":
        raise ValueError(f"prefill_flops: vision tower {vc.model_type!r} is not supported (CLIP only)")
    views = _clip_views(cfg, images)
    side = vc.image_size // vc.patch_size
    patches = side * side
    n = patches + 1  # + CLS
    dv = vc.hidden_size
    layers = vc.num_hidden_layers
    embed = 2 * views * patches * 3 * vc.patch_size**2 * dv
    linear = 2 * views * n * (4 * dv * dv + 2 * dv * vc.intermediate_size) * layers
    attn = 4 * dv * n * n * views * layers
    feat_layers = 1 if isinstance(cfg.vision_feature_layer, int) else len(cfg.vision_feature_layer)
    tokens = patches if cfg.vision_feature_select_strategy == "default" else n
    d = _text_config(cfg).hidden_size
    projector = 2 * views * tokens * (dv * feat_layers * d + d * d)
    return {"vision_embed": embed, "vision_linear": linear, "vision_attention": attn, "projector": projector}


def _qwen_grids(images: Any) -> list[tuple[int, int, int]]:
    if images is None:
        return []
    grids = []
    for g in images:
        t, h, w = (int(x) for x in g)
        if min(t, h, w) < 1:
            raise ValueError(f"prefill_flops: Qwen grid {tuple(g)} must be positive (t, h, w) patch counts")
        grids.append((t, h, w))
    return grids


def _windows_1d(n: int, w: int) -> list[int]:
    """Window sizes along one axis of `n` merged tokens cut into windows of `w` (the last one may be smaller)."""
    return [min(w, n - s) for s in range(0, n, w)]


def _qwen_segments(vc: Any, grids: list[tuple[int, int, int]], windowed: bool) -> list[int]:
    """Token counts of the attention segments of one vision block."""
    m = vc.spatial_merge_size
    segs = []
    for t, h, w in grids:
        if not windowed:
            segs += [h * w] * t
            continue
        ws = vc.window_size // m // vc.patch_size
        wins = [a * b * m * m for a in _windows_1d(h // m, ws) for b in _windows_1d(w // m, ws)]
        segs += wins * t
    return segs


def _qwen_flops(cfg: Any, images: Any) -> dict[str, int]:
    vc = cfg.vision_config
    grids = _qwen_grids(images)
    p = sum(t * h * w for t, h, w in grids)
    m2 = vc.spatial_merge_size**2
    if cfg.model_type == "qwen2_vl":
        c, out = vc.embed_dim, vc.hidden_size
        mlp = 2 * c * int(c * vc.mlp_ratio)  # fc1, fc2
        full = set(range(vc.depth))
    else:
        c, out = vc.hidden_size, vc.out_hidden_size
        mlp = 3 * c * vc.intermediate_size  # gate, up, down
        full = set(vc.fullatt_block_indexes)
    embed = 2 * p * 3 * vc.temporal_patch_size * vc.patch_size**2 * c
    linear = 2 * p * (4 * c * c + mlp) * vc.depth
    attn = 0
    for i in range(vc.depth):
        attn += sum(4 * c * n * n for n in _qwen_segments(vc, grids, windowed=i not in full))
    merger = 2 * (p // m2) * ((c * m2) ** 2 + c * m2 * out)
    return {"vision_embed": embed, "vision_linear": linear, "vision_attention": attn, "projector": merger}


def vision_flops(model_or_config: Any, images: Any) -> dict[str, int]:
    """FLOPs of the vision tower and projector for `images` (see `prefill_flops`); zeros for a text-only model."""
    cfg = _config(model_or_config)
    if cfg.model_type in CLIP_FAMILIES:
        out = _clip_flops(cfg, images)
    elif cfg.model_type in QWEN_FAMILIES:
        out = _qwen_flops(cfg, images)
    elif getattr(cfg, "vision_config", None) is None:
        if images:
            raise ValueError(f"prefill_flops: {cfg.model_type!r} has no vision tower but images={images!r}")
        out = {"vision_embed": 0, "vision_linear": 0, "vision_attention": 0, "projector": 0}
    else:
        raise ValueError(
            f"prefill_flops: VLM model_type {cfg.model_type!r} is not supported; "
            f"supported: {CLIP_FAMILIES + QWEN_FAMILIES} (or a plain decoder config)"
        )
    out["vision"] = out["vision_embed"] + out["vision_linear"] + out["vision_attention"]
    return out


def stock_visual_tokens(model_or_config: Any, images: Any) -> int:
    """Visual tokens the unreduced model puts into the LLM sequence (LLaVA-NeXT: with its row newlines)."""
    cfg = _config(model_or_config)
    if images is None:
        return 0
    if cfg.model_type == "llava" and cfg.vision_config.model_type == "vtc_tokenizer_tower":
        return cfg.vision_config.num_tokens * _clip_views(cfg, images)
    if cfg.model_type == "llava":
        vc = cfg.vision_config
        side = vc.image_size // vc.patch_size
        per = side * side + (0 if cfg.vision_feature_select_strategy == "default" else 1)
        return per * _clip_views(cfg, images)
    if cfg.model_type == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
        from vtc.adapters.llava_next import anyres_layout

        _clip_views(cfg, images)  # validates
        vc = cfg.vision_config
        side = vc.image_size // vc.patch_size
        total = 0
        for s in images:
            views = tuple(get_anyres_image_grid_shape(list(s), cfg.image_grid_pinpoints, vc.image_size))
            total += anyres_layout(views, (side, side), list(s)).length
        return total
    if cfg.model_type in QWEN_FAMILIES:
        m2 = cfg.vision_config.spatial_merge_size**2
        return sum(t * h * w // m2 for t, h, w in _qwen_grids(images))
    raise ValueError(f"stock_visual_tokens: model_type {cfg.model_type!r} is not supported")


# ---------------------------------------------------------------------------------------------- schedules
def visual_schedule(num_layers: int, n_visual: int, plan: Sequence[tuple[int, int]] = ()) -> list[int]:
    """Visual tokens at each decoder layer: `n_visual` until the first stage of `plan` = `[(layer, kept), ...]`
    (an in-LLM reducer's plan), then each stage's count from its layer on (never more than before)."""
    out, cur, stages = [], int(n_visual), dict(plan)
    for i in range(num_layers):
        if i in stages:
            cur = min(cur, int(stages[i]))
        out.append(cur)
    return out


def prefill_flops(
    model_or_config: Any,
    text_tokens: int,
    visual_per_layer: int | Sequence[int] | None = None,
    images: Any = None,
    *,
    lm_head: str | int = "last",
    causal: bool = True,
    batch: int = 1,
) -> dict[str, Any]:
    """Analytic FLOPs of one prefill (see the module docstring for what is counted).

    Args:
        model_or_config: a transformers VLM (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL) or its config; a plain
            decoder (Llama / Mistral / Qwen2) or its config counts the LLM alone.
        text_tokens: LLM positions that are not visual tokens (BOS, prompt, special tokens).
        visual_per_layer: visual tokens at each decoder layer (a list of `num_hidden_layers` counts), one int for
            every layer, or None for the unreduced count of `images` (`stock_visual_tokens`).
        images: what the vision tower encodes. LLaVA-1.5: the number of images. LLaVA-NeXT: the image sizes
            `[(height, width), ...]`. Qwen: the patch grids `[(t, h, w), ...]` (`image_grid_thw` /
            `video_grid_thw` rows). None: no vision tower cost.
        lm_head: positions whose logits are computed: "last", "all", "none" or a count.
        causal: count the causal half of each attention square (True) or the full square (False).
        batch: identical samples in the batch (multiplies every number).

    Returns:
        A dict of integer FLOPs: `total`, `vision` (= `vision_embed` + `vision_linear` + `vision_attention`),
        `projector`, `llm` (= `llm_linear` + `llm_attention` + `lm_head`), `llm_layers` (per decoder layer, without
        the lm_head), and the schedule used: `seq_per_layer`, `visual_per_layer`, `visual_effective` (the mean over
        layers) and `text_tokens`.
    """
    cfg = _config(model_or_config)
    tc = _text_config(cfg)
    if isinstance(text_tokens, bool) or not isinstance(text_tokens, int) or text_tokens < 0:
        raise ValueError(f"prefill_flops: text_tokens={text_tokens!r} must be an int >= 0")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"prefill_flops: batch={batch!r} must be an int >= 1")
    n_layers = tc.num_hidden_layers
    if visual_per_layer is None:
        visual_per_layer = stock_visual_tokens(cfg, images)
    if isinstance(visual_per_layer, int):
        visual_per_layer = [visual_per_layer] * n_layers
    visual = [int(v) for v in visual_per_layer]
    if any(v < 0 for v in visual):
        raise ValueError(f"prefill_flops: visual_per_layer={visual} must be >= 0")
    seq = [text_tokens + v for v in visual]
    out: dict[str, Any] = dict(vision_flops(cfg, images))
    out.update(llm_flops(tc, seq, lm_head=lm_head, causal=causal))
    out["total"] = out["vision"] + out["projector"] + out["llm"]
    for k, v in list(out.items()):
        if isinstance(v, int):
            out[k] = v * batch
    out["llm_layers"] = [v * batch for v in out["llm_layers"]]
    out.update(
        seq_per_layer=seq,
        visual_per_layer=visual,
        visual_effective=sum(visual) / max(len(visual), 1),
        text_tokens=text_tokens,
        batch=batch,
    )
    return out


def last_prefill_tokens(model: Any, input_ids: Any, attention_mask: Any = None) -> list[tuple[int, list[int]]]:
    """`(text_tokens, visual_per_layer)` of every sample of the last prefill of a `vtc.compress`-ed model.

    `input_ids` (and `attention_mask`, if the prompt was padded) are the unreduced inputs of that prefill. Visual
    tokens are the image/video placeholder columns that reached the LLM (LLaVA-NeXT: with the row newlines kept);
    an in-LLM stage lowers them from its layers on (by the adapter's per-layer counts when it reports them, else by
    its plan). Text tokens are the other non-padding columns.
    """
    from vtc.adapters import adapter_of

    ad = adapter_of(model)
    last = ad.last
    if "source_columns" not in last:
        raise RuntimeError("last_prefill_tokens: this compressed model has not run a prefill yet")
    src = last["source_columns"]  # [B, L'] unreduced column of each reduced column, -1 padding
    valid = src >= 0
    if attention_mask is not None:
        valid &= attention_mask.to(src.device).gather(1, src.clamp(min=0)).bool()
    placeholder = ad.placeholder_mask(input_ids.to(src.device)).gather(1, src.clamp(min=0)) & valid
    n_layers = _text_config(model.config).num_hidden_layers
    in_llm = ad.in_llm
    per_layer = getattr(in_llm, "per_layer", None) if in_llm is not None else None  # [B, layers] if reported
    out = []
    for b in range(src.shape[0]):
        vis = int(placeholder[b].sum())
        text = int(valid[b].sum()) - vis
        if per_layer is not None:  # tokens dropped by the stages (separators such as newlines are never dropped)
            counts = [int(c) for c in per_layer[b].tolist()]
            visual = [vis - (counts[0] - c) for c in counts]
        else:
            visual = visual_schedule(n_layers, vis, in_llm.plan if in_llm is not None else [])
        out.append((text, visual))
    return out
