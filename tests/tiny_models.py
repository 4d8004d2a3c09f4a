"""Tiny VLMs of the real transformers classes, built from configs (nothing downloaded), as transformers' tests do."""

from __future__ import annotations

import torch

IMAGE_TOKEN = 3
PAD = 0


def tiny_llava(seed: int = 0, image_size: int = 32, patch: int = 4, attn: str = "sdpa"):
    """A LlavaForConditionalGeneration with a 2-layer CLIP tower (8×8 = 64 patches) and a 2-layer Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
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
