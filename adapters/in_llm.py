"""Pruning visual tokens inside the LLM at prefill (FastV, PDrop, DART, SparseVLM, ATP, ToDRE), KV cache consistent.

An in-LLM reducer gives a *plan* — the decoder layers at which visual tokens are dropped and, per sample, the most
that survive each stage — and, at each stage, a *decision* over the visual tokens still alive (`select`: a keep
mask, optionally recycled tokens written at dropped columns). At prefill, the decoder layer of each stage is
entered with the kept columns only: the layer's wrapper gathers the hidden states, rotary embeddings, position ids
and attention mask, so that layer and every later one compute and cache fewer tokens. Decisions use the queries and
keys of the layer before the stage, captured with forward hooks on its `q_proj` / `k_proj` and rotated with the
model's own RoPE function beside the fused attention (never switching to eager attention).

Budgets resolve per sample (a fraction of each sample's visual tokens; a count capped at them); a sample at full
budget is never pruned, and a batch at full budget runs the untouched model. Visual tokens are the image/video
tokens the adapter placed (LLaVA-NeXT's row newlines are separators: never dropped, never counted). The pruner
reports the visual tokens of every sample in every layer (`per_layer`), from which the adapter derives the
layer-averaged count per image.

At decode, layers at or after a stage hold shorter caches than the layers before it: their wrappers gather the
columns of the attention mask that the model built for the unpruned cache. Kept tokens keep their positions; a
recycled token has the position of the column it was written at.
"""

from __future__ import annotations

import numbers
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class LayerContext:
    """What a stage's `select` / `score` may use (all for the current, already reduced, sequence).

    Attributes:
        q: `[B, H, L, dh]` rotated queries of the layer before the stage (float32).
        k: `[B, H, L, dh]` rotated keys of that layer, GQA heads repeated (float32).
        hidden: `[B, L, D]` hidden states entering the stage's layer.
        visual: `[B, L]` bool, visual tokens still alive.
        valid: `[B, L]` bool, real (non-padding) columns.
        last: `[B]` column of the last prompt token (the query row FastV and PDrop use).
        src: `[B, L]` column of every current column in the LLM's input sequence.
        stage: index of this stage in the plan (0 = first).
        memo: scratch dict kept for the whole prefill (a method may compute something at its first stage and reuse
            it later, e.g. SparseVLM's raters).
        embeds: `[B, L, D]` the LLM's input embeddings at the current columns.
        layout: `[B, L]` index of each visual column in its image's reducer layout (`VisualTokens` order: views or
            frames of h×w, row-major), -1 for other columns.
        image: `[B, L]` image (in placeholder order over the batch) of each visual column, -1 otherwise.
        grids: per image `(h, w, views)` of its reducer layout.
        scale: the attention's softmax scale.
    """

    q: Tensor
    k: Tensor
    hidden: Tensor
    visual: Tensor
    valid: Tensor
    last: Tensor
    src: Tensor | None = None
    stage: int = 0
    memo: dict[str, Any] = field(default_factory=dict)
    embeds: Tensor | None = None
    layout: Tensor | None = None
    image: Tensor | None = None
    grids: list[tuple[int, int, int]] = field(default_factory=list)
    scale: float | None = None

    def _scale(self) -> float:
        return self.scale if self.scale is not None else self.q.shape[-1] ** -0.5

    def last_token_attention(self) -> Tensor:
        """`[B, L]` head-mean softmax attention of the last prompt token over the valid columns."""
        b = torch.arange(self.q.shape[0], device=self.q.device)
        q = self.q[b, :, self.last]  # [B, H, dh]
        logits = torch.einsum("bhd,bhld->bhl", q, self.k) * self._scale()
        logits = logits.masked_fill(~self.valid.unsqueeze(1), float("-inf"))
        return logits.softmax(-1).mean(1)

    def attention_rows(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Head-mean softmax attention (causal, over the valid columns) of the query columns `rows` (`[B, L]` bool).

        Returns:
            `[B, R, L]` float32 attention of each selected row (R = most rows of a sample; padded rows are 0)
            and the `[B, R]` bool mask of real rows. Rows appear in column order.
        """
        b, seq = rows.shape
        counts = rows.sum(-1)
        r = int(counts.max()) if rows.numel() else 0
        pos = torch.arange(seq, device=rows.device).expand(b, seq)
        cols = torch.where(rows, pos, pos + seq).sort(-1).values[:, :r]  # [B, R] selected columns first
        rmask = torch.arange(r, device=rows.device) < counts.unsqueeze(-1)
        cols = cols.masked_fill(~rmask, 0)
        q = self.q.gather(2, cols[:, None, :, None].expand(-1, self.q.shape[1], -1, self.q.shape[-1]))
        logits = torch.einsum("bhrd,bhld->bhrl", q, self.k) * self._scale()  # [B, H, R, L]
        allowed = self.valid[:, None, :] & (pos[:, None, :] <= cols[:, :, None])  # [B, R, L]
        allowed |= ~rmask.unsqueeze(-1)  # padded rows: any finite softmax, zeroed below
        probs = logits.masked_fill(~allowed.unsqueeze(1), float("-inf")).softmax(-1).mean(1)
        return probs * rmask.unsqueeze(-1), rmask

    def text_after_visual(self) -> Tensor:
        """`[B, L]` bool: the real text columns after the last visual column of each row (the question).

        A row whose visual tokens come last (or that has none left) falls back to all its real text columns.
        """
        b, seq = self.visual.shape
        pos = torch.arange(seq, device=self.visual.device).expand(b, seq)
        last_vis = torch.where(self.visual, pos, torch.full_like(pos, -1)).amax(-1, keepdim=True)  # [B, 1]
        text = self.valid & ~self.visual
        after = text & (pos > last_vis)
        return torch.where(after.any(-1, keepdim=True), after, text)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    lm = model.model.language_model
    return lm.layers


class _Capture:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.handles: list[Any] = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class InLLMPruner:
    """Installed by the model adapter when its reducer has `stage == "in_llm"`, or when an in-LLM stage is composed
    after a pre-LLM reducer (`vtc.compress(model, pre, budget=..., in_llm=...)`).

    After a prefill: `plan` is `[(layer, most visual tokens any sample keeps from it on)]`, `stage_src[layer]` /
    `stage_valid[layer]` the LLM-input columns that enter that layer, `recycled[layer]` (methods that recycle) per
    sample the `(host column, [source columns])` of every recycled token, `per_layer` `[B, num_layers]` the visual
    tokens each sample has in each layer, and `effective` `[B]` their layer average.
    """

    def __init__(self, model: nn.Module, reducer: Any, budget: int | float) -> None:
        self.model = model
        self.reducer = reducer
        self.budget = budget
        self.layers = _decoder_layers(model)
        self.plan: list[tuple[int, int]] = []
        self.caps: Tensor | None = None  # [S, B] most visual tokens each sample may keep at each stage
        self.frozen: Tensor | None = None  # [B] samples at full budget: never pruned
        self.stage_src: dict[int, Tensor] = {}  # layer → [B, L_s] column (in layer-0 coordinates) of each kept column
        self.stage_valid: dict[int, Tensor] = {}
        self.recycled: dict[int, list[list[tuple[int, Tensor]]]] = {}
        self.per_layer: Tensor | None = None
        self.effective: Tensor | None = None
        self.memo: dict[str, Any] = {}  # what the reducer kept across the stages of the last prefill
        self._prefill: dict[str, Any] | None = None
        self._orig: dict[int, Any] = {}
        self._cap = _Capture()
        self.stage_src_len0 = 0

    # ---------------------------------------------------------------- lifecycle
    def attach(self) -> None:
        for i, layer in enumerate(self.layers):
            self._orig[i] = layer.__dict__.get("forward")
            layer.forward = self._make_forward(i, layer)

    def detach(self) -> None:
        self._cap.remove()
        for i, layer in enumerate(self.layers):
            if self._orig[i] is None:
                del layer.forward
            else:
                layer.forward = self._orig[i]

    def begin_prefill(
        self,
        visual: Tensor,
        valid: Tensor,
        layout: Tensor | None = None,
        image: Tensor | None = None,
        grids: list[tuple[int, int, int]] | None = None,
    ) -> None:
        """Called by the adapter before the LLM runs on a prefill.

        Args:
            visual: `[B, L]` bool, the visual tokens of the LLM's input (separators such as newlines excluded).
            valid: `[B, L]` bool, real columns.
            layout, image, grids: see `LayerContext` (optional; in LLM-input coordinates).
        """
        n_b = [int(n) for n in visual.sum(-1).tolist()]
        b, seq = visual.shape
        num_layers = len(self.layers)
        self.plan, self.caps, self.frozen = [], None, None
        self.stage_src, self.stage_valid, self.recycled = {}, {}, {}
        self.stage_src_len0 = seq
        plans = self._sample_plans(n_b, num_layers)
        if plans is not None:
            ref = next(p for p in plans if p is not None)
            layers = [s for s, _ in ref]
            caps = torch.zeros(len(layers), b, dtype=torch.long)
            for i, p in enumerate(plans):
                if p is None:
                    continue
                if [s for s, _ in p] != layers:
                    raise ValueError(f"{self.reducer.name}: plan layers differ between samples ({p} vs {ref})")
                caps[:, i] = torch.tensor([c for _, c in p], dtype=torch.long)
            self.caps = caps.to(visual.device)
            self.plan = [(s, int(c)) for s, c in zip(layers, caps.amax(1).tolist(), strict=True)]
        src = torch.arange(seq, device=visual.device).expand(b, seq)
        self._prefill = {
            "visual": visual,
            "valid": valid,
            "src": src,
            "mask4": None,
            "counts": [visual.sum(-1)],
            "memo": {},
            "layout": layout,
            "image": image,
            "grids": list(grids or []),
        }
        self._cap.remove()
        for layer_idx, _ in self.plan:
            if layer_idx >= 1:
                self._hook_scores(layer_idx - 1)

    def _sample_plans(self, n_b: list[int], num_layers: int) -> list[list[tuple[int, int]] | None] | None:
        """Every sample's plan (None for a sample without visual tokens), or None when nothing is pruned."""
        from vtc.budget import resolve_budget

        n_max = max(n_b, default=0)
        if n_max == 0:
            return None
        k_max = resolve_budget(self.budget, n_max, who=self.reducer.name)
        fraction = not isinstance(self.budget, numbers.Integral)  # a fraction resolves per sample, a count is capped
        ks = [0 if n == 0 else (resolve_budget(self.budget, n) if fraction else min(k_max, n)) for n in n_b]
        frozen = [k == n for k, n in zip(ks, n_b, strict=True)]
        if all(frozen):  # full budget: the untouched model, for every method
            return None
        self.frozen = torch.tensor(frozen)
        return [self.reducer.plan(n, k, num_layers) if n > 0 else None for n, k in zip(n_b, ks, strict=True)]

    def end_prefill(self) -> None:
        self._cap.remove()
        st = self._prefill
        if st is not None:
            counts = st["counts"]  # before the first stage, then after each stage: [B] each
            num_layers = len(self.layers)
            bounds = [0] + [s for s, _ in self.plan] + [num_layers]
            per_layer = torch.cat(
                [c.unsqueeze(-1).expand(-1, bounds[i + 1] - bounds[i]) for i, c in enumerate(counts)], dim=-1
            )
            self.per_layer = per_layer  # [B, num_layers]
            self.effective = per_layer.float().mean(-1)  # [B]
            self.memo = st["memo"]
        self._prefill = None

    # ---------------------------------------------------------------- capture for scoring
    def _hook_scores(self, idx: int) -> None:
        attn = self.layers[idx].self_attn
        vals = self._cap.values

        def pre(mod, args, kwargs):
            vals["pos_emb"] = kwargs.get("position_embeddings")

        self._cap.handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        self._cap.handles.append(attn.q_proj.register_forward_hook(lambda m, i, o: vals.__setitem__("q", o)))
        self._cap.handles.append(attn.k_proj.register_forward_hook(lambda m, i, o: vals.__setitem__("k", o)))

    def _rotated_qk(self, idx: int) -> tuple[Tensor, Tensor, float]:
        attn = self.layers[idx].self_attn
        vals = self._cap.values
        b, seq, _ = vals["q"].shape
        dh = attn.head_dim
        q = vals["q"].view(b, seq, -1, dh).transpose(1, 2)
        k = vals["k"].view(b, seq, -1, dh).transpose(1, 2)
        cos, sin = vals["pos_emb"]
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        q, k = rope(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        return q.float(), k.float(), float(getattr(attn, "scaling", dh**-0.5))

    # ---------------------------------------------------------------- the layer wrappers
    def _make_forward(self, idx: int, layer: nn.Module):
        orig = layer.forward

        def forward(hidden_states, *args, **kwargs):
            st = self._prefill
            if st is not None and idx == 0:
                st["embeds"] = hidden_states
            stage = next((i for i, (s, _) in enumerate(self.plan) if s == idx), None)
            if st is not None and stage is not None:
                hidden_states = self._prune(idx, stage, hidden_states, kwargs)
            if st is not None and st["mask4"] is not None and idx >= self.plan[0][0]:
                kwargs = self._sliced_kwargs(st, kwargs)
            elif st is None and self.stage_src and self.plan and idx >= self.plan[0][0]:
                kwargs = self._decode_kwargs(idx, kwargs)
            return orig(hidden_states, *args, **kwargs)

        return forward

    def _context(self, idx: int, stage: int, hidden: Tensor, visual: Tensor, valid: Tensor) -> LayerContext:
        st = self._prefill
        src = st["src"]
        q, k, scale = self._rotated_qk(idx - 1) if idx >= 1 else (None, None, None)
        last = torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device)
        embeds = st.get("embeds")
        return LayerContext(
            q=q,
            k=k,
            hidden=hidden,
            visual=visual,
            valid=valid,
            last=last,
            src=src,
            stage=stage,
            memo=st["memo"],
            embeds=None if embeds is None else _gather_seq(embeds, src),
            layout=None if st["layout"] is None else st["layout"].gather(1, src).masked_fill(~visual, -1),
            image=None if st["image"] is None else st["image"].gather(1, src).masked_fill(~visual, -1),
            grids=st["grids"],
            scale=scale,
        )

    def _prune(self, idx: int, stage: int, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
        from vtc.reducers.base import StageDecision

        st = self._prefill
        src = st["src"]
        cur_valid = self._cur_valid(st)
        cur_visual = st["visual"].gather(1, src) & cur_valid
        b, seq = cur_visual.shape
        caps = self.caps[stage]  # [B]
        ctx = self._context(idx, stage, hidden, cur_visual, cur_valid)
        with torch.no_grad():
            dec = self.reducer.select(ctx, caps)
        if isinstance(dec, Tensor):
            dec = StageDecision(dec)
        frozen = self.frozen.to(hidden.device).unsqueeze(-1)  # [B, 1] full-budget samples keep everything
        keep_vis = torch.where(frozen, cur_visual, dec.keep & cur_visual)
        over = keep_vis.sum(-1) > caps
        if bool(over.any()):
            raise RuntimeError(f"{self.reducer.name}: kept more visual tokens than its plan allows at layer {idx}")
        keep = (~cur_visual & cur_valid) | keep_vis
        if dec.host is not None:
            hidden = self._recycle(idx, dec, hidden, keep, cur_visual, keep_vis, frozen)
        # compact the kept columns to the right (left padding), as the adapter does for the prefill
        counts = keep.sum(-1)
        width = int(counts.max())
        pos = torch.arange(seq, device=keep.device).expand(b, seq)
        sorted_cols = torch.where(keep, pos, pos + seq).sort(dim=-1).values
        slot = torch.arange(width, device=keep.device).expand(b, width)
        pad = (width - counts).unsqueeze(-1)
        new_valid = slot >= pad
        local = sorted_cols.gather(1, (slot - pad).clamp(min=0)).masked_fill(~new_valid, 0)  # [B, W] columns now
        st["src"] = src.gather(1, local)
        st["valid_now"] = new_valid
        st["counts"].append((keep & cur_visual).sum(-1))
        full_mask = self._full_mask4(st, kwargs.get("attention_mask"), hidden)
        st["mask4"] = _gather_mask4(full_mask, st["src"], new_valid)
        self.stage_src[idx] = st["src"]
        self.stage_valid[idx] = new_valid
        return hidden.gather(1, local.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    def _recycle(self, idx, dec, hidden: Tensor, keep: Tensor, visual: Tensor, keep_vis: Tensor, frozen: Tensor):
        """Write the recycled tokens at their host columns (dropped visual columns, now kept); record the groups."""
        src = self._prefill["src"]
        host = dec.host.masked_fill(frozen.expand_as(dec.host), -1)  # [B, M]
        ok = host >= 0
        rows = torch.arange(host.shape[0], device=host.device).unsqueeze(-1).expand_as(host)
        h, r = host[ok], rows[ok]
        if bool((~visual[r, h]).any() or keep_vis[r, h].any()):
            raise RuntimeError(f"{self.reducer.name}: a recycled token must sit at a dropped visual column")
        hidden = hidden.clone()
        hidden[r, h] = dec.value[ok].to(hidden.dtype)
        keep[r, h] = True
        group = dec.group if dec.group is not None else torch.full_like(src, -1)
        groups: list[list[tuple[int, Tensor]]] = []
        for bi in range(host.shape[0]):
            members = [src[bi, (group[bi] == m).nonzero().squeeze(-1)] for m in range(host.shape[1])]
            groups.append([(int(src[bi, c]), members[m]) for m, c in enumerate(host[bi].tolist()) if c >= 0])
        self.recycled[idx] = groups
        return hidden

    @staticmethod
    def _cur_valid(st: dict[str, Any]) -> Tensor:
        if "valid_now" in st:
            return st["valid_now"] & st["valid"].gather(1, st["src"])
        return st["valid"]

    def _full_mask4(self, st: dict[str, Any], mask: Any, hidden: Tensor) -> Tensor:
        """The layer-0 attention mask as `[B, 1, L, L]` bool (True = attend), built once per prefill."""
        if "mask_full" not in st:
            seq = st["visual"].shape[1]
            causal = torch.ones(seq, seq, dtype=torch.bool, device=hidden.device).tril()
            m = causal[None, None] & st["valid"][:, None, None, :]
            st["mask_full"] = m
        return st["mask_full"]

    def _sliced_kwargs(self, st: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        src = st["src"]
        mask4 = st["mask4"]
        ref = kwargs.get("attention_mask")
        if isinstance(ref, Tensor) and ref.dtype != torch.bool:
            kwargs["attention_mask"] = torch.zeros(mask4.shape, dtype=ref.dtype, device=ref.device).masked_fill(
                ~mask4, torch.finfo(ref.dtype).min
            )
        else:
            kwargs["attention_mask"] = mask4
        if kwargs.get("position_embeddings") is not None:
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (_gather_seq(cos, src), _gather_seq(sin, src))
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = _gather_seq(kwargs["position_ids"], src)
        return kwargs

    def _decode_kwargs(self, idx: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        stage = max(s for s, _ in self.plan if s <= idx)
        src, valid = self.stage_src[stage], self.stage_valid[stage]
        kwargs = dict(kwargs)
        mask = kwargs.get("attention_mask")
        if mask is None:
            return kwargs if bool(valid.all()) else self._decode_mask_from_valid(kwargs, valid)
        b, _, q, kv = mask.shape
        prefill_len = self.stage_src_len0
        tail = torch.arange(prefill_len, kv, device=mask.device).expand(b, -1)
        cols = torch.cat([src, tail], dim=1)  # [B, L_s + new]
        m = mask.gather(3, cols[:, None, None, :].expand(b, mask.shape[1], q, -1))
        fill = False if m.dtype == torch.bool else torch.finfo(m.dtype).min
        pad = torch.cat([~valid, torch.zeros_like(tail, dtype=torch.bool)], 1)[:, None, None, :]
        kwargs["attention_mask"] = m.masked_fill(pad, fill)
        return kwargs

    def _decode_mask_from_valid(self, kwargs: dict[str, Any], valid: Tensor) -> dict[str, Any]:
        """No mask from the model (no padding at layer 0), but this stage's cache has padding: build one."""
        q = kwargs["hidden_states"].shape[1] if "hidden_states" in kwargs else 1
        cache_new = kwargs["past_key_values"].get_seq_length() - self.stage_src_len0  # layer 0 holds the new tokens
        b = valid.shape[0]
        cols = torch.cat([valid, valid.new_ones(b, cache_new)], 1)  # [B, L_s + new]
        causal = torch.ones(q, cache_new, dtype=torch.bool, device=valid.device).tril(cache_new - q)
        m = cols[:, None, None, :].expand(b, 1, q, cols.shape[1]).clone()
        m[..., valid.shape[1] :] &= causal
        kwargs["attention_mask"] = m
        return kwargs


def _gather_seq(x: Tensor, src: Tensor) -> Tensor:
    """Gather the sequence dim of `[B, L, ...]` (or `[1, L, ...]`, or `[3, B, L]`) at `src: [B, L']`."""
    if x.dim() == 3 and x.shape[0] == 3 and x.dtype == torch.long:  # M-RoPE ids [3, B, L]
        return x.gather(2, src.unsqueeze(0).expand(3, -1, -1))
    if x.shape[0] != src.shape[0]:
        x = x.expand(src.shape[0], *x.shape[1:])
    if x.dim() == 2:
        return x.gather(1, src)
    return x.gather(1, src.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _gather_mask4(mask: Tensor, src: Tensor, valid: Tensor) -> Tensor:
    """Rows and columns `src` of a `[B, 1, L, L]` bool mask; padded columns masked, padded rows see themselves."""
    b, w = src.shape
    rows = mask.gather(2, src[:, None, :, None].expand(b, 1, w, mask.shape[3]))
    m = rows.gather(3, src[:, None, None, :].expand(b, 1, w, w))
    m = m & valid[:, None, None, :] & valid[:, None, :, None]
    eye = torch.eye(w, dtype=torch.bool, device=m.device)[None, None]
    return m | (eye & ~valid[:, None, :, None])
