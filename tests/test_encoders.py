"""vtc.adapters.encoders: timm / open_clip vision transformers → VisualTokens, checked against plain forwards.

Every model is built from a config with pretrained=False / None (nothing is downloaded). References are computed
independently of the adapter: features from forward hooks on a plain forward, attention from the models' own eager
attention paths (timm/EVA `fused_attn=False`, `nn.MultiheadAttention(need_weights=True)`) or, for open_clip's custom
Attention, from a manual eager attention that is itself checked against the module's output.
"""

from __future__ import annotations

import copy

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer as OCVisionTransformer
from PIL import Image
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer
from torch import nn
from vtc.adapters.encoders import (
    capture_attention,
    encode,
    encode_and_reduce,
    image_transform,
    reduce_in_encoder,
    resolve_encoder,
)
from vtc.adapters.encoders.core import as_reducer

import vtc
from vtc.reducers import Reducer, ReducerConfig, get_reducer_class
from vtc.types import Selection


# ------------------------------------------------------------------------------------------------ models
def _timm(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw).eval()


def _oc_vit(**kw) -> nn.Module:
    torch.manual_seed(0)
    return OCVisionTransformer(
        image_size=32, patch_size=8, width=64, layers=3, heads=2, mlp_ratio=2.0, output_dim=32, **kw
    ).eval()


def _oc_timm() -> nn.Module:
    torch.manual_seed(0)
    tower = TimmModel("test_vit3", embed_dim=32, image_size=64, pool="", proj="linear").eval()
    tower.trunk = _timm("test_vit3", depth=3, img_size=64)  # same trunk, fewer blocks, the tower's image size
    tower.trunk.reset_classifier(0, global_pool="")
    return tower


# name -> (builder, image size); built lazily once per module
SPECS = {
    "vit": (lambda: _timm("test_vit", depth=3), 64),  # CLS, dynamic image size
    "deit_distilled": (lambda: _timm("deit_tiny_distilled_patch16_224", depth=2, img_size=64), 64),  # CLS + dist
    "vit_qknorm": (
        lambda: _timm("vit_small_patch16_224", depth=2, embed_dim=64, num_heads=2, img_size=48, qk_norm=True),
        48,
    ),
    "siglip": (  # no CLS, attention-pool head
        lambda: _timm("vit_base_patch16_siglip_224", depth=2, embed_dim=64, num_heads=2, img_size=64),
        64,
    ),
    "registers": (lambda: _timm("test_vit2", depth=3), 64),  # no CLS, one register token
    "eva": (lambda: _timm("eva02_tiny_patch14_224", depth=2, img_size=56), 56),  # rope, q/v bias
    "oc_mha": (_oc_vit, 32),  # open_clip ResidualAttentionBlock + nn.MultiheadAttention
    "oc_custom": (lambda: _oc_vit(qk_norm=True), 32),  # open_clip CustomResidualAttentionBlock + Attention
    "oc_timm": (_oc_timm, 64),  # open_clip TimmModel (SigLIP-style trunk without CLS)
}
TIMM_EAGER = ("vit", "deit_distilled", "vit_qknorm", "siglip", "registers", "eva", "oc_timm")
_CACHE: dict[str, nn.Module] = {}


def model(name: str) -> nn.Module:
    if name not in _CACHE:
        _CACHE[name] = SPECS[name][0]()
    return _CACHE[name]


def images(name: str, b: int = 2, seed: int = 0) -> torch.Tensor:
    s = SPECS[name][1]
    return torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(seed))


def blocks_of(m: nn.Module) -> list[nn.Module]:
    if isinstance(m, TimmModel):
        m = m.trunk
    return list(m.blocks) if hasattr(m, "blocks") else list(m.transformer.resblocks)


def num_prefix(name: str) -> int:
    return resolve_encoder(model(name)).num_prefix


def no_hooks_left(m: nn.Module) -> bool:
    return all(
        not (mod._forward_hooks or mod._forward_pre_hooks or mod._forward_hooks_with_kwargs) for mod in m.modules()
    )


# ------------------------------------------------------------------------------------------------ references
def plain_block_outputs(m: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of every block during the model's own forward."""
    outs, hs = [], []
    for blk in blocks_of(m):
        hs.append(blk.register_forward_hook(lambda mod, a, o: outs.append(o)))
    try:
        with torch.no_grad():
            m(x)
    finally:
        for h in hs:
            h.remove()
    return outs


def eager_probs(name: str, x: torch.Tensor, layer: int) -> torch.Tensor:
    """`[B, H, L, L]` attention probabilities of block `layer` from the model's own non-fused path."""
    ref = copy.deepcopy(model(name))
    attn = blocks_of(ref)[layer].attn
    got: dict[str, torch.Tensor] = {}
    if name in TIMM_EAGER:  # timm Attention / EvaAttention: eager softmax goes through attn_drop
        attn.fused_attn = False
        h = attn.attn_drop.register_forward_hook(lambda mod, a, o: got.__setitem__("p", a[0]))
        with torch.no_grad():
            ref(x)
        h.remove()
        return got["p"]
    h = attn.register_forward_pre_hook(lambda mod, a: got.__setitem__("x", a[0]))
    with torch.no_grad():
        ref(x)
    h.remove()
    xin = got["x"]
    if isinstance(attn, nn.MultiheadAttention):
        with torch.no_grad():
            return attn(xin, xin, xin, need_weights=True, average_attn_weights=False)[1]
    return custom_attention_probs(attn, xin)


def custom_attention_probs(attn: nn.Module, x: torch.Tensor, check_output: bool = True) -> torch.Tensor:
    """Manual eager attention of open_clip's Attention, verified against the module's own output."""
    b, n, c = x.shape
    with torch.no_grad():
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, attn.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        q, k = attn.ln_q(q), attn.ln_k(k)
        p = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
        if check_output:
            o = p @ v
            if attn.head_scale is not None:
                o = o * attn.head_scale
            o = attn.out_proj(attn.ln_inner(o.transpose(1, 2).reshape(b, n, c)))
            torch.testing.assert_close(o, attn(x), atol=1e-5, rtol=1e-4)
    return p


def renorm_patches(p: torch.Tensor, pre: int) -> torch.Tensor:
    """Rows of probabilities restricted to the patch columns, renormalised."""
    r = p[..., pre:]
    return r / r.sum(-1, keepdim=True)


# ------------------------------------------------------------------------------------------------ features / attention
@pytest.mark.parametrize("name", list(SPECS))
def test_features_match_plain_forward(name):
    m, x = model(name), images(name)
    outs = plain_block_outputs(m, x)
    p = num_prefix(name)
    for layer in (-2, -1, 0):
        with torch.no_grad():  # same grad mode as the reference (nn.MultiheadAttention has a no-grad fast path)
            vt = encode(m, x, layer=layer)
        ref = outs[layer][:, p:]
        assert vt.features.shape == ref.shape
        torch.testing.assert_close(vt.features, ref, atol=0, rtol=0)
        assert vt.tokens is vt.features
        h, w = vt.grid
        assert h * w == ref.shape[1]


@pytest.mark.parametrize("name", list(SPECS))
def test_attention_matches_eager(name):
    m, x = model(name), images(name)
    p = num_prefix(name)
    depth = len(blocks_of(m))
    probs = eager_probs(name, x, depth - 2)  # [B, H, L, L]
    rows = probs[:, :, p:]  # patch query rows
    expect = {
        # log P_ij = logit_ij - lse_i, so the mean over rows i is the mean-query logit up to a constant
        "mean_query": rows.clamp_min(1e-30).log().mean(2)[..., p:].softmax(-1),
        "mean_attn": renorm_patches(rows.mean(2), p),
    }
    if resolve_encoder(m).has_cls:
        expect["cls"] = renorm_patches(probs[:, :, 0], p)
    for mode, ref in expect.items():
        vt = encode(m, x, attn_query=mode)
        assert vt.cls_attn.dtype == torch.float32
        assert vt.cls_attn.shape == ref.shape
        torch.testing.assert_close(vt.cls_attn.softmax(-1), ref, atol=2e-6, rtol=1e-4, msg=f"attn_query={mode}")
    auto = encode(m, x).cls_attn
    torch.testing.assert_close(auto, encode(m, x, attn_query="cls" if "cls" in expect else "mean_query").cls_attn)
    assert encode(m, x, attn_query="none").cls_attn is None


def test_mean_query_is_linear_in_queries():
    """The documented substitute: logits of the mean patch query = mean of the patch rows' logits."""
    m, x = model("siglip"), images("siglip")
    layer = -1
    attn = blocks_of(m)[layer].attn
    got = {}
    h = attn.qkv.register_forward_hook(lambda mod, a, o: got.__setitem__("qkv", o))
    with torch.no_grad():
        m(x)
    h.remove()
    b, n, _ = got["qkv"].shape
    q, k, _ = got["qkv"].reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    ref = (q.float() @ k.float().transpose(-1, -2) * attn.scale).mean(2)  # every row's logits, averaged
    vt = encode(m, x, layer=layer, attn_query="mean_query")
    torch.testing.assert_close(vt.cls_attn, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vt.keys, k.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("name", ["vit", "vit_qknorm", "eva", "oc_mha", "oc_custom"])
def test_keys_are_the_layers_keys(name):
    """Keys against the k rows of the layer's own input projection (EVA: before rotary embedding)."""
    m, x = model(name), images(name)
    attn = blocks_of(m)[1].attn
    got = {}
    h = attn.register_forward_pre_hook(lambda mod, a, kw: got.__setitem__("x", a[0]), with_kwargs=True)
    with torch.no_grad():
        m(x)
    h.remove()
    xin = got["x"]
    b, n, d = xin.shape
    with torch.no_grad():
        if name == "eva":
            qkv = F.linear(xin, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
            k = attn.k_norm(qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[1])
        elif name.startswith("vit"):
            k = attn.k_norm(attn.qkv(xin).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[1])
        else:
            k = F.linear(xin, attn.in_proj_weight, attn.in_proj_bias)[..., d : 2 * d]
            k = k.reshape(b, n, attn.num_heads, -1).transpose(1, 2)
            if name == "oc_custom":
                k = attn.ln_k(k)
    ref = k.transpose(1, 2).reshape(b, n, -1)[:, num_prefix(name) :]
    torch.testing.assert_close(encode(m, x, layer=1).keys, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["vit", "eva", "oc_mha"])
def test_final_norm_option(name):
    m, x = model(name), images(name)
    vit = m.trunk if isinstance(m, TimmModel) else m
    final_norm = vit.ln_post if hasattr(vit, "ln_post") else vit.norm
    with torch.no_grad():
        ref = final_norm(plain_block_outputs(m, x)[-1])[:, num_prefix(name) :]
        got = encode(m, list(x), layer=-1, norm=True)  # a list of preprocessed [C, H, W] tensors works too
    torch.testing.assert_close(got.features, ref, atol=1e-6, rtol=1e-5)


def test_attn_layer_differs_from_feature_layer():
    m, x = model("vit"), images("vit")
    with torch.no_grad():
        a = encode(m, x, layer=0, attn_layer=-1)
        b = encode(m, x, layer=-1)
    torch.testing.assert_close(a.cls_attn, b.cls_attn)
    torch.testing.assert_close(a.features, plain_block_outputs(m, x)[0][:, 1:], atol=0, rtol=0)


@pytest.mark.parametrize("name", list(SPECS))
def test_outputs_bit_identical_with_capture_and_hooks_removed(name):
    m, x = model(name), images(name)
    with torch.no_grad():
        before = m(x)
        with capture_attention(m, layer=-2) as rec:
            during = m(x)
        encode(m, x)
        after = m(x)
    assert rec.patch_logits is not None and rec.patch_keys is not None
    assert torch.equal(before, during) and torch.equal(before, after)
    assert no_hooks_left(m)


def test_open_clip_full_model_and_transform():
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8),
        text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1),
    ).eval()
    open_clip.set_model_preprocess_cfg(clip, {**open_clip.transform.PreprocessCfg().__dict__, "size": (32, 32)})
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(encode(clip, x).features, encode(clip.visual, x).features, atol=0, rtol=0)
    tf = image_transform(clip)
    img = Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy())
    assert tf(img).shape == (3, 32, 32)
    vt = encode(clip, [img, img.convert("L")])  # PIL inputs are put through the encoder's transform
    assert vt.features.shape == (2, 16, 64)
    torch.testing.assert_close(
        encode(clip, torch.stack([tf(img), tf(img.convert("L").convert("RGB"))])).features, vt.features
    )


def test_timm_transform_uses_model_size():
    tf = image_transform(model("vit_qknorm"))
    img = Image.fromarray((torch.rand(70, 90, 3) * 255).byte().numpy())
    assert tf(img).shape == (3, 48, 48)
    assert encode(model("vit_qknorm"), img).features.shape == (1, 9, 64)


def test_projector_and_views():
    m = model("oc_mha")
    x = images("oc_mha", b=6)
    proj = nn.Linear(64, 24)
    vt = encode(m, x, projector=proj, views=(1, 2))
    single = encode(m, x)
    assert vt.tokens.shape == (2, 48, 24) and vt.features.shape == (2, 48, 64) and vt.views == (1, 2)
    assert vt.grid == (4, 4) and vt.cls_attn.shape == (2, 2, 48)
    for s in range(2):
        for v in range(3):
            sl = slice(16 * v, 16 * (v + 1))
            torch.testing.assert_close(vt.cls_attn[s, :, sl], single.cls_attn[3 * s + v])
            torch.testing.assert_close(vt.features[s, sl], single.features[3 * s + v])
    torch.testing.assert_close(vt.tokens, proj(vt.features))
    vf = encode(m, x, frames=3)
    assert vf.frames == 3 and vf.features.shape == (2, 48, 64)


def test_bf16_encoder():
    m = copy.deepcopy(model("vit")).to(torch.bfloat16)
    vt = encode(m, images("vit").to(torch.bfloat16))
    assert vt.features.dtype == torch.bfloat16 and vt.cls_attn.dtype == torch.float32
    sel = encode_and_reduce(m, images("vit").to(torch.bfloat16), "fastervlm", budget=5)
    assert sel.tokens.shape == (2, 5, 64) and sel.tokens.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ every reducer
@pytest.mark.parametrize("lib", ["timm", "open_clip"])
@pytest.mark.parametrize("reducer", vtc.list_reducers())
def test_every_registered_reducer_runs(reducer, lib):
    cls = get_reducer_class(reducer)
    name = "vit" if lib == "timm" else "oc_mha"
    m, b = model(name), 2
    if cls.stage != "pre_llm":
        with pytest.raises(ValueError, match="inside the LLM"):
            encode_and_reduce(m, images(name), reducer, budget=4)
        return
    kw = {}
    per = 1
    if "views" in cls.requires:
        kw["views"], per = (1, 2), 3
    elif "frames" in cls.requires:
        kw["frames"], per = 2, 2
    x = images(name, b=b * per)
    proj = nn.Linear(64, 32)
    query = torch.randn(b, 5, 32, generator=torch.Generator().manual_seed(1)) if cls.needs_query else None
    torch.manual_seed(0)
    with torch.no_grad():
        sel = encode_and_reduce(m, x, reducer, budget=0.25, query=query, projector=proj, **kw)
    n = 16 * per
    k = round(0.25 * n)
    assert isinstance(sel, Selection)
    assert sel.tokens.shape[0] == b and sel.tokens.shape[2] == 32
    if cls.adaptive:
        assert sel.tokens.shape[1] <= k and bool((sel.num_kept <= k).all())
    else:
        assert sel.tokens.shape[1] == k and bool(sel.mask.all())
    assert torch.isfinite(sel.tokens).all()


# ------------------------------------------------------------------------------------------------ errors
def test_odd_image_sizes_raise():
    with pytest.raises(ValueError, match=r"takes 48x48 images, got 64x64.*dynamic_img_size=True"):
        encode(model("vit_qknorm"), torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"50x50 is not a multiple of the patch size 16x16"):
        encode(model("vit"), torch.randn(1, 3, 50, 50))  # dynamic size, but no dynamic padding
    assert encode(model("vit"), torch.randn(1, 3, 48, 80)).grid == (3, 5)  # dynamic sizes work
    with pytest.raises(ValueError, match=r"takes 32x32 images.*fixed size"):
        encode(model("oc_mha"), torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match=r"float tensor \[B, C, H, W\]"):
        encode(model("vit"), torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_no_cls_models():
    for name in ("siglip", "registers", "oc_timm"):
        with pytest.raises(ValueError, match="has no CLS token.*mean_query"):
            encode(model(name), images(name), attn_query="cls")
    with pytest.raises(ValueError, match=r"fastervlm: needs VisualTokens.cls_attn"):
        encode_and_reduce(model("siglip"), images("siglip"), "fastervlm", budget=4, attn_query="none")
    sel = encode_and_reduce(model("siglip"), images("siglip"), "fastervlm", budget=4)  # mean-query substitute
    assert sel.tokens.shape == (2, 4, 64)


def test_unsupported_encoders_raise():
    with pytest.raises(TypeError, match="unsupported vision encoder.*timm VisionTransformer"):
        encode(_timm("test_resnet"), torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match="unsupported vision encoder"):
        encode(ModifiedResNet(layers=(1, 1, 1, 1), output_dim=32, heads=2, image_size=64, width=16), images("vit"))
    with pytest.raises(TypeError, match="unsupported vision encoder"):
        encode(nn.Linear(3, 3), images("vit"))
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        encode("vit_base_patch16_224", images("vit"))
    vit = VisionTransformer(
        img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2, block_fn=ParallelScalingBlock
    )
    with pytest.raises(TypeError, match="block 0 .*ParallelScalingBlock"):
        encode(vit, torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match="scaled-cosine"):
        encode(_oc_vit(scaled_cosine_attn=True), images("oc_mha"))
    with pytest.raises(ValueError, match=r"layer=5 is out of range for an encoder with 3 blocks"):
        encode(model("vit"), images("vit"), layer=5)
    with pytest.raises(ValueError, match="do not split into samples of 3"):
        encode(model("vit"), images("vit", b=4), views=(1, 2))
    with pytest.raises(ValueError, match="attn_query='bogus'"):
        encode(model("vit"), images("vit"), attn_query="bogus")
    with pytest.raises(TypeError, match="registered name or a vtc.Reducer"):
        as_reducer(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------ inside the encoder
class _TailMerge(Reducer):
    """Test-only merger (not registered): keeps tokens 0..k-2 and averages the rest into one last token."""

    merges = True

    def _reduce(self, vt, k, query):
        x = vt.tokens
        b, n, _ = x.shape
        assign = torch.arange(n).clamp(max=k - 1).expand(b, n).contiguous()
        tokens = torch.cat([x[:, : k - 1], x[:, k - 1 :].mean(1, keepdim=True)], dim=1)
        weights = torch.ones(b, k)
        weights[:, -1] = n - k + 1
        return Selection(tokens, None, torch.ones(b, k, dtype=torch.bool), weights, assign)


def _tail_merge() -> Reducer:
    r = _TailMerge(ReducerConfig())
    r.name = "tail_merge"
    return r


def _reference_inside(name: str, x: torch.Tensor, layers: list[int], ks: list[int], mode: str) -> torch.Tensor:
    """Run the blocks one by one, reducing by hand after each listed block. Returns the final hidden state."""
    m = model(name)
    vit = m.trunk if isinstance(m, TimmModel) else m
    p = num_prefix(name)
    blocks = blocks_of(m)
    with torch.no_grad():
        if hasattr(vit, "patch_embed"):
            h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        else:
            h = vit._embeds(x)
        b = h.shape[0]
        sizes = torch.ones(b, h.shape[1] - p)
        for i, blk in enumerate(blocks):
            kwargs = {}
            if mode == "merge" and bool((sizes != 1).any()):
                bias = torch.cat([torch.zeros(b, p), sizes.log()], 1)  # [B, L]
                mask = bias[:, None, None, :]
                if isinstance(blk.attn, nn.MultiheadAttention):
                    ln = bias.shape[1]
                    mask = mask.expand(b, blk.attn.num_heads, ln, ln).reshape(-1, ln, ln)
                kwargs["attn_mask"] = mask
            probs = None
            if mode == "prune" and i in layers:
                probs = eager_probs_block(name, blk, h)
            h = blk(h, **kwargs)
            if i not in layers:
                continue
            k = ks[layers.index(i)]
            pre, pat = h[:, :p], h[:, p:]
            rows = []
            for s in range(b):  # per sample, plainly
                if mode == "prune":
                    score = renorm_patches(probs[s, :, 0], p).mean(0)
                    keep = sorted(torch.topk(score, k).indices.tolist())
                    rows.append(pat[s, keep])
                    sizes_s = sizes[s, keep]
                else:
                    head = pat[s, : k - 1]
                    tail_w = sizes[s, k - 1 :]
                    tail = (pat[s, k - 1 :] * tail_w[:, None]).sum(0) / tail_w.sum()
                    rows.append(torch.cat([head, tail[None]], 0))
                    sizes_s = torch.cat([sizes[s, : k - 1], tail_w.sum()[None]])
                if s == 0:
                    new_sizes = torch.empty(b, k)
                new_sizes[s] = sizes_s
            sizes = new_sizes
            h = torch.cat([pre, torch.stack(rows)], 1)
    return h


def eager_probs_block(name: str, blk: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Eager attention probabilities of one block on its input h."""
    ref = copy.deepcopy(blk)
    got = {}
    if name in TIMM_EAGER:
        ref.attn.fused_attn = False
        hk = ref.attn.attn_drop.register_forward_hook(lambda mod, a, o: got.__setitem__("p", a[0]))
        ref(h)
        hk.remove()
        return got["p"]
    xin = ref.ln_1(h)
    if isinstance(ref.attn, nn.MultiheadAttention):
        return ref.attn(xin, xin, xin, need_weights=True, average_attn_weights=False)[1]
    return custom_attention_probs(ref.attn, xin, check_output=False)


def _final_hidden(name: str, x: torch.Tensor) -> torch.Tensor:
    return plain_block_outputs(model(name), x)[-1]


@pytest.mark.parametrize("name", ["vit", "deit_distilled", "oc_mha", "oc_custom"])
def test_cls_pruning_inside_matches_reference(name):
    m, x = model(name), images(name)
    layers, ks = [0, 1], [10, 4]
    with torch.no_grad():
        before = m(x)
        with reduce_in_encoder(m, "fastervlm", budget=4, layers=layers) as red:
            got = _final_hidden(name, x)
            assert red.counts == ks and red.sizes.shape == (2, 4) and bool((red.sizes == 1).all())
            src = red.source
            assert ((src >= 0).sum(1) == 4).all()
        ref = _reference_inside(name, x, layers, ks, "prune")
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
        assert torch.equal(m(x), before) and no_hooks_left(m)


@pytest.mark.parametrize("name", ["vit", "oc_mha", "oc_custom", "oc_timm"])
def test_merging_inside_sizes_and_proportional_attention(name):
    m, x = model(name), images(name)
    layers, ks = [0, 1], [9, 5]
    with torch.no_grad():
        before = m(x)
        red = reduce_in_encoder(m, _tail_merge(), budget=[9, 5], layers=layers)
        got = _final_hidden(name, x)
        assert red.counts == ks
        assert torch.equal(red.sizes.sum(1), torch.full((2,), 16.0))
        assert red.source.max() == 4 and bool((red.source >= 0).all())  # nothing dropped by a merger
        red.remove()
        ref = _reference_inside(name, x, layers, ks, "merge")
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
        assert torch.equal(m(x), before) and no_hooks_left(m)


@pytest.mark.parametrize("reducer", [r for r in ("tome", "fastervlm", "random") if r in vtc.list_reducers()])
def test_registered_reducers_inside_timm_and_open_clip(reducer):
    for name in ("vit", "oc_mha"):
        m, x = model(name), images(name)
        with torch.no_grad(), reduce_in_encoder(m, reducer, budget=0.25, layers=[0, 1]) as red:
            out = m(x)
            assert red.counts == [10, 4]
            if red.reducer.merges:
                torch.testing.assert_close(red.sizes.sum(1), torch.full((2,), 16.0))
            else:
                assert bool((red.sizes == 1).all())
            vt = encode(m, x, layer=-1)  # block 2 runs on the 4 remaining patch tokens
            assert vt.features.shape == (2, 4, 64) and vt.grid is None and vt.cls_attn.shape[-1] == 4
            with pytest.raises(ValueError, match="reduced inside the encoder"):
                encode(m, x, layer=-1, attn_layer=0)
        assert torch.isfinite(out).all() and no_hooks_left(m)


def test_inside_errors_and_schedule():
    with pytest.raises(ValueError, match="rotary position embeddings"):
        reduce_in_encoder(model("eva"), "fastervlm", budget=4, layers=[0])
    query_aware = [r for r in vtc.list_reducers() if get_reducer_class(r).needs_query]
    for r in query_aware[:1]:
        with pytest.raises(ValueError, match="query-aware"):
            reduce_in_encoder(model("vit"), r, budget=4, layers=[0])
    if "globalcom2" in vtc.list_reducers():
        with pytest.raises(ValueError, match=r"requires \['views'\]"):
            reduce_in_encoder(model("vit"), "globalcom2", budget=4, layers=[0])
    if "fastv" in vtc.list_reducers():
        with pytest.raises(ValueError, match="inside the LLM"):
            reduce_in_encoder(model("vit"), "fastv", budget=4, layers=[0])
    m, x = model("vit"), images("vit")
    with reduce_in_encoder(m, "fastervlm", budget=[8, 12], layers=[0, 1]):
        with pytest.raises(ValueError, match="must not increase"):
            m(x)
    with reduce_in_encoder(m, "fastervlm", budget=4, layers=[0]):
        with pytest.raises(RuntimeError, match="already reduces tokens"):
            reduce_in_encoder(m, "fastervlm", budget=4, layers=[1])
    with torch.no_grad():
        before = m(x)
        with reduce_in_encoder(m, "fastervlm", budget=1.0, layers=[0, 1]) as red:  # full budget: nothing changes
            assert torch.equal(m(x), before) and red.counts == [16, 16]
    assert no_hooks_left(m)
