"""Pruning visual tokens inside the LLM at prefill (FastV, PDrop, DART, ...), with the KV cache kept consistent.

An in-LLM reducer gives a *plan* — the decoder layers at which visual tokens are dropped and how many survive each
stage — and a *score* for the visual tokens still alive at a stage. At prefill, the decoder layer of each stage
is entered with the kept columns only: the layer's wrapper gathers the hidden states, rotary embeddings, position
ids and attention mask, so that layer and every later one compute and cache fewer tokens. The score uses the
queries and keys of the layer before the stage, captured with forward hooks on its `q_proj` / `k_proj` and rotated
with the model's own RoPE function beside the fused attention (never switching to eager attention).

At decode, layers at or after a stage hold shorter caches than the layers before it: their wrappers gather the
columns of the attention mask that the model built for the unpruned cache. Kept tokens keep their positions.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class LayerContext:
    """What a stage's score function may use (all for the current, already reduced, sequence).

    Attributes:
        q: `[B, H, L, dh]` rotated queries of the layer before the stage (float32).
        k: `[B, H, L, dh]` rotated keys of that layer, GQA heads repeated (float32).
        hidden: `[B, L, D]` hidden states entering the stage's layer.
        visual: `[B, L]` bool, visual tokens still alive.
        valid: `[B, L]` bool, real (non-padding) columns.
        last: `[B]` column of the last prompt token (the query row FastV and PDrop use).
    """

    q: Tensor
    k: Tensor
    hidden: Tensor
    visual: Tensor
    valid: Tensor
    last: Tensor

    def last_token_attention(self) -> Tensor:
        """`[B, L]` head-mean softmax attention of the last prompt token over the valid columns."""
        b = torch.arange(self.q.shape[0], device=self.q.device)
        q = self.q[b, :, self.last]  # [B, H, dh]
        logits = torch.einsum("bhd,bhld->bhl", q, self.k) / self.q.shape[-1] ** 0.5
        logits = logits.masked_fill(~self.valid.unsqueeze(1), float("-inf"))
        return logits.softmax(-1).mean(1)


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
    """Installed by the model adapter when its reducer has `stage == "in_llm"`."""

    def __init__(self, model: nn.Module, reducer: Any, budget: int | float) -> None:
        self.model = model
        self.reducer = reducer
        self.budget = budget
        self.layers = _decoder_layers(model)
        self.plan: list[tuple[int, int]] = []
        self.stage_src: dict[int, Tensor] = {}  # layer → [B, L_s] column (in layer-0 coordinates) of each kept column
        self.stage_valid: dict[int, Tensor] = {}
        self._prefill: dict[str, Any] | None = None
        self._orig: dict[int, Any] = {}
        self._cap = _Capture()
        self.effective = None
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

    def begin_prefill(self, visual: Tensor, valid: Tensor, n_visual: int) -> None:
        """Called by the adapter before the LLM runs on a prefill: `visual`, `valid` are `[B, L]` bool."""
        from vtc.budget import resolve_budget

        k = resolve_budget(self.budget, n_visual, who=self.reducer.name)
        self.plan = self.reducer.plan(n_visual, k, len(self.layers))
        b, seq = visual.shape
        src = torch.arange(seq, device=visual.device).expand(b, seq)
        self._prefill = {
            "visual": visual,
            "valid": valid,
            "src": src,
            "n_visual": n_visual,
            "mask4": None,
            "kept": [n_visual],
        }
        self.stage_src, self.stage_valid = {}, {}
        self.stage_src_len0 = seq
        self._cap.remove()
        for layer_idx, _ in self.plan:
            if layer_idx >= 1:
                self._hook_scores(layer_idx - 1)

    def end_prefill(self) -> None:
        self._cap.remove()
        if self._prefill is not None:
            kept = self._prefill["kept"]
            n_layers = len(self.layers)
            bounds = [0] + [s for s, _ in self.plan] + [n_layers]
            per_layer = sum(kept[i] * (bounds[i + 1] - bounds[i]) for i in range(len(kept)))
            self.effective = per_layer / n_layers
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

    def _rotated_qk(self, idx: int) -> tuple[Tensor, Tensor]:
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
        return q.float(), k.float()

    # ---------------------------------------------------------------- the layer wrappers
    def _make_forward(self, idx: int, layer: nn.Module):
        orig = layer.forward

        def forward(hidden_states, *args, **kwargs):
            st = self._prefill
            stage = next((n for s, n in self.plan if s == idx), None)
            if st is not None and stage is not None:
                hidden_states = self._prune(idx, stage, hidden_states, kwargs)
            if st is not None and st["mask4"] is not None and idx >= self.plan[0][0]:
                kwargs = self._sliced_kwargs(st, kwargs)
            elif st is None and self.stage_src and self.plan and idx >= self.plan[0][0]:
                kwargs = self._decode_kwargs(idx, kwargs)
            return orig(hidden_states, *args, **kwargs)

        return forward

    def _prune(self, idx: int, n_keep: int, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
        st = self._prefill
        src = st["src"]
        cur_valid = self._cur_valid(st)
        cur_visual = st["visual"].gather(1, src) & cur_valid
        q, k = self._rotated_qk(idx - 1) if idx >= 1 else (None, None)
        last = torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device)
        ctx = LayerContext(q=q, k=k, hidden=hidden, visual=cur_visual, valid=cur_valid, last=last)
        with torch.no_grad():
            scores = self.reducer.score(ctx).float()  # [B, L]
        scores = scores.masked_fill(~cur_visual, float("-inf"))
        b, seq = cur_visual.shape
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :n_keep]
        keep = ~cur_visual & cur_valid
        keep.scatter_(1, order, True)
        keep &= cur_valid
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
        st["kept"].append(n_keep)
        full_mask = self._full_mask4(st, kwargs.get("attention_mask"), hidden)
        st["mask4"] = _gather_mask4(full_mask, st["src"], new_valid)
        self.stage_src[idx] = st["src"]
        self.stage_valid[idx] = new_valid
        return hidden.gather(1, local.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

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
