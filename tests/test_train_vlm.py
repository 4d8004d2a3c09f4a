"""`vtc train vlm`: the grounding loss against eager attention, the standardisation fold, a resumable smoke run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from vtc.eval.benchmarks import shapes as S

from vtc.train import vlm


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = vlm.build_tokenizer()
    return vlm.build_model("llava", len(tok), image_size=32).eval(), tok


def test_grounding_loss_matches_eager_attention(tiny):
    model, tok = tiny
    n = 16  # 4×4 tokens at 32 px
    prefix = vlm.image_prefix("llava", n)
    turns = [("what colour is the circle ?", "red"), ("how many squares are there ?", "two")]
    rows: list[int] = []
    ids, _ = vlm.build_sequence(prefix, turns, tok, rows)
    ids_t = torch.tensor([ids, ids])
    mask = torch.ones_like(ids_t)
    feats = torch.randn(2, n, model.config.text_config.hidden_size)
    targets = [[[[1, 2, 5]], [[7], [len(prefix) - 1]]], [[[3]], [[], [2]]]]  # [batch][turn][head]
    layers = model.model.language_model.layers
    cap = vlm.AttentionCapture({i: layers[i].self_attn for i in range(1, len(layers))})
    with torch.no_grad(), cap:
        vlm.lm_forward(model, "llava", ids_t, mask, feats, 4, None)
        got = vlm.grounding_loss(cap.store, [rows, rows], targets)
    # reference: eager attention probabilities of head 0 from the model itself
    model.config._attn_implementation = "eager"
    model.model.language_model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            emb = model.get_input_embeddings()(ids_t).masked_scatter((ids_t == 4)[..., None], feats)
            out = model.model.language_model(inputs_embeds=emb, attention_mask=mask, output_attentions=True)
    finally:
        model.config._attn_implementation = "sdpa"
        model.model.language_model.config._attn_implementation = "sdpa"
    ref = []
    for layer in range(1, len(layers)):
        for b in range(2):
            for r, per_head in zip(rows, targets[b], strict=True):
                for head, cols in enumerate(per_head):
                    if cols:
                        ref.append(-torch.log(out.attentions[layer][b, head, r, cols].sum()))
    assert torch.allclose(got, torch.stack(ref).mean(), atol=1e-5)
    assert rows == [len(prefix) + 5, len(prefix) + 5 + 2 + 6]  # the last question token of each turn


def _grounding_loop(store, rows, targets, spread=False):
    """The obvious per-row, per-head loop: the reference for the batched `grounding_loss`."""
    losses = []
    for q, k, scale in store.values():
        groups = q.shape[1] // k.shape[1]
        for b, (rs, ts) in enumerate(zip(rows, targets, strict=True)):
            for r, per_head in zip(rs, ts, strict=True):
                for head, cols in enumerate(per_head):
                    if cols:
                        logits = (k[b, head // groups, : r + 1].float() @ q[b, head, r].float()) * scale
                        logp = logits.log_softmax(-1)
                        losses.append(-(logp[cols].mean() if spread else torch.logsumexp(logp[cols], 0)))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("spread", [False, True])
def test_grounding_loss_batched_matches_loop_values_and_gradients(spread):
    g = torch.Generator().manual_seed(1)
    n_b, n_h, n_kv, n_len, d = 3, 4, 2, 20, 8  # grouped-query heads: 2 query heads per key head
    qk = [(torch.randn(n_b, n_h, n_len, d, generator=g), torch.randn(n_b, n_kv, n_len, d, generator=g), 0.3)
          for _ in range(2)]  # fmt: skip
    rows = [[9, 14, 19], [12], [10, 17]]  # ragged turns per row
    targets = [
        [[[0, 3], [5]], [[1]], [[2, 4, 6], [], [7]]],  # ragged heads; an empty head is skipped
        [[[], [8, 9]]],
        [[[4]], [[0], [1], [2]]],
    ]
    ref_in = [(q.clone().requires_grad_(), k.clone().requires_grad_(), s) for q, k, s in qk]
    got_in = [(q.clone().requires_grad_(), k.clone().requires_grad_(), s) for q, k, s in qk]
    ref = _grounding_loop(dict(enumerate(ref_in)), rows, targets, spread)
    got = vlm.grounding_loss(dict(enumerate(got_in)), rows, targets, spread)
    assert torch.allclose(got, ref, atol=1e-5)
    ref.backward()
    got.backward()
    for (qr, kr, _), (qg, kg, _) in zip(ref_in, got_in, strict=True):
        assert torch.isfinite(qg.grad).all() and torch.isfinite(kg.grad).all()
        assert torch.allclose(qg.grad, qr.grad, atol=1e-5) and torch.allclose(kg.grad, kr.grad, atol=1e-5)
    assert float(vlm.grounding_loss(dict(enumerate(qk)), [[], [], []], [[], [], []])) == 0.0


def test_standardize_projector_is_an_exact_fold(tiny):
    model, _ = tiny
    model = type(model)(model.config).eval()
    pix = {"pixel_values": torch.randn(3, 3, 32, 32)}
    with torch.no_grad():
        before = vlm.image_features(model, pix, "llava")
        vlm.standardize_projector(model, "llava", before)
        after = vlm.image_features(model, pix, "llava")
    flat = before.flatten(0, 1)
    want = (before - flat.mean(0)) / flat.std(0).clamp_min(1e-3)
    assert torch.allclose(after, want, atol=1e-4)
    assert after.flatten(0, 1).mean(0).abs().max() < 1e-4


def test_dense_head_accuracy_counts_labelled_cells_only():
    heads = vlm.DenseHeads(8)
    labels = torch.zeros(2, 4, 3, 3, dtype=torch.long)
    labels[0, 0, 1, 1], labels[0, 1, 1, 1], labels[1, 0, 0, 2], labels[1, 1, 0, 2] = 2, 3, 5, 1
    feats = torch.randn(2, 9, 8)
    ref = {}
    for i, name in enumerate(("colour", "shape")):
        pred = getattr(heads, name)(feats).argmax(-1)  # [2, 9]
        y = labels[:, i].flatten(1)
        hits = [bool(pred[b, j] == y[b, j]) for b in range(2) for j in range(9) if y[b, j] > 0]
        ref[f"acc_{name}"] = sum(hits) / len(hits)
    got = heads.accuracy(feats, labels)
    assert set(got) == {"acc_colour", "acc_shape"}  # no letter or centre cell is labelled: not reported
    assert got == pytest.approx(ref, abs=1e-4)


def test_referred_objects():
    for seed in range(30):
        scene = S.make_scene(seed)
        rng = np.random.default_rng(seed)
        for qtype in S.QTYPES:
            qa = S.ask(scene, qtype, rng)
            if qa is None:
                continue
            ref = scene.referred(qa[0])
            if qtype == "colour":
                assert [scene.objects[i].colour for i in ref] == [qa[1]]
            if qtype == "shape":
                assert [scene.objects[i].shape for i in ref] == [qa[1]]
            if qtype == "count":
                assert len(ref) == S.NUMBERS.index(qa[1])
            if qtype == "text":
                assert ref == [len(scene.objects)]
            if qtype == "spatial":
                assert len(ref) == 2


def test_smoke_run_resumes_and_exports(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg = vlm.TrainConfig(family="qwen2_vl", pool=8, dense_pool=4, dense_steps=2, dense_batch=2, lm_steps=2,
                          lm_batch=2, qa_per_image=2, val_per_type=1, threads=1, checkpoint_every=1)  # fmt: skip
    out = tmp_path / "m"
    vlm.train_vlm(cfg, out, log=lambda *_: None)
    log = [json.loads(x) for x in (out / "work" / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log if r["stage"] in ("dense", "lm")] == ["dense", "lm"]
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    sample = S.ShapesBenchmark(per_type=1)[0]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}]
    )
    inputs = processor(images=sample.images, text=[text], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 144
    model.generate(**inputs, max_new_tokens=2)
    # a second call finds every stage done: nothing is trained again, the saved model is unchanged
    before = (out / "model.safetensors").read_bytes()
    vlm.train_vlm(cfg, out, log=lambda *_: None)
    log2 = [json.loads(x) for x in (out / "work" / "log.jsonl").read_text().splitlines()]
    assert [r for r in log2 if r["stage"] in ("dense", "lm")] == [r for r in log if r["stage"] in ("dense", "lm")]
    vlm.export_checkpoint(cfg, out, log=lambda *_: None)
    assert (out / "model.safetensors").read_bytes() == before
    # the post-dense state is kept: a new run branched from it repeats the LLM stage bit for bit
    branch = tmp_path / "branch" / "work"
    branch.mkdir(parents=True)
    for f in (out / "work").iterdir():
        if f.name.startswith("pool_") or f.name == "feats.safetensors":
            (branch / f.name).symlink_to(f)
    shutil.copyfile(out / "work" / "after_dense.safetensors", branch / "state.safetensors")
    vlm.train_vlm(cfg, branch.parent, log=lambda *_: None)

    def untimed(rows):
        return [{k: v for k, v in r.items() if k != "time"} for r in rows]

    log3 = [json.loads(x) for x in (branch / "log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log3} == {"lm", "val"}  # no vision stage again
    assert untimed(log3) == untimed(r for r in log if r["stage"] in ("lm", "val"))
    # the checkpoint records its RoPE base: resuming or exporting it with another one is refused
    other = vlm.TrainConfig(**{**vars(cfg), "rope_theta": 1e6})
    with pytest.raises(ValueError, match="trained with rope_theta=10000, but this run asks for 1e"):
        vlm.train_vlm(other, out, log=lambda *_: None)
    with pytest.raises(ValueError, match="pass --rope-theta 10000"):
        vlm.export_checkpoint(other, out, log=lambda *_: None)
    # the LLM stage records its settings: going on with another loss weight or schedule is refused
    with pytest.raises(
        ValueError, match=r"trained with question_sup=0, but this run asks for 0.5; pass --question-sup 0"
    ):
        vlm.train_vlm(vlm.TrainConfig(**{**vars(cfg), "question_sup": 0.5}), out, log=lambda *_: None)
    with pytest.raises(ValueError, match="trained with lm_steps=2, but this run asks for 3"):
        vlm.train_vlm(vlm.TrainConfig(**{**vars(cfg), "lm_steps": 3}), out, log=lambda *_: None)
    # a checkpoint from before settings were recorded had no question loss
    from safetensors import safe_open
    from safetensors.torch import save_file

    old = tmp_path / "old"
    shutil.copytree(out, old)
    state = old / "work" / "state.safetensors"
    with safe_open(str(state), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del meta["settings"]
    save_file(tensors, str(state), metadata={"meta": json.dumps(meta)})
    vlm.train_vlm(cfg, old, log=lambda *_: None)  # Qwen2-VL's default (0) matches: nothing to do
    with pytest.raises(ValueError, match="question_sup=0, but this run asks for 1"):
        vlm.train_vlm(vlm.TrainConfig(**{**vars(cfg), "question_sup": 1.0}), old, log=lambda *_: None)
    # its scenes are those of --seed 0: going on with another seed would ask questions of other scenes
    with pytest.raises(ValueError, match="holds the scenes of --seed 0, but this run asks for --seed 1"):
        vlm.train_vlm(vlm.TrainConfig(**{**vars(cfg), "seed": 1}), out, log=lambda *_: None)


def test_question_spans_cover_each_question(tiny):
    _, tok = tiny
    prefix = vlm.image_prefix("llava", 16)
    turns = [("what colour is the circle ?", "red"), ("is there a blue cross ?", "no")]
    rows: list[int] = []
    starts: list[int] = []
    ids, labels = vlm.build_sequence(prefix, turns, tok, rows, starts)
    for (q, _), a, r in zip(turns, starts, rows, strict=True):
        assert tok.decode(ids[a : r + 1]) == q  # start .. answer row is exactly the question
        assert labels[a : r + 1] == [-100] * (r + 1 - a) and labels[r + 1] != -100  # the next token is the answer


def test_question_columns_are_the_words_that_pick_the_objects():
    rng = np.random.default_rng(0)
    seen = set()
    for seed in range(60):
        scene = S.make_scene(seed)
        for qtype in S.QTYPES:
            qa = S.ask(scene, qtype, rng)
            if qa is None:
                continue
            q, words = qa[0], qa[0].split()
            per_head = vlm.question_columns(q, 7)
            picked = [[words[c - 7] for c in cols] for cols in per_head]
            seen.add(qtype)
            if qtype == "spatial":  # "where is the red circle relative to the blue square ?": A on head 0, B on 1
                assert picked == [words[3:5], words[-3:-1]]
            elif qtype == "text":
                assert picked == [[]]
            else:
                assert len(per_head) == 1 and picked[0]
                assert all(w in S.COLOURS or w in S.SHAPES or w in S.PLURAL.values() for w in picked[0])
                assert picked[0] == [w for w in words if w in vlm.ATTRIBUTE_WORDS]
    assert seen == set(S.QTYPES)


def test_question_loss_is_trained_and_logged_only_when_asked(tmp_path):
    kw = dict(family="llava", pool=4, dense_pool=4, dense_steps=1, dense_batch=2, lm_steps=1, lm_batch=2,
              qa_per_image=3, val_per_type=1, threads=1)  # fmt: skip
    rows = {}
    for w in (0.0, 1.0):
        vlm.train_vlm(vlm.TrainConfig(**kw, question_sup=w), tmp_path / str(w), log=lambda *_: None)
        log = [json.loads(x) for x in (tmp_path / str(w) / "work" / "log.jsonl").read_text().splitlines()]
        rows[w] = next(r for r in log if r["stage"] == "lm")
    assert rows[0.0]["qground"] == 0.0
    # a fresh head spreads its attention over ~600 columns: the mass on a question's few words is small
    assert 1.0 < rows[1.0]["qground"] < 10.0
    assert rows[1.0]["ground"] == pytest.approx(rows[0.0]["ground"])  # layer 0 is not in the visual loss


def test_checkpoints_without_a_recorded_rope_base_had_10000(tmp_path):
    tok = vlm.build_tokenizer()
    model = vlm.build_model("llava", len(tok))
    (tmp_path / "work").mkdir()
    vlm.save_state(tmp_path / "work" / "state.safetensors", {"model": model}, None, {"stage": "lm", "step": 1})
    with pytest.raises(ValueError, match="rope_theta=10000"):  # LLaVA's family default is now 1e6
        vlm.export_checkpoint(vlm.TrainConfig(family="llava"), tmp_path, log=lambda *_: None)
    vlm.export_checkpoint(vlm.TrainConfig(family="llava", rope_theta=10000.0), tmp_path, log=lambda *_: None)
    assert (tmp_path / "model.safetensors").exists()


def test_spatial_questions_ground_each_object_on_its_own_head():
    rng = np.random.default_rng(0)
    for seed in range(40):
        scene = S.make_scene(seed)
        qa = S.ask(scene, "spatial", rng)
        if qa is None:
            continue
        omap = scene.object_map(12)
        w = qa[0].split()
        a, b = (
            next(i for i, o in enumerate(scene.objects) if o.name == n) for n in (" ".join(w[3:5]), " ".join(w[-3:-1]))
        )
        heads = vlm.target_columns(scene, qa[0], 12, 10, omap)
        assert heads == [[10 + int(c) for c in np.flatnonzero(omap.ravel() == i + 1)] for i in (a, b)]
        other = vlm.target_columns(scene, "what letter is written in the image ?", 12, 10, omap)
        assert len(other) == 1
        return
    pytest.fail("no spatial question in 40 scenes")


def test_relation_target_agrees_with_the_spatial_answer():
    rng = np.random.default_rng(1)
    seen = 0
    for seed in range(200):
        scene = S.make_scene(seed)
        qa = S.ask(scene, "spatial", rng)
        if qa is None:
            continue
        dy, dx = vlm.relation_target(scene, qa[0])
        dominant = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
        assert dominant == qa[1] and max(abs(dx), abs(dy)) <= 2
        seen += 1
    assert seen > 50
    assert vlm.relation_target(S.make_scene(0), "what letter is written in the image ?") is None


def test_count_target_is_the_answer():
    rng = np.random.default_rng(2)
    for seed in range(60):
        scene = S.make_scene(seed)
        qa = S.ask(scene, "count", rng)
        if qa is not None:
            assert vlm.count_target(scene, qa[0]) * 3 == S.NUMBERS.index(qa[1])
    assert vlm.count_target(S.make_scene(0), "what letter is written in the image ?") is None


def test_family_defaults_fill_only_unset_fields():
    import argparse

    assert vlm.TrainConfig(family="llava").lm_steps == vlm.FAMILY_DEFAULTS["llava"]["lm_steps"]
    assert vlm.TrainConfig(family="qwen2_vl").qa_per_image == vlm.FAMILY_DEFAULTS["qwen2_vl"]["qa_per_image"]
    assert vlm.TrainConfig(family="llava", lm_steps=7).lm_steps == 7
    sub = argparse.ArgumentParser().add_subparsers()
    vlm.add_parser(sub)
    parser = sub.choices["vlm"]
    assert parser.parse_args(["llava", "--out", "x", "--rope-theta", "5e5"]).rope_theta == 5e5
    args = parser.parse_args(["qwen2_vl", "--out", "x", "--lm-batch", "3"])
    cfg = vlm.config_from_args(vlm.TrainConfig, args)
    assert (cfg.lm_batch, cfg.lm_steps) == (3, vlm.FAMILY_DEFAULTS["qwen2_vl"]["lm_steps"])
    assert cfg.rope_theta == 10000.0 and vlm.TrainConfig(family="llava").rope_theta == 1e6
    with pytest.raises(ValueError, match="unknown tiny VLM family 'blip'"):
        vlm.TrainConfig(family="blip")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_rope_theta_reaches_the_language_model(family):
    tok = vlm.build_tokenizer()
    base = vlm.build_model(family, len(tok), image_size=32)
    big = vlm.build_model(family, len(tok), image_size=32, rope_theta=1e6)
    assert base.config.text_config.rope_parameters["rope_theta"] == 10000.0
    assert big.config.text_config.rope_parameters["rope_theta"] == 1e6
    if family == "qwen2_vl":
        assert big.config.text_config.rope_parameters["mrope_section"] == [4, 6, 6]
    inv = {n: b for n, b in big.named_buffers() if "language_model" in n and n.endswith("inv_freq")}
    inv0 = {n: b for n, b in base.named_buffers() if "language_model" in n and n.endswith("inv_freq")}
    assert inv and all(float(inv[n][-1]) < float(inv0[n][-1]) for n in inv)  # a larger base: slower rotations


@pytest.mark.parametrize(("device", "match"), [("tpu9", "not a torch device"), ("meta", "runs on cpu or cuda")])
def test_bad_training_device_is_named(tmp_path, device, match):
    cfg = vlm.TrainConfig(family="qwen2_vl", device=device)
    with pytest.raises(ValueError, match=f"device='{device}'.*{match}"):
        vlm.train_vlm(cfg, tmp_path, log=lambda *_: None)
