"""The tokenizers that ship in assets/tokenizers/ load with `pretrained=True` and keep their measured prefix curve.

Measured by `python -m vtc.eval.report_tokenizers` on 500 held-out procedural images (README): PSNR k = 1 -> 32
FlexTok 17.3 -> 22.5 dB, One-D-Piece 17.7 -> 23.9, the no-tail-dropout FlexTok 11.0 -> 22.9. Here 64 held-out images
(the training script's held-out seed), with floors a few dB under those values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vtc
from vtc.tokenizers.data import synthetic_images
from vtc.train.tokenizer import prefix_psnr

ROOT = Path(__file__).resolve().parents[1] / "assets" / "tokenizers"
# name -> (min PSNR at k = 1, min PSNR at k = K, min gain from 1 to K), all dB
FLOORS = {
    "flextok": (15.0, 20.5, 3.0),
    "one_d_piece": (15.0, 21.5, 4.0),
    "flextok_no_tail_dropout": (None, 20.5, 7.0),  # no tail dropout: collapses at k = 1 (11 dB) but not at K
}


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_shipped_tokenizer_prefix_curve(name):
    if not (ROOT / name / "model.safetensors").exists():
        pytest.skip(f"{name} is not shipped")
    torch.manual_seed(0)
    if name.endswith("_no_tail_dropout"):
        tok = vtc.tokenizers.Tokenizer1D.from_pretrained(ROOT / name)
    else:
        tok = vtc.create_tokenizer(name, pretrained=True)
    images, _ = synthetic_images(64, tok.config.image_size, seed=10_000)
    curve = prefix_psnr(tok, images)
    k_max = tok.config.num_tokens
    lo, hi, gain = FLOORS[name]
    if lo is not None:
        assert curve[1] >= lo, curve
    else:
        assert curve[1] <= 14.0, curve  # the ablation's short prefixes are unusable
    assert curve[k_max] >= hi and curve[k_max] - curve[1] >= gain, curve
