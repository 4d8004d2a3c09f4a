"""ScienceQA-IMG (Lu et al., NeurIPS 2022, arXiv:2209.09513): the multiple-choice questions that have an image.

`create_benchmark("scienceqa_img", path=..., split="test", limit=None)` reads:

- the original release: `problems.json` (pid -> {"question", "choices", "answer" (index), "hint", "image"
  ("image.png" or null), "subject", "grade", ...}) and `pid_splits.json` (split -> [pid, ...]) at `path` or in
  `path/data/scienceqa/`, with the images `images/<split>/<pid>/image.png` (`image_dir=` is the folder that
  holds `<split>/`; default `<path>/images`); the IMG subset is the problems of the split with an image,
  in `pid_splits.json` order (2017 in test);
- lmms-lab/ScienceQA config `ScienceQA-IMG` (the lmms-eval `scienceqa_img` task), `ScienceQA-IMG/<split>-*.parquet`
  with columns `image`, `question`, `choices`, `answer`, `hint`, `subject`, ... (split validation|test; "val"
  is accepted), lmms-lab/ScienceQA-IMG (`data/<split>-*.parquet`), or a save_to_disk copy. Rows without an
  image are dropped here too.

Prompt as lmms-eval's default format: "Context: <hint>\\n" when there is a hint, the question, one "A. choice"
line per option, then "Answer with the option's letter from the given choices directly.". The prediction is
parsed to a letter as LLaVA's `eval_science_qa.py` and lmms-eval's `sqa_process_results` do: the whole
answer is one option letter (either case), or it starts with "<capital letter>.", or it contains "The answer
is <letter>"; anything else, or a letter past the last option, is wrong. Results are grouped by subject.
"""

from __future__ import annotations

import re
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
  original: <path>[/data/scienceqa]/problems.json + pid_splits.json and images <path>/images/<split>/<pid>/image.png
            (or image_dir=<folder holding <split>/>); split train|val|test|minival|minitest
  Hugging Face lmms-lab/ScienceQA: <path>/ScienceQA-IMG/<split>-*.parquet, lmms-lab/ScienceQA-IMG:
            <path>/data/<split>-*.parquet (split validation|test), or a datasets.save_to_disk folder"""

INSTRUCTION = "Answer with the option's letter from the given choices directly."
_ANSWER_IS = re.compile(r"The answer is ([A-Z])")


def letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def parse_choice(prediction: str, n_choices: int) -> str | None:
    """The option letter a prediction names, or None (LLaVA / lmms-eval rules, see the module docstring)."""
    options = letters(n_choices)
    text = prediction.strip()
    if len(text) == 1 and text.upper() in options:
        return text.upper()
    if len(text) >= 2 and text[0].isupper() and text[1] == ".":
        return text[0] if text[0] in options else None
    m = _ANSWER_IS.search(text)
    if m:
        return m.group(1) if m.group(1) in options else None
    return None


@register_benchmark("scienceqa_img")
class ScienceQAImg(Benchmark):
    instruction = INSTRUCTION
    max_new_tokens = 16

    def __init__(
        self,
        path: str | Path | None = None,
        split: str = "test",
        limit: int | None = None,
        image_dir: str | Path | None = None,
    ) -> None:
        root = as_path(path, "scienceqa_img", LAYOUTS)
        self.split = split
        base = first_existing([root / "problems.json", root / "data" / "scienceqa" / "problems.json"])
        if base is not None:
            items = self._original(root, base.parent, split, image_dir, limit)
        elif has_hf_files(root):
            items = self._hub(root, split, limit)
        else:
            raise FileNotFoundError(f"scienceqa_img: no ScienceQA files under {root}. Expected one of:\n{LAYOUTS}")
        super().__init__()
        self.samples = LazySamples(items, self._build)

    def _original(
        self, root: Path, base: Path, split: str, image_dir: str | Path | None, limit: int | None
    ) -> list[dict]:
        short = {"validation": "val"}.get(split, split)
        splits_file = base / "pid_splits.json"
        if not splits_file.is_file():
            raise FileNotFoundError(f"scienceqa_img: {splits_file} is missing (expected layout:\n{LAYOUTS})")
        pid_splits = read_json(splits_file)
        if short not in pid_splits:
            raise ValueError(f"scienceqa_img: split {split!r} is not in {splits_file}; it has {sorted(pid_splits)}")
        candidates = (
            [Path(image_dir).expanduser()] if image_dir else [root / "images", base / "images", root.parent / "images"]
        )
        img_root = first_existing(candidates, is_dir=True)
        if img_root is None:
            raise FileNotFoundError(
                f"scienceqa_img: image folder not found; looked at {', '.join(map(str, candidates))}. "
                "Pass image_dir=<folder holding <split>/<pid>/image.png>."
            )
        problems = read_json(base / "problems.json")
        pids = [str(p) for p in pid_splits[short] if problems[str(p)].get("image")]
        # the mini splits hold pids of train/val/test; the image folder is named after the problem's own split
        return [
            {
                "id": pid,
                **{k: problems[pid].get(k) for k in ("question", "choices", "answer", "hint", "subject", "grade")},
                "path": img_root / problems[pid].get("split", short) / pid / problems[pid]["image"],
            }
            for pid in apply_limit(pids, limit, "scienceqa_img")
        ]

    def _hub(self, root: Path, split: str, limit: int | None) -> list[dict]:
        long = {"val": "validation"}.get(split, split)
        files = hf_split_files(root, long, config="ScienceQA-IMG") or hf_split_files(root, split, "ScienceQA-IMG")
        if not files:
            raise FileNotFoundError(f"scienceqa_img: found no split {long!r} files under {root}. Expected:\n{LAYOUTS}")
        table = HFTable(files, ["question", "choices", "answer", "hint", "subject", "grade"])
        if "image" not in table.columns:
            raise ValueError(f"scienceqa_img: {files[0]} has no 'image' column (columns: {table.columns})")
        rows = [i for i, null in enumerate(table.null_mask("image")) if not null]
        return [
            {"id": f"{long}/{i}", **table.rows[i], "table": table, "row": i}
            for i in apply_limit(rows, limit, "scienceqa_img")
        ]

    def _build(self, it: dict) -> Sample:
        choices = [str(c) for c in it["choices"]]
        return LazySample(
            item_images(it),
            id=it["id"],
            question=it["question"].strip(),
            answer=letters(len(choices))[int(it["answer"])],
            qtype=it.get("subject") or "all",
            choices=choices,
            meta={"hint": it.get("hint") or "", "grade": it.get("grade")},
        )

    def prompt(self, sample: Sample) -> str:
        hint = sample.meta.get("hint") or ""
        context = f"Context: {hint}\n" if hint else ""
        choices = sample.choices or []
        options = "\n".join(f"{k}. {c}" for k, c in zip(letters(len(choices)), choices, strict=True))
        return f"{context}{sample.question}\n{options}\n{self.instruction}"

    def score(self, prediction: str, sample: Sample) -> float:
        return float(parse_choice(prediction, len(sample.choices or [])) == sample.answer)
