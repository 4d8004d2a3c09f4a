"""Reversible, per-instance patching of transformers VLMs so stock `generate()` runs on fewer visual tokens.

`compress(model, reducer, budget)` replaces `model.forward` *on that instance only* (an instance attribute, never the
class) with a wrapper; `restore(model)` deletes it again. The wrapper does three things:

* **Prefill** (a call with `pixel_values`): run the stock vision tower + projector through the model's own
  `get_image_features` while forward hooks capture what reducers need (projector input, q/k of one vision layer,
  from which the CLS-attention logits are computed beside SDPA), reduce every image, then rebuild the sequence: the
  image placeholder run of each image shrinks to the kept tokens, sequences are re-left-padded, and the kept tokens
  keep their original positions (`positions="original"`, default) or are renumbered (`positions="renumber"`).
  A merged token sits where its first source token sat.
* **Decode** (a call that continues the cache this wrapper filled): `generate()` keeps its `input_ids`,
  `attention_mask` and `position_ids` in the coordinates of the unreduced prompt; the wrapper maps the mask onto
  the shorter cache. Decoding positions continue from the unreduced length (or the renumbered one).
* Anything else passes through untouched.

Model families subclass `VLMAdapter` (one file each) and implement `encode`, the image placeholder layout and, for
M-RoPE models, the positions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vtc.reducers import Reducer, create_reducer
from vtc.types import Query, Selection, VisualTokens

_ADAPTERS: dict[str, type[VLMAdapter]] = {}
_STATE_ATTR = "_vtc_adapter"


def register_adapter(*class_names: str):
    """Class decorator: the adapter handles models whose class (or a base class) has one of these names."""

    def wrap(cls: type[VLMAdapter]) -> type[VLMAdapter]:
        for n in class_names:
            _ADAPTERS[n] = cls
        return cls

    return wrap


def supported_models() -> list[str]:
    return sorted(_ADAPTERS)


@dataclass
class AdapterConfig:
    positions: str = "original"  # "original": kept tokens keep their positions; "renumber": contiguous positions
    vision_layer: int | None = None  # hidden-state index whose layer gives CLS attention/keys; None: the feature layer
    query_text: str = "after_image"  # question tokens for query-aware reducers: "after_image" or "all_text"
    # An in-LLM stage run after a pre-LLM reducer: True (the method's own, `Reducer.in_llm_stage`), a registry name
    # or an in-LLM reducer instance; None: none. `in_llm_budget` is its budget over the visual tokens that enter
    # the LLM (None: the stage's `composed_budget`).
    in_llm: Any = None
    in_llm_budget: int | float | None = None

    def __post_init__(self) -> None:
        if self.positions not in ("original", "renumber"):
            raise ValueError(f"positions={self.positions!r}; use 'original' or 'renumber'")
        if self.query_text not in ("after_image", "all_text"):
            raise ValueError(f"query_text={self.query_text!r}; use 'after_image' or 'all_text'")


@dataclass
class ImageSlot:
    """Where one image's placeholder tokens sit: sample `b`, sequence columns `cols` (ascending) of its run."""

    b: int
    cols: Tensor  # [N_i]


@dataclass
class _DecodeState:
    cache: Any  # weakref to the cache filled at prefill
    prompt_len: int  # L of the unreduced prompt
    prefill_mask: Tensor  # [B, L'] mask of the reduced prompt (left padding = 0)
    next_pos: Tensor  # [B] (or [3, B] for M-RoPE) next position id in the configured coordinates
    pos_shift: Tensor  # [B] unreduced position - used position (0 for positions="original")


class VLMAdapter:
    """Base of the per-family adapters. See the module docstring for the flow."""

    image_token_attr = "image_token_id"
    pixel_keys: tuple[str, ...] = ("pixel_values",)  # inputs that make a call the prefill (families add videos)

    def __init__(self, model: nn.Module, reducer: Reducer, budget: int | float, config: AdapterConfig) -> None:
        self.model = model
        self.reducer = reducer
        self.budget = budget
        self.config = config
        # side information worth computing for this reducer (`Reducer.requires` + `Reducer.uses`)
        self.wants = set(reducer.requires) | set(reducer.uses)
        self.last: dict[str, Any] = {}  # what the last prefill did: selections, kept counts, column map, layouts
        self._decode: _DecodeState | None = None
        self._had_instance_forward = "forward" in model.__dict__
        self._orig_forward = model.forward
        self._sig = inspect.signature(type(model).forward)
        self.in_llm = None
        if reducer.stage == "in_llm" or config.in_llm is not None:
            from .in_llm import InLLMPruner

            if reducer.stage == "in_llm":
                self.in_llm = InLLMPruner(model, reducer, budget)
            else:  # composed: the pre-LLM reducer, then this in-LLM stage (see `compress`)
                stage_budget = config.in_llm_budget
                if stage_budget is None:
                    stage_budget = config.in_llm.composed_budget
                self.in_llm = InLLMPruner(model, config.in_llm, stage_budget)

    # ------------------------------------------------------------------ family hooks
    def encode(self, pixel_values: Tensor, extra: dict[str, Any]) -> list[VisualTokens]:
        """Visual tokens of every image, in placeholder order, grouped into equally shaped batches."""
        raise NotImplementedError

    def image_slots(self, input_ids: Tensor, counts: list[int]) -> list[ImageSlot]:
        """Placeholder columns of every image, in order (image i has `counts[i]` placeholders)."""
        img = input_ids == self.image_token_id  # [B, L]
        slots, i = [], 0
        for b in range(input_ids.shape[0]):
            cols = img[b].nonzero().squeeze(-1)
            start = 0
            while start < cols.numel():
                if i >= len(counts):
                    raise ValueError("more image placeholder tokens in input_ids than images in pixel_values")
                n = counts[i]
                run = cols[start : start + n]
                if run.numel() != n or (n > 1 and int(run[-1] - run[0]) != n - 1):
                    raise ValueError(f"image {i}: expected a run of {n} consecutive placeholder tokens in sample {b}")
                slots.append(ImageSlot(b, run))
                start, i = start + n, i + 1
        if i != len(counts):
            raise ValueError(f"{len(counts)} images but placeholders for {i}")
        return slots

    def full_positions(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None, extra):
        """Position ids of the unreduced sequence `[B, L]` (the same rule as `generate()`)."""
        if position_ids is not None:
            return position_ids
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def place(self, image: int, sel: Selection, j: int) -> tuple[Tensor, Tensor, int]:
        """Where image `image` (row `j` of its group's selection) goes in its placeholder run.

        Returns the run columns to keep (any order), the embeddings to put there and how many of them are visual
        tokens (families may add separators, e.g. LLaVA-NeXT's row newlines). Default: the run is the reducer's
        layout; a merged token sits where its first source token sat.
        """
        cols, toks = _placed_tokens(sel, j)
        return cols, toks, int(cols.numel())

    def layout_index(self, image: int, run_cols: Tensor) -> Tensor:
        """Index in the reducer's layout (`VisualTokens` order) of the visual tokens placed at columns `run_cols` of
        image `image`'s placeholder run (in-LLM methods use it for spatial positions). Default: the run is the
        layout (a merged token: its first source)."""
        return run_cols

    def set_rope_state(self, positions: Tensor, keep_src: Tensor, new_mask: Tensor) -> None:
        """Hook for M-RoPE families (rope_deltas)."""

    def placeholder_mask(self, input_ids: Tensor) -> Tensor:
        """`[B, L]` bool: the visual placeholder tokens (image placeholders; families add e.g. video ones)."""
        return input_ids == self.image_token_id

    @property
    def image_token_id(self) -> int:
        return int(getattr(self.model.config, self.image_token_attr))

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> None:
        @functools.wraps(type(self.model).forward)
        def forward(*args, **kwargs):
            return self._forward(*args, **kwargs)

        # Hide `mm_encoder_outputs` (transformers >= 5) so that generate() passes raw pixels to the prefill, where
        # the adapter runs the vision tower itself with its capture hooks.
        params = [p for n, p in self._sig.parameters.items() if n not in ("self", "mm_encoder_outputs")]
        forward.__signature__ = self._sig.replace(parameters=params)
        self.model.forward = forward
        if self.in_llm is not None:
            self.in_llm.attach()
        setattr(self.model, _STATE_ATTR, self)

    def detach(self) -> None:
        if self.in_llm is not None:
            self.in_llm.detach()
        if self._had_instance_forward:
            self.model.forward = self._orig_forward
        else:
            del self.model.forward
        delattr(self.model, _STATE_ATTR)

    # ------------------------------------------------------------------ the wrapper
    def _forward(self, *args, **kwargs):
        bound = self._sig.bind_partial(self.model, *args, **kwargs)
        kw = {k: v for k, v in bound.arguments.items() if k != "self"}
        if "kwargs" in kw:  # the **kwargs of the signature
            kw.update(kw.pop("kwargs"))
        if kw.get("mm_encoder_outputs"):
            raise ValueError(
                "vtc: a compressed model encodes images itself; pass pixel_values, not mm_encoder_outputs"
            )
        kw.pop("mm_encoder_outputs", None)
        if any(kw.get(k) is not None for k in self.pixel_keys):
            return self._prefill(kw)
        st = self._decode
        cache = kw.get("past_key_values")
        if st is not None and cache is not None and st.cache() is cache:
            return self._continue(kw, st)
        return self._orig_forward(**kw)

    def _prefill(self, kw: dict[str, Any]) -> Any:
        input_ids = kw.pop("input_ids", None)
        if input_ids is None or kw.get("inputs_embeds") is not None:
            raise ValueError("vtc: a compressed model needs input_ids (not inputs_embeds) together with pixel_values")
        pixel_values = kw.pop("pixel_values", None)
        b, seq = input_ids.shape
        attention_mask = kw.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {k: kw.pop(k) for k in self.extra_image_keys if k in kw}
        embed = self.model.get_input_embeddings()
        embeds = embed(input_ids)  # [B, L, D]
        groups = self.encode(pixel_values, extra)
        counts = [g.tokens.shape[1] for g in groups for _ in range(g.tokens.shape[0])]
        slots = self.image_slots(input_ids, counts)
        query = self._queries(input_ids, attention_mask, embeds, slots)
        keep = torch.ones(b, seq, dtype=torch.bool, device=input_ids.device)
        for s in slots:
            keep[s.b, s.cols] = False
        selections, kept, i = [], [], 0
        in_llm_only = self.reducer.stage == "in_llm"
        visual = torch.zeros(b, seq, dtype=torch.bool, device=input_ids.device)  # visual tokens placed (no separators)
        layout = torch.full((b, seq), -1, dtype=torch.long, device=input_ids.device)
        image = torch.full((b, seq), -1, dtype=torch.long, device=input_ids.device)
        grids: list[tuple[int, int, int]] = []
        for g in groups:
            m = g.tokens.shape[0]
            q = None
            if query is not None:
                q = Query(query.embeds[i : i + m], query.mask[i : i + m])
            sel = _keep_all(g.tokens) if in_llm_only else self.reducer(g, budget=self.budget, query=q)
            selections.append(sel)
            grids.extend([_grid_info(g)] * m)
            for j in range(m):
                cols, toks, n_visual = self.place(i + j, sel, j)
                s = slots[i + j]
                dst = s.cols[cols]
                keep[s.b, dst] = True
                embeds[s.b, dst] = toks.to(embeds.dtype)
                kept.append(n_visual)
                visual[s.b, dst[:n_visual]] = True
                image[s.b, dst[:n_visual]] = i + j
                layout[s.b, dst[:n_visual]] = self.layout_index(i + j, cols[:n_visual])
            i += m
        positions = self.full_positions(input_ids, attention_mask, kw.pop("position_ids", None), extra)
        src, valid = _compact(keep)  # [B, L'] source column of each new column, validity
        new_embeds = embeds.gather(1, src.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
        new_mask = attention_mask.gather(1, src) * valid
        new_pos = _gather_last(positions, src)
        if self.config.positions == "renumber":
            renum = (new_mask.long().cumsum(-1) - 1).clamp(min=0)
            new_pos = renum.expand_as(new_pos) if new_pos.dim() == 3 else renum
        new_pos = new_pos * valid if new_pos.dim() == 2 else new_pos * valid.unsqueeze(0)
        self.set_rope_state(positions, src, new_mask)
        if self.in_llm is not None:
            self.in_llm.begin_prefill(
                visual.gather(1, src) & valid,
                new_mask.bool(),
                layout=layout.gather(1, src),
                image=image.gather(1, src),
                grids=grids,
            )
        try:
            out = self._orig_forward(
                input_ids=None, inputs_embeds=new_embeds, attention_mask=new_mask, position_ids=new_pos, **kw
            )
        finally:
            if self.in_llm is not None:
                self.in_llm.end_prefill()
        last_orig = positions[..., -1]  # [B] or [3, B]
        last_new = new_pos[..., -1]
        self.last = {
            "selections": selections,
            "kept": kept,
            "source_columns": src.masked_fill(~valid, -1),
            "num_visual_in": sum(counts),
            "num_visual_kept": sum(kept),
            "effective_visual_tokens": sum(kept) / max(len(kept), 1),
            # per image, in placeholder order (for vtc.eval.viz): (grid, views, frames) and its placeholder run
            "layouts": [(g.grid, g.views, g.frames) for g in groups for _ in range(g.tokens.shape[0])],
            "slots": slots,
        }
        if self.in_llm is not None:  # layer-averaged visual tokens per image: Σ_samples Σ_layers count / (L · images)
            per_layer = self.in_llm.per_layer
            self.last["visual_tokens_per_layer"] = per_layer
            self.last["effective_visual_tokens"] = float(per_layer.sum()) / (per_layer.shape[1] * max(len(kept), 1))
        cache = getattr(out, "past_key_values", None)
        self._decode = None
        if cache is not None:
            self._decode = _DecodeState(
                cache=weakref.ref(cache),
                prompt_len=seq,
                prefill_mask=new_mask,
                next_pos=last_new + 1,
                pos_shift=(last_orig - last_new),
            )
        return out

    def _continue(self, kw: dict[str, Any], st: _DecodeState) -> Any:
        ids = kw.get("input_ids")
        t = (ids if ids is not None else kw["inputs_embeds"]).shape[1]
        cache_len = st.cache().get_seq_length()
        new_cols = cache_len - st.prefill_mask.shape[1] + t  # tokens after the prompt, including these
        am = kw.get("attention_mask")
        if am is not None:
            if am.dim() != 2 or am.shape[1] != st.prompt_len + new_cols:
                raise ValueError(
                    f"vtc: attention_mask of shape {tuple(am.shape)} does not continue the compressed prompt "
                    f"(expected [B, {st.prompt_len + new_cols}] in unreduced coordinates)"
                )
            tail = am[:, st.prompt_len :]
        else:
            tail = st.prefill_mask.new_ones(st.prefill_mask.shape[0], new_cols)
        kw["attention_mask"] = torch.cat([st.prefill_mask, tail.to(st.prefill_mask.dtype)], dim=1)
        pos = kw.get("position_ids")
        step = torch.arange(t, device=st.next_pos.device)
        if pos is None:
            pos = st.next_pos.unsqueeze(-1) + step
        elif self.config.positions == "renumber":
            pos = pos - st.pos_shift.unsqueeze(-1)
        kw["position_ids"] = pos
        st.next_pos = pos[..., -1] + 1
        return self._orig_forward(**kw)

    def _queries(self, input_ids: Tensor, attention_mask: Tensor, embeds: Tensor, slots: list[ImageSlot]):
        if not self.reducer.needs_query:
            return None
        img = self.placeholder_mask(input_ids)
        rows = []
        for s in slots:
            text = (~img[s.b]) & attention_mask[s.b].bool()
            if self.config.query_text == "after_image":
                last_img = int(img[s.b].nonzero().max())
                after = torch.arange(input_ids.shape[1], device=input_ids.device) > last_img
                text = text & after if bool((text & after).any()) else text
            rows.append(embeds[s.b, text])
        t = max(r.shape[0] for r in rows)
        q = embeds.new_zeros(len(rows), t, embeds.shape[-1])
        m = torch.zeros(len(rows), t, dtype=torch.bool, device=embeds.device)
        for i, r in enumerate(rows):
            q[i, : r.shape[0]] = r
            m[i, : r.shape[0]] = True
        return Query(q, m)

    extra_image_keys: tuple[str, ...] = ()


def _grid_info(vt: VisualTokens) -> tuple[int, int, int]:
    """`(h, w, views)` of a group's layout: views (or frames) of h×w each; a 1×n row if it is not a grid."""
    views = vt.num_views()
    n = vt.tokens.shape[1] // views
    if vt.grid is not None:
        return (vt.grid[0], vt.grid[1], views)
    side = math.isqrt(n)
    return (side, side, views) if side * side == n else (1, n, views)


def _keep_all(x: Tensor) -> Selection:
    b, n, _ = x.shape
    idx = torch.arange(n, device=x.device).expand(b, n)
    return Selection(x, idx, torch.ones(b, n, dtype=torch.bool, device=x.device))


def _placed_tokens(sel: Selection, j: int) -> tuple[Tensor, Tensor]:
    """Columns (within the image's run, ascending) and tokens of image j's kept outputs."""
    valid = sel.mask[j]
    toks = sel.tokens[j][valid]
    if sel.indices is not None:
        return sel.indices[j][valid], toks
    a = sel.assignment[j]  # [N] output row of each input, -1 dropped
    n, k = a.numel(), sel.tokens.shape[1]
    first = torch.full((k,), n, dtype=torch.long, device=a.device)
    src = torch.arange(n, device=a.device)
    first.scatter_reduce_(0, a.clamp(min=0), torch.where(a >= 0, src, n), reduce="amin")  # first source of each row
    first = first[valid]
    order = first.argsort()
    return first[order], toks[order]


def _compact(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Right-align the kept columns of each row: `[B, L']` source columns (0 where padded) and validity."""
    b, seq = keep.shape
    counts = keep.sum(-1)
    width = int(counts.max())
    pos = torch.arange(seq, device=keep.device).expand(b, seq)
    # Kept columns in order, then the dropped ones; take the first `count` and right-align them.
    order = torch.where(keep, pos, pos + seq).sort(dim=-1).values
    slot = torch.arange(width, device=keep.device).expand(b, width)
    pad = (width - counts).unsqueeze(-1)  # [B, 1]
    valid = slot >= pad
    src = order.gather(1, (slot - pad).clamp(min=0)).masked_fill(~valid, 0)
    return src, valid


def _gather_last(x: Tensor, src: Tensor) -> Tensor:
    """Gather the last dim of `[B, L]` or `[3, B, L]` position ids at `src: [B, L']`."""
    if x.dim() == 2:
        return x.gather(1, src)
    return x.gather(2, src.unsqueeze(0).expand(x.shape[0], -1, -1))


# ---------------------------------------------------------------------- public API
def _adapter_for(model: nn.Module) -> type[VLMAdapter]:
    import vtc.adapters  # noqa: F401  (registers the families)

    for cls in type(model).__mro__:
        if cls.__name__ in _ADAPTERS:
            return _ADAPTERS[cls.__name__]
    raise TypeError(
        f"vtc.compress: {type(model).__name__} is not supported; "
        f"supported model classes: {', '.join(supported_models())}"
    )


def compress(model: nn.Module, reducer: str | Reducer, budget: int | float = 0.25, **config: Any) -> nn.Module:
    """Patch this one model instance so that its visual tokens are reduced; returns the same model.

    Args:
        model: a supported transformers VLM (see `vtc.adapters.supported_models()`).
        reducer: a registry name (`vtc.list_reducers()`) or a reducer instance.
        budget: tokens kept per image (int) or a fraction (float), as everywhere in vtc.
        **config: adapter options (`AdapterConfig` fields: positions, vision_layer, query_text, in_llm,
            in_llm_budget); with a reducer name, the remaining keys configure the reducer.

    Composition: `vtc.compress(model, "todre", budget=64, in_llm=True)` runs ToDRE's k-center stage before the LLM
    and its own in-LLM stage inside it; `in_llm="fastv"` (or an in-LLM reducer instance) composes any in-LLM method
    after any pre-LLM one, `in_llm_budget` being its budget over the visual tokens that reach the LLM.
    `adapter_of(model).last["effective_visual_tokens"]` is then the layer-averaged count per image.
    """
    if getattr(model, _STATE_ATTR, None) is not None:
        raise RuntimeError("vtc.compress: this model is already compressed; call vtc.restore(model) first")
    adapter_cls = _adapter_for(model)
    names = {f.name for f in dataclasses.fields(AdapterConfig)}
    acfg = AdapterConfig(**{k: v for k, v in config.items() if k in names})
    rest = {k: v for k, v in config.items() if k not in names}
    if isinstance(reducer, str):
        reducer = create_reducer(reducer, **rest)
    elif rest:
        raise TypeError(f"vtc.compress: unknown option(s) {sorted(rest)} for an already built reducer")
    if not isinstance(reducer, Reducer):
        raise TypeError(f"vtc.compress: reducer must be a name or a vtc.Reducer, got {type(reducer).__name__}")
    acfg.in_llm = _in_llm_stage(reducer, acfg.in_llm)
    p = next(iter(model.parameters()), None)
    if p is not None:
        reducer.to(p.device)
        if acfg.in_llm is not None:
            acfg.in_llm.to(p.device).eval()
    adapter_cls(model, reducer.eval(), budget, acfg).attach()
    return model


def _in_llm_stage(reducer: Reducer, in_llm: Any) -> Reducer | None:
    """The in-LLM reducer composed after a pre-LLM `reducer` (see `AdapterConfig.in_llm`), or None."""
    if in_llm is None or in_llm is False:
        return None
    if reducer.stage == "in_llm":
        raise ValueError(
            f"vtc.compress: {reducer.name} already prunes inside the LLM; in_llm= composes an in-LLM stage after a "
            "pre-LLM reducer"
        )
    if in_llm is True:
        if reducer.in_llm_stage is None:
            raise ValueError(
                f"vtc.compress: {reducer.name} has no in-LLM stage of its own; pass in_llm=<name of an in-LLM "
                "reducer>, e.g. in_llm='fastv'"
            )
        in_llm = reducer.in_llm_stage
    if isinstance(in_llm, str):
        in_llm = create_reducer(in_llm)
    if not isinstance(in_llm, Reducer) or in_llm.stage != "in_llm":
        raise ValueError(f"vtc.compress: in_llm={in_llm!r} is not an in-LLM reducer (stage == 'in_llm')")
    return in_llm


def restore(model: nn.Module) -> nn.Module:
    """Undo `compress`: the model behaves exactly as before it was patched."""
    adapter = getattr(model, _STATE_ATTR, None)
    if adapter is None:
        raise RuntimeError("vtc.restore: this model is not compressed")
    adapter.detach()
    return model


@contextlib.contextmanager
def compressed(model: nn.Module, reducer: str | Reducer, budget: int | float = 0.25, **config: Any) -> Iterator:
    """`with vtc.compressed(model, "fastv", budget=0.25): model.generate(...)` — restored on exit, even on error."""
    compress(model, reducer, budget, **config)
    try:
        yield model
    finally:
        restore(model)


def adapter_of(model: nn.Module) -> VLMAdapter:
    """The adapter patched onto `model` (its `.last` describes the last prefill)."""
    adapter = getattr(model, _STATE_ATTR, None)
    if adapter is None:
        raise RuntimeError("this model is not compressed")
    return adapter
