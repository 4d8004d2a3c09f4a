"""The reducer base class, its config base, and the public factory (`create_reducer`, `list_reducers`).

A reducer is an `nn.Module` whose `forward(tokens, budget, query=None)` returns a `Selection`. The base class
does everything that is the same for every method — input checks with errors that name the reducer and the bad
value, the budget rule (`vtc.budget`), the query contract, the identity at full budget — and calls the method's
`_reduce(vt, k, query)` with a validated `VisualTokens`, the resolved count `k < N` and a `Query` or None.

When `VisualTokens.valid` marks tokens that do not exist in the model's sequence (and not every token is valid),
the base class resolves the budget per sample against the valid count (`vtc.budget.resolve_budgets`) and calls
`_reduce_valid(vt, ks, query)` instead, `ks` `[B]` int64 with 1 <= ks[b] <= valid count of sample b (not all
equal to it: keeping every valid token is the base class's identity on the valid tokens). Every method must then
keep (or merge) only valid tokens, ks[b] of them (at most, for adaptive methods; a sample whose ks[b] is its valid
count keeps all of them, as at full budget), padding the shorter rows of the `Selection` (`mask` False at the end).
A method that does not implement `_reduce_valid` raises a clear error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..budget import resolve_budget, resolve_budgets
from ..ops.select import keep_mask_to_indices, pruned_selection
from ..registry import Registry
from ..types import Query, Selection, VisualTokens

REDUCERS = Registry("reducer", "vtc.list_reducers()")


@dataclass
class ReducerConfig:
    """Base of every reducer's config dataclass (each field documents itself with a comment)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Reducer(nn.Module):
    """Base class: subclasses set the class attributes below and implement `_reduce`.

    Class attributes:
        name: registry name (set by `register_reducer`).
        config_cls: the config dataclass.
        needs_query: the method scores tokens against the question and raises without one.
        requires: `VisualTokens` fields the method cannot run without (e.g. `("cls_attn",)`).
        uses: optional `VisualTokens` fields the method uses when present (e.g. ToMe's `("keys",)`). Adapters skip
            computing side information that neither `requires` nor `uses` names (Qwen2-VL's attention substitute).
        merges: outputs are merged tokens (`indices` is None, `weights`/`assignment` are set).
        adaptive: the method decides per sample how many tokens to keep, at most the budget.
        conserves_mass: (mergers) every output is the weight-averaged mean of its sources, so
            sum_k weights_k * tokens_k equals the sum of the assigned inputs.
        stochastic: outputs depend on the random state (same seed → same output, but no batch independence).
        stage: "pre_llm" for reducers that act on visual tokens before the LLM.
        in_llm_stage: registry name of the method's own second stage inside the LLM (ToDRE, ATP), run after
            this reducer by `vtc.compress(model, name, budget=..., in_llm=True)`; None if the paper has none.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[ReducerConfig]] = ReducerConfig
    needs_query: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ()
    uses: ClassVar[tuple[str, ...]] = ()
    merges: ClassVar[bool] = False
    adaptive: ClassVar[bool] = False
    conserves_mass: ClassVar[bool] = True
    stochastic: ClassVar[bool] = False
    stage: ClassVar[str] = "pre_llm"
    in_llm_stage: ClassVar[str | None] = None

    def __init__(self, config: ReducerConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else self.config_cls()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items())

    # ------------------------------------------------------------------ public entry point
    def forward(
        self, tokens: Tensor | VisualTokens, budget: int | float, query: Tensor | Query | None = None
    ) -> Selection:
        """Reduce `tokens` (`[B, N, D]` or `VisualTokens`) to `budget` tokens per sample.

        Args:
            tokens: visual tokens, or `VisualTokens` with the side information the method needs.
            budget: int tokens kept per sample, or float fraction in (0, 1] (see `vtc.budget`).
            query: question embeddings `[B, T, D]` (or `[T, D]` for B = 1), or a `Query` with a mask.
        """
        vt = self._check_tokens(tokens)
        q = self._check_query(query, vt)
        n = vt.tokens.shape[1]
        k = resolve_budget(budget, n, who=self.name)
        if vt.valid is not None:
            counts = vt.valid.sum(-1)  # [B]
            ks = resolve_budgets(budget, counts, n, who=self.name)
            if bool((ks == counts).all()):  # every valid token kept: the valid tokens themselves
                return self._valid_identity(vt)
            return self._reduce_valid(vt, ks, q)
        if k == n:  # full budget: the untouched input, bit for bit, for every method
            sel = identity_selection(vt.tokens)
            if self.merges:  # every input is its own group of size 1
                sel.weights = sel.mask.float()
                sel.assignment = sel.indices.clone()
            return sel
        return self._reduce(vt, k, q)

    def _reduce(self, vt: VisualTokens, k: int, query: Query | None) -> Selection:
        raise NotImplementedError

    def _reduce_valid(self, vt: VisualTokens, ks: Tensor, query: Query | None) -> Selection:
        """`_reduce` when `vt.valid` is set: sample b keeps `ks[b]` of its valid tokens, never an invalid one."""
        raise self._fail(
            "does not support VisualTokens.valid (tokens absent from the model's sequence); "
            "implement _reduce_valid or pass valid=None"
        )

    def _valid_identity(self, vt: VisualTokens) -> Selection:
        """Every valid token kept, in order; rows padded to the largest valid count."""
        idx, mask = keep_mask_to_indices(vt.valid)
        sel = pruned_selection(vt.tokens, idx, mask)
        if self.merges:  # every valid input is its own group of size 1, invalid inputs go nowhere
            sel.weights = mask.float()
            rank = vt.valid.long().cumsum(-1) - 1
            sel.assignment = rank.masked_fill(~vt.valid, -1)
        return sel

    # ------------------------------------------------------------------ validation
    def _fail(self, msg: str) -> ValueError:
        return ValueError(f"{self.name}: {msg}")

    def _check_tokens(self, tokens: Tensor | VisualTokens) -> VisualTokens:
        vt = tokens if isinstance(tokens, VisualTokens) else VisualTokens(tokens)
        x = vt.tokens
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.name}: tokens must be a torch.Tensor or vtc.VisualTokens, got {type(x).__name__}")
        if x.dim() != 3:
            raise self._fail(
                f"tokens must be [B, N, D], got shape {tuple(x.shape)} (rank {x.dim()}); "
                "add a batch dimension with tokens.unsqueeze(0)"
            )
        b, n, d = x.shape
        if b == 0 or n == 0 or d == 0:
            raise self._fail(f"tokens must have B, N, D > 0, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise self._fail(f"tokens must be floating point, got dtype {x.dtype}")
        # A float32 sum is finite only if every term is; only a non-finite sum (maybe an overflow) needs the scan.
        if not torch.isfinite(x.sum(dtype=torch.float32)) and not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise self._fail(f"tokens contain {bad} NaN/Inf values; check the encoder/projector outputs")
        for f in self.requires:
            if getattr(vt, f) is None:
                raise self._fail(
                    f"needs VisualTokens.{f}, which is None; pass vtc.VisualTokens(tokens, {f}=...) "
                    "or use an adapter that fills it"
                )
        for f in ("features", "keys"):
            v = getattr(vt, f)
            if v is not None and (v.dim() != 3 or v.shape[:2] != (b, n)):
                raise self._fail(f"VisualTokens.{f} must be [B={b}, N={n}, *], got {tuple(v.shape)}")
        if vt.cls_attn is not None:
            a = vt.cls_attn
            if a.dim() == 2:
                vt = dataclasses.replace(vt, cls_attn=a.unsqueeze(1))
            elif a.dim() != 3 or a.shape[0] != b or a.shape[2] != n:
                raise self._fail(f"VisualTokens.cls_attn must be [B={b}, heads, N={n}], got {tuple(a.shape)}")
        if vt.valid is not None:
            vt = self._check_valid(vt)
        per_view = n // vt.num_views()
        if per_view * vt.num_views() != n:
            raise self._fail(f"N={n} tokens do not split into {vt.num_views()} equal views/frames")
        if vt.grid is not None and vt.grid[0] * vt.grid[1] != per_view:
            raise self._fail(f"grid={vt.grid} has {vt.grid[0] * vt.grid[1]} cells but each view has {per_view} tokens")
        return vt

    def _check_valid(self, vt: VisualTokens) -> VisualTokens:
        """`valid` must be a `[B, N]` bool tensor with a valid token in every sample; all-True becomes None."""
        v, (b, n, _) = vt.valid, vt.tokens.shape
        if not isinstance(v, Tensor):
            raise TypeError(f"{self.name}: VisualTokens.valid must be a [B, N] bool tensor, got {type(v).__name__}")
        if v.dtype != torch.bool:
            raise self._fail(f"VisualTokens.valid must be a bool tensor, got dtype {v.dtype}; pass valid.bool()")
        if tuple(v.shape) != (b, n):
            raise self._fail(f"VisualTokens.valid must be [B={b}, N={n}], got {tuple(v.shape)}")
        v = v.to(vt.tokens.device)
        empty = (~v.any(-1)).nonzero().squeeze(-1).tolist()
        if empty:
            raise self._fail(f"VisualTokens.valid marks no token of sample(s) {empty} as valid; each needs one")
        return dataclasses.replace(vt, valid=None if bool(v.all()) else v)

    def _check_query(self, query: Tensor | Query | None, vt: VisualTokens) -> Query | None:
        if query is None:
            if self.needs_query:
                raise self._fail("is query-aware and needs query=<question embeddings [B, T, D]>; got None")
            return None
        q = query if isinstance(query, Query) else Query(query)
        if q.embeds.dim() == 2:
            q = Query(q.embeds.unsqueeze(0), None if q.mask is None else q.mask.reshape(1, -1))
        b, _, d = vt.tokens.shape
        if q.embeds.dim() != 3 or q.embeds.shape[0] != b or q.embeds.shape[2] != d:
            raise self._fail(
                f"query must be [B={b}, T, D={d}] in the tokens' embedding space, got {tuple(q.embeds.shape)}"
            )
        if q.mask is not None and q.mask.shape != q.embeds.shape[:2]:
            raise self._fail(f"query mask must be [B, T]={tuple(q.embeds.shape[:2])}, got {tuple(q.mask.shape)}")
        if q.embeds.shape[1] == 0 or not bool(q.valid_mask().any(-1).all()):
            raise self._fail("every sample needs at least one query token")
        if not torch.isfinite(q.embeds.sum(dtype=torch.float32)) and not torch.isfinite(q.embeds).all():
            raise self._fail("query embeddings contain NaN/Inf")
        return q

    def grid_of(self, vt: VisualTokens) -> tuple[int, int]:
        """`(h, w)` of one view: `vt.grid`, or a square inferred from N (error if N per view is not square)."""
        if vt.grid is not None:
            return vt.grid
        n = vt.tokens.shape[1] // vt.num_views()
        s = int(round(n**0.5))
        if s * s != n:
            raise self._fail(f"needs a 2-D grid; N={n} per view is not a square, pass VisualTokens(grid=(h, w))")
        return s, s


@dataclass
class StageDecision:
    """What an in-LLM reducer decides at one stage (all `[B, L]` over the current, already reduced, columns).

    Attributes:
        keep: `[B, L]` bool, the visual columns that stay (visual columns not in it are dropped; text always stays).
        host: `[B, M]` int64, a dropped visual column per recycled token (it is kept and holds that token from this
            layer on, at the column's position), -1 for padding. None: no recycling.
        value: `[B, M, D]` the recycled hidden states written at `host`.
        group: `[B, L]` int64, the recycled token (0..M-1) each dropped column was aggregated into, -1 if none.
    """

    keep: Tensor
    host: Tensor | None = None
    value: Tensor | None = None
    group: Tensor | None = None


class InLLMReducer(Reducer):
    """Base of the methods that drop visual tokens inside the LLM (FastV, PDrop, DART, SparseVLM, ...).

    They run through a model adapter (`vtc.compress(model, name, budget=...)`), which calls `plan` once per prefill
    and sample, and `select` at each stage with a `vtc.adapters.in_llm.LayerContext` (q/k of the layer before the
    stage, hidden states, which columns are visual). `budget` is the number of visual tokens kept after the last
    stage unless a method says otherwise (adaptive methods: at most); a full budget prunes nothing. The adapter
    reports the effective (layer-averaged) count.

    Class attributes:
        composed_budget: the in-LLM budget used when this stage runs after a pre-LLM reducer
            (`vtc.compress(model, pre, budget=..., in_llm=name)`) and no `in_llm_budget` is given.
    """

    stage = "in_llm"
    composed_budget: ClassVar[int | float] = 0.5

    def plan(self, n_visual: int, k: int, num_layers: int) -> list[tuple[int, int]]:
        """`[(layer, visual tokens kept from that layer on), ...]`, layers ascending, counts non-increasing.

        Adaptive methods return the most tokens a stage may keep. The layers must not depend on `n_visual`.
        """
        raise NotImplementedError

    def score(self, ctx: Any) -> Tensor:
        """`[B, L]` importance of every column at a stage (only visual columns are read; higher is kept)."""
        raise NotImplementedError

    def select(self, ctx: Any, n_keep: Tensor) -> StageDecision | Tensor:
        """The columns kept at a stage: by default the `n_keep[b]` (`[B]`) highest-scoring visual columns.

        Returns a `StageDecision` (or just its `keep` mask); at most `n_keep[b]` visual columns may be kept.
        """
        return top_visual(self.score(ctx).float(), ctx.visual, n_keep)

    def forward(self, tokens: Any, budget: int | float, query: Any = None) -> Selection:
        raise TypeError(
            f"{self.name} prunes inside the LLM and needs the model: use vtc.compress(model, {self.name!r}, "
            "budget=...) (pre-LLM reducers: vtc.list_reducers() with stage == 'pre_llm')"
        )

    def _check_layer(self, layer: int, num_layers: int) -> int:
        if not 1 <= layer < num_layers:
            raise self._fail(f"layer={layer} must be in [1, {num_layers - 1}] for a {num_layers}-layer LLM")
        return layer

    def _layers_at(
        self, layers: tuple[int, ...] | None, fractions: tuple[float, ...], num_layers: int, option: str = "layers"
    ) -> list[int]:
        """Explicit `layers`, or `fractions` of the LLM's depth (rounded); checked, strictly increasing.

        On a shallow LLM the rounded defaults can coincide: they are then spread to the nearest strictly increasing
        layers in [1, num_layers - 1] (each pushed up past its predecessor, then back below the top), and only when
        there are fewer usable layers than stages is it an error.
        """
        if layers is None:
            rounded = [max(1, min(num_layers - 1, round(num_layers * f))) for f in fractions]
            spread = list(rounded)
            for i in range(1, len(spread)):
                spread[i] = max(spread[i], spread[i - 1] + 1)
            for i in range(len(spread) - 1, -1, -1):
                spread[i] = min(spread[i], num_layers - 1 - (len(spread) - 1 - i))
            if spread and spread[0] < 1:
                raise self._fail(
                    f"its default layers collapse to {tuple(rounded)} on a {num_layers}-layer LLM; pass {option} "
                    f"({len(fractions)} strictly increasing layers in [1, {num_layers - 1}])"
                )
            layers = tuple(spread)
        out = [self._check_layer(int(x), num_layers) for x in layers]
        if out != sorted(set(out)):
            raise self._fail(f"layers={tuple(layers)} must be strictly increasing")
        return out


def top_visual(scores: Tensor, visual: Tensor, n_keep: Tensor) -> Tensor:
    """`[B, L]` bool: the `n_keep[b]` highest `scores` among the `visual` columns of each row (ties: lower column)."""
    s = scores.masked_fill(~visual, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = order.argsort(-1)  # rank of every column
    return visual & (rank < n_keep.unsqueeze(-1))


def identity_selection(x: Tensor) -> Selection:
    """Every token kept, in order."""
    b, n, _ = x.shape
    idx = torch.arange(n, device=x.device).expand(b, n).contiguous()
    return Selection(tokens=x, indices=idx, mask=torch.ones(b, n, dtype=torch.bool, device=x.device))


def register_reducer(name: str, config: type[ReducerConfig]):
    """Class decorator registering a `Reducer` subclass under `name` with its config dataclass."""

    def wrap(cls: type[Reducer]) -> type[Reducer]:
        cls.config_cls = config
        return REDUCERS.register(name)(cls)

    return wrap


def list_reducers(pattern: str | Iterable[str] = "*", exclude: str | Iterable[str] = ()) -> list[str]:
    """Sorted names of the registered reducers matching `pattern` (fnmatch wildcards), e.g. `"*prune*"`."""
    return REDUCERS.list(pattern, exclude)


def get_reducer_class(name: str) -> type[Reducer]:
    return REDUCERS.get(name)


def create_reducer(name: str, **config: Any) -> Reducer:
    """Build a reducer by name; `config` keys are the fields of its config dataclass.

    Example:
        >>> r = vtc.create_reducer("divprune")
        >>> sel = r(torch.randn(2, 576, 64), budget=64)
        >>> sel.tokens.shape
        torch.Size([2, 64, 64])
    """
    cls = REDUCERS.get(name)
    valid = [f.name for f in dataclasses.fields(cls.config_cls)]
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise TypeError(f"{name}: unknown config key(s) {unknown}; valid fields are {valid or 'none'}")
    return cls(cls.config_cls(**config))
