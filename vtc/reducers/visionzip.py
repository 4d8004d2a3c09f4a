"""VisionZip: Longer is Better but Not Necessary in Vision Language Models.

Yang et al., arXiv 2412.04467 (https://github.com/dvlab-research/VisionZip). The budget is split into
*dominant* tokens, the ones the vision encoder's [CLS] token attends to most, kept as they are, and *contextual*
tokens: among the remaining tokens, targets are taken at a uniform stride, every other remaining token joins the
target whose (normalised) attention key is most similar to its own, and each group becomes one token.

Pinned choices:
    * Budget split: contextual c = floor(k * contextual_ratio + 1/2) with contextual_ratio = 10/64, the paper's
      ratio (54 + 10 = 64, 108 + 20 = 128, 162 + 30 = 192); at least 1 when k >= 2, and at most N - k so that
      every contextual token merges something (at k = N there is none and the output is the input). Dominant
      d = k - c. The official 54 dominant tokens include the CLS token; vtc's tokens hold patches only, so all
      d dominant tokens are patches.
    * Dominant score: head-mean CLS attention, softmax over the patches (`cls_attention_probs`); the official
      code sums the heads' softmax over CLS + patches, which differs only by the CLS column's share per head.
    * Targets: with R = N - d remaining tokens in index order, positions 0, s, 2s, ... (s = max(1, R // c)),
      the first c of them (as the official code). Similarity: dot product of L2-normalised keys; the keys are
      averaged over the heads of `cls_attn` first (the official metric is the head-mean key), which
      `head_mean_keys=False` turns off (heads concatenated). Ties go to the earlier target.
    * Contextual token = plain mean of its group, target included, so `weights` (1 per dominant token, group size
      per contextual token) conserve the input mass. The official code returns target + mean(other members),
      which is not an average (its scale doubles when the group has other members).
    * Output order: the d dominant tokens in ascending index order, then the c contextual tokens in ascending
      target index order. `info["anchors"]` holds the index each output stands on (dominant index or target),
      `info["num_dominant"]`/`info["num_contextual"]` the split.
    * `VisualTokens.valid`: sample b splits its k_b over its M_b valid tokens (c_b = contextual_count(k_b, M_b)); the
      dominant tokens are the top valid ones by the encoder's own CLS attention (softmax over the whole view), and
      the remaining tokens, targets and groups are the valid ones only, so invalid tokens go nowhere
      (assignment −1). Rows are padded to the largest k_b; `num_dominant`/`num_contextual` become `[B]` tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.attention import cls_attention_probs
from ..ops.grid import scatter_mean
from ..ops.select import gather_tokens, keep_mask_to_indices, pad_index_lists, rank_valid_first, topk_ascending
from ..types import Query, Selection, VisualTokens
from .base import Reducer, ReducerConfig, register_reducer


@dataclass
class VisionZipConfig(ReducerConfig):
    contextual_ratio: float = 10 / 64  # share of the budget given to contextual (merged) tokens, in [0, 1]
    head_mean_keys: bool = True  # average keys over the cls_attn heads before the cosine (official metric)

    def __post_init__(self) -> None:
        if not 0.0 <= self.contextual_ratio <= 1.0:
            raise ValueError(f"visionzip: contextual_ratio must lie in [0, 1], got {self.contextual_ratio!r}")


def contextual_count(k: int, n: int, ratio: float) -> int:
    """Contextual tokens in a budget of k out of n (see the module docstring)."""
    c = math.floor(k * ratio + 0.5)
    if ratio > 0 and k >= 2:
        c = max(c, 1)
    return max(0, min(c, k, n - k))


@register_reducer("visionzip", config=VisionZipConfig)
class VisionZip(Reducer):
    """Keep the top-CLS-attention tokens, merge the rest into a few key-space groups."""

    requires = ("cls_attn", "keys")
    merges = True

    def _metric(self, vt: VisualTokens) -> Tensor:
        keys = vt.keys.float()  # [B, N, Dk]
        h = vt.cls_attn.shape[1]
        if self.config.head_mean_keys and h > 1:
            b, n, dk = keys.shape
            if dk % h:
                raise self._fail(
                    f"keys have Dk={dk} channels, not divisible by the {h} heads of cls_attn; pass head-concatenated "
                    "keys or create the reducer with head_mean_keys=False"
                )
            keys = keys.reshape(b, n, h, dk // h).mean(2)
        return F.normalize(keys, dim=-1)

    def _reduce(self, vt: VisualTokens, k: int, query: Query | None) -> Selection:
        x = vt.tokens  # [B, N, D]
        b, n, _ = x.shape
        c = contextual_count(k, n, self.config.contextual_ratio)
        d = k - c
        with torch.no_grad():
            scores = cls_attention_probs(vt.cls_attn)  # [B, N]
            dominant = topk_ascending(scores, d)  # [B, d]
            is_dom = torch.zeros(b, n, dtype=torch.bool, device=x.device).scatter_(1, dominant, True)
            rest, _ = keep_mask_to_indices(~is_dom)  # [B, R] ascending, R = N - d in every row
            assignment = torch.full((b, n), -1, dtype=torch.long, device=x.device)
            assignment.scatter_(1, dominant, torch.arange(d, device=x.device).expand(b, d))
            step = max(1, rest.shape[1] // max(c, 1))
            t = torch.arange(0, rest.shape[1], step, device=x.device)[:c]  # [c] target slots within rest
            targets = rest[:, t]  # [B, c]
            if c > 0:
                m = self._metric(vt)  # [B, N, C]
                sim = gather_tokens(m, rest) @ gather_tokens(m, targets).transpose(-1, -2)  # [B, R, c]
                group = sim.argmax(dim=-1)  # [B, R]
                group[:, t] = torch.arange(c, device=x.device)  # a target is its own group
                assignment.scatter_(1, rest, d + group)
        tokens, weights = scatter_mean(x, assignment, k)  # [B, k, D], [B, k]
        mask = torch.ones(b, k, dtype=torch.bool, device=x.device)
        info = {
            "scores": scores,
            "anchors": torch.cat([dominant, targets], dim=1),
            "num_dominant": d,
            "num_contextual": c,
        }
        return Selection(tokens, None, mask, weights=weights, assignment=assignment, info=info)

    def _reduce_valid(self, vt: VisualTokens, ks: Tensor, query: Query | None) -> Selection:
        x = vt.tokens  # [B, N, D]
        b, n, _ = x.shape
        dev = x.device
        valid = vt.valid  # [B, N]
        counts = valid.sum(-1)  # [B]
        ratio = self.config.contextual_ratio
        cs_list = [contextual_count(kb, mb, ratio) for kb, mb in zip(ks.tolist(), counts.tolist(), strict=True)]
        cs = torch.tensor(cs_list, dtype=torch.long, device=dev)  # [B] contextual
        ds = ks - cs  # [B] dominant
        kmax = int(ks.max())
        with torch.no_grad():
            scores = cls_attention_probs(vt.cls_attn)  # [B, N]
            is_dom = rank_valid_first(scores, valid) < ds.unsqueeze(-1)  # [B, N] top-d_b valid tokens
            dominant, dmask = keep_mask_to_indices(is_dom)  # [B, dmax]
            rest, rmask = keep_mask_to_indices(valid & ~is_dom)  # [B, Rmax], R_b = M_b - d_b real per row
            assignment = torch.full((b, n + 1), -1, dtype=torch.long, device=dev)  # spare column n for padding
            slot = torch.arange(dominant.shape[1], device=dev).expand_as(dominant)
            assignment.scatter_(1, dominant.masked_fill(~dmask, n), slot)
            rest_counts = rmask.sum(-1).tolist()
            steps = [torch.arange(0, r, max(1, r // max(c, 1)))[:c] for r, c in zip(rest_counts, cs_list, strict=True)]
            tpos, tmask = pad_index_lists(steps, dev)  # [B, cmax] target slots within rest
            targets = rest.gather(1, tpos)  # [B, cmax]
            if tpos.shape[1] > 0:
                m = self._metric(vt)  # [B, N, C]
                sim = gather_tokens(m, rest) @ gather_tokens(m, targets).transpose(-1, -2)  # [B, Rmax, cmax]
                group = sim.masked_fill(~tmask.unsqueeze(1), -torch.inf).argmax(dim=-1)  # [B, Rmax]
                group = torch.cat([group, group[:, :1]], 1)  # spare column for padded targets
                cols = torch.arange(tpos.shape[1], device=dev).expand_as(tpos)
                group.scatter_(1, tpos.masked_fill(~tmask, rest.shape[1]), cols)  # a target is its own group
                merged = rmask & (cs > 0).unsqueeze(-1)  # without contextual tokens the rest is dropped
                out = ds.unsqueeze(-1) + group[:, :-1]
                assignment.scatter_(1, rest.masked_fill(~merged, n), out.masked_fill(~merged, -1))
            assignment = assignment[:, :n].contiguous()
            anchors = torch.zeros(b, kmax + 1, dtype=torch.long, device=dev)
            anchors.scatter_(1, slot.masked_fill(~dmask, kmax), dominant)
            tslot = ds.unsqueeze(-1) + torch.arange(tpos.shape[1], device=dev)
            anchors.scatter_(1, tslot.masked_fill(~tmask, kmax), targets)
        tokens, weights = scatter_mean(x, assignment, kmax)  # [B, kmax, D], [B, kmax] (padding: zeros)
        mask = torch.arange(kmax, device=dev) < ks.unsqueeze(-1)
        info = {"scores": scores, "anchors": anchors[:, :kmax], "num_dominant": ds, "num_contextual": cs}
        return Selection(tokens, None, mask, weights=weights, assignment=assignment, info=info)
