"""FlexTok: resampling images into 1-D token sequences of flexible length.

Bachmann et al., "FlexTok: Resampling Images into 1D Token Sequences of Flexible Length", arXiv 2502.13967
(ICML 2025); reference code github.com/apple/ml-flextok (inference only, no training code released).

What is implemented, as in the paper:
- the encoder appends K learned **registers** to the image patches under the `causal_last` mask: patches attend to
  patches only, register i attends to every patch and causally to registers 0..i. A k-prefix therefore does not
  depend on later registers, and `encode(x, num_tokens=k)` runs only k registers (bit-identical to the first k of
  a K-register encode, see `core.Attention`);
- a linear head and **FSQ** (default levels (8, 5, 5, 5); the paper uses [8, 8, 8, 5, 5, 5]);
- **nested dropout** in training: per sample, keep k registers and replace registers >= k with one learned mask
  token; k is sampled per sample by `"uniform"` (k ~ U{1..K}), `"pow2"` (k uniform over {1, 2, 4, ..., K}) or
  `"uniform_pow2"` (k ~ U{1..K} rounded up to a power of two), the reference code's three modes;
- a **rectified-flow decoder** (`decoder="flow"`) conditioned on the kept registers: noised image patches and
  registers are one sequence under full attention, with AdaLN-zero time conditioning that has separate modulation
  for patch rows and register rows; it predicts v = eps - x0 for x_t = t * eps + (1 - t) * x0 with
  t ~ sigmoid(N(0, 1)), and samples by Euler steps from t = 1 to 0 (`flow_steps`, default 25). A null condition
  (all registers zeroed) is trained with probability `cond_drop_prob` so that classifier-free guidance
  (`guidance_scale` != 1) works.

Pinned simplifications at this scale (documented, not hidden):
- pixels are patchified directly (4x4 patches of a 32x32 image) instead of the paper's SDXL-style VAE latents; no
  REPA loss; no APG guidance (plain CFG); the shared pre-LN GELU ViT block replaces SwiGLU/QK-norm;
- `decoder="mse"` (the default, for cheap CPU training) swaps the flow decoder for the shared deterministic
  `PixelDecoder` (mask-token tail) trained with pixel MSE. `decoder="flow"` is the paper's decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import TokenizedImages, Tokenizer1D, TokenizerConfig, register_tokenizer
from .core import (
    Attention,
    LatentEncoder,
    PixelDecoder,
    embedding,
    fill_tail,
    patchify,
    sincos_2d,
    timestep_embedding,
    unpatchify,
    weighted_mse,
)
from .quantizers import build_quantizer

SAMPLING_MODES = ("uniform", "pow2", "uniform_pow2")


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def sample_keep_k(mode: str, num_tokens: int, batch: int, device: torch.device | None = None) -> Tensor:
    """`[B]` nested-dropout keep counts in [1, K], drawn from the torch RNG."""
    k = torch.randint(1, num_tokens + 1, (batch,), device=device)
    if mode == "uniform":
        return k
    if mode == "pow2":
        exps = torch.randint(0, num_tokens.bit_length(), (batch,), device=device)  # K = 2^(bit_length - 1)
        return 2**exps
    if mode == "uniform_pow2":
        return 2 ** torch.ceil(torch.log2(k.double())).long()
    raise ValueError(f"nested_sampling={mode!r} is not one of {SAMPLING_MODES}")


@dataclass
class FlexTokConfig(TokenizerConfig):
    quantizer: str = "fsq"  # FlexTok uses FSQ
    decoder: str = "mse"  # "flow" (the paper's rectified-flow decoder) or "mse" (deterministic, cheap)
    nested_sampling: str = "uniform"  # "uniform", "pow2" or "uniform_pow2" (pow2 modes need K a power of two)
    flow_steps: int = 25  # Euler steps when sampling the flow decoder
    guidance_scale: float = 1.0  # classifier-free guidance scale at sampling (1 = off)
    cond_drop_prob: float = 0.1  # flow decoder: probability of training the null (all-zero) condition
    pos_embed: str = "sincos"  # patch position embedding: "sincos" (FlexTok) or "learned"
    repa_dim: int = 0  # REPA: width of the teacher's per-patch features (0 = no REPA projector)
    repa_layer: int = 1  # REPA: decoder blocks before the hidden states are aligned
    repa_weight: float = 1.0  # REPA: weight of the alignment loss (when training_loss gets `align`)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decoder not in ("mse", "flow"):
            raise ValueError(f"decoder={self.decoder!r} is not one of 'mse', 'flow'")
        if self.nested_sampling not in SAMPLING_MODES:
            raise ValueError(f"nested_sampling={self.nested_sampling!r} is not one of {SAMPLING_MODES}")
        if self.nested_sampling != "uniform" and not _is_pow2(self.num_tokens):
            raise ValueError(
                f"nested_sampling={self.nested_sampling!r} needs num_tokens a power of two, got {self.num_tokens}"
            )
        if self.flow_steps < 1:
            raise ValueError(f"flow_steps={self.flow_steps} must be >= 1")
        if not 0 <= self.cond_drop_prob < 1:
            raise ValueError(f"cond_drop_prob={self.cond_drop_prob} must be in [0, 1)")
        if self.repa_dim < 0 or (self.repa_dim and not 1 <= self.repa_layer <= self.dec_depth):
            raise ValueError(
                f"repa_dim={self.repa_dim} must be >= 0 and repa_layer={self.repa_layer} in 1..dec_depth="
                f"{self.dec_depth}"
            )
        if not self.repa_weight >= 0:
            raise ValueError(f"repa_weight={self.repa_weight} must be >= 0")


class AdaLNBlock(nn.Module):
    """Pre-LN block with AdaLN-zero time modulation, one modulation for patch rows and one for register rows."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.mod_patch = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.mod_reg = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, num_patches: int) -> Tensor:
        n_reg = x.shape[1] - num_patches
        mod = torch.cat(
            [self.mod_patch(c)[:, None].expand(-1, num_patches, -1), self.mod_reg(c)[:, None].expand(-1, n_reg, -1)],
            dim=1,
        )  # [B, L, 6w]
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
        x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + sh1)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)


class FlowDecoder(nn.Module):
    """Rectified-flow decoder: `forward(x_t [B,3,H,W], t [B], codes [B,n,d], keep, null) -> v [B,3,H,W]`."""

    def __init__(self, cfg: FlexTokConfig) -> None:
        super().__init__()
        w, p = cfg.width, cfg.patch_size
        grid = cfg.image_size // p
        self.patch_size = p
        self.num_patches = grid * grid
        self.num_latents = cfg.num_tokens
        self.patch_in = nn.Linear(p * p * 3, w)
        self.register_buffer("pos_embed", sincos_2d(grid, w), persistent=False)
        self.reg_in = nn.Linear(cfg.code_dim, w)
        self.reg_pos = embedding(cfg.num_tokens, w)
        self.mask_token = embedding(w)
        self.time_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.blocks = nn.ModuleList([AdaLNBlock(w, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.dec_depth)])
        self.norm_out = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.mod_out = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.head = nn.Linear(w, p * p * 3)

    def zero_init(self) -> None:
        """AdaLN-zero: every modulation and the output head start at zero (DiT)."""
        for blk in self.blocks:
            for m in (blk.mod_patch[1], blk.mod_reg[1]):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        for m in (self.mod_out[1], self.head):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        codes: Tensor,
        keep: Tensor | None = None,
        null: Tensor | None = None,
        capture: int = 0,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """v `[B, 3, H, W]`; with `capture` = l >= 1 also the patch rows' hidden states after block l `[B, N, w]`."""
        n = codes.shape[1]
        reg = fill_tail(self.reg_in(codes) + self.reg_pos[:n], keep, self.mask_token, self.num_latents)  # [B, K, w]
        if null is not None:
            reg = reg * (~null).to(reg.dtype)[:, None, None]  # null condition: registers zeroed
        patches = self.patch_in(patchify(x_t, self.patch_size)) + self.pos_embed  # [B, N, w]
        c = self.time_mlp(timestep_embedding(t, patches.shape[-1]))  # [B, w]
        h = torch.cat([patches, reg], dim=1)
        hidden = None
        for i, blk in enumerate(self.blocks):
            h = blk(h, c, self.num_patches)
            if i + 1 == capture:
                hidden = h[:, : self.num_patches]  # [B, N, w]
        shift, sc = self.mod_out(c)[:, None].chunk(2, dim=-1)
        out = self.head(self.norm_out(h[:, : self.num_patches]) * (1 + sc) + shift)  # [B, N, p*p*3]
        return unpatchify(out, self.patch_size) if not capture else (unpatchify(out, self.patch_size), hidden)


@register_tokenizer("flextok", config=FlexTokConfig)
class FlexTok(Tokenizer1D):
    """FlexTok on the shared core: causal registers, FSQ, nested dropout, flow or MSE decoder."""

    runtime_fields = ("flow_steps", "guidance_scale")
    paper = "arXiv 2502.13967"

    def __init__(self, config: FlexTokConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        self.encoder = LatentEncoder(
            c.image_size, c.patch_size, c.width, c.enc_depth, c.num_heads, c.num_tokens, c.mlp_ratio,
            register_attention="causal", pos_embed=c.pos_embed,
        )  # fmt: skip
        self.quantizer = build_quantizer(
            c.quantizer, c.fsq_levels, c.vq_codebook_size, c.vq_dim, c.vq_commitment, c.vq_restart_after
        )
        self.to_code = nn.Linear(c.width, c.code_dim)
        if c.decoder == "mse":
            self.decoder = PixelDecoder(
                c.image_size, c.patch_size, c.width, c.dec_depth, c.num_heads, c.num_tokens, c.code_dim,
                c.mlp_ratio, tail="mask",
            )  # fmt: skip
        else:
            self.decoder = FlowDecoder(c)
        if c.decoder == "flow":
            self.decoder.zero_init()
        if c.repa_dim:  # REPA's projector: decoder hidden state -> teacher feature (a training-time head)
            self.repa_proj = nn.Sequential(
                nn.Linear(c.width, 2 * c.width), nn.SiLU(), nn.Linear(2 * c.width, 2 * c.width), nn.SiLU(),
                nn.Linear(2 * c.width, c.repa_dim),
            )  # fmt: skip

    def quantize(self, feats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.quantizer(self.to_code(feats))

    def encode(self, images: Tensor, num_tokens: int | None = None) -> TokenizedImages:
        """Tokens of `images [B, 3, S, S]` in [0, 1]: `num_tokens` (default K) registers, only those are run."""
        x = self.check_images(images)
        k = self.check_num_tokens(num_tokens)
        feats = self.encoder(x, num_latents=k)  # [B, k, w]
        _, ids, _ = self.quantize(feats)
        return TokenizedImages(ids, None, feats)

    def decode(
        self,
        tokens: TokenizedImages | Tensor,
        steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Images `[B, 3, S, S]` in [0, 1] from any token prefix (missing registers become the mask token).

        The flow decoder samples (`steps` Euler steps, `guidance_scale`, noise from `generator`); the MSE decoder
        is deterministic and ignores those arguments.
        """
        t = self.check_tokens(tokens, self.quantizer.codebook_size)
        codes = self.quantizer.ids_to_codes(t.ids).to(self.to_code.weight.dtype)  # [B, n, d]
        if self.config.decoder == "mse":
            return self.to_unit(self.decoder(codes, t.mask))
        return self.to_unit(self.sample(codes, t.mask, steps, guidance_scale, generator))

    def sample(
        self,
        codes: Tensor,
        keep: Tensor | None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Euler integration of the flow from noise (t = 1) to an image (t = 0); returns [-1, 1] pixels."""
        steps = self.config.flow_steps if steps is None else int(steps)
        if steps < 1:
            raise self._fail(f"steps={steps} must be >= 1")
        g = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        b, s = codes.shape[0], self.config.image_size
        x = torch.randn(b, 3, s, s, generator=generator, device=codes.device, dtype=codes.dtype)
        cond_null = torch.zeros(b, dtype=torch.bool, device=codes.device)
        for i in range(steps, 0, -1):
            t = torch.full((b,), i / steps, device=codes.device)
            v = self.decoder(x, t, codes, keep, cond_null)
            if g != 1.0:
                v_null = self.decoder(x, t, codes, keep, ~cond_null)
                v = v_null + g * (v - v_null)
            x = x - v / steps
        return x

    def sample_keep(self, batch: int, device: torch.device) -> Tensor:
        """`[B, K]` nested-dropout keep mask for one training batch (all True without tail dropout)."""
        c = self.config
        if not c.tail_dropout:
            return torch.ones(batch, c.num_tokens, dtype=torch.bool, device=device)
        k = sample_keep_k(c.nested_sampling, c.num_tokens, batch, device)
        return torch.arange(c.num_tokens, device=device)[None] < k[:, None]

    def training_loss(
        self, images: Tensor, weight: Tensor | None = None, align: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """The reconstruction (or flow) loss under nested dropout, plus, when `align [B, N, repa_dim]` gives a
        teacher's feature for each of the N decoder patches (raster order), FlexTok's REPA term: `repa_weight` ×
        mean (1 - cosine) between `repa_proj` of the decoder's patch states after block `repa_layer` and `align`."""
        x = self.check_images(images)
        w = self.check_weight(weight, x)
        c = self.config
        b = x.shape[0]
        if align is not None:
            n = (c.image_size // c.patch_size) ** 2
            if not c.repa_dim:
                raise self._fail("align (REPA) needs a model built with repa_dim = the teacher's feature width")
            if tuple(align.shape) != (b, n, c.repa_dim):
                raise self._fail(f"align must be [B, N, repa_dim] = {(b, n, c.repa_dim)}, got {tuple(align.shape)}")
        capture = c.repa_layer if align is not None else 0
        feats = self.encoder(x)  # [B, K, w]
        codes, _, qloss = self.quantize(feats)
        keep = self.sample_keep(b, x.device)
        if c.decoder == "mse":
            out = self.decoder(codes, keep, capture=capture)
            rec, hidden = out if capture else (out, None)
            loss = weighted_mse(rec, x, w)
        else:
            noise = torch.randn_like(x)
            t = torch.sigmoid(torch.randn(b, device=x.device))
            tt = t[:, None, None, None]
            x_t = tt * noise + (1 - tt) * x
            null = torch.rand(b, device=x.device) < c.cond_drop_prob
            out = self.decoder(x_t, t, codes, keep, null, capture=capture)
            v, hidden = out if capture else (out, None)
            loss = weighted_mse(v, noise - x, w)
        total = loss + qloss
        logs = {"rec": float(loss.detach()), "mean_k": float(keep.sum(1).float().mean())}
        if hidden is not None:
            cos = nn.functional.cosine_similarity(self.repa_proj(hidden), align.to(hidden.dtype), dim=-1)  # [B, N]
            repa = (1 - cos).mean()
            total = total + c.repa_weight * repa
            logs["repa"] = float(repa.detach())
        return total, {"loss": float(total.detach()), **logs}
