"""The benchmark interface shared by `vtc-shapes` and the real benchmark loaders.

A benchmark is an indexable collection of `Sample`s plus its official metric:

    bench = create_benchmark("pope", path="~/data/pope", split="adversarial", limit=500)
    s = bench[0]                                  # Sample(id, images, question, answer, qtype, ...)
    prompt = bench.prompt(s)                      # question text with the benchmark's answer instruction
    score = bench.score(prediction, s)            # per-sample score in [0, 1]
    summary = bench.aggregate(records)            # official metric(s) over [{"id", "qtype", "pred", "score"}, ...]

Loaders read local files in the published formats (JSON/JSONL/TSV/parquet as released, or a `datasets`
`save_to_disk` / hub-style parquet folder). Nothing here downloads anything.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vtc.registry import Registry

BENCHMARKS = Registry("benchmark", "vtc.eval.benchmarks.list_benchmarks()")


@dataclass
class Sample:
    """One question about one image (or several: frames of a video, in order).

    images: PIL images (RGB). answer: the reference answer, or every annotator answer (TextVQA: 10).
    qtype: the category that per-type results are grouped by (POPE split, MME subtask, shapes question type).
    choices: options for multiple-choice benchmarks (ScienceQA), else None.
    """

    id: str
    images: list[Any]
    question: str
    answer: str | list[str]
    qtype: str = "all"
    choices: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Benchmark:
    """Base class: subclasses fill `self.samples` (or override `__len__`/`__getitem__`) and the metric."""

    name: str = "benchmark"
    #: words the model is told to answer with; appended to the question by `prompt`.
    instruction: str = "Answer the question using a single word or phrase."
    #: generation length the harness uses for this benchmark.
    max_new_tokens: int = 8

    def __init__(self, samples: Sequence[Sample] | None = None) -> None:
        self.samples: Sequence[Sample] = list(samples or [])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def prompt(self, sample: Sample) -> str:
        return f"{sample.question}\n{self.instruction}" if self.instruction else sample.question

    def score(self, prediction: str, sample: Sample) -> float:
        """Per-sample score in [0, 1]; default exact match after `normalize_answer`."""
        ref = sample.answer if isinstance(sample.answer, str) else sample.answer[0]
        return float(normalize_answer(prediction) == normalize_answer(ref))

    def aggregate(self, records: Sequence[dict]) -> dict[str, float]:
        """Official summary metric(s) from per-sample records (each has "id", "qtype", "pred", "score").

        Default: overall mean score as "accuracy" plus "accuracy/<qtype>" per question type.
        """
        return mean_by_type(records)


def mean_by_type(records: Sequence[dict], key: str = "score", name: str = "accuracy") -> dict[str, float]:
    if not records:
        return {}
    by: dict[str, list[float]] = defaultdict(list)
    for r in records:
        by[r.get("qtype", "all")].append(float(r[key]))
    out = {name: sum(float(r[key]) for r in records) / len(records)}
    for t in sorted(by):
        out[f"{name}/{t}"] = sum(by[t]) / len(by[t])
    return out


_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lowercase, strip punctuation and articles, number words to digits."""
    import re

    t = text.strip().lower()
    t = t.split("\n")[0]
    t = re.sub(r"(?<=\d),(?=\d)", "", t)  # 1,000 -> 1000
    t = re.sub(r"[^\w\s]", " ", t)
    words = [_NUMBER_WORDS.get(w, w) for w in t.split() if w not in _ARTICLES]
    return " ".join(words)


def register_benchmark(name: str) -> Callable[[type], type]:
    return BENCHMARKS.register(name)


def create_benchmark(name: str, **kwargs: Any) -> Benchmark:
    """Build a benchmark by registered name; kwargs go to its constructor (path=..., split=..., limit=...)."""
    return BENCHMARKS.get(name)(**kwargs)


def list_benchmarks(pattern: str = "*") -> list[str]:
    return BENCHMARKS.list(pattern)
