"""Vision encoder → `VisualTokens`: the library-independent part of the timm / open_clip adapters.

A backend (`timm_vit.TimmViT`, `open_clip_vit.OpenClipViT`) knows one library's block structure: how to run the
encoder up to a layer with the library's own `forward_intermediates`, and where q and k of a block's attention can
be read. Everything else is here:

* `encode(encoder, images)` → `VisualTokens`: patch features of one layer (prefix tokens excluded), the attention
  logits of one query row over the patches and the patch keys of one layer, the grid of one image.
* `encode_and_reduce(encoder, images, reducer, budget)` → `Selection`: the one call between encoder and LLM.
* `capture_attention(encoder, layer)`: the q/k capture as a context manager around any forward of the encoder.
* `image_transform(encoder)`: the preprocessing the encoder expects (timm's data config / open_clip's preprocess cfg).

Pinned choices:

* **Attention scores are computed beside the fused attention**, never by switching the model to eager attention:
  hooks read q and k where the block computes them (after q/k norms and rotary embeddings, i.e. exactly what the
  model's attention multiplies) and this module computes `q_row · k / sqrt(dh)` per head in float32 for the one
  query row it needs. Additive attention masks (none in a plain forward) are not included. Hooks live only for the
  duration of a call; the encoder's outputs are bit-identical with and without them.
* **The query row** (`attn_query`): `"cls"` is the CLS token (index 0 wherever the model has one); for models
  without a CLS token (SigLIP, register-only ViTs), `"auto"` substitutes `"mean_query"`: the mean of the patch
  queries of that layer, per head, as one query row — cheap (O(N)) and, like CLS attention, a global "what does the
  image attend to" score. `"mean_attn"` is the exact alternative: the log of the mean attention each token receives
  from the patch queries, log((1/N) Σ_i softmax_j(q_i·k_j/√dh)), whose softmax over the keys is that mean — O(N²),
  computed in row chunks. `"none"` leaves `cls_attn` empty.
* **Keys** are the patch keys of the same layer, heads concatenated (`[B, N, H*dh]`), after the model's k-norm and
  before rotary position embedding (EVA), so that key similarity compares content, not position.
* **Layers** count transformer blocks, 0-based, negative from the end; the default feature layer is -2 (the
  penultimate block's output, LLaVA's choice) and the attention layer defaults to the feature layer. Features are
  the block's raw output (`norm=True` applies the encoder's final norm).
* **Views / frames**: `views=(rows, cols)` or `frames=T` encode `B*(1+rows*cols)` or `B*T` images and concatenate
  each sample's images along N, thumbnail / first frame first; each view's attention logits come from its own CLS.
* q/k side computations run under `torch.no_grad()`: the scores select tokens, nothing is learned through them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vtc.ops.attention import attention_logits
from vtc.reducers import Reducer, create_reducer
from vtc.types import Query, Selection, VisualTokens

ATTN_QUERIES = ("auto", "cls", "mean_query", "mean_attn", "none")
QKCallback = Callable[[Tensor, Tensor, Tensor], None]  # (q, k, keys): [B, H, L, dh], [B, H, L, dh], [B, L, H*dh]


class EncoderBackend:
    """One supported encoder, as seen by this module. Subclasses fill the attributes and implement the methods.

    Attributes:
        library: "timm" or "open_clip".
        name: the encoder's class name, for error messages.
        model: the vision transformer whose blocks run (timm `VisionTransformer`/`Eva`, open_clip `VisionTransformer`).
        blocks: its transformer blocks, in order.
        num_prefix: prefix tokens (CLS, distillation, registers) in front of the patches.
        has_cls: the first prefix token is a CLS token.
        patch_module: the module that receives the images (its input shape gives the grid).
    """

    library: str = ""
    name: str = ""
    model: nn.Module
    blocks: list[nn.Module]
    num_prefix: int = 0
    has_cls: bool = False
    patch_module: nn.Module

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid `(h, w)` of an image of this size; raises a `ValueError` saying how to fix a bad size."""
        raise NotImplementedError

    def hidden_states(self, images: Tensor, layers: list[int], norm: bool) -> list[Tensor]:
        """Patch tokens `[B, N, D]` (prefix removed) after each block in `layers` (ascending, non-negative)."""
        raise NotImplementedError

    def hook_qk(self, layer: int, fn: QKCallback) -> list[Any]:
        """Install hooks that call `fn(q, k, keys)` whenever block `layer`'s attention runs; returns the handles.

        q and k are `[B, H, L, dh]` exactly as the attention multiplies them (all L tokens, prefix included);
        keys are `[B, L, H*dh]` before rotary embedding.
        """
        raise NotImplementedError

    def attn_mask_kwargs(self, layer: int, bias: Tensor) -> dict[str, Tensor]:
        """Keyword arguments for block `layer` that add `bias` (`[B, L]`, per key) to its attention logits."""
        raise NotImplementedError

    def reduction_support(self) -> str | None:
        """None if tokens may be removed between blocks, else the reason they may not."""
        return None

    def transform(self) -> Callable[[Any], Tensor]:
        """The evaluation image transform the encoder expects (PIL image → `[3, H, W]` tensor)."""
        raise NotImplementedError

    def num_heads(self, layer: int) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.library} {self.name}"


def resolve_encoder(encoder: nn.Module | EncoderBackend) -> EncoderBackend:
    """The backend for a timm or open_clip vision encoder; a `TypeError` listing what is supported otherwise."""
    if isinstance(encoder, EncoderBackend):
        return encoder
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be a torch.nn.Module (a timm or open_clip model), got {type(encoder).__name__}")
    modules = {c.__module__.split(".")[0] for c in type(encoder).__mro__}
    backend = None
    if "open_clip" in modules or isinstance(getattr(encoder, "visual", None), nn.Module):
        from . import open_clip_vit

        backend = open_clip_vit.backend_for(encoder)
    elif "timm" in modules:
        from . import timm_vit

        backend = timm_vit.backend_for(encoder)
    if backend is None:
        raise TypeError(
            f"unsupported vision encoder {type(encoder).__module__}.{type(encoder).__qualname__}; vtc's encoder "
            "adapters take a timm VisionTransformer (ViT, DeiT, SigLIP, registers) or Eva (EVA-02), an open_clip "
            "VisionTransformer, or an open_clip model (CLIP/CoCa, whose .visual is one of these or a TimmModel "
            "wrapping a timm ViT). Convolutional and hierarchical encoders (ResNet, ConvNeXt, Swin) have no "
            "patch-token attention to read."
        )
    return backend


def layer_index(layer: int, depth: int, what: str = "layer") -> int:
    """A 0-based block index from a possibly negative one, with an error naming the valid range."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"{what} must be an int block index, got {layer!r}")
    if not -depth <= layer < depth:
        raise ValueError(
            f"{what}={layer} is out of range for an encoder with {depth} blocks; use -{depth}..{depth - 1}"
        )
    return layer % depth


def resolve_attn_query(attn_query: str, backend: EncoderBackend) -> str:
    """The concrete query row for `attn_query` ("auto" → "cls" or "mean_query")."""
    if attn_query not in ATTN_QUERIES:
        raise ValueError(f"attn_query={attn_query!r} is not one of {ATTN_QUERIES}")
    if attn_query == "auto":
        return "cls" if backend.has_cls else "mean_query"
    if attn_query == "cls" and not backend.has_cls:
        raise ValueError(
            f"{backend.describe()} has no CLS token ({backend.num_prefix} prefix token(s), none of them a CLS), so "
            "there is no CLS attention; use attn_query='mean_query' (what 'auto' picks) or 'mean_attn'"
        )
    return attn_query


@torch.no_grad()
def query_logits(q: Tensor, k: Tensor, num_prefix: int, mode: str, chunk: int = 256) -> Tensor | None:
    """Pre-softmax logits `[B, H, L]` (float32) of one query row over all L keys (see the module docstring).

    Args:
        q, k: `[B, H, L, dh]` as the attention uses them.
        num_prefix: prefix tokens at the front of the sequence.
        mode: "cls", "mean_query", "mean_attn" or "none".
    """
    if mode == "none":
        return None
    scale = 1.0 / math.sqrt(q.shape[-1])
    if mode == "cls":
        return attention_logits(q[:, :, :1], k, scale)[:, :, 0]
    patches_q = q[:, :, num_prefix:].float()  # [B, H, N, dh]
    if mode == "mean_query":
        return attention_logits(patches_q.mean(2, keepdim=True), k, scale)[:, :, 0]
    # mean_attn: log of the mean softmax row over the patch queries, a row at a time in chunks
    acc = torch.zeros(k.shape[:3], dtype=torch.float32, device=k.device)  # [B, H, L]
    for s in range(0, patches_q.shape[2], chunk):
        acc += attention_logits(patches_q[:, :, s : s + chunk], k, scale).softmax(-1).sum(2)
    return (acc / patches_q.shape[2]).clamp_min(torch.finfo(torch.float32).tiny).log()


@dataclass
class AttentionRecord:
    """What `capture_attention` read in the last forward through the hooked block.

    Attributes:
        logits: `[B, H, L]` float32 logits of the chosen query row over all L tokens (None for attn_query="none").
        keys: `[B, L, H*dh]` keys of all L tokens.
        num_prefix: prefix tokens at the front of L.
        mode: the query row used ("cls", "mean_query", "mean_attn", "none").
    """

    logits: Tensor | None = None
    keys: Tensor | None = None
    num_prefix: int = 0
    mode: str = "cls"

    @property
    def patch_logits(self) -> Tensor | None:
        """`[B, H, N]` logits over the patches only (what `VisualTokens.cls_attn` holds)."""
        return None if self.logits is None else self.logits[:, :, self.num_prefix :]

    @property
    def patch_keys(self) -> Tensor | None:
        """`[B, N, H*dh]` keys of the patches only."""
        return None if self.keys is None else self.keys[:, self.num_prefix :]


def _recorder(record: AttentionRecord, num_prefix: int) -> QKCallback:
    def fn(q: Tensor, k: Tensor, keys: Tensor) -> None:
        with torch.no_grad():
            record.logits = query_logits(q, k, num_prefix, record.mode)
            record.keys = keys.detach()

    return fn


@contextlib.contextmanager
def capture_attention(
    encoder: nn.Module | EncoderBackend, layer: int = -2, attn_query: str = "auto"
) -> Iterator[AttentionRecord]:
    """Read the query-row attention logits and keys of block `layer` during any forward inside the `with` block.

    Example:
        >>> with capture_attention(vit, layer=-2) as rec:
        ...     out = vit(images)          # the encoder's own forward, outputs unchanged
        >>> rec.patch_logits.shape          # [B, heads, N]
    """
    backend = resolve_encoder(encoder)
    i = layer_index(layer, len(backend.blocks), "layer")
    record = AttentionRecord(num_prefix=backend.num_prefix, mode=resolve_attn_query(attn_query, backend))
    handles = backend.hook_qk(i, _recorder(record, backend.num_prefix))
    try:
        yield record
    finally:
        for h in handles:
            h.remove()


def as_image_batch(backend: EncoderBackend, images: Any) -> Tensor:
    """`[B, 3, H, W]` from a tensor (used as given: already preprocessed) or PIL images / HWC uint8 arrays (each
    put through the encoder's own transform)."""
    if isinstance(images, Tensor):
        x = images.unsqueeze(0) if images.dim() == 3 else images
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(
                f"images must be a float tensor [B, C, H, W] (or [C, H, W]), got {x.dtype} of shape {tuple(x.shape)}; "
                "pass PIL images to have the encoder's transform applied"
            )
        return x
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError("images is an empty list")
    if all(isinstance(im, Tensor) for im in items):  # preprocessed [C, H, W] tensors
        return as_image_batch(backend, torch.stack(items))
    tf = backend.transform()
    out = []
    for im in items:
        if not hasattr(im, "convert"):  # a numpy array (e.g. skimage.data): H×W or H×W×C uint8
            from PIL import Image

            im = Image.fromarray(im)
        out.append(tf(im.convert("RGB")))
    return torch.stack(out)


def image_transform(encoder: nn.Module) -> Callable[[Any], Tensor]:
    """The evaluation transform (PIL image → `[3, H, W]` tensor) the encoder expects: timm's resolved data config
    (with the model's own input size) or open_clip's preprocess cfg."""
    return resolve_encoder(encoder).transform()


def encode(
    encoder: nn.Module,
    images: Any,
    *,
    layer: int = -2,
    attn_layer: int | None = None,
    attn_query: str = "auto",
    norm: bool = False,
    projector: Callable[[Tensor], Tensor] | None = None,
    views: tuple[int, int] | None = None,
    frames: int | None = None,
) -> VisualTokens:
    """Run a timm / open_clip vision transformer and return what every reducer may need.

    Args:
        encoder: a timm VisionTransformer / Eva, an open_clip VisionTransformer, or an open_clip model (its .visual).
        images: `[B, 3, H, W]` preprocessed tensor, or PIL images / arrays (then the encoder's transform is applied).
        layer: block whose output gives the features (negative counts from the end; -2 is LLaVA's choice).
        attn_layer: block whose attention gives `cls_attn` and `keys` (default: `layer`).
        attn_query: "auto", "cls", "mean_query", "mean_attn" or "none" (module docstring).
        norm: apply the encoder's final norm to the features.
        projector: maps features `[B, N, Dv]` to the LLM's tokens `[B, N, D]`; None: tokens are the features.
        views: `(rows, cols)`: every sample is `1 + rows*cols` consecutive images (thumbnail, then crops).
        frames: every sample is `frames` consecutive images (a video).
    Returns:
        `VisualTokens` with tokens, features, cls_attn (`[B, H, N]` float32), keys, grid, views/frames.
    """
    backend = resolve_encoder(encoder)
    x = as_image_batch(backend, images)
    depth = len(backend.blocks)
    fi = layer_index(layer, depth, "layer")
    ai = fi if attn_layer is None else layer_index(attn_layer, depth, "attn_layer")
    per = _images_per_sample(x.shape[0], views, frames)
    grid = backend.grid(x.shape[-2], x.shape[-1])
    record = AttentionRecord(num_prefix=backend.num_prefix, mode=resolve_attn_query(attn_query, backend))
    handles = backend.hook_qk(ai, _recorder(record, backend.num_prefix))
    try:
        layers = sorted({fi, ai})
        feats = backend.hidden_states(x, layers, norm)[layers.index(fi)]  # [B*per, N, Dv]
    finally:
        for h in handles:
            h.remove()
    if record.keys is None:
        raise RuntimeError(f"{backend.describe()}: the attention of block {ai} did not run; nothing was captured")
    cls_attn, keys = record.patch_logits, record.patch_keys  # [B*per, H, N], [B*per, N, Dk]
    n = feats.shape[1]
    if keys.shape[1] != n:
        raise ValueError(
            f"{backend.describe()}: the attention of block {ai} saw {keys.shape[1]} patch tokens but block {fi}'s "
            f"features have {n}: tokens are reduced inside the encoder between the two; pick attn_layer and layer "
            "with no reducing block between them (a reducing block's own attention runs before it reduces)"
        )
    if per > 1:  # concatenate each sample's views / frames along N
        b = feats.shape[0] // per
        feats = feats.reshape(b, per * n, feats.shape[-1])
        keys = keys.reshape(b, per * n, keys.shape[-1])
        if cls_attn is not None:
            h = cls_attn.shape[1]
            cls_attn = cls_attn.reshape(b, per, h, n).transpose(1, 2).reshape(b, h, per * n)
    tokens = projector(feats) if projector is not None else feats
    return VisualTokens(
        tokens=tokens,
        features=feats,
        cls_attn=cls_attn,
        keys=keys,
        grid=grid if n == grid[0] * grid[1] else None,  # tokens reduced inside the encoder are no grid
        views=views,
        frames=frames,
    )


def _images_per_sample(num_images: int, views: tuple[int, int] | None, frames: int | None) -> int:
    if views is not None and frames is not None:
        raise ValueError("pass views=(rows, cols) or frames=T, not both")
    if views is not None:
        if len(views) != 2 or min(views) < 1:
            raise ValueError(f"views must be (rows, cols) with rows, cols >= 1, got {views!r}")
        per, what = 1 + views[0] * views[1], f"views={tuple(views)} (thumbnail + {views[0] * views[1]} crops)"
    elif frames is not None:
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        per, what = frames, f"frames={frames}"
    else:
        return 1
    if num_images % per:
        raise ValueError(f"{num_images} images do not split into samples of {per} images each for {what}")
    return per


def as_reducer(reducer: str | Reducer) -> Reducer:
    """A reducer instance from a name or an instance; in-LLM reducers are refused with a pointer to `vtc.compress`."""
    r = create_reducer(reducer) if isinstance(reducer, str) else reducer
    if not isinstance(r, Reducer):
        raise TypeError(f"reducer must be a registered name or a vtc.Reducer, got {type(reducer).__name__}")
    if getattr(r, "stage", "pre_llm") != "pre_llm":
        raise ValueError(
            f"{r.name}: this reducer acts inside the LLM (stage={r.stage!r}) and cannot run on encoder outputs; "
            "use vtc.compress(model, ...) with a model adapter"
        )
    return r


def encode_and_reduce(
    encoder: nn.Module,
    images: Any,
    reducer: str | Reducer,
    budget: int | float,
    query: Tensor | Query | None = None,
    **encode_kwargs: Any,
) -> Selection:
    """Encode images with a timm / open_clip vision transformer and reduce the visual tokens: the one call between
    the encoder and the rest of a custom pipeline.

    Args:
        encoder: see `encode`.
        images: `[B, 3, H, W]` preprocessed tensor, or PIL images / arrays.
        reducer: a registered name (`vtc.list_reducers()`) or a `vtc.Reducer`.
        budget: tokens kept per sample (int) or fraction in (0, 1] — the same rule for every method.
        query: question embeddings `[B, T, D]` in the tokens' space (the projector's output space when a projector
            is given, else the feature space), or a `vtc.Query`; required by query-aware reducers.
        **encode_kwargs: `layer`, `attn_layer`, `attn_query`, `norm`, `projector`, `views`, `frames` (see `encode`).
    Returns:
        The reducer's `Selection` (`tokens [B, K, D]` go on to the LLM).

    Example:
        >>> sel = vtc.encode_and_reduce(vit, images, "fastervlm", budget=64, projector=proj)
        >>> llm_inputs = torch.cat([sel.tokens, text_embeds], dim=1)
    """
    r = as_reducer(reducer)
    vt = encode(encoder, images, **encode_kwargs)
    return r(vt, budget, query)


def normalise_layers(layers: Sequence[int] | int, depth: int) -> list[int]:
    """Sorted unique 0-based block indices."""
    seq = [layers] if isinstance(layers, int) else list(layers)
    if not seq:
        raise ValueError("layers is empty; name at least one block after which tokens are reduced")
    out = sorted({layer_index(i, depth, "layers entry") for i in seq})
    return out
