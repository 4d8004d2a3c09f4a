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
  B. *learn to halt*: encode with all K latents conditioned on bin(e_T); halting targets are 0 for tokens < T* and
     1 for tokens >= T* (two BCE means, active and halted, as in the reference), the decoder drops the tokens the head
     predicts as halted (hard, no gradient through the mask), and reconstruction + VQ losses are added. T* is the
     **minimum program** for the condition (see "Why the head collapsed" below): phase A also measures, without
     gradient, the error reached with the ladder s, 2s, 4s, ..., K tokens, and T* is the smallest measured count
     (T included) whose error falls in a bin <= the condition's, K if none does. With probability `rebin_prob`
     (0.45) the condition is a uniformly random bin instead of bin(e_T): a stricter bin than any measured count
     reaches gets T* = K, a looser one the fewest tokens that reach it. This generalises the reference's two
     rebinning cases (T = K: any stricter bin -> all tokens; T = s: any looser bin -> s tokens) to every count.
     `halt_target="sampled"` keeps the literal rule (T* = T, rebinning only at T = K / T = s) as the ablation;
- **inference is one encoder pass**: `encode(x, error=eps)` encodes K latents conditioned on eps and keeps the
  tokens with p_halt <= 0.75; `predict_num_tokens` returns their count per image.

Pinned choices at this scale: pixels are patchified directly instead of the reference's frozen VQGAN / VAE latent
space, reconstruction is pixel MSE (stage 2's LPIPS and GAN are not used); the kept set is exactly the non-halted
tokens as in the reference (not forced to be a prefix), and at least one token (the least-halted) is always kept;
`encode(x, num_tokens=k)` without `error` encodes k latents conditioned on the strictest bin and keeps all k (the
phase-A request); the rebinning special cases are generalised from the reference's T = 256 / T = 32 to T = K / T = s.

Why the head collapsed with the literal rule, and the fix (issue 5). With T* = T the head is trained on (image,
bin(e_T)) -> "halt after T", and its Bayes-optimal output is P(T <= i | image, bin). That is informative only if the
reached error moves with T across bins. At tiny scale it does not: on the 25-minute CPU run (2 635 steps, 128 held-out
images) e_T fell only from 0.132 (T = 2) to 0.125 (T = 32) on average, the mean per-image range over the 16 counts was
0.014 L1 against an across-image spread (std) of 0.077, and an image's e_T landed in 1.96 distinct bins over its 16
counts. So within every bin the sampled T stayed uniform (mean 14-21, std 8-10; uniform over {2..32} has 9.2), the
condition carried no information about T, and the head learned the marginal P(T <= i), whose 0.75-crossing is ~24:
22.4 +- 0.5 tokens, mean p_halt 0.467 for every request from 0.01 to 0.38. Not the cause: label balance (47% halted
labels in phase B), gradient flow (error_embed grad norm 2e-2, halting head 1.4) or the condition token being lost:
requests in bin 0.005 (where the phase-A schedule had moved all its mass, phase_a_probs = [1, 0, ...]) got all 32
tokens. The minimum-program target removes the contradiction (the same image and bin now always get the same T*,
the fewest tokens that are as good), which is the paper's objective: the shortest token program meeting the error.
Measured: resuming that checkpoint for 450 steps with the fix (one thread, ~3 min), 256 held-out images, requests
0.02 / 0.04 / 0.07 / 0.1 / 0.14 got 29.3 / 25.0 / 17.7 / 12.2 / 7.8 tokens (std 4-12), Spearman with PNG size
+0.33 .. +0.47, and at 0.07 flat images 6.8 vs cluttered 29.5 tokens; <= 0.01 keeps 32, >= 0.2 keeps 2. Each step
costs ~5 extra no-gradient passes for the ladder.

Reconstruction. With the reference's learned patch positions and halted tokens removed from the decoder, the
fixed-length PSNR-vs-k curve stayed flat (18.3 -> 19.6 dB from 1 to 32 tokens), so the error hardly depended on the
length and the halting head had little to predict. One-D-Piece's decoder, which also removes its tail, had the same
flat curve and the same cure (ablations in `one_d_piece.py`): one learned **sink token always present in the
decoder** and **fixed sin-cos patch positions**, pinned here as the defaults (`decoder_sink`, `pos_embed`). Retrained
with them (45 min, one thread, 500 held-out images): 16.2 -> 21.0 dB from 1 to 32 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import TokenizedImages, Tokenizer1D, TokenizerConfig, register_tokenizer
from .core import LatentEncoder, PixelDecoder, weighted_mse
from .quantizers import build_quantizer

REFERENCE_BINS = (
    0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.09, 0.1, 0.12, 0.14, 0.16, 0.18, 0.2, 0.24, 0.28, 0.32, 0.38,
)  # fmt: skip


@dataclass
class KarlConfig(TokenizerConfig):
    quantizer: str = "vq"  # KARL's quantised variant uses VQ (4096 x 12 in the paper)
    pos_embed: str = "sincos"  # fixed 2-D sin-cos patch positions (see "Reconstruction" in the module docstring)
    decoder_sink: bool = True  # one learned token always in the decoder sequence (idem)
    error_bins: tuple[float, ...] = REFERENCE_BINS  # desired-L1-error bins (ascending), one embedding each
    halt_threshold: float = 0.75  # a token halts (is dropped) when p_halt > this
    halt_hidden: int = 128  # halting MLP hidden size (512 at width 1024 in the paper)
    count_step: int = 0  # phase A draws T from {s, 2s, ..., K}; 0 = max(1, K // 16)
    phase_a_max_error: float = 0.04  # phase A's eps distribution starts uniform over bins <= this
    phase_a_decay: float = 0.99  # per-iteration decay of phase-A bins >= the batch's smallest reached error
    rebin_prob: float = 0.45  # probability of the randomised condition (see the module docstring)
    halt_target: str = "min_count"  # "min_count" (fixed, default) or "sampled" (the collapsing T-as-target rule)

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
        if self.halt_target not in ("min_count", "sampled"):
            raise ValueError(f"halt_target={self.halt_target!r} must be 'min_count' or 'sampled'")
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
            tail="remove", sink=c.decoder_sink,
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

    def ladder(self) -> list[int]:
        """Counts at which phase A also measures the reached error (no gradient): s, 2s, 4s, ... and K."""
        c = self.config
        out, n = [], c.step
        while n < c.num_tokens:
            out.append(n)
            n *= 2
        return out + [c.num_tokens]

    def target_counts(self, errors: Tensor, counts: Tensor, idx: Tensor) -> Tensor:
        """`[B]` halting target: the smallest count whose reached error's bin is <= the condition bin `idx`.

        `errors [B, C]` are the errors reached with `counts [C]` tokens (any order); K when no count reaches the bin.
        """
        ok = self.bin_index(errors.reshape(-1)).reshape(errors.shape) <= idx[:, None]  # [B, C]
        big = torch.full_like(errors, float(self.config.num_tokens), dtype=torch.float32)
        return torch.where(ok, counts[None].float().expand_as(big), big).min(1).values.long()

    @staticmethod
    def _l1(rec: Tensor, x: Tensor, w: Tensor | None) -> Tensor:
        """`[B]` mean L1 error per image in [0, 1] units (`rec`, `x` in [-1, 1]); pixel-weighted when `w` is given."""
        err = (rec.clamp(-1, 1) - x).abs() / 2
        if w is None:
            return err.mean((1, 2, 3))
        return (err * w).sum((1, 2, 3)) / (w.sum((1, 2, 3)).clamp_min(1e-12) * x.shape[1])

    @torch.no_grad()
    def _reached_error(self, x: Tensor, n: int, idx: Tensor, w: Tensor | None = None) -> Tensor:
        """`[B]` mean L1 error (images in [0, 1]) reached with `n` tokens under condition `idx` (a measurement only:
        the quantizer's dead-code bookkeeping is not advanced)."""
        was = self.quantizer.training
        self.quantizer.train(False)
        try:
            _, _, codes, _, _ = self._encode(x, n, idx)
        finally:
            self.quantizer.train(was)
        return self._l1(self.decoder(codes), x, w)

    def training_loss(self, images: Tensor, weight: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """With pixel weights `weight`, both reconstruction losses and the error that conditions phase B are the
        weighted means, so the requested error is then a weighted L1 error."""
        c = self.config
        x = self.check_images(images)
        w = self.check_weight(weight, x)
        b, k = x.shape[0], c.num_tokens

        # Phase A: encode with T latents at a near-lossless request; measure the error reached.
        t_count = self.sample_count()
        idx_a = torch.multinomial(self.phase_a_probs, b, replacement=True)
        _, logits_a, codes_a, _, q_a = self._encode(x, t_count, idx_a)
        rec_a = self.decoder(codes_a)
        mse_a = weighted_mse(rec_a, x, w)
        halt_a = F.binary_cross_entropy_with_logits(logits_a, torch.zeros_like(logits_a))
        with torch.no_grad():
            err = self._l1(rec_a.detach(), x, w)  # [B] L1 in [0, 1] units
            if self.training:
                probs = self.phase_a_probs.clone()
                probs[self.bins >= err.min()] *= c.phase_a_decay
                self.phase_a_probs.copy_(probs / probs.sum())

        # Phase B: all K latents conditioned on bin(e_T); learn to halt; decode what the head keeps.
        if c.halt_target == "sampled":  # the literal rule: target T for bin(e_T) (collapses at tiny scale)
            idx_b = self.rebin(self.bin_index(err), t_count)
            target = torch.full((b,), t_count, dtype=torch.long, device=x.device)
        else:  # minimum program: the fewest measured tokens that reach the condition's bin
            ladder = [n for n in self.ladder() if n != t_count]
            errs = torch.stack([self._reached_error(x, n, idx_a, w) for n in ladder] + [err], 1)  # [B, C]
            counts = torch.tensor(ladder + [t_count], device=x.device)
            idx_b = self.bin_index(err)
            if torch.rand(()) < c.rebin_prob:  # any bin: stricter than reachable -> K, looser -> fewer tokens
                idx_b = torch.randint(len(c.error_bins), (b,), device=x.device)
            target = self.target_counts(errs, counts, idx_b)
        _, logits_b, codes_b, _, q_b = self._encode(x, k, idx_b)
        keep_b = self.keep_from_logits(logits_b.detach(), at_least_one=False)
        rec_b = self.decoder(codes_b, keep_b)
        mse_b = weighted_mse(rec_b, x, w)
        halted = torch.arange(k, device=x.device)[None] >= target[:, None]  # [B, K] halting labels
        bce = F.binary_cross_entropy_with_logits(logits_b, halted.float(), reduction="none")
        halt_b = (bce * ~halted).sum() / (~halted).sum().clamp_min(1)  # two means, as in the reference
        if bool(halted.any()):
            halt_b = halt_b + (bce * halted).sum() / halted.sum()

        total = mse_a + q_a + halt_a + mse_b + q_b + halt_b
        logs = {
            "loss": float(total.detach()),
            "rec": float(mse_a.detach()),
            "rec_b": float(mse_b.detach()),
            "halt": float((halt_a + halt_b).detach()),
            "T": float(t_count),
            "err": float(err.mean()),
            "kept_b": float(keep_b.sum(1).float().mean()),
            "target_b": float(target.float().mean()),
        }
        return total, logs
