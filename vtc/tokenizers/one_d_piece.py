"""One-D-Piece: an image tokenizer meets quality-controllable compression.

Miwa et al., "One-D-Piece: Image Tokenizer Meets Quality-Controllable Compression", arXiv 2501.10064; reference code
github.com/turingmotors/One-D-Piece (TiTok with Tail Token Drop).

What is implemented, as in the paper:
- TiTok's encoder: K learned latent tokens appended to the image patches under **bidirectional** attention (so,
  unlike FlexTok, a prefix is taken from a full K-token encode: `encode(x, num_tokens=k)` encodes K and keeps the
  first k), a linear projection to `vq_dim` and a **VQ** codebook (l2-normalised lookup, commitment 0.25;
  `quantizers.VectorQuantizer`);
- **Tail Token Drop** in training: one length n ~ U{1..K} is drawn **per batch** and the decoder receives only the
  first n quantised tokens with the position embeddings sliced to [:n]. The tail is **removed** from the decoder
  sequence (length N + n, plus the one sink token below), not replaced by a mask token; the decoder has no mask
  token at all.

Two pinned choices make the prefix curve rise at this scale (2 000-step runs on 32-px procedural images, 256
held-out, PSNR from k = 1 to 32): with TiTok's learned patch positions and the tail removed the curve was flat
(17.7 -> 18.5 dB; FSQ instead of VQ, per-image lengths, causal latents, codebook restarts, code dim and learning rate
changed nothing), masking the tail instead of removing it fixed it only with fixed positions (+2.9 dB), and the
paper's removal kept but with one learned **sink token always present in the decoder** and **fixed sin-cos patch
positions** gave 16.5 -> 20.6 dB (+4.2, as FlexTok's +4.1 in the same steps; sink alone or sin-cos alone: flat).
So `decoder_sink=True` and `pos_embed="sincos"` are the defaults; the tail is still removed, not masked.

Pinned simplifications at this scale: single-stage training with pixel MSE (+ the VQ loss) through a linear patch
head, instead of the paper's two stages (proxy codes of a frozen MaskGIT-VQGAN, then pixel decoder fine-tuning with
perceptual and GAN losses); the ViT sizes are tiny (`TokenizerConfig` defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import TokenizedImages, Tokenizer1D, TokenizerConfig, register_tokenizer
from .core import LatentEncoder, PixelDecoder, weighted_mse
from .quantizers import build_quantizer


@dataclass
class OneDPieceConfig(TokenizerConfig):
    quantizer: str = "vq"  # One-D-Piece (TiTok) uses VQ
    pos_embed: str = "sincos"  # fixed 2-D sin-cos patch positions (TiTok learns them; see the module docstring)
    decoder_sink: bool = True  # one learned token always in the decoder sequence (see the module docstring)


@register_tokenizer("one_d_piece", config=OneDPieceConfig)
class OneDPiece(Tokenizer1D):
    """TiTok with Tail Token Drop: bidirectional encoder, VQ tokens, decoder that drops the tail."""

    paper = "arXiv 2501.10064"

    def __init__(self, config: OneDPieceConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        self.encoder = LatentEncoder(
            c.image_size, c.patch_size, c.width, c.enc_depth, c.num_heads, c.num_tokens, c.mlp_ratio,
            register_attention="full", pos_embed=c.pos_embed,
        )  # fmt: skip
        self.to_code = nn.Linear(c.width, c.code_dim)
        self.quantizer = build_quantizer(
            c.quantizer, c.fsq_levels, c.vq_codebook_size, c.vq_dim, c.vq_commitment, c.vq_restart_after
        )
        self.decoder = PixelDecoder(
            c.image_size, c.patch_size, c.width, c.dec_depth, c.num_heads, c.num_tokens, c.code_dim, c.mlp_ratio,
            tail="remove", sink=c.decoder_sink,
        )  # fmt: skip

    def encode(self, images: Tensor, num_tokens: int | None = None) -> TokenizedImages:
        """The first `num_tokens` (default K) of the K tokens of `images [B, 3, S, S]` in [0, 1]."""
        x = self.check_images(images)
        k = self.check_num_tokens(num_tokens)
        feats = self.encoder(x)  # [B, K, w]: bidirectional, so always all K latents
        _, ids, _ = self.quantizer(self.to_code(feats))
        return TokenizedImages(ids[:, :k], None, feats[:, :k])

    def decode(self, tokens: TokenizedImages | Tensor) -> Tensor:
        """Images `[B, 3, S, S]` in [0, 1] from the first n tokens; the missing tail is removed, not masked."""
        t = self.check_tokens(tokens, self.quantizer.codebook_size)
        codes = self.quantizer.ids_to_codes(t.ids).to(self.to_code.weight.dtype)  # [B, n, d]
        return self.to_unit(self.decoder(codes, t.mask))

    def training_loss(self, images: Tensor, weight: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        x = self.check_images(images)
        w = self.check_weight(weight, x)
        k_max = self.config.num_tokens
        feats = self.encoder(x)
        codes, _, qloss = self.quantizer(self.to_code(feats))  # [B, K, d]
        n = int(torch.randint(1, k_max + 1, ())) if self.config.tail_dropout else k_max  # one length per batch
        rec = self.decoder(codes[:, :n])  # Tail Token Drop: the decoder sequence is N + n long
        loss = weighted_mse(rec, x, w)
        total = loss + qloss
        return total, {
            "loss": float(total.detach()),
            "rec": float(loss.detach()),
            "vq": float(qloss.detach()),
            "n": float(n),
        }
