"""The tokenizer base class, its config, the token container and the public factory.

`vtc.create_tokenizer(name, pretrained=False | True | path, **cfg)` builds a registered tokenizer;
`vtc.list_tokenizers(pattern)` lists the names. Every tokenizer maps images `[B, 3, H, W]` in [0, 1] to an ordered
sequence of discrete tokens (`encode`) and back (`decode`), saves itself as `config.json` + `model.safetensors`
(`save_pretrained` / `from_pretrained`), and returns its training loss from `training_loss(images)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..registry import Registry

TOKENIZERS = Registry("tokenizer", "vtc.list_tokenizers()")
FORMAT_VERSION = 1
ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets" / "tokenizers"


@dataclass
class TokenizerConfig:
    """Fields shared by every tokenizer (the small defaults train on 2 CPU cores within an hour)."""

    image_size: int = 32  # square input side in pixels
    patch_size: int = 4  # ViT patch side; (image_size / patch_size)^2 patches
    width: int = 64  # transformer width of encoder and decoder
    enc_depth: int = 2  # encoder blocks
    dec_depth: int = 2  # decoder blocks
    num_heads: int = 4  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden = mlp_ratio * width
    num_tokens: int = 32  # K, the longest token sequence
    quantizer: str = "fsq"  # "fsq" or "vq"
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)  # FSQ levels per channel (1000 codes)
    vq_codebook_size: int = 1024  # VQ codes
    vq_dim: int = 12  # VQ code dimension
    vq_commitment: float = 0.25  # VQ commitment weight beta
    vq_restart_after: int = 50  # re-seed VQ codes unused for this many training steps (0 = never)
    tail_dropout: bool = True  # train on random token counts; False = the fixed-K ablation (TiTok-like)

    def __post_init__(self) -> None:
        self.fsq_levels = tuple(int(v) for v in self.fsq_levels)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} must be divisible by num_heads={self.num_heads}")
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens={self.num_tokens} must be >= 1")
        if self.quantizer not in ("fsq", "vq"):
            raise ValueError(f"quantizer={self.quantizer!r} is not one of 'fsq', 'vq'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def code_dim(self) -> int:
        return len(self.fsq_levels) if self.quantizer == "fsq" else self.vq_dim


@dataclass
class TokenizedImages:
    """Discrete tokens of a batch of images.

    ids: `[B, n]` long codebook indices, ordered (token 0 first).
    mask: `[B, n]` bool, which tokens each image keeps (None = all n). Set when images keep different counts (KARL).
    features: `[B, n, width]` the encoder's continuous latents before quantisation (for a VLM projector), or None.
    """

    ids: Tensor
    mask: Tensor | None = None
    features: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def lengths(self) -> Tensor:
        """`[B]` number of kept tokens per image."""
        if self.mask is None:
            return torch.full((self.ids.shape[0],), self.ids.shape[1], dtype=torch.long, device=self.ids.device)
        return self.mask.sum(1)


class Tokenizer1D(nn.Module):
    """Base class. Subclasses set `config_cls`, build modules in `__init__`, and implement `encode`, `decode`,
    `training_loss`. `runtime_fields` are config fields that may differ from a checkpoint's (sampling knobs)."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[TokenizerConfig]] = TokenizerConfig
    runtime_fields: ClassVar[tuple[str, ...]] = ()
    paper: ClassVar[str] = ""

    def __init__(self, config: TokenizerConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else self.config_cls()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items())

    # ------------------------------------------------------------------ API implemented by methods
    def encode(self, images: Tensor, num_tokens: int | None = None, **kwargs: Any) -> TokenizedImages:
        raise NotImplementedError

    def decode(self, tokens: TokenizedImages | Tensor, **kwargs: Any) -> Tensor:
        raise NotImplementedError

    def training_loss(self, images: Tensor, weight: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """One training iteration's loss on `images [B, 3, H, W]` in [0, 1], and scalars to log. `weight
        [B, 1, H, W]` (optional, >= 0) weighs each pixel of the reconstruction loss (`vtc train tokenizer
        --object-weight`: the objects of benchmark scenes, which are too few pixels for a plain mean)."""
        raise NotImplementedError

    def check_weight(self, weight: Tensor | None, images: Tensor) -> Tensor | None:
        """Validate pixel weights for `training_loss`: `[B, 1, H, W]` like `images`, finite and >= 0."""
        if weight is None:
            return None
        b, _, h, w = images.shape
        if not isinstance(weight, Tensor) or tuple(weight.shape) != (b, 1, h, w):
            got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise self._fail(f"weight must be a tensor [B, 1, H, W] = {(b, 1, h, w)} (one per pixel), got {got}")
        if not bool(torch.isfinite(weight).all()) or float(weight.min()) < 0 or float(weight.sum()) <= 0:
            raise self._fail("weight must be finite and >= 0 with a positive sum")
        return weight.to(images.dtype)

    # ------------------------------------------------------------------ shared checks and helpers
    def _fail(self, msg: str) -> ValueError:
        return ValueError(f"{self.name}: {msg}")

    def check_images(self, images: Tensor) -> Tensor:
        """Validate `[B, 3, S, S]` floats in [0, 1] and return them mapped to [-1, 1]."""
        s = self.config.image_size
        if not isinstance(images, Tensor):
            raise TypeError(
                f"{self.name}: images must be a torch.Tensor [B, 3, {s}, {s}], got {type(images).__name__}"
            )
        if images.dim() == 3:
            raise self._fail(f"images must be [B, 3, {s}, {s}], got {tuple(images.shape)}; add images.unsqueeze(0)")
        if images.dim() != 4 or images.shape[1:] != (3, s, s):
            raise self._fail(
                f"images must be [B, 3, {s}, {s}] (this model's image_size={s}), got {tuple(images.shape)}; "
                "resize them (e.g. torch.nn.functional.interpolate(images, size=...))"
            )
        if not images.is_floating_point():
            raise self._fail(f"images must be floating point in [0, 1], got dtype {images.dtype}; use images / 255")
        lo, hi = float(images.min()), float(images.max())
        if lo < -1e-3 or hi > 1 + 1e-3 or lo != lo:
            raise self._fail(f"images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; use images / 255")
        return images * 2 - 1

    def check_num_tokens(self, num_tokens: int | None) -> int:
        k_max = self.config.num_tokens
        if num_tokens is None:
            return k_max
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
            if isinstance(num_tokens, Tensor) and num_tokens.numel() == 1 and not num_tokens.is_floating_point():
                num_tokens = int(num_tokens)
            else:
                raise TypeError(f"{self.name}: num_tokens must be an int in [1, {k_max}], got {num_tokens!r}")
        if not 1 <= num_tokens <= k_max:
            raise self._fail(
                f"num_tokens={num_tokens} is out of range; it must be in [1, {k_max}] "
                f"(this model was built with num_tokens={k_max})"
            )
        return num_tokens

    def check_tokens(self, tokens: TokenizedImages | Tensor, codebook_size: int) -> TokenizedImages:
        if isinstance(tokens, Tensor):
            tokens = TokenizedImages(tokens)
        if not isinstance(tokens, TokenizedImages):
            raise TypeError(f"{self.name}: decode takes TokenizedImages or a [B, n] long tensor, got {type(tokens)}")
        ids = tokens.ids
        k_max = self.config.num_tokens
        if ids.dim() != 2 or ids.shape[0] == 0:
            raise self._fail(f"token ids must be [B, n], got shape {tuple(ids.shape)}")
        if not 1 <= ids.shape[1] <= k_max:
            raise self._fail(f"got {ids.shape[1]} tokens per image; decode takes 1 to {k_max} (num_tokens)")
        if ids.is_floating_point():
            raise self._fail(f"token ids must be integers, got dtype {ids.dtype}")
        if int(ids.min()) < 0 or int(ids.max()) >= codebook_size:
            raise self._fail(f"token ids must be in [0, {codebook_size}), got [{int(ids.min())}, {int(ids.max())}]")
        if tokens.mask is not None:
            if tokens.mask.shape != ids.shape or tokens.mask.dtype != torch.bool:
                raise self._fail(f"mask must be a bool tensor of shape {tuple(ids.shape)}, got {tokens.mask.shape}")
            if not bool(tokens.mask.any(1).all()):
                raise self._fail("every image must keep at least one token (a mask row is all False)")
        return tokens

    @staticmethod
    def to_unit(x: Tensor) -> Tensor:
        """Network output in [-1, 1] -> images clamped to [0, 1]."""
        return ((x + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `config.json` and `model.safetensors` into `directory` (created if needed)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"name": self.name, "format_version": FORMAT_VERSION, "config": self.config.to_dict()}
        (d / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(d / "model.safetensors"), metadata={"name": self.name})
        return d

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides: Any) -> Tokenizer1D:
        """Load a directory written by `save_pretrained` (its `name` must match `cls`, unless cls is the base)."""
        d = Path(directory)
        cfg_path, weights = d / "config.json", d / "model.safetensors"
        if not cfg_path.is_file() or not weights.is_file():
            raise FileNotFoundError(
                f"{d} is not a saved tokenizer: it needs config.json and model.safetensors "
                "(written by tok.save_pretrained(dir) or `vtc train tokenizer`)"
            )
        meta = json.loads(cfg_path.read_text())
        name = meta.get("name")
        target = cls if cls.name else TOKENIZERS.get(name)
        if name != target.name:
            raise ValueError(
                f"{d} holds a {name!r} tokenizer, not {target.name!r}; use vtc.create_tokenizer({name!r})"
            )
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{d}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
        saved = meta["config"]
        fields = {f.name for f in dataclasses.fields(target.config_cls)}
        unknown = sorted(set(saved) - fields)
        if unknown:
            raise ValueError(f"{d}/config.json has fields {unknown} that {target.name} does not know")
        for k, v in overrides.items():
            if k not in fields:
                raise ValueError(f"{target.name} has no config field {k!r}; fields: {sorted(fields)}")
            if k not in target.runtime_fields and _norm(v) != _norm(saved.get(k)):
                raise ValueError(
                    f"{k}={v!r} differs from the checkpoint's {saved.get(k)!r}; only {list(target.runtime_fields)} "
                    "may be changed when loading trained weights"
                )
        model = target(target.config_cls(**{**saved, **overrides}))
        model.load_state_dict(load_file(str(weights)), strict=True)
        return model.eval()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (tuple, list)) else v


def register_tokenizer(name: str, config: type[TokenizerConfig] | None = None):
    """Class decorator: `@register_tokenizer("flextok", config=FlexTokConfig)`."""

    def wrap(cls: type) -> type:
        if config is not None:
            cls.config_cls = config
        return TOKENIZERS.register(name)(cls)

    return wrap


def list_tokenizers(pattern: str | Iterable[str] = "*", exclude: str | Iterable[str] = ()) -> list[str]:
    """Sorted registered tokenizer names matching `pattern` (fnmatch wildcards)."""
    return TOKENIZERS.list(pattern, exclude)


def get_tokenizer_class(name: str) -> type[Tokenizer1D]:
    return TOKENIZERS.get(name)


def create_tokenizer(name: str, pretrained: bool | str | os.PathLike = False, **cfg: Any) -> Tokenizer1D:
    """Build tokenizer `name`.

    Args:
        name: a registered name (see `vtc.list_tokenizers()`).
        pretrained: False for random weights; True for the project's trained weights in `assets/tokenizers/<name>/`;
            a directory path for weights saved with `save_pretrained` (or by `vtc train tokenizer`).
        **cfg: config fields (`None` values are ignored). With weights, only the class's `runtime_fields`
            (sampling settings) may differ from the saved config.
    """
    cls = TOKENIZERS.get(name)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    if pretrained is False or pretrained is None:
        fields = {f.name for f in dataclasses.fields(cls.config_cls)}
        bad = sorted(set(cfg) - fields)
        if bad:
            raise ValueError(f"{name} has no config field(s) {bad}; fields: {sorted(fields)}")
        return cls(cls.config_cls(**cfg))
    if pretrained is True:
        d = ASSETS_DIR / name
        if not (d / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"no trained weights for tokenizer {name!r} at {d}. Train them with "
                f"`vtc train tokenizer {name} --out {d}` (or `python -m vtc.train.tokenizer {name} --out {d}`), "
                "or pass pretrained=<directory> for weights saved elsewhere"
            )
    elif isinstance(pretrained, (str, os.PathLike)):
        d = Path(pretrained)
    else:
        raise TypeError(f"pretrained must be False, True or a directory path, got {pretrained!r}")
    return cls.from_pretrained(d, **cfg)
