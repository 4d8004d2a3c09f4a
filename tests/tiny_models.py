"""Tiny VLMs of the real transformers classes, built from configs (nothing downloaded), as transformers' tests do."""

from __future__ import annotations

import contextlib

import torch

IMAGE_TOKEN = 3
PAD = 0


def _clip_and_llama(image_size: int, patch: int):
    """The 3-layer CLIP tower and 3-layer Llama (width 32) that the tiny LLaVA and LLaVA-NeXT share."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=image_size,
        patch_size=patch, projection_dim=32,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return vision, text


def tiny_llava(seed: int = 0, image_size: int = 32, patch: int = 4, attn: str = "sdpa"):
    """A LlavaForConditionalGeneration with a 2-layer CLIP tower (8×8 = 64 patches) and a 2-layer Llama."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision, text = _clip_and_llama(image_size, patch)
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg).eval()
    return model


def llava_batch(model, prompts_text: list[list[int]], seed: int = 0, images_per_prompt: int = 1):
    """Left-padded input_ids/attention_mask with one run of placeholders per image before each prompt's text."""
    n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    rows = [[1] + ([IMAGE_TOKEN] * n + [5]) * images_per_prompt + t for t in prompts_text]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    g = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    pixels = torch.randn(len(rows) * images_per_prompt, 3, size, size, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


# ---------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL
QWEN_VISION_START, QWEN_VISION_END, QWEN_VIDEO_TOKEN = 4, 5, 6


def _qwen_text_config() -> dict:
    return {
        "vocab_size": 99,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        "pad_token_id": PAD,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def tiny_qwen2_vl(seed: int = 0, attn: str = "sdpa"):
    """A Qwen2VLForConditionalGeneration: 3-block ViT (patch 4, 2×2 merger) and a 3-layer Qwen2 with M-RoPE."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    vision = {
        "depth": 3,
        "embed_dim": 32,
        "hidden_size": 32,
        "num_heads": 4,
        "mlp_ratio": 2,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    cfg = Qwen2VLConfig(
        text_config=_qwen_text_config(),
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        video_token_id=QWEN_VIDEO_TOKEN,
        vision_start_token_id=QWEN_VISION_START,
        vision_end_token_id=QWEN_VISION_END,
    )
    cfg._attn_implementation = attn
    return Qwen2VLForConditionalGeneration(cfg).eval()


def tiny_qwen2_5_vl(seed: int = 0, attn: str = "sdpa"):
    """A Qwen2_5_VLForConditionalGeneration: 3-block ViT with window attention (windows of 2×2 merged tokens,
    block 1 full attention), 2×2 merger, and a 3-layer Qwen2 with M-RoPE."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    vision = {
        "depth": 3,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 32,
        "num_heads": 4,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 16,
        "fullatt_block_indexes": [1],
    }
    cfg = Qwen2_5_VLConfig(
        text_config=_qwen_text_config(),
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        video_token_id=QWEN_VIDEO_TOKEN,
        vision_start_token_id=QWEN_VISION_START,
        vision_end_token_id=QWEN_VISION_END,
    )
    cfg._attn_implementation = attn
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def qwen_batch(model, grids: list[tuple[int, int, int]], prompts_text: list[list[int]], seed: int = 0):
    """Left-padded inputs with one image per prompt: `<bos> <vision_start> <image>*N <vision_end> text`.

    `grids` are the patch grids (t, h, w) of the images (h, w even; N = t*h*w/4 after the 2×2 merge); the
    pixel values are random flattened patches as the Qwen processor lays them out.
    """
    rows = []
    for (t, h, w), text in zip(grids, prompts_text, strict=True):
        rows.append([1, QWEN_VISION_START] + [IMAGE_TOKEN] * (t * h * w // 4) + [QWEN_VISION_END] + text)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    vc = model.config.vision_config
    g = torch.Generator().manual_seed(seed)
    patches = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(patches, 3 * vc.temporal_patch_size * vc.patch_size**2, generator=g)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixels,
        "image_grid_thw": torch.tensor(grids, dtype=torch.long),
        "mm_token_type_ids": (ids == IMAGE_TOKEN).int(),
    }


# ---------------------------------------------------------------------- LLaVA-NeXT (AnyRes)
NEXT_PINPOINTS = [[16, 32], [32, 16], [32, 32]]  # (height, width): 1×2, 2×1 or 2×2 crops of 16 px


def tiny_llava_next(seed: int = 0, attn: str = "sdpa"):
    """A LlavaNextForConditionalGeneration: 3-layer CLIP on 16 px views (patch 4: 4×4 tokens per view), AnyRes
    with 2–4 crops (`NEXT_PINPOINTS`), and a 3-layer Llama."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    vision, text = _clip_and_llama(16, 4)
    cfg = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=NEXT_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    cfg._attn_implementation = attn
    return LlavaNextForConditionalGeneration(cfg).eval()


def llava_next_batch(model, image_sizes: list[tuple[int, int]], prompts_text: list[list[int]], seed: int = 0):
    """Left-padded inputs, one image (of original size `image_sizes[i]`, (height, width)) before each prompt's text.

    The placeholder count of each image comes from the stock `pack_image_features` (thumbnail + unpadded rows with
    their newlines); `pixel_values` are random views `[n_images, max_views, 3, 16, 16]`, zero-padded as the
    processor pads them.
    """
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    vc = model.config.vision_config
    hw = (vc.image_size // vc.patch_size) ** 2
    views = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, vc.image_size) for s in image_sizes]
    sizes = torch.tensor(image_sizes, dtype=torch.long)
    dummy = [torch.zeros(v, hw, 1) for v in views]
    _, lens = model.model.pack_image_features(dummy, sizes, "default", image_newline=torch.zeros(1))
    rows = [[1] + [IMAGE_TOKEN] * int(n) + [5] + t for n, t in zip(lens, prompts_text, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    g = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(len(rows), max(views), 3, vc.image_size, vc.image_size)
    for i, v in enumerate(views):
        pixels[i, :v] = torch.randn(v, 3, vc.image_size, vc.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": sizes}


def qwen_video_batch(model, video_grids, image_grids, prompts_text: list[list[int]], seed: int = 0):
    """Left-padded inputs with one video per prompt, then optionally one image (`image_grids[b]` None: none):
    `<bos> <vision_start> <video>*N <vision_end> [<vision_start> <image>*M <vision_end>] text`."""
    rows = []
    for vg, ig, text in zip(video_grids, image_grids, prompts_text, strict=True):
        r = [1, QWEN_VISION_START] + [QWEN_VIDEO_TOKEN] * (vg[0] * vg[1] * vg[2] // 4) + [QWEN_VISION_END]
        if ig is not None:
            r += [QWEN_VISION_START] + [IMAGE_TOKEN] * (ig[0] * ig[1] * ig[2] // 4) + [QWEN_VISION_END]
        rows.append(r + text)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    vc = model.config.vision_config
    g = torch.Generator().manual_seed(seed)
    dim = 3 * vc.temporal_patch_size * vc.patch_size**2
    images = [ig for ig in image_grids if ig is not None]
    out = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values_videos": torch.randn(sum(t * h * w for t, h, w in video_grids), dim, generator=g),
        "video_grid_thw": torch.tensor(video_grids, dtype=torch.long),
        "mm_token_type_ids": (ids == IMAGE_TOKEN).int() + 2 * (ids == QWEN_VIDEO_TOKEN).int(),
    }
    if images:
        out["pixel_values"] = torch.randn(sum(t * h * w for t, h, w in images), dim, generator=g)
        out["image_grid_thw"] = torch.tensor(images, dtype=torch.long)
    return out


@contextlib.contextmanager
def stage_masked_attention(model, prompt_mask: torch.Tensor, stages, seq: int):
    """Reference for in-LLM pruning: every token is computed, but from each stage's layer on the pruned prompt columns
    are masked out of attention. `stages` = [(layer, kept prompt columns [B, K])]; yields the 2-D mask [B, seq]."""
    b, plen = prompt_mask.shape
    mask = torch.cat([prompt_mask, torch.ones(b, seq - plen, dtype=torch.long)], 1).bool()
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None] & mask[:, None, None, :]
    handles = []
    for li, layer in enumerate(model.model.language_model.layers):
        alive = mask.clone()
        for s, cols in stages:
            if li >= s:  # the stage's survivors (prompt columns) plus every generated token
                alive = torch.zeros(b, seq, dtype=torch.bool).scatter_(1, cols, True)
                alive[:, plen:] = True
                alive &= mask
        m4 = (causal & alive[:, None, None, :]) | torch.eye(seq, dtype=torch.bool)[None, None]

        def pre(mod, args, kwargs, m4=m4):
            kwargs["attention_mask"] = m4
            return args, kwargs

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield mask
    finally:
        for h in handles:
            h.remove()
