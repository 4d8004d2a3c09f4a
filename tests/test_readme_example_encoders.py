"""The README's custom-pipeline example (open_clip encoder → reducer → linear projector → small Llama), run as is.

Random weights everywhere, so the generated text is noise; what is checked is that the number of visual tokens
entering the LLM follows the budget and that stock `generate()` runs with and without compression.
"""

from __future__ import annotations

import pytest
import torch
from vtc.adapters import encoders

import vtc

pytest.importorskip("skimage")


def readme_example() -> dict:
    # ---- README snippet starts ----
    import json
    import pathlib
    import tempfile

    import open_clip
    import torch
    from skimage import data
    from transformers import LlamaConfig, LlamaForCausalLM

    import vtc

    # A vision tower. With weights: open_clip.create_model_and_transforms("ViT-B-16", pretrained="openai").
    # Here a tiny ViT from a config, random weights, nothing downloaded.
    cfg = {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
    }
    path = pathlib.Path(tempfile.mkdtemp()) / "tiny-vit.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    clip, _, preprocess = open_clip.create_model_and_transforms("tiny-vit", pretrained=None)
    encoder = clip.visual.eval()

    # A small Llama and a linear projector from the encoder's width to the LLM's.
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=256, **size)).eval()
    projector = torch.nn.Linear(encoder.transformer.width, llm.config.hidden_size)

    image = data.astronaut()  # 512×512 RGB; the encoder's own preprocessing resizes it
    prompt = torch.tensor([[1, 42, 7, 99]])  # the question's token ids (use the LLM's tokenizer)

    @torch.no_grad()
    def generate(reducer: str, budget: int | float) -> tuple[int, torch.Tensor]:
        sel = vtc.encode_and_reduce(encoder, [image], reducer, budget=budget, projector=projector)
        embeds = torch.cat([sel.tokens, llm.get_input_embeddings()(prompt)], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        out = llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8, do_sample=False)
        return sel.tokens.shape[1], out

    n_full, ids_full = generate("fastervlm", budget=1.0)  # budget 1.0 keeps every token: no compression
    n_small, ids_small = generate("fastervlm", budget=16)  # the 16 patches the CLS token attends to most
    print(f"{n_full} visual tokens -> {ids_full.tolist()}")
    print(f"{n_small} visual tokens -> {ids_small.tolist()}")
    # ---- README snippet ends ----
    return {"n_full": n_full, "n_small": n_small, "ids_full": ids_full, "ids_small": ids_small, "pre": preprocess}


def test_readme_example(monkeypatch):
    if not hasattr(vtc, "encode_and_reduce"):  # until vtc/__init__.py re-exports it
        monkeypatch.setattr(vtc, "encode_and_reduce", encoders.encode_and_reduce, raising=False)
    out = readme_example()
    assert out["n_full"] == 64 and out["n_small"] == 16
    for ids in (out["ids_full"], out["ids_small"]):
        assert ids.dim() == 2 and ids.shape[0] == 1 and 1 <= ids.shape[1] <= 8


def test_readme_shows_this_example():
    import pathlib
    import textwrap

    src = pathlib.Path(__file__).read_text()
    a = src.index("# ---- README snippet starts ----\n") + len("# ---- README snippet starts ----\n")
    b = src.rindex("\n", 0, src.index("# ---- README snippet ends ----"))
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    assert textwrap.dedent(src[a:b]).strip() in readme
