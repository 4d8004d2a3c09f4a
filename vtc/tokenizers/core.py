"""The shared TiTok-style network: a ViT encoder that reads image patches into K learned latent tokens and a ViT
decoder that rebuilds the image from any subset (normally a prefix) of those tokens.

TiTok — Yu et al., "An Image is Worth 32 Tokens for Reconstruction and Generation", arXiv 2406.07550. This is the
single-stage TiTok (pixels in, pixels out through a linear patch head, no proxy codes): FlexTok, One-D-Piece and KARL
all build on it, each in its own module.

Pinned choices (the same for every method unless its module says otherwise):
- images enter the network in [-1, 1]; the public API takes and returns [0, 1] (`Tokenizer1D` converts);
- pre-LN blocks (LayerNorm -> multi-head attention -> LayerNorm -> GELU MLP), learned or fixed 2-D sin-cos patch
  position embeddings, learned latent tokens each with its own learned position embedding;
- init: learned embeddings normal(0, 0.02), linear and conv layers keep PyTorch's default (Kaiming-uniform) init.
  TiTok's truncated-normal(0.02) linears left a tiny encoder's latents almost independent of the image at the
  start (their spread across images was 0.2% of their spread overall); in 300-step runs of a 16 px model FlexTok
  then reached 13.7 dB PSNR against 17 dB with PyTorch's init;
- the encoder sequence is `[prefix tokens; patches; latents]` where the prefix is method-specific (KARL's
  desired-error token); `register_attention="full"` is TiTok's bidirectional attention, `"causal"` is FlexTok's
  `causal_last` mask (patches see patches only, latent i sees the prefix, the patches and latents 0..i);
- the decoder sequence is `[N learned image queries + positions; latent tokens]` with full attention, and a linear
  head turns each image query into a `patch x patch x 3` pixel patch. The tail beyond the kept tokens is either
  replaced by one learned mask token (`tail="mask"`, FlexTok's nested dropout; the sequence stays K long) or removed
  (`tail="remove"`, One-D-Piece's Tail Token Drop and KARL's halting; the sequence is N + k long, and a per-sample
  keep mask is applied as an attention mask on the keys when lengths differ within a batch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_2d(grid: int, dim: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding `[grid * grid, dim]` (MAE style; dim divisible by 4)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs width divisible by 4, got {dim}")
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    out = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        ang = pos[:, None] * omega[None]  # [N, q]
        out += [ang.sin(), ang.cos()]
    return torch.cat(out, dim=1).float()  # [N, dim]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding `[B, dim]` of times `t [B]` in [0, 1] (scaled by 1000, DiT style)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    ang = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([ang.cos(), ang.sin()], dim=-1)
    return F.pad(emb, (0, dim % 2))


def weighted_mse(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean squared error over `[B, C, H, W]`; with pixel weights `weight [B, 1, H, W]` (>= 0) the weighted mean
    sum(w * e^2) / (C * sum(w)), so a constant weight gives the plain mean."""
    if weight is None:
        return F.mse_loss(pred, target)
    err = (pred - target).pow(2) * weight
    return err.sum() / (weight.sum().clamp_min(1e-12) * pred.shape[1])


def patchify(x: Tensor, p: int) -> Tensor:
    """`[B, C, H, W]` -> `[B, (H/p)*(W/p), p*p*C]` (row-major patches, channels last within a patch)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: Tensor, p: int, c: int = 3) -> Tensor:
    """Inverse of `patchify` for square images: `[B, N, p*p*C]` -> `[B, C, H, W]`."""
    b, n, _ = x.shape
    g = int(round(n**0.5))
    x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, g * p, g * p)


class Attention(nn.Module):
    """Multi-head self-attention with an optional boolean mask `[B or 1, L, L]` (True = may attend).

    Without `pad_keys_to` it is PyTorch's fused SDPA. With it, keys/values are zero-padded (and masked out) to that
    fixed length and the softmax is computed explicitly, so every row's softmax and weighted sum run over arrays of
    the same length in the same order whatever the sequence length: FlexTok's k-prefix then comes out bit-identical
    whether k or K registers are encoded (the fused kernels choose shape-dependent code paths and do not).
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} must be divisible by num_heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None, pad_keys_to: int | None = None) -> Tensor:
        b, n, d = x.shape
        h = self.heads
        q, k, v = self.qkv(x).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)  # each [B, h, L, dh]
        if pad_keys_to is not None:
            extra = pad_keys_to - n
            k = F.pad(k, (0, 0, 0, extra))
            v = F.pad(v, (0, 0, 0, extra))
            if mask is None:
                mask = torch.ones(1, n, n, dtype=torch.bool, device=x.device)
            mask = F.pad(mask, (0, extra), value=False)
        if pad_keys_to is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None])
        else:  # explicit softmax: the fused kernels may pick shape-dependent code paths
            s = (q @ k.transpose(-2, -1)) * (d // h) ** -0.5  # [B, h, L, Lk]
            s = s.masked_fill(~mask[:, None], float("-inf"))
            out = s.softmax(-1) @ v  # [B, h, L, dh]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, mask: Tensor | None = None, pad_keys_to: int | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), mask, pad_keys_to)
        return x + self.mlp(self.norm2(x))


EMBED_STD = 0.02


def embedding(*shape: int) -> nn.Parameter:
    """A learned embedding table, normal(0, 0.02)."""
    return nn.Parameter(EMBED_STD * torch.randn(*shape))


class LatentEncoder(nn.Module):
    """Patches + K learned latents (+ optional prefix tokens) through a ViT; returns the latents' outputs.

    `forward(x [B, 3, H, W] in [-1, 1], num_latents=n, prefix=[B, P, w] | None) -> [B, n, w]` (after a final
    LayerNorm). Only the first `n` learned latents enter the sequence.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        num_latents: int,
        mlp_ratio: float = 4.0,
        register_attention: str = "full",
        pos_embed: str = "learned",
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if register_attention not in ("full", "causal"):
            raise ValueError(f"register_attention={register_attention!r} is not one of 'full', 'causal'")
        grid = image_size // patch_size
        self.num_patches = grid * grid
        self.num_latents = num_latents
        self.register_attention = register_attention
        self.patch_embed = nn.Conv2d(in_chans, width, patch_size, patch_size)
        if pos_embed == "learned":
            self.pos_embed = embedding(self.num_patches, width)
        elif pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_2d(grid, width), persistent=False)
        else:
            raise ValueError(f"pos_embed={pos_embed!r} is not one of 'learned', 'sincos'")
        self.latent_tokens = embedding(num_latents, width)
        self.latent_pos = embedding(num_latents, width)
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio) for _ in range(depth)])
        self.ln_post = nn.LayerNorm(width)

    def attention_mask(self, num_prefix: int, n: int, device: torch.device) -> Tensor | None:
        """`[1, L, L]` boolean mask for the sequence `[prefix; patches; n latents]` (None for full attention)."""
        if self.register_attention == "full":
            return None
        p, m = num_prefix, self.num_patches
        length = p + m + n
        mask = torch.zeros(length, length, dtype=torch.bool, device=device)
        mask[: p + m, : p + m] = True  # prefix and patches see each other
        mask[p + m :, : p + m] = True  # latents see prefix and patches ...
        mask[p + m :, p + m :] = torch.ones(n, n, dtype=torch.bool, device=device).tril()  # ... and earlier latents
        return mask[None]

    def forward(self, x: Tensor, num_latents: int | None = None, prefix: Tensor | None = None) -> Tensor:
        n = self.num_latents if num_latents is None else num_latents
        b = x.shape[0]
        patches = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, N, w]
        latents = (self.latent_tokens[:n] + self.latent_pos[:n]).expand(b, n, -1)  # [B, n, w]
        parts = ([prefix] if prefix is not None else []) + [patches, latents]
        h = self.ln_pre(torch.cat(parts, dim=1))  # [B, P + N + n, w]
        p = 0 if prefix is None else prefix.shape[1]
        mask = self.attention_mask(p, n, x.device)
        # Causal registers: pad keys to the full length so a k-prefix is bit-identical for any n >= k.
        pad = p + self.num_patches + self.num_latents if self.register_attention == "causal" else None
        for blk in self.blocks:
            h = blk(h, mask, pad)
        return self.ln_post(h[:, p + self.num_patches :])  # [B, n, w]


def fill_tail(z: Tensor, keep: Tensor | None, mask_token: Tensor, length: int) -> Tensor:
    """Nested-dropout fill: `z [B, n, w]` -> `[B, length, w]` where positions >= n and positions with
    `keep [B, n]` False hold `mask_token [w]`."""
    b, n, w = z.shape
    kept = torch.zeros(b, length, 1, dtype=torch.bool, device=z.device)
    kept[:, :n] = True if keep is None else keep[:, :, None]
    z = F.pad(z, (0, 0, 0, length - n))
    return torch.where(kept, z, mask_token.to(z.dtype))


class PixelDecoder(nn.Module):
    """Rebuilds `[B, 3, H, W]` (in [-1, 1]) from latent codes `[B, n, d]`, n <= K, with a keep mask.

    `forward(codes, keep=None)`: `keep [B, n]` marks the tokens each sample keeps (None = all n). With
    `tail="mask"` every position not kept (and every position >= n) becomes the learned `mask_token`; with
    `tail="remove"` the tokens are dropped from the sequence (sliced when the whole batch keeps a common prefix,
    else masked out of attention as keys). `sink=True` adds one learned token that is always in the sequence
    (after the image queries, before the latents), so the queries' attention has somewhere to go however few
    latents are left.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        num_latents: int,
        code_dim: int,
        mlp_ratio: float = 4.0,
        tail: str = "mask",
        out_chans: int = 3,
        sink: bool = False,
    ) -> None:
        super().__init__()
        if tail not in ("mask", "remove"):
            raise ValueError(f"tail={tail!r} is not one of 'mask', 'remove'")
        grid = image_size // patch_size
        self.num_patches = grid * grid
        self.patch_size = patch_size
        self.out_chans = out_chans
        self.num_latents = num_latents
        self.tail = tail
        self.embed = nn.Linear(code_dim, width)
        self.latent_pos = embedding(num_latents, width)
        if tail == "mask":
            self.mask_token = embedding(width)
        self.sink = embedding(1, width) if sink else None  # [1, w]
        self.image_queries = embedding(self.num_patches, width)
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio) for _ in range(depth)])
        self.ln_post = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch_size * patch_size * out_chans)

    def latent_sequence(self, codes: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Embedded latents `[B, n or K, w]` and a key mask `[B, ·]` (None when every token is used)."""
        n = codes.shape[1]
        z = self.embed(codes) + self.latent_pos[:n]  # [B, n, w]
        if self.tail == "mask":
            return fill_tail(z, keep, self.mask_token, self.num_latents), None
        if keep is None:
            return z, None
        lengths = keep.sum(1)
        prefix = int(lengths.min())
        if bool(keep[:, :prefix].all()) and int(lengths.max()) == prefix:  # one common prefix: remove it for real
            return z[:, :prefix], None
        return z, keep

    def forward(self, codes: Tensor, keep: Tensor | None = None, capture: int = 0) -> Tensor | tuple[Tensor, Tensor]:
        """Pixels `[B, 3, H, W]`; with `capture` = l >= 1 also the image queries' hidden states after block l,
        `[B, N, w]` (what FlexTok's REPA aligns)."""
        b = codes.shape[0]
        z, key_keep = self.latent_sequence(codes, keep)
        if self.sink is not None:
            z = torch.cat([self.sink.to(z.dtype).expand(b, -1, -1), z], dim=1)  # [B, 1 + n, w]
            key_keep = None if key_keep is None else F.pad(key_keep, (1, 0), value=True)
        q = self.image_queries.expand(b, -1, -1)  # [B, N, w]
        h = self.ln_pre(torch.cat([q, z], dim=1))  # [B, N + n, w] (N + 1 + n with the sink)
        mask = None
        if key_keep is not None:
            keys = torch.cat([torch.ones(b, self.num_patches, dtype=torch.bool, device=codes.device), key_keep], 1)
            mask = keys[:, None, :].expand(b, h.shape[1], -1)  # [B, L, L]: nobody attends to removed tokens
        hidden = None
        for i, blk in enumerate(self.blocks):
            h = blk(h, mask)
            if i + 1 == capture:
                hidden = h[:, : self.num_patches]  # [B, N, w]
        out = unpatchify(self.head(self.ln_post(h[:, : self.num_patches])), self.patch_size, self.out_chans)
        return out if not capture else (out, hidden)
