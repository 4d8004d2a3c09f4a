"""Measured properties of trained 1-D tokenizers (FlexTok, One-D-Piece, KARL and their fixed-K ablations).

    python -m vtc.eval.report_tokenizers                                   # every assets/tokenizers/<name>/ there is
    python -m vtc.eval.report_tokenizers --tokenizers assets/tokenizers/flextok assets/tokenizers/karl --out runs/x

Images (held out from training): the procedural stream of `vtc.tokenizers.data` with seed `--seed` (default
10000, the training script's held-out seed; training uses seed 0), `--per-level` images of each of the five
complexity levels (level l takes stream indices l * per_level .. (l + 1) * per_level - 1), and the scikit-image
photos (`skimage_photos`, each centre square cut into `--photo-tiles`^2 tiles), at each tokenizer's image size.
The two sets are reported separately ("procedural", "photos").

Measures (per tokenizer and set):
- PSNR for the first k tokens, k = 1, 2, 4, ..., K (and K): `decode(encode(x, num_tokens=k))`. Every
  reconstruction is rounded to 8 bits first, as a stored image would be (JPEG's output is 8-bit too). PSNR is
  `10 log10(1 / MSE)` over all pixels and channels of an image in [0, 1], with the MSE floored at the variance of
  8-bit rounding noise, (1/255)^2 / 12, i.e. capped at 58.92 dB (an exact copy would otherwise be +inf; the cap
  keeps means finite). Tables give the mean over images. KARL's fixed-length path is `encode(x, num_tokens=k)`:
  k latents conditioned on its strictest error bin, all kept. The flow decoder samples with a seeded generator.
- monotone fraction: the fraction of images whose PSNR never drops by more than `--tol` dB (default 0.05) from one
  k to the next larger k.
- FlexTok prefix identity: for every image and k, whether `encode(x, num_tokens=k)` equals the first k of
  `encode(x)` (K registers), for the token ids and, bit for bit, for the pre-quantisation features; the fraction
  of (image, k) pairs where it holds.
- rate-distortion: a tokenizer's bits per image are `k * log2(codebook size)` (no entropy coding, the length of a
  variable-length code not counted); JPEG (OpenCV, 4:2:0 chroma, qualities `--jpeg-qualities`) and PNG
  (OpenCV, compression 9, lossless so bits only) of the same 8-bit images at the same resolution: bits = encoded
  bytes x 8. At 32 px a JPEG file is mostly headers (quantisation and Huffman tables), so `jpeg_scan` also gives
  the entropy-coded scan bytes only (after the SOS header, without the end marker).
- KARL (`--karl-errors`, requested mean L1 error per pixel in [0, 1] units): the predicted lengths of one encoder
  pass `encode(x, error=e)` (their mean, std, min, max), the fraction of images whose reconstruction from the kept
  tokens reaches the request (8-bit L1 <= e), the Spearman correlation between predicted length and PNG size over
  the images that reach it, a constant-length predictor at the same mean length m (every image gets floor(m) or
  ceil(m) tokens of the fixed-length path, ceil(m) for a fraction m - floor(m): its expected fraction reaching e),
  the oracle length (smallest k of the fixed-length path that reaches e, K when none) and the fraction reachable
  at K, and the mean length per complexity level of the procedural images. Then the same comparison on the
  images for which the request is feasible (some k <= K reaches it): KARL's reach and mean length there, a
  constant length with that mean, the smallest constant that reaches as often, and KARL's mean length on the
  infeasible images (where every length fails, so the full-set comparison cannot separate the predictors).

Output (`--out`, default runs/report_tokenizers/): report.md, CSVs (tokenizers, psnr_vs_k, psnr_per_image, rd,
karl, karl_levels), psnr_vs_k.png, rd.png, recon_row.png (original, then k = 1, 2, 4, ... for a few images),
karl_lengths.png. Slow measurements are cached per (tokenizer, image set) in `<out>/cache/` under a fingerprint of
the weights, config and settings, so a rerun (or a run after a kill) only measures what is missing or changed;
`--fresh` drops the cache.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from vtc.tokenizers import Tokenizer1D, create_tokenizer
from vtc.tokenizers.base import ASSETS_DIR
from vtc.tokenizers.data import COMPLEXITY_LEVELS, PHOTO_NAMES, skimage_photos, synthetic_images

SETS = ("procedural", "photos")
METHODS = ("flextok", "one_d_piece", "karl")
ABLATION_SUFFIX = "_no_tail_dropout"
DEFAULT_ERRORS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.14)
DEFAULT_QUALITIES = (5, 10, 20, 30, 50, 70, 90)
MSE_FLOOR = (1 / 255) ** 2 / 12  # variance of 8-bit rounding noise
MAX_PSNR = -10 * math.log10(MSE_FLOOR)  # 58.92 dB
CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------- maths
def psnr(a: np.ndarray, b: np.ndarray, max_db: float = MAX_PSNR) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 images `[N, ...]` (peak 255), MSE floored so that PSNR <= `max_db`."""
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {a.shape} and {b.shape}")
    d = (a.astype(np.float64) - b.astype(np.float64)) / 255.0
    mse = (d * d).reshape(d.shape[0], -1).mean(1)
    return -10 * np.log10(np.maximum(mse, 10 ** (-max_db / 10)))


def mean_l1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image mean absolute error of uint8 images `[N, ...]` in [0, 1] units."""
    d = np.abs(a.astype(np.float64) - b.astype(np.float64)) / 255.0
    return d.reshape(d.shape[0], -1).mean(1)


def to_uint8(x: Tensor) -> np.ndarray:
    """`[N, 3, S, S]` floats in [0, 1] -> `[N, S, S, 3]` uint8 (rounded)."""
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, ties given their average rank."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]  # first index of each run of equal values
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based positions starts+1 .. ends
    ranks = np.empty(len(xs), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (Pearson correlation of average ranks); nan below 2 points or when a side is constant."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"spearman needs equal lengths, got {x.size} and {y.size}")
    if x.size < 2:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def monotone_mask(curves: np.ndarray, tol: float) -> np.ndarray:
    """`[N]` True where a curve `[N, nk]` (PSNR at increasing k) never drops by more than `tol` between neighbours."""
    curves = np.asarray(curves, dtype=np.float64)
    if curves.ndim != 2:
        raise ValueError(f"curves must be [N, nk], got shape {curves.shape}")
    if tol < 0:
        raise ValueError(f"tol={tol} must be >= 0 (dB)")
    return (np.diff(curves, axis=1) >= -tol).all(1)


def monotone_fraction(curves: np.ndarray, tol: float) -> float:
    return float(monotone_mask(curves, tol).mean())


def prefix_ks(k_max: int) -> list[int]:
    """k = 1, 2, 4, ..., and K."""
    return sorted({2**i for i in range(k_max.bit_length()) if 2**i <= k_max} | {k_max})


def constant_length_reach(reach_by_k: np.ndarray, mean_len: float) -> float:
    """Expected fraction reaching the error when every image gets floor(m) or ceil(m) tokens (ceil(m) for a
    fraction m - floor(m)); `reach_by_k[k - 1]` is the fraction reaching it with k tokens, k = 1..K."""
    k_max = len(reach_by_k)
    if not 1 <= mean_len <= k_max:
        raise ValueError(f"mean length {mean_len} is outside [1, {k_max}]")
    lo = int(math.floor(mean_len))
    f = mean_len - lo
    hi_val = reach_by_k[lo] if lo < k_max else reach_by_k[lo - 1]
    return float((1 - f) * reach_by_k[lo - 1] + f * hi_val)


def feasible_comparison(l1_by_k: np.ndarray, lengths: np.ndarray, l1_adaptive: np.ndarray, error: float) -> dict:
    """KARL against a constant length on the images for which the request is feasible.

    l1_by_k [N, K]: each image's L1 on the fixed-length path with k = 1..K tokens; lengths [N]: the predicted
    lengths; l1_adaptive [N]: the L1 reached with them. An image is feasible when some k <= K reaches `error`. On
    the feasible images: the fraction the predictor brings to the error (`reach_feasible`), its mean length there,
    the expected fraction a constant length with that same mean reaches (floor/ceil mix), and the smallest constant
    that reaches it as often (None when no k <= K does). Also the predictor's mean length on infeasible images."""
    ok = l1_by_k <= error  # [N, K]
    feasible = ok.any(1)  # [N]
    out: dict[str, Any] = {
        "feasible_frac": float(feasible.mean()), "n_feasible": int(feasible.sum()), "len_mean_feasible": None,
        "reach_feasible": None, "const_reach_feasible": None, "const_len_to_match_feasible": None,
        "len_mean_infeasible": float(lengths[~feasible].mean()) if (~feasible).any() else None,
    }  # fmt: skip
    if not feasible.any():
        return out
    reach_by_k = ok[feasible].mean(0)  # [K]
    reach = float((l1_adaptive[feasible] <= error).mean())
    mean_len = float(lengths[feasible].mean())
    match = np.flatnonzero(reach_by_k >= reach - 1e-12)
    out.update(
        len_mean_feasible=mean_len, reach_feasible=reach,
        const_reach_feasible=constant_length_reach(reach_by_k, mean_len),
        const_len_to_match_feasible=int(match[0]) + 1 if len(match) else None,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------- codecs
def _bgr(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img[..., ::-1])


def jpeg_encode(img: np.ndarray, quality: int) -> tuple[bytes, np.ndarray]:
    """`[S, S, 3]` uint8 RGB -> (JPEG file bytes, decoded uint8 RGB)."""
    ok, buf = cv2.imencode(".jpg", _bgr(img), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a JPEG at quality {quality}")
    dec = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return buf.tobytes(), np.ascontiguousarray(dec[..., ::-1])


def png_encode(img: np.ndarray) -> bytes:
    """`[S, S, 3]` uint8 RGB -> PNG file bytes (compression 9, lossless)."""
    ok, buf = cv2.imencode(".png", _bgr(img), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise RuntimeError("OpenCV could not encode a PNG")
    return buf.tobytes()


def jpeg_scan_bytes(data: bytes) -> int:
    """Entropy-coded bytes of a baseline JPEG: from the end of the first SOS header to the EOI marker."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no SOI marker)")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1]
        seg = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # SOS: the scan follows its header
            end = len(data) - 2 if data[-2:] == b"\xff\xd9" else len(data)
            return end - (pos + 2 + seg)
        pos += 2 + seg
    raise ValueError("JPEG has no SOS marker")


# ---------------------------------------------------------------------------------------------- images
@dataclass
class ImageSet:
    name: str
    images: Tensor  # [N, 3, S, S] in [0, 1]
    levels: np.ndarray  # [N] complexity level (procedural) or -1 (photos)
    names: list[str]


def build_image_sets(
    size: int, per_level: int, seed: int, photo_tiles: int, photo_names: Sequence[str]
) -> dict[str, ImageSet]:
    """The held-out procedural images (per_level of each complexity level) and the skimage photos at `size`."""
    if per_level < 1:
        raise ValueError(f"per_level={per_level} must be >= 1")
    xs, lv = [], []
    for level in range(len(COMPLEXITY_LEVELS)):
        x, lab = synthetic_images(per_level, size, seed=seed, start=level * per_level, complexity=level)
        xs.append(x)
        lv.append(lab.numpy())
    levels = np.concatenate(lv)
    proc = ImageSet("procedural", torch.cat(xs), levels, [f"{COMPLEXITY_LEVELS[v]}#{i}" for i, v in enumerate(levels)])
    sets = {"procedural": proc}
    if photo_names:
        px, pn = skimage_photos(size, tuple(photo_names), tiles=photo_tiles)
        sets["photos"] = ImageSet("photos", px, np.full(len(pn), -1), pn)
    return sets


def row_indices(s: ImageSet, count: int) -> list[int]:
    """A few images for recon_row.png: procedural ones from the most complex levels down, photos spread out."""
    n = len(s.names)
    if s.name == "procedural":
        out = []
        for level in (4, 2, 3, 1, 0):
            idx = np.flatnonzero(s.levels == level)
            if len(idx) and len(out) < count:
                out.append(int(idx[0]))
        return out
    return sorted({int(i) for i in np.linspace(0, n - 1, min(count, n)).round()})


# ---------------------------------------------------------------------------------------------- tokenizers
@dataclass
class Entry:
    label: str
    path: Path
    model: Tokenizer1D
    twin: str | None = None  # for an ablation: the label of its nested (tail-dropout) twin

    @property
    def method(self) -> str:
        return self.model.name

    @property
    def ablation(self) -> bool:
        return not self.model.config.tail_dropout

    @property
    def bits_per_token(self) -> float:
        return math.log2(self.model.quantizer.codebook_size)


def default_dirs(root: Path = ASSETS_DIR) -> list[Path]:
    """`assets/tokenizers/<method>[_no_tail_dropout]/` folders that hold a saved model."""
    out = []
    for m in METHODS:
        for d in (root / m, root / f"{m}{ABLATION_SUFFIX}"):
            if (d / "model.safetensors").is_file():
                out.append(d)
    return out


def load_entries(dirs: Sequence[Path], device: str) -> list[Entry]:
    """Load each folder; order nested models by label with each ablation right after its twin."""
    if not dirs:
        raise FileNotFoundError(
            f"no trained tokenizers found: none of {ASSETS_DIR}/<{'|'.join(METHODS)}>[{ABLATION_SUFFIX}]/ exists. "
            "Train them with `vtc train tokenizer NAME` (add --no-tail-dropout for the ablation) or pass "
            "--tokenizers DIR..."
        )
    entries: list[Entry] = []
    seen: set[str] = set()
    for d in dirs:
        d = Path(d)
        model = create_tokenizer(_saved_name(d), pretrained=d).to(device).eval()
        label = d.name if d.name not in seen else f"{d.parent.name}/{d.name}"
        if label in seen:
            raise ValueError(f"tokenizer folder {d} was given twice")
        seen.add(label)
        entries.append(Entry(label, d, model))
    nested = sorted((e for e in entries if not e.ablation), key=lambda e: e.label)
    ablations = [e for e in entries if e.ablation]
    for a in ablations:
        stem = a.label[: -len(ABLATION_SUFFIX)] if a.label.endswith(ABLATION_SUFFIX) else None
        same = [e for e in nested if e.method == a.method]
        pick = next((e for e in same if e.label == stem), same[0] if len(same) == 1 else None)
        a.twin = pick.label if pick is not None else None
    ordered: list[Entry] = []
    for e in nested:
        ordered.append(e)
        ordered += sorted((a for a in ablations if a.twin == e.label), key=lambda a: a.label)
    ordered += sorted((a for a in ablations if a.twin is None), key=lambda a: a.label)
    return ordered


def _saved_name(d: Path) -> str:
    cfg = d / "config.json"
    if not cfg.is_file() or not (d / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{d} is not a saved tokenizer (needs config.json and model.safetensors, as written by "
            "`vtc train tokenizer NAME --out DIR`)"
        )
    return json.loads(cfg.read_text())["name"]


def _train_steps(d: Path) -> int | None:
    f = d / "eval.json"
    if f.is_file():
        try:
            return int(json.loads(f.read_text())["steps"])
        except (KeyError, ValueError, TypeError):
            return None
    return None


# ---------------------------------------------------------------------------------------------- measurement
def _decode(model: Tokenizer1D, tokens: Any, gen: torch.Generator) -> Tensor:
    if model.name == "flextok":
        return model.decode(tokens, generator=gen)
    return model.decode(tokens)


@torch.no_grad()
def measure(
    model: Tokenizer1D,
    s: ImageSet,
    errors: Sequence[float],
    rows: Sequence[int],
    batch: int = 64,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """All slow measurements of one tokenizer on one image set (see the module docstring); numpy arrays."""
    dev = next(model.parameters()).device
    k_max = model.config.num_tokens
    ks = prefix_ks(k_max)
    is_karl, is_flex = model.name == "karl", model.name == "flextok"
    k_eval = list(range(1, k_max + 1)) if is_karl else ks  # KARL: every k, for the constant-length predictor
    x8 = to_uint8(s.images)
    n = len(x8)
    gen = torch.Generator(device=dev)
    psnr_all = np.zeros((n, len(k_eval)))
    l1_all = np.zeros((n, len(k_eval)))
    recon = np.zeros((len(rows), len(ks), *x8.shape[1:]), dtype=np.uint8)
    ids_eq = np.zeros((n, len(ks)), dtype=bool)
    feat_eq = np.zeros((n, len(ks)), dtype=bool)
    batches = [(i, s.images[i : i + batch].to(dev)) for i in range(0, n, batch)]
    full = [model.encode(x) for _, x in batches] if is_flex else []
    for j, k in enumerate(k_eval):
        for b, (i, x) in enumerate(batches):
            tok = model.encode(x, num_tokens=k)
            gen.manual_seed(seed * 1_000_003 + 1000 * k + b)
            r8 = to_uint8(_decode(model, tok, gen))
            psnr_all[i : i + len(x), j] = psnr(r8, x8[i : i + len(x)])
            l1_all[i : i + len(x), j] = mean_l1(r8, x8[i : i + len(x)])
            if k in ks:
                jk = ks.index(k)
                for r, idx in enumerate(rows):
                    if i <= idx < i + len(x):
                        recon[r, jk] = r8[idx - i]
                if is_flex:
                    f = full[b]
                    ids_eq[i : i + len(x), jk] = (tok.ids == f.ids[:, :k]).all(1).cpu().numpy()
                    same = tok.features == f.features[:, :k]  # bit-exact comparison
                    feat_eq[i : i + len(x), jk] = same.flatten(1).all(1).cpu().numpy()
    cols = [k_eval.index(k) for k in ks]
    out: dict[str, np.ndarray] = {"ks": np.array(ks), "psnr": psnr_all[:, cols], "recon": recon}
    if is_flex:
        out["ids_eq"], out["feat_eq"] = ids_eq, feat_eq
    if is_karl:
        out["l1_all"] = l1_all
        lengths = np.zeros((len(errors), n), dtype=np.int64)
        l1_e = np.zeros((len(errors), n))
        psnr_e = np.zeros((len(errors), n))
        for j, e in enumerate(errors):
            for i, x in batches:
                tok = model.encode(x, error=float(e))
                r8 = to_uint8(model.decode(tok))
                lengths[j, i : i + len(x)] = tok.lengths.cpu().numpy()
                l1_e[j, i : i + len(x)] = mean_l1(r8, x8[i : i + len(x)])
                psnr_e[j, i : i + len(x)] = psnr(r8, x8[i : i + len(x)])
        out.update(karl_lengths=lengths, karl_l1=l1_e, karl_psnr=psnr_e, karl_errors=np.array(errors, float))
    return out


def fingerprint(d: Path, settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update((d / "model.safetensors").read_bytes())
    h.update((d / "config.json").read_bytes())
    h.update(json.dumps({**settings, "cache_version": CACHE_VERSION}, sort_keys=True).encode())
    return h.hexdigest()


def cached_measure(cache: Path, e: Entry, s: ImageSet, settings: dict[str, Any], **kw: Any) -> dict[str, np.ndarray]:
    """`measure` through `<cache>/<label>.<set>.npz` (reused when the fingerprint matches)."""
    fp = fingerprint(e.path, {**settings, "set": s.name})
    path = cache / f"{e.label.replace('/', '__')}.{s.name}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                if str(z["fingerprint"]) == fp:
                    return {k: z[k] for k in z.files if k != "fingerprint"}
        except (OSError, ValueError, KeyError):
            pass  # a torn or foreign file: measure again
    t0 = time.monotonic()
    out = measure(e.model, s, **kw)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, fingerprint=np.array(fp), **out)
    tmp.replace(path)
    print(f"report_tokenizers: measured {e.label} on {s.name} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return out


def codec_baselines(s: ImageSet, qualities: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-image JPEG (file and scan bits, PSNR per quality) and PNG bits of the 8-bit images."""
    x8 = to_uint8(s.images)
    n, nq = len(x8), len(qualities)
    jb, js, jp = np.zeros((nq, n)), np.zeros((nq, n)), np.zeros((nq, n))
    for a, q in enumerate(qualities):
        for i, img in enumerate(x8):
            data, dec = jpeg_encode(img, q)
            jb[a, i], js[a, i] = 8 * len(data), 8 * jpeg_scan_bytes(data)
            jp[a, i] = psnr(dec[None], img[None])[0]
    pb = np.array([8 * len(png_encode(img)) for img in x8], dtype=np.float64)
    return {"jpeg_bits": jb, "jpeg_scan_bits": js, "jpeg_psnr": jp, "png_bits": pb}


# ---------------------------------------------------------------------------------------------- tables
def _write_csv(path: Path, rows: list[dict[str, Any]], cols: Sequence[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(cols))
        w.writeheader()
        for r in rows:
            w.writerow({c: _csv_val(r.get(c)) for c in cols})


def _csv_val(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def md_table(rows: list[dict[str, Any]], cols: Sequence[str], specs: dict[str, str] | None = None) -> str:
    specs = specs or {}
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), specs.get(c, ".2f")) for c in cols) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(entries: list[Entry]) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    nested = [e.label for e in entries if e.twin is None or not e.ablation]
    col = {lab: cmap(i % 10) for i, lab in enumerate(nested)}
    for e in entries:
        if e.label not in col:
            col[e.label] = col.get(e.twin or "", cmap(len(col) % 10))
    return col


def plot_psnr_vs_k(path: Path, entries: list[Entry], res: dict, sets: list[str]) -> None:
    plt = _plt()
    col = _colours(entries)
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4.2), squeeze=False)
    for ax, sname in zip(axes[0], sets, strict=True):
        for e in entries:
            r = res[e.label][sname]
            ax.plot(r["ks"], r["psnr"].mean(0), marker="o", ms=3, color=col[e.label],
                    ls="--" if e.ablation else "-", label=e.label)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens k (prefix)")
        ax.set_ylabel("mean PSNR (dB)")
        ax.set_title(sname)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rd(path: Path, entries: list[Entry], rd_rows: list[dict[str, Any]], sets: list[str]) -> None:
    plt = _plt()
    col = _colours(entries)
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.5), squeeze=False)
    for ax, sname in zip(axes[0], sets, strict=True):
        rows = [r for r in rd_rows if r["set"] == sname]
        for e in entries:
            rr = [r for r in rows if r["codec"] == e.label]
            ax.plot([r["bits"] for r in rr], [r["psnr_db"] for r in rr], marker="o", ms=3, color=col[e.label],
                    ls="--" if e.ablation else "-", label=e.label)  # fmt: skip
            ka = [r for r in rows if r["codec"] == f"{e.label} (adaptive)"]
            if ka:
                ax.plot([r["bits"] for r in ka], [r["psnr_db"] for r in ka], marker="*", ms=8, ls=":",
                        color=col[e.label], label=f"{e.label} adaptive (requested error)")  # fmt: skip
        for codec, ls in (("jpeg", "-"), ("jpeg_scan", "--")):
            rr = [r for r in rows if r["codec"] == codec]
            ax.plot([r["bits"] for r in rr], [r["psnr_db"] for r in rr], marker="s", ms=3, color="k", ls=ls,
                    label="JPEG file" if codec == "jpeg" else "JPEG scan data only")  # fmt: skip
        png = [r for r in rows if r["codec"] == "png"]
        if png:
            ax.axvline(png[0]["bits"], color="grey", ls=":", label="PNG (lossless), mean bits")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per image (mean)")
        ax.set_ylabel("mean PSNR (dB)")
        ax.set_title(sname)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recon_row(path: Path, entries: list[Entry], res: dict, sets: dict[str, ImageSet], rows: dict) -> None:
    """One mosaic: per (image, tokenizer) a row of the original then reconstructions at k = 1, 2, 4, ..., K."""
    lines = []  # (label, original, [(k, image)])
    for sname, idxs in rows.items():
        x8 = to_uint8(sets[sname].images)
        for r, idx in enumerate(idxs):
            for e in entries:
                m = res[e.label][sname]
                recs = list(zip(m["ks"].tolist(), m["recon"][r], strict=True))
                lines.append((f"{e.label} | {sets[sname].names[idx]}", x8[idx], recs))
    if not lines:
        return
    plt = _plt()
    size = lines[0][1].shape[0]
    up = max(1, 64 // size)  # nearest-neighbour upscale so that small images stay visible
    cell, gap = size * up, 4
    ks = sorted({k for line in lines for k, _ in line[2]})
    ncol = 1 + len(ks)
    canvas = np.full((len(lines) * (cell + gap), ncol * (cell + gap), 3), 255, dtype=np.uint8)
    for a, (_, orig, recs) in enumerate(lines):
        for k, img in [(0, orig), *recs]:
            c = 0 if k == 0 else 1 + ks.index(k)
            y, x = a * (cell + gap), c * (cell + gap)
            canvas[y : y + cell, x : x + cell] = img.repeat(up, 0).repeat(up, 1)
    h, w = canvas.shape[:2]
    fig = plt.figure(figsize=(w / 100 + 2.6, h / 100 + 0.4), dpi=100)
    ax = fig.add_axes(
        (2.4 / (w / 100 + 2.6), 0.05 / (h / 100 + 0.4), (w / 100) / (w / 100 + 2.6), (h / 100) / (h / 100 + 0.4))
    )
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for c, title in enumerate(["original", *[f"k={k}" for k in ks]]):
        ax.text(c * (cell + gap) + cell / 2, -3, title, ha="center", va="bottom", fontsize=7)
    for a, (label, _, _) in enumerate(lines):
        ax.text(-6, a * (cell + gap) + cell / 2, label, ha="right", va="center", fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_karl(path: Path, level_rows: list[dict[str, Any]]) -> None:
    plt = _plt()
    labels = sorted({r["tokenizer"] for r in level_rows})
    fig, axes = plt.subplots(1, max(len(labels), 1), figsize=(5.5 * max(len(labels), 1), 4), squeeze=False)
    for ax, lab in zip(axes[0], labels, strict=False):
        rows = [r for r in level_rows if r["tokenizer"] == lab]
        errs = [r["error"] for r in rows]
        for name in (*COMPLEXITY_LEVELS, "photos"):
            if all(r.get(name) is None for r in rows):
                continue
            ax.plot(errs, [r.get(name) for r in rows], marker="o", ms=3, ls="--" if name == "photos" else "-",
                    label=name)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("requested mean L1 error")
        ax.set_ylabel("mean predicted tokens")
        ax.set_title(lab)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- the report
def _float_list(text: str, kind: type = float) -> list:
    try:
        vals = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise SystemExit(f"expected a comma-separated list of {kind.__name__}s, got {text!r}") from err
    if not vals:
        raise SystemExit(f"expected a non-empty comma-separated list, got {text!r}")
    return vals


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vtc.eval.report_tokenizers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tokenizers", nargs="+", type=Path, default=None,
                   help="saved tokenizer folders (default: those of assets/tokenizers/ that exist)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("runs/report_tokenizers"))
    p.add_argument("--seed", type=int, default=10_000, help="procedural stream seed (held out: training uses 0)")
    p.add_argument("--per-level", type=int, default=100, help="procedural images per complexity level")
    p.add_argument("--photo-tiles", type=int, default=2, help="each photo's centre square cut into t x t tiles")
    p.add_argument("--photos", default=",".join(PHOTO_NAMES),
                   help="comma-separated skimage.data names ('' for none)")  # fmt: skip
    p.add_argument("--tol", type=float, default=0.05, help="PSNR drop (dB) still counted as monotone")
    p.add_argument("--karl-errors", default=",".join(str(v) for v in DEFAULT_ERRORS),
                   help="requested mean L1 errors for KARL")  # fmt: skip
    p.add_argument("--jpeg-qualities", default=",".join(str(v) for v in DEFAULT_QUALITIES))
    p.add_argument("--row-images", type=int, default=2, help="images per set in recon_row.png")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--fresh", action="store_true", help="ignore and overwrite the measurement cache")
    args = p.parse_args(argv)
    args.karl_errors = _float_list(args.karl_errors)
    if any(e <= 0 for e in args.karl_errors):
        raise SystemExit(f"--karl-errors must be > 0, got {args.karl_errors}")
    args.jpeg_qualities = _float_list(args.jpeg_qualities, int)
    if any(not 0 <= q <= 100 for q in args.jpeg_qualities):
        raise SystemExit(f"--jpeg-qualities must be in [0, 100], got {args.jpeg_qualities}")
    args.photos = [v.strip() for v in args.photos.split(",") if v.strip()]
    if args.tol < 0:
        raise SystemExit(f"--tol={args.tol} must be >= 0 dB")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    return run(args)


@dataclass
class Measured:
    """Everything the tables are built from."""

    entries: list[Entry]
    sets: dict[int, dict[str, ImageSet]]  # image size -> set name -> images
    baselines: dict[int, dict[str, dict[str, np.ndarray]]]  # image size -> set name -> codec arrays
    rows: dict[int, dict[str, list[int]]]  # image size -> set name -> recon_row image indices
    res: dict[str, dict[str, dict[str, np.ndarray]]]  # tokenizer label -> set name -> measure() arrays

    @property
    def set_names(self) -> list[str]:
        first = self.sets[min(self.sets)]
        return [s for s in SETS if s in first]

    def image_set(self, e: Entry, sname: str) -> ImageSet:
        return self.sets[e.model.config.image_size][sname]


def measure_all(args: argparse.Namespace, entries: list[Entry], cache: Path) -> Measured:
    settings = {
        "seed": args.seed, "per_level": args.per_level, "photo_tiles": args.photo_tiles, "photos": args.photos,
        "errors": args.karl_errors, "row_images": args.row_images, "device": args.device, "max_db": MAX_PSNR,
        "batch": args.batch_size,  # the flow decoder's noise is seeded per batch
    }  # fmt: skip
    m = Measured(entries, {}, {}, {}, {})
    for e in entries:
        size = e.model.config.image_size
        if size not in m.sets:
            m.sets[size] = build_image_sets(size, args.per_level, args.seed, args.photo_tiles, args.photos)
            m.baselines[size] = {k: codec_baselines(s, args.jpeg_qualities) for k, s in m.sets[size].items()}
            m.rows[size] = {k: row_indices(s, args.row_images) for k, s in m.sets[size].items()}
        kw = dict(errors=args.karl_errors, batch=args.batch_size, seed=args.seed)
        m.res[e.label] = {
            sname: cached_measure(cache, e, s, settings, rows=m.rows[size][sname], **kw)
            for sname, s in m.sets[size].items()
        }
    return m


TOKENIZER_COLS = ("tokenizer", "method", "path", "tail_dropout", "twin", "image_size", "K", "codebook_size",
                  "bits_per_token", "params", "train_steps")  # fmt: skip
KARL_COLS = ("tokenizer", "set", "error", "n", "len_mean", "len_std", "len_min", "len_max",
             "len_non_increasing_in_error", "reach_frac", "const_len_reach_frac", "n_reached", "spearman_len_png",
             "oracle_len_mean", "reach_at_K", "l1_mean", "psnr_mean", "bits_mean", "feasible_frac", "n_feasible",
             "len_mean_feasible", "reach_feasible", "const_reach_feasible", "const_len_to_match_feasible",
             "len_mean_infeasible")  # fmt: skip
KARL_FEASIBLE_COLS = ("tokenizer", "set", "error", "feasible_frac", "n_feasible", "len_mean_feasible",
                      "reach_feasible", "const_reach_feasible", "const_len_to_match_feasible",
                      "len_mean_infeasible")  # fmt: skip
KARL_SPECS = {"error": "g", "reach_frac": ".3f", "const_len_reach_frac": ".3f", "spearman_len_png": ".3f",
              "reach_at_K": ".3f", "l1_mean": ".4f", "feasible_frac": ".3f", "reach_feasible": ".3f",
              "const_reach_feasible": ".3f"}  # fmt: skip
RD_COLS = ("set", "image_size", "codec", "setting", "bits", "psnr_db")
RD_MD_COLS = ("set", "codec", "setting", "bits", "psnr_db")


def tokenizer_table(m: Measured, tol: float) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per tokenizer: its settings, monotone fractions and (FlexTok) prefix identity per set."""
    rows = []
    for e in m.entries:
        c = e.model.config
        r: dict[str, Any] = {
            "tokenizer": e.label, "method": e.method, "path": str(e.path),
            "tail_dropout": bool(c.tail_dropout), "twin": e.twin, "image_size": c.image_size, "K": c.num_tokens,
            "codebook_size": e.model.quantizer.codebook_size, "bits_per_token": e.bits_per_token,
            "params": e.model.num_params(), "train_steps": _train_steps(e.path),
        }  # fmt: skip
        for sname in m.set_names:
            a = m.res[e.label][sname]
            r[f"monotone_{sname}"] = monotone_fraction(a["psnr"], tol)
            r[f"prefix_ids_identical_{sname}"] = float(a["ids_eq"].mean()) if "ids_eq" in a else None
            r[f"prefix_features_identical_{sname}"] = float(a["feat_eq"].mean()) if "feat_eq" in a else None
        rows.append(r)
    cols = list(TOKENIZER_COLS)
    for sname in m.set_names:
        cols += [f"monotone_{sname}", f"prefix_ids_identical_{sname}", f"prefix_features_identical_{sname}"]
    return rows, cols


def psnr_tables(m: Measured) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Mean PSNR per (tokenizer, set, k) and PSNR per image."""
    k_rows, img_rows = [], []
    for e in m.entries:
        for sname in m.set_names:
            a, s = m.res[e.label][sname], m.image_set(e, sname)
            for j, k in enumerate(a["ks"].tolist()):
                col = a["psnr"][:, j]
                stats = {"psnr_mean": float(col.mean()), "psnr_std": float(col.std()), "n": len(col)}
                k_rows.append({"tokenizer": e.label, "set": sname, "k": k, "bits": k * e.bits_per_token, **stats})
                for i, v in enumerate(col.tolist()):
                    img_rows.append({"tokenizer": e.label, "set": sname, "image": s.names[i],
                                     "level": int(s.levels[i]), "k": k, "psnr": v})  # fmt: skip
    return k_rows, img_rows


def karl_tables(m: Measured) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per (KARL tokenizer, set, requested error): length statistics and reach; mean length per level."""
    karl_rows, level_rows = [], []
    for e in m.entries:
        if e.method != "karl":
            continue
        k_max = e.model.config.num_tokens
        mine = []
        for sname in m.set_names:
            a = m.res[e.label][sname]
            png_bits = m.baselines[e.model.config.image_size][sname]["png_bits"]
            ok_k = a["l1_all"] <= a["karl_errors"][:, None, None]  # [E, N, K] fixed-length path reaches e
            for j, err in enumerate(a["karl_errors"].tolist()):
                lens, l1 = a["karl_lengths"][j].astype(np.float64), a["karl_l1"][j]
                reached = l1 <= err
                reach_by_k = ok_k[j].mean(0)  # [K]
                oracle = np.where(ok_k[j].any(1), ok_k[j].argmax(1) + 1, k_max)
                rho = spearman(lens[reached], png_bits[reached]) if reached.sum() >= 3 else None
                mine.append({
                    "tokenizer": e.label, "set": sname, "error": err, "n": len(lens),
                    "len_mean": float(lens.mean()), "len_std": float(lens.std()), "len_min": int(lens.min()),
                    "len_max": int(lens.max()), "reach_frac": float(reached.mean()),
                    "const_len_reach_frac": constant_length_reach(reach_by_k, float(lens.mean())),
                    "n_reached": int(reached.sum()), "spearman_len_png": rho,
                    "oracle_len_mean": float(oracle.mean()), "reach_at_K": float(reach_by_k[-1]),
                    "l1_mean": float(l1.mean()), "psnr_mean": float(a["karl_psnr"][j].mean()),
                    "bits_mean": float(lens.mean() * e.bits_per_token),
                    **feasible_comparison(a["l1_all"], lens, l1, err),
                })  # fmt: skip
        for sname in m.set_names:  # does the mean length fall as the requested error rises? (measured, per set)
            rows = sorted((r for r in mine if r["set"] == sname), key=lambda r: r["error"])
            means = [r["len_mean"] for r in rows]
            non_inc = all(y <= x for x, y in zip(means[:-1], means[1:], strict=True))
            for r in rows:
                r["len_non_increasing_in_error"] = non_inc
        karl_rows += mine
        res = m.res[e.label]
        for j, err in enumerate(res[m.set_names[0]]["karl_errors"].tolist()):
            lr: dict[str, Any] = {"tokenizer": e.label, "error": err}
            if "procedural" in res:
                lens, levels = res["procedural"]["karl_lengths"][j], m.image_set(e, "procedural").levels
                for lv, name in enumerate(COMPLEXITY_LEVELS):
                    lr[name] = float(lens[levels == lv].mean()) if (levels == lv).any() else None
            if "photos" in res:
                lr["photos"] = float(res["photos"]["karl_lengths"][j].mean())
            level_rows.append(lr)
    return karl_rows, level_rows


def rd_table(
    m: Measured, qualities: Sequence[int], k_rows: list[dict[str, Any]], karl_rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Mean bits per image and mean PSNR: JPEG (file, scan), PNG, raw, each tokenizer per k, KARL adaptive."""
    sizes = sorted(m.sets)

    def tag(sname: str, size: int) -> str:
        return f"{sname}@{size}px" if len(sizes) > 1 else sname

    rows: list[dict[str, Any]] = []
    for size in sizes:
        for sname in m.set_names:
            b, t = m.baselines[size][sname], tag(sname, size)
            for a, q in enumerate(qualities):
                for codec, bits in (("jpeg", b["jpeg_bits"][a]), ("jpeg_scan", b["jpeg_scan_bits"][a])):
                    rows.append({"set": t, "image_size": size, "codec": codec, "setting": f"q={q}",
                                 "bits": float(bits.mean()), "psnr_db": float(b["jpeg_psnr"][a].mean())})  # fmt: skip
            rows.append({"set": t, "image_size": size, "codec": "png", "setting": "lossless",
                         "bits": float(b["png_bits"].mean()), "psnr_db": None})  # fmt: skip
            rows.append({"set": t, "image_size": size, "codec": "raw", "setting": "8-bit RGB",
                         "bits": float(size * size * 24), "psnr_db": None})  # fmt: skip
    for e in m.entries:
        size = e.model.config.image_size
        for sname in m.set_names:
            for r in (r for r in k_rows if r["tokenizer"] == e.label and r["set"] == sname):
                rows.append({"set": tag(sname, size), "image_size": size, "codec": e.label, "setting": f"k={r['k']}",
                             "bits": r["bits"], "psnr_db": r["psnr_mean"]})  # fmt: skip
            for r in (r for r in karl_rows if r["tokenizer"] == e.label and r["set"] == sname):
                rows.append({"set": tag(sname, size), "image_size": size, "codec": f"{e.label} (adaptive)",
                             "setting": f"error={r['error']:g}", "bits": r["bits_mean"],
                             "psnr_db": r["psnr_mean"]})  # fmt: skip
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    if args.fresh and cache.is_dir():
        for f in cache.glob("*.npz"):
            f.unlink()
    entries = load_entries(args.tokenizers if args.tokenizers is not None else default_dirs(), args.device)
    m = measure_all(args, entries, cache)

    tok_rows, tok_cols = tokenizer_table(m, args.tol)
    k_rows, img_rows = psnr_tables(m)
    karl_rows, level_rows = karl_tables(m)
    rd_rows = rd_table(m, args.jpeg_qualities, k_rows, karl_rows)
    _write_csv(out / "tokenizers.csv", tok_rows, tok_cols)
    _write_csv(out / "psnr_vs_k.csv", k_rows, ["tokenizer", "set", "k", "bits", "psnr_mean", "psnr_std", "n"])
    _write_csv(out / "psnr_per_image.csv", img_rows, ["tokenizer", "set", "image", "level", "k", "psnr"])
    _write_csv(out / "rd.csv", rd_rows, RD_COLS)
    if karl_rows:
        _write_csv(out / "karl.csv", karl_rows, KARL_COLS)
        _write_csv(out / "karl_levels.csv", level_rows, ["tokenizer", "error", *COMPLEXITY_LEVELS, "photos"])

    plot_psnr_vs_k(out / "psnr_vs_k.png", entries, m.res, m.set_names)
    rd_sets = sorted({r["set"] for r in rd_rows}, key=lambda t: (SETS.index(t.split("@")[0]), t))
    plot_rd(out / "rd.png", entries, rd_rows, rd_sets)
    size0 = min(m.sets)
    same_size = [e for e in entries if e.model.config.image_size == size0]
    plot_recon_row(out / "recon_row.png", same_size, m.res, m.sets[size0], m.rows[size0])
    if level_rows:
        plot_karl(out / "karl_lengths.png", level_rows)

    md = _markdown(args, m, tok_rows, k_rows, rd_rows, karl_rows, level_rows)
    (out / "report.md").write_text(md)
    print(f"report_tokenizers: {len(entries)} tokenizers, report in {out / 'report.md'}", file=sys.stderr)
    return {"tokenizers": tok_rows, "psnr_vs_k": k_rows, "rd": rd_rows, "karl": karl_rows, "karl_levels": level_rows}


def _markdown(args, m: Measured, tok_rows, k_rows, rd_rows, karl_rows, level_rows) -> str:
    entries, set_names = m.entries, m.set_names
    counts = ", ".join(f"{k}: {len(s.names)}" for k, s in m.sets[min(m.sets)].items())
    parts = [
        "# Tokenizer report: measured properties",
        "",
        f"Images (held out): procedural seed {args.seed}, {args.per_level} per complexity level "
        f"({', '.join(COMPLEXITY_LEVELS)}); skimage photos {args.photos or 'none'} cut into "
        f"{args.photo_tiles}x{args.photo_tiles} tiles. Counts: {counts}. Image sizes: "
        f"{', '.join(f'{s} px' for s in sorted(m.sets))}.",
        f"PSNR: 8-bit reconstructions, MSE floored at (1/255)^2/12 (PSNR <= {MAX_PSNR:.2f} dB), mean over images. "
        f"Monotone: PSNR never drops by more than {args.tol:g} dB from one k to the next. "
        "Bits: k x log2(codebook size) per image. See `python -m vtc.eval.report_tokenizers --help` for the "
        "exact definitions.",
        "",
        "## Tokenizers",
        "",
        md_table(tok_rows, [c for c in TOKENIZER_COLS if c != "path"]),
        "",
    ]
    for sname in set_names:
        rows = []
        ks_all = sorted({r["k"] for r in k_rows if r["set"] == sname})
        for e in entries:
            row: dict[str, Any] = {"tokenizer": e.label}
            for r in k_rows:
                if r["tokenizer"] == e.label and r["set"] == sname:
                    row[f"k={r['k']}"] = r["psnr_mean"]
            row["monotone"] = next(t[f"monotone_{sname}"] for t in tok_rows if t["tokenizer"] == e.label)
            rows.append(row)
        parts += [
            f"## PSNR (dB) vs tokens k: {sname} images",
            "",
            "Ablations (`tail_dropout` False) follow their nested twin. `monotone`: fraction of images whose PSNR "
            f"never drops by more than {args.tol:g} dB as k grows.",
            "",
            md_table(rows, ["tokenizer", *[f"k={k}" for k in ks_all], "monotone"], {"monotone": ".3f"}),
            "",
        ]
    pairs = [(e.twin, e.label) for e in entries if e.ablation and e.twin is not None]
    if pairs:
        mean = {(r["tokenizer"], r["set"], r["k"]): r["psnr_mean"] for r in k_rows}
        rows, ks_all = [], sorted({r["k"] for r in k_rows})
        for twin, abl in pairs:
            for sname in set_names:
                row: dict[str, Any] = {"nested": twin, "ablation": abl, "set": sname}
                for k in ks_all:
                    if (twin, sname, k) in mean and (abl, sname, k) in mean:
                        row[f"k={k}"] = mean[(twin, sname, k)] - mean[(abl, sname, k)]
                rows.append(row)
        parts += [
            "## Tail dropout vs its ablation: nested minus ablation mean PSNR (dB)",
            "",
            md_table(rows, ["nested", "ablation", "set", *[f"k={k}" for k in ks_all]]),
            "",
        ]
    flex = [t for t in tok_rows if t["method"] == "flextok"]
    if flex:
        cols = ["tokenizer"]
        for sname in set_names:
            cols += [f"prefix_ids_identical_{sname}", f"prefix_features_identical_{sname}"]
        parts += [
            "## FlexTok: k-prefix encoded with k vs K registers",
            "",
            "Fraction of (image, k) pairs where `encode(x, num_tokens=k)` equals the first k of `encode(x)`: "
            "token ids, and the pre-quantisation features bit for bit.",
            "",
            md_table(flex, cols, {c: ".4f" for c in cols}),
            "",
        ]
    parts += [
        "## Rate–distortion",
        "",
        "Mean bits per image and mean PSNR. `jpeg`: whole file; `jpeg_scan`: entropy-coded scan bytes only "
        "(no headers or tables); `png`: lossless; `raw`: uncompressed 8-bit RGB. Tokenizer bits do not include "
        "entropy coding. `(adaptive)`: KARL at a requested error, its mean predicted length.",
        "",
        md_table(sorted(rd_rows, key=lambda r: r["set"]), RD_MD_COLS, {"bits": ".1f"}),
        "",
    ]
    if karl_rows:
        parts += [
            "## KARL: predicted lengths for a requested error",
            "",
            "One encoder pass per request. `reach_frac`: images whose reconstruction from the kept tokens has mean "
            "L1 <= the request; `const_len_reach_frac`: the same for a constant length with the same mean (floor/"
            "ceil mix, fixed-length path); `spearman_len_png`: rank correlation of predicted length and PNG size "
            "over the images that reach the request (– below 3 images or for constant lengths); `oracle_len_mean`: "
            "mean smallest fixed-length k that reaches it (K when none); `reach_at_K`: fraction reachable with K "
            "tokens; `len_non_increasing_in_error`: whether the mean length never rises with the request.",
            "",
            md_table(karl_rows, [c for c in KARL_COLS[: KARL_COLS.index("bits_mean")] if c != "n"], KARL_SPECS),
            "",
            "### On the images for which the request is feasible",
            "",
            "An image is feasible for a request when some fixed length k <= K reaches it; on the others no length "
            "does, KARL's halting head then keeps most tokens (`len_mean_infeasible`, the paper's behaviour: no "
            "token halts before the error is met) and a constant length fails the same images, which is why "
            "`const_len_reach_frac` above ties. On the feasible images: `reach_feasible` is the fraction KARL brings "
            "to the error with `len_mean_feasible` tokens on average, `const_reach_feasible` the fraction a constant "
            "length with that same mean reaches, `const_len_to_match_feasible` the smallest constant length that "
            "reaches as many (– when none <= K does).",
            "",
            md_table(karl_rows, KARL_FEASIBLE_COLS, KARL_SPECS),
            "",
            "### Mean predicted length per complexity level (procedural) and for photos",
            "",
            md_table(level_rows, ["tokenizer", "error", *COMPLEXITY_LEVELS, "photos"], {"error": "g"}),
            "",
        ]
    parts += [
        "## Figures",
        "",
        "- `psnr_vs_k.png`: mean PSNR against k (ablations dashed)",
        "- `rd.png`: bits per image against PSNR, tokenizers beside JPEG and PNG",
        "- `recon_row.png`: original, then reconstructions from k = 1, 2, 4, ... tokens",
    ]
    if karl_rows:
        parts.append("- `karl_lengths.png`: KARL's mean predicted length per complexity level against the request")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    main()
