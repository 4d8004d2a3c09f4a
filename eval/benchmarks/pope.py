"""POPE (Li et al., EMNLP 2023, arXiv:2305.10355): yes/no object-hallucination probes on COCO val2014.

`create_benchmark("pope", path=..., split="all" | "random" | "popular" | "adversarial", limit=None)` reads:

- the original release (RUCAIBox/POPE `output/coco/`, which LLaVA ships as `playground/data/eval/pope/coco`):
  `coco_pope_{random,popular,adversarial}.json`, JSON lines `{"question_id", "image", "text", "label"}`, plus
  the COCO val2014 images (`image_dir=`, else `<path>/val2014`, `<path>/images`, `<path>/../val2014`);
- lmms-lab/POPE as downloaded from the Hub (the lmms-eval `pope` tasks): columns `question_id`, `question`,
  `answer`, `image`, `category` (+ `id`, `image_source`); the default config `data/test-*.parquet` has one
  split "test" whose `category` is the POPE split, the `Full` config one split per category; or a
  `save_to_disk` copy of either.

Scoring follows POPE's `evaluate.py` and LLaVA's `eval_pope.py` (lmms-eval compares the lowercased text
exactly, so "Yes." would count as wrong there): keep the text before the first ".", drop commas, split on
spaces; the answer is "no" if a word is "No", "no" or "not", otherwise "yes". Per split: accuracy,
precision, recall and F1 with "yes" as the positive class, and yes-ratio = the fraction of *predictions*
that are "yes" (as in POPE and LLaVA; lmms-eval's `pope_yes_ratio` counts the reference answers instead).
`aggregate` also pools all records (lmms-eval's `pope` task scores its 9000 rows that way) and averages
F1/accuracy over the splits present (how LLaVA-1.5 reports POPE F1).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
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
    read_jsonl,
)

SPLITS = ("random", "popular", "adversarial")

LAYOUTS = """\
  original: <path>/coco_pope_{random,popular,adversarial}.json (JSON lines with question_id, image, text,
            label) and COCO val2014 images in image_dir=, <path>/val2014, <path>/images or <path>/../val2014
  Hugging Face lmms-lab/POPE: <path>/data/test-*.parquet (column category = split) or
            <path>/Full/<split>-*.parquet, or a datasets.save_to_disk folder of either"""


def parse_yes_no(text: str) -> str:
    """POPE/LLaVA answer parser: "no" if the first sentence has the word "no", "No" or "not", else "yes".

    The text is stripped first, as LLaVA strips generations before scoring them.
    """
    text = text.strip()
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def binary_metrics(preds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 ("yes" positive) and the predicted yes-ratio."""
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, labels, strict=True))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, labels, strict=True))
    tn = sum(p == "no" and g == "no" for p, g in zip(preds, labels, strict=True))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, labels, strict=True))
    n = len(preds)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
    }


@register_benchmark("pope")
class POPE(Benchmark):
    max_new_tokens = 16

    def __init__(
        self,
        path: str | Path | None = None,
        split: str = "all",
        limit: int | None = None,
        image_dir: str | Path | None = None,
        source: str = "coco",
    ) -> None:
        if split != "all" and split not in SPLITS:
            raise ValueError(f"pope: split must be 'all' or one of {SPLITS}, got {split!r}")
        root = as_path(path, "pope", LAYOUTS)
        self.split = split
        splits = list(SPLITS) if split == "all" else [split]
        files = {s: root / f"{source}_pope_{s}.json" for s in splits}
        if any(f.is_file() for f in files.values()):
            items = self._original(root, files, image_dir)
        elif has_hf_files(root):
            items = self._hub(root, splits)
        else:
            raise FileNotFoundError(f"pope: no POPE files under {root}. Expected one of:\n{LAYOUTS}")
        items = apply_limit(items, limit, "pope")
        self._answers = {it["id"]: it["answer"] for it in items}
        super().__init__()
        self.samples = LazySamples(items, self._build)

    def _original(self, root: Path, files: dict[str, Path], image_dir: str | Path | None) -> list[dict]:
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"pope: missing {', '.join(missing)} (expected layout:\n{LAYOUTS})")
        candidates = (
            [Path(image_dir).expanduser()]
            if image_dir
            else [root / "val2014", root / "images", root.parent / "val2014"]
        )
        img_root = first_existing(candidates, is_dir=True)
        if img_root is None:
            raise FileNotFoundError(
                f"pope: COCO val2014 image folder not found; looked at {', '.join(map(str, candidates))}. "
                "Pass image_dir=<folder with COCO_val2014_*.jpg>."
            )
        items = []
        for s, f in files.items():
            for row in read_jsonl(f):
                items.append(
                    {
                        "id": f"{s}/{row['question_id']}",
                        "question": row["text"],
                        "answer": str(row["label"]).strip().lower(),
                        "split": s,
                        "path": img_root / row["image"],
                        "image_name": row["image"],
                    }
                )
        return items

    def _hub(self, root: Path, splits: list[str]) -> list[dict]:
        cols = ["question_id", "question", "answer", "category", "image_source"]
        per_split = {s: hf_split_files(root, s) for s in splits}
        if all(per_split.values()) and len({tuple(f) for f in per_split.values()}) == len(splits):
            # the `Full` config: one split per POPE split
            sources = [(HFTable(f, cols), {s}) for s, f in per_split.items()]
        else:
            test = hf_split_files(root, "test")
            if not test:
                raise FileNotFoundError(f"pope: found no POPE split files under {root}. Expected one of:\n{LAYOUTS}")
            sources = [(HFTable(test, cols), set(splits))]
        items = []
        for table, allowed in sources:
            for i, row in enumerate(table.rows):
                cat = row.get("category") or (next(iter(allowed)) if len(allowed) == 1 else None)
                if cat is None:
                    raise ValueError(f"pope: {table.files[0]} has no 'category' column to tell the POPE splits apart")
                if cat not in allowed:
                    continue
                items.append(
                    {
                        "id": f"{cat}/{row['question_id']}",
                        "question": row["question"],
                        "answer": str(row["answer"]).strip().lower(),
                        "split": cat,
                        "table": table,
                        "row": i,
                        "image_name": row.get("image_source"),
                    }
                )
        return items

    def _build(self, it: dict) -> Sample:
        return LazySample(
            item_images(it),
            id=it["id"],
            question=it["question"].strip(),
            answer=it["answer"],
            qtype=it["split"],
            meta={"image": it["image_name"]},
        )

    def score(self, prediction: str, sample: Sample) -> float:
        return float(parse_yes_no(prediction) == sample.answer)

    def aggregate(self, records: Sequence[dict]) -> dict[str, float]:
        """Pooled metrics, "<metric>/<split>" per split, and "f1_split_mean"/"accuracy_split_mean".

        The reference answer is looked up by the record's id; for an id this benchmark did not load it is
        recovered from the parsed prediction and the record's 0/1 score.
        """
        if not records:
            return {}
        preds: list[str] = []
        labels: list[str] = []
        by: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        for r in records:
            pred = parse_yes_no(r["pred"])
            label = self._answers.get(r.get("id"))
            if label is None:
                if r["score"] not in (0, 1):
                    raise ValueError(f"pope: record {r.get('id')!r} has score {r['score']!r}; POPE scores are 0 or 1")
                label = pred if r["score"] == 1 else ("no" if pred == "yes" else "yes")
            preds.append(pred)
            labels.append(label)
            by[r.get("qtype", "all")][0].append(pred)
            by[r.get("qtype", "all")][1].append(label)
        out: dict[str, float] = binary_metrics(preds, labels)
        for s in sorted(by):
            for k, v in binary_metrics(*by[s]).items():
                out[f"{k}/{s}"] = v
        if by:
            out["f1_split_mean"] = sum(out[f"f1/{s}"] for s in by) / len(by)
            out["accuracy_split_mean"] = sum(out[f"accuracy/{s}"] for s in by) / len(by)
        return out
