"""Images for training and evaluating the tokenizers.

`synthetic_images` draws procedural RGB images whose complexity spans five labelled levels:

    0 flat        one colour
    1 gradient    a linear or radial blend of two colours
    2 few_shapes  1-3 filled shapes (circle, ellipse, rectangle, triangle) on a flat or gradient background
    3 cluttered   8-20 shapes and lines of many sizes, overlapping, on a gradient
    4 texture     high-frequency gratings, blocky or per-pixel noise

Image `i` of seed `s` depends only on `(s, i)` (numpy `default_rng((s, i))`), so a training stream is resumable and
any slice can be regenerated. Shapes are drawn with OpenCV at 4x and area-downsampled (anti-aliased). Values are
uint8 / 255, so they are exact in [0, 1].

`skimage_photos` loads the real photographs bundled with scikit-image (no download), centre-cropped to a square and
area-resized, for evaluation.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import Tensor

COMPLEXITY_LEVELS = ("flat", "gradient", "few_shapes", "cluttered", "texture")
PHOTO_NAMES = (
    "astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text",
)  # fmt: skip
_SS = 4  # supersampling factor for anti-aliased shapes


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def _gradient(rng: np.random.Generator, n: int) -> np.ndarray:
    """`[n, n, 3]` float blend of two colours, linear at a random angle or radial from a random centre."""
    c0, c1 = _colour(rng), _colour(rng)
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32) / max(n - 1, 1)
    if rng.random() < 0.5:
        a = rng.uniform(0, 2 * np.pi)
        t = xs * np.cos(a) + ys * np.sin(a)
    else:
        cy, cx = rng.uniform(0, 1, 2)
        t = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return c0 * (1 - t[..., None]) + c1 * t[..., None]


def _draw_shape(img: np.ndarray, rng: np.random.Generator, n: int, min_r: float, max_r: float) -> None:
    """One filled shape (or a line) of radius in [min_r, max_r] * n at a random place, in place on `img`."""
    colour = tuple(float(v) for v in _colour(rng))
    cx, cy = rng.uniform(0, n, 2)
    r = rng.uniform(min_r, max_r) * n
    kind = rng.integers(0, 5)
    if kind == 0:
        cv2.circle(img, (int(cx), int(cy)), max(int(r), 1), colour, -1, cv2.LINE_AA)
    elif kind == 1:
        axes = (max(int(r), 1), max(int(r * rng.uniform(0.3, 1.0)), 1))
        cv2.ellipse(img, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
    elif kind == 2:
        w, h = r * rng.uniform(0.5, 1.5), r * rng.uniform(0.5, 1.5)
        box = cv2.boxPoints(((float(cx), float(cy)), (2 * w, 2 * h), float(rng.uniform(0, 90))))
        cv2.fillPoly(img, [np.round(box).astype(np.int32)], colour, cv2.LINE_AA)
    elif kind == 3:
        ang = rng.uniform(0, 2 * np.pi) + np.array([0, 2.1, 4.2]) + rng.uniform(-0.4, 0.4, 3)
        pts = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1)
        cv2.fillPoly(img, [np.round(pts).astype(np.int32)], colour, cv2.LINE_AA)
    else:
        a = rng.uniform(0, np.pi)
        p0 = (int(cx - r * np.cos(a)), int(cy - r * np.sin(a)))
        p1 = (int(cx + r * np.cos(a)), int(cy + r * np.sin(a)))
        cv2.line(img, p0, p1, colour, max(int(rng.uniform(0.01, 0.05) * n), 1), cv2.LINE_AA)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.integers(0, 3)
    if kind == 0:  # sum of high-frequency gratings per channel + noise
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        img = np.zeros((size, size, 3), np.float32)
        for ch in range(3):
            for _ in range(rng.integers(2, 5)):
                f = rng.uniform(0.15, 0.5)  # cycles per pixel
                a = rng.uniform(0, np.pi)
                img[..., ch] += np.sin(2 * np.pi * f * (xs * np.cos(a) + ys * np.sin(a)) + rng.uniform(0, 2 * np.pi))
        img = 128 + 50 * img + rng.normal(0, 20, img.shape)
    elif kind == 1:  # blocky noise at 2x2 or 4x4 cells
        cell = int(rng.choice([2, 4]))
        small = rng.integers(0, 256, (size // cell + 1, size // cell + 1, 3)).astype(np.float32)
        img = np.repeat(np.repeat(small, cell, 0), cell, 1)[:size, :size]
    else:  # per-pixel noise around a random mean colour
        img = _colour(rng) + rng.normal(0, rng.uniform(40, 90), (size, size, 3))
    return img


def synthetic_image(
    index: int, size: int = 32, seed: int = 0, complexity: int | None = None
) -> tuple[np.ndarray, int]:
    """Image `index` of stream `seed`: `([size, size, 3] uint8 RGB, complexity level 0..4)`."""
    rng = np.random.default_rng((int(seed), int(index)))
    level = int(rng.integers(0, len(COMPLEXITY_LEVELS))) if complexity is None else int(complexity)
    if not 0 <= level < len(COMPLEXITY_LEVELS):
        raise ValueError(f"complexity={complexity} must be in [0, {len(COMPLEXITY_LEVELS) - 1}] {COMPLEXITY_LEVELS}")
    n = size * _SS
    if level == 0:
        img = np.broadcast_to(_colour(rng), (size, size, 3)).copy()
    elif level == 1:
        img = _gradient(rng, size)
    elif level == 4:
        img = _texture(rng, size)
    else:
        if level == 3 or rng.random() < 0.5:
            big = _gradient(rng, n)
        else:
            big = np.broadcast_to(_colour(rng), (n, n, 3)).copy()
        big = np.ascontiguousarray(big, dtype=np.float32)
        count = int(rng.integers(1, 4)) if level == 2 else int(rng.integers(8, 21))
        lo, hi = (0.15, 0.4) if level == 2 else (0.04, 0.3)
        for _ in range(count):
            _draw_shape(big, rng, n, lo, hi)
        img = cv2.resize(big, (size, size), interpolation=cv2.INTER_AREA)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), level


def synthetic_images(
    n: int, size: int = 32, seed: int = 0, start: int = 0, complexity: int | None = None
) -> tuple[Tensor, Tensor]:
    """Images `start .. start + n - 1` of stream `seed`: (`[n, 3, size, size]` float in [0, 1], `[n]` levels)."""
    if n < 1 or size < 4:
        raise ValueError(f"need n >= 1 and size >= 4, got n={n}, size={size}")
    imgs, levels = zip(*(synthetic_image(start + i, size, seed, complexity) for i in range(n)), strict=True)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    return x, torch.tensor(levels, dtype=torch.long)


def synthetic_batch(step: int, batch_size: int, size: int = 32, seed: int = 0) -> Tensor:
    """Training batch `step`: images `[step * B, (step + 1) * B)` of stream `seed` (resumable by step)."""
    return synthetic_images(batch_size, size, seed, start=step * batch_size)[0]


def skimage_photos(size: int = 32, names: tuple[str, ...] = PHOTO_NAMES, tiles: int = 1) -> tuple[Tensor, list[str]]:
    """Real photos from `skimage.data`: (`[n, 3, size, size]` float in [0, 1], names).

    Each photo is centre-cropped to a square; with `tiles=t` that square is cut into t x t tiles, each one image.
    Grayscale photos are repeated over RGB.
    """
    try:
        import skimage.data as skd
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("skimage_photos needs scikit-image: pip install 'vtc-vlm[dev]' or scikit-image") from e
    out, labels = [], []
    for name in names:
        loader = getattr(skd, name, None)
        if loader is None:
            raise ValueError(f"skimage.data has no image {name!r}; choose from {PHOTO_NAMES}")
        img = np.asarray(loader())
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = img[..., :3].astype(np.uint8)
        h, w = img.shape[:2]
        s = min(h, w) // tiles * tiles
        y0, x0 = (h - s) // 2, (w - s) // 2
        sq = img[y0 : y0 + s, x0 : x0 + s]
        t = s // tiles
        for i in range(tiles):
            for j in range(tiles):
                tile = np.ascontiguousarray(sq[i * t : (i + 1) * t, j * t : (j + 1) * t])
                out.append(cv2.resize(tile, (size, size), interpolation=cv2.INTER_AREA))
                labels.append(name if tiles == 1 else f"{name}[{i},{j}]")
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255
    return x, labels
