"""The tokenizer → VLM bridge: the `prefix` reducer, a 1-D tokenizer as the vision tower of a stock LLaVA
(save / load / generate / compress), KARL's per-image lengths, and `vtc train bridge` resuming bit for bit."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import Tensor
from transformers import AutoModelForImageTextToText, AutoProcessor
from vtc.adapters import adapter_of
from vtc.eval.benchmarks import shapes as S
from vtc.eval.harness import build_inputs

import vtc
from vtc.train import bridge
from vtc.types import VisualTokens

TINY = dict(image_size=16, patch_size=4, width=32, enc_depth=1, dec_depth=1, num_heads=2, num_tokens=8)


# ---------------------------------------------------------------------- the prefix reducer
def _prefix_ref(n: int, k: int, valid: list[bool] | None, length: int | None) -> list[int]:
    """The first min(k, length) valid positions, by a loop."""
    cap = k if length is None else min(k, max(length, 1))
    out = []
    for j in range(n):
        if (valid is None or valid[j]) and len(out) < cap:
            out.append(j)
    return out


@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_prefix_keeps_the_first_tokens(with_valid, with_lengths):
    g = torch.Generator().manual_seed(0)
    b, n = 5, 12
    x = torch.randn(b, n, 3, generator=g)
    valid = torch.rand(b, n, generator=g) > 0.3 if with_valid else None
    if valid is not None:
        valid[:, 0] = True
    lengths = torch.tensor([1, 3, 7, 12, 0]) if with_lengths else None
    r = vtc.create_reducer("prefix")
    for k in (1, 4, 9):
        sel = r(VisualTokens(x, valid=valid, lengths=lengths), budget=k)
        for i in range(b):
            want = _prefix_ref(
                n, k, None if valid is None else valid[i].tolist(), None if lengths is None else int(lengths[i])
            )
            if valid is not None and k >= int(valid[i].sum()) and lengths is None:
                want = [j for j in range(n) if valid[i, j]]
            assert sel.indices[i][sel.mask[i]].tolist() == want
            torch.testing.assert_close(sel.valid_tokens(i), x[i, want])
    assert r(VisualTokens(x, lengths=lengths), budget=n).indices.tolist() == [list(range(n))] * b  # identity


def test_prefix_lengths_off_and_bad_lengths():
    x = torch.randn(2, 6, 3)
    lengths = torch.tensor([2, 5])
    sel = vtc.create_reducer("prefix", use_lengths=False)(VisualTokens(x, lengths=lengths), budget=4)
    assert sel.num_kept.tolist() == [4, 4]
    with pytest.raises(ValueError, match="one count per sample"):
        vtc.create_reducer("prefix")(VisualTokens(x, lengths=torch.tensor([1, 2, 3])), budget=4)


# ---------------------------------------------------------------------- the bridge model
def _bridge(tmp_path, name: str, error: float = 0.0, **cfg):
    tok = vtc.create_tokenizer(name, **TINY)
    torch.manual_seed(1)
    for p in tok.parameters():  # a random but non-degenerate tokenizer
        p.data.normal_(0, 0.3)
    tok.save_pretrained(tmp_path / f"tok_{name}")
    c = bridge.BridgeConfig(tokenizer=name, tokenizer_path=str(tmp_path / f"tok_{name}"), error=error, **cfg)
    return bridge.build_bridge(c), c


def _batch(processor, n: int = 3):
    bench = S.ShapesBenchmark(split="val", per_type=1)
    samples = [bench[i] for i in range(n)]
    return build_inputs(processor, samples, bench, "cpu")


def _gen(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=3, do_sample=False)


@pytest.mark.parametrize("name", ["flextok", "one_d_piece"])
def test_bridge_saves_loads_and_generates(tmp_path, name):
    (model, processor, _), _ = _bridge(tmp_path, name)
    model.eval()
    inputs = _batch(processor)
    assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == [8, 8, 8]  # K placeholders
    assert inputs["pixel_values"].shape[-2:] == (16, 16) and 0 <= inputs["pixel_values"].min()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "m").eval()
    ref = dict(model.named_buffers())
    for k, v in loaded.named_buffers():  # derived (non-persistent) buffers are rebuilt, not left empty
        assert torch.equal(v, ref[k]), k
    inputs2 = _batch(AutoProcessor.from_pretrained(tmp_path / "m"))
    assert torch.equal(_gen(model, inputs), _gen(loaded, inputs2))
    with vtc.compressed(loaded, "prefix", budget=8):  # full budget: the untouched model
        assert torch.equal(_gen(loaded, inputs2), _gen(model, inputs))


def test_prefix_on_the_bridge_is_the_language_model_on_the_first_tokens(tmp_path):
    (model, processor, _), _ = _bridge(tmp_path, "flextok")
    model.eval()
    inputs = _batch(processor)
    k = 3
    with torch.no_grad():
        with vtc.compressed(model, "prefix", budget=k):
            logits = model(**inputs).logits
        feats = torch.stack(list(model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))
        img = model.config.image_token_id
        for b in range(3):
            ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
            cols = (ids == img).nonzero().squeeze(-1)
            keep = torch.ones_like(ids, dtype=torch.bool)
            keep[cols[k:]] = False
            emb = model.get_input_embeddings()(ids).clone()
            emb[cols] = feats[b]
            pos = torch.arange(len(ids))[keep]  # kept tokens keep their positions (vtc.compress's default)
            out = model.model.language_model(inputs_embeds=emb[keep][None], position_ids=pos[None])
            ref = model.lm_head(out.last_hidden_state)[0]
            torch.testing.assert_close(logits[b, -ref.shape[0] :], ref, atol=1e-5, rtol=1e-4)


def test_karl_tower_lengths_cap_the_prefix(tmp_path):
    (model, processor, _), _ = _bridge(tmp_path, "karl", error=0.1)
    model.eval()
    inputs = _batch(processor, 4)
    tower = model.model.vision_tower
    with torch.no_grad():
        lengths = tower(inputs["pixel_values"]).lengths
        want = tower.tokenizer.predict_num_tokens(inputs["pixel_values"], 0.1)
    assert torch.equal(lengths, want) and int(lengths.min()) >= 1
    with vtc.compressed(model, "prefix", budget=6):
        _gen(model, inputs)
        assert adapter_of(model).last["kept"] == torch.clamp(lengths, max=6).tolist()
    model.config.vision_config.error = None  # not adaptive: every image keeps the budget
    with vtc.compressed(model, "prefix", budget=6):
        _gen(model, inputs)
        assert adapter_of(model).last["kept"] == [6] * 4


def test_training_batches_place_the_text_where_evaluation_does(tmp_path):
    (model, _, tok), _ = _bridge(tmp_path, "flextok")
    latents = torch.randn(2, 8, 32)  # TINY width
    turns = [[("how many circles are there ?", "two")]] * 2
    rows, starts = [], []
    ids, lab, mask, pos, feats = bridge.prefix_batch(model, tok, latents, [3, 8], turns, rows, starts)
    for j in range(2):  # the question's span, from its first token to the row that predicts the answer
        assert tok.decode(ids[j, starts[j][0] : rows[j][0] + 1]) == turns[j][0][0]
    assert feats.shape[0] == 3 + 8
    torch.testing.assert_close(feats[:3], model.model.multi_modal_projector(latents[0, :3]))
    n0 = int(mask[0].sum())
    text0 = pos[0, 4:n0].tolist()
    assert pos[0, :4].tolist() == [0, 1, 2, 3] and text0 == list(range(9, 9 + len(text0)))
    assert pos[1, : int(mask[1].sum())].tolist() == list(range(int(mask[1].sum())))


@pytest.mark.parametrize("tower_lr,vision_steps", [(0.0, 0), (1e-3, 0), (0.0, 4)])
def test_train_bridge_resumes_bit_for_bit(tmp_path, monkeypatch, tower_lr, vision_steps):
    kw = dict(pool=8, steps=4, batch=2, qa_per_image=2, val_every=4, val_per_type=1, checkpoint_every=2, attn_sup=1.0)
    kw.update(tower_lr=tower_lr, obj_sup=1.0 if tower_lr else 0.0)  # the object heads' state resumes too
    kw.update(vision_steps=vision_steps, vision_pool=8, vision_batch=2)  # killed in the vision stage, then the LM's
    _, cfg = _bridge(tmp_path, "flextok", **kw)
    straight = bridge.train_bridge(cfg, tmp_path / "a", log=lambda *_: None)
    real_save = bridge.vlm.save_state

    def save_then_die(path, modules, opt, meta):
        real_save(path, modules, opt, meta)
        raise KeyboardInterrupt

    monkeypatch.setattr(bridge.vlm, "save_state", save_then_die)
    for _ in range(3 if vision_steps else 1):  # vision steps 2 and 4, the stage's end (else LM step 2)
        with pytest.raises(KeyboardInterrupt):
            bridge.train_bridge(cfg, tmp_path / "b", log=lambda *_: None)
    monkeypatch.setattr(bridge.vlm, "save_state", real_save)
    resumed = bridge.train_bridge(cfg, tmp_path / "b", log=lambda *_: None)
    a = AutoModelForImageTextToText.from_pretrained(straight).state_dict()
    b = AutoModelForImageTextToText.from_pretrained(resumed).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in (tmp_path / "b" / "work" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["stage"] == "lm"] == [0]  # step 0 logged once, not again on resume
    assert all(r["qground"] > 0 and r["ground"] > 0 for r in log if r["stage"] == "lm")  # both losses on
    assert all((r["obj"] > 0) == (tower_lr > 0) for r in log if r["stage"] == "lm")
    assert any(r["stage"] == "val" and "k8" in r and "k2" in r for r in log)
    log_a = [json.loads(x) for x in (tmp_path / "a" / "work" / "log.jsonl").read_text().splitlines()]
    vision = [r for r in log_a if r["stage"] == "vision_val"]
    assert [r["step"] for r in vision] == ([4] if vision_steps else [])
    assert all({"k8_colour", "k8_shape", "k2_shape"} <= r.keys() for r in vision)
    with pytest.raises(ValueError, match="trained with attn_sup=1, but this run asks for 0; pass --attn-sup 1"):
        bridge.train_bridge(dataclasses.replace(cfg, attn_sup=0.0), tmp_path / "b", log=lambda *_: None)


def test_bridge_losses_are_on_by_default_and_off_when_asked(tmp_path):
    from safetensors.torch import load_file

    assert (bridge.BridgeConfig().attn_sup, bridge.BridgeConfig().question_sup) == (1.0, 1.0)
    kw = dict(pool=8, steps=2, batch=2, qa_per_image=2, val_every=2, val_per_type=1, attn_sup=0.0, question_sup=0.0)
    _, cfg = _bridge(tmp_path, "flextok", **kw)
    bridge.train_bridge(cfg, tmp_path / "off", log=lambda *_: None)
    assert set(load_file(str(tmp_path / "off" / "work" / "latents.safetensors"))) == {"latents", "lengths"}
    log = [json.loads(x) for x in (tmp_path / "off" / "work" / "log.jsonl").read_text().splitlines()]
    assert all(r["ground"] == 0 and r["qground"] == 0 for r in log if r["stage"] == "lm")


def test_vtc_eval_runs_the_karl_bridge_with_its_own_lengths(tmp_path):
    from vtc.eval import harness

    (model, processor, _), _ = _bridge(tmp_path, "karl", error=0.1)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    cfg = harness.EvalConfig(
        model=str(tmp_path / "m"), methods=["prefix", "random"], budgets=[2, 6], limit=6, batch_size=3,
        out=tmp_path / "run", progress=False, threads=1,
    )  # fmt: skip
    rows = {(r["method"], str(r["budget"])): r for r in harness.run_eval(cfg)}
    tower = AutoModelForImageTextToText.from_pretrained(tmp_path / "m").model.vision_tower
    bench = S.ShapesBenchmark()
    with torch.no_grad():
        pix = processor.image_processor(images=[bench[i].images[0] for i in range(6)], return_tensors="pt")
        lengths = tower(pix["pixel_values"]).lengths
    assert rows[("full", "all")]["visual_tokens"] == 8
    assert rows[("random", "6")]["visual_tokens"] == 6
    assert rows[("prefix", "6")]["visual_tokens"] == pytest.approx(lengths.clamp(max=6).float().mean().item())
    assert rows[("prefix", "2")]["tflops"] < rows[("prefix", "6")]["tflops"] <= rows[("full", "all")]["tflops"]


# ---------------------------------------------------------------------- grounding targets: which tokens draw an object
@pytest.mark.parametrize("name", ["flextok", "one_d_piece"])
def test_token_attribution_against_one_ablation_at_a_time(tmp_path, name):
    tok = vtc.create_tokenizer(name, **TINY).eval()
    torch.manual_seed(1)
    for p in tok.parameters():
        p.data.normal_(0, 0.3)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ids_map = torch.zeros(2, 16, 16, dtype=torch.long)
    ids_map[0, 2:6, 3:9] = 1  # object 0 of image 0
    ids_map[0, 10:14, 10:12] = 3  # object 2 of image 0 (object 1 is hidden)
    ids_map[1, 0:16, 0:4] = 2
    got = bridge.token_attribution(tok, x, ids_map, slots=4)
    assert got.shape == (2, 8, 4)
    q = tok.quantizer
    codes = q.ids_to_codes(torch.arange(q.codebook_size)).float()
    neutral = int(codes.norm(dim=-1).argmin())
    for b in range(2):
        with torch.no_grad():
            t = tok.encode(x[b : b + 1])
            base = tok.decode(t)
        for j in range(8):
            ids = t.ids.clone()
            ids[0, j] = neutral
            with torch.no_grad():
                change = ((tok.decode(vtc.tokenizers.TokenizedImages(ids)) - base) ** 2).sum(1)[0]  # [S, S]
            for m in range(4):
                sel = ids_map[b] == m + 1
                want = float(change[sel].mean()) if sel.any() else 0.0
                assert float(got[b, j, m]) == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert float(got[0, :, 1].abs().sum()) == 0 and float(got[0, :, 0].sum()) > 0


def test_grounding_tokens_are_the_fewest_reaching_the_share():
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        e = torch.rand(8, generator=g) ** 3
        for k in (1, 3, 8):
            got = bridge.grounding_tokens(e, k)
            assert got and all(j < k for j in got)
            assert float(e[got].sum()) >= 0.5 * float(e[:k].sum()) - 1e-6
            # no smaller set of the kept tokens reaches the share: the best one of size len(got) - 1 falls short
            best = float(torch.sort(e[:k], descending=True).values[: len(got) - 1].sum())
            assert best < 0.5 * float(e[:k].sum())
    assert bridge.grounding_tokens(torch.zeros(8), 8) == []


def test_question_tokens_follow_the_objects_the_question_refers_to():
    scene = S.make_scene(3 * 10**6 + 5)
    n = len(scene.objects)
    att = torch.zeros(8, bridge.SLOTS)
    for i in range(n):
        att[i % 8, i] = 1.0  # object i is drawn by token i % 8 alone
    if scene.letter is not None:
        att[7, n] = 1.0
    rng = __import__("numpy").random.default_rng(0)
    seen = set()
    for _ in range(200):
        q, _ = S.ask(scene, S.QTYPES[int(rng.integers(6))], rng) or (None, None)
        if q is None:
            continue
        seen.add(q.split()[0] + q.split()[1])
        cols = bridge.question_tokens(scene, q, att, 8)
        ref = scene.referred(q)
        if q.startswith("where is") and len(ref) == 2:
            a = " ".join(q.split()[3:5])
            assert len(cols) == 2
            assert cols[0] == sorted({1 + i % 8 for i in ref if scene.objects[i].name == a})
            assert cols[1] == sorted({1 + i % 8 for i in ref if scene.objects[i].name != a})
        else:
            want = sorted({1 + (7 if i == n else i % 8) for i in ref})
            assert cols == [want]
    assert len(seen) >= 5
    if scene.letter is not None:  # the tag is drawn by token 7 (column 8), which a 4-token prefix cuts
        assert bridge.question_tokens(scene, "what letter is written in the image ?", att, 8) == [[8]]
        assert bridge.question_tokens(scene, "what letter is written in the image ?", att, 4) == [[]]


@pytest.mark.parametrize("name,error", [("flextok", 0.0), ("karl", 0.1)])
def test_tower_lr_fine_tunes_the_encoder_and_nothing_else_of_the_tokenizer(tmp_path, name, error):
    import numpy as np

    kw = dict(pool=8, steps=3, batch=2, qa_per_image=2, val_every=3, val_per_type=1)
    (_, processor, _), cfg = _bridge(tmp_path, name, error=error, **kw)
    trained = vtc.create_tokenizer(name, pretrained=cfg.tokenizer_path).state_dict()
    images, _ = bridge.vlm.render_pool(3, 4, seed0=5, workers=1)
    pix = processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(bridge.tower_pixels(processor, images).float() / 255, pix, atol=1e-6, rtol=0)

    def tower_of(out):
        return AutoModelForImageTextToText.from_pretrained(out).model.vision_tower.tokenizer.state_dict()

    quiet = dict(log=lambda *_: None)
    frozen = tower_of(bridge.train_bridge(cfg, tmp_path / "frozen", **quiet))
    assert all(torch.equal(frozen[k], trained[k]) for k in trained)  # tower_lr = 0: the tokenizer as trained
    tuned = tower_of(bridge.train_bridge(dataclasses.replace(cfg, tower_lr=1e-2), tmp_path / "tuned", **quiet))
    moved = {k for k in trained if not torch.equal(tuned[k], trained[k])}
    assert any(k.startswith("encoder.") for k in moved)  # the QA loss reaches the encoder through the latents
    assert not any(k.startswith(("decoder.", "quantizer.")) for k in moved), sorted(moved)  # no VQ code re-seeded
    if name == "karl":  # the error condition feeds the encoder; the halting head reads the latents, off the path
        assert "error_embed" in moved and not any(k.startswith(("halt_mlp.", "ln_halt.")) for k in moved)
    assert np.isfinite([float(v.float().abs().max()) for v in tuned.values()]).all()
    # the vision stage (object and patch heads, no LM) moves the same weights, and the LM stage then keeps them
    vcfg = dataclasses.replace(cfg, vision_steps=3, vision_pool=8, vision_batch=2, val_every=3)
    seen = tower_of(bridge.train_bridge(vcfg, tmp_path / "vision", **quiet))
    moved = {k for k in trained if not torch.equal(seen[k], trained[k])}
    assert any(k.startswith("encoder.") for k in moved)
    assert not any(k.startswith(("decoder.", "quantizer.")) for k in moved), sorted(moved)  # KARL's halting head
    # may move: `halt_keep` distils it, on the tuned latents, towards the halting of the tokenizer as trained
    from safetensors.torch import load_file

    cached = load_file(str(tmp_path / "vision" / "work" / "latents.safetensors"))
    assert "head_attribution" in cached and "attribution" not in cached  # grounded where the heads read
    after = cached["latents"]
    z = load_file(str(tmp_path / "vision" / "work" / "vision_pool.safetensors"))
    assert z["pixels"].shape == (8, 3, 16, 16) and z["labels"].shape == (8, 4, 4, 4)
    with torch.no_grad():  # the LM stage's cached latents are the tuned encoder's
        model = AutoModelForImageTextToText.from_pretrained(tmp_path / "vision")
        want = model.model.vision_tower(pix).last_hidden_state
    images8, _ = bridge.vlm.render_pool(8, 4, seed0=3 * 10**6, workers=1)
    torch.testing.assert_close(after[:3], bridge.tower_latents(model, processor, images8)[0][:3])
    assert want.shape[1:] == after.shape[1:]
    log = [json.loads(x) for x in (tmp_path / "vision" / "work" / "log.jsonl").read_text().splitlines()]
    first = next(r for r in log if r["stage"] == "vision")
    if name == "karl":  # the halting-keeping loss: zero while the encoder is still the trained one
        assert first["step"] == 0 and abs(first["halt"]) < 1e-5 and first["obj"] > 0
    else:
        assert first["halt"] == 0.0


def test_binary_kl_against_torch_distributions():
    g = torch.Generator().manual_seed(0)
    p, q = torch.rand(4, 7, generator=g), torch.rand(4, 7, generator=g)
    want = torch.distributions.kl_divergence(torch.distributions.Bernoulli(p), torch.distributions.Bernoulli(q))
    torch.testing.assert_close(bridge.binary_kl(p, q), want.mean(), rtol=1e-4, atol=1e-6)
    assert float(bridge.binary_kl(p, p)) == pytest.approx(0.0, abs=1e-7)


def test_karl_tower_reports_the_halting_its_lengths_come_from(tmp_path):
    (model, _, _), _ = _bridge(tmp_path, "karl", error=0.1)
    tower = model.model.vision_tower.eval()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        out = tower(x)
        t = tower.tokenizer.encode(x, error=0.1)
    assert out.halt_prob.shape == (3, 8) and torch.equal(out.halt_prob, t.extras["halt_prob"])
    assert torch.equal(out.lengths, t.lengths)
    tower.config.error = None
    with torch.no_grad():
        assert tower(x).halt_prob is None and tower(x).lengths is None


@pytest.mark.parametrize("name,error", [("flextok", 0.0), ("karl", 0.1)])
def test_patch_capture_returns_the_patch_states_the_last_block_reads(tmp_path, name, error):
    (model, _, _), _ = _bridge(tmp_path, name, error=error)
    tower = model.model.vision_tower.eval()
    enc = tower.tokenizer.encoder
    x = torch.rand(2, 3, 16, 16)
    seen = []
    handle = enc.blocks[-1].register_forward_pre_hook(lambda m, a: seen.append(a[0]))  # the whole sequence
    with torch.no_grad(), bridge.PatchCapture(enc) as cap:
        lat = tower(x).last_hidden_state
    handle.remove()
    p = 1 if name == "karl" else 0  # KARL's error-condition token comes first
    assert seen[0].shape[1] == p + enc.num_patches + lat.shape[1]
    assert torch.equal(cap.patches(lat.shape[1]), seen[0][:, p : p + enc.num_patches])
    assert len(enc.blocks[-1]._forward_pre_hooks) == 0  # removed on exit


def test_object_labels_name_every_object_and_tag_of_the_scene():
    colours = list(S.COLOURS)
    for seed in range(20):
        scene = S.make_scene(seed)
        labels = bridge.object_labels(scene)
        objs, tags = [x for x in labels if x[2] == 0], [x for x in labels if x[2] == 1]
        assert len(objs) == len(scene.objects) and len(tags) == len(scene.tags())
        for (x, y, _, c, _), o in zip(objs, scene.objects, strict=True):
            assert (colours[int(c) // len(S.SHAPES)], S.SHAPES[int(c) % len(S.SHAPES)]) == (o.colour, o.shape)
            assert (x, y) == (o.cx / scene.size, o.cy / scene.size) and 0 <= x <= 1 and 0 <= y <= 1
        for (_, _, _, c, _), (letter, _) in zip(tags, scene.tags(), strict=True):
            assert S.LETTERS[int(c)] == letter


def test_object_heads_read_only_the_kept_tokens_and_learn():
    torch.manual_seed(0)
    scenes = [S.make_scene(s) for s in range(6)]
    heads = bridge.ObjectHeads(32)
    lat = torch.randn(6, 8, 32, requires_grad=True)
    ks = [1, 3, 8, 2, 5, 8]
    loss = heads.loss(lat, ks, scenes)
    loss.backward()
    for b, k in enumerate(ks):  # the dropped tail gets no gradient, the kept prefix does
        assert lat.grad[b, k:].abs().sum() == 0 and lat.grad[b, :k].abs().sum() > 0
    changed = lat.detach().clone()
    changed[0, 1:] += 5.0
    assert torch.equal(heads.loss(changed, ks, scenes), heads.loss(lat.detach(), ks, scenes))
    # latents that hold each object's class at its own token: the heads learn to read them (chance: ~1.8)
    free = torch.zeros(6, 8, 32)
    for b, sc in enumerate(scenes):
        for j, (x, y, _, c, _) in enumerate(bridge.object_labels(sc)):
            free[b, j, int(c) % 32] = 4.0
            free[b, j, 30:] = torch.tensor([x, y]) * 4
    opt = torch.optim.Adam(heads.parameters(), lr=3e-3)
    first = float(heads.loss(free, [8] * 6, scenes).detach())
    for _ in range(150):
        opt.zero_grad()
        heads.loss(free, [8] * 6, scenes).backward()
        opt.step()
    assert float(heads.loss(free, [8] * 6, scenes).detach()) < 0.3 * first
    acc = heads.accuracy(free, [8] * 6, scenes)
    assert acc["colour"] == acc["shape"] == 1.0 and set(acc) <= {"colour", "shape", "letter"}
    assert heads.accuracy(free, [1] * 6, scenes)["shape"] < 1.0  # one kept token cannot hold every object


def test_head_attribution_is_each_objects_attention_in_its_slot():
    torch.manual_seed(0)
    scenes = [S.make_scene(s) for s in range(5)]
    heads = bridge.ObjectHeads(32).eval()
    lat = torch.randn(5, 8, 32)
    att = heads.attribution(lat, scenes)
    assert att.shape == (5, 8, bridge.SLOTS)
    for b, sc in enumerate(scenes):
        labels = bridge.object_labels(sc)
        for m, row in enumerate(labels):  # one query at a time, by the module's own attention
            q = heads.embed(torch.tensor([[row[:2]]]), torch.tensor([[row[2]]]))
            kv = heads.norm(lat[b : b + 1])
            _, w = heads.attn(q, kv, kv, need_weights=True)
            torch.testing.assert_close(att[b, :, m], w[0, 0], rtol=1e-5, atol=1e-6)
        assert torch.allclose(att[b, :, : len(labels)].sum(0), torch.ones(len(labels)))
        assert att[b, :, len(labels) :].abs().sum() == 0  # empty slots stay empty


def test_slot_matching_against_every_assignment():
    import itertools

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        cost = torch.rand(5, 3, generator=g)
        rows, cols = bridge.SlotHeads.match(cost)
        best = min(sum(float(cost[r, c]) for r, c in zip(p, range(3), strict=True))
                   for p in itertools.permutations(range(5), 3))  # fmt: skip
        assert sorted(cols) == [0, 1, 2] and len(set(rows)) == 3
        assert sum(float(cost[r, c]) for r, c in zip(rows, cols, strict=True)) == pytest.approx(best)


def test_slot_heads_learn_one_object_per_token_within_the_prefix():
    torch.manual_seed(0)
    scenes = [S.make_scene(s) for s in range(6)]
    slots = bridge.SlotHeads(48)
    cls0, _ = slots.targets(scenes[0])
    assert len(cls0) == len(scenes[0].objects) + len(scenes[0].tags())
    lat = torch.randn(6, 8, 48, requires_grad=True)
    ks = [2, 8, 8, 3, 8, 8]
    slots.loss(lat, ks, scenes).backward()
    assert all(lat.grad[b, k:].abs().sum() == 0 for b, k in enumerate(ks))  # beyond the prefix: never read
    # latents that carry each object's class and centre in a token of their own: the heads learn to name them
    free = torch.zeros(6, 8, 48)
    for b, sc in enumerate(scenes):
        cls, cen = slots.targets(sc)
        for j, (c, xy) in enumerate(zip(cls, cen, strict=True)):
            free[b, j, int(c)] = 4.0
            free[b, j, 44:46] = xy * 4
    opt = torch.optim.Adam(slots.parameters(), lr=1e-2)
    before = slots.accuracy(free, [8] * 6, scenes)
    for _ in range(200):
        opt.zero_grad()
        slots.loss(free, [8] * 6, scenes).backward()
        opt.step()
    assert slots.accuracy(free, [8] * 6, scenes) >= 0.8 > 0.1 > before  # chance: 1 / 35 (the matching is free)


def test_init_projector_standardises_the_latents_and_sets_the_token_scale():
    from transformers import LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    cfg = LlavaConfig(vision_config={"model_type": "clip_vision_model", "hidden_size": 6, "num_attention_heads": 2},
                      text_config=LlamaConfig(hidden_size=16, num_attention_heads=2), projector_hidden_act="gelu",
                      )  # fmt: skip
    torch.manual_seed(0)
    x = torch.randn(50, 8, 6) * torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0, 1.0]) + torch.arange(6.0) * 7
    a, b = torch.rand(6) * 5 + 0.1, torch.randn(6) * 3  # a per-dimension affine change of the latents
    p1, p2 = LlavaMultiModalProjector(cfg), LlavaMultiModalProjector(cfg)
    bridge.init_projector(p1, x, rms=3.0, seed=4)
    bridge.init_projector(p2, x * a + b, rms=3.0, seed=4)
    with torch.no_grad():
        y1, y2 = p1(x), p2(x * a + b)  # [50, 8, 16]
    assert y1.pow(2).mean().sqrt().item() == pytest.approx(3.0, rel=1e-4)
    torch.testing.assert_close(y1, y2, rtol=1e-3, atol=1e-3)  # what the projector sees does not depend on units
    assert y1.std(dim=(0, 1)).min() > 0.1  # no dead output dimension


@pytest.mark.parametrize("proj_rms", [0.0, 4.0])
def test_a_fresh_lm_stage_starts_from_the_readable_projector(tmp_path, proj_rms):
    from safetensors.torch import load_file

    kw = dict(pool=8, steps=0, batch=2, qa_per_image=2, val_per_type=1, attn_sup=0.0, proj_rms=proj_rms)
    (model, _, _), cfg = _bridge(tmp_path, "flextok", **kw)
    out = bridge.train_bridge(cfg, tmp_path / "run", log=lambda *_: None)
    saved = AutoModelForImageTextToText.from_pretrained(out).model.multi_modal_projector
    latents = load_file(str(tmp_path / "run" / "work" / "latents.safetensors"))["latents"]
    with torch.no_grad():
        rms = saved(latents).pow(2).mean().sqrt().item()
    if proj_rms:
        bridge.init_projector(model.model.multi_modal_projector, latents, proj_rms, cfg.seed)
        assert rms == pytest.approx(proj_rms, rel=1e-3)
        for k, v in model.model.multi_modal_projector.state_dict().items():
            assert torch.equal(v, saved.state_dict()[k]), k
    else:  # transformers' own init (std 0.02): tokens far smaller than the LM can read (README)
        assert rms < 0.1


def _colour_task(n: int, seed: int) -> tuple[Tensor, list, list]:
    """`n` scenes as oracle tokens `[n, 8, 32]` (token j: object j's colour one-hot in 0-5 and shape in 6-9,
    scaled by 3; the rest zero), each with one "what colour is the <shape> ?" turn and its grounding target."""
    r = np.random.default_rng(seed)
    lat, turns, targets = torch.zeros(n, 8, 32), [], []
    i = 0
    while len(turns) < n:
        sc = S.make_scene(seed * 10**5 + i)
        i += 1
        qa = S.ask(sc, "colour", r)
        if qa is None or len(sc.objects) > 8:
            continue
        b = len(turns)
        for j, o in enumerate(sc.objects):
            lat[b, j, list(S.COLOURS).index(o.colour)] = 3
            lat[b, j, 6 + S.SHAPES.index(o.shape)] = 3
        turns.append([qa])
        targets.append([[[1 + j for j in g] for g in bridge.vlm.head_objects(sc, qa[0])]])
    return lat, turns, targets


@pytest.mark.parametrize("proj_rms", [4.0, 0.0])
def test_the_lm_learns_to_read_its_tokens_only_from_a_readable_projector(tmp_path, proj_rms):
    """One-hot tokens and exact grounding targets: from `init_projector` the LM learns the colour of the asked
    object within 100 steps; from transformers' init (std 0.02) it stays at the answer prior (README)."""
    vlm = bridge.vlm
    (model, _, tok), _ = _bridge(tmp_path, "flextok")
    lat, turns, targets = _colour_task(16 * 100, seed=1)
    if proj_rms:
        bridge.init_projector(model.model.multi_modal_projector, lat, proj_rms)
    torch.manual_seed(0)
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    layers = model.model.language_model.layers
    capture = vlm.AttentionCapture({i: layers[i].self_attn for i in range(len(layers))})
    bridge.train_mode(model)
    for step in range(100):
        sl = slice(16 * step, 16 * step + 16)
        capture.store.clear()
        with capture:
            loss, q_loss, ground = bridge.qa_losses(
                model, tok, capture, lat[sl], [8] * 16, turns[sl], targets[sl], True
            )
        opt.zero_grad()
        (loss + q_loss + ground).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    model.eval()
    lat, turns, _ = _colour_task(200, seed=2)  # held-out scenes
    with torch.no_grad():
        ids, lab, mask, pos, feats = bridge.prefix_batch(model, tok, lat, [8] * 200, turns)
        logits, _ = vlm.lm_forward(model, "llava", ids, mask, feats, 0, None, pos)
    acc = ((logits[:, :-1].argmax(-1) == lab[:, 1:]) | (lab[:, 1:] == -100)).all(1).float().mean().item()
    assert acc >= 0.9 if proj_rms else acc <= 0.5, acc  # six colours: the prior is ~0.2
