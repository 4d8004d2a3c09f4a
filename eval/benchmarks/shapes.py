"""`vtc-shapes`: a procedural benchmark whose questions need visual detail, rendered with OpenCV.

Scenes are 2-6 small coloured shapes (and, in half of them, one printed letter on a white tag) on a noisy grey
background, so most visual tokens are background. Everything is a pure function of a seed: the held-out test split is
fixed (seeds from `TEST_SEED`), training draws from a disjoint seed range.

Question types (single-word answers unless noted):
    existence  "is there a red circle ?"               yes / no — negatives are adversarial as in POPE: a colour and a
                                                       shape that are both in the scene, never together
    count      "how many blue objects are there ?"     zero ... six (normalised to digits when scored)
    colour     "what colour is the square ?"           the colour of the only square
    shape      "what shape is the green object ?"      the shape of the only green object
    spatial    "where is the red circle relative to the blue square ?"   left / right / above / below
    text       "what letter is written in the image ?"  the letter (as TextVQA, reading rendered characters)

Variants: `base` (192 x 192), `hires` (384 x 384, the same pixel-sized objects, 3-8 of them: input for AnyRes models),
`video` (4 frames of 192 x 192; objects appear in one frame each; "in which frame is there a red circle ?" → first ...
fourth, "which came first , the red circle or the blue square ?" → "red circle").

`Scene.label_maps(grid)` gives the dense per-cell targets (colour, shape, letter, object centre) used to pretrain the
vision towers of the tiny VLMs (`vtc train vlm`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .base import Benchmark, Sample, register_benchmark

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 215, 45),
    "purple": (150, 55, 190),
    "orange": (245, 140, 30),
}
SHAPES = ["circle", "square", "triangle", "cross"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
LETTERS = list("bcehkmprtx")  # no "a": normalisation drops articles
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six"]
ORDINALS = ["first", "second", "third", "fourth"]
RELATIONS = ["left", "right", "above", "below"]
QTYPES = ("existence", "count", "colour", "shape", "spatial", "text")
VIDEO_QTYPES = ("frame", "order")
TEST_SEED = 10**9  # test samples use seeds TEST_SEED + i; training uses seeds < TEST_SEED
# size, min objects, max objects, object radius range (px), letter-tag side range (px)
VARIANTS = {
    "base": (192, 2, 6, (7.0, 11.5), (22, 27)),
    "hires": (384, 3, 8, (7.0, 11.5), (22, 27)),
    "video": (192, 2, 4, (7.0, 11.5), (22, 27)),
    # crowded scenes with 2-4 letter tags, for the tiny VLMs' dense vision pretraining (4x the labelled cells)
    "dense": (192, 12, 18, (7.0, 11.5), (22, 27)),
}
BENCH_SEEDS = {"base": 0, "hires": 3 * 10**7, "video": 6 * 10**7}  # the benchmark variants' seed offsets


@dataclass
class Obj:
    colour: str
    shape: str
    cx: float
    cy: float
    r: float
    frame: int = 0

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    size: int
    objects: list[Obj]
    letter: str | None = None
    letter_box: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1
    frames: int = 1
    seed: int = 0
    extra_letters: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)  # "dense" variant
    _bg: np.ndarray | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ rendering
    def render(self, frame: int | None = None) -> np.ndarray:
        """RGB uint8 [S, S, 3]; for video scenes, only the objects of `frame` (default 0) are drawn."""
        import cv2

        img = self._background().copy()
        for o in self.objects:
            if self.frames > 1 and o.frame != (frame or 0):
                continue
            _draw(img, o, cv2)
        if self.frames == 1 or (frame or 0) == 0:
            for letter, (x0, y0, x1, y1) in self.tags():
                cv2.rectangle(img, (x0, y0), (x1, y1), (250, 250, 250), -1)
                scale = (y1 - y0) / 30.0
                (tw, th), _ = cv2.getTextSize(letter.upper(), cv2.FONT_HERSHEY_SIMPLEX, scale, 2)
                org = (x0 + (x1 - x0 - tw) // 2, y0 + (y1 - y0 + th) // 2)
                cv2.putText(img, letter.upper(), org, cv2.FONT_HERSHEY_SIMPLEX, scale, (10, 10, 10), 2, cv2.LINE_AA)
        return img

    def tags(self) -> list[tuple[str, tuple[int, int, int, int]]]:
        """Every letter tag (letter, box): the question-able one first, then the "dense" variant's extras."""
        first = [(self.letter, self.letter_box)] if self.letter is not None else []
        return first + list(self.extra_letters)

    def images(self) -> list[np.ndarray]:
        return [self.render(f) for f in range(self.frames)]

    def _background(self) -> np.ndarray:
        if self._bg is None:
            rng = np.random.default_rng(self.seed + 7)
            base = rng.uniform(95, 150)
            yy, xx = np.mgrid[0 : self.size, 0 : self.size] / self.size
            grad = rng.uniform(-20, 20) * xx + rng.uniform(-20, 20) * yy
            noise = rng.normal(0, 9, (self.size, self.size, 3))
            self._bg = np.clip(base + grad[..., None] + noise, 0, 255).astype(np.uint8)
        return self._bg

    # ------------------------------------------------------------------ dense targets
    def pixel_map(self, frame: int = 0) -> np.ndarray:
        """`[S, S]` int32: which object each pixel shows (i + 1 for object i, len(objects) + 1 + j for letter tag j,
        0 for background)."""
        import cv2

        ids = np.zeros((self.size, self.size), np.int32)
        for i, o in enumerate(self.objects):
            if self.frames > 1 and o.frame != frame:
                continue
            _draw(ids, o, cv2, value=i + 1)
        if self.frames == 1 or frame == 0:
            for j, (_, (x0, y0, x1, y1)) in enumerate(self.tags()):
                ids[y0 : y1 + 1, x0 : x1 + 1] = len(self.objects) + 1 + j
        return ids

    def object_map(self, grid: int, frame: int = 0) -> np.ndarray:
        """`[grid, grid]` int: the object covering most of each cell (i + 1 for object i, len(objects) + 1 + j for
        letter tag j, 0 for background) if it covers >= 20% of the cell."""
        ids = self.pixel_map(frame)
        cell = self.size / grid
        out = np.zeros((grid, grid), np.int64)
        for gy in range(grid):
            for gx in range(grid):
                block = ids[int(gy * cell) : int((gy + 1) * cell), int(gx * cell) : int((gx + 1) * cell)].ravel()
                vals, counts = np.unique(block[block > 0], return_counts=True)
                if len(vals) and counts.max() >= 0.2 * block.size:
                    out[gy, gx] = int(vals[counts.argmax()])
        return out

    def label_maps(self, grid: int, frame: int = 0) -> dict[str, np.ndarray]:
        """Per-cell targets on a `grid` x `grid` partition: colour/shape/letter index (0 = none) and centre flag."""
        ids = self.object_map(grid, frame)
        colour = np.zeros((grid, grid), np.int64)
        shape = np.zeros((grid, grid), np.int64)
        letter = np.zeros((grid, grid), np.int64)
        centre = np.zeros((grid, grid), np.int64)
        for i, o in enumerate(self.objects):
            colour[ids == i + 1] = list(COLOURS).index(o.colour) + 1
            shape[ids == i + 1] = SHAPES.index(o.shape) + 1
        for j, (ch, _) in enumerate(self.tags()):
            letter[ids == len(self.objects) + 1 + j] = LETTERS.index(ch) + 1
        cell = self.size / grid
        for o in self.objects:
            if self.frames > 1 and o.frame != frame:
                continue
            centre[min(int(o.cy / cell), grid - 1), min(int(o.cx / cell), grid - 1)] = 1
        return {"colour": colour, "shape": shape, "letter": letter, "centre": centre}

    def referred(self, question: str) -> list[int]:
        """Indices of the objects a question is about (len(objects) for the letter tag): what the answer must look
        at. Existence: every object sharing the asked colour or shape (the candidates, decoys included)."""
        w = question.split()
        objs = self.objects
        if question.startswith("is there"):
            return [i for i, o in enumerate(objs) if o.colour == w[3] or o.shape == w[4]]
        if question.startswith("how many"):
            word = w[2]
            return [i for i, o in enumerate(objs) if word in (o.colour, PLURAL[o.shape])]
        if question.startswith("what colour"):
            return [i for i, o in enumerate(objs) if o.shape == w[-2]]
        if question.startswith("what shape"):
            return [i for i, o in enumerate(objs) if o.colour == w[-3]]
        if question.startswith("where is"):
            a, b = " ".join(w[3:5]), " ".join(w[-3:-1])
            return [i for i, o in enumerate(objs) if o.name in (a, b)]
        if question.startswith("what letter"):
            return [len(objs)] if self.letter is not None else []
        return []


def _draw(img: np.ndarray, o: Obj, cv2, value=None) -> None:
    col = COLOURS[o.colour] if value is None else int(value)
    cx, cy, r = int(round(o.cx)), int(round(o.cy)), int(round(o.r))
    aa = cv2.LINE_AA if value is None else cv2.LINE_8
    if o.shape == "circle":
        cv2.circle(img, (cx, cy), r, col, -1, aa)
    elif o.shape == "square":
        h = int(round(r * 0.85))
        cv2.rectangle(img, (cx - h, cy - h), (cx + h, cy + h), col, -1)
    elif o.shape == "triangle":
        pts = np.array([[cx, cy - r], [cx - r, cy + int(0.8 * r)], [cx + r, cy + int(0.8 * r)]], np.int32)
        cv2.fillPoly(img, [pts], col, aa)
    elif o.shape == "cross":
        t = max(2, int(round(r * 0.35)))
        cv2.rectangle(img, (cx - r, cy - t), (cx + r, cy + t), col, -1)
        cv2.rectangle(img, (cx - t, cy - r), (cx + t, cy + r), col, -1)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(o.shape)


def make_scene(seed: int, variant: str = "base") -> Scene:
    """The scene of one seed: deterministic, non-overlapping objects, a letter tag in half of the scenes (2-4 tags
    in the "dense" pretraining variant)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown vtc-shapes variant {variant!r}; choose one of {sorted(VARIANTS)}")
    size, lo, hi, (r_lo, r_hi), (s_lo, s_hi) = VARIANTS[variant]
    rng = np.random.default_rng(seed)
    frames = 4 if variant == "video" else 1
    n = int(rng.integers(lo, hi + 1))
    if variant == "video":
        n = 4  # one object per frame, in a random order of appearance
    boxes: list[tuple[float, float, float]] = []
    tags: list[tuple[str, tuple[int, int, int, int]]] = []
    if variant == "dense":
        n_tags = int(rng.integers(2, 5))
    else:
        n_tags = int(variant != "video" and rng.random() < 0.5)
    for _ in range(n_tags):
        letter = str(rng.choice(LETTERS))
        side = int(rng.integers(s_lo, s_hi))
        for _ in range(100):
            x0, y0 = (int(v) for v in rng.integers(4, size - side - 4, 2))
            c = (x0 + side / 2, y0 + side / 2, side * 0.75)
            if all(np.hypot(c[0] - b[0], c[1] - b[1]) > c[2] + b[2] + 3 for b in boxes):
                boxes.append(c)
                tags.append((letter, (x0, y0, x0 + side, y0 + side)))
                break
    objects: list[Obj] = []
    order = rng.permutation(4) if variant == "video" else None
    for i in range(n):
        for _ in range(200):
            r = float(rng.uniform(r_lo, r_hi))
            cx, cy = (float(v) for v in rng.uniform(r + 3, size - r - 3, 2))
            if all(np.hypot(cx - b[0], cy - b[1]) > r + b[2] + 4 for b in boxes):
                break
        else:
            continue
        boxes.append((cx, cy, r))
        frame = int(order[i]) if order is not None else 0
        objects.append(Obj(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), cx, cy, r, frame))
    if variant == "video":  # distinct names so temporal questions are unambiguous
        seen: set[str] = set()
        for o in objects:
            while o.name in seen:
                o.colour = str(rng.choice(list(COLOURS)))
            seen.add(o.name)
    letter, letter_box = tags[0] if tags else (None, None)
    return Scene(size, objects, letter, letter_box, frames, seed, extra_letters=tags[1:])


# ---------------------------------------------------------------------- questions
def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """One (question, answer) of `qtype` about `scene`, or None when the scene cannot support that type."""
    objs = scene.objects
    colours = [o.colour for o in objs]
    shapes = [o.shape for o in objs]
    names = [o.name for o in objs]
    if qtype == "existence":
        if rng.random() < 0.5 and objs:
            o = objs[int(rng.integers(len(objs)))]
            return f"is there a {o.colour} {o.shape} ?", "yes"
        # adversarial negative (POPE): colour and shape both present, never together
        cands = [f"{c} {s}" for c in set(colours) for s in set(shapes) if f"{c} {s}" not in names]
        if not cands:
            cands = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in names]
        name = sorted(cands)[int(rng.integers(len(cands)))]
        return f"is there a {name} ?", "no"
    if qtype == "count":
        if rng.random() < 0.5:
            c = str(rng.choice(list(COLOURS))) if rng.random() < 0.15 else colours[int(rng.integers(len(objs)))]
            return f"how many {c} objects are there ?", NUMBERS[colours.count(c)]
        s = str(rng.choice(SHAPES)) if rng.random() < 0.15 else shapes[int(rng.integers(len(objs)))]
        return f"how many {PLURAL[s]} are there ?", NUMBERS[shapes.count(s)]
    if qtype == "colour":
        uniq = sorted(s for s in set(shapes) if shapes.count(s) == 1)
        if not uniq:
            return None
        s = uniq[int(rng.integers(len(uniq)))]
        return f"what colour is the {s} ?", colours[shapes.index(s)]
    if qtype == "shape":
        uniq = sorted(c for c in set(colours) if colours.count(c) == 1)
        if not uniq:
            return None
        c = uniq[int(rng.integers(len(uniq)))]
        return f"what shape is the {c} object ?", shapes[colours.index(c)]
    if qtype == "spatial":
        ok = [o for o in objs if names.count(o.name) == 1]
        pairs = []
        for a in ok:
            for b in ok:
                dx, dy = a.cx - b.cx, a.cy - b.cy
                if a is b or max(abs(dx), abs(dy)) < 1.5 * min(abs(dx), abs(dy)) + 8:
                    continue
                rel = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
                pairs.append((a, b, rel))
        if not pairs:
            return None
        a, b, rel = pairs[int(rng.integers(len(pairs)))]
        return f"where is the {a.name} relative to the {b.name} ?", rel
    if qtype == "text":
        if scene.letter is None:
            return None
        return "what letter is written in the image ?", scene.letter
    if qtype == "frame":
        o = objs[int(rng.integers(len(objs)))]
        return f"in which frame is there a {o.name} ?", ORDINALS[o.frame]
    if qtype == "order":
        i, j = rng.choice(len(objs), 2, replace=False)
        a, b = objs[int(i)], objs[int(j)]
        return f"which came first , the {a.name} or the {b.name} ?", (a if a.frame < b.frame else b).name
    raise ValueError(f"unknown vtc-shapes question type {qtype!r}; choose from {QTYPES + VIDEO_QTYPES}")


def vocabulary() -> list[str]:
    """Every word that questions and answers of any variant use (for the tiny models' word-level tokenizer)."""
    words = set(COLOURS) | set(SHAPES) | set(PLURAL.values()) | set(LETTERS) | set(NUMBERS) | set(ORDINALS)
    words |= set(RELATIONS) | {"yes", "no"}
    for q in (
        "is there a ? how many objects are there what colour is the shape object where relative to",
        "letter written in image which frame came first , or",
    ):
        words |= set(q.split())
    return sorted(words)


@register_benchmark("shapes")
class ShapesBenchmark(Benchmark):
    """The fixed vtc-shapes split: `per_type` questions of each type, one question per scene.

    split="test" uses seeds from TEST_SEED (held out from training); split="val" a second disjoint range.
    """

    name = "shapes"
    instruction = ""  # the tiny models are trained on bare questions
    max_new_tokens = 3

    def __init__(self, split: str = "test", variant: str = "base", per_type: int = 100, limit: int | None = None):
        if split not in ("test", "val"):
            raise ValueError(f"vtc-shapes split {split!r} is not one of 'test', 'val'")
        if per_type < 1:
            raise ValueError(f"per_type must be >= 1, got {per_type}")
        if variant not in BENCH_SEEDS:
            raise ValueError(
                f"vtc-shapes benchmark variant {variant!r} is not one of {sorted(BENCH_SEEDS)} ('dense' scenes are "
                "for the tiny VLMs' vision pretraining only)"
            )
        qtypes = VIDEO_QTYPES if variant == "video" else QTYPES
        base = TEST_SEED if split == "test" else TEST_SEED + 10**8
        base += BENCH_SEEDS[variant]
        samples: list[Sample] = []
        seed = base
        for qtype in qtypes:
            got = 0
            while got < per_type:
                scene = make_scene(seed, variant)
                qa = ask(scene, qtype, np.random.default_rng(seed + 1))
                if qa is not None:
                    samples.append(_LazySample(f"{variant}-{seed}", scene, qa[0], qa[1], qtype))
                    got += 1
                seed += 1
        # interleave types so that any prefix (limit=...) covers every type
        by_type = [[s for s in samples if s.qtype == t] for t in qtypes]
        samples = [s for group in zip(*by_type, strict=True) for s in group]
        super().__init__(samples[:limit] if limit else samples)
        self.variant = variant
        self.split = split


class _LazySample(Sample):
    """A Sample whose images are rendered on first access (rendering 600 scenes up front is wasted time)."""

    def __init__(self, sid: str, scene: Scene, question: str, answer: str, qtype: str) -> None:
        super().__init__(sid, [], question, answer, qtype, None, {"seed": scene.seed})
        self.scene = scene

    @property
    def images(self):  # type: ignore[override]
        from PIL import Image

        return [Image.fromarray(a) for a in self.scene.images()]

    @images.setter
    def images(self, value) -> None:  # dataclass __init__ assigns it
        pass
