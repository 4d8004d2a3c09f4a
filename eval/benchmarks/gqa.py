"""GQA (Hudson & Manning, CVPR 2019, arXiv:1902.09506): compositional questions on Visual Genome images.

`create_benchmark("gqa", path=..., split="testdev_balanced", limit=None)` reads:

- the original release: `<split>_questions.json` (a dict question id -> {"imageId", "question", "answer",
  "types": {"structural", "semantic", "detailed"}, ...}) at `path` or in `path/questions1.2/`, with the
  images `images/<imageId>.jpg` (`image_dir=`, else `<path>/images`, `<path>/../images`);
- lmms-lab/GQA from the Hub (the lmms-eval `gqa` task): the configs `<split>_instructions` (columns `id`,
  `imageId`, `question`, `answer`, `types`, ...) and `<split>_images` (columns `id`, `image`), each a
  folder of `<s>-*.parquet` where `<s>` is the part of `split` before "_" (e.g. "testdev"), or
  `save_to_disk` copies of those two configs.

Score: exact match after lowercasing, removing every ASCII punctuation character and surrounding space, as
lmms-eval's `exact_match` with `ignore_case` and `ignore_punctuation` (the official GQA `eval.py` compares
the strings exactly; LLaVA strips a final "." and lowercases first). Results are grouped by the structural
type (verify, query, choose, logical, compare) when the files have `types`.
"""

from __future__ import annotations

import string
from pathlib import Path

from .base import Benchmark, Sample, register_benchmark
from .datafiles import (
    HFTable,
    LazySample,
    LazySamples,
    apply_limit,
    as_path,
    first_existing,
    has_hf_files,
    hf_split_files,
    item_images,
    read_json,
)

LAYOUTS = """\
  original: <path>[/questions1.2]/<split>_questions.json (e.g. testdev_balanced_questions.json) and images
            <imageId>.jpg in image_dir=, <path>/images or <path>/../images
  Hugging Face lmms-lab/GQA: <path>/<split>_instructions/<s>-*.parquet and <path>/<split>_images/<s>-*.parquet
            (<s> = split before '_', e.g. testdev), or datasets.save_to_disk folders with those names"""

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_gqa(text: str) -> str:
    """Lowercase, drop ASCII punctuation, trim (lmms-eval exact_match with ignore_case/ignore_punctuation)."""
    return text.lower().translate(_PUNCT).strip()


@register_benchmark("gqa")
class GQA(Benchmark):
    max_new_tokens = 16

    def __init__(
        self,
        path: str | Path | None = None,
        split: str = "testdev_balanced",
        limit: int | None = None,
        image_dir: str | Path | None = None,
    ) -> None:
        root = as_path(path, "gqa", LAYOUTS)
        self.split = split
        qfile = first_existing([root / f"{split}_questions.json", root / "questions1.2" / f"{split}_questions.json"])
        if qfile is not None:
            items = self._original(root, qfile, image_dir, limit)
        elif has_hf_files(root):
            items = self._hub(root, split, limit)
        else:
            raise FileNotFoundError(f"gqa: no GQA files for split {split!r} under {root}. Expected one of:\n{LAYOUTS}")
        super().__init__()
        self.samples = LazySamples(items, self._build)

    def _original(self, root: Path, qfile: Path, image_dir: str | Path | None, limit: int | None) -> list[dict]:
        candidates = [Path(image_dir).expanduser()] if image_dir else [root / "images", root.parent / "images"]
        img_root = first_existing(candidates, is_dir=True)
        if img_root is None:
            raise FileNotFoundError(
                f"gqa: image folder not found; looked at {', '.join(map(str, candidates))}. "
                "Pass image_dir=<folder with <imageId>.jpg>."
            )
        questions = read_json(qfile)
        items = []
        for qid, q in apply_limit(list(questions.items()), limit, "gqa"):
            items.append(
                {
                    "id": str(qid),
                    "question": q["question"],
                    "answer": q["answer"],
                    "types": q.get("types") or {},
                    "image_id": q["imageId"],
                    "path": img_root / f"{q['imageId']}.jpg",
                }
            )
        return items

    def _hub(self, root: Path, split: str, limit: int | None) -> list[dict]:
        hf_split = split.split("_")[0]
        qfiles = hf_split_files(root, hf_split, config=f"{split}_instructions")
        ifiles = hf_split_files(root, hf_split, config=f"{split}_images")
        if not (root / f"{split}_instructions").is_dir() or not qfiles:
            raise FileNotFoundError(
                f"gqa: no {split}_instructions/{hf_split}-*.parquet (or save_to_disk) under {root}. "
                f"Expected one of:\n{LAYOUTS}"
            )
        if not (root / f"{split}_images").is_dir() or not ifiles:
            raise FileNotFoundError(f"gqa: no {split}_images/{hf_split}-*.parquet (or save_to_disk) under {root}")
        questions = HFTable(qfiles, ["id", "imageId", "question", "answer", "types"])
        images = HFTable(ifiles, ["id"])
        row_of = {str(r["id"]): i for i, r in enumerate(images.rows)}
        items = []
        for r in apply_limit(questions.rows, limit, "gqa"):
            image_id = str(r["imageId"])
            if image_id not in row_of:
                raise KeyError(f"gqa: image {image_id!r} of question {r['id']!r} is not in {split}_images")
            items.append(
                {
                    "id": str(r["id"]),
                    "question": r["question"],
                    "answer": r["answer"],
                    "types": r.get("types") or {},
                    "image_id": image_id,
                    "table": images,
                    "row": row_of[image_id],
                }
            )
        return items

    def _build(self, it: dict) -> Sample:
        types = it["types"]
        return LazySample(
            item_images(it),
            id=it["id"],
            question=it["question"].strip(),
            answer=it["answer"],
            qtype=types.get("structural") or "all",
            meta={"image_id": it["image_id"], "semantic": types.get("semantic"), "detailed": types.get("detailed")},
        )

    def score(self, prediction: str, sample: Sample) -> float:
        return float(normalize_gqa(prediction) == normalize_gqa(str(sample.answer)))
