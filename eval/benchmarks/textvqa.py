"""TextVQA (Singh et al., CVPR 2019, arXiv:1904.08920): questions that need reading text in the image.

`create_benchmark("textvqa", path=..., split="val", limit=None, ocr=False)` reads:

- the original release: `TextVQA_0.5.1_<split>.json` ({"data": [{"question_id", "question", "image_id",
  "answers": [10 strings], ...}]}) with the images `<image_id>.jpg` in `image_dir=`, else
  `<path>/train_images` (train and val; `train_val_images/train_images` in the zip) or `<path>/test_images`;
  with `ocr=True` the Rosetta tokens come from `TextVQA_Rosetta_OCR_v0.2_<split>.json` beside it;
- lmms-lab/textvqa from the Hub (the lmms-eval `textvqa_val` task): `data/<split>-*.parquet` with columns
  `question_id`, `question`, `image_id`, `image`, `answers`, `ocr_tokens` (split "validation"; "val" is
  accepted), or a save_to_disk copy.

Score: the VQA accuracy of the official evaluation as TextVQA/EvalAI run it (lmms-eval's
`textvqa_process_results`, LLaVA's `m4c_evaluator`): prediction and every human answer go through the
EvalAI answer processor (`vqa_normalize`), then acc = mean over the 10 leave-one-out subsets of 9 answers of
min(#matches / 3, 1). The prompt is the question, "Reference OCR token: t1, t2, ..." when `ocr=True` (the
LLaVA-1.5 TextVQA prompt), and the instruction; lmms-eval's default has no OCR line.
"""

from __future__ import annotations

import re
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
    read_json,
)

LAYOUTS = """\
  original: <path>/TextVQA_0.5.1_<split>.json (split train|val|test) and images <image_id>.jpg in image_dir=,
            <path>/train_images (train, val), <path>/test_images (test) or <path>/train_val_images/train_images
  Hugging Face lmms-lab/textvqa: <path>/data/<split>-*.parquet (split validation|train|test), or a
            datasets.save_to_disk folder"""

# --- the VQA / EvalAI answer normalisation ----------------------------------------------------------------
# Contractions written without an apostrophe are restored. Each entry is the canonical form; every spelling
# with exactly one of its apostrophes missing maps to it (the official table, lowercase entries).
_CANONICAL = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've shouldn't shouldn't've "
    "should've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've 'twas wasn't we'd've weren't we've what'll what're what's what've when's where'd where's "
    "where've who'd who'd've who'll who's who've why'll why're why's won't wouldn't wouldn't've would've "
    "y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()
CONTRACTIONS = {
    c[:i] + c[i + 1 :]: c for c in _CANONICAL for i, ch in enumerate(c) if ch == "'"
}  # fmt: skip
CONTRACTIONS["somebody'd"] = "somebodyd"  # sic: the official table maps this one the other way
NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD = re.compile(r"\.(?!\d)")


def vqa_normalize(answer: str) -> str:
    """The EvalAI / VQA answer processor (punctuation, digits, articles, contractions)."""
    t = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    t = t.replace("\n", " ").replace("\t", " ").strip()
    src = t
    for p in PUNCTUATION:
        # next to a space (or in a text with a digit-comma-digit) the mark is deleted, elsewhere it splits words
        if p + " " in src or " " + p in src or _DIGIT_COMMA.search(src) is not None:
            t = t.replace(p, "")
        else:
            t = t.replace(p, " ")
    t = _PERIOD.sub("", t, count=32)  # periods not before a digit; the official call passes re.UNICODE (32) as count
    words = [NUMBERS.get(w, w) for w in t.split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the leave-one-out subsets of the human answers of min(#equal to the prediction / 3, 1)."""
    pred = vqa_normalize(prediction)
    gts = [vqa_normalize(a) for a in answers]
    if not gts:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    total = sum(gt == pred for gt in gts)
    # leaving out answer i removes one match iff answer i equals the prediction
    return sum(min(1.0, (total - (gt == pred)) / 3.0) for gt in gts) / len(gts)


@register_benchmark("textvqa")
class TextVQA(Benchmark):
    max_new_tokens = 16

    def __init__(
        self,
        path: str | Path | None = None,
        split: str = "val",
        limit: int | None = None,
        image_dir: str | Path | None = None,
        ocr: bool = False,
    ) -> None:
        root = as_path(path, "textvqa", LAYOUTS)
        short = {"validation": "val"}.get(split, split)
        self.split, self.ocr = split, ocr
        qfile = root / f"TextVQA_0.5.1_{short}.json"
        if qfile.is_file():
            items = self._original(root, qfile, short, image_dir, limit)
        elif has_hf_files(root):
            items = self._hub(root, split, limit)
        else:
            raise FileNotFoundError(
                f"textvqa: no TextVQA files for split {split!r} under {root}. Expected:\n{LAYOUTS}"
            )
        super().__init__()
        self.samples = LazySamples(items, self._build)

    def _original(
        self, root: Path, qfile: Path, split: str, image_dir: str | Path | None, limit: int | None
    ) -> list[dict]:
        folder = "test_images" if split == "test" else "train_images"
        candidates = (
            [Path(image_dir).expanduser()]
            if image_dir
            else [root / folder, root / "train_val_images" / folder, root.parent / folder]
        )
        img_root = first_existing(candidates, is_dir=True)
        if img_root is None:
            raise FileNotFoundError(
                f"textvqa: image folder not found; looked at {', '.join(map(str, candidates))}. "
                "Pass image_dir=<folder with <image_id>.jpg>."
            )
        data = apply_limit(read_json(qfile)["data"], limit, "textvqa")
        ocr_tokens: dict[str, list[str]] = {}
        if self.ocr:
            ocr_file = root / f"TextVQA_Rosetta_OCR_v0.2_{split}.json"
            if not ocr_file.is_file():
                raise FileNotFoundError(f"textvqa: ocr=True needs {ocr_file} (Rosetta OCR tokens of the split)")
            ocr_tokens = {str(d["image_id"]): d["ocr_tokens"] for d in read_json(ocr_file)["data"]}
        return [
            {
                "id": str(d["question_id"]),
                "question": d["question"],
                "answers": d.get("answers"),
                "image_id": str(d["image_id"]),
                "ocr_tokens": ocr_tokens.get(str(d["image_id"]), d.get("ocr_tokens")),
                "path": img_root / f"{d['image_id']}.jpg",
            }
            for d in data
        ]

    def _hub(self, root: Path, split: str, limit: int | None) -> list[dict]:
        long = {"val": "validation"}.get(split, split)
        files = hf_split_files(root, long) or hf_split_files(root, split)
        if not files:
            raise FileNotFoundError(
                f"textvqa: found no split {long!r} files under {root}. Expected one of:\n{LAYOUTS}"
            )
        table = HFTable(files, ["question_id", "question", "image_id", "answers", "ocr_tokens"])
        return [
            {
                "id": str(r["question_id"]),
                "question": r["question"],
                "answers": r.get("answers"),
                "image_id": str(r.get("image_id")),
                "ocr_tokens": r.get("ocr_tokens"),
                "table": table,
                "row": i,
            }
            for i, r in enumerate(apply_limit(table.rows, limit, "textvqa"))
        ]

    def _build(self, it: dict) -> Sample:
        return LazySample(
            item_images(it),
            id=it["id"],
            question=it["question"].strip(),
            answer=list(it["answers"] or []),
            meta={"image_id": it["image_id"], "ocr_tokens": it["ocr_tokens"]},
        )

    def prompt(self, sample: Sample) -> str:
        text = sample.question
        if self.ocr:
            tokens = sample.meta.get("ocr_tokens")
            if tokens is None:
                raise ValueError(f"textvqa: ocr=True but sample {sample.id} has no OCR tokens in the files")
            text += f"\nReference OCR token: {', '.join(tokens)}"
        return f"{text}\n{self.instruction}"

    def score(self, prediction: str, sample: Sample) -> float:
        if not sample.answer:
            raise ValueError(f"textvqa: sample {sample.id} has no reference answers (the test split has none)")
        return vqa_accuracy(prediction, sample.answer)
