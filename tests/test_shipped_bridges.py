"""The tokenizer bridges that ship in assets/ (`vtc train bridge`: a trained 1-D tokenizer as the vision tower of a
stock LLaVA): each loads with stock transformers classes, answers held-out vtc-shapes questions through stock
`generate()` at (at least) the accuracy it was shipped with, and its tokenizer's own order is a better selection than
random at the same budget."""

from __future__ import annotations

import pytest
import torch
from test_shipped_vlm import _answers  # stock generate() on chat-template prompts
from vtc.adapters import compressed
from vtc.eval.benchmarks import shapes as S
from vtc.eval.harness import load_model, resolve_model_path

# floors a little under each shipped bridge's accuracy on these 150 test questions (measured values in the comments;
# README: the 600-question tables): (all 32 tokens, `prefix` at 8 tokens, whether those beat 8 random tokens).
# KARL's `prefix` keeps min(8, the length its halting picks for the error it was trained at): 2.6 tokens on average
# at 0.08, fewer than random's 8, so its order is not compared there.
FLOORS = {
    "tiny-flextok-llava-shapes": (0.85, 0.8, True),  # 0.920, 0.867 (random 8: 0.740)
    "tiny-karl-llava-shapes": (0.55, 0.38, False),  # 0.627, 0.453 (random 8: 0.433)
    "tiny-one-d-piece-llava-shapes": (0.88, 0.78, True),  # 0.940, 0.847 (random 8: 0.607)
}


def _accuracy(model, processor, bench) -> float:
    preds = _answers(model, processor, list(bench))
    return sum(p == s.answer for s, p in zip(bench, preds, strict=True)) / len(bench)


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_shipped_bridge_answers_and_its_order_beats_random(name):
    model, processor = load_model(resolve_model_path(name))  # raises if the bridge is not in assets/
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(model.model.vision_tower).__name__ == "TokenizerTower"
    bench = S.ShapesBenchmark(split="test", per_type=25)  # 150 questions
    full = _accuracy(model, processor, bench)
    with compressed(model, "prefix", budget=8):
        first8 = _accuracy(model, processor, bench)
    torch.manual_seed(0)
    with compressed(model, "random", budget=8):
        random8 = _accuracy(model, processor, bench)
    floor_full, floor_8, beats_random = FLOORS[name]
    assert full >= floor_full and first8 >= floor_8, (full, first8)
    if beats_random:  # the tokenizer's order carries the image's content first
        assert first8 > random8, (first8, random8)
