"""The same code on a CUDA device: every reducer, every adapter family with every method, and the tokenizers give the
CPU's answers (float32) and stay finite in bfloat16. Skipped where no GPU is present (CI); run on a GPU machine with
`pytest tests/test_cuda.py`."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import make_inputs
from test_adapter_llava_next import SIZES
from test_adapter_qwen2_vl import GRIDS
from test_tokenizers import images, tiny
from tiny_models import (
    llava_batch,
    llava_next_batch,
    qwen_batch,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
)

import vtc
from vtc.reducers import get_reducer_class

# VTC_TEST_DEVICE=cpu runs the same comparisons CPU against CPU (a check of this file on a machine without a GPU)
CUDA = torch.device(os.environ.get("VTC_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPTS = [[10, 11, 12, 13], [14, 15], [16, 17, 18]]
ALL = vtc.list_reducers()
PRE = [n for n in ALL if get_reducer_class(n).stage == "pre_llm"]
# family -> (builder, batch maker); LLaVA-NeXT alone gives reducers that need views (thumbnail + crops) their input
FAMILIES = {
    "llava": (tiny_llava, lambda m: llava_batch(m, PROMPTS)),
    "llava_next": (tiny_llava_next, lambda m: llava_next_batch(m, SIZES, PROMPTS)),
    "qwen2_vl": (tiny_qwen2_vl, lambda m: qwen_batch(m, GRIDS, PROMPTS)),
    "qwen2_5_vl": (tiny_qwen2_5_vl, lambda m: qwen_batch(m, GRIDS, PROMPTS)),
}


def _on(t: torch.Tensor) -> bool:
    return t.device.type == CUDA.type


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if hasattr(x, "__dataclass_fields__"):
        return type(x)(**{k: _to(getattr(x, k), device) for k in x.__dataclass_fields__})
    return x


def _select(name: str, device: torch.device, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)  # trainable reducers initialise their heads from the global RNG
    r = vtc.create_reducer(name).eval().to(device)
    vt, q = make_inputs(name, b=3, grid=(6, 6), d=16, seed=1, dtype=dtype)
    with torch.no_grad():
        return r(_to(vt, device), budget=0.4, query=_to(q, device))


@pytest.mark.parametrize("name", PRE)
def test_reducer_on_cuda_keeps_what_it_keeps_on_cpu(name):
    cpu, gpu = _select(name, torch.device("cpu")), _select(name, CUDA)
    assert _on(gpu.tokens) and _on(gpu.mask)
    assert torch.equal(cpu.mask, gpu.mask.cpu())
    if cpu.indices is not None:
        assert torch.equal(cpu.indices, gpu.indices.cpu()), name
    torch.testing.assert_close(gpu.tokens.cpu(), cpu.tokens, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", PRE)
def test_reducer_in_bfloat16_on_cuda(name):
    sel = _select(name, CUDA, torch.bfloat16)
    assert sel.tokens.dtype == torch.bfloat16 and torch.isfinite(sel.tokens.float()).all()
    assert bool((sel.num_kept >= 1).all())


# the tiny LLMs have 3 layers: in-LLM methods get layers that exist there
CONFIG = {"atp_llm": {"layers": (1, 2)}, "sparsevlm": {"layers": (1, 2)}, "todre_llm": {"layer": 1, "drop_layer": 2}}


def _methods(family: str) -> list[str]:
    views = family == "llava_next"
    return [n for n in ALL if views or "views" not in get_reducer_class(n).requires]


CASES = [(f, n) for f in FAMILIES for n in _methods(f)]


@pytest.fixture(scope="module")
def models():
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            build, make_batch = FAMILIES[family]
            cpu = build(seed=3)
            gpu = build(seed=3).to(CUDA)
            batch = make_batch(cpu)
            cache[family] = (cpu, gpu, batch, _to(batch, CUDA))
        return cache[family]

    return get


def _gen(m, batch):
    with torch.no_grad():
        return m.generate(**batch, max_new_tokens=4, do_sample=False)


@pytest.mark.parametrize(("family", "name"), CASES)
def test_adapter_on_cuda_matches_cpu(models, family, name):
    """Full budget on CUDA = the untouched model on CUDA; at a reduced budget the logits and the counts of kept
    tokens equal the CPU run's, and generate() runs with the batch of three prompts."""
    cpu, gpu, batch, gbatch = models(family)
    ref = _gen(gpu, gbatch)
    with vtc.compressed(gpu, name, budget=1.0, **CONFIG.get(name, {})):
        assert torch.equal(_gen(gpu, gbatch), ref)
    torch.manual_seed(0)  # trainable reducers (ATP, QTSplus) initialise their heads from the global RNG
    with torch.no_grad(), vtc.compressed(cpu, name, budget=0.5, **CONFIG.get(name, {})):
        want = cpu(**batch).logits
        kept = vtc.adapters.adapter_of(cpu).last.get("kept")
    torch.manual_seed(0)
    with torch.no_grad(), vtc.compressed(gpu, name, budget=0.5, **CONFIG.get(name, {})):
        got = gpu(**gbatch).logits
        assert vtc.adapters.adapter_of(gpu).last.get("kept") == kept
        out = _gen(gpu, gbatch)
    assert out.shape[0] == len(PROMPTS) and _on(out)
    torch.testing.assert_close(got.cpu(), want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_in_bfloat16_on_cuda(models, family):
    gbatch = models(family)[3]
    m = FAMILIES[family][0](seed=3).to(CUDA, torch.bfloat16)
    b = {k: v.to(torch.bfloat16) if torch.is_floating_point(v) else v for k, v in gbatch.items()}
    for name in _methods(family):
        with torch.no_grad(), vtc.compressed(m, name, budget=0.5, **CONFIG.get(name, {})):
            logits = m(**b).logits
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all(), name


@pytest.mark.parametrize("name", vtc.list_tokenizers())
def test_tokenizer_on_cuda_matches_cpu(name):
    cpu, gpu = tiny(name), tiny(name).to(CUDA)  # the same seed: the same weights
    x = images(4, 16)

    # FlexTok's flow decoder samples noise; the two devices' generators draw different noise from one seed
    def noise(d) -> dict:
        return {"generator": torch.Generator(device=d).manual_seed(0)} if name == "flextok" else {}

    with torch.no_grad():
        a, b = cpu.encode(x, num_tokens=5), gpu.encode(x.to(CUDA), num_tokens=5)
        assert torch.equal(a.ids, b.ids.cpu())
        da, db = cpu.decode(a, **noise("cpu")), gpu.decode(b, **noise(CUDA))
        assert _on(db) and torch.isfinite(db).all()
        if name != "flextok":
            torch.testing.assert_close(db.cpu(), da, atol=1e-4, rtol=1e-4)
        if name == "karl":
            e = gpu.encode(x.to(CUDA), error=0.05)
            assert _on(e.ids) and _on(e.mask)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_training_on_the_device_resumes_on_the_cpu(tmp_path, family, monkeypatch):
    """`vtc train vlm --device cuda`: every stage runs there, and its checkpoint (weights and optimiser moments,
    saved from the device) resumes on the CPU."""
    import dataclasses
    import json

    from vtc.train import vlm

    cfg = vlm.TrainConfig(family=family, pool=8, dense_pool=4, dense_steps=2, dense_batch=2, lm_steps=2, lm_batch=2,
                          qa_per_image=2, val_per_type=1, threads=1, checkpoint_every=1, device=str(CUDA))  # fmt: skip
    real_save = vlm.save_state

    def save_then_stop(path, modules, opt, meta):  # the run is killed after its first LLM step's checkpoint
        real_save(path, modules, opt, meta)
        if meta.get("stage") == "lm" and meta.get("step") == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(vlm, "save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        vlm.train_vlm(cfg, tmp_path, log=lambda *_: None)
    monkeypatch.setattr(vlm, "save_state", real_save)
    vlm.train_vlm(dataclasses.replace(cfg, device="cpu"), tmp_path, log=lambda *_: None)
    log = [json.loads(x) for x in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    steps = [(r["stage"], r["step"]) for r in log if r["stage"] in ("dense", "lm", "val")]
    assert steps == [("dense", 0), ("lm", 0), ("val", 2)], steps  # LLM step 0 on the device, step 1 on the CPU
    assert all(math.isfinite(r["loss"]) for r in log if r["stage"] == "lm")


def test_tokenizer_training_on_the_device_resumes_on_the_cpu(tmp_path):
    """`vtc train tokenizer --device cuda` with object weights: the checkpoint written from the device resumes on
    the CPU, and the model it saves loads there."""
    from test_tokenizers import TINY

    from vtc.train import tokenizer as train_mod

    kw = dict(
        batch_size=2, data="shapes", object_weight=10.0, eval_images=4, save_every=1, config=dict(TINY), log=None
    )
    out = train_mod.train_tokenizer("flextok", tmp_path, steps=2, device=str(CUDA), **kw)
    assert out["device"].startswith(CUDA.type) and set(out["object_psnr_by_tokens"]) == {1, 2, 4, 8}
    out = train_mod.train_tokenizer("flextok", tmp_path, steps=3, device="cpu", **kw)
    assert out["steps"] == 3 and out["steps_this_run"] == 1 and out["device"] == "cpu"
    assert math.isfinite(out["last"]["loss"])
    vtc.create_tokenizer("flextok", pretrained=tmp_path)
