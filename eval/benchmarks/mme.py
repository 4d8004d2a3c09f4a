"""MME (Fu et al., arXiv:2306.13394): 14 yes/no subtasks, two questions per image, scored as acc + acc+.

`create_benchmark("mme", path=..., split="all", limit=None)`; `split` is "all" (or "test"), "perception",
"cognition", or one subtask name. Layouts read from `path`:

- the release folder `MME_Benchmark_release_version/MME_Benchmark/` (`path` may be it or a parent): one
  folder per subtask; artwork, celebrity, landmark, posters and scene keep `images/*.jpg` beside
  `questions_answers_YN/<stem>.txt`, the other subtasks keep `<stem>.png|jpg` and `<stem>.txt` side by
  side; each txt has one `question<TAB>Yes|No` line per question;
- the answer lists of MME's `eval_tool` (`Your_Results/<subtask>.txt`, lines `image<TAB>question<TAB>answer`,
  a fourth prediction column is ignored), with the images under `image_dir=` (the release folder; default
  `path`) as `<subtask>/images/<image>` or `<subtask>/<image>`;
- lmms-lab/MME from the Hub (the lmms-eval `mme` task): `data/test-*.parquet` with columns `question_id`
  (shared by the two questions of an image), `image`, `question`, `answer`, `category`; or a save_to_disk copy.

Prompt as lmms-eval's default: the question without " Please answer yes or no." plus the benchmark
instruction. Predictions are parsed with MME's `eval_tool/calculation.py` rule (also lmms-eval's
`parse_pred_ans`): lowercase, drop ".", then "yes"/"no" exactly, "y"/"n" for one letter, else "yes" or "no"
found in the first 4 characters, else "other" (wrong). Per subtask: acc = question accuracy x 100, acc+ =
fraction of images whose questions are all right x 100, score = acc + acc+; perception = the sum over the 10
perception subtasks present, cognition over the 4 cognition ones. Records are paired by their id
`<subtask>/<image>#<k>`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from .base import Benchmark, Sample, register_benchmark
from .datafiles import (
    IMAGE_SUFFIXES,
    HFTable,
    LazySample,
    LazySamples,
    apply_limit,
    as_path,
    has_hf_files,
    hf_split_files,
    item_images,
)

PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION
YES_NO_SUFFIX = " Please answer yes or no."

LAYOUTS = (
    """\
  release: <path>[/MME_Benchmark_release_version][/MME_Benchmark]/<subtask>/ with either
           images/<stem>.jpg + questions_answers_YN/<stem>.txt, or <stem>.png|jpg + <stem>.txt side by side
           (txt lines: question<TAB>Yes|No); subtasks: """
    + ", ".join(SUBTASKS)
    + """
  eval_tool lists: <path>/<subtask>.txt with lines image<TAB>question<TAB>answer, images under
           image_dir=<release folder>/<subtask>/[images/]<image>
  Hugging Face lmms-lab/MME: <path>/data/test-*.parquet (question_id, image, question, answer, category),
           or a datasets.save_to_disk folder"""
)


def parse_pred(text: str) -> str:
    """MME's answer parser: "yes", "no" or "other"."""
    t = text.lower().strip().replace(".", "")
    if t in ("yes", "no"):
        return t
    if len(t) == 1:
        return {"y": "yes", "n": "no"}.get(t, "other")
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def _find_release(root: Path) -> Path | None:
    for d in (
        root,
        root / "MME_Benchmark",
        root / "MME_Benchmark_release_version",
        root / "MME_Benchmark_release_version" / "MME_Benchmark",
    ):
        if d.is_dir() and any((d / s).is_dir() for s in SUBTASKS):
            return d
    return None


def _image_for(folder: Path, stem: str) -> Path:
    for suf in IMAGE_SUFFIXES:
        if (folder / f"{stem}{suf}").is_file():
            return folder / f"{stem}{suf}"
    raise FileNotFoundError(f"mme: no image named {stem}.<jpg|png|...> in {folder}")


def _read_qa(txt: Path) -> list[tuple[str, str]]:
    out = []
    for line in txt.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 2:
            raise ValueError(f"mme: {txt}: expected 'question<TAB>answer' lines, got {line!r}")
        out.append((parts[0], parts[1].strip()))
    return out


@register_benchmark("mme")
class MME(Benchmark):
    max_new_tokens = 16

    def __init__(
        self,
        path: str | Path | None = None,
        split: str = "all",
        limit: int | None = None,
        image_dir: str | Path | None = None,
    ) -> None:
        if split in ("all", "test"):
            subtasks = list(SUBTASKS)
        elif split == "perception":
            subtasks = list(PERCEPTION)
        elif split == "cognition":
            subtasks = list(COGNITION)
        elif split in SUBTASKS:
            subtasks = [split]
        else:
            raise ValueError(
                f"mme: split must be 'all', 'perception', 'cognition' or a subtask {SUBTASKS}, got {split!r}"
            )
        root = as_path(path, "mme", LAYOUTS)
        self.split = split
        release = _find_release(root)
        if any((root / f"{s}.txt").is_file() for s in SUBTASKS):
            items = self._lists(root, subtasks, Path(image_dir).expanduser() if image_dir else (release or root))
        elif release is not None:
            items = self._release(release, subtasks)
        elif has_hf_files(root):
            items = self._hub(root, subtasks)
        else:
            raise FileNotFoundError(f"mme: no MME files under {root}. Expected one of:\n{LAYOUTS}")
        items = apply_limit(items, limit, "mme")
        super().__init__()
        self.samples = LazySamples(items, self._build)

    @staticmethod
    def _item(sub: str, image_name: str, k: int, question: str, answer: str, **src: object) -> dict:
        return {"id": f"{sub}/{image_name}#{k}", "qtype": sub, "question": question, "answer": answer, **src}

    def _release(self, base: Path, subtasks: list[str]) -> list[dict]:
        items = []
        for sub in subtasks:
            d = base / sub
            if not d.is_dir():
                continue
            split_layout = (d / "questions_answers_YN").is_dir()
            qa_dir, img_dir = (d / "questions_answers_YN", d / "images") if split_layout else (d, d)
            for txt in sorted(qa_dir.glob("*.txt")):
                image = _image_for(img_dir, txt.stem)
                for k, (q, a) in enumerate(_read_qa(txt)):
                    items.append(self._item(sub, image.name, k, q, a, path=image))
        if not items:
            raise FileNotFoundError(f"mme: no question files for {subtasks} under {base}. Expected:\n{LAYOUTS}")
        return items

    def _lists(self, root: Path, subtasks: list[str], image_root: Path) -> list[dict]:
        items = []
        for sub in subtasks:
            txt = root / f"{sub}.txt"
            if not txt.is_file():
                continue
            count: dict[str, int] = defaultdict(int)
            for line in txt.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) < 3:
                    raise ValueError(f"mme: {txt}: expected 'image<TAB>question<TAB>answer' lines, got {line!r}")
                name, q, a = parts[0], parts[1], parts[2].strip()
                cands = [image_root / sub / "images" / name, image_root / sub / name]
                image = next((c for c in cands if c.is_file()), None)
                if image is None:
                    raise FileNotFoundError(
                        f"mme: image {name} of {txt} not found at {' or '.join(map(str, cands))}; "
                        "pass image_dir=<MME_Benchmark release folder>"
                    )
                items.append(self._item(sub, name, count[name], q, a, path=image))
                count[name] += 1
        return items

    def _hub(self, root: Path, subtasks: list[str]) -> list[dict]:
        files = hf_split_files(root, "test")
        if not files:
            raise FileNotFoundError(f"mme: found no split 'test' files under {root}. Expected one of:\n{LAYOUTS}")
        table = HFTable(files, ["question_id", "question", "answer", "category"])
        items = []
        count: dict[str, int] = defaultdict(int)
        wanted = set(subtasks)
        for i, row in enumerate(table.rows):
            sub = row["category"]
            if sub not in wanted:
                continue
            qid = str(row["question_id"])
            name = qid.split("/", 1)[1] if qid.startswith(f"{sub}/") else qid
            items.append(self._item(sub, name, count[qid], row["question"], row["answer"], table=table, row=i))
            count[qid] += 1
        return items

    def _build(self, it: dict) -> Sample:
        answer = it["answer"].lower().strip().replace(".", "")
        return LazySample(
            item_images(it), id=it["id"], question=it["question"].strip(), answer=answer, qtype=it["qtype"]
        )

    def prompt(self, sample: Sample) -> str:
        q = sample.question.replace(YES_NO_SUFFIX, "").replace(YES_NO_SUFFIX.strip(), "").strip()
        return f"{q}\n{self.instruction}"

    def score(self, prediction: str, sample: Sample) -> float:
        return float(parse_pred(prediction) == sample.answer)

    def aggregate(self, records: Sequence[dict]) -> dict[str, float]:
        """ "perception", "cognition", "total" and "<subtask>/{acc,acc_plus,score}" on MME's 0-200 scale."""
        if not records:
            return {}
        by: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in records:
            image = str(r["id"]).rsplit("#", 1)[0]
            by[r.get("qtype", "all")][image].append(float(r["score"]))
        out: dict[str, float] = {"accuracy": sum(float(r["score"]) for r in records) / len(records)}
        totals = {"perception": 0.0, "cognition": 0.0}
        for sub in sorted(by):
            images = by[sub]
            scores = [s for v in images.values() for s in v]
            acc = 100.0 * sum(scores) / len(scores)
            acc_plus = 100.0 * sum(all(s == 1.0 for s in v) for v in images.values()) / len(images)
            out[f"{sub}/acc"], out[f"{sub}/acc_plus"], out[f"{sub}/score"] = acc, acc_plus, acc + acc_plus
            if sub in PERCEPTION:
                totals["perception"] += acc + acc_plus
            elif sub in COGNITION:
                totals["cognition"] += acc + acc_plus
        out.update(totals)
        out["total"] = totals["perception"] + totals["cognition"]
        return out
