"""Tests of the 1-D tokenizers (vtc.tokenizers) and their training loop, on tiny config-built models."""

from __future__ import annotations

import argparse
import json
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vtc
from vtc.tokenizers import FSQ, TokenizedImages, VectorQuantizer
from vtc.tokenizers.core import fill_tail, patchify, timestep_embedding
from vtc.tokenizers.data import COMPLEXITY_LEVELS, synthetic_images
from vtc.tokenizers.flextok import sample_keep_k
from vtc.train import tokenizer as train_mod

TINY = dict(image_size=16, patch_size=4, width=32, enc_depth=1, dec_depth=1, num_heads=2, num_tokens=8)
NAMES = ["flextok", "karl", "one_d_piece"]


def tiny(name: str, seed: int = 0, **kw) -> vtc.tokenizers.Tokenizer1D:
    torch.manual_seed(seed)
    cfg = {**TINY, **kw}
    if name != "flextok":
        cfg.setdefault("vq_codebook_size", 64)
    return vtc.create_tokenizer(name, **cfg).eval()


def images(b: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return synthetic_images(b, size, seed=seed)[0]


# ---------------------------------------------------------------------------------------------- quantizers
@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (7, 6, 2), (3,)])
def test_fsq_codes_on_grid_and_index_roundtrip(levels):
    q = FSQ(levels)
    z = 3 * torch.randn(200, len(levels), generator=torch.Generator().manual_seed(0))
    codes, ids, loss = q(z)
    half = torch.tensor([v // 2 for v in levels], dtype=torch.float32)
    lv = torch.tensor(levels, dtype=torch.float32)
    steps = codes * half  # integer digits around 0
    assert torch.allclose(steps, steps.round(), atol=1e-5)
    assert bool((steps.round() >= -half).all()) and bool((steps.round() <= lv - 1 - half).all())
    assert float(loss) == 0.0
    # slow mixed-radix oracle for the ids
    digits = (steps.round() + half).long()
    oracle = [sum(int(d[i]) * math.prod(levels[:i]) for i in range(len(levels))) for d in digits]
    assert ids.tolist() == oracle
    # every id <-> code round trip, and the codebook is a bijection onto the grid
    all_ids = torch.arange(q.codebook_size)
    all_codes = q.ids_to_codes(all_ids)
    assert torch.equal(q.codes_to_ids(all_codes), all_ids)
    assert torch.unique(all_codes, dim=0).shape[0] == q.codebook_size
    assert torch.equal(q.ids_to_codes(ids), codes.detach())


def test_fsq_every_level_is_reachable_and_gradient_is_straight_through():
    q = FSQ((8, 5))
    z = torch.linspace(-6, 6, 2001)[:, None].repeat(1, 2).requires_grad_(True)
    codes, _, _ = q(z)
    for ch, lv in enumerate((8, 5)):
        assert torch.unique(codes[:, ch].detach()).numel() == lv
    w = torch.randn(2001, 2, generator=torch.Generator().manual_seed(1))
    (codes * w).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (q.bound(z2) / torch.tensor([4.0, 2.0]) * w).sum().backward()
    assert torch.allclose(z.grad, z2.grad)


def test_vq_nearest_code_loss_and_straight_through():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4, commitment=0.25)
    z = torch.randn(10, 4, requires_grad=True)
    out, ids, loss = q(z)
    e = F.normalize(q.embedding.weight.detach(), dim=-1)
    zn = F.normalize(z.detach(), dim=-1)
    for i in range(10):  # brute force: nearest unit code by l2 distance
        d = [float(((zn[i] - e[j]) ** 2).sum()) for j in range(16)]
        assert int(ids[i]) == int(np.argmin(d))
    assert torch.allclose(out, e[ids], atol=1e-6)
    assert torch.allclose(q.ids_to_codes(ids), e[ids])
    expected = 1.25 * ((zn - e[ids]) ** 2).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    w = torch.randn(10, 4)
    (out * w).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2, dim=-1) * w).sum().backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)


def test_vq_restarts_codes_idle_for_restart_after_steps():
    torch.manual_seed(0)
    q = VectorQuantizer(32, 4, restart_after=3).train()
    z = torch.randn(6, 4)
    ids0 = q(z)[1]
    w0 = q.embedding.weight.detach().clone()
    q(z)  # identical batches: the same codes are used, the others idle for 2 then 3 steps
    assert torch.equal(q.embedding.weight, w0)
    q(z)
    dead = torch.ones(32, dtype=torch.bool)
    dead[ids0] = False
    w = q.embedding.weight.detach()
    assert torch.equal(w[~dead], w0[~dead])  # live codes untouched
    zn = F.normalize(z, dim=-1)
    assert all(bool(torch.isclose(zn, w[i]).all(1).any()) for i in dead.nonzero()[:, 0])  # re-seeded from z
    assert int(q.idle_steps.max()) == 0
    q.eval()
    q(torch.randn(6, 4))
    q(torch.randn(6, 4))
    q(torch.randn(6, 4))
    assert torch.equal(q.embedding.weight, w)  # never in eval mode
    q0 = VectorQuantizer(32, 4, restart_after=0).train()
    w_before = q0.embedding.weight.detach().clone()
    for _ in range(5):
        q0(z)
    assert torch.equal(q0.embedding.weight, w_before)


# ---------------------------------------------------------------------------------------------- API
def test_registry_listing_and_errors():
    assert vtc.list_tokenizers() == NAMES
    assert vtc.list_tokenizers("*tok") == ["flextok"]
    assert vtc.list_tokenizers(exclude="k*") == ["flextok", "one_d_piece"]
    with pytest.raises(ValueError, match="flextok"):
        vtc.create_tokenizer("flex_tok")
    with pytest.raises(ValueError, match="no config field"):
        vtc.create_tokenizer("flextok", widht=64)
    with pytest.raises(ValueError, match="power of two"):
        vtc.create_tokenizer("flextok", num_tokens=12, nested_sampling="pow2")


@pytest.mark.parametrize("name", NAMES)
def test_any_prefix_decodes_to_an_image(name):
    tok = tiny(name)
    x = images(3)
    with torch.no_grad():
        for k in range(1, 9):
            t = tok.encode(x, num_tokens=k)
            assert t.ids.shape == (3, k) and t.ids.dtype == torch.long
            assert t.features.shape == (3, k, 32)
            assert torch.equal(t.lengths, torch.full((3,), k))
            y = tok.decode(t)
            assert y.shape == (3, 3, 16, 16) and float(y.min()) >= 0 and float(y.max()) <= 1
        assert tok.encode(x).ids.shape == (3, 8)


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise_clear_errors(name):
    tok = tiny(name)
    x = images(2)
    for bad in (0, 9, -1):
        with pytest.raises(ValueError, match=rf"num_tokens={bad} .*\[1, 8\]"):
            tok.encode(x, num_tokens=bad)
    for bad in (2.5, True, "4"):
        with pytest.raises(TypeError, match="num_tokens must be an int"):
            tok.encode(x, num_tokens=bad)
    with pytest.raises(ValueError, match=r"\[0, 1\].*255"):
        tok.encode(x * 255)
    with pytest.raises(ValueError, match="image_size=16"):
        tok.encode(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="decode takes 1 to 8"):
        tok.decode(torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids must be in"):
        tok.decode(torch.full((2, 3), 10**6, dtype=torch.long))


def test_flextok_prefix_is_bit_identical_for_k_and_K_registers():
    tok = tiny("flextok")
    x = images(5)
    with torch.no_grad():
        full = tok.encode(x)
        for k in range(1, 9):
            part = tok.encode(x, num_tokens=k)
            assert torch.equal(part.features, full.features[:, :k])
            assert torch.equal(part.ids, full.ids[:, :k])
        # causality itself: changing later registers leaves the prefix untouched
        tok.encoder.latent_tokens[5:] += torch.randn(3, 32)
        assert torch.equal(tok.encode(x).features[:, :5], full.features[:, :5])
        assert not torch.equal(tok.encode(x).features[:, 5:], full.features[:, 5:])


def test_one_d_piece_registers_are_bidirectional_so_the_prefix_depends_on_the_tail():
    tok = tiny("one_d_piece")
    x = images(2)
    with torch.no_grad():
        before = tok.encode(x, num_tokens=4).features
        tok.encoder.latent_tokens[6:] += torch.randn(2, 32)
        assert not torch.allclose(tok.encode(x, num_tokens=4).features, before)


def _decoder_lengths(tok, fn):
    seen = []
    h = tok.decoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    try:
        fn()
    finally:
        h.remove()
    return seen


def test_one_d_piece_removes_the_tail_instead_of_masking_it():
    tok = tiny("one_d_piece")
    x = images(3)
    n_patches = (16 // 4) ** 2
    assert not hasattr(tok.decoder, "mask_token")
    assert tok.decoder.sink is not None  # one learned token always present, then the kept tokens only
    with torch.no_grad():
        ids = tok.encode(x).ids
        for k in (1, 3, 8):
            assert _decoder_lengths(tok, lambda k=k: tok.decode(ids[:, :k])) == [n_patches + 1 + k]
        no_sink = tiny("one_d_piece", decoder_sink=False)
        assert no_sink.decoder.sink is None
        assert _decoder_lengths(no_sink, lambda: no_sink.decode(ids[:, :3])) == [n_patches + 3]
        # per-image lengths (masked keys) equal decoding each image's own prefix alone
        mask = torch.arange(8)[None] < torch.tensor([[2], [5], [8]])
        y = tok.decode(TokenizedImages(ids, mask))
        for i, n in enumerate((2, 5, 8)):
            assert torch.allclose(y[i], tok.decode(ids[i : i + 1, :n])[0], atol=1e-5)
    # Tail Token Drop: one length per batch, and the decoder sequence is N + n long
    torch.manual_seed(3)
    tok.train()
    lens = _decoder_lengths(tok, lambda: tok.training_loss(x))
    assert len(lens) == 1 and n_patches + 2 <= lens[0] <= n_patches + 9
    tok_full = tiny("one_d_piece", tail_dropout=False).train()
    assert _decoder_lengths(tok_full, lambda: tok_full.training_loss(x)) == [n_patches + 9]


def test_flextok_masks_the_tail_with_one_learned_token():
    tok = tiny("flextok")
    x = images(2)
    with torch.no_grad():
        ids = tok.encode(x).ids
        assert _decoder_lengths(tok, lambda: tok.decode(ids[:, :3])) == [16 + 8]  # K slots, the tail masked
        keep = torch.arange(8)[None].expand(2, -1) < 3
        assert torch.equal(tok.decode(ids[:, :3]), tok.decode(TokenizedImages(ids, keep)))
        other = ids.clone()
        other[:, 3:] = (other[:, 3:] + 1) % 1000
        assert torch.equal(tok.decode(TokenizedImages(other, keep)), tok.decode(ids[:, :3]))  # tail ids ignored
        assert not torch.allclose(tok.decode(ids[:, :3]), tok.decode(ids))


@pytest.mark.parametrize("mode", ["uniform", "pow2", "uniform_pow2"])
def test_nested_dropout_sampling(mode):
    torch.manual_seed(0)
    k = sample_keep_k(mode, 16, 4000)
    assert int(k.min()) >= 1 and int(k.max()) <= 16
    values = set(k.tolist())
    if mode == "uniform":
        assert values == set(range(1, 17))
    else:
        assert values == {1, 2, 4, 8, 16}
    if mode == "uniform_pow2":  # U{1..16} rounded up: P(16) = 8/16
        assert abs(float((k == 16).float().mean()) - 0.5) < 0.05
    tok = tiny("flextok", tail_dropout=False)
    assert bool(tok.sample_keep(3, torch.device("cpu")).all())


def test_flextok_flow_decoder_samples_deterministically_with_a_generator():
    tok = tiny("flextok", decoder="flow")
    x = images(2)
    tok.train()
    loss, logs = tok.training_loss(x)
    loss.backward()
    assert math.isfinite(logs["loss"])
    tok.eval()
    with torch.no_grad():
        t = tok.encode(x, num_tokens=4)
        calls = _decoder_lengths(tok, lambda: tok.decode(t, steps=3, generator=torch.Generator().manual_seed(0)))
        assert calls == [16 + 8] * 3  # one decoder pass per Euler step
        a = tok.decode(t, steps=3, generator=torch.Generator().manual_seed(0))
        b = tok.decode(t, steps=3, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a, b) and a.shape == (2, 3, 16, 16)
        g = tok.decode(t, steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
        assert g.shape == (2, 3, 16, 16)


# ---------------------------------------------------------------------------------------------- KARL
def test_karl_bins_round_up():
    tok = tiny("karl")
    err = torch.tensor([0.0001, 0.005, 0.0051, 0.045, 0.38, 0.9])
    slow = []
    for e in err.tolist():
        above = [i for i, b in enumerate(tok.config.error_bins) if b >= e]
        slow.append(above[0] if above else len(tok.config.error_bins) - 1)
    assert tok.bin_index(err).tolist() == slow


def test_karl_predicts_lengths_in_one_encoder_pass():
    tok = tiny("karl")
    x = images(6)
    calls = {"enc": 0, "dec": 0}
    h1 = tok.encoder.register_forward_hook(lambda *a: calls.__setitem__("enc", calls["enc"] + 1))
    h2 = tok.decoder.register_forward_hook(lambda *a: calls.__setitem__("dec", calls["dec"] + 1))
    lengths = tok.predict_num_tokens(x, error=0.05)
    h1.remove()
    h2.remove()
    assert calls == {"enc": 1, "dec": 0}
    assert lengths.shape == (6,) and int(lengths.min()) >= 1 and int(lengths.max()) <= 8
    with torch.no_grad():
        t = tok.encode(x, error=torch.full((6,), 0.05))
        keep = t.extras["halt_prob"] <= 0.75
        keep[~keep.any(1), t.extras["halt_prob"][~keep.any(1)].argmin(1)] = True
        assert torch.equal(t.mask, keep) and torch.equal(t.lengths, lengths)
        tok.halt_mlp[-1].bias.fill_(20.0)  # everything halts -> the least-halted token is kept
        assert tok.predict_num_tokens(x, 0.05).tolist() == [1] * 6
        tok.halt_mlp[-1].bias.fill_(-20.0)  # nothing halts -> all K
        assert tok.predict_num_tokens(x, 0.05).tolist() == [8] * 6
        y = tok.decode(t)
        assert y.shape == (6, 3, 16, 16)
        # halted tokens are removed from the decoder's attention: each image decodes as its kept tokens alone,
        # beside the learned sink token that is always present
        assert tok.decoder.sink is not None and not tok.encoder.pos_embed.requires_grad  # sin-cos positions
        mask = torch.arange(8)[None] < torch.tensor([[1], [3], [8], [2], [5], [7]])
        y = tok.decode(TokenizedImages(t.ids, mask))
        for i, n in enumerate((1, 3, 8, 2, 5, 7)):
            assert torch.allclose(y[i], tok.decode(t.ids[i : i + 1, :n])[0], atol=1e-5)
    with pytest.raises(ValueError, match="error must be > 0"):
        tok.encode(x, error=0.0)
    with pytest.raises(ValueError, match="one value per image"):
        tok.encode(x, error=torch.tensor([0.1, 0.2]))


def test_karl_training_iteration_has_both_phases():
    tok = tiny("karl", rebin_prob=0.0).train()
    x = images(4)
    enc, dec, halt = [], [], []
    hooks = [
        tok.encoder.register_forward_hook(
            lambda m, a, kw, o: enc.append((o.shape[1], kw["prefix"])), with_kwargs=True
        ),
        tok.decoder.register_forward_hook(lambda m, a, o: dec.append((a[1] if len(a) > 1 else None, o))),
        tok.halt_mlp.register_forward_hook(lambda m, a, o: halt.append(o[..., 0])),
    ]
    torch.manual_seed(1)
    probs_before = tok.phase_a_probs.clone()
    loss, logs = tok.training_loss(x)
    for h in hooks:
        h.remove()
    n_measure = len([n for n in tok.ladder() if n != logs["T"]])  # no-grad error measurements between A and B
    assert len(enc) == len(dec) == len(halt) == 2 + n_measure
    (t_a, cond_a), (t_b, cond_b) = enc[0], enc[-1]
    assert t_a == logs["T"] and t_a in range(1, 9) and t_b == 8  # phase A at T latents, phase B at all K
    # phase A asks for a near-lossless error (a bin <= 0.04) and decodes every one of its T tokens
    support = [i for i, b in enumerate(tok.config.error_bins) if b <= 0.04]
    assert any(torch.equal(cond_a[0, 0], tok.error_embed[i]) for i in support)
    assert dec[0][0] is None
    # phase B is conditioned on the binned error phase A reached, per image
    x2 = x * 2 - 1
    err = ((dec[0][1].detach().clamp(-1, 1) - x2).abs() / 2).mean((1, 2, 3))
    assert torch.equal(cond_b[:, 0], tok.error_embed[tok.bin_index(err)])
    # ... and its decoder drops exactly the tokens the halting head predicts as halted
    assert torch.equal(dec[-1][0], torch.sigmoid(halt[-1]) <= 0.75)
    # the phase-A error distribution decays every bin >= the smallest reached error
    expected = probs_before.clone()
    expected[tok.bins >= err.min()] *= 0.99
    assert torch.allclose(tok.phase_a_probs, expected / expected.sum())
    loss.backward()
    assert tok.halt_mlp[0].weight.grad is not None and tok.error_embed.grad is not None


def test_karl_halt_target_is_the_fewest_tokens_reaching_the_bin():
    tok = tiny("karl")
    gen = torch.Generator().manual_seed(0)
    errors = torch.rand(16, 5, generator=gen) * 0.3  # [B, C]
    counts = torch.tensor([8, 1, 2, 4, 6])
    idx = torch.randint(len(tok.config.error_bins), (16,), generator=gen)
    slow = []
    for b in range(16):
        ok = [int(n) for n, e in zip(counts, errors[b], strict=True) if int(tok.bin_index(e[None])) <= int(idx[b])]
        slow.append(min(ok) if ok else 8)
    assert tok.target_counts(errors, counts, idx).tolist() == slow


@pytest.mark.parametrize("rule", ["min_count", "sampled"])
def test_karl_flat_error_curve_gives_short_targets_not_the_sampled_count(rule, monkeypatch):
    # The collapse: at tiny scale the reached error barely moves with the token count, so the literal rule (target =
    # the sampled T for bin(e_T)) labels the same (image, bin) with every T, and the head learns one length. With
    # the minimum-program target, a count that is already as good as T wins: here every count is lossless.
    tok = tiny("karl", rebin_prob=0.0, halt_target=rule).train()
    monkeypatch.setattr(tok, "sample_count", lambda: 8)
    monkeypatch.setattr(tok, "_reached_error", lambda x, n, idx, w=None: torch.zeros(x.shape[0]))
    labels = []
    real_bce = F.binary_cross_entropy_with_logits
    monkeypatch.setattr(
        F, "binary_cross_entropy_with_logits", lambda a, t, **kw: labels.append(t) or real_bce(a, t, **kw)
    )
    _, logs = tok.training_loss(images(4))
    phase_b = labels[-1]  # [B, K] halting labels of phase B
    if rule == "sampled":
        assert logs["target_b"] == 8 and not phase_b.bool().any()
    else:
        assert logs["target_b"] == 1 and torch.equal(phase_b, (torch.arange(8) >= 1).float().expand(4, 8))


# ---------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize(
    "name,kw", [("flextok", {}), ("flextok", {"decoder": "flow"}), ("one_d_piece", {}), ("karl", {})]
)
def test_save_load_roundtrip_gives_identical_outputs(tmp_path, name, kw):
    tok = tiny(name, **kw)
    if name == "karl":
        tok.phase_a_probs.copy_(torch.linspace(1, 2, 19) / torch.linspace(1, 2, 19).sum())
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["name"] == name
    loaded = vtc.create_tokenizer(name, pretrained=tmp_path)
    assert type(loaded) is type(tok)
    x = images(3)
    with torch.no_grad():
        a, b = tok.encode(x, num_tokens=5), loaded.encode(x, num_tokens=5)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.features, b.features)
        if kw:  # the flow decoder samples: same noise for both
            ya = tok.decode(a, steps=2, generator=torch.Generator().manual_seed(0))
            yb = loaded.decode(b, steps=2, generator=torch.Generator().manual_seed(0))
        else:
            ya, yb = tok.decode(a), loaded.decode(b)
        assert torch.equal(ya, yb)
    assert type(vtc.tokenizers.Tokenizer1D.from_pretrained(tmp_path)) is type(tok)
    if name == "karl":
        assert torch.equal(loaded.phase_a_probs, tok.phase_a_probs)
        assert vtc.create_tokenizer(name, pretrained=tmp_path, halt_threshold=0.5).config.halt_threshold == 0.5
    with pytest.raises(ValueError, match="differs from the checkpoint"):
        vtc.create_tokenizer(name, pretrained=tmp_path, width=64)
    other = "karl" if name != "karl" else "flextok"
    with pytest.raises(ValueError, match=f"holds a {name!r} tokenizer"):
        vtc.create_tokenizer(other, pretrained=tmp_path)


def test_pretrained_true_without_assets_says_how_to_train(monkeypatch, tmp_path):
    monkeypatch.setattr(vtc.tokenizers.base, "ASSETS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="vtc train tokenizer karl"):
        vtc.create_tokenizer("karl", pretrained=True)
    with pytest.raises(FileNotFoundError, match="config.json"):
        vtc.create_tokenizer("karl", pretrained=tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- training
def _cli(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    train_mod.add_parser(sub)
    args = parser.parse_args(["tokenizer", *argv])
    return args.func(args)


TINY_SET = [f"--set={k}={v}" for k, v in TINY.items()]


@pytest.mark.parametrize("name", NAMES)
def test_smoke_training_lowers_the_loss(tmp_path, name):
    held_out = images(16, seed=123)

    def mse(tok) -> float:  # reconstruction error from all K tokens (in [0, 1] units)
        with torch.no_grad():
            return float(((tok.decode(tok.encode(held_out)) - held_out) ** 2).mean())

    before = mse(tiny(name, seed=0, vq_codebook_size=1024))  # the initial model train_tokenizer builds with seed 0
    out = train_mod.train_tokenizer(
        name, tmp_path, steps=20, threads=1, batch_size=8, lr=3e-3, warmup=1, log_every=1, save_every=10,
        eval_images=8, config=dict(TINY), log=None,
    )  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21)) and out["steps"] == 20
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert set(out["psnr_by_tokens"]) == {1, 2, 4, 8}
    trained = vtc.create_tokenizer(name, pretrained=tmp_path)
    assert trained.config.num_tokens == 8
    assert mse(trained) < 0.75 * before, (mse(trained), before)


def test_training_resumes_bit_for_bit(tmp_path):
    base = ["flextok", "--steps", "6", "--batch-size", "4", "--save-every", "3", "--eval-images", "0", *TINY_SET]
    _cli([*base, "--out", str(tmp_path / "a")])
    _cli([*base[:2], "3", *base[3:], "--out", str(tmp_path / "b")])  # stop after 3 steps ...
    assert json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    _cli([*base, "--out", str(tmp_path / "b")])  # ... and resume to 6
    a = vtc.create_tokenizer("flextok", pretrained=tmp_path / "a").state_dict()
    b = vtc.create_tokenizer("flextok", pretrained=tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="tail_dropout"):
        train_mod.train_tokenizer("flextok", tmp_path / "a", steps=7, tail_dropout=False, log=None)
    with pytest.raises(ValueError, match="data='synthetic', not 'shapes'"):
        train_mod.train_tokenizer("flextok", tmp_path / "a", steps=7, data="shapes", log=None)


def test_shapes_data_is_the_benchmark_scene_at_tokenizer_size(tmp_path):
    import cv2
    from vtc.eval.benchmarks import shapes as S

    x = train_mod.shapes_batch(2, 3, size=16, seed=1)
    assert x.shape == (3, 3, 16, 16) and float(x.min()) >= 0 and float(x.max()) <= 1
    scene = S.make_scene(10**7 + 4 * 10**6 + 2 * 3 + 1)  # the second image of batch 2, seed 1
    want = cv2.resize(scene.render(), (16, 16), interpolation=cv2.INTER_AREA)
    assert torch.equal(x[1], torch.from_numpy(want).permute(2, 0, 1).float() / 255)
    dense = train_mod.shapes_batch(2, 3, size=16, seed=1, variant="dense")[1]
    want = cv2.resize(S.make_scene(10**7 + 4 * 10**6 + 7, "dense").render(), (16, 16), interpolation=cv2.INTER_AREA)
    assert torch.equal(dense, torch.from_numpy(want).permute(2, 0, 1).float() / 255)
    out = train_mod.train_tokenizer(
        "flextok", tmp_path, steps=2, batch_size=2, data="shapes_dense", eval_images=0, config=dict(TINY), log=None
    )
    assert out["steps"] == 2
    with pytest.raises(ValueError, match="data='mnist' is not one of"):
        train_mod.train_tokenizer("flextok", tmp_path / "x", steps=1, data="mnist", log=None)


def test_weighted_mse_is_the_weighted_mean_of_a_plain_loop():
    from vtc.tokenizers.core import weighted_mse

    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(3, 3, 5, 4, generator=g), torch.rand(3, 3, 5, 4, generator=g)
    w = torch.rand(3, 1, 5, 4, generator=g)
    num = den = 0.0
    for b in range(3):
        for c in range(3):
            for y in range(5):
                for x in range(4):
                    num += float(w[b, 0, y, x]) * float(pred[b, c, y, x] - target[b, c, y, x]) ** 2
                    den += float(w[b, 0, y, x])
    assert float(weighted_mse(pred, target, w)) == pytest.approx(num / den, rel=1e-5)
    assert float(weighted_mse(pred, target, torch.full_like(w, 2.5))) == pytest.approx(
        float(F.mse_loss(pred, target)), rel=1e-5
    )


@pytest.mark.parametrize("name", NAMES)
def test_pixel_weights_in_the_training_loss(name):
    tok = tiny(name).train()
    x = images(4)
    w = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))

    def loss(weight):
        torch.manual_seed(5)
        return tok.training_loss(x, weight)[0].detach()

    plain = loss(None)
    assert torch.allclose(loss(torch.ones(4, 1, 16, 16)), plain, rtol=1e-5, atol=1e-6)
    weighted = loss(w)
    assert torch.allclose(loss(3 * w), weighted, rtol=1e-5, atol=1e-6)  # only relative weights matter
    assert not torch.allclose(weighted, plain)
    with pytest.raises(ValueError, match=r"weight must be a tensor \[B, 1, H, W\] = \(4, 1, 16, 16\)"):
        tok.training_loss(x, torch.ones(4, 3, 16, 16))
    with pytest.raises(ValueError, match="finite and >= 0"):
        tok.training_loss(x, -w)


def test_shapes_masks_are_the_downscaled_object_pixels(tmp_path):
    from vtc.eval.benchmarks import shapes as S

    x, cover = train_mod.shapes_batch(1, 3, size=24, seed=2, masks=True)
    assert torch.equal(x, train_mod.shapes_batch(1, 3, size=24, seed=2))
    scene = S.make_scene(2 * 10**7 + 4 * 10**6 + 3 + 2)  # the third image of batch 1, seed 2
    ids = scene.pixel_map()
    for i, o in enumerate(scene.objects):  # each object's centre shows it unless a later one covers it
        assert ids[int(o.cy), int(o.cx)] >= i + 1
    for j, (_, (x0, y0, x1, y1)) in enumerate(scene.tags()):
        assert (ids[y0 : y1 + 1, x0 : x1 + 1] == len(scene.objects) + 1 + j).all()
    want = cv2.resize((ids > 0).astype(np.float32), (24, 24), interpolation=cv2.INTER_AREA)
    assert torch.equal(cover[2, 0], torch.from_numpy(want))
    assert 0 < float(cover.mean()) < 0.3 and float(cover.max()) == 1.0
    # the coarse map is the per-pixel map pooled: a cell's id covers >= 20% of it
    coarse = scene.object_map(8)
    cell = scene.size // 8
    for gy in range(8):
        for gx in range(8):
            block = ids[gy * cell : (gy + 1) * cell, gx * cell : (gx + 1) * cell]
            if coarse[gy, gx]:
                assert (block == coarse[gy, gx]).mean() >= 0.2
            else:
                assert max(((block == v).mean() for v in np.unique(block) if v), default=0) < 0.2

    out = train_mod.train_tokenizer(
        "flextok", tmp_path, steps=2, batch_size=2, data="shapes", object_weight=20.0, eval_images=4,
        config=dict(TINY), log=None,
    )  # fmt: skip
    assert set(out["object_psnr_by_tokens"]) == set(out["psnr_by_tokens"]) == {1, 2, 4, 8}
    with pytest.raises(ValueError, match="object_weight=20.0, not 0.0"):
        train_mod.train_tokenizer("flextok", tmp_path, steps=3, data="shapes", config=dict(TINY), log=None)
    with pytest.raises(ValueError, match="only with data='shapes'"):
        train_mod.train_tokenizer("flextok", tmp_path / "s", steps=1, object_weight=5.0, log=None)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' but torch sees no CUDA device; use device='cpu'"):
            train_mod.train_tokenizer("flextok", tmp_path / "c", steps=1, device="cuda", log=None)


# ---------------------------------------------------------------------------------------------- data
def test_synthetic_images_are_deterministic_and_complexity_ordered():
    x, lv = synthetic_images(12, 16, seed=3)
    x2, lv2 = synthetic_images(4, 16, seed=3, start=8)
    assert torch.equal(x[8:], x2) and torch.equal(lv[8:], lv2)
    assert x.shape == (12, 3, 16, 16) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert not torch.equal(synthetic_images(4, 16, seed=4)[0], x[:4])

    def png_bytes(level: int) -> float:
        imgs, _ = synthetic_images(24, 32, seed=0, complexity=level)
        arr = (imgs.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        return float(np.mean([len(cv2.imencode(".png", a)[1]) for a in arr]))

    sizes = {COMPLEXITY_LEVELS[lv]: png_bytes(lv) for lv in (0, 2, 3, 4)}
    assert sizes["flat"] < sizes["few_shapes"] < sizes["cluttered"] < sizes["texture"], sizes
    with pytest.raises(ValueError, match="complexity=7"):
        synthetic_images(1, 16, complexity=7)


def test_skimage_photos_load():
    pytest.importorskip("skimage")
    from vtc.tokenizers.data import skimage_photos

    x, names = skimage_photos(16, names=("camera", "coffee"), tiles=2)
    assert x.shape == (8, 3, 16, 16) and len(names) == 8 and names[0] == "camera[0,0]"
    assert torch.equal(x[0, 0], x[0, 1])  # grayscale repeated over RGB


def test_shapes_pool_is_the_stream_drawn_once_per_epoch(tmp_path):
    pool = train_mod.ShapesPool(12, 16, seed=1, variant="base", batch_size=4)
    x, cover = train_mod.shapes_batch(0, 12, size=16, seed=1, masks=True)  # the stream's first 12 scenes
    assert torch.equal(pool.images.float() / 255, x)
    assert torch.allclose(pool.cover.float(), cover, atol=1e-3)  # float16 (exact where the cover is k/4, at S/2)
    epoch0 = torch.cat([pool.indices(s) for s in range(3)])
    epoch1 = torch.cat([pool.indices(s) for s in range(3, 6)])
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(12))  # each scene once per epoch
    assert not torch.equal(epoch0, epoch1) and torch.equal(pool.indices(4), pool.indices(4))
    xb, cb, none = pool.batch(4)
    assert none is None
    assert torch.equal(xb, x[pool.indices(4)]) and torch.equal(cb, pool.cover[pool.indices(4)].float())
    with pytest.raises(ValueError, match="pool=10 must be a positive multiple of batch_size=4"):
        train_mod.ShapesPool(10, 16, seed=1, variant="base", batch_size=4)

    kw = dict(batch_size=4, data="shapes", object_weight=5.0, eval_images=0, save_every=2, config=dict(TINY))
    train_mod.train_tokenizer("flextok", tmp_path / "a", steps=4, pool=12, lr_schedule="cosine", log=None, **kw)

    def killed_at_step_3(line: str) -> None:  # the run dies after its step-2 checkpoint, mid-schedule
        if "step 3 " in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_mod.train_tokenizer(
            "flextok", tmp_path / "b", steps=4, pool=12, lr_schedule="cosine", log_every=1, log=killed_at_step_3, **kw
        )
    assert json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    train_mod.train_tokenizer("flextok", tmp_path / "b", steps=4, pool=12, lr_schedule="cosine", log=None, **kw)
    a = vtc.create_tokenizer("flextok", pretrained=tmp_path / "a").state_dict()
    b = vtc.create_tokenizer("flextok", pretrained=tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed from the pool bit for bit
    with pytest.raises(ValueError, match=r"pool=12, lr_schedule='cosine' \(steps 4\), not pool=0"):
        train_mod.train_tokenizer("flextok", tmp_path / "a", steps=6, log=None, **kw)
    with pytest.raises(ValueError, match=r"\(steps 4\), not pool=12, lr_schedule='cosine' \(steps 6\)"):
        train_mod.train_tokenizer("flextok", tmp_path / "a", steps=6, pool=12, lr_schedule="cosine", log=None, **kw)
    with pytest.raises(ValueError, match="'cosine' needs steps"):
        train_mod.train_tokenizer("flextok", tmp_path / "c", minutes=1, lr_schedule="cosine", log=None)
    with pytest.raises(ValueError, match="pool=8 must be >= 0, and > 0 only with data='shapes'"):
        train_mod.train_tokenizer("flextok", tmp_path / "c", steps=1, pool=8, log=None)


def test_cosine_schedule_warms_up_then_decays_to_a_tenth():
    lrs = [train_mod.lr_at(s, 1e-3, 10, "cosine", 100) for s in range(100)]
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert all(a >= b for a, b in zip(lrs[9:-1], lrs[10:], strict=True)) and lrs[-1] == pytest.approx(1e-4)
    assert lrs[54] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90))))
    assert [train_mod.lr_at(s, 1e-3, 10, "constant", None) for s in (0, 9, 50, 500)] == pytest.approx(
        [1e-4, 1e-3, 1e-3, 1e-3]
    )


# ---------------------------------------------------------------------------------------------- REPA
@pytest.mark.parametrize("decoder", ["mse", "flow"])
def test_repa_term_is_one_minus_cosine_to_the_teacher_at_the_captured_block(decoder):
    tok = tiny("flextok", decoder=decoder, dec_depth=2, repa_dim=5, repa_layer=2, repa_weight=0.7).train()
    x, n = images(3), (16 // 4) ** 2
    align = torch.randn(3, n, 5, generator=torch.Generator().manual_seed(2))

    def run(a):
        torch.manual_seed(9)
        return tok.training_loss(x, align=a)

    (plain, plain_logs), (total, logs) = run(None), run(align)
    assert "repa" not in plain_logs and logs["rec"] == pytest.approx(plain_logs["rec"], rel=1e-6)
    # the hidden states after block 2 by hand (same RNG: same keep mask, noise and t)
    torch.manual_seed(9)
    xm = 2 * x - 1  # the model works in [-1, 1]
    feats = tok.encoder(xm)
    codes, _, _ = tok.quantize(feats)
    keep = tok.sample_keep(3, xm.device)
    dec = tok.decoder
    if decoder == "mse":
        h = dec.ln_pre(torch.cat([dec.image_queries.expand(3, -1, -1), dec.latent_sequence(codes, keep)[0]], 1))
        for blk in dec.blocks[:2]:
            h = blk(h, None)
    else:
        noise = torch.randn_like(xm)
        t = torch.sigmoid(torch.randn(3))
        x_t = t[:, None, None, None] * noise + (1 - t[:, None, None, None]) * xm
        null = torch.rand(3) < tok.config.cond_drop_prob
        reg = fill_tail(dec.reg_in(codes) + dec.reg_pos[:8], keep, dec.mask_token, 8)
        reg = reg * (~null).float()[:, None, None]
        h = torch.cat([dec.patch_in(patchify(x_t, 4)) + dec.pos_embed, reg], 1)
        c = dec.time_mlp(timestep_embedding(t, h.shape[-1]))
        for blk in dec.blocks[:2]:
            h = blk(h, c, n)
    want = 0.0
    h = h.detach()
    for b in range(3):
        for i in range(n):
            p = tok.repa_proj(h[b, i]).detach()
            want += 1 - float(p @ align[b, i] / (p.norm() * align[b, i].norm()))
    want /= 3 * n
    assert logs["repa"] == pytest.approx(want, rel=1e-4)
    assert float(total.detach()) == pytest.approx(float(plain.detach()) + 0.7 * want, rel=1e-4)
    with pytest.raises(ValueError, match=r"align must be \[B, N, repa_dim\] = \(3, 16, 5\)"):
        tok.training_loss(x, align=align[:, :4])
    with pytest.raises(ValueError, match="needs a model built with repa_dim"):
        tiny("flextok").train().training_loss(x, align=align)
    with pytest.raises(ValueError, match="repa_layer=3 in 1..dec_depth=2"):
        tiny("flextok", dec_depth=2, repa_dim=5, repa_layer=3)


def test_repa_teacher_features_and_training(tmp_path):
    from vtc.eval.benchmarks import shapes as S
    from vtc.eval.harness import resolve_model_path

    teacher_path = resolve_model_path("tiny-qwen2-vl-shapes")

    scenes = [S.make_scene(i).render() for i in range(2)]
    full, width = train_mod.load_teacher(teacher_path, 12)
    coarse, _ = train_mod.load_teacher(teacher_path, 6)
    f12, f6 = full(scenes), coarse(scenes)
    assert width == 128 and f12.shape == (2, 144, 128) and f6.shape == (2, 36, 128)
    grid = f12.reshape(2, 12, 12, 128)
    assert torch.allclose(f6[1, 6 * 2 + 3], grid[1, 4:6, 6:8].mean((0, 1)), atol=1e-5)  # cell (2, 3) pools 2 x 2

    cfg = dict(TINY, image_size=24, dec_depth=2)  # a 6 x 6 patch grid
    kw = dict(batch_size=4, data="shapes", eval_images=0, pool=8, config=cfg, log=None)
    train_mod.train_tokenizer("flextok", tmp_path, steps=2, repa_teacher=str(teacher_path), log_every=1, **kw)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(0 < r["repa"] < 2 for r in rows)
    assert vtc.create_tokenizer("flextok", pretrained=tmp_path).config.repa_dim == 128
    with pytest.raises(ValueError, match="not None; pass the same --repa-teacher"):
        train_mod.train_tokenizer("flextok", tmp_path, steps=3, **kw)
    with pytest.raises(ValueError, match="pass --pool N"):
        train_mod.train_tokenizer("one_d_piece", tmp_path / "o", steps=1, repa_teacher=str(teacher_path), **kw)
