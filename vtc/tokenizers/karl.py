"""KARL: Kolmogorov-approximating representation learning — one-pass adaptive-length tokens for a requested error.

Duggal et al., "Single-pass Adaptive Image Tokenization for Minimum Program Search", arXiv 2507.07995; reference code
github.com/ShivamDuggal4/karl (successor of ALIT, arXiv 2411.02393).

What is implemented, as in the paper and its code:
- the encoder input is `[e(eps); image patches; latents[:T]]` under bidirectional attention, where e(eps) is a
  learned **condition token** for the desired per-pixel L1 error eps (images in [0, 1]), read from a table of
  `error_bins` (the reference's 19 bins 0.005 .. 0.38, each row initialised to its bin value); a requested or
  measured error is binned to the **smallest bin >= it** (the last bin if none);
- per latent token, a **halting head** (LayerNorm -> Linear -> tanh -> Linear -> 1 logit) and a LayerNorm ->
  linear projection to `vq_dim` followed by VQ (l2-normalised lookup, commitment 0.25);
- the decoder sees the image queries and the quantised latents; latents whose halting probability is above
  `halt_threshold` (0.75) are removed from attention (`core.PixelDecoder`, tail="remove" with a key mask);
- **every training iteration has two phases** (the paper's upside-down-RL analogue):
  A. *estimate the image's complexity*: draw one T per batch from {s, 2s, ..., K} (s = `count_step`, default K/16,
     like the reference's multiples of 16 up to 256), a near-lossless eps per image from a distribution over the
     bins <= `phase_a_max_error` (0.04) that is decayed by `phase_a_decay` (0.99) for every bin >= the batch's
     smallest reached error (the reference's schedule), encode with T latents, train reconstruction + VQ + halting
     BCE towards "all active", and measure each image's reached L1 error e_T (no gradient);
  B. *learn to halt*: encode with all K latents conditioned on bin(e_T); halting targets are 0 for tokens < T and
     1 for tokens >= T (two BCE means, as in the reference), the decoder drops the tokens the head predicts as
     halted (hard, no gradient through the mask), and reconstruction + VQ losses are added. As in the reference,
     with probability `rebin_prob` (0.45) the condition is randomised when T is the largest count (any stricter or
     equal bin, since all tokens are used anyway) or the smallest (any looser or equal bin);
- **inference is one encoder pass**: `encode(x, error=eps)` encodes K latents conditioned on eps and keeps the
  tokens with p_halt <= 0.75; `predict_num_tokens` returns their count per image.

Pinned choices at this scale: pixels are patchified directly instead of the reference's frozen VQGAN / VAE latent
space, reconstruction is pixel MSE (stage 2's LPIPS and GAN are not used); the kept set is exactly the non-halted
tokens as in the reference (not forced to be a prefix), and at least one token (the least-halted) is always kept;
`encode(x, num_tokens=k)` without `error` encodes k latents conditioned on the strictest bin and keeps all k (the
phase-A request); the rebinning special cases are generalised from the reference's T = 256 / T = 32 to T = K / T = s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import TokenizedImages, Tokenizer1D, TokenizerConfig, register_tokenizer
from .core import LatentEncoder, PixelDecoder
from .quantizers import build_quantizer

REFERENCE_BINS = (
    0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.09, 0.1, 0.12, 0.14, 0.16, 0.18, 0.2, 0.24, 0.28, 0.32, 0.38,
)  # fmt: skip


@dataclass
class KarlConfig(TokenizerConfig):
    quantizer: str = "vq"  # KARL's quantised variant uses VQ (4096 x 12 in the paper)
    pos_embed: str = "learned"  # patch position embedding
    error_bins: tuple[float, ...] = REFERENCE_BINS  # desired-L1-error bins (ascending), one embedding each
    halt_threshold: float = 0.75  # a token halts (is dropped) when p_halt > this
    halt_hidden: int = 128  # halting MLP hidden size (512 at width 1024 in the paper)
    count_step: int = 0  # phase A draws T from {s, 2s, ..., K}; 0 = max(1, K // 16)
    phase_a_max_error: float = 0.04  # phase A's eps distribution starts uniform over bins <= this
    phase_a_decay: float = 0.99  # per-iteration decay of phase-A bins >= the batch's smallest reached error
    rebin_prob: float = 0.45  # probability of the randomised condition at T = K and T = s

    def __post_init__(self) -> None:
        super().__post_init__()
        self.error_bins = tuple(float(v) for v in self.error_bins)
        bins = self.error_bins
        if len(bins) < 2 or any(b <= 0 for b in bins) or any(x >= y for x, y in zip(bins[:-1], bins[1:], strict=True)):
            raise ValueError(f"error_bins must be >= 2 positive ascending values, got {bins}")
        if not 0 < self.halt_threshold < 1:
            raise ValueError(f"halt_threshold={self.halt_threshold} must be in (0, 1)")
        if self.count_step < 0 or self.count_step > self.num_tokens:
            raise ValueError(f"count_step={self.count_step} must be in [0, num_tokens={self.num_tokens}]")
        if self.phase_a_max_error < bins[0]:
            raise ValueError(f"phase_a_max_error={self.phase_a_max_error} is below the smallest bin {bins[0]}")

    @property
    def step(self) -> int:
        return self.count_step or max(1, self.num_tokens // 16)


@register_tokenizer("karl", config=KarlConfig)
class Karl(Tokenizer1D):
    """KARL on the shared core: error-conditioned encoder, per-token halting head, VQ tokens."""

    runtime_fields = ("halt_threshold",)
    paper = "arXiv 2507.07995"

    def __init__(self, config: KarlConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        self.encoder = LatentEncoder(
            c.image_size, c.patch_size, c.width, c.enc_depth, c.num_heads, c.num_tokens, c.mlp_ratio,
            register_attention="full", pos_embed=c.pos_embed,
        )  # fmt: skip
        self.ln_halt = nn.LayerNorm(c.width)
        self.halt_mlp = nn.Sequential(nn.Linear(c.width, c.halt_hidden), nn.Tanh(), nn.Linear(c.halt_hidden, 1))
        self.ln_code = nn.LayerNorm(c.width)
        self.to_code = nn.Linear(c.width, c.code_dim)
        self.quantizer = build_quantizer(
            c.quantizer, c.fsq_levels, c.vq_codebook_size, c.vq_dim, c.vq_commitment, c.vq_restart_after
        )
        self.decoder = PixelDecoder(
            c.image_size, c.patch_size, c.width, c.dec_depth, c.num_heads, c.num_tokens, c.code_dim, c.mlp_ratio,
            tail="remove",
        )  # fmt: skip
        bins = torch.tensor(c.error_bins)
        self.register_buffer("bins", bins, persistent=False)
        self.error_embed = nn.Parameter(bins[:, None].repeat(1, c.width).clone())  # [nbins, w], reference init
        probs = (bins <= c.phase_a_max_error).float()
        self.register_buffer("phase_a_probs", probs / probs.sum())  # persistent: training resumes with it

    # ------------------------------------------------------------------ pieces
    def bin_index(self, error: Tensor) -> Tensor:
        """`[B]` index of the smallest bin >= error (the last bin when the error is above every bin)."""
        above = self.bins[None, :] >= error[:, None]  # [B, nbins]
        idx = above.float().argmax(1)
        return torch.where(above.any(1), idx, torch.full_like(idx, len(self.bins) - 1))

    def _encode(self, x: Tensor, n: int, bin_idx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Encoder pass: (features, halting logits [B, n], codes, ids, VQ loss)."""
        feats = self.encoder(x, num_latents=n, prefix=self.error_embed[bin_idx][:, None])  # [B, n, w]
        logits = self.halt_mlp(self.ln_halt(feats))[..., 0]  # [B, n]
        codes, ids, qloss = self.quantizer(self.to_code(self.ln_code(feats)))
        return feats, logits, codes, ids, qloss

    def keep_from_logits(self, logits: Tensor, at_least_one: bool = True) -> Tensor:
        """`[B, n]` tokens kept: p_halt <= halt_threshold (plus the least-halted token if none is)."""
        keep = torch.sigmoid(logits) <= self.config.halt_threshold
        if at_least_one:
            none = ~keep.any(1)
            keep[none, logits[none].argmin(1)] = True
        return keep

    def _check_error(self, error: float | Tensor, b: int, device: torch.device) -> Tensor:
        e = torch.as_tensor(error, dtype=torch.float32, device=device).reshape(-1)
        if e.numel() == 1:
            e = e.expand(b)
        if e.numel() != b:
            raise self._fail(f"error must be a float or one value per image ({b}), got {e.numel()} values")
        if not bool(torch.isfinite(e).all()) or bool((e <= 0).any()):
            raise self._fail(f"error must be > 0 (mean L1 per pixel, images in [0, 1]), got {e.tolist()}")
        return e

    # ------------------------------------------------------------------ API
    def encode(
        self, images: Tensor, num_tokens: int | None = None, error: float | Tensor | None = None
    ) -> TokenizedImages:
        """Tokens of `images [B, 3, S, S]` in [0, 1].

        With `error` (a float or `[B]`, desired mean L1 per pixel): one pass over `num_tokens` (default K) latents
        conditioned on it; `mask` marks the non-halted tokens, so each image picks its own length (`.lengths`).
        Without `error`: `num_tokens` latents conditioned on the strictest bin, all kept.
        `extras["halt_prob"]` holds the `[B, n]` halting probabilities.
        """
        x = self.check_images(images)
        k = self.check_num_tokens(num_tokens)
        b = x.shape[0]
        if error is None:
            idx = torch.zeros(b, dtype=torch.long, device=x.device)
        else:
            idx = self.bin_index(self._check_error(error, b, x.device))
        feats, logits, _, ids, _ = self._encode(x, k, idx)
        extras = {"halt_prob": torch.sigmoid(logits), "error_bin": self.bins[idx]}
        mask = None if error is None else self.keep_from_logits(logits)
        return TokenizedImages(ids, mask, feats, extras)

    @torch.no_grad()
    def predict_num_tokens(self, images: Tensor, error: float | Tensor) -> Tensor:
        """`[B]` token counts in [1, K] for the requested error, from a single encoder pass."""
        return self.encode(images, error=error).lengths

    def decode(self, tokens: TokenizedImages | Tensor) -> Tensor:
        """Images `[B, 3, S, S]` in [0, 1]; tokens outside `tokens.mask` are removed from the decoder's attention."""
        t = self.check_tokens(tokens, self.quantizer.codebook_size)
        codes = self.quantizer.ids_to_codes(t.ids).to(self.to_code.weight.dtype)
        return self.to_unit(self.decoder(codes, t.mask))

    # ------------------------------------------------------------------ training
    def sample_count(self) -> int:
        """Phase A's token count T for this batch (K without tail dropout)."""
        c = self.config
        if not c.tail_dropout:
            return c.num_tokens
        counts = list(range(c.step, c.num_tokens + 1, c.step))
        return counts[int(torch.randint(len(counts), ()))]

    def rebin(self, idx: Tensor, t_count: int) -> Tensor:
        """Phase B's randomised condition at the extreme counts (see the module docstring)."""
        c = self.config
        if torch.rand(()) >= c.rebin_prob:
            return idx
        u = torch.rand(idx.shape, device=idx.device)
        last = len(c.error_bins) - 1
        if t_count == c.num_tokens:  # all tokens used anyway: any stricter-or-equal request is satisfied too
            return torch.floor(u * (idx + 1).float()).long()
        if t_count == c.step:  # the fewest tokens already reach e_T, so any looser request stops there too
            return (idx.float() + torch.floor(u * (last - idx + 1).float())).long().clamp(max=last)
        return idx

    def training_loss(self, images: Tensor) -> tuple[Tensor, dict[str, float]]:
        c = self.config
        x = self.check_images(images)
        b, k = x.shape[0], c.num_tokens

        # Phase A: encode with T latents at a near-lossless request; measure the error reached.
        t_count = self.sample_count()
        idx_a = torch.multinomial(self.phase_a_probs, b, replacement=True)
        _, logits_a, codes_a, _, q_a = self._encode(x, t_count, idx_a)
        rec_a = self.decoder(codes_a)
        mse_a = F.mse_loss(rec_a, x)
        halt_a = F.binary_cross_entropy_with_logits(logits_a, torch.zeros_like(logits_a))
        with torch.no_grad():
            err = ((rec_a.detach().clamp(-1, 1) - x).abs() / 2).mean((1, 2, 3))  # [B] L1 in [0, 1] units
            if self.training:
                probs = self.phase_a_probs.clone()
                probs[self.bins >= err.min()] *= c.phase_a_decay
                self.phase_a_probs.copy_(probs / probs.sum())

        # Phase B: all K latents conditioned on bin(e_T); learn to halt at T; decode what the head keeps.
        idx_b = self.rebin(self.bin_index(err), t_count)
        _, logits_b, codes_b, _, q_b = self._encode(x, k, idx_b)
        keep_b = self.keep_from_logits(logits_b.detach(), at_least_one=False)
        rec_b = self.decoder(codes_b, keep_b)
        mse_b = F.mse_loss(rec_b, x)
        halt_b = F.binary_cross_entropy_with_logits(logits_b[:, :t_count], torch.zeros_like(logits_b[:, :t_count]))
        if t_count < k:
            tail = logits_b[:, t_count:]
            halt_b = halt_b + F.binary_cross_entropy_with_logits(tail, torch.ones_like(tail))

        total = mse_a + q_a + halt_a + mse_b + q_b + halt_b
        logs = {
            "loss": float(total.detach()),
            "rec": float(mse_a.detach()),
            "rec_b": float(mse_b.detach()),
            "halt": float((halt_a + halt_b).detach()),
            "T": float(t_count),
            "err": float(err.mean()),
            "kept_b": float(keep_b.sum(1).float().mean()),
        }
        return total, logs
