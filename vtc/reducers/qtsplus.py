"""QTSplus: query-aware token selection with an adaptive, per-sample budget (a trained reducer).

Li et al., "Seeing the Forest and the Trees: Query-Aware Tokenizer for Long-Video Multimodal Language Models",
arXiv 2511.11910 (https://github.com/Siyou-Li/QTSplus). Implemented from the paper's equations.

1. Scoring: a multi-head cross-attention block, queries = question embeddings, keys = visual tokens (both
   RMS-normalised, learnable projections). r_j = max over heads and (unpadded) text tokens of
   softmax_j(q_t · k_j / sqrt(d_head)), so r ∈ (0, 1]^M.
2. Budget head: p = r / Σr, H = entropy(p), x = [mean question embedding, log M, max r, H] → MLP(D+3 → 256 → 1),
   ρ = ρ_min + (ρ_max − ρ_min)·σ(x), n = min(max(⌈ρM⌉, 1), n_max).
3. Selection. Inference (`module.eval()`): the top-n tokens by r, in ascending order. Training (`module.train()`):
   a threshold t with Σ_j σ((r_j − t)/τ) = ρM (found by Newton), then a hard straight-through selection whose
   gradients reach both the scoring block (through r) and the budget head (through t(ρ)).
4. Optional re-encoder: one small self-attention block over the kept tokens (residual).

Pinned choices (the paper or its code leaves them open, or vtc needs them):

* Budget language: the vtc budget k is the paper's cap n_max. Each sample keeps n ≤ k tokens (adaptive); the
  Selection is padded to the batch's largest n with `mask` False on trailing padding.
* M is the whole sequence (all views / frames); QTSplus has no notion of views.
* Heads: `n_heads` (default 8 as in the official config), head width `head_dim` (default ⌈D / n_heads⌉), q/k
  projections with bias. With a single scoring layer only the attention weights matter, so the block has no
  value/output projection or FFN. Scores are computed in float32 whatever the input dtype.
* Parameters need D. With `dim=None` they are built on the first call (or on `load_state_dict`), from a seed
  drawn from torch's global RNG when the reducer is constructed, so `torch.manual_seed(s); create_reducer(...)`
  fixes the weights exactly as for an ordinary module. Give `dim` to create an optimizer before the first call.
* Newton: iterations run without autograd in float64, safeguarded by bisection (Σσ is monotone in t); one final
  Newton step with autograd gives t the implicit-function gradient ∂t/∂r, ∂t/∂ρ.
* Training selection (`train_sampling=True`, the official code's hard Gumbel): token j is kept when
  (r_j − t)/τ + L_j > 0 with L_j logistic noise (the difference of two Gumbels), i.e. with probability
  σ((r_j − t)/τ), so the expected kept count is ρM. (The official code feeds logits r − t, which keeps with
  probability σ(r − t) instead; we follow the paper's threshold equation.) The straight-through mask is
  hard + σ(z) − stopgrad(σ(z)), z = (r − t)/τ + L. At most k tokens are kept (the largest z) and at least one.
  `train_sampling=False` is the paper's straight-through top-n: hard = top-n of r, soft = σ((r − t)/τ).
  Kept tokens are multiplied by the mask, whose forward value is exactly 1, so they equal the inputs.
  The sampled count, not n, is what training keeps; `info["n"]` still reports n.
* Re-encoder (`reencode`, default False): RMSNorm → multi-head self-attention over the kept tokens (padding masked
  as keys) → output projection → residual. The output projection is zero-initialised, so an untrained re-encoder is
  exactly the identity (the paper initialises it from an LM layer instead; load such weights into
  `reencoder`). No positional information is added. With it on, `tokens` are contextualised versions of the kept
  tokens while `indices` still name their source positions (use them for position ids); `info["reencoded"]`
  says which. Default off: untrained it changes nothing but costs compute, and off the kept tokens are the
  inputs bit for bit.
* `VisualTokens.valid`: everything runs over the M_b valid tokens of sample b, exactly as if the invalid ones were
  not in the input: the scoring softmax is over the valid keys (an invalid token scores 0), the budget head sees
  log M_b and the entropy of the valid scores, n = min(max(⌈ρ M_b⌉, 1), k_b), and the training threshold solves
  Σ_{valid j} σ((r_j − t)/τ) = ρ M_b; invalid tokens are never kept, and a sample with k_b = M_b keeps all of its
  valid tokens (as the full budget does). `info["n_max"]` is then the `[B]` caps k_b.
* Losses: `qtsplus_aux_loss` gives λt(ρM)²/n_max² + λm(ρM)/n_max + λs(ρ − ρ̄)² (batch means; the official
  defaults λt=1, λm=1.7, λs=0.05; ρ̄ a running mean the caller keeps, the detached batch mean by default).
  The LM cross-entropy is the caller's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.select import gather_tokens, keep_mask_to_indices, rank_valid_first
from ..types import Query, Selection, VisualTokens
from .base import Reducer, ReducerConfig, register_reducer


@dataclass
class QTSplusConfig(ReducerConfig):
    dim: int | None = None  # token width D; None builds the parameters on the first call
    n_heads: int = 8  # heads of the scoring (and re-encoder) attention
    head_dim: int | None = None  # width per head; None = ceil(D / n_heads)
    hidden: int = 256  # budget-head MLP width
    rho_min: float = 0.05  # smallest predicted retention ratio
    rho_max: float = 0.5  # largest predicted retention ratio
    tau: float = 0.1  # temperature τ of the training gate σ((r - t) / τ)
    newton_iters: int = 50  # most Newton/bisection steps for the threshold (stops early at convergence)
    train_sampling: bool = True  # training: hard Bernoulli (Gumbel) sample around t; False: straight-through top-n
    reencode: bool = False  # apply the re-encoder block to the kept tokens


def _linear(m: nn.Linear, x: Tensor) -> Tensor:
    """`m(x)` in float32 whatever the parameter dtype."""
    return F.linear(x, m.weight.float(), None if m.bias is None else m.bias.float())


def _rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


class QTSplusScorer(nn.Module):
    """Cross-attention relevance r_j = max_{h, t} softmax_j(q_{h,t} · k_{h,j} / sqrt(d_head))."""

    def __init__(self, dim: int, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.q_norm = nn.Parameter(torch.ones(dim))
        self.kv_norm = nn.Parameter(torch.ones(dim))
        self.q_proj = nn.Linear(dim, n_heads * head_dim)
        self.k_proj = nn.Linear(dim, n_heads * head_dim)

    def forward(self, x: Tensor, q: Tensor, q_mask: Tensor, valid: Tensor | None = None) -> Tensor:
        """`x: [B, N, D]`, `q: [B, T, D]` float32, `q_mask: [B, T]` bool, `valid: [B, N]` bool (None: all) →
        `r: [B, N]` float32 (0 for invalid tokens)."""
        b, n, _ = x.shape
        t = q.shape[1]
        k = _linear(self.k_proj, _rms_norm(x, self.kv_norm)).view(b, n, self.n_heads, self.head_dim)
        u = _linear(self.q_proj, _rms_norm(q, self.q_norm)).view(b, t, self.n_heads, self.head_dim)
        logits = torch.einsum("bthd,bnhd->bhtn", u, k) / math.sqrt(self.head_dim)  # [B, H, T, N]
        if valid is not None:  # the softmax runs over the valid keys only
            logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = logits.softmax(dim=-1)
        probs = probs.masked_fill(~q_mask[:, None, :, None], -1.0)  # padded text rows never win the max
        return probs.amax(dim=(1, 2))  # [B, N]


class QTSplusBudgetHead(nn.Module):
    """ρ = ρ_min + (ρ_max − ρ_min)·σ(MLP([mean question embedding, log M, max r, H(r / Σr)]))."""

    def __init__(self, dim: int, hidden: int, rho_min: float, rho_max: float) -> None:
        super().__init__()
        self.rho_min, self.rho_max = rho_min, rho_max
        self.mlp = nn.Sequential(nn.Linear(dim + 3, hidden), nn.GELU(), nn.Linear(hidden, 1))

    @staticmethod
    def features(r: Tensor, q: Tensor, q_mask: Tensor, counts: Tensor | None = None) -> Tensor:
        """`[B, D + 3]` inputs of the MLP from `r: [B, N]`, `q: [B, T, D]`, `q_mask: [B, T]`; `counts` `[B]`: the
        valid tokens M_b (None: N; invalid tokens have r = 0 and add nothing to the entropy)."""
        w = q_mask.float().unsqueeze(-1)  # [B, T, 1]
        sq = (q * w).sum(1) / w.sum(1)  # [B, D] mean over real text tokens
        p = r / r.sum(-1, keepdim=True)  # r > 0 on every valid token (a max of softmax values)
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1)  # [B]
        if counts is None:
            log_m = torch.full_like(ent, math.log(r.shape[-1]))
        else:
            log_m = counts.to(ent.dtype).log()
        return torch.cat([sq, log_m[:, None], r.amax(-1, keepdim=True), ent[:, None]], dim=-1)

    def forward(self, feats: Tensor) -> Tensor:
        """`[B, D + 3]` → ρ `[B]` in [ρ_min, ρ_max]."""
        lin1, act, lin2 = self.mlp
        z = _linear(lin2, act(_linear(lin1, feats))).squeeze(-1)
        return self.rho_min + (self.rho_max - self.rho_min) * torch.sigmoid(z)


class QTSplusReEncoder(nn.Module):
    """x + O(MHA(RMSNorm(x))) over the kept tokens; O is zero-initialised, so it starts as the identity."""

    def __init__(self, dim: int, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.norm = nn.Parameter(torch.ones(dim))
        self.qkv = nn.Linear(dim, 3 * n_heads * head_dim)
        self.o_proj = nn.Linear(n_heads * head_dim, dim)
        nn.init.zeros_(self.o_proj.weight)
        nn.init.zeros_(self.o_proj.bias)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """`x: [B, K, D]` float32, `mask: [B, K]` bool (False = padding, never attended to) → `[B, K, D]`."""
        b, k, _ = x.shape
        qkv = _linear(self.qkv, _rms_norm(x, self.norm)).view(b, k, 3, self.n_heads, self.head_dim)
        q, kk, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, K, dh]
        out = F.scaled_dot_product_attention(q, kk, v, attn_mask=mask[:, None, None, :])  # [B, H, K, dh]
        return x + _linear(self.o_proj, out.transpose(1, 2).reshape(b, k, -1))


def newton_threshold(r: Tensor, rho: Tensor, tau: float, iters: int = 50, valid: Tensor | None = None) -> Tensor:
    """t `[B]` with Σ_j σ((r_j − t)/τ) = ρM per row, differentiable in `r: [B, M]` and `rho: [B]`.

    Safeguarded Newton (bisection when a step leaves the bracket) without autograd in float64, then one Newton
    step with autograd, whose gradient at the root is the implicit one: ∂t/∂θ = −(∂f/∂θ) / (∂f/∂t).
    With `valid` (`[B, M]` bool) the sum runs over the valid entries and M is their count per row.
    """
    if valid is None:
        m, w = r.shape[-1], None
    else:
        m, w = valid.sum(-1), valid.double()  # [B] counts, [B, M] 0/1 weights
    with torch.no_grad():
        r64, rho64 = r.detach().double(), rho.detach().double()
        target = rho64 * m  # [B]
        logit = torch.log(rho64) - torch.log1p(-rho64)
        lo_r = r64 if valid is None else r64.masked_fill(~valid, float("inf"))
        hi_r = r64 if valid is None else r64.masked_fill(~valid, float("-inf"))
        lo = lo_r.amin(-1) - tau * (logit.clamp_min(0) + 1)  # f(lo) >= 0
        hi = hi_r.amax(-1) + tau * ((-logit).clamp_min(0) + 1)  # f(hi) <= 0
        # Start at the score ranked ⌈ρM⌉: the hard threshold the soft one approximates.
        if valid is None:
            rank = (target.ceil().long() - 1).clamp(0, m - 1)
            tol = 1e-6 * max(m, 1)
        else:
            rank = torch.minimum((target.ceil().long() - 1).clamp(min=0), m - 1)
            tol = 1e-6 * m.clamp(min=1).double()
        t = hi_r.sort(-1, descending=True).values.gather(1, rank[:, None]).squeeze(1)
        for _ in range(iters):
            s = torch.sigmoid((r64 - t[:, None]) / tau)  # [B, M]
            if w is not None:
                s = s * w
            f = s.sum(-1) - target
            if bool((f.abs() < tol).all()):
                break
            lo = torch.where(f > 0, t, lo)  # Σσ decreases in t: too many kept → the root lies above t
            hi = torch.where(f > 0, hi, t)
            fp = -(s * (1 - s)).sum(-1) / tau
            step = t - f / fp
            bad = ~torch.isfinite(step) | (step <= lo) | (step >= hi)
            t = torch.where(bad, 0.5 * (lo + hi), step)
    t = t.to(r.dtype)
    s = torch.sigmoid((r - t[:, None]) / tau)
    if w is not None:
        s = s * w.to(s.dtype)
    f = s.sum(-1) - rho * m
    fp = (-(s * (1 - s)).sum(-1) / tau).clamp_max(-1e-12)
    return t - f / fp


def qtsplus_aux_loss(
    rho: Tensor,
    num_tokens: int | Tensor,
    n_max: int | Tensor,
    rho_mean: float | Tensor | None = None,
    lambda_t: float = 1.0,
    lambda_m: float = 1.7,
    lambda_s: float = 0.05,
) -> dict[str, Tensor]:
    """The paper's compute terms (the LM cross-entropy is added by the caller).

    Args:
        rho: `[B]` predicted retention ratios (`sel.info["rho"]`).
        num_tokens: M, the visual tokens per sample before selection (`[B]` valid counts with `VisualTokens.valid`).
        n_max: the cap (vtc's budget k, `sel.info["n_max"]`; `[B]` with `VisualTokens.valid`).
        rho_mean: ρ̄ of the smoothness term (e.g. a running mean over training); None = the detached batch mean.
    Returns:
        `flops` = λt·mean((ρM)²)/n_max², `kv` = λm·mean(ρM)/n_max, `smooth` = λs·mean((ρ − ρ̄)²), and `total`.
    """
    kept = rho * num_tokens  # [B]
    ref = rho.detach().mean() if rho_mean is None else rho_mean
    if isinstance(n_max, Tensor):  # per-sample caps
        cap = n_max.to(kept.dtype)
        flops, kv = lambda_t * (kept**2 / cap**2).mean(), lambda_m * (kept / cap).mean()
    else:
        flops, kv = lambda_t * (kept**2).mean() / float(n_max) ** 2, lambda_m * kept.mean() / float(n_max)
    out = {"flops": flops, "kv": kv, "smooth": lambda_s * ((rho - ref) ** 2).mean()}
    out["total"] = out["flops"] + out["kv"] + out["smooth"]
    return out


@register_reducer("qtsplus", config=QTSplusConfig)
class QTSplus(Reducer):
    """Keep the top-n tokens by question cross-attention, n = min(⌈ρM⌉, k) with ρ predicted per sample."""

    needs_query = True
    adaptive = True

    def __init__(self, config: QTSplusConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        if not 0.0 < c.rho_min <= c.rho_max < 1.0:
            raise self._fail(f"needs 0 < rho_min <= rho_max < 1, got rho_min={c.rho_min}, rho_max={c.rho_max}")
        if c.tau <= 0 or c.n_heads < 1 or c.hidden < 1 or c.newton_iters < 1:
            raise self._fail(
                f"needs tau > 0 and n_heads, hidden, newton_iters >= 1, got tau={c.tau}, n_heads={c.n_heads}, "
                f"hidden={c.hidden}, newton_iters={c.newton_iters}"
            )
        if (c.dim is not None and c.dim < 1) or (c.head_dim is not None and c.head_dim < 1):
            raise self._fail(f"dim and head_dim must be >= 1 when given, got dim={c.dim}, head_dim={c.head_dim}")
        self._init_seed = int(torch.randint(0, 2**62, (1,)))  # consumed like an eager module's init would
        self.dim: int | None = None
        if c.dim is not None:
            self.build(c.dim)

    # ------------------------------------------------------------------ parameters
    def build(self, dim: int, device: torch.device | str | None = None) -> None:
        """Create the parameters for token width `dim` (done by the first call when `config.dim` is None)."""
        c = self.config
        hd = c.head_dim or -(-dim // c.n_heads)
        # Ordinary (trainable) parameters even when the first call runs under torch.inference_mode.
        with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._init_seed)
            self.scorer = QTSplusScorer(dim, c.n_heads, hd)
            self.budget_head = QTSplusBudgetHead(dim, c.hidden, c.rho_min, c.rho_max)
            self.reencoder = QTSplusReEncoder(dim, c.n_heads, hd) if c.reencode else None
            if device is not None:
                self.to(device)
        self.dim = dim

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "scorer.q_norm"
        if self.dim is None and key in state_dict:  # a lazy reducer takes D from the checkpoint
            self.build(int(state_dict[key].shape[0]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ forward
    def _reduce(self, vt: VisualTokens, k: int, query: Query | None) -> Selection:
        return self._select(vt, k, query)

    def _reduce_valid(self, vt: VisualTokens, ks: Tensor, query: Query | None) -> Selection:
        return self._select(vt, ks, query)

    def _select(self, vt: VisualTokens, k: int | Tensor, query: Query) -> Selection:
        """The method with cap `k` (int, or `[B]` per sample when `vt.valid` is set)."""
        x = vt.tokens  # [B, N, D]
        b, n, d = x.shape
        valid = vt.valid  # [B, N] or None
        if self.dim is None:
            self.build(d, x.device)
        elif d != self.dim:
            raise self._fail(f"was built for tokens of width D={self.dim}, got D={d}")
        x32, q32, q_mask = x.float(), query.embeds.float(), query.valid_mask()

        r = self.scorer(x32, q32, q_mask, valid)  # [B, N]
        counts = None if valid is None else valid.sum(-1)  # [B]
        rho = self.budget_head(QTSplusBudgetHead.features(r, q32, q_mask, counts))  # [B]
        with torch.no_grad():
            if valid is None:
                n_keep = (rho.detach().double() * n).ceil().long().clamp(1, k)  # [B]
                order = torch.sort(r.detach(), dim=-1, descending=True, stable=True).indices
                rank_r = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=x.device).expand(b, n))
            else:
                n_keep = torch.minimum((rho.detach().double() * counts).ceil().long(), k).clamp(min=1)
                n_keep = torch.where(k == counts, counts, n_keep)  # budget covers every valid token: keep all
                rank_r = rank_valid_first(r.detach(), valid)  # invalid tokens rank last
            cap = k if valid is None else k.unsqueeze(-1)  # int or [B, 1]
        info: dict[str, Any] = {
            "scores": r,
            "rho": rho,
            "n": n_keep,
            "n_max": k,
            "reencoded": self.reencoder is not None,
        }

        if not self.training:
            keep = rank_r < n_keep[:, None]  # [B, N] top-n of r
            idx, mask = keep_mask_to_indices(keep)
            if self.reencoder is None:
                tokens = gather_tokens(x, idx) * mask.unsqueeze(-1).to(x.dtype)
                return Selection(tokens, idx, mask, info=info)
            kept = gather_tokens(x32, idx) * mask.unsqueeze(-1)
        else:
            t = newton_threshold(r, rho, self.config.tau, self.config.newton_iters, valid)  # [B]
            logits = (r - t[:, None]) / self.config.tau  # [B, N]
            if valid is not None:  # an invalid token is never kept and gets no gradient
                logits = logits.masked_fill(~valid, float("-inf"))
            if self.config.train_sampling:
                u = torch.rand(b, n, device=x.device).clamp(1e-6, 1 - 1e-6)
                z = logits + torch.log(u) - torch.log1p(-u)  # logistic noise = difference of two Gumbels
                with torch.no_grad():
                    zo = torch.sort(z.detach(), dim=-1, descending=True, stable=True).indices
                    rank_z = torch.empty_like(zo).scatter_(1, zo, torch.arange(n, device=x.device).expand(b, n))
                    keep = ((z.detach() > 0) & (rank_z < cap)) | (rank_z == 0)  # at most k, at least one
                    if valid is not None:  # budget covers every valid token: keep all
                        keep |= valid & (k == counts).unsqueeze(-1)
            else:
                z = logits
                keep = rank_r < n_keep[:, None]
            soft = torch.sigmoid(z)
            st = keep.float() + (soft - soft.detach())  # forward: exactly 0/1; backward: ∂σ(z)
            idx, mask = keep_mask_to_indices(keep)
            kept = gather_tokens(x32 * st.unsqueeze(-1), idx) * mask.unsqueeze(-1)
            info.update(threshold=t, keep_prob=torch.sigmoid(logits), soft_mask=st, hard_mask=keep)
        if self.reencoder is not None:
            kept = self.reencoder(kept, mask) * mask.unsqueeze(-1)
        return Selection(kept.to(x.dtype), idx, mask, info=info)
