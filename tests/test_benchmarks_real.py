"""Real-benchmark loaders on tiny fixtures written in the published formats, and their official metrics.

Every benchmark is read from its original release layout and from a Hugging Face `datasets` layout (hub
parquet files or a save_to_disk folder); images are 8x8 solid colours, so a decoded pixel tells which file
a sample came from.
"""

from __future__ import annotations

import io
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import vtc.eval.benchmarks.gqa  # noqa: F401  (importing a loader registers it)
import vtc.eval.benchmarks.mme  # noqa: F401
import vtc.eval.benchmarks.pope  # noqa: F401
import vtc.eval.benchmarks.scienceqa  # noqa: F401
import vtc.eval.benchmarks.textvqa  # noqa: F401
from PIL import Image
from vtc.eval.benchmarks import create_benchmark
from vtc.eval.benchmarks.gqa import normalize_gqa
from vtc.eval.benchmarks.mme import parse_pred
from vtc.eval.benchmarks.pope import binary_metrics, parse_yes_no
from vtc.eval.benchmarks.scienceqa import parse_choice
from vtc.eval.benchmarks.textvqa import vqa_accuracy, vqa_normalize

# ---------------------------------------------------------------------------------------------------------
# fixture writers
# ---------------------------------------------------------------------------------------------------------


def colour(k: int) -> tuple[int, int, int]:
    return (10 * k % 256, 255 - 7 * k % 256, 40 + 3 * k % 200)


def image_array(k: int) -> np.ndarray:
    return np.broadcast_to(np.array(colour(k), dtype=np.uint8), (8, 8, 3)).copy()


def save_image(path: Path, k: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_array(k)).save(path)  # format from the suffix; .jpg is lossy, see `near`
    assert path.is_file()


def png_bytes(k: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_array(k)).save(buf, format="PNG")
    return buf.getvalue()


def hf_image(k: int | None) -> dict | None:
    return None if k is None else {"bytes": png_bytes(k), "path": f"{k}.png"}


def pixel(sample) -> tuple[int, int, int]:
    return sample.images[0].getpixel((3, 3))


def near(a: tuple[int, ...], b: tuple[int, ...], tol: int = 8) -> bool:  # JPEG fixtures are lossy
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


def write_save_to_disk(folder: Path, splits: dict[str, list[dict]] | list[dict]) -> None:
    """`Dataset.save_to_disk` (a list of rows) or `DatasetDict.save_to_disk` (split -> rows) as datasets writes it."""
    if isinstance(splits, dict):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
        for name, rows in splits.items():
            write_save_to_disk(folder / name, rows)
            state = json.loads((folder / name / "state.json").read_text())
            state["_split"] = name
            (folder / name / "state.json").write_text(json.dumps(state))
        return
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(splits)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": None}
    (folder / "state.json").write_text(json.dumps(state))


def records(bench, preds: list[str]) -> list[dict]:
    out = []
    for s, p in zip(bench, preds, strict=True):
        out.append({"id": s.id, "qtype": s.qtype, "pred": p, "score": bench.score(p, s)})
    return out


# ---------------------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------------------

POPE_ROWS = {  # split -> [(question_id, image k, object, label)]
    "random": [(1, 0, "dog", "yes"), (2, 1, "cat", "no"), (3, 1, "car", "yes")],
    "popular": [(1, 2, "person", "no"), (2, 0, "dog", "yes")],
    "adversarial": [(1, 3, "fork", "no"), (2, 2, "bus", "yes")],
}


def coco_name(k: int) -> str:
    return f"COCO_val2014_{k:012d}.png"


def write_pope_original(root: Path) -> None:
    for split, rows in POPE_ROWS.items():
        lines = [
            json.dumps(
                {"question_id": q, "image": coco_name(k), "text": f"Is there a {o} in the image?", "label": lab}
            )
            for q, k, o, lab in rows
        ]
        (root / f"coco_pope_{split}.json").parent.mkdir(parents=True, exist_ok=True)
        (root / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
    for k in range(4):
        save_image(root / "val2014" / coco_name(k), k)


def pope_hf_rows(split: str) -> list[dict]:
    return [
        {
            "id": f"{split}-{q}",
            "question_id": str(q),
            "question": f"Is there a {o} in the image?",
            "answer": lab,
            "image_source": coco_name(k)[:-4],
            "image": hf_image(k),
            "category": split,
        }
        for q, k, o, lab in POPE_ROWS[split]
    ]


def check_pope(bench, split: str | None = None) -> None:
    splits = [split] if split else ["random", "popular", "adversarial"]
    expect = [(s, q, k, o, lab) for s in splits for q, k, o, lab in POPE_ROWS[s]]
    assert len(bench) == len(expect)
    for sample, (s, q, k, o, lab) in zip(bench, expect, strict=True):
        assert sample.id == f"{s}/{q}" and sample.qtype == s and sample.answer == lab
        assert sample.question == f"Is there a {o} in the image?"
        assert pixel(sample) == colour(k)
    assert bench.prompt(bench[0]).endswith("\nAnswer the question using a single word or phrase.")


def test_pope_original_layout(tmp_path: Path) -> None:
    write_pope_original(tmp_path)
    check_pope(create_benchmark("pope", path=tmp_path))
    check_pope(create_benchmark("pope", path=tmp_path, split="popular"), "popular")
    lim = create_benchmark("pope", path=tmp_path, limit=4)
    assert [s.id for s in lim] == [s.id for s in create_benchmark("pope", path=tmp_path)][:4]


def test_pope_hub_default_config(tmp_path: Path) -> None:
    rows = [r for s in ("random", "popular", "adversarial") for r in pope_hf_rows(s)]
    write_parquet(tmp_path / "data" / "test-00000-of-00002.parquet", rows[:4])
    write_parquet(tmp_path / "data" / "test-00001-of-00002.parquet", rows[4:])
    check_pope(create_benchmark("pope", path=tmp_path))
    check_pope(create_benchmark("pope", path=tmp_path, split="adversarial"), "adversarial")


def test_images_decode_only_when_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vtc.eval.benchmarks.datafiles as datafiles

    write_pope_original(tmp_path)
    bench = create_benchmark("pope", path=tmp_path)
    opened: list[Path] = []
    real = datafiles.open_image
    monkeypatch.setattr(datafiles, "open_image", lambda p: opened.append(p) or real(p))
    ids = [bench[i].id for i in range(len(bench))]  # what a harness does to skip finished samples
    assert len(ids) == 7 and opened == []
    s = bench[2]
    assert pixel(s) == colour(1) and s.images[0] is s.images[0] and len(opened) == 1


def test_pope_hub_full_config_and_save_to_disk(tmp_path: Path) -> None:
    for s in ("random", "popular", "adversarial"):
        write_parquet(tmp_path / "hub" / "Full" / f"{s}-00000-of-00001.parquet", pope_hf_rows(s))
    check_pope(create_benchmark("pope", path=tmp_path / "hub"))
    rows = [r for s in ("random", "popular", "adversarial") for r in pope_hf_rows(s)]
    write_save_to_disk(tmp_path / "disk", {"test": rows})
    check_pope(create_benchmark("pope", path=tmp_path / "disk"))
    check_pope(create_benchmark("pope", path=tmp_path / "disk", split="random"), "random")
    write_save_to_disk(tmp_path / "bare", rows)  # a Dataset, not a DatasetDict: it answers every split name
    check_pope(create_benchmark("pope", path=tmp_path / "bare"))
    check_pope(create_benchmark("pope", path=tmp_path / "bare", split="popular"), "popular")


def test_pope_parser() -> None:
    cases = {
        "Yes": "yes", "yes.": "yes", "No": "no", "no.": "no", "No, there is not.": "no",
        "There is no dog in the image.": "no", "The dog is not visible": "no", "Yes, there is. No doubt.": "yes",
        "Nope": "yes", "NO": "yes", "no,": "no", "": "yes", " No\n": "no",
    }  # fmt: skip
    for text, want in cases.items():
        assert parse_yes_no(text) == want, text


def test_pope_metrics_hand_counts(tmp_path: Path) -> None:
    # labels y y y n n, predictions y n y y n: TP 2, FN 1, FP 1, TN 1
    m = binary_metrics(["yes", "no", "yes", "yes", "no"], ["yes", "yes", "yes", "no", "no"])
    assert m == pytest.approx(
        {"accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 3 / 5}
    )
    assert binary_metrics(["no", "no"], ["yes", "no"]) == {
        "accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0,
    }  # fmt: skip
    # through score/aggregate: random = labels y n y, predictions "Yes." "No, not." "no" -> TP1 TN1 FN1
    write_pope_original(tmp_path)
    bench = create_benchmark("pope", path=tmp_path)
    preds = ["Yes.", "No, not.", "no", "Yes", "Yes", "yes", "There is no bus"]
    out = bench.aggregate(records(bench, preds))
    assert out["accuracy/random"] == pytest.approx(2 / 3)
    assert out["precision/random"] == pytest.approx(1.0) and out["recall/random"] == pytest.approx(0.5)
    assert out["f1/random"] == pytest.approx(2 / 3) and out["yes_ratio/random"] == pytest.approx(1 / 3)
    # popular: labels n y, preds y y -> TP1 FP1; adversarial: labels n y, preds y n -> FP1 FN1
    assert out["f1/popular"] == pytest.approx(2 / 3) and out["f1/adversarial"] == 0.0
    assert out["f1_split_mean"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    pooled = binary_metrics([parse_yes_no(p) for p in preds], [s.answer for s in bench])
    assert {k: out[k] for k in pooled} == pytest.approx(pooled)
    # records of ids this instance did not load: the answer follows from the parsed prediction and the score
    foreign = [{**r, "id": f"x/{r['id']}"} for r in records(bench, preds)]
    assert bench.aggregate(foreign) == pytest.approx(out)


# ---------------------------------------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------------------------------------

MME_DATA = {  # subtask -> [(stem, image k, [(question, answer), (question, answer)])]
    "artwork": [("10002", 0, [("Is it a painting? Please answer yes or no.", "Yes"), ("Is it glass?", "No")])],
    "existence": [
        ("000000006040", 1, [("Is there a train? Please answer yes or no.", "Yes"), ("Is there a bed?", "No")]),
        ("000000044279", 2, [("Is there a cup? Please answer yes or no.", "No"), ("Is there a dog?", "Yes")]),
    ],
    "code_reasoning": [("0020", 3, [("Does it print 5? Please answer yes or no.", "Yes"), ("Print 6?", "No")])],
}
MME_SPLIT_LAYOUT = {"artwork"}  # images/ + questions_answers_YN/, the others flat


def mme_expected(subtasks=("artwork", "existence", "code_reasoning")) -> list[tuple]:
    order = [s for s in ("existence", "artwork", "code_reasoning") if s in subtasks]  # official subtask order
    return [
        (s, f"{stem}.png", k, j, q, a) for s in order for stem, k, qa in MME_DATA[s] for j, (q, a) in enumerate(qa)
    ]


def write_mme_release(base: Path) -> None:
    for sub, entries in MME_DATA.items():
        for stem, k, qa in entries:
            text = "".join(f"{q}\t{a}\n" for q, a in qa)
            if sub in MME_SPLIT_LAYOUT:
                save_image(base / sub / "images" / f"{stem}.png", k)
                (base / sub / "questions_answers_YN").mkdir(parents=True, exist_ok=True)
                (base / sub / "questions_answers_YN" / f"{stem}.txt").write_text(text)
            else:
                save_image(base / sub / f"{stem}.png", k)
                (base / sub / f"{stem}.txt").write_text(text)


def check_mme(bench, expect: list[tuple]) -> None:
    assert len(bench) == len(expect)
    for sample, (sub, name, k, j, q, a) in zip(bench, expect, strict=True):
        assert sample.id == f"{sub}/{name}#{j}" and sample.qtype == sub
        assert sample.question == q and sample.answer == a.lower()
        assert pixel(sample) == colour(k)


def test_mme_release_layout(tmp_path: Path) -> None:
    base = tmp_path / "MME_Benchmark_release_version" / "MME_Benchmark"
    write_mme_release(base)
    bench = create_benchmark("mme", path=tmp_path)
    check_mme(bench, mme_expected())
    assert bench.prompt(bench[0]) == "Is there a train?\nAnswer the question using a single word or phrase."
    check_mme(create_benchmark("mme", path=base, split="cognition"), mme_expected(("code_reasoning",)))
    check_mme(create_benchmark("mme", path=base, split="artwork"), mme_expected(("artwork",)))
    assert [s.id for s in create_benchmark("mme", path=base, limit=3)] == [s.id for s in bench][:3]


def test_mme_eval_tool_lists(tmp_path: Path) -> None:
    base = tmp_path / "MME_Benchmark"
    write_mme_release(base)
    lists = tmp_path / "Your_Results"
    lists.mkdir()
    for sub, entries in MME_DATA.items():
        lines = [f"{stem}.png\t{q}\t{a}\n" for stem, _, qa in entries for q, a in qa]
        (lists / f"{sub}.txt").write_text("".join(lines))
    check_mme(create_benchmark("mme", path=lists, image_dir=base), mme_expected())
    with pytest.raises(FileNotFoundError, match="image_dir"):
        create_benchmark("mme", path=lists)


def test_mme_hub_layout(tmp_path: Path) -> None:
    rows = [
        {"question_id": f"{sub}/{name}", "image": hf_image(k), "question": q, "answer": a, "category": sub}
        for sub, name, k, _, q, a in mme_expected()
    ]
    write_parquet(tmp_path / "data" / "test-00000-of-00001-a25dbe3b44c4fda6.parquet", rows, row_group_size=3)
    check_mme(create_benchmark("mme", path=tmp_path), mme_expected())
    write_save_to_disk(tmp_path / "disk", rows)
    check_mme(
        create_benchmark("mme", path=tmp_path / "disk", split="perception"), mme_expected(("existence", "artwork"))
    )


def test_mme_parser_and_score() -> None:
    cases = {
        "Yes": "yes", "No.": "no", "yes": "yes", "y": "yes", "N": "no", "x": "other", "Yes, it is.": "yes",
        "No, it is not.": "no", "I think yes": "other", "Not really": "no", "nope": "no", "": "other",
    }  # fmt: skip
    for text, want in cases.items():
        assert parse_pred(text) == want, text


def test_mme_acc_plus_hand_case(tmp_path: Path) -> None:
    write_mme_release(tmp_path)
    bench = create_benchmark("mme", path=tmp_path)
    # existence: image 1 both right, image 2 one right; artwork: one wrong; code_reasoning: both right
    preds = ["Yes", "No", "Yes", "Yes", "No", "No", "Yes.", "no"]
    rec = records(bench, preds)
    assert [r["score"] for r in rec] == [1, 1, 0, 1, 0, 1, 1, 1]
    out = bench.aggregate(rec)
    assert out["existence/acc"] == pytest.approx(75.0) and out["existence/acc_plus"] == pytest.approx(50.0)
    assert out["existence/score"] == pytest.approx(125.0)
    assert out["artwork/acc"] == pytest.approx(50.0) and out["artwork/acc_plus"] == 0.0
    assert out["code_reasoning/score"] == pytest.approx(200.0)
    assert out["perception"] == pytest.approx(175.0) and out["cognition"] == pytest.approx(200.0)
    assert out["total"] == pytest.approx(375.0)


# ---------------------------------------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------------------------------------

GQA_Q = [  # (question id, imageId, image k, question, answer, structural type)
    ("20968379", "n288870", 0, "Do the shorts look dark?", "yes", "verify"),
    ("201750717", "n374453", 1, "What is the vehicle?", "bus", "query"),
    ("20538180", "n288870", 0, "Is the shirt red or white?", "white", "choose"),
]


def gqa_question(iid: str, q: str, a: str, t: str) -> dict:
    return {
        "imageId": iid, "question": q, "answer": a, "fullAnswer": f"The answer is {a}.", "isBalanced": True,
        "types": {"structural": t, "semantic": "attr", "detailed": f"{t}Attr"},
    }  # fmt: skip


def check_gqa(bench) -> None:
    assert len(bench) == len(GQA_Q)
    for sample, (qid, iid, k, q, a, t) in zip(bench, GQA_Q, strict=True):
        assert (sample.id, sample.question, sample.answer, sample.qtype) == (qid, q, a, t)
        assert sample.meta["image_id"] == iid and near(pixel(sample), colour(k))


def test_gqa_original_layout(tmp_path: Path) -> None:
    questions = {qid: gqa_question(iid, q, a, t) for qid, iid, _, q, a, t in GQA_Q}
    (tmp_path / "questions1.2").mkdir()
    (tmp_path / "questions1.2" / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    for _, iid, k, *_ in GQA_Q:
        save_image(tmp_path / "images" / f"{iid}.jpg", k)
    check_gqa(create_benchmark("gqa", path=tmp_path))
    assert [s.id for s in create_benchmark("gqa", path=tmp_path, limit=2)] == [q[0] for q in GQA_Q[:2]]


def test_gqa_hub_layout(tmp_path: Path) -> None:
    qrows = [{"id": qid, **gqa_question(iid, q, a, t)} for qid, iid, _, q, a, t in GQA_Q]
    write_parquet(tmp_path / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet", qrows)
    irows = [{"id": "n374453", "image": hf_image(1)}, {"id": "n000001", "image": hf_image(9)}]
    irows.append({"id": "n288870", "image": hf_image(0)})
    write_parquet(tmp_path / "testdev_balanced_images" / "testdev-00000-of-00001.parquet", irows)
    bench = create_benchmark("gqa", path=tmp_path)
    check_gqa(bench)
    assert bench.aggregate(records(bench, ["Yes.", "the bus", "White"])) == pytest.approx(
        {"accuracy": 2 / 3, "accuracy/choose": 1.0, "accuracy/query": 0.0, "accuracy/verify": 1.0}
    )


def test_gqa_normalisation() -> None:
    assert normalize_gqa(" Yes. ") == "yes" and normalize_gqa("T-shirt") == normalize_gqa("tshirt")
    assert normalize_gqa("the table") != normalize_gqa("table")  # no article stripping in exact match


# ---------------------------------------------------------------------------------------------------------
# TextVQA
# ---------------------------------------------------------------------------------------------------------

TVQA = [  # (question id, image id, image k, question, 10 answers, ocr tokens)
    (34602, "003a8ae2ef43b901", 0, "what is the brand of this camera?", ["dakota"] * 6 + ["dakota digital"] * 4,
     ["dakota", "digital"]),
    (34603, "004e9c5b2a8b3e47", 1, "what does the small white text spell?", ["copenhagen"] * 3 + ["thursday"] * 7,
     ["copenhagen"]),
]  # fmt: skip


def check_tvqa(bench) -> None:
    assert len(bench) == len(TVQA)
    for sample, (qid, iid, k, q, answers, _) in zip(bench, TVQA, strict=True):
        assert (sample.id, sample.question, sample.answer) == (str(qid), q, answers)
        assert sample.meta["image_id"] == iid and near(pixel(sample), colour(k))


def test_textvqa_original_layout(tmp_path: Path) -> None:
    data = [
        {"question": q, "image_id": iid, "image_classes": ["Camera"], "answers": a, "question_id": qid,
         "set_name": "val", "image_width": 8, "image_height": 8}
        for qid, iid, _, q, a, _ in TVQA
    ]  # fmt: skip
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": data}))
    ocr = [{"image_id": iid, "ocr_tokens": toks} for _, iid, _, _, _, toks in TVQA]
    (tmp_path / "TextVQA_Rosetta_OCR_v0.2_val.json").write_text(json.dumps({"data": ocr}))
    for _, iid, k, *_ in TVQA:
        save_image(tmp_path / "train_images" / f"{iid}.jpg", k)
    bench = create_benchmark("textvqa", path=tmp_path)
    check_tvqa(bench)
    assert bench.prompt(bench[0]) == f"{TVQA[0][3]}\nAnswer the question using a single word or phrase."
    ocr_bench = create_benchmark("textvqa", path=tmp_path, ocr=True, limit=1)
    assert len(ocr_bench) == 1
    assert ocr_bench.prompt(ocr_bench[0]).split("\n")[1] == "Reference OCR token: dakota, digital"
    assert bench.score("Dakota.", bench[0]) == pytest.approx(1.0)
    assert bench.score("copenhagen", bench[1]) == pytest.approx(0.9)  # 3 matches: 7 subsets keep 3, 3 keep 2


def test_textvqa_hub_save_to_disk(tmp_path: Path) -> None:
    rows = [
        {"image_id": iid, "question_id": qid, "question": q, "question_tokens": q.split(), "image": hf_image(k),
         "image_width": 8, "image_height": 8, "answers": a, "image_classes": [], "set_name": "val",
         "ocr_tokens": toks}
        for qid, iid, k, q, a, toks in TVQA
    ]  # fmt: skip
    write_save_to_disk(tmp_path / "disk", {"train": rows[:1], "validation": rows})
    check_tvqa(create_benchmark("textvqa", path=tmp_path / "disk", split="val"))
    write_parquet(tmp_path / "hub" / "data" / "validation-00000-of-00001.parquet", rows, row_group_size=1)
    write_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", rows[:1])
    bench = create_benchmark("textvqa", path=tmp_path / "hub", split="validation", ocr=True)
    check_tvqa(bench)
    assert "Reference OCR token: copenhagen\n" in bench.prompt(bench[1])


def brute_force_vqa_accuracy(pred: str, answers: list[str]) -> float:
    pred = vqa_normalize(pred)
    gts = [vqa_normalize(a) for a in answers]
    subsets = list(itertools.combinations(range(len(gts)), len(gts) - 1))
    return sum(min(1.0, sum(gts[i] == pred for i in subset) / 3) for subset in subsets) / len(subsets)


def test_vqa_accuracy_matches_brute_force() -> None:
    rng = random.Random(0)
    vocab = ["two", "2", "the dog", "dog", "Dog.", "cat", "coca-cola", "coca cola", "yes"]
    for _ in range(300):
        answers = [rng.choice(vocab) for _ in range(10)]
        pred = rng.choice(vocab)
        assert vqa_accuracy(pred, answers) == pytest.approx(brute_force_vqa_accuracy(pred, answers))
    assert vqa_accuracy("dog", ["dog"] * 2 + ["cat"] * 8) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)


def test_vqa_normalisation() -> None:
    cases = {
        "Two": "2", "The cat.": "cat", "dont": "don't", "3.5": "3.5", "coca-cola": "coca cola",
        "coca - cola": "coca cola", "Yes!": "yes", "it's": "it 's", "1,000": "1000", "Hello, World": "hello world",
        "an apple": "apple", "e.g.": "eg", "x/y": "x y", "somebody'd": "somebodyd", "youll": "you'll",
        " ten\tdogs\n": "10 dogs", "t-shirt - red": "tshirt red",
    }  # fmt: skip
    for text, want in cases.items():
        assert vqa_normalize(text) == want, text


# ---------------------------------------------------------------------------------------------------------
# ScienceQA-IMG
# ---------------------------------------------------------------------------------------------------------

SQA = [  # (pid, image k or None, question, choices, answer index, hint, subject)
    ("5", 0, "Which animal's feet are also adapted for walking on snow?", ["lynx", "camel"], 0,
     "Figure: Arctic fox.", "natural science"),
    ("11", None, "Which word would you find on a dictionary page?", ["hook", "skirt", "loan"], 2, "",
     "language science"),
    ("12", 1, "Which state is highlighted?", ["Ohio", "Iowa", "Utah"], 1, "", "social science"),
]  # fmt: skip
SQA_IMG = [row for row in SQA if row[1] is not None]


def check_sqa(bench, ids: list[str]) -> None:
    assert [s.id for s in bench] == ids
    for sample, (_, k, q, choices, ans, hint, subject) in zip(bench, SQA_IMG, strict=True):
        assert (sample.question, sample.choices, sample.qtype) == (q, choices, subject)
        assert sample.answer == "ABC"[ans] and sample.meta["hint"] == hint and pixel(sample) == colour(k)


def test_scienceqa_original_layout(tmp_path: Path) -> None:
    problems = {
        pid: {"question": q, "choices": c, "answer": a, "hint": h, "image": None if k is None else "image.png",
              "task": "closed choice", "grade": "grade3", "subject": sub, "topic": "t", "category": "c",
              "skill": "s", "lecture": "", "solution": "", "split": "test"}
        for pid, k, q, c, a, h, sub in SQA
    }  # fmt: skip
    problems["7"] = {**problems["5"], "split": "train"}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"train": ["7"], "val": [], "test": ["5", "11", "12"]}))
    for pid, k, *_ in SQA_IMG:
        save_image(tmp_path / "images" / "test" / pid / "image.png", k)
    bench = create_benchmark("scienceqa_img", path=tmp_path)
    check_sqa(bench, ["5", "12"])
    assert bench.prompt(bench[0]) == (
        "Context: Figure: Arctic fox.\nWhich animal's feet are also adapted for walking on snow?\nA. lynx\n"
        "B. camel\nAnswer with the option's letter from the given choices directly."
    )
    assert bench.prompt(bench[1]).startswith("Which state is highlighted?\nA. Ohio\nB. Iowa\nC. Utah\n")
    assert [s.id for s in create_benchmark("scienceqa_img", path=tmp_path, limit=1)] == ["5"]
    out = bench.aggregate(records(bench, ["A", "The answer is C."]))
    assert out == pytest.approx({"accuracy": 0.5, "accuracy/natural science": 1.0, "accuracy/social science": 0.0})
    with pytest.raises(ValueError, match="minival"):
        create_benchmark("scienceqa_img", path=tmp_path, split="minival")


def test_scienceqa_hub_layout(tmp_path: Path) -> None:
    rows = [
        {"image": hf_image(k), "question": q, "choices": c, "answer": a, "hint": h, "task": "closed choice",
         "grade": "grade3", "subject": sub, "topic": "t", "category": "c", "skill": "s", "lecture": "",
         "solution": ""}
        for _, k, q, c, a, h, sub in SQA
    ]  # fmt: skip
    write_parquet(tmp_path / "ScienceQA-IMG" / "test-00000-of-00001.parquet", rows)
    write_parquet(tmp_path / "ScienceQA-FULL" / "test-00000-of-00001.parquet", rows[1:2])
    check_sqa(create_benchmark("scienceqa_img", path=tmp_path), ["test/0", "test/2"])


def test_scienceqa_letter_parser() -> None:
    cases = {
        "A": "A", "b": "B", " C \n": "C", "B. Iowa": "B", "The answer is C.": "C", "I pick A": None, "D": None,
        "D. nothing": None, "The answer is B": "B", "": None, "(A)": None,
    }  # fmt: skip
    for text, want in cases.items():
        assert parse_choice(text, 3) == want, text


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("pope", "coco_pope_"),
        ("mme", "questions_answers_YN"),
        ("gqa", "testdev_balanced_questions.json"),
        ("textvqa", "TextVQA_0.5.1_"),
        ("scienceqa_img", "pid_splits.json"),
    ],
)
def test_missing_files_name_the_layout(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(FileNotFoundError, match=expected):
        create_benchmark(name, path=tmp_path)  # empty folder
    with pytest.raises(FileNotFoundError, match=expected):
        create_benchmark(name, path=tmp_path / "nope")
    with pytest.raises(ValueError, match="path="):
        create_benchmark(name)


def test_bad_arguments(tmp_path: Path) -> None:
    write_pope_original(tmp_path)
    with pytest.raises(ValueError, match="'all' or one of"):
        create_benchmark("pope", path=tmp_path, split="val")
    with pytest.raises(ValueError, match="limit"):
        create_benchmark("pope", path=tmp_path, limit=-1)
    (tmp_path / "coco_pope_popular.json").unlink()
    with pytest.raises(FileNotFoundError, match="coco_pope_popular.json"):
        create_benchmark("pope", path=tmp_path)
    with pytest.raises(FileNotFoundError, match="image_dir"):
        create_benchmark("pope", path=tmp_path, split="random", image_dir=tmp_path / "missing")
