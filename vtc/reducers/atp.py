"""ATP-LLaVA: instance-adaptive visual token pruning with learned thresholds and spatial augmentation.

Ye et al., "ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models", arXiv 2412.00447 (CVPR 2025;
no official code, project page https://yxxxb.github.io/ATP-LLaVA-page/). An ATP module sits between two LLM layers
and keeps, per instance, the visual tokens that pass either of two learned thresholds:

* redundancy score S_red = (S_self + S_cross) / 2, with S_self[j] = mean_i of the pre-softmax logits v_i → v_j
  among visual tokens and S_cross[j] = mean_t softmax_j(t → v_j) from the text tokens;
* spatial score S_sp (Spatial Augmented Pruning): tokens on a uniform 2-D lattice of sampling rate R_s score
  1 − λ·R_s (λ = 3), so a sparse lattice scores high and survives a high threshold;
* thresholds θ_r, θ_s = sigmoid(head(MLP([mean S_self, mean S_cross]))) per instance;
* training: soft mask max(σ(T(S_red − θ_r)), σ(T(S_sp − θ_s))), T = 10; inference: keep = (S_red > θ_r) OR
  (S_sp > θ_s). Loss (next-token loss excluded): 0.05·Σ_l (kept_l / N)·l + 0.2·|mean kept − target|.

The functions below are the reusable pieces. `atp_llm` is the paper's module inside the LLM: at each of its
layers it scores the visual tokens still alive with the q/k of the layer before (captured beside SDPA), with its
own threshold head per layer, so the kept count adapts per instance and per layer. The `atp` reducer applies the
same rule once before the LLM, where the "attention" comes from the embeddings themselves; the two compose:
`vtc.compress(model, "atp", budget=k, in_llm=True)` runs `atp` on the projector outputs, then `atp_llm`.

Pinned choices (the paper leaves these open or they are not verifiable without code):

* Pre-LLM attention: q = k = the visual token embeddings and the text queries are the question embeddings,
  one head, logits = q·k/√D. With LLM q/k of several heads, logits and softmaxes are per head, then head-mean;
  grouped-query k/v heads are repeated to the query heads. S_self averages over all visual queries i (no causal
  mask: pre-softmax logits exist for every pair), which is (mean_i q_i)·k_j/√d. The softmax of S_cross runs over
  the N visual keys only, and the mean over t skips padded text positions.
* Comparable ranges: S_self and S_cross are each min-max normalised to [0, 1] per instance before averaging, and
  the MLP sees the means of the normalised scores (the raw mean of S_cross is always 1/N).
* SAP: `spatial_rates` is a ladder of uniform lattices (`vtc.ops.grid.uniform_grid_indices`, round(R·h·w) points
  per view); a token scores 1 − λ·R for the sparsest lattice it lies on and 0 if on none. A single rate gives the
  one-lattice reading; the ladder lets θ_s choose the sampling density per instance (S_sp > θ_s ⟺ R < (1 − θ_s)/λ).
  Default rates 1/64 … 1/4 (9, 16, 36, 64, 144 of 24×24).
* Threshold head: Linear(2, hidden) → GELU → Linear(hidden, hidden) → GELU → Linear(hidden, 2), the last layer
  initialised with N(0, 0.01²) weights and bias logit(θ_r0), logit(θ_s0); θ_r0 = 0.5 and θ_s0 = 0.7 keep about
  a quarter of the tokens on typical score distributions at initialisation (the paper's 576 → 144 regime): the
  spatial branch keeps the 1/64, 1/36 and 1/16 lattices (~8%), the redundancy branch the tokens above mid-range.
* Budget cap: at most k tokens (the budget), at least 1, ranked by the margin max(S_red − θ_r, S_sp − θ_s)
  (higher first; ties by S_red, then lower index). The kept tokens keep their original order.
* Training: the returned selection is always the hard rule; `info["soft_mask"]` (`[B, N]`, differentiable to the
  threshold head and to the scores) is what a training adapter applies instead of dropping, and `info["theta"]`,
  `info["num_passed"]` (count before the cap) report the instance's thresholds. At the full budget the base class
  returns the identity and no scores are computed.
* `VisualTokens.valid` (pre-LLM `atp`): S_self, S_cross, their min-max normalisation and the threshold MLP's means
  run over the valid tokens only (the softmax of S_cross over the valid keys, the mean of S_self over the valid
  queries), as if the invalid tokens were not in the input; SAP keeps the lattice of the full grid (the token's
  position in the layout, as `atp_llm` does); invalid tokens are never kept (soft mask 0) and the cap is k_b (a
  sample with k_b = M_b keeps every valid token, as the full budget does).
* Loss: `kept` is `[B, L]` (soft counts Σ_j mask_j at the L pruning layers); "mean kept" is the mean over those
  layers; the result is averaged over the batch.
* `atp_llm` layers (the paper does not let us verify its module positions): by default modules before layers
  2, 8, 16 and 24 of a 32-layer LLM (scaled to the depth): FastV's shallow layer, then PyramidDrop's quarters.
  Text queries are the real text tokens after the last visual token (the question); S_self, S_cross, SAP and the
  thresholds are computed per sample over its visual tokens still alive, with SAP on their positions in the
  image's reducer layout (the adapter's `layout_index`). Budget: `budget` caps every layer (at most k tokens per
  sample from the first ATP layer on; a full budget prunes nothing); composed after `atp`, the cap defaults to half
  of the tokens that reach the LLM (`in_llm_budget` overrides it). The thresholds of the last prefill are in
  `adapter_of(model).in_llm.memo["atp_theta"]` (`{stage: [B, 2]}`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ops.attention import attention_logits
from ..ops.grid import uniform_grid_indices
from ..ops.select import keep_mask_to_indices, pruned_selection
from ..ops.valid import masked_mean
from ..types import Query, Selection, VisualTokens
from .base import InLLMReducer, Reducer, ReducerConfig, register_reducer


@dataclass
class ATPConfig(ReducerConfig):
    temperature: float = 10.0  # T of the differentiable training mask
    spatial_lambda: float = 3.0  # λ: a lattice of sampling rate R scores 1 − λ·R
    spatial_rates: tuple[float, ...] = (1 / 64, 1 / 36, 1 / 16, 1 / 9, 1 / 4)  # SAP lattices, fraction of a view
    hidden: int = 64  # width of the threshold MLP
    init_theta_red: float = 0.5  # θ_r at initialisation (in (0, 1))
    init_theta_spatial: float = 0.7  # θ_s at initialisation (in (0, 1))

    def __post_init__(self) -> None:
        for name in ("init_theta_red", "init_theta_spatial"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"atp: {name} must lie in (0, 1), got {getattr(self, name)!r}")
        if not self.spatial_rates or not all(0 < r <= 1 for r in self.spatial_rates):
            raise ValueError(f"atp: spatial_rates must be fractions in (0, 1], got {self.spatial_rates!r}")
        self.spatial_rates = tuple(float(r) for r in self.spatial_rates)


# ---------------------------------------------------------------------------------------------- scores
def _as_heads(x: Tensor) -> Tensor:
    """`[B, L, D]` (one head) or `[B, H, L, Dh]` → `[B, H, L, Dh]`."""
    return x.unsqueeze(1) if x.dim() == 3 else x


def _repeat_kv(k: Tensor, heads: int) -> Tensor:
    """Repeat grouped-query key heads `[B, Hk, N, Dh]` up to `heads` query heads."""
    if k.shape[1] == heads:
        return k
    if heads % k.shape[1]:
        raise ValueError(f"atp: {heads} query heads are not a multiple of {k.shape[1]} key heads")
    return k.repeat_interleave(heads // k.shape[1], dim=1)


def importance_scores(
    q_vis: Tensor,
    k_vis: Tensor,
    q_text: Tensor,
    text_mask: Tensor | None = None,
    scale: float | None = None,
    vis_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """ATP's raw importance scores of the N visual tokens.

    Args:
        q_vis: `[B, H, N, Dh]` queries of the visual tokens (or `[B, N, D]`, one head).
        k_vis: `[B, Hk, N, Dh]` keys of the visual tokens (Hk divides H), or `[B, N, D]`.
        q_text: `[B, H, T, Dh]` queries of the text tokens, or `[B, T, D]`.
        text_mask: `[B, T]` bool, True for real text tokens (None: all).
        scale: logit scale (default 1/√Dh).
        vis_mask: `[B, N]` bool, the visual tokens that exist (None: all); only they are queries of S_self and keys
            of the S_cross softmax (the scores of the others are meaningless).
    Returns:
        S_self `[B, N]` (mean over visual queries of the pre-softmax logits, head-mean) and S_cross `[B, N]`
        (mean over real text queries of the softmax over visual keys, head-mean), float32, differentiable.
    """
    q_vis, q_text = _as_heads(q_vis), _as_heads(q_text)
    k_vis = _repeat_kv(_as_heads(k_vis), q_vis.shape[1])
    # mean_i (q_i · k_j) = (mean_i q_i) · k_j: the N×N logits are never formed.
    if vis_mask is None:
        q_mean = q_vis.float().mean(-2, keepdim=True)  # [B, H, 1, Dh]
    else:
        q_mean = masked_mean(q_vis.float(), vis_mask[:, None, :, None], dim=-2).unsqueeze(-2)
    s_self = attention_logits(q_mean, k_vis, scale).squeeze(-2).mean(1)  # [B, N]
    logits = attention_logits(q_text, k_vis, scale)  # [B, H, T, N]
    if vis_mask is not None:
        logits = logits.masked_fill(~vis_mask[:, None, None, :], float("-inf"))
    probs = logits.softmax(-1)
    if text_mask is None:
        s_cross = probs.mean(-2)
    else:
        m = text_mask.to(probs.dtype)[:, None, :, None]  # [B, 1, T, 1]
        s_cross = (probs * m).sum(-2) / m.sum(-2).clamp(min=1)
    return s_self, s_cross.mean(1)


def minmax(s: Tensor, eps: float = 1e-6, mask: Tensor | None = None) -> Tensor:
    """Per-row min-max normalisation of `[B, N]` scores to [0, 1] (a constant row maps to 0); with `mask`
    (`[B, N]` bool) over the masked-in entries only, the others map to 0."""
    if mask is None:
        lo = s.min(-1, keepdim=True).values
        hi = s.max(-1, keepdim=True).values
        return (s - lo) / (hi - lo).clamp(min=eps)
    lo = s.masked_fill(~mask, float("inf")).min(-1, keepdim=True).values
    hi = s.masked_fill(~mask, float("-inf")).max(-1, keepdim=True).values
    return ((s - lo) / (hi - lo).clamp(min=eps)).masked_fill(~mask, 0.0)


def redundancy_score(s_self: Tensor, s_cross: Tensor) -> Tensor:
    """S_red = (minmax(S_self) + minmax(S_cross)) / 2, `[B, N]` in [0, 1]."""
    return 0.5 * (minmax(s_self) + minmax(s_cross))


def spatial_scores(h: int, w: int, rates: Sequence[float], lam: float = 3.0, views: int = 1) -> Tensor:
    """SAP scores of every token of `views` h×w grids: 1 − λ·R of the sparsest lattice holding it, else 0.

    Returns:
        `[views * h * w]` float32.
    """
    s = torch.zeros(h * w)
    for r in sorted(rates, reverse=True):  # denser lattices first, so sparser ones overwrite them
        s[uniform_grid_indices(max(1, min(h * w, round(r * h * w))), h, w)] = 1.0 - lam * r
    return s.repeat(views)


# ---------------------------------------------------------------------------------------------- thresholds
class ATPThresholds(nn.Module):
    """θ_r, θ_s = sigmoid(head(MLP([mean S_self, mean S_cross]))) per instance (normalised scores as input)."""

    def __init__(self, hidden: int = 64, init_theta_red: float = 0.5, init_theta_spatial: float = 0.7) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.head = nn.Linear(hidden, 2)
        nn.init.normal_(self.head.weight, std=0.01)
        with torch.no_grad():
            self.head.bias.copy_(torch.logit(torch.tensor([init_theta_red, init_theta_spatial])))

    def forward(self, s_self: Tensor, s_cross: Tensor, mask: Tensor | None = None) -> Tensor:
        """`[B, N]` normalised S_self, S_cross (means over the `mask`ed-in tokens) → `[B, 2]` (θ_r, θ_s) in (0, 1)."""
        feats = torch.stack([masked_mean(s_self, mask), masked_mean(s_cross, mask)], -1)  # [B, 2]
        feats = feats.to(self.head.weight.dtype)
        return torch.sigmoid(self.head(self.mlp(feats))).float()


def soft_keep_mask(s_red: Tensor, s_sp: Tensor, theta: Tensor, temperature: float = 10.0) -> Tensor:
    """Differentiable training mask max(σ(T(S_red − θ_r)), σ(T(S_sp − θ_s))), `[B, N]` in (0, 1)."""
    red = torch.sigmoid(temperature * (s_red - theta[:, :1]))
    sp = torch.sigmoid(temperature * (s_sp - theta[:, 1:]))
    return torch.maximum(red, sp)


def hard_keep(s_red: Tensor, s_sp: Tensor, theta: Tensor, k: int | Tensor, valid: Tensor | None = None) -> Tensor:
    """Inference rule keep = (S_red > θ_r) OR (S_sp > θ_s), at most k and at least 1 per row: `[B, N]` bool.

    When more than k pass (or none), the ranking is by the margin max(S_red − θ_r, S_sp − θ_s), then S_red,
    then the lower index. `k` may be `[B]` per row; with `valid` (`[B, N]` bool) only valid tokens are kept.
    """
    margin = torch.maximum(s_red - theta[:, :1], s_sp - theta[:, 1:])  # [B, N]
    if valid is not None:  # an invalid token never passes and ranks last
        margin = margin.masked_fill(~valid, float("-inf"))
    if isinstance(k, Tensor):
        count = torch.minimum((margin > 0).sum(-1, keepdim=True).clamp(min=1), k.view(-1, 1))  # [B, 1]
    else:
        count = (margin > 0).sum(-1, keepdim=True).clamp(1, k)  # [B, 1]
    by_red = torch.sort(s_red, dim=-1, descending=True, stable=True).indices
    order = by_red.gather(1, torch.sort(margin.gather(1, by_red), dim=-1, descending=True, stable=True).indices)
    return order.argsort(-1) < count  # rank of every token < its row's count


def atp_loss(
    kept: Tensor,
    layers: Sequence[int],
    num_tokens: int,
    target: float,
    layer_weight: float = 0.05,
    target_weight: float = 0.2,
) -> Tensor:
    """ATP's budget loss (the next-token loss is added by the caller).

    Args:
        kept: `[B, L]` (soft) number of visual tokens kept at each of the L pruning layers.
        layers: the L layer indices l (deeper layers cost more).
        num_tokens: N, the visual tokens before pruning.
        target: the target mean number of kept tokens (the paper: 144 of 576).
    Returns:
        scalar: mean over the batch of layer_weight·Σ_l (kept_l/N)·l + target_weight·|mean_l kept_l − target|.
    """
    if kept.dim() != 2 or kept.shape[1] != len(layers):
        raise ValueError(f"atp_loss: kept must be [B, L={len(layers)}], got {tuple(kept.shape)}")
    lidx = torch.as_tensor(list(layers), dtype=kept.dtype, device=kept.device)  # [L]
    layer_term = (kept / num_tokens * lidx).sum(-1)  # [B]
    target_term = (kept.mean(-1) - target).abs()  # [B]
    return (layer_weight * layer_term + target_weight * target_term).mean()


# ---------------------------------------------------------------------------------------------- reducer
@register_reducer("atp", config=ATPConfig)
class ATP(Reducer):
    """Keep the tokens that pass ATP's learned redundancy or spatial threshold, at most k per sample."""

    needs_query = True
    adaptive = True
    in_llm_stage = "atp_llm"

    def __init__(self, config: ATPConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        self.thresholds = ATPThresholds(c.hidden, c.init_theta_red, c.init_theta_spatial)

    def _reduce(self, vt: VisualTokens, k: int, query: Query | None) -> Selection:
        return self._select(vt, k, query)

    def _reduce_valid(self, vt: VisualTokens, ks: Tensor, query: Query | None) -> Selection:
        return self._select(vt, ks, query)

    def _select(self, vt: VisualTokens, k: int | Tensor, query: Query) -> Selection:
        """The method with cap `k` (int, or `[B]` per sample when `vt.valid` is set)."""
        x = vt.tokens  # [B, N, D]
        b, n, _ = x.shape
        h, w = self.grid_of(vt)
        c = self.config
        valid = vt.valid  # [B, N] or None
        s_self, s_cross = importance_scores(x, x, query.embeds, query.valid_mask(), vis_mask=valid)  # [B, N] each
        s_self, s_cross = minmax(s_self, mask=valid), minmax(s_cross, mask=valid)
        s_red = 0.5 * (s_self + s_cross)  # [B, N]
        s_sp = spatial_scores(h, w, c.spatial_rates, c.spatial_lambda, vt.num_views()).to(x.device).expand(b, n)
        theta = self.thresholds(s_self, s_cross, valid)  # [B, 2]
        soft = soft_keep_mask(s_red, s_sp, theta, c.temperature)  # [B, N], carries gradients in training
        if valid is not None:
            soft = soft * valid
        with torch.no_grad():
            keep = hard_keep(s_red, s_sp, theta, k, valid)
            if valid is not None:  # a sample whose budget covers its valid tokens keeps them all (full budget)
                keep |= valid & (k == valid.sum(-1)).unsqueeze(-1)
            passed = (s_red > theta[:, :1]) | (s_sp > theta[:, 1:])
            passed = (passed if valid is None else passed & valid).sum(-1)  # [B] before the budget cap
        idx, mask = keep_mask_to_indices(keep)
        return pruned_selection(
            x, idx, mask, theta=theta, soft_mask=soft, s_red=s_red, s_spatial=s_sp, num_passed=passed
        )


# ---------------------------------------------------------------------------------------------- in-LLM stage
ATP_LLM_FRACTIONS = (2 / 32, 8 / 32, 16 / 32, 24 / 32)


@dataclass
class ATPInLLMConfig(ATPConfig):
    layers: tuple[int, ...] | None = None  # first layer after each ATP module; None: 2, 8, 16, 24 of 32 (scaled)


@register_reducer("atp_llm", config=ATPInLLMConfig)
class ATPInLLM(InLLMReducer):
    """ATP modules inside the LLM: per layer and instance, keep the tokens passing either learned threshold."""

    adaptive = True

    def __init__(self, config: ATPInLLMConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        stages = len(c.layers) if c.layers is not None else len(ATP_LLM_FRACTIONS)
        self.thresholds = nn.ModuleList(
            ATPThresholds(c.hidden, c.init_theta_red, c.init_theta_spatial) for _ in range(stages)
        )

    def plan(self, n_visual: int, k: int, num_layers: int) -> list[tuple[int, int]]:
        layers = self._layers_at(self.config.layers, ATP_LLM_FRACTIONS, num_layers)
        return [(layer, k) for layer in layers]

    def spatial(self, ctx, b: int, cols: Tensor) -> Tensor:
        """`[V]` SAP scores of sample b's visual columns `cols`, from their positions in their image's layout."""
        c = self.config
        cache = ctx.memo.setdefault("atp_sap", {})
        out = torch.zeros(cols.numel(), device=cols.device)
        images = ctx.image[b, cols]
        for img in images.unique().tolist():
            if img not in cache:
                h, w, views = ctx.grids[img]
                cache[img] = spatial_scores(h, w, c.spatial_rates, c.spatial_lambda, views).to(cols.device)
            sel = images == img
            out[sel] = cache[img][ctx.layout[b, cols[sel]]]
        return out

    def select(self, ctx, n_keep: Tensor) -> Tensor:
        keep = torch.zeros_like(ctx.visual)
        text = ctx.text_after_visual()
        thetas = torch.zeros(ctx.visual.shape[0], 2, device=keep.device)
        for b in range(ctx.visual.shape[0]):
            vis = ctx.visual[b].nonzero().squeeze(-1)  # [V]
            if vis.numel() == 0 or int(n_keep[b]) == 0:
                continue
            q, k = ctx.q[b : b + 1], ctx.k[b : b + 1]  # [1, H, L, dh]
            tcols = text[b].nonzero().squeeze(-1)
            s_self, s_cross = importance_scores(q[:, :, vis], k[:, :, vis], q[:, :, tcols], scale=ctx.scale)
            s_self, s_cross = minmax(s_self), minmax(s_cross)  # [1, V]
            s_red = 0.5 * (s_self + s_cross)
            s_sp = self.spatial(ctx, b, vis).unsqueeze(0)  # [1, V]
            theta = self.thresholds[ctx.stage](s_self, s_cross)  # [1, 2]
            kept = hard_keep(s_red, s_sp, theta, int(n_keep[b]))[0]  # [V]
            keep[b, vis[kept]] = True
            thetas[b] = theta[0]
        ctx.memo.setdefault("atp_theta", {})[ctx.stage] = thetas
        return keep


__all__ = [
    "ATP",
    "ATPConfig",
    "ATPInLLM",
    "ATPInLLMConfig",
    "ATPThresholds",
    "atp_loss",
    "hard_keep",
    "importance_scores",
    "minmax",
    "redundancy_score",
    "soft_keep_mask",
    "spatial_scores",
]
