"""Quantizers for the 1-D tokenizers: FSQ and VQ, both with straight-through gradients.

FSQ — Mentzer et al., "Finite Scalar Quantization: VQ-VAE Made Simple", arXiv 2309.15505 (used by FlexTok).
Each of the `len(levels)` channels is squashed by a shifted `tanh` into `levels[i]` integer steps and rounded;
codes are renormalised to [-1, 1] (channel i takes the values `(j - levels[i] // 2) / (levels[i] // 2)` for
`j = 0 .. levels[i] - 1`). Index `sum_i j_i * prod(levels[:i])` is the mixed-radix number of the digits `j_i`.
Pinned: the bound is `tanh(z + shift) * (L - 1) * (1 + eps) / 2 - offset` with eps = 1e-3 (as in FlexTok's code;
the paper's `1 - eps` makes the shift `atanh(offset / half_l)` undefined for L = 2).

VQ — van den Oord et al., "Neural Discrete Representation Learning", arXiv 1711.00937, in the form TiTok,
One-D-Piece and KARL use. Pinned: the codebook is learned by gradient (no EMA); lookup is on **l2-normalised**
vectors (both the encoder output and the codebook rows are normalised, the nearest code is the one with the largest
cosine), as in TiTok's `use_l2_norm=True`; the loss is `||sg(z) - e||^2 + beta * ||z - sg(e)||^2` with beta = 0.25
on the normalised vectors, and the output is `z + sg(e - z)` (straight-through). Codebook init is uniform in
[-1/n, 1/n] (n = codebook size). Added for training at tiny scale (not in TiTok): codes unused for `restart_after`
consecutive training calls are re-seeded with random encoder outputs of the current batch (Jukebox's codebook
restart, Dhariwal et al., arXiv 2005.00341). Without it the tiny tokenizers collapsed to one code per token
position within a few hundred steps and never recovered; `restart_after=0` turns it off.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FSQ(nn.Module):
    """Finite scalar quantizer: `forward(z [..., d]) -> (codes [..., d] in [-1, 1], ids [...], loss 0)`."""

    def __init__(self, levels: tuple[int, ...] | list[int], eps: float = 1e-3) -> None:
        super().__init__()
        levels = [int(v) for v in levels]
        if not levels or any(v < 2 for v in levels):
            raise ValueError(f"FSQ levels must be a non-empty list of ints >= 2, got {levels}")
        self.levels_list = levels
        self.eps = eps
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("basis", torch.tensor(basis, dtype=torch.long), persistent=False)
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)

    def bound(self, z: Tensor) -> Tensor:
        """Squash `z [..., d]` so that rounding gives exactly `levels[i]` integer values per channel."""
        lv = self.levels.to(z.dtype)
        half_l = (lv - 1) * (1 + self.eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if z.shape[-1] != self.dim:
            raise ValueError(f"FSQ expects last dim {self.dim} (one per level), got shape {tuple(z.shape)}")
        b = self.bound(z)
        q = b + (torch.round(b) - b).detach()  # straight-through round
        codes = q / (self.levels // 2).to(z.dtype)  # [..., d] in [-1, 1]
        return codes, self.codes_to_ids(codes.detach()), z.new_zeros(())

    def codes_to_ids(self, codes: Tensor) -> Tensor:
        """`[..., d]` codes on the grid -> `[...]` long ids in [0, codebook_size)."""
        half = self.levels // 2
        digits = torch.round(codes * half.to(codes.dtype)).long() + half  # [..., d] in [0, L)
        return (digits * self.basis).sum(-1)

    def ids_to_codes(self, ids: Tensor) -> Tensor:
        """`[...]` long ids -> `[..., d]` float codes in [-1, 1] (inverse of `codes_to_ids`)."""
        digits = (ids.long().unsqueeze(-1) // self.basis) % self.levels  # [..., d]
        half = self.levels // 2
        return (digits - half).float() / half.float()

    def extra_repr(self) -> str:
        return f"levels={self.levels_list}, codebook_size={self.codebook_size}"


class VectorQuantizer(nn.Module):
    """l2-normalised VQ: `forward(z [..., d]) -> (z_q [..., d] straight-through, ids [...], loss)`."""

    def __init__(self, codebook_size: int, dim: int, commitment: float = 0.25, restart_after: int = 0) -> None:
        super().__init__()
        if codebook_size < 2 or dim < 1:
            raise ValueError(f"VQ needs codebook_size >= 2 and dim >= 1, got {codebook_size}, {dim}")
        if restart_after < 0:
            raise ValueError(f"restart_after={restart_after} must be >= 0 (0 = never restart dead codes)")
        self.codebook_size = codebook_size
        self.dim = dim
        self.commitment = commitment
        self.restart_after = restart_after
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.register_buffer("idle_steps", torch.zeros(codebook_size, dtype=torch.long))  # persistent (resume)

    def codebook(self) -> Tensor:
        return F.normalize(self.embedding.weight, dim=-1)  # [n, d]

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if z.shape[-1] != self.dim:
            raise ValueError(f"VQ expects last dim {self.dim}, got shape {tuple(z.shape)}")
        z = F.normalize(z, dim=-1)
        e = self.codebook()
        ids = (z.detach() @ e.t()).argmax(-1)  # [...] nearest by cosine (= by l2 on unit vectors)
        z_q = e[ids]  # [..., d]
        loss = F.mse_loss(z_q, z.detach()) + self.commitment * F.mse_loss(z, z_q.detach())
        if self.training and self.restart_after > 0:
            self.restart_dead_codes(z.detach().reshape(-1, self.dim), ids.reshape(-1))
        return z + (z_q - z).detach(), ids, loss

    @torch.no_grad()
    def restart_dead_codes(self, z: Tensor, ids: Tensor) -> int:
        """Re-seed codes unused for `restart_after` consecutive training steps with random encoder outputs `z`
        of this step (Jukebox's restart, Dhariwal et al., arXiv 2005.00341); returns how many were re-seeded."""
        used = torch.bincount(ids, minlength=self.codebook_size) > 0
        self.idle_steps.add_(1).masked_fill_(used, 0)
        dead = (self.idle_steps >= self.restart_after).nonzero()[:, 0]
        if dead.numel():
            pick = torch.randint(0, z.shape[0], (dead.numel(),), device=z.device)
            # Through .data: the rows re-seeded were not looked up this step, so the row-wise normalisation saved
            # for backward gives them zero gradient either way and the used rows' gradients are unchanged.
            self.embedding.weight.data[dead] = z[pick].to(self.embedding.weight.dtype)
            self.idle_steps[dead] = 0
        return int(dead.numel())

    def ids_to_codes(self, ids: Tensor) -> Tensor:
        """`[...]` long ids -> `[..., d]` unit code vectors."""
        return self.codebook()[ids.long()]

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, dim={self.dim}, commitment={self.commitment}, l2_norm=True, "
            f"restart_after={self.restart_after}"
        )


def build_quantizer(
    kind: str, fsq_levels: tuple[int, ...], vq_codebook_size: int, vq_dim: int, commitment: float, restart_after: int
) -> FSQ | VectorQuantizer:
    """`"fsq"` or `"vq"` -> the quantizer module (error names the bad value)."""
    if kind == "fsq":
        return FSQ(fsq_levels)
    if kind == "vq":
        return VectorQuantizer(vq_codebook_size, vq_dim, commitment, restart_after)
    raise ValueError(f"quantizer={kind!r} is not one of 'fsq', 'vq'")
